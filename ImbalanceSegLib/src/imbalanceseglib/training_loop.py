"""The loop scaffold both trainers run, and the pieces they share.

The supervised trainer (:func:`imbalanceseglib.training.train`) and the semi-supervised one
(cross pseudo supervision, Chen et al., CVPR 2021, and Double-Mix, Zhang et al., IJCARS 2024:
:func:`imbalanceseglib.semi_supervised.train_semi_supervised`) build their network(s), loss and
patch samplers and supply one training step; :class:`TrainingLoop` does the rest the same way
for both:

* AdamW and nnU-Net's polynomial learning-rate decay, and the seeded numpy generator the
  patches are drawn from;
* resume from ``checkpoint.pt`` (:mod:`imbalanceseglib.checkpoints`, refused for another config);
* every ``log_every`` iterations a history entry, a log line and an ``iteration`` event;
  every ``val_every`` the per-class validation Dice (:func:`validation_step`); every
  ``checkpoint_every`` a checkpoint and an ``artifact`` event (:mod:`imbalanceseglib.events`);
* at the end the model bundle with its card (:func:`training_card`) and a ``bundle`` event, then
  the plain summary of :func:`learning_check`: which classes the final validation shows were never
  learned (Dice 0) or barely learned (Dice under 0.05) and what to try, as log lines and
  ``warning`` events, also recorded in the card (``training.never_learned``,
  ``training.barely_learned``).

Under torchrun (``ctx``) only rank 0 validates and writes; the others wait at barriers.
"""

from __future__ import annotations

import copy
import platform
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from . import __version__
from . import distributed as dd
from . import events as ev
from .augment import ClassSpecificAugmenter, policy_from_config
from .bundle import BUNDLE_SUFFIX, save_bundle
from .checkpoints import (CHECKPOINT_FILE, checkpoint_state, config_fingerprint, restore_checkpoint,
                          resume_checkpoint, save_checkpoint)
from .class_weights import (ConfidenceDifficultyWeights, DifficultyWeights, DistributionWeights,
                            class_voxel_counts as batch_voxel_counts, per_class_batch_dice, per_class_confidence)
from .inference import sliding_window_logits
from .losses import build_loss
from .metrics import overlap_metrics
from .rare import resolve_rare_mask
from .train_config import TrainConfig
from .training_data import Case

__all__ = ["LogFn", "TrainingLoop", "begin_run", "build_augmenter", "build_training_loss", "evaluate_cases",
           "learning_check", "named_weights", "quiet", "training_card", "update_class_weighter", "validation_step",
           "with_input_profile"]

LogFn = Callable[[str], None]


def with_input_profile(extra_card: Optional[Dict[str, Any]], train_cases: Sequence[Case]) -> Optional[Dict[str, Any]]:
    """``extra_card`` with the card's ``input_profile`` (:mod:`imbalanceseglib.input_checks`) made
    from the training cases when every one was prepared by :func:`~imbalanceseglib.training_data.prepare_case`
    (so the Python API records it as the CLI does); a profile already in ``extra_card`` is kept,
    and cases made from bare arrays give none (the card then says so at inference)."""
    if (extra_card or {}).get("input_profile") is not None or not train_cases \
            or any(getattr(c, "profile", None) is None for c in train_cases):
        return extra_card
    from .input_checks import profile_from_cases
    return {**(extra_card or {}), "input_profile": profile_from_cases([c.profile for c in train_cases])}


def quiet(message: str) -> None:
    """A log function that drops everything (the ranks other than 0 under torchrun)."""


def evaluate_cases(network: torch.nn.Module, cases: Sequence[Case], config: TrainConfig) -> Dict[str, Any]:
    """Per-class Dice/sensitivity/precision (mean over cases where defined), and the voxels of each
    class in the references and in the predictions, summed over the cases."""
    n_cls = len(config.classes)
    per_case = []
    for case in cases:
        logits = sliding_window_logits(network, case.image, config.patch_size, overlap=0.5)
        pred = logits[0].argmax(0).numpy().astype(np.uint8)
        per_case.append(overlap_metrics(pred, case.labels, n_cls))
    summary: Dict[str, Any] = {}
    for c in range(1, n_cls):
        entry: Dict[str, Any] = {}
        for key in ("dice", "sensitivity", "precision"):
            vals = [m[c][key] for m in per_case if m[c][key] is not None]
            entry[key] = float(np.mean(vals)) if vals else None
            entry[f"{key}_std"] = float(np.std(vals)) if vals else None
        entry["cases_defined"] = sum(1 for m in per_case if m[c]["dice"] is not None)
        entry["reference_voxels"] = int(sum(m[c]["reference_voxels"] for m in per_case))
        entry["predicted_voxels"] = int(sum(m[c]["predicted_voxels"] for m in per_case))
        summary[config.classes[c]["name"]] = entry
    return {"per_class": summary, "cases": len(cases)}


def validation_step(network, val_cases: Sequence[Case], config: TrainConfig, done: int,
                    history: List[Dict[str, Any]], log: Callable[[str], None], label: str = "val dice",
                    events: Optional[ev.EventFn] = None) -> None:
    """Per-class validation Dice during training: appended to ``history``, logged, and sent as a
    ``validation`` event (:mod:`imbalanceseglib.events`) when ``events`` is given."""
    network.eval()
    metrics = evaluate_cases(network, val_cases, config)
    network.train()
    history.append({"iteration": done, "val": metrics["per_class"]})
    log(f"  {label}: " + "  ".join(f"{k}={v['dice']:.3f}" if v["dice"] is not None else f"{k}=absent"
                                   for k, v in metrics["per_class"].items()))
    if events is not None:
        events(ev.validation(done, {k: v["dice"] for k, v in metrics["per_class"].items()}))


def named_weights(names: Sequence[str], weights) -> str:
    """``Background=0.05 Liver=0.31 Right kidney=1.20``: each class weight after its class name
    (the progress line of the class-weighted methods)."""
    return " ".join(f"{name}={float(w):.2f}" for name, w in zip(names, weights))


# Rare-class methods the summary suggests (names of METHOD_PRESETS) for a class it finds never or barely
# learned.  Supervised, first disw_floor: in that regime (synthetic variants of one anatomy, 600 iterations,
# Testing/Benchmarks/reports/imbalance_training.md) it raised the small classes' test Dice from 0.165 / 0.116
# (dice_ce) to 0.603 / 0.636 with 2 / 12 training cases, where the CE-based asymmetric variants stayed at 0
# and DifW/CDifW reached 0.34-0.47; then asym_large_margin, the one that helped a rare class learned on few
# training patients but lost on new ones (Testing/Benchmarks/reports/real_imbalance.md, 3 seeds paired with
# Dice + CE: ACDC right ventricle test Dice +0.071 and sensitivity +0.064 in 3 of 3 seeds; asym_adversarial
# helped more there, +0.03 to +0.09, at 2.6-2.7 times the time per iteration); neither was measured on a
# never-learned class.  Not asym_mixup or asym_combined (there: sensitivity +0.18 to +0.31 but precision
# -0.12 to -0.37 in every seed, the combined one also losing the liver) nor asym_focal (liver Dice -0.149).
# Semi-supervised: cps_weighted_floor (right ventricle end-slice sensitivity 0.54-0.74 against CPS's
# 0.37-0.63, mean Dice within -0.10 to +0.01 of CPS); not cps_weighted (0.14-0.27 under supervised) nor
# double_mix (0.40-0.47 under).
_SUGGESTED_SUPERVISED = ("disw_floor", "asym_large_margin")
_SUGGESTED_SEMI_SUPERVISED = ("cps_weighted_floor",)


def _uses_rare_mask(config: TrainConfig) -> bool:
    """Whether the rare-class mask changes anything (asymmetric loss, mixup, adversarial or augmentation)."""
    aug = config.augmentation
    return (str(config.loss.get("name", "")).startswith("asym") or float(config.mixup.get("probability", 0.0)) > 0
            or float(config.adversarial.get("probability", 0.0)) > 0
            or aug.get("rare", "none") != aug.get("default", "none"))


def _listed(items: Sequence[str]) -> str:
    items = list(items)
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


#: Below this final validation Dice a class that was found at all is reported as *barely
#: learned*: it is as good as missing to a user (e.g. 0.010 for a kidney after a run whose other
#: seeds reached 0.6), and a plain "every class was learned" would hide it.
BARELY_LEARNED_DICE = 0.05


def learning_check(config: TrainConfig, validation: Dict[str, Any], history: Sequence[Dict[str, Any]],
                   rare_names: Sequence[str], voxel_counts: np.ndarray) -> Dict[str, Any]:
    """Which foreground classes the final model never or barely learned, said plainly, with what to try.

    A class is *never learned* when its validation Dice at the end of training
    (``validation``, from :func:`evaluate_cases`) is 0: in every validation case where it is
    defined, not one voxel of it was found (never predicted, or predicted only outside the
    reference). It is *barely learned* when that Dice is above 0 but under
    :data:`BARELY_LEARNED_DICE` (0.05). A class in no validation case (Dice undefined) cannot be
    checked, and without validation cases nothing can: both are said too. ``history`` (the
    validations during training) adds the best earlier Dice of a class that was learned and
    lost; ``voxel_counts`` (the training data) its share of the voxels.

    Returns ``{"never_learned": [names] or None (not checked: no validation cases),
    "barely_learned": [names] or None, "warnings": [{"kind", "classes", "message"}], "message":
    one line saying which classes were learned when none was flagged and at least one was
    checked, else None}``; each warning is what an :func:`imbalanceseglib.events.warning` event
    carries (kinds :data:`imbalanceseglib.events.WARNING_KINDS`). The methods suggested are names
    of :data:`imbalanceseglib.presets.METHOD_PRESETS`; the settings, fields of
    :class:`~imbalanceseglib.train_config.TrainConfig`."""
    names = [c["name"] for c in config.classes[1:]]
    if not validation.get("cases"):
        return {"never_learned": None, "barely_learned": None, "message": None, "warnings": [{
            "kind": "not_checked", "classes": names,
            "message": "[train] not checked whether every class was learned: there were no validation cases. Add "
                       "some (val_images/val_labels or val_folder in the config's data section; validation "
                       "segmentations in 3D Slicer), or evaluate the model on labelled cases afterwards "
                       "(imbalanceseg predict, then imbalanceseg evaluate)."}]}
    per_class = validation.get("per_class", {})
    total = float(np.sum(voxel_counts)) or 1.0
    fraction = {c["name"]: float(voxel_counts[i]) / total for i, c in enumerate(config.classes)}
    never, barely, absent = [], [], []
    details: Dict[str, List[str]] = {"never": [], "barely": []}
    for name in names:
        entry = per_class.get(name) or {}
        dice = entry.get("dice")
        if dice is None:
            absent.append(name)
            continue
        if dice >= BARELY_LEARNED_DICE:
            continue
        tier = "never" if dice <= 0.0 else "barely"
        (never if tier == "never" else barely).append(name)
        facts = [f"validation Dice {dice:.3f} at iteration {config.iterations}"
                 + ("" if tier == "never" else f", under {BARELY_LEARNED_DICE:g}")]
        predicted = entry.get("predicted_voxels")
        if predicted == 0:
            facts.append("never predicted")
        elif predicted and tier == "never":
            facts.append(f"predicted only outside its reference ({predicted} voxels)")
        earlier = [(h["iteration"], h["val"][name]["dice"]) for h in history
                   if isinstance(h.get("val"), dict) and (h["val"].get(name) or {}).get("dice")]
        if earlier:
            it, best = max(earlier, key=lambda e: e[1])
            if best > dice:
                facts.append(f"it had Dice {best:.3f} at iteration {it}")
        facts.append(f"{100 * fraction.get(name, 0.0):.2g}% of the training voxels")
        details[tier].append(f"{name} ({'; '.join(facts)})")
    warnings = []
    for kind, flagged, said in (("never_learned", never, "never learned"), ("barely_learned", barely, "barely learned")):
        if flagged:
            tips = _what_to_try(config, flagged, rare_names)
            warnings.append({"kind": kind, "classes": flagged,
                             "message": f"[train] {said}: {', '.join(details[kind.split('_')[0]])}. Try: "
                                        f"{', '.join(tips[:-1])}, or {tips[-1]}."})
    if absent:
        warnings.append({"kind": "not_checked", "classes": absent,
                         "message": f"[train] not checked whether {_listed(absent)} "
                                    f"{'was' if len(absent) == 1 else 'were'} learned: in no validation case "
                                    "(and never predicted there). Add validation cases that contain "
                                    f"{'it' if len(absent) == 1 else 'them'}."})
    learned = [n for n in names if n not in absent]
    message = None
    if learned and not never and not barely:
        said = f"validation Dice at least {BARELY_LEARNED_DICE:g} at iteration {config.iterations}"
        message = (f"[train] every class was learned ({said})." if not absent else
                   f"[train] learned: {_listed(learned)} ({said}).")
    return {"never_learned": never, "barely_learned": barely, "warnings": warnings, "message": message}


def _what_to_try(config: TrainConfig, flagged: Sequence[str], rare_names: Sequence[str]) -> List[str]:
    """The suggestions of :func:`learning_check` for the classes ``flagged``."""
    suggested = _SUGGESTED_SEMI_SUPERVISED if config.is_semi_supervised else _SUGGESTED_SUPERVISED
    others = " or ".join(f'"{m}"' for m in suggested if m != config.method)
    weighted = any(w.get("method", "none") != "none" for w in (
        config.class_weighting, config.semi_settings["weights_a"], config.semi_settings["weights_b"]))
    tips = [f"{'another' if weighted or _uses_rare_mask(config) else 'a'} rare-class method (method {others})"] \
        if others else []
    not_rare = [n for n in flagged if n not in rare_names]
    if _uses_rare_mask(config) and not_rare:
        tips.append(f"naming {_listed(not_rare)} in rare_classes (the rare classes now: "
                    f"{', '.join(rare_names) or 'none'})")
    tips.append(f"more iterations (this run: {config.iterations})")
    if float(config.foreground_fraction) < 1.0:
        tips.append(f"a larger foreground_fraction (now {float(config.foreground_fraction):g})")
    tips.append(f"check that {'it is' if len(flagged) == 1 else 'they are'} labelled the same way in the "
                "training and the validation cases")
    return tips


def update_class_weighter(weighter, logits: torch.Tensor, labels: torch.Tensor) -> None:
    """Feed one batch (detached logits, integer labels (N,1,...)) to a weighter."""
    if isinstance(weighter, DistributionWeights):
        weighter.update(batch_voxel_counts(labels, logits.shape[1]))
    elif isinstance(weighter, ConfidenceDifficultyWeights):
        weighter.update(per_class_batch_dice(logits, labels), per_class_confidence(logits, labels))
    elif isinstance(weighter, DifficultyWeights):
        weighter.update(per_class_batch_dice(logits, labels))


def build_training_loss(config: TrainConfig, names: List[str], fractions: List[float]):
    """The configured loss, the rare class names and the rare mask (from the training voxel fractions)."""
    rare_mask = resolve_rare_mask(names, fractions, config.rare_classes, config.rare_threshold)
    rare_names = [n for n, r in zip(names, rare_mask.tolist()) if r]
    loss_settings = dict(config.loss)
    if loss_settings.get("name", "").startswith("asym"):
        loss_settings.setdefault("rare_classes", rare_names)
    return build_loss(loss_settings, names, fractions), rare_names, rare_mask


def build_augmenter(config: TrainConfig, rare_mask: torch.Tensor) -> Optional[ClassSpecificAugmenter]:
    aug = config.augmentation
    if aug.get("default", "none") == "none" and aug.get("rare", "none") == "none":
        return None
    return ClassSpecificAugmenter(policy_from_config(aug.get("default", "none")),
                                  policy_from_config(aug.get("rare", "none")),
                                  [i for i, r in enumerate(rare_mask.tolist()) if r],
                                  spacing=tuple(reversed(config.target_spacing)))


def training_card(config: TrainConfig, network_entry: Dict[str, Any], validation: Dict[str, Any],
                  rare_names: List[str], voxel_counts: np.ndarray, n_train: int, n_val: int, total_time: float,
                  history: List[Dict[str, Any]]) -> Dict[str, Any]:
    """The model card written at the end of training."""
    return {
        "name": config.name,
        "description": config.description,
        "network": network_entry,
        "classes": config.classes,
        "preprocessing": {"modality": config.modality, "target_spacing": list(config.target_spacing),
                          "patch_size": list(config.patch_size), "normalization": config.normalization,
                          "orientation": "LPS"},
        "calibration": {"method": "none"},
        "validation": validation,
        "training": {
            "method": config.method,
            "loss": config.loss.get("name", "dice_ce"),
            "rare_classes": rare_names,
            "seconds_per_iteration": round(total_time / max(1, config.iterations), 4),
            "config": config.to_dict(),
            "class_voxel_fractions": dict(zip([c["name"] for c in config.classes],
                                              (voxel_counts / voxel_counts.sum()).tolist())),
            "train_cases": n_train, "val_cases": n_val,
            "wall_time_s": round(total_time, 1), "history": history,
            "software": {"imbalanceseglib": __version__, "torch": torch.__version__,
                         "python": platform.python_version()},
        },
    }


def begin_run(config: TrainConfig, out_dir: Path) -> Path:
    """Create the output folder, set the thread count and seed torch (before any network is built)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    torch.manual_seed(config.seed)
    return out_dir


# A training step: iteration index (from 0) -> the losses of that step, averaged into the log.
StepFn = Callable[[int], Dict[str, float]]
# Log report: (iterations done, mean losses since the last report, elapsed seconds, "<rate> it/s  eta <m> min")
# -> (history entry, which must hold "loss", and log line).
ReportFn = Callable[[int, Dict[str, float], float, str], Tuple[Dict[str, Any], str]]


class TrainingLoop:
    """Optimizer, schedule, generator, resume, cadence of logs/validation/checkpoints, bundle.

    ``teachers`` (with ``with_teachers``) are the semi-supervised trainer's EMA teachers: their
    state is checkpointed (``{}`` when None) and restored with the rest.  ``auxiliary`` are deep
    supervision's heads (:mod:`imbalanceseglib.deep_supervision`): optimised with the network
    (:attr:`parameters` holds both, for gradient clipping), checkpointed and restored with it, and
    never put in the bundle.  ``context`` is context labels' task generator
    (:class:`imbalanceseglib.context_labels.ContextLabels`, with its own optimizer): checkpointed
    and restored with the rest, never put in the bundle.  ``exported`` (default ``network``) is
    the network validation runs and the bundle holds: with context labels, the view of
    ``network`` that merges its context outputs into the background (same parameters).
    """

    def __init__(self, config: TrainConfig, network: torch.nn.Module, out_dir: Path, val_cases: Sequence[Case], *,
                 log: LogFn = print, events: Optional[ev.EventFn] = None, ctx: Optional[dd.DistContext] = None,
                 teachers: Optional[torch.nn.Module] = None, with_teachers: bool = False,
                 auxiliary: Optional[torch.nn.Module] = None, context: Optional[Any] = None,
                 exported: Optional[torch.nn.Module] = None):
        self.config = config
        self.network = network
        self.exported = exported if exported is not None else network
        self.context = context
        self.out_dir = Path(out_dir)
        self.val_cases = val_cases
        self.log, self.events = log, events
        self.ctx = ctx if ctx is not None else dd.DistContext()
        self.teachers, self.with_teachers = teachers, with_teachers
        self.auxiliary = auxiliary
        #: what the optimizer trains: the network's parameters, then the auxiliary heads' if any
        self.parameters: List[torch.nn.Parameter] = list(network.parameters()) + (
            list(auxiliary.parameters()) if auxiliary is not None else [])
        self.optimizer = torch.optim.AdamW(self.parameters, lr=config.learning_rate,
                                           weight_decay=config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda it: (1 - it / config.iterations) ** 0.9)  # nnU-Net's polynomial decay
        self.rng = np.random.default_rng(config.seed)
        self.history: List[Dict[str, Any]] = []
        self.start_it = 0
        self.elapsed_before = 0.0
        self.ckpt_path = self.out_dir / CHECKPOINT_FILE
        self.config_json = config_fingerprint(config)
        self.last_checkpoint: Optional[int] = None
        self._t_start = time.perf_counter()

    def resume(self, load_class_weights: Callable[[Any], None]) -> bool:
        """Continue from ``checkpoint.pt`` if there is one (refused for another config); the stored
        class weighter state(s) go to ``load_class_weights``. Returns whether it resumed."""
        if not self.ckpt_path.exists():
            return False
        ck = resume_checkpoint(self.ckpt_path, self.config_json)
        self.history, self.start_it, self.elapsed_before, weights = restore_checkpoint(
            ck, network=self.network, optimizer=self.optimizer, scheduler=self.scheduler, rng=self.rng,
            teachers=self.teachers, auxiliary=self.auxiliary, context=self.context)
        load_class_weights(weights)
        self.log(f"resuming from {self.ckpt_path} at iteration {self.start_it}/{self.config.iterations}")
        return True

    def kept(self) -> str:
        """What a failed step leaves behind, for its error message."""
        return (f"the checkpoint of iteration {self.last_checkpoint} in {self.ckpt_path} is kept"
                if self.last_checkpoint is not None else "no checkpoint had been written yet")

    def checkpoint(self, iteration: int, elapsed: float, class_weights: Callable[[], Any]) -> None:
        if not self.ctx.is_main:
            dd.barrier(self.ctx)
            return
        save_checkpoint(self.ckpt_path, checkpoint_state(
            network=self.network, optimizer=self.optimizer, scheduler=self.scheduler, rng=self.rng,
            history=self.history, iteration=iteration, elapsed=elapsed, config_json=self.config_json,
            class_weights=class_weights(), teachers=self.teachers, with_teachers=self.with_teachers,
            auxiliary=self.auxiliary, context=self.context))
        dd.barrier(self.ctx)

    def run(self, step: StepFn, report: ReportFn, class_weights: Callable[[], Any],
            val_label: str = "val dice") -> None:
        """Iterations ``start_it`` .. ``config.iterations``: ``step`` each, then the cadences."""
        cfg = self.config
        t_start = self._t_start = time.perf_counter()
        running: Dict[str, List[float]] = {}
        self.last_checkpoint = self.start_it if self.ckpt_path.exists() else None
        self.network.train()
        for it in range(self.start_it, cfg.iterations):
            for key, value in step(it).items():
                running.setdefault(key, []).append(value)
            done = it + 1
            elapsed = self.elapsed_before + time.perf_counter() - t_start
            if done % cfg.log_every == 0 or done == cfg.iterations:
                rate = (done - self.start_it) / max(1e-9, time.perf_counter() - t_start)
                speed = f"{rate:.2f} it/s  eta {(cfg.iterations - done) / max(rate, 1e-9) / 60:.1f} min"
                entry, line = report(done, {k: float(np.mean(v)) for k, v in running.items()}, elapsed, speed)
                self.history.append(entry)
                self.log(line)
                if self.events is not None:
                    self.events(ev.iteration(done, cfg.iterations, entry["loss"]))
                running = {}
            if self.val_cases and self.ctx.is_main and (done % cfg.val_every == 0 or done == cfg.iterations):
                validation_step(self.exported, self.val_cases, cfg, done, self.history, self.log, label=val_label,
                                events=self.events)
            if done % cfg.checkpoint_every == 0 or done == cfg.iterations:
                self.checkpoint(done, elapsed, class_weights)
                self.last_checkpoint = done
                if self.events is not None:
                    self.events(ev.artifact("checkpoint", self.ckpt_path))

    def finish(self, network_entry: Dict[str, Any], rare_names: List[str], voxel_counts: np.ndarray, n_train: int,
               extra_card: Optional[Dict[str, Any]] = None,
               training_extra: Optional[Dict[str, Any]] = None) -> Path:
        """Validate, write ``<out_dir>/<name>.imbseg`` (card: :func:`training_card`, with
        ``training_extra`` in its ``training`` entry and ``extra_card`` on top) and return its path;
        then say which classes were never or barely learned (:func:`learning_check`: log lines and
        ``warning`` events; the names in the card's ``training.never_learned`` and
        ``training.barely_learned``, null without validation cases).
        Also when a resumed run had nothing left to do."""
        cfg = self.config
        self.network.eval()
        self.exported.eval()
        bundle_path = self.out_dir / f"{cfg.name}{BUNDLE_SUFFIX}"
        if not self.ctx.is_main:
            dd.barrier(self.ctx)  # rank 0 writes the bundle
            return bundle_path
        validation = (evaluate_cases(self.exported, self.val_cases, cfg) if self.val_cases
                      else {"per_class": {}, "cases": 0})
        total_time = self.elapsed_before + time.perf_counter() - self._t_start
        card = training_card(cfg, network_entry, validation, rare_names, voxel_counts, n_train, len(self.val_cases),
                             total_time, self.history)
        if self.ctx.active:
            card["training"]["processes"] = self.ctx.world
        card["training"].update(training_extra or {})
        check = learning_check(cfg, validation, self.history, rare_names, voxel_counts)
        card["training"]["never_learned"] = check["never_learned"]
        card["training"]["barely_learned"] = check["barely_learned"]
        if extra_card:
            card.update(copy.deepcopy(extra_card))
        path = save_bundle(bundle_path, card, self.exported)
        if self.events is not None:
            self.events(ev.artifact("bundle", path))
        if check["message"]:
            self.log(check["message"])
        for warning in check["warnings"]:
            self.log(warning["message"])
            if self.events is not None:
                self.events(ev.warning(warning["kind"], warning["message"], warning["classes"]))
        dd.barrier(self.ctx)
        return path
