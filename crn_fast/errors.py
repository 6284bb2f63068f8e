"""Errors that speak to the user. Library tracebacks are for bugs, not for bad input."""


class CRNError(ValueError):
    """Bad input: the message names the file or value and what would be valid."""


class CheckpointError(CRNError):
    """A checkpoint file is missing, truncated, corrupt or not what it claims to be."""
