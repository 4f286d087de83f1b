"""The pipeline's host overhead, without a GPU: the tracker around a stand-in engine.

    python benchmarks/pipeline_overhead.py [--host-ms 3] [--device-ms 7] [--objects 1]

On a GPU a SAM 2 step is a few milliseconds of Python launching work (interpreter lock
held) and a wait for the device (lock released).  The stand-in engine does exactly that
-- ``--host-ms`` of Python, then ``--device-ms`` of sleep -- and returns full-frame
masks, so the capture thread (decode 720p), the emit thread (RLE, JSON, ZeroMQ) and the
tracker compete for the interpreter as they do on a GPU machine.  Prints frames/s of the
stand-in stepped on decoded frames (the bare rate) and of the full pipeline with the
decoder and the emitter each on a thread or in a process, and with ``/ahead`` the tracker's
``launch_ahead`` (``--variants``; the stand-in's device time then overlaps the next
frame's Python, as one GPU queue would), and their
ratios (``bench pipeline``'s figure, goal >= 0.95), all measured in this run; with
``--live FPS``, capture -> publish latency behind a paced source instead.

``--host-kind launches`` makes the host part tiny torch calls instead of a pure Python
loop: each gives the interpreter lock up and takes it back, as a real step's kernel
launches do, so the other threads' Python lands on the step as it does on a GPU
(``benchmarks/lock_probe.py`` shows the effect on its own).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import options  # benchmarks/options.py
import torch

from streamtrack.bench_stream import _bare_steps, _decode, _median_phases, _phases_ms, _run_tracker
from streamtrack.engine import FrameOutput, ObjectOutput, ObjectState
from streamtrack.pipeline import RunConfig
from streamtrack.protocol import mask_area, mask_bbox
from streamtrack.synthetic import make_clip, write_video


def _python_work(iterations: int) -> int:
    n = 0
    for i in range(iterations):
        n += i & 7
    return n


_COUNTER = torch.zeros(1)


def _launch_work(iterations: int) -> int:
    """Tiny torch operations: like every kernel launch from Python, each one gives the
    interpreter lock up and takes it back, and any other thread that wants the lock gets
    it in between."""
    for _ in range(iterations):
        _COUNTER.add_(1)
    return iterations


HOST_WORK = {"python": _python_work, "launches": _launch_work}


class StandInEngine:
    """A fixed amount of Python (``host_ms`` when alone), then a wait for ``device_ms``
    (lock released), then masks.  The Python part is a fixed number of iterations, not a
    fixed time, so a step takes longer when other threads hold the interpreter lock, as
    launching a fixed number of kernels does."""

    device = torch.device("cpu")  # its "device" wait happens in finish(): nothing to sync

    def __init__(self, host_ms: float, device_ms: float, objects: int, height: int, width: int,
                 host_kind: str = "python"):
        self.device_s = device_ms / 1000
        self.work = HOST_WORK[host_kind]
        t0 = time.perf_counter()
        self.work(200_000)
        per_iteration = (time.perf_counter() - t0) / 200_000
        self.iterations = max(1, int(host_ms / 1000 / per_iteration))
        self.object_ids = list(range(1, objects + 1))
        self._device_free = 0.0  # perf_counter time the stand-in device is done with its queue
        self.masks = []
        for k in self.object_ids:
            m = np.zeros((height, width), bool)
            m[height // 4 : height // 2, k * width // (objects + 2) : (k + 1) * width // (objects + 2)] = True
            self.masks.append(m)

    def launch(self, image, prompts=(), timestamp=None) -> tuple[float, float, tuple]:
        start = time.time()
        self.work(self.iterations)  # interpreter work, as launching kernels is
        # One device queue: this frame's work starts once launched and once the frame
        # before it is done, as on a GPU stream.
        self._device_free = max(time.perf_counter(), self._device_free) + self.device_s
        return start, self._device_free, image.shape

    def finish(self, pending: tuple[float, float, tuple]) -> FrameOutput:
        start, done, shape = pending
        wait = done - time.perf_counter()
        if wait > 0:
            time.sleep(wait)  # the device wait: the lock is free meanwhile
        objects = tuple(
            ObjectOutput(obj_id=k, mask=m, score=0.9, object_score_logit=2.0, iou=0.9, bbox=mask_bbox(m),
                         area=mask_area(m), state=ObjectState.VISIBLE, prompted=False)
            for k, m in zip(self.object_ids, self.masks, strict=True)
        )
        return FrameOutput(0, shape[1], shape[0], objects, start, time.time())

    def step(self, image, prompts=(), timestamp=None) -> FrameOutput:
        return self.finish(self.launch(image, prompts, timestamp))

    def state_bytes(self) -> int:
        return 0


def _phase_text(phases: dict[str, float]) -> str:
    return ", ".join(f"{k.replace('_', ' ')} {v:.2f}" for k, v in phases.items())


def _variant(text: str) -> tuple[str, str, bool]:
    parts = text.split("/")
    modes = ("thread", "process")
    if not (len(parts) in (2, 3) and parts[0] in modes and parts[1] in modes
            and parts[2:] in ([], ["ahead"])):
        raise argparse.ArgumentTypeError(
            f"expected DECODE/EMIT[/ahead], each thread or process, got {text!r}")
    return parts[0], parts[1], len(parts) == 3


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--host-ms", type=options.seconds(0), default=3.0)
    ap.add_argument("--device-ms", type=options.seconds(0), default=7.0)
    ap.add_argument("--host-kind", choices=tuple(HOST_WORK), default="python",
                    help="the host part as pure Python, which keeps the interpreter lock until Python "
                         "takes it away (every 5 ms), or as tiny torch operations that each give it up, "
                         "as a real step's kernel launches do (default python)")
    ap.add_argument("--objects", type=options.count(1), default=1)
    ap.add_argument("--frames", type=options.count(10), default=150, help="(the first 5 are not timed)")
    ap.add_argument("--frame-size", type=options.frame_size, default="1280x720")
    ap.add_argument("--repeats", type=options.count(1), default=3)
    ap.add_argument("--variants", type=_variant, nargs="+", metavar="DECODE/EMIT[/ahead]",
                    default=[("thread", "thread", False), ("process", "thread", False),
                             ("thread", "process", False)],
                    help="where the tracker decodes and emits, and /ahead to launch a waiting frame "
                         "before finishing the last (default thread/thread process/thread thread/process)")
    ap.add_argument("--live", type=options.seconds(0, above=True), default=None, metavar="FPS",
                    help="read the clip as a live source paced at FPS (looping) and report "
                         "capture -> publish latency instead of throughput")
    args = ap.parse_args(argv)
    width, height = (int(v) for v in args.frame_size.split("x"))
    engine = StandInEngine(args.host_ms, args.device_ms, args.objects, height, width, args.host_kind)
    variants = [tuple(v) for v in args.variants]
    with tempfile.TemporaryDirectory() as tmp:
        clip = make_clip(args.frames, width, height, num_objects=3, seed=3)
        video = write_video(clip.frames, Path(tmp) / "clip.mp4", fps=args.live or clip.fps)
        decoded = _decode(video)
        bare: list[float] = []
        piped: dict[tuple, list[float]] = {v: [] for v in variants}
        emit_ms: dict[tuple, list[float]] = {v: [] for v in variants}
        latency_ms: dict[tuple, list[float]] = {v: [] for v in variants}
        dequeue_ms: dict[tuple, list[float]] = {v: [] for v in variants}
        between_ms: dict[tuple, list[float]] = {v: [] for v in variants}
        loop_ms: dict[tuple, list[dict[str, float]]] = {v: [] for v in variants}
        bare_phases: list[dict[str, float]] = []
        for _ in range(args.repeats):
            spans = _bare_steps(engine, decoded, [], len(decoded))
            bare.append(len(decoded) / (spans[-1].end - spans[0].start))
            bare_phases.append(_phases_ms(spans))
            for v in variants:  # interleaved, so a slow spell of the machine hits all
                decode, emit, ahead = v
                live = dict(realtime=True, loop=True) if args.live else {}
                run = RunConfig(source=str(video), stream="bench", publish="tcp://127.0.0.1:0",
                                max_frames=args.frames, progress=False, emit=emit, decode=decode,
                                launch_ahead=ahead, **live)
                tracked = _run_tracker(run, engine, warmup=0)  # every frame, as the bare phases
                loop_ms[v].append(tracked.loop_ms)
                published = [t.publish for t in tracked.stamps]
                piped[v].append((len(published) - 5) / (published[-1] - published[4]))
                emit_ms[v] += [(t.publish - t.infer_end) * 1000 for t in tracked.stamps[5:]]
                latency_ms[v] += [(t.publish - t.capture) * 1000 for t in tracked.stamps[5:]]
                dequeue_ms[v] += [(t.dequeue - t.capture) * 1000 for t in tracked.stamps[5:]]
                # The tracker's time between steps: taking the next frame, handing the result over
                # (negative when a frame is launched before the one before it is finished).
                stamps = tracked.stamps
                between_ms[v] += [(stamps[i].infer_start - stamps[i - 1].infer_end) * 1000
                                  for i in range(5, len(stamps))]
    b = float(np.median(bare))
    print(f"stand-in engine ({args.host_ms:g} ms host as {args.host_kind} + {args.device_ms:g} ms device, "
          f"{args.objects} object(s), {width}x{height}): bare {b:.1f} frames/s, "
          f"runs {[round(v, 1) for v in bare]}")
    print(f"  {'bare':32s}: per frame, median ms: " + _phase_text(_median_phases(bare_phases)))
    for variant in variants:
        name = "decode {} / emit {}".format(*variant[:2]) + (" / ahead" if variant[2] else "")
        phases = _median_phases(loop_ms[variant])
        print(f"  {name:32s}: the tracker's thread per frame, median ms: " + _phase_text(phases))
        if args.live:
            p50, p95, p99 = np.percentile(latency_ms[variant], (50, 95, 99))
            print(f"  {name:32s}: live {args.live:g} fps, capture -> publish p50 {p50:.2f} ms, "
                  f"p95 {p95:.2f} ms, p99 {p99:.2f} ms; capture -> dequeue p50 "
                  f"{np.percentile(dequeue_ms[variant], 50):.2f} ms")
            continue
        p = float(np.median(piped[variant]))
        e50, e95 = np.percentile(emit_ms[variant], (50, 95))
        print(f"  {name:32s}: pipeline {p:.1f} frames/s, ratio {p / b:.3f} (goal >= 0.95), runs "
              f"{[round(v, 1) for v in piped[variant]]}; step end -> published p50 {e50:.2f} ms, "
              f"p95 {e95:.2f} ms; between steps p50 {np.percentile(between_ms[variant], 50):.2f} ms")


if __name__ == "__main__":
    main()
