"""``fbsem train``."""

from fbsemlib.training.trainers import cmd_train  # noqa: F401  (body moves here)
