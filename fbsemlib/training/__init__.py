"""Training FBSEM-Net: end-to-end and sequential (module by module) trainers, their
configuration, checkpoints, model files, distributed data parallelism and memory accounting."""

from fbsemlib.training.trainers import EndToEndTrainer, SequentialTrainer, TrainConfig, load_trained
from fbsemlib.training.memory import MemoryProblem, MemoryReport, MemorySpec, measure_training_memory, memory_problem
