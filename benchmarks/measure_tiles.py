"""Tiles against the whole image for a thin structure: H&E nuclei on the full 1000 x 1000 MoNuSeg slides.

    python benchmarks/measure_tiles.py [--data ../shared/data]

The default adapter learnt "nucleus" at native resolution, on the MoNuSeg training slides cut into 250 x 250 crops
(and 256 x 256 fluorescence crops) by scripts/build_default_training_data.py, so the trainer's tile plan never saw
an image larger than the model's input; its adapter records the scale it learnt instead (scripts/amend_adapter.py
--tile nucleus=256). The 3 validation slides (never trained on) are segmented whole at 1000 x 1000 three ways: the
whole image resized to the model's input (tiles off), the adapter's own tiles (what `ssam segment` does), and the
tiles the generic rule (inference/tiling.py choose_tiles) would plan from the 9 training slides at their full size.
Dice against the manual masks at full resolution, and seconds per slide. Prints a markdown table.
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common  # noqa: E402  (sets up the environment before torch loads)

import numpy as np  # noqa: E402
import SimpleITK as sitk  # noqa: E402

import SSAMSegmentLib  # noqa: E402
from SSAMSegmentLib.files.image_io import read_image  # noqa: E402
from SSAMSegmentLib.inference.tiling import choose_tiles, typical_structure_size  # noqa: E402

# scripts/build_default_training_data.py: the last three slides by name are nuclei-he-val, the other nine train
VALIDATION = ("TCGA-AR-A1AS-01Z-00-DX1", "TCGA-AY-A8YK-01A-01-TS1", "TCGA-B0-5698-01Z-00-DX1")


def read_mask(path: Path) -> np.ndarray:
    """The MoNuSeg masks are grey + alpha PNGs (0/255), which SimpleITK cannot read: Pillow, grey channel, as the
    build script reads them."""
    from PIL import Image

    return np.asarray(Image.open(path).convert("L")) >= 128


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=bench_common.REPO.parent / "shared" / "data")
    args = parser.parse_args()
    folder = args.data / "monuseg-12"
    slides = sorted(path.stem for path in (folder / "images").glob("*.tif"))
    training = [name for name in slides if name not in VALIDATION]
    masks = {name: read_mask(folder / "masks" / f"{name}.png") for name in slides}
    model = SSAMSegmentLib.load(adapter="default", merge=True)
    shape = np.median([masks[name].shape for name in training], axis=0)
    diameter = float(np.median([typical_structure_size(masks[name]) for name in training]))
    record = choose_tiles(shape, diameter, model.image_size)
    print(f"plan from the {len(training)} training slides: median {shape[1]:.0f} x {shape[0]:.0f} px, nucleus "
          f"diameter {diameter:.1f} px -> {record}")
    own = model.tile_records.get("nucleus")
    variants = {"whole image (tiles off)": {}}
    if own is not None:
        variants[f"the adapter's tiles, {own.tile} px (ssam segment)"] = {"nucleus": own}
    variants[f"the rule's plan from the full training slides, {record.tile} px"] = {"nucleus": record}
    rows = {name: [] for name in variants}
    for name in VALIDATION:
        image = read_image(folder / "images" / f"{name}.tif")
        for variant, tiles in variants.items():
            model.tile_records = tiles
            start = time.perf_counter()
            result = model.segment(image, ["nucleus"])
            seconds = time.perf_counter() - start
            predicted = sitk.GetArrayFromImage(result.masks["nucleus"]).astype(bool)
            rows[variant].append((dice(predicted, masks[name]), seconds))
            print(f"{name} {variant}: Dice {rows[variant][-1][0]:.3f}, {seconds:.1f} s", flush=True)
    print("\n| MoNuSeg validation slides (3, 1000 x 1000, never trained on) | nucleus Dice (mean) | per slide | s / slide |")
    print("|---|---|---|---|")
    for variant, values in rows.items():
        print(f"| {variant} | {np.mean([d for d, _ in values]):.3f} | "
              f"{', '.join(f'{d:.3f}' for d, _ in values)} | {np.median([s for _, s in values]):.1f} |")


if __name__ == "__main__":
    main()
