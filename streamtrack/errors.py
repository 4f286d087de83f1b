"""Exceptions that mean "the user gave us something we cannot use", and what a process
prints when the user asks why it is stuck.

The CLI turns any :class:`UserError` into one line on stderr and exit code 2;
everything else is a runtime failure (exit code 1): a :class:`HelperProcessError` in one
line too, any other with its traceback (a bug to report).
"""

import errno
import faulthandler
import os
import re
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class UserError(Exception):
    """Bad usage, input, configuration or checkpoint: the message says what to do."""


class ReaderGone(UserError):
    """The reader of an output written to a pipe went away (``run --save-jsonl - | head``):
    the run stops there, as a shell pipeline expects, its other outputs finished."""


def reader_gone(exc: BaseException) -> bool:
    """Whether a write failed because the pipe's reader went away."""
    return isinstance(exc, BrokenPipeError) or getattr(exc, "errno", None) == errno.EPIPE


class CheckpointError(UserError):
    """A checkpoint file is missing, unreadable or does not match its model."""


class DownloadError(UserError):
    """A checkpoint could not be downloaded (offline, HTTP error, bad file)."""


class PromptError(UserError, ValueError):
    """A prompt (points, box, mask, object id) is malformed or out of range."""


class HelperProcessError(RuntimeError):
    """A helper process (the decode or the emit child) died or failed: the cause lies
    outside this program (the OOM killer, a signal) and the message names it."""


def file_name(path: str | Path, what: str) -> None:
    """:class:`UserError` for an output file given as a folder (``out/``): ``Path()``
    drops the separator, and the file would be written as ``out``."""
    if str(path).endswith(("/", os.sep)):
        raise UserError(f"{what} {path} ends in a separator, naming a folder: give a file name")


def existing_file(path: str | Path, what: str) -> Path:
    """``path`` as a Path, or :class:`UserError` saying why it is not a file to read."""
    if not str(path).strip():  # an unset shell variable; Path("") is ".", a directory
        raise UserError(f"{what}: empty path")
    p = Path(path)  # named as given in messages: Path() would fold "a//b" into "a/b"
    if not exists(p, what):  # a pipe (--prompts <(...), /dev/stdin) is readable too
        raise UserError(f"{what} {path} not found")
    if p.is_dir():
        raise UserError(f"{what} {path} is a directory, not a file")
    return p


@contextmanager
def looking_into(path: str | Path, what: str) -> Iterator[None]:
    """pathlib's ``exists()`` and ``is_dir()`` raise PermissionError where a folder on the
    way may not be looked into (EACCES): one :class:`UserError` naming ``what`` instead."""
    try:
        yield
    except PermissionError:
        raise UserError(f"{what} {path}: permission denied (a folder on the way cannot be "
                        "looked into)") from None


def exists(path: Path, what: str) -> bool:
    """``path.exists()``, with a folder that may not be looked into as a :class:`UserError`."""
    with looking_into(path, what):
        return path.exists()


def same_file(a: str | Path, b: str | Path) -> bool:
    """Whether two paths name one file (an output about to overwrite an input)."""
    try:
        return Path(a).resolve() == Path(b).resolve() or (Path(a).exists() and Path(a).samefile(b))
    except (OSError, RuntimeError):  # RuntimeError: a symlink loop, before Python 3.13
        return False


def read_text_file(path: str | Path, what: str) -> str:
    """The UTF-8 text of a file the user named (a prompts, config or fleet file), or
    :class:`UserError`: a video or checkpoint passed to the wrong option is binary."""
    p = existing_file(path, what)
    try:
        return p.read_text(encoding="utf-8-sig")  # with or without the BOM some editors write
    except UnicodeDecodeError as e:
        raise UserError(f"{what} {p} is not a text file (byte {e.start} is not UTF-8)") from None
    except OSError as e:
        raise UserError(f"cannot read {what} {p}: {e.strerror}") from None


def error_reason(e: BaseException) -> str:
    """Why an operation failed, in one line for the CLI and without the file name the
    message gives already: an OSError's strerror, else the first line of the message."""
    text = getattr(e, "strerror", None) or str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def file_in_the_way(path: str | Path) -> Path | None:
    """The nearest existing folder above ``path`` when it is a file instead (no folder can
    be made under it), else None."""
    above = next((p for p in Path(path).parents if p.exists()), None)
    return above if above is not None and not above.is_dir() else None


def discard_output(stream) -> None:
    """Point ``stream``'s descriptor at /dev/null: what is still buffered for a reader that
    went away (or a full disk) would fail again in Python's flush at exit."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, stream.fileno())
    finally:
        os.close(devnull)


def dump_stacks_on_usr1() -> None:
    """``kill -USR1 PID`` prints every thread's stack to stderr and the process goes on:
    what a run that seems stuck is doing, for a bug report."""
    if not hasattr(signal, "SIGUSR1"):
        return
    try:
        faulthandler.register(signal.SIGUSR1, all_threads=True)
    except (AttributeError, ValueError, OSError, RuntimeError):  # no stderr, or one without a descriptor
        pass


# Import name -> what pip installs it as, where they differ.
_PIP_NAMES = {"zmq": "pyzmq", "cv2": "opencv-python", "yaml": "PyYAML", "PIL": "pillow"}


def missing_dependency(exc: ImportError) -> str | None:
    """One line for an ImportError from the environment (a package not installed, a system
    library missing), or None for one from this package's own code (a bug: its traceback
    says where)."""
    text = str(exc)
    if "cannot open shared object file" in text:  # e.g. OpenCV without the system's libGL
        return (f"a system library is missing: {text} (Debian/Ubuntu: apt-get install libgl1 "
                "libglib2.0-0; README: Install)")
    top = (exc.name or "").split(".")[0]
    if not top or top == "streamtrack":
        return None
    return (f"missing dependency {top!r} ({text}): pip install {_PIP_NAMES.get(top, top)}, or "
            "reinstall streamtrack with its dependencies (README: Install)")


STDOUT_PATH = "/dev/stdout"


def stdout_dash(path: str | None) -> str | None:
    """``-`` means standard output, as for most command-line tools."""
    return STDOUT_PATH if path is not None and path.strip() == "-" else path


_OWN_DESCRIPTOR = re.compile(r"/dev/(stdin|stdout|stderr)|/dev/fd/([0-9]+)|/proc/(self|[0-9]+)/fd/([0-9]+)")


def _descriptor_name(path: str | Path) -> re.Match | None:
    return _OWN_DESCRIPTOR.fullmatch(os.path.normpath(str(path)))


def names_a_descriptor(path: str | Path) -> bool:
    """Whether ``path`` is one of the names of a process's own descriptors (/dev/stdout,
    /dev/fd/N, /proc/self/fd/N): the descriptor, not a file, wherever it is opened."""
    return _descriptor_name(path) is not None


def own_descriptor(path: str | Path) -> int | None:
    """The file descriptor of this process that ``path`` names (``/dev/stdout``,
    ``/dev/fd/N``, ``/proc/self/fd/N``), or None.  Such a path is written through the
    descriptor: opened by name it is a new open of the file behind it, which would
    truncate a shell's ``>> log`` redirection instead of appending to it."""
    m = _descriptor_name(path)
    if m is None or (m.group(3) not in (None, "self") and int(m.group(3)) != os.getpid()):
        return None
    fd = ("stdin", "stdout", "stderr").index(m.group(1)) if m.group(1) else int(m.group(2) or m.group(4))
    try:
        os.fstat(fd)
    except OSError:  # not open here: the path fails as it would
        return None
    return fd
