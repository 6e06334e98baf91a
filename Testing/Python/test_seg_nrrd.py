"""The .seg.nrrd writer and reader, checked against 3D Slicer's own storage node (slicer-core), both ways."""

from collections import OrderedDict

import numpy as np
import pytest
import SimpleITK as sitk

from SSAMSegmentLib.errors import SSAMError
from SSAMSegmentLib.files.seg_nrrd import (anatomy_color, read_seg_nrrd, segment_color, segment_colors,
                                     write_seg_nrrd)

slicer = pytest.importorskip("slicer", reason="slicer-core (pip install slicer-core) reads the files as Slicer does")
vtk = pytest.importorskip("vtk")
from vtkmodules.util import numpy_support  # noqa: E402

# An oblique (rotated about two axes), anisotropic grid with an origin away from zero.
SPACING = (0.7, 0.45, 2.5)
ORIGIN = (-120.25, 33.5, -401.125)


def oblique_direction():
    a, b = np.deg2rad(17.0), np.deg2rad(-9.0)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    return (rz @ rx).reshape(-1)


def on_grid(array, spacing=SPACING, origin=ORIGIN, direction=None):
    image = sitk.GetImageFromArray(np.ascontiguousarray(array, dtype=np.uint8))
    image.SetSpacing(spacing[: array.ndim])
    image.SetOrigin(origin[: array.ndim])
    image.SetDirection(oblique_direction() if direction is None else direction)
    return image


def ellipsoid(shape, center, radii):
    z, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    return (((z - center[0]) / radii[0]) ** 2 + ((y - center[1]) / radii[1]) ** 2
            + ((x - center[2]) / radii[2]) ** 2 <= 1).astype(np.uint8)


def lps_centroid(mask: sitk.Image):
    """Mean physical (LPS) position of a mask's foreground voxels, by SimpleITK."""
    indices = np.argwhere(sitk.GetArrayViewFromImage(mask) > 0)[:, ::-1]  # (x, y[, z]) order
    points = [mask.TransformContinuousIndexToPhysicalPoint([float(v) for v in index]) for index in indices]
    return np.mean(points, axis=0)


# ---------------------------------------------------------------------------------------------- slicer-core side
class SlicerScene:
    """A headless MRML scene set up as docs/design.md section 5 says (application logic, segmentations logic)."""

    def __init__(self):
        self.scene = slicer.vtkMRMLScene()
        self.app_logic = slicer.vtkSlicerApplicationLogic()
        self.app_logic.SetMRMLScene(self.scene)
        self.segmentations_logic = slicer.vtkSlicerSegmentationsModuleLogic()
        self.segmentations_logic.SetMRMLScene(self.scene)

    def read(self, path):
        """Read with vtkMRMLSegmentationStorageNode; per segment: name, colour, voxel count, layer, LPS centroid and
        the IJK-to-LPS matrix of its labelmap."""
        node = self.scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
        storage = node.CreateDefaultStorageNode()
        storage.SetFileName(str(path))
        assert storage.ReadData(node) == 1, "Slicer could not read the file"
        segmentation = node.GetSegmentation()
        segments = OrderedDict()
        for index in range(segmentation.GetNumberOfSegments()):
            segment = segmentation.GetNthSegment(index)
            labelmap = segment.GetRepresentation("Binary labelmap")
            extent = labelmap.GetExtent()
            matrix = vtk.vtkMatrix4x4()
            labelmap.GetImageToWorldMatrix(matrix)
            ijk_to_ras = np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])
            ijk_to_lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ ijk_to_ras
            count, centroid = 0, None
            if extent[1] >= extent[0] and extent[3] >= extent[2] and extent[5] >= extent[4]:
                dims = (extent[5] - extent[4] + 1, extent[3] - extent[2] + 1, extent[1] - extent[0] + 1)
                voxels = numpy_support.vtk_to_numpy(labelmap.GetPointData().GetScalars()).reshape(dims)
                kji = np.argwhere(voxels == segment.GetLabelValue())
                count = len(kji)
                if count:
                    ijk = kji[:, ::-1] + np.array([extent[0], extent[2], extent[4]])
                    homogeneous = np.c_[ijk, np.ones(count)]
                    centroid = (homogeneous @ ijk_to_lps.T)[:, :3].mean(axis=0)
            segments[segment.GetName()] = dict(color=segment.GetColor(), count=count, centroid=centroid,
                                               ijk_to_lps=ijk_to_lps, labelmap=labelmap)
        layers = segmentation.GetNumberOfLayers()
        self.scene.RemoveNode(node)
        return segments, layers

    def write(self, path, masks: "OrderedDict[str, sitk.Image]", colors, separate_layers=False):
        """Write masks as Slicer does: a segmentation node with the image as reference geometry, saved by the
        storage node's WriteData."""
        node = self.scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
        segmentation = node.GetSegmentation()
        first = next(iter(masks.values()))
        ijk_to_lps = np.eye(4)
        ijk_to_lps[:3, :3] = np.array(first.GetDirection()).reshape(3, 3) * np.array(first.GetSpacing())
        ijk_to_lps[:3, 3] = first.GetOrigin()
        ijk_to_ras = vtk.vtkMatrix4x4()
        for r, row in enumerate(np.diag([-1.0, -1.0, 1.0, 1.0]) @ ijk_to_lps):
            for c, value in enumerate(row):
                ijk_to_ras.SetElement(r, c, value)
        reference = slicer.vtkOrientedImageData()
        reference.SetExtent(0, first.GetSize()[0] - 1, 0, first.GetSize()[1] - 1, 0, first.GetSize()[2] - 1)
        reference.SetImageToWorldMatrix(ijk_to_ras)
        segmentation.SetConversionParameter(
            slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName(),
            slicer.vtkSegmentationConverter.SerializeImageGeometry(reference))
        for name, mask in masks.items():
            labelmap = slicer.vtkOrientedImageData()
            labelmap.SetExtent(reference.GetExtent())
            labelmap.SetImageToWorldMatrix(ijk_to_ras)
            labelmap.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
            numpy_support.vtk_to_numpy(labelmap.GetPointData().GetScalars())[:] = \
                sitk.GetArrayViewFromImage(mask).reshape(-1)
            labelmap.Modified()
            segment_id = segmentation.AddEmptySegment(name, name, colors[name])
            assert segment_id, "AddEmptySegment failed (segmentations logic without a scene?)"
            if separate_layers:
                segmentation.SeparateSegmentLabelmap(segment_id)
            assert slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(labelmap, node, segment_id)
        storage = node.CreateDefaultStorageNode()
        storage.SetFileName(str(path))
        assert storage.WriteData(node) == 1
        written_layers = segmentation.GetNumberOfLayers()
        self.scene.RemoveNode(node)
        return written_layers


@pytest.fixture
def slicer_scene():
    return SlicerScene()


def header_of(path) -> str:
    raw = open(path, "rb").read(20000)
    return raw[: raw.index(b"\n\n")].decode()


def expected_ijk_to_lps(image: sitk.Image):
    matrix = np.eye(4)
    matrix[:3, :3] = np.array(image.GetDirection()).reshape(3, 3) * np.array(image.GetSpacing())
    matrix[:3, 3] = image.GetOrigin()
    return matrix


# -------------------------------------------------------------------------------------------------- the tests
def organ_masks():
    """An empty label first (the awkward case for shared layers), then two organs that do not touch."""
    shape = (9, 40, 52)
    liver = ellipsoid(shape, (4, 18, 16), (3.5, 11, 12))
    spleen = ellipsoid(shape, (5, 20, 42), (3, 7, 6))
    return OrderedDict(tumor=on_grid(np.zeros(shape, np.uint8)), liver=on_grid(liver), spleen=on_grid(spleen))


def test_slicer_reads_names_colours_voxels_and_oblique_geometry(tmp_path, slicer_scene):
    masks = organ_masks()
    colors = {"liver": (0.1, 0.2, 0.3)}  # given for one label; the others get anatomy colours
    path = write_seg_nrrd(tmp_path / "organs.seg.nrrd", masks, colors=colors)
    header = header_of(path)
    assert "dimension: 3" in header and "kinds: domain domain domain" in header

    segments, layers = slicer_scene.read(path)
    assert list(segments) == ["tumor", "liver", "spleen"]
    assert layers == 1  # nothing overlaps: one shared label map
    assert segments["liver"]["color"] == pytest.approx((0.1, 0.2, 0.3))
    assert segments["spleen"]["color"] == pytest.approx(np.array([157, 108, 162]) / 255, abs=1e-6)
    assert segments["tumor"]["color"] == pytest.approx(np.array([144, 238, 144]) / 255, abs=1e-6)
    for name, mask in masks.items():
        assert segments[name]["count"] == int(sitk.GetArrayViewFromImage(mask).sum()), name
    assert segments["tumor"]["count"] == 0  # the empty label is kept, as an empty segment
    for name in ("liver", "spleen"):
        np.testing.assert_allclose(segments[name]["ijk_to_lps"], expected_ijk_to_lps(masks[name]), atol=1e-9)
        np.testing.assert_allclose(segments[name]["centroid"], lps_centroid(masks[name]), atol=1e-6)


def test_our_reader_round_trips_voxels_and_geometry_exactly(tmp_path):
    masks = organ_masks()
    path = write_seg_nrrd(tmp_path / "organs.seg.nrrd", masks)
    read, colors = read_seg_nrrd(path)
    assert list(read) == list(masks)
    for name, mask in masks.items():
        assert read[name].GetPixelID() == sitk.sitkUInt8
        np.testing.assert_array_equal(sitk.GetArrayViewFromImage(read[name]), sitk.GetArrayViewFromImage(mask))
        assert read[name].GetOrigin() == mask.GetOrigin()
        assert read[name].GetSpacing() == mask.GetSpacing()
        assert read[name].GetDirection() == mask.GetDirection()
    assert colors["liver"] == pytest.approx(np.array([221, 130, 101]) / 255, abs=1e-6)


def test_overlapping_segments_go_to_separate_layers(tmp_path, slicer_scene):
    shape = (6, 30, 30)
    organ = ellipsoid(shape, (3, 15, 15), (2.5, 12, 12))
    lesion = ellipsoid(shape, (3, 12, 18), (1.5, 4, 4))  # inside the organ
    kidney = ellipsoid(shape, (3, 26, 4), (1, 3, 3))  # touches neither: shares the first layer
    masks = OrderedDict(liver=on_grid(organ), tumor=on_grid(lesion), kidney=on_grid(kidney))
    assert (organ & lesion).sum() > 0
    path = write_seg_nrrd(tmp_path / "overlap.seg.nrrd", masks)
    header = header_of(path)
    assert "dimension: 4" in header and "kinds: list domain domain domain" in header
    assert "sizes: 2 30 30 6" in header and "space directions: none (" in header

    segments, layers = slicer_scene.read(path)
    assert layers == 2
    for name, mask in masks.items():
        assert segments[name]["count"] == int(sitk.GetArrayViewFromImage(mask).sum()), name
        np.testing.assert_allclose(segments[name]["centroid"], lps_centroid(mask), atol=1e-6)

    read, _ = read_seg_nrrd(path)
    for name, mask in masks.items():
        np.testing.assert_array_equal(sitk.GetArrayViewFromImage(read[name]), sitk.GetArrayViewFromImage(mask))


def test_2d_masks_are_one_slice_for_slicer_and_2d_again_for_us(tmp_path, slicer_scene):
    yy, xx = np.mgrid[:48, :64]
    polyp = (((yy - 20) / 9.0) ** 2 + ((xx - 30) / 14.0) ** 2 <= 1).astype(np.uint8)
    theta = np.deg2rad(30)
    direction = (np.cos(theta), -np.sin(theta), np.sin(theta), np.cos(theta))
    mask = on_grid(polyp, spacing=(0.3, 0.6), origin=(5.5, -7.25), direction=direction)
    path = write_seg_nrrd(tmp_path / "polyp.seg.nrrd", OrderedDict(polyp=mask))
    assert "sizes: 64 48 1" in header_of(path)

    segments, _ = slicer_scene.read(path)
    assert segments["polyp"]["count"] == int(polyp.sum())
    lps = segments["polyp"]["centroid"]
    np.testing.assert_allclose(lps[:2], lps_centroid(mask), atol=1e-6)
    assert lps[2] == pytest.approx(0.0)

    read, _ = read_seg_nrrd(path)
    assert read["polyp"].GetDimension() == 2
    assert read["polyp"].GetSpacing() == mask.GetSpacing() and read["polyp"].GetOrigin() == mask.GetOrigin()
    assert read["polyp"].GetDirection() == mask.GetDirection()
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(read["polyp"]), polyp)


def test_only_empty_segments(tmp_path, slicer_scene):
    shape = (4, 10, 12)
    masks = OrderedDict(liver=on_grid(np.zeros(shape)), heart=on_grid(np.zeros(shape)))
    path = write_seg_nrrd(tmp_path / "empty.seg.nrrd", masks)
    segments, _ = slicer_scene.read(path)
    assert list(segments) == ["liver", "heart"]
    assert all(segment["count"] == 0 for segment in segments.values())
    read, _ = read_seg_nrrd(path)
    assert list(read) == ["liver", "heart"]
    assert all(sitk.GetArrayViewFromImage(m).sum() == 0 and m.GetSize() == (12, 10, 4) for m in read.values())


@pytest.mark.parametrize("separate_layers", [False, True])
def test_reads_files_written_by_slicer(tmp_path, slicer_scene, separate_layers):
    shape = (7, 32, 36)
    organ = ellipsoid(shape, (3, 16, 18), (3, 12, 14))
    lesion = ellipsoid(shape, (3, 14, 20), (1.5, 4, 5)) if separate_layers else ellipsoid(shape, (3, 29, 3), (1, 2, 2))
    masks = OrderedDict(Liver=on_grid(organ), Tumor=on_grid(lesion))
    colors = {"Liver": (0.8, 0.5, 0.4), "Tumor": (0.25, 0.75, 0.5)}
    path = tmp_path / "by_slicer.seg.nrrd"
    layers = slicer_scene.write(path, masks, colors, separate_layers=separate_layers)
    assert layers == (2 if separate_layers else 1)
    assert ("dimension: 4" in header_of(path)) == separate_layers

    read, read_colors = read_seg_nrrd(path)
    assert list(read) == ["Liver", "Tumor"]
    for name, mask in masks.items():
        assert read_colors[name] == pytest.approx(colors[name])
        np.testing.assert_array_equal(sitk.GetArrayViewFromImage(read[name]), sitk.GetArrayViewFromImage(mask))
        np.testing.assert_allclose(read[name].GetOrigin(), mask.GetOrigin(), atol=1e-9)
        np.testing.assert_allclose(read[name].GetSpacing(), mask.GetSpacing(), rtol=1e-12)
        np.testing.assert_allclose(read[name].GetDirection(), mask.GetDirection(), atol=1e-12)


def test_reads_a_slicer_file_cropped_to_its_segments(tmp_path, slicer_scene):
    """Without a reference geometry Slicer saves only the segments' bounding box (with an extent offset): the masks
    come back on that smaller grid, each voxel at its true physical position."""
    shape = (5, 20, 24)
    organ = ellipsoid(shape, (2, 12, 15), (1.5, 4, 5))
    node = slicer_scene.scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    labelmap = slicer.vtkOrientedImageData()
    labelmap.SetExtent(0, shape[2] - 1, 0, shape[1] - 1, 0, shape[0] - 1)
    labelmap.SetSpacing(SPACING)
    labelmap.SetOrigin(-ORIGIN[0], -ORIGIN[1], ORIGIN[2])  # RAS
    labelmap.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    numpy_support.vtk_to_numpy(labelmap.GetPointData().GetScalars())[:] = organ.reshape(-1)
    segment_id = node.GetSegmentation().AddEmptySegment("spleen", "spleen", (0.6, 0.4, 0.6))
    assert slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(labelmap, node, segment_id)
    storage = node.CreateDefaultStorageNode()
    storage.SetFileName(str(tmp_path / "cropped.seg.nrrd"))
    assert storage.WriteData(node) == 1
    assert "Segmentation_ReferenceImageExtentOffset:=0 0 0" not in header_of(tmp_path / "cropped.seg.nrrd")

    read, _ = read_seg_nrrd(tmp_path / "cropped.seg.nrrd")
    assert read["spleen"].GetSize() < (shape[2], shape[1], shape[0])
    assert int(sitk.GetArrayViewFromImage(read["spleen"]).sum()) == int(organ.sum())
    in_lps = on_grid(organ, direction=np.diag([-1.0, -1.0, 1.0]).reshape(-1))  # RAS axes seen in LPS
    np.testing.assert_allclose(lps_centroid(read["spleen"]), lps_centroid(in_lps), atol=1e-6)


def test_anatomy_colours_follow_slicer_generic_anatomy_colors():
    def rgb(*values):
        return pytest.approx(np.array(values) / 255, abs=1e-6)

    assert segment_color("Liver", 5) == rgb(221, 130, 101)
    assert segment_color("kidney_left", 0) == rgb(185, 102, 83)
    assert segment_color("gallbladder", 0) == rgb(139, 150, 98)  # not "bladder"
    assert segment_color("urinary_bladder", 0) == rgb(222, 154, 132)
    assert segment_color("adrenal_gland_right", 0) == rgb(249, 186, 150)  # not "kidney" via "renal"
    assert segment_color("vertebrae_L3", 0) == rgb(212, 188, 102)
    assert segment_color("spinal_cord", 0) == rgb(244, 214, 49)
    assert segment_color("Polyp", 0) == rgb(144, 238, 144)
    assert segment_color("heart", 0) == rgb(206, 110, 84)
    assert anatomy_color("Nucleus") is None and anatomy_color("Glands") is None
    palette = [segment_color("Nucleus", i) for i in range(16)]
    assert len(set(palette)) == 16 and segment_color("Glands", 3) == palette[3]
    assert all(0 <= v <= 1 for color in palette for v in color)


def test_segment_colors_are_distinct_within_a_set():
    colors = segment_colors(["kidney_right", "kidney_left", "liver", "Glands", "Nucleus"])
    assert colors["kidney_right"] == segment_color("kidney_right", 0)
    assert len(set(colors.values())) == 5


def test_bad_input_is_one_line_error(tmp_path):
    a = on_grid(np.zeros((3, 4, 5)))
    b = on_grid(np.zeros((3, 4, 6)))
    with pytest.raises(SSAMError, match=r"size \(5, 4, 3\).*size \(6, 4, 3\).*different grids"):
        write_seg_nrrd(tmp_path / "x.seg.nrrd", OrderedDict(liver=a, heart=b))
    with pytest.raises(SSAMError, match="no label masks"):
        write_seg_nrrd(tmp_path / "x.seg.nrrd", OrderedDict())
    with pytest.raises(SSAMError, match="colour"):
        write_seg_nrrd(tmp_path / "x.seg.nrrd", OrderedDict(liver=a), colors={"liver": (255, 0, 0)})
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(SSAMError, match="cannot create the folder"):
        write_seg_nrrd(blocker / "x.seg.nrrd", OrderedDict(liver=a))
    assert not list(tmp_path.glob("*.seg.nrrd")) and not list(tmp_path.glob(".*part*"))
    with pytest.raises(SSAMError, match="does not exist"):
        read_seg_nrrd(tmp_path / "missing.seg.nrrd")
    (tmp_path / "junk.seg.nrrd").write_text("hello")
    with pytest.raises(SSAMError, match="cannot read") as error:
        read_seg_nrrd(tmp_path / "junk.seg.nrrd")
    assert "\n" not in str(error.value)
