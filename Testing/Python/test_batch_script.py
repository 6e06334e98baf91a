"""SSAMSegment/SSAMSegmentBatch.py run as a separate process, as `Slicer --python-script` would run it.

Real images from ../shared/data (CT NIfTI, a DICOM series folder, an endoscopy JPEG) with a tiny random-weight
adapter so the runs are quick: these tests check the script's contract (one .seg.nrrd per case with the input's
grid, a summary line per case, exit codes, no output on failure), not segmentation quality.
"""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from SSAMSegmentLib.files.image_io import read_image, same_geometry
from SSAMSegmentLib.files.seg_nrrd import read_seg_nrrd

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "SSAMSegment" / "SSAMSegmentBatch.py"


def run_batch(*args, timeout=600):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env.pop("PYTHONPATH", None)  # the script must find SSAMSegmentLib by itself
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=str(REPO.parent))


@pytest.fixture(scope="module")
def tiny_adapter(tmp_path_factory):
    """An adapter on the tiny random-weight test base (offline, fast)."""
    import SSAMSegmentLib

    path = tmp_path_factory.mktemp("adapter") / "tiny.adapter.safetensors"
    model = SSAMSegmentLib.load(base="test-vit", device="cpu")
    model.save_adapter(path)
    return path


@pytest.fixture
def cases(data_dir, tmp_path):
    """A folder of real cases: CT NIfTI, a DICOM series sub-folder, an RGB JPEG; and two bad ones: a 4D series
    made from the CT, and a file that is not an image at all."""
    folder = tmp_path / "cases"
    folder.mkdir()
    ct = data_dir / "totalsegmentator-ct" / "example_ct_sm.nii.gz"
    (folder / "abdomen.nii.gz").symlink_to(ct)
    (folder / "chest_dicom").symlink_to(data_dir / "dcmqi-ct-3slice", target_is_directory=True)
    (folder / "polyp.jpg").symlink_to(sorted((data_dir / "kvasir-seg-5" / "images").iterdir())[0])
    volume = sitk.ReadImage(str(ct))
    sitk.WriteImage(sitk.JoinSeries([volume, volume]), str(folder / "breathing.nii.gz"))
    (folder / "broken.nii.gz").write_bytes(b"this is not a NIfTI file" * 100)
    (folder / "notes.txt").write_text("not an image, ignored")
    return folder


@pytest.mark.data
@pytest.mark.slow
def test_folder_of_real_cases_one_failing(cases, tiny_adapter, tmp_path):
    output = tmp_path / "out"
    run = run_batch("--input", cases, "--label", "liver", "--label", "spleen, kidney", "--output", output,
                    "--adapter", tiny_adapter, "--device", "cpu")
    assert run.returncode == 1, run.stdout + run.stderr
    lines = run.stdout.splitlines()
    assert [line for line in lines if line.startswith("FAILED breathing.nii.gz: ")][0].endswith(
        "extract one time point or channel from a 4D series first)")
    assert any(line.startswith("FAILED broken.nii.gz: cannot read") for line in lines)
    for name in ("abdomen.nii.gz", "chest_dicom", "polyp.jpg"):
        assert any(line.startswith(f"OK     {name} -> ") for line in lines), run.stdout
    assert lines[-1] == "3 of 5 case(s) segmented; failed: breathing.nii.gz, broken.nii.gz"
    assert sorted(p.name for p in output.iterdir()) == ["abdomen.seg.nrrd", "chest_dicom.seg.nrrd", "polyp.seg.nrrd"]
    for source, written in (("abdomen.nii.gz", "abdomen.seg.nrrd"), ("chest_dicom", "chest_dicom.seg.nrrd"),
                            ("polyp.jpg", "polyp.seg.nrrd")):
        masks, colors = read_seg_nrrd(output / written)
        assert list(masks) == ["liver", "spleen", "kidney"]
        image = read_image(cases / source)
        mask = masks["liver"]
        if image.GetDimension() == 2:  # a 2D picture is stored as one slice
            assert mask.GetSize()[:2] == image.GetSize() and mask.GetSize()[2:] in ((), (1,))
        else:
            assert same_geometry(mask, image)
        assert sitk.GetArrayViewFromImage(mask).dtype == np.uint8


@pytest.mark.data
@pytest.mark.slow
def test_single_picture_and_slicer_reads_the_output(data_dir, tiny_adapter, tmp_path):
    slicer = pytest.importorskip("slicer")
    source = sorted((data_dir / "kvasir-seg-5" / "images").iterdir())[1]
    run = run_batch("--input", source, "--label", "gland", "--output", tmp_path / "out", "--adapter", tiny_adapter,
                    "--device", "cpu", "--axis", "axial")
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.splitlines()[-1] == "1 of 1 case(s) segmented"
    written = tmp_path / "out" / source.name.replace(".jpg", ".seg.nrrd")
    assert [p.name for p in written.parent.iterdir()] == [written.name]
    scene = slicer.vtkMRMLScene()
    from SSAMSegmentLib.slicer.scene_nodes import ensure_segmentation_support

    ensure_segmentation_support(scene)
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    storage = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    storage.SetFileName(str(written))
    assert storage.ReadData(segmentation)
    assert segmentation.GetSegmentation().GetNthSegment(0).GetName() == "gland"


@pytest.mark.data
@pytest.mark.slow
def test_bad_arguments_exit_2_and_write_nothing(data_dir, tiny_adapter, tmp_path):
    source = data_dir / "totalsegmentator-ct" / "example_ct_sm.nii.gz"
    output = tmp_path / "out"
    empty = tmp_path / "empty"
    empty.mkdir()
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    bad = {
        "no label": ["--input", source, "--output", output],
        "empty label": ["--input", source, "--label", " , ", "--output", output],
        "missing input": ["--input", tmp_path / "nothing.nii.gz", "--label", "liver", "--output", output],
        "empty folder": ["--input", empty, "--label", "liver", "--output", output],
        "output is a file": ["--input", source, "--label", "liver", "--output", a_file],
        "bad axis": ["--input", source, "--label", "liver", "--output", output, "--axis", "oblique"],
        "bad self-box": ["--input", source, "--label", "liver", "--output", output, "--self-box", "always"],
        "missing adapter": ["--input", source, "--label", "liver", "--output", output,
                            "--adapter", tmp_path / "none.adapter.safetensors"],
        "bad device": ["--input", source, "--label", "liver", "--output", output, "--adapter", tiny_adapter,
                       "--device", "quantum"],
    }
    for case, args in bad.items():
        run = run_batch(*args)
        assert run.returncode == 2, f"{case}: {run.returncode} {run.stdout} {run.stderr}"
        lines = run.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("SSAMSegmentBatch.py: error: "), f"{case}: {run.stderr}"
        assert "Traceback" not in run.stderr, case
        assert not output.exists(), case


@pytest.mark.data
def test_two_inputs_with_one_output_name_are_refused(data_dir, tmp_path):
    folder = tmp_path / "same"
    folder.mkdir()
    (folder / "case.nii.gz").symlink_to(data_dir / "totalsegmentator-ct" / "example_ct_sm.nii.gz")
    (folder / "case.nrrd").symlink_to(data_dir / "dcmqi-ct-3slice" / "liver_seg.nrrd")
    run = run_batch("--input", folder, "--label", "liver", "--output", tmp_path / "out")
    assert run.returncode == 2 and "would both be written to case.seg.nrrd" in run.stderr


def test_help_exits_0():
    run = run_batch("--help")
    assert run.returncode == 0 and "--input" in run.stdout + run.stderr


@pytest.mark.data
@pytest.mark.slow
def test_dicom_seg_for_the_dicom_inputs_when_asked(data_dir, tiny_adapter, tmp_path):
    pydicom = pytest.importorskip("pydicom")
    from SSAMSegmentLib.files.dicom_seg import referenced_instances
    from SSAMSegmentLib.files.dicom_series import DicomSeries

    folder = tmp_path / "cases"
    folder.mkdir()
    (folder / "abdomen.nii.gz").symlink_to(data_dir / "totalsegmentator-ct" / "example_ct_sm.nii.gz")
    (folder / "chest_dicom").symlink_to(data_dir / "dcmqi-ct-3slice", target_is_directory=True)
    run = run_batch("--input", folder, "--label", "liver", "--output", tmp_path / "out", "--adapter", tiny_adapter,
                    "--device", "cpu", "--dicom-seg")
    assert run.returncode == 0, run.stdout + run.stderr
    assert any(line.startswith("OK     chest_dicom -> ") and line.split(" -> ")[1].startswith(
        str(tmp_path / "out" / "chest_dicom.dcm")) for line in run.stdout.splitlines()), run.stdout
    # The DICOM series gets a SEG of its instances, the NIfTI (no series to reference) its .seg.nrrd.
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["abdomen.seg.nrrd", "chest_dicom.dcm"]
    seg = pydicom.dcmread(str(tmp_path / "out" / "chest_dicom.dcm"))
    assert seg.Modality == "SEG" and [str(s.SegmentLabel) for s in seg.SegmentSequence] == ["liver"]
    source = DicomSeries.of_input(data_dir / "dcmqi-ct-3slice")
    assert referenced_instances(tmp_path / "out" / "chest_dicom.dcm") == set(source.sop_instance_uids)


@pytest.mark.data
def test_untaught_labels_are_never_called_absent_and_the_warning_is_given_once(data_dir, tmp_path):
    """Two real pictures, an adapter taught "organ" only: "Organs" is read as organ, "tumour" is untaught."""
    from SSAMSegmentLib.model import labels

    from helpers import perturbed_model

    adapter = perturbed_model(labels=("organ",), seed=5).save_adapter(tmp_path / "organ.adapter.safetensors")
    folder = tmp_path / "cases"
    folder.mkdir()
    for source in sorted((data_dir / "kvasir-seg-5" / "images").iterdir())[:2]:
        (folder / source.name).symlink_to(source)
    run = run_batch("--input", folder, "--label", "Organs, tumour", "--output", tmp_path / "out", "--adapter", adapter,
                    "--device", "cpu")
    assert run.returncode == 0, run.stdout + run.stderr
    lines = run.stdout.splitlines()
    matches = labels.match_labels(["Organs", "tumour"], ["organ"])
    expected = [f"       note: {labels.mapping_note(matches)}", f"       warning: {labels.untaught_warning(matches, ['organ'])}"]
    assert [line for line in lines if line.startswith("       ")] == expected  # once, not once per case
    summaries = [line.split("): ", 1)[1] for line in lines if line.startswith("OK     ")]
    assert len(summaries) == 2
    for summary in summaries:  # tumour is either found as a guess or not found; never absent
        assert "tumour (" in summary and "untaught label: a guess" in summary or (
            f"{labels.EMPTY_UNTAUGHT}: tumour" in summary)
        assert "tumour" not in "".join(part for part in summary.split("; ") if part.startswith(labels.EMPTY_TAUGHT))
    for written in (tmp_path / "out").iterdir():
        assert list(read_seg_nrrd(written)[0]) == ["organ", "tumour"]
