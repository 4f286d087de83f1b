"""What goes into the streaming engine and comes out of it: prompts, the engine's
configuration, its per-frame output, and the checks a prompt must pass.

Only numpy here: the supervisor, the prompts-file reader and other processes that run
no model import these without torch (``streamtrack.engine`` re-exports them).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING

import numpy as np

from streamtrack.errors import PromptError, UserError
from streamtrack.models import DEFAULT_MODEL

if TYPE_CHECKING:
    import torch

# torch.compile's modes the engine accepts (EngineConfig.compile_mode; streamtrack.compiled),
# and those that replay CUDA graphs.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
CUDAGRAPH_MODES = ("reduce-overhead", "max-autotune")


class ObjectState(str, Enum):
    VISIBLE = "visible"
    OCCLUDED = "occluded"  # SAM 2's object score says the object is absent
    LOST = "lost"  # absent for longer than ``lost_after`` seconds


# Object ids: 32-bit signed, so every client's JSON (and a viewer's palette) holds them.
MAX_OBJ_ID = 2**31 - 1


@dataclass(frozen=True)
class Prompt:
    """A prompt for one object on the frame it is passed with.

    Coordinates are pixels of the source frame.  ``points`` with ``labels``
    (1 = foreground, 0 = background), a ``box`` [x0, y0, x1, y1], both, or a
    ``mask`` (bool, frame-sized) alone.
    """

    obj_id: int
    points: tuple[tuple[float, float], ...] | None = None
    labels: tuple[int, ...] | None = None
    box: tuple[float, float, float, float] | None = None
    mask: np.ndarray | None = field(default=None, compare=False, repr=False)

    @classmethod
    def make(cls, obj_id, points=None, labels=None, box=None, mask=None) -> Prompt:
        """Build a prompt from lists/arrays; labels default to foreground.  Raises
        ``PromptError`` for input that is not numbers of the right shape."""
        if points is not None:
            try:
                points = tuple(tuple(float(v) for v in p) for p in np.asarray(points).tolist())
            except (TypeError, ValueError):
                raise PromptError(
                    f"object {obj_id}: points are a list of (x, y) pairs, e.g. [[40, 30]], "
                    f"got {points!r}") from None
            if labels is None:
                labels = (1,) * len(points)
        if labels is not None:
            labels = tuple(np.asarray(labels).reshape(-1).tolist())
        if box is not None:
            try:
                box = tuple(float(v) for v in np.asarray(box, dtype=float).reshape(-1).tolist())
            except (TypeError, ValueError):
                raise PromptError(
                    f"object {obj_id}: a box is 4 numbers x0,y0,x1,y1, got {box!r}") from None
        return cls(obj_id=obj_id, points=points, labels=labels, box=box, mask=mask)


@dataclass(frozen=True)
class ObjectOutput:
    obj_id: int
    mask: np.ndarray  # bool (H, W) at frame resolution
    score: float  # presence probability, sigmoid of SAM 2's object score
    object_score_logit: float
    iou: float  # SAM 2's predicted IoU of the chosen mask
    bbox: tuple[int, int, int, int] | None  # x0, y0, x1, y1 (x1, y1 exclusive); None if empty
    area: int
    state: ObjectState
    prompted: bool  # this frame carried a prompt for the object
    logits: torch.Tensor | None = field(default=None, repr=False)  # (S/4, S/4) low-res


@dataclass(frozen=True)
class FrameOutput:
    frame_idx: int
    width: int
    height: int
    objects: tuple[ObjectOutput, ...]
    infer_start: float  # time.time() clock
    infer_end: float

    def by_id(self, obj_id: int) -> ObjectOutput:
        for o in self.objects:
            if o.obj_id == obj_id:
                return o
        raise KeyError(obj_id)


@dataclass
class EngineConfig:
    model: str = DEFAULT_MODEL
    checkpoint: str | None = None
    device: str = "auto"
    image_size: int | None = None  # None = the model's own (1024)
    preprocess: str = "auto"  # exact | fast | auto (exact on CPU, fast elsewhere)
    max_cond_frames: int | None = None  # None = keep every conditioning frame
    lost_after: float = 3.0  # seconds absent before an object is "lost"
    fill_hole_area: int = 0  # fill background holes up to this area in low-res masks
    compile: bool = False  # torch.compile the encoder and the per-frame step (streamtrack.compiled)
    compile_slots: int = 4  # warm-up compiles object batches of 1, 2, 4 ... up to this
    compile_backend: str = "inductor"
    # torch.compile's mode; reduce-overhead / max-autotune replay CUDA graphs (single stream).
    # Any mode but default turns ``compile`` on.
    compile_mode: str = "default"
    bf16: bool = True  # autocast on CUDA
    # Objects tracked at once: each costs a share of every step, so an unbounded count
    # (a runaway prompt script, a hostile control client) would stall the stream.
    max_objects: int = 64

    def __post_init__(self) -> None:
        if self.compile_mode != "default":
            self.compile = True
        if not isinstance(self.device, str):  # None, or a torch.device
            self.device = "auto" if self.device is None else str(self.device)
        lost = self.lost_after
        if isinstance(lost, bool) or not isinstance(lost, (int, float)) or not lost >= 0:
            raise UserError(f"lost_after must be a number of seconds >= 0, got {lost!r}")
        if not _int_at_least(self.max_objects, 1):
            raise UserError(f"max_objects must be a positive integer, got {self.max_objects!r}")
        if not _int_at_least(self.fill_hole_area, 0):
            raise UserError(f"fill_hole_area must be an integer >= 0 (pixels), got {self.fill_hole_area!r}")
        if self.max_cond_frames is not None and not _int_at_least(self.max_cond_frames, 2):
            raise UserError(f"max_cond_frames must be an integer >= 2 (SAM 2 attends to 2+ prompts) or "
                            f"None (keep all), got {self.max_cond_frames!r}")
        if not _int_at_least(self.compile_slots, 1):
            raise UserError(f"compile_slots must be an integer >= 1, got {self.compile_slots!r}")
        if self.checkpoint is not None and not isinstance(self.checkpoint, (str, os.PathLike)):
            raise UserError(f"checkpoint must be a path (str or Path) or None, got {self.checkpoint!r}")
        for flag in ("bf16", "compile"):  # bf16="no" would be true
            if not isinstance(getattr(self, flag), bool):
                raise UserError(f"{flag} must be True or False, got {getattr(self, flag)!r}")


def _int_at_least(value: object, low: int) -> bool:
    """An int (not a bool, which is one to Python) of at least ``low``."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def check_mask_shape(oid: int, shape: tuple[int, ...], height: int, width: int,
                     surface: str = "frame") -> None:
    """Raise ``PromptError`` unless a mask prompt of ``shape`` fits a ``width`` x ``height``
    frame (a control client checks an RLE's size with it before expanding the mask)."""
    if tuple(shape) != (height, width):
        raise PromptError(
            f"object {oid}: mask shape {tuple(shape)} does not match the {surface} {(height, width)}")


def check_prompt(p: Prompt, height: int, width: int, surface: str = "frame") -> None:
    """Raise ``PromptError`` (one line, naming the object) unless ``p`` is well formed and
    fits a ``width`` x ``height`` frame.  Coordinates may lie on the edge (x = W)."""
    oid = p.obj_id
    if not isinstance(oid, (int, np.integer)) or isinstance(oid, bool) or oid < 1:
        raise PromptError(f"object id must be a positive integer, got {oid!r}")
    if p.mask is not None:
        if p.points is not None or p.box is not None:
            raise PromptError(f"object {oid}: a mask prompt cannot be combined with points or a box")
        mask = np.asarray(p.mask)
        check_mask_shape(oid, mask.shape, height, width, surface)
        _check_binary(oid, mask)
        return
    if p.box is None and p.points is None:
        raise PromptError(f"object {oid}: a prompt needs a box, points or a mask")
    if p.points is None and p.labels is not None:
        raise PromptError(f"object {oid}: labels need points (a box takes no labels)")
    if p.box is not None:
        box = list(p.box)
        if len(box) != 4 or not all(_finite(v) for v in box):
            raise PromptError(f"object {oid}: a box is 4 finite numbers x0,y0,x1,y1, got {p.box}")
        x0, y0, x1, y1 = box
        if not (x0 < x1 and y0 < y1):
            corners = ",".join(f"{v:g}" for v in box)
            raise PromptError(f"object {oid}: box {corners} needs x0 < x1 and y0 < y1")
        _check_inside(oid, [(x0, y0), (x1, y1)], width, height, "box corner", surface)
    if p.points is not None:
        if len(p.points) == 0:
            raise PromptError(f"object {oid}: empty point list")
        if p.labels is None or len(p.labels) != len(p.points):
            raise PromptError(f"object {oid}: need one label per point")
        if any(isinstance(v, bool) or v not in (0, 1) for v in p.labels):
            raise PromptError(f"object {oid}: point labels must be 1 (foreground) or 0 (background)")
        if any(len(pt) != 2 or not all(_finite(v) for v in pt) for pt in p.points):
            raise PromptError(f"object {oid}: points are (x, y) pairs of finite numbers")
        _check_inside(oid, p.points, width, height, "point", surface)


def _check_binary(oid: int, mask: np.ndarray) -> None:
    """A float mask must be 0/1: any other value would silently count as the object (as in
    sam2, which turns a mask prompt into booleans), so a probability or logit map given as
    a prompt would cover the whole frame."""
    if mask.dtype.kind not in "biufc":  # strings, objects, dates: "0" would be the object
        raise PromptError(f"object {oid}: a mask prompt must be boolean, integer or 0/1 float, "
                          f"got {mask.dtype} values")
    if mask.dtype.kind not in "fc":
        return
    if not np.isin(mask, (0.0, 1.0)).all():
        finite = mask[np.isfinite(mask)]
        seen = f"values in [{finite.min():g}, {finite.max():g}]" if finite.size else "no finite values"
        raise PromptError(
            f"object {oid}: a float mask prompt must hold only 0 and 1 (got {seen}); "
            "threshold a soft mask first, e.g. mask > 0.5")


def _finite(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and math.isfinite(v)


def _check_inside(obj_id, pts, width, height, what, surface) -> None:
    for x, y in pts:
        if not (0 <= x <= width and 0 <= y <= height):
            raise PromptError(
                f"object {obj_id}: {what} ({x:g}, {y:g}) is outside the {width}x{height} {surface}"
            )
