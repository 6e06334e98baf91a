"""S-SAM against norms-only tuning and against the base prompted with the ground-truth box, on real data.

    python scripts/build_default_training_data.py /tmp/dd
    python benchmarks/compare_tuning.py /tmp/dd --work /tmp/compare --epochs 6

Both text-prompted models are trained with `SSAMSegmentLib.train` under identical settings (data, seed, lr, batch,
epochs, augmentation); the only difference is `tune`: "ssam" (singular values + norms + positional embedding + TAL +
decoder norms) or "norms" (the same without the singular values: the paper's ablation baseline). Each keeps its best
epoch by validation Dice. The box baseline is LiteMedSAM itself, untuned, prompted on every slice where the label is
present with the bounding box of the true mask: the strongest zero-shot reference, which needs an expert to draw a box
and cannot say that a structure is absent, so only its classic Dice (slices where the label is present) exists.
Writes docs/fine_tuning.md (the table and this command).
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import SSAMSegmentLib  # noqa: E402
from SSAMSegmentLib.inference.box_prompt import mask_box  # noqa: E402
from SSAMSegmentLib.inference.preprocessing import logits_to_slice  # noqa: E402
from SSAMSegmentLib.training.trainer import TrainingConfig, _prepare_data, train  # noqa: E402

TRAIN = ("ct-mr", "polyp-train")
VAL = ("val-ct", "val-dcmqi", "polyp-val")
LABELS = ["liver", "spleen", "spine", "aorta", "polyp"]


def box_baseline(data: Path, labels):
    """Classic Dice per label of LiteMedSAM prompted with the true box on each validation slice containing the label,
    computed on the same validation slices (model resolution, content area) as the adapters' validation."""
    from SSAMSegmentLib.training.slice_bank import build_slice_bank

    config = TrainingConfig(data=[str(data / d) for d in TRAIN], val_data=[str(data / d) for d in VAL], labels=labels)
    dataset, _, val_cases = _prepare_data(config)
    model = SSAMSegmentLib.load(base="litemedsam", merge=True)
    bank = build_slice_bank(val_cases, dataset.label_names, model.image_size)
    scores = {name: [] for name in dataset.label_names}
    mean = model.pixel_mean.view(1, -1, 1, 1)
    std = model.pixel_std.view(1, -1, 1, 1)
    with torch.inference_mode():
        for row in range(len(bank)):
            h, w = bank.content[row]
            image = torch.from_numpy(np.asarray(bank.images[row])).float()[None]
            inputs = (image - mean) / std
            inputs[..., h:, :] = 0
            inputs[..., :, w:] = 0
            embedding = model.encode_images(inputs)
            for index, name in enumerate(dataset.label_names):
                truth = np.asarray(bank.masks[row, index, :h, :w]).astype(bool)
                if not bank.scored[row, index] or not truth.any():
                    continue
                box = torch.tensor([mask_box(truth)], dtype=torch.float32)
                logits = model.decode(embedding, boxes=box)
                logits = logits_to_slice(logits, model.image_size, (model.image_size, model.image_size),
                                         (model.image_size, model.image_size))
                predicted = (logits[0, 0, :h, :w] > 0).numpy()
                scores[name].append(2 * (predicted & truth).sum() / (predicted.sum() + truth.sum()))
    return {name: (float(np.mean(v)) if v else None) for name, v in scores.items()}


def variant_name(tune, lr_singular_values):
    return tune if lr_singular_values is None else f"{tune}-sv{lr_singular_values:g}"


def run(data: Path, work: Path, variants, epochs: int, batch: int, lr: float, seed: int):
    """Train each (tune, lr of the singular values or None for lr) variant; a finished or interrupted run in `work`
    is resumed, so the script can be re-run to add a variant."""
    results = {}
    for tune, lr_singular_values in variants:
        name = variant_name(tune, lr_singular_values)
        checkpoint = work / f"{name}.adapter.checkpoint.safetensors"
        start = time.time()
        config = TrainingConfig(data=[str(data / d) for d in TRAIN], val_data=[str(data / d) for d in VAL],
                                labels=LABELS, output=str(work / f"{name}.adapter.safetensors"), base="litemedsam",
                                epochs=epochs, batch_size=batch, lr=lr, lr_singular_values=lr_singular_values,
                                seed=seed, tune=tune, resume=str(checkpoint) if checkpoint.exists() else None)
        result = train(config, progress=lambda u: print(f"{name}: {u.message} step {u.step}/{u.total_steps} "
                                                        f"loss {u.loss}", flush=True) if u.phase == "validate" else None)
        results[name] = (result, result.summary.get("train_seconds") or time.time() - start)
    return results


def _describe(name, lr):
    if name == "norms":
        return "norms-only"
    return "S-SAM" + (f" (singular values at lr {name.split('-sv')[1]})" if "-sv" in name else "")


def table(results, box, labels, command, epochs, lr):
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    names = list(results)
    header = "| label | " + " | ".join(f"{_describe(n, lr)} Dice | classic" for n in names) + " | box prompt classic |"
    lines = [header, "|---|" + "---|---|" * len(names) + "---|"]
    for label in labels:
        cells = " | ".join(f"{fmt(results[n][0].val_dice.get(label))} | {fmt(results[n][0].val_dice_classic.get(label))}"
                           for n in names)
        lines.append(f"| {label} | {cells} | {fmt(box.get(label))} |")
    best_epoch = lambda r: next((h["epoch"] for h in r.history if h.get("val_dice_per_label") == r.val_dice), None)  # noqa: E731
    kept = ", ".join(f"{_describe(n, lr)}: epoch {best_epoch(results[n][0])}" for n in names)
    times = ", ".join(f"{_describe(n, lr)} {results[n][1] / 60:.0f} min" for n in names)
    return f"""# Fine-tuning: S-SAM against norms-only tuning and box prompts

Real data from the shared folder, laid out by `scripts/build_default_training_data.py`: training on the
TotalSegmentator CT and MR samples (predicted labels) and 4 Kvasir-SEG polyp images; validation on another CT
(predicted labels), the dcmqi CT with manual liver and spine outlines, and the 5th polyp image. Labels: {', '.join(labels)}.
All adapters: LiteMedSAM base, MiniLM text prompts, {epochs} epochs, lr {lr:g}, the same seed, batch and
augmentation; they differ only in what is trained (and, where named, the singular values' learning rate). Each keeps
its best epoch by validation Dice ({kept}). The box prompt is the untuned base given the bounding box of the true
mask on each slice where the label is present.

"Dice" counts an empty prediction of an absent label as 1 (the S-SAM paper's reading); "classic" averages only over
slices where the label is present, the only reading a box prompt has.

{chr(10).join(lines)}

Command ({time.strftime('%Y-%m-%d')}, 2-core CPU shared with other jobs):

```
{command}
```

Training time: {times}. This is a small study (54 training slices, 24 validation slices): it shows the method
working on real data end to end, not the paper's figures.
"""


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", type=Path, help="the folder written by scripts/build_default_training_data.py")
    parser.add_argument("--work", type=Path, default=Path("/tmp/ssam-compare"))
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ssam-lr-singular-values", type=lambda v: None if v == "lr" else float(v), nargs="+",
                        default=[None], help="S-SAM variants: the singular values' learning rate ('lr': the same)")
    parser.add_argument("--output", type=Path, default=REPO / "docs" / "fine_tuning.md")
    args = parser.parse_args()
    torch.set_num_threads(2)
    command = "python benchmarks/compare_tuning.py " + " ".join(sys.argv[1:])
    variants = [("ssam", value) for value in args.ssam_lr_singular_values] + [("norms", None)]
    results = run(args.data, args.work, variants, args.epochs, args.batch_size, args.lr, args.seed)
    box = box_baseline(args.data, LABELS)
    text = table(results, box, LABELS, command, args.epochs, args.lr)
    args.output.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
