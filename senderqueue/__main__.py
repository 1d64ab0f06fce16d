"""``python -m senderqueue``: the command line."""

from __future__ import annotations

if __name__ == "__main__":
    from ._cli import main

    main()
