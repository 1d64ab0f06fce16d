"""Every example in README.md and docs/*.md runs as a test (Sybil).

* A ```python block runs as code; one that starts with ``>>>`` runs as a doctest.
* ``<!-- skip: next "reason" -->`` before a block skips it (for snippets that need pytest itself).
* Any other fence (```console, ```bash, ```toml, ```mermaid) is shown, not run.

The blocks of one file share a namespace and run in order, so the docs run in a
pytest of their own, without xdist (tox.ini runs ``pytest README.md docs``).
"""

from __future__ import annotations

from doctest import ELLIPSIS, NORMALIZE_WHITESPACE

from sybil import Sybil
from sybil.parsers.markdown import PythonCodeBlockParser, SkipParser

pytest_collect_file = Sybil(
    parsers=[
        PythonCodeBlockParser(doctest_optionflags=ELLIPSIS | NORMALIZE_WHITESPACE),
        SkipParser(),
    ],
    patterns=["README.md", "docs/*.md"],
    # Patterns match from the right; keep the backends' own READMEs and docs to their own conftest.
    excludes=["*/README.md", "*/docs/*.md"],
).pytest()
