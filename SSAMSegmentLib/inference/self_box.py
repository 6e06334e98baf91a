"""The self-prompted box: a label's text mask hands the box of its largest piece to the untuned base, and the base's
answer to that box replaces the mask on the slice where the base is confident of it.

Why: LiteMedSAM and SAM were trained on box prompts. Given the true box the base reaches 0.908 Dice on the Kvasir-SEG
test polyps, against about 0.70 for the text prompt (docs/fine_tuning.md, per-dataset study): the text token finds
where the structure is better than it draws its outline. Decoded by the base with its own weights
(box_prompt.untuned_base; the adapter's encoder, tuned for text, answers a box worse), the text mask's own box lifted
the shipped adapter's polyps from 0.704 to 0.760 on those 200 images when the base's predicted IoU was at least
MIN_IOU (80 images better by more than 0.05, 10 worse; benchmarks/measure_self_prompt.py).

It suits a label that is one object per slice; one of many pieces (nuclei, glands) would keep only the largest. So
it is not a fixed rule: `ssam train` tries it per label on its validation slices (training/self_box_choice.py) and the adapter
stores the labels it helped (metadata "self_box"); `ssam segment --self-box off` turns it off. Labels segmented in
tiles (tiling.py) are many small structures and never get it. Costs one more encoder pass (the base's) per slice
where such a label was found.
"""

from typing import Dict, List, Sequence

import numpy as np
import SimpleITK as sitk
import torch

from ..errors import Cancelled
from ..model.labels import label_key
from .box_prompt import box_prompt_masks, mask_box, untuned_base
from .neighbour_slices import slice_pixels

MIN_IOU = 0.9  # the base's predicted IoU from which its box answer replaces the text mask (measured on polyp-val)
MIN_GAIN = 0.01  # mean validation Dice the box must add for a label to get it: less is within noise of 40 images
CHOICES = ("auto", "off")  # `ssam segment --self-box`: the adapter's choice, or the text masks alone


def largest_piece(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected piece of a 2D mask (bool); an empty mask stays empty."""
    pieces = sitk.RelabelComponent(sitk.ConnectedComponent(sitk.GetImageFromArray(mask.astype(np.uint8)), True))
    return sitk.GetArrayFromImage(pieces) == 1


def box_answer(base, rgb: np.ndarray, text_mask: np.ndarray, spacing=(1.0, 1.0), logit_threshold: float = 0.0):
    """(mask uint8 (H, W), predicted IoU) of the base prompted with the box of the text mask's largest piece on one
    slice (H, W, 3 in 0..255), or None where the text mask is empty or the base's IoU is under MIN_IOU."""
    if not text_mask.any():
        return None
    masks, quality = box_prompt_masks(base, rgb, [mask_box(largest_piece(text_mask))], spacing, logit_threshold,
                                      with_quality=True)
    return (masks[0], float(quality[0])) if quality[0] >= MIN_IOU else None


def chosen_labels(model, names: Sequence[str], setting: str = "auto") -> List[str]:
    """Those of `names` (result labels) that get the box: the adapter's self_box labels not segmented in tiles."""
    if setting == "off":
        return []
    chosen = {label_key(name) for name in getattr(model, "self_box", [])}
    tiled = {label_key(name) for name in getattr(model, "tile_records", {})}
    return [name for name in names if label_key(name) in chosen and label_key(name) not in tiled]


def redraw_slices(base, geometry, source, mapping, canonical: np.ndarray, indices, spacing,
                  logit_threshold: float = 0.0, check_cancel=None) -> Dict[int, float]:
    """Redraw a label's mask (`canonical`, in geometry.canonical order) in place on the slices `indices` where the
    base is sure of its answer to the mask's own box; returns {slice index: the base's predicted IoU} of those."""
    redrawn = {}
    for index in indices:
        if check_cancel is not None:
            check_cancel()
        view = geometry.slice_view(canonical, index)
        if not view.any():
            continue
        # the base's own input: the slice alone, even for an adapter trained on neighbouring slices
        answer = box_answer(base, slice_pixels(geometry, source, mapping, index), view > 0, spacing, logit_threshold)
        if answer is not None:
            view[...] = answer[0]
            redrawn[index] = answer[1]
    return redrawn


@torch.inference_mode()
def apply_self_box(model, image: sitk.Image, geometry, mapping, result, logit_threshold: float = 0.0,
                   setting: str = "auto", cancel=None) -> None:
    """Redraw the chosen labels of a SegmentationResult in place, slice by slice (slice_inference.segment_image calls
    it after the masks are made); result.self_boxed says which image-array slices changed."""
    names = chosen_labels(model, list(result.masks), setting)
    if not names:
        return
    base = untuned_base(model)
    source = geometry.canonical(sitk.GetArrayViewFromImage(image))
    spacing = geometry.in_plane_spacing()

    def check_cancel():
        if cancel is not None and cancel.is_set():
            raise Cancelled("segmentation cancelled; nothing was written")

    for name in names:
        array = sitk.GetArrayFromImage(result.masks[name])
        redrawn = redraw_slices(base, geometry, source, mapping, geometry.canonical(array), range(geometry.num_slices),
                                spacing, logit_threshold, check_cancel)
        if not redrawn:
            continue
        scores = result.slice_confidence.get(name)
        if scores is not None:
            for index, quality in redrawn.items():
                scores[geometry.array_index(index)] = quality  # the mask is now the base's: so is its confidence
        mask = sitk.GetImageFromArray(array)
        mask.CopyInformation(result.masks[name])
        result.masks[name] = mask
        result.self_boxed[name] = sorted(geometry.array_index(index) for index in redrawn)
    result.empty_labels = [label for label, mask in result.masks.items()
                           if not sitk.GetArrayViewFromImage(mask).any()]


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two masks; 1 when both are empty."""
    total = int(np.count_nonzero(a)) + int(np.count_nonzero(b))
    return 1.0 if total == 0 else 2.0 * int(np.count_nonzero(a & b)) / total
