"""Training datasets: every layout on generated realistic data and on the real samples, all problems in one error,
and the deterministic split."""

import json
import os
from collections import OrderedDict

import numpy as np
import pytest
import SimpleITK as sitk

from SSAMSegmentLib.training.datasets import (Case, Dataset, DatasetProblems, memory_dataset, open_dataset, split_cases,
                                     split_record)
from SSAMSegmentLib.errors import SSAMError

from helpers import grid_image

OBLIQUE = (0.9396926, -0.3420201, 0.0, 0.3420201, 0.9396926, 0.0, 0.0, 0.0, 1.0)  # 20 degrees about z


# ---------------------------------------------------------------------------------------------------------------
# Realistic synthetic data: a CT-like body with ellipsoid organs


def ellipsoid(shape, center, radii):
    z, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    return sum(((axis - c) / r) ** 2 for axis, c, r in zip((z, y, x), center, radii)) <= 1


ORGANS = {  # value: (name, HU, center (z, y, x), radii)
    1: ("liver", 60, (8, 20, 14), (5, 9, 8)),
    2: ("spleen", 45, (8, 18, 36), (4, 5, 4)),
    3: ("kidney_left", 30, (10, 30, 34), (3, 4, 3)),
}


def synthetic_ct(seed, organs=(1, 2, 3), shape=(16, 40, 48)):
    """(CT int16 array, uint8 label map): air, a water-like body, organs with their own HU, noise."""
    rng = np.random.default_rng(seed)
    ct = np.full(shape, -1000, np.int16)
    body = ellipsoid(shape, (shape[0] / 2, shape[1] / 2, shape[2] / 2), (shape[0], shape[1] / 2 - 1, shape[2] / 2 - 1))
    ct[body] = 0
    labelmap = np.zeros(shape, np.uint8)
    for value in organs:
        _, hu, center, radii = ORGANS[value]
        jitter = rng.integers(-1, 2, 3)
        region = ellipsoid(shape, np.add(center, jitter), radii) & body
        ct[region] = hu
        labelmap[region] = value
    ct = (ct + rng.normal(0, 12, shape)).astype(np.int16)
    return ct, labelmap


def to_image(array, spacing=(0.8, 0.8, 2.5), origin=(-20.0, 10.0, 35.0), direction=None):
    return grid_image(array, spacing, origin, direction)


def write(image, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))
    return path


def problems_of(excinfo):
    return excinfo.value.problems


# ---------------------------------------------------------------------------------------------------------------
# nnU-Net v2 and MSD


def make_nnunet_v2(root, cases=(("liver_001", (1, 2, 3)), ("liver_002", (1, 2, 3)), ("liver_003", (1, 3)))):
    """Two channels per case (CT and a second 'PET-like' channel), labels listed out of value order on purpose."""
    arrays = {}
    for index, (case_id, organs) in enumerate(cases):
        ct, labelmap = synthetic_ct(index, organs)
        direction = OBLIQUE if index == 0 else None
        write(to_image(ct, direction=direction), root / "imagesTr" / f"{case_id}_0000.nii.gz")
        write(to_image((labelmap * 100).astype(np.float32), direction=direction),
              root / "imagesTr" / f"{case_id}_0001.nii.gz")
        write(to_image(labelmap, direction=direction), root / "labelsTr" / f"{case_id}.nii.gz")
        arrays[case_id] = (ct, labelmap)
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT", "1": "PET"},
        "labels": {"background": 0, "kidney_left": 3, "liver": 1, "spleen": 2},
        "numTraining": len(cases), "file_ending": ".nii.gz"}))
    return arrays


def test_nnunet_v2_two_channels_uses_channel_0000_and_loads_every_label(tmp_path):
    arrays = make_nnunet_v2(tmp_path)
    dataset = open_dataset(tmp_path)
    assert isinstance(dataset, Dataset)
    assert dataset.layout == "nnunet" and dataset.root == tmp_path
    assert dataset.label_names == ["liver", "spleen", "kidney_left"]  # value order, not the file's order
    assert [c.case_id for c in dataset.cases] == ["liver_001", "liver_002", "liver_003"]
    assert any("channel 0000 (CT) of 2" in note for note in dataset.notes)
    assert "channel 0000 (CT) of 2" in dataset.summary() and "3 cases" in dataset.summary()
    assert dataset.cases[2].present_labels == {"liver", "kidney_left"}

    for case in dataset.cases:
        assert case.image_path.name == f"{case.case_id}_0000.nii.gz"
        image, masks = case.load()
        ct, labelmap = arrays[case.case_id]
        np.testing.assert_array_equal(sitk.GetArrayFromImage(image), ct)
        assert list(masks) == ["liver", "spleen", "kidney_left"]
        for value, name in ((1, "liver"), (2, "spleen"), (3, "kidney_left")):
            assert masks[name].dtype == np.uint8
            assert masks[name].shape == sitk.GetArrayViewFromImage(image).shape
            np.testing.assert_array_equal(masks[name], (labelmap == value).astype(np.uint8))
    _, masks = dataset.cases[2].load()
    assert not masks["spleen"].any()  # absent label: the natural negative sample


def test_label_subset_is_matched_loosely_and_kept_in_value_order(tmp_path):
    make_nnunet_v2(tmp_path)
    dataset = open_dataset(tmp_path, labels=["Kidney Left", "LIVER"])
    assert dataset.label_names == ["liver", "kidney_left"]
    _, masks = dataset.cases[0].load()
    assert list(masks) == ["liver", "kidney_left"]
    assert "training 2 of the dataset's 3 labels" in dataset.summary()


def test_msd_layout_with_value_to_name_labels_ignores_hidden_files(tmp_path):
    for index in range(2):
        ct, labelmap = synthetic_ct(10 + index, (1, 2))
        write(to_image(ct), tmp_path / "imagesTr" / f"liver_{index}.nii.gz")
        write(to_image(labelmap), tmp_path / "labelsTr" / f"liver_{index}.nii.gz")
    # MSD archives unpacked on a Mac carry '._' resource forks that are not images
    (tmp_path / "imagesTr" / "._liver_0.nii.gz").write_bytes(b"\x00\x05\x16\x07 mac fork")
    (tmp_path / "dataset.json").write_text(json.dumps({
        "name": "Liver", "modality": {"0": "CT"}, "labels": {"0": "background", "1": "liver", "2": "cancer"},
        "training": [{"image": f"./imagesTr/liver_{i}.nii.gz", "label": f"./labelsTr/liver_{i}.nii.gz"}
                     for i in range(2)]}))
    dataset = open_dataset(tmp_path)
    assert dataset.label_names == ["liver", "cancer"]
    assert [c.case_id for c in dataset.cases] == ["liver_0", "liver_1"]
    assert any("Decathlon" in note for note in dataset.notes)
    _, labelmap = synthetic_ct(11, (1, 2))
    _, masks = dataset.cases[1].load()
    np.testing.assert_array_equal(masks["cancer"], labelmap == 2)


def test_nnunet_region_labels_and_ignore_label(tmp_path):
    ct, _ = synthetic_ct(3)
    labelmap = np.zeros(ct.shape, np.uint8)
    labelmap[2:6, 5:20, 5:20] = 1   # kidney
    labelmap[3:5, 8:12, 8:12] = 2   # tumour inside it
    labelmap[10:12, 30:35, 30:40] = 3  # not annotated
    write(to_image(ct), tmp_path / "imagesTr" / "k_0000.nii.gz")
    write(to_image(labelmap), tmp_path / "labelsTr" / "k.nii.gz")
    (tmp_path / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"}, "file_ending": ".nii.gz",
        "labels": {"background": 0, "kidney": [1, 2], "tumor": 2, "ignore": 3}}))
    dataset = open_dataset(tmp_path)
    assert dataset.label_names == ["kidney", "tumor"]
    assert any("ignore" in note for note in dataset.notes)
    _, masks = dataset.cases[0].load()
    np.testing.assert_array_equal(masks["kidney"], np.isin(labelmap, (1, 2)))
    np.testing.assert_array_equal(masks["tumor"], labelmap == 2)


# ---------------------------------------------------------------------------------------------------------------
# images/ + masks/ folders


def rgb_endoscopy(seed, size=(48, 64)):
    """An RGB frame: reddish mucosa with a brighter round polyp and a grey instrument bar; masks 1 and 2."""
    rng = np.random.default_rng(seed)
    h, w = size
    yy, xx = np.mgrid[:h, :w]
    rgb = np.stack([np.full(size, 170), np.full(size, 90), np.full(size, 80)], -1).astype(float)
    polyp = (yy - h / 2 - seed) ** 2 + (xx - w / 3) ** 2 <= (h / 5) ** 2
    instrument = (xx > w * 0.75) & (yy > h / 2)
    rgb[polyp] = (220, 140, 120)
    rgb[instrument] = (150, 150, 150)
    rgb = np.clip(rgb + rng.normal(0, 6, rgb.shape), 0, 255).astype(np.uint8)
    mask = np.zeros(size, np.uint8)
    mask[polyp] = 1
    mask[instrument] = 2
    return rgb, mask


def test_folder2d_rgb_images_with_png_masks_and_name_to_value_labels(tmp_path):
    expected = {}
    for index, (image_name, mask_name) in enumerate([("a.png", "a.png"), ("b.jpg", "b.png"), ("c.png", "c.PNG")]):
        rgb, mask = rgb_endoscopy(index)
        if index == 2:
            mask[mask == 2] = 0  # no instrument in this frame
        write(sitk.GetImageFromArray(rgb, isVector=True), tmp_path / "images" / image_name)
        write(sitk.GetImageFromArray(mask), tmp_path / "masks" / mask_name)
        expected[image_name.split(".")[0]] = (rgb, mask)
    (tmp_path / "labels.json").write_text(json.dumps({"background": 0, "polyp": 1, "instrument": 2}))
    (tmp_path / "images" / "notes.txt").write_text("not an image: ignored")

    dataset = open_dataset(tmp_path)
    assert dataset.layout == "folder2d"
    assert dataset.label_names == ["polyp", "instrument"]
    assert [c.case_id for c in dataset.cases] == ["a", "b", "c"]
    assert dataset.image_kinds == ["2D RGB"]
    assert dataset.cases[2].present_labels == {"polyp"}
    for case in dataset.cases:
        image, masks = case.load()
        rgb, mask = expected[case.case_id]
        assert image.GetNumberOfComponentsPerPixel() == 3
        assert masks["polyp"].shape == rgb.shape[:2]
        np.testing.assert_array_equal(masks["polyp"], mask == 1)
        np.testing.assert_array_equal(masks["instrument"], mask == 2)
    assert not dataset.cases[2].load()[1]["instrument"].any()


def test_single_label_0_255_rgb_mask_is_thresholded_but_multi_label_stray_values_are_problems(tmp_path):
    rgb, mask = rgb_endoscopy(1)
    polyp = (mask == 1).astype(np.uint8) * 255
    write(sitk.GetImageFromArray(rgb, isVector=True), tmp_path / "images" / "f.png")
    # an RGB mask: the first channel is used
    write(sitk.GetImageFromArray(np.stack([polyp, polyp // 2, np.zeros_like(polyp)], -1), isVector=True),
          tmp_path / "masks" / "f.png")
    (tmp_path / "labels.json").write_text(json.dumps({"1": "polyp"}))
    dataset = open_dataset(tmp_path)
    assert any("thresholded at 128" in note for note in dataset.notes)
    np.testing.assert_array_equal(dataset.cases[0].load()[1]["polyp"], mask == 1)

    (tmp_path / "labels.json").write_text(json.dumps({"1": "polyp", "2": "instrument"}))
    with pytest.raises(DatasetProblems) as excinfo:
        open_dataset(tmp_path)
    assert problems_of(excinfo) == ["masks/f.png has values not in the label mapping: 255; map them or fix the mask"]


# ---------------------------------------------------------------------------------------------------------------
# Volumes with Slicer .seg.nrrd written by slicer-core's own storage node


def write_slicer_segmentation(path, reference: sitk.Image, labelmap: np.ndarray, names, crop=False):
    """Import a label map into a vtkMRMLSegmentationNode and save it with Slicer's vtkMRMLSegmentationStorageNode."""
    import slicer
    import vtk
    from vtk.util import numpy_support

    scene = slicer.vtkMRMLScene()
    application_logic = slicer.vtkSlicerApplicationLogic()
    application_logic.SetMRMLScene(scene)
    segmentations_logic = slicer.vtkSlicerSegmentationsModuleLogic()
    segmentations_logic.SetMRMLScene(scene)  # before any segment is added, or segments come back empty

    def volume_node(class_name, array):
        node = scene.AddNewNodeByClass(class_name)
        node.SetSpacing(*reference.GetSpacing())
        lps_origin = reference.GetOrigin()
        node.SetOrigin(-lps_origin[0], -lps_origin[1], lps_origin[2])
        ras = np.diag([-1.0, -1.0, 1.0]) @ np.array(reference.GetDirection()).reshape(3, 3)
        matrix = vtk.vtkMatrix4x4()
        for row in range(3):
            for column in range(3):
                matrix.SetElement(row, column, ras[row, column])
        node.SetIJKToRASDirectionMatrix(matrix)
        data = vtk.vtkImageData()
        data.SetDimensions(*reference.GetSize())
        data.GetPointData().SetScalars(numpy_support.numpy_to_vtk(np.ascontiguousarray(array).ravel(), deep=True))
        node.SetAndObserveImageData(data)
        return node

    volume = volume_node("vtkMRMLScalarVolumeNode", np.zeros(labelmap.shape, np.int16))
    labels = volume_node("vtkMRMLLabelMapVolumeNode", labelmap.astype(np.uint8))
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    assert segmentations_logic.ImportLabelmapToSegmentationNode(labels, segmentation, "")
    segments = segmentation.GetSegmentation()
    assert segments.GetNumberOfSegments() == len(names)
    for index, name in enumerate(names):  # imported in label value order
        segments.GetNthSegment(index).SetName(name)
    storage = segmentation.CreateDefaultStorageNode()
    storage.SetCropToMinimumExtent(crop)
    storage.SetFileName(str(path))
    assert storage.WriteData(segmentation)
    return path


def test_segnrrd_folder_from_slicer_union_of_segment_names(tmp_path):
    ct1, labels1 = synthetic_ct(20, (1, 2))
    ct2, labels2 = synthetic_ct(21, (1, 3))
    image1 = to_image(ct1, direction=OBLIQUE)
    image2 = to_image(ct2, spacing=(0.7, 0.7, 3.0))
    write(image1, tmp_path / "case1.nii.gz")
    write(image2, tmp_path / "case2.nrrd")
    write_slicer_segmentation(tmp_path / "case1.seg.nrrd", image1, labels1, ["Liver", "spleen"])
    # saved cropped to the segments' extent: the grid is placed back into the image's grid
    write_slicer_segmentation(tmp_path / "case2.seg.nrrd", image2, labels2, ["liver", "Kidney left"], crop=True)
    assert sitk.ReadImage(str(tmp_path / "case2.seg.nrrd")).GetSize() != image2.GetSize()

    dataset = open_dataset(tmp_path)
    assert dataset.layout == "segnrrd"
    assert dataset.label_names == ["Liver", "spleen", "Kidney left"]
    assert [c.case_id for c in dataset.cases] == ["case1", "case2"]
    assert dataset.cases[1].image_path == tmp_path / "case2.nrrd"
    assert dataset.cases[1].present_labels == {"Liver", "Kidney left"}

    image, masks = dataset.cases[0].load()
    assert list(masks) == ["Liver", "spleen", "Kidney left"]
    np.testing.assert_array_equal(masks["Liver"], labels1 == 1)
    np.testing.assert_array_equal(masks["spleen"], labels1 == 2)
    assert not masks["Kidney left"].any()
    image, masks = dataset.cases[1].load()
    assert image.GetSpacing() == pytest.approx((0.7, 0.7, 3.0))
    np.testing.assert_array_equal(masks["Liver"], labels2 == 1)
    np.testing.assert_array_equal(masks["Kidney left"], labels2 == 3)
    assert not masks["spleen"].any()

    subset = open_dataset(tmp_path, labels=["kidney_left"])
    assert subset.label_names == ["Kidney left"]
    assert subset.cases[0].present_labels == frozenset()


def test_segnrrd_on_another_grid_and_unpaired_files_are_reported(tmp_path):
    ct, labels = synthetic_ct(22, (1,))
    image = to_image(ct)
    write(image, tmp_path / "a.nii.gz")
    other_grid = to_image(ct, spacing=(1.0, 1.0, 2.5))
    write_slicer_segmentation(tmp_path / "a.seg.nrrd", other_grid, labels, ["liver"])
    write(image, tmp_path / "b.nii.gz")
    write_slicer_segmentation(tmp_path / "c.seg.nrrd", image, labels, ["liver"])
    with pytest.raises(DatasetProblems) as excinfo:
        open_dataset(tmp_path)
    problems = problems_of(excinfo)
    assert len(problems) == 3
    assert any(p.startswith("a.seg.nrrd does not match a.nii.gz: spacing") for p in problems)
    assert "b.nii.gz has no mask (b.seg.nrrd is missing)" in problems
    assert any(p.startswith("c.seg.nrrd has no image") for p in problems)


# ---------------------------------------------------------------------------------------------------------------
# In memory (the Slicer panel's scene mode)


def test_memory_dataset_from_images_and_arrays(tmp_path):
    ct1, labels1 = synthetic_ct(30, (1, 2))
    ct2, labels2 = synthetic_ct(31, (1,))
    image1, image2 = to_image(ct1), to_image(ct2, direction=OBLIQUE)
    spleen_image = to_image((labels1 == 2).astype(np.uint8))
    cases = [
        ("patient 1", image1, OrderedDict([("Liver", (labels1 == 1) * 255), ("Spleen", spleen_image)])),
        ("patient 2", image2, OrderedDict([("liver", (labels2 == 1).astype(bool))])),
    ]
    dataset = memory_dataset(cases)
    assert dataset.layout == "memory" and dataset.root is None
    assert dataset.label_names == ["Liver", "Spleen"]
    assert all(case.image_path is None for case in dataset.cases)
    assert dataset.cases[1].present_labels == {"Liver"}
    image, masks = dataset.cases[0].load()
    assert image is image1
    np.testing.assert_array_equal(masks["Liver"], labels1 == 1)
    np.testing.assert_array_equal(masks["Spleen"], labels1 == 2)
    assert all(m.dtype == np.uint8 and set(np.unique(m)) <= {0, 1} for m in masks.values())
    _, masks = dataset.cases[1].load()
    np.testing.assert_array_equal(masks["Liver"], labels2 == 1)
    assert not masks["Spleen"].any()
    assert memory_dataset(cases, label_names=["spleen"]).label_names == ["Spleen"]


def test_memory_dataset_reports_all_problems(tmp_path):
    ct, labels = synthetic_ct(32, (1,))
    image = to_image(ct)
    four_d = sitk.JoinSeries([image, image])
    shifted = to_image((labels == 1).astype(np.uint8), origin=(0.0, 0.0, 0.0))
    cases = [
        ("a", image, {"liver": labels == 1}),
        ("a", image, {"liver": labels == 1}),                 # duplicate id
        ("b", image, {"liver": (labels == 1)[:, :-1]}),       # wrong shape
        ("c", image, {"liver": shifted}),                     # other origin
        ("d", four_d, {"liver": labels == 1}),                # 4D
        ("e", image, {}),                                     # no masks
    ]
    with pytest.raises(DatasetProblems) as excinfo:
        memory_dataset(cases, label_names=["liver", "tumour"])
    problems = problems_of(excinfo)
    assert len(problems) == 6, problems
    assert "case id 'a' is used twice; give each case its own name" in problems
    assert "case 'b': mask 'liver' is shaped (16, 39, 48) but the image's voxels are (16, 40, 48)" in problems
    assert any(p.startswith("case 'c': mask 'liver' does not match its image: origin") for p in problems)
    assert any("is 4D" in p for p in problems)
    assert "case 'e' has no masks; give at least one segment" in problems
    assert any(p.startswith("label 'tumour' is not in the dataset") for p in problems)
    with pytest.raises(DatasetProblems, match="no cases given"):
        memory_dataset([])


# ---------------------------------------------------------------------------------------------------------------
# Every problem in one error


def test_many_problems_are_reported_together_in_one_error(tmp_path):
    make_nnunet_v2(tmp_path, cases=(("good", (1, 2)),))
    (tmp_path / "imagesTr" / "good_0001.nii.gz").unlink()
    ct, labelmap = synthetic_ct(40, (1, 2))
    image = to_image(ct)
    write(image, tmp_path / "imagesTr" / "nolabel_0000.nii.gz")
    write(to_image(labelmap), tmp_path / "labelsTr" / "noimage.nii.gz")
    (tmp_path / "imagesTr" / "broken_0000.nii.gz").write_bytes(b"\x1f\x8b\x08 this is not a gzip stream")
    write(to_image(labelmap), tmp_path / "labelsTr" / "broken.nii.gz")
    write(image, tmp_path / "imagesTr" / "spacing_0000.nii.gz")
    write(to_image(labelmap, spacing=(1.0, 1.0, 2.5)), tmp_path / "labelsTr" / "spacing.nii.gz")
    write(image, tmp_path / "imagesTr" / "stray_0000.nii.gz")
    stray = labelmap.copy()
    stray[0, 0, :3] = 7
    write(to_image(stray), tmp_path / "labelsTr" / "stray.nii.gz")
    write(sitk.JoinSeries([image, image]), tmp_path / "imagesTr" / "series_0000.nii.gz")
    write(to_image(labelmap), tmp_path / "labelsTr" / "series.nii.gz")
    write(image, tmp_path / "imagesTr" / "misnamed.nii.gz")

    with pytest.raises(SSAMError) as excinfo:
        open_dataset(tmp_path, labels=["liver", "pancreas"])
    message = str(excinfo.value)
    problems = problems_of(excinfo)
    assert message.splitlines()[0] == f"dataset {tmp_path} has 8 problems; fix them and run again:"
    assert len(message.splitlines()) == 9
    expected_starts = [
        "imagesTr/misnamed.nii.gz is not named CASE_XXXX.nii.gz",
        "imagesTr/nolabel_0000.nii.gz has no mask (labelsTr/nolabel.nii.gz is missing)",
        "labelsTr/noimage.nii.gz has no image (imagesTr/noimage_0000.nii.gz is missing)",
        "cannot read imagesTr/broken_0000.nii.gz",
        "imagesTr/series_0000.nii.gz is 4D",
        "labelsTr/spacing.nii.gz does not match imagesTr/spacing_0000.nii.gz: spacing (1, 1, 2.5) vs (0.8, 0.8, 2.5)",
        "labelsTr/stray.nii.gz has values not in the label mapping: 7",
        "label 'pancreas' is not in the dataset (it has liver, spleen, kidney_left)",
    ]
    for start in expected_starts:
        assert sum(p.startswith(start) for p in problems) == 1, (start, problems)
    assert len(problems) == len(expected_starts)


def cut(path, fraction=0.7):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])


def test_truncated_files_that_itk_reads_silently_are_problems(tmp_path):
    nnunet = tmp_path / "msd"
    for index, ending in enumerate((".nii.gz", ".nii", ".nii.gz")):
        ct, labelmap = synthetic_ct(50 + index, (1,))
        write(to_image(ct), nnunet / "imagesTr" / f"liver_{index}{ending}")
        write(to_image(labelmap), nnunet / "labelsTr" / f"liver_{index}{ending}")
    (nnunet / "dataset.json").write_text(json.dumps({"modality": {"0": "CT"}, "labels": {"0": "background",
                                                                                        "1": "liver"}}))
    cut(nnunet / "imagesTr" / "liver_0.nii.gz")
    cut(nnunet / "labelsTr" / "liver_1.nii")
    sitk.ReadImage(str(nnunet / "imagesTr" / "liver_0.nii.gz"))  # ITK zero-fills the missing voxels, no error
    sitk.ReadImage(str(nnunet / "labelsTr" / "liver_1.nii"))
    with pytest.raises(DatasetProblems) as excinfo:
        open_dataset(nnunet)
    assert problems_of(excinfo) == [
        "imagesTr/liver_0.nii.gz is truncated (the file ends before its last voxel); copy or export it again",
        "labelsTr/liver_1.nii is truncated (the file ends before its last voxel); copy or export it again"]

    folder = tmp_path / "frames"
    for name in ("a", "b"):
        rgb, mask = rgb_endoscopy(1, size=(240, 320))
        write(sitk.GetImageFromArray(rgb, isVector=True), folder / "images" / f"{name}.jpg")
        write(sitk.GetImageFromArray(mask), folder / "masks" / f"{name}.png")
    (folder / "labels.json").write_text('{"1": "polyp", "2": "instrument"}')
    cut(folder / "images" / "a.jpg", 0.8)
    sitk.ReadImage(str(folder / "images" / "a.jpg"))  # libjpeg only warns
    with pytest.raises(DatasetProblems) as excinfo:
        open_dataset(folder)
    assert problems_of(excinfo) == [
        "images/a.jpg is truncated (the file ends before its last voxel); copy or export it again"]


def test_a_long_problem_list_is_cut_after_twenty(tmp_path):
    rgb, _ = rgb_endoscopy(0, size=(8, 8))
    for index in range(25):
        write(sitk.GetImageFromArray(rgb, isVector=True), tmp_path / "images" / f"frame{index:02d}.png")
    (tmp_path / "masks").mkdir()
    (tmp_path / "labels.json").write_text('{"1": "polyp"}')
    with pytest.raises(DatasetProblems) as excinfo:
        open_dataset(tmp_path)
    lines = str(excinfo.value).splitlines()
    assert lines[0] == f"dataset {tmp_path} has 26 problems; fix them and run again:"
    assert lines[1] == "  - masks/ has no images; put the masks (same names as the images) there"
    assert lines[-1] == "  - and 6 more"
    assert len(lines) == 22


def test_missing_folders_no_labels_and_broken_json(tmp_path):
    (tmp_path / "labels.json").write_text('{"0": "background"}')
    with pytest.raises(DatasetProblems) as excinfo:
        open_dataset(tmp_path)
    assert problems_of(excinfo) == [
        "labels.json has no labels besides background; add the structures to train, e.g. {\"1\": \"liver\"}",
        "images/ is missing; put the images there",
        "masks/ is missing; put the masks (same names as the images) there",
    ]
    other = tmp_path / "nnunet"
    (other / "imagesTr").mkdir(parents=True)
    (other / "labelsTr").mkdir()
    (other / "dataset.json").write_text('{"labels": {"background": 0, "liver": 1,}')
    with pytest.raises(DatasetProblems) as excinfo:
        open_dataset(other)
    problems = problems_of(excinfo)
    assert problems[0].startswith("cannot read dataset.json (")
    assert "imagesTr/ has no images; put the training images there" in problems
    assert "labelsTr/ has no images; put the training label maps there" in problems


def test_paths_that_are_not_datasets(tmp_path):
    with pytest.raises(DatasetProblems, match="does not exist; give the dataset folder"):
        open_dataset(tmp_path / "nowhere")
    (tmp_path / "readme.txt").write_text("hello")
    with pytest.raises(DatasetProblems, match="no known layout found"):
        open_dataset(tmp_path)
    with pytest.raises(DatasetProblems, match="is not a folder"):
        open_dataset(tmp_path / "readme.txt")


def test_cases_read_their_files_when_loaded(tmp_path):
    make_nnunet_v2(tmp_path, cases=(("one", (1, 2)),))
    case = open_dataset(tmp_path).cases[0]
    assert isinstance(case, Case)
    _, labelmap = synthetic_ct(5, (2,))
    write(to_image(labelmap), tmp_path / "labelsTr" / "one.nii.gz")  # same grid, other content
    _, masks = case.load()
    assert not masks["liver"].any()
    np.testing.assert_array_equal(masks["spleen"], labelmap == 2)


# ---------------------------------------------------------------------------------------------------------------
# Split


class _Named:
    def __init__(self, case_id):
        self.case_id = case_id


def test_split_is_by_case_deterministic_and_independent_of_order():
    cases = [_Named(f"case_{i:03d}") for i in range(23)]
    train, val = split_cases(cases, val_fraction=0.2, seed=0)
    assert len(val) == 5 and len(train) == 18
    assert {c.case_id for c in train} | {c.case_id for c in val} == {c.case_id for c in cases}
    assert not {c.case_id for c in train} & {c.case_id for c in val}
    again_train, again_val = split_cases(list(reversed(cases)), val_fraction=0.2, seed=0)
    assert {c.case_id for c in again_val} == {c.case_id for c in val}
    assert [c.case_id for c in train] == sorted(c.case_id for c in train)  # input order kept
    _, other_seed = split_cases(cases, val_fraction=0.2, seed=1)
    assert {c.case_id for c in other_seed} != {c.case_id for c in val}
    # adding a case moves no other case between the sides
    _, grown_val = split_cases(cases + [_Named("case_999")], val_fraction=0.2, seed=0)
    assert {c.case_id for c in val} <= {c.case_id for c in grown_val}

    record = split_record(train, val)
    assert record == {"train": [c.case_id for c in train], "val": [c.case_id for c in val], "seed": 0,
                      "val_fraction": 0.2}
    assert json.loads(json.dumps(record)) == record


def test_split_edge_cases():
    two = [_Named("a"), _Named("b")]
    train, val = split_cases(two, val_fraction=0.05)
    assert len(val) == 1 and len(train) == 1  # at least one validation case
    train, val = split_cases([_Named("only")], val_fraction=0.5)
    assert [c.case_id for c in train] == ["only"] and val == []
    train, val = split_cases(two, val_fraction=0.0)
    assert len(train) == 2 and val == []
    train, val = split_cases([_Named(str(i)) for i in range(3)], val_fraction=0.9)
    assert len(train) == 1 and len(val) == 2  # never everything
    for bad in (1.0, -0.1, "a lot"):
        with pytest.raises(SSAMError):
            split_cases(two, val_fraction=bad)
    with pytest.raises(SSAMError, match="appear twice"):
        split_cases([_Named("a"), _Named("a")])
    assert split_record([_Named("x")], [], seed=3, val_fraction=0.0)["seed"] == 3


def test_split_accepts_a_dataset(tmp_path):
    make_nnunet_v2(tmp_path)
    dataset = open_dataset(tmp_path)
    train, val = split_cases(dataset, val_fraction=0.34, seed=7)
    assert len(train) == 2 and len(val) == 1
    assert all(isinstance(c, Case) for c in train + val)


# ---------------------------------------------------------------------------------------------------------------
# Real data


@pytest.mark.data
def test_kvasir_jpeg_masks_as_images_and_masks_folders(data_dir, tmp_path):
    source = data_dir / "kvasir-seg-5"
    for folder in ("images", "masks"):
        (tmp_path / folder).mkdir()
        for path in sorted((source / folder).iterdir()):
            os.symlink(path, tmp_path / folder / path.name)
    (tmp_path / "labels.json").write_text(json.dumps({"1": "polyp"}))
    dataset = open_dataset(tmp_path)
    assert dataset.layout == "folder2d" and dataset.label_names == ["polyp"]
    assert len(dataset.cases) == 5
    assert any("5 of 5 masks" in note and "thresholded at 128" in note for note in dataset.notes)
    assert all(case.present_labels == {"polyp"} for case in dataset.cases)
    for case in dataset.cases:
        image, masks = case.load()
        assert image.GetNumberOfComponentsPerPixel() == 3
        polyp = masks["polyp"]
        jpeg = sitk.GetArrayFromImage(sitk.ReadImage(str(source / "masks" / case.image_path.name)))[..., 0]
        assert polyp.dtype == np.uint8 and polyp.shape == jpeg.shape
        np.testing.assert_array_equal(polyp, jpeg >= 128)
        assert 0.01 < polyp.mean() < 0.8  # a polyp, not noise and not the whole frame


@pytest.mark.data
def test_totalsegmentator_ct_as_nnunet(data_dir, tmp_path):
    source = data_dir / "totalsegmentator-ct"
    names = json.loads((source / "labels.json").read_text())["total"]
    (tmp_path / "imagesTr").mkdir()
    (tmp_path / "labelsTr").mkdir()
    os.symlink(source / "example_ct_sm.nii.gz", tmp_path / "imagesTr" / "example_0000.nii.gz")
    os.symlink(source / "example_seg.nii.gz", tmp_path / "labelsTr" / "example.nii.gz")
    (tmp_path / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"}, "file_ending": ".nii.gz", "numTraining": 1,
        "labels": {"background": 0, **{name: int(value) for value, name in names.items()}}}))

    everything = open_dataset(tmp_path)
    assert len(everything.label_names) == len(names) == 117
    assert everything.label_names[:5] == ["spleen", "kidney_right", "kidney_left", "gallbladder", "liver"]
    labelmap = sitk.GetArrayFromImage(sitk.ReadImage(str(source / "example_seg.nii.gz")))
    present = {names[str(v)] for v in np.unique(labelmap) if v}
    assert everything.cases[0].present_labels == present
    assert any(f"{117 - len(present)} labels are present in no case" in note for note in everything.notes)

    dataset = open_dataset(tmp_path, labels=["Liver", "kidney left", "spleen", "esophagus"])
    assert dataset.label_names == ["spleen", "kidney_left", "liver", "esophagus"]
    image, masks = dataset.cases[0].load()
    assert image.GetSize() == (122, 101, 30)
    for name, value in (("spleen", 1), ("kidney_left", 3), ("liver", 5)):
        assert masks[name].shape == (30, 101, 122)
        np.testing.assert_array_equal(masks[name], labelmap == value)
        assert masks[name].any()
    assert not masks["esophagus"].any()  # not in this scan: a negative sample


def test_combined_cases_declare_their_source_and_annotated_labels_and_take_other_spellings():
    from SSAMSegmentLib.training.datasets import combine_datasets

    image = sitk.GetImageFromArray(np.arange(64, dtype=np.int16).reshape(8, 8))
    liver = np.zeros((8, 8), np.uint8)
    liver[2:5, 2:5] = 1
    ct = memory_dataset([("a", image, {"Liver": liver})])
    polyp = memory_dataset([("b", image, {"polyp": 1 - liver})])
    assert ct.cases[0].annotated is None and ct.cases[0].source == ""
    combined = combine_datasets([ct, polyp])
    first, second = combined.cases
    assert (first.source, second.source) == ("memory0", "memory1")
    assert first.annotated == {"Liver"} and second.annotated == {"polyp"}
    assert not second.load()[1]["Liver"].any(), "no liver in the polyp case: a negative sample"
    # Validation data spelling a label differently reads its masks under the training spelling.
    case = memory_dataset([("c", image, {"liver": liver})]).cases[0]
    case.use_label_names(["Liver", "polyp"], {"liver": "Liver"})
    _, masks = case.load()
    assert list(masks) == ["Liver", "polyp"] and np.array_equal(masks["Liver"], liver) and not masks["polyp"].any()


def test_a_label_is_trained_as_absent_only_on_images_of_a_kind_no_dataset_annotating_it_has():
    """A CT volume and colour photographs: no liver in a colonoscopy, no polyp in a CT. Two colour datasets (glands,
    nuclei) say nothing about each other: GlaS images are full of unmarked nuclei."""
    from SSAMSegmentLib.training.datasets import combine_datasets
    from SSAMSegmentLib.training.slice_bank import build_slice_bank

    rng = np.random.default_rng(0)
    volume = sitk.GetImageFromArray(rng.integers(-200, 200, (4, 16, 16)).astype(np.int16))
    liver = np.zeros((4, 16, 16), np.uint8)
    liver[1:3, 4:9, 4:9] = 1
    colour = sitk.GetImageFromArray(rng.integers(0, 255, (16, 16, 3)).astype(np.uint8), isVector=True)
    disk = np.zeros((16, 16), np.uint8)
    disk[5:10, 5:10] = 1
    ct = memory_dataset([("ct", volume, {"liver": liver})])
    glands = memory_dataset([("g", colour, {"gland": disk})])
    nuclei = memory_dataset([("n", colour, {"nucleus": disk})])
    combined = combine_datasets([ct, glands, nuclei])
    by_source = {case.source: case for case in combined.cases}
    assert by_source["memory0"].absent == {"gland", "nucleus"}
    assert by_source["memory1"].absent == {"liver"}  # not "nucleus": same kind of image
    assert by_source["memory2"].absent == {"liver"}

    bank = build_slice_bank(combined.cases, combined.label_names, 32)
    names = bank.label_names
    ct_rows = bank.case_index == 0
    assert bank.trained[ct_rows].all() and not bank.scored[ct_rows][:, names.index("gland")].any()
    gland_row = np.flatnonzero(bank.case_index == 1)[0]
    assert dict(zip(names, bank.trained[gland_row])) == {"liver": True, "gland": True, "nucleus": False}
    assert dict(zip(names, bank.scored[gland_row])) == {"liver": False, "gland": True, "nucleus": False}
