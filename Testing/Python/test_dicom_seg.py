"""DICOM in, DICOM SEG out (issue 13): a SEG that references its source series, read back by highdicom, by plain
pydicom and by our reader, equal voxel for voxel to the .seg.nrrd of the same masks, in the right frames."""

import os
import subprocess
import sys
from collections import OrderedDict

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import REPO
from helpers import perturbed_model

pydicom = pytest.importorskip("pydicom")
hd = pytest.importorskip("highdicom")

from SSAMSegmentLib.errors import SSAMError  # noqa: E402
from SSAMSegmentLib.files.dicom_seg import (EMPTY_SEGMENT_DESCRIPTION, Algorithm, empty_segments,  # noqa: E402
                                            read_dicom_seg, referenced_instances, write_dicom_seg)
from SSAMSegmentLib.files.dicom_series import DicomSeries  # noqa: E402
from SSAMSegmentLib.files.image_io import read_image  # noqa: E402
from SSAMSegmentLib.files.seg_nrrd import read_seg_nrrd  # noqa: E402
from SSAMSegmentLib.files.segment_codes import segment_code  # noqa: E402
from SSAMSegmentLib.files.writers import write_outputs  # noqa: E402

ENV = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")


def ssam(*args, timeout=600, cwd=None):
    return subprocess.run([sys.executable, "-m", "SSAMSegmentLib.cli", *map(str, args)], capture_output=True,
                          text=True, env=ENV, timeout=timeout, cwd=cwd)


def _on_grid(label_map: sitk.Image, image: sitk.Image, values) -> sitk.Image:
    """A reference label map's voxels with one of `values`, as a 0/1 mask on the image's grid (nearest neighbour:
    the two grids are the same lattice, TotalSegmentator's NIfTI only runs the rows the other way)."""
    resampled = sitk.Resample(label_map, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkInt32)
    array = np.isin(sitk.GetArrayFromImage(resampled), list(values)).astype(np.uint8)
    mask = sitk.GetImageFromArray(array)
    mask.CopyInformation(image)
    return mask


def _reference_masks(data_dir, name):
    """(series folder, image, masks) with the shared data's own reference segmentations: non-trivial masks, plus
    one label absent from the series."""
    if name == "dcmqi":
        folder = data_dir / "dcmqi-ct-3slice"
        image = read_image(folder)
        masks = OrderedDict((label, _on_grid(sitk.ReadImage(str(folder / f"{label}_seg.nrrd")), image, (value,)))
                            for label, value in (("liver", 1), ("spine", 2), ("heart", 3)))
    else:
        folder = data_dir / "totalsegmentator-ct" / "example_ct_dicom"
        image = read_image(folder)
        label_map = sitk.ReadImage(str(data_dir / "totalsegmentator-ct" / "example_seg_dicom.nii.gz"))
        masks = OrderedDict((label, _on_grid(label_map, image, values))
                            for label, values in (("liver", (5,)), ("spleen", (1,)), ("aorta", (52,)),
                                                  ("vertebrae", (32, 33))))
    empty = sitk.Image(image.GetSize(), sitk.sitkUInt8)
    empty.CopyInformation(image)
    masks["kidney"] = empty  # absent from these slices' references: an empty segment
    return folder, image, masks


def _frames_by_pydicom(path, source: DicomSeries):
    """Each frame of the SEG as plain pydicom sees it: (segment number, source slice index, 0/1 frame)."""
    seg = pydicom.dcmread(str(path))
    pixels = seg.pixel_array.reshape(int(seg.NumberOfFrames), int(seg.Rows), int(seg.Columns))
    slice_of = {uid: k for k, uid in enumerate(source.sop_instance_uids)}
    frames = []
    for frame, item in zip(pixels, seg.PerFrameFunctionalGroupsSequence):
        number = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        uid = str(item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
        position = [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient]
        source_position = [float(v) for v in source.datasets[slice_of[uid]].ImagePositionPatient]
        assert np.allclose(position, source_position, atol=1e-4), "a frame's position is its source instance's"
        frames.append((number, slice_of[uid], frame))
    return seg, frames


@pytest.mark.data
@pytest.mark.parametrize("series", ["dcmqi", "totalsegmentator"])
def test_dicom_seg_round_trip_equals_the_seg_nrrd(data_dir, tmp_path, series):
    folder, image, masks = _reference_masks(data_dir, series)
    source = DicomSeries.of_input(folder)
    written = write_outputs(tmp_path / "case.dcm", image, masks, dicom_source=source,
                            algorithm=Algorithm("liver.adapter.safetensors", "ab" * 32, "litemedsam"))
    assert written == [tmp_path / "case.dcm"]
    write_outputs(tmp_path / "case.seg.nrrd", image, masks)
    nrrd, _colors = read_seg_nrrd(tmp_path / "case.seg.nrrd")
    names = list(masks)
    nrrd_arrays = {name: sitk.GetArrayFromImage(nrrd[name]) for name in names}
    assert sum(int(a.sum()) for a in nrrd_arrays.values()) > 10000  # real structures, not a blank test

    # Plain pydicom: every frame is the .seg.nrrd's slice of its segment, at its source instance's slice.
    seg, frames = _frames_by_pydicom(tmp_path / "case.dcm", source)
    assert seg.Modality == "SEG" and seg.SegmentationType == "BINARY"
    # The dcmqi outlines overlap (liver and heart share voxels), TotalSegmentator's labels do not: both of the
    # writer's forms (stacked labels, one label map) are covered.
    assert seg.SegmentsOverlap == {"dcmqi": "YES", "totalsegmentator": "NO"}[series]
    assert seg.StudyInstanceUID == source.datasets[0].StudyInstanceUID
    assert seg.FrameOfReferenceUID == source.datasets[0].FrameOfReferenceUID
    assert [str(s.SegmentLabel) for s in seg.SegmentSequence] == names
    referenced = [str(i.ReferencedSOPInstanceUID) for i in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence]
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == source.series_instance_uid
    assert set(referenced) == set(source.sop_instance_uids)
    rebuilt = {name: np.zeros_like(nrrd_arrays[name]) for name in names}
    for number, k, frame in frames:
        rebuilt[names[number - 1]][k] = frame
    for name in names:
        assert np.array_equal(rebuilt[name], nrrd_arrays[name]), name
    # Only frames with foreground are stored; the empty label is described, marked, and has none.
    assert len(frames) == sum(int(a.reshape(a.shape[0], -1).any(axis=1).sum()) for a in nrrd_arrays.values())
    assert seg.SegmentSequence[names.index("kidney")].SegmentDescription == EMPTY_SEGMENT_DESCRIPTION
    assert "empty: kidney" in seg.ContentDescription and empty_segments(tmp_path / "case.dcm") == ["kidney"]
    algorithm = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert algorithm.AlgorithmName == "SSAM Segment" and "ab" * 32 in algorithm.AlgorithmParameters
    assert "liver.adapter.safetensors" in algorithm.AlgorithmParameters

    # highdicom, indexed by the source instances.
    stacked = hd.seg.segread(str(tmp_path / "case.dcm")).get_pixels_by_source_instance(
        source.sop_instance_uids, assert_missing_frames_are_empty=True)
    for index, name in enumerate(names):
        assert np.array_equal(stacked[..., index], nrrd_arrays[name]), name

    # Our reader: on the source grid (by instance, and by position alone) and on the SEG's own grid.
    for masks_back in (read_dicom_seg(tmp_path / "case.dcm", grid=image, source=source),
                       read_dicom_seg(tmp_path / "case.dcm", grid=image)):
        assert list(masks_back) == names
        for name in names:
            assert np.array_equal(sitk.GetArrayFromImage(masks_back[name]), nrrd_arrays[name]), name
            assert masks_back[name].GetOrigin() == image.GetOrigin()
    own = read_dicom_seg(tmp_path / "case.dcm")
    liver = own["liver"]
    inside = sitk.Resample(liver, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    assert np.array_equal(sitk.GetArrayFromImage(inside), nrrd_arrays["liver"])


@pytest.mark.data
def test_codes_and_source_repairs_on_an_anonymised_series(data_dir):
    # The 20-slice series has blank Study/Series/SOP UIDs in its datasets (an anonymiser's work); the SOP UIDs are
    # in each file's meta header, the study and series are derived, and the user is told.
    source = DicomSeries.of_input(data_dir / "totalsegmentator-ct" / "example_ct_dicom")
    meta_uids = [str(ds.file_meta.MediaStorageSOPInstanceUID) for ds in source.datasets]
    assert source.sop_instance_uids == meta_uids
    assert len(source.notes) == 2 and all("PACS" in note for note in source.notes)
    again = DicomSeries.of_input(data_dir / "totalsegmentator-ct" / "example_ct_dicom")
    assert again.series_instance_uid == source.series_instance_uid  # the same series gets the same derived UID
    assert DicomSeries.of_input(data_dir / "dcmqi-ct-3slice").notes == []


def test_segment_codes_table():
    assert segment_code("liver").type.value == "10200004" and segment_code("Liver").standard
    assert segment_code("kidney_left").type.value == "64033007"
    assert segment_code("spine").type.value == "421060004"
    assert segment_code("spinal_cord").type.value == "2748008"
    assert segment_code("gallbladder").type.value == "28231008"
    assert segment_code("polyp").category.value == "49755003"  # morphologically abnormal structure
    fallback = segment_code("gland")
    assert not fallback.standard and fallback.type.value == fallback.category.value == "85756007"


def test_a_non_dicom_input_has_no_series_to_reference(tmp_path):
    image = sitk.Image([8, 8, 3], sitk.sitkInt16)
    sitk.WriteImage(image, str(tmp_path / "ct.nii.gz"))
    with pytest.raises(SSAMError, match="not DICOM, so a DICOM SEG has no source series"):
        DicomSeries.of_input(tmp_path / "ct.nii.gz")
    mask = sitk.Image([8, 8, 3], sitk.sitkUInt8)
    with pytest.raises(SSAMError, match="no source series to reference"):
        write_outputs(tmp_path / "out.dcm", image, {"liver": mask})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct.nii.gz"]


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    model = perturbed_model("test-vit", labels=("organ", "vessel"), seed=7, image_size=64)
    return model.save_adapter(tmp_path_factory.mktemp("adapters") / "test.adapter.safetensors", {"epochs": 1})


@pytest.mark.data
@pytest.mark.slow
def test_cli_writes_a_dicom_seg_for_a_dicom_series(data_dir, adapter, tmp_path, monkeypatch, capsys):
    from SSAMSegmentLib.cli import main
    from SSAMSegmentLib.model.weights import file_sha256

    folder = data_dir / "dcmqi-ct-3slice"
    job = ["segment", folder, "--label", "organ", "--label", "vessel", "--adapter", adapter]
    run = ssam(*job, "--output", tmp_path / "result.dcm")  # as a user runs it
    assert run.returncode == 0, run.stderr
    assert f"wrote {tmp_path / 'result.dcm'}" in run.stdout
    seg = pydicom.dcmread(str(tmp_path / "result.dcm"))
    assert [str(s.SegmentLabel) for s in seg.SegmentSequence] == ["organ", "vessel"]
    parameters = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0].AlgorithmParameters
    assert file_sha256(adapter) in parameters and "test.adapter.safetensors" in parameters
    source = DicomSeries.of_input(folder)
    assert referenced_instances(tmp_path / "result.dcm") == set(source.sop_instance_uids)
    # The same job written as .seg.nrrd gives the same masks (in-process: no second start of PyTorch).
    assert main([str(a) for a in job] + ["--output", str(tmp_path / "result.seg.nrrd")]) == 0
    nrrd, _ = read_seg_nrrd(tmp_path / "result.seg.nrrd")
    back = read_dicom_seg(tmp_path / "result.dcm", grid=read_image(folder), source=source)
    for name in ("organ", "vessel"):
        expected = sitk.GetArrayFromImage(nrrd[name])
        assert 0 < expected.sum() < expected.size, name  # a partial mask: the comparison means something
        assert np.array_equal(sitk.GetArrayFromImage(back[name]), expected), name
    # --format dicom-seg names the output after the input; a preview comes with it as with any output.
    monkeypatch.chdir(tmp_path)
    assert main([str(a) for a in job] + ["--format", "dicom-seg", "--preview", "preview.png"]) == 0
    assert (tmp_path / "dcmqi-ct-3slice.dcm").is_file() and (tmp_path / "preview.png").stat().st_size > 1000
    assert "wrote dcmqi-ct-3slice.dcm" in capsys.readouterr().out


def test_cli_refuses_dicom_seg_of_a_non_dicom_input_before_any_work(adapter, tmp_path, monkeypatch, capsys):
    from SSAMSegmentLib import cli
    from SSAMSegmentLib.model import loading

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the output was checked")

    monkeypatch.setattr(loading, "load", no_model)
    monkeypatch.chdir(tmp_path)
    image = sitk.GetImageFromArray(np.zeros((4, 16, 16), np.int16))
    sitk.WriteImage(image, str(tmp_path / "ct.nii.gz"))
    for args, expected in ((["--output", str(tmp_path / "result.dcm")], "no source series to reference"),
                           (["--format", "dicom-seg"], "no source series to reference"),
                           (["--output", str(tmp_path / "result.dcm"), "--format", "nifti"], "--format nifti")):
        before = set(tmp_path.rglob("*"))
        code = cli.main(["segment", str(tmp_path / "ct.nii.gz"), "--label", "organ", "--adapter", str(adapter)] + args)
        lines = [line for line in capsys.readouterr().err.strip().splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1, (args, lines)
        assert lines[0].startswith("ssam segment: error:") and expected in lines[0], lines
        assert set(tmp_path.rglob("*")) == before
    # A DICOM file segmented into a SEG named after it, in its own folder: the input is never overwritten.
    source = tmp_path / "slice.dcm"
    source.write_bytes(b"DICOM stand-in")
    code = cli.main(["segment", "slice.dcm", "--label", "organ", "--adapter", str(adapter), "--format", "dicom-seg"])
    assert code == 2 and "is the input itself" in capsys.readouterr().err
    assert source.read_bytes() == b"DICOM stand-in"
    # Without highdicom (as in a Slicer that bundles pydicom 2), a DICOM SEG request says so before any work.
    monkeypatch.setitem(sys.modules, "highdicom", None)  # makes `import highdicom` fail
    code = cli.main(["segment", str(tmp_path), "--label", "organ", "--adapter", str(adapter), "--output", "x.dcm"])
    assert code == 2 and "needs the highdicom package" in capsys.readouterr().err


@pytest.mark.data
def test_every_label_empty_still_writes_a_valid_seg(data_dir, tmp_path):
    folder = data_dir / "dcmqi-ct-3slice"
    image = read_image(folder)
    blank = sitk.Image(image.GetSize(), sitk.sitkUInt8)
    blank.CopyInformation(image)
    path, empty = write_dicom_seg(tmp_path / "none.dcm", {"liver": blank}, DicomSeries.of_input(folder))
    assert empty == ["liver"]
    seg = pydicom.dcmread(str(path))
    assert int(seg.NumberOfFrames) == 3 and not seg.pixel_array.any()  # highdicom needs frames: all blank ones
    back = read_dicom_seg(path, grid=image)
    assert not sitk.GetArrayFromImage(back["liver"]).any()


@pytest.mark.data
def test_overlapping_labels_keep_their_own_voxels(data_dir, tmp_path):
    folder, image, masks = _reference_masks(data_dir, "dcmqi")
    liver = sitk.GetArrayFromImage(masks["liver"])
    grown = sitk.GetImageFromArray(np.maximum(liver, np.roll(liver, 40, axis=2)))  # half inside the liver
    grown.CopyInformation(image)
    overlapping = OrderedDict([("liver", masks["liver"]), ("liver region", grown), ("spine", masks["spine"])])
    source = DicomSeries.of_input(folder)
    write_dicom_seg(tmp_path / "overlap.dcm", overlapping, source)
    assert pydicom.dcmread(str(tmp_path / "overlap.dcm"), stop_before_pixels=True).SegmentsOverlap == "YES"
    back = read_dicom_seg(tmp_path / "overlap.dcm", grid=image, source=source)
    for name, mask in overlapping.items():
        assert np.array_equal(sitk.GetArrayFromImage(back[name]), sitk.GetArrayFromImage(mask)), name


@pytest.mark.data
def test_a_seg_of_another_series_does_not_fit(data_dir, tmp_path):
    folder, image, masks = _reference_masks(data_dir, "dcmqi")
    write_dicom_seg(tmp_path / "case.dcm", masks, DicomSeries.of_input(folder))
    other_folder = data_dir / "totalsegmentator-ct" / "example_ct_dicom"
    other = read_image(other_folder)
    for source in (None, DicomSeries.of_input(other_folder)):  # never empty masks for the wrong series
        with pytest.raises(SSAMError, match="does not lie on the image's grid|not a regular stack"):
            read_dicom_seg(tmp_path / "case.dcm", grid=other, source=source)
    (tmp_path / "junk.dcm").write_bytes(b"not dicom at all")
    with pytest.raises(SSAMError, match="cannot read .* as a DICOM SEG"):
        read_dicom_seg(tmp_path / "junk.dcm")
    whole = (tmp_path / "case.dcm").read_bytes()
    (tmp_path / "truncated.dcm").write_bytes(whole[: len(whole) // 2])  # a copy cut short
    with pytest.raises(SSAMError, match="cannot read .* as a DICOM SEG"):
        read_dicom_seg(tmp_path / "truncated.dcm", grid=image)


def _seg_dataset(data_dir, root):
    """A training folder as a PACS export gives it: series folders (any names) with the SEGs made on them beside."""
    root.mkdir()
    for series, case in (("dcmqi", "chest"), ("totalsegmentator", "abdomen")):
        folder, image, masks = _reference_masks(data_dir, series)
        (root / f"series_{case}").symlink_to(folder, target_is_directory=True)
        write_dicom_seg(root / f"{case}.dcm", masks, DicomSeries.of_input(folder))
    return root


@pytest.mark.data
def test_dicom_seg_files_beside_their_series_are_a_training_dataset(data_dir, tmp_path):
    from SSAMSegmentLib.training.datasets import DatasetProblems, open_dataset

    root = _seg_dataset(data_dir, tmp_path / "export")
    dataset = open_dataset(root, labels=["liver", "spine"])
    assert dataset.layout == "dicomseg" and sorted(c.case_id for c in dataset.cases) == ["abdomen", "chest"]
    assert dataset.label_names == ["liver", "spine"]
    chest = next(c for c in dataset.cases if c.case_id == "chest")
    assert chest.present_labels == {"liver", "spine"}
    image, masks = chest.load()
    _folder, _image, reference = _reference_masks(data_dir, "dcmqi")
    for name in ("liver", "spine"):
        assert np.array_equal(masks[name], sitk.GetArrayFromImage(reference[name])), name
    abdomen = next(c for c in dataset.cases if c.case_id == "abdomen")
    assert abdomen.present_labels == {"liver"} and not abdomen.load()[1]["spine"].any()

    # A SEG whose series is not there, and a series without a SEG: both named, nothing trained.
    (root / "series_abdomen").unlink()
    (root / "orphan").symlink_to(data_dir / "dcmqi-ct-3slice", target_is_directory=True)
    with pytest.raises(DatasetProblems) as problems:
        open_dataset(root)
    text = str(problems.value)
    assert "abdomen.dcm references 20 instances that are not all in one series folder" in text
    assert "orphan/ has no DICOM SEG beside it" in text


@pytest.mark.data
@pytest.mark.slow
def test_ssam_train_on_dicom_seg(data_dir, tmp_path):
    from SSAMSegmentLib import TrainingConfig, train
    from SSAMSegmentLib.model.adapter import read_metadata

    root = _seg_dataset(data_dir, tmp_path / "export")
    result = train(TrainingConfig(data=str(root), output=str(tmp_path / "dicom.adapter.safetensors"), base="test-vit",
                                  image_size=64, steps=2, batch_size=2, val_fraction=0.0, labels=["liver", "heart"]))
    metadata = read_metadata(result.adapter_path)
    assert metadata["labels"] == ["liver", "heart"] and metadata["training"]["layout"] == "dicomseg"


@pytest.mark.data
def test_evaluate_takes_dicom_seg_predictions_and_references(data_dir, tmp_path):
    from SSAMSegmentLib.training.evaluation import evaluate

    folder, image, masks = _reference_masks(data_dir, "totalsegmentator")
    source = DicomSeries.of_input(folder)
    write_dicom_seg(tmp_path / "truth.dcm", masks, source)
    write_outputs(tmp_path / "truth.nii.gz", image, masks)
    # A prediction that misses the liver's top five slices: its SEG stores a shorter span of frames than the truth.
    liver = sitk.GetArrayFromImage(masks["liver"])
    rows = np.flatnonzero(liver.reshape(liver.shape[0], -1).any(axis=1))
    cut = liver.copy()
    cut[rows[-5:]] = 0
    predicted = sitk.GetImageFromArray(cut)
    predicted.CopyInformation(image)
    write_dicom_seg(tmp_path / "prediction.dcm", {"liver": predicted, "kidney": masks["kidney"]}, source)
    expected = 2 * cut.sum() / (cut.sum() + liver.sum())
    for prediction, reference in (("prediction.dcm", "truth.dcm"), ("prediction.dcm", "truth.nii.gz")):
        report = evaluate(tmp_path / prediction, tmp_path / reference)
        labels = report["cases"][0]["labels"]
        assert labels["liver"]["dice"] == pytest.approx(expected, abs=1e-9), (prediction, reference)
        assert labels["kidney"]["dice"] == 1.0  # absent in both: a correct "absent"
    report = evaluate(tmp_path / "truth.nii.gz", tmp_path / "truth.dcm")
    assert report["cases"][0]["labels"]["liver"]["dice"] == 1.0
    # Folders: case names match across a SEG and a label map.
    (tmp_path / "pred").mkdir()
    (tmp_path / "ref").mkdir()
    (tmp_path / "pred" / "case1.dcm").symlink_to(tmp_path / "prediction.dcm")
    sitk.WriteImage(sitk.Image([8, 8], sitk.sitkUInt8), str(tmp_path / "pred" / "case1.png"))  # its preview
    (tmp_path / "ref" / "case1.nii.gz").symlink_to(tmp_path / "truth.nii.gz")
    (tmp_path / "ref" / "case1.json").symlink_to(tmp_path / "truth.json")
    report = evaluate(tmp_path / "pred", tmp_path / "ref")
    assert report["cases"][0]["labels"]["liver"]["dice"] == pytest.approx(expected, abs=1e-9)
