"""File in, files out: the whole `ssam segment` job, shared by the command line and Slicer's batch script."""

from pathlib import Path

from ..files.atomic_file import check_writable
from ..errors import SSAMError
from ..files.image_io import read_image, strip_image_suffix
from .refinement import apply_refinements, check_prompts
from .slice_inference import segment_image

def default_output(input_path, folder=".") -> Path:
    return Path(folder) / f"{strip_image_suffix(Path(input_path).name.rstrip('/')) or 'segmentation'}.seg.nrrd"


def check_output_path(path) -> Path:
    """Fail before any work when the output cannot be written as asked."""
    from ..files.writers import OUTPUT_SUFFIXES, output_suffix

    path = Path(path)
    if output_suffix(path) is None:
        raise SSAMError(f"output {path} has an unsupported type; end it with one of: {', '.join(OUTPUT_SUFFIXES)}")
    return check_writable(path)


def segment_file(model, input_path, labels, output_path=None, axis="auto", preview=None, threshold=0.5,
                 intensity="auto", window=None, progress=None, cancel=None, context="auto", prompts=None,
                 use_text=True):
    """Read `input_path`, segment `labels`, write `output_path` (.seg.nrrd or a label map) and an optional PNG preview.
    prompts: {label: PhysicalPrompt} corrections applied after the text prompts (inference/refinement.py).

    Outputs are checked before any work and written only once the whole result exists, each atomically: a bad input,
    Ctrl-C or a full disk leaves no partial file and any earlier file untouched. Returns the SegmentationResult with
    `.outputs`, the written paths.
    """
    from ..files.writers import write_outputs

    output_path = check_output_path(output_path or default_output(input_path))
    if preview is not None:
        preview = check_writable(preview)
        if not preview.name.lower().endswith(".png"):
            raise SSAMError(f"preview {preview} must be a .png file")
    image = read_image(input_path)
    if prompts:
        check_prompts(image, prompts, axis)
    result = segment_image(model, image, labels, axis=axis, threshold=threshold, intensity=intensity, window=window,
                           progress=progress, cancel=cancel, context=context)
    if prompts:
        apply_refinements(model, image, result, prompts, intensity=intensity, window=window, threshold=threshold,
                          use_text=use_text, cancel=cancel)
    result.outputs = write_outputs(output_path, image, result.masks, preview_path=preview,
                                   array_axis=result.array_axis)
    return result
