"""The default recipe's decisions without training: warm-up and cosine values, the budget's total, validation
points, early stopping, the batch per device, rare labels, and the parameter groups with their rates."""

import math

import numpy as np
import pytest
import torch

import SSAMSegmentLib
from SSAMSegmentLib import TrainingConfig
from SSAMSegmentLib.training import recipe
from SSAMSegmentLib.training.schedule import (WarmupCosine, apply_learning_rates, is_validation_step,
                                              should_stop_early, stale_validations, steps_within_budget,
                                              validation_interval, validations_left)
from SSAMSegmentLib.training.trainer import _parameter_groups, _planned_steps


def test_warmup_then_cosine_values_at_given_steps():
    schedule = WarmupCosine.for_total(400)
    assert schedule.warmup == 20  # 5% of the steps
    assert schedule.factor(0) == pytest.approx(1 / 20)  # the first step already moves
    assert schedule.factor(9) == pytest.approx(10 / 20)
    assert schedule.factor(19) == pytest.approx(1.0)
    assert schedule.factor(20) == pytest.approx(1.0)  # the peak, then cosine decay over the other 380 steps
    assert schedule.factor(20 + 190) == pytest.approx(0.5)
    assert schedule.factor(20 + 95) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert schedule.factor(399) == pytest.approx(0.5 * (1 + math.cos(math.pi * 379 / 380)))
    assert schedule.factor(399) < 1e-4
    values = [schedule.factor(step) for step in range(400)]
    assert values[:20] == sorted(values[:20]) and values[20:] == sorted(values[20:], reverse=True)
    assert WarmupCosine.for_total(1) == WarmupCosine(1, 0) and WarmupCosine(1, 0).factor(0) == 1.0


def test_each_parameter_group_gets_its_own_scheduled_rate():
    model = SSAMSegmentLib.load(base="test-vit", image_size=64)
    config = TrainingConfig(data=None)  # the defaults
    groups = _parameter_groups(model, config)
    assert [(g["name"], g["peak_lr"]) for g in groups] == [("rest", 1e-3), ("singular values", 1e-4)]
    names = model.trainable_names()
    by_parameter = {id(p): names[n] for n, p in model.named_parameters() if n in names}
    assert {by_parameter[id(p)] for p in groups[1]["params"]} == {"singular values"}
    assert "singular values" not in {by_parameter[id(p)] for p in groups[0]["params"]}
    assert sum(len(g["params"]) for g in groups) == len(list(model.trainable_parameters()))
    optimizer = torch.optim.AdamW(groups, lr=config.lr)
    apply_learning_rates(optimizer, WarmupCosine(100, 10), 4)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([1e-3 * 0.5, 1e-4 * 0.5])
    one_rate = _parameter_groups(model, TrainingConfig(data=None, lr=3e-4, lr_singular_values=None))
    assert [g["peak_lr"] for g in one_rate] == [3e-4, 3e-4]


def test_schedule_length_from_steps_epochs_or_the_default():
    assert _planned_steps(TrainingConfig(data=None), steps_per_epoch=4) == recipe.DEFAULT_STEPS
    assert _planned_steps(TrainingConfig(data=None), steps_per_epoch=125) == recipe.DEFAULT_STEPS  # any size
    assert _planned_steps(TrainingConfig(data=None, steps=50), steps_per_epoch=4) == 50
    assert _planned_steps(TrainingConfig(data=None, epochs=3), steps_per_epoch=4) == 12
    assert _planned_steps(TrainingConfig(data=None, epochs=3, max_steps=5), steps_per_epoch=4) == 5


def test_budget_gives_the_steps_that_end_in_time():
    # 10 min, 60 s already spent preparing, 2 s a step, validations of 6 s (ten of them): (600-60-60)/2 = 240
    assert steps_within_budget(600, 60, 3, 2.0, 6.0) == 3 + 240
    assert steps_within_budget(600, 60, 3, 2.5, 6.0) == 3 + 192
    assert steps_within_budget(60, 100, 3, 2.0, 6.0) == 3  # already over: the run ends where it is
    assert steps_within_budget(600, 0, 0, 0.0, 0.0) == 0


def test_validation_points_are_tenths_of_the_schedule_and_the_end():
    assert validation_interval(400) == 40 and validation_interval(7) == 1 and validation_interval(25) == 3
    points = [step for step in range(1, 26) if is_validation_step(step, 25)]
    assert points == [3, 6, 9, 12, 15, 18, 21, 24, 25]
    for total in (7, 25, 400):
        for done in range(total + 1):
            assert validations_left(done, total) == sum(is_validation_step(s, total) for s in range(done + 1, total + 1))


def test_early_stopping_counts_non_improving_validations_after_warmup():
    def history(*scores, every=10):
        return [{"step": every * (i + 1), "val_dice": s} for i, s in enumerate(scores)]

    assert stale_validations(history(0.1, 0.3, 0.2, 0.25), warmup=0) == 2
    assert stale_validations(history(0.1, 0.3, 0.3), warmup=0) == 1  # equal is not better
    assert stale_validations(history(0.5, 0.2, 0.2), warmup=25) == 1  # the one at step 20 was in warm-up
    assert not should_stop_early(history(0.1, 0.3, 0.2, 0.25), warmup=0, patience=3)
    assert should_stop_early(history(0.1, 0.3, 0.2, 0.25, 0.29), warmup=0, patience=3)
    assert not should_stop_early(history(0.1, 0.3, 0.2, 0.25, 0.29), warmup=0, patience=0)  # 0: never
    assert stale_validations([{"step": 1, "val_dice": None}], warmup=0) == 0  # no validation set: nothing to judge


def test_early_stopping_waits_while_one_label_still_improves():
    def record(step, mean, **labels):
        return {"step": step, "val_dice": mean, "val_dice_per_label": labels}
    rising = [record(10, 0.40, liver=0.70, polyp=0.10), record(20, 0.38, liver=0.60, polyp=0.16),
              record(30, 0.37, liver=0.52, polyp=0.22), record(40, 0.36, liver=0.45, polyp=0.27)]
    assert stale_validations(rising, warmup=0) == 0  # the mean fell three times, but polyp kept rising
    flat = rising + [record(50, 0.35, liver=0.44, polyp=0.275), record(60, 0.34, liver=0.43, polyp=0.27)]
    assert stale_validations(flat, warmup=0) == 2  # +0.005 is not progress
    assert should_stop_early(flat, warmup=0, patience=2) and not should_stop_early(flat, warmup=0, patience=3)


def test_cuda_trains_a_larger_batch_than_the_cpu():
    assert recipe.batch_size_for("cpu") == 4 and recipe.batch_size_for("mps") == 4
    assert recipe.batch_size_for("cpu", world=8) == 8  # every process needs a slice
    assert recipe.batch_size_for("cuda", memory_bytes=80 << 30) == 16
    assert recipe.batch_size_for("cuda", world=2, memory_bytes=80 << 30) == 32
    assert recipe.batch_size_for("cuda", memory_bytes=6 << 30) == 8
    assert recipe.batch_size_for("cuda", memory_bytes=80 << 30, image_size=1024) == 2
    assert recipe.micro_batch_for("cpu", 4) == 1 and recipe.micro_batch_for("cuda", 16) == 16


def test_a_label_on_few_slices_is_rare():
    present = np.zeros((20, 2), bool)
    present[:, 0] = True
    present[:6, 1] = True  # 30% of the slices
    scored = np.ones((20, 2), bool)
    assert not recipe.has_rare_label(present, scored)
    present[5, 1] = False  # 25%
    assert not recipe.has_rare_label(present, scored)
    present[4, 1] = False  # 20%
    assert recipe.has_rare_label(present, scored)
    # Only the slices of datasets that annotate the label count: 4 of its 8 annotated slices is not rare.
    present[:, 1] = False
    present[:4, 1] = True
    scored[8:, 1] = False
    assert not recipe.has_rare_label(present, scored)
