"""How long a restarted tracker's file takes to reach its restart frame: seeking by the
last frame's pts (what a restart does) against decoding every frame up to it (what it
falls back to), in the same run, on the same file.

Writes a synthetic H.264 clip (default 1280x720, 30 fps, 1800 frames = 60 s, a key frame
every 2 s as cameras write them), then, for each restart frame, opens the file with
``open_source`` as a restarted tracker does (``skip_frames`` = the frame, ``first_frame_id``
likewise, and ``skip_to_pts`` set or not) and times from the open to the first frame in
hand. Runs alternate between the two ways; the median of ``--repeats`` is reported, and
the ratio seek / decode.

    python benchmarks/restart_seek_bench.py [--json] [--frames 1800] [--size 1280x720]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from streamtrack.bench_stream import parse_frame_size
from streamtrack.capture import CaptureConfig, open_source

sys.path.insert(0, str(Path(__file__).resolve().parent))
import options  # noqa: E402  (benchmarks/options.py)


def write_clip(path: Path, frames: int, size: tuple[int, int], fps: int, gop: int) -> None:
    """A moving gradient (so frames differ and the encoder does real work), H.264, no B-frames."""
    import av

    width, height = size
    ramp = (np.arange(width, dtype=np.uint16)[None, :] + np.arange(height, dtype=np.uint16)[:, None])
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.options = {"g": str(gop), "preset": "ultrafast", "crf": "23"}
        for i in range(frames):
            plane = ((ramp + 4 * i) % 256).astype(np.uint8)
            image = np.stack([plane, np.roll(plane, i, axis=1), plane[::-1]], axis=2)
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
            frame.pts = i
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


def frame_pts(path: Path) -> list[float]:
    with open_source(str(path), CaptureConfig(policy="block")) as cap:
        return [f.pts for f in cap]


def time_to_frame(path: Path, at: int, pts: float | None) -> float:
    """Seconds from opening the file until frame ``at`` is in hand."""
    cfg = CaptureConfig(policy="block", first_frame_id=at, skip_frames=at, skip_to_pts=pts)
    started = time.perf_counter()
    with open_source(str(path), cfg) as cap:
        frame = cap.read(timeout=600)
        elapsed = time.perf_counter() - started
    if frame is None or frame.frame_id != at:
        raise SystemExit(f"restart at frame {at}: got {frame and frame.frame_id}")
    return elapsed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    ap.add_argument("--frames", type=options.count(10), default=1800)
    ap.add_argument("--size", type=options.frame_size, default="1280x720")
    ap.add_argument("--fps", type=options.count(1), default=30)
    ap.add_argument("--gop", type=options.count(1), default=60, help="frames between key frames")
    ap.add_argument("--repeats", type=options.count(1), default=3)
    args = ap.parse_args(argv)
    size = parse_frame_size(args.size)
    log = (lambda *a, **k: None) if args.json else print
    with tempfile.TemporaryDirectory(prefix="streamtrack-seek-") as folder:
        clip = Path(folder) / "clip.mp4"
        log(f"writing a {size[0]}x{size[1]} clip of {args.frames} frames (key frame every "
            f"{args.gop}) ...", flush=True)
        write_clip(clip, args.frames, size, args.fps, args.gop)
        pts = frame_pts(clip)
        rows = []
        for at in sorted({args.frames // 4, args.frames // 2, args.frames - 1}):
            decode, seek = [], []
            for _ in range(args.repeats):  # alternating: a slow spell weighs on both sides
                decode.append(time_to_frame(clip, at, None))
                seek.append(time_to_frame(clip, at, pts[at - 1]))
            rows.append({"restart_frame": at, "decode_s": statistics.median(decode),
                         "seek_s": statistics.median(seek),
                         "ratio": statistics.median(seek) / statistics.median(decode)})
    report = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
              "frames": args.frames, "size": list(size), "fps": args.fps, "gop": args.gop,
              "repeats": args.repeats, "rows": rows}
    if args.json:
        print(json.dumps(report))
        return 0
    log(f"{'restart at frame':>16} {'decode up to it':>16} {'seek to it':>11} {'seek / decode':>14}")
    for r in rows:
        log(f"{r['restart_frame']:>16} {r['decode_s'] * 1000:>13.0f} ms {r['seek_s'] * 1000:>8.0f} ms "
            f"{r['ratio']:>14.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
