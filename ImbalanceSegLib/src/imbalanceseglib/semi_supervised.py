"""Semi-supervised training for imbalanced classes: cross pseudo supervision (CPS) with
heterogeneous class weights and Double-Mix pseudo-labels.

What it follows (our own implementation, written from the papers):

* CPS (Chen et al., CVPR 2021): two networks of the same shape, differently initialised,
  see the same labelled and unlabelled patches; each learns from the labels and from the
  other network's argmax pseudo-labels on every patch, the latter with a weight ramped up
  by a sigmoid schedule (``exp(-5 (1 - t)^2)``, Laine & Aila).
* DHC (Wang & Li, MICCAI 2023): the two networks are weighted differently, so that they
  disagree usefully on rare classes; here network A uses CDifW and network B DisW
  (:mod:`imbalanceseglib.imbalance`) by default, as Double-Mix pairs them.  DisW follows the
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

Settings (``TrainConfig.semi_supervised``; presets ``cps``, ``cps_weighted``, ``double_mix`` in
:data:`imbalanceseglib.training.METHOD_PRESETS`):

``method``            ``none`` | ``cps`` | ``double_mix``
``weights_a/b``       class weighting of each network (as ``TrainConfig.class_weighting``)
``unsup_weight``      weight of the CPS loss once ramped up (default 0.1, Double-Mix's setting)
``rampup``            fraction of the iterations over which that weight ramps up (default 0.4)
``mix_weight``        weight of the Double-Mix loss (default 0.5)
``mix_start``         fraction of the iterations before mixing starts (teachers must have
                      learned something first; default 0.1)
``ema_decay``         teacher EMA decay (default 0.99, with the usual ``min(1 - 1/(t+1), decay)`` warm-up)
``unlabeled_batch_size`` unlabelled patches per iteration (default: ``batch_size``)
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from . import events as ev
from .imbalance import DistributionWeights, class_voxel_counts as batch_voxel_counts
from .losses import weighted_ce

SEMI_METHODS = ("none", "cps", "double_mix")

DEFAULTS: Dict[str, Any] = {
    "method": "none",
    "weights_a": {"method": "none"},
    "weights_b": {"method": "none"},
    "unsup_weight": 0.1,
    "rampup": 0.4,
    "mix_weight": 0.5,
    "mix_start": 0.1,
    "ema_decay": 0.99,
    "unlabeled_batch_size": None,
}


def settings(config_entry: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """The semi-supervised settings with defaults filled in, validated (ValueError names the key)."""
    entry = dict(config_entry or {})
    unknown = sorted(set(entry) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"semi_supervised: unknown settings {unknown}; known: {sorted(DEFAULTS)}")
    s = {**copy.deepcopy(DEFAULTS), **entry}
    if s["method"] not in SEMI_METHODS:
        raise ValueError(f"semi_supervised.method must be one of {', '.join(SEMI_METHODS)}, got {s['method']!r}")
    for key, lo, hi in (("unsup_weight", 0.0, 1e3), ("rampup", 0.0, 1.0), ("mix_weight", 0.0, 1e3),
                        ("mix_start", 0.0, 1.0), ("ema_decay", 0.0, 1.0)):
        v = s[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= float(v) <= hi:
            raise ValueError(f"semi_supervised.{key} must be a number in [{lo:g}, {hi:g}], got {v!r}")
    ub = s["unlabeled_batch_size"]
    if ub is not None and (isinstance(ub, bool) or not isinstance(ub, int) or ub < 1):
        raise ValueError(f"semi_supervised.unlabeled_batch_size must be a positive integer, got {ub!r}")
    for key in ("weights_a", "weights_b"):
        if not isinstance(s[key], dict) or "method" not in s[key]:
            raise ValueError(f"semi_supervised.{key} must be a class weighting such as {{'method': 'disw'}}, "
                             f"got {s[key]!r}")
    return s


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


def cps_loss(logits: torch.Tensor, other_logits: torch.Tensor, weights: Optional[torch.Tensor]) -> torch.Tensor:
    """(Weighted) cross-entropy of ``logits`` against the argmax of the other network (no gradient
    into the other network): the cross pseudo supervision term of one network."""
    pseudo = other_logits.detach().argmax(1)
    target = F.one_hot(pseudo, logits.shape[1]).movedim(-1, 1).to(logits.dtype)
    w = None if weights is None else torch.as_tensor(weights, dtype=logits.dtype)
    return weighted_ce(logits, target, w)


# --------------------------------------------------------------------------- training


def train_semi_supervised(config, labelled_cases: Sequence, unlabelled_cases: Sequence, val_cases: Sequence,
                          out_dir: Path, resume: bool = True, log=print,
                          extra_card: Optional[Dict[str, Any]] = None, events: Optional[ev.EventFn] = None) -> Path:
    """Two-network semi-supervised training (see the module docstring); writes
    ``<out_dir>/<name>.imbseg`` and returns its path.  Checkpoints, resume and ``events``
    (iteration, validation, checkpoint and bundle events) as :func:`imbalanceseglib.training.train`."""
    from . import training as tr
    from .networks import build_network, set_activation_checkpointing

    ss = settings(config.semi_supervised)
    if ss["method"] == "none":
        raise ValueError("semi_supervised.method is 'none': use imbalanceseglib.training.train")
    if not unlabelled_cases:
        raise ValueError(f"semi-supervised training ({ss['method']}) needs unlabelled images; none were given")
    for case in unlabelled_cases:
        if not np.isfinite(case.image).all():
            raise ValueError(f"unlabelled case {case.name or '?'} has NaN or infinite intensities")
    voxel_counts = tr.check_training_data(config, labelled_cases)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    n_cls = len(config.classes)
    torch.manual_seed(config.seed)
    arch_params = {"in_channels": 1, "out_channels": n_cls, "features": list(config.features), "members": 2}
    network = build_network("UNet3DEnsemble", arch_params)
    set_activation_checkpointing(network, config.activation_checkpointing)
    net_a, net_b = network.members[0], network.members[1]
    use_mix = ss["method"] == "double_mix"
    teachers = copy.deepcopy(network) if use_mix else None
    if teachers is not None:
        teachers.requires_grad_(False)
    optimizer = torch.optim.AdamW(network.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: (1 - it / config.iterations) ** 0.9)
    names = [c["name"] for c in config.classes]
    fractions = (voxel_counts / voxel_counts.sum()).tolist()
    loss_fn, rare_names, rare_mask = tr.build_training_loss(config, names, fractions)
    weighters = [tr.make_class_weighter(ss["weights_a"], n_cls), tr.make_class_weighter(ss["weights_b"], n_cls)]
    for w in weighters:
        if isinstance(w, DistributionWeights):
            w.update(torch.as_tensor(voxel_counts))  # start from the labelled data's distribution (DHC)
    augmenter = tr.build_augmenter(config, rare_mask)
    sampler_l = tr.PatchSampler(labelled_cases, config.patch_size, config.foreground_fraction, augmenter)
    sampler_u = tr.PatchSampler(unlabelled_cases, config.patch_size, 0.0)
    bs_u = ss["unlabeled_batch_size"] or config.batch_size
    rng = np.random.default_rng(config.seed)
    gen = torch.Generator()
    ramp_len = ss["rampup"] * config.iterations
    mix_from = int(round(ss["mix_start"] * config.iterations))
    log(f"semi-supervised {ss['method']} ({config.method}): {len(labelled_cases)} labelled, "
        f"{len(unlabelled_cases)} unlabelled cases; loss {config.loss.get('name')}; weights A "
        f"{ss['weights_a'].get('method')}, B {ss['weights_b'].get('method')}; unsupervised weight "
        f"{ss['unsup_weight']:g} ramped over {ramp_len:.0f} iterations"
        + (f"; Double-Mix from iteration {mix_from}, weight {ss['mix_weight']:g}" if use_mix else ""))

    history: List[Dict[str, Any]] = []
    start_it, elapsed_before = 0, 0.0
    ckpt_path = out_dir / "checkpoint.pt"
    cfg_json = json.dumps(config.to_dict(), sort_keys=True)
    if resume and ckpt_path.exists():
        ck = tr._load_checkpoint(ckpt_path)
        if ck.get("config") != cfg_json:
            raise ValueError(f"{ckpt_path} was written with a different config; use another output folder or resume=False")
        network.load_state_dict(ck["model"])
        if teachers is not None:
            teachers.load_state_dict(ck["teachers"])
        optimizer.load_state_dict(ck["optimizer"])
        scheduler.load_state_dict(ck["scheduler"])
        torch.set_rng_state(ck["torch_rng"])
        rng.bit_generator.state = json.loads(ck["numpy_rng"])
        history = json.loads(ck["history"])
        for w, state in zip(weighters, json.loads(ck["class_weights"])):
            if w is not None:
                w.load_state_dict(state)
        start_it, elapsed_before = int(ck["iteration"]), float(ck["elapsed"])
        log(f"resuming from {ckpt_path} at iteration {start_it}/{config.iterations}")

    def checkpoint(it: int, elapsed: float) -> None:
        tr._save_checkpoint(ckpt_path, {
            "model": network.state_dict(), "teachers": teachers.state_dict() if teachers is not None else {},
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(), "numpy_rng": json.dumps(rng.bit_generator.state),
            "history": json.dumps(history), "iteration": it, "elapsed": elapsed, "config": cfg_json,
            "class_weights": json.dumps([w.state_dict() if w is not None else None for w in weighters])})

    t_start = time.perf_counter()
    running: Dict[str, List[float]] = {"loss": [], "sup": [], "cps": [], "mix": []}
    last_checkpoint = start_it if ckpt_path.exists() else None
    network.train()
    for it in range(start_it, config.iterations):
        x_l, y_l = sampler_l.batch(rng, config.batch_size)
        labelled_names = list(sampler_l.last_cases)
        x_u, _ = sampler_u.batch(rng, bs_u)
        gen.manual_seed(int(rng.integers(2 ** 62)))
        w_a = weighters[0].weights if weighters[0] is not None else None
        w_b = weighters[1].weights if weighters[1] is not None else None
        nl = x_l.shape[0]
        x = torch.cat([x_l, x_u])
        out_a, out_b = net_a(x), net_b(x)
        sup = loss_fn(out_a[:nl], y_l, class_weights=w_a) + loss_fn(out_b[:nl], y_l, class_weights=w_b)
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
            mix = loss_fn(net_b(mx_a), my_a, class_weights=w_b) + loss_fn(net_a(mx_b), my_b, class_weights=w_a)
            loss = loss + ss["mix_weight"] * mix
        if not torch.isfinite(loss):
            kept = (f"the checkpoint of iteration {last_checkpoint} in {ckpt_path} is kept"
                    if last_checkpoint is not None else "no checkpoint had been written yet")
            raise FloatingPointError(
                f"loss became {loss.item()} at iteration {it + 1} (labelled batch from cases "
                f"{', '.join(labelled_names)}; non-finite network output: "
                f"{not bool(torch.isfinite(out_a).all() and torch.isfinite(out_b).all())}); training stopped, "
                f"{kept}. Lower the learning rate or check these cases.")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(network.parameters(), 12.0)
        optimizer.step()
        scheduler.step()
        if teachers is not None:
            ema_update(teachers, network, ss["ema_decay"], it)
        for w, out in zip(weighters, (out_a, out_b)):
            if isinstance(w, DistributionWeights):  # DHC: counts of the network's pseudo-labels on unlabelled data
                w.update(batch_voxel_counts(out[nl:].detach().argmax(1), n_cls))
            elif w is not None:
                tr.update_class_weighter(w, out[:nl].detach(), y_l)
        for key, v in (("loss", loss), ("sup", sup), ("cps", cps), ("mix", mix)):
            running[key].append(float(v.item()))
        done = it + 1
        elapsed = elapsed_before + time.perf_counter() - t_start
        if done % config.log_every == 0 or done == config.iterations:
            rate = (done - start_it) / max(1e-9, time.perf_counter() - t_start)
            entry = {"iteration": done, "elapsed_s": elapsed, "unsup_weight": ramp,
                     **{k: float(np.mean(v)) for k, v in running.items()}}
            for tag, w in zip("ab", weighters):
                if w is not None:
                    entry[f"class_weights_{tag}"] = [round(float(v), 4) for v in w.weights]
            history.append(entry)
            log(f"iter {done:>6}/{config.iterations}  loss {entry['loss']:.4f} (sup {entry['sup']:.4f}, cps "
                f"{entry['cps']:.4f} x {ramp:.3f}" + (f", mix {entry['mix']:.4f}" if use_mix else "") +
                f")  {rate:.2f} it/s  eta {(config.iterations - done) / max(rate, 1e-9) / 60:.1f} min")
            if events is not None:
                events(ev.iteration(done, config.iterations, entry["loss"]))
            running = {k: [] for k in running}
        if val_cases and (done % config.val_every == 0 or done == config.iterations):
            tr.validation_step(network, val_cases, config, done, history, log,
                               label="val dice (mean of the two networks)", events=events)
        if done % config.checkpoint_every == 0 or done == config.iterations:
            checkpoint(done, elapsed)
            last_checkpoint = done
            if events is not None:
                events(ev.artifact("checkpoint", ckpt_path))

    network.eval()
    validation = tr.evaluate_cases(network, val_cases, config) if val_cases else {"per_class": {}, "cases": 0}
    total_time = elapsed_before + time.perf_counter() - t_start
    card = tr.training_card(config, {"arch": "UNet3DEnsemble", "params": arch_params}, validation, rare_names,
                            voxel_counts, len(labelled_cases), len(val_cases), total_time, history)
    card["training"]["semi_supervised"] = {**ss, "unlabelled_cases": len(unlabelled_cases),
                                           "inference": "mean of the two networks' logits"}
    if extra_card:
        card.update(copy.deepcopy(extra_card))
    from .bundle import BUNDLE_SUFFIX, save_bundle
    path = save_bundle(out_dir / f"{config.name}{BUNDLE_SUFFIX}", card, network)
    if events is not None:
        events(ev.artifact("bundle", path))
    return path
