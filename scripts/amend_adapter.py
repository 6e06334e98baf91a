"""Add to an adapter trained before `ssam train` recorded them: the kinds of image each label was taught on, and the
native-resolution tiles a label was in fact trained at.

    python scripts/amend_adapter.py ADAPTER [--kinds-from DATASET ...] [--tile LABEL=PIXELS ...]

--kinds-from: the datasets the adapter was trained on, opened and combined as `ssam train` does; their per-label
  kinds of image (files/image_io.image_kind) become metadata["image_kinds"], from which segmenting warns when a
  label is asked on another kind (model/labels.py). `ssam train` now records them itself (trainer.taught_kinds).
--tile: a label whose training images were native-resolution crops of larger images, cut before training (so the
  trainer's tile plan, training/tile_plan.py, never saw the large images): segment images larger than PIXELS in
  tiles of PIXELS with the usual quarter overlap (inference/tiling.py), the scale it learnt.
The adapter is rewritten in place with the same tensors and the rest of its metadata. Used for the default adapter
of 2026-12-03 (scripts/train_default_adapter.sh says with what).
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import SSAMSegmentLib  # noqa: E402
from SSAMSegmentLib.inference.tiling import OVERLAP_SHARE, TileRecord  # noqa: E402
from SSAMSegmentLib.model.adapter import read_metadata  # noqa: E402
from SSAMSegmentLib.model.labels import label_key  # noqa: E402
from SSAMSegmentLib.training.datasets import combine_datasets, open_dataset  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("adapter", type=Path)
    parser.add_argument("--kinds-from", nargs="+", type=Path, default=[], metavar="DATASET")
    parser.add_argument("--tile", action="append", default=[], metavar="LABEL=PIXELS")
    args = parser.parse_args()
    metadata = read_metadata(args.adapter)
    model = SSAMSegmentLib.load(adapter=args.adapter, device="cpu")
    before = model.trainable_state()
    if args.kinds_from:
        dataset = combine_datasets([open_dataset(folder) for folder in args.kinds_from])
        model.label_kinds = {label_key(name): dataset.label_kinds[label_key(name)] for name in metadata["labels"]
                             if dataset.label_kinds.get(label_key(name))}
    for value in args.tile:
        label, pixels = value.rsplit("=", 1)
        if label not in metadata["labels"]:
            parser.error(f"--tile {value}: the adapter has no label '{label}'")
        model.tile_records[label] = TileRecord(int(pixels), int(int(pixels) * OVERLAP_SHARE))
    model.save_adapter(args.adapter, metadata.get("training"))
    after = SSAMSegmentLib.load(adapter=args.adapter, device="cpu")
    assert all((before[name] == after.trainable_state()[name]).all() for name in before), "the tensors changed"
    for name in metadata["labels"]:
        tiles = after.tile_records.get(name)
        print(f"{name}: {', '.join(after.label_kinds.get(label_key(name), [])) or 'no record'}"
              + (f"; tiles of {tiles.tile} px, overlap {tiles.overlap}" if tiles else ""))


if __name__ == "__main__":
    main()
