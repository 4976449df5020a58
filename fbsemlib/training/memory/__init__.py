"""Memory accounting: the peak memory of ONE training step of FBSEM-Net with K modules, in
three modes (end-to-end, gradient-checkpointed, sequential), on a synthetic problem.

:mod:`~fbsemlib.training.memory.spec` (the settings, :class:`MemorySpec`, from an
experiment's sections), :mod:`~fbsemlib.training.memory.problem` (the synthetic problem),
:mod:`~fbsemlib.training.memory.step` (the step of each mode),
:mod:`~fbsemlib.training.memory.tracker` (the saved-tensor count),
:mod:`~fbsemlib.training.memory.measure` (:func:`measure_training_memory`, what is
measured) and :mod:`~fbsemlib.training.memory.child` (the RSS of a fresh process).
``fbsem memory`` is :func:`fbsemlib.cli.memory.cmd_memory`.
"""

from fbsemlib.training.memory.child import available_bytes, proc_kib
from fbsemlib.training.memory.measure import MemoryReport, measure_training_memory, memory_device
from fbsemlib.training.memory.problem import MemoryProblem, memory_problem
from fbsemlib.training.memory.spec import MemorySpec, resolve_spec
from fbsemlib.training.memory.step import MODES
from fbsemlib.training.memory.tracker import SavedTensorTracker

__all__ = [
    "MODES",
    "MemorySpec",
    "MemoryProblem",
    "MemoryReport",
    "SavedTensorTracker",
    "memory_problem",
    "measure_training_memory",
    "memory_device",
    "resolve_spec",
    "proc_kib",
    "available_bytes",
]
