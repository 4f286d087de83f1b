"""What another busy Python thread costs a loop of torch calls, and a loop of pure Python.

    python benchmarks/lock_probe.py [--calls 1000]

Each torch call gives the interpreter lock up while the operator runs and takes it back
after; a thread that wants the lock gets it in between and keeps it until it gives it up
or Python takes it away (``sys.getswitchinterval()``, 5 ms).  A SAM 2 step on a GPU is
hundreds of such calls, so every other thread's Python lands on it.  Times both loops
alone and beside a thread spinning in pure Python, in the same run.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time

import torch
from pipeline_overhead import _launch_work, _python_work


def _timed(fn, n: int) -> float:
    t0 = time.perf_counter()
    fn(n)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=1000, help="torch calls in the loop (each may wait 5 ms)")
    ap.add_argument("--python-iterations", type=int, default=2_000_000,
                    help="iterations of the pure-Python loop (~0.1 s alone: several switch intervals)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            _python_work(1000)

    print(f"switch interval {sys.getswitchinterval() * 1000:g} ms")
    loops = (("torch calls", _launch_work, args.calls), ("pure Python", _python_work, args.python_iterations))
    for name, fn, n in loops:
        alone = _timed(fn, n)
        stop.clear()
        spinner = threading.Thread(target=spin, daemon=True)
        spinner.start()
        beside = _timed(fn, n)
        stop.set()
        spinner.join()
        print(f"{name:12s} ({n} iterations): alone {alone * 1000:.1f} ms, beside a spinning Python thread "
              f"{beside * 1000:.1f} ms ({beside / alone:.1f}x)")


if __name__ == "__main__":
    main()
