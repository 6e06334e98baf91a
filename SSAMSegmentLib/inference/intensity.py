"""Mapping an image's intensities to the 0..255 RGB slices the model sees, the same way in training and inference.

One mapping is chosen per image (never per slice, so a slice's brightness does not depend on its neighbours' content):
- CT (DICOM modality CT, or integer Hounsfield-like values): a fixed window, soft tissue (level 40, width 400) by
  default, the window LiteMedSAM was trained with for abdominal CT;
- RGB images (endoscopy, histology): passed as they are;
- 8-bit grey images (PNG/JPEG): as they are;
- anything else (MR, microscopy, ultrasound): the 0.5th..99.5th percentile of the image mapped to 0..255.
"""

import dataclasses
import math
from typing import Optional

import numpy as np
import SimpleITK as sitk

from ..errors import SSAMError

INTENSITY_MODES = ("auto", "ct", "percentile", "none")
CT_WINDOW = (40.0, 400.0)  # (level, width) in HU
_PERCENTILE_SAMPLE = 2_000_000  # voxels sampled to estimate percentiles of large volumes


@dataclasses.dataclass(frozen=True)
class IntensityMapping:
    kind: str  # "ct", "percentile", "rgb", "uint8"
    low: float = 0.0
    high: float = 255.0

    def describe(self) -> str:
        if self.kind == "ct":
            return f"CT window level {(self.low + self.high) / 2:g} width {self.high - self.low:g}"
        if self.kind == "percentile":
            return f"percentile window {self.low:g}..{self.high:g}"
        return {"rgb": "RGB as is", "uint8": "8-bit grey as is"}[self.kind]

    def apply(self, array: np.ndarray) -> np.ndarray:
        """A 2D slice (H, W) or (H, W, 3) -> float32 (H, W, 3) in 0..255."""
        x = np.asarray(array, dtype=np.float32)
        if self.kind not in ("rgb", "uint8"):
            scale = 255.0 / max(self.high - self.low, 1e-6)
            x = np.clip((x - self.low) * scale, 0.0, 255.0)
        if x.ndim == 2:
            x = np.repeat(x[:, :, None], 3, axis=2)
        return x


def _looks_like_ct(image: sitk.Image, sample: np.ndarray) -> bool:
    if image.HasMetaDataKey("0008|0060"):
        return image.GetMetaData("0008|0060").strip().upper() == "CT"
    integer = np.issubdtype(sample.dtype, np.integer)
    return bool(integer and sample.size and sample.min() <= -500 and sample.max() >= 100)


def _sample(array: np.ndarray) -> np.ndarray:
    flat = array.reshape(-1)
    if flat.size <= _PERCENTILE_SAMPLE:
        return flat
    return flat[:: flat.size // _PERCENTILE_SAMPLE + 1]


def check_window(window) -> Optional[tuple]:
    """A CT window (level, width) in HU: two finite numbers, the width positive; None stays None."""
    if window is None:
        return None
    try:
        level, width = (float(v) for v in window)
    except (TypeError, ValueError):
        raise SSAMError(f"window {window!r} is not LEVEL,WIDTH; e.g. --window 40,400 for soft tissue") from None
    if not (math.isfinite(level) and math.isfinite(width)) or width <= 0:
        raise SSAMError(f"window {level:g},{width:g}: the level must be finite and the width must be positive and "
                        f"finite; e.g. --window 40,400 for soft tissue")
    return level, width


def choose_mapping(image: sitk.Image, mode: str = "auto", window: Optional[tuple] = None) -> IntensityMapping:
    """The intensity mapping for `image`. mode: auto | ct | percentile | none; window: (level, width) for CT."""
    if mode not in INTENSITY_MODES:
        raise SSAMError(f"unknown intensity mode '{mode}'; use one of: {', '.join(INTENSITY_MODES)}")
    window = check_window(window)
    if window is not None:
        level, width = window
        return IntensityMapping("ct", level - width / 2, level + width / 2)
    array = sitk.GetArrayViewFromImage(image)
    if image.GetNumberOfComponentsPerPixel() == 3:
        if array.dtype == np.uint8 or mode == "none":
            return IntensityMapping("rgb")
        return IntensityMapping("percentile", *np.percentile(_sample(array), [0.5, 99.5]).tolist())
    sample = _sample(array)
    if mode == "none" or (mode == "auto" and array.dtype == np.uint8):
        return IntensityMapping("uint8")
    if mode == "ct" or (mode == "auto" and _looks_like_ct(image, sample)):
        level, width = CT_WINDOW
        return IntensityMapping("ct", level - width / 2, level + width / 2)
    low, high = np.percentile(sample, [0.5, 99.5]).tolist()
    return IntensityMapping("percentile", float(low), float(high))


def has_signal(slice_array: np.ndarray) -> bool:
    """False for a constant slice (padding, an empty field of view): nothing to segment there."""
    return bool(slice_array.size) and bool(np.ptp(slice_array) > 0)
