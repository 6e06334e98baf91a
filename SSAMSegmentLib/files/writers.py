"""Writing a segmentation result: a Slicer .seg.nrrd, a NIfTI/NRRD label map with a JSON sidecar, a DICOM SEG
(dicom_seg.py, for an image read from DICOM), a PNG preview.

Masks are `OrderedDict[str, SimpleITK.Image]` (label name -> uint8 0/1, all on the input image's grid). Every file is
written through `atomic_output`: a failed write leaves nothing new behind and never touches an existing file.
"""

import json
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
import SimpleITK as sitk
from PIL import Image, ImageDraw, ImageFont

from .atomic_file import atomic_output, check_writable
from ..errors import SSAMError
from .image_io import same_geometry
from .seg_nrrd import check_masks, mask_array, segment_colors, write_seg_nrrd

LABEL_MAP_SUFFIXES = (".nii.gz", ".nii", ".nrrd")
DICOM_SEG_SUFFIX = ".dcm"
OUTPUT_SUFFIXES = (".seg.nrrd",) + LABEL_MAP_SUFFIXES + (DICOM_SEG_SUFFIX,)
# `ssam segment --format NAME`: the output type by name, for the default output name (the suffix decides the writer)
OUTPUT_FORMATS = {"seg-nrrd": ".seg.nrrd", "nifti": ".nii.gz", "nrrd": ".nrrd", "dicom-seg": DICOM_SEG_SUFFIX}
PREVIEW_TILE_SIZE = 320  # pixels on the longest side of one slice in the preview
_FILL_OPACITY = 0.35


def output_suffix(path) -> Optional[str]:
    """The output format suffix of a path ('.seg.nrrd', '.nii.gz', '.nii', '.nrrd', '.dcm'), or None."""
    name = Path(path).name.lower()
    return next((suffix for suffix in OUTPUT_SUFFIXES if name.endswith(suffix)), None)


def sidecar_path(path) -> Path:
    """The JSON sidecar of a label map: 'case.nii.gz' -> 'case.json'."""
    path = Path(path)
    suffix = output_suffix(path) or "".join(path.suffixes[-1:])
    return path.with_name(path.name[: len(path.name) - len(suffix)] + ".json")


def write_label_map(path, masks) -> Path:
    """One label map (NIfTI .nii/.nii.gz or plain .nrrd) with values 1..N in label order, plus a JSON sidecar
    mapping each value to its label name ({"1": "liver", "2": "spleen"}), empty labels included.

    Voxels are uint8, uint16 beyond 255 labels. Where labels overlap, the later label wins: a label map holds one
    value per voxel (write a .seg.nrrd to keep overlaps). Returns the label map's path.
    """
    path = Path(path)
    suffix = output_suffix(path)
    if suffix not in LABEL_MAP_SUFFIXES:
        raise SSAMError(f"label map {path.name} must end in {', '.join(LABEL_MAP_SUFFIXES)}; "
                        f"use .seg.nrrd for a Slicer segmentation")
    reference = check_masks(masks)
    names = list(masks)
    if len(names) > 65535:
        raise SSAMError(f"{len(names)} labels do not fit a 16-bit label map; write fewer labels per file")
    dtype = np.uint8 if len(names) <= 255 else np.uint16
    labels = np.zeros(tuple(reversed(reference.GetSize())), dtype=dtype)
    for value, name in enumerate(names, start=1):
        labels[mask_array(masks[name]).astype(bool, copy=False)] = value
    label_image = sitk.GetImageFromArray(labels)
    label_image.CopyInformation(reference)
    sidecar = json.dumps({str(value): name for value, name in enumerate(names, start=1)}, indent=2,
                         ensure_ascii=False) + "\n"
    # Both files are renamed into place only after both are written (the label map first, then its sidecar).
    with atomic_output(sidecar_path(path), ".json") as json_temporary, atomic_output(path, suffix) as temporary:
        try:
            sitk.WriteImage(label_image, str(temporary), useCompression=True)
        except RuntimeError as error:
            raise OSError(str(error).strip().splitlines()[-1] if str(error).strip() else "write failed") from None
        json_temporary.write_text(sidecar, encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------------------ preview
def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def _window(slice_array: np.ndarray) -> np.ndarray:
    """A 2D slice -> uint8 (H, W, 3): grey values windowed to their 1st..99th percentile; uint8 RGB as it is."""
    if slice_array.ndim == 3:  # RGB
        if slice_array.dtype == np.uint8:
            return np.ascontiguousarray(slice_array)
        low, high = np.percentile(slice_array, [1, 99])
    else:
        low, high = np.percentile(slice_array, [1, 99])
    scaled = (slice_array.astype(np.float32) - low) * (255.0 / max(float(high - low), 1e-6))
    grey = np.clip(scaled, 0, 255).astype(np.uint8)
    return grey if grey.ndim == 3 else np.repeat(grey[:, :, None], 3, axis=2)


def _outline(mask: np.ndarray) -> np.ndarray:
    """Foreground pixels with a 4-neighbour outside the mask (or on the image border), thickened by one pixel."""
    inner = mask.copy()
    inner[1:, :] &= mask[:-1, :]
    inner[:-1, :] &= mask[1:, :]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    inner[0, :] = inner[-1, :] = False
    inner[:, 0] = inner[:, -1] = False
    edge = mask & ~inner
    thick = edge.copy()
    thick[1:, :] |= edge[:-1, :]
    thick[:, 1:] |= edge[:, :-1]
    return thick


def _choose_slices(foreground: np.ndarray, count: int) -> List[int]:
    """The `count` slices with the most foreground, in slice order; evenly spaced slices when there is none."""
    total = len(foreground)
    count = max(1, min(count, total))
    if not foreground.any():
        return sorted(set(np.linspace(0, total - 1, count + 2)[1:-1].round().astype(int).tolist())) \
            if total > count else list(range(total))
    with_foreground = np.flatnonzero(foreground)
    best = with_foreground[np.argsort(-foreground[with_foreground], kind="stable")[:count]]
    return sorted(int(v) for v in best)


def _display_orientation(direction: np.ndarray, row_axis: int, column_axis: int):
    """How to turn a slice (numpy axes row_axis, column_axis of the image array) so it looks as in a radiology
    viewer: patient's left to the right of the screen (x of LPS), posterior down, superior up; a sagittal slice has
    anterior on the left. Returns (transpose, flip_rows, flip_columns) applied in that order."""
    dimension = direction.shape[0]

    def physical(axis):  # (dominant LPS axis, its sign) of a numpy axis
        column = direction[:, dimension - 1 - axis]
        p = int(np.argmax(np.abs(column)))
        return p, 1.0 if column[p] >= 0 else -1.0

    (row_p, row_sign), (column_p, column_sign) = physical(row_axis), physical(column_axis)
    transpose = row_p < column_p  # columns take the axis nearest to left-right (x, then y), rows the other
    if transpose:
        (row_p, row_sign), (column_p, column_sign) = (column_p, column_sign), (row_p, row_sign)
    wanted = {0: 1.0, 1: 1.0, 2: -1.0}  # increasing towards L, towards P, towards inferior (so superior is up)
    return transpose, row_sign != wanted[row_p], column_sign != wanted[column_p]


def _tile(rgb: np.ndarray, masks: Sequence[np.ndarray], colors, pixel_aspect: float, caption: str, font):
    """One slice as a PIL image: resized to physical proportions, masks filled and outlined, caption on top."""
    height, width = rgb.shape[:2]
    physical_h = height * pixel_aspect
    scale = PREVIEW_TILE_SIZE / max(physical_h, width)
    size = (max(1, round(width * scale)), max(1, round(physical_h * scale)))
    picture = np.asarray(Image.fromarray(rgb).resize(size, Image.BILINEAR), dtype=np.float32)
    for mask, color in zip(masks, colors):
        if not mask.any():
            continue
        shown = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(size, Image.NEAREST)) > 0
        rgb_255 = np.round(np.array(color, dtype=np.float32) * 255)
        picture[shown] = picture[shown] * (1 - _FILL_OPACITY) + rgb_255 * _FILL_OPACITY
        picture[_outline(shown)] = rgb_255
    tile = Image.fromarray(picture.astype(np.uint8))
    draw = ImageDraw.Draw(tile)
    draw.text((4, 3), caption, fill=(255, 255, 0), font=font, stroke_width=2, stroke_fill=(0, 0, 0))
    return tile


def write_preview_png(path, image: sitk.Image, masks, array_axis: int = 0, max_tiles: int = 6) -> Path:
    """A PNG montage: the slices (along numpy axis `array_axis` of the image array) with the most foreground, each
    windowed to its 1st..99th percentile (RGB as is), masks as translucent fills with outlines in their segment
    colours, and a legend. A 2D image is shown whole. With no foreground at all, evenly spaced slices are shown and
    the legend says "no foreground"."""
    reference = check_masks(masks)
    if not same_geometry(image, reference):
        raise SSAMError(f"masks (size {reference.GetSize()}) are not on the image's grid (size {image.GetSize()}); "
                        f"write masks computed on this image")
    array = sitk.GetArrayViewFromImage(image)
    spatial_dims = image.GetDimension()
    names = list(masks)
    colors = segment_colors(names)
    mask_arrays = [mask_array(masks[name]) for name in names]
    counts = {name: int(np.count_nonzero(m)) for name, m in zip(names, mask_arrays)}
    font = _font(15)

    spacing = list(reversed(image.GetSpacing()))  # numpy order
    direction = np.array(image.GetDirection()).reshape(spatial_dims, spatial_dims)
    if spatial_dims == 2:
        slices, row_axis, column_axis = [None], 0, 1
    else:
        if array_axis not in (0, 1, 2):
            raise SSAMError(f"preview axis {array_axis} is not an axis of a 3D array; use 0, 1 or 2")
        foreground = np.zeros(array.shape[array_axis], dtype=np.int64)
        for m in mask_arrays:
            foreground += np.count_nonzero(m, axis=tuple(a for a in range(3) if a != array_axis))
        slices = _choose_slices(foreground, max_tiles)
        row_axis, column_axis = [a for a in range(3) if a != array_axis]
    transpose, flip_rows, flip_columns = _display_orientation(direction, row_axis, column_axis)
    pixel_aspect = spacing[column_axis] / spacing[row_axis] if transpose else spacing[row_axis] / spacing[column_axis]

    def cut(volume, index):
        plane = volume if index is None else np.take(volume, index, axis=array_axis)
        if transpose:
            plane = plane.swapaxes(0, 1)
        return plane[::-1 if flip_rows else 1, ::-1 if flip_columns else 1]

    tiles = [_tile(_window(np.asarray(cut(array, index))), [cut(m, index).astype(bool) for m in mask_arrays],
                   [colors[n] for n in names], pixel_aspect, "" if index is None else f"slice {index}", font)
             for index in slices]

    columns = min(len(tiles), 3)
    rows = -(-len(tiles) // columns)
    cell_w = max(t.width for t in tiles)
    cell_h = max(t.height for t in tiles)
    gap, line = 4, 22
    legend_lines = [("no foreground in any label", None)] if not any(counts.values()) else []
    legend_lines += [(f"{name}" + ("" if counts[name] else " (empty)"), colors[name]) for name in names]
    legend_columns = max(1, (columns * (cell_w + gap)) // 260)
    legend_rows = -(-len(legend_lines) // legend_columns)
    width = columns * (cell_w + gap) + gap
    height = rows * (cell_h + gap) + gap + legend_rows * line + gap
    canvas = Image.new("RGB", (width, height), (24, 24, 24))
    for position, tile in enumerate(tiles):
        row, column = divmod(position, columns)
        canvas.paste(tile, (gap + column * (cell_w + gap), gap + row * (cell_h + gap)))
    draw = ImageDraw.Draw(canvas)
    top = rows * (cell_h + gap) + gap
    column_width = (width - gap) // legend_columns
    for position, (text, color) in enumerate(legend_lines):
        row, column = divmod(position, legend_columns)
        x, y = gap + column * column_width, top + row * line
        if color is not None:
            draw.rectangle([x, y + 3, x + 14, y + 17], fill=tuple(int(round(c * 255)) for c in color),
                           outline=(255, 255, 255))
        draw.text((x + (20 if color is not None else 0), y + 1), text, fill=(235, 235, 235), font=font)
    with atomic_output(path, ".png") as temporary:
        canvas.save(temporary, format="PNG")
    return Path(path)


# ------------------------------------------------------------------------------------------------- dispatcher
def write_outputs(output_path, image: sitk.Image, masks, preview_path=None, array_axis: int = 0,
                  dicom_source=None, algorithm=None) -> List[Path]:
    """Write the result in the format named by the output's suffix (.seg.nrrd -> Slicer segmentation; .nii, .nii.gz,
    .nrrd -> label map + JSON sidecar; .dcm -> DICOM SEG referencing `dicom_source`, the DicomSeries the image was
    read from, made by `algorithm` (dicom_seg.Algorithm)) and optionally a PNG preview. Returns the written paths."""
    suffix = output_suffix(output_path)
    if suffix is None:
        raise SSAMError(f"unknown output type {Path(output_path).name}; end the output name in one of: "
                        f"{', '.join(OUTPUT_SUFFIXES)}")
    if suffix == DICOM_SEG_SUFFIX and dicom_source is None:
        raise SSAMError(f"{Path(output_path).name} would be a DICOM SEG, but the image was not read from DICOM, so "
                        f"there is no source series to reference; write .seg.nrrd or .nii.gz instead")
    if preview_path is not None and not str(preview_path).lower().endswith(".png"):
        raise SSAMError(f"preview {Path(preview_path).name} must end in .png")
    reference = check_masks(masks)
    if not same_geometry(image, reference):
        raise SSAMError(f"masks (size {reference.GetSize()}) are not on the image's grid (size {image.GetSize()}); "
                        f"write masks computed on this image")
    check_writable(output_path)
    if preview_path is not None:
        check_writable(preview_path)
    written: List[Path] = []
    if suffix == ".seg.nrrd":
        written.append(write_seg_nrrd(output_path, masks))
    elif suffix == DICOM_SEG_SUFFIX:
        from .dicom_seg import write_dicom_seg  # imported here: highdicom loads its standard tables (~2 s)

        written.append(write_dicom_seg(output_path, masks, dicom_source, algorithm)[0])
    else:
        written += [write_label_map(output_path, masks), sidecar_path(output_path)]
    if preview_path is not None:
        written.append(write_preview_png(preview_path, image, masks, array_axis=array_axis))
    return written
