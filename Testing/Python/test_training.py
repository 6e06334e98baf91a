"""Fine-tuning: the loss, the optimised set, the step schedule, early stopping, budget, exact resume, cancellation,
micro-batches, DDP, and learning itself."""

import json
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
import SimpleITK as sitk
import torch

import SSAMSegmentLib
from SSAMSegmentLib import Cancelled, SSAMError, TrainingConfig, train
from SSAMSegmentLib.model.adapter import read_metadata
from SSAMSegmentLib.training.losses import focal_loss, soft_dice_loss
from SSAMSegmentLib.training.trainer import _accumulate_gradients, _balance_weights, _batch_tensors, load_checkpoint

from conftest import REPO


def write_disk_dataset(root, count=6, size=48, seed=0):
    """A 2D folder dataset: grey images with a bright disk ('disk') and sometimes a dark square ('square')."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    yy, xx = np.indices((size, size))
    for i in range(count):
        cy, cx, r = rng.integers(14, size - 14, 2).tolist() + [int(rng.integers(6, 11))]
        disk = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
        image = rng.normal(90, 12, (size, size))
        image[disk] += 90
        label = disk.astype(np.uint8)
        if i % 2:
            square = (abs(yy - (size - cy)) < 5) & (abs(xx - (size - cx)) < 5) & ~disk
            image[square] -= 60
            label[square] = 2
        sitk.WriteImage(sitk.GetImageFromArray(np.clip(image, 0, 255).astype(np.uint8)), str(root / "images" / f"c{i}.png"))
        sitk.WriteImage(sitk.GetImageFromArray(label), str(root / "masks" / f"c{i}.png"))
    (root / "labels.json").write_text(json.dumps({"1": "disk", "2": "square"}))
    return root


@pytest.fixture
def disks(tmp_path):
    return write_disk_dataset(tmp_path / "disks")


def _config(disks, tmp_path, **overrides):
    values = dict(data=str(disks), output=str(tmp_path / "out" / "disk.adapter.safetensors"), base="test-vit",
                  image_size=64, steps=4, batch_size=2, lr=1e-3, val_fraction=0.34, seed=3)
    if "epochs" in overrides:  # the schedule's length said the other way
        values.pop("steps")
    values.update(overrides)
    return TrainingConfig(**values)


def test_focal_loss_matches_its_formula_with_one_sigmoid():
    logits = torch.tensor([[2.0, -1.0, 0.5, -3.0]])
    target = torch.tensor([[1.0, 0.0, 0.0, 1.0]])
    p = torch.sigmoid(logits)
    expected = []
    for pi, ti in zip(p[0], target[0]):
        pt = pi if ti == 1 else 1 - pi
        alpha = 0.75 if ti == 1 else 0.25
        expected.append(-alpha * (1 - pt) ** 3 * torch.log(pt))
    torch.testing.assert_close(focal_loss(logits, target), torch.stack(expected).mean())
    # Dice: perfect confident prediction ~0 loss; an empty target pushes towards empty.
    assert soft_dice_loss(torch.full((1, 4), 20.0), torch.ones(1, 4)) < 1e-3
    assert soft_dice_loss(torch.full((1, 4), -20.0), torch.zeros(1, 4)) < 1e-3
    assert soft_dice_loss(torch.full((1, 4), 20.0), torch.zeros(1, 4)) > 0.7


def test_training_optimises_only_the_trainable_set_and_learns(disks, tmp_path):
    config = _config(disks, tmp_path, epochs=6, val_fraction=0.0, augment=False, lr=3e-2, lr_singular_values=1e-2)
    before = SSAMSegmentLib.load(base="test-vit", image_size=64)
    frozen_before = {n: p.detach().clone() for n, p in before.named_parameters() if not p.requires_grad}
    buffers_before = {n: b.clone() for n, b in before.named_buffers()}
    result = train(config)
    after = SSAMSegmentLib.load(adapter=result.adapter_path)
    for name, p in after.named_parameters():
        if name in frozen_before:
            assert torch.equal(p, frozen_before[name]), name
    for name, b in after.named_buffers():
        assert torch.equal(b, buffers_before[name]), name
    changed = [n for n, p in after.trainable_state().items() if not torch.equal(p, before.trainable_state()[n])]
    groups = {after.trainable_names()[n] for n in changed}
    assert groups == {"singular values", "norms", "positional embedding", "text affine layer", "decoder norms"}
    losses = [record["loss"] for record in result.history]  # mean training loss between validations
    third = len(losses) // 3
    assert np.mean(losses[-third:]) < np.mean(losses[:third]) * 0.95, losses  # it fits the data
    metadata = read_metadata(result.adapter_path)
    assert metadata["labels"] == ["disk", "square"]
    assert metadata["training"]["train_cases"] and metadata["training"]["layout"] == "folder2d"


def test_micro_batches_give_the_full_batch_gradient(disks, tmp_path):
    from SSAMSegmentLib.training.datasets import open_dataset
    from SSAMSegmentLib.training.slice_bank import build_slice_bank

    model = SSAMSegmentLib.load(base="test-vit", image_size=64)
    dataset = open_dataset(disks)
    bank = build_slice_bank(dataset.cases, dataset.label_names, 64)
    text = model.text_embeddings(dataset.label_names)
    inputs, targets = _batch_tensors(model, bank, [0, 1, 2, 3])
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    model.train()
    gradients = []
    for micro in (4, 1, 3):
        model.zero_grad()
        loss = _accumulate_gradients(model, inputs, targets, text, torch.device("cpu"), scaler, micro)
        gradients.append((loss, [p.grad.clone() for p in model.trainable_parameters()]))
    for loss, grads in gradients[1:]:
        assert loss == pytest.approx(gradients[0][0], rel=1e-5)
        for a, b in zip(grads, gradients[0][1]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_resume_continues_exactly(disks, tmp_path):
    straight = train(_config(disks, tmp_path / "a", steps=9))
    cancel = threading.Event()

    def stop_at_step_3(update):
        if update.step >= 3:
            cancel.set()

    with pytest.raises(Cancelled, match="resume with --resume"):
        train(_config(disks, tmp_path / "b", steps=9), progress=stop_at_step_3, cancel=cancel)
    config = _config(disks, tmp_path / "b", steps=9)
    resumed = train(TrainingConfig(**{**config.__dict__, "resume": str(config.checkpoint_path())}))
    _assert_same_run(resumed, straight)


def _assert_same_run(resumed, straight):
    assert resumed.steps == straight.steps
    a = SSAMSegmentLib.load(adapter=straight.adapter_path).trainable_state()
    b = SSAMSegmentLib.load(adapter=resumed.adapter_path).trainable_state()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-6, msg=name)
    assert [r["step"] for r in resumed.history] == [r["step"] for r in straight.history]
    assert [r["lr"] for r in resumed.history] == pytest.approx([r["lr"] for r in straight.history], rel=1e-12)
    assert [r["val_dice"] for r in resumed.history] == pytest.approx([r["val_dice"] for r in straight.history])


@pytest.mark.slow
def test_resume_after_a_kill_continues_the_schedule_exactly(disks, tmp_path):
    """A kill leaves the files of the last validation on disk: copy them then, as the killed process would have left
    them, and resume from them in their own folder. 20 steps validate every 2 (warm-up 1, cosine decay)."""
    import shutil

    config = _config(disks, tmp_path / "a", steps=20, patience=0)  # the whole schedule, no early stop
    killed = tmp_path / "killed" / "out"

    def kill_at_step_9(update):
        if update.step == 9 and update.phase == "train" and not killed.exists():
            shutil.copytree(config.checkpoint_path().parent, killed)  # as written after the validation at step 8

    straight = train(config, progress=kill_at_step_9)
    left_behind = killed / config.checkpoint_path().name
    model = SSAMSegmentLib.load(base="test-vit", image_size=64)
    state = load_checkpoint(left_behind, model, torch.optim.AdamW(model.trainable_parameters()))
    assert state["global_step"] == 8 and state["total_steps"] == 20
    resumed = train(_config(disks, tmp_path / "killed", steps=20, patience=0, resume=str(left_behind)))
    _assert_same_run(resumed, straight)
    lrs = [r["lr"] for r in straight.history]
    assert lrs[0] == pytest.approx(1e-3)  # the rate of step 2 of 20: the peak, after one warm-up step
    assert lrs[1] == pytest.approx(1e-3 * 0.5 * (1 + np.cos(np.pi * 2 / 19)))  # step 4: cosine decay over 19
    assert lrs == sorted(lrs, reverse=True) and lrs[-1] < 1e-5  # decayed to about zero at the end


def test_budget_total_is_fixed_once_and_kept_on_resume(disks, tmp_path, monkeypatch):
    from SSAMSegmentLib.training import trainer
    from SSAMSegmentLib.training.schedule import PROBE_STEPS

    fitted = []
    real = trainer.steps_within_budget

    def fit(*args):
        fitted.append(real(*args))
        return 7  # what this machine's timing allowed (made fixed so the test does not depend on the load)

    monkeypatch.setattr(trainer, "steps_within_budget", fit)
    cancel = threading.Event()
    updates = []

    def stop_after_the_probe(update):
        updates.append(update)
        if update.step >= PROBE_STEPS + 1:
            cancel.set()

    config = _config(disks, tmp_path, steps=None, budget_minutes=0.5)
    with pytest.raises(Cancelled):
        train(config, progress=stop_after_the_probe, cancel=cancel)
    # the real fit (the steps done at least), and its correction once the first validation's cost is measured
    assert len(fitted) == 2 and fitted[0] >= PROBE_STEPS
    train_updates = [u for u in updates if u.phase == "train"]
    assert train_updates[0].total_steps == 400 and train_updates[-1].total_steps == 7  # default until measured
    assert all(u.finish_time is not None and u.lr is not None for u in train_updates)
    monkeypatch.setattr(trainer, "steps_within_budget", lambda *args: 1000)  # a resumed run must not refit
    resumed = train(TrainingConfig(**{**config.__dict__, "resume": str(config.checkpoint_path())}))
    assert resumed.steps == 7 and resumed.summary["total_steps"] == 7


def test_budget_is_planned_again_once_with_the_first_validations_measured_cost(disks, tmp_path, monkeypatch):
    """The plan after PROBE_STEPS guesses what a validation costs; the first validation measured corrects the total
    once (a run with six validation sets ended after 30 of its 70 minutes on the guess)."""
    from SSAMSegmentLib.training import trainer
    from SSAMSegmentLib.training.schedule import PROBE_STEPS

    calls = []

    def fit(budget, elapsed, done, per_step, per_validation):
        calls.append((done, per_validation))
        return {1: 6, 2: 9}.get(len(calls), 1000)  # made fixed so the test does not depend on the load

    monkeypatch.setattr(trainer, "steps_within_budget", fit)
    updates = []
    result = train(_config(disks, tmp_path, steps=None, budget_minutes=0.5, patience=0), progress=updates.append)
    assert len(calls) == 2 and result.summary["total_steps"] == 9  # planned, corrected, then fixed
    assert calls[0][0] == calls[1][0] == PROBE_STEPS  # 6 steps validate after every step: the first at step 3
    plans = [u.message for u in updates if u.message.startswith("budget of")]
    assert len(plans) == 2 and "first validation" in plans[1] and "9 steps" in plans[1]
    assert [r["step"] for r in result.history] == list(range(PROBE_STEPS, 10))


def test_cancel_leaves_checkpoint_and_intact_adapter(disks, tmp_path):
    config = _config(disks, tmp_path, steps=10)  # a validation after every step
    cancel = threading.Event()

    def stop_at_step_4(update):
        if update.step == 4 and update.phase == "train":
            cancel.set()

    with pytest.raises(Cancelled, match="during validation"):
        train(config, progress=stop_at_step_4, cancel=cancel)
    adapter = tmp_path / "out" / "disk.adapter.safetensors"
    assert 1 <= read_metadata(adapter)["training"]["steps"] <= 3  # the best of steps 1-3, complete
    model = SSAMSegmentLib.load(base="test-vit", image_size=64)
    optimizer = torch.optim.AdamW(model.trainable_parameters())
    state = load_checkpoint(config.checkpoint_path(), model, optimizer)
    assert state["global_step"] == 4 and state["validation_due"]  # a resumed run validates step 4 first
    assert not [p for p in adapter.parent.iterdir() if ".part" in p.name]
    # An adapter is not a checkpoint, and a different run cannot be resumed from this checkpoint.
    with pytest.raises(SSAMError, match="not an SSAM training checkpoint"):
        load_checkpoint(adapter, model, optimizer)
    with pytest.raises(SSAMError, match="different fingerprint"):
        train(_config(disks, tmp_path, steps=10, lr=5e-4, resume=str(config.checkpoint_path())))


def test_eta_is_reported_and_max_steps_is_honoured(disks, tmp_path):
    updates = []
    result = train(_config(disks, tmp_path, epochs=5, max_steps=3), progress=updates.append)
    assert result.steps == 3
    steps = [u for u in updates if u.phase == "train"]
    assert steps[-1].step == 3 and steps[-1].total_steps == 3
    assert all(u.eta_seconds is not None and u.eta_seconds >= 0 for u in steps)
    assert all(u.finish_time >= u.eta_seconds for u in steps)  # a clock time, not a duration


def test_a_four_image_dataset_gets_the_configured_steps(tmp_path):
    four = write_disk_dataset(tmp_path / "four", count=4)
    result = train(_config(four, tmp_path, steps=5, val_fraction=0.0, patience=0))
    assert result.steps == 5 and result.summary["total_steps"] == 5  # 2 steps per pass: 2.5 passes
    by_epochs = train(_config(four, tmp_path / "e", epochs=2, val_fraction=0.0, patience=0))
    assert by_epochs.steps == 4  # the alternative: 2 passes of 2 steps


def test_early_stopping_after_patience_validations_without_improvement(disks, tmp_path):
    # Nothing learns at rate 0: the first validation stays the best. 20 steps validate every 2; warm-up is step 1.
    updates = []
    result = train(_config(disks, tmp_path, steps=20, lr=0.0, lr_singular_values=0.0, patience=2),
                   progress=updates.append)
    assert result.steps == 6 and [r["step"] for r in result.history] == [2, 4, 6]
    # One 'validated' event per validation with its result (what the Slicer panel's table shows), then 'done'
    validated = [u for u in updates if u.phase == "validated"]
    assert [(u.step, u.val_dice) for u in validated] == [(r["step"], r["val_dice"]) for r in result.history]
    # ... then the self-prompted box's trial on the validation slices, a plain message line
    assert validated[-1].eta_seconds == 0.0 and updates[-2].phase == "done" and updates[-1].phase == "prepare"
    assert "self-prompted box" in updates[-1].message
    assert result.summary["stopped_early"] and result.summary["steps"] == 2  # the kept adapter is the best one
    # Patience 9 runs out at the 10th validation, step 20: the last step, where the schedule ends anyway; that is
    # not reported as stopping early
    ends = train(_config(disks, tmp_path / "ends", steps=20, lr=0.0, lr_singular_values=0.0, patience=9))
    assert ends.steps == 20 and len(ends.history) == 10 and not ends.summary["stopped_early"]
    never = train(_config(disks, tmp_path / "never", steps=6, lr=0.0, lr_singular_values=0.0, patience=0))
    assert never.steps == 6 and len(never.history) == 6 and not never.summary["stopped_early"]


def test_rare_labels_switch_balanced_sampling_on(disks, tmp_path):
    result = train(_config(disks, tmp_path, steps=1))
    assert result.summary["balanced"] is False  # disk on every image, square on half: neither is rare
    forced = train(_config(disks, tmp_path / "f", steps=1, balanced=True))
    assert forced.summary["balanced"] is True


def test_a_finished_run_is_replaced_only_with_overwrite(disks, tmp_path):
    config = _config(disks, tmp_path, epochs=1, max_steps=1)
    first = train(config)
    files = sorted(first.adapter_path.parent.iterdir())
    before = {p: p.read_bytes() for p in files}
    with pytest.raises(SSAMError, match="disk.adapter.safetensors already exists; add --overwrite"):
        train(config)
    assert {p: p.read_bytes() for p in sorted(first.adapter_path.parent.iterdir())} == before
    again = train(TrainingConfig(**{**config.__dict__, "overwrite": True, "seed": 4}))
    assert again.adapter_path.read_bytes() != before[first.adapter_path]


def test_balanced_sampling_weights_rare_labels():
    from SSAMSegmentLib.training.slice_bank import SliceBank

    masks = np.zeros((10, 2, 4, 4), np.uint8)
    masks[:, 0, 0, 0] = 1  # label 0 everywhere
    masks[0, 1, 0, 0] = 1  # label 1 on one slice
    bank = SliceBank(np.zeros((10, 3, 4, 4), np.uint8), masks, np.full((10, 2), 4), np.zeros(10, int), ["x"], ["a", "b"],
                     np.ones((10, 2), bool))
    weights = _balance_weights(bank)
    assert weights[0] > 4 * weights[1]
    assert np.allclose(weights[1:], weights[1])


def test_labels_a_dataset_does_not_annotate_are_not_trained():
    """Two datasets: nuclei tiles (label "nucleus" only) and gland images (label "gland" only). The loss of a gland
    image must not depend on its "nucleus" logits (its nuclei are not marked), nor sampling count them as absent."""
    from SSAMSegmentLib.training.losses import ssam_loss
    from SSAMSegmentLib.training.slice_bank import SliceBank

    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 2, 8, 8, generator=generator, requires_grad=True)
    target = (torch.rand(2, 2, 8, 8, generator=generator) > 0.5).float()
    annotated = torch.tensor([[True, False], [False, True]])  # slice 0 annotates label 0 only, slice 1 label 1 only
    ssam_loss(logits, target, annotated).backward()
    assert logits.grad[0, 1].abs().max() == 0 and logits.grad[1, 0].abs().max() == 0
    assert logits.grad[0, 0].abs().max() > 0 and logits.grad[1, 1].abs().max() > 0
    changed = target.clone()
    changed[0, 1], changed[1, 0] = 1 - changed[0, 1], 1 - changed[1, 0]
    assert torch.equal(ssam_loss(logits, changed, annotated), ssam_loss(logits, target, annotated))
    assert not torch.equal(ssam_loss(logits, changed), ssam_loss(logits, target))  # without the mask it would differ
    full = torch.ones(2, 2, dtype=torch.bool)
    torch.testing.assert_close(ssam_loss(logits, target, full), ssam_loss(logits, target))

    masks = np.zeros((6, 2, 4, 4), np.uint8)
    masks[:3, 0, 0, 0] = 1  # slices 0-2: nuclei dataset, nucleus on each
    masks[3, 1, 0, 0] = 1  # slices 3-5: gland dataset, gland on one
    scored = np.array([[True, False]] * 3 + [[False, True]] * 3)
    bank = SliceBank(np.zeros((6, 3, 4, 4), np.uint8), masks, np.full((6, 2), 4), np.zeros(6, int), ["x"],
                     ["nucleus", "gland"], scored)
    weights = _balance_weights(bank)
    # gland: present on 1 of its 3 annotated slices, so that slice weighs as much as the other two together; the
    # nuclei slices are not "gland absent" examples.
    assert np.isclose(weights[3], weights[4] + weights[5])
    assert np.allclose(weights[:3], weights[0])


def test_only_annotated_pairs_are_decoded_and_they_match_the_full_decode():
    from SSAMSegmentLib.training.trainer import _logits_for

    model = SSAMSegmentLib.load(base="test-vit", image_size=64)
    model.eval()
    inputs = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    text = model.text_embeddings(["liver", "polyp", "gland"])
    annotated = torch.tensor([[True, False, False], [False, True, True], [True, True, True]])
    with torch.no_grad():
        full = _logits_for(model, inputs, text, 3)
        some = _logits_for(model, inputs, text, 3, annotated)
    torch.testing.assert_close(some[annotated], full[annotated], rtol=1e-4, atol=1e-4)
    assert not some[~annotated].any()  # not decoded: zeros, and the loss leaves them out


def test_bad_dataset_fails_before_training(tmp_path):
    root = write_disk_dataset(tmp_path / "bad", count=3)
    (root / "masks" / "c1.png").unlink()
    (root / "images" / "extra.png").write_bytes(b"not a png")
    result = subprocess.run([sys.executable, "-m", "SSAMSegmentLib.cli", "train", str(root), "--output",
                             str(tmp_path / "x.safetensors"), "--base", "test-vit"],
                            capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=300)
    assert result.returncode == 2
    assert "2 problems" in result.stderr or "3 problems" in result.stderr, result.stderr
    assert "c1" in result.stderr and "extra" in result.stderr
    assert not (tmp_path / "x.safetensors").exists()


@pytest.mark.slow
def test_torchrun_two_cpu_processes_train_with_ddp(disks, tmp_path):
    output = tmp_path / "ddp.adapter.safetensors"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29517",
               "-m", "SSAMSegmentLib.cli", "train", str(disks), "--output", str(output), "--base", "test-vit",
               "--image-size", "64", "--epochs", "2", "--batch-size", "2", "--seed", "1"]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    metadata = read_metadata(output)
    assert metadata["training"]["steps"] >= 2
    # Each process took one slice of every batch of two: the steps are those of a batch of 2 on one process.
    single = train(_config(disks, tmp_path / "single", epochs=2, batch_size=2, seed=1, val_fraction=0.2))
    assert metadata["training"]["total_steps"] == single.summary["total_steps"]
    assert metadata["training"]["steps"] == single.steps


def test_sampling_counts_certain_absences_as_absent_examples():
    """A label only one kind of image annotates (polyp, present on every photograph) is sampled absent on the
    slices of another kind (CT) where it is trained as empty: balance needs them, or "polyp" is never seen absent."""
    from SSAMSegmentLib.training.slice_bank import SliceBank

    masks = np.zeros((6, 1, 4, 4), np.uint8)
    masks[:3, 0, 0, 0] = 1  # slices 0-2: photographs, a polyp on each; slices 3-5: CT slices
    scored = np.array([[True]] * 3 + [[False]] * 3)
    fields = (np.zeros((6, 3, 4, 4), np.uint8), masks, np.full((6, 2), 4), np.zeros(6, int), ["x"], ["polyp"], scored)
    weights = _balance_weights(SliceBank(*fields, np.ones((6, 1), bool)))  # CT certifies "no polyp"
    assert np.isclose(weights[3:].sum(), weights[:3].sum()), "polyp absent as often as present"
    assert not _balance_weights(SliceBank(*fields))[3:].any()  # annotated only: never an absent polyp


def test_training_can_start_from_an_adapter_and_keeps_its_labels(disks, tmp_path):
    first = train(_config(disks, tmp_path, labels=["disk"], keep_largest=["disk"]))
    start = SSAMSegmentLib.load(adapter=first.adapter_path).trainable_state()
    config = _config(disks, tmp_path, labels=["square"], start_from=str(first.adapter_path), steps=1, lr=1e-12,
                     lr_singular_values=1e-12, output=str(tmp_path / "second" / "square.adapter.safetensors"))
    second = train(config)
    metadata = read_metadata(second.adapter_path)
    assert set(metadata["labels"]) == {"disk", "square"}
    assert metadata["keep_largest"] == ["disk"]  # the start adapter's, as this run names none
    record = metadata["training"]["start_from"]
    assert record["file"] == first.adapter_path.name and len(record["sha256"]) == 64
    after = SSAMSegmentLib.load(adapter=second.adapter_path).trainable_state()
    fresh = SSAMSegmentLib.load(base="test-vit", image_size=64).trainable_state()
    moved = [n for n in start if "text" not in n and not torch.allclose(after[n], start[n], atol=1e-6)]
    assert not moved, moved  # a negligible step from the start adapter, not from the base
    assert any(not torch.allclose(start[n], fresh[n]) for n in start)
    with pytest.raises(SSAMError, match="no such adapter"):
        _config(disks, tmp_path, start_from=str(tmp_path / "missing.adapter.safetensors")).check()
    before = first.adapter_path.read_bytes()
    with pytest.raises(SSAMError, match="is also the --output"):  # refused before any work, the input untouched
        train(_config(disks, tmp_path, start_from=str(first.adapter_path), output=str(first.adapter_path),
                      overwrite=True))
    assert first.adapter_path.read_bytes() == before


def test_each_dataset_holds_an_equal_share_of_a_labels_absent_examples():
    """CT liver is certainly absent on 20 photographs of one set and 2 of another: the liver's absent examples are
    shared equally by those two sets and the CT's own empty slices, however many images each has."""
    from SSAMSegmentLib.training.slice_bank import SliceBank

    count = 4 + 20 + 2
    masks = np.zeros((count, 1, 4, 4), np.uint8)
    masks[:2, 0, 0, 0] = 1  # CT: liver on 2 of 4 slices
    case_index = np.arange(count)
    sources = ["ct"] * 4 + ["polyp"] * 20 + ["gland"] * 2
    bank = SliceBank(np.zeros((count, 3, 4, 4), np.uint8), masks, np.full((count, 2), 4), case_index,
                     [f"c{i}" for i in range(count)], ["liver"], np.array([[True]] * 4 + [[False]] * 22),
                     np.ones((count, 1), bool), sources)
    weights = _balance_weights(bank)
    assert np.isclose(weights[:2].sum(), 1.0)  # present: as much as absent
    for rows in (slice(2, 4), slice(4, 24), slice(24, 26)):  # absent: CT's own empty slices, polyp, gland
        assert np.isclose(weights[rows].sum(), 1 / 3)


def _as_colour(root):
    """The dataset at `root` with its images turned to RGB (the masks unchanged): another kind of image."""
    for path in (root / "images").iterdir():
        grey = sitk.ReadImage(str(path))
        sitk.WriteImage(sitk.Compose([grey] * 3), str(path))
    return root


def test_the_adapter_records_the_kinds_of_image_each_label_was_taught_on(disks, tmp_path):
    """What segmenting compares an image with (model/labels.py other_kind): 2D grey disks, then a run started from
    that adapter on colour images joins its kinds; a label taught before without a record keeps none."""
    from SSAMSegmentLib.training.datasets import open_dataset
    from SSAMSegmentLib.training.trainer import taught_kinds

    first = train(_config(disks, tmp_path, labels=["disk"], steps=1))
    assert read_metadata(first.adapter_path)["image_kinds"] == {"disk": ["2D"]}
    colour = _as_colour(write_disk_dataset(tmp_path / "colour", seed=1))
    second = train(_config(colour, tmp_path, start_from=str(first.adapter_path), steps=1,
                           output=str(tmp_path / "second" / "both.adapter.safetensors")))
    assert read_metadata(second.adapter_path)["image_kinds"] == {"disk": ["2D", "2D RGB"], "square": ["2D RGB"]}
    assert SSAMSegmentLib.load(adapter=second.adapter_path).label_kinds == {"disk": ["2D", "2D RGB"],
                                                                          "square": ["2D RGB"]}
    older = SSAMSegmentLib.load(adapter=first.adapter_path)
    older.label_kinds = {}  # as an adapter saved before the record existed
    assert taught_kinds(older, open_dataset(colour)) == {"square": ["2D RGB"]}


def test_a_run_from_an_adapter_keeps_the_tiles_of_the_labels_it_does_not_train(disks, tmp_path):
    """The start adapter's tile record for 'disk' (the scale it learnt 'disk' at) survives a run that trains only
    'square'; a run that trains 'disk' again plans it from its own data (these 48-pixel images: no tiles)."""
    from SSAMSegmentLib.inference.tiling import TileRecord

    first = SSAMSegmentLib.load(adapter=train(_config(disks, tmp_path, labels=["disk"], steps=1)).adapter_path)
    first.tile_records = {"disk": TileRecord(32, 8)}
    start = first.save_adapter(tmp_path / "tiled.adapter.safetensors")
    kept = train(_config(disks, tmp_path, labels=["square"], start_from=str(start), steps=1,
                         output=str(tmp_path / "kept" / "square.adapter.safetensors")))
    assert read_metadata(kept.adapter_path)["tiles"] == {"disk": {"tile": 32, "overlap": 8}}
    again = train(_config(disks, tmp_path, start_from=str(start), steps=1,
                          output=str(tmp_path / "again" / "both.adapter.safetensors")))
    assert read_metadata(again.adapter_path)["tiles"] == {}
