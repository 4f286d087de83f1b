"""Overlay cost per frame: ``streamtrack.overlay.annotate`` vs a naive full-frame blend.

``annotate`` only touches each object's bounding box.  Two full-frame baselines
do the same drawing per object over the whole frame: ``naive`` is the
straightforward NumPy version (float ``np.where`` blend, contours on the
full-frame mask), ``full-frame cv2`` is the same uint8 OpenCV blend ``annotate``
uses but over the whole frame, which isolates what the bounding-box crop buys.
All run in the same process on the same frame and masks (random ellipses), so
the ratios are meaningful whatever the machine.

    python benchmarks/overlay_bench.py [--width 1280 --height 720 --objects 1 4 16] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time

import cv2
import numpy as np

from streamtrack.overlay import Annotation, annotate, color_for
from streamtrack.protocol import mask_bbox


def random_ellipses(n: int, width: int, height: int, rng: np.random.Generator) -> list[np.ndarray]:
    """``n`` bool masks, each a random ellipse of 2-12 % of the frame's short side in radius."""
    masks = []
    short = min(width, height)
    for _ in range(n):
        m = np.zeros((height, width), np.uint8)
        center = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        axes = tuple(int(a) for a in rng.integers(int(0.02 * short), int(0.12 * short), 2))
        cv2.ellipse(m, center, axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
        masks.append(m.astype(bool))
    return masks


def naive_overlay(image: np.ndarray, masks: list[np.ndarray], alpha: float = 0.5) -> np.ndarray:
    """The baseline: every object costs a full-frame blend and a full-frame contour search."""
    out = image.astype(np.float32)
    for i, m in enumerate(masks, start=1):
        color = np.array(color_for(i), np.float32)
        out = np.where(m[..., None], out * (1 - alpha) + color * alpha, out)
    out = out.astype(np.uint8)
    for m in masks:
        contours, _ = cv2.findContours(m.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        contours = [cv2.approxPolyDP(c, epsilon=0.01, closed=True) for c in contours]
        cv2.drawContours(out, contours, -1, (255, 255, 255), 1, lineType=cv2.LINE_AA)
    return out


def fullframe_cv2_overlay(image: np.ndarray, masks: list[np.ndarray], alpha: float = 0.5) -> np.ndarray:
    """A stronger baseline: uint8 OpenCV blend, but over the whole frame for every object."""
    out = image.copy()
    solid = np.empty_like(out)
    for i, m in enumerate(masks, start=1):
        solid[:] = color_for(i)
        np.copyto(out, cv2.addWeighted(out, 1 - alpha, solid, alpha, 0.0), where=m[..., None])
        contours, _ = cv2.findContours(m.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        contours = [cv2.approxPolyDP(c, epsilon=0.01, closed=True) for c in contours]
        cv2.drawContours(out, contours, -1, (255, 255, 255), 1, lineType=cv2.LINE_AA)
    return out


def time_ms(fn, repeats: int) -> float:
    """Median wall time of ``fn()`` in milliseconds after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1000.0 * float(np.median(times))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--height", type=int, default=720)
    ap.add_argument("--objects", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--repeats", type=int, default=30, help="timed runs per case (median reported)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true",
                    help="print one JSON object on stdout (the table on stderr)")
    args = ap.parse_args(argv)
    for name in ("width", "height", "repeats", "objects"):
        values = getattr(args, name)
        if min(values if isinstance(values, list) else [values]) < 1:
            ap.error(f"--{name} must be at least 1")

    rng = np.random.default_rng(args.seed)
    image = rng.integers(0, 256, (args.height, args.width, 3), dtype=np.uint8)
    rows = []
    with contextlib.redirect_stdout(sys.stderr if args.json else sys.stdout):
        print(f"overlay at {args.width}x{args.height}, median of {args.repeats} runs (ms per frame)")
        print(f"{'objects':>7} {'annotate':>9} {'naive':>9} {'ratio':>7} {'full-frame cv2':>15} {'ratio':>7}")
        for n in args.objects:
            masks = random_ellipses(n, args.width, args.height, rng)
            # The bbox comes with each result (engine and wire both carry it), so it is not timed.
            objs = [Annotation(i, m, mask_bbox(m)) for i, m in enumerate(masks, start=1)]
            ours = time_ms(lambda objs=objs: annotate(image, objs, labels=False), args.repeats)
            naive = time_ms(lambda masks=masks: naive_overlay(image, masks), args.repeats)
            full = time_ms(lambda masks=masks: fullframe_cv2_overlay(image, masks), args.repeats)
            rows.append({"objects": n, "annotate_ms": ours, "naive_ms": naive, "naive_ratio": naive / ours,
                         "fullframe_cv2_ms": full, "fullframe_cv2_ratio": full / ours})
            print(f"{n:>7} {ours:>9.2f} {naive:>9.2f} {naive / ours:>6.1f}x "
                  f"{full:>15.2f} {full / ours:>6.1f}x")
    if args.json:
        print(json.dumps({"width": args.width, "height": args.height, "repeats": args.repeats, "rows": rows}))


if __name__ == "__main__":
    main()
