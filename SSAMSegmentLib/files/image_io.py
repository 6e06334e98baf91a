"""Reading images: NIfTI, NRRD, MHA, a DICOM series folder, 2D PNG/JPEG/TIFF/BMP (RGB included), with geometry.

Everything comes back as a SimpleITK image of dimension 2 or 3, scalar or 3-component RGB, or a one-line SSAMError.
"""

import gzip
import os
import struct
import zlib
from pathlib import Path
from typing import Optional

import numpy as np
import SimpleITK as sitk

from ..errors import SSAMError, note

IMAGE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd", ".png", ".jpg", ".jpeg", ".tif", ".tiff",
                  ".bmp", ".dcm")


def has_image_suffix(path) -> bool:
    name = Path(path).name.lower()
    return any(name.endswith(suffix) for suffix in IMAGE_SUFFIXES) and not name.endswith(".seg.nrrd")


def strip_image_suffix(name: str) -> str:
    """'case_01.nii.gz' -> 'case_01' (the longest known suffix is removed)."""
    lower = name.lower()
    for suffix in sorted(IMAGE_SUFFIXES + (".seg.nrrd",), key=len, reverse=True):
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def _nifti_header(path: Path, stream=None) -> Optional[dict]:
    """dims, bitpix, vox_offset and pixdim of a NIfTI-1/2 header (.nii or .nii.gz), or None for another header."""
    if stream is None:
        opener = gzip.open if path.name.lower().endswith(".gz") else open
        try:
            with opener(path, "rb") as handle:
                return _nifti_header(path, handle)
        except (EOFError, OSError, zlib.error, struct.error):
            return None
    header = stream.read(540)
    for order in "<>":
        if struct.unpack(order + "i", header[:4])[0] == 348:  # NIfTI-1
            return {"dims": struct.unpack(order + "8h", header[40:56]), "bitpix": struct.unpack(order + "h", header[72:74])[0],
                    "offset": int(struct.unpack(order + "f", header[108:112])[0]),
                    "pixdim": struct.unpack(order + "8f", header[76:108]), "length": len(header)}
        if struct.unpack(order + "i", header[:4])[0] == 540:  # NIfTI-2
            return {"dims": struct.unpack(order + "8q", header[16:80]), "bitpix": struct.unpack(order + "h", header[14:16])[0],
                    "offset": struct.unpack(order + "q", header[168:176])[0],
                    "pixdim": struct.unpack(order + "8d", header[104:168]), "length": len(header)}
    return None


def _nifti_is_truncated(path: Path) -> bool:
    """ITK reads a truncated NIfTI (.nii or .nii.gz) without an error, zero-filling the missing voxels: compare the
    voxel bytes the header announces with those present (a .nii.gz is decompressed, and nothing is kept)."""
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as stream:
            header = _nifti_header(path, stream)
            if header is None:
                return False  # not a header we know: leave the verdict to ITK
            dims = header["dims"]
            if not 1 <= dims[0] <= 7:
                return False
            expected = header["offset"] + int(np.prod(dims[1:dims[0] + 1], dtype=np.int64)) * header["bitpix"] // 8
            if opener is open:
                return path.stat().st_size < expected
            remaining = expected - header["length"]
            while remaining > 0:
                chunk = stream.read(min(remaining, 1 << 24))
                if not chunk:
                    return True
                remaining -= len(chunk)
            return False
    except (EOFError, OSError, zlib.error, struct.error):
        return True


def _jpeg_is_truncated(path: Path) -> bool:
    """libjpeg only warns ("Premature end of JPEG file") and ITK returns grey: a whole JPEG ends with its EOI marker
    (FF D9), give or take a short trailer."""
    with open(path, "rb") as stream:
        stream.seek(max(path.stat().st_size - 1024, 0))
        return b"\xff\xd9" not in stream.read()


def is_truncated(path) -> bool:
    """True for a NIfTI or JPEG file that ends before its last voxel (ITK would read it silently, zero-filled)."""
    path = Path(path)
    name = path.name.lower()
    if name.endswith((".nii", ".nii.gz")):
        return _nifti_is_truncated(path)
    if name.endswith((".jpg", ".jpeg")):
        return _jpeg_is_truncated(path)
    return False  # NRRD, MHA, PNG, TIFF: ITK's readers fail on a short file


def _dicom_header(path: str) -> sitk.ImageFileReader:
    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    reader.ReadImageInformation()
    return reader


def _numbers(reader: sitk.ImageFileReader, tag: str):
    try:
        return [float(v) for v in reader.GetMetaData(tag).split("\\")] if reader.HasMetaDataKey(tag) else None
    except ValueError:
        return None


def _choose_series(folder: Path, series: Optional[str]):
    """The file names of the series to read: the one asked for, or the only one, or (said in a note) the largest."""
    reader = sitk.ImageSeriesReader()
    uids = reader.GetGDCMSeriesIDs(str(folder))
    if not uids:
        raise SSAMError(f"{folder} is a folder without a DICOM series; give an image file or a DICOM series folder")
    files = {uid: reader.GetGDCMSeriesFileNames(str(folder), uid) for uid in uids}
    if series is not None:
        if series not in files:
            raise SSAMError(f"{folder} has no DICOM series {series}; it has {', '.join(uids)}")
        return series, files[series], files
    if len(uids) == 1:
        return uids[0], files[uids[0]], files
    chosen = max(uids, key=lambda uid: len(files[uid]))  # the usual main acquisition
    others = ", ".join(f"{uid} ({len(files[uid])} files)" for uid in uids if uid != chosen)
    note(f"{folder} holds {len(uids)} DICOM series; using {chosen} ({len(files[chosen])} files), the largest; "
         f"choose another with --series UID ({others})")
    return chosen, files[chosen], files


def _slice_positions(names) -> Optional[np.ndarray]:
    """Each file's position along the slice normal (mm), or None when a header lacks position or orientation."""
    positions = []
    for name in names:
        header = _dicom_header(name)
        position, orientation = _numbers(header, "0020|0032"), _numbers(header, "0020|0037")
        if not position or not orientation or len(position) != 3 or len(orientation) != 6:
            return None
        normal = np.cross(orientation[:3], orientation[3:])
        positions.append(float(np.dot(position, normal)))
    return np.array(positions)


def dicom_series_files(folder, series: Optional[str] = None) -> list:
    """The files of the DICOM series a folder is read as, in slice order (GDCM's sort by position along the slice
    normal): file k is slice k of the image. A folder with several series: `series`, else the one with the most
    slices, the usual main acquisition (said in a note)."""
    return list(_choose_series(Path(folder), series)[1])


def _read_dicom_series(folder: Path, allow_gaps: bool = False, series: Optional[str] = None, files=None) -> sitk.Image:
    """A DICOM series folder -> one volume. Missing or unreadable slices are found from the slice positions (before
    any pixel is read): refused, or with `allow_gaps` kept as empty slices at their true position (the grid keeps
    the real slice spacing). `files`: the series' files already listed by dicom_series_files."""
    if files:
        names = [str(f) for f in files]
        all_series = {"listed": names}
    else:
        _, names, all_series = _choose_series(folder, series)
    positions = _slice_positions(names) if len(names) > 2 else None
    slots = _slice_slots(folder, positions, all_series, allow_gaps) if positions is not None else None
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(names)
    image = reader.Execute()
    if slots is not None:
        image = _with_gaps(image, folder, *slots)
    first = _dicom_header(names[0])
    pixel_spacing = _numbers(first, "0028|0030")
    if not pixel_spacing or len(pixel_spacing) != 2 or min(pixel_spacing) <= 0:
        note(f"{folder}: the DICOM files have no valid pixel spacing; read as 1 mm, so sizes in mm are not real")
    return image


def _slice_slots(folder, positions, all_series, allow_gaps):
    """None for an evenly spaced series; else (slot of each file, slice step) or a refusal naming the gap."""
    order = np.argsort(positions)
    ascending = np.array_equal(order, np.arange(len(positions)))
    if not ascending and not np.array_equal(order, np.arange(len(positions))[::-1]):
        return None  # GDCM sorted by something other than position (e.g. a time series): leave its order
    steps = np.abs(np.diff(positions))
    if np.any(steps < 1e-3):
        raise SSAMError(f"{folder}: two files of the DICOM series are at the same slice position; keep one copy "
                        f"of each slice (or one acquisition per folder)")
    step = float(steps.min())
    if steps.max() <= 1.5 * step:
        return None
    missing = int(np.sum(np.round(steps / step) - 1))
    where = int(np.argmax(steps))
    loose = sum(1 for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")) - sum(
        len(names) for names in all_series.values())
    unreadable = f"; {loose} file(s) in the folder are not readable DICOM" if loose > 0 else ""
    if not allow_gaps:
        raise SSAMError(f"DICOM series in {folder} has a gap: about {missing} slice(s) missing (the largest gap "
                        f"{steps[where]:.1f} mm after slice {where + 1}, where slices are {step:.1f} mm apart"
                        f"{unreadable}); restore the missing files, or add --allow-gaps to keep the gap empty")
    return np.round(np.abs(positions - positions[0]) / step).astype(int), step


def _with_gaps(image: sitk.Image, folder: Path, slots: np.ndarray, step: float) -> sitk.Image:
    """The series' slices at their slots of an evenly spaced grid; the missing ones filled with the lowest value
    (a constant slice, which segmentation leaves empty)."""
    array = sitk.GetArrayFromImage(image)
    filled = np.full((int(slots[-1]) + 1,) + array.shape[1:], array.min(), dtype=array.dtype)
    filled[slots] = array
    placed = sitk.GetImageFromArray(filled, isVector=image.GetNumberOfComponentsPerPixel() > 1)
    placed.SetOrigin(image.GetOrigin())
    placed.SetDirection(image.GetDirection())
    placed.SetSpacing(image.GetSpacing()[:2] + (step,))
    note(f"DICOM series in {folder}: {len(filled) - len(array)} missing slice(s) left empty at their true "
         f"position (--allow-gaps); slices {step:.2f} mm apart")
    return placed


def _nifti_spacing_note(path: Path, image: sitk.Image) -> None:
    """ITK reads a NIfTI voxel size of 0 or NaN as 1 mm without a word: say it."""
    header = _nifti_header(path)
    if header is None:
        return
    pixdim = header["pixdim"][1:1 + min(header["dims"][0], image.GetDimension())]
    bad = [axis for axis, value in zip("xyz", pixdim) if not (np.isfinite(value) and value > 0)]
    if bad:
        note(f"{path} has no valid voxel size along {', '.join(bad)} in its header ({', '.join(f'{v:g}' for v in pixdim)}); "
             f"read as 1 mm there, so sizes in mm are not real")


def read_image(path, allow_gaps: bool = False, series: Optional[str] = None, dicom_files=None) -> sitk.Image:
    """Read and check one image; raise SSAMError naming the problem and the fix. A DICOM folder with missing slices
    is refused unless `allow_gaps`; `series` picks one series (UID) of a folder holding several. `dicom_files`: for a
    DICOM series folder, its files as `dicom_series_files` listed them already (the folder is not scanned again)."""
    if path is None or not isinstance(path, (str, os.PathLike)) or not str(path).strip():
        raise SSAMError(f"input {path!r} is not a file path; give an image file or a DICOM series folder")
    path = Path(path).expanduser()
    if not path.exists():
        raise SSAMError(f"input {path} does not exist; check the path")
    try:
        image = _read_dicom_series(path, allow_gaps, series, dicom_files) if path.is_dir() else sitk.ReadImage(str(path))
    except SSAMError:
        raise
    except RuntimeError as error:
        first = str(error).strip().splitlines()[-1] if str(error).strip() else "unknown reason"
        raise SSAMError(
            f"cannot read {path}: not an image SimpleITK can open ({first[:120]}); "
            f"use NIfTI, NRRD, MHA, DICOM, PNG, JPEG, TIFF or BMP"
        ) from None
    if path.is_file() and is_truncated(path):
        raise SSAMError(f"{path} is truncated (the file ends before its last voxel); copy or export it again")
    image = check_image(image, str(path))
    if path.is_file() and path.name.lower().endswith((".nii", ".nii.gz")):
        _nifti_spacing_note(path, image)
    return image


def check_image(image: sitk.Image, name: str = "image") -> sitk.Image:
    """Accept 2D/3D scalar or RGB(A) images; squeeze a 3D image of one slice stored as 4D; refuse the rest."""
    if not isinstance(image, sitk.Image):
        raise SSAMError(f"{name} is {type(image).__name__}, not an image; give a SimpleITK image or a numpy array")
    dimension = image.GetDimension()
    if dimension == 4 and image.GetSize()[3] == 1:
        image = sitk.Extract(image, list(image.GetSize()[:3]) + [0], [0, 0, 0, 0])
        dimension = 3
    if dimension not in (2, 3):
        raise SSAMError(
            f"{name} is {dimension}D with size {image.GetSize()}; give a 2D or 3D image "
            f"(extract one time point or channel from a 4D series first)"
        )
    if 0 in image.GetSize() or image.GetNumberOfPixels() == 0:
        raise SSAMError(f"{name} is empty (size {image.GetSize()}); give an image with voxels")
    components = image.GetNumberOfComponentsPerPixel()
    if components == 4:  # RGBA: the alpha channel carries no anatomy
        image = sitk.Compose([sitk.VectorIndexSelectionCast(image, i) for i in range(3)])
    elif components == 2 or components > 4:
        raise SSAMError(
            f"{name} has {components} components per pixel; give a scalar (grey) or RGB image"
        )
    elif components == 1 and image.GetPixelID() >= sitk.sitkVectorUInt8:
        image = sitk.VectorIndexSelectionCast(image, 0)
    return image


def is_rgb(image: sitk.Image) -> bool:
    return image.GetNumberOfComponentsPerPixel() == 3


# An image's kind as training records it per label (training/datasets.py, in the adapter's "image_kinds") and
# segmenting compares it (model/labels.py other_kind): a CT or MR volume, a grey picture (X-ray, fluorescence), a
# colour one (endoscopy, histology). Singular and plural, as the messages say them.
IMAGE_KINDS = {"3D": ("a 3D volume", "3D volumes"), "2D": ("a 2D grey image", "2D grey images"),
               "2D RGB": ("a 2D colour image", "2D colour images"),
               "3D RGB": ("a 3D colour volume", "3D colour volumes")}


def kinds_in_words(kinds, one: bool = False) -> str:
    """"2D grey images and 2D colour images" for ["2D", "2D RGB"]; one=True: "a 2D grey image" (for one kind)."""
    return " and ".join(IMAGE_KINDS.get(kind, (kind, kind))[0 if one else 1] for kind in kinds)


def image_kind(image: sitk.Image) -> str:
    """"3D", "2D", "2D RGB" or "3D RGB" (a 3D image of one slice is 3D, as its reader gives it)."""
    return f"{image.GetDimension()}D" + (" RGB" if is_rgb(image) else "")


def image_from_array(array, spacing=None, origin=None, direction=None, rgb=None) -> sitk.Image:
    """A numpy array in SimpleITK order ((z,) y, x[, 3]) plus its geometry -> checked SimpleITK image."""
    if array is None or isinstance(array, (str, bytes)) or not hasattr(array, "__len__"):
        raise SSAMError(f"the image is {type(array).__name__}, not an image; give a SimpleITK image or a numpy array")
    array = np.asarray(array)
    if array.dtype.kind not in "buif" or not 2 <= array.ndim <= 4:
        raise SSAMError(f"the image array has dtype {array.dtype} and {array.ndim} dimension(s); give a 2D or 3D "
                        f"numeric array ((z,) y, x[, 3])")
    if rgb is None:
        rgb = array.ndim in (3, 4) and array.shape[-1] == 3 and array.dtype == np.uint8
    image = sitk.GetImageFromArray(array, isVector=bool(rgb))
    if spacing is not None:
        image.SetSpacing([float(v) for v in spacing])
    if origin is not None:
        image.SetOrigin([float(v) for v in origin])
    if direction is not None:
        image.SetDirection([float(v) for v in np.asarray(direction).reshape(-1)])
    return check_image(image, "array")


def same_geometry(a: sitk.Image, b: sitk.Image, tolerance: float = 1e-4) -> bool:
    """Same size, spacing, origin and direction (to a small tolerance)."""
    if a.GetDimension() != b.GetDimension() or a.GetSize() != b.GetSize():
        return False
    return all(
        np.allclose(x, y, atol=tolerance, rtol=tolerance)
        for x, y in ((a.GetSpacing(), b.GetSpacing()), (a.GetOrigin(), b.GetOrigin()), (a.GetDirection(), b.GetDirection()))
    )
