"""ImbalanceSeg: segmentation with per-class confidence for imbalanced structures.

This file holds what Slicer's scripted-module convention expects in the module file: the
Module, the Widget (a thin binding of the panel to the Logic) and the Test. Everything the
panel does is a Logic call in ``ImbalanceSegSlicer.logic`` (Qt-free, tested on ``slicer-core``);
nothing in ``ImbalanceSegSlicer`` imports this file.

Nothing here imports torch, MONAI or safetensors at module level, and neither does what the
panel's setup calls: the panel opens right after an Extension Manager install, before those are
installed, and offers to install them on first use.
"""

import logging
import os
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

_MODULE_DIR = Path(__file__).resolve().parent
if str(_MODULE_DIR) not in sys.path:
    sys.path.insert(0, str(_MODULE_DIR))

from ImbalanceSegSlicer.paths import add_library_paths  # noqa: E402

add_library_paths()

from ImbalanceSegSlicer import dependencies  # noqa: E402
from ImbalanceSegSlicer import settings as run_settings  # noqa: E402
from ImbalanceSegSlicer.logic import (IN_SLICER_APP, ImbalanceSegLogic, ProgressCallback,  # noqa: E402,F401
                                      SegmentationResult)
from ImbalanceSegSlicer.paths import bundled_models_dir, demo_data_dir, sample_data_sources  # noqa: E402,F401
from ImbalanceSegSlicer.tables import (ESTIMATOR_ROWS_ATTRIBUTE, PERFORMANCE_COLUMNS,  # noqa: E402,F401
                                       PERFORMANCE_KEYS, ROW_KEYS, TABLE_COLUMNS)

if IN_SLICER_APP:
    import qt
    import slicer
    import vtk
    from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleTest,
                                               ScriptedLoadableModuleWidget)
    from slicer.util import VTKObservationMixin
else:  # Plain Python with slicer-core: the Logic works, the widget does not exist.
    class ScriptedLoadableModule:  # minimal stand-ins so this file can be imported
        def __init__(self, parent=None):
            self.parent = parent

    class ScriptedLoadableModuleWidget:
        def __init__(self, parent=None):
            raise RuntimeError("the ImbalanceSeg widget needs the 3D Slicer application")

    class ScriptedLoadableModuleTest:
        pass

    class VTKObservationMixin:
        pass


#
# Module
#


class ImbalanceSeg(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "ImbalanceSeg"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["ImbalanceSeg developers"]
        self.parent.helpText = (
            "Segment a volume with a trained ImbalanceSeg model. Besides the segmentation, the module "
            "keeps the per-class probabilities (confidence maps), an uncertainty map (normalised "
            "entropy) and a per-class table of volumes and mean confidence, compared with a reference "
            "segmentation when one is given.")
        self.parent.acknowledgementText = (
            "Demo model and case: Medical Segmentation Decathlon Task04 hippocampus (Antonelli et al., "
            "Nat Commun 2022; Simpson et al. 2019), CC BY-SA 4.0. Whole-head example: Colin27 T1 (Holmes et al. "
            "1998) with the AAL atlas (Tzourio-Mazoyer et al. 2002), as distributed by Debian's mricron-data "
            "package. See Resources/Demo/SOURCES.md.")
        if IN_SLICER_APP:
            slicer.app.connect("startupCompleted()", registerSampleData)


def sampleDataSources() -> List[Dict[str, Any]]:
    """What the module adds to Slicer's Sample Data module (see ``paths.sample_data_sources``)."""
    return sample_data_sources()


def registerSampleData() -> None:
    import SampleData
    for source in sample_data_sources():
        SampleData.SampleDataLogic.registerCustomSampleDataSource(**source)


def missingDependencies() -> str:
    """Why the module's processing cannot run here ('' when it can): missing or too old packages."""
    return dependencies.describe(dependencies.problems())


#
# Parameter node (typed, saved with the scene)
#

if IN_SLICER_APP:
    from typing import Annotated

    from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
    from slicer.parameterNodeWrapper import WithinRange, parameterNodeWrapper, parameterPack

    @parameterPack
    class ImbalanceSegRunSettings:
        """Every run setting, in one pack (also remembered in the application settings:
        ``ImbalanceSegSlicer.settings``, which lists the same fields)."""
        model: str = ""
        device: str = "cpu"
        method: str = "dice_ce"
        outputFolder: str = ""

    @parameterNodeWrapper
    class ImbalanceSegParameterNode:
        """Module state kept in the scene (saved with it). Widgets are bound by the
        ``SlicerParameterName`` property in Resources/UI/ImbalanceSeg.ui; the run settings are
        written by the widget when their (dynamically filled) selectors change."""
        inputVolume: vtkMRMLScalarVolumeNode
        referenceSegmentation: vtkMRMLSegmentationNode
        resultSegmentation: vtkMRMLSegmentationNode
        flagThreshold: Annotated[float, WithinRange(0.0, 1.0)] = 0.7
        checkStability: bool = False
        iterations: Annotated[int, WithinRange(10, 1000000)] = 2000
        modelName: str = "my_model"
        resume: bool = True
        deepSupervision: bool = False
        contextLabels: bool = False
        annotateCount: Annotated[int, WithinRange(1, 100000)] = 5  # Annotate next: volumes to choose
        run: ImbalanceSegRunSettings


#
# Widget (thin: connects the GUI to the Logic)
#


class ImbalanceSegWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._job = None
        self._trainJob = None
        self._trainClasses: List[str] = []
        self._chart = None
        self._plotViewNode = None
        self._plotted = -1
        self._regions: List[Dict[str, Any]] = []
        self._regionIndex = 0
        self._timer = None

    # -- setup ----------------------------------------------------------------------
    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/ImbalanceSeg.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = ImbalanceSegLogic(slicer.mrmlScene)
        self.ui.progressBar.hide()
        self._timer = qt.QTimer()
        self._timer.setInterval(250)
        self._timer.connect("timeout()", self.onTimer)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.applyButton.connect("clicked(bool)", self.onApply)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancel)
        self.ui.addModelFolderButton.connect("clicked(bool)", self.onAddModelFolder)
        self.ui.modelSelector.connect("currentIndexChanged(int)", self.onModelChanged)
        self.ui.deviceSelector.connect("currentIndexChanged(int)", lambda i: self._setRunSetting(
            "device", self.ui.deviceSelector.currentText))
        self.ui.methodSelector.connect("currentIndexChanged(int)", lambda i: self._setRunSetting(
            "method", self.ui.methodSelector.currentText))
        self.ui.outputFolderSelector.connect("currentPathChanged(QString)", lambda path: self._setRunSetting(
            "outputFolder", path))
        self.ui.resultSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onResultChanged)
        self.ui.classSelector.connect("currentIndexChanged(int)", self.onClassChanged)
        self.ui.showConfidenceButton.connect("clicked(bool)", self.onShowConfidence)
        self.ui.showUncertaintyButton.connect("clicked(bool)", self.onShowUncertainty)
        self.ui.overlayOpacitySlider.connect("valueChanged(double)", self.onOpacityChanged)
        self.ui.thresholdSlider.connect("valueChanged(double)", self.onThresholdChanged)
        self.ui.resetThresholdButton.connect("clicked(bool)", self.onResetThreshold)
        self.ui.nextRegionButton.connect("clicked(bool)", self.onNextRegion)
        self.ui.compareButton.connect("clicked(bool)", self.onCompare)
        self.ui.trainButton.connect("clicked(bool)", self.onTrain)
        self.ui.cancelTrainButton.connect("clicked(bool)", self.onCancelTraining)
        self.ui.suggestButton.connect("clicked(bool)", self.onSuggest)
        self._fillCombo(self.ui.annotateStrategySelector,
                        [(label, name) for name, label in self.logic.annotationStrategies()], "suggestive")

        self.initializeParameterNode()
        self.updateGui()

    def cleanup(self):
        self.removeObservers()
        if self._timer is not None:
            self._timer.stop()
        if self._job is not None:
            self._job.cancel()
        if self._trainJob is not None:
            self._trainJob.cancel()  # checkpoints stay; training resumes from them
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)

    def enter(self):
        self.initializeParameterNode()

    def exit(self):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGui)

    def onSceneStartClose(self, caller, event):
        if self._job is not None:  # its results would land in a closed scene
            self._job.cancel()
            self._job = None
            self.ui.progressBar.hide()
            self.ui.statusLabel.text = "Segmentation cancelled: the scene was closed."
        # Training goes on in its process; its plot nodes go with the scene and are made anew
        # in the next scene on the next progress tick.
        self._forgetTrainingPlot()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self):
        self.setParameterNode(ImbalanceSegParameterNode(self.logic.getParameterNode()))
        pn = self._parameterNode
        if not pn.inputVolume:
            first = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if first:
                pn.inputVolume = first
        if not pn.run.model:  # a new scene: start from the remembered settings
            for name, value in run_settings.remembered(qt.QSettings()).items():
                setattr(pn.run, name, value)
        self._refreshChoices()

    def setParameterNode(self, inputParameterNode):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGui)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGui)
        self.updateGui()

    # -- run settings ------------------------------------------------------------------
    def _setRunSetting(self, name: str, value: str) -> None:
        """One run setting changed in the panel: into the parameter node and the settings."""
        if self._parameterNode is not None and value != getattr(self._parameterNode.run, name):
            setattr(self._parameterNode.run, name, value)
        run_settings.remember(qt.QSettings(), {name: value})

    def _refreshChoices(self, selectModel: Optional[str] = None) -> None:
        """Fill the model, device and method lists from the Logic (none of which needs torch) and
        select the run settings' values; called at setup and again after installing packages."""
        pn = self._parameterNode
        run = pn.run if pn is not None else None
        choices = self.logic.panelChoices(run_settings.model_folders(qt.QSettings()))
        model = selectModel or (run.model if run else "")
        models = [str(p) for p in choices["models"]]
        self._fillCombo(self.ui.modelSelector, [(f"{Path(p).stem}  ({Path(p).parent.name})", p) for p in models],
                        run_settings.pick(model, models))
        self._fillCombo(self.ui.deviceSelector, [(d, d) for d in choices["devices"]],
                        run_settings.pick(run.device if run else "", choices["devices"], "cpu"))
        self._fillCombo(self.ui.methodSelector, [(m, m) for m in choices["methods"]],
                        run_settings.pick(run.method if run else "", choices["methods"], "dice_ce"))
        if run is not None:
            self.ui.outputFolderSelector.currentPath = run.outputFolder or os.path.join(
                slicer.app.defaultScenePath, "ImbalanceSegModels")
            for name, combo in (("model", self.ui.modelSelector), ("device", self.ui.deviceSelector),
                                ("method", self.ui.methodSelector)):
                value = (combo.currentData if name == "model" else combo.currentText) or ""
                self._setRunSetting(name, value)
        self.onModelChanged()

    @staticmethod
    def _fillCombo(combo, items, selected) -> None:
        combo.blockSignals(True)
        combo.clear()
        for text, data in items:
            combo.addItem(text, data)
        index = combo.findData(selected)
        if index >= 0:
            combo.currentIndex = index
        combo.blockSignals(False)

    def updateGui(self, caller=None, event=None):
        if not hasattr(self, "ui"):
            return
        pn = self._parameterNode
        running = self._job is not None
        training = self._trainJob is not None
        self.ui.applyButton.enabled = bool(pn and pn.inputVolume) and self.ui.modelSelector.count > 0 and not running
        self.ui.applyButton.toolTip = ("Segment the input volume in a background process" if self.ui.applyButton.enabled
                                       else "Select an input volume and a model")
        self.ui.cancelButton.enabled = running
        result = self.ui.resultSelector.currentNode()
        for w in (self.ui.classSelector, self.ui.showConfidenceButton, self.ui.showUncertaintyButton,
                  self.ui.thresholdSlider, self.ui.resetThresholdButton, self.ui.nextRegionButton):
            w.enabled = result is not None and self.ui.classSelector.count > 0
        self.ui.compareButton.enabled = result is not None and bool(pn and pn.referenceSegmentation)
        self.ui.trainButton.enabled = not training
        self.ui.cancelTrainButton.enabled = training

    # -- dependencies --------------------------------------------------------------------
    def _ensureDependencies(self) -> bool:
        """Offer to install missing or too old packages; False when the user declines. Raises
        (inside the caller's error display) when an install fails or in testing mode."""
        found = dependencies.problems()
        if not found:
            return True
        if slicer.app.testingEnabled():
            raise RuntimeError(f"missing Python packages in testing mode (nothing is installed there): "
                               f"{dependencies.describe(found)}")
        if not slicer.util.confirmOkCancelDisplay(
                "ImbalanceSeg needs these Python packages, which will be installed now "
                "(torch through the PyTorch extension):\n" + "\n".join(p.describe() for p in found)):
            return False

        def installTorch(requirement: str) -> None:
            import PyTorchUtils
            PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False,
                                                          torchVersionRequirement=requirement[len("torch"):])

        with slicer.util.WaitCursor():
            dependencies.install(found, installTorch, slicer.util.pip_install)
        self._refreshChoices()
        return True

    # -- segment -------------------------------------------------------------------------
    def onAddModelFolder(self):
        folder = qt.QFileDialog.getExistingDirectory(slicer.util.mainWindow(), "Folder of ImbalanceSeg models")
        if folder:
            run_settings.add_model_folder(qt.QSettings(), folder)
            self._refreshChoices()

    def onModelChanged(self, index=None):
        path = self.ui.modelSelector.currentData
        if path:
            self._setRunSetting("model", path)
        self.ui.modelCardBrowser.setHtml(self.logic.modelDescriptionHtml(path))
        self.updateGui()

    def onApply(self):
        from ImbalanceSegSlicer.jobs import SegmentationJob
        pn = self._parameterNode
        with slicer.util.tryWithErrorDisplay("ImbalanceSeg could not start.", waitCursor=True):
            if not self._ensureDependencies():
                return
            self._job = SegmentationJob(self.logic, pn.inputVolume, pn.run.model, pn.referenceSegmentation,
                                        device=pn.run.device, flagThreshold=pn.flagThreshold,
                                        agreement="default" if pn.checkStability else None).start()
            self.ui.progressBar.value = 0
            self.ui.progressBar.show()
            self.ui.statusLabel.text = "Starting..."
            self._timer.start()
        self.updateGui()

    def onCancel(self):
        if self._job is not None:
            self._job.cancel()
            self._job = None
            self.ui.progressBar.hide()
            self.ui.statusLabel.text = "Cancelled; the scene is unchanged."
        self.updateGui()

    def onTimer(self):
        from ImbalanceSegSlicer.jobs import RUNNING
        if self._job is not None:
            state = self._job.poll()
            self.ui.progressBar.value = int(100 * self._job.fraction)
            self.ui.statusLabel.text = f"{self._job.stage}..."
            if state != RUNNING:
                job, self._job = self._job, None
                self._segmentationFinished(job)
        if self._trainJob is not None:
            state = self._trainJob.poll()
            try:  # showing progress must never stop the job's bookkeeping (completion below)
                self._showTrainingProgress(self._trainJob)
            except Exception as exc:
                logging.exception("ImbalanceSeg: cannot show the training progress")
                self.ui.trainStatusLabel.text = f"Cannot show the training progress: {exc}"
            if state != RUNNING:
                job, self._trainJob = self._trainJob, None
                self._trainingFinished(job)
        if self._job is None and self._trainJob is None:
            self._timer.stop()
        self.updateGui()

    def _segmentationFinished(self, job):
        from ImbalanceSegSlicer.jobs import DONE
        self.ui.progressBar.hide()
        if job.state != DONE:
            self.ui.statusLabel.text = "Segmentation failed; the scene is unchanged."
            slicer.util.errorDisplay(f"Segmentation failed: {job.error}")
            return
        result = job.result
        seg = result.segmentationNode
        flagged = self.logic.flaggedClasses(seg)
        self._parameterNode.resultSegmentation = seg
        self.ui.reviewCollapsibleButton.collapsed = False
        slicer.app.layoutManager().setLayout(slicer.vtkMRMLLayoutNode.SlicerLayoutFourUpTableView)
        slicer.app.applicationLogic().GetSelectionNode().SetActiveTableID(result.performanceTableNode.GetID())
        slicer.app.applicationLogic().PropagateTableSelection()
        self.ui.statusLabel.text = self.logic.resultSummary(result, flagged)

    # -- review ----------------------------------------------------------------------------
    def _reviewTarget(self):
        """The result and class the Review section works on. The result is read from its selector
        (the parameter node may not have been updated yet when a selector's signal arrives)."""
        return self.ui.resultSelector.currentNode(), self.ui.classSelector.currentData

    def onResultChanged(self, node=None):
        self.ui.classSelector.blockSignals(True)
        self.ui.classSelector.clear()
        self._regions, self._regionIndex = [], 0
        self.ui.reviewLabel.text = ""
        if node is not None:
            try:
                for name, label in self.logic.reviewClassChoices(node):
                    self.ui.classSelector.addItem(label, name)
                self.ui.performanceTableView.setMRMLTableNode(self.logic.performanceTableOf(node))
            except ValueError as exc:
                self.ui.reviewLabel.text = str(exc)
        self.ui.classSelector.blockSignals(False)
        self._selectClass(node, self.ui.classSelector.currentData)

    def onClassChanged(self, index=None):
        self._selectClass(*self._reviewTarget())

    def _selectClass(self, seg, cls):
        self._regions, self._regionIndex = [], 0
        if seg is None or not cls:
            self.updateGui()
            return
        self.ui.thresholdSlider.blockSignals(True)
        self.ui.thresholdSlider.value = self.logic.classThresholds(seg).get(cls, 0.5)
        self.ui.thresholdSlider.blockSignals(False)
        with slicer.util.tryWithErrorDisplay("Cannot show the confidence map."):
            self._showOverlay(seg, self.logic.probabilityNodeForClass(seg, cls))
        self.updateGui()

    def _showOverlay(self, seg, node):
        slicer.util.setSliceViewerLayers(background=self.logic.inputVolumeOf(seg), foreground=node,
                                         foregroundOpacity=self.ui.overlayOpacitySlider.value)

    def onShowConfidence(self):
        seg, cls = self._reviewTarget()
        if seg is None or not cls:
            return
        with slicer.util.tryWithErrorDisplay("Cannot show the confidence map."):
            self._showOverlay(seg, self.logic.probabilityNodeForClass(seg, cls))

    def onShowUncertainty(self):
        seg, _ = self._reviewTarget()
        if seg is None:
            return
        with slicer.util.tryWithErrorDisplay("Cannot show the uncertainty map."):
            self._showOverlay(seg, self.logic.uncertaintyNodeOf(seg))

    def onOpacityChanged(self, value):
        self.logic.setOverlayOpacity(value)

    def onThresholdChanged(self, value):
        seg, cls = self._reviewTarget()
        if seg is None or not cls:
            return
        with slicer.util.tryWithErrorDisplay("Cannot change the threshold.", waitCursor=True):
            out = self.logic.setClassThreshold(seg, cls, float(value))
            self.ui.reviewLabel.text = self.logic.thresholdSummary(out)

    def onResetThreshold(self):
        seg, cls = self._reviewTarget()
        if seg is None or not cls:
            return
        with slicer.util.tryWithErrorDisplay("Cannot reset the threshold.", waitCursor=True):
            out = self.logic.setClassThreshold(seg, cls, None)
            self.ui.reviewLabel.text = self.logic.thresholdSummary(out)
            self.ui.thresholdSlider.blockSignals(True)
            self.ui.thresholdSlider.value = 0.5
            self.ui.thresholdSlider.blockSignals(False)

    def onNextRegion(self):
        seg, cls = self._reviewTarget()
        if seg is None or not cls:
            return
        with slicer.util.tryWithErrorDisplay("Cannot find regions to review.", waitCursor=True):
            if not self._regions:
                self._regions, self._regionIndex = self.logic.leastConfidentRegions(seg, cls, count=5), 0
            if not self._regions:
                self.ui.reviewLabel.text = f"The model never considers {cls} (no voxel above 5 %)."
                return
            region = self._regions[self._regionIndex % len(self._regions)]
            self.logic.jumpToRegion(region)
            self.ui.reviewLabel.text = self.logic.regionSummary(region, self._regionIndex % len(self._regions),
                                                                len(self._regions))
            self._regionIndex += 1

    def onCompare(self):
        seg, _ = self._reviewTarget()
        with slicer.util.tryWithErrorDisplay("Comparison failed.", waitCursor=True):
            rows = self.logic.compareWithReference(seg, self._parameterNode.referenceSegmentation)
            self.ui.performanceTableView.setMRMLTableNode(self.logic.classTableOf(seg))
            self.ui.reviewLabel.text = "Against the reference: " + ", ".join(
                f"{r['Segment']} {r['Dice']:.3f}" for r in rows if r["Dice"] is not None)

    # -- annotate next ----------------------------------------------------------------------
    def onSuggest(self):
        """Rank the scene's unlabelled volumes for annotation (Logic.suggestAnnotations) and show
        the "Annotate next" table. Runs in this process: the panel waits (a wait cursor)."""
        pn = self._parameterNode
        with slicer.util.tryWithErrorDisplay("Cannot suggest volumes to annotate.", waitCursor=True):
            if not self._ensureDependencies():
                return
            out = self.logic.suggestAnnotations(pn.run.model, n=pn.annotateCount,
                                                strategy=self.ui.annotateStrategySelector.currentData,
                                                device=pn.run.device)
            self.ui.annotateTableView.setMRMLTableNode(out.tableNode)
            self.ui.annotateStatusLabel.text = out.summary()

    # -- train -------------------------------------------------------------------------------
    def onTrain(self):
        from ImbalanceSegSlicer.jobs import TrainingJob
        pn = self._parameterNode
        with slicer.util.tryWithErrorDisplay("Training could not start.", waitCursor=True):
            if not self._ensureDependencies():
                return
            pairs = self.logic.trainingPairsFromSegmentations(self.ui.trainingSegmentationsSelector.checkedNodes())
            val = self.logic.trainingPairsFromSegmentations(self.ui.validationSegmentationsSelector.checkedNodes())
            folder = self.ui.trainingFolderSelector.currentPath if not pairs else ""
            if folder:
                config = self.logic.trainingConfigFromFolder(folder, pn.run.method, pn.iterations, pn.modelName,
                                                             deepSupervision=pn.deepSupervision,
                                                             contextLabels=pn.contextLabels)
            else:
                config = self.logic.trainingConfigFromScene(pairs, pn.run.method, pn.iterations, pn.modelName,
                                                            deepSupervision=pn.deepSupervision,
                                                            contextLabels=pn.contextLabels)
            if not pn.run.outputFolder:
                raise ValueError("choose an output folder for the checkpoints and the model")
            self._trainClasses = [c["name"] for c in config.classes[1:]]
            self._trainJob = TrainingJob(self.logic, config, pairs, Path(pn.run.outputFolder) / pn.modelName,
                                         unlabeledVolumeNodes=self.ui.unlabeledVolumesSelector.checkedNodes(),
                                         validationPairs=val, resume=pn.resume, dataFolder=folder or None).start()
            self._forgetTrainingPlot()
            self.ui.trainStatusLabel.text = "Preparing the data..."
            self._timer.start()
        self.updateGui()

    def onCancelTraining(self):
        if self._trainJob is not None:
            self._trainJob.cancel()
            self._trainJob = None
            self.ui.trainStatusLabel.text = "Stopped. Train again with 'Resume' to continue from the last checkpoint."
        self.updateGui()

    def _forgetTrainingPlot(self):
        self._chart, self._plotViewNode, self._plotted = None, None, -1
        self.ui.trainingPlotWidget.setMRMLPlotViewNode(None)

    def _showTrainingProgress(self, job):
        self.ui.trainProgressBar.value = int(100 * job.fraction)
        self.ui.trainStatusLabel.text = self.logic.trainingStatus(job)
        if job.history and len(job.history) != self._plotted:
            self._chart, self._plotViewNode = self.logic.showTrainingPlot(job.history, self._trainClasses,
                                                                          self._chart, self._plotViewNode)
            self._plotted = len(job.history)
            self.ui.trainingPlotWidget.setMRMLScene(slicer.mrmlScene)
            self.ui.trainingPlotWidget.setMRMLPlotViewNode(self._plotViewNode)

    def _trainingFinished(self, job):
        from ImbalanceSegSlicer.jobs import DONE
        if job.state != DONE:
            self.ui.trainStatusLabel.text = "Training failed."
            slicer.util.errorDisplay(f"Training failed: {job.error}")
            return
        run_settings.add_model_folder(qt.QSettings(), str(job.bundlePath.parent))
        self._refreshChoices(selectModel=str(job.bundlePath))
        # the trainer's plain summary of classes never or barely learned (or not checked), one line each
        notes = [str(w.get("message", "")).replace("[train] ", "", 1) for w in getattr(job, "warnings", [])]
        self.ui.trainStatusLabel.text = (f"Model written: {job.bundlePath} (selected in the model list)."
                                         + "".join(f"\n{note[:1].upper()}{note[1:]}" for note in notes))


#
# Test (runs inside Slicer's test runner on the demo case)
#


class ImbalanceSegTest(ScriptedLoadableModuleTest):
    """Slicer's headless test runner: segment the demo case, review it and compare with the
    reference (the same scenarios run under pytest on slicer-core, see Testing/Python/test_demo.py).
    Where torch, MONAI or safetensors are missing (Slicer's build machines), every test is skipped
    with the reason; nothing is installed in testing mode."""

    def setUp(self):
        reason = missingDependencies()
        if reason:
            self.skipTest(f"ImbalanceSeg processing tests need these Python packages: {reason}")
        slicer.mrmlScene.Clear()

    def runTest(self):
        reason = missingDependencies()
        if reason:
            logging.warning("ImbalanceSeg tests skipped; missing Python packages: %s", reason)
            self.delayDisplay(f"ImbalanceSeg tests skipped: missing Python packages: {reason}")
            return
        for test in (self.test_demo_segmentation, self.test_review_and_compare, self.test_background_segmentation):
            self.setUp()
            test()

    def test_demo_segmentation(self):
        from ImbalanceSegSlicer.scenarios import run_demo_scenario
        result = run_demo_scenario(slicer.mrmlScene)
        self.assertEqual(result["segment_names"], result["class_names"][1:])
        for name, dice in result["dice"].items():
            self.assertGreater(dice, result["min_dice"][name], name)
            self.assertAlmostEqual(result["estimated_dice"][name], dice, delta=result["estimate_tolerance"], msg=name)
        self.delayDisplay("ImbalanceSeg demo test passed")

    def test_review_and_compare(self):
        from ImbalanceSegSlicer.scenarios import run_review_scenario
        r = run_review_scenario(slicer.mrmlScene)
        cls = r["class"]
        self.assertEqual(len(r["regions"]), 3)
        self.assertGreater(r["counts_lowered"][cls], r["counts_before"][cls])
        self.assertGreater(r["lowered"]["sensitivity"], r["at_argmax"]["sensitivity"])
        self.assertLess(r["lowered"]["precision"], r["at_argmax"]["precision"])
        self.assertEqual(r["after"][cls]["Voxel count"], r["counts_lowered"][cls])
        self.assertEqual(r["counts_restored"], r["counts_before"])
        self.delayDisplay("ImbalanceSeg review test passed")

    def test_background_segmentation(self):
        from ImbalanceSegSlicer.jobs import SegmentationJob
        from ImbalanceSegSlicer.scenarios import load_demo_case, repository_paths
        volume, reference = load_demo_case(slicer.mrmlScene)
        logic = ImbalanceSegLogic(slicer.mrmlScene)
        job = SegmentationJob(logic, volume, repository_paths()["model"], reference).start()
        result = job.wait(timeout=900, progress=lambda stage, fraction: slicer.app.processEvents())
        for row in result.rows:
            self.assertIsNotNone(row["Dice"], row["Segment"])
        self.delayDisplay("ImbalanceSeg background segmentation test passed")
