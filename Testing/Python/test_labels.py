"""Label names (SSAMSegmentLib/model/labels.py): normalising, splitting, the taught / mapped / untaught decision, and
the wording every front end uses. The exact words are checked here, once; the CLI, batch script, Python API and
Slicer Logic tests check that they use them (through the constants and functions of labels.py)."""

import tempfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

import SSAMSegmentLib

from SSAMSegmentLib import SSAMError
from SSAMSegmentLib.model import labels
from SSAMSegmentLib.model.labels import label_key, match_label, match_labels, parse_labels, split_labels

from helpers import perturbed_model

TRAINED = ["liver", "spleen", "kidney", "polyp", "nucleus", "gland"]


def test_label_key_normalises_case_and_underscores():
    assert label_key("  Kidney_Left ") == label_key("kidney left") == "kidney left"


def test_labels_split_on_commas_semicolons_and_lines_and_repeat_once():
    assert split_labels(" liver, spleen;; kidney left\n") == ["liver", "spleen", "kidney left"]
    assert split_labels(["liver", "spleen,kidney", " "]) == ["liver", "spleen", "kidney"]  # repeated --label
    assert split_labels(None) == [] and split_labels("") == []
    assert parse_labels(["Liver", "liver", "LIVER_", "spleen"]) == ["Liver", "spleen"]  # first spelling kept
    for empty in ("", " , ", [], [" "]):
        with pytest.raises(SSAMError, match="no label name given"):
            parse_labels(empty)


@pytest.mark.parametrize("typed, name", [("Liver", "liver"), ("LIVER ", "liver"), ("Gland", "gland")])
def test_trained_names_are_taught_whatever_the_case(typed, name):
    assert match_label(typed, TRAINED) == labels.LabelMatch(typed, name, labels.TAUGHT)


@pytest.mark.parametrize("typed, name", [("Glands", "gland"), ("kidneys", "kidney"), ("nuclei", "nucleus"),
                                         ("Polyps", "polyp"), ("SPLEENS", "spleen")])
def test_plurals_are_mapped_to_the_trained_label_and_say_so(typed, name):
    match = match_label(typed, TRAINED)
    assert (match.name, match.status, match.mapped_from, match.taught) == (name, labels.MAPPED, typed, True)
    assert match.describe() == f"mapped from '{typed}'"


def test_a_trained_plural_takes_the_singular_too():
    assert match_label("nucleus", ["nuclei"]) == labels.LabelMatch("nucleus", "nuclei", labels.MAPPED)
    assert match_label("lymph node", ["lymph nodes"]).status == labels.MAPPED


@pytest.mark.parametrize("typed", ["kidney left", "liver tumour", "adrenal glands", "pancreas", "tumour", "glandular",
                                   "liver_parenchyma"])
def test_other_structures_are_untaught_not_mapped(typed):
    """A part, a lesion or a neighbour of a trained structure is another structure: never read as it."""
    match = match_label(typed, TRAINED + ["pancrea"])  # "pancreas" is not the plural of anything
    assert (match.name, match.status, match.taught, match.mapped_from) == (typed, labels.UNTAUGHT, False, None)


def test_repeats_after_mapping_are_one_label():
    matches = match_labels(["kidney, kidneys", "Kidney", "tumour"], TRAINED)
    assert [(m.requested, m.name, m.status) for m in matches] == [("kidney", "kidney", labels.TAUGHT),
                                                                 ("tumour", "tumour", labels.UNTAUGHT)]


def test_the_wording_checked_once():
    assert labels.EMPTY_UNTAUGHT == "not found (untaught label)"
    assert labels.EMPTY_TAUGHT == "absent (empty mask)"
    assert labels.empty_report(["spleen", "tumour", "cyst"], ["tumour", "Cyst"]) == [
        "absent (empty mask): spleen", "not found (untaught label): tumour, cyst"]
    matches = match_labels(["Glands", "tumour", "liver"], TRAINED)
    assert labels.mapping_note(matches) == "'Glands' segmented as the trained label 'gland'"
    warning = labels.untaught_warning(matches, TRAINED)
    assert warning.startswith("the model was never taught 'tumour' (its labels: liver, spleen, kidney, polyp, "
                              "nucleus, gland): its mask is a guess")
    assert "`ssam train DATA --labels tumour --output tumour.adapter.safetensors`" in warning
    assert "Fine-tune" in warning and "\n" not in warning and "absent" not in warning
    assert labels.untaught_warning(match_labels(["liver", "kidneys"], TRAINED), TRAINED) is None
    assert labels.mapping_note(match_labels(["liver", "tumour"], TRAINED)) is None


def test_the_fix_is_a_command_ssam_train_accepts():
    """The command the warning gives is parsed by the real `ssam train` arguments, as a shell would split it."""
    import shlex

    from SSAMSegmentLib.cli import build_parser

    for names, output in ((["kidney left", "cyst"], "kidney-left.adapter.safetensors"),
                          (["gland"], "gland.adapter.safetensors"), (["T1/lesion"], "t1-lesion.adapter.safetensors")):
        command = shlex.split(labels.fine_tune_fix(names).split("`")[1])
        assert command[:2] == ["ssam", "train"]
        args = build_parser().parse_args(command[1:])
        assert (args.data, split_labels(args.labels), args.output) == (["DATA"], names, output)


# --- the Python API -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model():
    return perturbed_model(labels=("organ", "vessel"), seed=3, image_size=64)


def _picture():
    """A noisy grey picture with a bright blob: something for the random-weight model to respond to."""
    rng = np.random.default_rng(0)
    array = rng.normal(80, 20, (48, 56)).astype(np.float32)
    yy, xx = np.mgrid[:48, :56]
    array[(yy - 20) ** 2 + (xx - 30) ** 2 < 120] += 120
    return array


def test_result_says_per_label_taught_mapped_or_untaught(model):
    result = model.segment(_picture(), ["Organs", "vessel", "tumour", "organ"])
    assert list(result.masks) == ["organ", "vessel", "tumour"]  # "organ" repeats "Organs" once mapped
    status = {name: (m.status, m.mapped_from) for name, m in result.label_status.items()}
    assert status == {"organ": (labels.MAPPED, "Organs"), "vessel": (labels.TAUGHT, None),
                      "tumour": (labels.UNTAUGHT, None)}
    assert result.untaught_labels == ["tumour"] and result.trained_labels == ["organ", "vessel"]
    matches = list(result.label_status.values())
    assert result.notes == [labels.mapping_note(matches)] == ["'Organs' segmented as the trained label 'organ'"]
    assert result.warnings == [labels.untaught_warning(matches, ["organ", "vessel"])]
    # Mapped means segmented as the trained label: the same mask as typing the trained name.
    same = model.segment(_picture(), ["organ"])
    assert np.array_equal(*(sitk.GetArrayFromImage(r.masks["organ"]) for r in (result, same)))


def test_an_empty_untaught_label_is_not_found_never_absent(model):
    result = model.segment(_picture(), ["organ", "tumour"], threshold=0.999999)
    assert result.empty_labels == ["organ", "tumour"]
    summary = result.summary()
    assert f"{labels.EMPTY_TAUGHT}: organ" in summary and f"{labels.EMPTY_UNTAUGHT}: tumour" in summary
    absent = [part for part in summary.split("; ") if "absent" in part]
    assert absent == [f"{labels.EMPTY_TAUGHT}: organ"]  # the taught label only
    assert result.notes == [] and len(result.warnings) == 1 and "'tumour'" in result.warnings[0]


def test_a_looked_up_label_is_not_stored_as_trained(tmp_path):
    from SSAMSegmentLib.model.adapter import read_metadata

    model = perturbed_model(labels=("organ",), seed=4, image_size=64)
    model.segment(_picture(), ["organ", "tumour"])
    assert model.labels.knows("tumour") and model.labels.taught_names() == ["organ"]
    path = model.save_adapter(tmp_path / "a.adapter.safetensors")
    assert read_metadata(path)["labels"] == ["organ"]
    loaded = SSAMSegmentLib.load(base="test-vit", adapter=path, image_size=64)
    assert loaded.labels.taught_names() == ["organ"]


# --- labels asked on another kind of image than they were taught on -------------------------------------------------


def test_other_kind_wording_checked_once():
    kinds = {"liver": ["3D"], "nucleus": ["2D", "2D RGB"], "polyp": ["2D RGB"]}
    matches = match_labels(["Livers", "nucleus", "polyp", "tumour", "spleen"], TRAINED)
    # liver (mapped from "Livers") was taught on volumes only; spleen has no record (an older adapter): no claim
    assert labels.other_kind(matches, kinds, "2D RGB") == ["liver"]
    assert labels.other_kind(matches, kinds, "3D") == ["nucleus", "polyp"]
    assert labels.other_kind(matches, kinds, "2D") == ["liver", "polyp"]
    warning = labels.other_kind_warning(["nucleus", "polyp"], kinds, "3D")
    assert warning.startswith("this is a 3D volume, and the model was taught 'nucleus' only on 2D grey images and "
                              "2D colour images; 'polyp' only on 2D colour images: their masks are a guess here")
    assert "fine-tune on images like this one where they are outlined" in warning and "\n" not in warning
    assert "absent" not in warning and labels.other_kind_warning([], kinds, "3D") is None
    assert labels.EMPTY_OTHER_KIND == "not found (taught on other kinds of image)"
    assert labels.empty_report(["spleen", "liver", "tumour"], ["tumour"], ["liver"]) == [
        "absent (empty mask): spleen", "not found (untaught label): tumour",
        "not found (taught on other kinds of image): liver"]


def test_a_label_taught_on_volumes_asked_on_a_photograph_is_a_guess(model):
    """The record travels in the adapter file; the result, its summary and its warning say it, and an empty mask is
    never called absent there. On the kind it was taught on nothing is said."""
    from SSAMSegmentLib.model.adapter import read_metadata

    model.label_kinds = {"organ": ["3D"], "vessel": ["2D", "2D RGB"]}
    try:
        grey = _picture()
        photo = sitk.GetImageFromArray(np.stack([grey] * 3, -1).clip(0, 255).astype(np.uint8), isVector=True)
        result = model.segment(photo, ["organ", "vessel"], threshold=0.999999)
        assert result.other_kind_labels == ["organ"]
        assert result.warnings == [labels.other_kind_warning(["organ"], model.label_kinds, "2D RGB")]
        assert f"{labels.EMPTY_OTHER_KIND}: organ" in result.summary() and "absent (empty mask): vessel" in \
            result.summary() and "absent (empty mask): organ" not in result.summary()
        found = model.segment(photo, ["organ"], threshold=0.01)
        assert not found.empty_labels and "taught on other kinds of image: a guess" in found.summary()
        volume = model.segment(sitk.JoinSeries([sitk.GetImageFromArray(grey)] * 3), ["organ", "vessel"])
        assert volume.other_kind_labels == ["vessel"] and volume.warnings == [
            labels.other_kind_warning(["vessel"], model.label_kinds, "3D")]
        assert model.segment(grey, ["vessel"]).warnings == []  # 2D grey: taught
        path = model.save_adapter(Path(tempfile.mkdtemp()) / "kinds.adapter.safetensors")
        assert read_metadata(path)["image_kinds"] == {"organ": ["3D"], "vessel": ["2D", "2D RGB"]}
        loaded = SSAMSegmentLib.load(base="test-vit", image_size=64, adapter=path, device="cpu")
        assert loaded.label_kinds == model.label_kinds
    finally:
        model.label_kinds = {}


def test_a_label_learnt_poorly_is_never_called_absent():
    """labels.weak reads the adapter's validation Dice where present: under WEAK_BELOW a taught label's empty mask is
    "not found (learnt poorly)"; a label without a score, or an untaught one, is not judged by it."""
    matches = labels.match_labels(["Spines", "liver", "lung", "tumour"], ["liver", "spine", "lung"])
    validation = {"liver": 0.93, "spine": 0.0}  # lung: never present in the validation data
    assert labels.weak(matches, validation) == ["spine"]
    assert labels.EMPTY_WEAK == "not found (learnt poorly)"
    assert labels.empty_report(["spine", "liver", "lung", "tumour"], ["tumour"], [], ["spine"]) == [
        "absent (empty mask): liver, lung", "not found (untaught label): tumour", "not found (learnt poorly): spine"]
    # taught on other kinds of image says more than learnt poorly: one line per label
    assert labels.empty_report(["spine"], [], ["spine"], ["spine"]) == ["not found (taught on other kinds of image): spine"]
