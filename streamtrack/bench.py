"""``streamtrack bench``: figures measured against a baseline in the same run.

``engine``: ms/frame of the streaming engine vs the official
``SAM2VideoPredictor`` on the same frames and weights, for several object
counts, plus the engine's state bytes over a long stream and the official
predictor's state growth.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from streamtrack.engine import EngineConfig, Prompt, StreamingEngine
from streamtrack.errors import UserError, discard_output, existing_file
from streamtrack.models import (
    VOS_COMPILE_MODE,
    build_model,
    check_image_size,
    resolve_device,
    save_random_checkpoint,
)
from streamtrack.synthetic import make_clip


@dataclass
class EngineBenchResult:
    device: str
    model: str
    image_size: int
    frames: int
    frame_size: tuple[int, int]
    torch_threads: int
    bf16: bool = False
    preprocess: str = "exact"
    compile: bool = False  # torch.compile of the engine's encoder and step (warmed up before timing)
    compile_mode: str = "default"
    official_vos_optimized: bool = False  # the official SAM2VideoPredictorVOS (compiled) build
    official_vos_mode: str = VOS_COMPILE_MODE  # the torch.compile mode it was built with
    official_ms: dict[int, float] = field(default_factory=dict)  # objects -> ms/frame
    engine_ms: dict[int, float] = field(default_factory=dict)
    ratio: dict[int, float] = field(default_factory=dict)  # engine / official
    marginal_ms: dict[str, float] = field(default_factory=dict)  # per extra object
    engine_state_bytes: dict[int, int] = field(default_factory=dict)  # frame -> bytes
    official_state_bytes: dict[int, int] = field(default_factory=dict)
    # objects -> mask IoU between the two sides over every frame and object of the last run:
    # a fast path that tracks something else is not faster
    agreement_iou_mean: dict[int, float] = field(default_factory=dict)
    agreement_iou_min: dict[int, float] = field(default_factory=dict)
    # --launch-ahead: the engine launching frame f + 1 before finishing frame f
    launch_ahead: bool = False
    ahead_ms: dict[int, float] = field(default_factory=dict)
    ahead_ratio: dict[int, float] = field(default_factory=dict)  # vs official
    # mask IoU against the engine one step at a time, worst frame and object (1.0: the same;
    # a GPU's kernels need not repeat bit for bit from run to run)
    ahead_iou_min: dict[int, float] = field(default_factory=dict)


def _prompts(clip, n: int) -> list[Prompt]:
    """n objects on frame 0: boxes around the clip's shapes, then offset boxes."""
    out = []
    for i in range(n):
        x0, y0, x1, y1 = clip.box(i % len(clip.masks) + 1, 0)
        # Shifted right 3 px per round of shapes, wrapping within the frame (a box that
        # ran off its right edge would shrink until it was no box at all).
        room = int(clip.width - 1 - x1)
        dx = float((i // len(clip.masks)) * 3 % (room + 1)) if room > 0 else 0.0
        out.append(Prompt.make(i + 1, box=[x0 + dx, y0, x1 + dx, y1]))
    return out


def mask_ious(official_masks: list[torch.Tensor], engine_outputs: list) -> list[float]:
    """IoU of every object's mask on every frame: the official predictor's video-resolution
    logits (objects x 1 x H x W, thresholded at 0 as it does) against the engine's masks."""
    if len(official_masks) != len(engine_outputs):
        raise RuntimeError(f"official predictor gave {len(official_masks)} frames, "
                           f"engine {len(engine_outputs)}")
    ious = []
    for logits, out in zip(official_masks, engine_outputs, strict=True):
        theirs = (logits[:, 0] > 0).cpu().numpy()
        ious += [_iou(theirs[k], obj.mask) for k, obj in enumerate(out.objects)]
    return ious


def _official_state_bytes(state) -> int:
    n = 0
    for per_obj in state["output_dict_per_obj"].values():
        for outs in per_obj.values():
            for o in outs.values():
                for k in ("maskmem_features", "pred_masks", "obj_ptr", "object_score_logits"):
                    v = o.get(k)
                    if torch.is_tensor(v):
                        n += v.numel() * v.element_size()
    return n


def bench_engine(
    *,
    model: str = "sam2.1_hiera_tiny",
    checkpoint: str | None = None,
    image_size: int = 256,
    frames: int = 24,
    objects: tuple[int, ...] = (1, 4),
    state_frames: tuple[int, ...] = (50, 500),
    device: str = "auto",
    width: int = 320,
    height: int = 240,
    bf16: bool = False,
    preprocess: str = "auto",
    repeats: int = 1,
    compile: bool = False,
    compile_mode: str = "default",
    compile_slots: int = 4,
    official_vos_optimized: bool = False,
    official_vos_mode: str = VOS_COMPILE_MODE,
    launch_ahead: bool = False,
    log=print,
) -> EngineBenchResult:
    """Both sides run under the same autocast setting (bf16 on CUDA only).

    The official predictor loads and preprocesses every frame before it starts
    (untimed); the engine preprocesses each frame as it arrives (timed).
    """
    dev = resolve_device(device)
    with tempfile.TemporaryDirectory(prefix="streamtrack-bench-") as workdir:  # ~150 MB of checkpoint
        tmp = Path(workdir)
        if checkpoint is None:
            checkpoint = str(save_random_checkpoint(model, tmp / "random.pt"))
        clip = make_clip(frames, width, height, num_objects=3, seed=3)
        jpeg_dir = tmp / "frames"  # the official predictor reads its frames from JPEG files
        jpeg_dir.mkdir()
        for i, f in enumerate(clip.frames):
            Image.fromarray(f).save(jpeg_dir / f"{i:05d}.jpg", quality=95)
        decoded = [np.array(Image.open(jpeg_dir / f"{i:05d}.jpg").convert("RGB")) for i in range(frames)]
        bf16 = bf16 and dev.type == "cuda"
        config = EngineConfig(preprocess=preprocess, bf16=bf16, compile=compile, compile_mode=compile_mode,
                              compile_slots=compile_slots,
                              max_objects=max(EngineConfig.max_objects, *objects))
        res = EngineBenchResult(str(dev), model, image_size, frames, (width, height), torch.get_num_threads(),
                                bf16=bf16, compile=config.compile, compile_mode=config.compile_mode,
                                official_vos_optimized=official_vos_optimized,
                                official_vos_mode=official_vos_mode, launch_ahead=launch_ahead)
        autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16)

        silence_official_progress()
        official = build_model(model, checkpoint, device=dev, image_size=image_size,
                               vos_optimized=official_vos_optimized, vos_compile_mode=official_vos_mode)
        if official_vos_optimized:
            log("  official baseline: SAM2VideoPredictorVOS, compiled in torch.compile mode "
                f"{official_vos_mode}")
        engine_model = build_model(model, checkpoint, device=dev, image_size=image_size)
        # Warm-up (kernel selection, allocator, lazy init) so neither side pays it in its timing.
        warm = _prompts(clip, 1)
        with autocast:
            state = official.init_state(str(jpeg_dir))
            official.add_new_points_or_box(state, 0, 1, box=np.array(warm[0].box, np.float32))
            for _ in official.propagate_in_video(state, max_frame_num_to_track=3):
                pass
        warm_engine = StreamingEngine(engine_model, config)
        warm_engine.warmup()  # with compile: compilation happens here, untimed
        for i in range(min(4, frames)):
            warm_engine.step(decoded[i], warm if i == 0 else [])
        del state, warm_engine
        for n in objects:
            prompts = _prompts(clip, n)
            official_runs, engine_runs, ahead_runs = [], [], []
            for _ in range(repeats):  # alternate the two sides; keep the median of each
                state = official.init_state(str(jpeg_dir))
                for p in prompts:
                    official.add_new_points_or_box(state, 0, p.obj_id, box=np.array(p.box, np.float32))
                # Frame 0 (the prompted frame) is not timed on either side: the official
                # predictor computes it in add_new_points_or_box, before propagating.
                official_masks = []  # kept as the predictor returns them: no work in the timed loop
                with autocast:
                    for i, (_, _, video_res_masks) in enumerate(official.propagate_in_video(state)):
                        sync_device(dev)
                        official_masks.append(video_res_masks)
                        if i == 0:
                            t0 = time.perf_counter()
                official_runs.append((time.perf_counter() - t0) / (frames - 1) * 1000)
                engine = StreamingEngine(engine_model, config)
                res.preprocess = engine.preprocess
                engine_outputs = [engine.step(decoded[0], prompts)]
                sync_device(dev)
                t0 = time.perf_counter()
                for frame in decoded[1:]:
                    engine_outputs.append(engine.step(frame))
                    sync_device(dev)
                engine_runs.append((time.perf_counter() - t0) / (frames - 1) * 1000)
                if launch_ahead:
                    ms, ahead_outputs = _run_launching_ahead(StreamingEngine(engine_model, config), decoded,
                                                             prompts, dev)
                    ahead_runs.append(ms)
            res.official_ms[n] = float(np.median(official_runs))
            res.engine_ms[n] = float(np.median(engine_runs))
            res.ratio[n] = res.engine_ms[n] / res.official_ms[n]
            ahead = ""
            if launch_ahead:
                res.ahead_ms[n] = float(np.median(ahead_runs))
                res.ahead_ratio[n] = res.ahead_ms[n] / res.official_ms[n]
                res.ahead_iou_min[n] = min(
                    _iou(a.mask, b.mask)
                    for x, y in zip(engine_outputs, ahead_outputs, strict=True)
                    for a, b in zip(x.objects, y.objects, strict=True))
                ahead = (f"   launching ahead {res.ahead_ms[n]:8.1f} ms/frame   "
                         f"ratio {res.ahead_ratio[n]:.2f}   "
                         f"mask IoU vs one step at a time min {res.ahead_iou_min[n]:.3f}")
            ious = mask_ious(official_masks, engine_outputs)
            res.agreement_iou_mean[n], res.agreement_iou_min[n] = float(np.mean(ious)), float(np.min(ious))
            del official_masks, engine_outputs
            log(f"  {n:2d} object(s): official {res.official_ms[n]:8.1f} ms/frame   "
                f"engine {res.engine_ms[n]:8.1f} ms/frame   ratio {res.ratio[n]:.2f}   "
                f"mask IoU vs official mean {res.agreement_iou_mean[n]:.3f} "
                f"min {res.agreement_iou_min[n]:.3f}{ahead}")
            if n == objects[0] and frames >= 2:
                res.official_state_bytes[frames] = _official_state_bytes(state)
            del state
        if len(objects) > 1:
            lo, hi = objects[0], objects[-1]
            for name, ms in (("official", res.official_ms), ("engine", res.engine_ms)):
                res.marginal_ms[name] = (ms[hi] - ms[lo]) / (hi - lo)
            log(f"  marginal ms per extra object: official {res.marginal_ms['official']:.1f}, "
                f"engine {res.marginal_ms['engine']:.1f}")

        if state_frames:
            from tqdm import tqdm

            engine = StreamingEngine(engine_model, config)
            wanted = set(state_frames)
            # Minutes on a CPU: a bar on a terminal, gone once done; none under --json.
            for i in tqdm(range(max(state_frames)), desc="  engine state pass", unit="frame",
                          leave=False, disable=log is not print or not sys.stderr.isatty()):
                engine.step(decoded[i % frames], _prompts(clip, 1) if i == 0 else [])
                if i + 1 in wanted:
                    res.engine_state_bytes[i + 1] = engine.state_bytes()
            for count, size in res.engine_state_bytes.items():  # after the bar is gone
                log(f"  engine state after {count:5d} frames: {size / 1024:.1f} KiB")
            if res.official_state_bytes:
                (f, b), = res.official_state_bytes.items()
                log(f"  official state after {f:5d} frames: {b / 1024:.1f} KiB "
                    f"(+{b / f / 1024:.1f} KiB per frame, without bound)")
        return res


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def _run_launching_ahead(engine: StreamingEngine, decoded: list[np.ndarray], prompts: list[Prompt],
                         dev: torch.device) -> tuple[float, list]:
    """ms per frame over frames 1.. with frame f + 1 launched before frame f is finished
    (the device gets the next frame's work while the host builds this frame's output),
    and every frame's output."""
    outputs = [engine.step(decoded[0], prompts)]
    sync_device(dev)
    t0 = time.perf_counter()
    pending = None
    for frame in decoded[1:]:
        launched = engine.launch(frame)
        if pending is not None:
            outputs.append(engine.finish(pending))
        pending = launched
    outputs.append(engine.finish(pending))
    sync_device(dev)
    return (time.perf_counter() - t0) / (len(decoded) - 1) * 1000, outputs


@dataclass
class PreprocessDrift:
    """How far ``fast`` preprocessing moves results from ``exact`` (same frames, weights)."""

    frames: int
    image_size: int
    min_iou: float
    mean_iou: float
    max_logit_diff: float  # worst per-frame mean |low-res logit difference|
    mean_logit_diff: float


def bench_preprocess(
    *, model: str = "sam2.1_hiera_tiny", checkpoint: str | None = None, image_size: int = 256,
    frames: int = 24, device: str = "auto", log=print,
) -> PreprocessDrift:
    dev = resolve_device(device)
    with tempfile.TemporaryDirectory(prefix="streamtrack-bench-") as workdir:  # ~150 MB of checkpoint
        if checkpoint is None:
            checkpoint = str(save_random_checkpoint(model, Path(workdir) / "random.pt"))
        clip = make_clip(frames, 320, 240, num_objects=3, seed=3)
        prompts = _prompts(clip, 3)
        runs = {}
        for mode in ("exact", "fast"):
            engine = StreamingEngine(build_model(model, checkpoint, device=dev, image_size=image_size),
                                     EngineConfig(preprocess=mode))
            runs[mode] = [engine.step(f, prompts if i == 0 else [], return_logits=True)
                          for i, f in enumerate(clip.frames)]
        ious, diffs = [], []
        for a, b in zip(runs["exact"], runs["fast"], strict=True):
            for oa, ob in zip(a.objects, b.objects, strict=True):
                union = (oa.mask | ob.mask).sum()
                ious.append(1.0 if union == 0 else float((oa.mask & ob.mask).sum() / union))
                diffs.append(float((oa.logits - ob.logits).abs().mean()))
        res = PreprocessDrift(
            frames, image_size, min(ious), float(np.mean(ious)), max(diffs), float(np.mean(diffs))
        )
        log(f"  fast vs exact preprocessing, {frames} frames x 3 objects: mask IoU min {res.min_iou:.4f} "
            f"mean {res.mean_iou:.4f}; mean |logit diff| max {res.max_logit_diff:.4f} "
            f"mean {res.mean_logit_diff:.4f}")
        return res


def silence_official_progress() -> None:
    """The official predictor's progress bars (frame loading, propagation) would garble
    the tables; tqdm reads TQDM_DISABLE only when it is imported, so replace them.  Its
    warning that sam2's optional CUDA extension is missing (it then skips hole filling,
    as the engine does by default) would print at every run."""
    import sam2.sam2_video_predictor as predictor
    import sam2.utils.misc as misc

    predictor.tqdm = misc.tqdm = lambda it, **_: it
    warnings.filterwarnings("ignore", message="cannot import name '_C'")


def sync_device(dev: torch.device) -> None:
    """Wait for queued GPU work, so a timer around it measures the work."""
    if dev.type == "cuda":
        torch.cuda.synchronize()


def compile_options(args) -> dict:
    """``--compile``, ``--compile-mode`` (implies it) and ``--compile-slots`` as engine options."""
    return {"compile": args.compile, "compile_mode": args.compile_mode or "default",
            "compile_slots": args.compile_slots}


def print_json(result) -> None:
    """A benchmark's ``--json`` result on stdout, flushed here: a stdout that cannot take it
    (a full disk, a reader gone) is one line, not a traceback, after minutes of running."""
    try:
        print(json.dumps(asdict(result)), flush=True)
    except OSError as exc:
        discard_output(sys.stdout)
        raise UserError(f"cannot write the JSON result to stdout: {exc.strerror or exc}") from None


def main(args) -> int:
    from streamtrack.bench_stream import check_clip_memory

    # Every benchmark's options, before any header (a bad one gets its line alone) and
    # before a random checkpoint is written for a model that cannot be built.
    if args.checkpoint is not None:
        existing_file(args.checkpoint, "checkpoint")
    check_image_size(args.image_size)
    check_clip_memory(args)
    if args.what in ("pipeline", "latency", "memory"):
        from streamtrack import bench_stream

        return bench_stream.main(args)
    if args.what == "multistream":
        from streamtrack import bench_multistream

        return bench_multistream.main(args)
    log = (lambda *a, **k: None) if args.json else print
    # Options first, before the header: a bad one gets its line alone.
    for count in args.state_frames or ():
        if count < 1:
            raise UserError(f"--state-frames must be >= 1, got {count}")
    if args.what != "preprocess":
        from streamtrack.bench_stream import parse_frame_size

        width, height = parse_frame_size(args.frame_size)
        if args.official_vos_mode and not args.official_vos_optimized:
            raise UserError("--official-vos-mode needs --official-vos-optimized")
        if args.official_vos_optimized and resolve_device(args.device).type != "cuda":
            raise UserError("--official-vos-optimized is sam2's build for CUDA (compiled, CUDA graphs): "
                            "it needs a GPU (--device cuda)")
    log(f"{args.what} benchmark: {args.model}, input {args.image_size}, {args.frames} frames, "
        f"device {resolve_device(args.device)}, {torch.get_num_threads()} torch threads")
    if args.what == "preprocess":
        res = bench_preprocess(model=args.model, checkpoint=args.checkpoint, image_size=args.image_size,
                               frames=args.frames, device=args.device, log=log)
    else:
        res = bench_engine(
            model=args.model, checkpoint=args.checkpoint, image_size=args.image_size, frames=args.frames,
            objects=tuple(args.objects), state_frames=tuple(args.state_frames), device=args.device,
            bf16=args.bf16, preprocess=args.preprocess, repeats=args.repeats, **compile_options(args),
            official_vos_optimized=args.official_vos_optimized,
            official_vos_mode=args.official_vos_mode or VOS_COMPILE_MODE, launch_ahead=args.launch_ahead,
            width=width, height=height, log=log,
        )
    if args.json:
        print_json(res)
    return 0
