"""Publisher/Subscriber/control over real ZeroMQ sockets on 127.0.0.1 and ipc://."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq

from streamtrack.control import (
    AddPrompt,
    ControlClient,
    ControlError,
    ControlServer,
    ControlTimeout,
    parse_command,
)
from streamtrack.errors import PromptError, UserError
from streamtrack.protocol import FrameResult, ObjectResult, Stats, decode_mask, encode_mask
from streamtrack.publisher import CLOSE_FLUSH_MS, Publisher, StatsWindow
from streamtrack.subscriber import Subscriber

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

ANY_PORT = "tcp://127.0.0.1:0"


def _result(seq: int, stream: str = "cam0", mask: np.ndarray | None = None) -> FrameResult:
    objects = []
    if mask is not None:
        objects.append(ObjectResult.from_mask(1, mask, score=0.9))
    return FrameResult(stream=stream, seq=seq, frame_id=seq, pts=seq / 30, width=32, height=24,
                       t={"capture": time.time()}, objects=objects)


def _sync(pub: Publisher, sub: Subscriber, stream: str = "cam0") -> int:
    """Publish until the subscriber sees a message (ZeroMQ's slow-joiner window).

    Returns the next free seq number and leaves nothing pending on the subscriber.
    """
    deadline = time.monotonic() + 5
    seq = 0
    while time.monotonic() < deadline:
        pub.publish_result(_result(seq, stream))
        seq += 1
        msg = sub.latest(stream, timeout=0.05)
        if msg is not None:
            while sub.recv(timeout=0.05) is not None:
                pass
            return seq
    raise AssertionError("subscriber never connected")


@pytest.fixture
def pub() -> Iterator[Publisher]:
    p = Publisher(ANY_PORT, "cam0")
    yield p
    p.close()


# ------------------------------------------------------------------------ pub/sub


def test_pub_sub_round_trip_with_topic_and_publish_time(pub: Publisher) -> None:
    mask = np.zeros((24, 32), bool)
    mask[5:15, 3:20] = True
    with Subscriber(pub.endpoint) as sub:
        seq = _sync(pub, sub)
        before = time.time()
        sent = pub.publish_result(_result(seq, mask=mask))
        msg = sub.recv(timeout=2)
    assert msg is not None
    assert msg.topic == "masks/cam0" and msg.kind == "masks" and msg.stream == "cam0"
    assert msg.result == sent
    assert sent.t.publish is not None and before <= sent.t.publish <= msg.received
    assert msg.seq == seq and msg.skipped == 0
    np.testing.assert_array_equal(msg.mask(1), mask)
    np.testing.assert_array_equal(msg.masks()[1], mask)
    assert msg.mask(2) is None
    assert msg.latency() is not None and msg.latency() >= 0


def test_slow_subscriber_sees_only_the_newest(pub: Publisher) -> None:
    with Subscriber(pub.endpoint) as sub:
        seq = _sync(pub, sub)
        first = seq
        for _ in range(200):  # the consumer is "asleep" while these go out
            pub.publish_result(_result(seq))
            seq += 1
        # The newest is sent after a pause so that ZeroMQ's own high-water-mark drops
        # (allowed, and counted as missed) cannot hit it on a loaded machine.
        time.sleep(0.1)
        pub.publish_result(_result(seq))
        last = seq
        deadline = time.monotonic() + 5
        while sub.counters("cam0").last_seq != last and time.monotonic() < deadline:
            time.sleep(0.02)
        msg = sub.recv(timeout=2)
        assert msg is not None and msg.seq == last
        assert msg.skipped == last - first  # everything between was never handed out
        assert sub.recv(timeout=0.2) is None  # no backlog behind it
        counters = sub.counters("cam0")
        assert counters.gaps > 0
        assert counters.gaps == counters.missed + counters.superseded
        assert sub.latest("cam0") is msg or sub.latest("cam0").seq == last


def test_a_slow_loop_on_masks_and_stats_gets_both_in_turn(pub: Publisher) -> None:
    """Masks come 30 times per stats message: a loop slower than the stats interval must
    still get the newest masks, not the stats alone (a pending topic keeps its turn
    when a newer message replaces it)."""
    with Subscriber(pub.endpoint, topics=("masks/", "stats/")) as sub:
        seq = _sync(pub, sub)
        kinds = []
        for _ in range(3):  # the loop body sleeps while these arrive
            pub.publish_result(_result(seq))
            pub.publish_stats(StatsWindow(stream="cam0").snapshot(memory_bytes=1))
            pub.publish_result(_result(seq + 1))
            seq += 2
            deadline = time.monotonic() + 5
            while sub.counters("cam0").last_seq != seq - 1 and time.monotonic() < deadline:
                time.sleep(0.02)
            kinds.append([sub.recv(timeout=2).kind, sub.recv(timeout=2).kind])
    assert kinds == [["masks", "stats"]] * 3


def test_gap_detection_counts_missing_seq_and_restarts(pub: Publisher) -> None:
    with Subscriber(pub.endpoint) as sub:
        seq = _sync(pub, sub)
        for s in (seq, seq + 4, seq + 5):  # seq+1..seq+3 "lost on the network"
            pub.publish_result(_result(s))
            assert sub.recv(timeout=2).seq == s
        assert sub.counters("cam0").missed == 3
        pub.publish_result(_result(0))  # the tracker restarted
        assert sub.recv(timeout=2).seq == 0
        c = sub.counters("cam0")
        assert c.restarts == 1 and c.missed == 3 and c.superseded == 0


def test_multi_endpoint_subscribe_and_status_stats(tmp_path: Path) -> None:
    ipc = f"ipc://{tmp_path}/cam1.sock"
    with Publisher(ANY_PORT, "cam0") as p0, Publisher(ipc, "cam1") as p1, \
            Subscriber([p0.endpoint, ipc], topics=("masks/", "status/", "stats/")) as sub:
        _sync(p0, sub, "cam0")
        _sync(p1, sub, "cam1")
        p0.publish_result(_result(100, "cam0"))
        p1.publish_result(_result(200, "cam1"))
        p1.publish_status("source_state", old="connecting", new="streaming")
        p1.publish_status("object_state", obj_id=1, old="visible", new="occluded")
        win = StatsWindow(stream="cam0")
        win.add(_result(1))
        p0.publish_stats(win.snapshot(memory_bytes=1024))
        got: dict[str, Any] = {}
        statuses = []
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and not (len(got) == 3 and len(statuses) == 2):
            msg = sub.recv(timeout=0.1)
            if msg is None:
                continue
            if msg.kind == "status":
                statuses.append(msg.status)
            else:
                got[msg.topic] = msg
        assert got["masks/cam0"].seq == 100 and got["masks/cam1"].seq == 200
        assert isinstance(got["stats/cam0"].stats, Stats)
        assert got["stats/cam0"].stats.memory_bytes == 1024
        # Status events are queued, not overwritten: both arrive, in order.
        assert [s.kind for s in statuses] == ["source_state", "object_state"]
        assert statuses[1].data == {"obj_id": 1, "old": "visible", "new": "occluded"}
        assert sub.latest("cam1").seq == 200 and sub.latest("cam0").seq == 100
        # after_seq: only something newer counts (waits, then gives up with None).
        assert sub.latest("cam1", after_seq=199).seq == 200
        assert sub.latest("cam1", timeout=0.05, after_seq=200) is None


def test_topic_filter_and_frames(pub: Publisher) -> None:
    rgb = np.zeros((48, 64, 3), np.uint8)
    rgb[:, :32] = (255, 0, 0)  # left half red, so a channel swap would show
    with Subscriber(pub.endpoint, topics="frames/") as sub:
        deadline = time.monotonic() + 5
        msg = None
        while msg is None and time.monotonic() < deadline:
            pub.publish_result(_result(0))  # filtered out by the topic
            assert pub.publish_frame(7, rgb)
            msg = sub.recv(timeout=0.05)
        assert msg is not None and msg.kind == "frames"
        assert msg.frame.frame_id == 7 and (msg.frame.width, msg.frame.height) == (64, 48)
        img = msg.image()
        assert img.shape == rgb.shape
        assert np.abs(img.astype(int) - rgb.astype(int)).mean() < 4
        assert sub.latest() is None  # no masks were ever delivered
    with pytest.raises(UserError, match="uint8"):
        pub.publish_frame(1, np.zeros((4, 4), np.uint8))


def test_malformed_messages_are_counted_and_skipped() -> None:
    ctx = zmq.Context.instance()
    raw = ctx.socket(zmq.PUB)
    raw.setsockopt(zmq.LINGER, 0)
    port = raw.bind_to_random_port("tcp://127.0.0.1")
    try:
        with Subscriber(f"tcp://127.0.0.1:{port}") as sub:
            good = _result(5).to_json().encode()
            deadline = time.monotonic() + 5
            while sub.latest(timeout=0.05) is None and time.monotonic() < deadline:
                raw.send_multipart([b"masks/cam0", good])
            while sub.recv(timeout=0.05) is not None:
                pass
            bad_version = json.loads(good)
            bad_version["v"] = 9
            for parts in ([b"masks/cam0", b"{nope"], [b"masks/cam0"],
                          [b"masks/cam0", json.dumps(bad_version).encode()],
                          [b"masks/bad/topic", good]):
                raw.send_multipart(parts)
            raw.send_multipart([b"masks/cam0", good])
            msg = sub.recv(timeout=2)
            assert msg is not None and msg.seq == 5
            assert sub.malformed == 4
    finally:
        raw.close()


def test_close_stops_thread_promptly_and_ends_iteration(pub: Publisher) -> None:
    sub = Subscriber(pub.endpoint)
    seen: list[int] = []

    def consume() -> None:
        for msg in sub:
            seen.append(msg.seq)

    consumer = threading.Thread(target=consume)
    consumer.start()
    seq = 0
    deadline = time.monotonic() + 5
    while not seen and time.monotonic() < deadline:
        pub.publish_result(_result(seq))
        seq += 1
        time.sleep(0.01)
    assert seen
    t0 = time.monotonic()
    sub.close()
    assert not sub._thread.is_alive()
    consumer.join(2)
    assert not consumer.is_alive()
    assert time.monotonic() - t0 < 1.0
    assert sub.closed and sub.recv(timeout=0.1) is None
    sub.close()  # idempotent


def test_publisher_never_blocks_on_a_stalled_subscriber(pub: Publisher) -> None:
    ctx = zmq.Context.instance()
    stalled = ctx.socket(zmq.SUB)  # connects, subscribes, never reads
    stalled.setsockopt(zmq.LINGER, 0)
    stalled.setsockopt(zmq.RCVHWM, 1)
    stalled.setsockopt(zmq.RCVBUF, 4096)
    stalled.setsockopt(zmq.SUBSCRIBE, b"")
    stalled.connect(pub.endpoint)
    try:
        time.sleep(0.2)
        big = np.random.default_rng(0).random((480, 640)) < 0.5  # ~100 KB of RLE
        result = _result(0, mask=big)
        t0 = time.monotonic()
        for i in range(300):
            pub.publish_result(replace(result, seq=i))
        elapsed = time.monotonic() - t0
        assert elapsed < 10  # would hang forever if a send blocked
        assert pub.sent + pub.send_failures == 300
        # What is queued for the stalled one is given CLOSE_FLUSH_MS, no more; a close()
        # from another thread meanwhile returns too (it waited forever on the first's).
        t0 = time.monotonic()
        closers = [threading.Thread(target=pub.close) for _ in range(2)]
        for c in closers:
            c.start()
        for c in closers:
            c.join(CLOSE_FLUSH_MS / 1000 + 5)
        assert not any(c.is_alive() for c in closers)
        assert time.monotonic() - t0 < CLOSE_FLUSH_MS / 1000 + 5
    finally:
        stalled.close()


def test_closing_publisher_delivers_what_it_queued() -> None:
    """A run's last result and its "stopped" event are the last messages sent before the
    process exits: close() waits (up to CLOSE_FLUSH_MS) for them to go out to a subscriber
    that is still reading; a socket closed with nothing to wait for dropped what ZeroMQ
    had not written yet."""
    blob = "x" * 3_000_000  # 3 MB messages, made at once: more than the kernel's socket buffers hold
    ctx = zmq.Context()  # of its own, as another process's would be
    pub = Publisher(ANY_PORT, "cam0")
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.RCVHWM, 1)  # a reader that takes its time: the rest waits on the tracker's side
    sub.setsockopt(zmq.RCVBUF, 16384)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(pub.endpoint)
    got = []
    try:
        deadline = time.monotonic() + 5
        while not sub.poll(50):  # past ZeroMQ's slow-joiner window
            assert time.monotonic() < deadline, "subscriber never connected"
            pub.publish_status("hello", {})
        while sub.poll(50):
            sub.recv_multipart()

        def read() -> None:
            while len(got) < 12 and sub.poll(3000):
                got.append(sub.recv_multipart())
                time.sleep(0.02)

        reader = threading.Thread(target=read)
        reader.start()
        for i in range(12):
            pub.publish_status("bulk", {"i": i, "blob": blob})
        assert pub.send_failures == 0
        pub.close()
        reader.join(10)
        assert len(got) == 12
    finally:
        pub.close()
        sub.close()
        ctx.term()


def test_an_oversize_subscription_is_refused_and_others_are_served(pub: Publisher) -> None:
    """ZeroMQ keeps every subscription in the publisher's memory (~50 bytes per byte sent):
    a client subscribing with megabytes must be cut off, not held.  A connection that sent
    one is dropped, so that client's ordinary subscription gets nothing either."""
    # In a process of its own: libzmq may crash closing a socket with a huge subscription.
    greedy = subprocess.Popen([sys.executable, "-c", f"""
import sys, zmq
s = zmq.Context.instance().socket(zmq.SUB)
s.setsockopt(zmq.SUBSCRIBE, b"masks/" + b"x" * 100_000)
s.setsockopt(zmq.SUBSCRIBE, b"")
s.connect({pub.endpoint!r})
print("connected", flush=True)
print("got" if s.poll(3000, zmq.POLLIN) else "nothing", flush=True)
"""], stdout=subprocess.PIPE, text=True)
    try:
        assert greedy.stdout is not None and greedy.stdout.readline() == "connected\n"
        with Subscriber(pub.endpoint) as sub:
            seq = _sync(pub, sub)  # an ordinary subscriber still gets results
            for i in range(60):
                pub.publish_result(_result(seq + i))
                time.sleep(0.05)
            assert sub.recv(timeout=2) is not None
        assert greedy.stdout.readline() == "nothing\n"
    finally:
        greedy.kill()
        greedy.wait()


def test_publisher_endpoint_errors() -> None:
    with Publisher(ANY_PORT) as first:
        with pytest.raises(UserError, match="address already in use"):
            Publisher(first.endpoint)
    with pytest.raises(UserError, match="invalid endpoint"):
        Publisher("udp://127.0.0.1:5555")
    with pytest.raises(UserError, match="cannot bind"):
        Publisher("tcp://203.0.113.1:5555")  # not an address of this machine
    with pytest.raises(UserError, match="invalid endpoint"):
        Subscriber("nope://x")
    p = Publisher(ANY_PORT)
    p.close()
    with pytest.raises(UserError, match="closed"):
        p.publish_result(_result(0))


def test_subscriber_arguments_that_cannot_work_are_named(pub: Publisher, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="port 0 .any free port. is for binding"):
        Subscriber(0)
    with pytest.raises(UserError, match="topic filters are strings"):
        Subscriber(pub.endpoint, topics=[5])
    with pytest.raises(UserError, match="topic filters are strings such as 'masks/', got None"):
        Subscriber(pub.endpoint, topics=None)
    with pytest.raises(UserError, match="endpoints are strings such as 'tcp://127.0.0.1:5555' or port "
                                        "numbers, got None"):
        Subscriber(None)
    with Subscriber(pub.endpoint, topics=b"masks/") as sub:  # bytes, as pyzmq spells topics
        assert sub.topics == ("masks/",)
        _sync(pub, sub)
    with pytest.raises(RuntimeError, match="closed"):
        iter(sub).__next__()
    with pytest.raises(RuntimeError, match="closed"), sub:
        pass


def test_subscriber_warns_of_hosts_and_paths_that_do_not_exist(caplog, monkeypatch, tmp_path) -> None:
    import streamtrack.publisher as publisher

    def unknown(host, *args, **kwargs):
        if host == "camera-typo":
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [()]

    monkeypatch.setattr(publisher.socket, "getaddrinfo", unknown)
    ipc = f"ipc://{tmp_path}/missing/sock"
    with caplog.at_level("WARNING", logger="streamtrack.publisher"), \
            Subscriber(["tcp://camera-typo:5555", ipc, "tcp://127.0.0.1:5999", "localhost:5998"]):
        deadline = time.monotonic() + 5
        while len(caplog.records) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
    assert [r.getMessage() for r in caplog.records] == [
        "subscriber: host 'camera-typo' of tcp://camera-typo:5555 does not resolve "
        "(Name or service not known); still trying",
        f"subscriber: {ipc} is in a folder that does not exist; still trying",
    ]


# ------------------------------------------------------------------------ control


class RecordingHandler:
    """Test double for the tracker: records typed commands, can be told to fail."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.fail_with: BaseException | None = None

    def _record(self, name: str, arg: Any = None) -> dict[str, Any]:
        self.calls.append((name, arg))
        if self.fail_with is not None:
            raise self.fail_with
        return {"handled": name}

    def add_prompt(self, cmd: AddPrompt) -> dict[str, Any]:
        return self._record("add_prompt", cmd)

    def remove_object(self, obj_id: int) -> dict[str, Any]:
        return self._record("remove_object", obj_id)

    def reset(self) -> dict[str, Any]:
        return self._record("reset")

    def status(self) -> dict[str, Any]:
        self._record("status")
        return {"objects": [1, 2], "paused": False}

    def pause(self) -> None:
        self._record("pause")

    def resume(self) -> dict[str, Any]:
        return self._record("resume")


class Served:
    def __init__(self, endpoint: str = ANY_PORT, **kw: Any) -> None:
        self.handler = RecordingHandler()
        self.server = ControlServer(endpoint, self.handler, **kw)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.server.serve, args=(self.stop, 20))
        self.thread.start()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(2)
        self.server.close()


@pytest.fixture
def served() -> Iterator[Served]:
    s = Served(max_request_bytes=64 * 1024, max_message_bytes=1024 * 1024)
    yield s
    s.close()


@pytest.fixture
def client(served: Served) -> Iterator[ControlClient]:
    with ControlClient(served.server.endpoint, timeout=2.0) as c:
        yield c


def _mask_rle() -> dict[str, Any]:
    m = np.zeros((24, 32), bool)
    m[2:9, 4:10] = True
    return encode_mask(m)


def test_valid_requests_reach_handler_as_typed_commands(
    served: Served, client: ControlClient
) -> None:
    r = client.add_prompt(3, points=[[10, 20], [30.5, 40]], labels=[1, 0], box=[1, 2, 50, 60])
    assert r == {"ok": True, "handled": "add_prompt"}
    client.add_prompt(4, points=np.array([[1, 2]]))  # labels default to foreground
    mask = decode_mask(_mask_rle())
    client.add_prompt(5, mask=mask)
    assert client.remove_object(3)["ok"]
    assert client.status() == {"ok": True, "objects": [1, 2], "paused": False}
    assert client.pause() == {"ok": True}
    client.resume()
    client.reset()
    names = [c[0] for c in served.handler.calls]
    assert names == ["add_prompt", "add_prompt", "add_prompt", "remove_object", "status",
                     "pause", "resume", "reset"]
    first = served.handler.calls[0][1]
    assert first == AddPrompt(obj_id=3, points=((10.0, 20.0), (30.5, 40.0)), labels=(1, 0),
                              box=(1.0, 2.0, 50.0, 60.0))
    assert served.handler.calls[1][1].labels == (1,)
    np.testing.assert_array_equal(served.handler.calls[2][1].mask_array(), mask)
    assert served.handler.calls[3][1] == 3
    # A raw request with an id gets it echoed back (for DEALER-style pipelining).
    assert client.request({"cmd": "status", "id": "abc"})["id"] == "abc"


_MALFORMED: list[tuple[Any, str]] = [
    ({}, "needs a string field 'cmd'"),
    ({"cmd": 5}, "needs a string field 'cmd'"),
    ({"cmd": "explode"}, "unknown cmd 'explode'"),
    ({"cmd": "status", "verbose": True}, "unknown field"),
    ({"cmd": "add_prompt", "obj_id": 1}, "needs points, a box, or a mask"),
    ({"cmd": "add_prompt", "points": [[1, 2]]}, "needs obj_id"),
    ({"cmd": "add_prompt", "obj_id": 0, "box": [0, 0, 1, 1]}, "obj_id must be between"),
    ({"cmd": "add_prompt", "obj_id": -3, "box": [0, 0, 1, 1]}, "obj_id must be between"),
    ({"cmd": "add_prompt", "obj_id": 1.5, "box": [0, 0, 1, 1]}, "obj_id must be a positive"),
    ({"cmd": "add_prompt", "obj_id": True, "box": [0, 0, 1, 1]}, "obj_id must be a positive"),
    ({"cmd": "add_prompt", "obj_id": "1", "box": [0, 0, 1, 1]}, "obj_id must be a positive"),
    ({"cmd": "add_prompt", "obj_id": 2**40, "box": [0, 0, 1, 1]}, "obj_id must be between"),
    ({"cmd": "add_prompt", "obj_id": 1, "boxes": [0, 0, 1, 1]}, "unknown field"),
    ({"cmd": "add_prompt", "obj_id": 1, "box": [0, 0, 1]}, r"box must be \[x0, y0, x1, y1\]"),
    ({"cmd": "add_prompt", "obj_id": 1, "box": [5, 0, 1, 1]}, "x0 < x1"),
    ({"cmd": "add_prompt", "obj_id": 1, "box": [0, 3, 1, 3]}, "y0 < y1"),
    ({"cmd": "add_prompt", "obj_id": 1, "box": [-1, 0, 1, 1]}, r"box\[0\] must be a pixel coordinate from 0"),
    ({"cmd": "add_prompt", "obj_id": 1, "box": [0, 0, 1e300, 1]}, r"from 0 to 1e\+06, got 1e\+300"),
    # An integer too large for a float is a bad coordinate too, not a handler failure.
    ({"cmd": "add_prompt", "obj_id": 1, "points": [[10**400, 5]]},
     r"points\[0\]\.x must be a pixel coordinate from 0 to 1e\+06, got a 401-digit integer"),
    ({"cmd": "add_prompt", "obj_id": 1, "box": [0, 0, "1", 1]}, "must be a number"),
    ({"cmd": "add_prompt", "obj_id": 1, "points": []}, "must not be empty"),
    ({"cmd": "add_prompt", "obj_id": 1, "points": [[1, 2, 3]]}, r"points\[0\] must be \[x, y\]"),
    ({"cmd": "add_prompt", "obj_id": 1, "points": [[1, None]]}, "must be a number"),
    ({"cmd": "add_prompt", "obj_id": 1, "points": "1,2"}, "points must be a list"),
    ({"cmd": "add_prompt", "obj_id": 1, "points": [[1, 2]] * 65}, "at most 64 points"),
    ({"cmd": "add_prompt", "obj_id": 1, "points": [[1, 2]], "labels": [1, 0]}, "one label per"),
    ({"cmd": "add_prompt", "obj_id": 1, "points": [[1, 2]], "labels": [2]}, r"labels\[0\] must be"),
    ({"cmd": "add_prompt", "obj_id": 1, "points": [[1, 2]], "labels": [1.0]}, r"labels\[0\] must"),
    ({"cmd": "add_prompt", "obj_id": 1, "labels": [1]}, "labels given without points"),
    ({"cmd": "add_prompt", "obj_id": 1, "mask": {"size": [2, 2], "counts": "1"}}, "RLE runs"),
    ({"cmd": "add_prompt", "obj_id": 1, "mask": [[0, 1]]}, "COCO RLE"),
    ({"cmd": "add_prompt", "obj_id": 1, "mask": {"size": [0, 0], "counts": ""}}, "empty"),
    ({"cmd": "add_prompt", "obj_id": 1, "mask": "MASK", "box": [0, 0, 1, 1]}, "cannot be comb"),
    ({"cmd": "remove_object"}, "needs obj_id"),
    ({"cmd": "remove_object", "obj_id": None}, "obj_id must be a positive"),
    ([1, 2, 3], "must be a JSON object"),
    ("status", "must be a JSON object"),
    (None, "must be a JSON object"),
]


@pytest.mark.parametrize(("request_", "match"), _MALFORMED,
                         ids=[str(i) for i in range(len(_MALFORMED))])
def test_malformed_requests_get_useful_errors(request_: Any, match: str) -> None:
    import re

    with pytest.raises(PromptError, match=match):
        parse_command(request_)
    # ...and over the wire the same error comes back; checked for all at once below.
    assert re.search(match, str(_wire_errors()[json.dumps(request_)]))


_WIRE_ERRORS: dict[str, str] = {}


def _wire_errors() -> dict[str, str]:
    """Send every malformed request to one server, once per session (fast)."""
    if not _WIRE_ERRORS:
        s = Served()
        try:
            with ControlClient(s.server.endpoint, timeout=2.0) as c:
                for req, _ in _MALFORMED:
                    reply = c.request(req) if isinstance(req, dict) else _raw(c, req)
                    assert reply["ok"] is False and reply["error"]
                    _WIRE_ERRORS[json.dumps(req)] = reply["error"]
                    # The server keeps answering after every bad request.
                    assert c.request({"cmd": "status"})["ok"] is True
            assert [n for n, _ in s.handler.calls] == ["status"] * len(_MALFORMED)
        finally:
            s.close()
    return _WIRE_ERRORS


def _raw(client: ControlClient, payload: Any) -> dict[str, Any]:
    # request() only takes mappings; send non-object JSON through the same socket.
    sock = client._sock
    assert sock is not None
    sock.send(json.dumps(payload).encode())
    assert sock.poll(2000)
    return json.loads(sock.recv())


@pytest.mark.parametrize(
    ("parts", "match"),
    [
        ([b"{not json"], "invalid JSON"),
        ([b"\xff\xfe\x00"], "not UTF-8"),
        ([b'{"cmd": "status", "x": NaN}'], "NaN"),
        ([b'{"cmd": "status"}', b"extra"], "one JSON message part"),
        ([b""], "invalid JSON"),
        # Parsers disagree on which of a repeated key counts: refused, never run.
        ([b'{"cmd": "status", "cmd": "reset"}'], "duplicate key 'cmd'"),
        ([b'{"cmd": "add_prompt", "obj_id": 1, "box": [0, 0, 5, 5], "obj_id": 2}'], "duplicate key 'obj_id'"),
        # An id that cannot be echoed back as it came is refused, not silently dropped.
        ([b'{"cmd": "reset", "id": 1.5}'], "id must be a string of up to 128 characters or a 64-bit integer"),
        ([b'{"cmd": "reset", "id": {"a": 1}}'], "id must be"),
        ([b'{"cmd": "reset", "id": "' + b"x" * 129 + b'"}'], "... (129 characters)"),
        ([b'{"cmd": "reset", "id": ' + b"9" * 30 + b"}"], "id must be"),
        ([b'{"cmd": "reset", "id": "\\ud800"}'], "id must be"),
    ],
)
def test_garbage_bytes_are_answered(served: Served, parts: list[bytes], match: str) -> None:
    ctx = zmq.Context.instance()
    req = ctx.socket(zmq.REQ)
    req.setsockopt(zmq.LINGER, 0)
    req.connect(served.server.endpoint)
    try:
        req.send_multipart(parts)
        assert req.poll(2000), "no reply"
        reply = json.loads(req.recv())
        assert reply["ok"] is False and match in reply["error"] and "id" not in reply
        assert served.handler.calls == []  # nothing ran
        req.send(b'{"cmd": "status"}')
        assert req.poll(2000)
        assert json.loads(req.recv())["ok"] is True
    finally:
        req.close()


def test_handler_exceptions_become_error_replies(served: Served, client: ControlClient) -> None:
    served.handler.fail_with = PromptError("object 9 does not exist")
    assert client.request({"cmd": "remove_object", "obj_id": 9}) == {
        "ok": False, "error": "object 9 does not exist"}
    served.handler.fail_with = RuntimeError("engine exploded")
    reply = client.request({"cmd": "reset"})
    assert reply == {"ok": False, "error": "RuntimeError: engine exploded"}
    with pytest.raises(ControlError, match="engine exploded"):
        client.reset()
    served.handler.fail_with = None
    assert client.status()["ok"] is True


def test_handler_returning_non_json_is_an_error(served: Served, client: ControlClient) -> None:
    served.handler.status = lambda: {"bad": object()}  # type: ignore[method-assign]
    reply = client.request({"cmd": "status"})
    assert reply["ok"] is False and "not JSON" in reply["error"]
    served.handler.status = lambda: ["not", "a", "dict"]  # type: ignore[method-assign]
    reply = client.request({"cmd": "status"})
    assert reply["ok"] is False and "not a dict" in reply["error"]


def test_oversize_requests_are_refused(served: Served, client: ControlClient) -> None:
    # Over the soft limit (64 KiB here): a readable error reply.
    reply = client.request({"cmd": "status", "id": "x" * 100, "pad": "y" * 70_000})
    assert reply["ok"] is False and "too large" in reply["error"]
    # Over ZeroMQ's hard limit (1 MiB here): the connection is dropped before the
    # message is buffered, so there is no reply, only a client timeout...
    with ControlClient(served.server.endpoint, timeout=0.5) as huge:
        with pytest.raises(ControlTimeout):
            huge.request({"cmd": "status", "pad": "z" * (2 * 1024 * 1024)})
        # ...and the same client recovers with a fresh socket.
        assert huge.status()["ok"] is True
    assert client.status()["ok"] is True
    assert [n for n, _ in served.handler.calls] == ["status", "status"]


def test_client_times_out_without_server_and_recovers(tmp_path: Path) -> None:
    endpoint = f"ipc://{tmp_path}/control.sock"
    with ControlClient(endpoint, timeout=0.3) as c:
        t0 = time.monotonic()
        with pytest.raises(ControlTimeout, match="no reply") as info:
            c.status()
        assert time.monotonic() - t0 < 1.5
        # Not "not applied": a tracker busy with a slow frame answers, and acts, later.
        assert "may still carry the request out" in str(info.value)
        with pytest.raises(TimeoutError):  # also catchable as the builtin
            c.request({"cmd": "status"})
        s = Served(endpoint)
        try:
            assert c.status()["ok"] is True  # the stuck REQ socket was replaced
        finally:
            s.close()


def test_a_closed_client_says_so_and_opens_no_new_socket(served: Served) -> None:
    client = ControlClient(served.server.endpoint, timeout=5)
    assert client.status()["ok"]
    client.close()
    with pytest.raises(RuntimeError, match="this ControlClient is closed"):
        client.status()
    assert client._sock is None


def test_client_validates_before_sending(served: Served, client: ControlClient) -> None:
    with pytest.raises(PromptError, match="labels"):
        client.add_prompt(1, points=[[1, 2]], labels=[3])
    with pytest.raises(PromptError, match="cannot read"):
        client.add_prompt(1, points=[[1, 2], [3]])
    # (x, y, label) triples are not read as other points (two triples are three pairs)
    for triples in ([[1, 2, 3]], [[10, 20, 1], [30, 40, 0]], [10, 20]):
        with pytest.raises(PromptError, match=r"\(x, y\) pairs.*labels apart"):
            client.add_prompt(1, points=triples, labels=[1, 0])
    with pytest.raises(PromptError, match="obj_id"):
        client.remove_object(0)
    assert served.handler.calls == []
    with pytest.raises(UserError, match="timeout"):
        ControlClient(served.server.endpoint, timeout=0)


def test_dealer_clients_are_answered(served: Served) -> None:
    ctx = zmq.Context.instance()
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(served.server.endpoint)
    try:
        for i in range(3):  # pipelined, matched by id
            dealer.send(json.dumps({"cmd": "status", "id": i}).encode())
        ids = []
        for _ in range(3):
            assert dealer.poll(2000)
            ids.append(json.loads(dealer.recv())["id"])
        assert sorted(ids) == [0, 1, 2]
    finally:
        dealer.close()


def test_control_server_bind_errors_and_poll_once() -> None:
    handler = RecordingHandler()
    with ControlServer(ANY_PORT, handler) as server:
        with pytest.raises(UserError, match="address already in use"):
            ControlServer(server.endpoint, handler)
        t0 = time.monotonic()
        assert server.poll_once(50) == 0  # nothing pending: returns after the timeout
        assert time.monotonic() - t0 < 0.5
        with ControlClient(server.endpoint, timeout=2.0) as c:
            done: list[dict[str, Any]] = []
            t = threading.Thread(target=lambda: done.append(c.status()))
            t.start()
            deadline = time.monotonic() + 3
            handled = 0
            while not handled and time.monotonic() < deadline:
                handled = server.poll_once(20)
            t.join(2)
            assert handled == 1 and done[0]["ok"] is True


def test_poll_once_stops_answering_when_its_time_budget_is_spent() -> None:
    """Slow requests (a large JSON body takes tens of ms to parse) queued in a burst are
    answered a budget's worth at a time, so the tracker's frames go on between them."""
    handler = RecordingHandler()
    handler.status = lambda: time.sleep(0.1) or {}  # type: ignore[method-assign]
    with ControlServer(ANY_PORT, handler) as server:
        dealer = zmq.Context.instance().socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(server.endpoint)
        try:
            for i in range(10):
                dealer.send_multipart([b"", json.dumps({"cmd": "status", "id": i}).encode()])
            time.sleep(0.3)  # all ten are at the server
            # Each takes >= 0.1 s, so at most 3 fit a 0.25 s budget (checked after each).
            answered = server.poll_once(1000, max_requests=64, budget_s=0.25)
            assert 1 <= answered <= 3
            while answered < 10:
                n = server.poll_once(1000, max_requests=64, budget_s=0.25)
                assert 1 <= n <= 3
                answered += n
            ids = []
            while dealer.poll(1000):
                ids.append(json.loads(dealer.recv_multipart()[-1])["id"])
            assert ids == list(range(10))
        finally:
            dealer.close()


class _Listing:
    """A fleet's stream listing that the test rewrites, as the fleet does on a move."""

    def __init__(self) -> None:
        self.streams: dict[str, str] = {}

    def entries(self):
        from streamtrack.fleet_directory import StreamEntry

        return [StreamEntry(name=n, state="running", publish=ep) for n, ep in sorted(self.streams.items())]

    def list_streams(self) -> dict[str, Any]:  # what the fleet's control server asks of the fleet
        return {"streams": {e.name: e.to_dict() for e in self.entries()}}


@pytest.mark.parametrize("via", ["directory file", "fleet control"])
def test_fleet_subscriber_follows_streams_that_move_or_join(tmp_path: Path, via: str) -> None:
    """A stream restarted on another node publishes on a new endpoint, and a stream added
    at run time on one more: a fleet subscriber follows the listing by itself, and stops
    listening to an endpoint the fleet no longer lists."""
    from streamtrack.fleet import _FleetControlServer
    from streamtrack.fleet_directory import write_directory

    listing = _Listing()
    directory = tmp_path / "fleet.json"
    stop = threading.Event()
    server = serving = None
    if via == "fleet control":
        server = _FleetControlServer(ANY_PORT, listing)
        source = server.endpoint
        serving = threading.Thread(target=lambda: [server.poll_once(20) for _ in iter(stop.is_set, True)])
        serving.start()
    else:
        source = str(directory)

    def publish_listing() -> None:
        write_directory(directory, listing.entries(), {"state": "running"})

    with Publisher(ANY_PORT, "a") as old, Publisher(ANY_PORT, "a") as moved, \
            Publisher(ANY_PORT, "b") as added:
        listing.streams = {"a": old.endpoint}
        publish_listing()
        try:
            with Subscriber.from_fleet(source, follow_interval=0.1) as sub:
                assert sub.endpoints == [old.endpoint]
                _sync(old, sub, "a")
                listing.streams = {"a": moved.endpoint, "b": added.endpoint}
                publish_listing()
                seen: dict[str, int] = {}
                deadline = time.monotonic() + 5
                while time.monotonic() < deadline and set(seen) != {"a", "b"}:
                    old.publish_result(_result(1000, "a"))  # no longer listed: must not arrive
                    moved.publish_result(_result(2000, "a"))
                    added.publish_result(_result(3000, "b"))
                    msg = sub.recv(timeout=0.05)
                    if msg is not None and msg.seq in (2000, 3000):
                        seen[msg.stream] = msg.seq
                assert seen == {"a": 2000, "b": 3000}
                assert sorted(sub.endpoints) == sorted([moved.endpoint, added.endpoint])
                while sub.recv(timeout=0.2) is not None:
                    pass
                for _ in range(5):
                    old.publish_result(_result(1001, "a"))
                    time.sleep(0.02)
                late = [m.seq for m in iter(lambda: sub.recv(timeout=0.3), None)]
                assert 1001 not in late, late
        finally:
            stop.set()
            if server is not None:
                serving.join(5)
                server.close()


def test_a_fleet_subscriber_started_while_its_streams_start_connects_when_they_run(tmp_path: Path) -> None:
    """``streamtrack fleet`` says "watch them with streamtrack subscribe DIR" while its
    streams load their models: that must wait for them, not fail."""
    from streamtrack.fleet_directory import StreamEntry, write_directory

    directory = tmp_path / "fleet.json"
    write_directory(directory, [StreamEntry(name="a", state="starting")], {"state": "running"})
    with Publisher(ANY_PORT, "a") as pub, Subscriber.from_fleet(str(directory), follow_interval=0.1) as sub:
        assert sub.endpoints == []
        write_directory(directory, [StreamEntry(name="a", state="running", publish=pub.endpoint)],
                        {"state": "running"})
        _sync(pub, sub, "a")
        assert sub.endpoints == [pub.endpoint]
    write_directory(directory, [StreamEntry(name="a", state="failed", error="no camera")],
                    {"state": "running"})
    with pytest.raises(UserError, match=r"no stream has a publish endpoint \(a failed\)"):
        Subscriber.from_fleet(str(directory))


def test_a_fleet_subscriber_waits_on_a_fleet_with_no_streams_yet_not_on_one_stopped(tmp_path: Path) -> None:
    """A fleet started with `streams: []` gets every stream by add_stream: its subscriber
    follows it from the start.  A fleet that has stopped is said at once, not waited on."""
    from streamtrack.fleet_directory import StreamEntry, write_directory

    directory = tmp_path / "fleet.json"
    write_directory(directory, [], {"state": "running"})
    with Publisher(ANY_PORT, "cam9") as pub, \
            Subscriber.from_fleet(str(directory), follow_interval=0.1) as sub:
        assert sub.endpoints == []
        write_directory(directory, [StreamEntry(name="cam9", state="running", publish=pub.endpoint)],
                        {"state": "running"})
        _sync(pub, sub, "cam9")
    write_directory(directory, [StreamEntry(name="cam9", state="stopped", publish=pub.endpoint)],
                    {"state": "stopped"})
    with pytest.raises(UserError, match=r"fleet directory .*fleet.json: the fleet has stopped"):
        Subscriber.from_fleet(str(directory))


def test_subscribe_to_a_fleet_control_nobody_answers_is_one_line(capsys) -> None:
    from streamtrack import cli

    with socket.socket() as held:  # bound, never listening: nobody answers
        held.bind(("127.0.0.1", 0))
        port = held.getsockname()[1]
        assert cli.main(["subscribe", f"tcp://127.0.0.1:{port}", "--fleet"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "no reply from control server" in err, err
        # The short forms every endpoint option takes are endpoints here too, not file names.
        for short in (str(port), f"127.0.0.1:{port}"):
            assert cli.main(["subscribe", short, "--fleet"]) == 2
            err = capsys.readouterr().err.strip()
            assert err.count("\n") == 0 and f"no reply from control server tcp://127.0.0.1:{port}" in err, err


def test_subscribe_says_once_that_it_is_still_waiting_then_times_out(capsys, monkeypatch) -> None:
    """A subscriber with no publisher behind it waits (publishers may come later), but
    says so on stderr after a while instead of sitting silent; stdout stays JSON only."""
    from streamtrack import cli

    monkeypatch.setattr(cli, "SILENCE_HINT_S", 0.5)
    with socket.socket() as held:  # a port nobody publishes on
        held.bind(("127.0.0.1", 0))
        endpoint = f"tcp://127.0.0.1:{held.getsockname()[1]}"
        assert cli.main(["subscribe", endpoint, "--timeout", "2"]) == 1
        captured = capsys.readouterr()
        assert cli.main(["-q", "subscribe", endpoint, "--timeout", "1"]) == 1
        quiet = capsys.readouterr()
    lines = captured.err.splitlines()
    assert captured.out == "" and len(lines) == 2, lines
    assert lines[0].startswith(f"streamtrack: nothing from {endpoint} in 0.5 s, still waiting"), lines
    assert lines[1].startswith(f"streamtrack: no message for 2 s from {endpoint}"), lines
    assert "still waiting" not in quiet.err and "no message for 1 s" in quiet.err, quiet.err


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _ipv6_loopback(), reason="this machine has no IPv6 loopback (::1)")
def test_ipv6_endpoints_publish_subscribe_and_control() -> None:
    """tcp://[::1]:PORT is accepted as an endpoint, so it must work: ZeroMQ sockets are
    IPv4-only unless told otherwise (bind: "No such device"; connect: silence)."""
    with Publisher("tcp://[::1]:0", "cam0") as pub, Subscriber(pub.endpoint) as sub:
        assert pub.endpoint.startswith("tcp://[::1]:")
        seq = _sync(pub, sub)
        pub.publish_result(_result(seq))
        assert sub.recv(timeout=2).seq == seq
    served = Served("tcp://[::1]:0")
    try:
        with ControlClient(served.server.endpoint, timeout=5) as client:
            assert client.resume()["ok"]
    finally:
        served.close()
    assert served.handler.calls == [("resume", None)]


@pytest.mark.parametrize("make, message", [
    (lambda: Subscriber(b"tcp://127.0.0.1:5555"), "got bytes b'tcp://127.0.0.1:5555': decode them"),
    (lambda: Subscriber("tcp://127.0.0.1:5555", rcvhwm=-5), "rcvhwm must be an integer >= 0 (0: no limit)"),
    (lambda: ControlClient("tcp://127.0.0.1:5556", timeout=float("inf")), "at most 2,147,483 seconds"),
    (lambda: ControlClient("tcp://127.0.0.1:5556", timeout=1e10), "at most 2,147,483 seconds"),
    (lambda: ControlClient("tcp://127.0.0.1:5556", timeout=float("nan")), "must be > 0"),
])
def test_client_arguments_that_cannot_work_are_one_line_user_errors(make, message) -> None:
    with pytest.raises(UserError, match=re.escape(message)):
        make().close()


def test_ipc_socket_files_go_with_their_sockets_but_not_a_later_binders(tmp_path: Path) -> None:
    """libzmq leaves an ipc:// file behind on close; ours goes, one bound over it stays."""
    pub_file, ctl_file = tmp_path / "results.sock", tmp_path / "control.sock"
    with Publisher(f"ipc://{pub_file}", "cam0"), ControlServer(f"ipc://{ctl_file}", RecordingHandler()):
        assert pub_file.is_socket() and ctl_file.is_socket()
    assert not pub_file.exists() and not ctl_file.exists()
    first = Publisher(f"ipc://{pub_file}", "cam0")
    second = Publisher(f"ipc://{pub_file}", "cam1")  # libzmq replaces the file: it is second's now
    first.close()
    assert pub_file.is_socket()
    with Subscriber(f"ipc://{pub_file}", topics=("masks/",)) as sub:
        _sync(second, sub, "cam1")
    second.close()
    assert not pub_file.exists()


@pytest.mark.parametrize("make", [
    lambda ep: Publisher(ep, "cam0"),
    lambda ep: ControlServer(ep, RecordingHandler()),
])
def test_an_ipc_endpoint_over_a_file_is_refused_not_deleted(tmp_path: Path, make) -> None:
    """libzmq deletes what is at an ipc:// path to bind there: a mistyped path (or one a
    fleet control client sends) deleted the file; an old socket file is still reused."""
    precious = tmp_path / "results.jsonl"
    precious.write_text("a day of results\n")
    with pytest.raises(UserError, match=rf"endpoint ipc://{precious}: {precious} is a file, which binding "
                                        r"would delete; give a path where nothing is"):
        make(f"ipc://{precious}")
    assert precious.read_text() == "a day of results\n"
    with pytest.raises(UserError, match="is a directory"):
        make(f"ipc://{tmp_path}")
    stale = tmp_path / "old.sock"
    stale_socket = socket.socket(socket.AF_UNIX)
    stale_socket.bind(str(stale))  # left behind by a process that was killed
    stale_socket.close()
    make(f"ipc://{stale}").close()


@pytest.mark.parametrize("timeout", ["0", "-1", "nan", "inf"])
def test_subscribe_timeout_must_be_a_finite_wait(timeout, capsys) -> None:
    """--timeout inf was taken, and subscribe then never exited (nan was refused)."""
    from streamtrack import cli

    assert cli.main(["subscribe", "tcp://127.0.0.1:1", "--timeout", timeout]) == 2
    said = capsys.readouterr().err
    assert said.startswith("streamtrack: error: --timeout must be a finite number of seconds > 0"), said
