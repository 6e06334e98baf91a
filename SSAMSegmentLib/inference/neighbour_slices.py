"""What the model's three input channels hold for one slice: the slice itself in each (as SAM and LiteMedSAM were
trained), or, for an adapter trained with `ssam train --neighbour-slices` ("2.5D"), the slice and its two neighbours
along the slice axis: channels k-1, k, k+1.

One function for training (training/slice_bank.py), segmenting (slice_inference.py) and corrections
(refinement.py), so the three always see the same pixels:
- every neighbour goes through the image's one intensity mapping (intensity.py), exactly as the slice itself: the
  middle channel is the single-slice input bit for bit, and the CT window is the one used without context;
- at the volume's ends the missing neighbour repeats slice k;
- the neighbours lie along the axis the volume is cut by (SliceGeometry: axial, coronal or sagittal), in the
  canonical anatomical order: channel 0 is the inferior, anterior or right neighbour whatever the array's storage
  order;
- 2D images and RGB volumes have no grey neighbours to give: their channels are what they are without context.
Which slices are encoded, and the masks' geometry (one mask per slice k), do not change.
"""

import numpy as np


def uses_neighbours(model) -> bool:
    """True for a model whose adapter was trained with neighbouring slices (metadata "neighbour_slices")."""
    return bool(getattr(model, "neighbour_slices", False))


def slice_pixels(geometry, source: np.ndarray, mapping, index: int, neighbours: bool = False) -> np.ndarray:
    """Slice `index` of `source` (the image's array in geometry.canonical order) as float32 (H, W, 3) in 0..255:
    mapped as a single slice, or with `neighbours` (3D grey volumes only) as slices index-1, index, index+1."""
    view = geometry.slice_view(source, index)
    if not neighbours or geometry.slice_axis < 0 or view.ndim != 2:
        return mapping.apply(view)
    last = geometry.num_slices - 1
    stack = np.stack([geometry.slice_view(source, k) for k in (max(index - 1, 0), index, min(index + 1, last))],
                     axis=-1)
    return mapping.apply(stack)  # element-wise: each channel mapped exactly as its slice alone would be
