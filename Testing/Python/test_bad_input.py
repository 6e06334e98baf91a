"""The promise on bad input, as a careless user tries it: one row per case, across `ssam segment`, `evaluate`,
`train`, `download`, `demo`, the batch script and the Python API.

Every row asserts the exit code (2; 130 for Ctrl-C), exactly one line on stderr (captured at the file descriptor, so
ITK's own warnings would count) naming the problem, and that nothing in the whole working folder was created, changed
or removed: each file's SHA256 and modification time and every folder are compared before and after. Inputs that a
row must never write to (an input given as the output, an existing result) are in that folder.

Rows run in-process (cli.main, the batch script's run, the API) on one shared folder, so they are quick; a few run as
real processes: Ctrl-C during start-up and an ITK-warning input through the installed entry point.
"""

import hashlib
import importlib.util
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import REPO
from helpers import dicom_series, perturbed_model

from SSAMSegmentLib import cli
from SSAMSegmentLib.errors import SSAMError

ENV = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")


def _batch_module():
    spec = importlib.util.spec_from_file_location("ssam_segment_batch", REPO / "SSAMSegment" / "SSAMSegmentBatch.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _labelled_2d(folder: Path, mask_value: int, mapping: str):
    """A tiny images/ + masks/ + labels.json dataset of 4 grey pictures whose masks hold `mask_value`."""
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    rng = np.random.default_rng(1)
    for index in range(4):
        picture = rng.integers(0, 80, (32, 32), dtype=np.uint8)
        picture[8:20, 8:20] += 150
        mask = np.zeros((32, 32), np.uint8)
        mask[8:20, 8:20] = mask_value
        sitk.WriteImage(sitk.GetImageFromArray(picture), str(folder / "images" / f"case{index}.png"))
        sitk.WriteImage(sitk.GetImageFromArray(mask), str(folder / "masks" / f"case{index}.png"))
    (folder / "labels.json").write_text(mapping)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """The user's folder: images, an adapter, earlier results, DICOM folders, a dataset."""
    root = tmp_path_factory.mktemp("user")
    rng = np.random.default_rng(0)
    ct = rng.normal(40, 30, (6, 40, 36)).astype(np.int16)
    ct[:, 10:30, 8:28] += 200
    image = sitk.GetImageFromArray(ct)
    image.SetSpacing((0.9, 0.8, 3.0))
    sitk.WriteImage(image, str(root / "ct.nii.gz"))
    sitk.WriteImage(image, str(root / "zero_spacing.nii"))
    header = bytearray((root / "zero_spacing.nii").read_bytes())
    header[80:84] = struct.pack("<f", 0.0)  # pixdim[1]: ITK reads it as 1 mm, with a warning of several lines
    (root / "zero_spacing.nii").write_bytes(bytes(header))
    picture = rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)
    sitk.WriteImage(sitk.GetImageFromArray(picture, isVector=True), str(root / "photo.png"))
    (root / "sub").mkdir()
    (root / "link.nii.gz").symlink_to(root / "ct.nii.gz")
    os.link(root / "ct.nii.gz", root / "hardlink.nii.gz")
    (root / "text.nii.gz").write_text("not an image")
    (root / "empty.nrrd").write_bytes(b"")
    sitk.WriteImage(image, str(root / "cut.nii"))
    (root / "cut.nii").write_bytes((root / "cut.nii").read_bytes()[:-500])  # a copy that stopped early
    (root / "pictures").mkdir()
    sitk.WriteImage(sitk.GetImageFromArray(picture, isVector=True), str(root / "pictures" / "a.png"))
    sitk.WriteImage(sitk.JoinSeries([sitk.Image([6, 6, 4], sitk.sitkInt16) + i for i in range(3)]), str(root / "4d.nii.gz"))
    model = perturbed_model("test-vit", labels=("organ", "vessel"), seed=7, image_size=64)
    model.save_adapter(root / "test.adapter.safetensors", {"epochs": 1, "data": "generated"})
    perturbed_model("test-tinyvit", labels=("organ",), seed=7).save_adapter(root / "tiny.adapter.safetensors")
    # An adapter whose text encoder is not at hand: only its stored labels can be asked for.
    perturbed_model("test-vit", labels=("liver",), seed=7, text_encoder="clip-vit-b-32", image_size=64).save_adapter(
        root / "clip.adapter.safetensors")
    (root / "corrupt.adapter.safetensors").write_bytes(os.urandom(3000))
    (root / "a_file").write_text("x")
    # Earlier results the user keeps.
    masks = {"organ": sitk.Cast(image > 100, sitk.sitkUInt8)}
    from SSAMSegmentLib.files.writers import write_outputs

    write_outputs(root / "done.seg.nrrd", image, masks, preview_path=root / "done.png")
    write_outputs(root / "ct.seg.nrrd", image, masks)  # the default output of ct.nii.gz
    (root / "labels_only.json").write_text('{"1": "organ"}')  # a label map's sidecar, its label map gone
    (root / "report.json").write_text("{}")
    (root / "half.csv").write_text("case\n")
    (root / "old.adapter.safetensors").write_bytes((root / "test.adapter.safetensors").read_bytes())
    (root / "kept.metrics.csv").write_text("kind\n")
    # DICOM folders: evenly spaced, one slice missing, one slice unreadable.
    dicom_series(root / "dicom_ok")
    dicom_series(root / "dicom_two", slices=5)
    dicom_series(root / "dicom_two", slices=3, series_uid="1.2.826.0.1.3680043.2.1125.9", prefix="localizer")
    dicom_series(root / "dicom_gap", slices=8, skip=(4,))
    broken = dicom_series(root / "dicom_broken", slices=8)
    broken[3].write_bytes(b"\0" * 200)
    # Datasets: a good one, one whose masks hold 2 where labels.json names 1.
    _labelled_2d(root / "data", 1, '{"1": "polyp"}')
    _labelled_2d(root / "data_mismatch", 7, '{"255": "polyp"}')
    cache = root / "cache"
    cache.mkdir()
    (cache / "sam_vit_b_01ec64.pth").write_bytes(b"not the weights")
    return root


def _snapshot(root: Path) -> dict:
    state = {}
    for path in sorted(root.rglob("*")):
        info = path.lstat()
        if path.is_symlink():
            state[path] = ("link", os.readlink(path))
        elif path.is_dir():
            state[path] = ("folder",)
        else:
            state[path] = (hashlib.sha256(path.read_bytes()).hexdigest(), info.st_mtime_ns, info.st_size)
    return state


def _rows(w: Path):
    """name -> (kind, arguments, expected text). kind: cli (arguments of `ssam`), batch (of the batch script),
    api (a function of the folder)."""
    ct, ad = str(w / "ct.nii.gz"), ["--adapter", str(w / "test.adapter.safetensors")]
    seg = ["segment", ct, "--label", "organ", *ad]
    out = ["--output", str(w / "new.seg.nrrd")]
    train = ["train", str(w / "data"), "--base", "test-vit", "--image-size", "64", "--device", "cpu",
             "--output", str(w / "new.adapter.safetensors")]
    return {
        # segment: inputs never written to
        "output is the input": ("cli", seg + ["--output", ct], "is the input"),
        "output is the input by a relative path": ("cli", seg + ["--output", str(w / "sub" / ".." / "ct.nii.gz")], "is the input"),
        "output is a symlink to the input": ("cli", seg + ["--output", str(w / "link.nii.gz")], "is the input"),
        "output is a hard link to the input": ("cli", seg + ["--output", str(w / "hardlink.nii.gz"), "--overwrite"], "is the input"),
        "output is the input even with --overwrite": ("cli", seg + ["--output", ct, "--overwrite"], "is the input"),
        "preview is the input picture": ("cli", ["segment", str(w / "photo.png"), "--label", "organ", *ad, *out,
                                                 "--preview", str(w / "photo.png")], "is the input"),
        # segment: existing outputs refused
        "existing .seg.nrrd": ("cli", seg + ["--output", str(w / "done.seg.nrrd")], "already exists; add --overwrite"),
        "existing default output": ("cli", seg, "ct.seg.nrrd already exists"),
        "existing sidecar of a label map": ("cli", seg + ["--output", str(w / "labels_only.nii.gz")], "labels_only.json already exists"),
        "existing preview": ("cli", seg + out + ["--preview", str(w / "done.png")], "done.png already exists"),
        # segment: paths
        "missing input creates no folder": ("cli", ["segment", str(w / "nope.nii.gz"), "--label", "organ", *ad,
                                                    "--output", str(w / "new" / "deep" / "x.seg.nrrd")], "does not exist"),
        "unreadable input": ("cli", ["segment", str(w / "text.nii.gz"), "--label", "organ", *ad, *out], "cannot read"),
        "empty file": ("cli", ["segment", str(w / "empty.nrrd"), "--label", "organ", *ad, *out], "cannot read"),
        "truncated NIfTI": ("cli", ["segment", str(w / "cut.nii"), "--label", "organ", *ad, *out], "is truncated"),
        "folder of pictures, not DICOM": ("cli", ["segment", str(w / "pictures"), "--label", "organ", *ad, *out],
                                          "without a DICOM series"),
        "4D input": ("cli", ["segment", str(w / "4d.nii.gz"), "--label", "organ", *ad, *out], "4D"),
        "output is a folder": ("cli", seg + ["--output", str(w / "sub")], "unsupported type"),
        "output below a file": ("cli", seg + ["--output", str(w / "a_file" / "x.seg.nrrd")], "cannot create the folder"),
        "output where no file can be made": ("cli", seg + ["--output", "/proc/x.seg.nrrd"], "cannot write to /proc"),
        "output of an unknown type": ("cli", seg + ["--output", str(w / "x.png")], "unsupported type"),
        "preview not a PNG": ("cli", seg + out + ["--preview", str(w / "x.jpg")], "must be a .png"),
        # segment: numbers and choices
        "threshold 0": ("cli", seg + out + ["--threshold", "0"], "not a probability"),
        "threshold nan": ("cli", seg + out + ["--threshold", "nan"], "not a probability"),
        "threshold not a number": ("cli", seg + out + ["--threshold", "half"], "invalid float value"),
        "window nan,nan": ("cli", seg + out + ["--window", "nan,nan"], "must be positive and finite"),
        "window with a negative width": ("cli", seg + out + ["--window", "40,-400"], "must be positive"),
        "window of one number": ("cli", seg + out + ["--window", "40"], "LEVEL,WIDTH"),
        "empty label": ("cli", ["segment", ct, "--label", " ", *ad, *out], "no label name"),
        "no label": ("cli", ["segment", ct, *ad, *out], "required: --label"),
        "unknown option": ("cli", seg + out + ["--bogus"], "unrecognized arguments: --bogus"),
        "unknown axis": ("cli", seg + out + ["--axis", "oblique"], "invalid choice"),
        "no command": ("cli", [], "required: COMMAND"),
        "missing adapter": ("cli", ["segment", ct, "--label", "organ", "--adapter", str(w / "none.safetensors"), *out],
                            "does not exist"),
        "corrupt adapter": ("cli", ["segment", ct, "--label", "organ", "--adapter", str(w / "corrupt.adapter.safetensors"),
                                    *out], "damaged"),
        "adapter of another base": ("cli", ["segment", ct, "--label", "organ", "--adapter", str(w / "tiny.adapter.safetensors"),
                                            "--base", "test-vit", *out], "test-tinyvit, not test-vit"),
        "unknown label without a text encoder": ("cli", ["segment", ct, "--label", "tumor", "--adapter",
                                                         str(w / "clip.adapter.safetensors"), *out], "tumor"),
        "unknown device": ("cli", seg + out + ["--device", "quantum"], "quantum"),
        # segment: DICOM
        "DICOM series with a missing slice": ("cli", ["segment", str(w / "dicom_gap"), "--label", "organ", *ad, *out],
                                              "has a gap"),
        "DICOM series with an unreadable slice": ("cli", ["segment", str(w / "dicom_broken"), "--label", "organ", *ad,
                                                          *out], "not readable DICOM"),
        "DICOM series UID not in the folder": ("cli", ["segment", str(w / "dicom_ok"), "--label", "organ", *ad, *out,
                                                       "--series", "1.2.3"], "has no DICOM series 1.2.3"),
        # evaluate
        "evaluate: existing report.json": ("cli", ["evaluate", str(w / "done.seg.nrrd"), str(w / "done.seg.nrrd"),
                                                   "--output", str(w / "report")], "report.json already exists"),
        "evaluate: existing report.csv only": ("cli", ["evaluate", str(w / "done.seg.nrrd"), str(w / "done.seg.nrrd"),
                                                       "--output", str(w / "half")], "half.csv already exists"),
        "evaluate: missing prediction creates no folder": ("cli", ["evaluate", str(w / "none.seg.nrrd"), str(w / "done.seg.nrrd"),
                                                                   "--output", str(w / "reports" / "r")], "does not exist"),
        "evaluate: report onto the prediction": ("cli", ["evaluate", str(w / "report.json"), str(w / "done.seg.nrrd"),
                                                         "--output", str(w / "report.json"), "--overwrite"], "is the input"),
        "evaluate: report where no file can be made": ("cli", ["evaluate", str(w / "done.seg.nrrd"), str(w / "done.seg.nrrd"),
                                                               "--output", "/proc/r"], "cannot write to /proc"),
        # train
        "train: --lr -1": ("cli", train + ["--lr", "-1"], "--lr -1.0 must be a finite number above 0 (or 0)"),
        "train: --lr nan": ("cli", train + ["--lr", "nan"], "--lr nan"),
        "train: --lr-singular-values -0.5": ("cli", train + ["--lr-singular-values", "-0.5"], "--lr-singular-values -0.5"),
        "train: --steps 0": ("cli", train + ["--steps", "0"], "--steps 0 must be a whole number of at least 1"),
        "train: --steps -1": ("cli", train + ["--steps", "-1"], "--steps -1"),
        "train: --epochs 0": ("cli", train + ["--epochs", "0"], "--epochs 0"),
        "train: --batch-size 0": ("cli", train + ["--batch-size", "0"], "--batch-size 0"),
        "train: --micro-batch above the batch": ("cli", train + ["--batch-size", "4", "--micro-batch", "8"],
                                                 "larger than --batch-size"),
        "train: --steps and --epochs both": ("cli", train + ["--steps", "5", "--epochs", "2"], "--steps or --epochs, not both"),
        "train: --budget 0": ("cli", train + ["--budget", "0"], "--budget 0.0 must be a finite number above 0"),
        "train: --patience -1": ("cli", train + ["--patience", "-1"], "--patience -1"),
        "train: --val-fraction 1.5": ("cli", train + ["--val-fraction", "1.5"], "--val-fraction 1.5"),
        "train: --image-size 100": ("cli", train + ["--image-size", "100"], "multiple of 16"),
        "train: --seed -3": ("cli", train + ["--seed", "-3"], "--seed -3"),
        "train: existing adapter": ("cli", train[:-1] + [str(w / "old.adapter.safetensors")], "old.adapter.safetensors already exists"),
        "train: existing metrics": ("cli", train[:-1] + [str(w / "kept.adapter.safetensors")], "kept.metrics.csv already exists"),
        "train: output onto the dataset's labels.json": ("cli", train[:-1] + [str(w / "data" / "labels.json"), "--overwrite"],
                                                         "is the input"),
        "train: masks with values not in labels.json": ("cli", ["train", str(w / "data_mismatch"), *train[2:]],
                                                        "values do not match the label mapping"),
        "train: output is a folder": ("cli", train[:-1] + [str(w / "sub")], "is a folder"),
        "train: missing dataset": ("cli", ["train", str(w / "nothing"), *train[2:]], "does not exist"),
        "train: missing checkpoint to resume": ("cli", train + ["--resume", str(w / "none.checkpoint.safetensors")],
                                                "checkpoint"),
        # download
        "download: unknown weights": ("cli", ["download", "sam_vit_z"], "invalid choice"),
        "download: different file in the cache": ("env-cli", (["download", "sam_vit_b"], {"SSAM_CACHE_DIR": str(w / "cache")}),
                                                  "add --overwrite"),
        "download: cache folder is a file": ("env-cli", (["download", "sam_vit_b"], {"SSAM_CACHE_DIR": str(w / "a_file")}),
                                             "a_file is a file"),
        # demo
        "demo: output folder is a file": ("cli", ["demo", "--output", str(w / "a_file"), "--device", "cpu"], "is a file"),
        "demo: earlier results": ("cli", ["demo", "--output", str(w / "demo_done"), "--device", "cpu"], "already exists"),
        # the batch script
        "batch: re-run onto earlier results": ("batch", ["--input", ct, "--label", "organ", "--output", str(w), *ad],
                                               "ct.seg.nrrd already exists; add --overwrite"),
        "batch: output onto the input": ("batch", ["--input", str(w / "done.seg.nrrd"), "--label", "organ", "--output", str(w),
                                                   *ad, "--overwrite"], "is the input"),
        "batch: missing input creates no folder": ("batch", ["--input", str(w / "nope.nii.gz"), "--label", "organ",
                                                             "--output", str(w / "batch_out"), *ad], "does not exist"),
        "batch: unknown axis": ("batch", ["--input", ct, "--label", "organ", "--output", str(w / "b"), "--axis", "up"],
                                "invalid choice"),
        "batch: DICOM gap": ("batch-case", ["--input", str(w / "dicom_gap"), "--label", "organ", "--output",
                                            str(w / "batch_out"), *ad], "has a gap"),
        # the Python API
        "api: segment_file(None)": ("api", lambda m: _api_segment_file(m, w, None, w / "x.seg.nrrd"), "no input image given"),
        "api: segment_file onto its input": ("api", lambda m: _api_segment_file(m, w, w / "ct.nii.gz", w / "ct.nii.gz"),
                                             "is the input"),
        "api: segment_file onto an earlier result": ("api", lambda m: _api_segment_file(m, w, w / "ct.nii.gz", w / "done.seg.nrrd"),
                                                     "overwrite=True"),
        "api: model.segment(None)": ("api", lambda m: m.segment(None, ["organ"]), "NoneType, not an image"),
        "api: model.segment of a 5D array": ("api", lambda m: m.segment(np.zeros((2,) * 5), ["organ"]), "5 dimension"),
        "api: model.segment with a number for labels": ("api", lambda m: m.segment(np.zeros((8, 8)), 5), "not label names"),
        "api: model.segment of a string": ("api", lambda m: m.segment("ct.nii.gz", ["organ"]), "str, not an image"),
        "api: train with lr -1": ("api", lambda m: _api_train(w, lr=-1.0), "--lr -1.0"),
        "api: train with max_steps 0": ("api", lambda m: _api_train(w, max_steps=0), "--max-steps 0"),
        "api: train with epochs as text": ("api", lambda m: _api_train(w, epochs="5"), "--epochs '5' must be a whole number"),
        "api: train on no data": ("api", lambda m: _api_train(w, data=None), "is not a dataset folder"),
        "api: segment_file to a number": ("api", lambda m: _api_segment_file(m, w, w / "ct.nii.gz", 5), "not a file path"),
    }


def _api_segment_file(model, w, source, output):
    import SSAMSegmentLib

    return SSAMSegmentLib.segment_file(model, source, ["organ"], output)


def _api_train(w, **options):
    import SSAMSegmentLib

    values = dict(data=str(w / "data"), output=str(w / "api.adapter.safetensors"), base="test-vit", image_size=64,
                  device="cpu")
    config = SSAMSegmentLib.TrainingConfig(**{**values, **options})
    return SSAMSegmentLib.train(config)


@pytest.fixture(scope="module")
def model(work):
    import SSAMSegmentLib

    return SSAMSegmentLib.load(base="test-vit", adapter=work / "test.adapter.safetensors", device="cpu")


@pytest.fixture(scope="module")
def demo_results(work):
    """An earlier demo run's files (only the existence matters for the row)."""
    folder = work / "demo_done"
    folder.mkdir()
    (folder / "CT_small.seg.nrrd").write_bytes(b"earlier")
    return folder


def test_every_bad_input_is_one_line_exit_2_and_changes_nothing(work, model, demo_results, capfd, monkeypatch):
    import warnings

    monkeypatch.chdir(work)  # default outputs land in the user's folder
    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)  # the batch script installs its own
    batch = _batch_module()
    rows = _rows(work)
    assert len(rows) >= 40
    failures = []
    for name, (kind, arguments, expected) in rows.items():
        before = _snapshot(work)
        capfd.readouterr()
        if kind == "cli":
            code = cli.main(arguments)
        elif kind == "env-cli":
            arguments, env = arguments
            with monkeypatch.context() as patch:
                for key, value in env.items():
                    patch.setenv(key, value)
                code = cli.main(arguments)
        elif kind in ("batch", "batch-case"):
            code = batch.run(arguments)
        else:
            try:
                arguments(model)
                code = 0
            except SSAMError as error:
                print(f"error: {error}", file=sys.stderr)
                code = error.exit_code
        captured = capfd.readouterr()
        stream = captured.out if kind == "batch-case" else captured.err  # the batch script logs cases on stdout
        lines = [line for line in stream.splitlines() if line.strip()]
        if kind == "batch-case":  # a case that fails is reported and the others done: exit 1, its FAILED line
            lines = [line for line in lines if line.startswith("FAILED")]
            expected_code, err_ok = 1, not captured.err.strip()
        else:
            expected_code, err_ok = 2, True
        problems = []
        if code != expected_code:
            problems.append(f"exit {code}")
        if len(lines) != 1 or not err_ok:
            problems.append(f"{len(lines)} lines: {stream[-600:]!r} {captured.err[-300:]!r}")
        elif expected not in lines[0]:
            problems.append(f"{expected!r} not in {lines[0]!r}")
        after = _snapshot(work)
        if after != before:
            changed = sorted(str(p.relative_to(work)) for p in set(before) | set(after) if before.get(p) != after.get(p))
            problems.append(f"changed {changed}")
            for path in set(after) - set(before):  # keep later rows meaningful
                if path.is_file():
                    path.unlink()
        if os.environ.get("SSAM_SHOW_ROWS"):
            with open(os.environ["SSAM_SHOW_ROWS"], "a") as log:
                print(f"{name:<48} {code} {lines[:1]}", file=log)
        if problems:
            failures.append(f"{name}: {'; '.join(problems)}")
    assert not failures, "\n".join(failures)


def _wait_until_importing_torch(process, timeout=120.0):
    """Block until the process has begun loading PyTorch's libraries (its import at start-up), read from
    /proc/PID/maps: a fixed delay on a loaded machine may still be inside Python's own start-up, before any code of
    ours could install a handler."""
    maps = Path(f"/proc/{process.pid}/maps")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if "torch" in maps.read_text():
                return
        except OSError:
            pass
        time.sleep(0.02)
    pytest.fail("the process never began importing PyTorch")


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc to see when PyTorch is being imported")
def test_ctrl_c_during_start_up_is_one_line_and_exit_130(work):
    """SIGINT while Python imports PyTorch (the first seconds), and a moment later: no KeyboardInterrupt traceback."""
    for extra_delay in (0.0, 0.8):
        process = subprocess.Popen([sys.executable, "-m", "SSAMSegmentLib.cli", "segment", str(work / "ct.nii.gz"),
                                    "--label", "organ", "--output", str(work / "ctrl_c.seg.nrrd")],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
        _wait_until_importing_torch(process)
        time.sleep(extra_delay)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=120)
        lines = stderr.strip().splitlines()
        assert process.returncode == 130, (extra_delay, stderr)
        assert len(lines) == 1 and "cancelled (Ctrl-C)" in lines[0], (extra_delay, stderr)
        assert not (work / "ctrl_c.seg.nrrd").exists()


def test_itk_warnings_add_no_line_in_a_real_process(work):
    """ITK warns in several lines about a NIfTI voxel size of 0 (its sform scales); the user sees one line only."""
    run = subprocess.run([sys.executable, "-m", "SSAMSegmentLib.cli", "evaluate", str(work / "zero_spacing.nii"),
                          str(work / "done.seg.nrrd")], capture_output=True, text=True, env=ENV, timeout=300)
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 2 and len(lines) == 1 and "ssam evaluate: error:" in lines[0], run.stderr


def test_choices_made_for_the_user_are_one_note_line_each(work, capfd, monkeypatch):
    """Two series in one folder: the larger is used, and one line says which and how to choose another; a NIfTI
    voxel size of 0 read as 1 mm is said too. Both results are written."""
    monkeypatch.chdir(work)
    adapter = ["--adapter", str(work / "test.adapter.safetensors")]
    capfd.readouterr()
    assert cli.main(["segment", str(work / "dicom_two"), "--label", "organ", *adapter, "--output",
                     str(work / "notes" / "two.seg.nrrd")]) == 0
    notes = [line for line in capfd.readouterr().err.splitlines() if ": note: " in line]
    assert len(notes) == 1 and "holds 2 DICOM series; using 1.2.826.0.1.3680043.2.1125.1 (5 files)" in notes[0]
    assert "--series UID" in notes[0] and "1.2.826.0.1.3680043.2.1125.9 (3 files)" in notes[0]
    assert cli.main(["segment", str(work / "dicom_two"), "--label", "organ", *adapter, "--series",
                     "1.2.826.0.1.3680043.2.1125.9", "--output", str(work / "notes" / "localizer.seg.nrrd")]) == 0
    assert not [line for line in capfd.readouterr().err.splitlines() if ": note: " in line]
    from SSAMSegmentLib.files.seg_nrrd import read_seg_nrrd

    masks, _ = read_seg_nrrd(work / "notes" / "localizer.seg.nrrd")
    assert masks["organ"].GetSize()[2] == 3  # the series asked for
    assert cli.main(["segment", str(work / "zero_spacing.nii"), "--label", "organ", *adapter, "--output",
                     str(work / "notes" / "zero.seg.nrrd")]) == 0
    notes = [line for line in capfd.readouterr().err.splitlines() if ": note: " in line]
    assert len(notes) == 1 and "no valid voxel size along x" in notes[0] and "read as 1 mm" in notes[0]


def test_overwrite_replaces_the_whole_set_and_nothing_else(work, tmp_path, capfd):
    """The counterpart of the refusals: with --overwrite an earlier label map, its sidecar and preview are replaced
    together; the input and every other file stay as they were."""
    import shutil

    shutil.copy(work / "ct.nii.gz", tmp_path / "ct.nii.gz")
    arguments = ["segment", str(tmp_path / "ct.nii.gz"), "--label", "organ", "--label", "vessel", "--adapter",
                 str(work / "test.adapter.safetensors"), "--output", str(tmp_path / "ct_labels.nii.gz"),
                 "--preview", str(tmp_path / "ct.png")]
    assert cli.main(arguments[:4] + arguments[6:]) == 0  # organ only
    first = _snapshot(tmp_path)
    assert cli.main(arguments) == 2 and "already exists; add --overwrite" in capfd.readouterr().err
    assert _snapshot(tmp_path) == first
    assert cli.main(arguments + ["--overwrite"]) == 0
    second = _snapshot(tmp_path)
    assert set(second) == set(first)
    assert second[tmp_path / "ct.nii.gz"] == first[tmp_path / "ct.nii.gz"]
    assert all(second[tmp_path / name] != first[tmp_path / name] for name in ("ct_labels.nii.gz", "ct_labels.json", "ct.png"))
    assert "vessel" in (tmp_path / "ct_labels.json").read_text()
