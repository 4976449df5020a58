"""Reconstruction: the EM update and the fusion step shared by every method, MLEM / OSEM /
MAP-EM and the priors."""

from fbsemlib.recon.em import fuse
from fbsemlib.recon.algorithms import map_em, mlem, osem, postfilter
from fbsemlib.recon.priors import BowsherPrior, QuadraticPrior
