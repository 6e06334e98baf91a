"""File in, files out: the whole `ssam segment` job, shared by the command line and Slicer's batch script."""

import os
from pathlib import Path

from ..files.atomic_file import check_outputs
from ..errors import SSAMError
from ..files.image_io import read_image, strip_image_suffix
from .intensity import check_window
from .slice_inference import check_threshold, segment_image, unique_labels


def default_output(input_path, folder=".") -> Path:
    return Path(folder) / f"{strip_image_suffix(Path(input_path).name.rstrip('/')) or 'segmentation'}.seg.nrrd"


def _path_argument(value, what: str):
    if value is None:
        return None
    if not isinstance(value, (str, os.PathLike)) or not str(value).strip():
        raise SSAMError(f"{what} {value!r} is not a file path; give a path such as case.nii.gz")
    return Path(value).expanduser()


def check_segment_outputs(input_path, output_path=None, preview=None, overwrite=False):
    """Fail before any work when the outputs cannot be written as asked (type, an input, an existing file, no
    permission). Returns (output, preview), the preview None when not asked for."""
    from ..files.writers import OUTPUT_SUFFIXES, output_suffix, sidecar_path

    input_path = _path_argument(input_path, "input")
    if input_path is None:
        raise SSAMError("no input image given; give an image file or a DICOM series folder")
    output = _path_argument(output_path, "output") or default_output(input_path)
    preview = _path_argument(preview, "preview")
    if output_suffix(output) is None:
        raise SSAMError(f"output {output} has an unsupported type; end it with one of: {', '.join(OUTPUT_SUFFIXES)}")
    if preview is not None and not preview.name.lower().endswith(".png"):
        raise SSAMError(f"preview {preview} must be a .png file")
    sidecar = sidecar_path(output) if output_suffix(output) != ".seg.nrrd" else None
    check_outputs([output, sidecar, preview], inputs=[input_path], overwrite=overwrite)
    return output, preview


def segment_file(model, input_path, labels, output_path=None, axis="auto", preview=None, threshold=0.5,
                 intensity="auto", window=None, progress=None, cancel=None, overwrite=False, **read_options):
    """Read `input_path`, segment `labels`, write `output_path` (.seg.nrrd or a label map) and an optional PNG preview.

    Outputs and options are checked before any work; an input is never written to and an existing output is
    replaced only with `overwrite=True`. The outputs are written as one set once the whole result exists: a bad
    input, Ctrl-C or a full disk leaves no file of the set and any earlier file untouched. `read_options` go to
    read_image (allow_gaps, series). Returns the SegmentationResult with `.outputs`, the written paths.
    """
    from ..files.writers import write_outputs

    output_path, preview = check_segment_outputs(input_path, output_path, preview, overwrite)
    unique_labels(labels)
    check_threshold(threshold)
    window = check_window(window)
    image = read_image(input_path, **read_options)
    result = segment_image(model, image, labels, axis=axis, threshold=threshold, intensity=intensity, window=window,
                           progress=progress, cancel=cancel)
    result.outputs = write_outputs(output_path, image, result.masks, preview_path=preview,
                                   array_axis=result.array_axis)
    return result
