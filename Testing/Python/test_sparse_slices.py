"""Sparse slices (SSAMSegmentLib/inference/sparse_slices.py): probe, then encode densely only near what was found;
on the real CT the masks are those of the dense pass."""

import numpy as np
import pytest
import SimpleITK as sitk

import SSAMSegmentLib
from SSAMSegmentLib.inference.slice_inference import segment_image
from SSAMSegmentLib.inference.slice_geometry import SliceGeometry
from SSAMSegmentLib.inference.sparse_slices import SliceSchedule
from SSAMSegmentLib.inference.volume_context import (BACKGROUND, DEFAULT_MIN_COMPONENT_ML, DEFAULT_SMOOTHING_MM,
                                                     LOGIT_SCALE, VolumeContext, kept_slices, logits_to_mask)

from helpers import grid_image


def _run(schedule, present):
    """Drive a one-label schedule as the slice loop does, with `present[i]` what 'segmenting' slice i finds."""
    for _ in schedule:
        schedule.found = [{i for i in schedule.decoded[0] if present[i]}]
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


def test_each_label_is_decoded_only_near_where_it_is_found():
    """Two labels in different places: each gap is decoded for the labels found at its ends only, so a label absent
    from a stretch costs no decoding there; a slice is encoded once per round whatever its labels."""
    present = [np.zeros(300, bool), np.zeros(300, bool)]
    present[0][100:160] = True
    present[1][200:230] = True
    schedule = SliceSchedule(300, 1.12, 10.0, label_count=2)
    for groups in schedule:
        for labels, indices in groups:
            assert labels and len(set(indices)) == len(indices)
        schedule.found = [{i for i in schedule.decoded[label] if present[label][i]} for label in range(2)]
    probes, step = set(schedule.probes), schedule.step
    for label, (first, end) in enumerate([(100, 160), (200, 230)]):
        assert set(range(first, end)) <= schedule.decoded[label]
        extra = schedule.decoded[label] - probes - set(range(first, end))
        assert extra <= set(range(first - step, end + step)), label  # at most a gap beyond each end
    assert not (schedule.decoded[1] - probes) & set(range(100, 160))  # label 1 never decoded on label 0's organ
    assert schedule.encoded == schedule.decoded[0] | schedule.decoded[1]


def _organ_with_specks(rng, slices=160, size=48):
    """Logits as the slice loop stores them (int8 tenths) of an organ (an ellipsoid over slices 60-119, 1 mm apart)
    and, on every slice, a few false-positive specks of 1-4 pixels away from it: what the default adapter does on a
    long CT."""
    z, y, x = np.mgrid[:slices, :size, :size]
    organ = ((z - 90) / 30.0) ** 2 + ((y - 30) / 12.0) ** 2 + ((x - 30) / 12.0) ** 2 < 1
    specks = np.zeros_like(organ)
    for index in range(slices):
        for _ in range(rng.integers(1, 4)):
            row, column, width = rng.integers(0, 10), rng.integers(0, size - 4), rng.integers(1, 3)
            specks[index, row:row + width, column:column + width] = True
    logits = np.where(organ | specks, 40, -40).astype(np.int8)
    logits += rng.integers(-20, 20, logits.shape).astype(np.int8)  # noise that never crosses the threshold
    return logits, organ


def _encode_as_the_slice_loop_does(dense, geometry, context, label):
    """The schedule driven as slice_logits drives it, each round's verdict from kept_slices on what was encoded; returns
    the logit volume the loop leaves (never-encoded slices at BACKGROUND) and the schedule."""
    schedule = SliceSchedule(geometry.num_slices, geometry.slice_spacing(), 10.0)
    volume = np.full_like(dense, BACKGROUND)
    for groups in schedule:
        for _, indices in groups:
            volume[indices] = dense[indices]
        schedule.found = [kept_slices(volume, geometry, schedule.decoded[0], 0.0, context, label)]
    return volume, schedule


@pytest.mark.parametrize("rule", ["keep-largest", "small pieces"])
def test_specks_on_every_probe_open_no_gap_and_the_kept_organ_is_followed_to_its_ends(rule):
    """The rounds judge probes by the rules the masks get (volume_context.kept_slices): specks the keep-largest or
    small-piece rule removes do not make the whole volume dense, and the masks equal those of every slice encoded."""
    dense, organ = _organ_with_specks(np.random.default_rng(1))
    geometry = SliceGeometry.for_image(grid_image(np.zeros(dense.shape, np.int16), (1.0, 1.0, 1.0), (0, 0, 0)),
                                       "axial")
    keep = frozenset({"organ"}) if rule == "keep-largest" else frozenset()
    context = VolumeContext(DEFAULT_SMOOTHING_MM, DEFAULT_MIN_COMPONENT_ML if rule == "small pieces" else 0.0, keep)
    expected = logits_to_mask(dense.copy(), geometry, 0.0, context, "organ").copy()
    assert expected[organ].mean() > 0.95 and not expected[:50].any()  # the rule removes every speck
    sparse, schedule = _encode_as_the_slice_loop_does(dense, geometry, context, "organ")
    np.testing.assert_array_equal(logits_to_mask(sparse, geometry, 0.0, context, "organ"), expected)
    assert set(range(60, 120)) <= schedule.encoded
    assert schedule.skipped >= 160 - 60 - 2 * 2 * schedule.step - len(schedule.probes)  # a gap more at each end
    # Judged on raw voxels (no component rules), the specks would make every slice dense.
    _, raw = _encode_as_the_slice_loop_does(dense, geometry, VolumeContext(), "organ")
    assert raw.skipped == 0


def test_kept_slices_stacks_the_probes_by_the_thickness_each_stands_for():
    """A piece of 100 mm^2 on one probe: on probes 10 mm apart it stands for 1 mL, on a slice 1 mm thick 0.1 mL; the
    small-piece rule (at its probe margin) keeps it or not accordingly."""
    volume = np.full((41, 20, 20), -50, np.int8)
    volume[20, 5:15, 5:15] = 5 * LOGIT_SCALE
    geometry = SliceGeometry.for_image(grid_image(np.zeros(volume.shape, np.int16), (1.0, 1.0, 1.0), (0, 0, 0)),
                                       "axial")
    probes = [0, 10, 20, 30, 40]
    assert kept_slices(volume, geometry, probes, 0.0, VolumeContext(min_component_ml=1.5), "x") == {20}
    assert kept_slices(volume, geometry, probes, 0.0, VolumeContext(min_component_ml=2.5), "x") == set()
    assert kept_slices(volume, geometry, range(41), 0.0, VolumeContext(min_component_ml=1.5), "x") == set()
    assert kept_slices(volume, geometry, probes, 0.0, VolumeContext(), "x") == {20}  # no rules: any voxel


@pytest.mark.slow
@pytest.mark.data
def test_sparse_pass_gives_the_dense_masks_on_the_real_ct(data_dir):
    """The shipped adapter on the lower 64 slices of the real CT (pelvis to the liver's lower half), the labels of
    `ssam segment`'s benchmark: the same masks as encoding every slice, from fewer encoded slices. The liver's mask
    reaches into the lower slices only as specks that keep-largest removes; the probes are judged after that rule
    (volume_context.kept_slices), so those slices are skipped."""
    ct = sitk.ReadImage(str(data_dir / "totalsegmentator-ct" / "example_ct.nii.gz"))
    part = ct[:, :, :64]  # 64 slices of 3 mm
    model = SSAMSegmentLib.load(adapter="default", device="cpu", merge=True)
    labels = ["liver", "spleen", "kidney"]
    dense = segment_image(model, part, labels, axis="axial", probe_mm=None)
    sparse = segment_image(model, part, labels, axis="axial")
    # 8 of 64 skipped with the routed adapter of 2026-12-06, whose CT network finds the kidneys here (the adapter
    # before found no kidney and skipped more)
    assert sparse.skipped_slices >= dense.skipped_slices + 5, "too little was skipped for the comparison to prove much"
    for label in labels:
        np.testing.assert_array_equal(sitk.GetArrayViewFromImage(sparse.masks[label]),
                                      sitk.GetArrayViewFromImage(dense.masks[label]), err_msg=label)
    assert sitk.GetArrayViewFromImage(dense.masks["liver"]).any(), "the liver is found, or the masks compared are empty"
