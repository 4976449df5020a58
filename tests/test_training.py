"""Trainers (end-to-end and sequential), checkpoints, resume, configuration errors.

Everything runs on tiny in-memory datasets (24 x 24 images, the ``tiny2d`` scanner) built
with the forward model and OSEM, so these tests do not depend on the simulation code."""

import json
import math
from pathlib import Path

import pytest
import torch

import fbsemlib as fb
from fbsemlib.training.checkpoint import atomic_torch_save, load_checkpoint
from fbsemlib.config import ConfigError, from_dict
from fbsemlib.data import PETBatch
from fbsemlib.models.fbsem import FBSEMNet, ModelConfig
from fbsemlib.physics.forward_model import PETForwardModel
from fbsemlib.training import (
    EndToEndTrainer,
    SequentialTrainer,
    TrainConfig,
    TrainingDiverged,
    TrainingError,
    epoch_permutation,
    load_trained,
    make_trainer,
    parse_model_section,
)


class TinyDataset(torch.utils.data.Dataset):
    """Items with exactly the keys of :class:`fbsemlib.data.dataset.PETDataset`."""

    def __init__(self, items, num_iterations, num_subsets):
        self.items, self.num_iterations, self.num_subsets = items, num_iterations, num_subsets

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


_PROJ = {}


def _projector():
    if "P" not in _PROJ:
        sino = fb.sinogram_preset("tiny2d")
        grid = fb.ImageGrid((1, 24, 24), (2.0, 6.0, 6.0))
        _PROJ["P"] = fb.Projector(sino, grid, backend="torch")
    return _PROJ["P"]


def make_dataset(n, its, subs, seed=0):
    P = _projector()
    g = torch.Generator().manual_seed(seed)
    items = []
    for i in range(n):
        x = torch.zeros(1, *P.in_shape)
        a, b = (int(v) for v in torch.randint(4, 10, (2,), generator=g))
        x[..., a:a + 9, b:b + 9] = 1.0 + float(torch.rand(1, generator=g))
        x[..., a + 3:a + 6, b + 3:b + 6] = 3.0
        mult = (torch.rand(1, *P.out_shape, generator=g) + 1.0) * 20
        add = torch.full((1, *P.out_shape), 6.0)
        fm = PETForwardModel(P, mult, add)
        ybar = fm.expected(x)
        y = torch.poisson(ybar, generator=g)
        _, iterates = fb.osem(fm, ybar, its, subs, return_iterates=True)
        ref = fb.osem(fm, ybar, 8, subs)
        items.append({"y": y, "multiplicative": mult, "additive": add, "mr": x.clone(),
                      "targets": torch.stack(iterates, 0), "target_final": ref, "activity": x,
                      "brain_mask": x > 0, "index": i})
    return TinyDataset(items, its, subs)


_DATA = {}


def data(its, subs, n=4, nval=2):
    key = (its, subs, n, nval)
    if key not in _DATA:
        _DATA[key] = (make_dataset(n, its, subs, seed=0), make_dataset(nval, its, subs, seed=1) if nval else None)
    return _DATA[key]


def make_net(its, subs, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(width=4, depth=2)
    cfg.update(kw)
    return FBSEMNet(_projector(), its, subs, ModelConfig(**cfg))


def cfg(**kw):
    d = dict(epochs=2, epochs_per_module=2, batch_size=2, lr=5e-3)
    d.update(kw)
    return TrainConfig(**d)


def states_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class Kill(Exception):
    pass


def killer(at_step):
    def cb(event, rec):
        if event == "step" and rec["step"] == at_step:
            raise Kill()
    return cb


# ----------------------------------------------------------------------------------------
# configuration
# ----------------------------------------------------------------------------------------
def test_config_errors():
    with pytest.raises(ConfigError, match="unknown key 'epoch'"):
        from_dict(TrainConfig, {"epoch": 3}, "train")
    with pytest.raises(ConfigError, match="train.epochs"):
        from_dict(TrainConfig, {"epochs": 0}, "train")
    with pytest.raises(ConfigError, match="train.epochs_per_module"):
        TrainConfig(epochs_per_module=0)
    with pytest.raises(ConfigError, match="train.lr"):
        from_dict(TrainConfig, {"lr": -1e-3}, "train")
    with pytest.raises(ConfigError, match="train.targets"):
        TrainConfig(targets="iterative")
    with pytest.raises(ConfigError, match="train.loss_weights"):
        TrainConfig(loss_weights=[1, -1])
    with pytest.raises(ConfigError, match="train.lr_schedule"):
        TrainConfig(lr_schedule="linear")
    with pytest.raises(ConfigError, match="train.cache"):
        TrainConfig(cache="ram")
    with pytest.raises(ConfigError, match="train.batch_size"):
        TrainConfig(batch_size=2.5)
    c = from_dict(TrainConfig, {"lr": "1e-3", "loss_weights": [1, 2], "lr_schedule": "cosine"}, "train")
    assert c.lr == 1e-3 and c.loss_weights == [1.0, 2.0]
    with pytest.raises(ConfigError, match="unknown key 'widht'"):
        parse_model_section({"widht": 3})
    mc, its, subs = parse_model_section({"width": 8, "num_iterations": 2})
    assert mc.width == 8 and its == 2 and subs is None
    with pytest.raises(ConfigError, match="model.depth"):
        parse_model_section({"depth": 1})


def test_model_data_mismatch_and_amp(tmp_path):
    ds, val = data(1, 2)
    with pytest.raises(ConfigError, match="K = 4 modules"):  # 2 iterations x 2 subsets, data has 1 x 2
        SequentialTrainer(make_net(2, 2), ds, val, cfg(), tmp_path)
    with pytest.raises(ConfigError, match="subsets"):
        EndToEndTrainer(make_net(2, 1), ds, val, cfg(), tmp_path)
    with pytest.raises(ConfigError, match="loss_weights has 3 values"):
        EndToEndTrainer(make_net(1, 2), ds, val, cfg(loss_weights=[1, 1, 1]), tmp_path)
    EndToEndTrainer(make_net(2, 1), ds, val, cfg(targets="final"), tmp_path)  # any K with the final target
    with pytest.raises(ConfigError, match="amp"):
        EndToEndTrainer(make_net(1, 2), ds, val, cfg(amp=True), tmp_path)


def test_epoch_permutation_deterministic():
    a = epoch_permutation(3, 1, 2, 10)
    assert a == epoch_permutation(3, 1, 2, 10) and sorted(a) == list(range(10))
    assert a != epoch_permutation(3, 1, 3, 10) or a != epoch_permutation(4, 1, 2, 10)


def test_trainers_load_typed_batches_of_what_they_read():
    from fbsemlib.training.loading import LoadedBatch, TrainingSamples, collate

    ds, _ = data(1, 2)
    item = TrainingSamples(ds, targets=1)[3]  # a sequential stage loads only its own target
    assert isinstance(item, LoadedBatch) and isinstance(item, PETBatch) and item.index == 3
    assert item.activity is None and item.brain_mask is None
    assert torch.equal(item.targets[0], ds[3]["targets"][1]) and item.targets.shape[0] == 1
    b = collate([TrainingSamples(ds, targets=None)[i] for i in (2, 0)])
    assert b.targets is None and b.index.dtype == torch.int64 and b.index.tolist() == [2, 0]
    assert torch.equal(b.y, torch.stack([ds[2]["y"], ds[0]["y"]]))
    b = collate([TrainingSamples(ds)[i] for i in range(2)])
    assert b.targets.shape[:2] == (2, ds[0]["targets"].shape[0]) and b.to("cpu").y.shape == b.y.shape


def test_dataset_items_must_be_samples(tmp_path):
    ds, _ = data(1, 2)
    items = [{k: v for k, v in ds[i].items() if k != "mr"} for i in range(len(ds))]
    with pytest.raises(TrainingError, match="training dataset's items are not samples.*mr"):
        EndToEndTrainer(make_net(1, 2), TinyDataset(items, 1, 2), None, cfg(), tmp_path)
    with pytest.raises(ConfigError, match="unknown training mode"):
        make_trainer("greedy", make_net(1, 2), ds)


def test_logged_nrmse_is_the_relative_error_of_the_whole_image():
    """The trainers' ``nrmse`` is ``||x - t|| / ||t||`` as a fraction: the value of
    ``metrics.nrmse(percent=False)`` without a mask, computed as ``sqrt(d / n)`` (the numbers
    of every training log), not ``sqrt(d) / sqrt(n)``."""
    from fbsemlib.training.base import relative_error

    g = torch.Generator().manual_seed(0)
    x, t = torch.rand(3, 1, 1, 8, 8, generator=g), torch.rand(3, 1, 1, 8, 8, generator=g) + 0.5
    e = relative_error(x, t)
    assert e.shape == (3,) and torch.allclose(e.double(), fb.metrics.nrmse(x, t, percent=False).flatten().double(), rtol=1e-6)
    assert torch.equal(relative_error(t, t), torch.zeros(3))


# ----------------------------------------------------------------------------------------
# sequential training: isolation of the modules, caches
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("shared", [False, True])
def test_sequential_freezes_other_modules_and_caches_are_exact(tmp_path, shared):
    its, subs = 1, 3
    ds, val = data(its, subs)
    net = make_net(its, subs, shared=shared)
    K = net.num_modules
    snap = {}  # state of every module at the end of each stage
    checks = {"steps": 0, "cache": 0}

    def module_state(j):
        i = net.net_index(j)
        return {**{k: v.clone() for k, v in net.regularisers[i].state_dict().items()},
                "rho": net.rho.detach()[i].clone()}

    trainer = SequentialTrainer(net, ds, val, cfg(epochs_per_module=2), tmp_path, progress=False)

    def cb(event, rec):
        if event == "step":
            k = rec["stage"]
            checks["steps"] += 1
            if not shared:
                for j in range(K):
                    params = list(net.regularisers[j].parameters())
                    if j != k:
                        # no gradient computed for (nor flowing into) the other modules
                        assert all(p.grad is None and not p.requires_grad for p in params)
                for j in range(k):
                    assert states_equal(module_state(j), snap[j])
        elif event == "stage":
            k = rec["stage"]
            snap[k] = module_state(k)
            kk, X = trainer.cached_inputs("train")
            if k + 1 < K:
                assert kk == k + 1
                # recompute the inputs of stage k+1 by running modules 0..k again (eval mode)
                net.eval()
                with torch.no_grad():
                    b = PETBatch.from_mapping(torch.utils.data.default_collate([ds[i] for i in range(len(ds))]))
                    ctx = net.prepare(b.y, b.multiplicative, b.additive, b.mr)
                    ref = net.run(ctx, modules=range(k + 1))
                assert torch.allclose(X, ref, rtol=1e-5, atol=1e-6)
                # the cached per-sample context of the next module equals prepare()'s
                idx = torch.arange(len(ds))
                light = trainer._context(b, idx, k + 1, "train")
                with torch.no_grad():
                    assert torch.equal(net.step(k + 1, X, light), net.step(k + 1, X, ctx))
                checks["cache"] += 1

    trainer.callbacks.append(cb)
    trainer.fit()
    assert checks["steps"] == K * 2 * 2 and checks["cache"] == K - 1
    if not shared:
        for j in range(K):  # modules trained in stage j are never touched afterwards
            assert states_equal(module_state(j), snap[j])
    stages = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert sum(r["kind"] == "stage" for r in stages) == K


@pytest.mark.parametrize("how", ["previous", "fresh"])
def test_stage_init_previous_starts_each_module_from_the_previous_one(tmp_path, how):
    """train.stage_init: "previous" starts stage k with module k-1's trained CNN and rho. With
    a vanishing learning rate a stage leaves its start (almost) unchanged, so all modules
    then equal module 0; "fresh" modules keep their different random inits."""
    its, subs = 1, 3
    ds, val = data(its, subs)
    net = make_net(its, subs)
    tr = SequentialTrainer(net, ds, val, cfg(lr=1e-12, epochs_per_module=1, stage_init=how), tmp_path, progress=False)
    m = tr.fit()
    p0 = [p.detach() for p in net.regularisers[0].parameters()]
    for k in range(1, net.num_modules):
        pk = [p.detach() for p in net.regularisers[k].parameters()]
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(p0, pk)) == (how == "previous")
        if how == "previous":
            assert torch.allclose(net.rho[k], net.rho[0])
    assert [s["init"] for s in m["stages"]] == ["fresh"] + [how] * (net.num_modules - 1)


def test_stage_init_best_picks_the_start_with_the_lower_loss(tmp_path, monkeypatch):
    """"best" compares the stage loss of both starts on the training inputs, keeps the lower
    one (and logs it), and leaves BatchNorm running statistics untouched."""
    its, subs = 1, 3
    ds, val = data(its, subs)
    net = make_net(its, subs)
    tr = SequentialTrainer(net, ds, val, cfg(stage_init="best"), tmp_path, progress=False)
    seen = []
    orig = SequentialTrainer._start_loss

    def spy(self, k):
        before = {n: v.clone() for n, v in self.model.regularisers[k].state_dict().items()}
        loss = orig(self, k)
        after = self.model.regularisers[k].state_dict()
        assert all(torch.equal(before[n], after[n]) for n in before)  # nothing changed
        seen.append((k, loss))
        return loss

    monkeypatch.setattr(SequentialTrainer, "_start_loss", spy)
    m = tr.fit()
    K = net.num_modules
    assert [k for k, _ in seen] == [k for k in range(1, K) for _ in range(2)]  # previous, then fresh
    for k in range(1, K):
        l_prev, l_fresh = seen[2 * (k - 1)][1], seen[2 * (k - 1) + 1][1]
        assert m["stages"][k]["init"] == ("previous" if l_prev < l_fresh else "fresh")
    assert m["stages"][0]["init"] == "fresh"


def test_disk_cache_equals_memory_cache(tmp_path):
    ds, val = data(1, 2)
    outs = []
    for where in ("memory", "disk"):
        net = make_net(1, 2)
        seen = []

        def cb(event, rec, seen=seen):
            if event == "step" and rec["step"] == 1:
                seen.append((tmp_path / where / "cache").exists())

        tr = SequentialTrainer(net, ds, val, cfg(cache=where), tmp_path / where, progress=False, callbacks=[cb])
        m = tr.fit()
        assert m["cache"] == where and seen == [where == "disk"]
        assert not (tmp_path / where / "cache").exists()  # removed at the end
        outs.append(net.state_dict())
    assert states_equal(*outs)


# ----------------------------------------------------------------------------------------
# both trainers learn; K = 1 equivalence
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["end-to-end", "sequential"])
def test_overfits_tiny_dataset(tmp_path, mode):
    ds, _ = data(1, 2, n=2, nval=0)
    net = make_net(1, 2, width=8, depth=3, batch_norm=False)
    Trainer = EndToEndTrainer if mode == "end-to-end" else SequentialTrainer
    c = cfg(epochs=40, epochs_per_module=20, batch_size=2, lr=1e-2)
    tr = Trainer(net, ds, None, c, tmp_path, progress=False)
    before = tr.evaluate(ds)["loss"]
    m = tr.fit()
    assert m["train_eval"]["loss"] < 0.2 * before, (before, m["train_eval"])
    assert (tmp_path / "metrics.json").exists() and (tmp_path / "log_steps.csv").exists()


def test_end_to_end_equals_sequential_for_one_module(tmp_path):
    ds, val = data(1, 1)
    states = []
    for Trainer in (EndToEndTrainer, SequentialTrainer):
        net = make_net(1, 1, seed=3)
        # the same updates (BatchNorm statistics included: end-to-end's recalibration off)
        Trainer(net, ds, val, cfg(epochs=3, epochs_per_module=3, bn_recalibration=False), tmp_path / Trainer.mode,
                progress=False).fit()
        states.append(net.state_dict())
    assert states_equal(*states)


def test_end_to_end_recalibrates_batch_norm(tmp_path):
    ds, val = data(2, 1)
    runs = {}
    for recal in (False, True):
        net = make_net(2, 1, seed=3)
        m = EndToEndTrainer(net, ds, val, cfg(epochs=1, bn_recalibration=recal), tmp_path / str(recal),
                            progress=False).fit()
        runs[recal] = (net.state_dict(), m)
    (s0, m0), (s1, m1) = runs[False], runs[True]
    bn = [k for k in s0 if k.endswith("running_mean")]
    assert bn and any(not torch.equal(s0[k], s1[k]) for k in bn)  # the statistics changed ...
    assert all(torch.equal(s0[k], s1[k]) for k in s0 if k.endswith("weight"))  # ... the weights did not


# ----------------------------------------------------------------------------------------
# checkpoints and resume
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode,shared,kill_at", [
    ("end-to-end", False, 5),  # mid-epoch 3 (2 steps per epoch)
    ("sequential", False, 7),  # stage 2, mid-epoch 2
    ("sequential", False, 4),  # the last step of stage 1 (killed before the stage-end checkpoint)
    ("sequential", True, 6),
])
def test_resume_reproduces_uninterrupted_run(tmp_path, mode, shared, kill_at):
    its, subs = 1, 3
    ds, val = data(its, subs)
    Trainer = EndToEndTrainer if mode == "end-to-end" else SequentialTrainer
    c = cfg(epochs=4, epochs_per_module=2, lr_schedule="cosine", early_stopping_patience=5)

    ref = make_net(its, subs, shared=shared)
    Trainer(ref, ds, val, c, tmp_path / "a", progress=False).fit()

    net = make_net(its, subs, shared=shared)
    with pytest.raises(Kill):
        Trainer(net, ds, val, c, tmp_path / "b", progress=False, callbacks=[killer(kill_at)]).fit()
    assert (tmp_path / "b" / "checkpoint.pt").exists() and not (tmp_path / "b" / "model.pt").exists()
    with pytest.raises(TrainingError, match="already holds"):
        Trainer(make_net(its, subs, shared=shared), ds, val, c, tmp_path / "b", progress=False).fit()
    resumed = make_net(its, subs, seed=99, shared=shared)  # other initial weights: the checkpoint's win
    m = Trainer(resumed, ds, val, c, tmp_path / "b", progress=False).fit(resume=True)
    assert states_equal(ref.state_dict(), resumed.state_dict())
    for name in ("log_steps.csv", "log_epochs.csv"):
        a = (tmp_path / "a" / name).read_text().splitlines()
        b = (tmp_path / "b" / name).read_text().splitlines()
        assert len(a) == len(b)
    assert m["steps"] == json.loads((tmp_path / "a" / "metrics.json").read_text())["steps"]
    # the trained model loads back
    loaded, configs = load_trained(tmp_path / "b")
    assert states_equal(loaded.state_dict(), ref.state_dict())
    assert configs["mode"] == mode and configs["model"].shared == shared
    # resuming a finished run returns its metrics
    again = Trainer(make_net(its, subs, shared=shared), ds, val, c, tmp_path / "b", progress=False).fit(resume=True)
    assert again["steps"] == m["steps"]


def test_resume_refuses_a_different_configuration(tmp_path):
    ds, val = data(1, 2)
    c = cfg(epochs=2)
    with pytest.raises(Kill):
        EndToEndTrainer(make_net(1, 2), ds, val, c, tmp_path, progress=False, callbacks=[killer(3)]).fit()
    with pytest.raises(TrainingError, match=r"train\.lr: checkpoint 0\.005, now 0\.001"):
        EndToEndTrainer(make_net(1, 2), ds, val, cfg(epochs=2, lr=1e-3), tmp_path, progress=False).fit(resume=True)
    with pytest.raises(TrainingError, match="model.width"):
        EndToEndTrainer(make_net(1, 2, width=6), ds, val, c, tmp_path, progress=False).fit(resume=True)
    with pytest.raises(TrainingError, match="mode"):
        SequentialTrainer(make_net(1, 2), ds, val, c, tmp_path, progress=False).fit(resume=True)
    ds2, val2 = data(1, 2, n=3)
    with pytest.raises(TrainingError, match="dataset_sizes.train"):
        EndToEndTrainer(make_net(1, 2), ds2, val2, c, tmp_path, progress=False).fit(resume=True)
    # harmless settings may change
    EndToEndTrainer(make_net(1, 2), ds, val, cfg(epochs=2, checkpoint_every=5), tmp_path, progress=False).fit(resume=True)


def test_atomic_checkpoint_never_replaced_by_a_partial_file(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    good = {"w": torch.arange(5.0), "step": 3}
    atomic_torch_save(good, path)

    import fbsemlib.training.checkpoint as ck

    real_save = torch.save

    def crashing_save(obj, f, *a, **k):
        f.write(b"PK\x03\x04 partial garbage")
        raise OSError("disk full")

    monkeypatch.setattr(ck.torch, "save", crashing_save)
    with pytest.raises(OSError, match="disk full"):
        atomic_torch_save({"w": torch.zeros(5), "step": 4}, path)
    monkeypatch.setattr(ck.torch, "save", real_save)
    back = load_checkpoint(path)
    assert torch.equal(back["w"], good["w"]) and back["step"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]  # temp file removed
    # a temp file left by a hard kill is ignored
    (tmp_path / ".checkpoint.pt.tmp-dead").write_bytes(b"partial")
    assert load_checkpoint(path)["step"] == 3


def test_nan_stops_training_and_keeps_last_good_checkpoint(tmp_path):
    ds, val = data(1, 2)
    net = make_net(1, 2)

    def poison(event, rec):
        if event == "step" and rec["step"] == 3:  # after the epoch-1 checkpoint
            with torch.no_grad():
                net.rho.fill_(float("nan"))

    with pytest.raises(TrainingDiverged, match="NaN|nan"):
        EndToEndTrainer(net, ds, val, cfg(epochs=3), tmp_path, progress=False, callbacks=[poison]).fit()
    ck = load_checkpoint(tmp_path / "checkpoint.pt")
    assert ck["counters"]["epoch"] == 1 and bool(torch.isfinite(ck["model_state"]["rho"]).all())
    assert not (tmp_path / "model.pt").exists()
    # NaN in the data: stopped at the first step
    bad = TinyDataset([dict(it) for it in ds.items], 1, 2)
    bad.items[1]["target_final"] = bad.items[1]["target_final"] * float("nan")
    with pytest.raises(TrainingDiverged, match="loss is nan"):
        SequentialTrainer(make_net(1, 2), bad, None, cfg(targets="final"), tmp_path / "s", progress=False).fit()


def test_logs_and_metrics(tmp_path):
    ds, val = data(1, 2)
    net = make_net(1, 2)
    m = SequentialTrainer(net, ds, val, cfg(tensorboard=True), tmp_path, progress=False).fit()
    for key in ("final_train_loss", "final_val_loss", "train_time_s", "gammas", "stages", "val_eval"):
        assert key in m
    assert len(m["gammas"]) == 2 and m["peak_memory_mb"] is None
    rows = (tmp_path / "log_epochs.csv").read_text().splitlines()
    assert rows[0].startswith("mode,stage,epoch") and len(rows) == 1 + 2 * 2
    assert (tmp_path / "config.yaml").exists()
    recs = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert {r["kind"] for r in recs} == {"step", "epoch", "stage"}
    assert all(len(r["gammas"]) == 2 for r in recs if r["kind"] == "epoch")


# ----------------------------------------------------------------------------------------
# CLI errors
# ----------------------------------------------------------------------------------------
def test_cli_train_errors(tmp_path, capsys):
    from fbsemlib.cli import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epochs: 0\n")
    assert main(["train", "--config", str(bad), "--data", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "train.epochs" in capsys.readouterr().err
    bad.write_text("model:\n  widht: 3\n")
    assert main(["train", "--config", str(bad), "--data", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "widht" in capsys.readouterr().err
    ok = tmp_path / "ok.yaml"
    ok.write_text("train:\n  epochs: 1\n")
    assert main(["train", "--config", str(ok), "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["train", "--config", str(ok), "--data", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "manifest" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_train_on_the_smoke_dataset(smoke_dataset, tmp_path, capsys):
    """`fbsem train` end to end on the simulated smoke data (session fixture, shared with other
    test files), resume, refusal, load_trained + reconstruction."""
    from fbsemlib.cli import main

    repo = Path(__file__).resolve().parents[1]
    cfg_path = repo / "data" / "smoke.yaml"
    out = tmp_path / "e2e"
    args = ["train", "--config", str(cfg_path), "--data", str(smoke_dataset), "--out", str(out), "--mode",
            "end-to-end", "--seed", "1", "--no-progress"]
    assert main(args) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["mode"] == "end-to-end" and m["num_modules"] == 8 and m["val_eval"] is not None
    net, configs = load_trained(out)
    assert configs["train"].seed == 1 and configs["data"]["recipe"]["name"] == "smoke"
    assert main(args + ["--resume"]) == 0  # finished: nothing to do
    assert main(args) == 2  # the folder already holds a run
    assert "already holds" in capsys.readouterr().err
    changed = tmp_path / "changed.yaml"
    changed.write_text(cfg_path.read_text().replace("  lr: 3.0e-3", "  lr: 1.0e-2"))
    assert main(["train", "--config", str(changed), "--data", str(smoke_dataset), "--out", str(out), "--mode",
                 "end-to-end", "--seed", "1", "--resume", "--no-progress"]) == 2
    assert "train.lr" in capsys.readouterr().err
    # the trained model loads and reconstructs
    net, configs = load_trained(out)
    assert configs["mode"] == "end-to-end" and net.num_modules == 8
    from fbsemlib.data import PETDataset

    ds = PETDataset(smoke_dataset, "test", checksums=False)
    b = torch.utils.data.default_collate([ds[0]])
    with torch.no_grad():
        x = net(b["y"], b["multiplicative"], b["additive"], b["mr"])
    assert x.shape == b["target_final"].shape and bool(torch.isfinite(x).all())


def test_memory_cache_that_does_not_fit_is_refused_before_training(tmp_path, monkeypatch):
    """``cache: memory`` is checked against the memory available before any stage runs; ``auto``
    falls back to disk in the same situation."""
    from fbsemlib.errors import UserError
    from fbsemlib.training import sequential

    monkeypatch.setattr(sequential, "available_memory_bytes", lambda: 1024)
    ds, val = data(1, 2)
    tr = SequentialTrainer(make_net(1, 2), ds, val, cfg(cache="memory"), tmp_path / "memory", progress=False)
    with pytest.raises(UserError, match=r"cache: memory needs .* GiB .* available; use cache: disk or auto"):
        tr.fit()
    assert not (tmp_path / "memory" / "model.pt").exists()
    m = SequentialTrainer(make_net(1, 2), ds, val, cfg(cache="auto"), tmp_path / "auto", progress=False).fit()
    assert m["cache"] == "disk"


@pytest.mark.parametrize("mode", ["end-to-end", "sequential"])
def test_checkpoint_selection_by_validation_nrmse_to_the_phantom(tmp_path, mode):
    """checkpoint_selection: validation keeps the weights (end-to-end: of the run; sequential:
    of the last stage) whose final image had the lowest validation NRMSE to the phantom, the
    criterion of the baselines' strengths; "last" keeps the last epoch's."""
    ds, val = data(1, 2)
    Trainer = EndToEndTrainer if mode == "end-to-end" else SequentialTrainer
    net = make_net(1, 2, seed=5)
    c = cfg(epochs=4, epochs_per_module=4, lr=3e-2, checkpoint_selection="validation", bn_recalibration=False)
    tr = Trainer(net, ds, val, c, tmp_path, progress=False)
    m = tr.fit()
    last = 0 if mode == "end-to-end" else 1  # the stage that makes the final image
    errs = [h["val_nrmse_phantom"] for h in tr.history if h.get("kind") == "epoch" and h.get("stage") == last]
    assert len(errs) == 4 and all(math.isfinite(e) for e in errs) and len(set(errs)) > 1
    assert m["val_eval"]["nrmse_phantom"] == pytest.approx(min(errs), rel=1e-5)
    with pytest.raises(ValueError, match="checkpoint_selection"):
        cfg(checkpoint_selection="best")
