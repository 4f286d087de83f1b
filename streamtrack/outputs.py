"""Result writers: JSONL (one result per line), DAVIS-style palette PNGs, overlay MP4.

Each writer is closed in a ``finally`` by the pipeline, so an interrupted run
still leaves complete lines, images and a playable video.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import math
import os
import stat
import tempfile
import threading
import time
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path
from typing import BinaryIO

import cv2
import numpy as np
from PIL import Image

from streamtrack.errors import (
    ReaderGone,
    UserError,
    error_reason,
    file_in_the_way,
    file_name,
    looking_into,
    own_descriptor,
    reader_gone,
)
from streamtrack.overlay import PALETTE
from streamtrack.protocol import FrameResult
from streamtrack.sources import ffmpeg_file

log = logging.getLogger(__name__)


# A palette PNG's pixel is the object id.
MASK_PNG_MAX_ID = 255
# What PyAV muxes the H.264 overlay into, by file extension (FFmpeg's format names).
VIDEO_FORMATS = {".mp4": "mp4", ".mkv": "matroska", ".mov": "mov", ".m4v": "ipod", ".avi": "avi"}
VIDEO_EXTENSIONS = tuple(VIDEO_FORMATS)


def missing_folders(folder: Path) -> list[Path]:
    """``folder`` and those above it that do not exist yet, the deepest first."""
    missing = []
    while not os.path.lexists(folder) and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing


def remove_empty_folders(folders: list[Path]) -> None:
    """Remove the folders a writer made (deepest first) that it left empty: a run that
    ends before its first result leaves nothing behind, folders included."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:  # something was written there after all (or by someone else)
            return


def _writable(path: str | Path, what: str, made: list[Path] | None = None) -> Path:
    """Make the file's folder and check the file can be written, without truncating it:
    a run that fails before its first result (a bad checkpoint, a missing camera) must
    not have emptied the results of an earlier one.  The folders made are added to ``made``."""
    file_name(path, what)
    path = Path(path)
    with looking_into(path, what):
        if made is not None:
            made.extend(missing_folders(path.parent))
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            if (above := file_in_the_way(path)) is not None:
                raise UserError(f"{what} {path}: {above} is a file, not a folder") from None
            raise UserError(f"cannot create the folder for {what} {path}: {e.strerror}") from None
        if path.is_dir():
            raise UserError(f"{what} {path} is a directory; give a file name")
        if path.exists() and not path.is_file():
            return path  # a FIFO or a device: opening it to probe would signal its reader an end
    existed = os.path.lexists(path)  # a dangling symlink too: its target is the file
    try:
        with open(path, "a"):
            pass
    except OSError as e:
        raise UserError(f"cannot write {what} {path}: {e.strerror}") from None
    if not existed:
        path.unlink()  # nothing is left behind by a run that ends before its first result
    return path


def _open_pipe(path: Path, what: str) -> int | None:
    """For a FIFO: a file descriptor open for writing to it, or a one-line error if nothing
    reads it (a plain open would wait for a reader, and the run would hang without a
    word).  ``None`` for anything else."""
    try:
        if not stat.S_ISFIFO(os.stat(path).st_mode):
            return None
    except FileNotFoundError:
        return None
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    except OSError as e:
        if e.errno == errno.ENXIO:
            raise UserError(f"{what} {path} is a pipe that nothing reads: start its reader first") from None
        raise UserError(f"cannot write {what} {path}: {e.strerror}") from None
    os.set_blocking(fd, True)  # from here on a slow reader slows the run, as a slow disk does
    return fd


class JsonlWriter:
    """An existing file is replaced at the first result (``append=True``, for a restarted
    tracker: the lines written before the crash stay)."""

    def __init__(self, path: str | Path, append: bool = False):
        self._made: list[Path] = []  # folders made for it, removed again if it writes nothing
        self.path = _writable(path, "--save-jsonl", self._made)
        self._mode = "a" if append else "w"
        self._file = None
        self._failed = ""  # why a write failed; later writes fail the same way

    def write(self, result: FrameResult) -> None:
        if self._failed:
            raise UserError(self._failed)
        if self._file is None:
            self._made = []  # written from now on: its folder stays
            try:
                # /dev/stdout as the shell opened it: opened by name, a `>> log` would be cut.
                fd = own_descriptor(self.path)
                pipe = os.dup(fd) if fd is not None else _open_pipe(self.path, "--save-jsonl")
                if pipe is not None:
                    self._file = os.fdopen(pipe, "w", encoding="utf-8")
                else:
                    if self._mode == "a":
                        _drop_torn_line(self.path)
                    self._file = open(self.path, self._mode, encoding="utf-8")
            except OSError as e:
                raise UserError(f"cannot write --save-jsonl {self.path}: {e.strerror}") from None
        # One line per write, flushed; a process killed during the write can still leave
        # part of one (the kernel copies in pages), which a restart drops.
        start = self._file.tell() if self._file.seekable() else None
        try:
            self._file.write(result.to_json() + "\n")
            self._file.flush()
        except OSError as e:  # e.g. the disk filled up
            self._failed = f"cannot write --save-jsonl {self.path}: {error_reason(e)}"
            self._close_quietly()
            if start is not None:  # the part of the line that fitted: every line left is whole
                with contextlib.suppress(OSError):
                    os.truncate(self.path, start)
            if reader_gone(e):
                raise ReaderGone(f"the reader of --save-jsonl {self.path} went away") from None
            raise UserError(self._failed) from None

    def close(self) -> None:
        remove_empty_folders(self._made)
        if self._file is not None:
            file, self._file = self._file, None
            try:
                file.close()
            except OSError as e:
                raise UserError(f"cannot finish --save-jsonl {self.path}: {error_reason(e)}") from None

    def _close_quietly(self) -> None:
        # The line that did not fit is still buffered: closing would try it again, and fail
        # again, on top of the error already raised.
        file, self._file = self._file, None
        with contextlib.suppress(OSError):
            file.close()


def _drop_torn_line(path: Path) -> None:
    """Cut a file back to its last whole line: a tracker killed while writing one (SIGKILL,
    the OOM killer) leaves its first part, and the next line appended would join it."""
    if not path.is_file():
        return
    with open(path, "r+b") as f:
        end = f.seek(0, os.SEEK_END)
        pos = end
        while pos > 0:
            start = max(0, pos - 65536)
            f.seek(start)
            chunk = f.read(pos - start)
            cut = chunk.rfind(b"\n")
            if cut >= 0:
                keep = start + cut + 1
                break
            pos = start
        else:
            keep = 0
        if keep < end:
            f.truncate(keep)
            log.warning("--save-jsonl %s: dropped the last %d bytes, a line cut short when the tracker "
                        "died", path, end - keep)


class MaskPngWriter:
    """One palette PNG per frame, pixel value = object id (0 = background), as DAVIS."""

    def __init__(self, folder: str | Path, warn_earlier: bool = True):
        self.folder = Path(folder)
        self._made = missing_folders(self.folder)  # removed again if no frame is written
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create --save-masks folder {self.folder}: {e.strerror}") from None
        try:  # a folder there that cannot be written: said now, before the other outputs replace any file
            fd, probe = tempfile.mkstemp(prefix=".streamtrack-probe-", dir=self.folder)
            os.close(fd)
            os.unlink(probe)
        except OSError as e:
            raise UserError(f"cannot write in --save-masks folder {self.folder}: {e.strerror}") from None
        earlier = warn_earlier and sum(1 for _ in self.folder.glob("[0-9][0-9][0-9][0-9][0-9][0-9].png"))
        if earlier:
            log.warning("--save-masks folder %s already holds %d frame PNGs: this run replaces those of "
                        "the frames it tracks and leaves the others", self.folder, earlier)
        palette = [0, 0, 0] + [c for rgb in PALETTE for c in rgb] * 26
        self._palette = palette[: 256 * 3]

    def write(self, frame_id: int, masks: dict[int, np.ndarray], shape: tuple[int, int]) -> None:
        labels = np.zeros(shape, np.uint8)
        for obj_id, mask in sorted(masks.items()):
            if obj_id > MASK_PNG_MAX_ID:
                raise UserError(f"--save-masks stores object ids up to {MASK_PNG_MAX_ID}, got {obj_id}")
            labels[mask] = obj_id
        img = Image.fromarray(labels, mode="P")
        img.putpalette(self._palette)
        path = self.folder / f"{frame_id:06d}.png"
        self._made = []
        try:
            img.save(path)
        except OSError as e:  # e.g. the disk filled up
            with contextlib.suppress(OSError):  # no cut-short PNG for a reader of the folder to trip on
                path.unlink(missing_ok=True)
            raise UserError(f"cannot write --save-masks {path}: {error_reason(e)}") from None

    def close(self) -> None:
        """Nothing to flush: each PNG is written whole in ``write``; the folders made for a
        run that wrote none are removed."""
        remove_empty_folders(self._made)


# Fragmented MP4, a fragment per frame flushed at once: every frame muxed stays playable if
# the process is killed (a plain MP4 writes its index at the end, and without it nothing
# plays).  ~100 bytes a frame of overhead; every current player reads it.
_FRAGMENTED = {"movflags": "frag_every_frame+empty_moov+default_base_moof"}
_FRAGMENTED_SUFFIXES = (".mp4", ".mov", ".m4v")
# Matroska keeps a cluster (5 s of frames) in memory until it is full: a killed process's
# MKV held none of its frames.  A cluster per frame goes out when the next frame comes.
_CLUSTER_PER_FRAME = {"cluster_time_limit": "0"}
_MS = Fraction(1, 1000)


def _scan_fragments(f: BinaryIO, start: int, size: int) -> tuple[int, int | None]:
    """The whole fragments (a ``moof`` and its ``mdat``: one frame each) of an open
    fragmented MP4 from ``start`` (a box boundary), and where to cut it so that it ends
    with the last whole one, before a box that runs past the end (a header cut short
    too) or a ``moof`` without its data; None when nothing is torn."""
    pos = whole = start  # ``whole``: the end of the last box that is not half a fragment
    kind = b""
    fragments = 0
    while pos < size:
        f.seek(pos)
        header = f.read(16)
        previous, kind = kind, header[4:8]
        box = int.from_bytes(header[:4], "big") if len(header) >= 8 else 0
        if box == 1:  # a 64-bit size follows the type
            box = int.from_bytes(header[8:16], "big") if len(header) == 16 else 0
        elif box == 0 and len(header) >= 8:  # runs to the end of the file
            box = size - pos
        if box < 8 or pos + box > size:
            return fragments, whole
        pos += box
        if kind == b"mdat" and previous == b"moof":
            fragments += 1
        if kind != b"moof":
            whole = pos
    return fragments, (whole if whole < size else None)


def _cut_torn_fragment(path: Path, start: int) -> bool:
    """Cut a fragmented MP4 back to its last whole fragment after ``start`` (a fragment
    boundary) if its end is torn; True if it did."""
    try:
        with open(path, "r+b") as f:
            _, cut = _scan_fragments(f, start, f.seek(0, os.SEEK_END))
            if cut is None:
                return False
            f.truncate(cut)
            return True
    except OSError:
        return False


def file_identity(path: str | Path) -> tuple[int, ...] | None:
    """What changes when a file is written (or replaced): a part a restarted tracker's
    predecessor left as it found it is an earlier run's.  None: no file there."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def frames_in_video_part(path: str | Path, timeout: float, stop: threading.Event | None = None) -> int | None:
    """The frames in a ``--save-video`` part whose writer is gone (a killed tracker's),
    once it is done with the file: a tracker's emitter process can outlive it by a moment
    and close the file, adding the frame its muxer held.  A torn end is cut off first, so
    the part plays.  0 when there is no such file; None when the frames cannot be counted
    (a container other than fragmented MP4, a pipe, no access, ``stop`` set while it
    waits).  TimeoutError: the writer still held the file after ``timeout`` seconds."""
    path = Path(path)
    if path.suffix.lower() not in _FRAGMENTED_SUFFIXES:
        return None
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # a pipe, a device
            return None
        f = open(path, "r+b")
    except FileNotFoundError:
        return 0
    except OSError:
        return None
    with f:
        deadline = time.monotonic() + timeout
        while True:  # VideoWriter holds a lock on its file as long as it writes it
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"{path} is still being written") from None
                if stop.wait(0.05) if stop else time.sleep(0.05):
                    return None
            except OSError:  # a file system without locks: its writer is gone, or so we take it
                break
        try:
            fragments, cut = _scan_fragments(f, 0, f.seek(0, os.SEEK_END))
            if cut is not None:
                f.truncate(cut)
        except OSError:  # it cannot be read (or cut): count it by the reports
            return None
        return fragments


def _interval(earlier: float | None, later: float | None) -> float | None:
    """Seconds from one pts to the next, when both are known and it moves forward."""
    if earlier is None or later is None or not (math.isfinite(earlier) and math.isfinite(later)):
        return None
    return later - earlier if later > earlier else None


def _fit(rgb: np.ndarray, width: int, height: int) -> np.ndarray:
    """``rgb`` as a ``width`` x ``height`` frame of the overlay video: the video's size is
    its first frame's (even); a frame of another size (the source changed mode) is scaled
    to fit, keeping its aspect, on black."""
    h, w = rgb.shape[:2]
    if (h, w) == (height, width) or (h - h % 2, w - w % 2) == (height, width):
        return np.ascontiguousarray(rgb[:height, :width])
    scale = min(width / w, height / h)
    sw, sh = max(1, round(w * scale)), max(1, round(h * scale))
    canvas = np.zeros((height, width, 3), np.uint8)
    y, x = (height - sh) // 2, (width - sw) // 2
    canvas[y:y + sh, x:x + sw] = cv2.resize(rgb, (sw, sh), interpolation=cv2.INTER_AREA)
    return canvas


class VideoWriter:
    """Overlay video (H.264 via PyAV), opened lazily at the first frame's size.  Frames are
    timed by their source ``pts`` (a 10 fps file plays at 10 fps, a live source's drops
    show as the time they took).  A frame without a pts, or with one that does not move
    forward (a loop, a repeated time), comes one source frame interval (the shortest seen)
    after the last.  The rate the file declares (what OpenCV and ffprobe report, and the
    last frame's duration) is the one between its first two frames' pts, so the first
    frame is held until the second comes; an AVI has only that rate (a drop between
    them slows the whole video).  ``fps`` is the rate assumed until the source says
    otherwise.  ``replaces``: files removed when the video itself is first written (an
    earlier run's other parts), as the file itself is replaced then."""

    def __init__(self, path: str | Path, fps: float = 30.0, replaces: Sequence[Path] = ()):
        if Path(path).suffix.lower() not in VIDEO_EXTENSIONS:
            raise UserError(f"--save-video {path}: unknown video file extension {Path(path).suffix!r} "
                            f"(use {', '.join(VIDEO_EXTENSIONS)})")
        self._made: list[Path] = []  # folders made for it, removed again if it writes nothing
        self.path = _writable(path, "--save-video", self._made)
        self._replaces = list(replaces)
        self.fps = fps
        self._container = None
        self._stream = None
        self._first_pts: float | None = None
        self._last_ms: int | None = None
        self._last_pts: float | None = None
        self._step_ms = max(1, round(1000 / fps))  # the source's frame interval, once seen
        self._step_seen = False
        self._held: tuple[np.ndarray, float | None] | None = None  # the first frame, until the second
        self._failed = ""  # why a write failed; later writes fail the same way
        self._pipe: int | None = None
        # The file's size after the last write that went through: a write that fails (a
        # full disk) is cut back to it, since a torn last fragment fails a decoder.
        self._whole: int | None = None
        self._lock: int | None = None  # a descriptor of the file holding a lock on it
        # AVI has a constant frame rate (a 1 ms time base would write 999 empty frames a
        # second): its frames go at the source's rate.
        self._timed = self.path.suffix.lower() != ".avi"

    def write(self, rgb: np.ndarray, pts: float | None = None) -> None:
        if self._failed:
            raise UserError(self._failed)
        if self._container is None:
            self._made = []  # its file is made now: the folder stays
            self._open()  # at once: a pipe without a reader or a bad path fails on the first frame
            for stale in self._replaces:
                try:
                    stale.unlink()
                except FileNotFoundError:
                    pass
                except OSError as e:  # it stays; this run's video is written all the same
                    log.warning("cannot remove %s, a part of an earlier run's video: %s",
                                stale, error_reason(e))
        if self._stream is None:
            if self._held is None:
                self._held = (rgb.copy(), pts)  # the next frame's pts gives the rate
                return
            interval = _interval(self._held[1], pts)
            self.fps = 1.0 / interval if interval else self.fps
            self._write_held()
        self._encode(rgb, pts)

    def _write_held(self) -> None:
        """Add the video stream at the first frame's size and rate, and write that frame."""
        (rgb, pts), self._held = self._held, None
        self._add_stream(rgb)
        self._encode(rgb, pts)

    def _open(self) -> None:
        import av

        options = {"flush_packets": "1"}
        if self.path.suffix.lower() in _FRAGMENTED_SUFFIXES:
            options.update(_FRAGMENTED)
        elif self.path.suffix.lower() == ".mkv":
            options.update(_CLUSTER_PER_FRAME)
        # A FIFO is written through the descriptor opened here: opened again by FFmpeg (when
        # it writes the header, at the second frame), it would wait for good if the reader
        # had gone by then.
        self._pipe = _open_pipe(self.path, "--save-video")
        # A fragmented MP4 written to a file (not a pipe or a device).  Other containers
        # buffer what they write, and their readers take a cut end as the end.
        fragmented = self.path.suffix.lower() in _FRAGMENTED_SUFFIXES
        self._whole = 0 if fragmented and self._pipe is None and (
            not self.path.exists() or self.path.is_file()) else None
        if self._whole is not None:
            self._lock_file()
        try:
            if self._pipe is not None:
                self._container = av.open(f"pipe:{self._pipe}", mode="w", options=options,
                                          format=VIDEO_FORMATS[self.path.suffix.lower()])
            else:
                self._container = av.open(ffmpeg_file(self.path), mode="w", options=options)
        except (OSError, av.FFmpegError) as e:
            self._close_pipe()
            self._unlock()
            raise UserError(f"cannot write video {self.path}: {error_reason(e)}") from None

    def _add_stream(self, rgb: np.ndarray) -> None:
        stream = self._container.add_stream("libx264", rate=Fraction(self.fps).limit_denominator(1000))
        h, w = rgb.shape[:2]
        # yuv420p needs even sides (at least 2): a 1-pixel side is padded, not cut to 0.
        stream.width, stream.height = max(2, w - w % 2), max(2, h - h % 2)
        stream.pix_fmt = "yuv420p"
        if self._timed:
            stream.time_base = stream.codec_context.time_base = _MS
        # No B-frames or look-ahead: each frame is muxed as it comes, not ~20 frames later.
        stream.options = {"crf": "23", "preset": "veryfast", "tune": "zerolatency"}
        self._stream = stream

    def _encode(self, rgb: np.ndarray, pts: float | None) -> None:
        import av

        s = self._stream
        frame = av.VideoFrame.from_ndarray(_fit(rgb, s.width, s.height), format="rgb24")
        if self._timed:
            frame.pts, frame.time_base = self._timestamp_ms(pts), _MS
        try:
            self._container.mux(s.encode(frame))
        except (OSError, av.FFmpegError) as e:  # e.g. the disk filled up, or the pipe's reader left
            self._failed = f"cannot write video {self.path}: {error_reason(e)}"
            container, self._container = self._container, None
            with contextlib.suppress(OSError, av.FFmpegError):  # what was muxed stays playable
                container.close()
            self._close_pipe()
            if self._whole is not None:  # ...and nothing after it
                with contextlib.suppress(OSError):
                    os.truncate(self.path, self._whole)
            self._unlock()
            if reader_gone(e):
                raise ReaderGone(f"the reader of --save-video {self.path} went away") from None
            raise UserError(self._failed) from None
        if self._whole is not None:  # each frame is flushed as a fragment of its own
            self._whole = os.stat(self.path).st_size

    def _lock_file(self) -> None:
        """Make the file (an earlier one is replaced from the first result on, as FFmpeg
        would at the second) and hold a lock on it until it is written: a supervisor counts
        a dead tracker's frames in it once its writer let go of it (see
        :func:`frames_in_video_part`).  Open for writing, as NFS's locks need."""
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o666)
        except OSError:
            return  # FFmpeg says why, in a moment
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:  # no locks on this file system, or another process writes it
            log.debug("no lock on %s: %s", self.path, error_reason(e))
            os.close(fd)
            return
        self._lock = fd

    def _timestamp_ms(self, pts: float | None) -> int:
        """Milliseconds from the first frame, always increasing (a loop or a restart of the
        source's clock, or no pts at all, continues one source frame interval later)."""
        interval = _interval(self._last_pts, pts)
        if interval:
            # The shortest step seen is the frame interval: a live source's drops only
            # make steps longer.
            step = max(1, round(interval * 1000))
            self._step_ms = min(self._step_ms, step) if self._step_seen else step
            self._step_seen = True
        ms = None
        if pts is not None and math.isfinite(pts):
            self._last_pts = pts
            if self._first_pts is None:
                self._first_pts = pts
            ms = round((pts - self._first_pts) * 1000)
        if self._last_ms is not None and (ms is None or ms <= self._last_ms):
            ms = self._last_ms + self._step_ms
        self._last_ms = ms if ms is not None else 0
        return self._last_ms

    def close(self) -> None:
        remove_empty_folders(self._made)
        try:
            if self._held is not None and not self._failed:  # a video of one frame
                self._write_held()
        finally:
            try:
                self._close_container()
            finally:
                self._unlock()  # last: a torn end is cut back first

    def _close_container(self) -> None:
        import av

        if self._container is not None:
            container, self._container = self._container, None
            try:
                if self._stream is not None:
                    container.mux(self._stream.encode(None))
                container.close()
            except (OSError, av.FFmpegError) as e:  # e.g. the disk filled up
                if reader_gone(e):
                    raise ReaderGone(f"the reader of --save-video {self.path} went away") from None
                raise UserError(f"cannot finish video {self.path}: {error_reason(e)}") from None
            finally:
                self._close_pipe()
            # The last fragment and the index go out in close(), whose write errors PyAV
            # does not raise: a file whose end is torn is cut back and reported.
            if self._whole is not None and not self._failed and _cut_torn_fragment(self.path, self._whole):
                self._failed = (f"cannot finish video {self.path}: its end was not written whole (is the "
                                "disk full?); cut back to the last whole frame")
                raise UserError(self._failed)

    def _unlock(self) -> None:
        if self._lock is not None:  # the file is done with
            lock, self._lock = self._lock, None
            os.close(lock)

    def _close_pipe(self) -> None:
        if self._pipe is not None:
            pipe, self._pipe = self._pipe, None
            os.close(pipe)
