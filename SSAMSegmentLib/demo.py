"""`ssam demo`: the main job on real images that any machine can get from the package registry.

1. Fluorescence microscopy, label "nucleus": the bottom-right 256x256 quarter of DSB2018's `img2d.tif`, which the
   `stardist` wheel on PyPI ships with its manual mask. The other three quarters trained the default adapter; this
   quarter was its validation tile and was never trained on, so the demo scores itself against the manual mask.
   Only the wheel's two data files are used (fetched with `pip download`, checked by SHA256); stardist is not installed.
2. CT, labels spine, aorta, lung: CT_small.dcm, a real chest CT slice (NEMA WG04 'CT1', downsized to 128x128 by
   pydicom's maintainers) shipped inside the `pydicom` package. Not used in training. It is an 85 mm close-up
   around one vertebra, unlike anything the default adapter saw, so empty masks are a likely (and valid) answer.
"""

import hashlib
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .files.atomic_file import atomic_output
from .errors import SSAMError

CT_LABELS = ("spine", "aorta", "lung")
NUCLEI_WHEEL = "stardist==0.9.2"
# SHA256 of the two files inside the wheel (the same in every platform's wheel of this release).
NUCLEI_FILES = {
    "img2d.tif": "f9ccc1571b92c861ff87e28463068b43f61bd47357ed0503f711e5cd1eb97750",
    "mask2d.tif": "59ad5e820b7982ca9d13e946fa6e7f64e2714899e00a2ae6c69aa79aad53d46f",
}
NUCLEI_TILE = (slice(256, 512), slice(256, 512))  # rows, columns: the default adapter's validation tile


def ct_image() -> Path:
    try:
        import pydicom.data
    except ImportError:
        raise SSAMError("the demo's CT slice comes with pydicom; run `pip install pydicom`") from None
    path = Path(pydicom.data.get_testdata_file("CT_small.dcm"))
    if not path.is_file():
        raise SSAMError(f"pydicom's CT_small.dcm is missing ({path}); reinstall pydicom")
    return path


def _extract_nuclei_files(wheel: Path, folder: Path) -> None:
    """Copy the image and mask out of the stardist wheel into `folder`, each checked and written atomically."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            contents = {name: archive.read(f"stardist/data/images/{name}") for name in NUCLEI_FILES}
    except (zipfile.BadZipFile, KeyError, OSError) as error:
        raise SSAMError(f"{wheel.name} is not a stardist wheel with sample images ({error}); delete it and retry")
    for name, data in contents.items():
        if hashlib.sha256(data).hexdigest() != NUCLEI_FILES[name]:
            raise SSAMError(f"{name} in {wheel.name} has an unexpected SHA256; the download is not the published "
                            f"{NUCLEI_WHEEL} wheel")
    for name, data in contents.items():
        with atomic_output(folder / name) as part:
            part.write_bytes(data)


def nuclei_files(folder: Path = None) -> tuple:
    """(image, mask) paths of the DSB2018 sample, fetched from PyPI into the weights cache on first use."""
    from .model.weights import cache_dir, file_sha256

    folder = Path(folder) if folder is not None else cache_dir() / "demo"
    paths = tuple(folder / name for name in NUCLEI_FILES)
    if all(path.is_file() and file_sha256(path) == NUCLEI_FILES[path.name] for path in paths):
        return paths
    with tempfile.TemporaryDirectory() as tmp:
        # One fixed wheel, whatever this machine is: its data files are what we want, not its compiled code.
        command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                   "--platform", "manylinux_2_28_x86_64", "--python-version", "3.11", "--implementation", "cp",
                   "--abi", "cp311", "--dest", tmp, NUCLEI_WHEEL]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.TimeoutExpired) as error:
            raise SSAMError(f"could not run pip to fetch the demo's nuclei image ({error}); "
                            f"check that pip works in this environment") from None
        wheels = sorted(Path(tmp).glob("stardist-*.whl"))
        if done.returncode != 0 or not wheels:
            reason = (done.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
            raise SSAMError(f"could not download the demo's nuclei image ({NUCLEI_WHEEL} from PyPI): {reason}; "
                            f"check the network, or run `ssam segment` on your own image")
        _extract_nuclei_files(wheels[0], folder)
    return paths


def _nuclei_tile(folder: Path) -> tuple:
    """Write the validation tile as NRRD (for Slicer) beside the outputs; return its path and its manual mask."""
    image_file, mask_file = nuclei_files()
    image = sitk.GetArrayFromImage(sitk.ReadImage(str(image_file)))[NUCLEI_TILE]
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(mask_file)))[NUCLEI_TILE] > 0
    path = folder / "nuclei_tile.nrrd"
    with atomic_output(path, suffix=".nrrd") as part:
        sitk.WriteImage(sitk.GetImageFromArray(np.ascontiguousarray(image)), str(part))
    return path, mask


def _outputs(folder: Path, stem: str):
    return folder / f"{stem}.seg.nrrd", folder / f"{stem}.preview.png"


def _segment(model, image: Path, labels, folder: Path, stem: str, overwrite: bool):
    from .inference.segment_files import segment_file

    output, preview = _outputs(folder, stem)
    result = segment_file(model, image, labels, output, preview=preview, overwrite=overwrite)
    print(f"result       {result.summary()}")
    for path in result.outputs:
        print(f"wrote        {path.resolve()}")
    return result


def run_demo(output_folder="ssam-demo", device="auto", overwrite=False) -> int:
    from .files.atomic_file import check_outputs
    from .training.evaluation import label_metrics
    from .model.loading import load

    start = time.perf_counter()
    folder = Path(output_folder).expanduser()
    ct = ct_image()
    # All the demo's files are checked before any work: a second run asks for --overwrite rather than replacing them.
    check_outputs([folder / "nuclei_tile.nrrd", *_outputs(folder, "nuclei_tile"), *_outputs(folder, "CT_small")],
                  inputs=[ct], overwrite=overwrite)
    model = load(adapter="default", device=device, merge=True)
    print(f"model        {model.spec.id} + default adapter ({len(model.labels.known_names())} labels: "
          f"{', '.join(model.labels.known_names())})")

    try:
        tile, manual = _nuclei_tile(folder)
    except SSAMError as error:  # no network to PyPI: the CT image still shows the job
        print(f"\nimage 1      skipped: {error}")
    else:
        print(f"\nimage 1      {tile.resolve()} (fluorescence nuclei, DSB2018 via the stardist wheel; "
              f"a tile not used in training)")
        print("labels       nucleus")
        nuclei = _segment(model, tile, ["nucleus"], folder, "nuclei_tile", overwrite)
        found = sitk.GetArrayViewFromImage(nuclei.masks["nucleus"])
        dice = label_metrics(found, manual, (1.0, 1.0))["dice"]
        print(f"check        Dice {dice:.3f} against the manual nucleus mask")

    labels = [label for label in CT_LABELS if model.labels.knows(label)] or model.labels.known_names()[:3]
    print(f"\nimage 2      {ct} (real chest CT slice from the pydicom package, a close-up of one vertebra)")
    print(f"labels       {', '.join(labels)}")
    _segment(model, ct, labels, folder, "CT_small", overwrite)
    print(f"\ndone in {time.perf_counter() - start:.1f} s; open each .seg.nrrd in 3D Slicer with its image, or look at "
          f"the preview PNGs. An empty mask means the label was not found: a valid answer, not an error.")
    return 0
