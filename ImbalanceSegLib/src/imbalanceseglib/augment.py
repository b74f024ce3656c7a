"""Training-time augmentation with class-specific policies and intensity (GIN) augmentation.

Two ideas from the literature on segmentation under class imbalance and scanner shift:

* **Class-specific augmentation** (Li et al., class-specific training- and
  test-time augmentation, IEEE TMI 2023; building on Li, Kamnitsas & Glocker's
  analysis of overfitting under class imbalance): networks overfit the rare
  foreground classes, whose few training voxels are memorised, so at test time
  their logits shift across the decision boundary and small structures are
  under-segmented.  Patches sampled *around* a rare class therefore get a
  stronger augmentation policy than the other patches
  (:class:`ClassSpecificAugmenter`).  The test-time half of Li et al. (augmented
  predictions merged per class, with a sensitivity-favouring rule for the rare
  classes) is :mod:`imbalanceseglib.tta`.  Li et al. learn both policies by
  meta-learning; here they are fixed, hand-set policies (:data:`PRESETS`).
* **Robustness to scanner shift**: global intensity non-linear augmentation
  ("GIN", Ouyang et al., causality-inspired single-source domain
  generalisation for medical image segmentation, IEEE TMI 2022), a shallow
  convolution network with freshly drawn random weights that remaps the
  intensities while keeping the shapes (:func:`gin_augment`), plus bias field,
  gamma, contrast, noise and thick-slice (low-resolution) simulation, which are
  the cohort-generation functions of :mod:`imbalanceseglib.synth` applied to
  single patches.

Conventions follow :mod:`imbalanceseglib.training`: patches are numpy arrays
indexed ``(z, y, x)``, images float32 normalised intensities, labels uint8.
Geometric transforms move image and labels together; intensity transforms touch
the image only.  All randomness comes from the ``numpy.random.Generator`` passed
in: the same generator state gives bit-identical output, and every call draws a
fixed amount from it (whatever the policy), so the rest of a training run's
random stream does not depend on the policy.  Child generators are seeded from
draws of the generator (not ``Generator.spawn``), so a run resumed from a saved
``bit_generator.state`` reproduces them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import numpy as np

from . import synth
from .rare import RARE_FRACTION, resolve_rare_mask

__all__ = [
    "AugmentationPolicy",
    "ClassSpecificAugmenter",
    "PRESETS",
    "gin_augment",
    "policy_from_config",
    "rare_classes_by_fraction",
]

Spacing = tuple[float, float, float]

# Order in which the operations run; every call draws one uniform number (the
# "does it fire" decision) and one child seed per entry, in this order.
_OPS = ("flip_z", "flip_y", "flip_x", "rot90", "affine", "gin", "lowres", "bias", "gamma", "contrast", "noise")


# --------------------------------------------------------------------------- #
# GIN: random shallow convolution network
# --------------------------------------------------------------------------- #


def _conv3d_replicate(h: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Correlate ``h`` (ci, Z, Y, X) with ``w`` (co, ci, k, k, k) plus bias ``b`` (co,), same size,
    borders padded by replication.  Tiny channel counts make shifted multiply-adds cheaper than
    a general convolution routine (and free of thread-pool overhead)."""
    co, ci, k = w.shape[0], w.shape[1], w.shape[2]
    n = h.shape[1:]
    out = np.empty((co, *n), dtype=np.float32)
    if k == 1:
        for o in range(co):
            out[o] = b[o]
            for i in range(ci):
                out[o] += w[o, i, 0, 0, 0] * h[i]
        return out
    p = k // 2
    hp = np.pad(h, ((0, 0), (p, p), (p, p), (p, p)), mode="edge")
    tmp = np.empty(n, dtype=np.float32)
    for o in range(co):
        acc = out[o]
        acc[...] = b[o]
        for i in range(ci):
            for dz in range(k):
                for dy in range(k):
                    for dx in range(k):
                        np.multiply(hp[i, dz:dz + n[0], dy:dy + n[1], dx:dx + n[2]], w[o, i, dz, dy, dx], out=tmp)
                        acc += tmp
    return out


def _tap_envelope(k: int, spread: float) -> np.ndarray:
    """(k, k, k) standard deviations of the kernel taps: ``exp(-|d|^2 / (2 spread^2))`` at offset d."""
    if k == 1 or math.isinf(spread):
        return np.ones((k, k, k), dtype=np.float32)
    r = np.arange(k) - k // 2
    d2 = r[:, None, None] ** 2 + r[None, :, None] ** 2 + r[None, None, :] ** 2
    return np.exp(-d2 / (2.0 * spread * spread)).astype(np.float32)


def gin_augment(
    image: np.ndarray,
    rng: np.random.Generator,
    n_layers: int = 4,
    channels: int = 2,
    kernel_sizes: Sequence[int] = (1, 3),
    alpha_range: tuple[float, float] = (0.0, 1.0),
    spread: float = 0.5,
    return_params: bool = False,
) -> np.ndarray | tuple[np.ndarray, dict[str, Any]]:
    """Global intensity non-linear augmentation (GIN) of one volume (float32, same shape).

    A freshly drawn random network remaps the intensities: ``n_layers``
    convolutions (``1 -> channels -> ... -> channels -> 1`` channels), each with a
    cubic kernel whose size is drawn from ``kernel_sizes`` (1 is a pointwise
    intensity map, 3 also mixes each voxel with its neighbours), random normal
    weights and N(0, 1) biases, and a LeakyReLU (slope 0.01) after every layer
    but the last.  Borders are padded by replication (not zeros), so the patch
    edge does not light up.  The network output ``g`` is standardised to the
    input's mean and standard deviation, blended with the input,
    ``alpha * g + (1 - alpha) * image`` with ``alpha ~ U(alpha_range)``, and the
    blend is standardised again to the input's mean and standard deviation.

    Shapes survive (the maps are local); tissue contrasts change, possibly
    inverting (the weights have random signs), which teaches the model to rely
    on shape rather than on one scanner's intensity profile.  A draw can also
    make two tissues nearly isointense; the blend with the input (``alpha < 1``)
    keeps part of the original contrast.

    Differences from Ouyang et al.'s reference code, chosen for 3-D patches of
    noisy z-scored intensities:

    * Kernel weights at offset ``d`` from the centre are N(0, s^2) with
      ``s = exp(-|d|^2 / (2 spread^2))`` (the centre tap N(0, 1)).  With all 27
      taps N(0, 1), as in the reference, a random 3-D kernel is often a
      high-pass filter and a stack of them turns the patch into amplified noise
      with little of its shape left; ``spread=0.5`` (face neighbours' weights
      about 0.14 of the centre's) keeps the kernels mostly pointwise with some
      neighbourhood mixing.  A large ``spread`` (e.g. 100) gives the
      reference's plain N(0, 1) weights.
    * The reference blends the raw network output, whose scale is orders of
      magnitude above the input's, so ``alpha`` barely matters there;
      standardising first makes ``alpha`` the actual share of the random map.
    * Its Frobenius-norm rescaling is replaced by matching mean and standard
      deviation, which suits z-scored intensities.

    A constant input is returned unchanged.  Numpy only (float32).
    """
    if n_layers < 1 or channels < 1:
        raise ValueError("GIN needs n_layers >= 1 and channels >= 1")
    sizes = [int(k) for k in kernel_sizes]
    if not sizes or any(k < 1 or k % 2 == 0 for k in sizes):
        raise ValueError(f"GIN kernel sizes must be odd and positive, got {list(kernel_sizes)}")
    if not spread > 0:
        raise ValueError(f"GIN spread must be positive, got {spread}")
    src = np.asarray(image, dtype=np.float32)
    # Draw everything first: the stream does not depend on the image.
    ks = [sizes[int(i)] for i in rng.integers(0, len(sizes), size=n_layers)]
    weights = []
    for layer, k in enumerate(ks):
        c_in = 1 if layer == 0 else channels
        c_out = 1 if layer == n_layers - 1 else channels
        w = rng.standard_normal((c_out, c_in, k, k, k), dtype=np.float32) * _tap_envelope(k, spread)
        b = rng.standard_normal(c_out, dtype=np.float32)
        weights.append((w, b))
    alpha = float(rng.uniform(*alpha_range))
    params = {"kernel_sizes": ks, "alpha": alpha}

    mean = float(src.mean(dtype=np.float64))
    std = float(src.std(dtype=np.float64))
    if not std > 0:
        out = src.copy()
        return (out, params) if return_params else out
    h = src[None]
    for layer, (w, b) in enumerate(weights):
        h = _conv3d_replicate(h, w, b)
        if layer < n_layers - 1:
            np.maximum(h, np.float32(0.01) * h, out=h)  # LeakyReLU
    g = h[0]
    # out = mean + c * (alpha * (g - g_mean) * std / g_std + (1 - alpha) * (x - mean)), with c such
    # that out has standard deviation std; the blend's variance follows from cov(g, x).
    g_mean = float(g.mean(dtype=np.float64))
    g_c = g - np.float32(g_mean)
    x_c = src - np.float32(mean)
    g_std = float(np.sqrt(np.mean(np.square(g_c, dtype=np.float32), dtype=np.float64)))
    if not (g_std > 1e-12 * max(1.0, abs(g_mean)) and math.isfinite(g_std)):
        g_std, g_c, alpha_eff = 1.0, x_c, 0.0  # the random map is flat: nothing to blend in
    else:
        alpha_eff = alpha
    a = alpha_eff * std / g_std
    c0 = 1.0 - alpha_eff
    cov = float(np.mean(g_c * x_c, dtype=np.float64))
    var = a * a * g_std * g_std + c0 * c0 * std * std + 2.0 * a * c0 * cov
    if var <= 1e-12 * std * std:  # the blend cancels out (inverted map, alpha ~ 1/2): keep the map
        a, c0 = std / g_std, 0.0
        var = std * std
    scale = std / math.sqrt(var)
    out = (np.float32(a * scale) * g_c + np.float32(c0 * scale) * x_c + np.float32(mean)).astype(np.float32, copy=False)
    return (out, params) if return_params else out


# --------------------------------------------------------------------------- #
# Policies
# --------------------------------------------------------------------------- #


def _as_tuple(value: Any, name: str, length: int | None) -> tuple:
    if isinstance(value, (str, bytes)) or not isinstance(value, (Sequence, np.ndarray)):
        raise ValueError(f"augmentation policy field {name!r} must be a list, got {value!r}")
    out = tuple(value)
    if length is not None and len(out) != length:
        raise ValueError(f"augmentation policy field {name!r} needs {length} values, got {len(out)}")
    return out


def _number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"augmentation policy field {name!r} must hold numbers, got {value!r}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"augmentation policy field {name!r} must be finite, got {value!r}")
    return v


@dataclass(frozen=True)
class AugmentationPolicy:
    """What to do to one training patch, and how often (see :data:`PRESETS`).

    Every ``*_prob`` is the probability that the operation is applied to a
    patch; each operation fires independently.  Ranges are ``(low, high)`` and
    values are drawn uniformly in them.  Operations run in this order:

    Geometric (image and labels alike):

    * ``flip_prob`` — per axis ``(z, y, x)``, mirror the patch along that axis.
      Mirroring along x swaps left and right: leave it at 0 when classes are
      lateralised (left/right structure pairs), or the labels become wrong.
    * ``rot90_prob`` — rotate in the ``(y, x)`` plane by 90, 180 or 270 degrees
      (180 only when the patch is not square in-plane, so the shape is kept).
    * ``affine_prob`` — small rotation about the patch centre, up to
      ``rotation_deg`` (z, y, x) degrees about each axis, and isotropic scaling
      by ``U(scale_range)``, in mm (the ``spacing`` given to :meth:`apply`).  The
      image is resampled trilinearly, the labels with
      :func:`imbalanceseglib.synth.warp_labels` (one-hot linear interpolation,
      kind to thin structures); border voxels are repeated into the corners.

    Intensity (image only):

    * ``gin_prob`` — :func:`gin_augment` with ``gin_layers``, ``gin_channels``,
      ``gin_kernel_sizes``, ``gin_alpha`` and ``gin_spread``.
    * ``lowres_prob`` — thick-slice acquisition along one axis drawn from
      ``lowres_axes``, slice thickness ``U(lowres_factor)`` voxels
      (:func:`imbalanceseglib.synth.simulate_low_resolution`).
    * ``bias_prob`` — multiplicative smooth bias field with mean 1 and strength
      ``U(bias_strength)`` (:func:`imbalanceseglib.synth.bias_field`, polynomial
      of degree ``bias_degree``), multiplying the signal above the zero-signal
      intensity (``background`` of :meth:`apply`).
    * ``gamma_prob`` — gamma ``exp(U(-log_gamma_max, log_gamma_max))`` on the
      patch's robust intensity range (:func:`imbalanceseglib.synth.random_gamma`).
    * ``contrast_prob`` — linear contrast ``U(contrast_scale)`` about the mean and
      brightness shift up to ``contrast_shift`` of the robust range
      (:func:`imbalanceseglib.synth.random_contrast`).
    * ``noise_prob`` — additive Gaussian noise with standard deviation
      ``U(noise_sigma)`` in normalised-intensity units (last, so the noise keeps
      that standard deviation).
    """

    flip_prob: tuple[float, float, float] = (0.0, 0.0, 0.0)
    rot90_prob: float = 0.0
    affine_prob: float = 0.0
    rotation_deg: tuple[float, float, float] = (0.0, 0.0, 0.0)
    scale_range: tuple[float, float] = (1.0, 1.0)
    gin_prob: float = 0.0
    gin_layers: int = 4
    gin_channels: int = 2
    gin_kernel_sizes: tuple[int, ...] = (1, 3)
    gin_alpha: tuple[float, float] = (0.0, 1.0)
    gin_spread: float = 0.5
    lowres_prob: float = 0.0
    lowres_factor: tuple[float, float] = (1.5, 3.0)
    lowres_axes: tuple[int, ...] = (0, 1, 2)
    bias_prob: float = 0.0
    bias_strength: tuple[float, float] = (0.0, 0.3)
    bias_degree: int = 3
    gamma_prob: float = 0.0
    log_gamma_max: float = 0.3
    contrast_prob: float = 0.0
    contrast_scale: tuple[float, float] = (0.85, 1.2)
    contrast_shift: float = 0.05
    noise_prob: float = 0.0
    noise_sigma: tuple[float, float] = (0.0, 0.1)

    def __post_init__(self) -> None:
        def put(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        def prob(name: str) -> None:
            v = _number(getattr(self, name), name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"augmentation policy field {name!r} must be a probability in [0, 1], got {v}")
            put(name, v)

        def span(name: str, lo_min: float, hi_max: float = math.inf) -> None:
            lo, hi = (_number(v, name) for v in _as_tuple(getattr(self, name), name, 2))
            if not lo_min <= lo <= hi <= hi_max:
                raise ValueError(f"augmentation policy field {name!r} must be a range [low, high] with "
                                 f"{lo_min} <= low <= high <= {hi_max}, got {[lo, hi]}")
            put(name, (lo, hi))

        def integer(name: str, minimum: int) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < minimum:
                raise ValueError(f"augmentation policy field {name!r} must be an integer >= {minimum}, got {v!r}")
            put(name, int(v))

        flips = tuple(_number(v, "flip_prob") for v in _as_tuple(self.flip_prob, "flip_prob", 3))
        if not all(0.0 <= v <= 1.0 for v in flips):
            raise ValueError(f"augmentation policy field 'flip_prob' must hold 3 probabilities, got {list(flips)}")
        put("flip_prob", flips)
        for name in ("rot90_prob", "affine_prob", "gin_prob", "lowres_prob", "bias_prob", "gamma_prob",
                     "contrast_prob", "noise_prob"):
            prob(name)
        rot = tuple(_number(v, "rotation_deg") for v in _as_tuple(self.rotation_deg, "rotation_deg", 3))
        if not all(0.0 <= v <= 180.0 for v in rot):
            raise ValueError(f"augmentation policy field 'rotation_deg' must hold 3 angles in [0, 180], got {list(rot)}")
        put("rotation_deg", rot)
        span("scale_range", 0.0)
        if self.scale_range[0] <= 0:
            raise ValueError("augmentation policy field 'scale_range' must be positive")
        integer("gin_layers", 1)
        integer("gin_channels", 1)
        ks = _as_tuple(self.gin_kernel_sizes, "gin_kernel_sizes", None)
        if not ks or any(isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1 or k % 2 == 0
                         for k in ks):
            raise ValueError(f"augmentation policy field 'gin_kernel_sizes' must list odd positive sizes, got {list(ks)}")
        put("gin_kernel_sizes", tuple(int(k) for k in ks))
        span("gin_alpha", 0.0, 1.0)
        put("gin_spread", _number(self.gin_spread, "gin_spread"))
        if not self.gin_spread > 0:
            raise ValueError("augmentation policy field 'gin_spread' must be positive")
        span("lowres_factor", 1.0)
        axes = _as_tuple(self.lowres_axes, "lowres_axes", None)
        if not axes or any(a not in (0, 1, 2) or isinstance(a, bool) for a in axes) or len(set(axes)) != len(axes):
            raise ValueError(f"augmentation policy field 'lowres_axes' must list distinct axes among 0, 1, 2, got {list(axes)}")
        put("lowres_axes", tuple(int(a) for a in axes))
        span("bias_strength", 0.0, 5.0)
        integer("bias_degree", 1)
        put("log_gamma_max", _number(self.log_gamma_max, "log_gamma_max"))
        if not 0.0 <= self.log_gamma_max <= 3.0:
            raise ValueError("augmentation policy field 'log_gamma_max' must be in [0, 3]")
        span("contrast_scale", 0.0)
        put("contrast_shift", _number(self.contrast_shift, "contrast_shift"))
        if self.contrast_shift < 0:
            raise ValueError("augmentation policy field 'contrast_shift' must be >= 0")
        span("noise_sigma", 0.0)

    # -- construction ------------------------------------------------------- #

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "AugmentationPolicy":
        """Policy from a JSON object; unset fields keep the defaults (no augmentation).

        Unknown keys raise ``ValueError`` naming them and listing the known ones;
        bad values raise ``ValueError`` naming the field.
        """
        if not isinstance(d, Mapping):
            raise ValueError(f"an augmentation policy must be a JSON object, got {type(d).__name__}")
        known = cls.field_names()
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise ValueError(f"unknown augmentation policy keys {unknown}; known keys: {known}")
        return cls(**dict(d))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples as lists) that :meth:`from_dict` reads back."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    def with_overrides(self, **changes: Any) -> "AugmentationPolicy":
        """A validated copy with some fields changed."""
        unknown = sorted(set(changes) - set(self.field_names()))
        if unknown:
            raise ValueError(f"unknown augmentation policy keys {unknown}; known keys: {self.field_names()}")
        return replace(self, **changes)

    @property
    def is_identity(self) -> bool:
        """True when no operation can fire."""
        return not any(self.flip_prob) and not any(
            getattr(self, f"{op}_prob") for op in ("rot90", "affine", "gin", "lowres", "bias", "gamma",
                                                   "contrast", "noise"))

    # -- application -------------------------------------------------------- #

    def apply(
        self,
        image: np.ndarray,
        labels: np.ndarray,
        rng: np.random.Generator,
        *,
        spacing: Spacing = (1.0, 1.0, 1.0),
        background: float | None = None,
        return_params: bool = False,
    ) -> tuple[np.ndarray, np.ndarray] | tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        """Augment one patch: returns new ``(image float32, labels same dtype)``, C-contiguous.

        ``spacing`` (mm, z, y, x) is the patches' voxel size: rotations and the
        low-resolution slice-thickness cap work in mm.  ``background`` is the
        normalised intensity of zero signal, about which the bias field
        multiplies (the case minimum after percentile z-scoring, the value
        :class:`~imbalanceseglib.training_data.PatchSampler` pads with); ``None`` uses
        the patch minimum.  With ``return_params`` also returns a dict naming each
        operation applied and its drawn parameters.  The inputs are not modified.
        """
        img = np.asarray(image, dtype=np.float32)
        lab = np.asarray(labels)
        if img.ndim != 3 or img.shape != lab.shape:
            raise ValueError(f"image {img.shape} and labels {lab.shape} must be 3-D arrays of the same shape")
        # Fixed stream layout: one decision and one child seed per operation.
        fire_u = rng.random(len(_OPS))
        seeds = rng.integers(0, 2**63 - 1, size=len(_OPS))
        probs = (*self.flip_prob, self.rot90_prob, self.affine_prob, self.gin_prob, self.lowres_prob,
                 self.bias_prob, self.gamma_prob, self.contrast_prob, self.noise_prob)
        fire = {op: bool(u < p) for op, u, p in zip(_OPS, fire_u, probs)}
        child = {op: np.random.default_rng(int(s)) for op, s in zip(_OPS, seeds)}
        applied: dict[str, Any] = {}

        # Geometry
        flip_axes = tuple(ax for ax, op in enumerate(("flip_z", "flip_y", "flip_x")) if fire[op])
        if flip_axes:
            img, lab = np.flip(img, flip_axes), np.flip(lab, flip_axes)
            applied["flip"] = list(flip_axes)
        if fire["rot90"]:
            k = 2 if img.shape[1] != img.shape[2] else int(child["rot90"].integers(1, 4))
            img, lab = np.rot90(img, k, axes=(1, 2)), np.rot90(lab, k, axes=(1, 2))
            applied["rot90"] = k
        if fire["affine"]:
            r = child["affine"]
            angles = tuple(float(a) for a in r.uniform(-1.0, 1.0, size=3) * np.asarray(self.rotation_deg))
            scale = float(r.uniform(*self.scale_range))
            disp = synth.affine_displacement(img.shape, spacing, rotation_deg=angles, scale=(scale,) * 3)
            img = synth.warp_image(np.ascontiguousarray(img), disp, order=1)
            lab = synth.warp_labels(np.ascontiguousarray(lab), disp)
            applied["affine"] = {"rotation_deg": list(angles), "scale": scale}
        img = np.ascontiguousarray(img, dtype=np.float32)
        lab = np.ascontiguousarray(lab)
        if img is image:  # never hand back the caller's array
            img = img.copy()
        if lab is labels:
            lab = lab.copy()

        # Intensity
        if fire["gin"]:
            img, gp = gin_augment(img, child["gin"], n_layers=self.gin_layers, channels=self.gin_channels,
                                  kernel_sizes=self.gin_kernel_sizes, alpha_range=self.gin_alpha,
                                  spread=self.gin_spread, return_params=True)
            applied["gin"] = gp
        if fire["lowres"]:
            r = child["lowres"]
            axis = int(self.lowres_axes[int(r.integers(0, len(self.lowres_axes)))])
            factor = float(r.uniform(*self.lowres_factor))
            img = synth.simulate_low_resolution(img, spacing, r, factor=factor, axis=axis)
            applied["lowres"] = {"axis": axis, "factor": factor}
        if fire["bias"]:
            r = child["bias"]
            strength = float(r.uniform(*self.bias_strength))
            field = synth.bias_field(img.shape, r, strength=strength, degree=self.bias_degree)
            ref = np.float32(img.min() if background is None else background)
            img = (img - ref) * field + ref
            applied["bias"] = {"strength": strength, "reference": float(ref)}
        if fire["gamma"]:
            img = synth.random_gamma(img, child["gamma"], log_gamma_max=self.log_gamma_max)
            applied["gamma"] = {"log_gamma_max": self.log_gamma_max}
        if fire["contrast"]:
            img = synth.random_contrast(img, child["contrast"], scale_range=self.contrast_scale,
                                        shift_frac=self.contrast_shift)
            applied["contrast"] = {"scale_range": list(self.contrast_scale), "shift": self.contrast_shift}
        if fire["noise"]:
            r = child["noise"]
            sigma = float(r.uniform(*self.noise_sigma))
            img = synth.add_gaussian_noise(img, r, sigma)
            applied["noise"] = {"sigma": sigma}

        img = np.ascontiguousarray(img, dtype=np.float32)
        return (img, lab, applied) if return_params else (img, lab)

    __call__ = apply


#: Hand-set policies.
#:
#: * ``none`` — no augmentation.
#: * ``default`` — mild augmentation for patches of frequent classes and random
#:   patches: small rotations (up to 10 degrees) and scaling (0.9-1.1) a fifth
#:   of the time, occasional bias field, gamma, contrast, noise and thick slices.
#: * ``rare`` — stronger and more frequent augmentation for patches sampled
#:   around rare classes, the ones the network overfits (Li et al.): rotations up
#:   to 15 degrees and scaling 0.85-1.15 half of the time, intensity changes a
#:   third to half of the time, and GIN a quarter of the time.
#: * ``shift_robust`` — mostly intensity and resolution changes, for robustness
#:   to other scanners and protocols: GIN half of the time (Ouyang et al.), strong
#:   bias fields, gamma and contrast, noise and thick slices up to 4 voxels.
#:
#: No preset mirrors or rotates by 90 degrees: mirroring swaps left and right,
#: which corrupts lateralised labels (left/right structure pairs), and the data
#: are in one canonical orientation.  Enable ``flip_prob`` / ``rot90_prob`` with
#: :meth:`AugmentationPolicy.with_overrides` for symmetric, unlateralised classes.
PRESETS: dict[str, AugmentationPolicy] = {
    "none": AugmentationPolicy(),
    "default": AugmentationPolicy(
        affine_prob=0.2, rotation_deg=(10.0, 10.0, 10.0), scale_range=(0.9, 1.1),
        lowres_prob=0.1, lowres_factor=(1.5, 2.5),
        bias_prob=0.2, bias_strength=(0.0, 0.2),
        gamma_prob=0.3, log_gamma_max=0.3,
        contrast_prob=0.15, contrast_scale=(0.85, 1.2), contrast_shift=0.05,
        noise_prob=0.15, noise_sigma=(0.0, 0.1),
    ),
    "rare": AugmentationPolicy(
        affine_prob=0.5, rotation_deg=(15.0, 15.0, 15.0), scale_range=(0.85, 1.15),
        gin_prob=0.25,
        lowres_prob=0.25, lowres_factor=(1.5, 3.0),
        bias_prob=0.4, bias_strength=(0.0, 0.3),
        gamma_prob=0.5, log_gamma_max=0.4,
        contrast_prob=0.3, contrast_scale=(0.8, 1.25), contrast_shift=0.08,
        noise_prob=0.3, noise_sigma=(0.0, 0.15),
    ),
    "shift_robust": AugmentationPolicy(
        affine_prob=0.2, rotation_deg=(10.0, 10.0, 10.0), scale_range=(0.9, 1.1),
        gin_prob=0.5,
        lowres_prob=0.4, lowres_factor=(1.5, 4.0),
        bias_prob=0.5, bias_strength=(0.1, 0.4),
        gamma_prob=0.5, log_gamma_max=0.5,
        contrast_prob=0.5, contrast_scale=(0.7, 1.4), contrast_shift=0.1,
        noise_prob=0.5, noise_sigma=(0.0, 0.15),
    ),
}


def policy_from_config(spec: str | Mapping[str, Any] | AugmentationPolicy) -> AugmentationPolicy:
    """A policy from a preset name, a JSON object, or ``{"preset": name, ...overrides}``."""
    if isinstance(spec, AugmentationPolicy):
        return spec
    if isinstance(spec, str):
        if spec not in PRESETS:
            raise ValueError(f"unknown augmentation preset {spec!r}; presets: {sorted(PRESETS)}")
        return PRESETS[spec]
    if isinstance(spec, Mapping) and "preset" in spec:
        base = policy_from_config(spec["preset"])
        return AugmentationPolicy.from_dict({**base.to_dict(), **{k: v for k, v in spec.items() if k != "preset"}})
    return AugmentationPolicy.from_dict(spec)


# --------------------------------------------------------------------------- #
# Class-specific augmentation
# --------------------------------------------------------------------------- #


def rare_classes_by_fraction(voxel_counts: Sequence[int] | np.ndarray,
                             max_fraction: float = RARE_FRACTION) -> set[int]:
    """Foreground classes (index >= 1) whose share of all labelled voxels is below ``max_fraction``
    and above zero, e.g. from :func:`imbalanceseglib.training_data.class_voxel_counts`: the library's
    rare-class rule (:func:`imbalanceseglib.rare.resolve_rare_mask`) with ``absent_is_rare=False``."""
    mask = resolve_rare_mask(voxel_counts=voxel_counts, threshold=max_fraction, absent_is_rare=False)
    return {int(c) for c, rare in enumerate(mask.tolist()) if rare}


class ClassSpecificAugmenter:
    """Stronger augmentation for patches sampled around rare classes (Li et al., TMI 2023).

    ``augmenter(image, labels, chosen_class, rng)`` applies ``rare`` when
    ``chosen_class`` (the class :meth:`PatchSampler.sample
    <imbalanceseglib.training_data.PatchSampler.sample>` centred the patch on, or
    ``None`` for a random patch) is in ``rare_classes``, and ``default``
    otherwise.  The choice follows how the patch was sampled, not which labels
    it happens to contain: a random patch that catches a rare structure gets the
    default policy.  ``spacing`` is the patches' voxel size in mm.
    """

    def __init__(self, default: AugmentationPolicy, rare: AugmentationPolicy, rare_classes: set[int] | Sequence[int],
                 *, spacing: Spacing = (1.0, 1.0, 1.0)):
        if not isinstance(default, AugmentationPolicy) or not isinstance(rare, AugmentationPolicy):
            raise TypeError("default and rare must be AugmentationPolicy objects (see policy_from_config)")
        classes = set()
        for c in rare_classes:
            if isinstance(c, bool) or not isinstance(c, (int, np.integer)) or c < 0:
                raise ValueError(f"rare classes must be non-negative class indices, got {c!r}")
            classes.add(int(c))
        self.default = default
        self.rare = rare
        self.rare_classes = frozenset(classes)
        self.spacing = tuple(float(s) for s in spacing)
        if len(self.spacing) != 3 or not all(s > 0 for s in self.spacing):
            raise ValueError(f"spacing must be 3 positive sizes, got {spacing!r}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, spacing: Spacing = (1.0, 1.0, 1.0)) -> "ClassSpecificAugmenter":
        """From ``{"default": policy, "rare": policy, "rare_classes": [...]}``; each policy is a
        preset name or an object accepted by :func:`policy_from_config`."""
        known = ["default", "rare", "rare_classes"]
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise ValueError(f"unknown class-specific augmentation keys {unknown}; known keys: {known}")
        return cls(policy_from_config(d.get("default", "default")), policy_from_config(d.get("rare", "rare")),
                   d.get("rare_classes", []), spacing=spacing)

    def to_dict(self) -> dict[str, Any]:
        return {"default": self.default.to_dict(), "rare": self.rare.to_dict(),
                "rare_classes": sorted(self.rare_classes)}

    def is_rare(self, chosen_class: int | None) -> bool:
        return chosen_class is not None and int(chosen_class) in self.rare_classes

    def policy_for(self, chosen_class: int | None) -> AugmentationPolicy:
        return self.rare if self.is_rare(chosen_class) else self.default

    def __call__(self, image: np.ndarray, labels: np.ndarray, chosen_class: int | None, rng: np.random.Generator,
                 *, background: float | None = None, return_params: bool = False):
        """Augmented ``(image, labels)`` (plus the applied-operations dict, with a ``"policy"``
        entry ``"rare"`` or ``"default"``, when ``return_params``)."""
        is_rare = self.is_rare(chosen_class)
        policy = self.rare if is_rare else self.default
        out = policy.apply(image, labels, rng, spacing=self.spacing, background=background, return_params=return_params)
        if return_params:
            img, lab, params = out
            params["policy"] = "rare" if is_rare else "default"
            return img, lab, params
        return out
