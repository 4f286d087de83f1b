"""Live viewer: an OpenCV window that subscribes to a tracker like any other client.

It shows the newest frame (``frames/<stream>`` JPEG previews) with the masks of the
same ``frame_id`` (``masks/<stream>``), a HUD with display/tracker fps, capture→mask
and capture→display latency p50/p95, drops, source and per-object state, and a
banner when the source is not streaming or the tracker has gone quiet. Mouse
clicks and drags become prompts sent over the control socket in source-frame
pixels, whatever the window scale.

The pure logic that tests drive without a display lives beside it:
:mod:`streamtrack.viewer_input` (mouse and keys to prompts, :class:`ViewTransform`,
:class:`Interaction`) and :mod:`streamtrack.viewer_state` (what the HUD and banner
show, and the frames paired with their results); this module is :class:`Viewer`, the
thin cv2 window loop around them, and the ``view`` command.

    streamtrack view tcp://127.0.0.1:5555 --control tcp://127.0.0.1:5556
"""

from __future__ import annotations

import logging
import math
import os
import queue
import subprocess
import sys
import textwrap
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from streamtrack.control import AddPrompt, ControlError, ControlTimeout, Pause, RemoveObject, Reset, Resume
from streamtrack.curve import CurveClient, client_from_args
from streamtrack.errors import UserError
from streamtrack.protocol import FrameResult, now
from streamtrack.subscriber import Message
from streamtrack.viewer_input import (
    Action,
    ControlCommand,
    Interaction,
    Quit,
    Screenshot,
    ToggleHelp,
    ViewTransform,
)
from streamtrack.viewer_state import (
    NOT_PUBLISHING_AFTER,
    FrameItem,
    FramePairer,
    RateMeter,
    SlidingWindow,
    SourceStateTracker,
    banner_for,
)

if TYPE_CHECKING:
    from streamtrack.fleet_directory import StreamEntry

log = logging.getLogger(__name__)

DEFAULT_MAX_SIZE = (1280, 720)
# ... or this many of the tracker's usual intervals between results, if longer than
# NOT_PUBLISHING_AFTER (a CPU tracker taking seconds per frame publishes nothing while it steps).
NOT_PUBLISHING_INTERVALS = 3.0
# A blank canvas of the source's size stands in for frames that are not sent; beyond this
# (a bogus size on the wire) the small placeholder does.
MAX_BLANK_PIXELS = 4096 * 4096

# BGR colours of the window (OpenCV draws in BGR; the overlay palette is RGB).
STATE_BGR = {"visible": (90, 220, 90), "occluded": (60, 200, 240), "lost": (80, 80, 240)}
TEXT_BGR = (235, 235, 235)
DIM_BGR = (170, 170, 170)


MAX_SIDE = 8192


def parse_size(text: str) -> tuple[int, int]:
    """``"1280x720"`` -> ``(1280, 720)``; raises :class:`UserError` on anything else."""
    w, sep, h = text.lower().partition("x")
    try:
        size = (int(w), int(h))
    except ValueError:
        size = (0, 0)
    # At most an 8K screen's side: the picture is scaled up to fit (17 GB a frame at 100000x100000).
    if not sep or not (64 <= size[0] <= MAX_SIDE and 64 <= size[1] <= MAX_SIDE):
        raise UserError(f"--max-size must be WxH with both from 64 to {MAX_SIDE} pixels, got {text!r}")
    return size



# ------------------------------------------------------------------------ the window


@dataclass
class ViewerConfig:
    max_size: tuple[int, int] = DEFAULT_MAX_SIZE
    screenshots: Path = Path(".")
    upscale: bool = True  # small sources are scaled up to the max size
    control_timeout: float = 2.0
    window_title: str | None = None
    hud_window: int = 120  # frames in the latency percentiles


HELP_LINES = (
    "left click      foreground point",
    "right / shift   background point",
    "drag            box",
    "n               new object",
    "1-9             select object",
    "d               remove selected",
    "r               reset (remove all)",
    "space           pause / resume",
    "s               save screenshot",
    "h               this help",
    "q / Esc         quit",
)


@dataclass
class _Toast:
    text: str
    until: float
    error: bool = False


@dataclass(frozen=True)
class _Renamed:
    """A marker in the control worker's queue: the window learned the rename of ``picked``."""

    picked: int


class _ControlWorker:
    """Sends control commands from a thread, so a slow or dead tracker never freezes
    the window; replies come back as toasts."""

    def __init__(self, endpoint: str, timeout: float, curve: CurveClient | None = None) -> None:
        from streamtrack.control import ControlClient

        self.client = ControlClient(endpoint, timeout=timeout, curve=curve)
        self.endpoint = self.client.endpoint
        self.timeout = timeout
        # (the command, the toast's text, whether it failed, the id the tracker gave a new object)
        self.replies: queue.Queue[tuple[ControlCommand, str, bool, int | None]] = queue.Queue()
        # A new object's id as this viewer picked it -> as the tracker gave it. Commands
        # queued behind the first prompt still carry the picked id: they are sent to the
        # given one, as refinements (a second "new" would make yet another object).
        self._given: dict[int, int] = {}
        self._jobs: queue.Queue[ControlCommand | _Renamed | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="streamtrack-viewer-control",
                                        daemon=True)
        self._thread.start()

    def submit(self, cmd: ControlCommand) -> None:
        self._jobs.put(cmd)

    def renamed(self, picked: int) -> None:
        """The window goes by the given id from now on (it handled the reply): commands it
        submits after this one that name ``picked`` mean the other client's object again."""
        self._jobs.put(_Renamed(picked))

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            if isinstance(job, _Renamed):  # in order: every command queued before it is sent
                if self._given.get(job.picked, job.picked) != job.picked:
                    del self._given[job.picked]
                continue
            cmd = self._to_send(job)
            what = cmd.name + (f" {cmd.obj_id}" if hasattr(cmd, "obj_id") else "")
            try:
                reply = self.client.send(cmd)
            except ControlTimeout:
                # The client's own hint is long and names no option of the viewer's.
                self.replies.put((job, f"{what}: no reply within {self.timeout:g} s (no tracker with "
                                  f"--control at {self.endpoint}? one busy with a slow frame may still "
                                  "carry it out: view --control-timeout S waits longer)", True, None))
            except ControlError as exc:
                self.replies.put((job, f"{what}: {exc}", True, None))
            except Exception as exc:  # keep the worker alive whatever happens
                log.exception("control request failed")
                self.replies.put((job, f"{what}: {type(exc).__name__}: {exc}", True, None))
            else:
                given = None
                if isinstance(cmd, AddPrompt) and cmd.new:
                    given = reply.get("obj_id", cmd.obj_id)
                    given = given if isinstance(given, int) and not isinstance(given, bool) else cmd.obj_id
                    self._given[job.obj_id] = self._given[given] = given
                if given is not None and given != job.obj_id:
                    self.replies.put((job, f"{what}: ok; object {job.obj_id} was taken by another client, "
                                      f"so this one is object {given}", False, given))
                else:
                    self.replies.put((job, f"{what}: ok", False, None))

    def _to_send(self, cmd: ControlCommand) -> ControlCommand:
        """``cmd`` with a new object's id as the tracker gave it."""
        if isinstance(cmd, Reset):
            self._given.clear()
        elif isinstance(cmd, RemoveObject) and cmd.obj_id in self._given:
            return replace(cmd, obj_id=self._given.pop(cmd.obj_id))
        elif isinstance(cmd, AddPrompt) and cmd.obj_id in self._given:
            return replace(cmd, obj_id=self._given[cmd.obj_id], new=False)
        return cmd

    def close(self, timeout: float) -> None:
        """Send what is queued (bounded by ``timeout``), then stop."""
        self._jobs.put(None)
        self._thread.join(timeout)
        self.client.close()


class Viewer:
    """The live window. ``run()`` blocks until the user quits; returns 0."""

    def __init__(
        self,
        endpoint: str,
        control: str | None = None,
        stream: str | None = None,
        *,
        max_size: tuple[int, int] = DEFAULT_MAX_SIZE,
        screenshots: str | Path = ".",
        config: ViewerConfig | None = None,
        curve: CurveClient | None = None,  # keys for a tracker that requires CURVE
    ) -> None:
        self.config = config or ViewerConfig(max_size=max_size, screenshots=Path(screenshots))
        self.curve = curve
        self.endpoint = endpoint
        self.control_endpoint = control
        self.stream = stream
        self.interaction = Interaction(can_send=bool(control))
        # It said so (tracker_state stopped), and has not said it runs since. Only its status
        # events clear it: a subscriber hands those out first, so results and stats sent
        # before the stop may be read after it.
        self.tracker_stopped = False
        self.waiting_for_prompt = False  # its stats say it holds the first frame for a prompt
        self.source = SourceStateTracker()
        self.display_rate = RateMeter()
        self.transform: ViewTransform | None = None
        self.click_transform: ViewTransform | None = None  # None while no source-sized image is shown
        self.last_message = -math.inf
        self._result_gaps: deque[float] = deque(maxlen=8)  # s between the last results received
        self.started = now()
        self.toasts: list[_Toast] = []
        self.canvas: np.ndarray | None = None  # BGR, what the window shows
        self._anno_key: tuple[int, int] | None = None
        self._annotations: list = []
        self._shown_key: tuple | None = None
        self._dirty = True
        self._last_render = 0.0
        self._quit = False
        self.title = self.config.window_title or f"streamtrack view {endpoint}"
        self._forget_the_last_run()  # what a run shows: none yet

    # ---------------------------------------------------------------- messages
    def handle(self, msg: Message) -> None:
        """Fold one subscriber message into the viewer state (no drawing)."""
        if self.stream is None:
            self.stream = msg.stream  # several streams on one publisher: follow the first
        elif msg.stream != self.stream:
            return  # ZeroMQ topic filters are prefixes: masks/cam0 also matches cam01
        self.last_message = msg.received
        if msg.result is not None:
            if self._last_result_at is not None:
                self._result_gaps.append(msg.received - self._last_result_at)
            self._last_result_at = msg.received
            r = msg.result
            self.pairer.add_result(r)
            self.interaction.observe(o.obj_id for o in r.objects)
            if r.t.capture is not None:
                self.mask_latency.add(msg.received - r.t.capture)
            stamp = r.t.publish or r.t.infer_end or msg.received
            self.result_rate.tick(stamp)
            self.source.update(r.source_state, r.t.capture or stamp)
        elif msg.frame is not None and msg.jpeg is not None:
            self.pairer.add_frame(FrameItem(msg.frame, msg.jpeg))
        elif msg.stats is not None:
            self.tracker_fps = (msg.stats.fps, msg.received)
            self.waiting_for_prompt = bool(msg.stats.waiting_for_prompt)
            # Stats come every second, also while no result does: a viewer that joins while
            # the source is down or the tracker paused learns it here.
            if msg.stats.source_state is not None:
                self.source.update(msg.stats.source_state, msg.stats.time, msg.stats.source_error)
            if msg.stats.paused is not None:
                self.interaction.paused = msg.stats.paused
        elif msg.status is not None:
            ev = msg.status
            if ev.kind == "source_state" and isinstance(ev.data.get("new"), str):
                reason = ev.data.get("reason")
                self.source.update(ev.data["new"], ev.time, reason if isinstance(reason, str) else None)
            elif ev.kind == "error":
                self.toast(f"tracker: {ev.data.get('message', '?')}", error=True)
            elif ev.kind == "tracker_state" and ev.data.get("new") == "running" and \
                    ev.data.get("old") == "starting" and ev.data.get("restarts") == 0:
                # A new run on these endpoints (not a restart, which keeps ids and objects):
                # the last run's masks, objects and figures would pass for its own.
                self._forget_the_last_run()
                self.interaction.paused = False
                self.tracker_stopped = False
            elif ev.kind == "tracker_state" and ev.data.get("new") in ("running", "paused"):
                # The tracker's word on pausing: a pause that timed out, or a restarted
                # (unpaused) tracker, would leave the key's guess out of step.
                self.interaction.paused = ev.data["new"] == "paused"
                self.tracker_stopped = False
            elif ev.kind == "tracker_state" and ev.data.get("new") == "stopped":
                self.tracker_stopped = True
        self._dirty = True

    def _forget_the_last_run(self) -> None:
        self.pairer = FramePairer()
        self.mask_latency = SlidingWindow(self.config.hud_window)
        self.display_latency = SlidingWindow(self.config.hud_window)
        self.result_rate = RateMeter()
        self.tracker_fps: tuple[float, float] | None = None  # (fps from stats, when received)
        self._result_gaps.clear()
        self._last_result_at: float | None = None  # when the newest result was received
        self._frame_cache: tuple[int, np.ndarray] | None = None
        self.interaction.forget_objects()

    def toast(self, text: str, *, error: bool = False, seconds: float = 4.0) -> None:
        self.toasts.append(_Toast(text, time.monotonic() + seconds, error))
        del self.toasts[:-4]
        self._dirty = True

    def banner(self, at: float) -> tuple[str, tuple[int, int, int]] | None:
        """The banner to show at time ``at`` (:func:`banner_for`)."""
        return banner_for(self.source.state, at - max(self.last_message, self.started),
                          self.last_message > -math.inf, self.silence_limit(),
                          paused=self.interaction.paused, tracker_stopped=self.tracker_stopped,
                          waiting_for_prompt=self.waiting_for_prompt,
                          no_results_for=at - max(self._last_result_at or -math.inf, self.started))

    def silence_limit(self) -> float:
        """Seconds without a message before the tracker counts as not publishing."""
        if not self._result_gaps:
            return NOT_PUBLISHING_AFTER
        # The median: one long gap (a pause, a reconnect) does not stretch the limit.
        return max(NOT_PUBLISHING_AFTER, NOT_PUBLISHING_INTERVALS * float(np.median(self._result_gaps)))

    def tracker_rate(self, at: float) -> float:
        """Stats' fps while they are fresh, else measured from result timestamps."""
        if self.tracker_fps is not None and at - self.tracker_fps[1] < 3.0:
            return self.tracker_fps[0]
        return self.result_rate.rate(at)

    # ------------------------------------------------------------------ drawing
    def _decode(self, item: FrameItem) -> np.ndarray | None:
        import cv2

        if self._frame_cache is not None and self._frame_cache[0] == item.frame_id:
            return self._frame_cache[1]
        bgr = cv2.imdecode(np.frombuffer(item.jpeg, np.uint8), cv2.IMREAD_COLOR)
        if bgr is None:
            return None
        rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        self._frame_cache = (item.frame_id, rgb)
        return rgb

    def _annotations_for(self, result: FrameResult):
        from streamtrack.overlay import Annotation
        from streamtrack.protocol import decode_mask

        key = (result.seq, result.frame_id)
        if key != self._anno_key:  # decode each result's masks once, not per redraw
            annos = []
            for o in result.objects:
                if o.rle is None or o.bbox is None:
                    continue
                try:
                    mask = decode_mask(o.rle)
                except Exception as exc:  # one bad mask must not take the window down
                    log.warning("object %d: bad mask: %s", o.obj_id, exc)
                    continue
                if mask.shape != (result.height, result.width):
                    log.warning("object %d: a %dx%d mask on a %dx%d frame: not drawn", o.obj_id,
                                mask.shape[1], mask.shape[0], result.width, result.height)
                    continue
                # The box only says where to draw: keep it on the frame, whatever was sent.
                x0, x1 = (int(min(max(v, 0), result.width)) for v in (o.bbox[0], o.bbox[2]))
                y0, y1 = (int(min(max(v, 0), result.height)) for v in (o.bbox[1], o.bbox[3]))
                if x0 < x1 and y0 < y1:
                    annos.append(Annotation(o.obj_id, mask, (x0, y0, x1, y1), o.score))
            self._anno_key, self._annotations = key, annos
        return self._annotations

    def compose(self, at: float) -> np.ndarray:
        """Build the BGR image the window shows (frame, masks, prompts, HUD, banner)."""
        import cv2

        from streamtrack.overlay import annotate

        pairing = self.pairer.select()
        image = None
        result = pairing.result if pairing else None
        if pairing is not None and pairing.frame is not None:
            image = self._decode(pairing.frame)
        if image is None and result is not None and result.width and result.height \
                and result.width * result.height <= MAX_BLANK_PIXELS:
            image = np.full((result.height, result.width, 3), 40, np.uint8)
        placeholder = image is None  # nothing of the source's size to show or click on yet
        # The frame a click is made on, and where its objects are (a click refines them there).
        self.interaction.frame_id = (pairing.frame.frame_id if pairing is not None and pairing.frame
                                     else result.frame_id if result is not None else None)
        self.interaction.frame_boxes = {
            o.obj_id: o.bbox for o in (result.objects if result is not None else ())
            if o.bbox is not None and result.frame_id == self.interaction.frame_id}
        if placeholder:
            image = np.full((360, 640, 3), 40, np.uint8)
        h, w = image.shape[:2]
        annos = []
        if result is not None and (result.width, result.height) == (w, h):
            annos = self._annotations_for(result)
            # Labels are drawn after scaling, so they stay readable at any source size.
            image = annotate(image, annos, labels=False)
        tf = self.transform
        if tf is None or (tf.src_w, tf.src_h) != (w, h):
            mw, mh = self.config.max_size
            tf = self.transform = ViewTransform.fit(w, h, mw, mh, upscale=self.config.upscale)
        # Clicks on the placeholder would be prompts in its coordinates, not the source's.
        self.click_transform = None if placeholder else tf
        interp = cv2.INTER_AREA if tf.scale < 1 else cv2.INTER_LINEAR
        disp = cv2.resize(image, (tf.disp_w, tf.disp_h), interpolation=interp)
        disp = cv2.cvtColor(disp, cv2.COLOR_RGB2BGR)
        _draw_labels(disp, tf, annos)
        self._draw_prompts(disp, tf)
        lag = None
        if pairing is not None and pairing.frame is not None and result is not None and not pairing.exact:
            lag = pairing.frame.frame_id - result.frame_id
        self._draw_hud(disp, at, result, lag, has_frames=bool(self.pairer.frames))
        if self.interaction.show_help:
            _draw_help(disp)
        # A new (frame, result) pair reached the screen: one display-fps tick, one
        # capture→display sample (capture time of the masks drawn: how old they look).
        key = (pairing.frame.frame_id if pairing and pairing.frame else None,
               None if result is None else (result.seq, result.frame_id))
        if pairing is not None and key != self._shown_key:
            self._shown_key = key
            self.display_rate.tick(at)
            if result is not None and result.t.capture is not None:
                self.display_latency.add(at - result.t.capture)
        return disp

    def _draw_prompts(self, disp: np.ndarray, tf: ViewTransform) -> None:
        import cv2

        from streamtrack.overlay import draw_boxes

        ps = self.interaction.shown_prompts(self.interaction.selected)
        if ps is not None:
            if ps.box is not None:
                a = tf.to_display(ps.box[0], ps.box[1])
                b = tf.to_display(ps.box[2], ps.box[3])
                draw_boxes(disp, [(*a, *b)], color=(0, 200, 0), thickness=1)
            for (x, y), lab in zip(ps.points, ps.labels, strict=True):
                # The tutorial's markers (as overlay.draw_points), in this image's BGR.
                c = tuple(int(round(v)) for v in tf.to_display(x, y))
                cv2.drawMarker(disp, c, (255, 255, 255), cv2.MARKER_STAR, 13, 3)
                cv2.drawMarker(disp, c, (0, 200, 0) if lab == 1 else (0, 0, 220), cv2.MARKER_STAR, 10, 2)
        band = self.interaction.drag_box
        if band is not None:
            x0, y0, x1, y1 = (int(round(v)) for v in band)
            cv2.rectangle(disp, (x0, y0), (x1, y1), (0, 255, 255), 1, cv2.LINE_AA)

    def _draw_hud(self, disp: np.ndarray, at: float, result: FrameResult | None,
                  lag: int | None, *, has_frames: bool) -> None:
        import cv2

        from streamtrack.overlay import color_for

        def pct(win: SlidingWindow) -> str:
            p = win.p50_p95()
            return "-" if p is None else f"{p[0] * 1000:.0f}/{p[1] * 1000:.0f} ms"

        lines: list[tuple[str, tuple[int, int, int]]] = [
            (f"display {self.display_rate.rate(at):4.1f} fps   tracker {self.tracker_rate(at):4.1f} fps",
             TEXT_BGR),
            (f"capture>mask p50/p95 {pct(self.mask_latency)}", TEXT_BGR),
            (f"capture>display p50/p95 {pct(self.display_latency)}", TEXT_BGR),
        ]
        drops = "-" if result is None else (
            ", ".join(f"{k} {v}" for k, v in sorted(result.dropped.items())) or "0")
        lines.append((f"drops {drops}", TEXT_BGR))
        state = self.source.state or "?"
        lines.append((f"source {state}" + (f"   frame {result.frame_id}" if result else ""),
                      STATE_BGR["visible"] if state == "streaming" else STATE_BGR["occluded"]))
        if self.source.reason:  # why it is down: the end often says what to do, so wrapped
            lines.extend((f"  {part}", STATE_BGR["occluded"])
                         for part in textwrap.wrap(self.source.reason, 56, max_lines=3, placeholder=" ..."))
        if lag:
            lines.append((f"masks {lag} frame(s) behind", STATE_BGR["occluded"]))
        if result is not None and not has_frames:
            lines.append(("no frames: masks only (tracker needs --publish-frames)", DIM_BGR))
        objects = [] if result is None else list(result.objects)
        font, fs = cv2.FONT_HERSHEY_SIMPLEX, 0.42
        lh = 16
        obj_rows = min(len(objects), 8)
        panel_h = 8 + lh * (len(lines) + obj_rows)
        panel_w = 8 + max((cv2.getTextSize(t, font, fs, 1)[0][0] for t, _ in lines), default=100)
        panel_w = min(max(panel_w, 200), disp.shape[1])
        y_top = 30  # below the banner strip
        _shade(disp, 0, y_top, panel_w, y_top + panel_h)
        y = y_top + lh
        for text, color in lines:
            cv2.putText(disp, text, (5, y - 4), font, fs, color, 1, cv2.LINE_AA)
            y += lh
        sel = self.interaction.selected
        for o in objects[:obj_rows]:
            rgb = color_for(o.obj_id)
            cv2.rectangle(disp, (6, y - 14), (16, y - 4), rgb[::-1], -1)
            mark = "*" if o.obj_id == sel else " "
            text = f"{mark}{o.obj_id}  {o.state:8s} {o.score:.2f}"
            cv2.putText(disp, text, (22, y - 4), font, fs, STATE_BGR.get(o.state, TEXT_BGR), 1, cv2.LINE_AA)
            y += lh
        # Bottom line: what a click does now, and mode.
        target = sel if sel is not None else self.interaction.next_id()
        mode = "PAUSED   " if self.interaction.paused else ""
        ctl = "" if self.control_endpoint else "   view only (no --control)"
        bottom = f"{mode}click -> object {target}{' (new)' if sel is None else ''}   h: help{ctl}"
        hgt = disp.shape[0]
        _shade(disp, 0, hgt - 20, disp.shape[1], hgt)
        cv2.putText(disp, bottom, (5, hgt - 6), font, fs, TEXT_BGR, 1, cv2.LINE_AA)
        # Toasts above the bottom line, newest last.
        mono = time.monotonic()
        self.toasts = [t for t in self.toasts if t.until > mono]
        ty = hgt - 26
        width = max(20, (disp.shape[1] - 10) // cv2.getTextSize("m", font, fs, 1)[0][0])
        for t in reversed(self.toasts):
            # Wrapped at words, not cut: the end of an error often says what to do.
            for line in reversed(textwrap.wrap(t.text, width, max_lines=3, placeholder=" ...")):
                cv2.putText(disp, line, (5, ty), font, fs, (80, 80, 255) if t.error else (160, 255, 160),
                            1, cv2.LINE_AA)
                ty -= lh
        banner = self.banner(at)
        if banner is not None:
            text, color = banner
            cv2.rectangle(disp, (0, 0), (disp.shape[1], 26), color, -1)
            cv2.putText(disp, text, (8, 19), font, 0.6, (255, 255, 255), 2, cv2.LINE_AA)

    # ------------------------------------------------------------------ actions
    def apply(self, actions: Sequence[Action], control: _ControlWorker | None) -> None:
        for a in actions:
            self._dirty = True
            if isinstance(a, Quit):
                self._quit = True
            elif isinstance(a, Screenshot):
                self.save_screenshot()
            elif isinstance(a, ToggleHelp):
                pass
            elif control is None:
                if isinstance(a, (Pause, Resume)):
                    self.interaction.paused = isinstance(a, Resume)  # not sent: nothing changed
                self.toast(f"view only: {a.name} not sent (start the viewer with --control)", error=True)
            else:
                control.submit(a)

    def take_replies(self, control: _ControlWorker) -> None:
        """Handle the control replies that came; tell the worker of each rename handled."""
        while not control.replies.empty():
            cmd, text, failed, given = control.replies.get_nowait()
            self.reply(cmd, text, failed, given)
            if given is not None and isinstance(cmd, AddPrompt) and given != cmd.obj_id:
                control.renamed(cmd.obj_id)

    def reply(self, cmd: ControlCommand, text: str, failed: bool, given: int | None = None) -> None:
        """A control request's outcome: a toast; a pause or resume that failed is undone
        here too (the tracker's stats correct it if it did carry it out); a new object
        the tracker gave another id (``given``) goes by that id from now on."""
        if given is not None and isinstance(cmd, AddPrompt):
            self.interaction.rename(cmd.obj_id, given)
        if failed and isinstance(cmd, (Pause, Resume)):
            self.interaction.paused = isinstance(cmd, Resume)
        if not failed and isinstance(cmd, AddPrompt) and self.interaction.paused:
            text += " (applied to the next frame when resumed)"
        self.toast(text, error=failed)

    def save_screenshot(self) -> Path | None:
        import cv2

        if self.canvas is None:
            return None
        folder = self.config.screenshots
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            self.toast(f"could not save a screenshot in {folder}: {e.strerror}", error=True)
            return None
        stamp = time.strftime("%Y%m%d-%H%M%S")
        result = self.pairer.latest_result
        fid = f"-f{result.frame_id}" if result is not None else ""
        path = folder / f"streamtrack-{self.stream or 'view'}-{stamp}{fid}.png"
        n = 1
        while path.exists():
            path = path.with_name(f"{path.stem.split('~')[0]}~{n}.png")
            n += 1
        # Write then rename: whoever watches the folder never sees half a PNG.
        tmp = path.with_name(f".{path.stem}.tmp.png")
        try:
            if cv2.imwrite(str(tmp), self.canvas):
                os.replace(tmp, path)
                self.toast(f"saved {path}")
                return path
        except (OSError, cv2.error):
            pass
        self.toast(f"could not write {path}", error=True)
        return None

    # --------------------------------------------------------------------- loop
    def run(self) -> int:
        import cv2

        from streamtrack.subscriber import Subscriber

        kinds = ("masks", "frames", "status", "stats")
        topics = [f"{k}/{self.stream}" if self.stream else f"{k}/" for k in kinds]
        sub = Subscriber(self.endpoint, topics=topics, curve=self.curve)
        control = None
        try:
            if self.control_endpoint:
                control = _ControlWorker(self.control_endpoint, self.config.control_timeout,
                                         curve=self.curve)
            cv2.namedWindow(self.title, cv2.WINDOW_AUTOSIZE | cv2.WINDOW_GUI_NORMAL)
            release_x_displays()  # Qt has its own connection now

            # Mouse events wait for the key of the same waitKeyEx call: when the loop falls
            # behind, Qt delivers a key and the clicks after it in one batch and calls back
            # the clicks first, so "n, then click" would mark the old object.
            mouse_events: list[tuple[int, int, int, int]] = []

            def on_mouse(event: int, x: int, y: int, flags: int, _param: object) -> None:
                mouse_events.append((event, x, y, flags))

            cv2.setMouseCallback(self.title, on_mouse)
            shown = False
            while not self._quit:
                while (msg := sub.recv(timeout=0)) is not None:
                    self.handle(msg)
                if control is not None:
                    self.take_replies(control)
                mono = time.monotonic()
                # Redraw on news, and a few times a second anyway so clocks and the
                # "not publishing" banner stay current.
                if self._dirty or mono - self._last_render > 0.25:
                    self.canvas = self.compose(now())
                    cv2.imshow(self.title, self.canvas)
                    self._dirty, self._last_render = False, mono
                    shown = True
                key = cv2.waitKeyEx(10)
                self.apply(self.interaction.key(key), control)
                while mouse_events:
                    self.apply(self.interaction.mouse(*mouse_events.pop(0), self.click_transform), control)
                    if self.interaction.drag_box is not None:
                        self._dirty = True
                if shown and not _window_open(self.title):
                    break  # closed with the window manager's button
        finally:
            # The window goes first: requests still queued for a dead tracker may take a
            # timeout each, and a window that no longer redraws looks hung.
            cv2.destroyAllWindows()
            cv2.waitKey(1)
            if control is not None:
                control.close(self.config.control_timeout + 1.0)
            sub.close()
        return 0


def _window_open(title: str) -> bool:
    import cv2

    try:
        return cv2.getWindowProperty(title, cv2.WND_PROP_VISIBLE) >= 1
    except cv2.error:  # Qt has destroyed the window already (its close button)
        return False


def _shade(img: np.ndarray, x0: int, y0: int, x1: int, y1: int, alpha: float = 0.55) -> None:
    """Darken a rectangle so white text stays readable on any frame."""
    roi = img[max(0, y0):y1, max(0, x0):x1]
    roi[:] = (roi * (1.0 - alpha)).astype(np.uint8)


def _draw_labels(disp: np.ndarray, tf: ViewTransform, annos: Sequence) -> None:
    """Object id and score above each mask's box, in the object's colour, outlined."""
    import cv2

    from streamtrack.overlay import color_for

    for a in annos:
        x, y = tf.to_display(a.bbox[0], a.bbox[1])
        org = (int(max(2, x)), int(max(14, y - 4)))
        text = f"{a.obj_id}  {a.score:.2f}"
        cv2.putText(disp, text, org, cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 3, cv2.LINE_AA)
        cv2.putText(disp, text, org, cv2.FONT_HERSHEY_SIMPLEX, 0.5, color_for(a.obj_id)[::-1], 1,
                    cv2.LINE_AA)


def _draw_help(disp: np.ndarray) -> None:
    import cv2

    h, w = disp.shape[:2]
    ph, pw = 18 * len(HELP_LINES) + 20, 300
    x0, y0 = max(0, (w - pw) // 2), max(0, (h - ph) // 2)
    _shade(disp, x0, y0, x0 + pw, y0 + ph, 0.8)
    for i, line in enumerate(HELP_LINES):
        cv2.putText(disp, line, (x0 + 12, y0 + 24 + 18 * i), cv2.FONT_HERSHEY_SIMPLEX, 0.45,
                    TEXT_BGR, 1, cv2.LINE_AA)


# ------------------------------------------------------------------- launching helpers


def check_display() -> None:
    """Raise :class:`UserError` when no window can open: an OpenCV built without a GUI
    (opencv-python-headless), or no display reachable (imshow would abort)."""
    if not opencv_has_windows():
        raise UserError("this OpenCV cannot open windows (built without a GUI: opencv-python-headless?); "
                        "pip install opencv-python in its place, or run without a window")
    if not sys.platform.startswith(("linux", "freebsd")):
        return
    _check_qt_platform()
    display = os.environ.get("DISPLAY")
    if not display:
        raise UserError("no display: DISPLAY is not set (run the viewer in a desktop session, "
                        "use ssh -X, or start Xvfb for headless use)")
    if not _x_display_opens(display):
        # Qt would abort the process with advice to reinstall the application.
        raise UserError(f"no display: cannot connect to DISPLAY={display} (is that X server running? "
                        "over ssh, log in again with -X)")


def _check_qt_platform() -> None:
    """A ``QT_QPA_PLATFORM`` this OpenCV's own Qt has no plugin for (``wayland`` from a
    Wayland desktop: the opencv-python wheels ship ``xcb`` only) aborts the process."""
    wanted = [p.split(":")[0].strip() for p in os.environ.get("QT_QPA_PLATFORM", "").split(";")]
    wanted = [p for p in wanted if p]
    if not wanted:
        return
    import cv2

    folder = Path(cv2.__file__).parent / "qt" / "plugins" / "platforms"
    if not folder.is_dir():  # an OpenCV built against the system's Qt, or another GUI
        return
    shipped = sorted(p.name.removeprefix("libq").split(".")[0] for p in folder.glob("libq*.so*"))
    if not set(wanted) & set(shipped):
        raise UserError(f"QT_QPA_PLATFORM={os.environ['QT_QPA_PLATFORM']}: this OpenCV's Qt has only "
                        f"{', '.join(shipped) or 'no'} platform plugins (unset QT_QPA_PLATFORM, or set it "
                        f"to {shipped[0] if shipped else 'xcb'})")


def opencv_has_windows() -> bool:
    """Whether this OpenCV was built with a GUI backend (its build information says
    ``GUI: NONE`` otherwise, and namedWindow raises "not implemented")."""
    import re

    import cv2

    found = re.search(r"^[ \t]*GUI:[ \t]*(\S+)", cv2.getBuildInformation(), re.MULTILINE)
    return found is None or found.group(1).upper() != "NONE"


# Display name -> Xlib connection opened by check_display and kept open.  A bare X server
# (Xvfb without -noreset) resets when its last client leaves, and a connection made during
# the reset is refused: closing the check's connection just before Qt connects made Qt abort
# the process now and then.  Held, the server has a client until Qt has its own.
_held_x_displays: dict[str, int] = {}


def _x_display_opens(name: str) -> bool:
    """Whether Xlib can open ``name`` (True when Xlib is not there to ask); the connection
    is held until :func:`release_x_displays`."""
    import ctypes

    if name in _held_x_displays:
        return True
    try:
        x11 = ctypes.CDLL("libX11.so.6")
    except OSError:
        return True
    x11.XOpenDisplay.argtypes = [ctypes.c_char_p]
    x11.XOpenDisplay.restype = ctypes.c_void_p
    handle = x11.XOpenDisplay(name.encode())
    if not handle:
        return False
    _held_x_displays[name] = handle
    return True


def release_x_displays() -> None:
    """Close the connections :func:`check_display` held (once the window has its own)."""
    import ctypes

    if not _held_x_displays:
        return
    x11 = ctypes.CDLL("libX11.so.6")
    x11.XCloseDisplay.argtypes = [ctypes.c_void_p]
    while _held_x_displays:
        x11.XCloseDisplay(_held_x_displays.popitem()[1])


def viewer_command(endpoint: str, control: str | None = None, stream: str | None = None,
                   max_size: tuple[int, int] | None = None,
                   curve: CurveClient | None = None) -> list[str]:
    """The command line that runs a viewer in its own process (for ``run --show``)."""
    cmd = [sys.executable, "-m", "streamtrack", "view", endpoint]
    if control:
        cmd += ["--control", control]
    if stream:
        cmd += ["--stream", stream]
    if max_size:
        cmd += ["--max-size", f"{max_size[0]}x{max_size[1]}"]
    if curve is not None:
        cmd += ["--curve-server-key", curve.server_key_file, "--curve-secret", curve.secret_file]
    return cmd


def spawn_viewer(endpoint: str, control: str | None = None, stream: str | None = None,
                 max_size: tuple[int, int] | None = None,
                 curve: CurveClient | None = None) -> subprocess.Popen:
    """Start a viewer process. A GUI crash (or imshow abort) then cannot take the
    tracker down, and the tracker loop never waits on the window."""
    check_display()
    return subprocess.Popen(viewer_command(endpoint, control, stream, max_size, curve))


def main(args) -> int:
    """``streamtrack view`` (args from the CLI parser)."""
    from streamtrack.protocol import cross_process_endpoint, validate_stream

    max_size = parse_size(args.max_size)
    timeout = args.control_timeout
    if not (math.isfinite(timeout) and timeout > 0):
        raise UserError(f"--control-timeout must be a number of seconds > 0, got {timeout}")
    config = ViewerConfig(max_size=max_size, screenshots=Path(args.screenshots), control_timeout=timeout)
    if args.stream is not None:
        validate_stream(args.stream)
    curve = client_from_args(args)  # bad key files: one line, before any window
    endpoint, control, stream = resolve_endpoints(args.endpoint, args.control, args.stream, args.fleet)
    for ep in (endpoint, control):
        if ep is not None:
            cross_process_endpoint(ep)
    check_display()  # before cv2 touches the display: imshow without one aborts the process
    return Viewer(endpoint, control, stream, config=config, curve=curve).run()


def resolve_endpoints(endpoint: str, control: str | None, stream: str | None,
                      fleet: bool = False) -> tuple[str, str | None, str | None]:
    """(publish, control, stream) to view.  A fleet (its directory file, or with ``fleet``
    its control endpoint) names one stream's endpoints: its control unless ``control``
    says otherwise, so clicks prompt that stream."""
    from streamtrack.fleet_directory import fleet_address, fleet_stream, is_directory_file

    if not (fleet or is_directory_file(endpoint)):
        return endpoint, control, stream
    if fleet:
        endpoint = fleet_address(endpoint)
    entry = fleet_stream(endpoint, stream, wait=_tell_waiting)
    return entry.publish, control or entry.control, entry.name


def _tell_waiting(entry: StreamEntry) -> None:
    check_display()  # no window possible: say so now, not once the stream runs
    print(f"streamtrack: fleet stream {entry.name!r} is {entry.state}: waiting for its endpoints "
          "(Ctrl-C to give up)", file=sys.stderr, flush=True)
