"""``streamtrack bench multistream``: several streams on one model.

For 1, 2, 4 … streams (one object each, different clips), frames/s per stream
of engines sharing one model and one batched image encoder, each stream on its
own thread (what :class:`~streamtrack.multistream.StreamGroup` does), against
the same engines stepped one after another on one thread with an encoder pass
per frame (the plain way to serve several streams from one model), measured in
the same run on the same frames.  A third side, one thread per stream with
batches of one (``max_batch=1``), separates what batching does from what the
threads do.
"""

from __future__ import annotations

import json
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from streamtrack.bench import sync_device
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
    sequential_fps: dict[int, float] = field(default_factory=dict)  # streams -> frames/s per stream
    batched_fps: dict[int, float] = field(default_factory=dict)
    threaded_fps: dict[int, float] = field(default_factory=dict)  # one thread per stream, no batching
    ratio: dict[int, float] = field(default_factory=dict)  # batched / sequential
    batch_size: dict[int, float] = field(default_factory=dict)  # mean frames per encoder pass


def _engine_inputs(n: int, frames: int, width: int, height: int):
    clips = [make_clip(frames, width, height, num_objects=1, seed=10 + k) for k in range(n)]
    return clips, [[Prompt.make(1, box=c.box(1, 0))] for c in clips]


def bench_multistream(
    *, model: str = "sam2.1_hiera_tiny", checkpoint: str | None = None, image_size: int = 256,
    frames: int = 12, streams: tuple[int, ...] = (1, 2, 4), device: str = "auto", bf16: bool = True,
    width: int = 320, height: int = 240, max_wait: float = 0.05, repeats: int = 1, log=print,
) -> MultiStreamBenchResult:
    dev = resolve_device(device)
    if checkpoint is None:
        checkpoint = str(save_random_checkpoint(model, Path(tempfile.mkdtemp()) / "random.pt"))
    bf16 = bf16 and dev.type == "cuda"
    config = EngineConfig(bf16=bf16)
    net = build_model(model, checkpoint, device=dev, image_size=image_size)
    res = MultiStreamBenchResult(str(dev), model, image_size, frames, bf16, torch.get_num_threads())

    warm_clips, warm_prompts = _engine_inputs(1, 3, width, height)
    warm = StreamingEngine(net, config)
    for i, f in enumerate(warm_clips[0].frames):
        warm.step(f, warm_prompts[0] if i == 0 else [])

    for n in streams:
        clips, prompts = _engine_inputs(n, frames, width, height)
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
        log(f"  {n} stream(s), frames/s per stream: one after another {res.sequential_fps[n]:7.2f}   "
            f"threads, unbatched {res.threaded_fps[n]:7.2f}   batched {res.batched_fps[n]:7.2f}   "
            f"ratio batched / one after another {res.ratio[n]:.2f}   "
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

    def run(k: int) -> None:
        engines[k].step(clips[k].frames[0], prompts[k])
        start.wait()  # the clock starts with every stream prompted
        for i in range(1, frames):
            engines[k].step(clips[k].frames[i])
        sync_device(dev)
        done.wait()

    threads = [threading.Thread(target=run, args=(k,), daemon=True) for k in range(n)]
    for t in threads:
        t.start()
    start.wait()
    passes0, frames0 = encoder.batches, encoder.frames
    t0 = time.perf_counter()
    done.wait()
    fps = (frames - 1) / (time.perf_counter() - t0)
    for t in threads:
        t.join()
    return fps, (encoder.frames - frames0) / max(encoder.batches - passes0, 1)


def main(args) -> int:
    log = (lambda *a, **k: None) if args.json else print
    log(f"multistream benchmark: {args.model}, input {args.image_size}, {args.frames} frames per stream, "
        f"device {args.device}, {torch.get_num_threads()} torch threads")
    from streamtrack.bench_stream import parse_frame_size

    width, height = parse_frame_size(args.frame_size)
    res = bench_multistream(
        model=args.model, checkpoint=args.checkpoint, image_size=args.image_size, frames=args.frames,
        streams=tuple(args.streams), device=args.device, bf16=args.bf16, repeats=args.repeats,
        width=width, height=height, log=log,
    )
    if args.json:
        print(json.dumps(asdict(res)))
    return 0
