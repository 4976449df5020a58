"""``fbsem simulate --config FILE --out DIR``: simulate a dataset from the recipe of an
experiment file (or reuse the complete one already there) and print its summary."""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path

from fbsemlib.data.recipe import load_data_config
from fbsemlib.data.schema import SPLITS
from fbsemlib.data.simulate import simulate_dataset
from fbsemlib.errors import UserError

__all__ = ["cmd_simulate"]


def _dir_size(p: Path) -> int:
    return sum(q.stat().st_size for q in p.rglob("*") if q.is_file())


def _fmt_bytes(n: float) -> str:
    for u in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or u == "TiB":
            return f"{n:.0f} {u}" if u == "B" else f"{n:.1f} {u}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


def cmd_simulate(args) -> int:
    """``fbsem simulate --config FILE --out DIR [--seed N] [--overwrite] [--no-progress]``."""
    cfg = load_data_config(args.config, seed=args.seed)
    device = os.environ.get("FBSEM_SIMULATE_DEVICE", "cpu")
    try:
        info = simulate_dataset(cfg, args.out, overwrite=args.overwrite, progress=not args.no_progress,
                                device=device, log=lambda m: print(m, file=sys.stderr))
    except OSError as e:
        if e.errno in (errno.EACCES, errno.EROFS, errno.EPERM):  # PermissionError included
            raise UserError(f"output folder {args.out!r} cannot be written: {e}") from None
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise UserError(f"no space left while writing {args.out!r} ({e}); the finished subjects stay in "
                            f"{args.out}.tmp-*: free some space and rerun to resume") from None
        raise
    s = info.summary()
    sp = s.get("splits", {})
    print(f"dataset: {info.path} ({'reused' if s.get('reused') else 'simulated'}, recipe {cfg.name!r}, "
          f"hash {info.recipe_hash[:12]})")
    g, grid = info.geometry, info.grid
    print(f"  geometry: {g.scanner.name} sinogram {tuple(g.shape)} (planes, views, radial), image {grid.shape} "
          f"voxels {grid.voxel_size_mm} mm; K = {info.num_iterations} x {info.num_subsets} = {info.num_modules}")
    for name in SPLITS:
        d = sp.get(name, {})
        print(f"  {name:>10}: {d.get('subjects', 0)} subjects, {d.get('images', 0)} images, "
              f"{d.get('samples', 0)} samples")
    if "counts_min" in s:
        print(f"  counts per sample: {s['counts_min']:.3g} .. {s['counts_max']:.3g} (expected total); "
              f"high-count reference {cfg.high_count:.3g}")
    size = s["disk_bytes"] if "disk_bytes" in s else _dir_size(info.path)  # walk the folder only when needed
    print(f"  disk: {_fmt_bytes(size)}; time: {s.get('seconds', 0.0):.1f} s"
          + (f" (resumed {s['resumed_subjects']} subjects)" if s.get("resumed_subjects") else ""))
    return 0
