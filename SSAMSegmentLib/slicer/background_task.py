"""Long SSAM work (segmenting, training, downloading weights) in a child Python process, with progress and Cancel.

Why a process and not a thread: the Slicer GUI thread is never blocked, whatever holds the GIL; Cancel always works
(the child stops at the next slice or training step, and is killed if it does not stop in time); a crash or an out
of memory error in PyTorch cannot take Slicer down; GPU memory is given back when the job ends.

Each job gets a folder that is the whole protocol, so no thread or pipe is needed on the parent's side:

    job.json       what to do (written by the parent)
    input.nrrd ... input images (written by the parent)
    events.jsonl   one JSON object per line, appended by the child: progress, training, done, error
    cancel         created by the parent to ask the child to stop
    log.txt        the child's stdout and stderr (tracebacks of unexpected errors)
    masks/...      results (segmentation masks)

The parent polls `events.jsonl` (a QTimer in the module widget; `wait()` for scripts and tests). The child runs
`run_job(JOB_FOLDER)` in Slicer's own Python (the PythonSlicer launcher, as Slicer's pip does) or in the current
interpreter elsewhere. It reports its process id first, so that a hard stop reaches the real interpreter behind a
launcher, and it stops by itself when its parent process disappears.
"""

import collections
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from ..errors import Cancelled, SSAMError

LIBRARY_PARENT = Path(__file__).resolve().parents[2]  # the folder that holds SSAMSegmentLib (and Resources)
EVENTS = "events.jsonl"
CANCEL = "cancel"
KILL_AFTER_CANCEL_SECONDS = 10.0


# ---------------------------------------------------------------------------------------------------------------
# Parent side


class BackgroundTask:
    """One job running in a child process. Poll it from the GUI thread; nothing here blocks except `wait`."""

    def __init__(self, kind: str, job: dict, folder: Path, python: Optional[str] = None,
                 env: Optional[Dict[str, str]] = None):
        self.kind = kind
        self.folder = Path(folder)
        self.result: Optional[dict] = None
        self.error: Optional[str] = None
        self.cancelled = False
        self.context: dict = {}  # what the caller keeps with the job (Slicer: the input image and grid it was cut from)
        self._offset = 0
        self._pending = b""
        self._cancel_time: Optional[float] = None
        self._child_pid: Optional[int] = None
        job = dict(job, kind=kind, parent_pid=os.getpid())
        (self.folder / "job.json").write_text(json.dumps(job), encoding="utf-8")
        child_env = dict(os.environ if env is None else env)
        child_env["PYTHONUNBUFFERED"] = "1"
        # Spinning OpenMP waits make PyTorch several times slower while Slicer's own threads hold a core.
        child_env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        flags = getattr(subprocess, "CREATE_NO_WINDOW", 0) if os.name == "nt" else 0
        # The library's folder goes on sys.path by the command itself: a launcher may rewrite PYTHONPATH.
        code = (f"import sys; sys.path.insert(0, {str(LIBRARY_PARENT)!r}); "
                f"from SSAMSegmentLib.slicer.background_task import run_job; sys.exit(run_job(sys.argv[1]))")
        self._log = open(self.folder / "log.txt", "wb")
        self._process = subprocess.Popen(
            [python or python_executable(), "-c", code, str(self.folder)],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT, env=child_env,
            cwd=str(self.folder), creationflags=flags)

    @property
    def finished(self) -> bool:
        return self.result is not None or self.error is not None

    def poll(self) -> List[dict]:
        """Events written since the last poll (progress, training, done, error); updates result/error/cancelled."""
        exited = self._process.poll() is not None  # checked before reading: an exited child has written everything
        events = self._read_events()
        for event in events:
            if event.get("event") == "started":
                self._child_pid = event.get("pid")
            elif event.get("event") == "done":
                self.result = event.get("result") or {}
            elif event.get("event") == "error":
                self.error = event.get("message") or f"the background {self.kind} failed"
                self.cancelled = bool(event.get("cancelled"))
        if not self.finished and exited:
            if self._cancel_time is not None:
                self.error, self.cancelled = f"{self.kind} cancelled; nothing was written", True
            else:
                self.error = (f"the background {self.kind} process stopped unexpectedly "
                              f"(exit code {self._process.returncode}): {self.log_tail()}")
            events.append({"event": "error", "message": self.error, "cancelled": self.cancelled})
        elif not self.finished and self._cancel_time is not None \
                and time.monotonic() - self._cancel_time > KILL_AFTER_CANCEL_SECONDS:
            self._kill_processes()  # it did not reach a point where it checks for Cancel: stop it now
        if self.finished:
            self._close()
        return events

    def cancel(self) -> None:
        """Ask the child to stop at its next check (each slice, training step, download block)."""
        if self.finished or self._cancel_time is not None:
            return
        (self.folder / CANCEL).touch()
        self._cancel_time = time.monotonic()

    def wait(self, timeout: Optional[float] = None, on_event=None, interval: float = 0.05) -> dict:
        """Block until the job ends; return its result or raise SSAMError / Cancelled with the child's message."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            for event in self.poll():
                if on_event:
                    on_event(event)
            if self.finished:
                break
            if deadline is not None and time.monotonic() > deadline:
                self.cancel()
                deadline = None
            time.sleep(interval)
        if self.error is not None:
            raise (Cancelled if self.cancelled else SSAMError)(self.error)
        return self.result

    def kill(self) -> None:
        """Stop the child at once (module closed, Slicer exiting)."""
        if self._process.poll() is None:
            self._kill_processes()
            self._process.wait()
        self._close()

    def cleanup(self) -> None:
        """Stop the child if it still runs (a finished one is given a moment to exit) and delete the job folder."""
        if self._process.poll() is None and self.finished:
            try:
                self._process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        self.kill()
        shutil.rmtree(self.folder, ignore_errors=True)

    def _kill_processes(self) -> None:
        """Kill the interpreter that runs the job (behind a launcher, it is not the process started here)."""
        self._read_started()
        if self._child_pid and self._child_pid != self._process.pid:
            try:
                os.kill(self._child_pid, getattr(signal, "SIGKILL", signal.SIGTERM))
            except OSError:
                pass
        if self._process.poll() is None:
            self._process.kill()

    def _read_started(self) -> None:
        if self._child_pid is None:
            try:
                first = (self.folder / EVENTS).read_text(encoding="utf-8").split("\n", 1)[0]
                self._child_pid = json.loads(first).get("pid") if first else None
            except (OSError, ValueError):
                pass

    def log_tail(self, lines: int = 3) -> str:
        try:
            text = (self.folder / "log.txt").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return "no log"
        tail = [line for line in text.strip().splitlines() if line.strip()][-lines:]
        return " | ".join(tail) if tail else "no output"

    def _read_events(self) -> List[dict]:
        path = self.folder / EVENTS
        try:
            with open(path, "rb") as handle:
                handle.seek(self._offset)
                data = handle.read()
        except FileNotFoundError:
            return []
        self._offset += len(data)
        data = self._pending + data
        complete, _, self._pending = data.rpartition(b"\n")  # a line being written is kept for the next poll
        return [json.loads(line) for line in complete.splitlines() if line.strip()]

    def _close(self) -> None:
        if not self._log.closed:
            self._log.close()


def python_executable() -> str:
    """Slicer's Python for the child when running inside Slicer (PythonSlicer sets up its environment; Slicer's own
    `sys.executable` is not a plain interpreter), else this interpreter."""
    slicer = sys.modules.get("slicer")
    if slicer is not None and getattr(slicer, "app", None) is not None:
        launcher = shutil.which("PythonSlicer")
        if launcher:
            return launcher
    return sys.executable


def _new_folder() -> Path:
    return Path(tempfile.mkdtemp(prefix="ssam-job-"))


def start_segmentation(image, labels: Sequence[str], adapter="default", base=None, text_encoder=None,
                       device="auto", axis="auto", threshold=0.5, precision="auto", self_box="auto", python=None,
                       env=None) -> BackgroundTask:
    """Segment a SimpleITK image in a child process; read the result with `segmentation_masks(task)`. self_box:
    "auto" (the adapter's own choice, inference/self_box.py) or "off"."""
    import SimpleITK as sitk

    folder = _new_folder()
    sitk.WriteImage(image, str(folder / "input.nrrd"), False)
    job = {"image": "input.nrrd", "labels": list(labels), "adapter": None if adapter is None else str(adapter),
           "base": base, "text_encoder": text_encoder, "device": device, "axis": axis, "threshold": threshold,
           "precision": precision, "self_box": self_box}
    return BackgroundTask("segmentation", job, folder, python, env)


def segmentation_masks(task: BackgroundTask) -> "collections.OrderedDict":
    """The finished segmentation's masks: label -> uint8 SimpleITK image (the input image's grid)."""
    import SimpleITK as sitk

    if task.result is None:
        raise SSAMError(task.error or "the segmentation has not finished")
    return collections.OrderedDict(
        (label, sitk.ReadImage(str(task.folder / name))) for label, name in task.result["masks"])


def start_training(config: dict, cases=None, python=None, env=None) -> BackgroundTask:
    """Train an adapter in a child process. `config` holds TrainingConfig fields (data: a folder path unless
    `cases` is given); `cases` are in-memory training cases (case_id, image, OrderedDict[name, mask]) such as
    Slicer scene pairs, handed over as NRRD files."""
    import SimpleITK as sitk

    folder = _new_folder()
    job = {"config": dict(config)}
    if cases is not None:
        listed = []
        for number, (case_id, image, masks) in enumerate(cases):
            image_name = f"case{number:03d}.nrrd"
            sitk.WriteImage(image, str(folder / image_name), True)
            mask_names = collections.OrderedDict()
            for index, (name, mask) in enumerate(masks.items()):
                mask_names[name] = f"case{number:03d}_mask{index:02d}.nrrd"
                sitk.WriteImage(mask, str(folder / mask_names[name]), True)
            listed.append({"id": case_id, "image": image_name, "masks": mask_names})
        job["cases"] = listed
        job["config"].pop("data", None)
    return BackgroundTask("training", job, folder, python, env)


def start_download(weight_id: str, python=None, env=None) -> BackgroundTask:
    """Download a registered weight file (weights.WEIGHT_FILES) into the cache, checksum verified."""
    return BackgroundTask("download", {"weight": weight_id}, _new_folder(), python, env)


# ---------------------------------------------------------------------------------------------------------------
# Child side


class _CancelFlag:
    """`is_set()` as a threading.Event: true once the parent asked to cancel, or when the parent is gone."""

    def __init__(self, folder: Path, parent_pid: Optional[int]):
        self._path = folder / CANCEL
        self._parent_pid = parent_pid

    def is_set(self) -> bool:
        return self._path.exists() or not _process_alive(self._parent_pid)


def _process_alive(pid: Optional[int]) -> bool:
    if not pid or os.name == "nt":  # Windows: os.kill(pid, 0) would terminate the process
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _Events:
    def __init__(self, folder: Path):
        self._handle = open(folder / EVENTS, "a", encoding="utf-8")

    def emit(self, event: str, **fields) -> None:
        # The wall-clock time lets the parent tell events written before its Cancel from those written after.
        self._handle.write(json.dumps(dict(fields, event=event, time=time.time()), default=_json_value) + "\n")
        self._handle.flush()


def _json_value(value):
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):  # numpy / torch scalars
        return value.item()
    return str(value)


def _progress_fields(progress) -> dict:
    if dataclasses.is_dataclass(progress):
        return dataclasses.asdict(progress)
    if isinstance(progress, dict):
        return dict(progress)
    names = ("epoch", "step", "total_steps", "loss", "val_dice", "eta_seconds", "message")
    return {name: getattr(progress, name, None) for name in names}


def _segmentation_job(job: dict, folder: Path, events: _Events, cancel) -> dict:
    import SSAMSegmentLib
    import SimpleITK as sitk
    from ..files.image_io import read_image

    events.emit("progress", fraction=0.0, message="loading the model")
    model = SSAMSegmentLib.load(base=job.get("base"), adapter=job.get("adapter"), text_encoder=job.get("text_encoder"),
                                device=job.get("device") or "auto", merge=True,
                                precision=job.get("precision") or "auto")
    if cancel.is_set():
        raise Cancelled("segmentation cancelled; nothing was written")
    image = read_image(folder / job["image"])
    result = model.segment(image, job["labels"], axis=job.get("axis") or "auto",
                           threshold=float(job.get("threshold") or 0.5), self_box=job.get("self_box") or "auto",
                           progress=lambda fraction, message: events.emit("progress", fraction=fraction, message=message),
                           cancel=cancel)
    (folder / "masks").mkdir(exist_ok=True)
    listed = []
    for index, (label, mask) in enumerate(result.masks.items()):
        name = f"masks/mask{index:03d}.nrrd"
        sitk.WriteImage(mask, str(folder / name), True)
        listed.append([label, name])
    return {"masks": listed, "empty_labels": list(result.empty_labels), "untaught_labels": result.untaught_labels,
            "other_kind_labels": list(result.other_kind_labels), "weak_labels": list(result.weak_labels),
            "label_status": {name: match.describe() for name, match in result.label_status.items()},
            "notes": list(result.notes), "warnings": list(result.warnings), "summary": result.summary(),
            "confidence": {label: result.confidence(label) for label in result.masks},
            "check_slices": {label: result.slices_to_check(label) for label in result.masks}}


def _training_job(job: dict, folder: Path, events: _Events, cancel) -> dict:
    import SSAMSegmentLib
    import SimpleITK as sitk
    from SSAMSegmentLib.training import datasets

    config = dict(job["config"])
    if "cases" in job:
        cases = [(case["id"], sitk.ReadImage(str(folder / case["image"])),
                  collections.OrderedDict((name, sitk.ReadImage(str(folder / path)))
                                          for name, path in case["masks"].items()))
                 for case in job["cases"]]
        config["data"] = datasets.memory_dataset(cases)
    result = SSAMSegmentLib.train(SSAMSegmentLib.TrainingConfig(**config),
                                  progress=lambda p: events.emit("training", **_progress_fields(p)), cancel=cancel)
    fields = _progress_fields(result)
    fields["adapter_path"] = str(getattr(result, "adapter_path", config.get("output")))
    return fields


def _download_job(job: dict, folder: Path, events: _Events, cancel) -> dict:
    from ..model import weights

    weight = weights.WEIGHT_FILES.get(job["weight"])
    if weight is None:
        raise SSAMError(f"unknown weight file '{job['weight']}'; known: {', '.join(weights.WEIGHT_FILES)}")

    def progress(done, total):
        if cancel.is_set():
            raise Cancelled(f"download of {weight.id} cancelled; nothing was saved")
        total = total or weight.size
        events.emit("progress", fraction=done / total, message=f"{done / 1e6:.0f} of {total / 1e6:.0f} MB")

    # The Download button asks for the published file: a damaged copy in the cache is replaced (by verified bytes only).
    return {"path": str(weights.download(weight, progress, overwrite=True))}


JOBS = {"segmentation": _segmentation_job, "training": _training_job, "download": _download_job}


def run_job(folder) -> int:
    """Run the job described by `folder`/job.json, reporting through `folder`/events.jsonl; the exit code."""
    folder = Path(folder)
    events = _Events(folder)
    events.emit("started", pid=os.getpid())
    try:
        job = json.loads((folder / "job.json").read_text(encoding="utf-8"))
        cancel = _CancelFlag(folder, job.get("parent_pid"))
        result = JOBS[job["kind"]](job, folder, events, cancel)
    except Cancelled as error:
        events.emit("error", message=str(error), cancelled=True)
        return Cancelled.exit_code
    except SSAMError as error:
        events.emit("error", message=str(error), cancelled=False)
        return SSAMError.exit_code
    except MemoryError:
        events.emit("error", message="out of memory; close other programs, use a smaller image or the CPU device",
                    cancelled=False)
        return 1
    except Exception as error:  # a bug: one line for the panel, the traceback for the log
        traceback.print_exc()
        events.emit("error", message=f"internal error ({type(error).__name__}: {error}); "
                                     f"details in {folder / 'log.txt'}", cancelled=False)
        return 1
    events.emit("done", result=result)
    return 0
