"""Image-quality metrics for PET reconstructions (torch-based).

Conventions (all functions):

* Images are ``(..., Z, Y, X)``; a metric reduces over the last ``image_dims`` dimensions
  (default 3; all of them when the tensor has fewer) and is **batched over the leading
  dimensions** (which broadcast between the arguments, e.g. a shared reference ``(Z, Y, X)``
  for a batch ``(B, C, Z, Y, X)``). The image dimensions of all arguments must agree.
* The result is a Python ``float`` when there are no leading dimensions, otherwise a
  float64 tensor of the leading shape (:class:`BiasStd` fields likewise).
* Masks are boolean (or 0/1) tensors broadcastable to the images, e.g. ``(Z, Y, X)`` or
  ``(B, 1, Z, Y, X)``; ``None`` means every voxel. An empty mask (for any batch item), a
  shape mismatch or NaN/Inf values raise ``ValueError`` naming the argument.
* Computations run in float64 on the inputs' device. NumPy arrays are accepted.
* **Units**: :func:`nrmse`, :func:`background_variability` and :func:`bias_std` return
  **per cent** by default (``percent=False`` for fractions), as the FBSEM papers report
  them; :func:`contrast_recovery` is a fraction (1 = full recovery); :func:`psnr` is in dB;
  :func:`ssim` is in [-1, 1].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from fbsemlib.provenance import is_int

__all__ = [
    "nrmse",
    "psnr",
    "ssim",
    "contrast_recovery",
    "background_variability",
    "bias_std",
    "BiasStd",
    "gaussian_filter_reflect",
]


# -- helpers ------------------------------------------------------------------------------
def _tensor(x, name: str) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or numpy array, got {type(x).__name__}")
    if x.dtype == torch.bool or x.is_complex():
        raise TypeError(f"{name} must be a real numeric tensor, got dtype {x.dtype}")
    x = x.to(torch.float64)
    if x.ndim == 0:
        raise ValueError(f"{name} must be an image, got a scalar")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or Inf values")
    return x


def _ndims(x: torch.Tensor, image_dims: int) -> int:
    if not is_int(image_dims) or image_dims < 1:
        raise ValueError(f"image_dims must be a positive integer, got {image_dims!r}")
    return min(image_dims, x.ndim)


def _broadcast(tensors: dict, nd: int) -> tuple[int, ...]:
    """Check the image dims agree and the leading dims broadcast; return the full shape."""
    items = list(tensors.items())
    (n0, t0) = items[0]
    for n, t in items[1:]:
        if t.ndim < nd or tuple(t.shape[t.ndim - nd:]) != tuple(t0.shape[t0.ndim - nd:]):
            raise ValueError(
                f"shape mismatch: {n} has shape {tuple(t.shape)} but {n0} has shape {tuple(t0.shape)} "
                f"(the last {nd} image dimensions must agree)"
            )
    try:
        return tuple(torch.broadcast_shapes(*[t.shape for _, t in items]))
    except RuntimeError:
        shapes = ", ".join(f"{n} {tuple(t.shape)}" for n, t in items)
        raise ValueError(f"shape mismatch: the leading (batch) dimensions do not broadcast: {shapes}") from None


def _mask(mask, shape: tuple[int, ...], nd: int, name: str = "mask", device=None) -> torch.Tensor:
    """Boolean mask broadcast to ``shape``; raise if it is empty for any batch item."""
    if mask is None:
        return torch.ones(shape, dtype=torch.bool, device=device)
    if isinstance(mask, np.ndarray):
        mask = torch.from_numpy(mask)
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a boolean torch.Tensor or numpy array, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError(f"{name} must be boolean or contain only 0 and 1")
        mask = mask != 0
    if device is not None:
        mask = mask.to(device)
    try:
        m = torch.broadcast_to(mask, shape)
    except RuntimeError:
        raise ValueError(f"shape mismatch: {name} of shape {tuple(mask.shape)} does not broadcast to {shape}") from None
    if not bool(m.flatten(-nd).any(-1).all()):
        raise ValueError(f"{name} is empty (selects no voxel{' for some batch item' if len(shape) > nd else ''})")
    return m


def _dims(nd: int) -> tuple[int, ...]:
    return tuple(range(-nd, 0))


def _mean(x: torch.Tensor, m: torch.Tensor, nd: int) -> torch.Tensor:
    return torch.where(m, x, 0).sum(_dims(nd)) / m.sum(_dims(nd))


def _out(t: torch.Tensor):
    return float(t) if t.ndim == 0 else t


def _data_range(ref: torch.Tensor, m: torch.Tensor, nd: int, data_range, lead) -> torch.Tensor:
    if data_range is None:
        inf = torch.tensor(float("inf"), dtype=ref.dtype, device=ref.device)
        ref = torch.broadcast_to(ref, m.shape)
        hi = torch.where(m, ref, -inf).amax(_dims(nd))
        lo = torch.where(m, ref, inf).amin(_dims(nd))
        dr = hi - lo
    else:
        dr = torch.as_tensor(data_range, dtype=torch.float64, device=ref.device)
        if not bool(torch.isfinite(dr).all()):
            raise ValueError("data_range contains NaN or Inf values")
    if not bool((dr > 0).all()):
        raise ValueError("data_range must be positive (the reference is constant inside the mask?)")
    try:
        return torch.broadcast_to(dr, lead)
    except RuntimeError:
        raise ValueError(f"data_range of shape {tuple(dr.shape)} does not match the batch shape {tuple(lead)}") from None


# -- error metrics ------------------------------------------------------------------------
def nrmse(x, ref, mask=None, *, percent: bool = True, image_dims: int = 3):
    """Normalised root-mean-square error ``||x - ref|| / ||ref||`` over the mask (per cent
    by default, as reported in the FBSEM papers; a fraction with ``percent=False``).
    Raises ``ValueError`` if ``ref`` is zero inside the mask."""
    x, ref = _tensor(x, "x"), _tensor(ref, "ref")
    nd = _ndims(x, image_dims)
    shape = _broadcast({"x": x, "ref": ref}, nd)
    m = _mask(mask, shape, nd, device=x.device)
    num = torch.where(m, x - ref, 0).pow(2).sum(_dims(nd)).sqrt()
    den = torch.where(m, torch.broadcast_to(ref, shape), 0).pow(2).sum(_dims(nd)).sqrt()
    if not bool((den > 0).all()):
        raise ValueError("ref is zero inside the mask: NRMSE is undefined")
    return _out(num / den * (100.0 if percent else 1.0))


def psnr(x, ref, mask=None, data_range=None, *, image_dims: int = 3):
    """Peak signal-to-noise ratio ``10 log10(data_range^2 / MSE)`` in dB, the MSE taken
    over the mask. ``data_range`` defaults to ``max(ref) - min(ref)`` inside the mask (per
    batch item); a scalar or a tensor of the leading shape may be given. ``inf`` when
    ``x == ref`` in the mask."""
    x, ref = _tensor(x, "x"), _tensor(ref, "ref")
    nd = _ndims(x, image_dims)
    shape = _broadcast({"x": x, "ref": ref}, nd)
    m = _mask(mask, shape, nd, device=x.device)
    mse = _mean((x - ref).pow(2).expand(shape), m, nd)
    dr = _data_range(ref, m, nd, data_range, shape[: len(shape) - nd])
    return _out(10 * torch.log10(dr**2 / mse))


# -- SSIM ---------------------------------------------------------------------------------
def _reflect_index(n: int, r: int, device) -> torch.Tensor:
    """Indices of a length ``n`` axis padded by ``r`` with scipy's 'reflect' (d c b a | a b c d)."""
    i = torch.arange(-r, n + r, device=device) % (2 * n)
    return torch.where(i >= n, 2 * n - 1 - i, i)


def gaussian_filter_reflect(x: torch.Tensor, sigma: Sequence[float], truncate: float = 4.0) -> torch.Tensor:
    """Separable Gaussian filter of the last ``len(sigma)`` dimensions with
    ``scipy.ndimage.gaussian_filter``'s conventions (``mode='reflect'``, radius
    ``int(truncate * sigma + 0.5)``); a zero sigma leaves that axis alone."""
    nd = len(sigma)
    for ax, s in zip(range(-nd, 0), sigma):
        if s <= 0:
            continue
        r = int(truncate * float(s) + 0.5)
        t = torch.arange(-r, r + 1, dtype=x.dtype, device=x.device)
        k = torch.exp(-0.5 * (t / float(s)) ** 2)
        k = (k / k.sum()).reshape(1, 1, -1)
        n = x.shape[ax]
        xp = x.movedim(ax, -1).index_select(-1, _reflect_index(n, r, x.device))
        shp = xp.shape
        y = F.conv1d(xp.reshape(-1, 1, shp[-1]), k).reshape(shp[:-1] + (n,))
        x = y.movedim(-1, ax)
    return x


def ssim(
    x,
    ref,
    mask=None,
    data_range=None,
    *,
    spatial_dims: int | None = None,
    sigma: float = 1.5,
    truncate: float = 3.5,
    k1: float = 0.01,
    k2: float = 0.03,
    return_map: bool = False,
):
    """Structural similarity (Wang et al. 2004) with a Gaussian window, averaged over the
    mask.

    Images are ``(..., Z, Y, X)`` (a plain ``(Y, X)`` is one slice). ``spatial_dims=2``
    computes SSIM per slice (window in-plane only), ``3`` uses a 3D window; ``None``
    chooses 2 for ``Z == 1`` and 3 otherwise. The window is an isotropic Gaussian of
    ``sigma`` voxels truncated at ``truncate`` sigma (radius 5 for the defaults),
    with population (not sample) covariances and symmetric ('reflect') borders,
    ``C1 = (k1 L)^2``, ``C2 = (k2 L)^2``; ``L = data_range`` defaults to ``max(ref) -
    min(ref)`` inside the mask. This is ``skimage.metrics.structural_similarity(...,
    gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=L)``,
    except that the mean runs over the mask (default: every voxel) whereas skimage
    crops a border of the window radius. ``return_map=True`` also returns the SSIM map
    (shape of the broadcast images)."""
    x, ref = _tensor(x, "x"), _tensor(ref, "ref")
    if x.ndim == 2 and ref.ndim == 2:
        x, ref = x[None], ref[None]
        if mask is not None:
            mask = torch.as_tensor(mask)[None]
        squeeze = True
    else:
        squeeze = False
    if x.ndim < 3 or ref.ndim < 3:
        raise ValueError(f"x and ref must be images (..., Z, Y, X), got shapes {tuple(x.shape)} and {tuple(ref.shape)}")
    shape = _broadcast({"x": x, "ref": ref}, 3)
    m = _mask(mask, shape, 3, device=x.device)
    if spatial_dims is None:
        spatial_dims = 2 if shape[-3] == 1 else 3
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2, 3 or None, got {spatial_dims!r}")
    if not sigma > 0:
        raise ValueError(f"sigma must be positive, got {sigma!r}")
    lead = shape[:-3]
    L = _data_range(ref, m, 3, data_range, lead)
    L = L.reshape(L.shape + (1, 1, 1))
    c1, c2 = (k1 * L) ** 2, (k2 * L) ** 2
    sig = (sigma if spatial_dims == 3 else 0.0, sigma, sigma)
    a, b = x.expand(shape), ref.expand(shape)
    filt = lambda t: gaussian_filter_reflect(t, sig, truncate)  # noqa: E731
    ua, ub = filt(a), filt(b)
    vaa = filt(a * a) - ua * ua
    vbb = filt(b * b) - ub * ub
    vab = filt(a * b) - ua * ub
    smap = ((2 * ua * ub + c1) * (2 * vab + c2)) / ((ua * ua + ub * ub + c1) * (vaa + vbb + c2))
    val = _out(_mean(smap, m, 3))
    if return_map:
        return val, (smap[..., 0, :, :] if squeeze else smap)
    return val


# -- lesion / ROI metrics -----------------------------------------------------------------
def contrast_recovery(x, lesion_mask, background_mask, true_lesion_value, true_background_value, *, image_dims: int = 3):
    """Contrast recovery coefficient

        CR = (mean_lesion / mean_background - 1) / (true_lesion / true_background - 1),

    for hot (true ratio > 1) and cold (ratio < 1) lesions alike: 1 for the true image,
    0 when the lesion region has the background mean. A fraction (not per cent). True
    values may be scalars or tensors of the leading (batch) shape."""
    x = _tensor(x, "x")
    nd = _ndims(x, image_dims)
    shape = tuple(x.shape)
    ml = _mask(lesion_mask, shape, nd, "lesion_mask", x.device)
    mb = _mask(background_mask, shape, nd, "background_mask", x.device)
    tl = torch.as_tensor(true_lesion_value, dtype=torch.float64, device=x.device)
    tb = torch.as_tensor(true_background_value, dtype=torch.float64, device=x.device)
    if not bool(torch.isfinite(tl).all()):
        raise ValueError("true_lesion_value contains NaN or Inf values")
    if not bool(torch.isfinite(tb).all()) or not bool((tb > 0).all()):
        raise ValueError(f"true_background_value must be positive and finite, got {true_background_value!r}")
    true_ratio = tl / tb
    if bool((true_ratio == 1).any()):
        raise ValueError("true_lesion_value equals true_background_value: no contrast to recover")
    mean_b = _mean(x, mb, nd)
    if not bool((mean_b != 0).all()):
        raise ValueError("the background mean of x is zero: CR is undefined")
    return _out((_mean(x, ml, nd) / mean_b - 1) / (true_ratio - 1))


def background_variability(x, rois, *, percent: bool = True, image_dims: int = 3):
    """Background variability (coefficient of variation, per cent by default).

    * ``rois`` a single mask: the voxel-wise ``std / mean`` inside it (a uniform region).
    * ``rois`` a list / tuple of masks (>= 2 ROIs, e.g. NEMA-style background spheres):
      ``std_r(m_r) / mean_r(m_r)`` over the ROI means ``m_r``.

    Standard deviations use the sample (``N - 1``) normalisation."""
    x = _tensor(x, "x")
    nd = _ndims(x, image_dims)
    shape = tuple(x.shape)
    scale = 100.0 if percent else 1.0
    if isinstance(rois, (list, tuple)):
        if len(rois) < 2:
            raise ValueError(f"rois: need at least 2 ROIs for the across-ROI variability, got {len(rois)}")
        means = torch.stack([_mean(x, _mask(r, shape, nd, f"rois[{i}]", x.device), nd) for i, r in enumerate(rois)])
        mu, sd = means.mean(0), means.std(0, correction=1)
    else:
        m = _mask(rois, shape, nd, "rois", x.device)
        n = m.sum(_dims(nd))
        if not bool((n >= 2).all()):
            raise ValueError("rois: the mask must contain at least 2 voxels")
        mu = _mean(x, m, nd)
        sd = (torch.where(m, x - mu.reshape(mu.shape + (1,) * nd), 0).pow(2).sum(_dims(nd)) / (n - 1)).sqrt()
    if not bool((mu != 0).all()):
        raise ValueError("the mean of x in the background ROIs is zero: BV is undefined")
    return _out(sd / mu * scale)


@dataclass
class BiasStd:
    """Result of :func:`bias_std`. Regional values are relative to ``ref_mean`` (the mean
    of the reference in the mask), in per cent (or fractions with ``percent=False``):

    * ``bias``: signed regional bias ``mean_mask(xbar - ref) / ref_mean``;
    * ``rms_bias``: voxel-level bias ``sqrt(mean_mask((xbar - ref)^2)) / ref_mean``;
    * ``std``: voxel-level noise ``sqrt(mean_mask(std_map^2)) / ref_mean``;
    * ``roi_std``: the standard deviation over realisations of the regional mean
      ``mean_mask(x_r)``, ``/ ref_mean``;
    * ``bias_map`` / ``std_map``: per-voxel ``xbar - ref`` and the standard deviation over
      realisations, relative to ``ref_mean`` (same units), shape of one realisation;
    * ``mean_image``: ``xbar`` (absolute units); ``ref_mean``: absolute.

    Standard deviations use the sample (``R - 1``) normalisation."""

    bias: float | torch.Tensor
    rms_bias: float | torch.Tensor
    std: float | torch.Tensor
    roi_std: float | torch.Tensor
    bias_map: torch.Tensor
    std_map: torch.Tensor
    mean_image: torch.Tensor
    ref_mean: float | torch.Tensor


def bias_std(realisations, ref, mask=None, *, percent: bool = True, image_dims: int = 3) -> BiasStd:
    """Bias and standard deviation over noise realisations ``(R, ..., Z, Y, X)`` (R >= 2)
    with respect to ``ref`` (broadcastable to one realisation), in a mask; see
    :class:`BiasStd` for the definitions (per cent of the regional reference mean by
    default)."""
    xs = _tensor(realisations, "realisations")
    ref = _tensor(ref, "ref")
    if xs.ndim < 2 or xs.shape[0] < 2:
        raise ValueError(f"realisations must have shape (R, ...) with R >= 2, got {tuple(xs.shape)}")
    nd = _ndims(xs[0], image_dims)
    shape = _broadcast({"realisations[0]": xs[0], "ref": ref}, nd)
    m = _mask(mask, shape, nd, device=xs.device)
    ref_mean = _mean(torch.broadcast_to(ref, shape), m, nd)
    if not bool((ref_mean != 0).all()):
        raise ValueError("ref has zero mean inside the mask: relative bias/std are undefined")
    scale = 100.0 if percent else 1.0
    rm = ref_mean.reshape(ref_mean.shape + (1,) * nd)
    xbar = xs.mean(0).expand(shape)
    sd = xs.std(0, correction=1).expand(shape)
    bmap = xbar - ref
    roi_means = torch.stack([_mean(xi.expand(shape), m, nd) for xi in xs])
    return BiasStd(
        bias=_out(_mean(bmap, m, nd) / ref_mean * scale),
        rms_bias=_out(_mean(bmap.pow(2), m, nd).sqrt() / ref_mean * scale),
        std=_out(_mean(sd.pow(2), m, nd).sqrt() / ref_mean * scale),
        roi_std=_out(roi_means.std(0, correction=1) / ref_mean * scale),
        bias_map=bmap / rm * scale,
        std_map=sd / rm * scale,
        mean_image=xbar,
        ref_mean=_out(ref_mean),
    )
