"""Evaluating segmentations against references: Dice (both readings), IoU and HD95 per label, per case and on average.

    report = evaluate("predictions/", "labelsTs/", label_map="dataset.json")   # or two files
    print(format_table(report)); write_report(report, "results/eval")        # results/eval.json + .csv

Metrics are computed per label on the image's own grid, with its spacing (masks must share the grid exactly):
- dice: 2|P∩T| / (|P|+|T|), and 1 when prediction and truth are both blank, the S-SAM paper's convention (Rahman et
  al.): "this label is absent" answered correctly is a success. Averaged over every (case, label).
- dice_classic: the same ratio, undefined (None) when the truth is blank; averaged over non-blank truths only.
- iou: |P∩T| / |P∪T|, 1 when both are blank (the same convention as dice).
- hd95_mm: the 95th percentile Hausdorff distance in mm between the two surfaces (voxels of a mask with a
  face-neighbour outside it; the image border counts as outside): the larger of the two directed 95th percentiles
  of centre-to-centre distances, from SimpleITK distance maps computed with the voxel spacing. None (never inf or
  NaN) when either mask is blank; averaged over the cases where it is defined.

Inputs: a .seg.nrrd or a DICOM SEG .dcm (segment names are the labels) or a label map (NIfTI, NRRD, MHA...) whose values are named by,
in this order: its JSON sidecar (case.json beside case.nii.gz, as `writers.write_label_map` writes it), the
`label_map` given (a JSON file, optionally FILE.json:GROUP for a file with several groups, or NAME=VALUE strings), or
else the values themselves ("1", "2", ...). Labels match by name regardless of case and '_' vs ' '.
A DICOM SEG stores only the frames with foreground, so it is put onto the other side's grid (two SEGs: onto the
grid that covers both) before comparing, without resampling (dicom_seg.place_masks).
"""

import csv
import io
import json
import math
import os
import textwrap
from collections import OrderedDict
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from ..files.atomic_file import add_overwrite_argument, atomic_output, check_outputs, output_set
from .datasets import _label_values, _LabelSpec, _parse_label_mapping
from ..errors import SSAMError
from ..files.image_io import has_image_suffix, read_image, same_geometry, strip_image_suffix
from ..files.seg_nrrd import check_masks, mask_array, read_seg_nrrd
from ..model.labels import label_key
from ..files.writers import sidecar_path

METRICS = ("dice", "dice_classic", "iou", "hd95_mm")
CONVENTIONS = (
    "Dice: blank prediction vs blank truth = 1 (Rahman et al., the S-SAM paper); Dice*: classic Dice, undefined "
    "('-') for a blank truth and averaged over non-blank truths only; IoU: blank vs blank = 1; HD95 in mm, "
    "undefined ('-') when either mask is blank."
)
# When a case has several files (a result and its PNG preview), the most segmentation-like one is the case.
_CASE_FILE_PRIORITY = ((".seg.nrrd",), (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd"),
                       (".png", ".tif", ".tiff", ".bmp", ".jpg", ".jpeg", ".dcm"))


# ------------------------------------------------------------------------------------------------------ metrics
def _surface(mask: np.ndarray) -> np.ndarray:
    """Voxels of a boolean mask with a face-neighbour outside it; outside the array counts as outside."""
    inner = mask.copy()
    for axis in range(mask.ndim):
        length = mask.shape[axis]
        lower = [slice(None)] * mask.ndim
        upper = [slice(None)] * mask.ndim
        lower[axis], upper[axis] = slice(0, length - 1), slice(1, length)
        inner[tuple(upper)] &= mask[tuple(lower)]
        inner[tuple(lower)] &= mask[tuple(upper)]
        for index in (0, length - 1):
            edge = [slice(None)] * mask.ndim
            edge[axis] = index
            inner[tuple(edge)] = False
    return mask & ~inner


def _bounding_box(mask: np.ndarray) -> Tuple[slice, ...]:
    box = []
    for axis in range(mask.ndim):
        hits = np.flatnonzero(np.any(mask, axis=tuple(a for a in range(mask.ndim) if a != axis)))
        box.append(slice(int(hits[0]), int(hits[-1]) + 1))
    return tuple(box)


def _distances_to(surface: np.ndarray, points: np.ndarray, spacing_zyx) -> np.ndarray:
    """Distance in mm from each voxel of `points` (boolean) to the nearest voxel of `surface` (centre to centre)."""
    image = sitk.GetImageFromArray(surface.view(np.uint8))
    image.SetSpacing([float(v) for v in reversed(spacing_zyx)])
    distance = sitk.SignedMaurerDistanceMap(image, insideIsPositive=False, squaredDistance=False,
                                            useImageSpacing=True)
    return np.maximum(sitk.GetArrayViewFromImage(distance)[points], 0.0)  # surface voxels themselves read -0


def hd95(prediction: np.ndarray, reference: np.ndarray, spacing_zyx) -> Optional[float]:
    """95th percentile symmetric Hausdorff distance (mm) between two boolean masks; None if either is blank."""
    if not prediction.any() or not reference.any():
        return None
    # Only the box holding both masks matters: every surface voxel and its nearest neighbour on the other surface
    # lie inside it, and whatever is outside it is background for both, as the surfaces assume.
    box = _bounding_box(prediction | reference)
    surface_p, surface_t = _surface(prediction[box]), _surface(reference[box])
    forward = _distances_to(surface_t, surface_p, spacing_zyx)
    backward = _distances_to(surface_p, surface_t, spacing_zyx)
    return float(max(np.percentile(forward, 95), np.percentile(backward, 95)))


def label_metrics(prediction: np.ndarray, reference: np.ndarray, spacing_zyx) -> Dict[str, object]:
    """The metrics of one label (masks as 0/1 or boolean arrays on one grid, spacing in numpy axis order)."""
    p = prediction.astype(bool, copy=False)
    t = reference.astype(bool, copy=False)
    predicted, true = int(np.count_nonzero(p)), int(np.count_nonzero(t))
    overlap = int(np.count_nonzero(p & t)) if predicted and true else 0
    union = predicted + true - overlap
    ratio = 2.0 * overlap / (predicted + true) if predicted + true else 1.0
    return OrderedDict(
        dice=ratio,
        dice_classic=ratio if true else None,
        iou=overlap / union if union else 1.0,
        hd95_mm=hd95(p, t, spacing_zyx),
        prediction_voxels=predicted,
        reference_voxels=true,
    )


# --------------------------------------------------------------------------------------------------- one case
def _as_2d(image: sitk.Image) -> sitk.Image:
    return image[:, :, 0] if image.GetDimension() == 3 and image.GetSize()[2] == 1 else image


def _describe_grid(image: sitk.Image) -> str:
    size = "x".join(str(v) for v in image.GetSize())
    spacing = "x".join(f"{v:.4g}" for v in image.GetSpacing())
    origin = ", ".join(f"{v:.4g}" for v in image.GetOrigin())
    return f"size {size}, spacing {spacing}, origin ({origin})"


def evaluate_case(prediction_masks, reference_masks) -> Dict[str, object]:
    """Metrics of every predicted label against the reference masks of the same case.

    Both are mask sets (label name -> uint8 image) on the same grid (a 2D grid also matches a one-slice 3D one).
    Labels are the prediction's (what was asked for); a label missing from the reference counts as a blank truth
    and is listed under "not_in_reference"; reference labels with foreground that were not predicted are listed
    under "not_predicted". Returns {"labels": {name: metrics}, "not_in_reference": [...], "not_predicted": [...]}.
    """
    first_prediction = check_masks(prediction_masks)
    first_reference = check_masks(reference_masks)
    if first_prediction.GetDimension() != first_reference.GetDimension():
        first_prediction, first_reference = _as_2d(first_prediction), _as_2d(first_reference)
    if not same_geometry(first_prediction, first_reference):
        raise SSAMError(f"prediction ({_describe_grid(first_prediction)}) and reference "
                        f"({_describe_grid(first_reference)}) are on different grids; compare masks computed on the "
                        f"same image")
    reference_by_key = OrderedDict((label_key(name), name) for name in reference_masks)
    spacing_zyx = tuple(reversed(first_reference.GetSpacing()))
    shape = tuple(reversed(first_reference.GetSize()))
    labels: "OrderedDict[str, dict]" = OrderedDict()
    not_in_reference = []
    for name, mask in prediction_masks.items():
        predicted = mask_array(mask).reshape(shape)
        reference_name = reference_by_key.get(label_key(name))
        if reference_name is None:
            not_in_reference.append(name)
            truth = np.zeros(shape, np.uint8)
        else:
            truth = mask_array(reference_masks[reference_name]).reshape(shape)
        labels[name] = label_metrics(predicted, truth, spacing_zyx)
    predicted_keys = {label_key(name) for name in prediction_masks}
    not_predicted = [name for key, name in reference_by_key.items()
                     if key not in predicted_keys and np.any(mask_array(reference_masks[name]))]
    return OrderedDict(labels=labels, not_in_reference=not_in_reference, not_predicted=not_predicted)


# ------------------------------------------------------------------------------------------------ reading files
def _mapping_from_json(text: str) -> dict:
    """'labels.json' or 'labels.json:GROUP' -> the value/name mapping in it."""
    path, group = Path(text).expanduser(), None
    if not path.is_file() and ":" in text and text.rsplit(":", 1)[0].lower().endswith(".json"):
        path, group = Path(text.rsplit(":", 1)[0]).expanduser(), text.rsplit(":", 1)[1]
    if not path.is_file():
        raise SSAMError(f"label map file {path} does not exist; give a JSON file or NAME=VALUE entries")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        reason = getattr(error, "msg", None) or getattr(error, "strerror", None) or type(error).__name__
        raise SSAMError(f"cannot read the label map {path} ({reason}); fix the JSON") from None
    if not isinstance(data, dict):
        raise SSAMError(f"label map {path} is not a JSON object; write {{\"1\": \"liver\"}} or {{\"liver\": 1}}")
    if group is not None:
        if not isinstance(data.get(group), dict):
            groups = [k for k, v in data.items() if isinstance(v, dict)]
            raise SSAMError(f"label map {path} has no group {group!r}; choose one of: {', '.join(groups) or 'none'}")
        return data[group]
    if isinstance(data.get("labels"), dict):  # MSD / nnU-Net dataset.json
        return data["labels"]
    groups = [k for k, v in data.items() if isinstance(v, dict)]
    if groups and len(groups) == len(data):
        raise SSAMError(f"label map {path} holds several groups ({', '.join(groups[:5])}); "
                        f"choose one as {path.name}:{groups[0]}")
    return data


def label_mapping(label_map) -> Optional[dict]:
    """A label map given as a dict, a JSON file name (FILE.json or FILE.json:GROUP) or a list of such files and
    NAME=VALUE strings (VALUE may be V1,V2 for a region made of several values) -> one mapping, or None."""
    if label_map is None or isinstance(label_map, dict):
        return label_map
    entries = [label_map] if isinstance(label_map, (str, os.PathLike)) else list(label_map)
    mapping: dict = {}
    for entry in entries:
        text = str(entry).strip()
        if "=" in text and not text.lower().endswith(".json"):
            name, _, value = text.rpartition("=")
            values = [v.strip() for v in value.split(",")]
            if not name.strip() or not all(v.lstrip("-").isdigit() for v in values):
                raise SSAMError(f"label map entry {text!r} is not NAME=VALUE; write e.g. liver=1 or kidney=2,3")
            mapping[name.strip()] = [int(v) for v in values] if len(values) > 1 else int(values[0])
        else:
            mapping.update(_mapping_from_json(text))
    return mapping


def _label_specs(mapping: dict, source: str) -> List[_LabelSpec]:
    problems: List[str] = []
    specs, _allowed = _parse_label_mapping(mapping, source, problems, [])
    if problems:
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        raise SSAMError(problems[0] + more)
    return specs


def _read_label_file(path: Path, label_map) -> Tuple[sitk.Image, np.ndarray, List[_LabelSpec], np.ndarray]:
    """A label map file -> (its image, voxel array, named labels, the non-zero values present)."""
    image = read_image(path)
    if image.GetNumberOfComponentsPerPixel() > 1:  # an RGB mask: its first channel
        image = sitk.VectorIndexSelectionCast(image, 0)
    array = sitk.GetArrayViewFromImage(image)
    present = _label_values(array, str(path))
    present = present[present != 0]
    sidecar = sidecar_path(path)
    specs = None
    if sidecar.is_file():
        try:
            specs = _label_specs(label_mapping(str(sidecar)), str(sidecar))
        except SSAMError as error:  # a JSON of another kind (e.g. a BIDS sidecar): the label map given decides
            if label_map is None:
                raise SSAMError(f"{error} (or name the values with --label-map)") from None
    if specs is None and label_map is not None:
        specs = _label_specs(label_mapping(label_map), "the label map")
    if specs is None:
        specs = [_LabelSpec(str(int(value)), [int(value)]) for value in present]
    return image, array, specs, present


def _masks_from_specs(image: sitk.Image, array: np.ndarray, specs: Sequence[_LabelSpec]):
    masks: "OrderedDict[str, sitk.Image]" = OrderedDict()
    for spec in specs:
        mask = sitk.GetImageFromArray(spec.mask(array))
        mask.CopyInformation(image)
        masks[spec.name] = mask
    return masks


def _is_segmentation_file(path: Path) -> bool:
    return path.name.lower().endswith(".seg.nrrd")


def _is_dicom_seg_file(path: Path) -> bool:
    if not path.name.lower().endswith(".dcm"):
        return False
    from ..files.dicom_seg import is_dicom_seg  # imported here: only DICOM SEG inputs need pydicom

    return is_dicom_seg(path)


def load_masks(path, label_map=None, labels: Optional[Sequence[str]] = None) -> "OrderedDict[str, sitk.Image]":
    """Read a .seg.nrrd, a DICOM SEG or a label map file into a mask set (label name -> uint8 0/1 image); a DICOM
    SEG's masks are on its own span of frames.

    label_map (for label map files without a JSON sidecar): a JSON file, NAME=VALUE strings or a dict. labels: keep
    only these (matched regardless of case), e.g. the labels of a prediction, so a 100-label reference does not
    become 100 volumes in memory.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise SSAMError(f"{path} does not exist or is not a file; give a .seg.nrrd or a label map file")
    wanted = None if labels is None else {label_key(name) for name in labels}
    if _is_segmentation_file(path) or _is_dicom_seg_file(path):
        if _is_dicom_seg_file(path):
            from ..files.dicom_seg import read_dicom_seg

            masks = read_dicom_seg(path)  # on the SEG's own span of frames: evaluate() places it
        else:
            masks, _colors = read_seg_nrrd(path)
        if wanted is not None:
            masks = OrderedDict((name, mask) for name, mask in masks.items() if label_key(name) in wanted)
        return masks
    if not has_image_suffix(path):
        raise SSAMError(f"{path.name} is neither a .seg.nrrd nor a label map image; give NIfTI, NRRD, MHA or "
                        f".seg.nrrd files")
    image, array, specs, _present = _read_label_file(path, label_map)
    if wanted is not None:
        specs = [spec for spec in specs if label_key(spec.name) in wanted]
    return _masks_from_specs(image, array, specs)


def _reference_masks(path: Path, label_map, prediction_names: Sequence[str]):
    """The reference's masks for the predicted labels (one blank mask on its grid when it has none of them), and the
    names of its other labels that hold foreground."""
    wanted = {label_key(name) for name in prediction_names}
    if _is_segmentation_file(path) or _is_dicom_seg_file(path):
        masks = load_masks(path)
        if not masks:
            raise SSAMError(f"{path} has no segments; save the reference with its segments")
        other = [name for name, mask in masks.items() if label_key(name) not in wanted and np.any(mask_array(mask))]
        kept = OrderedDict((name, mask) for name, mask in masks.items() if label_key(name) in wanted)
        grid = next(iter(masks.values()))
    else:
        if not has_image_suffix(path):
            raise SSAMError(f"{path.name} is neither a .seg.nrrd nor a label map image; give NIfTI, NRRD, MHA or "
                            f".seg.nrrd files")
        grid, array, specs, present = _read_label_file(path, label_map)
        present = set(int(v) for v in present)
        other = [spec.name for spec in specs if label_key(spec.name) not in wanted and present & set(spec.values)]
        kept = _masks_from_specs(grid, array, [spec for spec in specs if label_key(spec.name) in wanted])
    if not kept:
        blank = sitk.Image(grid.GetSize(), sitk.sitkUInt8)
        blank.CopyInformation(grid)
        kept = OrderedDict([("(none of the predicted labels)", blank)])
    return kept, other


# ------------------------------------------------------------------------------------------------ whole reports
def _case_files(folder: Path) -> "OrderedDict[str, Path]":
    by_case: Dict[str, List[Path]] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or not path.is_file():
            continue
        if _is_segmentation_file(path) or has_image_suffix(path):
            by_case.setdefault(strip_image_suffix(path.name), []).append(path)
    chosen: "OrderedDict[str, Path]" = OrderedDict()
    for case, paths in sorted(by_case.items()):
        dicom_segs = [p for p in paths if _is_dicom_seg_file(p)]
        if dicom_segs:  # a DICOM SEG is the case's segmentation, like a .seg.nrrd
            paths = dicom_segs + [p for p in paths if _is_segmentation_file(p)]
            if len(paths) > 1:
                names = ", ".join(p.name for p in paths)
                raise SSAMError(f"case {case!r} has several segmentations in {folder} ({names}); keep one per case")
        for suffixes in _CASE_FILE_PRIORITY:
            candidates = [p for p in paths if p.name.lower().endswith(suffixes) and
                          not (suffixes != (".seg.nrrd",) and _is_segmentation_file(p))]
            if len(candidates) == 1:
                chosen[case] = candidates[0]
                break
            if len(candidates) > 1:
                names = ", ".join(p.name for p in candidates)
                raise SSAMError(f"case {case!r} has several files in {folder} ({names}); keep one per case")
    return chosen


def _mean(values) -> Optional[float]:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def summarize_metrics(rows: Sequence[dict]) -> dict:
    """Means of label_metrics rows (one per case and label, or per slice): each metric averaged over the rows where it
    is defined, with how many those were."""
    return OrderedDict(
        cases=len(rows),
        dice=_mean(r["dice"] for r in rows),
        dice_classic=_mean(r["dice_classic"] for r in rows),
        dice_classic_cases=sum(r["dice_classic"] is not None for r in rows),
        iou=_mean(r["iou"] for r in rows),
        hd95_mm=_mean(r["hd95_mm"] for r in rows),
        hd95_cases=sum(r["hd95_mm"] is not None for r in rows),
    )


def _on_one_grid(prediction, reference, prediction_is_dicom_seg: bool, reference_is_dicom_seg: bool):
    """Put DICOM SEG masks (stored on the span of their frames) on the other side's grid, or both SEGs on the grid
    that covers both; other mask sets are left as they are (evaluate_case checks their grids)."""
    if not (prediction_is_dicom_seg or reference_is_dicom_seg):
        return prediction, reference
    from ..files.dicom_seg import common_grid, place_masks

    first_prediction, first_reference = next(iter(prediction.values())), next(iter(reference.values()))
    if same_geometry(first_prediction, first_reference):
        return prediction, reference
    if prediction_is_dicom_seg and reference_is_dicom_seg:
        grid = common_grid(first_reference, first_prediction)
    else:
        grid = first_reference if prediction_is_dicom_seg else first_prediction
    if prediction_is_dicom_seg:
        prediction = place_masks(prediction, grid, "the predicted DICOM SEG")
    if reference_is_dicom_seg:
        reference = place_masks(reference, grid, "the reference DICOM SEG")
    return prediction, reference


def evaluate(prediction, reference, label_map=None) -> dict:
    """Evaluate a prediction file against a reference file, or every case of a prediction folder against the
    reference folder's case of the same name (file name without its suffix: case_01.seg.nrrd <-> case_01.nii.gz).

    Returns a report: {"prediction", "reference", "conventions", "cases": [{"case", "prediction", "reference",
    "labels": {label: metrics}, "not_in_reference", "not_predicted"}], "unmatched": {"prediction_only",
    "reference_only"}, "summary": {label: means}, "overall": means over every (case, label)}.
    """
    prediction, reference = Path(prediction).expanduser(), Path(reference).expanduser()
    for what, path in (("prediction", prediction), ("reference", reference)):
        if not path.exists():
            raise SSAMError(f"{what} {path} does not exist; check the path")
    if prediction.is_dir() != reference.is_dir():
        raise SSAMError(f"give two files or two folders (prediction {prediction} is a "
                        f"{'folder' if prediction.is_dir() else 'file'}, reference {reference} is a "
                        f"{'folder' if reference.is_dir() else 'file'})")
    unmatched = OrderedDict(prediction_only=[], reference_only=[])
    if prediction.is_dir():
        predicted, referenced = _case_files(prediction), _case_files(reference)
        pairs = [(case, path, referenced[case]) for case, path in predicted.items() if case in referenced]
        unmatched["prediction_only"] = [case for case in predicted if case not in referenced]
        unmatched["reference_only"] = [case for case in referenced if case not in predicted]
        if not pairs:
            raise SSAMError(
                f"no case of {prediction} ({', '.join(list(predicted)[:3]) or 'no segmentation files'}) has a "
                f"reference of the same name in {reference} ({', '.join(list(referenced)[:3]) or 'none'}); "
                f"name predictions like their references")
    else:
        pairs = [(strip_image_suffix(prediction.name), prediction, reference)]

    cases = []
    for case, prediction_path, reference_path in pairs:
        predicted_masks = load_masks(prediction_path, label_map)
        if not predicted_masks:
            raise SSAMError(f"{prediction_path} has no labels to evaluate; give a segmentation with at least one label")
        reference_masks, other = _reference_masks(reference_path, label_map, list(predicted_masks))
        try:
            predicted_masks, reference_masks = _on_one_grid(predicted_masks, reference_masks,
                                                            _is_dicom_seg_file(prediction_path),
                                                            _is_dicom_seg_file(reference_path))
            result = evaluate_case(predicted_masks, reference_masks)
        except SSAMError as error:
            raise SSAMError(f"case {case!r}: {error}") from None
        result["not_predicted"] = other
        cases.append(OrderedDict([("case", case), ("prediction", str(prediction_path)),
                                  ("reference", str(reference_path))] + list(result.items())))

    by_label: "OrderedDict[str, List[dict]]" = OrderedDict()
    names: Dict[str, str] = {}
    for case in cases:
        for label, metrics in case["labels"].items():
            key = names.setdefault(label_key(label), label)
            by_label.setdefault(key, []).append(metrics)
    return OrderedDict(
        prediction=str(prediction), reference=str(reference), conventions=CONVENTIONS, cases=cases,
        unmatched=unmatched,
        summary=OrderedDict((label, summarize_metrics(rows)) for label, rows in by_label.items()),
        overall=summarize_metrics([m for rows in by_label.values() for m in rows]),
    )


# ------------------------------------------------------------------------------------------------------ output
def _number(value, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def format_table(report: dict) -> str:
    """A plain-text table: one row per case and label, then the mean of each metric per label (and over all)."""
    header = ["case", "label", "Dice", "Dice*", "IoU", "HD95 mm", "pred voxels", "ref voxels"]
    rows = []
    for case in report["cases"]:
        for label, m in case["labels"].items():
            rows.append([case["case"], label, _number(m["dice"]), _number(m["dice_classic"]), _number(m["iou"]),
                         _number(m["hd95_mm"], 2), str(m["prediction_voxels"]), str(m["reference_voxels"])])
    summary_rows = []
    for label, s in list(report["summary"].items()) + [("(all labels)", report["overall"])]:
        summary_rows.append([f"mean of {s['cases']}", label, _number(s["dice"]),
                             f"{_number(s['dice_classic'])} ({s['dice_classic_cases']})", _number(s["iou"]),
                             f"{_number(s['hd95_mm'], 2)} ({s['hd95_cases']})", "", ""])
    widths = [max(len(r[i]) for r in [header] + rows + summary_rows) for i in range(len(header))]

    def line(cells):
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    rule = "-" * len(line(header))
    out = [line(header), rule] + [line(r) for r in rows] + [rule] + [line(r) for r in summary_rows]
    out.append("")
    out += textwrap.wrap(report.get("conventions", CONVENTIONS) + " Means: (n) = cases where the metric is defined.",
                         width=max(100, len(rule)))
    for case in report["cases"]:
        if case["not_in_reference"]:
            out.append(f"{case['case']}: not in the reference (scored as blank truth): "
                       f"{', '.join(case['not_in_reference'])}")
        if case["not_predicted"]:
            out.append(f"{case['case']}: reference labels not predicted (not scored): "
                       f"{', '.join(case['not_predicted'][:10])}"
                       + (f" and {len(case['not_predicted']) - 10} more" if len(case["not_predicted"]) > 10 else ""))
    for what, cases in report["unmatched"].items():
        if cases:
            side = "predictions without a reference" if what == "prediction_only" else "references without a prediction"
            out.append(f"{side} ({len(cases)}): {', '.join(cases[:10])}" + (" ..." if len(cases) > 10 else ""))
    return "\n".join(out)


def _report_paths(output_dir_or_prefix) -> Tuple[Path, Path]:
    text = str(output_dir_or_prefix)
    target = Path(text).expanduser()
    if target.is_dir() or text.endswith(("/", os.sep)):
        return target / "evaluation.json", target / "evaluation.csv"
    if target.suffix.lower() in (".json", ".csv"):
        target = target.with_suffix("")
    return target.with_name(target.name + ".json"), target.with_name(target.name + ".csv")


def write_report(report: dict, output_dir_or_prefix) -> List[Path]:
    """Write the report as JSON (everything) and CSV (one row per case and label, then per-label means).
    A folder gets evaluation.json and evaluation.csv; anything else is a prefix: PREFIX.json, PREFIX.csv."""
    json_path, csv_path = _report_paths(output_dir_or_prefix)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["case", "label", *METRICS, "prediction_voxels", "reference_voxels"])

    def cell(value):
        return "" if value is None else (f"{value:.6g}" if isinstance(value, float) else value)

    for case in report["cases"]:
        for label, m in case["labels"].items():
            writer.writerow([case["case"], label] + [cell(m[k]) for k in METRICS]
                            + [m["prediction_voxels"], m["reference_voxels"]])
    for label, s in list(report["summary"].items()) + [("(all labels)", report["overall"])]:
        writer.writerow(["mean", label] + [cell(s[k]) for k in METRICS] + ["", ""])
    with output_set():  # both files or neither
        with atomic_output(json_path, ".json") as temporary:
            temporary.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        with atomic_output(csv_path, ".csv") as temporary:
            temporary.write_text(buffer.getvalue(), encoding="utf-8")
    return [json_path, csv_path]


# ------------------------------------------------------------------------------------------------------ command
def add_arguments(parser) -> None:
    """Arguments of `ssam evaluate PREDICTION REFERENCE [--label-map FILE_OR_NAME=VALUE ...] [--output PREFIX]`."""
    parser.add_argument("prediction", help="a .seg.nrrd, DICOM SEG (.dcm) or label map file, or a folder of them "
                                           "(one per case)")
    parser.add_argument("reference", help="the reference file, or a folder whose files have the same case names")
    parser.add_argument("--label-map", nargs="+", action="extend", metavar="FILE_OR_NAME=VALUE",
                        help="names of label map values, for label maps without a JSON sidecar: a JSON file "
                             "({\"1\": \"liver\"}; FILE.json:GROUP picks a group) and/or NAME=VALUE entries "
                             "(kidney=2,3 joins values); put it after PREDICTION and REFERENCE")
    parser.add_argument("--output", metavar="PREFIX",
                        help="also write PREFIX.json and PREFIX.csv (a folder gets evaluation.json/.csv)")
    add_overwrite_argument(parser)


def run(args) -> int:
    """Evaluate, print the table, write JSON and CSV when --output is given. Problems raise SSAMError."""
    if args.output:
        label_files = [entry.rsplit(":", 1)[0] for entry in args.label_map or []]  # FILE.json[:GROUP]
        check_outputs(_report_paths(args.output), inputs=[args.prediction, args.reference, *label_files],
                      overwrite=args.overwrite)
    report = evaluate(args.prediction, args.reference, label_map=args.label_map)
    print(format_table(report))
    if args.output:
        for path in write_report(report, args.output):
            print(f"wrote {path}")
    return 0
