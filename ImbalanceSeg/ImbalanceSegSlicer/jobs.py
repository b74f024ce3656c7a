"""Segmentation in a background process, so Slicer's GUI never freezes (Qt-free).

:class:`SegmentationJob` copies the input volume to a temporary file, starts
:mod:`ImbalanceSegSlicer.worker` in a separate Python process and reads its progress lines.
The scene is only touched once, at the end, when :meth:`SegmentationJob.poll` sees the
worker finish and adds the result nodes through the Logic (which removes them again if that
fails). Cancel or a failure leaves the scene exactly as it was. The widget calls ``poll`` from
a Qt timer; scripts and tests call :meth:`SegmentationJob.wait`.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, List, Optional

import numpy as np

CREATED, RUNNING, DONE, FAILED, CANCELLED = "created", "running", "done", "failed", "cancelled"

_MODULE_DIR = Path(__file__).resolve().parent.parent


def python_executable() -> str:
    """Slicer's ``PythonSlicer`` inside the application (it sets up Slicer's Python environment),
    else the running interpreter."""
    exe = Path(sys.executable)
    for name in ("PythonSlicer", "PythonSlicer.exe"):
        for folder in (exe.parent, exe.parent.parent / "bin"):
            if (folder / name).is_file():
                return str(folder / name)
    found = shutil.which("PythonSlicer")
    if found and "Slicer" in exe.as_posix():
        return found
    return sys.executable


def _library_paths() -> List[str]:
    paths = [str(_MODULE_DIR)]
    src = _MODULE_DIR.parent / "ImbalanceSegLib" / "src"
    if src.is_dir():
        paths.append(str(src))
    return paths


class JobError(RuntimeError):
    """The background segmentation failed; the message says why (the worker's own error)."""


class SegmentationJob:
    """One segmentation run in a background process.

    ``poll()`` returns the state (``running``, ``done``, ``failed``, ``cancelled``) and updates
    ``stage``/``fraction`` (named progress steps: load model, preprocess, network, estimate,
    postprocess, write, results). After ``done``, ``result`` is the Logic's
    :class:`SegmentationResult`; after ``failed``, ``error`` says what went wrong.
    """

    def __init__(self, logic, inputVolumeNode, modelPath, referenceSegmentationNode=None, device: str = "cpu",
                 flagThreshold: float = 0.7, baseName: Optional[str] = None, modality: Optional[str] = None,
                 python: Optional[str] = None, threads: Optional[int] = None):
        self.logic = logic
        self.inputVolumeNode = inputVolumeNode
        self.modelPath = Path(modelPath)
        self.referenceSegmentationNode = referenceSegmentationNode
        self.device = device
        self.flagThreshold = flagThreshold
        self.baseName = baseName
        self.modality = modality
        self.python = python or python_executable()
        self.threads = threads
        self.state = CREATED
        self.stage, self.fraction = "", 0.0
        self.error: Optional[str] = None
        self.result = None
        self.log: List[str] = []
        self.stages: List[str] = []  # progress steps in the order the worker reported them
        self._proc: Optional[subprocess.Popen] = None
        self._events: "queue.Queue[Optional[dict]]" = queue.Queue()
        self._tmp: Optional[Path] = None
        self._input_id = None
        self._done_event: Optional[dict] = None
        self._stderr: List[str] = []
        self._eof = False

    # -- lifecycle ----------------------------------------------------------------
    def start(self) -> "SegmentationJob":
        import SimpleITK as sitk

        from ImbalanceSegSlicer import scene as sc
        if self.state != CREATED:
            raise RuntimeError("a job can be started once")
        self.logic.checkInputs(self.inputVolumeNode, self.flagThreshold)
        if not self.modelPath.is_file():
            raise FileNotFoundError(f"model file {self.modelPath} does not exist")
        if self.referenceSegmentationNode is not None and \
                not self.referenceSegmentationNode.IsA("vtkMRMLSegmentationNode"):
            raise ValueError("the reference must be a segmentation")
        self._input_id = self.inputVolumeNode.GetID()
        self._tmp = Path(tempfile.mkdtemp(prefix="imbalanceseg-job-"))
        try:
            image = sc.sitk_from_volume_node(self.inputVolumeNode)
            sitk.WriteImage(image, str(self._tmp / "input.nrrd"), useCompression=False)
            cmd = [self.python, "-u", "-m", "ImbalanceSegSlicer.worker", "--input", str(self._tmp / "input.nrrd"),
                   "--model", str(self.modelPath), "--output", str(self._tmp / "out"), "--device", self.device]
            if self.modality:
                cmd += ["--modality", self.modality]
            env = dict(os.environ)
            env["PYTHONPATH"] = os.pathsep.join(_library_paths() + ([env["PYTHONPATH"]] if env.get("PYTHONPATH")
                                                                    else []))
            if self.threads:
                env["OMP_NUM_THREADS"] = str(self.threads)
            popen_kw = {"start_new_session": True} if os.name == "posix" else {
                "creationflags": getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0)}
            self._proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True,
                                          cwd=str(self._tmp), **popen_kw)
        except BaseException:
            shutil.rmtree(self._tmp, ignore_errors=True)
            raise
        threading.Thread(target=self._read_stdout, daemon=True).start()
        threading.Thread(target=self._read_stderr, daemon=True).start()
        self.state = RUNNING
        self.stage = "starting"
        return self

    def _read_stdout(self) -> None:
        for line in self._proc.stdout:
            line = line.strip()
            if not line:
                continue
            try:
                self._events.put(json.loads(line))
            except ValueError:
                self.log.append(line)
        self._events.put(None)

    def _read_stderr(self) -> None:
        for line in self._proc.stderr:
            self._stderr.append(line.rstrip())
            del self._stderr[:-200]

    def poll(self) -> str:
        """Read the worker's progress; when it has finished, add the results to the scene."""
        if self.state != RUNNING:
            return self.state
        while True:
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                break
            if event is None:
                self._eof = True
                continue
            kind = event.get("event")
            if kind == "progress":
                self.stage, self.fraction = str(event.get("stage", "")), float(event.get("fraction", 0.0))
                if not self.stages or self.stages[-1] != self.stage:
                    self.stages.append(self.stage)
            elif kind == "done":
                self._done_event = event
            elif kind == "error":
                self.error = f"{event.get('type', 'Error')}: {event.get('message', '')}"
        if self._proc.poll() is None or not self._eof:
            return self.state
        return self._finish()

    def _finish(self) -> str:
        rc = self._proc.returncode
        try:
            if rc != 0 or self._done_event is None:
                if self.error is None:
                    tail = "\n".join(self._stderr[-5:])
                    self.error = f"the segmentation process stopped (exit code {rc})" + (f":\n{tail}" if tail else "")
                self.state = FAILED
                return self.state
            try:
                self.stage, self.fraction = "results", 0.0
                self.stages.append("results")
                self.result = self._add_results()
                self.stage, self.fraction = "results", 1.0
                self.state = DONE
            except Exception as exc:
                self.error = f"{type(exc).__name__}: {exc}"
                self.state = FAILED
            return self.state
        finally:
            self._cleanup()

    def _add_results(self):
        from imbalanceseglib.inference import Prediction
        from imbalanceseglib.performance import CaseEstimate

        from ImbalanceSegSlicer import scene as sc
        node = self.logic.scene.GetNodeByID(self._input_id)
        if node is None or node is not self.inputVolumeNode:
            raise ValueError("the input volume was removed from the scene while it was being segmented; "
                             "nothing was added")
        out = self._tmp / "out"
        summary = json.loads((out / "result.json").read_text())
        probs = np.load(out / "probabilities.npy", allow_pickle=False)
        uncertainty = np.load(out / "uncertainty.npy", allow_pickle=False)
        reference = sc.sitk_from_volume_node(self.inputVolumeNode)
        if probs.shape[1:] != tuple(reversed(reference.GetSize())):
            raise ValueError("the input volume changed size while it was being segmented; nothing was added")
        perf = summary["performance"]
        prediction = Prediction(probabilities=probs, labels=np.argmax(probs, axis=0).astype(np.uint8),
                                uncertainty=uncertainty, reference=reference, class_names=summary["class_names"],
                                timings=summary["timings"],
                                performance=CaseEstimate(summary["class_names"], perf["classes"], perf["method"],
                                                         perf["class_specific"]),
                                estimator=SimpleNamespace(**summary["estimator"]))
        timings = {f"inference.{k}": v for k, v in summary["timings"].items()}
        return self.logic.createResultNodes(self.inputVolumeNode, prediction, summary["classes"],
                                            self.referenceSegmentationNode, baseName=self.baseName,
                                            flagThreshold=self.flagThreshold, timings=timings)

    def cancel(self, timeout: float = 5.0) -> str:
        """Stop the worker; the scene stays as it was. Returns the final state."""
        if self.state != RUNNING:
            return self.state
        proc = self._proc
        if proc.poll() is None:
            try:
                if os.name == "posix":
                    os.killpg(proc.pid, signal.SIGTERM)
                else:
                    proc.terminate()
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                if os.name == "posix":
                    os.killpg(proc.pid, signal.SIGKILL)
                else:
                    proc.kill()
                proc.wait(timeout)
            except ProcessLookupError:
                pass
        self.state = CANCELLED
        self.error = "cancelled by the user"
        self._cleanup()
        return self.state

    def wait(self, timeout: Optional[float] = None, interval: float = 0.1,
             progress: Optional[Callable[[str, float], None]] = None):
        """Poll until the job ends; returns the result, raises :class:`JobError` on failure or cancel."""
        t0 = time.monotonic()
        while self.poll() == RUNNING:
            if progress:
                progress(self.stage, self.fraction)
            if timeout is not None and time.monotonic() - t0 > timeout:
                self.cancel()
                raise JobError(f"segmentation took longer than {timeout:g} s and was cancelled")
            time.sleep(interval)
        if self.state != DONE:
            raise JobError(self.error or self.state)
        return self.result

    def _cleanup(self) -> None:
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    @property
    def pid(self) -> Optional[int]:
        return self._proc.pid if self._proc is not None else None

    def __del__(self):
        try:
            if self.state == RUNNING:
                self.cancel(timeout=1.0)
        except Exception:
            pass
