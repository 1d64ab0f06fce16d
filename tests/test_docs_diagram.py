"""The lifecycle diagram in docs/concepts.md is the one the declaration draws."""

from __future__ import annotations

import re
from pathlib import Path

from senderqueue._lifecycle import diagram

CONCEPTS = Path(__file__).resolve().parent.parent / "docs" / "concepts.md"
MERMAID_BLOCK = re.compile(r"^```mermaid\n(.*?)\n```$", re.DOTALL | re.MULTILINE)


def test_concepts_has_one_mermaid_block() -> None:
    assert len(MERMAID_BLOCK.findall(CONCEPTS.read_text(encoding="utf-8"))) == 1


def test_concepts_diagram_is_drawn_from_the_lifecycle() -> None:
    (drawn,) = MERMAID_BLOCK.findall(CONCEPTS.read_text(encoding="utf-8"))
    assert drawn == diagram(), (
        "docs/concepts.md has drifted from the lifecycle: run python docs/make_diagram.py"
    )
