"""Viewer: pure logic without a display, drawing without a window, and end to end under Xvfb.

The end-to-end test runs ``streamtrack view`` in a subprocess on its own Xvfb
display (imshow without a display kills the process), feeds it from a test
publisher, stands in for the tracker with a recording control handler, and drives
it with xdotool: clicks, a drag and keys, then checks the prompts' source-frame
coordinates and the window's pixels.
"""

from __future__ import annotations

import os
import queue
import re
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path
from unittest import mock

import cv2
import numpy as np
import pytest

from streamtrack import viewer as v
from streamtrack import viewer_input as vi
from streamtrack import viewer_state as vs
from streamtrack.control import AddPrompt, ControlServer, Pause, RemoveObject, Reset, Resume
from streamtrack.protocol import FrameHeader, FrameResult, ObjectResult, Stats, StatusEvent, now
from streamtrack.subscriber import Message

# ------------------------------------------------------------------ coordinate mapping


@pytest.mark.parametrize(
    ("src", "max_size", "upscale", "scale", "disp"),
    [
        ((1920, 1080), (1280, 720), True, 2 / 3, (1280, 720)),
        ((640, 480), (1280, 720), True, 1.5, (960, 720)),
        ((640, 480), (1280, 720), False, 1.0, (640, 480)),
        ((4000, 3000), (1280, 720), True, 0.24, (960, 720)),
        ((720, 1280), (1280, 720), True, 0.5625, (405, 720)),
        ((160, 120), (480, 360), True, 3.0, (480, 360)),
    ],
)
def test_fit(src, max_size, upscale, scale, disp):
    tf = vi.ViewTransform.fit(*src, *max_size, upscale=upscale)
    assert tf.scale == pytest.approx(scale)
    assert (tf.disp_w, tf.disp_h) == disp


@pytest.mark.parametrize("src", [(1920, 1080), (640, 480), (160, 120), (4000, 3000), (721, 1283)])
@pytest.mark.parametrize("max_size", [(1280, 720), (480, 360), (300, 900)])
def test_mapping_round_trip_and_edges(src, max_size):
    tf = vi.ViewTransform.fit(*src, *max_size)
    rng = np.random.default_rng(0)
    for x, y in rng.uniform(0, 1, (20, 2)) * [src[0] - 1, src[1] - 1]:
        back = tf.to_source(*tf.to_display(x, y))
        assert back == pytest.approx((x, y), abs=0.01)
    # Corner display pixels land inside the frame, on the source pixels they show.
    assert tf.to_source(0, 0) == pytest.approx((0, 0), abs=max(0.5 / tf.scale, 0.01))
    x1, y1 = tf.to_source(tf.disp_w - 1, tf.disp_h - 1)
    assert src[0] - 1 - 0.5 / tf.sx <= x1 <= src[0] - 1
    assert src[1] - 1 - 0.5 / tf.sy <= y1 <= src[1] - 1
    # Clicks outside the image (window borders) clamp to the frame.
    assert tf.to_source(-20, tf.disp_h + 50) == (0, src[1] - 1)


def test_mapping_known_values():
    tf = vi.ViewTransform(1280, 720, 0.5)  # 640x360 on screen
    assert tf.to_source(10, 10) == (20.5, 20.5)  # display pixel 10 shows source 20..21
    assert tf.to_display(20.5, 20.5) == (10, 10)
    tf = vi.ViewTransform(160, 120, 3.0)  # upscaled: display pixels 30..32 show source 10
    assert tf.to_source(31, 31) == (10, 10)


def test_parse_size():
    assert v.parse_size("1280x720") == (1280, 720)
    assert v.parse_size("640X480") == (640, 480)
    assert v.parse_size("8192x64") == (8192, 64)
    for bad in ("1280", "x720", "axb", "10x10", "-5x300", "100000x100000", "8193x600"):
        with pytest.raises(v.UserError, match="--max-size must be WxH with both from 64 to 8192 pixels"):
            v.parse_size(bad)


@pytest.mark.parametrize("platform", ["wayland", "wayland;offscreen"])
def test_a_qt_platform_this_opencv_lacks_is_one_line(monkeypatch, platform):
    """A Wayland desktop's QT_QPA_PLATFORM=wayland: the opencv-python wheels' Qt has xcb
    only, and Qt aborted the process with advice to reinstall the application."""
    import cv2

    if not (Path(cv2.__file__).parent / "qt" / "plugins" / "platforms").is_dir():
        pytest.skip("this OpenCV does not ship its own Qt plugins")
    monkeypatch.setenv("QT_QPA_PLATFORM", platform)
    monkeypatch.setattr(v, "opencv_has_windows", lambda: True)
    with pytest.raises(v.UserError, match=f"QT_QPA_PLATFORM={re.escape(platform)}: this OpenCV's Qt has "
                                          "only xcb platform plugins"):
        v.check_display()
    monkeypatch.setenv("QT_QPA_PLATFORM", "wayland;xcb")  # a fallback it has: on to the display
    monkeypatch.delenv("DISPLAY", raising=False)
    with pytest.raises(v.UserError, match="no display: DISPLAY is not set"):
        v.check_display()


@pytest.mark.parametrize("command", ["view", "subscribe"])
def test_an_inproc_endpoint_is_refused_by_the_processes_that_cannot_reach_it(command, capsys):
    """Another process never reaches inproc://: it waited for good, silently."""
    from streamtrack.cli import main

    assert main([command, "inproc://cam"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["streamtrack: error: endpoint inproc://cam: inproc:// cannot cross processes; "
                   "use tcp:// or ipc://"]


# ------------------------------------------------------------------------ interaction

TF = vi.ViewTransform(1280, 720, 0.5)


def click(ia, x, y, button="left", shift=False):
    flags = vi.EVENT_FLAG_SHIFTKEY if shift else 0
    down, up = ((vi.EVENT_LBUTTONDOWN, vi.EVENT_LBUTTONUP) if button == "left"
                else (vi.EVENT_RBUTTONDOWN, vi.EVENT_RBUTTONUP))
    assert ia.mouse(down, x, y, flags, TF) == []
    return ia.mouse(up, x, y, flags, TF)


def test_click_labels_and_accumulation():
    ia = vi.Interaction()
    ia.observe([1, 2])
    (a,) = click(ia, 10, 10)
    # A new object: the tracker renumbers it if another viewer took 3 meanwhile.
    assert a == AddPrompt(obj_id=3, points=((20.5, 20.5),), labels=(1,), new=True)
    (b,) = click(ia, 20, 30, button="right")
    assert b.obj_id == 3 and b.labels == (1, 0)
    assert b.points == ((20.5, 20.5), (40.5, 60.5))
    (c,) = click(ia, 5, 5, shift=True)
    assert c.labels == (1, 0, 0)
    # Still the same object: the next click refines it, it does not start another.
    assert ia.selected == 3


def test_drag_is_a_box_in_source_pixels_and_small_moves_are_clicks():
    ia = vi.Interaction()
    ia.mouse(vi.EVENT_LBUTTONDOWN, 100, 80, 0, TF)
    ia.mouse(vi.EVENT_MOUSEMOVE, 60, 50, 1, TF)
    assert ia.drag_box == (100, 80, 60, 50)
    (box,) = ia.mouse(vi.EVENT_LBUTTONUP, 40, 30, 0, TF)  # dragged up-left: box sorted
    assert box == AddPrompt(obj_id=1, box=(80.5, 60.5, 200.5, 160.5), new=True)
    assert ia.drag_box is None
    # A box restarts the object's prompt set; a later click adds points to the box.
    (pt,) = click(ia, 50, 50)
    assert pt.box == (80.5, 60.5, 200.5, 160.5) and pt.points == ((100.5, 100.5),)
    # Jitter under the threshold is a click, at the press position.
    ia.mouse(vi.EVENT_LBUTTONDOWN, 200, 200, 0, TF)
    ia.mouse(vi.EVENT_MOUSEMOVE, 202, 203, 1, TF)
    (jit,) = ia.mouse(vi.EVENT_LBUTTONUP, 203, 203, 0, TF)
    assert jit.box is not None and jit.points[-1] == (400.5, 400.5) and jit.labels[-1] == 1


def test_a_click_on_a_later_frame_refines_the_object_where_it_is_now():
    """Earlier clicks marked where the object was on their frame: sent again with a click
    on a later frame of a running video, they would be on whatever is there now. Once the
    object is tracked on the frame shown, a click there starts afresh from its box there.
    Until then (its first prompt not applied yet), and on the frame shown while paused,
    clicks accumulate; a set from before the pause is not added to."""
    ia = vi.Interaction()
    ia.observe([1])
    ia.frame_id = 10
    click(ia, 10, 10)
    ia.frame_id = 11  # object 2 not tracked yet: still marking it
    (same,) = click(ia, 20, 20, button="right")
    assert same.obj_id == 2 and same.points == ((20.5, 20.5), (40.5, 40.5)) and same.labels == (1, 0)
    assert same.box is None
    ia.frame_id, ia.frame_boxes = 46, {1: (0, 0, 9, 9), 2: (50.0, 40.0, 90.0, 80.0)}  # tracked since
    assert ia.shown_prompts(2) is None  # its stars are not drawn where it was
    (later,) = click(ia, 30, 30)
    assert later.obj_id == 2 and later.points == ((60.5, 60.5),) and later.labels == (1,)
    assert later.box == (50.0, 40.0, 90.0, 80.0)
    assert ia.shown_prompts(2).points == [(60.5, 60.5)]
    ia.paused = True
    ia.frame_id, ia.frame_boxes = 47, {2: (1.0, 1.0, 5.0, 5.0)}  # paused on a later frame
    assert ia.shown_prompts(2) is None  # frame 46's click is not where the object is now
    (paused,) = click(ia, 40, 40, button="right")  # afresh from its box on the paused frame
    assert paused.points == ((80.5, 80.5),) and paused.labels == (0,) and paused.box == (1.0, 1.0, 5.0, 5.0)
    (again,) = click(ia, 45, 45)  # paused: clicks on the frame shown accumulate
    assert again.points == ((80.5, 80.5), (90.5, 90.5)) and again.labels == (0, 1)
    assert again.box == (1.0, 1.0, 5.0, 5.0) and ia.shown_prompts(2).points == [(80.5, 80.5), (90.5, 90.5)]
    # A tracked object selected by its key is refined from its box on the frame shown.
    ia.paused = False
    ia.key(ord("1"))
    (one,) = click(ia, 2, 2, button="right")
    assert one.obj_id == 1 and one.box is None and one.labels == (0,)  # not on frame 47
    ia.frame_boxes = {1: (0.0, 0.0, 9.0, 9.0)}
    ia.frame_id = 48
    (two,) = click(ia, 3, 3, button="right")
    assert two.box == (0.0, 0.0, 9.0, 9.0) and two.points == ((6.5, 6.5),)


def test_a_new_object_whose_id_another_viewer_took_goes_by_the_id_the_tracker_gave_it():
    """Two viewers each pick the next id for their new object; the tracker gives the
    second another id. Prompts already queued with the picked id go to the given one, as
    refinements, and the viewer goes on with it."""
    sent = []

    class Tracker:  # what the control server answers: id 3 is another viewer's
        def send(self, cmd):
            sent.append(cmd)
            given = 4 if cmd.new and cmd.obj_id == 3 else cmd.obj_id
            return {"ok": True, "obj_id": given}

    worker = v._ControlWorker.__new__(v._ControlWorker)
    worker.client, worker.timeout, worker.endpoint = Tracker(), 2.0, "tcp://127.0.0.1:1"
    worker.replies, worker._jobs, worker._given = queue.Queue(), queue.Queue(), {}
    ia = vi.Interaction()
    ia.observe([1, 2])
    (first,) = click(ia, 10, 10)
    (second,) = click(ia, 20, 20, button="right")  # clicked before the first one's reply
    assert first.new and second.new and first.obj_id == second.obj_id == 3
    for cmd in (first, second, RemoveObject(obj_id=3), None):
        worker._jobs.put(cmd)
    worker._run()
    assert [(c.name, c.obj_id, getattr(c, "new", None)) for c in sent] == [
        ("add_prompt", 3, True), ("add_prompt", 4, False), ("remove_object", 4, None)]
    vw = v.Viewer("tcp://127.0.0.1:1", control="tcp://127.0.0.1:2")
    vw.interaction = ia
    vw.reply(*worker.replies.get_nowait())
    assert "object 3 was taken by another client, so this one is object 4" in vw.toasts[-1].text
    assert ia.selected == 4 and 4 in ia.prompts and 3 not in ia.prompts
    (third,) = click(ia, 30, 30, button="right")
    assert third.obj_id == 4 and not third.new and third.labels == (1, 0, 0)

    # Once the window has the rename, id 3 is the other client's object again: a click on
    # it (selected by its key) refines it, and removing it removes it, not object 4.
    ia2 = vi.Interaction()
    ia2.observe([1, 2])
    (mine,) = click(ia2, 10, 10)
    for cmd in (mine, None):
        worker._jobs.put(cmd)
    del sent[:]
    worker._run()
    vw.interaction = ia2
    vw.take_replies(worker)  # the window's loop: the rename, and the worker told of it
    assert ia2.selected == 4
    ia2.observe([1, 2, 3, 4])
    ia2.key(ord("3"))
    (on_3,) = click(ia2, 5, 5)
    ia2.key(ord("4"))
    (on_4,) = click(ia2, 6, 6)
    for cmd in (on_3, RemoveObject(obj_id=3), on_4, None):
        worker._jobs.put(cmd)
    worker._run()
    assert [(c.name, c.obj_id, getattr(c, "new", None)) for c in sent] == [
        ("add_prompt", 3, True), ("add_prompt", 3, False), ("remove_object", 3, None),
        ("add_prompt", 4, False)]


def test_a_view_only_click_changes_nothing_in_the_viewer():
    ia = vi.Interaction(can_send=False)
    ia.observe([1])
    (a,) = click(ia, 10, 10)
    assert a.obj_id == 2  # what would have been sent (the viewer says it was not)
    ia.mouse(vi.EVENT_LBUTTONDOWN, 10, 10, 0, TF)
    (b,) = ia.mouse(vi.EVENT_LBUTTONUP, 50, 50, 0, TF)
    assert b.box is not None
    assert ia.prompts == {} and ia.selected is None


def test_mouse_without_frame_or_press_does_nothing():
    ia = vi.Interaction()
    assert ia.mouse(vi.EVENT_LBUTTONUP, 5, 5, 0, TF) == []
    ia.mouse(vi.EVENT_LBUTTONDOWN, 5, 5, 0, None)
    assert ia.mouse(vi.EVENT_LBUTTONUP, 5, 5, 0, None) == []
    assert ia.prompts == {}


def test_keys_select_new_remove_reset_pause():
    ia = vi.Interaction()
    ia.observe([1, 4])
    assert ia.key(ord("n")) == [] and ia.selected == 5
    assert ia.key(ord("n")) == [] and ia.selected == 6  # n twice: two fresh ids
    assert ia.key(ord("2")) == [] and ia.selected == 2
    (p,) = click(ia, 1, 1)
    assert p.obj_id == 2
    assert ia.key(ord("d")) == [RemoveObject(obj_id=2)]
    assert ia.selected is None and 2 not in ia.prompts
    assert ia.key(ord("d")) == []  # nothing selected: nothing to remove
    assert ia.key(ord("r")) == [Reset()] and ia.prompts == {} and ia.selected is None
    assert ia.key(ord(" ")) == [Pause()] and ia.paused
    assert ia.key(ord(" ")) == [Resume()] and not ia.paused
    assert ia.key(ord("s")) == [vi.Screenshot()]
    assert ia.key(ord("h")) == [vi.ToggleHelp()] and ia.show_help
    assert ia.key(ord("q")) == [vi.Quit()] and ia.key(27) == [vi.Quit()]
    assert ia.key(-1) == [] and ia.key(0x1000020) == []  # no key; Qt's Shift alone


# -------------------------------------------------------------------------- HUD stats


def test_sliding_window_percentiles():
    w = vs.SlidingWindow(100)
    assert w.p50_p95() is None
    for x in range(1, 101):
        w.add(x / 1000)
    w.add(float("nan"))  # ignored, does not poison the percentiles
    p50, p95 = w.p50_p95()
    assert p50 == pytest.approx(0.0505) and p95 == pytest.approx(0.09505)
    for _ in range(100):  # the window slides: old samples leave
        w.add(1.0)
    assert w.p50_p95() == (1.0, 1.0) and len(w) == 100


def test_rate_meter():
    r = vs.RateMeter(horizon=2.0)
    for i in range(21):
        r.tick(100 + i * 0.1)
    assert r.rate(102.0) == pytest.approx(10.0)
    assert r.rate(105.0) == 0.0  # stopped: falls to zero


def test_rate_meter_slower_than_its_horizon():
    r = vs.RateMeter(horizon=2.0)
    for i in range(5):  # a CPU tracker: one result every 2.5 s
        r.tick(100 + i * 2.5)
    assert r.rate(110.5) == pytest.approx(0.4)
    assert r.rate(114.0) == pytest.approx(0.4)  # 4 s since the last tick: within 2 intervals
    assert r.rate(115.5) == 0.0  # 5.5 s: stopped


def test_source_state_and_banner():
    s = vs.SourceStateTracker()
    s.update("reconnecting", 10.0)
    s.update("streaming", 9.0)  # an older result handed out after the event
    assert s.state == "reconnecting"
    s.update("streaming", 11.0)
    assert s.state == "streaming"


def test_the_reason_a_source_is_down_lasts_as_long_as_the_outage():
    s = vs.SourceStateTracker()
    s.update("reconnecting", 10.0, "connection refused")  # the event (or stats)
    s.update("reconnecting", 11.0)  # a result carries no reason: it stays
    assert s.reason == "connection refused"
    s.update("reconnecting", 12.0, "401 Unauthorized")  # the camera is back, the password not
    assert s.reason == "401 Unauthorized"
    s.update("streaming", 13.0)
    assert s.reason is None
    s.update("streaming", 14.0, "stale history")  # only a source that is down has one
    assert s.reason is None
    assert vs.banner_for("streaming", 0.5, True) is None
    assert vs.banner_for("reconnecting", 0.5, True) == ("SOURCE RECONNECTING", vs.BANNER_WARN_BGR)
    assert vs.banner_for("stale", 0.1, True)[1] == vs.BANNER_WARN_BGR
    assert vs.banner_for("reconnecting", 30, True)[1] == vs.BANNER_WARN_BGR  # silence explained
    text, color = vs.banner_for("streaming", 3.2, True)
    assert text.startswith("TRACKER NOT PUBLISHING") and color == vs.BANNER_DEAD_BGR
    assert vs.banner_for(None, 3.0, False)[0].startswith("WAITING FOR TRACKER")
    assert vs.banner_for("ended", 0.0, True)[1] == vs.BANNER_DONE_BGR
    # The end of a file, or a tracker that said it stopped: silence then is no failure.
    assert vs.banner_for("ended", 30, True) == ("SOURCE ENDED", vs.BANNER_DONE_BGR)
    assert vs.banner_for("streaming", 30, True, tracker_stopped=True) == ("TRACKER STOPPED",
                                                                          vs.BANNER_DONE_BGR)
    assert vs.banner_for("ended", 30, True, tracker_stopped=True)[0] == "TRACKER STOPPED, source ended"
    # A file run holding its first frame says what it waits for.
    assert vs.banner_for("streaming", 0.5, True, waiting_for_prompt=True)[0].startswith(
        "WAITING FOR A PROMPT: drag a box")


def test_banner_while_paused_from_the_viewer():
    # A paused tracker sends no masks, but stats every second: it says so at once...
    assert vs.banner_for("streaming", 0.5, True, paused=True) == ("TRACKER PAUSED (space resumes)",
                                                                vs.BANNER_DONE_BGR)
    # ...and a paused tracker gone silent is not just paused, nor is a source going down.
    assert vs.banner_for("streaming", 30, True, paused=True)[0].startswith("TRACKER NOT PUBLISHING")
    assert vs.banner_for("reconnecting", 30, True, paused=True)[1] == vs.BANNER_WARN_BGR
    assert vs.banner_for(None, 30, False, paused=True)[1] == vs.BANNER_DEAD_BGR


def test_the_viewer_follows_the_trackers_stop_and_undoes_a_pause_that_failed():
    vw = v.Viewer("tcp://127.0.0.1:1", control="tcp://127.0.0.1:2")
    vw.handle(_msg("status", status=StatusEvent(stream="cam0", kind="tracker_state", time=now(),
                                                data={"old": "running", "new": "stopped"})))
    assert vw.banner(now() + 30)[0] == "TRACKER STOPPED"
    # A subscriber hands status out first: the last result and stats, sent before the
    # stop, may be read after it, and do not undo it.
    vw.handle(_msg("masks", result=_result(9)))
    vw.handle(_msg("stats", stats=Stats(stream="cam0", time=now(), fps=3.0)))
    assert vw.banner(now() + 30)[0] == "TRACKER STOPPED"
    vw.handle(_msg("status", status=StatusEvent(stream="cam0", kind="tracker_state", time=now(),
                                                data={"old": "starting", "new": "running"})))
    assert vw.banner(now()) is None
    (pause,) = vw.interaction.key(ord(" "))
    assert vw.interaction.paused
    vw.reply(pause, "pause: no reply within 2 s (…)", True)
    assert not vw.interaction.paused  # the next space pauses, it does not resume
    assert vw.toasts[-1].error and "no reply" in vw.toasts[-1].text
    vw.interaction.paused = True  # a click on the paused picture shows no mask until resumed
    vw.reply(AddPrompt(obj_id=3, box=(1, 1, 9, 9)), "add_prompt 3: ok", False)
    assert vw.toasts[-1].text == "add_prompt 3: ok (applied to the next frame when resumed)"


# ---------------------------------------------------------------------- frame pairing


def _result(fid, seq=None, objects=(), capture=None, state="streaming", w=64, h=48):
    return FrameResult(stream="cam0", seq=fid if seq is None else seq, frame_id=fid, pts=None,
                       width=w, height=h, t={"capture": capture}, source_state=state,
                       objects=objects)


def _frame(fid, w=64, h=48):
    return vs.FrameItem(FrameHeader("cam0", fid, w, h, 0.0), b"jpeg")


def test_pairing_prefers_newest_frame_with_its_result():
    p = vs.FramePairer(keep=4)
    assert p.select() is None
    p.add_result(_result(0))
    assert p.select() == vs.Pairing(None, p.results[0], False)  # no frames: masks only
    for i in range(3):
        p.add_frame(_frame(i))
    p.add_result(_result(1))
    sel = p.select()
    assert sel.exact and sel.frame.frame_id == 1 and sel.result.frame_id == 1
    # Results lag beyond the kept frames: newest frame with the newest masks.
    for i in range(3, 10):
        p.add_frame(_frame(i))
    sel = p.select()
    assert not sel.exact and sel.frame.frame_id == 9 and sel.result.frame_id == 1
    assert list(p.frames) == [6, 7, 8, 9]  # bounded


def test_pairing_after_tracker_restart():
    p = vs.FramePairer()
    for i in range(10, 13):
        p.add_frame(_frame(i))
        p.add_result(_result(i))
    p.add_frame(_frame(0))  # restarted: counts from 0 again
    assert list(p.frames) == [0] and list(p.results) == []
    p.add_result(_result(0))
    assert p.select().exact
    # The new run's result 0 may come before its frame 0: the old frame 0 is not its.
    p = vs.FramePairer()
    for i in range(3):
        p.add_frame(_frame(i))
        p.add_result(_result(i))
    p.add_result(_result(0, seq=100))
    assert list(p.frames) == [] and p.select() == vs.Pairing(None, p.results[0], False)


# ------------------------------------------------------------ drawing (no window needed)

SRC_W, SRC_H = 640, 480
MAX_SIZE = (480, 360)  # scale 0.75: clicks must be mapped, not passed through


def _scene():
    """A textured frame and two masks (kept clear of the HUD and the bottom line)."""
    from streamtrack.synthetic import make_clip

    image = make_clip(1, SRC_W, SRC_H, num_objects=0, seed=3).frames[0]
    m1 = np.zeros((SRC_H, SRC_W), np.uint8)
    cv2.ellipse(m1, (470, 330), (90, 60), 0, 0, 360, 1, -1)
    m2 = np.zeros((SRC_H, SRC_W), np.uint8)
    m2[260:390, 110:240] = 1
    return image, {1: m1.astype(bool), 2: m2.astype(bool)}


def _jpeg(image):
    ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(image[..., ::-1]), [cv2.IMWRITE_JPEG_QUALITY, 80])
    assert ok
    return buf.tobytes()


def _objects(masks):
    return [ObjectResult.from_mask(i, m, score=0.9, state="visible" if i == 1 else "occluded")
            for i, m in masks.items()]


def _expected_display(image):
    """The frame as the window shows it without overlays (decoded JPEG, scaled)."""
    rgb = cv2.imdecode(np.frombuffer(_jpeg(image), np.uint8), cv2.IMREAD_COLOR)[..., ::-1]
    tf = vi.ViewTransform.fit(SRC_W, SRC_H, *MAX_SIZE)
    return cv2.resize(rgb, (tf.disp_w, tf.disp_h), interpolation=cv2.INTER_AREA).astype(float), tf


def _interior(mask, tf, erode=4):
    small = cv2.resize(mask.astype(np.uint8), (tf.disp_w, tf.disp_h), interpolation=cv2.INTER_NEAREST)
    return cv2.erode(small, np.ones((2 * erode + 1, 2 * erode + 1), np.uint8)).astype(bool)


def check_overlay(shot_rgb, image, masks, *, banner: tuple[int, int, int] | None, frame=True):
    """Asserts on a screenshot (RGB, display size): mask colours, HUD, banner.

    ``frame=False`` checks the banner only (toasts may cover parts of the frame).
    """
    from streamtrack.overlay import color_for

    raw, tf = _expected_display(image)
    shot = shot_rgb.astype(float)
    assert shot.shape[:2] == (tf.disp_h, tf.disp_w)
    top = shot[2:24, :]
    if banner is None:
        assert np.abs(top - raw[2:24, :]).mean() < 6, "no banner"
    else:
        rgb = np.array(banner[::-1], float)
        assert (np.abs(top - rgb).max(axis=2) < 40).mean() > 0.6, "banner colour"
    if not frame:
        return
    for obj_id, mask in masks.items():
        inside = _interior(mask, tf)
        want = 0.5 * raw[inside] + 0.5 * np.array(color_for(obj_id), float)
        assert np.abs(shot[inside] - want).mean() < 12, f"object {obj_id} overlay colour"
        assert np.abs(shot[inside] - raw[inside]).mean() > 25, f"object {obj_id} drawn at all"
    # Outside every mask (and away from HUD, banner and bottom line) the frame is untouched.
    outside = ~cv2.dilate(np.any([_interior(m, tf, 0) for m in masks.values()], axis=0)
                          .astype(np.uint8), np.ones((9, 9), np.uint8)).astype(bool)
    outside[:210] = False  # HUD and the objects' labels
    outside[-45:] = False
    assert outside.sum() > 5000
    assert np.abs(shot[outside] - raw[outside]).mean() < 6
    # The HUD panel darkens the frame under it.
    assert shot[40:100, 5:180].mean() < 0.7 * raw[40:100, 5:180].mean(), "HUD panel"


def _msg(kind, received=None, **kw):
    return Message(topic=f"{kind}/cam0", kind=kind, stream="cam0", received=received or now(), **kw)


@pytest.mark.parametrize("restarts", [0, 1])
def test_a_new_run_on_the_same_endpoints_shows_none_of_the_last_runs_objects(restarts):
    """A viewer left open while one run ends and the next starts: the last run's masks
    were drawn on the new run's frame 0 (the same frame_id), its objects listed, and the
    first box made object 4.  A supervised restart (restarts > 0) keeps them: its objects
    go on."""
    vw = v.Viewer("tcp://127.0.0.1:1", control="tcp://127.0.0.1:2")
    objects = tuple(ObjectResult.from_mask(i, np.ones((48, 64), bool), score=0.9) for i in (1, 2, 3))
    for fid in range(6):
        vw.handle(_msg("frames", frame=FrameHeader("cam0", fid, 64, 48, now()), jpeg=b"jpeg"))
        vw.handle(_msg("masks", result=_result(fid, objects=objects, capture=now() - 0.1)))
    vw.handle(_msg("status", status=StatusEvent("cam0", "tracker_state", now(),
                                                data={"old": "running", "new": "stopped"})))
    vw.handle(_msg("status", status=StatusEvent("cam0", "tracker_state", now(),
                                                data={"old": "starting", "new": "running",
                                                      "restarts": restarts, "resumed_at_frame": 0})))
    vw.handle(_msg("frames", frame=FrameHeader("cam0", 0, 64, 48, now()), jpeg=b"jpeg"))
    pairing = vw.pairer.select()
    assert pairing.frame.frame_id == 0
    if restarts:
        assert vw.interaction.next_id() == 4 and len(vw.mask_latency) == 6
    else:
        assert pairing.result is None and vw.pairer.latest_result is None
        assert vw.interaction.next_id() == 1 and len(vw.mask_latency) == 0


def test_the_hud_says_why_the_source_is_down_from_stats_or_the_event():
    vw = v.Viewer("tcp://127.0.0.1:1", config=v.ViewerConfig(max_size=MAX_SIZE))
    reason = "could not open rtsp://127.0.0.1:9/cam: Connection refused; check the URL and that it is up"

    def hud_lines() -> list[str]:
        with mock.patch.object(cv2, "putText", wraps=cv2.putText) as put:
            vw.compose(now())
        return [c.args[1].strip() for c in put.call_args_list]

    vw.handle(_msg("stats", stats=Stats(stream="cam0", time=now(), fps=0.0, source_state="reconnecting",
                                        source_error=reason)))
    lines = hud_lines()
    assert "source reconnecting" in lines
    assert " ".join(lines[lines.index("source reconnecting") + 1:][:2]) == reason  # wrapped, whole
    vw.handle(_msg("status", status=StatusEvent("cam0", "source_state", now(),
                                                 {"old": "reconnecting", "new": "streaming"})))
    assert not any("Connection refused" in line for line in hud_lines())
    vw.handle(_msg("status", status=StatusEvent("cam0", "source_state", now(),
                                                 {"old": "streaming", "new": "reconnecting",
                                                  "reason": "end of stream"})))
    assert "end of stream" in hud_lines()


def test_compose_draws_masks_hud_and_banner():
    image, masks = _scene()
    vw = v.Viewer("tcp://127.0.0.1:1", config=v.ViewerConfig(max_size=MAX_SIZE))
    t0 = now()
    header = FrameHeader("cam0", 7, SRC_W, SRC_H, t0)
    vw.handle(_msg("frames", frame=header, jpeg=_jpeg(image)))
    vw.handle(_msg("masks", result=_result(7, objects=_objects(masks), capture=t0 - 0.05,
                                          w=SRC_W, h=SRC_H)))
    vw.handle(_msg("stats", stats=Stats(stream="cam0", time=t0, fps=12.5)))
    out = vw.compose(now())[..., ::-1]
    check_overlay(out, image, masks, banner=None)
    assert vw.transform.scale == pytest.approx(0.75)
    assert vw.tracker_rate(now()) == 12.5
    assert len(vw.mask_latency) == 1 and len(vw.display_latency) == 1
    lat = vw.display_latency.p50_p95()[0]
    assert 0.05 <= lat < 1.0
    # Reconnecting (a newer event than the result): orange banner.
    vw.handle(_msg("status", status=StatusEvent("cam0", "source_state", now(),
                                                 {"old": "streaming", "new": "reconnecting"})))
    check_overlay(vw.compose(now())[..., ::-1], image, masks, banner=vs.BANNER_WARN_BGR)
    # Silent for more than 2 s with a streaming source: red banner.
    vw.source.update("streaming", now())
    check_overlay(vw.compose(vw.last_message + 2.5)[..., ::-1], image, masks, banner=vs.BANNER_DEAD_BGR)


def test_a_tracker_that_takes_seconds_per_frame_is_not_called_silent_between_its_results():
    image, masks = _scene()
    vw = v.Viewer("tcp://127.0.0.1:1", config=v.ViewerConfig(max_size=MAX_SIZE))
    t0 = now()
    for i in range(4):  # a CPU tracker: a result every 3 s, nothing in between
        vw.handle(_msg("frames", received=t0 + 3 * i, frame=FrameHeader("cam0", i, SRC_W, SRC_H, t0),
                       jpeg=_jpeg(image)))
        vw.handle(_msg("masks", received=t0 + 3 * i,
                       result=_result(i, objects=_objects(masks), w=SRC_W, h=SRC_H)))
    vw.source.update("streaming", now())
    assert vw.silence_limit() == pytest.approx(9.0)
    check_overlay(vw.compose(vw.last_message + 4)[..., ::-1], image, masks, banner=None, frame=False)
    check_overlay(vw.compose(vw.last_message + 9.5)[..., ::-1], image, masks, banner=vs.BANNER_DEAD_BGR,
                  frame=False)
    # One long gap (a pause) among quick results does not stretch the limit.
    for i in range(4, 12):
        vw.handle(_msg("masks", received=t0 + 60 + 0.1 * i,
                       result=_result(i, objects=_objects(masks), w=SRC_W, h=SRC_H)))
    assert vw.silence_limit() == vs.NOT_PUBLISHING_AFTER


def test_a_viewer_joining_learns_the_source_state_and_pause_from_stats():
    """Status events are sent once; stats every second: a viewer that joins during an
    outage, or while the tracker is paused, says so."""
    vw = v.Viewer("tcp://127.0.0.1:1", config=v.ViewerConfig(max_size=MAX_SIZE))
    t0 = now()
    vw.handle(_msg("masks", received=t0 - 30, result=_result(3, w=SRC_W, h=SRC_H)))
    vw.handle(_msg("stats", received=t0, stats=Stats(stream="cam0", time=t0, fps=0.1,
                                                      source_state="reconnecting", paused=True)))
    assert vw.source.state == "reconnecting" and vw.interaction.paused
    vw.started = t0 - 60
    assert vw.banner(t0 + 0.5) == ("SOURCE RECONNECTING (no frames for 30 s)", vs.BANNER_WARN_BGR)
    vw.handle(_msg("stats", received=t0 + 1, stats=Stats(stream="cam0", time=t0 + 1, fps=0.1,
                                                          source_state="streaming", paused=False)))
    assert vw.source.state == "streaming" and not vw.interaction.paused


def test_compose_without_frames_draws_masks_on_blank_canvas():
    _, masks = _scene()
    vw = v.Viewer("tcp://127.0.0.1:1", config=v.ViewerConfig(max_size=MAX_SIZE))
    vw.handle(_msg("masks", result=_result(3, objects=_objects(masks), w=SRC_W, h=SRC_H)))
    out = vw.compose(now())
    assert out.shape == (360, 480, 3)
    tf = vw.transform
    inside = _interior(masks[2], tf)
    from streamtrack.overlay import color_for

    want = 0.5 * 40 + 0.5 * np.array(color_for(2)[::-1], float)
    assert np.abs(out[inside].astype(float) - want).mean() < 3


def test_view_without_display_exits_2(monkeypatch, capsys):
    from streamtrack.cli import main

    monkeypatch.delenv("DISPLAY", raising=False)
    assert main(["view", "tcp://127.0.0.1:5555"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "DISPLAY" in err[0]


def test_an_opencv_without_a_gui_is_one_line_before_any_window(monkeypatch, capsys):
    """opencv-python-headless (often pulled in by other packages) raises "not implemented"
    at namedWindow, after the model has loaded: say so first, in one line."""
    import cv2

    from streamtrack.cli import main

    assert v.opencv_has_windows()  # the GUI build the tests run with
    info = cv2.getBuildInformation()
    headless = re.sub(r"(?m)^([ \t]*GUI:[ \t]*)\S+", r"\1NONE", info)
    assert headless != info
    monkeypatch.setattr(cv2, "getBuildInformation", lambda: headless)
    assert not v.opencv_has_windows()
    monkeypatch.setenv("DISPLAY", ":0")
    assert main(["view", "tcp://127.0.0.1:5555"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "opencv-python-headless" in err[0], err


def test_view_with_a_display_nobody_serves_exits_2():
    """A stale DISPLAY (an ssh -X session gone, a wrong :N): one line, not Qt aborting the
    process with advice to reinstall.  In a child process, since Qt's abort would take
    the test run with it."""
    unused = next(n for n in range(97, 200) if not Path(f"/tmp/.X11-unix/X{n}").exists())
    r = subprocess.run([sys.executable, "-m", "streamtrack", "view", "tcp://127.0.0.1:5555"],
                       env={**os.environ, "DISPLAY": f":{unused}"}, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stderr.splitlines() == [f"streamtrack: error: no display: cannot connect to DISPLAY=:{unused} "
                                     "(is that X server running? over ssh, log in again with -X)"]


@pytest.mark.skipif(not shutil.which("Xvfb"), reason="needs Xvfb (Debian: xvfb)")
def test_the_display_check_keeps_its_connection_until_the_window_has_one(tmp_path, monkeypatch):
    """An X server without -noreset resets when its last client leaves and refuses the
    connections made meanwhile: closing the check's connection right before Qt connected
    made Qt abort the viewer now and then (about 2 connections in 100 here)."""
    import ctypes

    from conftest import running_xvfb

    x11 = ctypes.CDLL("libX11.so.6")
    x11.XOpenDisplay.argtypes, x11.XOpenDisplay.restype = [ctypes.c_char_p], ctypes.c_void_p
    x11.XCloseDisplay.argtypes = [ctypes.c_void_p]
    refused = 0
    with running_xvfb(tmp_path / "xvfb.log", reset=True) as display:
        monkeypatch.setenv("DISPLAY", display)
        for _ in range(300):
            # Connecting right after this loop's last close can itself meet a reset.
            wait_for(lambda: v._x_display_opens(display), 5, "the display check", interval=0.01)
            window = x11.XOpenDisplay(display.encode())  # what Qt does next
            refused += not window
            v.release_x_displays()
            if window:
                x11.XCloseDisplay(window)
    assert refused == 0, f"{refused} of 300 connections refused after the display check"


def test_view_a_fleet_stream_by_name_with_its_own_control(tmp_path, capsys):
    from streamtrack.cli import main
    from streamtrack.errors import UserError
    from streamtrack.fleet_directory import StreamEntry, write_directory

    directory = tmp_path / "fleet.json"
    write_directory(directory, [
        StreamEntry("lobby", "running", publish="tcp://127.0.0.1:41234", control="tcp://127.0.0.1:41235"),
        StreamEntry("gate", "failed", error="video file not found: /srv/gate.mp4"),
    ], {"state": "running"})
    fleet = str(directory)
    lobby = ("tcp://127.0.0.1:41234", "tcp://127.0.0.1:41235", "lobby")
    assert v.resolve_endpoints(fleet, None, "lobby") == lobby
    assert v.resolve_endpoints(fleet, "tcp://127.0.0.1:9", "lobby")[1] == "tcp://127.0.0.1:9"
    assert v.resolve_endpoints("tcp://127.0.0.1:5555", None, None) == ("tcp://127.0.0.1:5555", None, None)
    with pytest.raises(UserError, match=r"streams \['gate', 'lobby'\]: pick one with --stream"):
        v.resolve_endpoints(fleet, None, None)
    with pytest.raises(UserError, match="'gate' is failed and has no endpoint: video file not found"):
        v.resolve_endpoints(fleet, None, "gate")
    assert main(["view", fleet, "--stream", "door"]) == 2  # before any window
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no stream 'door'; streams: ['gate', 'lobby']" in err[0], err


def test_view_a_fleet_stream_that_is_starting_waits_for_its_endpoints(tmp_path, capsys, monkeypatch):
    """`streamtrack fleet` tells users to view streams while they load: the viewer waits
    for a starting stream (saying so once) instead of refusing it, and stops waiting with
    the stream's error when it fails."""
    from streamtrack.errors import UserError
    from streamtrack.fleet_directory import StreamEntry, write_directory

    directory = tmp_path / "fleet.json"
    # Without a display, no waiting for a window that cannot open.
    write_directory(directory, [StreamEntry("gate", "starting")], {"state": "running"})
    monkeypatch.delenv("DISPLAY", raising=False)
    with pytest.raises(UserError, match="no display: DISPLAY is not set"):
        v.resolve_endpoints(str(directory), None, "gate")
    monkeypatch.setattr(v, "check_display", lambda: None)

    def write(gate: StreamEntry) -> None:
        write_directory(directory, [gate], {"state": "running"})

    def later(gate: StreamEntry) -> threading.Thread:
        thread = threading.Thread(target=lambda: (time.sleep(1.2), write(gate)))
        thread.start()
        return thread

    write(StreamEntry("gate", "starting"))
    thread = later(StreamEntry("gate", "running", publish="tcp://127.0.0.1:41234",
                               control="tcp://127.0.0.1:41235"))
    assert v.resolve_endpoints(str(directory), None, "gate") == (
        "tcp://127.0.0.1:41234", "tcp://127.0.0.1:41235", "gate")
    thread.join()
    err = capsys.readouterr().err.splitlines()
    assert err == ["streamtrack: fleet stream 'gate' is starting: waiting for its endpoints "
                   "(Ctrl-C to give up)"]

    write(StreamEntry("gate", "restarting"))
    thread = later(StreamEntry("gate", "failed", error="camera gone"))
    with pytest.raises(UserError, match="'gate' is failed and has no endpoint: camera gone"):
        v.resolve_endpoints(str(directory), None, "gate")
    thread.join()

    # Restarting with the endpoints it had: waited for until it runs (they may move).
    old = dict(publish="tcp://127.0.0.1:41234", control="tcp://127.0.0.1:41235")
    new = dict(publish="tcp://10.0.0.7:41234", control="tcp://10.0.0.7:41235")
    write(StreamEntry("gate", "restarting", **old))
    thread = later(StreamEntry("gate", "running", **new))
    assert v.resolve_endpoints(str(directory), None, "gate")[:2] == (new["publish"], new["control"])
    thread.join()
    # Ended streams are refused, also when the directory still lists their endpoints.
    write(StreamEntry("gate", "failed", error="gave up after 2s reconnecting", **old))
    with pytest.raises(UserError, match="fleet stream 'gate' is failed: gave up after 2s reconnecting"):
        v.resolve_endpoints(str(directory), None, "gate")
    write(StreamEntry("gate", "stopped", **old))
    with pytest.raises(UserError, match="fleet stream 'gate' is stopped$"):
        v.resolve_endpoints(str(directory), None, "gate")


def test_view_does_not_wait_for_a_stream_of_a_fleet_that_is_gone(tmp_path):
    """A fleet killed (SIGKILL, OOM, a reboot) leaves its last directory: a stream listed
    as starting there will never start."""
    import socket

    from streamtrack.errors import UserError
    from streamtrack.fleet_directory import StreamEntry, write_directory

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    directory = tmp_path / "fleet.json"
    fleet = {"state": "running", "pid": dead.pid, "host": socket.gethostname()}
    write_directory(directory, [StreamEntry("gate", "starting")], fleet)
    gone = rf"'gate' is starting, but the fleet \(pid {dead.pid}\) is not running"
    with pytest.raises(UserError, match=gone):
        v.resolve_endpoints(str(directory), None, "gate")
    write_directory(directory, [StreamEntry("gate", "restarting")], {**fleet, "state": "stopped"})
    with pytest.raises(UserError, match="'gate' is restarting, but the fleet has stopped"):
        v.resolve_endpoints(str(directory), None, "gate")


# ------------------------------------------------------------------- end to end (Xvfb)

needs_x = pytest.mark.skipif(
    not (shutil.which("Xvfb") and shutil.which("xdotool")) or not sys.platform.startswith("linux"),
    reason="needs Xvfb and xdotool (Debian: xvfb xdotool)",
)


def wait_for(pred, timeout, what, interval=0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


class RecordingHandler:
    """Stands in for the tracker behind the control socket."""

    def __init__(self):
        self.calls: list[tuple[str, object]] = []
        self.lock = threading.Lock()

    def _rec(self, name, arg=None):
        with self.lock:
            self.calls.append((name, arg))
        return {}

    def add_prompt(self, cmd):
        return self._rec("add_prompt", cmd)

    def remove_object(self, obj_id):
        return self._rec("remove_object", obj_id)

    def reset(self):
        return self._rec("reset")

    def status(self):
        return self._rec("status")

    def pause(self):
        return self._rec("pause")

    def resume(self):
        return self._rec("resume")

    def find(self, name, n=1):
        with self.lock:
            got = [a for c, a in self.calls if c == name]
        return got if len(got) >= n else None


class FakeTracker:
    """Publishes frames + results (with masks) at ~20 fps until told to reconnect."""

    def __init__(self, image, masks):
        from streamtrack.publisher import Publisher

        self.pub = Publisher("tcp://127.0.0.1:0", stream="cam0")
        self.image, self.objects = image, _objects(masks)
        self.reconnecting = threading.Event()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        fid = 0
        while not self.stop.is_set():
            if self.reconnecting.is_set():
                # The source is down: a real tracker has no frames to publish, only
                # the event (repeated: a late subscriber must see it too).
                self.pub.publish_status("source_state", old="streaming", new="reconnecting")
                self.stop.wait(0.3)
                continue
            cap = now() - 0.04
            self.pub.publish_frame(fid, self.image)
            self.pub.publish_result(FrameResult(
                stream="cam0", seq=fid, frame_id=fid, pts=fid / 20, width=SRC_W, height=SRC_H,
                t={"capture": cap, "infer_end": now()}, objects=self.objects,
                dropped={"queue_full": 3}))
            fid += 1
            self.stop.wait(0.05)

    def close(self):
        self.stop.set()
        self.thread.join(2)
        self.pub.close()


def xdo(display, *args, timeout=10):
    out = subprocess.run(["xdotool", *map(str, args)], env={**os.environ, "DISPLAY": display},
                         capture_output=True, text=True, timeout=timeout)
    return out.stdout


def window_geometry(display, wid):
    geo = xdo(display, "getwindowgeometry", "--shell", wid)
    g = dict(line.split("=", 1) for line in geo.split())
    return int(g["X"]), int(g["Y"]), int(g["WIDTH"]), int(g["HEIGHT"])


def find_window(display, size, proc):
    def look():
        if proc.poll() is not None:
            err = proc.communicate()[1]
            pytest.fail(f"viewer exited early: {(err or '')[-2000:]}\n{display.report()}")
        for wid in xdo(display, "search", "--onlyvisible", "--name", "^streamtrack view").split():
            if window_geometry(display, wid)[2:] == size:
                return wid
        return None

    return wait_for(look, 30, "the viewer window", interval=0.2)


def grab(display, wid):
    """The window's pixels (RGB). The position is read each time: without a window
    manager Qt may still move the window after it first appears."""
    from PIL import ImageGrab

    x, y, w, h = window_geometry(display, wid)
    shot = ImageGrab.grab(bbox=(x, y, x + w, y + h), xdisplay=display)
    return np.asarray(shot.convert("RGB"))


def ensure_painted(display, wid, attempts=3):
    """Wait for the window to show anything but black. Without a window manager, Qt
    under CPU load sometimes loses a new window's first expose and never paints it,
    however often imshow runs; unmapping and mapping it again sends a fresh one."""
    for _ in range(attempts):
        try:
            wait_for(lambda: grab(display, wid).max() > 0, 3, "the window to be painted", interval=0.2)
            return
        except AssertionError:
            xdo(display, "windowunmap", "--sync", wid)
            xdo(display, "windowmap", "--sync", wid)
    raise AssertionError("the viewer window stays black")


def eventually_ok(fn, timeout, what):
    """Retry an assertion until it passes (the window needs a few frames to settle)."""
    last: list[AssertionError] = []

    def attempt():
        try:
            fn()
            return True
        except AssertionError as exc:
            last[:] = [exc]
            return False

    try:
        wait_for(attempt, timeout, what, interval=0.2)
    except AssertionError:
        raise last[0] if last else AssertionError(what) from None


# The viewer's prompt markers, as RGB on screen (drawn in BGR (0, 200, 0) and (0, 0, 220)).
PROMPT_FG_RGB, PROMPT_BG_RGB = (0, 200, 0), (220, 0, 0)


def near_color(shot, rgb, tol):
    """Where the screenshot (RGB) is within ``tol`` of ``rgb`` in every channel."""
    return np.abs(shot.astype(int) - np.array(rgb)).max(axis=2) < tol


def marker_drawn(shot, xy, rgb) -> bool:
    """The viewer's prompt star (drawn without anti-aliasing) in colour ``rgb`` at display
    pixel ``xy``; only the selected object's prompts are drawn."""
    x, y = xy
    return int(near_color(shot[y - 6:y + 7, x - 6:x + 7], rgb, 40).sum()) >= 10


@needs_x
@pytest.mark.timeout(90)
def test_viewer_end_to_end_under_xvfb(xdisplay, tmp_path):
    image, masks = _scene()
    handler = RecordingHandler()
    server = ControlServer("tcp://127.0.0.1:0", handler)
    stop_server = threading.Event()
    server_thread = threading.Thread(target=server.serve, args=(stop_server, 20), daemon=True)
    server_thread.start()
    tracker = FakeTracker(image, masks)
    shots = tmp_path / "shots"
    # Qt's MIT-SHM backing store sometimes leaves the window black on Xvfb (about one
    # run in three here); plain X11 puts are reliable.
    env = {**os.environ, "DISPLAY": xdisplay, "QT_QPA_PLATFORM": "xcb", "QT_X11_NO_MITSHM": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamtrack", "view", tracker.pub.endpoint, "--control", server.endpoint,
         "--stream", "cam0", "--max-size", f"{MAX_SIZE[0]}x{MAX_SIZE[1]}", "--screenshots", str(shots)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        wid = find_window(xdisplay, MAX_SIZE, proc)
        ensure_painted(xdisplay, wid)
        # The live window: overlay colours on the masks only, HUD drawn, no banner.
        eventually_ok(lambda: check_overlay(grab(xdisplay, wid), image, masks, banner=None),
                      20, "mask overlay on screen")
        tf = vi.ViewTransform.fit(SRC_W, SRC_H, *MAX_SIZE)
        assert tf.scale == 0.75

        def src(x, y):
            return tf.to_source(x, y)

        def save_shot(name):  # screenshots for the docs, on request
            if os.environ.get("STREAMTRACK_VIEWER_SHOTS"):
                cv2.imwrite(str(Path(os.environ["STREAMTRACK_VIEWER_SHOTS"]) / name),
                            grab(xdisplay, wid)[..., ::-1])

        # Left click = foreground point of a new object (3: 1 and 2 are tracked).
        # The pointer enters the window a moment before the press (a first click sent in
        # one go with the move was lost once in a full CI run; the cause is not pinned down).
        xdo(xdisplay, "mousemove", "--window", wid, 300, 240, "sleep", 0.3, "click", 1)
        (p,) = wait_for(lambda: handler.find("add_prompt"), 10, "the first prompt")
        assert p.obj_id == 3 and p.labels == (1,) and p.box is None
        assert p.points[0] == pytest.approx((400.17, 320.17), abs=1.5)  # (300 + .5) / .75 - .5
        # Right click = background point, added to the same object.
        xdo(xdisplay, "mousemove", "--window", wid, 350, 200, "click", 3)
        p = wait_for(lambda: handler.find("add_prompt", 2), 10, "the second prompt")[-1]
        assert p.obj_id == 3 and p.labels == (1, 0)
        assert p.points[1] == pytest.approx(src(350, 200), abs=1.5)
        # Drag = box.
        xdo(xdisplay, "mousemove", "--window", wid, 200, 170, "mousedown", 1,
            "mousemove", "--window", wid, 240, 200, "mousemove", "--window", wid, 280, 230, "mouseup", 1)
        p = wait_for(lambda: handler.find("add_prompt", 3), 10, "the box prompt")[-1]
        assert p.obj_id == 3 and p.points is None
        assert p.box == pytest.approx((*src(200, 170), *src(280, 230)), abs=1.5)
        save_shot("viewer-live.png")
        # n = new object; shift + click = background point.
        xdo(xdisplay, "windowfocus", "--sync", wid)
        # Mouse callbacks run inside waitKey, before it returns the key: give the key
        # its own waitKey call before clicking.
        xdo(xdisplay, "key", "n", "sleep", 0.3)
        bg_point = (100, 250)
        xdo(xdisplay, "mousemove", "--window", wid, *bg_point,
            "keydown", "shift", "click", 1, "keyup", "shift")
        p = wait_for(lambda: handler.find("add_prompt", 4), 10, "the shift-click prompt")[-1]
        assert p.obj_id == 4 and p.labels == (0,)
        assert p.points[0] == pytest.approx(src(*bg_point), abs=1.5)
        # 2 selects object 2, d removes it, r resets, space pauses, s saves a screenshot.
        # OpenCV's waitKey keeps only the last key of a call, so each key goes in alone
        # and the next waits for its effect: a loop that falls behind loses none.
        # Only the selected object's prompts are drawn: object 4's point, shown while 4
        # is selected, goes once 2 is.
        wait_for(lambda: marker_drawn(grab(xdisplay, wid), bg_point, PROMPT_BG_RGB), 10,
                 "object 4's background point on screen", interval=0.1)
        xdo(xdisplay, "key", "2")
        wait_for(lambda: not marker_drawn(grab(xdisplay, wid), bg_point, PROMPT_BG_RGB), 10,
                 "object 2 selected (object 4's point no longer drawn)", interval=0.1)
        xdo(xdisplay, "key", "d")
        assert wait_for(lambda: handler.find("remove_object"), 10, "remove_object") == [2]
        xdo(xdisplay, "key", "r")
        wait_for(lambda: handler.find("reset"), 10, "reset")
        xdo(xdisplay, "key", "space")
        wait_for(lambda: handler.find("pause"), 10, "pause")
        xdo(xdisplay, "key", "s")
        png = wait_for(lambda: sorted(shots.glob("streamtrack-*.png")), 10, "the screenshot PNG")
        assert cv2.imread(str(png[0])).shape == (MAX_SIZE[1], MAX_SIZE[0], 3)
        # The source goes down: the orange banner appears over the last frame.
        tracker.reconnecting.set()
        eventually_ok(
            lambda: check_overlay(grab(xdisplay, wid), image, masks,
                                  banner=vs.BANNER_WARN_BGR, frame=False),
            10, "the reconnecting banner")
        save_shot("viewer-reconnecting.png")
        xdo(xdisplay, "key", "q")
        assert proc.wait(10) == 0, proc.stderr.read()[-2000:]
        with handler.lock:
            names = [c for c, _ in handler.calls]
        assert names == ["add_prompt"] * 4 + ["remove_object", "reset", "pause"]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        tracker.close()
        stop_server.set()
        server_thread.join(2)
        server.close()


def test_viewer_command_line():
    cmd = v.viewer_command("tcp://127.0.0.1:5555", "tcp://127.0.0.1:5556", "cam0", (800, 600))
    assert cmd[1:] == ["-m", "streamtrack", "view", "tcp://127.0.0.1:5555", "--control",
                       "tcp://127.0.0.1:5556", "--stream", "cam0", "--max-size", "800x600"]
    assert Path(cmd[0]).name.startswith("python")


def test_odd_results_from_the_network_do_not_take_the_window_down():
    """A publisher is another process: a bogus size, a mask of another size or a box far
    off the frame is not drawn (the rest is)."""
    _, masks = _scene()
    vw = v.Viewer("tcp://127.0.0.1:1", config=v.ViewerConfig(max_size=MAX_SIZE))
    vw.handle(_msg("masks", result=_result(1, w=1_000_000, h=1_000_000)))
    vw.compose(now())  # the placeholder, not a 2.7 TiB canvas
    assert (vw.transform.src_w, vw.transform.src_h) == (640, 360) and vw.click_transform is None
    good = _objects(masks)
    small = ObjectResult.from_mask(5, np.ones((10, 10), bool), score=0.9)
    huge = 10**12
    far = replace(ObjectResult.from_mask(6, masks[2], score=0.9), bbox=(huge, huge, 2 * huge, 2 * huge))
    vw.handle(_msg("masks", result=_result(2, objects=(*good, small, far), w=SRC_W, h=SRC_H)))
    vw.compose(now())
    assert [a.obj_id for a in vw._annotations] == [o.obj_id for o in good]


def test_clicks_before_a_frame_of_the_source_is_shown_are_not_prompts():
    vw = v.Viewer("tcp://127.0.0.1:1", config=v.ViewerConfig(max_size=MAX_SIZE))
    vw.compose(now())  # the placeholder
    assert vw.transform is not None and vw.click_transform is None
    _, masks = _scene()
    vw.handle(_msg("masks", result=_result(3, objects=_objects(masks), w=SRC_W, h=SRC_H)))
    vw.compose(now())
    assert vw.click_transform is vw.transform and (vw.transform.src_w, vw.transform.src_h) == (SRC_W, SRC_H)


def test_the_pause_shown_follows_the_tracker():
    vw = v.Viewer("tcp://127.0.0.1:1", config=v.ViewerConfig(max_size=MAX_SIZE))
    vw.apply(vw.interaction.key(ord(" ")), None)  # view only: nothing was sent
    assert not vw.interaction.paused
    vw.interaction.paused = True  # paused from this viewer; then the tracker restarted
    vw.handle(_msg("status", status=StatusEvent("cam0", "tracker_state", now(),
                                                {"old": "starting", "new": "running", "restarts": 1})))
    assert not vw.interaction.paused
    vw.handle(_msg("status", status=StatusEvent("cam0", "tracker_state", now(),
                                                {"old": "running", "new": "paused"})))
    assert vw.interaction.paused


def test_a_screenshot_folder_that_cannot_be_made_is_a_toast(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    config = v.ViewerConfig(max_size=MAX_SIZE, screenshots=blocker / "shots")
    vw = v.Viewer("tcp://127.0.0.1:1", config=config)
    vw.canvas = vw.compose(now())
    assert vw.save_screenshot() is None
    assert vw.toasts[-1].error and "could not save a screenshot" in vw.toasts[-1].text


def test_a_window_closed_with_its_button_is_closed_not_an_error(monkeypatch):
    def destroyed(*_):  # what OpenCV's Qt backend raises once the window is gone
        raise cv2.error("NULL guiReceiver (please create a window)")

    monkeypatch.setattr(cv2, "getWindowProperty", destroyed)
    assert v._window_open("streamtrack") is False
    monkeypatch.setattr(cv2, "getWindowProperty", lambda *_: 1.0)
    assert v._window_open("streamtrack") is True


def test_view_control_timeout_is_an_option(capsys):
    from streamtrack.cli import main

    assert main(["view", "tcp://127.0.0.1:1", "--control-timeout", "0"]) == 2
    assert "--control-timeout must be a number of seconds > 0, got 0.0" in capsys.readouterr().err


def test_long_toasts_wrap_at_words_instead_of_being_cut(monkeypatch):
    vw = v.Viewer("tcp://127.0.0.1:1", config=v.ViewerConfig(max_size=MAX_SIZE))
    text = "add_prompt 7: no reply within 2 s (is the tracker running? --control-timeout waits longer)"
    vw.toast(text, error=True)
    drawn = []
    real = cv2.putText
    monkeypatch.setattr(cv2, "putText", lambda img, s, *a, **k: drawn.append(s) or real(img, s, *a, **k))
    vw.compose(now())
    lines = [s for s in drawn if s and s in text]  # drawn bottom up: the last line first
    assert len(lines) >= 2 and " ".join(reversed(lines)) == text
