"""``fbsem train``: train FBSEM-Net on a dataset (given, or simulated from the experiment's
``data:`` recipe and cached), end-to-end or sequentially; under ``torchrun`` one process
per rank (:mod:`fbsemlib.training.distributed`)."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch

from fbsemlib.config import ConfigError, from_dict, load_experiment
from fbsemlib.data import DataConfig, PETDataset, cached_dataset
from fbsemlib.errors import UserError
from fbsemlib.models.fbsem import FBSEMNet
from fbsemlib.outputs import check_output_folder
from fbsemlib.training import distributed as _dist
from fbsemlib.training import make_trainer
from fbsemlib.training.config import TrainConfig, TrainingDiverged, parse_model_section
from fbsemlib.training.device import resolve_device
from fbsemlib.training.model_io import CHECKPOINT_NAME, MODEL_NAME, RUN_FILES

__all__ = ["cmd_train"]


def _open_datasets(data_dir: Path):
    """The train and validation splits; the first opening validates the whole dataset (every
    file's checksum), so the validation split does not hash it again."""
    train = PETDataset(data_dir, "train")
    val = PETDataset(data_dir, "validation", checksums=False) if train.info_.subjects("validation") else None
    return train, val


def _dataset_for(sections: dict, config_path: str, progress: bool) -> Path:
    """Simulate the experiment's ``data:`` recipe, or reuse the dataset cached under
    ``data/generated/<name>-<recipe hash>`` (:func:`fbsemlib.data.cached_dataset`)."""
    if "data" not in sections:
        raise ConfigError(f"{config_path!r} has no 'data' section: give --data DIR or add a data recipe")
    recipe = from_dict(DataConfig, sections["data"], "data")
    info = cached_dataset(recipe, progress=progress, log=lambda m: print(m, file=sys.stderr))
    print(f"dataset: {info.path}", file=sys.stderr)
    return Path(info.path)


def cmd_train(args) -> int:
    """``fbsem train --config FILE --mode {end-to-end,sequential} [--data DIR] --out DIR
    [--seed N] [--device D] [--resume] [--no-progress]``."""
    if _dist.launched() and not _dist.in_group():
        args.device = _dist.device_for(args.device)  # cuda -> cuda:LOCAL_RANK
        return _dist.run(cmd_train, args, device=args.device)
    sections = load_experiment(args.config)
    out = Path(args.out)
    if _dist.is_rank0():  # the output-folder rule before any work (the trainer applies it again, under its lock)
        check_output_folder(out, "training run", RUN_FILES)
    if "data" in sections:  # checked even when --data replaces it: a misspelt recipe is never silently ignored
        from_dict(DataConfig, sections["data"], "data")
    model_cfg, n_it, n_sub = parse_model_section(sections.get("model"))
    train_cfg = from_dict(TrainConfig, sections.get("train", {}), "train")
    if args.seed is not None:
        if args.seed < 0:
            raise UserError(f"--seed must be >= 0, got {args.seed}")
        train_cfg = dataclasses.replace(train_cfg, seed=int(args.seed))
    mode = args.mode or train_cfg.mode
    train_cfg = dataclasses.replace(train_cfg, mode=mode)
    dev = resolve_device(args.device)
    progress = not args.no_progress
    if args.data is not None:
        data_dir = Path(args.data)
        if not data_dir.exists():
            raise UserError(f"data folder {str(data_dir)!r} does not exist")
    else:
        data_dir = _dist.rank0_call(lambda: _dataset_for(sections, args.config, progress), long=True)
    train_ds, val_ds = _open_datasets(data_dir)
    its = n_it if n_it is not None else train_ds.num_iterations
    subs = n_sub if n_sub is not None else train_ds.num_subsets
    if train_cfg.targets == "iteration-dependent":
        if subs != train_ds.num_subsets:
            raise ConfigError(f"model.num_subsets = {subs} but the data's targets use {train_ds.num_subsets} subsets")
        if its > train_ds.num_iterations:
            raise ConfigError(f"model.num_iterations = {its} but the data has targets for only "
                              f"{train_ds.num_iterations} iterations")
    projector = train_ds.make_projector(dev)
    torch.manual_seed(train_cfg.seed)
    net = FBSEMNet(projector, int(its), int(subs), model_cfg)
    if args.resume and not (out / CHECKPOINT_NAME).exists() and not (out / MODEL_NAME).exists() and _dist.is_rank0():
        print(f"no checkpoint in {str(out)!r}: starting a new run", file=sys.stderr)
    trainer = make_trainer(mode, model=net, train_dataset=train_ds, val_dataset=val_ds, config=train_cfg,
                           out_dir=out, device=dev, progress=progress, callbacks=_dist.fault_callbacks())
    try:
        metrics = trainer.fit(resume=bool(args.resume))
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if not _dist.is_rank0():
        return 0
    ev = metrics.get("val_eval") or metrics.get("train_eval") or {}
    print(f"{mode} training of K = {metrics['num_modules']} modules done in {metrics['train_time_s']:.1f} s; "
          f"final NRMSE vs reference {ev.get('nrmse_reference', float('nan')):.4f} "
          f"({'validation' if metrics.get('val_eval') else 'training'} set); results in {str(out)!r}")
    return 0
