"""Errors that speak to the user. Library tracebacks are for bugs, not for bad input."""
import errno
import os


class CRNError(ValueError):
    """Bad input: the message names the file or value and what would be valid (exit status 1)."""


class UsageError(CRNError):
    """A command-line option with a value that cannot work (exit status 2, like argparse)."""


class CheckpointError(CRNError):
    """A checkpoint file is missing, truncated, corrupt or not what it claims to be."""


class RankStopped(CRNError):
    """This rank stops because another rank of the same run failed (``crn_fast.distributed``). Rank 0
    says which rank and why; the other ranks exit quietly; all with the failed rank's exit status."""

    def __init__(self, message: str, exit_code: int, quiet: bool):
        super().__init__(message)
        self.exit_code, self.quiet = exit_code, quiet


class RunStopped(Exception):
    """A run that a signal (SIGTERM, a first Ctrl-C) stopped at a safe point, its work kept: training
    between two steps, its state saved (--resume continues it); synthesis between two batches,
    every image written whole (--skip-existing finishes it). Not an error: the tool's exit status is 128 + the
    signal's number, as a shell reports a process ended by that signal. ``quiet``: another rank says it."""

    def __init__(self, message: str, signum: int, quiet: bool = False):
        super().__init__(message)
        self.signum, self.quiet = signum, quiet


def absent(path) -> str:
    """Why ``path`` names nothing that can be opened, as the end of a sentence about it: "does not
    exist", or the symbolic link it is ("a symbolic link to X, which does not exist", "a symbolic
    link loop"), or what the system said ("cannot be reached: Permission denied")."""
    try:
        os.stat(path)
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "is a symbolic link loop"
        if os.path.islink(path):
            return f"is a symbolic link to {os.readlink(path)}, which does not exist"
        if e.errno == errno.ENOENT:
            return "does not exist"
        return f"cannot be reached: {e.strerror}"
    return "exists"  # callers ask only about a path that did not open


def need_file(path, what: str) -> None:
    """A CRNError unless ``path`` is a file: "P is a folder, not {what}", or why it names nothing
    (absent). For the Python API's loaders, before a library says it in its own words."""
    if not os.path.isfile(path):
        raise CRNError(f"{path} " + (f"is a folder, not {what}" if os.path.isdir(path) else absent(path)))
