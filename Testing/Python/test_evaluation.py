"""Evaluation metrics on hand-computable masks, files and folders of cases, and the real dcmqi label maps."""

import argparse
import csv
import json
from collections import OrderedDict

import numpy as np
import pytest
import SimpleITK as sitk

from SSAMSegmentLib.training import evaluation
from SSAMSegmentLib.errors import SSAMError
from SSAMSegmentLib.training.evaluation import (evaluate, evaluate_case, format_table, hd95, label_metrics, load_masks,
                                       write_report)
from SSAMSegmentLib.files.seg_nrrd import write_seg_nrrd
from SSAMSegmentLib.files.writers import write_label_map


def cube(shape=(30, 30, 30), start=(10, 10, 10), size=10, shift=(0, 0, 0)):
    array = np.zeros(shape, np.uint8)
    lo = [s + d for s, d in zip(start, shift)]
    array[lo[0]:lo[0] + size, lo[1]:lo[1] + size, lo[2]:lo[2] + size] = 1
    return array


def on_grid(array, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0)):
    image = sitk.GetImageFromArray(np.ascontiguousarray(array, dtype=np.uint8))
    image.SetSpacing(spacing[: array.ndim])
    image.SetOrigin(origin[: array.ndim])
    return image


# ------------------------------------------------------------------------------------------------------ metrics
def test_known_overlaps():
    truth = np.zeros((4, 10), np.uint8)
    truth[:, :5] = 1  # 20 voxels
    prediction = np.zeros((4, 10), np.uint8)
    prediction[:, 2:8] = 1  # 24 voxels, 12 shared
    m = label_metrics(prediction, truth, (1.0, 1.0))
    assert m["dice"] == pytest.approx(2 * 12 / 44)
    assert m["dice_classic"] == pytest.approx(2 * 12 / 44)
    assert m["iou"] == pytest.approx(12 / 32)
    assert (m["prediction_voxels"], m["reference_voxels"]) == (24, 20)
    # Surfaces: the truth's rim columns 0 and 4 (plus rows 0 and 3), the prediction's columns 2 and 7 (...).
    assert m["hd95_mm"] == pytest.approx(3.0)


def test_blank_conventions():
    blank = np.zeros((5, 6, 7), np.uint8)
    organ = cube((5, 6, 7), (1, 1, 1), 3)
    both_blank = label_metrics(blank, blank, (1, 1, 1))
    assert both_blank["dice"] == 1.0 and both_blank["iou"] == 1.0
    assert both_blank["dice_classic"] is None and both_blank["hd95_mm"] is None
    missed = label_metrics(blank, organ, (1, 1, 1))  # prediction empty, truth not
    assert missed["dice"] == 0.0 and missed["dice_classic"] == 0.0 and missed["iou"] == 0.0
    assert missed["hd95_mm"] is None
    false_alarm = label_metrics(organ, blank, (1, 1, 1))  # truth empty, prediction not
    assert false_alarm["dice"] == 0.0 and false_alarm["dice_classic"] is None and false_alarm["hd95_mm"] is None
    perfect = label_metrics(organ, organ, (1, 1, 1))
    assert perfect["dice"] == perfect["dice_classic"] == perfect["iou"] == 1.0 and perfect["hd95_mm"] == 0.0


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_shifted_cube_hd95_follows_the_spacing_of_the_shift_axis(axis):
    """A 10-voxel cube moved by 2 voxels: the moved face (100 of the 488 surface voxels, over 5 %) is exactly
    2 voxels from the nearest surface of the other cube and nothing is farther, so HD95 = 2 x that axis' spacing;
    Dice = 2*800/2000."""
    spacing_zyx = (3.0, 1.0, 0.5)  # anisotropic: z thick slices, x fine
    shift = [0, 0, 0]
    shift[axis] = 2
    truth, prediction = cube(), cube(shift=tuple(shift))
    m = label_metrics(prediction, truth, spacing_zyx)
    assert m["dice"] == pytest.approx(0.8)
    assert m["hd95_mm"] == pytest.approx(2 * spacing_zyx[axis])
    assert hd95(prediction.astype(bool), truth.astype(bool), (1.0, 1.0, 1.0)) == pytest.approx(2.0)


def test_masks_touching_the_image_border_have_surfaces_there():
    full = np.ones((6, 6), bool)
    half = full.copy()
    half[:, 3:] = False
    # Every voxel of a full image is interior except the border ring; the border is a surface, so HD95 is finite.
    assert hd95(half, full, (1.0, 1.0)) == pytest.approx(3.0)


# ---------------------------------------------------------------------------------------------------- one case
def test_evaluate_case_matches_labels_by_name_and_lists_the_rest():
    truth = OrderedDict(liver=on_grid(cube()), Kidney_Left=on_grid(cube(start=(0, 0, 0), size=5)),
                        heart=on_grid(np.zeros((30, 30, 30))))
    prediction = OrderedDict(Liver=on_grid(cube(shift=(0, 0, 2))), heart=on_grid(np.zeros((30, 30, 30))),
                             tumor=on_grid(cube(start=(22, 22, 22), size=3)))
    result = evaluate_case(prediction, truth)
    assert list(result["labels"]) == ["Liver", "heart", "tumor"]
    assert result["labels"]["Liver"]["dice"] == pytest.approx(0.8)
    assert result["labels"]["heart"]["dice"] == 1.0 and result["labels"]["heart"]["dice_classic"] is None
    assert result["labels"]["tumor"]["dice"] == 0.0 and result["not_in_reference"] == ["tumor"]
    assert result["not_predicted"] == ["Kidney_Left"]


def test_geometry_mismatch_names_both_grids():
    with pytest.raises(SSAMError, match=r"size 30x30x30.*size 30x30x31.*different grids"):
        evaluate_case(OrderedDict(liver=on_grid(cube())), OrderedDict(liver=on_grid(np.zeros((31, 30, 30)))))
    with pytest.raises(SSAMError, match=r"spacing 1x1x1.*spacing 1x1x2"):
        evaluate_case(OrderedDict(liver=on_grid(cube())),
                      OrderedDict(liver=on_grid(cube(), spacing=(1.0, 1.0, 2.0))))


def test_2d_prediction_against_a_one_slice_3d_reference():
    disc = np.zeros((20, 20), np.uint8)
    disc[5:15, 5:15] = 1
    prediction = OrderedDict(polyp=on_grid(disc))
    reference = OrderedDict(polyp=on_grid(disc[None]))
    assert evaluate_case(prediction, reference)["labels"]["polyp"]["dice"] == 1.0


# ------------------------------------------------------------------------------------------- files and folders
def test_load_masks_from_label_maps_with_sidecar_json_or_name_value(tmp_path):
    masks = OrderedDict(liver=on_grid(cube()), spleen=on_grid(cube(start=(0, 0, 0), size=4)),
                        tumor=on_grid(np.zeros((30, 30, 30))))
    path = write_label_map(tmp_path / "case.nii.gz", masks)  # with case.json beside it
    loaded = load_masks(path)
    assert list(loaded) == ["liver", "spleen", "tumor"]  # the empty label is kept from the sidecar
    for name in masks:
        assert loaded[name].GetPixelID() == sitk.sitkUInt8
        np.testing.assert_array_equal(sitk.GetArrayViewFromImage(loaded[name]),
                                      sitk.GetArrayViewFromImage(masks[name]))
    assert list(load_masks(path, labels=["SPLEEN"])) == ["spleen"]

    bare = tmp_path / "bare.nrrd"
    sitk.WriteImage(sitk.ReadImage(str(path)), str(bare))
    assert list(load_masks(bare)) == ["1", "2"]  # no names anywhere: the values present
    assert list(load_masks(bare, ["liver=1", "organs=1,2"])) == ["liver", "organs"]
    assert int(sitk.GetArrayViewFromImage(load_masks(bare, ["organs=1,2"])["organs"]).sum()) == 1000 + 64
    groups = tmp_path / "labels.json"
    groups.write_text(json.dumps({"total": {"1": "liver", "2": "spleen"}, "mr": {"1": "spleen"}}))
    assert list(load_masks(bare, str(groups) + ":total")) == ["liver", "spleen"]
    with pytest.raises(SSAMError, match=r"several groups.*labels.json:total"):
        load_masks(bare, str(groups))
    with pytest.raises(SSAMError, match="NAME=VALUE"):
        load_masks(bare, ["liver=one"])

    # A same-named JSON of another kind (a BIDS-style sidecar) does not hide the label map given.
    (tmp_path / "bare.json").write_text(json.dumps({"Manufacturer": "ACME", "SliceThickness": 1.0}))
    assert list(load_masks(bare, ["liver=1"])) == ["liver"]
    with pytest.raises(SSAMError, match="--label-map"):
        load_masks(bare)


def test_evaluate_two_files_seg_nrrd_against_label_map(tmp_path):
    truth = OrderedDict(liver=on_grid(cube()), spleen=on_grid(cube(start=(0, 0, 0), size=4)))
    write_label_map(tmp_path / "truth.nii.gz", truth)
    prediction = OrderedDict(liver=on_grid(cube(shift=(2, 0, 0))), spleen=on_grid(cube(start=(0, 0, 0), size=4)))
    write_seg_nrrd(tmp_path / "case.seg.nrrd", prediction)
    report = evaluate(tmp_path / "case.seg.nrrd", tmp_path / "truth.nii.gz")
    [case] = report["cases"]
    assert case["case"] == "case"
    assert case["labels"]["liver"]["dice"] == pytest.approx(0.8)
    assert case["labels"]["liver"]["hd95_mm"] == pytest.approx(2.0)
    assert case["labels"]["spleen"]["dice"] == 1.0
    assert report["overall"]["dice"] == pytest.approx(0.9)


def test_evaluate_folders_matches_cases_by_name_and_reports_means(tmp_path):
    predictions, references = tmp_path / "pred", tmp_path / "ref"
    predictions.mkdir()
    references.mkdir()
    blank = np.zeros((30, 30, 30))
    # case_a: liver shifted (Dice 0.8), tumor absent in both (Dice 1, classic undefined)
    write_seg_nrrd(predictions / "case_a.seg.nrrd", OrderedDict(liver=on_grid(cube(shift=(0, 2, 0))),
                                                                tumor=on_grid(blank)))
    write_label_map(references / "case_a.nii.gz", OrderedDict(liver=on_grid(cube()), tumor=on_grid(blank)))
    # case_b: liver perfect, tumor missed (Dice 0, classic 0)
    write_seg_nrrd(predictions / "case_b.seg.nrrd", OrderedDict(liver=on_grid(cube()), tumor=on_grid(blank)))
    write_label_map(references / "case_b.nii.gz", OrderedDict(liver=on_grid(cube()),
                                                              tumor=on_grid(cube(start=(1, 1, 1), size=3))))
    (predictions / "case_b.png").write_bytes(b"a preview beside the result is not a second case")
    write_seg_nrrd(predictions / "extra.seg.nrrd", OrderedDict(liver=on_grid(cube())))
    write_label_map(references / "lonely.nii.gz", OrderedDict(liver=on_grid(cube())))

    report = evaluate(predictions, references)
    assert [c["case"] for c in report["cases"]] == ["case_a", "case_b"]
    assert report["unmatched"] == {"prediction_only": ["extra"], "reference_only": ["lonely"]}
    liver, tumor = report["summary"]["liver"], report["summary"]["tumor"]
    assert liver["dice"] == pytest.approx(0.9) and liver["dice_classic"] == pytest.approx(0.9)
    assert liver["hd95_mm"] == pytest.approx(1.0) and liver["hd95_cases"] == 2  # (2 + 0) / 2
    assert tumor["dice"] == pytest.approx(0.5)  # (1 + 0) / 2 with the blank-blank = 1 convention
    assert tumor["dice_classic"] == 0.0 and tumor["dice_classic_cases"] == 1  # only case_b has a tumor
    assert report["overall"]["dice"] == pytest.approx((0.8 + 1 + 1 + 0) / 4)

    table = format_table(report)
    assert "case_a" in table and "mean of 2" in table and "0.9000" in table
    assert "predictions without a reference (1): extra" in table

    written = write_report(report, tmp_path / "out" / "eval")
    assert [p.name for p in written] == ["eval.json", "eval.csv"]
    assert json.loads(written[0].read_text())["summary"]["tumor"]["dice_classic"] == 0.0
    rows = list(csv.DictReader(written[1].open()))
    assert rows[0]["case"] == "case_a" and float(rows[0]["dice"]) == pytest.approx(0.8)
    assert rows[1]["label"] == "tumor" and rows[1]["dice_classic"] == "" and rows[1]["hd95_mm"] == ""
    assert [r["label"] for r in rows if r["case"] == "mean"] == ["liver", "tumor", "(all labels)"]
    (tmp_path / "folder").mkdir()
    assert [p.name for p in write_report(report, tmp_path / "folder")] == ["evaluation.json", "evaluation.csv"]


def test_evaluate_refuses_what_it_cannot_compare(tmp_path):
    write_seg_nrrd(tmp_path / "a.seg.nrrd", OrderedDict(liver=on_grid(cube())))
    write_seg_nrrd(tmp_path / "b.seg.nrrd", OrderedDict(liver=on_grid(np.zeros((30, 30, 31)))))
    with pytest.raises(SSAMError, match=r"case 'a'.*30x30x30.*31x30x30"):
        evaluate(tmp_path / "a.seg.nrrd", tmp_path / "b.seg.nrrd")
    with pytest.raises(SSAMError, match="two files or two folders"):
        evaluate(tmp_path / "a.seg.nrrd", tmp_path)
    with pytest.raises(SSAMError, match="does not exist"):
        evaluate(tmp_path / "missing.seg.nrrd", tmp_path / "a.seg.nrrd")
    (tmp_path / "p").mkdir()
    (tmp_path / "r").mkdir()
    write_seg_nrrd(tmp_path / "p" / "x.seg.nrrd", OrderedDict(liver=on_grid(cube())))
    write_seg_nrrd(tmp_path / "r" / "y.seg.nrrd", OrderedDict(liver=on_grid(cube())))
    with pytest.raises(SSAMError, match=r"no case of .*\(x\) has a reference .*\(y\)"):
        evaluate(tmp_path / "p", tmp_path / "r")


def test_command_prints_the_table_and_writes_json_and_csv(tmp_path, capsys):
    write_seg_nrrd(tmp_path / "case.seg.nrrd", OrderedDict(liver=on_grid(cube(shift=(0, 0, 2)))))
    write_label_map(tmp_path / "ref.nrrd", OrderedDict(liver=on_grid(cube())))
    (tmp_path / "ref.json").unlink()  # a plain label map: names come from --label-map
    parser = argparse.ArgumentParser()
    evaluation.add_arguments(parser)
    args = parser.parse_args([str(tmp_path / "case.seg.nrrd"), str(tmp_path / "ref.nrrd"),
                              "--label-map", "liver=1", "--output", str(tmp_path / "result")])
    assert evaluation.run(args) == 0
    out = capsys.readouterr().out
    assert "liver" in out and "0.8000" in out and "wrote" in out
    assert (tmp_path / "result.json").is_file() and (tmp_path / "result.csv").is_file()


# ------------------------------------------------------------------------------------------------------ real data
@pytest.mark.data
def test_real_dcmqi_label_maps(data_dir):
    folder = data_dir / "dcmqi-ct-3slice"
    itself = evaluate(folder / "liver_seg.nrrd", folder / "liver_seg.nrrd", label_map=["liver=1"])
    liver = itself["cases"][0]["labels"]["liver"]
    assert liver["dice"] == liver["dice_classic"] == liver["iou"] == 1.0 and liver["hd95_mm"] == 0.0
    assert liver["reference_voxels"] > 100_000

    # The heart file marks its structure with value 3: without names, its labels are "3" and the liver's "1".
    heart = evaluate(folder / "liver_seg.nrrd", folder / "heart_seg.nrrd")
    [case] = heart["cases"]
    assert case["labels"]["1"]["dice"] == 0.0 and case["labels"]["1"]["dice_classic"] is None
    assert case["not_predicted"] == ["3"]
    # Read as one structure ("organ" = value 1 or 3), the manual liver and heart outlines barely touch.
    as_one = evaluate(folder / "liver_seg.nrrd", folder / "heart_seg.nrrd", label_map=["organ=1,3"])
    organ = as_one["cases"][0]["labels"]["organ"]
    assert 0.0 < organ["dice"] < 0.02 and organ["dice_classic"] == organ["dice"] and organ["hd95_mm"] > 10.0
