"""The fast inference copy of a merged encoder (fast_encoder.py): the same embeddings and masks as the plain merged
encoder, rebuilt whenever the weights change, never part of the model's state, and no obstacle to training."""

import numpy as np
import pytest
import SimpleITK as sitk
import torch

import SSAMSegmentLib
from SSAMSegmentLib.errors import SSAMError
from SSAMSegmentLib.model.fast_encoder import FastTinyViT, build_fast_encoder
from SSAMSegmentLib.inference.slice_inference import segment_image


def _ct_like_slices(count=2, size=256, seed=0):
    """Model inputs made from CT-like phantoms: a body ellipse of soft tissue with organs, fat and bone, noise,
    mapped to 0..1 as LiteMedSAM expects, with SAM's zero padding on the bottom and right."""
    generator = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] / size
    slices = []
    for index in range(count):
        hu = np.full((size, size), -1000.0)
        hu[((xx - 0.5) / 0.42) ** 2 + ((yy - 0.45) / 0.33) ** 2 < 1] = 40  # soft tissue
        hu[((xx - 0.35 - 0.02 * index) / 0.12) ** 2 + ((yy - 0.4) / 0.1) ** 2 < 1] = 60  # liver-like organ
        hu[((xx - 0.5) / 0.05) ** 2 + ((yy - 0.65) / 0.05) ** 2 < 1] = 700  # vertebra
        hu[((xx - 0.68) / 0.06) ** 2 + ((yy - 0.42) / 0.08) ** 2 < 1] = -90  # fat
        hu += generator.normal(0, 15, hu.shape)
        unit = np.clip((hu + 160) / 400, 0, 1)  # abdominal window
        unit[int(size * 0.9):, :] = 0
        unit[:, int(size * 0.95):] = 0
        slices.append(np.repeat(unit[None], 3, 0))
    return torch.from_numpy(np.stack(slices)).float()


def _plain_merged_embeddings(model, images):
    """The merged encoder itself (its SingularValueTuned layers run as plain layers holding W')."""
    with torch.no_grad():
        return model.image_encoder(images)


def test_fast_copy_matches_the_plain_merged_encoder():
    model = SSAMSegmentLib.load(base="test-tinyvit", device="cpu", merge=True, precision="float32")
    images = _ct_like_slices(2)
    with torch.inference_mode():
        fast = model.encode_images(images)
    assert isinstance(model._fast_encoder._encoder, FastTinyViT)
    plain = _plain_merged_embeddings(model, images)
    assert fast.shape == plain.shape == (2, 256, 64, 64)
    torch.testing.assert_close(fast, plain, rtol=1e-4, atol=1e-5)
    # Batch members are independent: each slice alone gives the same embedding.
    with torch.no_grad():
        single = model.encode_images(images[1:])
    torch.testing.assert_close(single[0], fast[1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("pieces", [(8, 1 << 16, 1 << 14), (64, 64 << 20, 64 << 20)])
def test_piece_sizes_do_not_change_the_embeddings(pieces):
    """Bands, MLP chunks and attention chunks are independent pieces: tiny ones (many pieces, partial last ones) and
    whole-stage ones give the default sizes' embeddings, so the sizes are a speed setting only."""
    model = SSAMSegmentLib.load(base="test-tinyvit", device="cpu", merge=True, precision="float32")
    fast = build_fast_encoder(model.image_encoder, "tinyvit", "cpu")
    images = _ct_like_slices(2)
    with torch.no_grad():
        default = fast(images)
        fast.strip_rows, fast.mlp_chunk_bytes, fast.attention_chunk_bytes = pieces
        torch.testing.assert_close(fast(images), default, rtol=1e-4, atol=1e-5)


def test_batchnorm_is_folded_and_no_svd_factor_is_copied():
    model = SSAMSegmentLib.load(base="test-tinyvit", device="cpu", merge=True, precision="float32")
    fast = build_fast_encoder(model.image_encoder, "tinyvit", "cpu")
    modules = list(fast.modules())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in modules)
    assert not any(type(m).__name__ == "SingularValueTuned" for m in modules)
    assert not any(p.requires_grad for p in fast.parameters())
    fast.train()
    assert not fast.training, "the inference copy must stay in eval mode"


def test_fast_copy_is_not_part_of_the_model_state():
    model = SSAMSegmentLib.load(base="test-tinyvit", device="cpu", precision="float32")
    keys, counts = list(model.state_dict()), model.parameter_counts()
    model.merge()
    with torch.inference_mode():
        model.encode_images(_ct_like_slices(1))
    copy = model._fast_encoder._encoder
    assert copy is not None
    with torch.inference_mode():  # as segment_image does: eval() again, then encode
        model.eval()
        model.encode_images(_ct_like_slices(1))
    assert model._fast_encoder._encoder is copy, "the copy is kept while the weights stay the same"
    assert list(model.state_dict()) == keys
    assert model.parameter_counts() == counts
    assert not any("fast" in name for name, _ in model.named_modules())


def test_unmerged_or_gradient_recording_calls_use_the_plain_encoder():
    model = SSAMSegmentLib.load(base="test-tinyvit", device="cpu", precision="float32")
    images = _ct_like_slices(1)
    with torch.no_grad():
        model.encode_images(images)
    assert model._fast_encoder._encoder is None, "an unmerged model has no fast copy"
    model.merge()
    with torch.enable_grad():
        embeddings = model.encode_images(images)
    assert model._fast_encoder._encoder is None
    assert embeddings.requires_grad, "with gradients on, the merged model's own layers run"


def test_fast_copy_follows_new_weights_and_training_resumes_after_merge():
    torch.manual_seed(0)
    model = SSAMSegmentLib.load(base="test-tinyvit", device="cpu", precision="float32")
    torch.manual_seed(0)
    never_merged = SSAMSegmentLib.load(base="test-tinyvit", device="cpu", precision="float32")
    images = _ct_like_slices(2)
    labels = ["liver", "bone"]
    for name in labels:
        vector = torch.randn(model.text_dim, generator=torch.Generator().manual_seed(len(name)))
        model.labels.add(name, vector)
        never_merged.labels.add(name, vector)

    model.merge()
    with torch.inference_mode():
        before = model.encode_images(images)

    # Training after merge: the copy is dropped and the gradients are those of a model never merged.
    model.train()
    never_merged.train()
    assert not model.merged and model._fast_encoder._encoder is None
    gradients = []
    for network in (model, never_merged):
        network.zero_grad()
        network(images, labels).float().pow(2).mean().backward()
        gradients.append([p.grad.clone() for p in network.trainable_parameters()])
    for got, expected in zip(*gradients):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-7)
    assert any(g.abs().sum() > 0 for g in gradients[0][:2]), "singular-value scales get gradients"

    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    optimizer.step()
    model.eval().merge()
    with torch.inference_mode():
        after = model.encode_images(images)
    torch.testing.assert_close(after, _plain_merged_embeddings(model, images), rtol=1e-4, atol=1e-5)
    assert (after - before).abs().max() > 1e-3, "the trained weights reached the fast copy"

    # A weight changed in place without merge() again still reaches the copy (it tracks tensor versions).
    batchnorm = next(m for m in model.image_encoder.modules() if isinstance(m, torch.nn.BatchNorm2d))
    with torch.no_grad():
        batchnorm.weight.mul_(1.5)
    with torch.inference_mode():
        changed = model.encode_images(images)
    torch.testing.assert_close(changed, _plain_merged_embeddings(model, images), rtol=1e-4, atol=1e-5)


def test_vit_encoders_keep_their_merged_layers():
    model = SSAMSegmentLib.load(base="test-vit", device="cpu", merge=True, precision="float32")
    assert build_fast_encoder(model.image_encoder, "vit", "cpu") is None
    images = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        torch.testing.assert_close(model.encode_images(images), model.image_encoder(images))


@pytest.mark.parametrize("base, size", [("test-tinyvit", 256), ("test-vit", 64)])
def test_bf16_precision_is_an_argument_and_close(base, size):
    model = SSAMSegmentLib.load(base=base, device="cpu", merge=True, precision="float32")
    images = _ct_like_slices(1, size)
    with torch.inference_mode():
        exact = model.encode_images(images)
        approximate = model.set_precision("bf16").encode_images(images)
        assert model.precision == "bf16" and type(model._fast_encoder._encoder).__name__ == "_Bfloat16Autocast"
        again = model.set_precision("float32").encode_images(images)
    assert approximate.dtype == torch.float32
    assert not torch.equal(approximate, exact), "bf16 ran"
    assert (approximate - exact).abs().max() < 0.1 * exact.abs().max()
    torch.testing.assert_close(again, exact, rtol=0, atol=0)


def test_auto_precision_follows_the_cpu(monkeypatch):
    from SSAMSegmentLib.model import devices

    cpu = torch.device("cpu")
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: True)
    assert devices.inference_precision("auto", cpu) == "bf16"
    assert devices.inference_precision("float32", cpu) == "float32"
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: False)
    assert devices.inference_precision("auto", cpu) == "float32"
    assert devices.inference_precision("bf16", cpu) == "bf16"  # asked for: honoured even where it is emulated
    with pytest.raises(SSAMError, match="unknown precision 'fp8'"):
        SSAMSegmentLib.load(base="test-vit", device="cpu", precision="fp8")


@pytest.mark.slow
@pytest.mark.data
def test_litemedsam_same_masks_on_real_ct(data_dir, monkeypatch):
    """Real weights, real CT, the default adapter's labels: the product's segmentation with the fast copy against the
    plain merged encoder, slice by slice, on the same model."""
    model = SSAMSegmentLib.load(base="litemedsam", adapter="default", device="cpu", merge=True, precision="float32")
    ct = sitk.ReadImage(str(data_dir / "totalsegmentator-ct" / "example_ct_sm.nii.gz"))
    part = ct[:, :, 12:16]  # four axial slices through liver, spleen and kidneys
    labels = ["liver", "spleen", "kidney"]

    fast = segment_image(model, part, labels, axis="axial")
    assert isinstance(model._fast_encoder._encoder, FastTinyViT)
    monkeypatch.setattr(model._fast_encoder, "get", lambda *args, **kwargs: None)
    plain = segment_image(model, part, labels, axis="axial")

    total = 0
    for label in labels:
        a = sitk.GetArrayFromImage(fast.masks[label])
        b = sitk.GetArrayFromImage(plain.masks[label])
        total += int(b.sum())
        assert np.count_nonzero(a != b) <= 1e-4 * a.size, f"{label}: {np.count_nonzero(a != b)} voxels differ"
    assert total > 0, "the adapter finds these organs, so the comparison covers real masks"

    # The embeddings themselves agree to float tolerance on a real slice.
    from SSAMSegmentLib.inference.intensity import choose_mapping
    from SSAMSegmentLib.inference.preprocessing import to_model_input

    mapping = choose_mapping(part, "auto", None)
    rgb = mapping.apply(sitk.GetArrayViewFromImage(part)[1])
    pixels = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None]
    inputs, _ = to_model_input(pixels, model.image_size, model.pixel_mean, model.pixel_std)
    monkeypatch.undo()
    with torch.inference_mode():
        got = model.encode_images(inputs)
    torch.testing.assert_close(got, _plain_merged_embeddings(model, inputs), rtol=1e-3, atol=1e-4)
