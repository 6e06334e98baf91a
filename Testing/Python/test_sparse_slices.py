"""Sparse slices (SSAMSegmentLib/inference/sparse_slices.py): probe, then encode densely only near what was found;
on the real CT the masks are those of the dense pass."""

import numpy as np
import pytest
import SimpleITK as sitk

import SSAMSegmentLib
from SSAMSegmentLib.inference.slice_inference import segment_image
from SSAMSegmentLib.inference.sparse_slices import SliceSchedule


def _run(schedule, present):
    """Drive a schedule as the slice loop does, with `present[i]` what 'segmenting' slice i finds."""
    for indices in schedule:
        schedule.found.update(i for i in indices if present[i])
    return schedule


def _occupancy(rng, slices, step):
    """Random structures along the slice axis, each at least `step` slices long (the schedule's guarantee)."""
    present = np.zeros(slices, dtype=bool)
    for _ in range(rng.integers(0, 4)):
        length = min(slices, int(rng.integers(step, max(step, slices // 2) + 1)))
        start = int(rng.integers(0, slices - length + 1))
        present[start:start + length] = True
    return present


def test_every_structure_longer_than_the_probe_spacing_is_encoded_on_every_slice():
    rng = np.random.default_rng(0)
    for _ in range(300):
        slices = int(rng.integers(3, 400))
        spacing = float(rng.choice([0.6, 1.0, 1.25, 2.5, 3.0, 5.0]))
        schedule = SliceSchedule(slices, spacing, probe_mm=10.0)
        present = _occupancy(rng, slices, schedule.step)
        _run(schedule, present)
        missed = np.flatnonzero(present & ~np.isin(np.arange(slices), sorted(schedule.encoded)))
        assert missed.size == 0, (slices, spacing, missed)
        if not present.any():
            assert schedule.encoded == set(schedule.probes)  # an empty volume costs only its probes


def test_work_saved_and_limits():
    schedule = _run(SliceSchedule(300, 1.12, 10.0), np.r_[np.zeros(100, bool), np.ones(60, bool), np.zeros(140, bool)])
    assert schedule.step == 8
    assert set(range(100, 160)) <= schedule.encoded
    assert len(schedule.encoded) <= len(schedule.probes) + 60 + 2 * schedule.step
    assert schedule.skipped == 300 - len(schedule.encoded) > 150
    # every slice: no probe spacing, thin volumes, a 2D image
    for args in [(300, 1.12, None), (300, 1.12, 0), (2, 1.0, 10.0), (1, 0.0, 10.0)]:
        schedule = _run(SliceSchedule(*args), np.zeros(args[0], bool))
        assert schedule.dense and schedule.skipped == 0
    assert SliceSchedule(50, 20.0, 10.0).step == 2  # coarser slices than the probe spacing: every other slice


@pytest.mark.slow
@pytest.mark.data
@pytest.mark.xfail(strict=True, reason="no default adapter since 2026-12-02 gives a local answer on this CT, so nothing "
                   "is skipped: with the 2026-12-02 one nucleus, gland and polyp (false positives) are on all 56 "
                   "slices; with the 2026-12-03 one kidney, lung and nucleus are empty on all 56, and the liver, "
                   "whose kept mask ends within the CT, leaves specks on every probe that keep-largest removes only "
                   "after the slice loop. Strict: remove once an adapter gives a local answer here")
def test_sparse_pass_gives_the_dense_masks_on_the_real_ct(data_dir):
    """The shipped adapter on the upper half of the real CT (upper abdomen to lower chest), labels that are local
    there: the same masks as encoding every slice, from fewer encoded slices. (Liver and spleen are not used: this
    adapter's masks of them reach nearly every slice of this CT, so nothing could be skipped; docs/benchmarks.md.
    Kidney and lung come out empty here; "nucleus" is the one local output this adapter gives on this CT, a false
    positive on 8 of the 56 slices, and serves as the local structure whose slices probing must not miss.)"""
    ct = sitk.ReadImage(str(data_dir / "totalsegmentator-ct" / "example_ct.nii.gz"))
    part = ct[:, :, 56:112]  # 56 slices of 3 mm
    model = SSAMSegmentLib.load(adapter="default", device="cpu", merge=True)
    labels = ["kidney", "lung", "nucleus"]
    dense = segment_image(model, part, labels, axis="axial", probe_mm=None)
    sparse = segment_image(model, part, labels, axis="axial")
    assert sparse.skipped_slices > dense.skipped_slices, "nothing was skipped: the comparison would prove nothing"
    for label in labels:
        np.testing.assert_array_equal(sitk.GetArrayViewFromImage(sparse.masks[label]),
                                      sitk.GetArrayViewFromImage(dense.masks[label]), err_msg=label)
    assert any(sitk.GetArrayViewFromImage(dense.masks[label]).any() for label in labels), \
        "some label is found, or the masks compared are all empty"
