"""Choosing where the model runs, and the precision it runs in there."""

import contextlib

import torch

from ..errors import SSAMError

DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")


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


def autocast_dtype(device: torch.device):
    """Reduced precision on GPUs only: bf16 where the GPU supports it, else fp16. CPU stays float32."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return None


def autocast(device: torch.device, enabled: bool = True):
    """An autocast context for GPU devices; a no-op on the CPU."""
    dtype = autocast_dtype(device)
    if not enabled or dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
