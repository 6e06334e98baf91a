"""S-SAM's training loss on mask logits: focal loss (alpha 0.75, gamma 3) plus soft Dice, with one sigmoid.

Logits and targets are (B, L, H, W): slices by labels. An optional 0/1 `weight` (B, L) leaves masks out (a label that the slice's own dataset does not annotate: an H&E gland image is full of nuclei that its
gland masks do not mark, so training "nucleus" there as empty would teach the opposite of the nuclei dataset).

(The reference code applies the sigmoid twice inside its focal loss; here the logits go through
binary_cross_entropy_with_logits and one sigmoid for the modulating factor and the Dice.)
"""

import torch
import torch.nn.functional as F


def _expand(weight, like: torch.Tensor):
    """The per-mask weight broadcast over each mask's pixels: (B, L) -> (B, L, 1, 1)."""
    weight = weight.to(like)
    return weight.reshape(weight.shape + (1,) * (like.dim() - weight.dim()))


def focal_loss(logits: torch.Tensor, target: torch.Tensor, alpha: float = 0.75, gamma: float = 3.0,
               weight=None) -> torch.Tensor:
    """Mean focal loss over the pixels of the weighted masks; `target` is 0/1 with the shape of `logits`."""
    probability = torch.sigmoid(logits)
    cross_entropy = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_true = probability * target + (1 - probability) * (1 - target)
    alpha_true = alpha * target + (1 - alpha) * (1 - target)
    loss = alpha_true * (1 - p_true) ** gamma * cross_entropy
    if weight is None:
        return loss.mean()
    weight = _expand(weight, loss).expand_as(loss)
    return (loss * weight).sum() / weight.sum().clamp(min=1)


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0, weight=None) -> torch.Tensor:
    """1 - soft Dice per sample (dim 0, pooled over its masks and pixels), averaged. With an empty target it still
    pushes the prediction towards empty. `weight` pools only the weighted masks."""
    probability = torch.sigmoid(logits)
    if weight is not None:
        probability, target = probability * _expand(weight, probability), target * _expand(weight, target)
    probability, target = probability.flatten(1), target.flatten(1)
    intersection = (probability * target).sum(1)
    dice = (2 * intersection + smooth) / (probability.sum(1) + target.sum(1) + smooth)
    return (1 - dice).mean()


def ssam_loss(logits: torch.Tensor, target: torch.Tensor, weight=None) -> torch.Tensor:
    logits = logits.float()
    return focal_loss(logits, target, weight=weight) + soft_dice_loss(logits, target, weight=weight)
