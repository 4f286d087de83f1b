"""Capture in a child process (``decode: process``): decode and RGB conversion off
the tracker's interpreter.

On a GPU the engine's step is mostly Python launching kernels, so every other Python
thread in the tracker's process -- the capture thread's demuxing, decoding and
conversion among them -- delays its next launch while it holds the interpreter lock.
:class:`ProcessCapture` runs the same :class:`~streamtrack.capture.Capture` (queue
policy, reconnects, pacing, state machine) in ``python -m
streamtrack.capture_process``.  The tracker's process runs no capture thread at all: it
takes frames and status events on its own thread, in :meth:`ProcessCapture.read`.

Pixels travel through a ring of frame slots in shared memory; a ZeroMQ pair socket
(ipc) carries the rest, in order: "frame in slot i" (with its id, times and the
source's counters), status events, and back from the tracker, "slot i is free".  The
child writes only into free slots, so the tracker reads a slot without locks, and
copies the frame out of it at once (the engine and the emitter may keep a frame for
as long as they like).  Each frame costs one copy on either side.

* Live sources (drop-oldest): the tracker takes the newest frame that has arrived and
  frees the older ones unseen; they count as dropped (``queue_full``), from the gaps
  in frame ids.  The ring has room for several engine steps' worth of frames, so the
  child rarely waits for a slot (when it does, its own drop-oldest queue keeps the
  newest frames).
* Files (blocking): the child waits for a free slot, so nothing is lost and memory
  stays bounded.

The source's last event (ended, failed) waits until the tracker has taken the frames
before it.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
import weakref
from dataclasses import asdict, fields
from multiprocessing import resource_tracker, shared_memory

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
from streamtrack.errors import HelperProcessError, UserError
from streamtrack.sources import SourceKind, SourceSpec, describe_error

log = logging.getLogger(__name__)

DECODE_MODES = ("thread", "process")
# Slots in the ring.  Live: a 30 fps camera fills 8 in 0.27 s, longer than any GPU
# step; 8 slots of 1280x720 RGB are 22 MB.  Files: one being read, two ready.
LIVE_SLOTS = 8
FILE_SLOTS = 3
SHARED_MEMORY_DIR = "/dev/shm"  # where Linux keeps POSIX shared memory (a tmpfs)


class DecodeProcessError(HelperProcessError):
    """The decode process failed for a reason other than bad input."""


def check_decode_mode(mode: str) -> str:
    if mode not in DECODE_MODES:
        raise UserError(f"decode must be one of {', '.join(DECODE_MODES)}, got {mode!r}")
    return mode


def _check_room(size: int, slots: int, shape: tuple[int, ...]) -> None:
    """A ring larger than the room left in /dev/shm is created all the same (the pages
    come on first write), and its first frame kills the decode process with SIGBUS:
    say so beforehand.  A container's /dev/shm is 64 MiB unless told otherwise."""
    try:
        free = shutil.disk_usage(SHARED_MEMORY_DIR).free
    except OSError:  # not Linux, or no /dev/shm: nothing to check against
        return
    if size > free:
        h, w = shape[:2]
        needed, has = f"{size / 2**20:.1f} MiB", f"{free / 2**20:.1f} MiB"
        if needed == has:  # not "needs 1.0 MiB ... has 1.0 MiB free"
            needed, has = f"{size:,} bytes", f"{free:,} bytes"
        raise UserError(
            f"decode: process needs {needed} of shared memory for {slots} {w}x{h} "
            f"frames, and {SHARED_MEMORY_DIR} has {has} free (in a container: "
            "docker run --shm-size=1g), or use decode: thread")


class _Ring:
    """Frame slots of one shape in a shared-memory segment: created by the child,
    attached by the tracker."""

    def __init__(self, shape: tuple[int, ...], slots: int = 0, name: str | None = None) -> None:
        """``slots`` to create a ring; ``name`` to attach to one."""
        self.shape = tuple(shape)
        frame_bytes = int(np.prod(self.shape))
        if name is None:
            _check_room(frame_bytes * slots, slots, self.shape)
            try:
                self.shm = shared_memory.SharedMemory(create=True, size=frame_bytes * slots)
            except OSError as exc:  # /dev/shm read-only, not ours, out of inodes
                raise UserError(f"decode: process cannot create shared memory in {SHARED_MEMORY_DIR}: "
                                f"{exc.strerror or exc} (or use decode: thread)") from None
            try:
                # The pages now, while a shortage is an error: on first write it is SIGBUS
                # (several decoders starting at once may each have passed the check).
                os.posix_fallocate(self.shm._fd, 0, self.shm.size)  # noqa: SLF001
            except OSError as exc:
                self.shm.close()
                self.shm.unlink()
                _check_room(frame_bytes * slots, slots, self.shape)  # taken since: say how much
                raise UserError(f"decode: process cannot reserve shared memory: {exc}") from None
            except AttributeError:  # not Linux: no fd, or no posix_fallocate
                pass
        else:
            self.shm = shared_memory.SharedMemory(name=name)
            # Python < 3.13 tracks attached segments too, and would unlink the child's
            # segment when the tracker exits; the child (or its tracker) owns it.
            resource_tracker.unregister(self.shm._name, "shared_memory")  # noqa: SLF001
        self.slots = np.ndarray((self.shm.size // frame_bytes, *self.shape),
                                dtype=np.uint8, buffer=self.shm.buf)

    @property
    def name(self) -> str:
        return self.shm.name

    def close(self, unlink: bool = False) -> None:
        del self.slots  # no view may outlive the mapping
        self.shm.close()
        if unlink:
            self.shm.unlink()


class ProcessCapture(Capture):
    """A :class:`Capture` whose decoding runs in a child process; the consumer API
    (``start``, ``read``, iteration, ``stats``, ``status_events``, ``close``) is the
    same.  The child's status events arrive whenever the consumer looks (``read``,
    ``state``, ``stats``); ``on_status`` is called on the thread that looked."""

    START_TIMEOUT = 60.0  # Python and the decoder libraries start, on a busy machine
    REFILL_WAIT = 0.05  # s for the child's newer frames after a full ring (it sends at once)

    def __init__(self, spec: SourceSpec, config: CaptureConfig | None = None, *,
                 on_status: StatusCallback | None = None) -> None:
        super().__init__(spec, config, on_status=on_status)
        self._proc: subprocess.Popen | None = None
        self._dir: str | None = None
        self._leftovers: weakref.finalize | None = None
        self._died: str | None = None  # the child died: the next read raises this once
        self._ctl: zmq.Socket | None = None
        self._ring: _Ring | None = None
        self._ready: collections.deque[dict] = collections.deque()  # frames in slots, oldest first
        self._final: dict | None = None  # the child's last event, held until its frames are taken
        self._child_stats: dict = {}
        self._last_id: int | None = None  # the newest frame delivered
        self._played = False  # the child was told of the first read()
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
            self._ctl = zmq.Context.instance().socket(zmq.PAIR)
            self._ctl.setsockopt(zmq.LINGER, 0)
            self._ctl.bind(f"ipc://{self._dir}/ctl")
            self._proc = childproc.spawn("streamtrack.capture_process", self._dir)
            # A capture dropped without close() (or still open at exit) takes its decode
            # process and socket folder with it.
            self._leftovers = weakref.finalize(self, childproc.end, self._proc, self._dir)
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
        if super().state is SourceState.IDLE:  # the loop below takes in the child's news
            raise RuntimeError("read() before start(): call start() or use 'with'")
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._sockets:
                if self._ctl is None:  # closed
                    return None
                if not self._played:
                    self._played = childproc.send(self._ctl, [b"play", b""], self._proc)
                self._drain()
                if self._ctl is None:  # closed by a status callback
                    return None
                frame = self._take() if self._ready else None
                if frame is not None:
                    return frame
                if self._source_over():
                    if self._died is not None:  # once: later reads find the source over
                        died, self._died = self._died, None
                        raise DecodeProcessError(died)
                    return None
                wait = 0.1 if deadline is None else min(0.1, deadline - time.monotonic())
                if wait <= 0:
                    return None
                self._ctl.poll(wait * 1000, zmq.POLLIN)

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
        # dropped for a newer one, in the child's queue or here.
        dropped = 0 if last_id is None else last_id + 1 - self.config.first_frame_id - delivered
        return CaptureStats(
            state=super().state,
            frames_decoded=child.get("frames_decoded", 0),
            frames_delivered=delivered,
            dropped={"queue_full": max(0, dropped)},
            reconnects=child.get("reconnects", 0),
            reconnect_attempts=child.get("reconnect_attempts", 0),
            decode_errors=child.get("decode_errors", 0),
            queued=child.get("queued", 0) + len(self._ready),
            last_error=self.last_error,
        )

    def close(self, timeout: float | None = None) -> None:
        """Stop the decode process (it closes the source) and wait for it."""
        self._transition(SourceState.STOPPED)
        if self._proc is None:
            return
        with self._sockets:
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
                    self._drain()
                    self._source_over()
            finally:
                self._sockets.release()

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
                if kind == b"started":
                    return None
                if kind == b"failed":
                    return json.loads(payload)
                self._on_child_message(kind, json.loads(payload) if payload else {})
            else:
                self._check_started(deadline, timeout)

    def _check_started(self, deadline: float, timeout: float) -> None:
        if self._proc.poll() is not None:
            raise DecodeProcessError(childproc.exited("decode", self._proc))
        if time.monotonic() > deadline:
            raise DecodeProcessError(f"the decode process did not start within {timeout:g} s")

    def _drain(self) -> None:
        """Handle every message the child has sent so far."""
        # EVENTS is a cheap check; poll() builds a poller, worth it only to wait.
        # A status callback may close() this capture (the sockets' lock is re-entrant).
        while self._ctl is not None and self._ctl.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            kind, payload = self._ctl.recv_multipart()
            self._on_child_message(kind, json.loads(payload) if payload else {})

    def _on_child_message(self, kind: bytes, info: dict) -> None:
        if kind == b"frame":
            self._child_stats = info.pop("stats")
            self._ready.append(info)
        elif kind == b"status":
            if info.get("final"):
                self._final = info
            else:
                self._transition(SourceState(info["state"]), info.get("error"))
        elif kind == b"stats":
            self._child_stats = info

    def _free(self, slots: list) -> None:
        """Give slots back to the child; one that died is reported by the next read."""
        childproc.send(self._ctl, [b"free", json.dumps(slots).encode()], self._proc)

    def _child_died(self) -> None:
        self._ready.clear()  # their slots went with the child
        try:
            self._proc.wait(5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._source_over()

    def _take(self) -> Frame | None:
        """The next frame to deliver, copied out of its slot; the slots it leaves are freed.
        None if the child died before its frame could be read."""
        if self.policy is BufferPolicy.DROP_OLDEST:
            if len(self._ready) >= LIVE_SLOTS:
                self._refill_full_ring()
            skipped = [[d["ring"], d["slot"]] for d in list(self._ready)[:-1]]
            info = self._ready[-1]
            self._ready.clear()
        else:
            skipped, info = [], self._ready.popleft()
        ring = self._ring
        if ring is None or ring.name != info["ring"]:  # the first frame, or a new frame size
            if ring is not None:
                ring.close()
                self._ring = None
            try:
                ring = self._ring = _Ring(info["shape"], name=info["ring"])
            except FileNotFoundError:  # the child died and its segment went with it
                self._child_died()
                return None
        image = ring.slots[info["slot"]].copy()
        freed = [*skipped, [info["ring"], info["slot"]]]
        self._free(freed)
        with self._lock:
            self._delivered += 1
            self._last_id = info["frame_id"]
        return Frame(image=image, frame_id=info["frame_id"], pts=info["pts"],
                     capture_time=info["capture_time"], capture_monotonic=info["capture_monotonic"],
                     source=self.name)

    def _refill_full_ring(self) -> None:
        """Every slot held a frame (the consumer was away longer than the ring lasts, e.g.
        paused), so newer frames wait in the child: free all but the newest and take
        what the child sends into them, for a frame as fresh as the thread's queue gives."""
        newest = self._ready.pop()
        self._free([[d["ring"], d["slot"]] for d in self._ready])
        self._ready.clear()
        self._ready.append(newest)
        deadline = time.monotonic() + self.REFILL_WAIT
        while self._final is None:
            # Wait for the first newer frame, then only for those sent right behind it.
            wait = deadline - time.monotonic() if len(self._ready) == 1 else 0.002
            if self._ctl is None or wait <= 0 or not self._ctl.poll(max(1, int(wait * 1000)), zmq.POLLIN):
                break
            self._drain()

    def _source_over(self) -> bool:
        """True once no frame will come: closed, the child's final event applied after
        its last frame was taken, or the child gone."""
        if super().state.terminal:
            return True
        if self._final is not None:
            if self._ready:
                return False
            final, self._final = self._final, None
            self._transition(SourceState(final["state"]), final.get("error"))
            return True
        if self._proc.poll() is not None:
            self._died = childproc.exited("decode", self._proc)
            self._transition(SourceState.FAILED, self._died)
            return True
        return False

    def _shut(self, kill: bool, wait: float = 10.0) -> None:
        childproc.stop(self._proc, kill, wait)
        if self._leftovers is not None:
            self._leftovers.detach()
        with self._sockets:
            if self._ctl is not None:
                self._ctl.close(linger=0)
            self._ctl = None
            self._ready.clear()
            if self._ring is not None:
                self._ring.close()
                self._ring = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)


def _stats_dict(cap: Capture) -> dict:
    stats = cap.stats()
    # By hand, not asdict(): this goes with every frame, and asdict deep-copies.
    return {f.name: getattr(stats, f.name) for f in fields(stats)} | {"state": stats.state.value}


# --------------------------------------------------------------------- the child
class _Child:
    STATS_INTERVAL = 0.25  # s between stats messages while no frame carries them

    def __init__(self, directory: str, parent_pid: int) -> None:
        self.parent_pid = parent_pid
        self.ctl = zmq.Context.instance().socket(zmq.PAIR)
        self.ctl.setsockopt(zmq.LINGER, 2000)
        self.ctl.connect(f"ipc://{directory}/ctl")
        self.stopped = False
        self.played = False  # frames wait for the tracker's first read(), as in a thread capture
        self.slots = LIVE_SLOTS
        self.ring: _Ring | None = None
        self.free: collections.deque[int] = collections.deque()
        # Rings of earlier frame sizes, with the slots the tracker has yet to free.
        self.retired: dict[str, tuple[_Ring, int]] = {}

    def tell(self, kind: bytes, info: dict | list | None = None) -> None:
        childproc.tell(self.ctl, kind, info)

    def handle(self, timeout_ms: int = 0) -> None:
        """The tracker's messages: freed slots, stop (waiting up to ``timeout_ms``)."""
        ready = (self.ctl.poll(timeout_ms, zmq.POLLIN) if timeout_ms
                 else self.ctl.getsockopt(zmq.EVENTS) & zmq.POLLIN)
        while ready and not self.stopped:
            kind, payload = self.ctl.recv_multipart()
            if kind == b"stop":
                self.stopped = True
            elif kind == b"play":
                self.played = True
            elif kind == b"free":
                for ring, slot in json.loads(payload):
                    if self.ring is not None and ring == self.ring.name:
                        self.free.append(slot)
                    elif ring in self.retired:
                        self.release_retired(ring)
            ready = self.ctl.getsockopt(zmq.EVENTS) & zmq.POLLIN

    def done(self) -> bool:
        self.handle()
        return self.stopped or childproc.parent_gone(self.parent_pid)

    def wait_for_open(self, timeout: float) -> dict | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not childproc.parent_gone(self.parent_pid):
            if self.ctl.poll(250, zmq.POLLIN):
                kind, payload = self.ctl.recv_multipart()
                if kind == b"open":
                    return json.loads(payload)
                if kind == b"stop":
                    return None
        return None

    def open(self, request: dict) -> Capture | None:
        spec = SourceSpec(SourceKind(request["kind"]), request["target"], request["name"])
        try:
            cap = Capture(spec, CaptureConfig(**request["config"]))
            self.slots = LIVE_SLOTS if cap.policy is BufferPolicy.DROP_OLDEST else FILE_SLOTS
            cap.start()
        except UserError as exc:
            self.tell(b"failed", {"message": str(exc), "user": True})
            return None
        except Exception as exc:  # noqa: BLE001 - reported to the tracker, which raises it
            self.tell(b"failed", {"message": describe_error(exc, spec), "user": False})
            return None
        self.tell(b"started")
        return cap

    def slot_for(self, shape: tuple[int, ...]) -> int:
        """A free slot for a frame of ``shape`` (a new ring when the size changes)."""
        if self.ring is None or self.ring.shape != shape:
            if self.ring is not None:
                self.retired[self.ring.name] = (self.ring, self.slots - len(self.free))
                self.release_retired(self.ring.name, 0)
                self.ring = None  # retired (or closed): a new ring that cannot be made is no ring
            self.ring = _Ring(shape, self.slots)
            self.free = collections.deque(range(self.slots))
        return self.free.popleft()

    def release_retired(self, name: str, freed: int = 1) -> None:
        ring, held = self.retired[name]
        if held - freed > 0:
            self.retired[name] = (ring, held - freed)
        else:
            del self.retired[name]
            ring.close(unlink=True)

    def pump(self, cap: Capture) -> None:
        """Frames and events to the tracker until the source is over or we are stopped."""
        final: StatusEvent | None = None  # the last event waits for the frames queued before it
        stats_at = 0.0
        while not self.done():
            if self.ring is not None and not self.free:
                self.handle(50)  # every slot is the tracker's: wait for one
                continue
            if self.played:
                frame = cap.read(timeout=0.05)
            else:  # news of the source goes on; a paced file's clock waits for the first read
                self.handle(50)
                frame = None
            for event in cap.status_events():
                if event.state.terminal:
                    final = event
                else:
                    self.tell(b"status", {"state": event.state.value, "error": event.error})
            if frame is not None:
                try:
                    slot = self.slot_for(frame.image.shape)
                except UserError as exc:  # no room for the frames in shared memory
                    self.tell(b"stats", _stats_dict(cap))
                    self.tell(b"status", {"state": SourceState.FAILED.value, "error": str(exc),
                                          "final": True})
                    while not self.done():  # the tracker closes us
                        self.handle(250)
                    return
                self.ring.slots[slot] = frame.image
                self.tell(b"frame", {
                    "ring": self.ring.name, "slot": slot, "shape": frame.image.shape,
                    "frame_id": frame.frame_id, "pts": frame.pts, "capture_time": frame.capture_time,
                    "capture_monotonic": frame.capture_monotonic, "stats": _stats_dict(cap)})
                stats_at = time.monotonic()
            elif final is not None and not cap.stats().queued:
                self.tell(b"stats", _stats_dict(cap))
                self.tell(b"status", {"state": final.state.value, "error": final.error, "final": True})
                while not self.done():  # the tracker closes us once it has everything
                    self.handle(250)
                return
            elif time.monotonic() - stats_at >= self.STATS_INTERVAL:
                self.tell(b"stats", _stats_dict(cap))
                stats_at = time.monotonic()

    def close(self) -> None:
        for ring in [*(r for r, _ in self.retired.values()), *([self.ring] if self.ring else [])]:
            ring.close(unlink=True)
        self.ctl.close(linger=0)


def _child(directory: str, parent_pid: int) -> int:
    if not childproc.become_child(parent_pid):
        return 0
    child = _Child(directory, parent_pid)
    try:
        request = child.wait_for_open(ProcessCapture.START_TIMEOUT)
        cap = child.open(request) if request is not None else None
        if cap is None:
            return 0 if request is None else 2
        try:
            child.pump(cap)
        finally:
            cap.close()
    finally:
        child.close()
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="streamtrack decode: %(message)s")
    sys.exit(_child(sys.argv[1], int(sys.argv[2])))
