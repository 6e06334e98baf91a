"""Pretrained weight files: where they come from, where they are cached, and proof that they are the right bytes.

Weights are never shipped inside the extension folder (Slicer replaces it on every update): they live in a cache
folder, `$SSAM_CACHE_DIR` or `~/.cache/ssam-segment`. A download streams into a `.part` file while its SHA256 is
computed, and only a file whose checksum matches is renamed into place, so an interrupted or corrupted download never
looks like a weight file.
"""

import dataclasses
import hashlib
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, Optional

from ..errors import SSAMError

ProgressCallback = Callable[[int, Optional[int]], None]  # (bytes done, bytes total or None)


@dataclasses.dataclass(frozen=True)
class WeightFile:
    id: str
    filename: str
    url: str
    sha256: str
    size: int
    license: str
    homepage: str


WEIGHT_FILES = {
    "sam_vit_b": WeightFile(
        id="sam_vit_b",
        filename="sam_vit_b_01ec64.pth",
        url="https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth",
        sha256="ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912",
        size=375_042_383,
        license="Apache-2.0",
        homepage="https://github.com/facebookresearch/segment-anything",
    ),
    "clip-vit-b-32": WeightFile(
        id="clip-vit-b-32",
        filename="open_clip_vit_b_32_openai.safetensors",
        url="https://huggingface.co/timm/vit_base_patch32_clip_224.openai/resolve/main/open_clip_model.safetensors",
        sha256="e6d1bd7789aa45192b3bf90570a789b478bae1b74ebcce7eddd908e83a2b7c31",
        size=605_143_284,
        license="MIT",
        homepage="https://github.com/mlfoundations/open_clip",
    ),
}


def cache_dir() -> Path:
    """The folder that holds downloaded weights ($SSAM_CACHE_DIR, else ~/.cache/ssam-segment)."""
    configured = os.environ.get("SSAM_CACHE_DIR")
    if configured:
        return Path(configured).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "ssam-segment"


def file_sha256(path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk_size), b""):
            digest.update(block)
    return digest.hexdigest()


def cached_path(weight: WeightFile) -> Path:
    return cache_dir() / weight.filename


def missing_message(weight: WeightFile, path: Path) -> str:
    return (
        f"{weight.id} weights not found at {path}; download them with `ssam download {weight.id}` "
        f"(or fetch {weight.url} on a machine with internet and copy it there)"
    )


def verify(weight: WeightFile, path) -> Path:
    """Check a weight file's size and SHA256 against the registry; raise a one-line SSAMError when they differ."""
    path = Path(path)
    if not path.is_file():
        raise SSAMError(missing_message(weight, path))
    size = path.stat().st_size
    if size != weight.size:
        raise SSAMError(
            f"{path} is {size:,} bytes but {weight.id} weights are {weight.size:,}: the file is incomplete or a "
            f"different model; delete it and run `ssam download {weight.id}`"
        )
    digest = file_sha256(path)
    if digest != weight.sha256:
        raise SSAMError(
            f"{path} has SHA256 {digest[:12]}… but {weight.id} weights have {weight.sha256[:12]}…: the file is "
            f"corrupt or a different model; delete it and run `ssam download {weight.id}`"
        )
    return path


def resolve(weight: WeightFile, path=None) -> Path:
    """The verified local file for `weight`: the user's own copy when `path` is given, else the cached download."""
    return verify(weight, Path(path).expanduser() if path else cached_path(weight))


def download(weight: WeightFile, progress: Optional[ProgressCallback] = None, timeout: float = 30.0,
             overwrite: bool = False) -> Path:
    """Download `weight` into the cache, verifying size and SHA256 before it is moved into place. A verified copy
    already there is kept; a different file there is replaced only with `overwrite` (and only by verified bytes)."""
    from ..files.atomic_file import OVERWRITE_HINT, atomic_output, check_writable

    target = check_writable(cached_path(weight))
    if target.is_file():
        try:
            return verify(weight, target)
        except SSAMError as error:
            if not overwrite:
                raise SSAMError(f"{target} is not the published {weight.id} file ({error}); {OVERWRITE_HINT} "
                                f"with a fresh download") from None
    digest = hashlib.sha256()
    done = 0
    with atomic_output(target) as partial:
        try:
            with urllib.request.urlopen(weight.url, timeout=timeout) as response, open(partial, "wb") as out:
                total = int(response.headers.get("Content-Length") or 0) or None
                for block in iter(lambda: response.read(1 << 20), b""):
                    out.write(block)
                    digest.update(block)
                    done += len(block)
                    if progress:
                        progress(done, total)
        except (urllib.error.URLError, OSError) as error:
            reason = getattr(error, "reason", None) or error
            raise SSAMError(
                f"could not download {weight.id} weights from {weight.url} ({reason}); check the internet "
                f"connection, or download the file elsewhere and copy it to {target}"
            ) from None
        if done != weight.size or digest.hexdigest() != weight.sha256:
            raise SSAMError(
                f"download of {weight.id} from {weight.url} gave {done:,} bytes with SHA256 {digest.hexdigest()[:12]}…, "
                f"expected {weight.size:,} bytes with {weight.sha256[:12]}…; nothing was saved, try again"
            )
    return target
