"""The base model prompted in its own, native way: a bounding box per slice, no text.

This is how LiteMedSAM and SAM were trained, so it proves that the pretrained weights and our preprocessing are
right, and with the box of the ground truth it is the strongest zero-shot baseline an adapter is compared with. The
decoding itself is the model's one prompt path (SSAM.decode); this file only brings a slice and its pixel boxes there.
"""

import numpy as np
import torch

from .preprocessing import logits_to_slice, model_coordinates, to_model_input


def mask_box(mask: np.ndarray):
    """(x0, y0, x1, y1) pixel box of a 2D mask, or None when it is empty."""
    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        return None
    return float(cols.min()), float(rows.min()), float(cols.max()), float(rows.max())


@torch.inference_mode()
def box_prompt_masks(model, rgb_slice: np.ndarray, boxes, spacing=(1.0, 1.0), threshold_logit: float = 0.0,
                     with_quality: bool = False):
    """uint8 masks (len(boxes), H, W) for one slice (H, W, 3 in 0..255) prompted with pixel boxes (x0, y0, x1, y1);
    with_quality=True also returns the decoder's predicted IoU per box (numpy, len(boxes))."""
    height, width = rgb_slice.shape[:2]
    pixels = torch.from_numpy(np.ascontiguousarray(rgb_slice, dtype=np.float32)).permute(2, 0, 1)[None]
    inputs, content = to_model_input(pixels.to(model.device), model.image_size, model.pixel_mean, model.pixel_std, spacing)
    box_tensor = model_coordinates(np.asarray(boxes, dtype=np.float32).reshape(-1, 4), (height, width),
                                   model.image_size, spacing)
    logits, quality = model.decode(model.encode_images(inputs), boxes=box_tensor, with_quality=True)
    logits = logits_to_slice(logits, model.image_size, content, (height, width))
    masks = (logits[:, 0] > threshold_logit).to(torch.uint8).cpu().numpy()
    return (masks, quality.float().cpu().numpy()) if with_quality else masks


_UNTUNED: dict = {}  # one untuned copy of the base, rebuilt when another base, size, device or precision is asked


def untuned_base(model):
    """The model's base with its own pretrained weights, merged, on the same device and precision: what decodes a box
    or points without text. One box on the TotalSegmentator CT's spleen, carried over its 20 slices: volume Dice 0.962
    with it, 0.365 with the default adapter's tuned encoder (Testing/Python/test_refinement.py). The model itself when
    the base's weights cannot be rebuilt as they were (a user's own checkpoint file: another SHA256)."""
    from ..model.loading import load

    key = (model.spec.id, model.image_size, str(model.device), model.requested_precision, model.base_sha256)
    if key not in _UNTUNED:
        _UNTUNED.clear()
        untuned = load(base=model.spec.id, image_size=model.image_size, device=model.device,
                       precision=model.requested_precision, merge=True).eval()
        _UNTUNED[key] = untuned if untuned.base_sha256 == model.base_sha256 else model
    return _UNTUNED[key]
