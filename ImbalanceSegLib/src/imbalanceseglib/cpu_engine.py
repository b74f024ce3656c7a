"""A faster CPU forward pass for the bundled U-Nets at inference (same arithmetic, fewer detours).

Run through ``nn.Module.forward`` on a CPU, :class:`~imbalanceseglib.networks.UNet3D` spends
much of its time in slow paths and copies (``torch.profiler`` per operator on one 64^3 window of
the demo network, in Testing/Benchmarks/reports/streaming_inference.md):

* PyTorch sends a convolution to oneDNN only when the input is big enough by a heuristic on
  ``N x C x D x H`` (one window of the coarser levels, or of a one-channel input, is not); the
  rest go to ``slow_conv3d`` (unfold + GEMM), several times slower per FLOP;
* ``instance_norm`` reshapes its input to ``(1, N x C, ...)`` and calls ``batch_norm``: on a
  channels-last tensor that is a copy in and a copy out, and the statistics kernel is slow for
  a dozen channels;
* transposed convolutions of small inputs fall back to ``slow_conv_transpose3d``.

:func:`cpu_engine` returns a function that computes the same network from the same parameters
without those detours: every convolution goes to oneDNN (``aten::mkldnn_convolution``) in the
channels-last layout, the transposed convolutions go to oneDNN's transposed kernel, and each
instance norm is two matrix-vector products for its statistics (mean first, then the centred
second moment, as ``batch_norm`` does) and one in-place scale-and-shift followed by an in-place
leaky ReLU, with no layout copies. Scratch buffers are kept per thread, so several threads may
call one engine at once (the streaming tuner's ``workers``).

The result equals ``network(x)`` up to float rounding (tested against it for each supported
network and batch size; :func:`stream_logits` also compares the two on one random window
before using it and keeps the module if they differ). Parameters are read at every call, so an
engine follows a network that is still being trained. Only what the bundles can name is supported (exact
``UNet3D`` and ``UNet3DEnsemble`` types, float32 on the CPU, oneDNN present); anything else
gets ``None`` and runs as a module.
"""

from __future__ import annotations

import platform
import threading
import weakref
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .networks import ConvBlock, UNet3D, UNet3DEnsemble

_CL = torch.channels_last_3d
Engine = Callable[[torch.Tensor], torch.Tensor]
TOLERANCE = 1e-3  # largest |engine - module| / largest |logit| accepted on the probe window


def to_channels_last(t: torch.Tensor) -> torch.Tensor:
    """``t`` in the channels-last layout, in a form oneDNN recognises as such.

    With one channel, ``contiguous(memory_format=channels_last_3d)`` gives the channel dimension
    the batch dimension's stride (the same memory either way), and ``mkldnn_convolution`` then
    writes a contiguous output, which costs a layout copy of the first level's activations. A
    channel stride of 1 makes the output channels-last."""
    if not t.is_contiguous(memory_format=_CL):
        t = t.contiguous(memory_format=_CL)
    if t.ndim == 5 and t.shape[1] == 1 and t.stride(1) != 1:
        d, h, w = t.shape[2:]
        t = t.as_strided(tuple(t.shape), (d * h * w, 1, h * w, w, 1))
    return t


def measured_faster_here() -> bool:
    """Whether this is a CPU family we measured the engine faster on (x86-64), so that it may
    run without trials; elsewhere (e.g. Arm, not measured by us) it has to win them first."""
    return platform.machine().lower() in ("x86_64", "amd64")


def _supported_block(block: nn.Module) -> bool:
    if type(block) is not ConvBlock or len(block) != 6:
        return False
    convs, norms, acts = (block[0], block[3]), (block[1], block[4]), (block[2], block[5])
    return (all(type(c) is nn.Conv3d and c.kernel_size == (3, 3, 3) and c.groups == 1
                and c.padding_mode == "zeros" and not isinstance(c.padding, str) for c in convs)
            and all(type(n) is nn.InstanceNorm3d for n in norms)
            and all(type(a) is nn.LeakyReLU for a in acts))


def supported_unet(net: nn.Module) -> bool:
    """Whether ``net`` is exactly a :class:`~imbalanceseglib.networks.UNet3D` of the bundled blocks
    with float32 CPU parameters (what this engine and :mod:`imbalanceseglib.training_engine` compute)."""
    if type(net) is not UNet3D:
        return False
    if not all(_supported_block(b) for b in list(net.encoders) + list(net.decoders)):
        return False
    if not all(type(u) is nn.ConvTranspose3d and u.kernel_size == (2, 2, 2) and u.stride == (2, 2, 2)
               and u.groups == 1 and u.padding == (0, 0, 0) and u.output_padding == (0, 0, 0)
               for u in net.upsamplers):
        return False
    if type(net.head) is not nn.Conv3d or net.head.kernel_size != (1, 1, 1):
        return False
    return all(p.dtype == torch.float32 and p.device.type == "cpu" for p in net.parameters())


class _Scratch(threading.local):
    """Per-thread scratch buffers (a thread's own buffers are reused from call to call)."""

    def __init__(self) -> None:
        self.buffers: Dict[Tuple[str, Tuple[int, ...]], torch.Tensor] = {}

    def get(self, name: str, shape: Tuple[int, ...], fill: Optional[float] = None) -> torch.Tensor:
        key = (name, shape)
        buf = self.buffers.get(key)
        if buf is None:
            if len(self.buffers) > 64:  # shapes change rarely; do not grow without bound
                self.buffers.clear()
            buf = torch.full(shape, fill) if fill is not None else torch.empty(shape)
            self.buffers[key] = buf
        return buf


def _widen(m: int, c: int) -> int:
    """Rows of c channels folded into one row of k*c values, so the per-channel sums run over
    a wider inner dimension (vector units stay busy with a dozen channels)."""
    k = 1
    while k < 32 and m % (2 * k) == 0 and 2 * k * c <= 512:
        k *= 2
    return k


class _UNetEngine:
    def __init__(self, net: UNet3D):
        self.net = net
        self.scratch = _Scratch()

    # -- pieces ------------------------------------------------------------------------------
    @staticmethod
    def _conv(x: torch.Tensor, conv: nn.Conv3d) -> torch.Tensor:
        y = torch.ops.aten.mkldnn_convolution(x, conv.weight, conv.bias, list(conv.padding), list(conv.stride),
                                              list(conv.dilation), conv.groups)
        return to_channels_last(y)

    @staticmethod
    def _up(x: torch.Tensor, up: nn.ConvTranspose3d) -> torch.Tensor:
        try:
            y = torch.ops.mkldnn._convolution_transpose_pointwise(
                x, up.weight, up.bias, [0, 0, 0], [0, 0, 0], [2, 2, 2], [1, 1, 1], 1, "none", [], "")
        except (RuntimeError, AttributeError):  # a torch build without the fused op
            y = F.conv_transpose3d(x, up.weight, up.bias, stride=2)
        return to_channels_last(y)

    def _norm_act(self, x: torch.Tensor, norm: nn.InstanceNorm3d, slope: float) -> torch.Tensor:
        """Instance norm and leaky ReLU in place on a channels-last conv output."""
        n, c = x.shape[0], x.shape[1]
        m = x[0].numel() // c
        k = _widen(m, c)
        rows = m // k
        # as InstanceNorm3d.forward: the input's own statistics in training mode or without
        # running ones
        running = not norm.training and norm.track_running_stats and norm.running_mean is not None
        if not running:
            ones = self.scratch.get("ones", (1, rows), 1.0)
            centred = self.scratch.get("centred", (rows, k * c))
        for i in range(n):
            v = x[i].permute(1, 2, 3, 0).view(rows, k * c)   # (D, H, W, C) memory, folded
            if running:
                mean, var = norm.running_mean, norm.running_var
            else:
                mean = torch.mm(ones, v).view(k, c).sum(0) / m
                torch.sub(v, mean.repeat(k), out=centred)
                centred.square_()
                var = torch.mm(ones, centred).view(k, c).sum(0) / m
            scale = torch.rsqrt(var + norm.eps)
            if norm.affine:
                scale = scale * norm.weight
            shift = -mean * scale
            if norm.affine:
                shift = shift + norm.bias
            torch.addcmul(shift.repeat(k), v, scale.repeat(k), out=v)
        return F.leaky_relu_(x, slope)

    def _block(self, x: torch.Tensor, block: nn.Module) -> torch.Tensor:
        x = self._norm_act(self._conv(x, block[0]), block[1], block[2].negative_slope)
        return self._norm_act(self._conv(x, block[3]), block[4], block[5].negative_slope)

    # -- forward -----------------------------------------------------------------------------
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32 or x.device.type != "cpu" or x.ndim != 5:
            raise ValueError(f"the CPU engine takes a float32 CPU tensor (N, C, D, H, W), got {x.dtype} "
                             f"{x.device} shape {tuple(x.shape)}")
        with torch.inference_mode():
            return self.net.walk(to_channels_last(x), lambda blk, t: self._block(t, blk),
                                 lambda up, t: self._up(t, up), lambda head, t: self._conv(t, head))


class _EnsembleEngine:
    def __init__(self, members: List[_UNetEngine]):
        self.members = members

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = self.members[0](x)
        for m in self.members[1:]:
            out = out + m(x)
        return out / len(self.members)


def cpu_engine(network: nn.Module) -> Optional[Engine]:
    """A function computing ``network(x)`` faster on a CPU (see the module docstring), or
    ``None`` when the network, its parameters or this torch build are not supported."""
    if not torch.backends.mkldnn.is_available():
        return None
    if type(network) is UNet3D:
        return _UNetEngine(network) if supported_unet(network) else None
    if type(network) is UNet3DEnsemble:
        if all(supported_unet(m) for m in network.members):
            return _EnsembleEngine([_UNetEngine(m) for m in network.members])
    return None


def agreement(engine: Engine, network: nn.Module, x: torch.Tensor) -> float:
    """Largest absolute difference between ``engine(x)`` and ``network(x)``, relative to the
    largest absolute logit (a check that the engine computes this network on this build)."""
    with torch.inference_mode():
        ref = network(x)
        out = engine(x)
    return float((out - ref).abs().max() / ref.abs().max().clamp_min(1e-6))


#: network -> {probe key: agreement}: the probe's result for a network whose parameters have not
#: changed since (a folder of scans predicted with one model probes once, not once per scan).
_PROBED: "weakref.WeakKeyDictionary[nn.Module, Dict[tuple, float]]" = weakref.WeakKeyDictionary()
_PROBED_LOCK = threading.Lock()


def _probe_key(engine: Engine, network: nn.Module, window_shape) -> tuple:
    """What the probe's result depends on: the window, the engine's class, and every parameter and
    buffer's storage and version counter (an in-place update, e.g. an optimizer step or
    ``load_state_dict``, bumps the version, so a changed network is probed again)."""
    state = tuple((t.data_ptr(), t._version, tuple(t.shape), t.dtype)
                  for t in list(network.parameters()) + list(network.buffers()))
    return (tuple(int(v) for v in window_shape), type(engine), state)


def probe_agreement(engine: Engine, network: nn.Module, window_shape) -> float:
    """:func:`agreement` on one fixed random window of ``window_shape`` (C, D, H, W).

    A random input, not a window of the image: an image's first window is usually background,
    nearly constant, where instance norms divide by a tiny spread and any two correct
    implementations (the module in two layouts, too) differ by far more than their rounding.

    For this module's engines the result is remembered for ``network`` while its parameters and
    buffers are unchanged (same storage and version counters) and the window shape is the same;
    any other callable is probed at every call."""
    if type(engine) not in (_UNetEngine, _EnsembleEngine):  # another callable: no memory of it
        gen = torch.Generator().manual_seed(0)
        return agreement(engine, network, torch.randn(1, *[int(v) for v in window_shape], generator=gen))
    key = _probe_key(engine, network, window_shape)
    with _PROBED_LOCK:
        seen = _PROBED.get(network)
        if seen is not None and key in seen:
            return seen[key]
    gen = torch.Generator().manual_seed(0)
    value = agreement(engine, network, torch.randn(1, *[int(v) for v in window_shape], generator=gen))
    with _PROBED_LOCK:
        _PROBED.setdefault(network, {})[key] = value
    return value
