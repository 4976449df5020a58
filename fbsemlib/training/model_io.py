"""Files of a trained model: the names and formats in a training folder, writing the
model file and :func:`load_trained`.

A training folder (``out_dir``) holds ``model.pt`` (written at the end of training: the
state dict, the configurations and the final metrics), ``checkpoint.pt`` (the last
checkpoint, see :mod:`fbsemlib.training.base`) and ``metrics.json``. Both ``.pt`` files
are ``torch.save`` of plain values and tensors (``weights_only``-loadable) with a
``format`` name and a ``format_version``; a file of another version is refused. The model
file also carries ``checksum``, the SHA-256 of its weights (:func:`state_checksum`),
verified on load as a dataset's files are: a damaged file is refused, never used.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from fbsemlib.config import diff, from_dict
from fbsemlib.errors import UserError
from fbsemlib.models.fbsem import FBSEMNet, ModelConfig
from fbsemlib.physics.cache import projector_from_spec, projector_spec
from fbsemlib.provenance import versions
from fbsemlib.training.checkpoint import atomic_torch_save, load_checkpoint
from fbsemlib.training.config import TrainConfig
from fbsemlib.training.device import resolve_device

__all__ = ["CHECKPOINT_NAME", "MODEL_NAME", "RUN_FILES", "state_checksum", "CHECKPOINT_FORMAT", "MODEL_FORMAT",
           "FORMAT_VERSION", "save_model", "load_trained"]

CHECKPOINT_NAME = "checkpoint.pt"
MODEL_NAME = "model.pt"
CHECKPOINT_FORMAT = "fbsemlib-train-checkpoint"
MODEL_FORMAT = "fbsemlib-fbsem-model"
FORMAT_VERSION = 1

#: what a training folder may hold (the output-folder rule,
#: :func:`fbsemlib.outputs.check_output_folder`): the run's files, its evaluations and the
#: book's cache key
RUN_FILES = (CHECKPOINT_NAME, MODEL_NAME, "metrics.json", "config.yaml", "log_steps.csv", "log_epochs.csv",
             "log_stages.csv", "log.jsonl", "tensorboard", "cache", "evaluation*.json", "evaluation*.csv", "key.json")

#: how :func:`fbsemlib.config.diff` words a checkpoint's configuration against today's
CHECKPOINT_VS_NOW = ("checkpoint", "now")


def state_checksum(state_dict: dict) -> str:
    """SHA-256 of a state dict: every tensor's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_model(path: str | os.PathLike, model: FBSEMNet, configs: dict, metrics: dict) -> Path:
    """Write the model file (atomically): the state dict and its :func:`state_checksum`,
    ``configs`` (the run's :meth:`~fbsemlib.training.base.Trainer.configs`), the software
    versions and ``metrics``."""
    sd = model.state_dict()
    state = {"format": MODEL_FORMAT, "format_version": FORMAT_VERSION, "state_dict": sd,
             "checksum": state_checksum(sd), "configs": configs, "versions": versions(),
             "metrics": json.loads(json.dumps(metrics))}
    return atomic_torch_save(state, path)


def _read_model_file(path: Path) -> dict:
    try:
        data = load_checkpoint(path)
    except Exception as e:  # a damaged zip / pickle stream: torch raises several kinds
        raise UserError(f"model file {str(path)!r} is corrupted and cannot be read ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''})") from None
    if not isinstance(data, dict) or data.get("format") != MODEL_FORMAT:
        fmt = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise UserError(f"{str(path)!r} is not an fbsemlib model file (format {fmt!r})")
    if data.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{str(path)!r} has model format version {data.get('format_version')!r} (written by "
                        f"fbsemlib {(data.get('versions') or {}).get('fbsemlib', '?')}); this fbsemlib reads "
                        f"version {FORMAT_VERSION}")
    sd = data.get("state_dict")
    if not isinstance(sd, dict) or not all(torch.is_tensor(v) for v in sd.values()) or \
            not isinstance(data.get("configs"), dict):
        raise UserError(f"model file {str(path)!r} is corrupted (no state dict or configuration)")
    if "checksum" in data and data["checksum"] != state_checksum(sd):  # files of before the checksum have none
        raise UserError(f"model file {str(path)!r} is corrupted: its weights do not match their checksum; "
                        "retrain or restore the file")
    return data


def load_trained(out_dir: str | os.PathLike, device=None, allow_partial: bool = False, projector=None):
    """Load a trained model from a training folder.

    Returns ``(net, configs)``: the :class:`~fbsemlib.models.fbsem.FBSEMNet` (eval mode, on
    ``device``) and a dict with ``model`` (:class:`ModelConfig`), ``train``
    (:class:`TrainConfig`), ``mode``, ``data`` (recipe / geometry dicts), ``projector``,
    ``structure``, ``metrics`` and ``versions``. Reads ``model.pt``; with
    ``allow_partial`` an unfinished run's ``checkpoint.pt`` is used when there is no
    ``model.pt``. The projector is the shared one of its geometry
    (:func:`fbsemlib.physics.cache.projector_from_spec`: models of one geometry share it);
    ``projector`` replaces it (it must have the same geometry)."""
    out = Path(out_dir)
    if not out.is_dir():
        raise UserError(f"model folder {str(out)!r} does not exist")
    dev = resolve_device(device)
    mpath, cpath = out / MODEL_NAME, out / CHECKPOINT_NAME
    if mpath.exists():
        data = _read_model_file(mpath)
        sd, cfgs, metrics = data["state_dict"], data["configs"], data.get("metrics")
    elif allow_partial and cpath.exists():
        data = load_checkpoint(cpath)
        sd, cfgs, metrics = data["model_state"], data["configs"], None
    else:
        hint = " (training has not finished: resume it with `fbsem train ... --resume`)" if cpath.exists() else ""
        raise UserError(f"no trained model in {str(out)!r}: {MODEL_NAME} is missing{hint}")
    try:
        model_cfg = from_dict(ModelConfig, cfgs["model"], "model")
        train_cfg = from_dict(TrainConfig, cfgs["train"], "train")
        s = {k: int(cfgs["structure"][k]) for k in ("num_iterations", "num_subsets")}
        spec = cfgs["projector"]
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"the model file in {str(out)!r} is corrupted: its configuration is incomplete or invalid "
                        f"({type(e).__name__}: {e})") from None
    if projector is None:
        P = projector_from_spec(spec, dev)
    else:
        P = projector
        diffs = [d for d in diff(cfgs["projector"], projector_spec(projector), CHECKPOINT_VS_NOW, "projector")
                 if not d.startswith("projector.backend")]
        if diffs:
            raise UserError("the given projector differs from the model's: " + "; ".join(diffs))
    net = FBSEMNet(P, s["num_iterations"], s["num_subsets"], model_cfg)
    try:
        net.load_state_dict(sd)
    except RuntimeError as e:
        raise UserError(f"the weights in {str(out)!r} do not fit the model they describe: "
                        f"{str(e).splitlines()[0]}") from None
    net.to(P.device)
    net.eval()
    configs = {"model": model_cfg, "train": train_cfg, "mode": cfgs.get("mode"), "data": cfgs.get("data", {}),
               "projector": cfgs["projector"], "structure": cfgs["structure"],
               "dataset_sizes": cfgs.get("dataset_sizes"), "metrics": metrics, "versions": data.get("versions")}
    return net, configs
