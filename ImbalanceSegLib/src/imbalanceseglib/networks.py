"""Network architectures that a model bundle may name.

A bundle stores an architecture *name* and its keyword arguments as JSON; the
loader builds the network from this registry only, so loading a bundle never
imports or executes code named by the file.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

#: ``on_decoder(level, features)``: receives each decoder level's output (:meth:`UNet3D.walk`).
DecoderHook = Callable[[int, torch.Tensor], None]

#: The most context classes a :class:`UNet3D` may merge into its background (bundles are bounded).
MAX_CONTEXT_CLASSES = 16


def merge_context_logits(logits: torch.Tensor, classes: int) -> torch.Tensor:
    """(N, classes + C, ...) logits whose last C channels are parts of the background (context
    labels, :mod:`imbalanceseglib.context_labels`) as (N, classes, ...) logits: channel 0 becomes
    ``logsumexp`` of channel 0 and the context channels, the others are kept.  The softmax of the
    result is the softmax of the input with the background's and the context channels'
    probabilities summed (both softmaxes share the normaliser ``sum_c exp(z_c)``)."""
    if logits.shape[1] <= classes:
        return logits
    background = torch.logsumexp(torch.cat([logits[:, :1], logits[:, classes:]], dim=1), dim=1, keepdim=True)
    return torch.cat([background, logits[:, 1:classes]], dim=1)


class ConvBlock(nn.Sequential):
    """Two (conv3x3x3 -> instance norm -> leaky ReLU) layers; the first may stride."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__(
            nn.Conv3d(cin, cout, 3, stride=stride, padding=1, bias=False),
            nn.InstanceNorm3d(cout, affine=True),
            nn.LeakyReLU(0.01, inplace=True),
            nn.Conv3d(cout, cout, 3, padding=1, bias=False),
            nn.InstanceNorm3d(cout, affine=True),
            nn.LeakyReLU(0.01, inplace=True),
        )


class UNet3D(nn.Module):
    """A plain nnU-Net-style 3D U-Net.

    Strided convolutions downsample, transposed convolutions upsample, skip
    connections concatenate. ``features`` gives the channel count at each
    resolution level; the input size must be divisible by ``2**(len(features)-1)``
    (sliding-window inference takes care of that).

    ``context_classes`` (a network trained with context labels,
    :mod:`imbalanceseglib.context_labels`): the head has ``out_channels + context_classes``
    outputs, the last ``context_classes`` of them parts of the background, and the network
    returns ``out_channels`` logits: those context logits merged into the background's by
    :func:`merge_context_logits` (log-sum-exp, so the softmax gives the background the sum of
    their probabilities) as the last step of :meth:`walk`, which every way of running it shares.
    """

    def __init__(self, in_channels: int = 1, out_channels: int = 2,
                 features: Sequence[int] = (16, 32, 64, 128), context_classes: int = 0):
        super().__init__()
        if len(features) < 2:
            raise ValueError("UNet3D needs at least two resolution levels (features)")
        if in_channels < 1 or out_channels < 2:
            raise ValueError("UNet3D needs in_channels >= 1 and out_channels >= 2")
        if not 0 <= int(context_classes) <= MAX_CONTEXT_CLASSES:
            raise ValueError(f"UNet3D context_classes must be in 0..{MAX_CONTEXT_CLASSES}, got {context_classes!r}")
        self.in_channels = int(in_channels)
        self.out_channels = int(out_channels)
        self.context_classes = int(context_classes)
        self.features = [int(f) for f in features]
        self.encoders = nn.ModuleList()
        cin = self.in_channels
        for level, f in enumerate(self.features):
            self.encoders.append(ConvBlock(cin, f, stride=1 if level == 0 else 2))
            cin = f
        self.upsamplers = nn.ModuleList()
        self.decoders = nn.ModuleList()
        for f_skip, f_deep in zip(reversed(self.features[:-1]), reversed(self.features[1:])):
            self.upsamplers.append(nn.ConvTranspose3d(f_deep, f_skip, 2, stride=2, bias=False))
            self.decoders.append(ConvBlock(2 * f_skip, f_skip))
        self.head = nn.Conv3d(self.features[0], self.out_channels + self.context_classes, 1)
        # Activation checkpointing (training only; see set_activation_checkpointing).
        self.checkpointing = False

    @property
    def size_divisor(self) -> int:
        return 2 ** (len(self.features) - 1)

    def _run(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.checkpointing and torch.is_grad_enabled():
            return checkpoint(block, x, use_reentrant=False)
        return block(x)

    def forward(self, x: torch.Tensor, on_decoder: Optional[DecoderHook] = None) -> torch.Tensor:
        """The logits; ``on_decoder`` (training with deep supervision only) as in :meth:`walk`."""
        return self.walk(x, self._run, lambda up, t: up(t), lambda head, t: head(t), on_decoder)

    def walk(self, x: torch.Tensor, block: Callable[[nn.Module, torch.Tensor], torch.Tensor],
             upsample: Callable[[nn.Module, torch.Tensor], torch.Tensor],
             head: Callable[[nn.Module, torch.Tensor], torch.Tensor],
             on_decoder: Optional[DecoderHook] = None) -> torch.Tensor:
        """The U-Net's wiring, with each kind of step run by the given function (``forward``
        runs the modules themselves; :mod:`imbalanceseglib.cpu_engine` its own kernels), so
        every way of running the network follows one definition of it.

        ``on_decoder(level, features)``, when given, receives each decoder block's output as it
        is made, coarsest first: level ``len(features) - 2`` (``2**level`` times coarser than
        the input, ``features[level]`` channels) down to level 0, the features the head reads.
        Deep supervision (:mod:`imbalanceseglib.deep_supervision`) puts its auxiliary heads
        there; what the hook returns is ignored, and without it nothing else is computed.

        With ``context_classes`` the head's context logits are merged into the background's
        (:func:`merge_context_logits`) after ``head``."""
        skips: List[torch.Tensor] = []
        for enc in self.encoders:
            x = block(enc, x)
            skips.append(x)
        x = skips.pop()
        for level, (up, dec) in zip(range(len(self.decoders) - 1, -1, -1), zip(self.upsamplers, self.decoders)):
            x = block(dec, torch.cat([upsample(up, x), skips.pop()], dim=1))
            if on_decoder is not None:
                on_decoder(level, x)
        logits = head(self.head, x)
        return merge_context_logits(logits, self.out_channels) if self.context_classes else logits


class UNet3DEnsemble(nn.Module):
    """Several UNet3D of the same shape whose logits are averaged.

    Semi-supervised cross pseudo supervision trains two networks side by side
    (:mod:`imbalanceseglib.semi_supervised`); the bundle keeps both and inference
    uses the mean of their logits, as DHC and Double-Mix evaluate.  Calibration
    and confidence maps then apply to that mean like to any single network.
    """

    def __init__(self, in_channels: int = 1, out_channels: int = 2, features: Sequence[int] = (16, 32, 64, 128),
                 members: int = 2):
        super().__init__()
        if isinstance(members, bool) or not isinstance(members, int) or not 2 <= members <= 8:
            raise ValueError(f"an ensemble needs 2 to 8 members, got {members!r}")
        self.members = nn.ModuleList(UNet3D(in_channels, out_channels, features) for _ in range(members))
        self.features = list(features)

    @property
    def size_divisor(self) -> int:
        return self.members[0].size_divisor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.members[0](x)
        for m in self.members[1:]:
            out = out + m(x)
        return out / len(self.members)


def set_activation_checkpointing(network: nn.Module, enabled: bool = True) -> nn.Module:
    """Recompute each U-Net block's activations in the backward pass instead of storing them
    (``torch.utils.checkpoint``): less memory for large training patches, about one more forward
    pass of compute. Results and gradients are unchanged; inference is unaffected."""
    for module in network.modules():
        if isinstance(module, UNet3D):
            module.checkpointing = bool(enabled)
    return network


_REGISTRY: Dict[str, Callable[..., nn.Module]] = {
    "UNet3D": UNet3D,
    "UNet3DEnsemble": UNet3DEnsemble,
}

_ALLOWED_KWARGS = {
    "UNet3D": {"in_channels": int, "out_channels": int, "features": list, "context_classes": int},
    "UNet3DEnsemble": {"in_channels": int, "out_channels": int, "features": list, "members": int},
}


def available_architectures() -> List[str]:
    return sorted(_REGISTRY)


def build_network(arch: str, params: Dict[str, Any]) -> nn.Module:
    """Build a registered network from JSON-safe parameters, validating them first."""
    if arch not in _REGISTRY:
        raise ValueError(
            f"unknown network architecture {arch!r}; known: {', '.join(available_architectures())}")
    allowed = _ALLOWED_KWARGS[arch]
    clean: Dict[str, Any] = {}
    for key, value in params.items():
        if key not in allowed:
            raise ValueError(f"network parameter {key!r} is not accepted by {arch}")
        kind = allowed[key]
        if kind is int:
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"network parameter {key!r} must be an integer, got {value!r}")
        elif kind is list:
            if not isinstance(value, list) or not all(
                    isinstance(v, int) and not isinstance(v, bool) and 0 < v <= 4096 for v in value):
                raise ValueError(f"network parameter {key!r} must be a list of positive integers")
        clean[key] = value
    return _REGISTRY[arch](**clean)
