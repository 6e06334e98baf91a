"""3D consistency after the slice loop (inference/volume_context.py) and the one prompt path of the model."""

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from SSAMSegmentLib.inference.slice_geometry import SliceGeometry
from SSAMSegmentLib.inference.volume_context import (BACKGROUND, LOGIT_SCALE, VolumeContext, logits_to_mask,
                                                     new_logit_volume)

from helpers import grid_image, perturbed_model


def _geometry(shape, spacing):
    """spacing in numpy (z, y, x) order, an axial LPS volume."""
    return SliceGeometry.for_image(grid_image(np.zeros(shape, np.int16), tuple(reversed(spacing)), (0, 0, 0)), "axial")


def _logits(probability_volume):
    """A logit volume as the slice loop stores it, from a 0/1 picture: +5 inside, -5 outside."""
    volume = new_logit_volume(probability_volume.shape)
    volume[...] = np.where(probability_volume > 0, 5 * LOGIT_SCALE, -5 * LOGIT_SCALE)
    return volume


def test_a_one_slice_flicker_goes_on_thin_slices_and_stays_on_thick_ones():
    picture = np.zeros((10, 20, 20), np.uint8)
    picture[2:7, 5:15, 5:15] = 1  # an organ over 5 slices
    picture[8, 2:4, 2:4] = 1  # a one-slice false positive at the end of the volume
    picture[4, 5:15, 5:15] = 0  # and one slice the model missed in the middle
    smooth = VolumeContext(smoothing_mm=2.0)
    thin = logits_to_mask(_logits(picture), _geometry(picture.shape, (1.0, 1, 1)), 0.0, smooth, "liver")
    assert thin.dtype == np.uint8 and set(np.unique(thin)) <= {0, 1}
    assert not thin[8].any() and thin[4, 5:15, 5:15].all()
    thick = logits_to_mask(_logits(picture), _geometry(picture.shape, (6.0, 1, 1)), 0.0, smooth, "liver")
    np.testing.assert_array_equal(thick, picture)  # 6 mm apart, neighbours say almost nothing
    alone = logits_to_mask(_logits(picture), _geometry(picture.shape, (1.0, 1, 1)), 0.0, VolumeContext(), "liver")
    np.testing.assert_array_equal(alone, picture)


def test_never_decoded_slices_count_as_background_and_threshold_is_kept():
    volume = new_logit_volume((3, 8, 8))
    assert (volume == BACKGROUND).all()
    volume[1] = int(1.0 * LOGIT_SCALE)  # logit 1 = probability 0.73
    mask = logits_to_mask(volume.copy(), _geometry((3, 8, 8), (5.0, 1, 1)), 0.0, VolumeContext(), "x")
    assert mask[1].all() and not mask[0].any() and not mask[2].any()
    mask = logits_to_mask(volume.copy(), _geometry((3, 8, 8), (5.0, 1, 1)), np.log(0.8 / 0.2), VolumeContext(), "x")
    assert not mask.any()


def test_small_components_go_and_keep_largest_only_where_asked():
    picture = np.zeros((10, 30, 30), np.uint8)
    picture[1:9, 2:12, 2:12] = 1  # 800 voxels, 0.8 mL at 1 mm
    # a second structure that is connected only through a diagonal path across slices (one component in 3D)
    for z in range(1, 9):
        picture[z, 15 + z:18 + z, 15:18] = 1
    picture[5, 27:29, 2:4] = 1  # 4 voxels: a speck
    geometry = _geometry(picture.shape, (1.0, 1, 1))
    cleaned = logits_to_mask(_logits(picture), geometry, 0.0, VolumeContext(min_component_ml=0.01), "kidney")
    expected = picture.copy()
    expected[5, 27:29, 2:4] = 0
    np.testing.assert_array_equal(cleaned, expected)  # the diagonal structure (72 voxels) survives as one piece
    context = VolumeContext(min_component_ml=0.01, keep_largest=frozenset({"liver"}))
    largest = logits_to_mask(_logits(picture), geometry, 0.0, context, "Liver")
    expected[:, 15:, :] = 0
    np.testing.assert_array_equal(largest, expected)
    kept = logits_to_mask(_logits(picture), geometry, 0.0, context, "kidney")
    assert kept[:, 15:, 15:].sum() == 72


def test_context_comes_from_the_adapter_and_can_be_turned_off(tmp_path):
    import SSAMSegmentLib
    from SSAMSegmentLib import SSAMError

    model = perturbed_model("test-vit", labels=("organ",), image_size=64)
    model.keep_largest = ["organ"]
    path = model.save_adapter(tmp_path / "a.adapter.safetensors")
    loaded = SSAMSegmentLib.load(base="test-vit", image_size=64, adapter=path)
    assert loaded.keep_largest == ["organ"]
    auto = VolumeContext.for_model(loaded)
    assert auto.keep_largest == {"organ"} and auto.smoothing_mm > 0 and auto.min_component_ml > 0
    assert not VolumeContext.for_model(loaded, "off").active
    with pytest.raises(SSAMError, match="unknown volume context"):
        VolumeContext.for_model(loaded, "sometimes")


def test_text_box_and_points_share_one_decode_with_its_quality():
    model = perturbed_model("test-vit", image_size=64).eval()
    embeddings = model.encode_images(torch.zeros(2, 3, 64, 64))
    tokens = model.prompt_tokens(model.text_embeddings(["organ", "vessel"]))
    boxes = torch.tensor([[4.0, 4, 30, 30], [10, 12, 50, 40]])
    points, point_labels = torch.tensor([[[16.0, 16]], [[20, 20]]]), torch.tensor([[1], [0]])
    with torch.no_grad():
        text = model.decode(embeddings, tokens)
        both, quality = model.decode(embeddings, tokens, boxes=boxes, points=points, point_labels=point_labels,
                                     with_quality=True)
        box_only = model.decode(embeddings, boxes=boxes)
        # the box alone is exactly the base's own box prompt
        sparse, dense = model.prompt_encoder(points=None, boxes=boxes, masks=None)
        native, _ = model.mask_decoder(image_embeddings=embeddings, image_pe=model.prompt_encoder.get_dense_pe(),
                                       sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                       multimask_output=False)
    assert text.shape == both.shape == box_only.shape == (2, 1, 16, 16)
    assert quality.shape == (2,)
    torch.testing.assert_close(box_only, native)
    assert not torch.allclose(both, text)  # the box and points change the answer
    with pytest.raises(ValueError, match="needs text tokens, boxes or points"):
        model.decode(embeddings)
    with pytest.raises(ValueError, match="batch sizes differ"):
        model.decode(embeddings, tokens, boxes=boxes[:1])


def test_segmentation_reports_a_confidence_per_label_and_slice():
    from test_slice_inference import _phantom

    model = perturbed_model("test-vit", seed=4, image_size=64)
    image = _phantom()
    result = model.segment(image, ["organ", "vessel"])
    for label in ("organ", "vessel"):
        scores = result.slice_confidence[label]
        assert scores.shape == (image.GetSize()[2],) and np.isfinite(scores).all()
        assert ((scores >= 0) & (scores <= 1)).all()  # a predicted IoU, whatever the head regresses
    found = [label for label in result.masks if label not in result.empty_labels]
    assert found, "the perturbed model finds something on the phantom"
    assert result.confidence(found[0]) == pytest.approx(
        float(np.mean(result.slice_confidence[found[0]][sitk.GetArrayViewFromImage(result.masks[found[0]]).any((1, 2))])))
    assert "confidence" in result.summary()
