"""SSAM Segment's backend: S-SAM (singular-value tuned SAM, prompted by a label name) for medical images.

    model = SSAMSegmentLib.load(base="litemedsam", adapter=None, text_encoder="minilm-l6", device="auto")

Pure Python; imports without Slicer, a GPU or a network connection.
"""

__version__ = "0.1.0"

from .errors import Cancelled, SSAMError  # noqa: E402
from .loading import load  # noqa: E402
from .segment_files import segment_file  # noqa: E402
from .training import TrainingConfig, TrainingProgress, TrainingResult, train  # noqa: E402

__all__ = ["Cancelled", "SSAMError", "TrainingConfig", "TrainingProgress", "TrainingResult", "load", "segment_file",
           "train", "__version__"]
