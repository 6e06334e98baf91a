"""`ssam train`: arguments, a progress bar with loss and validation Dice, the metrics CSV, the curves PNG, the final
table. Ctrl-C asks the training to stop after the current step (a second Ctrl-C stops at once); either way a
resumable checkpoint is left and the adapter file is never partial."""

import argparse
import csv
import signal
import sys
import threading
from pathlib import Path

from .files.atomic_file import add_overwrite_argument, atomic_output, output_set
from .errors import SSAMError


def add_arguments(parser):
    from .training.recipe import (CPU_BATCH, CUDA_BATCH_PER_PROCESS, DEFAULT_LR, DEFAULT_LR_SINGULAR_VALUES,
                                  DEFAULT_PATIENCE, DEFAULT_STEPS, RARE_LABEL_SHARE)
    from .model.bases import BASES
    from .model.devices import DEVICE_CHOICES
    from .inference.slice_geometry import AXES
    from .model.text_encoders import TEXT_ENCODERS

    parser.add_argument("data", nargs="+", help="dataset folder(s): nnU-Net/MSD (dataset.json), "
                                                "images/+masks/+labels.json, or images with .seg.nrrd segmentations; "
                                                "several folders of different kinds are combined")
    parser.add_argument("--val-data", nargs="+", help="validation dataset folder(s) instead of holding out cases")
    parser.add_argument("--output", required=True, help="adapter file to write, e.g. my.adapter.safetensors")
    parser.add_argument("--base", choices=sorted(BASES), default="litemedsam")
    parser.add_argument("--text-encoder", choices=sorted(TEXT_ENCODERS), default="minilm-l6")
    parser.add_argument("--labels", help="comma-separated subset of the dataset's labels (default: all)")
    parser.add_argument("--steps", type=int, help=f"optimizer steps of the schedule (default {DEFAULT_STEPS}, "
                                                  "whatever the dataset's size: a small set gets as many updates as "
                                                  "a large one); linear warm-up over the first 5%%, cosine decay "
                                                  "to the end")
    parser.add_argument("--epochs", type=int, help="the schedule's length as passes over the training slices "
                                                   "instead of --steps")
    parser.add_argument("--budget", type=float, metavar="MINUTES",
                        help="fit the schedule to this wall-clock time: the first steps are timed, then the total "
                             "steps are fixed so warm-up and decay end in time (stored in the checkpoint)")
    parser.add_argument("--batch-size", type=int, help="slices per step, each with all its labels (default "
                                                       f"{CPU_BATCH} on a CPU, {CUDA_BATCH_PER_PROCESS} per CUDA GPU)")
    parser.add_argument("--micro-batch", type=int, help="slices per forward/backward pass (gradients accumulate over "
                                                        "the batch; default 1 on CPU, the batch size on GPU)")
    parser.add_argument("--lr", type=float, default=DEFAULT_LR,
                        help="peak learning rate of the norms, Text Affine Layer and positional embedding "
                             "(default %(default)g)")
    parser.add_argument("--lr-singular-values", type=float, default=DEFAULT_LR_SINGULAR_VALUES,
                        help="peak learning rate of the singular values' scales and shifts (default %(default)g: "
                             "at 1e-3 they destroyed labels, docs/fine_tuning.md)")
    parser.add_argument("--patience", type=int, default=DEFAULT_PATIENCE,
                        help="stop when this many validations (one every tenth of the schedule) after warm-up "
                             "bring no progress: no better mean Dice and no label 0.01 above its own best (default "
                             "%(default)s; 0: never stop early)")
    parser.add_argument("--val-fraction", type=float, default=0.2, help="share of cases held out for validation")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume", help="checkpoint to continue from (<output>.checkpoint.safetensors)")
    parser.add_argument("--start-from", metavar="ADAPTER",
                        help="start from this adapter's trained weights instead of the base's ('default': the shipped "
                             "adapter, which already knows its labels); its labels stay taught, the data's are added")
    parser.add_argument("--device", default="auto", help=f"one of {', '.join(DEVICE_CHOICES)} or cuda:N")
    parser.add_argument("--axis", choices=AXES, default="auto", help="slice axis of 3D images")
    parser.add_argument("--image-size", type=int, help="input size for SAM ViT bases (multiple of 16)")
    parser.add_argument("--balanced", action=argparse.BooleanOptionalAction, default=None,
                        help="sample slices so every label is seen as often present as absent (default: on when a "
                             f"label is on fewer than {RARE_LABEL_SHARE * 100:.0f}%% of its training slices)")
    parser.add_argument("--tune", choices=("ssam", "norms"), default="ssam",
                        help="ssam: singular values + norms (S-SAM); norms: without the singular values (ablation)")
    parser.add_argument("--no-augment", action="store_true", help="no intensity and small geometric jitter")
    parser.add_argument("--tiles", choices=("auto", "off"), default="auto",
                        help="auto: labels whose structures would be a few pixels across in the whole image at the "
                             "model's input train and segment in native-resolution tiles (stored in the adapter); "
                             "off: whole images always")
    parser.add_argument("--self-box", choices=("auto", "off"), default="auto",
                        help="auto: after training, each label whose validation masks improve when the base redraws "
                             "them from their own box (one-object labels such as polyps) gets that step, stored in "
                             "the adapter; off: never")
    parser.add_argument("--neighbour-slices", dest="neighbour_slices", action="store_true",
                        help="2.5D: the model's three input channels carry slices k-1, k, k+1 of 3D images instead "
                             "of slice k three times (recorded in the adapter; segmenting then does the same); 2D and "
                             "RGB images are unaffected. Off by default: on the project's CTs it did worse (docs/fine_tuning.md)")
    parser.add_argument("--keep-largest", action="append", metavar="LABEL",
                        help="a label that is one connected organ (e.g. liver): segmenting keeps only its largest 3D "
                             "component; repeat for several")
    add_overwrite_argument(parser)


def report_paths(output) -> tuple:
    """The metrics CSV and the curves PNG written beside the adapter."""
    if not Path(output).name.strip():
        raise SSAMError(f"--output '{output}' is not a file name; give e.g. my.adapter.safetensors")
    metrics = Path(output).with_suffix("").with_suffix(".metrics.csv")
    return metrics, metrics.with_suffix("").with_suffix(".curves.png")


def run(args) -> int:
    from .model.labels import split_labels
    from .training.trainer import TrainingConfig, train

    config = TrainingConfig(
        data=args.data, output=args.output, base=args.base, text_encoder=args.text_encoder,
        labels=split_labels(args.labels) or None,
        steps=args.steps, epochs=args.epochs, budget_minutes=args.budget, batch_size=args.batch_size,
        micro_batch=args.micro_batch, lr=args.lr, lr_singular_values=args.lr_singular_values, patience=args.patience,
        val_fraction=args.val_fraction, val_data=args.val_data, seed=args.seed, resume=args.resume,
        start_from=args.start_from, device=args.device, axis=args.axis,
        balanced=args.balanced, augment=not args.no_augment, tiles=args.tiles, tune=args.tune, self_box=args.self_box,
        image_size=args.image_size, keep_largest=args.keep_largest, neighbour_slices=args.neighbour_slices,
        overwrite=args.overwrite,
    )
    metrics, curves = report_paths(args.output)
    config.check().check_outputs(also=(metrics, curves))  # before the data is read or the model loaded
    cancel = threading.Event()
    display = _Display()

    def stop_after_step(signum, frame):
        if cancel.is_set():
            raise KeyboardInterrupt
        cancel.set()
        print("\nstopping after this step (Ctrl-C again to stop now)...", file=sys.stderr)

    previous = signal.signal(signal.SIGINT, stop_after_step)
    try:
        result = train(config, progress=display.update, cancel=cancel)
    finally:
        signal.signal(signal.SIGINT, previous)
        display.close()
    if not display.is_main:
        return 0
    with output_set():  # the metrics and the curves together or neither
        write_metrics_csv(metrics, result.history, display.losses)
        write_curves_png(curves, result.history, display.losses)
    print(format_result_table(result))
    print(f"adapter     {result.adapter_path}")
    print(f"checkpoint  {result.checkpoint_path} (continue with --resume)")
    print(f"metrics     {metrics}\ncurves      {curves}")
    print(f"speed       {result.samples_per_second:.2f} samples/s ((slice, label) pairs)")
    return 0


class _Display:
    """Shows TrainingProgress updates: a tqdm bar on a terminal, a plain line every ~30 s in a log file. Also records
    the loss per step for the curves."""

    def __init__(self):
        import os
        import time

        self.bar = None
        self.losses = []
        self.is_main = int(os.environ.get("RANK", "0")) == 0
        self.interactive = sys.stderr.isatty()
        self.clock = time.monotonic
        self.last_line = 0.0

    def update(self, update):
        from tqdm import tqdm

        if update.phase == "train" and update.loss is not None and update.step > len(self.losses):
            self.losses.append((update.step, update.loss))
        if update.phase == "prepare":
            print(update.message, file=sys.stderr)
            return
        fields = format_progress(update)
        if not self.interactive:
            if update.phase in ("validate", "validated", "done") or self.clock() - self.last_line > 30 \
                    or update.step == update.total_steps:
                print(", ".join(fields), file=sys.stderr, flush=True)
                self.last_line = self.clock()
            return
        if update.phase == "done":
            print(", ".join(fields), file=sys.stderr)
            return
        if self.bar is None:
            self.bar = tqdm(total=update.total_steps, file=sys.stderr, unit="step", dynamic_ncols=True)
        self.bar.total = update.total_steps  # a --budget fixes the total after the first steps
        self.bar.n = update.step
        self.bar.set_postfix_str(", ".join(fields), refresh=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def format_progress(update) -> list:
    """The progress line's fields: step/total, learning rate, loss, validation Dice, expected finish (clock time)."""
    import time

    fields = [f"step {update.step}/{update.total_steps}" if update.phase != "done" else update.message]
    if update.lr is not None:
        fields.append(f"lr {update.lr:.1e}")
    if update.loss is not None:
        fields.append(f"loss {update.loss:.4f}")
    if update.val_dice is not None:
        fields.append(f"val Dice {update.val_dice:.3f}")
    if update.phase == "validate":
        fields.append("validating")
    if update.finish_time is not None and update.eta_seconds:
        clock = time.strftime("%H:%M", time.localtime(update.finish_time))
        fields.append(f"ends about {clock} ({max(1.0, update.eta_seconds / 60):.0f} min)")
    return fields


def write_metrics_csv(path, history, step_losses):
    labels = sorted({name for record in history for name in (record.get("val_dice_per_label") or {})})
    with atomic_output(path, suffix=".csv") as temporary, open(temporary, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["kind", "epoch", "step", "loss", "val_dice"] + [f"dice:{name}" for name in labels]
                        + [f"dice_classic:{name}" for name in labels])
        for step, loss in step_losses:
            writer.writerow(["step", "", step, f"{loss:.6f}", ""] + [""] * 2 * len(labels))
        for record in history:
            dice = record.get("val_dice_per_label") or {}
            classic = record.get("val_dice_classic_per_label") or {}
            fmt = lambda v: "" if v is None else f"{v:.4f}"  # noqa: E731
            writer.writerow(["epoch", record["epoch"], record["step"], fmt(record.get("loss")), fmt(record.get("val_dice"))]
                            + [fmt(dice.get(n)) for n in labels] + [fmt(classic.get(n)) for n in labels])


def write_curves_png(path, history, step_losses, size=(900, 420)):
    """Training loss per step (left axis) and mean validation Dice per epoch (right axis), drawn with Pillow."""
    from PIL import Image, ImageDraw

    width, height = size
    left, right, top, bottom = 60, 60, 30, 40
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    draw.text((left, 8), "training loss (blue, left) and validation Dice (orange, right)", fill="black")
    last_step = max([s for s, _ in step_losses] + [r["step"] for r in history] + [1])
    x = lambda step: left + (width - left - right) * step / last_step  # noqa: E731
    if step_losses:
        top_loss = max(loss for _, loss in step_losses) or 1.0
        y = lambda v: height - bottom - (height - top - bottom) * v / top_loss  # noqa: E731
        if len(step_losses) > 1:
            draw.line([(x(s), y(v)) for s, v in step_losses], fill=(31, 119, 180), width=2)
        draw.text((5, top), f"{top_loss:.3f}", fill=(31, 119, 180))
        draw.text((5, height - bottom - 10), "0", fill=(31, 119, 180))
    dice = [(r["step"], r["val_dice"]) for r in history if r.get("val_dice") is not None]
    if dice:
        y = lambda v: height - bottom - (height - top - bottom) * v  # noqa: E731
        points = [(x(s), y(v)) for s, v in dice]
        if len(points) > 1:
            draw.line(points, fill=(255, 127, 14), width=2)
        for px, py in points:
            draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=(255, 127, 14))
        draw.text((width - right + 5, top), "1.0", fill=(255, 127, 14))
        draw.text((width - right + 5, height - bottom - 10), "0.0", fill=(255, 127, 14))
    draw.text((left, height - bottom + 8), "step 0", fill="black")
    draw.text((width - right - 60, height - bottom + 8), f"step {last_step}", fill="black")
    with atomic_output(path, suffix=".png") as temporary:
        image.save(temporary, format="PNG")


def format_result_table(result) -> str:
    lines = [f"{'label':<28}{'val Dice':>10}{'classic':>10}"]
    for name, value in result.val_dice.items():
        classic = result.val_dice_classic.get(name)
        lines.append(f"{name:<28}{'-' if value is None else f'{value:.3f}':>10}"
                     f"{'-' if classic is None else f'{classic:.3f}':>10}")
    if not result.val_dice:
        lines.append("(no validation cases: the adapter of the last epoch was kept)")
    lines.append("val Dice: blank prediction of a blank truth scores 1 (S-SAM's reading); classic: only slices "
                 "where the label is present")
    return "\n".join(lines)
