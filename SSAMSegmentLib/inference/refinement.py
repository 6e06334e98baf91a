"""Correcting one label with a box and/or points on one slice, carried to the neighbouring slices.

The prompted slice is decoded again with the box and points together with the label's text token (or without it:
the base alone, as LiteMedSAM was trained). When the text token and the prompt together find nothing on the prompted
slice, the token contradicts what the user marked (a label the adapter never learnt, or learnt poorly): the prompt
alone decodes that slice and the carried ones, and `Refinement.fell_back` says so. A prompt alone is decoded by the
base with its own weights (S-SAM's identity start, `box_prompt.untuned_base`), whose box and point answers are what it was
trained for; the adapter's encoder, tuned for text prompts, answers a box alone far worse. Then, slice after slice
away from it, the previous corrected mask's box, grown a little, is the next slice's box prompt, until the structure ends there (nothing found, the decoder's
predicted IoU drops, the area collapses), the new mask roughly agrees with what the label already had (the text
answer holds from there), or the box's own depth is left. Only the label's mask on the slices reported in `slices` changes; everything else is the input mask.

A label the adapter redraws from its own box when segmenting (self_box.py) is redrawn the same way on the rewritten
slices, so a correction does not trade the base's outline for the text token's: without it a box on the dcmqi CT's
self-boxed liver lost volume Dice (0.906 -> 0.900, Testing/Python/test_refinement.py).
"""

import dataclasses
from typing import Dict, List, Optional

import numpy as np
import SimpleITK as sitk
import torch

from ..errors import Cancelled, SSAMError
from ..files.image_io import check_image
from ..model import label_routes
from .box_prompt import mask_box, untuned_base
from .intensity import choose_mapping, has_signal
from .neighbour_slices import slice_pixels, uses_neighbours
from .physical_prompts import PhysicalPrompt, to_slice_prompt
from .preprocessing import logits_to_slice, model_coordinates, to_model_input
from .self_box import chosen_labels, dice, redraw_slices
from .slice_geometry import SliceGeometry
from .slice_inference import _copy_geometry, check_threshold

# The carried box grows by GROW of its size on each side (at least GROW_PIXELS). It compounds: a box-prompted mask
# fills its box, so with 10% a 20-slice spleen ballooned over its neighbours (volume Dice 0.76 -> 0.54, real CT).
GROW = 0.03
GROW_PIXELS = 2.0
MIN_QUALITY = 0.5  # the decoder's predicted IoU under which a carried mask counts as "the structure ended"
MIN_AREA_RATIO = 0.2  # a carried mask smaller than this share of the previous slice's: the structure ended
# Dice with the label's existing mask at which carrying stops: from there on the text answer roughly holds, and
# a carried box would only replace it with a mask that drifts further from the prompt with every slice.
AGREES = 0.5
# How a summary or status line says that a correction decoded without the text token, which found nothing
PROMPT_ALONE = "(by the prompt alone: with the label's text it found nothing)"


@dataclasses.dataclass
class Refinement:
    mask: sitk.Image  # the label's whole corrected mask, on the image's grid
    slices: List[int]  # image-array slice indices (along array_axis) whose mask was rewritten, ascending
    confidence: Dict[int, float]  # predicted IoU of each rewritten slice
    array_axis: int
    fell_back: bool = False  # the text was asked for but found nothing, so the prompt alone decoded (PROMPT_ALONE)


def grown_box(mask: np.ndarray, height: int, width: int):
    x0, y0, x1, y1 = mask_box(mask)
    grow_x = max(GROW_PIXELS, GROW * (x1 - x0 + 1))
    grow_y = max(GROW_PIXELS, GROW * (y1 - y0 + 1))
    return max(0.0, x0 - grow_x), max(0.0, y0 - grow_y), min(width - 1.0, x1 + grow_x), min(height - 1.0, y1 + grow_y)


class _SliceDecoder:
    """One slice at a time through the model's one prompt path (SSAM.decode)."""

    def __init__(self, model, image, geometry, mapping, token, logit_threshold):
        self.model, self.geometry, self.mapping = model, geometry, mapping
        self.source = geometry.canonical(sitk.GetArrayViewFromImage(image))
        self.token, self.logit_threshold = token, logit_threshold
        self.spacing = geometry.in_plane_spacing()
        self.neighbours = uses_neighbours(model)  # the same input channels as segmenting (neighbour_slices.py)

    def __call__(self, index, box=None, points=None, point_labels=None):
        """(mask, predicted IoU) of slice `index` in slice_view pixels; None for a slice without signal."""
        if not has_signal(self.geometry.slice_view(self.source, index)):
            return None
        model, rgb = self.model, slice_pixels(self.geometry, self.source, self.mapping, index, self.neighbours)
        height, width = rgb.shape[:2]
        pixels = torch.from_numpy(rgb).permute(2, 0, 1)[None].to(model.device)
        inputs, content = to_model_input(pixels, model.image_size, model.pixel_mean, model.pixel_std, self.spacing)
        prompts = {}
        if box is not None:
            prompts["boxes"] = model_coordinates(np.array(box, np.float32)[None], (height, width), model.image_size,
                                                 self.spacing)
        if points is not None and len(points):
            prompts["points"] = model_coordinates(points[None], (height, width), model.image_size, self.spacing)
            prompts["point_labels"] = torch.as_tensor(point_labels)[None]
        logits, quality = model.decode(model.encode_images(inputs), self.token, with_quality=True, **prompts)
        logits = logits_to_slice(logits, model.image_size, content, (height, width))
        return (logits[0, 0] > self.logit_threshold).cpu().numpy(), float(quality[0])


@torch.inference_mode()
def refine(model, image: sitk.Image, label: str, prompt: PhysicalPrompt, mask: Optional[sitk.Image] = None,
           axis: str = "auto", intensity: str = "auto", window=None, threshold: float = 0.5, use_text: bool = True,
           carry: bool = True, self_box: str = "auto", progress=None, cancel=None) -> Refinement:
    """Correct `label`'s `mask` (None: empty) on `image` with `prompt` (LPS mm), as the module docstring says.
    axis, intensity, window and self_box must be those the mask was made with (the defaults give the same as
    segment)."""
    image = check_image(image)
    if not prompt:
        raise SSAMError(f"no box or point was given to correct '{label}' with")
    model = label_routes.network_for(model, label)  # the network that segments the label (label_routes.py)
    geometry = SliceGeometry.for_image(image, axis)
    mapping = choose_mapping(image, intensity, window)
    logit_threshold = check_threshold(threshold)
    if mask is not None and (mask.GetSize() != image.GetSize()):
        raise SSAMError(f"the mask of '{label}' ({mask.GetSize()}) is not on the image's grid ({image.GetSize()})")
    on_slice = to_slice_prompt(prompt, image, geometry)
    if not model.merged:
        model.merge()
    was_training = model.training
    model.eval()
    token = model.prompt_tokens(model.text_embeddings([label])) if use_text else None
    decode = _SliceDecoder(model if use_text else untuned_base(model), image, geometry, mapping, token,
                           logit_threshold)

    output = np.zeros(geometry.shape, np.uint8) if mask is None else sitk.GetArrayFromImage(mask).astype(np.uint8)
    canonical = geometry.canonical(output)
    rewritten: Dict[int, float] = {}

    def check_cancel():
        if cancel is not None and cancel.is_set():
            raise Cancelled("correction cancelled; nothing was changed")

    try:
        check_cancel()
        first = decode(on_slice.slice, on_slice.box, on_slice.points, on_slice.point_labels)
        if first is None:
            raise SSAMError(f"slice {geometry.array_index(on_slice.slice)} has no signal (constant intensity); "
                            f"place the prompt on a slice showing the structure")
        fell_back = decode.token is not None and not first[0].any()  # the token contradicts the user's prompt
        if fell_back:
            decode = _SliceDecoder(untuned_base(model), image, geometry, mapping, None, logit_threshold)
            first = decode(on_slice.slice, on_slice.box, on_slice.points, on_slice.point_labels)
        geometry.slice_view(canonical, on_slice.slice)[...] = first[0]
        rewritten[on_slice.slice] = first[1]
        low, high = on_slice.reach
        steps = [(direction, index) for direction in (1, -1) for index in
                 (range(on_slice.slice + 1, high + 1) if direction > 0 else range(on_slice.slice - 1, low - 1, -1))]
        previous = {1: first[0], -1: first[0]}
        for direction, index in steps if carry else []:
            check_cancel()
            before = previous[direction]
            if before is None or not before.any():
                continue
            height, width = before.shape
            result = decode(index, grown_box(before, height, width))
            existing = geometry.slice_view(canonical, index)
            if (result is None or not result[0].any() or result[1] < MIN_QUALITY
                    or result[0].sum() < MIN_AREA_RATIO * before.sum()
                    or dice(result[0], existing.astype(bool)) >= AGREES):
                previous[direction] = None  # the structure ends here, or the label's own answer takes over
                continue
            existing[...] = result[0]
            rewritten[index] = result[1]
            previous[direction] = result[0]
            if progress:
                progress(len(rewritten) / max(1, high - low + 1), f"corrected slice {geometry.array_index(index)}")
        if decode.token is not None and chosen_labels(model, [label], self_box):  # as segmenting drew it
            rewritten.update(redraw_slices(untuned_base(model), geometry, decode.source, mapping, canonical,
                                           list(rewritten), decode.spacing, logit_threshold, check_cancel))
    finally:
        if was_training:
            model.train()
    corrected = sitk.GetImageFromArray(output)
    _copy_geometry(corrected, image)
    confidence = {geometry.array_index(index): score for index, score in rewritten.items()}
    return Refinement(corrected, sorted(confidence), confidence, geometry.array_axis, fell_back)


def prompts_by_label(labels, boxes=None, points=None, negative_points=None) -> Dict[str, PhysicalPrompt]:
    """segment()'s boxes/points/negative_points, each {label: value} (or the value alone when there is one
    label), as one PhysicalPrompt per label."""
    from ..model.text_encoders import label_key

    labels = list(labels)
    keys = {label_key(label): label for label in labels}
    prompts: Dict[str, PhysicalPrompt] = {}
    for field, given in (("box", boxes), ("points", points), ("negative_points", negative_points)):
        if given is None:
            continue
        if not isinstance(given, dict):
            if len(labels) != 1:
                raise SSAMError(f"with several labels, give the {field} per label as {{label: ...}}")
            given = {labels[0]: given}
        for name, value in given.items():
            if label_key(name) not in keys:
                raise SSAMError(f"a prompt was given for '{name}', which is not among the labels "
                                f"({', '.join(labels)}); name one of them")
            prompt = prompts.setdefault(keys[label_key(name)], PhysicalPrompt())
            setattr(prompt, field, tuple(value) if field == "box" else [tuple(p) for p in value])
    return prompts


def check_prompts(image, prompts: Dict[str, PhysicalPrompt], axis: str = "auto"):
    """Fail before any work when a prompt is outside the image or spread over several slices."""
    geometry = SliceGeometry.for_image(check_image(image), axis)
    for prompt in prompts.values():
        to_slice_prompt(prompt, image, geometry)


def apply_refinements(model, image, result, prompts: Dict[str, PhysicalPrompt], **options):
    """Correct `result` (a SegmentationResult of `image`) with each label's prompt; records the rewritten slices in
    result.refined and their predicted IoU in result.slice_confidence."""
    for label, prompt in prompts.items():
        refinement = refine(model, image, label, prompt, result.masks[label], axis=result.axis, **options)
        result.masks[label] = refinement.mask
        result.refined[label] = refinement.slices
        if refinement.fell_back:
            result.refined_prompt_alone.append(label)
        scores = result.slice_confidence.get(label)
        if scores is not None:
            for index, score in refinement.confidence.items():
                scores[index] = score
    result.empty_labels = [label for label, mask in result.masks.items()
                           if not sitk.GetArrayViewFromImage(mask).any()]
    return result
