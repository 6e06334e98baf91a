"""`ssam segment` end to end on a full-size CT (issue 14): seconds, peak memory, and the masks against float32.

    python benchmarks/bench_volume.py [--slices 300] [--labels liver spleen kidney] [--memory-slices 600]

The CT: TotalSegmentator's example_ct (122 x 101 x 112 voxels, 3 mm, a real abdomen) resampled to 512 x 512 x
`--slices` (0.71 mm in plane, air around the field of view, 336 mm long), written uncompressed so reading it costs
what reading a clinical CT costs. Three things are measured, each in this run:
1. Per slice, interleaved on `--per-slice` middle slices (every slice encoded): float32 (today's default), bf16 (where
   the CPU computes it natively, picked by precision "auto"), int8 dynamic quantisation of the encoder's Linear layers
   (torch.ao.quantization.quantize_dynamic), each against float32: time and the masks' Dice on those slices.
2. The whole volume through the `ssam segment` command in a fresh process: the product's defaults (precision auto,
   sparse probing, sparse_slices.py) against `--precision float32 --every-slice` (the behaviour before issue 14):
   wall seconds, slices encoded, and the Dice of the product's masks against the float32 masks, per label.
3. Peak resident memory of `ssam segment` with the product's defaults on a 512 x 512 x `--memory-slices` CT with five
   labels, minus the peak of the same command on a single 512 x 512 slice (the model, libraries and one slice):
   what the volume itself costs. Goal: at most 2 GiB. `--memory-base test-tinyvit` runs it with an adapter of the
   tiny test base made here: the same reading, slicing, masks and writing, minutes faster on a busy machine; the
   model's own memory is in the one-slice figure that is subtracted.
`--skip-slices`, `--skip-volume` leave out parts 1 and 2.
"""

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import bench_common as common

SOURCE = common.REPO.parent / "shared" / "data" / "totalsegmentator-ct" / "example_ct.nii.gz"
LABELS = ["liver", "spleen", "kidney"]
MEMORY_LABELS = ["liver", "spleen", "kidney", "stomach", "pancreas"]


def full_size_ct(source, slices: int, size: int = 512):
    """`source` resampled (linear) to size x size x slices over the same physical extent: square pixels from its x
    extent, the y extent centred and padded with air (-1024 HU), int16 as scanners write."""
    import SimpleITK as sitk

    image = sitk.ReadImage(str(source))
    extent = [n * s for n, s in zip(image.GetSize(), image.GetSpacing())]
    spacing = (extent[0] / size, extent[0] / size, extent[2] / slices)
    origin = list(image.GetOrigin())
    direction = image.GetDirection()
    offset = (size * spacing[1] - extent[1]) / 2  # along the image's y axis, in physical space
    origin = [o - offset * direction[3 * k + 1] for k, o in enumerate(origin)]
    return sitk.Resample(image, [size, size, slices], sitk.Transform(), sitk.sitkLinear, origin, spacing, direction,
                         -1024, sitk.sitkInt16)


def run_segment(image_path, output, labels, *options):
    """`ssam segment` in a fresh process: (wall seconds, peak RSS in MiB, its stdout)."""
    command = [sys.executable, "-m", "SSAMSegmentLib.cli", "segment", str(image_path), "--output", str(output)]
    for label in labels:
        command += ["--label", label]
    command += list(options)
    env = dict(os.environ, PYTHONPATH=str(common.REPO), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                               cwd=str(common.REPO))
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    out, err = process.stdout.read(), process.stderr.read()
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({process.returncode}): {err[-2000:]}")
    peak_mib = usage.ru_maxrss / 1024 if sys.platform != "darwin" else usage.ru_maxrss / 2 ** 20
    return seconds, peak_mib, out


def dice(a, b):
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def read_masks(path):
    import SimpleITK as sitk

    from SSAMSegmentLib.files.seg_nrrd import read_seg_nrrd

    masks, _ = read_seg_nrrd(path)
    return {name: sitk.GetArrayFromImage(mask).astype(bool) for name, mask in masks.items()}


def tiny_adapter(base, labels, folder):
    """An adapter of `base` (a test base: random weights) knowing `labels`, for the memory run."""
    import torch

    import SSAMSegmentLib

    model = SSAMSegmentLib.load(base=base, device="cpu")
    generator = torch.Generator().manual_seed(0)
    for label in labels:
        model.labels.add(label, torch.randn(model.text_dim, generator=generator))
    return model.save_adapter(Path(folder) / f"{base}.adapter.safetensors")


def int8_encoder(model):
    """The model's fast float32 encoder copy with its Linear layers dynamically quantised to int8."""
    import torch

    from SSAMSegmentLib.model.fast_encoder import build_fast_encoder

    fast = build_fast_encoder(model.image_encoder, model.spec.encoder_kind, "cpu")
    return torch.ao.quantization.quantize_dynamic(fast, {torch.nn.Linear}, dtype=torch.qint8)


def per_slice(args, volume):
    """Interleaved float32 / bf16 / int8 on a few middle slices, every slice encoded; Dice against float32."""
    import SimpleITK as sitk

    import SSAMSegmentLib
    from SSAMSegmentLib.inference.slice_inference import segment_image

    middle = volume.GetSize()[2] // 2
    part = volume[:, :, middle - args.per_slice // 2: middle - args.per_slice // 2 + args.per_slice]
    model = SSAMSegmentLib.load(adapter="default", device="cpu", merge=True)
    quantised = int8_encoder(model)
    normal_get = model._fast_encoder.get

    def run(precision, int8=False):
        model.set_precision(precision)
        model._fast_encoder.get = (lambda *a, **k: quantised) if int8 else normal_get
        try:
            return segment_image(model, part, args.labels, axis="axial", probe_mm=None)
        finally:
            model._fast_encoder.get = normal_get

    variants = {"float32": lambda: run("float32"), "bf16": lambda: run("bf16"),
                "int8 Linear layers": lambda: run("float32", int8=True)}
    results = {name: variant() for name, variant in variants.items()}  # also the warm-up round
    times = common.interleaved(variants, args.repeats, warmup=0)
    reference = {label: sitk.GetArrayFromImage(results["float32"].masks[label]).astype(bool) for label in args.labels}
    rows = []
    for name in variants:
        seconds = common.median(times[name]) / args.per_slice
        agreement = "; ".join(
            f"{label} {dice(reference[label], sitk.GetArrayFromImage(results[name].masks[label]).astype(bool)):.3f}"
            for label in args.labels)
        rows.append([name, f"{seconds / (common.median(times['float32']) / args.per_slice):.2f}", f"{seconds:.2f}",
                     common.spread([t / args.per_slice for t in times[name]]), agreement])
    return rows


def main():
    parser = common.arguments(__doc__.split("\n")[0])
    parser.add_argument("--source", default=str(SOURCE), help="the real CT to resample (default: example_ct)")
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--labels", nargs="+", default=LABELS)
    parser.add_argument("--per-slice", type=int, default=4, help="middle slices timed per precision")
    parser.add_argument("--memory-slices", type=int, default=600, help="0: skip the memory run")
    parser.add_argument("--skip-baseline", action="store_true", help="no float32 every-slice run (saves minutes)")
    parser.add_argument("--skip-slices", action="store_true", help="no per-slice comparison (part 1)")
    parser.add_argument("--skip-volume", action="store_true", help="no whole-volume runs (part 2)")
    parser.add_argument("--memory-base", default=None, help="base of the memory run's adapter (default: the default "
                                                            "adapter's); a test base makes it fast")
    parser.set_defaults(repeats=2)
    args = parser.parse_args()
    common.set_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the `ssam segment` children

    import SimpleITK as sitk

    folder = Path(tempfile.mkdtemp(prefix="ssam-bench-volume-"))
    volume = full_size_ct(args.source, args.slices)
    ct = folder / f"ct_{args.slices}.nrrd"
    sitk.WriteImage(volume, str(ct), False)
    size = " x ".join(map(str, volume.GetSize()))
    print(f"made {ct} ({size})", flush=True)

    slice_rows, whole_rows, agreement = [], [], ""
    if not args.skip_slices:
        slice_rows = per_slice(args, volume)
        print(common.table(["encoder", "time / float32", "s / slice", "min-max s", "Dice against float32"],
                           slice_rows), flush=True)
    if not args.skip_volume:
        product_s, product_mib, product_out = run_segment(ct, folder / "product.seg.nrrd", args.labels)
        print(f"product: {product_s:.1f} s, {product_mib:.0f} MiB peak: {product_out.strip()}", flush=True)
        whole_rows = [["product: `ssam segment` (defaults)", f"{product_s:.0f}", product_out.strip().splitlines()[0]]]
    if not args.skip_volume and not args.skip_baseline:
        base_s, base_mib, base_out = run_segment(ct, folder / "float32.seg.nrrd", args.labels, "--precision",
                                                 "float32", "--every-slice")
        print(f"float32 every slice: {base_s:.1f} s: {base_out.strip()}", flush=True)
        whole_rows.insert(0, ["`--precision float32 --every-slice` (before)", f"{base_s:.0f}",
                              base_out.strip().splitlines()[0]])
        exact, product = read_masks(folder / "float32.seg.nrrd"), read_masks(folder / "product.seg.nrrd")
        agreement = "Dice of the product's masks against the float32 every-slice masks: " + "; ".join(
            f"{label} {dice(exact[label], product[label]):.4f} ({int(exact[label].sum())} voxels)"
            for label in exact) + f". Speed-up {base_s / product_s:.1f}x."

    memory = ""
    if args.memory_slices:
        big = folder / f"ct_{args.memory_slices}.nrrd"
        sitk.WriteImage(full_size_ct(args.source, args.memory_slices), str(big), False)
        one = folder / "ct_1.nrrd"
        sitk.WriteImage(volume[:, :, args.slices // 2: args.slices // 2 + 1], str(one), False)
        options = []
        if args.memory_base:
            options = ["--adapter", str(tiny_adapter(args.memory_base, MEMORY_LABELS, folder))]
        _, model_mib, _ = run_segment(one, folder / "one.seg.nrrd", MEMORY_LABELS, *options)
        big_s, big_mib, big_out = run_segment(big, folder / "big.seg.nrrd", MEMORY_LABELS, *options)
        memory = (f"Memory: `ssam segment` on 512 x 512 x {args.memory_slices} with five labels "
                  f"({', '.join(MEMORY_LABELS)}; adapter base {args.memory_base or 'litemedsam'}) peaked at {big_mib:.0f} MiB resident against {model_mib:.0f} MiB for "
                  f"one 512 x 512 slice with the same labels: {(big_mib - model_mib) / 1024:.2f} GiB above the model "
                  f"(goal <= 2 GiB); {big_s:.0f} s. The input alone is "
                  f"{512 * 512 * args.memory_slices * 2 / 2 ** 30:.2f} GiB (int16), each label's uint8 mask "
                  f"{512 * 512 * args.memory_slices / 2 ** 30:.2f} GiB.")
        print(memory, flush=True)

    body = "\n".join([
        f"A real abdominal CT (TotalSegmentator's `{Path(args.source).name}`) resampled to {size} voxels "
        f"(benchmarks/bench_volume.py says how), labels {', '.join(args.labels)}, the default adapter. The machine "
        "is shared with other workers: compare the ratios, not the seconds, and note the load average above.",
        "",
        f"Per slice, {args.per_slice} middle slices, every slice encoded, interleaved, {args.repeats} rounds "
        "(medians):",
        "",
        common.table(["encoder", "time / float32", "s / slice", "min-max s", "Dice against float32"], slice_rows)
        if slice_rows else "(not run)",
        "",
        "The whole volume through `ssam segment` in a fresh process (loading, reading, writing included):",
        "",
        common.table(["run", "wall s", "summary line"], whole_rows) if whole_rows else "(not run)",
        "",
        agreement,
        "",
        memory,
    ])
    print(body)
    if not args.no_docs:
        common.write_section(args.docs, "volume", "A full-size CT end to end: precision, sparse slices, memory", body,
                             args.threads)


if __name__ == "__main__":
    main()
