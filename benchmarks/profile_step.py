"""Where a tracked frame's time goes: host (Python launching work) vs GPU (kernels).

    python benchmarks/profile_step.py --checkpoint CKPT [--compile-mode reduce-overhead] [--out DIR]

Runs the streaming engine on a synthetic clip (720p frames, one object by default),
then profiles ``--steps`` tracked frames with ``torch.profiler`` and prints, per frame:
wall time, GPU busy time (the sum of kernel times), and the operators that cost the host
the most.  GPU busy well below wall time means the step is host-bound: faster kernels
will not help, fewer launches (CUDA graphs, fusion) will.  With ``--out`` the table and
with ``--trace`` a Chrome trace, are written there.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

from streamtrack.bench import _prompts
from streamtrack.compiled import MODES
from streamtrack.engine import EngineConfig, StreamingEngine
from streamtrack.models import build_model
from streamtrack.synthetic import make_clip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="sam2.1_hiera_tiny")
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--image-size", type=int, default=1024)
    ap.add_argument("--frame-size", default="1280x720")
    ap.add_argument("--objects", type=int, default=1)
    ap.add_argument("--compile-mode", choices=MODES, default=None, help="compile the engine in this mode")
    ap.add_argument("--steps", type=int, default=20, help="tracked frames profiled")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--trace", action="store_true", help="with --out: also a Chrome trace")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("profile_step.py needs a CUDA device")
    width, height = (int(v) for v in args.frame_size.split("x"))
    clip = make_clip(30, width, height, num_objects=3, seed=3)
    config = EngineConfig(device="cuda", bf16=True, compile=args.compile_mode is not None,
                          compile_mode=args.compile_mode or "default", compile_slots=1)
    model = build_model(args.model, args.checkpoint, device=torch.device("cuda"), image_size=args.image_size)
    engine = StreamingEngine(model, config)
    t0 = time.perf_counter()
    engine.warmup()
    print(f"warm-up {time.perf_counter() - t0:.1f} s")
    frames = clip.frames
    for i in range(20):  # past the memory and pointer windows
        engine.step(frames[i % len(frames)], _prompts(clip, args.objects) if i == 0 else [])
    torch.cuda.synchronize()
    walls = []
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for i in range(args.steps):
            t = time.perf_counter()
            engine.step(frames[i % len(frames)])
            torch.cuda.synchronize()
            walls.append(time.perf_counter() - t)
    events = prof.key_averages()
    gpu_us = sum(e.self_device_time_total for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    mode = args.compile_mode or "eager"
    lines = [
        f"{args.model}, input {args.image_size}, {width}x{height}, {args.objects} object(s), {mode}, "
        f"{torch.cuda.get_device_name()}",
        f"per tracked frame: wall {np.median(walls) * 1000:.2f} ms (median, profiled), "
        f"GPU busy {gpu_us / args.steps / 1000:.2f} ms (sum of kernel times)",
        events.table(sort_by="self_cpu_time_total", row_limit=25),
    ]
    text = "\n".join(lines)
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"profile-{mode}.txt").write_text(text + "\n")
        if args.trace:
            prof.export_chrome_trace(str(args.out / f"trace-{mode}.json"))


if __name__ == "__main__":
    main()
