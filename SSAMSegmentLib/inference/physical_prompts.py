"""Box and point prompts in physical coordinates (LPS millimetres), brought onto the slice the model sees.

A user places a box or clicks in a viewer; the same millimetres must mean the same voxels whatever order the file
stores them in, however oblique, anisotropic or flipped the grid (SliceGeometry.slice_coordinates). LPS is the
patient frame DICOM, ITK and `ssam` use (x to the patient's left, y posterior, z superior); Slicer shows RAS, which
is LPS with x and y negated.
"""

import dataclasses
import itertools
from typing import List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from ..errors import SSAMError

Point = Tuple[float, float, float]


@dataclasses.dataclass
class PhysicalPrompt:
    """What a user gave for one label: a box as two opposite LPS corners, and inside/outside points (LPS mm)."""

    box: Optional[Tuple[Point, Point]] = None
    points: Sequence[Point] = ()
    negative_points: Sequence[Point] = ()

    def __bool__(self):
        return self.box is not None or bool(self.points) or bool(self.negative_points)


@dataclasses.dataclass
class SlicePrompt:
    """The prompt on its slice, in slice_view pixels: box (x0, y0, x1, y1) = (column, row) corners, points (P, 2)
    as (column, row) with labels 1 inside / 0 outside; `reach` the slice range a correction may be carried over
    (the box's own depth when it has one, else the whole volume)."""

    slice: int
    box: Optional[Tuple[float, float, float, float]]
    points: np.ndarray
    point_labels: np.ndarray
    reach: Tuple[int, int]


def _describe(point) -> str:
    return "(" + ", ".join(f"{v:g}" for v in point) + ")"


def _slice_position(image: sitk.Image, geometry, point, inside: bool = True) -> Tuple[float, float, float]:
    point = tuple(float(v) for v in point)
    if image.GetDimension() == 2 and len(point) == 3:  # a picture lies in the z = 0 plane
        point = point[:2]
    if len(point) != image.GetDimension():
        raise SSAMError(f"point {_describe(point)} has {len(point)} coordinates; give {image.GetDimension()} "
                        f"(LPS millimetres)")
    index = image.TransformPhysicalPointToContinuousIndex(point)
    size = image.GetSize()
    if inside and any(not -0.5 <= i <= n - 0.5 for i, n in zip(index, size)):
        corners = [image.TransformContinuousIndexToPhysicalPoint([c * (n - 1) for c, n in zip(corner, size)])
                   for corner in ((0,) * len(size), (1,) * len(size))]
        raise SSAMError(f"prompt point {_describe(point)} mm lies outside the image, which spans "
                        f"{_describe(corners[0])} to {_describe(corners[1])} mm (LPS; Slicer shows RAS: negate x and y)")
    return geometry.slice_coordinates(index)


def to_slice_prompt(prompt: PhysicalPrompt, image: sitk.Image, geometry) -> SlicePrompt:
    """Put `prompt` on the model's slice. Box corners project onto the slice plane (an axis-aligned LPS box on an
    oblique grid covers the box of its projected corners); all of a prompt must be on one slice."""
    last = geometry.num_slices - 1
    box, reach, slices = None, (0, last), []
    if prompt.box is not None:
        corners = [tuple(c) for c in prompt.box]
        if len(corners) != 2:
            raise SSAMError("a box is two opposite corners; give x0,y0,z0,x1,y1,z1 in LPS millimetres")
        if image.GetDimension() == 2:
            corners = [corner[:2] for corner in corners]
        # a box may reach beyond the image (a viewer's ROI often does): it is cut to the image
        projected = np.array([_slice_position(image, geometry, [corners[k][axis] for axis, k in enumerate(choice)],
                                              inside=False)
                              for choice in itertools.product((0, 1), repeat=len(corners[0]))])
        low, high = int(np.floor(projected[:, 0].min() + 0.5)), int(np.floor(projected[:, 0].max() + 0.5))
        rows_count, cols_count = geometry.slice_shape()
        rows, cols = np.clip(projected[:, 1], 0, rows_count - 1), np.clip(projected[:, 2], 0, cols_count - 1)
        if high < 0 or low > last or projected[:, 1].max() < 0 or projected[:, 1].min() > rows_count - 1 \
                or projected[:, 2].max() < 0 or projected[:, 2].min() > cols_count - 1:
            raise SSAMError(f"the box {_describe(corners[0])}-{_describe(corners[1])} mm lies outside the image "
                            f"(LPS millimetres; Slicer shows RAS: negate x and y)")
        low, high = max(0, low), min(last, high)
        if high > low:
            reach = (low, high)
        slices.append(int(round((low + high) / 2)))
        box = (float(cols.min()), float(rows.min()), float(cols.max()), float(rows.max()))
        if box[2] - box[0] < 1 or box[3] - box[1] < 1:
            raise SSAMError(f"the box {_describe(corners[0])}-{_describe(corners[1])} mm is flat on the "
                            f"{geometry.axis} slices; draw it across the structure in the slice plane")
    points, labels = [], []
    for value, group in ((1, prompt.points), (0, prompt.negative_points)):
        for point in group:
            position = _slice_position(image, geometry, point)
            slices.append(int(np.floor(position[0] + 0.5)))
            points.append((position[2], position[1]))
            labels.append(value)
    if not slices:
        raise SSAMError("no box or point was given to correct with; give --box and/or --point")
    if len(set(slices)) > 1 and not (box is not None and all(reach[0] <= s <= reach[1] for s in slices)):
        raise SSAMError(f"the prompt's box and points lie on different {geometry.axis} slices "
                        f"({', '.join(str(geometry.array_index(s)) for s in sorted(set(slices)))}); place them on one slice")
    return SlicePrompt(slices[0], box, np.array(points, dtype=np.float32).reshape(-1, 2),
                       np.array(labels, dtype=np.float32), reach)


def parse_box(text: str) -> Tuple[Point, Point]:
    """'x0,y0,z0,x1,y1,z1' (LPS mm) -> two corners."""
    values = _numbers(text, "--box", "x0,y0,z0,x1,y1,z1")
    if len(values) != 6:
        raise SSAMError(f"--box '{text}' needs 6 numbers x0,y0,z0,x1,y1,z1 (two opposite corners, LPS mm)")
    return tuple(values[:3]), tuple(values[3:])


def parse_point(text: str, option: str = "--point") -> Point:
    values = _numbers(text, option, "x,y,z")
    if len(values) != 3:
        raise SSAMError(f"{option} '{text}' needs 3 numbers x,y,z (LPS mm)")
    return tuple(values)


def _numbers(text: str, option: str, form: str) -> List[float]:
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise SSAMError(f"{option} '{text}' is not {form} in millimetres; e.g. {option} "
                        f"{','.join('10' for _ in form.split(','))}") from None
