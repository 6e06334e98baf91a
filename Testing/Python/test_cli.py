"""The `ssam` command as a user runs it: outputs that Slicer opens, Ctrl-C with exit code 130 and no output, `ssam info`
counts. One-line errors with exit code 2 and no output are the rows of test_bad_input.py."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import SimpleITK as sitk


from conftest import REPO
from helpers import perturbed_model
from SSAMSegmentLib.model import labels

ENV = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")


def ssam(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "SSAMSegmentLib.cli", *map(str, args)], capture_output=True,
                          text=True, env=ENV, timeout=timeout)


def _adapter(path, base="test-vit", text_encoder="minilm-l6", labels=("organ", "vessel")):
    model = perturbed_model(base, labels=labels, seed=7, text_encoder=text_encoder,
                            image_size=64 if base == "test-vit" else None)
    return model.save_adapter(path, {"epochs": 1, "data": "generated"})


def _volume(path, shape=(8, 48, 40), direction=None):
    rng = np.random.default_rng(0)
    array = rng.normal(40, 30, shape).astype(np.int16)
    array[:, 10:30, 8:28] += 200
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.9, 0.8, 3.0))
    image.SetOrigin((5.0, -20.0, 40.0))
    if direction is not None:
        image.SetDirection(direction)
    sitk.WriteImage(image, str(path))
    return image


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    return _adapter(tmp_path_factory.mktemp("adapters") / "test.adapter.safetensors")


def _read_with_slicer(path):
    """Segment names as slicer-core's own vtkMRMLSegmentationStorageNode reads them."""
    from test_seg_nrrd import SlicerScene

    segments, _ = SlicerScene().read(path)
    return list(segments)


def test_segment_writes_a_segmentation_slicer_opens(adapter, tmp_path):
    image = _volume(tmp_path / "ct.nii.gz", direction=(0.96, 0.28, 0, -0.28, 0.96, 0, 0, 0, 1))
    out = tmp_path / "result" / "ct.seg.nrrd"
    run = ssam("segment", tmp_path / "ct.nii.gz", "--label", "organ", "--label", "Vessels", "--adapter", adapter,
               "--output", out, "--preview", tmp_path / "result" / "ct.png")
    assert run.returncode == 0, run.stderr
    assert f"wrote {out}" in run.stdout and "ct.png" in run.stdout
    assert _read_with_slicer(out) == ["organ", "vessel"]  # a plural is segmented as the trained label, and said so
    assert f"note: {labels.mapping_note(labels.match_labels(['Vessels'], ['vessel']))}" in run.stdout.splitlines()
    from SSAMSegmentLib.files.seg_nrrd import read_seg_nrrd
    from SSAMSegmentLib.files.image_io import same_geometry

    masks, _ = read_seg_nrrd(out)
    assert all(same_geometry(mask, image, tolerance=1e-5) for mask in masks.values())
    assert (tmp_path / "result" / "ct.png").stat().st_size > 1000
    assert "slices" in run.stdout and "axial" in run.stdout


def test_segment_to_a_label_map_absent_and_untaught_labels(adapter, tmp_path):
    _volume(tmp_path / "ct.nrrd")
    out = tmp_path / "ct_labels.nii.gz"
    run = ssam("segment", tmp_path / "ct.nrrd", "--label", "organ,tumour", "--adapter", adapter, "--output", out,
               "--threshold", "0.999999", "--precision", "float32")
    assert run.returncode == 0, run.stderr
    # An empty taught label is a valid answer, said plainly; an untaught one is never called absent, and the user is
    # told why and how to fix it (wording: test_labels.py).
    assert f"; {labels.EMPTY_TAUGHT}: organ; {labels.EMPTY_UNTAUGHT}: tumour [" in run.stdout
    matches = labels.match_labels(["organ", "tumour"], ["organ", "vessel"])
    said = [line for line in run.stderr.splitlines() if line.startswith("ssam segment:")]  # not the progress lines
    assert said == [f"ssam segment: warning: {labels.untaught_warning(matches, ['organ', 'vessel'])}"]
    assert "float32" in run.stdout  # the precision that ran is said
    # Nothing found on the probes: only they were encoded (the summary says how many).
    assert "slices (" in run.stdout and "encoded)" in run.stdout
    bad = ssam("segment", tmp_path / "ct.nrrd", "--label", "organ", "--adapter", adapter, "--output",
               tmp_path / "other.nii.gz", "--precision", "fp8")
    assert bad.returncode == 2 and not (tmp_path / "other.nii.gz").exists()
    assert sitk.ReadImage(str(out)).GetSize() == (40, 48, 8)
    assert (tmp_path / "ct_labels.json").is_file()


def test_segment_2d_rgb_picture(adapter, tmp_path):
    rgb = np.random.default_rng(2).integers(0, 255, (60, 80, 3), dtype=np.uint8)
    sitk.WriteImage(sitk.GetImageFromArray(rgb, isVector=True), str(tmp_path / "polyp.png"))
    run = ssam("segment", tmp_path / "polyp.png", "--label", "organ", "--adapter", adapter, "--output",
               tmp_path / "polyp.seg.nrrd")
    assert run.returncode == 0, run.stderr
    assert _read_with_slicer(tmp_path / "polyp.seg.nrrd") == ["organ"]


# Other bad inputs (one line, exit code 2, nothing written) are rows of test_bad_input.py; the prompt rows here.
def _bad_inputs(tmp_path, adapter):
    ok, out = tmp_path / "ok.nii.gz", tmp_path / "out.seg.nrrd"
    _volume(ok)
    return {
        "box outside the image": (["segment", ok, "--label", "organ", "--adapter", adapter, "--output", out, "--box", "900,900,0,950,950,1"], "outside the image"),
        "box of 3 numbers": (["segment", ok, "--label", "organ", "--adapter", adapter, "--output", out, "--box", "1,2,3"], "6 numbers"),
        "point for another label": (["segment", ok, "--label", "organ", "--adapter", adapter, "--output", out, "--point", "vessel=10,0,50"], "not among --label"),
        "box-only without a box": (["segment", ok, "--label", "organ", "--adapter", adapter, "--output", out, "--box-only"], "needs a --box"),
    }


def test_bad_prompts_fail_with_one_line_exit_2_and_no_output(adapter, tmp_path):
    for case, (args, expected) in _bad_inputs(tmp_path, adapter).items():
        before = set(tmp_path.rglob("*"))
        run = ssam(*args)
        assert run.returncode == 2, (case, run.returncode, run.stderr[-1500:])
        lines = [line for line in run.stderr.strip().splitlines() if line.strip()]
        assert len(lines) == 1 and "Traceback" not in run.stderr, (case, run.stderr[-1500:])
        assert lines[0].startswith("ssam segment: error:") and expected in lines[0], (case, lines[0])
        assert set(tmp_path.rglob("*")) == before, (case, set(tmp_path.rglob("*")) - before)


def test_segment_with_a_box_and_points_in_lps_millimetres(adapter, tmp_path):
    image = _volume(tmp_path / "ct.nii.gz")
    corner = lambda index: ",".join(f"{v:g}" for v in image.TransformIndexToPhysicalPoint(index))  # noqa: E731
    out = tmp_path / "ct.seg.nrrd"
    run = ssam("segment", tmp_path / "ct.nii.gz", "--label", "organ", "--label", "vessel", "--adapter", adapter,
               "--output", out, "--box", f"organ={corner((8, 10, 4))},{corner((27, 29, 4))}",
               "--point", f"organ={corner((18, 20, 4))}", "--negative-point", f"organ={corner((2, 2, 4))}")
    assert run.returncode == 0, run.stderr
    assert "organ (" in run.stdout and "corrected on slices" in run.stdout and "confidence" in run.stdout
    assert "LPS" in ssam("segment", "--help").stdout


def test_ctrl_c_stops_and_writes_nothing(adapter, tmp_path):
    _volume(tmp_path / "long.nii.gz", shape=(400, 64, 64))
    out = tmp_path / "long.seg.nrrd"
    process = subprocess.Popen([sys.executable, "-m", "SSAMSegmentLib.cli", "segment", str(tmp_path / "long.nii.gz"),
                                "--label", "organ", "--adapter", str(adapter), "--output", str(out)],
                               stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=ENV)
    line = process.stderr.readline()  # the first progress line: slices are being segmented
    assert "segmenting" in line, line
    time.sleep(0.5)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "cancelled" in stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["long.nii.gz"]


@pytest.mark.slow
def test_info_counts_for_the_paper_setting():
    run = ssam("info", "--base", "sam_vit_b", "--text-encoder", "clip-vit-b-32", "--image-size", "256", "--no-weights")
    assert run.returncode == 0, run.stderr
    assert "444,672 trainable" in run.stdout
    for line in ("singular values", "74,752"), ("norms", "36,864"), ("positional embedding", "196,608"), \
                ("text affine layer", "131,840"), ("decoder norms", "4,608"):
        assert any(line[0] in row and row.rstrip().endswith(line[1]) for row in run.stdout.splitlines()), line


def test_info_of_an_adapter(adapter):
    run = ssam("info", "--adapter", adapter, "--no-weights")
    assert run.returncode == 0, run.stderr
    assert "organ, vessel" in run.stdout and "base SHA256" in run.stdout and "data" in run.stdout
    assert "input slices  slice k\n" in run.stdout  # an adapter trained without --neighbour-slices
    assert "test-vit" in run.stdout


def test_evaluate_command(adapter, tmp_path):
    _volume(tmp_path / "ct.nii.gz")
    out = tmp_path / "pred.seg.nrrd"
    assert ssam("segment", tmp_path / "ct.nii.gz", "--label", "organ", "--adapter", adapter, "--output", out).returncode == 0
    run = ssam("evaluate", out, out, "--output", tmp_path / "report")
    assert run.returncode == 0, run.stderr
    assert "organ" in run.stdout and "1.000" in run.stdout
    assert (tmp_path / "report.json").is_file() and (tmp_path / "report.csv").is_file()


def test_segment_says_when_a_label_was_taught_on_other_kinds_of_image(tmp_path):
    """'organ' taught on 3D volumes only, asked on a colour photograph: the warning on stderr once, the empty mask
    not found (never absent), exit 0; on a volume nothing is said."""
    model = perturbed_model("test-vit", labels=("organ",), seed=7, image_size=64)
    model.label_kinds = {"organ": ["3D"]}
    adapter = model.save_adapter(tmp_path / "volumes.adapter.safetensors")
    rng = np.random.default_rng(2)
    sitk.WriteImage(sitk.GetImageFromArray(rng.integers(0, 255, (40, 48, 3)).astype(np.uint8), isVector=True),
                    str(tmp_path / "photo.png"))
    run = ssam("segment", tmp_path / "photo.png", "--label", "organ", "--adapter", adapter, "--output",
               tmp_path / "photo.seg.nrrd", "--threshold", "0.999999")
    assert run.returncode == 0, run.stderr
    said = [line for line in run.stderr.splitlines() if line.startswith("ssam segment:")]
    assert said == [f"ssam segment: warning: {labels.other_kind_warning(['organ'], model.label_kinds, '2D RGB')}"]
    assert f"{labels.EMPTY_OTHER_KIND}: organ" in run.stdout and labels.EMPTY_TAUGHT not in run.stdout
    _volume(tmp_path / "ct.nrrd")
    run = ssam("segment", tmp_path / "ct.nrrd", "--label", "organ", "--adapter", adapter, "--output",
               tmp_path / "ct.seg.nrrd")
    assert run.returncode == 0 and "warning" not in run.stderr, run.stderr
    info = ssam("info", "--adapter", adapter, "--no-weights")
    assert info.returncode == 0 and "  taught on     organ (3D)\n" in info.stdout, info.stdout
