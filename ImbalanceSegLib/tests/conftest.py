import numpy as np
import pytest
import torch

from imbalanceseglib.training import TrainConfig, make_case

from libtest_helpers import CLASSES, sphere_case


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
