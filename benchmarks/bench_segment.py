"""Seconds per slice and per volume segmenting a real CT with litemedsam and three labels (issue 3).

    python benchmarks/bench_segment.py [--threads 2] [--repeats 2] [--slices 4]

The product's slice loop in float32 with every slice encoded (`SSAMSegmentLib.inference.slice_inference.segment_image`:
merged weights and the fast encoder copy, each label's text embedding looked up once per volume, one encoder pass per
slice for all labels) against a naive loop written
here as the S-SAM reference code works: unmerged weights (W' rebuilt on every forward), the label's text encoded on
every slice with the text encoder, one encoder pass per label. Both run on the same `--slices` axial slices, in the
same process, interleaved; the product also segments the whole volume. Labels come from the default adapter when it
exists (else three fixed vectors are added as label embeddings: speed does not depend on them). Also reported: the
encoder's GFLOP per slice (torch.utils.flop_counter) and the share of a large float32 matmul's GFLOP/s it reaches,
both measured in this run, and the bf16 encoder (precision "bf16"): its time and its masks' Dice against the
float32 masks. Every slice is encoded (no sparse probing, inference/sparse_slices.py): this is the per-slice cost; the
whole-volume product with sparse slices is benchmarks/bench_volume.py.
"""

import os
import time

import bench_common as common

CT = common.REPO.parent / "shared" / "data" / "totalsegmentator-ct" / "example_ct_sm.nii.gz"
LABELS = ["liver", "spleen", "kidney"]


def load_model(base, labels):
    import torch

    import SSAMSegmentLib
    from SSAMSegmentLib.model.loading import DEFAULT_ADAPTER

    adapter = "default" if base == "litemedsam" and DEFAULT_ADAPTER.is_file() else None
    model = SSAMSegmentLib.load(base=base, adapter=adapter, device="cpu", precision="float32")
    for index, label in enumerate(labels):
        if not model.labels.knows(label):
            vector = torch.randn(model.text_dim, generator=torch.Generator().manual_seed(index))
            model.labels.add(label, vector / vector.norm())
    return model, adapter or "none (label vectors added)"


def naive_segment(model, image, labels, encode_text):
    """The reference code's inference loop: per slice and label, text encoded, W' rebuilt, one encoder pass."""
    import numpy as np
    import SimpleITK as sitk
    import torch

    from SSAMSegmentLib.inference.intensity import choose_mapping, has_signal
    from SSAMSegmentLib.inference.preprocessing import logits_to_slice, to_model_input
    from SSAMSegmentLib.inference.slice_geometry import SliceGeometry

    geometry = SliceGeometry.for_image(image, "axial")
    mapping = choose_mapping(image, "auto", None)
    source = geometry.canonical(sitk.GetArrayViewFromImage(image))
    spacing = geometry.in_plane_spacing()
    outputs = {label: np.zeros(geometry.shape, dtype=np.uint8) for label in labels}
    model.unmerge()
    with torch.inference_mode(), common.unmerged(model, rebuild_only=True):
        for index in range(geometry.num_slices):
            view = geometry.slice_view(source, index)
            if not has_signal(view):
                continue
            rgb = mapping.apply(view)
            pixels = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None]
            inputs, content = to_model_input(pixels, model.image_size, model.pixel_mean, model.pixel_std, spacing)
            for label in labels:
                text = encode_text([label])
                embeddings = model.image_encoder(inputs)
                logits = model.decode(embeddings, model.prompt_tokens(text))
                logits = logits_to_slice(logits, model.image_size, content, view.shape[:2])
                mask = (logits[0, 0] > 0).to(torch.uint8).numpy()
                geometry.slice_view(geometry.canonical(outputs[label]), index)[...] = mask
    return outputs


def encoder_flops(model, images):
    """GFLOP of one encoder pass over `images` (matrix products and convolutions, as FlopCounterMode counts them)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model.image_encoder(images)
    return counter.get_total_flops() / 1e9 / images.shape[0]


def dice(a, b):
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def main():
    parser = common.arguments(__doc__.split("\n")[0])
    parser.add_argument("--image", default=str(CT), help="a CT volume (default: TotalSegmentator's example_ct_sm)")
    parser.add_argument("--slices", type=int, default=4, help="slices both runs segment for the ratio")
    parser.add_argument("--base", default="litemedsam", help="base model (a test-* base for a quick smoke run)")
    parser.set_defaults(repeats=2)
    args = parser.parse_args()
    common.set_threads(args.threads)

    import numpy as np
    import SimpleITK as sitk
    import torch

    from SSAMSegmentLib.inference.slice_inference import segment_image
    from SSAMSegmentLib.model.text_encoders import load_text_encoder

    volume = sitk.ReadImage(args.image)
    middle = volume.GetSize()[2] // 2
    first = max(0, middle - args.slices // 2)
    part = volume[:, :, first:first + args.slices]
    model, adapter = load_model(args.base, LABELS)
    text_encoder = load_text_encoder(model.text_encoder_id)  # loaded once, as the reference code loads CLIP once

    variants = {
        "product: segment_image": lambda: segment_image(model, part, LABELS, axis="axial", probe_mm=None),
        "naive: reference-code loop": lambda: naive_segment(model, part, LABELS, text_encoder.encode),
    }
    times = common.interleaved(variants, args.repeats, warmup=0)
    product = common.median(times["product: segment_image"])
    naive = common.median(times["naive: reference-code loop"])
    count = part.GetSize()[2]

    start = time.perf_counter()
    whole = segment_image(model, volume, LABELS, axis="axial", probe_mm=None)
    whole_seconds = time.perf_counter() - start
    slices = volume.GetSize()[2]

    # The encoder alone: GFLOP, seconds per slice (product path and the merged layers), share of the matmul peak.
    from SSAMSegmentLib.inference.intensity import choose_mapping
    from SSAMSegmentLib.inference.preprocessing import to_model_input

    mapping = choose_mapping(volume, "auto", None)
    rgb = mapping.apply(sitk.GetArrayViewFromImage(volume)[middle])
    pixels = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None]
    inputs, _ = to_model_input(pixels, model.image_size, model.pixel_mean, model.pixel_std)
    model.eval().merge()
    gflop = encoder_flops(model, inputs)
    with torch.inference_mode():
        encoder_times = common.interleaved({
            "product": lambda: model.encode_images(inputs),
            "merged layers": lambda: model.image_encoder(inputs),
        }, args.repeats + 1)
    peak = common.matmul_peak_gflops(args.threads)

    # The bf16 encoder: time on the same slices and its masks against float32 on the whole volume.
    def segment_with(precision, image):
        model.set_precision(precision)
        return segment_image(model, image, LABELS, axis="axial", probe_mm=None)

    try:
        bf16_times = common.interleaved({"float32": lambda: segment_with("float32", part),
                                         "bf16": lambda: segment_with("bf16", part)}, args.repeats, warmup=0)
        approximate = segment_with("bf16", volume)
    finally:
        model.set_precision("float32")
    agreement = []
    for label in LABELS:
        exact = sitk.GetArrayFromImage(whole.masks[label]).astype(bool)
        bf16 = sitk.GetArrayFromImage(approximate.masks[label]).astype(bool)
        agreement.append(f"{label} {dice(exact, bf16):.3f} ({int(exact.sum())} voxels)")

    rows = [
        ["naive: reference-code loop", f"{naive / count:.2f}", f"{naive / count * slices:.0f} (estimated)", "1.00"],
        ["product: segment_image", f"{product / count:.2f}", f"{whole_seconds:.0f} (measured)",
         f"{naive / product:.1f}x faster"],
    ]
    encoder_rows = []
    for name in ("product", "merged layers"):
        seconds = common.median(encoder_times[name])
        encoder_rows.append([name, f"{seconds:.2f}", f"{gflop / seconds:.0f}", f"{gflop / seconds / peak:.0%}"])
    body = "\n".join([
        f"`{os.path.basename(args.image)}` ({' x '.join(map(str, volume.GetSize()))} voxels, {slices} axial slices), "
        f"{args.base}, labels {', '.join(LABELS)} (adapter: {adapter}). Ratio from {count} middle slices segmented by "
        f"both, interleaved, {args.repeats} rounds (medians); the product's whole volume timed once. Goal: >= 3x "
        "for three labels.",
        "",
        common.table(["run", "s / slice", "s / volume", "speed"], rows),
        "",
        f"Image encoder alone: {gflop:.1f} GFLOP per 256x256 slice (FlopCounterMode); a 2048^3 float32 matmul "
        f"reached {peak:.0f} GFLOP/s in this run.",
        "",
        common.table(["encoder", "s / slice", "GFLOP/s", "share of matmul peak"], encoder_rows),
        "",
        f"bf16 encoder (`--precision bf16`; `auto` picks it on CPUs with native bf16): "
        f"{common.median(bf16_times['float32']) / common.median(bf16_times['bf16']):.1f}x faster per slice than "
        f"float32 here; Dice of its masks against the float32 masks on the whole volume: {'; '.join(agreement)}.",
    ])
    print(body)
    if not args.no_docs:
        common.write_section(args.docs, "segment", "Segmenting a CT volume: product against the naive loop", body,
                             args.threads)


if __name__ == "__main__":
    main()
