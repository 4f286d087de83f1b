"""Plumbing shared by the tracker's helper processes (the emit and decode children).

Each child is ``python -m streamtrack.<module>``, talks to the tracker over ZeroMQ
sockets on ipc endpoints in a private temporary directory, and must never outlive
the tracker: a tracker killed by its supervisor leaves no child holding a camera, a
publish endpoint or half-written files.
"""

from __future__ import annotations

import atexit
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from types import FrameType

import zmq

# What tells a helper to exit cleanly: the kernel sends it when the tracker dies.
EXIT_SIGNAL = signal.SIGHUP


def spawn(module: str, *args: str) -> subprocess.Popen:
    """Start ``python -m module args... <this pid>`` with no stdin (stderr is shared).

    In a session of its own: a terminal's Ctrl-C and a signal to the tracker's process
    group reach the tracker alone, which closes its helpers after its last frame (one
    still importing would otherwise die of it, with a traceback)."""
    return subprocess.Popen([sys.executable, "-m", module, *args, str(os.getpid())],
                            stdin=subprocess.DEVNULL, start_new_session=True)


# An ipc:// endpoint is a Unix socket: its path fits in 107 bytes (sun_path).
_IPC_PATH_MAX = 107
_IPC_NAME_MAX = 8  # the longest socket name put in a private_dir ("ctl", "emit")
# The children's folders: the decode process's and the emit process's.
PRIVATE_DIR_PREFIXES = ("streamtrack-decode-", "streamtrack-emit-")


def private_dir(prefix: str) -> str:
    """A directory only this user can enter, for the ipc endpoints; in /tmp when the
    temporary folder's path ($TMPDIR) is too long for a socket's.

    Its name carries this process's pid, so that the folders of a tracker that was
    killed (by its supervisor, or the OOM killer) before it could remove them are
    removed by the next one that makes a folder there.
    """
    assert prefix in PRIVATE_DIR_PREFIXES, prefix
    mine = f"{prefix}{os.getpid()}-"
    folder = tempfile.mkdtemp(prefix=mine)
    if len(os.fsencode(folder)) + 1 + _IPC_NAME_MAX > _IPC_PATH_MAX:
        os.rmdir(folder)
        folder = tempfile.mkdtemp(prefix=mine, dir="/tmp")
    remove_orphaned_dirs(os.path.dirname(folder), prefix)
    return folder


def remove_orphaned_dirs(parent: str, prefix: str, min_age: float = 60.0) -> list[str]:
    """Remove this user's ``prefix<pid>-*`` folders in ``parent`` whose process is gone.

    Only folders unchanged for ``min_age`` seconds: a process in another pid namespace
    (a container sharing /tmp) looks gone from here, and its children connect to their
    sockets within moments of its making them; after that the folder is not needed.
    """
    removed = []
    old = time.time() - min_age
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return removed
    for entry in entries:
        pid = _owner_pid(entry.name, prefix)
        if pid is None or pid_alive(pid):
            continue
        try:
            info = entry.stat(follow_symlinks=False)
            if not entry.is_dir(follow_symlinks=False) or info.st_uid != os.getuid() \
                    or info.st_mtime > old:
                continue
        except OSError:
            continue
        shutil.rmtree(entry.path, ignore_errors=True)
        removed.append(entry.path)
    return removed


def remove_private_dirs_of(pid: int) -> None:
    """Remove the private folders a process that has ended left behind (it was killed)."""
    for parent in {tempfile.gettempdir(), "/tmp"}:
        for prefix in PRIVATE_DIR_PREFIXES:
            for folder in glob.glob(os.path.join(glob.escape(parent), f"{prefix}{pid}-*")):
                shutil.rmtree(folder, ignore_errors=True)


def _owner_pid(name: str, prefix: str) -> int | None:
    if not name.startswith(prefix):
        return None
    pid, sep, _ = name[len(prefix):].partition("-")
    return int(pid) if sep and pid.isdigit() and int(pid) > 0 else None


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid runs (on this host, in this pid namespace)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: another user's process has that pid
        return True
    return True


# A process killed (a tracker as hung, a helper by the OOM killer or kill -9) leaves its
# semaphores and shared memory to multiprocessing's resource tracker, which removes them
# at exit and then warns of "leaked ... objects": a note for the programmer of a leak,
# and here nothing is left behind.  The resource tracker process takes its -W options
# from sys.warnoptions when it is started.
_RESOURCE_TRACKER_WARNING = "ignore:resource_tracker:UserWarning"


def quiet_resource_tracker() -> None:
    if _RESOURCE_TRACKER_WARNING not in sys.warnoptions:
        sys.warnoptions.append(_RESOURCE_TRACKER_WARNING)


def start_without_ctrl_c(proc) -> None:
    """``proc.start()`` (a multiprocessing process) with Ctrl-C ignored in the child until
    it installs handlers of its own: an ignored signal stays so across exec (a signal mask
    does not), and a Ctrl-C while the child imports would otherwise end it with a
    traceback.  The parent ignores one meanwhile too, for the few milliseconds the start
    takes (only the main thread can; elsewhere the start is plain)."""
    if threading.current_thread() is not threading.main_thread():
        proc.start()
        return
    handler = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        proc.start()
    finally:
        signal.signal(signal.SIGINT, handler)


# Set (a plain store: no signal handler runs between the test and the set) once a helper
# closes its outputs: an exit signal then gives the close a deadline instead of cutting it
# short (an MP4 would lose its last frames; a supervisor waits for the file meanwhile).
closing_outputs = False
# Seconds a helper closing its outputs has left once its parent is gone: a close blocked on
# a stalled pipe reader must not keep it, and the publish endpoint it holds, for good.
CLOSE_GRACE = 15.0
_shutting_down = False


def _exit_on_signal(signum: int, frame: FrameType | None) -> None:
    """:data:`EXIT_SIGNAL`'s handler (and that of the retry after one lost in a finalizer)."""
    if closing_outputs:
        close_deadline()
        return
    sys.exit(0)


def close_deadline() -> None:
    """The end of a helper closing its outputs, :data:`CLOSE_GRACE` seconds from now, even
    while it is blocked in a write (SIGALRM's default action)."""
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    signal.setitimer(signal.ITIMER_REAL, CLOSE_GRACE)


def _retry_an_exit_lost_in_a_finalizer(unraisable) -> None:
    """``sys.unraisablehook``: the exit signal's SystemExit, raised while an object's
    finalizer ran (a ZeroMQ socket's ``__del__``), is printed with a traceback and ignored
    by Python; it is raised again a moment later instead."""
    if (unraisable.exc_type is not None and issubclass(unraisable.exc_type, SystemExit)
            and threading.current_thread() is threading.main_thread()):
        if not _shutting_down:  # else it is exiting already
            signal.signal(signal.SIGALRM, _exit_on_signal)
            signal.setitimer(signal.ITIMER_REAL, 0.01)
        return
    sys.__unraisablehook__(unraisable)


def _no_retries_at_exit() -> None:
    """A retry armed during the interpreter's shutdown would kill it (the handlers are
    reset by then)."""
    global _shutting_down
    _shutting_down = True
    signal.setitimer(signal.ITIMER_REAL, 0)


def become_child(parent_pid: int) -> bool:
    """Signal handling for a helper process; False if the parent is already gone.

    SIGINT and SIGTERM are ignored: they are for the tracker, which closes the helper
    after its last frame, so files end complete (a service manager signals every process
    of the service at once; a helper that quit on it would fail the tracker's last
    frames).  :data:`EXIT_SIGNAL` exits cleanly (``finally`` blocks run), and the kernel
    sends it when the parent dies (Linux ``PR_SET_PDEATHSIG``; note it follows the parent
    *thread* that spawned the child).  Elsewhere the child's own loop checks
    :func:`parent_gone`.
    """
    quiet_resource_tracker()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(EXIT_SIGNAL, _exit_on_signal)
    sys.unraisablehook = _retry_an_exit_lost_in_a_finalizer
    atexit.register(_no_retries_at_exit)
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, EXIT_SIGNAL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    return not parent_gone(parent_pid)


def parent_gone(parent_pid: int) -> bool:
    return os.getppid() != parent_pid


def stop(proc: subprocess.Popen | None, kill: bool, wait: float = 10.0) -> None:
    """Wait for ``proc`` to exit (killing it first if ``kill``, or after ``wait`` s)."""
    if proc is None:
        return
    if kill and proc.poll() is None:
        proc.kill()
    try:
        proc.wait(wait)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def describe_exit(code: int | None) -> str:
    """A process's exit status in words (``Popen.returncode``, ``Process.exitcode``)."""
    if code is None:
        return "still running"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        hint = {signal.SIGKILL: ", as by the OOM killer or kill -9",
                signal.SIGBUS: ", as when shared memory (/dev/shm) is full"}.get(-code, "")
        return f"killed by {name}{hint}"
    return f"exit code {code}"


def exited(name: str, proc: subprocess.Popen, verb: str = "exited") -> str:
    """``the NAME process exited (killed by SIGKILL, …)``: a helper's death, said once."""
    return f"the {name} process {verb} ({describe_exit(proc.returncode)})"


def end(proc: subprocess.Popen, folder: str) -> None:
    """Finalizer of a helper whose owner was dropped, or never closed it before exit
    (a second Ctrl-C): ask it to exit cleanly (files complete, shared memory freed),
    then remove its socket folder."""
    if proc.poll() is None:
        proc.send_signal(EXIT_SIGNAL)
    stop(proc, kill=False, wait=5.0)
    shutil.rmtree(folder, ignore_errors=True)


def send(sock: zmq.Socket, parts: list, proc: subprocess.Popen,
         on_cut: Callable[[], None] | None = None) -> bool:
    """Send ``parts`` to the helper ``proc``, waiting while it is behind but never on one
    that has exited (a PAIR socket whose peer died would wait forever): False then.
    ``on_cut`` is called if an exception (a Ctrl-C) stops the send after its first part:
    the socket then holds half a message, which the next send would complete."""
    more = zmq.SNDMORE if len(parts) > 1 else 0
    while True:
        try:
            sock.send(parts[0], flags=zmq.NOBLOCK | more)
            break
        except zmq.Again:
            if proc.poll() is not None:
                return False
            sock.poll(100, zmq.POLLOUT)
    try:  # the rest go at once: ZeroMQ takes a message's later parts with its first
        for i in range(1, len(parts)):
            sock.send(parts[i], flags=zmq.SNDMORE if i < len(parts) - 1 else 0)
    except BaseException:
        if on_cut is not None:
            on_cut()
        raise
    return True


def tell(sock: zmq.Socket, kind: bytes, info: dict | list | None = None) -> None:
    """A child's message to the tracker: ``kind`` and JSON.  Never blocks for long on a
    tracker that stopped reading: it is gone or closing."""
    if sock.poll(1000, zmq.POLLOUT):
        sock.send_multipart([kind, json.dumps(info).encode() if info is not None else b""])
