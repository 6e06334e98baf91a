"""Self-prompted box refinement for polyps: does the box of the text-prompted mask, given to the untuned base (the way
LiteMedSAM was trained), give a better mask than the text prompt alone?

    python scripts/build_default_training_data.py /tmp/dd
    python benchmarks/measure_self_prompt.py /tmp/dd [--sets polyp-val polyp-test] [--adapter default]

The box prompt with the true box is far ahead of every text-prompted adapter on Kvasir-SEG (docs/fine_tuning.md,
per-dataset study), so a box the model finds by itself is the obvious next thing to try. Per image of each set
(never trained on): the adapter's mask as `ssam segment` makes it ("text"), then the untuned base prompted with the
box of its largest piece or of the whole mask, the same boxes decoded by the adapter on its own embedding, and two
gates that keep the box's mask only when it looks trustworthy, else the text mask: its Dice with the text mask at
least --agreement, or the decoder's own predicted IoU at least --iou. An empty text mask stays empty (no box to
give). Mean Dice against the manual masks, and how many images each variant moves by more than 0.05 either way.
Results and their reading: docs/fine_tuning.md, "A box from the text mask".
Prints a markdown table.
"""

import argparse
import dataclasses
import json
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


def measure(model, base, cases):
    """Per image: Dice of the text mask and of each box's mask against the manual mask, their Dice with the text mask,
    and the predicted IoU of each box prompt (the base's, and the adapter's own decoder on its own embedding)."""
    records = []
    for _, image_path, references in cases:
        image = read_image(image_path)
        truth = np.asarray(references["polyp"]).reshape(-1, *np.asarray(references["polyp"]).shape[-2:])[0] > 0
        result = segment_image(model, image, ["polyp"])
        text = sitk.GetArrayFromImage(next(iter(result.masks.values()))).reshape(truth.shape) > 0
        record = {"text": dice(text, truth)}
        if text.any():
            geometry = SliceGeometry.for_image(image)
            rgb = choose_mapping(image).apply(geometry.slice_view(geometry.canonical(sitk.GetArrayViewFromImage(
                image)), 0))
            spacing = geometry.in_plane_spacing()
            boxes = [mask_box(largest_piece(text)), mask_box(text)]
            for name, prompted in (("base", base), ("adapter", model)):
                masks, quality = box_prompt_masks(prompted, rgb, boxes, spacing, with_quality=True)
                for box, mask, iou in zip(("largest", "whole"), masks > 0, quality):
                    record[f"{name} {box}"] = {"dice": dice(mask, truth), "agreement": dice(mask, text),
                                               "iou": float(iou)}
        records.append(record)
    return records


def variants(agreement: float, iou: float):
    """name -> rule choosing one Dice per image record (an empty text mask has no box: the text mask stays)."""
    def box(prompted, piece, gate=lambda box: True):
        key = f"{prompted} {piece}"
        return lambda record: record[key]["dice"] if key in record and gate(record[key]) else record["text"]

    return {
        "text (what `ssam segment` does)": lambda record: record["text"],
        "base, box of the largest piece": box("base", "largest"),
        "base, box of the whole mask": box("base", "whole"),
        f"base, largest-piece box if it agrees (Dice with the text mask >= {agreement:g})":
            box("base", "largest", lambda b: b["agreement"] >= agreement),
        f"base, largest-piece box if its predicted IoU >= {iou:g}": box("base", "largest", lambda b: b["iou"] >= iou),
        "adapter, box of the largest piece": box("adapter", "largest"),
        f"adapter, largest-piece box if its predicted IoU >= {iou:g}":
            box("adapter", "largest", lambda b: b["iou"] >= iou),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", type=Path, help="the folder written by scripts/build_default_training_data.py")
    parser.add_argument("--sets", nargs="+", default=["polyp-val", "polyp-test"])
    parser.add_argument("--adapter", default="default")
    parser.add_argument("--agreement", type=float, default=0.8, help="gate: Dice of the box's mask with the text mask")
    parser.add_argument("--iou", type=float, default=0.9, help="gate: the base's predicted IoU for the box's mask")
    parser.add_argument("--output", type=Path, help="also write every image's scores as JSON")
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
        results[folder] = measure(model, base, list(held_out_cases(study, args.data))[:args.limit])
    if args.output:
        args.output.write_text(json.dumps(results, indent=1) + "\n")
    print(f"Command: `{bench_common.command_line()}`\n")
    print("| variant | " + " | ".join(f"{folder} ({len(results[folder])}) mean Dice | better / worse by > 0.05"
                                      for folder in args.sets) + " |")
    print("|---|" + "---|---|" * len(args.sets))
    for name, rule in variants(args.agreement, args.iou).items():
        cells = []
        for folder in args.sets:
            text = np.array([record["text"] for record in results[folder]])
            values = np.array([rule(record) for record in results[folder]])
            change = values - text
            cells += [f"{values.mean():.3f}", "-" if name.startswith("text") else
                      f"{int((change > 0.05).sum())} / {int((change < -0.05).sum())}"]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
