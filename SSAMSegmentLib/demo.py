"""`ssam demo`: the main job on real images.

1. Histology, label "gland": GlaS (MICCAI 2015) test image testA_1, which the default adapter never trained on (it
   trains on train_1..10 and validates on testA_*), scored against its manual gland mask. GlaS may not be
   redistributed, so this image is read from a data folder (`--data DIR` holding glas-15/, default $SSAM_TEST_DATA,
   else the shared data folder beside the repository); without it the demo says so in one line and goes on.
2. Fluorescence microscopy, label "nucleus": the bottom-right 256x256 quarter of DSB2018's `img2d.tif`, which the
   `stardist` wheel on PyPI ships with its manual mask. The other three quarters trained the default adapter; this
   quarter was its validation tile and was never trained on, so the demo scores itself against the manual mask.
   Only the wheel's two data files are used (fetched with `pip download`, checked by SHA256); stardist is not installed.
3. CT, labels spine, aorta, lung: CT_small.dcm, a real chest CT slice (NEMA WG04 'CT1', downsized to 128x128 by
   pydicom's maintainers) shipped inside the `pydicom` package. Not used in training. It is an 85 mm close-up
   around one vertebra, unlike anything the default adapter saw. The default adapter learnt spine and aorta poorly
   (its model card), so their empty masks are said to be "not found (learnt poorly)", not absent (since its CT
   labels were routed through a CT-only network, 2026-12-06, it finds the vertebra as spine).

A label the adapter was never taught is still segmented, with the warning of model/labels.py; its Dice shows why.
"""

import hashlib
import os
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
GLAND_IMAGE = "testA_1.png"  # in glas-15/images, its manual mask in glas-15/masks; a validation image, never trained on
GLAND_FOLDER = "glas-15"


def default_data_folder() -> Path:
    """$SSAM_TEST_DATA, else the shared data folder next to the repository (as the tests find it)."""
    return Path(os.environ.get("SSAM_TEST_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")


def gland_files(data_folder) -> tuple:
    """(image, manual mask) of the GlaS demo image in `data_folder`, or a one-line SSAMError saying why not."""
    folder = Path(data_folder).expanduser() / GLAND_FOLDER
    image, mask = folder / "images" / GLAND_IMAGE, folder / "masks" / GLAND_IMAGE
    if not (image.is_file() and mask.is_file()):
        raise SSAMError(f"no GlaS gland image at {image} (GlaS may not be redistributed, so it is not shipped); "
                        f"pass --data DIR with {GLAND_FOLDER}/images and {GLAND_FOLDER}/masks to see it")
    return image, mask


def _manual_mask(path: Path) -> np.ndarray:
    """A published 0/255 mask (soft edges, possibly RGB) as a boolean array: threshold at 128."""
    array = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    return (array[..., 0] if array.ndim == 3 else array) >= 128


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
    for line in [f"note: {note}" for note in result.notes] + [f"warning: {warning}" for warning in result.warnings]:
        print(f"             {line}")
    for path in result.outputs:
        print(f"wrote        {path.resolve()}")
    return result


def _check(result, manual, what: str):
    from .training.evaluation import label_metrics

    found = sitk.GetArrayViewFromImage(next(iter(result.masks.values())))
    dice = label_metrics(found, manual, (1.0, 1.0))["dice"]
    print(f"check        Dice {dice:.3f} against the manual {what} mask")


def run_demo(output_folder="ssam-demo", device="auto", data_folder=None, overwrite=False) -> int:
    from .files.atomic_file import check_outputs
    from .model.loading import load

    start = time.perf_counter()
    folder = Path(output_folder).expanduser()
    ct = ct_image()
    # All the demo's files are checked before any work: a second run asks for --overwrite rather than replacing them.
    check_outputs([folder / "nuclei_tile.nrrd", *_outputs(folder, "gland"), *_outputs(folder, "nuclei_tile"),
                   *_outputs(folder, "CT_small")],
                  inputs=[ct], overwrite=overwrite)
    model = load(adapter="default", device=device, merge=True)
    trained = model.labels.taught_names()
    print(f"model        {model.spec.id} + default adapter ({len(trained)} labels: {', '.join(trained)})")

    try:
        gland_image, gland_mask = gland_files(data_folder if data_folder is not None else default_data_folder())
    except SSAMError as error:  # GlaS is not ours to ship: the other images still show the job
        print(f"\nimage 1      skipped: {error}")
    else:
        print(f"\nimage 1      {gland_image.resolve()} (colon histology, H&E, GlaS {gland_image.stem}: a validation "
              f"image, not used in training)")
        print("labels       gland")
        _check(_segment(model, gland_image, ["gland"], folder, "gland", overwrite), _manual_mask(gland_mask), "gland")

    try:
        tile, manual = _nuclei_tile(folder)
    except SSAMError as error:  # no network to PyPI: the CT image still shows the job
        print(f"\nimage 2      skipped: {error}")
    else:
        print(f"\nimage 2      {tile.resolve()} (fluorescence nuclei, DSB2018 via the stardist wheel; "
              f"a tile not used in training)")
        print("labels       nucleus")
        _check(_segment(model, tile, ["nucleus"], folder, "nuclei_tile", overwrite), manual, "nucleus")

    labels = [label for label in CT_LABELS if model.labels.knows(label)] or trained[:3]
    print(f"\nimage 3      {ct} (real chest CT slice from the pydicom package, a close-up of one vertebra)")
    print(f"labels       {', '.join(labels)}")
    _segment(model, ct, labels, folder, "CT_small", overwrite)
    print(f"\ndone in {time.perf_counter() - start:.1f} s; open each .seg.nrrd in 3D Slicer with its image, or look at "
          f"the preview PNGs. An empty mask of a label the model was taught and learnt well means it is absent: a "
          f"valid answer, not an error; the summary says where a label was not learnt well enough to say so.")
    return 0
