"""3D Slicer segmentation files (.seg.nrrd): label masks with segment names and colours, readable by Slicer as is.

A mask set is an `OrderedDict[str, SimpleITK.Image]`: label name -> uint8 image of 0/1, all on one grid (the input
image's). The file is an NRRD in LPS space with the metadata Slicer's vtkMRMLSegmentationStorageNode reads and writes
(`Segmentation_*` and `Segment<N>_*` keys). Segments that do not overlap share one layer (a 3D label map, value =
the segment's LabelValue); overlapping segments go to further layers, written as a 4D NRRD with the list axis first,
as Slicer does. A 2D mask set is written as 3D with one slice. Empty segments are kept: for a taught label,
"absent" is an answer. The header is written here (not by SimpleITK) so that every number is printed with full precision, plus
three keys of our own that Slicer ignores (SSAMSegment_Dimension, _Spacing, _Direction): origin, spacing and
direction, oblique included, come back bit for bit, and a 2D grid comes back 2D. A file re-saved by Slicer loses
those keys and is read from its standard geometry (oblique spacing then off in the last bit, 2D as one slice).
"""

import gzip
import re
from collections import OrderedDict
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

import numpy as np
import SimpleITK as sitk

from .atomic_file import atomic_output
from ..errors import SSAMError
from .image_io import same_geometry
from ..model.labels import label_key

Color = Tuple[float, float, float]

# Colours of 3D Slicer's GenericAnatomyColors table (0..255), looked up by a pattern on the normalised label name.
# Order matters: the first match wins, so specific names come before the general ones they contain
# ("gallbladder" before "bladder", "adrenal gland" before "kidney", "spinal cord" before "spine").
_ANATOMY_COLORS = [
    (r"gall ?bladder", (139, 150, 98)),              # gallbladder
    (r"adrenal", (249, 186, 150)),                   # adrenal gland
    (r"bladder", (222, 154, 132)),                   # urinary bladder
    (r"spinal cord", (244, 214, 49)),                # spinal cord
    (r"kidneys?|renal", (185, 102, 83)),             # kidney
    (r"livers?|hepatic", (221, 130, 101)),           # liver
    (r"spleens?", (157, 108, 162)),                  # spleen
    (r"pancreas", (249, 180, 111)),                  # pancreas
    (r"stomach", (216, 132, 105)),                   # stomach
    (r"duodenum", (255, 253, 229)),                  # duodenum
    (r"small (bowel|intestine)|jejunum|ileum", (205, 167, 142)),  # small bowel
    (r"colon|large intestine|rectum|sigmoid", (204, 168, 143)),   # colon
    (r"o?esophagus", (211, 171, 143)),               # esophagus
    (r"trachea", (182, 228, 255)),                   # trachea
    (r"bronch(us|i)", (175, 216, 244)),              # bronchi
    (r"lungs?|pulmonary lobe", (197, 165, 145)),     # lung
    (r"hearts?|myocardium", (206, 110, 84)),         # heart
    (r"aorta|aortic", (224, 97, 76)),                # aorta
    (r"vena cava|veins?|portal", (0, 151, 206)),     # vein
    (r"arter(y|ies)|arterial", (216, 101, 79)),      # artery
    (r"vertebra[el]?|spine|spinal column|sacrum", (212, 188, 102)),  # lumbar vertebral column
    (r"ribs?", (253, 232, 158)),                     # ribs
    (r"sternum", (244, 217, 154)),                   # sternum
    (r"skull", (241, 213, 144)),                     # skull
    (r"mandible", (222, 198, 101)),                  # mandible
    (r"clavicles?|clavicula", (205, 179, 108)),      # clavicle
    (r"bones?|femur|humerus|pelvis|hip|scapula|tibia", (241, 214, 145)),  # bone
    (r"brain", (250, 250, 225)),                     # brain
    (r"thyroid", (62, 162, 114)),                    # thyroid gland
    (r"prostate", (230, 158, 140)),                  # prostate
    (r"uterus", (255, 181, 158)),                    # uterus
    (r"ovary|ovaries", (213, 141, 113)),             # ovary
    (r"muscles?|psoas|gluteus|iliopsoas", (192, 104, 88)),  # muscle
    (r"fat|adipose", (230, 220, 70)),                # fat
    (r"skin", (177, 122, 101)),                      # skin
    (r"polyps?|tumou?rs?|lesions?|mass(es)?|nodules?|cancer|carcinoma|metastas[ie]s", (144, 238, 144)),  # mass
    (r"cysts?", (205, 205, 100)),                    # cyst
    (r"lymph nodes?", (68, 172, 100)),               # lymph node
    (r"nerves?", (244, 214, 49)),                    # nerve
    (r"o?edema", (140, 224, 228)),                   # edema
    (r"necrosis|necrotic", (216, 191, 216)),         # necrosis
    (r"bleeding|ha?emorrhage", (188, 65, 28)),       # bleeding
]
_ANATOMY_PATTERNS = [(re.compile(rf"\b({pattern})\b"), rgb) for pattern, rgb in _ANATOMY_COLORS]

# GenericAnatomyColors' "region 0".."region 15": sixteen distinct saturated colours for names without anatomy.
_PALETTE = [
    (185, 232, 61), (0, 226, 255), (251, 159, 255), (230, 169, 29), (0, 194, 113), (104, 160, 249),
    (221, 108, 158), (137, 142, 0), (230, 70, 0), (0, 147, 0), (0, 147, 248), (231, 0, 206),
    (129, 78, 0), (0, 116, 0), (0, 0, 255), (157, 0, 0),
]

def _rgb01(rgb) -> Color:
    return tuple(round(v / 255.0, 6) for v in rgb)


def anatomy_color(name: str) -> Optional[Color]:
    """The GenericAnatomyColors colour (0..1) for a well-known anatomy name, else None."""
    key = label_key(name).replace("-", " ")
    for pattern, rgb in _ANATOMY_PATTERNS:
        if pattern.search(key):
            return _rgb01(rgb)
    return None


def segment_color(name: str, index: int) -> Color:
    """Colour (r, g, b in 0..1) of a segment: Slicer's anatomy colour when the name is known, else palette[index]."""
    color = anatomy_color(name)
    return color if color is not None else _rgb01(_PALETTE[index % len(_PALETTE)])


def segment_colors(names: Iterable[str]) -> Dict[str, Color]:
    """Colours for a set of labels, all distinct where possible: anatomy colours first, and a label whose anatomy
    colour is already taken (kidney_left after kidney_right) gets the next unused palette colour instead."""
    colors: Dict[str, Color] = {}
    used = set()
    palette_index = 0
    for index, name in enumerate(names):
        color = anatomy_color(name)
        if color is None or color in used:
            for _ in range(len(_PALETTE)):
                color = _rgb01(_PALETTE[palette_index % len(_PALETTE)])
                palette_index += 1
                if color not in used:
                    break
        colors[name] = color
        used.add(color)
    return colors


def check_masks(masks) -> sitk.Image:
    """Check a mask set (non-empty mapping name -> 2D/3D scalar image, all on one grid); return the first image.

    Shared by every writer and by the evaluation, so bad input fails the same way everywhere.
    """
    if not isinstance(masks, dict) or not masks:
        raise SSAMError("no label masks given; pass a mapping of label name -> mask image with at least one label")
    first_name, first = next(iter(masks.items()))
    for name, mask in masks.items():
        if not isinstance(name, str) or not name.strip() or any(c in name for c in "\r\n"):
            raise SSAMError(f"label name {name!r} is not usable; use a non-empty one-line name")
        if not isinstance(mask, sitk.Image):
            raise SSAMError(f"mask of label {name!r} is a {type(mask).__name__}, not a SimpleITK image; "
                            f"build it with image_io.image_from_array")
        if mask.GetDimension() not in (2, 3) or mask.GetNumberOfComponentsPerPixel() != 1:
            raise SSAMError(f"mask of label {name!r} is {mask.GetDimension()}D with "
                            f"{mask.GetNumberOfComponentsPerPixel()} components; masks must be 2D or 3D scalar images")
        if not same_geometry(first, mask):
            raise SSAMError(
                f"masks of {first_name!r} (size {first.GetSize()}, spacing {_short(first.GetSpacing())}) and "
                f"{name!r} (size {mask.GetSize()}, spacing {_short(mask.GetSpacing())}) are on different grids; "
                f"resample them onto the image's grid"
            )
    return first


def _short(values) -> str:
    return "(" + ", ".join(f"{v:g}" for v in values) + ")"


def mask_array(mask: sitk.Image) -> np.ndarray:
    """A mask's voxels as a uint8 0/1 numpy array ((z,) y, x), without a copy when it already is uint8 0/1."""
    array = sitk.GetArrayViewFromImage(mask)
    if array.dtype == np.uint8 and array.size and array.max() <= 1:
        return array
    return (array != 0).view(np.uint8)


def _grid_3d(image: sitk.Image):
    """(size xyz, spacing, origin, direction 3x3) of a 2D or 3D grid; a 2D grid becomes one slice, 1 unit thick."""
    if image.GetDimension() == 3:
        return (list(image.GetSize()), list(image.GetSpacing()), list(image.GetOrigin()),
                np.array(image.GetDirection(), dtype=float).reshape(3, 3))
    direction = np.eye(3)
    direction[:2, :2] = np.array(image.GetDirection(), dtype=float).reshape(2, 2)
    return (list(image.GetSize()) + [1], list(image.GetSpacing()) + [1.0], list(image.GetOrigin()) + [0.0],
            direction)


def _number(value: float) -> str:
    """Shortest text that reads back as exactly the same double."""
    text = repr(float(value))
    return text[:-2] if text.endswith(".0") else text


def _assign_layers(arrays: List[np.ndarray]) -> List[Tuple[int, int]]:
    """(layer, label value) per segment (arrays: uint8 0/1, as mask_array gives): each segment goes to the first
    layer where it overlaps nothing.

    Empty segments join layer 0. A layer holds at most 255 segments (uint8 label values).
    """
    occupied: List[Optional[np.ndarray]] = []  # per layer: boolean union of its segments, None while empty
    counts: List[int] = []
    result = []
    for array in arrays:
        foreground = array.view(bool)  # mask_array's 0/1 uint8: the same bytes, no copy
        has_foreground = bool(foreground.any())
        for layer in range(len(occupied)):
            if counts[layer] >= 255:
                continue
            if not has_foreground or occupied[layer] is None or not np.any(occupied[layer] & foreground):
                break
        else:
            occupied.append(None)
            counts.append(0)
            layer = len(occupied) - 1
        if has_foreground:
            if occupied[layer] is None:
                occupied[layer] = foreground.copy()
            else:
                occupied[layer] |= foreground  # in place: one union array per layer
        counts[layer] += 1
        result.append((layer, counts[layer]))
    return result


def _reference_geometry_string(size, spacing, origin, direction) -> str:
    """Slicer's serialised reference image geometry: the 4x4 IJK-to-RAS matrix row by row, then the extent."""
    ijk_to_lps = direction * np.asarray(spacing)[None, :]
    ijk_to_ras = np.diag([-1.0, -1.0, 1.0]) @ ijk_to_lps
    origin_ras = np.array([-origin[0], -origin[1], origin[2]])
    matrix = np.eye(4)
    matrix[:3, :3] = ijk_to_ras
    matrix[:3, 3] = origin_ras
    extent = [0, size[0] - 1, 0, size[1] - 1, 0, size[2] - 1]
    return "".join(f"{_number(v)};" for v in matrix.reshape(-1)) + "".join(f"{v};" for v in extent)


def write_seg_nrrd(path, masks, colors: Optional[Dict[str, Color]] = None, compression_level: int = 6) -> Path:
    """Write a mask set as a Slicer segmentation file; returns the path. `colors`: label -> (r, g, b) in 0..1
    (labels missing from it get `segment_colors`). Written atomically: on any error nothing is left at `path`."""
    reference = check_masks(masks)
    names = list(masks)
    chosen = segment_colors(names)
    for name, color in (colors or {}).items():
        if name in chosen:
            if len(color) != 3 or not all(0.0 <= float(c) <= 1.0 for c in color):
                raise SSAMError(f"colour {color!r} of label {name!r} is not (r, g, b) in 0..1; give three numbers 0..1")
            chosen[name] = tuple(float(c) for c in color)

    size, spacing, origin, direction = _grid_3d(reference)
    shape_zyx = (size[2], size[1], size[0])
    arrays = [mask_array(masks[name]).reshape(shape_zyx) for name in names]
    layers = _assign_layers(arrays)
    layer_count = 1 + max(layer for layer, _ in layers)
    if layer_count == 1:
        data = np.zeros(shape_zyx, dtype=np.uint8)
        for array, (_, value) in zip(arrays, layers):
            data[array.view(bool)] = value
    else:
        data = np.zeros(shape_zyx + (layer_count,), dtype=np.uint8)  # list axis fastest in memory = first in NRRD
        for array, (layer, value) in zip(arrays, layers):
            data[..., layer][array.view(bool)] = value

    directions = " ".join(
        "(" + ",".join(_number(direction[row, axis] * spacing[axis]) for row in range(3)) + ")" for axis in range(3)
    )
    full_extent = f"0 {size[0] - 1} 0 {size[1] - 1} 0 {size[2] - 1}"
    header = [
        "NRRD0004",
        "# Complete NRRD file format specification at:",
        "# http://teem.sourceforge.net/nrrd/format.html",
        "type: unsigned char",
        f"dimension: {4 if layer_count > 1 else 3}",
        "space: left-posterior-superior",
        "sizes: " + " ".join(str(v) for v in ([layer_count] if layer_count > 1 else []) + size),
        "space directions: " + ("none " if layer_count > 1 else "") + directions,
        "kinds: " + ("list " if layer_count > 1 else "") + "domain domain domain",
        "encoding: gzip",
        "space origin: (" + ",".join(_number(v) for v in origin) + ")",
    ]
    for index, (name, (layer, value)) in enumerate(zip(names, layers)):
        prefix = f"Segment{index}_"
        header += [
            f"{prefix}Color:=" + " ".join(_number(c) for c in chosen[name]),
            f"{prefix}ColorAutoGenerated:=0",
            # Every segment of a layer carries the whole grid as extent: Slicer crops a layer to the extent of its
            # first segment, so a smaller (or empty) extent there would cut the other segments of that layer.
            f"{prefix}Extent:={full_extent}",
            f"{prefix}ID:={name}",
            f"{prefix}LabelValue:={value}",
            f"{prefix}Layer:={layer}",
            f"{prefix}Name:={name}",
            f"{prefix}NameAutoGenerated:=0",
            f"{prefix}Tags:=Source:SSAM Segment|",
        ]
    header += [
        "Segmentation_ContainedRepresentationNames:=Binary labelmap|",
        "Segmentation_ConversionParameters:=Reference image geometry|"
        + _reference_geometry_string(size, spacing, origin, direction)
        + "|Image geometry description string determining the geometry of the labelmap that is created in course "
          "of conversion.&",  # Slicer reads only entries closed by '&'
        "Segmentation_MasterRepresentation:=Binary labelmap",
        "Segmentation_ReferenceImageExtentOffset:=0 0 0",
        # Not Slicer's: the grid exactly as given. "space directions" hold spacing x direction, and splitting an
        # oblique one back into its two factors is off in the last bit; a 2D input is restored as 2D.
        "SSAMSegment_Dimension:=" + str(reference.GetDimension()),
        "SSAMSegment_Spacing:=" + " ".join(_number(v) for v in spacing),
        "SSAMSegment_Direction:=" + " ".join(_number(v) for v in direction.reshape(-1)),
    ]
    with atomic_output(path, ".seg.nrrd") as temporary:
        with open(temporary, "wb") as handle:
            handle.write(("\n".join(header) + "\n\n").encode("utf-8"))
            # NRRD's "gzip" encoding is a gzip stream of the raw voxels, fastest axis first (numpy C order here).
            with gzip.GzipFile(fileobj=handle, mode="wb", compresslevel=compression_level, mtime=0) as stream:
                stream.write(memoryview(np.ascontiguousarray(data)).cast("B"))  # no bytes copy of the volume
    return Path(path)


def _parse_extent(text: str) -> Optional[List[int]]:
    try:
        values = [int(v) for v in text.split()]
    except ValueError:
        return None
    return values if len(values) == 6 else None


def _parse_color(text: str) -> Optional[Color]:
    try:
        values = [float(v) for v in text.split()]
    except ValueError:
        return None
    return tuple(values) if len(values) == 3 else None


def _unique(name: str, taken) -> str:
    if name not in taken:
        return name
    number = 2
    while f"{name} ({number})" in taken:
        number += 1
    return f"{name} ({number})"


def _floats(text: str, count: int) -> Optional[np.ndarray]:
    try:
        values = np.array([float(v) for v in text.split()])
    except ValueError:
        return None
    return values if values.size == count else None


def _mask_maker(image: sitk.Image, meta):
    """A function (z, y, x) uint8 array -> mask image on the file's grid; uses the exact spacing and direction our
    writer recorded when they agree with the file's (a file re-saved elsewhere keeps only its own), and gives a
    one-slice file written from a 2D grid back as 2D."""
    spacing, origin = np.array(image.GetSpacing()), np.array(image.GetOrigin())
    direction = np.array(image.GetDirection())
    exact_spacing = _floats(meta.get("SSAMSegment_Spacing", ""), spacing.size)
    exact_direction = _floats(meta.get("SSAMSegment_Direction", ""), direction.size)
    if exact_spacing is not None and exact_direction is not None \
            and np.allclose(exact_spacing, spacing, rtol=1e-9, atol=0) \
            and np.allclose(exact_direction, direction, rtol=0, atol=1e-9):
        spacing, direction = exact_spacing, exact_direction
    as_2d = meta.get("SSAMSegment_Dimension") == "2" and image.GetDimension() == 3 and image.GetSize()[2] == 1
    if as_2d:
        spacing, origin, direction = spacing[:2], origin[:2], direction.reshape(3, 3)[:2, :2].reshape(-1)

    def to_image(array: np.ndarray) -> sitk.Image:
        mask = sitk.GetImageFromArray(array[0] if as_2d else array)
        mask.SetSpacing([float(v) for v in spacing])
        mask.SetOrigin([float(v) for v in origin])
        mask.SetDirection([float(v) for v in direction])
        return mask

    return to_image


def read_seg_nrrd(path) -> Tuple["OrderedDict[str, sitk.Image]", Dict[str, Color]]:
    """Read a Slicer segmentation file (ours or Slicer's, one layer or several) -> (masks, colours).

    Masks are uint8 0/1 images on the file's 3D grid (LPS, as SimpleITK reads NRRD), in segment order; colours are
    (r, g, b) in 0..1. A plain label map NRRD without segment metadata gives one segment per value, named
    "Segment_<value>", as Slicer names them.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise SSAMError(f"segmentation file {path} does not exist; check the path")
    try:
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        reader.SetImageIO("NrrdImageIO")
        image = reader.Execute()
    except RuntimeError as error:
        reason = str(error).strip().splitlines()[-1] if str(error).strip() else "unknown reason"
        raise SSAMError(f"cannot read {path} as a segmentation (.seg.nrrd): {reason[:120]}; "
                        f"give a .seg.nrrd file saved by Slicer or by SSAM Segment") from None
    meta = {key: image.GetMetaData(key) for key in image.GetMetaDataKeys()}
    if "Segmentation_Extent" in meta and image.GetDimension() == 4:
        return _read_legacy_4d(image, meta)
    if image.GetDimension() not in (2, 3):
        raise SSAMError(f"{path} is a {image.GetDimension()}D image, not a segmentation; give a .seg.nrrd file")

    layers = sitk.GetArrayViewFromImage(image)  # (z, y, x) or (z, y, x, layers)
    if image.GetNumberOfComponentsPerPixel() == 1:
        layers = layers[..., None]
    to_image = _mask_maker(image, meta)

    masks: "OrderedDict[str, sitk.Image]" = OrderedDict()
    colors: Dict[str, Color] = {}
    count = 0
    while f"Segment{count}_ID" in meta:
        count += 1
    if count == 0:  # a plain label map: one segment per value present, as Slicer imports it
        values = np.unique(layers[..., 0])
        for index, value in enumerate(v for v in values if v != 0):
            name = f"Segment_{int(value)}"
            masks[name] = to_image((layers[..., 0] == value).view(np.uint8))
            colors[name] = segment_color(name, index)
        return masks, colors

    spatial_shape = layers.shape[:-1]
    for index in range(count):
        prefix = f"Segment{index}_"
        segment_id = meta[prefix + "ID"]
        name = _unique(meta.get(prefix + "Name", segment_id) or segment_id, masks)
        layer = int(meta.get(prefix + "Layer", index if layers.shape[-1] > 1 else 0))
        value = int(meta.get(prefix + "LabelValue", 1))
        if not 0 <= layer < layers.shape[-1]:
            raise SSAMError(f"{path}: segment {name!r} is in layer {layer} but the file has {layers.shape[-1]}; "
                            f"the file is damaged, save it again from Slicer")
        mask = (layers[..., layer] == value).view(np.uint8)
        extent = _parse_extent(meta.get(prefix + "Extent", ""))
        if extent is not None:
            # Voxels outside the segment's extent are not part of it (Slicer crops to the extent when reading).
            if extent[0] > extent[1] or extent[2] > extent[3] or extent[4] > extent[5]:
                mask = np.zeros(spatial_shape, np.uint8)
            else:
                inside = np.zeros(spatial_shape, bool)
                bounds = [(max(extent[2 * a], 0), extent[2 * a + 1] + 1) for a in range(len(spatial_shape))]
                inside[tuple(slice(lo, hi) for lo, hi in reversed(bounds))] = True
                mask = (mask.astype(bool) & inside).view(np.uint8)
        masks[name] = to_image(mask)
        colors[name] = _parse_color(meta.get(prefix + "Color", meta.get(prefix + "DefaultColor", ""))) \
            or segment_color(name, index)
    return masks, colors


def _read_legacy_4d(image: sitk.Image, meta) -> Tuple["OrderedDict[str, sitk.Image]", Dict[str, Color]]:
    """Slicer 4.x files: one binary volume per segment along a 4th axis."""
    masks: "OrderedDict[str, sitk.Image]" = OrderedDict()
    colors: Dict[str, Color] = {}
    size = list(image.GetSize())
    for index in range(size[3]):
        volume = sitk.Extract(image, size[:3] + [0], [0, 0, 0, index])
        prefix = f"Segment{index}_"
        name = _unique(meta.get(prefix + "Name", f"Segment_{index + 1}"), masks)
        masks[name] = sitk.Cast(volume != 0, sitk.sitkUInt8)
        colors[name] = _parse_color(meta.get(prefix + "Color", meta.get(prefix + "DefaultColor", ""))) \
            or segment_color(name, index)
    return masks, colors
