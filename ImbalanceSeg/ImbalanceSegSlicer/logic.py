"""The module's Logic: everything the ImbalanceSeg panel does, as plain Python calls (Qt-free).

The Logic takes the MRML scene it works on, so the same code runs inside 3D Slicer and in plain
Python on the ``slicer-core`` wheel (tests, the demo, batch scripts). It imports neither Qt nor
torch at module level: listing models and reading model cards work before the deep-learning
packages are installed (the panel must open right after an Extension Manager install).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import slicer
from imbalanceseglib.estimation import REVIEW_THRESHOLD, review_flag  # torch-free

from .paths import DEFAULT_BUNDLED_MODEL, bundled_models_dir
from .tables import (ESTIMATOR_ROWS_ATTRIBUTE, FINDINGS_ATTRIBUTE, PERFORMANCE_COLUMNS, PERFORMANCE_KEYS, ROW_KEYS,
                     TABLE_COLUMNS)

try:  # Inside the 3D Slicer application.
    from slicer.ScriptedLoadableModule import ScriptedLoadableModuleLogic
    IN_SLICER_APP = hasattr(slicer, "app")
except ImportError:  # Plain Python with slicer-core: no application.
    IN_SLICER_APP = False

    class ScriptedLoadableModuleLogic:  # type: ignore[no-redef]  # stand-in so the Logic imports
        def __init__(self, parent=None):
            pass

ProgressCallback = Callable[[str, float], None]


@dataclass
class SegmentationResult:
    """Nodes and numbers produced by one run of :meth:`ImbalanceSegLogic.process`."""

    segmentationNode: Any
    probabilityNodes: List[Any]
    uncertaintyNode: Any
    tableNode: Any
    rows: List[Dict[str, Any]]
    classNames: List[str]
    timings: Dict[str, float] = field(default_factory=dict)
    performanceTableNode: Any = None
    performanceRows: List[Dict[str, Any]] = field(default_factory=list)
    calibration: str = ""
    # How the input differs from the model's training data ({kind, message, short, classes,
    # severity}; imbalanceseglib.input_checks): warnings make the classes they name "unreliable".
    findings: List[Dict[str, Any]] = field(default_factory=list)

    def nodes(self) -> List[Any]:
        return [self.segmentationNode, *self.probabilityNodes, self.uncertaintyNode, self.tableNode,
                *([self.performanceTableNode] if self.performanceTableNode is not None else [])]


class ImbalanceSegLogic(ScriptedLoadableModuleLogic):
    """Runs a model bundle on a volume node and creates result nodes in ``scene``.

    The user's nodes are only read. Every result is a new node; if anything
    fails, the nodes created so far are removed again, so the scene is exactly
    as before.
    """

    def __init__(self, scene=None):
        ScriptedLoadableModuleLogic.__init__(self)
        if scene is None:
            if not IN_SLICER_APP:
                raise ValueError("ImbalanceSegLogic needs a scene outside the Slicer application")
            scene = slicer.mrmlScene
        self.scene = scene
        self._bundles: Dict[Any, Any] = {}

    # -- models -----------------------------------------------------------------

    @staticmethod
    def availableModels(extraFolders: Sequence[os.PathLike] = ()) -> List[Path]:
        from imbalanceseglib.container import BUNDLE_SUFFIX
        models: List[Path] = []
        for folder in (bundled_models_dir(), *map(Path, extraFolders)):
            if folder.is_dir():  # the default bundled model first, then by name
                models.extend(sorted(folder.glob(f"*{BUNDLE_SUFFIX}"),
                                     key=lambda p: (p.name != DEFAULT_BUNDLED_MODEL, p.name)))
        return models

    def loadModel(self, path: os.PathLike):
        """Load (and cache) a bundle; raises BundleError with a clear message."""
        from imbalanceseglib.bundle import load_bundle
        path = Path(path)
        key = (str(path.resolve()), path.stat().st_mtime_ns if path.exists() else None)
        if key not in self._bundles:
            self._bundles[key] = load_bundle(path)
        return self._bundles[key]

    @staticmethod
    def modelCard(path: os.PathLike) -> Dict[str, Any]:
        """The model card of a bundle, read without loading the weights (validated)."""
        from imbalanceseglib.container import read_card
        return read_card(path)

    @staticmethod
    def availableDevices() -> List[str]:
        """Devices the network can run on here: always "cpu", plus "cuda" when an installed torch
        sees a GPU. Without torch (before the first install) only "cpu"; torch is not imported
        when it is not installed."""
        import importlib.util
        devices = ["cpu"]
        if importlib.util.find_spec("torch") is not None:
            try:
                import torch
                if torch.cuda.is_available():
                    devices.append("cuda")
            except Exception:  # a broken torch install: the dependency check reports it
                pass
        return devices

    @classmethod
    def panelChoices(cls, modelFolders: Sequence[os.PathLike] = ()) -> Dict[str, List[Any]]:
        """What the panel's selectors offer: models (bundled + ``modelFolders``), devices and
        training methods. Needs neither torch, MONAI nor safetensors."""
        return {"models": cls.availableModels(modelFolders), "devices": cls.availableDevices(),
                "methods": cls.trainingMethods()}

    @classmethod
    def modelDescriptionHtml(cls, path: Optional[os.PathLike]) -> str:
        """The panel's model card text: the card as HTML, or why the model cannot be used."""
        if not path:
            return "No model found: add a model folder."
        try:
            return cls.modelSummaryHtml(cls.modelCard(path))
        except Exception as exc:  # a damaged file: say so, keep the panel usable
            import html
            return f"This model cannot be used: {html.escape(str(exc))}"

    @staticmethod
    def modelSummaryHtml(card: Dict[str, Any]) -> str:
        """The model card as HTML for the module panel: classes with colours and validation results,
        expected modality and spacing, training method and calibration."""
        import html
        esc = html.escape
        pre = card.get("preprocessing", {})
        val = card.get("validation", {}).get("per_class", {})
        training = card.get("training", {})
        cal = card.get("calibration") or {}
        parts = [f"<b>{esc(card['name'])}</b>"]
        if card.get("description"):
            parts.append(f"<br>{esc(str(card['description']))}")
        spacing = pre.get("target_spacing")
        parts.append(f"<br>Expected input: {esc(str(pre.get('modality') or 'any modality'))}, "
                     f"resampled to {' x '.join(f'{v:g}' for v in spacing) + ' mm' if spacing else 'its own spacing'}")
        if training.get("method"):
            parts.append(f"<br>Trained with: {esc(str(training['method']))}"
                         + (f" on {training['train_cases']} cases" if training.get("train_cases") else ""))
        if cal.get("method") and cal.get("method") != "none":
            fitted = cal.get("fitted_on", {})
            parts.append(f"<br>Calibration: {esc(cal['method'].upper())} "
                         f"({'class-specific' if cal.get('class_specific') else 'global'})"
                         + (f", fitted on {fitted['cases']} cases" if fitted.get("cases") else ""))
        else:
            parts.append("<br>Calibration: none (confidence maps are plain softmax probabilities)")
        n_val = card.get("validation", {}).get("cases")
        parts.append("<table cellspacing='4'><tr><th></th><th align='left'>Class</th>"
                     f"<th>Val. Dice{f' ({n_val} cases)' if n_val else ''}</th><th>Sensitivity</th></tr>")
        for c in card["classes"][1:]:
            rgb = [float(v) for v in c.get("color", [0.5, 0.5, 0.5])][:3]
            if all(v <= 1.0 for v in rgb):
                rgb = [v * 255 for v in rgb]
            colour = "#%02x%02x%02x" % tuple(int(round(v)) for v in rgb)
            v = val.get(c["name"], {})

            def cell(x):
                return "-" if x is None else f"{x:.3f}"
            parts.append(f"<tr><td bgcolor='{colour}'>&nbsp;&nbsp;&nbsp;</td><td>{esc(c['name'])}</td>"
                         f"<td align='right'>{cell(v.get('dice'))}</td><td align='right'>{cell(v.get('sensitivity'))}"
                         "</td></tr>")
        parts.append("</table>")
        return "".join(parts)

    def probabilityNodeForClass(self, segmentationNode, className: str):
        """The confidence map (calibrated probability) node of one class of a result."""
        from ImbalanceSegSlicer import review
        return review.probability_nodes(segmentationNode)[review.class_index(segmentationNode, className)]

    def uncertaintyNodeOf(self, segmentationNode):
        from ImbalanceSegSlicer import review
        review.result_classes(segmentationNode)
        node = segmentationNode.GetNodeReference(review.UNCERTAINTY_REF)
        if node is None:
            raise ValueError("the uncertainty map of this result was removed from the scene")
        return node

    def performanceTableOf(self, segmentationNode):
        from ImbalanceSegSlicer import review
        review.result_classes(segmentationNode)
        return segmentationNode.GetNodeReference(review.PERFORMANCE_REF)

    def flaggedClasses(self, segmentationNode) -> List[str]:
        """Classes whose performance row is flagged for review, in table order."""
        table = self.performanceTableOf(segmentationNode)
        if table is None:
            return []
        t = table.GetTable()
        return [t.GetValueByName(r, "Segment").ToString() for r in range(t.GetNumberOfRows())
                if t.GetValueByName(r, "Flag").ToString() == "review"]

    # -- processing -------------------------------------------------------------

    def checkInputs(self, inputVolumeNode, flagThreshold: float = REVIEW_THRESHOLD) -> None:
        """Refuse bad inputs before any work, with a message naming the problem."""
        if isinstance(flagThreshold, bool) or not isinstance(flagThreshold, (int, float)) \
                or not 0.0 <= float(flagThreshold) <= 1.0:
            raise ValueError(f"flagThreshold must be a number between 0 and 1 (an estimated Dice), "
                             f"got {flagThreshold!r}")
        if inputVolumeNode is None or not inputVolumeNode.IsA("vtkMRMLScalarVolumeNode"):
            raise ValueError("select a scalar input volume")
        if inputVolumeNode.GetScene() is not self.scene:
            raise ValueError("the input volume is not in this logic's scene")
        if inputVolumeNode.GetImageData() is None:
            raise ValueError(f"input volume {inputVolumeNode.GetName()!r} has no image data")

    def process(self, inputVolumeNode, model, referenceSegmentationNode=None, device: str = "cpu",
                progress: Optional[ProgressCallback] = None, baseName: Optional[str] = None,
                modality: Optional[str] = None, flagThreshold: float = REVIEW_THRESHOLD,
                agreement: Optional[Sequence[str]] = None) -> SegmentationResult:
        """Segment ``inputVolumeNode`` with ``model`` (a path or a loaded bundle), in this process.

        ``modality`` (e.g. "CT", "MR"), when known, must match the model card's.
        ``agreement``: views to check the segmentation's stability under (e.g.
        ``imbalanceseglib.tta.AGREEMENT_VIEWS``, or ``["members"]`` for a two-network model;
        :func:`imbalanceseglib.inference.agreement_check`): unstable classes become unreliable.
        ``flagThreshold``: classes whose estimated Dice falls below it are flagged for review
        in the performance table. (:class:`ImbalanceSegSlicer.jobs.SegmentationJob` runs the
        same work in a background process.)
        """
        from imbalanceseglib.inference import check_model_fits, predict
        from ImbalanceSegSlicer import scene as sc

        progress = progress or (lambda stage, frac: None)
        self.checkInputs(inputVolumeNode, flagThreshold)
        self.checkReference(inputVolumeNode, referenceSegmentationNode)
        bundle = model if hasattr(model, "network") else self.loadModel(model)
        self.checkReference(inputVolumeNode, referenceSegmentationNode, bundle.class_names)
        check_model_fits(bundle, modality=modality)
        self.checkMemory(inputVolumeNode, bundle)
        t = time.perf_counter()
        image = sc.sitk_from_volume_node(inputVolumeNode)
        prediction = predict(image, bundle, device=device, progress=progress, agreement=agreement)
        timings = {f"inference.{k}": v for k, v in prediction.timings.items()}
        timings["inference"] = time.perf_counter() - t
        return self.createResultNodes(inputVolumeNode, prediction, bundle.classes, referenceSegmentationNode,
                                      progress=progress, baseName=baseName, flagThreshold=flagThreshold,
                                      timings=timings)

    @staticmethod
    def estimateMemoryBytes(inputVolumeNode, bundle, sw_batch_size: int = 2) -> int:
        """Peak memory of :meth:`process`: the prediction
        (:func:`imbalanceseglib.inference.estimate_memory_bytes`, network activations included)
        while the result nodes are made from it: a float32 volume per class and for the
        uncertainty, the segmentation's labelmap, and one float32 copy while a node is filled."""
        from imbalanceseglib.inference import card_memory_bytes
        card = bundle.model_card
        dims = inputVolumeNode.GetImageData().GetDimensions()
        n_in = float(np.prod(dims, dtype=np.float64))
        predict_bytes = card_memory_bytes(card, dims, inputVolumeNode.GetSpacing(), sw_batch_size)
        return int(predict_bytes + n_in * (4 * (card.num_classes + 1) + 1 + 4))

    def checkMemory(self, inputVolumeNode, bundle) -> None:
        """Refuse, before any work, a volume whose segmentation and result nodes would not fit in
        the memory the system reports as available, naming both figures."""
        from imbalanceseglib.images import available_memory_bytes, format_bytes
        need, have = self.estimateMemoryBytes(inputVolumeNode, bundle), available_memory_bytes()
        if have is not None and need > have:
            dims = "x".join(map(str, inputVolumeNode.GetImageData().GetDimensions()))
            raise ValueError(f"segmenting {inputVolumeNode.GetName()!r} ({dims} voxels) and adding its results to "
                             f"the scene needs about {format_bytes(need)}, but only {format_bytes(have)} is "
                             "available; crop or resample the volume first (or close other applications)")

    def createResultNodes(self, inputVolumeNode, prediction, classes: Sequence[Dict[str, Any]],
                          referenceSegmentationNode=None, progress: Optional[ProgressCallback] = None,
                          baseName: Optional[str] = None, flagThreshold: float = REVIEW_THRESHOLD,
                          timings: Optional[Dict[str, float]] = None) -> SegmentationResult:
        """Add the result nodes of a prediction (on the input volume's grid) to the scene, in a
        subject hierarchy folder beside the input. On any failure every node created here is
        removed again."""
        from ImbalanceSegSlicer import review
        from ImbalanceSegSlicer import scene as sc

        progress = progress or (lambda stage, frac: None)
        self.checkInputs(inputVolumeNode, flagThreshold)
        sc.ensure_scene_logic(self.scene)
        timings = dict(timings or {})
        base = baseName or inputVolumeNode.GetName()
        created: List[Any] = []
        folder = 0
        try:
            t = time.perf_counter()
            progress("results", 0.0)
            seg_labels, seg_classes = self.labelValueSegments(prediction.label_image(), classes)
            seg_node = sc.segmentation_from_labelmap(self.scene, seg_labels, inputVolumeNode, seg_classes,
                                                     f"{base} segmentation")
            created.append(seg_node)
            prob_nodes = []
            for i, cls in enumerate(classes):
                node = sc.add_probability_volume(self.scene, prediction.probability_image(i),
                                                 f"{base} probability {cls['name']}", colormap="Inferno")
                created.append(node)
                prob_nodes.append(node)
            unc_node = sc.add_probability_volume(self.scene, prediction.uncertainty_image(),
                                                 f"{base} uncertainty", colormap="Viridis")
            created.append(unc_node)
            reference = None
            if referenceSegmentationNode is not None:
                from ImbalanceSegSlicer.reference import reference_label_array
                reference = reference_label_array(self.scene, referenceSegmentationNode, inputVolumeNode,
                                                  [c["name"] for c in classes])
            rows = self.classRows(prediction, prediction.reference.GetSpacing(), reference)
            table = sc.table_node_from_rows(self.scene, f"{base} class table", TABLE_COLUMNS,
                                            [[r[k] for k in ROW_KEYS] for r in rows])
            created.append(table)
            perf_rows = self.performanceRows(prediction, float(flagThreshold))
            calibration = self.calibrationDescription(prediction)
            perf_table = sc.table_node_from_rows(self.scene, f"{base} performance estimate", PERFORMANCE_COLUMNS,
                                                 [[r[k] for k in PERFORMANCE_KEYS] for r in perf_rows])
            perf_table.SetAttribute("ImbalanceSeg.Calibration", calibration)
            perf_table.SetAttribute("ImbalanceSeg.FlagThreshold", f"{float(flagThreshold):g}")
            perf_table.SetAttribute(ESTIMATOR_ROWS_ATTRIBUTE, json.dumps(perf_rows))
            findings = [{"kind": f.kind, "message": f.message, "short": f.short,
                         "classes": None if f.classes is None else list(f.classes), "severity": f.severity}
                        for f in getattr(prediction, "findings", [])]
            perf_table.SetAttribute(FINDINGS_ATTRIBUTE, json.dumps(findings))
            created.append(perf_table)
            review.link_result_nodes(seg_node, inputVolumeNode, prob_nodes, unc_node, perf_table, table, classes)
            self.followInputTransform(inputVolumeNode, [seg_node, *prob_nodes, unc_node])
            folder = sc.place_in_subject_hierarchy(self.scene, inputVolumeNode, created, f"{base} ImbalanceSeg")
            timings["results"] = time.perf_counter() - t
            progress("results", 1.0)
        except BaseException:
            for node in reversed(created):
                sc.remove_node_with_dependents(self.scene, node)
            if folder:
                sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(self.scene)
                sh.RemoveItem(folder, False, True)
            raise
        return SegmentationResult(seg_node, prob_nodes, unc_node, table, rows,
                                  [c["name"] for c in classes], timings, perf_table, perf_rows, calibration, findings)

    @staticmethod
    def labelValueSegments(labelImage, classes: Sequence[Dict[str, Any]]):
        """(label map, foreground classes) for the result segmentation: each segment keeps the label
        value the model's training data used (``label_value`` in the card: 0, 2, 5, ...), so a label
        map exported from it in Slicer has the user's values, as ``imbalanceseg predict`` writes them.
        A model trained on 0, 1, 2, ... keeps the class indices."""
        import SimpleITK as sitk
        from imbalanceseglib.datasets import card_label_values, indices_to_label_values

        values = card_label_values(classes)
        if values == list(range(len(classes))):
            return labelImage, list(classes[1:])
        mapped = sitk.GetImageFromArray(indices_to_label_values(sitk.GetArrayViewFromImage(labelImage), values))
        mapped.CopyInformation(labelImage)
        return mapped, [{**c, "value": v} for c, v in zip(classes[1:], values[1:])]

    @staticmethod
    def followInputTransform(inputVolumeNode, nodes: Sequence[Any]) -> None:
        """Put result nodes under the input's parent transform (linear or not), so they are shown
        where the input is shown: the results are computed on the input's own voxel grid, which the
        transform places in the world."""
        transform = inputVolumeNode.GetParentTransformNode()
        for node in nodes:
            node.SetAndObserveTransformNodeID(transform.GetID() if transform is not None else None)

    def checkReference(self, inputVolumeNode, referenceSegmentationNode,
                       classNames: Optional[Sequence[str]] = None) -> List[str]:
        """Refuse, before any work, a reference that cannot be compared with results on the input's
        grid: not a segmentation, under another transform than the input, or (given the model's
        ``classNames``, background first) with no segment named like a class. Returns the classes
        it matched (segments are matched by name, case and underscores ignored)."""
        if referenceSegmentationNode is None:
            return []
        if not referenceSegmentationNode.IsA("vtkMRMLSegmentationNode"):
            raise ValueError(f"the reference {referenceSegmentationNode.GetName()!r} is a "
                             f"{referenceSegmentationNode.GetClassName()}, not a segmentation; convert it in the "
                             "Segmentations module (or choose a segmentation)")
        from ImbalanceSegSlicer.reference import check_same_transform, matching_classes
        check_same_transform(referenceSegmentationNode, inputVolumeNode)
        if classNames is None:
            return []
        matched, segments = matching_classes(referenceSegmentationNode, classNames)
        if not matched:
            raise ValueError(f"no segment of the reference {referenceSegmentationNode.GetName()!r} "
                             f"({', '.join(repr(n) for n in segments) or 'no segments'}) is named like a class of "
                             f"the model ({', '.join(classNames[1:])}); rename the segments to compare")
        return matched

    # -- training -----------------------------------------------------------------

    def trainingCasesFromScene(self, config, pairs: Sequence[Tuple[Any, Any]], unlabeledVolumeNodes: Sequence[Any] = ()):
        """Library training cases from scene nodes: ``pairs`` of (volume node, segmentation node)
        and, for semi-supervised methods, unlabelled volume nodes.

        Segments are matched to the config's classes by name (case and underscores ignored), as in
        the reference comparison; a segmentation that names none of the classes is refused. Nodes are
        only read. Returns (labelled cases, unlabelled cases)."""
        import SimpleITK as sitk
        from imbalanceseglib.training_data import prepare_case, prepare_unlabeled_case
        from ImbalanceSegSlicer import scene as sc
        from ImbalanceSegSlicer.reference import reference_label_array
        names = [c["name"] for c in config.classes]
        labelled, unlabelled = [], []
        for volume, segmentation in pairs:
            if volume is None or segmentation is None:
                raise ValueError("each training pair needs a volume and a segmentation")
            if volume.GetImageData() is None:
                raise ValueError(f"training volume {volume.GetName()!r} has no image data")
            image = sc.sitk_from_volume_node(volume)
            labels, matched = reference_label_array(self.scene, segmentation, volume, names)
            if not matched:
                raise ValueError(f"segmentation {segmentation.GetName()!r} has no segment named like a class of the "
                                 f"model ({', '.join(names[1:])})")
            lab_img = sitk.GetImageFromArray(labels)
            lab_img.CopyInformation(image)
            labelled.append(prepare_case(image, lab_img, config, volume.GetName()))
        for volume in unlabeledVolumeNodes:
            if volume is None or volume.GetImageData() is None:
                raise ValueError("an unlabelled volume has no image data")
            unlabelled.append(prepare_unlabeled_case(sc.sitk_from_volume_node(volume), config, volume.GetName()))
        return labelled, unlabelled

    def trainFromScene(self, config, pairs, outputFolder: os.PathLike, unlabeledVolumeNodes: Sequence[Any] = (),
                       validationPairs: Sequence[Tuple[Any, Any]] = (), log=print, resume: bool = True) -> Path:
        """Train a model (supervised or semi-supervised, by ``config.method``) on scene nodes; returns
        the bundle path. The scene is not changed."""
        from imbalanceseglib.training import train
        cases, unlabelled = self.trainingCasesFromScene(config, pairs, unlabeledVolumeNodes)
        val, _ = self.trainingCasesFromScene(config, validationPairs) if validationPairs else ([], [])
        return train(config, cases, val, Path(outputFolder), resume=resume, log=log,
                     unlabeled_cases=unlabelled or None)

    # -- review -------------------------------------------------------------------

    def resultClassNames(self, segmentationNode) -> List[str]:
        """Foreground class names of a result segmentation (raises for other segmentations)."""
        from ImbalanceSegSlicer import review
        return [c["name"] for c in review.result_classes(segmentationNode)[1:]]

    def leastConfidentRegions(self, segmentationNode, className: str, count: int = 3,
                              radiusMm: float = 6.0) -> List[Dict[str, Any]]:
        """Regions where the model is least sure about ``className``, most doubtful first
        (see :func:`ImbalanceSegSlicer.review.review_regions`); each has its centre in RAS."""
        from ImbalanceSegSlicer import review
        c = review.class_index(segmentationNode, className)
        node = review.probability_nodes(segmentationNode)[c]
        regions = review.review_regions(review.node_array(node), tuple(reversed(node.GetSpacing())),
                                        count=count, radius_mm=radiusMm)
        to_world = self._toWorld(node)
        for r in regions:
            r["ras"] = to_world(review.index_to_ras(node, r["index_zyx"]))
            r["class"] = className
        return regions

    @staticmethod
    def _toWorld(node):
        """A function mapping a point of ``node``'s own RAS frame to the world (through its parent
        transforms, linear or not), as the slice views show it."""
        parent = node.GetParentTransformNode()
        if parent is None:
            return lambda p: [float(v) for v in p]
        import vtk
        transform = vtk.vtkGeneralTransform()
        parent.GetTransformToWorld(transform)
        return lambda p: [float(v) for v in transform.TransformPoint([float(v) for v in p])]

    def inputVolumeOf(self, segmentationNode):
        """The volume a result was computed from (None when it was removed)."""
        from ImbalanceSegSlicer import review
        return segmentationNode.GetNodeReference(review.INPUT_REF) if segmentationNode is not None else None

    def classTableOf(self, segmentationNode):
        from ImbalanceSegSlicer import review
        review.result_classes(segmentationNode)
        return segmentationNode.GetNodeReference(review.CLASS_TABLE_REF)

    def reviewClassChoices(self, segmentationNode) -> List[Tuple[str, str]]:
        """(class name, label) for the Review class list; flagged classes are marked."""
        flagged = set(self.flaggedClasses(segmentationNode))
        return [(name, name + ("  (review)" if name in flagged else ""))
                for name in self.resultClassNames(segmentationNode)]

    def setOverlayOpacity(self, opacity: float) -> None:
        """Foreground (overlay) opacity of every slice view."""
        for i in range(self.scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode")):
            self.scene.GetNthNodeByClass(i, "vtkMRMLSliceCompositeNode").SetForegroundOpacity(float(opacity))

    @staticmethod
    def resultSummary(result, flagged: Sequence[str]) -> str:
        """The status line after a run; warnings and cautions on the input (an input unlike the
        model's training data) come first, each on its own line."""
        total = sum(v for k, v in result.timings.items() if "." not in k)
        said = {"warning": "Warning", "caution": "Caution"}
        warnings = [f"{said[f['severity']]}: {f['message']}." for f in getattr(result, "findings", [])
                    if f["severity"] in said]
        return "\n".join(warnings + [f"Done ({total:.1f} s in the scene). " + (
            f"Review: {', '.join(flagged)}." if flagged else "No class flagged for review.")])

    @staticmethod
    def thresholdSummary(out: Dict[str, Any]) -> str:
        """One line on a threshold change (:meth:`setClassThreshold`'s result)."""
        def fmt(v):
            return "-" if v is None else f"{v:.3f}"
        rule = "argmax" if out["threshold"] is None else f"p >= {out['threshold']:.2f}"
        return (f"{out['class']} ({rule}): {out['voxels']} voxels (was {out['voxels_before']}); "
                f"expected Dice {fmt(out['dice'])}, sensitivity {fmt(out['sensitivity'])}, "
                f"precision {fmt(out['precision'])}")

    @staticmethod
    def regionSummary(region: Dict[str, Any], index: int, count: int) -> str:
        return (f"{region['class']}: region {index + 1} of {count}, doubt {region['score']:.2f}, "
                f"{region['doubtful_voxels']} voxels with 0.2 <= p <= 0.8 "
                f"(mean p {region['mean_probability']:.2f})")

    def jumpToRegion(self, region) -> None:
        """Centre every slice view on a region (or an RAS point)."""
        ras = region["ras"] if isinstance(region, dict) else region
        r, a, s_ = (float(v) for v in ras)
        slicer.vtkMRMLSliceNode.JumpAllSlices(self.scene, r, a, s_, slicer.vtkMRMLSliceNode.CenteredJumpSlice)

    def classThresholds(self, segmentationNode) -> Dict[str, float]:
        from ImbalanceSegSlicer import review
        review.result_classes(segmentationNode)
        return review.get_thresholds(segmentationNode)

    def setClassThreshold(self, segmentationNode, className: str, threshold: Optional[float]) -> Dict[str, Any]:
        """Set (or with ``None`` clear) the probability threshold of one class and update the segments.

        Lower thresholds trade precision for sensitivity. The segments of every class whose voxels
        change are rewritten from the confidence maps; the performance table rows of those classes
        are re-estimated from the calibrated probabilities (restored to the label-free estimator's
        values when a segment is back to its argmax form). Everything is checked before anything
        changes. Returns the class's expected Dice/sensitivity/precision and voxel counts.
        """
        from ImbalanceSegSlicer import review
        classes = review.result_classes(segmentationNode)
        c = review.class_index(segmentationNode, className)
        if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float))
                                      or not 0.0 < float(threshold) < 1.0):
            raise ValueError(f"threshold for {className!r} must be a probability between 0 and 1 (exclusive), "
                             f"or None for argmax; got {threshold!r}")
        probs = review.probabilities_from_nodes(segmentationNode)
        names = [k["name"] for k in classes]
        thresholds = review.get_thresholds(segmentationNode)
        old = review.thresholded_labels(probs, {names.index(k): v for k, v in thresholds.items() if k in names})
        if threshold is None:
            thresholds.pop(className, None)
        else:
            thresholds[className] = float(threshold)
        new = review.thresholded_labels(probs, {names.index(k): v for k, v in thresholds.items() if k in names})
        changed = [k for k in range(1, len(names)) if not np.array_equal(old == k, new == k)]
        reference = segmentationNode.GetNodeReference(review.INPUT_REF)
        review.write_labels(segmentationNode, new, reference or review.probability_nodes(segmentationNode)[0],
                            classes, changed)
        segmentationNode.SetAttribute(review.THRESHOLDS_ATTRIBUTE, json.dumps(thresholds, sort_keys=True))
        self._updatePerformanceRows(segmentationNode, probs, new, thresholds)
        result = review.expected_metrics(probs[c], new == c)
        result.update({"class": className, "threshold": threshold, "changed_classes": [names[k] for k in changed],
                       "voxels_before": int(np.count_nonzero(old == c))})
        return result

    def _updatePerformanceRows(self, segmentationNode, probs, labels, thresholds: Dict[str, float]) -> None:
        from ImbalanceSegSlicer import review
        from ImbalanceSegSlicer import scene as sc
        table = segmentationNode.GetNodeReference(review.PERFORMANCE_REF)
        if table is None or not table.GetAttribute(ESTIMATOR_ROWS_ATTRIBUTE):
            return
        estimator_rows = json.loads(table.GetAttribute(ESTIMATOR_ROWS_ATTRIBUTE))
        flag_threshold = float(table.GetAttribute("ImbalanceSeg.FlagThreshold") or REVIEW_THRESHOLD)
        names = [k["name"] for k in review.result_classes(segmentationNode)]
        argmax = np.argmax(probs, axis=0)
        reference = review.probability_nodes(segmentationNode)[0]
        voxel_ml = float(np.prod(reference.GetSpacing())) / 1000.0
        rows = []
        for est in estimator_rows:
            c = names.index(est["Segment"])
            row = dict(est)
            row["Threshold"] = f"{thresholds[est['Segment']]:g}" if est["Segment"] in thresholds else "argmax"
            mask = labels == c
            if not np.array_equal(mask, argmax == c):
                m = review.expected_metrics(probs[c], mask)
                row.update({"Estimated Dice": m["dice"], "Estimated sensitivity": m["sensitivity"],
                            "Estimated precision": m["precision"], "Volume": m["voxels"] * voxel_ml,
                            "Expected volume": m["expected_voxels"] * voxel_ml,
                            "Mean confidence": m["precision"],
                            "State": "predicted" if m["voxels"] else ("possibly missed" if m["expected_voxels"] >= 0.5
                                                                      else "absent")})
                if str(est["State"]).startswith("unreliable"):  # the input's findings hold at any threshold
                    row["State"] = est["State"]
                row["Flag"] = review_flag(row["State"], row["Estimated Dice"], flag_threshold)
            rows.append(row)
        sc.fill_table_node(table, PERFORMANCE_COLUMNS, [[r.get(k) for k in PERFORMANCE_KEYS] for r in rows])

    def compareWithReference(self, segmentationNode, referenceSegmentationNode) -> List[Dict[str, Any]]:
        """Per-class metrics of the result's current segments (after threshold changes or manual
        edits) against a reference segmentation (segments matched by name); updates the result's
        class table and returns its rows. Nothing else in the scene changes."""
        from ImbalanceSegSlicer import review
        from ImbalanceSegSlicer import scene as sc
        from ImbalanceSegSlicer.reference import reference_label_array
        if referenceSegmentationNode is None or not referenceSegmentationNode.IsA("vtkMRMLSegmentationNode"):
            raise ValueError("select a reference segmentation to compare with")
        if referenceSegmentationNode is segmentationNode:
            raise ValueError("the reference must be another segmentation than the result")
        classes = review.result_classes(segmentationNode)
        names = [k["name"] for k in classes]
        grid = segmentationNode.GetNodeReference(review.INPUT_REF) or review.probability_nodes(segmentationNode)[0]
        probs = review.probabilities_from_nodes(segmentationNode)
        labels, _ = reference_label_array(self.scene, segmentationNode, grid, names)
        reference = reference_label_array(self.scene, referenceSegmentationNode, grid, names)
        if not reference[1]:
            raise ValueError(f"reference {referenceSegmentationNode.GetName()!r} has no segment named like a class "
                             f"of the result ({', '.join(names[1:])})")
        rows = self.classRowsFromArrays(labels, probs, names, tuple(grid.GetSpacing()), reference)
        table = segmentationNode.GetNodeReference(review.CLASS_TABLE_REF)
        if table is None:
            table = sc.table_node_from_rows(self.scene, f"{segmentationNode.GetName()} class table", TABLE_COLUMNS,
                                            [[r[k] for k in ROW_KEYS] for r in rows])
            segmentationNode.SetNodeReferenceID(review.CLASS_TABLE_REF, table.GetID())
        else:
            sc.fill_table_node(table, TABLE_COLUMNS, [[r[k] for k in ROW_KEYS] for r in rows])
        table.SetAttribute("ImbalanceSeg.Reference", referenceSegmentationNode.GetName())
        return rows

    def trainingPairsFromSegmentations(self, segmentationNodes: Sequence[Any]) -> List[Tuple[Any, Any]]:
        """(volume, segmentation) pairs, each segmentation with the volume it was drawn on (its
        reference geometry volume, set by the Segment Editor)."""
        pairs = []
        for seg in segmentationNodes:
            if seg is None or not seg.IsA("vtkMRMLSegmentationNode"):
                raise ValueError("training needs segmentation nodes")
            volume = seg.GetNodeReference(seg.GetReferenceImageGeometryReferenceRole())
            if volume is None or not volume.IsA("vtkMRMLScalarVolumeNode"):
                raise ValueError(f"segmentation {seg.GetName()!r} has no source volume; open it in the Segment "
                                 "Editor with its volume selected, or pass (volume, segmentation) pairs")
            pairs.append((volume, seg))
        return pairs

    @staticmethod
    def trainingMethods() -> List[str]:
        """The training presets a user can pick (baseline, imbalance-aware, semi-supervised)."""
        from imbalanceseglib.presets import METHOD_PRESETS
        return list(METHOD_PRESETS)

    def trainingConfigFromScene(self, pairs: Sequence[Tuple[Any, Any]], method: str = "dice_ce",
                                iterations: int = 2000, name: str = "my_model", modality: str = "",
                                patchSize: int = 64, deepSupervision: bool = False, contextLabels: bool = False):
        """A training config for scene pairs: classes are the segments of the first segmentation
        (names and colours; background first), the target spacing is the median voxel spacing of the
        volumes, patches at most ``patchSize`` voxels a side (and no larger than the volumes).
        ``deepSupervision`` turns on deep supervision (``deep_supervision: {"enabled": true}``: auxiliary
        outputs at every coarser decoder level with nnU-Net's halving weights; training only).
        ``contextLabels`` turns on context label learning (``context_labels: {"enabled": true}``: a task
        generator's context class splits the background, merged back into it in the trained model;
        refused, naming the reason, with a semi-supervised method or asymmetric mixup)."""
        if not pairs:
            raise ValueError("choose at least one (volume, segmentation) pair to train on")
        if not name or any(ch in name for ch in "/\\:") or name.strip() != name:
            raise ValueError(f"model name {name!r} must be a plain file name (no slashes or surrounding spaces)")
        first = pairs[0][1].GetSegmentation()
        if first.GetNumberOfSegments() == 0:
            raise ValueError(f"segmentation {pairs[0][1].GetName()!r} has no segments")
        classes = [{"value": 0, "name": "Background", "color": [0, 0, 0]}]
        for i in range(first.GetNumberOfSegments()):
            seg = first.GetSegment(first.GetNthSegmentID(i))
            if seg.GetName() in [c["name"] for c in classes]:
                raise ValueError(f"two segments are named {seg.GetName()!r}; class names must be unique")
            classes.append({"value": i + 1, "name": seg.GetName(), "color": [round(v, 4) for v in seg.GetColor()]})
        spacings = [v.GetSpacing() for v, _ in pairs]
        sizes = [v.GetImageData().GetDimensions() for v, _ in pairs if v.GetImageData() is not None]
        return self._trainConfig(name, classes, spacings, sizes, method, iterations, modality, patchSize,
                                 deepSupervision, contextLabels)

    @staticmethod
    def _trainConfig(name: str, classes, spacings, sizes, method: str, iterations: int, modality: str,
                     patchSize: int, deepSupervision: bool = False, contextLabels: bool = False):
        """The config both training entry points build: target spacing = median spacing, patches at
        most ``patchSize`` voxels a side, multiples of 16 that fit the smallest volume."""
        from imbalanceseglib.train_config import TrainConfig
        spacings = np.array(spacings, dtype=float)
        target = [float(x) for x in np.median(spacings, axis=0)]
        size_mm = np.array(sizes).min(axis=0) * spacings.min(axis=0) if len(sizes) else np.array([patchSize] * 3)
        patch = [int(max(16, min(patchSize, 16 * (int(s / t) // 16 or 1)))) for s, t in zip(size_mm, target)]
        config = TrainConfig.from_dict({"name": name, "classes": classes, "target_spacing": target,
                                        "patch_size": patch, "features": [16, 32, 64, 128], "iterations": int(iterations),
                                        "method": method, "modality": modality or "",
                                        "val_every": max(1, int(iterations) // 10),
                                        "checkpoint_every": max(1, min(100, int(iterations) // 10)),
                                        "log_every": max(1, min(25, int(iterations) // 20)),
                                        "deep_supervision": {"enabled": bool(deepSupervision)},
                                        "context_labels": {"enabled": bool(contextLabels)}})
        return config  # validated by from_dict (the method name included)

    def trainingConfigFromFolder(self, folder: os.PathLike, method: str = "dice_ce", iterations: int = 2000,
                                 name: str = "my_model", modality: str = "", patchSize: int = 64,
                                 deepSupervision: bool = False, contextLabels: bool = False):
        """A training config for a data folder in any layout :func:`imbalanceseglib.datasets.open_dataset`
        reads: ``images/``, ``labels/`` and ``classes.json`` (a list of ``{"value", "name", "color"}`` or
        a mapping ``{"0": "background", ...}``; background 0 is added when absent), the nnU-Net v2 raw
        layout or the MSD layout. Label values need not be consecutive: the classes get indices 0, 1, 2,
        ... and keep their ``label_value``. The first labelled case's label map is checked against the
        classes here (the training job checks every case). ``modality``: the given one, else the
        layout's, else empty. Target spacing: the median spacing of the images (read from their headers).
        ``deepSupervision``, ``contextLabels``: as in :meth:`trainingConfigFromScene`."""
        import SimpleITK as sitk
        from imbalanceseglib.datasets import DatasetError, open_dataset
        ds = open_dataset(Path(folder))
        labelled = ds.labelled_cases()
        if not labelled:
            raise FileNotFoundError(f"no labelled cases in {ds.folder}")
        try:
            ds.read_labels(labelled[0])
        except DatasetError as exc:
            raise ValueError(f"{exc} (class values need not be 0, 1, 2, ... without gaps, but the classes must "
                             "list every label value the label maps hold)") from exc
        spacings, sizes = [], []
        for case in ds.cases:
            reader = sitk.ImageFileReader()
            reader.SetFileName(str(case.image))
            reader.ReadImageInformation()
            spacings.append(reader.GetSpacing())
            sizes.append(reader.GetSize())
        return self._trainConfig(name, ds.config_classes(), spacings, sizes, method, iterations,
                                 modality or ds.modality, patchSize, deepSupervision, contextLabels)

    def updateTrainingPlot(self, history: Sequence[Dict[str, Any]], classNames: Sequence[str],
                           chartNode=None, name: str = "ImbalanceSeg training"):
        """Show a training history (``{"iteration", "loss"}`` and ``{"iteration", "val": {class: Dice}}``
        entries) as a plot: loss and per-class validation Dice against the iteration. Creates the
        table, series and chart nodes on the first call and updates them afterwards. Returns the chart."""
        from ImbalanceSegSlicer import scene as sc
        if chartNode is None:
            chartNode = self.scene.AddNewNodeByClass("vtkMRMLPlotChartNode", name)
            chartNode.SetTitle(name)
            chartNode.SetXAxisTitle("iteration")
            chartNode.SetYAxisTitle("loss / validation Dice")
        table = chartNode.GetNodeReference("ImbalanceSegTrainingTable")
        if table is None:
            table = self.scene.AddNewNodeByClass("vtkMRMLTableNode", f"{name} history")
            chartNode.SetNodeReferenceID("ImbalanceSegTrainingTable", table.GetID())
        iterations = sorted({int(e["iteration"]) for e in history})
        loss = {int(e["iteration"]): float(e["loss"]) for e in history if "loss" in e}
        val: Dict[int, Dict[str, Any]] = {}
        for e in history:
            if "val" in e:
                val.setdefault(int(e["iteration"]), {}).update(e["val"])
        columns = [{"name": "iteration", "type": "double"}, {"name": "loss", "type": "double"}] + \
            [{"name": f"val Dice {c}", "type": "double"} for c in classNames]
        rows = []
        for it in iterations:
            v = val.get(it, {})
            rows.append([it, loss.get(it)] + [v.get(c) for c in classNames])
        sc.fill_table_node(table, columns, rows)
        wanted = ["loss"] + [f"val Dice {c}" for c in classNames]
        existing = {chartNode.GetNthPlotSeriesNode(i).GetName(): chartNode.GetNthPlotSeriesNode(i)
                    for i in range(chartNode.GetNumberOfPlotSeriesNodes())}
        for column in wanted:
            if column in existing:
                continue
            series = self.scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", column)
            series.SetAndObserveTableNodeID(table.GetID())
            series.SetXColumnName("iteration")
            series.SetYColumnName(column)
            series.SetPlotType(series.PlotTypeScatter)
            if column != "loss":
                series.SetMarkerStyle(series.MarkerStyleCircle)
            chartNode.AddAndObservePlotSeriesNodeID(series.GetID())
        return chartNode

    @staticmethod
    def trainingStatus(job) -> str:
        """The Train section's status line for a training job's progress."""
        if job.phase == "calibrate":
            return "Calibrating on the validation segmentations..."
        losses = [e for e in job.history if "loss" in e]
        if losses:
            return f"Iteration {job.iteration}/{job.total}, loss {losses[-1]['loss']:.4f}"
        return "Preparing the data..."

    def showTrainingPlot(self, history: Sequence[Dict[str, Any]], classNames: Sequence[str], chartNode=None,
                         plotViewNode=None):
        """Update the training plot (:meth:`updateTrainingPlot`) and the plot view node that shows
        it; nodes that are gone from the scene (a closed scene) are made anew. Returns
        (chart node, plot view node)."""
        if chartNode is not None and chartNode.GetScene() is not self.scene:
            chartNode = None
        if plotViewNode is None or plotViewNode.GetScene() is not self.scene:
            plotViewNode = self.scene.AddNewNodeByClass("vtkMRMLPlotViewNode", "ImbalanceSeg training view")
        chartNode = self.updateTrainingPlot(history, classNames, chartNode)
        plotViewNode.SetPlotChartNodeID(chartNode.GetID())
        return chartNode, plotViewNode

    @staticmethod
    def calibrationDescription(prediction) -> str:
        est = prediction.estimator
        if est is None or est.method == "none":
            return "uncalibrated (plain confidence)"
        return (f"{est.method.upper()} ({'class-specific' if est.class_specific else 'global'}, "
                f"{est.confidence} confidence)")

    @staticmethod
    def performanceRows(prediction, flagThreshold: float = REVIEW_THRESHOLD) -> List[Dict[str, Any]]:
        """Per foreground class: the label-free estimate of ``prediction.performance`` and a review flag
        (the rows ``imbalanceseg predict`` writes: :func:`imbalanceseglib.segfile.performance_rows`)."""
        from imbalanceseglib.segfile import performance_rows
        return performance_rows(prediction, flagThreshold)

    @staticmethod
    def formatPerformanceRows(rows: List[Dict[str, Any]], trueDice: Optional[Dict[str, Optional[float]]] = None) -> str:
        """The performance table as aligned text; with ``trueDice`` (name -> Dice) a column to compare."""
        def fmt(v, spec):
            return "-" if v is None else format(v, spec)
        head = (f"{'Segment':<22}{'Est. Dice':>10}{'Est. sens':>10}{'Est. prec':>10}{'Vol ml':>9}{'Exp. ml':>9}"
                f"{'Mean conf':>10}  {'State':<16}{'Flag':<7}")
        if trueDice is not None:
            head += f"{'True Dice':>10}"
        lines = [head]
        for r in rows:
            line = (f"{r['Segment']:<22}{fmt(r['Estimated Dice'], '.3f'):>10}{fmt(r['Estimated sensitivity'], '.3f'):>10}"
                    f"{fmt(r['Estimated precision'], '.3f'):>10}{fmt(r['Volume'], '.2f'):>9}"
                    f"{fmt(r['Expected volume'], '.2f'):>9}{fmt(r['Mean confidence'], '.3f'):>10}  "
                    f"{r['State']:<16}{r['Flag'] or '-':<7}")
            if trueDice is not None:
                line += f"{fmt(trueDice.get(r['Segment']), '.3f'):>10}"
            lines.append(line)
        return "\n".join(lines)

    @staticmethod
    def classRows(prediction, spacing: Sequence[float], reference=None) -> List[Dict[str, Any]]:
        """Per foreground class: voxels, volume (ml), mean probability and, with a reference,
        Dice, HD95, ASSD and surface Dice (``imbalanceseglib.evaluation``)."""
        return ImbalanceSegLogic.classRowsFromArrays(prediction.labels, prediction.probabilities,
                                                     prediction.class_names, spacing, reference)

    @staticmethod
    def classRowsFromArrays(labels_zyx, probabilities, class_names: Sequence[str], spacing: Sequence[float],
                            reference=None) -> List[Dict[str, Any]]:
        """:meth:`classRows` on arrays: labels (z, y, x), probabilities (C, z, y, x), spacing (x, y, z)."""
        from imbalanceseglib.evaluation import evaluate_labels

        n = len(class_names)
        voxel_ml = float(np.prod(spacing)) / 1000.0
        counts = np.bincount(np.asarray(labels_zyx).ravel(), minlength=n)
        evaluated, matched = {}, {}
        if reference is not None:
            ref_labels, matched = reference
            labels = [c for c in range(1, n) if class_names[c] in matched]
            if labels:
                case = evaluate_labels(labels_zyx, ref_labels, tuple(reversed(tuple(spacing))),
                                       labels=labels, class_names=list(class_names),
                                       metrics=("overlap", "distance", "nsd"))
                evaluated = case.by_label()
        rows = []
        for c in range(1, n):
            mask = labels_zyx == c
            row = {k: None for k in ROW_KEYS}
            row.update({"Segment": class_names[c], "Voxel count": int(counts[c]),
                        "Volume": float(counts[c] * voxel_ml),
                        "Mean probability": float(probabilities[c][mask].mean()) if counts[c] else None})
            if c in evaluated:
                e = evaluated[c]
                row.update({"Reference voxel count": e.reference_voxels, "Dice": e.dice, "HD95": e.hd95_mm,
                            "ASSD": e.assd_mm, "Surface Dice": e.nsd, "Policy": e.policy})
            rows.append(row)
        return rows

    @staticmethod
    def formatRows(rows: List[Dict[str, Any]]) -> str:
        """The class table as aligned text (for the terminal and logs)."""
        def fmt(v, spec):
            return "-" if v is None else format(v, spec)
        lines = [f"{'Segment':<22}{'Voxels':>9}{'Volume ml':>11}{'Mean p':>9}{'Ref voxels':>12}{'Dice':>8}"
                 f"{'HD95 mm':>9}{'ASSD mm':>9}{'SurfDice':>10}  Policy"]
        for r in rows:
            lines.append(f"{r['Segment']:<22}{r['Voxel count']:>9d}{r['Volume']:>11.2f}"
                         f"{fmt(r['Mean probability'], '.3f'):>9}{fmt(r['Reference voxel count'], 'd'):>12}"
                         f"{fmt(r['Dice'], '.3f'):>8}{fmt(r['HD95'], '.2f'):>9}{fmt(r['ASSD'], '.2f'):>9}"
                         f"{fmt(r['Surface Dice'], '.3f'):>10}  {r['Policy'] or '-'}")
        return "\n".join(lines)


    # -- annotate next (suggestive annotation, issue #23) ----------------------------------------

    @staticmethod
    def annotationStrategies() -> List[Tuple[str, str]]:
        """(strategy, label) for the panel, in the library's order
        (``imbalanceseglib.suggestive.STRATEGIES``; written out here so the panel needs no torch)."""
        return [("suggestive", "Uncertain and representative"), ("uncertainty", "Most uncertain"),
                ("random", "Random")]

    def annotationPool(self):
        """The scene's unlabelled scans, its labelled volumes and the volumes that are not scans
        (:func:`ImbalanceSegSlicer.annotation.annotation_pool`; its docstring says what counts as
        labelled)."""
        from ImbalanceSegSlicer.annotation import annotation_pool
        return annotation_pool(self.scene)

    def _checkScans(self, nodes: Sequence[Any], what: str) -> List[Any]:
        from ImbalanceSegSlicer.annotation import why_not_a_scan
        out, seen = [], set()
        for node in nodes:
            if node is None or not node.IsA("vtkMRMLScalarVolumeNode"):
                raise ValueError(f"each {what} must be a scalar volume node, got {node!r}")
            if node.GetScene() is not self.scene:
                raise ValueError(f"{what} {node.GetName()!r} is not in this logic's scene")
            why = why_not_a_scan(node)
            if why is not None:
                raise ValueError(f"{what} {node.GetName()!r} cannot be ranked: {why}")
            if node.GetID() not in seen:
                seen.add(node.GetID())
                out.append(node)
        return out

    def suggestAnnotations(self, model, n: int = 5, strategy: str = "suggestive", volumeNodes=None,
                           labelledVolumeNodes=None, device: str = "cpu", seed: int = 0,
                           candidatesFactor: float = 2.0, tableNode=None, fillTable: bool = True,
                           progress: Optional[ProgressCallback] = None):
        """Which unlabelled volumes to annotate next: rank them with ``model`` (a path or a loaded
        bundle) and choose ``n`` (:func:`imbalanceseglib.suggestive.rank_for_annotation`;
        ``strategy``: ``"suggestive"``, Yang et al. MICCAI 2017: the ``candidatesFactor`` x n most
        uncertain, then the greedy max-cover of representativeness; ``"uncertainty"``; ``"random"``,
        seeded by ``seed``).

        The pool: ``volumeNodes``, or the scene's unlabelled scans; the labelled volumes
        (``labelledVolumeNodes``, or the scene's: see :mod:`ImbalanceSegSlicer.annotation`) count as
        covered for ``suggestive``. Volumes are copied one at a time, so the pool need not fit in
        memory twice. Returns an :class:`~ImbalanceSegSlicer.annotation.AnnotationSuggestions`; with
        ``fillTable`` the rows also go into ``tableNode``, or into the module's "Annotate next" table
        (made once, then reused). No other node is changed; on any error nothing is."""
        from imbalanceseglib.suggestive import LazyScans, rank_for_annotation
        from ImbalanceSegSlicer import annotation as an
        from ImbalanceSegSlicer import scene as sc
        from ImbalanceSegSlicer.tables import ANNOTATE_NEXT_ATTRIBUTE, ANNOTATE_NEXT_COLUMNS

        if model is None or (not hasattr(model, "network") and not str(model)):
            raise ValueError("select a model (an ImbalanceSeg .imbseg bundle) to rank the volumes with")
        strategies = [s for s, _ in self.annotationStrategies()]
        if strategy not in strategies:
            raise ValueError(f"unknown strategy {strategy!r}; choose one of {', '.join(strategies)}")
        if tableNode is not None and (not tableNode.IsA("vtkMRMLTableNode") or tableNode.GetScene() is not self.scene):
            raise ValueError("tableNode must be a table node of this logic's scene")
        found = self.annotationPool()
        pool = list(found.unlabelled) if volumeNodes is None else self._checkScans(volumeNodes, "volume")
        pool_ids = {v.GetID() for v in pool}
        if labelledVolumeNodes is None:
            labelled = [v for v in found.labelledNodes if v.GetID() not in pool_ids]
        else:
            labelled = self._checkScans(labelledVolumeNodes, "labelled volume")
            both = [v.GetName() for v in labelled if v.GetID() in pool_ids]
            if both:
                raise ValueError(f"volume(s) {', '.join(both)} are both in the pool and labelled; a labelled volume is "
                                 "not annotated again")
        if not pool:
            raise ValueError("the scene has no unlabelled volume to rank"
                             + (f" (labelled: {', '.join(v.GetName() for v in found.labelledNodes)})"
                                if found.labelledNodes else "")
                             + (f" (not scans: {', '.join(found.skipped)})" if found.skipped else "")
                             + "; load the scans to choose from")
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= len(pool):
            raise ValueError(f"choose between 1 and the {len(pool)} unlabelled volume(s), got {n!r}")
        bundle = model if hasattr(model, "network") else self.loadModel(model)
        keys = an.scan_keys(pool, [v.GetName() for v in labelled])
        labelled_keys = an.scan_keys(labelled, [v.GetName() for v in pool])

        def reader(node):
            def read():
                if node.GetScene() is not self.scene:
                    raise ValueError(f"volume {node.GetName()!r} was removed from the scene")
                return sc.sitk_from_volume_node(node)
            return read

        covered = strategy == "suggestive" and bool(labelled)
        ranked = rank_for_annotation(
            bundle, LazyScans({k: reader(v) for k, v in zip(keys, pool)}), int(n), strategy=strategy,
            annotated=LazyScans({k: reader(v) for k, v in zip(labelled_keys, labelled)}) if covered else None,
            seed=seed, progress=progress, candidates_factor=candidatesFactor, device=device)
        by_key = dict(zip(keys, pool))
        rows = [{"Rank": r.rank, "Volume": r.name, "Chosen": "yes" if r.chosen else "", "Uncertainty": r.uncertainty,
                 "Representativeness gain": r.gain, "Most like": r.similar_to or "", "Similarity": r.similarity,
                 "Why": r.reason, "volumeNode": by_key[r.name], "perClass": dict(r.per_class)} for r in ranked]
        table = None
        if fillTable:
            table = tableNode
            if table is None:
                tables = [self.scene.GetNthNodeByClass(i, "vtkMRMLTableNode")
                          for i in range(self.scene.GetNumberOfNodesByClass("vtkMRMLTableNode"))]
                table = next((t for t in tables if t.GetAttribute(ANNOTATE_NEXT_ATTRIBUTE) is not None), None)
            if table is None:
                table = sc.table_node_from_rows(self.scene, "Annotate next", ANNOTATE_NEXT_COLUMNS,
                                                [[r[c["name"]] for c in ANNOTATE_NEXT_COLUMNS] for r in rows])
            else:
                sc.fill_table_node(table, ANNOTATE_NEXT_COLUMNS,
                                   [[r[c["name"]] for c in ANNOTATE_NEXT_COLUMNS] for r in rows])
            table.SetAttribute(ANNOTATE_NEXT_ATTRIBUTE, strategy)
            table.SetAttribute("ImbalanceSeg.AnnotateNextVolumes", json.dumps([r["volumeNode"].GetID() for r in rows]))
        return an.AnnotationSuggestions(rows=rows, tableNode=table, strategy=strategy,
                                        coveredBy=list(labelled_keys) if covered else [],
                                        labelled=[v.GetName() for v in labelled], skipped=dict(found.skipped))
