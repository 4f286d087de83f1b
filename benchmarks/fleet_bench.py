"""Fleet placement: frames/s per stream, N streams in one actor vs one actor per stream.

For each stream count N (default 1, 2, 4) the same N streams run twice on a local
Ray, through the fleet's own actor (:class:`streamtrack.fleet_actor.FleetActor`):

* ``one actor``: one actor hosts all N streams (one model, a tracker thread per
  stream, their image-encoder passes batched by the actor's shared encoder), with
  all the CPUs (and the GPU) given to the benchmark;
* ``actor per stream``: N actors, one stream each, sharing the same CPUs (and
  GPU) in equal fractions.

Each stream tracks one object in a looping synthetic clip (random-weight model,
small input); a stream's rate is counted from its ``--warmup``-th frame to its
last.  Printed per row: frames/s per stream (mean), total frames/s, and two ratios
measured in the same run: per-stream rate against the 1-stream baseline, and
``one actor`` against ``actor per stream`` at the same N; and how many frames the
shared image encoder put in each forward pass.  The streams-per-GPU rule
in docs/scaling.md comes from these ratios on a GPU.

    python benchmarks/fleet_bench.py                              # CPU, input 256
    python benchmarks/fleet_bench.py --streams 1 2 --frames 6 --image-size 128   # a quick check
    python benchmarks/fleet_bench.py --device cuda --gpus 1 --image-size 1024 --streams 1 2 4 8 --frames 200
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from streamtrack.bench_stream import parse_frame_size
from streamtrack.capture import CaptureConfig
from streamtrack.engine import EngineConfig, Prompt
from streamtrack.errors import UserError
from streamtrack.fleet_spec import ModelKey
from streamtrack.pipeline import RunConfig
from streamtrack.tracking import COMPILE_MODES, CUDAGRAPH_MODES


@dataclass
class Row:
    streams: int
    layout: str  # "one actor" | "actor per stream"
    fps_per_stream: float
    total_fps: float
    seconds: float
    frames_per_batch: float  # image-encoder frames per forward pass (1.0 = no batching happened)


def run_layout(ray, n: int, one_actor: bool, args, clip: Path, box: list[float], checkpoint: Path) -> Row:
    from streamtrack.fleet_actor import FleetActor

    compiled = args.compile_mode is not None
    mode = args.compile_mode or "default"
    engine = EngineConfig(model=args.model, checkpoint=str(checkpoint), device=args.device,
                          image_size=args.image_size, compile=compiled, compile_mode=mode, compile_slots=1)
    key = ModelKey.of(engine)
    actors = []
    groups = [list(range(n))] if one_actor else [[i] for i in range(n)]
    share = 1.0 / len(groups)
    for g, _ in enumerate(groups):
        actors.append(ray.remote(FleetActor).options(
            num_cpus=args.cpus * share, num_gpus=args.gpus * share, max_concurrency=8,
        ).remote(f"bench-{g}", logging.WARNING))
    total = args.warmup + args.frames
    refs = []
    for actor, members in zip(actors, groups, strict=True):
        for i in members:
            name = f"s{i}"
            rc = RunConfig(source=str(clip), engine=engine, prompts={0: [Prompt.make(1, box=box)]},
                           stream=name, publish="tcp://127.0.0.1:*", max_frames=total, loop=True,
                           progress=False, capture=CaptureConfig(loop=True, name=name))
            refs.append(actor.start_stream.remote(rc, key))
    for rep in ray.get(refs):
        if rep["state"] not in ("running", "done"):
            raise SystemExit(f"stream {rep['name']} did not start: {rep['error']}")
    # Poll each stream's frame counter: the rate runs from its warm-up frame to its end.
    marks: dict[str, tuple[float, int]] = {}
    ends: dict[str, tuple[float, int]] = {}
    started = time.monotonic()
    while len(ends) < n:
        reports = ray.get([a.report.remote() for a in actors])
        t = time.monotonic()
        for rep in reports:
            for name, s in rep["streams"].items():
                if s["state"] in ("failed", "crashed"):
                    raise SystemExit(f"stream {name} failed: {s['error']}")
                if name not in marks and s["frames"] >= args.warmup:
                    marks[name] = (t, s["frames"])
                if name not in ends and s["state"] == "done":
                    ends[name] = (t, s["frames"])
        time.sleep(0.05)
    seconds = time.monotonic() - started
    encoders = [rep["encoder"] for rep in reports if rep["encoder"]]
    batches = sum(e["batches"] for e in encoders)
    frames_per_batch = sum(e["frames"] for e in encoders) / batches if batches else 1.0
    rates = []
    for name, (t1, f1) in ends.items():
        t0, f0 = marks[name]
        rates.append((f1 - f0) / max(t1 - t0, 1e-6))
    for a in actors:
        ray.kill(a, no_restart=True)
    per_stream = sum(rates) / len(rates)
    return Row(n, "one actor" if one_actor else "actor per stream", per_stream, sum(rates), seconds,
               frames_per_batch)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--streams", type=int, nargs="+", default=[1, 2, 4],
                   help="stream counts (default 1 2 4; 1 always runs: the baseline)")
    p.add_argument("--frames", type=int, default=24, help="frames timed per stream (default 24)")
    p.add_argument("--warmup", type=int, default=3, help="frames per stream before timing (default 3)")
    p.add_argument("--image-size", type=int, default=256, help="model input (default 256)")
    p.add_argument("--model", default="sam2.1_hiera_tiny")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--cpus", type=float, default=float(os.cpu_count() or 1),
                   help="CPUs shared by the streams of each run (default: all)")
    p.add_argument("--gpus", type=float, default=0.0, help="GPUs shared by each run (default 0)")
    p.add_argument("--frame-size", default="160x120", help="source frames, WxH (default 160x120)")
    p.add_argument("--compile-mode", choices=COMPILE_MODES, default=None,
                   help="torch.compile the engines in this mode (default: not compiled); in a CUDA-graph "
                        "mode a stream needs an actor of its own, so only `actor per stream` runs")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if min(args.streams) < 1 or args.frames < 2 or args.warmup < 1:
        p.error("--streams >= 1, --frames >= 2 and --warmup >= 1")
    # Every row is a ratio against 1 stream measured in this run: it is run first.
    args.streams = sorted({1, *args.streams})
    try:
        width, height = parse_frame_size(args.frame_size)
    except UserError as e:
        p.error(str(e))
    cudagraphs = args.compile_mode in CUDAGRAPH_MODES
    os.environ.setdefault("TQDM_DISABLE", "1")
    import ray

    from streamtrack.models import save_random_checkpoint
    from streamtrack.synthetic import make_clip, write_video

    setup = {"model": args.model, "device": args.device, "image_size": args.image_size, "frames": args.frames,
             "warmup": args.warmup, "cpus": args.cpus, "gpus": args.gpus, "frame_size": [width, height],
             "compile_mode": args.compile_mode}
    if not args.json:
        compiled = f", compiled ({args.compile_mode})" if args.compile_mode else ""
        print(f"{args.model}, {args.device}{compiled}, input {args.image_size}, frames {width}x{height}, "
              f"{args.frames} frames per stream after {args.warmup} warm-up, "
              f"{args.cpus:g} CPU / {args.gpus:g} GPU shared per run")
        print(f"{'streams':>7}  {'layout':<17} {'fps/stream':>10} {'total fps':>9} {'vs 1 stream':>11} "
              f"{'one actor / per stream':>22} {'frames/batch':>12}", flush=True)
    rows: list[dict] = []
    per_stream_rate: dict[int, float] = {}

    def record(r: Row) -> None:
        """One finished row; printed at once, so a run cut short keeps what it measured."""
        base = rows[0]["fps_per_stream"] if rows else r.fps_per_stream  # 1 stream comes first
        d = {"streams": r.streams, "layout": r.layout, "fps_per_stream": round(r.fps_per_stream, 3),
             "total_fps": round(r.total_fps, 3), "per_stream_vs_1_stream": round(r.fps_per_stream / base, 3),
             "frames_per_encoder_batch": round(r.frames_per_batch, 2)}
        if r.layout == "actor per stream":
            per_stream_rate[r.streams] = r.fps_per_stream
        elif r.streams in per_stream_rate:
            d["one_actor_vs_actor_per_stream"] = round(r.fps_per_stream / per_stream_rate[r.streams], 3)
        rows.append(d)
        if not args.json:
            ratio = d.get("one_actor_vs_actor_per_stream")
            print(f"{d['streams']:>7}  {d['layout']:<17} {d['fps_per_stream']:>10.2f} {d['total_fps']:>9.2f} "
                  f"{d['per_stream_vs_1_stream']:>11.2f} {'' if ratio is None else f'{ratio:.2f}':>22} "
                  f"{d['frames_per_encoder_batch']:>12.2f}", flush=True)

    with tempfile.TemporaryDirectory(prefix="fleet-bench-") as tmp:
        synthetic = make_clip(30, width, height, num_objects=1, seed=1)
        clip = write_video(synthetic.frames, Path(tmp) / "clip.mp4")
        box = synthetic.box(1)
        checkpoint = save_random_checkpoint(args.model, Path(tmp) / "weights.pt", seed=0)
        # A Ray already started in this process (a test's) is used as it is.
        own_ray = not ray.is_initialized()
        if own_ray:
            ray.init(address="local", num_cpus=max(1, round(args.cpus)), num_gpus=args.gpus or None,
                     include_dashboard=False, log_to_driver=False, configure_logging=False)
        try:
            for n in sorted(set(args.streams)):
                # actor per stream first, so the one-actor row can print its ratio to it
                if n > 1 or cudagraphs:
                    record(run_layout(ray, n, False, args, clip, box, checkpoint))
                if not cudagraphs:
                    record(run_layout(ray, n, True, args, clip, box, checkpoint))
        finally:
            if own_ray:
                ray.shutdown()
    if args.json:
        print(json.dumps({"setup": setup, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
