"""The live viewer's input, as pure logic: mouse and key events in the window become
control commands (prompts in source-frame pixels, whatever the window's scale) and viewer
actions.  Tests drive it without a display; :mod:`streamtrack.viewer` feeds it cv2's events."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

from streamtrack.control import AddPrompt, Pause, RemoveObject, Reset, Resume

# A press that moves less than this (display pixels) is a click, not a drag: hands
# shake, and a 2-pixel box is never what anybody meant.
DRAG_THRESHOLD = 6.0
MAX_PROMPT_POINTS = 64  # the control protocol's limit per request


# ------------------------------------------------------------------ coordinate mapping


@dataclass(frozen=True)
class ViewTransform:
    """Maps between source-frame pixels and the scaled image shown in the window.

    The displayed size is the source size times ``scale``, rounded; mapping uses the
    exact per-axis ratio of those integer sizes (what ``cv2.resize`` does) and pixel
    centres, so a click on a display pixel lands on the source pixel it shows.
    """

    src_w: int
    src_h: int
    scale: float

    @classmethod
    def fit(cls, src_w: int, src_h: int, max_w: int, max_h: int, *, upscale: bool = True) -> ViewTransform:
        """The largest scale that fits ``max_w`` x ``max_h`` (above 1 only with ``upscale``)."""
        if src_w <= 0 or src_h <= 0:
            raise ValueError(f"source size must be positive, got {src_w}x{src_h}")
        scale = min(max_w / src_w, max_h / src_h)
        if not upscale:
            scale = min(scale, 1.0)
        return cls(src_w, src_h, scale)

    @property
    def disp_w(self) -> int:
        return max(1, round(self.src_w * self.scale))

    @property
    def disp_h(self) -> int:
        return max(1, round(self.src_h * self.scale))

    @property
    def sx(self) -> float:
        return self.disp_w / self.src_w

    @property
    def sy(self) -> float:
        return self.disp_h / self.src_h

    def to_source(self, x: float, y: float) -> tuple[float, float]:
        """Display pixel -> source pixel, clamped into the frame, 2 decimals."""
        sx = (x + 0.5) / self.sx - 0.5
        sy = (y + 0.5) / self.sy - 0.5
        sx = min(max(sx, 0.0), self.src_w - 1.0)
        sy = min(max(sy, 0.0), self.src_h - 1.0)
        return round(sx, 2), round(sy, 2)

    def to_display(self, x: float, y: float) -> tuple[float, float]:
        """Source pixel -> display pixel (inverse of :meth:`to_source` inside the frame)."""
        return (x + 0.5) * self.sx - 0.5, (y + 0.5) * self.sy - 0.5


# ------------------------------------------------------------- interaction (pure logic)


@dataclass(frozen=True)
class Quit:
    pass


@dataclass(frozen=True)
class Screenshot:
    pass


@dataclass(frozen=True)
class ToggleHelp:
    pass


ControlCommand = AddPrompt | RemoveObject | Reset | Pause | Resume
Action = ControlCommand | Quit | Screenshot | ToggleHelp

# OpenCV highgui constants, duplicated so the pure logic needs no cv2 import.
EVENT_MOUSEMOVE, EVENT_LBUTTONDOWN, EVENT_RBUTTONDOWN = 0, 1, 2
EVENT_LBUTTONUP, EVENT_RBUTTONUP = 4, 5
EVENT_FLAG_SHIFTKEY = 16
KEY_ESC = 27


@dataclass
class PromptSet:
    """What the viewer has sent for one object on one frame since its last box / new object.

    Points accumulate so a background click refines the object instead of replacing
    its foreground click: SAM 2 replaces an object's prompt on a frame, and with the
    tracker paused every click lands on the same frame.  Once the object is tracked on a
    later frame (running, or paused on it), a click there starts a new set from the object's
    box on that frame: the earlier clicks marked where the object was.
    """

    points: list[tuple[float, float]] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    box: tuple[float, float, float, float] | None = None
    frame_id: int | None = None  # the frame shown when the set began


@dataclass
class _Press:
    x: float
    y: float
    button: str  # "left" | "right"
    shift: bool
    dragging: bool = False
    cur_x: float = 0.0
    cur_y: float = 0.0


class Interaction:
    """Mouse and key events -> actions (control commands and viewer commands).

    Coordinates of mouse events are display pixels; every prompt is emitted in
    source pixels through the :class:`ViewTransform` given with the event.
    """

    def __init__(self, drag_threshold: float = DRAG_THRESHOLD, *, can_send: bool = True) -> None:
        self.drag_threshold = drag_threshold
        self.can_send = can_send  # False: view only, a click changes nothing here either
        self.forget_objects()
        self.paused = False
        self.show_help = False
        self._press: _Press | None = None

    # ------------------------------------------------------------------ objects
    def observe(self, obj_ids: Iterable[int]) -> None:
        """The ids in the newest result (so ``n`` never reuses a tracked id)."""
        self.known_ids = set(obj_ids)

    def forget_objects(self) -> None:
        """None of a run's objects, prompts or selection (a new run's start)."""
        self.selected: int | None = None  # None: the next click starts a new object
        self.known_ids: set[int] = set()  # objects the tracker reports
        # Ids this viewer picked for objects it creates: sent as new objects, which the
        # tracker renumbers if another client took the id first (see rename).
        self.created: set[int] = set()
        self.prompts: dict[int, PromptSet] = {}
        self.frame_id: int | None = None  # the frame on screen, which clicks are made on
        self.frame_boxes: dict[int, tuple[float, float, float, float]] = {}  # its objects' boxes

    def next_id(self) -> int:
        used = self.known_ids | set(self.prompts) | ({self.selected} if self.selected else set())
        return max(used, default=0) + 1

    def target(self) -> int:
        """The object a prompt goes to, allocating a new id if none is selected."""
        if self.selected is None:
            self.selected = self.next_id()
            self.created.add(self.selected)
        return self.selected

    def rename(self, old: int, new: int) -> None:
        """The tracker gave the object this viewer created as ``old`` the id ``new``."""
        if old in self.prompts:
            self.prompts[new] = self.prompts.pop(old)
        if self.selected == old:
            self.selected = new
        self.created.discard(old)

    def _add(self, obj_id: int, **prompt) -> AddPrompt:
        return AddPrompt(obj_id=obj_id, new=obj_id in self.created and obj_id not in self.known_ids, **prompt)

    # -------------------------------------------------------------------- mouse
    @property
    def drag_box(self) -> tuple[float, float, float, float] | None:
        """The rubber band being dragged, in display pixels (for drawing)."""
        p = self._press
        if p is None or not p.dragging:
            return None
        return p.x, p.y, p.cur_x, p.cur_y

    def mouse(self, event: int, x: float, y: float, flags: int, tf: ViewTransform | None) -> list[Action]:
        shift = bool(flags & EVENT_FLAG_SHIFTKEY)
        if event in (EVENT_LBUTTONDOWN, EVENT_RBUTTONDOWN):
            button = "left" if event == EVENT_LBUTTONDOWN else "right"
            self._press = _Press(x, y, button, shift, cur_x=x, cur_y=y)
            return []
        p = self._press
        if p is None:
            return []
        if event == EVENT_MOUSEMOVE:
            p.cur_x, p.cur_y = x, y
            if p.button == "left" and math.hypot(x - p.x, y - p.y) >= self.drag_threshold:
                p.dragging = True
            return []
        if event not in (EVENT_LBUTTONUP, EVENT_RBUTTONUP):
            return []
        self._press = None
        if tf is None:  # nothing shown yet: there is no frame to map the click onto
            return []
        if p.button == "left" and (p.dragging or math.hypot(x - p.x, y - p.y) >= self.drag_threshold):
            return self._box(tf, p.x, p.y, x, y)
        # A right click, or shift + left click, is a background point.
        label = 0 if p.button == "right" or p.shift or shift else 1
        return self._point(tf, p.x, p.y, label)

    def shown_prompts(self, obj_id: int | None) -> PromptSet | None:
        """The prompt set of ``obj_id`` to draw: on the frame it was made on (a video that
        has moved on, running or paused since, no longer has the object where the clicks were)."""
        ps = self.prompts.get(obj_id) if obj_id is not None else None
        return None if ps is None or self._moved_on(obj_id, ps) else ps

    def _moved_on(self, obj_id: int, ps: PromptSet) -> bool:
        """Whether the video has moved on from ``ps``: the object is tracked on a later
        frame shown now (before it is, the clicks all mark where it first was).  Paused, the
        frame shown stays, so clicks on it add up; a set from before the pause is stale."""
        return ps.frame_id != self.frame_id and obj_id in self.frame_boxes

    def _point(self, tf: ViewTransform, x: float, y: float, label: int) -> list[Action]:
        if not self.can_send:  # nothing is sent: nothing is selected or remembered either
            point = tf.to_source(x, y)
            return [AddPrompt(obj_id=self.selected or self.next_id(), points=(point,), labels=(label,))]
        obj_id = self.target()
        ps = self.prompts.get(obj_id)
        if ps is None or self._moved_on(obj_id, ps):
            # A tracked object is refined where it is now: its box there, and the click.
            ps = self.prompts[obj_id] = PromptSet(box=self.frame_boxes.get(obj_id), frame_id=self.frame_id)
        if len(ps.points) >= MAX_PROMPT_POINTS:  # keep the newest: they are the refinements
            del ps.points[0], ps.labels[0]
        ps.points.append(tf.to_source(x, y))
        ps.labels.append(label)
        return [self._add(obj_id, points=tuple(ps.points), labels=tuple(ps.labels), box=ps.box)]

    def _box(self, tf: ViewTransform, x0: float, y0: float, x1: float, y1: float) -> list[Action]:
        ax, ay = tf.to_source(min(x0, x1), min(y0, y1))
        bx, by = tf.to_source(max(x0, x1), max(y0, y1))
        if bx <= ax or by <= ay:  # collapsed at the frame's edge
            return []
        if not self.can_send:
            return [AddPrompt(obj_id=self.selected or self.next_id(), box=(ax, ay, bx, by))]
        obj_id = self.target()
        # A box starts the object's prompt afresh: it is how a user re-marks it.
        self.prompts[obj_id] = PromptSet(box=(ax, ay, bx, by), frame_id=self.frame_id)
        return [self._add(obj_id, box=(ax, ay, bx, by))]

    # --------------------------------------------------------------------- keys
    def key(self, code: int) -> list[Action]:
        """A key code from ``cv2.waitKeyEx`` (-1 = none)."""
        if code < 0:
            return []
        # Only plain 8-bit keys: Qt reports modifiers and arrows as large codes, and
        # masking them (Shift = 0x1000020) would alias them onto letters or space.
        ch = chr(code) if code < 256 else ""
        if code == KEY_ESC or ch in ("q", "Q"):
            return [Quit()]
        if ch == "n":
            self.selected = self.next_id()
            self.created.add(self.selected)
            return []
        if ch and ch in "123456789":
            self.selected = int(ch)
            return []
        if ch == "d":
            if self.selected is None:
                return []
            obj_id, self.selected = self.selected, None
            self.prompts.pop(obj_id, None)
            self.known_ids.discard(obj_id)
            self.created.discard(obj_id)
            return [RemoveObject(obj_id=obj_id)]
        if ch == "r":
            self.prompts.clear()
            self.known_ids.clear()
            self.created.clear()
            self.selected = None
            return [Reset()]
        if ch == " ":
            self.paused = not self.paused
            return [Pause() if self.paused else Resume()]
        if ch == "s":
            return [Screenshot()]
        if ch == "h":
            self.show_help = not self.show_help
            return [ToggleHelp()]
        return []
