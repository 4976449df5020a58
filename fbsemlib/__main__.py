"""``python -m fbsemlib ...``: the ``fbsem`` command line."""

from .cli import main

raise SystemExit(main())
