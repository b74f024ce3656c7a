"""Segmentation in a background process: same numbers as in-process, named progress steps,
cancel and failure leave the scene as it was."""

import os
import subprocess
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


# -- one event reader for both jobs ------------------------------------------------------------

def test_one_reader_turns_the_child_output_into_events():
    from ImbalanceSegSlicer.jobs import _ProcessJob
    job = _ProcessJob(python="python", threads=None)
    for line in ['{"event": "progress", "stage": "network", "fraction": 0.5}', "plain text from a library",
                 '{"event": "log", "message": "[train] step 3"}', '{"no": "event"}', "   ",
                 '{"event": "iteration", "iteration": 3, "total": 9, "loss": 0.25}',
                 '{"event": "warning", "kind": "never_learned", "message": "[train] never learned: B", '
                 '"classes": ["B"]}',
                 '{"event": "error", "type": "BundleError", "message": "damaged"}', '{"event": "done"}', None]:
        job._lines.put(line)
    events = job._events()
    assert [e["event"] for e in events] == ["progress", "log", "iteration", "warning", "error", "done"]
    assert job.log == ["plain text from a library", "[train] step 3", '{"no": "event"}']
    # warnings are kept for the end (the trainer wrote the same line to its log already)
    assert job.warnings == [{"event": "warning", "kind": "never_learned", "message": "[train] never learned: B",
                             "classes": ["B"]}]
    assert job.error == "BundleError: damaged" and job._done_event == {"event": "done"} and job._eof


# -- Windows: no console window, cancel kills the whole process tree (#17) -----------------------

class _FakeWindowsChild:
    """A launcher (PythonSlicer.exe) whose real Python child only taskkill /T reaches."""

    def __init__(self, pid=4242):
        self.pid, self.returncode, self.calls = pid, None, []

    def poll(self):
        return self.returncode

    def wait(self, timeout=None):
        self.calls.append(("wait", timeout))
        if self.returncode is None:
            raise subprocess.TimeoutExpired("PythonSlicer.exe", timeout)
        return self.returncode

    def kill(self):
        self.calls.append(("kill",))
        self.returncode = 1

    def terminate(self):
        self.calls.append(("terminate",))
        self.returncode = 1


def _no_posix_kill(*args):
    raise AssertionError("os.killpg on Windows")


def test_windows_children_start_without_a_console_in_their_own_process_group(monkeypatch, tmp_path):
    from ImbalanceSegSlicer import jobs
    started = []
    monkeypatch.setattr(subprocess, "Popen", lambda cmd, **kw: started.append((cmd, kw)) or "proc")
    with monkeypatch.context() as m:
        m.setattr(os, "name", "nt")
        assert jobs._launch(["PythonSlicer.exe", "-m", "x"], tmp_path, threads=2) == "proc"
    cmd, kw = started[0]
    assert kw["creationflags"] == 0x00000200 | 0x08000000  # CREATE_NEW_PROCESS_GROUP | CREATE_NO_WINDOW
    assert "start_new_session" not in kw and kw["env"]["OMP_NUM_THREADS"] == "2"
    # POSIX unchanged: a new session (process group), no Windows flags
    jobs._launch(["python", "-m", "x"], tmp_path, threads=None)
    assert started[1][1]["start_new_session"] is True and "creationflags" not in started[1][1]


def test_windows_cancel_kills_the_whole_process_tree(monkeypatch):
    """Regression (#17): on Windows, Cancel must take the Python child of the PythonSlicer launcher
    too: ``taskkill /F /T`` on the launcher's pid, run without a console window."""
    from ImbalanceSegSlicer import jobs
    child, ran = _FakeWindowsChild(), []

    def run(cmd, **kw):
        ran.append((cmd, kw))
        child.returncode = 1  # the tree is gone
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(subprocess, "run", run)
    monkeypatch.setattr(os, "killpg", _no_posix_kill)
    job = jobs._ProcessJob(python="PythonSlicer.exe", threads=None)
    job.state, job._proc = RUNNING, child
    with monkeypatch.context() as m:
        m.setattr(os, "name", "nt")
        assert job.cancel(timeout=3.0) == CANCELLED
    assert [cmd for cmd, _ in ran] == [["taskkill", "/F", "/T", "/PID", "4242"]]
    assert ran[0][1]["creationflags"] == 0x08000000 and ran[0][1]["check"] is False  # CREATE_NO_WINDOW
    assert ("kill",) not in child.calls and ("terminate",) not in child.calls  # taskkill did it
    assert ("wait", 3.0) in child.calls  # reaped


@pytest.mark.parametrize("failure", ["missing", "denied"])
def test_windows_cancel_falls_back_to_killing_the_launcher(monkeypatch, failure):
    from ImbalanceSegSlicer import jobs
    child, ran = _FakeWindowsChild(pid=77), []

    def run(cmd, **kw):
        ran.append(cmd)
        if failure == "missing":
            raise FileNotFoundError("taskkill")
        return subprocess.CompletedProcess(cmd, 1)  # e.g. access denied: the child still runs

    monkeypatch.setattr(subprocess, "run", run)
    monkeypatch.setattr(os, "killpg", _no_posix_kill)
    with monkeypatch.context() as m:
        m.setattr(os, "name", "nt")
        jobs._stop(child, 2.0)
    assert ran == [["taskkill", "/F", "/T", "/PID", "77"]]
    assert child.calls == [("kill",), ("wait", 2.0)] and child.returncode == 1


def test_the_panels_stability_check_runs_in_the_background_job(scene, synthetic, model_file):
    """The panel's 'Check stability' box: SegmentationJob(agreement="default") gives the agreement,
    states and table column of the in-process Logic call with the same views."""
    from imbalanceseglib.tta import AGREEMENT_VIEWS
    volume = sc.volume_node_from_sitk(scene, synthetic["image"], "Input")
    logic = ImbalanceSegLogic(scene)
    result = SegmentationJob(logic, volume, model_file, threads=1, agreement="default").start().wait(timeout=300)
    in_process = logic.process(volume, model_file, baseName="again", agreement=AGREEMENT_VIEWS)
    plain = logic.process(volume, model_file, baseName="plain")
    assert [r["Agreement"] for r in plain.performanceRows] == [None, None]
    got, want = [r["Agreement"] for r in result.performanceRows], [r["Agreement"] for r in in_process.performanceRows]
    assert all(a is not None for a in want) and got == pytest.approx(want, abs=1e-4)
    assert [r["State"] for r in result.performanceRows] == [r["State"] for r in in_process.performanceRows]
    table = result.performanceTableNode.GetTable()
    names = [table.GetColumn(i).GetName() for i in range(table.GetNumberOfColumns())]
    col = table.GetColumnByName("Agreement")
    assert "Agreement" in names and col.GetValue(0) == pytest.approx(got[0], abs=1e-6)


def test_a_members_check_on_a_single_network_is_refused_before_starting(scene, synthetic, model_file):
    volume = sc.volume_node_from_sitk(scene, synthetic["image"], "Input")
    before = _node_ids(scene)
    job = SegmentationJob(ImbalanceSegLogic(scene), volume, model_file, threads=1, agreement="members")
    with pytest.raises(ValueError, match="has one network .* 'members' stability check needs a semi-supervised"):
        job.start()
    with pytest.raises(ValueError, match="--agreement 'sideways'"):
        SegmentationJob(ImbalanceSegLogic(scene), volume, model_file, threads=1, agreement="sideways").start()
    assert job.pid is None and _node_ids(scene) == before
