"""From a 2D slice (intensities already mapped to 0..255) to the square tensor the image encoder expects, and from
the decoder's low-resolution logits back to the slice's own size."""

from typing import Tuple

import torch
import torch.nn.functional as F


def resized_shape(height: int, width: int, image_size: int, spacing=(1.0, 1.0)) -> Tuple[int, int]:
    """The shape after resizing the longest side to image_size, as SAM's ResizeLongestSide computes it; with
    non-square pixels (row, column spacing) the physical aspect ratio is kept, so anatomy is not stretched."""
    physical_h, physical_w = height * spacing[0] / min(spacing), width * spacing[1] / min(spacing)
    scale = image_size / max(physical_h, physical_w)
    return max(1, int(physical_h * scale + 0.5)), max(1, int(physical_w * scale + 0.5))


def model_coordinates(xy, slice_hw: Tuple[int, int], image_size: int, spacing=(1.0, 1.0)) -> torch.Tensor:
    """Pixel coordinates (..., 2k) as x, y pairs on a slice (H, W) -> the same points on the model's input, which is
    the slice resized by resized_shape (SAM's ResizeLongestSide.apply_coords, with our physical aspect)."""
    height, width = slice_hw
    new_h, new_w = resized_shape(height, width, image_size, spacing)
    xy = torch.as_tensor(xy, dtype=torch.float32)
    scale = torch.tensor([new_w / width, new_h / height]).repeat(xy.shape[-1] // 2)
    return xy * scale


def resize_to_model(slices: torch.Tensor, image_size: int, spacing=(1.0, 1.0)):
    """slices (B, C, H, W) -> resized so the longest physical side is image_size, and that (h, w)."""
    height, width = slices.shape[-2:]
    new_h, new_w = resized_shape(height, width, image_size, spacing)
    x = slices.float()
    if (new_h, new_w) != (height, width):
        x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=True)
    return x, (new_h, new_w)


def normalize_and_pad(x: torch.Tensor, image_size: int, pixel_mean, pixel_std) -> torch.Tensor:
    """(B, 3, h, w) in 0..255 -> (B, 3, S, S): the base's pixel normalisation, then zeros bottom/right (SAM's order)."""
    mean = torch.as_tensor(pixel_mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    std = torch.as_tensor(pixel_std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    x = (x - mean) / std
    return F.pad(x, (0, image_size - x.shape[-1], 0, image_size - x.shape[-2]))


def to_model_input(slices: torch.Tensor, image_size: int, pixel_mean, pixel_std, spacing=(1.0, 1.0)):
    """slices (B, 3, H, W), 0..255 -> (B, 3, S, S) normalised, longest side S, zero-padded bottom/right.

    Returns the tensor and the (h, w) of the resized content inside the padding.
    """
    x, content = resize_to_model(slices, image_size, spacing)
    return normalize_and_pad(x, image_size, pixel_mean, pixel_std), content


def to_model_mask(masks: torch.Tensor, image_size: int, spacing=(1.0, 1.0)) -> torch.Tensor:
    """Binary masks (B, H, W) -> (B, 1, S, S) targets: resized like the image, thresholded at 0.5, padded with 0."""
    height, width = masks.shape[-2:]
    new_h, new_w = resized_shape(height, width, image_size, spacing)
    x = masks.float().unsqueeze(1)
    if (new_h, new_w) != (height, width):
        x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=False)
    x = (x > 0.5).float()
    return F.pad(x, (0, image_size - new_w, 0, image_size - new_h))


def logits_to_slice(logits: torch.Tensor, image_size: int, content_hw: Tuple[int, int], out_hw: Tuple[int, int]):
    """Low-res logits (B, 1, h, w) covering the padded S x S input -> logits (B, 1, H, W) on the slice's own grid:
    upsample to S, crop the padding away, resize to the slice's size (SAM's postprocess_masks)."""
    x = F.interpolate(logits.float(), size=(image_size, image_size), mode="bilinear", align_corners=False)
    x = x[..., : content_hw[0], : content_hw[1]]
    return F.interpolate(x, size=tuple(out_hw), mode="bilinear", align_corners=False)
