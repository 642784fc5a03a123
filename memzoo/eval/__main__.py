"""``python -m memzoo.eval``: the ``memzoo-bench`` command from a checkout, without installing."""

import sys

from .cli import main

sys.exit(main())
