"""``fbsem simulate``."""

from fbsemlib.data.simulate import cmd_simulate  # noqa: F401  (body moves here)
