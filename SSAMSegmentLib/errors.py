"""Errors a user can act on.

Every problem caused by input (a missing file, a 4D image, a mismatched adapter, an unknown label) is raised as an
`SSAMError` whose message is one line naming the problem and the fix. The command line prints that line and exits
with `exit_code`; the Slicer module shows it in the panel. Anything else is a bug and keeps its traceback.
"""


class SSAMError(Exception):
    """A problem the user can fix; `str(error)` is one line saying what is wrong and what to do."""

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


class Cancelled(SSAMError):
    """The user asked to stop (Cancel button, Ctrl-C). Nothing partial was written."""

    exit_code = 130


class SSAMNote(UserWarning):
    """A choice the tool made for the user (which DICOM series, a replaced spacing): said in one line, the work goes on.
    Issued with `note(message)` through Python's warnings, so the command line, the batch script and Slicer each
    show it their way (the command line as one `note:` line on stderr)."""


def note(message: str) -> None:
    import warnings

    warnings.warn(" ".join(str(message).split()), SSAMNote, stacklevel=2)
