"""File in, files out: the whole `ssam segment` job, shared by the command line and Slicer's batch script."""

import os
from pathlib import Path

from ..files.atomic_file import check_outputs
from ..errors import SSAMError
from ..files.image_io import read_image, strip_image_suffix
from .intensity import check_window
from .refinement import apply_refinements, check_prompts
from .slice_inference import check_threshold, segment_image
from .sparse_slices import DEFAULT_PROBE_MM
from ..model.labels import parse_labels


def default_output(input_path, folder=".", suffix=".seg.nrrd") -> Path:
    return Path(folder) / f"{strip_image_suffix(Path(input_path).name.rstrip('/')) or 'segmentation'}{suffix}"


def resolve_output(input_path, output_path=None, output_format=None) -> Path:
    """The output path of a job: `output_path` as given, else ./<input name> with the suffix of `output_format`
    (writers.OUTPUT_FORMATS: 'seg-nrrd' by default, 'nifti', 'nrrd', 'dicom-seg'). A format that contradicts the
    given output's suffix is an error rather than a guess."""
    from ..files.writers import OUTPUT_FORMATS, output_suffix

    if output_format is not None and output_format not in OUTPUT_FORMATS:
        raise SSAMError(f"unknown output format {output_format!r}; use one of: {', '.join(OUTPUT_FORMATS)}")
    if output_path is None:
        output_path = default_output(input_path, suffix=OUTPUT_FORMATS[output_format or "seg-nrrd"])
    output_path = Path(output_path)
    if output_format is not None and output_suffix(output_path) != OUTPUT_FORMATS[output_format]:
        raise SSAMError(f"--format {output_format} writes *{OUTPUT_FORMATS[output_format]} files, but the output is "
                        f"{output_path.name}; change one of them")
    return output_path  # an output onto its input (`ssam segment 02.dcm --format dicom-seg`): check_outputs refuses


def _path_argument(value, what: str):
    if value is None:
        return None
    if not isinstance(value, (str, os.PathLike)) or not str(value).strip():
        raise SSAMError(f"{what} {value!r} is not a file path; give a path such as case.nii.gz")
    return Path(value).expanduser()


def check_segment_outputs(input_path, output_path=None, preview=None, overwrite=False, output_format=None):
    """Fail before any work when the outputs cannot be written as asked (type, an input, an existing file, no
    permission). Returns (output, preview), the preview None when not asked for."""
    from ..files.writers import LABEL_MAP_SUFFIXES, OUTPUT_SUFFIXES, output_suffix, sidecar_path

    input_path = _path_argument(input_path, "input")
    if input_path is None:
        raise SSAMError("no input image given; give an image file or a DICOM series folder")
    output = resolve_output(input_path, _path_argument(output_path, "output"), output_format)
    preview = _path_argument(preview, "preview")
    if output_suffix(output) is None:
        raise SSAMError(f"output {output} has an unsupported type; end it with one of: {', '.join(OUTPUT_SUFFIXES)}")
    if preview is not None and not preview.name.lower().endswith(".png"):
        raise SSAMError(f"preview {preview} must be a .png file")
    sidecar = sidecar_path(output) if output_suffix(output) in LABEL_MAP_SUFFIXES else None
    check_outputs([output, sidecar, preview], inputs=[input_path], overwrite=overwrite)
    return output, preview


def dicom_source_for(input_path, output_path):
    """The DicomSeries a DICOM SEG output must reference (None for other outputs); an SSAMError, before any work,
    when the output is a DICOM SEG but the input is not DICOM."""
    from ..files.writers import DICOM_SEG_SUFFIX, output_suffix

    if output_suffix(output_path) != DICOM_SEG_SUFFIX:
        return None
    from ..files.dicom_seg import highdicom_module
    from ..files.dicom_series import DicomSeries

    highdicom_module()  # missing (e.g. in Slicer, beside its own pydicom 2): say so now, not after the inference
    return DicomSeries.of_input(input_path)


def segment_file(model, input_path, labels, output_path=None, axis="auto", preview=None, threshold=0.5,
                 intensity="auto", window=None, progress=None, cancel=None, overwrite=False, output_format=None,
                 dicom_source=None, probe_mm=DEFAULT_PROBE_MM, context="auto", prompts=None, use_text=True,
                 self_box="auto", **read_options):
    """Read `input_path`, segment `labels`, write `output_path` (.seg.nrrd, a label map, or a DICOM SEG for a DICOM
    input) and an optional PNG preview. `output_format` names the type when `output_path` is not given;
    `dicom_source`: the input's DicomSeries when the caller already has it (found here otherwise); probe_mm: see
    sparse_slices.py, None encodes every slice; self_box: "auto" or "off" (self_box.py).
    prompts: {label: PhysicalPrompt} corrections applied after the text prompts (inference/refinement.py).

    Outputs and options are checked before any work; an input is never written to and an existing output is
    replaced only with `overwrite=True`. The outputs are written as one set once the whole result exists: a bad
    input, Ctrl-C or a full disk leaves no file of the set and any earlier file untouched. `read_options` go to
    read_image (allow_gaps, series). Returns the SegmentationResult with `.outputs`, the written paths, `.notes`,
    what the user should know about them (e.g. a source without UIDs), and `.warnings` (labels the model was never
    taught).
    """
    from ..files.writers import write_outputs

    output_path, preview = check_segment_outputs(input_path, output_path, preview, overwrite, output_format)
    parse_labels(labels)
    check_threshold(threshold)
    window = check_window(window)
    dicom_source = dicom_source or dicom_source_for(input_path, output_path)
    if dicom_source is not None:
        read_options["dicom_files"] = dicom_source.files
    image = read_image(input_path, **read_options)
    algorithm = None
    if dicom_source is not None:
        from ..files.dicom_seg import algorithm_of

        dicom_source.check_grid(image)
        algorithm = algorithm_of(model)
    if prompts:
        check_prompts(image, prompts, axis)
    result = segment_image(model, image, labels, axis=axis, threshold=threshold, intensity=intensity, window=window,
                           progress=progress, cancel=cancel, probe_mm=probe_mm, context=context, self_box=self_box)
    if prompts:
        apply_refinements(model, image, result, prompts, intensity=intensity, window=window, threshold=threshold,
                          use_text=use_text, self_box=self_box, cancel=cancel)
    result.outputs = write_outputs(output_path, image, result.masks, preview_path=preview,
                                   array_axis=result.array_axis, dicom_source=dicom_source, algorithm=algorithm)
    result.notes += list(dicom_source.notes) if dicom_source is not None else []
    return result
