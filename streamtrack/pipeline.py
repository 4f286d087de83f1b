"""The tracking loop: capture -> engine -> results (publisher, writers), with control.

``track(config)`` runs until the source ends, ``max_frames`` is reached or it
is interrupted, and returns a :class:`RunSummary`.  Outputs are closed in a
``finally`` so Ctrl-C leaves complete files.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from streamtrack.capture import CaptureConfig, SourceKind, open_source
from streamtrack.engine import EngineConfig, FrameOutput, Prompt, StreamingEngine
from streamtrack.errors import UserError
from streamtrack.overlay import Annotation, annotate
from streamtrack.protocol import FrameResult, ObjectResult, Timestamps, encode_mask, now
from streamtrack.publisher import StatsWindow

log = logging.getLogger(__name__)


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


@dataclass
class RunSummary:
    frames: int = 0
    seconds: float = 0.0
    latency_p50: float | None = None  # capture -> result, seconds
    latency_p95: float | None = None
    dropped: dict[str, int] = field(default_factory=dict)
    objects: dict[int, str] = field(default_factory=dict)  # final state per object
    source_state: str = ""
    interrupted: bool = False

    @property
    def fps(self) -> float:
        return self.frames / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        lat = (
            f"latency p50 {self.latency_p50 * 1000:.0f} ms p95 {self.latency_p95 * 1000:.0f} ms"
            if self.latency_p50 is not None else "latency n/a"
        )
        drops = sum(self.dropped.values())
        objs = ", ".join(f"{k}:{v}" for k, v in sorted(self.objects.items())) or "none"
        how = " (interrupted)" if self.interrupted else ""
        return (f"{self.frames} frames in {self.seconds:.1f} s ({self.fps:.2f} fps), {lat}, "
                f"{drops} dropped, objects {objs}{how}")


class _Controls:
    """Control-channel handler: requests are queued and applied on the next frame."""

    def __init__(self, tracker: Tracker):
        self.tracker = tracker
        self.pending: list[Prompt] = []
        self.paused = False

    def add_prompt(self, cmd):
        prompt = Prompt.make(cmd.obj_id, cmd.points, cmd.labels, cmd.box, cmd.mask_array())
        if any(p.obj_id == prompt.obj_id for p in self.pending):
            self.pending = [p for p in self.pending if p.obj_id != prompt.obj_id]
        self.pending.append(prompt)
        return {"queued_for_frame": self.tracker.frames_seen}

    def remove_object(self, obj_id):
        self.tracker.engine.remove_object(obj_id)
        return {"objects": self.tracker.engine.object_ids}

    def reset(self):
        self.pending.clear()
        self.tracker.engine.reset()
        return {"objects": []}

    def status(self):
        return self.tracker.status()

    def pause(self):
        self.paused = True
        return {"paused": True}

    def resume(self):
        self.paused = False
        return {"paused": False}


class Tracker:
    """One source, one engine, its outputs.  Not thread-safe: run it on one thread."""

    def __init__(self, config: RunConfig, engine: StreamingEngine | None = None):
        self.config = config
        self.engine = engine  # built in run(), after the source has opened
        self.frames_seen = 0
        self.window = StatsWindow(stream=config.stream)
        self._stop = threading.Event()
        self._seq = 0
        self._object_states: dict[int, str] = {}
        self.capture = None
        self._controls = _Controls(self)

    def stop(self) -> None:
        self._stop.set()

    def status(self) -> dict:
        return {
            "frames": self.frames_seen,
            "objects": {str(k): v for k, v in self._object_states.items()},
            "source_state": self.capture.state.value if self.capture else "idle",
            "paused": self._controls.paused,
        }

    def run(self) -> RunSummary:
        cfg = self.config
        cap_cfg = cfg.capture or CaptureConfig(realtime=cfg.realtime, name=cfg.stream)
        self.capture = open_source(cfg.source, cap_cfg)
        outputs = _Outputs(cfg)
        control = None
        summary = RunSummary()
        started = time.monotonic()
        try:
            if cfg.control:
                from streamtrack.control import ControlServer

                control = ControlServer(cfg.control, self._controls)
            self.capture.start()  # a missing file or camera fails here, before the slow model load
            if self.engine is None:
                self.engine = StreamingEngine.from_config(cfg.engine)
            bar = _progress(cfg, self.capture)
            last_stats = 0.0
            while not self._stop.is_set():
                if cfg.max_frames is not None and self.frames_seen >= cfg.max_frames:
                    break
                if control is not None:
                    control.poll_once(0)
                frame = self.capture.read(timeout=0.1)
                if frame is None:
                    if self.capture.state.terminal:
                        break
                    continue
                if self._controls.paused:
                    continue
                dequeue = now()
                prompts = cfg.prompts.get(self.frames_seen, []) + self._controls.pending
                self._controls.pending = []
                out = self.engine.step(
                    frame.image, _merge_prompts(prompts), timestamp=frame.capture_monotonic
                )
                result = self._result(frame, dequeue, out)
                result = outputs.emit(result, frame.image, out)
                self.window.add(result)
                self._status_changes(outputs, result)
                self.frames_seen += 1
                if bar is not None:
                    bar.update(1)
                if outputs.publisher is not None and time.monotonic() - last_stats >= 1.0:
                    last_stats = time.monotonic()
                    outputs.publisher.publish_stats(self.window.snapshot(
                        dropped=self.capture.stats().dropped, memory_bytes=self.engine.state_bytes()))
            if bar is not None:
                bar.close()
        except KeyboardInterrupt:
            summary.interrupted = True
        finally:
            self.capture.close()
            outputs.close()
            if control is not None:
                control.close()
        summary.frames = self.frames_seen
        summary.seconds = time.monotonic() - started
        lat = self.window.latency().get("total")
        if lat is not None:
            summary.latency_p50, summary.latency_p95 = lat.p50, lat.p95
        stats = self.capture.stats()
        summary.dropped = dict(stats.dropped)
        summary.source_state = self.capture.state.value
        summary.objects = dict(self._object_states)
        if self.capture.state.value == "failed" and self.frames_seen == 0:
            raise UserError(f"source {cfg.source!r} failed: {stats.last_error}")
        return summary

    def _result(self, frame, dequeue: float, out: FrameOutput) -> FrameResult:
        objects = tuple(
            ObjectResult(
                obj_id=o.obj_id, score=round(o.score, 4), state=o.state.value,
                bbox=o.bbox, area=o.area, rle=encode_mask(o.mask), iou=round(o.iou, 4),
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
            source_state=self.capture.state.value, dropped=dict(stats.dropped), objects=objects,
        )

    def _status_changes(self, outputs: _Outputs, result: FrameResult) -> None:
        current = {o.obj_id: o.state for o in result.objects}
        for obj_id, state in current.items():
            if self._object_states.get(obj_id) != state and outputs.publisher is not None:
                outputs.publisher.publish_status("object_state", obj_id=obj_id, state=state,
                                                 previous=self._object_states.get(obj_id))
        self._object_states = current


class _Outputs:
    def __init__(self, cfg: RunConfig):
        from streamtrack.outputs import JsonlWriter, MaskPngWriter, VideoWriter

        self.publisher = None
        self.jsonl = JsonlWriter(cfg.save_jsonl) if cfg.save_jsonl else None
        self.masks = MaskPngWriter(cfg.save_masks) if cfg.save_masks else None
        self.video = VideoWriter(cfg.save_video) if cfg.save_video else None
        if cfg.publish:
            from streamtrack.publisher import Publisher

            self.publisher = Publisher(cfg.publish, stream=cfg.stream)

    def emit(self, result: FrameResult, image: np.ndarray, out: FrameOutput) -> FrameResult:
        if self.publisher is not None:
            result = self.publisher.publish_result(result)
        else:
            result = result.with_timestamps(publish=now())
        if self.jsonl is not None:
            self.jsonl.write(result)
        if self.masks is not None:
            self.masks.write(result.frame_id, {o.obj_id: o.mask for o in out.objects}, image.shape[:2])
        if self.video is not None:
            self.video.write(annotate(image, [
                Annotation(o.obj_id, o.mask, o.bbox, o.score) for o in out.objects
            ]))
        return result

    def close(self) -> None:
        for w in (self.jsonl, self.masks, self.video, self.publisher):
            if w is not None:
                w.close()


def _merge_prompts(prompts: list[Prompt]) -> list[Prompt]:
    """Later prompts for the same object on the same frame win (control over file)."""
    by_id: dict[int, Prompt] = {}
    for p in prompts:
        by_id[p.obj_id] = p
    return list(by_id.values())


def _progress(cfg: RunConfig, capture):
    if not cfg.progress or capture.kind is not SourceKind.FILE:
        return None
    from tqdm import tqdm

    total = _frame_count(cfg.source)
    if cfg.max_frames is not None:
        total = min(total, cfg.max_frames) if total else cfg.max_frames
    return tqdm(total=total or None, unit="frame", desc="tracking", dynamic_ncols=True)


def _frame_count(path: str) -> int | None:
    import av

    try:
        with av.open(path) as c:
            return c.streams.video[0].frames or None
    except Exception:  # noqa: BLE001 - only a progress-bar nicety
        return None

