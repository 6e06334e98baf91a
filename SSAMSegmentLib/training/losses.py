"""S-SAM's training loss on mask logits: focal loss (alpha 0.75, gamma 3) plus soft Dice, with one sigmoid.

(The reference code applies the sigmoid twice inside its focal loss; here the logits go through
binary_cross_entropy_with_logits and one sigmoid for the modulating factor and the Dice.)
"""

import torch
import torch.nn.functional as F


def focal_loss(logits: torch.Tensor, target: torch.Tensor, alpha: float = 0.75, gamma: float = 3.0) -> torch.Tensor:
    """Mean focal loss over all pixels; `target` is 0/1 with the shape of `logits`."""
    probability = torch.sigmoid(logits)
    cross_entropy = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_true = probability * target + (1 - probability) * (1 - target)
    alpha_true = alpha * target + (1 - alpha) * (1 - target)
    return (alpha_true * (1 - p_true) ** gamma * cross_entropy).mean()


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """1 - soft Dice per mask, averaged. With an empty target it still pushes the prediction towards empty."""
    probability = torch.sigmoid(logits).flatten(1)
    target = target.flatten(1)
    intersection = (probability * target).sum(1)
    dice = (2 * intersection + smooth) / (probability.sum(1) + target.sum(1) + smooth)
    return (1 - dice).mean()


def ssam_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    logits = logits.float()
    return focal_loss(logits, target) + soft_dice_loss(logits, target)
