"""The fleet's Ray actor: one model, several streams, one tracker thread per stream.

:class:`FleetActor` is a plain class; the driver (:mod:`streamtrack.fleet`) wraps
it with ``ray.remote`` and Ray's options (CPUs, GPUs, ``max_restarts``).  Its
constructor only records an *incarnation* id: when Ray restarts a dead actor it
runs the constructor again, the incarnation changes, and the driver, seeing an
actor that runs none of its streams, starts them again with a
:class:`~streamtrack.pipeline.Resume` built from their last published masks.

Each stream is a full :class:`~streamtrack.pipeline.Tracker` (capture thread,
engine loop, publisher, control server) exactly as ``streamtrack run`` runs it,
so it publishes the same topics in the same format.  The streams of an actor
share one model, built on the first stream's start, and one
:class:`~streamtrack.multistream.SharedImageEncoder` that batches their frames
into one image-encoder forward; each has its own
:class:`~streamtrack.engine.StreamingEngine` (memory bank, objects, frame
numbering).  A stream that fails (missing source, bad checkpoint) fails alone:
its error is kept for the driver and the other streams go on.

The actor is threaded (Ray ``max_concurrency`` > 1), so ``report`` answers
while another call is still loading the model; the stream table is locked.

Fencing: the driver polls every actor (``report``) twice a second.  An actor that
hears nothing from it for ``fence_after`` seconds has most likely been cut off
from the cluster (a network partition), and Ray restarts its streams elsewhere
once it declares the node dead; so the actor stops its streams and forgets them,
and no second copy of a stream goes on publishing and writing its files.  (A call
of the driver's still running, such as a start waiting for its source, counts as
hearing from it.)  If the driver was only slow, its next poll finds the streams
gone and starts them again from their last masks, as after an actor restart.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field
from typing import Any

from streamtrack.errors import UserError
from streamtrack.fleet_spec import ModelKey
from streamtrack.pipeline import RunConfig, Tracker
from streamtrack.protocol import WILDCARD_HOSTS, tcp_host_port

log = logging.getLogger(__name__)

# How long start_stream waits for the tracker to bind its endpoints (or fail).
_BIND_TIMEOUT = 60.0
_STOP_TIMEOUT = 10.0  # s a stream gets to flush its outputs and end when stopped
STOPPING = "stopping"  # a report's state for a stream being stopped (never a directory's)


class StreamState:
    STARTING = "starting"
    RUNNING = "running"
    DONE = "done"  # the source ended or max_frames was reached
    FAILED = "failed"  # a user error (missing source, bad checkpoint), a source given up on: not retried
    CRASHED = "crashed"  # an unexpected exception in the tracker thread
    STOPPED = "stopped"  # removed or stopped on request


@dataclass
class _Stream:
    config: RunConfig
    tracker: Tracker | None = None
    thread: threading.Thread | None = None
    state: str = StreamState.STARTING
    error: str | None = None
    bound: dict[str, str | None] = field(default_factory=dict)
    ready: threading.Event = field(default_factory=threading.Event)  # bound, or ended
    stop_requested: bool = False
    alive_at: float | None = None  # monotonic: the tracker loop's last sign of life


class FleetActor:
    """Hosts streams that share a model.  Public methods are the actor's remote API."""

    def __init__(self, name: str, log_level: int = logging.INFO, fence_after: float | None = None) -> None:
        logging.basicConfig(level=log_level, format=f"%(levelname)s %(name)s[{name}]: %(message)s")
        self.name = name
        self.incarnation = uuid.uuid4().hex
        self._lock = threading.Lock()  # the stream table
        self._model_lock = threading.Lock()
        self._model = None
        self._encoder = None  # streamtrack.multistream.SharedImageEncoder over the model
        self._model_key: ModelKey | None = None
        self._streams: dict[str, _Stream] = {}
        # Streams stopped (removed, fenced) whose thread did not end: hung, holding their
        # endpoints and files; reported, so the driver can restart the actor.
        self._stuck: dict[str, threading.Thread] = {}
        self._node = node_address()
        self._heard = time.monotonic()  # when the driver's last call began or ended
        self._calls = 0  # the driver's calls running now (a start may wait a minute for its source)
        if fence_after is not None:
            threading.Thread(target=self._fence, args=(fence_after,), name="fence", daemon=True).start()

    # ------------------------------------------------------------------ remote API
    def pid(self) -> int:
        return os.getpid()

    def start_stream(self, config: RunConfig, model_key: ModelKey) -> dict[str, Any]:
        """Start one stream and wait until it has bound its endpoints (or failed).

        Returns the stream's report (see :meth:`report`).  Starting a name that is
        already running is an error; a stream that ended may be started again.
        """
        with self._driver_call():
            return self._start_stream(config, model_key)

    def _start_stream(self, config: RunConfig, model_key: ModelKey) -> dict[str, Any]:
        name = config.stream
        with self._lock:
            old = self._streams.get(name)
        if old is not None and old.stop_requested and old.thread is not None:
            old.thread.join(_STOP_TIMEOUT)  # still stopping: its endpoints are free once it ends
        with self._lock:
            old = self._streams.get(name)
            if (old is not None and old.state in (StreamState.STARTING, StreamState.RUNNING)
                    and not old.stop_requested):
                return self._stream_report(name, old) | {"error": f"stream {name!r} is already running"}
            stream = _Stream(config=config)
            self._streams[name] = stream
        try:
            engine = self._engine(config, model_key)
            stream.tracker = Tracker(config, engine=engine, notify=lambda kind, data: self._notify(
                stream, kind, data))
        except UserError as exc:
            self._ended(name, stream, StreamState.FAILED, str(exc))
        except Exception as exc:  # noqa: BLE001 - reported to the driver, the actor lives on
            log.exception("stream %s: could not start", name)
            self._ended(name, stream, StreamState.CRASHED, f"{type(exc).__name__}: {exc}")
        else:
            with self._lock:
                # A stop that came while the model loaded has already unlisted this stream
                # and found no thread to wait for: starting one now would leave a tracker
                # running that nothing lists or stops.
                # Started under the lock: a stop that sees the thread can join it.
                cancelled = stream.stop_requested
                if not cancelled:
                    stream.thread = threading.Thread(target=self._run, args=(name, stream),
                                                     name=f"stream-{name}", daemon=True)
                    stream.thread.start()
            if cancelled:
                self._ended(name, stream, StreamState.STOPPED, None)
            else:
                stream.ready.wait(_BIND_TIMEOUT)
        with self._lock:
            return self._stream_report(name, stream)

    def stop_stream(self, name: str, timeout: float = _STOP_TIMEOUT) -> dict[str, Any]:
        """Stop one stream (its outputs are flushed) and forget it."""
        with self._driver_call():
            return self._stop_stream(name, timeout)

    def _stop_stream(self, name: str, timeout: float = _STOP_TIMEOUT) -> dict[str, Any]:
        stopped = self._stop_streams([name], timeout)
        return {"name": name, "state": StreamState.STOPPED if stopped else "unknown"}

    def _stop_streams(self, names: list[str], timeout: float = _STOP_TIMEOUT) -> list[str]:
        """Stop these streams together: all are told first, then waited for, so that their
        last frames and outputs (a publisher gives its subscribers up to a second) overlap
        instead of adding up.  Returns the names of those that were there to stop."""
        told = []
        with self._lock:  # ordered with a start deciding whether to start its thread
            for name in names:
                stream = self._streams.get(name)
                if stream is not None:
                    stream.stop_requested = True
                    told.append((name, stream))
        for _, stream in told:
            if stream.tracker is not None:
                stream.tracker.stop()
        deadline = time.monotonic() + timeout
        for name, stream in told:
            if stream.thread is not None:
                stream.thread.join(max(0.0, deadline - time.monotonic()))
            with self._lock:
                # Listed until its thread has ended: a driver that found it gone would start it
                # again on the same endpoints while this one still held them (a fence racing
                # the driver's polls after the actor was frozen).
                if self._streams.get(name) is stream:
                    del self._streams[name]
                if stream.thread is not None and stream.thread.is_alive():
                    log.warning("stream %s did not stop within %.0f s (hung?)", name, timeout)
                    self._stuck[name] = stream.thread
        return [name for name, _ in told]

    def stop_all(self, timeout: float = 10.0) -> dict[str, int]:
        """Stop every stream, then return each one's frames (the driver kills the actor
        next): its last report came before the frames tracked while stopping."""
        with self._lock:
            streams = dict(self._streams)
        self._stop_streams(list(streams), timeout)
        return {name: s.tracker.frames_seen for name, s in streams.items() if s.tracker is not None}

    def report(self) -> dict[str, Any]:
        """Who this is (incarnation, pid, node), every stream's state and endpoints, the
        streams stopped but not ended (``stuck``), and how well the shared encoder batches
        (frames per forward pass)."""
        self._heard = time.monotonic()
        with self._lock:
            streams = {name: self._stream_report(name, s) for name, s in self._streams.items()}
            self._stuck = {name: t for name, t in self._stuck.items() if t.is_alive()}
            stuck = sorted(self._stuck)
        enc = self._encoder
        return {"actor": self.name, "incarnation": self.incarnation, "pid": os.getpid(),
                "node": self._node, "streams": streams, "stuck": stuck,
                "encoder": {"batches": enc.batches, "frames": enc.frames} if enc is not None else None}

    def stacks(self, names: list[str]) -> str:
        """Where the loops of streams ``names`` (running or stuck) are, then every other
        thread running streamtrack code (their capture, emitter, ... threads; other streams'
        too), as tracebacks: what the driver logs before it kills this actor for a hang."""
        with self._lock:
            loops = {s.thread.ident: n for n, s in self._streams.items() if n in names and s.thread}
            loops.update((t.ident, n) for n, t in self._stuck.items() if n in names)
        thread_names = {t.ident: t.name for t in threading.enumerate()}
        package = os.path.dirname(os.path.abspath(__file__))
        first, rest = [], []
        for ident, frame in sys._current_frames().items():  # noqa: SLF001 - faulthandler's view, as text
            stack = traceback.extract_stack(frame)
            if ident == threading.get_ident() or not any(f.filename.startswith(package) for f in stack):
                continue  # this call, and Ray's own threads
            name = thread_names.get(ident, str(ident))
            if ident in loops:
                first.append(f"stream {loops[ident]}'s loop (thread {name}):\n" + "".join(stack.format()))
            else:
                rest.append(f"thread {name}:\n" + "".join(stack.format()))
        return "\n".join(first + rest)

    # ------------------------------------------------------------------- internals
    @contextlib.contextmanager
    def _driver_call(self):
        """A long call of the driver's (a start waiting for its source): the driver is not
        silent while it runs."""
        with self._lock:
            self._calls += 1
            self._heard = time.monotonic()
        try:
            yield
        finally:
            with self._lock:
                self._calls -= 1
                self._heard = time.monotonic()

    def _fence(self, after: float) -> None:
        """Stop every stream once the driver has been silent for ``after`` seconds."""
        while True:
            time.sleep(min(1.0, after / 4))
            silent = time.monotonic() - self._heard
            if silent < after or self._calls:
                continue
            with self._lock:
                names = [n for n, s in self._streams.items()
                         if s.state in (StreamState.STARTING, StreamState.RUNNING)]
            if names:
                log.warning("no word from the fleet driver for %.0f s (cut off from the cluster?): "
                            "stopping stream(s) %s, which Ray will restart elsewhere", silent,
                            ", ".join(sorted(names)))
                self._stop_streams(names)
            self._heard = time.monotonic()  # warn once per silence, not every second

    def _engine(self, config: RunConfig, key: ModelKey):
        from streamtrack.engine import StreamingEngine

        if key.cudagraphs:
            # The tracker loads, warms and steps it on the stream's own thread: CUDA graphs
            # are recorded per thread, and this actor serves this one stream.
            return None
        model = self._shared_model(key)
        # One model per actor, one engine per stream; the streams' image-encoder passes
        # are batched into one forward by the actor's shared encoder.
        engine = StreamingEngine(model, config.engine, encoder=self._encoder)
        with self._model_lock:  # kernel selection and compilation once per actor, before a live frame
            seconds = engine.warmup_once()
        if seconds is not None:
            log.info("model warmed up in %.1f s", seconds)
        return engine

    def _shared_model(self, key: ModelKey):
        with self._model_lock:
            if self._model is None:
                from streamtrack.models import build_model, resolve_device

                log.info("loading %s for this actor's streams", key.model)
                from streamtrack.multistream import SharedImageEncoder

                self._model = build_model(key.model, key.checkpoint, device=resolve_device(key.device),
                                          image_size=key.image_size)
                self._encoder = SharedImageEncoder(self._model)
                self._model_key = key
            elif key != self._model_key:
                raise UserError(f"this actor runs {self._model_key}; a stream with {key} needs its own actor")
            return self._model

    def _notify(self, stream: _Stream, kind: str, data: dict[str, Any]) -> None:
        if kind in ("running", "alive"):  # the loop goes round (once a second at least)
            stream.alive_at = time.monotonic()
        elif kind == "bound":
            with self._lock:
                stream.bound = dict(data)
                stream.state = StreamState.RUNNING
            stream.ready.set()

    def _run(self, name: str, stream: _Stream) -> None:
        assert stream.tracker is not None
        try:
            summary = stream.tracker.run()
        except UserError as exc:
            log.error("stream %s failed: %s", name, exc)
            self._ended(name, stream, StreamState.FAILED, str(exc))
        except BaseException as exc:  # noqa: BLE001 - one stream must not take the others down
            log.exception("stream %s crashed", name)
            self._ended(name, stream, StreamState.CRASHED, f"{type(exc).__name__}: {exc}")
        else:
            failure = None if stream.stop_requested else summary.source_failure(
                str(stream.tracker.config.source))
            if failure is not None:  # a camera given up on: the fleet's exit code says so
                log.error("stream %s failed: %s", name, failure)
                self._ended(name, stream, StreamState.FAILED, failure)
                return
            state = StreamState.STOPPED if stream.stop_requested else StreamState.DONE
            log.info("stream %s %s: %s", name, state, summary.line())
            self._ended(name, stream, state, None)

    def _ended(self, name: str, stream: _Stream, state: str, error: str | None) -> None:
        with self._lock:
            stream.state, stream.error = state, error
        engine = stream.tracker.engine if stream.tracker is not None else None
        if self._encoder is not None and engine is not None:
            self._encoder.idle(engine)  # batches stop waiting for a stream that has ended
        stream.ready.set()

    def _stream_report(self, name: str, s: _Stream) -> dict[str, Any]:
        frames = s.tracker.frames_seen if s.tracker is not None else 0
        # Seconds since the loop last went round; None while it has not started (the model
        # loading) or once the stream has ended.  The driver restarts a stream silent too long.
        silent = None
        if s.alive_at is not None and s.state == StreamState.RUNNING:
            silent = round(time.monotonic() - s.alive_at, 1)
        # Stopped on request but not gone yet (its outputs closing): the driver restarts a
        # fenced stream only once it is gone, and must not take it for one that ended.
        state = STOPPING if s.stop_requested and s.thread is not None else s.state
        return {
            "name": name, "state": state, "error": s.error, "frames": frames, "silent": silent,
            "bound": dict(s.bound),
            "publish": connectable(s.bound.get("publish"), self._node),
            "control": connectable(s.bound.get("control"), self._node),
        }


def connectable(endpoint: str | None, node: str) -> str | None:
    """A bound endpoint as others connect to it: a wildcard host becomes the node's address."""
    if endpoint is None:
        return None
    tcp = tcp_host_port(endpoint)
    return f"tcp://{node}:{tcp[1]}" if tcp is not None and tcp[0] in WILDCARD_HOSTS else endpoint


def node_address() -> str:
    """This process's node address in the Ray cluster (127.0.0.1 outside Ray)."""
    try:
        import ray

        return ray.util.get_node_ip_address()
    except Exception:  # noqa: BLE001 - outside Ray (tests of the class itself)
        return "127.0.0.1"
