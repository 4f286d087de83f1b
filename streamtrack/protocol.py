"""What crosses the wire: typed results, status events, stats, topics and masks.

Everything here is plain JSON (no pickle). The result format is a contract (see
``docs/protocol.md``): the same object is the header part of a ZeroMQ message on
``masks/<stream>`` and one line of ``--save-jsonl``. Parsing is strict about the
fields it knows (types, ranges, version) and ignores fields it does not, so a
newer producer that *adds* fields keeps working with older consumers.

All timestamps are seconds on one clock, :func:`now` (``time.time``): it is the
clock that different processes on one machine agree on, so a subscriber can
compute capture→mask latency from its own receive time.
"""

from __future__ import annotations

import copy
import json
import math
import numbers
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

import cv2
import numpy as np
from pycocotools import mask as mask_utils

from streamtrack.errors import UserError

PROTOCOL_VERSION = 1
OBJECT_STATES = ("visible", "occluded", "lost")
TOPIC_KINDS = ("masks", "status", "stats", "frames")

# Stream names end up in topics (prefix-matched by ZeroMQ) and file names, so keep
# them to a conservative, slash-free alphabet.
_STREAM_RE = re.compile(r"^[A-Za-z0-9_.:@+\-]{1,128}$")
# pycocotools' C decoder trusts the RLE it is given (no bounds checks), so sizes are
# bounded and counts are verified in Python before they ever reach it.
MAX_MASK_SIDE = 16384
# All the masks of one result together (pixels): 64 objects of a 4K UHD frame.  A small
# message can declare thousands of full-size empty masks; a receiver that decodes them
# would allocate gigabytes for it.
MAX_RESULT_MASK_PIXELS = 2**29
# Integers beyond 64 bits are not read by most JSON parsers, nor ever sent by a tracker.
MAX_WIRE_INT = 2**63 - 1


class ProtocolError(UserError, ValueError):
    """A message is malformed, has an unknown version, or does not fit the protocol."""


def now() -> float:
    """The one clock all streamtrack timestamps use (seconds since the epoch)."""
    return time.time()


# --------------------------------------------------------------------------- topics


def validate_stream(stream: object) -> str:
    """Return ``stream`` if it is a valid stream name, else raise :class:`ProtocolError`."""
    if not isinstance(stream, str) or not _STREAM_RE.match(stream):
        raise ProtocolError(
            f"invalid stream name {stream!r}: use 1-128 characters from "
            "letters, digits and _ . : @ + -"
        )
    return stream


def masks_topic(stream: str) -> str:
    return f"masks/{validate_stream(stream)}"


def status_topic(stream: str) -> str:
    return f"status/{validate_stream(stream)}"


def stats_topic(stream: str) -> str:
    return f"stats/{validate_stream(stream)}"


def frames_topic(stream: str) -> str:
    return f"frames/{validate_stream(stream)}"


def parse_topic(topic: str | bytes) -> tuple[str, str]:
    """Split ``"masks/cam0"`` into ``("masks", "cam0")``; raise on anything else."""
    if isinstance(topic, bytes):
        try:
            topic = topic.decode("ascii")
        except UnicodeDecodeError as exc:
            raise ProtocolError(f"topic is not ASCII: {topic!r}") from exc
    kind, sep, stream = topic.partition("/")
    if not sep or kind not in TOPIC_KINDS:
        raise ProtocolError(f"unknown topic {topic!r}: expected one of {TOPIC_KINDS} + '/<stream>'")
    return kind, validate_stream(stream)


# ------------------------------------------------------------------------- endpoints

DEFAULT_HOST = "127.0.0.1"
WILDCARD_HOSTS = ("*", "0.0.0.0", "[::]", "::")  # a tcp:// host that binds every address
_ENDPOINT_SCHEMES = ("tcp", "ipc", "inproc")
# What ZeroMQ takes as a tcp host: a name, an IPv4 or [IPv6] address, an interface, ``*``,
# or ``source;destination`` for a connect. Anything else (spaces, a slash, a typo'd URL)
# would only fail later, at bind or connect time, after a model has loaded.
TCP_HOST = re.compile(r"[A-Za-z0-9._*%:\[\]-]+(;[A-Za-z0-9._*%:\[\]-]+)?")


def cross_process_endpoint(endpoint: str | int) -> str:
    """:func:`normalize_endpoint`, refusing ``inproc://``: another process (a tracker, a
    viewer, a subscriber of its own) never reaches it, and would wait for good."""
    ep = normalize_endpoint(endpoint)
    if ep.startswith("inproc://"):
        raise UserError(f"endpoint {endpoint}: inproc:// cannot cross processes; use tcp:// or ipc://")
    return ep


def normalize_endpoint(endpoint: str | int) -> str:
    """Turn user input into a ZeroMQ endpoint, defaulting to loopback.

    ``5555`` or ``"5555"`` -> ``tcp://127.0.0.1:5555``; ``"host:5555"`` ->
    ``tcp://host:5555``; ``tcp://``, ``ipc://`` and ``inproc://`` pass through after a
    sanity check. Port 0 means "any free port" (ZeroMQ spells it ``*``).
    """
    if isinstance(endpoint, int) and not isinstance(endpoint, bool):
        endpoint = str(endpoint)
    if not isinstance(endpoint, str) or not endpoint.strip():
        raise UserError(f"invalid endpoint {endpoint!r}: expected e.g. tcp://127.0.0.1:5555")
    ep = endpoint.strip()
    if ep.isdigit():
        ep = f"tcp://{DEFAULT_HOST}:{ep}"
    elif "://" not in ep:
        ep = f"tcp://{ep}"
    scheme, _, rest = ep.partition("://")
    if scheme not in _ENDPOINT_SCHEMES:
        raise UserError(
            f"invalid endpoint {endpoint!r}: scheme must be one of "
            f"{', '.join(s + '://' for s in _ENDPOINT_SCHEMES)}"
        )
    if not rest:
        raise UserError(f"invalid endpoint {endpoint!r}: nothing after {scheme}://")
    if scheme == "tcp":
        host, sep, port = rest.rpartition(":")
        if not sep or not host:
            raise UserError(f"invalid endpoint {endpoint!r}: expected tcp://HOST:PORT")
        if not TCP_HOST.fullmatch(host):
            raise UserError(f"invalid endpoint {endpoint!r}: {host!r} is not a host name or address")
        if port != "*":
            if not port.isdigit() or not 0 <= int(port) <= 65535:
                raise UserError(f"invalid endpoint {endpoint!r}: port must be 0-65535 or *")
            if int(port) == 0:
                port = "*"
        ep = f"tcp://{host}:{port}"
    return ep


def tcp_host_port(endpoint: str) -> tuple[str, str] | None:
    """(host, port) of a normalised ``tcp://HOST:PORT`` endpoint (the host as written:
    ``[::1]`` keeps its brackets); None for ``ipc://`` and ``inproc://``."""
    scheme, _, rest = endpoint.partition("://")
    if scheme != "tcp":
        return None
    host, _, port = rest.rpartition(":")
    return host, port


def system_port(endpoint: str) -> bool:
    """Whether a normalised tcp endpoint leaves the port to the system (``0``, ``*``):
    something to bind, not to connect to."""
    return endpoint.startswith("tcp://") and endpoint.endswith((":0", ":*"))


# ----------------------------------------------------------------- field validation
# Small checkers shared by every from_dict(): each names the offending field, so an
# error message says exactly what was wrong with a message.


def _set(obj: object, name: str, value: Any) -> None:
    """Assign to a frozen dataclass field (only from __post_init__, to normalise)."""
    object.__setattr__(obj, name, value)


def _get(d: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in d:
        raise ProtocolError(f"{where}: missing field {key!r}")
    return d[key]


def _int(value: Any, name: str, *, minimum: int | None = None) -> int:
    # bool is an int subclass in Python; True is never a valid count or id. numpy
    # integers are accepted (engines produce them) and turned into plain ints.
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise ProtocolError(f"{name} must be an integer, got {value!r}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ProtocolError(f"{name} must be >= {minimum}, got {value}")
    if value > MAX_WIRE_INT:
        raise ProtocolError(f"{name} must be at most 2**63 - 1, got {_shorten_int(value)}")
    return value


def _shorten_int(value: int) -> str:
    text = str(value) if value.bit_length() < 4000 else "a number"  # str() refuses over 4300 digits
    return text if len(text) <= 40 else f"{text[:20]}...({len(text)} digits)"


def _float(value: Any, name: str, *, optional: bool = False) -> float | None:
    if value is None and optional:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise ProtocolError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ProtocolError(f"{name} must be finite, got {value!r}")
    return value


def _str(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise ProtocolError(f"{name} must be a string, got {value!r}")
    return value


def _mapping(value: Any, name: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ProtocolError(f"{name} must be a JSON object, got {type(value).__name__}")
    return value


def _counts(value: Any, name: str) -> dict[str, int]:
    d = _mapping(value, name)
    return {_str(k, f"{name} key"): _int(v, f"{name}[{k!r}]", minimum=0) for k, v in d.items()}


def _check_version(d: Mapping[str, Any], where: str) -> None:
    v = _get(d, "v", where)
    if isinstance(v, bool) or v != PROTOCOL_VERSION:
        raise ProtocolError(
            f"{where}: unsupported protocol version {v!r} (this streamtrack speaks "
            f"v{PROTOCOL_VERSION}; upgrade the older side)"
        )


def _reject_constant(name: str) -> float:
    raise ProtocolError(f"non-standard JSON constant {name} (NaN/Infinity are not allowed)")


def reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # Python keeps the last of a repeated key, other parsers (and proxies, loggers) the
    # first: {"cmd": "status", "cmd": "reset"} must not mean different things to each.
    d = dict(pairs)
    if len(d) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ProtocolError(f"duplicate key {dup!r} in a JSON object")
    return d


def loads(data: str | bytes) -> Any:
    """Parse strict JSON (no NaN/Infinity, no repeated keys); raise :class:`ProtocolError`
    on failure."""
    try:
        return json.loads(data, parse_constant=_reject_constant, object_pairs_hook=reject_duplicate_keys)
    except ProtocolError:
        raise
    except (ValueError, TypeError, RecursionError) as exc:
        raise ProtocolError(f"invalid JSON: {exc}") from exc


def dumps(obj: Any) -> str:
    """Compact, strict JSON: NaN/Infinity raise instead of producing invalid JSON."""
    try:
        return json.dumps(obj, separators=(",", ":"), allow_nan=False)
    except (ValueError, TypeError) as exc:
        raise ProtocolError(f"cannot encode message as JSON: {exc}") from exc


# ----------------------------------------------------------------------------- masks


def _rle_runs(counts: str, name: str) -> np.ndarray:
    """Decode a COCO compressed-RLE string into its runs, exactly as pycocotools'
    ``rleFrString`` does, but checked: a malformed string is rejected here instead
    of making the C decoder read or write outside its buffers.

    Format: each run is a little-endian group of 5-bit digits in chars ``'0' + c``;
    bit 0x20 means "more digits follow", bit 0x10 of the last digit is the sign;
    from the 4th run on, a run is stored as the difference to the run two before.
    Vectorised, because masks can have tens of thousands of runs.
    """
    try:
        raw = counts.encode("ascii")
    except UnicodeEncodeError as exc:
        raise ProtocolError(f"{name}: RLE counts must be ASCII") from exc
    c = np.frombuffer(raw, dtype=np.uint8).astype(np.int64) - 48
    if c.size == 0:
        return np.zeros(0, dtype=np.int64)
    if c.min() < 0 or c.max() > 63:
        bad = raw[int(np.flatnonzero((c < 0) | (c > 63))[0])]
        raise ProtocolError(f"{name}: invalid character {chr(bad)!r} in RLE counts")
    last = (c & 0x20) == 0  # the digit that ends a run
    if not last[-1]:
        raise ProtocolError(f"{name}: RLE counts string is truncated")
    ends = np.flatnonzero(last)
    starts = np.concatenate(([0], ends[:-1] + 1))
    lengths = ends - starts + 1
    if lengths.max() > 7:  # 7 digits = 35 bits, more than any 32-bit run needs
        raise ProtocolError(f"{name}: RLE run too long")
    k = np.arange(c.size) - np.repeat(starts, lengths)  # digit index within its run
    x = np.add.reduceat((c & 0x1F) << (5 * k), starts)
    negative = (c[ends] & 0x10) != 0
    x[negative] -= np.left_shift(1, 5 * lengths[negative])
    # Undo the delta coding: run m (m > 2) = x[m] + run m-2, i.e. running sums along
    # the odd runs from 1 and along the even runs from 2 (run 0 stands alone).
    runs = x.copy()
    runs[1::2] = np.cumsum(x[1::2])
    runs[2::2] = np.cumsum(x[2::2])
    if (runs < 0).any():
        raise ProtocolError(f"{name}: negative run in RLE counts")
    return runs


def validate_rle(rle: Any, name: str = "rle") -> dict[str, Any]:
    """Check a COCO RLE dict (``{"size": [H, W], "counts": str}``) and return a clean copy."""
    d = _mapping(rle, name)
    extra = set(d) - {"size", "counts"}
    if extra:
        raise ProtocolError(f"{name}: unknown fields {sorted(extra)}")
    size = _get(d, "size", name)
    if not isinstance(size, (list, tuple)) or len(size) != 2:
        raise ProtocolError(f"{name}.size must be [height, width], got {size!r}")
    h = _int(size[0], f"{name}.size[0]", minimum=0)
    w = _int(size[1], f"{name}.size[1]", minimum=0)
    if h > MAX_MASK_SIDE or w > MAX_MASK_SIDE:
        raise ProtocolError(f"{name}.size {h}x{w} exceeds {MAX_MASK_SIDE} pixels per side")
    counts = _get(d, "counts", name)
    if isinstance(counts, bytes):
        counts = counts.decode("ascii", errors="replace")
    counts = _str(counts, f"{name}.counts")
    total = int(_rle_runs(counts, name).sum())
    if total != h * w:
        raise ProtocolError(f"{name}: RLE runs cover {total} pixels, size {h}x{w} has {h * w}")
    return {"size": [h, w], "counts": counts}


def encode_mask(mask: np.ndarray) -> dict[str, Any]:
    """Encode a boolean HxW mask as COCO RLE with ``counts`` as a str (JSON-ready).

    The same RLE as ``pycocotools.mask.encode``, found another way: pycocotools scans the
    pixels in C with the interpreter lock held (~0.34 ms for a 720p mask, per object per
    frame), and on a GPU the engine's thread, which gives the lock up at every torch call,
    waits that long for it.  Here the scan is numpy's and OpenCV's, which release the
    lock over whole arrays; pycocotools only compresses the run lengths."""
    m = np.asarray(mask)
    if m.ndim != 2:
        raise ProtocolError(f"mask must be 2-D (H, W), got shape {m.shape}")
    h, w = m.shape
    # COCO runs go down the columns (Fortran order).  The transpose of a C-ordered
    # W x H copy, flattened, is that order; OpenCV transposes in 0.12 ms for 720p
    # where numpy's reordering copy takes 1.1 ms.
    u8 = np.ascontiguousarray(m.astype(bool, copy=False)).view(np.uint8)
    flat = cv2.transpose(u8).reshape(-1) if u8.size else u8.reshape(-1)
    starts = np.flatnonzero(flat[1:] != flat[:-1]) + 1  # where a run begins
    counts = np.diff(np.concatenate(([0], starts, [flat.size])))
    if flat.size and flat[0]:
        counts = np.concatenate(([0], counts))  # runs alternate, background first
    rle = mask_utils.frPyObjects({"counts": counts.tolist(), "size": [h, w]}, h, w)
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode()}


def decode_mask(rle: Mapping[str, Any]) -> np.ndarray:
    """Decode COCO RLE (counts str or bytes) to a boolean HxW array; validates first."""
    clean = validate_rle(rle)
    h, w = clean["size"]
    if h == 0 or w == 0:
        return np.zeros((h, w), dtype=bool)
    raw = {"size": [h, w], "counts": clean["counts"].encode("ascii")}
    return mask_utils.decode(raw).astype(bool)


def mask_area(mask: np.ndarray) -> int:
    return int(np.count_nonzero(mask))


def mask_bbox(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """``(x0, y0, x1, y1)`` of the set pixels, x1/y1 exclusive (as COCO x+w, y+h); None if empty."""
    m = np.asarray(mask, dtype=bool)
    cols = np.flatnonzero(m.any(axis=0))
    if cols.size == 0:
        return None
    rows = np.flatnonzero(m.any(axis=1))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def rle_area(rle: Mapping[str, Any]) -> int:
    clean = validate_rle(rle)
    return int(mask_utils.area({"size": clean["size"], "counts": clean["counts"].encode()}))


def rle_bbox(rle: Mapping[str, Any]) -> tuple[float, float, float, float] | None:
    """Same convention as :func:`mask_bbox`, computed without decoding the mask."""
    clean = validate_rle(rle)
    x, y, w, h = (float(v) for v in mask_utils.toBbox(
        {"size": clean["size"], "counts": clean["counts"].encode()}
    ))
    if w <= 0 or h <= 0:
        return None
    return x, y, x + w, y + h


# ---------------------------------------------------------------------------- results


def _bbox(value: Any, name: str) -> tuple[float, float, float, float] | None:
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or len(value) != 4:
        raise ProtocolError(f"{name} must be [x0, y0, x1, y1] or null, got {value!r}")
    # Integral coordinates stay ints so a mask's bbox reads [3, 2, 8, 5] in JSON.
    x0, y0, x1, y1 = (
        int(v) if isinstance(v, numbers.Integral) and not isinstance(v, (bool, np.bool_))
        else _float(v, f"{name}[{i}]")
        for i, v in enumerate(value)
    )
    if x1 < x0 or y1 < y0:
        raise ProtocolError(f"{name} must have x0 <= x1 and y0 <= y1, got {value!r}")
    return x0, y0, x1, y1


@dataclass(frozen=True)
class ObjectResult:
    """One tracked object on one frame. ``bbox`` is ``[x0, y0, x1, y1]`` (x1, y1 exclusive)."""

    obj_id: int
    score: float
    state: str
    bbox: tuple[float, float, float, float] | None
    area: int
    rle: dict[str, Any] | None = None
    iou: float | None = None  # SAM 2's predicted IoU, when the engine reports it

    def __post_init__(self) -> None:
        # Normalise numpy scalars to plain Python numbers so to_json() always works.
        _set(self, "obj_id", _int(self.obj_id, "obj_id", minimum=1))
        _set(self, "score", _float(self.score, "score"))
        if self.state not in OBJECT_STATES:
            raise ProtocolError(f"state must be one of {OBJECT_STATES}, got {self.state!r}")
        _set(self, "area", _int(self.area, "area", minimum=0))
        _set(self, "bbox", _bbox(self.bbox, "bbox"))
        _set(self, "iou", _float(self.iou, "iou", optional=True))
        if self.rle is not None and not isinstance(self.rle, Mapping):
            raise ProtocolError(f"rle must be a COCO RLE dict or None, got {self.rle!r}")

    @classmethod
    def from_mask(
        cls,
        obj_id: int,
        mask: np.ndarray,
        *,
        score: float,
        state: str = "visible",
        iou: float | None = None,
    ) -> ObjectResult:
        """Build a result from a boolean mask: RLE, area and bbox filled in."""
        bbox = mask_bbox(mask)
        return cls(
            obj_id=obj_id,
            score=float(score),
            state=state,
            bbox=bbox,
            area=mask_area(mask),
            rle=encode_mask(mask),
            iou=None if iou is None else float(iou),
        )

    def mask(self) -> np.ndarray | None:
        """The decoded boolean mask, or None when no RLE was sent."""
        return None if self.rle is None else decode_mask(self.rle)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "obj_id": self.obj_id,
            "score": self.score,
            "state": self.state,
            "bbox": None if self.bbox is None else list(self.bbox),
            "area": self.area,
        }
        if self.iou is not None:
            d["iou"] = self.iou
        d["rle"] = self.rle
        return d

    @classmethod
    def from_dict(cls, d: Any, *, validate_masks: bool = True) -> ObjectResult:
        d = _mapping(d, "object")
        where = f"object {d.get('obj_id', '?')}"
        rle = d.get("rle")
        if rle is not None:
            # Full validation walks the counts string; a receiver that only decodes on
            # demand may skip it because decode_mask() validates again anyway.
            rle = validate_rle(rle, f"{where}.rle") if validate_masks else dict(
                _mapping(rle, f"{where}.rle")
            )
        return cls(
            obj_id=_int(_get(d, "obj_id", where), f"{where}.obj_id", minimum=1),
            score=_float(_get(d, "score", where), f"{where}.score"),
            state=_str(_get(d, "state", where), f"{where}.state"),
            bbox=_bbox(d.get("bbox"), f"{where}.bbox"),
            area=_int(_get(d, "area", where), f"{where}.area", minimum=0),
            rle=rle,
            iou=_float(d.get("iou"), f"{where}.iou", optional=True),
        )


def _mask_pixels(rle: dict | None) -> int:
    """Pixels of the mask an RLE declares (0 when it declares none that decodes)."""
    size = (rle or {}).get("size")
    if isinstance(size, (list, tuple)) and len(size) == 2 and all(
            isinstance(n, int) and not isinstance(n, bool) and 0 <= n <= MAX_MASK_SIDE for n in size):
        return size[0] * size[1]
    return 0


@dataclass(frozen=True)
class Timestamps:
    """Per-frame stage timestamps (seconds, :func:`now`); None where a stage has not run."""

    capture: float | None = None
    dequeue: float | None = None
    infer_start: float | None = None
    infer_end: float | None = None
    publish: float | None = None

    def __post_init__(self) -> None:
        for f in fields(self):
            _set(self, f.name, _float(getattr(self, f.name), f"t.{f.name}", optional=True))

    def to_dict(self) -> dict[str, float | None]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, d: Any) -> Timestamps:
        d = _mapping(d, "t")
        return cls(**{
            f.name: _float(d.get(f.name), f"t.{f.name}", optional=True) for f in fields(cls)
        })


@dataclass(frozen=True)
class FrameResult:
    """Everything published for one processed frame (the results contract, v1).

    ``t`` may be given as a :class:`Timestamps` or a plain dict, ``objects`` as any
    sequence; both are normalised so the stored value is immutable-ish and typed.
    """

    stream: str
    seq: int
    frame_id: int
    pts: float | None
    width: int
    height: int
    t: Timestamps = field(default_factory=Timestamps)
    source_state: str = "streaming"
    dropped: dict[str, int] = field(default_factory=dict)
    objects: tuple[ObjectResult, ...] = ()
    v: int = PROTOCOL_VERSION

    def __post_init__(self) -> None:
        validate_stream(self.stream)
        _set(self, "seq", _int(self.seq, "seq", minimum=0))
        _set(self, "frame_id", _int(self.frame_id, "frame_id", minimum=0))
        _set(self, "pts", _float(self.pts, "pts", optional=True))
        _set(self, "width", _int(self.width, "width", minimum=0))
        _set(self, "height", _int(self.height, "height", minimum=0))
        _str(self.source_state, "source_state")
        if isinstance(self.t, Mapping):
            object.__setattr__(self, "t", Timestamps.from_dict(self.t))
        elif not isinstance(self.t, Timestamps):
            raise ProtocolError(f"t must be Timestamps or a dict, got {type(self.t).__name__}")
        if not isinstance(self.objects, tuple):
            object.__setattr__(self, "objects", tuple(self.objects))
        for obj in self.objects:
            if not isinstance(obj, ObjectResult):
                raise ProtocolError(f"objects must be ObjectResult, got {type(obj).__name__}")
        object.__setattr__(self, "dropped", _counts(self.dropped, "dropped"))
        if self.v != PROTOCOL_VERSION:
            raise ProtocolError(f"unsupported protocol version {self.v!r}")

    def object(self, obj_id: int) -> ObjectResult | None:
        for obj in self.objects:
            if obj.obj_id == obj_id:
                return obj
        return None

    def with_timestamps(self, **stamps: float | None) -> FrameResult:
        """A copy with some timestamps replaced, e.g. ``with_timestamps(publish=now())``."""
        # Only ``t`` changes and it is validated on its own: re-validating every object
        # (``replace`` runs __post_init__) would cost the tracker ~0.1 ms a frame.
        stamped = copy.copy(self)
        object.__setattr__(stamped, "t", replace(self.t, **stamps))
        return stamped

    def to_dict(self) -> dict[str, Any]:
        return {
            "v": self.v,
            "stream": self.stream,
            "seq": self.seq,
            "frame_id": self.frame_id,
            "pts": self.pts,
            "width": self.width,
            "height": self.height,
            "t": self.t.to_dict(),
            "source_state": self.source_state,
            "dropped": dict(self.dropped),
            "objects": [o.to_dict() for o in self.objects],
        }

    def to_json(self) -> str:
        return dumps(self.to_dict())

    @classmethod
    def from_dict(cls, d: Any, *, validate_masks: bool = True) -> FrameResult:
        d = _mapping(d, "frame result")
        _check_version(d, "frame result")
        where = "frame result"
        objects = _get(d, "objects", where)
        if not isinstance(objects, list):
            raise ProtocolError(f"objects must be a list, got {type(objects).__name__}")
        parsed = tuple(ObjectResult.from_dict(o, validate_masks=validate_masks) for o in objects)
        ids = [o.obj_id for o in parsed]
        if len(set(ids)) != len(ids):
            raise ProtocolError(f"duplicate obj_id in objects: {ids}")
        width = _int(_get(d, "width", where), "width", minimum=0)
        height = _int(_get(d, "height", where), "height", minimum=0)
        for o in parsed:  # masks are at the frame's size: msg.mask() must not hand out another
            size = None if o.rle is None else o.rle.get("size")
            if size is not None and (not isinstance(size, (list, tuple)) or list(size) != [height, width]):
                raise ProtocolError(f"object {o.obj_id}.rle.size {size!r} is not the frame's "
                                    f"[{height}, {width}] (height, width)")
        pixels = sum(_mask_pixels(o.rle) for o in parsed)
        if pixels > MAX_RESULT_MASK_PIXELS:
            raise ProtocolError(f"the {len(parsed)} objects' masks have {pixels:,} pixels in all, more than "
                                f"{MAX_RESULT_MASK_PIXELS:,}")
        return cls(
            stream=validate_stream(_get(d, "stream", where)),
            seq=_int(_get(d, "seq", where), "seq", minimum=0),
            frame_id=_int(_get(d, "frame_id", where), "frame_id", minimum=0),
            pts=_float(d.get("pts"), "pts", optional=True),
            width=width,
            height=height,
            t=Timestamps.from_dict(d.get("t", {})),
            source_state=_str(d.get("source_state", "streaming"), "source_state"),
            dropped=_counts(d.get("dropped", {}), "dropped"),
            objects=parsed,
        )

    @classmethod
    def from_json(cls, data: str | bytes, *, validate_masks: bool = True) -> FrameResult:
        return cls.from_dict(loads(data), validate_masks=validate_masks)


# ------------------------------------------------------------------ status and stats


@dataclass(frozen=True)
class StatusEvent:
    """A discrete event on ``status/<stream>``.

    ``kind`` names what changed; well-known kinds are ``source_state`` (data:
    ``old``, ``new``, ``reason``), ``object_state`` (``obj_id``, ``old``, ``new``),
    ``tracker_state`` (``old``, ``new``), ``prompt_applied`` (``obj_id``, ``frame_id``,
    ``seq``, ``points``, ``labels``, ``box``, ``mask``) and ``error`` (``message``). ``data`` holds
    the kind-specific JSON fields, so new kinds need no protocol change.
    """

    stream: str
    kind: str
    time: float
    data: dict[str, Any] = field(default_factory=dict)
    v: int = PROTOCOL_VERSION

    def __post_init__(self) -> None:
        validate_stream(self.stream)
        if not isinstance(self.kind, str) or not self.kind:
            raise ProtocolError(f"status kind must be a non-empty string, got {self.kind!r}")
        _set(self, "time", _float(self.time, "time"))
        _set(self, "data", dict(_mapping(self.data, "data")))

    def to_dict(self) -> dict[str, Any]:
        return {
            "v": self.v, "stream": self.stream, "kind": self.kind,
            "time": self.time, "data": dict(self.data),
        }

    def to_json(self) -> str:
        return dumps(self.to_dict())

    @classmethod
    def from_dict(cls, d: Any) -> StatusEvent:
        d = _mapping(d, "status event")
        _check_version(d, "status event")
        where = "status event"
        return cls(
            stream=validate_stream(_get(d, "stream", where)),
            kind=_str(_get(d, "kind", where), "kind"),
            time=_float(_get(d, "time", where), "time"),
            data=dict(_mapping(d.get("data", {}), "data")),
        )

    @classmethod
    def from_json(cls, data: str | bytes) -> StatusEvent:
        return cls.from_dict(loads(data))


@dataclass(frozen=True)
class Latency:
    """Percentiles of one stage's latency in seconds over the stats window."""

    p50: float
    p95: float

    def __post_init__(self) -> None:
        _set(self, "p50", _float(self.p50, "p50"))
        _set(self, "p95", _float(self.p95, "p95"))

    def to_dict(self) -> dict[str, float]:
        return {"p50": self.p50, "p95": self.p95}


@dataclass(frozen=True)
class Stats:
    """Periodic health numbers on ``stats/<stream>``.

    ``latency`` maps a stage name (``queue`` = capture→dequeue, ``infer`` =
    infer_start→infer_end, ``total`` = capture→publish) to its p50/p95.
    """

    stream: str
    time: float
    fps: float
    latency: dict[str, Latency] = field(default_factory=dict)
    dropped: dict[str, int] = field(default_factory=dict)
    memory_bytes: int | None = None
    frames: int = 0
    source_state: str | None = None  # the source's state when sent (also while no frame comes)
    # Why the source is not streaming (its last error), while it is not: the reason a
    # subscriber that joined after the source_state event would not otherwise learn.
    source_error: str | None = None
    paused: bool | None = None  # the tracker is paused (a viewer joining later learns it here)
    # A file run holding its first frame until the first prompt comes (--show/--control).
    waiting_for_prompt: bool | None = None
    v: int = PROTOCOL_VERSION

    def __post_init__(self) -> None:
        validate_stream(self.stream)
        if self.source_state is not None:
            _set(self, "source_state", _str(self.source_state, "source_state"))
        if self.source_error is not None:
            _set(self, "source_error", _str(self.source_error, "source_error"))
        for name in ("paused", "waiting_for_prompt"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), bool):
                raise ProtocolError(f"{name} must be true, false or null, got {getattr(self, name)!r}")
        _set(self, "time", _float(self.time, "time"))
        _set(self, "fps", _float(self.fps, "fps"))
        if self.memory_bytes is not None:
            _set(self, "memory_bytes", _int(self.memory_bytes, "memory_bytes", minimum=0))
        _set(self, "frames", _int(self.frames, "frames", minimum=0))
        for stage, lat in self.latency.items():
            if not isinstance(lat, Latency):
                raise ProtocolError(f"latency[{stage!r}] must be Latency, got {lat!r}")
        object.__setattr__(self, "dropped", _counts(self.dropped, "dropped"))

    def to_dict(self) -> dict[str, Any]:
        return {
            "v": self.v, "stream": self.stream, "time": self.time, "fps": self.fps,
            "latency": {k: v.to_dict() for k, v in self.latency.items()},
            "dropped": dict(self.dropped), "memory_bytes": self.memory_bytes,
            "frames": self.frames, "source_state": self.source_state,
            "source_error": self.source_error, "paused": self.paused,
            "waiting_for_prompt": self.waiting_for_prompt,
        }

    def to_json(self) -> str:
        return dumps(self.to_dict())

    @classmethod
    def from_dict(cls, d: Any) -> Stats:
        d = _mapping(d, "stats")
        _check_version(d, "stats")
        where = "stats"
        latency = {}
        for stage, pct in _mapping(d.get("latency", {}), "latency").items():
            pct = _mapping(pct, f"latency[{stage!r}]")
            latency[_str(stage, "latency stage")] = Latency(
                p50=_float(_get(pct, "p50", f"latency[{stage!r}]"), f"latency[{stage!r}].p50"),
                p95=_float(_get(pct, "p95", f"latency[{stage!r}]"), f"latency[{stage!r}].p95"),
            )
        mem = d.get("memory_bytes")
        return cls(
            stream=validate_stream(_get(d, "stream", where)),
            time=_float(_get(d, "time", where), "time"),
            fps=_float(_get(d, "fps", where), "fps"),
            latency=latency,
            dropped=_counts(d.get("dropped", {}), "dropped"),
            memory_bytes=None if mem is None else _int(mem, "memory_bytes", minimum=0),
            frames=_int(d.get("frames", 0), "frames", minimum=0),
            source_state=None if d.get("source_state") is None else _str(d["source_state"], "source_state"),
            source_error=None if d.get("source_error") is None else _str(d["source_error"], "source_error"),
            paused=d.get("paused"),
            waiting_for_prompt=d.get("waiting_for_prompt"),
        )

    @classmethod
    def from_json(cls, data: str | bytes) -> Stats:
        return cls.from_dict(loads(data))


@dataclass(frozen=True)
class FrameHeader:
    """Header of a ``frames/<stream>`` message; the JPEG bytes travel as the next part."""

    stream: str
    frame_id: int
    width: int
    height: int
    time: float
    encoding: str = "jpeg"
    v: int = PROTOCOL_VERSION

    def __post_init__(self) -> None:
        validate_stream(self.stream)
        _set(self, "frame_id", _int(self.frame_id, "frame_id", minimum=0))
        _set(self, "width", _int(self.width, "width", minimum=0))
        _set(self, "height", _int(self.height, "height", minimum=0))
        _set(self, "time", _float(self.time, "time"))

    def to_json(self) -> str:
        return dumps({
            "v": self.v, "stream": self.stream, "frame_id": self.frame_id,
            "width": self.width, "height": self.height, "time": self.time,
            "encoding": self.encoding,
        })

    @classmethod
    def from_json(cls, data: str | bytes) -> FrameHeader:
        d = _mapping(loads(data), "frame header")
        _check_version(d, "frame header")
        where = "frame header"
        return cls(
            stream=validate_stream(_get(d, "stream", where)),
            frame_id=_int(_get(d, "frame_id", where), "frame_id", minimum=0),
            width=_int(_get(d, "width", where), "width", minimum=0),
            height=_int(_get(d, "height", where), "height", minimum=0),
            time=_float(_get(d, "time", where), "time"),
            encoding=_str(d.get("encoding", "jpeg"), "encoding"),
        )
