"""Sequential (module by module) training (Corda-D'incan, Schnabel & Reader 2022).

Stage ``k = 0..K-1`` trains module ``k`` alone (its CNN and its ``rho``) against target
``k`` on inputs ``x_k`` produced by the frozen, already trained modules ``0..k-1``. The
inputs and the per-sample module context are cached for the whole training and
validation sets (:mod:`fbsemlib.training.stage_cache`); after stage ``k`` module ``k`` is
applied once to every cached input to give ``x_{k+1}``. Training therefore costs ``O(K)``
module passes per sample and epoch-stage, not ``O(K^2)``, and its memory is that of one
module whatever ``K`` (it is not faster than end-to-end training for the same number of
updates per module: its gain is memory).

No gradient crosses a module boundary: the cached inputs carry no graph, the parameters of
the other modules have ``requires_grad=False`` and are not in the optimiser (each stage has
a fresh Adam and its own LR schedule), and the entries of the shared ``rho`` vector that
belong to other modules get zero gradient and are restored bit for bit after every step.

Choices of this implementation (the paper does not state them):

* ``targets: final`` trains every stage against the high-count reference (a greedy
  layer-wise scheme; an ablation). ``loss_weights`` do not apply (one loss per stage).
* ``stage_init`` (iteration-dependent networks): ``fresh`` starts every module from its own
  random initialisation, ``previous`` from module ``k-1``'s trained CNN and ``rho``,
  ``best`` (the default) from whichever of the two has the lower loss on the first batch of
  the stage's training inputs (:meth:`SequentialTrainer._init_stage`); logged per stage.
* Shared weights (``model.shared: true``): stage ``k`` fine-tunes the one shared CNN and
  ``rho`` against target ``k``, starting from the weights left by stage ``k-1``. Since the
  weights change at every stage, the inputs of stage ``k+1`` are recomputed from ``x0``
  through modules ``0..k`` with the current weights (``O(K^2)`` no-grad module passes in
  total, still one module of memory); iteration-dependent networks propagate the cache
  incrementally.
* BatchNorm: the module being trained is in train mode; every frozen module, the cache
  propagation and validation use eval mode, so the cached inputs are what inference sees.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from typing import ClassVar, Iterator

import numpy as np
import torch
from tqdm import tqdm

from fbsemlib.config import available_memory_bytes
from fbsemlib.data.batch import PETBatch
from fbsemlib.models.fbsem import UnrollContext
from fbsemlib.models.losses import relative_mse
from fbsemlib.training import distributed as _dist
from fbsemlib.training.base import Trainer, relative_error
from fbsemlib.training.config import TrainingError
from fbsemlib.training.loading import LoadedBatch, batches, epoch_permutation
from fbsemlib.training.optim import EarlyStop, clone_state
from fbsemlib.training.stage_cache import ImageCache, SplitCache, cache_bytes

__all__ = ["SequentialTrainer"]

#: batches of training inputs on which ``stage_init: best`` compares the two starts of a stage
START_LOSS_BATCHES = 1


@dataclass
class SequentialTrainer(Trainer):
    """Module-by-module training with cached inputs (see the module docstring).

    ``SequentialTrainer(model, train_dataset, val_dataset, config, out_dir, device, progress).fit()``;
    after a stage, :meth:`cached_inputs` gives the cached inputs of the next stage."""

    mode: ClassVar[str] = "sequential"

    def __post_init__(self) -> None:
        super().__post_init__()
        self._caches: dict[str, SplitCache] = {}
        self._cache_stage: int | None = None
        self._cache_where: str | None = None

    # -- what a stage loads --------------------------------------------------------------
    def _stage_targets(self, k: int):
        """What stage ``k`` loads: target ``k`` only (or none for the final target)."""
        return None if self.config.targets == "final" else k

    def _step_targets(self, b: PETBatch) -> torch.Tensor:
        return b.target_final if self.config.targets == "final" else b.targets[:, 0]

    # -- cache -----------------------------------------------------------------------------
    def _splits(self) -> dict:
        d = {"train": self.train_dataset}
        if self.val_dataset is not None:
            d["validation"] = self.val_dataset
        return d

    def _where(self) -> str:
        if self._cache_where is None:
            c = self.config
            need = cache_bytes(sum(len(d) for d in self._splits().values()),
                               int(np.prod(self.model.projector.in_shape)))
            avail = available_memory_bytes()
            fits = avail is None or need <= avail
            if c.cache == "memory" and not fits:
                raise TrainingError(f"train.cache: memory needs {need / 2**30:.2f} GiB for the sequential cache but "
                                    f"only {avail / 2**30:.2f} GiB of memory are available; use cache: disk or auto")
            if c.cache != "auto":
                self._cache_where = c.cache
            else:
                self._cache_where = "memory" if fits and need <= c.cache_memory_mb * 2**20 else "disk"
        return self._cache_where

    def _new_cache(self, split: str, n: int, name: str, dtype=torch.float32) -> ImageCache:
        shape = (1,) + tuple(self.model.projector.in_shape)
        d = self.out_dir / "cache"
        if _dist.is_distributed():
            d = d / f"rank-{_dist.rank()}"
        path = d / f"{split}_{name}.npy"
        return ImageCache(n, shape, self._where(), path, dtype)

    def _context(self, b: PETBatch, idx: torch.Tensor, k: int, split: str) -> UnrollContext:
        """The :class:`~fbsemlib.models.fbsem.UnrollContext` of module ``k`` for a batch, from the
        cache: only subset ``m = k % M`` is filled in (all that :meth:`FBSEMNet.step`
        reads), so no sensitivity is recomputed. Equal to ``net.prepare(...)`` for module ``k``
        (tested)."""
        net, c = self.model, self._caches[split]
        M = net.num_subsets
        m = k % M
        models, ys, sens, smean = [None] * M, [None] * M, [None] * M, [None] * M
        models[m], ys[m] = net.subset_model(m, b.multiplicative, b.additive), b.y[net.subset_slice(m)]
        sens[m] = c.sens.get(idx).to(self.dev)
        smean[m] = c.sens_mean[idx, m].to(self.dev).view(-1, 1, 1, 1, 1)
        support = c.support.get(idx).to(self.dev)
        mr = None if c.mr is None else c.mr.get(idx).to(self.dev)
        return UnrollContext(models, ys, sens, smean, mr, support, support.to(b.y.dtype))

    def _cache_pass(self, ds, desc: str) -> Iterator[tuple[torch.Tensor, LoadedBatch]]:
        """``(indices, batch)`` of this rank's shard of ``ds`` without targets, with a progress bar."""
        order = _dist.shard(range(len(ds)))
        with tqdm(total=len(batches(order, self.config.batch_size)), desc=desc, disable=not self.progress,
                  leave=False, dynamic_ncols=True) as bar:
            for idx, b in self._device_batches(ds, order, targets=None):
                yield idx, b
                bar.update()

    @torch.no_grad()
    def _build_caches(self, k: int) -> None:
        """Inputs ``x_k`` of every sample (modules ``0..k-1``, eval mode, from ``x0``) and
        the per-sample context of module ``k``."""
        self._drop_caches()
        net = self.model
        net.eval()
        M = net.num_subsets
        for split, ds in self._splits().items():
            n = len(ds)
            sc = SplitCache(self._new_cache(split, n, f"x{k:03d}"), self._new_cache(split, n, f"sens{k:03d}"),
                            self._new_cache(split, n, "support", torch.bool), torch.zeros(n, M),
                            self._new_cache(split, n, "mr") if net.config.use_mr else None)
            for idx, b in self._cache_pass(ds, f"inputs of module {k + 1} ({split})"):
                ctx = self._prepare(b)
                with self._autocast():
                    x = net.run(ctx, modules=range(k))
                sc.x.set(idx, x.float())
                sc.sens.set(idx, ctx.sens[k % M])
                sc.support.set(idx, ctx.support)
                sc.sens_mean[idx] = torch.cat([s.reshape(-1, 1) for s in ctx.sens_mean], 1).cpu()
                if sc.mr is not None:
                    sc.mr.set(idx, ctx.mr)
            _dist.allgather_shards(n, sc.x, sc.sens, sc.support, sc.mr, sc.sens_mean)  # every rank: all rows
            for cache in (sc.x, sc.sens, sc.support, sc.mr):
                if cache is not None:
                    cache.flush()
            self._caches[split] = sc
        self._cache_stage = k

    @torch.no_grad()
    def _propagate(self, k: int) -> None:
        """After stage ``k``: the inputs of stage ``k + 1``. Iteration-dependent networks:
        ``x_{k+1} = module_k(x_k)`` from the cache; shared network: recomputed from ``x0``
        through modules ``0..k`` with the current weights (no stale inputs)."""
        if self.model.config.shared:
            self._build_caches(k + 1)
            return
        net = self.model
        net.eval()
        M = net.num_subsets
        m_next = (k + 1) % M
        for split, ds in self._splits().items():
            sc = self._caches[split]
            n = len(ds)
            x_new = self._new_cache(split, n, f"x{k + 1:03d}")
            s_new = sc.sens if m_next == k % M else self._new_cache(split, n, f"sens{k + 1:03d}")
            for idx, b in self._cache_pass(ds, f"inputs of module {k + 2} ({split})"):
                ctx = self._context(b, idx, k, split)  # module k's context, from the cache
                with self._autocast():
                    x = net.step(k, sc.x.get(idx).to(self.dev), ctx)
                x_new.set(idx, x.float())
                if s_new is not sc.sens:  # only the next subset's sensitivity
                    s_new.set(idx, net.subset_sensitivity(m_next, b.y, b.multiplicative, b.additive))
            _dist.allgather_shards(n, x_new, s_new if s_new is not sc.sens else None)
            x_new.flush()
            sc.x.delete()
            sc.x = x_new
            if s_new is not sc.sens:
                s_new.flush()
                sc.sens.delete()
                sc.sens = s_new
        self._cache_stage = k + 1

    def _drop_caches(self) -> None:
        for c in self._caches.values():
            c.delete()
        self._caches = {}
        self._cache_stage = None

    def _release(self) -> None:
        self._drop_caches()
        d = self.out_dir / "cache"
        if not self._rank0:
            d = d / f"rank-{_dist.rank()}"
        if d.exists():
            shutil.rmtree(d, ignore_errors=True)

    def cached_inputs(self, split: str = "train") -> tuple[int | None, torch.Tensor | None]:
        """``(k, x_k)``: the stage whose inputs are cached and the cached images ``(N, 1, Z, Y, X)``
        (``(None, None)`` when nothing is cached). Caches are dropped at the end of
        :meth:`fit`; use a ``"stage"`` callback to look at them during training."""
        if split not in self._caches:
            return None, None
        return self._cache_stage, self._caches[split].x.all()

    # -- stage pieces ----------------------------------------------------------------------------
    def _freeze_for(self, k: int) -> list:
        net = self.model
        for p in net.parameters():
            p.requires_grad_(False)
        cnn = list(net.regularisers[net.net_index(k)].parameters())
        for p in cnn:
            p.requires_grad_(True)
        net.rho.requires_grad_(True)
        return cnn

    def _module_state(self, k: int) -> dict:
        net = self.model
        i = net.net_index(k)
        sd = {f"reg.{n}": v.detach().clone() for n, v in net.regularisers[i].state_dict().items()}
        sd["rho"] = net.rho.detach()[i].clone()
        return sd

    def _load_module_state(self, k: int, sd: dict) -> None:
        net = self.model
        i = net.net_index(k)
        net.regularisers[i].load_state_dict({n[4:]: v for n, v in sd.items() if n.startswith("reg.")})
        with torch.no_grad():
            net.rho[i] = sd["rho"].to(net.rho.device)

    @torch.no_grad()
    def _init_stage(self, k: int, how: str) -> str:
        """Start of module ``k >= 1`` (``train.stage_init``): ``"previous"`` copies module
        ``k-1``'s trained CNN and strength; ``"best"`` keeps whichever of that and the fresh
        initialisation has the lower loss on the stage's training inputs. Consecutive
        modules solve nearly the same problem (target ``k`` is one EM sub-iterate further
        than target ``k-1``), so the previous module is usually the better start for the
        few optimiser steps a stage gets; not always (module 0 sees the uniform ``x0`` and
        can be a poor start for module 1), hence ``"best"``. Returns ``"previous"`` or
        ``"fresh"``."""
        prev = self._module_state(k - 1)
        if how == "previous":
            self._load_module_state(k, prev)
            return "previous"
        fresh = self._module_state(k)
        self._load_module_state(k, prev)
        loss_prev = self._start_loss(k)
        self._load_module_state(k, fresh)
        loss_fresh = self._start_loss(k)
        if loss_prev < loss_fresh:
            self._load_module_state(k, prev)
            return "previous"
        return "fresh"

    @torch.no_grad()
    def _start_loss(self, k: int) -> float:
        """Mean stage-``k`` loss over the first :data:`START_LOSS_BATCHES` batches of training
        inputs (a cheap, deterministic comparison of two starts) with the module in training mode
        (BatchNorm batch statistics, as its first optimiser steps see it); BatchNorm running
        statistics are restored afterwards, so nothing changes."""
        net = self.model
        reg = net.regularisers[net.net_index(k)]
        saved = {n: v.clone() for n, v in reg.state_dict().items()}
        self._train_mode(k)
        first = range(min(len(self.train_dataset), START_LOSS_BATCHES * self.config.batch_size * _dist.world_size()))
        tl, n = 0.0, 0
        for out, b in self._stage_outputs(k, "train", first):
            tl += float(relative_mse(out, self._step_targets(b))) * len(out)
            n += len(out)
        if _dist.is_distributed():
            tl, n = _dist.all_reduce_sums([tl, n]).tolist()
        reg.load_state_dict(saved)
        net.eval()
        return tl / max(n, 1)

    def _train_mode(self, k: int) -> None:
        """Module ``k``'s CNN in training mode, every other module in eval mode (the whole
        network is put in eval mode only when needed: that walks every submodule)."""
        net = self.model
        i = net.net_index(k)
        if net.training or any(r.training for j, r in enumerate(net.regularisers) if j != i):
            net.eval()
        net.regularisers[i].train()

    @torch.no_grad()
    def _stage_outputs(self, k: int, split: str, indices, truth: bool = False):
        """``(module k's output, batch)`` for this rank's share of ``indices`` of a split,
        from the cached inputs (no gradient; the caller sets the modules' modes); ``truth``:
        the batches carry the true activity and brain mask."""
        ds = self.train_dataset if split == "train" else self.val_dataset
        cache = self._caches[split]
        for idx, b in self._device_batches(ds, _dist.shard(indices), targets=self._stage_targets(k), truth=truth):
            ctx = self._context(b, idx, k, split)
            with self._autocast():
                out = self.model.step(k, cache.x.get(idx).to(self.dev), ctx).float()
            yield out, b

    def _selects_checkpoint(self, k: int) -> bool:
        """Whether stage ``k``'s weights are chosen by the final image's validation NRMSE to
        the phantom (``checkpoint_selection: validation``): the last stage, which makes it."""
        return self.config.checkpoint_selection == "validation" and k == self.K - 1

    @torch.no_grad()
    def _validate_stage(self, k: int) -> dict:
        self.model.eval()
        tl, tn, tf, tp, n = 0.0, 0.0, 0.0, 0.0, 0
        last = k == self.K - 1  # the final image: its error to the phantom too
        for out, b in self._stage_outputs(k, "validation", range(len(self.val_dataset)), truth=last):
            t = self._step_targets(b)
            B = len(out)
            tl += float(relative_mse(out, t)) * B
            tn += float(relative_error(out, t).sum())
            tf += float(relative_error(out, b.target_final).sum())
            tp += self._phantom_error(out, b) if last else float("nan")
            n += B
        if _dist.is_distributed():
            tl, tn, tf, tp, n = _dist.all_reduce_sums([tl, tn, tf, tp, n]).tolist()
        return self._validated({"loss": tl / n, "nrmse": tn / n, "nrmse_final": tf / n, "nrmse_phantom": tp / n},
                               f"stage {k + 1}: ")

    # -- the stages ------------------------------------------------------------------------------
    def _run(self, ck: dict | None) -> None:
        k0 = 0 if ck is None else int(ck["counters"]["stage"])
        for k in range(k0, self.K):
            self._stage(k, ck if (ck is not None and k == k0) else None)

    def _stage_inputs(self, k: int, ck: dict | None) -> float:
        """Cache the inputs of stage ``k`` unless they are; returns the seconds it took."""
        if self._cache_stage == k:
            return 0.0
        net = self.model
        t = time.perf_counter()
        start_sd = ck.get("stage_start_state") if ck is not None else None
        if net.config.shared and start_sd is not None:  # the weights this stage's cache was built with
            now = clone_state(net.state_dict())
            net.load_state_dict(start_sd)
            self._build_caches(k)
            net.load_state_dict(now)
        else:
            self._build_caches(k)
        return time.perf_counter() - t

    def _stage(self, k: int, ck: dict | None) -> None:
        c, net, K = self.config, self.model, self.K
        shared = net.config.shared
        if self.dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.dev)
        st = EarlyStop.new()
        e0 = 0
        cache_time = self._stage_inputs(k, ck)
        init = "fresh"
        if c.stage_init != "fresh" and not shared and k >= 1 and (ck is None or int(ck["counters"]["epoch"]) == 0):
            init = self._init_stage(k, c.stage_init)
        elif ck is not None:
            init = ck.get("stage_init", "fresh")
        stage_start = clone_state(net.state_dict()) if shared else None
        if ck is not None and ck.get("stage_start_state") is not None:
            stage_start = ck["stage_start_state"]
        net.zero_grad(set_to_none=True)
        cnn = self._freeze_for(k)
        opt, sched = self._optimizer(cnn, net.rho)
        # one step's loss; several processes: DDP over the stage's trainable parameters only
        step = _dist.ddp_step(net, lambda x, ctx, t: relative_mse(net.step(k, x, ctx).float(), t))
        if ck is not None:
            e0 = int(ck["counters"]["epoch"])
            if ck.get("optimizer_state") is not None:
                opt.load_state_dict(ck["optimizer_state"])
                sched.load_state_dict(ck["scheduler_state"])
            if ck.get("stage_state") is not None:
                st = ck["stage_state"]
        i_rho = net.net_index(k)
        keep = torch.ones_like(net.rho, dtype=torch.bool)
        keep[i_rho] = False

        def zero_other_rho_grads() -> None:
            if net.rho.grad is not None:
                net.rho.grad[keep] = 0.0

        N = len(self.train_dataset)
        train_cache = self._caches["train"]
        E = c.epochs_per_module
        for epoch in range(e0, E):
            if st["stopped"]:
                break
            t_ep = time.perf_counter()
            lr = opt.param_groups[0]["lr"]
            self._train_mode(k)
            total, n = 0.0, 0
            order = epoch_permutation(c.seed, k, epoch, N)
            shares = _dist.shard_batches(order, c.batch_size)  # this rank's part of each global batch
            with tqdm(total=len(shares), desc=f"module {k + 1}/{K} epoch {epoch + 1}/{E}", disable=not self.progress,
                      leave=False, dynamic_ncols=True) as bar:
                for sh, (idx, b) in zip(shares, self._device_batches(self.train_dataset, order,
                                                                     targets=self._stage_targets(k),
                                                                     batch_indices=[s.indices for s in shares])):
                    ctx = self._context(b, idx, k, "train")
                    x = train_cache.x.get(idx).to(self.dev)  # no graph: nothing flows into earlier modules
                    frozen_rho = net.rho.detach().clone()
                    with self._autocast():
                        loss = step(x, ctx, self._step_targets(b))
                    loss, mean_loss = _dist.batch_loss(loss, sh)  # one process: both are the loss

                    def restore_other_rho(frozen_rho=frozen_rho) -> None:
                        with torch.no_grad():
                            net.rho[keep] = frozen_rho[keep]  # other modules' strengths stay exactly as they were

                    lv = self._update(opt, loss, mean_loss, f"module {k + 1}, epoch {epoch + 1}, step {self.global_step + 1}",
                                      cnn + [net.rho], after_backward=zero_other_rho_grads, after_step=restore_other_rho)
                    total += lv * sh.total
                    n += sh.total
                    self._log_step(k, epoch, lv, lr, float(self.gammas()[i_rho]), bar)
            sched.step()
            _dist.sync_buffers(net)  # BatchNorm running statistics: rank 0's on every rank
            st["train_loss"], st["epochs_run"] = total / max(n, 1), epoch + 1
            rec = {"mode": self.mode, "stage": k, "epoch": epoch, "step": self.global_step,
                   "train_loss": st["train_loss"], "lr": lr, "best": None}
            if self.val_dataset is not None and ((epoch + 1) % c.validation_every == 0 or epoch + 1 == E):
                v = self._validate_stage(k)
                rec.update(val_loss=v["loss"], val_nrmse=v["nrmse"], val_nrmse_final=v["nrmse_final"],
                           val_nrmse_phantom=v["nrmse_phantom"])
                st["val_loss"], st["val_nrmse"] = v["loss"], v["nrmse"]
                select = self._selects_checkpoint(k)
                rec["best"] = EarlyStop.update(st, self._selection_value(v) if select else v["loss"], epoch,
                                               lambda: self._module_state(k), c.early_stopping_patience,
                                               keep_best=select)
            rec["epoch_time_s"] = time.perf_counter() - t_ep
            st["stage_time_s"] = float(st.get("stage_time_s", 0.0)) + rec["epoch_time_s"]
            self._log_epoch(rec)
            # the stage's last epoch needs none: the end-of-stage checkpoint follows
            if (epoch + 1) % c.checkpoint_every == 0 and epoch + 1 < E and not st["stopped"]:
                self._save_checkpoint(self._checkpoint_payload(
                    {"stage": k, "epoch": epoch + 1}, opt, sched, st,
                    extra={"stages_done": list(range(k)), "stage_start_state": stage_start, "stage_init": init}))
        self._end_stage(k, st, init, cache_time)

    def _end_stage(self, k: int, st: dict, init: str, cache_time: float) -> None:
        """Restore the stage's best weights (early stopping), cache the next stage's inputs,
        log the stage and checkpoint."""
        c, net = self.config, self.model
        if st["best_state"] is not None and (c.early_stopping_patience is not None or self._selects_checkpoint(k)):
            self._load_module_state(k, st["best_state"])
        net.zero_grad(set_to_none=True)
        for p in net.parameters():
            p.requires_grad_(False)
        if k + 1 < self.K:
            t = time.perf_counter()
            self._propagate(k)
            cache_time += time.perf_counter() - t
        else:
            self._drop_caches()
        for p in net.parameters():
            p.requires_grad_(True)
        restored = c.early_stopping_patience is not None and st["best_val"] is not None
        rec = {"mode": self.mode, "stage": k, "epochs_run": st["epochs_run"], "best_epoch": st["best_epoch"],
               "step": self.global_step, "train_loss": st["train_loss"],
               "val_loss": st["best_val"] if restored else st["val_loss"],
               "val_nrmse": st.get("best_val_nrmse") if restored else st["val_nrmse"],
               "gamma": self.gammas()[net.net_index(k)], "init": init,
               "stage_time_s": float(st.get("stage_time_s", 0.0)) + cache_time, "cache_time_s": cache_time,
               "cache": self._where(), "time_s": self._elapsed(), "peak_memory_mb": self._peak_mb()}
        self._log.write("stage", rec, tb_step=self.global_step)
        self.history.append({"kind": "stage", **rec})
        self._outer.update()
        self._emit("stage", rec)
        self._save_checkpoint(self._checkpoint_payload({"stage": k + 1, "epoch": 0}, stage_state=None,
                                                       extra={"stages_done": list(range(k + 1)),
                                                              "stage_start_state": None}))

    def _stage_metrics(self) -> dict:
        stages = [h for h in self.history if h.get("kind") == "stage"]
        peaks = [s.get("peak_memory_mb") for s in stages if s.get("peak_memory_mb") is not None]
        return {
            "stages": [{k: s.get(k) for k in ("stage", "epochs_run", "best_epoch", "train_loss", "val_loss", "val_nrmse",
                                              "gamma", "init", "stage_time_s", "cache_time_s", "peak_memory_mb")}
                       for s in stages],
            "cache": stages[-1].get("cache") if stages else None,
            "peak_memory_mb_per_stage_max": max(peaks) if peaks else None,
        }
