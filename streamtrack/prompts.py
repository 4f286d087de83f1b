"""Prompts from the command line (``--box``, ``--point``) and prompts files.

A prompts file is a JSON list; each entry prompts one object on one frame::

    [{"obj_id": 1, "frame": 0, "box": [x0, y0, x1, y1]},
     {"obj_id": 2, "frame": 0, "points": [[x, y], [x, y]], "labels": [1, 0]},
     {"obj_id": 3, "frame": 30, "mask": "mask.png"}]

``mask`` is a PNG path (relative to the file; the object is its non-zero pixels that are
not fully transparent, or, if there are none, its opaque ones) or a COCO RLE dict; an
empty mask is refused.
Geometry is checked by the tracker on each entry's own frame (and, for a warning, on the
source's first).
"""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from pathlib import Path

import numpy as np

from streamtrack.errors import UserError, read_text_file
from streamtrack.protocol import ProtocolError, reject_duplicate_keys
from streamtrack.tracking import MAX_OBJ_ID, Prompt

_FIELDS = {"obj_id", "frame", "box", "points", "labels", "mask"}
# A number PyYAML (YAML 1.1) reads as a string: an exponent without a sign.
_YAML_STRING_EXPONENT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE]\d+")


def parse_box(text: str) -> tuple[float, float, float, float]:
    values = _numbers(text, "--box", "x0,y0,x1,y1")
    if len(values) != 4:
        raise UserError(f"--box {text!r}: expected x0,y0,x1,y1")
    if not (values[0] < values[2] and values[1] < values[3]):  # before the model loads, not after
        raise UserError(f"--box {text!r}: needs x0 < x1 and y0 < y1 (corners top-left, then bottom-right)")
    return tuple(values)  # type: ignore[return-value]


def parse_point(text: str) -> tuple[float, float, int]:
    values = _numbers(text, "--point", "x,y[,label]")
    if len(values) not in (2, 3):
        raise UserError(f"--point {text!r}: expected x,y or x,y,label")
    label = 1 if len(values) == 2 else values[2]
    if label not in (0, 1):
        raise UserError(f"--point {text!r}: label must be 1 (foreground) or 0 (background)")
    return values[0], values[1], int(label)


def _numbers(text: str, flag: str, form: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise UserError(f"{flag} {text!r}: expected numbers as {form}") from None
    if not all(math.isfinite(v) for v in values):
        raise UserError(f"{flag} {text!r}: numbers must be finite")
    return values


def from_cli(boxes: list[str] | None, points: list[str] | None) -> dict[int, list[Prompt]]:
    """Each ``--box`` is a new object (ids 1, 2, ...); all ``--point``s are one more object."""
    prompts = [Prompt.make(i, box=parse_box(b)) for i, b in enumerate(boxes or [], start=1)]
    if points:
        parsed = [parse_point(p) for p in points]
        prompts.append(
            Prompt.make(len(prompts) + 1, points=[p[:2] for p in parsed], labels=[p[2] for p in parsed])
        )
    return {0: prompts} if prompts else {}


def load_prompts_file(path: str | Path) -> dict[int, list[Prompt]]:
    """Read a prompts file into {frame: [Prompt, ...]}; every entry is checked."""
    path = Path(path)
    try:
        # As on the wire, a key given twice (a copy-paste slip) is an error, not silently
        # the last one; nesting too deep for the parser is one line too.  (NaN parses: the
        # entry's check names it.)
        entries = json.loads(read_text_file(path, "prompts file"), object_pairs_hook=reject_duplicate_keys)
    except (ValueError, ProtocolError, RecursionError) as e:
        reason = "nested too deeply" if isinstance(e, RecursionError) else e
        raise UserError(f"prompts file {path} is not valid JSON ({reason})") from None
    if not isinstance(entries, list) or not entries:
        raise UserError(f"prompts file {path}: expected a non-empty JSON list of prompts")
    return prompts_from_list(entries, f"prompts file {path}", path.parent)


def prompts_from_list(entries: list, where_list: str, base: Path) -> dict[int, list[Prompt]]:
    """Entries in the prompts-file format (already decoded, e.g. inline in a YAML file)
    into {frame: [Prompt, ...]}; mask PNG paths are relative to ``base``."""
    by_frame: dict[int, list[Prompt]] = defaultdict(list)
    seen: set[tuple[int, int]] = set()  # (frame, obj_id): a file may hold many thousands
    for i, entry in enumerate(entries):
        where = f"{where_list}, entry {i}"
        prompt, frame = _entry(entry, where, base)
        if (frame, prompt.obj_id) in seen:
            raise UserError(f"{where}: object {prompt.obj_id} is prompted twice on frame {frame}")
        seen.add((frame, prompt.obj_id))
        by_frame[frame].append(prompt)
    return dict(by_frame)


def _entry(entry, where: str, base: Path) -> tuple[Prompt, int]:
    if not isinstance(entry, dict):
        raise UserError(f"{where}: expected an object like {{\"obj_id\": 1, \"box\": [...]}}")
    unknown = set(entry) - _FIELDS
    if unknown:
        raise UserError(f"{where}: unknown field(s) {sorted(unknown)}; allowed: {sorted(_FIELDS)}")
    obj_id, frame = entry.get("obj_id"), entry.get("frame", 0)
    if not isinstance(obj_id, int) or isinstance(obj_id, bool) or not 1 <= obj_id <= MAX_OBJ_ID:
        raise UserError(f"{where}: obj_id must be an integer from 1 to {MAX_OBJ_ID}")
    if not isinstance(frame, int) or isinstance(frame, bool) or frame < 0:
        raise UserError(f"{where}: frame must be a non-negative integer")
    box, points, labels, mask = (entry.get(k) for k in ("box", "points", "labels", "mask"))
    if box is None and points is None and mask is None:
        raise UserError(f"{where}: give a box, points or a mask")
    if mask is not None and (box is not None or points is not None):
        # Refused now, not when its frame comes (hours into a live stream).
        raise UserError(f"{where}: a mask prompt cannot be combined with points or a box")
    try:
        if box is not None:
            box = _array(box, "box must be [x0, y0, x1, y1]")
            if box.shape != (4,):
                raise ValueError("box must be [x0, y0, x1, y1]")
            if not (np.isfinite(box).all() and box[0] < box[2] and box[1] < box[3]):
                raise ValueError(f"box {box.tolist()} needs finite x0 < x1 and y0 < y1")
        if points is not None:
            points = _array(points, "points must be a non-empty list of [x, y]")
            if points.ndim != 2 or points.shape[1] != 2 or len(points) == 0:
                raise ValueError("points must be a non-empty list of [x, y]")
            if not np.isfinite(points).all():
                raise ValueError("points must be finite numbers")
        if labels is not None:
            labels = np.asarray(labels, dtype=object)
            if labels.ndim != 1 or not all(type(v) is int and v in (0, 1) for v in labels):
                raise ValueError("labels must be a list of 0 (background) / 1 (foreground)")
            labels = labels.astype(int)
            if points is None or len(labels) != len(points):
                raise ValueError("labels need points, one label per point")
        if mask is not None:
            mask = _load_mask(mask, base)
    except (TypeError, ValueError) as e:
        raise UserError(f"{where}: {e}") from None
    return Prompt.make(obj_id, points=points, labels=labels, box=box, mask=mask), frame


def _array(value, form: str) -> np.ndarray:
    """Coordinates from JSON as floats.  Only JSON numbers are coordinates: numpy would take
    ``true`` for 1 and ``"12"`` for 12 (the control channel refuses both), and ragged lists
    get ``form`` instead of numpy's wording."""
    def not_a_number(v):
        """The first value in ``v`` that is not a number, as a 1-tuple; None if all are."""
        if isinstance(v, list):
            return next((bad for x in v if (bad := not_a_number(x)) is not None), None)
        return None if isinstance(v, (int, float)) and not isinstance(v, bool) else (v,)

    bad = not_a_number(value)
    if bad is not None:
        hint = ""
        if isinstance(bad[0], str) and _YAML_STRING_EXPONENT.fullmatch(bad[0].strip()):
            hint = " (YAML reads 1e2 as a string: write 100 or 1.0e+2)"
        raise ValueError(f"{form}; {bad[0]!r} is not a number{hint}")
    try:
        return np.asarray(value, dtype=float)
    except (TypeError, ValueError, OverflowError):  # ragged, or an integer beyond a float's range
        raise ValueError(form) from None


def _load_mask(mask, base: Path) -> np.ndarray:
    if isinstance(mask, dict):
        from streamtrack.protocol import decode_mask

        pixels = decode_mask(mask)
        what = "mask"
    elif isinstance(mask, str):
        p = base / mask
        if not p.exists():
            raise ValueError(f"mask file {p} not found")
        if not p.is_file():
            raise ValueError(f"mask file {p} is not a file")
        pixels = _mask_image(p)
        what = f"mask file {p}"
    else:
        raise ValueError("mask must be a PNG path or a COCO RLE {size, counts}")
    if not pixels.any():
        # An empty prompt would add an object that is "occluded" from its first frame.
        raise ValueError(f"{what} is empty: it marks no pixel of the object")
    return pixels


def _mask_image(path: Path) -> np.ndarray:
    """A mask PNG as booleans: the non-zero pixels that are not fully transparent; if no
    such pixel is non-zero, the opaque ones (a black object cut out on a transparent
    background)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
            if im.mode == "P" and "transparency" in im.info:
                im = im.convert("RGBA")
            values = np.array(im.convert("L")) > 0
            if "A" not in im.getbands():
                return values
            opaque = np.array(im.getchannel("A")) > 0
            return values & opaque if (values & opaque).any() else opaque
    except (OSError, Image.DecompressionBombError) as e:  # not an image, cut short, unreadable
        raise ValueError(f"mask file {path} is not a readable image ({e})") from None


def merge(*sources: dict[int, list[Prompt]]) -> dict[int, list[Prompt]]:
    merged: dict[int, list[Prompt]] = defaultdict(list)
    seen: set[tuple[int, int]] = set()  # (frame, obj_id)
    for src in sources:
        for frame, prompts in src.items():
            for p in prompts:
                if (frame, p.obj_id) in seen:
                    raise UserError(
                        f"object {p.obj_id} is prompted twice on frame {frame} (--box objects are "
                        f"numbered 1, 2, ..., the --point object comes next: give the prompts "
                        f"file's objects other ids)")
                seen.add((frame, p.obj_id))
                merged[frame].append(p)
    return dict(merged)
