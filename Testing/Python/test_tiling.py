"""Tiles for large images: coverage and blend weights, the rule that chooses tiles from the data, tiled against
untiled inference, the tile record in the adapter, and training on native-resolution crops."""

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

import SSAMSegmentLib
from SSAMSegmentLib import SSAMError
from SSAMSegmentLib.inference.slice_inference import segment_image
from SSAMSegmentLib.inference.tiling import (MIN_STRUCTURE_PIXELS, TileRecord, blend_weights, choose_tiles,
                                             tile_starts, tiled_logits, typical_structure_size)
from SSAMSegmentLib.model.adapter import read_metadata

from helpers import perturbed_model


@pytest.mark.parametrize("height,width,tile,overlap", [(1000, 1000, 250, 62), (517, 300, 128, 32), (100, 90, 128, 32),
                                                      (129, 128, 128, 0)])
def test_blend_weights_cover_every_pixel_and_sum_to_one(height, width, tile, overlap):
    total = torch.zeros(height, width)
    count = torch.zeros(height, width)
    for rows, cols, weight in blend_weights(height, width, TileRecord(tile, overlap)):
        assert rows.stop - rows.start <= tile and cols.stop - cols.start <= tile
        total[rows, cols] += weight
        count[rows, cols] += 1
        assert float(weight.min()) > 0
    torch.testing.assert_close(total, torch.ones(height, width))
    assert int(count.min()) >= 1


def test_tile_starts_end_at_the_border_with_at_least_the_overlap():
    starts = tile_starts(1000, 250, 62)
    assert starts[0] == 0 and starts[-1] == 750
    assert all(b - a <= 250 - 62 for a, b in zip(starts, starts[1:]))
    assert tile_starts(200, 250, 62) == [0]


def test_blended_constant_logits_stay_constant_and_tiles_see_their_own_pixels():
    rgb = np.random.default_rng(0).integers(0, 255, (300, 410, 3), dtype=np.uint8)
    record = TileRecord(128, 32)
    mean = tiled_logits(lambda tile: torch.from_numpy(tile[..., 0].astype(np.float32))[None], rgb, record)
    torch.testing.assert_close(mean[0], torch.from_numpy(rgb[..., 0].astype(np.float32)), rtol=1e-5, atol=1e-3)


def test_tiles_are_chosen_when_structures_would_be_a_few_pixels_across():
    # MoNuSeg-like: 1000 px, nuclei of about 15 px -> 3.8 px at 256: tiles. Polyps of 200 px on 600 px: whole image.
    record = choose_tiles((1000, 1000), 15.0, 256)
    assert record is not None and 128 <= record.tile < 1000 and 15.0 * 256 / record.tile >= MIN_STRUCTURE_PIXELS
    assert choose_tiles((529, 622), 200.0, 256) is None
    assert choose_tiles((256, 256), 3.0, 256) is None  # no larger than the input: nothing to gain
    assert choose_tiles((1000, 1000), None, 256) is None
    yy, xx = np.indices((100, 100))
    disks = ((yy - 20) ** 2 + (xx - 20) ** 2 < 25) | ((yy - 70) ** 2 + (xx - 60) ** 2 < 25)
    assert typical_structure_size(disks) == pytest.approx(2 * np.sqrt(disks.sum() / 2 / np.pi))
    assert typical_structure_size(np.zeros((5, 5))) is None


def _image(array):
    return sitk.GetImageFromArray(array.astype(np.uint8), isVector=array.ndim == 3)


def test_tiled_and_untiled_inference_agree_on_an_image_no_larger_than_one_tile():
    model = perturbed_model("test-vit", labels=("organ", "vessel"), seed=4, image_size=64)
    rgb = np.random.default_rng(1).integers(0, 255, (48, 60, 3))
    plain = segment_image(model, _image(rgb), ["organ", "vessel"])
    model.tile_records = {"vessel": TileRecord(64, 16)}
    tiled = segment_image(model, _image(rgb), ["organ", "vessel"])
    for label in ("organ", "vessel"):
        np.testing.assert_array_equal(sitk.GetArrayFromImage(tiled.masks[label]),
                                      sitk.GetArrayFromImage(plain.masks[label]))
        assert tiled.masks[label].GetSize() == plain.masks[label].GetSize()


def test_a_tiled_label_on_a_large_image_uses_its_tiles_with_the_same_geometry(monkeypatch):
    from SSAMSegmentLib.inference import tiling

    model = perturbed_model("test-vit", labels=("organ", "vessel"), seed=4, image_size=64)
    image = _image(np.random.default_rng(2).integers(0, 255, (150, 200, 3)))
    image.SetSpacing((0.5, 0.5))
    image.SetOrigin((3.0, -2.0))
    plain = segment_image(model, image, ["organ", "vessel"])
    model.tile_records = {"Vessel": TileRecord(64, 16)}  # names match as labels do (case-insensitive)
    seen = []
    real = tiling.tiled_logits
    monkeypatch.setattr(tiling, "tiled_logits", lambda predict, rgb, record: seen.append(record) or real(predict, rgb, record))
    tiled = segment_image(model, image, ["organ", "vessel"])
    assert seen == [TileRecord(64, 16)]  # one slice, the vessel only
    np.testing.assert_array_equal(sitk.GetArrayFromImage(tiled.masks["organ"]), sitk.GetArrayFromImage(plain.masks["organ"]))
    vessel = tiled.masks["vessel"]
    assert vessel.GetSize() == image.GetSize() and vessel.GetSpacing() == image.GetSpacing()
    assert vessel.GetOrigin() == image.GetOrigin()


def test_the_adapter_round_trips_its_tile_records(tmp_path):
    model = perturbed_model("test-vit", labels=("nucleus", "polyp"), seed=1, image_size=64)
    model.tile_records = {"nucleus": TileRecord(250, 62)}
    path = model.save_adapter(tmp_path / "mixed.adapter.safetensors")
    assert read_metadata(path)["tiles"] == {"nucleus": {"tile": 250, "overlap": 62}}
    loaded = SSAMSegmentLib.load(adapter=path)
    assert loaded.tile_records == {"nucleus": TileRecord(250, 62)}  # polyp: whole image
    plain = perturbed_model("test-vit", labels=("polyp",), seed=1, image_size=64)
    assert SSAMSegmentLib.load(adapter=plain.save_adapter(tmp_path / "plain.adapter.safetensors")).tile_records == {}


def test_a_damaged_tile_record_is_a_one_line_error(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    model = perturbed_model("test-vit", labels=("nucleus",), seed=1, image_size=64)
    model.tile_records = {"nucleus": TileRecord(250, 62)}
    path = model.save_adapter(tmp_path / "a.adapter.safetensors")
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    ssam = json.loads(metadata["ssam"])
    ssam["tiles"]["nucleus"] = {"tile": 250, "overlap": 400}
    save_file(tensors, str(path), metadata={"ssam": json.dumps(ssam)})
    with pytest.raises(SSAMError, match="tile record for 'nucleus' is damaged"):
        SSAMSegmentLib.load(adapter=path)


def _nuclei_dataset(root, count=2, size=160, seed=0):
    """Grey images with small bright disks ('nucleus', about 10 px across: 4 px once the image is resized to 64)."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    yy, xx = np.indices((size, size))
    for i in range(count):
        label = np.zeros((size, size), np.uint8)
        for cy, cx in rng.integers(10, size - 10, (15, 2)):
            label[(yy - cy) ** 2 + (xx - cx) ** 2 < 25] = 1
        image = rng.normal(80, 10, (size, size)) + 100 * label
        sitk.WriteImage(sitk.GetImageFromArray(np.clip(image, 0, 255).astype(np.uint8)), str(root / "images" / f"n{i}.png"))
        sitk.WriteImage(sitk.GetImageFromArray(label), str(root / "masks" / f"n{i}.png"))
    (root / "labels.json").write_text(json.dumps({"1": "nucleus"}))
    return root


@pytest.mark.slow  # two short trainings
def test_training_plans_tiles_from_the_masks_and_trains_on_native_crops(tmp_path):
    from SSAMSegmentLib.training.datasets import open_dataset
    from SSAMSegmentLib.training.slice_bank import build_slice_bank
    from SSAMSegmentLib.training.tile_plan import case_record, plan_tiles

    root = _nuclei_dataset(tmp_path / "nuclei")
    dataset = open_dataset(root)
    plan = plan_tiles(dataset.cases, ["nucleus"], 64)
    # Tiles of about 40 px bring the nuclei to about 16 px at the model's 64, over MIN_STRUCTURE_PIXELS.
    assert set(plan) == {"nucleus"} and 32 <= plan["nucleus"].tile < 160
    bank = build_slice_bank(dataset.cases, ["nucleus"], 64,
                            tile_record_of=lambda case: case_record(case, plan, ["nucleus"]))
    per_image = len(blend_weights(160, 160, plan["nucleus"]))
    assert len(bank) == 2 * per_image > 2
    whole = build_slice_bank(dataset.cases, ["nucleus"], 64)
    assert len(whole) == 2
    result = SSAMSegmentLib.train(SSAMSegmentLib.TrainingConfig(
        data=str(root), output=str(tmp_path / "n.adapter.safetensors"), base="test-vit", image_size=64, steps=1,
        batch_size=1, val_fraction=0.0))
    assert read_metadata(result.adapter_path)["tiles"] == {"nucleus": plan["nucleus"].to_json()}
    assert result.summary["train_slices"] == 2 * per_image
    off = SSAMSegmentLib.train(SSAMSegmentLib.TrainingConfig(
        data=str(root), output=str(tmp_path / "off.adapter.safetensors"), base="test-vit", image_size=64, steps=1,
        batch_size=1, val_fraction=0.0, tiles="off"))
    assert read_metadata(off.adapter_path)["tiles"] == {} and off.summary["train_slices"] == 2
