"""``python -m milan`` is the ``milan`` CLI."""

import sys

from milan.cli import main

sys.exit(main())
