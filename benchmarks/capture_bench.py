"""Capture-stage benchmark: decode throughput, live latency and reconnect time, in one run.

1. **Decode fps**: writes synthetic H.264 clips (default 640x480 and 1280x720,
   300 frames each) and decodes each one with ``open_source(file)`` consumed as
   fast as possible, and with bare PyAV (``container.decode`` +
   ``to_ndarray(format="rgb24")``) in the same process, alternating runs.
   The ratio source/bare-PyAV is the figure of merit (goal >= 0.9). The bare
   baseline uses the same decoder threading as the source
   (``thread_type="AUTO"``); PyAV's default (slice threads only) is timed too,
   for context.
2. **Latency**: starts the test RTSP server (``tests/rtsp_server.py``, run with
   the system Python) at 30 fps and reads it through ``open_source(rtsp://...)``
   with a consumer that takes frames as soon as they come. Latency is
   dequeue time (``time.time()`` when ``read()`` returns) minus
   ``frame.capture_time`` (``time.time()`` when the frame left the decoder),
   p50/p95 over ~10 s, with the drops counted by the source.
3. **Reconnect**: kills the server, waits, restarts it on the same port, and
   measures the time from the server being ready (its READY line) to the first
   new frame reaching the consumer; repeated 3 times.

    python benchmarks/capture_bench.py [--json] [--rtsp-clip] [--quick]

Everything runs on 127.0.0.1; the RTSP server needs the GStreamer packages named
in ``tests/rtsp.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import av
import numpy as np

from streamtrack.capture import CaptureConfig, SourceState, open_source
from streamtrack.synthetic import make_clip, write_video

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
import options  # noqa: E402  (benchmarks/options.py)
from rtsp import RtspServer  # noqa: E402  (tests/rtsp.py: starts tests/rtsp_server.py)

GOAL_RATIO = 0.9


# ---------------------------------------------------------------------------
# helpers


def machine() -> dict:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "arch": platform.machine(),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "pyav": av.__version__,
        "libavcodec": ".".join(str(v) for v in av.library_versions["libavcodec"]),
        "gpu": None,
    }


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=float), q)) if values else float("nan")


# ---------------------------------------------------------------------------
# 1. decode throughput


def bare_pyav(path: Path, thread_type: str | None) -> tuple[int, float]:
    """Frames and seconds for bare PyAV: open, decode every frame, convert to RGB."""
    t0 = time.perf_counter()
    n = 0
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        if thread_type is not None:
            stream.thread_type = thread_type
        for frame in container.decode(stream):
            frame.to_ndarray(format="rgb24")
            n += 1
    return n, time.perf_counter() - t0


def via_source(path: Path) -> tuple[int, float]:
    """Frames and seconds for ``open_source(file)``: open, start, read until it ends."""
    t0 = time.perf_counter()
    cap = open_source(str(path), CaptureConfig())
    n, last_id, t_end = 0, -1, t0
    with cap:
        for frame in cap:
            assert frame.frame_id == last_id + 1, "file source skipped or reordered a frame"
            last_id = frame.frame_id
            n += 1
            t_end = time.perf_counter()
        state = cap.state
    assert state is SourceState.ENDED, f"file source ended as {state.value}"
    return n, t_end - t0


def bench_decode(clips: dict[str, Path], frames: int, repeats: int) -> list[dict]:
    runners = {
        "source": via_source,
        "bare": lambda p: bare_pyav(p, "AUTO"),
        "bare_default_threads": lambda p: bare_pyav(p, None),
    }
    results = []
    for size, path in clips.items():
        for fn in runners.values():  # warm-up: page cache, codec init, imports
            fn(path)
        fps: dict[str, list[float]] = {name: [] for name in runners}
        load_before = load()
        for _ in range(repeats):  # interleaved, so background load hits every variant alike
            for name, fn in runners.items():
                n, seconds = fn(path)
                if n != frames:
                    raise SystemExit(f"{name} decoded {n} frames of {frames} in {path}")
                fps[name].append(n / seconds)
        med = {name: statistics.median(v) for name, v in fps.items()}
        results.append({
            "size": size,
            "frames": frames,
            "repeats": repeats,
            "fps_source": round(med["source"], 1),
            "fps_bare": round(med["bare"], 1),
            "fps_bare_default_threads": round(med["bare_default_threads"], 1),
            "ratio": round(med["source"] / med["bare"], 3),
            "ratio_best": round(max(fps["source"]) / max(fps["bare"]), 3),
            "runs": {name: [round(x, 1) for x in v] for name, v in fps.items()},
            "loadavg_before": load_before,
        })
    return results


# ---------------------------------------------------------------------------
# 2 + 3. RTSP latency and reconnect


@dataclass
class Consumer:
    """Reads a capture on its own thread as fast as frames come, logging each one."""

    cap: object
    log: list[tuple[float, float, int, float, float | None]] = field(default_factory=list)
    # (dequeue_monotonic, latency_s, frame_id, capture_monotonic, pts)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-consumer", daemon=True)
        self._lock = threading.Lock()

    def start(self) -> Consumer:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            frame = self.cap.read(timeout=0.2)
            if frame is None:
                continue
            now, now_m = time.time(), time.monotonic()
            with self._lock:
                self.log.append((now_m, now - frame.capture_time, frame.frame_id,
                                 frame.capture_monotonic, frame.pts))

    def since(self, t: float) -> list[tuple[float, float, int, float, float | None]]:
        with self._lock:
            return [r for r in self.log if r[0] >= t]

    def wait_first_after(self, t: float, timeout: float):
        """The first logged frame captured after monotonic ``t``, or None."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                for r in self.log:
                    if r[3] > t:
                        return r
            time.sleep(0.005)
        return None

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def rgb_conversion_ms(width: int, height: int, repeats: int = 50) -> float:
    """Median ms of one yuv420p -> rgb24 ``to_ndarray``: the work ``read()`` does on
    hand-off for a drop-oldest source, so part of capture->dequeue latency."""
    rgb = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    frame = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format="yuv420p")
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        frame.to_ndarray(format="rgb24")
        times.append(time.perf_counter() - t)
    return 1000.0 * statistics.median(times)


def bench_rtsp(args: argparse.Namespace, clip: Path | None) -> dict:
    extra = ["--fps", str(args.rtsp_fps), "--gop", str(args.rtsp_gop)]
    if clip is not None:
        extra += ["--clip", str(clip)]
    else:
        width, height = args.rtsp_size.split("x")
        extra += ["--width", width, "--height", height]
    server = RtspServer(name="bench", extra_args=tuple(extra))
    result: dict = {
        "server": f"clip {clip.name}" if clip else f"videotestsrc {args.rtsp_size}",
        "fps": args.rtsp_fps, "gop": args.rtsp_gop,
    }
    w, h = (int(x) for x in (args.sizes[0] if clip else args.rtsp_size).split("x"))
    result["rgb_conversion_ms"] = round(rgb_conversion_ms(w, h), 3)
    cap = None
    consumer = None
    try:
        t = time.monotonic()
        url = server.start()
        result["server_start_s"] = round(time.monotonic() - t, 3)
        cap = open_source(url, CaptureConfig())  # defaults: drop-oldest, depth 2
        t_open = time.monotonic()
        cap.start()
        consumer = Consumer(cap).start()
        first = consumer.wait_first_after(0.0, 15.0)
        if first is None:
            raise SystemExit(f"no frame from {url} within 15 s (state {cap.state.value}, "
                             f"last error {cap.last_error})")
        result["first_frame_s"] = round(first[0] - t_open, 3)

        # -- latency --------------------------------------------------------
        time.sleep(args.warmup)
        s0 = cap.stats()
        t0 = time.monotonic()
        result["loadavg_before_latency"] = load()
        time.sleep(args.latency_seconds)
        t1 = time.monotonic()
        s1 = cap.stats()
        window = [r for r in consumer.since(t0) if r[0] < t1]
        lat_ms = [1000.0 * r[1] for r in window]
        ids = [r[2] for r in window]
        gaps = sum(b - a - 1 for a, b in zip(ids, ids[1:], strict=False))
        # Arrival jitter: how late each frame left the decoder relative to its pts,
        # against the earliest one (0 = perfectly steady; bursts show up here).
        # Per connection: pts restart when a served clip ends and the source reconnects.
        jitter_ms: list[float] = []
        segment: list[float] = []
        last_pts = None
        for r in window + [(0.0, 0.0, 0, 0.0, None)]:  # sentinel flushes the last segment
            pts = r[4]
            if pts is None or (last_pts is not None and pts < last_pts):
                jitter_ms += [1000.0 * (o - min(segment)) for o in segment]
                segment = []
            if pts is not None:
                segment.append(r[3] - pts)
            last_pts = pts
        dropped = {k: s1.dropped.get(k, 0) - s0.dropped.get(k, 0) for k in s1.dropped}
        result["latency"] = {
            "seconds": round(t1 - t0, 2),
            "frames": len(window),
            "delivered_fps": round(len(window) / (t1 - t0), 1),
            "p50_ms": round(pct(lat_ms, 50), 3),
            "p95_ms": round(pct(lat_ms, 95), 3),
            "max_ms": round(max(lat_ms), 3) if lat_ms else None,
            "dropped": dropped,
            "frame_id_gaps": gaps,
            "decoded": s1.frames_decoded - s0.frames_decoded,
            "arrival_jitter_p50_ms": round(pct(jitter_ms, 50), 1),
            "arrival_jitter_p95_ms": round(pct(jitter_ms, 95), 1),
        }

        # -- reconnect ------------------------------------------------------
        runs = []
        for _ in range(args.reconnects):
            reconnects_before = cap.stats().reconnects
            cap.status_events()  # drain
            # A served clip may have just ended: then the source is reconnecting already.
            already = cap.state is SourceState.RECONNECTING
            t_kill = time.monotonic()
            server.stop()  # SIGKILL: a crash or a pulled cable
            time.sleep(args.outage)
            t_spawn = time.monotonic()
            server.start()  # same port; returns once the READY line is printed
            t_ready = time.monotonic()
            hit = consumer.wait_first_after(t_spawn, 15.0)
            if hit is None:
                raise SystemExit(f"no frame within 15 s of the server returning "
                                 f"(state {cap.state.value}, last error {cap.last_error})")
            states = [e.state.value for e in cap.status_events()]
            runs.append({
                "reconnect_s": round(hit[0] - t_ready, 3),  # ready -> consumer has a frame
                "captured_after_ready_s": round(hit[3] - t_ready, 3),
                "outage_s": round(hit[0] - t_kill, 3),  # kill -> consumer has a frame
                "server_restart_s": round(t_ready - t_spawn, 3),
                "went_through_reconnecting": already or "reconnecting" in states,
                "reconnects_counted": cap.stats().reconnects - reconnects_before,
            })
            time.sleep(args.settle)
        rec = [r["reconnect_s"] for r in runs]
        result["reconnect"] = {
            "outage_wait_s": args.outage,
            "runs": runs,
            "p50_s": round(statistics.median(rec), 3),
            "max_s": round(max(rec), 3),
            "backoff": {"initial_s": cap.config.reconnect_initial,
                        "max_s": cap.config.reconnect_max, "jitter": cap.config.jitter},
        }
        result["final_stats"] = {
            "state": cap.state.value,
            "frame_ids_increasing": all(
                b[2] > a[2] for a, b in zip(consumer.log, consumer.log[1:], strict=False)),
            "dropped": cap.stats().dropped,
            "reconnects": cap.stats().reconnects,
            "decode_errors": cap.stats().decode_errors,
        }
    except BaseException as exc:
        # tests/rtsp.py reports a missing GStreamer with pytest.fail: turn it into an exit.
        if type(exc).__name__ == "Failed":
            raise SystemExit(f"RTSP server: {exc}") from None
        raise
    finally:
        if consumer is not None:
            consumer.stop()
        if cap is not None:
            cap.close()
        server.close()
    return result


# ---------------------------------------------------------------------------
# report


def print_table(report: dict) -> None:
    m = report["machine"]
    print(f"machine: {m['cores']}-core {m['arch']} ({m['cpu']}), no GPU, {m['os']}; "
          f"Python {m['python']}, PyAV {m['pyav']} (libavcodec {m['libavcodec']})")
    print(f"load average (1/5/15 min) at start: {report['loadavg_start']}, "
          f"at end: {report['loadavg_end']}")
    print()
    print("decode throughput (median of interleaved runs, frames/s; ratio = source / bare)")
    print(f"{'clip':>10} {'open_source':>12} {'bare PyAV':>10} {'ratio':>6} "
          f"{'best/best':>9} {'bare, default threads':>22}")
    for d in report["decode"]:
        ok = "ok" if d["ratio"] >= GOAL_RATIO else f"< {GOAL_RATIO}"
        print(f"{d['size']:>10} {d['fps_source']:>12.1f} {d['fps_bare']:>10.1f} "
              f"{d['ratio']:>6.2f} {d['ratio_best']:>9.2f} {d['fps_bare_default_threads']:>22.1f}"
              f"   {ok}")
    r = report.get("rtsp")
    if not r:
        return
    lat = r["latency"]
    print()
    print(f"RTSP {r['server']} at {r['fps']} fps (gop {r['gop']}), drop-oldest depth 2, "
          f"fast consumer; first frame {r['first_frame_s']:.2f} s after start()")
    print(f"  capture->dequeue latency over {lat['seconds']:.1f} s, {lat['frames']} frames "
          f"({lat['delivered_fps']} fps): p50 {lat['p50_ms']:.2f} ms, "
          f"p95 {lat['p95_ms']:.2f} ms, max {lat['max_ms']:.2f} ms "
          f"(of which RGB conversion on hand-off ~{r['rgb_conversion_ms']:.2f} ms)")
    print(f"  dropped {lat['dropped']}, frame_id gaps {lat['frame_id_gaps']}; "
          f"arrival jitter vs pts p50 {lat['arrival_jitter_p50_ms']} ms, "
          f"p95 {lat['arrival_jitter_p95_ms']} ms")
    rc = r["reconnect"]
    print(f"  reconnect (server killed, back after {rc['outage_wait_s']:g} s; "
          f"time from server READY to first new frame dequeued):")
    for i, run in enumerate(rc["runs"], 1):
        print(f"    #{i}: {run['reconnect_s']:.3f} s   (outage {run['outage_s']:.2f} s, "
              f"server restart {run['server_restart_s']:.2f} s, "
              f"reconnecting seen: {run['went_through_reconnecting']})")
    print(f"    p50 {rc['p50_s']:.3f} s, max {rc['max_s']:.3f} s")
    f = r["final_stats"]
    print(f"  end: state {f['state']}, reconnects {f['reconnects']}, "
          f"frame_id always increasing: {f['frame_ids_increasing']}, "
          f"decode errors {f['decode_errors']}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true",
                    help="print one JSON object on stdout (the table on stderr)")
    ap.add_argument("--sizes", type=options.frame_size, nargs="+", default=["640x480", "1280x720"])
    ap.add_argument("--frames", type=options.count(2), default=300)
    ap.add_argument("--repeats", type=options.count(1), default=5, help="timed decode runs per variant")
    ap.add_argument("--rtsp-size", type=options.frame_size, default="640x480", help="videotestsrc size")
    ap.add_argument("--rtsp-fps", type=options.count(1), default=30)
    ap.add_argument("--rtsp-gop", type=options.count(1), default=10)
    ap.add_argument("--rtsp-clip", action="store_true",
                    help="serve the first generated clip instead of videotestsrc (played once per "
                         "session: it ends, and the source reconnects, after --frames/30 s)")
    ap.add_argument("--latency-seconds", type=options.seconds(0, above=True), default=10.0)
    ap.add_argument("--warmup", type=options.seconds(0), default=1.0, help="s of streaming before measuring")
    ap.add_argument("--reconnects", type=options.count(0), default=3)
    ap.add_argument("--outage", type=options.seconds(0), default=1.0, help="s the server stays down")
    ap.add_argument("--settle", type=options.seconds(0), default=1.0, help="s of streaming between outages")
    ap.add_argument("--no-rtsp", action="store_true", help="decode benchmark only")
    ap.add_argument("--quick", action="store_true",
                    help="small, short run (smoke test; its figures are not meaningful): smaller defaults "
                         "for --sizes, --frames, --repeats, --latency-seconds, --reconnects")
    args = ap.parse_args(argv)
    if args.quick:  # smaller defaults: the options given on the command line stand
        quick = {"sizes": ["320x240"], "frames": 60, "repeats": 1, "latency_seconds": 3.0, "reconnects": 1}
        for name, value in quick.items():
            if getattr(args, name) == ap.get_default(name):
                setattr(args, name, value)

    report: dict = {"machine": machine(), "loadavg_start": load()}
    with tempfile.TemporaryDirectory(prefix="capture-bench-") as tmp:
        clips: dict[str, Path] = {}
        for size in args.sizes:
            w, h = (int(x) for x in size.split("x"))
            clip = make_clip(args.frames, w, h)
            clips[size] = write_video(clip.frames, Path(tmp) / f"clip_{size}.mp4", fps=30.0,
                                      gop=args.rtsp_gop)
            del clip
        report["decode"] = bench_decode(clips, args.frames, args.repeats)
        if not args.no_rtsp:
            served = next(iter(clips.values())) if args.rtsp_clip else None
            report["rtsp"] = bench_rtsp(args, served)
    report["loadavg_end"] = load()
    # With --json, stdout is the one JSON object (for jq and scripts); the table goes to stderr.
    with contextlib.redirect_stdout(sys.stderr if args.json else sys.stdout):
        print_table(report)
    if args.json:
        print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
