"""The unrolled network FBSEM-Net (:mod:`~fbsemlib.models.fbsem`) and its training losses
(:mod:`~fbsemlib.models.losses`)."""

from fbsemlib.models.fbsem import FBSEMNet, ModelConfig, RegulariserCNN, UnrollContext
from fbsemlib.models.losses import relative_mse, target_weights, unrolled_loss

__all__ = ["FBSEMNet", "ModelConfig", "RegulariserCNN", "UnrollContext", "relative_mse", "target_weights",
           "unrolled_loss"]
