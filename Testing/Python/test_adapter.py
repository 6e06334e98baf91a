"""Adapter files: exact round trip, refusal of mismatched or damaged files, never unpickling."""

import json

import pytest
import torch

import SSAMSegmentLib
from SSAMSegmentLib import SSAMError
from SSAMSegmentLib.model.adapter import read_metadata

from helpers import perturbed_model, write_code_running_pickle


def _trained(base="test-vit", seed=0):
    return perturbed_model(base, labels=("Liver", "kidney_left"), seed=seed, amount=0.1)


def test_round_trip_is_exact(tmp_path):
    model = _trained()
    path = model.save_adapter(tmp_path / "a.adapter.safetensors", {"epochs": 3, "val_dice": {"Liver": 0.8}})
    loaded = SSAMSegmentLib.load(adapter=path)
    assert loaded.spec.id == "test-vit"
    for name, tensor in model.trainable_state().items():
        assert torch.equal(loaded.trainable_state()[name], tensor), name
    assert loaded.labels.known_names() == ["Liver", "kidney_left"]
    # Known labels match regardless of case and underscores, and need no text encoder.
    torch.testing.assert_close(loaded.text_embeddings(["liver", "Kidney left"]), model.text_embeddings(["Liver", "kidney_left"]))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, ["Liver"]), model(x, ["Liver"]))
    metadata = read_metadata(path)
    assert metadata["training"]["epochs"] == 3
    assert metadata["base_sha256"] == model.base_sha256
    assert set(metadata["tensors"]) == set(model.trainable_names())


def test_only_trained_tensors_are_stored(tmp_path):
    model = SSAMSegmentLib.load(base="litemedsam")
    path = model.save_adapter(tmp_path / "lite.safetensors")
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        stored = sum(handle.get_tensor(k).numel() for k in handle.keys())
    assert stored == model.parameter_counts()["trainable"]
    assert path.stat().st_size < 1_000_000  # well under 1 MB, not a copy of the 39 MB base


def test_mismatched_base_is_refused_naming_both(tmp_path):
    path = _trained(base="test-vit").save_adapter(tmp_path / "vit.safetensors")
    with pytest.raises(SSAMError, match=r"trained for base test-vit, not test-tinyvit"):
        SSAMSegmentLib.load(base="test-tinyvit", adapter=path)
    other = SSAMSegmentLib.load(base="test-tinyvit")
    with pytest.raises(SSAMError, match=r"base test-vit, but the model has test-tinyvit"):
        other.load_adapter(path)


def test_mismatched_text_encoder_is_refused(tmp_path):
    path = _trained().save_adapter(tmp_path / "a.safetensors")
    with pytest.raises(SSAMError, match="text encoder minilm-l6, not clip-vit-b-32"):
        SSAMSegmentLib.load(adapter=path, text_encoder="clip-vit-b-32")
    clip_model = SSAMSegmentLib.load(base="test-vit", text_encoder="clip-vit-b-32")
    with pytest.raises(SSAMError, match="text encoder minilm-l6, but the model has clip-vit-b-32"):
        clip_model.load_adapter(path)


def test_other_base_weights_are_refused(tmp_path):
    model = _trained()
    model.base_sha256 = "0" * 64  # as if trained on another checkpoint of the same architecture
    path = model.save_adapter(tmp_path / "a.safetensors")
    with pytest.raises(SSAMError, match="base weights"):
        SSAMSegmentLib.load(adapter=path)


def test_truncated_file_is_refused(tmp_path):
    path = _trained().save_adapter(tmp_path / "a.safetensors")
    data = path.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(SSAMError, match="damaged") as error:
        SSAMSegmentLib.load(adapter=truncated)
    assert "\n" not in str(error.value)


def test_pickle_is_never_loaded(tmp_path):
    marker = tmp_path / "executed"
    evil = write_code_running_pickle(tmp_path / "evil.safetensors", marker)
    with pytest.raises(SSAMError):
        SSAMSegmentLib.load(adapter=evil)
    torch.save({"x": torch.ones(1)}, tmp_path / "state.pt")
    with pytest.raises(SSAMError, match="not a safetensors file|damaged"):
        SSAMSegmentLib.load(adapter=tmp_path / "state.pt")
    assert not marker.exists()


def test_foreign_safetensors_and_missing_file(tmp_path):
    from safetensors.torch import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.ones(2)}, str(foreign))
    with pytest.raises(SSAMError, match="not an S-SAM adapter"):
        SSAMSegmentLib.load(adapter=foreign)
    with pytest.raises(SSAMError, match="does not exist"):
        SSAMSegmentLib.load(adapter=tmp_path / "nope.safetensors")


def test_wrong_tensor_shapes_are_refused(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = _trained().save_adapter(tmp_path / "a.safetensors")
    with safe_open(str(path), framework="pt") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
        metadata = handle.metadata()
    tensors["text_affine.0.bias"] = torch.zeros(7)
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata=metadata)
    with pytest.raises(SSAMError, match="shape"):
        SSAMSegmentLib.load(adapter=bad)
    # A newer format version is refused with a clear instruction.
    newer = dict(metadata, ssam=json.dumps(dict(json.loads(metadata["ssam"]), format_version=99)))
    save_file(tensors, str(bad), metadata=newer)
    with pytest.raises(SSAMError, match="update SSAM Segment"):
        SSAMSegmentLib.load(adapter=bad)


def test_failed_save_keeps_previous_file(tmp_path, monkeypatch):
    path = _trained(seed=1).save_adapter(tmp_path / "a.safetensors")
    before = path.read_bytes()
    import safetensors.torch

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    with pytest.raises(SSAMError, match="No space left"):
        _trained(seed=2).save_adapter(path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors"]
