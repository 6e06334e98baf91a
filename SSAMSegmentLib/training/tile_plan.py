"""Which labels train and segment in native-resolution tiles, decided from the training masks (the rule is
inference.tiling.choose_tiles): per label, the median slice size and the median size of its structures on the
slices where it is present. The result is stored in the adapter, so inference uses the same tiles."""

from typing import Dict

import numpy as np

from ..inference.slice_geometry import SliceGeometry
from ..inference.tiling import TileRecord, choose_tiles, typical_structure_size

SLICES_PER_CASE = 8  # of a 3D case's slices showing the label, enough for a median


def plan_tiles(cases, label_names, image_size: int, axis: str = "auto", cancel=None) -> Dict[str, TileRecord]:
    from ..errors import Cancelled

    shapes = {name: [] for name in label_names}
    sizes = {name: [] for name in label_names}
    for case in cases:
        if cancel is not None and cancel.is_set():
            raise Cancelled("training cancelled while preparing slices; nothing was written")
        image, masks = case.load()
        geometry = SliceGeometry.for_image(image, axis)
        for name in label_names:
            if name not in masks:
                continue
            view = geometry.canonical(np.asarray(masks[name]))
            present = [i for i in range(geometry.num_slices) if geometry.slice_view(view, i).any()]
            step = max(1, len(present) // SLICES_PER_CASE)
            for index in present[::step][:SLICES_PER_CASE]:
                plane = geometry.slice_view(view, index)
                shapes[name].append(plane.shape[:2])
                sizes[name].append(typical_structure_size(plane))
    plan = {}
    for name in label_names:
        if not sizes[name]:
            continue
        shape = np.median(np.array(shapes[name]), axis=0)
        record = choose_tiles(shape, float(np.median(sizes[name])), image_size)
        if record is not None:
            plan[name] = record
    return plan


def case_record(case, plan: Dict[str, TileRecord], label_names):
    """The record a training case is cropped by: the one shared by every planned label it annotates, when it
    annotates no label kept at whole-image context; else None (whole slices, whose context those labels need)."""
    annotated = getattr(case, "annotated", None) or label_names
    records = {plan.get(name) for name in label_names if name in annotated}
    if len(records) == 1:
        return records.pop()
    return None
