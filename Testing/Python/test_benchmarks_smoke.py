"""The benchmark scripts run end to end on the small test bases (so they cannot rot), print their table and write
their section of a benchmarks markdown file, replacing it on a second run rather than appending."""

import os
import subprocess
import sys

import pytest

from conftest import REPO

BENCHMARKS = REPO / "benchmarks"


def _run(script, *args, docs):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, str(BENCHMARKS / script), "--threads", "1", "--repeats", "1",
                             "--docs", str(docs), *args], capture_output=True, text=True, env=env, timeout=600,
                            cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def _section(docs, name):
    text = docs.read_text()
    start, end = f"<!-- benchmark:{name} -->", f"<!-- /benchmark:{name} -->"
    assert text.count(start) == 1 and text.count(end) == 1, "one section per benchmark, replaced on each run"
    body = text[text.index(start):text.index(end)]
    assert "Command: `python benchmarks/" in body and "Machine: " in body and "Date: " in body
    return body


def test_encoder_benchmark_on_test_bases(tmp_path):
    docs = tmp_path / "benchmarks.md"
    old_run = "<!-- benchmark:encoder -->\nan old run\n<!-- /benchmark:encoder -->\n"
    docs.write_text("# Benchmarks\n\nKept text.\n\n" + old_run)
    output = _run("bench_encoder.py", "--bases", "test-tinyvit", "test-vit", "--skip-load", docs=docs)
    body = _section(docs, "encoder")
    assert "Kept text." in docs.read_text() and "an old run" not in docs.read_text()
    for row in ("plain pretrained encoder (baseline)", "S-SAM merged, float32 (segment --precision float32)",
                "W' rebuilt every forward (reference code)", "bf16 autocast"):
        assert row in output and row in body
    assert "test-tinyvit: FastTinyViT" in body


@pytest.mark.slow
@pytest.mark.data
def test_segment_and_training_benchmarks_on_real_ct(data_dir, tmp_path):
    docs = tmp_path / "benchmarks.md"
    ct = data_dir / "totalsegmentator-ct"
    output = _run("bench_segment.py", "--base", "test-tinyvit", "--slices", "1", "--image",
                  str(ct / "example_ct_sm.nii.gz"), docs=docs)
    body = _section(docs, "segment")
    assert "product: segment_image" in body and "naive: reference-code loop" in body
    assert "GFLOP per 256x256 slice" in output and "share of matmul peak" in output

    output = _run("bench_training.py", "--base", "test-tinyvit", "--batch", "2", "--micro", "1", "2",
                  "--skip-layers", "--ct-folder", str(ct), docs=docs)
    body = _section(docs, "training")
    _section(docs, "segment")  # the other benchmark's section is kept
    for row in ("S-SAM, micro-batch 1", "norms-only, micro-batch 2"):
        assert row in output and row in body
    assert "samples / s" in body


@pytest.mark.slow
@pytest.mark.data
def test_volume_context_measurement_on_the_three_slice_ct(data_dir, tmp_path):
    docs = tmp_path / "benchmarks.md"
    output = _run("measure_volume_context.py", str(data_dir), "--cases", "dcmqi", docs=docs)
    body = _section(docs, "volume-context")
    assert "slices alone" in body and "default: " in body and "dcmqi (manual liver): liver" in output


def _ct_folder(root, cases, labels):
    """An nnU-Net folder of small synthetic CTs (test_datasets.synthetic_ct) named like the ones
    scripts/build_default_training_data.py lays out."""
    import json

    from test_datasets import synthetic_ct, to_image, write

    for index, case_id in enumerate(cases):
        ct, labelmap = synthetic_ct(index)
        write(to_image(ct), root / "imagesTr" / f"{case_id}_0000.nii.gz")
        labelmap[labelmap >= len(labels)] = 0  # the values the folder does not annotate
        write(to_image(labelmap), root / "labelsTr" / f"{case_id}.nii.gz")
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": labels,
                                                   "numTraining": len(cases), "file_ending": ".nii.gz"}))


@pytest.mark.slow  # two short trainings
def test_context_measurement_on_synthetic_ct(tmp_path):
    data = tmp_path / "dd"
    organs = {"background": 0, "liver": 1, "spleen": 2, "kidney": 3}
    _ct_folder(data / "ct-mr", ["ct", "mr"], organs)
    _ct_folder(data / "val-ct", ["ct_dicom"], organs)
    _ct_folder(data / "val-dcmqi", ["dcmqi"], {"background": 0, "liver": 1})
    docs = tmp_path / "benchmarks.md"
    output = _run("measure_context.py", str(data), "--work", str(tmp_path / "work"), "--base", "test-vit",
                  "--budget", "5", "--max-steps", "2", docs=docs)
    body = _section(docs, "context")
    for row in ("| single slice |", "| neighbour slices (--neighbour-slices) |"):
        assert row in body
    assert "val-ct: kidney" in body and "val-dcmqi: liver" in body and "val-dcmqi: spleen" not in body
    assert "val-dcmqi/dcmqi neighbour slices (--neighbour-slices): liver" in output
    from SSAMSegmentLib.model.adapter import read_metadata

    assert read_metadata(tmp_path / "work" / "context.adapter.safetensors")["neighbour_slices"] is True
    assert read_metadata(tmp_path / "work" / "single.adapter.safetensors")["neighbour_slices"] is False
