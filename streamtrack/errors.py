"""Exceptions that mean "the user gave us something we cannot use", and what a process
prints when the user asks why it is stuck.

The CLI turns any :class:`UserError` into one line on stderr and exit code 2;
everything else is a runtime failure (exit code 1).
"""

import faulthandler
import signal


class UserError(Exception):
    """Bad usage, input, configuration or checkpoint: the message says what to do."""


class CheckpointError(UserError):
    """A checkpoint file is missing, unreadable or does not match its model."""


class DownloadError(UserError):
    """A checkpoint could not be downloaded (offline, HTTP error, bad file)."""


class PromptError(UserError, ValueError):
    """A prompt (points, box, mask, object id) is malformed or out of range."""


def dump_stacks_on_usr1() -> None:
    """``kill -USR1 PID`` prints every thread's stack to stderr and the process goes on:
    what a run that seems stuck is doing, for a bug report."""
    if not hasattr(signal, "SIGUSR1"):
        return
    try:
        faulthandler.register(signal.SIGUSR1, all_threads=True)
    except (AttributeError, ValueError, OSError):  # stderr without a file descriptor
        pass
