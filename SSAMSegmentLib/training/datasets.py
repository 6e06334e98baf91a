"""Training data: find the cases of a labelled dataset, check every one of them, and report all problems at once.

    dataset = open_dataset("/data/Dataset003_Liver", labels=["liver"])   # or raises ONE SSAMError listing everything
    train, val = split_cases(dataset.cases, val_fraction=0.2, seed=0)
    image, masks = train[0].load()                                        # masks: label name -> uint8 0/1 array

Layouts, detected from the folder:
- "nnunet": nnU-Net v2 or Medical Segmentation Decathlon: dataset.json, imagesTr/, labelsTr/. nnU-Net v2 names
  images CASE_XXXX.ext (one file per channel; channel 0000 is used), MSD names them CASE.ext.
- "folder2d": images/ and masks/ whose files match by name (the extension may differ: a.jpg with a.png), and
  labels.json mapping mask values to names ({"1": "polyp"} or {"polyp": 1}).
- "segnrrd": images with Slicer segmentations beside them (case.nii.gz + case.seg.nrrd); labels = segment names.
- "dicomseg": DICOM series folders with DICOM SEG files beside them (case.dcm next to the folder of its series,
  whatever the folder's name): each SEG is paired with the series folder that holds the instances it references
  (SOP Instance UIDs); labels = segment labels. Masks are read onto the series' grid (files/dicom_seg.py).
- "memory": images and masks handed over in memory (the Slicer panel's "segmentations in this scene" mode).

Rules (the same for every layout where they apply):
- Value 0 of a label map is background, whatever labels.json calls it. A label named "ignore" (nnU-Net's
  not-annotated value) is not trained; its voxels count as background.
- nnU-Net v2 region labels ({"tumor core": [2, 3]}) are the union of their values.
- Masks must hold exactly the mapped values, except in one case: a "folder2d" dataset with a single label and an
  8-bit mask whose values are not all in {0, label value} (0/255 PNGs, JPEG masks with compression noise) is
  thresholded at 128, half of the 8-bit range; a fixed threshold, so an empty JPEG mask with noise stays empty.
- RGB(A) masks use their first channel.
- Geometry: 3D masks must match their image's size, spacing, origin and direction (image_io.same_geometry); 2D
  ones only its size (PNG/JPEG spacing is meaningless). A .seg.nrrd may be saved cropped to its segments: a grid
  with the image's spacing and direction whose origin falls on an image voxel is placed into the image's grid.
- Validation reads every image and mask once, one case at a time (nothing is kept): a truncated file is found now,
  not after an hour of training. A case's label map is read again, with its image, by `Case.load()`.
"""

import hashlib
import json
import re
from collections import OrderedDict
from functools import partial
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from ..errors import SSAMError
from ..files.image_io import check_image, has_image_suffix, image_kind, is_truncated, same_geometry, strip_image_suffix
from ..model.labels import label_key

LAYOUTS = ("nnunet", "folder2d", "segnrrd", "dicomseg", "memory", "combined")
MAX_LISTED_PROBLEMS = 20
MASK_THRESHOLD_8BIT = 128
IGNORE_LABEL = "ignore"
_NNUNET_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


class DatasetProblems(SSAMError):
    """Everything wrong with a dataset, in one error. One problem is one line like every SSAMError; several are a
    summary line followed by one line per problem (the only multi-line SSAMError: a dataset with 40 unpaired files
    needs a list, not 40 runs)."""

    def __init__(self, where, problems: Sequence[str]):
        self.problems = [" ".join(str(p).split()) for p in problems]
        count = len(self.problems)
        if count == 1:
            super().__init__(f"dataset {where}: {self.problems[0]}")
            return
        head = f"dataset {where} has {count} problems; fix them and run again:"
        lines = [f"  - {p}" for p in self.problems[:MAX_LISTED_PROBLEMS]]
        if count > MAX_LISTED_PROBLEMS:
            lines.append(f"  - and {count - MAX_LISTED_PROBLEMS} more")
        Exception.__init__(self, "\n".join([head] + lines))  # keep the line breaks SSAMError would fold


MaskReader = Callable[[], Tuple[sitk.Image, Dict[str, np.ndarray]]]


class Case:
    """One training case. Nothing is read until `load()`; `present_labels` (labels with at least one voxel) was
    found when the dataset was checked, so a trainer can balance positives and negatives without reading."""

    def __init__(self, case_id: str, image_path: Optional[Path], label_names: Sequence[str], read: MaskReader,
                 present_labels=(), annotated=None, source: str = "", absent=()):
        self.case_id = case_id
        self.image_path = image_path
        self.label_names = list(label_names)
        self.present_labels = frozenset(present_labels)
        # The labels this case's own dataset annotates (validation scores only those); None: all of label_names.
        self.annotated = None if annotated is None else frozenset(annotated)
        self.source = source  # the dataset a case of a combined set came from ("" otherwise)
        # Labels not annotated here but certainly absent: no dataset annotating them has this case's kind of image
        # (combine_datasets). Training teaches them as empty; validation does not score them.
        self.absent = frozenset(absent)
        self._read = read

    def use_label_names(self, label_names: Sequence[str], names_by_key) -> None:
        """List `label_names` and read the masks under their spelling (label_key -> name): another dataset's names
        for the same labels."""
        read = self._read

        def read_renamed():
            image, masks = read()
            return image, {names_by_key.get(label_key(name), name): mask for name, mask in masks.items()}

        self._read = read_renamed
        self.label_names = list(label_names)

    def load(self) -> Tuple[sitk.Image, "OrderedDict[str, np.ndarray]"]:
        """(image, masks): masks has every dataset label in order, uint8 0/1 shaped like the image's voxel grid
        ((z,) y, x; an RGB image's mask has no colour axis), all-zero where the label is absent."""
        image, found = self._read()
        shape = voxel_shape(image)
        masks: "OrderedDict[str, np.ndarray]" = OrderedDict()
        for name in self.label_names:
            mask = found.get(name)
            if mask is None:
                mask = np.zeros(shape, np.uint8)  # calloc'd: an absent label costs no memory until written
            elif mask.shape != shape:
                raise SSAMError(f"case {self.case_id}: mask of {name!r} is {mask.shape} but the image is {shape}; "
                                f"the files changed since the dataset was checked, open the dataset again")
            masks[name] = mask
        return image, masks

    def __repr__(self):
        return f"Case({self.case_id!r}, {str(self.image_path) if self.image_path else 'in memory'})"


class Dataset:
    """A checked dataset: cases, label names (in value order), layout, and notes for the user."""

    def __init__(self, root: Optional[Path], layout: str, label_names: Sequence[str], cases: Sequence[Case],
                 notes: Sequence[str] = (), image_kinds: Sequence[str] = (), label_kinds=None):
        self.root = root
        self.layout = layout
        self.label_names = list(label_names)
        self.cases = list(cases)
        self.notes = list(notes)
        self.image_kinds = sorted(set(image_kinds))
        # label_key -> the kinds of image (files/image_io.image_kind) it is annotated on; the adapter keeps them so
        # that segmenting can say when a label is asked on another kind (model/labels.py other_kind)
        self.label_kinds = ({label_key(name): list(self.image_kinds) for name in self.label_names}
                            if label_kinds is None else {key: sorted(kinds) for key, kinds in label_kinds.items()})

    def __len__(self):
        return len(self.cases)

    def label_case_counts(self) -> "OrderedDict[str, int]":
        return OrderedDict((name, sum(name in case.present_labels for case in self.cases))
                           for name in self.label_names)

    def summary(self) -> str:
        kinds = f" ({', '.join(self.image_kinds)} images)" if self.image_kinds else ""
        where = self.root if self.root is not None else "in memory"
        lines = [f"dataset {where} ({_LAYOUT_NAMES[self.layout]}): {len(self.cases)} case"
                 f"{'s' if len(self.cases) != 1 else ''}{kinds}, {len(self.label_names)} label"
                 f"{'s' if len(self.label_names) != 1 else ''}"]
        counts = list(self.label_case_counts().items())
        for name, count in counts[:MAX_LISTED_PROBLEMS]:
            lines.append(f"  {name}: present in {count} of {len(self.cases)} cases")
        if len(counts) > MAX_LISTED_PROBLEMS:
            lines.append(f"  and {len(counts) - MAX_LISTED_PROBLEMS} more labels")
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)


_LAYOUT_NAMES = {"nnunet": "nnU-Net / Medical Segmentation Decathlon", "folder2d": "images/ + masks/ + labels.json",
                 "segnrrd": "images + Slicer .seg.nrrd", "dicomseg": "DICOM series + DICOM SEG",
                 "memory": "segmentations in the scene",
                 "combined": "several datasets"}


def voxel_shape(image: sitk.Image) -> Tuple[int, ...]:
    """The numpy shape of an image's voxel grid, without the colour axis of RGB images."""
    return tuple(reversed(image.GetSize()))


# ---------------------------------------------------------------------------------------------------------------
# Reading single files


def _read_image(path: Path, name: str, check_complete: bool = False) -> sitk.Image:
    """A checked 2D/3D scalar or RGB image; `name` (a path relative to the dataset) is what messages show.
    `check_complete`: also find truncated files that ITK would read silently (costs one more pass over a .nii.gz)."""
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError:
        raise SSAMError(f"cannot read {name}: damaged, truncated or not an image") from None
    if check_complete and is_truncated(path):
        raise SSAMError(f"{name} is truncated (the file ends before its last voxel); copy or export it again")
    return check_image(image, name)


def _read_label_image(path: Path, name: str, check_complete: bool = False) -> sitk.Image:
    image = _read_image(path, name, check_complete)
    if image.GetNumberOfComponentsPerPixel() > 1:  # an RGB mask: its first channel
        image = sitk.VectorIndexSelectionCast(image, 0)
    return image


def _label_values(array: np.ndarray, name: str) -> np.ndarray:
    """The distinct values of a label map, as integers."""
    if array.dtype.kind == "u" and array.dtype.itemsize <= 2:
        return np.flatnonzero(np.bincount(array.ravel()))  # much faster than np.unique on a large volume
    values = np.unique(array)
    if array.dtype.kind == "f":
        if not np.all(np.isfinite(values)) or np.any(values != np.round(values)):
            odd = values[~np.isfinite(values) | (values != np.round(values))][0]
            raise SSAMError(f"{name} has non-integer values (e.g. {odd:g}); save label maps with integer values")
    elif array.dtype.kind not in "iub":
        raise SSAMError(f"{name} has {array.dtype} voxels; save label maps with integer values")
    return values.astype(np.int64)


def _fmt(values) -> str:
    return "(" + ", ".join(f"{v:.6g}" for v in values) + ")"


def _geometry_problem(image: sitk.Image, mask: sitk.Image, image_name: str, mask_name: str) -> Optional[str]:
    if image.GetDimension() == 2 or mask.GetDimension() == 2:
        if image.GetSize() == mask.GetSize():
            return None
        return f"{mask_name} is {_size(mask)} but {image_name} is {_size(image)}"
    if same_geometry(image, mask):
        return None
    for what, getter in (("size", _size), ("spacing", lambda i: _fmt(i.GetSpacing())),
                         ("origin", lambda i: _fmt(i.GetOrigin())), ("direction", lambda i: _fmt(i.GetDirection()))):
        if getter(mask) != getter(image):
            return f"{mask_name} does not match {image_name}: {what} {getter(mask)} vs {getter(image)}"
    return f"{mask_name} does not match the geometry of {image_name}"


def _size(image: sitk.Image) -> str:
    return "x".join(str(v) for v in image.GetSize())


def _listdir(folder: Path) -> List[Path]:
    """Image files of a folder, sorted; hidden files (.DS_Store, macOS '._case.nii.gz' forks) are skipped."""
    return sorted(p for p in folder.iterdir() if not p.name.startswith(".") and p.is_file())


def _rel(root: Path, path: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


# ---------------------------------------------------------------------------------------------------------------
# Label mappings (dataset.json "labels", labels.json)


class _LabelSpec:
    """A trained label: its name and the label-map values that make it (one, or several for an nnU-Net region)."""

    def __init__(self, name: str, values: Sequence[int]):
        self.name = name
        self.values = tuple(int(v) for v in values)

    def mask(self, labelmap: np.ndarray) -> np.ndarray:
        hit = labelmap == self.values[0] if len(self.values) == 1 else np.isin(labelmap, self.values)
        return hit.view(np.uint8)


def _as_value(value) -> Optional[int]:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    return None


def _parse_label_mapping(mapping, source: str, problems: List[str], notes: List[str]) -> Tuple[List[_LabelSpec], set]:
    """Read {"1": "liver"} (value -> name, MSD and labels.json) or {"liver": 1} / {"tumor": [1, 2]} (name -> value(s),
    nnU-Net v2). Returns the labels in value order (background and "ignore" left out) and every value a mask may
    hold; appends problems for what cannot be read."""
    if not isinstance(mapping, dict) or not mapping:
        problems.append(f"{source} has no label mapping; map mask values to names, e.g. {{\"1\": \"liver\"}}")
        return [], {0}
    specs: List[_LabelSpec] = []
    allowed = {0}
    unreadable = False
    for key, value in mapping.items():
        if _as_value(key) is not None and isinstance(value, str) and _as_value(value) is None:
            name, values = value, [_as_value(key)]
        elif isinstance(value, (list, tuple)) and value and all(_as_value(v) is not None for v in value):
            name, values = key, [_as_value(v) for v in value]
        elif _as_value(value) is not None:
            name, values = key, [_as_value(value)]
        else:
            unreadable = True
            problems.append(f"{source}: cannot read label entry {json.dumps({key: value})[:60]}; "
                            f"write value -> name ({{\"1\": \"liver\"}}) or name -> value ({{\"liver\": 1}})")
            continue
        name = str(name).strip()
        if any(v < 0 for v in values):
            problems.append(f"{source}: label {name!r} has a negative value {min(values)}; use values >= 1")
            continue
        allowed.update(values)
        if values == [0]:
            continue  # background, whatever it is called
        if 0 in values:
            problems.append(f"{source}: label {name!r} includes value 0, which is background; remove 0 from it")
            continue
        if label_key(name) == IGNORE_LABEL:
            notes.append(f"label 'ignore' (value {values[0]}) is not trained; its voxels count as background")
            continue
        if not name:
            problems.append(f"{source}: value {values[0]} has an empty name; name every label")
            continue
        specs.append(_LabelSpec(name, values))
    seen_names: Dict[str, str] = {}
    seen_values: Dict[Tuple[int, ...], str] = {}
    for spec in specs:
        if label_key(spec.name) in seen_names:
            problems.append(f"{source}: label {spec.name!r} appears twice (as {seen_names[label_key(spec.name)]!r}); "
                            f"give each label one name")
        if spec.values in seen_values:
            problems.append(f"{source}: labels {seen_values[spec.values]!r} and {spec.name!r} have the same value "
                            f"{list(spec.values)}; give each its own")
        seen_names.setdefault(label_key(spec.name), spec.name)
        seen_values.setdefault(spec.values, spec.name)
    specs.sort(key=lambda s: min(s.values))
    if not specs and not unreadable:
        problems.append(f"{source} has no labels besides background; add the structures to train, "
                        f"e.g. {{\"1\": \"liver\"}}")
    return specs, allowed


def _read_json(path: Path, root: Path, problems: List[str]):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        reason = getattr(error, "msg", None) or getattr(error, "strerror", None) or type(error).__name__
        problems.append(f"cannot read {_rel(root, path)} ({reason}); fix the JSON")
        return None


def _select(names: Sequence[str], requested, problems: List[str]) -> List[str]:
    """The dataset's label names restricted to `requested` (matched with label_key), in the dataset's order."""
    if not requested:
        return list(names)
    if isinstance(requested, str):
        requested = [requested]
    by_key = {label_key(name): name for name in names}
    wanted = set()
    for name in requested:
        if label_key(str(name)) in by_key:
            wanted.add(label_key(str(name)))
        elif names:
            shown = ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")
            problems.append(f"label {name!r} is not in the dataset (it has {shown}); choose one of those")
    return [name for name in names if label_key(name) in wanted]


# ---------------------------------------------------------------------------------------------------------------
# Label-map layouts: nnU-Net / MSD and folder2d


class _Pair:
    def __init__(self, case_id: str, image: Path, mask: Path):
        self.case_id, self.image, self.mask = case_id, image, mask


def _pair_by_id(root: Path, images: Dict[str, Path], masks: Dict[str, Path], expected_mask, expected_image,
                problems: List[str]) -> List[_Pair]:
    pairs = []
    for case_id, image in images.items():
        if case_id in masks:
            pairs.append(_Pair(case_id, image, masks[case_id]))
        else:
            problems.append(f"{_rel(root, image)} has no mask ({expected_mask(case_id)} is missing)")
    for case_id, mask in masks.items():
        if case_id not in images:
            problems.append(f"{_rel(root, mask)} has no image ({expected_image(case_id)} is missing)")
    return pairs


def _index_by_case(root: Path, files: Sequence[Tuple[str, Path]], problems: List[str]) -> Dict[str, Path]:
    by_case: Dict[str, Path] = {}
    for case_id, path in files:
        if case_id in by_case:
            problems.append(f"{_rel(root, by_case[case_id])} and {_rel(root, path)} are both case {case_id!r}; "
                            f"keep one")
        else:
            by_case[case_id] = path
    return by_case


def _folder_files(root: Path, folder: Path, problems: List[str], what: str, ending: Optional[str] = None) -> List[Path]:
    if not folder.is_dir():
        problems.append(f"{_rel(root, folder)}/ is missing; put the {what} there")
        return []
    files = [p for p in _listdir(folder) if (p.name.endswith(ending) if ending else has_image_suffix(p))]
    if not files:
        kind = f"*{ending} files" if ending else "images"
        problems.append(f"{_rel(root, folder)}/ has no {kind}; put the {what} there")
    return files


def _find_nnunet(root: Path, problems: List[str], notes: List[str]):
    meta = None
    if (root / "dataset.json").is_file():
        meta = _read_json(root / "dataset.json", root, problems)
        if meta is not None and not isinstance(meta, dict):
            problems.append("dataset.json is not a JSON object; write it as nnU-Net describes")
            meta = None
    else:
        problems.append("dataset.json is missing; write one with the label names and values, as nnU-Net describes")
    specs, allowed = None, None
    if meta is not None:
        if "labels" in meta:
            specs, allowed = _parse_label_mapping(meta["labels"], "dataset.json labels", problems, notes)
        else:
            problems.append("dataset.json has no \"labels\"; add {\"background\": 0, \"liver\": 1, ...}")
    meta = meta or {}
    ending = meta.get("file_ending") if isinstance(meta.get("file_ending"), str) else None
    image_files = _folder_files(root, root / "imagesTr", problems, "training images", ending)
    label_files = _folder_files(root, root / "labelsTr", problems, "training label maps", ending)

    def stem(path: Path) -> str:
        return path.name[: -len(ending)] if ending else strip_image_suffix(path.name)

    label_ids = {stem(p) for p in label_files}
    # nnU-Net v2 names every image CASE_XXXX (channel); MSD names it CASE, like its label map.
    if "channel_names" in meta or "file_ending" in meta:
        v2 = True
    elif "modality" in meta:
        v2 = False
    else:
        v2 = not any(stem(p) in label_ids for p in image_files)
    suffix = ending or ".nii.gz"
    images: List[Tuple[str, Path]] = []
    channels: Dict[str, set] = {}
    if v2:
        for path in image_files:
            match = _NNUNET_CHANNEL.match(stem(path))
            if not match:
                problems.append(f"{_rel(root, path)} is not named CASE_XXXX{suffix} (nnU-Net v2 channel suffix); "
                                f"rename it, e.g. {stem(path)}_0000{suffix}")
                continue
            channels.setdefault(match["case"], set()).add(match["channel"])
            if match["channel"] == "0000":
                images.append((match["case"], path))
        for case_id, found in channels.items():
            if "0000" not in found:
                problems.append(f"case {case_id!r} has no channel 0000 image (imagesTr/{case_id}_0000{suffix})")
                label_ids.discard(case_id)  # its label map is not "unpaired": the image is misnamed
        channel_names = meta.get("channel_names") if isinstance(meta.get("channel_names"), dict) else {}
        count = max([len(channel_names)] + [len(found) for found in channels.values()])
        if count > 1:
            first = channel_names.get("0") or channel_names.get(0)
            others = ", ".join(str(v) for v in channel_names.values()) if channel_names else ""
            notes.append(f"using channel 0000{f' ({first})' if first else ''} of {count}"
                         f"{f' ({others})' if others else ''}; the other channels are not used")
        expected_image = lambda case_id: f"imagesTr/{case_id}_0000{suffix}"  # noqa: E731
    else:
        images = [(stem(p), p) for p in image_files]
        modality = meta.get("modality") if isinstance(meta.get("modality"), dict) else {}
        if len(modality) > 1:
            notes.append(f"dataset.json lists {len(modality)} modalities; MSD stores them as one 4D image, convert "
                         f"the dataset to nnU-Net v2 (one file per channel) to train on channel 0000")
        expected_image = lambda case_id: f"imagesTr/{case_id}{suffix}"  # noqa: E731
    image_index = _index_by_case(root, images, problems)
    label_index = _index_by_case(root, [(stem(p), p) for p in label_files if stem(p) in label_ids], problems)
    pairs = _pair_by_id(root, image_index, label_index, lambda c: f"labelsTr/{c}{suffix}", expected_image, problems)
    notes.insert(0, "nnU-Net v2 naming (CASE_XXXX images)" if v2 else "Medical Segmentation Decathlon naming")
    return specs, allowed, pairs


def _find_folder2d(root: Path, problems: List[str], notes: List[str]):
    specs, allowed = None, None
    if (root / "labels.json").is_file():
        mapping = _read_json(root / "labels.json", root, problems)
        if mapping is not None:
            specs, allowed = _parse_label_mapping(mapping, "labels.json", problems, notes)
    else:
        problems.append("labels.json is missing; write one mapping mask values to names, e.g. {\"1\": \"polyp\"}")
    image_files = _folder_files(root, root / "images", problems, "images")
    mask_files = _folder_files(root, root / "masks", problems, "masks (same names as the images)")
    images = _index_by_case(root, [(strip_image_suffix(p.name), p) for p in image_files], problems)
    masks = _index_by_case(root, [(strip_image_suffix(p.name), p) for p in mask_files], problems)
    pairs = _pair_by_id(root, images, masks, lambda c: f"masks/{c}.*", lambda c: f"images/{c}.*", problems)
    return specs, allowed, pairs


def _check_labelmap_case(root: Path, pair: _Pair, specs, allowed, may_threshold: bool, problems: List[str],
                         kinds: set):
    """Read one case; append its problems. Returns (present label names, thresholded) or None."""
    image_name, mask_name = _rel(root, pair.image), _rel(root, pair.mask)
    image = mask = None
    try:
        image = _read_image(pair.image, image_name, check_complete=True)
    except SSAMError as error:
        problems.append(str(error))
    try:
        mask = _read_label_image(pair.mask, mask_name, check_complete=True)
    except SSAMError as error:
        problems.append(str(error))
    if image is None or mask is None:
        return None
    kinds.add(image_kind(image))
    problem = _geometry_problem(image, mask, image_name, mask_name)
    if problem:
        problems.append(problem)
        return None
    del image
    labelmap = sitk.GetArrayFromImage(mask)
    try:
        values = _label_values(labelmap, mask_name)
    except SSAMError as error:
        problems.append(str(error))
        return None
    if specs is None:
        return None
    unknown = [int(v) for v in values if int(v) not in allowed]
    thresholded = False
    if unknown:
        if may_threshold and len(specs) == 1 and labelmap.dtype == np.uint8:
            thresholded = True
        else:
            shown = ", ".join(str(v) for v in unknown[:8]) + (", ..." if len(unknown) > 8 else "")
            problems.append(f"{mask_name} has values not in the label mapping: {shown}; map them or fix the mask")
            return None
    if thresholded:
        present = [specs[0].name] if (labelmap >= MASK_THRESHOLD_8BIT).any() else []
    else:
        value_set = set(int(v) for v in values)
        present = [spec.name for spec in specs if value_set.intersection(spec.values)]
    return present, thresholded


def _read_labelmap_case(image_path: Path, mask_path: Path, specs: Sequence[_LabelSpec], thresholded: bool):
    image = _read_image(image_path, str(image_path))
    labelmap = sitk.GetArrayFromImage(_read_label_image(mask_path, str(mask_path)))
    if thresholded:
        return image, {specs[0].name: (labelmap >= MASK_THRESHOLD_8BIT).view(np.uint8)}
    # Only the labels this case holds get an array; Case.load gives the others lazily allocated zeros.
    values = set(int(v) for v in _label_values(labelmap, str(mask_path)))
    return image, {spec.name: spec.mask(labelmap) for spec in specs if values.intersection(spec.values)}


def _labelmap_dataset(root: Path, layout: str, found, labels, problems: List[str], notes: List[str]) -> Dataset:
    specs, allowed, pairs = found
    kinds: set = set()
    checked = {}
    for pair in pairs:
        result = _check_labelmap_case(root, pair, specs, allowed, layout == "folder2d", problems, kinds)
        if result is not None:
            checked[pair.case_id] = result
    names = _select([s.name for s in specs], labels, problems) if specs is not None else []
    if problems:
        raise DatasetProblems(root, problems)
    chosen = [s for s in specs if s.name in names]
    if pairs and not any(set(checked[p.case_id][0]) & set(names) for p in pairs):
        mapped = ", ".join(f"{v}={s.name}" for s in chosen for v in s.values)
        raise DatasetProblems(root, [f"no mask holds any voxel of {', '.join(names)} (the mapping has {mapped}); "
                                     f"the masks' values do not match the label mapping: fix it or the masks"])
    cases = []
    for pair in pairs:
        present, thresholded = checked[pair.case_id]
        read = partial(_read_labelmap_case, pair.image, pair.mask, chosen, thresholded)
        cases.append(Case(pair.case_id, pair.image, names, read, set(present) & set(names)))
    count = sum(checked[p.case_id][1] for p in pairs)
    if count:
        notes.append(f"{count} of {len(pairs)} masks are not exactly 0/{specs[0].values[0]} "
                     f"(0/255 or JPEG): thresholded at {MASK_THRESHOLD_8BIT}")
    return _finish(root, layout, names, cases, notes, kinds, [s.name for s in specs], labels)


def _finish(root, layout, names, cases, notes, kinds, all_names, labels) -> Dataset:
    if labels:
        notes.append(f"training {len(names)} of the dataset's {len(all_names)} labels")
    dataset = Dataset(root, layout, names, cases, notes, kinds)
    never = [name for name, count in dataset.label_case_counts().items() if count == 0]
    if never:
        shown = ", ".join(never[:10]) + (f" and {len(never) - 10} more" if len(never) > 10 else "")
        dataset.notes.append(f"{len(never)} label{'s are' if len(never) != 1 else ' is'} present in no case "
                             f"({shown}): trained only as absent; choose labels to leave them out")
    return dataset


# ---------------------------------------------------------------------------------------------------------------
# Slicer .seg.nrrd beside each image


def _segments_on_grid(image: sitk.Image, masks, image_name: str, seg_name: str):
    """Segment images -> {segment name: uint8 array on the image's voxel grid}, or a problem string."""
    arrays = {}
    shape = voxel_shape(image)
    for name, segment in masks.items():
        if image.GetDimension() == 2 and segment.GetDimension() == 3 and segment.GetSize()[2] == 1:
            segment = segment[:, :, 0]  # Slicer stores a 2D image's segmentation as one slice
        problem = _geometry_problem(image, segment, image_name, seg_name)
        if problem is None:
            arrays[name] = (sitk.GetArrayFromImage(segment) != 0).view(np.uint8)
            continue
        offset = _grid_offset(image, segment)
        if offset is None:
            return problem
        arrays[name] = _paste(sitk.GetArrayFromImage(segment), offset, shape)
    return arrays


def _grid_offset(image: sitk.Image, segment: sitk.Image) -> Optional[Tuple[int, ...]]:
    """The voxel offset of a segment grid that is a shifted (cropped) copy of the image grid, else None."""
    if image.GetDimension() != 3 or segment.GetDimension() != 3:
        return None
    if not (np.allclose(image.GetSpacing(), segment.GetSpacing(), rtol=1e-4, atol=1e-4)
            and np.allclose(image.GetDirection(), segment.GetDirection(), atol=1e-4)):
        return None
    index = np.array(image.TransformPhysicalPointToContinuousIndex(segment.GetOrigin()))
    if np.any(np.abs(index - np.round(index)) > 1e-3):
        return None
    return tuple(int(v) for v in np.round(index))


def _paste(array: np.ndarray, offset_xyz: Sequence[int], shape: Tuple[int, ...]) -> np.ndarray:
    out = np.zeros(shape, np.uint8)
    offset = tuple(reversed(offset_xyz))  # numpy order (z, y, x)
    target, source = [], []
    for start, length, full in zip(offset, array.shape, shape):
        lo, hi = max(start, 0), min(start + length, full)
        if hi <= lo:
            return out
        target.append(slice(lo, hi))
        source.append(slice(lo - start, hi - start))
    out[tuple(target)] = array[tuple(source)] != 0
    return out


def _read_segments(seg_path: Path, name: str):
    from ..files.seg_nrrd import read_seg_nrrd  # imported here: only this layout needs it

    try:
        masks, _colors = read_seg_nrrd(seg_path)
    except SSAMError as error:
        raise SSAMError(" ".join(str(error).replace(str(seg_path), name).split())) from None
    except (RuntimeError, OSError, ValueError, KeyError) as error:
        raise SSAMError(f"cannot read {name}: {type(error).__name__}; save it again from Slicer") from None
    return masks


def _read_segnrrd_case(image_path: Path, seg_path: Path, names_by_key: Dict[str, str]):
    image = _read_image(image_path, str(image_path))
    arrays = _segments_on_grid(image, _read_segments(seg_path, str(seg_path)), str(image_path), str(seg_path))
    if isinstance(arrays, str):
        raise SSAMError(arrays + "; the files changed since the dataset was checked")
    found: Dict[str, np.ndarray] = {}
    for segment, array in arrays.items():
        name = names_by_key.get(label_key(segment))
        if name is not None:
            found[name] = array if name not in found else (found[name] | array)
    return image, found


def _segnrrd_dataset(root: Path, labels, problems: List[str], notes: List[str]) -> Dataset:
    files = _listdir(root)
    seg_files = [p for p in files if p.name.lower().endswith(".seg.nrrd")]
    segs = _index_by_case(root, [(strip_image_suffix(p.name), p) for p in seg_files], problems)
    images = _index_by_case(root, [(strip_image_suffix(p.name), p) for p in files if has_image_suffix(p)], problems)
    pairs = _pair_by_id(root, images, segs, lambda c: f"{c}.seg.nrrd", lambda c: f"{c}.nii.gz (or .nrrd, ...)",
                        problems)
    names_by_key: "OrderedDict[str, str]" = OrderedDict()
    kinds: set = set()
    present: Dict[str, set] = {}
    for pair in pairs:
        image_name, seg_name = _rel(root, pair.image), _rel(root, pair.mask)
        try:
            image = _read_image(pair.image, image_name, check_complete=True)
        except SSAMError as error:
            problems.append(str(error))
            image = None
        try:
            segments = _read_segments(pair.mask, seg_name)
        except SSAMError as error:
            problems.append(str(error))
            continue
        if not segments:
            problems.append(f"{seg_name} has no segments; add at least one in Slicer")
            continue
        for segment in segments:
            names_by_key.setdefault(label_key(segment), segment)
        if image is None:
            continue
        kinds.add(image_kind(image))
        arrays = _segments_on_grid(image, segments, image_name, seg_name)
        if isinstance(arrays, str):
            problems.append(arrays)
            continue
        present[pair.case_id] = {names_by_key[label_key(s)] for s, a in arrays.items() if a.any()}
    all_names = list(names_by_key.values())
    if pairs and not all_names and not problems:
        problems.append("no .seg.nrrd file has a segment; add the structures to train in Slicer")
    names = _select(all_names, labels, problems)
    if problems:
        raise DatasetProblems(root, problems)
    chosen = {label_key(name): name for name in names}
    cases = [Case(p.case_id, p.image, names, partial(_read_segnrrd_case, p.image, p.mask, chosen),
                  present[p.case_id] & set(names)) for p in pairs]
    return _finish(root, "segnrrd", names, cases, notes, kinds, all_names, labels)


# ---------------------------------------------------------------------------------------------------------------
# DICOM SEG files beside their source series folders


def _seg_files(root: Path) -> List[Path]:
    from ..files.dicom_seg import is_dicom_seg  # imported here: only this layout needs pydicom

    return [p for p in _listdir(root) if p.name.lower().endswith(".dcm") and is_dicom_seg(p)]


def _read_dicomseg_case(series_folder: Path, seg_path: Path, names_by_key: Dict[str, str]):
    from ..files.dicom_seg import read_dicom_seg
    from ..files.dicom_series import DicomSeries
    from ..files.image_io import read_image

    image = read_image(series_folder)
    found: Dict[str, np.ndarray] = {}
    for segment, mask in read_dicom_seg(seg_path, grid=image, source=DicomSeries.of_input(series_folder)).items():
        name = names_by_key.get(label_key(segment))
        if name is not None:
            array = sitk.GetArrayFromImage(mask)
            found[name] = array if name not in found else (found[name] | array)
    return image, found


def _dicomseg_dataset(root: Path, labels, problems: List[str], notes: List[str]) -> Dataset:
    from ..files.dicom_seg import read_dicom_seg, referenced_instances
    from ..files.dicom_series import DicomSeries
    from ..files.image_io import read_image

    series_of_instance: Dict[str, Path] = {}
    sources: Dict[Path, DicomSeries] = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        try:
            sources[folder] = DicomSeries.of_input(folder)
        except SSAMError:
            continue  # a folder without a DICOM series: not a case
        for uid in sources[folder].sop_instance_uids:
            series_of_instance[uid] = folder
    pairs: List[_Pair] = []
    paired = set()
    for seg_path in _seg_files(root):
        seg_name = _rel(root, seg_path)
        try:
            references = referenced_instances(seg_path)
        except Exception:  # a damaged header: pydicom raises many kinds
            problems.append(f"cannot read {seg_name} as a DICOM SEG; export it again")
            continue
        folders = {series_of_instance.get(uid) for uid in references}
        if not references or None in folders or len(folders) != 1:
            problems.append(f"{seg_name} references {len(references)} instances that are not all in one series "
                            f"folder here; put the folder of the series it was made on beside it")
            continue
        folder = folders.pop()
        pairs.append(_Pair(strip_image_suffix(seg_path.name), folder, seg_path))
        paired.add(folder)
    for folder in sources:
        if folder not in paired:
            problems.append(f"{_rel(root, folder)}/ has no DICOM SEG beside it; add its segmentation or move it out")
    if not pairs and not problems:
        problems.append("no DICOM SEG file (.dcm) found beside the series folders; export the segmentations first")
    names_by_key: "OrderedDict[str, str]" = OrderedDict()
    kinds: set = set()
    present: Dict[str, set] = {}
    for pair in pairs:
        seg_name = _rel(root, pair.mask)
        try:
            image = read_image(pair.image)
            masks = read_dicom_seg(pair.mask, grid=image, source=sources[pair.image])
        except SSAMError as error:
            problems.append(" ".join(str(error).replace(str(root) + "/", "").split()))
            continue
        if not masks:
            problems.append(f"{seg_name} has no segments; export it with its segments")
            continue
        for segment in masks:
            names_by_key.setdefault(label_key(segment), segment)
        kinds.add(image_kind(image))
        present[pair.case_id] = {names_by_key[label_key(s)] for s, m in masks.items()
                                 if sitk.GetArrayViewFromImage(m).any()}
    names = _select(list(names_by_key.values()), labels, problems)
    if problems:
        raise DatasetProblems(root, problems)
    chosen = {label_key(name): name for name in names}
    cases = [Case(p.case_id, p.image, names, partial(_read_dicomseg_case, p.image, p.mask, chosen),
                  present[p.case_id] & set(names)) for p in pairs]
    return _finish(root, "dicomseg", names, cases, notes, kinds, list(names_by_key.values()), labels)


# ---------------------------------------------------------------------------------------------------------------
# Public entry points


def detect_layout(root: Path) -> Optional[str]:
    """"nnunet", "folder2d", "segnrrd" or "dicomseg" from the folder's contents; None when it looks like none."""
    if any((root / name).exists() for name in ("dataset.json", "imagesTr", "labelsTr")):
        return "nnunet"
    if any((root / name).exists() for name in ("images", "masks", "labels.json")):
        return "folder2d"
    if any(p.name.lower().endswith(".seg.nrrd") for p in _listdir(root)):
        return "segnrrd"
    if _seg_files(root):
        return "dicomseg"
    return None


def open_dataset(path, labels=None) -> Dataset:
    """Detect the layout of the dataset folder `path`, check every case, and return the Dataset; or raise one
    DatasetProblems (an SSAMError) listing every problem found. `labels`: train only these label names."""
    root = Path(path).expanduser().absolute()
    if not root.is_dir():
        what = "is not a folder" if root.exists() else "does not exist"
        raise DatasetProblems(root, [f"{root} {what}; give the dataset folder"])
    layout = detect_layout(root)
    if layout is None:
        raise DatasetProblems(root, [
            "no known layout found: expected dataset.json + imagesTr/ + labelsTr/ (nnU-Net), images/ + masks/ + "
            "labels.json, images with .seg.nrrd segmentations beside them, or DICOM series folders with DICOM SEG "
            ".dcm files beside them"])
    problems: List[str] = []
    notes: List[str] = []
    if layout == "segnrrd":
        return _segnrrd_dataset(root, labels, problems, notes)
    if layout == "dicomseg":
        return _dicomseg_dataset(root, labels, problems, notes)
    found = _find_nnunet(root, problems, notes) if layout == "nnunet" else _find_folder2d(root, problems, notes)
    return _labelmap_dataset(root, layout, found, labels, problems, notes)


def _read_memory_case(image: sitk.Image, masks: Dict[str, object]):
    found = {}
    for name, mask in masks.items():
        array = sitk.GetArrayFromImage(mask) if isinstance(mask, sitk.Image) else np.asarray(mask)
        found[name] = (array != 0).view(np.uint8)
    return image, found


def _memory_mask_problem(case_id: str, image: sitk.Image, name: str, mask) -> Optional[str]:
    where = f"case {case_id!r}: mask {name!r}"
    if isinstance(mask, sitk.Image):
        if mask.GetNumberOfComponentsPerPixel() != 1:
            return f"{where} has {mask.GetNumberOfComponentsPerPixel()} components; give a scalar mask"
        return _geometry_problem(image, mask, "its image", where)
    array = np.asarray(mask)
    if array.shape != voxel_shape(image):
        return f"{where} is shaped {array.shape} but the image's voxels are {voxel_shape(image)}"
    if array.dtype.kind not in "biuf":
        return f"{where} has {array.dtype} values; give a numeric 0/1 mask"
    return None


def memory_dataset(cases, label_names=None) -> Dataset:
    """A dataset from (case_id, sitk.Image, {label name: sitk.Image or numpy array}) triples, checked like a folder:
    readable 2D/3D images, masks on the image's grid, unique case ids, at least one case and one label. A mask is
    the label where it is non-zero. `label_names`: train only these (default: every name, first-seen order)."""
    problems: List[str] = []
    kinds: set = set()
    checked = []
    names_by_key: "OrderedDict[str, str]" = OrderedDict()
    seen_ids = set()
    for index, item in enumerate(cases or []):
        try:
            case_id, image, masks = item
        except (TypeError, ValueError):
            problems.append(f"case {index + 1} is not (case id, image, masks)")
            continue
        case_id = str(case_id)
        if case_id in seen_ids:
            problems.append(f"case id {case_id!r} is used twice; give each case its own name")
            continue
        seen_ids.add(case_id)
        if not isinstance(image, sitk.Image):
            problems.append(f"case {case_id!r}: the image is a {type(image).__name__}, not a SimpleITK image")
            continue
        try:
            image = check_image(image, f"case {case_id!r}: the image")
        except SSAMError as error:
            problems.append(str(error))
            continue
        kinds.add(image_kind(image))
        if not isinstance(masks, dict) or not masks:
            problems.append(f"case {case_id!r} has no masks; give at least one segment")
            continue
        good: "OrderedDict[str, object]" = OrderedDict()
        present = set()
        for name, mask in masks.items():
            name = str(name).strip()
            problem = _memory_mask_problem(case_id, image, name, mask)
            if problem is None and label_key(name) in {label_key(n) for n in good}:
                problem = f"case {case_id!r} has two masks named {name!r}; merge or rename one"
            if problem is None and not name:
                problem = f"case {case_id!r} has a mask without a name; name every segment"
            if problem:
                problems.append(problem)
                continue
            label = names_by_key.setdefault(label_key(name), name)
            good[label] = mask
            array = sitk.GetArrayViewFromImage(mask) if isinstance(mask, sitk.Image) else np.asarray(mask)
            if np.any(array):
                present.add(label)
        checked.append((case_id, image, good, present))
    if not checked and not problems:
        problems.append("no cases given; pair at least one volume with its segmentation")
    all_names = list(names_by_key.values())
    names = _select(all_names, label_names, problems)
    if problems:
        raise DatasetProblems("in memory", problems)
    cases_out = [Case(case_id, None, names, partial(_read_memory_case, image, masks), present & set(names))
                 for case_id, image, masks, present in checked]
    return _finish(None, "memory", names, cases_out, [], kinds, all_names, label_names)


class CaseList(list):
    """A list of cases that remembers how it was split (for `split_record`)."""

    def __init__(self, cases=(), seed: Optional[int] = None, val_fraction: Optional[float] = None):
        super().__init__(cases)
        self.seed = seed
        self.val_fraction = val_fraction


def _split_rank(case_id: str, seed: int) -> str:
    # A hash, not a shuffled list: the same on every platform and Python version, and adding a case to the
    # dataset moves no other case between the sides.
    return hashlib.sha256(f"{seed}\0{case_id}".encode("utf-8")).hexdigest()


def split_cases(cases, val_fraction: float = 0.2, seed: int = 0) -> Tuple[CaseList, CaseList]:
    """Split by case (never by slice) into (train, val), deterministic for a seed and independent of the input order.
    Validation gets round(n * val_fraction) cases, at least one when val_fraction > 0 and n >= 2, never all; with a
    single case it is empty (the caller says so). Both lists keep the input order."""
    cases = list(getattr(cases, "cases", cases))
    try:
        val_fraction = float(val_fraction)
    except (TypeError, ValueError):
        raise SSAMError(f"validation fraction {val_fraction!r} is not a number; give one from 0 to 0.9") from None
    if not 0.0 <= val_fraction < 1.0:
        raise SSAMError(f"validation fraction {val_fraction:g} is outside 0 .. <1; give e.g. 0.2")
    ids = [case.case_id for case in cases]
    if len(set(ids)) != len(ids):
        twice = sorted({i for i in ids if ids.count(i) > 1})
        raise SSAMError(f"case ids {', '.join(twice[:5])} appear twice; a split needs unique case ids")
    count = len(cases)
    n_val = 0
    if val_fraction > 0 and count >= 2:
        n_val = min(count - 1, max(1, int(count * val_fraction + 0.5)))
    val_ids = set(sorted(ids, key=lambda i: _split_rank(i, seed))[:n_val])
    train = CaseList([c for c in cases if c.case_id not in val_ids], seed, val_fraction)
    val = CaseList([c for c in cases if c.case_id in val_ids], seed, val_fraction)
    return train, val


def split_record(train, val, seed: Optional[int] = None, val_fraction: Optional[float] = None) -> dict:
    """The split as JSON-ready metadata for the adapter: case ids of each side, seed and fraction (taken from the
    lists `split_cases` returned unless given)."""
    return {
        "train": [case.case_id for case in train],
        "val": [case.case_id for case in val],
        "seed": seed if seed is not None else getattr(train, "seed", None),
        "val_fraction": val_fraction if val_fraction is not None else getattr(train, "val_fraction", None),
    }


def combine_datasets(datasets: Sequence[Dataset]) -> Dataset:
    """One dataset from several (`ssam train CT_DATA POLYP_DATA ...`): the label names are the union (matched with
    label_key, the first spelling kept). Each case keeps `annotated`, the labels its own dataset annotates (training
    and validation use only those), and `source`, its dataset's folder name, which also prefixes its id.
    A label another dataset annotates is trained as empty on a case (`absent`) only where absence is certain: no
    dataset annotating the label has images of the case's kind (3D, 2D grey, 2D RGB; there is no polyp in a CT, no
    liver in a colonoscopy). Between datasets of the same kind nothing is assumed: GlaS images are full of nuclei
    that GlaS does not annotate, and two CT datasets may annotate different organs."""
    datasets = list(datasets)
    if len(datasets) == 1:
        return datasets[0]
    names: "OrderedDict[str, str]" = OrderedDict()
    kinds_of_label: dict = {}
    for dataset in datasets:
        for name in dataset.label_names:
            key = label_key(name)
            names.setdefault(key, name)
            kinds_of_label.setdefault(key, set()).update(dataset.image_kinds)
    union = list(names.values())
    cases, notes, kinds = [], [], []
    for number, dataset in enumerate(datasets):
        prefix = dataset.root.name if dataset.root is not None else f"memory{number}"
        own = {label_key(n) for n in dataset.label_names}
        # unknown kinds (an empty list) certify nothing
        absent = {names[key] for key, label_kinds in kinds_of_label.items()
                  if key not in own and dataset.image_kinds and label_kinds
                  and not label_kinds & set(dataset.image_kinds)}
        for case in dataset.cases:
            def read(case=case):
                image, masks = case.load()
                return image, {names[label_key(name)]: mask for name, mask in masks.items()}

            combined = Case(f"{prefix}/{case.case_id}", case.image_path, union, read,
                            {names[label_key(n)] for n in case.present_labels},
                            annotated={names[label_key(n)] for n in dataset.label_names}, source=prefix,
                            absent=absent)
            cases.append(combined)
        notes += [f"{prefix}: {note}" for note in dataset.notes]
        kinds += dataset.image_kinds
    return Dataset(None, "combined", union, cases, notes, kinds, kinds_of_label)
