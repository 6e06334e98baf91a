"""Segmenting a 2D or 3D image from label names, slice by slice, into uint8 masks on the image's own grid.

Per image: one intensity mapping, one slicing geometry, each label's prompt token computed once. The slices are
encoded in rounds (sparse_slices.py): sparse probes, then every slice near a probe that found some label; the rest
keep the empty mask. Per slice: the image encoder runs once, the mask decoder once per label (all labels in one
batch), in the model's precision (devices.inference_precision), the logits are brought back to the slice's own size
and thresholded straight into the uint8 output masks. Only the current slices and their embeddings are in memory,
never a float copy of the volume; slices without signal (constant intensity) are skipped.
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
from ..model import labels
from .sparse_slices import DEFAULT_PROBE_MM, SliceSchedule

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
    # label (the mask's name) -> how the adapter knew it: taught, mapped from a typed variant, or untaught (labels.py)
    label_status: "collections.OrderedDict[str, labels.LabelMatch]" = dataclasses.field(
        default_factory=collections.OrderedDict)
    trained_labels: List[str] = dataclasses.field(default_factory=list)  # the adapter's trained labels
    # What the user should know besides the masks: a typed name read as a trained label, a DICOM source without UIDs
    # (segment_files.py); and what makes a mask a guess: labels the model was never taught, with the fix.
    notes: List[str] = dataclasses.field(default_factory=list)
    warnings: List[str] = dataclasses.field(default_factory=list)
    precision: str = "float32"  # what the model ran in (devices.inference_precision)
    outputs: List = dataclasses.field(default_factory=list)  # paths written from this result (segment_files.py)

    @property
    def untaught_labels(self) -> List[str]:
        return [name for name, match in self.label_status.items() if not match.taught]

    def summary(self) -> str:
        """One line: what was found (mapped and untaught labels marked), what was not, as labels.py words it."""
        found = []
        for name, mask in self.masks.items():
            if name in self.empty_labels:
                continue
            match = self.label_status.get(name)
            details = [f"{int(np.count_nonzero(sitk.GetArrayViewFromImage(mask)))} voxels"]
            if match is not None and match.status == labels.MAPPED:
                details.insert(0, match.describe())
            elif match is not None and match.status == labels.UNTAUGHT:
                details.append("untaught label: a guess")
            found.append(f"{name} ({', '.join(details)})")
        parts = [f"found {', '.join(found)}" if found else "no label found"]
        parts += labels.empty_report(self.empty_labels, self.untaught_labels)
        encoded = f" ({self.slices - self.skipped_slices} encoded)" if self.skipped_slices else ""
        details = f"{self.slices} {self.axis} slices{encoded}, {self.precision}, {self.seconds:.1f} s"
        return "; ".join(parts) + f" [{details}]"


def _check_cancel(cancel):
    if cancel is not None and cancel.is_set():
        raise Cancelled("segmentation cancelled; nothing was written")


def default_batch_size(device: torch.device) -> int:
    # Batching slices does not speed up the encoder on a CPU and costs memory; on a GPU it keeps the device busy.
    return 8 if device.type in ("cuda", "mps") else 1


@torch.inference_mode()
def segment_image(model, image: sitk.Image, requested, axis: str = "auto", threshold: float = 0.5,
                  intensity: str = "auto", window=None, batch_size: Optional[int] = None,
                  progress: Optional[Progress] = None, cancel=None,
                  probe_mm: Optional[float] = DEFAULT_PROBE_MM) -> SegmentationResult:
    """Masks for the `requested` label names on `image` (2D/3D, scalar/RGB), named and matched to the adapter's
    trained labels as labels.match_labels says. See the module docstring for the data flow. probe_mm: the spacing of
    the first, sparse round of slices (sparse_slices.py); None encodes every slice."""
    start = time.perf_counter()
    image = check_image(image)
    trained = model.labels.taught_names()
    matches = labels.match_labels(requested, trained)
    names = [match.name for match in matches]
    if not 0.0 < float(threshold) < 1.0:
        raise SSAMError(f"threshold {threshold} is outside (0, 1); use a probability such as 0.5")
    geometry = SliceGeometry.for_image(image, axis)
    mapping = choose_mapping(image, intensity, window)
    was_training = model.training
    model.eval()
    if not model.merged:
        model.merge()
    device, precision = model.device, model.precision
    tokens = model.prompt_tokens(model.text_embeddings(names))  # (N, 1, 256), once per image
    logit_threshold = math.log(threshold / (1.0 - threshold))
    batch_size = batch_size or default_batch_size(device)
    tiles = tiling.label_records(model, names)  # per label: None (whole image) or its TileRecord from the adapter

    source = geometry.canonical(sitk.GetArrayViewFromImage(image))
    outputs = [np.zeros(geometry.shape, dtype=np.uint8) for _ in names]
    targets = [geometry.canonical(out) for out in outputs]
    spacing = geometry.in_plane_spacing()
    total, without_signal = geometry.num_slices, 0
    schedule = SliceSchedule(total, geometry.slice_spacing(), probe_mm)
    try:
        for indices in schedule:  # the probes, then the slices around the probes that found something
            for first in range(0, len(indices), batch_size):
                _check_cancel(cancel)
                batch = []
                for index in indices[first:first + batch_size]:
                    view = geometry.slice_view(source, index)
                    if has_signal(view):
                        batch.append((index, mapping.apply(view)))
                    else:
                        without_signal += 1
                if batch:
                    schedule.found.update(_segment_batch(model, batch, tokens, geometry, targets, spacing,
                                                         logit_threshold, precision, tiles))
                if progress:
                    done = len(schedule.encoded) - len(indices) + min(first + batch_size, len(indices))
                    progress(done / total, f"slice {done}/{total}")
    finally:
        if was_training:
            model.train()
    if progress and schedule.skipped:  # the last round ended before the last slice
        progress(1.0, f"{total - schedule.skipped}/{total} slices encoded")

    # Each mask array is dropped as soon as its image exists (GetImageFromArray copies): one label's array at a time
    # in memory twice, not every label's (a 512 x 512 x 600 mask is 150 MB).
    del targets, source
    masks, empty = collections.OrderedDict(), []
    for index, name in enumerate(names):
        out, outputs[index] = outputs[index], None
        if not out.any():
            empty.append(name)
        mask = sitk.GetImageFromArray(out)
        del out
        _copy_geometry(mask, image)
        masks[name] = mask
    return SegmentationResult(masks, empty, geometry.axis, geometry.array_axis, mapping.describe(), total,
                              schedule.skipped + without_signal, time.perf_counter() - start,
                              label_status=collections.OrderedDict((m.name, m) for m in matches),
                              trained_labels=trained,
                              notes=[line for line in [labels.mapping_note(matches)] if line],
                              warnings=[line for line in [labels.untaught_warning(matches, trained)] if line],
                              precision=precision)


def _copy_geometry(mask: sitk.Image, image: sitk.Image):
    mask.SetSpacing(image.GetSpacing())
    mask.SetOrigin(image.GetOrigin())
    mask.SetDirection(image.GetDirection())


def _slice_logits(model, rgbs, tokens, spacing, precision):
    """Logits (B, N, H, W) of N labels on B slices (H, W, 3) of one size, on the slices' own grid."""
    height, width = rgbs[0].shape[:2]
    device = model.device
    pixels = torch.from_numpy(np.stack(rgbs)).permute(0, 3, 1, 2).to(device)
    inputs, content = to_model_input(pixels, model.image_size, model.pixel_mean, model.pixel_std, spacing)
    count, labels = len(rgbs), tokens.shape[0]
    # On a CPU only the encoder runs in bf16 (its fast copy wraps itself, fast_encoder.py), as measured in
    # docs/benchmarks.md; the decoder, a small share of the time, stays float32.
    with autocast(device, precision if device.type != "cpu" else "float32"):
        embeddings = model.encode_images(inputs)
        # Every label of a slice shares that slice's embedding: (B*N) decoder inputs, no re-encoding.
        logits = model.decode(embeddings.repeat_interleave(labels, dim=0), tokens.repeat(count, 1, 1))
    logits = logits_to_slice(logits, model.image_size, content, (height, width))
    return logits[:, 0].reshape(count, labels, height, width)


def _segment_batch(model, batch, tokens, geometry, targets, spacing, logit_threshold, precision, tiles=None):
    found = set()
    whole = [i for i, record in enumerate(tiles or [None] * tokens.shape[0]) if record is None]
    if whole:
        logits = _slice_logits(model, [rgb for _, rgb in batch], tokens[whole], spacing, precision)
        masks = (logits > logit_threshold).to(torch.uint8).cpu().numpy()
        for (index, _), per_label in zip(batch, masks):
            for label, mask in zip(whole, per_label):
                geometry.slice_view(targets[label], index)[...] = mask
            if per_label.any():
                found.add(index)
    if len(whole) < tokens.shape[0]:  # labels the adapter segments in tiles (tiling.py)
        found.update(tiling.segment_in_tiles(
            lambda rgb, chosen: _slice_logits(model, [rgb], tokens[chosen], spacing, precision)[0],
            batch, tiles, geometry, targets, logit_threshold))
    return sorted(found)  # the slices on which some label was found
