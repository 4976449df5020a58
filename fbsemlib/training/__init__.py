"""Training FBSEM-Net: end-to-end and sequential (module by module) trainers, their
configuration, checkpoints, model files, distributed data parallelism and memory accounting.

=====================  ==============================================================
``config``             :class:`TrainConfig` (the ``train:`` section), ``model:`` section
``loading``            data order of an epoch, batches of samples
``base``               what both trainers share: checkpoints, resume, logs, evaluation
``end_to_end``         :class:`EndToEndTrainer`
``sequential``         :class:`SequentialTrainer` and its ``stage_cache``
``optim``              optimiser, LR schedule, early stopping
``runlog``             CSV / JSON-lines / TensorBoard logs
``model_io``           model files, :func:`load_trained`
``checkpoint``         crash-safe files, RNG states
``distributed``        ``torchrun`` process groups, sharding, DDP
``memory``             peak memory of one training step (``fbsem memory``)
=====================  ==============================================================
"""

from fbsemlib.config import ConfigError
from fbsemlib.training.base import Trainer
from fbsemlib.training.config import (
    MODES,
    OPERATIONAL_FIELDS,
    TrainConfig,
    TrainingDiverged,
    TrainingError,
    parse_model_section,
)
from fbsemlib.training.end_to_end import EndToEndTrainer
from fbsemlib.training.loading import dataset_info, epoch_permutation
from fbsemlib.training.memory import MemoryProblem, MemoryReport, MemorySpec, measure_training_memory, memory_problem
from fbsemlib.training.model_io import CHECKPOINT_NAME, MODEL_NAME, load_trained
from fbsemlib.training.sequential import SequentialTrainer

__all__ = [
    "TrainConfig",
    "TrainingError",
    "TrainingDiverged",
    "MODES",
    "OPERATIONAL_FIELDS",
    "parse_model_section",
    "Trainer",
    "EndToEndTrainer",
    "SequentialTrainer",
    "make_trainer",
    "epoch_permutation",
    "dataset_info",
    "load_trained",
    "CHECKPOINT_NAME",
    "MODEL_NAME",
    "MemoryProblem",
    "MemoryReport",
    "MemorySpec",
    "measure_training_memory",
    "memory_problem",
]


def make_trainer(mode: str, *args, **kwargs) -> Trainer:
    """:class:`EndToEndTrainer` or :class:`SequentialTrainer` by name (``mode``)."""
    if mode == "end-to-end":
        return EndToEndTrainer(*args, **kwargs)
    if mode == "sequential":
        return SequentialTrainer(*args, **kwargs)
    raise ConfigError(f"unknown training mode {mode!r}; use 'end-to-end' or 'sequential'")
