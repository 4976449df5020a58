"""fbsemlib: FBSEM-Net and memory-efficient (sequential) training for unrolled PET
reconstruction, with a differentiable PET projector, the PET forward model, OSEM / MAP-EM
baselines and offline brain phantoms."""

from .geometry import (
    ImageGrid,
    ParallelBeamGeometry,
    RingScanner,
    SinogramGeometry,
    scanner_preset,
    sinogram_preset,
)
from .operators import CompositeOperator, LinearOperator, adjointness_error
from .projector import Projector, parallelproj_available
from .psf import GaussianPSF
from .forward_model import PETForwardModel, attenuation_factors, normalisation_factors, poisson_log_likelihood
from .fusion import fuse
from .recon import map_em, mlem, osem, postfilter
from .fbsem import FBSEMNet, ModelConfig, RegulariserCNN
from .training import EndToEndTrainer, SequentialTrainer, TrainConfig, load_trained
from . import metrics
from .priors import BowsherPrior, QuadraticPrior
from .phantoms import Phantom, PhantomConfig, make_subject, make_subjects, shepp_logan, simple_phantom, load_brainweb
from .config import ConfigError, load_experiment
from .datasets import DatasetError, PETDataset, open_dataset, validate_dataset
from .simulation import DataConfig, cached_dataset, simulate_dataset
from .baselines import BaselineConfig
from .evaluation import evaluate
from .memory import MemoryProblem, MemoryReport, MemorySpec, measure_training_memory, memory_problem

__version__ = "0.1.0"

__all__ = [
    "ImageGrid",
    "ParallelBeamGeometry",
    "RingScanner",
    "SinogramGeometry",
    "scanner_preset",
    "sinogram_preset",
    "LinearOperator",
    "CompositeOperator",
    "adjointness_error",
    "Projector",
    "parallelproj_available",
    "GaussianPSF",
    "PETForwardModel",
    "attenuation_factors",
    "normalisation_factors",
    "poisson_log_likelihood",
    "fuse",
    "mlem",
    "osem",
    "postfilter",
    "map_em",
    "FBSEMNet",
    "ModelConfig",
    "RegulariserCNN",
    "TrainConfig",
    "EndToEndTrainer",
    "SequentialTrainer",
    "load_trained",
    "metrics",
    "QuadraticPrior",
    "BowsherPrior",
    "Phantom",
    "PhantomConfig",
    "make_subject",
    "make_subjects",
    "shepp_logan",
    "simple_phantom",
    "load_brainweb",
    "ConfigError",
    "load_experiment",
    "DatasetError",
    "PETDataset",
    "open_dataset",
    "validate_dataset",
    "DataConfig",
    "cached_dataset",
    "simulate_dataset",
    "MemoryProblem",
    "MemoryReport",
    "MemorySpec",
    "measure_training_memory",
    "memory_problem",
    "BaselineConfig",
    "evaluate",
]
