"""Reconstruction: the EM update and the fusion step shared by every method (and by
FBSEM-Net), MLEM / OSEM / MAP-EM and the priors."""

from fbsemlib.recon.em import em_fusion_step, em_update, fuse, fusion_objective
from fbsemlib.recon.algorithms import initial_image, map_em, mlem, osem, postfilter
from fbsemlib.recon.priors import BowsherPrior, QuadraticPrior

__all__ = ["em_update", "em_fusion_step", "fuse", "fusion_objective", "initial_image", "mlem", "osem", "map_em",
           "postfilter", "QuadraticPrior", "BowsherPrior"]
