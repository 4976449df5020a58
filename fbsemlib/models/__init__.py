"""The unrolled network: FBSEM-Net and its losses."""

from fbsemlib.models.fbsem import FBSEMNet, ModelConfig, RegulariserCNN
