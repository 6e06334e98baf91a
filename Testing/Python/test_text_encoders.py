"""Text encoders: the offline MiniLM, CLIP through its real loading path, fail-fast when weights are missing."""

import time

import pytest
import torch

from SSAMSegmentLib import SSAMError

from SSAMSegmentLib.model import text_encoders

from SSAMSegmentLib.model import weights
from SSAMSegmentLib.model.text_encoders import LabelEmbeddings, load_text_encoder


def test_minilm_is_offline_deterministic_and_semantic():
    encoder = load_text_encoder("minilm-l6")
    vectors = encoder.encode(["liver", "hepatic tissue", "polyp", "liver"])
    assert vectors.shape == (4, 384) and vectors.dtype == torch.float32
    assert torch.equal(vectors[0], vectors[3])
    cosine = torch.nn.functional.cosine_similarity
    # A real sentence encoder: the liver is closer to hepatic tissue than to a polyp.
    assert cosine(vectors[0], vectors[1], dim=0) > cosine(vectors[0], vectors[2], dim=0)


def test_label_embeddings_are_computed_once(monkeypatch):
    encoder = load_text_encoder("minilm-l6")
    calls = []
    original = encoder._encode
    monkeypatch.setattr(encoder, "_encode", lambda labels: calls.append(list(labels)) or original(labels))
    cache = LabelEmbeddings("minilm-l6", 384)
    first = cache.lookup(["spleen", "liver", "spleen"])
    second = cache.lookup(["Liver", "SPLEEN"])
    assert calls == [["spleen", "liver"]]
    torch.testing.assert_close(second, first[[1, 0]])


def test_clip_without_weights_fails_fast_naming_the_file():
    start = time.perf_counter()
    with pytest.raises(SSAMError) as error:
        load_text_encoder("clip-vit-b-32")
    assert time.perf_counter() - start < 2.0
    message = str(error.value)
    assert "open_clip_vit_b_32_openai.safetensors" in message and "ssam download clip-vit-b-32" in message
    assert "\n" not in message


def test_unknown_label_without_encoder_says_which(monkeypatch):
    cache = LabelEmbeddings("clip-vit-b-32", 512, {"liver": torch.ones(512)})
    cache.lookup(["Liver"])  # known: no encoder needed
    with pytest.raises(SSAMError, match="tumor.*not among the adapter's labels.*liver"):
        cache.lookup(["tumor"])


@pytest.mark.slow
def test_clip_loading_path_with_a_generated_checkpoint(tmp_path, monkeypatch):
    """The real open_clip ViT-B-32 architecture, loaded from a safetensors file in the official key layout."""
    import open_clip
    from safetensors.torch import save_file

    model = open_clip.create_model("ViT-B-32", pretrained=None, force_quick_gelu=True)
    path = tmp_path / "clip.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    fake_registry = dict(weights.WEIGHT_FILES)
    fake_registry["clip-vit-b-32"] = weights.WeightFile(
        "clip-vit-b-32", path.name, "http://127.0.0.1:9/unused", weights.file_sha256(path), path.stat().st_size, "MIT", ""
    )
    monkeypatch.setattr(weights, "WEIGHT_FILES", fake_registry)
    monkeypatch.setenv("SSAM_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(text_encoders, "_LOADED", {})
    encoder = load_text_encoder("clip-vit-b-32")
    vectors = encoder.encode(["Glands", "Liver"])
    assert vectors.shape == (2, 512)
    expected = model.encode_text(open_clip.get_tokenizer("ViT-B-32")(["Glands", "Liver"]), normalize=False)
    torch.testing.assert_close(vectors, expected.detach(), rtol=1e-4, atol=1e-4)
