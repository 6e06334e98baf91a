"""DICOM Segmentation objects (SEG), written and read with highdicom: results a PACS accepts.

Writing (`write_dicom_seg`): one BINARY SEG per result that references its source series (`dicom_series.py`):
same Study, Frame of Reference, and for every frame the source instance it segments (SOP Instance UID, frame
geometry copied from that instance: same position, orientation and pixel spacing). One segment per label, in label
order, named by the label (Segment Label), coded by `segment_codes.py` (SNOMED CT, or the documented Tissue
fallback), coloured as in the .seg.nrrd (`seg_nrrd.segment_colors`), with algorithm type AUTOMATIC and the
algorithm identification (SSAM Segment, its version, the adapter's name and SHA256).

Empty labels: a SEG stores only frames with foreground (highdicom's default, and what keeps a SEG small), so an
empty label is a segment that is described but has no frame, which the standard allows. It is kept rather than
dropped because "this label is absent" is an answer: its Segment Description says "empty", the Content Description
lists the empty labels, and `write_dicom_seg` returns them. When every label is empty, all frames are written
(highdicom needs at least one frame), each blank.

Reading (`read_dicom_seg`): SEG -> mask set (label name -> uint8 0/1 image). On a given grid (the source image):
frames go to the slices of the instances they reference, or, for a SEG whose frames do not reference those
instances, by position (highdicom `Volume.match_geometry`: no resampling, the frames must lie on the grid). Without
a grid: on the SEG's own grid, the span of its frames.
"""

import warnings
from collections import OrderedDict
from pathlib import Path
from typing import List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from .. import __version__
from ..errors import SSAMError
from .atomic_file import atomic_output
from .dicom_series import DicomSeries, pydicom_module
from .seg_nrrd import check_masks, mask_array, segment_colors
from .segment_codes import segment_code

SEGMENTATION_SOP_CLASSES = ("1.2.840.10008.5.1.4.1.1.66.4",  # Segmentation Storage (BINARY, FRACTIONAL)
                            "1.2.840.10008.5.1.4.1.1.66.7")  # Label Map Segmentation Storage
ALGORITHM_NAME = "SSAM Segment"
EMPTY_SEGMENT_DESCRIPTION = "empty: no voxel of this label was found"
_SERIES_NUMBER = 1000  # above the scanner's own series numbers, so the SEG sorts after its image in a viewer


class Algorithm(NamedTuple):
    """What made the segmentation, recorded in each segment's Segmentation Algorithm Identification."""
    adapter: str  # the adapter's file name, or "none"
    adapter_sha256: str  # its SHA256, or "none"
    base: str = "unknown"
    version: str = __version__


def highdicom_module():
    """highdicom, or a one-line SSAMError saying how to get it (asked before any work by `dicom_source_for`)."""
    try:
        import highdicom
    except ImportError:
        raise SSAMError("DICOM SEG needs the highdicom package (Python 3.10 or newer): pip install highdicom, or "
                        "write .seg.nrrd instead") from None
    return highdicom


def algorithm_of(model) -> Algorithm:
    """The algorithm identification of a loaded model (its adapter file hashed now)."""
    from ..model.weights import file_sha256

    path = getattr(model, "adapter_path", None)
    spec = getattr(model, "spec", None)
    base = getattr(spec, "id", "unknown")
    if path is None:
        return Algorithm("none", "none", base)
    return Algorithm(Path(path).name, file_sha256(path), base)


def _lo(text: str, length: int = 64) -> str:
    """A DICOM LO value: at most 64 characters (the SEG is written in UTF-8, ISO_IR 192), no backslash (DICOM's
    value separator: "a\\b" would read back as two values)."""
    text = text.replace("\\", "/")
    return text if len(text) <= length else text[: length - 3] + "..."


def _segment_descriptions(names: Sequence[str], empty: Sequence[str], algorithm: Algorithm):
    hd = highdicom_module()
    from pydicom.sr.codedict import codes

    identification = hd.AlgorithmIdentificationSequence(
        name=ALGORITHM_NAME, family=codes.DCM.ArtificialIntelligence, version=algorithm.version,
        parameters={"adapter": algorithm.adapter, "adapter_sha256": algorithm.adapter_sha256, "base": algorithm.base})
    colors = segment_colors(names)
    descriptions = []
    for number, name in enumerate(names, start=1):
        code = segment_code(name)
        description = hd.seg.SegmentDescription(
            segment_number=number, segment_label=_lo(name), segmented_property_category=code.category,
            segmented_property_type=code.type, algorithm_type="AUTOMATIC", algorithm_identification=identification,
            display_color=hd.color.CIELabColor.from_rgb(*(round(c * 255) for c in colors[name])))
        if name in empty:
            description.SegmentDescription = EMPTY_SEGMENT_DESCRIPTION
        descriptions.append(description)
    return descriptions


def _pixel_array(masks, shape) -> Tuple[np.ndarray, List[str]]:
    """highdicom's pixel array for a mask set on `shape` (frames, rows, columns), and the empty labels. Labels that
    do not overlap go into one label map (value = segment number): one volume in memory, where highdicom's stacked
    form (one more axis of labels) is needed only when some voxel is in two labels."""
    names = list(masks)
    labels = np.zeros(shape, np.uint8 if len(names) <= 255 else np.uint16)
    empty = []
    for number, name in enumerate(names, start=1):
        mask = mask_array(masks[name]).reshape(shape).astype(bool, copy=False)
        if not mask.any():
            empty.append(name)
        elif labels[mask].any():
            break  # overlap: stacked form
        labels[mask] = number
    else:
        return labels, empty
    stack = np.zeros(shape + (len(names),), np.uint8)
    for index, name in enumerate(names):
        stack[..., index] = mask_array(masks[name]).reshape(shape)
    return stack, [name for index, name in enumerate(names) if not stack[..., index].any()]


def write_dicom_seg(path, masks, source: DicomSeries, algorithm: Optional[Algorithm] = None) -> Tuple[Path, List[str]]:
    """Write a mask set computed on the image read from `source` as one DICOM SEG; returns (path, empty labels).
    Written atomically: on any error nothing is left at `path`."""
    hd = highdicom_module()

    reference = check_masks(masks)
    source.check_grid(reference)
    names = list(masks)
    if len(names) > 65535:
        raise SSAMError(f"{len(names)} labels do not fit one DICOM SEG; write fewer labels per file")
    pixels, empty = _pixel_array(masks, (len(source.datasets), int(source.datasets[0].Rows),
                                         int(source.datasets[0].Columns)))
    algorithm = algorithm or Algorithm("none", "none")
    found = [name for name in names if name not in empty]
    description = f"{ALGORITHM_NAME} {algorithm.version}" + (f"; empty: {', '.join(empty)}" if empty else "")
    try:
        with warnings.catch_warnings():
            # highdicom warns about the source's own oddities (a one-component patient name): not the user's problem.
            warnings.simplefilter("ignore", UserWarning)
            seg = hd.seg.Segmentation(
                source_images=source.datasets, pixel_array=pixels, segmentation_type="BINARY",
                segment_descriptions=_segment_descriptions(names, empty, algorithm),
                series_instance_uid=hd.UID(), series_number=_SERIES_NUMBER, sop_instance_uid=hd.UID(),
                instance_number=1, manufacturer=ALGORITHM_NAME, manufacturer_model_name=ALGORITHM_NAME,
                software_versions=algorithm.version, device_serial_number="none",
                content_label="SSAM_SEG", content_description=_lo(description),
                series_description=_lo(f"{ALGORITHM_NAME}: {', '.join(found) or 'no label found'}"),
                # highdicom needs one frame at least: with every label empty, all (blank) frames are kept.
                omit_empty_frames=bool(found),
                specific_character_set="ISO_IR 192")  # UTF-8: label names in any language
    except (ValueError, TypeError, AttributeError, KeyError) as error:
        raise SSAMError(f"cannot make a DICOM SEG from {source.files[0].parent}: {str(error).splitlines()[0][:160]}; "
                        f"write .seg.nrrd instead") from None
    with atomic_output(path, ".dcm") as temporary:
        seg.save_as(str(temporary), enforce_file_format=True)
    return Path(path), empty


# ----------------------------------------------------------------------------------------------------- reading
def is_dicom_seg(path) -> bool:
    """True for a DICOM file whose SOP Class is a Segmentation Storage (the header alone is read); False without
    pydicom installed, as nothing could read it."""
    try:
        import pydicom
    except ImportError:
        return False

    path = Path(path)
    if not path.is_file():
        return False
    try:
        header = pydicom.dcmread(str(path), stop_before_pixels=True, specific_tags=["SOPClassUID", "Modality"])
    except Exception:  # not DICOM at all, or damaged: not a SEG either way
        return False
    return str(header.get("SOPClassUID", "")) in SEGMENTATION_SOP_CLASSES


def referenced_instances(path) -> set:
    """The SOP Instance UIDs a SEG references (Referenced Series Sequence), from its header."""
    pydicom = pydicom_module()

    return _references(pydicom.dcmread(str(path), stop_before_pixels=True))


def _references(dataset) -> set:
    return {str(instance.ReferencedSOPInstanceUID)
            for series in dataset.get("ReferencedSeriesSequence", [])
            for instance in series.get("ReferencedInstanceSequence", [])}


def _segread(path: Path):
    hd = highdicom_module()

    if not path.is_file():
        raise SSAMError(f"DICOM SEG {path} does not exist; check the path")
    try:
        seg = hd.seg.segread(str(path))
    except Exception as error:  # pydicom and highdicom raise many kinds for a damaged or foreign file
        reason = str(error).strip().splitlines()[0][:120] if str(error).strip() else type(error).__name__
        raise SSAMError(f"cannot read {path} as a DICOM SEG ({reason}); give a DICOM Segmentation file") from None
    # Pixel data is decoded lazily: a file cut short would fail later with a numpy message, so measure it now.
    if not seg.file_meta.TransferSyntaxUID.is_encapsulated:
        bits = int(seg.Rows) * int(seg.Columns) * int(seg.get("NumberOfFrames", 1)) * int(seg.BitsAllocated)
        if len(seg.get("PixelData", b"") or b"") < (bits + 7) // 8:
            raise SSAMError(f"cannot read {path} as a DICOM SEG (truncated: its pixel data ends before the last "
                            f"frame); copy or export it again")
    return seg


def _names(seg) -> "OrderedDict[int, str]":
    names: "OrderedDict[int, str]" = OrderedDict()
    for number in seg.segment_numbers:
        name = str(seg.get_segment_description(number).SegmentLabel).strip() or f"Segment_{number}"
        unique, count = name, 2
        while unique in names.values():
            unique, count = f"{name} ({count})", count + 1
        names[number] = unique
    return names


def volume_geometry(image: sitk.Image):
    """highdicom's VolumeGeometry of a SimpleITK grid (axes (slice, row, column) = SimpleITK's (z, y, x))."""
    hd = highdicom_module()

    size, spacing = list(image.GetSize()), list(image.GetSpacing())
    direction = np.array(image.GetDirection(), float).reshape(image.GetDimension(), image.GetDimension())
    origin = list(image.GetOrigin())
    if image.GetDimension() == 2:
        size, spacing, origin = size + [1], spacing + [1.0], origin + [0.0]
        square = np.eye(3)
        square[:2, :2] = direction
        direction = square
    affine = np.eye(4)
    for array_axis, itk_axis in enumerate((2, 1, 0)):
        affine[:3, array_axis] = direction[:, itk_axis] * spacing[itk_axis]
    affine[:3, 3] = origin
    return hd.VolumeGeometry(affine, (size[2], size[1], size[0]), "PATIENT")


def _image_of(volume) -> sitk.Image:
    """A SimpleITK grid for a highdicom volume's geometry (its array is not copied)."""
    affine = np.asarray(volume.affine, float)
    spacing = [float(np.linalg.norm(affine[:3, axis])) for axis in (2, 1, 0)]
    direction = np.stack([affine[:3, axis] / s for axis, s in zip((2, 1, 0), spacing)], axis=1)
    slices, rows, columns = volume.spatial_shape
    image = sitk.Image([columns, rows, slices], sitk.sitkUInt8)
    image.SetSpacing(spacing)
    image.SetOrigin([float(v) for v in affine[:3, 3]])
    image.SetDirection([float(v) for v in direction.reshape(-1)])
    return image


def _masks(arrays: np.ndarray, names, grid: sitk.Image) -> "OrderedDict[str, sitk.Image]":
    """(slices, rows, columns, segments) 0/1 -> mask images on `grid`."""
    shape = tuple(reversed(grid.GetSize()))
    masks: "OrderedDict[str, sitk.Image]" = OrderedDict()
    for index, name in enumerate(names):
        mask = sitk.GetImageFromArray(np.ascontiguousarray(arrays[..., index] != 0).view(np.uint8).reshape(shape))
        mask.CopyInformation(grid)
        masks[name] = mask
    return masks


def read_dicom_seg(path, grid: Optional[sitk.Image] = None,
                   source: Optional[DicomSeries] = None) -> "OrderedDict[str, sitk.Image]":
    """Read a DICOM SEG into a mask set (label name -> uint8 0/1 image), in segment order.

    grid: put the masks on this image's grid (e.g. the source image); source: the DicomSeries `grid` was read from,
    so frames go to the slices of the instances they reference. A SEG that does not fit the grid is a one-line
    SSAMError. Without a grid, the masks are on the SEG's own grid (the span of its frames).
    """
    path = Path(path).expanduser()
    seg = _segread(path)
    names = _names(seg)
    numbers = list(names)
    if str(seg.SegmentationType) not in ("BINARY", "FRACTIONAL", "LABELMAP"):
        raise SSAMError(f"{path.name} has segmentation type {seg.SegmentationType}; give a BINARY, FRACTIONAL or "
                        f"LABELMAP SEG")
    # By instance only when the SEG was made on these instances: highdicom would take frames of other instances
    # for "missing", and a SEG of another series would read as empty masks instead of failing.
    references = _references(seg)
    if source is not None and grid is not None and references and references <= set(source.sop_instance_uids):
        try:
            arrays = seg.get_pixels_by_source_instance(
                source.sop_instance_uids, segment_numbers=numbers, assert_missing_frames_are_empty=True,
                skip_overlap_checks=True, rescale_fractional=False)
            arrays = arrays >= _foreground_level(seg)
            return _masks(arrays, names.values(), grid)
        except (ValueError, KeyError, RuntimeError, AttributeError):
            pass  # frames not indexed by these instances: place them by position below
    try:
        volume = seg.get_volume(segment_numbers=numbers, skip_overlap_checks=True, rescale_fractional=False)
    except (ValueError, RuntimeError, AttributeError, KeyError) as error:
        raise SSAMError(f"{path.name}: its frames are not a regular stack of slices "
                        f"({str(error).splitlines()[0][:100]}); give a SEG of a CT/MR-like series") from None
    if grid is None:
        affine = np.asarray(volume.affine, float)
        if np.dot(affine[:3, 0], np.cross(affine[:3, 2], affine[:3, 1])) < 0:
            volume = volume.flip_spatial(0)  # slices along row x column, as SimpleITK reads a DICOM series
        array = np.asarray(volume.array)
        return _masks((array if array.ndim == 4 else array[..., None]) >= _foreground_level(seg),
                      names.values(), _image_of(volume))
    try:
        matched = volume.match_geometry(volume_geometry(grid))
    except (RuntimeError, ValueError) as error:
        raise SSAMError(f"{path.name} does not lie on the image's grid ({str(error).splitlines()[0][:100]}); give "
                        f"the SEG with the series it was made on") from None
    array = np.asarray(matched.array)
    return _masks((array if array.ndim == 4 else array[..., None]) >= _foreground_level(seg), names.values(), grid)


def _foreground_level(seg) -> int:
    """Stored value from which a pixel is inside a segment: 1 for BINARY / LABELMAP, half the maximum for a
    FRACTIONAL SEG (probability or occupancy >= 0.5, the product's own threshold)."""
    if str(seg.SegmentationType) == "FRACTIONAL":
        return max(1, (int(seg.MaximumFractionalValue) + 1) // 2)
    return 1


def empty_segments(path) -> List[str]:
    """Labels of a SEG that have no foreground frame (as `write_dicom_seg` marks them, or simply absent)."""
    seg = _segread(Path(path))
    names = _names(seg)
    with_frames = set()
    for frame in seg.get("PerFrameFunctionalGroupsSequence", []):
        for item in frame.get("SegmentIdentificationSequence", []):
            with_frames.add(int(item.ReferencedSegmentNumber))
    return [name for number, name in names.items() if number not in with_frames
            or str(seg.get_segment_description(number).get("SegmentDescription", "")) == EMPTY_SEGMENT_DESCRIPTION]


# ------------------------------------------------------------------------------------- grids of different spans
def common_grid(a: sitk.Image, b: sitk.Image) -> sitk.Image:
    """The smallest grid on `a`'s lattice (its spacing and direction) that covers both `a` and `b`, e.g. two SEGs
    of one series that store different spans of frames. `b` must lie on that lattice (SSAMError otherwise)."""
    size_b = np.array(b.GetSize())
    corner_indices = np.stack(np.meshgrid(*[(0, n - 1) for n in size_b], indexing="ij"), -1).reshape(-1, len(size_b))
    corners = [b.TransformIndexToPhysicalPoint([int(v) for v in corner]) for corner in corner_indices]
    indices = np.array([a.TransformPhysicalPointToContinuousIndex(c) for c in corners])
    if np.max(np.abs(indices - np.round(indices))) > 1e-3:
        raise SSAMError("the two segmentations are not on one voxel lattice (different spacing or a shifted grid); "
                        "compare segmentations made on the same image")
    low = np.minimum(np.round(indices).min(axis=0), 0).astype(int)
    high = np.maximum(np.round(indices).max(axis=0), np.array(a.GetSize()) - 1).astype(int)
    grid = sitk.Image([int(v) for v in high - low + 1], sitk.sitkUInt8)
    direction = np.array(a.GetDirection()).reshape(a.GetDimension(), a.GetDimension())
    origin = np.array(a.GetOrigin()) + direction @ (np.array(a.GetSpacing()) * low)
    grid.SetSpacing(a.GetSpacing())
    grid.SetDirection(a.GetDirection())
    grid.SetOrigin([float(v) for v in origin])
    return grid


def place_masks(masks, grid: sitk.Image, what: str = "the DICOM SEG") -> "OrderedDict[str, sitk.Image]":
    """A mask set read from a SEG (on its own span of frames) put onto `grid` without resampling (highdicom
    `Volume.match_geometry`: axes permuted, flipped, padded, cropped); an SSAMError when that would cut foreground
    off or the grids do not share a lattice."""
    hd = highdicom_module()

    placed: "OrderedDict[str, sitk.Image]" = OrderedDict()
    target = volume_geometry(grid)
    for name, mask in masks.items():
        array = sitk.GetArrayFromImage(mask)
        volume = hd.Volume(array if array.ndim == 3 else array[None], volume_geometry(mask).affine, "PATIENT")
        try:
            matched = np.asarray(volume.match_geometry(target).array)
        except (RuntimeError, ValueError):
            raise SSAMError(f"{what} does not lie on the other segmentation's grid; compare segmentations made on "
                            f"the same image") from None
        if int(np.count_nonzero(matched)) != int(np.count_nonzero(array)):
            raise SSAMError(f"{what} has voxels of {name!r} outside the other segmentation's grid; compare "
                            f"segmentations made on the same image")
        placed[name] = _masks(matched[..., None], [name], grid)[name]
    return placed
