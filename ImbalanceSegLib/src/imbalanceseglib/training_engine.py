"""A faster CPU training path for the bundled U-Nets: the same network from the same parameters,
with its own forward and backward kernels.

Trained through ``nn.Module.forward`` on a CPU, :class:`~imbalanceseglib.networks.UNet3D` loses
time where :mod:`imbalanceseglib.cpu_engine` found it at inference, now in the backward pass as
well (``torch.profiler`` per operator: Testing/Benchmarks/reports/training_speed.md):

* PyTorch sends a convolution to oneDNN only when ``N x C x D x H`` of its input passes a size
  heuristic (or ``N > 1``); with one patch per step (batch 1, or a batch shared by torchrun
  ranks) the first convolution and every convolution of the coarser levels go to
  ``slow_conv3d``, and their backward passes through the same heuristic, so they are several
  times slower per FLOP than oneDNN's;
* the network runs in the contiguous (NCDHW) layout, in which oneDNN's convolutions were slower
  here than in the channels-last layout, forward and backward;
* instance norm goes through ``batch_norm`` with a reshape (a copy in and out on a channels-last
  tensor), and PyTorch's channels-last ``batch_norm`` kernel is not accurate enough for this: on
  one 16-channel 40x56x40 tensor its input gradient was off by 15 % of its largest value
  (float32 against float64, torch 2.13).

:func:`training_forward` returns a function that computes ``network(x)`` in the channels-last
layout with every convolution on oneDNN, forward and backward, through autograd functions
with their own backward:

* a 3x3x3 convolution runs ``aten::mkldnn_convolution``; its input gradient is oneDNN's
  transposed convolution of the output gradient with the same weight (the adjoint, with the
  output padding that gives back the input size), and its weight gradient is
  ``aten::convolution_backward``, which PyTorch sends to oneDNN when the heuristic above
  allows; when it does not (one patch, small ``C x D x H``) the patch is cut in two along its
  first axis, each half with the input rows its outputs read (the padding rows explicit), and
  the two halves go in as a batch of two, so the same oneDNN kernel sums the same products;
* the 2x2x2 stride-2 transposed convolution runs oneDNN's transposed kernel; its input
  gradient is a stride-2 convolution with the same weight, its weight gradient one matrix
  product (the eight kernel taps never overlap);
* the 1x1x1 head is a oneDNN convolution forward and two matrix products backward;
* instance norm and leaky ReLU are one function: statistics per sample and channel with
  ``torch.sum`` (mean first, then the centred second moment; both accurate to float rounding,
  which the backward pass needs), the centred input kept for the backward pass instead of the
  convolution output (the same memory the module keeps), and the textbook backward of both.

Every parameter is read at every call and every gradient lands in the parameter's ``.grad``,
so the optimizer, gradient clipping, torchrun's gradient averaging and checkpoints see nothing
different; parameter names do not change. Activation checkpointing
(:func:`~imbalanceseglib.networks.set_activation_checkpointing`) recomputes each block as the
module does. The logits come back in the module's (contiguous) layout.

What it supports: exactly :class:`~imbalanceseglib.networks.UNet3D` (and the members of a
:class:`~imbalanceseglib.networks.UNet3DEnsemble`) of the bundled blocks with affine instance
norms without running statistics, float32 parameters on the CPU, oneDNN present, an x86-64 CPU
(where it was measured; :func:`imbalanceseglib.cpu_engine.measured_faster_here`). Before it is
used, it is checked against the module on one small random batch of one and of two patches
(:func:`gradient_agreement`: logits, input and parameter gradients). Anything else, a failed
check, an input that is not a float32 CPU tensor (N, C, D, H, W), or the environment variable
``IMBALANCESEG_TRAINING_ENGINE=module`` runs the plain module; the trainer's log says which
and why, once. The trainers run every training forward pass through it (under torchrun, each
rank's slice of the batch); the gradient that makes an asymmetric adversarial input and the
Double-Mix teachers' pseudo-labels still come from the module.

Deep supervision (:mod:`imbalanceseglib.deep_supervision`) runs through it too: the returned
function takes the same ``on_decoder(level, features)`` hook as ``UNet3D.forward``, called from
the one wiring both share (:meth:`~imbalanceseglib.networks.UNet3D.walk`), so the auxiliary
heads read the decoder features this path made and their gradients flow back through its
backward functions (tests/test_deep_supervision.py compares them with the module's).
"""

from __future__ import annotations

import copy
import os
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .cpu_engine import measured_faster_here, supported_unet, to_channels_last
from .networks import DecoderHook, UNet3D, UNet3DEnsemble

__all__ = ["ENV_VAR", "TOLERANCE", "TrainingPath", "gradient_agreement", "training_forward", "unsupported_reason"]

ENV_VAR = "IMBALANCESEG_TRAINING_ENGINE"
ENGINES = ("auto", "module")
TOLERANCE = 1e-3  # largest |fast - module| / largest |module| accepted per tensor in the check
Forward = Callable[..., torch.Tensor]  # forward(x) or forward(x, on_decoder=hook)

_CL = torch.channels_last_3d
_ONE = [1, 1, 1]
_ZERO = [0, 0, 0]


_cl = to_channels_last


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    """A channels-last (N, C, D, H, W) tensor as its (N, D*H*W, C) memory (a view)."""
    n, c = t.shape[:2]
    return t.permute(0, 2, 3, 4, 1).view(n, -1, c)


def _from_rows(rows: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    n, _, c = rows.shape
    return rows.view(n, like.shape[2], like.shape[3], like.shape[4], c).permute(0, 4, 1, 2, 3)


# --------------------------------------------------------------------------- convolutions


def _torch_sends_to_onednn(x: torch.Tensor) -> bool:
    """Whether PyTorch's own convolution backward sends this (float32, 3x3x3 kernel) input to
    oneDNN: its size heuristic (``N > 1``, or ``N x C x D x H`` above 20480). Were a later
    PyTorch to decide otherwise, the weight gradient would still be right, only slower."""
    n, c, d, h = x.shape[:4]
    return n > 1 or n * c * d * h > 20480


def _halves(x: torch.Tensor, gy: torch.Tensor, stride: int):
    """One patch's 3x3x3 (padding 1) convolution as two halves along the first spatial axis:
    the input rows each half of the outputs reads, padding rows written out as zeros, and the
    output gradient of each half (an odd count padded with a zero row, which adds nothing)."""
    d, do = x.shape[2], gy.shape[2]
    m = (do + 1) // 2
    rows = (m - 1) * stride + 3
    xs = torch.empty((2, x.shape[1], rows, x.shape[3], x.shape[4]), dtype=x.dtype, memory_format=_CL)
    gys = torch.empty((2, gy.shape[1], m, gy.shape[3], gy.shape[4]), dtype=gy.dtype, memory_format=_CL)
    for part, first in enumerate((0, m)):
        count = min(m, do - first)
        lo = first * stride - 1  # the input row under the first output's first tap (-1: padding)
        a, b = max(lo, 0), min(lo + rows, d)
        if count <= 0 or b <= a:
            xs[part].zero_()
        else:
            xs[part, :, :a - lo].zero_()
            xs[part, :, a - lo:b - lo] = x[0, :, a:b]
            xs[part, :, b - lo:].zero_()
        if count > 0:
            gys[part, :, :count] = gy[0, :, first:first + count]
        gys[part, :, max(count, 0):].zero_()
    return xs, gys


class _Conv3(torch.autograd.Function):
    """3x3x3 convolution, padding 1, no bias, stride 1 or 2, on oneDNN both ways."""

    @staticmethod
    def forward(ctx, x, w, stride: int):
        x = _cl(x)
        y = torch.ops.aten.mkldnn_convolution(x, w, None, _ONE, [stride] * 3, _ONE, 1)
        ctx.save_for_backward(x, w)
        ctx.stride = stride
        return _cl(y)

    @staticmethod
    def backward(ctx, gy):
        x, w = ctx.saved_tensors
        s = ctx.stride
        gy = _cl(gy)
        want_x, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        gx = gw = None
        if _torch_sends_to_onednn(x):
            gx, gw, _ = torch.ops.aten.convolution_backward(gy, x, w, None, [s] * 3, _ONE, _ONE, False, _ZERO, 1,
                                                            [want_x, want_w, False])
        else:
            if want_x:  # the adjoint of the convolution: its transposed convolution, same weight
                pad_out = [x.shape[2 + i] - ((gy.shape[2 + i] - 1) * s + 1) for i in range(3)]
                gx = torch.ops.mkldnn._convolution_transpose_pointwise(gy, w, None, _ONE, pad_out, [s] * 3, _ONE,
                                                                       1, "none", [], "")
            if want_w:
                xs, gys = _halves(x, gy, s)
                gw = torch.ops.aten.convolution_backward(gys, xs, w, None, [s] * 3, [0, 1, 1], _ONE, False, _ZERO,
                                                         1, [False, True, False])[1]
        return (_cl(gx) if gx is not None else None), (gw.contiguous() if gw is not None else None), None


class _Up2(torch.autograd.Function):
    """2x2x2 stride-2 transposed convolution without bias (the U-Net's upsampling)."""

    @staticmethod
    def forward(ctx, x, w):
        x = _cl(x)
        y = torch.ops.mkldnn._convolution_transpose_pointwise(x, w, None, _ZERO, _ZERO, [2, 2, 2], _ONE, 1, "none",
                                                              [], "")
        ctx.save_for_backward(x, w)
        return _cl(y)

    @staticmethod
    def backward(ctx, gy):
        x, w = ctx.saved_tensors
        gy = _cl(gy)
        gx = gw = None
        if ctx.needs_input_grad[0]:
            gx = _cl(torch.ops.aten.mkldnn_convolution(gy, w, None, _ZERO, [2, 2, 2], _ONE, 1))
        if ctx.needs_input_grad[1]:
            n, ci, d, h, wd = x.shape
            co = w.shape[1]
            # y[n, o, 2i+a, 2j+b, 2k+c] = sum_ci x[n, ci, i, j, k] w[ci, o, a, b, c]: one product
            taps = gy.permute(0, 2, 3, 4, 1).reshape(n, d, 2, h, 2, wd, 2, co).permute(0, 1, 3, 5, 2, 4, 6, 7)
            gw = torch.mm(_as_rows(x).reshape(-1, ci).t(), taps.reshape(n * d * h * wd, 8 * co))
            gw = gw.view(ci, 2, 2, 2, co).permute(0, 4, 1, 2, 3).contiguous()
        return gx, gw


class _Head(torch.autograd.Function):
    """1x1x1 convolution with bias."""

    @staticmethod
    def forward(ctx, x, w, b):
        x = _cl(x)
        y = torch.ops.aten.mkldnn_convolution(x, w, b, _ZERO, _ONE, _ONE, 1)
        ctx.save_for_backward(x, w)
        ctx.has_bias = b is not None
        return _cl(y)

    @staticmethod
    def backward(ctx, gy):
        x, w = ctx.saved_tensors
        co, ci = w.shape[:2]
        g = _as_rows(_cl(gy)).reshape(-1, co)
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = _from_rows(torch.mm(g, w.view(co, ci)).view(x.shape[0], -1, ci), x)
        if ctx.needs_input_grad[1]:
            gw = torch.mm(g.t(), _as_rows(x).reshape(-1, ci)).view_as(w)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = g.sum(0)
        return gx, gw, gb


# --------------------------------------------------------------------------- instance norm + leaky ReLU


class _NormAct(torch.autograd.Function):
    """Instance norm (affine, the input's own statistics) then leaky ReLU, channels-last."""

    @staticmethod
    def forward(ctx, x, gamma, beta, eps: float, slope: float):
        v = _as_rows(_cl(x))                       # (N, M, C)
        m = v.shape[1]
        mean = v.sum(1, keepdim=True).div_(m)      # pairwise sums (a sequential float32 sum is not enough)
        xc = torch.sub(v, mean)
        var = xc.square().sum(1, keepdim=True).div_(m)
        rstd = var.add_(eps).rsqrt_()
        out = torch.addcmul(beta.expand(v.shape[0], 1, v.shape[2]), xc, rstd * gamma)
        F.leaky_relu_(out, slope)
        ctx.save_for_backward(xc, out, gamma, rstd)
        ctx.slope = slope
        return _from_rows(out, x)

    @staticmethod
    def backward(ctx, gy):
        xc, out, gamma, rstd = ctx.saved_tensors
        gy = _cl(gy)
        m = xc.shape[1]
        dz = torch.ops.aten.leaky_relu_backward(_as_rows(gy), out, ctx.slope, True)
        sum_dz = dz.sum(1, keepdim=True)
        sum_dz_xc = (xc * dz).sum(1, keepdim=True)
        a = rstd * gamma
        # d input = a * (dz - mean(dz) - xhat * mean(dz * xhat)), xhat = xc * rstd, written into dz
        torch.addcmul((-a * sum_dz).div_(m), dz, a, out=dz)
        dz.addcmul_(xc, (-a * rstd * rstd * sum_dz_xc).div_(m))
        return _from_rows(dz, gy), (sum_dz_xc * rstd).sum((0, 1)), sum_dz.sum((0, 1)), None, None


# --------------------------------------------------------------------------- the network


class TrainingPath:
    """``network(x)`` for one supported :class:`UNet3D` through the functions above (see the
    module docstring); a float32 CPU input (N, C, D, H, W) of any layout."""

    def __init__(self, network: UNet3D):
        self.network = network

    def _block(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        x = _NormAct.apply(_Conv3.apply(x, block[0].weight, block[0].stride[0]), block[1].weight, block[1].bias,
                           block[1].eps, block[2].negative_slope)
        return _NormAct.apply(_Conv3.apply(x, block[3].weight, 1), block[4].weight, block[4].bias, block[4].eps,
                              block[5].negative_slope)

    def _run(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.network.checkpointing and torch.is_grad_enabled():  # as UNet3D._run
            return checkpoint(self._block, block, x, use_reentrant=False)
        return self._block(block, x)

    def __call__(self, x: torch.Tensor, on_decoder: Optional[DecoderHook] = None) -> torch.Tensor:
        """The logits; ``on_decoder(level, features)`` receives each decoder level's output (as
        :meth:`UNet3D.walk <imbalanceseglib.networks.UNet3D.walk>`; channels-last, with its
        gradient flowing back through this path's own backward functions)."""
        if x.dtype != torch.float32 or x.device.type != "cpu" or x.ndim != 5:
            raise ValueError(f"the CPU training path takes a float32 CPU tensor (N, C, D, H, W), got {x.dtype} "
                             f"{x.device} shape {tuple(x.shape)}")
        out = self.network.walk(_cl(x), self._run, lambda up, t: _Up2.apply(t, up.weight),
                                lambda head, t: _Head.apply(t, head.weight, head.bias), on_decoder)
        return out.contiguous()


class _EnsemblePath:
    def __init__(self, members: List[TrainingPath]):
        self.members = members

    def __call__(self, x: torch.Tensor, on_decoder: Optional[DecoderHook] = None) -> torch.Tensor:
        if on_decoder is not None:  # as UNet3DEnsemble.forward, which has no decoder of its own
            raise ValueError("an ensemble's decoder features come from its members; run each member's path")
        out = self.members[0](x)
        for m in self.members[1:]:
            out = out + m(x)
        return out / len(self.members)


def _unsupported_unet(net: nn.Module) -> Optional[str]:
    if not supported_unet(net):
        return (f"{type(net).__name__} is not a UNet3D of the bundled blocks with float32 CPU parameters"
                if type(net) is not UNet3D else "a layer, or the parameters' type or device, is not the bundled one")
    for block in list(net.encoders) + list(net.decoders):
        for norm in (block[1], block[4]):
            if not norm.affine or norm.track_running_stats:
                return "an instance norm is not affine or keeps running statistics"
    return None


def unsupported_reason(network: nn.Module) -> Optional[str]:
    """Why the training path cannot compute ``network`` here, or None when it can."""
    if not torch.backends.mkldnn.is_available():
        return "this PyTorch has no oneDNN"
    if not measured_faster_here():
        return "not measured on this CPU family (x86-64 only)"
    if type(network) is UNet3DEnsemble:
        reasons = [r for r in (_unsupported_unet(m) for m in network.members) if r]
        return reasons[0] if reasons else None
    return _unsupported_unet(network)


def _build(network: nn.Module):
    if type(network) is UNet3DEnsemble:
        return _EnsemblePath([TrainingPath(m) for m in network.members])
    return TrainingPath(network)


def gradient_agreement(network: nn.Module, shape: Sequence[int], batch: int, seed: int = 0,
                       kink_free: bool = True) -> float:
    """Largest disagreement between the training path and the module on one random batch of
    ``batch`` patches of ``shape`` (D, H, W): for the logits and the gradients of the input and
    of every parameter under one fixed random output gradient, the largest absolute difference
    relative to the largest absolute value of the module's tensor. Runs on a copy of
    ``network`` (its parameters, gradients and random state are not touched).

    ``kink_free`` (default) sets the copy's leaky ReLU slopes to 1, so that the check compares
    arithmetic: with the real slope, a pre-activation within float rounding of 0 takes the
    other branch in one of the two (both correct), and the gradients that pass through it
    differ by several per cent on a small patch."""
    net = copy.deepcopy(network)
    if kink_free:
        for module in net.modules():
            if isinstance(module, nn.LeakyReLU):
                module.negative_slope = 1.0
    gen = torch.Generator().manual_seed(seed)
    c_in = (net.members[0] if type(net) is UNet3DEnsemble else net).encoders[0][0].in_channels
    x = torch.randn(batch, c_in, *[int(s) for s in shape], generator=gen) * 2.0 + 0.5
    results = []
    for run in (net, _build(net)):
        net.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_(True)
        out = run(xi)
        out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1)))
        results.append([out.detach(), xi.grad] + [p.grad for p in net.parameters()])
    worst = 0.0
    for ref, got in zip(*results):
        if ref is None or got is None:
            if (ref is None) != (got is None):
                return float("inf")
            continue
        if got.shape != ref.shape or not bool(torch.isfinite(got).all()):
            return float("inf")
        worst = max(worst, float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-12)))
    return worst


def _engine_setting(engine: Optional[str]) -> str:
    value = (engine if engine is not None else os.environ.get(ENV_VAR, "auto")).strip().lower() or "auto"
    if value not in ENGINES:
        raise ValueError(f"{ENV_VAR} must be one of {', '.join(ENGINES)}, got {value!r}")
    return value


def _check_shape(network: nn.Module) -> List[int]:
    """The smallest patch with an odd size (3) at the deepest level along the axis the weight
    gradients of one patch are cut along, 3 x 1 x 2 voxels there."""
    div = network.size_divisor
    return [3 * div, div, 2 * div]


def training_forward(network: nn.Module, log: Optional[Callable[[str], None]] = None,
                     engine: Optional[str] = None) -> Forward:
    """The function the trainers call for the network's training forward pass: the CPU training
    path when it supports ``network`` here and passes its check (:func:`gradient_agreement` on a
    batch of one and of two small random patches), else ``network`` itself. ``engine``
    (default: the environment variable ``IMBALANCESEG_TRAINING_ENGINE``, else ``auto``) is
    ``auto`` or ``module`` (the plain module). Says which one runs, and why not the fast one,
    in one ``log`` line. Either takes ``forward(x, on_decoder=hook)`` for a
    :class:`~imbalanceseglib.networks.UNet3D` (deep supervision's decoder features)."""
    say = log or (lambda message: None)
    setting = _engine_setting(engine)
    if setting == "module":
        say(f"training engine: the network's own module ({ENV_VAR}=module)")
        return network
    reason = unsupported_reason(network)
    if reason is None:
        try:
            worst = max(gradient_agreement(network, _check_shape(network), batch) for batch in (1, 2))
        except (RuntimeError, AttributeError, NotImplementedError) as exc:  # an op this build lacks
            reason = f"its check failed on this PyTorch ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})"
        else:
            if not worst <= TOLERANCE:
                reason = f"its check disagreed with the module by {worst:.1e} (tolerance {TOLERANCE:g})"
    if reason is not None:
        say(f"training engine: the network's own module; the CPU training path does not apply: {reason}")
        return network
    fast = _build(network)
    warned: Dict[str, bool] = {}

    def forward(x: torch.Tensor, on_decoder: Optional[DecoderHook] = None) -> torch.Tensor:
        if x.dtype == torch.float32 and x.device.type == "cpu" and x.ndim == 5:
            return fast(x) if on_decoder is None else fast(x, on_decoder=on_decoder)
        if not warned:
            warned["input"] = True
            say(f"training engine: a {x.dtype} {x.device.type} input of shape {tuple(x.shape)} runs through the "
                "network's own module")
        return network(x) if on_decoder is None else network(x, on_decoder=on_decoder)

    say(f"training engine: CPU training path (oneDNN, channels-last; {ENV_VAR}=module for the plain module)")
    return forward
