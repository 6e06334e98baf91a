"""The `ssam` command: info, download, segment, evaluate, train, demo.

Every command turns a user-fixable problem (SSAMError, a bad argument) into one line on stderr and exit code 2,
Ctrl-C at any moment (the start-up imports included) into one line and exit code 130, checks its outputs before any
work (never an input, never an existing file without --overwrite) and writes them only when the work is complete.
"""

import os
import signal
import sys

CANCELLED_EXIT_CODE = 130


def _cancelled_at_start_up(signum, frame):
    """Ctrl-C before any work (parsing, importing PyTorch): nothing to clean up, so say so and stop at once."""
    print("ssam: cancelled (Ctrl-C); nothing was written", file=sys.stderr, flush=True)
    os._exit(CANCELLED_EXIT_CODE)


if __name__ == "__main__":  # `python -m SSAMSegmentLib.cli`: before any other import; `ssam` installs it in main()
    signal.signal(signal.SIGINT, _cancelled_at_start_up)

import argparse  # noqa: E402  (after the Ctrl-C handler, like every import below)

# OpenMP threads that wait by spinning make PyTorch several times slower whenever another process holds a core
# (a second job, a browser): wait passively. Set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from . import __version__  # noqa: E402
from .errors import SSAMError  # noqa: E402


class OneLineParser(argparse.ArgumentParser):
    """argparse prints a usage block before its error: a bad argument is one line like every other error."""

    def error(self, message):
        raise SSAMError(f"{message}; see `{self.prog} --help`")


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
        context = ("slices k-1, k, k+1 (trained with --neighbour-slices)" if metadata.get("neighbour_slices")
                   else "slice k")
        print(f"  input slices  {context}")
        kinds = metadata.get("image_kinds") or {}  # what segmenting warns from (model/labels.py other_kind)
        if kinds:
            taught_on = "; ".join(f"{label} ({', '.join(value)})" for label, value in kinds.items())
            print(f"  taught on     {taught_on}")
        tiles = metadata.get("tiles") or {}  # inference/tiling.py
        if tiles:
            listed = ", ".join(f"{label} ({value['tile']} px)" for label, value in tiles.items())
            print(f"  tiles         {listed}")
        for route in metadata.get("routes") or []:  # model/label_routes.py
            print(f"  routed        {', '.join(route['labels'])} through the network of "
                  f"{(route.get('training') or {}).get('file', 'another adapter')}")
        for key, value in (metadata.get("training") or {}).items():
            print(f"  {key:<14}{value}")
    return 0


# --- download -------------------------------------------------------------------------------------------------------


def _download(args) -> int:
    from .model.weights import WEIGHT_FILES, download

    weight = WEIGHT_FILES[args.weights]
    update, close = _progress_bar(f"downloading {weight.id}")
    try:
        path = download(weight, progress=lambda done, total: update(done / (total or weight.size), f"{done >> 20} MB"),
                        overwrite=args.overwrite)
    finally:
        close()
    print(f"{weight.id}: {path} (SHA256 verified)")
    return 0


# --- segment --------------------------------------------------------------------------------------------------------


def _parse_window(text):
    from .inference.intensity import check_window

    if text is None:
        return None
    parts = text.split(",")
    if len(parts) != 2:
        raise SSAMError(f"--window '{text}' is not LEVEL,WIDTH; e.g. --window 40,400 for soft tissue")
    return check_window(parts)


def _prompts(args):
    """--box/--point/--negative-point, each '[LABEL=]numbers', as {label: PhysicalPrompt}."""
    from .inference.physical_prompts import PhysicalPrompt, parse_box, parse_point
    from .model.labels import parse_labels
    from .model.text_encoders import label_key

    labels = parse_labels(args.label)
    prompts = {}
    for option, values in (("--box", args.box), ("--point", args.point), ("--negative-point", args.negative_point)):
        for text in values or []:
            name, _, numbers = text.rpartition("=")
            if not name:
                if len(labels) > 1:
                    raise SSAMError(f"{option} '{text}': with several labels, say which: {option} LABEL=...")
                name = labels[0]
            label = next((l for l in labels if label_key(l) == label_key(name)), None)
            if label is None:
                raise SSAMError(f"{option} names '{name}', which is not among --label {', '.join(labels)}")
            prompt = prompts.setdefault(label, PhysicalPrompt(points=[], negative_points=[]))
            if option == "--box":
                if prompt.box is not None:
                    raise SSAMError(f"two --box for '{label}'; give one box per label")
                prompt.box = parse_box(numbers)
            else:
                (prompt.points if option == "--point" else prompt.negative_points).append(parse_point(numbers, option))
    return prompts


def _segment(args) -> int:
    from .inference.segment_files import check_segment_outputs, dicom_source_for, segment_file
    from .inference.slice_inference import check_threshold
    from .inference.sparse_slices import DEFAULT_PROBE_MM
    from .model.labels import parse_labels

    output, preview = check_segment_outputs(args.input, args.output, args.preview, args.overwrite, args.format)
    dicom_source = dicom_source_for(args.input, output)  # a DICOM SEG of a non-DICOM input fails here, before work
    parse_labels(args.label)
    check_threshold(args.threshold)
    window = _parse_window(args.window)
    prompts = _prompts(args)
    if args.box_only and not prompts:
        raise SSAMError("--box-only needs a --box or --point to prompt with")
    from .model.loading import load

    model = load(base=args.base, adapter=args.adapter or "default", device=args.device, merge=True,
                 precision=args.precision)
    update, close = _progress_bar("segmenting")
    try:
        result = segment_file(model, args.input, args.label, output, axis=args.axis, preview=preview,
                              threshold=args.threshold, intensity=args.intensity, window=window,
                              progress=update, overwrite=args.overwrite, dicom_source=dicom_source,
                              probe_mm=None if args.every_slice else DEFAULT_PROBE_MM,
                              context=args.context, prompts=prompts, use_text=not args.box_only,
                              self_box=args.self_box,
                              allow_gaps=args.allow_gaps, series=args.series)
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

    return run_demo(args.output, device=args.device, data_folder=args.data, overwrite=args.overwrite)


# --- parser ---------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from .files.atomic_file import add_overwrite_argument
    from .training import evaluation
    from . import training_cli
    from .model.bases import BASES
    from .inference.slice_geometry import AXES
    from .inference.intensity import INTENSITY_MODES
    from .model.text_encoders import TEXT_ENCODERS
    from .model.devices import DEVICE_CHOICES, PRECISIONS
    from .model.weights import WEIGHT_FILES
    from .files.writers import OUTPUT_FORMATS

    parser = OneLineParser(prog="ssam", description="S-SAM: segment medical images from a label name.")
    parser.add_argument("--version", action="version", version=f"ssam {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=OneLineParser)

    info = commands.add_parser("info", help="show a model's base, text encoder and (trainable) parameters")
    info.add_argument("--base", choices=sorted(BASES))
    info.add_argument("--text-encoder", choices=sorted(TEXT_ENCODERS))
    info.add_argument("--image-size", type=int)
    info.add_argument("--no-weights", action="store_true", help="random weights: counts without any download")
    info.add_argument("--adapter", help="an adapter file (or 'default'): also show its labels and training")
    info.set_defaults(run=_info)

    download = commands.add_parser("download", help="download and verify pretrained weights into the cache")
    download.add_argument("weights", choices=sorted(WEIGHT_FILES))
    add_overwrite_argument(download)
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
    segment.add_argument("--context", choices=("auto", "off"), default="auto",
                         help="auto: each slice checked against its neighbours (slice smoothing, small 3D pieces "
                              "removed, one piece for organs the adapter marks; docs/benchmarks.md); off: slices alone")
    segment.add_argument("--self-box", choices=("auto", "off"), default="auto",
                         help="auto: the labels the adapter's training chose (one-object labels such as polyps) are "
                              "redrawn by the base from their own mask's box where it is confident; off: the text "
                              "masks alone")
    prompt_help = ("in PHYSICAL coordinates: LPS millimetres (x to the patient's left, y posterior, z superior; "
                   "Slicer shows RAS, so negate x and y), so it means the same in any viewer; prefix LABEL= when "
                   "there are several labels")
    segment.add_argument("--box", action="append", metavar="[LABEL=]X0,Y0,Z0,X1,Y1,Z1",
                         help="correct a label with a box (two opposite corners) on one slice; the correction is "
                              "carried to the neighbouring slices until the structure ends; " + prompt_help)
    segment.add_argument("--point", action="append", metavar="[LABEL=]X,Y,Z",
                         help="a point inside the structure (repeatable), on the box's slice; " + prompt_help)
    segment.add_argument("--negative-point", action="append", metavar="[LABEL=]X,Y,Z",
                         help="a point outside the structure (repeatable); " + prompt_help)
    segment.add_argument("--box-only", action="store_true",
                         help="correct with the box and points alone, without the label's text (the base model as "
                              "it was trained)")
    segment.add_argument("--allow-gaps", action="store_true",
                         help="segment a DICOM series with missing slices (the gaps stay empty at their true position)")
    segment.add_argument("--series", metavar="UID", help="the DICOM series to read from a folder holding several")
    add_overwrite_argument(segment)
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
    add_overwrite_argument(demo)
    demo.set_defaults(run=_demo)
    return parser


def _one_line_notes(command_name, held):
    """Our notes (a chosen DICOM series, a replaced spacing) are held and said, one `note:` line each, when the
    command succeeds: a failed command says only its error. Other libraries' warnings (PyTorch, ITK through Python)
    are not for the user of a command and add no lines."""
    import warnings

    from .errors import SSAMNote

    def hold(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, SSAMNote):
            held.append(f"{command_name()}: note: {message}")

    warnings.showwarning = hold
    warnings.simplefilter("always", SSAMNote)


def main(argv=None) -> int:
    import warnings

    previous = signal.getsignal(signal.SIGINT)
    if previous is signal.default_int_handler:  # not where a host (or `python -m`) installed its own handler
        signal.signal(signal.SIGINT, _cancelled_at_start_up)
    command = ["ssam"]  # named once the arguments are parsed
    notes = []
    with warnings.catch_warnings():
        _one_line_notes(lambda: command[0], notes)
        try:
            args = build_parser().parse_args(argv)
            command[0] = f"ssam {args.command}"
            signal.signal(signal.SIGINT, signal.default_int_handler)  # from here Ctrl-C cleans up what it stops
            code = int(args.run(args) or 0)
            for line in notes:
                print(line, file=sys.stderr)
            return code
        except SSAMError as error:
            print(f"{command[0]}: error: {error}", file=sys.stderr)
            return error.exit_code
        except KeyboardInterrupt:
            print(f"{command[0]}: cancelled (Ctrl-C); nothing partial was written", file=sys.stderr)
            return CANCELLED_EXIT_CODE
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)


if __name__ == "__main__":
    sys.exit(main())
