"""The default fine-tuning recipe: what `ssam train DATA --output X` does without options, and the decisions it takes
from the dataset and the device. The numbers and why they were chosen are in docs/fine_tuning.md."""

import numpy as np

# Steps, not epochs: a 16-image set gets as many updates as a 500-slice one (10 epochs of 16 images in batches of 4
# were 40 steps, and learnt nothing).
DEFAULT_STEPS = 400
# Peak rates per parameter group (measured, docs/fine_tuning.md): 1e-3 for everything moved the singular values'
# shifts far enough to destroy labels, 1e-4 for everything learnt too slowly; 1e-4 for the singular values' scales
# and shifts with 1e-3 for the rest (norms, Text Affine Layer, positional embedding) was the best.
DEFAULT_LR = 1e-3
DEFAULT_LR_SINGULAR_VALUES = 1e-4
# Validations (each a tenth of the schedule) after warm-up without a better Dice before the run stops.
DEFAULT_PATIENCE = 4
# A label present on fewer than this share of its annotated training slices is rare: uniform sampling would show
# it absent most of the time and the model learns to answer "absent"; balanced sampling shows it as often present
# as absent.
RARE_LABEL_SHARE = 0.25

CPU_BATCH = 4  # slices per step on a CPU (micro-batched one slice at a time: see trainer._accumulate_gradients)
CUDA_BATCH_PER_PROCESS = 16  # slices per step and GPU, in one pass: LiteMedSAM at 256 needs a few GB for that
CUDA_SMALL_MEMORY = 8 * 1024 ** 3  # below this, half the batch
# SAM ViT bases at their native 1024 input cost about 16x LiteMedSAM's activations per slice
LARGE_INPUT = 512


def batch_size_for(device_type: str, world: int = 1, memory_bytes=None, image_size: int = 256) -> int:
    """Slices per optimizer step over all processes when --batch-size is not given: a larger batch on CUDA, where
    one pass over many slices is cheap, and a small one on a CPU, where every slice costs its full time."""
    if device_type != "cuda":
        return max(CPU_BATCH, world)
    per_process = CUDA_BATCH_PER_PROCESS
    if memory_bytes is not None and memory_bytes < CUDA_SMALL_MEMORY:
        per_process //= 2
    if image_size > LARGE_INPUT:
        per_process = max(1, per_process // 8)
    return per_process * world


def micro_batch_for(device_type: str, batch_size: int) -> int:
    """Slices per forward/backward pass: one on a CPU (TinyViT's activations stay in cache; see
    trainer._accumulate_gradients), the whole batch on a GPU."""
    return 1 if device_type == "cpu" else batch_size


def has_rare_label(present: np.ndarray, scored: np.ndarray) -> bool:
    """Whether any label is present on fewer than RARE_LABEL_SHARE of the training slices annotated for it.
    `present` and `scored` are (slices, labels) booleans as in a SliceBank."""
    present = np.asarray(present, bool)
    scored = np.asarray(scored, bool)
    annotated = scored.sum(0)
    share = (present & scored).sum(0) / np.maximum(annotated, 1)
    return bool(np.any((annotated > 0) & (share < RARE_LABEL_SHARE)))
