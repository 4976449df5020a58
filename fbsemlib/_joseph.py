"""Joseph's method in torch: sample positions, weights and the two execution paths.

For a line of response from ``p0`` to ``p1`` (mm) and a voxel grid, let ``a`` be the
transaxial axis (x or y) along which the line advances fastest in voxel units. The
line integral is approximated by one sample per voxel plane ``k`` of that axis,

    (A x)_i = L_i * sum_k  interp(x, p(t_k)),   L_i = d_a / |cos(angle to axis a)|,

where ``p(t_k)`` is the crossing of plane ``k`` and ``interp`` is linear (2D) or
bilinear (3D, across the other transaxial axis and z) interpolation with zero
padding. Samples with ``t_k`` outside [0, 1] (beyond the endpoints) are dropped.

Two ways to apply it:

* ``matrix``: the weights of every (LOR, voxel) pair are stored once as a CSR sparse
  matrix (and its transpose); forward and adjoint are sparse-dense products. Fastest
  on CPU and GPU, used when the matrix fits ``matrix_budget_bytes``.
* ``on-the-fly``: samples are generated per chunk of LORs and evaluated with
  ``grid_sample`` (forward) and its exact adjoint ``grid_sampler_*_backward``;
  memory is bounded by ``max_chunk_samples`` whatever the geometry size.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
import torch.nn.functional as F

from .geometry import ImageGrid

_OUTSIDE = -4.0  # normalised grid_sample coordinate that is certainly outside the image


def to_index_coords(points_xyz: torch.Tensor, grid: ImageGrid) -> torch.Tensor:
    """World (x, y, z) mm -> continuous voxel index (z, y, x)."""
    p = points_xyz[..., [2, 1, 0]]
    o = torch.as_tensor(grid.origin_mm, dtype=p.dtype, device=p.device)
    v = torch.as_tensor(grid.voxel_size_mm, dtype=p.dtype, device=p.device)
    return (p - o) / v


class JosephSampler:
    """Sample positions of Joseph's method for a set of LORs on a grid.

    LORs are split into the x-dominant and the y-dominant group; each group is handled
    in chunks. Everything is computed in float64 on the CPU (geometry only), then cast.
    """

    def __init__(self, start_xyz: torch.Tensor, end_xyz: torch.Tensor, grid: ImageGrid):
        self.grid = grid
        s = start_xyz.reshape(-1, 3).to(torch.float64)
        e = end_xyz.reshape(-1, 3).to(torch.float64)
        self.num_lors = s.shape[0]
        c0, c1 = to_index_coords(s, grid), to_index_coords(e, grid)
        d = c1 - c0
        dmm = (e - s)
        length = dmm.norm(dim=-1)
        if bool((length == 0).any()):
            raise ValueError("degenerate LOR with identical start and end points")
        nz = grid.shape[0]
        ad = d.abs()
        if nz == 1:
            if bool(((c0[:, 0].abs() > 0.5) | (c1[:, 0].abs() > 0.5)).any()):
                raise ValueError(
                    "2D image grid (nz == 1) but the sinogram has LORs outside its slice: "
                    "use a single-ring scanner or a 3D grid"
                )
            ad = ad.clone()
            ad[:, 0] = 0
        self.c0, self.d, self.length_mm = c0, d, length
        dom = torch.argmax(ad[:, [2, 1, 0]], dim=1)  # ties prefer x, then y
        self.groups = []
        for axis, mask in ((2, dom == 0), (1, dom == 1), (0, dom == 2)):
            ids = torch.nonzero(mask).flatten()
            if ids.numel():
                self.groups.append((axis, ids))

    def samples(self, ids: torch.Tensor, axis: int):
        """For LORs ``ids`` dominant along ``axis`` (1 = y, 2 = x): plane positions
        ``(n, K, 3)`` in index coords (z, y, x), validity ``(n, K)`` and step ``L`` (n,)."""
        c0, d = self.c0[ids], self.d[ids]
        n_a = self.grid.shape[axis]
        k = torch.arange(n_a, dtype=torch.float64)
        t = (k[None, :] - c0[:, axis : axis + 1]) / d[:, axis : axis + 1]
        valid = (t >= 0) & (t <= 1)
        pos = c0[:, None, :] + t[..., None] * d[:, None, :]
        pos[..., axis] = k[None, :].expand_as(t)  # exact plane index
        vs = self.grid.voxel_size_mm[axis]
        step = vs * self.length_mm[ids] / (d[:, axis].abs() * vs)
        return pos, valid, step

    # -- explicit weights (matrix path) ----------------------------------------------
    def triplets(self, max_chunk_samples: int = 1 << 22):
        """Rows, columns and weights (numpy) of the system matrix."""
        shape = self.grid.shape
        strides = (shape[1] * shape[2], shape[2], 1)
        rows, cols, vals = [], [], []
        for axis, ids_all in self.groups:
            n_a = shape[axis]
            chunk = max(1, max_chunk_samples // n_a)
            others = [ax for ax in (0, 1, 2) if ax != axis]
            for i in range(0, ids_all.numel(), chunk):
                ids = ids_all[i : i + chunk]
                pos, valid, step = self.samples(ids, axis)
                base = pos[..., axis].round().long() * strides[axis]
                neigh = []  # per other axis: [(index, weight), ...]
                for ax in others:
                    if shape[ax] == 1:
                        neigh.append([(torch.zeros_like(base), torch.ones_like(pos[..., ax]))])
                        continue
                    u = pos[..., ax]
                    u0f = torch.floor(u)
                    fu = u - u0f
                    u0 = u0f.long()
                    neigh.append([(u0, 1 - fu), (u0 + 1, fu)])
                lor = ids[:, None].expand_as(base)
                for ib, wb in neigh[0]:
                    for ic, wc in neigh[1]:
                        ok = valid & (ib >= 0) & (ib < shape[others[0]]) & (ic >= 0) & (ic < shape[others[1]])
                        wgt = wb * wc * step[:, None]
                        ok = ok & (wgt > 0)
                        flat = base + ib * strides[others[0]] + ic * strides[others[1]]
                        rows.append(lor[ok].numpy())
                        cols.append(flat[ok].numpy())
                        vals.append(wgt[ok].numpy())
        if not rows:
            return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0)
        return np.concatenate(rows), np.concatenate(cols), np.concatenate(vals)

    def estimated_nnz(self) -> int:
        nz = self.grid.shape[0]
        per = 2 * (2 if nz > 1 else 1)
        return int(sum(ids.numel() * self.grid.shape[a] * per for a, ids in self.groups) * 0.75)


def build_csr(sampler: JosephSampler, dtype: torch.dtype, device: torch.device):
    """CSR matrix ``A`` (num_lors x num_voxels) and its transpose, as torch tensors."""
    import scipy.sparse as sp

    r, c, v = sampler.triplets()
    shape = (sampler.num_lors, sampler.grid.num_voxels)
    A = sp.csr_matrix((v, (r, c)), shape=shape)
    A.sum_duplicates()
    At = A.T.tocsr()

    def _t(M):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return _csr(M)

    # int32 indices take MKL's fast sparse kernels on CPU (about 2.5x faster than int64)
    idx = np.int32 if max(A.nnz, *A.shape) < 2**31 - 1 else np.int64

    def _csr(M):
        return torch.sparse_csr_tensor(
            torch.from_numpy(M.indptr.astype(idx)),
            torch.from_numpy(M.indices.astype(idx)),
            torch.from_numpy(M.data).to(dtype),
            size=M.shape,
            check_invariants=False,
        ).to(device)

    return _t(A), _t(At), int(A.nnz)


def csr_matmul(M: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``(M @ x_n)_n`` for a batch ``x`` of shape ``(N, cols)``; returns ``(N, rows)``."""
    if x.shape[0] == 1:
        return (M @ x[0])[None]
    return (M @ x.T.contiguous()).T.contiguous()


class OnTheFly:
    """Chunked Joseph forward / adjoint evaluated with ``grid_sample``."""

    def __init__(self, sampler: JosephSampler, max_chunk_samples: int = 1 << 22, cache_bytes: int = 1 << 30):
        self.sampler = sampler
        self.max_chunk_samples = int(max_chunk_samples)
        self.cache_bytes = int(cache_bytes)
        self._cache: dict = {}

    def _chunks(self, dtype, device):
        """The sample grids of every chunk. Kept in memory (per dtype and device) when they
        fit ``cache_bytes``; otherwise regenerated on every call, so memory stays bounded
        by one chunk whatever the geometry size."""
        key = (dtype, str(device))
        if key in self._cache:
            return self._cache[key]
        total = sum(ids.numel() * self.sampler.grid.shape[a] for a, ids in self.sampler.groups)
        nbytes = total * (3 if self.sampler.grid.shape[0] > 1 else 2) * torch.finfo(dtype).bits // 8
        gen = self._generate(dtype, device)
        if nbytes > self.cache_bytes:
            return gen
        out = list(gen)
        self._cache = {key: out}  # keep one dtype/device at a time (memory)
        return out

    def _generate(self, dtype, device):
        g = self.sampler.grid
        nz, ny, nx = g.shape
        for axis, ids_all in self.sampler.groups:
            n_a = g.shape[axis]
            chunk = max(1, self.max_chunk_samples // n_a)
            for i in range(0, ids_all.numel(), chunk):
                ids = ids_all[i : i + chunk]
                pos, valid, step = self.sampler.samples(ids, axis)
                # normalise to [-1, 1] (align_corners=True); grid_sample wants (x, y[, z])
                nx_ = 2 * pos[..., 2] / max(nx - 1, 1) - 1
                ny_ = 2 * pos[..., 1] / max(ny - 1, 1) - 1
                if nz > 1:
                    nz_ = 2 * pos[..., 0] / (nz - 1) - 1
                    gr = torch.stack([nx_, ny_, nz_], -1)
                else:
                    gr = torch.stack([nx_, ny_], -1)
                gr[~valid] = _OUTSIDE
                yield ids.to(device), gr.to(dtype).to(device)[None], step.to(dtype).to(device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``(N, nz, ny, nx)`` -> ``(N, num_lors)``."""
        N = x.shape[0]
        nz = self.sampler.grid.shape[0]
        inp = x[None] if nz > 1 else x[:, 0][None]  # (1, N, [nz,] ny, nx)
        out = torch.zeros((N, self.sampler.num_lors), dtype=x.dtype, device=x.device)
        for ids, gr, step in self._chunks(x.dtype, x.device):
            if nz > 1:
                s = F.grid_sample(inp, gr[:, :, :, None, :], mode="bilinear", padding_mode="zeros", align_corners=True)
                s = s[0, :, :, :, 0]
            else:
                s = F.grid_sample(inp, gr, mode="bilinear", padding_mode="zeros", align_corners=True)[0]
            out[:, ids] = s.sum(-1) * step
        return out

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        """``y``: ``(N, num_lors)`` -> ``(N, nz, ny, nx)``."""
        N = y.shape[0]
        nz, ny, nx = self.sampler.grid.shape
        img = torch.zeros((1, N, nz, ny, nx) if nz > 1 else (1, N, ny, nx), dtype=y.dtype, device=y.device)
        dummy = torch.zeros(1, dtype=y.dtype, device=y.device).expand_as(img)
        for ids, gr, step in self._chunks(y.dtype, y.device):
            K = gr.shape[2]
            go = (y[:, ids] * step)[:, :, None].expand(N, ids.numel(), K)
            if nz > 1:
                gi, _ = torch.ops.aten.grid_sampler_3d_backward(
                    go[None, :, :, :, None].contiguous(), dummy, gr[:, :, :, None, :], 0, 0, True, [True, False]
                )
            else:
                gi, _ = torch.ops.aten.grid_sampler_2d_backward(go[None].contiguous(), dummy, gr, 0, 0, True, [True, False])
            img += gi
        img = img[0]
        return img if nz > 1 else img[:, None]
