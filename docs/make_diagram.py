"""Rewrite the lifecycle diagram in docs/concepts.md from the declaration.

Run ``python docs/make_diagram.py`` after changing the lifecycle;
``tests/test_docs_diagram.py`` fails until the two agree.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from senderqueue._lifecycle import diagram

CONCEPTS = Path(__file__).with_name("concepts.md")
MERMAID_BLOCK = re.compile(r"^```mermaid\n.*?\n```$", re.DOTALL | re.MULTILINE)


def main() -> int:
    text = CONCEPTS.read_text(encoding="utf-8")
    block = f"```mermaid\n{diagram()}\n```"
    # A function as replacement, so that backslashes in the diagram are not read as escapes.
    new_text, count = MERMAID_BLOCK.subn(lambda _: block, text)
    if count != 1:
        print(f"{CONCEPTS}: expected one ```mermaid block, found {count}", file=sys.stderr)
        return 1
    if new_text == text:
        print(f"{CONCEPTS}: the diagram is up to date")
    else:
        CONCEPTS.write_text(new_text, encoding="utf-8")
        print(f"{CONCEPTS}: diagram rewritten")
    return 0


if __name__ == "__main__":
    sys.exit(main())
