"""Which labels of a trained adapter get the self-prompted box (inference/self_box.py): decided on the run's
validation slices, at model resolution like the validation Dice itself, and stored in the adapter.

Per label, over the validation slices annotated for it: the mean Dice of the text masks (exactly the validation's,
trainer.predicted_masks) and of the same masks where the untuned base redrew them from their own box. A label gets
the box when that mean is at least self_box.MIN_GAIN higher; labels in tiles never do (self_box.py says why).
Without validation slices nothing is chosen: the box is never applied on trust.
"""

from typing import Dict, Optional, Sequence

import numpy as np
import torch

from ..inference.box_prompt import untuned_base
from ..inference.self_box import MIN_GAIN, box_answer, dice
from ..model.labels import label_key
from .trainer import predicted_masks


@torch.inference_mode()
def measure(model, bank, text, device, labels: Optional[Sequence[str]] = None, cancel=None,
            batch_size: int = 4) -> Dict[str, dict]:
    """label -> {"text", "self_box": mean Dice, "slices": how many, "chosen": bool} for the bank's labels (or those
    named) that the bank annotates; `text`: the text embeddings of bank.label_names."""
    names = bank.label_names
    tiled = {label_key(name) for name in getattr(model, "tile_records", {})}
    indices = [index for index, name in enumerate(names)
               if (labels is None or name in labels) and label_key(name) not in tiled]
    base = untuned_base(model)
    text_scores = {index: [] for index in indices}
    box_scores = {index: [] for index in indices}
    for rows, predicted, truth in predicted_masks(model, bank, text, device, batch_size, cancel):
        for position, row in enumerate(rows):
            h, w = bank.content[row]
            rgb = None
            for index in indices:
                if not bank.scored[row, index]:
                    continue
                found, true = predicted[position, index, :h, :w], truth[position, index, :h, :w]
                text_scores[index].append(dice(found, true))
                answer = None
                if found.any():
                    if rgb is None:
                        rgb = _base_pixels(model, bank.images[row][:, :h, :w])
                    answer = box_answer(base, rgb, found)
                box_scores[index].append(text_scores[index][-1] if answer is None else dice(answer[0] > 0, true))
    choice = {}
    for index in indices:
        if text_scores[index]:
            text_mean, box_mean = float(np.mean(text_scores[index])), float(np.mean(box_scores[index]))
            choice[names[index]] = {"text": round(text_mean, 4), "self_box": round(box_mean, 4),
                                    "slices": len(text_scores[index]), "chosen": box_mean >= text_mean + MIN_GAIN}
    return choice


def _base_pixels(model, pixels: np.ndarray) -> np.ndarray:
    """A bank slice's content (3, h, w uint8) as the base's input (h, w, 3 float): for an adapter trained on
    neighbouring slices its middle channel, slice k, in all three (the base was trained on one slice)."""
    if getattr(model, "neighbour_slices", False):
        pixels = np.repeat(pixels[1:2], 3, axis=0)
    return np.ascontiguousarray(pixels.transpose(1, 2, 0), dtype=np.float32)
