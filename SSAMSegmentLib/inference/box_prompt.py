"""The base model prompted in its own, native way: a bounding box per slice, no text.

This is how LiteMedSAM and SAM were trained, so it proves that the pretrained weights and our preprocessing are
right, and with the box of the ground truth it is the strongest zero-shot baseline an adapter is compared with.
"""

import numpy as np
import torch

from .preprocessing import logits_to_slice, resized_shape, to_model_input


def mask_box(mask: np.ndarray):
    """(x0, y0, x1, y1) pixel box of a 2D mask, or None when it is empty."""
    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        return None
    return float(cols.min()), float(rows.min()), float(cols.max()), float(rows.max())


@torch.inference_mode()
def box_prompt_masks(model, rgb_slice: np.ndarray, boxes, spacing=(1.0, 1.0), threshold_logit: float = 0.0):
    """uint8 masks (len(boxes), H, W) for one slice (H, W, 3 in 0..255) prompted with pixel boxes (x0, y0, x1, y1)."""
    height, width = rgb_slice.shape[:2]
    pixels = torch.from_numpy(np.ascontiguousarray(rgb_slice, dtype=np.float32)).permute(2, 0, 1)[None]
    inputs, content = to_model_input(pixels.to(model.device), model.image_size, model.pixel_mean, model.pixel_std, spacing)
    new_h, new_w = resized_shape(height, width, model.image_size, spacing)
    scale = torch.tensor([new_w / width, new_h / height, new_w / width, new_h / height])
    box_tensor = (torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4) * scale).to(model.device)
    embedding = model.encode_images(inputs)
    sparse, dense = model.prompt_encoder(points=None, boxes=box_tensor[:, None, :], masks=None)
    logits, _ = model.mask_decoder(
        image_embeddings=embedding,
        image_pe=model.prompt_encoder.get_dense_pe(),
        sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense,
        multimask_output=False,
    )
    logits = logits_to_slice(logits, model.image_size, content, (height, width))
    return (logits[:, 0] > threshold_logit).to(torch.uint8).cpu().numpy()
