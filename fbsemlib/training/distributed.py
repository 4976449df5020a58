"""Distributed training plumbing: ``torchrun`` process groups, data sharding, reductions,
DistributedDataParallel steps and worker failures.

``fbsem train`` runs unchanged as one process. Started by ``torchrun`` (the environment
variables ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT`` are
set), :func:`run` initialises the default process group (``gloo`` on CPU, ``nccl`` on CUDA,
process ``r`` on GPU ``LOCAL_RANK``), runs the command and tears the group down::

    torchrun --nproc_per_node=2 -m fbsemlib train --config data/smoke.yaml --mode sequential \\
        --data DIR --out DIR

Semantics (both trainers, :mod:`fbsemlib.training.base`, call the helpers below, which are
no-ops in a single process):

* **Batches.** ``train.batch_size`` is the batch of ONE process; the global batch is
  ``world_size * batch_size``. The data order of an epoch is the same permutation as in a
  single process (:func:`fbsemlib.training.loading.epoch_permutation`, independent of the number of
  processes); it is cut into global batches and rank ``r`` takes the items ``r, r + W,
  r + 2W, ...`` of each (:func:`shard_batches`, the ``DistributedSampler`` interleaving). A
  W-process run with per-rank batch ``b`` therefore computes, up to floating-point
  rounding, what one process computes with batch ``W * b``. When the last global batch is
  short, the ranks get unequal parts: each rank's loss is weighted by ``count * W / total``
  (DDP averages over ``W``), which gives exactly the mean over the global batch; a rank left
  with no item runs one item of the batch with weight 0 (every rank must take part in the
  gradient all-reduce).
* **Gradients** are averaged by :class:`torch.nn.parallel.DistributedDataParallel`: the
  loss of one optimiser step is computed by a small ``nn.Module`` (:class:`LossModule`) that
  holds the whole network and is wrapped in DDP (:func:`ddp_step`). In sequential training
  the wrapper is rebuilt for every stage, after the other modules were frozen, so DDP
  registers only the stage's trainable parameters (its CNN and ``rho``); DDP could express
  the sequential stage, no hand-written all-reduce is needed.
* **Losses** of a step are all-reduced before the NaN/Inf check, so every rank logs the
  global mean loss and every rank stops together when it is not finite.
* **Validation and evaluation** run on shards (``indices[r::W]``) and the sums are
  all-reduced (:func:`all_reduce_sums`).
* **Sequential cache.** Each rank computes the cached stage inputs (and the per-sample
  context) of its shard only, then the shards are all-gathered (:func:`allgather_shards`, in
  chunks) so that every rank holds the whole cache: the data order of every epoch is a new
  global permutation, so any rank may need any sample. The propagation work is split W
  ways; the cache memory per rank is that of a single-process run. Disk caches are
  per rank (``cache/rank-<r>/``).
* **BatchNorm** statistics are per rank: batch statistics come from the rank's own
  ``batch_size`` items (not synchronised, DDP's default; ``SyncBatchNorm`` is not used, it
  is only available on CUDA); the running statistics are rank 0's (DDP's
  ``broadcast_buffers``, and :func:`sync_buffers` after every epoch), so all ranks hold
  identical models, and the cached inputs are what inference produces. With BatchNorm a
  W-process run therefore differs from a one-process run with the global batch; without it
  (``model.batch_norm: false``) they agree.
* **Files.** Only rank 0 writes checkpoints, logs, ``config.yaml``, ``metrics.json`` and
  ``model.pt``. On resume rank 0 reads the checkpoint and broadcasts it
  (:func:`rank0_call`), so ``--out`` need not be on a shared filesystem; the dataset must be
  readable by every rank. A checkpoint records the world size and the global batch, and
  resuming with other values is refused.
* **Failures.** The process group has a timeout (``FBSEM_DIST_TIMEOUT_S``, default 600 s).
  When a collective fails (a peer died: gloo reports it at once; a peer hangs: the
  timeout), the surviving ranks print which rank was lost (ranks on the same host are
  checked by process id), and exit with status 3 without waiting for anything else.
  Under ``torchrun`` the launcher then stops the others and reports the failed rank.
"""

from __future__ import annotations

import datetime
import inspect
import os
import pickle
import signal
import socket
import sys
from dataclasses import dataclass
from typing import Any, Callable

import torch

from fbsemlib.errors import UserError

__all__ = [
    "launched",
    "in_group",
    "is_distributed",
    "rank",
    "world_size",
    "local_rank",
    "is_rank0",
    "device_for",
    "init",
    "teardown",
    "run",
    "WorkerLost",
    "Share",
    "shard",
    "shard_batches",
    "batch_loss",
    "LossModule",
    "ddp_step",
    "all_reduce_sums",
    "barrier",
    "broadcast_object",
    "rank0_call",
    "sync_buffers",
    "allgather_shards",
    "dead_peers",
    "fault_callbacks",
    "info",
    "EXIT_WORKER_LOST",
]

ENV_TIMEOUT = "FBSEM_DIST_TIMEOUT_S"
ENV_FAULT = "FBSEM_TEST_FAULT"  # test hook: "exit:RANK:STEP" or "hang:RANK:STEP"
DEFAULT_TIMEOUT_S = 600.0
EXIT_WORKER_LOST = 3
_LONG_WAIT = datetime.timedelta(days=7)


class WorkerLost(RuntimeError):
    """A collective failed because another worker died, hung or became unreachable."""


@dataclass
class _State:
    backend: str
    device: torch.device
    timeout_s: float
    store: Any
    peers: list  # [{"rank", "host", "pid", "local_rank"}] of every rank
    calls: int = 0


_STATE: _State | None = None


# ----------------------------------------------------------------------------------------
# ranks
# ----------------------------------------------------------------------------------------
def launched() -> bool:
    """Started by ``torchrun`` (or another launcher that sets ``RANK`` and ``WORLD_SIZE``)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def _initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def in_group() -> bool:
    """A default process group exists (of any size)."""
    return _initialized()


def is_distributed() -> bool:
    """A process group with more than one process is initialised."""
    return _initialized() and torch.distributed.get_world_size() > 1


def rank() -> int:
    return torch.distributed.get_rank() if _initialized() else 0


def world_size() -> int:
    return torch.distributed.get_world_size() if _initialized() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_rank0() -> bool:
    return rank() == 0


def info() -> dict | None:
    """``{"world_size", "backend"}`` of a multi-process run (``None`` in one process)."""
    if not is_distributed():
        return None
    return {"world_size": world_size(), "backend": str(torch.distributed.get_backend())}


def device_for(requested: str | None) -> str | None:
    """The device of this process: under a launcher, ``cuda`` (or no ``--device`` when CUDA
    is available) means ``cuda:LOCAL_RANK``; an explicit index or ``cpu`` is kept."""
    if not launched():
        return requested
    cuda = torch.cuda.is_available()
    if requested in (None, "auto"):
        return f"cuda:{local_rank()}" if cuda else "cpu"
    if requested == "cuda":
        return f"cuda:{local_rank()}"
    return requested


# ----------------------------------------------------------------------------------------
# process group
# ----------------------------------------------------------------------------------------
def _timeout_s() -> float:
    raw = os.environ.get(ENV_TIMEOUT)
    if raw is None:
        return DEFAULT_TIMEOUT_S
    try:
        v = float(raw)
    except ValueError:
        v = -1.0
    if not v > 0:
        raise UserError(f"{ENV_TIMEOUT} must be a positive number of seconds, got {raw!r}")
    return v


def init(device: str | torch.device | None = None) -> torch.device:
    """Initialise the default process group from the launcher's environment (``env://``):
    ``nccl`` for a CUDA device, ``gloo`` otherwise, with the timeout of
    ``FBSEM_DIST_TIMEOUT_S``. Returns this process's device. Does nothing (returns the
    device) when no launcher variables are set or the group already exists."""
    global _STATE
    dev = torch.device(device_for(None if device is None else str(device)) or "cpu")
    if not launched() or _initialized():
        return dev
    if not torch.distributed.is_available():  # pragma: no cover
        raise UserError("this PyTorch build has no torch.distributed: run without torchrun")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    t = _timeout_s()
    timeout = datetime.timedelta(seconds=t)
    store, r, w = next(torch.distributed.rendezvous("env://", timeout=timeout))
    store.set_timeout(timeout)
    kw = {"device_id": dev} if dev.type == "cuda" else {}
    torch.distributed.init_process_group(backend, store=torch.distributed.PrefixStore("default_pg", store),
                                         rank=r, world_size=w, timeout=timeout, **kw)
    me = {"rank": r, "host": socket.gethostname(), "pid": os.getpid(), "local_rank": local_rank()}
    peers: list = [None] * w
    torch.distributed.all_gather_object(peers, me)
    _STATE = _State(backend, dev, t, torch.distributed.PrefixStore("fbsemlib", store), peers)
    return dev


def teardown() -> None:
    """Destroy the process group created by :func:`init` (if any)."""
    global _STATE
    if _STATE is not None and _initialized():
        torch.distributed.destroy_process_group()
    _STATE = None


def _comm_device() -> torch.device:
    if _STATE is not None and _STATE.backend == "nccl":
        return _STATE.device
    if _initialized() and str(torch.distributed.get_backend()) == "nccl":  # pragma: no cover - CUDA
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ----------------------------------------------------------------------------------------
# failures
# ----------------------------------------------------------------------------------------
def _pid_dead(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        return state in ("Z", "X")  # exited (a zombie until the launcher reaps it)
    except FileNotFoundError:
        return True
    except (OSError, IndexError):
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        pass
    return False


def dead_peers() -> list[dict]:
    """The other ranks on this host whose process has exited (ranks on other hosts cannot
    be checked and are not listed)."""
    if _STATE is None:
        return []
    host, me = socket.gethostname(), rank()
    return [p for p in _STATE.peers if p["rank"] != me and p["host"] == host and _pid_dead(int(p["pid"]))]


_COMM_WORDS = ("gloo", "nccl", "connection reset", "connection closed", "broken pipe", "timed out", "timeout",
               "processgroup", "c10d", "socket", "peer")


def _is_comm_failure(e: BaseException) -> bool:
    dist_error = getattr(torch.distributed, "DistError", None)
    if dist_error is not None and isinstance(e, dist_error):
        return True
    if isinstance(e, WorkerLost):
        return True
    msg = str(e).lower()
    return isinstance(e, RuntimeError) and any(w in msg for w in _COMM_WORDS)


def describe_failure(e: BaseException) -> str:
    """The message of a lost worker (which ranks died, which are unreachable)."""
    r, w = rank(), world_size()
    dead = dead_peers()
    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
    if dead:
        who = ", ".join(f"rank {p['rank']} (pid {p['pid']} on {p['host']})" for p in dead)
        what = f"worker {who} has died"
    else:
        others = [p for p in (_STATE.peers if _STATE else []) if p["rank"] != r]
        remote = [p for p in others if p["host"] != socket.gethostname()]
        what = ("a worker did not answer in time or could not be reached"
                + (f" (ranks on other hosts: {', '.join(str(p['rank']) for p in remote)})" if remote else ""))
    t = _STATE.timeout_s if _STATE is not None else DEFAULT_TIMEOUT_S
    return (f"rank {r} of {w}: lost contact with the other training processes: {what}; stopping this rank "
            f"(a collective failed or exceeded the {t:g} s timeout of {ENV_TIMEOUT}: {type(e).__name__}: {first}). "
            "Check the failed rank's own output; resume with --resume")


def _on_sigterm(signum, frame):  # pragma: no cover - timing dependent
    print(f"error: rank {rank()} of {world_size()}: stopped by SIGTERM (the launcher stops every worker when one "
          "of them fails: see its failure report)", file=sys.stderr, flush=True)
    os._exit(128 + signum)


def run(fn: Callable[..., int], *args, device: str | None = None) -> int:
    """Run ``fn(*args)`` in a process group initialised from the launcher's environment
    (see the module docstring); without launcher variables just ``fn(*args)``. A lost
    worker ends this process with :data:`EXIT_WORKER_LOST` and a message naming it."""
    if not launched():
        return fn(*args)
    init(device)
    old = signal.getsignal(signal.SIGTERM)
    try:
        signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # pragma: no cover - not the main thread
        old = None
    try:
        rc = fn(*args)
    except BaseException as e:  # noqa: BLE001 - classify, then re-raise or exit
        if is_distributed() and (_is_comm_failure(e) or dead_peers()):
            print(f"error: {describe_failure(e)}", file=sys.stderr, flush=True)
            sys.stdout.flush()
            os._exit(EXIT_WORKER_LOST)  # the group is broken: destroying it could block
        teardown()
        raise
    finally:
        if old is not None:
            try:
                signal.signal(signal.SIGTERM, old)
            except ValueError:  # pragma: no cover
                pass
    teardown()
    return rc


# ----------------------------------------------------------------------------------------
# data sharding
# ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Share:
    """This rank's part of one global batch: ``indices`` to load (one item of the batch with
    ``count == 0`` when the rank has none), ``count`` real items, ``total`` items in the
    global batch."""

    indices: list
    count: int
    total: int

    @property
    def weight(self) -> float:
        """The factor of this rank's mean loss in the global mean (``count / total``)."""
        return self.count / self.total


def shard(indices, r: int | None = None, w: int | None = None) -> list:
    """Rank ``r``'s part ``indices[r::w]`` (everything in one process)."""
    r = rank() if r is None else r
    w = world_size() if w is None else w
    return list(indices)[r::w]


def shard_batches(order: list, batch_size: int, r: int | None = None, w: int | None = None) -> list[Share]:
    """Cut ``order`` into global batches of ``w * batch_size`` and give rank ``r`` the items
    ``r, r + w, ...`` of each (see the module docstring). In one process: the batches of
    ``batch_size``."""
    r = rank() if r is None else r
    w = world_size() if w is None else w
    B = w * batch_size
    out = []
    for i in range(0, len(order), B):
        g = list(order[i:i + B])
        mine = g[r::w]
        out.append(Share(mine if mine else g[:1], len(mine), len(g)))
    return out


def batch_loss(loss: torch.Tensor, share: Share) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss to backpropagate, global mean loss)`` of one step. In one process both are
    ``loss``. Otherwise ``loss`` (this rank's mean) is weighted by ``count * W / total`` so
    that DDP's average gives the mean over the global batch, and the global mean (detached)
    is all-reduced so every rank can log it and check it is finite."""
    if not is_distributed():
        return loss, loss
    part = loss.detach().float().reshape(1) * share.weight if share.count else \
        torch.zeros(1, device=loss.device)
    total = all_reduce_sums(part)[0]
    return loss * (share.weight * world_size()), total


# ----------------------------------------------------------------------------------------
# DistributedDataParallel
# ----------------------------------------------------------------------------------------
class LossModule(torch.nn.Module):
    """The module DDP wraps: it holds the network (whose trainable parameters DDP
    registers) and computes one step's loss with ``fn(*inputs)``."""

    def __init__(self, net: torch.nn.Module, fn: Callable[..., torch.Tensor]):
        super().__init__()
        self.net = net
        self._fn = fn

    def forward(self, *inputs):
        return self._fn(*inputs)


def ddp_step(net: torch.nn.Module, fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """``fn`` itself in one process; otherwise ``DistributedDataParallel(LossModule(net, fn))``
    (gradient averaging over the ranks in the backward pass; only the parameters that
    require a gradient now are registered: build it after freezing)."""
    if not is_distributed():
        return fn
    from torch.nn.parallel import DistributedDataParallel

    # buffers (BatchNorm running statistics) follow rank 0 at every forward; the keyword was
    # renamed in recent PyTorch versions
    sync = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters \
        else "broadcast_buffers"
    # device_ids=None: the inputs are already on this rank's device (no scatter)
    return DistributedDataParallel(LossModule(net, fn), device_ids=None, find_unused_parameters=False, **{sync: True})


# ----------------------------------------------------------------------------------------
# collectives
# ----------------------------------------------------------------------------------------
def all_reduce_sums(values) -> torch.Tensor:
    """Sum over the ranks of a tensor (or a list of numbers, as float64); returned on the
    device of the input (CPU for a list). A no-op in one process."""
    t = values if isinstance(values, torch.Tensor) else torch.tensor([float(v) for v in values], dtype=torch.float64)
    if not is_distributed():
        return t
    dev = t.device
    c = t.detach().to(_comm_device()).clone()
    torch.distributed.all_reduce(c, op=torch.distributed.ReduceOp.SUM)
    return c.to(dev)


def barrier() -> None:
    if is_distributed():
        torch.distributed.barrier()


def broadcast_object(obj: Any = None, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (``obj`` itself in one process)."""
    if not is_distributed():
        return obj
    box = [obj if rank() == src else None]
    torch.distributed.broadcast_object_list(box, src=src, device=_comm_device() if _comm_device().type == "cuda"
                                            else None)
    return box[0]


def rank0_call(fn: Callable[[], Any], long: bool = False) -> Any:
    """Run ``fn`` on rank 0 only and return its result on every rank; an exception of rank 0
    is raised on every rank (same class when it can be rebuilt from its message, so that
    user errors are reported alike). ``long``: the other ranks wait on the store without
    the process-group timeout (e.g. while rank 0 simulates a dataset)."""
    if not is_distributed():
        return fn()
    payload = None
    if rank() == 0:
        try:
            payload = ("ok", fn())
        except Exception as e:  # noqa: BLE001 - forwarded to every rank
            payload = ("error", e)
    if long and _STATE is not None:
        _STATE.calls += 1
        key = f"rank0_call/{_STATE.calls}"
        if rank() == 0:
            _STATE.store.set(key, b"1")
        else:
            _STATE.store.wait([key], _LONG_WAIT)
    kind, value = broadcast_object(_picklable(payload) if rank() == 0 else None)
    if kind == "ok":
        return value
    if isinstance(value, BaseException):
        raise value
    cls, msg = value
    raise cls(msg)


def _picklable(payload):
    kind, value = payload
    if kind == "ok":
        return payload
    try:
        pickle.loads(pickle.dumps(value))
        return payload
    except Exception:  # noqa: BLE001
        return ("error", (RuntimeError, f"rank 0: {type(value).__name__}: {value}"))


def sync_buffers(module: torch.nn.Module) -> None:
    """Broadcast rank 0's buffers (BatchNorm running statistics) to every rank."""
    if not is_distributed():
        return
    dev = _comm_device()
    for b in module.buffers():
        t = b.detach().to(dev)
        torch.distributed.broadcast(t, src=0)
        if t is not b:
            b.data.copy_(t.to(b.device))


def _rows(store, idx: torch.Tensor) -> torch.Tensor:
    return store[idx] if isinstance(store, torch.Tensor) else store.get(idx)


def _set_rows(store, idx: torch.Tensor, values: torch.Tensor) -> None:
    if isinstance(store, torch.Tensor):
        store[idx] = values.to(store.device, store.dtype)
    else:
        store.set(idx, values)


def allgather_shards(n: int, *stores, chunk_bytes: int = 64 * 2**20) -> None:
    """Every rank filled the rows ``rank, rank + W, ...`` (< ``n``) of each store (a tensor
    with ``n`` rows, or an object with ``get(idx)`` / ``set(idx, values)`` such as the
    sequential cache): exchange them so that every rank holds all ``n`` rows. Done in chunks
    of at most ``chunk_bytes`` per rank. ``None`` stores are skipped; a no-op in one
    process."""
    if not is_distributed() or n == 0:
        return
    w, r = world_size(), rank()
    per = -(-n // w)
    dev = _comm_device()
    for st in stores:
        if st is None:
            continue
        probe = _rows(st, torch.tensor([0]))
        row_shape, dtype = tuple(probe.shape[1:]), probe.dtype
        wire = torch.uint8 if dtype == torch.bool else dtype
        row_bytes = max(1, probe[0].numel() * probe.element_size())
        chunk = max(1, int(chunk_bytes // row_bytes))
        for p0 in range(0, per, chunk):
            p1 = min(per, p0 + chunk)
            mine = [r + w * p for p in range(p0, p1) if r + w * p < n]
            local = torch.zeros((p1 - p0,) + row_shape, dtype=wire)
            if mine:
                local[:len(mine)] = _rows(st, torch.tensor(mine)).to(wire)
            local = local.to(dev)
            parts = [torch.empty_like(local) for _ in range(w)]
            torch.distributed.all_gather(parts, local)
            for rr, part in enumerate(parts):
                if rr == r:
                    continue
                idx = [rr + w * p for p in range(p0, p1) if rr + w * p < n]
                if idx:
                    _set_rows(st, torch.tensor(idx), part[:len(idx)].cpu().to(dtype))


# ----------------------------------------------------------------------------------------
# test hook
# ----------------------------------------------------------------------------------------
def fault_callbacks() -> list[Callable[[str, dict], None]]:
    """Training callbacks for fault-injection tests, from ``FBSEM_TEST_FAULT``:
    ``exit:RANK:STEP`` makes rank RANK leave with ``os._exit(1)`` when it reaches optimiser
    step STEP, ``hang:RANK:STEP`` makes it sleep forever there. Empty when unset."""
    spec = os.environ.get(ENV_FAULT)
    if not spec:
        return []
    try:
        what, r, step = spec.split(":")
        r, step = int(r), int(step)
        if what not in ("exit", "hang"):
            raise ValueError
    except ValueError:
        raise UserError(f"{ENV_FAULT} must be 'exit:RANK:STEP' or 'hang:RANK:STEP', got {spec!r}") from None

    def cb(event: str, rec: dict) -> None:
        if event == "step" and rank() == r and int(rec.get("step", -1)) == step:
            print(f"{ENV_FAULT}: rank {r} {'exits' if what == 'exit' else 'hangs'} at step {step}",
                  file=sys.stderr, flush=True)
            if what == "exit":
                os._exit(1)
            import time

            while True:
                time.sleep(3600)

    return [cb]
