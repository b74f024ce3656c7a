import numpy as np
import pytest
import torch

from imbalanceseglib.training import TrainConfig, make_case

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


@pytest.fixture
def tiny_config():
    return TrainConfig.from_dict(dict(
        name="tiny", classes=CLASSES, target_spacing=[1.0, 1.0, 1.0], patch_size=[32, 32, 32],
        features=[4, 8], iterations=40, batch_size=2, learning_rate=1e-2, val_every=1000,
        checkpoint_every=10, log_every=10, normalization={"scheme": "none"}, seed=3))


@pytest.fixture
def tiny_cases():
    return [make_case(*sphere_case(s), name=f"c{s}") for s in range(3)]


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)
