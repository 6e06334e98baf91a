"""Label routes (model/label_routes.py): a routed label is segmented exactly as its own adapter segments it, the
others as the main adapter does; the file round-trips; training from a routed adapter keeps the routes it does not
retrain; bad combinations are refused."""

import numpy as np
import pytest
import SimpleITK as sitk
import torch

import SSAMSegmentLib
from SSAMSegmentLib import SSAMError
from SSAMSegmentLib.model.adapter import read_metadata
from SSAMSegmentLib.model.label_routes import combine, network_for

from helpers import perturbed_model


def _volume(seed=0):
    rng = np.random.default_rng(seed)
    array = rng.normal(0, 40, (5, 48, 56)).astype(np.int16)
    array[:, 14:34, 16:40] += 300  # a bright block: an organ-like structure for the decoders to answer to
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.8, 0.8, 2.5))
    return image


def _adapters(tmp_path, base="test-tinyvit"):
    main = perturbed_model(base, labels=("organ", "vessel"), seed=1)
    main.keep_largest = ["organ"]
    main.save_adapter(tmp_path / "main.adapter.safetensors",
                      {"val_dice_classic_per_label": {"organ": 0.2, "vessel": 0.6}})
    other = perturbed_model(base, labels=("organ", "bone"), seed=2)
    other.self_box = ["organ"]
    other.save_adapter(tmp_path / "other.adapter.safetensors",
                       {"val_dice_classic_per_label": {"organ": 0.8, "bone": 0.7}})
    return tmp_path / "main.adapter.safetensors", tmp_path / "other.adapter.safetensors"


def _masks(model, image, labels):
    result = model.segment(image, labels, self_box="off", probe_mm=None)
    return {name: sitk.GetArrayFromImage(mask) for name, mask in result.masks.items()}


def test_a_routed_label_is_segmented_by_its_own_adapter_and_the_rest_by_the_main_one(tmp_path):
    main_path, other_path = _adapters(tmp_path)
    routed = combine(main_path, [(other_path, ["Organ"])], tmp_path / "routed.adapter.safetensors")
    metadata = read_metadata(routed)
    assert metadata["format_version"] == 3
    assert metadata["labels"] == ["organ", "vessel"]
    assert metadata["routes"][0]["labels"] == ["organ"]
    assert metadata["routes"][0]["training"]["file"] == "other.adapter.safetensors"
    # the routed label's records are its own adapter's: validation, self-box choice, keep-largest
    assert metadata["training"]["val_dice_classic_per_label"] == {"vessel": 0.6, "organ": 0.8}
    assert metadata["self_box"] == ["organ"] and metadata["keep_largest"] == []

    image = _volume()
    model = SSAMSegmentLib.load(adapter=routed, precision="float32")
    main = SSAMSegmentLib.load(adapter=main_path, precision="float32")
    other = SSAMSegmentLib.load(adapter=other_path, precision="float32")
    assert network_for(model, "organ") is model.routes[0].network and network_for(model, "vessel") is model
    both = _masks(model, image, ["organ", "vessel"])
    alone_other, alone_main = _masks(other, image, ["organ"]), _masks(main, image, ["organ", "vessel"])
    np.testing.assert_array_equal(both["organ"], alone_other["organ"])
    np.testing.assert_array_equal(both["vessel"], alone_main["vessel"])
    assert not np.array_equal(alone_main["organ"], alone_other["organ"])  # the two adapters do differ on it
    # the routes follow the model to its precision and merge state
    assert model.routes[0].network.merged and model.routes[0].network.requested_precision == "float32"


def test_a_correction_of_a_routed_label_uses_its_network(tmp_path):
    main_path, other_path = _adapters(tmp_path)
    routed = combine(main_path, [(other_path, ["organ"])], tmp_path / "routed.adapter.safetensors")
    image = _volume(1)
    box = ((16 * 0.8, 14 * 0.8, 5.0), (40 * 0.8, 34 * 0.8, 5.0))
    model = SSAMSegmentLib.load(adapter=routed, precision="float32")
    other = SSAMSegmentLib.load(adapter=other_path, precision="float32")
    mine = model.refine(image, "organ", box=box, self_box="off")
    theirs = other.refine(image, "organ", box=box, self_box="off")
    np.testing.assert_array_equal(sitk.GetArrayFromImage(mine.mask), sitk.GetArrayFromImage(theirs.mask))
    assert mine.slices == theirs.slices


def test_training_from_a_routed_adapter_keeps_the_routes_it_does_not_retrain(tmp_path):
    from SSAMSegmentLib.model import label_routes

    main_path, other_path = _adapters(tmp_path)
    routed = combine(main_path, [(other_path, ["organ", "bone"])], tmp_path / "routed.adapter.safetensors")
    model = SSAMSegmentLib.load(adapter=routed)
    label_routes.release(model, ["Bone"])
    assert [route.labels for route in model.routes] == [["organ"]]
    path = model.save_adapter(tmp_path / "again.adapter.safetensors")
    again = SSAMSegmentLib.load(adapter=path)
    assert [route.labels for route in again.routes] == [["organ"]]
    for name, tensor in model.routes[0].network.trainable_state().items():
        assert torch.equal(again.routes[0].network.trainable_state()[name], tensor), name
    label_routes.release(again, ["organ"])
    assert again.routes == [] and "routes" not in read_metadata(again.save_adapter(tmp_path / "plain.safetensors"))


def test_bad_routes_are_refused(tmp_path):
    main_path, other_path = _adapters(tmp_path)
    with pytest.raises(SSAMError, match="'liver' is not a label other.adapter.safetensors was trained on"):
        combine(main_path, [(other_path, ["liver"])], tmp_path / "x.safetensors")
    with pytest.raises(SSAMError, match="routed twice"):
        combine(main_path, [(other_path, ["organ"]), (other_path, ["organ"])], tmp_path / "x.safetensors")
    vit = tmp_path / "vit.adapter.safetensors"
    perturbed_model("test-vit", labels=("organ",), seed=3).save_adapter(vit)
    with pytest.raises(SSAMError, match="a route must use the same base"):
        combine(main_path, [(vit, ["organ"])], tmp_path / "x.safetensors")
    (tmp_path / "exists.safetensors").write_bytes(b"keep")
    with pytest.raises(SSAMError, match="exists"):
        combine(main_path, [(other_path, ["organ"])], tmp_path / "exists.safetensors")
    assert (tmp_path / "exists.safetensors").read_bytes() == b"keep"
    assert not (tmp_path / "x.safetensors").exists()


def test_a_routed_file_missing_a_route_tensor_is_refused_as_damaged(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    main_path, other_path = _adapters(tmp_path)
    routed = combine(main_path, [(other_path, ["organ"])], tmp_path / "routed.adapter.safetensors")
    with safe_open(str(routed), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    dropped = next(key for key in tensors if key.startswith("routes.0."))
    del tensors[dropped]
    save_file(tensors, str(tmp_path / "damaged.safetensors"), metadata=metadata)
    with pytest.raises(SSAMError, match="lacks the routed tensor"):
        SSAMSegmentLib.load(adapter=tmp_path / "damaged.safetensors")
