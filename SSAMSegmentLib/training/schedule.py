"""The training schedule in optimizer steps: linear warm-up then cosine decay, how many steps a time budget allows,
when to validate, and when validation has stopped improving.

Every value is a pure function of the step and of numbers stored in the checkpoint (total and warm-up steps), so a
resumed run continues with exactly the learning rate it would have had without the interruption.
"""

import dataclasses
import math
from typing import Optional, Sequence

WARMUP_SHARE = 0.05  # of the total steps: enough for AdamW's moment estimates to settle before the peak rate
VALIDATIONS_PER_RUN = 10  # validation every tenth of the schedule (and at its end)
PROBE_STEPS = 3  # steps timed before a --budget fixes the total


@dataclasses.dataclass(frozen=True)
class WarmupCosine:
    """Learning-rate factor of optimizer step `step` (0-based: the step about to be taken) of `total` steps."""

    total: int
    warmup: int

    @classmethod
    def for_total(cls, total: int) -> "WarmupCosine":
        total = max(1, int(total))
        return cls(total, max(1, round(WARMUP_SHARE * total)) if total > 1 else 0)

    def factor(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup  # the first step already moves: no wasted step at rate 0
        decay = max(1, self.total - self.warmup)
        progress = min(1.0, (step - self.warmup) / decay)
        return 0.5 * (1.0 + math.cos(math.pi * progress))


def apply_learning_rates(optimizer, schedule: WarmupCosine, step: int) -> None:
    """Set every parameter group's rate to its own peak rate ('peak_lr') times the schedule's factor."""
    factor = schedule.factor(step)
    for group in optimizer.param_groups:
        group["lr"] = group["peak_lr"] * factor


def validation_interval(total: int) -> int:
    return max(1, math.ceil(total / VALIDATIONS_PER_RUN))


def is_validation_step(step: int, total: int) -> bool:
    """After optimizer step `step` (1-based count of steps done): every interval, and always at the end."""
    return step >= total or step % validation_interval(total) == 0


def steps_within_budget(budget_seconds: float, elapsed_seconds: float, steps_done: int, seconds_per_step: float,
                        seconds_per_validation: float) -> int:
    """The total steps that end within the budget: those done plus what the time left allows once the schedule's
    validations are paid for. Never fewer than the steps done (a budget already spent ends the run there)."""
    left = budget_seconds - elapsed_seconds - VALIDATIONS_PER_RUN * seconds_per_validation
    if seconds_per_step <= 0:
        return steps_done
    return steps_done + max(0, math.floor(left / seconds_per_step))


LABEL_PROGRESS = 0.01  # a label's validation Dice this much above its own best counts as progress


def stale_validations(history: Sequence[dict], warmup: int) -> int:
    """How many validations after warm-up have come since the last that made progress (0 when the last did).
    Progress: a better mean validation Dice, or one label above its own best by LABEL_PROGRESS: with several labels
    the mean can stall while one label still learns (the mixed default-adapter run stopped on the mean while polyp
    and nucleus were rising; docs/fine_tuning.md)."""
    scored = [(index, record) for index, record in enumerate(history) if record.get("val_dice") is not None]
    if not scored:
        return 0
    best_mean, best_label, last_progress = None, {}, scored[0][0]
    for index, record in scored:
        progress = best_mean is None or record["val_dice"] > best_mean
        for label, dice in (record.get("val_dice_per_label") or {}).items():
            if dice is None:
                continue
            if label in best_label and dice >= best_label[label] + LABEL_PROGRESS:
                progress = True
            best_label[label] = max(dice, best_label.get(label, dice))
        if progress:
            last_progress = index
        best_mean = record["val_dice"] if best_mean is None else max(best_mean, record["val_dice"])
    return sum(1 for index, record in scored if index > last_progress and record["step"] > warmup)


def should_stop_early(history: Sequence[dict], warmup: int, patience: Optional[int]) -> bool:
    return bool(patience) and stale_validations(history, warmup) >= patience


def validations_left(steps_done: int, total: int) -> int:
    """Validations still to come after `steps_done` steps of `total` (for the expected finish time)."""
    if steps_done >= total:
        return 0
    interval = validation_interval(total)
    return total // interval - steps_done // interval + (1 if total % interval else 0)
