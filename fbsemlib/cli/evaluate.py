"""``fbsem evaluate``."""

from fbsemlib.evaluation.evaluator import cmd_evaluate, cmd_reconstruct  # noqa: F401  (body moves here)
