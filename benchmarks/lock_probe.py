"""What other threads' Python costs a loop of torch calls: the interpreter lock.

    python benchmarks/lock_probe.py [--calls 1000]

Each torch call gives the interpreter lock up while the operator runs and takes it back
after; a thread that wants the lock gets it in between and keeps it until it gives it up
or Python takes it away (``sys.getswitchinterval()``, 5 ms).  A SAM 2 step on a GPU is
hundreds of such calls, so every other thread's Python lands on it.

1. A loop of torch calls and a pure-Python loop, each alone and beside a thread spinning
   in pure Python, in the same run.
2. The tracker's other threads' work, one piece at a time (720p): decoding (PyAV, one
   decoder thread), the RGB conversion, and a mask's RLE (``encode_mask``, and
   pycocotools scanning the pixels itself, for comparison), and the emitter's whole work
   for a one-object result (RLE, ZeroMQ publish, a JSONL line).  Each runs on a thread beside
   a loop of torch calls; the calls' lost time per piece is the lock that piece holds.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import av
import cv2
import numpy as np
import options  # benchmarks/options.py
import torch
from pipeline_overhead import _launch_work, _python_work
from pycocotools import mask as mask_utils

from streamtrack.emitter import Outputs, OutputsConfig
from streamtrack.protocol import FrameResult, ObjectResult, Timestamps, encode_mask, mask_area, mask_bbox
from streamtrack.synthetic import make_clip, write_video


def _timed(fn, n: int) -> float:
    t0 = time.perf_counter()
    fn(n)
    return time.perf_counter() - t0


def beside_a_spinner(calls: int, python_iterations: int) -> None:
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            _python_work(1000)

    loops = (("torch calls", _launch_work, calls), ("pure Python", _python_work, python_iterations))
    for name, fn, n in loops:
        alone = _timed(fn, n)
        stop.clear()
        spinner = threading.Thread(target=spin, daemon=True)
        spinner.start()
        beside = _timed(fn, n)
        stop.set()
        spinner.join()
        print(f"  {name:12s} ({n} iterations): alone {alone * 1000:.1f} ms, beside a spinning Python thread "
              f"{beside * 1000:.1f} ms ({beside / alone:.1f}x)")


def _decoding(video: Path, convert: bool):
    def run(n: int) -> None:
        done = 0
        while done < n:
            with av.open(str(video)) as container:
                stream = container.streams.video[0]
                stream.codec_context.thread_count = 1  # one core for it, one for the calls
                for frame in container.decode(stream):
                    if convert:
                        frame.to_ndarray(format="rgb24")
                    done += 1
                    if done >= n:
                        break
    return run


def _pycocotools_rle(mask) -> dict:
    """The RLE as pycocotools makes it from the pixels (what ``encode_mask`` did before it
    scanned with numpy), from the same Fortran-ordered view."""
    fortran = cv2.transpose(mask.view(np.uint8)).T
    return mask_utils.encode(fortran)


def _one_object_result(mask) -> FrameResult:
    """A tracker's result for one object on ``mask``'s frame, before the emitter's RLE."""
    h, w = mask.shape
    return FrameResult(
        stream="probe", seq=0, frame_id=0, pts=0.0, width=w, height=h,
        t=Timestamps(capture=0.0, dequeue=0.0, infer_start=0.0, infer_end=0.0), source_state="streaming",
        dropped={}, objects=(ObjectResult(obj_id=1, score=0.9, state="visible", bbox=mask_bbox(mask),
                                          area=mask_area(mask), iou=0.9),),
    )


def _call_seconds(chunk: int = 50, seconds: float = 0.5) -> float:
    t0, calls = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        _launch_work(chunk)
        calls += chunk
    return (time.perf_counter() - t0) / calls


def lock_per_piece(name: str, fn, n: int, rounds: int = 3, chunk: int = 50) -> None:
    """Median over ``rounds`` of the torch calls' lost time per piece, each round against a
    call time measured just before it (the VM's speed drifts)."""
    alone = _timed(fn, n)
    lost = []
    for _ in range(rounds):
        call_s = _call_seconds(chunk)
        worker = threading.Thread(target=fn, args=(n,))
        calls = 0
        t0 = time.perf_counter()
        worker.start()
        while worker.is_alive():
            _launch_work(chunk)
            calls += chunk
        lost.append((time.perf_counter() - t0 - calls * call_s) / n)
    print(f"  {name:26s}: {alone / n * 1000:5.2f} ms each alone; the torch calls beside it lost "
          f"{statistics.median(lost) * 1000:5.2f} ms each (rounds: "
          f"{', '.join(f'{v * 1000:.2f}' for v in lost)})")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=options.count(1), default=1000,
                    help="torch calls in the loop (each may wait 5 ms)")
    ap.add_argument("--python-iterations", type=options.count(1), default=2_000_000,
                    help="iterations of the pure-Python loop (~0.1 s alone: several switch intervals)")
    ap.add_argument("--frames", type=options.count(1), default=120, help="720p frames decoded per piece")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    print(f"1. beside a spinning thread (switch interval {sys.getswitchinterval() * 1000:g} ms)")
    beside_a_spinner(args.calls, args.python_iterations)

    print(f"2. the lock each piece of work holds (a torch call alone: {_call_seconds() * 1e6:.2f} us)")
    with tempfile.TemporaryDirectory() as tmp:
        clip = make_clip(60, 1280, 720, num_objects=3, seed=3)
        video = write_video(clip.frames, Path(tmp) / "clip.mp4", fps=30)
        mask = clip.masks[1][0]  # a synthetic object's exact mask
        lock_per_piece("decode a 720p frame", _decoding(video, convert=False), args.frames)
        lock_per_piece("decode + RGB conversion", _decoding(video, convert=True), args.frames)
        lock_per_piece("RLE of a 720p mask", lambda n: [encode_mask(mask) for _ in range(n)], 3 * args.frames)
        lock_per_piece("the same, pycocotools' scan", lambda n: [_pycocotools_rle(mask) for _ in range(n)],
                       3 * args.frames)
        outputs = Outputs(OutputsConfig(publish="tcp://127.0.0.1:0", stream="probe",
                                        save_jsonl=str(Path(tmp) / "results.jsonl")))
        try:
            result = _one_object_result(mask)
            lock_per_piece("emit it (RLE, publish, JSONL)", lambda n: [outputs.emit(result, [mask], None)
                                                                     for _ in range(n)], 3 * args.frames)
        finally:
            outputs.close()


if __name__ == "__main__":
    main()
