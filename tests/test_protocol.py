"""Wire format: RLE masks, FrameResult/status/stats JSON, topics, endpoints, stats window."""

from __future__ import annotations

import json

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from streamtrack.errors import UserError
from streamtrack.protocol import (
    MAX_RESULT_MASK_PIXELS,
    FrameHeader,
    FrameResult,
    Latency,
    ObjectResult,
    ProtocolError,
    Stats,
    StatusEvent,
    Timestamps,
    _rle_runs,
    decode_mask,
    encode_mask,
    frames_topic,
    mask_area,
    mask_bbox,
    masks_topic,
    normalize_endpoint,
    parse_topic,
    rle_area,
    rle_bbox,
    stats_topic,
    status_topic,
    validate_rle,
)
from streamtrack.publisher import StatsWindow

# pycocotools' decode() trips a numpy 2 deprecation inside pycocotools itself.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

# ------------------------------------------------------------------------------ RLE


def _random_masks() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    masks = [
        np.zeros((48, 64), bool),
        np.ones((48, 64), bool),
        np.zeros((1, 1), bool),
        np.ones((1, 1), bool),
        np.ones((1, 7), bool),
        np.zeros((9, 1), bool),
    ]
    for density in (0.01, 0.3, 0.5, 0.9):
        h, w = rng.integers(1, 120, size=2)
        masks.append(rng.random((h, w)) < density)
    # Large blobs and long runs exercise multi-character counts and the delta coding.
    blob = np.zeros((720, 1280), bool)
    blob[100:600, 200:1100] = True
    blob[300:320, :] = False
    masks.append(blob)
    return masks


@pytest.mark.parametrize("mask", _random_masks(), ids=lambda m: f"{m.shape}-{m.sum()}")
def test_rle_round_trip_matches_pycocotools(mask: np.ndarray) -> None:
    rle = encode_mask(mask)
    assert rle["size"] == list(mask.shape)
    assert isinstance(rle["counts"], str)
    json.dumps(rle)  # JSON-ready as is

    ref = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    assert rle["counts"] == ref["counts"].decode()

    back = decode_mask(rle)
    assert back.dtype == bool and back.shape == mask.shape
    np.testing.assert_array_equal(back, mask)

    assert mask_area(mask) == rle_area(rle) == int(mask_utils.area(ref)) == int(mask.sum())
    x, y, w, h = mask_utils.toBbox(ref)
    expected_bbox = None if mask.sum() == 0 else (x, y, x + w, y + h)
    assert rle_bbox(rle) == expected_bbox
    assert mask_bbox(mask) == expected_bbox


def test_rle_run_decoder_matches_the_mask() -> None:
    """The checked decoder (guarding pycocotools' C code) reads runs exactly right."""
    rng = np.random.default_rng(1)
    for _ in range(100):
        h, w = rng.integers(1, 150, size=2)
        mask = rng.random((h, w)) < rng.random()
        flat = mask.T.reshape(-1).astype(np.int8)  # column-major, as COCO
        edges = np.concatenate(([0], np.flatnonzero(np.diff(flat)) + 1, [flat.size]))
        expected = ([0] if flat[0] else []) + np.diff(edges).tolist()  # runs start with 0s
        assert _rle_runs(encode_mask(mask)["counts"], "t").tolist() == expected


def test_rle_accepts_bytes_counts_and_non_bool_masks() -> None:
    mask = np.zeros((5, 6), np.uint8)
    mask[1:3, 2:5] = 7  # any non-zero is "on"
    rle = encode_mask(mask)
    raw = mask_utils.encode(np.asfortranarray((mask > 0).astype(np.uint8)))
    np.testing.assert_array_equal(decode_mask(raw), mask > 0)
    assert mask_bbox(mask) == (2, 1, 5, 3)
    assert rle_area(rle) == 6


def test_encode_rejects_non_2d() -> None:
    with pytest.raises(ProtocolError, match="2-D"):
        encode_mask(np.zeros((2, 3, 4), bool))


@pytest.mark.parametrize(
    ("rle", "match"),
    [
        ({"size": [2, 2], "counts": "1"}, "cover 1 pixels"),  # would read garbage in C
        ({"size": [2, 2], "counts": "9"}, "cover 9 pixels"),
        ({"size": [2, 2], "counts": "0\x7f"}, "invalid character"),
        ({"size": [2, 2], "counts": "P"}, "truncated"),  # continuation bit on last char
        ({"size": [2, 2], "counts": "04F"}, "negative run"),
        ({"size": [2], "counts": "4"}, "size must be"),
        ({"size": [-1, 2], "counts": ""}, ">= 0"),
        ({"size": [100000, 2], "counts": ""}, "exceeds"),
        ({"size": [2, 2], "counts": 4}, "must be a string"),
        ({"size": [2, 2]}, "missing field 'counts'"),
        ({"size": [2, 2], "counts": "4", "extra": 1}, "unknown fields"),
        ([2, 2], "JSON object"),
    ],
)
def test_malformed_rle_is_rejected(rle: object, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        validate_rle(rle)
    with pytest.raises(ProtocolError):
        decode_mask(rle)  # type: ignore[arg-type]


def test_empty_size_mask_round_trips() -> None:
    rle = encode_mask(np.zeros((0, 5), bool))
    assert decode_mask(rle).shape == (0, 5)


# --------------------------------------------------------------------- FrameResult


def _result(seq: int = 17, n_objects: int = 2) -> FrameResult:
    rng = np.random.default_rng(seq)
    objects = []
    for i in range(1, n_objects + 1):
        mask = rng.random((24, 32)) < 0.2
        objects.append(ObjectResult.from_mask(i, mask, score=np.float32(0.5 + i / 10),
                                              iou=np.float64(0.8)))
    objects.append(ObjectResult(obj_id=99, score=0.01, state="occluded", bbox=None, area=0))
    return FrameResult(
        stream="cam0", seq=seq, frame_id=np.int64(seq), pts=0.567, width=32, height=24,
        t={"capture": 1.0, "dequeue": 1.01, "infer_start": 1.02, "infer_end": 1.05},
        source_state="streaming", dropped={"queue_full": 3, "stale": 0}, objects=objects,
    )


def test_frame_result_json_round_trip() -> None:
    r = _result()
    text = r.to_json()
    d = json.loads(text)
    assert d["v"] == 1 and d["stream"] == "cam0" and d["seq"] == 17
    assert set(d["t"]) == {"capture", "dequeue", "infer_start", "infer_end", "publish"}
    assert d["objects"][0]["rle"]["size"] == [24, 32]
    assert d["objects"][2]["rle"] is None and d["objects"][2]["bbox"] is None
    assert "iou" not in d["objects"][2]
    assert isinstance(d["frame_id"], int)  # numpy scalars were normalised

    back = FrameResult.from_json(text)
    assert back == r
    assert FrameResult.from_json(text.encode()) == r
    assert isinstance(back.t, Timestamps) and back.t.publish is None
    np.testing.assert_array_equal(back.object(1).mask(), r.object(1).mask())
    assert back.object(99).mask() is None and back.object(5) is None


def test_contract_example_parses() -> None:
    """The example in DESIGN.md "Results (contract)", with real values filled in."""
    rle = encode_mask(np.ones((720, 1280), bool))
    line = json.dumps({
        "v": 1, "stream": "cam0", "seq": 17, "frame_id": 17, "pts": 0.567,
        "width": 1280, "height": 720,
        "t": {"capture": 1.0, "dequeue": 1.1, "infer_start": 1.2, "infer_end": 1.3,
              "publish": 1.4},
        "source_state": "streaming", "dropped": {"queue_full": 0, "stale": 0},
        "objects": [{"obj_id": 1, "score": 0.97, "state": "visible",
                     "bbox": [0, 0, 1280, 720], "area": 921600, "rle": rle}],
    })
    r = FrameResult.from_json(line)
    assert r.objects[0].bbox == (0, 0, 1280, 720)
    assert r.t.publish == 1.4
    assert json.loads(r.to_json()) == json.loads(line)


def test_unknown_fields_are_ignored_for_forward_compatibility() -> None:
    d = json.loads(_result().to_json())
    d["future_field"] = {"x": 1}
    d["objects"][0]["future"] = 2
    assert FrameResult.from_dict(d) == _result()


def _mutate(path: tuple, value: object) -> str:
    d = json.loads(_result().to_json())
    target = d
    for key in path[:-1]:
        target = target[key]
    if value is _DELETE:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return json.dumps(d)


_DELETE = object()


@pytest.mark.parametrize(
    ("path", "value", "match"),
    [
        (("v",), 2, "unsupported protocol version 2"),
        (("v",), "1", "unsupported protocol version"),
        (("v",), True, "unsupported protocol version"),
        (("v",), _DELETE, "missing field 'v'"),
        (("seq",), -1, "seq must be >= 0"),
        (("seq",), "3", "seq must be an integer"),
        (("seq",), 3.0, "seq must be an integer"),
        (("frame_id",), _DELETE, "missing field 'frame_id'"),
        (("stream",), "a/b", "invalid stream name"),
        (("width",), None, "width must be an integer"),
        (("pts",), "soon", "pts must be a number"),
        (("t",), [1, 2], "t must be a JSON object"),
        (("t", "capture"), "x", "t.capture must be a number"),
        (("dropped",), {"queue_full": -1}, "must be >= 0"),
        (("objects",), {}, "objects must be a list"),
        (("objects", 0, "state"), "gone", "state must be one of"),
        (("objects", 0, "obj_id"), 0, "obj_id must be >= 1"),
        (("objects", 0, "score"), _DELETE, "missing field 'score'"),
        (("objects", 0, "bbox"), [1, 2, 3], r"bbox must be \[x0, y0, x1, y1\]"),
        (("objects", 0, "bbox"), [5, 2, 3, 4], "x0 <= x1"),
        (("objects", 0, "rle"), {"size": [24, 32], "counts": "1"}, "RLE runs cover"),
        (("objects", 1, "obj_id"), 1, "duplicate obj_id"),
    ],
)
def test_malformed_frame_result_is_rejected(path: tuple, value: object, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        FrameResult.from_json(_mutate(path, value))


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("{not json", "invalid JSON"),
        ('{"v": 1, "seq": NaN}', "NaN/Infinity"),
        ("[1, 2]", "JSON object"),
        (b"\xff\xfe", "invalid JSON"),
        ("", "invalid JSON"),
    ],
)
def test_non_json_is_rejected(text: str | bytes, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        FrameResult.from_json(text)


def test_protocol_error_is_a_user_error() -> None:
    assert issubclass(ProtocolError, UserError)


def test_construction_validates_and_refuses_nan_on_the_wire() -> None:
    with pytest.raises(ProtocolError, match="state"):
        ObjectResult(obj_id=1, score=0.5, state="hidden", bbox=None, area=0)
    with pytest.raises(ProtocolError, match="obj_id"):
        ObjectResult(obj_id=True, score=0.5, state="visible", bbox=None, area=0)
    with pytest.raises(ProtocolError, match="finite"):
        ObjectResult(obj_id=1, score=float("nan"), state="visible", bbox=None, area=0)
    with pytest.raises(ProtocolError, match="stream"):
        FrameResult(stream="", seq=0, frame_id=0, pts=None, width=1, height=1)
    with pytest.raises(ProtocolError, match="version"):
        FrameResult(stream="a", seq=0, frame_id=0, pts=None, width=1, height=1, v=2)


def test_with_timestamps_copies() -> None:
    r = _result()
    s = r.with_timestamps(publish=5.0)
    assert s.t.publish == 5.0 and s.t.capture == 1.0 and r.t.publish is None


# ------------------------------------------------------------ status, stats, frames


def test_status_event_round_trip_and_rejection() -> None:
    ev = StatusEvent(stream="cam0", kind="source_state", time=3.5,
                     data={"old": "connecting", "new": "streaming", "reason": None})
    assert StatusEvent.from_json(ev.to_json()) == ev
    d = json.loads(ev.to_json())
    d["v"] = 7
    with pytest.raises(ProtocolError, match="version 7"):
        StatusEvent.from_json(json.dumps(d))
    d["v"] = 1
    d["kind"] = ""
    with pytest.raises(ProtocolError, match="kind"):
        StatusEvent.from_json(json.dumps(d))


def test_stats_round_trip_and_rejection() -> None:
    st = Stats(stream="cam0", time=2.0, fps=29.97,
               latency={"total": Latency(p50=0.03, p95=0.05), "infer": Latency(0.02, 0.03)},
               dropped={"queue_full": 4}, memory_bytes=np.int64(12345), frames=100)
    back = Stats.from_json(st.to_json())
    assert back == st and isinstance(back.memory_bytes, int)
    d = json.loads(st.to_json())
    d["latency"]["total"] = {"p50": 0.1}
    with pytest.raises(ProtocolError, match="p95"):
        Stats.from_json(json.dumps(d))
    down = Stats(stream="cam0", time=3.0, fps=0.0, source_state="reconnecting",
                 source_error="connection refused")
    assert Stats.from_json(down.to_json()) == down
    assert json.loads(down.to_json())["source_error"] == "connection refused"
    d = json.loads(down.to_json())
    d["source_error"] = 7
    with pytest.raises(ProtocolError, match="source_error"):
        Stats.from_json(json.dumps(d))


def test_frame_header_round_trip() -> None:
    h = FrameHeader(stream="cam0", frame_id=3, width=64, height=48, time=1.0)
    assert FrameHeader.from_json(h.to_json()) == h


# -------------------------------------------------------------- topics, endpoints


def test_topics() -> None:
    assert masks_topic("cam0") == "masks/cam0"
    assert status_topic("cam0") == "status/cam0"
    assert stats_topic("cam0") == "stats/cam0"
    assert frames_topic("cam0") == "frames/cam0"
    assert parse_topic(b"masks/cam-1.a") == ("masks", "cam-1.a")
    for bad in ("masks", "other/cam0", "masks/", "masks/a/b", b"\xffmasks/a"):
        with pytest.raises(ProtocolError):
            parse_topic(bad)
    with pytest.raises(ProtocolError):
        masks_topic("cam 0")


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        (5555, "tcp://127.0.0.1:5555"),
        ("5555", "tcp://127.0.0.1:5555"),
        ("localhost:6000", "tcp://localhost:6000"),
        ("tcp://127.0.0.1:0", "tcp://127.0.0.1:*"),
        ("tcp://*:7000", "tcp://*:7000"),
        ("ipc:///tmp/x.sock", "ipc:///tmp/x.sock"),
        ("tcp://[::1]:7001", "tcp://[::1]:7001"),
        ("tcp://eth0:7002", "tcp://eth0:7002"),
        ("tcp://127.0.0.1;10.0.0.2:7003", "tcp://127.0.0.1;10.0.0.2:7003"),
    ],
)
def test_normalize_endpoint(given: str | int, expected: str) -> None:
    assert normalize_endpoint(given) == expected


@pytest.mark.parametrize("bad", ["", "udp://1.2.3.4:5", "tcp://127.0.0.1", "tcp://h:99999",
                                 "tcp://h:abc", "ipc://", None, "not a host!:5555",
                                 "tcp://my host:5555", "tcp://http://h:5555"])
def test_normalize_endpoint_rejects(bad: object) -> None:
    with pytest.raises(UserError, match="invalid endpoint"):
        normalize_endpoint(bad)  # type: ignore[arg-type]


# -------------------------------------------------------------------- StatsWindow


def test_stats_window_percentiles_and_fps() -> None:
    win = StatsWindow(size=50, stream="cam0")
    assert win.fps() == 0.0 and win.latency() == {}
    for i in range(100):  # only the last 50 count
        cap = i / 10.0  # 10 fps
        infer = 0.01 * (i % 10 + 1)
        r = FrameResult(stream="cam0", seq=i, frame_id=i, pts=None, width=1, height=1,
                        t={"capture": cap, "dequeue": cap + 0.005, "infer_start": cap + 0.01,
                           "infer_end": cap + 0.01 + infer, "publish": cap + 0.02 + infer})
        win.add(r)
    lat = win.latency()
    assert set(lat) == {"queue", "infer", "total"}
    assert lat["queue"].p50 == pytest.approx(0.005)
    assert lat["infer"].p50 == pytest.approx(0.055, abs=0.006)
    assert lat["infer"].p95 == pytest.approx(0.1, abs=0.006)
    assert lat["total"].p50 == pytest.approx(0.075, abs=0.006)
    # fps over the window's completion (publish) times: frames 50..99 -> 49 intervals.
    assert win.fps() == pytest.approx(49 / (10.02 - 5.03))
    # Frames stop coming (an outage): up to a time, the rate falls, then it is 0.
    assert win.fps(at=11.02) == pytest.approx(49 / (11.02 - 5.03))
    assert win.fps(at=12.5) == 0.0
    # Frames again, at 5 fps: their rate, not one over a window that holds the stop.
    for i in range(10):
        win.add(FrameResult(stream="cam0", seq=100 + i, frame_id=100 + i, pts=None, width=1, height=1,
                            t={"publish": 20.0 + i / 5}))
    assert win.fps() == pytest.approx(5.0)
    assert win.fps(at=21.9) == pytest.approx(9 / 1.9)
    snap = win.snapshot(dropped={"queue_full": 2}, memory_bytes=10, time=9.0)
    assert snap.frames == 110 and snap.dropped == {"queue_full": 2}
    assert Stats.from_json(snap.to_json()) == snap


def test_a_result_declaring_more_mask_pixels_than_any_tracker_sends_is_malformed():
    """141 KB declaring 1,000 empty 4096x4096 masks made a viewer allocate gigabytes."""
    empty = encode_mask(np.zeros((4096, 4096), bool))

    def result(n: int, rle: dict) -> dict:
        objects = [{"obj_id": i + 1, "score": 0.5, "state": "visible", "bbox": None, "area": 0, "rle": rle}
                   for i in range(n)]
        height, width = rle["size"]
        return {"v": 1, "stream": "cam0", "seq": 0, "frame_id": 0, "width": width, "height": height,
                "objects": objects}

    bomb = json.dumps(result(1000, empty))
    assert len(bomb) < 200_000
    with pytest.raises(ProtocolError, match="the 1000 objects' masks have 16,777,216,000 pixels in all, "
                                            f"more than {MAX_RESULT_MASK_PIXELS:,}"):
        FrameResult.from_json(bomb)
    with pytest.raises(ProtocolError, match="masks have"):
        FrameResult.from_json(bomb, validate_masks=False)
    uhd = encode_mask(np.zeros((2160, 3840), bool))  # the most a tracker sends by default: 64 objects of 4K
    assert len(FrameResult.from_json(json.dumps(result(64, uhd))).objects) == 64


@pytest.mark.parametrize("validate_masks", [True, False])
def test_a_mask_of_another_size_than_the_frame_is_malformed(validate_masks):
    """Masks are at the frame's resolution: a mask of another size would reach a consumer's
    msg.mask() (and a viewer's overlay) as if it were the frame's."""
    d = _result().to_dict()
    d["objects"] = [ObjectResult.from_mask(1, np.ones((2, 2), bool), score=0.9).to_dict()]
    with pytest.raises(ProtocolError, match=r"^object 1.rle.size \[2, 2\] is not the frame's \[\d+, \d+\]"):
        FrameResult.from_dict(d, validate_masks=validate_masks)
    d["objects"][0]["rle"] = encode_mask(np.ones((d["height"], d["width"]), bool))
    assert FrameResult.from_dict(d, validate_masks=validate_masks).objects[0].area == 4  # from the dict
    d["objects"][0]["rle"] = None  # a mask not sent
    assert FrameResult.from_dict(d, validate_masks=validate_masks).objects[0].rle is None


@pytest.mark.parametrize("field", ["seq", "frame_id"])
def test_integers_beyond_64_bits_are_malformed(field):
    """seq 2**200 made subscribers count ~1.6e60 messages skipped, then take every later
    message for a publisher's restart."""
    d = _result().to_dict()
    d[field] = 2**63 - 1
    assert getattr(FrameResult.from_dict(d), field) == 2**63 - 1
    d[field] = 2**200
    said = rf"{field} must be at most 2\*\*63 - 1, got 16069380442589902755\.\.\.\(61 digits\)"
    with pytest.raises(ProtocolError, match=said):
        FrameResult.from_dict(d)
