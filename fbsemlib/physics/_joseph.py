"""Joseph's method in torch: sample positions, weights and the two execution paths.

For a line of response from ``p0`` to ``p1`` (mm) and a voxel grid, let ``a`` be the
transaxial axis (x or y) along which the line advances fastest in voxel units. The
line integral is approximated by one sample per voxel plane ``k`` of that axis,

    (A x)_i = L_i * sum_k  interp(x, p(t_k)),   L_i = d_a / |cos(angle to axis a)|,

where ``p(t_k)`` is the crossing of plane ``k`` and ``interp`` is linear (2D) or
bilinear (3D, across the other transaxial axis and z) interpolation with zero
padding. Samples with ``t_k`` outside [0, 1] (beyond the endpoints) are dropped.

Three ways to apply it:

* ``matrix``: the weights of every (LOR, voxel) pair are stored once as a CSR sparse
  matrix (and its transpose); forward and adjoint are sparse-dense products. Fastest
  on CPU and GPU, used when the matrix fits ``matrix_budget_bytes``.
* ``on-the-fly``: samples are generated per chunk of LORs and evaluated with
  ``grid_sample`` (forward) and its exact adjoint ``grid_sampler_*_backward``;
  memory is bounded by ``max_chunk_samples`` whatever the geometry size.
* ``segments`` (:class:`AxialSegments`): span-1 ring geometries whose ring spacing is a
  whole number of z voxels. Each plane is its segment's reference plane shifted axially,
  so one matrix per ring difference serves all the segment's planes in one sparse @ dense
  product; the same weights as ``matrix``, for full-scanner 3D sizes.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
import torch.nn.functional as F

from fbsemlib.physics.geometry import ImageGrid

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
    def triplet_chunks(self, max_chunk_samples: int = 1 << 22):
        """Rows, columns and weights (torch, float64) of the system matrix, chunk by chunk
        (memory bounded by ``max_chunk_samples``)."""
        shape = self.grid.shape
        strides = (shape[1] * shape[2], shape[2], 1)
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
                        yield lor[ok], flat[ok], wgt[ok]

    def estimated_nnz(self) -> int:
        nz = self.grid.shape[0]
        per = 2 * (2 if nz > 1 else 1)
        return int(sum(ids.numel() * self.grid.shape[a] * per for a, ids in self.groups) * 0.75)


def _scipy_csr(sampler: JosephSampler, dtype: torch.dtype, max_chunk_samples: int = 1 << 22):
    """The system matrix as a SciPy CSR matrix in ``dtype``, assembled chunk by chunk from
    compact (int32 where they fit, ``dtype``) triplets so that building a large matrix
    needs little more than the matrix itself."""
    import scipy.sparse as sp

    shape = (sampler.num_lors, sampler.grid.num_voxels)
    it = np.int32 if max(shape) < 2**31 - 1 else np.int64
    vt = np.float32 if dtype == torch.float32 else np.float64
    rows, cols, vals = [], [], []
    for r, c, v in sampler.triplet_chunks(max_chunk_samples):
        rows.append(r.numpy().astype(it))
        cols.append(c.numpy().astype(it))
        vals.append(v.numpy().astype(vt))
    if rows:
        r, c, v = np.concatenate(rows), np.concatenate(cols), np.concatenate(vals)
    else:
        r, c, v = np.zeros(0, it), np.zeros(0, it), np.zeros(0, vt)
    del rows, cols, vals
    A = sp.csr_matrix((v, (r, c)), shape=shape)
    A.sum_duplicates()
    return A


def _torch_csr(M, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # int32 indices take MKL's fast sparse kernels on CPU (about 2.5x faster than int64)
    idx = np.int32 if max(M.nnz, *M.shape) < 2**31 - 1 else np.int64
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(
            torch.from_numpy(M.indptr.astype(idx, copy=False)),
            torch.from_numpy(M.indices.astype(idx, copy=False)),
            torch.from_numpy(M.data).to(dtype),
            size=M.shape,
            check_invariants=False,
        ).to(device)


def build_csr(sampler: JosephSampler, dtype: torch.dtype, device: torch.device, forward: bool = True,
              transpose: bool = True, max_chunk_samples: int = 1 << 22):
    """CSR matrix ``A`` (num_lors x num_voxels) and its transpose, as torch tensors
    (``None`` for the one not asked for), and the number of non-zeros."""
    A = _scipy_csr(sampler, dtype, max_chunk_samples)
    nnz = int(A.nnz)
    At = _torch_csr(A.T.tocsr(), dtype, device) if transpose else None
    A = _torch_csr(A, dtype, device) if forward else None
    return A, At, nnz


def csr_bytes(nnz: int, rows: int, cols: int, dtype: torch.dtype) -> int:
    """Memory of a CSR matrix and its transpose (int32 indices)."""
    return 2 * nnz * (torch.finfo(dtype).bits // 8 + 4) + 4 * (rows + cols + 2)


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


class AxialSegments:
    """Joseph projector of a span-1 ring sinogram by axial shifts of one matrix per segment.

    All planes with the same ring difference ``d = end_ring - start_ring`` (a segment)
    share their transaxial LOR paths. When the ring spacing is an integer number ``s`` of
    z voxels, plane ``(r, r + d)`` samples the volume exactly like the reference plane
    ``(0, d)`` with every z index shifted by ``s r`` (same Joseph sample positions and
    weights), provided no LOR advances fastest along z. So one CSR matrix ``A_d``
    (``views*radial x w_d*Y*X``), the reference plane restricted to the ``w_d`` slices it
    touches, serves all ``num_rings - |d|`` planes: the zero-padded volume is cut into
    overlapping slabs (``unfold`` along z with step ``s``) and a single sparse @ dense
    product projects them all. The adjoint multiplies by ``A_d^T`` and adds the slabs back
    (``index_add_``). Segment ``-d`` reuses ``A_d`` on z-flipped slabs when the rings sit on
    whole or half voxel indices (else it gets its own matrix).

    Matrices (and transposes) are kept while they fit ``cache_bytes``, for one dtype and
    device at a time; the remaining segments are rebuilt on every call, so memory stays
    bounded by one segment's matrix whatever the scanner size.
    """

    def __init__(self, sinogram, grid: ImageGrid, cache_bytes: int = 1 << 30, max_chunk_samples: int = 1 << 22):
        reason = self.unsupported_reason(sinogram, grid)
        if reason:
            raise ValueError(f"axial-segment projector not applicable: {reason}")
        self.grid = grid
        self.cache_bytes = int(cache_bytes)
        self.max_chunk_samples = int(max_chunk_samples)
        sc = sinogram.scanner
        Z, Y, X = grid.shape
        vz = grid.voxel_size_mm[0]
        s = self.step = int(round(sc.ring_spacing_mm / vz))
        zr = sc.ring_positions_mm
        a = (zr[0] - grid.origin_mm[0]) / vz  # z index of ring 0
        a2 = round(2 * a)
        flippable = abs(2 * a - a2) < 1e-9
        plane_of = {(int(p), int(q)): i for i, (p, q) in enumerate(zip(sinogram.start_ring, sinogram.end_ring))}
        xy = sc.crystal_xy_mm()
        cs, ce = sinogram.crystal_pairs()
        self.num_planes = sinogram.num_planes
        self.num_lors_per_plane = cs.size
        D, nr = sinogram.max_ring_difference, sc.num_rings
        self.samplers: dict = {}
        self.segments = []
        for d in [0] + [v for k in range(1, D + 1) for v in (k, -k)]:
            R = nr - abs(d)
            rs, re = (0, d) if d >= 0 else (-d, 0)  # the reference plane
            planes = [plane_of[(rs + r, re + r)] for r in range(R)]
            if flippable:
                lo = math.floor(a + 1e-9) - 1
                hi = a2 + s * abs(d) - lo  # window symmetric about the LOR midpoints
            else:
                z0, z1 = sorted((a + s * rs, a + s * re))
                lo, hi = math.floor(z0 - 1e-9) - 1, math.ceil(z1 + 1e-9) + 1
            w = hi - lo + 1
            flip = bool(flippable and d < 0)
            key = abs(d) if flippable else d
            if key not in self.samplers:
                wgrid = ImageGrid((w, Y, X), grid.voxel_size_mm, (grid.origin_mm[0] + lo * vz,) + tuple(grid.origin_mm[1:]))
                start = np.empty(cs.shape + (3,))
                end = np.empty(cs.shape + (3,))
                start[..., :2], end[..., :2] = xy[cs], xy[ce]
                start[..., 2], end[..., 2] = zr[rs], zr[re]
                smp = JosephSampler(torch.as_tensor(start), torch.as_tensor(end), wgrid)
                if any(axis == 0 for axis, _ in smp.groups):  # checked by unsupported_reason too
                    raise ValueError(f"axial-segment projector not applicable: LORs of ring difference {d} "
                                     "advance fastest along z")
                self.samplers[key] = smp
            self.segments.append(dict(d=d, key=key, flip=flip, lo=lo, w=w, R=R, planes=torch.tensor(planes)))
        self.pad_lo = max(0, -min(g["lo"] for g in self.segments))
        self.pad_hi = max(0, max(g["lo"] + s * (g["R"] - 1) + g["w"] for g in self.segments) - Z)
        for g in self.segments:
            g["start"] = g["lo"] + self.pad_lo
            g["zidx"] = (g["start"] + s * torch.arange(g["R"])[:, None] + torch.arange(g["w"])[None]).flatten()
        self._cache: dict = {}
        self._cache_key = None
        self._rebuilt: set = set()
        self.nnz: dict = {}
        self.cached_bytes = 0

    @staticmethod
    def unsupported_reason(sinogram, grid: ImageGrid) -> str | None:
        """Why the axial-shift path cannot represent this geometry exactly (``None``: it can)."""
        from fbsemlib.physics.geometry import SinogramGeometry

        if not isinstance(sinogram, SinogramGeometry):
            return "not a ring-scanner sinogram"
        if grid.shape[0] == 1:
            return "2D image grid"
        sc, vz = sinogram.scanner, grid.voxel_size_mm[0]
        ratio = sc.ring_spacing_mm / vz
        if round(ratio) < 1 or abs(ratio - round(ratio)) > 1e-9 * ratio:
            return (f"ring spacing {sc.ring_spacing_mm} mm is not an integer multiple of the z voxel size "
                    f"{vz} mm")
        # the largest axial step of any LOR against its smallest transaxial step (voxel units)
        xy = sc.crystal_xy_mm()
        cs, ce = sinogram.crystal_pairs()
        dxy = np.abs(xy[ce] - xy[cs]) / np.asarray(grid.voxel_size_mm[:0:-1])
        dz = ratio * sinogram.max_ring_difference
        if dz > 0 and float(dxy.max(axis=-1).min()) <= dz:
            return "some LORs advance fastest along z (ring difference too large for the grid)"
        return None

    def estimated_nnz(self) -> int:
        """Estimated non-zeros of the full (all planes) system matrix."""
        return sum(g["R"] * self.samplers[g["key"]].estimated_nnz() for g in self.segments)

    # -- matrices -----------------------------------------------------------------------
    def _matrix(self, key, dtype, device, transpose: bool):
        ck = (dtype, str(device))
        if self._cache_key != ck:  # keep one dtype / device at a time (memory)
            self._cache, self._cache_key, self._rebuilt, self.cached_bytes = {}, ck, set(), 0
        if key not in self._cache and key not in self._rebuilt:
            A, At, nnz = build_csr(self.samplers[key], dtype, device, max_chunk_samples=self.max_chunk_samples)
            self.nnz[key] = nnz
            b = csr_bytes(nnz, *A.shape, dtype)
            if self.cached_bytes + b <= self.cache_bytes:
                self._cache[key] = (A, At)
                self.cached_bytes += b
            else:
                self._rebuilt.add(key)
            return At if transpose else A
        if key in self._cache:
            return self._cache[key][1 if transpose else 0]
        A, At, _ = build_csr(self.samplers[key], dtype, device, forward=not transpose, transpose=transpose,
                             max_chunk_samples=self.max_chunk_samples)
        return At if transpose else A

    def prepare(self, dtype, device) -> None:
        """Build (and cache, within the budget) every segment's matrices now."""
        for key in dict.fromkeys(g["key"] for g in self.segments):
            self._matrix(key, dtype, device, False)

    # -- forward / adjoint --------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``(N, nz, ny, nx)`` -> ``(N, num_lors)``."""
        N, Z, Y, X = x.shape
        L, s = self.num_lors_per_plane, self.step
        xp = F.pad(x, (0, 0, 0, 0, self.pad_lo, self.pad_hi))
        out = torch.zeros((N, self.num_planes, L), dtype=x.dtype, device=x.device)
        for g in self.segments:
            A = self._matrix(g["key"], x.dtype, x.device, False)
            R, w = g["R"], g["w"]
            slabs = xp[:, g["start"] : g["start"] + s * (R - 1) + w].unfold(1, w, s)  # (N, R, Y, X, w)
            if g["flip"]:
                slabs = slabs.flip(-1)
            dense = slabs.permute(4, 2, 3, 0, 1).reshape(w * Y * X, N * R)
            res = (A @ dense).reshape(L, N, R).permute(1, 2, 0)
            out.index_copy_(1, g["planes"].to(x.device), res.contiguous())
        return out.reshape(N, -1)

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        """``y``: ``(N, num_lors)`` -> ``(N, nz, ny, nx)``."""
        N = y.shape[0]
        Z, Y, X = self.grid.shape
        L = self.num_lors_per_plane
        yv = y.reshape(N, self.num_planes, L)
        xp = torch.zeros((N, Z + self.pad_lo + self.pad_hi, Y, X), dtype=y.dtype, device=y.device)
        for g in self.segments:
            At = self._matrix(g["key"], y.dtype, y.device, True)
            R, w = g["R"], g["w"]
            dense = yv.index_select(1, g["planes"].to(y.device)).permute(2, 0, 1).reshape(L, N * R)
            res = (At @ dense).reshape(w, Y, X, N, R)
            if g["flip"]:
                res = res.flip(0)
            xp.index_add_(1, g["zidx"].to(y.device), res.permute(3, 4, 0, 1, 2).reshape(N, R * w, Y, X))
        return xp[:, self.pad_lo : self.pad_lo + Z]
