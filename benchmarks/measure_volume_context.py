"""3D consistency (SSAMSegmentLib/inference/volume_context.py) against each slice alone, on real CT with references.

    python benchmarks/measure_volume_context.py /path/to/shared/data

The shipped default adapter segments liver, spleen and kidney once per volume (the slice loop runs once); the same
logits then become masks with each volume-context setting, so every row differs only in the post-processing. For
each setting: volume Dice, false-positive slices (predicted voxels on a slice whose reference is empty: the
"noise between slices") and false-positive volume in mL, per label and case; and the post-processing time as a share
of the slice loop's time in the same run. The TotalSegmentator references are that model's predictions, the dcmqi
liver is manual; example_ct_sm was among the default adapter's training images (marked "train"), the others were
not. Writes the "volume-context" section of docs/benchmarks.md.
"""

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common  # noqa: E402  (sets up the environment before torch loads)

import json  # noqa: E402

import SimpleITK as sitk  # noqa: E402

import SSAMSegmentLib  # noqa: E402
from SSAMSegmentLib.files.image_io import read_image  # noqa: E402
from SSAMSegmentLib.inference.slice_inference import check_threshold, masks_from_logits, slice_logits  # noqa: E402
from SSAMSegmentLib.inference.volume_context import VolumeContext  # noqa: E402

LABELS = {"liver": ("liver",), "spleen": ("spleen",), "kidney": ("kidney_right", "kidney_left")}
SETTINGS = {
    "slices alone": VolumeContext(),
    "smooth 1 mm": VolumeContext(smoothing_mm=1.0),
    "smooth 2 mm": VolumeContext(smoothing_mm=2.0),
    "smooth 3 mm": VolumeContext(smoothing_mm=3.0),
    "components < 1 mL": VolumeContext(min_component_ml=1.0),
    "components < 5 mL": VolumeContext(min_component_ml=5.0),
    "smooth 2 mm + < 1 mL": VolumeContext(2.0, 1.0),
    "smooth 2 mm + < 5 mL": VolumeContext(2.0, 5.0),
    "smooth 2 mm + < 1 mL + largest liver, spleen": VolumeContext(2.0, 1.0, frozenset({"liver", "spleen"})),
}


def _on_grid(reference: sitk.Image, image: sitk.Image) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.Resample(reference, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0))


CASES = ("dicom", "small", "dcmqi")


def cases(data: Path, chosen=CASES):
    folder = data / "totalsegmentator-ct"
    names = json.loads((folder / "labels.json").read_text())["total"]
    values = {name: int(value) for value, name in names.items()}
    for key, name, image_file, seg_file, note in (
            ("dicom", "TotalSegmentator DICOM", "example_ct_dicom", "example_seg_dicom.nii.gz", ""),
            ("small", "TotalSegmentator small", "example_ct_sm.nii.gz", "example_seg.nii.gz", " (train)")):
        if key not in chosen:
            continue
        image = read_image(folder / image_file)
        seg = _on_grid(sitk.ReadImage(str(folder / seg_file)), image)
        references = {label: np.isin(seg, [values[p] for p in parts]) for label, parts in LABELS.items()}
        yield name + note, image, references
    if "dcmqi" not in chosen:
        return
    dcmqi = data / "dcmqi-ct-3slice"
    image = read_image(dcmqi)
    yield "dcmqi (manual liver)", image, {"liver": _on_grid(sitk.ReadImage(str(dcmqi / "liver_seg.nrrd")), image) > 0}


def scores(predicted: np.ndarray, reference: np.ndarray, axis: int, voxel_ml: float):
    dice = 2 * np.count_nonzero(predicted & reference) / max(1, predicted.sum() + reference.sum())
    other = tuple(a for a in range(3) if a != axis)
    fp_slices = int(np.count_nonzero(predicted.any(axis=other) & ~reference.any(axis=other)))
    return dice, fp_slices, np.count_nonzero(predicted & ~reference) * voxel_ml


def main():
    parser = bench_common.arguments(__doc__.split("\n\n")[0])
    parser.add_argument("data", type=Path, help="the shared data folder")
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES), help="which CT cases (default all)")
    args = parser.parse_args()
    bench_common.set_threads(args.threads)
    model = SSAMSegmentLib.load(adapter="default", merge=True)
    SETTINGS["default: " + VolumeContext.for_model(model).describe()] = VolumeContext.for_model(model)
    threshold = check_threshold(0.5)
    rows, totals = [], {name: [0.0, 0.0] for name in SETTINGS}  # setting -> [post seconds, loop seconds]
    per_setting = {name: {} for name in SETTINGS}
    for case, image, references in cases(args.data, args.cases):
        labels = list(references)
        start = time.perf_counter()
        decoded = slice_logits(model, image, labels, axis="axial")
        loop_seconds = time.perf_counter() - start
        voxel_ml = float(np.prod(image.GetSpacing())) / 1000.0
        original = [volume.copy() for volume in decoded.volumes]
        for name, context in SETTINGS.items():
            decoded.volumes = [volume.copy() for volume in original]
            start = time.perf_counter()
            result = masks_from_logits(decoded, threshold, context, start)
            totals[name][0] += time.perf_counter() - start
            totals[name][1] += loop_seconds
            for label in labels:
                predicted = sitk.GetArrayViewFromImage(result.masks[label]).astype(bool)
                score = scores(predicted, references[label], result.array_axis, voxel_ml)
                per_setting[name][(case, label)] = score
        print(f"{case}: slice loop {loop_seconds:.1f} s", flush=True)
    header = ["setting"] + [f"{case}: {label}" for case, label in per_setting["slices alone"]] + ["mean Dice",
                                                                                                   "FP slices", "extra time"]
    for name in SETTINGS:
        values = per_setting[name]
        cells = [f"{d:.3f} / {s} / {v:.1f}" for d, s, v in values.values()]
        mean_dice = np.mean([d for d, _, _ in values.values()])
        fp = sum(s for _, s, _ in values.values())
        extra = totals[name][0] / totals[name][1]
        rows.append([name] + cells + [f"{mean_dice:.3f}", str(fp), f"{100 * extra:.1f}%"])
    body = ("Cells: volume Dice / false-positive slices / false-positive mL, default adapter, axial slices, "
            "threshold 0.5. Extra time: the post-processing's seconds over the slice loop's, all cases together "
            "(the 'slices alone' row is the thresholding every setting does).\n\n"
            + bench_common.table(header, rows))
    print(body)
    if not args.no_docs:
        bench_common.write_section(args.docs, "volume-context", "3D context after the slice loop", body, args.threads)


if __name__ == "__main__":
    main()
