"""``streamtrack bench multistream``: several streams on one model.

For 1, 2, 4 … streams (``objects`` each, default one; different clips), frames/s per stream
of engines sharing one model and one batched image encoder, each stream on its
own thread (what :class:`~streamtrack.multistream.StreamGroup` does), against
the same engines stepped one after another on one thread with an encoder pass
per frame (the plain way to serve several streams from one model), measured in
the same run on the same frames.  A third side, one thread per stream with
batches of one (``max_batch=1``), separates what batching does from what the
threads do.  With ``processes=True`` a fourth side runs each stream in its own
process with its own copy of the model (what a fleet with one stream per actor
does), all processes stepping at once.
"""

from __future__ import annotations

import tempfile
import threading
import time
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch

from streamtrack import childproc
from streamtrack.bench import _prompts, print_json, sync_device
from streamtrack.engine import EngineConfig, Prompt, StreamingEngine
from streamtrack.models import build_model, resolve_device, save_random_checkpoint
from streamtrack.multistream import SharedImageEncoder
from streamtrack.synthetic import make_clip


@dataclass
class MultiStreamBenchResult:
    device: str
    model: str
    image_size: int
    frames: int
    bf16: bool
    torch_threads: int
    objects: int = 1  # per stream
    sequential_fps: dict[int, float] = field(default_factory=dict)  # streams -> frames/s per stream
    batched_fps: dict[int, float] = field(default_factory=dict)
    threaded_fps: dict[int, float] = field(default_factory=dict)  # one thread per stream, no batching
    process_fps: dict[int, float] = field(default_factory=dict)  # one process per stream (processes=True)
    ratio: dict[int, float] = field(default_factory=dict)  # batched / sequential
    batch_size: dict[int, float] = field(default_factory=dict)  # mean frames per encoder pass


def _warm_up(net, config: EngineConfig, width: int, height: int, seed: int) -> None:
    """A few untimed steps on a clip of their own (CUDA initialises lazily)."""
    clip = make_clip(8, width, height, num_objects=1, seed=seed)
    engine = StreamingEngine(net, config)
    for i, frame in enumerate(clip.frames):
        engine.step(frame, [Prompt.make(1, box=clip.box(1, 0))] if i == 0 else [])


def _engine_inputs(n: int, frames: int, width: int, height: int, objects: int = 1):
    clips = [make_clip(frames, width, height, num_objects=3, seed=10 + k) for k in range(n)]
    return clips, [_prompts(c, objects) for c in clips]


def bench_multistream(
    *, model: str = "sam2.1_hiera_tiny", checkpoint: str | None = None, image_size: int = 256,
    frames: int = 12, streams: tuple[int, ...] = (1, 2, 4), device: str = "auto", bf16: bool = True,
    width: int = 320, height: int = 240, max_wait: float = 0.05, repeats: int = 1,
    processes: bool = False, objects: int = 1, log=print,
) -> MultiStreamBenchResult:
    dev = resolve_device(device)
    with tempfile.TemporaryDirectory(prefix="streamtrack-bench-") as workdir:  # ~150 MB of checkpoint
        if checkpoint is None:
            checkpoint = str(save_random_checkpoint(model, Path(workdir) / "random.pt"))
        bf16 = bf16 and dev.type == "cuda"
        config = EngineConfig(bf16=bf16, max_objects=max(64, objects))
        net = build_model(model, checkpoint, device=dev, image_size=image_size)
        res = MultiStreamBenchResult(str(dev), model, image_size, frames, bf16, torch.get_num_threads(),
                                     objects)

        _warm_up(net, config, width, height, seed=10)

        for n in streams:
            clips, prompts = _engine_inputs(n, frames, width, height, objects)
            seq_runs, batched_runs, threaded_runs, sizes = [], [], [], []
            for _ in range(repeats):  # alternate the sides; keep the median of each
                seq_runs.append(_sequential(net, config, dev, clips, prompts))
                fps, size = _batched(net, config, dev, clips, prompts, max_wait)
                batched_runs.append(fps)
                sizes.append(size)
                if n > 1:
                    threaded_runs.append(_batched(net, config, dev, clips, prompts, max_wait, max_batch=1)[0])
            res.sequential_fps[n] = float(np.median(seq_runs))
            res.batched_fps[n] = float(np.median(batched_runs))
            res.threaded_fps[n] = float(np.median(threaded_runs)) if threaded_runs else res.batched_fps[n]
            res.batch_size[n] = float(np.mean(sizes))
            res.ratio[n] = res.batched_fps[n] / res.sequential_fps[n]
            per_process = ""
            if processes:
                spec = _ProcessSpec(model, checkpoint, image_size, device, bf16, frames, width, height,
                                    torch.get_num_threads(), objects)
                res.process_fps[n] = float(np.median([_process_per_stream(spec, n) for _ in range(repeats)]))
                per_process = f"process per stream {res.process_fps[n]:7.2f}   "
            log(f"  {n} stream(s), frames/s per stream: one after another {res.sequential_fps[n]:7.2f}   "
                f"threads, unbatched {res.threaded_fps[n]:7.2f}   batched {res.batched_fps[n]:7.2f}   "
                f"{per_process}ratio batched / one after another {res.ratio[n]:.2f}   "
                f"(mean encoder batch {res.batch_size[n]:.1f})")
        return res


def _sequential(net, config, dev, clips, prompts) -> float:
    """One thread, the streams' engines stepped in turn; frames/s per stream."""
    n, frames = len(clips), len(clips[0].frames)
    engines = [StreamingEngine(net, config) for _ in range(n)]
    for k in range(n):
        engines[k].step(clips[k].frames[0], prompts[k])
    sync_device(dev)
    t0 = time.perf_counter()
    for i in range(1, frames):
        for k in range(n):
            engines[k].step(clips[k].frames[i])
    sync_device(dev)
    return (frames - 1) / (time.perf_counter() - t0)


def _batched(net, config, dev, clips, prompts, max_wait, max_batch: int = 16) -> tuple[float, float]:
    """One thread per stream, one shared encoder; frames/s per stream and mean batch."""
    n, frames = len(clips), len(clips[0].frames)
    encoder = SharedImageEncoder(net, max_wait=max_wait, max_batch=max_batch)
    engines = [StreamingEngine(net, config, encoder=encoder) for _ in range(n)]
    start, done = threading.Barrier(n + 1), threading.Barrier(n + 1)
    stop = threading.Event()

    def run(k: int) -> None:
        try:
            engines[k].step(clips[k].frames[0], prompts[k])
            start.wait()  # the clock starts with every stream prompted
            for i in range(1, frames):
                if stop.is_set():
                    return
                engines[k].step(clips[k].frames[i])
            sync_device(dev)
            done.wait()
        except threading.BrokenBarrierError:
            return

    threads = [threading.Thread(target=run, args=(k,), daemon=True) for k in range(n)]
    for t in threads:
        t.start()
    try:
        start.wait()
        passes0, frames0 = encoder.batches, encoder.frames
        t0 = time.perf_counter()
        done.wait()
        fps = (frames - 1) / (time.perf_counter() - t0)
    finally:
        # Ctrl-C: the streams stop after their step in hand.  Left running inside torch as
        # the interpreter exits, their threads would abort the process (SIGABRT).
        stop.set()
        start.abort()
        done.abort()
        for t in threads:
            t.join()
    return fps, (encoder.frames - frames0) / max(encoder.batches - passes0, 1)


@dataclass(frozen=True)
class _ProcessSpec:
    model: str
    checkpoint: str
    image_size: int
    device: str
    bf16: bool
    frames: int
    width: int
    height: int
    torch_threads: int  # shared out among the processes, so a CPU is not oversubscribed
    objects: int = 1


def _process_per_stream(spec: _ProcessSpec, n: int) -> float:
    """N processes, each its own model and one stream, stepping at the same time;
    mean frames/s per stream."""
    ctx = get_context("spawn")
    ready, results = ctx.Barrier(n + 1), ctx.Queue()
    procs = [ctx.Process(target=_stream_process, args=(spec, n, k, ready, results), daemon=True)
             for k in range(n)]
    for p in procs:
        childproc.start_without_ctrl_c(p)  # Ctrl-C is the parent's to handle: it stops them
    finished = False
    try:
        try:
            ready.wait(timeout=600)  # every process has loaded its model and warmed up
        except threading.BrokenBarrierError:
            pass  # a process failed: its message is in the results
        fps = [results.get(timeout=600) for _ in range(n)]
        finished = True
    finally:
        if not finished:  # Ctrl-C, SIGTERM: they ignore Ctrl-C and may wait on the barrier
            ready.abort()
            for p in procs:
                p.terminate()
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
    errors = sorted((f for f in fps if isinstance(f, str)), key=lambda e: e.startswith("another"))
    if errors:
        raise RuntimeError(f"a stream process failed: {errors[0]}")
    return float(np.mean(fps))


def _stream_process(spec: _ProcessSpec, n: int, k: int, ready, results) -> None:
    try:
        torch.set_num_threads(max(1, spec.torch_threads // n))
        dev = resolve_device(spec.device)
        net = build_model(spec.model, spec.checkpoint, device=dev, image_size=spec.image_size)
        config = EngineConfig(bf16=spec.bf16, max_objects=max(64, spec.objects))
        (clip,), (prompts,) = _engine_inputs(1, spec.frames, spec.width, spec.height, spec.objects)
        _warm_up(net, config, spec.width, spec.height, seed=10 + k)
        engine = StreamingEngine(net, config)
        engine.step(clip.frames[0], prompts)
        sync_device(dev)
    except Exception as exc:  # noqa: BLE001 - reported to the parent as text
        ready.abort()
        results.put(f"{type(exc).__name__}: {exc}")
        return
    try:
        ready.wait()
    except threading.BrokenBarrierError:
        results.put("another stream process failed")
        return
    t0 = time.perf_counter()
    for frame in clip.frames[1:]:
        engine.step(frame)
    sync_device(dev)
    results.put((spec.frames - 1) / (time.perf_counter() - t0))


def main(args) -> int:
    from streamtrack.bench_stream import _one_count, parse_frame_size

    objects = _one_count(args.objects, "multistream")  # options first: a bad one gets its line alone
    width, height = parse_frame_size(args.frame_size)
    log = (lambda *a, **k: None) if args.json else print
    log(f"multistream benchmark: {args.model}, input {args.image_size}, {args.frames} frames per stream, "
        f"{objects} object(s) per stream, device {resolve_device(args.device)}, "
        f"{torch.get_num_threads()} torch threads")
    res = bench_multistream(
        model=args.model, checkpoint=args.checkpoint, image_size=args.image_size, frames=args.frames,
        streams=tuple(args.streams), device=args.device, bf16=args.bf16, repeats=args.repeats,
        width=width, height=height, processes=args.processes, objects=objects, log=log,
    )
    if args.json:
        print_json(res)
    return 0
