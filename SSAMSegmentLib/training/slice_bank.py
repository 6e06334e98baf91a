"""Training and validation slices, prepared once: each case is cut into slices exactly as inference cuts it
(slice_geometry + intensity + neighbour_slices), resized to the model's input size and kept as uint8 with one 0/1
mask per label. With `neighbours` (ssam train --neighbour-slices) a 3D case's three channels are slices k-1, k, k+1,
as the adapter will see them when segmenting; 2D and RGB cases keep their own channels.

A sample of S-SAM is a (slice, label name, mask) triple for every label, absent labels giving empty masks. The bank
holds slices with all their labels' masks, so a training step encodes a slice once and decodes all its labels.
Large datasets spill to memory-mapped files instead of RAM.
"""

import dataclasses
import tempfile
from typing import List, Optional, Sequence

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from ..errors import Cancelled
from ..inference.intensity import choose_mapping, has_signal
from ..inference.neighbour_slices import slice_pixels
from ..inference.preprocessing import resize_to_model
from ..inference.slice_geometry import SliceGeometry
from ..inference.tiling import blend_weights

IN_MEMORY_LIMIT = 2 << 30  # bytes of slices kept in RAM before the bank moves to memory-mapped files


@dataclasses.dataclass
class SliceBank:
    images: np.ndarray  # uint8 (N, 3, S, S), resized content at the top-left, zeros elsewhere; channels as above
    masks: np.ndarray  # uint8 (N, L, S, S)
    content: np.ndarray  # int (N, 2): (h, w) of the content
    case_index: np.ndarray  # int (N,)
    case_ids: List[str]
    label_names: List[str]
    scored: np.ndarray  # bool (N, L): the label is annotated in the slice's dataset (validation scores only those)
    # bool (N, L): the pairs training decodes and teaches: the annotated ones and those certainly absent (Case.absent)
    trained: Optional[np.ndarray] = None
    case_sources: Optional[List[str]] = None  # per case: the dataset of a combined set it came from (Case.source)

    def __post_init__(self):
        if self.trained is None:
            self.trained = self.scored
        if self.case_sources is None:
            self.case_sources = [""] * len(self.case_ids)

    @property
    def source_index(self) -> np.ndarray:
        """int (N,): which dataset each slice came from, numbered in order of first appearance."""
        numbers = {name: number for number, name in enumerate(dict.fromkeys(self.case_sources))}
        per_case = np.array([numbers[name] for name in self.case_sources], dtype=np.int64)
        return per_case[self.case_index] if len(self.case_index) else np.zeros(0, np.int64)

    def __len__(self):
        return len(self.images)

    @property
    def present(self) -> np.ndarray:
        """bool (N, L): the label has at least one voxel on the slice."""
        return self.masks.reshape(len(self.masks), len(self.label_names), -1).any(axis=2)


def _case_slices(image: sitk.Image, masks, axis: str, neighbours: bool = False):
    geometry = SliceGeometry.for_image(image, axis)
    mapping = choose_mapping(image)
    source = geometry.canonical(sitk.GetArrayViewFromImage(image))
    mask_views = [geometry.canonical(mask) for mask in masks.values()]
    spacing = geometry.in_plane_spacing()
    for index in range(geometry.num_slices):
        if has_signal(geometry.slice_view(source, index)):
            yield (slice_pixels(geometry, source, mapping, index, neighbours),
                   [geometry.slice_view(m, index) for m in mask_views], spacing)


def _resize(rgb: np.ndarray, label_masks: Sequence[np.ndarray], image_size: int, spacing):
    pixels = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None]
    resized, (h, w) = resize_to_model(pixels, image_size, spacing)
    image = torch.zeros(3, image_size, image_size, dtype=torch.uint8)
    image[:, :h, :w] = resized[0].round().clamp(0, 255).to(torch.uint8)
    stacked = torch.from_numpy(np.stack([np.ascontiguousarray(m) for m in label_masks]).astype(np.float32))[None]
    masks = torch.zeros(len(label_masks), image_size, image_size, dtype=torch.uint8)
    # Masks are resized like the image, then thresholded at 0.5 (docs/design.md, section 1).
    masks[:, :h, :w] = (F.interpolate(stacked, size=(h, w), mode="bilinear", align_corners=False)[0] > 0.5)
    return image.numpy(), masks.numpy(), (h, w)


def _crops(rgb, label_masks, record):
    """The slice itself, or with a TileRecord its native-resolution tiles as inference cuts them (tiling.py); the
    geometric augmentation then moves and zooms within each."""
    if record is None:
        yield rgb, label_masks
        return
    for rows, cols, _ in blend_weights(rgb.shape[0], rgb.shape[1], record):
        yield rgb[rows, cols], [mask[rows, cols] for mask in label_masks]


def build_slice_bank(cases, label_names, image_size: int, axis: str = "auto", progress=None, cancel=None,
                     spill_dir: Optional[str] = None, tile_record_of=None, neighbours: bool = False) -> SliceBank:
    """Cut every case into slices (one case in memory at a time); `progress(fraction, message)` per case.
    `tile_record_of(case)`: a TileRecord to cut that case's slices into native-resolution tiles, or None.
    `neighbours`: the channels of a 3D grey case are slices k-1, k, k+1 (inference/neighbour_slices.py)."""
    images, masks, contents, owners, scored, trained = [], [], [], [], [], []
    per_slice = (3 + len(label_names)) * image_size * image_size
    store = None
    for number, case in enumerate(cases):
        if cancel is not None and cancel.is_set():
            raise Cancelled("training cancelled while preparing slices; nothing was written")
        image, case_masks = case.load()
        case_masks = {name: case_masks[name] for name in label_names}
        annotated = case.annotated
        case_scored = [annotated is None or name in annotated for name in label_names]
        absent = case.absent
        case_trained = [known or name in absent for known, name in zip(case_scored, label_names)]
        record = tile_record_of(case) if tile_record_of else None
        for whole_rgb, whole_masks, spacing in _case_slices(image, case_masks, axis, neighbours):
            for rgb, label_masks in _crops(whole_rgb, whole_masks, record):
                resized_image, resized_masks, content = _resize(rgb, label_masks, image_size, spacing)
                images.append(resized_image)
                masks.append(resized_masks)
                contents.append(content)
                owners.append(number)
                scored.append(case_scored)
                trained.append(case_trained)
                if store is None and len(images) * per_slice > IN_MEMORY_LIMIT:
                    store = _SpillStore(spill_dir, len(label_names), image_size)
                if store is not None:
                    store.extend(images, masks)
                    images, masks = [], []
        if progress:
            progress((number + 1) / max(len(cases), 1), f"prepared case {case.case_id}")
    if store is not None:
        store.extend(images, masks)
        all_images, all_masks = store.finish()
    else:
        all_images = np.stack(images) if images else np.zeros((0, 3, image_size, image_size), np.uint8)
        all_masks = np.stack(masks) if masks else np.zeros((0, len(label_names), image_size, image_size), np.uint8)
    return SliceBank(all_images, all_masks, np.array(contents, dtype=np.int64).reshape(-1, 2),
                     np.array(owners, dtype=np.int64), [c.case_id for c in cases], list(label_names),
                     np.array(scored, dtype=bool).reshape(-1, len(label_names)),
                     np.array(trained, dtype=bool).reshape(-1, len(label_names)), [c.source for c in cases])


class _SpillStore:
    """Append-only uint8 arrays on disk, for datasets whose slices do not fit comfortably in RAM."""

    def __init__(self, folder, labels, size):
        self.folder = tempfile.TemporaryDirectory(prefix="ssam-slices-", dir=folder)
        self.files = [open(f"{self.folder.name}/{name}.bin", "wb") for name in ("images", "masks")]
        self.shapes = [(3, size, size), (labels, size, size)]
        self.count = 0

    def extend(self, images, masks):
        for handle, rows in zip(self.files, (images, masks)):
            for row in rows:
                handle.write(np.ascontiguousarray(row, dtype=np.uint8).tobytes())
        self.count += len(images)

    def finish(self):
        arrays = []
        for handle, shape in zip(self.files, self.shapes):
            handle.close()
            arrays.append(np.memmap(handle.name, dtype=np.uint8, mode="r", shape=(self.count, *shape)))
        arrays[0]._spill_store = self  # keep the temporary folder alive as long as the arrays
        return arrays
