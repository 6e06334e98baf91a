"""The S-SAM model: equals the pretrained base at initialisation, the trainable set, merging, device choice."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import SSAMSegmentLib
from SSAMSegmentLib import SSAMError
from SSAMSegmentLib.model import devices
from SSAMSegmentLib.model.bases import build_base, get_base
from SSAMSegmentLib.model.ssam_model import PARAMETER_GROUPS, SSAM, pool_positional_embedding
from SSAMSegmentLib.model.svd_linear import SingularValueTuned, tuned_layers

from conftest import REPO


def _perturb_trainables(model, seed=0, amount=0.05):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.trainable_parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * amount)


def test_imports_without_slicer_gpu_or_network():
    code = textwrap.dedent(
        """
        import socket, sys
        def refuse(*args, **kwargs):
            raise RuntimeError("network access during import")
        socket.socket.connect = refuse
        socket.create_connection = refuse
        import SSAMSegmentLib
        assert "slicer" not in sys.modules and "vtk" not in sys.modules, "Slicer imported"
        import torch
        assert not torch.cuda.is_initialized()
        print("ok")
        """
    )
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(REPO))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def _plain_vit_encoder(spec, state, image_size):
    """segment-anything's own ImageEncoderViT with the base's weights, at `image_size`."""
    parts = spec.build()
    encoder = parts.image_encoder
    encoder.load_state_dict({k[len("image_encoder."):]: v for k, v in state.items() if k.startswith("image_encoder.")})
    grid = image_size // 16
    encoder.pos_embed = nn.Parameter(pool_positional_embedding(encoder.pos_embed.detach(), grid))
    return encoder.eval()


@pytest.mark.parametrize("image_size", [128, 64, 96])
def test_vit_encoder_equals_segment_anything_at_init(image_size):
    from segment_anything.modeling import ImageEncoderViT

    spec = get_base("test-vit")
    parts, _ = build_base("test-vit")
    assert isinstance(parts.image_encoder, ImageEncoderViT)
    state = {f"{n}.{k}": v.clone() for n, m in parts._asdict().items() for k, v in m.state_dict().items()}
    model = SSAMSegmentLib.load(base="test-vit", image_size=image_size, precision="float32")
    plain = _plain_vit_encoder(spec, state, image_size)
    x = torch.randn(2, 3, image_size, image_size)
    with torch.no_grad():
        expected = plain(x)
        got = model.encode_images(x)
    assert got.shape == (2, 256, image_size // 16, image_size // 16)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_litemedsam_encoder_equals_pretrained_at_init():
    plain, _ = build_base("litemedsam")
    model = SSAMSegmentLib.load(base="litemedsam", precision="float32")
    assert len(model.tuned_layer_names) == 69
    x = torch.rand(1, 3, 256, 256)
    with torch.no_grad():
        expected = plain.image_encoder(x)
        unmerged = model.encode_images(x)
        merged = model.merge().encode_images(x)
    torch.testing.assert_close(unmerged, expected, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(merged, expected, rtol=1e-3, atol=1e-4)


def test_merged_and_unmerged_give_same_masks_and_training_resumes():
    model = SSAMSegmentLib.load(base="test-tinyvit", precision="float32")
    model.labels.add("gland", torch.linspace(-1, 1, model.text_dim))
    _perturb_trainables(model)
    x = torch.rand(2, 3, 256, 256) * 2 - 1
    with torch.no_grad():
        unmerged = model(x, ["gland", "gland"])
        merged = model.merge()(x, ["gland", "gland"])
    torch.testing.assert_close(merged, unmerged, rtol=1e-3, atol=1e-3)
    assert torch.equal(merged > 0, unmerged > 0) or (merged.sign() != unmerged.sign()).float().mean() < 1e-3
    # Merging kept a, b and the factors: training goes on, and gradients reach the singular values.
    model.train()
    assert not model.merged
    loss = model(x, ["gland", "gland"]).sigmoid().mean()
    loss.backward()
    layer = tuned_layers(model.image_encoder)[0]
    assert layer.scale.grad is not None and layer.scale.grad.abs().sum() > 0


def test_trainable_set_is_exactly_the_design():
    model = SSAMSegmentLib.load(base="test-vit")
    names = model.trainable_names()
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(names)
    assert set(names.values()) == set(PARAMETER_GROUPS)
    for name, group in names.items():
        if group == "singular values":
            assert name.endswith((".scale", ".shift")) and name.startswith("image_encoder.")
        elif group == "norms":
            assert name.startswith("image_encoder.") and ".norm" in name
        elif group == "positional embedding":
            assert name == "image_encoder.pos_embed"
        elif group == "decoder norms":
            assert name.startswith("mask_decoder.") and "norm" in name
        else:
            assert name.startswith("text_affine.")
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    assert "image_encoder.patch_embed.proj.weight" in frozen  # the patch embedding is not tuned
    assert not any(name.startswith("prompt_encoder.") for name in names)
    assert all(not name.endswith(".bias") or "norm" in name or name.startswith("text_affine") for name in names)
    assert not any(isinstance(m, SingularValueTuned) for m in model.image_encoder.patch_embed.modules())


def test_sam_vit_b_counts_match_the_paper_setting():
    model = SSAMSegmentLib.load(base="sam_vit_b", text_encoder="clip-vit-b-32", image_size=256, weights="none")
    counts = model.parameter_counts()
    assert counts["singular values"] == 74_752
    assert counts["norms"] == 36_864
    assert counts["positional embedding"] == 196_608
    assert counts["text affine layer"] == 131_840
    assert counts["decoder norms"] == 4_608
    assert counts["trainable"] == 444_672
    assert len(model.tuned_layer_names) == 12 * 4 + 2


def test_litemedsam_counts():
    counts = SSAMSegmentLib.load(base="litemedsam", weights="none").parameter_counts()
    assert counts["singular values"] == 18_644
    assert counts["norms"] == 7_424 + 9_856  # LayerNorms and BatchNorm scales/shifts of TinyViT
    assert counts["positional embedding"] == 0
    assert counts["text affine layer"] == 384 * 256 + 256 + 512
    assert counts["decoder norms"] == 4_608


@pytest.mark.parametrize("image_size", [256, 384, 512, 1024, 1280])
def test_positional_embedding_pooling(image_size):
    pos = torch.randn(1, 64, 64, 8)
    pooled = pool_positional_embedding(pos, image_size // 16)
    assert pooled.shape == (1, image_size // 16, image_size // 16, 8)
    if image_size == 256:  # 4x4 average pooling exactly
        expected = pos.reshape(1, 16, 4, 16, 4, 8).mean(dim=(2, 4))
        torch.testing.assert_close(pooled, expected)
    if image_size == 1024:
        assert torch.equal(pooled, pos)


def test_image_size_checks():
    with pytest.raises(SSAMError, match="multiple of 16"):
        get_base("sam_vit_b").check_image_size(300)
    with pytest.raises(SSAMError, match="only runs at image size 256"):
        get_base("litemedsam").check_image_size(512)
    with pytest.raises(SSAMError, match="unknown base"):
        get_base("sam_vit_z")


@pytest.mark.parametrize("norms_only", [False, True])
def test_batchnorm_statistics_stay_frozen_in_training(norms_only):
    model = SSAMSegmentLib.load(base="test-tinyvit")
    model.labels.add("x", torch.ones(model.text_dim))
    if norms_only:  # the paper's ablation baseline (tune="norms") trains the same BatchNorm scales and shifts
        model.freeze_singular_values()
    bn = next(m for m in model.image_encoder.modules() if isinstance(m, nn.BatchNorm2d))
    before = bn.running_mean.clone()
    model.train()
    assert not bn.training
    model(torch.rand(2, 3, 256, 256) * 5, ["x", "x"])
    assert torch.equal(bn.running_mean, before)
    assert bn.weight.requires_grad


def test_device_selection(monkeypatch):
    assert devices.select_device("auto").type == "cpu"
    assert devices.select_device("cpu").type == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert devices.select_device("auto").type == "cuda"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert devices.autocast_dtype(torch.device("cuda")) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert devices.autocast_dtype(torch.device("cuda")) == torch.float16
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(devices, "_mps_available", lambda: True)
    assert devices.select_device("auto").type == "mps"
    monkeypatch.setattr(devices, "_mps_available", lambda: False)
    with pytest.raises(SSAMError, match="no CUDA"):
        devices.select_device("cuda")
    with pytest.raises(SSAMError, match="unknown device"):
        devices.select_device("tpu9")
    assert devices.autocast_dtype(torch.device("cpu")) is None
    with devices.autocast(torch.device("cpu")):
        assert not torch.is_autocast_enabled()


def test_forward_shapes_and_label_count_check():
    model = SSAMSegmentLib.load(base="test-vit", image_size=64)
    model.labels.add("a", torch.ones(model.text_dim))
    logits = model(torch.randn(3, 3, 64, 64), ["a", "a", "a"])
    assert logits.shape == (3, 1, 16, 16)
    with pytest.raises(ValueError):
        model(torch.randn(2, 3, 64, 64), ["a"])
    assert isinstance(model, SSAM)
