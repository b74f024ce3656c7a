"""Class weights that follow training: DisW, DifW (DHC) and CDifW (Double-Mix).

Papers and equations implemented (``C`` classes, class 0 the background):

* :class:`DistributionWeights` ("DisW"; DHC's *distribution-aware debiased
  weighting*, DistDW: Wang & Li, "DHC: Dual-debiased Heterogeneous Co-training
  framework for class-imbalanced semi-supervised medical image segmentation",
  MICCAI 2023, Sec. 2).  From voxel counts ``n_c``::

      w_c = C * log(r_c) / max_k log(r_k),   r_c = (max_k n_k + eps) / (n_c + eps)
      w  <- m * w + (1 - m) * w_batch        (EMA over batches, DHC: m = 0.99)

  Rare classes weigh more, through the logarithm of how many times rarer than
  the most frequent class they are.

* :class:`DifficultyWeights` ("DifW"; DHC's *difficulty-aware debiased
  weighting*, DiffDW, same section).  From each batch's per-class Dice
  ``d_c`` (learned / unlearned steps ``Δ_c log(d_c / d'_c)`` of the Dice change
  ``Δ_c`` since the last update, accumulated by an EMA over about ``tau``
  iterations)::

      w_c = ((unlearn_c + eps) / (learn_c + eps)) ** alpha * dicew_c,
      dicew_c = EMA of (1 - d_c),   weights = C * w / max_k w_k

  Classes whose Dice is low, and classes that are being unlearned (Dice
  falling) rather than learned, weigh more.

* :class:`ConfidenceDifficultyWeights` ("CDifW"; Zhang, Hayashi, Oda & Mori,
  "Double-mix pseudo-label framework: enhancing semi-supervised segmentation
  on category-imbalanced CT volumes", IJCARS 2024/2025): DifW times a
  per-class confidence term ``u_k = ((1 - c_k + eps) / (max_j (1 - c_j) + eps))
  ** alpha`` (``c_k`` the mean probability of class k over its labelled voxels),
  folded into an EMA, normalised to a largest weight of C.

The full update rules are in each class's docstring.

The weight objects hold their whole state in a few lists of Python floats:
``state_dict()`` is JSON-serialisable (no pickles) and ``load_state_dict``
restores it exactly, so a resumed run computes bit-identical weights.  They
take *aggregated statistics* (voxel counts, per-class Dice, per-class
confidence) rather than tensors of voxels, and the helpers that compute those
statistics (:func:`class_voxel_counts`, :func:`per_class_batch_dice`,
:func:`per_class_confidence`) return additive sums, so data-parallel training
can all-reduce (sum) the sums over processes and feed every process the same
statistics; every process then holds the same weights.

Conventions follow the rest of the library: logits are ``(N, C, *spatial)``,
integer labels ``(N, 1, *spatial)`` (``(N, *spatial)`` is accepted too).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "ClassConfidence",
    "ClassDice",
    "ConfidenceDifficultyWeights",
    "DifficultyWeights",
    "DistributionWeights",
    "class_voxel_counts",
    "label_indices",
    "per_class_batch_dice",
    "per_class_confidence",
]

_STATE_VERSION = 1


# --------------------------------------------------------------------------- #
# Small helpers
# --------------------------------------------------------------------------- #


def _check_num_classes(num_classes: int) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    return int(num_classes)


def _check_momentum(name: str, value: float) -> float:
    value = float(value)
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")
    return value


def _vector(values: Any, num_classes: int, name: str) -> torch.Tensor:
    """A (C,) float64 CPU tensor from a tensor, array or sequence; refuses NaN/inf."""
    if isinstance(values, torch.Tensor):
        t = values.detach().to(device="cpu", dtype=torch.float64)
    else:
        t = torch.as_tensor(np.asarray(values, dtype=np.float64))
    t = t.reshape(-1)
    if t.numel() != num_classes:
        raise ValueError(f"{name} must have {num_classes} entries (one per class), got {t.numel()}")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} must be finite, got {t.tolist()}")
    return t.clone()


def _mask(values: Any, num_classes: int, name: str) -> torch.Tensor:
    if isinstance(values, torch.Tensor):
        t = values.detach().to("cpu")
    else:
        t = torch.as_tensor(np.asarray(values))
    t = t.reshape(-1)
    if t.numel() != num_classes:
        raise ValueError(f"{name} must have {num_classes} entries (one per class), got {t.numel()}")
    if t.dtype != torch.bool:
        if not bool(((t == 0) | (t == 1)).all()):
            raise ValueError(f"{name} must hold booleans, got {t.tolist()}")
        t = t != 0
    return t.clone()


def label_indices(target: torch.Tensor, ref: torch.Tensor | None, num_classes: int,
                  name: str = "target") -> torch.Tensor:
    """Integer labels (N, *spatial) from (N, 1, *spatial) or (N, *spatial); checks the range.

    ``ref`` (logits or images, (N, C, *spatial)) fixes the expected shape.  Also used by
    :mod:`imbalanceseglib.perturbations`.
    """
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor")
    if target.is_floating_point():
        if not bool((target == target.round()).all()):
            raise ValueError(f"{name} must hold integer class labels")
    lab = target.long()
    if ref is not None:
        spatial = tuple(ref.shape[2:])
        if lab.dim() == ref.dim() and lab.shape[1] == 1:
            lab = lab[:, 0]
        if lab.shape[0] != ref.shape[0] or tuple(lab.shape[1:]) != spatial:
            raise ValueError(f"{name} of shape {tuple(target.shape)} does not match logits/images of shape "
                             f"{tuple(ref.shape)}; expected (N, 1, *spatial) or (N, *spatial)")
    elif lab.dim() >= 2 and lab.shape[1] == 1:
        lab = lab[:, 0]
    if lab.numel() and (int(lab.min()) < 0 or int(lab.max()) >= num_classes):
        raise ValueError(f"{name} labels must lie in [0, {num_classes - 1}], got "
                         f"[{int(lab.min())}, {int(lab.max())}]")
    return lab


def _normalise_to_max(w: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``C * w / max(w)``; uniform ``C`` when every entry is zero."""
    top = float(w.max())
    if not top > 0.0:
        return torch.full_like(w, float(num_classes))
    return w / top * num_classes


def _as_float_list(t: torch.Tensor) -> list[float]:
    return [float(v) for v in t.tolist()]


def _check_min_weight(min_weight: Any, num_classes: int) -> float:
    """A floor on the weights: a number in [0, C] (C = the largest weight before the floor)."""
    number = isinstance(min_weight, (int, float, np.integer, np.floating)) and not isinstance(min_weight, bool)
    value = float(min_weight) if number else float("nan")
    if not 0.0 <= value <= num_classes:
        raise ValueError(f"min_weight must be in [0, {num_classes}] (the number of classes), got {min_weight!r}")
    return value


def _with_min_weight(state: Any) -> Any:
    """A state saved before the floor existed has none: 0, the rule it was trained with."""
    if isinstance(state, dict) and "min_weight" not in state:
        return {**state, "min_weight": 0.0}
    return state


def _check_state(state: dict, kind: str, expected: dict) -> None:
    if not isinstance(state, dict):
        raise TypeError("state must be a dict as returned by state_dict()")
    if state.get("kind") != kind:
        raise ValueError(f"state is for {state.get('kind')!r}, not {kind!r}")
    if state.get("version") != _STATE_VERSION:
        raise ValueError(f"unsupported state version {state.get('version')!r}")
    for key, value in expected.items():
        if state.get(key) != value:
            raise ValueError(f"state was saved with {key}={state.get(key)!r}, this object has {key}={value!r}")


# --------------------------------------------------------------------------- #
# Per-class statistics of a batch
# --------------------------------------------------------------------------- #


class ClassDice(NamedTuple):
    """Per-class Dice of one batch, with the additive sums it is made of.

    ``dice[c] = numerator[c] / denominator[c]`` where ``numerator = 2 * |P ∩ G|``
    and ``denominator = |P| + |G|`` summed over the whole batch ("batch Dice").
    ``present[c]`` is False where the class is absent from both prediction and
    target (``denominator == 0``): Dice is undefined there, ``dice[c]`` is set
    to 1.0 (empty agrees with empty) and the weight objects ignore the class for
    this update.  For data-parallel training, all-reduce (sum) ``numerator`` and
    ``denominator`` and rebuild with :meth:`from_sums`.
    """

    dice: torch.Tensor
    present: torch.Tensor
    numerator: torch.Tensor
    denominator: torch.Tensor

    @classmethod
    def from_sums(cls, numerator: torch.Tensor, denominator: torch.Tensor) -> "ClassDice":
        num = numerator.detach().to(torch.float64)
        den = denominator.detach().to(torch.float64)
        present = den > 0
        dice = torch.where(present, num / torch.where(present, den, torch.ones_like(den)), torch.ones_like(den))
        return cls(dice, present, num, den)


class ClassConfidence(NamedTuple):
    """Per-class confidence of one batch, with the additive sums it is made of.

    ``confidence[c] = (prob_sum[c] + smoothing) / (count[c] + smoothing)``
    (Double-Mix's smoothed mean, ``smoothing`` 1 by default), ``present[c]`` is
    ``count[c] > 0``; classes not present are ignored by
    :class:`ConfidenceDifficultyWeights`.  For data-parallel training all-reduce
    (sum) ``prob_sum`` and ``count`` and rebuild with :meth:`from_sums`.
    """

    confidence: torch.Tensor
    present: torch.Tensor
    prob_sum: torch.Tensor
    count: torch.Tensor

    @classmethod
    def from_sums(cls, prob_sum: torch.Tensor, count: torch.Tensor, smoothing: float = 1.0) -> "ClassConfidence":
        s = prob_sum.detach().to(torch.float64)
        n = count.detach().to(torch.float64)
        if smoothing < 0:
            raise ValueError("smoothing must be >= 0")
        present = n > 0
        den = n + smoothing
        safe = torch.where(den > 0, den, torch.ones_like(den))
        conf = torch.where(den > 0, (s + smoothing) / safe, torch.ones_like(den))
        return cls(conf, present, s, n)


def class_voxel_counts(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Voxel count of each class in an integer label tensor of any shape, as (C,) float64.

    For :meth:`DistributionWeights.update`; for pseudo-labels pass
    ``logits.argmax(1)``.  Counts are additive: all-reduce them across processes.
    """
    num_classes = _check_num_classes(num_classes)
    lab = label_indices(labels, None, num_classes, "labels")
    return torch.bincount(lab.reshape(-1), minlength=num_classes).to(device="cpu", dtype=torch.float64)


def per_class_batch_dice(logits: torch.Tensor, target: torch.Tensor, *, soft: bool = False) -> ClassDice:
    """Dice of every class (background included) over the whole batch.

    ``soft=False`` (default, as DHC's difficulty weights): hard Dice of
    ``argmax(logits)`` against ``target``.  ``soft=True``: soft Dice of the
    softmax probabilities, ``2 Σ p·g / (Σ p + Σ g)``.  Classes absent from both
    prediction and target are marked ``present=False`` (see :class:`ClassDice`);
    nothing is NaN.  Computed without gradient.
    """
    if logits.dim() < 3:
        raise ValueError("logits must be (N, C, *spatial)")
    c = logits.shape[1]
    lab = label_indices(target, logits, c)
    with torch.no_grad():
        if soft:
            prob = torch.softmax(logits.detach().float(), dim=1)
            onehot = F.one_hot(lab, c).movedim(-1, 1).to(prob.dtype)
            dims = [0] + list(range(2, logits.dim()))
            inter = (prob * onehot).sum(dims).double()
            den = prob.sum(dims).double() + onehot.sum(dims).double()
        else:
            pred = logits.detach().argmax(1)
            flat_p, flat_g = pred.reshape(-1), lab.reshape(-1)
            inter = torch.bincount(flat_g[flat_p == flat_g], minlength=c).double()
            den = (torch.bincount(flat_p, minlength=c) + torch.bincount(flat_g, minlength=c)).double()
    return ClassDice.from_sums(2.0 * inter.cpu(), den.cpu())


def per_class_confidence(logits: torch.Tensor, target: torch.Tensor | None = None, *,
                         smoothing: float = 1.0) -> ClassConfidence:
    """Per-class confidence of a batch (for :class:`ConfidenceDifficultyWeights`).

    With ``target`` (labelled data; what Double-Mix does): the mean softmax
    probability *of class c* over the voxels labelled c.  Without ``target``
    (unlabelled data): the mean maximum probability over the voxels *predicted*
    as c.  Both are smoothed as Double-Mix does, ``(sum + smoothing) /
    (count + smoothing)``.  Computed without gradient.
    """
    if logits.dim() < 3:
        raise ValueError("logits must be (N, C, *spatial)")
    c = logits.shape[1]
    with torch.no_grad():
        prob = torch.softmax(logits.detach().float(), dim=1)
        if target is not None:
            lab = label_indices(target, logits, c)
            p_true = prob.gather(1, lab.unsqueeze(1))[:, 0]
            idx, val = lab.reshape(-1), p_true.reshape(-1).double()
        else:
            top, idx = prob.max(1)
            idx, val = idx.reshape(-1), top.reshape(-1).double()
        s = torch.zeros(c, dtype=torch.float64, device=prob.device).index_add_(0, idx, val)
        n = torch.bincount(idx, minlength=c).double()
    return ClassConfidence.from_sums(s.cpu(), n.cpu(), smoothing)


# --------------------------------------------------------------------------- #
# DisW: distribution-aware weights (DHC)
# --------------------------------------------------------------------------- #


class DistributionWeights:
    """Distribution-aware class weights ("DisW", DHC, MICCAI 2023).

    For voxel counts ``n_c`` (labels or pseudo-labels, summed over a batch or a
    data set)::

        r_c   = (max_k n_k + eps) / (n_c + eps)
        cur_c = C * log(r_c) / max_k log(r_k)

    i.e. weights normalised so that **the largest weight is C** (DHC's
    convention); the most frequent class gets weight 0 and a class that is 10x
    rarer than the most frequent one gets ``C * log 10 / max_k log r_k``.  If all
    counts are equal the weights are uniform (all C).  With DHC's ``eps=1e-8`` a
    class missing from the counts gets ``log r`` of about ``log(max n) + 18`` and
    thus weight C, which compresses the weights of the classes that are present;
    a larger ``eps`` (e.g. 1) softens this.

    ``min_weight`` (default 0, DHC's rule) is a floor on the weights.  In DHC the
    weighted losses train one of two networks that also learn from each other;
    used alone in supervised training, the zero weight of the most frequent class
    (the background) means nothing penalises predicting foreground there, and the
    network over-segments the large classes (measured in
    ``Testing/Benchmarks/reports/imbalance_training.md``).  ``min_weight=1`` keeps
    every class at least at the weight it has without weighting.

    The first :meth:`update` sets the weights (DHC initialises them from the
    voxel counts of the labelled training set; pass those first), every later one
    moves them by an EMA: ``w <- momentum * w + (1 - momentum) * cur`` (DHC:
    ``momentum=0.99`` with the counts of the argmax pseudo-labels of each
    unlabelled batch).  Before any update :attr:`weights` is uniform (all C).
    """

    kind = "DistributionWeights"

    def __init__(self, num_classes: int, momentum: float = 0.99, eps: float = 1e-8, min_weight: float = 0.0):
        self.num_classes = _check_num_classes(num_classes)
        self.momentum = _check_momentum("momentum", momentum)
        self.eps = float(eps)
        if not self.eps > 0:
            raise ValueError("eps must be > 0")
        self.min_weight = _check_min_weight(min_weight, self.num_classes)
        self._w = torch.full((self.num_classes,), float(self.num_classes), dtype=torch.float64)
        self.initialized = False
        self.num_updates = 0

    def current_weights(self, counts: Any) -> torch.Tensor:
        """The DisW of one set of counts (no EMA, state untouched), float64 (C,)."""
        n = _vector(counts, self.num_classes, "counts")
        if bool((n < 0).any()):
            raise ValueError(f"counts must be >= 0, got {n.tolist()}")
        log_r = torch.log((n.max() + self.eps) / (n + self.eps))
        return _normalise_to_max(log_r, self.num_classes)

    def update(self, counts: Any) -> torch.Tensor:
        """Fold the voxel counts ``(C,)`` of one batch into the weights; returns :attr:`weights`."""
        cur = self.current_weights(counts)
        if self.initialized:
            self._w = self.momentum * self._w + (1.0 - self.momentum) * cur
        else:
            self._w = cur
            self.initialized = True
        self.num_updates += 1
        return self.weights

    @property
    def weights(self) -> torch.Tensor:
        """Current class weights, float32 (C,), maximum C (before EMA drift), at least ``min_weight``."""
        return self._w.clamp_min(self.min_weight).to(torch.float32)

    def state_dict(self) -> dict:
        return {"kind": self.kind, "version": _STATE_VERSION, "num_classes": self.num_classes,
                "momentum": self.momentum, "eps": self.eps, "min_weight": self.min_weight,
                "initialized": self.initialized,
                "num_updates": self.num_updates, "weights": _as_float_list(self._w)}

    def load_state_dict(self, state: dict) -> None:
        state = _with_min_weight(state)
        _check_state(state, self.kind, {"num_classes": self.num_classes, "momentum": self.momentum, "eps": self.eps,
                                        "min_weight": self.min_weight})
        self._w = _vector(state["weights"], self.num_classes, "weights")
        self.initialized = bool(state["initialized"])
        self.num_updates = int(state["num_updates"])


# --------------------------------------------------------------------------- #
# DifW: difficulty-aware weights (DHC)
# --------------------------------------------------------------------------- #


class DifficultyWeights:
    """Difficulty-aware class weights ("DifW", DHC, MICCAI 2023).

    Fed the per-class Dice ``d_c`` of every training batch (DHC: hard batch Dice
    of the labelled batch, see :func:`per_class_batch_dice`).  With
    ``m = momentum`` (default ``(tau - 1) / tau``, DHC's stand-in for a sum over
    the last ``tau`` iterations) and ``d'_c = max(d_c, eps)``, each update does,
    per present class::

        delta     = d'_c - last_c                 (Dice change since the class's last update)
        step      = delta * log(d'_c / last_c)    (>= 0: delta and the log share their sign)
        learn_c   <- m * learn_c   + (1 - m) * (step if delta >  0 else 0)
        unlearn_c <- m * unlearn_c + (1 - m) * (step if delta <= 0 else 0)
        dicew_c   <- m * dicew_c   + (1 - m) * (1 - d_c)
        last_c    <- d'_c

    and the weights are::

        w_c = ((unlearn_c + eps) / (learn_c + eps)) ** alpha * dicew_c
        weights = C * w / max(w)                  (largest weight C, DHC's convention)

    Initial state as DHC: ``last = eps``, ``learn = unlearn = 0``,
    ``dicew = 1``, so the weights start uniform (all C) and the first update of a
    class counts as a large "learned" step from Dice 0.  Defaults ``tau=50``
    (DHC's training script) and ``alpha=1/5`` (DHC).

    Differences from DHC's code: a class that is absent from both prediction and
    target (``present=False``, or ``ClassDice.present``) leaves its state
    untouched (DHC's smoothed Dice gives such a class Dice 0.5 every time); and
    the state lives on the CPU in float64.

    ``min_weight`` (default 0: DHC's rule) is a floor on the normalised weights,
    as in :class:`DistributionWeights`: a class the network has learned (the
    background, soon) otherwise gets a weight near 0.
    """

    kind = "DifficultyWeights"

    def __init__(self, num_classes: int, tau: int = 50, alpha: float = 0.2, momentum: float | None = None,
                 eps: float = 1e-8, min_weight: float = 0.0):
        self.num_classes = _check_num_classes(num_classes)
        self.min_weight = _check_min_weight(min_weight, self.num_classes)
        if isinstance(tau, bool) or not isinstance(tau, (int, np.integer)) or tau < 1:
            raise ValueError(f"tau must be an integer >= 1, got {tau!r}")
        self.tau = int(tau)
        self.alpha = float(alpha)
        if not self.alpha >= 0:
            raise ValueError("alpha must be >= 0")
        self.momentum = _check_momentum("momentum", (self.tau - 1) / self.tau if momentum is None else momentum)
        self.eps = float(eps)
        if not self.eps > 0:
            raise ValueError("eps must be > 0")
        c = self.num_classes
        self._last = torch.full((c,), self.eps, dtype=torch.float64)
        self._learn = torch.zeros(c, dtype=torch.float64)
        self._unlearn = torch.zeros(c, dtype=torch.float64)
        self._dicew = torch.ones(c, dtype=torch.float64)
        self.num_updates = 0

    def update(self, dice_per_class: ClassDice | Any, present: Any = None) -> torch.Tensor:
        """Fold one batch's per-class Dice into the state; returns :attr:`weights`.

        ``dice_per_class``: a :class:`ClassDice` (its ``present`` mask is used) or
        C values in [0, 1]; ``present``: optional mask of the classes to update.
        """
        if isinstance(dice_per_class, ClassDice):
            mask = dice_per_class.present.to("cpu")
            dice_per_class = dice_per_class.dice
        else:
            mask = torch.ones(self.num_classes, dtype=torch.bool)
        d = _vector(dice_per_class, self.num_classes, "dice_per_class")
        if bool(((d < 0) | (d > 1)).any()):
            raise ValueError(f"Dice values must lie in [0, 1], got {d.tolist()}")
        if present is not None:
            mask = mask & _mask(present, self.num_classes, "present")
        m = self.momentum
        dc = d.clamp_min(self.eps)
        delta = dc - self._last
        step = delta * torch.log(dc / self._last)
        zero = torch.zeros_like(step)
        learn = m * self._learn + (1 - m) * torch.where(delta > 0, step, zero)
        unlearn = m * self._unlearn + (1 - m) * torch.where(delta <= 0, step, zero)
        dicew = m * self._dicew + (1 - m) * (1.0 - d)
        self._learn = torch.where(mask, learn, self._learn)
        self._unlearn = torch.where(mask, unlearn, self._unlearn)
        self._dicew = torch.where(mask, dicew, self._dicew)
        self._last = torch.where(mask, dc, self._last)
        self.num_updates += 1
        return self.weights

    def raw_weights(self) -> torch.Tensor:
        """``w_c`` before normalisation, float64 (C,)."""
        ratio = (self._unlearn + self.eps) / (self._learn + self.eps)
        return ratio.pow(self.alpha) * self._dicew

    @property
    def weights(self) -> torch.Tensor:
        """Current class weights, float32 (C,), largest weight C, at least ``min_weight``."""
        w = _normalise_to_max(self.raw_weights(), self.num_classes)
        return w.clamp_min(self.min_weight).to(torch.float32)

    def state_dict(self) -> dict:
        return {"kind": self.kind, "version": _STATE_VERSION, "num_classes": self.num_classes, "tau": self.tau,
                "alpha": self.alpha, "momentum": self.momentum, "eps": self.eps, "min_weight": self.min_weight,
                "num_updates": self.num_updates,
                "last_dice": _as_float_list(self._last), "learn": _as_float_list(self._learn),
                "unlearn": _as_float_list(self._unlearn), "dice_weight": _as_float_list(self._dicew)}

    def load_state_dict(self, state: dict) -> None:
        state = _with_min_weight(state)
        _check_state(state, self.kind, {"num_classes": self.num_classes, "tau": self.tau, "alpha": self.alpha,
                                        "momentum": self.momentum, "eps": self.eps, "min_weight": self.min_weight})
        c = self.num_classes
        self._last = _vector(state["last_dice"], c, "last_dice")
        self._learn = _vector(state["learn"], c, "learn")
        self._unlearn = _vector(state["unlearn"], c, "unlearn")
        self._dicew = _vector(state["dice_weight"], c, "dice_weight")
        self.num_updates = int(state["num_updates"])


# --------------------------------------------------------------------------- #
# CDifW: confidence-difficulty weights (Double-Mix)
# --------------------------------------------------------------------------- #


class ConfidenceDifficultyWeights:
    """Confidence-difficulty class weights ("CDifW", Double-Mix, IJCARS).

    DifW (:class:`DifficultyWeights`, same arguments) times a per-class
    confidence term.  From each batch's per-class confidence ``c_k`` (Double-Mix:
    mean probability of class k over the labelled voxels of class k, see
    :func:`per_class_confidence`), over the classes present in the batch::

        u_k = ((1 - c_k + conf_eps) / (max_j (1 - c_j) + conf_eps)) ** conf_alpha

    (1 for the least confident class, smaller for confident ones; Double-Mix:
    ``conf_eps=0.01``, ``conf_alpha=0.2``).  The ``u`` of ``fold_every``
    consecutive updates are averaged per class and folded into an EMA
    ``conf_k <- conf_momentum * conf_k + (1 - conf_momentum) * mean u_k`` that
    starts at 1.  Double-Mix folds once per epoch (set ``fold_every`` to the
    iterations per epoch to do the same; its code also carries the previous
    epoch's mean into the next average, which is not reproduced);
    ``fold_every=1`` (default) folds every iteration.  The weights are::

        weights = C * (difw_k * conf_k) / max_j (difw_j * conf_j)

    normalised to a largest weight of C like DisW and DifW (Double-Mix's code
    uses the product of the max-C DifW and ``conf`` unnormalised, so its weights
    are these times ``max_j(difw_j conf_j) / C``; the ratios between classes are
    the same).  ``min_weight`` (default 0) is a floor on these normalised weights,
    as in :class:`DistributionWeights`.
    """

    kind = "ConfidenceDifficultyWeights"

    def __init__(self, num_classes: int, tau: int = 50, alpha: float = 0.2, momentum: float | None = None,
                 eps: float = 1e-8, *, conf_momentum: float = 0.99, conf_alpha: float = 0.2,
                 conf_eps: float = 1e-2, fold_every: int = 1, min_weight: float = 0.0):
        self.difficulty = DifficultyWeights(num_classes, tau=tau, alpha=alpha, momentum=momentum, eps=eps)
        self.num_classes = self.difficulty.num_classes
        self.min_weight = _check_min_weight(min_weight, self.num_classes)
        self.conf_momentum = _check_momentum("conf_momentum", conf_momentum)
        self.conf_alpha = float(conf_alpha)
        self.conf_eps = float(conf_eps)
        if not self.conf_alpha >= 0 or not self.conf_eps > 0:
            raise ValueError("conf_alpha must be >= 0 and conf_eps > 0")
        if isinstance(fold_every, bool) or not isinstance(fold_every, (int, np.integer)) or fold_every < 1:
            raise ValueError(f"fold_every must be an integer >= 1, got {fold_every!r}")
        self.fold_every = int(fold_every)
        c = self.num_classes
        self._conf = torch.ones(c, dtype=torch.float64)
        self._acc_sum = torch.zeros(c, dtype=torch.float64)
        self._acc_n = torch.zeros(c, dtype=torch.float64)
        self._pending = 0

    def confidence_term(self, confidence_per_class: Any, present: Any = None) -> torch.Tensor:
        """``u`` of one batch (no state change), float64 (C,); 0 for classes not present."""
        conf = _vector(confidence_per_class, self.num_classes, "confidence_per_class")
        if bool(((conf < 0) | (conf > 1)).any()):
            raise ValueError(f"confidence values must lie in [0, 1], got {conf.tolist()}")
        mask = torch.ones(self.num_classes, dtype=torch.bool) if present is None else \
            _mask(present, self.num_classes, "present")
        if not bool(mask.any()):
            return torch.zeros(self.num_classes, dtype=torch.float64)
        unsure = 1.0 - conf
        top = float(unsure[mask].max())
        u = ((unsure + self.conf_eps) / (top + self.conf_eps)).pow(self.conf_alpha)
        return torch.where(mask, u, torch.zeros_like(u))

    def update(self, dice_per_class: ClassDice | Any, confidence_per_class: ClassConfidence | Any,
               present: Any = None, confidence_present: Any = None) -> torch.Tensor:
        """Fold one batch's per-class Dice and confidence into the state; returns :attr:`weights`.

        Masks come from :class:`ClassDice` / :class:`ClassConfidence` when those
        are passed, or from ``present`` / ``confidence_present``.
        """
        if isinstance(confidence_per_class, ClassConfidence):
            cmask = confidence_per_class.present.to("cpu")
            confidence_per_class = confidence_per_class.confidence
        else:
            cmask = torch.ones(self.num_classes, dtype=torch.bool)
        if confidence_present is not None:
            cmask = cmask & _mask(confidence_present, self.num_classes, "confidence_present")
        u = self.confidence_term(confidence_per_class, cmask)  # validate before touching any state
        self.difficulty.update(dice_per_class, present)
        self._acc_sum = self._acc_sum + u
        self._acc_n = self._acc_n + cmask.to(torch.float64)
        self._pending += 1
        if self._pending >= self.fold_every:
            seen = self._acc_n > 0
            mean_u = self._acc_sum / torch.where(seen, self._acc_n, torch.ones_like(self._acc_n))
            folded = self.conf_momentum * self._conf + (1 - self.conf_momentum) * mean_u
            self._conf = torch.where(seen, folded, self._conf)
            self._acc_sum.zero_()
            self._acc_n.zero_()
            self._pending = 0
        return self.weights

    @property
    def confidence_weights(self) -> torch.Tensor:
        """The confidence EMA ``conf`` (C,), float32, in (0, 1]."""
        return self._conf.to(torch.float32)

    @property
    def weights(self) -> torch.Tensor:
        """Current class weights, float32 (C,), largest weight C, at least ``min_weight``."""
        w = _normalise_to_max(self.difficulty.raw_weights() * self._conf, self.num_classes)
        return w.clamp_min(self.min_weight).to(torch.float32)

    def state_dict(self) -> dict:
        return {"kind": self.kind, "version": _STATE_VERSION, "num_classes": self.num_classes,
                "conf_momentum": self.conf_momentum, "conf_alpha": self.conf_alpha, "conf_eps": self.conf_eps,
                "fold_every": self.fold_every, "min_weight": self.min_weight,
                "difficulty": self.difficulty.state_dict(),
                "confidence": _as_float_list(self._conf), "pending_sum": _as_float_list(self._acc_sum),
                "pending_count": _as_float_list(self._acc_n), "pending_updates": self._pending}

    def load_state_dict(self, state: dict) -> None:
        state = _with_min_weight(state)
        _check_state(state, self.kind, {"num_classes": self.num_classes, "conf_momentum": self.conf_momentum,
                                        "conf_alpha": self.conf_alpha, "conf_eps": self.conf_eps,
                                        "fold_every": self.fold_every, "min_weight": self.min_weight})
        c = self.num_classes
        conf = _vector(state["confidence"], c, "confidence")
        acc_sum = _vector(state["pending_sum"], c, "pending_sum")
        acc_n = _vector(state["pending_count"], c, "pending_count")
        pending = int(state["pending_updates"])
        if not 0 <= pending < self.fold_every:
            raise ValueError(f"pending_updates must be in [0, {self.fold_every}), got {pending}")
        self.difficulty.load_state_dict(state["difficulty"])
        self._conf, self._acc_sum, self._acc_n, self._pending = conf, acc_sum, acc_n, pending
