"""DiffusionSeg: few-shot CT organ segmentation on diffusion-pretrained features, inside 3D Slicer.

Module, parameter node, widget, logic and test in one file (Slicer's scripted module template). The logic has no
Qt: it converts MRML nodes through ``DiffusionSegLib.mrml`` and leaves all computing to DiffusionSegLib, run in a
background process (``Resources/Scripts/diffusionseg_job.py``) or in-process. Torch, MONAI and DiffusionSegLib
are imported lazily inside methods. The Qt/app imports are guarded so that the logic also loads in plain Python
with the ``slicer-core`` wheel (the real MRML scene without Qt), where the tests in ``Testing/slicer_module`` run it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from queue import Empty, Queue
from typing import Any, Callable

MODULE_DIR = Path(__file__).resolve().parent


def _ensureLibraryImportable() -> Path:
    """Make ``import DiffusionSegLib`` work: beside this file (extension build) or one folder up (source checkout)."""
    for root in (MODULE_DIR, MODULE_DIR.parent):
        if (root / "DiffusionSegLib" / "cli.py").is_file():
            if str(root) not in sys.path:
                sys.path.insert(0, str(root))
            return root
    return MODULE_DIR


LIBRARY_ROOT = _ensureLibraryImportable()  # only sys.path; nothing heavy is imported here

import slicer  # noqa: E402  (real Slicer, or the slicer-core wheel in tests)
import vtk  # noqa: E402

try:  # inside the Slicer application
    import ctk  # noqa: F401
    import qt
    from slicer.parameterNodeWrapper import parameterNodeWrapper
    from slicer.ScriptedLoadableModule import (
        ScriptedLoadableModule,
        ScriptedLoadableModuleLogic,
        ScriptedLoadableModuleTest,
        ScriptedLoadableModuleWidget,
    )
    from slicer.util import VTKObservationMixin

    HAVE_SLICER_APP = True
except ImportError:  # plain Python + slicer-core: no Qt, no application; only the logic is usable
    HAVE_SLICER_APP = False

    class ScriptedLoadableModule:  # type: ignore[no-redef]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            pass

    class ScriptedLoadableModuleWidget(ScriptedLoadableModule):  # type: ignore[no-redef]
        pass

    class ScriptedLoadableModuleLogic(ScriptedLoadableModule):  # type: ignore[no-redef]
        pass

    class ScriptedLoadableModuleTest(ScriptedLoadableModule):  # type: ignore[no-redef]
        pass

    class VTKObservationMixin:  # type: ignore[no-redef]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            pass

    def parameterNodeWrapper(cls):  # type: ignore[no-redef]
        return cls


log = logging.getLogger("DiffusionSeg")

JOB_SCRIPT = MODULE_DIR / "Resources" / "Scripts" / "diffusionseg_job.py"
FIELD_OF_VIEW_ATTRIBUTE = "DiffusionSeg.FieldOfView"
"""Segmentation node attribute: what the scan covers and which organs lie outside it (empty when unknown)."""
NOT_FOUND_ATTRIBUTE = "DiffusionSeg.NotFound"
"""Segmentation node attribute: the model's organs (in view) that the scan showed none of (empty: all found)."""
COHORT_FUSION_ATTRIBUTE = "DiffusionSeg.CohortFusion"
"""Segmentation node attribute: for a scan of the model's training cohort, that the network was fused with its
registrations, and the network's weight (empty: the network alone)."""
REQUIREMENTS_FILE = MODULE_DIR / "Resources" / "requirements.txt"
COHORT_REQUIREMENTS_FILE = MODULE_DIR / "Resources" / "requirements-cohort.txt"
"""Needed only to learn from unlabeled volumes (registration): asked for when such volumes are checked."""
PROGRESS_PREFIX, RESULT_PREFIX, ERROR_PREFIX = "DIFFUSIONSEG_PROGRESS", "DIFFUSIONSEG_RESULT", "DIFFUSIONSEG_ERROR"
ORIENTATION_PREFIX = "DIFFUSIONSEG_ORIENTATION"


class OrientationRefused(RuntimeError):
    """A background job refused its volume: the anatomy says ``axes`` are mirrored against the volume's geometry;
    the module offers to segment it again with ``orientation="fix"``."""

    def __init__(self, message: str, axes: list[str]) -> None:
        super().__init__(message)
        self.axes = list(axes)
IMPORT_NAMES = {"scikit-image": "skimage", "pyyaml": "yaml", "antspyx": "ants"}  # pip name -> import name where they differ


#
# Slicer-independent helpers (no Qt, no torch)
#


def userProbeFolder() -> Path:
    """Where trained probes are kept: ``$DIFFUSIONSEG_PROBES``, else ``<Slicer settings>/DiffusionSeg/probes``
    inside Slicer, else ``~/.diffusionseg/probes``."""
    if os.environ.get("DIFFUSIONSEG_PROBES"):
        return Path(os.environ["DIFFUSIONSEG_PROBES"])
    app = getattr(slicer, "app", None)
    if app is not None and hasattr(app, "slicerUserSettingsFilePath"):
        return Path(app.slicerUserSettingsFilePath).parent / "DiffusionSeg" / "probes"
    return Path.home() / ".diffusionseg" / "probes"


def readWeightsMetadata(path: str | os.PathLike) -> dict:
    """The metadata of a DiffusionSeg ``.safetensors`` file (``kind``, ``config`` decoded), read from its JSON
    header without torch. Returns ``{}`` for a file that is not one."""
    from DiffusionSegLib.checkpoint import read_weights_header
    from DiffusionSegLib.errors import UserInputError

    try:
        config, metadata = read_weights_header(path)
    except UserInputError:
        return {}
    return dict(metadata, config=config)


def parseProgressLine(line: str) -> tuple[float, str] | None:
    """``(fraction, message)`` of a ``DIFFUSIONSEG_PROGRESS <fraction> <message>`` line, else None."""
    parts = line.strip().split(" ", 2)
    if len(parts) < 2 or parts[0] != PROGRESS_PREFIX:
        return None
    try:
        fraction = min(max(float(parts[1]), 0.0), 1.0)
    except ValueError:
        return None
    return fraction, parts[2] if len(parts) > 2 else ""


def missingRequirements(requirementsFile: Path = REQUIREMENTS_FILE) -> list[str]:
    """Requirement lines of ``requirements.txt`` whose package cannot be imported."""
    import importlib.util
    import re

    missing = []
    for line in requirementsFile.read_text().splitlines():
        requirement = line.split("#", 1)[0].strip()
        if not requirement:
            continue
        name = re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].strip().lower()
        if importlib.util.find_spec(IMPORT_NAMES.get(name, name.replace("-", "_"))) is None:
            missing.append(requirement)
    return missing


def pythonExecutable() -> str:
    """PythonSlicer inside Slicer (Slicer's Python with its environment), else this interpreter."""
    return shutil.which("PythonSlicer") or sys.executable


class BackgroundProcess:
    """A child process whose stdout lines are read by a thread into a queue; cancel kills its whole tree.

    No Qt: the widget polls :meth:`readLines` from a ``qt.QTimer`` (SlicerMONAIAuto3DSeg's ``process.py`` pattern).
    """

    def __init__(self, argv: list[str], env: dict[str, str] | None = None) -> None:
        self.argv, self.lines, self.cancelled = argv, Queue(), False
        options: dict[str, Any] = {"start_new_session": True} if os.name != "nt" else {
            "creationflags": subprocess.CREATE_NEW_PROCESS_GROUP}  # type: ignore[attr-defined]
        self.process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                                        env=env, encoding="utf-8", errors="replace", **options)  # fmt: skip
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        for line in self.process.stdout:  # type: ignore[union-attr]
            self.lines.put(line.rstrip("\n"))
        self.process.stdout.close()  # type: ignore[union-attr]

    def readLines(self) -> list[str]:
        lines = []
        while True:
            try:
                lines.append(self.lines.get_nowait())
            except Empty:
                return lines

    def isRunning(self) -> bool:
        return self.process.poll() is None or self.thread.is_alive()

    @property
    def returnCode(self) -> int | None:
        return self.process.poll()

    def wait(self, timeout: float | None = None) -> int:
        code = self.process.wait(timeout)
        self.thread.join(timeout)
        return code

    def requestStop(self) -> None:
        """Ask the job to stop by itself (SIGTERM to the job only): a fine-tune then writes its best model so far
        and exits normally. Where there is no such signal (Windows), the process tree is killed."""
        if self.process.poll() is not None:
            return
        if os.name == "nt":
            self.cancel()
        else:
            self.process.send_signal(signal.SIGTERM)

    def cancel(self) -> None:
        """Kill the process and everything it started."""
        self.cancelled = True
        if self.process.poll() is not None:
            pass
        elif os.name == "nt":
            subprocess.run(["taskkill", "/F", "/T", "/PID", str(self.process.pid)], capture_output=True, check=False)
        else:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
                self.process.wait(3)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.process.wait()
        self.thread.join(5)


@dataclass
class DiffusionSegTask:
    """One job: the job dict for the script, its temporary folder, and how its output files become the result."""

    kind: str
    job: dict
    tempDir: Path
    finish: Callable[[dict], Any]
    device: str = "cpu"
    process: BackgroundProcess | None = None
    output: list[str] = field(default_factory=list)


@dataclass
class SegmentedVolumes:
    """The result of segmenting several volumes: the new (or chosen) segmentation nodes, in the volumes' order, and
    ``(volume node, reason)`` for each volume that was not segmented."""

    segmentations: list = field(default_factory=list)
    failed: list = field(default_factory=list)

    def summary(self) -> str:
        text = f"{len(self.segmentations)} of {len(self.segmentations) + len(self.failed)} volumes segmented"
        return text + "".join(f"; {node.GetName()} not segmented: {reason}" for node, reason in self.failed)


#
# DiffusionSeg
#


class DiffusionSeg(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "DiffusionSeg"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["DiffusionSeg contributors"]
        self.parent.helpText = """
Few-shot CT organ segmentation on the features of a 3D denoising diffusion network pretrained with anatomical
(Body Part Regression) coordinates.
<ul>
<li><b>Segment</b>: pick a CT and a probe; the organs appear as a new segmentation (one named, coloured segment
per organ). Choose an existing segmentation as output to overwrite it; otherwise nothing is overwritten. Check
more volumes under "Also segment" to segment them all in one background job (the models load once, one Cancel
stops it); a volume that cannot be segmented is named in the status line and the others go on.</li>
<li><b>Show coordinates</b>: dense anatomical coordinates of every voxel as a 3-component volume (RGB = x R-L,
y A-P, z I-S, in mm-equivalent units).</li>
<li><b>Train probe</b>: segment a few organs in one or more CTs with the Segment Editor, check those
segmentations and train; segment names become the probe's classes (same name = same organ). The probe is saved
in your probe folder and selected.</li>
</ul>
Work runs in a background process with a progress bar and Cancel; "CPU" forces the CPU. Torch comes from the
PyTorch extension; the other packages are installed on first use after you agree.
Headless pretraining: <code>Slicer --no-main-window --python-script pretrain.py -- --config
configs/pretrain_cpu_small.toml</code> (or <code>python pretrain.py -- ...</code>).
"""
        self.parent.acknowledgementText = """
Implements the method of "Medical Semantic Segmentation with Diffusion Pretrain" (Li, Kurmukov, Goncharov, Sokolov,
Belyaev, 2025). Built on 3D Slicer, PyTorch and MONAI.
"""


#
# DiffusionSegParameterNode
#

if HAVE_SLICER_APP:
    from typing import Annotated

    from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode, vtkMRMLVectorVolumeNode
    from slicer.parameterNodeWrapper import WithinRange

    @parameterNodeWrapper
    class DiffusionSegParameterNode:
        """The module's state, saved with the scene (``SlicerParameterName`` properties in the .ui bind it)."""

        inputVolume: vtkMRMLScalarVolumeNode
        outputSegmentation: vtkMRMLSegmentationNode
        coordinatesVolume: vtkMRMLVectorVolumeNode
        backbonePath: str = ""
        device: str = "CPU"
        probeName: str = "my-probe"
        headType: str = "nonlinear"
        trainingSteps: Annotated[int, WithinRange(10, 5000)] = 300
        finetuneMinutes: Annotated[float, WithinRange(1.0, 600.0)] = 15.0


#
# DiffusionSegWidget
#


class DiffusionSegWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Thin GUI: reads and writes the parameter node, calls the logic, polls the background job."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self.task: DiffusionSegTask | None = None
        self.timer = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/DiffusionSeg.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = DiffusionSegLogic()
        self.timer = qt.QTimer()
        self.timer.setInterval(200)
        self.timer.connect("timeout()", self.onPollTask)
        self.ui.progressBar.setVisible(False)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.segmentButton.connect("clicked(bool)", self.onSegmentButton)
        self.ui.showCoordinatesButton.connect("clicked(bool)", self.onShowCoordinatesButton)
        self.ui.trainProbeButton.connect("clicked(bool)", self.onTrainProbeButton)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancelButton)
        self.ui.refreshProbesButton.connect("clicked(bool)", lambda checked: self.refreshProbes())
        self.ui.loadProbeButton.connect("clicked(bool)", self.onLoadProbeButton)
        self.ui.saveProbeButton.connect("clicked(bool)", self.onSaveProbeButton)
        self.ui.probeSelector.connect("currentIndexChanged(int)", lambda index: self._updateButtons())
        self.ui.trainingSegmentationsSelector.connect("checkedNodesChanged()", self._updateButtons)
        self.ui.trainingSegmentationsSelector.connect("checkedNodesChanged()", self._preselectUnlabeled)
        self.refreshProbes()
        self.initializeParameterNode()

    def _preselectUnlabeled(self) -> None:
        """Check the scene's other volumes as the unlabeled cohort (the user can uncheck any)."""
        segmentations = list(self.ui.trainingSegmentationsSelector.checkedNodes())
        volumes = list(self.ui.trainingVolumesSelector.checkedNodes())
        candidates = {id(n) for n in self.logic.unlabeledCandidates(volumes, segmentations)}
        selector = self.ui.unlabeledVolumesSelector
        for i in range(selector.nodeCount()):
            node = selector.nodeFromIndex(i)
            selector.setCheckState(node, qt.Qt.Checked if id(node) in candidates else qt.Qt.Unchecked)

    def cleanup(self) -> None:
        self.onCancelButton()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            firstVolumeNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolumeNode:
                self._parameterNode.inputVolume = firstVolumeNode

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)
            self._updateButtons()

    def _updateButtons(self, caller=None, event=None) -> None:
        busy = self.task is not None
        hasInput = bool(self._parameterNode and self._parameterNode.inputVolume)
        self.ui.segmentButton.enabled = not busy and hasInput and self.ui.probeSelector.currentData is not None
        self.ui.showCoordinatesButton.enabled = not busy and hasInput
        self.ui.trainProbeButton.enabled = not busy and bool(self.ui.trainingSegmentationsSelector.checkedNodes())
        self.ui.saveProbeButton.enabled = self.ui.probeSelector.currentData is not None
        self.ui.cancelButton.enabled = busy

    def refreshProbes(self, selectPath: str | None = None) -> None:
        current = selectPath or self.ui.probeSelector.currentData
        self.ui.probeSelector.clear()
        for probe in self.logic.listProbes():
            organs = ", ".join(probe["organs"][:6]) + (" ..." if len(probe["organs"]) > 6 else "")
            self.ui.probeSelector.addItem(f"{probe['name']} ({organs})", probe["path"])
        index = self.ui.probeSelector.findData(current) if current else -1
        self.ui.probeSelector.setCurrentIndex(max(index, 0) if self.ui.probeSelector.count else -1)
        self._updateButtons()

    def _ensureDependencies(self, cohort: bool = False) -> bool:
        """Torch through the PyTorch extension, the rest by pip, each after the user agrees (with ``cohort``, the
        registration package too)."""
        import importlib.util

        if importlib.util.find_spec("torch") is None:
            try:
                import PyTorchUtils
            except ImportError:
                slicer.util.errorDisplay("DiffusionSeg needs PyTorch: install the 'PyTorch' extension from the "
                                         "Extensions Manager, restart Slicer and try again.")  # fmt: skip
                return False
            if PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=True) is None:
                slicer.util.errorDisplay("PyTorch is required and was not installed.")
                return False
        missing = missingRequirements() + (missingRequirements(COHORT_REQUIREMENTS_FILE) if cohort else [])
        if missing:
            if not slicer.util.confirmOkCancelDisplay(f"DiffusionSeg needs these Python packages: {', '.join(missing)}"
                                                      ". Install them now (a few minutes)?"):  # fmt: skip
                slicer.util.errorDisplay(f"Missing Python packages: {', '.join(missing)}.")
                return False
            with slicer.util.WaitCursor():
                slicer.util.pip_install(missing)
        return True

    def _start(self, prepare: Callable[[], DiffusionSegTask], cohort: bool = False) -> None:
        if not self._ensureDependencies(cohort):
            return
        with slicer.util.tryWithErrorDisplay("DiffusionSeg could not start.", waitCursor=True):
            self.task = prepare()
            self.logic.start(self.task)
            self.ui.progressBar.setValue(0)
            self.ui.progressBar.setVisible(True)
            self.ui.statusLabel.text = f"{self.task.kind}: starting..."
            self.timer.start()
        self._updateButtons()

    def _device(self) -> str:
        return "gpu" if self._parameterNode.device.upper() == "GPU" else "cpu"

    def onSegmentButton(self) -> None:
        p = self._parameterNode
        volumes = [p.inputVolume] + [node for node in self.ui.additionalVolumesSelector.checkedNodes()
                                     if node is not p.inputVolume]  # fmt: skip
        if len(volumes) > 1:  # one job, one Cancel: the models load once
            self._start(lambda: self.logic.prepareSegmentVolumes(volumes, self.ui.probeSelector.currentData,
                                                                 p.backbonePath or None, p.outputSegmentation,
                                                                 self._device()))  # fmt: skip
            return
        self._start(lambda: self.logic.prepareSegment(p.inputVolume, self.ui.probeSelector.currentData,
                                                      p.backbonePath or None, p.outputSegmentation,
                                                      self._device()))  # fmt: skip

    def onShowCoordinatesButton(self) -> None:
        p = self._parameterNode
        self._start(lambda: self.logic.prepareCoordinates(p.inputVolume, p.coordinatesVolume, device=self._device()))

    def onTrainProbeButton(self) -> None:
        p = self._parameterNode
        segmentations = list(self.ui.trainingSegmentationsSelector.checkedNodes())
        volumes = self.logic.pairVolumes(segmentations, list(self.ui.trainingVolumesSelector.checkedNodes()))
        name = (p.probeName or "my-probe").strip()
        outputPath = self.logic.newProbePath(name)
        if p.headType == "finetune":
            unlabeled = list(self.ui.unlabeledVolumesSelector.checkedNodes())
            self._start(lambda: self.logic.prepareFinetune(volumes, segmentations, outputPath, p.finetuneMinutes,
                                                           backbonePath=p.backbonePath or None,
                                                           device=self._device(),
                                                           unlabeledVolumeNodes=unlabeled), cohort=bool(unlabeled))  # fmt: skip
            return
        self._start(lambda: self.logic.prepareTrainProbe(volumes, segmentations, outputPath, p.headType,
                                                         steps=p.trainingSteps, backbonePath=p.backbonePath or None,
                                                         device=self._device()))  # fmt: skip

    def onCancelButton(self) -> None:
        if self.task is not None and self.task.kind == "finetune":  # keeps the best model so far
            self.logic.requestStop(self.task)
            self.ui.statusLabel.text = "finetune: stopping after this step; the best model so far is kept"
        elif self.task is not None:
            self.logic.cancel(self.task)
            self._done("Cancelled; the scene is unchanged.")

    def onPollTask(self) -> None:
        task = self.task
        if task is None:
            return
        for fraction, message in self.logic.poll(task):
            self.ui.progressBar.setValue(int(100 * fraction))
            self.ui.statusLabel.text = f"{task.kind}: {message}"
        if task.process is not None and task.process.isRunning():
            return
        try:
            result = self.logic.complete(task)
        except OrientationRefused as error:  # the status line says why; a dialog offers the fix
            self._done(f"{task.kind} refused: {error}")
            self._offerOrientationFix(error)
            return
        except Exception as error:  # shown to the user; the scene is unchanged
            self._done(f"{task.kind} failed: {error}")
            slicer.util.errorDisplay(f"DiffusionSeg {task.kind} failed:\n{error}")
            return
        # The result is not made the next run's output: a later Segment (or Show coordinates) makes a new node
        # again, so a result the user has since edited, or trains from, is never replaced unless chosen.
        if task.kind == "segment":
            result.CreateClosedSurfaceRepresentation()
            notes = [n for n in (result.GetAttribute(FIELD_OF_VIEW_ATTRIBUTE), result.GetAttribute(NOT_FOUND_ATTRIBUTE),
                                 result.GetAttribute(COHORT_FUSION_ATTRIBUTE)) if n]  # fmt: skip
            if notes:
                self._done(f"segment: done; {'; '.join(notes)}.")
                return
        elif task.kind == "segment-many":
            for node in result.segmentations:
                node.CreateClosedSurfaceRepresentation()
            self._done(f"segment: {result.summary()}.")
            return
        elif task.kind == "coords":
            slicer.util.setSliceViewerLayers(background=self._parameterNode.inputVolume, foreground=result,
                                             foregroundOpacity=0.5)  # fmt: skip
        elif task.kind in ("train-probe", "finetune"):
            self.refreshProbes(selectPath=str(result))
        self._done(f"{task.kind}: done.")

    def _offerOrientationFix(self, error: OrientationRefused) -> None:
        """Ask whether to segment the volume mirrored to match its anatomy (the result lands on the volume as it
        is); yes starts that run."""
        axes = " and ".join(error.axes)
        question = (f"{error}\n\nThe anatomy says {axes} is mirrored against this volume's geometry. Segment it "
                    "mirrored to match the anatomy? The segmentation is placed on the volume as it is; better still, "
                    "fix the volume's geometry.")  # fmt: skip
        if not slicer.util.confirmYesNoDisplay(question, windowTitle="DiffusionSeg: orientation"):
            return
        p = self._parameterNode
        self._start(lambda: self.logic.prepareSegment(p.inputVolume, self.ui.probeSelector.currentData,
                                                      p.backbonePath or None, p.outputSegmentation,
                                                      self._device(), orientation="fix"))  # fmt: skip

    def _done(self, message: str) -> None:
        self.timer.stop()
        self.task = None
        self.ui.progressBar.setVisible(False)
        self.ui.statusLabel.text = message
        self._updateButtons()

    def onLoadProbeButton(self) -> None:
        path = qt.QFileDialog.getOpenFileName(None, "Load probe", "", "Probe (*.safetensors)")
        if path:
            with slicer.util.tryWithErrorDisplay("Could not load the probe.", waitCursor=True):
                self.refreshProbes(selectPath=str(self.logic.importProbe(path)))

    def onSaveProbeButton(self) -> None:
        source = self.ui.probeSelector.currentData
        path = qt.QFileDialog.getSaveFileName(None, "Save probe as", Path(source).name, "Probe (*.safetensors)")
        if path:
            with slicer.util.tryWithErrorDisplay("Could not save the probe.", waitCursor=True):
                shutil.copyfile(source, path)


#
# DiffusionSegLogic
#


class DiffusionSegLogic(ScriptedLoadableModuleLogic):
    """Everything the module does, callable without the GUI (and without Qt).

    Each operation is ``prepareX(...)`` (nodes → input files + a :class:`DiffusionSegTask`), then either
    :meth:`run` (in-process, blocking) or :meth:`start` / :meth:`poll` / :meth:`complete` / :meth:`cancel`
    (background process). Output nodes are created only in :meth:`complete`, after success, so a cancelled or
    failed run leaves the scene as it was. ``segment``, ``showCoordinates`` and ``trainProbe`` are the blocking
    one-call versions.
    """

    def __init__(self, scene=None, probeFolder: str | os.PathLike | None = None) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.scene = scene if scene is not None else getattr(slicer, "mrmlScene", None)
        self.probeFolder = Path(probeFolder) if probeFolder else userProbeFolder()

    def getParameterNode(self):
        return DiffusionSegParameterNode(super().getParameterNode())

    # -- probes and models ------------------------------------------------------------------------------------

    def modelFolders(self) -> list[Path]:
        from DiffusionSegLib.resources import resources_dir

        return [self.probeFolder, resources_dir() / "Models"]

    def listProbes(self) -> list[dict]:
        """Probes of the user folder, then the shipped models with the default first (the selector's initial
        choice): ``{"path", "name", "organs", "backbone_sha256"}``."""
        from DiffusionSegLib.resources import DEFAULT_PROBE_NAME

        probes = []
        for folder in self.modelFolders():
            found = folder.glob("*.safetensors") if folder.is_dir() else []
            for path in sorted(found, key=lambda p: (p.name != DEFAULT_PROBE_NAME, p.name)):
                metadata = readWeightsMetadata(path)
                if metadata.get("kind") != "probe":
                    continue
                config = metadata["config"]
                organs = [label.get("name", "?") for label in config.get("labels", [])]
                probes.append({"path": str(path), "name": path.stem.removesuffix(".probe"), "organs": organs,
                               "backbone_sha256": config.get("backbone", {}).get("sha256")})  # fmt: skip
        return probes

    def newProbePath(self, name: str) -> Path:
        """A new file in the probe folder for ``name`` (never an existing one)."""
        stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in name.strip()) or "probe"
        path, n = self.probeFolder / f"{stem}.safetensors", 1
        while path.exists():
            path, n = self.probeFolder / f"{stem}_{n}.safetensors", n + 1
        return path

    def importProbe(self, path: str | os.PathLike) -> Path:
        """Copy a probe file into the probe folder (it then appears in :meth:`listProbes`)."""
        if readWeightsMetadata(path).get("kind") != "probe":
            raise ValueError(f"'{path}' is not a DiffusionSeg probe file")
        target = self.newProbePath(Path(path).stem)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
        return target

    def resolveBackbone(self, probePath: str | os.PathLike, backbonePath: str | os.PathLike | None = None) -> Path:
        """The backbone a probe runs on: the given file, else the recorded one, else a model file with its hash."""
        from DiffusionSegLib.checkpoint import find_weights

        if backbonePath:
            return Path(backbonePath)
        record = readWeightsMetadata(probePath).get("config", {}).get("backbone", {})
        recorded = str(record.get("path", ""))
        found = find_weights(str(record.get("sha256")), "backbone", [recorded], self.modelFolders())
        if found is None:
            raise ValueError(f"the backbone of probe '{Path(probePath).name}' ({Path(recorded).name}) was not found; "
                             "choose its file in 'Model (backbone)'")  # fmt: skip
        return found

    # -- preparing tasks ----------------------------------------------------------------------------------------

    def _newTask(self, kind: str, job: dict, finish: Callable[[dict], Any], device: str) -> DiffusionSegTask:
        tempDir = Path(job.pop("_tempDir"))
        return DiffusionSegTask(kind, {"kind": kind, "device": device, **job}, tempDir, finish, device)

    def _writeVolume(self, volumeNode, folder: Path, name: str) -> str:
        import SimpleITK as sitk

        from DiffusionSegLib.mrml import image_from_volume_node

        if volumeNode is None:
            raise ValueError("no input volume selected")
        path = folder / f"{name}.nrrd"
        sitk.WriteImage(image_from_volume_node(volumeNode), str(path), True)
        return str(path)

    def prepareSegment(self, volumeNode, probePath, backbonePath=None, outputSegmentationNode=None,
                       device: str = "cpu", largestComponent: bool | None = None,
                       orientation: str = "check") -> DiffusionSegTask:  # fmt: skip
        """Segment the probe's organs in ``volumeNode``; the result goes to ``outputSegmentationNode`` if given
        (overwritten), else to a new segmentation node named after the volume. ``largestComponent``: keep each
        organ's largest connected component (default: as ``diffusionseg segment``,
        ``DiffusionSegLib.defaults.LARGEST_COMPONENT``). ``orientation``: ``"check"`` refuses a volume whose
        anatomy says it is mirrored against its geometry (:class:`OrientationRefused` from :meth:`complete`,
        ``OrientationMismatch`` from :meth:`run`), ``"fix"`` segments it mirrored to match the anatomy (the
        result lands on the volume as it is), ``"trust-header"`` skips the check."""
        from DiffusionSegLib.defaults import LARGEST_COMPONENT

        if not probePath:
            raise ValueError("no probe selected; train one or load a probe file")
        backbone = self.resolveBackbone(probePath, backbonePath)
        folder = Path(tempfile.mkdtemp(prefix="DiffusionSeg-"))
        job = {"_tempDir": folder, "image": self._writeVolume(volumeNode, folder, "input"), "probe": str(probePath),
               "backbone": str(backbone), "output_labels": str(folder / "labels.nrrd"),
               "output_legend": str(folder / "labels.json"), "orientation": orientation,
               "largest_component": LARGEST_COMPONENT if largestComponent is None
               else bool(largestComponent)}  # fmt: skip

        return self._newTask("segment", job, lambda result: self._segmentationNode(result, volumeNode,
                                                                                    outputSegmentationNode), device)

    def _segmentationNode(self, result: dict, volumeNode, outputSegmentationNode=None):
        """The segmentation node of one segmented volume from the job's label map and legend files."""
        import SimpleITK as sitk

        from DiffusionSegLib.data.labels import labels_from_json
        from DiffusionSegLib.mrml import segmentation_node_from_labelmap

        labels = labels_from_json(json.loads(Path(result["legend"]).read_text()))
        node = segmentation_node_from_labelmap(sitk.ReadImage(result["labels"]), labels, self.scene,
                                               f"{volumeNode.GetName()} segmentation", volumeNode,
                                               outputSegmentationNode)  # fmt: skip
        node.SetAttribute(FIELD_OF_VIEW_ATTRIBUTE, result.get("field_of_view") or "")
        missing = result.get("not_found") or []
        node.SetAttribute(NOT_FOUND_ATTRIBUTE, f"not found in this scan: {', '.join(missing)}" if missing else "")
        node.SetAttribute(COHORT_FUSION_ATTRIBUTE, result.get("cohort_fusion") or "")
        return node

    def prepareSegmentVolumes(self, volumeNodes: list, probePath, backbonePath=None, outputSegmentationNode=None,
                              device: str = "cpu") -> DiffusionSegTask:  # fmt: skip
        """Segment several volumes in one background job: the models load once and one :meth:`cancel` stops it
        all. Each result goes to a new segmentation node named after its volume (the first volume's to
        ``outputSegmentationNode`` if given, overwritten). A volume the input gate refuses is left out and named
        with its reason in the result's ``failed``; the others are segmented. The result is a
        :class:`SegmentedVolumes`."""
        if not probePath:
            raise ValueError("no probe selected; train one or load a probe file")
        volumes = []
        for node in volumeNodes:
            if node is not None and all(node is not other for other in volumes):
                volumes.append(node)
        if not volumes:
            raise ValueError("no input volume selected")
        backbone = self.resolveBackbone(probePath, backbonePath)
        folder = Path(tempfile.mkdtemp(prefix="DiffusionSeg-"))
        images = [self._writeVolume(node, folder, f"input{i}") for i, node in enumerate(volumes)]
        job = {"_tempDir": folder, "images": images,
               "names": [node.GetName() for node in volumes], "probe": str(probePath), "backbone": str(backbone),
               "output_labels": [str(folder / f"labels{i}.nrrd") for i in range(len(volumes))],
               "output_legends": [str(folder / f"labels{i}.json") for i in range(len(volumes))]}  # fmt: skip

        def finish(result: dict) -> SegmentedVolumes:
            done = SegmentedVolumes()
            for index, (volumeNode, scan) in enumerate(zip(volumes, result["scans"], strict=True)):
                if scan.get("failed"):
                    done.failed.append((volumeNode, scan["failed"]))
                else:
                    output = outputSegmentationNode if index == 0 else None
                    done.segmentations.append(self._segmentationNode(scan, volumeNode, output))
            return done

        return self._newTask("segment-many", job, finish, device)

    def prepareCoordinates(self, volumeNode, outputNode=None, bprPath=None, device: str = "cpu") -> DiffusionSegTask:
        """Anatomical coordinates of ``volumeNode`` into ``outputNode`` (overwritten) or a new vector volume."""
        from DiffusionSegLib.bpr import default_bpr_path

        if outputNode is not None and outputNode is volumeNode:
            raise ValueError(f"the output volume '{outputNode.GetName()}' is the input volume; choose another output "
                             "volume, or none to make a new one")  # fmt: skip
        bpr = Path(bprPath) if bprPath else default_bpr_path()
        if not bpr.is_file():
            raise ValueError(f"the Body Part Regressor weights are missing ({bpr}); train one with "
                             "'diffusionseg bpr-train' or reinstall the extension")  # fmt: skip
        folder = Path(tempfile.mkdtemp(prefix="DiffusionSeg-"))
        job = {"_tempDir": folder, "image": self._writeVolume(volumeNode, folder, "input"), "bpr": str(bpr),
               "output": str(folder / "coordinates.nrrd")}  # fmt: skip

        def finish(result: dict):
            import SimpleITK as sitk

            from DiffusionSegLib.mrml import coordinate_node_from_image

            return coordinate_node_from_image(sitk.ReadImage(result["coordinates"]), self.scene,
                                              f"{volumeNode.GetName()} coordinates", outputNode)  # fmt: skip

        return self._newTask("coords", job, finish, device)

    def referenceVolume(self, segmentationNode):
        """The source volume a segmentation was drawn on (its reference geometry node), or None."""
        role = segmentationNode.GetReferenceImageGeometryReferenceRole()
        node = segmentationNode.GetNodeReference(role)
        return node if node is not None and node.IsA("vtkMRMLScalarVolumeNode") else None

    def pairVolumes(self, segmentationNodes: list, volumeNodes: list) -> list:
        """The CT of each segmentation: its source volume, else the checked volumes in order."""
        pairs, spare = [], [v for v in volumeNodes]
        for segmentationNode in segmentationNodes:
            volume = self.referenceVolume(segmentationNode)
            if volume is None:
                if not spare:
                    raise ValueError(f"segmentation '{segmentationNode.GetName()}' has no source volume; check its "
                                     "CT under 'Volumes'")  # fmt: skip
                volume = spare.pop(0)
            pairs.append(volume)
        return pairs

    def trainingLabels(self, volumeNodes: list, segmentationNodes: list, folder: Path) -> tuple[list, dict]:
        """Write one CT and one label map per pair with the union of segment names as classes.

        Returns:
            ``(cases, names)``: ``[[ct path, label path], ...]`` and ``{class id: organ name}``; the same
            (standardised) name in several segmentations is the same class, empty segments are left out.
        """
        import numpy as np
        import SimpleITK as sitk

        from DiffusionSegLib.data.labels import canonical_organ_name
        from DiffusionSegLib.mrml import labelmap_from_segmentation_node

        if not segmentationNodes or len(volumeNodes) != len(segmentationNodes):
            raise ValueError(f"{len(segmentationNodes)} segmentations and {len(volumeNodes)} volumes given; "
                             "expected one volume per segmentation (at least one)")  # fmt: skip
        classOf: dict[str, int] = {}
        maps = []
        for volumeNode, segmentationNode in zip(volumeNodes, segmentationNodes):
            image, names = labelmap_from_segmentation_node(segmentationNode, volumeNode)
            lookup = np.zeros(max(names, default=0) + 1, dtype=np.uint16)
            for value, name in names.items():
                lookup[value] = classOf.setdefault(canonical_organ_name(name), len(classOf) + 1)
            maps.append((volumeNode, image, lookup[sitk.GetArrayViewFromImage(image)]))
        present = set().union(*(np.unique(array).tolist() for _, _, array in maps)) - {0}
        if not present:
            raise ValueError("the chosen segmentations are empty; paint at least one organ")
        cases = []
        for i, (volumeNode, image, array) in enumerate(maps):
            label = sitk.GetImageFromArray(array)
            label.CopyInformation(image)
            labelPath = folder / f"labels{i}.nrrd"
            sitk.WriteImage(label, str(labelPath), True)
            cases.append([self._writeVolume(volumeNode, folder, f"ct{i}"), str(labelPath)])
        return cases, {value: name for name, value in classOf.items() if value in present}

    def _trainingJob(self, volumeNodes: list, segmentationNodes: list, outputPath, backbonePath) -> dict:
        """The files and names every training job needs (the CTs and label maps written to a temporary folder)."""
        backbone = Path(backbonePath) if backbonePath else self.defaultBackbone()
        folder = Path(tempfile.mkdtemp(prefix="DiffusionSeg-"))
        try:
            cases, names = self.trainingLabels(volumeNodes, segmentationNodes, folder)
        except Exception:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        Path(outputPath).parent.mkdir(parents=True, exist_ok=True)
        return {"_tempDir": folder, "cases": cases, "names": names, "backbone": str(backbone), "output": str(outputPath)}

    def prepareTrainProbe(self, volumeNodes: list, segmentationNodes: list, outputPath, headType: str = "nonlinear",
                          steps: int = 300, backbonePath=None, device: str = "cpu",
                          probeOptions: dict | None = None) -> DiffusionSegTask:  # fmt: skip
        """Train a probe on the segments of ``segmentationNodes`` (each on the CT at the same index) and save it
        to ``outputPath``. ``probeOptions``: further ``ProbeConfig`` fields (patch size, patches per volume...)."""
        job = self._trainingJob(volumeNodes, segmentationNodes, outputPath, backbonePath)
        job.update(head=headType, steps=int(steps), probe_options=probeOptions or {})
        return self._newTask("train-probe", job, lambda result: Path(result["probe"]), device)

    def prepareFinetune(self, volumeNodes: list, segmentationNodes: list, outputPath, minutes: float = 15.0,
                        backbonePath=None, device: str = "cpu", finetuneOptions: dict | None = None,
                        unlabeledVolumeNodes: list | None = None) -> DiffusionSegTask:  # fmt: skip
        """Fine-tune the backbone and a head end to end on the segments (the accurate path) for ``minutes`` and
        save the model to ``outputPath`` (its fine-tuned backbone beside it). ``finetuneOptions``: further
        ``FinetuneConfig`` fields. ``unlabeledVolumeNodes``: CT volumes of the same cohort without segmentations
        to learn from too (labels propagated by registration; the minutes include it). The run folder
        ``<output>.run`` keeps snapshots and registrations, so running the same training again resumes.
        :meth:`requestStop` ends it early and keeps the best model so far."""
        job = self._trainingJob(volumeNodes, segmentationNodes, outputPath, backbonePath)
        folder = Path(job["_tempDir"])
        unlabeled = [node for node in (unlabeledVolumeNodes or []) if node not in volumeNodes]
        job.update(minutes=float(minutes), finetune_options=finetuneOptions or {},
                   unlabeled=[self._writeVolume(node, folder, f"unlabeled{i}") for i, node in enumerate(unlabeled)],
                   case_names=[node.GetName() for node in volumeNodes],
                   unlabeled_names=[node.GetName() for node in unlabeled],
                   run_dir=str(Path(outputPath).with_suffix(".run")))  # fmt: skip
        return self._newTask("finetune", job, lambda result: Path(result["probe"]), device)

    def unlabeledCandidates(self, volumeNodes: list, segmentationNodes: list) -> list:
        """The scene's scalar volumes that are neither training volumes nor the source of a checked segmentation:
        the unlabeled cohort the training panel preselects."""
        used = {id(node) for node in volumeNodes}
        used |= {id(v) for v in (self.referenceVolume(s) for s in segmentationNodes) if v is not None}
        nodes = self.scene.GetNodesByClass("vtkMRMLScalarVolumeNode")
        candidates = [nodes.GetItemAsObject(i) for i in range(nodes.GetNumberOfItems())]
        return [node for node in candidates if id(node) not in used and not node.IsA("vtkMRMLLabelMapVolumeNode")]

    def defaultBackbone(self) -> Path:
        """The shipped backbone (first ``kind == "backbone"`` file among the model folders)."""
        for folder in self.modelFolders():
            for path in sorted(folder.glob("*.safetensors")) if folder.is_dir() else []:
                if readWeightsMetadata(path).get("kind") == "backbone":
                    return path
        raise ValueError("no backbone found; choose a pretrained backbone file in 'Model (backbone)'")

    # -- running tasks ------------------------------------------------------------------------------------------

    def _jobModule(self):
        import importlib.util

        spec = importlib.util.spec_from_file_location("diffusionseg_job", JOB_SCRIPT)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    def run(self, task: DiffusionSegTask, progressCallback=None, shouldStop=None):
        """Run a task in this process (blocking) and return its result node or path."""
        try:
            start = time.perf_counter()
            result = self._jobModule().run_job(task.job, progressCallback, shouldStop)
            output = task.finish(result)
            log.info("DiffusionSeg %s finished in %.1f s", task.kind, time.perf_counter() - start)
            return output
        finally:
            shutil.rmtree(task.tempDir, ignore_errors=True)

    def start(self, task: DiffusionSegTask) -> BackgroundProcess:
        """Start a task in a background process (PythonSlicer); poll it with :meth:`poll`."""
        jobFile = task.tempDir / "job.json"
        jobFile.write_text(json.dumps(task.job))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(LIBRARY_ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
        env["PYTHONUNBUFFERED"] = "1"
        if task.device == "cpu":
            env["CUDA_VISIBLE_DEVICES"] = "-1"
        task.process = BackgroundProcess([pythonExecutable(), str(JOB_SCRIPT), str(jobFile)], env)
        return task.process

    def poll(self, task: DiffusionSegTask) -> list[tuple[float, str]]:
        """Progress reported since the last call (other output lines are kept for error messages)."""
        updates = []
        for line in task.process.readLines() if task.process else []:
            progress = parseProgressLine(line)
            if progress is None:
                task.output.append(line)
                log.debug("%s", line)
            else:
                updates.append(progress)
        return updates

    def complete(self, task: DiffusionSegTask, timeout: float | None = None):
        """Wait for a started task and turn its output into nodes; raises with the job's message on failure."""
        try:
            code = task.process.wait(timeout)
            self.poll(task)
            if task.process.cancelled:
                raise RuntimeError(f"{task.kind} was cancelled")
            results = [line for line in task.output if line.startswith(RESULT_PREFIX)]
            if code != 0 or not results:
                errors = [line[len(ERROR_PREFIX):].strip() for line in task.output if line.startswith(ERROR_PREFIX)]
                mirrored = [line[len(ORIENTATION_PREFIX):].strip() for line in task.output
                            if line.startswith(ORIENTATION_PREFIX)]  # fmt: skip
                if mirrored and errors:
                    raise OrientationRefused(errors[-1], json.loads(mirrored[-1]))
                raise RuntimeError(errors[-1] if errors else f"the background process failed (exit status {code}):\n"
                                   + "\n".join(task.output[-15:]))  # fmt: skip
            return task.finish(json.loads(results[-1][len(RESULT_PREFIX):]))
        finally:
            shutil.rmtree(task.tempDir, ignore_errors=True)

    def requestStop(self, task: DiffusionSegTask) -> None:
        """End a started fine-tune early: it writes its best model so far and finishes normally (poll and
        :meth:`complete` it as usual). Other tasks are cancelled (:meth:`cancel`)."""
        if task.kind == "finetune" and task.process is not None:
            task.process.requestStop()
        else:
            self.cancel(task)

    def cancel(self, task: DiffusionSegTask) -> None:
        """Kill a started task's process tree; the scene is not touched."""
        if task.process is not None:
            task.process.cancel()
        shutil.rmtree(task.tempDir, ignore_errors=True)

    # -- one-call versions --------------------------------------------------------------------------------------

    def segment(self, volumeNode, probePath, backbonePath=None, outputSegmentationNode=None, device: str = "cpu",
                progressCallback=None, shouldStop=None, largestComponent: bool | None = None,
                orientation: str = "check"):  # fmt: skip
        """Segment ``volumeNode`` with a probe (blocking); returns the segmentation node. ``orientation``: see
        :meth:`prepareSegment`."""
        task = self.prepareSegment(volumeNode, probePath, backbonePath, outputSegmentationNode, device,
                                   largestComponent, orientation)  # fmt: skip
        return self.run(task, progressCallback, shouldStop)

    def segmentVolumes(self, volumeNodes: list, probePath, backbonePath=None, outputSegmentationNode=None,
                       device: str = "cpu", progressCallback=None, shouldStop=None) -> SegmentedVolumes:  # fmt: skip
        """Segment several volumes with a probe (blocking; the models load once); see :meth:`prepareSegmentVolumes`."""
        task = self.prepareSegmentVolumes(volumeNodes, probePath, backbonePath, outputSegmentationNode, device)
        return self.run(task, progressCallback, shouldStop)

    def showCoordinates(self, volumeNode, outputNode=None, bprPath=None, device: str = "cpu"):
        """Anatomical coordinates of ``volumeNode`` (blocking); returns the vector volume node."""
        return self.run(self.prepareCoordinates(volumeNode, outputNode, bprPath, device))

    def trainProbe(self, volumeNodes, segmentationNodes, outputPath, headType: str = "nonlinear",
                   progressCallback=None, shouldStop=None, **options) -> Path:  # fmt: skip
        """Train and save a probe from segmentation nodes (blocking); returns its path."""
        task = self.prepareTrainProbe(volumeNodes, segmentationNodes, outputPath, headType, **options)
        return self.run(task, progressCallback, shouldStop)

    def finetune(self, volumeNodes, segmentationNodes, outputPath, minutes: float = 15.0, progressCallback=None,
                 shouldStop=None, **options) -> Path:  # fmt: skip
        """Fine-tune and save a model from segmentation nodes (blocking); ``shouldStop`` keeps the best so far."""
        task = self.prepareFinetune(volumeNodes, segmentationNodes, outputPath, minutes, **options)
        return self.run(task, progressCallback, shouldStop)


#
# DiffusionSegTest
#


class DiffusionSegTest(ScriptedLoadableModuleTest):
    """Runs the logic on the bundled sample CT: a probe trained from a thresholded 'bone' segment segments it."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_TrainAndSegment()

    def test_TrainAndSegment(self):
        import numpy as np
        import SimpleITK as sitk

        from DiffusionSegLib.mrml import segmentation_node_from_labelmap, volume_node_from_image
        from DiffusionSegLib.resources import sample_ct_path

        self.delayDisplay("Loading the sample CT")
        ct = sitk.ReadImage(str(sample_ct_path()))
        volumeNode = volume_node_from_image(ct, slicer.mrmlScene, "sample CT")
        label = sitk.Cast(ct > 200, sitk.sitkUInt8)
        segmentationNode = segmentation_node_from_labelmap(label, [], slicer.mrmlScene, "bone", volumeNode)
        segmentationNode.GetSegmentation().GetNthSegment(0).SetName("bone")
        logic = DiffusionSegLogic(probeFolder=tempfile.mkdtemp())
        try:
            backbone = logic.defaultBackbone()
        except ValueError as error:
            self.delayDisplay(f"Skipped: {error}")
            return
        self.delayDisplay("Training a probe")
        probePath = logic.trainProbe([volumeNode], [segmentationNode], logic.newProbePath("bone"), "linear",
                                     steps=20, backbonePath=backbone)  # fmt: skip
        self.assertIn(str(probePath), [p["path"] for p in logic.listProbes()])
        self.delayDisplay("Segmenting")
        result = logic.segment(volumeNode, probePath, backbone)
        self.assertEqual(result.GetSegmentation().GetNthSegment(0).GetName(), "bone")
        self.assertGreater(int(np.count_nonzero(slicer.util.arrayFromSegmentBinaryLabelmap(
            result, result.GetSegmentation().GetNthSegmentID(0), volumeNode))), 0)  # fmt: skip
        self.delayDisplay("Test passed")
