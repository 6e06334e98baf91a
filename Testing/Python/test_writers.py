"""Label maps with sidecars, PNG previews and the suffix dispatcher, on a generated "organ" volume and real CT."""

import json
from collections import OrderedDict

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from SSAMSegmentLib.files import seg_nrrd

from SSAMSegmentLib.files import writers
from SSAMSegmentLib.errors import SSAMError
from SSAMSegmentLib.files.image_io import read_image, same_geometry
from SSAMSegmentLib.files.seg_nrrd import read_seg_nrrd, segment_colors
from SSAMSegmentLib.files.writers import (sidecar_path, write_label_map, write_outputs, write_preview_png)

from helpers import grid_image

SHAPE = (24, 64, 80)  # z, y, x
SPACING = (0.8, 0.8, 2.5)
ORIGIN = (-30.0, 12.5, -88.0)


def on_grid(array, direction=None):
    return grid_image(array, SPACING, ORIGIN, direction)


def ellipsoid(center, radii, shape=SHAPE):
    z, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    return (((z - center[0]) / radii[0]) ** 2 + ((y - center[1]) / radii[1]) ** 2
            + ((x - center[2]) / radii[2]) ** 2 <= 1).astype(np.uint8)


@pytest.fixture(scope="module")
def phantom():
    """A noisy CT-like volume (HU) with an ellipsoid organ, a lesion inside it, a second organ, and an absent label."""
    rng = np.random.default_rng(0)
    organ = ellipsoid((12, 30, 30), (8, 18, 22))
    lesion = ellipsoid((11, 28, 36), (3, 5, 6))
    spleen = ellipsoid((14, 34, 66), (5, 9, 8))
    volume = rng.normal(-80, 25, SHAPE)  # fat
    volume[organ > 0] = rng.normal(60, 15, int(organ.sum()))
    volume[lesion > 0] = rng.normal(20, 15, int(lesion.sum()))
    volume[spleen > 0] = rng.normal(50, 15, int(spleen.sum()))
    image = on_grid(volume.astype(np.int16))
    masks = OrderedDict(liver=on_grid(organ), tumor=on_grid(lesion), spleen=on_grid(spleen),
                        heart=on_grid(np.zeros(SHAPE, np.uint8)))
    return image, masks


def test_nifti_label_map_values_overlap_and_sidecar(tmp_path, phantom):
    _, masks = phantom
    path = write_label_map(tmp_path / "case_01.nii.gz", masks)
    labels = sitk.ReadImage(str(path))
    assert labels.GetPixelID() == sitk.sitkUInt8
    assert same_geometry(labels, masks["liver"])
    values = sitk.GetArrayViewFromImage(labels)
    liver, tumor, spleen = (sitk.GetArrayViewFromImage(masks[n]) > 0 for n in ("liver", "tumor", "spleen"))
    assert np.all(values[tumor] == 2)  # the tumor lies inside the liver: the later label wins
    assert np.all(values[liver & ~tumor] == 1)
    assert np.all(values[spleen] == 3)
    assert np.count_nonzero(values) == np.count_nonzero(liver | tumor | spleen)
    sidecar = tmp_path / "case_01.json"
    assert sidecar_path(path) == sidecar
    assert json.loads(sidecar.read_text()) == {"1": "liver", "2": "tumor", "3": "spleen", "4": "heart"}


def test_nrrd_label_map_keeps_oblique_geometry_and_goes_16_bit_past_255_labels(tmp_path):
    theta = np.deg2rad(25)
    direction = (np.cos(theta), 0, np.sin(theta), 0, 1, 0, -np.sin(theta), 0, np.cos(theta))
    shape = (2, 16, 20)
    masks = OrderedDict()
    for index in range(300):  # one voxel per label
        array = np.zeros(shape, np.uint8)
        array.reshape(-1)[index] = 1
        masks[f"structure {index}"] = on_grid(array, direction)
    path = write_label_map(tmp_path / "many.nrrd", masks)
    labels = sitk.ReadImage(str(path))
    assert labels.GetPixelID() == sitk.sitkUInt16
    assert labels.GetOrigin() == ORIGIN
    np.testing.assert_allclose(labels.GetDirection(), direction, atol=1e-12)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(labels).reshape(-1)[:300], np.arange(1, 301))
    assert json.loads((tmp_path / "many.json").read_text())["300"] == "structure 299"


def test_write_outputs_chooses_the_format_by_suffix(tmp_path, phantom):
    image, masks = phantom
    written = write_outputs(tmp_path / "out" / "case.seg.nrrd", image, masks, preview_path=tmp_path / "case.png")
    assert written == [tmp_path / "out" / "case.seg.nrrd", tmp_path / "case.png"]
    read, _ = read_seg_nrrd(written[0])
    assert list(read) == list(masks)  # overlapping tumor kept as its own layer, empty heart kept
    for name in masks:
        np.testing.assert_array_equal(sitk.GetArrayViewFromImage(read[name]), sitk.GetArrayViewFromImage(masks[name]))

    written = write_outputs(tmp_path / "case.nii", image, masks)
    assert written == [tmp_path / "case.nii", tmp_path / "case.json"] and all(p.is_file() for p in written)
    written = write_outputs(tmp_path / "case.nrrd", image, masks)
    assert written == [tmp_path / "case.nrrd", tmp_path / "case.json"]

    with pytest.raises(SSAMError, match=r"\.seg\.nrrd, \.nii\.gz, \.nii, \.nrrd"):
        write_outputs(tmp_path / "case.mha", image, masks)
    with pytest.raises(SSAMError, match="must end in .png"):
        write_outputs(tmp_path / "x.seg.nrrd", image, masks, preview_path=tmp_path / "x.jpg")
    other_grid = sitk.Image([40, 32, 12], sitk.sitkInt16)
    with pytest.raises(SSAMError, match=r"not on the image's grid"):
        write_outputs(tmp_path / "x.seg.nrrd", other_grid, masks)
    assert not (tmp_path / "x.seg.nrrd").exists()


def test_preview_shows_the_slices_with_most_foreground_in_segment_colours(tmp_path, phantom):
    image, masks = phantom
    path = write_preview_png(tmp_path / "preview.png", image, masks, max_tiles=4)
    picture = np.asarray(Image.open(path).convert("RGB"))
    assert picture.shape[0] > 2 * writers.PREVIEW_TILE_SIZE // 3 and picture.shape[1] >= 2 * writers.PREVIEW_TILE_SIZE
    colors = segment_colors(list(masks))
    for name in ("liver", "tumor", "spleen"):  # outlines are drawn in the exact segment colour
        rgb = np.round(np.array(colors[name]) * 255).astype(np.uint8)
        assert np.all(picture == rgb, axis=-1).sum() > 50, name
    # The tiles are the four slices with the most foreground, in order.
    per_slice = sum(np.count_nonzero(sitk.GetArrayViewFromImage(m), axis=(1, 2)) for m in masks.values())
    assert writers._choose_slices(per_slice, 4) == sorted(np.argsort(-per_slice, kind="stable")[:4].tolist())


def test_preview_without_foreground_shows_evenly_spaced_slices(tmp_path, phantom):
    image, masks = phantom
    empty = OrderedDict((name, on_grid(np.zeros(SHAPE, np.uint8))) for name in masks)
    assert writers._choose_slices(np.zeros(24, int), 6) == [3, 7, 10, 13, 16, 20]
    path = write_preview_png(tmp_path / "empty.png", image, empty, max_tiles=6)
    picture = np.asarray(Image.open(path).convert("RGB"))
    liver = np.round(np.array(segment_colors(list(masks))["liver"]) * 255).astype(np.uint8)
    assert 0 < np.all(picture == liver, axis=-1).sum() < 400  # only the legend's swatch


def test_preview_orients_slices_as_a_radiology_viewer():
    identity = np.eye(3)
    assert writers._display_orientation(identity, 1, 2) == (False, False, False)  # LPS axial: as stored
    ras = np.diag([-1.0, -1.0, 1.0])
    assert writers._display_orientation(ras, 1, 2) == (False, True, True)  # RAS-stored axial: turned 180 degrees
    assert writers._display_orientation(identity, 0, 2) == (False, True, False)  # coronal: superior up
    swapped = np.array([[0.0, 1, 0], [1, 0, 0], [0, 0, 1]])  # array columns run posterior, rows run left
    assert writers._display_orientation(swapped, 1, 2)[0] is True


def test_preview_of_an_anisotropic_coronal_cut_keeps_physical_proportions(tmp_path, phantom):
    image, masks = phantom
    path = write_preview_png(tmp_path / "coronal.png", image, OrderedDict(liver=masks["liver"]), array_axis=1,
                             max_tiles=1)
    width, height = Image.open(path).size
    # One tile: 80 x 0.8 mm wide, 24 x 2.5 mm high -> height/width = 60/64 of the tile, plus the legend row.
    tile_height = height - 4 - 22 - 4 - 4
    assert tile_height == pytest.approx(writers.PREVIEW_TILE_SIZE * 60 / 64, abs=2)
    assert width == writers.PREVIEW_TILE_SIZE + 8


def test_failed_writes_leave_nothing_and_keep_existing_files(tmp_path, phantom, monkeypatch):
    image, masks = phantom
    label_map = write_label_map(tmp_path / "case.nii.gz", masks)
    segmentation = seg_nrrd.write_seg_nrrd(tmp_path / "case.seg.nrrd", masks)
    preview = write_preview_png(tmp_path / "case.png", image, masks)
    before = {p: p.read_bytes() for p in tmp_path.iterdir()}
    smaller = OrderedDict(liver=masks["liver"])

    def broken_image_write(*args, **kwargs):
        raise RuntimeError("ITK ERROR: ImageFileWriter: No space left on device")

    monkeypatch.setattr(writers.sitk, "WriteImage", broken_image_write)
    with pytest.raises(SSAMError, match="No space left on device"):
        write_label_map(label_map, smaller)

    def broken_stream(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(seg_nrrd.gzip.GzipFile, "write", broken_stream)
    with pytest.raises(SSAMError, match="cannot write .*case.seg.nrrd"):
        seg_nrrd.write_seg_nrrd(segmentation, smaller)

    monkeypatch.setattr(writers.Image.Image, "save", broken_stream)
    with pytest.raises(SSAMError, match="cannot write .*case.png"):
        write_preview_png(preview, image, smaller)

    assert {p: p.read_bytes() for p in tmp_path.iterdir()} == before  # untouched, and no temporary files left


def test_unwritable_destination_is_a_one_line_error(tmp_path, phantom):
    image, masks = phantom
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where a folder is expected")
    for name in ("case.seg.nrrd", "case.nii.gz"):
        with pytest.raises(SSAMError, match="cannot create the folder") as error:
            write_outputs(blocker / name, image, masks)
        assert "\n" not in str(error.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["not_a_folder"]


def test_a_failing_preview_leaves_no_file_of_the_set_in_a_new_folder(tmp_path, phantom, monkeypatch):
    """The .seg.nrrd (or label map + sidecar) is complete when the preview fails: none of them may appear, nor the
    folder made for them."""
    image, masks = phantom

    def broken_save(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(writers.Image.Image, "save", broken_save)
    for name in ("case.seg.nrrd", "case.nii.gz"):
        with pytest.raises(SSAMError, match="cannot write .*case.png.*No space left"):
            write_outputs(tmp_path / "new" / name, image, masks, preview_path=tmp_path / "new" / "case.png")
        assert list(tmp_path.iterdir()) == []


def test_a_failing_rename_puts_back_the_files_it_replaced(tmp_path, phantom, monkeypatch):
    """With overwrite, the set replaces earlier files; if one rename fails, the earlier ones are restored."""
    import os

    from SSAMSegmentLib.files import atomic_file

    image, masks = phantom
    write_outputs(tmp_path / "case.nii.gz", image, masks, preview_path=tmp_path / "case.png")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    real_replace = os.replace

    def replace_failing_for_the_preview(source, target):
        if str(target).endswith("case.png") and ".part" in str(source):
            raise OSError(28, "No space left on device")
        return real_replace(source, target)

    monkeypatch.setattr(atomic_file.os, "replace", replace_failing_for_the_preview)
    smaller = OrderedDict(liver=masks["liver"])
    with pytest.raises(SSAMError, match="cannot write .*case.png"):
        write_outputs(tmp_path / "case.nii.gz", image, smaller, preview_path=tmp_path / "case.png")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


@pytest.mark.data
def test_real_ct_with_its_manual_liver(tmp_path, data_dir):
    folder = data_dir / "dcmqi-ct-3slice"
    image = read_image(folder)  # the DICOM series
    liver = sitk.ReadImage(str(folder / "liver_seg.nrrd"))
    liver_mask = sitk.Cast(liver > 0, sitk.sitkUInt8)
    liver_mask.CopyInformation(image)  # same grid to 1e-4 (checked by write_outputs), exact copy for the test
    masks = OrderedDict(Liver=liver_mask)
    written = write_outputs(tmp_path / "ct.seg.nrrd", image, masks, preview_path=tmp_path / "ct.png")
    read, colors = read_seg_nrrd(written[0])
    assert int(sitk.GetArrayViewFromImage(read["Liver"]).sum()) == int(sitk.GetArrayViewFromImage(liver_mask).sum())
    assert read["Liver"].GetOrigin() == image.GetOrigin() and read["Liver"].GetSpacing() == image.GetSpacing()
    picture = np.asarray(Image.open(written[1]).convert("RGB"))
    assert picture.shape[1] == 3 * writers.PREVIEW_TILE_SIZE + 16  # the three slices side by side
    rgb = np.round(np.array(colors["Liver"]) * 255).astype(np.uint8)
    assert np.all(picture == rgb, axis=-1).sum() > 300
