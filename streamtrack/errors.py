"""Exceptions that mean "the user gave us something we cannot use".

The CLI turns any :class:`UserError` into one line on stderr and exit code 2;
everything else is a runtime failure (exit code 1).
"""


class UserError(Exception):
    """Bad usage, input, configuration or checkpoint: the message says what to do."""


class CheckpointError(UserError):
    """A checkpoint file is missing, unreadable or does not match its model."""


class DownloadError(UserError):
    """A checkpoint could not be downloaded (offline, HTTP error, bad file)."""


class PromptError(UserError, ValueError):
    """A prompt (points, box, mask, object id) is malformed or out of range."""
