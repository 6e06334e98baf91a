"""Which way to cut a volume into 2D slices, and how each slice is turned so the model always sees the same view.

A volume's voxel array can be stored in any index order (RAS, LPS, sagittal-first, oblique...). `SliceGeometry`
maps it, with numpy views only (no copy of the volume), onto an anatomical frame: array axes (S, P, L) as in an
LPS-oriented image, then cuts along the chosen anatomical axis and shows each slice as a radiologist would (axial:
anterior up, patient's right on the left; coronal and sagittal: superior up). Masks written through the same views
land on the original grid voxel for voxel.
"""

import dataclasses
from typing import Tuple

import numpy as np
import SimpleITK as sitk

from ..errors import SSAMError

AXES = ("auto", "axial", "coronal", "sagittal")
# In the canonical (S, P, L) array: axial slices cut axis 0, coronal axis 1, sagittal axis 2.
_CANONICAL_AXIS = {"axial": 0, "coronal": 1, "sagittal": 2}


def _index_axes_to_lps(direction: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """For each LPS axis (x=L, y=P, z=S), the image index axis most aligned with it, and the sign."""
    weights = np.abs(direction)  # weights[p, i]: how much index axis i points along physical axis p
    chosen = -np.ones(3, dtype=int)
    for _ in range(3):  # greedy on the strongest remaining alignment, so oblique images get a one-to-one match
        masked = np.where((chosen[:, None] >= 0) | np.isin(np.arange(3), chosen)[None, :], -1, weights)
        p, i = np.unravel_index(np.argmax(masked), masked.shape)
        chosen[p] = i
    signs = np.sign(direction[np.arange(3), chosen])
    signs[signs == 0] = 1
    return chosen, signs


@dataclasses.dataclass
class SliceGeometry:
    """How a (2D or 3D) image is cut into slices. `axis` is the anatomical axis actually used."""

    shape: tuple  # the image array's spatial shape, numpy order
    axis: str
    order: tuple  # numpy transpose from the image array to canonical (S, P, L)
    flips: tuple  # canonical axes to reverse after the transpose
    slice_axis: int  # canonical axis cut into slices
    spacing: tuple  # canonical (S, P, L) spacing

    @classmethod
    def for_image(cls, image: sitk.Image, axis: str = "auto") -> "SliceGeometry":
        if axis not in AXES:
            raise SSAMError(f"unknown slice axis '{axis}'; use one of: {', '.join(AXES)}")
        size = image.GetSize()
        if image.GetDimension() == 2:
            return cls((size[1], size[0]), "axial", (0, 1), (), -1, tuple(reversed(image.GetSpacing())))
        direction = np.array(image.GetDirection()).reshape(3, 3)
        lps_to_index, signs = _index_axes_to_lps(direction)
        # numpy axis of sitk index axis i is 2 - i; canonical numpy axes are (S, P, L) = LPS axes (2, 1, 0).
        order = tuple(int(2 - lps_to_index[p]) for p in (2, 1, 0))
        flips = tuple(k for k, p in enumerate((2, 1, 0)) if signs[p] < 0)
        spacing = tuple(float(image.GetSpacing()[lps_to_index[p]]) for p in (2, 1, 0))
        if axis == "auto":
            largest = max(spacing)
            # Cut across the coarsest axis of an anisotropic volume (thick slices), else axial.
            axis = "axial" if spacing[0] >= largest / 1.2 else ("coronal", "sagittal")[int(np.argmax(spacing[1:]))]
        shape = tuple(reversed(size))
        return cls(shape, axis, order, flips, _CANONICAL_AXIS[axis], spacing)

    def canonical(self, array: np.ndarray) -> np.ndarray:
        """A view of an image-ordered array (spatial axes first, optional trailing RGB axis) in (S, P, L) order."""
        view = array.transpose(self.order + tuple(range(len(self.order), array.ndim)))
        for axis in self.flips:
            view = np.flip(view, axis)
        return view

    @property
    def array_axis(self) -> int:
        """The axis of the image's own numpy array that is cut into slices (0 for 2D images)."""
        return 0 if self.slice_axis < 0 else self.order[self.slice_axis]

    @property
    def num_slices(self) -> int:
        return 1 if self.slice_axis < 0 else self.shape[self.array_axis]

    def slice_view(self, canonical: np.ndarray, index: int) -> np.ndarray:
        """Slice `index` as the model sees it (a view): axial as is; coronal/sagittal with superior at the top."""
        if self.slice_axis < 0:
            return canonical
        view = _index(canonical, self.slice_axis, index)
        return view if self.slice_axis == 0 else view[::-1]

    def slice_spacing(self) -> float:
        """The distance between neighbouring slices (mm); 0 for a 2D image."""
        return 0.0 if self.slice_axis < 0 else float(self.spacing[self.slice_axis])

    def in_plane_spacing(self) -> Tuple[float, float]:
        """(row, column) spacing of the slices as returned by slice_view."""
        if self.slice_axis < 0:
            return self.spacing[0], self.spacing[1]
        rest = [s for k, s in enumerate(self.spacing) if k != self.slice_axis]
        return rest[0], rest[1]


def _index(array: np.ndarray, axis: int, index: int) -> np.ndarray:
    selector = [slice(None)] * array.ndim
    selector[axis] = index
    return array[tuple(selector)]
