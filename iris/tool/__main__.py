"""``python -m iris.tool``: the same as the ``iris`` command."""

import sys

from .cli import main

sys.exit(main())
