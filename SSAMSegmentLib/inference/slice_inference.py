"""Segmenting a 2D or 3D image from label names, slice by slice, into uint8 masks on the image's own grid.

Per image: one intensity mapping, one slicing geometry, each label's prompt token computed once. Per slice: the image
encoder runs once, the mask decoder once per label (all labels in one batch), the logits are brought back to the
slice's own size and thresholded straight into the uint8 output masks. Only the current slices and their embeddings
are in memory, never a float copy of the volume; slices without signal (constant intensity) are skipped.
"""

import collections
import dataclasses
import math
import time
from typing import Callable, List, Optional

import numpy as np
import SimpleITK as sitk
import torch

from ..model.devices import autocast
from ..errors import Cancelled, SSAMError
from ..files.image_io import check_image
from .intensity import choose_mapping, has_signal
from . import tiling
from .preprocessing import logits_to_slice, to_model_input
from .slice_geometry import SliceGeometry
from ..model.text_encoders import label_key

Progress = Callable[[float, str], None]


@dataclasses.dataclass
class SegmentationResult:
    masks: "collections.OrderedDict[str, sitk.Image]"  # label -> uint8 0/1 mask with the image's geometry
    empty_labels: List[str]
    axis: str
    array_axis: int  # the numpy axis of the image array that was cut into slices
    intensity: str
    slices: int
    skipped_slices: int
    seconds: float

    def summary(self) -> str:
        found = [f"{name} ({int(np.count_nonzero(sitk.GetArrayViewFromImage(mask)))} voxels)"
                 for name, mask in self.masks.items() if name not in self.empty_labels]
        parts = [f"found {', '.join(found)}" if found else "no label found"]
        if self.empty_labels:
            parts.append(f"absent (empty mask): {', '.join(self.empty_labels)}")
        return "; ".join(parts) + f" [{self.slices} {self.axis} slices, {self.seconds:.1f} s]"


def unique_labels(labels) -> List[str]:
    if isinstance(labels, str):
        labels = [labels]
    cleaned = [str(label).strip() for label in labels or []]
    if not cleaned or not all(cleaned):
        raise SSAMError("no label name given; name the structure to segment, e.g. --label liver")
    seen, result = set(), []
    for label in cleaned:
        if label_key(label) not in seen:
            seen.add(label_key(label))
            result.append(label)
    return result


def _check_cancel(cancel):
    if cancel is not None and cancel.is_set():
        raise Cancelled("segmentation cancelled; nothing was written")


def default_batch_size(device: torch.device) -> int:
    # Batching slices does not speed up the encoder on a CPU and costs memory; on a GPU it keeps the device busy.
    return 8 if device.type in ("cuda", "mps") else 1


@torch.inference_mode()
def segment_image(model, image: sitk.Image, labels, axis: str = "auto", threshold: float = 0.5,
                  intensity: str = "auto", window=None, batch_size: Optional[int] = None,
                  progress: Optional[Progress] = None, cancel=None) -> SegmentationResult:
    """Masks for `labels` on `image` (2D/3D, scalar/RGB). See the module docstring for the data flow."""
    start = time.perf_counter()
    image = check_image(image)
    labels = unique_labels(labels)
    if not 0.0 < float(threshold) < 1.0:
        raise SSAMError(f"threshold {threshold} is outside (0, 1); use a probability such as 0.5")
    geometry = SliceGeometry.for_image(image, axis)
    mapping = choose_mapping(image, intensity, window)
    was_training = model.training
    model.eval()
    if not model.merged:
        model.merge()
    device = model.device
    tokens = model.prompt_tokens(model.text_embeddings(labels))  # (N, 1, 256), once per image
    logit_threshold = math.log(threshold / (1.0 - threshold))
    batch_size = batch_size or default_batch_size(device)
    tiles = tiling.label_records(model, labels)  # per label: None (whole image) or its TileRecord from the adapter

    source = geometry.canonical(sitk.GetArrayViewFromImage(image))
    outputs = [np.zeros(geometry.shape, dtype=np.uint8) for _ in labels]
    targets = [geometry.canonical(out) for out in outputs]
    spacing = geometry.in_plane_spacing()
    total, skipped = geometry.num_slices, 0
    indices = list(range(total))
    try:
        for first in range(0, total, batch_size):
            _check_cancel(cancel)
            batch = []
            for index in indices[first:first + batch_size]:
                view = geometry.slice_view(source, index)
                if has_signal(view):
                    batch.append((index, mapping.apply(view)))
                else:
                    skipped += 1
            if batch:
                _segment_batch(model, batch, tokens, geometry, targets, spacing, logit_threshold, device, tiles)
            if progress:
                done = min(first + batch_size, total)
                progress(done / total, f"slice {done}/{total}")
    finally:
        if was_training:
            model.train()

    masks = collections.OrderedDict()
    for label, out in zip(labels, outputs):
        mask = sitk.GetImageFromArray(out)
        _copy_geometry(mask, image)
        masks[label] = mask
    empty = [label for label, out in zip(labels, outputs) if not out.any()]
    return SegmentationResult(masks, empty, geometry.axis, geometry.array_axis, mapping.describe(), total, skipped,
                              time.perf_counter() - start)


def _copy_geometry(mask: sitk.Image, image: sitk.Image):
    mask.SetSpacing(image.GetSpacing())
    mask.SetOrigin(image.GetOrigin())
    mask.SetDirection(image.GetDirection())


def _slice_logits(model, rgbs, tokens, spacing, device):
    """Logits (B, N, H, W) of N labels on B slices (H, W, 3) of one size, on the slices' own grid."""
    height, width = rgbs[0].shape[:2]
    pixels = torch.from_numpy(np.stack(rgbs)).permute(0, 3, 1, 2).to(device)
    inputs, content = to_model_input(pixels, model.image_size, model.pixel_mean, model.pixel_std, spacing)
    count, labels = len(rgbs), tokens.shape[0]
    with autocast(device):
        embeddings = model.encode_images(inputs)
        # Every label of a slice shares that slice's embedding: (B*N) decoder inputs, no re-encoding.
        logits = model.decode(embeddings.repeat_interleave(labels, dim=0), tokens.repeat(count, 1, 1))
    logits = logits_to_slice(logits, model.image_size, content, (height, width))
    return logits[:, 0].reshape(count, labels, height, width)


def _segment_batch(model, batch, tokens, geometry, targets, spacing, logit_threshold, device, tiles=None):
    whole = [i for i, record in enumerate(tiles or [None] * tokens.shape[0]) if record is None]
    if whole:
        logits = _slice_logits(model, [rgb for _, rgb in batch], tokens[whole], spacing, device)
        masks = (logits > logit_threshold).to(torch.uint8).cpu().numpy()
        for (index, _), per_label in zip(batch, masks):
            for label, mask in zip(whole, per_label):
                geometry.slice_view(targets[label], index)[...] = mask
    if len(whole) < tokens.shape[0]:  # labels the adapter segments in tiles (tiling.py)
        tiling.segment_in_tiles(lambda rgb, chosen: _slice_logits(model, [rgb], tokens[chosen], spacing, device)[0],
                                batch, tiles, geometry, targets, logit_threshold)
