"""``streamtrack bench pipeline|latency|memory``: the whole tracker, measured against
the bare engine (or the official predictor) in the same run, on the same frames.

``pipeline``: frames/s of the full pipeline (a video file decoded by the capture
thread -> bounded queue -> engine -> results published over ZeroMQ on 127.0.0.1)
vs ``StreamingEngine.step`` over the same frames decoded up front.

``latency``: a file paced at its frame rate, faster than the engine can step, goes
through the same pipeline with the live drop-oldest queue; capture->publish
latency percentiles vs the engine's own median step time.

``memory``: process RSS and engine state bytes early in a long stream and at its
end, and the official ``SAM2VideoPredictor``'s curve on the same weights.  Each
side runs in its own spawned process so the RSS figures do not mix.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from streamtrack import childproc
from streamtrack.bench import (
    _official_state_bytes,
    _prompts,
    compile_options,
    print_json,
    silence_official_progress,
    sync_device,
)
from streamtrack.capture import CaptureConfig, open_source
from streamtrack.engine import EngineConfig, Prompt, StreamingEngine
from streamtrack.errors import UserError, existing_file
from streamtrack.models import build_model, resolve_device, save_random_checkpoint
from streamtrack.pipeline import LoopTimes, RunConfig, Tracker
from streamtrack.protocol import FrameResult, Timestamps
from streamtrack.publisher import StatsWindow
from streamtrack.synthetic import make_clip, write_video

Log = Callable[..., None]

WHATS = ("pipeline", "latency", "memory")

# Per-benchmark defaults for the options `streamtrack bench` shares between its
# benchmarks (None on the command line = "not given").  Chosen so each runs in a few
# minutes on a 2-core CPU: the memory benchmark steps 2,000 frames, so it uses the
# smallest input streamtrack accepts (64: Hiera's stride 32 leaves a 2x2 grid, the
# memory encoder's 4x4) and a small frame.
DEFAULTS: dict[str, dict[str, object]] = {
    "engine": {"frames": 24, "objects": [1, 4], "image_size": 256, "frame_size": "320x240"},
    "preprocess": {"frames": 24, "objects": [1, 4], "image_size": 256},
    "pipeline": {"frames": 60, "objects": [1], "image_size": 128, "frame_size": "320x240"},
    "latency": {"frames": 60, "objects": [1], "image_size": 128, "frame_size": "320x240", "clip_frames": 60},
    "memory": {"frames": 2000, "objects": [1], "image_size": 64, "frame_size": "128x96", "clip_frames": 50},
    "multistream": {"frames": 12, "objects": [1], "image_size": 256, "frame_size": "320x240"},
}

# Objects a benchmark tracks at most: 4x run's default max_objects, as no count a camera
# would see needs more, and 100,000 would run for many minutes before its first line.
MAX_BENCH_OBJECTS = 256
PIPELINE_GOAL = 0.95  # pipeline fps / bare engine fps, at least
LATENCY_GOAL = 1.5  # capture->publish p95 / engine median step, at most
MEMORY_GOAL_PCT = 2.0  # RSS growth from the early sample to the last, at most
_CAMERA_FPS = 30.0


def apply_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the options left unset on the command line with ``args.what``'s defaults."""
    for name, value in DEFAULTS.get(args.what, {}).items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    if getattr(args, "checkpoint", None):  # as run and segment take it (a quoted "~/x.pt")
        args.checkpoint = os.path.expanduser(args.checkpoint)
    # Counts every benchmark takes; each one checks its own further limits.
    for name in ("frames", "repeats", "compile_slots"):
        if getattr(args, name, None) is not None:
            _positive(f"--{name.replace('_', '-')}", getattr(args, name))
    if args.what in ("engine", "multistream") and args.frames is not None:
        _positive("--frames", args.frames, 2)  # timed from the frame after the prompted one
    for name in ("objects", "streams"):
        for value in getattr(args, name, None) or ():
            _positive(f"--{name}", value)
        if getattr(args, name, None):  # `--objects 1 4 1`: each count is one row
            setattr(args, name, sorted(set(getattr(args, name))))
    for value in getattr(args, "objects", None) or ():
        if value > MAX_BENCH_OBJECTS:  # each is prompted, then tracked: minutes with no output
            raise UserError(f"--objects must be at most {MAX_BENCH_OBJECTS}, got {value}")
    return args


def _proc_kib(path: str, field: str) -> int | None:
    """A ``field:  N kB`` line of a /proc file, in bytes (Linux); None elsewhere."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def available_memory() -> int | None:
    """Bytes of memory the kernel says a new allocation can have (Linux); None elsewhere."""
    return _proc_kib("/proc/meminfo", "MemAvailable")


def check_clip_memory(args: argparse.Namespace) -> None:
    """A benchmark makes its synthetic clip in memory, and decodes it, before anything is
    timed: one too large for this machine is an option's error, not a MemoryError
    traceback minutes in (or the OOM killer)."""
    if args.what == "preprocess":
        width, height, count = 320, 240, args.frames
    else:
        width, height = parse_frame_size(args.frame_size)
        count = {"latency": max(args.frames, args.clip_frames or 0),
                 "memory": args.clip_frames or 0,
                 "multistream": args.frames * max(args.streams or [1])}.get(args.what, args.frames)
    needed = 2 * count * width * height * 3  # the clip's frames and their decoded copies, RGB
    free = available_memory()
    if free is not None and needed > free:
        raise UserError(f"{count:,} frames of {width}x{height} need about {_size(needed)} of memory (made "
                        f"before the run), and {_size(free)} is available: give fewer frames or a smaller "
                        "--frame-size")
    if args.what == "memory" and args.official_frames and free is not None:
        # The official predictor's side (a process of its own, after the engine's) holds
        # all its frames: the clip (RGB and three objects' masks), and init_state's
        # preprocessed frames, 3 x S x S float32 each, made in host memory first.
        n = max(args.official_frames)
        official = n * (6 * width * height + 12 * args.image_size ** 2)
        if official > free:
            raise UserError(f"--official-frames {n:,}: the official predictor holds every frame in memory, "
                            f"about {_size(official)} at input {args.image_size}, and {_size(free)} is "
                            "available: give fewer frames")


def _size(n: int) -> str:
    return f"{n / 2**30:,.1f} GiB" if n >= 2**30 else f"{n / 2**20:,.0f} MiB"


# ----------------------------------------------------------------------------- helpers


def rss_bytes() -> int:
    """Resident set size of this process now (Linux); elsewhere the peak, the best
    the standard library offers without a new dependency."""
    rss = _proc_kib("/proc/self/status", "VmRSS")
    if rss is not None:
        return rss
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def parse_frame_size(text: str) -> tuple[int, int]:
    """``"320x240"`` -> (320, 240)."""
    w, sep, h = str(text).lower().partition("x")
    if not sep or not w.isdigit() or not h.isdigit():
        raise UserError(f"--frame-size must look like 320x240, got {text!r}")
    width, height = int(w), int(h)
    if width < 32 or height < 32:
        raise UserError(f"--frame-size must be at least 32x32, got {text!r}")
    return width, height


def _positive(name: str, value: int | float, minimum: int | float = 1) -> None:
    if value < minimum:
        raise UserError(f"{name} must be >= {minimum}, got {value}")


def _one_count(objects: list[int] | tuple[int, ...] | int, what: str) -> int:
    counts = [objects] if isinstance(objects, int) else list(objects)
    if len(counts) != 1:
        raise UserError(f"bench {what} takes one --objects count, got {counts}")
    _positive("--objects", counts[0])
    return counts[0]


def _checkpoint(model: str, checkpoint: str | None, tmp: Path) -> str:
    if checkpoint is not None:
        return str(existing_file(checkpoint, "checkpoint"))
    return str(save_random_checkpoint(model, tmp / "random.pt"))


def _decode(video: Path) -> list[np.ndarray]:
    """Every frame of ``video``, decoded by the same capture code the tracker uses."""
    with open_source(str(video), CaptureConfig()) as cap:
        return [frame.image for frame in cap]


def _warm(model: torch.nn.Module, config: EngineConfig, frames: list[np.ndarray],
          prompts: list[Prompt], steps: int = 4) -> list[float]:
    """A few engine steps so neither side pays first-call costs in its timing;
    returns their durations in seconds (the first one carries the prompts)."""
    engine = StreamingEngine(model, config)
    # Compiled: every object batch size is compiled now, untimed, and the trackers that
    # share this model later do not warm it up again.
    engine.warmup_once()
    return [span.end - span.start for span in _bare_steps(engine, frames, prompts, steps)]


class _Span(NamedTuple):
    """One bare engine step's ``perf_counter`` times."""

    start: float
    launched: float  # launch() returned: the host queued the frame's work
    end: float  # finish() returned, the device synced


def _bare_steps(engine: StreamingEngine, frames: list[np.ndarray], prompts: list[Prompt], count: int,
                interval: float = 0.0) -> list[_Span]:
    """Step ``engine`` over ``count`` frames (cycling through ``frames``, the prompts on the
    first), each as the tracker does it, ``launch`` then ``finish``, and time them.
    ``interval`` > 0 starts step i no sooner than i * ``interval`` after the first, as a
    live source hands frames over: the engine then idles between steps, as in a tracker
    that keeps up with a camera, where back to back it never does."""
    spans = []
    first = time.perf_counter()
    for i in range(count):
        wait = first + i * interval - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        spans.append(_timed_step(engine, frames[i % len(frames)], prompts if i == 0 else []))
    return spans


def _capture_steps(engine: StreamingEngine, video: Path, prompts: list[Prompt], count: int,
                   decode: str) -> list[_Span]:
    """As :func:`_bare_steps`, on the first ``count`` frames of ``video`` as the capture
    hands them to the tracker (``decode``: its thread or process decoding meanwhile), with
    no tracker loop, emitter or publisher: between the bare engine and the pipeline."""
    spans: list[_Span] = []
    with open_source(str(video), CaptureConfig(), decode=decode) as cap:
        for frame in cap:
            spans.append(_timed_step(engine, frame.image, prompts if not spans else []))
            if len(spans) == count:
                break
    if len(spans) != count:
        raise RuntimeError(f"the capture delivered {len(spans)} of {count} frames")
    return spans


def _timed_step(engine: StreamingEngine, image: np.ndarray, prompts: list[Prompt]) -> _Span:
    t0 = time.perf_counter()
    pending = engine.launch(image, prompts)
    t1 = time.perf_counter()
    engine.finish(pending)
    sync_device(engine.device)
    return _Span(t0, t1, time.perf_counter())


def _phases_ms(spans: list[_Span]) -> dict[str, float]:
    """Median ms of the bare engine's ``launch`` and ``finish``: the tracker's own
    ``LoopTimes`` phases of the same names are comparable."""
    return {"launch": float(np.median([s.launched - s.start for s in spans])) * 1000,
            "finish": float(np.median([s.end - s.launched for s in spans])) * 1000}


def _phase_rows(columns: dict[str, dict[str, float]]) -> list[tuple]:
    """Rows of a per-phase table: ``columns`` maps a side's name to its phase medians."""
    names = [n for n in LoopTimes.PHASES if any(n in c for c in columns.values())]
    rows: list[tuple] = [("on the engine's thread, per frame (median ms)", *columns)]
    for n in names:
        cells = (f"{c[n]:.2f}" if n in c else "-" for c in columns.values())
        rows.append((f"  {n.replace('_', ' ')}", *cells))
    return rows


class _Recorder(StatsWindow):
    """The tracker's stats window that also keeps every published result's timestamps."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream=stream)
        self.stamps: list[Timestamps] = []
        self.object_counts: list[int] = []

    def add(self, result: FrameResult, at: float | None = None) -> None:
        super().add(result, at)
        self.stamps.append(result.t)
        self.object_counts.append(len(result.objects))


@dataclass
class _TrackedRun:
    stamps: list[Timestamps]
    object_counts: list[int]
    received: int  # masks messages a subscriber on 127.0.0.1 got
    frames_decoded: int
    frames_delivered: int
    dropped: dict[str, int]
    loop_ms: dict[str, float]  # the tracker's LoopTimes medians


def _count_masks(endpoint: str, stream: str, ready, stop, received) -> None:
    """A consumer process: subscribe to ``stream``'s masks and count them until ``stop``."""
    from streamtrack.subscriber import Subscriber

    sub = Subscriber(endpoint, topics=(f"masks/{stream}",))
    ready.set()
    try:
        while not stop.wait(0.02):
            received.value = sub.counters(stream).received
        received.value = sub.counters(stream).received
    finally:
        sub.close()


def _run_tracker(run: RunConfig, engine: StreamingEngine, warmup: int) -> _TrackedRun:
    """Run ``run`` to its end with a subscriber attached to its publisher and return what
    was published.  The subscriber is its own process, as any consumer would be: in the
    tracker's process its thread would compete with the engine for the interpreter,
    which on a GPU (where a step is mostly Python launching kernels) slows the engine.
    Its phase medians leave out the first ``warmup`` frames, as the bare engine's do."""
    ctx = get_context("spawn")
    ready, stop, received = ctx.Event(), ctx.Event(), ctx.Value("l", 0)
    consumers: list = []

    def notify(kind: str, data: dict) -> None:
        if kind == "bound" and data.get("publish"):
            proc = ctx.Process(target=_count_masks, args=(data["publish"], run.stream, ready, stop, received),
                               daemon=True)
            childproc.start_without_ctrl_c(proc)  # Ctrl-C is the benchmark's: it stops the child
            consumers.append(proc)
            if not ready.wait(60):
                raise RuntimeError("the benchmark's subscriber process did not start")
            time.sleep(0.2)  # ZeroMQ's slow joiner: let the subscription reach the publisher

    tracker = Tracker(run, engine=engine, notify=notify)
    recorder = _Recorder(run.stream)
    tracker.window = recorder
    try:
        if tracker.run().interrupted:  # Ctrl-C: the tracker stopped cleanly; so does the benchmark
            raise KeyboardInterrupt
    finally:
        if consumers:
            deadline = time.monotonic() + 2.0  # let the last messages arrive
            while time.monotonic() < deadline and received.value < len(recorder.stamps):
                time.sleep(0.02)
            stop.set()
            for proc in consumers:
                proc.join(10)
                if proc.is_alive():
                    proc.kill()
    assert tracker.capture is not None
    stats = tracker.capture.stats()
    return _TrackedRun(recorder.stamps, recorder.object_counts, int(received.value), stats.frames_decoded,
                       stats.frames_delivered, dict(stats.dropped), tracker.loop_times.medians_ms(warmup))


def _table(rows: list[tuple], log: Log) -> None:
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(cells[0]))]
    for r in cells:
        pairs = enumerate(zip(r, widths, strict=True))
        padded = [c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in pairs]
        log("  " + "  ".join(padded))


def _verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


# ---------------------------------------------------------------------------- pipeline


@dataclass
class PipelineBenchResult:
    benchmark: str
    device: str
    model: str
    image_size: int
    frame_size: tuple[int, int]
    torch_threads: int
    frames: int  # frames per run; the first `warmup` are not timed
    warmup: int
    objects: int
    repeats: int
    engine_fps: float = 0.0  # median over repeats
    pipeline_fps: float = 0.0
    ratio: float = 0.0  # the median of runs_ratio
    runs_ratio: list[float] = field(default_factory=list)  # each run's pipeline fps / its bare run's
    goal_min: float = PIPELINE_GOAL
    meets_goal: bool = False
    engine_runs_fps: list[float] = field(default_factory=list)
    pipeline_runs_fps: list[float] = field(default_factory=list)
    # The bare engine on frames read from the capture as the pipeline reads them: what the
    # decoding alongside costs, apart from the tracker's loop, emitter and publisher.
    capture_fps: float = 0.0
    capture_runs_fps: list[float] = field(default_factory=list)
    messages_received: int = 0  # by a subscriber on 127.0.0.1, last run
    compile: bool = False  # torch.compile'd engine (both sides)
    compile_mode: str = "default"
    emit: str = "thread"  # where the tracker's RLE, publishing and files ran
    decode: str = "thread"  # where the tracker's source was decoded
    launch_ahead: bool = False  # the tracker launched a waiting frame before finishing the last
    # Median ms per frame of each phase on the engine's thread (LoopTimes), median over repeats.
    engine_phases_ms: dict[str, float] = field(default_factory=dict)
    tracker_phases_ms: dict[str, float] = field(default_factory=dict)


def _fps(ends: list[float], warmup: int) -> float:
    """Frames/s from the end of frame ``warmup - 1`` to the end of the last."""
    return (len(ends) - warmup) / (ends[-1] - ends[warmup - 1])


def _median_phases(runs: list[dict[str, float]]) -> dict[str, float]:
    return {n: float(np.median([r[n] for r in runs if n in r]))
            for n in LoopTimes.PHASES if any(n in r for r in runs)}


def bench_pipeline(
    *,
    model: str = "sam2.1_hiera_tiny",
    checkpoint: str | None = None,
    image_size: int = 128,
    frames: int = 60,
    warmup: int = 5,
    objects: int = 1,
    repeats: int = 1,
    device: str = "auto",
    frame_size: tuple[int, int] = (320, 240),
    preprocess: str = "auto",
    compile: bool = False,
    compile_mode: str = "default",
    compile_slots: int = 4,
    emit: str = "thread",
    decode: str = "thread",
    launch_ahead: bool = False,
    log: Log = print,
) -> PipelineBenchResult:
    """Timed from the end of frame ``warmup - 1`` to the end of the last frame on every
    side: publish times on the pipeline, ``finish`` returns on the bare engine, fed from
    frames decoded up front and fed by the capture.  The model is loaded and warmed once,
    before any side; each run gets a fresh engine.
    """
    _positive("--warmup", warmup)
    _positive("--frames", frames, warmup + 2)
    _positive("--repeats", repeats)
    _positive("--objects", objects)
    dev = resolve_device(device)
    width, height = frame_size
    res = PipelineBenchResult("pipeline", str(dev), model, image_size, frame_size, torch.get_num_threads(),
                              frames, warmup, objects, repeats)
    with tempfile.TemporaryDirectory(prefix="streamtrack-bench-") as workdir:  # ~150 MB of checkpoint
        tmp = Path(workdir)
        checkpoint = _checkpoint(model, checkpoint, tmp)
        clip = make_clip(frames, width, height, num_objects=3, seed=3)
        video = write_video(clip.frames, tmp / "clip.mp4", fps=clip.fps)
        decoded = _decode(video)
        if len(decoded) != frames:
            raise RuntimeError(f"decoded {len(decoded)} of {frames} frames")
        prompts = _prompts(clip, objects)
        config = EngineConfig(model=model, checkpoint=checkpoint, device=str(dev), image_size=image_size,
                              preprocess=preprocess, compile=compile, compile_mode=compile_mode,
                              compile_slots=compile_slots, max_objects=max(EngineConfig.max_objects, objects))
        res.compile, res.compile_mode = config.compile, config.compile_mode
        res.emit, res.decode, res.launch_ahead = emit, decode, launch_ahead
        net = build_model(model, checkpoint, device=dev, image_size=image_size)
        res.frame_size = (decoded[0].shape[1], decoded[0].shape[0])
        _warm(net, config, decoded, prompts)
        engine_phases: list[dict[str, float]] = []
        tracker_phases: list[dict[str, float]] = []
        for r in range(repeats):  # alternate the sides; the median of each is reported
            spans = _bare_steps(StreamingEngine(net, config), decoded, prompts, frames)
            res.engine_runs_fps.append(_fps([s.end for s in spans], warmup))
            engine_phases.append(_phases_ms(spans[warmup:]))
            spans = _capture_steps(StreamingEngine(net, config), video, prompts, frames, decode)
            res.capture_runs_fps.append(_fps([s.end for s in spans], warmup))

            run = RunConfig(source=str(video), engine=config, prompts={0: prompts}, stream="bench",
                            publish="tcp://127.0.0.1:0", warn_exposed=False, max_frames=frames,
                            progress=False, emit=emit, decode=decode, launch_ahead=launch_ahead)
            tracked = _run_tracker(run, StreamingEngine(net, config), warmup)
            if len(tracked.stamps) != frames or any(n != objects for n in tracked.object_counts):
                raise RuntimeError(f"the tracker published {len(tracked.stamps)} of {frames} frames, "
                                   f"object counts {sorted(set(tracked.object_counts))} (expected {objects})")
            published = [t.publish for t in tracked.stamps]
            res.pipeline_runs_fps.append(_fps(published, warmup))
            res.messages_received = tracked.received
            tracker_phases.append(tracked.loop_ms)
            log(f"  run {r + 1}: bare engine {res.engine_runs_fps[-1]:.2f} fps, fed by the capture "
                f"{res.capture_runs_fps[-1]:.2f} fps, pipeline {res.pipeline_runs_fps[-1]:.2f} fps "
                f"(ratio {res.pipeline_runs_fps[-1] / res.engine_runs_fps[-1]:.3f}; "
                f"{tracked.received} messages received)")
    res.engine_fps = float(np.median(res.engine_runs_fps))
    res.pipeline_fps = float(np.median(res.pipeline_runs_fps))
    # Each pipeline run against the bare run just before it, then the median: a slow spell
    # of a shared machine then lands on both sides of one ratio, not on one side of another.
    res.runs_ratio = [p / e for p, e in zip(res.pipeline_runs_fps, res.engine_runs_fps, strict=True)]
    res.ratio = float(np.median(res.runs_ratio))
    res.meets_goal = res.ratio >= PIPELINE_GOAL
    res.capture_fps = float(np.median(res.capture_runs_fps))
    res.engine_phases_ms = _median_phases(engine_phases)
    res.tracker_phases_ms = _median_phases(tracker_phases)
    _table([
        ("", "frames/s", "ms/frame"),
        ("bare engine (frames decoded up front)", f"{res.engine_fps:.2f}", f"{1000 / res.engine_fps:.1f}"),
        ("bare engine fed by the capture (" + decode + ")", f"{res.capture_fps:.2f}",
         f"{1000 / res.capture_fps:.1f}"),
        ("pipeline (capture -> queue -> engine -> ZeroMQ)", f"{res.pipeline_fps:.2f}",
         f"{1000 / res.pipeline_fps:.1f}"),
    ], log)
    _table(_phase_rows({"bare engine": res.engine_phases_ms, "tracker": res.tracker_phases_ms}), log)
    log(f"  ratio pipeline / engine (median of the runs' ratios): {res.ratio:.3f} (goal >= {PIPELINE_GOAL}): "
        f"{_verdict(res.meets_goal)}")
    return res


# ----------------------------------------------------------------------------- latency


@dataclass
class LatencyBenchResult:
    benchmark: str
    device: str
    model: str
    image_size: int
    frame_size: tuple[int, int]
    torch_threads: int
    frames: int  # frames processed by the tracker; the first `warmup` are left out
    warmup: int
    objects: int
    source_fps: float  # the paced file's frame rate
    queue_depth: int
    engine_step_ms: float = 0.0  # bare engine, median over the same clip's frames
    engine_step_paced_ms: float = 0.0  # the same, each step started at the source's frame interval
    engine_phases_ms: dict[str, float] = field(default_factory=dict)  # launch / finish medians, back to back
    engine_paced_phases_ms: dict[str, float] = field(default_factory=dict)  # the same, paced
    tracker_phases_ms: dict[str, float] = field(default_factory=dict)  # LoopTimes medians
    latency_ms: dict[str, float] = field(default_factory=dict)  # capture -> publish p50/p95/p99
    queue_ms: dict[str, float] = field(default_factory=dict)  # capture -> dequeue p50/p95
    pipeline_infer_ms: float = 0.0  # median engine step inside the tracker
    ratio: float = 0.0  # latency p95 / engine_step_ms
    goal_max: float = LATENCY_GOAL
    meets_goal: bool = False
    frames_decoded: int = 0
    frames_delivered: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    messages_received: int = 0
    compile: bool = False  # torch.compile'd engine (both sides)
    compile_mode: str = "default"
    emit: str = "thread"
    decode: str = "thread"
    launch_ahead: bool = False


def _median_step_ms(spans: list[_Span]) -> float:
    return float(np.median([span.end - span.start for span in spans])) * 1000


def _percentiles(values: list[float], qs: tuple[int, ...]) -> dict[str, float]:
    return {f"p{q}": float(v) for q, v in zip(qs, np.percentile(np.asarray(values), qs), strict=True)}


MAX_SOURCE_FPS = 1000.0  # the paced clip is an H.264 file: its rate must be a small fraction


def _check_fps(fps: float | None) -> None:
    if fps is not None and not 0 < fps <= MAX_SOURCE_FPS:
        raise UserError(f"--fps must be more than 0 and at most {MAX_SOURCE_FPS:g}, got {fps}")


def bench_latency(
    *,
    model: str = "sam2.1_hiera_tiny",
    checkpoint: str | None = None,
    image_size: int = 128,
    frames: int = 60,
    warmup: int = 5,
    objects: int = 1,
    device: str = "auto",
    frame_size: tuple[int, int] = (320, 240),
    clip_frames: int = 60,
    fps: float | None = None,
    queue_depth: int | None = None,
    preprocess: str = "auto",
    compile: bool = False,
    compile_mode: str = "default",
    compile_slots: int = 4,
    emit: str = "thread",
    decode: str = "thread",
    launch_ahead: bool = False,
    log: Log = print,
) -> LatencyBenchResult:
    """``fps=None`` paces the clip at the larger of 30 fps (a camera) and 3x the engine's
    rate, so a newer frame is always waiting when the engine finishes one: the situation
    the drop-oldest queue exists for."""
    _positive("--warmup", warmup)
    _positive("--frames", frames, warmup + 2)
    _positive("--clip-frames", clip_frames, 2)
    _positive("--objects", objects)
    _check_fps(fps)
    live = CaptureConfig(realtime=True, loop=True, queue_depth=queue_depth, name="bench")
    depth = queue_depth if queue_depth is not None else 2  # Capture's drop-oldest default
    dev = resolve_device(device)
    width, height = frame_size
    with tempfile.TemporaryDirectory(prefix="streamtrack-bench-") as workdir:  # ~150 MB of checkpoint
        tmp = Path(workdir)
        checkpoint = _checkpoint(model, checkpoint, tmp)
        clip = make_clip(clip_frames, width, height, num_objects=3, seed=3)
        prompts = _prompts(clip, objects)
        config = EngineConfig(model=model, checkpoint=checkpoint, device=str(dev), image_size=image_size,
                              preprocess=preprocess, compile=compile, compile_mode=compile_mode,
                              compile_slots=compile_slots, max_objects=max(EngineConfig.max_objects, objects))
        net = build_model(model, checkpoint, device=dev, image_size=image_size)
        # A first estimate of the step time only picks the source rate; the reported
        # step time is measured below on the decoded frames.
        estimate = float(np.median(_warm(net, config, clip.frames, prompts, steps=10)[5:]))
        if fps is None:
            fps = max(_CAMERA_FPS, 3.0 / estimate)
        video = write_video(clip.frames, tmp / "clip.mp4", fps=fps)
        decoded = _decode(video)

        back_to_back = _bare_steps(StreamingEngine(net, config), decoded, prompts, frames)[warmup:]
        # The same steps at the source's pace: what the step costs an engine that idles
        # between frames (device clocks, the host thread's wake-ups), without the tracker.
        paced = _bare_steps(StreamingEngine(net, config), decoded, prompts, frames,
                            interval=1.0 / fps)[warmup:]
        step_ms, paced_ms = _median_step_ms(back_to_back), _median_step_ms(paced)
        log(f"  bare engine: {step_ms:.1f} ms/step back to back, {paced_ms:.1f} ms at the source's pace "
            f"(medians); source paced at {fps:.1f} fps (a frame every {1000 / fps:.1f} ms), "
            f"live queue depth {depth}")

        # The prompts go on the first frame the tracker gets; with a dropping queue that is
        # almost always frame 0 (the pacer releases it at once), and if not, the box is a
        # few pixels off, which changes nothing in the timing.
        run = RunConfig(source=str(video), engine=config, prompts={0: prompts}, stream="bench",
                        publish="tcp://127.0.0.1:0", warn_exposed=False, max_frames=frames,
                        realtime=True, loop=True, capture=live, progress=False, emit=emit,
                        decode=decode, launch_ahead=launch_ahead)
        tracked = _run_tracker(run, StreamingEngine(net, config), warmup)
        if len(tracked.stamps) != frames:
            raise RuntimeError(f"the tracker published {len(tracked.stamps)} of {frames} frames")
    timed = tracked.stamps[warmup:]
    total = [(t.publish - t.capture) * 1000 for t in timed]
    queue = [(t.dequeue - t.capture) * 1000 for t in timed]
    infer = [(t.infer_end - t.infer_start) * 1000 for t in timed]
    res = LatencyBenchResult(
        "latency", str(dev), model, image_size, (decoded[0].shape[1], decoded[0].shape[0]),
        torch.get_num_threads(), frames, warmup, objects, float(fps), depth,
        engine_step_ms=step_ms, engine_step_paced_ms=paced_ms, engine_phases_ms=_phases_ms(back_to_back),
        engine_paced_phases_ms=_phases_ms(paced), tracker_phases_ms=tracked.loop_ms,
        latency_ms=_percentiles(total, (50, 95, 99)),
        queue_ms=_percentiles(queue, (50, 95)), pipeline_infer_ms=float(np.median(infer)),
        frames_decoded=tracked.frames_decoded, frames_delivered=tracked.frames_delivered,
        dropped=tracked.dropped, messages_received=tracked.received, compile=config.compile,
        compile_mode=config.compile_mode, emit=emit, decode=decode, launch_ahead=launch_ahead,
    )
    res.ratio = res.latency_ms["p95"] / res.engine_step_ms
    res.meets_goal = res.ratio <= LATENCY_GOAL
    lat, q = res.latency_ms, res.queue_ms
    _table([
        ("", "p50 ms", "p95 ms", "p99 ms"),
        ("capture -> publish", f"{lat['p50']:.1f}", f"{lat['p95']:.1f}", f"{lat['p99']:.1f}"),
        ("capture -> dequeue (queue wait)", f"{q['p50']:.1f}", f"{q['p95']:.1f}", ""),
        # Launching ahead, a frame is finished after the next one is launched: its span holds that launch.
        ("engine step in the tracker (median" + (", launch to finish)" if launch_ahead else ")"),
         f"{res.pipeline_infer_ms:.1f}", "", ""),
        ("bare engine step (median)", f"{res.engine_step_ms:.1f}", "", ""),
        ("bare engine step at the source's pace (median)", f"{res.engine_step_paced_ms:.1f}", "", ""),
    ], log)
    _table(_phase_rows({"bare engine": res.engine_phases_ms, "bare, paced": res.engine_paced_phases_ms,
                        "tracker": res.tracker_phases_ms}), log)
    drops = sum(res.dropped.values())
    log(f"  capture: {res.frames_decoded} frames decoded, {res.frames_delivered} delivered, {drops} dropped "
        f"({', '.join(f'{k} {v}' for k, v in res.dropped.items()) or 'none'})")
    log(f"  ratio p95 / engine step: {res.ratio:.2f} (goal <= {LATENCY_GOAL}): {_verdict(res.meets_goal)}")
    return res


# ------------------------------------------------------------------------------ memory


@dataclass
class MemorySample:
    frame: int  # frames processed so far
    rss_bytes: int
    state_bytes: int
    cuda_allocated_bytes: int | None = None  # on CUDA, where the state lives (RSS does not see it)


@dataclass
class MemoryBenchResult:
    benchmark: str
    device: str
    model: str
    image_size: int
    frame_size: tuple[int, int]
    objects: int
    clip_frames: int  # the synthetic clip looped by the engine
    frames: int
    early_frame: int
    engine: list[MemorySample] = field(default_factory=list)
    rss_growth_pct: float = 0.0  # engine process, early_frame -> frames
    state_growth_pct: float = 0.0
    goal_max_pct: float = MEMORY_GOAL_PCT
    meets_goal: bool = False
    official: list[MemorySample] = field(default_factory=list)
    official_state_bytes_per_frame: float | None = None  # slope between the first and last sample
    official_rss_growth_pct: float | None = None


def _cuda_bytes(dev: torch.device) -> int | None:
    return int(torch.cuda.memory_allocated(dev)) if dev.type == "cuda" else None


def _sample_points(early: int, last: int, every: int = 500) -> list[int]:
    return sorted({early, last, *range(every, last, every)} - set(range(early)))


def engine_memory(model: str, checkpoint: str, image_size: int, device: str, frame_size: tuple[int, int],
                  objects: int, clip_frames: int, frames: int, early: int,
                  verbose: bool) -> list[MemorySample]:
    """The engine side, in its own process: loop a short clip for ``frames`` steps."""
    dev = resolve_device(device)
    clip = make_clip(clip_frames, *frame_size, num_objects=3, seed=3)
    prompts = _prompts(clip, objects)
    config = EngineConfig(device=str(dev), image_size=image_size, max_objects=max(64, objects))
    engine = StreamingEngine(build_model(model, checkpoint, device=dev, image_size=image_size), config)
    wanted = set(_sample_points(early, frames))
    samples = []
    started = time.monotonic()
    for i in range(frames):
        engine.step(clip.frames[i % clip_frames], prompts if i == 0 else [])
        if i + 1 in wanted:
            gc.collect()
            samples.append(MemorySample(i + 1, rss_bytes(), engine.state_bytes(), _cuda_bytes(dev)))
            if verbose:
                print(f"  engine: {i + 1:6d} frames, RSS {samples[-1].rss_bytes / 2**20:8.1f} MiB, "
                      f"state {samples[-1].state_bytes / 1024:8.1f} KiB "
                      f"({(time.monotonic() - started) / (i + 1) * 1000:.0f} ms/frame)", flush=True)
    return samples


def official_memory(model: str, checkpoint: str, image_size: int, device: str, frame_size: tuple[int, int],
                    objects: int, counts: list[int], verbose: bool) -> list[MemorySample]:
    """The official predictor, in its own process: ``init_state`` over max(counts)
    frames written as JPEGs, then ``propagate_in_video``, sampled after each count."""
    from PIL import Image

    silence_official_progress()
    dev = resolve_device(device)
    n = max(counts)
    clip = make_clip(n, *frame_size, num_objects=3, seed=3)
    predictor = build_model(model, checkpoint, device=dev, image_size=image_size)
    with tempfile.TemporaryDirectory(prefix="streamtrack-bench-") as folder:
        for i, f in enumerate(clip.frames):
            Image.fromarray(f).save(Path(folder) / f"{i:05d}.jpg", quality=95)
        state = predictor.init_state(folder)  # loads every frame: the folder is done with
    for p in _prompts(clip, objects):
        predictor.add_new_points_or_box(state, 0, p.obj_id, box=np.array(p.box, np.float32))
    wanted = set(counts)
    samples = []
    for idx, _ in enumerate(predictor.propagate_in_video(state)):
        if idx + 1 in wanted:
            gc.collect()
            samples.append(MemorySample(idx + 1, rss_bytes(), _official_state_bytes(state), _cuda_bytes(dev)))
            if verbose:
                print(f"  official: {idx + 1:4d} frames, RSS {samples[-1].rss_bytes / 2**20:8.1f} MiB, "
                      f"state {samples[-1].state_bytes / 1024:8.1f} KiB", flush=True)
    return samples


def _memory_rows(samples: list[MemorySample]) -> list[tuple]:
    cuda = any(s.cuda_allocated_bytes is not None for s in samples)
    rows: list[tuple] = [("frames", "RSS MiB", "state KiB", *(("CUDA allocated MiB",) if cuda else ()))]
    for s in samples:
        extra = (f"{(s.cuda_allocated_bytes or 0) / 2**20:.1f}",) if cuda else ()
        rows.append((s.frame, f"{s.rss_bytes / 2**20:.1f}", f"{s.state_bytes / 1024:.1f}", *extra))
    return rows


def _growth_pct(a: int, b: int) -> float:
    return (b - a) / a * 100.0 if a else 0.0


def _in_fresh_process(fn, *args):
    """``fn(*args)`` in a fresh interpreter, its exception raised here.  Interrupted (Ctrl-C,
    or SIGTERM to this process only), the child is stopped, not waited for: a pool's exit
    would let it run its whole job first."""
    pool = ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn"))
    try:
        return pool.submit(fn, *args).result()
    except BaseException:
        if hasattr(pool, "terminate_workers"):  # Python 3.14
            pool.terminate_workers()
        else:
            for proc in list((getattr(pool, "_processes", None) or {}).values()):
                proc.terminate()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def bench_memory(
    *,
    model: str = "sam2.1_hiera_tiny",
    checkpoint: str | None = None,
    image_size: int = 64,
    frames: int = 2000,
    early_frame: int = 200,
    objects: int = 1,
    device: str = "auto",
    frame_size: tuple[int, int] = (128, 96),
    clip_frames: int = 50,
    official_frames: tuple[int, ...] = (50, 100, 200),
    log: Log = print,
) -> MemoryBenchResult:
    _positive("--early-frame", early_frame)
    _positive("--frames", frames, early_frame + 1)
    _positive("--clip-frames", clip_frames)
    _positive("--objects", objects)
    for n in official_frames:
        _positive("--official-frames", n)
    dev = resolve_device(device)  # a bad device fails here, not in a child
    verbose = log is print  # the children print their own progress lines (a log cannot cross processes)
    res = MemoryBenchResult("memory", str(dev), model, image_size, frame_size, objects, clip_frames, frames,
                            early_frame)
    with tempfile.TemporaryDirectory(prefix="streamtrack-bench-") as workdir:  # ~150 MB of checkpoint
        checkpoint = _checkpoint(model, checkpoint, Path(workdir))
        # One side after the other (never both at once: they would compete for the CPU),
        # each in a fresh interpreter so neither sees the other's allocations.
        res.engine = _in_fresh_process(engine_memory, model, checkpoint, image_size, device, frame_size,
                                       objects, clip_frames, frames, early_frame, verbose)
        if official_frames:
            res.official = _in_fresh_process(official_memory, model, checkpoint, image_size, device,
                                             frame_size, objects, sorted(set(official_frames)), verbose)
    first, last = res.engine[0], res.engine[-1]
    res.rss_growth_pct = _growth_pct(first.rss_bytes, last.rss_bytes)
    res.state_growth_pct = _growth_pct(first.state_bytes, last.state_bytes)
    res.meets_goal = res.rss_growth_pct <= MEMORY_GOAL_PCT and res.state_growth_pct <= MEMORY_GOAL_PCT

    log(f"  streaming engine ({objects} object(s), a {clip_frames}-frame clip looped):")
    _table(_memory_rows(res.engine), log)
    log(f"  growth from frame {first.frame} to {last.frame}: RSS {res.rss_growth_pct:+.2f} %, "
        f"state {res.state_growth_pct:+.2f} % (goal <= {MEMORY_GOAL_PCT:g} %): {_verdict(res.meets_goal)}")
    if len(res.official) >= 1:
        log(f"  official SAM2VideoPredictor (same weights; all {max(official_frames)} frames "
            "loaded up front):")
        _table(_memory_rows(res.official), log)
    if len(res.official) >= 2:
        a, b = res.official[0], res.official[-1]
        res.official_state_bytes_per_frame = (b.state_bytes - a.state_bytes) / (b.frame - a.frame)
        res.official_rss_growth_pct = _growth_pct(a.rss_bytes, b.rss_bytes)
        log(f"  official state +{res.official_state_bytes_per_frame / 1024:.1f} KiB per frame, "
            "without bound; "
            f"RSS {res.official_rss_growth_pct:+.2f} % from frame {a.frame} to {b.frame}")
    return res


# -------------------------------------------------------------------------------- CLI


def _check_counts(args: argparse.Namespace) -> None:
    """The limits each benchmark checks again when it starts, checked from the options."""
    if args.what in ("pipeline", "latency"):
        _positive("--warmup", args.warmup)
        _positive("--frames", args.frames, args.warmup + 2)
    if args.what == "latency":
        _positive("--clip-frames", args.clip_frames, 2)
        if args.queue_depth is not None:
            _positive("--queue-depth", args.queue_depth)
        _check_fps(args.fps)
    if args.what == "memory":
        _positive("--early-frame", args.early_frame)
        _positive("--frames", args.frames, args.early_frame + 1)
        _positive("--clip-frames", args.clip_frames)
        for n in args.official_frames:
            _positive("--official-frames", n)


def main(args: argparse.Namespace) -> int:
    apply_defaults(args)
    log: Log = (lambda *a, **k: None) if args.json else print
    objects = _one_count(args.objects, args.what)
    frame_size = parse_frame_size(args.frame_size)
    _check_counts(args)  # before the header: a bad option gets its line alone
    log(f"{args.what} benchmark: {args.model}, input {args.image_size}, {frame_size[0]}x{frame_size[1]} "
        f"frames, {args.frames} frames, {objects} object(s), device {resolve_device(args.device)}, "
        f"{torch.get_num_threads()} torch threads")
    common = dict(model=args.model, checkpoint=args.checkpoint, image_size=args.image_size,
                  frames=args.frames, objects=objects, device=args.device, frame_size=frame_size, log=log)
    res: PipelineBenchResult | LatencyBenchResult | MemoryBenchResult
    if args.what == "pipeline":
        res = bench_pipeline(**common, warmup=args.warmup, repeats=args.repeats, preprocess=args.preprocess,
                             emit=args.emit, decode=args.decode, launch_ahead=args.launch_ahead,
                             **compile_options(args))
    elif args.what == "latency":
        res = bench_latency(**common, warmup=args.warmup, clip_frames=args.clip_frames, fps=args.fps,
                            queue_depth=args.queue_depth, preprocess=args.preprocess, emit=args.emit,
                            decode=args.decode, launch_ahead=args.launch_ahead, **compile_options(args))
    elif args.what == "memory":
        res = bench_memory(**common, early_frame=args.early_frame, clip_frames=args.clip_frames,
                           official_frames=tuple(args.official_frames))
    else:
        raise UserError(f"unknown benchmark {args.what!r}; choose one of {', '.join(WHATS)}")
    if args.json:
        print_json(res)
    return 0
