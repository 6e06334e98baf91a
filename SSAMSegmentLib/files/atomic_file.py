"""Writing outputs so that nothing is lost, nothing is overwritten and nothing half-written is left behind.

The one output check of the project is `check_outputs(outputs, inputs, overwrite)`, called by every command before
any work: it refuses an output that is (or, through a link or a relative path, resolves to) an input or a file inside
an input folder, an output named twice, an existing file unless `overwrite`, and a place that cannot be written. It
creates nothing: a missing input leaves no new folder behind.

`atomic_output(path)` yields a temporary path in the same folder; only when the block finishes without error is it
renamed onto `path` (an atomic rename on the same filesystem), creating the missing folders then. On an error, Ctrl-C
or a full disk the temporary file (and any folder made for it) is removed and whatever was at `path` is untouched.
Inside `output_set()` the renames wait until the whole set has been written: a set (an image with its sidecar and
preview, a report's .json and .csv) appears whole or not at all.
"""

import contextlib
import contextvars
import os
import tempfile
from pathlib import Path
from typing import Iterable, List, Optional

from ..errors import SSAMError

OVERWRITE_HINT = "add --overwrite (overwrite=True in Python) to replace it"

# The pending renames of the output set being written, or None outside one.
_PENDING = contextvars.ContextVar("ssam_pending_outputs", default=None)


def add_overwrite_argument(parser) -> None:
    """The --overwrite flag of every command that writes files."""
    parser.add_argument("--overwrite", action="store_true",
                        help="replace output files that already exist (never an input); without it they are refused")


def _real(path) -> str:
    return os.path.realpath(os.path.abspath(os.path.expanduser(str(path))))


def _is_within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)  # hard links too
    except OSError:
        return False


def _existing_ancestor(path: Path) -> Path:
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


def check_writable(path) -> Path:
    """Fail early, before any work, when `path` cannot be written (a folder, a parent that is a file, no permission);
    create nothing."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise SSAMError(f"output {path} is a folder; give a file name")
    folder = _existing_ancestor(path)
    if not folder.is_dir():
        raise SSAMError(f"cannot create the folder {path.parent} ({folder} is a file); choose another output path")
    try:  # a real file, not os.access: root passes os.access on read-only and pseudo filesystems such as /proc
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise SSAMError(f"cannot write to {folder} ({error.strerror or error}); choose another output path") from None
    return path


def check_outputs(outputs: Iterable, inputs: Iterable = (), overwrite: bool = False) -> List[Path]:
    """The output check of every command, before any work. `outputs`: the files of one output set (None entries are
    skipped); `inputs`: files or folders the job reads. Returns the outputs as Paths (user home expanded)."""
    outputs = [Path(p).expanduser() for p in outputs if p is not None]
    inputs = [Path(p).expanduser() for p in inputs if p is not None]
    real_inputs = [(_real(p), p) for p in inputs]
    seen = {}
    for path in outputs:
        real = _real(path)
        for real_input, given in real_inputs:
            inside_folder = os.path.isdir(real_input) and _is_within(real, real_input) and os.path.lexists(path)
            if real == real_input or inside_folder or _same_file(path, given):
                raise SSAMError(f"output {path} is the input itself ({given}); SSAM Segment never writes to an input, "
                                f"choose another output path")
        if real in seen:
            raise SSAMError(f"{seen[real]} and {path} are the same file; give each output its own name")
        seen[real] = path
    for path in outputs:
        check_writable(path)
        if os.path.lexists(path) and not overwrite:
            raise SSAMError(f"{path} already exists; {OVERWRITE_HINT}")
    return outputs


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _make_parents(folder: Path) -> List[Path]:
    """Create `folder` and its missing parents; return those created (deepest first), for removal on failure."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    for created in reversed(missing):
        try:
            created.mkdir()
        except FileExistsError:
            pass
        except OSError as error:
            _remove_folders(missing)
            raise SSAMError(f"cannot create the folder {created} ({error.strerror or error}); "
                            f"choose another output path") from None
    return missing


def _remove_folders(folders: List[Path]) -> None:
    for folder in folders:  # deepest first; only those still empty
        try:
            folder.rmdir()
        except OSError:
            pass


def _write_error(path, error) -> SSAMError:
    return SSAMError(f"cannot write {path} ({error.strerror or error}); free disk space or choose another path")


@contextlib.contextmanager
def atomic_output(path, suffix: str = ""):
    """Yield a temporary path next to `path` (keeping `suffix`, e.g. '.nii.gz', so writers pick the format)."""
    path = check_writable(path)
    made = _make_parents(path.parent)
    try:
        handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".part{suffix}", dir=path.parent)
    except OSError as error:
        _remove_folders(made)
        raise _write_error(path, error) from None
    os.close(handle)
    temporary = Path(temporary)
    pending = _PENDING.get()
    try:
        yield temporary
        os.chmod(temporary, 0o666 & ~_umask())  # mkstemp makes 0600 files; outputs get the usual permissions
        if pending is not None:
            pending.append((temporary, path, made))
        else:
            os.replace(temporary, path)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        _remove_folders(made)
        raise _write_error(path, error) from None
    except BaseException:
        temporary.unlink(missing_ok=True)
        _remove_folders(made)
        raise


@contextlib.contextmanager
def output_set():
    """Every `atomic_output` inside the block is renamed into place only when the whole block succeeded; on any
    failure none of them is (and files replaced so far are put back). Nested sets join the outer one."""
    if _PENDING.get() is not None:
        yield
        return
    pending = []
    token = _PENDING.set(pending)
    try:
        yield
    except BaseException:
        _discard(pending)
        raise
    finally:
        _PENDING.reset(token)
    _commit(pending)


def _discard(pending) -> None:
    for temporary, _, made in reversed(pending):
        temporary.unlink(missing_ok=True)
        _remove_folders(made)


def _commit(pending) -> None:
    """Rename every temporary onto its path; an existing file is first moved aside, so a failed rename can restore
    what was there before."""
    done = []  # (path, backup or None, made)
    current: Optional[Path] = None
    try:
        for temporary, path, made in pending:
            current = path
            backup = None
            if os.path.lexists(path):
                backup = Path(tempfile.mktemp(prefix=f".{path.name}.", suffix=".previous", dir=path.parent))
                os.replace(path, backup)
            done.append((path, backup, made))
            os.replace(temporary, path)
    except BaseException as error:
        for path, backup, made in reversed(done):
            if backup is not None:
                os.replace(backup, path)
            else:
                Path(path).unlink(missing_ok=True)
        _discard(pending)
        if isinstance(error, OSError):
            raise _write_error(current, error) from None
        raise
    for _, backup, _ in done:
        if backup is not None:
            backup.unlink(missing_ok=True)
