"""The shipped default adapter loads, and its model card (Resources/Models/ssam-default.md, written by
scripts/write_model_card.py) says what the adapter's own metadata says: labels, base, training data, validation Dice.

Nothing here names today's labels or numbers: the adapter is retrained and replaced, and the card must follow it."""

import re

import pytest

import SSAMSegmentLib
from SSAMSegmentLib.model.adapter import read_metadata
from SSAMSegmentLib.model.loading import DEFAULT_ADAPTER

CARD = DEFAULT_ADAPTER.parent / "ssam-default.md"


@pytest.fixture(scope="module")
def metadata():
    return read_metadata(DEFAULT_ADAPTER)


@pytest.fixture(scope="module")
def card():
    return CARD.read_text()


def _section(card, title):
    """The text of the card's '## title' section."""
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", card, re.S | re.M)
    assert match, f"the model card has no '## {title}' section"
    return match.group(1)


def _table(text):
    """The rows (lists of cells) of the first markdown table in `text`, header and rule left out."""
    rows = [line for line in text.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in rows[2:]]


def _dice(cell):
    return None if cell == "-" else float(cell)


def _rounded(value):
    return None if value is None else round(float(value), 3)


def test_the_shipped_adapter_loads_with_its_labels_taught(metadata):
    model = SSAMSegmentLib.load(adapter="default", device="cpu")
    assert model.labels.taught_names() == metadata["labels"] and metadata["labels"]
    assert model.spec.id == metadata["base"] and model.text_encoder_id == metadata["text_encoder"]
    assert model.base_sha256 == metadata["base_sha256"]


def test_card_names_the_adapter_base_and_labels(metadata, card):
    assert f"`{DEFAULT_ADAPTER.name}`" in card
    assert f"**{metadata['base']}** base" in card and f"`{metadata['base_sha256']}`" in card
    assert f"**{metadata['text_encoder']}** text encoder" in card
    assert f"{len(metadata['tensors'])} tensors" in card
    listed = re.search(r"^Labels: (.*)\.$", card, re.M)
    assert listed and listed.group(1).split(", ") == metadata["labels"]


def test_card_validation_dice_is_the_metadata_dice(metadata, card):
    training = metadata["training"]
    rows = _table(_section(card, "Validation Dice (unseen cases)"))
    assert [row[0] for row in rows] == metadata["labels"]
    for label, dice, classic in rows:
        assert _dice(dice) == _rounded(training["val_dice_per_label"].get(label)), label
        assert _dice(classic) == _rounded(training.get("val_dice_classic_per_label", {}).get(label)), label
    mean = re.search(r"Mean Dice: ([\d.]+) at step (\d+) \(pass (\d+) over", card)
    assert mean, "the card gives no mean validation Dice"
    assert (float(mean.group(1)), int(mean.group(2)), int(mean.group(3))) == (
        _rounded(training["val_dice"]), training["steps"], training["epochs"])


def test_card_training_data_is_the_metadata_data(metadata, card):
    """Every dataset the adapter trained or validated on is a row of the card's data table, marked as what it was,
    and the table lists no other dataset; the slice count is the adapter's."""
    training = metadata["training"]
    trained = {case.split("/")[0] for case in training["train_cases"]}
    validated = {case.split("/")[0] for case in training["val_cases"]}
    assert trained and validated and not trained & validated  # validation cases are never trained on
    rows = _table(_section(card, "Training data"))
    in_card = {"train": set(), "validation": set()}
    for row in rows:
        name, _, note = row[0].partition(" (")
        in_card["validation" if note.startswith("validation") else "train"].add(name.strip())
    assert in_card == {"train": trained, "validation": validated}
    slices = re.search(r"(\d+) training slices", card)
    assert slices and int(slices.group(1)) == training["train_slices"]


def test_card_says_what_the_training_started_from(metadata, card):
    start = (metadata.get("training") or {}).get("start_from")
    training = _section(card, "Training")
    if start:
        assert f"`{start['file']}` (SHA256 `{start['sha256']}`)" in training
    else:
        assert "Started from the base model's own weights" in training


def test_the_card_reports_labels_of_another_kind_from_the_test_results(tmp_path):
    """The card's line on labels asked for on another kind of image follows compare_tuning.json, not a fixed text."""
    import importlib.util
    import json

    from conftest import REPO

    spec = importlib.util.spec_from_file_location("write_model_card", REPO / "scripts" / "write_model_card.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    results = tmp_path / "compare_tuning.json"
    studies = {"ct": {"title": "CT organs (TotalSegmentator)", "columns": {
        "adapter:new": {"absent_empty": {"polyp": 0.25, "gland": 1.0}}}}}
    results.write_text(json.dumps({"studies": studies}))
    line = script._other_kinds(script._absent_empty(results, "new"))
    assert "marks false positives: polyp on 75% of the CT organs (TotalSegmentator) test images" in line
    assert "gland" not in line
    studies["ct"]["columns"]["adapter:new"]["absent_empty"]["polyp"] = 0.99
    results.write_text(json.dumps({"studies": studies}))
    assert "left at least 95% of every test set empty" in script._other_kinds(script._absent_empty(results, "new"))
    assert "not measured" in script._other_kinds(script._absent_empty(None, "new"))


def test_card_says_what_kinds_of_image_each_label_was_taught_on(metadata, card):
    """The adapter records them (segmenting warns from them); the card's 'Taught on' line lists the same."""
    from SSAMSegmentLib.files.image_io import IMAGE_KINDS

    kinds = metadata.get("image_kinds")
    assert kinds and set(kinds) == set(metadata["labels"])
    line = re.search(r"^Taught on (.*?)\. Asked on another kind", card, re.M)
    assert line, "the card has no 'Taught on' line"
    listed = {}
    for group in line.group(1).split("; "):
        described, names = group.split(": ")
        for name in names.split(", "):
            listed[name] = described
    plural = {value[1]: key for key, value in IMAGE_KINDS.items()}
    assert {name: [plural[k] for k in described.split(" and ")] for name, described in listed.items()} == kinds


def test_card_lists_the_tiled_labels_of_the_metadata(metadata, card):
    line = re.search(r"^Segmented in native-resolution tiles on larger images: (.*?); the other", card, re.M)
    assert line, "the card has no tiles line"
    tiles = metadata.get("tiles") or {}
    listed = re.findall(r"(\w[\w ]*) \((\d+) px, overlap (\d+)\)", line.group(1))
    assert {label: {"tile": int(t), "overlap": int(o)} for label, t, o in listed} == tiles


def test_card_names_the_labels_with_the_self_prompted_box(metadata, card):
    """The adapter's self_box list (what `ssam segment` applies, inference/self_box.py) is the card's list."""
    line = re.search(r"^Self-prompted box \(.*?\): (.*?); chosen where", card, re.M)
    if not (metadata.get("training") or {}).get("self_box"):
        assert "self-prompted box was not tried" in card and not metadata.get("self_box")
        return
    assert line, "the card has no self-prompted box line"
    assert (line.group(1).split(", ") if line.group(1) != "none" else []) == metadata.get("self_box", [])


def test_card_names_the_routed_labels_of_the_metadata(metadata, card):
    """Labels another network computes (model/label_routes.py) are the card's, with the run that trained them."""
    routes = metadata.get("routes") or []
    if not routes:
        assert "no label routes" in card
        return
    line = re.search(r"^Label routes \(.*?\): (.*?)\. The other labels", card, re.M)
    assert line, "the card has no label routes line"
    listed = re.findall(r"(?:^|; )([\w ,]+?) through the network of `([^`]+)`", line.group(1))
    assert [(names.split(", "), file) for names, file in listed] == [
        (route["labels"], route["training"]["file"]) for route in routes]
    for route in routes:
        assert f"Routed labels ({', '.join(route['labels'])})" in _section(card, "Training")
