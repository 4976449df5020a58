"""Offline brain phantoms for PET/MR: random subjects from the ICBM152 2009 template
(:mod:`~fbsemlib.data.phantoms.template`), a loader for BrainWeb files already on disk
(:mod:`~fbsemlib.data.phantoms.brainweb`), and simple test objects
(:mod:`~fbsemlib.data.phantoms.simple`); their parameters are
:class:`~fbsemlib.data.phantoms.config.PhantomConfig`, the result a
:class:`~fbsemlib.data.phantoms.build.Phantom`.

Everything here works without network access. Brain subjects are built from the ICBM152
2009 template shipped inside the ``nilearn`` wheel (T1, grey- and white-matter probability
maps, 1 mm). The template is skull-stripped, so a CSF layer, a skull, a soft-tissue layer
and skin are added as shells around the (smoothed) brain. Each subject is a seeded random
draw of a smooth non-rigid deformation, a rotation, an isotropic scaling, grey/white
contrast, a global activity scale and hot/cold lesions placed in white matter, drawn
independently in PET and MR (so PET-only and MR-only lesions exist, as in the FBSEM-Net
data).

Conventions
-----------
* Volumes are ``torch.float32`` tensors ``(nz, ny, nx)`` on an :class:`~fbsemlib.physics.geometry.ImageGrid`
  (world mm, z axial). A 2D subject (``nz == 1``) is one axial slice.
* Head orientation on the grid: +x is the subject's right (neurological view), +y is
  posterior (the nose points to row 0, i.e. up with ``imshow``), +z is superior.
* The brain (bounding box of the brain mask) is centred on the grid centre; for a 2D grid
  the grid plane passes through the source world (MNI) height ``slice_z_mm``.
* Units: activity in arbitrary units (GM 96, WM 32 before the global scale, as in the
  original FBSEM-Net data), ``mu_map`` in 1/mm, ``mr`` in arbitrary T1 units (WM 154,
  GM 106), lengths in mm.
* Tissue classes (:data:`TISSUES`): ``gm``, ``wm``, ``csf``, ``bone`` (skull),
  ``soft`` (fat, muscle, other soft tissue), ``skin``; the remainder is air.
  ``Phantom.tissues`` holds their partial-volume fractions on the grid (they sum to <= 1).

Lesion masks
------------
``Phantom.lesion_masks_pet`` and ``Phantom.lesion_masks_mr`` are boolean tensors
``(L, nz, ny, nx)`` with ONE SHARED INDEX: entry ``i`` describes ``lesion_info[i]``. The
PET mask of an MR-only lesion (and vice versa) is all False. Lesions are spheres (discs in
the plane of a 2D grid) made of the voxels whose centre lies within the radius; every mask
voxel is inside ``brain_mask``. Lesion intensity replaces the tissue value:
``contrast * WM value`` (hot: contrast > 1, cold: contrast < 1).
"""

from fbsemlib.data.phantoms.brainweb import BRAINWEB_LABELS, load_brainweb
from fbsemlib.data.phantoms.build import Phantom
from fbsemlib.data.phantoms.config import TISSUES, PhantomConfig
from fbsemlib.data.phantoms.simple import shepp_logan, simple_phantom
from fbsemlib.data.phantoms.template import make_subject, make_subjects

__all__ = [
    "TISSUES",
    "Phantom",
    "PhantomConfig",
    "make_subject",
    "make_subjects",
    "shepp_logan",
    "simple_phantom",
    "load_brainweb",
    "BRAINWEB_LABELS",
]
