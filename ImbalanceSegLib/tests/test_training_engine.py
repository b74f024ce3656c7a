"""The CPU training path computes the bundled U-Nets' logits and gradients like their module, or
declines and leaves the module to run.

Tolerances (relative to the largest absolute value of the reference tensor):

* each function against PyTorch's own operator in float64: 2e-5 (float32 rounding);
* a whole network against its module, for the logits, the loss, the input gradient and the
  gradient of every parameter: 1e-4. These comparisons use leaky ReLU slope 1 (see
  :func:`imbalanceseglib.training_engine.gradient_agreement`): with the real slope a
  pre-activation within rounding of 0 may take the other branch in either path, which moves
  the gradients passing through it by per cents on small patches. With the real slope (0.01)
  the network is compared with its module in float64: no worse than 2e-4 there, and no
  worse than the float32 module's own error, times 3;
* a short training run (``train``, AdamW) against the same run through the module: the loss
  of every logged iteration within 1e-4, the weights within 1e-3 of the distance they moved.
"""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from imbalanceseglib import training_engine as te
from imbalanceseglib.bundle import load_bundle
from imbalanceseglib.losses import build_loss
from imbalanceseglib.networks import UNet3D, UNet3DEnsemble, set_activation_checkpointing
from imbalanceseglib.training import TrainConfig, make_case, train
from imbalanceseglib.training_engine import (ENV_VAR, TrainingPath, gradient_agreement, training_forward,
                                             unsupported_reason)

from libtest_helpers import CLASSES, sphere_case

pytestmark = pytest.mark.skipif(unsupported_reason(UNet3D(1, 2, [4, 8])) is not None,
                                reason="the CPU training path does not run on this machine")

CL = torch.channels_last_3d


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)


def _rel(got, ref):
    got, ref = got.detach().double(), ref.detach().double()
    return float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


# --------------------------------------------------------------------------- each function


def _conv_case(n, cin, cout, shape, stride, x_grad=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cin, *shape, generator=gen)
    w = torch.randn(cout, cin, 3, 3, 3, generator=gen) * 0.2
    out = [(s + 2 - 3) // stride + 1 for s in shape]
    gy = torch.randn(n, cout, *out, generator=gen)
    ref_x = x.double().requires_grad_(x_grad)
    ref_w = w.double().requires_grad_()
    ref = F.conv3d(ref_x, ref_w, None, stride, 1)
    ref.backward(gy.double())
    xi = x.contiguous(memory_format=CL).requires_grad_(x_grad)
    wi = w.clone().requires_grad_()
    got = te._Conv3.apply(xi, wi, stride)
    got.backward(gy)
    assert got.shape == ref.shape
    assert _rel(got, ref) < 2e-5
    assert _rel(wi.grad, ref_w.grad) < 2e-5
    assert wi.grad.is_contiguous()
    if x_grad:
        assert xi.grad.shape == x.shape
        assert _rel(xi.grad, ref_x.grad) < 2e-5
    else:
        assert xi.grad is None


@pytest.mark.parametrize("n,cin,cout,shape,stride", [
    (1, 1, 4, (8, 12, 8), 1),      # one patch, small: the weight gradient in two halves
    (1, 4, 8, (6, 10, 8), 2),      # stride 2, 3 output rows: an odd half padded with a zero row
    (1, 4, 8, (5, 7, 6), 2),       # odd input sizes (no output padding on those axes)
    (1, 3, 5, (5, 4, 6), 1),       # odd rows at stride 1
    (1, 4, 4, (2, 4, 4), 2),       # one output row: the second half is empty
    (1, 32, 8, (28, 24, 4), 1),    # one patch above PyTorch's size threshold: its own oneDNN backward
    (2, 4, 8, (8, 12, 8), 2),      # a batch: PyTorch's oneDNN backward
    (3, 2, 4, (6, 6, 10), 1),
])
def test_convolution_and_its_gradients_equal_pytorchs(n, cin, cout, shape, stride):
    _conv_case(n, cin, cout, shape, stride)


def test_convolution_of_an_input_without_gradient_gives_only_the_weight_gradient():
    _conv_case(1, 1, 4, (8, 8, 8), 1, x_grad=False)
    _conv_case(2, 1, 4, (8, 8, 8), 1, x_grad=False)


@pytest.mark.parametrize("n", [1, 2])
def test_upsampling_and_head_and_their_gradients_equal_pytorchs(n):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n, 6, 3, 5, 4, generator=gen)
    w = torch.randn(6, 4, 2, 2, 2, generator=gen)
    gy = torch.randn(n, 4, 6, 10, 8, generator=gen)
    rx, rw = x.double().requires_grad_(), w.double().requires_grad_()
    ref = F.conv_transpose3d(rx, rw, None, 2)
    ref.backward(gy.double())
    xi, wi = x.contiguous(memory_format=CL).requires_grad_(), w.clone().requires_grad_()
    got = te._Up2.apply(xi, wi)
    got.backward(gy)
    for a, b in ((got, ref), (xi.grad, rx.grad), (wi.grad, rw.grad)):
        assert a.shape == b.shape and _rel(a, b) < 2e-5

    x = torch.randn(n, 5, 4, 6, 3, generator=gen)
    w, b = torch.randn(3, 5, 1, 1, 1, generator=gen), torch.randn(3, generator=gen)
    gy = torch.randn(n, 3, 4, 6, 3, generator=gen)
    rx, rw, rb = x.double().requires_grad_(), w.double().requires_grad_(), b.double().requires_grad_()
    ref = F.conv3d(rx, rw, rb)
    ref.backward(gy.double())
    xi, wi, bi = x.contiguous(memory_format=CL).requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_()
    got = te._Head.apply(xi, wi, bi)
    got.backward(gy)
    for a, r in ((got, ref), (xi.grad, rx.grad), (wi.grad, rw.grad), (bi.grad, rb.grad)):
        assert a.shape == r.shape and _rel(a, r) < 2e-5


@pytest.mark.parametrize("n,c,shape", [(1, 16, (40, 56, 40)), (2, 4, (6, 10, 8)), (3, 8, (3, 1, 2))])
def test_norm_and_activation_and_their_gradients_equal_pytorchs(n, c, shape):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(n, c, *shape, generator=gen) * 2 + 1  # an offset: the statistics must centre
    gamma, beta = torch.rand(c, generator=gen) + 0.5, torch.randn(c, generator=gen)
    gy = torch.randn(n, c, *shape, generator=gen)
    rx, rg, rb = (t.double().requires_grad_() for t in (x, gamma, beta))
    ref = F.leaky_relu(F.instance_norm(rx, weight=rg, bias=rb, eps=1e-5), 0.01)
    ref.backward(gy.double())
    xi = x.contiguous(memory_format=CL).requires_grad_()
    gi, bi = gamma.clone().requires_grad_(), beta.clone().requires_grad_()
    got = te._NormAct.apply(xi, gi, bi, 1e-5, 0.01)
    got.backward(gy.contiguous(memory_format=CL))
    for a, r in ((got, ref), (xi.grad, rx.grad), (gi.grad, rg.grad), (bi.grad, rb.grad)):
        assert a.shape == r.shape and _rel(a, r) < 2e-5


# --------------------------------------------------------------------------- whole networks


def _net(features, slope=None, seed=0, cin=1, cout=3):
    torch.manual_seed(seed)
    net = UNet3D(cin, cout, list(features)).train()
    with torch.no_grad():  # non-trivial norms, so that a wrong statistic or its gradient would show
        for m in net.modules():
            if isinstance(m, nn.InstanceNorm3d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.5)
            if isinstance(m, nn.LeakyReLU) and slope is not None:
                m.negative_slope = slope
    return net


def _loss_and_grads(net, run, x, y, loss_fn):
    net.zero_grad(set_to_none=True)
    xi = x.clone().requires_grad_(True)
    out = run(xi)
    loss = loss_fn(out, y)
    loss.backward()
    return {"logits": out.detach(), "loss": loss.detach(), "input": xi.grad,
            **{name: p.grad for name, p in net.named_parameters()}}


def _batch(n, cin, shape, n_cls, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(n, cin, *shape, generator=gen) * 1.5 + 0.3,
            torch.randint(0, n_cls, (n, 1, *shape), generator=gen))


@pytest.mark.parametrize("n", [1, 2])
@pytest.mark.parametrize("features,shape,checkpointing", [
    ((4, 8), (8, 12, 8), False),
    ((4, 8, 16), (16, 24, 8), True),
    ((8, 16, 32, 64), (24, 8, 16), False),       # 3 x 1 x 2 voxels at the deepest level
    ((16, 32, 64, 128), (40, 56, 40), False),    # the demo configuration's network and patch
    ((16, 32, 64, 128), (24, 16, 40), True),
    ((6, 12, 24, 48, 96), (32, 48, 16), False),  # five levels, 2 x 3 x 1 at the deepest
])
def test_network_logits_loss_and_every_gradient_equal_the_module(n, features, shape, checkpointing):
    net = _net(features, slope=1.0)
    set_activation_checkpointing(net, checkpointing)
    loss_fn = build_loss({"name": "dice_ce"}, ["bg", "a", "b"], [0.9, 0.05, 0.05])
    x, y = _batch(n, 1, shape, 3)
    ref = _loss_and_grads(net, net, x, y, loss_fn)
    got = _loss_and_grads(net, TrainingPath(net), x, y, loss_fn)
    assert set(got) == set(ref) and len(ref) == 3 + len(list(net.parameters()))
    for name in ref:
        assert got[name].shape == ref[name].shape, name
        assert _rel(got[name], ref[name]) < 1e-4, name


@pytest.mark.parametrize("n,features,shape", [(1, (4, 8, 16), (16, 24, 8)), (2, (8, 16, 32), (16, 8, 24))])
def test_with_the_real_slope_the_network_is_as_accurate_as_its_module(n, features, shape):
    net = _net(features)
    loss_fn = build_loss({"name": "dice_ce"}, ["bg", "a", "b"], [0.9, 0.05, 0.05])
    x, y = _batch(n, 1, shape, 3, seed=4)
    exact = copy.deepcopy(net).double()
    ref = _loss_and_grads(exact, exact, x.double(), y, loss_fn)
    module = _loss_and_grads(net, net, x, y, loss_fn)
    fast = _loss_and_grads(net, TrainingPath(net), x, y, loss_fn)
    module_error = max(_rel(module[k], ref[k]) for k in ref)
    for name in ref:
        assert _rel(fast[name], ref[name]) < max(2e-4, 3 * module_error), name


def test_checkpointing_recomputes_each_block_and_changes_nothing():
    net = _net((4, 8, 16), slope=1.0)
    loss_fn = build_loss({"name": "dice_ce"}, ["bg", "a", "b"], [0.9, 0.05, 0.05])
    x, y = _batch(2, 1, (16, 16, 8), 3)
    calls = []
    real = TrainingPath._block

    def counting(self, block, t):
        calls.append(t.shape)
        return real(self, block, t)

    TrainingPath._block = counting
    try:
        plain = _loss_and_grads(net, TrainingPath(net), x, y, loss_fn)
        n_plain = len(calls)
        set_activation_checkpointing(net, True)
        calls.clear()
        ckpt = _loss_and_grads(net, TrainingPath(net), x, y, loss_fn)
    finally:
        TrainingPath._block = real
    assert len(calls) == 2 * n_plain  # every block ran again in the backward pass
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=0, atol=0)


def test_ensemble_path_is_the_mean_of_its_members():
    torch.manual_seed(0)
    ens = UNet3DEnsemble(1, 3, [4, 8], members=2)
    for m in ens.modules():
        if isinstance(m, nn.LeakyReLU):
            m.negative_slope = 1.0
    x = torch.randn(2, 1, 8, 8, 16)
    fast = training_forward(ens)
    assert fast is not ens
    g = torch.randn(2, 3, 8, 8, 16)
    ens.zero_grad()
    ens(x).backward(g)
    ref = {k: p.grad.clone() for k, p in ens.named_parameters()}
    ens.zero_grad()
    fast(x).backward(g)
    for k, p in ens.named_parameters():
        assert _rel(p.grad, ref[k]) < 1e-4, k


def test_the_check_catches_a_path_that_computes_something_else(monkeypatch):
    net = UNet3D(1, 3, [4, 8, 16])
    assert gradient_agreement(net, [12, 4, 8], 1) < 1e-4
    assert gradient_agreement(net, [12, 4, 8], 2) < 1e-4
    real = te._NormAct.backward

    def wrong(ctx, gy):  # the beta gradient doubled
        g = list(real(ctx, gy))
        g[2] = g[2] * 2
        return tuple(g)

    monkeypatch.setattr(te._NormAct, "backward", staticmethod(wrong))
    assert gradient_agreement(net, [12, 4, 8], 1) > 0.5
    logs = []
    assert training_forward(net, logs.append) is net
    assert len(logs) == 1 and "disagreed with the module" in logs[0]


# --------------------------------------------------------------------------- training runs


def _config(**kw):
    base = dict(name="eng", classes=CLASSES, target_spacing=[1.0, 1.0, 1.0], patch_size=[16, 24, 16],
                features=[4, 8, 16], iterations=6, batch_size=2, learning_rate=1e-2, val_every=1000,
                checkpoint_every=1000, log_every=1, normalization={"scheme": "none"}, seed=7,
                augmentation={"default": "default", "rare": "rare"})
    base.update(kw)
    return TrainConfig.from_dict(base)


def _cases():
    return [make_case(*sphere_case(s, shape=(24, 28, 24)), name=f"c{s}") for s in range(3)]


def _run(tmp_path, engine, monkeypatch, **kw):
    monkeypatch.setenv(ENV_VAR, engine)
    logs = []
    bundle = load_bundle(train(_config(**kw), _cases(), [], tmp_path / engine, log=logs.append))
    losses = [h["loss"] for h in bundle.card["training"]["history"] if "loss" in h]
    return bundle.network.state_dict(), losses, [m for m in logs if m.startswith("training engine")]


@pytest.mark.parametrize("batch,checkpointing", [(1, False), (2, True)])
def test_a_training_run_ends_with_the_weights_of_the_module_run(tmp_path, monkeypatch, batch, checkpointing):
    torch.manual_seed(7)
    init = UNet3D(1, 3, [4, 8, 16]).state_dict()  # what train() starts from (it seeds torch with the config's seed)
    fast, fast_losses, fast_logs = _run(tmp_path, "auto", monkeypatch, batch_size=batch,
                                        activation_checkpointing=checkpointing)
    module, module_losses, module_logs = _run(tmp_path, "module", monkeypatch, batch_size=batch,
                                              activation_checkpointing=checkpointing)
    assert fast_logs == [f"training engine: CPU training path (oneDNN, channels-last; {ENV_VAR}=module for "
                         "the plain module)"]
    assert module_logs == [f"training engine: the network's own module ({ENV_VAR}=module)"]
    assert len(fast_losses) == 6 and fast_losses == pytest.approx(module_losses, rel=1e-4)
    assert list(fast) == list(module) == list(init)  # same parameter names: checkpoints and bundles unchanged
    moved = math.sqrt(sum(float((module[k] - init[k]).double().square().sum()) for k in module if k in init))
    apart = math.sqrt(sum(float((fast[k] - module[k]).double().square().sum()) for k in module))
    assert moved > 0.1
    assert apart < 1e-3 * moved


def test_semi_supervised_training_runs_both_networks_through_the_path(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_VAR, "auto")
    calls = []
    real = TrainingPath.__call__

    def counting(self, x):
        calls.append(x.shape[0])
        return real(self, x)

    monkeypatch.setattr(TrainingPath, "__call__", counting)
    unlabelled = [make_case(sphere_case(100 + s, shape=(24, 28, 24))[0],
                            torch.zeros(24, 28, 24, dtype=torch.uint8).numpy(), name=f"u{s}") for s in range(2)]
    logs = []
    cfg = _config(method="double_mix", iterations=3, semi_supervised={"method": "double_mix", "mix_start": 0.0},
                  augmentation={"default": "none", "rare": "none"})
    train(cfg, _cases(), [], tmp_path, log=logs.append, unlabeled_cases=unlabelled)
    engine_lines = [m for m in logs if m.startswith("training engine")]
    assert len(engine_lines) == 1 and "CPU training path" in engine_lines[0]  # said once for the two networks
    # the two networks' checks (a batch of 1 and of 2 each), then per iteration both networks on the
    # labelled + unlabelled batch and each on a Double-Mix batch (2 + 2 patches each time)
    assert calls == [1, 2, 1, 2] + [4] * (4 * 3)


# --------------------------------------------------------------------------- falling back


def test_unsupported_networks_run_as_their_module_and_the_log_says_why():
    class Custom(UNet3D):
        def forward(self, x):
            return super().forward(x) * 2

    relu = UNet3D(1, 2, [4, 8])
    relu.encoders[0][2] = nn.ReLU()
    running = UNet3D(1, 2, [4, 8])
    running.decoders[0][4] = nn.InstanceNorm3d(4, affine=True, track_running_stats=True)
    plain = UNet3D(1, 2, [4, 8])
    plain.encoders[1][1] = nn.InstanceNorm3d(8, affine=False)
    for net in (Custom(1, 2, [4, 8]), UNet3D(1, 2, [4, 8]).double(), relu, running, plain, nn.Conv3d(1, 2, 3)):
        logs = []
        assert training_forward(net, logs.append) is net
        assert len(logs) == 1 and logs[0].startswith("training engine: the network's own module; the CPU training "
                                                     "path does not apply: ")


def test_switched_off_by_the_environment_and_a_bad_setting_is_refused(monkeypatch):
    net = UNet3D(1, 2, [4, 8])
    monkeypatch.setenv(ENV_VAR, "module")
    assert training_forward(net) is net
    assert training_forward(net, engine="auto") is not net  # an explicit choice wins
    monkeypatch.setenv(ENV_VAR, "fastest")
    with pytest.raises(ValueError, match=f"{ENV_VAR} must be one of auto, module"):
        training_forward(net)
    monkeypatch.delenv(ENV_VAR)
    assert training_forward(net) is not net


def test_a_check_that_fails_on_this_pytorch_leaves_the_module(monkeypatch):
    net = UNet3D(1, 2, [4, 8])

    def missing(*args, **kwargs):
        raise RuntimeError("no such op\nmore")

    monkeypatch.setattr(te, "gradient_agreement", missing)
    logs = []
    assert training_forward(net, logs.append) is net
    assert logs == ["training engine: the network's own module; the CPU training path does not apply: its check "
                    "failed on this PyTorch (RuntimeError: no such op)"]


def test_inputs_it_does_not_take_run_through_the_module_said_once():
    net = UNet3D(1, 2, [4, 8])
    logs = []
    fwd = training_forward(net, logs.append)
    x = torch.randn(1, 1, 8, 8, 8, dtype=torch.float64)
    for _ in range(2):
        with pytest.raises(RuntimeError):  # the module itself refuses float64 input with float32 weights
            fwd(x)
    assert len(logs) == 2 and "torch.float64 cpu input of shape (1, 1, 8, 8, 8) runs through the network's own " \
                              "module" in logs[1]
    with pytest.raises(ValueError, match="float32 CPU tensor"):
        TrainingPath(net)(x)
