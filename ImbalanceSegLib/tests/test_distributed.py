"""Distributed training (torch.distributed, gloo, two CPU processes) against one process with the
same global batch: same loss curve, same class weights, one bundle written by rank 0."""

import json
import os
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from imbalanceseglib.bundle import load_bundle
from imbalanceseglib.training import TrainConfig, train

from libtest_helpers import CLASSES, sphere_case, train_killed_at

HERE = Path(__file__).resolve().parent


def _config(weighting):
    """``weighting``: a class weighting, or ``deep_supervision`` (none, with deep supervision: the
    auxiliary heads' gradients are averaged over the ranks like the network's)."""
    deep = weighting == "deep_supervision"
    return TrainConfig.from_dict(dict(
        name="ddp", classes=CLASSES, target_spacing=[1.0, 1.0, 1.0], patch_size=[16, 16, 16],
        features=[4, 8, 16] if deep else [4, 8], iterations=8, batch_size=4, learning_rate=1e-2, val_every=1000,
        checkpoint_every=4, log_every=1, normalization={"scheme": "none"}, seed=5,
        loss={"name": "dice_ce", "dice_reduction": "image"},
        class_weighting={"method": "none" if deep else weighting}, deep_supervision={"enabled": deep}))


def _cases():
    from imbalanceseglib.training import make_case
    return [make_case(*sphere_case(s, shape=(24, 24, 24)), name=f"c{s}") for s in range(3)]


def _rank_main(rank, world, port, out, weighting, result_file):
    sys.path.insert(0, str(HERE))
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(world),
                       "RANK": str(rank), "LOCAL_RANK": str(rank)})
    torch.set_num_threads(1)
    logs = []
    path = train(_config(weighting), _cases(), [], Path(out), log=logs.append)
    Path(result_file + f".{rank}").write_text(json.dumps({"path": str(path), "logs": len(logs)}))
    import torch.distributed as dist
    dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _losses(card):
    return [h["loss"] for h in card["training"]["history"] if "loss" in h]


@pytest.mark.parametrize("weighting", ["none", "cdifw", "deep_supervision"])
def test_two_processes_follow_the_single_process_loss_curve(tmp_path, weighting):
    torch.set_num_threads(1)
    single = load_bundle(train(_config(weighting), _cases(), [], tmp_path / "single")).card
    result = str(tmp_path / "result")
    mp.start_processes(_rank_main, args=(2, _free_port(), str(tmp_path / "ddp"), weighting, result),
                       nprocs=2, join=True, start_method="spawn")
    r0, r1 = (json.loads(Path(f"{result}.{r}").read_text()) for r in (0, 1))
    assert r0["path"] == r1["path"] and Path(r0["path"]).is_file()
    assert r0["logs"] > 0 and r1["logs"] == 0  # only rank 0 logs
    ddp = load_bundle(r0["path"]).card
    assert ddp["training"]["processes"] == 2
    a, b = _losses(single), _losses(ddp)
    assert len(a) == len(b) == 8
    assert b == pytest.approx(a, rel=1e-4, abs=1e-5)
    if weighting == "cdifw":
        wa = [h["class_weights"] for h in single["training"]["history"] if "class_weights" in h]
        wb = [h["class_weights"] for h in ddp["training"]["history"] if "class_weights" in h]
        assert len(wa) == len(wb) == 8
        for x, y in zip(wa, wb):
            assert y == pytest.approx(x, abs=2e-4)
        assert wa[-1] != wa[0]  # the weights did move
    if weighting == "deep_supervision":
        assert ddp["training"]["deep_supervision"] == single["training"]["deep_supervision"]


def test_uneven_batch_is_refused(monkeypatch):
    from imbalanceseglib import distributed as dd
    with pytest.raises(ValueError, match="batch_size 3 must be divisible by the number of processes \\(2\\)"):
        dd.local_slice(3, dd.DistContext(rank=0, world=2))
    assert dd.local_slice(4, dd.DistContext(rank=1, world=2)) == slice(2, 4)


def test_two_processes_resume_a_checkpoint_and_finish_like_an_uninterrupted_run(tmp_path):
    """Every rank draws the same global batch from the checkpointed generators, so a run stopped
    after its checkpoint at iteration 4 and resumed by two processes from the shared folder ends
    where one uninterrupted process ends."""
    torch.set_num_threads(1)
    full_bundle = load_bundle(train(_config("cdifw"), _cases(), [], tmp_path / "full"))
    full = full_bundle.card
    out = tmp_path / "resumed"

    assert train_killed_at(train, 6, _config("cdifw"), _cases(), [], out)["iteration"] == 4
    result = str(tmp_path / "result")
    mp.start_processes(_rank_main, args=(2, _free_port(), str(out), "cdifw", result),
                       nprocs=2, join=True, start_method="spawn")
    resumed = load_bundle(json.loads(Path(f"{result}.0").read_text())["path"])
    assert resumed.card["training"]["processes"] == 2
    assert _losses(resumed.card) == pytest.approx(_losses(full), rel=1e-4, abs=1e-5)
    a = full_bundle.network.state_dict()
    for k, v in resumed.network.state_dict().items():
        torch.testing.assert_close(v, a[k], rtol=1e-3, atol=1e-4)
