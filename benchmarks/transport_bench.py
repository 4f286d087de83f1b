"""Transport benchmark: the ZeroMQ results stream against bare pyzmq, and a slow subscriber's
effect on the tracker, in one run.

1. **Latency and throughput** at 1, 4 and 16 objects with 1280x720 masks. The masks are
   moving elliptical blobs, RLE-encoded by ``ObjectResult.from_mask`` (our encoder).
   A real :class:`~streamtrack.publisher.Publisher` in this process sends them to a real
   :class:`~streamtrack.subscriber.Subscriber` in a spawned process over loopback TCP;
   the subscriber process sends back, per message, ``seq``, ``t.publish`` and the time its
   consumer got the message from ``recv()``. Latency = that time - ``t.publish`` (both
   :func:`streamtrack.protocol.now`, i.e. ``time.time()``, one machine). The baseline is bare
   pyzmq PUB/SUB of byte strings of the same sizes (the same JSON bytes with the send time
   and seq packed in front), same high-water marks, same loopback, spawned the same way.
   * latency: ``--latency-messages`` messages paced at ``--latency-rate`` per second;
   * throughput: the publisher sends as fast as it can for ``--blast-seconds``; the rate is
     what reaches the consumer. The Subscriber has no keep-everything mode (it keeps the
     newest message per topic), so this is what it *delivers*: messages lost in ZeroMQ
     (high-water marks) or replaced before the consumer read them are reported, not hidden.
2. **Delivery at 30 fps**: ``--duration`` seconds (default 60) of 4-object 720p results
   paced at 30 per second, a prompt consumer counting what arrives by ``seq``; the bare
   pyzmq stream runs alongside at the same pace as the baseline. Goal >= 99.9 %.
3. **Tracker fps with a slow subscriber**: ``streamtrack run CLIP --publish`` (tiny SAM 2.1
   with seeded random weights, small input) on a short synthetic clip, three ways: no
   subscriber (baseline), one fast subscriber, one subscriber that sleeps
   ``--slow-sleep`` s per message. Frames/s come from the tracker's own ``t.publish``
   stamps in ``--save-jsonl`` (model loading excluded). Goal: no drop.

    .venv/bin/python benchmarks/transport_bench.py [--json] [--duration 60] [--quick] [--curve]

Everything runs on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import platform
import socket
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from multiprocessing.connection import Connection
from pathlib import Path

import numpy as np
import zmq

from streamtrack.protocol import FrameResult, ObjectResult, now
from streamtrack.publisher import DEFAULT_SNDHWM, Publisher

WIDTH, HEIGHT = 1280, 720
BENCH, WARM = "bench", "warm"  # stream names: measured messages / connection handshake
RCVHWM = 64  # the Subscriber's default, used by the bare baseline too
_HEAD = struct.Struct("<dq")  # bare baseline: send time, seq
QUIET_S = 0.5  # a phase ends once its subscriber has received nothing for this long
GOAL_DELIVERY = 0.999
GOAL_FPS_RATIO = 0.95  # "no drop", allowing for run-to-run noise on a shared machine


# ---------------------------------------------------------------------------- helpers


def machine() -> dict:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "arch": platform.machine(),
            "os": f"{platform.system()} {platform.release()}", "python": platform.python_version(),
            "pyzmq": zmq.__version__, "libzmq": zmq.zmq_version()}


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def pct(values, q: float) -> float | None:
    a = np.asarray(values, dtype=float)
    return float(np.percentile(a, q)) if a.size else None


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_results(n_objects: int, frames: int = 30, seed: int = 0) -> list[FrameResult]:
    """``frames`` 720p results with ``n_objects`` moving blobs (two overlapping ellipses
    each), RLE-encoded by our own path, as the tracker would publish them."""
    import cv2

    rng = np.random.default_rng(seed)
    objs = []
    for _ in range(n_objects):
        objs.append({
            "c": rng.uniform([120, 120], [WIDTH - 120, HEIGHT - 120]),
            "v": rng.uniform(-8, 8, 2),
            "axes": rng.uniform([30, 25], [110, 90]),
            "angle": rng.uniform(0, 180),
            "off": rng.uniform(-40, 40, 2),
        })
    out = []
    for i in range(frames):
        objects = []
        for k, o in enumerate(objs, start=1):
            m = np.zeros((HEIGHT, WIDTH), np.uint8)
            cx, cy = np.clip(o["c"] + i * o["v"], 100, [WIDTH - 100, HEIGHT - 100])
            ax, ay = (int(a) for a in o["axes"])
            cv2.ellipse(m, (int(cx), int(cy)), (ax, ay), o["angle"] + 3 * i, 0, 360, 1, -1)
            cv2.ellipse(m, (int(cx + o["off"][0]), int(cy + o["off"][1])), (ay, ax // 2),
                        o["angle"] - 2 * i, 0, 360, 1, -1)
            objects.append(ObjectResult.from_mask(k, m.astype(bool), score=0.9 - 0.01 * k, iou=0.8))
        t0 = now()
        out.append(FrameResult(stream=BENCH, seq=0, frame_id=i, pts=i / 30, width=WIDTH,
                               height=HEIGHT, objects=objects,
                               t={"capture": t0, "dequeue": t0, "infer_start": t0, "infer_end": t0}))
    return out


# ------------------------------------------------------------------ subscriber processes


def _subscriber_child(kind: str, endpoint: str, conn: Connection, curve: tuple[str, str] | None) -> None:
    """Receive ``masks/`` messages; log (seq, t_publish, t_consumer) for stream ``bench``.

    Pipe protocol: "ready" once a ``warm`` message arrived; then ("begin", first seq) (clear the log,
    answer "begun"), "settle" (keep receiving until nothing has arrived for ``QUIET_S``, so
    a backlog cannot spill into the next phase; answer "settled") and "end" (answer the log
    and, for ours, the Subscriber counters of the phase).
    """
    log: list[tuple[float, float, float]] = []
    if kind == "ours":
        from streamtrack.curve import CurveClient
        from streamtrack.subscriber import Subscriber

        sub = Subscriber(endpoint, topics=["masks/"],
                         curve=CurveClient(*curve) if curve else None)

        def poll() -> tuple[str, float, float, float] | None:
            msg = sub.recv(timeout=0.005)
            if msg is None or msg.result is None:
                return None
            got = now()
            return msg.stream, float(msg.result.seq), msg.result.t.publish or float("nan"), got

        def counters() -> dict:
            c = sub.counters(BENCH)
            return {"received": c.received, "missed": c.missed, "superseded": c.superseded,
                    "last_seq": c.last_seq}
    else:
        sock = zmq.Context.instance().socket(zmq.SUB)
        sock.setsockopt(zmq.RCVHWM, RCVHWM)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SUBSCRIBE, b"masks/")
        sock.connect(endpoint)
        pending: list = []

        def poll():
            if not pending:
                if not sock.poll(5):
                    return None
                while True:  # drain what is queued, stamping each message as it comes out
                    try:
                        parts = sock.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    pending.append((parts, time.time()))
            parts, got = pending.pop(0)
            t_pub, seq = _HEAD.unpack_from(parts[1])
            return parts[0].decode()[len("masks/"):], float(seq), t_pub, got

        def counters() -> dict:
            return {}

    def settle() -> None:
        quiet_since = time.monotonic()
        mark = counters().get("received")
        while time.monotonic() - quiet_since < QUIET_S:
            rec = poll()
            if rec is not None and rec[0] == BENCH:
                log.append(rec[1:])
            new = counters().get("received")
            if rec is not None or new != mark:
                quiet_since, mark = time.monotonic(), new
        conn.send("settled")

    ready = False
    base: dict = {}
    carried = 0
    while True:
        if conn.poll():
            cmd = conn.recv()
            if isinstance(cmd, tuple) and cmd[0] == "begin":
                log = []
                base = counters()
                # Messages the previous phase lost at its end show up as a seq gap before
                # this phase's first message: they are not this phase's loss.
                last = base.get("last_seq")
                carried = max(0, cmd[1] - last - 1) if last is not None else 0
                conn.send("begun")
            elif cmd == "settle":
                settle()
            elif cmd == "end":
                now_c = counters()
                delta = {k: now_c[k] - base.get(k, 0) for k in ("received", "missed", "superseded")
                         if k in now_c}
                if "missed" in delta:
                    delta["missed"] = max(0, delta["missed"] - carried)
                conn.send((np.asarray(log, dtype=float).reshape(-1, 3), delta))
            elif cmd == "quit":
                break
        rec = poll()
        if rec is None:
            continue
        stream, seq, t_pub, got = rec
        if stream == WARM and not ready:
            ready = True
            conn.send("ready")
        elif stream == BENCH:
            log.append((seq, t_pub, got))


class Side:
    """One stream under test: a publisher here, its subscriber process there."""

    def __init__(self, kind: str, ctx: mp.context.SpawnContext, curve=None) -> None:
        self.kind = kind
        self.seq = 0
        if kind == "raw":
            self.sock = zmq.Context.instance().socket(zmq.PUB)
            self.sock.setsockopt(zmq.SNDHWM, DEFAULT_SNDHWM)
            self.sock.setsockopt(zmq.LINGER, 0)
            self.sock.bind("tcp://127.0.0.1:0")
            endpoint = self.sock.getsockopt(zmq.LAST_ENDPOINT).decode()
            client = None
        else:
            server, client = curve if curve else (None, None)
            self.pub = Publisher("tcp://127.0.0.1:0", stream=BENCH, curve=server)
            endpoint = self.pub.endpoint
        self.conn, child_conn = ctx.Pipe()
        self.proc = ctx.Process(target=_subscriber_child,
                                args=("raw" if kind == "raw" else "ours", endpoint, child_conn, client),
                                daemon=True)
        self.proc.start()
        self._warm(FrameResult(stream=WARM, seq=0, frame_id=0, pts=0.0, width=1, height=1))

    def _warm(self, result: FrameResult) -> None:
        """Publish until the subscriber has one message (ZeroMQ's slow-joiner window)."""
        deadline = time.monotonic() + 60  # a spawned interpreter imports numpy and zmq first
        while not self.conn.poll(0.02):
            if time.monotonic() > deadline or not self.proc.is_alive():
                raise SystemExit(f"{self.kind} subscriber never connected")
            if self.kind == "raw":
                self.sock.send_multipart([b"masks/" + WARM.encode(), _HEAD.pack(now(), 0) + b"{}"])
            else:
                self.pub.publish_result(result)
        assert self.conn.recv() == "ready"

    def send(self, result: FrameResult, body: bytes) -> None:
        """One message: ours publishes the result (stamps t.publish, serialises it, sends);
        the baseline sends the same number of bytes with its send time packed in front."""
        seq = self.seq
        self.seq += 1
        if self.kind == "raw":
            try:
                self.sock.send_multipart([b"masks/bench", _HEAD.pack(time.time(), seq) + body],
                                         flags=zmq.NOBLOCK)
            except zmq.Again:
                pass
        else:
            self.pub.publish_result(replace(result, seq=seq, frame_id=seq))

    def begin(self) -> int:
        self.conn.send(("begin", self.seq))
        assert self.conn.recv() == "begun"
        return self.seq

    def end(self) -> tuple[np.ndarray, dict]:
        self.conn.send("settle")
        assert self.conn.recv() == "settled"
        self.conn.send("end")
        return self.conn.recv()

    def close(self) -> None:
        try:
            self.conn.send("quit")
        except OSError:
            pass
        self.proc.join(5)
        if self.proc.is_alive():
            self.proc.terminate()
        if self.kind == "raw":
            self.sock.close(linger=0)
        else:
            self.pub.close()


def _bodies(results: list[FrameResult]) -> list[bytes]:
    """The baseline's payloads: each result's JSON bytes less the packed head, so both
    sides put the same number of bytes on the wire."""
    return [r.with_timestamps(publish=now()).to_json().encode()[_HEAD.size:] for r in results]


def _delivered(log: np.ndarray, first: int, last: int) -> np.ndarray:
    seqs = log[:, 0] if len(log) else np.zeros(0)
    keep = (seqs >= first) & (seqs < last)
    return log[keep]


def run_latency(side: Side, results, bodies, n: int, rate: float) -> dict:
    first = side.begin()
    period = 1.0 / rate
    start = time.perf_counter()
    for i in range(n):
        while time.perf_counter() < start + i * period:
            time.sleep(min(0.002, max(0.0, start + i * period - time.perf_counter())))
        side.send(results[i % len(results)], bodies[i % len(bodies)])
    log, _ = side.end()
    got = _delivered(log, first, side.seq)
    lat = 1000.0 * (got[:, 2] - got[:, 1]) if len(got) else np.zeros(0)
    return {"sent": n, "delivered": len(np.unique(got[:, 0])) if len(got) else 0,
            "p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99), "max_ms": pct(lat, 100)}


def run_throughput(side: Side, results, bodies, seconds: float) -> dict:
    first = side.begin()
    t0 = time.perf_counter()
    n = 0
    while time.perf_counter() - t0 < seconds:
        for _ in range(50):
            side.send(results[n % len(results)], bodies[n % len(bodies)])
            n += 1
    send_s = time.perf_counter() - t0
    log, counters = side.end()
    got = _delivered(log, first, side.seq)
    span = float(got[-1, 2] - got[0, 2]) if len(got) > 1 else 0.0
    # Bare pyzmq hands every message it receives to the consumer; the Subscriber's receive
    # thread takes every message too but hands the consumer only the newest of each batch,
    # so its receive rate comes from its counters over the same span.
    received = counters.get("received", len(got))
    out = {"sent": n, "send_rate": n / send_s, "received": received,
           "received_rate": (received - 1) / span if span > 0 else None,
           "received_fraction": received / n, "to_consumer": len(got),
           "to_consumer_rate": (len(got) - 1) / span if span > 0 else None}
    if counters:
        out["subscriber_counters"] = counters
    return out


def bench_stream(args, ctx) -> dict:
    """Parts 1 and 2."""
    curve = None
    tmp = None
    if args.curve:
        from streamtrack.curve import CurveServer, make_keys

        tmp = tempfile.TemporaryDirectory(prefix="transport-bench-keys-")
        k = make_keys(tmp.name)
        curve = (CurveServer(str(k.server_secret), str(k.folder / "clients")),
                 (str(k.server_public), str(k.client_secret)))
    kinds = ["raw", "ours"] + (["ours+curve"] if curve else [])
    sides = {}
    try:
        for kind in kinds:
            sides[kind] = Side(kind, ctx, curve if kind == "ours+curve" else None)
        rows = []
        for n_obj in args.objects:
            results = make_results(n_obj)
            bodies = _bodies(results)
            row: dict = {"objects": n_obj,
                         "bytes_per_message": int(np.mean([len(b) + _HEAD.size for b in bodies]))}
            for kind in kinds:  # warm-up: first sends of a size (allocations, TCP windows)
                run_latency(sides[kind], results, bodies, 20, args.latency_rate)
            for kind in kinds:
                row[kind] = {"latency": run_latency(sides[kind], results, bodies,
                                                    args.latency_messages, args.latency_rate)}
            for kind in kinds:
                row[kind]["throughput"] = run_throughput(sides[kind], results, bodies, args.blast_seconds)
            rows.append(row)
            print(f"  {n_obj} object(s): done", file=sys.stderr, flush=True)

        # Part 2: both streams side by side at 30 fps for --duration seconds.
        results = make_results(4)
        bodies = _bodies(results)
        firsts = {k: sides[k].begin() for k in ("raw", "ours")}
        period = 1.0 / args.fps
        start = time.perf_counter()
        i = 0
        late = 0
        while time.perf_counter() - start < args.duration:
            due = start + i * period
            slack = due - time.perf_counter()
            if slack > 0:
                time.sleep(slack)
            elif slack < -period:
                late += 1
            for k in ("raw", "ours"):
                sides[k].send(results[i % len(results)], bodies[i % len(bodies)])
            i += 1
        delivery = {"fps": args.fps, "seconds": args.duration, "objects": 4, "late_ticks": late}
        for k in ("raw", "ours"):
            log, counters = sides[k].end()
            got = _delivered(log, firsts[k], sides[k].seq)
            lat = 1000.0 * (got[:, 2] - got[:, 1]) if len(got) else np.zeros(0)
            sent = sides[k].seq - firsts[k]
            uniq = len(np.unique(got[:, 0])) if len(got) else 0
            # Received = reached the subscriber process (the Subscriber's receive thread,
            # seq-counted); to consumer = handed out by recv(). They differ only when the
            # newest-only Subscriber replaced a message before the consumer asked for it.
            received = min(sent, counters.get("received", uniq))
            delivery[k] = {"sent": sent, "received": received,
                           "ratio": received / sent if sent else None, "to_consumer": uniq,
                           "consumer_ratio": uniq / sent if sent else None,
                           "p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99)}
            if counters:
                delivery[k]["subscriber_counters"] = counters
        return {"rows": rows, "delivery": delivery, "kinds": kinds}
    finally:
        for s in sides.values():
            s.close()
        if tmp is not None:
            tmp.cleanup()


# ------------------------------------------------------------------ tracker with subscribers


def _tracker_subscriber(endpoint: str, sleep_s: float, conn: Connection) -> None:
    """A user's script: takes each message from a Subscriber and (slow one) works on it."""
    from streamtrack.subscriber import Subscriber

    sub = Subscriber(endpoint, topics=["masks/", "status/", "stats/"])
    conn.send("ready")
    consumed = 0
    while not conn.poll():
        msg = sub.recv(timeout=0.05)
        if msg is None or msg.result is None:
            continue
        consumed += 1
        if sleep_s:
            time.sleep(sleep_s)
    c = sub.counters("cam0")
    conn.send({"consumed": consumed, "received": c.received, "missed": c.missed,
               "superseded": c.superseded})
    sub.close()


def _fps_from_jsonl(path: Path, skip: int) -> tuple[float | None, int]:
    stamps = [json.loads(line)["t"]["publish"] for line in path.read_text().splitlines() if line]
    stamps = stamps[skip:]  # frame 0 is prompted; the first frames warm up the engine
    if len(stamps) < 2:
        return None, len(stamps)
    return (len(stamps) - 1) / (stamps[-1] - stamps[0]), len(stamps)


def bench_tracker(args, ctx) -> dict:
    """Part 3."""
    from streamtrack.models import save_random_checkpoint
    from streamtrack.synthetic import make_clip, write_video

    modes = {"none": None, "fast": 0.0, "slow": args.slow_sleep}
    runs: dict[str, list[dict]] = {m: [] for m in modes}
    with tempfile.TemporaryDirectory(prefix="transport-bench-") as tmp:
        w, h = (int(x) for x in args.clip_size.split("x"))
        clip = make_clip(args.clip_frames, w, h, num_objects=1)
        video = write_video(clip.frames, Path(tmp) / "clip.mp4")
        box = ",".join(f"{v:g}" for v in clip.box(1))
        ckpt = save_random_checkpoint("sam2.1_hiera_tiny", Path(tmp) / "tiny.pt")
        for rep in range(args.tracker_repeats):
            order = list(modes) if rep % 2 == 0 else list(modes)[::-1]  # interleaved
            for mode in order:
                endpoint = f"tcp://127.0.0.1:{free_port()}"
                jsonl = Path(tmp) / f"{mode}{rep}.jsonl"
                proc = conn = None
                if modes[mode] is not None:
                    conn, child = ctx.Pipe()
                    proc = ctx.Process(target=_tracker_subscriber, args=(endpoint, modes[mode], child),
                                       daemon=True)
                    proc.start()
                    if not conn.poll(60):
                        raise SystemExit("tracker subscriber did not start")
                    conn.recv()
                cmd = [sys.executable, "-m", "streamtrack", "run", str(video), "--model",
                       "sam2.1_hiera_tiny", "--checkpoint", str(ckpt), "--device", args.device,
                       "--image-size", str(args.image_size), "--box", box, "--publish", endpoint,
                       "--save-jsonl", str(jsonl), "-q"]
                t0 = time.monotonic()
                done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.tracker_timeout)
                wall = time.monotonic() - t0
                if done.returncode != 0:
                    raise SystemExit(f"streamtrack run failed ({done.returncode}): "
                                     f"{done.stderr.strip()[-500:]}")
                fps, frames = _fps_from_jsonl(jsonl, args.skip_frames)
                run = {"fps": fps, "frames_timed": frames, "wall_s": round(wall, 1)}
                if conn is not None and proc is not None:
                    conn.send("stop")
                    if conn.poll(10):
                        run["subscriber"] = conn.recv()
                    proc.join(5)
                runs[mode].append(run)
                print(f"  tracker, {mode} subscriber: {fps or 0:.2f} fps", file=sys.stderr, flush=True)
    med = {m: float(np.median([r["fps"] for r in rs if r["fps"]])) for m, rs in runs.items()}
    return {"clip": f"{args.clip_frames} frames {args.clip_size}, 1 object",
            "model": f"sam2.1_hiera_tiny random weights, input {args.image_size}, {args.device}",
            "slow_sleep_s": args.slow_sleep, "runs": runs,
            "fps": {m: round(v, 3) for m, v in med.items()},
            "ratio": {m: ratio(med[m], med["none"]) for m in modes}}


# ------------------------------------------------------------------------------ report


def _f(x, spec: str = ".2f", none: str = "-") -> str:
    return none if x is None else format(x, spec)


def print_table(report: dict) -> None:
    m = report["machine"]
    a = report["args"]
    print(f"machine: {m['cores']}-core {m['arch']} ({m['cpu']}), {m['os']}; Python {m['python']}, "
          f"pyzmq {m['pyzmq']} (libzmq {m['libzmq']})")
    print(f"load average (1/5/15 min) at start: {report['loadavg_start']}, at end: {report['loadavg_end']}")
    names = {"raw": "bare pyzmq", "ours": "Publisher/Subscriber", "ours+curve": "same, CURVE"}
    s = report.get("stream")
    if s:
        kinds = s["kinds"]
        print()
        print(f"publish -> consumer latency (ms), 1280x720 masks, loopback TCP, subscriber in another "
              f"process, {a['latency_messages']} msgs at {a['latency_rate']:g}/s; ratio = / bare pyzmq")
        print(f"{'objects':>7} {'bytes/msg':>9}  {'':<20} {'p50':>8} {'ratio':>6} {'p99':>8} {'ratio':>6} "
              f"{'max':>8} {'delivered':>9}")
        for r in s["rows"]:
            b = r["raw"]["latency"]
            for k in kinds:
                x = r[k]["latency"]
                print(f"{r['objects']:>7} {r['bytes_per_message']:>9}  {names[k]:<20} "
                      f"{_f(x['p50_ms'], '.3f'):>8} {_f(ratio(x['p50_ms'], b['p50_ms'])):>6} "
                      f"{_f(x['p99_ms'], '.3f'):>8} {_f(ratio(x['p99_ms'], b['p99_ms'])):>6} "
                      f"{_f(x['max_ms'], '.3f'):>8} {x['delivered']:>4}/{x['sent']:<4}")
        print()
        print(f"throughput (msgs/s), publisher sending as fast as it can for {a['blast_seconds']:g} s; "
              "received = taken off the socket by the subscriber process; the Subscriber then hands its "
              "consumer the newest message per topic (no keep-everything mode), bare pyzmq every one")
        print(f"{'objects':>7}  {'':<20} {'sent/s':>8} {'ratio':>6} {'received/s':>10} {'ratio':>6} "
              f"{'received':>8} {'to consumer/s':>13}  seq gaps")
        for r in s["rows"]:
            b = r["raw"]["throughput"]
            for k in kinds:
                x = r[k]["throughput"]
                c = x.get("subscriber_counters") or {}
                print(f"{r['objects']:>7}  {names[k]:<20} {_f(x['send_rate'], '.0f'):>8} "
                      f"{_f(ratio(x['send_rate'], b['send_rate'])):>6} {_f(x['received_rate'], '.0f'):>10} "
                      f"{_f(ratio(x['received_rate'], b['received_rate'])):>6} "
                      f"{_f(x['received_fraction'], '.1%'):>8} {_f(x['to_consumer_rate'], '.0f'):>13}  "
                      f"{c.get('missed', '-')}")
        d = s["delivery"]
        print()
        print(f"delivery at {d['fps']:g} fps for {d['seconds']:g} s, {d['objects']} objects 720p, prompt "
              f"consumer (goal >= {GOAL_DELIVERY:.1%}); publisher ticks late by > 1 frame: {d['late_ticks']}")
        for k in ("raw", "ours"):
            x = d[k]
            ok = "" if k == "raw" else ("   ok" if (x["ratio"] or 0) >= GOAL_DELIVERY else "   BELOW GOAL")
            print(f"  {names[k]:>20}: received {x['received']}/{x['sent']} = {_f(x['ratio'], '.4%')}, "
                  f"to consumer {_f(x['consumer_ratio'], '.4%')}, latency p50 {_f(x['p50_ms'], '.3f')} ms, "
                  f"p99 {_f(x['p99_ms'], '.3f')} ms{ok}")
        c = d["ours"].get("subscriber_counters") or {}
        print(f"  ratio Subscriber / bare: {_f(ratio(d['ours']['ratio'], d['raw']['ratio']), '.4f')}; "
              f"Subscriber counters: seq gaps (lost) {c.get('missed', '-')}, replaced by a newer "
              f"message before the consumer read it {c.get('superseded', '-')}")
    t = report.get("tracker")
    if t:
        print()
        print(f"tracker fps (streamtrack run --publish; {t['model']}; clip {t['clip']}; "
              f"slow subscriber sleeps {t['slow_sleep_s']:g} s per message); ratio = / no subscriber")
        for mode, label in (("none", "no subscriber"), ("fast", "fast subscriber"),
                            ("slow", "slow subscriber")):
            r = t["ratio"][mode]
            ok = "" if mode == "none" else ("   ok" if (r or 0) >= GOAL_FPS_RATIO else "   slower")
            subs = [run.get("subscriber") for run in t["runs"][mode] if run.get("subscriber")]
            extra = ""
            if subs:
                extra = (f"  (consumed {subs[-1]['consumed']} of {subs[-1]['received']} received, "
                         f"{subs[-1]['superseded']} replaced by newer ones)")
            print(f"  {label:>16}: {_f(t['fps'][mode], '.3f')} fps  ratio {_f(r, '.3f')}{ok}{extra}")


# The sizes of a full run and of --quick's, for the options left out on the command line.
_FULL = {"objects": [1, 4, 16], "latency_messages": 300, "blast_seconds": 2.0, "duration": 60.0,
         "image_size": 128, "clip_frames": 40, "clip_size": "320x240"}
_QUICK = {"objects": [1, 4], "latency_messages": 60, "blast_seconds": 0.5, "duration": 5.0,
          "image_size": 64, "clip_frames": 10, "clip_size": "160x120"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true",
                    help="print one JSON object on stdout (the table on stderr)")
    ap.add_argument("--objects", type=int, nargs="+", help="object counts (default 1 4 16; --quick: 1 4)")
    ap.add_argument("--latency-messages", type=int, help="messages timed (default 300; --quick: 60)")
    ap.add_argument("--latency-rate", type=float, default=100.0, help="messages/s while timing latency")
    ap.add_argument("--blast-seconds", type=float,
                    help="seconds of full-speed sending (default 2; --quick: 0.5)")
    ap.add_argument("--duration", type=float,
                    help="seconds of the 30 fps delivery run (default 60; --quick: 5)")
    ap.add_argument("--fps", type=float, default=30.0, help="pace of the delivery run")
    ap.add_argument("--curve", action="store_true",
                    help="also time the Publisher with CURVE encryption + authentication")
    ap.add_argument("--no-tracker", action="store_true", help="skip the tracker part")
    ap.add_argument("--no-stream", action="store_true", help="only the tracker part")
    ap.add_argument("--device", default="cpu", help="tracker device (cpu, cuda)")
    ap.add_argument("--image-size", type=int, help="tracker model input (default 128; --quick: 64)")
    ap.add_argument("--clip-frames", type=int, help="tracker clip length (default 40; --quick: 10)")
    ap.add_argument("--clip-size", help="tracker clip WxH (default 320x240; --quick: 160x120)")
    ap.add_argument("--skip-frames", type=int, default=3, help="first frames not timed")
    ap.add_argument("--slow-sleep", type=float, default=0.5, help="slow subscriber: seconds per message")
    ap.add_argument("--tracker-repeats", type=int, default=1, help="runs per mode, interleaved; median")
    ap.add_argument("--tracker-timeout", type=float, default=900.0)
    ap.add_argument("--quick", action="store_true",
                    help="small, short run (smoke test; its figures are not meaningful); "
                         "options given still count")
    args = ap.parse_args(argv)
    for name, value in (_QUICK if args.quick else _FULL).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    for name in ("objects", "latency_messages", "latency_rate", "blast_seconds", "duration", "fps",
                 "image_size", "clip_frames", "tracker_repeats", "tracker_timeout"):
        values = getattr(args, name)
        if not min(values if isinstance(values, list) else [values]) > 0:
            ap.error(f"--{name.replace('_', '-')} must be more than 0")
    if args.skip_frames < 0 or args.slow_sleep < 0:
        ap.error("--skip-frames and --slow-sleep must be at least 0")
    ctx = mp.get_context("spawn")
    report: dict = {"machine": machine(), "loadavg_start": load(),
                    "args": {k: v for k, v in vars(args).items() if k != "json"}}
    if not args.no_stream:
        report["stream"] = bench_stream(args, ctx)
    if not args.no_tracker:
        report["tracker"] = bench_tracker(args, ctx)
    report["loadavg_end"] = load()
    # With --json, stdout is the one JSON object (for jq and scripts); the table goes to stderr.
    with contextlib.redirect_stdout(sys.stderr if args.json else sys.stdout):
        print_table(report)
    if args.json:
        print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
