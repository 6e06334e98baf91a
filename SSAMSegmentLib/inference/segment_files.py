"""File in, files out: the whole `ssam segment` job, shared by the command line and Slicer's batch script."""

from pathlib import Path

from ..files.atomic_file import check_writable
from ..errors import SSAMError
from ..files.image_io import read_image, strip_image_suffix
from .slice_inference import segment_image
from .sparse_slices import DEFAULT_PROBE_MM


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
    # `ssam segment 02.dcm --format dicom-seg` run in the series folder would name the SEG after its input.
    if output_path.expanduser().resolve() == Path(input_path).expanduser().resolve():
        raise SSAMError(f"the output {output_path} is the input itself; give another --output")
    return output_path


def check_output_path(path) -> Path:
    """Fail before any work when the output cannot be written as asked."""
    from ..files.writers import OUTPUT_SUFFIXES, output_suffix

    path = Path(path)
    if output_suffix(path) is None:
        raise SSAMError(f"output {path} has an unsupported type; end it with one of: {', '.join(OUTPUT_SUFFIXES)}")
    return check_writable(path)


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
                 intensity="auto", window=None, progress=None, cancel=None, output_format=None, dicom_source=None,
                 probe_mm=DEFAULT_PROBE_MM):
    """Read `input_path`, segment `labels`, write `output_path` (.seg.nrrd, a label map, or a DICOM SEG for a DICOM
    input) and an optional PNG preview. `output_format` names the type when `output_path` is not given;
    `dicom_source`: the input's DicomSeries when the caller already has it (found here otherwise); probe_mm: see
    sparse_slices.py, None encodes every slice.

    Outputs are checked before any work and written only once the whole result exists, each atomically: a bad input,
    Ctrl-C or a full disk leaves no partial file and any earlier file untouched. Returns the SegmentationResult with
    `.outputs`, the written paths, and `.notes`, what the user should know (e.g. a source without UIDs), besides
    `.warnings` (labels the model was never taught).
    """
    from ..files.writers import write_outputs

    output_path = check_output_path(resolve_output(input_path, output_path, output_format))
    if preview is not None:
        preview = check_writable(preview)
        if not preview.name.lower().endswith(".png"):
            raise SSAMError(f"preview {preview} must be a .png file")
    dicom_source = dicom_source or dicom_source_for(input_path, output_path)
    image = read_image(input_path, dicom_files=dicom_source.files if dicom_source is not None else None)
    algorithm = None
    if dicom_source is not None:
        from ..files.dicom_seg import algorithm_of

        dicom_source.check_grid(image)
        algorithm = algorithm_of(model)
    result = segment_image(model, image, labels, axis=axis, threshold=threshold, intensity=intensity, window=window,
                           progress=progress, cancel=cancel, probe_mm=probe_mm)
    result.outputs = write_outputs(output_path, image, result.masks, preview_path=preview,
                                   array_axis=result.array_axis, dicom_source=dicom_source, algorithm=algorithm)
    result.notes += list(dicom_source.notes) if dicom_source is not None else []
    return result
