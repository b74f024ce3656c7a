"""Context label learning (CoLab): a task generator splits the background into context classes
that help the segmentation of the small foreground, and is meta-learned with the segmentation
network.

Li, Kamnitsas, Ouyang, Chen & Glocker, "Context label learning: improving background class
representations in semantic segmentation", IEEE TMI 2023 (code: github.com/ZerojumpLine/CoLab).
A background made of many different structures is hard to map to one compact class; the
segmentation network is trained instead with ``K + C`` outputs, the ``K`` classes of the task and
``C`` *context classes*, parts of the background whose labels a second network, the *task
generator*, makes.  Here (``TrainConfig.context_labels``; settings and defaults in
:data:`imbalanceseglib.train_config.CONTEXT_LABELS_DEFAULTS`):

* the generator is a :class:`~imbalanceseglib.networks.UNet3D` from the image to ``C + 1``
  logits; their softmax ``g`` splits each background voxel between the background (channel 0)
  and the context classes (:func:`context_targets`): a background voxel's target is
  ``g_0`` for the background and ``g_j`` for context class ``j`` (segmentation output ``K + j - 1``),
  a foreground voxel keeps its one-hot label.  As the authors' code, context labels are made
  only near the foreground: with the distance ``d`` (mm) from a background voxel to the
  patch's nearest foreground voxel, ``w = min(1, exp((near_mm - d) / falloff_mm))`` of the
  voxel's target is the generated split and ``1 - w`` plain background
  (:func:`neighbourhood_weights`);
* the segmentation network trains on these soft targets with the configured loss over all
  ``K + C`` classes (:func:`context_loss`: asymmetric losses keep the config's rare classes, the
  context classes are never rare; class weights give each context class the background's
  weight, :func:`expand_class_weights`); deep supervision's heads get ``K + C`` outputs too;
* every ``update_every`` iterations the generator takes a meta step
  (:func:`meta_gradient`): the segmentation network's parameters ``theta`` take one look-ahead
  step on the batch with the generated targets, ``theta' = theta - a * grad L_train(theta, T(phi))``,
  and the look-ahead network's loss on the real labels, :func:`foreground_bce` (binary
  cross-entropy of each foreground class, the authors' meta objective, on the merged
  probabilities), is what the generator's parameters ``phi`` descend:
  ``dL_meta(theta')/dphi = -a * d/dphi [grad_theta L_train(theta, T(phi)) . v]`` with
  ``v = grad L_meta(theta')``.  As in the authors' code (DARTS' approximation) the mixed second
  derivative is a central difference, ``(grad_T L_train(theta + e v) - grad_T L_train(theta - e v)) / 2e``
  with ``e = 0.01 / |v|``, back-propagated from the targets through the generator; the
  look-ahead is therefore never differentiated, and runs through the same function as
  training (the CPU training path, :mod:`imbalanceseglib.training_engine`, or the module) with
  the parameters swapped in place and restored bit for bit (the path reads every parameter at
  each call), so no ``torch.func.functional_call`` is needed.  (A first-order approximation,
  dropping this term as first-order MAML or DARTS do, would leave the generator no gradient at
  all: the meta objective depends on it only through the look-ahead);
* at inference the context outputs are merged into the background inside the bundled network
  (``UNet3D(context_classes=C)``: log-sum-exp of the background and context logits, so the
  background's probability is their sum, :func:`imbalanceseglib.networks.merge_context_logits`),
  which therefore predicts the ``K`` classes of the card: inference, calibration and label-free
  estimation see an ordinary network.  The generator trains and is checkpointed with the
  network (:meth:`ContextLabels.state_dict`), never put in the bundle.

Where this differs from the authors' code, and why: the look-ahead is a plain gradient step of
``lookahead_learning_rate`` (the authors': their SGD learning rate, ignoring its momentum; here
the network trains with AdamW, whose step is not a fixed multiple of the gradient), the meta
step takes the whole batch at once (the authors' loops over its samples, updating the
generator after each), the distances are measured in mm within the patch (theirs in voxels of
the whole case, so a patch without foreground gets no context labels here), and the
merged-background prediction replaces their argmax over all ``K + C`` outputs.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import nn

from .losses import build_loss
from .networks import UNet3D, merge_context_logits

__all__ = ["ContextLabels", "context_loss", "context_targets", "expand_class_weights", "exported_network",
           "foreground_bce", "meta_gradient", "neighbourhood_weights"]

#: Relative size of the difference step of the mixed second derivative (DARTS', the authors' ``r``).
FINITE_DIFFERENCE = 1e-2


def neighbourhood_weights(labels: torch.Tensor, spacing: Sequence[float], near_mm: Optional[float],
                          falloff_mm: float) -> Optional[torch.Tensor]:
    """(N, 1, ...) share of each voxel's target that the generator decides: ``min(1, exp((near_mm -
    d) / falloff_mm))`` with ``d`` the distance in mm (``spacing``: the patch's axes, z first)
    from the voxel to the patch's nearest foreground voxel (0 on the foreground); 0 everywhere in
    a patch without foreground.  None (the whole background) when ``near_mm`` is None."""
    if near_mm is None:
        return None
    lab = labels.detach().cpu().numpy()
    out = np.zeros(lab.shape, dtype=np.float32)
    for i in range(lab.shape[0]):
        fg = lab[i, 0] > 0
        if not fg.any():
            continue
        d = ndimage.distance_transform_edt(~fg, sampling=[float(s) for s in spacing])
        out[i, 0] = np.minimum(1.0, np.exp((float(near_mm) - d) / float(falloff_mm)))
    return torch.from_numpy(out)


def context_targets(generated: torch.Tensor, labels: torch.Tensor, classes: int,
                    weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The (N, classes + C, ...) training target from the generator's (N, C + 1, ...)
    probabilities ``generated`` and the labels (N, 1, ...) of ``classes`` classes: a foreground
    voxel keeps its one-hot label; a background voxel gets ``w * g_0 + 1 - w`` for the background
    (channel 0) and ``w * g_j`` for context class ``j`` (channel ``classes + j - 1``), ``w`` from
    ``weights`` (:func:`neighbourhood_weights`; 1 when None).  Differentiable in ``generated``."""
    if generated.shape[0] != labels.shape[0] or generated.shape[2:] != labels.shape[2:] or labels.shape[1] != 1:
        raise ValueError(f"generated {tuple(generated.shape)} and labels {tuple(labels.shape)} do not match")
    lab = labels[:, 0].long()
    if lab.numel() and (lab.min() < 0 or lab.max() >= classes):
        raise ValueError(f"labels must lie in 0..{classes - 1}")
    onehot = F.one_hot(lab, classes).movedim(-1, 1).to(generated.dtype)
    g = generated
    if weights is not None:
        w = weights.to(generated.dtype)
        plain = torch.zeros_like(generated[:1])
        plain[:, 0] = 1.0
        g = w * generated + (1.0 - w) * plain
    background = onehot[:, :1]
    return torch.cat([background * g[:, :1], onehot[:, 1:], background * g[:, 1:]], dim=1)


def foreground_bce(logits: torch.Tensor, labels: torch.Tensor, classes: int) -> torch.Tensor:
    """The meta objective: ``sum over foreground classes c of -(y_c log p_c + (1 - y_c) log(1 - p_c))``
    averaged over the voxels, with ``p`` the softmax of the merged logits (context outputs summed
    into the background, :func:`~imbalanceseglib.networks.merge_context_logits`; a foreground
    class's probability is the same merged or not) and ``y_c`` whether the label is ``c``.
    ``log(1 - p_c)`` is computed as the log-sum-exp of the other classes' logits minus that of
    all, which stays finite where ``p_c`` rounds to 1."""
    z = merge_context_logits(logits, classes)
    lab = labels[:, 0].long()
    total_lse = torch.logsumexp(z, dim=1)
    loss = z.new_zeros(())
    for c in range(1, classes):
        y = (lab == c).to(z.dtype)
        log_p = z[:, c] - total_lse
        others = torch.cat([z[:, :c], z[:, c + 1:]], dim=1)
        log_not_p = torch.logsumexp(others, dim=1) - total_lse
        loss = loss - (y * log_p + (1.0 - y) * log_not_p).mean()
    return loss


def expand_class_weights(weights: Optional[torch.Tensor], context: int) -> Optional[torch.Tensor]:
    """(K,) class weights as (K + context,): each context class gets the background's weight."""
    if weights is None:
        return None
    w = torch.as_tensor(weights).reshape(-1)
    return torch.cat([w, w[:1].repeat(context)])


def context_loss(loss_settings: Dict[str, Any], names: Sequence[str], rare_names: Sequence[str],
                 context: int) -> nn.Module:
    """The configured loss (:func:`imbalanceseglib.losses.build_loss`) over the ``K + context``
    classes of a network trained with context labels: an asymmetric loss treats the config's
    rare classes (``rare_names``, or the loss's own ``rare_classes``) as rare and no context
    class; static ``class_weights`` give each context class the background's."""
    settings = dict(loss_settings)
    extended = list(names) + [f"(context {j})" for j in range(1, context + 1)]
    if str(settings.get("name", "")).startswith("asym"):
        settings.setdefault("rare_classes", list(rare_names))
    if isinstance(settings.get("class_weights"), list):
        cw = list(settings["class_weights"])
        settings["class_weights"] = cw + [cw[0]] * context
    return build_loss(settings, extended)


def exported_network(network: UNet3D, classes: int) -> UNet3D:
    """The network of the bundle: a ``UNet3D(context_classes=C)`` that shares ``network``'s
    modules (``classes + C`` outputs; no copy, so it always has the trained parameters) and merges
    the context outputs into the background, predicting ``classes`` classes."""
    context = network.out_channels - classes
    if type(network) is not UNet3D or network.context_classes or context < 1:
        raise ValueError(f"a network trained with context labels is a plain UNet3D with more than {classes} outputs")
    with torch.device("meta"):  # only the wiring; the modules are replaced by the network's
        view = UNet3D(network.in_channels, classes, network.features, context_classes=context)
    for name in ("encoders", "upsamplers", "decoders", "head"):
        setattr(view, name, getattr(network, name))
    view.checkpointing = network.checkpointing
    view.train(network.training)
    return view


def meta_gradient(forward: Callable[[torch.Tensor], torch.Tensor], parameters: Sequence[torch.Tensor],
                  x: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor, loss_fn: nn.Module, classes: int,
                  step: float, class_weights: Optional[torch.Tensor] = None,
                  difference: float = FINITE_DIFFERENCE) -> Optional[float]:
    """Back-propagate into whatever made ``targets`` (the generator) the gradient of the meta
    objective after a one-step look-ahead (see the module docstring); returns the look-ahead
    network's :func:`foreground_bce`, or None when its gradient is zero or not finite (nothing
    is back-propagated then).

    ``forward(x)`` gives the segmentation logits from ``parameters`` (read at each call);
    ``targets`` (N, K + C, ...) is :func:`context_targets` of the generator's output, with its
    graph; ``loss_fn(logits, target, class_weights=...)`` the training loss; ``step`` the
    look-ahead's step size.  The parameters are changed in place during the call and put back
    exactly; their ``.grad`` is not touched."""
    params = list(parameters)
    fixed = targets.detach()
    g = torch.autograd.grad(loss_fn(forward(x), fixed, class_weights=class_weights), params)
    saved = [p.detach().clone() for p in params]
    try:
        with torch.no_grad():
            for p, s, gi in zip(params, saved, g):
                p.copy_(s - step * gi)
        meta = foreground_bce(forward(x), labels, classes)
        value = float(meta.detach())
        v = torch.autograd.grad(meta, params)
        norm = math.sqrt(sum(float(vi.double().square().sum()) for vi in v))
        if not math.isfinite(norm) or norm == 0.0 or not math.isfinite(value):
            return None
        eps = difference / norm
        leaf = fixed.clone().requires_grad_(True)
        target_grads = []
        for sign in (1.0, -1.0):
            with torch.no_grad():
                for p, s, vi in zip(params, saved, v):
                    p.copy_(s + (sign * eps) * vi)
                out = forward(x)
            target_grads.append(torch.autograd.grad(loss_fn(out, leaf, class_weights=class_weights), leaf)[0])
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)
    targets.backward((target_grads[1] - target_grads[0]) * (step / (2.0 * eps)))
    return value


class ContextLabels:
    """The task generator of one training run, its optimizer and its meta steps.

    ``settings``: ``TrainConfig.context_labels_settings``; ``classes``: the task's classes
    ``K``; ``spacing``: the patches' voxel size in mm, z first; ``iterations``: the run's length
    (the learning rates decay as the network's, ``(1 - it / iterations) ** 0.9``).  Build it
    after the segmentation network (and deep supervision's heads), so that the network's layers
    start as in a run without context labels (all but its head, which has more outputs).

    ``generate`` is the function the generator runs through (the trainer sets its CPU training
    path, :func:`imbalanceseglib.training_engine.training_forward`; default the module)."""

    def __init__(self, settings: Dict[str, Any], classes: int, spacing: Sequence[float], iterations: int):
        self.settings = dict(settings)
        self.classes = int(classes)
        self.context = int(settings["classes"])
        self.spacing = [float(s) for s in spacing]
        self.iterations = int(iterations)
        self.generator = UNet3D(1, self.context + 1, list(settings["generator_features"]))
        self.optimizer = torch.optim.Adam(self.generator.parameters(), lr=float(settings["generator_learning_rate"]),
                                          betas=(0.9, 0.999), weight_decay=0.0)
        self.generate: Callable[..., torch.Tensor] = self.generator
        self.meta_steps = 0
        self.skipped = 0
        self.fractions: Optional[List[float]] = None

    @property
    def outputs(self) -> int:
        """The segmentation network's outputs while training: the classes and the context classes."""
        return self.classes + self.context

    def decay(self, it: int) -> float:
        return (1.0 - it / self.iterations) ** 0.9

    def due(self, it: int) -> bool:
        """Whether iteration ``it`` (from 0) takes a meta step."""
        return it % int(self.settings["update_every"]) == 0

    def _targets(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        generated = torch.softmax(self.generate(x), dim=1)
        weights = neighbourhood_weights(labels, self.spacing, self.settings["near_mm"], float(self.settings["falloff_mm"]))
        return context_targets(generated, labels, self.classes, weights)

    def targets(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The (N, K + C, ...) soft training target of a batch (no gradient)."""
        with torch.no_grad():
            return self._targets(x, labels)

    def meta_step(self, forward: Callable[[torch.Tensor], torch.Tensor], parameters: Sequence[torch.Tensor],
                  x: torch.Tensor, labels: torch.Tensor, loss_fn: nn.Module, it: int,
                  class_weights: Optional[torch.Tensor] = None) -> Optional[float]:
        """One generator update at iteration ``it`` (:func:`meta_gradient`, then Adam); returns the
        look-ahead meta objective, None when the step was skipped (zero or non-finite gradient)."""
        self.optimizer.zero_grad(set_to_none=True)
        targets = self._targets(x, labels)
        background = labels == 0
        if bool(background.any()):
            gen = targets[:, [0] + list(range(self.classes, self.outputs))].detach()
            self.fractions = [round(float(gen[:, j:j + 1][background].mean()), 4) for j in range(self.context + 1)]
        meta = meta_gradient(forward, parameters, x, labels, targets, loss_fn, self.classes,
                             float(self.settings["lookahead_learning_rate"]) * self.decay(it), class_weights)
        if meta is None:
            self.skipped += 1
            return None
        for group in self.optimizer.param_groups:
            group["lr"] = float(self.settings["generator_learning_rate"]) * self.decay(it)
        self.optimizer.step()
        self.meta_steps += 1
        return meta

    def state_dict(self) -> Dict[str, Any]:
        """What a checkpoint keeps (tensors, numbers and strings: loads with ``weights_only=True``)."""
        return {"generator": self.generator.state_dict(), "optimizer": self.optimizer.state_dict(),
                "meta_steps": self.meta_steps, "skipped": self.skipped,
                "fractions": torch.tensor(self.fractions if self.fractions is not None else [], dtype=torch.float64)}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.generator.load_state_dict(state["generator"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.meta_steps, self.skipped = int(state["meta_steps"]), int(state["skipped"])
        fractions = state["fractions"].tolist()
        self.fractions = fractions or None

    def card_entry(self) -> Dict[str, Any]:
        """The model card's ``training.context_labels``."""
        return {**self.settings, "outputs_in_training": self.outputs,
                "generator": {"arch": "UNet3D", "features": list(self.settings["generator_features"]),
                              "outputs": self.context + 1,
                              "parameters": sum(p.numel() for p in self.generator.parameters())},
                "meta_steps": self.meta_steps, "skipped_meta_steps": self.skipped,
                "background_split": self.fractions,
                "inference": "context outputs merged into the background inside the bundled network (log-sum-exp "
                             "of their logits: the background's probability is their sum); the task generator is "
                             "not in the bundle"}
