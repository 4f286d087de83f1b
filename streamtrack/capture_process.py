"""Capture in a child process (``decode: process``): decode and RGB conversion off
the tracker's interpreter.

On a GPU the engine's step is mostly Python launching kernels, so every other Python
thread in the tracker's process -- the capture thread's demuxing, decoding and
conversion among them -- delays its next launch while it holds the interpreter lock.
:class:`ProcessCapture` runs the same :class:`~streamtrack.capture.Capture` (queue
policy, reconnects, pacing, state machine) in ``python -m
streamtrack.capture_process`` and hands its frames over ZeroMQ on ipc, one message
per frame, received by libzmq's own thread without the interpreter lock.  The tracker's
process runs no capture thread at all: it takes frames and status events on its own
thread, in :meth:`ProcessCapture.read`.

* Live sources (drop-oldest): the frame socket keeps only the newest frame
  (``ZMQ_CONFLATE``), so the consumer always gets the newest one; frames it never saw
  count as dropped (``queue_full``), from the gaps in frame ids.
* Files (blocking): a high-water mark of one frame holds the child back while the
  consumer is busy, so nothing is lost and memory stays bounded.

Status events travel on a second socket.  Each frame says how many events preceded it,
and the source's last event (ended, failed) waits until the consumer has the last
frame, so the consumer sees them in the order the child did.

The cost: each frame is copied once more in the child and once through the socket
(~1 ms for 1280x720 on the 2-core VM; figures in docs/benchmarks.md).
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import asdict

import numpy as np
import zmq

from streamtrack import childproc
from streamtrack.capture import (
    BufferPolicy,
    Capture,
    CaptureConfig,
    CaptureStats,
    Frame,
    SourceState,
    StatusCallback,
    StatusEvent,
)
from streamtrack.errors import UserError
from streamtrack.sources import SourceKind, SourceSpec, describe_error

log = logging.getLogger(__name__)

DECODE_MODES = ("thread", "process")
_HEADER_AT = 4  # a frame message: header length (4 bytes LE), JSON header, padding, RGB pixels
_PIXELS_ALIGN = 64


class DecodeProcessError(RuntimeError):
    """The decode process failed for a reason other than bad input."""


def check_decode_mode(mode: str) -> str:
    if mode not in DECODE_MODES:
        raise UserError(f"decode must be one of {', '.join(DECODE_MODES)}, got {mode!r}")
    return mode


class ProcessCapture(Capture):
    """A :class:`Capture` whose decoding runs in a child process; the consumer API
    (``start``, ``read``, iteration, ``stats``, ``status_events``, ``close``) is the
    same.  The child's status events arrive whenever the consumer looks (``read``,
    ``state``, ``stats``); ``on_status`` is called on the thread that looked."""

    START_TIMEOUT = 60.0  # Python and the decoder libraries start, on a busy machine

    def __init__(self, spec: SourceSpec, config: CaptureConfig | None = None, *,
                 on_status: StatusCallback | None = None) -> None:
        super().__init__(spec, config, on_status=on_status)
        self._proc: subprocess.Popen | None = None
        self._dir: str | None = None
        self._ctx = zmq.Context.instance()
        self._ctl: zmq.Socket | None = None
        self._frames: zmq.Socket | None = None
        self._poller = zmq.Poller()
        self._events_in = 0  # the child's status events received
        self._final: dict | None = None  # the child's last event, held until its last frame is here
        self._child_stats: dict = {}
        self._last_id: int | None = None  # the newest frame delivered
        # ZeroMQ sockets are not thread-safe; ``state`` and ``stats`` may be asked from
        # other threads than the consumer's (a control request's status).
        self._sockets = threading.RLock()

    # -- consumer API -------------------------------------------------------

    def start(self) -> ProcessCapture:
        """Start the decode process and open the source there: bad input raises
        :class:`UserError` at once, as with the capture thread."""
        if self._transition(SourceState.CONNECTING, only_from=SourceState.IDLE) is None:
            raise RuntimeError(f"{self.name}: start() on a source that is {self.state.value}")
        try:
            self._dir = childproc.private_dir("streamtrack-decode-")
            self._ctl = self._socket(zmq.PAIR, "ctl")
            newest_only = self.policy is BufferPolicy.DROP_OLDEST
            self._frames = self._socket(zmq.PULL, "frames", conflate=newest_only)
            self._poller.register(self._ctl, zmq.POLLIN)
            self._poller.register(self._frames, zmq.POLLIN)
            self._proc = childproc.spawn("streamtrack.capture_process", self._dir)
            # The source travels over the socket, not the command line: URLs carry passwords.
            config = asdict(self.config) | {"name": self.name, "policy": self.policy.value}
            request = json.dumps({"kind": self.spec.kind.value, "target": self.spec.target,
                                  "name": self.spec.name, "config": config}).encode()
            reply = self._open_in_child(request, self.START_TIMEOUT + self.config.open_timeout)
        except BaseException as exc:
            message = str(exc) if isinstance(exc, UserError) else f"decode process: {exc}"
            self._transition(SourceState.FAILED, message)
            self._shut(kill=True)
            raise
        if reply is not None:  # the child could not open the source
            self._transition(SourceState.FAILED, reply["message"])
            self._shut(kill=False)
            raise (UserError if reply["user"] else DecodeProcessError)(reply["message"])
        return self

    def read(self, timeout: float | None = 1.0) -> Frame | None:
        if self.state is SourceState.IDLE:
            raise RuntimeError("read() before start(): call start() or use 'with'")
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._sockets:
                if self._frames is None:  # closed
                    return None
                self._drain_control()
                frame = self._receive_frame()
                if frame is not None:
                    return frame
                if self._source_over():
                    return None
                wait = 0.1 if deadline is None else min(0.1, deadline - time.monotonic())
                if wait <= 0:
                    return None
                self._poller.poll(wait * 1000)

    @property
    def state(self) -> SourceState:
        self._refresh()
        return super().state

    def stats(self) -> CaptureStats:
        self._refresh()
        child = self._child_stats
        with self._lock:
            delivered, last_id = self._delivered, self._last_id
        # Every frame id up to the newest delivered that the consumer did not get was
        # dropped for a newer one, in the child's queue or the conflating socket.
        dropped = 0 if last_id is None else last_id + 1 - delivered
        return CaptureStats(
            state=super().state,
            frames_decoded=child.get("frames_decoded", 0),
            frames_delivered=delivered,
            dropped={"queue_full": max(0, dropped)},
            reconnects=child.get("reconnects", 0),
            reconnect_attempts=child.get("reconnect_attempts", 0),
            decode_errors=child.get("decode_errors", 0),
            queued=child.get("queued", 0),
            last_error=self.last_error,
        )

    def close(self, timeout: float | None = None) -> None:
        """Stop the decode process (it closes the source) and wait for it."""
        self._transition(SourceState.STOPPED)
        if self._proc is None:
            return
        try:
            self._ctl.send_multipart([b"stop", b""], flags=zmq.NOBLOCK)
        except (zmq.ZMQError, AttributeError):
            pass  # gone already
        if timeout is None:
            timeout = self.config.open_timeout + self.config.read_timeout + 1.0
        self._shut(kill=False, wait=timeout)

    # -- plumbing -----------------------------------------------------------

    def _refresh(self) -> None:
        """Take in the child's news without waiting; skipped while another thread is
        at the sockets (a consumer in ``read`` does the same)."""
        if self._sockets.acquire(blocking=False):
            try:
                if self._ctl is not None:
                    self._drain_control()
                    self._source_over()
            finally:
                self._sockets.release()

    def _socket(self, kind: int, name: str, conflate: bool = False) -> zmq.Socket:
        sock = self._ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        if kind == zmq.PULL:  # options before bind: the listener copies them
            sock.setsockopt(zmq.CONFLATE, 1) if conflate else sock.setsockopt(zmq.RCVHWM, 1)
        sock.bind(f"ipc://{self._dir}/{name}")
        return sock

    def _open_in_child(self, request: bytes, timeout: float) -> dict | None:
        """None once the source is open; the child's reply if it could not open it."""
        deadline = time.monotonic() + timeout
        # A pair socket takes a message once the child has connected.
        while not self._ctl.poll(100, zmq.POLLOUT):
            self._check_started(deadline, timeout)
        self._ctl.send_multipart([b"open", request])
        while True:
            if self._ctl.poll(100, zmq.POLLIN):
                kind, payload = self._ctl.recv_multipart()
                info = json.loads(payload) if payload else {}
                if kind == b"started":
                    return None
                if kind == b"failed":
                    return info
                self._on_child_message(kind, info)
            else:
                self._check_started(deadline, timeout)

    def _check_started(self, deadline: float, timeout: float) -> None:
        if self._proc.poll() is not None:
            raise DecodeProcessError(f"the decode process exited (code {self._proc.returncode})")
        if time.monotonic() > deadline:
            raise DecodeProcessError(f"the decode process did not start within {timeout:g} s")

    def _drain_control(self, timeout_ms: int = 0) -> None:
        """Handle the child's status and stats messages (waiting up to ``timeout_ms``
        for the first)."""
        # EVENTS is a cheap check; poll() builds a poller, worth it only to wait.
        ready = (self._ctl.poll(timeout_ms, zmq.POLLIN) if timeout_ms
                 else self._ctl.getsockopt(zmq.EVENTS) & zmq.POLLIN)
        while ready:
            kind, payload = self._ctl.recv_multipart()
            self._on_child_message(kind, json.loads(payload) if payload else {})
            ready = self._ctl.getsockopt(zmq.EVENTS) & zmq.POLLIN

    def _on_child_message(self, kind: bytes, info: dict) -> None:
        if kind == b"status":
            if info.get("final"):
                self._final = info
            else:
                self._events_in += 1
                self._transition(SourceState(info["state"]), info.get("error"))
        elif kind == b"stats":
            self._child_stats = info

    def _receive_frame(self) -> Frame | None:
        if not self._frames.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            return None
        msg = self._frames.recv(copy=False)
        view = msg.buffer
        size = int.from_bytes(view[:_HEADER_AT], "little")
        header = json.loads(bytes(view[_HEADER_AT:_HEADER_AT + size]))
        # The status events the child sent before this frame come first.
        deadline = time.monotonic() + 1.0
        while self._events_in < header["events"] and time.monotonic() < deadline:
            self._drain_control(50)
        shape = tuple(header["shape"])
        image = np.frombuffer(view, dtype=np.uint8, count=int(np.prod(shape)),
                              offset=_pixels_offset(size)).reshape(shape)
        self._child_stats = header["stats"]
        with self._lock:
            self._delivered += 1
            self._last_id = header["frame_id"]
        return Frame(image=image, frame_id=header["frame_id"], pts=header["pts"],
                     capture_time=header["capture_time"],
                     capture_monotonic=header["capture_monotonic"], source=self.name)

    def _source_over(self) -> bool:
        """True once no frame will come: closed, the child's final event applied after
        its last frame, or the child gone."""
        if super().state.terminal:
            return True
        final = self._final
        if final is not None:
            last = final.get("last_frame_id")
            if last is None or (self._last_id is not None and self._last_id >= last):
                self._final = None
                self._transition(SourceState(final["state"]), final.get("error"))
                return True
            return False
        if self._proc.poll() is not None:
            self._transition(SourceState.FAILED,
                             f"the decode process exited (code {self._proc.returncode})")
            return True
        return False

    def _shut(self, kill: bool, wait: float = 10.0) -> None:
        childproc.stop(self._proc, kill, wait)
        with self._sockets:
            for sock in (self._ctl, self._frames):
                if sock is not None:
                    sock.close(linger=0)
            self._ctl = self._frames = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)


def _pixels_offset(header_size: int) -> int:
    end = _HEADER_AT + header_size
    return -(-end // _PIXELS_ALIGN) * _PIXELS_ALIGN


def _frame_message(frame: Frame, events: int, stats: dict) -> bytearray:
    header = json.dumps({
        "frame_id": frame.frame_id, "pts": frame.pts, "capture_time": frame.capture_time,
        "capture_monotonic": frame.capture_monotonic, "shape": frame.image.shape,
        "events": events, "stats": stats,
    }).encode()
    offset = _pixels_offset(len(header))
    buf = bytearray(offset + frame.image.nbytes)
    buf[:_HEADER_AT] = len(header).to_bytes(_HEADER_AT, "little")
    buf[_HEADER_AT:_HEADER_AT + len(header)] = header
    np.frombuffer(buf, dtype=np.uint8, offset=offset).reshape(frame.image.shape)[...] = frame.image
    return buf


def _stats_dict(cap: Capture) -> dict:
    stats = asdict(cap.stats())
    stats["state"] = stats["state"].value
    return stats


# --------------------------------------------------------------------- the child
class _Child:
    STATS_INTERVAL = 0.25  # s between stats messages while no frame carries them

    def __init__(self, directory: str, parent_pid: int) -> None:
        self.parent_pid = parent_pid
        ctx = zmq.Context.instance()
        self.ctl = ctx.socket(zmq.PAIR)
        self.ctl.setsockopt(zmq.LINGER, 2000)
        self.ctl.connect(f"ipc://{directory}/ctl")
        self.directory = directory
        self.frames: zmq.Socket | None = None
        self.events_sent = 0
        self.stopped = False

    def tell(self, kind: bytes, info: dict | None = None) -> None:
        # Never block for long on a tracker that stopped reading: it is gone or closing.
        if self.ctl.poll(1000, zmq.POLLOUT):
            self.ctl.send_multipart([kind, json.dumps(info).encode() if info is not None else b""])

    def wait_for(self, kind: bytes, timeout: float | None) -> dict | None:
        """The payload of the tracker's next message if it is ``kind`` (None on a stop,
        a timeout or a parent gone; ``timeout`` None waits for those)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while ((deadline is None or time.monotonic() < deadline)
               and not childproc.parent_gone(self.parent_pid)):
            if self.ctl.poll(250, zmq.POLLIN):
                got, payload = self.ctl.recv_multipart()
                if got == kind:
                    return json.loads(payload) if payload else {}
                if got == b"stop":
                    self.stopped = True
                    return None
        return None

    def stop_requested(self) -> bool:
        while not self.stopped and self.ctl.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            self.stopped = self.ctl.recv_multipart()[0] == b"stop"
        return self.stopped or childproc.parent_gone(self.parent_pid)

    def open(self, request: dict) -> Capture | None:
        spec = SourceSpec(SourceKind(request["kind"]), request["target"], request["name"])
        try:
            cap = Capture(spec, CaptureConfig(**request["config"]))
            self.frames = zmq.Context.instance().socket(zmq.PUSH)
            self.frames.setsockopt(zmq.LINGER, 0)
            if cap.policy is BufferPolicy.DROP_OLDEST:
                self.frames.setsockopt(zmq.CONFLATE, 1)
            else:
                self.frames.setsockopt(zmq.SNDHWM, 1)
            self.frames.connect(f"ipc://{self.directory}/frames")
            cap.start()
        except UserError as exc:
            self.tell(b"failed", {"message": str(exc), "user": True})
            return None
        except Exception as exc:  # noqa: BLE001 - reported to the tracker, which raises it
            self.tell(b"failed", {"message": describe_error(exc, spec), "user": False})
            return None
        self.tell(b"started")
        return cap

    def send_frame(self, message: bytearray) -> bool:
        """Send, waiting while the consumer is behind (files); False if stopped."""
        poller = zmq.Poller()
        poller.register(self.frames, zmq.POLLOUT)
        poller.register(self.ctl, zmq.POLLIN)
        while True:
            try:
                self.frames.send(message, flags=zmq.NOBLOCK, copy=False)
                return True
            except zmq.Again:
                poller.poll(250)
                if self.stop_requested():
                    return False

    def pump(self, cap: Capture) -> None:
        """Frames and events to the tracker until the source is over or we are stopped."""
        final: StatusEvent | None = None  # the last event waits for the frames queued before it
        last_id: int | None = None
        stats_at = 0.0
        while not self.stop_requested():
            frame = cap.read(timeout=0.05)
            for event in cap.status_events():
                if event.state.terminal:
                    final = event
                else:
                    self.events_sent += 1
                    self.tell(b"status", {"state": event.state.value, "error": event.error})
            if frame is not None:
                if not self.send_frame(_frame_message(frame, self.events_sent, _stats_dict(cap))):
                    return
                last_id, stats_at = frame.frame_id, time.monotonic()
            elif final is not None and not cap.stats().queued:
                self.tell(b"stats", _stats_dict(cap))
                self.tell(b"status", {"state": final.state.value, "error": final.error,
                                      "final": True, "last_frame_id": last_id})
                self.wait_for(b"stop", None)  # the tracker closes us once it has everything
                return
            elif time.monotonic() - stats_at >= self.STATS_INTERVAL:
                self.tell(b"stats", _stats_dict(cap))
                stats_at = time.monotonic()


def _child(directory: str, parent_pid: int) -> int:
    if not childproc.become_child(parent_pid):
        return 0
    child = _Child(directory, parent_pid)
    request = child.wait_for(b"open", ProcessCapture.START_TIMEOUT)
    if request is None:
        return 0
    cap = child.open(request)
    if cap is None:
        return 2
    try:
        child.pump(cap)
    finally:
        cap.close()
        if child.frames is not None:
            child.frames.close(linger=0)
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="streamtrack decode: %(message)s")
    sys.exit(_child(sys.argv[1], int(sys.argv[2])))
