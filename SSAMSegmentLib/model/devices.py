"""Choosing where the model runs, and the precision it runs in there."""

import contextlib
import functools
from pathlib import Path

import torch

from ..errors import SSAMError

DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")
# Inference precision: "auto" picks bf16 where the hardware computes it natively (docs/design.md, section 3),
# float32 forces full precision everywhere; the effective choice is "float32", "bf16" or "fp16".
PRECISIONS = ("auto", "float32", "bf16")
_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def select_device(device="auto") -> torch.device:
    """CUDA when available, then Apple MPS, else CPU; an explicit choice ("cpu", "cuda", "cuda:1", "mps") wins."""
    if isinstance(device, torch.device):
        return device
    name = (device or "auto").strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "gpu":  # whichever GPU this machine has
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        raise SSAMError("a GPU was asked for but none is available to PyTorch (no CUDA, no Apple MPS); use cpu or auto")
    try:
        chosen = torch.device(name)
    except RuntimeError:
        raise SSAMError(f"unknown device '{device}'; use one of: {', '.join(DEVICE_CHOICES)} (or cuda:N)") from None
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise SSAMError(f"device '{device}' was asked for but this PyTorch has no CUDA GPU; use --device cpu or auto")
    if chosen.type == "cuda" and chosen.index is not None and chosen.index >= torch.cuda.device_count():
        raise SSAMError(f"device '{device}' does not exist: {torch.cuda.device_count()} CUDA device(s) found")
    if chosen.type == "mps" and not _mps_available():
        raise SSAMError(f"device '{device}' was asked for but Apple MPS is not available; use --device cpu or auto")
    if chosen.type not in ("cpu", "cuda", "mps"):
        raise SSAMError(f"unsupported device '{device}'; use one of: {', '.join(DEVICE_CHOICES)}")
    return chosen


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """True when the CPU computes bfloat16 products natively (x86 AVX512-BF16 or AMX), as Linux reports in
    /proc/cpuinfo. Elsewhere (other systems, CPUs without it) False: emulated bf16 is slower than float32."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return False
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[-1].split())
            break
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def inference_precision(precision, device: torch.device) -> str:
    """The precision inference runs in on `device`: "float32", "bf16" or "fp16".

    "auto": bf16 on CPUs with native bf16, else float32 there; bf16 on CUDA GPUs that support it, else fp16; fp16 on
    Apple MPS. "float32" and "bf16" are taken as asked."""
    name = str(precision or "auto").strip().lower()
    if name not in PRECISIONS:
        raise SSAMError(f"unknown precision '{precision}'; use one of: {', '.join(PRECISIONS)}")
    if name != "auto":
        return name
    if device.type == "cpu":
        return "bf16" if cpu_has_native_bf16() else "float32"
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}[autocast_dtype(device)]


def autocast_dtype(device: torch.device):
    """Reduced precision on GPUs only: bf16 where the GPU supports it, else fp16. CPU stays float32."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return None


def autocast(device: torch.device, precision=None):
    """An autocast context: with `precision` ("float32", "bf16", "fp16", as inference_precision gives) that precision
    on any device; without it, training's rule: reduced precision on GPUs (autocast_dtype), none on the CPU."""
    dtype = autocast_dtype(device) if precision is None else _AUTOCAST_DTYPES.get(precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
