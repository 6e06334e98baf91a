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

# trained label -> (variants, controls)
VARIANTS = {
    "liver": (["livers", "liver parenchyma", "hepatic parenchyma"], ["liver tumour", "liver vessels"]),
    "kidney": (["kidneys", "renal"], ["kidney left", "renal cyst"]),
    "spleen": (["spleens"], []),
    "polyp": (["polyps", "colon polyp"], []),
    "nucleus": (["nuclei", "cell nucleus", "cell nuclei"], []),
    "gland": (["glands", "colon glands"], ["colon"]),
}


def image_sets(data):
    """label -> [(name, image, reference mask or None)] on real images, none of them training images of the first
    default adapter except where said."""
    import numpy as np
    import SimpleITK as sitk
    from pathlib import Path

    from SSAMSegmentLib.files.image_io import read_image

    data = Path(data)
    ct = data / "totalsegmentator-ct"
    sets = {}
    dicom_ct = read_image(ct / "example_ct_dicom")
    names = __import__("json").loads((ct / "labels.json").read_text())["total"]
    seg = sitk.GetArrayFromImage(sitk.ReadImage(str(ct / "example_seg_dicom.nii.gz")))

    def reference(*wanted):
        values = [int(v) for v, n in names.items() if any(n == w or n.startswith(w + "_") for w in wanted)]
        return np.isin(seg, values).astype(np.uint8)

    sets["liver"] = [("example_ct_dicom", dicom_ct, reference("liver"))]
    sets["spleen"] = [("example_ct_dicom", dicom_ct, reference("spleen"))]
    # Kidneys are not in example_ct_dicom's field of view: the larger example CT (no reference; it may share
    # slices with the training CT example_ct_sm, which does not matter for agreement between two prompts).
    big = read_image(ct / "example_ct.nii.gz")
    sets["kidney"] = [("example_ct (every 4th slice)", big[:, :, ::4], None)]
    kvasir = sorted((data / "kvasir-seg" / "images").glob("*.jpg"))[KVASIR_SEEN:KVASIR_SEEN + 6]
    sets["polyp"] = [(p.stem, read_image(p), _binary(data / "kvasir-seg" / "masks" / p.name)) for p in kvasir]
    tile = (slice(256, 512), slice(256, 512))
    fluo = sitk.GetArrayFromImage(sitk.ReadImage(str(data / "stardist-nuclei" / "img2d.tif")))[tile]
    fluo_mask = (sitk.GetArrayFromImage(sitk.ReadImage(str(data / "stardist-nuclei" / "mask2d.tif")))[tile] > 0)
    sets["nucleus"] = [("img2d validation tile", sitk.GetImageFromArray(np.ascontiguousarray(fluo)),
                        fluo_mask.astype(np.uint8))]
    for path in sorted((data / "monuseg-12" / "images").glob("*.tif"))[-2:]:
        sets["nucleus"].append((path.stem, read_image(path), _binary(data / "monuseg-12" / "masks" / f"{path.stem}.png")))
    glas = [data / "glas-15" / "images" / f"testA_{n}.png" for n in (1, 3)]
    sets["gland"] = [(p.stem, read_image(p), _binary(data / "glas-15" / "masks" / p.name)) for p in glas]
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
    sets = image_sets(args.data)
    rows = []
    for label, (variants, controls) in VARIANTS.items():
        if label not in trained:
            print(f"skipped {label}: not a label of this adapter")
            continue
        names = [label] + variants + controls
        pooled = {name: [] for name in names}
        references = []
        for case, image, reference in sets[label]:
            result = segment_image(model, image, names)
            for name in names:
                pooled[name].append(sitk.GetArrayFromImage(result.masks[name]).reshape(-1))
            references.append(None if reference is None else reference.reshape(-1))
            print(f"{label:8} {case}: {result.summary()}", flush=True)
        masks = {name: np.concatenate(parts) for name, parts in pooled.items()}
        truth = np.concatenate(references) if all(r is not None for r in references) else None
        vectors = encoder.encode(names)
        vectors = torch.nn.functional.normalize(vectors, dim=1)
        baseline = _dice(masks[label], truth) if truth is not None else None
        for index, name in enumerate(names):
            if name == label:
                continue
            match = label_rules.match_label(name, trained)
            own_dice = _dice(masks[name], truth) if truth is not None else None
            rows.append([label, name, "control" if name in controls else "variant",
                         f"{float(vectors[0] @ vectors[index]):.3f}", f"{_dice(masks[name], masks[label]):.3f}",
                         "-" if baseline is None else f"{baseline:.3f}", "-" if own_dice is None else f"{own_dice:.3f}",
                         match.describe() if match.status != label_rules.TAUGHT else "taught (same key)",
                         ", ".join(case for case, _, _ in sets[label])])
    header = ["trained label", "typed", "kind", "text cosine", "agreement Dice (typed vs trained mask)",
              "trained Dice vs reference", "typed Dice vs reference", "labels.py reads it as", "images"]
    body = ("Adapter: `" + str(args.adapter) + "` (trained labels: " + ", ".join(trained) + "). Each typed name is "
            "segmented from its own text embedding, without mapping, and compared with the trained name's mask on "
            "the same images (pixels pooled); the trained name's Dice is the baseline.\n\n"
            + common.table(header, rows))
    print(body)
    if not args.no_docs:
        common.write_section(args.docs, "label_variants", "Label variants: typed spellings against the trained label",
                             body, args.threads)


if __name__ == "__main__":
    main()
