"""Supervisor: runs the tracker in its own process and restarts it when it dies.

::

    summary = Supervisor(run_config).run()   # what `streamtrack run --publish ...` does

The tracker (capture thread + engine loop + publisher + control server,
:class:`streamtrack.pipeline.Tracker`) runs in a child process started with the
``spawn`` method (a fresh interpreter: no forked torch/ZeroMQ/thread state).
The supervisor subscribes to the child's own ``masks/<stream>`` topic and keeps
the newest non-empty mask of every object.  When the child dies (a crash, an
uncaught exception, SIGKILL, the OOM killer) or hangs (its loop sends no sign of
life for ``hang_timeout`` seconds: it is then killed, after printing its threads'
stacks), the supervisor waits a bounded, exponentially growing delay and starts a
new child that

* binds the same endpoints (so subscribers and control clients reconnect by
  themselves),
* seeds every object with its last mask on its first frame, so tracking
  continues with the same object ids,
* continues ``seq`` after the highest one published (received by the supervisor or
  reported by the tracker over its pipe),
* for a local file (paced or not; not looping), continues after the last frame the
  tracker reported published and written to its files (looping files and live sources
  just take the next frame they get), and
* queues again the control prompts the tracker had answered "queued" but whose frame's
  result was not out yet (the tracker reports them over its pipe).

What is not carried over: each object's memory bank (it restarts from the seed
mask) and a paused state.

User errors in the child (bad source, bad checkpoint, bad prompt file) are not
retried: :meth:`Supervisor.run` raises :class:`UserError` with the child's
message.  SIGINT/SIGTERM/SIGHUP stop the child gracefully (its outputs are
flushed), then escalate to SIGKILL after ``stop_timeout`` (at once on a second
Ctrl-C); the child also stops by itself if the supervisor disappears, so no
tracker outlives it.

The child reports milestones (endpoints bound, running, done, errors) to the
supervisor over a ``multiprocessing`` pipe; nothing crosses the network but
JSON.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from enum import Enum
from functools import partial
from multiprocessing import reduction
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

from streamtrack import childproc
from streamtrack.config import check_hang_timeout
from streamtrack.errors import HelperProcessError, UserError, dump_stacks_on_usr1
from streamtrack.pipeline import Resume, RunConfig, RunSummary, Tracker
from streamtrack.protocol import FrameResult, cross_process_endpoint, decode_mask, normalize_endpoint
from streamtrack.publisher import StatsWindow
from streamtrack.tracking import Prompt

log = logging.getLogger(__name__)

EXIT_USER_ERROR = 2  # the child's exit code for "do not restart me"
# Seconds a dead tracker's video part may stay in its emitter process's hands (which close
# it once they notice) before a restart goes by the tracker's reports instead.
VIDEO_WRITER_GONE_TIMEOUT = 15.0


class SupervisorGaveUp(RuntimeError):
    """The tracker kept dying: restart limit reached or it never got going."""


class TrackerState(str, Enum):
    """The supervised tracker process, as the supervisor sees it."""

    STARTING = "starting"  # process started, model loading
    RUNNING = "running"  # first frame can be processed
    BACKOFF = "backoff"  # died; waiting before the next start
    STOPPING = "stopping"  # asked to stop (signal or stop())
    DONE = "done"  # ended normally (source ended, max frames, stopped)
    FAILED = "failed"  # user error or gave up


@dataclass(frozen=True)
class SupervisorConfig:
    backoff_initial: float = 0.5  # s before the first restart
    backoff_max: float = 10.0  # s; the delay doubles up to this
    backoff_reset_after: float = 30.0  # s a child must run for the delay to start over
    max_restarts: int | None = None  # None = restart forever
    max_failed_starts: int = 5  # consecutive deaths before the first frame -> give up
    stop_timeout: float = 15.0  # s for a graceful stop before SIGKILL
    # s without a sign of life from a running tracker's loop before it counts as hung and is
    # killed (and restarted); 0 or None = never.  Longer than any step or output can take
    # (a CPU at full size with many objects, compiling a new object count on a GPU).
    hang_timeout: float | None = 300.0
    # s a tracker may take from its start to its first frame (the source opened, the model
    # read, built and warmed up: compiling with max-autotune is the slow case) before it
    # counts as hung; 0 or None = never.  Without it a tracker stuck in its start (storage
    # that stopped answering, a device that never initialises) would be waited for forever.
    start_timeout: float | None = 900.0
    log_level: int | None = None  # the child's logging level (default: this process's)

    def __post_init__(self) -> None:
        if not 0 < self.backoff_initial <= self.backoff_max:
            raise UserError("restart backoff needs 0 < initial <= max")
        if self.max_restarts is not None and self.max_restarts < 0:
            raise UserError(f"max restarts must be >= 0, got {self.max_restarts}")
        if self.max_failed_starts < 1 or self.stop_timeout <= 0:
            raise UserError("max_failed_starts must be >= 1 and stop_timeout > 0")
        check_hang_timeout(self.hang_timeout)
        if self.start_timeout is not None and not self.start_timeout >= 0:
            raise UserError(f"start_timeout must be 0 or null (never) or a number of seconds, "
                            f"got {self.start_timeout}")


@dataclass
class _Seen:
    """What the supervisor learned from the tracker's own masks stream."""

    seq: int | None = None
    frame_id: int | None = None
    pts: float | None = None
    masks: dict[int, dict[str, Any]] = field(default_factory=dict)  # obj_id -> RLE
    states: dict[int, str] = field(default_factory=dict)  # obj_id -> state in the newest result
    dropped: dict[str, int] = field(default_factory=dict)  # the newest result's drop counts
    # The last result the tracker itself reported as published and written to its files
    # (over its report pipe, which loses nothing): where a restart picks up.  The masks
    # stream can be behind it (a subscriber catching up) or ahead (files being written).
    emitted_seq: int | None = None
    emitted_frame_id: int | None = None
    emitted_pts: float | None = None
    # Control prompts answered "queued" (waiting for a frame), and those applied to a frame
    # whose result is not out yet (by that frame's seq): a restart queues them again.
    queued: dict[int, Prompt] = field(default_factory=dict)  # obj_id -> prompt, in order
    applied: list[tuple[int, list[Prompt]]] = field(default_factory=list)
    # The latency of the newest results: a tracker killed by a second Ctrl-C sends no summary.
    window: StatsWindow = field(default_factory=StatsWindow)

    def note_emitted(self, seq: int, frame_id: int, pts: float | None = None) -> None:
        self.emitted_seq, self.emitted_frame_id, self.emitted_pts = seq, frame_id, pts
        self.applied = [(s, ps) for s, ps in self.applied if s > seq]

    def unfinished_prompts(self) -> tuple[Prompt, ...]:
        """What a restarted tracker should queue: the newest prompt per object."""
        latest: dict[int, Prompt] = {}
        for p in [*(p for _, ps in self.applied for p in ps), *self.queued.values()]:
            latest.pop(p.obj_id, None)
            latest[p.obj_id] = p
        return tuple(latest.values())

    def note_prompts(self, kind: str, data: dict[str, Any]) -> None:
        """Follow the tracker's control queue: a prompt queued, unqueued (removed, or all
        by a reset: ``obj_id`` None), or applied to the frame of ``seq``; an object it was
        restarted with, unseeded (all: None) before its first frame."""
        if kind == "queued":
            prompt = data["prompt"]
            self.queued.pop(prompt.obj_id, None)
            self.queued[prompt.obj_id] = prompt
        elif kind == "unqueued":
            if data["obj_id"] is None:
                self.queued.clear()
            else:
                self.queued.pop(data["obj_id"], None)
        elif kind == "unseeded":  # dropped while a restarted tracker loaded: not to come back
            for obj_id in list(self.masks) if data["obj_id"] is None else [data["obj_id"]]:
                self.masks.pop(obj_id, None)
                self.states.pop(obj_id, None)
        elif kind == "applied":
            ids = data["obj_ids"]
            self.applied.append((data["seq"], [self.queued.pop(i) for i in ids if i in self.queued]))

    def update(self, result: FrameResult) -> None:
        self.seq, self.frame_id, self.pts = result.seq, result.frame_id, result.pts
        self.window.add(result)
        self.states = {o.obj_id: o.state for o in result.objects}
        self.dropped = dict(result.dropped)
        present = {o.obj_id for o in result.objects}
        # Objects missing from the newest result were removed (control): forget them.
        for obj_id in list(self.masks):
            if obj_id not in present:
                del self.masks[obj_id]
        for o in result.objects:
            # Keep the last mask that shows the object: an occluded object comes
            # back where it was last seen, instead of being seeded as absent.
            if o.rle is not None and (o.area > 0 or o.obj_id not in self.masks):
                self.masks[o.obj_id] = o.rle


class Supervisor:
    """Run ``config`` in a child process, restarting it as described above.

    ``run()`` blocks until the source ends, :meth:`stop` is called or a signal
    arrives, and returns the summary over all children.  Signal handlers are
    installed only when ``run()`` is called on the main thread.
    """

    def __init__(self, config: RunConfig, sup: SupervisorConfig | None = None) -> None:
        self.config = config
        self.sup = sup or SupervisorConfig()
        if config.publish is None:
            raise UserError("the supervisor re-seeds from the published masks: set a publish endpoint")
        for ep in (config.publish, config.control):
            if ep is not None:
                cross_process_endpoint(ep)
        self.state = TrackerState.STARTING
        self.restarts = 0
        self.pid: int | None = None  # the current child's
        self.endpoints: dict[str, str | None] = {}
        self.interrupted_by: int | None = None  # the signal that stopped us, if any
        self.on_state: Callable[[TrackerState], None] | None = None
        self.on_interrupt: Callable[[], None] | None = None  # the first Ctrl-C (to say so)
        self._stop = threading.Event()
        self._kill = threading.Event()  # a second Ctrl-C: no waiting for the frame in hand
        self._seen = _Seen()
        # What was at the path of the video part the current child writes when it started
        # (file_identity; () until a child starts, which no file matches).
        self._part_found: tuple[int, ...] | None = ()
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ control
    def stop(self, signum: int | None = None) -> None:
        """Ask the supervisor to stop the child and return (any thread, signal-safe).  A
        Ctrl-C after a first stop signal kills the child at once, as it would a tracker
        run in this process (a frame that takes seconds, a model still loading)."""
        if signum == signal.SIGINT:
            if self.interrupted_by is not None:  # a stop signal came before
                self._kill.set()
            elif self.on_interrupt is not None:
                self.on_interrupt()
        if self.interrupted_by is None:
            self.interrupted_by = signum
        self._stop.set()

    def _set_state(self, state: TrackerState) -> None:
        with self._lock:
            if state is self.state:
                return
            log.debug("tracker process: %s -> %s", self.state.value, state.value)
            self.state = state
        if self.on_state is not None:
            self.on_state(state)

    # --------------------------------------------------------------------- loop
    def run(self) -> RunSummary:
        restore = install_stop_signals(self.stop)
        childproc.quiet_resource_tracker()
        ctx = mp.get_context("spawn")
        total = RunSummary()
        started = time.monotonic()
        tracked = 0.0  # seconds the trackers ran, each from its "running" to its end
        sub = None
        backoff = self.sup.backoff_initial
        failed_starts = 0
        config = self.config
        try:
            while True:
                if self._stop.is_set():
                    break
                self._set_state(TrackerState.STARTING)
                self._note_video_part(config)
                child = _Child.start(ctx, config, self.sup.log_level)
                self.pid = child.proc.pid
                child_started = time.monotonic()
                running_since: float | None = None
                outcome = None
                looked = time.monotonic()
                while outcome is None:
                    if time.monotonic() - looked > _SUSPENDED_AFTER:
                        # This loop itself did not run (the whole run was suspended, Ctrl-Z,
                        # or the machine was): the tracker's silence is not its own.
                        child.last_report = time.monotonic()
                    looked = time.monotonic()
                    for kind, data in child.reports():
                        if kind == "bound":
                            config = self._pin_endpoints(config, data)
                            if sub is None:
                                sub = self._subscribe(config)
                        elif kind == "running":
                            self._set_state(TrackerState.RUNNING)
                            running_since = time.monotonic()
                        elif kind in _PROGRESS_REPORTS:
                            self._note_progress(child, kind, data)
                        elif kind in ("done", "user_error", "error"):
                            child.result = (kind, data)
                    self._drain(sub)
                    if child.hung is None and (limit := self._silence_limit()) \
                            and child.silent_for() > limit:
                        self._end_bar_line(child)
                        child.kill_hung(starting=self.state is TrackerState.STARTING)
                    if self._stop.is_set() and self.state is not TrackerState.STOPPING:
                        self._set_state(TrackerState.STOPPING)
                        child.stop(self.sup.stop_timeout)
                    if self._kill.is_set() and child.proc.is_alive():
                        child.proc.kill()
                    child.poll_stop()
                    if not child.proc.is_alive():
                        outcome = child.finish(partial(self._note_progress, child))
                    else:
                        child.proc.join(0.05)
                self._drain(sub)
                if running_since is not None:
                    tracked += time.monotonic() - running_since
                kind, data = outcome
                if kind == "done":
                    _add(total, RunSummary(**data))
                    self._set_state(TrackerState.DONE)
                    break
                if kind == "user_error":
                    self._set_state(TrackerState.FAILED)
                    raise UserError(data["message"])
                total.dropped = dict(self._seen.dropped)  # counted on by the next tracker
                total.objects = dict(self._seen.states)  # the last result's, until a tracker ends
                if self._stop.is_set():  # killed while stopping: that is a stop too
                    total.frames += child.emitted
                    total.interrupted = True
                    total.take_latency(self._seen.window)  # its results' (it sent no summary)
                    self._set_state(TrackerState.DONE)
                    break
                # The child died: crash, signal, OOM killer.
                total.frames += child.emitted
                ran = time.monotonic() - child_started
                # Dead before its first result: a model loaded is not a start that worked
                # (one that dies on every first frame would be restarted forever).
                failed_starts = 0 if child.emitted else failed_starts + 1
                if ran >= self.sup.backoff_reset_after:
                    backoff = self.sup.backoff_initial
                why = data.get("message") or child.hung or childproc.describe_exit(child.proc.exitcode)
                if not data.get("message"):  # killed: its progress bar's line was never ended
                    self._end_bar_line(child)
                if failed_starts >= self.sup.max_failed_starts:
                    self._set_state(TrackerState.FAILED)
                    raise SupervisorGaveUp(
                        f"tracker process died {failed_starts} times before processing a frame; "
                        f"last: {why}")
                if self.sup.max_restarts is not None and self.restarts >= self.sup.max_restarts:
                    self._set_state(TrackerState.FAILED)
                    raise SupervisorGaveUp(
                        f"tracker process died ({why}) and the restart limit "
                        f"({self.sup.max_restarts}) is reached")
                self.restarts += 1
                self._set_state(TrackerState.BACKOFF)
                log.warning("tracker process died (%s); restart %d in %.1f s",
                            why, self.restarts, backoff)
                if self._stop.wait(backoff):
                    total.interrupted = True
                    break
                backoff = min(backoff * 2, self.sup.backoff_max)
                config = replace(config, resume=self._resume(config, child.emitted, child.video_ids))
        finally:
            if sub is not None:
                sub.close()
            restore()
        total.seconds = time.monotonic() - started
        total.starting = max(0.0, total.seconds - tracked)  # starts, loads, waits to restart
        if self.interrupted_by is not None:
            total.interrupted = True
        return total

    def _silence_limit(self) -> float | None:
        """How long the current tracker may say nothing: from its start until it runs (it
        says nothing while it loads), then between two signs of life."""
        if self.state is TrackerState.STARTING:
            return self.sup.start_timeout
        return self.sup.hang_timeout if self.state is TrackerState.RUNNING else None

    def _end_bar_line(self, child: _Child) -> None:
        """End the line of a dead or dying tracker's progress bar (once), so that the
        warning about it gets a line of its own."""
        if self.config.progress_bar and not child.bar_line_ended:
            sys.stderr.write("\n")
            child.bar_line_ended = True

    def _note_progress(self, child: _Child, kind: str, data: dict[str, Any]) -> None:
        """What a restart needs to know: results out and in the files, and control prompts
        queued or applied to a frame."""
        if kind == "video":
            child.video_ids.append(data["frame_id"])
        elif kind == "emitted":
            child.emitted += 1
            self._seen.note_emitted(data["seq"], data["frame_id"], data.get("pts"))
        else:
            self._seen.note_prompts(kind, data)

    def _resume(self, config: RunConfig, emitted: int, video_ids: list[int] | None = None) -> Resume:
        """Seed masks and position for the next child, from the masks stream, with the
        control prompts it had not finished (it reports them again once it runs), after
        a child that reported ``emitted`` results written and handed the frames
        ``video_ids`` to its video part."""
        from streamtrack.outputs import file_identity, frames_in_video_part

        before = config.resume or Resume()
        part, through = before.video_part, before.video_through
        frames = None
        if (path := _video_part_file(config)) is not None:
            try:
                # Counted in the file: the tracker reports a frame a moment after it is in
                # there, and its emitter process may outlive it and close the part.  A file
                # the dead tracker left as it was is an earlier run's, not its part.
                frames = 0 if file_identity(path) == self._part_found else frames_in_video_part(
                    path, VIDEO_WRITER_GONE_TIMEOUT, self._stop)
            except TimeoutError:
                log.warning("the dead tracker's video part %s was still being written after %g s; "
                            "the video goes on in the next part", path, VIDEO_WRITER_GONE_TIMEOUT)
                return self._resumed(config, replace(before, video_part=part + 1))
        if frames is None:
            # By the reports: the video holds a frame until the next comes, so it is in the
            # part once the child reported one (a file's child reports a result once the
            # next is written) or two.
            part += emitted >= (1 if config.replayable_file else 2)
        elif frames:
            part += 1
            if config.replayable_file and video_ids:
                # The part holds the first ``frames`` of those the tracker handed to it (a
                # paced file's drops are not in it); each was said before it was written.
                through = video_ids[min(frames, len(video_ids)) - 1]
        return self._resumed(config, replace(before, video_part=part, video_through=through))

    def _resumed(self, config: RunConfig, before: Resume) -> Resume:
        """The next child's :class:`Resume`, with ``before``'s video part."""
        resume = replace(resume_from_seen(self._seen, before, self.restarts,
                                          written_only=config.replayable_file),
                         queued=self._seen.unfinished_prompts(),
                         video_part=before.video_part, video_through=before.video_through)
        self._seen.queued, self._seen.applied = {}, []
        return resume

    def _note_video_part(self, config: RunConfig) -> None:
        """Before a child starts: what is at the path of the video part it will write."""
        from streamtrack.outputs import file_identity

        if (path := _video_part_file(config)) is not None:
            self._part_found = file_identity(path)

    def _pin_endpoints(self, config: RunConfig, bound: dict[str, Any]) -> RunConfig:
        """Restarts bind exactly what the first child bound (port 0 resolved), so
        subscribers and control clients keep working."""
        self.endpoints = dict(bound)
        return replace(config, publish=bound.get("publish") or config.publish,
                       control=bound.get("control") or config.control)

    def _subscribe(self, config: RunConfig):
        from streamtrack.protocol import masks_topic
        from streamtrack.subscriber import Subscriber

        ep = normalize_endpoint(config.publish or "")
        ep = ep.replace("tcp://*:", "tcp://127.0.0.1:").replace("tcp://0.0.0.0:", "tcp://127.0.0.1:")
        # With CURVE the supervisor connects with the server's own key pair, which the
        # tracker's authenticator trusts (see streamtrack.curve).
        curve = config.curve.as_client() if config.curve is not None else None
        return Subscriber(ep, topics=[masks_topic(config.stream)], curve=curve)

    def _drain(self, sub) -> None:
        if sub is None:
            return
        while (msg := sub.recv(timeout=0)) is not None:
            if msg.result is not None and msg.stream == self.config.stream:
                self._seen.update(msg.result)


# What stops a run after its frame in hand, outputs flushed: Ctrl-C, a service manager's
# SIGTERM, and SIGHUP from a terminal that closed (its default would kill the run mid-frame;
# under `nohup`, which ignores it, it is left ignored).
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def install_stop_signals(stop: Callable[[int], None], *, interrupt_again: bool = False) -> Callable[[], None]:
    """Route SIGINT, SIGTERM and SIGHUP (the terminal closed) to ``stop(signum)``, called
    on a thread of its own; returns a function that puts the previous handlers back.
    With ``interrupt_again``, a SIGINT after a first stop signal raises KeyboardInterrupt
    in the main thread (quit at once, e.g. during a long model load).  Only the main
    thread may install handlers: elsewhere (e.g. a supervisor run from a test thread)
    this does nothing.

    Why a thread: a handler runs between two bytecodes of the main thread, which may hold
    a lock that ``stop`` takes (an Event's: a Ctrl-C's SIGINT and a SIGTERM right after it
    deadlocked in ``Event.set``).  The handler only writes the signal's number to a pipe."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    seen: list[int] = []

    def relay() -> None:
        while (data := os.read(read_end, 1)) and data != b"\0":
            stop(data[0])

    def handler(signum, frame):
        if interrupt_again and seen and signum == signal.SIGINT:
            raise KeyboardInterrupt
        seen.append(signum)
        try:
            os.write(write_end, bytes([signum]))
        except BlockingIOError:  # the pipe is full of stops already
            pass

    relaying = threading.Thread(target=relay, name="stop-signals", daemon=True)
    relaying.start()
    # A SIGHUP ignored from the start is `nohup`'s: the run is meant to outlive the terminal.
    previous = {s: signal.signal(s, handler) for s in STOP_SIGNALS
                if not (s == signal.SIGHUP and signal.getsignal(s) == signal.SIG_IGN)}

    def restore() -> None:
        for s, h in previous.items():
            signal.signal(s, h)
        os.write(write_end, b"\0")
        relaying.join(5)
        os.close(write_end)
        if not relaying.is_alive():
            os.close(read_end)

    return restore


def _video_part_file(config: RunConfig) -> Path | None:
    """The --save-video part a child started with ``config`` writes, or None."""
    from streamtrack.emitter import video_part_path

    if not config.save_video:
        return None
    return video_part_path(config.save_video, (config.resume or Resume()).video_part)


def _add(total: RunSummary, part: RunSummary) -> None:
    total.frames += part.frames
    total.waited += part.waited
    total.latency_p50, total.latency_p95 = part.latency_p50, part.latency_p95
    total.step_p50, total.read_ahead = part.step_p50, part.read_ahead
    total.dropped = part.dropped
    total.objects = part.objects
    total.source_state, total.source_error = part.source_state, part.source_error
    total.interrupted = total.interrupted or part.interrupted
    total.reader_gone = part.reader_gone


# ------------------------------------------------------------------------ child


# The supervisor's loop runs every 50 ms; a gap this long means it was suspended itself.
_SUSPENDED_AFTER = 5.0  # seconds

# Reports a tracker sends as it goes (besides its milestones), kept for a restart.
_PROGRESS_REPORTS = ("emitted", "video", "queued", "unqueued", "unseeded", "applied")


class _Child:
    """One tracker process and its two pipes (reports up, a lifeline down: the run's
    configuration, then nothing until its end of file says the supervisor is gone)."""

    def __init__(self, proc, reports: Connection, lifeline: Connection) -> None:
        self.proc = proc
        self._reports = reports
        self._lifeline = lifeline
        self.result: tuple[str, dict[str, Any]] | None = None
        self.emitted = 0  # results it reported published and written
        self.video_ids: list[int] = []  # the frames it handed to its video part, in order
        self.last_report = time.monotonic()  # the last sign of life from its loop
        self.hung: str | None = None  # why it was killed, if it was killed as hung
        self.bar_line_ended = False
        self._stop_sent_at: float | None = None
        self._stop_timeout = 0.0
        self._sender: threading.Thread | None = None

    @classmethod
    def start(cls, ctx, config: RunConfig, log_level: int | None) -> _Child:
        # The configuration goes down the lifeline, from a thread: it can be megabytes (a
        # restart's objects come back with their masks), more than a pipe holds, and a
        # child that dies before reading it all must not block the supervisor.  As a
        # Process argument it did: multiprocessing writes those with the pipe's read end
        # still open on this side, so the write waited forever.  Pickled here, before the
        # child starts: what cannot be pickled fails now, not as a child that never starts.
        payload = bytes(reduction.ForkingPickler.dumps(config))
        report_r, report_w = ctx.Pipe(duplex=False)
        life_r, life_w = ctx.Pipe(duplex=False)
        level = logging.getLogger().getEffectiveLevel() if log_level is None else log_level
        proc = ctx.Process(target=_child_main, args=(report_w, life_r, level),
                           name="streamtrack-tracker", daemon=False)
        # Ctrl-C ignored until the child installs its stop handlers.
        childproc.start_without_ctrl_c(proc)
        # Close our copies of the child's ends: EOF then means the other side is gone.
        report_w.close()
        life_r.close()
        child = cls(proc, report_r, life_w)
        child._sender = threading.Thread(target=child._send, args=(payload,), name="tracker-config",
                                         daemon=True)
        child._sender.start()
        return child

    def _send(self, payload: bytes) -> None:
        try:
            self._lifeline.send_bytes(payload)
        except (OSError, ValueError):  # the child is gone (its exit says how)
            pass

    def reports(self) -> list[tuple[str, dict[str, Any]]]:
        out = []
        try:
            while self._reports.poll(0):
                out.append(self._reports.recv())
        except (EOFError, OSError):
            pass
        # Signs of life come from the tracker's loop; results are reported from the
        # emitter's thread, which may go on a little while the loop is stuck.
        if any(kind in ("alive", "running") for kind, _ in out):
            self.last_report = time.monotonic()
        return out

    def silent_for(self) -> float:
        return time.monotonic() - self.last_report

    def kill_hung(self, starting: bool = False) -> None:
        """Kill a tracker whose loop stopped reporting (a deadlock, a device that never
        answers, a stopped process), or that never got to its first frame, after it printed
        its threads' stacks for a bug report."""
        silent = self.silent_for()
        if starting:
            self.hung = f"not started after {silent:.0f} s; killed as hung"
            log.warning("tracker process %d has not started tracking after %.0f s (source, model "
                        "load, warm-up): killing it as hung (its threads' stacks follow)",
                        self.proc.pid, silent)
        else:
            self.hung = f"no sign of life for {silent:.0f} s; killed as hung"
            log.warning("tracker process %d sent no sign of life for %.0f s: killing it as hung "
                        "(its threads' stacks follow)", self.proc.pid, silent)
        try:
            os.kill(self.proc.pid, signal.SIGUSR1)  # faulthandler: every thread's stack
            os.kill(self.proc.pid, signal.SIGCONT)  # a stopped process prints it once continued
        except ProcessLookupError:
            return
        self.proc.join(1.0)
        self.proc.kill()

    def stop(self, timeout: float) -> None:
        """Graceful first (SIGTERM: the tracker finishes its frame and flushes)."""
        if self._stop_sent_at is None:
            self._stop_sent_at = time.monotonic()
            self._stop_timeout = timeout
            if self.proc.is_alive():
                self.proc.terminate()

    def finish(self, on_progress: Callable[[str, dict[str, Any]], None]) -> tuple[str, dict[str, Any]]:
        self.proc.join()
        if self._sender is not None:  # done, or failing now that no one reads: then closed
            self._sender.join()
        childproc.remove_private_dirs_of(self.proc.pid)  # a killed tracker could not
        for kind, data in self.reports():  # anything sent just before exiting
            if kind in ("done", "user_error", "error"):
                self.result = (kind, data)
            elif kind in _PROGRESS_REPORTS:
                on_progress(kind, data)
        self._reports.close()
        self._lifeline.close()
        # A child that said "done" is done, whatever its interpreter did on the way out.
        return self.result if self.result is not None else ("died", {})

    def poll_stop(self) -> None:
        """Escalate to SIGKILL when a graceful stop takes too long."""
        if self._stop_sent_at is not None and self.proc.is_alive():
            if time.monotonic() - self._stop_sent_at > self._stop_timeout:
                log.warning("tracker process did not stop within %.0f s; killing it",
                            self._stop_timeout)
                self.proc.kill()


def _child_main(reports: Connection, lifeline: Connection, log_level: int) -> None:
    """Entry point of the tracker process."""
    logging.basicConfig(level=log_level, format="%(levelname)s %(name)s[tracker]: %(message)s")
    try:
        config: RunConfig = lifeline.recv()
    except (EOFError, OSError):  # the supervisor is gone before it sent the run
        os._exit(1)
    tracker: Tracker | None = None

    sending = threading.Lock()  # results are reported from the emitter's thread

    def report(kind: str, data: dict[str, Any]) -> None:
        try:
            with sending:
                reports.send((kind, data))
        except (OSError, ValueError):  # supervisor gone: the lifeline stops us
            pass

    def stop(*_: object) -> None:
        if tracker is not None:
            tracker.stop()
        else:  # still loading: nothing to flush
            os._exit(0)

    def watch_lifeline() -> None:
        # The supervisor writes nothing after the configuration; recv() returns only with
        # EOF, i.e. when the supervisor process is gone (even after SIGKILL): do not outlive it.
        try:
            lifeline.recv()
        except (EOFError, OSError):
            pass
        stop()
        time.sleep(15)
        os._exit(1)

    install_stop_signals(stop)  # Ctrl-C was ignored until now (see _Child.start)
    dump_stacks_on_usr1()  # the tracker's pid is in the control `status` reply
    threading.Thread(target=watch_lifeline, name="lifeline", daemon=True).start()
    try:
        tracker = Tracker(config, notify=report)
        summary = tracker.run()
    except UserError as exc:
        report("user_error", {"message": str(exc)})
        reports.close()
        os._exit(EXIT_USER_ERROR)
    except BaseException as exc:  # a crash: the supervisor restarts us
        report("error", {"message": f"{type(exc).__name__}: {exc}"})
        if not isinstance(exc, HelperProcessError):  # its message says it all
            traceback.print_exc()
        reports.close()
        os._exit(1)
    report("done", asdict(summary))
    reports.close()


# Public name of what a restarter keeps per stream (the fleet driver keeps one per stream too).
SeenMasks = _Seen


def resume_from_seen(seen: _Seen, before: Resume, restarts: int, written_only: bool = False) -> Resume:
    """Seed masks and position for a restarted tracker, from what ``seen`` kept of its
    masks stream; ``before`` is the :class:`Resume` the dead tracker was started with.
    ``written_only``: continue only after what the tracker reported in its files (a file
    read frame by frame, whose frames can be processed again), never after what was only
    published."""
    published = [s for s in (seen.seq, seen.emitted_seq) if s is not None]
    # Sequence numbers are never used twice: a frame processed again gets a new one.
    seq_start = max(published) + 1 if published else before.seq_start
    if seen.seq is None or (written_only and seen.emitted_seq is None):
        # No masks to seed from yet, or none of this tracker's results in the files (its
        # video holds the first frame until the second): start over as configured.
        return replace(before, restarts=restarts, seq_start=seq_start)
    seed = tuple(Prompt(obj_id=k, mask=decode_mask(rle)) for k, rle in sorted(seen.masks.items()))
    # A live source's ids go on after the newest one published (a file read frame by frame
    # continues at its own frame numbers, skip_to_frame).
    ids = [f for f in (seen.frame_id, seen.emitted_frame_id) if f is not None]
    # Continue after the last frame that is in the files too (a frame published but not
    # yet written when the tracker died is processed again), or, with no word from the
    # tracker itself, after the last frame received.
    at_seq, at_frame, at_pts = ((seen.emitted_seq, seen.emitted_frame_id, seen.emitted_pts)
                                if seen.emitted_seq is not None else (seen.seq, seen.frame_id, seen.pts))
    done = at_seq + 1 - before.seq_start + before.frames_done
    return Resume(seed=seed, frames_done=done, skip_to_frame=(at_frame or 0) + 1, skip_to_pts=at_pts,
                  seq_start=seq_start, restarts=restarts,
                  frame_id_start=max(ids) + 1 if ids else before.frame_id_start,
                  dropped_before=dict(seen.dropped),
                  object_states={k: v for k, v in seen.states.items() if k in seen.masks})


def seed_from_masks(masks: dict[int, np.ndarray]) -> Resume:
    """A :class:`Resume` that starts a tracker from known masks (object id -> bool HxW)."""
    return Resume(seed=tuple(Prompt(obj_id=k, mask=np.asarray(m, bool)) for k, m in sorted(masks.items())))
