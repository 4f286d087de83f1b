"""Capture stage: one thread per source feeding a bounded frame queue.

::

    cap = open_source("clip.mp4", CaptureConfig())   # or "0", "/dev/video0", "rtsp://..."
    with cap:                                         # start() ... close()
        for frame in cap:                             # Frame: RGB uint8 (H, W, 3)
            ...

Live sources (webcams, network streams) use a small drop-oldest queue, so the
consumer always gets the newest frame and latency never builds up; files use a
blocking queue, so no frame is lost (``realtime=True`` paces a file at its own
frame rate and then treats it as live). A live source that errors or ends (EOF)
reconnects forever with bounded exponential backoff and jitter, unless
``give_up_after`` is set.

Every source has an explicit state machine (:class:`SourceState`): transitions
happen in one place, under a lock, are checked against :data:`TRANSITIONS`, and
each is recorded as a :class:`StatusEvent` (drained with ``status_events()`` or
pushed to an ``on_status`` callback).
"""

from __future__ import annotations

import collections
import logging
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import Enum
from types import TracebackType
from typing import ClassVar

import av
import numpy as np

from streamtrack.errors import UserError
from streamtrack.sources import (
    FrameReader,
    RawFrame,
    SourceKind,
    SourceSpec,
    VideoCaptureFactory,
    describe_error,
    open_pyav,
    open_webcam,
    parse_source,
)

__all__ = [
    "TRANSITIONS",
    "BufferPolicy",
    "Capture",
    "CaptureConfig",
    "CaptureStats",
    "Frame",
    "InvalidTransition",
    "SourceKind",
    "SourceState",
    "StatusEvent",
    "open_source",
]

log = logging.getLogger(__name__)

DROP_QUEUE_FULL = "queue_full"
_MAX_STATUS_EVENTS = 1024


class SourceState(str, Enum):
    """Where a source is in its life."""

    IDLE = "idle"  # created, start() not called yet
    CONNECTING = "connecting"  # opening for the first time
    STREAMING = "streaming"  # frames are arriving
    STALE = "stale"  # connected, but no frame for `stale_after` seconds
    RECONNECTING = "reconnecting"  # lost (error or EOF on a live source), retrying
    STOPPED = "stopped"  # close() called
    ENDED = "ended"  # a file reached its end
    FAILED = "failed"  # unrecoverable error, or gave up reconnecting

    @property
    def terminal(self) -> bool:
        return self in _TERMINAL


_TERMINAL = frozenset({SourceState.STOPPED, SourceState.ENDED, SourceState.FAILED})
_S = SourceState

#: The allowed transitions; anything else is a bug and raises. Terminal states
#: have none: a late transition (e.g. the capture thread noticing a disconnect
#: after close()) is ignored instead.
TRANSITIONS: dict[SourceState, frozenset[SourceState]] = {
    _S.IDLE: frozenset({_S.CONNECTING, _S.STOPPED, _S.FAILED}),
    _S.CONNECTING: frozenset({_S.STREAMING, _S.RECONNECTING, _S.ENDED, _S.STOPPED, _S.FAILED}),
    _S.STREAMING: frozenset({_S.STALE, _S.RECONNECTING, _S.ENDED, _S.STOPPED, _S.FAILED}),
    _S.STALE: frozenset({_S.STREAMING, _S.RECONNECTING, _S.ENDED, _S.STOPPED, _S.FAILED}),
    _S.RECONNECTING: frozenset({_S.STREAMING, _S.STOPPED, _S.FAILED}),
    _S.STOPPED: frozenset(),
    _S.ENDED: frozenset(),
    _S.FAILED: frozenset(),
}


class InvalidTransition(RuntimeError):
    """A state change the state machine does not allow (a bug, not bad input)."""


class BufferPolicy(str, Enum):
    """What the capture thread does when the frame queue is full."""

    BLOCK = "block"  # wait for the consumer: nothing is lost (files)
    DROP_OLDEST = "drop_oldest"  # evict the oldest frame: the newest wins (live)


@dataclass(frozen=True, eq=False)
class Frame:
    """One captured frame, as handed to the consumer."""

    image: np.ndarray  # RGB, uint8, (H, W, 3)
    frame_id: int  # 0, 1, 2, ... per source; never reused (gaps = dropped frames)
    pts: float | None  # stream presentation time in seconds, if the source has one
    capture_time: float  # time.time() when the frame left the decoder
    capture_monotonic: float  # time.monotonic() at the same moment
    source: str  # the source's name

    @property
    def height(self) -> int:
        return int(self.image.shape[0])

    @property
    def width(self) -> int:
        return int(self.image.shape[1])


@dataclass(frozen=True)
class StatusEvent:
    """One state transition of a source."""

    state: SourceState
    previous: SourceState
    time: float  # time.time()
    error: str | None = None  # why, for reconnecting/failed


@dataclass(frozen=True)
class CaptureStats:
    """A snapshot of a source's counters."""

    state: SourceState
    frames_decoded: int
    frames_delivered: int
    dropped: dict[str, int]  # by reason, e.g. {"queue_full": 3}
    reconnects: int  # connections re-established after a loss
    reconnect_attempts: int  # failed connection attempts
    decode_errors: int  # damaged packets skipped
    queued: int  # frames waiting in the queue now
    last_error: str | None


@dataclass
class CaptureConfig:
    """How a source is captured. ``None`` means "chosen by source kind"."""

    queue_depth: int | None = None  # None: 2 for drop-oldest, 8 for blocking
    policy: BufferPolicy | str | None = None  # None: drop-oldest if live or realtime
    realtime: bool = False  # files: pace at native frame rate, then behave as live
    loop: bool = False  # files: start over at the end instead of ending
    reconnect_initial: float = 0.1  # first backoff delay (s)
    reconnect_max: float = 1.0  # backoff cap (s): bounds time to resume once back
    jitter: float = 0.2  # backoff randomised by +/- this fraction
    open_timeout: float = 5.0  # s to open a stream
    read_timeout: float = 5.0  # s without data before a read fails
    stale_after: float | None = 2.0  # live: no frame for this long -> stale
    give_up_after: float | None = None  # live: s of failed reconnecting -> failed
    name: str | None = None  # default: derived from the source
    # The first frame's id: a restarted tracker's live source continues the ids it published.
    first_frame_id: int = 0
    # Local files: the frames before this one are decoded and skipped, neither paced nor
    # numbered, on the first pass (a restarted tracker's paced file goes on where it was,
    # its ids still the frames' numbers).
    skip_frames: int = 0
    # The pts (seconds) of the last frame skipped, if known: the file seeks to it instead
    # of decoding every frame before it (a restart an hour into a recording).
    skip_to_pts: float | None = None

    def __post_init__(self) -> None:
        if self.policy is not None:
            try:
                self.policy = BufferPolicy(self.policy)
            except ValueError:
                choices = ", ".join(p.value for p in BufferPolicy)
                raise UserError(
                    f"unknown buffer policy {self.policy!r} (choose {choices})"
                ) from None
        if self.queue_depth is not None and self.queue_depth < 1:
            raise UserError(f"queue_depth must be >= 1, got {self.queue_depth}")
        for name in ("reconnect_initial", "reconnect_max", "open_timeout", "read_timeout"):
            if getattr(self, name) <= 0:
                raise UserError(f"{name} must be > 0, got {getattr(self, name)}")
        if not 0 <= self.jitter < 1:
            raise UserError(f"jitter must be in [0, 1), got {self.jitter}")
        for name in ("stale_after", "give_up_after"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise UserError(f"{name} must be > 0 or None, got {value}")
        for name in ("first_frame_id", "skip_frames"):
            if getattr(self, name) < 0:
                raise UserError(f"{name} must be >= 0, got {getattr(self, name)}")


# ---------------------------------------------------------------------------
# Frame queue strategies


class PendingFrame:
    """A frame between decoder and consumer; converted to RGB at most once."""

    __slots__ = ("_frame", "_raw", "capture_monotonic", "capture_time", "frame_id", "source")

    def __init__(self, raw: RawFrame, frame_id: int, source: str) -> None:
        self._raw: RawFrame | None = raw
        self._frame: Frame | None = None
        self.frame_id = frame_id
        self.source = source
        self.capture_time = time.time()
        self.capture_monotonic = time.monotonic()

    def frame(self) -> Frame:
        if self._frame is None:
            assert self._raw is not None
            raw, self._raw = self._raw, None  # release the decoded frame
            self._frame = Frame(
                image=raw.convert(),
                frame_id=self.frame_id,
                pts=raw.pts,
                capture_time=self.capture_time,
                capture_monotonic=self.capture_monotonic,
                source=self.source,
            )
        return self._frame


class FrameBuffer:
    """Bounded hand-off from the capture thread to the consumer.

    Subclasses are the named strategies: they decide what ``put`` does when full.
    """

    policy: ClassVar[BufferPolicy]
    def __init__(self, depth: int, on_drop: Callable[[str], None]) -> None:
        self.depth = depth
        self._on_drop = on_drop
        self._items: collections.deque[PendingFrame] = collections.deque()
        self._cond = threading.Condition()
        self._finished = False

    def put(self, item: PendingFrame) -> bool:
        """Queue a frame; False if the buffer was finished (the source is stopping)."""
        if self._convert_on_put():
            item.frame()
        with self._cond:
            if not self._make_room():
                return False
            self._items.append(item)
            self._cond.notify_all()
            return True

    def get(self, timeout: float | None) -> PendingFrame | None:
        """The oldest queued frame; None on timeout, or at once if finished and empty."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not self._items:
                if self._finished:
                    return None
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return None
                self._cond.wait(remaining)
            item = self._take()
            self._cond.notify_all()  # a blocked put may proceed
            return item

    def finish(self) -> None:
        """No more frames will come: wake every waiter. Queued frames stay readable."""
        with self._cond:
            self._finished = True
            self._cond.notify_all()

    def clear(self) -> None:
        with self._cond:
            self._items.clear()
            self._cond.notify_all()

    def __len__(self) -> int:
        with self._cond:
            return len(self._items)

    def _make_room(self) -> bool:
        """Called with the lock held; True once a slot is free."""
        raise NotImplementedError

    def _take(self) -> PendingFrame:
        """Called with the lock held and a frame queued: the one to hand over."""
        return self._items.popleft()

    def _convert_on_put(self) -> bool:
        """Convert to RGB on the capture thread before queueing (overlapping the
        consumer's work) rather than at hand-off.  Only worth it for a frame that will
        be delivered; called without the lock."""
        raise NotImplementedError


class BlockingBuffer(FrameBuffer):
    """Waits for the consumer when full: no frame is ever dropped."""

    policy = BufferPolicy.BLOCK

    def _convert_on_put(self) -> bool:
        return True  # every queued frame is delivered

    def _make_room(self) -> bool:
        while len(self._items) >= self.depth and not self._finished:
            # finish() notifies; the timeout only guards against a lost wake-up.
            self._cond.wait(0.5)
        return not self._finished


class DropOldestBuffer(FrameBuffer):
    """Evicts the oldest frame when full, and hands the consumer the newest frame queued,
    dropping the older ones: a live result is at most one frame interval older than its
    step, where the older of two would add a whole interval to every result."""

    policy = BufferPolicy.DROP_OLDEST

    def _convert_on_put(self) -> bool:
        # An empty queue: this frame is the consumer's next unless newer ones fill the
        # queue first, so convert it here, overlapping the consumer's current step rather than
        # delaying the next.  Frames queued behind it convert at hand-off, so at most
        # one conversion per delivered frame is ever wasted on a drop.
        return not self._items

    def _make_room(self) -> bool:
        if self._finished:
            return False
        self._drop_oldest(keep=self.depth - 1)
        return True

    def _take(self) -> PendingFrame:
        # The frame dropped here may be the one converted on put: a newer frame converts at
        # hand-off instead (~2 ms at 720p), far less than the interval it is fresher by.
        self._drop_oldest(keep=1)
        return self._items.popleft()

    def _drop_oldest(self, keep: int) -> None:
        while len(self._items) > keep:
            self._items.popleft()  # never converted (but perhaps the one converted on put)
            self._on_drop(DROP_QUEUE_FULL)


BUFFERS: dict[BufferPolicy, type[FrameBuffer]] = {
    BufferPolicy.BLOCK: BlockingBuffer,
    BufferPolicy.DROP_OLDEST: DropOldestBuffer,
}


# ---------------------------------------------------------------------------
# Helpers for the capture thread


class _Backoff:
    """Exponential backoff with jitter, capped at ``maximum`` (jitter included)."""

    def __init__(self, initial: float, maximum: float, jitter: float) -> None:
        self.initial, self.maximum, self.jitter = initial, maximum, jitter
        self.attempt = 0

    def next_delay(self) -> float:
        base = min(self.maximum, self.initial * 2.0**self.attempt)
        self.attempt = min(self.attempt + 1, 32)  # keep 2**attempt a sane float
        spread = random.uniform(1.0 - self.jitter, 1.0 + self.jitter)
        return min(self.maximum, base * spread)

    def reset(self) -> None:
        self.attempt = 0


class _Pacer:
    """Sleeps so frames come out at the stream's own rate (``realtime`` files).

    The clock starts when ``play`` is set (the consumer's first read), as a player starts
    on "play": a file played out while the model loads would lose its first seconds, and
    the prompts meant for its first frame would land on a later one."""

    def __init__(self, fps: float | None, stop: threading.Event,
                 play: threading.Event | None = None) -> None:
        self._interval = 1.0 / fps if fps else 1.0 / 30.0
        self._stop = stop
        self._play = play
        self.restart(time.monotonic())

    def restart(self, start: float) -> None:
        self._start = start
        self._first_pts: float | None = None
        self._count = 0

    def restart_after_last(self) -> None:
        """Looping: the next pass starts one frame interval after the last frame."""
        self.restart(time.monotonic() + self._interval)

    def wait(self, pts: float | None) -> None:
        if self._play is not None:
            while not self._play.wait(0.1):
                if self._stop.is_set():
                    return
            self._play = None
            self.restart(time.monotonic())
        if self._count == 0:
            self._first_pts = pts
        if pts is not None and self._first_pts is not None:
            offset = pts - self._first_pts
        else:
            offset = self._count * self._interval
        self._count += 1
        delay = self._start + offset - time.monotonic()
        if delay > 0:
            self._stop.wait(delay)


# ---------------------------------------------------------------------------
# The source


StatusCallback = Callable[[StatusEvent], None]


def _reason_kind(error: str | None) -> str | None:
    """What kind of failure ``error`` is ("HTTPUnauthorizedError" of "HTTPUnauthorizedError:
    … 401 …"): attempts that fail alike differ only in details worth no new line."""
    return None if error is None else error.split(":", 1)[0]


class Capture:
    """A source read by its own thread into a bounded queue. Use :func:`open_source`."""

    def __init__(
        self,
        spec: SourceSpec,
        config: CaptureConfig | None = None,
        *,
        on_status: StatusCallback | None = None,
        webcam_factory: VideoCaptureFactory | None = None,
    ) -> None:
        self.spec = spec
        self.config = config or CaptureConfig()
        self.name = self.config.name or spec.name
        self.live = spec.kind.live or self.config.realtime
        self.policy = self._resolve_policy()
        depth = self.config.queue_depth or (2 if self.policy is BufferPolicy.DROP_OLDEST else 8)
        self._buffer = BUFFERS[self.policy](depth, self._count_drop)
        self._on_status = on_status
        self._webcam_factory = webcam_factory

        self._lock = threading.Lock()  # state and counters
        # Held across a transition and its callback, so callbacks arrive in order.
        # Re-entrant: a callback that calls close() must not deadlock its thread.
        self._emit_lock = threading.RLock()
        self._state = SourceState.IDLE
        self._events: collections.deque[StatusEvent] = collections.deque(
            maxlen=_MAX_STATUS_EVENTS
        )
        self._last_error: str | None = None
        self._outage_reasons: set[str | None] = set()  # kinds of failure reported in this outage
        self._next_id = self.config.first_frame_id
        self._decoded = 0
        self._delivered = 0
        self._dropped: dict[str, int] = {DROP_QUEUE_FULL: 0}
        self._reconnects = 0
        self._attempts = 0
        self._decode_errors_done = 0  # from readers already closed
        self._reader: FrameReader | None = None
        self._last_frame_at = time.monotonic()
        # A paced file's first frame, waiting for the first read: no frame comes, and none
        # is late (a file at a URL played with --realtime while the model loads).
        self._held_for_play = False

        self._stop = threading.Event()
        self._read_once = threading.Event()  # a paced file's clock starts at the first read
        self._threads: list[threading.Thread] = []

    def _resolve_policy(self) -> BufferPolicy:
        if self.config.policy is not None:
            return BufferPolicy(self.config.policy)
        return BufferPolicy.DROP_OLDEST if self.live else BufferPolicy.BLOCK

    # -- consumer API -------------------------------------------------------

    @property
    def state(self) -> SourceState:
        with self._lock:
            return self._state

    @property
    def kind(self) -> SourceKind:
        return self.spec.kind

    def start(self) -> Capture:
        """Open the source and start the capture thread.

        Files and webcams are opened here, so bad input raises :class:`UserError`
        at once; network streams connect (and retry) on the capture thread.
        """
        if self._transition(SourceState.CONNECTING, only_from=SourceState.IDLE) is None:
            raise RuntimeError(f"{self.name}: start() on a source that is {self.state.value}")
        reader: FrameReader | None = None
        if self.spec.kind is not SourceKind.NETWORK:
            try:
                reader = self._open_reader()
            except Exception as exc:  # UserError for bad input; anything else is a bug
                self._transition(SourceState.FAILED, describe_error(exc, self.spec))
                raise
        self._spawn(self._run, reader)
        if self.spec.kind.live and self.config.stale_after is not None:
            self._spawn(self._watch_stale)
        return self

    def read(self, timeout: float | None = 1.0) -> Frame | None:
        """The next frame, waiting up to ``timeout`` seconds (None: until one comes
        or the source is over). None on timeout or once the source is over."""
        if self.state is SourceState.IDLE:
            raise RuntimeError("read() before start(): call start() or use 'with'")
        self._read_once.set()
        item = self._buffer.get(timeout)
        if item is None:
            return None
        frame = item.frame()  # drop-oldest queues convert here, on hand-off
        with self._lock:
            self._delivered += 1
        return frame

    def __iter__(self) -> Iterator[Frame]:
        """Frames until the source is over (ended, failed or stopped)."""
        while True:
            frame = self.read(timeout=0.5)
            if frame is not None:
                yield frame
            elif self.state.terminal and not len(self._buffer):
                return

    def status_events(self) -> list[StatusEvent]:
        """The state transitions since the last call (oldest first)."""
        with self._lock:
            events = list(self._events)
            self._events.clear()
        return events

    def stats(self) -> CaptureStats:
        queued = len(self._buffer)  # outside self._lock: the buffer takes it on drops
        with self._lock:
            reader_errors = self._reader.decode_errors if self._reader else 0
            return CaptureStats(
                state=self._state,
                frames_decoded=self._decoded,
                frames_delivered=self._delivered,
                dropped=dict(self._dropped),
                reconnects=self._reconnects,
                reconnect_attempts=self._attempts,
                decode_errors=self._decode_errors_done + reader_errors,
                queued=queued,
                last_error=self._last_error,
            )

    @property
    def last_error(self) -> str | None:
        with self._lock:
            return self._last_error

    def close(self, timeout: float | None = None) -> None:
        """Stop capturing: join the threads, close the source, drop queued frames.

        A blocked network read ends within ``read_timeout``; ``timeout`` bounds the
        wait (default: long enough for an open plus a read).
        """
        self._transition(SourceState.STOPPED)
        self._stop.set()
        self._buffer.finish()
        if timeout is None:
            timeout = self.config.open_timeout + self.config.read_timeout + 1.0
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(max(0.0, deadline - time.monotonic()))
                if thread.is_alive():
                    log.warning("%s: capture thread did not stop within %.1fs",
                                self.name, timeout)
        self._buffer.clear()

    def __enter__(self) -> Capture:
        if self.state is SourceState.IDLE:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Capture({self.name!r}, {self.spec.kind.value}, {self.state.value})"

    # -- state machine ------------------------------------------------------

    def _transition(
        self,
        new: SourceState,
        error: str | None = None,
        *,
        only_from: SourceState | None = None,
    ) -> SourceState | None:
        """The one place the state changes; returns the previous state, or None if
        nothing changed (same state, source already over, or not in ``only_from``).
        Raises :class:`InvalidTransition` on a change the table forbids.

        One exception to "same state, nothing to say": an outage whose attempts start
        failing for another reason (the camera back, but refusing the password now) is
        reported again, once per kind of reason in that outage."""
        # The emit lock spans the change and the callback, so callbacks see the
        # transitions in the order they happened, whichever thread made them.
        with self._emit_lock:
            with self._lock:
                old = self._state
                if error is not None:
                    self._last_error = error
                if old.terminal or (only_from is not None and old is not only_from):
                    return None
                if new is old:
                    kind = _reason_kind(error)
                    if new is not SourceState.RECONNECTING or kind is None or kind in self._outage_reasons:
                        return None
                    self._outage_reasons.add(kind)
                elif new not in TRANSITIONS[old]:
                    raise InvalidTransition(f"{self.name}: {old.value} -> {new.value}")
                else:
                    self._state = new
                    self._outage_reasons = {_reason_kind(error)} if new is SourceState.RECONNECTING else set()
                event = StatusEvent(new, old, time.time(), error)
                self._events.append(event)
            if new.terminal:
                self._buffer.finish()  # wake a consumer waiting in read()
            log.debug("%s: %s -> %s%s", self.name, old.value, new.value,
                      f" ({error})" if error else "")
            if self._on_status is not None:
                try:
                    self._on_status(event)
                except Exception:  # a consumer's bug must not kill capture
                    log.exception("%s: status callback failed", self.name)
        return old

    # -- capture thread -----------------------------------------------------

    def _spawn(self, target: Callable[..., None], *args: object) -> None:
        thread = threading.Thread(
            target=target, args=args, name=f"capture-{self.name}-{target.__name__}", daemon=True
        )
        self._threads.append(thread)
        thread.start()

    def _open_reader(self) -> FrameReader:
        if self.spec.kind is SourceKind.WEBCAM:
            return open_webcam(self.spec, self.config.read_timeout, self._webcam_factory)
        return open_pyav(self.spec, self.config.open_timeout, self.config.read_timeout)

    def _run(self, reader: FrameReader | None) -> None:
        try:
            if self.spec.kind.live:
                self._run_live(reader)
            else:
                assert reader is not None
                self._run_file(reader)
        except Exception as exc:  # never die silently: the consumer sees `failed`
            # The input's fault, said in one line (a looping file deleted between passes
            # is a UserError from its reopening).
            if isinstance(exc, (av.FFmpegError, OSError, UserError)):
                log.warning("%s: capture failed: %s", self.name, describe_error(exc, self.spec))
            else:
                log.exception("%s: capture failed", self.name)
            self._transition(SourceState.FAILED, describe_error(exc, self.spec))
        finally:
            self._release_reader()

    def _run_file(self, reader: FrameReader) -> None:
        pacer = _Pacer(reader.fps, self._stop, self._read_once) if self.config.realtime else None
        skip = self.config.skip_frames
        frames = None
        if skip and self.config.skip_to_pts is not None:
            frames, reader = self._seek_past(reader, skip, self.config.skip_to_pts)
            skip = 0 if frames is not None else skip
        while True:
            self._set_reader(reader)
            before = self._decoded
            if not self._pump(reader, pacer, skip, frames):
                return  # stopping
            skip, frames = 0, None
            # An empty pass would loop forever without producing anything.
            if not self.config.loop or self._decoded == before or self._stop.is_set():
                break
            self._release_reader()
            reader = self._open_reader()
            if pacer is not None:
                pacer.restart_after_last()
        if self._decoded == 0:
            self._transition(SourceState.FAILED, f"no decodable video frame in {self.spec.display}")
        else:
            self._transition(SourceState.ENDED)

    def _seek_past(self, reader: FrameReader, skip: int,
                   pts: float) -> tuple[Iterator[RawFrame] | None, FrameReader]:
        """The frames after the first ``skip``, the last of which is at ``pts``, by seeking
        (counted as decoded, as skipped frames are), and the reader to read them from;
        (None, a reader at the start) where the file cannot seek to that frame."""
        if getattr(reader, "seeks_by_pts", False):
            frames = reader.frames_after(pts)
            if frames is not None:
                with self._lock:
                    self._decoded += skip
                return frames, reader
            log.warning("%s: cannot seek to frame %d (pts %.3f s) of the file; decoding every frame up "
                        "to it", self.name, skip, pts)
        else:  # MPEG-TS, FLV: a pts may name two frames
            log.info("%s: decoding the file's first %d frames to go on after them", self.name, skip)
        self._close(reader)  # not released: its decode errors were the seek's, not the file's
        return None, self._open_reader()

    def _run_live(self, reader: FrameReader | None) -> None:
        backoff = _Backoff(self.config.reconnect_initial, self.config.reconnect_max,
                           self.config.jitter)
        outage_since: float | None = None  # monotonic start of the current outage
        while not self._stop.is_set():
            if reader is None:
                try:
                    reader = self._open_reader()
                except Exception as exc:
                    error = describe_error(exc, self.spec)
                    self._count_attempt()
                    if self._decoded == 0 and isinstance(exc, _WRONG_ADDRESS):
                        # Never streamed and the server says the address is wrong (a typo,
                        # bad credentials): retrying would only hide it.  A source that has
                        # streamed keeps retrying whatever it gets (a camera rebooting).
                        self._transition(SourceState.FAILED, error)
                        return
                    outage_since = outage_since or time.monotonic()
                    if not self._wait_to_retry(error, outage_since, backoff.next_delay()):
                        return
                    continue
            self._set_reader(reader)
            delivered, error = self._pump_live(reader)
            ends = error is None and delivered and getattr(reader, "ends_at_eof", False)
            self._release_reader()
            reader = None
            if self._stop.is_set():
                return
            if ends:  # a file at a URL, not a camera: its end is the end
                self._transition(SourceState.ENDED)
                return
            if delivered:
                outage_since = time.monotonic()
                backoff.reset()
            else:
                self._count_attempt()  # connected, but nothing came: a failed attempt
                outage_since = outage_since or time.monotonic()
            # A live source does not end: EOF is the server or camera going away.
            error = error or "end of stream (disconnected)"
            if not self._wait_to_retry(error, outage_since, backoff.next_delay()):
                return

    def _wait_to_retry(self, error: str, outage_since: float, delay: float) -> bool:
        """Report the outage and sleep before the next attempt; False to stop."""
        limit = self.config.give_up_after
        if limit is not None:
            remaining = outage_since + limit - time.monotonic()
            if remaining <= 0:
                self._transition(
                    SourceState.FAILED, f"gave up after {limit:g}s reconnecting: {error}"
                )
                return False
            delay = min(delay, remaining)
        self._transition(SourceState.RECONNECTING, error)
        return not self._stop.wait(delay)

    def _pump_live(self, reader: FrameReader) -> tuple[int, str | None]:
        """Stream from an open live reader until it ends or fails.

        Returns the frames decoded and the error that ended it (None for EOF)."""
        start = self._decoded
        error = None
        # A file at a URL, with --realtime: at its own pace, as a player shows it.
        paced = self.config.realtime and getattr(reader, "ends_at_eof", False)
        try:
            self._pump(reader, _Pacer(reader.fps, self._stop, self._read_once) if paced else None)
        except Exception as exc:
            error = describe_error(exc, self.spec)
        return self._decoded - start, error

    def _pump(self, reader: FrameReader, pacer: _Pacer | None, skip: int = 0,
              frames: Iterator[RawFrame] | None = None) -> bool:
        """Move frames from reader (or ``frames``, read from it) to queue, after the first
        ``skip``; False if stopped, True at end of stream."""
        first = True
        for raw in frames if frames is not None else reader.frames():
            if self._stop.is_set():
                return False
            if skip:
                skip -= 1
                with self._lock:
                    self._decoded += 1  # decoded all the same: a file is not cut short
                continue
            if pacer is not None:
                if first:  # streaming while its first frame waits to be played (the first read)
                    with self._lock:
                        self._held_for_play = True
                    self._on_frame_flowing(new_connection=True)
                    first = False
                pacer.wait(raw.pts)
                if self._stop.is_set():
                    return False
            with self._lock:
                frame_id = self._next_id
                self._next_id += 1
                self._decoded += 1
                self._last_frame_at = time.monotonic()
                self._held_for_play = False
                flowing = self._state is SourceState.STREAMING
            if first or not flowing:
                self._on_frame_flowing(new_connection=first)
                first = False
            if not self._buffer.put(PendingFrame(raw, frame_id, self.name)):
                return False
        return True

    def _on_frame_flowing(self, new_connection: bool) -> None:
        previous = self._transition(SourceState.STREAMING)
        if new_connection and previous is SourceState.RECONNECTING:
            with self._lock:
                self._reconnects += 1

    def _set_reader(self, reader: FrameReader) -> None:
        with self._lock:
            self._reader = reader

    def _count_attempt(self) -> None:
        with self._lock:
            self._attempts += 1

    def _release_reader(self) -> None:
        with self._lock:
            reader, self._reader = self._reader, None
            if reader is not None:
                self._decode_errors_done += reader.decode_errors
        if reader is not None:
            self._close(reader)

    def _close(self, reader: FrameReader) -> None:
        try:
            reader.close()
        except Exception:  # closing a broken stream may fail; it is gone anyway
            log.debug("%s: error closing source", self.name, exc_info=True)

    def _count_drop(self, reason: str) -> None:
        with self._lock:
            self._dropped[reason] = self._dropped.get(reason, 0) + 1

    def _watch_stale(self) -> None:
        """Marks a connected live source `stale` when frames stop coming."""
        stale_after = self.config.stale_after
        assert stale_after is not None
        interval = min(0.25, stale_after / 4)
        while not self._stop.wait(interval):
            with self._lock:
                state, idle = self._state, time.monotonic() - self._last_frame_at
                held = self._held_for_play
            if state.terminal:
                return
            if state is SourceState.STREAMING and idle >= stale_after and not held:
                self._transition(SourceState.STALE, only_from=SourceState.STREAMING)


# Answers that say the address itself is wrong rather than the server being away.
_WRONG_ADDRESS = (av.HTTPBadRequestError, av.HTTPUnauthorizedError, av.HTTPForbiddenError,
                  av.HTTPNotFoundError, av.ProtocolNotFoundError)


def open_source(
    source: str | int,
    config: CaptureConfig | None = None,
    *,
    on_status: StatusCallback | None = None,
    webcam_factory: VideoCaptureFactory | None = None,
    decode: str = "thread",
) -> Capture:
    """A capture for ``source`` (not started): a file path, webcam index (``0``),
    device path (``/dev/video0``) or URL (``rtsp://``, ``http(s)://``, ...).

    Raises :class:`UserError` for a source that cannot be one (unknown scheme,
    missing file). ``webcam_factory`` replaces ``cv2.VideoCapture`` (tests, other
    backends): it gets the index or path and returns a VideoCapture-like object.
    ``decode="process"`` decodes in a child process (see capture_process.py).
    """
    from streamtrack.capture_process import ProcessCapture, check_decode_mode

    check_decode_mode(decode)
    spec = parse_source(source)
    if decode == "process":
        if webcam_factory is not None:
            raise ValueError("webcam_factory needs decode='thread' (it cannot cross processes)")
        return ProcessCapture(spec, config, on_status=on_status)
    return Capture(spec, config, on_status=on_status, webcam_factory=webcam_factory)
