"""The ``senderqueue`` command line; it needs the ``cli`` extra (click and rich).

Nothing in the core imports this package, and ``main`` looks for click and rich
before importing the commands, so a core-only install gets an install hint, not a traceback.
"""

from __future__ import annotations

import importlib
import sys

__all__ = ["main"]


def main() -> None:
    """Run the ``senderqueue`` command line."""
    for name in ("click", "rich"):
        try:
            importlib.import_module(name)
        except ImportError:
            print(
                f"senderqueue: the command line needs {name}: pip install 'senderqueue[cli]'", file=sys.stderr
            )
            raise SystemExit(1) from None
    from .commands import cli

    cli(prog_name="senderqueue")
