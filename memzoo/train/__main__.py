"""``python -m memzoo.train``: the same command as ``memzoo-train`` (works from a checkout without installing)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
