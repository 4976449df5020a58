"""``python -m fbsemlib ...``: the ``fbsem`` command line."""

from fbsemlib.cli import main

raise SystemExit(main())
