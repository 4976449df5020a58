"""The parallelproj backend of :class:`~fbsemlib.physics.projector.Projector`: the torch paths'
Joseph operator (:class:`~fbsemlib.physics._joseph.JosephSampler`), computed by parallelproj's
compiled kernels (C++/OpenMP, or CUDA when libparallelproj was built with it).

parallelproj 2.x: ``parallelproj_core.joseph3d_fwd(lor_start, lor_end, image, image_origin,
voxel_size, out)`` and ``joseph3d_back(lor_start, lor_end, image_out, image_origin, voxel_size,
values)`` read and write preallocated C-contiguous float32 arrays; torch tensors are handed over
as they are (DLPack: no copy, CPU or CUDA). The back-projection adds into its output, which is
zeroed first. parallelproj 1.x (``parallelproj.joseph3d_fwd`` / ``joseph3d_back`` returning new
arrays) is used when it is the only one installed.

Both implement Joseph's method (one bilinearly interpolated sample per plane of the principal
axis, times ``voxel / |cos|``), but three conventions differ, and the kernels alone disagree with
the torch paths by 0.3 % (forward) and 1 % (adjoint, relative L2) on the 2D mMR grid
``(1, 172, 172)`` with a random image. Neither side is wrong; this module makes the kernels
compute the torch operator (the choices below are ours, not parallelproj's or the paper's):

* **Field-of-view edge** (all of the 2D mMR difference). The kernels sample only where the LOR
  is inside the image box (the outer voxel faces); torch interpolates with zero padding, so a
  sample between the outer voxel centre and the first zero beyond it (half a voxel outside the
  box) still gets its linear share. The image is handed to the kernels with one zero voxel on
  each side (none along z for a one-slice image): inside that larger box the kernels' samples
  are exactly torch's.
* **Principal-axis ties** (LORs at about 45 degrees). torch takes the largest extent in voxels,
  decided in float64, x before y before z on a tie; the kernels take the largest squared cosine,
  in float32, preferring their axis 1, then 2, then 0. Near ties are decided by rounding, and
  the Joseph sums along x and along y differ by up to a few 1e-3. The endpoints of near-tie
  LORs are moved by a few float32 ulps so that the kernels pick torch's axis
  (:func:`_settle_ties`). With anisotropic voxels torch compares extents in voxels and the
  kernels in mm: a LOR nearly as steep axially as transaxially can still get another principal
  axis (not in any preset geometry: the torch segments path excludes such LORs).
* **One-slice images.** torch treats them as 2D (no z interpolation); the LORs are handed to
  the kernels through the slice centre, where their z interpolation has weight 1.

What remains is float32 rounding: about 1e-6 relative (L2) in both directions, the bound per
LOR and per voxel is tested in ``tests/test_parallelproj.py``.
"""

from __future__ import annotations

import functools
import importlib

import numpy as np
import torch

from fbsemlib.physics._joseph import JosephSampler

__all__ = ["ParallelprojJoseph", "parallelproj_available", "parallelproj_info", "parallelproj_lor_descriptor",
           "parallelproj_serves"]


@functools.lru_cache(maxsize=1)
def _kernels():
    """``(module, api)``: ``(parallelproj_core, 2)``, ``(parallelproj, 1)`` or ``(None, 0)``."""
    try:
        return importlib.import_module("parallelproj_core"), 2
    except Exception:
        pass
    try:
        pp = importlib.import_module("parallelproj")
    except Exception:
        return None, 0
    return (pp, 1) if hasattr(pp, "joseph3d_fwd") else (None, 0)


def parallelproj_available() -> bool:
    """True when parallelproj's Joseph kernels can be imported (``parallelproj_core`` of
    parallelproj 2.x, or the 1.x ``parallelproj.joseph3d_fwd``)."""
    return _kernels()[1] > 0


def parallelproj_serves(device: str | torch.device) -> bool:
    """True when parallelproj's kernels work on ``device``'s tensors where they are: CPU kernels
    for CPU tensors, CUDA kernels for CUDA tensors (a CUDA build copies CPU tensors to the GPU)."""
    module, api = _kernels()
    if api == 0:
        return False
    cuda = bool(module.cuda_enabled) if api == 2 else bool(getattr(module, "cuda_present", False))
    return cuda == (torch.device(device).type == "cuda")


def parallelproj_info() -> dict:
    """``{"parallelproj_version", "parallelproj_core_version", "parallelproj_cuda"}``: the versions
    of the Python package and of the kernels (``None`` when not installed) and whether the kernels
    are CUDA kernels (``None`` when there are none)."""
    module, api = _kernels()
    info = {"parallelproj_version": None, "parallelproj_core_version": None, "parallelproj_cuda": None}
    try:
        info["parallelproj_version"] = str(getattr(importlib.import_module("parallelproj"), "__version__", "unknown"))
    except Exception:
        pass
    if api == 2:
        info["parallelproj_core_version"] = str(module.__version__)
        info["parallelproj_cuda"] = bool(module.cuda_enabled)
    elif api == 1:
        info["parallelproj_cuda"] = bool(getattr(module, "cuda_present", False))
    return info


def parallelproj_lor_descriptor(sinogram, xp=np, dev: str = "cpu"):
    """parallelproj's ``RegularPolygonPETLORDescriptor`` of a ring
    :class:`~fbsemlib.physics.geometry.SinogramGeometry`: the same LOR endpoints bin for bin
    (up to parallelproj's float32 arithmetic), layout ``(planes, views, radial)``.

    fbsemlib's bin ``(view v, radial r)`` of ``n`` crystals per ring joins crystals
    ``floor(j / 2) - v`` and ``-1 - ceil(j / 2) - v`` (``j = r + radial_trim``). parallelproj
    (2.0.1) anchors view 0's central bin on crystals ``(0, n / 2)``; its ``view_direction=MINUS``
    with ``view0_shift = c // 2`` and the ``START_FIRST`` zig-zag when ``c = n / 2 - 1`` is odd,
    ``END_FIRST`` when it is even, gives fbsemlib's pairs. Needs the parallelproj package."""
    from parallelproj import pet_lors as L
    from parallelproj.pet_scanners import RegularPolygonPETScannerGeometry

    sc = sinogram.scanner
    scanner = RegularPolygonPETScannerGeometry(
        xp, dev, radius=sc.radius_mm, num_sides=sc.num_sides, symmetry_axis=2,
        ring_positions=xp.asarray(sc.ring_positions_mm, dtype=xp.float32, device=dev),
        num_lor_endpoints_per_side=sc.crystals_per_side, lor_spacing=sc.crystal_spacing_mm)
    c = sc.num_crystals_per_ring // 2 - 1
    return L.RegularPolygonPETLORDescriptor(
        scanner, L.Michelogram(sc.num_rings, sinogram.max_ring_difference), radial_trim=sinogram.radial_trim,
        sinogram_order=L.SinogramSpatialAxisOrder.PVR, view_direction=L.ViewDirection.MINUS, view0_shift=c // 2,
        zig_zag_order=L.SinogramZigZagOrder.START_FIRST if c % 2 else L.SinogramZigZagOrder.END_FIRST)


def _float32(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a C-contiguous float32 tensor outside autograd (a copy only when needed)."""
    return t.detach().to(torch.float32).contiguous()


#: a near tie of two axes' extents (relative, squared) that rounding may decide either way
_TIE_BAND = 1e-4


def _settle_ties(start: np.ndarray, end: np.ndarray, want: np.ndarray) -> int:
    """Move, in place, the endpoints of the LORs whose principal axis is a near tie so that
    parallelproj's float32 rule (largest squared extent) picks ``want`` (the torch sampler's
    choice) with a margin no rounding can overturn; returns how many LORs moved.

    ``start``, ``end``: float32 ``(L, 3)``, ``want``: ``(L,)``, in the grid's axis order (z, y, x).
    The kernel compares ``fl(d_k^2) / fl(sum)``: a margin of 4 ulps between the squared extents
    survives those roundings. A rival axis within ``_TIE_BAND`` of the wanted one has its extent
    shortened about the LOR's midpoint by a few ulps (a few 1e-7 relative: the float32 precision
    of the endpoints themselves). Rivals outside the band (only possible between z and a
    transaxial axis of anisotropic voxels: torch compares extents in voxels, parallelproj in mm)
    are left as they are."""
    eps = float(np.finfo(np.float32).eps)
    rows = np.arange(len(start))
    moved = np.zeros(len(start), dtype=bool)
    for m in (2, 4, 8, 16, 32, 64, None):
        d = (end - start).astype(np.float64)  # the kernel's float32 differences, exactly
        sq = d * d
        w = sq[rows, want][:, None]
        rival = (sq * (1 + 4 * eps) >= w) & (sq <= w * (1 + _TIE_BAND))
        rival[rows, want] = False
        i, k = np.nonzero(rival)
        if i.size == 0:
            break
        if m is None:
            raise RuntimeError(f"could not settle the principal axis of {np.unique(i).size} LORs for parallelproj")
        mid = 0.5 * (start[i, k].astype(np.float64) + end[i, k])
        start[i, k] = (mid - 0.5 * d[i, k] * (1 - m * eps)).astype(np.float32)
        end[i, k] = (mid + 0.5 * d[i, k] * (1 - m * eps)).astype(np.float32)
        moved[i] = True
    return int(moved.sum())


class ParallelprojJoseph:
    """Joseph forward / adjoint of a :class:`~fbsemlib.physics._joseph.JosephSampler`'s LORs
    and grid, computed by parallelproj's kernels: the same operator as the torch paths.

    Images are ``(N, Z, Y, X)`` and projections ``(N, num_lors)``; computed in float32 (the
    kernels' type) and returned in the input's dtype. CUDA tensors need CUDA kernels; CPU
    tensors are best served by the CPU kernels (a CUDA build copies host arrays to the GPU).
    """

    def __init__(self, sampler: JosephSampler):
        module, api = _kernels()
        if api == 0:
            raise ImportError("parallelproj is not installed: `make parallelproj` builds it into .venv "
                              "(or conda install -c conda-forge parallelproj)")
        self.module, self.api, self.grid = module, api, sampler.grid
        # the kernels get the grid's (z, y, x) axes as their axes 0, 1, 2, and the image with one
        # zero voxel on each side (none along z for a one-slice image: its LORs lie in the slice)
        g = sampler.grid
        self.pad = (1 if g.shape[0] > 1 else 0, 1, 1)
        self.padded_shape = tuple(n + 2 * p for n, p in zip(g.shape, self.pad))
        self._inner = (slice(None),) + tuple(slice(p, p + n) for p, n in zip(self.pad, g.shape))
        self._origin = tuple(o - p * v for o, p, v in zip(g.origin_mm, self.pad, g.voxel_size_mm))
        # endpoints in mm from the sampler's index coordinates
        o, v = np.asarray(g.origin_mm), np.asarray(g.voxel_size_mm)
        c0, d = sampler.c0.numpy(), sampler.d.numpy()
        if g.shape[0] == 1:  # a one-slice image is a 2D image: its LORs run through the slice centre
            c0, d = c0.copy(), d.copy()
            c0[:, 0] = d[:, 0] = 0.0
        start = np.ascontiguousarray(o + c0 * v, dtype=np.float32)
        end = np.ascontiguousarray(o + (c0 + d) * v, dtype=np.float32)
        want = np.empty(sampler.num_lors, dtype=np.int64)
        for axis, ids in sampler.groups:
            want[ids.numpy()] = axis
        #: LORs whose endpoints were moved by a few ulps to settle a principal-axis tie
        self.settled_ties = _settle_ties(start, end, want)
        self._start, self._end = torch.from_numpy(start), torch.from_numpy(end)
        self.num_lors = sampler.num_lors
        self._on: dict = {}

    def _geometry(self, device: torch.device):
        """Endpoints, origin and voxel size on ``device`` (kept for the device last used)."""
        key = str(device)
        if key not in self._on:
            if device.type == "cuda" and self.api == 2 and not self.module.cuda_enabled:
                raise ValueError("CUDA tensors need parallelproj built with CUDA (these kernels are CPU only)")
            f32 = dict(dtype=torch.float32, device=device)
            self._on = {key: (self._start.to(device), self._end.to(device),
                              torch.tensor(self._origin, **f32), torch.tensor(self.grid.voxel_size_mm, **f32))}
        return self._on[key]

    @staticmethod
    def _device_id(device: torch.device) -> int:
        return device.index if device.type == "cuda" and device.index is not None else 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``(N, Z, Y, X)`` -> ``(N, num_lors)``."""
        xs, xe, origin, vox = self._geometry(x.device)
        img = torch.zeros((x.shape[0],) + self.padded_shape, dtype=torch.float32, device=x.device)
        img[self._inner] = x.detach()  # the one copy: padded, float32, contiguous
        if self.api == 1:
            out = torch.stack([self.module.joseph3d_fwd(xs, xe, im, origin, vox) for im in img])
        else:
            out = torch.empty((img.shape[0], self.num_lors), dtype=torch.float32, device=x.device)
            dev = self._device_id(x.device)
            for im, o in zip(img, out):
                self.module.joseph3d_fwd(xs, xe, im, origin, vox, o, dev)
        return out.to(x.dtype)

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        """``y``: ``(N, num_lors)`` -> ``(N, Z, Y, X)``."""
        xs, xe, origin, vox = self._geometry(y.device)
        vals = _float32(y).reshape(y.shape[0], self.num_lors)
        if self.api == 1:
            img = torch.stack([self.module.joseph3d_back(xs, xe, self.padded_shape, origin, vox, v) for v in vals])
        else:
            img = torch.zeros((vals.shape[0],) + self.padded_shape, dtype=torch.float32, device=y.device)  # the kernel adds
            dev = self._device_id(y.device)
            for v, im in zip(vals, img):
                self.module.joseph3d_back(xs, xe, im, origin, vox, v, dev)
        return img[self._inner].to(y.dtype)
