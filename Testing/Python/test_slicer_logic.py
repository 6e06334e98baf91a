"""The Slicer module's Logic and its Qt-free glue, against real MRML classes from slicer-core.

Volumes are loaded with Slicer's own reader (vtkMRMLVolumeArchetypeStorageNode) where slicer-core has one, so the
RAS/LPS and (k, j, i) conventions are checked against Slicer itself, not against this code's own idea of them.
Segments are checked through the segmentation's own binary labelmap (its voxels and its image-to-world matrix).
"""

import collections
import importlib
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

slicer = pytest.importorskip("slicer")
vtk = pytest.importorskip("vtk")
from vtk.util import numpy_support  # noqa: E402

from SSAMSegmentLib import Cancelled, SSAMError

from SSAMSegmentLib.slicer import background_task

from SSAMSegmentLib.slicer import scene_nodes as slicer_nodes  # noqa: E402
from SSAMSegmentLib.files.image_io import same_geometry  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "SSAMSegment"))
SSAMSegment = importlib.import_module("SSAMSegment")
Logic = SSAMSegment.SSAMSegmentLogic

TINY = dict(adapter=None, base="test-vit", device="cpu")  # random-weight test model: fast, offline


# --- scene helpers ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def logic():
    """One Logic for the module: its in-process model is loaded once."""
    return Logic()


@pytest.fixture
def scene():
    scene = slicer.vtkMRMLScene()
    slicer_nodes.ensure_segmentation_support(scene)
    return scene


def matrix_to_vtk(array):
    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(array[r][c]))
    return matrix


def add_volume(scene, array_kji, ijk_to_ras, name="volume", cls="vtkMRMLScalarVolumeNode"):
    """A volume node from a numpy array in Slicer's (k, j, i[, c]) order and an IJK-to-RAS matrix."""
    array = np.ascontiguousarray(array_kji)
    components = array.shape[3] if array.ndim == 4 else 1
    image = vtk.vtkImageData()
    image.SetDimensions(array.shape[2], array.shape[1], array.shape[0])
    image.AllocateScalars(numpy_support.get_vtk_array_type(array.dtype), components)
    numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())[:] = array.reshape(-1, components).squeeze()
    node = scene.AddNewNodeByClass(cls, name)
    node.SetIJKToRASMatrix(matrix_to_vtk(ijk_to_ras))
    node.SetAndObserveImageData(image)
    return node


def read_volume(scene, path, cls="vtkMRMLScalarVolumeNode"):
    """Load a file the way Slicer does (ITK reader inside vtkMRMLVolumeArchetypeStorageNode)."""
    node = scene.AddNewNodeByClass(cls, Path(path).name)
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(path))
    if cls == "vtkMRMLLabelMapVolumeNode":
        storage.SetCenterImage(0)
    assert storage.ReadData(node), f"Slicer could not read {path}"
    node.SetAndObserveStorageNodeID(storage.GetID())
    return node


def oblique_matrix(spacing=(0.7, 0.9, 2.5), origin=(12.5, -30.25, 7.0)):
    """An IJK-to-RAS matrix with a rotation about all three axes (no axis aligned)."""
    a, b, c = np.radians([20.0, -35.0, 50.0])
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    matrix = np.eye(4)
    matrix[:3, :3] = (rz @ ry @ rx) * np.asarray(spacing)[None, :]
    matrix[:3, 3] = origin
    return matrix


def ellipsoid(shape, center, radii):
    k, j, i = np.ogrid[: shape[0], : shape[1], : shape[2]]
    return (((k - center[0]) / radii[0]) ** 2 + ((j - center[1]) / radii[1]) ** 2
            + ((i - center[2]) / radii[2]) ** 2 <= 1.0).astype(np.uint8)


def masks_on(image, arrays):
    masks = collections.OrderedDict()
    for name, array in arrays.items():
        mask = sitk.GetImageFromArray(array.astype(np.uint8))
        mask.CopyInformation(image)
        masks[name] = mask
    return masks


def segment_labelmap(segmentation_node, segment_id):
    """(voxels (k, j, i) of this segment only, extent, image-to-world 4x4) as the segmentation stores them."""
    segment = segmentation_node.GetSegmentation().GetSegment(segment_id)
    labelmap = slicer.vtkOrientedImageData()
    assert slicer.vtkSlicerSegmentationsModuleLogic.GetSegmentBinaryLabelmapRepresentation(
        segmentation_node, segment_id, labelmap, False)
    matrix = vtk.vtkMatrix4x4()
    labelmap.GetImageToWorldMatrix(matrix)
    world = np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])
    extent = labelmap.GetExtent()
    if labelmap.IsEmpty():
        return np.zeros((0, 0, 0), np.uint8), extent, world
    shape = (extent[5] - extent[4] + 1, extent[3] - extent[2] + 1, extent[1] - extent[0] + 1)
    values = numpy_support.vtk_to_numpy(labelmap.GetPointData().GetScalars()).reshape(shape)
    return (values == segment.GetLabelValue()).astype(np.uint8), extent, world


def assert_segment_equals(segmentation_node, segment_id, volume_node, expected_kji):
    """The stored segment is `expected_kji` on exactly the volume's voxel grid."""
    values, extent, world = segment_labelmap(segmentation_node, segment_id)
    np.testing.assert_allclose(world, slicer_nodes.ijk_to_ras(volume_node), atol=1e-9)
    full = np.zeros_like(expected_kji)
    if values.size:
        assert extent[0] >= 0 and extent[2] >= 0 and extent[4] >= 0
        full[extent[4]:extent[5] + 1, extent[2]:extent[3] + 1, extent[0]:extent[1] + 1] = values
    np.testing.assert_array_equal(full, expected_kji)


def segment_names(segmentation_node):
    segmentation = segmentation_node.GetSegmentation()
    return [segmentation.GetNthSegment(n).GetName() for n in range(segmentation.GetNumberOfSegments())]


def reference_volume(segmentation_node):
    return segmentation_node.GetNodeReference(slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole())


# --- volume node -> SimpleITK image -------------------------------------------------------------------------------


@pytest.mark.data
def test_ct_volume_read_by_slicer_gives_the_file_image(scene, data_dir):
    path = data_dir / "totalsegmentator-ct" / "example_ct_sm.nii.gz"
    volume = read_volume(scene, path)
    image = slicer_nodes.image_from_volume_node(volume)
    expected = sitk.ReadImage(str(path))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(expected))
    assert same_geometry(image, expected, tolerance=1e-6)


def test_oblique_volume_read_by_slicer_gives_the_file_image(scene, tmp_path):
    """An oblique NRRD written by SimpleITK (LPS) and read by Slicer (RAS) comes back with the same geometry."""
    rng = np.random.default_rng(0)
    expected = sitk.GetImageFromArray(rng.integers(-1000, 1000, (7, 11, 13)).astype(np.int16))
    matrix = oblique_matrix()
    direction_lps = np.diag([-1.0, -1.0, 1.0]) @ (matrix[:3, :3] / np.linalg.norm(matrix[:3, :3], axis=0))
    expected.SetDirection(direction_lps.reshape(-1).tolist())
    expected.SetSpacing([0.7, 0.9, 2.5])
    expected.SetOrigin([-12.5, 30.25, 7.0])
    sitk.WriteImage(expected, str(tmp_path / "oblique.nrrd"))
    volume = read_volume(scene, tmp_path / "oblique.nrrd")
    np.testing.assert_allclose(slicer_nodes.ijk_to_ras(volume), matrix, atol=1e-6)
    image = slicer_nodes.image_from_volume_node(volume)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(expected))
    assert same_geometry(image, expected, tolerance=1e-6)
    # The same voxel is at the same place: Slicer's RAS point = LPS point with x, y negated.
    for index in [(0, 0, 0), (12, 10, 6), (3, 7, 2)]:
        ras = matrix @ np.array(list(index) + [1.0])
        lps = image.TransformIndexToPhysicalPoint(index)
        np.testing.assert_allclose([-lps[0], -lps[1], lps[2]], ras[:3], atol=1e-6)


@pytest.mark.data
def test_rgb_picture_becomes_a_2d_rgb_image(scene, data_dir):
    """An endoscopy frame as Slicer holds it (vector volume, one slice, LPS-identity axes) -> the picture in 2D."""
    path = sorted((data_dir / "kvasir-seg-5" / "images").iterdir())[0]
    picture = sitk.ReadImage(str(path))
    rgb = sitk.GetArrayFromImage(picture)  # (rows, columns, 3)
    volume = add_volume(scene, rgb[None], np.diag([-1.0, -1.0, 1.0, 1.0]), "frame", "vtkMRMLVectorVolumeNode")
    image = slicer_nodes.image_from_volume_node(volume)
    assert image.GetDimension() == 2 and image.GetNumberOfComponentsPerPixel() == 3
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), rgb)


def test_rgb_volume_keeps_its_components(scene):
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 255, (4, 9, 10, 3)).astype(np.uint8)
    volume = add_volume(scene, rgb, oblique_matrix(), "rgb", "vtkMRMLVectorVolumeNode")
    image = slicer_nodes.image_from_volume_node(volume)
    assert image.GetDimension() == 3 and image.GetNumberOfComponentsPerPixel() == 3
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), rgb)


def test_volume_without_voxels_is_a_clear_error(scene):
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
    with pytest.raises(SSAMError, match="has no voxels"):
        slicer_nodes.image_from_volume_node(volume)


# --- masks -> segments --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["scalar", "oblique", "rgb"])
def test_masks_become_named_coloured_segments_on_the_volume_grid(scene, kind):
    shape = (9, 30, 34)
    matrix = np.diag([0.8, 0.8, 2.0, 1.0]) if kind == "scalar" else oblique_matrix()
    if kind == "rgb":
        array = np.random.default_rng(2).integers(0, 255, shape + (3,)).astype(np.uint8)
        volume = add_volume(scene, array, matrix, "rgb volume", "vtkMRMLVectorVolumeNode")
    else:
        array = np.random.default_rng(2).integers(-100, 300, shape).astype(np.int16)
        volume = add_volume(scene, array, matrix, f"{kind} volume")
    image = slicer_nodes.image_from_volume_node(volume)
    liver = ellipsoid(shape, (4, 12, 12), (3, 8, 9))
    spleen = ellipsoid(shape, (5, 18, 25), (2, 5, 5))
    tumour = np.zeros(shape, np.uint8)  # an absent label still gets its (empty) segment
    segmentation, ids = Logic().writeMasks(masks_on(image, {"liver": liver, "spleen": spleen, "tumour": tumour}),
                                           volume)
    assert list(ids) == ["liver", "spleen", "tumour"]
    assert segment_names(segmentation) == ["liver", "spleen", "tumour"]
    assert reference_volume(segmentation) is volume
    assert segmentation.GetName() == f"{volume.GetName()} segmentation"
    for name, expected in (("liver", liver), ("spleen", spleen), ("tumour", tumour)):
        assert_segment_equals(segmentation, ids[name], volume, expected)
    colours = [tuple(segmentation.GetSegmentation().GetSegment(i).GetColor()) for i in ids.values()]
    assert len(set(colours)) == 3
    assert colours[0] == pytest.approx((221 / 255, 130 / 255, 101 / 255), abs=1e-4)  # Slicer's liver colour


def test_segmenting_again_adds_never_overwrites_unless_asked(scene):
    shape = (6, 20, 20)
    volume = add_volume(scene, np.zeros(shape, np.int16), oblique_matrix())
    image = slicer_nodes.image_from_volume_node(volume)
    first = ellipsoid(shape, (3, 8, 8), (2, 4, 4))
    second = ellipsoid(shape, (3, 12, 12), (2, 5, 5))
    logic = Logic()
    segmentation, ids = logic.writeMasks(masks_on(image, {"liver": first}), volume)
    old_id = ids["liver"]
    old_colour = segmentation.GetSegmentation().GetSegment(old_id).GetColor()
    user_id = segmentation.GetSegmentation().AddEmptySegment("", "Spine", [0.1, 0.2, 0.3])  # drawn by the user

    _node, again = logic.writeMasks(masks_on(image, {"Liver": second}), volume, segmentation)
    assert segment_names(segmentation) == ["liver", "Spine", "Liver 2"]
    assert_segment_equals(segmentation, old_id, volume, first)  # untouched
    assert_segment_equals(segmentation, again["Liver"], volume, second)
    assert segmentation.GetSegmentation().GetSegment(again["Liver"]).GetColor() != old_colour

    _node, replaced = logic.writeMasks(masks_on(image, {"LIVER": second}), volume, segmentation, replaceExisting=True)
    assert segment_names(segmentation) == ["liver", "Spine", "Liver 2"]  # same place, same name
    assert segmentation.GetSegmentation().GetSegment(old_id) is None
    new_id = replaced["LIVER"]
    assert segmentation.GetSegmentation().GetSegmentIndex(new_id) == 0
    assert segmentation.GetSegmentation().GetSegment(new_id).GetColor() == pytest.approx(old_colour)
    assert_segment_equals(segmentation, new_id, volume, second)
    assert segmentation.GetSegmentation().GetSegment(user_id).GetName() == "Spine"


def test_a_failed_write_leaves_the_scene_as_it_was(scene):
    shape = (5, 16, 16)
    volume = add_volume(scene, np.zeros(shape, np.int16), np.diag([1.0, 1.0, 2.0, 1.0]))
    image = slicer_nodes.image_from_volume_node(volume)
    good = masks_on(image, {"liver": ellipsoid(shape, (2, 8, 8), (2, 4, 4))})
    wrong = sitk.Image([16, 16, 4], sitk.sitkUInt8)  # one slice short: another grid
    masks = collections.OrderedDict([("liver", good["liver"]), ("spleen", wrong)])
    logic = Logic()
    with pytest.raises(SSAMError, match="not on the grid"):
        logic.writeMasks(masks, volume)
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 0  # no empty node left behind

    existing, _ids = logic.writeMasks(good, volume)
    with pytest.raises(SSAMError, match="not on the grid"):
        logic.writeMasks(masks, volume, existing)
    assert segment_names(existing) == ["liver"]


def test_failure_while_adding_segments_rolls_back(scene, monkeypatch):
    shape = (5, 16, 16)
    volume = add_volume(scene, np.zeros(shape, np.int16), np.diag([1.0, 1.0, 2.0, 1.0]))
    image = slicer_nodes.image_from_volume_node(volume)
    segmentation, _ids = Logic().writeMasks(masks_on(image, {"liver": ellipsoid(shape, (2, 8, 8), (2, 4, 4))}), volume)
    calls = []
    real = slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment

    class FailingSecondWrite:
        MODE_REPLACE = slicer.vtkSlicerSegmentationsModuleLogic.MODE_REPLACE

        @staticmethod
        def SetBinaryLabelmapToSegment(*args):
            calls.append(args[2])
            return real(*args) if len(calls) == 1 else False

    monkeypatch.setattr(slicer, "vtkSlicerSegmentationsModuleLogic", FailingSecondWrite)
    masks = masks_on(image, {"spleen": ellipsoid(shape, (2, 4, 4), (1, 2, 2)), "kidney": ellipsoid(shape, (2, 12, 12), (1, 2, 2))})
    with pytest.raises(SSAMError, match="could not write the mask of 'kidney'"):
        slicer_nodes.write_segments(masks, segmentation, volume, image=image)
    assert segment_names(segmentation) == ["liver"]


def test_segmentation_goes_with_the_volume_in_hierarchy_and_transform(scene):
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    study = hierarchy.CreateStudyItem(hierarchy.CreateSubjectItem(hierarchy.GetSceneItemID(), "patient"), "study")
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "registration")
    transform.SetMatrixTransformToParent(matrix_to_vtk(np.array(
        [[0, -1, 0, 5.0], [1, 0, 0, -3.0], [0, 0, 1, 12.0], [0, 0, 0, 1]])))
    shape = (4, 10, 12)
    volume = add_volume(scene, np.zeros(shape, np.int16), np.diag([1.0, 1.0, 3.0, 1.0]))
    volume.SetAndObserveTransformNodeID(transform.GetID())
    hierarchy.CreateItem(study, volume)
    image = slicer_nodes.image_from_volume_node(volume)
    segmentation, ids = Logic().writeMasks(masks_on(image, {"liver": ellipsoid(shape, (2, 5, 6), (1, 3, 3))}), volume)
    assert hierarchy.GetItemParent(hierarchy.GetItemByDataNode(segmentation)) == study
    assert segmentation.GetTransformNodeID() == transform.GetID()


def test_segments_land_at_the_volume_voxels_through_different_transforms(scene):
    """A user's segmentation under another linear transform receives masks mapped into its own coordinates."""
    shape = (4, 10, 12)
    volume = add_volume(scene, np.zeros(shape, np.int16), np.diag([1.0, 1.0, 3.0, 1.0]))
    moved = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "moved")
    moved.SetMatrixTransformToParent(matrix_to_vtk(np.array(
        [[1, 0, 0, 10.0], [0, 1, 0, 0.0], [0, 0, 1, -4.0], [0, 0, 0, 1]])))
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "user segmentation")
    segmentation.SetAndObserveTransformNodeID(moved.GetID())
    segmentation.GetSegmentation().AddEmptySegment("", "drawn", [1, 0, 0])
    image = slicer_nodes.image_from_volume_node(volume)
    expected = ellipsoid(shape, (2, 5, 6), (1, 3, 3))
    _node, ids = Logic().writeMasks(masks_on(image, {"liver": expected}), volume, segmentation)
    values, extent, world = segment_labelmap(segmentation, ids["liver"])
    # segmentation coordinates + (10, 0, -4) = world = volume coordinates
    shift = np.eye(4)
    shift[:3, 3] = [-10.0, 0.0, 4.0]
    np.testing.assert_allclose(world, shift @ slicer_nodes.ijk_to_ras(volume), atol=1e-9)
    back = slicer_nodes.segment_masks(segmentation, volume, [ids["liver"]])["liver"]
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), expected)


# --- segmenting with the Logic ------------------------------------------------------------------------------------


def phantom(scene, matrix=None):
    """A CT-like phantom: a bright 'organ' in soft tissue, 6 slices."""
    shape = (6, 48, 56)
    array = np.full(shape, -1000, np.int16)
    array[ellipsoid(shape, (3, 24, 28), (9, 20, 24)).astype(bool)] = 40
    array[ellipsoid(shape, (3, 22, 22), (9, 9, 10)).astype(bool)] = 160
    return add_volume(scene, array, np.diag([0.9, 0.9, 2.5, 1.0]) if matrix is None else matrix, "phantom")


@pytest.mark.slow
def test_logic_segments_a_volume_in_process(scene, logic):
    volume = phantom(scene, oblique_matrix((0.9, 0.9, 2.5)))
    progress = []
    segmentation, ids, result = logic.segment(volume, ["liver", "spleen"], progress=lambda f, m: progress.append(f),
                                                **TINY)
    assert list(ids) == ["liver", "spleen"] and segment_names(segmentation) == ["liver", "spleen"]
    assert reference_volume(segmentation) is volume
    assert progress and progress[-1] == pytest.approx(1.0)
    for label, segment_id in ids.items():
        assert_segment_equals(segmentation, segment_id, volume, sitk.GetArrayFromImage(result.masks[label]))


def test_logic_cancel_leaves_no_segmentation(scene, logic):
    volume = phantom(scene)

    class CancelAtOnce:
        def is_set(self):
            return True

    with pytest.raises(Cancelled):
        logic.segment(volume, ["liver"], cancel=CancelAtOnce(), **TINY)
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 0


@pytest.mark.slow
def test_background_segmentation_writes_the_child_result(scene, logic):
    volume = phantom(scene, oblique_matrix((0.9, 0.9, 2.5)))
    task = logic.startSegmentation(volume, ["liver", "spleen"], python=sys.executable, **TINY)
    events = []
    task.wait(timeout=300, on_event=events.append)
    assert any(e["event"] == "progress" and e["fraction"] == pytest.approx(1.0) for e in events)
    child_masks = background_task.segmentation_masks(task)
    segmentation, ids, empty, summary = logic.finishSegmentation(task, volume)
    task.cleanup()
    assert not task.folder.exists()
    assert list(ids) == ["liver", "spleen"] and segment_names(segmentation) == ["liver", "spleen"]
    assert reference_volume(segmentation) is volume
    for label, segment_id in ids.items():
        assert same_geometry(child_masks[label], slicer_nodes.image_from_volume_node(volume))
        assert_segment_equals(segmentation, segment_id, volume, sitk.GetArrayFromImage(child_masks[label]))
    assert empty == [label for label, mask in child_masks.items() if not sitk.GetArrayViewFromImage(mask).any()]
    assert "slices" in summary


@pytest.mark.slow
def test_background_cancel_stops_within_a_slice_and_writes_nothing(scene):
    shape = (400, 40, 40)
    array = np.random.default_rng(3).integers(0, 500, shape).astype(np.int16)
    volume = add_volume(scene, array, np.diag([1.0, 1.0, 1.0, 1.0]), "long")
    task = Logic().startSegmentation(volume, ["liver"], python=sys.executable, **TINY)
    cancelled_at = None
    slices_after_cancel = []
    deadline = time.monotonic() + 300
    while not task.finished and time.monotonic() < deadline:
        for event in task.poll():
            if event["event"] == "progress" and event["message"].startswith("slice"):
                if cancelled_at is None:
                    task.cancel()
                    cancelled_at, cancelled_wall = time.monotonic(), time.time()
                elif event["time"] > cancelled_wall:  # not merely read late: written after the Cancel
                    slices_after_cancel.append(event["message"])
        time.sleep(0.02)
    assert task.cancelled and "cancelled" in task.error
    assert time.monotonic() - cancelled_at < 5.0
    assert len(slices_after_cancel) <= 1  # the slice already under way, then it stops
    assert not (task.folder / "masks").exists()
    with pytest.raises(SSAMError):
        background_task.segmentation_masks(task)
    task.cleanup()
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 0


def test_background_errors_are_one_line(tmp_path):
    image = sitk.Image([8, 8, 3], sitk.sitkInt16)
    task = background_task.start_segmentation(image, ["liver"], adapter=tmp_path / "missing.adapter.safetensors",
                                              python=sys.executable)
    with pytest.raises(SSAMError) as raised:
        task.wait(timeout=120)
    assert "missing.adapter.safetensors" in str(raised.value) and "\n" not in str(raised.value)
    assert not task.cancelled
    task.cleanup()


def test_background_process_that_dies_is_reported(tmp_path):
    """A child that crashes without a word (killed, out of memory) is an error naming the exit code."""
    task = background_task.start_download("sam_vit_b", python=sys.executable)
    task._process.kill()
    with pytest.raises(SSAMError, match="stopped unexpectedly"):
        task.wait(timeout=30)
    task.cleanup()


@pytest.mark.slow
def test_child_stops_when_slicer_goes_away(tmp_path):
    """No orphan: a job whose parent process has ended stops at its next slice."""
    script = tmp_path / "parent.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(REPO)!r})
        import numpy as np, SimpleITK as sitk
        from SSAMSegmentLib.slicer import background_task
        image = sitk.GetImageFromArray(np.random.default_rng(0).integers(0, 500, (2000, 32, 32)).astype(np.int16))
        task = background_task.start_segmentation(image, ["liver"], adapter=None, base="test-vit", device="cpu")
        import time
        while not any(e["event"] == "progress" and e["message"].startswith("slice") for e in task.poll()):
            time.sleep(0.05)
        print(task._process.pid, task.folder, flush=True)
    """))
    parent = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, HF_HUB_OFFLINE="1"))
    pid, folder = parent.stdout.split()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if not process_running(int(pid)):
            break
        time.sleep(0.1)
    else:
        os.kill(int(pid), 9)
        pytest.fail("the background process kept running after its parent ended")
    events = (Path(folder) / "events.jsonl").read_text()
    assert '"cancelled": true' in events


# --- fine-tuning from the scene -----------------------------------------------------------------------------------


@pytest.mark.data
def test_scene_pairs_become_training_cases(scene, data_dir):
    """Real CT slices with a liver label map drawn in Slicer: the case's mask is that label map."""
    folder = data_dir / "dcmqi-ct-3slice"
    liver = read_volume(scene, folder / "liver_seg.nrrd", "vtkMRMLLabelMapVolumeNode")
    volume = read_volume(scene, folder / "liver_seg.nrrd")  # the label map's grid stands in for the CT series
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "drawn")
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(liver, segmentation, "")
    segmentation.GetSegmentation().GetNthSegment(0).SetName("liver")
    scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "no reference")  # not a pair

    pairs = Logic.scenePairs(scene)
    assert pairs == [(volume, segmentation)]
    cases = Logic.trainingCases(pairs)
    case_id, image, masks = cases[0]
    assert list(masks) == ["liver"]
    expected = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "liver_seg.nrrd"))) > 0
    np.testing.assert_array_equal(sitk.GetArrayFromImage(masks["liver"]), expected.astype(np.uint8))
    assert same_geometry(masks["liver"], image)
    with pytest.raises(SSAMError, match="none of the segmentations has a segment named spleen"):
        Logic.trainingCases(pairs, ["spleen"])
    with pytest.raises(SSAMError, match="no volume with a segmentation"):
        Logic.trainingCases([])


def phantom_pairs(scene, logic, count=3):
    """(volume, segmentation) pairs of phantoms with their bright organ drawn, as the panel lists them."""
    pairs = []
    for number in range(count):
        volume = phantom(scene)
        volume.SetName(f"phantom {number}")
        image = slicer_nodes.image_from_volume_node(volume)
        organ = (sitk.GetArrayFromImage(image) > 100).astype(np.uint8)
        segmentation, _ids = logic.writeMasks(masks_on(image, {"organ": organ}), volume)
        pairs.append((volume, segmentation))
    return pairs


@pytest.mark.slow
def test_background_training_from_scene_pairs_within_a_time_budget(scene, tmp_path, logic):
    """The panel's path: a time budget, the default schedule (capped at 4 steps here: a validation after each),
    one table row per validation and a progress bar that ends at the total steps."""
    pairs = phantom_pairs(scene, logic)
    output = tmp_path / "adapters" / "phantom.adapter.safetensors"
    task = logic.startTraining(output, pairs=pairs, base="test-vit", budgetMinutes=10, device="cpu",
                               python=sys.executable, steps=4, batch_size=2, val_fraction=0.34)
    events = []
    result = task.wait(timeout=600, on_event=lambda e: events.append(e) if e["event"] == "training" else None)
    task.cleanup()
    assert Path(result["adapter_path"]) == output and output.is_file()
    assert logic.adapterInfo(output)["labels"] == ["organ"]
    assert result["steps"] == result["summary"]["total_steps"] == 4  # the budget allows more than the 4 asked
    assert result["summary"]["budget_minutes"] == 10
    assert any(e.get("message", "").startswith("budget of 10 min: 4 steps") for e in events)
    steps = [e for e in events if e.get("phase") == "train"]
    assert [e["step"] for e in steps] == [1, 2, 3, 4] and steps[-1]["total_steps"] == 4  # what the bar counts
    rows = [row for row in map(Logic.trainingTableRow, events) if row is not None]
    assert [row[0] for row in rows] == ["1/4", "2/4", "3/4", "4/4"]  # one row per validation
    assert [row[2] for row in rows] == [f"{record['val_dice']:.3f}" for record in result["history"]]
    assert all(row[1] and re.fullmatch(r"\d\d:\d\d", row[3]) for row in rows)


def test_panel_training_uses_the_default_recipe(tmp_path):
    """No epochs: the library's default steps, or a time budget; 0 or empty means no budget."""
    from SSAMSegmentLib import TrainingConfig
    from SSAMSegmentLib.training import recipe, trainer

    output = tmp_path / "a.adapter.safetensors"
    for none in (None, 0, 0.0, "", " "):
        config = Logic.trainingConfig(output, folder=tmp_path, budgetMinutes=none)
        assert config["budget_minutes"] is None and "epochs" not in config and "steps" not in config
        assert trainer._planned_steps(TrainingConfig(**config), steps_per_epoch=7) == recipe.DEFAULT_STEPS
    assert Logic.trainingConfig(output, folder=tmp_path, budgetMinutes=30)["budget_minutes"] == 30.0
    assert Logic.trainingConfig(output, folder=tmp_path, budgetMinutes="12.5")["budget_minutes"] == 12.5
    for bad in (-1, "soon", float("nan"), float("inf")):
        with pytest.raises(SSAMError, match="must be a number of minutes, 0 or more"):
            Logic.trainingConfig(output, folder=tmp_path, budgetMinutes=bad)
    help_text = Logic.trainingBudgetHelp()
    assert f"{recipe.DEFAULT_STEPS} optimizer steps" in help_text
    assert f"{recipe.DEFAULT_PATIENCE} validations without progress" in help_text


def test_panel_training_can_start_from_the_default_adapter(tmp_path):
    """The panel's "Start from the default adapter": the run loads the shipped adapter's weights and labels."""
    import SSAMSegmentLib
    from SSAMSegmentLib.model.adapter import read_metadata
    from SSAMSegmentLib.model.loading import DEFAULT_ADAPTER
    from SSAMSegmentLib.training import trainer

    output = tmp_path / "a.adapter.safetensors"
    assert Logic.trainingConfig(output, folder=tmp_path)["start_from"] is None
    config = Logic.trainingConfig(output, folder=tmp_path, startFromDefault=True)
    assert config["start_from"] == "default"
    model = SSAMSegmentLib.load(base=config["base"])
    trainer._start_from(model, config["start_from"])
    assert [name for name, _ in model.labels.items(taught_only=True)] == read_metadata(DEFAULT_ADAPTER)["labels"]
    assert trainer.start_record(config["start_from"])["file"] == DEFAULT_ADAPTER.name


def test_training_table_has_a_row_per_validation_only():
    validated = {"event": "training", "phase": "validated", "step": 40, "total_steps": 400, "loss": 0.51234,
                 "val_dice": 0.6789, "finish_time": time.mktime((2026, 1, 2, 14, 5, 0, 0, 0, -1))}
    assert Logic.trainingTableRow(validated) == ["40/400", "0.5123", "0.679", "14:05"]
    assert Logic.trainingTableRow(dict(validated, val_dice=None, finish_time=None))[2:] == ["none", ""]
    for phase in ("prepare", "train", "validate", "done"):
        assert Logic.trainingTableRow(dict(validated, phase=phase)) is None


# --- small Logic helpers ------------------------------------------------------------------------------------------


def test_dependency_list_comes_from_pyproject_with_torch_apart():
    torch_requirements, others = Logic.pythonRequirements()
    assert [r.split(">")[0] for r in torch_requirements] == ["torch", "torchvision"]
    assert "numpy>=1.24" in others and not any(r.startswith("torch") for r in others)
    assert Logic.torchVersionRequirement(torch_requirements) == ">=2.1"
    assert Logic.missingRequirements(others) == []  # this environment has them all
    assert Logic.missingRequirements(["numpy>=999", "no-such-package-ssam>=1", "SimpleITK"]) == [
        "numpy>=999", "no-such-package-ssam>=1"]


def test_highdicom_is_not_installed_over_slicers_own_pydicom(monkeypatch):
    import importlib.metadata

    real_version = importlib.metadata.version
    assert any(r.startswith("highdicom") for r in Logic.pythonRequirements()[1])  # pydicom 3 here: installed
    monkeypatch.setattr(importlib.metadata, "version",
                        lambda name: "2.4.4" if name == "pydicom" else real_version(name))  # Slicer 5.8's pydicom
    torch_requirements, others = Logic.pythonRequirements()
    assert not any(r.startswith("highdicom") for r in others) and "numpy>=1.24" in others


def test_label_text_and_adapter_names(tmp_path, monkeypatch):
    assert Logic.parseLabels(" liver, spleen;; kidney left\n") == ["liver", "spleen", "kidney left"]
    assert Logic.parseLabels("Liver, liver") == ["Liver"]  # the command line's rules (labels.py)
    assert Logic.parseLabels("") == []
    monkeypatch.setenv("SSAM_CACHE_DIR", str(tmp_path))
    logic = Logic()
    path = logic.newAdapterPath("my liver/ct")
    assert path == tmp_path / "adapters" / "my liver-ct.adapter.safetensors"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"")
    with pytest.raises(SSAMError, match="already exists"):
        logic.newAdapterPath("my liver/ct")
    with pytest.raises(SSAMError, match="give the new adapter a name"):
        logic.newAdapterPath(" ./ ")
    assert logic.adapterChoices([str(tmp_path / "gone.adapter.safetensors")]) == [path]


def test_weights_needed_follow_the_adapter(tmp_path, monkeypatch):
    import torch

    import SSAMSegmentLib

    model = SSAMSegmentLib.load(base="test-vit", weights="none", device="cpu")
    model.labels.add("liver", torch.zeros(model.text_dim))
    path = model.save_adapter(tmp_path / "tiny.adapter.safetensors")
    logic = Logic()
    assert logic.adapterInfo(path)["labels"] == ["liver"]
    assert logic.weightsNeeded(path, ["liver", "spleen"]) == []
    monkeypatch.setattr(Logic, "adapterInfo", lambda self, a: {"base": "sam_vit_b", "text_encoder": "clip-vit-b-32",
                                                               "labels": ["liver"]})
    assert logic.weightsNeeded("x", ["Liver"]) == ["sam_vit_b"]
    assert logic.weightsNeeded("x", ["livers"]) == ["sam_vit_b"]  # mapped to the trained label: no text encoder
    assert logic.weightsNeeded("x", ["liver", "spleen"]) == ["sam_vit_b", "clip-vit-b-32"]
    assert Logic.baseWeights("sam_vit_b") == ["sam_vit_b"] and Logic.baseWeights("litemedsam") == []
    assert [Logic.baseWeights(base) for base in Logic.TRAINING_BASES] == [[], ["sam_vit_b"]]
    monkeypatch.setenv("SSAM_CACHE_DIR", str(tmp_path))
    assert [w.id for w in Logic.missingWeights(["sam_vit_b"])] == ["sam_vit_b"]


@pytest.fixture(scope="module")
def organ_adapter(tmp_path_factory):
    """A tiny random-weight adapter taught one label, "organ"."""
    from helpers import perturbed_model

    path = tmp_path_factory.mktemp("organ") / "organ.adapter.safetensors"
    return perturbed_model(labels=("organ",), seed=5).save_adapter(path)


def test_logic_reports_mapped_and_untaught_labels(scene, organ_adapter):
    """In Slicer's process: the result says per label how the adapter knew it, the status line never calls an
    untaught label's empty segment absent, and gives the warning with its fix."""
    from SSAMSegmentLib.model import labels

    volume = phantom(scene)
    segmentation, ids, result = Logic().segment(volume, ["Organs", "tumour"], adapter=organ_adapter, device="cpu")
    assert list(ids) == ["organ", "tumour"] and segment_names(segmentation) == ["organ", "tumour"]
    assert [(m.requested, m.status) for m in result.label_status.values()] == [("Organs", labels.MAPPED),
                                                                              ("tumour", labels.UNTAUGHT)]
    matches = list(result.label_status.values())
    note, warning = labels.mapping_note(matches), labels.untaught_warning(matches, ["organ"])
    assert (result.notes, result.warnings) == ([note], [warning])
    message = Logic.segmentationMessage(["organ", "tumour"], "Seg", ["organ", "tumour"], result.untaught_labels,
                                        result.notes, result.warnings)
    assert message == ("Added organ, tumour to Seg. Absent (empty mask): organ. Not found (untaught label): tumour. "
                       f"Note: {note}. Warning: {warning}.")
    assert Logic.segmentationMessage(["organ"], "Seg", [], [], [], []) == "Added organ to Seg."


def test_background_job_reports_untaught_labels(tmp_path, organ_adapter):
    """What the panel's status line is made of comes back from the background process."""
    from SSAMSegmentLib.model import labels

    rng = np.random.default_rng(1)
    sitk.WriteImage(sitk.GetImageFromArray(rng.normal(50, 20, (2, 40, 44)).astype(np.float32)),
                    str(tmp_path / "input.nrrd"))
    job = {"image": "input.nrrd", "labels": ["organ", "gland"], "adapter": str(organ_adapter), "device": "cpu",
           "threshold": 0.999999}
    events = type("Events", (), {"emit": lambda self, *a, **k: None})()
    done = background_task._segmentation_job(job, tmp_path, events, type("Never", (), {"is_set": lambda s: False})())
    assert done["empty_labels"] == ["organ", "gland"] and done["untaught_labels"] == ["gland"]
    assert done["label_status"] == {"organ": labels.TAUGHT, "gland": labels.UNTAUGHT}
    assert f"{labels.EMPTY_UNTAUGHT}: gland" in done["summary"] and f"{labels.EMPTY_TAUGHT}: organ" in done["summary"]
    assert done["notes"] == []
    assert done["warnings"] == [labels.untaught_warning(labels.match_labels(["gland"], ["organ"]), ["organ"])]


def test_training_config_checks_the_folder(tmp_path):
    config = Logic.trainingConfig(tmp_path / "a.adapter.safetensors", folder=tmp_path, labels=["liver"],
                                  budgetMinutes=20)
    assert config == {"output": str(tmp_path / "a.adapter.safetensors"), "base": "litemedsam", "labels": ["liver"],
                      "budget_minutes": 20.0, "device": "auto", "start_from": None, "data": str(tmp_path)}
    for folder in ("", tmp_path / "missing"):
        with pytest.raises(SSAMError, match="does not exist"):
            Logic.trainingConfig(tmp_path / "a.adapter.safetensors", folder=folder)


def test_child_python_inside_slicer_is_the_pythonslicer_launcher(tmp_path, monkeypatch):
    """Inside Slicer, sys.executable is not a plain interpreter: jobs run with PythonSlicer from Slicer's PATH."""
    launcher = tmp_path / "PythonSlicer"
    launcher.write_text("#!/bin/sh\n")
    launcher.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert background_task.python_executable() == sys.executable  # slicer-core: no slicer.app
    monkeypatch.setattr(slicer, "app", object(), raising=False)
    assert background_task.python_executable() == str(launcher)


@pytest.mark.slow
def test_stopping_reaches_the_interpreter_behind_a_launcher(tmp_path):
    """PythonSlicer is a launcher that starts the real interpreter as its child: Cancel (a flag file) and a hard
    kill must both reach that interpreter, not only the launcher."""
    launcher = tmp_path / "launcher.sh"
    launcher.write_text(f'#!/bin/sh\n"{sys.executable}" "$@"\nexit $?\n')  # no exec: python runs as a child
    launcher.chmod(0o755)
    image = sitk.GetImageFromArray(np.random.default_rng(4).integers(0, 500, (2000, 32, 32)).astype(np.int16))

    def started_task():
        task = background_task.start_segmentation(image, ["liver"], adapter=None, base="test-vit", device="cpu",
                                                  python=str(launcher))
        deadline = time.monotonic() + 300
        while not any(e["event"] == "progress" and e["message"].startswith("slice") for e in task.poll()):
            assert time.monotonic() < deadline and not task.finished, task.error
            time.sleep(0.05)
        assert task._child_pid and task._child_pid != task._process.pid
        return task

    task = started_task()
    with pytest.raises(Cancelled):
        task.cancel()
        task.wait(timeout=60)
    task.cleanup()

    task = started_task()
    child = task._child_pid
    task.kill()
    time.sleep(0.5)
    assert not process_running(child)
    task.cleanup()


def process_running(pid: int) -> bool:
    """Alive and not a zombie (an orphan killed in a container may wait for a reaper that never comes)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def test_nothing_is_written_when_the_scene_changed_during_the_run(scene):
    """Between Apply and the end of a background run the user may resample or delete nodes: refuse, write nothing."""
    import types

    logic = Logic()
    volume = phantom(scene)
    started = types.SimpleNamespace(context={"grid": slicer_nodes.volume_grid(volume)})
    volume.SetSpacing(2.0, 2.0, 2.0)
    with pytest.raises(SSAMError, match="was changed or removed while it was being segmented"):
        logic.finishSegmentation(started, volume)
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 0

    image = slicer_nodes.image_from_volume_node(volume)
    output = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "chosen output")
    scene.RemoveNode(output)
    with pytest.raises(SSAMError, match="is no longer in the scene"):
        logic.writeMasks(masks_on(image, {"liver": np.zeros((6, 48, 56), np.uint8)}), volume, output)
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 0


def test_a_package_bundled_without_pip_metadata_counts_as_present(tmp_path, monkeypatch):
    """Slicer builds some packages itself; one that imports but has no metadata must not be reinstalled from PyPI."""
    (tmp_path / "bundled_by_slicer.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert Logic.missingRequirements(["bundled-by-slicer>=2.2", "not-bundled-either>=1"]) == ["not-bundled-either>=1"]


@pytest.mark.data
def test_masks_of_a_picture_go_back_on_its_one_slice_grid(scene, data_dir):
    """A 2D picture's 2D masks become segments on the one-slice volume, voxel for voxel."""
    path = sorted((data_dir / "kvasir-seg-5" / "images").iterdir())[0]
    truth = sorted((data_dir / "kvasir-seg-5" / "masks").iterdir())[0]
    rgb = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    volume = add_volume(scene, rgb[None], np.diag([-1.0, -1.0, 1.0, 1.0]), "frame", "vtkMRMLVectorVolumeNode")
    image = slicer_nodes.image_from_volume_node(volume)
    polyp = (sitk.GetArrayFromImage(sitk.ReadImage(str(truth))) > 128)
    polyp = polyp[..., 0] if polyp.ndim == 3 else polyp
    segmentation, ids = Logic().writeMasks(masks_on(image, {"polyp": polyp}), volume)
    assert_segment_equals(segmentation, ids["polyp"], volume, polyp[None].astype(np.uint8))
    case_id, case_image, masks = slicer_nodes.training_case(volume, segmentation)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(masks["polyp"]), polyp.astype(np.uint8))


# --- corrections: markups, one segment, undo, cancel, confidence tags ---------------------------------------------


def test_markups_become_lps_prompts_on_the_voxels_they_mark(scene):
    """A point list and an ROI placed in world coordinates, on an oblique volume under a transform."""
    from SSAMSegmentLib.inference.physical_prompts import PhysicalPrompt

    volume = add_volume(scene, np.zeros((6, 20, 24), np.int16), oblique_matrix())
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    moved = np.eye(4)
    moved[:3, :3] = np.array([[0.0, -1, 0], [1, 0, 0], [0, 0, 1]])
    moved[:3, 3] = (5.0, -7.0, 11.0)
    transform.SetMatrixTransformToParent(matrix_to_vtk(moved))
    volume.SetAndObserveTransformNodeID(transform.GetID())
    world = lambda ijk: (moved @ slicer_nodes.ijk_to_ras(volume) @ np.array([*ijk, 1.0]))[:3]  # noqa: E731
    points = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode")
    negatives = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode")
    for voxel in ((3, 4, 2), (20, 15, 5)):
        points.AddControlPointWorld(vtk.vtkVector3d(*world(voxel)))
    negatives.AddControlPointWorld(vtk.vtkVector3d(*world((10, 10, 1))))
    prompt = slicer_nodes.markups_prompt(volume, None, points, negatives)
    image = slicer_nodes.image_from_volume_node(volume)
    assert [image.TransformPhysicalPointToIndex(p) for p in prompt.points] == [(3, 4, 2), (20, 15, 5)]
    assert image.TransformPhysicalPointToIndex(prompt.negative_points[0]) == (10, 10, 1)

    plain = add_volume(scene, np.zeros((6, 20, 24), np.int16), np.diag([0.8, 0.9, 2.0, 1.0]), "plain")
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode")
    roi.SetCenterWorld(8.0, 9.0, 5.0)
    roi.SetSizeWorld(4.0, 6.0, 2.0)
    box = slicer_nodes.markups_prompt(plain, roi).box
    np.testing.assert_allclose(box, ((-10.0, -12.0, 4.0), (-6.0, -6.0, 6.0)))  # RAS x, y negated: LPS
    with pytest.raises(SSAMError, match="place a Markups ROI or points"):
        slicer_nodes.markups_prompt(plain)
    assert not PhysicalPrompt()


def _segmented_phantom(scene, logic):
    volume = phantom(scene)
    segmentation, ids, result = logic.segment(volume, ["liver", "spleen"], **TINY)
    return volume, segmentation, ids, result


def _segment_array(segmentation, volume, segment_id):
    name = segmentation.GetSegmentation().GetSegment(segment_id).GetName()
    return sitk.GetArrayFromImage(slicer_nodes.segment_masks(segmentation, volume, [segment_id])[name])


def test_refine_rewrites_one_segment_on_its_slices_and_undo_restores_it(scene, logic):
    volume, segmentation, ids, result = _segmented_phantom(scene, logic)
    segment = segmentation.GetSegmentation().GetSegment(ids["liver"])
    tag = vtk.reference("")
    assert segment.GetTag(slicer_nodes.CONFIDENCE_TAG, tag)  # the confidence is shown as a tag
    confidence = result.confidence("liver")
    assert tag.get() == ("" if confidence is None else f"{confidence:.2f}")
    before = {label: _segment_array(segmentation, volume, sid) for label, sid in ids.items()}
    ras = lambda ijk: (slicer_nodes.ijk_to_ras(volume) @ np.array([*ijk, 1.0]))[:3]  # noqa: E731
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode")
    low, high = ras((12, 10, 3)), ras((34, 32, 3))
    roi.SetCenterWorld(*((low + high) / 2))
    roi.SetSizeWorld(*(np.abs(high - low) + np.array([0, 0, 1.0])))  # within one slice: carried to the others
    history = slicer.vtkSegmentationHistory()  # what the segment editor's Undo works from
    history.SetSegmentation(segmentation.GetSegmentation())
    refinement = logic.refine(volume, segmentation, ids["liver"], roiNode=roi, saveState=history.SaveState, **TINY)
    assert 3 in refinement.slices
    after = {label: _segment_array(segmentation, volume, sid) for label, sid in ids.items()}
    np.testing.assert_array_equal(after["spleen"], before["spleen"])
    changed = set(np.flatnonzero((after["liver"] != before["liver"]).any(axis=(1, 2))))
    assert changed <= set(refinement.slices)
    np.testing.assert_array_equal(after["liver"], sitk.GetArrayFromImage(refinement.mask))
    assert history.IsRestorePreviousStateAvailable()
    history.RestorePreviousState()
    np.testing.assert_array_equal(_segment_array(segmentation, volume, ids["liver"]), before["liver"])


def test_cancelled_refine_leaves_the_segment_unchanged(scene, logic):
    volume, segmentation, ids, _ = _segmented_phantom(scene, logic)
    before = _segment_array(segmentation, volume, ids["liver"])
    points = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode")
    points.AddControlPointWorld(vtk.vtkVector3d(*(slicer_nodes.ijk_to_ras(volume) @ np.array([22, 24, 3, 1.0]))[:3]))
    saved = []

    class CancelAtOnce:
        def is_set(self):
            return True

    with pytest.raises(Cancelled):
        logic.refine(volume, segmentation, ids["liver"], pointsNode=points, saveState=lambda: saved.append(1),
                     cancel=CancelAtOnce(), **TINY)
    np.testing.assert_array_equal(_segment_array(segmentation, volume, ids["liver"]), before)
    assert not saved  # no undo step for a change that never happened


def _organ_job_on_a_grey_volume(adapter, tmp_path):
    """The background segmentation job's result for "organ" on a noisy grey volume, run in this process; its
    threshold leaves the mask empty."""
    rng = np.random.default_rng(1)
    sitk.WriteImage(sitk.GetImageFromArray(rng.normal(50, 20, (2, 40, 44)).astype(np.float32)),
                    str(tmp_path / "input.nrrd"))
    job = {"image": "input.nrrd", "labels": ["organ"], "adapter": str(adapter), "device": "cpu", "threshold": 0.999999}
    events = type("Events", (), {"emit": lambda self, *a, **k: None})()
    return background_task._segmentation_job(job, tmp_path, events, type("Never", (), {"is_set": lambda s: False})())


def test_a_label_taught_on_other_images_is_said_so_in_the_panel(tmp_path):
    """An adapter that taught "organ" on colour photographs only, asked on a CT-like grey volume in a background
    job: the job returns the label, and the status line calls its empty segment not found, with the warning."""
    from helpers import perturbed_model
    from SSAMSegmentLib.model import labels

    model = perturbed_model(labels=("organ",), seed=5)
    model.label_kinds = {"organ": ["2D RGB"]}
    done = _organ_job_on_a_grey_volume(model.save_adapter(tmp_path / "photo.adapter.safetensors"), tmp_path)
    warning = labels.other_kind_warning(["organ"], {"organ": ["2D RGB"]}, "3D")
    assert done["other_kind_labels"] == ["organ"] and done["warnings"] == [warning]
    message = Logic.segmentationMessage(["organ"], "Seg", done["empty_labels"], done["untaught_labels"], done["notes"],
                                        done["warnings"], done["other_kind_labels"])
    assert message == f"Added organ to Seg. Not found (taught on other kinds of image): organ. Warning: {warning}."


def test_a_label_learnt_poorly_is_not_called_absent_in_the_panel(tmp_path):
    """An adapter whose training record gives "organ" a validation Dice of 0.1: the background job returns it as
    learnt poorly and the status line calls its empty segment not found, never absent."""
    from helpers import perturbed_model

    model = perturbed_model(labels=("organ",), seed=5)
    adapter = model.save_adapter(tmp_path / "weak.adapter.safetensors", {"val_dice_classic_per_label": {"organ": 0.1}})
    done = _organ_job_on_a_grey_volume(adapter, tmp_path)
    assert done["empty_labels"] == ["organ"] and done["weak_labels"] == ["organ"]
    message = Logic.segmentationMessage(["organ"], "Seg", done["empty_labels"], done["untaught_labels"], done["notes"],
                                        done["warnings"], done["other_kind_labels"], done["weak_labels"])
    assert message == "Added organ to Seg. Not found (learnt poorly): organ."


@pytest.mark.data
@pytest.mark.slow
def test_the_panels_self_box_choice_reaches_the_model_in_process_and_in_the_background(scene, data_dir):
    """The panel's "Redraw outlines from their own box" (parameter selfBox) is the library's self_box: checked, the
    labels the shipped adapter chose (polyp among them) are redrawn where the base is sure; unchecked, the text masks
    alone, in process and in the background job alike; Refine follows the same setting."""
    import SSAMSegmentLib

    model = SSAMSegmentLib.load(adapter="default", merge=True)
    if "polyp" not in model.self_box:
        pytest.skip("the shipped adapter does not redraw polyps from their box")
    logic = Logic()
    for path in sorted((data_dir / "kvasir-seg-5" / "images").iterdir()):
        rgb = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
        volume = add_volume(scene, rgb[None], np.diag([-1.0, -1.0, 1.0, 1.0]), "frame", "vtkMRMLVectorVolumeNode")
        image = slicer_nodes.image_from_volume_node(volume)
        text = sitk.GetArrayFromImage(model.segment(image, ["polyp"], self_box="off").masks["polyp"])
        _, _, checked = logic.segment(volume, ["polyp"], selfBox="auto")
        _, _, unchecked = logic.segment(volume, ["polyp"], selfBox="off")
        assert (sitk.GetArrayFromImage(unchecked.masks["polyp"]) == text).all() and not unchecked.self_boxed
        if checked.self_boxed:  # an image the base is sure of: the redrawn outline differs from the text mask
            assert not (sitk.GetArrayFromImage(checked.masks["polyp"]) == text).all()
            task = logic.startSegmentation(volume, ["polyp"], selfBox="off", python=sys.executable)
            task.wait(timeout=300)
            child = background_task.segmentation_masks(task)["polyp"]
            task.cleanup()
            assert (sitk.GetArrayFromImage(child) == text).all()
            # Refine follows the same checkbox: a box around the polyp gives the library's correction either way
            segmentation, ids, _ = logic.segment(volume, ["polyp"], selfBox="off")
            rows, cols = np.nonzero(text.reshape(text.shape[-2:]))
            ras = lambda ijk: (slicer_nodes.ijk_to_ras(volume) @ np.array([*ijk, 1.0]))[:3]  # noqa: E731
            low, high = ras((int(cols.min()), int(rows.min()), 0)), ras((int(cols.max()), int(rows.max()), 0))
            roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode")
            roi.SetCenterWorld(*((low + high) / 2))
            roi.SetSizeWorld(*(np.abs(high - low) + np.array([0, 0, 1.0])))
            box = slicer_nodes.markups_prompt(volume, roi).box
            for setting in ("off", "auto"):
                current = slicer_nodes.segment_masks(segmentation, volume, [ids["polyp"]])["polyp"]
                expected = model.refine(image, "polyp", current, box=box, self_box=setting)
                refined = logic.refine(volume, segmentation, ids["polyp"], roiNode=roi, selfBox=setting)
                assert (sitk.GetArrayFromImage(refined.mask) == sitk.GetArrayFromImage(expected.mask)).all()
            break
    else:
        pytest.fail("no Kvasir image where the base is sure of the polyp's box: the test would prove nothing")
