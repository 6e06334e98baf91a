"""Is a spelling variant of a trained label safe to read as that label? (issue 10; rules in SSAMSegmentLib/model/labels.py)

    python benchmarks/label_variants.py [--adapter default] [--data DIR] [--threads 2]

For each trained label of the adapter and a few variants a user might type ("kidneys", "liver parenchyma"; a case
or '_' difference is the same name and needs no measuring), the
variant is segmented from its OWN text embedding (no mapping) and compared with the trained name's mask on the same
real images: agreement Dice (variant mask against trained-name mask, all pixels of the set pooled), the Dice of
each against the manual or reference mask where there is one, and the cosine of the two MiniLM text embeddings.
A variant whose own mask already agrees with the trained label's is safe to map (mapping then makes the answer
exact, and lets the variant be reported as taught); one that disagrees is not, whatever its spelling. Controls
("liver tumour", "kidney left") are other structures: they must stay unmapped, whatever they measure.
"""

import os

import bench_common as common

DATA = os.environ.get("SSAM_TEST_DATA") or str(common.REPO.parent / "shared" / "data")
KVASIR_SEEN = 5  # the first five Kvasir-SEG images (sorted) trained or validated the first default adapter

# trained label -> (image set, variants, controls)
VARIANTS = {
    "liver": ("ct", ["livers", "liver parenchyma", "hepatic parenchyma"], ["liver tumour", "liver vessels"]),
    "spleen": ("ct", ["spleens"], []),
    "kidney": ("ct-train", ["kidneys", "renal"], ["kidney left", "renal cyst"]),
    "polyp": ("polyp", ["polyps", "colon polyp"], []),
    "nucleus": ("nuclei", ["nuclei", "cell nucleus", "cell nuclei"], []),
    "gland": ("gland", ["glands", "colon glands"], ["colon"]),
}


def image_sets(data, wanted):
    """set -> (description, [(case, image, {label: reference mask (numpy, image order) or None})]) for the sets in
    `wanted`, all real images."""
    import json
    from pathlib import Path

    import numpy as np
    import SimpleITK as sitk

    from SSAMSegmentLib.files.image_io import read_image

    data = Path(data)
    ct = data / "totalsegmentator-ct"
    names = json.loads((ct / "labels.json").read_text())["total"]

    def reference(seg_file, *labels):
        seg = sitk.GetArrayFromImage(sitk.ReadImage(str(ct / seg_file)))
        values = [int(v) for v, n in names.items() if any(n == w or n.startswith(w + "_") for w in labels)]
        return np.isin(seg, values).astype(np.uint8)

    sets = {}
    if "ct" in wanted:  # a validation CT of the first default adapter; references are TotalSegmentator predictions
        sets["ct"] = ("TotalSegmentator example_ct_dicom (20 slices)", [("example_ct_dicom", read_image(ct / "example_ct_dicom"), {
            "liver": reference("example_seg_dicom.nii.gz", "liver"),
            "spleen": reference("example_seg_dicom.nii.gz", "spleen")})])
    if "ct-train" in wanted:  # kidneys are outside example_ct_dicom: the training CT, every 2nd slice
        kidney = reference("example_seg.nii.gz", "kidney")[::2]
        sets["ct-train"] = ("TotalSegmentator example_ct_sm, every 2nd slice (a training image)",
                            [("example_ct_sm", read_image(ct / "example_ct_sm.nii.gz")[:, :, ::2], {"kidney": kidney})])
    if "polyp" in wanted:
        kvasir = sorted((data / "kvasir-seg" / "images").glob("*.jpg"))[KVASIR_SEEN:KVASIR_SEEN + 6]
        sets["polyp"] = (f"{len(kvasir)} Kvasir-SEG images", [
            (p.stem, read_image(p), {"polyp": _binary(data / "kvasir-seg" / "masks" / p.name)}) for p in kvasir])
    if "nuclei" in wanted:
        tile = (slice(256, 512), slice(256, 512))
        fluo = sitk.GetArrayFromImage(sitk.ReadImage(str(data / "stardist-nuclei" / "img2d.tif")))[tile]
        fluo_mask = sitk.GetArrayFromImage(sitk.ReadImage(str(data / "stardist-nuclei" / "mask2d.tif")))[tile] > 0
        cases = [("img2d validation tile", sitk.GetImageFromArray(np.ascontiguousarray(fluo)),
                  {"nucleus": fluo_mask.astype(np.uint8)})]
        for path in sorted((data / "monuseg-12" / "images").glob("*.tif"))[-2:]:
            cases.append((path.stem, read_image(path),
                          {"nucleus": _binary(data / "monuseg-12" / "masks" / f"{path.stem}.png")}))
        sets["nuclei"] = ("DSB2018 fluorescence validation tile and 2 MoNuSeg H&E tiles", cases)
    if "gland" in wanted:
        glas = [data / "glas-15" / "images" / f"testA_{n}.png" for n in (1, 3)]
        sets["gland"] = ("GlaS testA_1, testA_3", [
            (p.stem, read_image(p), {"gland": _binary(data / "glas-15" / "masks" / p.name)}) for p in glas])
    return sets


def _binary(path):
    """A published 0/255 mask (JPEG or PNG, grey, grey + alpha or RGB) thresholded at 128."""
    import numpy as np
    from PIL import Image

    return (np.asarray(Image.open(path).convert("L")) >= 128).astype(np.uint8)


def _dice(a, b):
    import numpy as np

    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total


def main():
    parser = common.arguments(__doc__.splitlines()[0])
    parser.add_argument("--adapter", default="default")
    parser.add_argument("--data", default=DATA)
    args = parser.parse_args()
    common.set_threads(args.threads)

    import numpy as np
    import SimpleITK as sitk
    import torch

    import SSAMSegmentLib
    from SSAMSegmentLib.inference.slice_inference import segment_image
    from SSAMSegmentLib.model import labels as label_rules
    from SSAMSegmentLib.model.text_encoders import LabelEmbeddings, load_text_encoder

    model = SSAMSegmentLib.load(adapter=args.adapter, device="cpu", merge=True)
    trained = model.labels.taught_names()
    # Every name segmented from its own embedding: an embedding table in which nothing counts as taught.
    own = LabelEmbeddings(model.text_encoder_id, model.text_dim)
    for name, vector in model.labels.items():
        own.add(name, vector, taught=False)
    model.labels = own
    encoder = load_text_encoder(model.text_encoder_id)
    chosen = {label: spec for label, spec in VARIANTS.items() if label in trained}
    for label in VARIANTS:
        if label not in chosen:
            print(f"skipped {label}: not a label of this adapter")
    sets = image_sets(args.data, {spec[0] for spec in chosen.values()})
    pooled, references = {}, {}
    for set_name, (_, cases) in sets.items():
        names = [n for label, (s, variants, controls) in chosen.items() if s == set_name
                 for n in [label] + variants + controls]
        for case, image, truths in cases:  # every name of the set in one pass: each slice encoded once
            result = segment_image(model, image, names)
            for name in names:
                pooled.setdefault(name, []).append(sitk.GetArrayFromImage(result.masks[name]).reshape(-1))
            for label, truth in truths.items():
                references.setdefault(label, []).append(truth.reshape(-1))
            print(f"{set_name:8} {case}: {result.summary()}", flush=True)
    masks = {name: np.concatenate(parts) for name, parts in pooled.items()}
    rows = []
    for label, (set_name, variants, controls) in chosen.items():
        truth = np.concatenate(references[label]) if label in references else None
        names = [label] + variants + controls
        vectors = torch.nn.functional.normalize(encoder.encode(names), dim=1)
        baseline = None if truth is None else _dice(masks[label], truth)
        for index, name in enumerate(names[1:], start=1):
            both_empty = not masks[name].any() and not masks[label].any()
            own_dice = None if truth is None else _dice(masks[name], truth)
            rows.append([label, name, "control" if name in controls else "variant",
                         f"{float(vectors[0] @ vectors[index]):.3f}",
                         "- (both empty)" if both_empty else f"{_dice(masks[name], masks[label]):.3f}",
                         "-" if baseline is None else f"{baseline:.3f}", "-" if own_dice is None else f"{own_dice:.3f}",
                         label_rules.match_label(name, trained).describe(), sets[set_name][0]])
    header = ["trained label", "typed", "kind", "text cosine", "agreement Dice (typed vs trained mask)",
              "trained Dice vs reference", "typed Dice vs reference", "labels.py reads it as", "images"]
    body = ("Adapter: `" + str(args.adapter) + "` (trained labels: " + ", ".join(trained) + "). Each typed name is "
            "segmented from its own text embedding, without mapping, and compared with the trained name's mask on "
            "the same images (pixels pooled); the trained name's Dice against the reference is the baseline. "
            "\"labels.py reads it as\" is what `ssam segment` does with the typed name.\n\n"
            + common.table(header, rows))
    print(body)
    if not args.no_docs:
        common.write_section(args.docs, "label_variants", "Label variants: typed spellings against the trained label",
                             body, args.threads)


if __name__ == "__main__":
    main()
