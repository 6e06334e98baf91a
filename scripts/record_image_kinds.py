"""Add to an adapter the kinds of image each label was taught on, from the datasets it was trained on.

    python scripts/record_image_kinds.py ADAPTER DATASET [DATASET ...]

`ssam train` records them itself (training/trainer.py taught_kinds); this is for an adapter trained before it did,
such as the default adapter of 2026-12-03 (its datasets: scripts/train_default_adapter.sh). The datasets are opened
and combined as `ssam train` does; the adapter is rewritten in place with the same tensors and metadata plus
"image_kinds", which segmenting uses to warn when a label is asked on another kind of image (model/labels.py).
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import SSAMSegmentLib  # noqa: E402
from SSAMSegmentLib.model.adapter import read_metadata  # noqa: E402
from SSAMSegmentLib.model.labels import label_key  # noqa: E402
from SSAMSegmentLib.training.datasets import combine_datasets, open_dataset  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("adapter", type=Path)
    parser.add_argument("datasets", nargs="+", type=Path)
    args = parser.parse_args()
    metadata = read_metadata(args.adapter)
    dataset = combine_datasets([open_dataset(folder) for folder in args.datasets])
    kinds = {label_key(name): dataset.label_kinds[label_key(name)] for name in metadata["labels"]
             if dataset.label_kinds.get(label_key(name))}
    model = SSAMSegmentLib.load(adapter=args.adapter, device="cpu")
    before = model.trainable_state()
    model.label_kinds = kinds
    model.save_adapter(args.adapter, metadata.get("training"))
    after = SSAMSegmentLib.load(adapter=args.adapter, device="cpu").trainable_state()
    assert all((before[name] == after[name]).all() for name in before), "the tensors changed"
    for name in metadata["labels"]:
        print(f"{name}: {', '.join(kinds.get(label_key(name), [])) or 'no record'}")


if __name__ == "__main__":
    main()
