"""Tiles for images much larger than the model's input: when the whole image resized to the model's input would make
a label's typical structure only a few pixels across (nuclei on a 1000x1000 H&E tile, vessels on a fundus photograph),
that label is segmented in overlapping native-resolution tiles whose logits are blended with a smooth window, then
thresholded once. The decision is taken per label at training time from the training masks (`choose_tiles`) and
stored in the adapter (`TileRecord`, under metadata["tiles"]); labels without a record keep whole-image context.

The blend: every tile's logits are weighted by a raised-cosine window (highest in the tile's centre, where the model
saw the most context; never 0, so the image border covered by one tile keeps its value) and divided by the summed
weights, so the weights at every pixel sum to 1. An image no larger than one tile is one tile: exactly the untiled
result.
"""

import dataclasses
import math
from typing import Callable, Dict, Optional, Sequence

import numpy as np
import torch

from .volume_context import quantize_logits

# A structure narrower than this many pixels at the model's input is lost: LiteMedSAM's decoder predicts on a 64x64
# grid for its 256 input, 4 input pixels a cell, so 8 pixels is two cells.
MIN_STRUCTURE_PIXELS = 8.0
# Tiles are sized so the typical structure is this wide at the model's input: some margin above the minimum.
TARGET_STRUCTURE_PIXELS = 16.0
OVERLAP_SHARE = 0.25  # of a tile's side, shared with its neighbour
WINDOW_FLOOR = 1e-3  # relative weight at a tile's edge


@dataclasses.dataclass(frozen=True)
class TileRecord:
    """How one label is segmented: square tiles of `tile` native pixels, neighbours overlapping by `overlap`."""

    tile: int
    overlap: int

    def to_json(self) -> dict:
        return {"tile": int(self.tile), "overlap": int(self.overlap)}

    @classmethod
    def from_json(cls, value) -> "TileRecord":
        tile, overlap = int(value["tile"]), int(value["overlap"])
        if tile < 16 or not 0 <= overlap < tile:
            raise ValueError(f"tile {tile} with overlap {overlap}")
        return cls(tile, overlap)


def records_from_metadata(metadata: Optional[dict]) -> Dict[str, TileRecord]:
    from ..errors import SSAMError

    records = {}
    for label, value in ((metadata or {}).get("tiles") or {}).items():
        try:
            records[label] = TileRecord.from_json(value)
        except (KeyError, TypeError, ValueError) as error:
            raise SSAMError(f"the adapter's tile record for '{label}' is damaged ({error}); retrain or re-export "
                            "the adapter") from None
    return records


def typical_structure_size(mask: np.ndarray) -> Optional[float]:
    """Median equivalent diameter (pixels) of the mask's connected structures; None for an empty mask."""
    from scipy import ndimage

    labelled, count = ndimage.label(np.asarray(mask) > 0)
    if count == 0:
        return None
    areas = np.bincount(labelled.ravel())[1:]
    return float(np.median(2.0 * np.sqrt(areas / math.pi)))


def choose_tiles(image_shape: Sequence[int], structure_pixels: Optional[float], image_size: int) -> Optional[TileRecord]:
    """A TileRecord when the whole image at the model's input would shrink the typical structure below
    MIN_STRUCTURE_PIXELS, else None (whole-image context; always for images no larger than the input). The tile is
    sized so the structure comes out about TARGET_STRUCTURE_PIXELS wide, but never below half the model's input
    (less context than that does not pay)."""
    longest = max(int(image_shape[0]), int(image_shape[1]))
    if longest <= image_size:  # the model already sees every pixel: tiles would only upsample
        return None
    if structure_pixels is None or structure_pixels * image_size / longest >= MIN_STRUCTURE_PIXELS:
        return None
    tile = int(structure_pixels * image_size / TARGET_STRUCTURE_PIXELS)
    tile = max(image_size // 2, min(tile, longest))
    if tile >= longest:
        return None
    return TileRecord(tile, int(tile * OVERLAP_SHARE))


def tile_starts(length: int, tile: int, overlap: int) -> list:
    """Starts of tiles of `tile` pixels covering 0..length, neighbours overlapping by at least `overlap`; the last
    tile ends at the border (so no tile hangs over it)."""
    if length <= tile:
        return [0]
    stride = tile - overlap
    count = math.ceil((length - tile) / stride) + 1
    return [round(i * (length - tile) / (count - 1)) for i in range(count)]


def window(height: int, width: int) -> torch.Tensor:
    """(height, width) raised-cosine weights, WINDOW_FLOOR at the edges, 1 in the centre."""
    def one_axis(n):
        x = (torch.arange(n, dtype=torch.float32) + 0.5) / n
        return WINDOW_FLOOR + (1 - WINDOW_FLOOR) * 0.5 * (1 - torch.cos(2 * math.pi * x))
    return one_axis(height)[:, None] * one_axis(width)[None, :]


def blend_weights(height: int, width: int, record: TileRecord):
    """[(row slice, column slice, weight)] of every tile: the weights, summed over tiles, are 1 at every pixel."""
    tiles = []
    for top in tile_starts(height, record.tile, record.overlap):
        for left in tile_starts(width, record.tile, record.overlap):
            rows = slice(top, min(top + record.tile, height))
            cols = slice(left, min(left + record.tile, width))
            tiles.append((rows, cols, window(rows.stop - rows.start, cols.stop - cols.start)))
    total = torch.zeros(height, width)
    for rows, cols, weight in tiles:
        total[rows, cols] += weight
    return [(rows, cols, weight / total[rows, cols]) for rows, cols, weight in tiles]


def tiled_logits(predict: Callable[[np.ndarray], torch.Tensor], rgb: np.ndarray, record: TileRecord) -> torch.Tensor:
    """Blended logits (L, H, W) of an (H, W, 3) slice: `predict` maps an (h, w, 3) tile to logits (L, h, w) on the
    tile's own grid."""
    height, width = rgb.shape[:2]
    blended = None
    for rows, cols, weight in blend_weights(height, width, record):
        logits = predict(np.ascontiguousarray(rgb[rows, cols])).float().cpu()
        if blended is None:
            blended = torch.zeros(logits.shape[0], height, width)
        blended[:, rows, cols] += logits * weight
    return blended


def label_records(model, labels) -> list:
    """Per label of `labels`: its TileRecord in the model's adapter, or None for whole-image context."""
    from ..model.labels import label_key

    records = {label_key(name): record for name, record in getattr(model, "tile_records", {}).items()}
    return [records.get(label_key(name)) for name in labels]


def segment_in_tiles(predict, batch, tiles, geometry, targets):
    """The tiled labels of a batch of (index, rgb) slices, written into their target int8 logit volumes. `predict(rgb, labels)`
    gives logits (len(labels), h, w) of the label indices `labels` on an (h, w, 3) tile. Labels sharing a record
    share their tiles' encoder passes."""
    groups = {}
    for label, record in enumerate(tiles):
        if record is not None:
            groups.setdefault(record, []).append(label)
    for record, chosen in groups.items():
        for index, rgb in batch:
            logits = tiled_logits(lambda tile: predict(tile, chosen), rgb, record)
            # stored like untiled labels: int8 tenths of a logit, thresholded later (volume_context.py)
            for label, logit_slice in zip(chosen, quantize_logits(logits)):
                geometry.slice_view(targets[label], index)[...] = logit_slice
