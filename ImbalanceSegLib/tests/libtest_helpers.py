"""Shared test data for the ImbalanceSegLib tests (imported by name; conftest holds fixtures)."""

import numpy as np

CLASSES = [{"value": 0, "name": "Background", "color": [0, 0, 0]},
           {"value": 1, "name": "Ball", "color": [1, 0, 0]},
           {"value": 2, "name": "Bead", "color": [0, 1, 0]}]


def sphere_case(seed: int, shape=(32, 32, 32), noise=0.2):
    """A large ball and a small bead at random places, intensity = label + noise."""
    rng = np.random.default_rng(seed)
    z, y, x = np.mgrid[: shape[0], : shape[1], : shape[2]]
    c = rng.integers(12, 20, 3)
    lab = np.zeros(shape, np.uint8)
    lab[(z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2 < 49] = 1
    b = rng.integers(4, 8, 3)
    lab[(z - b[0]) ** 2 + (y - b[1]) ** 2 + (x - b[2]) ** 2 < 5] = 2
    img = lab.astype(np.float32) * np.array([0, 1.0, 2.0], np.float32)[lab] / np.maximum(lab, 1)
    img = img + rng.normal(0, noise, shape).astype(np.float32)
    return img.astype(np.float32), lab


class Killed(Exception):
    """Raised by :func:`train_killed_at` to stop a training run from its log callback."""


def train_killed_at(train, iteration: int, *args, **kwargs):
    """Run ``train(*args, **kwargs)`` and kill it when it logs ``iter  <iteration>/``, as a crash
    would; returns the checkpoint it left (``weights_only``). The run must reach that line."""
    import re
    from pathlib import Path

    import pytest
    import torch

    def log(msg):
        m = re.match(r"iter\s+(\d+)/", msg)
        if m and int(m.group(1)) == iteration:
            raise Killed()
    with pytest.raises(Killed):
        train(*args, log=log, **kwargs)
    return torch.load(Path(args[3]) / "checkpoint.pt", weights_only=True)
