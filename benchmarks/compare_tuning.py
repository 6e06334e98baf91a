"""Per-dataset study: S-SAM's default recipe against norms-only tuning and the box-prompted base, on test images that
no run trained or validated on. Writes the generated section of docs/fine_tuning.md and every number as JSON.

    python scripts/build_default_training_data.py /tmp/dd
    python benchmarks/compare_tuning.py /tmp/dd --work /tmp/compare --budget 45 [--studies polyp gland]
        [--adapter shipped=default] [--tiles-off]
    python benchmarks/compare_tuning.py /tmp/dd --work /tmp/compare --steps 120 --studies gland   # equal steps
    python benchmarks/compare_tuning.py /tmp/dd --adapter shipped=default   # no --budget: evaluation only

One study per real dataset (STUDIES; the folder names are those scripts/build_default_training_data.py writes):
polyp (Kvasir-SEG), gland (GlaS), nucleus-he (MoNuSeg H&E, test slides not trained on), ct (TotalSegmentator CT + MR,
tested on two other CTs). Per study, each a column of the table:
- S-SAM: `train` with the default recipe (tune="ssam", every default), `budget_minutes=--budget`;
- norms-only: the same with tune="norms" (the singular values frozen: the paper's ablation baseline), same seed;
- S-SAM, tiles off (--tiles-off): the same as S-SAM with tiles="off", for the with/without tiles measurement; not
  trained when the S-SAM run tiled no label (it would be the same run);
- the box prompt: the untuned base prompted on every image/slice where a label is present with the bounding box of
  its true mask (inference/box_prompt.py); it needs an expert's box and cannot say "absent", so only its classic Dice
  exists;
- --adapter NAME=PATH: any other adapter ("default": the shipped one), on the same test images. Its training summary
  is read for the test cases it trained or chose its kept step on (by case name), which the table's notes name: the
  shipped adapter of 2026-11-23 trained on a Kvasir image that is a test image now and validated on both test CTs.

Evaluation is the user's path: the adapter loaded as `ssam segment` loads it, the whole image segmented at native
resolution (tiles as the adapter says, sparse slices and volume context as by default), then Dice per image (per
slice of a volume, along the axis segment chose) for every label the test image's dataset annotates, with
training/evaluation.py's metrics: "Dice" counts an empty prediction of an absent label as 1 (the S-SAM paper's
reading), "classic" averages over the images where the label is present only. Means per label over the test images.

Resumable: each run lives in --work/STUDY/; a finished one (its .result.json) is reused, an interrupted one resumed
from its checkpoint; evaluations are cached by the adapter file's SHA-256. Studies run at different times accumulate
in --work/compare_tuning.json and the docs section shows every study there, each with the command that made it; a
study already in the docs section but not in that file (run in another session) keeps its subsection as it was.
"""

import argparse
import dataclasses
import datetime
import json
import time
from pathlib import Path
from typing import Dict, Optional, Tuple

import bench_common  # noqa: F401  (sets OMP_WAIT_POLICY and the offline hub before PyTorch loads; sys.path)
import numpy as np
import SimpleITK as sitk

from SSAMSegmentLib.errors import Cancelled, SSAMError
from SSAMSegmentLib.files.atomic_file import atomic_output
from SSAMSegmentLib.model.labels import label_key
from SSAMSegmentLib.training.evaluation import label_metrics, summarize_metrics

RESULTS_NAME = "compare_tuning.json"
SECTION = "compare-tuning"
DOCS = bench_common.REPO / "docs" / "fine_tuning.md"


@dataclasses.dataclass(frozen=True)
class Study:
    name: str
    title: str
    train: Tuple[str, ...]  # dataset folders under the data root
    test: Tuple[str, ...]  # never trained or validated on
    labels: Tuple[str, ...]
    val: Optional[Tuple[str, ...]] = None  # None: a seeded split of the training cases (val_fraction)
    val_fraction: float = 0.2
    about: str = ""  # what the reader must know about the split
    absent: Tuple[str, ...] = ()  # labels of another kind of image: certainly absent here, so any pixel is wrong


CT_LABELS = ("liver", "spleen", "kidney")
PHOTO_LABELS = ("polyp", "gland", "nucleus")


STUDIES = {study.name: study for study in (
    Study("polyp", "Polyp (Kvasir-SEG colonoscopy)", ("polyp-train",), ("polyp-test",), ("polyp",),
          val=("polyp-val",),
          about="760 training images, 40 validation images (the adapter kept), 200 test images held apart by name.",
          absent=CT_LABELS),
    Study("gland", "Gland (GlaS H&E colon histology)", ("gland-train",), ("gland-val",), ("gland",),
          about="GlaS train_1..10 for training (2 of them, a seeded split, validate); testA_1, 3, 6, 7, 8 test.",
          absent=CT_LABELS),
    Study("nucleus-he", "Nucleus (MoNuSeg H&E)", ("nuclei-he-train",), ("nuclei-he-val",), ("nucleus",),
          about="9 slides as 250x250 tiles for training (a seeded 20% of the tiles validate, so validation shares "
                "slides with training); the test tiles come from 3 other slides.",
          absent=CT_LABELS),
    Study("ct", "CT organs (TotalSegmentator)", ("ct-mr",), ("val-ct", "val-dcmqi"), ("liver", "spleen", "kidney"),
          val_fraction=0.0,
          about="Training on the CT and MR sample volumes (predicted labels); no validation (with two training "
                "volumes a split would train on one), so the last adapter is kept. Test: another CT (predicted "
                "labels) and the dcmqi CT's manual liver (it annotates no spleen or kidney); Dice per axial slice.",
          absent=PHOTO_LABELS),
)}


@dataclasses.dataclass(frozen=True)
class Run:
    """A trained column of a study."""
    key: str
    title: str
    tune: str = "ssam"
    tiles: str = "auto"


SSAM = Run("ssam", "S-SAM")
NORMS = Run("norms", "norms-only", tune="norms")
TILES_OFF = Run("ssam-tiles-off", "S-SAM, tiles off", tiles="off")
BOX = "box"


def _log(message):
    print(message, flush=True)


def _write_json(path: Path, value):
    with atomic_output(path, suffix=".json") as temporary:
        Path(temporary).write_text(json.dumps(value, indent=1) + "\n")


def _sha256(path: Path) -> str:
    from SSAMSegmentLib.model.weights import file_sha256

    return file_sha256(path)


# --- training ---------------------------------------------------------------------------------------------------


def train_run(study: Study, run: Run, data: Path, work: Path, budget: Optional[float], seed: int, base: str, log=_log,
              steps: Optional[int] = None) -> dict:
    """Train one column (or reuse the finished run in `work`, or resume the interrupted one): its record."""
    from SSAMSegmentLib.training.trainer import TrainingConfig, train

    settings = {"train": list(study.train), "val": list(study.val) if study.val else None, "labels": list(study.labels),
                "val_fraction": None if study.val else study.val_fraction, "budget_minutes": budget, "seed": seed,
                "base": base, "tune": run.tune, "tiles": run.tiles, "steps": steps}
    record_path = work / f"{run.key}.result.json"
    if record_path.is_file():
        record = json.loads(record_path.read_text())
        if record["settings"] != settings:
            raise SSAMError(f"{record_path} is a run with other settings ({record['settings']}); give another --work "
                            f"or delete that run's files to train it again")
        log(f"{study.name} / {run.title}: finished run reused ({record_path})")
        return record
    output = work / f"{run.key}.adapter.safetensors"
    config = TrainingConfig(data=[str(data / name) for name in study.train],
                            val_data=[str(data / name) for name in study.val] if study.val else None,
                            val_fraction=study.val_fraction, labels=list(study.labels), output=str(output), base=base,
                            budget_minutes=budget, steps=steps, seed=seed, tune=run.tune, tiles=run.tiles)
    checkpoint = config.checkpoint_path()
    if checkpoint.is_file():
        config.resume = str(checkpoint)
        log(f"{study.name} / {run.title}: resuming {checkpoint}")
    else:
        config.overwrite = True  # an adapter left without its checkpoint is a run killed before its first one

    def progress(update):
        if update.phase != "train" or update.step % 10 == 0:
            log(f"{study.name} / {run.title}: {update.message}"
                + (f" (loss {update.loss:.3f})" if update.loss is not None else ""))

    result = train(config, progress=progress)
    summary = result.summary
    record = {
        "settings": settings, "adapter": str(result.adapter_path),
        "train_minutes": summary["train_seconds"] / 60, "steps_done": result.steps,
        "total_steps": summary["total_steps"], "kept_step": summary["steps"], "stopped_early": summary["stopped_early"],
        "train_slices": summary["train_slices"], "val_slices": summary["val_slices"],
        "val_dice": result.val_dice, "val_dice_classic": result.val_dice_classic,
        "history": result.history,
    }
    _write_json(record_path, record)
    return record


def adapter_tiles(path) -> dict:
    from SSAMSegmentLib.model.adapter import read_metadata

    return read_metadata(Path(path)).get("tiles") or {}


def held_out_overlap(path, case_ids) -> dict:
    """The test cases an adapter's training summary lists among its training or validation cases, matched by case
    name (the last part of the id): an adapter trained before the data's present layout (the shipped one saw Kvasir
    images that are test images now, under polyp-train/) is caught too; so is an unrelated case of the same name."""
    from SSAMSegmentLib.model.adapter import read_metadata

    training = read_metadata(Path(path)).get("training") or {}
    by_name = {case_id.rsplit("/", 1)[-1]: case_id for case_id in case_ids}

    def seen(key):
        return sorted(by_name[name] for name in {str(c).rsplit("/", 1)[-1] for c in training.get(key) or []}
                      if name in by_name)

    return {"trained_on": seen("train_cases"), "validated_on": seen("val_cases")}


# --- test images ------------------------------------------------------------------------------------------------


def held_out_cases(study: Study, data: Path):
    """(case id, image path, {label: reference mask array}) for every test case, with the study's labels that the
    case's own dataset annotates (a label it does not annotate is not scored, not counted as absent)."""
    from SSAMSegmentLib.training.datasets import open_dataset

    wanted = {label_key(name): name for name in study.labels}
    for folder in study.test:
        dataset = open_dataset(data / folder)
        names = {name: wanted[label_key(name)] for name in dataset.label_names if label_key(name) in wanted}
        if not names:
            raise SSAMError(f"test set {data / folder} annotates none of {', '.join(study.labels)}; check the data")
        for case in dataset.cases:
            _, masks = case.load()
            yield f"{folder}/{case.case_id}", case.image_path, {ours: masks[theirs] for theirs, ours in names.items()}


def _slices(geometry, array):
    canonical = geometry.canonical(np.asarray(array))
    for index in range(geometry.num_slices):
        yield index, geometry.slice_view(canonical, index)


def _row(case_id, index, label, metrics, geometry):
    return {"case": case_id, "slice": index if geometry.num_slices > 1 else None, "label": label, **metrics}


ABSENT = " (absent)"  # the row label of a label certainly absent from the test image (Study.absent)


def evaluate_adapter(adapter, cases, labels, log=_log, absent=()) -> dict:
    """Rows of per-image (per-slice) metrics of `adapter` segmenting every test case as `ssam segment` does; the
    `absent` labels (of another kind of image) are asked for too and scored against an empty truth, as
    'LABEL (absent)': their Dice is 1 where the adapter leaves the image empty, else 0."""
    from SSAMSegmentLib.files.image_io import read_image
    from SSAMSegmentLib.inference.slice_geometry import SliceGeometry
    from SSAMSegmentLib.inference.slice_inference import segment_image
    from SSAMSegmentLib.model.loading import load

    model = load(adapter=adapter, merge=True)
    rows, seconds, slices, untaught = [], 0.0, 0, set()
    for case_id, image_path, references in cases:
        image = read_image(image_path)
        requested = [label for label in labels if label in references]
        foreign = [label for label in absent if label not in references]
        result = segment_image(model, image, requested + foreign)
        seconds += result.seconds
        slices += result.slices - result.skipped_slices
        untaught.update(match.requested for match in result.label_status.values() if not match.taught)
        masks = {match.requested: result.masks[match.name] for match in result.label_status.values()}
        geometry = SliceGeometry.for_image(image, result.axis)
        spacing = geometry.in_plane_spacing()
        for label in requested:
            predicted = sitk.GetArrayViewFromImage(masks[label])
            for (index, p), (_, t) in zip(_slices(geometry, predicted), _slices(geometry, references[label])):
                rows.append(_row(case_id, index, label, label_metrics(p, t, spacing), geometry))
        for label in foreign:
            predicted = sitk.GetArrayViewFromImage(masks[label])
            for index, p in _slices(geometry, predicted):
                rows.append(_row(case_id, index, label + ABSENT, label_metrics(p, np.zeros_like(p), spacing),
                                 geometry))
    log(f"  {len(rows)} scored images/slices, {slices} encoded in {seconds:.0f} s")
    return {"rows": rows, "seconds": seconds, "encoded_slices": slices, "untaught": sorted(untaught)}


def evaluate_box_prompt(base, cases, labels, log=_log) -> dict:
    """Rows of the untuned base prompted with each present label's true box, per image (per slice of a volume, cut
    as segment cuts it), at the image's native resolution."""
    import torch

    from SSAMSegmentLib.files.image_io import read_image
    from SSAMSegmentLib.inference.box_prompt import box_prompt_masks, mask_box
    from SSAMSegmentLib.inference.intensity import choose_mapping
    from SSAMSegmentLib.inference.slice_geometry import SliceGeometry
    from SSAMSegmentLib.model.loading import load

    model = load(base=base, merge=True)
    model.eval()
    rows, start, slices = [], time.perf_counter(), 0
    with torch.inference_mode():
        for case_id, image_path, references in cases:
            image = read_image(image_path)
            geometry = SliceGeometry.for_image(image)
            mapping = choose_mapping(image)
            spacing = geometry.in_plane_spacing()
            source = geometry.canonical(sitk.GetArrayViewFromImage(image))
            truths = {label: dict(_slices(geometry, references[label])) for label in labels if label in references}
            for index in range(geometry.num_slices):
                present = [label for label in truths if truths[label][index].any()]
                if not present:
                    continue
                boxes = [mask_box(truths[label][index]) for label in present]
                predicted = box_prompt_masks(model, mapping.apply(geometry.slice_view(source, index)), boxes, spacing)
                slices += 1
                for label, p in zip(present, predicted):
                    rows.append(_row(case_id, index, label, label_metrics(p, truths[label][index], spacing), geometry))
    seconds = time.perf_counter() - start
    log(f"  {len(rows)} boxes on {slices} slices in {seconds:.0f} s")
    return {"rows": rows, "seconds": seconds, "encoded_slices": slices, "untaught": []}


def cached_evaluation(path: Path, key: dict, evaluate) -> dict:
    """The evaluation stored at `path` when it was made with `key` (adapter digest, test sets, labels), else a new
    one."""
    if path.is_file():
        stored = json.loads(path.read_text())
        if stored.get("key") == key:
            return stored
    value = dict(evaluate(), key=key)
    _write_json(path, value)
    return value


def label_means(rows, labels) -> dict:
    """label -> summarize_metrics of its rows (Dice in both readings, IoU, HD95, and their counts)."""
    return {label: summarize_metrics([row for row in rows if row["label"] == label]) for label in labels}


# --- one study --------------------------------------------------------------------------------------------------


def run_study(study: Study, data: Path, work: Path, budget: Optional[float], seed: int = 0, base: str = "litemedsam",
              adapters: Optional[Dict[str, str]] = None, tiles_off: bool = False, command: str = "", log=_log,
              steps: Optional[int] = None) -> dict:
    """Train the study's runs (each for `budget` minutes, or `steps` optimizer steps), evaluate every column on its
    test images; the study's record (all numbers)."""
    from SSAMSegmentLib.model.loading import resolve_adapter

    extra = {name: resolve_adapter(path) for name, path in (adapters or {}).items()}
    for name, path in extra.items():  # before hours of training, not after
        if not path.is_file():
            raise SSAMError(f"adapter {name}={path} does not exist; give an adapter file or 'default'")
    data, work = Path(data), Path(work) / study.name
    work.mkdir(parents=True, exist_ok=True)
    cases = list(held_out_cases(study, data))
    key = {"test": list(study.test), "labels": list(study.labels), "cases": [case_id for case_id, _, _ in cases]}
    adapter_key = dict(key, absent=list(study.absent))
    columns = {}

    def add(name, title, evaluation, **extra):
        means = label_means(evaluation["rows"], study.labels)
        if name == BOX:  # given only where a label is present: no blank-is-1 reading
            for values in means.values():
                values["dice"] = None
        if "adapter" in extra:
            extra.update(held_out_overlap(extra["adapter"], key["cases"]))
            # share of test images/slices each label of another kind leaves empty (1.0: no false positive)
            extra["absent_empty"] = {label: label_means(evaluation["rows"], [label + ABSENT])[label + ABSENT]["dice"]
                                     for label in study.absent}
        columns[name] = {"title": title, "means": means,
                         "test_seconds": evaluation["seconds"], "encoded_slices": evaluation["encoded_slices"],
                         "untaught": evaluation["untaught"], "rows": evaluation["rows"], **extra}

    # neither budget nor steps: no runs trained here, only the box prompt and the adapters named (evaluation only)
    runs = [] if budget is None and steps is None else [SSAM, NORMS] + ([TILES_OFF] if tiles_off else [])
    for run in runs:
        if run is TILES_OFF and not columns[SSAM.key]["tiles"]:
            columns[run.key] = {"title": run.title, "skipped": "the S-SAM run tiled no label, so tiles off is the "
                                                               "same run"}
            log(f"{study.name} / {run.title}: skipped ({columns[run.key]['skipped']})")
            continue
        training = train_run(study, run, data, work, budget, seed, base, log, steps)
        log(f"{study.name} / {run.title}: testing on {len(cases)} cases")
        adapter = Path(training["adapter"])
        evaluation = cached_evaluation(work / f"{run.key}.test.json",
                                       dict(adapter_key, adapter_sha256=_sha256(adapter)),
                                       lambda: evaluate_adapter(adapter, cases, study.labels, log, study.absent))
        add(run.key, run.title, evaluation, adapter=str(adapter), training=training, tiles=adapter_tiles(adapter))
    log(f"{study.name} / box prompt: testing")
    evaluation = cached_evaluation(work / "box.test.json", dict(key, base=base),
                                   lambda: evaluate_box_prompt(base, cases, study.labels, log))
    add(BOX, "box prompt", evaluation, base=base)
    for name, path in extra.items():
        log(f"{study.name} / adapter {name}: testing")
        evaluation = cached_evaluation(work / f"adapter-{name}.test.json",
                                       dict(adapter_key, adapter_sha256=_sha256(path)),
                                       lambda: evaluate_adapter(path, cases, study.labels, log, study.absent))
        add(f"adapter:{name}", name, evaluation, adapter=str(path))
    return {"name": study.name, "title": study.title, "about": study.about, "train": list(study.train),
            "val": list(study.val) if study.val else None, "test": list(study.test), "labels": list(study.labels),
            "test_cases": len(cases), "budget_minutes": budget, "steps": steps, "seed": seed, "base": base, "command": command,
            "date": datetime.date.today().isoformat(), "columns": columns}


# --- the docs section -------------------------------------------------------------------------------------------


def _number(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def study_markdown(record: dict) -> str:
    """One study's subsection: what trained and tested, the table of mean Dice per label, the runs' training."""
    scored = {name: column for name, column in record["columns"].items() if "means" in column}
    header, rule = ["label"], ["---"]
    for name, column in scored.items():
        if name == BOX:
            header.append("box prompt classic")
            rule.append("---")
        else:
            header += [f"{column['title']} Dice", "classic"]
            rule += ["---", "---"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(rule) + "|"]
    labels = record["labels"]
    for label in labels + (["mean over labels"] if len(labels) > 1 else []):
        cells = [label]
        for name, column in scored.items():
            if label in column["means"]:
                means = column["means"][label]
                values = [means["dice_classic"]] if name == BOX else [means["dice"], means["dice_classic"]]
            else:  # the mean over the labels scored
                readings = ["dice_classic"] if name == BOX else ["dice", "dice_classic"]
                values = [_mean_of([column["means"][l][reading] for l in labels]) for reading in readings]
            cells += [_number(value) for value in values]
        lines.append("| " + " | ".join(cells) + " |")
    first = next(iter(scored.values()))
    counts = ", ".join(f"{label} {first['means'][label]['cases']} ({first['means'][label]['dice_classic_cases']} "
                       f"where present)" for label in labels)
    runs = []
    for name, column in record["columns"].items():
        if "skipped" in column:
            runs.append(f"{column['title']}: not trained ({column['skipped']})")
        elif "training" in column:
            training = column["training"]
            stop = ", stopped early" if training["stopped_early"] else ""
            kept = (f"kept step {training['kept_step']} (best validation Dice)" if training["val_slices"]
                    else "no validation: the last step kept")
            runs.append(f"{column['title']}: {training['steps_done']} of {training['total_steps']} steps{stop}, "
                        f"{kept}, {training['train_minutes']:.1f} min")
    empty = [f"{column['title']}: " + ", ".join(f"{label} {_number(share)}" for label, share in
                                              column["absent_empty"].items())
             for column in scored.values() if column.get("absent_empty")]
    notes = [f"{column['title']} was never taught {', '.join(column['untaught'])} (a guess)"
             for column in scored.values() if column["untaught"]]
    for column in scored.values():
        for key, verb in (("trained_on", "trained"), ("validated_on", "chose its kept step")):
            if column.get(key):
                notes.append(f"{column['title']} {verb} on {len(column[key])} of these test cases (by name: "
                             f"{', '.join(column[key][:3])}{' ...' if len(column[key]) > 3 else ''})")
    val = ", ".join(record["val"]) if record["val"] else "a seeded split of the training cases"
    length = (f"{record['steps']} steps each" if record.get("steps") else
              f"budget {record['budget_minutes']:g} min" if record["budget_minutes"] is not None else None)
    return "\n".join([
        f"### {record['title']}",
        "",
        f"Train: {', '.join(record['train'])}; validation: {val}; test: {', '.join(record['test'])} "
        f"({record['test_cases']} cases). {record['about']}",
        "",
        "\n".join(lines),
        "",
        f"Scored test images/slices per label: {counts}. "
        + (f"Training ({length}, seed {record['seed']}): {'; '.join(runs)}." if length
           else "No runs trained here (evaluation only).")
        + (f" Note: {'; '.join(notes)}." if notes else ""),
        "",
        *([f"Labels of another kind of image, which cannot be on these images: share of test images/slices each "
           f"leaves empty (1.000: no false positive). {'; '.join(empty)}.", ""] if empty else []),
        f"Command ({record['date']}): `{record['command']}`",
    ])


def _mean_of(values):
    values = [value for value in values if value is not None]
    return float(np.mean(values)) if values else None


SECTION_INTRO = """Written by `benchmarks/compare_tuning.py` (its docstring says how); everything after this
section is hand-written. Per dataset: S-SAM with the default recipe and norms-only tuning (the singular values
frozen), each given the same `--budget` of training minutes (or `--steps`) and the same seed; the untuned base prompted with the true
mask's bounding box; any other adapter named. All are tested on images that the runs trained here neither trained nor
validated on (another adapter's overlap with them is noted), segmented as `ssam segment` does (whole image, native
resolution). "Dice" counts an empty prediction of an absent label as 1 (the S-SAM paper's reading), "classic"
averages over images (slices) where the label is present only; the box prompt, given only where a label is present,
has only the classic reading. Means per label over the test images."""


def earlier_subsections(docs: Path) -> Dict[str, str]:
    """title -> markdown of each study already in the docs section. A study run in another session (its --work
    folder gone) keeps its subsection, which ends with its own command and date, until it is run again."""
    text = Path(docs).read_text() if Path(docs).is_file() else ""
    start, end = f"<!-- benchmark:{SECTION} -->", f"<!-- /benchmark:{SECTION} -->"
    if start not in text or end not in text:
        return {}
    section = text.split(start, 1)[1].split(end, 1)[0]
    parts = section.split("\n### ")[1:]
    return {part.split("\n", 1)[0].strip(): "### " + part.strip() for part in parts}


def write_docs(records: Dict[str, dict], docs: Path, command: str, threads: int):
    ordered = [records[name] for name in STUDIES if name in records] + \
              [record for name, record in records.items() if name not in STUDIES]
    new = {record["title"]: study_markdown(record) for record in ordered}
    kept = {title: text for title, text in earlier_subsections(docs).items() if title not in new}
    order = [study.title for study in STUDIES.values()]
    subsections = sorted({**new, **kept}.items(), key=lambda item: order.index(item[0]) if item[0] in order
                         else len(order))
    body = "\n\n".join([SECTION_INTRO] + [text for _, text in subsections])
    bench_common.write_section(docs, SECTION, "Per-dataset study: S-SAM, norms-only and the box prompt on test "
                               "images (generated)", body, threads, command=command)


def load_results(work: Path) -> dict:
    path = Path(work) / RESULTS_NAME
    return json.loads(path.read_text()) if path.is_file() else {"studies": {}}


def save_results(work: Path, results: dict):
    _write_json(Path(work) / RESULTS_NAME, results)


def _adapter_argument(text):
    name, _, path = text.partition("=")
    if not name.strip() or not path.strip():
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=PATH; write e.g. shipped=default or "
                                         f"mine=my.adapter.safetensors")
    return name.strip(), path.strip()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", type=Path, help="the folder written by scripts/build_default_training_data.py")
    parser.add_argument("--work", type=Path, default=Path("/tmp/ssam-compare"),
                        help="runs, checkpoints, evaluations and compare_tuning.json (reused on the next call)")
    parser.add_argument("--studies", nargs="+", choices=list(STUDIES), default=list(STUDIES))
    parser.add_argument("--budget", type=float, help="training minutes of each trained run (S-SAM, norms-only); "
                                                     "without it nothing is trained: the box prompt and --adapter only")
    parser.add_argument("--steps", type=int, help="instead of --budget: optimizer steps of each trained run (equal "
                                                  "steps rather than equal minutes)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--base", default="litemedsam", help="base model of the trained runs and the box prompt")
    parser.add_argument("--adapter", type=_adapter_argument, action="append", default=[], metavar="NAME=PATH",
                        help="also test this adapter ('default': the shipped one); repeatable")
    parser.add_argument("--tiles-off", action="store_true", help="also train S-SAM with tiles='off'")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--docs", type=Path, default=DOCS, help="markdown file whose generated section is replaced")
    parser.add_argument("--no-docs", action="store_true", help="write the JSON only")
    args = parser.parse_args()
    if args.budget is not None and args.steps is not None:
        parser.error("give --budget or --steps, not both")
    bench_common.set_threads(args.threads)
    command = bench_common.command_line()
    missing = [name for study in args.studies for name in STUDIES[study].train + STUDIES[study].test
               + (STUDIES[study].val or ()) if not (args.data / name).is_dir()]
    if missing:
        raise SystemExit(f"compare_tuning: {', '.join(missing)} missing in {args.data}; build it with "
                         f"python scripts/build_default_training_data.py {args.data}")
    args.work.mkdir(parents=True, exist_ok=True)
    results = load_results(args.work)
    for name in args.studies:
        try:
            record = run_study(STUDIES[name], args.data, args.work, args.budget, args.seed, args.base,
                               dict(args.adapter), args.tiles_off, command, steps=args.steps)
        except Cancelled:  # the trainer saved a checkpoint: this script resumes it, no --resume needed
            raise SystemExit(f"compare_tuning: interrupted during {name}; run the same command again to resume") \
                from None
        except SSAMError as error:
            raise SystemExit(f"compare_tuning: {error}") from None
        results["studies"][name] = record
        save_results(args.work, results)  # after every study: an interrupted call keeps the studies done
        print(study_markdown(record), flush=True)
    if not args.no_docs:  # only this call's studies: the others keep the docs' subsection (or have none yet)
        write_docs({name: results["studies"][name] for name in args.studies}, args.docs, command, args.threads)


if __name__ == "__main__":
    main()
