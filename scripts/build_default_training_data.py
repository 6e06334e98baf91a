"""Lay out the real images of ../shared/data as the training and validation datasets of the default adapter.

    python scripts/build_default_training_data.py OUT_DIR [--data ../shared/data]

Nothing is copied into the repository: OUT_DIR gets symlinks where a file can be used as it is, and derived files
(merged label maps, NIfTI from DICOM, native-resolution tiles of the nuclei images, binary masks) where it cannot.
Labels are coarse structures a user types: TotalSegmentator's vertebrae_L1..T12 become "spine", its lung lobes
"lung", both kidneys "kidney". Which data validates or tests (never trains) is fixed here, so the adapter's validation
Dice is on unseen cases:

  train: ct-mr          TotalSegmentator example_ct_sm (CT) + example_mr_sm (MR), predicted labels
         polyp-train    Kvasir-SEG: the 760 images that are neither test nor validation, manual masks
         gland-train    GlaS-15: train_1..train_10 (H&E colon histology), manual gland masks
         nuclei-train   3 of the 4 tiles of the DSB2018 fluorescence image, manual masks
         nuclei-he-train  MoNuSeg: 9 of the 12 H&E tiles, each cut into 16 native-resolution 250x250 tiles
  val:   val-ct         TotalSegmentator example_ct_dicom (another CT, 512x512), predicted labels
         val-dcmqi      the dcmqi 3-slice CT with MANUAL liver and spine outlines
         polyp-val      Kvasir-SEG: 40 images (every 20th of the non-test images)
         gland-val      GlaS-15: testA_1, 3, 6, 7, 8 (the original GlaS test part)
         nuclei-val     the 4th nuclei tile
         nuclei-he-val  MoNuSeg: the other 3 H&E tiles, 4 native-resolution 250x250 tiles each
  test:  polyp-test     Kvasir-SEG: 200 images (every 5th by name), held apart from training AND validation
"""

import argparse
import json
import os
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from PIL import Image

LABELS = ["liver", "spleen", "kidney", "stomach", "aorta", "spine", "lung"]


def _group(name: str):
    """TotalSegmentator label name -> our coarse label, or None."""
    if name in ("liver", "spleen", "stomach", "aorta"):
        return name
    if name in ("kidney_left", "kidney_right"):
        return "kidney"
    if name == "vertebrae" or name.startswith("vertebrae_"):
        return "spine"
    if name.startswith("lung_"):
        return "lung"
    return None


def _merged_label_map(seg_path: Path, names: dict) -> sitk.Image:
    seg = sitk.ReadImage(str(seg_path))
    values = sitk.GetArrayViewFromImage(seg)
    merged = np.zeros(values.shape, np.uint8)
    for value, name in names.items():
        group = _group(name)
        if group:
            merged[values == int(value)] = LABELS.index(group) + 1
    image = sitk.GetImageFromArray(merged)
    image.CopyInformation(seg)
    return image


def _nnunet(folder: Path, cases: dict, labels: list):
    """cases: case id -> (image path or sitk.Image, label sitk.Image)."""
    (folder / "imagesTr").mkdir(parents=True, exist_ok=True)
    (folder / "labelsTr").mkdir(parents=True, exist_ok=True)
    for case, (image, label) in cases.items():
        target = folder / "imagesTr" / f"{case}_0000.nii.gz"
        if isinstance(image, Path):
            if not target.exists():
                os.symlink(image.resolve(), target)
        else:
            sitk.WriteImage(image, str(target), useCompression=True)
        sitk.WriteImage(label, str(folder / "labelsTr" / f"{case}.nii.gz"), useCompression=True)
    dataset = {"channel_names": {"0": "image"}, "labels": {"background": 0, **{n: i + 1 for i, n in enumerate(labels)}},
               "numTraining": len(cases), "file_ending": ".nii.gz"}
    (folder / "dataset.json").write_text(json.dumps(dataset, indent=1))


def _folder2d(folder: Path, pairs: list, label: str):
    """pairs: (name, image path or sitk.Image, mask path or sitk.Image)."""
    for sub in ("images", "masks"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for name, image, mask in pairs:
        for sub, item in (("images", image), ("masks", mask)):
            if isinstance(item, Path):
                target = folder / sub / item.name
                if not target.exists():
                    os.symlink(item.resolve(), target)
            else:
                sitk.WriteImage(item, str(folder / sub / f"{name}.png"))
    (folder / "labels.json").write_text(json.dumps({"1": label}))


def kvasir_split(kvasir: Path):
    """(train, val, test) lists of (name, image, mask) for Kvasir-SEG: every 5th image by name is test (200 of 1000),
    every 20th of the rest validation (40), the others train (760). Fixed, so no report ever trains on its test."""
    pairs = [(p.stem, p, kvasir / "masks" / p.name) for p in sorted((kvasir / "images").glob("*.jpg"))]
    test = pairs[::5]
    rest = [p for i, p in enumerate(pairs) if i % 5]
    return [p for i, p in enumerate(rest) if i % 20], rest[::20], test


def build(out: Path, data: Path):
    ts = data / "totalsegmentator-ct"
    names = json.loads((ts / "labels.json").read_text())
    _nnunet(out / "ct-mr", {
        "ct": (ts / "example_ct_sm.nii.gz", _merged_label_map(ts / "example_seg.nii.gz", names["total"])),
        "mr": (ts / "example_mr_sm.nii.gz", _merged_label_map(ts / "example_seg_mr.nii.gz", names["total_mr"])),
    }, LABELS)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(ts / "example_ct_dicom")))
    ct = reader.Execute()
    # The label map stores the same grid with its y axis flipped: nearest-neighbour resampling moves it exactly.
    label = sitk.Resample(_merged_label_map(ts / "example_seg_dicom.nii.gz", names["total"]), ct,
                          sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    _nnunet(out / "val-ct", {"ct_dicom": (ct, label)}, LABELS)

    dcmqi = data / "dcmqi-ct-3slice"
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(dcmqi)))
    ct = reader.Execute()
    labels = np.zeros(ct.GetSize()[::-1], np.uint8)
    labels[sitk.GetArrayViewFromImage(sitk.ReadImage(str(dcmqi / "liver_seg.nrrd"))) > 0] = 1
    labels[sitk.GetArrayViewFromImage(sitk.ReadImage(str(dcmqi / "spine_seg.nrrd"))) > 0] = 2
    label_image = sitk.GetImageFromArray(labels)
    label_image.CopyInformation(ct)
    _nnunet(out / "val-dcmqi", {"dcmqi": (ct, label_image)}, ["liver", "spine"])

    train, val, test = kvasir_split(data / "kvasir-seg")
    for name, pairs in (("polyp-train", train), ("polyp-val", val), ("polyp-test", test)):
        _folder2d(out / name, pairs, "polyp")

    glas = data / "glas-15"
    pairs = [(p.stem, p, glas / "masks" / p.name) for p in sorted((glas / "images").glob("*.png"))]
    _folder2d(out / "gland-train", [p for p in pairs if p[0].startswith("train_")], "gland")
    _folder2d(out / "gland-val", [p for p in pairs if p[0].startswith("testA_")], "gland")

    monuseg = data / "monuseg-12"
    slides = sorted((monuseg / "images").glob("*.tif"))
    train_tiles, val_tiles = [], []
    for index, path in enumerate(slides):
        image = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))[..., :3]
        # masks are grey + alpha PNGs (0/255), which SimpleITK cannot read: Pillow, grey channel
        mask = np.asarray(Image.open(monuseg / "masks" / f"{path.stem}.png").convert("L")) >= 128
        validation = index >= len(slides) - 3
        for row in range(4):
            for col in range(4):
                if validation and row != col:
                    continue
                crop = np.s_[row * 250:(row + 1) * 250, col * 250:(col + 1) * 250]
                tile = (f"{path.stem}_r{row}_c{col}", sitk.GetImageFromArray(image[crop], isVector=True),
                        sitk.GetImageFromArray(mask[crop].astype(np.uint8)))
                (val_tiles if validation else train_tiles).append(tile)
    _folder2d(out / "nuclei-he-train", train_tiles, "nucleus")
    _folder2d(out / "nuclei-he-val", val_tiles, "nucleus")

    nuclei = data / "stardist-nuclei"
    image = sitk.GetArrayFromImage(sitk.ReadImage(str(nuclei / "img2d.tif")))
    mask = (sitk.GetArrayFromImage(sitk.ReadImage(str(nuclei / "mask2d.tif"))) > 0).astype(np.uint8)
    tiles = []
    for row in (0, 256):
        for col in (0, 256):
            name = f"nuclei_r{row}_c{col}"
            tiles.append((name, sitk.GetImageFromArray(image[row:row + 256, col:col + 256]),
                          sitk.GetImageFromArray(mask[row:row + 256, col:col + 256])))
    _folder2d(out / "nuclei-train", tiles[:3], "nucleus")
    _folder2d(out / "nuclei-val", tiles[3:], "nucleus")
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    args = parser.parse_args()
    build(args.out, args.data)
    print(f"datasets written to {args.out}")


if __name__ == "__main__":
    main()
