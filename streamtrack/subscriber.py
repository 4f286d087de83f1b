"""ZeroMQ SUB side with newest-only delivery.

A receive thread drains the socket as fast as messages arrive and keeps only the
newest message per topic, so a slow consumer (a viewer drawing at 10 fps, a user's
script doing heavy work) never builds a backlog, never sees stale masks and never
slows the tracker. Status events are the exception: they are rare and each one
matters, so they go to a small bounded queue instead of being overwritten.

    from streamtrack.subscriber import Subscriber
    with Subscriber("tcp://127.0.0.1:5555") as sub:
        for msg in sub: print(msg.result.frame_id, [o.obj_id for o in msg.result.objects])
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from functools import partial
from typing import TYPE_CHECKING

import numpy as np
import zmq

from streamtrack.errors import UserError
from streamtrack.protocol import (
    FrameHeader,
    FrameResult,
    ObjectResult,
    ProtocolError,
    Stats,
    StatusEvent,
    decode_mask,
    normalize_endpoint,
    now,
    parse_topic,
)
from streamtrack.publisher import connect_socket, warn_unreachable

if TYPE_CHECKING:
    from streamtrack.curve import CurveClient

log = logging.getLogger(__name__)

DEFAULT_SUBSCRIBE_ENDPOINT = "tcp://127.0.0.1:5555"
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # a 4K frame with many complex masks fits
_POLL_MS = 50  # how long the receive thread waits before re-checking for close()


@dataclass(frozen=True)
class Message:
    """One received message. Exactly one of ``result``/``status``/``stats``/``jpeg``
    is set, according to ``kind`` (``masks``/``status``/``stats``/``frames``).

    ``skipped`` counts the messages of this stream and kind that were never handed to
    the consumer before this one (lost on the network or replaced by a newer one
    while the consumer was busy); it is 0 when the consumer keeps up.
    """

    topic: str
    kind: str
    stream: str
    received: float
    result: FrameResult | None = None
    status: StatusEvent | None = None
    stats: Stats | None = None
    frame: FrameHeader | None = None
    jpeg: bytes | None = None
    skipped: int = 0

    @property
    def seq(self) -> int | None:
        return None if self.result is None else self.result.seq

    @property
    def objects(self) -> tuple[ObjectResult, ...]:
        return () if self.result is None else self.result.objects

    def mask(self, obj_id: int) -> np.ndarray | None:
        """Boolean HxW mask of ``obj_id``, decoded now (None if absent or sent without RLE)."""
        if self.result is None:
            return None
        obj = self.result.object(obj_id)
        return None if obj is None or obj.rle is None else decode_mask(obj.rle)

    def masks(self) -> dict[int, np.ndarray]:
        """All objects' masks, decoded now."""
        return {o.obj_id: decode_mask(o.rle) for o in self.objects if o.rle is not None}

    def image(self) -> np.ndarray | None:
        """The RGB uint8 frame of a ``frames/`` message."""
        if self.jpeg is None:
            return None
        import cv2

        bgr = cv2.imdecode(np.frombuffer(self.jpeg, dtype=np.uint8), cv2.IMREAD_COLOR)
        return None if bgr is None else bgr[..., ::-1].copy()

    def latency(self) -> float | None:
        """Capture→receive seconds of a masks message (same-machine clocks)."""
        if self.result is None or self.result.t.capture is None:
            return None
        return self.received - self.result.t.capture


@dataclass
class StreamCounters:
    """What happened to one stream's masks messages on this subscriber."""

    received: int = 0
    missed: int = 0  # seq numbers that never arrived (dropped by ZeroMQ / network)
    superseded: int = 0  # arrived but replaced by a newer one before the consumer read it
    restarts: int = 0  # seq went backwards: the publisher restarted
    last_seq: int | None = None

    @property
    def gaps(self) -> int:
        """Messages the consumer never saw, for any reason."""
        return self.missed + self.superseded


@dataclass
class _Slot:
    msg: Message
    pending: bool = True
    seq_delivered: int | None = None
    skipped: int = 0  # superseded since the last delivery


@dataclass
class _State:
    slots: dict[str, _Slot] = field(default_factory=dict)
    order: OrderedDict[str, None] = field(default_factory=OrderedDict)  # pending, oldest first
    status: deque[Message] = field(default_factory=lambda: deque(maxlen=256))
    counters: dict[str, StreamCounters] = field(default_factory=dict)
    last_masks: Message | None = None
    malformed: int = 0
    status_overflow: int = 0


class Subscriber:
    """Subscribe to one or many publishers; newest-only delivery per topic.

    ``topics`` are ZeroMQ prefix filters: ``"masks/"`` (all streams' results),
    ``"masks/cam0"``, ``"status/"``, ``"stats/"``, ``"frames/"``. Use as a context
    manager or call :meth:`close`.
    """

    def __init__(
        self,
        endpoints: str | int | Iterable[str | int] = DEFAULT_SUBSCRIBE_ENDPOINT,
        topics: str | Iterable[str] = ("masks/",),
        *,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        rcvhwm: int = 64,
        validate_masks: bool = False,
        context: zmq.Context | None = None,
        curve: CurveClient | None = None,
        follow: Callable[[], list[str]] | None = None,
        follow_interval: float = 1.0,
    ) -> None:
        """``follow``: returns the endpoints to be connected to now; the receive thread
        calls it every ``follow_interval`` seconds and connects to new endpoints and
        disconnects from gone ones (a fleet's streams start, move to other nodes, end)."""
        from streamtrack.fleet_directory import is_directory_file

        if isinstance(endpoints, (bytes, bytearray)):  # iterated, each byte would be a port
            raise UserError(f"Subscriber endpoints are strings such as 'tcp://127.0.0.1:5555' or "
                            f"port numbers, got bytes {bytes(endpoints)!r}: decode them")
        if is_directory_file(endpoints):  # a fleet's directory file: all its streams
            endpoints, listing = _fleet_listing(str(endpoints), None)
            follow = follow or listing
        if isinstance(endpoints, (str, int)):
            endpoints = [endpoints]
        elif not isinstance(endpoints, Iterable):
            raise UserError(f"Subscriber endpoints are strings such as 'tcp://127.0.0.1:5555' or "
                            f"port numbers, got {endpoints!r}")
        topics = _topic_list(topics)
        if isinstance(rcvhwm, bool) or not isinstance(rcvhwm, int) or rcvhwm < 0:  # not ZeroMQ's EINVAL
            raise UserError(f"Subscriber rcvhwm must be an integer >= 0 (0: no limit), got {rcvhwm!r}")
        # Masks are validated when decoded (decode_mask); checking every RLE of every
        # message in the receive thread would only slow down the drain.
        self._validate_masks = validate_masks
        ctx = context or zmq.Context.instance()
        sock = ctx.socket(zmq.SUB)
        try:
            sock.setsockopt(zmq.LINGER, 0)
            # Small queue: only the newest message matters, and a receive thread that
            # falls behind should lose old messages (counted as missed), not pile up
            # hundreds of megabytes of masks.
            sock.setsockopt(zmq.RCVHWM, rcvhwm)
            # Bounds memory per message; an oversized message drops the connection.
            sock.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
            for t in topics:
                sock.setsockopt(zmq.SUBSCRIBE, t.encode())
            if curve is not None:  # encrypted, authenticated connection to a CURVE publisher
                curve.load().apply(sock)
            self.endpoints = [connect_socket(sock, ep, "subscriber") for ep in endpoints]
        except BaseException:
            sock.close(linger=0)
            raise
        if not self.endpoints and follow is None:  # following: endpoints may come later
            sock.close(linger=0)
            raise UserError("Subscriber needs at least one endpoint")
        # ZeroMQ connects in the background and retries forever, so a mistyped host
        # would look like a publisher with nothing to say: say so (off the caller's
        # thread: a name lookup can take seconds).
        threading.Thread(target=warn_unreachable, args=(list(self.endpoints), "subscriber"),
                         name="streamtrack-subscriber-check", daemon=True).start()
        self.topics = tuple(topics)
        self._follow = follow
        self._follow_interval = follow_interval
        self._cond = threading.Condition()
        self._state = _State()
        self._stop = threading.Event()
        # The socket now belongs to the receive thread alone (ZeroMQ sockets are not
        # thread-safe); it closes the socket on the way out.
        self._thread = threading.Thread(
            target=self._run, args=(sock,), name="streamtrack-subscriber", daemon=True
        )
        self._thread.start()

    @classmethod
    def from_fleet(cls, fleet: str, streams: list[str] | None = None, *, follow: bool = True,
                   **kwargs) -> Subscriber:
        """Subscribe to the streams of a ``streamtrack fleet`` (all, or ``streams``), listed
        by the fleet's directory file (e.g. ``fleet.json``) or, from another machine, by
        its control endpoint (``fleet.control``, e.g. ``tcp://head:41003``).  ``follow``:
        keep to what the fleet lists: a stream that moves to another node, or is added,
        is connected to within a second or so."""
        endpoints, listing = _fleet_listing(fleet, streams)
        return cls(endpoints, follow=listing if follow else None, **kwargs)

    # ----------------------------------------------------------- receive thread
    def _run(self, sock: zmq.Socket) -> None:
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        next_follow = time.monotonic() + self._follow_interval
        try:
            while not self._stop.is_set():
                if self._follow is not None and time.monotonic() >= next_follow:
                    self._follow_endpoints(sock)
                    next_follow = time.monotonic() + self._follow_interval
                if not poller.poll(_POLL_MS):
                    continue
                # Drain everything queued, then publish to consumers once.
                batch = []
                while len(batch) < 1000:
                    try:
                        batch.append(sock.recv_multipart(zmq.NOBLOCK))
                    except zmq.Again:
                        break
                self._ingest(batch)
        except zmq.ZMQError as exc:  # context terminated under us
            log.debug("subscriber thread stopping: %s", exc)
        finally:
            sock.close(linger=0)
            with self._cond:
                self._cond.notify_all()

    def _follow_endpoints(self, sock: zmq.Socket) -> None:
        """Connect to the endpoints ``follow`` lists now and disconnect from the others
        (on the receive thread, which owns the socket)."""
        try:
            wanted = [normalize_endpoint(ep) for ep in self._follow()]
        except (UserError, ValueError) as exc:  # the fleet is busy or gone: keep what we have
            log.debug("subscriber: endpoint list unavailable (%s)", exc)
            return
        connected = []
        for ep in self.endpoints:
            if ep in wanted:
                connected.append(ep)
            else:
                with contextlib.suppress(zmq.ZMQError):  # never connected: nothing to undo
                    sock.disconnect(ep)
                log.info("subscriber: disconnected from %s", ep)
        for ep in wanted:
            if ep not in connected:
                try:
                    connected.append(connect_socket(sock, ep, "subscriber"))
                except UserError as exc:
                    log.warning("subscriber: %s", exc)
                    continue
                log.info("subscriber: connected to %s", ep)
        self.endpoints = connected

    def _parse(self, parts: list[bytes], received: float) -> Message:
        if len(parts) < 2:
            raise ProtocolError(f"expected [topic, header, ...], got {len(parts)} part(s)")
        topic = parts[0].decode("ascii", errors="replace")
        kind, stream = parse_topic(parts[0])
        if kind == "masks":
            result = FrameResult.from_json(parts[1], validate_masks=self._validate_masks)
            return Message(topic, kind, stream, received, result=result)
        if kind == "status":
            return Message(topic, kind, stream, received, status=StatusEvent.from_json(parts[1]))
        if kind == "stats":
            return Message(topic, kind, stream, received, stats=Stats.from_json(parts[1]))
        if len(parts) != 3:
            raise ProtocolError("frames message must be [topic, header, jpeg]")
        return Message(topic, kind, stream, received, frame=FrameHeader.from_json(parts[1]),
                       jpeg=parts[2])

    def _ingest(self, batch: list[list[bytes]]) -> None:
        received = now()
        parsed: list[Message] = []
        bad = 0
        for parts in batch:
            try:
                parsed.append(self._parse(parts, received))
            except Exception as exc:  # one bad message must not kill the receive thread
                bad += 1
                log.warning("dropping malformed message: %s", exc)
        with self._cond:
            st = self._state
            st.malformed += bad
            for msg in parsed:
                if msg.kind == "status":
                    if len(st.status) == st.status.maxlen:
                        st.status_overflow += 1
                    st.status.append(msg)
                    continue
                if msg.result is not None:
                    self._count_seq(msg)
                    st.last_masks = msg
                slot = st.slots.get(msg.topic)
                if slot is None:
                    st.slots[msg.topic] = _Slot(msg)
                else:
                    if slot.pending:
                        slot.skipped += 1
                        if msg.result is not None:
                            st.counters[msg.stream].superseded += 1
                    slot.msg = msg
                    slot.pending = True
                # A pending topic keeps its turn when a newer message replaces it: moved to
                # the back, the frequent masks would always queue behind the rare stats,
                # and a loop slower than the stats interval would get nothing else.
                if msg.topic not in st.order:
                    st.order[msg.topic] = None
            if parsed:
                self._cond.notify_all()

    def _count_seq(self, msg: Message) -> None:
        assert msg.result is not None
        c = self._state.counters.setdefault(msg.stream, StreamCounters())
        seq = msg.result.seq
        c.received += 1
        if c.last_seq is not None:
            if seq > c.last_seq + 1:
                c.missed += seq - c.last_seq - 1
            elif seq <= c.last_seq:
                # A restarted tracker (supervisor) starts counting again.
                c.restarts += 1
        c.last_seq = seq

    # ------------------------------------------------------------------ consumer
    def _pop_pending(self) -> Message | None:
        st = self._state
        if st.status:
            return st.status.popleft()
        while st.order:
            topic, _ = st.order.popitem(last=False)
            slot = st.slots[topic]
            if not slot.pending:
                continue
            slot.pending = False
            skipped = slot.skipped
            seq = slot.msg.seq
            if seq is not None and slot.seq_delivered is not None and seq > slot.seq_delivered:
                # Count from seq: covers network losses as well as superseded ones.
                skipped = seq - slot.seq_delivered - 1
            slot.skipped = 0
            if seq is not None:
                slot.seq_delivered = seq
            msg = slot.msg
            if skipped != msg.skipped:
                msg = replace(msg, skipped=skipped)
            return msg
        return None

    def recv(self, timeout: float | None = None) -> Message | None:
        """The next message not yet handed out (newest per topic), waiting up to
        ``timeout`` seconds (None = until one arrives or the subscriber closes)."""
        with self._cond:
            ok = self._cond.wait_for(
                lambda: bool(self._state.order or self._state.status) or self.closed,
                timeout=timeout,
            )
            if not ok:
                return None
            return self._pop_pending()

    def latest(self, stream: str | None = None, timeout: float = 0.0,
               after_seq: int | None = None) -> Message | None:
        """The newest masks message (of ``stream``, or of any stream), handed out or
        not; waits up to ``timeout`` seconds if none has arrived yet.  With
        ``after_seq``, only a message whose ``seq`` is greater counts (e.g. the first
        result after a restart, or after one already seen)."""

        def find() -> Message | None:
            st = self._state
            if stream is None:
                msg = st.last_masks
            else:
                slot = st.slots.get(f"masks/{stream}")
                msg = None if slot is None else slot.msg
            if msg is not None and after_seq is not None and not msg.seq > after_seq:
                return None
            return msg

        with self._cond:
            self._cond.wait_for(lambda: find() is not None or self.closed, timeout=timeout)
            return find()

    def __iter__(self) -> Iterator[Message]:
        """Yield new messages until :meth:`close` (newest-only per topic).  The loop waits
        as long as no message comes (no publisher yet, or one that stopped): use
        :meth:`recv` with a timeout to wait a bounded time."""
        self._check_open()
        while not self.closed:
            msg = self.recv(timeout=0.25)
            if msg is not None:
                yield msg

    def counters(self, stream: str) -> StreamCounters:
        """A snapshot of ``stream``'s masks counters (zeros if never seen)."""
        with self._cond:
            c = self._state.counters.get(stream, StreamCounters())
            return StreamCounters(**c.__dict__)

    @property
    def malformed(self) -> int:
        with self._cond:
            return self._state.malformed

    @property
    def closed(self) -> bool:
        return self._stop.is_set() or not self._thread.is_alive()

    def close(self, timeout: float = 2.0) -> None:
        """Stop the receive thread (within one poll interval) and close the socket."""
        self._stop.set()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)
        with self._cond:
            self._cond.notify_all()

    def _check_open(self) -> None:
        if self.closed:
            raise RuntimeError("this Subscriber is closed; make a new one")

    def __enter__(self) -> Subscriber:
        self._check_open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _topic_list(topics) -> list[str]:
    """Topic filters as strings (bytes, as pyzmq spells them, are accepted)."""
    if isinstance(topics, (str, bytes)):
        topics = [topics]
    elif not isinstance(topics, Iterable):
        raise UserError(f"topic filters are strings such as 'masks/', got {topics!r}")
    out = []
    for t in topics:
        if isinstance(t, bytes):
            t = t.decode("ascii", errors="strict") if t.isascii() else None
        if not isinstance(t, str):
            raise UserError(f"topic filters are strings such as 'masks/', got {topics!r}")
        out.append(t)
    if not out:
        raise UserError("Subscriber needs at least one topic filter")
    return out


def _fleet_listing(fleet: str, streams: list[str] | None) -> tuple[list[str], Callable[[], list[str]]]:
    """A fleet's publish endpoints now (none yet while its streams start; a
    :class:`UserError` if it lists none that will have one), and how to list them again
    later (an empty list then, not an error: the fleet may be restarting)."""
    from streamtrack.fleet_directory import publish_endpoints

    return publish_endpoints(fleet, streams), partial(publish_endpoints, fleet, streams, require=False)
