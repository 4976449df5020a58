"""What both trainers share: set-up and data checks, loaders, the run's configuration
record, checkpoints and resuming, logging, the final evaluation and the model file.

Output folder (``out_dir``): ``config.yaml`` and the logs (:mod:`fbsemlib.training.runlog`),
``checkpoint.pt`` (below), ``model.pt`` (:mod:`fbsemlib.training.model_io`),
``metrics.json`` (final losses, NRMSE, times, peak CUDA memory, gammas) and, for a
sequential run with a disk cache, ``cache/`` (:mod:`fbsemlib.training.stage_cache`).

Checkpoint (atomic, :mod:`fbsemlib.training.checkpoint`; ``weights_only``-loadable)::

    format, format_version, mode, finished
    model_state, optimizer_state, scheduler_state     (optimizer/scheduler None between stages)
    configs: {model, train, data, structure, projector, dataset_sizes}
    versions: {python, fbsemlib, torch, numpy}
    rng: {python, numpy, torch, cuda, data_order}
    counters: {stage, epoch (next to run), global_step}
    stages_done, stage_state (best validation loss / weights, patience counter, stopped),
    stage_start_state (sequential + shared: the weights the stage's cache was built with),
    history (per-stage summaries), log_counts, elapsed_s

A run resumes only with the same configuration (the :data:`OPERATIONAL_FIELDS` aside) and
data; a resumed run reproduces an uninterrupted one exactly on CPU.

Several processes (``torchrun``, :mod:`fbsemlib.training.distributed`): ``batch_size`` is
per process and each rank takes its part of every global batch of the same epoch order;
DDP averages the gradients; validation runs on shards and is reduced; BatchNorm batch
statistics are per rank; only rank 0 writes files. A W-process run with per-rank batch
``b`` equals (up to rounding) a one-process run with batch ``W * b`` (without BatchNorm).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from fbsemlib.config import ConfigError, available_cores, diff, from_dict
from fbsemlib.data.batch import PETBatch
from fbsemlib.models.fbsem import FBSEMNet
from fbsemlib.models.losses import target_weights, unrolled_loss
from fbsemlib.outputs import FolderLock, check_output_folder
from fbsemlib.physics.cache import projector_spec
from fbsemlib.provenance import versions
from fbsemlib.training import distributed as _dist
from fbsemlib.training.checkpoint import atomic_torch_save, atomic_write_json, atomic_write_text, load_checkpoint, rng_state, set_rng_state
from fbsemlib.training.config import OPERATIONAL_FIELDS, TrainConfig, TrainingDiverged, TrainingError
from fbsemlib.training.device import same_device
from fbsemlib.training.loading import LoadedBatch, TrainingSamples, batches, collate, dataset_info
from fbsemlib.training.model_io import (CHECKPOINT_FORMAT, CHECKPOINT_NAME, CHECKPOINT_VS_NOW, FORMAT_VERSION, MODEL_NAME,
                                        RUN_FILES, save_model)
from fbsemlib.training.optim import make_optimizer
from fbsemlib.training.runlog import RunLog, yaml_text

__all__ = ["Trainer", "relative_error"]


def relative_error(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Per-sample relative error ``||x - t|| / ||t||`` (a fraction, ``(B,)``): the ``nrmse``
    columns of the training logs and metrics. The quantity of
    :func:`fbsemlib.evaluation.metrics.nrmse` (``percent=False``, no mask), but computed as
    ``sqrt(d / n)`` with ``n`` clamped at ``1e-12`` in the images' dtype, which rounds
    differently from that function (``sqrt(d) / sqrt(n)``, an error for ``n = 0``); training
    sits below evaluation, and its logged numbers stay as they were."""
    d = (x - t).flatten(1).pow(2).sum(1)
    n = t.flatten(1).pow(2).sum(1).clamp_min(1e-12)
    return (d / n).sqrt()


@dataclass
class Trainer:
    """Common machinery of both trainers (data order, optimiser, logs, checkpoints)."""

    model: FBSEMNet
    train_dataset: Dataset
    val_dataset: Dataset | None = None
    config: TrainConfig = field(default_factory=TrainConfig)
    out_dir: str | os.PathLike = "runs/fbsem"
    device: str | torch.device | None = None  # default: the projector's device
    progress: bool = True
    data_info: dict | None = None  # recipe / geometry stored in checkpoints (default: from the dataset)
    callbacks: list[Callable[[str, dict], None]] = field(default_factory=list)

    mode: ClassVar[str] = ""

    # -- set-up ---------------------------------------------------------------------------
    def __post_init__(self) -> None:
        if not isinstance(self.model, FBSEMNet):
            raise TypeError(f"model must be an FBSEMNet, got {type(self.model).__name__}")
        if isinstance(self.config, dict):
            self.config = from_dict(TrainConfig, self.config, "train")
        if not isinstance(self.config, TrainConfig):
            raise TypeError(f"config must be a TrainConfig, got {type(self.config).__name__}")
        if self.config.mode != self.mode:
            self.config = dataclasses.replace(self.config, mode=self.mode)
        self.out_dir = Path(self.out_dir)
        self._rank0 = _dist.is_rank0()  # several processes: only rank 0 writes files and shows progress
        if not self._rank0:
            self.progress = False
        pdev = self.model.projector.device
        if self.device is not None and not same_device(torch.device(self.device), pdev):
            raise TrainingError(f"device {str(self.device)!r} differs from the projector's device {str(pdev)!r}: "
                                "build the projector on the training device")
        self.dev = pdev
        self.model.to(self.dev)
        if self.config.amp and self.dev.type != "cuda":
            raise ConfigError("train.amp=true needs a CUDA device (mixed precision is not supported on CPU); "
                              "set train.amp: false")
        if self.config.num_workers > available_cores():
            raise ConfigError(f"train.num_workers = {self.config.num_workers} exceeds the {available_cores()} CPU "
                              "cores available to this process")
        if len(self.train_dataset) == 0:
            raise TrainingError("the training dataset is empty")
        if self.val_dataset is not None and len(self.val_dataset) == 0:
            self.val_dataset = None
        self._check_data(self.train_dataset, "training")
        if self.val_dataset is not None:
            self._check_data(self.val_dataset, "validation")
        K = self.model.num_modules
        if not isinstance(self.config.loss_weights, str) and len(self.config.loss_weights) != K:
            raise ConfigError(f"train.loss_weights has {len(self.config.loss_weights)} values but the model has "
                              f"K = {K} modules")
        self.weights = target_weights(K, self.config.loss_weights)
        if self.data_info is None:
            self.data_info = dataset_info(self.train_dataset)
        self._log: RunLog | None = None
        self._outer = tqdm(disable=True)
        self._elapsed0 = 0.0
        self._t0 = time.perf_counter()
        self.global_step = 0
        self.history: list[dict] = []

    def _check_data(self, ds, name: str) -> None:
        try:
            item = PETBatch.from_mapping(ds[0])
        except (KeyError, TypeError) as e:
            raise TrainingError(f"the {name} dataset's items are not samples: {e.args[0] if e.args else e}") from None
        P = self.model.projector
        if tuple(item.y.shape) != (1,) + tuple(P.out_shape):
            raise TrainingError(f"{name} data: sinograms have shape {tuple(item.y.shape)}, the projector expects "
                                f"{(1,) + tuple(P.out_shape)} (dataset and model geometry differ)")
        if tuple(item.mr.shape) != (1,) + tuple(P.in_shape):
            raise TrainingError(f"{name} data: images have shape {tuple(item.mr.shape)}, the projector expects "
                                f"{(1,) + tuple(P.in_shape)}")
        K, Kd = self.model.num_modules, int(item.targets.shape[0])
        if self.config.targets == "iteration-dependent":
            ds_sub = getattr(ds, "num_subsets", None)
            if ds_sub is not None and int(ds_sub) != self.model.num_subsets:
                raise ConfigError(f"the model has {self.model.num_subsets} subsets but the {name} data's targets were "
                                  f"made with {ds_sub} subsets (model.num_subsets must match the data)")
            if K > Kd:
                raise ConfigError(f"the model has K = {K} modules ({self.model.num_iterations} iterations x "
                                  f"{self.model.num_subsets} subsets) but the {name} data has only {Kd} "
                                  "iteration-dependent targets")

    @property
    def K(self) -> int:
        return self.model.num_modules

    def _elapsed(self) -> float:
        return self._elapsed0 + (time.perf_counter() - self._t0)

    def _emit(self, event: str, rec: dict) -> None:
        for cb in self.callbacks:
            cb(event, rec)

    # -- data -----------------------------------------------------------------------------
    def _loader(self, ds, order: list[int], targets="all", batch_indices: list[list[int]] | None = None,
                truth: bool = False) -> DataLoader:
        if batch_indices is None:
            batch_indices = batches(order, self.config.batch_size)
        return DataLoader(TrainingSamples(ds, targets, truth), batch_sampler=batch_indices,
                          num_workers=self.config.num_workers, collate_fn=collate,
                          pin_memory=self.dev.type == "cuda")

    def _device_batches(self, ds, order: list[int], targets="all", batch_indices: list[list[int]] | None = None,
                        truth: bool = False) -> Iterator[tuple[torch.Tensor, LoadedBatch]]:
        """``(indices, batch on the training device)`` of ``ds`` in ``order`` (the indices,
        the samples' positions in ``ds``, stay on the CPU); ``truth``: with the true
        activity and brain mask (None where a dataset has none)."""
        for b in self._loader(ds, order, targets, batch_indices, truth):
            yield b.index, b.to(self.dev, non_blocking=True)

    def _phantom_error(self, out: torch.Tensor, b: PETBatch) -> float:
        """Sum over the batch of the relative error (:func:`relative_error`) of ``out`` to
        the true activity inside the brain: the NRMSE (fraction) of the evaluation, the
        validation criterion of ``checkpoint_selection: validation`` and the one the
        baselines' strengths are chosen by; NaN without the truth."""
        if b.activity is None or b.brain_mask is None:
            return float("nan")
        m = b.brain_mask.to(out.device).to(out.dtype)
        return float(relative_error(out.float() * m, b.activity.to(out.device).float() * m).sum())

    def _selection_value(self, v: dict) -> float:
        """The number a validation is ranked by: the loss, or (``checkpoint_selection:
        validation``) the NRMSE of the final image to the phantom."""
        if self.config.checkpoint_selection == "validation":
            if not math.isfinite(v.get("nrmse_phantom", float("nan"))):
                raise TrainingError("checkpoint_selection: validation needs a validation dataset with the true "
                                    "activity and brain mask")
            return v["nrmse_phantom"]
        return v["loss"]

    def _prepare(self, b: PETBatch):
        return self.model.prepare(b.y, b.multiplicative, b.additive, b.mr)

    def _autocast(self):
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=self.config.amp)

    def _optimizer(self, cnn_params: list, rho: torch.nn.Parameter):
        c = self.config
        return make_optimizer(c, cnn_params, rho, c.epochs if self.mode == "end-to-end" else c.epochs_per_module)

    def gammas(self) -> list[float]:
        with torch.no_grad():
            return [float(v) for v in torch.nn.functional.softplus(self.model.rho.detach()).cpu()]

    def _check_finite_loss(self, loss: torch.Tensor, where: str) -> None:
        if not bool(torch.isfinite(loss.detach())):
            raise TrainingDiverged(f"{where}: the loss is {float(loss.detach())}; training stopped. The last good checkpoint "
                                   f"{str(self.out_dir / CHECKPOINT_NAME)!r} is kept (lower train.lr, set "
                                   "train.grad_clip, or check the data)")

    def _check_finite_gamma(self, where: str) -> None:
        if not bool(torch.isfinite(self.model.rho.detach()).all()):
            raise TrainingDiverged(f"{where}: gamma became NaN/Inf (rho = {self.model.rho.detach().cpu().tolist()}); "
                                   f"training stopped. The last good checkpoint {str(self.out_dir / CHECKPOINT_NAME)!r} "
                                   "is kept (lower train.lr or set train.grad_clip)")

    def _update(self, opt, loss: torch.Tensor, mean_loss: torch.Tensor, where: str, clip_params,
                after_backward: Callable[[], None] | None = None,
                after_step: Callable[[], None] | None = None) -> float:
        """One optimiser step on ``loss`` (``mean_loss``: its value over the global batch):
        backward, ``after_backward``, gradient clipping of ``clip_params``, the step,
        ``after_step``; NaN / Inf stop the run. Returns the mean loss."""
        self._check_finite_loss(mean_loss, where)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if after_backward is not None:
            after_backward()
        if self.config.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(clip_params, self.config.grad_clip)
        opt.step()
        if after_step is not None:
            after_step()
        self._check_finite_gamma(where)
        return float(mean_loss.detach())

    def _peak_mb(self) -> float | None:
        if self.dev.type == "cuda":
            return torch.cuda.max_memory_allocated(self.dev) / 2**20
        return None

    # -- configs / checkpoints -----------------------------------------------------------
    def configs(self) -> dict:
        cfg = {
            "mode": self.mode,
            "model": self.model.config.to_dict(),
            "train": self.config.to_dict(),
            "structure": {"num_iterations": self.model.num_iterations, "num_subsets": self.model.num_subsets,
                          "num_modules": self.K},
            "projector": projector_spec(self.model.projector),
            "data": self.data_info or {},
            "dataset_sizes": {"train": len(self.train_dataset),
                              "validation": 0 if self.val_dataset is None else len(self.val_dataset)},
        }
        if _dist.is_distributed():  # absent in one process (older checkpoints stay resumable)
            cfg["distributed"] = {"world_size": _dist.world_size(),
                                  "global_batch_size": _dist.world_size() * self.config.batch_size}
        return cfg

    def _compatibility(self, saved: dict) -> list[str]:
        now = self.configs()
        saved = copy.deepcopy(saved)
        for d in (saved.get("train", {}), now["train"]):
            for k in OPERATIONAL_FIELDS:
                d.pop(k, None)
        diffs = []
        for key in ("mode", "model", "train", "structure", "data", "dataset_sizes"):
            diffs += diff(saved.get(key), now.get(key), CHECKPOINT_VS_NOW, key)
        one = lambda c: {"world_size": 1, "global_batch_size": (c.get("train") or {}).get("batch_size")}  # noqa: E731
        diffs += diff(saved.get("distributed") or one(saved), now.get("distributed") or one(now), CHECKPOINT_VS_NOW,
                      "distributed")
        pa, pb = dict(saved.get("projector", {})), dict(now["projector"])
        pa.pop("backend", None), pb.pop("backend", None)
        diffs += diff(pa, pb, CHECKPOINT_VS_NOW, "projector")
        return diffs

    def _checkpoint_payload(self, counters: dict, opt=None, sched=None, stage_state=None, extra=None,
                            finished: bool = False) -> dict:
        return {
            "format": CHECKPOINT_FORMAT,
            "format_version": FORMAT_VERSION,
            "mode": self.mode,
            "finished": finished,
            "model_state": self.model.state_dict(),
            "optimizer_state": None if opt is None else opt.state_dict(),
            "scheduler_state": None if sched is None else sched.state_dict(),
            "configs": self.configs(),
            "versions": versions(),
            "rng": {**rng_state(), "data_order": {"scheme": "SeedSequence([seed, stage, epoch])",
                                                   "seed": self.config.seed}},
            "counters": {**counters, "global_step": self.global_step},
            "stage_state": stage_state,
            "history": self.history,
            "log_counts": dict(self._log.counts) if self._log is not None else {},
            "elapsed_s": self._elapsed(),
            **(extra or {}),
        }

    def _save_checkpoint(self, payload: dict) -> None:
        if not self._rank0:
            return
        path = atomic_torch_save(payload, self.out_dir / CHECKPOINT_NAME)
        self._emit("checkpoint", {"path": str(path), **payload["counters"]})

    def _load_resume(self) -> dict:
        path = self.out_dir / CHECKPOINT_NAME
        try:
            ck = load_checkpoint(path, map_location="cpu")
        except Exception as e:
            raise TrainingError(f"cannot read checkpoint {str(path)!r}: {e}") from None
        if ck.get("format") != CHECKPOINT_FORMAT:
            raise TrainingError(f"{str(path)!r} is not an fbsemlib training checkpoint (format {ck.get('format')!r})")
        if ck.get("format_version") != FORMAT_VERSION:
            raise TrainingError(f"cannot resume from {str(path)!r}: checkpoint format version "
                                f"{ck.get('format_version')!r} (written by fbsemlib "
                                f"{(ck.get('versions') or {}).get('fbsemlib', '?')}), this fbsemlib reads version "
                                f"{FORMAT_VERSION}: resume with the version that wrote it or start a new run")
        diffs = self._compatibility(ck["configs"])
        if diffs:
            raise TrainingError(f"cannot resume from {str(path)!r}: the configuration differs from the checkpoint's: "
                                + "; ".join(diffs))
        return ck

    # -- entry point ----------------------------------------------------------------------
    def fit(self, resume: bool = False) -> dict:
        """Train (or, with ``resume``, continue from ``out_dir/checkpoint.pt`` when it exists)
        and return the final metrics (also written to ``out_dir/metrics.json``)."""
        try:
            ck, done = _dist.rank0_call(lambda: self._resume_point(resume))  # several processes: rank 0's, broadcast
            if done is not None:
                self.model.load_state_dict(ck["model_state"])
                return done
            return self._fit(ck)
        finally:
            self._unlock()

    def _fit(self, ck: dict | None) -> dict:
        out = self.out_dir
        kinds = ("step", "epoch", "stage") if self.mode == "sequential" else ("step", "epoch")
        self._log = RunLog(out, kinds, self.config.tensorboard, purge_step=None if ck is None
                           else ck["counters"]["global_step"], enabled=self._rank0)
        if self.dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.dev)
        self._t0 = time.perf_counter()
        if ck is None:
            self._log.start(None)
            if self._rank0:
                atomic_write_text(out / "config.yaml", yaml_text(self.configs()))
            random.seed(self.config.seed)
            np.random.seed(self.config.seed)
            torch.manual_seed(self.config.seed)
        else:
            self._log.start(ck["log_counts"])
            self.model.load_state_dict(ck["model_state"])
            set_rng_state(ck["rng"])
            self.global_step = int(ck["counters"]["global_step"])
            self.history = list(ck.get("history") or [])
            self._elapsed0 = float(ck.get("elapsed_s", 0.0))
        if self.mode == "sequential":
            total, done = self.K, 0 if ck is None else min(self.K, int(ck["counters"]["stage"]))
        else:
            total, done = self.config.epochs, 0 if ck is None else max(0, int(ck["counters"]["epoch"]))
        unit = "modules" if self.mode == "sequential" else "epochs"
        self._outer = tqdm(total=total, initial=min(done, total), desc=f"{self.mode} ({unit})",
                           disable=not self.progress, dynamic_ncols=True)
        try:
            if ck is None or not ck.get("finished"):
                self._run(ck)
            metrics = self._finish()
        finally:
            self._outer.close()
            self._log.close()
            self._release()
        return metrics

    def _resume_point(self, resume: bool) -> tuple[dict | None, dict | None]:
        """``(checkpoint to resume from or None, metrics of an already finished run or
        None)``; applies the output-folder rule, creates and locks the output folder. Run by
        rank 0 only in a multi-process run.

        A finished run (``model.pt``) is never overwritten: without ``resume`` any run in the
        folder is refused, with it the run continues from its checkpoint, and a model without
        a checkpoint is refused (there is nothing to continue)."""
        out = self.out_dir
        check_output_folder(out, "training run", RUN_FILES)
        self._lock = FolderLock(out, "training folder").acquire()
        ckpt_path = out / CHECKPOINT_NAME
        ck = None
        if resume and ckpt_path.exists():
            ck = self._load_resume()
            if ck.get("finished") and (out / "metrics.json").exists() and (out / MODEL_NAME).exists():
                return ck, json.loads((out / "metrics.json").read_text())
        elif resume and (out / MODEL_NAME).exists():
            raise TrainingError(f"{str(out)!r} holds a finished model ({MODEL_NAME}) but no {CHECKPOINT_NAME}: there "
                                "is nothing to resume and the model is not overwritten; choose another output folder")
        elif not resume and (ckpt_path.exists() or (out / MODEL_NAME).exists()):
            raise TrainingError(f"{str(out)!r} already holds a training run; resume it (--resume / fit(resume=True)) "
                                "or choose another output folder")
        return ck, None

    def _unlock(self) -> None:
        lock, self._lock = getattr(self, "_lock", None), None
        if lock is not None:
            lock.release()

    def _release(self) -> None:
        pass

    def _run(self, ck: dict | None) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    # -- final evaluation -------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, ds) -> dict:
        """Run the whole network (eval mode) on ``ds``: the end-to-end loss (with this
        config's targets and weights), NRMSE (:func:`relative_error`) of the last output vs
        the last iteration-dependent target and vs the high-count reference, and vs the
        true activity inside the brain (``nrmse_phantom``; NaN without the truth)."""
        was = self.model.training
        self.model.eval()
        tot = {"loss": 0.0, "nrmse_last_target": 0.0, "nrmse_reference": 0.0, "nrmse_phantom": 0.0}
        n = 0
        for idx, b in self._device_batches(ds, _dist.shard(range(len(ds))), truth=True):  # this rank's shard
            ctx = self._prepare(b)
            with self._autocast():
                outs = self.model.run(ctx, return_all=True)
            outs = [o.float() for o in outs]
            B = len(idx)
            tot["loss"] += float(self._e2e_loss(outs, b)) * B
            tot["nrmse_last_target"] += float(relative_error(outs[-1], b.targets[:, self.K - 1]).sum()) \
                if b.targets.shape[1] >= self.K else float("nan")
            tot["nrmse_reference"] += float(relative_error(outs[-1], b.target_final).sum())
            tot["nrmse_phantom"] += self._phantom_error(outs[-1], b)
            n += B
        self.model.train(was)
        if _dist.is_distributed():
            s = _dist.all_reduce_sums([*tot.values(), n]).tolist()
            tot, n = dict(zip(tot, s[:-1])), int(round(s[-1]))
        return {k: v / max(n, 1) for k, v in tot.items()}

    def _e2e_loss(self, outs: list[torch.Tensor], b: PETBatch) -> torch.Tensor:
        if self.config.targets == "final":
            return unrolled_loss(outs, target_final=b.target_final)
        return unrolled_loss(outs, targets=b.targets[:, : self.K], weights=self.weights)

    def _finish(self) -> dict:
        out = self.out_dir
        self.model.eval()
        ev_train = self.evaluate(self.train_dataset)
        ev_val = self.evaluate(self.val_dataset) if self.val_dataset is not None else None
        last_epoch = next((h for h in reversed(self.history) if h.get("kind") == "epoch"), {})
        metrics = {
            "mode": self.mode,
            "num_modules": self.K,
            "num_iterations": self.model.num_iterations,
            "num_subsets": self.model.num_subsets,
            "shared": self.model.config.shared,
            "targets": self.config.targets,
            "num_parameters": sum(p.numel() for p in self.model.parameters()),
            "num_parameters_per_module": sum(p.numel() for p in self.model.regularisers[0].parameters()) + 1,
            "steps": self.global_step,
            "final_train_loss": last_epoch.get("train_loss"),
            "final_val_loss": last_epoch.get("val_loss"),
            "final_val_nrmse": last_epoch.get("val_nrmse"),
            "train_eval": ev_train,
            "val_eval": ev_val,
            "gammas": self.gammas(),
            "train_time_s": self._elapsed(),
            "device": str(self.dev),
            "peak_memory_mb": self._peak_mb(),
            "versions": versions(),
        }
        metrics.update(self._stage_metrics())
        if self._rank0:
            save_model(out / MODEL_NAME, self.model, self.configs(), metrics)
            atomic_write_json(out / "metrics.json", metrics)
        self._save_checkpoint(self._checkpoint_payload({"stage": self.K if self.mode == "sequential" else 0,
                                                        "epoch": -1}, finished=True))
        _dist.barrier()  # every rank returns once rank 0 wrote the files
        self._emit("end", metrics)
        return metrics

    def _stage_metrics(self) -> dict:
        """Metrics of the mode (the sequential trainer's per-stage summaries)."""
        return {}

    # -- one logged step ------------------------------------------------------------------
    def _log_step(self, stage: int, epoch: int, loss: float, lr: float, gamma: float, bar) -> None:
        self.global_step += 1
        rec = {"mode": self.mode, "stage": stage, "epoch": epoch, "step": self.global_step, "loss": loss, "lr": lr,
               "gamma": gamma, "time_s": self._elapsed()}
        if self.global_step % self.config.log_every == 0:
            self._log.write("step", rec, tb_step=self.global_step)
        bar.set_postfix(loss=f"{loss:.4g}", gamma=f"{gamma:.3g}")
        bar.update()
        self._emit("step", rec)

    def _log_epoch(self, rec: dict) -> None:
        g = self.gammas()
        rec.update({"gamma_mean": float(np.mean(g)), "gamma_min": float(np.min(g)), "gamma_max": float(np.max(g)),
                    "time_s": self._elapsed(), "peak_memory_mb": self._peak_mb()})
        self._log.write("epoch", {**rec, "gammas": g}, tb_step=self.global_step)
        self.history.append({"kind": "epoch", **rec})
        post = {"train": f"{rec['train_loss']:.4g}"}
        if rec.get("val_loss") is not None:
            post["val"] = f"{rec['val_loss']:.4g}"
        if self.mode == "sequential":
            post["epoch"] = rec["epoch"] + 1
        else:
            self._outer.update()
        self._outer.set_postfix(post)
        self._emit("epoch", rec)

    def _validated(self, v: dict, where: str) -> dict:
        """``v`` (a validation result), or :class:`TrainingDiverged` when its loss is not finite."""
        if not math.isfinite(v["loss"]):
            raise TrainingDiverged(f"{where}validation loss is {v['loss']}; the last good checkpoint is kept")
        return v
