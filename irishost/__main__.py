"""``python -m irishost``: the ``irishost`` command, for when the script is not on PATH."""

from .cli import main

raise SystemExit(main())
