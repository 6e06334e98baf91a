"""Reading images: NIfTI, NRRD, MHA, a DICOM series folder, 2D PNG/JPEG/TIFF/BMP (RGB included), with geometry.

Everything comes back as a SimpleITK image of dimension 2 or 3, scalar or 3-component RGB, or a one-line SSAMError.
"""

import gzip
import struct
import zlib
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..errors import SSAMError

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


def _nifti_is_truncated(path: Path) -> bool:
    """ITK reads a truncated NIfTI (.nii or .nii.gz) without an error, zero-filling the missing voxels: compare the
    voxel bytes the header announces with those present (a .nii.gz is decompressed, and nothing is kept)."""
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as stream:
            header = stream.read(540)
            for order in "<>":
                if struct.unpack(order + "i", header[:4])[0] == 348:  # NIfTI-1
                    dims = struct.unpack(order + "8h", header[40:56])
                    bitpix = struct.unpack(order + "h", header[72:74])[0]
                    offset = int(struct.unpack(order + "f", header[108:112])[0])
                    break
                if struct.unpack(order + "i", header[:4])[0] == 540:  # NIfTI-2
                    dims = struct.unpack(order + "8q", header[16:80])
                    bitpix = struct.unpack(order + "h", header[14:16])[0]
                    offset = struct.unpack(order + "q", header[168:176])[0]
                    break
            else:
                return False  # not a header we know: leave the verdict to ITK
            if not 1 <= dims[0] <= 7:
                return False
            expected = offset + int(np.prod(dims[1:dims[0] + 1], dtype=np.int64)) * bitpix // 8
            if opener is open:
                return path.stat().st_size < expected
            remaining = expected - len(header)
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


def dicom_series_files(folder) -> list:
    """The files of the DICOM series a folder is read as, in slice order (GDCM's sort by position along the slice
    normal): file k is slice k of the image. A folder with several series: the one with the most slices, the usual
    main acquisition."""
    reader = sitk.ImageSeriesReader()
    series = reader.GetGDCMSeriesIDs(str(folder))
    if not series:
        raise SSAMError(f"{folder} is a folder without a DICOM series; give an image file or a DICOM series folder")
    return list(max((reader.GetGDCMSeriesFileNames(str(folder), sid) for sid in series), key=len))


def _read_dicom_series(folder: Path, files=None) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(f) for f in files] if files else dicom_series_files(folder))
    return reader.Execute()


def read_image(path, dicom_files=None) -> sitk.Image:
    """Read and check one image; raise SSAMError naming the problem and the fix. `dicom_files`: for a DICOM series
    folder, its files as `dicom_series_files` listed them already (the folder is then not scanned a second time)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise SSAMError(f"input {path} does not exist; check the path")
    try:
        image = _read_dicom_series(path, dicom_files) if path.is_dir() else sitk.ReadImage(str(path))
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
    return check_image(image, str(path))


def check_image(image: sitk.Image, name: str = "image") -> sitk.Image:
    """Accept 2D/3D scalar or RGB(A) images; squeeze a 3D image of one slice stored as 4D; refuse the rest."""
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


def image_from_array(array, spacing=None, origin=None, direction=None, rgb=None) -> sitk.Image:
    """A numpy array in SimpleITK order ((z,) y, x[, 3]) plus its geometry -> checked SimpleITK image."""
    array = np.asarray(array)
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
