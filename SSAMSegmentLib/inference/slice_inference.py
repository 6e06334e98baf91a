"""Segmenting a 2D or 3D image from label names, slice by slice, into uint8 masks on the image's own grid.

Per image: one intensity mapping, one slicing geometry, each label's prompt token computed once. Per slice: the image
encoder runs once, the mask decoder once per label (all labels in one batch), the logits are brought back to the
slice's own size and stored as int8 tenths of a logit in the array that becomes the label's uint8 mask; the
decoder's predicted IoU is kept per slice and label as a confidence. After the loop volume_context.py turns the
logits into masks using the neighbouring slices. Only the current slices and their embeddings are in memory, never a
float copy of the volume; slices without signal (constant intensity) are skipped.
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
from .preprocessing import logits_to_slice, to_model_input
from .slice_geometry import SliceGeometry
from .volume_context import VolumeContext, logits_to_mask, new_logit_volume, quantize_logits
from ..model.text_encoders import label_key

Progress = Callable[[float, str], None]


CHECK_BELOW = 0.5  # a slice whose predicted IoU is under this is listed for the user to check


def _ranges(indices) -> str:
    """[3, 4, 5, 9] -> '3-5, 9'."""
    groups, start = [], None
    for position, index in enumerate(indices):
        if start is None:
            start = index
        if position + 1 == len(indices) or indices[position + 1] != index + 1:
            groups.append(f"{start}" if start == index else f"{start}-{index}")
            start = None
    return ", ".join(groups)


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
    # label -> the decoder's predicted IoU on each slice, in the order of the image array along array_axis (NaN
    # where the slice was not decoded): SAM's own quality estimate, shown as a confidence.
    slice_confidence: "collections.OrderedDict[str, np.ndarray]" = dataclasses.field(default_factory=dict)
    volume_context: str = "slices alone"
    refined: dict = dataclasses.field(default_factory=dict)  # label -> array slice indices a correction rewrote

    def confidence(self, label: str) -> Optional[float]:
        """The label's confidence: the mean predicted IoU over the slices where its mask has voxels."""
        scores = self._found_scores(label)
        return float(np.mean(scores[1])) if scores[0].size else None

    def slices_to_check(self, label: str) -> List[int]:
        """Array slice indices where the label was found with a predicted IoU under CHECK_BELOW."""
        indices, scores = self._found_scores(label)
        return [int(i) for i, score in zip(indices, scores) if score < CHECK_BELOW]

    def _found_scores(self, label):
        scores = self.slice_confidence.get(label)
        if scores is None:
            return np.zeros(0, int), np.zeros(0)
        array = sitk.GetArrayViewFromImage(self.masks[label])
        other = tuple(a for a in range(array.ndim) if a != self.array_axis) if array.ndim == 3 else None
        present = array.reshape(1, -1).any(1) if other is None else array.any(axis=other)
        indices = np.flatnonzero(present & ~np.isnan(scores))
        return indices, scores[indices]

    def summary(self) -> str:
        found = []
        for name, mask in self.masks.items():
            if name in self.empty_labels:
                continue
            details = [f"{int(np.count_nonzero(sitk.GetArrayViewFromImage(mask)))} voxels"]
            if self.confidence(name) is not None:
                details.append(f"confidence {self.confidence(name):.2f}")
            check = self.slices_to_check(name)
            if check:
                details.append(f"check slice{'s' if len(check) > 1 else ''} {_ranges(check)}")
            if name in self.refined:
                details.append(f"corrected on slices {_ranges(self.refined[name])}")
            found.append(f"{name} ({', '.join(details)})")
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


@dataclasses.dataclass
class SliceLogits:
    """What the slice loop leaves: per label an int8 logit volume in the image array's order (volume_context.py),
    the predicted IoU per label and slice (slice order), and how the image was cut and mapped."""
    image: sitk.Image
    labels: List[str]
    geometry: SliceGeometry
    mapping: object
    volumes: List[np.ndarray]
    quality: np.ndarray
    skipped: int


@torch.inference_mode()
def slice_logits(model, image: sitk.Image, labels, axis: str = "auto", intensity: str = "auto", window=None,
                 batch_size: Optional[int] = None, progress: Optional[Progress] = None, cancel=None) -> SliceLogits:
    """The slice loop: every slice with signal encoded once and decoded for every label's text token."""
    image = check_image(image)
    labels = unique_labels(labels)
    geometry = SliceGeometry.for_image(image, axis)
    mapping = choose_mapping(image, intensity, window)
    was_training = model.training
    model.eval()
    if not model.merged:
        model.merge()
    device = model.device
    tokens = model.prompt_tokens(model.text_embeddings(labels))  # (N, 1, 256), once per image
    batch_size = batch_size or default_batch_size(device)

    source = geometry.canonical(sitk.GetArrayViewFromImage(image))
    outputs = [new_logit_volume(geometry.shape) for _ in labels]  # int8 logits, later the masks in place
    targets = [geometry.canonical(out) for out in outputs]
    quality = np.full((len(labels), geometry.num_slices), np.nan, dtype=np.float32)
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
                _segment_batch(model, batch, tokens, geometry, targets, quality, spacing, device)
            if progress:
                done = min(first + batch_size, total)
                progress(done / total, f"slice {done}/{total}")
    finally:
        if was_training:
            model.train()
    return SliceLogits(image, labels, geometry, mapping, outputs, quality, skipped)


def check_threshold(threshold) -> float:
    """The probability threshold as a logit, checked."""
    if not 0.0 < float(threshold) < 1.0:
        raise SSAMError(f"threshold {threshold} is outside (0, 1); use a probability such as 0.5")
    return math.log(threshold / (1.0 - threshold))


def segment_image(model, image: sitk.Image, labels, axis: str = "auto", threshold: float = 0.5,
                  intensity: str = "auto", window=None, batch_size: Optional[int] = None,
                  progress: Optional[Progress] = None, cancel=None, context="auto") -> SegmentationResult:
    """Masks for `labels` on `image` (2D/3D, scalar/RGB). See the module docstring for the data flow; context:
    "auto" (the measured 3D consistency of volume_context.py), "off" (each slice alone) or a VolumeContext."""
    start = time.perf_counter()
    logit_threshold = check_threshold(threshold)
    volume_context = VolumeContext.for_model(model, context)
    decoded = slice_logits(model, image, labels, axis, intensity, window, batch_size, progress, cancel)
    return masks_from_logits(decoded, logit_threshold, volume_context, start, cancel)


def masks_from_logits(decoded: SliceLogits, logit_threshold: float, volume_context: VolumeContext, start: float,
                      cancel=None) -> SegmentationResult:
    """The slice loop's logits -> the result's masks (in place: the logit volumes become the masks)."""
    geometry, masks, confidence = decoded.geometry, collections.OrderedDict(), collections.OrderedDict()
    for label, out, scores in zip(decoded.labels, decoded.volumes, decoded.quality):
        _check_cancel(cancel)
        mask = sitk.GetImageFromArray(logits_to_mask(out, geometry, logit_threshold, volume_context, label))
        _copy_geometry(mask, decoded.image)
        masks[label] = mask
        confidence[label] = geometry.array_order(scores)
    empty = [label for label, mask in masks.items() if not sitk.GetArrayViewFromImage(mask).any()]
    return SegmentationResult(masks, empty, geometry.axis, geometry.array_axis, decoded.mapping.describe(),
                              geometry.num_slices, decoded.skipped, time.perf_counter() - start, confidence,
                              volume_context.describe())


def _copy_geometry(mask: sitk.Image, image: sitk.Image):
    mask.SetSpacing(image.GetSpacing())
    mask.SetOrigin(image.GetOrigin())
    mask.SetDirection(image.GetDirection())


def _segment_batch(model, batch, tokens, geometry, targets, quality, spacing, device):
    height, width = batch[0][1].shape[:2]
    pixels = torch.from_numpy(np.stack([rgb for _, rgb in batch])).permute(0, 3, 1, 2).to(device)
    inputs, content = to_model_input(pixels, model.image_size, model.pixel_mean, model.pixel_std, spacing)
    count, labels = len(batch), tokens.shape[0]
    with autocast(device):
        embeddings = model.encode_images(inputs)
        # Every label of a slice shares that slice's embedding: (B*N) decoder inputs, no re-encoding.
        logits, iou = model.decode(embeddings.repeat_interleave(labels, dim=0), tokens.repeat(count, 1, 1),
                                   with_quality=True)
    logits = logits_to_slice(logits, model.image_size, content, (height, width))
    stored = quantize_logits(logits[:, 0]).reshape(count, labels, height, width)
    iou = iou.float().cpu().numpy().reshape(count, labels)
    for (index, _), per_label, scores in zip(batch, stored, iou):
        quality[:, index] = scores
        for target, logit_slice in zip(targets, per_label):
            geometry.slice_view(target, index)[...] = logit_slice
