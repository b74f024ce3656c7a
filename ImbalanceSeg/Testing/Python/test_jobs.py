"""Segmentation in a background process: same numbers as in-process, named progress steps,
cancel and failure leave the scene as it was."""

import os
import time

import numpy as np
import pytest
import SimpleITK as sitk

from imbalanceseglib.bundle import save_bundle

from ImbalanceSeg import ImbalanceSegLogic
from ImbalanceSegSlicer import scene as sc
from ImbalanceSegSlicer.jobs import CANCELLED, DONE, FAILED, RUNNING, JobError, SegmentationJob
from test_logic import _bundle


def _node_ids(scene):
    return sorted(scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes()))


def _array(node):
    return sitk.GetArrayFromImage(sc.sitk_from_volume_node(node))


@pytest.fixture
def model_file(tmp_path):
    b = _bundle(seed=3)
    return save_bundle(tmp_path / "sphere.imbseg", b.card, b.network)


def test_background_job_gives_the_same_result_as_in_process(scene, synthetic, model_file):
    volume = sc.volume_node_from_sitk(scene, synthetic["image"], "Input")
    logic = ImbalanceSegLogic(scene)
    stages = []
    job = SegmentationJob(logic, volume, model_file, threads=1).start()
    assert job.state == RUNNING and job.pid
    result = job.wait(timeout=300, interval=0.05, progress=lambda s, f: stages.append(s))
    assert job.state == DONE
    in_process = logic.process(volume, model_file, baseName="again")
    for a, b in zip(result.probabilityNodes, in_process.probabilityNodes):
        np.testing.assert_allclose(_array(a), _array(b), atol=2e-5)  # streamed vs MONAI's sliding window
    np.testing.assert_allclose(_array(result.uncertaintyNode), _array(in_process.uncertaintyNode), atol=2e-5)
    assert sc.segment_voxel_counts(result.segmentationNode) == sc.segment_voxel_counts(in_process.segmentationNode)
    for r1, r2 in zip(result.performanceRows, in_process.performanceRows):
        assert r1["State"] == r2["State"]
        if r1["Estimated Dice"] is not None:
            assert r1["Estimated Dice"] == pytest.approx(r2["Estimated Dice"], abs=1e-4)
    assert job.stages == ["load model", "preprocess", "network", "estimate", "postprocess", "write", "results"]
    assert stages and set(stages) <= set(job.stages) | {"starting"}
    assert job._tmp is None  # temporary files removed
    # the worker says how the network ran: the engine or the module, and where the plan came from
    assert job.execution["engine"] in ("onednn", "module") and job.execution["source"] in ("default", "tuned",
                                                                                          "tuned (cached)", "given")
    # The background result can be reviewed like any other.
    assert logic.resultClassNames(result.segmentationNode) == ["Sphere A", "Sphere B"]


def test_cancel_leaves_the_scene_as_before_and_stops_the_process(scene, synthetic, model_file):
    volume = sc.volume_node_from_sitk(scene, synthetic["image"], "Input")
    before = _node_ids(scene)
    job = SegmentationJob(ImbalanceSegLogic(scene), volume, model_file, threads=1).start()
    pid = job.pid
    assert job.cancel() == CANCELLED
    assert _node_ids(scene) == before
    with pytest.raises(ProcessLookupError):
        for _ in range(50):  # the process group is gone (reaped by cancel)
            os.kill(pid, 0)
            time.sleep(0.1)
    with pytest.raises(JobError, match="cancelled"):
        job.wait()
    assert job._tmp is None


def test_worker_failure_is_reported_and_nothing_is_added(scene, synthetic, tmp_path):
    damaged = tmp_path / "damaged.imbseg"
    damaged.write_bytes(b"PK\x03\x04 not really a zip")
    volume = sc.volume_node_from_sitk(scene, synthetic["image"], "Input")
    before = _node_ids(scene)
    job = SegmentationJob(ImbalanceSegLogic(scene), volume, damaged, threads=1).start()
    with pytest.raises(JobError, match="BundleError.*damaged.imbseg"):
        job.wait(timeout=300)
    assert job.state == FAILED
    assert _node_ids(scene) == before


def test_input_removed_while_running_adds_nothing(scene, synthetic, model_file):
    volume = sc.volume_node_from_sitk(scene, synthetic["image"], "Input")
    job = SegmentationJob(ImbalanceSegLogic(scene), volume, model_file, threads=1).start()
    sc.remove_node_with_dependents(scene, volume)
    before = _node_ids(scene)
    with pytest.raises(JobError, match="input volume was removed"):
        job.wait(timeout=300)
    assert _node_ids(scene) == before


def test_bad_inputs_are_refused_before_starting(scene, synthetic, tmp_path, model_file):
    logic = ImbalanceSegLogic(scene)
    with pytest.raises(ValueError, match="scalar input volume"):
        SegmentationJob(logic, None, model_file).start()
    volume = sc.volume_node_from_sitk(scene, synthetic["image"], "Input")
    with pytest.raises(FileNotFoundError, match="missing.imbseg does not exist"):
        SegmentationJob(logic, volume, tmp_path / "missing.imbseg").start()
