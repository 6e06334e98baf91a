"""benchmarks/compare_tuning.py end to end on tiny disk datasets with the test-vit base: the table and the JSON hold
the Dice measured on the test images (recomputed here independently), a second call reuses the finished runs, and
the docs section is replaced while the hand-written text after it stays."""

import importlib.util
import json
import re
import sys

import numpy as np
import pytest
import SimpleITK as sitk

import SSAMSegmentLib
from conftest import REPO
from helpers import perturbed_model
from test_datasets import make_nnunet_v2
from test_training import write_disk_dataset

pytestmark = pytest.mark.slow  # tiny trainings, but many model loads and evaluations: ~50 s of CPU for both tests


def _compare_tuning():
    sys.path.insert(0, str(REPO / "benchmarks"))
    spec = importlib.util.spec_from_file_location("compare_tuning", REPO / "benchmarks" / "compare_tuning.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _dice(predicted, truth):
    total = predicted.sum() + truth.sum()
    return 1.0 if total == 0 else 2.0 * (predicted & truth).sum() / total


def _test_images(folder):
    """(image, {label: truth}) per test image, read here from the files (labels.json: 1 disk, 2 square)."""
    for path in sorted((folder / "images").glob("*.png")):
        image = sitk.ReadImage(str(path))
        labelmap = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "masks" / path.name)))
        yield image, {"disk": labelmap == 1, "square": labelmap == 2}


def _independent_means(adapter, folder):
    """Mean Dice per label of the adapter on the test images: blank-is-1 over all, classic over present ones."""
    model = SSAMSegmentLib.load(adapter=adapter, merge=True)
    blank, classic = {"disk": [], "square": []}, {"disk": [], "square": []}
    for image, truths in _test_images(folder):
        result = model.segment(image, ["disk", "square"])
        for label, truth in truths.items():
            dice = _dice(sitk.GetArrayFromImage(result.masks[label]).astype(bool), truth)
            blank[label].append(dice)
            if truth.any():
                classic[label].append(dice)
    return ({label: float(np.mean(v)) for label, v in blank.items()},
            {label: float(np.mean(v)) for label, v in classic.items()})


def _independent_box_means(folder):
    from SSAMSegmentLib.inference.box_prompt import box_prompt_masks
    from SSAMSegmentLib.inference.intensity import choose_mapping

    model = SSAMSegmentLib.load(base="test-vit", merge=True)
    scores = {"disk": [], "square": []}
    for image, truths in _test_images(folder):
        rgb = choose_mapping(image).apply(sitk.GetArrayFromImage(image))
        for label, truth in truths.items():
            if truth.any():
                rows, cols = np.nonzero(truth)
                box = (cols.min(), rows.min(), cols.max(), rows.max())
                scores[label].append(_dice(box_prompt_masks(model, rgb, [box])[0].astype(bool), truth))
    return {label: float(np.mean(v)) for label, v in scores.items()}


def _table_row(text, label):
    line = next(line for line in text.splitlines() if line.startswith(f"| {label} |"))
    return [cell.strip() for cell in line.strip("|").split("|")][1:]


def test_study_table_and_json_hold_the_measured_test_dice(tmp_path):
    compare = _compare_tuning()
    data = tmp_path / "data"
    write_disk_dataset(data / "train", count=6, seed=0)
    write_disk_dataset(data / "val", count=2, seed=1)
    write_disk_dataset(data / "test", count=4, seed=2)  # a square on images 1 and 3 only: the readings differ
    for path in sorted((data / "test").glob("*/c*.png")):  # names of their own: runs name their cases
        path.rename(path.with_name("t" + path.name[1:]))
    study = compare.Study("disks", "Disks", ("train",), ("test",), ("disk", "square"), val=("val",), about="Tiny.")
    work = tmp_path / "work"
    with pytest.raises(SSAMSegmentLib.SSAMError, match="adapter gone=.* does not exist"):
        compare.run_study(study, data, work, budget=0.05, base="test-vit", adapters={"gone": str(tmp_path / "no")})
    record = compare.run_study(study, data, work, budget=0.05, base="test-vit", tiles_off=True,
                               command="python benchmarks/compare_tuning.py DATA --budget 0.05", log=lambda m: None)

    columns = record["columns"]
    assert list(columns) == ["ssam", "norms", "ssam-tiles-off", "box"]
    assert "tiled no label" in columns["ssam-tiles-off"]["skipped"]  # 48x48 images: tiles would be the same run
    for key, tune in (("ssam", "ssam"), ("norms", "norms")):
        training = columns[key]["training"]
        assert training["settings"]["tune"] == tune and training["settings"]["budget_minutes"] == 0.05
        assert training["steps_done"] >= 1 and training["train_minutes"] > 0
        blank, classic = _independent_means(training["adapter"], data / "test")
        for label in ("disk", "square"):
            assert columns[key]["means"][label]["dice"] == pytest.approx(blank[label])
            assert columns[key]["means"][label]["dice_classic"] == pytest.approx(classic[label])
        assert columns[key]["means"]["disk"]["cases"] == 4 and columns[key]["means"]["square"]["cases"] == 4
        assert columns[key]["means"]["square"]["dice_classic_cases"] == 2
        assert columns[key]["trained_on"] == [] and columns[key]["validated_on"] == []
    box = _independent_box_means(data / "test")
    assert columns["box"]["means"]["disk"]["dice_classic"] == pytest.approx(box["disk"])
    assert columns["box"]["means"]["square"]["dice_classic"] == pytest.approx(box["square"])
    assert columns["box"]["means"]["disk"]["dice"] is None  # no blank-is-1 reading for a box given where present
    assert columns["box"]["means"]["square"]["cases"] == 2

    text = compare.study_markdown(record)
    ssam, norms, disk_box = columns["ssam"]["means"]["disk"], columns["norms"]["means"]["disk"], box["disk"]
    assert _table_row(text, "disk") == [f"{ssam['dice']:.3f}", f"{ssam['dice_classic']:.3f}", f"{norms['dice']:.3f}",
                                        f"{norms['dice_classic']:.3f}", f"{disk_box:.3f}"]
    mean_row = _table_row(text, "mean over labels")
    assert mean_row[0] == f"{np.mean([columns['ssam']['means'][l]['dice'] for l in ('disk', 'square')]):.3f}"
    assert "S-SAM, tiles off: not trained" in text and "--budget 0.05" in text

    # A second call reuses both runs (no training: the adapters are untouched) and adds another adapter's column,
    # here the S-SAM file under another name: the same file gives the same numbers.
    adapter = columns["ssam"]["training"]["adapter"]
    before = {key: (work / "disks" / f"{key}.adapter.safetensors").stat().st_mtime_ns for key in ("ssam", "norms")}
    again = compare.run_study(study, data, work, budget=0.05, base="test-vit", adapters={"copy": adapter},
                              log=lambda m: None)
    assert {key: (work / "disks" / f"{key}.adapter.safetensors").stat().st_mtime_ns for key in before} == before
    assert again["columns"]["adapter:copy"]["means"] == again["columns"]["ssam"]["means"] == columns["ssam"]["means"]
    with pytest.raises(SSAMSegmentLib.SSAMError, match="other settings"):
        compare.run_study(study, data, work, budget=0.1, base="test-vit", log=lambda m: None)

    # Equal steps instead of equal minutes: each run trains exactly that many steps, and the table says so.
    stepped = compare.run_study(study, data, tmp_path / "work-steps", budget=None, steps=2, base="test-vit",
                                log=lambda m: None)
    for key in ("ssam", "norms"):
        training = stepped["columns"][key]["training"]
        assert training["steps_done"] == training["total_steps"] == 2 and training["settings"]["steps"] == 2
    assert "Training (2 steps each, seed 0)" in compare.study_markdown(stepped)

    # The docs: the generated section replaced in place, the hand-written text after its end marker kept.
    docs = tmp_path / "fine_tuning.md"
    # A study of another session (not in this --work's JSON) keeps its subsection; this study's old one is replaced.
    polyp = compare.STUDIES["polyp"].title
    docs.write_text("# Fine-tuning\n\n<!-- benchmark:compare-tuning -->\nold numbers\n\n"
                    f"### {study.title}\n\nold disks table\n\n### {polyp}\n\nkept polyp table\n"
                    "<!-- /benchmark:compare-tuning -->\n\n## Reading (hand-written)\n\nKept.\n")
    compare.save_results(work, {"studies": {"disks": again}})
    compare.write_docs(compare.load_results(work)["studies"], docs, "python benchmarks/compare_tuning.py X", 1)
    written = docs.read_text()
    assert "old numbers" not in written and written.count("<!-- /benchmark:compare-tuning -->") == 1
    assert "old disks table" not in written and written.count(f"### {study.title}") == 1
    assert "kept polyp table" in written and written.index(f"### {polyp}") < written.index(f"### {study.title}")
    assert written.endswith("## Reading (hand-written)\n\nKept.\n")
    assert _table_row(written, "disk")[-2:] == [f"{ssam['dice']:.3f}", f"{ssam['dice_classic']:.3f}"]
    stored = json.loads((work / "compare_tuning.json").read_text())["studies"]["disks"]
    assert stored["columns"]["ssam"]["means"] == columns["ssam"]["means"]
    assert len(stored["columns"]["ssam"]["rows"]) == 8  # per image and label
    assert re.search(r"Command: `python benchmarks/compare_tuning.py X`", written)


def test_volumes_are_scored_per_slice_for_the_labels_their_dataset_annotates(tmp_path):
    """CT-like volumes (one oblique): a row per slice and annotated label, the same Dice as cutting the mask along the
    axis segment used; 'kidney' is not among the dataset's labels (it has kidney_left), so it is not scored."""
    compare = _compare_tuning()
    arrays = make_nnunet_v2(tmp_path / "data" / "ct")
    study = compare.Study("ct", "CT", ("unused",), ("ct",), ("liver", "spleen", "kidney"), val_fraction=0.0)
    adapter = perturbed_model(labels=("liver", "spleen", "kidney")).save_adapter(tmp_path / "a.adapter.safetensors")
    cases = list(compare.held_out_cases(study, tmp_path / "data"))
    assert [case_id for case_id, _, _ in cases] == ["ct/liver_001", "ct/liver_002", "ct/liver_003"]
    assert all(sorted(references) == ["liver", "spleen"] for _, _, references in cases)

    rows = compare.evaluate_adapter(adapter, cases, study.labels, log=lambda m: None)["rows"]
    model = SSAMSegmentLib.load(adapter=adapter, merge=True)
    for case_id, image_path, references in cases:
        result = model.segment(sitk.ReadImage(str(image_path)), ["liver", "spleen"])
        for label in ("liver", "spleen"):
            predicted = sitk.GetArrayFromImage(result.masks[label]).astype(bool)
            truth = references[label].astype(bool)
            expected = sorted(_dice(np.take(predicted, k, result.array_axis), np.take(truth, k, result.array_axis))
                              for k in range(truth.shape[result.array_axis]))
            measured = sorted(row["dice"] for row in rows if row["case"] == case_id and row["label"] == label)
            assert measured == pytest.approx(expected)
    assert not any(row["label"] == "kidney" for row in rows)
    means = compare.label_means(rows, study.labels)
    assert means["kidney"]["cases"] == 0 and means["kidney"]["dice"] is None
    assert means["liver"]["cases"] == sum(labelmap.shape[0] for _, labelmap in arrays.values())  # 16 axial each

    # A label of another kind of image: every slice scored against an empty truth, 1 where the adapter left it empty.
    with_absent = compare.evaluate_adapter(adapter, cases, study.labels, log=lambda m: None, absent=("polyp",))
    assert [row for row in with_absent["rows"] if not row["label"].endswith(compare.ABSENT)] == rows
    polyp_rows = [row for row in with_absent["rows"] if row["label"] == "polyp" + compare.ABSENT]
    assert len(polyp_rows) == means["liver"]["cases"]
    for case_id, image_path, _ in cases:
        result = model.segment(sitk.ReadImage(str(image_path)), ["polyp"])
        predicted = sitk.GetArrayFromImage(result.masks["polyp"]).astype(bool)
        expected = sorted(float(not np.take(predicted, k, result.array_axis).any())
                          for k in range(predicted.shape[result.array_axis]))
        assert sorted(row["dice"] for row in polyp_rows if row["case"] == case_id) == pytest.approx(expected)

    assert compare.held_out_overlap(adapter, [case_id for case_id, _, _ in cases]) == {
        "trained_on": [], "validated_on": []}
    earlier = perturbed_model(labels=("liver",)).save_adapter(tmp_path / "earlier.adapter.safetensors", {
        "train_cases": ["ct-mr/ct", "old-layout/liver_002"], "val_cases": ["ct/liver_003"]})
    assert compare.held_out_overlap(earlier, [case_id for case_id, _, _ in cases]) == {
        "trained_on": ["ct/liver_002"], "validated_on": ["ct/liver_003"]}

    boxes = compare.evaluate_box_prompt("test-vit", cases, study.labels, log=lambda m: None)["rows"]
    for label, value in (("liver", 1), ("spleen", 2)):  # one box per slice showing the label (the two axial cases)
        present = sum(int((labelmap[k] == value).any()) for case_id, (_, labelmap) in arrays.items()
                      if case_id != "liver_001" for k in range(labelmap.shape[0]))
        assert sum(row["label"] == label and not row["case"].endswith("liver_001") for row in boxes) == present
        assert all(row["dice_classic"] is not None for row in boxes)
