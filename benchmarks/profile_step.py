"""Where a tracked frame's time goes: host (Python launching work) vs GPU (kernels).

    python benchmarks/profile_step.py --checkpoint CKPT [--compile-mode reduce-overhead] [--out DIR]

Runs the streaming engine on a synthetic clip (720p frames, one object by default),
then profiles ``--steps`` tracked frames with ``torch.profiler`` and prints, per frame:
wall time, GPU busy time (the sum of kernel times), and the operators that cost the host
the most.  GPU busy well below wall time means the step is host-bound: faster kernels
will not help, fewer launches (CUDA graphs, fusion) will.  With ``--out`` the table and
with ``--trace`` a Chrome trace, are written there.

``--phases`` measures something else, without the profiler (whose own overhead inflates
host time several-fold): the engine launches frame f+1 before it finishes frame f, as a
GPU-bound stream would, and a clock around each compiled unit, the preprocessing, the
copy to the host and ``finish`` says how much host time each costs per frame.  What is
left of ``launch`` is sam2's and the engine's Python between the units.  On a GPU
these are host times (the device runs behind them); on a CPU they include the compute.

``--guards`` times dynamo's guard checks (the "cache lookup" before every compiled
call), per compiled unit, for two engines in the same run: one compiled with guards
checked one by one (torch's default) and one with module subtrees checked by their
dictionaries' version tags (``streamtrack.compiled.guard_by_dict_tags``, the engine's
setting).  Guards are dynamo's whatever the backend, so ``--backend eager`` gives the
same checks on a CPU without inductor's compile time.

``--ops`` counts the operators a frame runs eagerly, outside the compiled regions, by the
sam2 or streamtrack function that called them.  Each is a kernel launch (or, for a view,
at least a trip through the dispatcher) that CUDA graphs do not absorb, so the count is
the host work left to fuse, and it is the same on a CPU (``--device cpu``) as on a GPU.
"""

from __future__ import annotations

import argparse
import time
from collections import Counter, defaultdict
from functools import partial
from pathlib import Path
from unittest import mock

import numpy as np
import options  # benchmarks/options.py
import torch
from torch.profiler import ProfilerActivity, profile, record_function

from streamtrack import compiled
from streamtrack.bench import _prompts
from streamtrack.engine import EngineConfig, StreamingEngine
from streamtrack.models import build_model
from streamtrack.synthetic import make_clip
from streamtrack.tracking import COMPILE_MODES


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="sam2.1_hiera_tiny")
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--image-size", type=options.image_size, default=1024)
    ap.add_argument("--frame-size", type=options.frame_size, default="1280x720")
    ap.add_argument("--objects", type=options.count(1), default=1)
    ap.add_argument("--compile-mode", choices=COMPILE_MODES, default=None,
                    help="compile the engine in this mode")
    ap.add_argument("--steps", type=options.count(1), default=20, help="tracked frames profiled")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--trace", action="store_true", help="with --out: also a Chrome trace")
    ap.add_argument("--phases", action="store_true",
                    help="host time per phase while launching ahead, instead of the profiler")
    ap.add_argument("--ops", action="store_true",
                    help="count the operators run outside compiled regions per frame, by caller")
    ap.add_argument("--guards", action="store_true",
                    help="time the guard checks per compiled call, checked one by one vs by dict tags")
    ap.add_argument("--backend", default="inductor", help="torch.compile backend (eager: dynamo only)")
    ap.add_argument("--device", default="cuda", help="cuda; cpu only with --phases, --ops or --guards")
    return ap


def main() -> None:
    args = build_parser().parse_args()
    cuda = args.device.split(":")[0] == "cuda"  # cuda or cuda:N
    if not cuda and not (args.phases or args.ops or args.guards):
        raise SystemExit("the profiler table needs --device cuda")
    if cuda and not torch.cuda.is_available():
        raise SystemExit("profile_step.py needs a CUDA device (or --phases/--ops/--guards --device cpu)")
    width, height = (int(v) for v in args.frame_size.split("x"))
    clip = make_clip(30, width, height, num_objects=3, seed=3)
    frames = clip.frames
    if args.guards:
        print(guard_checks(args, frames, _prompts(clip, args.objects)))
        return
    spent: dict[str, float] = defaultdict(float)
    model, engine = _tracking_engine(args, frames, _prompts(clip, args.objects),
                                     wrap=partial(_timed, spent) if args.phases else None)
    if args.phases or args.ops:
        what = "phases" if args.phases else "ops"
        text = (host_phases(engine, model, frames, args.steps, spent) if args.phases
                else eager_ops(engine, model, frames, args.steps))
        print(text)
        if args.out is not None:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / f"{what}-{args.compile_mode or 'eager'}.txt").write_text(text + "\n")
        return
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


def _tracking_engine(args, frames: list, prompts: list, wrap=None):
    """A warmed-up engine past its memory and pointer windows, tracking ``prompts``; its
    compiled units wrapped by ``wrap`` (see :func:`_wrap_units`) before they compile."""
    config = EngineConfig(device=args.device, image_size=args.image_size, bf16=True,
                          compile=args.compile_mode is not None or args.guards,
                          compile_mode=args.compile_mode or "default", compile_backend=args.backend,
                          compile_slots=1)
    model = build_model(args.model, args.checkpoint, device=torch.device(args.device),
                        image_size=args.image_size)
    engine = StreamingEngine(model, config)
    if wrap is not None:
        _wrap_units(model, wrap)
    t0 = time.perf_counter()
    engine.warmup()
    print(f"warm-up {time.perf_counter() - t0:.1f} s")
    for i in range(20):
        engine.step(frames[i % len(frames)], prompts if i == 0 else [])
    return model, engine


_UNITS = {"image encoder": ("", "forward_image"), "memory attention": ("memory_attention", "forward"),
          "SAM heads (prompt encoder, decoder)": ("", "_forward_sam_heads"),
          "memory encoding": ("", "_encode_new_memory")}


def _wrap_units(model: torch.nn.Module, wrap) -> None:
    """Replace each compiled unit (streamtrack.compiled) by ``wrap(name, unit)``, from
    outside: a wrapper inside one would be traced into its graph.  An instance attribute:
    nn.Module calls it, sam2 looks it up on the model.  Before the units compile: an
    attribute set on a module afterwards changes its dictionary's tag, and dynamo then
    checks that module's guards one by one on every call (see :func:`guard_checks`)."""
    for name, (path, method) in _UNITS.items():
        owner = model.get_submodule(path)
        setattr(owner, method, wrap(name, getattr(owner, method)))


def guard_checks(args, frames: list, prompts: list, rounds: int = 3) -> str:
    """Median host µs of dynamo's cache lookup per compiled unit call, and their sum per
    frame: guards checked one by one (torch's default), then by dict tags.  Dynamo keeps
    compiled code per Python function, shared by every model, so the second engine
    starts from an empty cache (``torch._dynamo.reset``) and compiles its own."""
    import torch._dynamo.config as dynamo_config

    def labelled(name: str, fn):
        def wrapper(*a, **k):
            with record_function("unit: " + name):
                return fn(*a, **k)
        return wrapper

    lookups: dict[str, dict[str, list[float]]] = {}
    for label, tags in (("one by one", False), ("by dict tags", True)):
        torch._dynamo.reset()
        # compile_model sets the flag; the guards are built with it at warm-up.
        with mock.patch.object(compiled, "guard_by_dict_tags",
                               partial(setattr, dynamo_config, "use_recursive_dict_tags_for_guards", tags)):
            model, engine = _tracking_engine(args, frames, prompts, wrap=labelled)
        lookups[label] = defaultdict(list)
        for _ in range(rounds):
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for i in range(args.steps):
                    engine.step(frames[i % len(frames)])
            events = prof.events()
            units = [e for e in events if e.name.startswith("unit: ")]
            for e in events:
                if "Cache Lookup" in e.name:
                    unit = next((u.name[6:] for u in units if u.time_range.start <= e.time_range.start
                                 and e.time_range.end <= u.time_range.end), "other")
                    lookups[label][unit].append(e.cpu_time_total)
        del model, engine
    device = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else args.device
    per_frame = {k: sum(sum(v) for v in d.values()) / (rounds * args.steps) for k, d in lookups.items()}
    calls = sum(len(v) for v in lookups["by dict tags"].values()) / (rounds * args.steps)
    lines = [f"dynamo cache lookup (guard checks) per compiled call, median us (profiled), "
             f"{args.steps} frames x {rounds} rounds each, {device}",
             f"  {'unit':<36} {'one by one':>11} {'dict tags':>11} {'ratio':>7}"]
    for unit in sorted(set(lookups["one by one"]) | set(lookups["by dict tags"])):
        a, b = (float(np.median(d[unit])) if d[unit] else float("nan") for d in lookups.values())
        lines.append(f"  {unit:<36} {a:11.1f} {b:11.1f} {b / a:7.2f}")
    a, b = per_frame["one by one"], per_frame["by dict tags"]
    lines.append(f"  {f'per frame (mean, sum of {calls:g} calls)':<36} {a:11.1f} {b:11.1f} {b / a:7.2f}")
    return "\n".join(lines)


def _timed(spent: dict[str, float], name: str, fn):
    """``fn``, adding its seconds to ``spent[name]``."""
    def wrapper(*a, **k):
        t = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            spent[name] += time.perf_counter() - t
    return wrapper


def host_phases(engine: StreamingEngine, model: torch.nn.Module, frames: list, steps: int,
                spent: dict[str, float]) -> str:
    """Host ms per frame of each phase, launching frame f+1 before finishing frame f; the
    compiled units already clocked into ``spent`` (see :func:`_tracking_engine`)."""
    engine._prepare = _timed(spent, "preprocess (upload, resize)", engine._prepare)
    engine._to_host = _timed(spent, "copy to host (queued)", engine._to_host)
    pending = engine.launch(frames[0])
    spent.clear()
    launch = finish = 0.0
    start = time.perf_counter()
    for i in range(1, steps + 1):
        t0 = time.perf_counter()
        following = engine.launch(frames[i % len(frames)])
        t1 = time.perf_counter()
        engine.finish(pending)
        finish += time.perf_counter() - t1
        launch += t1 - t0
        pending = following
    wall = time.perf_counter() - start
    engine.finish(pending)
    per = 1000 / steps
    inner = sum(spent.values())
    rows = [("launch (all of it)", launch), *sorted(spent.items(), key=lambda kv: -kv[1]),
            ("launch: Python between the above", launch - inner), ("finish (wait, build output)", finish),
            ("loop, per frame", wall)]
    device = next(model.parameters()).device
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    head = (f"host ms per frame, launching ahead, {steps} frames, {name}"
            + ("" if device.type == "cuda" else " (on a CPU these include the compute)"))
    lines = [head] + [f"  {label:<36} {seconds * per:8.2f}" for label, seconds in rows]
    if device.type == "cuda":
        lines += sync_points(engine, frames, min(steps, 10))
    return "\n".join(lines)


def sync_points(engine: StreamingEngine, frames: list, steps: int) -> list[str]:
    """Where the host waits for the device without meaning to (torch's sync debug mode:
    ``.item()``, a blocking copy, ``nonzero``...), per half of the step.  One in ``launch``
    would make launching ahead wait for the frame before, so the host's work and the
    device's no longer overlap.  ``finish`` waits on an event (not counted): that wait is
    meant."""
    import warnings

    where: dict[str, Counter] = {"launch": Counter(), "finish": Counter()}
    pending = engine.launch(frames[0])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for i in range(1, steps + 1):
                seen = len(caught)
                following = engine.launch(frames[i % len(frames)])
                where["launch"].update(f"{w.filename}:{w.lineno}" for w in caught[seen:])
                seen = len(caught)
                engine.finish(pending)
                where["finish"].update(f"{w.filename}:{w.lineno}" for w in caught[seen:])
                pending = following
        finally:
            torch.cuda.set_sync_debug_mode(0)
    engine.finish(pending)
    lines = [f"implicit host-device syncs per frame ({steps} frames, torch sync debug mode): "
             + ", ".join(f"{half} {sum(c.values()) / steps:.1f}" for half, c in where.items())]
    for half, counter in where.items():
        for place, n in counter.most_common(5):
            lines.append(f"  {half:<7} {n / steps:5.1f}  {place}")
    return lines


def _ancestors(event):
    parent = event.cpu_parent
    while parent is not None:
        yield parent
        parent = parent.cpu_parent


def _caller(event) -> str:
    """The nearest sam2 or streamtrack Python function above a profiled operator."""
    for parent in _ancestors(event):
        if ".py(" in parent.name and ("sam2/" in parent.name or "streamtrack/" in parent.name):
            where = parent.name.split("site-packages/")[-1]
            return where[where.rfind("/streamtrack/") + 1:] if "/streamtrack/" in where else where
    return "?"


def _in_compiled_region(event) -> bool:
    # Inside another operator, or run by compiled code.
    return any(p.name.startswith("aten::") or "Compiled" in p.name for p in _ancestors(event))


def eager_ops(engine: StreamingEngine, model: torch.nn.Module, frames: list, steps: int,
              rows: int | None = 30) -> str:
    """Operators per frame run outside compiled regions (top-level only), by caller: the
    ``rows`` most frequent (None: all)."""
    with profile(activities=[ProfilerActivity.CPU], with_stack=True) as prof:
        for i in range(steps):
            engine.step(frames[i % len(frames)])
    events = prof.events()
    regions = sum(1 for e in events if e.name.startswith("Torch-Compiled Region"))
    eager = [e for e in events if e.name.startswith("aten::") and not _in_compiled_region(e)]
    by_caller = Counter((e.name, _caller(e)) for e in eager)
    views = sum(n for (name, _), n in by_caller.items() if name in _VIEWS)
    lines = [f"operators per frame outside compiled regions: {len(eager) / steps:.1f} "
             f"({views / steps:.1f} of them views), compiled regions per frame: {regions / steps:.1f}"]
    for (name, caller), n in by_caller.most_common(rows):
        lines.append(f"  {n / steps:6.1f}  {name:<26} {caller}")
    return "\n".join(lines)


# Operators that only make a new view of a tensor: no kernel, but a dispatcher trip each.
_VIEWS = {"aten::permute", "aten::flatten", "aten::unsqueeze", "aten::select", "aten::expand",
          "aten::view", "aten::slice", "aten::reshape", "aten::transpose", "aten::squeeze",
          "aten::detach", "aten::alias", "aten::as_strided"}


if __name__ == "__main__":
    main()
