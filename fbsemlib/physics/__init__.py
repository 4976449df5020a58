"""The physics of a PET scan: scanner and image geometry, ordered subsets, the projector
(torch-native Joseph paths or parallelproj) and its one cache, the PSF, composite linear
operators and the PET forward model."""

from fbsemlib.physics.geometry import (
    ImageGrid,
    ParallelBeamGeometry,
    RingScanner,
    SinogramGeometry,
    scanner_preset,
    sinogram_preset,
)
from fbsemlib.physics.subsets import sinogram_subset, sinogram_subset_index, subset_slice, subset_views
from fbsemlib.physics.operators import CompositeOperator, LinearOperator, adjointness_error
from fbsemlib.physics.projector import Projector, parallelproj_available
from fbsemlib.physics.psf import GaussianPSF
from fbsemlib.physics.forward_model import (
    PETForwardModel,
    attenuation_factors,
    normalisation_factors,
    poisson_log_likelihood,
)
from fbsemlib.physics.cache import cached_count, clear, projector_from_spec, projector_spec, shared_projector

__all__ = [
    "ImageGrid", "ParallelBeamGeometry", "RingScanner", "SinogramGeometry", "scanner_preset", "sinogram_preset",
    "subset_slice", "subset_views", "sinogram_subset", "sinogram_subset_index",
    "LinearOperator", "CompositeOperator", "adjointness_error", "Projector", "parallelproj_available", "GaussianPSF",
    "PETForwardModel", "attenuation_factors", "normalisation_factors", "poisson_log_likelihood",
    "shared_projector", "projector_spec", "projector_from_spec", "clear", "cached_count",
]
