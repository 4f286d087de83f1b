"""ZeroMQ PUB side: one message per processed frame, plus status, stats and frames.

The tracker must never wait for a subscriber, so every send is non-blocking with a
small high-water mark: a subscriber that falls behind loses messages inside
ZeroMQ (and sees the gap in ``seq``), the tracker never notices.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import math
import os
import socket
import stat
import threading
from collections import deque
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import zmq

from streamtrack.errors import UserError
from streamtrack.protocol import (
    FrameHeader,
    FrameResult,
    Latency,
    Stats,
    StatusEvent,
    frames_topic,
    masks_topic,
    normalize_endpoint,
    now,
    stats_topic,
    status_topic,
    system_port,
    validate_stream,
)

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from streamtrack.curve import CurveServer

DEFAULT_PUBLISH_ENDPOINT = "tcp://127.0.0.1:5555"
DEFAULT_SNDHWM = 16  # messages per subscriber; a few frames of slack, then drop
# What a subscriber may send: its subscriptions, topic prefixes of at most ~140 bytes.
# ZeroMQ keeps each in the publisher's memory at ~50 bytes per byte received, so one
# megabyte-long subscription would cost the tracker tens of megabytes; its connection
# is dropped instead.
MAX_SUBSCRIPTION_BYTES = 1024
# How long a closing publisher lets its last messages (a run's last result, the "stopped"
# event) reach the subscribers: what ZeroMQ has not written to them by the time the process
# exits is lost.  A stalled or dead subscriber holds the end of a run up this long at most.
CLOSE_FLUSH_MS = 1000


def bind_socket(sock: zmq.Socket, endpoint: str | int, what: str) -> str:
    """Bind ``sock`` and return the endpoint actually bound (port resolved).

    ZeroMQ errors become :class:`UserError` with a message a CLI can print as is.
    """
    ep = normalize_endpoint(endpoint)
    _allow_ipv6(sock, ep)
    _refuse_ipc_over_a_file(ep, what)
    try:
        sock.bind(ep)
    except zmq.ZMQError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise UserError(
                f"cannot bind {what} endpoint {ep}: address already in use "
                "(is another streamtrack running? choose another port)"
            ) from exc
        raise UserError(f"cannot bind {what} endpoint {ep}: {exc}") from exc
    last = sock.getsockopt(zmq.LAST_ENDPOINT)
    return last.decode() if isinstance(last, bytes) and last else ep


def _ipc_path(endpoint: str) -> str | None:
    """The file of an ``ipc://PATH`` endpoint; None for other endpoints (and the abstract
    ``ipc://@name``, which has no file)."""
    path = endpoint.removeprefix("ipc://")
    return None if path == endpoint or path.startswith("@") else path


def _refuse_ipc_over_a_file(endpoint: str, what: str) -> None:
    """libzmq deletes whatever is at an ``ipc://`` path before it binds there (and the
    socket file is removed on close): a mistyped path, or one sent by a fleet control
    client, would delete a file."""
    path = _ipc_path(endpoint)
    if path is None:
        return
    try:
        mode = os.lstat(path).st_mode
    except OSError:
        return  # nothing there (or not reachable: the bind says so)
    if not stat.S_ISSOCK(mode):
        kind = "a directory" if stat.S_ISDIR(mode) else "a file"
        raise UserError(f"cannot bind {what} endpoint {endpoint}: {path} is {kind}, which binding would "
                        "delete; give a path where nothing is, or that of an old socket")


def _owned_ipc_file(endpoint: str) -> tuple[str, int] | None:
    """The socket file a bind to ``ipc://PATH`` just made, with its inode; None for other
    endpoints."""
    path = _ipc_path(endpoint)
    if path is None:
        return None
    try:
        return path, os.stat(path).st_ino
    except OSError:
        return None


def _remove_ipc_file(owned: tuple[str, int] | None) -> None:
    """libzmq leaves an ``ipc://`` socket file behind when the socket closes.  Remove it,
    unless another process has bound the same path since (a new file, a new inode): that
    one is theirs."""
    if owned is None:
        return
    path, inode = owned
    try:
        if os.stat(path).st_ino == inode:
            os.unlink(path)
    except OSError:
        pass


class ServerBinding:
    """A server socket (the publisher's PUB, the control ROUTER) bound to its endpoint,
    with what closing it must undo: the CURVE authenticator lease and an ``ipc://``
    socket file.  A bind that fails closes the socket and leaves nothing behind."""

    def __init__(self, sock: zmq.Socket, endpoint: str | int, what: str,
                 curve: CurveServer | None, context: zmq.Context) -> None:
        self._sock = sock
        self._auth = None  # CURVE authenticator lease (optional encryption + client keys)
        try:
            if curve is not None:
                from streamtrack.curve import secure_server

                self._auth = secure_server(sock, curve, context)
            self.endpoint = bind_socket(sock, endpoint, what)
            self._ipc_file = _owned_ipc_file(self.endpoint)
        except BaseException:
            sock.close(linger=0)
            if self._auth is not None:
                self._auth.close()
            raise

    def close(self, linger_ms: int = 0) -> None:
        """``linger_ms``: how long the messages still queued may take to go out; they go
        while the socket's context is terminated (by its owner)."""
        if not self._sock.closed:
            self._sock.close(linger=linger_ms)
            _remove_ipc_file(self._ipc_file)
        if self._auth is not None:
            self._auth.close()


def _allow_ipv6(sock: zmq.Socket, endpoint: str) -> None:
    """ZeroMQ sockets are IPv4-only until told otherwise: ``tcp://[::1]:5555`` would fail
    to bind ("No such device") and connect to nothing, in silence."""
    if endpoint.startswith("tcp://["):
        sock.setsockopt(zmq.IPV6, 1)


def connect_socket(sock: zmq.Socket, endpoint: str | int, what: str) -> str:
    """Connect ``sock`` (asynchronous in ZeroMQ: the peer may come up later)."""
    ep = normalize_endpoint(endpoint)
    if system_port(ep):
        raise UserError(f"cannot connect {what} to {endpoint!r}: port 0 (any free port) is for "
                        "binding; give the port the other side bound")
    _allow_ipv6(sock, ep)
    try:
        sock.connect(ep)
    except zmq.ZMQError as exc:
        raise UserError(f"cannot connect {what} to {ep}: {exc}") from exc
    return ep


def warn_unreachable(endpoints: list[str], what: str) -> None:
    """Log a warning for each connected endpoint that cannot work as given: a host name
    that does not resolve, an ipc:// path in a folder that does not exist.  ZeroMQ would
    retry them silently forever; the warning says why nothing arrives (a host that
    appears later still connects)."""
    for ep in endpoints:
        scheme, _, rest = ep.partition("://")
        if scheme == "tcp":
            host, _, port = rest.rpartition(":")
            host = host.strip("[]")
            try:
                ipaddress.ip_address(host)
                continue
            except ValueError:
                pass
            try:
                socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            except (OSError, UnicodeError) as exc:
                reason = getattr(exc, "strerror", None) or exc
                log.warning("%s: host %r of %s does not resolve (%s); still trying", what, host, ep, reason)
        elif scheme == "ipc" and not Path(rest).parent.is_dir():
            log.warning("%s: %s is in a folder that does not exist; still trying", what, ep)


def status_event(stream: str, event: StatusEvent | str, data: Mapping[str, Any] | None,
                 fields: Mapping[str, Any], clock: Callable[[], float]) -> StatusEvent:
    """``event`` itself, or a new event of kind ``event`` with ``data`` and ``fields``."""
    if isinstance(event, StatusEvent):
        return event
    return StatusEvent(stream=stream, kind=event, time=clock(), data={**(data or {}), **fields})


class Publisher:
    """Publishes results on ``masks/<stream>``, events on ``status/<stream>``,
    stats on ``stats/<stream>`` and (optionally) JPEG frames on ``frames/<stream>``.

    Thread-safe: the capture thread may publish status events while the engine loop
    publishes results (a ZeroMQ socket itself must not be shared, hence the lock).
    """

    def __init__(
        self,
        endpoint: str | int = DEFAULT_PUBLISH_ENDPOINT,
        stream: str = "cam0",
        *,
        sndhwm: int = DEFAULT_SNDHWM,
        context: zmq.Context | None = None,
        clock: Callable[[], float] = now,
        curve: CurveServer | None = None,
    ) -> None:
        self.stream = validate_stream(stream)
        self._clock = clock
        self._lock = threading.Lock()
        # A context of its own, which close() terminates: terminating is what waits for
        # the queued messages to go out (bounded by CLOSE_FLUSH_MS).  It costs an I/O
        # thread and a few descriptors per publisher; with CURVE, an authenticator too.
        self._own_context = zmq.Context() if context is None else None
        ctx = context or self._own_context
        try:
            self._sock = ctx.socket(zmq.PUB)
            try:
                self._sock.setsockopt(zmq.SNDHWM, sndhwm)
                self._sock.setsockopt(zmq.LINGER, 0)
                self._sock.setsockopt(zmq.MAXMSGSIZE, MAX_SUBSCRIPTION_BYTES)
            except BaseException:
                self._sock.close(linger=0)
                raise
            self._binding = ServerBinding(self._sock, endpoint, "publish", curve, ctx)
        except BaseException:
            self._term_own_context()
            raise
        self.endpoint = self._binding.endpoint
        self.sent = 0
        self.send_failures = 0  # sends refused by ZeroMQ (should be ~0 for PUB)

    # ---------------------------------------------------------------- plumbing
    def _send(self, parts: list[bytes]) -> bool:
        with self._lock:
            if self._sock.closed:
                raise UserError("publisher is closed")
            try:
                self._sock.send_multipart(parts, flags=zmq.NOBLOCK)
            except zmq.Again:
                # PUB normally drops silently at the HWM; Again only shows up on some
                # transports. Either way the tracker must not wait: count and move on.
                self.send_failures += 1
                return False
            self.sent += 1
            return True

    # ------------------------------------------------------------------ public
    def publish_result(self, result: FrameResult) -> FrameResult:
        """Send one frame's result; returns it with ``t.publish`` filled in.

        The returned object is what went on the wire, so a JSONL writer can record
        exactly the same thing.
        """
        stamped = result.with_timestamps(publish=self._clock())
        self._send([masks_topic(stamped.stream).encode(), stamped.to_json().encode()])
        return stamped

    def publish_status(
        self, event: StatusEvent | str, data: Mapping[str, Any] | None = None, **fields: Any
    ) -> StatusEvent:
        """Send a status event: a ready :class:`StatusEvent`, or a kind plus its fields.

        ``publish_status("source_state", old="connecting", new="streaming")``.
        """
        event = status_event(self.stream, event, data, fields, self._clock)
        self._send([status_topic(event.stream).encode(), event.to_json().encode()])
        return event

    def publish_stats(self, stats: Stats) -> None:
        self._send([stats_topic(stats.stream).encode(), stats.to_json().encode()])

    def publish_frame(self, frame_id: int, rgb: np.ndarray, *, quality: int = 80) -> bool:
        """Send an RGB uint8 frame as JPEG on ``frames/<stream>`` (for remote viewers)."""
        import cv2  # only needed by this optional feature

        img = np.asarray(rgb)
        if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
            raise UserError(f"publish_frame needs an HxWx3 uint8 RGB array, got "
                            f"{img.dtype} {img.shape}")
        ok, jpeg = cv2.imencode(
            ".jpg", np.ascontiguousarray(img[..., ::-1]), [cv2.IMWRITE_JPEG_QUALITY, quality]
        )
        if not ok:
            raise UserError("JPEG encoding failed")
        header = FrameHeader(
            stream=self.stream, frame_id=frame_id, width=img.shape[1], height=img.shape[0],
            time=self._clock(),
        )
        return self._send([frames_topic(self.stream).encode(), header.to_json().encode(),
                           jpeg.tobytes()])

    def close(self) -> None:
        """Close the socket; with a context of its own, wait (up to CLOSE_FLUSH_MS) for the
        messages queued to reach the subscribers connected."""
        with self._lock:  # never while another thread sends
            self._binding.close(CLOSE_FLUSH_MS if self._own_context is not None else 0)
        self._term_own_context()

    def _term_own_context(self) -> None:
        with self._lock:  # once: a second close() must not wait on a context being terminated
            ctx, self._own_context = self._own_context, None
        if ctx is not None:
            ctx.term()

    def __enter__(self) -> Publisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class StatsWindow:
    """Sliding window over the last ``size`` frames: per-stage latency p50/p95 and fps.

    Stages derived from a result's timestamps: ``queue`` (capture→dequeue),
    ``infer`` (infer_start→infer_end) and ``total`` (capture→publish, or
    capture→infer_end before publishing). Other stages can be fed with
    :meth:`add_sample`.
    """

    STALLED = 2.0  # seconds without a frame: fps 0, not a rate decaying over the window

    def __init__(self, size: int = 120, stream: str = "cam0") -> None:
        if size < 2:
            raise ValueError("StatsWindow size must be >= 2")
        self.size = size
        self.stream = validate_stream(stream)
        self.frames = 0
        self._done: deque[float] = deque(maxlen=size)
        self._stages: dict[str, deque[float]] = {}

    def add_sample(self, stage: str, seconds: float) -> None:
        self._stages.setdefault(stage, deque(maxlen=self.size)).append(float(seconds))

    def add(self, result: FrameResult, at: float | None = None) -> None:
        """Record one processed frame; ``at`` is its completion time (default: from ``t``)."""
        t = result.t
        if t.capture is not None and t.dequeue is not None:
            self.add_sample("queue", t.dequeue - t.capture)
        if t.infer_start is not None and t.infer_end is not None:
            self.add_sample("infer", t.infer_end - t.infer_start)
        end = t.publish if t.publish is not None else t.infer_end
        if t.capture is not None and end is not None:
            self.add_sample("total", end - t.capture)
        done = at if at is not None else end if end is not None else now()
        self._done.append(done)
        self.frames += 1

    def fps(self, at: float | None = None) -> float:
        """Frames per second over the window; with ``at`` (a time), up to then, so the rate
        falls while frames stop coming, and is 0 once none came for ``STALLED`` seconds
        (or two of the last intervals, for a tracker slower than that).  Once frames come
        again, the rate is theirs: a stop (a pause, an outage) in the window is left out."""
        done = self._since_last_stop()
        if len(done) < 2:
            return 0.0
        if at is not None and self._stopped(done[-2], done[-1], at):
            return 0.0
        span = max(done[-1], at if at is not None else -math.inf) - done[0]
        return (len(done) - 1) / span if span > 0 else 0.0

    def _stopped(self, before: float, last: float, now_: float) -> bool:
        return now_ - last > max(self.STALLED, 2 * (last - before))

    def _since_last_stop(self) -> list[float]:
        done = list(self._done)
        start = 0
        for i in range(1, len(done)):
            if self._stopped(done[i - 2] if i >= 2 else done[i - 1], done[i - 1], done[i]):
                start = i
        return done[start:]

    def latency(self) -> dict[str, Latency]:
        out = {}
        for stage, samples in self._stages.items():
            if samples:
                p50, p95 = np.percentile(np.fromiter(samples, dtype=float), [50, 95])
                out[stage] = Latency(p50=float(p50), p95=float(p95))
        return out

    def snapshot(
        self,
        *,
        dropped: Mapping[str, int] | None = None,
        memory_bytes: int | None = None,
        time: float | None = None,
        at: float | None = None,
        source_state: str | None = None,
        source_error: str | None = None,
        paused: bool | None = None,
        waiting_for_prompt: bool | None = None,
    ) -> Stats:
        """A :class:`Stats` message for ``publish_stats``; ``at``: see :meth:`fps`."""
        return Stats(
            stream=self.stream,
            time=now() if time is None else time,
            fps=self.fps(at),
            source_state=source_state,
            source_error=source_error,
            paused=paused,
            waiting_for_prompt=waiting_for_prompt,
            latency=self.latency(),
            dropped=dict(dropped or {}),
            memory_bytes=memory_bytes,
            frames=self.frames,
        )
