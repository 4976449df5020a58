import pytest
import torch

import fbsemlib as fb
from markers import requires_cuda
from fbsemlib.models.fbsem import FBSEMNet, ModelConfig
from fbsemlib.models.losses import relative_mse, target_weights, unrolled_loss
from fbsemlib.physics.forward_model import PETForwardModel


def _problem(three_d=False, B=2, seed=0):
    torch.manual_seed(seed)
    if three_d:
        sino = fb.sinogram_preset("small3d", num_rings=4, max_ring_difference=1)
        grid = fb.ImageGrid((4, 24, 24), (4.0, 8.0, 8.0))
    else:
        sino = fb.sinogram_preset("tiny2d")
        grid = fb.ImageGrid((1, 24, 24), (2.0, 6.0, 6.0))
    P = fb.Projector(sino, grid, backend="torch")
    x = torch.zeros(B, 1, *grid.shape)
    x[..., 6:18, 6:18] = 1.0
    x[..., 9:12, 9:12] = 3.0
    mr = x.clone()
    mult = torch.rand(B, 1, *P.out_shape) + 1.0
    add = torch.full((B, 1, *P.out_shape), 0.3)
    fm = PETForwardModel(P, mult, add)
    ybar = fm.expected(x)
    y = torch.poisson(ybar)
    return P, fm, x, mr, mult, add, ybar, y


def test_tiny_gamma_gives_osem_iterates():
    P, fm, x, mr, mult, add, ybar, y = _problem()
    net = FBSEMNet(P, 2, 3, ModelConfig(width=4, depth=2))
    with torch.no_grad():
        net.rho.fill_(-80.0)
    net.eval()
    with torch.no_grad():
        outs = net(y, mult, add, mr, return_all=True)
    _, its = fb.osem(fm, y, 2, 3, return_iterates=True)
    assert len(outs) == 6
    for o, t in zip(outs, its):
        assert torch.allclose(o, t, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("three_d", [False, True])
@pytest.mark.parametrize("shared", [False, True])
def test_shapes_and_parameters(three_d, shared):
    P, fm, x, mr, mult, add, ybar, y = _problem(three_d)
    cfg = ModelConfig(width=4, depth=3, shared=shared)
    net = FBSEMNet(P, 2, 2, cfg)
    out = net(y, mult, add, mr)
    assert out.shape == x.shape and float(out.detach().min()) >= 0
    assert len(net.regularisers) == (1 if shared else 4)
    assert net.rho.numel() == (1 if shared else 4)
    assert net.dims == (3 if three_d else 2)


def test_checkpointing_gives_same_gradients():
    P, fm, x, mr, mult, add, ybar, y = _problem()
    torch.manual_seed(1)
    net = FBSEMNet(P, 1, 3, ModelConfig(width=4, depth=3, batch_norm=False))
    _, its = fb.osem(fm, ybar, 1, 3, return_iterates=True)
    targets = torch.stack(its, 1)
    grads = []
    for ckpt in (False, True):
        net.zero_grad()
        loss = unrolled_loss(net(y, mult, add, mr, return_all=True, checkpoint=ckpt), targets)
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in net.parameters() if p.grad is not None]))
    assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def test_detach_em_options_same_forward_different_graph():
    P, fm, x, mr, mult, add, ybar, y = _problem(B=1)
    torch.manual_seed(2)
    a = FBSEMNet(P, 1, 2, ModelConfig(width=4, depth=2, detach_em=True, batch_norm=False))
    b = FBSEMNet(P, 1, 2, ModelConfig(width=4, depth=2, detach_em=False, batch_norm=False))
    b.load_state_dict(a.state_dict())
    x0 = torch.ones_like(x).requires_grad_(True)
    oa = a(y, mult, add, mr, x0=x0)
    ob = b(y, mult, add, mr, x0=x0)
    assert torch.allclose(oa, ob, rtol=1e-5, atol=1e-6)
    ga, = torch.autograd.grad(oa.sum(), x0)
    gb, = torch.autograd.grad(ob.sum(), x0)
    assert not torch.allclose(ga, gb)  # the EM path contributes only when not detached


def test_training_reduces_loss():
    P, fm, x, mr, mult, add, ybar, y = _problem()
    torch.manual_seed(0)
    net = FBSEMNet(P, 1, 2, ModelConfig(width=8, depth=3))
    _, its = fb.osem(fm, ybar, 1, 2, return_iterates=True)
    targets = torch.stack(its, 1)
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    losses = []
    for _ in range(25):
        loss = unrolled_loss(net(y, mult, add, mr, return_all=True), targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.3 * losses[0]


def test_losses_and_weights():
    assert torch.allclose(target_weights(4, "uniform"), torch.full((4,), 0.25))
    assert torch.allclose(target_weights(3, "last"), torch.tensor([0.0, 0.0, 1.0]))
    assert torch.allclose(target_weights(2, [1, 3]), torch.tensor([0.25, 0.75]))
    with pytest.raises(ValueError, match="unknown loss weighting"):
        target_weights(3, "cubic")
    with pytest.raises(ValueError, match="non-negative"):
        target_weights(2, [1, -1])
    t = torch.rand(2, 1, 1, 8, 8)
    assert float(relative_mse(t * 1.1, t)) == pytest.approx(0.01, rel=1e-4)
    with pytest.raises(ValueError, match="targets"):
        unrolled_loss([t, t], torch.stack([t], 1))


def test_bad_inputs():
    P, fm, x, mr, mult, add, ybar, y = _problem()
    with pytest.raises(ValueError, match="model.depth"):
        ModelConfig(depth=1)
    with pytest.raises(ValueError, match="kernel_size"):
        ModelConfig(kernel_size=4)
    with pytest.raises(ValueError, match="num_subsets"):
        FBSEMNet(P, 1, 0)
    net = FBSEMNet(P, 1, 2, ModelConfig(width=4, depth=2))
    with pytest.raises(ValueError, match="y must have shape"):
        net(y[:, 0], mult, add, mr)
    with pytest.raises(ValueError, match="mr is None"):
        net(y, mult, add, None)
    with pytest.raises(ValueError, match="mr must have shape"):
        net(y, mult, add, mr[..., :5])


def test_to_moves_the_projector_with_the_parameters():
    P, fm, x, mr, mult, add, ybar, y = _problem(B=1)
    torch.manual_seed(3)
    net = FBSEMNet(P, 1, 2, ModelConfig(width=4, depth=2, batch_norm=False))
    assert net.to("cpu") is net and net.projector is P  # already there: the same projector
    net.cpu()
    assert net.projector is P and net.subset_model(1).projector is P.subset(1, 2)
    out32 = net(y, mult, add, mr)
    net.to(torch.float64)  # the projector works in every float dtype: it stays
    assert net.projector is P and net.rho.dtype == torch.float64
    out64 = net(y.double(), mult.double(), add.double(), mr.double())
    assert out64.dtype == torch.float64 and torch.allclose(out64.float(), out32, rtol=1e-4, atol=1e-5)
    net.float()
    assert torch.equal(net(y, mult, add, mr), out32)


@requires_cuda
@pytest.mark.cuda
def test_cuda_round_trip_moves_the_projector():
    P, fm, x, mr, mult, add, ybar, y = _problem(B=1)
    torch.manual_seed(3)
    net = FBSEMNet(P, 1, 2, ModelConfig(width=4, depth=2, batch_norm=False))
    with torch.no_grad():
        ref = net(y, mult, add, mr)
    net.cuda()
    assert net.projector.device.type == "cuda" and net.subset_model(0).projector.device.type == "cuda"
    Pc = net.projector
    net.to("cuda")
    assert net.projector is Pc  # no rebuild when it is already there
    with torch.no_grad():
        out = net(y.cuda(), mult.cuda(), add.cuda(), mr.cuda())
    assert out.device.type == "cuda" and torch.allclose(out.cpu(), ref, rtol=1e-4, atol=1e-5)
    net.to("cpu")
    assert net.projector.device.type == "cpu"
    with torch.no_grad():
        assert torch.allclose(net(y, mult, add, mr), ref, rtol=1e-6, atol=1e-7)


def test_batch_norm_recalibration_matches_eval_mode_inputs():
    """After recalibration, module k's first BatchNorm holds the mean / variance of its
    inputs over the training batches, computed with modules 0..k-1 in eval mode; a shared
    network is left alone."""
    from types import SimpleNamespace

    from fbsemlib.training.batchnorm import batch_norm_layers, recalibrate_batch_norm

    P, fm, x, mr, mult, add, ybar, y = _problem(B=2)
    net = FBSEMNet(P, 1, 3, ModelConfig(width=4, depth=3, gamma_init=1.0))
    for m in batch_norm_layers(net):  # statistics that have nothing to do with the data
        m.running_mean.fill_(5.0)
        m.running_var.fill_(9.0)
    batches = [SimpleNamespace(y=y[i:i + 1], multiplicative=mult[i:i + 1], additive=add[i:i + 1], mr=mr[i:i + 1])
               for i in range(2)]
    assert recalibrate_batch_norm(net, batches) == 3
    assert not net.training
    seen = {}
    hooks = [batch_norm_layers(net.regularisers[k])[0].register_forward_hook(
        lambda mod, inp, out, k=k: seen.setdefault(k, []).append(inp[0].detach())) for k in range(3)]
    with torch.no_grad():
        for b in batches:
            net(b.y, b.multiplicative, b.additive, b.mr)
    for h in hooks:
        h.remove()
    for k in range(3):
        bn = batch_norm_layers(net.regularisers[k])[0]
        means = torch.stack([t.mean(dim=(0, 2, 3)) for t in seen[k]]).mean(0)  # cumulative average of batch means
        torch.testing.assert_close(bn.running_mean, means, rtol=1e-4, atol=1e-5)
        assert bn.momentum == 0.1  # restored
    # a second recalibration changes nothing; a shared network is not touched
    before = [m.running_mean.clone() for m in batch_norm_layers(net)]
    recalibrate_batch_norm(net, batches)
    for b, m in zip(before, batch_norm_layers(net)):
        torch.testing.assert_close(m.running_mean, b)
    shared = FBSEMNet(P, 1, 3, ModelConfig(width=4, depth=3, shared=True))
    assert recalibrate_batch_norm(shared, batches) == 0
