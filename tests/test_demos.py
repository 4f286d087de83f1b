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

    def events(frame_id, state, centre):
        return [(e["event"], e["obj_id"], e["frame_id"]) for e in region_monitor.events_for(
            result(frame_id, (1, state, None)), {1: centre}, region, last)]

    assert events(0, "visible", (20, 20)) == []
    assert events(1, "visible", (220, 20)) == [("left_region", 1, 1)]
    assert events(2, "lost", None) == [("lost", 1, 2)]
    assert events(3, "visible", (30, 30)) == [("entered_region", 1, 3)]
    assert events(4, "visible", (32, 30)) == []
    assert events(5, "occluded", None) == [("left_region", 1, 5)]  # no mask: nowhere in the region


def test_a_stray_pixel_far_away_does_not_take_an_object_out_of_its_region():
    """The mask's centroid decides, as the demo's docstring says: the box's centre moves
    halfway across the frame for one stray pixel."""
    mask = np.zeros((10, 100), bool)
    mask[0:10, 0:10] = True
    before = centroids.centroid(mask)
    mask[5, 99] = True
    after = centroids.centroid(mask)
    last: dict[int, str] = {}
    for frame_id, centre in enumerate([before, after]):
        obj = (1, "visible", (0, 0, 100 if frame_id else 10, 10))
        assert region_monitor.events_for(result(frame_id, obj), {1: centre}, (0, 0, 20, 10), last) == []


def test_centroid():
    mask = np.zeros((10, 20), bool)
    mask[2:4, 10:14] = True
    assert centroids.centroid(mask) == (11.5, 2.5)
    assert centroids.centroid(np.zeros((3, 3), bool)) is None
    assert centroids.centroid(None) is None  # an object sent without RLE


@pytest.fixture
def publishing():
    """A publisher on a free port, sending a result every 20 ms: one object, in the left
    and the right half of the frame by turns (so a region monitor has an event each time)."""
    import threading

    from streamtrack.publisher import Publisher

    masks = [np.zeros((24, 32), bool) for _ in range(2)]
    masks[0][4:10, 0:6] = True
    masks[1][4:10, 20:26] = True
    stop = threading.Event()
    with Publisher("tcp://127.0.0.1:0", "cam0") as pub:
        def send():
            seq = 0
            while not stop.wait(0.02):
                obj = ObjectResult.from_mask(1, masks[seq % 2], score=0.9)
                pub.publish_result(FrameResult(stream="cam0", seq=seq, frame_id=seq, pts=None, width=32,
                                               height=24, objects=(obj,)))
                seq += 1

        thread = threading.Thread(target=send, daemon=True)
        thread.start()
        try:
            yield pub.endpoint
        finally:
            stop.set()
            thread.join(5)


@pytest.mark.parametrize("script, args", [("centroids.py", ""), ("region_monitor.py", "--region 0,0,16,24")])
def test_the_demo_consumers_end_quietly_when_their_reader_goes_and_say_a_full_disk(publishing, script, args):
    cmd = f"{sys.executable} demos/{script} {publishing} {args}"
    r = subprocess.run(["bash", "-c", f"{cmd} | head -n 2 >/dev/null; exit ${{PIPESTATUS[0]}}"], cwd=REPO,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    r = subprocess.run(["bash", "-c", f"{cmd} --count 5 > /dev/full"], cwd=REPO, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.endswith("error: cannot write the output: No space left on device\n"), r.stderr


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
    ("centroids.py", ["inproc://x"], "inproc:// cannot cross processes"),  # would wait for ever
])
def test_the_demo_consumers_say_a_user_error_in_one_line(script, args, message):
    r = subprocess.run([sys.executable, f"demos/{script}", *args], cwd=REPO, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.count("\n") <= 2 and "Traceback" not in r.stderr, r.stderr
    assert message in r.stderr.splitlines()[-1], r.stderr
