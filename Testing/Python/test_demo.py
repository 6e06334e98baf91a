"""`ssam demo`: fetching its nuclei image safely, and the whole demo on real images.

The demo's files come from the stardist wheel on PyPI; the shared data folder holds the same two files (same SHA256),
so these tests build their wheel-shaped archives and caches from it and need no network.
"""

import os
import re
import shutil
import subprocess
import sys
import zipfile

import pytest
import SimpleITK as sitk

from SSAMSegmentLib import demo
from SSAMSegmentLib.errors import SSAMError


@pytest.fixture()
def nuclei_dir(data_dir):
    return data_dir / "stardist-nuclei"


def _wheel(path, files):
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in files.items():
            archive.writestr(f"stardist/data/images/{name}", data)
    return path


def test_extract_checks_each_file_and_writes_both(tmp_path, nuclei_dir):
    files = {name: (nuclei_dir / name).read_bytes() for name in demo.NUCLEI_FILES}
    wheel = _wheel(tmp_path / "stardist-0.9.2-cp311-cp311-any.whl", files)
    demo._extract_nuclei_files(wheel, tmp_path / "out")
    for name, data in files.items():
        assert (tmp_path / "out" / name).read_bytes() == data
    assert not list((tmp_path / "out").glob("*.part"))


def test_extract_refuses_a_changed_file_and_writes_nothing(tmp_path, nuclei_dir):
    files = {name: (nuclei_dir / name).read_bytes() for name in demo.NUCLEI_FILES}
    files["mask2d.tif"] = files["mask2d.tif"][:-1] + b"\x01"
    wheel = _wheel(tmp_path / "stardist.whl", files)
    with pytest.raises(SSAMError, match="mask2d.tif .* unexpected SHA256"):
        demo._extract_nuclei_files(wheel, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_extract_refuses_a_file_that_is_not_a_wheel(tmp_path):
    bad = tmp_path / "stardist.whl"
    bad.write_bytes(b"<html>proxy error</html>")
    with pytest.raises(SSAMError, match="not a stardist wheel"):
        demo._extract_nuclei_files(bad, tmp_path / "out")


def test_cached_files_are_used_without_pip(tmp_path, nuclei_dir, monkeypatch):
    for name in demo.NUCLEI_FILES:
        shutil.copy(nuclei_dir / name, tmp_path / name)
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("pip must not run when the cache is valid"))
    assert demo.nuclei_files(tmp_path) == tuple(tmp_path / name for name in demo.NUCLEI_FILES)


def test_failed_download_says_why_in_one_line(tmp_path, monkeypatch):
    def pip_fails(command, **kwargs):
        assert command[:4] == [sys.executable, "-m", "pip", "download"] and demo.NUCLEI_WHEEL in command
        return subprocess.CompletedProcess(command, 1, "", "ERROR: No matching distribution found for stardist==0.9.2")

    monkeypatch.setattr(subprocess, "run", pip_fails)
    with pytest.raises(SSAMError) as error:
        demo.nuclei_files(tmp_path)
    message = str(error.value)
    assert "\n" not in message and "No matching distribution" in message and "check the network" in message
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_demo_segments_the_unseen_nuclei_tile_and_the_ct_slice(tmp_path, nuclei_dir):
    """The README's main job, as a user runs it: real images, the shipped default adapter, outputs Slicer opens."""
    cache = tmp_path / "cache"
    (cache / "demo").mkdir(parents=True)
    for name in demo.NUCLEI_FILES:  # what the first run fetches from PyPI
        shutil.copy(nuclei_dir / name, cache / "demo" / name)
    env = dict(os.environ, SSAM_CACHE_DIR=str(cache), HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, "-m", "SSAMSegmentLib.cli", "demo", "--output", str(tmp_path / "out")],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    dice = float(re.search(r"Dice (\d\.\d+) against the manual nucleus mask", done.stdout).group(1))
    assert dice >= 0.85, done.stdout  # measured 0.933 with the 2026-12-03 default adapter (0.726 with the one before)
    for stem, size in (("nuclei_tile", (256, 256)), ("CT_small", (128, 128))):
        assert (tmp_path / "out" / f"{stem}.preview.png").stat().st_size > 0
        segmentation = sitk.ReadImage(str(tmp_path / "out" / f"{stem}.seg.nrrd"))
        assert segmentation.GetSize()[:2] == size
    tile = sitk.ReadImage(str(tmp_path / "out" / "nuclei_tile.nrrd"))
    assert tile.GetSize() == (256, 256) and tile.GetPixelID() == sitk.sitkUInt16


def _offline(folder=None):
    raise SSAMError("could not download the demo's nuclei image (stardist==0.9.2 from PyPI): no network")


def test_demo_without_glas_or_the_nuclei_image_still_segments_the_ct_slice(tmp_path, monkeypatch, capsys):
    """Offline (no PyPI) and without the GlaS folder (it cannot be shipped), each skipped part says why in one line
    and the CT part still runs."""
    monkeypatch.setattr(demo, "nuclei_files", _offline)
    assert demo.run_demo(tmp_path / "out", device="cpu", data_folder=tmp_path / "no-data") == 0
    printed = capsys.readouterr().out
    gland_line = next(line for line in printed.splitlines() if line.startswith("image 1"))
    assert gland_line.startswith("image 1      skipped: no GlaS gland image at ") and "--data DIR" in gland_line
    assert "image 2      skipped: could not download the demo's nuclei image" in printed
    assert not (tmp_path / "out" / "nuclei_tile.nrrd").exists() and not (tmp_path / "out" / "gland.seg.nrrd").exists()
    assert sitk.ReadImage(str(tmp_path / "out" / "CT_small.seg.nrrd")).GetSize()[:2] == (128, 128)


@pytest.mark.data
@pytest.mark.slow
def test_demo_segments_glands_on_an_unseen_glas_image(tmp_path, monkeypatch, capsys, data_dir):
    """The mission's example: "gland" on GlaS testA_1, a validation image, scored against its manual mask. An adapter
    taught "gland" must reach the issue's goal region; one that was not says so and calls its mask a guess."""
    from SSAMSegmentLib.model import labels
    from SSAMSegmentLib.model.adapter import read_metadata
    from SSAMSegmentLib.model.loading import DEFAULT_ADAPTER

    monkeypatch.setattr(demo, "nuclei_files", _offline)
    assert demo.run_demo(tmp_path / "out", device="cpu", data_folder=data_dir) == 0
    printed = capsys.readouterr().out
    assert f"glas-15/images/{demo.GLAND_IMAGE}" in printed
    dice = float(re.search(r"Dice (\d\.\d+) against the manual gland mask", printed).group(1))
    assert sitk.ReadImage(str(tmp_path / "out" / "gland.seg.nrrd")).GetSize()[:2] == (600, 400)
    trained = read_metadata(DEFAULT_ADAPTER)["labels"]
    if labels.match_label("gland", trained).taught:
        assert dice >= 0.8, printed  # the goal for unseen gland images; measured 0.912 (2026-12-03 adapter)
        assert "untaught" not in printed.split("image 2")[0]
    else:
        assert f"warning: {labels.untaught_warning(labels.match_labels(['gland'], trained), trained)}" in printed
