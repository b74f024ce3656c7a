"""The CPU engine computes the bundled U-Nets exactly like their own forward, or declines."""

import threading

import numpy as np
import pytest
import torch
from torch import nn

from imbalanceseglib.cpu_engine import agreement, cpu_engine
from imbalanceseglib.inference import sliding_window_logits
from imbalanceseglib.networks import UNet3D, UNet3DEnsemble


def _net(cin=1, cout=3, features=(4, 8, 16), seed=0):
    torch.manual_seed(seed)
    net = UNet3D(cin, cout, list(features)).eval()
    with torch.no_grad():  # non-trivial norms and biases, so a wrong statistic would show
        for m in net.modules():
            if isinstance(m, nn.InstanceNorm3d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.5)
        net.head.bias.normal_()
    return net


def _check(engine, net, x, tol=1e-5):
    with torch.inference_mode():
        ref = net(x)
        out = engine(x)
    assert out.shape == ref.shape and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, atol=tol * float(ref.abs().max()), rtol=1e-4)
    return out


@pytest.mark.parametrize("n,cin,features,shape", [
    (1, 1, (4, 8, 16), (16, 16, 16)),
    (2, 1, (4, 8, 16), (16, 24, 8)),     # several windows per call, not a cube
    (3, 2, (6, 12), (8, 16, 32)),        # two input channels, two levels
    (1, 1, (12, 24, 48, 96), (32, 32, 32)),  # the demo model's widths
])
def test_engine_equals_the_module(n, cin, features, shape):
    net = _net(cin, 4, features)
    eng = cpu_engine(net)
    assert eng is not None
    x = torch.randn(n, cin, *shape) * 3 + 2  # an offset: the norms must centre properly
    out = _check(eng, net, x)
    assert out.is_contiguous(memory_format=torch.channels_last_3d)
    # the input layout does not matter
    _check(eng, net, x.contiguous(memory_format=torch.channels_last_3d))
    assert agreement(eng, net, x) < 1e-5


def test_norms_without_affine_or_with_running_statistics_follow_the_module():
    net = _net()
    with torch.no_grad():
        net.encoders[0][1] = nn.InstanceNorm3d(4, affine=False)
        rs = nn.InstanceNorm3d(8, affine=True, track_running_stats=True)
        rs.running_mean.normal_()
        rs.running_var.uniform_(0.5, 2.0)
        rs.weight.uniform_(0.5, 1.5)
        net.decoders[0][4] = rs.eval()
    _check(cpu_engine(net), net, torch.randn(2, 1, 16, 16, 16))
    rs.train()  # in training mode the module normalises with the input's own statistics, so must we
    _check(cpu_engine(net), net, torch.randn(2, 1, 16, 16, 16))


def test_ensemble_equals_the_module_and_follows_weight_changes():
    torch.manual_seed(3)
    ens = UNet3DEnsemble(1, 3, [4, 8], members=3).eval()
    eng = cpu_engine(ens)
    x = torch.randn(1, 1, 16, 16, 16)
    before = _check(eng, ens, x)
    with torch.no_grad():  # the engine reads the parameters at every call
        ens.members[1].head.weight.mul_(-2.0)
    after = _check(eng, ens, x)
    assert float((after - before).abs().max()) > 1e-3


def test_threads_calling_one_engine_at_once_get_their_own_results():
    net = _net(features=(4, 8))
    eng = cpu_engine(net)
    xs = [torch.randn(1, 1, 16, 16, 16 + 8 * (i % 2)) for i in range(6)]  # two shapes: separate scratch
    with torch.inference_mode():
        serial = [net(x) for x in xs]
    results = [None] * len(xs)

    def work(i):
        for _ in range(3):
            results[i] = eng(xs[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(xs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r, s in zip(results, serial):
        torch.testing.assert_close(r, s, atol=1e-5 * float(s.abs().max()), rtol=1e-4)


def test_unsupported_networks_and_inputs_are_declined():
    class Custom(UNet3D):  # a subclass may compute something else: not ours to guess
        def forward(self, x):
            return super().forward(x) * 2

    assert cpu_engine(Custom(1, 2, [4, 8])) is None
    assert cpu_engine(nn.Conv3d(1, 2, 3)) is None
    assert cpu_engine(_net().double()) is None
    odd = _net()
    odd.encoders[0][2] = nn.ReLU()
    assert cpu_engine(odd) is None
    eng = cpu_engine(_net())
    with pytest.raises(ValueError, match="float32 CPU tensor"):
        eng(torch.zeros(1, 1, 16, 16, 16, dtype=torch.float64))
    with pytest.raises(ValueError, match="float32 CPU tensor"):
        eng(torch.zeros(1, 16, 16, 16))


def test_sliding_window_uses_the_engine_with_the_same_logits(monkeypatch):
    net = _net(features=(4, 8))
    vol = np.random.default_rng(0).normal(size=(24, 30, 20)).astype(np.float32)
    module = sliding_window_logits(net, vol, [16, 16, 16], engine="module")
    calls = []
    from imbalanceseglib import cpu_engine as ce
    real = ce.cpu_engine

    def counting(network):
        eng = real(network)
        return lambda x: (calls.append(x.shape[0]), eng(x))[1]

    monkeypatch.setattr(ce, "cpu_engine", counting)
    fast = sliding_window_logits(net, vol, [16, 16, 16])
    assert sum(calls) > 8  # every window went through the engine (plus the one check)
    torch.testing.assert_close(fast, module, atol=2e-5, rtol=1e-5)
    # an engine that computes something else is caught on the first window and not used
    monkeypatch.setattr(ce, "cpu_engine", lambda network: (lambda x: real(network)(x) + 1.0))
    torch.testing.assert_close(sliding_window_logits(net, vol, [16, 16, 16]), module, atol=2e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="engine must be"):
        sliding_window_logits(net, vol, [16, 16, 16], engine="onednn")
    # not on CPUs we have not measured it on (this path has no trials to find out)
    monkeypatch.setattr(ce, "cpu_engine", counting)
    import platform
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    calls.clear()
    torch.testing.assert_close(sliding_window_logits(net, vol, [16, 16, 16]), module, atol=2e-5, rtol=1e-5)
    assert calls == []


def test_probe_is_remembered_while_the_network_is_unchanged_and_redone_after_a_change():
    from imbalanceseglib.cpu_engine import probe_agreement
    net = _net()
    eng = cpu_engine(net)
    calls = []
    hook = net.register_forward_hook(lambda *a: calls.append(1))
    first = probe_agreement(eng, net, (1, 16, 16, 16))
    assert first <= 1e-4 and len(calls) == 1
    # a folder of scans predicted with one model: the module runs the probe window once
    assert probe_agreement(eng, net, (1, 16, 16, 16)) == first and len(calls) == 1
    # another window shape is another probe
    probe_agreement(eng, net, (1, 16, 24, 16))
    assert len(calls) == 2
    # an in-place change of one parameter (as an optimizer step or load_state_dict makes) probes again,
    # and a wrong engine is then caught although the same network passed before
    with torch.no_grad():
        net.head.bias.add_(1.0)
    assert probe_agreement(eng, net, (1, 16, 16, 16)) <= 1e-4 and len(calls) == 3

    # any other callable is probed every time (a wrong one is caught although the network passed)
    def wrong(x):
        return eng(x) * 1.5
    assert probe_agreement(wrong, net, (1, 16, 16, 16)) > 0.1 and len(calls) == 4
    assert probe_agreement(wrong, net, (1, 16, 16, 16)) > 0.1 and len(calls) == 5
    hook.remove()


def test_a_one_channel_input_reaches_onednn_as_channels_last_so_the_first_level_needs_no_layout_copy():
    """With one channel PyTorch's channels-last strides look contiguous to oneDNN, whose output is
    then contiguous and has to be copied; ``to_channels_last`` gives the channel stride 1 instead
    (the same memory), and the first convolution writes channels-last itself."""
    from imbalanceseglib.cpu_engine import to_channels_last
    cl = torch.channels_last_3d
    x = torch.randn(2, 1, 8, 10, 12)
    w, b = torch.randn(4, 1, 3, 3, 3), torch.randn(4)

    def conv(t):
        return torch.ops.aten.mkldnn_convolution(t, w, b, [1, 1, 1], [1, 1, 1], [1, 1, 1], 1)
    plain = conv(x.contiguous(memory_format=cl))
    assert not plain.is_contiguous(memory_format=cl)  # what the engine had to copy before
    v = to_channels_last(x)
    assert v.data_ptr() == x.data_ptr() and torch.equal(v, x) and v.stride(1) == 1
    out = conv(v)
    assert out.is_contiguous(memory_format=cl) and out.stride(1) == 1
    torch.testing.assert_close(out, plain, atol=1e-5, rtol=1e-5)
    # more channels: the usual channels-last copy, unchanged
    y = torch.randn(1, 3, 4, 5, 6)
    assert torch.equal(to_channels_last(y), y) and to_channels_last(y).is_contiguous(memory_format=cl)
    # the engine on a one-channel network input: no copy of a first-level activation
    net = _net()
    eng = cpu_engine(net)
    copies = []
    with torch.profiler.profile(record_shapes=True) as prof:
        eng(torch.randn(1, 1, 16, 16, 16))
    for e in prof.key_averages(group_by_input_shape=True):
        if e.key == "aten::copy_" and e.input_shapes and list(e.input_shapes[0])[2:] == [16, 16, 16]:
            copies.append(e.input_shapes[0])
    assert copies == []
