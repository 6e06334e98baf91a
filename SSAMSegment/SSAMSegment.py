"""SSAM Segment: segment structures in a volume by typing their names, and fine-tune on your own segmentations.

The panel (Widget) is thin: it collects choices, asks before installing or downloading anything, runs long work in a
background process and shows progress. The Logic has no Qt: it turns volume nodes into images, runs SSAMSegmentLib
and writes segments (SSAMSegmentLib.slicer.scene_nodes), so scripts and tests use it without the GUI.

SSAMSegmentLib imports PyTorch, which is only present after the user agreed to install it: it is imported inside the
methods that need it, never when Slicer loads this module.
"""

import logging
import os
import re
import sys
from pathlib import Path
from typing import Annotated, List, Optional, Union

import slicer
import vtk
from slicer.util import VTKObservationMixin

_MODULE_DIR = Path(__file__).resolve().parent
# Installed, SSAMSegmentLib and Resources sit next to this file; in the source tree they are one folder up.
for _folder in (_MODULE_DIR, _MODULE_DIR.parent):
    if (_folder / "SSAMSegmentLib").is_dir():
        if str(_folder) not in sys.path:
            sys.path.insert(0, str(_folder))
        break

try:  # the Slicer application
    import qt
    from slicer.ScriptedLoadableModule import (
        ScriptedLoadableModule,
        ScriptedLoadableModuleLogic,
        ScriptedLoadableModuleTest,
        ScriptedLoadableModuleWidget,
    )
    from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper

    try:
        from slicer.i18n import tr as _
        from slicer.i18n import translate
    except ImportError:  # Slicer before 5.4
        def _(text):
            return text

        def translate(context, text):
            return text
    SLICER_GUI = True
except ImportError:  # slicer-core from PyPI (no Qt): the Logic, the batch script and the tests run here
    SLICER_GUI = False

    class ScriptedLoadableModule:  # stand-ins so the module file imports; only the Logic is used here
        pass

    class ScriptedLoadableModuleWidget:
        pass

    class ScriptedLoadableModuleTest:
        pass

    class ScriptedLoadableModuleLogic:
        def __init__(self, parent=None):
            self.moduleName = "SSAMSegment"

    def parameterNodeWrapper(cls):
        return cls

    def Choice(choices):
        return choices

    def WithinRange(minimum, maximum):
        return (minimum, maximum)

    def _(text):
        return text

    def translate(context, text):
        return text


def _oneLine(error) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def _shippedFile(relativePath: str) -> Optional[Path]:
    """A file of the extension (Resources/..., pyproject.toml), installed or in the source tree."""
    for folder in (_MODULE_DIR, _MODULE_DIR.parent):
        candidate = folder / relativePath
        if candidate.exists():
            return candidate
    return None


SETTINGS = "SSAMSegment"
AXES = ["auto", "axial", "coronal", "sagittal"]
DEVICES = {"auto": "auto", "CPU": "cpu", "GPU": "gpu"}
TORCH_PACKAGES = ("torch", "torchvision")  # installed by the PyTorch extension, which picks the CUDA build
# highdicom (DICOM SEG files) needs pydicom 3, and Slicer up to 5.10 bundles pydicom 2.4 for its own DICOM module
# (Slicer issue #8796): installing highdicom there would replace Slicer's pydicom. It is left out while Slicer's
# pydicom is older; Slicer exports segmentations as DICOM SEG itself (docs/slicer.md).
NEEDS_PYDICOM_3 = ("highdicom",)


#
# SSAMSegment
#


class SSAMSegment(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("SSAM Segment")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["SSAM Segment developers"]
        self.parent.helpText = _(
            "Type the name of a structure (liver, spleen, polyp, nucleus) and get it as a segment. "
            "S-SAM is Segment Anything tuned through its singular values and prompted by the text of the label. "
            "Several names can be given at once, separated by commas. The Fine-tune section trains a new adapter on "
            "a dataset folder or on the segmentations of this scene. "
            '<a href="https://github.com/SSAMSegment/SlicerSSAMSegment#3d-slicer">Documentation</a>.')
        self.parent.acknowledgementText = _(
            "S-SAM: Paranjape et al., S-SAM: SVD-based Fine-Tuning of Segment Anything Model for Medical Image "
            "Segmentation (MICCAI 2024). Base models: LiteMedSAM (bowang-lab, Apache-2.0) and SAM ViT-B "
            "(Meta AI, Apache-2.0). Text encoder: all-MiniLM-L6-v2 (MIT).")
        icon = _shippedFile("Resources/Icons/SSAMSegment.png")
        if SLICER_GUI and icon is not None:
            self.parent.icon = qt.QIcon(str(icon))


#
# SSAMSegmentParameterNode
#


@parameterNodeWrapper
class SSAMSegmentParameterNode:
    """The panel's choices saved with the scene. Model and device are application settings (QSettings) instead."""

    inputVolume: Union[slicer.vtkMRMLScalarVolumeNode, slicer.vtkMRMLVectorVolumeNode]
    labels: str = ""
    axis: Annotated[str, Choice(AXES)] = "auto"
    outputSegmentation: slicer.vtkMRMLSegmentationNode
    replaceExisting: bool = False
    selfBox: bool = True  # redraw the labels the adapter chose from their own box (inference/self_box.py)
    trainingLabels: str = ""
    trainingBudgetMinutes: Annotated[float, WithinRange(0.0, 10080.0)] = 0.0  # 0: no budget, the default recipe
    trainingAdapterName: str = ""
    trainingStartFromDefault: bool = False  # train on from the shipped adapter (TrainingConfig.start_from)


#
# SSAMSegmentWidget
#


class SSAMSegmentWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    POLL_MS = 200

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._task = None  # the one background job at a time: segmentation, training or download
        self._taskContext = {}
        self._afterDownload = None
        self._knownLabels = []
        self._scenePairs = []  # (image, segmentation) pairs listed for training from the scene

    # --- set-up -----------------------------------------------------------------------------------------------

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(str(_shippedFile("Resources/UI/SSAMSegment.ui")))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = SSAMSegmentLogic()

        self._pollTimer = qt.QTimer()
        self._pollTimer.setInterval(self.POLL_MS)
        self._pollTimer.connect("timeout()", self.onPoll)

        self.ui.progressBar.hide()
        self.ui.trainingProgressBar.hide()
        self.ui.trainingTableWidget.setHorizontalHeaderLabels(
            [_("Step"), _("Loss"), _("Val. Dice"), _("Expected finish")])
        self.ui.trainingTableWidget.horizontalHeader().setSectionResizeMode(qt.QHeaderView.Stretch)
        self.ui.trainingTableWidget.hide()

        self._labelsCompleter = qt.QCompleter([], self.ui.labelsLineEdit)
        self._labelsCompleter.setCaseSensitivity(qt.Qt.CaseInsensitive)
        self.ui.labelsLineEdit.setCompleter(self._labelsCompleter)
        self._knownLabelsMenu = qt.QMenu(self.ui.knownLabelsToolButton)
        self.ui.knownLabelsToolButton.setMenu(self._knownLabelsMenu)

        settings = qt.QSettings()
        cacheFolder = settings.value(f"{SETTINGS}/cacheFolder", "")
        if cacheFolder:
            os.environ["SSAM_CACHE_DIR"] = cacheFolder
        else:
            try:
                cacheFolder = str(self.logic.cacheFolder())
            except ImportError:  # packages not installed yet: the default folder is shown once they are
                cacheFolder = ""
        self.ui.cacheFolderPathLineEdit.currentPath = cacheFolder
        defaultDevice = settings.value(f"{SETTINGS}/defaultDevice", "auto")
        self.ui.defaultDeviceComboBox.currentText = defaultDevice
        self.ui.deviceComboBox.currentText = defaultDevice
        self.ui.trainingFolderPathLineEdit.currentPath = settings.value(f"{SETTINGS}/lastTrainingFolder", "")
        self.ui.trainingBudgetSpinBox.toolTip = SSAMSegmentLogic.trainingBudgetHelp()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.trainButton.connect("clicked(bool)", self.onTrainButton)
        self.ui.addAdapterToolButton.connect("clicked(bool)", self.onAddAdapter)
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelChanged)
        self.ui.labelsLineEdit.connect("textEdited(QString)", self.onLabelsEdited)
        self._knownLabelsMenu.connect("triggered(QAction*)", self.onKnownLabelChosen)
        self.ui.inputVolumeSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.updateButtons)
        self.ui.labelsLineEdit.connect("textChanged(QString)", self.updateButtons)
        self.ui.trainingFolderRadioButton.connect("toggled(bool)", self.onTrainingSourceChanged)
        self.ui.trainingFolderPathLineEdit.connect("currentPathChanged(QString)", self.onTrainingFolderChanged)
        self.ui.trainingRefreshPairsToolButton.connect("clicked(bool)", self.refreshScenePairs)
        self.ui.trainingCollapsibleButton.connect("contentsCollapsed(bool)", self.onTrainingSectionCollapsed)
        self.ui.trainingAdapterNameLineEdit.connect("textChanged(QString)", self.updateButtons)
        self.ui.cacheFolderPathLineEdit.connect("currentPathChanged(QString)", self.onCacheFolderChanged)
        self.ui.defaultDeviceComboBox.connect("currentIndexChanged(int)", self.onDefaultDeviceChanged)
        self.ui.downloadWeightsButton.connect("clicked(bool)", self.onDownloadWeights)
        self.ui.refineButton.connect("clicked(bool)", self.onRefineButton)
        self.ui.refineSegmentSelector.connect("currentSegmentChanged(QString)", self.updateButtons)
        self.ui.refineSegmentSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.updateButtons)
        for selector in (self.ui.refineRoiSelector, self.ui.refinePointsSelector, self.ui.refineNegativePointsSelector):
            selector.connect("currentNodeChanged(vtkMRMLNode*)", self.updateButtons)
        self._refineCancel = None  # a threading.Event while a correction runs

        self.initializeParameterNode()
        self.populateModels()
        self.onTrainingSourceChanged()
        self.updateButtons()

    def cleanup(self) -> None:
        """The module is unloaded or Slicer closes: stop any background job (its child process) and observers."""
        if self._task is not None:
            self._task.cleanup()
            self._task = None
        self._pollTimer.stop()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateButtons)

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            selected = self.ui.inputVolumeSelector.currentNode()
            if selected:
                self._parameterNode.inputVolume = selected

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateButtons)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateButtons)
        self.updateButtons()

    # --- state of the buttons ---------------------------------------------------------------------------------

    def _running(self, kind=None) -> bool:
        return self._task is not None and (kind is None or self._taskContext.get("button") == kind)

    def updateButtons(self, caller=None, event=None) -> None:
        if not hasattr(self, "ui"):
            return
        volume = self.ui.inputVolumeSelector.currentNode()
        labels = SSAMSegmentLogic.parseLabels(self.ui.labelsLineEdit.text)
        if self._running("apply"):
            self.ui.applyButton.text = _("Cancel")
            self.ui.applyButton.toolTip = _("Stop the segmentation; nothing is written")
            self.ui.applyButton.enabled = True
        else:
            self.ui.applyButton.text = _("Apply")
            missing = []
            if not volume:
                missing.append(_("select an input volume"))
            if not labels:
                missing.append(_("type a structure name"))
            if self._running():
                missing.append(_("wait for the running job"))
            self.ui.applyButton.enabled = not missing
            self.ui.applyButton.toolTip = (_("Segment: ") + ", ".join(missing)) if missing else _(
                "Segment {labels} in {volume}").format(labels=", ".join(labels), volume=volume.GetName())
        if self._running("train"):
            self.ui.trainButton.text = _("Cancel")
            self.ui.trainButton.enabled = True
        else:
            self.ui.trainButton.text = _("Train")
            self.ui.trainButton.enabled = not self._running() and bool(self.ui.trainingAdapterNameLineEdit.text.strip())
        self.ui.downloadWeightsButton.enabled = not self._running()
        if self._refineCancel is not None:
            self.ui.refineButton.text = _("Cancel")
            self.ui.refineButton.enabled = True
        else:
            self.ui.refineButton.text = _("Refine")
            hasPrompt = any(s.currentNode() for s in (self.ui.refineRoiSelector, self.ui.refinePointsSelector,
                                                      self.ui.refineNegativePointsSelector))
            self.ui.refineButton.enabled = bool(volume and self.ui.refineSegmentSelector.currentNode()
                                                and self.ui.refineSegmentSelector.currentSegmentID()
                                                and hasPrompt and not self._running())

    def setStatus(self, text: str, error: bool = False, training: bool = False, warning: bool = False) -> None:
        label = self.ui.trainingStatusLabel if training else self.ui.statusLabel
        label.text = text
        label.setStyleSheet("color: #c0392b;" if error else "color: #b9770e;" if warning else "")
        if error or warning:
            logging.warning(f"SSAM Segment: {text}")

    # --- models and labels ------------------------------------------------------------------------------------

    def _userAdapters(self) -> List[str]:
        stored = qt.QSettings().value(f"{SETTINGS}/userAdapters", [])
        if isinstance(stored, str):
            stored = [stored] if stored else []
        return [str(path) for path in stored or []]

    def populateModels(self) -> None:
        """Default adapter, the user's adapters (trained here or added from a file), SAM ViT-B ones marked."""
        combo = self.ui.modelComboBox
        wasBlocked = combo.blockSignals(True)
        combo.clear()
        combo.addItem(_("Default (LiteMedSAM, offline)"), SSAMSegmentLogic.DEFAULT_ADAPTER)
        for path in self.logic.adapterChoices(self._userAdapters()):  # works before the packages are installed
            combo.addItem(self.logic.adapterTitle(path), str(path))
            combo.setItemData(combo.count - 1, str(path), qt.Qt.ToolTipRole)
        last = qt.QSettings().value(f"{SETTINGS}/lastAdapter", SSAMSegmentLogic.DEFAULT_ADAPTER)
        index = combo.findData(last)
        combo.currentIndex = index if index >= 0 else 0
        combo.blockSignals(wasBlocked)
        self.onModelChanged()

    def currentAdapter(self) -> str:
        return self.ui.modelComboBox.currentData or SSAMSegmentLogic.DEFAULT_ADAPTER

    def onModelChanged(self, index=None) -> None:
        adapter = self.currentAdapter()
        qt.QSettings().setValue(f"{SETTINGS}/lastAdapter", adapter)
        try:
            self._knownLabels = self.logic.adapterInfo(adapter)["labels"]
        except Exception as error:  # dependencies not installed yet, or a damaged file: no completion
            logging.info(f"SSAM Segment: no label list for {adapter}: {error}")
            self._knownLabels = []
        self._knownLabelsMenu.clear()
        for name in self._knownLabels:
            self._knownLabelsMenu.addAction(name)
        self.ui.knownLabelsToolButton.enabled = bool(self._knownLabels)
        self.onLabelsEdited(self.ui.labelsLineEdit.text)

    def onLabelsEdited(self, text) -> None:
        """Complete the name being typed after the last comma with the adapter's labels."""
        from SSAMSegmentLib.model.labels import label_key

        prefix, separator, current = str(text).rpartition(",")
        lead = prefix + separator + current[: len(current) - len(current.lstrip())]
        typed = {label_key(name) for name in SSAMSegmentLogic.parseLabels(prefix)}
        choices = [lead + name for name in self._knownLabels if label_key(name) not in typed]
        self._labelsCompleter.setModel(qt.QStringListModel(choices, self._labelsCompleter))

    def onKnownLabelChosen(self, action) -> None:
        labels = SSAMSegmentLogic.parseLabels(self.ui.labelsLineEdit.text + "," + action.text)
        self.ui.labelsLineEdit.text = ", ".join(labels)

    def onAddAdapter(self) -> None:
        path = qt.QFileDialog.getOpenFileName(
            self.parent, _("Add an SSAM adapter"), str(self.logic.adaptersFolder()),
            _("SSAM adapters (*.safetensors)"))
        if not path:
            return
        if not self.ensureDependencies():
            return
        try:
            self.logic.adapterInfo(path)
        except Exception as error:
            self.setStatus(str(error), error=True)
            return
        self.rememberAdapter(path)

    def rememberAdapter(self, path) -> None:
        adapters = self._userAdapters()
        if str(path) not in adapters:
            adapters.append(str(path))
            qt.QSettings().setValue(f"{SETTINGS}/userAdapters", adapters)
        qt.QSettings().setValue(f"{SETTINGS}/lastAdapter", str(path))
        self.populateModels()

    # --- first use: packages and weights, each only after the user agreed -------------------------------------

    def ensureDependencies(self) -> bool:
        """PyTorch through the PyTorch extension, then the other packages of pyproject.toml; False if declined."""
        torchRequirements, otherRequirements = self.logic.pythonRequirements()
        if self.logic.missingRequirements(torchRequirements):
            try:
                import PyTorchUtils
            except ModuleNotFoundError:
                self.setStatus(_("SSAM Segment needs the PyTorch extension: install it from the Extensions Manager "
                                 "and restart Slicer."), error=True)
                return False
            torchLogic = PyTorchUtils.PyTorchUtilsLogic()
            version = self.logic.torchVersionRequirement(torchRequirements)
            try:
                with slicer.util.WaitCursor():
                    torch = torchLogic.installTorch(askConfirmation=True, torchVersionRequirement=version)
            except Exception as error:
                self.setStatus(_("Installing PyTorch failed ({error}); restart Slicer and try again, or install it in "
                                 "the PyTorch Utils module.").format(error=_oneLine(error)), error=True)
                return False
            if torch is None:
                self.setStatus(_("PyTorch was not installed, so SSAM Segment cannot run."), error=True)
                return False
            if self.logic.missingRequirements(torchRequirements):
                self.setStatus(_("PyTorch {version} is installed but SSAM Segment needs {req}; update it in the "
                                 "PyTorch Utils module.").format(version=torchLogic.torch.__version__,
                                                                 req=", ".join(torchRequirements)), error=True)
                return False
        missing = self.logic.missingRequirements(otherRequirements)
        if not missing:
            return True
        packaging = getattr(slicer, "packaging", None)
        try:
            if packaging is not None and hasattr(packaging, "pip_ensure"):  # Slicer 5.12+: asks, installs, restarts
                packaging.pip_ensure(missing, requester="SSAM Segment")
            else:
                if not slicer.util.confirmOkCancelDisplay(
                        _("SSAM Segment needs these Python packages, which will be downloaded and installed now:\n\n"
                          "{packages}\n\nThis takes a few minutes.").format(packages="\n".join(missing)),
                        windowTitle=_("Install Python packages")):
                    self.setStatus(_("The Python packages were not installed, so SSAM Segment cannot run."), error=True)
                    return False
                with slicer.util.WaitCursor():
                    slicer.util.pip_install(missing)
        except Exception as error:  # declined in pip_ensure's dialog (RuntimeError), or pip failed
            self.setStatus(_("The Python packages were not installed ({error}).").format(error=_oneLine(error)),
                           error=True)
            return False
        still = self.logic.missingRequirements(otherRequirements)
        if still:
            self.setStatus(_("Still missing: {packages}; restart Slicer and try again.").format(
                packages=", ".join(still)), error=True)
            return False
        return True

    def ensureWeights(self, weightIds, continueWith) -> bool:
        """True when the weights are there; else ask, start the download and call `continueWith` after it."""
        missing = self.logic.missingWeights(weightIds)
        if not missing:
            return True
        sizes = ", ".join(f"{w.id} ({w.size / 1e6:.0f} MB, {w.license}, {w.homepage})" for w in missing)
        if not slicer.util.confirmOkCancelDisplay(
                _("This model needs weights that are not on this computer yet: {sizes}.\n\n"
                  "Download them now into {folder}? They are checked against their published checksum and kept "
                  "for later sessions.").format(sizes=sizes, folder=self.logic.cacheFolder()),
                windowTitle=_("Download model weights")):
            self.setStatus(_("Weights not downloaded; choose the default model or download them in Settings."),
                           error=True)
            return False
        self._afterDownload = (continueWith, [w.id for w in missing[1:]])
        self.startTask(self.logic.startDownload(missing[0].id), button="apply", label=_("Downloading {id}").format(
            id=missing[0].id))
        return False

    def onDownloadWeights(self) -> None:
        if self._running() or not self.ensureDependencies():
            return
        if self.ensureWeights(self.logic.baseWeights("sam_vit_b"), None):
            self.setStatus(_("SAM ViT-B weights are already in {folder}.").format(folder=self.logic.cacheFolder()))

    # --- segmenting -------------------------------------------------------------------------------------------

    def onApplyButton(self) -> None:
        if self._running("apply"):
            self._task.cancel()
            self.setStatus(_("Cancelling..."))
            self.ui.applyButton.enabled = False
            return
        volume = self.ui.inputVolumeSelector.currentNode()
        labels = SSAMSegmentLogic.parseLabels(self.ui.labelsLineEdit.text)
        if not volume or not labels or self._running():
            return
        if not self.ensureDependencies():
            return
        adapter = self.currentAdapter()
        try:
            weightIds = self.logic.weightsNeeded(adapter, labels)
        except Exception as error:
            self.setStatus(str(error), error=True)
            return
        if not self.ensureWeights(weightIds, self.onApplyButton):
            return
        try:
            task = self.logic.startSegmentation(volume, labels, adapter=adapter,
                                                axis=self.ui.axisComboBox.currentText,
                                                device=DEVICES.get(self.ui.deviceComboBox.currentText, "auto"),
                                                selfBox="auto" if self.ui.selfBoxCheckBox.checked else "off")
        except Exception as error:
            self.setStatus(str(error), error=True)
            return
        self.startTask(task, button="apply", label=_("Segmenting"), volume=volume,
                       segmentation=self.ui.outputSegmentationSelector.currentNode(),
                       replace=self.ui.replaceExistingCheckBox.checked)

    def startTask(self, task, button, label, **context) -> None:
        self._task = task
        self._taskContext = dict(context, button=button, label=label)
        bar = self.ui.trainingProgressBar if button == "train" else self.ui.progressBar
        bar.setRange(0, 1000)
        bar.value = 0
        bar.setFormat(f"{label} %p%")
        bar.show()
        self.setStatus(label + "...", training=button == "train")
        self._pollTimer.start()
        self.updateButtons()

    def onPoll(self) -> None:
        task = self._task
        if task is None:
            self._pollTimer.stop()
            return
        training = self._taskContext.get("button") == "train"
        for event in task.poll():
            kind = event.get("event")
            if kind == "progress":
                bar = self.ui.trainingProgressBar if training else self.ui.progressBar
                bar.value = int(1000 * max(0.0, min(1.0, float(event.get("fraction") or 0.0))))
                self.setStatus(f"{self._taskContext['label']}: {event.get('message', '')}", training=training)
            elif kind == "training":
                self.showTrainingProgress(event)
        if task.finished:
            self._pollTimer.stop()
            self._task = None
            try:
                self.finishTask(task)  # may start the next job (a second download)
            finally:
                task.cleanup()
                if self._task is None:
                    self.ui.progressBar.hide()
                    self.ui.trainingProgressBar.hide()
                self.updateButtons()

    def finishTask(self, task) -> None:
        context = self._taskContext
        training = context.get("button") == "train"
        if task.error is not None:
            self._afterDownload = None
            self.setStatus(task.error, error=not task.cancelled, training=training)
            return
        if task.kind == "download":
            continueWith, rest = self._afterDownload or (None, [])
            self._afterDownload = None
            if rest:
                self._afterDownload = (continueWith, rest[1:])
                self.startTask(self.logic.startDownload(rest[0]), button="apply",
                               label=_("Downloading {id}").format(id=rest[0]))
                return
            self.setStatus(_("Weights saved in {folder}.").format(folder=self.logic.cacheFolder()))
            if continueWith is not None:
                qt.QTimer.singleShot(0, continueWith)
        elif task.kind == "segmentation":
            try:
                segmentation, segmentIds, emptyLabels, summary = self.logic.finishSegmentation(
                    task, context["volume"], context.get("segmentation"), replaceExisting=context.get("replace", False))
            except Exception as error:  # the scene changed meanwhile (volume deleted...): nothing was written
                self.setStatus(str(error), error=True)
                return
            self.ui.outputSegmentationSelector.setCurrentNode(segmentation)
            slicer.util.setSliceViewerLayers(background=context["volume"])
            names = [segmentation.GetSegmentation().GetSegment(i).GetName() for i in segmentIds.values()]
            untaught = task.result.get("untaught_labels", [])
            warnings = task.result.get("warnings", [])
            self.setStatus(self.logic.segmentationMessage(names, segmentation.GetName(), emptyLabels, untaught,
                                                          task.result.get("notes", []), warnings,
                                                          task.result.get("other_kind_labels", []),
                                                          task.result.get("weak_labels", [])),
                           warning=bool(warnings))
            logging.info(f"SSAM Segment: {summary}")
        elif task.kind == "training":
            adapterPath = task.result.get("adapter_path")
            dice = task.result.get("val_dice") or {}
            diceText = ", ".join(f"{name} {value:.3f}" for name, value in dice.items() if value is not None)
            self.rememberAdapter(adapterPath)
            self.setStatus(_("Saved adapter {path}. Validation Dice: {dice}. It is now selected in Model.").format(
                path=adapterPath, dice=diceText or _("no validation cases")), training=True)

    # --- correcting -------------------------------------------------------------------------------------------

    def onRefineButton(self) -> None:
        """Correct the chosen segment here, in Slicer's process (one slice and its neighbours, seconds on a CPU);
        the progress callback keeps the interface live, so the button works as Cancel meanwhile."""
        import threading

        if self._refineCancel is not None:
            self._refineCancel.set()
            self.setStatus(_("Cancelling..."))
            return
        volume = self.ui.inputVolumeSelector.currentNode()
        segmentation = self.ui.refineSegmentSelector.currentNode()
        segmentId = self.ui.refineSegmentSelector.currentSegmentID()
        if not volume or not segmentation or not segmentId or not self.ensureDependencies():
            return
        self._refineCancel = threading.Event()
        self.updateButtons()
        self.ui.progressBar.setRange(0, 1000)
        self.ui.progressBar.value = 0
        self.ui.progressBar.setFormat(_("Correcting") + " %p%")
        self.ui.progressBar.show()

        def progress(fraction, message):
            self.ui.progressBar.value = int(1000 * max(0.0, min(1.0, fraction)))
            self.setStatus(_("Correcting: {message}").format(message=message))
            slicer.app.processEvents()

        try:
            refinement = self.logic.refine(
                volume, segmentation, segmentId, roiNode=self.ui.refineRoiSelector.currentNode(),
                pointsNode=self.ui.refinePointsSelector.currentNode(),
                negativePointsNode=self.ui.refineNegativePointsSelector.currentNode(),
                adapter=self.currentAdapter(), axis=self.ui.axisComboBox.currentText,
                device=DEVICES.get(self.ui.deviceComboBox.currentText, "auto"),
                useText=self.ui.refineUseTextCheckBox.checked,
                selfBox="auto" if self.ui.selfBoxCheckBox.checked else "off",
                saveState=lambda: self._saveStateForUndo(segmentation), progress=progress, cancel=self._refineCancel)
        except Exception as error:  # SSAMError, Cancelled: the segment was not touched
            self.setStatus(_oneLine(error), error=not isinstance(error, SSAMSegmentLogic.cancelledType()))
        else:
            name = segmentation.GetSegmentation().GetSegment(segmentId).GetName()
            from SSAMSegmentLib.inference.refinement import PROMPT_ALONE

            alone = " " + PROMPT_ALONE if refinement.fell_back else ""
            self.setStatus(_("Corrected {segment} on slices {slices}{alone}; Undo in the Segment Editor restores "
                             "it.").format(segment=name, slices=", ".join(str(k) for k in refinement.slices),
                                           alone=alone))
        finally:
            self._refineCancel = None
            self.ui.progressBar.hide()
            self.updateButtons()

    @staticmethod
    def _saveStateForUndo(segmentationNode) -> None:
        """Record the segmentation in the Segment Editor's own undo history, so its Undo reverts the correction."""
        editor = slicer.modules.segmenteditor.widgetRepresentation().self().editor
        editor.setSegmentationNode(segmentationNode)
        editor.saveStateForUndo()

    # --- fine-tuning ------------------------------------------------------------------------------------------

    def onTrainingSourceChanged(self, checked=None) -> None:
        fromFolder = self.ui.trainingFolderRadioButton.checked
        self.ui.trainingFolderPathLineEdit.enabled = fromFolder
        self.ui.trainingPairsListWidget.enabled = not fromFolder
        self.ui.trainingRefreshPairsToolButton.enabled = not fromFolder
        if not fromFolder:
            self.refreshScenePairs()

    def onTrainingFolderChanged(self, path) -> None:
        qt.QSettings().setValue(f"{SETTINGS}/lastTrainingFolder", path)

    def onTrainingSectionCollapsed(self, collapsed) -> None:
        if not collapsed and self.ui.trainingSceneRadioButton.checked:
            self.refreshScenePairs()

    def refreshScenePairs(self, checked=None) -> None:
        self._scenePairs = self.logic.scenePairs(slicer.mrmlScene)
        listWidget = self.ui.trainingPairsListWidget
        listWidget.clear()
        for volume, segmentation in self._scenePairs:
            names = [segmentation.GetSegmentation().GetNthSegment(n).GetName()
                     for n in range(segmentation.GetSegmentation().GetNumberOfSegments())]
            item = qt.QListWidgetItem(f"{volume.GetName()} + {segmentation.GetName()} ({', '.join(names)})")
            item.setFlags(item.flags() | qt.Qt.ItemIsUserCheckable)
            item.setCheckState(qt.Qt.Checked)
            listWidget.addItem(item)

    def onTrainButton(self) -> None:
        if self._running("train"):
            self._task.cancel()
            self.setStatus(_("Cancelling after the current step..."), training=True)
            self.ui.trainButton.enabled = False
            return
        if self._running() or not self.ensureDependencies():
            return
        base = SSAMSegmentLogic.TRAINING_BASES[self.ui.trainingBaseComboBox.currentIndex]
        if not self.ensureWeights(self.logic.baseWeights(base), self.onTrainButton):
            return
        labels = SSAMSegmentLogic.parseLabels(self.ui.trainingLabelsLineEdit.text) or None
        try:
            output = self.logic.newAdapterPath(self.ui.trainingAdapterNameLineEdit.text)
            if self.ui.trainingFolderRadioButton.checked:
                task = self.logic.startTraining(output, folder=self.ui.trainingFolderPathLineEdit.currentPath,
                                                base=base, labels=labels,
                                                budgetMinutes=self.ui.trainingBudgetSpinBox.value,
                                                device=DEVICES.get(self.ui.deviceComboBox.currentText, "auto"),
                                                startFromDefault=self.ui.trainingStartFromDefaultCheckBox.checked)
            else:
                listWidget = self.ui.trainingPairsListWidget
                pairs = [pair for row, pair in enumerate(self._scenePairs)
                         if listWidget.item(row).checkState() == qt.Qt.Checked]
                with slicer.util.WaitCursor():
                    task = self.logic.startTraining(output, pairs=pairs, base=base, labels=labels,
                                                    budgetMinutes=self.ui.trainingBudgetSpinBox.value,
                                                    device=DEVICES.get(self.ui.deviceComboBox.currentText, "auto"),
                                                    startFromDefault=self.ui.trainingStartFromDefaultCheckBox.checked)
        except Exception as error:
            self.setStatus(str(error), error=True, training=True)
            return
        table = self.ui.trainingTableWidget
        table.setRowCount(0)
        table.show()
        self.startTask(task, button="train", label=_("Training"))

    def showTrainingProgress(self, event) -> None:
        """One table row per validation (step, loss, validation Dice, expected finish); the progress bar counts
        optimizer steps (a time budget fixes their total after the first steps)."""
        values = SSAMSegmentLogic.trainingTableRow(event)
        if values is not None:
            table = self.ui.trainingTableWidget
            row = table.rowCount
            table.insertRow(row)
            for column, text in enumerate(values):
                table.setItem(row, column, qt.QTableWidgetItem(text))
            table.scrollToBottom()
        total = event.get("total_steps") or 0
        if total:
            bar = self.ui.trainingProgressBar
            bar.setRange(0, total)
            bar.value = min(total, event.get("step") or 0)
            bar.setFormat(_("Training: step %v of %m"))
        eta = event.get("eta_seconds")
        message = event.get("message") or ""
        if eta is not None:
            message += _(" (about {minutes:.0f} min left)").format(minutes=max(1.0, eta / 60.0))
        self.setStatus(message, training=True)

    # --- settings ---------------------------------------------------------------------------------------------

    def onCacheFolderChanged(self, path) -> None:
        qt.QSettings().setValue(f"{SETTINGS}/cacheFolder", path)
        if path:
            os.environ["SSAM_CACHE_DIR"] = path
        self.populateModels()

    def onDefaultDeviceChanged(self, index) -> None:
        qt.QSettings().setValue(f"{SETTINGS}/defaultDevice", self.ui.defaultDeviceComboBox.currentText)


#
# SSAMSegmentLogic
#


class SSAMSegmentLogic(ScriptedLoadableModuleLogic):
    """Segmenting volume nodes and training adapters, without Qt: for the panel, Python scripts and tests.

    Synchronous methods (`segment`, `train`) run in this process. `start...` methods run the work in a background
    process (SSAMSegmentLib.slicer.background_task) and return a task to poll; `finishSegmentation` writes its result.
    """

    DEFAULT_ADAPTER = "default"
    # The bases offered for training, in the order of the panel's choices (Resources/UI/SSAMSegment.ui); their
    # facts (weights, names) are the library's (SSAMSegmentLib/model/bases.py).
    TRAINING_BASES = ("litemedsam", "sam_vit_b")

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self._models = {}  # (adapter, base, device) -> loaded model, for the synchronous path

    def getParameterNode(self):
        return SSAMSegmentParameterNode(super().getParameterNode())

    # --- dependencies -----------------------------------------------------------------------------------------

    @staticmethod
    def pythonRequirements():
        """(torch requirements, other requirements) from the repository's pyproject.toml [project.dependencies]."""
        path = _shippedFile("pyproject.toml")
        if path is None:
            raise RuntimeError("pyproject.toml is missing from the SSAM Segment installation; reinstall the extension")
        packaging = getattr(slicer, "packaging", None)
        if packaging is not None and hasattr(packaging, "load_pyproject_dependencies"):
            requirements = [str(r) for r in packaging.load_pyproject_dependencies(path)]
        else:
            try:
                import tomllib
            except ModuleNotFoundError:  # Python < 3.11
                import pip._vendor.tomli as tomllib
            with open(path, "rb") as handle:
                requirements = list(tomllib.load(handle)["project"].get("dependencies", []))
        torch, other = [], []
        old_pydicom = SSAMSegmentLogic._bundledPydicomIsOld()
        for requirement in requirements:
            name = re.split(r"[\s<>=!~;\[]", requirement.strip(), maxsplit=1)[0].lower()
            if name in NEEDS_PYDICOM_3 and old_pydicom:
                continue
            (torch if name in TORCH_PACKAGES else other).append(requirement)
        return torch, other

    @staticmethod
    def _bundledPydicomIsOld() -> bool:
        """True when a pydicom older than 3 is installed (Slicer's own), which highdicom would replace."""
        import importlib.metadata

        try:
            return int(importlib.metadata.version("pydicom").split(".")[0]) < 3
        except (importlib.metadata.PackageNotFoundError, ValueError):
            return False

    @staticmethod
    def torchVersionRequirement(torchRequirements) -> Optional[str]:
        """The version range of torch (e.g. '>=2.1') for PyTorchUtilsLogic.installTorch, or None."""
        from packaging.requirements import Requirement

        for text in torchRequirements:
            requirement = Requirement(str(text))
            if requirement.name.lower() == "torch" and requirement.specifier:
                return str(requirement.specifier)
        return None

    @staticmethod
    def missingRequirements(requirements) -> List[str]:
        """The requirements not satisfied by the installed distributions (name and version range).

        A package Slicer bundles without pip metadata (it can be imported, but has no version to check) counts as
        present: installing it again from PyPI would shadow Slicer's own build.
        """
        import importlib.metadata
        import importlib.util

        from packaging.requirements import Requirement

        missing = []
        for text in requirements:
            requirement = Requirement(str(text))
            if requirement.marker is not None and not requirement.marker.evaluate():
                continue
            try:
                installed = importlib.metadata.version(requirement.name)
            except importlib.metadata.PackageNotFoundError:
                if importlib.util.find_spec(requirement.name.replace("-", "_")) is None:
                    missing.append(str(text))
                continue
            if requirement.specifier and not requirement.specifier.contains(installed, prereleases=True):
                missing.append(str(text))
        return missing

    # --- adapters, labels and weights -------------------------------------------------------------------------

    @staticmethod
    def parseLabels(text) -> List[str]:
        """'liver, spleen;kidney' -> ['liver', 'spleen', 'kidney'], as the command line reads --label (labels.py)."""
        from SSAMSegmentLib.model.labels import split_labels, unique

        return unique(split_labels(text))

    @staticmethod
    def segmentationMessage(segmentNames, nodeName, emptyLabels, untaughtLabels, notes=(), warnings=(),
                            otherKindLabels=(), weakLabels=()) -> str:
        """The status line after a segmentation: what was added, the empty segments said as their label allows
        (an untaught label's empty segment is "not found (untaught label)", one taught only on other kinds of image
        "not found (taught on other kinds of image)", one learnt poorly "not found (learnt poorly)", never absent),
        then the result's notes (a name read as a trained label) and warnings (labels never taught or taught on other
        images, with the fix)."""
        from SSAMSegmentLib.model.labels import empty_report

        message = _("Added {segments} to {node}.").format(segments=", ".join(segmentNames), node=nodeName)
        parts = (empty_report(emptyLabels, untaughtLabels, otherKindLabels, weakLabels)
                 + [f"note: {note}" for note in notes] + [f"warning: {warning}" for warning in warnings])
        for part in parts:
            message += f" {part[0].upper()}{part[1:]}."
        return message

    @staticmethod
    def cacheFolder() -> Path:
        from SSAMSegmentLib.model import weights

        return weights.cache_dir()

    def adaptersFolder(self) -> Path:
        """Where adapters trained in Slicer are saved: in the weights folder, outside the extension folder."""
        return self.cacheFolder() / "adapters"

    def newAdapterPath(self, name: str) -> Path:
        """The file for a new adapter called `name`; never an existing file (a trained adapter is not overwritten)."""
        from SSAMSegmentLib import SSAMError

        cleaned = re.sub(r"[^A-Za-z0-9._ -]+", "-", str(name or "")).strip(" .-")
        if not cleaned:
            raise SSAMError("give the new adapter a name (letters, digits, '-', '_'), e.g. my-liver-ct")
        path = self.adaptersFolder() / f"{cleaned}.adapter.safetensors"
        if path.exists():
            raise SSAMError(f"an adapter named '{cleaned}' already exists ({path}); choose another name")
        return path

    def adapterChoices(self, userAdapters=()) -> List[Path]:
        """Adapter files to offer: those saved in the adapters folder and those the user added, existing only.

        Before the Python packages are installed the adapters folder is not known yet: the user's files are listed.
        """
        try:
            folder = self.adaptersFolder()
            found = sorted(folder.glob("*.adapter.safetensors")) if folder.is_dir() else []
        except ImportError:
            found = []
        for path in userAdapters:
            path = Path(path)
            if path.is_file() and path not in found:
                found.append(path)
        return found

    def adapterInfo(self, adapter) -> dict:
        """{path, base, text_encoder, labels} of 'default' or an adapter file (reads only the file header)."""
        from SSAMSegmentLib.model.adapter import read_metadata
        from SSAMSegmentLib.model.loading import resolve_adapter

        path = resolve_adapter(adapter)
        metadata = read_metadata(path)
        return {"path": path, "base": metadata.get("base"), "text_encoder": metadata.get("text_encoder"),
                "labels": list(metadata.get("labels") or [])}

    def adapterTitle(self, path) -> str:
        """'my-liver (SAM ViT-B)' for the model list; the file name alone when the header cannot be read yet."""
        name = Path(path).name
        for suffix in (".adapter.safetensors", ".safetensors"):
            if name.endswith(suffix):
                name = name[: -len(suffix)]
                break
        try:
            base = self.adapterInfo(path)["base"]
        except Exception:
            return name
        try:  # the base's short name is the library's (it needs PyTorch; without it the id is shown)
            from SSAMSegmentLib.model.bases import get_base

            base = get_base(base).display_name
        except Exception:
            pass
        return f"{name} ({base})"

    def weightsNeeded(self, adapter, labels) -> List[str]:
        """Ids of the downloadable weight files segmenting `labels` with `adapter` needs (present or not)."""
        from SSAMSegmentLib.model.loading import required_weights

        info = self.adapterInfo(adapter)
        return required_weights(info["base"], info["text_encoder"], labels, info["labels"])

    @staticmethod
    def baseWeights(base) -> List[str]:
        """Ids of the downloadable weight files training on `base` needs (present or not)."""
        from SSAMSegmentLib.model.loading import required_weights

        return required_weights(base)

    @staticmethod
    def missingWeights(weightIds) -> list:
        """The WeightFile entries of `weightIds` not yet in the cache (download them after the user agreed)."""
        from SSAMSegmentLib.model import weights

        return [weights.WEIGHT_FILES[w] for w in weightIds if not weights.cached_path(weights.WEIGHT_FILES[w]).is_file()]

    def startDownload(self, weightId):
        from SSAMSegmentLib.slicer import background_task

        return background_task.start_download(weightId)

    # --- segmenting -------------------------------------------------------------------------------------------

    def _model(self, adapter, base, device, precision):
        import SSAMSegmentLib

        key = (str(adapter), base, device, precision)
        if key not in self._models:
            self._models.clear()  # one model in memory at a time
            self._models[key] = SSAMSegmentLib.load(base=base, adapter=adapter, device=device, merge=True,
                                                    precision=precision)
        return self._models[key]

    def segment(self, volumeNode, labels, segmentationNode=None, adapter="default", axis="auto", device="auto",
                replaceExisting=False, base=None, progress=None, cancel=None, precision="auto", selfBox="auto"):
        """Segment `labels` in `volumeNode` here and now; return (segmentation node, {label: segment ID}, result).

        `progress(fraction, message)` and `cancel.is_set()` are passed to the model; a cancelled or failed run
        leaves the scene as it was. `precision`: "auto" (bf16 where the hardware computes it natively), "float32" or
        "bf16" (SSAMSegmentLib.model.devices.PRECISIONS). `selfBox`: "auto" (the labels the adapter chose are
        redrawn from their own box, SSAMSegmentLib/inference/self_box.py) or "off" (text masks alone, faster).
        """
        from SSAMSegmentLib.slicer.scene_nodes import image_from_volume_node

        image = image_from_volume_node(volumeNode)
        result = self._model(adapter, base, device, precision).segment(image, labels, axis=axis, progress=progress,
                                                                       cancel=cancel, self_box=selfBox)
        segmentation, segmentIds = self.writeMasks(result.masks, volumeNode, segmentationNode, replaceExisting, image)
        self.tagConfidence(segmentation, segmentIds, {label: result.confidence(label) for label in result.masks},
                           {label: result.slices_to_check(label) for label in result.masks})
        return segmentation, segmentIds, result

    @staticmethod
    def cancelledType():
        from SSAMSegmentLib import Cancelled

        return Cancelled

    @staticmethod
    def tagConfidence(segmentationNode, segmentIds, confidence, checkSlices):
        from SSAMSegmentLib.slicer.scene_nodes import tag_confidence

        for label, segmentId in segmentIds.items():
            tag_confidence(segmentationNode, segmentId, confidence.get(label), checkSlices.get(label, ()))

    def refine(self, volumeNode, segmentationNode, segmentId, roiNode=None, pointsNode=None, negativePointsNode=None,
               adapter="default", axis="auto", device="auto", base=None, useText=True, saveState=None,
               progress=None, cancel=None, precision="auto", selfBox="auto"):
        """Correct one segment with a Markups ROI and/or point lists placed on the volume (inference/refinement.py):
        the prompted slice is decoded again with the segment's name as text, the correction carried to its
        neighbours (and, for a label the adapter redraws from its own box, `selfBox` "auto", redrawn so on those
        slices). Only that segment changes, only on the slices returned; `saveState()` is called just before the
        change (the segment editor's saveStateForUndo, so its Undo brings the segment back). A cancelled or failed
        run leaves the node unchanged. Returns the Refinement."""
        from SSAMSegmentLib import SSAMError
        from SSAMSegmentLib.inference.slice_inference import CHECK_BELOW
        from SSAMSegmentLib.slicer.scene_nodes import (image_from_volume_node, markups_prompt, replace_segment_mask,
                                                       segment_masks, tag_confidence)

        segment = segmentationNode.GetSegmentation().GetSegment(segmentId)
        if segment is None:
            raise SSAMError(f"choose a segment of '{segmentationNode.GetName()}' to correct")
        prompt = markups_prompt(volumeNode, roiNode, pointsNode, negativePointsNode)
        image = image_from_volume_node(volumeNode)
        current = segment_masks(segmentationNode, volumeNode, [segmentId])[segment.GetName()]
        model = self._model(adapter, base, device, precision)
        refinement = model.refine(image, segment.GetName(), current, box=prompt.box, points=prompt.points,
                                  negative_points=prompt.negative_points, axis=axis, use_text=useText,
                                  self_box=selfBox, progress=progress, cancel=cancel)
        replace_segment_mask(segmentationNode, volumeNode, segmentId, refinement.mask, image, save_state=saveState)
        scores = list(refinement.confidence.values())
        tag_confidence(segmentationNode, segmentId, sum(scores) / len(scores) if scores else None,
                       [k for k, score in refinement.confidence.items() if score < CHECK_BELOW])
        return refinement

    def startSegmentation(self, volumeNode, labels, adapter="default", axis="auto", device="auto", base=None,
                          python=None, precision="auto", selfBox="auto"):
        """Start segmenting in a background process; poll the task, then call `finishSegmentation`."""
        from SSAMSegmentLib.slicer import background_task
        from SSAMSegmentLib.slicer.scene_nodes import image_from_volume_node, volume_grid

        image = image_from_volume_node(volumeNode)
        task = background_task.start_segmentation(image, labels, adapter=adapter, base=base, device=device, axis=axis,
                                                  precision=precision, self_box=selfBox, python=python)
        task.context.update(image=image, grid=volume_grid(volumeNode))
        return task

    def finishSegmentation(self, task, volumeNode, segmentationNode=None, replaceExisting=False):
        """Write a finished background segmentation: (segmentation node, {label: segment ID}, empty labels, summary).

        Refused (nothing written) when the volume or the output segmentation changed or went away meanwhile.
        """
        from SSAMSegmentLib import SSAMError
        from SSAMSegmentLib.slicer import background_task
        from SSAMSegmentLib.slicer.scene_nodes import volume_grid

        if volumeNode.GetScene() is None or ("grid" in task.context and volume_grid(volumeNode) != task.context["grid"]):
            raise SSAMError(f"volume '{volumeNode.GetName()}' was changed or removed while it was being segmented; "
                            f"nothing was written, run the segmentation again")
        masks = background_task.segmentation_masks(task)
        segmentation, segmentIds = self.writeMasks(masks, volumeNode, segmentationNode, replaceExisting,
                                                   task.context.get("image"))
        self.tagConfidence(segmentation, segmentIds, task.result.get("confidence", {}),
                           task.result.get("check_slices", {}))
        return segmentation, segmentIds, list(task.result.get("empty_labels", [])), task.result.get("summary", "")

    def writeMasks(self, masks, volumeNode, segmentationNode=None, replaceExisting=False, image=None):
        """One segment per mask into `segmentationNode`, or into a new segmentation next to the volume."""
        from SSAMSegmentLib import SSAMError
        from SSAMSegmentLib.slicer.scene_nodes import new_segmentation_node, write_segments

        if segmentationNode is not None and segmentationNode.GetScene() is None:
            raise SSAMError(f"segmentation '{segmentationNode.GetName()}' is no longer in the scene; "
                            f"choose another output segmentation")
        created = segmentationNode is None
        if created:
            segmentationNode = new_segmentation_node(volumeNode)
        try:
            segmentIds = write_segments(masks, segmentationNode, volumeNode, replace_existing=replaceExisting,
                                        image=image)
        except BaseException:
            if created:  # no empty segmentation left behind
                scene = segmentationNode.GetScene()
                scene.RemoveNode(segmentationNode.GetDisplayNode())
                scene.RemoveNode(segmentationNode)
            raise
        return segmentationNode, segmentIds

    # --- fine-tuning ------------------------------------------------------------------------------------------

    @staticmethod
    def scenePairs(scene):
        from SSAMSegmentLib.slicer.scene_nodes import scene_training_pairs

        return scene_training_pairs(scene)

    @staticmethod
    def trainingCases(pairs, labels=None):
        """(case_id, image, OrderedDict[name, mask]) per (volume, segmentation) pair, for datasets.memory_dataset."""
        from SSAMSegmentLib import SSAMError
        from SSAMSegmentLib.slicer.scene_nodes import training_case

        if not pairs:
            raise SSAMError("no volume with a segmentation is selected; draw segmentations on volumes first "
                            "(their segment names are the labels)")
        cases = [training_case(volume, segmentation, labels) for volume, segmentation in pairs]
        empty = [case_id for case_id, _image, masks in cases if not masks]
        if len(empty) == len(cases):
            raise SSAMError(f"none of the segmentations has a segment named {', '.join(labels or [])}; "
                            f"check the names or leave Labels empty")
        return [case for case in cases if case[2]]

    @staticmethod
    def trainingBudgetHelp() -> str:
        """The time budget's tooltip, with the default recipe's numbers read from the library."""
        from SSAMSegmentLib.training.recipe import DEFAULT_PATIENCE, DEFAULT_STEPS
        from SSAMSegmentLib.training.schedule import VALIDATIONS_PER_RUN, WARMUP_SHARE

        text = _("Minutes the training steps and validations may take (preparing the data comes before): the "
                 "first steps are timed, then the total number of steps is fixed so that warm-up and decay end in "
                 "time. 0: no budget, the default recipe of {steps} optimizer steps ({warmup:.0%} warm-up, then "
                 "cosine decay; {validations} validations, the best adapter kept; a stop after {patience} "
                 "validations without progress), as ssam train does without options.")
        return text.format(steps=DEFAULT_STEPS, warmup=WARMUP_SHARE, validations=VALIDATIONS_PER_RUN,
                           patience=DEFAULT_PATIENCE)

    @staticmethod
    def trainingBudget(budgetMinutes) -> Optional[float]:
        """The panel's time budget as TrainingConfig.budget_minutes: 0 or empty means none (the default recipe)."""
        from SSAMSegmentLib import SSAMError

        text = str(budgetMinutes).strip() if budgetMinutes is not None else ""
        try:
            minutes = float(text) if text else 0.0
        except ValueError:
            minutes = float("nan")
        if not 0 <= minutes < float("inf"):  # also NaN
            raise SSAMError(f"time budget '{budgetMinutes}' must be a number of minutes, 0 or more; give e.g. 30, "
                            f"or 0 for the default recipe's steps")
        return minutes or None

    @staticmethod
    def trainingConfig(output, folder=None, base=None, labels=None, budgetMinutes=None, device="auto",
                       startFromDefault=False, **extra) -> dict:
        """TrainingConfig fields as a plain dict (it travels to the background process as JSON): the library's
        default recipe (recipe.py), fitted to `budgetMinutes` when given; base None: the library's default base;
        `startFromDefault`: train on from the shipped adapter. `extra` are further TrainingConfig fields (scripts and
        tests: steps=, batch_size=...)."""
        from SSAMSegmentLib import SSAMError
        from SSAMSegmentLib.model.loading import DEFAULT_BASE

        base = base or DEFAULT_BASE

        if folder is not None and (not str(folder).strip() or not Path(folder).is_dir()):
            raise SSAMError(f"dataset folder '{folder}' does not exist; choose the folder with the training images")
        config = {"output": str(output), "base": base, "labels": list(labels) if labels else None,
                  "budget_minutes": SSAMSegmentLogic.trainingBudget(budgetMinutes), "device": device,
                  "start_from": "default" if startFromDefault else None}
        if folder is not None:
            config["data"] = str(folder)
        config.update(extra)
        return config

    def train(self, output, folder=None, pairs=None, base=None, labels=None, budgetMinutes=None, device="auto",
              progress=None, cancel=None, startFromDefault=False, **extra):
        """Train an adapter here and now from a dataset folder or scene pairs; return the TrainingResult."""
        import SSAMSegmentLib
        from SSAMSegmentLib.training import datasets

        config = self.trainingConfig(output, folder, base, labels, budgetMinutes, device, startFromDefault, **extra)
        if pairs is not None:
            config["data"] = datasets.memory_dataset(self.trainingCases(pairs, labels))
        return SSAMSegmentLib.train(SSAMSegmentLib.TrainingConfig(**config), progress=progress, cancel=cancel)

    def startTraining(self, output, folder=None, pairs=None, base=None, labels=None, budgetMinutes=None,
                      device="auto", python=None, startFromDefault=False, **extra):
        """Train in a background process; the task's 'training' events are the library's TrainingProgress fields
        (step, total_steps, loss, val_dice, finish_time, phase...)."""
        from SSAMSegmentLib.slicer import background_task

        config = self.trainingConfig(output, folder, base, labels, budgetMinutes, device, startFromDefault, **extra)
        cases = self.trainingCases(pairs, labels) if pairs is not None else None
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        return background_task.start_training(config, cases, python=python)

    @staticmethod
    def trainingTableRow(event) -> Optional[List[str]]:
        """The panel table's row for a 'training' event that reports a validation: step/total, loss since the last
        validation, mean validation Dice, expected finish (clock time); None for every other event."""
        import time

        if event.get("phase") != "validated":
            return None
        loss, dice, finish = event.get("loss"), event.get("val_dice"), event.get("finish_time")
        return [f"{event.get('step')}/{event.get('total_steps')}", "" if loss is None else f"{loss:.4f}",
                _("none") if dice is None else f"{dice:.3f}",
                "" if finish is None else time.strftime("%H:%M", time.localtime(finish))]


#
# SSAMSegmentTest
#


class SSAMSegmentTest(ScriptedLoadableModuleTest):
    """Self-tests in a real Slicer (Reload and Test, or ctest): Logic on synthetic and sample data, and the panel."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_logic_synthetic_volume()
        self.setUp()
        self.test_default_adapter_on_sample_volume()
        self.setUp()
        self.test_panel_apply_and_cancel()

    def _syntheticVolume(self):
        import numpy as np

        array = np.zeros((8, 64, 64), dtype=np.int16)
        array[:, 16:48, 20:44] = 200
        volume = slicer.util.addVolumeFromArray(array, np.diag([0.8, 0.8, 2.5, 1.0]), name="synthetic")
        return volume

    def test_logic_synthetic_volume(self):
        """Tiny random-weight model: the Logic writes named segments on the volume's grid, never overwriting."""
        self.delayDisplay("Logic on a synthetic volume")
        logic = SSAMSegmentLogic()
        volume = self._syntheticVolume()
        segmentation, ids, result = logic.segment(volume, ["liver", "spleen"], adapter=None, base="test-vit",
                                                  device="cpu")
        self.assertEqual([segmentation.GetSegmentation().GetSegment(i).GetName() for i in ids.values()],
                         ["liver", "spleen"])
        self.assertEqual(segmentation.GetNodeReference(
            slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole()), volume)
        again, ids2, _result = logic.segment(volume, ["liver"], segmentationNode=segmentation, adapter=None,
                                             base="test-vit", device="cpu")
        self.assertEqual(segmentation.GetSegmentation().GetSegment(ids2["liver"]).GetName(), "liver 2")
        self.delayDisplay("Logic test passed")

    def test_default_adapter_on_sample_volume(self):
        """The shipped adapter on Slicer's CTChest sample (downloaded by SampleData), first known label."""
        import SampleData

        self.delayDisplay("Default adapter on CTChest")
        logic = SSAMSegmentLogic()
        labels = logic.adapterInfo("default")["labels"]
        self.assertTrue(labels, "the default adapter knows no label")
        volume = SampleData.downloadSample("CTChest")
        task = logic.startSegmentation(volume, labels[:1])
        task.wait(timeout=1800)
        segmentation, ids, empty, summary = logic.finishSegmentation(task, volume)
        self.assertEqual(list(ids), labels[:1])
        self.assertNotIn("untaught", summary)  # the adapter's own label is taught
        self.assertEqual(segmentation.GetSegmentation().GetSegment(ids[labels[0]]).GetName(), labels[0])
        task.cleanup()
        self.delayDisplay(f"Default adapter test passed: {summary}")

    def test_panel_apply_and_cancel(self):
        """The panel: Apply turns into Cancel, Cancel stops the background process, the scene is unchanged."""
        import time

        self.delayDisplay("Panel: Apply and Cancel")
        volume = self._syntheticVolume()
        widget = slicer.modules.ssamsegment.widgetRepresentation().self()
        widget.ui.inputVolumeSelector.setCurrentNode(volume)
        widget.ui.labelsLineEdit.text = "liver"
        segmentations = slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode")
        widget.ui.applyButton.click()
        self.assertEqual(widget.ui.applyButton.text, "Cancel")
        widget.ui.applyButton.click()
        deadline = time.time() + 60
        while widget._task is not None and time.time() < deadline:
            slicer.app.processEvents()
            time.sleep(0.05)
        self.assertIsNone(widget._task)
        self.assertEqual(widget.ui.applyButton.text, "Apply")
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode"), segmentations)
        self.delayDisplay("Panel test passed")
