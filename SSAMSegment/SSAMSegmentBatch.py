"""Segment image files without the GUI: one .seg.nrrd per input (or a DICOM SEG per DICOM input), a summary
line per case.

    Slicer --no-main-window --python-script SSAMSegmentBatch.py --input FILE_OR_FOLDER --label gland [--label ...]
        --output FOLDER [--adapter FILE] [--device auto|cpu|gpu|cuda|mps] [--axis auto|axial|coronal|sagittal]
        [--overwrite] [--allow-gaps] [--dicom-seg]

--dicom-seg: DICOM inputs (series folders, .dcm files) get a DICOM SEG <case>.dcm that references their series, for
a PACS; the other inputs still get their .seg.nrrd.

The same script runs under any Python that has SSAM Segment's packages (python SSAMSegmentBatch.py ...).
A folder input means every image file in it (NIfTI, NRRD, MHA, PNG, JPEG, TIFF, BMP) and every sub-folder (a DICOM
series). Exit code: 0 when every case succeeded, 1 when any failed (the others are still done and written),
2 for bad arguments (one line on stderr, nothing is done), 130 when interrupted. Every output is checked before any
work: an input is never written to, and an existing output (a re-run) is refused unless --overwrite is given. The
segmentation itself is SSAMSegmentLib.segment_file, the same function as `ssam segment`; outputs are written only
once complete.
"""

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: spinning waits stall under shared CPUs

_SCRIPT = Path(globals().get("__file__") or sys.argv[0]).resolve()
# Installed, SSAMSegmentLib sits next to this script; in the source tree it is one folder up.
for _folder in (_SCRIPT.parent, _SCRIPT.parent.parent):
    if (_folder / "SSAMSegmentLib").is_dir():
        if str(_folder) not in sys.path:
            sys.path.insert(0, str(_folder))
        break

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
AXES = ("auto", "axial", "coronal", "sagittal")


class UsageError(Exception):
    """Bad arguments: reported in one line, exit code 2, nothing done."""


_PROG = "SSAMSegmentBatch.py"


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse would call sys.exit, which does not end Slicer
        raise UsageError(message)

    def exit(self, status=0, message=None):  # --help
        if message:
            print(message, file=sys.stderr)
        raise SystemExit(status)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=_PROG, description="Segment image files by label name with SSAM Segment.")
    parser.add_argument("--input", required=True, help="an image file, a DICOM series folder, or a folder of images")
    parser.add_argument("--label", action="append", required=True,
                        help="structure name; repeat (or separate with commas) for several")
    parser.add_argument("--output", required=True, help="folder for the .seg.nrrd files (created if needed)")
    parser.add_argument("--adapter", default="default", help="adapter file (default: the adapter shipped with SSAM Segment)")
    parser.add_argument("--device", default="auto", help="auto (default), cpu, gpu, cuda, cuda:N or mps")
    parser.add_argument("--axis", choices=AXES, default="auto", help="slice axis (default: auto)")
    # Checked by SSAMSegmentLib.load (its PRECISIONS), which the parser cannot import before the packages are there.
    parser.add_argument("--precision", default="auto",
                        help="auto (default): bf16 where the hardware computes it natively; float32 forces it off")
    # Checked by segment_file (inference/self_box.py CHOICES), for the same reason as --precision.
    parser.add_argument("--self-box", default="auto",
                        help="auto (default): the labels the adapter chose are redrawn by the base from their own "
                             "mask's box where it is confident (more accurate, slower on those slices); off: text alone")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace outputs that already exist (a re-run); without it they are refused")
    parser.add_argument("--allow-gaps", action="store_true",
                        help="segment DICOM series with missing slices (the gaps stay empty at their true position)")
    parser.add_argument("--dicom-seg", action="store_true",
                        help="write a DICOM SEG (.dcm) for each DICOM input instead of a .seg.nrrd")
    return parser


def find_inputs(path: Path):
    """The cases of an --input: the file itself, a DICOM folder, or the images and series folders in a folder."""
    from SSAMSegmentLib.files.image_io import has_image_suffix

    if not path.exists():
        raise UsageError(f"input {path} does not exist")
    if path.is_file():
        return [path]
    entries = sorted(path.iterdir())
    images = [p for p in entries if p.is_file() and has_image_suffix(p) and not p.name.lower().endswith(".dcm")]
    series = [p for p in entries if p.is_dir() and not p.name.startswith(".")]
    if not images and not series:
        # A folder of DICOM files (or nothing usable): the folder itself is the one case.
        if any(p.is_file() and not p.name.startswith(".") for p in entries):
            return [path]
        raise UsageError(f"input folder {path} has no images; give an image file or a folder of images")
    return images + series


def is_dicom_input(path: Path) -> bool:
    """A case read from DICOM: a series folder (find_inputs' folders) or a .dcm file."""
    return path.is_dir() or path.name.lower().endswith(".dcm")


def output_paths(inputs, folder: Path, overwrite: bool = False, dicom_seg: bool = False):
    """One output per case in `folder` (.seg.nrrd, or a DICOM SEG .dcm with --dicom-seg for DICOM inputs), checked
    like every output of SSAM Segment (check_outputs): never an input, never an existing file without --overwrite,
    two cases never onto one name. Creates nothing."""
    from SSAMSegmentLib import SSAMError
    from SSAMSegmentLib.files.atomic_file import check_outputs
    from SSAMSegmentLib.files.writers import OUTPUT_FORMATS
    from SSAMSegmentLib.inference.segment_files import default_output

    outputs = [default_output(item, folder, OUTPUT_FORMATS["dicom-seg" if dicom_seg and is_dicom_input(item)
                                                           else "seg-nrrd"]) for item in inputs]
    seen = {}
    for item, output in zip(inputs, outputs):
        if output in seen:
            raise UsageError(f"{seen[output].name} and {item.name} would both be written to {output.name}; "
                             f"rename one of them")
        seen[output] = item
    try:
        check_outputs(outputs, inputs=inputs, overwrite=overwrite)
    except SSAMError as error:
        raise UsageError(str(error).replace("(overwrite=True in Python) ", "")) from None
    return outputs


def show_notes() -> None:
    """SSAM Segment's notes (a chosen DICOM series, a replaced spacing) as one NOTE line each in the log."""
    import warnings

    from SSAMSegmentLib.errors import SSAMNote

    default = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, SSAMNote):
            print(f"NOTE   {message}", flush=True)
        else:
            default(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    warnings.simplefilter("always", SSAMNote)


def device_name(text: str) -> str:
    """'gpu' is the CUDA GPU, or Apple's MPS on a Mac."""
    if text.strip().lower() == "gpu":
        return "mps" if sys.platform == "darwin" else "cuda"
    return text


def run(argv) -> int:
    try:
        args = build_parser().parse_args(argv)
        from SSAMSegmentLib.model.labels import split_labels, unique

        labels = unique(split_labels(args.label))
        if not labels:
            raise UsageError("--label is empty; name the structure to segment, e.g. --label liver")
        output_folder = Path(args.output).expanduser()
        if output_folder.exists() and not output_folder.is_dir():
            raise UsageError(f"--output {output_folder} is a file; give a folder")
        try:
            import SSAMSegmentLib
            from SSAMSegmentLib import SSAMError
        except ImportError as error:
            print(f"SSAM Segment's Python packages are missing ({error}); in Slicer, open the SSAM Segment module "
                  f"once and agree to install them", file=sys.stderr)
            return EXIT_USAGE
        from SSAMSegmentLib.inference.self_box import CHOICES

        if args.self_box not in CHOICES:
            raise UsageError(f"--self-box {args.self_box}: use one of {', '.join(CHOICES)}")
        inputs = find_inputs(Path(args.input).expanduser())
        outputs = output_paths(inputs, output_folder, args.overwrite, dicom_seg=args.dicom_seg)  # creates nothing
        if args.dicom_seg and any(is_dicom_input(item) for item in inputs):
            from SSAMSegmentLib.files.dicom_seg import highdicom_module

            try:
                highdicom_module()
            except SSAMError as error:
                raise UsageError(str(error)) from None
        try:
            model = SSAMSegmentLib.load(adapter=args.adapter, device=device_name(args.device), merge=True,
                                        precision=args.precision)
        except SSAMError as error:
            raise UsageError(str(error)) from None
    except UsageError as error:
        print(f"{_PROG}: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:  # while PyTorch and the model load: nothing was started
        print(f"{_PROG}: cancelled (Ctrl-C) before any case; nothing was written", file=sys.stderr)
        return EXIT_INTERRUPTED
    except SystemExit as done:  # --help
        return int(done.code or 0)

    show_notes()
    print(f"SSAM Segment: {len(inputs)} case(s), labels {', '.join(labels)}, model {model.spec.id}, "
          f"device {model.device}, precision {model.precision}", flush=True)
    failed, said = [], set()
    for item, output in zip(inputs, outputs):
        start = time.perf_counter()
        try:
            result = SSAMSegmentLib.segment_file(model, item, labels, output, axis=args.axis, overwrite=args.overwrite,
                                                 allow_gaps=args.allow_gaps, self_box=args.self_box)
        except KeyboardInterrupt:
            print(f"cancelled during {item.name}; its output was not written", flush=True)
            return EXIT_INTERRUPTED
        except SSAMError as error:
            failed.append(item.name)
            print(f"FAILED {item.name}: {error}", flush=True)
            continue
        except Exception as error:  # a bug, but the remaining cases are still worth doing
            failed.append(item.name)
            print(f"FAILED {item.name}: internal error ({type(error).__name__}: {error})", flush=True)
            continue
        print(f"OK     {item.name} -> {output} ({time.perf_counter() - start:.1f} s): {result.summary()}", flush=True)
        lines = [f"note: {note}" for note in result.notes] + [f"warning: {warning}" for warning in result.warnings]
        for line in lines:  # a label's note is the same for every case: said once
            if line not in said:
                said.add(line)
                print(f"       {line}", flush=True)
    done = len(inputs) - len(failed)
    print(f"{done} of {len(inputs)} case(s) segmented" + (f"; failed: {', '.join(failed)}" if failed else ""),
          flush=True)
    return EXIT_FAILED if failed else EXIT_OK


def finish(code: int) -> None:
    """End the process with `code`: slicer.util.exit inside Slicer (sys.exit would not end it), sys.exit outside."""
    try:
        import slicer
    except ImportError:
        slicer = None
    if slicer is not None and getattr(slicer, "app", None) is not None:
        slicer.util.exit(code)
    else:
        sys.exit(code)


if __name__ == "__main__":
    finish(run(sys.argv[1:]))
