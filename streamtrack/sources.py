"""Video sources: what a source string means, and how raw frames are read from it.

Webcams (an index such as ``0`` or a device path such as ``/dev/video0``) are read
through OpenCV's V4L2 backend; files and network URLs (``rtsp://``, ``http(s)://``,
...) through PyAV. Readers only decode: threading, buffering, reconnecting and
state live in :mod:`streamtrack.capture`.

Decoded frames stay in their native form (an ``av.VideoFrame`` or OpenCV's BGR
array) inside a :class:`RawFrame`; the RGB conversion runs only when the capture
stage hands the frame to a consumer, so frames that get dropped are never
converted.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import re
import stat
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import Enum
from typing import Any, Protocol
from urllib.parse import unquote, urlsplit, urlunsplit

import av
import cv2
import numpy as np
from av.codec.context import Flags as CodecFlags

from streamtrack.errors import UserError

__all__ = [
    "NETWORK_SCHEMES",
    "FrameReader",
    "RawFrame",
    "SourceKind",
    "SourceSpec",
    "VideoCaptureFactory",
    "VideoCaptureLike",
    "describe_error",
    "open_pyav",
    "open_webcam",
    "parse_source",
    "redact_url",
]

log = logging.getLogger(__name__)

_HTTP_SCHEMES = frozenset({"http", "https"})
# Demuxers (FFmpeg's names) whose timestamps only go up: a restart seeks in them by pts.
_PTS_ONLY_GO_UP = frozenset({"mov", "mp4", "matroska", "webm", "avi"})

#: URL schemes handed to PyAV as live network streams.
NETWORK_SCHEMES = frozenset(
    {"rtsp", "rtsps", "rtmp", "rtmps", "http", "https", "udp", "tcp", "srt"}
)

_V4L2_MAJOR = 81  # Linux's video4linux character devices (/dev/videoN)

# Probe only a little of a live stream before the first frame: RTSP carries the
# H.264 parameters in its SDP, so long probing only adds start-up latency.
_LIVE_PROBESIZE = "32768"
_LIVE_ANALYZEDURATION_US = "200000"


class SourceKind(str, Enum):
    """What kind of thing a source string names."""

    FILE = "file"
    NETWORK = "network"
    WEBCAM = "webcam"

    @property
    def live(self) -> bool:
        """Live sources never end by themselves: EOF or an error is a disconnect."""
        return self is not SourceKind.FILE


@dataclass(frozen=True)
class SourceSpec:
    """A parsed source string."""

    kind: SourceKind
    target: str | int  # file path, URL, webcam index or device path
    name: str  # a short, credential-free default name for logs and topics

    @property
    def display(self) -> str:
        """The target as safe to print (URL credentials hidden)."""
        if self.kind is SourceKind.NETWORK:
            return redact_url(str(self.target))
        return str(self.target)


# Query parameters cameras and NVRs take credentials in (…/cam?user=admin&password=…).
_SECRET_QUERY = re.compile(r"(?i)(^|[?&;])((?:password|passwd|pwd|pass|token|access_token|auth|secret|"
                           r"api_?key|key)=)[^&;#]*")


# FFmpeg's errors come as "[Errno 1094995529] …": a tag, not an errno worth showing.
_FFMPEG_TAG = re.compile(r"\[Errno (-?\d+)\] ")


def redact_url(url: str) -> str:
    """Hide the user:password part of a URL, and the values of query parameters that
    hold credentials (``password=``, ``pwd=``, ``token=``, …), so they never reach logs
    or errors."""
    url = _SECRET_QUERY.sub(r"\1\2***", url)
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    try:
        parts = urlsplit(url)
    except ValueError:  # malformed (e.g. an unclosed [)
        parts = None
    if parts is not None and "@" in parts.netloc and rest.count("@") == parts.netloc.count("@"):
        host = parts.netloc.rsplit("@", 1)[1]
        return urlunsplit(parts._replace(netloc="***@" + host))
    # An @ after what parses as the host: a password with a bare / ? or # in it
    # (rtsp://admin:My/Pass#1@cam) splits there.  Hide everything up to the last @.
    return f"{scheme}{sep}***@{rest.rsplit('@', 1)[1]}"


_SOURCE_HELP = (
    "use a video file path, a webcam index such as 0, a device such as /dev/video0, "
    "or an rtsp(s)://, http(s)://, rtmp(s)://, srt://, udp:// or tcp:// URL"
)


def parse_source(source: str | int) -> SourceSpec:
    """Classify a source string; raises :class:`UserError` for what cannot be a source.

    Only the form is checked here (and that a file exists); opening happens later.
    """
    if isinstance(source, int) and not isinstance(source, bool):
        return _webcam_spec(source)
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    if not isinstance(source, str):
        raise UserError(f"a video source is a path, URL or webcam index, got {type(source).__name__}: "
                        f"{_SOURCE_HELP}")
    text = source.strip()
    if not text:
        raise UserError(f"empty video source: {_SOURCE_HELP}")
    if text.isdigit() or (text.startswith("-") and text[1:].isdigit()):
        return _webcam_spec(int(text))
    if text.startswith("/dev/"):
        return _device_spec(text)
    if "://" in text:
        return _url_spec(text)
    # A file name may begin or end with spaces: keep them if that is the file.
    path = source if os.path.exists(source) else text
    if not os.path.exists(path) and (typo := url_missing_a_slash(text)) is not None:
        # Not a file: a URL typed with a slash missing, whose password must not be printed.
        meant = redact_url(f"{typo['scheme']}://{typo['rest']}")
        raise UserError(f"video source {meant.replace('://', typo['sep'], 1)} is neither a file nor a URL: "
                        f"did you mean {meant}?")
    return _file_spec(path)


# rtsp:/cam, rtsp//cam, rtsp:cam: the scheme, what stands for "://", and the rest.
_URL_MISSING_A_SLASH = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)(?P<sep>:/|//|:)(?P<rest>[^/].*)$")


def url_missing_a_slash(text: str) -> re.Match | None:
    """``text`` read as a network URL typed with a slash missing (``rtsp:/cam``): its
    ``scheme``, ``sep`` and ``rest``; None if it is not one."""
    typo = _URL_MISSING_A_SLASH.match(text.strip())
    return typo if typo is not None and typo["scheme"].lower() in NETWORK_SCHEMES else None


def _webcam_spec(index: int) -> SourceSpec:
    if index < 0:
        raise UserError(f"webcam index must be >= 0, got {index}")
    return SourceSpec(SourceKind.WEBCAM, index, f"webcam{index}")


def _device_spec(path: str) -> SourceSpec:
    """A webcam by device path.  Anything under /dev that exists and is not a video
    device (``/dev/null``, ``/dev/stdin``) is refused here rather than by OpenCV."""
    if os.path.exists(path):
        try:
            st = os.stat(path)
        except OSError as exc:
            raise UserError(f"cannot use {path}: {exc.strerror}") from None
        if not stat.S_ISCHR(st.st_mode) or os.major(st.st_rdev) != _V4L2_MAJOR:
            raise UserError(f"{path} is not a video device (webcams are /dev/videoN)")
    return SourceSpec(SourceKind.WEBCAM, path, os.path.basename(path))


def _url_spec(text: str) -> SourceSpec:
    try:
        parts = urlsplit(text)
        scheme = parts.scheme.lower()
        if scheme == "file":
            if parts.netloc not in ("", "localhost"):
                raise UserError(f"a file:// URL names a local path (file:///path/to/video.mp4), "
                                f"got host {parts.netloc!r} in {text}")
            return _file_spec(unquote(parts.path))
        if scheme not in NETWORK_SCHEMES:
            raise UserError(f"unsupported video source scheme '{scheme}://': {_SOURCE_HELP}")
        host, _port = parts.hostname, parts.port  # both raise ValueError for a malformed netloc
    except ValueError as exc:
        # urlsplit's words quote the part it choked on: with credentials, maybe the password.
        why = ("its host or port cannot be read (a user name or password with / ? # or @ in it must "
               "be percent-encoded: %2F %3F %23 %40)") if "@" in text else str(exc)
        raise UserError(f"malformed video source URL {redact_url(text)}: {why}") from None
    if not host:
        raise UserError(f"video source URL has no host: {redact_url(text)}")
    if _port == 0:  # FFmpeg's "Invalid argument" at every attempt, retried for good
        raise UserError(f"malformed video source URL {redact_url(text)}: port 0 is no port to connect to")
    name = host + (parts.path.rstrip("/") or "")
    # FFmpeg knows its protocols by their lower-case names only.
    return SourceSpec(SourceKind.NETWORK, urlunsplit(parts._replace(scheme=scheme)), name)


def _file_spec(path: str) -> SourceSpec:
    if not os.path.exists(path):
        raise UserError(f"video file not found: {path}")
    if os.path.isdir(path):
        raise UserError(f"video source is a directory, not a file: {path}")
    if not os.path.isfile(path):
        # A named pipe blocks until a writer comes, and can be read only once.
        raise UserError(f"video source is not a regular file (a pipe or a device?): {path}")
    stem = os.path.splitext(os.path.basename(path))[0]
    return SourceSpec(SourceKind.FILE, path, stem or "file")


@dataclass(frozen=True, eq=False)
class RawFrame:
    """A decoded frame not yet converted to RGB.

    ``convert`` does the (only) conversion to an RGB ``uint8`` array; it keeps a
    reference to the decoded frame, so holding a RawFrame keeps that frame alive.
    """

    pts: float | None
    convert: Callable[[], np.ndarray]


class FrameReader(Protocol):
    """An opened source. ``frames()`` ends at end of stream and raises on errors."""

    @property
    def fps(self) -> float | None: ...

    @property
    def decode_errors(self) -> int: ...

    def frames(self) -> Iterator[RawFrame]: ...

    def close(self) -> None: ...


# ---------------------------------------------------------------------------
# PyAV: files and network streams


# RTSP URLs whose camera refused TCP interleaving in this process: opened over UDP.
_RTSP_OVER_UDP: set[str] = set()


def _pyav_options(url: str, read_timeout: float) -> dict[str, str]:
    """Low-latency demuxer options for a live network stream."""
    scheme = urlsplit(url).scheme.lower()
    options = {
        "probesize": _LIVE_PROBESIZE,
        "analyzeduration": _LIVE_ANALYZEDURATION_US,
        # Socket I/O timeout (microseconds), so a silent server cannot block a read.  RTMP
        # reads its "timeout" as seconds to wait for a publisher to connect, and listens
        # on the camera's address instead of connecting: it gets FFmpeg's generic one.
        "rw_timeout" if scheme in ("rtmp", "rtmps") else "timeout": str(int(read_timeout * 1_000_000)),
    }
    # No fflags=nobuffer: it throws away the packets read while probing, the first
    # keyframe among them, so decoding waits for the next one (2.1 s instead of 0.3 s to
    # the first frame from an RTSP camera with a 2 s keyframe interval; nothing at all from
    # a stream with one keyframe).  The few probed frames it would save come out at once
    # and the capture's drop-oldest queue keeps only the newest.
    if scheme in ("rtsp", "rtsps"):
        # TCP interleaving: no UDP ports to open, no packet loss artefacts (a camera that
        # offers only UDP gets UDP: see open_pyav).
        options["rtsp_transport"] = "tcp"
    return options


def video_stream(container: av.container.InputContainer) -> av.video.stream.VideoStream | None:
    """The container's first video stream that is a video: an audio file's cover art (or a
    video's thumbnail) is a one-picture "video" stream marked ``attached_pic``."""
    # PyAV < 13 has no dispositions: every video stream is taken for a video there.
    attached_pic = getattr(getattr(av.stream, "Disposition", None), "attached_pic", 0)
    return next((s for s in container.streams.video
                 if not getattr(s, "disposition", 0) & attached_pic), None)


class PyAVReader:
    """Decodes the first video stream of a container opened with PyAV."""

    def __init__(self, container: av.container.InputContainer, live: bool,
                 read_timeout: float | None = None) -> None:
        self._container = container
        self._read_timeout = read_timeout
        stream = video_stream(container)
        if stream is None:
            container.close()
            raise ValueError("no video stream")
        self._stream = stream
        self._threaded_convert = True
        codec = self._stream.codec_context
        # Slice and frame threads where the codec supports them.
        self._stream.thread_type = "AUTO"
        if live:
            # low_delay makes libavcodec skip frame threading (each frame thread
            # holds back one frame), keeping slice threads: no added latency.
            codec.flags |= CodecFlags.low_delay
        rate = self._stream.average_rate or self._stream.guessed_rate
        self._fps = float(rate) if rate else None
        self._decode_errors = 0
        # A file served over HTTP has a duration, a camera's stream has none: its end is
        # the end of the source, not a disconnect to retry.
        self.ends_at_eof = container.duration is not None and \
            urlsplit(str(container.name)).scheme.lower() in _HTTP_SCHEMES

    @property
    def fps(self) -> float | None:
        return self._fps

    @property
    def decode_errors(self) -> int:
        return self._decode_errors

    def frames(self) -> Iterator[RawFrame]:
        # demux() ends with an empty packet per stream that flushes the decoder.
        packets = self._container.demux(self._stream)
        while True:
            asked = time.monotonic()
            try:
                packet = next(packets)
            except StopIteration:
                return
            except av.ExitError:
                # The read timeout's interrupt: a live source gone silent, or a file whose
                # demuxer spends that long searching damaged data for the next packet.
                raise _silent() from None
            if self._read_timeout is not None and time.monotonic() - asked >= self._read_timeout:
                # The read timed out, and FFmpeg first hands back the frame its H.264 parser
                # held (it lets a frame go when the next one starts): the last one a frozen
                # camera sent, seconds old.  Its error would come a read timeout later.
                raise _silent()
            try:
                decoded = packet.decode()
            except av.InvalidDataError:
                # One damaged packet (e.g. a reference lost on reconnect) costs a
                # frame, not the stream.
                self._decode_errors += 1
                continue
            for frame in decoded:
                yield RawFrame(frame.time, functools.partial(self._to_rgb, frame))

    @property
    def seeks_by_pts(self) -> bool:
        """Whether a frame's pts names it: containers whose timestamps only go up (MPEG-TS
        and FLV may start over, a pts then naming two frames)."""
        return bool(_PTS_ONLY_GO_UP & set(self._container.format.name.split(",")))

    def frames_after(self, pts: float) -> Iterator[RawFrame] | None:
        """The frames after the one at ``pts`` (seconds), found by seeking to the key frame
        before it instead of decoding every frame from the start; None where that frame
        is not found (no timestamps, a failed seek, or one that lands past it): read
        again from the start, then."""
        errors = self._decode_errors
        try:
            # Compared in the stream's own units: a frame's time is its pts in them, and
            # seconds of large timestamps (a recording's) are a frame apart within 1e-6.
            time_base = self._stream.time_base
            target = round(pts / time_base)
            self._container.seek(target - 1, stream=self._stream, backward=True, any_frame=False)
            frames = self.frames()
            for raw in frames:
                at = None if raw.pts is None else round(raw.pts / time_base)
                if at is None or at > target:
                    return None
                if at == target:
                    # Damage before it is the seek's landing (frames that refer to
                    # earlier ones), not the file's.
                    self._decode_errors = errors
                    return frames
        except (av.FFmpegError, OSError, ValueError, OverflowError, TypeError, ZeroDivisionError) as exc:
            log.debug("seeking to %.6f s failed: %s", pts, exc)
        return None

    def _to_rgb(self, frame: av.VideoFrame) -> np.ndarray:
        # swscale's own threads (0 = one per core) convert a 720p frame ~1.7x faster on two
        # cores, bit for bit the same; on a live source this runs on the tracker's thread.
        rgb = None
        if self._threaded_convert:
            try:
                rgb = frame.to_ndarray(format="rgb24", threads=0)
            except TypeError:  # a PyAV without the threads option
                self._threaded_convert = False
        if rgb is None:
            rgb = frame.to_ndarray(format="rgb24")
        return upright(rgb, getattr(frame, "rotation", 0))

    def close(self) -> None:
        self._container.close()


def _silent() -> TimeoutError:
    return TimeoutError("no video data within the read timeout "
                        "(a silent stream, a damaged file or a stalled disk)")


_ROTATE_CCW = {1: cv2.ROTATE_90_COUNTERCLOCKWISE, 2: cv2.ROTATE_180, 3: cv2.ROTATE_90_CLOCKWISE}


def upright(image: np.ndarray, rotation: float) -> np.ndarray:
    """``image`` as players show it: a phone video (or a JPEG's EXIF orientation) is stored
    sideways with a display rotation, ``rotation`` degrees counterclockwise (PyAV's
    ``VideoFrame.rotation``).  Prompts, masks and overlays are all in the shown frame."""
    turns = round(rotation / 90) % 4 if rotation else 0
    return cv2.rotate(image, _ROTATE_CCW[turns]) if turns else image


def open_pyav(
    spec: SourceSpec, open_timeout: float, read_timeout: float
) -> PyAVReader:
    """Open a file or a network stream. Network errors propagate as PyAV/OS errors;
    file errors become :class:`UserError`, since they are bad input."""
    target = str(spec.target)
    if spec.kind is SourceKind.NETWORK:
        started = time.monotonic()
        options = _pyav_options(target, read_timeout)
        if target in _RTSP_OVER_UDP:
            options["rtsp_transport"] = "udp"
        try:
            try:
                container = av.open(target, options=options, timeout=(open_timeout, read_timeout))
            except OSError as exc:
                if exc.errno != errno.EPROTONOSUPPORT or options.get("rtsp_transport") != "tcp" \
                        or urlsplit(target).scheme.lower() != "rtsp":
                    raise
                # The camera offers RTP over UDP only (no TCP interleaving): take that, lost
                # packets and all, rather than no picture.  Remembered for reconnects.
                log.warning("source %s: the camera offers RTSP over UDP only; using UDP (lost packets "
                            "show as damaged frames)", spec.display)
                _RTSP_OVER_UDP.add(target)
                options["rtsp_transport"] = "udp"
                container = av.open(target, options=options, timeout=(open_timeout, read_timeout))
        except (av.ExitError, av.InvalidDataError) as exc:
            # The timeout's interrupt (a server that accepts and never answers): ExitError,
            # or, from FFmpeg's RTSP demuxer, "invalid data" at the open timeout.
            if isinstance(exc, av.InvalidDataError) and time.monotonic() - started < 0.9 * open_timeout:
                raise
            raise TimeoutError(f"no answer within the open timeout ({open_timeout:g} s)") from None
        try:
            return PyAVReader(container, live=True, read_timeout=read_timeout)
        except ValueError as exc:
            raise ConnectionError(f"{spec.display}: {exc}") from None
    try:
        container = av.open(ffmpeg_file(target), timeout=(open_timeout, read_timeout))
        return PyAVReader(container, live=False)
    except (av.FFmpegError, OSError, ValueError) as exc:
        raise UserError(f"cannot read video file {target}: {_reason(exc)}") from None


def ffmpeg_file(path: str | os.PathLike[str]) -> str:
    """A local file's path as FFmpeg takes it: FFmpeg reads a "name:" before the first
    "/" as a protocol (a recording called cam-10:00:00.mp4 is "Protocol not found",
    http:x.mp4 it would fetch), so such a path goes through its file protocol."""
    path = os.fspath(path)
    return f"file:{path}" if ":" in path.split("/", 1)[0] else path


def _reason(exc: BaseException) -> str:
    """A short, one-line reason from a PyAV/OS error (without the repeated path)."""
    reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    if isinstance(exc, av.InvalidDataError):
        reason += " (corrupt or unsupported format)"
    return " ".join(str(reason).split())


def describe_error(exc: BaseException, spec: SourceSpec) -> str:
    """One line for the status/last-error of a source, credentials hidden.  A
    :class:`UserError` already says it in the user's words: no class name before it."""
    if isinstance(exc, UserError):
        return str(exc)
    message = _FFMPEG_TAG.sub(lambda m: "" if abs(int(m.group(1))) > 4095 else m.group(0), str(exc))
    text = f"{type(exc).__name__}: {' '.join(message.split())}"
    if spec.kind is SourceKind.NETWORK:
        text = text.replace(str(spec.target), spec.display)
        scheme = urlsplit(str(spec.target)).scheme.lower()
        if "Protocol not supported" in text and scheme == "rtsps":
            text += " (streamtrack asks for RTSPS over TCP: this camera may offer only UDP)"
        elif "Protocol not supported" in text and scheme == "rtsp":
            text += " (the camera refused RTP over TCP and over UDP)"
    return text


# ---------------------------------------------------------------------------
# OpenCV: webcams


class VideoCaptureLike(Protocol):
    """The part of ``cv2.VideoCapture`` the webcam reader uses (fakes implement it)."""

    def isOpened(self) -> bool: ...  # noqa: N802 - OpenCV's name

    def read(self) -> tuple[bool, Any]: ...

    def release(self) -> None: ...

    def get(self, prop: int) -> float: ...

    def set(self, prop: int, value: float) -> bool: ...


VideoCaptureFactory = Callable[[str | int], VideoCaptureLike]


def _v4l2_capture(target: str | int) -> VideoCaptureLike:
    return cv2.VideoCapture(target, cv2.CAP_V4L2)


def _bgr_to_rgb(image: np.ndarray) -> np.ndarray:
    code = cv2.COLOR_GRAY2RGB if image.ndim == 2 else cv2.COLOR_BGR2RGB
    return cv2.cvtColor(image, code)


class OpenCVReader:
    """Reads a webcam through a ``cv2.VideoCapture``-like object."""

    def __init__(self, capture: VideoCaptureLike, read_timeout: float) -> None:
        self._capture = capture
        # One driver buffer: older frames queued in the driver are latency.
        capture.set(cv2.CAP_PROP_BUFFERSIZE, 1)
        # Bound a blocked read (backends without support just return False).
        capture.set(cv2.CAP_PROP_READ_TIMEOUT_MSEC, read_timeout * 1000.0)
        fps = capture.get(cv2.CAP_PROP_FPS)
        self._fps = float(fps) if fps and fps > 0 else None

    @property
    def fps(self) -> float | None:
        return self._fps

    @property
    def decode_errors(self) -> int:
        return 0

    def frames(self) -> Iterator[RawFrame]:
        while True:
            ok, image = self._capture.read()
            if not ok or image is None:
                return  # unplugged or read timeout: the capture stage reconnects
            msec = self._capture.get(cv2.CAP_PROP_POS_MSEC)
            pts = msec / 1000.0 if msec and msec > 0 else None
            yield RawFrame(pts, functools.partial(_bgr_to_rgb, image))

    def close(self) -> None:
        self._capture.release()


def open_webcam(
    spec: SourceSpec,
    read_timeout: float,
    factory: VideoCaptureFactory | None = None,
) -> OpenCVReader:
    """Open a webcam; raises :class:`UserError` if it does not exist or will not open."""
    if factory is None:
        _check_device_exists(spec)
        factory = _v4l2_capture
    capture = factory(spec.target)
    if not capture.isOpened():
        capture.release()
        raise UserError(f"cannot open webcam {spec.target}: device busy or not a camera")
    return OpenCVReader(capture, read_timeout)


def _check_device_exists(spec: SourceSpec) -> None:
    """Fail fast with a clear message instead of OpenCV's warnings (Linux only)."""
    if not sys.platform.startswith("linux"):
        return
    path = spec.target if isinstance(spec.target, str) else f"/dev/video{spec.target}"
    if os.path.exists(path):
        return
    found = sorted(n for n in _listdir("/dev") if n.startswith("video"))
    available = ", ".join("/dev/" + n for n in found) or "none"
    raise UserError(f"webcam {spec.target} not found: {path} does not exist "
                    f"(available: {available})")


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []
