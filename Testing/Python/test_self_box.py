"""The self-prompted box (inference/self_box.py, training/self_box_choice.py) on real Kvasir-SEG photographs with the
shipped adapter and the real LiteMedSAM base."""

import numpy as np
import pytest
import SimpleITK as sitk

import SSAMSegmentLib
from SSAMSegmentLib.files.image_io import read_image
from SSAMSegmentLib.inference.box_prompt import box_prompt_masks, mask_box, untuned_base
from SSAMSegmentLib.inference.intensity import choose_mapping
from SSAMSegmentLib.inference.self_box import MIN_IOU, chosen_labels, dice, largest_piece
from SSAMSegmentLib.inference.slice_geometry import SliceGeometry


@pytest.fixture(scope="module")
def model():
    return SSAMSegmentLib.load(adapter="default", merge=True)


def _photographs(data_dir, count):
    folder = data_dir / "kvasir-seg"
    images = sorted((folder / "images").glob("*.jpg"))[-count:]  # the last by name: among the held-apart test images
    return [(read_image(path), sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "masks" / path.name)))[..., 0] > 127)
            for path in images]


def test_largest_piece_and_dice():
    mask = np.zeros((20, 20), bool)
    mask[1:4, 1:4] = True  # 9 pixels
    mask[10:15, 10:15] = True  # 25 pixels
    assert largest_piece(mask).sum() == 25 and largest_piece(mask)[12, 12]
    assert not largest_piece(np.zeros((5, 5), bool)).any()
    assert dice(mask, mask) == 1.0 and dice(mask, ~mask) == 0.0 and dice(mask & False, mask & False) == 1.0


def test_the_box_redraws_only_the_chosen_labels_where_the_base_is_confident(model, data_dir):
    """With "polyp" chosen: each photograph's mask is the base's answer to the text mask's largest-piece box where
    its predicted IoU reaches MIN_IOU, else the text mask itself; --self-box off and an unchosen label change
    nothing; the adapter's choice survives saving and loading."""
    base = untuned_base(model)
    shipped, redrawn = list(model.self_box), 0
    for image, _ in _photographs(data_dir, 4):
        model.self_box = []
        text = sitk.GetArrayFromImage(model.segment(image, ["polyp"]).masks["polyp"]) > 0
        model.self_box = ["polyp"]
        off = sitk.GetArrayFromImage(model.segment(image, ["polyp"], self_box="off").masks["polyp"]) > 0
        result = model.segment(image, ["polyp"])
        mask = sitk.GetArrayFromImage(result.masks["polyp"]) > 0
        assert result.masks["polyp"].GetSize() == image.GetSize() and (off == text).all()
        geometry = SliceGeometry.for_image(image)
        rgb = choose_mapping(image).apply(geometry.slice_view(geometry.canonical(sitk.GetArrayViewFromImage(image)),
                                                              0))
        answer, quality = box_prompt_masks(base, rgb, [mask_box(largest_piece(text))], with_quality=True)
        if quality[0] >= MIN_IOU:
            redrawn += 1
            assert (mask == (answer[0] > 0)).all() and result.self_boxed == {"polyp": [0]}
            assert "outline from its own box" in result.summary()
            assert result.slice_confidence["polyp"][0] == pytest.approx(quality[0])
        else:
            assert (mask == text).all() and not result.self_boxed
    assert redrawn >= 1  # these photographs include one the base is sure of (else the test proves nothing)
    model.self_box = ["gland"]
    assert chosen_labels(model, ["polyp", "gland"]) == ["gland"] and chosen_labels(model, ["gland"], "off") == []
    model.tile_records, records = {"gland": object()}, model.tile_records
    assert chosen_labels(model, ["gland"]) == []  # a tiled label is never redrawn from one box
    model.tile_records = records
    model.self_box = shipped


def test_an_adapter_keeps_its_choice_and_refuses_a_damaged_one(model, tmp_path):
    shipped, model.self_box = model.self_box, ["polyp"]
    try:
        path = model.save_adapter(tmp_path / "boxed.adapter.safetensors")
    finally:
        model.self_box = shipped
    assert SSAMSegmentLib.load(adapter=path).self_box == ["polyp"]
    from SSAMSegmentLib.model.adapter import read_metadata
    from SSAMSegmentLib.model.loading import DEFAULT_ADAPTER

    # the shipped adapter's own choice (made on its validation sets) is what loading it gives
    assert SSAMSegmentLib.load(adapter="default").self_box == read_metadata(DEFAULT_ADAPTER).get("self_box", [])


def test_training_chooses_the_box_on_its_validation_slices(data_dir, tmp_path):
    """Two steps from the shipped adapter on 2 Kvasir-SEG photographs, validated on 4 others: the adapter records
    both validation means and chose the box exactly when it added MIN_GAIN; the kept adapter carries that choice."""
    from SSAMSegmentLib.inference.self_box import MIN_GAIN

    from test_real_data import _polyp_folder

    folder = data_dir / "kvasir-seg"
    pairs = [(path, folder / "masks" / path.name) for path in sorted((folder / "images").glob("*.jpg"))]
    _polyp_folder(tmp_path / "train", pairs[:2])
    _polyp_folder(tmp_path / "val", pairs[-4:])
    result = SSAMSegmentLib.train(SSAMSegmentLib.TrainingConfig(
        tmp_path / "train", val_data=tmp_path / "val", output=str(tmp_path / "out" / "a.adapter.safetensors"),
        labels=["polyp"], steps=2, start_from="default", patience=0))
    record = result.summary["self_box"]["polyp"]
    assert record["slices"] == 4 and 0 <= record["text"] <= 1 and 0 <= record["self_box"] <= 1
    assert record["chosen"] == (record["self_box"] >= record["text"] + MIN_GAIN)
    loaded = SSAMSegmentLib.load(adapter=result.adapter_path)
    assert ("polyp" in loaded.self_box) == record["chosen"]
    assert loaded.adapter_metadata["training"]["self_box"] == result.summary["self_box"]
    off = SSAMSegmentLib.train(SSAMSegmentLib.TrainingConfig(
        tmp_path / "train", val_data=tmp_path / "val", output=str(tmp_path / "off" / "a.adapter.safetensors"),
        labels=["polyp"], steps=1, start_from="default", patience=0, self_box="off"))
    assert off.summary["self_box"] == {} and SSAMSegmentLib.load(adapter=off.adapter_path).self_box == [
        name for name in SSAMSegmentLib.load(adapter="default").self_box if name != "polyp"]


def test_a_correction_of_a_chosen_label_is_redrawn_from_its_own_box_too(model, data_dir):
    """A box correction (refinement.py) of a label the adapter redraws from its own box: with self_box "auto" the
    rewritten slice is the base's answer to the corrected mask's own box where the base is sure of it, as segmenting
    gives; with "off" it is the text token and the box decoded together, as for any other label."""
    base, shipped, redrawn = untuned_base(model), list(model.self_box), 0
    model.self_box = ["polyp"]
    try:
        for image, truth in _photographs(data_dir, 4):
            rows, cols = np.nonzero(truth)
            corners = [image.TransformIndexToPhysicalPoint((int(c), int(r))) for c, r in
                       ((cols.min(), rows.min()), (cols.max(), rows.max()))]
            off = model.refine(image, "polyp", box=corners, self_box="off")
            auto = model.refine(image, "polyp", box=corners)
            assert off.slices == auto.slices == [0]
            text_and_box = sitk.GetArrayFromImage(off.mask) > 0
            geometry = SliceGeometry.for_image(image)
            rgb = choose_mapping(image).apply(
                geometry.slice_view(geometry.canonical(sitk.GetArrayViewFromImage(image)), 0))
            answer, quality = box_prompt_masks(base, rgb, [mask_box(largest_piece(text_and_box))], with_quality=True)
            expected = answer[0] > 0 if quality[0] >= MIN_IOU else text_and_box
            redrawn += int(quality[0] >= MIN_IOU and (expected != text_and_box).any())
            assert ((sitk.GetArrayFromImage(auto.mask) > 0) == expected).all()
            if quality[0] >= MIN_IOU:
                assert auto.confidence[0] == pytest.approx(quality[0])
    finally:
        model.self_box = shipped
    assert redrawn >= 1  # at least one photograph where the redraw changed the mask, else the test proves nothing
