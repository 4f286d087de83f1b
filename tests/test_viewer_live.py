"""`streamtrack view` against a real `streamtrack run`, on a private Xvfb display.

A tracker process tracks a looping synthetic clip (random-weight tiny model) and
publishes masks and JPEG previews; the viewer subscribes to it, and so does the
test, which decodes the same masks and frames. The viewer pauses the tracker (space),
so the frame on screen stops changing, and the screenshot is checked against the
published mask mapped through the display transform: the object's blended colour
inside the mask, the frame untouched outside it, the HUD drawn. Then a drag and a
click in the window must reach the tracker as prompts in source pixels, which the
tracker confirms with ``prompt_applied`` status events and new object ids in its
results. ``q`` closes the viewer; SIGTERM stops the tracker cleanly.

``STREAMTRACK_VIEWER_SHOTS=docs/screenshots`` also saves ``viewer-tracker.png``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import free_port
from test_viewer import (
    PROMPT_FG_RGB,
    ensure_painted,
    eventually_ok,
    find_window,
    grab,
    marker_drawn,
    near_color,
    needs_x,
    wait_for,
    xdo,
)

from streamtrack import viewer_input as vi
from streamtrack.control import ControlClient
from streamtrack.overlay import color_for
from streamtrack.subscriber import Subscriber
from streamtrack.synthetic import make_clip, write_video

SRC_W, SRC_H = 320, 240
MAX_SIZE = (480, 360)  # scale 1.5: clicks must be mapped, not passed through
SCALE = 1.5
IMAGE_SIZE = 128  # the smallest model input that keeps Hiera's windows: a frame costs least
HUD = (0, 0, 280, 160)  # x0, y0, x1, y1 on screen: banner strip, HUD panel, object labels
BOTTOM = 90  # rows at the bottom: the hint line and the toasts above it


def to_source(x: float, y: float) -> tuple[float, float]:
    """Display pixel -> source pixel, by pixel centres (what the window must send)."""
    return (x + 0.5) / SCALE - 0.5, (y + 0.5) / SCALE - 0.5


class Feed:
    """The test's own subscriber: newest frame and result by frame_id, every status event."""

    def __init__(self, endpoint: str):
        self.sub = Subscriber(endpoint, topics=("masks/cam0", "frames/cam0", "status/cam0"))
        self.results: dict[int, object] = {}
        self.frames: dict[int, object] = {}
        self.events: list = []
        self.last: object | None = None  # newest masks message

    def drain(self) -> None:
        while (msg := self.sub.recv(timeout=0)) is not None:
            if msg.result is not None:
                self.results[msg.result.frame_id] = msg
                self.last = msg
            elif msg.frame is not None:
                self.frames[msg.frame.frame_id] = msg
            elif msg.status is not None:
                self.events.append(msg.status)

    def applied(self, obj_id: int):
        self.drain()
        return next((e for e in self.events if e.kind == "prompt_applied" and e.data["obj_id"] == obj_id),
                    None)

    def settle(self, quiet: float = 1.0, timeout: float = 10.0):
        """The newest masks message once nothing new has come for ``quiet`` seconds
        (a paused tracker's last messages may still be on the wire after its reply)."""
        deadline = time.monotonic() + timeout
        self.drain()
        while time.monotonic() < deadline:
            seen = self.last.result.seq
            time.sleep(quiet)
            self.drain()
            if self.last.result.seq == seen:
                return self.last
        raise AssertionError("the tracker kept publishing while paused")

    def close(self) -> None:
        self.sub.close()


def display_mask(mask: np.ndarray, grow: int) -> np.ndarray:
    """A source mask as it lands on screen, grown (``grow`` > 0) or shrunk (< 0) by
    ``abs(grow)`` pixels on both sides of the scaling (borders, interpolation)."""
    k = np.ones((2 * abs(grow) + 1,) * 2, np.uint8)
    # Shrinking also drops the frame's edge: a mask touching it has its border there.
    kw = {"borderType": cv2.BORDER_CONSTANT, "borderValue": 0}
    op = cv2.dilate if grow > 0 else cv2.erode
    m = op(mask.astype(np.uint8), k, **kw)
    m = cv2.resize(m, MAX_SIZE, interpolation=cv2.INTER_NEAREST)
    return op(m, k, **kw).astype(bool)


def check_screen(shot: np.ndarray, frame_rgb: np.ndarray, mask: np.ndarray, obj_id: int) -> None:
    """The window (RGB) shows ``frame_rgb`` with ``mask`` blended in the object's colour, and the HUD."""
    assert shot.shape == (MAX_SIZE[1], MAX_SIZE[0], 3)
    raw = cv2.resize(frame_rgb, MAX_SIZE, interpolation=cv2.INTER_LINEAR).astype(float)
    img = shot.astype(float)
    free = np.ones(shot.shape[:2], bool)  # where nothing but the frame and masks is drawn
    free[HUD[1]:HUD[3], HUD[0]:HUD[2]] = False
    free[-BOTTOM:] = False
    free[:28] = False  # banner strip
    color = np.array(color_for(obj_id), float)
    coverage = mask.mean()
    assert 0.05 < coverage < 0.8, f"random-weight mask covers {coverage:.0%} of the frame: try another seed"
    inside = display_mask(mask, -2) & free
    assert inside.sum() > 800, "mask interior visible on screen"
    want = 0.5 * raw[inside] + 0.5 * color
    err = np.abs(img[inside] - want).max(axis=1)
    # Blending commutes with the (linear) scaling: only rounding differs.
    assert err.mean() < 2 and (err <= 3).mean() > 0.98, "overlay colour on the mask"
    # Where colour and frame differ clearly, the screen follows the colour.
    distinct = np.abs(color - raw[inside]).max(axis=1) > 60
    assert distinct.sum() > 200
    assert np.abs(img[inside][distinct] - raw[inside][distinct]).mean() > 25, "overlay drawn at all"
    outside = ~display_mask(mask, 2) & free
    assert outside.sum() > 1500, "enough frame outside the mask to compare"
    assert np.abs(img[outside] - raw[outside]).mean() < 1, "frame untouched outside the mask"
    # No overlay colour far from the mask: pixels nearer the blend than the frame are rare.
    blend = 0.5 * raw[outside] + 0.5 * color
    tinted = (np.abs(img[outside] - blend).sum(axis=1) + 30 < np.abs(img[outside] - raw[outside]).sum(axis=1))
    assert tinted.mean() < 0.02, f"overlay colour outside the mask ({tinted.mean():.1%})"
    # HUD: a darkened panel with light text on it.
    panel, under = img[40:110, 4:190], raw[40:110, 4:190]
    assert np.median(panel) < 0.6 * np.median(under), "HUD panel darkens the frame"
    assert (panel.min(axis=2) > 170).sum() > 150, "HUD text"


def box_drawn(shot: np.ndarray, box: tuple[int, int, int, int]) -> float:
    """How much of ``box``'s outline (display pixels) shows the viewer's prompt box: the
    fraction of points along its sides (corners left out) with prompt green within a pixel.
    The box is drawn anti-aliased, so its line is near the colour, not exactly it."""
    x0, y0, x1, y1 = box
    green = near_color(shot, PROMPT_FG_RGB, 60)
    xs, ys = slice(x0 + 3, x1 - 2), slice(y0 + 3, y1 - 2)
    sides = (green[y0 - 1:y0 + 2, xs].any(axis=0), green[y1 - 1:y1 + 2, xs].any(axis=0),
             green[ys, x0 - 1:x0 + 2].any(axis=1), green[ys, x1 - 1:x1 + 2].any(axis=1))
    return float(np.concatenate(sides).mean())


def check_hud_objects(shot: np.ndarray, obj_ids: list[int]) -> None:
    """One HUD row per object, each with a solid swatch of the object's colour."""
    strip = shot[30:300, 6:17]
    for obj_id in obj_ids:
        solid = np.all(strip == np.array(color_for(obj_id), np.uint8), axis=2)
        assert solid.sum() >= 60, f"object {obj_id} in the HUD"


@needs_x
@pytest.mark.timeout(180)
def test_viewer_against_a_real_tracker(xdisplay, checkpoint_factory, tmp_path):
    # Random weights give masks that follow texture, not objects; with this seed they
    # cover about a third of the frame, leaving both mask and frame to compare on screen.
    checkpoint = checkpoint_factory("sam2.1_hiera_tiny", seed=1)
    clip = make_clip(12, SRC_W, SRC_H, num_objects=2, seed=7)
    video = write_video(clip.frames, tmp_path / "clip.mp4", gop=6)
    publish, control = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    box = ",".join(f"{c:g}" for c in clip.box(2, 0))  # the rectangle, away from the HUD
    logs = {name: open(tmp_path / f"{name}.log", "w+") for name in ("tracker", "viewer")}
    tracker = subprocess.Popen(
        [sys.executable, "-m", "streamtrack", "run", str(video), "--checkpoint", str(checkpoint),
         "--image-size", str(IMAGE_SIZE), "--box", box, "--publish", publish, "--control", control,
         "--publish-frames", "--loop", "--realtime", "-q"],
        stdout=logs["tracker"], stderr=subprocess.STDOUT,
        # `run` reads STREAMTRACK_* as configuration and refuses keys it does not know.
        env={k: val for k, val in os.environ.items() if k != "STREAMTRACK_VIEWER_SHOTS"},
    )
    feed = Feed(publish)
    # Qt's MIT-SHM backing store sometimes leaves the window black on Xvfb.
    env = {**os.environ, "DISPLAY": xdisplay, "QT_QPA_PLATFORM": "xcb", "QT_X11_NO_MITSHM": "1"}
    viewer = subprocess.Popen(
        [sys.executable, "-m", "streamtrack", "view", publish, "--control", control, "--stream", "cam0",
         "--max-size", f"{MAX_SIZE[0]}x{MAX_SIZE[1]}", "--screenshots", str(tmp_path / "shots")],
        env=env, stdout=logs["viewer"], stderr=subprocess.STDOUT,
    )

    def log(name: str) -> str:
        logs[name].flush()
        return (tmp_path / f"{name}.log").read_text()[-3000:]

    def tracking(n: int):
        feed.drain()
        assert tracker.poll() is None, f"tracker exited: {log('tracker')}"
        return feed.last is not None and len(feed.results) >= n

    tf = vi.ViewTransform.fit(SRC_W, SRC_H, *MAX_SIZE)  # what the viewer will use
    assert (tf.disp_w, tf.disp_h) == MAX_SIZE and tf.scale == SCALE
    try:
        # The window takes the frame's size once the first frame is in (model loading first).
        wait_for(lambda: tracking(2), 120, "the tracker's first results", interval=0.2)
        wid = find_window(xdisplay, MAX_SIZE, viewer)
        ensure_painted(xdisplay, wid)
        # Space in the window pauses the real tracker: the picture on screen stops changing.
        xdo(xdisplay, "windowfocus", "--sync", wid)
        xdo(xdisplay, "key", "space")
        with ControlClient(control, timeout=10) as ctl:
            wait_for(lambda: ctl.status().get("paused"), 20, "the tracker to pause", interval=0.2)
            last = feed.settle()
            fid = last.result.frame_id
            assert fid in feed.frames, "the paused frame's preview was published"
            frame_rgb = feed.frames[fid].image()
            mask = last.mask(1)
            assert frame_rgb.shape == (SRC_H, SRC_W, 3) and mask.shape == (SRC_H, SRC_W)
            eventually_ok(lambda: check_screen(grab(xdisplay, wid), frame_rgb, mask, 1), 20,
                          "the paused frame with its mask on screen")
            feed.drain()
            assert feed.last.result.frame_id == fid, "nothing published while paused"

            # A drag = a box for a new object (2); n, then a click = a foreground point (3).
            drag = (300, 170, 420, 262)
            xdo(xdisplay, "mousemove", "--window", wid, drag[0], drag[1], "mousedown", 1,
                "mousemove", "--window", wid, 360, 220, "mousemove", "--window", wid, drag[2], drag[3],
                "mouseup", 1)
            # The viewer has taken the drag before it is stopped: it sent the box for
            # object 2 in the loop iteration that took the mouse-up, and draws it (the
            # selected object's prompts) from the next. Stopped earlier, it would take the
            # drag in one batch with n, apply n first and give the box to object 3.
            wait_for(lambda: box_drawn(grab(xdisplay, wid), drag) > 0.8, 20,
                     "the box prompt on screen", interval=0.1)
            # n and the click reach a viewer that has fallen behind in one batch, where Qt
            # calls the mouse callback before waitKeyEx returns the key: the click must
            # still go to the new object.
            click = (121, 283)
            os.kill(viewer.pid, signal.SIGSTOP)
            try:
                xdo(xdisplay, "key", "n")
                xdo(xdisplay, "mousemove", "--window", wid, *click, "click", 1)
            finally:
                os.kill(viewer.pid, signal.SIGCONT)
            # Both taken before the next key (waitKey keeps only a call's last key): object
            # 3 selected, so its point is drawn and object 2's box no longer is.
            wait_for(lambda: (marker_drawn(shot := grab(xdisplay, wid), click, PROMPT_FG_RGB)
                              and box_drawn(shot, drag) < 0.2), 20,
                     "n and the click on screen (object 3's point, not object 2's box)", interval=0.1)
            xdo(xdisplay, "key", "space")  # resume: the queued prompts land on the next frame
            box_ev = wait_for(lambda: feed.applied(2), 60, "the box prompt applied by the tracker",
                              interval=0.2)
            pt_ev = wait_for(lambda: feed.applied(3), 30, "the point prompt applied by the tracker",
                             interval=0.2)
            want_box = (*to_source(drag[0], drag[1]), *to_source(drag[2], drag[3]))
            assert box_ev.data["box"] == pytest.approx(want_box, abs=0.1)
            assert box_ev.data["points"] is None and box_ev.data["mask"] is False
            assert pt_ev.data["points"] == [pytest.approx(to_source(*click), abs=0.1)]
            assert pt_ev.data["labels"] == [1] and pt_ev.data["box"] is None
            assert pt_ev.data["frame_id"] == box_ev.data["frame_id"] > fid
            # The new objects are tracked from that frame on.
            applied_on = box_ev.data["frame_id"]
            wait_for(lambda: tracking(1) and feed.last.result.frame_id >= applied_on, 30,
                     "the result of the prompted frame", interval=0.2)
            assert [o.obj_id for o in feed.last.result.objects] == [1, 2, 3]
            assert set(ctl.status()["objects"]) == {"1", "2", "3"}
            # The HUD lists all three, each with its colour swatch.
            eventually_ok(lambda: check_hud_objects(grab(xdisplay, wid), [1, 2, 3]), 20,
                          "three objects in the HUD")
            if os.environ.get("STREAMTRACK_VIEWER_SHOTS"):  # a picture for the docs, on request
                out = Path(os.environ["STREAMTRACK_VIEWER_SHOTS"]) / "viewer-tracker.png"
                cv2.imwrite(str(out), grab(xdisplay, wid)[..., ::-1])
        xdo(xdisplay, "key", "q")
        assert viewer.wait(15) == 0, log("viewer")
        tracker.send_signal(signal.SIGTERM)
        assert tracker.wait(60) == 143, log("tracker")  # 128 + SIGTERM: stopped on request
        assert "Traceback" not in log("tracker")
    finally:
        for proc in (viewer, tracker):
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        feed.close()
        for f in logs.values():
            f.close()
