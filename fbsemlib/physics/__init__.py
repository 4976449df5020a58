"""The physics of a PET scan: scanner and image geometry, the projector (torch-native Joseph
paths or parallelproj), the PSF, composite linear operators and the PET forward model."""

from fbsemlib.physics.geometry import (
    ImageGrid,
    ParallelBeamGeometry,
    RingScanner,
    SinogramGeometry,
    scanner_preset,
    sinogram_preset,
)
from fbsemlib.physics.operators import CompositeOperator, LinearOperator, adjointness_error
from fbsemlib.physics.projector import Projector, parallelproj_available
from fbsemlib.physics.psf import GaussianPSF
from fbsemlib.physics.forward_model import (
    PETForwardModel,
    attenuation_factors,
    normalisation_factors,
    poisson_log_likelihood,
)
from fbsemlib.physics.cache import projector_from_spec, projector_spec, shared_projector
