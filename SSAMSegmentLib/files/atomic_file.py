"""Writing outputs so that nothing half-written is ever left where a result is expected.

`atomic_output(path)` yields a temporary path in the same folder; only when the block finishes without error is it
renamed onto `path` (an atomic rename on the same filesystem). On an error, Ctrl-C or a full disk the temporary file
is removed and whatever was at `path` before is untouched.
"""

import contextlib
import os
import tempfile
from pathlib import Path

from ..errors import SSAMError


def check_writable(path) -> Path:
    """Fail early, before any work, when `path` cannot be written (missing parent that cannot be made, no permission)."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise SSAMError(f"output {path} is a folder; give a file name")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise SSAMError(f"cannot create the folder {path.parent} ({error.strerror or error}); choose another output path") from None
    try:  # a real file, not os.access: root passes os.access on read-only and pseudo filesystems such as /proc
        with tempfile.TemporaryFile(dir=path.parent):
            pass
    except OSError as error:
        raise SSAMError(f"cannot write to {path.parent} ({error.strerror or error}); choose another output path") from None
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_output(path, suffix: str = ""):
    """Yield a temporary path next to `path` (keeping `suffix`, e.g. '.nii.gz', so writers pick the format)."""
    path = check_writable(path)
    try:
        handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".part{suffix}", dir=path.parent)
    except OSError as error:
        raise SSAMError(f"cannot write {path} ({error.strerror or error}); free disk space or choose another path") from None
    os.close(handle)
    temporary = Path(temporary)
    try:
        yield temporary
        os.chmod(temporary, 0o666 & ~_umask())  # mkstemp makes 0600 files; outputs get the usual permissions
        os.replace(temporary, path)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        raise SSAMError(f"cannot write {path} ({error.strerror or error}); free disk space or choose another path") from None
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
