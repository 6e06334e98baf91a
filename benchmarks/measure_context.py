"""Neighbour slices (`ssam train --neighbour-slices`, "2.5D") against the single slice, on real CT: volume Dice and time.

    python scripts/build_default_training_data.py /tmp/dd
    python benchmarks/measure_context.py /tmp/dd --work /tmp/ssam-context --budget 60

Two adapters are trained from the LiteMedSAM base on `ct-mr` (the TotalSegmentator CT and MR samples) for liver,
spleen and kidney, validated on `val-ct` and `val-dcmqi` to keep the best, with the default recipe, the same seed and
`--budget` minutes each; they differ only in --neighbour-slices (inference/neighbour_slices.py). A finished or interrupted
run in --work is resumed, so the script can be re-run. Each adapter then segments the validation volumes as `ssam
segment` does (sparse probes, volume context) and is scored per label with the volume Dice against the references
(val-ct: TotalSegmentator's predictions; val-dcmqi: the manual liver, the only one of the three it annotates); the
time per volume is the median of --repeats segmentations, the two adapters interleaved. Writes the "context" section
of docs/benchmarks.md.
"""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common  # noqa: E402  (sets up the environment before torch loads)

import numpy as np  # noqa: E402
import SimpleITK as sitk  # noqa: E402

import SSAMSegmentLib  # noqa: E402
from SSAMSegmentLib.inference.slice_inference import segment_image  # noqa: E402
from SSAMSegmentLib.model.labels import label_key  # noqa: E402
from SSAMSegmentLib.training.datasets import open_dataset  # noqa: E402
from SSAMSegmentLib.training.evaluation import label_metrics  # noqa: E402
from SSAMSegmentLib.training.trainer import TrainingConfig, train  # noqa: E402

TRAIN = "ct-mr"
VAL = ("val-ct", "val-dcmqi")
LABELS = ["liver", "spleen", "kidney"]
VARIANTS = {"single slice": False, "neighbour slices (--neighbour-slices)": True}


def train_variant(args, name, context):
    output = args.work / f"{'context' if context else 'single'}.adapter.safetensors"
    config = TrainingConfig(data=[str(args.data / TRAIN)], val_data=[str(args.data / v) for v in VAL], labels=LABELS,
                            output=str(output), base=args.base, budget_minutes=args.budget, max_steps=args.max_steps,
                            seed=args.seed, neighbour_slices=context)
    checkpoint = config.checkpoint_path()
    config.resume = str(checkpoint) if checkpoint.exists() else None

    def report(update):
        if update.phase in ("validate", "done") or (update.phase == "prepare" and "budget" in update.message):
            print(f"{name}: {update.message} (step {update.step}/{update.total_steps})", flush=True)

    result = train(config, progress=report)
    return result


def validation_cases(data: Path):
    """(dataset name, case id, image, {label: reference mask}) for each validation case and measured label it
    annotates."""
    for folder in VAL:
        dataset = open_dataset(data / folder)
        names = {label_key(name): name for name in dataset.label_names}
        for case in dataset.cases:
            annotated = case.annotated or dataset.label_names
            wanted = [names[label_key(label)] for label in LABELS
                      if label_key(label) in names and names[label_key(label)] in annotated]
            image, masks = case.load()
            yield folder, case.case_id, image, {name: masks[name] for name in wanted}


def main():
    parser = bench_common.arguments(__doc__.split("\n\n")[0])
    parser.add_argument("data", type=Path, help="the folder written by scripts/build_default_training_data.py")
    parser.add_argument("--work", type=Path, default=Path("/tmp/ssam-context"), help="adapters and checkpoints")
    parser.add_argument("--budget", type=float, default=60.0, help="training minutes per adapter (default 60)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--base", default="litemedsam", help="the base (a test base for a quick check)")
    parser.add_argument("--max-steps", type=int, help="cap the steps of each run (a quick check of the script)")
    parser.set_defaults(repeats=3)
    args = parser.parse_args()
    bench_common.set_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)

    trained = {}
    for name, context in VARIANTS.items():
        start = time.time()
        result = train_variant(args, name, context)
        trained[name] = (result, result.summary.get("train_seconds") or time.time() - start)
        print(f"{name}: {result.steps} steps, validation Dice {result.val_dice}", flush=True)
    models = {name: SSAMSegmentLib.load(adapter=result.adapter_path, merge=True)
              for name, (result, _) in trained.items()}

    dice = {name: {} for name in VARIANTS}  # variant -> (dataset, label) -> volume Dice
    seconds = {name: {} for name in VARIANTS}  # variant -> dataset -> median seconds per volume
    for folder, case_id, image, references in validation_cases(args.data):
        labels = list(references)
        if not labels:
            continue
        results = {}

        def segmenting(name):
            def run():
                results[name] = segment_image(models[name], image, labels)
            return run

        times = bench_common.interleaved({name: segmenting(name) for name in VARIANTS}, args.repeats, warmup=0)
        spacing = tuple(reversed(image.GetSpacing()))
        for name in VARIANTS:
            seconds[name].setdefault(folder, []).append(bench_common.median(times[name]))
            for label, reference in references.items():
                predicted = sitk.GetArrayViewFromImage(results[name].masks[label])
                dice[name][(folder, label)] = label_metrics(predicted, reference, spacing)["dice"]
            print(f"{folder}/{case_id} {name}: " + ", ".join(f"{label} {dice[name][(folder, label)]:.3f}"
                                                             for label in labels)
                  + f"; {bench_common.median(times[name]):.1f} s ({bench_common.spread(times[name])})", flush=True)

    columns = list(dice[next(iter(VARIANTS))])
    header = (["input"] + [f"{folder}: {label}" for folder, label in columns] + ["mean volume Dice"]
              + [f"s / volume {folder}" for folder in VAL if folder in seconds[next(iter(VARIANTS))]]
              + ["steps", "training min", "best validation Dice (slices)"])
    rows = []
    for name in VARIANTS:
        result, train_seconds = trained[name]
        best = result.summary.get("val_dice")
        rows.append([name] + [f"{dice[name][column]:.3f}" for column in columns]
                    + [f"{np.mean([dice[name][c] for c in columns]):.3f}"]
                    + [f"{np.mean(seconds[name][folder]):.1f}" for folder in VAL if folder in seconds[name]]
                    + [str(result.steps), f"{train_seconds / 60:.1f}", "-" if best is None else f"{best:.3f}"])
    body = (f"Two adapters from the {args.base} base, trained on `{TRAIN}` for {', '.join(LABELS)} with the default "
            f"recipe, seed {args.seed} and a budget of {args.budget:g} min each, kept at their best validation "
            f"(slices of {' and '.join(f'`{v}`' for v in VAL)}); they differ only in the input channels: slice k "
            f"three times, or slices k-1, k, k+1 (`ssam train --neighbour-slices`). Volume Dice of `ssam segment`'s masks "
            f"(sparse probes, volume context) against the references (val-ct: TotalSegmentator's predictions; "
            f"val-dcmqi: manual liver); seconds per volume: median of {args.repeats} interleaved segmentations.\n\n"
            + bench_common.table(header, rows))
    print(body)
    if not args.no_docs:
        bench_common.write_section(args.docs, "context", "Neighbour slices (2.5D) against the single slice", body,
                                   args.threads)


if __name__ == "__main__":
    main()
