"""``fbsem evaluate`` (a trained model against the baselines on a test split) and
``fbsem reconstruct`` (a user's sinogram with a trained model)."""

from __future__ import annotations

from pathlib import Path

from fbsemlib.errors import UserError
from fbsemlib.evaluation.evaluator import evaluate, prepare_evaluation_folder, print_summary, write_evaluation
from fbsemlib.evaluation.user_data import reconstruct_file


def cmd_evaluate(args) -> int:
    out = args.out or args.model
    if not Path(args.model).is_dir():
        raise UserError(f"model folder {args.model!r} does not exist")
    prepare_evaluation_folder(out, overwrite=args.overwrite)  # before the work: a folder that cannot take the results is refused now
    res = evaluate(args.model, args.data, device=args.device, progress=True)  # a DatasetError is a UserError
    print_summary(res)
    j, c = write_evaluation(res, out)
    print(f"wrote {j} and {c}")
    return 0


def cmd_reconstruct(args) -> int:
    npy, nii = reconstruct_file(args.model, args.sinogram, args.out, args.device, overwrite=args.overwrite,
                                unit_factors=args.unit_factors, mr_path=args.mr, mu_map_path=args.mu_map,
                                mu_unit=args.mu_unit)
    print(f"wrote {npy} and {nii}")
    return 0
