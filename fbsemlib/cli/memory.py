"""``fbsem memory``."""

from fbsemlib.training.memory import cmd_memory  # noqa: F401  (body moves here)
