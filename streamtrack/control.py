"""Control channel: JSON commands over ZeroMQ (ROUTER server, REQ client).

The server is polled by the tracker loop (:meth:`ControlServer.poll_once`), so
handlers run on the tracker thread between frames and need no locking against the
engine. Every request is validated into a typed command before a handler sees it,
and every request gets exactly one JSON reply, ``{"ok": true, ...}`` or
``{"ok": false, "error": "..."}``: no input, however malformed or large, crashes
the server. JSON only, never pickle.
"""

from __future__ import annotations

import logging
import math
import numbers
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import numpy as np
import zmq

from streamtrack.errors import PromptError, UserError
from streamtrack.protocol import (
    ProtocolError,
    decode_mask,
    dumps,
    encode_mask,
    loads,
    validate_rle,
)
from streamtrack.publisher import ServerBinding, connect_socket
from streamtrack.tracking import MAX_OBJ_ID

if TYPE_CHECKING:
    from streamtrack.curve import CurveClient, CurveServer

log = logging.getLogger(__name__)

DEFAULT_CONTROL_ENDPOINT = "tcp://127.0.0.1:5556"
# Hard cap enforced by ZeroMQ: a bigger message drops the sender's connection before
# it is ever buffered whole, so a hostile client cannot make us allocate gigabytes.
DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024
# Soft cap checked here, below the hard one, so a merely too-large request still
# gets a readable error reply.
DEFAULT_MAX_REQUEST_BYTES = 4 * 1024 * 1024
MAX_POINTS = 64
MAX_COORD = 1e6  # pixels; far beyond any real frame, catches garbage like 1e300
_MAX_REQUEST_ID_LEN = 128
_MAX_INT_ID = 2**63  # request ids are echoed: keep them within what any client's JSON parser reads


def _shorten(value: Any, limit: int = 60) -> str:
    text = repr(value)
    size = len(value) if isinstance(value, (str, bytes)) else len(text)  # not repr's quotes
    return text if len(text) <= limit else f"{text[:limit]}... ({size} characters)"


class ControlError(UserError):
    """A control request failed: bad reply, server-side error, or unreachable server."""


class ControlTimeout(ControlError, TimeoutError):
    """No reply within the client's timeout (server down, busy or unreachable)."""


# ------------------------------------------------------------------------- commands


@dataclass(frozen=True)
class AddPrompt:
    """Add or refine object ``obj_id`` on the current frame.

    Points (with labels; 1 = foreground, 0 = background, default all 1), a box, or
    both; or a COCO-RLE mask alone. Coordinates are source-frame pixels.  ``new``: a new
    object, never a refinement: if ``obj_id`` is in use (another client made it first),
    the tracker gives this one the next free id and says which in the reply's ``obj_id``.
    """

    name: ClassVar[str] = "add_prompt"
    obj_id: int
    points: tuple[tuple[float, float], ...] | None = None
    labels: tuple[int, ...] | None = None
    box: tuple[float, float, float, float] | None = None
    mask: dict[str, Any] | None = None  # COCO RLE, already validated
    new: bool = False

    def mask_array(self) -> np.ndarray | None:
        """The mask prompt as a boolean HxW array (None if this prompt has no mask)."""
        return None if self.mask is None else decode_mask(self.mask)

    def to_request(self) -> dict[str, Any]:
        req: dict[str, Any] = {"cmd": self.name, "obj_id": self.obj_id}
        if self.points is not None:
            req["points"] = [list(p) for p in self.points]
            req["labels"] = list(self.labels or (1,) * len(self.points))
        if self.box is not None:
            req["box"] = list(self.box)
        if self.mask is not None:
            req["mask"] = dict(self.mask)
        if self.new:
            req["new"] = True
        return req


@dataclass(frozen=True)
class RemoveObject:
    name: ClassVar[str] = "remove_object"
    obj_id: int

    def to_request(self) -> dict[str, Any]:
        return {"cmd": self.name, "obj_id": self.obj_id}


@dataclass(frozen=True)
class Reset:
    """Forget every object (the stream keeps running)."""

    name: ClassVar[str] = "reset"

    def to_request(self) -> dict[str, Any]:
        return {"cmd": self.name}


@dataclass(frozen=True)
class Status:
    name: ClassVar[str] = "status"

    def to_request(self) -> dict[str, Any]:
        return {"cmd": self.name}


@dataclass(frozen=True)
class Pause:
    name: ClassVar[str] = "pause"

    def to_request(self) -> dict[str, Any]:
        return {"cmd": self.name}


@dataclass(frozen=True)
class Resume:
    name: ClassVar[str] = "resume"

    def to_request(self) -> dict[str, Any]:
        return {"cmd": self.name}


Command = AddPrompt | RemoveObject | Reset | Status | Pause | Resume


def _obj_id(value: Any) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise PromptError(f"obj_id must be a positive integer, got {value!r}")
    if not 1 <= int(value) <= MAX_OBJ_ID:
        raise PromptError(f"obj_id must be between 1 and {MAX_OBJ_ID}, got {value}")
    return int(value)


def _coord(value: Any, name: str) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise PromptError(f"{name} must be a number, got {value!r}")
    try:
        v = float(value)
    except OverflowError:  # an integer of hundreds of digits
        v = math.inf
    if not math.isfinite(v) and not isinstance(value, numbers.Integral):
        raise PromptError(f"{name} must be finite, got {value!r}")
    if not 0 <= v <= MAX_COORD:
        shown = f"a {len(str(value))}-digit integer" if v == math.inf else repr(value)
        raise PromptError(f"{name} must be a pixel coordinate from 0 to {MAX_COORD:g}, got {shown}")
    return v


def _parse_points(points: Any) -> tuple[tuple[float, float], ...]:
    if not isinstance(points, (list, tuple)):
        raise PromptError(f"points must be a list of [x, y], got {type(points).__name__}")
    if not points:
        raise PromptError("points must not be empty (omit the field instead)")
    if len(points) > MAX_POINTS:
        raise PromptError(f"at most {MAX_POINTS} points per prompt, got {len(points)}")
    out = []
    for i, p in enumerate(points):
        if not isinstance(p, (list, tuple)) or len(p) != 2:
            raise PromptError(f"points[{i}] must be [x, y], got {p!r}")
        out.append((_coord(p[0], f"points[{i}].x"), _coord(p[1], f"points[{i}].y")))
    return tuple(out)


def _parse_labels(labels: Any, n_points: int) -> tuple[int, ...]:
    if not isinstance(labels, (list, tuple)):
        raise PromptError(f"labels must be a list of 0/1, got {type(labels).__name__}")
    if len(labels) != n_points:
        raise PromptError(f"need one label per point: {n_points} points, {len(labels)} labels")
    for i, lab in enumerate(labels):
        # 1.0 or True are not labels: the wire format is exact.
        if isinstance(lab, bool) or not isinstance(lab, int) or lab not in (0, 1):
            raise PromptError(f"labels[{i}] must be 1 (foreground) or 0 (background), got {lab!r}")
    return tuple(int(lab) for lab in labels)


def _parse_box(box: Any) -> tuple[float, float, float, float]:
    if not isinstance(box, (list, tuple)) or len(box) != 4:
        raise PromptError(f"box must be [x0, y0, x1, y1], got {box!r}")
    x0, y0, x1, y1 = (_coord(v, f"box[{i}]") for i, v in enumerate(box))
    if not (x0 < x1 and y0 < y1):
        raise PromptError(f"box must have x0 < x1 and y0 < y1, got {list(box)}")
    return x0, y0, x1, y1


def _parse_mask(mask: Any) -> dict[str, Any]:
    try:
        rle = validate_rle(mask, "mask")
    except ProtocolError as exc:
        raise PromptError(f"{exc} (mask must be COCO RLE {{'size': [H, W], 'counts': str}})") \
            from exc
    if rle["size"][0] == 0 or rle["size"][1] == 0:
        raise PromptError("mask must not be empty (size 0)")
    return rle


_FIELDS: dict[str, frozenset[str]] = {
    "add_prompt": frozenset({"obj_id", "points", "labels", "box", "mask", "new"}),
    "remove_object": frozenset({"obj_id"}),
    "reset": frozenset(),
    "status": frozenset(),
    "pause": frozenset(),
    "resume": frozenset(),
}


def parse_command(request: Any) -> Command:
    """Validate a decoded JSON request into a typed command.

    Raises :class:`PromptError` (a :class:`UserError`) naming the bad field. The
    envelope fields ``cmd`` and ``id`` (a request id echoed in the reply) are
    accepted on every command; any other unknown field is an error, so a typo such
    as ``"boxes"`` is reported instead of silently ignored.
    """
    if not isinstance(request, Mapping):
        raise PromptError(f"request must be a JSON object, got {type(request).__name__}")
    cmd = request.get("cmd")
    if not isinstance(cmd, str):
        raise PromptError(f"request needs a string field 'cmd', one of {sorted(_FIELDS)}")
    if cmd not in _FIELDS:
        raise PromptError(f"unknown cmd {cmd!r}; expected one of {sorted(_FIELDS)}")
    unknown = set(request) - _FIELDS[cmd] - {"cmd", "id"}
    if unknown:
        raise PromptError(
            f"{cmd}: unknown field(s) {sorted(map(str, unknown))}; allowed: "
            f"{sorted(_FIELDS[cmd])}"
        )
    if cmd == "add_prompt":
        if "obj_id" not in request:
            raise PromptError("add_prompt needs obj_id")
        obj_id = _obj_id(request["obj_id"])
        points = request.get("points")
        labels = request.get("labels")
        box = request.get("box")
        mask = request.get("mask")
        if labels is not None and points is None:
            raise PromptError("labels given without points")
        if points is None and box is None and mask is None:
            raise PromptError("add_prompt needs points, a box, or a mask")
        if mask is not None and (points is not None or box is not None):
            raise PromptError("a mask prompt cannot be combined with points or a box")
        new = request.get("new", False)
        if not isinstance(new, bool):
            raise PromptError(f"add_prompt: new must be true or false, got {new!r}")
        pts = None if points is None else _parse_points(points)
        labs = None
        if pts is not None:
            labs = (1,) * len(pts) if labels is None else _parse_labels(labels, len(pts))
        return AddPrompt(
            obj_id=obj_id,
            points=pts,
            labels=labs,
            box=None if box is None else _parse_box(box),
            mask=None if mask is None else _parse_mask(mask),
            new=new,
        )
    if cmd == "remove_object":
        if "obj_id" not in request:
            raise PromptError("remove_object needs obj_id")
        return RemoveObject(obj_id=_obj_id(request["obj_id"]))
    return {"reset": Reset, "status": Status, "pause": Pause, "resume": Resume}[cmd]()


# -------------------------------------------------------------------------- handler


class ControlHandler(Protocol):
    """What the tracker implements. Each method returns extra reply fields (or None).

    Raise :class:`UserError` (e.g. :class:`PromptError`) for a request that cannot
    be honoured: its message becomes the reply's ``error``.
    """

    def add_prompt(self, cmd: AddPrompt) -> Mapping[str, Any] | None: ...

    def remove_object(self, obj_id: int) -> Mapping[str, Any] | None: ...

    def reset(self) -> Mapping[str, Any] | None: ...

    def status(self) -> Mapping[str, Any] | None: ...

    def pause(self) -> Mapping[str, Any] | None: ...

    def resume(self) -> Mapping[str, Any] | None: ...


def dispatch(handler: ControlHandler, cmd: Command) -> Mapping[str, Any] | None:
    if isinstance(cmd, AddPrompt):
        return handler.add_prompt(cmd)
    if isinstance(cmd, RemoveObject):
        return handler.remove_object(cmd.obj_id)
    method: Callable[[], Mapping[str, Any] | None] = getattr(handler, cmd.name)
    return method()


# --------------------------------------------------------------------------- server


class ControlServer:
    """ROUTER socket answering control requests; call :meth:`poll_once` from the
    tracker loop (it never blocks longer than the timeout it is given).

    Accepts REQ clients (``[id, b"", body]``) and DEALER clients (``[id, body]`` or
    with the empty delimiter).
    """

    def __init__(
        self,
        endpoint: str | int = DEFAULT_CONTROL_ENDPOINT,
        handler: ControlHandler | None = None,
        *,
        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        context: zmq.Context | None = None,
        curve: CurveServer | None = None,
    ) -> None:
        if handler is None:
            raise TypeError("ControlServer needs a handler")
        self.handler = handler
        self.max_request_bytes = min(max_request_bytes, max_message_bytes)
        ctx = context or zmq.Context.instance()
        self._sock = ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
        self._binding = ServerBinding(self._sock, endpoint, "control", curve, ctx)
        self.endpoint = self._binding.endpoint
        self.handled = 0
        self.rejected = 0

    def poll_once(self, timeout_ms: int = 0, max_requests: int = 32, budget_s: float | None = None) -> int:
        """Answer the requests waiting now (waiting up to ``timeout_ms`` for the first).

        Returns how many requests were answered.  ``max_requests`` and ``budget_s``
        (seconds, checked after each request) bound the time spent here, so a flood of
        requests, or of slow ones, cannot stall the tracker: the rest wait their turn.
        """
        if self._sock.closed or not self._sock.poll(timeout_ms, zmq.POLLIN):
            return 0
        deadline = None if budget_s is None else time.monotonic() + budget_s
        n = 0
        while n < max_requests and (deadline is None or n == 0 or time.monotonic() < deadline):
            try:
                parts = self._sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            self._answer(parts)
            n += 1
        return n

    def serve(self, stop: threading.Event, poll_ms: int = 50) -> None:
        """Answer requests until ``stop`` is set (for a dedicated thread or tests)."""
        while not stop.is_set():
            self.poll_once(poll_ms)

    def _answer(self, parts: list[bytes]) -> None:
        # Routing envelope: everything up to and including the first empty frame
        # (REQ, possibly through proxies); a bare DEALER has just its identity.
        try:
            cut = parts.index(b"", 1) + 1
        except ValueError:
            cut = 1
        envelope, body = parts[:cut], parts[cut:]
        reply = self.handle_bytes(body)
        try:
            self._sock.send_multipart([*envelope, reply], flags=zmq.NOBLOCK)
        except zmq.ZMQError as exc:  # peer gone or its queue full: nothing to answer to
            log.debug("control reply dropped: %s", exc)

    def handle_bytes(self, body: list[bytes]) -> bytes:
        """Turn one request body (message parts after the envelope) into reply bytes."""
        request_id = None
        try:
            if len(body) != 1:
                raise PromptError(f"request must be one JSON message part, got {len(body)}")
            data = body[0]
            if len(data) > self.max_request_bytes:
                raise PromptError(
                    f"request too large: {len(data)} bytes (limit {self.max_request_bytes})"
                )
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise PromptError("request is not UTF-8 JSON") from exc
            try:
                request = loads(text)
            except ProtocolError as exc:
                raise PromptError(str(exc)) from exc
            if isinstance(request, Mapping) and request.get("id") is not None:
                request_id = self._request_id(request["id"])
            result = self.execute(request)
            reply: dict[str, Any] = {"ok": True}
            if result is not None:
                if not isinstance(result, Mapping):
                    raise TypeError(f"handler returned {type(result).__name__}, not a dict")
                reply.update(result)
                reply["ok"] = bool(reply.get("ok", True))
            self.handled += 1
        except UserError as exc:
            reply = {"ok": False, "error": str(exc)}
            self.rejected += 1
        except Exception as exc:  # a handler bug must not take the tracker down
            log.exception("control handler failed")
            reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
            self.rejected += 1
        if request_id is not None:
            reply["id"] = request_id
        try:
            return dumps(reply).encode()
        except ProtocolError as exc:
            fallback = {"ok": False, "error": f"handler reply is not JSON: {exc}"}
            if request_id is not None:
                fallback["id"] = request_id
            return dumps(fallback).encode()

    def execute(self, request: Any) -> Mapping[str, Any] | None:
        """Validate one decoded request and run it on the handler.  A server for
        another command set (the fleet's) overrides this and keeps the rest."""
        return dispatch(self.handler, parse_command(request))

    @staticmethod
    def _request_id(value: Any) -> str | int:
        """The request's ``id``, echoed in the reply; one that cannot be echoed safely
        is refused rather than dropped, so a pipelining client never gets an answer it
        cannot match."""
        if isinstance(value, int) and not isinstance(value, bool) and -_MAX_INT_ID <= value < _MAX_INT_ID:
            return value
        if isinstance(value, str) and len(value) <= _MAX_REQUEST_ID_LEN:
            try:
                value.encode("utf-8")  # a lone surrogate (valid JSON escape) is not text
            except UnicodeEncodeError:
                pass
            else:
                return value
        raise PromptError(f"id must be a string of up to {_MAX_REQUEST_ID_LEN} characters or a "
                          f"64-bit integer, got {_shorten(value)}")

    def close(self) -> None:
        self._binding.close()

    def __enter__(self) -> ControlServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------- client


_MAX_TIMEOUT = (2**31 - 1) // 1000  # seconds


class ControlClient:
    """Send control requests; never hangs.

    A REQ socket would be stuck after an unanswered request, so on timeout it is
    thrown away and a fresh one is made for the next request.
    """

    def __init__(
        self,
        endpoint: str | int = DEFAULT_CONTROL_ENDPOINT,
        timeout: float = 2.0,
        *,
        context: zmq.Context | None = None,
        curve: CurveClient | None = None,
    ) -> None:
        # ZeroMQ takes the timeout as a 32-bit count of milliseconds.
        if not 0 < timeout <= _MAX_TIMEOUT:
            raise UserError(f"control timeout must be > 0 and at most {_MAX_TIMEOUT:,} seconds "
                            f"(about 24 days), got {timeout!r}")
        self.timeout = float(timeout)
        # Keys are read once, here, so a bad key file fails before the first request.
        self._curve = None if curve is None else curve.load()
        self._ctx = context or zmq.Context.instance()
        self._endpoint = endpoint
        self._sock: zmq.Socket | None = None
        self._closed = False
        self.endpoint = self._connect()  # validates the endpoint now, not at first use

    def _connect(self) -> str:
        sock = self._ctx.socket(zmq.REQ)
        sock.setsockopt(zmq.LINGER, 0)
        ms = max(1, int(self.timeout * 1000))
        sock.setsockopt(zmq.SNDTIMEO, ms)
        sock.setsockopt(zmq.RCVTIMEO, ms)
        try:
            if self._curve is not None:
                self._curve.apply(sock)
            ep = connect_socket(sock, self._endpoint, "control client")
        except BaseException:
            sock.close(linger=0)
            raise
        self._sock = sock
        return ep

    def _drop_socket(self) -> None:
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None

    def request(self, request: Mapping[str, Any]) -> dict[str, Any]:
        """Send one JSON request and return the server's reply dict as is.

        Raises :class:`ControlTimeout` if no reply comes within ``timeout`` seconds
        and :class:`ControlError` if the reply is not a JSON object.
        """
        if self._closed:
            raise RuntimeError("this ControlClient is closed")
        payload = dumps(dict(request)).encode()
        if self._sock is None:  # dropped after a timeout or an error: a fresh REQ socket
            self._connect()
        assert self._sock is not None
        raw: bytes | None = None
        try:
            self._sock.send(payload)
            if self._sock.poll(int(self.timeout * 1000), zmq.POLLIN):
                raw = self._sock.recv()
        except zmq.Again:
            pass  # send or recv timed out: same as no reply
        except zmq.ZMQError as exc:
            self._drop_socket()
            raise ControlError(f"control request to {self.endpoint} failed: {exc}") from exc
        if raw is None:
            self._drop_socket()
            # ZeroMQ drops a client that fails CURVE authentication without a word,
            # so a timeout is all such a client ever sees: name that cause too.
            hint = ("is the tracker running with --control on this endpoint, and is this "
                    "client's public key in its --curve-clients folder and --curve-server-key "
                    "its server.key?" if self._curve is not None else
                    "is a tracker running with --control on this endpoint (or a fleet, with its "
                    "control endpoint)? A tracker that requires CURVE authentication answers "
                    "only clients with authorised keys")
            # A tracker answers after its frame in hand: a slow one may yet carry it out.
            hint += ("; a tracker busy with a slow frame answers later and may still carry the "
                     "request out: raise the timeout for one that takes seconds per frame")
            raise ControlTimeout(
                f"no reply from control server {self.endpoint} within {self.timeout:g} s ({hint})"
            )
        try:
            reply = loads(raw)
        except ProtocolError as exc:
            raise ControlError(f"control server sent an invalid reply: {exc}") from exc
        if not isinstance(reply, dict) or not isinstance(reply.get("ok"), bool):
            raise ControlError(f"control server sent an invalid reply: {reply!r}")
        return reply

    def send(self, cmd: Command) -> dict[str, Any]:
        """Send a typed command; raise :class:`ControlError` if the server says no."""
        reply = self.request(cmd.to_request())
        if not reply["ok"]:
            raise ControlError(f"{cmd.name} failed: {reply.get('error', 'unknown error')}")
        return reply

    def add_prompt(
        self,
        obj_id: int,
        points: Any = None,
        labels: Any = None,
        box: Any = None,
        mask: Any = None,
    ) -> dict[str, Any]:
        """Prompt an object. ``mask`` may be a boolean HxW array or a COCO RLE dict.

        The request is validated here first, so a bad prompt fails before it is sent.
        """
        req: dict[str, Any] = {"cmd": "add_prompt", "obj_id": obj_id}
        # Arrays and tuples become JSON lists; values keep their type, so the same
        # validation as on the server decides (e.g. a float label is refused).
        try:
            pairs = None if points is None else np.asarray(points, dtype=float)
            if labels is not None:
                req["labels"] = np.asarray(labels).reshape(-1).tolist()
            if box is not None:
                req["box"] = np.asarray(box, dtype=float).reshape(-1).tolist()
        except (TypeError, ValueError) as exc:
            raise PromptError(f"add_prompt: cannot read points/labels/box: {exc}") from exc
        if pairs is not None:
            if pairs.ndim != 2 or pairs.shape[1] != 2:
                # (x, y, label) triples would otherwise be read as other points
                raise PromptError(
                    f"object {obj_id}: points are a list of (x, y) pairs, e.g. [[40, 30]], with "
                    f"their labels apart (labels=[1]); got an array of shape {pairs.shape}")
            req["points"] = pairs.tolist()
        if mask is not None:
            req["mask"] = mask if isinstance(mask, Mapping) else encode_mask(mask)
        return self.send(parse_command(req))

    def remove_object(self, obj_id: int) -> dict[str, Any]:
        return self.send(RemoveObject(obj_id=_obj_id(obj_id)))

    def reset(self) -> dict[str, Any]:
        return self.send(Reset())

    def status(self) -> dict[str, Any]:
        return self.send(Status())

    def pause(self) -> dict[str, Any]:
        return self.send(Pause())

    def resume(self) -> dict[str, Any]:
        return self.send(Resume())

    def close(self) -> None:
        self._closed = True
        self._drop_socket()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
