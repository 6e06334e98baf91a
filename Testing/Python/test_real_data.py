"""End to end on real images: train a LiteMedSAM adapter for a few steps on part of a real CT, segment the rest with
`ssam segment`, and check the output against the reference label map's geometry and the shipped default adapter."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

import SSAMSegmentLib
from SSAMSegmentLib import TrainingConfig, train
from SSAMSegmentLib.files.image_io import same_geometry
from SSAMSegmentLib.files.seg_nrrd import read_seg_nrrd

from conftest import REPO

pytestmark = [pytest.mark.data, pytest.mark.slow]


def _liver_dataset(folder, image, labels):
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    sitk.WriteImage(image, str(folder / "imagesTr" / "ct_0000.nii.gz"))
    sitk.WriteImage(labels, str(folder / "labelsTr" / "ct.nii.gz"))
    (folder / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1},
                                                     "numTraining": 1, "file_ending": ".nii.gz"}))
    return folder


def test_train_on_part_of_a_real_ct_then_segment_the_rest(data_dir, tmp_path):
    folder = data_dir / "totalsegmentator-ct"
    names = json.loads((folder / "labels.json").read_text())["total"]
    liver_value = int(next(value for value, name in names.items() if name == "liver"))
    image = sitk.ReadImage(str(folder / "example_ct_sm.nii.gz"))
    seg = sitk.ReadImage(str(folder / "example_seg.nii.gz"))
    liver = sitk.Cast(seg == liver_value, sitk.sitkUInt8)
    # Slices 12.. train, slices 0..11 are segmented: the geometry of that part is a cropped grid with its own origin.
    dataset = _liver_dataset(tmp_path / "train", image[:, :, 12:], liver[:, :, 12:])
    rest = image[:, :, :12]
    sitk.WriteImage(rest, str(tmp_path / "rest.nii.gz"))
    result = train(TrainingConfig(data=str(dataset), output=str(tmp_path / "liver.adapter.safetensors"),
                                  base="litemedsam", max_steps=2, batch_size=2, val_fraction=0.0, lr=1e-3))
    assert result.steps == 2

    out = tmp_path / "rest.seg.nrrd"
    run = subprocess.run([sys.executable, "-m", "SSAMSegmentLib.cli", "segment", str(tmp_path / "rest.nii.gz"),
                          "--label", "liver", "--adapter", str(result.adapter_path), "--output", str(out)],
                         capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=900)
    assert run.returncode == 0, run.stderr
    masks, _ = read_seg_nrrd(out)
    reference = liver[:, :, :12]
    mask = masks["liver"]
    assert mask.GetSize() == reference.GetSize()
    assert same_geometry(mask, reference, tolerance=1e-6)
    assert mask.GetOrigin() == pytest.approx(reference.GetOrigin(), abs=1e-6)
    assert mask.GetDirection() == pytest.approx(reference.GetDirection(), abs=1e-9)


def test_default_adapter_finds_the_liver_on_an_unseen_ct(data_dir):
    """The shipped adapter on the dcmqi CT with its manual liver outline (validation data, never trained on)."""
    from SSAMSegmentLib.files.image_io import read_image

    model = SSAMSegmentLib.load(adapter="default", merge=True)
    image = read_image(data_dir / "dcmqi-ct-3slice")
    reference = sitk.GetArrayFromImage(sitk.ReadImage(str(data_dir / "dcmqi-ct-3slice" / "liver_seg.nrrd"))) > 0
    result = model.segment(image, ["liver", "polyp"])
    predicted = sitk.GetArrayViewFromImage(result.masks["liver"]).astype(bool)
    dice = 2 * (predicted & reference).sum() / (predicted.sum() + reference.sum())
    assert dice > 0.6, dice
    # A colonoscopy label on a CT: the answer is (nearly) nothing.
    assert sitk.GetArrayViewFromImage(result.masks["polyp"]).sum() < 0.01 * reference.sum()
    assert np.array_equal(sitk.GetArrayViewFromImage(result.masks["liver"]).shape, reference.shape)
