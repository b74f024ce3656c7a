"""Semi-supervised training for imbalanced classes: cross pseudo supervision (CPS) with
heterogeneous class weights and Double-Mix pseudo-labels.

What it follows (our own implementation, written from the papers):

* CPS (Chen et al., CVPR 2021): two networks of the same shape, differently initialised,
  see the same labelled and unlabelled patches; each learns from the labels and from the
  other network's argmax pseudo-labels on every patch, the latter with a weight ramped up
  by a sigmoid schedule (``exp(-5 (1 - t)^2)``, Laine & Aila).
* DHC (Wang & Li, MICCAI 2023): the two networks are weighted differently, so that they
  disagree usefully on rare classes; here network A uses CDifW and network B DisW
  (:mod:`imbalanceseglib.class_weights`) by default, as Double-Mix pairs them.  DisW follows the
  class counts of B's own pseudo-labels on the unlabelled patches (DHC); DifW/CDifW follow
  A's Dice and confidence on the labelled patches.
* Double-Mix (Zhang, Hayashi, Oda, Mori, IJCARS 2024): each network has an EMA teacher.  For
  each (labelled, unlabelled) pair a few classes are drawn with probability proportional to
  that network's class weights among the classes present, a mask is made of the voxels of
  those classes, and the two patches are mixed through the mask, their labels (ground truth
  and teacher pseudo-label) the same way: once pasting the unlabelled patch's drawn classes
  onto the labelled patch, once pasting the labelled patch's drawn classes onto the
  unlabelled one.  The mixes built from network A's weights and teacher train network B,
  and the other way round.

The result is an ordinary model bundle whose network is a
:class:`~imbalanceseglib.networks.UNet3DEnsemble` of the two students: inference, calibration
and label-free estimation use the mean of their logits.

Settings (``TrainConfig.semi_supervised``, validated with the config by
:func:`imbalanceseglib.train_config.semi_supervised_settings`; presets ``cps``, ``cps_weighted``,
``double_mix`` in :data:`imbalanceseglib.presets.METHOD_PRESETS`):

``method``            ``none`` | ``cps`` | ``double_mix``
``weights_a/b``       class weighting of each network (as ``TrainConfig.class_weighting``)
``unsup_weight``      weight of the CPS loss once ramped up (default 0.1, Double-Mix's setting)
``rampup``            fraction of the iterations over which that weight ramps up (default 0.4)
``mix_weight``        weight of the Double-Mix loss (default 0.5)
``mix_start``         fraction of the iterations before mixing starts (teachers must have
                      learned something first; default 0.1)
``mix_target``        what a network learns from on a mixed patch: ``mixed_labels`` (default, the
                      paper's description: the ground truth and the teacher's pseudo-label, mixed
                      as the images were) or ``own_prediction`` (the network's own argmax on the
                      mixed patch, as the authors' published training script does; it adds no
                      teacher pseudo-label as a target, so a teacher's mistakes are not taught)
``ema_decay``         teacher EMA decay (default 0.99, with the usual ``min(1 - 1/(t+1), decay)`` warm-up)
``unlabeled_batch_size`` unlabelled patches per iteration (default: ``batch_size``)

Deep supervision (``TrainConfig.deep_supervision``, :mod:`imbalanceseglib.deep_supervision`):
each network gets its own auxiliary heads, and its supervised loss on the labelled patches
becomes the deep-supervised one (the heads run on the labelled rows of the batch only).  The
pseudo-label losses (CPS and Double-Mix, whose targets are the other network's or a teacher's
argmax) stay at full resolution, on the main outputs; so do the class weights' updates and the
teachers' pseudo-labels.  The heads are checkpointed with the students, not put in the bundle.

The loop around the two-network step (resume, logs, validation, checkpoints, bundle) is the one
the supervised trainer runs: :class:`imbalanceseglib.training_loop.TrainingLoop`.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from . import events as ev
from .class_weights import DistributionWeights, class_voxel_counts as batch_voxel_counts
from .deep_supervision import AuxiliaryHeads, DeepSupervisionLoss, card_entry, deep_outputs, output_weights
from .losses import weighted_ce
from .networks import build_network, set_activation_checkpointing
from .train_config import MIX_TARGETS, TrainConfig, make_class_weighter
from .training_data import Case, PatchSampler, check_training_data
from .training_engine import training_forward
from .training_loop import (LogFn, TrainingLoop, begin_run, build_augmenter, build_training_loss, named_weights,
                            update_class_weighter, with_input_profile)

# --------------------------------------------------------------------------- building blocks


def sigmoid_rampup(step: float, length: float) -> float:
    """``exp(-5 (1 - t)^2)`` with ``t = clip(step / length, 0, 1)``; 1 when ``length`` is 0."""
    if length <= 0:
        return 1.0
    t = min(max(float(step) / float(length), 0.0), 1.0)
    return float(np.exp(-5.0 * (1.0 - t) ** 2))


@torch.no_grad()
def ema_update(teacher: torch.nn.Module, student: torch.nn.Module, decay: float, step: int) -> float:
    """``teacher <- a * teacher + (1 - a) * student`` with ``a = min(1 - 1 / (step + 1), decay)``.

    ``step`` counts from 0, so the first update copies the student (a = 0) and early teachers
    follow their students closely.  Buffers are copied.  Returns ``a``.
    """
    a = min(1.0 - 1.0 / (step + 1), float(decay))
    for tp, sp in zip(teacher.parameters(), student.parameters()):
        tp.mul_(a).add_(sp.detach(), alpha=1.0 - a)
    for tb, sb in zip(teacher.buffers(), student.buffers()):
        tb.copy_(sb)
    return a


def sample_mix_classes(label: torch.Tensor, weights: Optional[torch.Tensor], generator: torch.Generator,
                       draws: Optional[int] = None) -> torch.Tensor:
    """Classes to mix: ``draws`` draws (default: as many as classes present) with replacement
    among the classes present in ``label``, each with probability proportional to its
    weight; the distinct classes drawn, sorted.  Without weights (or all zero) uniform."""
    present = torch.unique(label)
    if weights is None:
        w = torch.ones(len(present), dtype=torch.float64)
    else:
        w = torch.as_tensor(weights, dtype=torch.float64).reshape(-1)[present.long()].clamp_min(0.0)
        if not bool(w.sum() > 0):
            w = torch.ones(len(present), dtype=torch.float64)
    n = int(draws) if draws is not None else len(present)
    idx = torch.multinomial(w, n, replacement=True, generator=generator)
    return torch.unique(present[idx])


def mix_through_mask(mask: torch.Tensor, image_in: torch.Tensor, label_in: torch.Tensor,
                     image_out: torch.Tensor, label_out: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Image and labels taken from ``*_in`` where ``mask`` is set and from ``*_out`` elsewhere
    (hard selection, so every voxel keeps a label that belongs to its intensity)."""
    m = mask.bool()
    return torch.where(m, image_in, image_out), torch.where(m, label_in, label_out)


def double_mix(x_l: torch.Tensor, y_l: torch.Tensor, x_u: torch.Tensor, q_u: torch.Tensor,
               weights: Optional[torch.Tensor], generator: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
    """Double-Mix of labelled patches ``(x_l, y_l)`` and unlabelled ones ``x_u`` with pseudo-labels
    ``q_u`` (all (N, 1, ...), the same N): for each pair, the unlabelled patch's drawn classes
    pasted onto the labelled patch, then the labelled patch's drawn classes pasted onto the
    unlabelled one.  Returns (2N, 1, ...) images and integer labels."""
    if x_l.shape != x_u.shape or y_l.shape != q_u.shape or x_l.shape[0] != y_l.shape[0]:
        raise ValueError(f"double_mix needs matching shapes, got {tuple(x_l.shape)}, {tuple(y_l.shape)}, "
                         f"{tuple(x_u.shape)}, {tuple(q_u.shape)}")
    xs, ys = [], []
    for i in range(x_l.shape[0]):
        m_u = torch.isin(q_u[i], sample_mix_classes(q_u[i], weights, generator))
        x1, y1 = mix_through_mask(m_u, x_u[i], q_u[i], x_l[i], y_l[i])
        m_l = torch.isin(y_l[i], sample_mix_classes(y_l[i], weights, generator))
        x2, y2 = mix_through_mask(m_l, x_l[i], y_l[i], x_u[i], q_u[i])
        xs += [x1, x2]
        ys += [y1, y2]
    return torch.stack(xs), torch.stack(ys)


def mix_loss(forward, mixed_images: torch.Tensor, mixed_labels: torch.Tensor, loss_fn,
             weights: Optional[torch.Tensor], target: str = "mixed_labels") -> torch.Tensor:
    """The Double-Mix term of one network: ``loss_fn`` of its output on the mixed patches against
    ``mixed_labels`` (``target="mixed_labels"``) or against its own argmax on those patches
    (``"own_prediction"``, no gradient through the target)."""
    out = forward(mixed_images)
    if target == "own_prediction":
        mixed_labels = out.detach().argmax(1, keepdim=True)
    elif target not in MIX_TARGETS:
        raise ValueError(f"mix target must be one of {', '.join(MIX_TARGETS)}, got {target!r}")
    return loss_fn(out, mixed_labels, class_weights=weights)


def cps_loss(logits: torch.Tensor, other_logits: torch.Tensor, weights: Optional[torch.Tensor]) -> torch.Tensor:
    """(Weighted) cross-entropy of ``logits`` against the argmax of the other network (no gradient
    into the other network): the cross pseudo supervision term of one network."""
    pseudo = other_logits.detach().argmax(1)
    target = F.one_hot(pseudo, logits.shape[1]).movedim(-1, 1).to(logits.dtype)
    w = None if weights is None else torch.as_tensor(weights, dtype=logits.dtype)
    return weighted_ce(logits, target, w)


# --------------------------------------------------------------------------- training


def train_semi_supervised(config: TrainConfig, labelled_cases: Sequence[Case], unlabelled_cases: Sequence[Case],
                          val_cases: Sequence[Case], out_dir: Path, resume: bool = True, log: LogFn = print,
                          extra_card: Optional[Dict[str, Any]] = None, events: Optional[ev.EventFn] = None) -> Path:
    """Two-network semi-supervised training (see the module docstring); writes
    ``<out_dir>/<name>.imbseg`` and returns its path.  Checkpoints, resume, ``events``
    (iteration, validation, checkpoint, bundle and warning events) and the summary of classes
    never learned as :func:`imbalanceseglib.training.train`; the progress line names each class
    weight of network A and of network B (``weights A Background=0.05 ...; B Background=1.00 ...``)."""
    ss = config.validated().semi_settings
    if ss["method"] == "none":
        raise ValueError("semi_supervised.method is 'none': use imbalanceseglib.training.train")
    if not unlabelled_cases:
        raise ValueError(f"semi-supervised training ({ss['method']}) needs unlabelled images; none were given")
    for case in unlabelled_cases:
        if not np.isfinite(case.image).all():
            raise ValueError(f"unlabelled case {case.name or '?'} has NaN or infinite intensities")
    voxel_counts = check_training_data(config, labelled_cases)
    out_dir = begin_run(config, out_dir)
    n_cls = len(config.classes)
    arch_params = {"in_channels": 1, "out_channels": n_cls, "features": list(config.features), "members": 2}
    network = build_network("UNet3DEnsemble", arch_params)
    set_activation_checkpointing(network, config.activation_checkpointing)
    net_a, net_b = network.members[0], network.members[1]
    use_mix = ss["method"] == "double_mix"
    teachers = copy.deepcopy(network) if use_mix else None
    if teachers is not None:
        teachers.requires_grad_(False)
    deep = config.deep_supervision_settings
    heads = (torch.nn.ModuleList(AuxiliaryHeads(config.features, n_cls, deep["levels"]) for _ in range(2))
             if deep["enabled"] else None)  # network A's, then B's
    loop = TrainingLoop(config, network, out_dir, val_cases, log=log, events=events, teachers=teachers,
                        with_teachers=True, auxiliary=heads)
    names = [c["name"] for c in config.classes]
    fractions = (voxel_counts / voxel_counts.sum()).tolist()
    loss_fn, rare_names, rare_mask = build_training_loss(config, names, fractions)
    deep_loss = DeepSupervisionLoss(loss_fn, output_weights(deep)) if heads is not None else None
    weighters = [make_class_weighter(ss["weights_a"], n_cls), make_class_weighter(ss["weights_b"], n_cls)]
    for w in weighters:
        if isinstance(w, DistributionWeights):
            w.update(torch.as_tensor(voxel_counts))  # start from the labelled data's distribution (DHC)
    augmenter = build_augmenter(config, rare_mask)
    sampler_l = PatchSampler(labelled_cases, config.patch_size, config.foreground_fraction, augmenter)
    sampler_u = PatchSampler(unlabelled_cases, config.patch_size, 0.0)
    bs_u = ss["unlabeled_batch_size"] or config.batch_size
    rng = loop.rng
    gen = torch.Generator()
    ramp_len = ss["rampup"] * config.iterations
    mix_from = int(round(ss["mix_start"] * config.iterations))
    log(f"semi-supervised {ss['method']} ({config.method}): {len(labelled_cases)} labelled, "
        f"{len(unlabelled_cases)} unlabelled cases; loss {config.loss.get('name')}; weights A "
        f"{ss['weights_a'].get('method')}, B {ss['weights_b'].get('method')}; unsupervised weight "
        f"{ss['unsup_weight']:g} ramped over {ramp_len:.0f} iterations"
        + (f"; Double-Mix from iteration {mix_from}, weight {ss['mix_weight']:g}, targets "
           f"{ss['mix_target'].replace('_', ' ')}" if use_mix else "")
        + (f"; deep supervision of the supervised losses at {deep['levels']} coarser decoder level(s)"
           if heads is not None else ""))

    def load_class_weights(states) -> None:
        for w, state in zip(weighters, states):
            if w is not None:
                w.load_state_dict(state)

    if resume:
        loop.resume(load_class_weights)
    said = set()

    def log_once(message: str) -> None:  # the two networks' engine lines, once when they say the same
        if message not in said:
            said.add(message)
            log(message)

    fwd_a, fwd_b = training_forward(net_a, log_once), training_forward(net_b, log_once)  # CPU path or module
    ramp = 0.0  # the CPS weight of the last step, for the log

    def step(it: int) -> Dict[str, float]:
        nonlocal ramp
        x_l, y_l = sampler_l.batch(rng, config.batch_size)
        labelled_names = list(sampler_l.last_cases)
        x_u, _ = sampler_u.batch(rng, bs_u)
        gen.manual_seed(int(rng.integers(2 ** 62)))
        w_a = weighters[0].weights if weighters[0] is not None else None
        w_b = weighters[1].weights if weighters[1] is not None else None
        nl = x_l.shape[0]
        x = torch.cat([x_l, x_u])
        if heads is None:
            out_a, out_b = fwd_a(x), fwd_b(x)
            sup = loss_fn(out_a[:nl], y_l, class_weights=w_a) + loss_fn(out_b[:nl], y_l, class_weights=w_b)
        else:  # the heads on the labelled rows; the pseudo-label losses below use the main outputs
            out_a, aux_a = deep_outputs(fwd_a, heads[0], x, rows=slice(0, nl))
            out_b, aux_b = deep_outputs(fwd_b, heads[1], x, rows=slice(0, nl))
            sup = (deep_loss([out_a[:nl]] + aux_a, y_l, class_weights=w_a)
                   + deep_loss([out_b[:nl]] + aux_b, y_l, class_weights=w_b))
        cps = cps_loss(out_a, out_b, w_a) + cps_loss(out_b, out_a, w_b)
        ramp = ss["unsup_weight"] * sigmoid_rampup(it, ramp_len)
        loss = sup + ramp * cps
        mix = torch.zeros(())
        if use_mix and it >= mix_from:
            n = min(nl, x_u.shape[0])
            with torch.no_grad():
                q_a = teachers.members[0](x_u[:n]).argmax(1, keepdim=True)
                q_b = teachers.members[1](x_u[:n]).argmax(1, keepdim=True)
            mx_a, my_a = double_mix(x_l[:n], y_l[:n], x_u[:n], q_a, w_a, gen)  # A's view: trains B
            mx_b, my_b = double_mix(x_l[:n], y_l[:n], x_u[:n], q_b, w_b, gen)  # B's view: trains A
            mix = (mix_loss(fwd_b, mx_a, my_a, loss_fn, w_b, ss["mix_target"])
                   + mix_loss(fwd_a, mx_b, my_b, loss_fn, w_a, ss["mix_target"]))
            loss = loss + ss["mix_weight"] * mix
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"loss became {loss.item()} at iteration {it + 1} (labelled batch from cases "
                f"{', '.join(labelled_names)}; non-finite network output: "
                f"{not bool(torch.isfinite(out_a).all() and torch.isfinite(out_b).all())}); training stopped, "
                f"{loop.kept()}. Lower the learning rate or check these cases.")
        loop.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(loop.parameters, 12.0)
        loop.optimizer.step()
        loop.scheduler.step()
        if teachers is not None:
            ema_update(teachers, network, ss["ema_decay"], it)
        for w, out in zip(weighters, (out_a, out_b)):
            if isinstance(w, DistributionWeights):  # DHC: counts of the network's pseudo-labels on unlabelled data
                w.update(batch_voxel_counts(out[nl:].detach().argmax(1), n_cls))
            elif w is not None:
                update_class_weighter(w, out[:nl].detach(), y_l)
        return {key: float(v.item()) for key, v in (("loss", loss), ("sup", sup), ("cps", cps), ("mix", mix))}

    def report(done: int, mean: Dict[str, float], elapsed: float, speed: str):
        entry: Dict[str, Any] = {"iteration": done, "elapsed_s": elapsed, "unsup_weight": ramp, **mean}
        for tag, w in zip("ab", weighters):
            if w is not None:
                entry[f"class_weights_{tag}"] = [round(float(v), 4) for v in w.weights]
        weights = "; ".join(f"{tag.upper()} {named_weights(names, entry[f'class_weights_{tag}'])}"
                            for tag in "ab" if f"class_weights_{tag}" in entry)
        line = (f"iter {done:>6}/{config.iterations}  loss {entry['loss']:.4f} (sup {entry['sup']:.4f}, cps "
                f"{entry['cps']:.4f} x {ramp:.3f}" + (f", mix {entry['mix']:.4f}" if use_mix else "") +
                f")  {speed}" + (f"  weights {weights}" if weights else ""))
        return entry, line

    loop.run(step, report, class_weights=lambda: [w.state_dict() if w is not None else None for w in weighters],
             val_label="val dice (mean of the two networks)")
    return loop.finish({"arch": "UNet3DEnsemble", "params": arch_params}, rare_names, voxel_counts,
                       len(labelled_cases), extra_card=with_input_profile(extra_card, labelled_cases),
                       training_extra={"semi_supervised": {**ss, "unlabelled_cases": len(unlabelled_cases),
                                                           "inference": "mean of the two networks' logits"},
                                       **({"deep_supervision": {**card_entry(deep), "applies_to": (
                                           "the supervised loss of each network; the pseudo-label losses stay at "
                                           "full resolution")}} if heads is not None else {})})
