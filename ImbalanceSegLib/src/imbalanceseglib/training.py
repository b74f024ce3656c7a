"""Supervised training with rare-class-aware patch sampling, atomic checkpoints and resume.

Imbalance-aware methods are selected by name (``TrainConfig.method``, see
:data:`METHOD_PRESETS`) or configured field by field: the loss
(:func:`imbalanceseglib.losses.build_loss`, including the asymmetric focal and
large-margin losses), class weights that follow training (DisW/DifW/CDifW,
:mod:`imbalanceseglib.class_weights`), asymmetric mixup and asymmetric adversarial
training (:mod:`imbalanceseglib.perturbations`), and class-specific augmentation
(:mod:`imbalanceseglib.augment`).  One "rare" class mask (``rare_classes`` by name, or
every foreground class under ``rare_threshold`` of the training voxels:
:func:`imbalanceseglib.rare.resolve_rare_mask`) drives all of them.  Deep supervision
(``TrainConfig.deep_supervision``, :mod:`imbalanceseglib.deep_supervision`) adds down-weighted
losses of auxiliary outputs at the coarser decoder levels to every training loss of a step (the
clean, the mixed and the adversarial batch alike); the class weights follow the full-resolution
output, the adversarial input is made from it alone, and the bundle holds the plain network.
Context labels (``TrainConfig.context_labels``, :mod:`imbalanceseglib.context_labels`) train the
network with context classes that split the background, made by a task generator that takes a
meta step every few iterations before the network's own step; the class weights and the
adversarial input follow the network's merged output (the context classes summed into the
background), and the bundle holds the network with that merge built in.

``train`` takes preprocessed cases (:mod:`imbalanceseglib.training_data`) and a validated
:class:`~imbalanceseglib.train_config.TrainConfig`; the shared loop
(:class:`~imbalanceseglib.training_loop.TrainingLoop`) writes ``checkpoint.pt``
(:mod:`imbalanceseglib.checkpoints`) every ``checkpoint_every`` iterations, resumes from it
when asked, and ends with a model bundle whose card records the method, hyper-parameters,
class voxel fractions of the training data and per-class validation Dice.  This module
holds the supervised step; semi-supervised methods go to :mod:`imbalanceseglib.semi_supervised`.
The config, case and sampler names are re-exported here for callers of ``train``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import torch

from . import distributed as dd
from . import events as ev
from .class_weights import DistributionWeights
from .context_labels import ContextLabels, context_loss, expand_class_weights, exported_network
from .deep_supervision import AuxiliaryHeads, DeepSupervisionLoss, card_entry, deep_outputs, output_weights
from .networks import build_network, merge_context_logits, set_activation_checkpointing
from .perturbations import asymmetric_adversarial_input, asymmetric_mixup, mixup_lambda, one_hot_voxels
from .presets import semi_supervised_choice
from .train_config import METHOD_PRESETS, TrainConfig, make_class_weighter  # noqa: F401  (re-exported)
from .training_data import (Case, PatchSampler, check_training_data, make_case, prepare_case,  # noqa: F401
                            prepare_unlabeled_case)
from .training_engine import training_forward
from .training_loop import (LogFn, TrainingLoop, begin_run, build_augmenter, build_training_loss, named_weights,
                            quiet, update_class_weighter, with_input_profile)

__all__ = ["METHOD_PRESETS", "Case", "PatchSampler", "TrainConfig", "make_case", "prepare_case",
           "prepare_unlabeled_case", "train"]


def train(config: TrainConfig, train_cases: Sequence[Case], val_cases: Sequence[Case], out_dir: Path,
          resume: bool = True, log: LogFn = print, extra_card: Optional[Dict[str, Any]] = None,
          unlabeled_cases: Optional[Sequence[Case]] = None, events: Optional[ev.EventFn] = None) -> Path:
    """Train, checkpoint and write ``<out_dir>/<name>.imbseg``; returns the bundle path.

    Semi-supervised methods (``config.semi_supervised``) also take ``unlabeled_cases``
    (:func:`prepare_unlabeled_case`) and train two networks
    (:func:`imbalanceseglib.semi_supervised.train_semi_supervised`).

    ``events`` (optional, see :mod:`imbalanceseglib.events`) receives an ``iteration`` event
    with each logged loss, a ``validation`` event with each validation Dice, an ``artifact``
    event for each checkpoint and for the bundle, and at the end a ``warning`` event for the
    classes never learned (validation Dice 0) or not checked (no validation cases with them;
    :func:`imbalanceseglib.training_loop.learning_check`); under torchrun only rank 0 sends them.
    The progress line names each class weight (``weights Background=0.05 Ball=0.31 ...``)."""
    config = config.validated()
    if config.is_semi_supervised:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ValueError("semi-supervised training runs in one process; distributed training (torchrun) "
                             "supports the supervised methods")
        from .semi_supervised import train_semi_supervised
        return train_semi_supervised(config, train_cases, unlabeled_cases or [], val_cases, out_dir,
                                     resume=resume, log=log, extra_card=extra_card, events=events)
    if unlabeled_cases:
        raise ValueError(f"unlabelled cases were given but method {config.method!r} is supervised; "
                         f"choose a semi-supervised method ({semi_supervised_choice()})")
    context_settings = config.context_labels_settings
    if context_settings["enabled"] and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("context labels train in one process (the task generator's meta step is not shared "
                         "between torchrun ranks); run without torchrun or turn context labels off")
    voxel_counts = check_training_data(config, train_cases)
    ctx = dd.init_from_env()
    if ctx.active:
        dd.local_slice(config.batch_size, ctx)  # refuses a batch the ranks cannot share evenly
        if not ctx.is_main:
            log, events = quiet, None
    out_dir = begin_run(config, out_dir)
    n_cls = len(config.classes)
    n_context = int(context_settings["classes"]) if context_settings["enabled"] else 0
    n_out = n_cls + n_context  # the network's outputs while training
    network = build_network("UNet3D", {"in_channels": 1, "out_channels": n_out, "features": list(config.features)})
    set_activation_checkpointing(network, config.activation_checkpointing)
    dd.broadcast_parameters(network, ctx)
    deep = config.deep_supervision_settings
    heads = AuxiliaryHeads(config.features, n_out, deep["levels"]) if deep["enabled"] else None
    if heads is not None:
        dd.broadcast_parameters(heads, ctx)
    learner = (ContextLabels(context_settings, n_cls, tuple(reversed(config.target_spacing)), config.iterations)
               if n_context else None)
    exported = exported_network(network, n_cls) if learner is not None else network  # merged: K classes
    loop = TrainingLoop(config, network, out_dir, val_cases, log=log, events=events, ctx=ctx, auxiliary=heads,
                        context=learner, exported=exported)
    names = [c["name"] for c in config.classes]
    fractions = (voxel_counts / voxel_counts.sum()).tolist()
    loss_fn, rare_names, rare_mask = build_training_loss(config, names, fractions)
    if learner is not None:  # the same loss over the classes and the context classes
        loss_fn = context_loss(dict(config.loss), names, rare_names, n_context)
    deep_loss = DeepSupervisionLoss(loss_fn, output_weights(deep)) if heads is not None else None
    weighter = make_class_weighter(config.class_weighting, n_cls)
    if isinstance(weighter, DistributionWeights):
        weighter.update(torch.as_tensor(voxel_counts))  # start from the training set's distribution
    aug = config.augmentation
    augmenter = build_augmenter(config, rare_mask)
    mix = config.mixup_settings  # defaults filled in (train_config.MIXUP_DEFAULTS)
    mix_p = float(mix["probability"])
    adv_p = float(config.adversarial.get("probability", 0.0))
    log(f"method {config.method}: loss {config.loss.get('name')}, rare classes {rare_names or 'none'}, "
        f"class weights {config.class_weighting.get('method', 'none')}, mixup p={mix_p:g}"
        + (f" (lambda x{float(mix['lambda_scale']):g}, clean step {'on' if mix['clean_step'] else 'off'}, "
           f"{'soft' if mix['soft_targets'] else 'one-hot'} targets)" if mix_p > 0 else "")
        + f", adversarial p={adv_p:g}, "
        f"augmentation {aug.get('default', 'none')}/{aug.get('rare', 'none')}"
        + (f", deep supervision at {deep['levels']} coarser decoder level(s), output weights "
           f"{', '.join(f'{w:.3f}' for w in output_weights(deep))}" if heads is not None else "")
        + (f", context labels: {n_context} context class(es) split the background"
           + (f" within {float(context_settings['near_mm']):g} mm of the foreground" if context_settings["near_mm"]
              is not None else "")
           + f", generator meta step every {context_settings['update_every']} iteration(s)" if learner else ""))
    sampler = PatchSampler(train_cases, config.patch_size, config.foreground_fraction, augmenter)
    forward = training_forward(network, log)  # the CPU training path, or the module itself
    if learner is not None:
        learner.generate = training_forward(learner.generator, lambda m: log(f"context labels' task generator: {m}"))
    network_parameters = list(network.parameters())
    rng = loop.rng
    if resume:
        loop.resume(lambda state: weighter.load_state_dict(state) if weighter is not None else None)

    def sub_step(it: int, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor, mask: Optional[torch.Tensor],
                 adversarial_step: bool, update_weights: bool) -> float:
        """One optimizer step on the global batch (this rank's slice of it); the global mean loss.
        Every rank takes the same sub-steps (decided on the global batch), so the collectives match."""
        if ctx.active:  # this rank's slice of the global batch
            part = dd.local_slice(config.batch_size, ctx)
            x, y, target = x[part], y[part], target[part]
            mask = mask[part] if mask is not None else None
        weights = weighter.weights if weighter is not None else None
        if learner is not None:  # each context class weighs what the background weighs
            weights = expand_class_weights(weights, n_context)

        def supervised(inputs: torch.Tensor):
            """(logits, loss): the loss deep-supervised when it is on (the logits stay the main output's)."""
            if heads is None:
                out = forward(inputs)
                return out, loss_fn(out, target, class_weights=weights, mask=mask)
            out, aux = deep_outputs(forward, heads, inputs)
            return out, deep_loss([out] + aux, target, class_weights=weights, mask=mask)

        logits, loss = supervised(x)
        if adversarial_step:  # the adversarial input from the network's main (merged) output only
            x_adv = asymmetric_adversarial_input(exported, x, y, rare_mask,
                                                 epsilon=float(config.adversarial.get("epsilon", 10.0)))
            loss = loss + float(config.adversarial.get("weight", 1.0)) * supervised(x_adv)[1]
        global_loss = dd.mean_scalar(loss, ctx)
        if not torch.isfinite(global_loss):
            raise FloatingPointError(
                f"loss became {loss.item()} at iteration {it + 1} (batch from cases "
                f"{', '.join(sampler.last_cases)}; non-finite input: {not bool(torch.isfinite(x).all())}, "
                f"non-finite network output: {not bool(torch.isfinite(logits).all())}); training stopped, "
                f"{loop.kept()}. Lower the learning rate or check these cases.")
        loop.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        dd.average_gradients(network, ctx)
        if heads is not None:
            dd.average_gradients(heads, ctx)
        torch.nn.utils.clip_grad_norm_(loop.parameters, 12.0)
        loop.optimizer.step()
        if update_weights and weighter is not None:  # from the whole global batch on every rank
            merged = merge_context_logits(logits.detach(), n_cls)  # the classes' logits (no-op without context)
            update_class_weighter(weighter, dd.gather_batch(merged, ctx), dd.gather_batch(y, ctx))
        return float(global_loss)

    def step(it: int) -> Dict[str, float]:
        x, y = sampler.batch(rng, config.batch_size)
        out: Dict[str, float] = {}
        target = y
        if learner is not None:  # the generator's meta step first, then its targets for the network's step
            if learner.due(it):
                w = weighter.weights if weighter is not None else None
                meta = learner.meta_step(forward, network_parameters, x, y, loss_fn, it,
                                         class_weights=expand_class_weights(w, n_context))
                if meta is not None:
                    out["meta_loss"] = meta
            target = learner.targets(x, y)
        # (x, labels, target, voxel mask, weights from it) per optimizer step of this iteration
        batches = [(x, y, target, None, True)]
        if mix_p > 0 and rng.random() < mix_p:
            x_b, y_b = sampler.batch(rng, config.batch_size)
            lam = mixup_lambda(float(mix["alpha"]), rng, float(mix["lambda_scale"]))
            x_mix, target, _ = asymmetric_mixup(x, y, x_b, y_b, rare_mask, margin=float(mix["margin"]), lam=lam)
            mask = None if mix["soft_targets"] else one_hot_voxels(target)  # the reference drops mixed voxels
            y_mix = target.argmax(1, keepdim=True)  # hard labels for the weights and the adversarial step
            mixed = (x_mix, y_mix, target, mask, not mix["clean_step"])  # weights from the clean batch if any
            batches = [batches[0], mixed] if mix["clean_step"] else [mixed]
        # decided on the global batch, so every rank takes the same kind of step
        adversarial = adv_p > 0 and rng.random() < adv_p
        losses = [sub_step(it, bx, by, bt, bm, adversarial and bool(rare_mask[by.long()].any()), upd)
                  for bx, by, bt, bm, upd in batches]
        loop.scheduler.step()  # once per iteration, however many optimizer steps it took
        return {"loss": sum(losses) / len(losses), **out}

    def report(done: int, mean: Dict[str, float], elapsed: float, speed: str):
        entry: Dict[str, Any] = {"iteration": done, "loss": mean["loss"], "elapsed_s": elapsed}
        if weighter is not None:
            entry["class_weights"] = [round(float(w), 4) for w in weighter.weights]
        line = (f"iter {done:>6}/{config.iterations}  loss {mean['loss']:.4f}  {speed}"
                + (f"  weights {named_weights(names, entry['class_weights'])}" if weighter is not None else ""))
        if learner is not None:
            if "meta_loss" in mean:
                entry["context_meta_loss"] = mean["meta_loss"]
            entry["context_background_split"] = learner.fractions
            line += ((f"  meta {mean['meta_loss']:.4f}" if "meta_loss" in mean else "")
                     + (f"  background split {'/'.join(f'{f:.2f}' for f in learner.fractions)}"
                        if learner.fractions else ""))
        return entry, line

    loop.run(step, report, class_weights=lambda: weighter.state_dict() if weighter is not None else None)
    params: Dict[str, Any] = {"in_channels": 1, "out_channels": n_cls, "features": list(config.features)}
    if learner is not None:
        params["context_classes"] = n_context  # merged into the background inside the network
    return loop.finish({"arch": "UNet3D", "params": params},
                       rare_names, voxel_counts, len(train_cases),
                       extra_card=with_input_profile(extra_card, train_cases),
                       training_extra={**({"mixup": mix} if mix_p > 0 else {}),
                                       **({"deep_supervision": card_entry(deep)} if heads is not None else {}),
                                       **({"context_labels": learner.card_entry()} if learner is not None else {})}
                       or None)
