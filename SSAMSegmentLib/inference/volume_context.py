"""3D consistency after the slice loop: each slice's answer checked against its neighbours before it becomes a mask.

The slice loop (slice_inference.py) leaves, per label, the decoder's logits of every slice in a compact int8 volume
(tenths of a logit, the same memory as the uint8 mask it turns into, in place). This module then
1. averages each slice's logits with the slices above and below, weighted by a Gaussian of the slice distance in mm
   (thin slices lean on their neighbours, 5 mm slices barely), which removes one-slice flickers at organ ends;
2. thresholds into the 0/1 mask, in the same array;
3. removes 3D connected components smaller than `min_component_ml`, and keeps only the largest component of labels
   the adapter marks as one connected organ (its metadata "keep_largest"), e.g. a liver, never the kidneys.
All of it streams slice by slice (components with a union-find over 2D components of adjacent slices), so no float
or int32 copy of the volume is ever made. What is on by default was measured: benchmarks/measure_volume_context.py,
results in docs/benchmarks.md.
"""

import dataclasses
import math
from typing import FrozenSet

import numpy as np
import SimpleITK as sitk
import torch

from ..errors import SSAMError
from ..model.text_encoders import label_key

LOGIT_SCALE = 10.0  # int8 steps per logit: logits in -12.7..12.7 (probabilities 3e-6..0.999997) at 0.1 resolution
BACKGROUND = -128  # what slices never decoded (no signal) hold: certainly outside
CONTEXT_MODES = ("auto", "off")


def new_logit_volume(shape) -> np.ndarray:
    return np.full(shape, BACKGROUND, dtype=np.int8)


def quantize_logits(logits: torch.Tensor) -> np.ndarray:
    """Float logits -> int8 tenths of a logit (BACKGROUND is kept for 'never decoded')."""
    return (logits.float() * LOGIT_SCALE).round_().clamp_(-127, 127).to(torch.int8).cpu().numpy()


@dataclasses.dataclass(frozen=True)
class VolumeContext:
    smoothing_mm: float = 0.0  # Gaussian sigma across slices; 0: each slice alone
    min_component_ml: float = 0.0  # 3D components below this volume are removed; 0: none
    keep_largest: FrozenSet[str] = frozenset()  # label keys whose mask is one connected component

    @classmethod
    def for_model(cls, model, mode: str = "auto") -> "VolumeContext":
        """'auto': the measured defaults plus the adapter's keep_largest labels; 'off': slices alone; a
        VolumeContext is used as it is."""
        if isinstance(mode, cls):
            return mode
        if mode not in CONTEXT_MODES:
            raise SSAMError(f"unknown volume context '{mode}'; use one of: {', '.join(CONTEXT_MODES)}")
        if mode == "off":
            return cls()
        keep = frozenset(label_key(name) for name in getattr(model, "keep_largest", []))
        return cls(DEFAULT_SMOOTHING_MM, DEFAULT_MIN_COMPONENT_ML, keep)

    @property
    def active(self) -> bool:
        return bool(self.smoothing_mm > 0 or self.min_component_ml > 0 or self.keep_largest)

    def describe(self) -> str:
        if not self.active:
            return "slices alone"
        parts = []
        if self.smoothing_mm > 0:
            parts.append(f"logits averaged across slices (sigma {self.smoothing_mm:g} mm)")
        if self.min_component_ml > 0:
            parts.append(f"3D components under {self.min_component_ml:g} mL removed")
        if self.keep_largest:
            parts.append(f"largest component kept for {', '.join(sorted(self.keep_largest))}")
        return ", ".join(parts)


# Measured on the shared CT volumes (docs/benchmarks.md, "3D context"): what `ssam segment` does by default.
DEFAULT_SMOOTHING_MM = 2.0
DEFAULT_MIN_COMPONENT_ML = 5.0


def neighbour_weight(slice_spacing_mm: float, sigma_mm: float) -> float:
    return 0.0 if sigma_mm <= 0 else math.exp(-0.5 * (slice_spacing_mm / sigma_mm) ** 2)


def logits_to_mask(logits: np.ndarray, geometry, logit_threshold: float, context: VolumeContext, label: str):
    """Turn one label's int8 logit volume (the image array's order) into its 0/1 uint8 mask, in place; returns the
    mask (a uint8 view of the same memory)."""
    canonical = geometry.canonical(logits)
    slices = geometry.num_slices
    threshold = logit_threshold * LOGIT_SCALE
    weight = neighbour_weight(geometry.spacing[geometry.slice_axis], context.smoothing_mm) if slices > 1 else 0.0
    if weight < 1e-3:
        for index in range(slices):
            view = geometry.slice_view(canonical, index)
            view[...] = view > threshold
    else:
        _smooth_and_threshold(canonical, geometry, threshold, weight)
    mask = logits.view(np.uint8)
    if slices > 1 and (context.min_component_ml > 0 or label_key(label) in context.keep_largest):
        voxel_ml = float(np.prod(geometry.spacing)) / 1000.0
        _remove_components(geometry.canonical(mask), geometry, context.min_component_ml / voxel_ml,
                           label_key(label) in context.keep_largest)
    return mask


def _smooth_and_threshold(canonical, geometry, threshold, weight):
    """Each slice's logits averaged with its neighbours' (the originals: the slice before is kept as a float copy,
    the one after is not written yet), then thresholded into that slice."""
    slices = geometry.num_slices
    previous, current = None, geometry.slice_view(canonical, 0).astype(np.float32)
    for index in range(slices):
        following = geometry.slice_view(canonical, index + 1).astype(np.float32) if index + 1 < slices else None
        total, norm = current.copy(), 1.0
        for neighbour in (previous, following):
            if neighbour is not None:
                total += weight * neighbour
                norm += weight
        geometry.slice_view(canonical, index)[...] = total > threshold * norm
        previous, current = current, following


def _components_2d(mask_slice: np.ndarray) -> np.ndarray:
    image = sitk.GetImageFromArray(np.ascontiguousarray(mask_slice, dtype=np.uint8))
    return sitk.GetArrayFromImage(sitk.ConnectedComponent(image, True)).astype(np.int64)


def _components(masks, sizes_per_voxel):
    """3D components of a stack of 2D masks, joined where consecutive masks overlap, as a union-find over each
    slice's 2D components. Returns each node's root (node 0: background), each root's total size (voxels times the
    slice's `sizes_per_voxel`) and each slice's node range [first, end)."""
    parent, sizes, ranges, offset, previous = [0], [0.0], [], 0, None

    def root(node):
        while parent[node] != node:
            parent[node] = parent[parent[node]]
            node = parent[node]
        return node

    for mask_slice, per_voxel in zip(masks, sizes_per_voxel):
        labels = _components_2d(mask_slice) if mask_slice.any() else None
        count = int(labels.max()) if labels is not None else 0
        if count:
            labels[labels > 0] += offset
            parent.extend(range(offset + 1, offset + count + 1))
            counts = np.bincount(labels.ravel(), minlength=offset + count + 1)[offset + 1:]
            sizes.extend((counts * float(per_voxel)).tolist())
            if previous is not None:
                both = (labels > 0) & (previous > 0)
                for a, b in np.unique(np.stack([previous[both], labels[both]], 1), axis=0):
                    ra, rb = root(int(a)), root(int(b))
                    if ra != rb:
                        parent[rb] = ra
        ranges.append((offset + 1, offset + count + 1))
        offset += count
        previous = labels if count else None
    roots = np.array([root(node) for node in range(offset + 1)])
    totals = np.bincount(roots, weights=np.array(sizes, dtype=np.float64), minlength=offset + 1)
    return roots, totals, ranges


def _kept_nodes(roots, totals, min_size: float, keep_largest: bool) -> np.ndarray:
    """Per node: whether its component survives the small-piece rule (or is the largest, for keep_largest)."""
    keep = totals >= max(min_size, 1e-12)
    if keep_largest:
        keep = np.zeros_like(keep)
        keep[int(np.argmax(totals[1:])) + 1] = True
    keep[0] = False
    return keep[roots]


def _remove_components(canonical_mask, geometry, min_voxels: float, keep_largest: bool):
    """Streams the mask twice (components, then what is kept), so only two slices' labels are ever in memory."""
    slices = range(geometry.num_slices)
    roots, totals, _ = _components((geometry.slice_view(canonical_mask, index) for index in slices),
                                   [1.0] * geometry.num_slices)
    if len(roots) == 1:
        return
    keep_node = _kept_nodes(roots, totals, max(min_voxels, 1), keep_largest)
    if keep_node[1:].all():
        return
    offset = 0
    for index in slices:
        view = geometry.slice_view(canonical_mask, index)
        labels = _components_2d(view)
        count = int(labels.max())
        if count:
            labels[labels > 0] += offset
            view[...] = keep_node[labels]
        offset += count


# The probes' verdict is an estimate of the dense pass's (their pieces' volumes are sampled every few slices), so
# they keep a piece down to this share of min_component_ml: an error costs encoding time, never a missed structure.
PROBE_VOLUME_MARGIN = 0.5


def kept_slices(logits: np.ndarray, geometry, encoded, logit_threshold: float, context: VolumeContext,
                label: str) -> set:
    """The slices among `encoded` (the only ones decoded so far) on which the label would survive this context's
    component rules, judged on those slices stacked in order, each standing for the thickness up to half-way to its
    encoded neighbours: sparse_slices.py's test of whether a probe found something. Without component rules: the
    slices with any voxel over the threshold."""
    canonical = geometry.canonical(logits)
    order = sorted(encoded)
    threshold = logit_threshold * LOGIT_SCALE
    masks = (geometry.slice_view(canonical, index) > threshold for index in order)  # one slice at a time
    keep_largest = label_key(label) in context.keep_largest
    if not order or not (context.min_component_ml > 0 or keep_largest):
        return {index for index, mask in zip(order, masks) if mask.any()}
    spacing = geometry.slice_spacing()
    positions = np.asarray(order, dtype=np.float64) * spacing
    edges = np.r_[positions[0] - spacing / 2, (positions[1:] + positions[:-1]) / 2, positions[-1] + spacing / 2]
    pixel_ml = float(np.prod(geometry.in_plane_spacing())) / 1000.0
    roots, totals, ranges = _components(masks, np.diff(edges) * pixel_ml)
    if len(roots) == 1:
        return set()
    keep_node = _kept_nodes(roots, totals, context.min_component_ml * PROBE_VOLUME_MARGIN, keep_largest)
    return {index for index, (first, end) in zip(order, ranges) if keep_node[first:end].any()}
