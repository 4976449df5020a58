"""Reconstruct your own sinogram: with a trained FBSEM-Net, and with OSEM for comparison.

    python examples/reconstruct_sinogram.py --model runs/example/run --sinogram my_scan.h5 [--out recon.npy]

``my_scan.h5`` holds the measured sinogram ``y`` and the factors of its expected value
``multiplicative * A x + additive`` (and ``mr`` if the model uses an MR image), in the
parallelproj 2.x sinogram layout ``(planes, views, radial)`` of the model's scanner
(``fbsem info`` and the model folder's ``model.json`` name the geometry). Without a file,
``--demo`` writes one from a simulated test sample of ``--data``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import h5py
import numpy as np
import torch

import fbsemlib as fb


def write_demo_sinogram(data_dir: Path, path: Path) -> Path:
    """Write test sample 0 of a simulated dataset as a user's HDF5 sinogram file."""
    sample = fb.PETBatch.from_mapping(fb.PETDataset(data_dir, "test")[0])
    with h5py.File(path, "w") as f:
        for name in ("y", "multiplicative", "additive", "mr"):
            f[name] = getattr(sample, name)[0].numpy()
    return path


def main(argv: list[str] | None = None) -> dict[str, np.ndarray]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="a training output folder (model.pt)")
    ap.add_argument("--sinogram", help="HDF5 file with y, multiplicative, additive (and mr)")
    ap.add_argument("--demo", metavar="DATA", help="write --sinogram from test sample 0 of this dataset first")
    ap.add_argument("--out", default="recon.npy", help="where to save the FBSEM-Net image (.npy)")
    args = ap.parse_args(argv)
    if args.demo:
        args.sinogram = str(write_demo_sinogram(Path(args.demo), Path(args.sinogram or "demo_sinogram.h5")))
    if not args.sinogram:
        ap.error("give --sinogram (or --demo DATA)")

    net, info = fb.load_trained(args.model, device="cpu")
    with h5py.File(args.sinogram, "r") as f:
        # (planes, views, radial) and (Z, Y, X) arrays -> (batch 1, channel 1, ...) tensors
        d = {k: torch.from_numpy(np.asarray(f[k][()], dtype=np.float32))[None, None] for k in f}
    with torch.no_grad():
        x_net = net(d["y"], d["multiplicative"], d["additive"], d.get("mr") if net.config.use_mr else None)
    model = fb.PETForwardModel(net.projector, d["multiplicative"], d["additive"])
    x_osem = fb.osem(model, d["y"], net.num_iterations, net.num_subsets)

    np.save(args.out, x_net[0, 0].numpy())
    print(f"wrote {args.out}: FBSEM-Net ({net.num_modules} modules); OSEM {net.num_iterations} x {net.num_subsets}")
    return {"fbsem": x_net[0, 0].numpy(), "osem": x_osem[0, 0].numpy()}


if __name__ == "__main__":
    main()
