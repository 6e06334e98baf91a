"""Segmenting a 2D or 3D image from label names, slice by slice, into uint8 masks on the image's own grid.

Per image: one intensity mapping, one slicing geometry, each label's prompt token computed once. The slices are
encoded in rounds (sparse_slices.py): sparse probes, then every slice near a probe that found some label; the rest
keep an empty mask. Per slice: its three input channels (the slice itself, or slices k-1, k, k+1 for an adapter
trained with --neighbour-slices: neighbour_slices.py), the image encoder once, the mask decoder once per label (all
labels in one batch), in the model's precision (devices.inference_precision); the logits are brought back to the slice's own size
and stored as int8 tenths of a logit in the array that becomes the label's uint8 mask; the decoder's predicted IoU is
kept per slice and label as a confidence. After the loop volume_context.py turns the logits into masks using the
neighbouring slices. Only the current slices and their embeddings are in memory, never a float copy of the volume;
slices without signal (constant intensity) are skipped.
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
from ..files.image_io import check_image, image_kind
from .intensity import choose_mapping, has_signal
from .neighbour_slices import slice_pixels, uses_neighbours
from . import tiling
from .preprocessing import logits_to_slice, to_model_input
from .self_box import CHOICES, apply_self_box
from .slice_geometry import SliceGeometry
from ..model import label_routes, labels
from .sparse_slices import DEFAULT_PROBE_MM, SliceSchedule
from .volume_context import VolumeContext, kept_slices, logits_to_mask, new_logit_volume, quantize_logits

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

    # taught labels asked on another kind of image than they were taught on (labels.other_kind): a guess here
    other_kind_labels: List[str] = dataclasses.field(default_factory=list)
    # taught labels the adapter learnt poorly (labels.weak): an empty mask of theirs is no evidence of absence
    weak_labels: List[str] = dataclasses.field(default_factory=list)

    # label -> the decoder's predicted IoU on each slice, in the order of the image array along array_axis (NaN
    # where the slice was not decoded): SAM's own quality estimate, shown as a confidence.
    slice_confidence: "collections.OrderedDict[str, np.ndarray]" = dataclasses.field(default_factory=dict)
    volume_context: str = "slices alone"
    refined: dict = dataclasses.field(default_factory=dict)  # label -> array slice indices a correction rewrote
    # labels whose correction fell back to the prompt alone: with the text token it found nothing (refinement.py)
    refined_prompt_alone: list = dataclasses.field(default_factory=list)
    # label -> array slice indices whose text mask the base redrew from its own box (self_box.py)
    self_boxed: dict = dataclasses.field(default_factory=dict)

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
            if name in self.other_kind_labels:
                details.append("taught on other kinds of image: a guess")
            if self.confidence(name) is not None:
                details.append(f"confidence {self.confidence(name):.2f}")
            check = self.slices_to_check(name)
            if check:
                details.append(f"check slice{'s' if len(check) > 1 else ''} {_ranges(check)}")
            if name in self.self_boxed:
                details.append("outline from its own box" + (f" on slices {_ranges(self.self_boxed[name])}"
                                                             if self.masks[name].GetDimension() == 3 else ""))
            if name in self.refined:
                from .refinement import PROMPT_ALONE  # refinement imports this module
                details.append(f"corrected on slices {_ranges(self.refined[name])}"
                               + (f" {PROMPT_ALONE}" if name in self.refined_prompt_alone else ""))
            found.append(f"{name} ({', '.join(details)})")
        parts = [f"found {', '.join(found)}" if found else "no label found"]
        parts += labels.empty_report(self.empty_labels, self.untaught_labels, self.other_kind_labels, self.weak_labels)
        encoded = f" ({self.slices - self.skipped_slices} encoded)" if self.skipped_slices else ""
        details = f"{self.slices} {self.axis} slices{encoded}, {self.precision}, {self.seconds:.1f} s"
        return "; ".join(parts) + f" [{details}]"


def check_threshold(threshold) -> float:
    """The mask probability threshold, strictly between 0 and 1 (NaN and non-numbers refused), as a logit."""
    try:
        value = float(threshold)
    except (TypeError, ValueError):
        value = float("nan")
    if not 0.0 < value < 1.0:
        raise SSAMError(f"threshold {threshold} is not a probability in (0, 1); use e.g. --threshold 0.5")
    return math.log(value / (1.0 - value))


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
    matches: list  # labels.LabelMatch per label: how the adapter knew each requested name
    trained: List[str]  # the adapter's trained labels
    precision: str  # what the encoder ran in
    other_kind: List[str] = dataclasses.field(default_factory=list)  # labels taught only on other kinds of image
    other_kind_warning: Optional[str] = None  # labels.other_kind_warning for them
    weak: List[str] = dataclasses.field(default_factory=list)  # labels the adapter learnt poorly (labels.weak)


@torch.inference_mode()
def slice_logits(model, image: sitk.Image, requested, axis: str = "auto", intensity: str = "auto", window=None,
                 batch_size: Optional[int] = None, progress: Optional[Progress] = None, cancel=None,
                 probe_mm: Optional[float] = DEFAULT_PROBE_MM, logit_threshold: float = 0.0,
                 context: Optional[VolumeContext] = None) -> SliceLogits:
    """The slice loop: the slices with signal that the sparse schedule picks encoded once and decoded for every
    label's text token; the `requested` names are matched to the adapter's trained labels (labels.match_labels).
    probe_mm: the spacing of the first, sparse round (sparse_slices.py; None: every slice); logit_threshold and the
    component rules of `context` (the VolumeContext the masks will get; None: none) decide what a round found."""
    image = check_image(image)
    trained = model.labels.taught_names()
    matches = labels.match_labels(requested, trained)
    names = [match.name for match in matches]
    kind = image_kind(image)
    other = labels.other_kind(matches, model.label_kinds, kind)
    geometry = SliceGeometry.for_image(image, axis)
    mapping = choose_mapping(image, intensity, window)
    was_training = model.training
    model.eval()
    if not model.merged:
        model.merge()
    device, precision = model.device, model.precision
    tokens = label_routes.prompt_tokens(model, names)  # (N, 1, 256), once per image, each from its label's network
    batch_size = batch_size or default_batch_size(device)
    tiles = tiling.label_records(model, names)  # per label: None (whole image) or its TileRecord from the adapter
    neighbours = uses_neighbours(model)  # the adapter's input: slices k-1, k, k+1 (neighbour_slices.py)

    source = geometry.canonical(sitk.GetArrayViewFromImage(image))
    outputs = [new_logit_volume(geometry.shape) for _ in names]  # int8 logits, later the masks in place
    targets = [geometry.canonical(out) for out in outputs]
    quality = np.full((len(names), geometry.num_slices), np.nan, dtype=np.float32)
    spacing = geometry.in_plane_spacing()
    total, without_signal = geometry.num_slices, set()
    schedule = SliceSchedule(total, geometry.slice_spacing(), probe_mm, len(names))
    work = 0  # slices encoded so far, for the progress line (a slice re-encoded for a late label counts again)
    try:
        for groups in schedule:  # the probes, then the gaps next to what was found, with the labels found there
            for chosen, indices in groups:
                for first in range(0, len(indices), batch_size):
                    _check_cancel(cancel)
                    batch = []
                    for index in indices[first:first + batch_size]:
                        if has_signal(geometry.slice_view(source, index)):
                            batch.append((index, slice_pixels(geometry, source, mapping, index, neighbours)))
                        else:
                            without_signal.add(index)
                    if batch:
                        _segment_batch(model, batch, tokens, geometry, targets, quality, spacing, precision, tiles,
                                       list(chosen), names)
                    work += len(indices[first:first + batch_size])
                    if progress:
                        done = min(work, total)
                        progress(done / total, f"slice {done}/{total}")
            if not schedule.dense:
                schedule.found = [kept_slices(out, geometry, decoded, logit_threshold, context or VolumeContext(), name)
                                  for out, name, decoded in zip(outputs, names, schedule.decoded)]
    finally:
        if was_training:
            model.train()
    if progress and schedule.skipped:  # the last round ended before the last slice
        progress(1.0, f"{total - schedule.skipped}/{total} slices encoded")
    del targets, source
    return SliceLogits(image, names, geometry, mapping, outputs, quality,
                       schedule.skipped + len(without_signal),
                       matches, trained, precision, other, labels.other_kind_warning(other, model.label_kinds, kind),
                       labels.weak(matches, model.label_validation))


def segment_image(model, image: sitk.Image, requested, axis: str = "auto", threshold: float = 0.5,
                  intensity: str = "auto", window=None, batch_size: Optional[int] = None,
                  progress: Optional[Progress] = None, cancel=None, context="auto",
                  probe_mm: Optional[float] = DEFAULT_PROBE_MM, self_box: str = "auto") -> SegmentationResult:
    """Masks for the `requested` label names on `image` (2D/3D, scalar/RGB), named and matched to the adapter's
    trained labels as labels.match_labels says. See the module docstring for the data flow; context: "auto" (the
    measured 3D consistency of volume_context.py), "off" (each slice alone) or a VolumeContext; probe_mm: see
    slice_logits; self_box: "auto" (the labels the adapter chose redrawn from their own box, self_box.py) or "off"."""
    if self_box not in CHOICES:
        raise SSAMError(f"unknown self-box setting '{self_box}'; use one of: {', '.join(CHOICES)}")
    start = time.perf_counter()
    logit_threshold = check_threshold(threshold)
    volume_context = VolumeContext.for_model(model, context)
    decoded = slice_logits(model, image, requested, axis, intensity, window, batch_size, progress, cancel, probe_mm,
                           logit_threshold, volume_context)
    result = masks_from_logits(decoded, logit_threshold, volume_context, start, cancel)
    apply_self_box(model, decoded.image, decoded.geometry, decoded.mapping, result, logit_threshold, self_box, cancel)
    result.seconds = time.perf_counter() - start
    return result


def masks_from_logits(decoded: SliceLogits, logit_threshold: float, volume_context: VolumeContext, start: float,
                      cancel=None) -> SegmentationResult:
    """The slice loop's logits -> the result's masks (in place: the logit volumes become the masks; each is dropped
    once its image exists, so one label's array at a time is in memory twice)."""
    geometry, masks, confidence = decoded.geometry, collections.OrderedDict(), collections.OrderedDict()
    for index, (label, scores) in enumerate(zip(decoded.labels, decoded.quality)):
        _check_cancel(cancel)
        out, decoded.volumes[index] = decoded.volumes[index], None
        mask = sitk.GetImageFromArray(logits_to_mask(out, geometry, logit_threshold, volume_context, label))
        del out
        _copy_geometry(mask, decoded.image)
        masks[label] = mask
        confidence[label] = geometry.array_order(scores)
    empty = [label for label, mask in masks.items() if not sitk.GetArrayViewFromImage(mask).any()]
    matches, trained = decoded.matches, decoded.trained
    return SegmentationResult(masks, empty, geometry.axis, geometry.array_axis, decoded.mapping.describe(),
                              geometry.num_slices, decoded.skipped, time.perf_counter() - start,
                              label_status=collections.OrderedDict((m.name, m) for m in matches),
                              trained_labels=list(trained),
                              notes=[line for line in [labels.mapping_note(matches)] if line],
                              warnings=[line for line in [labels.untaught_warning(matches, trained),
                                                          decoded.other_kind_warning] if line],
                              other_kind_labels=list(decoded.other_kind),
                              weak_labels=list(decoded.weak),
                              precision=decoded.precision, slice_confidence=confidence,
                              volume_context=volume_context.describe())


def _copy_geometry(mask: sitk.Image, image: sitk.Image):
    mask.SetSpacing(image.GetSpacing())
    mask.SetOrigin(image.GetOrigin())
    mask.SetDirection(image.GetDirection())


def _slice_logits(model, rgbs, tokens, spacing, precision):
    """Logits (B, N, H, W) of N labels on B slices (H, W, 3) of one size, on the slices' own grid, and the decoder's
    predicted IoU (B, N)."""
    height, width = rgbs[0].shape[:2]
    device = model.device
    pixels = torch.from_numpy(np.stack(rgbs)).permute(0, 3, 1, 2).to(device)
    inputs, content = to_model_input(pixels, model.image_size, model.pixel_mean, model.pixel_std, spacing)
    count, label_count = len(rgbs), tokens.shape[0]
    # On a CPU only the encoder runs in bf16 (its fast copy wraps itself, fast_encoder.py), as measured in
    # docs/benchmarks.md; the decoder, a small share of the time, stays float32.
    with autocast(device, precision if device.type != "cpu" else "float32"):
        embeddings = model.encode_images(inputs)
        # Every label of a slice shares that slice's embedding: (B*N) decoder inputs, no re-encoding.
        logits, iou = model.decode(embeddings.repeat_interleave(label_count, dim=0), tokens.repeat(count, 1, 1),
                                   with_quality=True)
    logits = logits_to_slice(logits, model.image_size, content, (height, width))
    iou = iou.float().cpu().numpy().reshape(count, label_count)
    return logits[:, 0].reshape(count, label_count, height, width), iou


def _segment_batch(model, batch, tokens, geometry, targets, quality, spacing, precision, tiles=None, chosen=None,
                   label_names=None):
    """Decode a batch of slices into the `chosen` labels' int8 logit volumes (and their predicted IoU); chosen: label
    indices (None: all); label_names: the labels' names, which say their network (None: all the model's own)."""
    chosen = list(range(tokens.shape[0])) if chosen is None else chosen
    tiles = tiles or [None] * tokens.shape[0]
    whole = [label for label in chosen if tiles[label] is None]
    for network, group in _networks(model, whole, label_names):  # labels of another network: its own encoder pass
        logits, iou = _slice_logits(network, [rgb for _, rgb in batch], tokens[group], spacing, precision)
        stored = quantize_logits(logits)
        for (index, _), per_label, scores in zip(batch, stored, iou):
            for label, logit_slice, score in zip(group, per_label, scores):
                geometry.slice_view(targets[label], index)[...] = logit_slice
                quality[label, index] = score
    tiled = [record if label in chosen else None for label, record in enumerate(tiles)]
    if any(record is not None for record in tiled):  # labels the adapter segments in tiles (tiling.py); no IoU
        def tile_logits(rgb, indices):
            parts = {}
            for network, group in _networks(model, indices, label_names):
                for label, logits in zip(group, _slice_logits(network, [rgb], tokens[group], spacing, precision)[0][0]):
                    parts[label] = logits
            return torch.stack([parts[label] for label in indices])

        tiling.segment_in_tiles(tile_logits, batch, tiled, geometry, targets)


def _networks(model, indices, label_names):
    """[(network, label indices)] for the label indices given: which network (label_routes.py) decodes each."""
    if not indices:
        return []
    if label_names is None:
        return [(model, list(indices))]
    groups = label_routes.by_network(model, [label_names[i] for i in indices])
    return [(network, [indices[i] for i in positions]) for network, positions in groups]
