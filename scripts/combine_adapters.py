"""Write one adapter that routes some labels through other adapters' networks (SSAMSegmentLib/model/label_routes.py).

    python scripts/combine_adapters.py MAIN.adapter.safetensors --route CT.adapter.safetensors=spleen,kidney \
        --output ROUTED.adapter.safetensors

Each --route names an adapter trained on the same base and the labels it computes in the combined file (labels it
was trained on); every other label is MAIN's. The validation Dice each adapter recorded is printed per label, so the
choice can be checked against what each run measured.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from SSAMSegmentLib.errors import SSAMError  # noqa: E402
from SSAMSegmentLib.model.adapter import read_metadata  # noqa: E402
from SSAMSegmentLib.model.label_routes import combine  # noqa: E402


def _route(text):
    path, _, labels = text.partition("=")
    names = [name.strip() for name in labels.split(",") if name.strip()]
    if not path or not names:
        raise argparse.ArgumentTypeError(f"'{text}' is not FILE=label,label")
    return Path(path), names


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("main", type=Path)
    parser.add_argument("--route", type=_route, action="append", required=True, metavar="FILE=LABELS")
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args()
    try:
        for path in [args.main] + [path for path, _ in args.route]:
            scores = (read_metadata(path).get("training") or {}).get("val_dice_classic_per_label") or {}
            print(f"{path.name}: " + ", ".join(f"{label} {'-' if value is None else f'{value:.3f}'}"
                                               for label, value in scores.items()))
        written = combine(args.main, args.route, args.output, overwrite=args.overwrite)
    except SSAMError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {written}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
