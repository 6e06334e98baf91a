"""Reading every supported input kind, refusing the rest with one line; choosing the intensity mapping."""

import numpy as np
import pytest
import SimpleITK as sitk

from SSAMSegmentLib import SSAMError
from SSAMSegmentLib.files.image_io import is_rgb, read_image
from SSAMSegmentLib.inference.intensity import CT_WINDOW, choose_mapping, has_signal


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".tif", ".bmp"])
def test_2d_rgb_pictures(tmp_path, suffix):
    rgb = np.zeros((40, 60, 3), np.uint8)
    rgb[10:30, 20:50] = (200, 80, 40)
    path = tmp_path / f"picture{suffix}"
    sitk.WriteImage(sitk.GetImageFromArray(rgb, isVector=True), str(path))
    image = read_image(path)
    assert image.GetDimension() == 2 and image.GetSize() == (60, 40) and is_rgb(image)
    assert choose_mapping(image).kind == "rgb"


def test_grey_and_rgba_pictures(tmp_path):
    grey = (np.arange(50 * 30) % 256).astype(np.uint8).reshape(30, 50)
    sitk.WriteImage(sitk.GetImageFromArray(grey), str(tmp_path / "grey.png"))
    image = read_image(tmp_path / "grey.png")
    assert not is_rgb(image) and choose_mapping(image).kind == "uint8"
    rgba = np.dstack([np.full((8, 9, 3), 100, np.uint8), np.full((8, 9), 255, np.uint8)])
    sitk.WriteImage(sitk.GetImageFromArray(rgba, isVector=True), str(tmp_path / "rgba.png"))
    assert read_image(tmp_path / "rgba.png").GetNumberOfComponentsPerPixel() == 3


@pytest.mark.data
def test_real_files(data_dir):
    dicom = read_image(data_dir / "dcmqi-ct-3slice")
    assert dicom.GetSize() == (512, 512, 3)
    mapping = choose_mapping(dicom)
    assert mapping.kind == "ct" and (mapping.low + mapping.high) / 2 == CT_WINDOW[0]
    assert read_image(data_dir / "totalsegmentator-ct" / "example_ct_dicom").GetSize() == (512, 512, 20)
    endoscopy = read_image(next((data_dir / "kvasir-seg-5" / "images").glob("*.jpg")))
    assert is_rgb(endoscopy)
    nuclei = read_image(data_dir / "stardist-nuclei" / "img2d.tif")  # 16-bit microscopy: percentiles
    assert choose_mapping(nuclei).kind == "percentile"
    mr = read_image(data_dir / "totalsegmentator-ct" / "example_mr_sm.nii.gz")
    assert choose_mapping(mr).kind == "percentile"
    ct = read_image(data_dir / "totalsegmentator-ct" / "example_ct_sm.nii.gz")  # NIfTI has no modality: HU values
    assert choose_mapping(ct).kind == "ct"


def test_intensity_mapping_choices():
    ct = sitk.GetImageFromArray(np.array([[[-1000, 0], [50, 1200]]], np.int16))
    assert choose_mapping(ct).kind == "ct"
    slice_rgb = choose_mapping(ct).apply(np.array([[-1000, 40], [240, 1200]], np.int16))
    assert slice_rgb.shape == (2, 2, 3) and slice_rgb[0, 0, 0] == 0 and slice_rgb[1, 1, 0] == 255
    assert slice_rgb[0, 1, 0] == pytest.approx(127.5)
    mr = sitk.GetImageFromArray(np.random.default_rng(0).gamma(2, 100, (4, 20, 20)).astype(np.float32))
    mapping = choose_mapping(mr)
    assert mapping.kind == "percentile" and 0 < mapping.low < mapping.high
    assert choose_mapping(mr, window=(40, 400)).describe() == "CT window level 40 width 400"
    assert choose_mapping(ct, mode="percentile").kind == "percentile"
    with pytest.raises(SSAMError, match="unknown intensity mode"):
        choose_mapping(ct, mode="zscore")
    with pytest.raises(SSAMError, match="width must be positive"):
        choose_mapping(ct, window=(40, 0))
    assert not has_signal(np.full((5, 5), 7)) and has_signal(np.eye(5))


def test_refused_inputs(tmp_path):
    four_d = sitk.JoinSeries([sitk.Image([4, 4, 3], sitk.sitkFloat32)] * 2)
    sitk.WriteImage(four_d, str(tmp_path / "4d.nii.gz"))
    with pytest.raises(SSAMError, match="4D.*extract one time point"):
        read_image(tmp_path / "4d.nii.gz")
    one_time_point = sitk.JoinSeries([sitk.Image([4, 4, 3], sitk.sitkFloat32)])
    sitk.WriteImage(one_time_point, str(tmp_path / "4d1.nii.gz"))
    assert read_image(tmp_path / "4d1.nii.gz").GetDimension() == 3
    two = sitk.Compose([sitk.Image([4, 4], sitk.sitkUInt8)] * 2)
    sitk.WriteImage(two, str(tmp_path / "two.nrrd"))
    with pytest.raises(SSAMError, match="2 components"):
        read_image(tmp_path / "two.nrrd")
    volume = sitk.Image([32, 32, 16], sitk.sitkInt16)
    sitk.WriteImage(volume, str(tmp_path / "whole.nii.gz"))
    data = (tmp_path / "whole.nii.gz").read_bytes()
    (tmp_path / "cut.nii.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(SSAMError, match="truncated|cannot read"):
        read_image(tmp_path / "cut.nii.gz")
    (tmp_path / "folder").mkdir()
    with pytest.raises(SSAMError, match="without a DICOM series"):
        read_image(tmp_path / "folder")
    with pytest.raises(SSAMError, match="does not exist"):
        read_image(tmp_path / "missing.nrrd")


def _dicom_copy(source, folder, drop=(), damage=()):
    """A copy of a real DICOM series folder without the files numbered in `drop` and with those in `damage`
    overwritten by garbage (an unreadable slice)."""
    import shutil

    folder.mkdir()
    names = sorted(p.name for p in source.iterdir() if p.is_file())
    for index, name in enumerate(names):
        if index in drop:
            continue
        if index in damage:
            (folder / name).write_bytes(b"\0" * 512)
        else:
            shutil.copy(source / name, folder / name)
    return names


@pytest.mark.data
def test_dicom_series_with_a_missing_slice_is_refused_or_kept_at_its_true_position(data_dir, tmp_path):
    import warnings

    source = data_dir / "totalsegmentator-ct" / "example_ct_dicom"
    full = read_image(source)
    gap = tmp_path / "gap"
    _dicom_copy(source, gap, damage=(7,))  # the 8th of the 20 files by name (a slice inside the series) is garbage
    with pytest.raises(SSAMError, match=r"has a gap: about 1 slice\(s\) missing.*1 file\(s\) in the folder are not "
                                        r"readable DICOM.*--allow-gaps"):
        read_image(gap)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        kept = read_image(gap, allow_gaps=True)
    assert any("missing slice(s) left empty at their true position" in str(w.message) for w in seen)
    # Same grid as the complete series: real spacing (2 mm, not 2.1 averaged), origin and direction.
    assert kept.GetSize() == full.GetSize()
    assert np.allclose(kept.GetSpacing(), full.GetSpacing()) and np.allclose(kept.GetOrigin(), full.GetOrigin())
    assert np.allclose(kept.GetDirection(), full.GetDirection())
    a, b = sitk.GetArrayViewFromImage(full), sitk.GetArrayViewFromImage(kept)
    differs = [z for z in range(a.shape[0]) if not np.array_equal(a[z], b[z])]
    assert len(differs) == 1  # every slice present sits where it belongs; the one missing slice is constant
    assert np.ptp(b[differs[0]]) == 0 and not has_signal(b[differs[0]])


@pytest.mark.data
def test_dicom_series_with_a_removed_slice_names_the_gap(data_dir, tmp_path):
    """A removed file (not a damaged one) at the 11th slice position: the gap is named, no unreadable file is."""
    source = data_dir / "totalsegmentator-ct" / "example_ct_dicom"
    positions = {}
    for path in source.iterdir():
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        reader.ReadImageInformation()
        positions[path.name] = float(reader.GetMetaData("0020|0032").split("\\")[2])
    middle = sorted(positions, key=positions.get)[10]
    names = sorted(positions)
    _dicom_copy(source, tmp_path / "gap", drop=(names.index(middle),))
    with pytest.raises(SSAMError, match=r"has a gap: about 1 slice\(s\) missing \(the largest gap 4.0 mm after slice "
                                        r"10, where slices are 2.0 mm apart\); restore"):
        read_image(tmp_path / "gap")
