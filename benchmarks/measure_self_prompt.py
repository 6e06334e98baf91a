"""Self-prompted box refinement for polyps: does the box of the text-prompted mask, given to the untuned base (the way
LiteMedSAM was trained), give a better mask than the text prompt alone?

    python scripts/build_default_training_data.py /tmp/dd
    python benchmarks/measure_self_prompt.py /tmp/dd [--sets polyp-val polyp-test] [--adapter default]

The box prompt with the true box is far ahead of every text-prompted adapter on Kvasir-SEG (docs/fine_tuning.md,
per-dataset study), so a box the model finds by itself is the obvious next thing to try. Per image of each set
(never trained on): the adapter's mask as `ssam segment` makes it ("text"), then the base prompted with the box of
its largest piece ("box of the largest piece") or of the whole mask ("box of the whole mask"), and two gates that
keep the box's mask only when it looks trustworthy, else the text mask: its Dice with the text mask at least
--agreement, or the base's own predicted IoU at least --iou. An empty text mask stays empty (no box to give).
Mean Dice against the manual masks, and how many images each variant moves by more than 0.05 either way.
Prints a markdown table.
"""

import argparse
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common  # noqa: E402,F401  (sets up the environment before torch loads)

import numpy as np  # noqa: E402
import SimpleITK as sitk  # noqa: E402

from compare_tuning import STUDIES, held_out_cases  # noqa: E402
from SSAMSegmentLib.files.image_io import read_image  # noqa: E402
from SSAMSegmentLib.inference.box_prompt import box_prompt_masks, mask_box  # noqa: E402
from SSAMSegmentLib.inference.intensity import choose_mapping  # noqa: E402
from SSAMSegmentLib.inference.slice_geometry import SliceGeometry  # noqa: E402
from SSAMSegmentLib.inference.slice_inference import segment_image  # noqa: E402
from SSAMSegmentLib.model.loading import load  # noqa: E402


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def largest_piece(mask: np.ndarray) -> np.ndarray:
    pieces = sitk.GetArrayFromImage(sitk.RelabelComponent(sitk.ConnectedComponent(sitk.GetImageFromArray(
        mask.astype(np.uint8)))))
    return pieces == 1


VARIANTS = ("text", "box of the largest piece", "box of the whole mask", "largest-piece box if it agrees",
            "largest-piece box if the base's IoU is high")


def measure(model, base, cases, agreement: float, iou: float):
    """{variant: [Dice per image]}."""
    scores = {variant: [] for variant in VARIANTS}
    for _, image_path, references in cases:
        image = read_image(image_path)
        truth = np.asarray(references["polyp"]).reshape(-1, *np.asarray(references["polyp"]).shape[-2:])[0] > 0
        result = segment_image(model, image, ["polyp"])
        text = sitk.GetArrayFromImage(next(iter(result.masks.values()))).reshape(truth.shape) > 0
        masks = dict.fromkeys(VARIANTS, text)
        if text.any():
            geometry = SliceGeometry.for_image(image)
            rgb = choose_mapping(image).apply(geometry.slice_view(geometry.canonical(sitk.GetArrayViewFromImage(
                image)), 0))
            spacing = geometry.in_plane_spacing()
            (largest, whole), quality = box_prompt_masks(base, rgb, [mask_box(largest_piece(text)), mask_box(text)],
                                                         spacing, with_quality=True)
            largest, whole, quality = largest > 0, whole > 0, float(quality[0])
            masks["box of the largest piece"], masks["box of the whole mask"] = largest, whole
            masks["largest-piece box if it agrees"] = largest if dice(largest, text) >= agreement else text
            masks["largest-piece box if the base's IoU is high"] = largest if quality >= iou else text
        for variant, mask in masks.items():
            scores[variant].append(dice(mask, truth))
    return scores


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", type=Path, help="the folder written by scripts/build_default_training_data.py")
    parser.add_argument("--sets", nargs="+", default=["polyp-val", "polyp-test"])
    parser.add_argument("--adapter", default="default")
    parser.add_argument("--agreement", type=float, default=0.8, help="gate: Dice of the box's mask with the text mask")
    parser.add_argument("--iou", type=float, default=0.9, help="gate: the base's predicted IoU for the box's mask")
    parser.add_argument("--limit", type=int, help="only the first N images of each set (a quick check)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    bench_common.set_threads(args.threads)
    model = load(adapter=args.adapter, merge=True)
    base = load(merge=True)  # the untuned default base (the box prompt's column in the per-dataset study)
    base.eval()
    results = {}
    for folder in args.sets:
        study = dataclasses.replace(STUDIES["polyp"], test=(folder,))
        results[folder] = measure(model, base, list(held_out_cases(study, args.data))[:args.limit], args.agreement, args.iou)
    print(f"Command: `{bench_common.command_line()}`\n")
    print("| variant | " + " | ".join(f"{folder} ({len(results[folder]['text'])}) mean Dice | better / worse by "
                                      f"> 0.05" for folder in args.sets) + " |")
    print("|---|" + "---|---|" * len(args.sets))
    for variant in VARIANTS:
        cells = []
        for folder in args.sets:
            text, values = np.array(results[folder]["text"]), np.array(results[folder][variant])
            change = values - text
            cells += [f"{values.mean():.3f}", "-" if variant == "text" else
                      f"{int((change > 0.05).sum())} / {int((change < -0.05).sum())}"]
        print(f"| {variant} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
