"""The demos: the consumers' logic, and the wrapper scripts end to end (they end with the
clip, or with the tracker's error)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from streamtrack.protocol import FrameResult, ObjectResult

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "demos"))

import centroids  # noqa: E402
import region_monitor  # noqa: E402


def result(frame_id: int, *objects: tuple[int, str, tuple]) -> FrameResult:
    objs = tuple(ObjectResult(obj_id=i, score=0.9, state=s, bbox=b, area=10) for i, s, b in objects)
    return FrameResult(stream="cam0", seq=frame_id, frame_id=frame_id, pts=None, width=320, height=240,
                       objects=objs)


def test_region_events():
    region = (0, 0, 160, 240)
    last: dict[int, str] = {}
    assert region_monitor.events_for(result(0, (1, "visible", (10, 10, 30, 30))), region, last) == []
    events = region_monitor.events_for(result(1, (1, "visible", (200, 10, 240, 30))), region, last)
    assert [(e["event"], e["obj_id"], e["frame_id"]) for e in events] == [("left_region", 1, 1)]
    events = region_monitor.events_for(result(2, (1, "lost", None)), region, last)
    assert [e["event"] for e in events] == ["lost"]
    events = region_monitor.events_for(result(3, (1, "visible", (20, 20, 40, 40))), region, last)
    assert [e["event"] for e in events] == ["entered_region"]
    assert region_monitor.events_for(result(4, (1, "visible", (22, 20, 42, 40))), region, last) == []


def test_centroid():
    mask = np.zeros((10, 20), bool)
    mask[2:4, 10:14] = True
    assert centroids.centroid(mask) == (11.5, 2.5)
    assert centroids.centroid(np.zeros((3, 3), bool)) is None



def demo(script: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"  # streamtrack, python
    return subprocess.run(["bash", f"demos/{script}", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=240, env={**os.environ, "PATH": path, **(env or {})})


@pytest.mark.timeout(600)
def test_the_demo_scripts_end_with_the_clip_or_the_trackers_error(tiny_checkpoint):
    options = ("--checkpoint", str(tiny_checkpoint), "--image-size", "64")
    r = demo("centroids.sh", *options)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 90 and lines[0].startswith("frame 0: #1 ") and lines[-1].startswith("frame 89: "), \
        r.stdout[-2000:]
    r = demo("region_monitor.sh", *options, env={"COUNT": "3"})  # run options taken without a URL
    assert r.returncode == 0, r.stderr
    r = demo("centroids.sh", "--checkpoint", "missing.pt")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "missing.pt not found" in r.stderr, r.stderr


@pytest.mark.parametrize("script, args, message", [
    ("region_monitor.py", ["--region", "abc"], "argument --region: 'abc': give x0,y0,x1,y1 (four numbers)"),
    ("region_monitor.py", ["--region", "1,2,3"], "argument --region: '1,2,3': give x0,y0,x1,y1"),
    ("region_monitor.py", ["foo://x", "--region", "0,0,9,9"], "error: invalid endpoint 'foo://x'"),
    ("centroids.py", ["foo://x"], "error: invalid endpoint 'foo://x'"),
    # a region no object can be inside, a count that never ends: said, not run
    ("region_monitor.py", ["--region", "nan,0,9,9"], "argument --region: 'nan,0,9,9': give x0,y0,x1,y1"),
    ("region_monitor.py", ["--region", "300,300,0,0"], "'300,300,0,0': needs x0 < x1 and y0 < y1"),
    ("region_monitor.py", ["--region", "0,0,9,9", "--count", "-5"], "argument --count: '-5': a number"),
    ("centroids.py", ["--count", "-5"], "argument --count: '-5': a number of messages, 0 or more"),
])
def test_the_demo_consumers_say_a_user_error_in_one_line(script, args, message):
    r = subprocess.run([sys.executable, f"demos/{script}", *args], cwd=REPO, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.count("\n") <= 2 and "Traceback" not in r.stderr, r.stderr
    assert message in r.stderr.splitlines()[-1], r.stderr
