"""Structured progress events of long-running commands, one JSON object a line (torch-free).

``imbalanceseg train --events``, ``imbalanceseg calibrate --events`` and the Slicer
segmentation worker write these on stdout; the Slicer background jobs read them back with
:func:`parse_event` (one reader for all of them, no parsing of human log lines). Every event
is a JSON object whose ``"event"`` names its kind:

================  =============================================================================
``progress``      ``stage`` (str), ``fraction`` (0..1 within that stage)
``iteration``     ``iteration`` (iterations done), ``total``, ``loss`` (mean since the last one)
``validation``    ``iteration``, ``dice`` ({class name: Dice, or null where the class is absent})
``artifact``      ``kind`` (``"bundle"`` or ``"checkpoint"``), ``path`` (the file written)
``log``           ``message`` (one human-readable log line)
``warning``       ``kind`` (one of :data:`WARNING_KINDS`), ``message`` (one human-readable line, which
                  the producer also writes to its log), ``classes`` (the class names it is about)
``done``          the command finished; may carry extra fields (e.g. ``timings``)
``error``         ``type`` (exception class name), ``message``
================  =============================================================================

Warnings (``warning``) so far come at the end of training: ``never_learned`` names the foreground
classes whose validation Dice at the end is 0 and says what to try, ``barely_learned`` those
whose Dice is above 0 but under 0.05 (``training_loop.BARELY_LEARNED_DICE``); ``not_checked`` the classes
that could not be checked (no validation cases, or none containing the class).

Producers take an ``events`` callback (``Callable[[dict], None]``, default None: no events);
:class:`JsonLinesWriter` is the one that writes them as JSON lines. Non-finite numbers are
written as ``null``, so every line is strict JSON.
"""

from __future__ import annotations

import json
import math
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, TextIO

Event = Dict[str, Any]
EventFn = Callable[[Event], None]

KINDS = ("progress", "iteration", "validation", "artifact", "log", "warning", "done", "error")
ARTIFACT_KINDS = ("bundle", "checkpoint")
WARNING_KINDS = ("never_learned", "barely_learned", "not_checked")


def progress(stage: str, fraction: float) -> Event:
    return {"event": "progress", "stage": str(stage), "fraction": float(fraction)}


def iteration(done: int, total: int, loss: float) -> Event:
    return {"event": "iteration", "iteration": int(done), "total": int(total), "loss": float(loss)}


def validation(done: int, dice: Mapping[str, Optional[float]]) -> Event:
    return {"event": "validation", "iteration": int(done),
            "dice": {str(k): (None if v is None else float(v)) for k, v in dice.items()}}


def artifact(kind: str, path) -> Event:
    if kind not in ARTIFACT_KINDS:
        raise ValueError(f"artifact kind must be one of {ARTIFACT_KINDS}, got {kind!r}")
    return {"event": "artifact", "kind": kind, "path": str(path)}


def log(message: str) -> Event:
    return {"event": "log", "message": str(message)}


def warning(kind: str, message: str, classes: Sequence[str] = ()) -> Event:
    if kind not in WARNING_KINDS:
        raise ValueError(f"warning kind must be one of {WARNING_KINDS}, got {kind!r}")
    return {"event": "warning", "kind": kind, "message": str(message), "classes": [str(c) for c in classes]}


def done(**fields: Any) -> Event:
    return {"event": "done", **fields}


def error(type_: str, message: str) -> Event:
    return {"event": "error", "type": str(type_), "message": str(message)}


def error_from(exc: BaseException) -> Event:
    return error(type(exc).__name__, str(exc))


def _strict(value: Any) -> Any:
    """JSON-safe copy: non-finite floats become None, paths strings."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def to_line(event: Mapping[str, Any]) -> str:
    """One event as one line of strict JSON (no trailing newline)."""
    if event.get("event") not in KINDS:
        raise ValueError(f"unknown event kind {event.get('event')!r}; known: {', '.join(KINDS)}")
    return json.dumps(_strict(dict(event)), allow_nan=False, default=str)


def parse_event(line: str) -> Optional[Event]:
    """The event on one line, or None when the line is not an event (plain text, other JSON).

    Kinds this version does not know are returned as they are; readers ignore them."""
    text = line.strip()
    if not text.startswith("{"):
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("event"), str):
        return None
    return value


class JsonLinesWriter:
    """An ``events`` callback that writes each event as one JSON line and flushes it.

    ``stream`` defaults to ``sys.stdout`` as it is at each call. Thread-safe (one line at a time)."""

    def __init__(self, stream: Optional[TextIO] = None):
        self._stream = stream
        self._lock = threading.Lock()

    def __call__(self, event: Mapping[str, Any]) -> None:
        line = to_line(event) + "\n"
        stream = self._stream if self._stream is not None else sys.stdout
        with self._lock:
            stream.write(line)
            stream.flush()
