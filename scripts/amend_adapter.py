"""Add to an adapter trained before `ssam train` recorded them: the kinds of image each label was taught on, and the
native-resolution tiles a label was in fact trained at.

    python scripts/amend_adapter.py ADAPTER [--kinds-from DATASET ...] [--tile LABEL=PIXELS ...]

--kinds-from: the datasets the adapter was trained on, opened and combined as `ssam train` does; their per-label
  kinds of image (files/image_io.image_kind) become metadata["image_kinds"], from which segmenting warns when a
  label is asked on another kind (model/labels.py). `ssam train` now records them itself (trainer.taught_kinds).
--tile: a label whose training images were native-resolution crops of larger images, cut before training (so the
  trainer's tile plan, training/tile_plan.py, never saw the large images): segment images larger than PIXELS in
  tiles of PIXELS with the usual quarter overlap (inference/tiling.py), the scale it learnt.
--self-box-from: validation datasets never trained on (those of the adapter's own run): each of the adapter's labels
  they annotate is tried with the self-prompted box as `ssam train` does after training (training/self_box_choice.py)
  and gets it where it adds self_box.MIN_GAIN; the measurement goes into the training record ("self_box").
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
    parser.add_argument("--self-box-from", nargs="+", type=Path, default=[], metavar="DATASET")
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
    training = dict(metadata.get("training") or {})
    if args.self_box_from:
        from SSAMSegmentLib.training.self_box_choice import measure
        from SSAMSegmentLib.training.slice_bank import build_slice_bank
        from SSAMSegmentLib.training.trainer import _open_all

        val = _open_all([str(folder) for folder in args.self_box_from], None)
        known = {label_key(name): name for name in metadata["labels"]}
        names = [known[label_key(name)] for name in val.label_names if label_key(name) in known]
        for case in val.cases:  # read under the adapter's spelling, scored only where annotated
            case.annotated = frozenset(known[label_key(n)] for n in (case.annotated or val.label_names)
                                       if label_key(n) in known)
            case.use_label_names(names, known)
        bank = build_slice_bank(list(val.cases), names, model.image_size)
        choice = measure(model, bank, model.text_embeddings(names), model.device)
        model.self_box = [name for name, record in choice.items() if record["chosen"]]
        training["self_box"] = choice
        for name, record in choice.items():
            print(f"self-prompted box, {name}: {record['text']:.3f} -> {record['self_box']:.3f} on "
                  f"{record['slices']} validation slices: {'chosen' if record['chosen'] else 'not chosen'}")
    model.save_adapter(args.adapter, training)
    after = SSAMSegmentLib.load(adapter=args.adapter, device="cpu")
    assert all((before[name] == after.trainable_state()[name]).all() for name in before), "the tensors changed"
    for name in metadata["labels"]:
        tiles = after.tile_records.get(name)
        print(f"{name}: {', '.join(after.label_kinds.get(label_key(name), [])) or 'no record'}"
              + (f"; tiles of {tiles.tile} px, overlap {tiles.overlap}" if tiles else ""))


if __name__ == "__main__":
    main()
