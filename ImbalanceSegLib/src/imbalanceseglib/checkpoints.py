"""Training checkpoints: the one file format both trainers write, read and resume from.

``<out_dir>/checkpoint.pt`` is a ``torch.save`` dict that loads with ``weights_only=True``
(tensors, numbers and strings only; no pickled objects), written atomically
(:func:`imbalanceseglib.atomic.atomic_path`), so an interrupted write leaves the previous
checkpoint in place.  Its entries:

``model``          network state dict
``teachers``       EMA teacher state dict (semi-supervised trainer only; ``{}`` without teachers)
``optimizer``      AdamW state dict
``scheduler``      learning-rate schedule state dict
``torch_rng``      torch's CPU random state
``numpy_rng``      JSON of the numpy generator's bit-generator state
``history``        JSON list of the log/validation entries so far
``iteration``      iterations done
``elapsed``        training seconds so far
``config``         JSON of ``TrainConfig.to_dict()`` (sorted keys; :func:`config_fingerprint`):
                   resuming refuses another config
``class_weights``  JSON of the class weighter state (None without one; a list for two networks)
``deep_supervision`` the auxiliary heads' state dict (only when deep supervision is on; they
                   are trained with the network but never go into the bundle)
``context_labels`` the task generator's state (only when context labels are on: its network,
                   its optimizer and schedule, :meth:`imbalanceseglib.context_labels.ContextLabels.state_dict`;
                   never in the bundle)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from .atomic import atomic_path

__all__ = ["CHECKPOINT_FILE", "checkpoint_state", "config_fingerprint", "load_checkpoint", "restore_checkpoint",
           "resume_checkpoint", "save_checkpoint"]

CHECKPOINT_FILE = "checkpoint.pt"


def config_fingerprint(config) -> str:
    """The ``config`` entry of a checkpoint: the config as JSON with sorted keys.  Deep supervision
    and context labels enter with their settings filled in (``TrainConfig.deep_supervision_settings``,
    ``TrainConfig.context_labels_settings``: a run with other settings is refused) when they are
    on, and not at all when they are off, so the checkpoints of runs from before they existed
    still resume."""
    d = config.to_dict()
    for key, settings in (("deep_supervision", config.deep_supervision_settings),
                          ("context_labels", config.context_labels_settings)):
        if settings["enabled"]:
            d[key] = settings
        else:
            d.pop(key, None)
    return json.dumps(d, sort_keys=True)


def save_checkpoint(path: Path, state: Dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically."""
    with atomic_path(path, suffix=".pt") as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: Path) -> Dict[str, Any]:
    """Read a checkpoint on the CPU, refusing pickled objects (``weights_only=True``)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def checkpoint_state(*, network: torch.nn.Module, optimizer, scheduler, rng: np.random.Generator,
                     history: List[Dict[str, Any]], iteration: int, elapsed: float, config_json: str,
                     class_weights: Any, teachers: Optional[torch.nn.Module] = None,
                     with_teachers: bool = False, auxiliary: Optional[torch.nn.Module] = None,
                     context: Optional[Any] = None) -> Dict[str, Any]:
    """The checkpoint dict (entries in the order of the module docstring); ``teachers`` is
    written when ``with_teachers`` (the semi-supervised trainer), as ``{}`` when None;
    ``auxiliary`` (deep supervision's heads) and ``context`` (context labels' generator, an
    object with ``state_dict``/``load_state_dict``) when given."""
    state: Dict[str, Any] = {"model": network.state_dict()}
    if with_teachers:
        state["teachers"] = teachers.state_dict() if teachers is not None else {}
    state.update({
        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "torch_rng": torch.get_rng_state(), "numpy_rng": json.dumps(rng.bit_generator.state),
        "history": json.dumps(history), "iteration": iteration, "elapsed": elapsed, "config": config_json,
        "class_weights": json.dumps(class_weights)})
    if auxiliary is not None:
        state["deep_supervision"] = auxiliary.state_dict()
    if context is not None:
        state["context_labels"] = context.state_dict()
    return state


def resume_checkpoint(path: Path, config_json: str) -> Dict[str, Any]:
    """The checkpoint at ``path``, refused (ValueError) when written with another config."""
    ck = load_checkpoint(path)
    if ck.get("config") != config_json:
        raise ValueError(f"{path} was written with a different config; use another output folder or resume=False")
    return ck


def restore_checkpoint(ck: Dict[str, Any], *, network: torch.nn.Module, optimizer, scheduler,
                       rng: np.random.Generator, teachers: Optional[torch.nn.Module] = None,
                       auxiliary: Optional[torch.nn.Module] = None, context: Optional[Any] = None
                       ) -> Tuple[List[Dict[str, Any]], int, float, Any]:
    """Load a checkpoint's states into the training objects (torch's random state included);
    returns (history, iterations done, elapsed seconds, class weighter state(s)).  With
    ``auxiliary`` (deep supervision's heads) or ``context`` (context labels' generator) the
    checkpoint must hold their state and without them must not (ValueError: written by a run
    with deep supervision or context labels set the other way)."""
    for name, key, given in (("deep supervision", "deep_supervision", auxiliary is not None),
                             ("context labels", "context_labels", context is not None)):
        if given != (key in ck):
            raise ValueError(f"the checkpoint was written by a run with {name} {'off' if given else 'on'}; "
                             "use another output folder or resume=False")
    network.load_state_dict(ck["model"])
    if teachers is not None:
        teachers.load_state_dict(ck["teachers"])
    if auxiliary is not None:
        auxiliary.load_state_dict(ck["deep_supervision"])
    if context is not None:
        context.load_state_dict(ck["context_labels"])
    optimizer.load_state_dict(ck["optimizer"])
    scheduler.load_state_dict(ck["scheduler"])
    torch.set_rng_state(ck["torch_rng"])
    rng.bit_generator.state = json.loads(ck["numpy_rng"])
    return json.loads(ck["history"]), int(ck["iteration"]), float(ck["elapsed"]), json.loads(ck["class_weights"])
