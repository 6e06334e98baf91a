"""SSAM Segment's backend: S-SAM (singular-value tuned SAM, prompted by a label name) for medical images.

    model = SSAMSegmentLib.load(base="litemedsam", adapter=None, text_encoder="minilm-l6", device="auto")
    result = model.segment(image, ["liver"])
    SSAMSegmentLib.train(SSAMSegmentLib.TrainingConfig(data="Dataset001", output="my.adapter.safetensors"))

Pure Python; imports without Slicer, a GPU or a network connection. The names below are imported on first use, so
`import SSAMSegmentLib` (and reading an adapter's metadata) works before PyTorch is installed.
"""

import importlib

__version__ = "0.1.0"

_LAZY = {
    "Cancelled": "errors",
    "SSAMError": "errors",
    "load": "model.loading",
    "segment_file": "inference.segment_files",
    "TrainingConfig": "training.trainer",
    "TrainingProgress": "training.trainer",
    "TrainingResult": "training.trainer",
    "train": "training.trainer",
}
__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
