"""Simulate a small brain dataset and train FBSEM-Net on it sequentially, module by module.

    python examples/train_sequential.py --out runs/example [--subjects 4] [--size 32]

Sequential training (the 2022 paper): module k of the unrolled network is trained on its
own target t_k (OSEM of noise-free data after k sub-iterations) with the outputs of the
already trained modules 1..k-1 as inputs, so only one module is ever held for backprop.
The dataset recipe, the network and the training are plain dataclasses set here in code;
the same fields make the ``data:``, ``model:`` and ``train:`` sections of an experiment
YAML for ``fbsem simulate`` / ``fbsem train``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import fbsemlib as fb


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="folder for the dataset and the trained run")
    ap.add_argument("--subjects", type=int, default=4, help="brain phantoms (2 train, 1 validation, 1 test)")
    ap.add_argument("--size", type=int, default=32, help="image size (pixels) of the tiny2d scanner's grid")
    ap.add_argument("--epochs-per-module", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    out = Path(args.out)

    # 1. the data: a one-ring scanner, 2D slices, K = 2 x 4 = 8 iteration-dependent targets
    n_val_test = 1
    recipe = fb.DataConfig(
        name="example", scanner="tiny2d", image_shape=(1, args.size, args.size),
        voxel_size_mm=(2.0, 224.0 / args.size, 224.0 / args.size), phantom={"template_resolution": 2},
        num_subjects=args.subjects,
        split={"train": args.subjects - 2 * n_val_test, "validation": n_val_test, "test": n_val_test},
        slices_per_subject=2, num_iterations=2, num_subsets=4, seed=args.seed, compression="none")
    fb.simulate_dataset(recipe, out / "dataset", progress=False)
    train = fb.PETDataset(out / "dataset", "train", load_into_memory=True)
    val = fb.PETDataset(out / "dataset", "validation", load_into_memory=True)

    # 2. the network: iteration-dependent CNNs fused with EM (one per module)
    net = fb.FBSEMNet(train.make_projector("cpu"), train.num_iterations, train.num_subsets,
                      fb.ModelConfig(shared=False, depth=3, width=8, use_mr=True, gamma_init=0.01))

    # 3. sequential training on iteration-dependent targets
    cfg = fb.TrainConfig(mode="sequential", targets="iteration-dependent",
                         epochs_per_module=args.epochs_per_module, batch_size=2, lr=3e-3, seed=args.seed)
    metrics = fb.SequentialTrainer(net, train, val, cfg, out_dir=out / "run", progress=False).fit()

    # 4. the trained model against OSEM on the test split
    result = fb.evaluate(out / "run", out / "dataset", methods=("fbsem", "osem"))
    for method, s in result["summary"].items():
        print(f"{method:>6}: test NRMSE {s['nrmse']['mean']:.2f} %")
    return {"metrics": metrics, "evaluation": result}


if __name__ == "__main__":
    main()
