"""Neighbour slices ("2.5D", ssam train --neighbour-slices): the input channels are slices k-1, k, k+1 of a 3D volume, in the
training bank and when segmenting, along the chosen slice axis, ends repeated, with the one intensity mapping; an
adapter records it; 2D images, RGB images and adapters without it are unchanged."""

import argparse
import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

import SSAMSegmentLib
from SSAMSegmentLib import SSAMError, TrainingConfig, train
from SSAMSegmentLib.inference import tiling
from SSAMSegmentLib.inference.intensity import choose_mapping
from SSAMSegmentLib.inference.neighbour_slices import slice_pixels
from SSAMSegmentLib.inference.preprocessing import to_model_input
from SSAMSegmentLib.inference.slice_geometry import SliceGeometry
from SSAMSegmentLib.inference.slice_inference import _slice_logits, segment_image, slice_logits
from SSAMSegmentLib.inference.tiling import TileRecord
from SSAMSegmentLib.inference.volume_context import BACKGROUND, VolumeContext, quantize_logits
from SSAMSegmentLib.model.adapter import read_metadata
from SSAMSegmentLib.training.datasets import memory_dataset
from SSAMSegmentLib.training.slice_bank import _resize, build_slice_bank

from helpers import perturbed_model


def _ct(shape=(6, 40, 48), spacing=(0.8, 0.7, 2.5), seed=0):
    """int16 HU with a different pattern on every slice along every axis (noise), a bright block, and its mask."""
    rng = np.random.default_rng(seed)
    array = rng.normal(40, 200, shape).astype(np.int16)
    mask = np.zeros(shape, np.uint8)
    mask[1:-1, shape[1] // 4: shape[1] // 2, shape[2] // 4: shape[2] // 2] = 1
    array[mask > 0] += 300
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    return image, mask


def _clamped(index, count):
    return min(max(index, 0), count - 1)


def _stack(planes):
    """(H, W) planes -> (H, W, 3): what the test expects the channels to be, built without the library."""
    return np.ascontiguousarray(np.stack(planes, axis=-1))


# --- the channels ---------------------------------------------------------------------------------------------------


def test_channels_are_the_neighbours_through_the_one_mapping_with_the_ends_repeated():
    image, _ = _ct()
    array = sitk.GetArrayFromImage(image)  # (z, y, x), identity direction: axial slices are array[k]
    geometry = SliceGeometry.for_image(image, "axial")
    mapping = choose_mapping(image, window=(50, 300))  # a user's window is the neighbours' window too
    source = geometry.canonical(sitk.GetArrayViewFromImage(image))
    count = geometry.num_slices
    for k in range(count):
        single = slice_pixels(geometry, source, mapping, k)
        np.testing.assert_array_equal(single, mapping.apply(array[k]))  # without neighbours: as before
        context = slice_pixels(geometry, source, mapping, k, neighbours=True)
        for channel, offset in enumerate((-1, 0, 1)):
            np.testing.assert_array_equal(context[..., channel], mapping.apply(array[_clamped(k + offset, count)])[..., 0])
    first = slice_pixels(geometry, source, mapping, 0, neighbours=True)
    np.testing.assert_array_equal(first[..., 0], first[..., 1])  # the missing neighbour repeats the slice itself
    assert not np.array_equal(first[..., 1], first[..., 2])


def test_2d_and_rgb_images_have_no_neighbours_to_give():
    rng = np.random.default_rng(2)
    for image in (sitk.GetImageFromArray(rng.integers(0, 255, (30, 40)).astype(np.uint8)),
                  sitk.GetImageFromArray(rng.integers(0, 255, (30, 40, 3)).astype(np.uint8), isVector=True),
                  sitk.GetImageFromArray(rng.integers(0, 255, (4, 30, 40, 3)).astype(np.uint8), isVector=True)):
        geometry = SliceGeometry.for_image(image, "axial")
        mapping = choose_mapping(image)
        source = geometry.canonical(sitk.GetArrayViewFromImage(image))
        for k in range(geometry.num_slices):
            np.testing.assert_array_equal(slice_pixels(geometry, source, mapping, k, neighbours=True),
                                          slice_pixels(geometry, source, mapping, k))


# --- the training bank ----------------------------------------------------------------------------------------------


def _dataset():
    ct, mask = _ct()
    rng = np.random.default_rng(5)
    flat = sitk.GetImageFromArray(rng.integers(0, 255, (50, 60)).astype(np.uint8))
    flat_mask = np.zeros((50, 60), np.uint8)
    flat_mask[10:30, 10:40] = 1
    return memory_dataset([("ct", ct, {"organ": mask}), ("photo", flat, {"organ": flat_mask})]), ct


def test_the_bank_holds_the_neighbour_slices_and_is_unchanged_without_context():
    dataset, ct = _dataset()
    plain = build_slice_bank(dataset.cases, dataset.label_names, 64)
    context = build_slice_bank(dataset.cases, dataset.label_names, 64, neighbours=True)
    slices = ct.GetSize()[2]
    ct_rows = np.flatnonzero(plain.case_index == 0)
    assert len(ct_rows) == slices and len(plain) == slices + 1  # every CT slice has signal; one 2D image
    plain_images, context_images = np.asarray(plain.images), np.asarray(context.images)
    # Without context the three channels are the slice itself; the masks, contents and order do not change.
    assert all(np.array_equal(plain_images[:, 0], plain_images[:, c]) for c in (1, 2))
    np.testing.assert_array_equal(np.asarray(context.masks), np.asarray(plain.masks))
    np.testing.assert_array_equal(context.content, plain.content)
    for k, row in enumerate(ct_rows):
        for channel, offset in enumerate((-1, 0, 1)):
            neighbour = ct_rows[_clamped(k + offset, slices)]
            np.testing.assert_array_equal(context_images[row, channel], plain_images[neighbour, 0])
    photo = np.flatnonzero(plain.case_index == 1)
    np.testing.assert_array_equal(context_images[photo], plain_images[photo])  # a 2D case: as without context


@pytest.mark.parametrize("axis", ["sagittal", "coronal"])
def test_the_neighbours_are_along_the_chosen_slice_axis_whatever_the_storage_order(axis):
    image, mask = _ct(shape=(10, 12, 14), spacing=(1.0, 1.0, 1.0), seed=7)
    array = sitk.GetArrayFromImage(image)  # (z, y, x) = (S, P, L) for an identity direction
    dataset = memory_dataset([("ct", image, {"organ": mask})])
    bank = build_slice_bank(dataset.cases, dataset.label_names, 64, axis=axis, neighbours=True)
    mapping = choose_mapping(image)
    count = {"sagittal": 14, "coronal": 12}[axis]
    assert len(bank) == count
    for k in range(count):
        # coronal and sagittal slices are shown superior-up: rows are the reversed z axis (slice_geometry.py)
        plane = (lambda j: array[::-1, :, j]) if axis == "sagittal" else (lambda j: array[::-1, j, :])
        rgb = mapping.apply(_stack([plane(_clamped(k + offset, count)) for offset in (-1, 0, 1)]))
        expected = _resize(rgb, [np.zeros(rgb.shape[:2], np.uint8)], 64, (1.0, 1.0))[0]
        np.testing.assert_array_equal(np.asarray(bank.images[k]), expected)
    # The same anatomy stored the other way round along x gives the same channels: channel 0 is always the right
    # (sagittal) or anterior (coronal) neighbour, not the previous array index.
    flipped = sitk.Flip(image, [True, False, False])
    flipped_mask = np.ascontiguousarray(mask[:, :, ::-1])
    again = build_slice_bank(memory_dataset([("ct", flipped, {"organ": flipped_mask})]).cases, ["organ"], 64,
                             axis=axis, neighbours=True)
    np.testing.assert_array_equal(np.asarray(again.images), np.asarray(bank.images))


# --- the adapter ----------------------------------------------------------------------------------------------------


def test_the_adapter_records_neighbour_slices_and_older_readers_refuse_it(tmp_path, monkeypatch):
    from SSAMSegmentLib.model import adapter

    model = perturbed_model("test-vit", labels=("organ",), seed=1, image_size=64)
    plain_path = model.save_adapter(tmp_path / "plain.adapter.safetensors")
    model.neighbour_slices = True
    context_path = model.save_adapter(tmp_path / "context.adapter.safetensors")
    plain, context = read_metadata(plain_path), read_metadata(context_path)
    assert (plain["neighbour_slices"], plain["format_version"]) == (False, 1)  # readable by earlier versions
    assert (context["neighbour_slices"], context["format_version"]) == (True, 2)
    assert SSAMSegmentLib.load(adapter=context_path).neighbour_slices is True
    assert SSAMSegmentLib.load(adapter=plain_path).neighbour_slices is False
    monkeypatch.setattr(adapter, "FORMAT_VERSION", 1)  # a reader from before --neighbour-slices
    read_metadata(plain_path)
    with pytest.raises(SSAMError, match="update SSAM Segment"):
        read_metadata(context_path)


def test_a_damaged_neighbour_slices_entry_is_a_one_line_error(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = perturbed_model("test-vit", labels=("organ",), seed=1, image_size=64).save_adapter(tmp_path / "a.safetensors")
    with safe_open(str(path), framework="pt") as handle:
        metadata, tensors = handle.metadata(), {key: handle.get_tensor(key) for key in handle.keys()}
    save_file(tensors, str(path), metadata={"ssam": json.dumps(dict(json.loads(metadata["ssam"]), neighbour_slices="yes"))})
    with pytest.raises(SSAMError, match="'neighbour_slices' is 'yes', not true or false"):
        SSAMSegmentLib.load(adapter=path)


# --- segmenting -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """The same trained tensors saved twice: without and with neighbour slices; loaded in float32."""
    folder = tmp_path_factory.mktemp("adapters")
    torch.manual_seed(0)  # the Text Affine Layer's initial weights
    model = perturbed_model("test-vit", labels=("organ", "vessel"), seed=4, image_size=64)
    plain = model.save_adapter(folder / "plain.adapter.safetensors")
    model.neighbour_slices = True
    context = model.save_adapter(folder / "context.adapter.safetensors")
    return {name: SSAMSegmentLib.load(adapter=path, precision="float32") for name, path in
            (("plain", plain), ("context", context))}


def _recording_encoder(model, monkeypatch):
    seen = []
    real = model.encode_images
    monkeypatch.setattr(model, "encode_images", lambda inputs: seen.append(inputs.clone()) or real(inputs))
    return seen


def test_segment_feeds_the_neighbours_with_the_same_window_and_plain_adapters_the_slice(adapters, monkeypatch):
    image, _ = _ct()
    array = sitk.GetArrayFromImage(image)
    count = array.shape[0]
    window = (50, 300)
    mapping = choose_mapping(image, window=window)
    inputs = {}
    for name, model in adapters.items():
        seen = _recording_encoder(model, monkeypatch)
        model.segment(image, ["organ"], axis="axial", window=window, probe_mm=None, context="off", batch_size=1)
        inputs[name] = seen
        assert len(seen) == count  # one encoder pass per slice, in slice order

    def model_input(rgb, model):
        pixels = torch.from_numpy(rgb).permute(2, 0, 1)[None]
        return to_model_input(pixels, model.image_size, model.pixel_mean, model.pixel_std, (0.7, 0.8))[0]

    for k in range(count):
        plain = model_input(mapping.apply(array[k]), adapters["plain"])  # what segmenting fed before --neighbour-slices
        torch.testing.assert_close(inputs["plain"][k], plain, rtol=0, atol=0)
        stack = _stack([mapping.apply(array[_clamped(k + o, count)])[..., 0] for o in (-1, 0, 1)])
        torch.testing.assert_close(inputs["context"][k], model_input(stack, adapters["context"]), rtol=0, atol=0)
        torch.testing.assert_close(inputs["context"][k][:, 1], plain[:, 1], rtol=0, atol=0)  # the same window
    plain_masks = adapters["plain"].segment(image, ["organ"], probe_mm=None, context="off").masks["organ"]
    context_masks = adapters["context"].segment(image, ["organ"], probe_mm=None, context="off").masks["organ"]
    assert not np.array_equal(sitk.GetArrayFromImage(plain_masks), sitk.GetArrayFromImage(context_masks))


def test_segment_feeds_sagittal_neighbours_when_cutting_sagittally(adapters, monkeypatch):
    image, _ = _ct(shape=(10, 12, 14), spacing=(1.0, 1.0, 1.0), seed=7)
    array = sitk.GetArrayFromImage(image)
    model = adapters["context"]
    mapping = choose_mapping(image)
    seen = _recording_encoder(model, monkeypatch)
    result = model.segment(image, ["organ"], axis="sagittal", probe_mm=None, context="off", batch_size=1)
    assert result.axis == "sagittal" and len(seen) == 14
    for k in range(14):
        stack = _stack([mapping.apply(array[::-1, :, _clamped(k + o, 14)])[..., 0] for o in (-1, 0, 1)])
        pixels = torch.from_numpy(stack).permute(2, 0, 1)[None]
        expected = to_model_input(pixels, model.image_size, model.pixel_mean, model.pixel_std, (1.0, 1.0))[0]
        torch.testing.assert_close(seen[k], expected, rtol=0, atol=0)


def _direct_logits(model, image, labels, indices, tiles=None):
    """Int8 logits per label of each slice index, computed here from neighbour stacks built without the library's
    function, as the slice loop groups them: the whole-image labels decoded together, a tiled label through
    tiling.tiled_logits."""
    array = sitk.GetArrayFromImage(image)
    count = array.shape[0]
    mapping = choose_mapping(image)
    spacing = tuple(reversed(image.GetSpacing()[:2]))
    tokens = model.prompt_tokens(model.text_embeddings(labels))
    tiles = tiles or [None] * len(labels)
    whole = [label for label, record in enumerate(tiles) if record is None]

    def predict(part, chosen):
        return _slice_logits(model, [part], tokens[chosen], spacing, "float32")[0][0]

    result = {}
    with torch.inference_mode():
        for k in indices:
            rgb = mapping.apply(_stack([array[_clamped(k + o, count)] for o in (-1, 0, 1)]))
            per_label = dict(zip(whole, quantize_logits(predict(rgb, whole))))
            for label, record in enumerate(tiles):
                if record is not None:
                    per_label[label] = quantize_logits(tiling.tiled_logits(lambda t: predict(t, [label]), rgb, record))[0]
            result[k] = [per_label[label] for label in range(len(labels))]
    return result


def test_sparse_probing_with_neighbours_matches_the_direct_computation_and_volume_context_runs(adapters):
    model = adapters["context"]
    image, _ = _ct(shape=(24, 32, 36), spacing=(0.8, 0.8, 1.0), seed=3)
    labels = ["organ", "vessel"]
    # A threshold nothing reaches: only the probes (every 10 mm) are encoded, their neighbours are not.
    decoded = slice_logits(model, image, labels, axis="axial", probe_mm=10.0, logit_threshold=1e9)
    encoded = [k for k in range(24) if (decoded.volumes[0][k] != BACKGROUND).any()]
    assert encoded == [0, 10, 20, 23] and decoded.skipped == 20
    expected = _direct_logits(model, image, labels, encoded)
    for k in encoded:
        for label in range(2):
            np.testing.assert_array_equal(decoded.volumes[label][k], expected[k][label])
    # The whole product path (sparse rounds, 3D smoothing and components) with a context adapter: the same logits,
    # post-processed as volume_context.py says.
    result = segment_image(model, image, labels, axis="axial")
    again = slice_logits(model, image, labels, axis="axial", context=VolumeContext.for_model(model))
    from SSAMSegmentLib.inference.slice_inference import masks_from_logits

    rebuilt = masks_from_logits(again, 0.0, VolumeContext.for_model(model), 0.0)
    for label in labels:
        assert result.masks[label].GetSize() == image.GetSize()
        np.testing.assert_array_equal(sitk.GetArrayFromImage(result.masks[label]),
                                      sitk.GetArrayFromImage(rebuilt.masks[label]))
    assert result.volume_context != "slices alone"


def test_a_tiled_label_with_neighbours_matches_the_direct_computation(adapters):
    model = adapters["context"]
    image, _ = _ct(shape=(3, 150, 200), spacing=(0.5, 0.5, 2.0), seed=9)
    labels = ["organ", "vessel"]
    record = TileRecord(64, 16)
    model.tile_records = {"vessel": record}
    try:
        decoded = slice_logits(model, image, labels, axis="axial", probe_mm=None)
    finally:
        model.tile_records = {}
    expected = _direct_logits(model, image, labels, range(3), tiles=[None, record])
    for k in range(3):
        for label in range(2):
            np.testing.assert_array_equal(decoded.volumes[label][k], expected[k][label])


def test_corrections_feed_the_neighbours_too(adapters, monkeypatch):
    from SSAMSegmentLib.inference.physical_prompts import PhysicalPrompt
    from SSAMSegmentLib.inference.refinement import refine

    image, _ = _ct()
    array = sitk.GetArrayFromImage(image)
    model = adapters["context"]
    seen = _recording_encoder(model, monkeypatch)
    k = 2
    box = (image.TransformIndexToPhysicalPoint((12, 10, k)), image.TransformIndexToPhysicalPoint((24, 20, k)))
    refine(model, image, "organ", PhysicalPrompt(box=box), axis="axial", carry=False)
    mapping = choose_mapping(image)
    stack = _stack([mapping.apply(array[k + o])[..., 0] for o in (-1, 0, 1)])
    pixels = torch.from_numpy(stack).permute(2, 0, 1)[None]
    expected = to_model_input(pixels, model.image_size, model.pixel_mean, model.pixel_std, (0.7, 0.8))[0]
    assert len(seen) == 1
    torch.testing.assert_close(seen[0], expected, rtol=0, atol=0)


# --- training -------------------------------------------------------------------------------------------------------


def test_ssam_train_context_flag():
    from SSAMSegmentLib.training_cli import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert parser.parse_args(["data", "--output", "a.safetensors", "--neighbour-slices"]).neighbour_slices is True
    assert parser.parse_args(["data", "--output", "a.safetensors"]).neighbour_slices is False
    with pytest.raises(SSAMError, match="neighbour_slices 'yes' must be True or False"):
        TrainingConfig(data="data", neighbour_slices="yes").check()


def test_training_with_context_records_it_and_resume_refuses_the_other_setting(tmp_path, monkeypatch):
    from SSAMSegmentLib.training import trainer

    dataset, _ = _dataset()  # a CT volume and a 2D image: context applies to the CT only
    banks = []
    monkeypatch.setattr(trainer, "build_slice_bank", lambda *a, **k: banks.append(k["neighbours"]) or
                        build_slice_bank(*a, **k))

    def config(name, context, **extra):
        return TrainingConfig(data=dataset, output=str(tmp_path / f"{name}.adapter.safetensors"), base="test-vit",
                              image_size=64, steps=2, batch_size=2, val_fraction=0.0, seed=1, tiles="off",
                              neighbour_slices=context, **extra)

    for name, context in (("context", True), ("plain", False)):
        banks.clear()
        result = train(config(name, context))
        assert banks == [context, context]  # the training and the (empty) validation slices
        metadata = read_metadata(result.adapter_path)
        assert metadata["neighbour_slices"] is context and metadata["training"]["neighbour_slices"] is context
        assert SSAMSegmentLib.load(adapter=result.adapter_path).neighbour_slices is context
        other = config(name, not context, resume=str(result.checkpoint_path))
        with pytest.raises(SSAMError, match="made with different fingerprint"):
            train(other)
        train(config(name, context, resume=str(result.checkpoint_path)))  # the same setting resumes
