"""The tracking loop: capture -> engine -> results (publisher, writers), with control.

``Tracker(config).run()`` runs until the source ends, ``max_frames`` is reached or
it is stopped/interrupted, and returns a :class:`RunSummary`.  Outputs are closed
in a ``finally`` so Ctrl-C leaves complete files.

Besides one ``masks/<stream>`` message per frame the tracker publishes
``status/<stream>`` events (source and object state changes, tracker start,
applied and rejected control prompts), ``stats/<stream>`` about once a second and, if asked,
``frames/<stream>`` JPEG previews.  A :class:`Resume` carries what a supervisor
hands a restarted tracker: seed masks for the first frame, where to resume a
file, and the ``seq`` to continue from (see :mod:`streamtrack.supervisor`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from streamtrack.capture import CaptureConfig, CaptureStats, Frame, SourceKind, SourceState, open_source
from streamtrack.capture import StatusEvent as SourceEvent
from streamtrack.capture_process import check_decode_mode
from streamtrack.config import Config
from streamtrack.curve import CurveServer, server_from_options
from streamtrack.emitter import EmitterError, OutputsConfig, check_emit_mode, make_emitter
from streamtrack.errors import PromptError, ReaderGone, UserError, same_file
from streamtrack.models import checkpoint_path
from streamtrack.outputs import MASK_PNG_MAX_ID
from streamtrack.protocol import FrameResult, ObjectResult, Timestamps, normalize_endpoint, now, system_port
from streamtrack.publisher import StatsWindow
from streamtrack.sources import ffmpeg_file, parse_source, redact_url, video_stream
from streamtrack.tracking import (
    MAX_OBJ_ID,
    EngineConfig,
    FrameOutput,
    Prompt,
    check_mask_shape,
    check_prompt,
)

if TYPE_CHECKING:  # torch: imported in the tracker's process only, when the model loads
    from streamtrack.engine import PendingStep, StreamingEngine

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Resume:
    """How a (re)started tracker picks up where a previous one stopped.

    ``seed`` prompts (masks, one per object) are applied on the first processed
    frame, so objects keep their ids.  ``frames_done`` frames count as already
    processed (prompts keyed by frame and ``max_frames`` keep their meaning);
    ``skip_to_frame`` (file sources only) skips source frames before it, so a file
    continues after the last frame whose result was published.
    """

    seed: tuple[Prompt, ...] = ()
    frames_done: int = 0
    skip_to_frame: int = 0
    # The pts (seconds) of frame skip_to_frame - 1, if the results gave one: a file seeks
    # there rather than decoding every frame before it.
    skip_to_pts: float | None = None
    seq_start: int = 0
    restarts: int = 0
    # Control prompts the dead tracker had answered "queued" but whose frame's result was
    # not out yet: queued again, so an acknowledged prompt is not lost to a crash.
    queued: tuple[Prompt, ...] = ()
    # What the results said so far, continued by a restarted tracker: a live source's next
    # frame id (ids are never reused; a paced file skips to that frame), the drop counts,
    # and each object's state (so that object_state events report changes, not every
    # re-seeded object as new).
    frame_id_start: int = 0
    dropped_before: dict[str, int] = field(default_factory=dict)
    object_states: dict[int, str] = field(default_factory=dict)
    # The --save-video part this tracker writes: 1 is NAME.mp4, then NAME.part2.mp4, ...
    # (a tracker whose part got no frame leaves its number to the next).
    video_part: int = 1
    # A file's last frame id in the earlier parts: frames the dead tracker wrote to its
    # part but had not reported are processed again, and not written to the video twice.
    video_through: int = -1


@dataclass
class RunConfig:
    source: str
    engine: EngineConfig = field(default_factory=EngineConfig)
    prompts: dict[int, list[Prompt]] = field(default_factory=dict)  # frame -> prompts
    stream: str = "cam0"
    save_jsonl: str | None = None
    save_masks: str | None = None
    save_video: str | None = None
    publish: str | None = None
    control: str | None = None
    max_frames: int | None = None
    realtime: bool = False
    progress: bool = True
    capture: CaptureConfig | None = None
    publish_frames: bool = False  # JPEG previews on frames/<stream>, for remote viewers
    loop: bool = False  # files: start over at the end (demos, soak tests)
    resume: Resume | None = None  # set by the supervisor on a restart (or to seed masks)
    # Files with no prompt yet (run --show): hold the first frame, republishing it,
    # until a prompt arrives over the control channel, instead of racing through.
    wait_for_prompt: bool = False
    curve: CurveServer | None = None  # CURVE encryption + client keys on publish/control
    # Where RLE, publishing and the files run: "thread" or "process" (see emitter.py).
    emit: str = "thread"
    # Where the source is decoded and converted to RGB: "thread" or "process"
    # (see capture_process.py).
    decode: str = "thread"
    # Launch the next frame's device work before finishing this one, when that frame is
    # already waiting (a GPU then works while the host builds results); see run().
    launch_ahead: bool = False
    # Warn when publish/control bind an interface other machines reach (a fleet's driver
    # does it once for all its streams instead).
    warn_exposed: bool = True
    # Other files the run reads, as (what, path) (a prompts file): no output may be one.
    read_files: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        check_emit_mode(self.emit)
        check_decode_mode(self.decode)
        if self.publish and self.control:
            endpoint = normalize_endpoint(self.publish)
            if endpoint == normalize_endpoint(self.control) and not system_port(endpoint):
                raise UserError(f"--publish and --control are the same endpoint {endpoint}: "
                                "give each its own port")
        source = _local_file(self.source)
        outputs = [(what, out) for what, out in (("--save-jsonl", self.save_jsonl),
                                                 ("--save-video", self.save_video),
                                                 ("--save-masks", self.save_masks)) if out]
        inputs = [("the source video", source),
                  ("the model's checkpoint", checkpoint_path(self.engine.model, self.engine.checkpoint)),
                  *self.read_files]
        for i, (what, out) in enumerate(outputs):
            for name, path in inputs:
                if path is not None and same_file(out, path):
                    raise UserError(f"{what} {out} is {name}, which it would overwrite: "
                                    "write the results elsewhere")
            for other, other_out in outputs[i + 1:]:
                if same_file(out, other_out):  # both writers in one file: neither readable
                    raise UserError(f"{what} {out} and {other} {other_out} are the same path: "
                                    "give each output its own")
        ids = {p.obj_id for frame_prompts in self.prompts.values() for p in frame_prompts}
        if self.save_masks and ids and max(ids) > MASK_PNG_MAX_ID:
            raise UserError(f"object {max(ids)}: --save-masks stores object ids up to {MASK_PNG_MAX_ID}")
        if len(ids) > self.engine.max_objects:
            raise UserError(f"the prompts name {len(ids)} objects and max_objects is "
                            f"{self.engine.max_objects}: raise it (--max-objects) or prompt fewer")

    @classmethod
    def from_config(cls, cfg: Config, source: str, prompts: dict[int, list[Prompt]],
                    progress: bool = True, read_files: tuple[tuple[str, str], ...] = ()) -> RunConfig:
        """The run described by a merged :class:`~streamtrack.config.Config`."""
        engine = EngineConfig(
            model=cfg.model, checkpoint=cfg.checkpoint, device=cfg.device, image_size=cfg.image_size,
            preprocess=cfg.preprocess, max_cond_frames=cfg.max_cond_frames, lost_after=cfg.lost_after,
            fill_hole_area=cfg.fill_hole_area, compile=cfg.compile,
            compile_mode=cfg.compile_mode, max_objects=cfg.max_objects,
        )
        capture = CaptureConfig(
            queue_depth=cfg.queue_depth, realtime=cfg.realtime, loop=cfg.loop,
            reconnect_max=cfg.reconnect_max, stale_after=cfg.stale_after,
            give_up_after=cfg.give_up_after, name=cfg.stream,
        )
        return cls(
            source=source, engine=engine, prompts=prompts, stream=cfg.stream,
            save_jsonl=cfg.save_jsonl, save_masks=cfg.save_masks, save_video=cfg.save_video,
            publish=cfg.publish, control=cfg.control, max_frames=cfg.max_frames, realtime=cfg.realtime,
            progress=progress, capture=capture, publish_frames=cfg.publish_frames, loop=cfg.loop,
            curve=server_from_options(cfg.curve_secret, cfg.curve_clients), emit=cfg.emit,
            decode=cfg.decode, launch_ahead=cfg.launch_ahead,
            read_files=(*read_files, *([("the CURVE secret key file", cfg.curve_secret)]
                                       if cfg.curve_secret else [])),
        )

    @property
    def outputs(self) -> OutputsConfig:
        return OutputsConfig(
            stream=self.stream, publish=self.publish, save_jsonl=self.save_jsonl, save_masks=self.save_masks,
            save_video=self.save_video, publish_frames=self.publish_frames,
            restarts=self.resume.restarts if self.resume else 0, curve=self.curve,
            video_part=self.resume.video_part if self.resume else 1,
            video_through=self.resume.video_through if self.resume else -1,
            continued=bool(self.resume and (self.resume.frames_done or self.resume.skip_to_frame)),
        )

    @property
    def progress_bar(self) -> bool:
        """Whether a run shows a progress bar on stderr (a local file's; live sources have none)."""
        return self.progress and _local_file(self.source) is not None

    @property
    def resumable_file(self) -> bool:
        """A file read at decode speed, frame by frame (its frames wait in the queue by
        design, and its own time is its clock)."""
        return self.replayable_file and not self.realtime

    @property
    def replayable_file(self) -> bool:
        """A local file, not looping: a restart continues exactly after the last frame
        written, processing again what was published but not written (a paced file skips
        the frames before, unpaced).  Looping files behave like live sources."""
        return _local_file(self.source) is not None and not self.loop


@dataclass
class RunSummary:
    frames: int = 0
    seconds: float = 0.0
    latency_p50: float | None = None  # capture -> result, seconds
    latency_p95: float | None = None
    step_p50: float | None = None  # the engine's step, seconds
    read_ahead: bool = False  # a file read at decode speed: frames wait in the queue by design
    dropped: dict[str, int] = field(default_factory=dict)
    objects: dict[int, str] = field(default_factory=dict)  # final state per object
    source_state: str = ""
    source_error: str = ""  # why the source failed (gave up reconnecting, a fatal read error)
    interrupted: bool = False
    waited: float = 0.0  # seconds of ``seconds`` a file's first frame waited for a first prompt
    # Seconds of ``seconds`` before tracking (the model's load and warm-up; under a
    # supervisor, each tracker process's start and the waits before restarts).
    starting: float = 0.0
    # What ended the run early: the reader of an output written to a pipe went away.
    reader_gone: str = ""

    @property
    def fps(self) -> float:
        """Frames per second tracked: neither the start nor the wait for a first prompt."""
        tracking = self.seconds - self.starting - self.waited
        return self.frames / tracking if tracking > 0 else 0.0

    def take_latency(self, window: StatsWindow) -> None:
        """The latency (capture to publish) and step time of ``window``'s results."""
        latency = window.latency()
        if "total" in latency:
            self.latency_p50, self.latency_p95 = latency["total"].p50, latency["total"].p95
        if "infer" in latency:
            self.step_p50 = latency["infer"].p50

    def source_failure(self, source: str) -> str | None:
        """The one-line error for a run whose source failed on its own after streaming (a
        camera given up on after ``give_up_after``): a runtime failure, not a run done.
        None when the source ended, or the run was stopped."""
        if self.source_state != SourceState.FAILED.value or self.interrupted:
            return None
        return f"source {redact_url(source)!r} failed after {self.frames} frames: {self.source_error}"

    def line(self) -> str:
        if self.read_ahead and self.step_p50 is not None:
            # Capture -> result would count the decoder's read-ahead, not tracking delay.
            lat = f"step p50 {self.step_p50 * 1000:.0f} ms"
        elif self.latency_p50 is not None:
            lat = f"latency p50 {self.latency_p50 * 1000:.0f} ms p95 {self.latency_p95 * 1000:.0f} ms"
        else:
            lat = "latency n/a"
        drops = sum(self.dropped.values())
        objs = ", ".join(f"{k}:{v}" for k, v in sorted(self.objects.items())) or "none"
        how = " (interrupted)" if self.interrupted else f" ({self.reader_gone})" if self.reader_gone else ""
        untracked = [(s, what) for s, what in ((self.starting, "starting"),
                                               (self.waited, "waiting for a prompt")) if s >= 0.05]
        of_it = "".join(f"; {s:.1f} s of it {what}" if i == 0 else f", {s:.1f} s {what}"
                        for i, (s, what) in enumerate(untracked))
        return (f"{self.frames} frames in {self.seconds:.1f} s ({self.fps:.2f} fps{of_it}), {lat}, "
                f"{drops} dropped, objects {objs}{how}")


class _Controls:
    """Control-channel handler: requests are queued and applied on the next frame.

    A prompt is checked against the size of the frames seen so far before it is
    queued, so a point outside the frame is answered ``ok: false`` at once instead
    of failing later inside the engine.
    """

    def __init__(self, tracker: Tracker):
        self.tracker = tracker
        self.pending: list[Prompt] = []
        self.paused = False

    def add_prompt(self, cmd):
        size = self.tracker.frame_size
        if cmd.mask is not None:
            # Checked before expanding it: a few bytes of RLE can stand for a gigapixel mask.
            if size is None:
                raise PromptError(f"object {cmd.obj_id}: a mask prompt is checked against the frame, and "
                                  "no frame has come yet; send it again once one has")
            check_mask_shape(cmd.obj_id, cmd.mask["size"], *size)
        engine, cfg = self.tracker.engine, self.tracker.config
        known = set(engine.object_ids if engine is not None else ()) | {p.obj_id for p in self.pending}
        # Room is kept for the prompts file's objects still to come: refusing one of those
        # later would stop the run.
        later = {p.obj_id for f in self.tracker._prompt_frames for p in cfg.prompts[f]}
        if cmd.new and cmd.obj_id in known | later:
            # Two viewers each picked the next id for their new object: the second gets
            # another one, instead of replacing the first one's object.
            highest = MASK_PNG_MAX_ID if cfg.save_masks else MAX_OBJ_ID  # what the outputs store
            cmd = replace(cmd, obj_id=_next_free_id(known | later, highest))
        if cfg.save_masks and cmd.obj_id > MASK_PNG_MAX_ID:  # the PNG writer would stop the run
            raise PromptError(f"object {cmd.obj_id}: --save-masks stores object ids up to {MASK_PNG_MAX_ID}")
        if cmd.obj_id not in known | later and len(known | later) >= cfg.engine.max_objects:
            what = "a new object" if cmd.new else f"object {cmd.obj_id}"  # not an id it never sent
            raise PromptError(f"{what}: {len(known | later)} objects are tracked, queued or "
                              f"prompted later by the prompts file, and max_objects is "
                              f"{cfg.engine.max_objects}; remove one first")
        prompt = Prompt.make(cmd.obj_id, cmd.points, cmd.labels, cmd.box, cmd.mask_array())
        if size is not None:
            check_prompt(prompt, *size)
        self.pending = [p for p in self.pending if p.obj_id != prompt.obj_id]
        self.pending.append(prompt)
        self.tracker._removed.discard(prompt.obj_id)  # back: its next result says how it is
        self.tracker._notify("queued", {"prompt": prompt})  # each prompt once (masks are big)
        return {"queued_for_frame": self.tracker.next_seq, "obj_id": prompt.obj_id}

    def remove_object(self, obj_id):
        tracker = self.tracker
        queued = any(p.obj_id == obj_id for p in [*self.pending, *tracker._carried])
        # An object whose first prompt is still queued is cancelled, not left to appear.
        self.pending = [p for p in self.pending if p.obj_id != obj_id]
        if queued:
            tracker._notify("unqueued", {"obj_id": obj_id})
        engine = tracker.engine
        if engine is None:
            # Loading after a restart: an object it would bring back is dropped now.
            restored = any(p.obj_id == obj_id for p in tracker._seed)
            tracker._seed = [p for p in tracker._seed if p.obj_id != obj_id]
            tracker._carried = [p for p in tracker._carried if p.obj_id != obj_id]
            if restored:
                tracker._removed.add(obj_id)
                tracker._notify("unseeded", {"obj_id": obj_id})  # nor after another restart
            if queued or restored:
                return {"objects": sorted({p.obj_id for p in tracker._seed})}
        elif queued and obj_id not in engine.object_ids:
            return {"objects": engine.object_ids}
        engine = tracker.require_engine()
        engine.remove_object(obj_id)
        self.tracker._removed.add(obj_id)
        return {"objects": engine.object_ids}

    def reset(self):
        tracker = self.tracker
        if self.pending or tracker._carried:
            self.pending.clear()
            tracker._notify("unqueued", {"obj_id": None})  # all of them
        # Loading after a restart: what it would bring back on the first frame goes too.
        if tracker._seed:
            tracker._notify("unseeded", {"obj_id": None})
        tracker._seed, tracker._carried = [], []
        tracker._removed.update(tracker._object_states)
        if tracker.engine is not None:
            tracker._removed.update(tracker.engine.object_ids)
            tracker.engine.reset()
        return {"objects": []}

    def status(self):
        return self.tracker.status()

    def pause(self):
        # Subscribers see masks and stats stop: this tells them why.  While the model
        # loads the tracker is not running yet; it says it is paused once it starts.
        if not self.paused and self.tracker.engine is not None:
            self.tracker.publish_status("tracker_state", old="running", new="paused")
        self.paused = True
        return {"paused": True}

    def resume(self):
        if self.paused and self.tracker.engine is not None:
            self.tracker.publish_status("tracker_state", old="paused", new="running")
        self.paused = False
        return {"paused": False}


# Called with (kind, data) at milestones of a run: "bound" (endpoints), "running"
# (model loaded).  The supervisor forwards them to its process over a pipe.
Notify = Callable[[str, dict[str, Any]], None]

# How long one loop iteration may spend answering control requests: a flood of
# (bad) requests gets answered quickly without starving the engine.
_CONTROL_BUDGET = 0.25  # seconds
# How often the loop tells a supervisor it is alive (idle, paused or tracking); the
# supervisor kills a tracker that stays silent for its hang timeout.
ALIVE_EVERY = 1.0  # seconds


def _local_file(source: str) -> Path | None:
    """The file a source reads, if it is one (a path, or a ``file://`` URL), as the capture
    reads the source string."""
    try:
        spec = parse_source(source)
    except UserError:
        return None
    return Path(spec.target) if spec.kind is SourceKind.FILE else None


def _serve_control(control, wait_ms: int) -> None:
    control.poll_once(wait_ms, max_requests=1024, budget_s=_CONTROL_BUDGET)


@contextlib.contextmanager
def _answering(control):
    """Answer control requests on a thread meanwhile (the model loading, seconds to
    minutes): ``status`` works, prompts queue, the rest says the model is loading.  The
    tracker's thread takes the socket back afterwards (the join orders the two)."""
    if control is None:
        yield
        return
    stop = threading.Event()
    thread = threading.Thread(target=control.serve, args=(stop, 50), name="control-while-loading",
                              daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


class LoopTimes:
    """Where the tracker's thread spends a frame, in seconds, over the last ``keep`` frames:
    ``read`` (the hand-off: from asking the capture for a frame, or from the frame's
    decoding if that came later, until it is in hand; not the idle wait), ``launch`` and
    ``finish`` (the engine's two halves, as the bare engine's step splits), ``hand_over``
    (building the result and giving it to the emitter).  Benchmarks set these beside
    the bare engine's own, so a slower pipeline shows which part grew."""

    PHASES = ("read", "launch", "finish", "hand_over")

    def __init__(self, keep: int = 1000) -> None:
        self.seconds: dict[str, deque[float]] = {name: deque(maxlen=keep) for name in self.PHASES}
        self.recorded = dict.fromkeys(self.PHASES, 0)  # samples ever, kept or not

    def add(self, phase: str, since: float) -> float:
        """Record the time from ``since`` (``perf_counter``) to now; returns now."""
        t = time.perf_counter()
        self.record(phase, t - since)
        return t

    def record(self, phase: str, seconds: float) -> None:
        self.seconds[phase].append(seconds)
        self.recorded[phase] += 1

    def medians_ms(self, skip_first: int = 0) -> dict[str, float]:
        """Median milliseconds per phase, leaving out the run's first ``skip_first``
        samples of each (a benchmark's warm-up frames) where they are still kept."""
        out = {}
        for name, kept in self.seconds.items():
            skip = max(0, skip_first - (self.recorded[name] - len(kept)))
            if len(kept) > skip:
                out[name] = float(np.median(list(kept)[skip:])) * 1000
        return out


class Tracker:
    """One source, one engine, its outputs.  Not thread-safe: run it on one thread
    (``stop()`` is the exception: any thread or a signal handler may call it)."""

    def __init__(self, config: RunConfig, engine: StreamingEngine | None = None,
                 notify: Notify | None = None):
        self.config = config
        self.engine = engine  # built in run(), after the source has opened
        resume = config.resume or Resume()
        self.frames_seen = resume.frames_done
        # The prompts file's frames still to come, by the source's frame id: a frame that
        # was dropped (a live source, --realtime) passes its prompts on to the next one
        # processed.  A restarted tracker continues where it restarts the source.
        applied_below = resume.skip_to_frame if config.replayable_file else resume.frame_id_start
        self._prompt_frames = sorted(f for f in config.prompts if f >= applied_below)
        self._last_frame_id: int | None = None
        self._pts_span: tuple[float, float] | None = None  # first and last pts tracked
        self.frame_size: tuple[int, int] | None = None  # (height, width) of the last frame
        self.window = StatsWindow(stream=config.stream)
        self._stop = threading.Event()
        self._stop_announced = False
        self._holding = False  # a file's first frame waits for the first prompt
        self._file_prompts_checked = False
        # Only the first: with its objects all removed later, a file goes on, publishing
        # frames without objects (a script that removes them and waits for the end would
        # wait forever).  A restarted tracker had its first prompt before.
        self._had_objects = bool(resume.frames_done)
        self._waited = 0.0  # seconds it waited
        self._released: tuple[float, float] | None = None  # when (wall, monotonic) it was prompted
        self._seq = resume.seq_start
        self._object_states: dict[int, str] = dict(resume.object_states)
        # Removed by the control channel and not prompted since, while results still have
        # them (a frame launched before the removal): the control status leaves them out.
        self._removed: set[int] = set()
        self._dropped_before = dict(resume.dropped_before)
        # What a restart brings back on the first frame: the objects' last masks, and the
        # prompts queued before it.  The control channel may drop them while the model loads.
        self._seed: list[Prompt] = list(resume.seed)
        self._carried: list[Prompt] = list(resume.queued)
        self._written_before: dict[str, int] | None = None  # the last result not yet in the video
        self._results_out = 0  # results published and written
        self._reports_video = bool(config.save_video) and config.replayable_file
        self._video_through = resume.video_through
        self.capture = None
        self._give_up_after: float | None = None  # the live source's, once run() opens it
        self._controls = _Controls(self)
        self._notify = notify or (lambda kind, data: None)
        self._publisher = None  # set once the outputs exist; used by the capture thread too
        self._last_stats = 0.0  # when stats/<stream> was last published
        self._stats_lock = threading.Lock()  # the window: results on the emitter's thread
        self._video_clock = False  # lost_after counts the file's own time (pts)
        self._video_time_last: tuple[float, float] | None = None  # (last time, a frame's step)
        self._video_time_offset = 0.0  # added to pts that went back (clips joined), keeping time going
        self._in_flight: _InFlight | None = None  # launched, not finished (launch_ahead)
        self.loop_times = LoopTimes()
        self._alive_sent = 0.0  # monotonic time of the last "alive" report

    def stop(self) -> None:
        self._stop.set()

    @property
    def next_seq(self) -> int:
        """The ``seq`` of the next frame to launch (its result's, in ``masks/<stream>``)."""
        return self._seq + (self._in_flight is not None)

    def require_engine(self) -> StreamingEngine:
        if self.engine is None:
            raise UserError("the model is still loading; try again in a moment")
        return self.engine

    def status(self) -> dict:
        """The control ``status`` reply.  ``objects``: each object's state in the last
        result, less those removed since (a paused tracker has no next result to say so);
        ``queued``: the objects whose prompts wait for the next frame."""
        return {
            "frames": self.frames_seen,
            "objects": {str(k): v for k, v in self._object_states.items() if k not in self._removed},
            "queued": sorted({p.obj_id for p in self._controls.pending}),
            "source_state": self.capture.state.value if self.capture else "idle",
            "paused": self._controls.paused,
            "pid": os.getpid(),
            "restarts": (self.config.resume or Resume()).restarts,
        }

    def run(self) -> RunSummary:
        cfg = self.config
        resume = cfg.resume or Resume()
        cap_cfg = cfg.capture or CaptureConfig(realtime=cfg.realtime, loop=cfg.loop, name=cfg.stream)
        if cfg.replayable_file:
            # A file goes on after the last frame written, not from its start; its frames'
            # ids are their numbers in it.
            cap_cfg = replace(cap_cfg, first_frame_id=resume.skip_to_frame, skip_frames=resume.skip_to_frame,
                              skip_to_pts=resume.skip_to_pts if resume.skip_to_frame else None)
        else:  # a live source's ids go on after the last published
            cap_cfg = replace(cap_cfg, first_frame_id=resume.frame_id_start)
        # The capture thread may report a failed connection before open_source returns.
        self._give_up_after = cap_cfg.give_up_after
        self.capture = open_source(cfg.source, cap_cfg, on_status=self._on_source_status,
                                   decode=cfg.decode)
        # What a file's header says: the progress bar's total, a file cut short, and the
        # rate of a video that gets one frame.  A loop has no end.
        local = _local_file(cfg.source)
        header = _declared(str(local)) if local is not None and (cfg.save_video or not cfg.loop) else None
        declared = None if cfg.loop else header
        outputs = cfg.outputs
        if cfg.save_video and header is not None and header.fps:
            outputs = replace(outputs, fps=header.fps)
        emitter = make_emitter(cfg.emit, outputs, self._on_published)
        self._publisher = emitter.publisher
        control = bar = None
        console = contextlib.ExitStack()
        summary = RunSummary()
        started = time.monotonic()
        running_since: float | None = None
        try:
            if cfg.control:
                from streamtrack.control import ControlServer

                control = ControlServer(cfg.control, self._controls, curve=cfg.curve)
            bound = {"publish": emitter.publisher.endpoint if emitter.publisher else None,
                     "control": control.endpoint if control else None}
            self._notify("bound", bound)
            # Once bound: a host that cannot be bound is an error, not a warning that it is exposed.
            if cfg.warn_exposed and resume.restarts == 0 and cfg.curve is None:  # once; CURVE authenticates
                for what, ep in bound.items():
                    if ep:
                        warn_if_exposed(ep, what)
            for what, given in (("publish", cfg.publish), ("control", cfg.control)):
                # Nobody can connect to a port the system picked until it is told which (a
                # fleet lists its streams' endpoints itself).
                picked = given and system_port(normalize_endpoint(given))
                if picked and cfg.warn_exposed and not resume.restarts:
                    log.warning("%s: bound %s (the port was left to the system)", what, bound[what])
            self.capture.start()  # a missing file or camera fails here, before the slow model load
            if self.engine is None:
                with _answering(control):
                    from streamtrack.engine import StreamingEngine  # torch: the tracker's process only

                    engine = StreamingEngine.from_config(cfg.engine)
                    # Compilation and kernel selection now, not on the first live frame.
                    seconds = engine.warmup_once()
                self.engine = engine
                if seconds is not None:
                    log.info("model warmed up in %.1f s", seconds)
            self.publish_status("tracker_state", old="starting", new="running",
                                restarts=resume.restarts, resumed_at_frame=self.frames_seen)
            if self._controls.paused:  # paused while the model loaded
                self.publish_status("tracker_state", old="running", new="paused")
            self._notify("running", {"pid": os.getpid()})
            running_since = time.monotonic()
            self._video_clock = cfg.resumable_file
            seed, self._seed = self._seed, []
            if self._carried:  # before those sent while this tracker loaded, which win
                loaded = {p.obj_id for p in self._controls.pending}
                carried = [p for p in self._carried if p.obj_id not in loaded]
                self._carried = []  # queued from here on, like any other
                self._controls.pending = [*carried, *self._controls.pending]
                for p in carried:  # a supervisor keeps them until their frame is out
                    self._notify("queued", {"prompt": p})
            bar = _progress(cfg, declared.frames if declared else None)
            if bar is not None:
                from tqdm.contrib.logging import logging_redirect_tqdm

                # Warnings print on lines of their own above the bar, not glued to its line.
                console.enter_context(logging_redirect_tqdm())
                if self.frames_seen:
                    bar.update(self.frames_seen)
            paused_frame = None
            while not self._stop.is_set():
                self._alive()
                if cfg.max_frames is not None and self.frames_seen >= cfg.max_frames:
                    break
                if control is not None:
                    # Paused: wait on the control socket instead of consuming frames,
                    # so a file loses nothing while paused.
                    _serve_control(control, 100 if self._controls.paused else 0)
                if self._controls.paused:
                    self._finish_in_flight(emitter, bar)
                    if paused_frame is None:
                        # The frame after the paused one, held: prompts clicked on the paused
                        # picture apply to it at resume, not to whatever a live source (which
                        # keeps only its newest frame) has by then.  Asked again until it comes
                        # (a busy machine, a source reconnecting).
                        paused_frame = self.capture.read(timeout=0.2)
                    continue
                # With a frame in flight only a frame already waiting is launched ahead:
                # waiting for the source would hold the in-flight result back.
                asked = time.monotonic()
                frame = paused_frame if paused_frame is not None else self.capture.read(
                    timeout=0.1 if self._in_flight is None else 0)
                paused_frame = None
                if frame is None:
                    if self._in_flight is not None:
                        self._finish_in_flight(emitter, bar)
                    elif self.capture.state.terminal:
                        break
                    continue
                # Frames are stamped on the monotonic clock as they are decoded (in a child
                # process too): a frame that came during the wait is timed from there.
                handed_over = time.monotonic() - max(asked, frame.capture_monotonic)
                self.loop_times.record("read", max(0.0, handed_over))
                if frame.pts is not None:  # how far into a file it got (its header has the duration)
                    self._pts_span = (frame.pts if self._pts_span is None else self._pts_span[0], frame.pts)
                if not self._file_prompts_checked:  # said now, not only hours in when their frame comes
                    self._warn_unfitting_later_prompts(frame)
                    self._file_prompts_checked = True
                if self._controls.pending:  # before deciding whether the first frame waits for one
                    self._drop_unfitting(frame)
                if self._must_wait_for_prompt(seed):
                    self._finish_in_flight(emitter, bar)
                    held_from = time.monotonic()
                    self._hold(frame, control, emitter.publisher)
                    if self._stop.is_set():
                        break
                    self._released = (now(), time.monotonic())
                    self._waited += self._released[1] - held_from
                if self._released is not None and frame.capture_monotonic < self._released[1]:
                    # The wait is the user's, not latency: the held frame and those decoded
                    # behind it meanwhile are timed from the prompt that released them.
                    wall, mono = self._released
                    frame = replace(frame, capture_time=wall, capture_monotonic=mono)
                dequeue = now()
                self.frame_size = (frame.height, frame.width)
                prompts = [_fit_mask(p, frame.height, frame.width) for p in seed]
                seed = []
                while self._prompt_frames and self._prompt_frames[0] <= frame.frame_id:
                    prompts += self._due_prompts(self._prompt_frames.pop(0), frame)
                self._last_frame_id = frame.frame_id
                t = time.perf_counter()
                requested, seq = self._controls.pending, self.next_seq
                launched = _InFlight(frame, dequeue, self._launch(frame, _merge_prompts(prompts), requested))
                self.loop_times.add("launch", t)
                self._controls.pending = []
                if requested:  # in the frame now: done once that frame's result is out
                    self._notify("applied", {"seq": seq, "obj_ids": [p.obj_id for p in requested]})
                self.frames_seen += 1
                self._finish_in_flight(emitter, bar)  # the frame before, launched ahead of this one
                self._in_flight = launched
                if not cfg.launch_ahead:
                    self._finish_in_flight(emitter, bar)
            self._finish_in_flight(emitter, bar)
            self._announce_stopped(emitter)
            emitter.close()
            emitter.check()
        except KeyboardInterrupt:
            summary.interrupted = True
        except ReaderGone as exc:  # `| head` has what it wanted: the run ends there
            summary.reader_gone = str(exc)
        finally:
            if sys.exc_info()[0] is None:  # ended or interrupted; not a crash, which a restart follows
                self._announce_stopped(emitter)
            console.close()
            if bar is not None:  # its line ends before an error is printed, and is not redrawn after
                if sys.exc_info()[0] is not None:
                    bar.leave = False  # a failed run's error line stands alone where the bar was
                bar.close()
            if self._in_flight is not None and self.engine is not None:
                self.engine.drop_launched()  # interrupted with a frame in flight: never published
            self._publisher = None
            try:
                emitter.close()  # whatever was tracked is written before the files close
            except ReaderGone as exc:  # found closing (a buffered video): an interrupt or crash stands
                summary.reader_gone = summary.reader_gone or str(exc)
            self.capture.close()
            if control is not None:
                control.close()
        # A frame launched but not finished (interrupted) was never published.
        summary.frames = self.frames_seen - resume.frames_done - (self._in_flight is not None)
        if summary.reader_gone:  # the frames tracked after the failed write went nowhere
            summary.frames = self._results_out
        summary.seconds = time.monotonic() - started
        summary.starting = summary.seconds if running_since is None else running_since - started
        summary.waited = self._waited
        summary.take_latency(self.window)
        summary.read_ahead = cfg.resumable_file
        stats = self.capture.stats()
        summary.dropped = self._dropped(stats)
        summary.source_state = self.capture.state.value
        if self.capture.state is SourceState.FAILED:
            summary.source_error = stats.last_error or "unknown error"
        summary.objects = dict(self._object_states)
        if self.capture.state.value == "failed" and summary.frames == 0:
            raise UserError(f"source {redact_url(str(cfg.source))!r} failed: {stats.last_error}")
        self._report_what_went_unseen(summary.interrupted or bool(summary.reader_gone), stats, declared)
        return summary

    def _report_what_went_unseen(self, interrupted: bool, stats: CaptureStats,
                                 declared: DeclaredLength | None) -> None:
        """Warn about what a run that ends quietly would otherwise leave unsaid: prompts past
        the source's end, a file cut short, result files not written."""
        cfg = self.config
        late = self._prompt_frames
        # frames_seen counts those before a restart too: a restarted tracker that only
        # skipped frames already done still tells.
        ended = self.frames_seen > 0 and not (interrupted or self._stop.is_set()) and (
            cfg.max_frames is None or self.frames_seen < cfg.max_frames)
        if late and ended:
            where = (f"at frame {self._last_frame_id}" if self._last_frame_id is not None
                     else f"after {self.frames_seen} frames")
            log.warning("prompts for frame%s %s never applied: the source ended %s",
                        "s" if len(late) > 1 else "", ", ".join(map(str, late)), where)
        if self.capture.kind is SourceKind.FILE and self.capture.state is SourceState.ENDED:
            # A file cut short (an unfinished download or recording) decodes up to the cut
            # and ends there like a whole one; its header still counts every frame, or gives
            # its duration (a count from that would be wrong at a variable frame rate).
            if declared and declared.frames:
                # An MP4 trimmed without re-encoding counts the frames its edit list hides:
                # decoding up to its declared duration is whole, whatever the count says.
                tracked = stats.frames_decoded - self.capture.config.skip_frames  # after a restart's
                if declared.frames - stats.frames_decoded > 1 + stats.decode_errors and \
                        not self._reached_duration(declared, tracked):
                    log.warning("video file %s ended after %d of the %d frames its header declares: is "
                                "it cut short?", cfg.source, stats.frames_decoded, declared.frames)
            elif declared and declared.seconds and self._pts_span is not None:
                # Matroska's duration counts from 0, not from the first frame (a remux that
                # kept its timestamps starts at 5 s and declares 6 s for 1 s of video);
                # MPEG-TS's counts from the first frame (which may be at 10,000 s).
                first, last = self._pts_span
                reached = max(last - first, last)
                if reached < declared.seconds - max(0.5, declared.seconds / 20):  # the last frame's own time
                    log.warning("video file %s ended at %.1f s of the %.1f s its header declares: is it cut "
                                "short?", cfg.source, reached, declared.seconds)
            if stats.decode_errors:
                # Frame numbers count decoded frames: a prompts file's later frames move up.
                log.warning("video file %s: %d damaged packet(s) skipped; frames after them are numbered "
                            "without them", cfg.source, stats.decode_errors)
        unwritten = [f"{what} {path}" for what, path in (("--save-jsonl", cfg.save_jsonl),
                                                         ("--save-video", cfg.save_video)) if path]
        if self.frames_seen == 0 and unwritten:  # an earlier run's file there would pass for this one's
            log.warning("no frame was tracked, so %s %s not written", " and ".join(unwritten),
                        "were" if len(unwritten) > 1 else "was")

    def _reached_duration(self, declared: DeclaredLength, decoded: int) -> bool:
        """Whether the ``decoded`` frames from the first tracked to the last reach the
        duration the header declares, to within two frame intervals (the last frame's own
        time, and rounding).  A restarted tracker's frames start at its restart frame: the
        file's own time, from 0, counts too."""
        if not declared.seconds or self._pts_span is None or decoded < 2:
            return False
        first, last = self._pts_span
        interval = (last - first) / (decoded - 1)
        return max(last - first, last) >= declared.seconds - 2 * interval - 0.001

    def _on_published(self, result: FrameResult) -> None:
        """Latency statistics once a result went out (on the emitter's thread, or, a few
        frames later, on the tracker's with a process emitter), and, for a supervisor, where
        a restart would continue: this result is published and in the files."""
        with self._stats_lock:
            self.window.add(result)
            self._results_out += 1
        done = {"seq": result.seq, "frame_id": result.frame_id, "pts": result.pts}
        if self.config.save_video and self.config.replayable_file:
            # The video muxer keeps a frame until the next one comes (its duration, and the
            # first frame's rate): a frame is in the file once the next one is written, so
            # a restart continues after that one and processes the last frame again.  (A
            # live source's frames cannot be processed again: its part ends a frame short.)
            done, self._written_before = self._written_before, done
        if done is not None:
            self._notify("emitted", done)
        self._publish_stats()

    def _publish_stats(self) -> None:
        """``stats/<stream>`` at most once a second, after results and from the loop while
        none come (source down, paused, waiting for a prompt): the topic is a heartbeat, and
        its fps falls while no frame is tracked."""
        publisher, capture = self._publisher, self.capture
        if publisher is None or capture is None:
            return
        with self._stats_lock:
            t = time.monotonic()
            if t - self._last_stats < 1.0:
                return
            self._last_stats = t
            source = capture.stats()
            stats = self.window.snapshot(
                dropped=self._dropped(source), source_state=source.state.value,
                source_error=_source_error(source),
                paused=self._controls.paused, waiting_for_prompt=self._holding,
                memory_bytes=self.engine.state_bytes() if self.engine is not None else None, at=now())
        try:
            publisher.publish_stats(stats)
        except (UserError, EmitterError):  # closed under us while shutting down: nobody to tell
            pass

    def _due_prompts(self, frame_number: int, frame) -> list[Prompt]:
        """The prompts given for ``frame_number``, checked against the frame they go on.
        Their objects are tracked again, so the control status lists them once more."""
        self._check_file_prompts(frame_number, frame)
        due = self.config.prompts[frame_number]
        self._removed.difference_update(p.obj_id for p in due)
        return due

    def _check_file_prompts(self, number: int, frame) -> None:
        """The given prompts (a prompts file's, ``--box``) for frame ``number``, checked
        against ``frame``: one that does not fit ends the run (it is the user's own), naming
        the frame it was for."""
        for p in self.config.prompts[number]:
            try:
                check_prompt(p, frame.height, frame.width)
            except PromptError as exc:
                raise PromptError(f"{exc} (prompted for frame {number})") from None

    def _warn_unfitting_later_prompts(self, frame) -> None:
        """Warn at the first frame about the given prompts for later frames that do not fit
        it: each ends the run when its frame comes, hours into a live stream, unless the
        source's size has changed by then (joined clips, a camera back in another mode)."""
        for number in self._prompt_frames:
            if number <= frame.frame_id:
                continue  # due now: checked, and fatal, with this frame's prompts
            try:
                self._check_file_prompts(number, frame)
            except PromptError as exc:
                log.warning("%s: the run will end there unless the source's size changes by then", exc)

    def _drop_unfitting(self, frame) -> None:
        """Drop the queued control prompts that do not fit ``frame`` (sent before the first
        frame, or for another source size), each alone and with a status event rather than
        taking the tracker down: the others sent with them still apply."""
        fitting = []
        for p in self._controls.pending:
            try:
                check_prompt(p, frame.height, frame.width)
            except PromptError as exc:
                self._drop_prompts(exc)
                self._notify("unqueued", {"obj_id": p.obj_id})  # a supervisor forgets it too
            else:
                fitting.append(p)
        self._controls.pending = fitting

    def _video_time(self, pts: float) -> float:
        """A file's time at ``pts``, never going back: where its timestamps start over (clips
        joined, a recording's discontinuity) time goes on from where it was by one frame's
        step, or an object absent for a while would be seen again as just gone."""
        t = pts + self._video_time_offset
        if self._video_time_last is not None:
            last, step = self._video_time_last  # step: the shortest seen, a frame's
            if t < last:
                self._video_time_offset += last + step - t
                t = last + step
            elif t > last:
                step = min(step, t - last) if step else t - last
            self._video_time_last = (t, step)
        else:
            self._video_time_last = (t, 0.0)
        return t

    def _must_wait_for_prompt(self, seed: list[Prompt]) -> bool:
        self._had_objects = self._had_objects or bool(self.engine.object_ids)
        return (
            self.config.wait_for_prompt and self.capture.kind is SourceKind.FILE
            and not self.config.realtime and not self._had_objects and not seed
            and not self._controls.pending and not self._prompt_frames
        )

    def _hold(self, frame, control, publisher) -> None:
        """Show ``frame`` (republished for viewers that join late) until a prompt comes."""
        # A warning: the one line that says why a run from a file makes no progress.
        log.warning("waiting for a prompt on frame %d: draw a box in the viewer, or send add_prompt "
                    "to %s", frame.frame_id, control.endpoint if control is not None else "its control")
        self.frame_size = (frame.height, frame.width)
        last = 0.0
        self._holding = True  # in the stats: a viewer says what the run waits for
        self._last_stats = 0.0  # ...from now on
        try:
            while not self._stop.is_set() and not self._controls.pending:
                self._alive()
                if publisher is not None and time.monotonic() - last >= 0.5:
                    publisher.publish_frame(frame.frame_id, frame.image)
                    last = time.monotonic()
                if control is not None:
                    _serve_control(control, 50)
                else:
                    self._stop.wait(0.05)
        finally:
            self._holding = False
            self._last_stats = 0.0  # the next stats say so at once

    def _alive(self) -> None:
        """Report that the loop goes round (at most every ALIVE_EVERY seconds), to a
        supervisor and on ``stats/<stream>``.  Sent from the loop itself, not a thread of its
        own, so a step or an output that never returns stops the reports."""
        t = time.monotonic()
        if t - self._alive_sent >= ALIVE_EVERY:
            self._alive_sent = t
            self._notify("alive", {})
        self._publish_stats()

    def _finish_in_flight(self, emitter, bar) -> None:
        """Wait for the frame in flight, if any, and hand its result to the outputs."""
        launched, self._in_flight = self._in_flight, None
        if launched is None:
            return
        t = time.perf_counter()
        out = self.require_engine().finish(launched.step)
        t = self.loop_times.add("finish", t)
        result = self._result(launched.frame, launched.dequeue, out)
        if self._reports_video and result.frame_id > self._video_through:
            # Said before it is written: a restart counts the frames in the dead tracker's
            # video part and learns from this which they are.
            self._notify("video", {"frame_id": result.frame_id})
        emitter.submit(result, [o.mask for o in out.objects], launched.frame.image)
        self._status_changes(result, emitter)
        if bar is not None:
            bar.update(1)
        self.loop_times.add("hand_over", t)

    def _launch(self, frame, prompts: list[Prompt], requested: list[Prompt]) -> PendingStep:
        """Launch the engine's step with the control channel's ``requested`` prompts (each
        checked against this frame already, by ``_drop_unfitting`` or when it came); if the
        engine still refuses them they are dropped with a status event rather than taking
        the tracker down.  The engine validates before it changes state, so the retry sees
        it untouched."""
        assert self.engine is not None
        # The clock of lost_after: a file read at decode speed goes by its own time (an
        # object absent for 3 s of video is lost whether those took 0.3 s or 30 s to track).
        ts = self._video_time(frame.pts) if self._video_clock and frame.pts is not None \
            else frame.capture_monotonic
        if requested:
            try:
                out = self.engine.launch(frame.image, _merge_prompts(prompts + requested), timestamp=ts)
            except PromptError as exc:
                self._drop_prompts(exc)
            else:
                # The control reply only says "queued": this tells a remote client which
                # frame its prompt landed on, with the coordinates the engine used.
                seq = self.next_seq
                for p in requested:
                    self.publish_status("prompt_applied", obj_id=p.obj_id, frame_id=frame.frame_id, seq=seq,
                                        points=p.points, labels=p.labels, box=p.box,
                                        mask=p.mask is not None)
                return out
        return self.engine.launch(frame.image, prompts, timestamp=ts)

    def _drop_prompts(self, exc: PromptError) -> None:
        log.warning("dropping control prompt(s): %s", exc)
        self.publish_status("error", message=f"prompt dropped: {exc}")

    def _on_source_status(self, event: SourceEvent) -> None:
        # Runs on the capture thread (on the tracker's with decode: process); the
        # publisher is thread-safe.
        _log_source_change(redact_url(str(self.config.source)), event, self._give_up_after)
        self.publish_status("source_state", old=event.previous.value, new=event.state.value,
                            reason=event.error)

    def _announce_stopped(self, emitter) -> None:
        """Tell viewers the tracker is done (once, after its last result): its silence
        from now on is the end of the run, not a tracker that stopped publishing."""
        if not self._stop_announced:
            self._stop_announced = True
            emitter.publish_status_after_results(
                "tracker_state", old="paused" if self._controls.paused else "running", new="stopped")

    def publish_status(self, kind: str, **data: Any) -> None:
        pub = self._publisher
        if pub is None:
            return
        try:
            pub.publish_status(kind, **data)
        except (UserError, EmitterError):  # closed under us while shutting down: nobody to tell
            pass

    def _result(self, frame, dequeue: float, out: FrameOutput) -> FrameResult:
        objects = tuple(
            ObjectResult(
                obj_id=o.obj_id, score=round(o.score, 4), state=o.state.value,
                bbox=o.bbox, area=o.area, iou=round(o.iou, 4),  # the emitter adds the RLE
            )
            for o in out.objects
        )
        stats = self.capture.stats()
        self._seq += 1
        return FrameResult(
            stream=self.config.stream, seq=self._seq - 1, frame_id=frame.frame_id, pts=frame.pts,
            width=out.width, height=out.height,
            t=Timestamps(capture=frame.capture_time, dequeue=dequeue,
                         infer_start=out.infer_start, infer_end=out.infer_end),
            source_state=self.capture.state.value, dropped=self._dropped(stats), objects=objects,
        )

    def _dropped(self, stats: CaptureStats) -> dict[str, int]:
        """The source's drop counts, with those of the trackers before a restart."""
        return {k: stats.dropped.get(k, 0) + self._dropped_before.get(k, 0)
                for k in sorted({*stats.dropped, *self._dropped_before})}

    def _status_changes(self, result: FrameResult, emitter) -> None:
        """``object_state`` events for what changed in ``result``, published after it (an
        object's "removed" never overtakes a result that still has it)."""
        current = {o.obj_id: o.state for o in result.objects}
        for obj_id, state in current.items():
            old = self._object_states.get(obj_id)
            if old != state:
                emitter.publish_status_after_results("object_state", obj_id=obj_id, old=old, new=state)
        for obj_id in self._object_states.keys() - current.keys():
            emitter.publish_status_after_results("object_state", obj_id=obj_id,
                                                 old=self._object_states[obj_id], new="removed")
        self._object_states = current
        self._removed &= current.keys()


_LOCAL_HOSTS = ("localhost", "::1", "[::1]")


@dataclass
class _InFlight:
    """A frame whose engine step is launched and not yet finished."""

    frame: Frame
    dequeue: float
    step: PendingStep


def is_local_endpoint(endpoint: str | int) -> bool:
    """True when ``endpoint`` can only be reached from this machine."""
    from streamtrack.protocol import normalize_endpoint, tcp_host_port

    tcp = tcp_host_port(normalize_endpoint(endpoint))
    if tcp is None:
        return True  # ipc:// is a file, inproc:// is in-process
    host = tcp[0]
    return host in _LOCAL_HOSTS or host.startswith("127.")


def warn_if_exposed(endpoint: str | int, what: str) -> bool:
    """Log a warning when ``endpoint`` binds an interface other hosts can reach.

    Returns True if it warned.  Masks and the control socket carry no
    authentication, so exposing them must be a conscious choice.
    """
    if is_local_endpoint(endpoint):
        return False
    can = {"control": "send prompts and commands (no authentication)",
           "fleet control": "start streams that write files anywhere and open any URL, as this user "
                            "(no authentication)"}.get(what, "read the masks")
    log.warning(
        "%s endpoint %s is reachable from other machines: anyone who can connect can %s. "
        "Bind 127.0.0.1 unless that is intended (and firewall the port).",
        what, endpoint, can,
    )
    return True


def _fit_mask(prompt: Prompt, height: int, width: int) -> Prompt:
    """A seed mask from a source whose frame size changed is scaled to the new size
    (a restarted camera may come back in another mode)."""
    if prompt.mask is None or prompt.mask.shape == (height, width):
        return prompt
    import cv2

    mask = cv2.resize(prompt.mask.astype(np.uint8), (width, height), interpolation=cv2.INTER_NEAREST)
    return Prompt(obj_id=prompt.obj_id, mask=mask.astype(bool))


def _merge_prompts(prompts: list[Prompt]) -> list[Prompt]:
    """Later prompts for the same object on the same frame win (control over file)."""
    by_id: dict[int, Prompt] = {}
    for p in prompts:
        by_id[p.obj_id] = p
    return list(by_id.values())


LOG_FILE_BAR_INTERVAL = 30.0  # s between progress bar redraws written into a file


def _is_a_file(stream) -> bool:
    """Whether ``stream`` writes to a regular file (not a terminal, pipe or socket)."""
    import stat

    try:
        return stat.S_ISREG(os.fstat(stream.fileno()).st_mode)
    except (AttributeError, OSError, ValueError):  # no descriptor (captured, closed)
        return False


def _source_error(source: CaptureStats) -> str | None:
    """Why the source is down, for ``stats/``: only while it is (a reconnected source's
    last error is history, and a stale one has none of its own)."""
    if source.state in (SourceState.RECONNECTING, SourceState.FAILED):
        return source.last_error
    return None


def _progress(cfg: RunConfig, total: int | None):
    if not cfg.progress_bar:
        return None
    from tqdm import tqdm

    if not hasattr(tqdm, "_lock"):
        # tqdm's default lock includes a multiprocessing semaphore, a file in /dev/shm that
        # only a clean exit removes: a tracker process killed and restarted by its
        # supervisor would leave one behind each time. One bar, in one process: a thread
        # lock is all it needs.
        tqdm.set_lock(threading.RLock())
    if cfg.max_frames is not None:
        total = min(total, cfg.max_frames) if total else cfg.max_frames
    # Ten redraws a second into a log file (`2> run.log`) are megabytes of one line a day:
    # there, one every 30 s (a pipe may be `| tee` to a terminal, and keeps the rate).
    return tqdm(total=total or None, unit="frame", desc="tracking", dynamic_ncols=True,
                mininterval=LOG_FILE_BAR_INTERVAL if _is_a_file(sys.stderr) else 0.1)


@dataclass(frozen=True)
class DeclaredLength:
    """How long a video file's header says it is, and its frame rate."""

    frames: int | None  # counted in the header (MP4, AVI)
    seconds: float | None  # its duration (all that Matroska/WebM give)
    fps: float | None = None


def _declared(path: str) -> DeclaredLength | None:
    import av

    try:
        with av.open(ffmpeg_file(path)) as c:
            stream = video_stream(c)
            rate = stream.average_rate or stream.guessed_rate
            return DeclaredLength(stream.frames or None, c.duration / av.time_base if c.duration else None,
                                  float(rate) if rate and 0 < float(rate) < 1000 else None)
    except Exception:  # noqa: BLE001 - niceties: the capture says what is wrong with the file
        return None


def _log_source_change(name: str, event: SourceEvent, give_up_after: float | None) -> None:
    """Say on the console what a live source is doing when it is not simply streaming:
    without it a camera that cannot be reached retries in silence.  One line per change
    (the capture reports an outage once, however many attempts it takes)."""
    if event.state is SourceState.RECONNECTING:
        until = (f"giving up after {give_up_after:g} s" if give_up_after is not None
                 else "until stopped (--give-up-after S to stop sooner)")
        first = event.previous is SourceState.CONNECTING
        again = event.previous is SourceState.RECONNECTING  # the same outage, another reason
        log.warning("source %s: %s%s; %s, %s", name, "now " if again else "", event.error,
                    "retrying" if first else "reconnecting", until)
    elif event.state is SourceState.STALE:
        log.warning("source %s: connected, but no frame is arriving", name)
    elif event.state is SourceState.STREAMING and event.previous in (SourceState.RECONNECTING,
                                                                      SourceState.STALE):
        log.warning("source %s: frames arriving again", name)


def _next_free_id(taken: set[int], highest: int = MAX_OBJ_ID) -> int:
    """The id after the highest one taken, or, past ``highest``, the lowest one free (or
    ``highest + 1`` when none is: refused then, as any id out of range)."""
    if (top := max(taken)) < highest:
        return top + 1
    return next((i for i in range(1, highest + 1) if i not in taken), highest + 1)
