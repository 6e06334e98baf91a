"""The `ssam` command: info, download, segment, evaluate, train, demo.

Every command turns a user-fixable problem (SSAMError) into one line on stderr and exit code 2, Ctrl-C into
"cancelled" and exit code 130, and writes its outputs only when the work is complete.
"""

import argparse
import os
import sys

# OpenMP threads that wait by spinning make PyTorch several times slower whenever another process holds a core
# (a second job, a browser): wait passively. Set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from . import __version__
from .model.devices import DEVICE_CHOICES, PRECISIONS
from .errors import SSAMError


def _progress_bar(description):
    """A progress(fraction, message) callback and a close function: a tqdm bar on a terminal, a plain line every
    10% in a log file."""
    if not sys.stderr.isatty():
        state = {"next": 0.0}

        def log(fraction, message=""):
            if fraction >= state["next"] or fraction >= 1.0:
                print(f"{description}: {fraction:4.0%} {message}", file=sys.stderr, flush=True)
                state["next"] = fraction + 0.1

        return log, lambda: None

    from tqdm import tqdm

    bar = tqdm(total=1000, desc=description, unit="", file=sys.stderr,
               bar_format="{desc}: {percentage:3.0f}%|{bar}| {postfix} [{elapsed}<{remaining}]")

    def update(fraction, message=""):
        bar.n = int(round(fraction * 1000))
        bar.set_postfix_str(message, refresh=False)
        bar.refresh()

    return update, bar.close


# --- info -----------------------------------------------------------------------------------------------------------


def _info(args) -> int:
    from .model.adapter import read_metadata
    from .model.loading import load, resolve_adapter

    metadata = read_metadata(resolve_adapter(args.adapter)) if args.adapter else None
    base = args.base or (metadata or {}).get("base")
    text = args.text_encoder or (metadata or {}).get("text_encoder")
    size = args.image_size or (metadata or {}).get("image_size")
    model = load(base=base, text_encoder=text, image_size=size, weights="none" if args.no_weights else "auto",
                 device="cpu")
    counts = model.parameter_counts()
    print(f"base            {model.spec.id}: {model.spec.description}")
    print(f"weights         {'random (--no-weights)' if args.no_weights else 'pretrained, SHA256 ' + model.base_sha256}")
    print(f"text encoder    {model.text_encoder_id} ({model.text_dim}-d)")
    print(f"image size      {model.image_size}")
    share = 100.0 * counts["trainable"] / counts["total"]
    print(f"parameters      {counts['total']:,} total, {counts['trainable']:,} trainable ({share:.2f}%)")
    for group in ("singular values", "norms", "positional embedding", "text affine layer", "decoder norms"):
        print(f"  {group:<22}{counts[group]:>12,}")
    if metadata:
        print(f"adapter         {args.adapter}")
        print(f"  taught labels {', '.join(metadata.get('labels', [])) or '(none)'}")
        print(f"  base SHA256   {metadata.get('base_sha256')}")
        for key, value in (metadata.get("training") or {}).items():
            print(f"  {key:<14}{value}")
    return 0


# --- download -------------------------------------------------------------------------------------------------------


def _download(args) -> int:
    from .model.weights import WEIGHT_FILES, download

    weight = WEIGHT_FILES[args.weights]
    update, close = _progress_bar(f"downloading {weight.id}")
    try:
        path = download(weight, progress=lambda done, total: update(done / (total or weight.size), f"{done >> 20} MB"))
    finally:
        close()
    print(f"{weight.id}: {path} (SHA256 verified)")
    return 0


# --- segment --------------------------------------------------------------------------------------------------------


def _parse_window(text):
    if text is None:
        return None
    try:
        level, width = (float(v) for v in text.split(","))
    except ValueError:
        raise SSAMError(f"--window '{text}' is not LEVEL,WIDTH; e.g. --window 40,400 for soft tissue") from None
    return level, width


def _segment(args) -> int:
    from .model.loading import load
    from .inference.segment_files import check_output_path, dicom_source_for, resolve_output, segment_file
    from .inference.sparse_slices import DEFAULT_PROBE_MM

    output = check_output_path(resolve_output(args.input, args.output, args.format))
    dicom_source = dicom_source_for(args.input, output)  # a DICOM SEG of a non-DICOM input fails here, before work
    model = load(base=args.base, adapter=args.adapter or "default", device=args.device, merge=True,
                 precision=args.precision)
    update, close = _progress_bar("segmenting")
    try:
        result = segment_file(model, args.input, args.label, output, axis=args.axis, preview=args.preview,
                              threshold=args.threshold, intensity=args.intensity, window=_parse_window(args.window),
                              progress=update, dicom_source=dicom_source,
                              probe_mm=None if args.every_slice else DEFAULT_PROBE_MM)
    finally:
        close()
    print(result.summary())
    for note in result.notes:
        print(f"note: {note}")
    for warning in result.warnings:
        print(f"ssam segment: warning: {warning}", file=sys.stderr)
    for path in result.outputs:
        print(f"wrote {path}")
    return 0


def _demo(args) -> int:
    from .demo import run_demo

    return run_demo(args.output, device=args.device, data_folder=args.data)


# --- parser ---------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from .training import evaluation
    from . import training_cli
    from .model.bases import BASES
    from .inference.slice_geometry import AXES
    from .inference.intensity import INTENSITY_MODES
    from .model.text_encoders import TEXT_ENCODERS
    from .model.weights import WEIGHT_FILES
    from .files.writers import OUTPUT_FORMATS

    parser = argparse.ArgumentParser(prog="ssam", description="S-SAM: segment medical images from a label name.")
    parser.add_argument("--version", action="version", version=f"ssam {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    info = commands.add_parser("info", help="show a model's base, text encoder and (trainable) parameters")
    info.add_argument("--base", choices=sorted(BASES))
    info.add_argument("--text-encoder", choices=sorted(TEXT_ENCODERS))
    info.add_argument("--image-size", type=int)
    info.add_argument("--no-weights", action="store_true", help="random weights: counts without any download")
    info.add_argument("--adapter", help="an adapter file (or 'default'): also show its labels and training")
    info.set_defaults(run=_info)

    download = commands.add_parser("download", help="download and verify pretrained weights into the cache")
    download.add_argument("weights", choices=sorted(WEIGHT_FILES))
    download.set_defaults(run=_download)

    segment = commands.add_parser("segment", help="segment an image from label names")
    segment.add_argument("input", help="image file (NIfTI, NRRD, MHA, PNG, JPEG, TIFF, BMP) or DICOM series folder")
    segment.add_argument("--label", action="append", required=True,
                         help="label name; repeat (or separate with commas) for several; `ssam info --adapter "
                              "default` lists the labels the adapter was taught")
    segment.add_argument("--adapter", help="adapter file (default: the adapter shipped with SSAM Segment)")
    segment.add_argument("--base", choices=sorted(BASES), help="base model (default: the adapter's)")
    segment.add_argument("--output", help="output .seg.nrrd, label map .nii.gz/.nrrd, or DICOM SEG .dcm (DICOM input "
                                          "only) (default: ./<input>.seg.nrrd, or the --format's suffix)")
    segment.add_argument("--format", choices=sorted(OUTPUT_FORMATS),
                         help="output type when --output is not given (dicom-seg: ./<input>.dcm)")
    segment.add_argument("--axis", choices=AXES, default="auto")
    segment.add_argument("--device", default="auto", help=f"one of {', '.join(DEVICE_CHOICES)} or cuda:N")
    segment.add_argument("--threshold", type=float, default=0.5, help="mask probability threshold (default 0.5)")
    segment.add_argument("--intensity", choices=INTENSITY_MODES, default="auto", help="intensity normalisation")
    segment.add_argument("--window", help="CT window as LEVEL,WIDTH in HU (e.g. 40,400)")
    segment.add_argument("--preview", help="also write a PNG montage of the slices with most foreground")
    segment.add_argument("--precision", choices=PRECISIONS, default="auto",
                         help="auto (default): bf16 where the CPU or GPU computes it natively, else float32; "
                              "float32 forces full precision (the summary line says which ran)")
    segment.add_argument("--every-slice", action="store_true",
                         help="encode every slice; by default slices between two empty probes 10 mm apart are "
                              "left empty (structures shorter than that along the slice axis may be missed)")
    segment.set_defaults(run=_segment)

    evaluate = commands.add_parser("evaluate", help="Dice, IoU and HD95 of predictions against references")
    evaluation.add_arguments(evaluate)
    evaluate.set_defaults(run=evaluation.run)

    train = commands.add_parser("train", help="fine-tune an adapter on a labelled dataset")
    training_cli.add_arguments(train)
    train.set_defaults(run=training_cli.run)

    demo = commands.add_parser("demo", help="segment real images (glands, nuclei, CT) with the shipped default adapter")
    demo.add_argument("--output", default="ssam-demo", help="output folder (default ./ssam-demo)")
    demo.add_argument("--data", help="folder holding glas-15/ for the gland image, which cannot be shipped "
                                     "(default: $SSAM_TEST_DATA, else the shared data folder beside the repository)")
    demo.add_argument("--device", default="auto")
    demo.set_defaults(run=_demo)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except SSAMError as error:
        print(f"ssam {args.command}: error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print(f"ssam {args.command}: cancelled (Ctrl-C); nothing partial was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
