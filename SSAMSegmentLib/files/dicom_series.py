"""The DICOM instances an image was read from: what a DICOM SEG must reference (Study, Series and SOP Instance
UIDs, Frame of Reference) and which instance each slice of the image is.

`DicomSeries.of_input(path)` takes the same files `image_io.read_image` reads (a series folder via
`image_io.dicom_series_files`, or one DICOM file) and reads only their headers (pydicom, no pixel data), in the
image's slice order. Nothing is ever written to the source files; repairs happen on the in-memory headers:
- a blank SOP Class / SOP Instance UID (some anonymisers blank them) is taken from the file's own meta header
  (Media Storage SOP Class / Instance UID, the same instance's identity);
- a blank Study / Series Instance UID cannot be recovered: one is derived from the instances' SOP Instance UIDs
  (the same series always gets the same UIDs, so its SEGs stay together), and `notes` says so, because a PACS
  will not file such a SEG with the original study.
"""

from pathlib import Path
from typing import List, Sequence

import numpy as np
import SimpleITK as sitk

from ..errors import SSAMError
from .image_io import dicom_series_files

_NOT_DICOM = ("{name} is not DICOM, so a DICOM SEG has no source series to reference; give the DICOM series folder "
              "(or one .dcm file), or write .seg.nrrd or .nii.gz instead")


def pydicom_module():
    """pydicom, or a one-line SSAMError saying how to get it (it comes with highdicom)."""
    try:
        import pydicom
    except ImportError:
        raise SSAMError("reading DICOM headers needs pydicom: pip install highdicom (brings pydicom), or write "
                        ".seg.nrrd instead") from None
    return pydicom


def _read_header(path: Path):
    pydicom = pydicom_module()
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(str(path), stop_before_pixels=True)
    except InvalidDicomError:
        raise SSAMError(_NOT_DICOM.format(name=path.name)) from None
    except (OSError, ValueError, EOFError) as error:
        raise SSAMError(f"cannot read the DICOM header of {path} ({type(error).__name__}); copy or export it "
                        f"again") from None


class DicomSeries:
    """Header datasets of the source instances, `datasets[k]` being slice k of the image read from them."""

    def __init__(self, files: Sequence[Path], datasets: Sequence, notes: Sequence[str] = ()):
        self.files = [Path(f) for f in files]
        self.datasets = list(datasets)
        self.notes = list(notes)

    @classmethod
    def of_input(cls, path) -> "DicomSeries":
        """The source series of an input that `read_image` reads: a DICOM series folder or one DICOM file; an
        SSAMError naming the problem for anything else (a NIfTI, a PNG, a folder without DICOM)."""
        path = Path(path).expanduser()
        if not path.exists():
            raise SSAMError(f"input {path} does not exist; check the path")
        if path.is_dir():
            try:
                files = [Path(f) for f in dicom_series_files(path)]
            except SSAMError:
                raise SSAMError(_NOT_DICOM.format(name=f"{path} (a folder without a DICOM series)")) from None
        else:
            files = [path]
        datasets = [_read_header(f) for f in files]
        notes = _repair_identity(datasets, files)
        frames = int(datasets[0].get("NumberOfFrames", 1) or 1)
        if frames > 1:
            raise SSAMError(f"{files[0].name} is a multi-frame ({frames} frames) DICOM image; DICOM SEG output "
                            f"supports series of single-frame images (CT, MR, ...): write .seg.nrrd instead")
        return cls(files, datasets, notes)

    @property
    def sop_instance_uids(self) -> List[str]:
        return [str(ds.SOPInstanceUID) for ds in self.datasets]

    @property
    def series_instance_uid(self) -> str:
        return str(self.datasets[0].SeriesInstanceUID)

    def check_grid(self, image: sitk.Image) -> None:
        """Fail unless slice k of `image` is instance k: same rows and columns, and (3D) each instance's Image
        Position within half a voxel of slice k's origin (the masks were computed slice by slice)."""
        size = image.GetSize()
        slices = size[2] if image.GetDimension() == 3 else 1
        if slices != len(self.datasets):
            raise SSAMError(f"the image has {slices} slices but its DICOM series {len(self.datasets)} instances; "
                            f"read the image from the same folder")
        for k, ds in enumerate(self.datasets):
            if (int(ds.get("Columns", 0)), int(ds.get("Rows", 0))) != tuple(size[:2]):
                raise SSAMError(f"{self.files[k].name} is {ds.get('Columns')}x{ds.get('Rows')} pixels but the image "
                                f"{size[0]}x{size[1]}; read the image from the same folder")
            position = ds.get("ImagePositionPatient")
            if image.GetDimension() != 3 or position is None:
                continue
            expected = np.array(image.TransformIndexToPhysicalPoint((0, 0, k)))
            tolerance = 0.5 * min(image.GetSpacing())
            if np.max(np.abs(np.array([float(v) for v in position]) - expected)) > tolerance:
                raise SSAMError(f"{self.files[k].name} lies at {[round(float(v), 3) for v in position]} but slice "
                                f"{k} of the image at {np.round(expected, 3).tolist()}; the series is not a regular "
                                f"stack of slices (tilted or unevenly spaced), write .seg.nrrd instead")


def _blank(ds, keyword: str) -> bool:
    return not str(ds.get(keyword, "") or "").strip()


def _repair_identity(datasets, files) -> List[str]:
    from pydicom.uid import generate_uid

    for ds, path in zip(datasets, files):
        meta = getattr(ds, "file_meta", None)
        for keyword, meta_keyword in (("SOPClassUID", "MediaStorageSOPClassUID"),
                                      ("SOPInstanceUID", "MediaStorageSOPInstanceUID")):
            if _blank(ds, keyword):
                value = str(getattr(meta, meta_keyword, "") or "").strip() if meta is not None else ""
                if not value:
                    raise SSAMError(f"{path.name} has no {keyword}; a DICOM SEG must reference each source "
                                    f"instance, export the series again with its UIDs")
                setattr(ds, keyword, value)
    notes = []
    instance_uids = sorted(str(ds.SOPInstanceUID) for ds in datasets)
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID"):
        blank = [ds for ds in datasets if _blank(ds, keyword)]
        if not blank:
            continue
        derived = generate_uid(entropy_srcs=[keyword] + instance_uids)
        for ds in blank:
            setattr(ds, keyword, derived)
        notes.append(f"the source has no {keyword} (anonymised?): the SEG uses {derived}, derived from its "
                     f"instances, so a PACS will not file it with the original study")
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):
        values = {str(ds.get(keyword, "")) for ds in datasets}
        if len(values) > 1:
            raise SSAMError(f"the DICOM files mix {len(values)} different {keyword}s; give one series")
    return notes
