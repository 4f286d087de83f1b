"""Capture stage: files, buffering strategies, fake webcams and a real RTSP server.

Clips are generated here: frame ``i`` is a flat grey of level ``i * STEP``, so
order and identity survive H.264 and can be read back from the pixels.
"""

from __future__ import annotations

import gc
import importlib.util
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import av
import cv2
import numpy as np
import pytest
from conftest import free_port

from streamtrack.capture import (
    TRANSITIONS,
    BlockingBuffer,
    BufferPolicy,
    CaptureConfig,
    DropOldestBuffer,
    Frame,
    PendingFrame,
    SourceKind,
    SourceState,
    open_source,
)
from streamtrack.capture_process import LIVE_SLOTS
from streamtrack.errors import UserError
from streamtrack.sources import RawFrame, parse_source, redact_url

try:  # tests/ is on sys.path when it is not a package (pytest's default)
    from rtsp import RtspServer, rtsp_server  # noqa: F401 - rtsp_server is a fixture
except ImportError:  # tests/ became a package
    from tests.rtsp import RtspServer, rtsp_server  # noqa: F401

S = SourceState
STEP = 6  # grey level per frame index: 40 frames -> 0..234
CLIP_FRAMES = 40
CLIP_FPS = 30


def make_clip(
    path: Path, frames: int, fps: int = CLIP_FPS, size: tuple[int, int] = (64, 48),
    gop: int = 5, b_frames: int = 0, step: int = STEP, first_pts: int = 0,
) -> Path:
    """An H.264 MP4 (or what ``path``'s extension says) whose frame i is a flat grey of
    level i * step (short GOP), at pts ``first_pts + i`` frame intervals."""
    width, height = size
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.options = {"g": str(gop), "bf": str(b_frames)}
        for i in range(frames):
            image = np.full((height, width, 3), i * step, np.uint8)
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts = first_pts + i
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


def grey_index(frame: Frame) -> int:
    return int(round(float(frame.image.mean()) / STEP))


def wait_for(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def transitions(events: list) -> list[tuple[SourceState, SourceState]]:
    return [(e.previous, e.state) for e in events]


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_clip(tmp_path_factory.mktemp("clips") / "clip.mp4", CLIP_FRAMES)


@pytest.fixture(params=["thread", "process"])
def decode(request: pytest.FixtureRequest) -> str:
    """Where the source is decoded: the behaviour a consumer sees must not depend on it."""
    return request.param


# Starting the decode process (Python, numpy, PyAV) takes ~0.5 s on the 2-core VM.
START_BUDGET = {"thread": 0.5, "process": 10.0}


# ---------------------------------------------------------------------------
# Files


def test_file_delivers_every_frame_in_order(clip: Path, decode: str) -> None:
    events: list = []
    cap = open_source(str(clip), CaptureConfig(queue_depth=2), on_status=events.append, decode=decode)
    assert cap.kind is SourceKind.FILE and cap.policy is BufferPolicy.BLOCK
    frames: list[Frame] = []
    with cap:
        for i, frame in enumerate(cap):
            if i % 10 == 0:
                time.sleep(0.05)  # a slow consumer: the producer must wait, not drop
            frames.append(frame)

    assert [f.frame_id for f in frames] == list(range(CLIP_FRAMES))
    assert [grey_index(f) for f in frames] == list(range(CLIP_FRAMES))
    assert [f.pts for f in frames] == pytest.approx([i / CLIP_FPS for i in range(CLIP_FRAMES)])
    first = frames[0]
    assert first.image.dtype == np.uint8 and first.image.shape == (48, 64, 3)
    assert (first.width, first.height, first.source) == (64, 48, "clip")
    monotonic = [f.capture_monotonic for f in frames]
    assert monotonic == sorted(monotonic)
    assert abs(first.capture_time - time.time()) < 60

    stats = cap.stats()
    assert (stats.frames_decoded, stats.frames_delivered) == (CLIP_FRAMES, CLIP_FRAMES)
    assert sum(stats.dropped.values()) == 0
    assert cap.state is S.ENDED  # close() after the end keeps the terminal state
    assert transitions(events) == [(S.IDLE, S.CONNECTING), (S.CONNECTING, S.STREAMING),
                                   (S.STREAMING, S.ENDED)]
    assert cap.status_events() == events  # the drain saw what the callback saw
    assert cap.status_events() == []


def test_file_loop_keeps_frame_ids_increasing(tmp_path: Path, decode: str) -> None:
    short = make_clip(tmp_path / "short.mp4", 10)
    with open_source(str(short), CaptureConfig(loop=True), decode=decode) as cap:
        frames = [cap.read(timeout=5) for _ in range(25)]
    assert all(f is not None for f in frames)
    assert [f.frame_id for f in frames] == list(range(25))
    assert [grey_index(f) for f in frames] == [i % 10 for i in range(25)]
    assert frames[10].pts == pytest.approx(0.0)  # the stream's own time restarts
    assert cap.state is S.STOPPED


def test_a_status_callback_may_close_the_capture(clip: Path, decode: str) -> None:
    """Documented as re-entrant; with decode="process" the next read() raised
    AttributeError (the control socket was gone under the loop that read it)."""
    caps: list = []

    def close_when_streaming(event) -> None:
        if event.state is S.STREAMING:
            caps[0].close()

    cap = open_source(str(clip), CaptureConfig(), on_status=close_when_streaming, decode=decode)
    caps.append(cap)
    with cap:
        frames = list(cap)
    assert cap.state is S.STOPPED and len(frames) < CLIP_FRAMES


def test_a_looping_file_deleted_between_passes_fails_in_one_line(tmp_path: Path, decode: str, caplog) -> None:
    """Reopening it raised a UserError the capture took for a bug: a traceback, and
    "UserError: cannot read video file ..." as the error."""
    short = make_clip(tmp_path / "short.mp4", 10)
    with caplog.at_level(logging.WARNING), open_source(str(short), CaptureConfig(loop=True),
                                                       decode=decode) as cap:
        short.unlink()  # open already: the first pass is read to its end
        frames = list(cap)
    assert len(frames) == 10 and cap.state is S.FAILED
    assert cap.last_error == f"cannot read video file {short}: No such file or directory"
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"


def test_realtime_paces_a_file_at_its_frame_rate(clip: Path) -> None:
    with open_source(str(clip), CaptureConfig(realtime=True)) as cap:
        assert cap.policy is BufferPolicy.DROP_OLDEST  # realtime behaves as live
        paced = list(cap)
        stats = cap.stats()
    # Blocking: nothing is dropped, whatever pauses this process takes.
    with open_source(str(clip), CaptureConfig(realtime=True, policy="block")) as cap:
        every = list(cap)
    with open_source(str(clip)) as cap:
        unpaced = list(cap)

    def span(frames: list[Frame]) -> float:
        return frames[-1].capture_monotonic - frames[0].capture_monotonic

    def expected(frames: list[Frame]) -> float:
        return (frames[-1].frame_id - frames[0].frame_id) / CLIP_FPS  # 1.3 s for the whole clip

    # Dropping the oldest, a fast consumer loses a frame only to a pause of this process
    # (a full garbage collection, a loaded machine) longer than two frame intervals.
    assert stats.frames_decoded == CLIP_FRAMES
    assert len(paced) + stats.dropped.get("queue_full", 0) == CLIP_FRAMES
    assert len(paced) >= CLIP_FRAMES - 5
    assert 0.8 * expected(paced) < span(paced) < 1.6 * expected(paced)
    assert [f.frame_id for f in every] == list(range(CLIP_FRAMES))
    assert 0.8 * expected(every) < span(every) < 1.6 * expected(every)
    assert span(unpaced) < 0.5 * expected(every)


def test_a_paced_file_restarted_goes_on_where_it_was(clip: Path, decode: str) -> None:
    """A restarted tracker's paced file: the frames before the last one published are
    skipped, not played again (not waited for either), and the ids go on as the frames'
    numbers."""
    start = CLIP_FRAMES - 6
    cfg = CaptureConfig(realtime=True, policy="block", first_frame_id=start, skip_frames=start)
    with open_source(str(clip), cfg, decode=decode) as cap:
        frames = list(cap)
        stats = cap.stats()
    assert [f.frame_id for f in frames] == list(range(start, CLIP_FRAMES)) and cap.state is S.ENDED
    assert [f.pts for f in frames] == pytest.approx([i / CLIP_FPS for i in range(start, CLIP_FRAMES)])
    assert stats.frames_decoded == CLIP_FRAMES and not any(stats.dropped.values())  # skipped: decoded
    with open_source(str(clip), replace(cfg, skip_frames=CLIP_FRAMES), decode=decode) as cap:
        assert list(cap) == [] and cap.state is S.ENDED  # it had reached the end: ended, not failed


@pytest.mark.parametrize("found", [True, False])
@pytest.mark.parametrize(("name", "fps", "first_pts"), [
    ("clip.mp4", CLIP_FPS, 0),
    # A recording's timestamps, 20,000 s in at 60 fps: in seconds, frames 17 ms apart
    # passed for one frame within a relative 1e-6.
    ("late.mkv", 60, 20_000 * 60),
    # MPEG-TS timestamps may start over (clips joined): a pts does not name one frame,
    # so it is decoded from the start, and says so only at -v.
    ("clip.ts", CLIP_FPS, 0),
])
def test_a_restarted_file_seeks_to_its_last_frame_instead_of_decoding_up_to_it(
        tmp_path: Path, decode: str, found: bool, name: str, fps: int, first_pts: int,
        frames_decoded: list[int], caplog: pytest.LogCaptureFixture) -> None:
    """Given the pts of the last frame to skip, the file seeks to the key frame before it
    (an hour into a recording, decoding up to it took minutes): the same frames, ids
    and counts as decoding from the start.  A pts no frame has (a file's timestamps
    changed) falls back to decoding from the start."""
    frames, start, step = 60, 47, 4
    clip = make_clip(tmp_path / name, frames, fps=fps, gop=10, b_frames=2, step=step, first_pts=first_pts)
    seeks = not name.endswith(".ts")
    with open_source(str(clip), CaptureConfig(policy="block")) as cap:
        every = list(cap)
    assert [round(float(f.image.mean()) / step) for f in every] == list(range(frames))
    frames_decoded[0] = 0  # from here on
    pts = every[start - 1].pts + (0 if found else 0.5 / fps)
    cfg = CaptureConfig(policy="block", first_frame_id=start, skip_frames=start, skip_to_pts=pts)
    with caplog.at_level(logging.WARNING, logger="streamtrack.capture"):
        with open_source(str(clip), cfg, decode=decode) as cap:
            got = list(cap)
            stats = cap.stats()
    assert [f.frame_id for f in got] == list(range(start, frames)) and cap.state is S.ENDED
    assert [round(float(f.image.mean()) / step) for f in got] == list(range(start, frames))
    assert [f.pts for f in got] == [f.pts for f in every[start:]]
    assert stats.frames_decoded == frames and stats.decode_errors == 0
    assert ("cannot seek to frame 47" in caplog.text) is (seeks and not found and decode == "thread")
    if decode == "thread":  # counted in this process
        # From the key frame at 40 (or the one before): not the 60 frames from the start.
        assert frames_decoded[0] <= frames - 30 if seeks and found else frames_decoded[0] >= frames


def test_a_paced_file_starts_playing_at_the_first_read(clip: Path, decode: str) -> None:
    """Started, then not read for a while (the tracker loading its model): a player's
    "play" is the first read, so the file starts at its first frame, still paced."""
    with open_source(str(clip), CaptureConfig(realtime=True), decode=decode) as cap:
        time.sleep(1.5)  # longer than the whole clip (1.3 s)
        assert cap.state is S.STREAMING  # ready to play, not "connecting"
        frames = list(cap)
        stats = cap.stats()
    # The start is there (before: the clip had played out, only its last frames were left);
    # a consumer slow to wake may still find frame 1 or 2 newer than 0 on a loaded machine.
    assert frames[0].frame_id <= 2
    assert len(frames) + stats.dropped.get("queue_full", 0) == CLIP_FRAMES
    assert len(frames) >= CLIP_FRAMES - 5
    span = frames[-1].capture_monotonic - frames[0].capture_monotonic
    assert span > 0.8 * (frames[-1].frame_id - frames[0].frame_id) / CLIP_FPS  # still paced


def test_realtime_slow_consumer_gets_newest_frames_and_drops_are_counted(clip: Path,
                                                                        decode: str) -> None:
    got: list[Frame] = []
    with open_source(str(clip), CaptureConfig(realtime=True), decode=decode) as cap:
        while True:
            decoded = cap.stats().frames_decoded
            frame = cap.read(timeout=3)
            if frame is None:
                break
            if got:  # after a pause, the newest frame decoded (or a newer one) is handed over
                assert frame.frame_id >= decoded - 1
            got.append(frame)
            time.sleep(0.15)  # ~4 frame intervals
        stats = cap.stats()
        assert cap.state is S.ENDED

    ids = [f.frame_id for f in got]
    assert ids == sorted(set(ids)) and len(ids) < CLIP_FRAMES
    assert [grey_index(f) for f in got] == ids  # converted at hand-off, still the right frame
    assert stats.dropped["queue_full"] > 0
    assert stats.frames_decoded == CLIP_FRAMES
    assert stats.frames_delivered + stats.dropped["queue_full"] == CLIP_FRAMES


# ---------------------------------------------------------------------------
# Buffering strategies


def _counting_raw(i: int, conversions: list[int]) -> RawFrame:
    def convert() -> np.ndarray:
        conversions.append(i)
        return np.full((2, 2, 3), i, np.uint8)

    return RawFrame(pts=float(i), convert=convert)


def test_drop_oldest_converts_only_the_frame_next_in_line() -> None:
    conversions: list[int] = []
    drops: list[str] = []
    buffer = DropOldestBuffer(2, drops.append)
    for i in range(10):
        assert buffer.put(PendingFrame(_counting_raw(i, conversions), i, "t"))
    # Only frame 0 met an empty queue (converted on the producer side, overlapping the
    # consumer's step); frames queued behind others were dropped unconverted.
    assert conversions == [0]
    assert drops == ["queue_full"] * 8
    # The consumer gets the newest frame; the one queued before it is dropped unconverted.
    item = buffer.get(timeout=0)
    assert item is not None and item.frame_id == 9 and drops == ["queue_full"] * 9
    assert conversions == [0]  # not yet: at hand-off
    assert item.frame().image[0, 0, 0] == 9 and conversions == [0, 9]
    item.frame()
    assert conversions == [0, 9]  # converted once
    assert buffer.get(timeout=0) is None and len(buffer) == 0
    # A consumer that keeps up always takes a frame converted ahead of the hand-off.
    assert buffer.put(PendingFrame(_counting_raw(10, conversions), 10, "t"))
    assert conversions == [0, 9, 10]
    assert buffer.get(timeout=0).frame().image[0, 0, 0] == 10 and conversions == [0, 9, 10]
    assert drops == ["queue_full"] * 9


def test_blocking_buffer_waits_for_the_consumer_and_releases_on_finish() -> None:
    conversions: list[int] = []
    buffer = BlockingBuffer(2, lambda reason: pytest.fail(f"dropped: {reason}"))
    for i in range(2):
        assert buffer.put(PendingFrame(_counting_raw(i, conversions), i, "t"))
    assert conversions == [0, 1]  # every frame will be delivered: convert early
    results: list[bool] = []

    def put(i: int) -> None:
        results.append(buffer.put(PendingFrame(_counting_raw(i, conversions), i, "t")))

    blocked = threading.Thread(target=put, args=(2,))
    blocked.start()
    time.sleep(0.1)
    assert blocked.is_alive()  # full: the producer waits
    assert buffer.get(timeout=0).frame_id == 0
    blocked.join(2)
    assert results == [True]

    blocked = threading.Thread(target=put, args=(3,))
    blocked.start()
    time.sleep(0.05)
    buffer.finish()  # stopping releases a waiting producer
    blocked.join(2)
    assert results == [True, False]
    assert [buffer.get(timeout=0).frame_id for _ in range(2)] == [1, 2]
    assert buffer.get(timeout=5) is None  # finished and empty: no waiting


# ---------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("/nonexistent/clip.mp4", "video file not found: /nonexistent/clip.mp4"),
        ("foo://camera/1", "unsupported video source scheme 'foo://'"),
        ("rtsp:///path", "video source URL has no host"),
        ("   ", "empty video source"),
        ("http://[::1", "malformed video source URL http://\\[::1: Invalid IPv6 URL"),
        ("rtsp://127.0.0.1:99999/x", "malformed video source URL .*: Port out of range"),
        ("rtsp://127.0.0.1:abc/x", "malformed video source URL"),
        ("-1", "webcam index must be >= 0, got -1"),
        ("/dev/null", "/dev/null is not a video device"),
        ("file://media/clip.mp4", "a file:// URL names a local path .*got host 'media'"),
        ("file:///nonexistent/a%20b.mp4", "video file not found: /nonexistent/a b.mp4"),
    ],
)
def test_bad_source_strings_fail_fast_with_one_line(source: str, message: str) -> None:
    start = time.monotonic()
    with pytest.raises(UserError, match=message) as info:
        open_source(source)
    assert "\n" not in str(info.value)
    assert time.monotonic() - start < 1.0


def test_directory_is_not_a_video(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="is a directory"):
        open_source(str(tmp_path))


def stalling_avi(path: Path, tail_bytes: int = 1_150_000_000) -> Path:
    """An MJPEG AVI of 10 good frames followed by a long run of zeros (a damaged download):
    libavformat spends seconds searching the zeros for the next packet. The zeros are a hole
    of a sparse file, so the file costs a few KB of disk whatever its length."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mjpeg", rate=30)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuvj420p"
        for i in range(10):
            image = np.full((48, 64, 3), i * STEP, np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode(None))
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size + tail_bytes)
    return path


def test_a_file_that_stalls_fails_in_one_line(tmp_path: Path, caplog) -> None:
    bad = stalling_avi(tmp_path / "damaged.avi")
    with caplog.at_level("WARNING", logger="streamtrack.capture"), \
            open_source(str(bad), CaptureConfig(read_timeout=0.5)) as cap:
        frames = list(cap)
    assert len(frames) == 10 and cap.state is S.FAILED
    assert cap.last_error.startswith("TimeoutError: no video data within the read timeout")
    assert [(r.getMessage(), r.exc_info) for r in caplog.records] == [
        (f"damaged: capture failed: {cap.last_error}", None)]  # no traceback


def test_a_named_pipe_is_refused_before_it_can_block(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.mp4"
    os.mkfifo(fifo)  # opening it would wait for a writer; reading it twice loses data
    with pytest.raises(UserError, match="not a regular file"):
        open_source(str(fifo))


def test_paths_spaces_and_file_urls_name_the_file(tmp_path: Path, clip: Path) -> None:
    spaced = tmp_path / " a clip ü.mp4"
    spaced.symlink_to(clip)
    for source in (spaced, str(spaced), spaced.as_uri()):
        spec = parse_source(source)
        assert spec.kind is SourceKind.FILE and spec.target == str(spaced), source
    assert parse_source("RTSP://cam.local/x").target == "rtsp://cam.local/x"  # FFmpeg's spelling
    for bad in (b"clip.mp4", None, 0.5):
        with pytest.raises(UserError, match="a video source is a path, URL or webcam index"):
            parse_source(bad)  # type: ignore[arg-type]


def _rotate_display(path: Path, width: int, height: int) -> Path:
    """Give an MP4 the display matrix of a phone video shot in portrait (shown turned 90
    degrees clockwise), as ``ffmpeg -metadata:s:v rotate=90`` writes it."""
    data = bytearray(path.read_bytes())
    tkhd = data.find(b"tkhd")
    assert tkhd > 0 and data[tkhd + 4] == 0  # version 0 header
    matrix = tkhd + 4 + 4 + 20 + 8 + 8
    one, minus_one = 0x10000, (-0x10000) & 0xFFFFFFFF
    values = [0, one, 0, minus_one, 0, 0, height << 16, 0, 0x40000000]
    data[matrix : matrix + 36] = b"".join(v.to_bytes(4, "big") for v in values)
    path.write_bytes(data)
    return path


def test_a_rotated_video_is_delivered_as_players_show_it(tmp_path: Path, decode: str) -> None:
    path = tmp_path / "portrait.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=CLIP_FPS)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        image = np.zeros((48, 64, 3), np.uint8)
        image[:16, :16] = 255  # a marker in the stored top-left corner
        for i in range(3):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts = i
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    _rotate_display(path, 64, 48)
    with open_source(str(path), decode=decode) as cap:
        frames = list(cap)
    assert len(frames) == 3
    for f in frames:
        assert f.image.shape == (64, 48, 3)  # portrait
        assert f.image[:16, -16:].mean() > 200 and f.image[:, :16].mean() < 30  # now top-right


@pytest.mark.parametrize("content", [b"this is not a video\n" * 200, b"", bytes(range(256)) * 64])
def test_corrupt_file_fails_on_start(tmp_path: Path, content: bytes, decode: str) -> None:
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(content)
    cap = open_source(str(bad), decode=decode)
    start = time.monotonic()
    with pytest.raises(UserError, match=r"cannot read video file .*bad\.mp4: ") as info:
        cap.start()
    assert "\n" not in str(info.value)
    assert time.monotonic() - start < 1.5 + START_BUDGET[decode]
    assert cap.state is S.FAILED and cap.last_error == str(info.value)
    cap.close()


@pytest.mark.parametrize(("source", "device"), [("63", "/dev/video63"),
                                                ("/dev/video63", "/dev/video63")])
def test_missing_webcam_fails_fast(source: str, device: str) -> None:
    cap = open_source(source)
    assert cap.kind is SourceKind.WEBCAM
    start = time.monotonic()
    with pytest.raises(UserError, match=f"webcam .* not found: {device} does not exist"):
        cap.start()
    assert time.monotonic() - start < 1.0
    assert cap.state is S.FAILED
    cap.close()


@pytest.mark.parametrize(
    "config",
    [dict(policy="fifo"), dict(queue_depth=0), dict(read_timeout=0), dict(jitter=1.5),
     dict(give_up_after=-1)],
)
def test_bad_config_is_a_user_error(config: dict) -> None:
    with pytest.raises(UserError):
        CaptureConfig(**config)


def test_source_strings_are_classified() -> None:
    assert parse_source("0").target == 0 and parse_source(2).kind is SourceKind.WEBCAM
    assert parse_source("/dev/video0").kind is SourceKind.WEBCAM
    spec = parse_source("rtsp://user:secret@10.0.0.5:554/stream1")
    assert spec.kind is SourceKind.NETWORK and spec.name == "10.0.0.5/stream1"
    assert "secret" not in spec.display
    assert parse_source("https://example.com/live.m3u8").kind is SourceKind.NETWORK
    # Credentials some cameras take as query parameters are hidden too; the rest stays.
    shown = parse_source("rtsp://10.0.0.5/cam?channel=1&user=admin&password=s3cret&PWD=x;token=t#a").display
    assert shown == "rtsp://10.0.0.5/cam?channel=1&user=admin&password=***&PWD=***;token=***#a", shown


def test_a_server_that_never_answers_is_a_timeout_and_ffmpeg_tags_are_no_errnos() -> None:
    """FFmpeg reports an RTSP open cut off by the open timeout as "Invalid data found when
    processing input", with its error tag shown as an errno: say what happened instead."""
    from streamtrack.sources import describe_error, open_pyav

    with socket.socket() as server:  # accepts, never answers
        server.bind(("127.0.0.1", 0))
        server.listen(4)
        spec = parse_source(f"rtsp://127.0.0.1:{server.getsockname()[1]}/cam")
        with pytest.raises(TimeoutError) as caught:
            open_pyav(spec, 1.0, 1.0)
    assert describe_error(caught.value, spec) == "TimeoutError: no answer within the open timeout (1 s)"
    tagged = av.error.HTTPUnauthorizedError(-825242872, "Server returned 401 Unauthorized")
    assert "[Errno" not in describe_error(tagged, spec), describe_error(tagged, spec)
    assert describe_error(ConnectionRefusedError(111, "Connection refused"), spec) == \
        "ConnectionRefusedError: [Errno 111] Connection refused"
    assert describe_error(OSError(93, "Protocol not supported"), spec).endswith(
        "(the camera refused RTP over TCP and over UDP)")  # UDP is tried when TCP is refused
    assert describe_error(OSError(93, "Protocol not supported"), parse_source("rtsps://h/c")).endswith(
        "(streamtrack asks for RTSPS over TCP: this camera may offer only UDP)")


# ---------------------------------------------------------------------------
# State machine


def test_state_machine_rules(clip: Path) -> None:
    for state in (S.STOPPED, S.ENDED, S.FAILED):
        assert TRANSITIONS[state] == frozenset()
    reachable, todo = {S.IDLE}, [S.IDLE]
    while todo:
        for nxt in TRANSITIONS[todo.pop()] - reachable:
            reachable.add(nxt)
            todo.append(nxt)
    assert reachable == set(S)

    cap = open_source(str(clip))
    with pytest.raises(RuntimeError, match="start"):
        cap.read()
    cap.close()
    assert cap.state is S.STOPPED
    with pytest.raises(RuntimeError, match="stopped"):
        cap.start()  # a closed source stays closed


# ---------------------------------------------------------------------------
# Webcams, through a fake cv2.VideoCapture


class FakeCamera:
    """A cv2.VideoCapture stand-in: BGR frames with B = frame count, R = 200."""

    def __init__(self, fail_after: int | None = None, pause_at: int | None = None,
                 pause: float = 0.0, opens: bool = True, fps: float = 50.0) -> None:
        self.fail_after, self.pause_at, self.pause = fail_after, pause_at, pause
        self.opens, self.fps = opens, fps
        self.count = 0
        self.released = False
        self.settings: dict[int, float] = {}

    def isOpened(self) -> bool:  # noqa: N802 - OpenCV's name
        return self.opens and not self.released

    def read(self) -> tuple[bool, np.ndarray | None]:
        if self.released or (self.fail_after is not None and self.count >= self.fail_after):
            return False, None  # unplugged
        time.sleep(self.pause if self.count == self.pause_at else 1.0 / self.fps)
        image = np.zeros((24, 32, 3), np.uint8)
        image[..., 0] = self.count % 256
        image[..., 2] = 200
        self.count += 1
        return True, image

    def get(self, prop: int) -> float:
        if prop == cv2.CAP_PROP_FPS:
            return self.fps
        if prop == cv2.CAP_PROP_POS_MSEC:
            return self.count * 1000.0 / self.fps
        return 0.0

    def set(self, prop: int, value: float) -> bool:
        self.settings[prop] = value
        return True

    def release(self) -> None:
        self.released = True


class FakeFactory:
    """Hands out the given cameras in order, then healthy ones."""

    def __init__(self, *cameras: FakeCamera) -> None:
        self.queue = list(cameras)
        self.opened: list[tuple[str | int, FakeCamera]] = []

    def __call__(self, target: str | int) -> FakeCamera:
        camera = self.queue.pop(0) if self.queue else FakeCamera()
        self.opened.append((target, camera))
        return camera


def test_fake_webcam_streams_rgb_frames_and_releases_on_close() -> None:
    factory = FakeFactory()
    cap = open_source("0", webcam_factory=factory)
    assert cap.kind is SourceKind.WEBCAM and cap.policy is BufferPolicy.DROP_OLDEST
    with cap:
        frames = [cap.read(timeout=2) for _ in range(5)]
        assert cap.state is S.STREAMING
    target, camera = factory.opened[0]
    assert target == 0 and camera.released and cap.state is S.STOPPED
    assert camera.settings[cv2.CAP_PROP_BUFFERSIZE] == 1  # no driver-side latency
    ids = [f.frame_id for f in frames]
    assert ids == sorted(set(ids))
    for frame in frames:
        assert frame.image.shape == (24, 32, 3)
        assert frame.image[0, 0, 0] == 200  # BGR became RGB: red first
        assert frame.image[0, 0, 2] == frame.frame_id  # blue = the camera's count
        assert frame.pts == pytest.approx((frame.frame_id + 1) / camera.fps)


def test_fake_webcam_unplugged_reconnects_with_continuing_ids() -> None:
    events: list = []
    factory = FakeFactory(FakeCamera(fail_after=5))
    config = CaptureConfig(reconnect_initial=0.05, reconnect_max=0.2)
    with open_source("/dev/video0", config, on_status=events.append,
                     webcam_factory=factory) as cap:
        assert wait_for(lambda: cap.stats().reconnects == 1, 3)
        frames = [cap.read(timeout=2) for _ in range(8)]
        stats = cap.stats()
    assert [target for target, _ in factory.opened] == ["/dev/video0", "/dev/video0"]
    assert all(camera.released for _, camera in factory.opened)
    ids = [f.frame_id for f in frames]
    assert ids == sorted(set(ids)) and ids[-1] >= 8
    assert (S.STREAMING, S.RECONNECTING) in transitions(events)
    assert (S.RECONNECTING, S.STREAMING) in transitions(events)
    assert "end of stream" in stats.last_error


def test_webcam_that_does_not_open_is_a_user_error() -> None:
    cap = open_source("1", webcam_factory=FakeFactory(FakeCamera(opens=False)))
    with pytest.raises(UserError, match="cannot open webcam 1"):
        cap.start()
    assert cap.state is S.FAILED


def test_silent_live_source_goes_stale_then_recovers() -> None:
    events: list = []
    factory = FakeFactory(FakeCamera(pause_at=3, pause=2.5))
    config = CaptureConfig(stale_after=1.0)
    with open_source("0", config, on_status=events.append, webcam_factory=factory) as cap:
        assert wait_for(lambda: cap.state is S.STALE, 5)
        assert wait_for(lambda: cap.state is S.STREAMING, 5)
    # A pause of this process longer than stale_after may add a stale spell of its own.
    steps = transitions(events)
    assert steps[:2] == [(S.IDLE, S.CONNECTING), (S.CONNECTING, S.STREAMING)]
    assert steps[-1] == (S.STREAMING, S.STOPPED)
    assert set(steps[2:-1]) == {(S.STREAMING, S.STALE), (S.STALE, S.STREAMING)}
    assert steps[2:-1:2] == [(S.STREAMING, S.STALE)] * (len(steps[2:-1]) // 2)


@pytest.mark.skipif(not os.environ.get("STREAMTRACK_TEST_WEBCAM"),
                    reason="real webcam test: set STREAMTRACK_TEST_WEBCAM=0 (index or /dev/videoN)")
def test_real_webcam() -> None:
    with open_source(os.environ["STREAMTRACK_TEST_WEBCAM"]) as cap:
        frame = cap.read(timeout=10)
    assert frame is not None and frame.image.ndim == 3 and frame.image.shape[2] == 3


# ---------------------------------------------------------------------------
# RTSP against a real GStreamer server

LIVE = dict(reconnect_initial=0.05, reconnect_max=0.5, open_timeout=3.0, read_timeout=3.0)


def test_rtsp_streams_and_resumes_after_server_restart(rtsp_server: RtspServer, decode: str) -> None:
    events: list = []
    ids: list[int] = []
    cap = open_source(rtsp_server.url, CaptureConfig(**LIVE), on_status=events.append, decode=decode)
    assert cap.kind is SourceKind.NETWORK and cap.policy is BufferPolicy.DROP_OLDEST
    with cap:
        frame = cap.read(timeout=5)
        assert frame is not None and frame.image.shape == (120, 160, 3)
        assert cap.state is S.STREAMING
        ids += [frame.frame_id] + [cap.read(timeout=2).frame_id for _ in range(5)]

        rtsp_server.stop()
        assert wait_for(lambda: cap.state is S.RECONNECTING, 5)
        while (frame := cap.read(timeout=0)) is not None:
            ids.append(frame.frame_id)
        time.sleep(0.5)  # a few refused attempts
        rtsp_server.start()  # same port
        back = time.monotonic()
        assert wait_for(lambda: cap.state is S.STREAMING, 5)
        resumed_in = time.monotonic() - back
        ids += [cap.read(timeout=2).frame_id for _ in range(5)]
        stats = cap.stats()

    # Back soon after the server: backoff capped at 0.5 s plus the RTSP handshake (up to about
    # 1 s on a loaded 2-core machine).
    assert resumed_in < 5.0
    assert ids == sorted(set(ids))  # monotonic across the reconnect, never reused
    assert stats.reconnects == 1 and stats.reconnect_attempts >= 1
    assert (S.STREAMING, S.RECONNECTING) in transitions(events)
    assert (S.RECONNECTING, S.STREAMING) in transitions(events)
    assert cap.state is S.STOPPED


def test_refusing_url_reconnects_then_gives_up_without_hanging(decode: str) -> None:
    events: list = []
    url = f"rtsp://viewer:secret@127.0.0.1:{free_port()}/none"
    config = CaptureConfig(**{**LIVE, "reconnect_max": 0.2}, give_up_after=1.0)
    cap = open_source(url, config, on_status=events.append, decode=decode)
    started = time.monotonic()
    cap.start()  # network sources connect on the capture thread
    assert time.monotonic() - started < START_BUDGET[decode]
    started = time.monotonic()  # the give-up clock started with the source
    assert wait_for(lambda: cap.state is S.RECONNECTING, 2)
    assert wait_for(lambda: cap.state is S.FAILED, 4)
    assert 0.8 < time.monotonic() - started < 3.0
    t0 = time.monotonic()
    assert cap.read(timeout=5) is None and time.monotonic() - t0 < 0.5
    stats = cap.stats()
    assert "gave up after 1s" in stats.last_error and "refused" in stats.last_error.lower()
    assert "secret" not in stats.last_error  # credentials never reach errors
    assert stats.reconnect_attempts >= 2
    assert transitions(events) == [(S.IDLE, S.CONNECTING), (S.CONNECTING, S.RECONNECTING),
                                   (S.RECONNECTING, S.FAILED)]
    assert events[-1].error == stats.last_error
    cap.close()
    assert cap.state is S.FAILED


@pytest.fixture
def http_folder(tmp_path: Path):
    """A plain HTTP server on 127.0.0.1 serving ``tmp_path``: (folder, base URL)."""
    import functools
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(tmp_path)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield tmp_path, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_a_video_file_over_http_is_read_whole_once(http_folder) -> None:
    folder, base = http_folder
    make_clip(folder / "clip.mp4", 12)
    events: list = []
    config = CaptureConfig(**LIVE, policy="block")
    with open_source(f"{base}/clip.mp4", config, on_status=events.append) as cap:
        frames = [f for f in cap]
        assert cap.state is S.ENDED
    assert [grey_index(f) for f in frames] == list(range(12))  # the first frames too
    assert S.RECONNECTING not in {e.state for e in events}  # its end is not a disconnect


def test_a_video_file_over_http_with_realtime_plays_at_its_frame_rate(http_folder) -> None:
    """Decoded as fast as it downloads, a slower tracker would get a few of its frames."""
    folder, base = http_folder
    make_clip(folder / "clip.mp4", 12, fps=20)
    # Blocking, so a pause of this process drops nothing; pacing is what is tested.
    with open_source(f"{base}/clip.mp4", CaptureConfig(realtime=True, policy="block")) as cap:
        got, started = [], None
        while (frame := cap.read(timeout=5)) is not None:
            started = started or time.monotonic()
            got.append(grey_index(frame))
            time.sleep(0.03)  # a consumer slower than decoding, faster than 20 fps
        took = time.monotonic() - started
        assert cap.state is S.ENDED
    assert got == list(range(12)) and took >= 11 / 20 * 0.8


def test_a_video_file_over_http_waiting_to_be_played_is_not_stale(http_folder) -> None:
    """With --realtime its first frame waits for the first read (the model loading): no
    frame comes, and none is late."""
    folder, base = http_folder
    make_clip(folder / "clip.mp4", 6, fps=20)
    events: list = []
    config = CaptureConfig(realtime=True, policy="block", stale_after=0.3)
    with open_source(f"{base}/clip.mp4", config, on_status=events.append) as cap:
        assert wait_for(lambda: cap.state is S.STREAMING, 5)
        time.sleep(1.0)  # more than three times stale_after, nothing read
        assert cap.state is S.STREAMING
        assert [grey_index(f) for f in cap] == list(range(6))
    assert S.STALE not in {e.state for e in events}


def test_a_url_the_server_does_not_have_fails_at_once(http_folder, decode: str) -> None:
    _, base = http_folder
    cap = open_source(f"{base}/missing.mp4", CaptureConfig(**LIVE), decode=decode).start()
    assert wait_for(lambda: cap.state is S.FAILED, 5 + START_BUDGET[decode])
    assert "404" in cap.last_error
    cap.close()


def test_a_server_that_accepts_and_never_answers_is_a_timeout_in_words() -> None:
    """Not libavformat's "Immediate exit requested" (the interrupt that ends its wait)."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)  # the kernel accepts the connections; nothing answers
        url = f"http://127.0.0.1:{server.getsockname()[1]}/stream"
        config = CaptureConfig(**{**LIVE, "open_timeout": 0.5}, give_up_after=1.0)
        cap = open_source(url, config).start()
        try:
            assert wait_for(lambda: cap.state is S.FAILED, 10)
        finally:
            cap.close()
    assert "TimeoutError: no answer within the open timeout (0.5 s)" in cap.stats().last_error


def test_an_rtmp_source_connects_to_the_server() -> None:
    """FFmpeg's RTMP takes a "timeout" option as seconds to wait for a publisher, and
    listened on the camera's address: the server was never contacted."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        server.settimeout(10)
        url = f"rtmp://127.0.0.1:{server.getsockname()[1]}/live/cam"
        cap = open_source(url, CaptureConfig(**LIVE)).start()
        try:
            connection, _ = server.accept()  # socket.timeout here: it never connected
            connection.close()
        finally:
            cap.close()
    with socket.socket() as held:  # bound, not listening: nothing answers there
        held.bind(("127.0.0.1", 0))
        url = f"rtmp://127.0.0.1:{held.getsockname()[1]}/live/cam"
        cap = open_source(url, CaptureConfig(**LIVE, give_up_after=0.5)).start()
        try:
            assert wait_for(lambda: cap.state is S.FAILED, 10)
        finally:
            cap.close()
    assert "ConnectionRefusedError" in cap.stats().last_error  # not "no answer" from a listener


def test_refusing_url_keeps_retrying_by_default_and_closes_fast() -> None:
    cap = open_source(f"rtsp://127.0.0.1:{free_port()}/none", CaptureConfig(**LIVE)).start()
    time.sleep(0.8)
    assert cap.state is S.RECONNECTING and cap.stats().reconnect_attempts >= 2
    started = time.monotonic()
    cap.close()
    assert time.monotonic() - started < 1.0 and cap.state is S.STOPPED


def test_rtsp_helper_names_the_packages_when_gstreamer_is_missing() -> None:
    if importlib.util.find_spec("gi") is not None:
        pytest.skip("this Python has gi, so it cannot play a machine without GStreamer")
    server = RtspServer(python=sys.executable)  # the venv's Python: no gi
    with pytest.raises(pytest.fail.Exception, match="gir1.2-gst-rtsp-server-1.0"):
        server.start()
    server.close()


# ---------------------------------------------------------------------------
# Clean shutdown


def _fd_count() -> int:
    gc.collect()  # files held by earlier tests' garbage close now, not between two counts
    return len(os.listdir("/proc/self/fd"))


def _capture_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("capture-")]


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd (Linux)")
def test_close_joins_threads_and_leaks_no_fds(clip: Path, rtsp_server: RtspServer) -> None:
    def one_round() -> None:
        # A file with a full blocking queue: the producer is waiting in put().
        cap = open_source(str(clip), CaptureConfig(queue_depth=1)).start()
        assert cap.read(timeout=2) is not None
        time.sleep(0.05)
        cap.close()
        for source, factory in ((rtsp_server.url, None), ("0", FakeFactory())):
            cap = open_source(source, CaptureConfig(**LIVE), webcam_factory=factory).start()
            assert cap.read(timeout=5) is not None
            cap.close()
            assert cap.state is S.STOPPED

    one_round()  # warm-up: libraries may open files once, on first use
    before = _fd_count()
    for _ in range(2):
        one_round()
    assert _capture_threads() == []
    assert _fd_count() == before


def test_server_absent_at_start_then_appears(tmp_path: Path, decode: str) -> None:
    """Retries while nothing listens, streams once the server comes up (a synthetic clip)."""
    from streamtrack.synthetic import make_clip, write_video

    clip_path = write_video(make_clip(90, 160, 120).frames, tmp_path / "clip.mp4", gop=10)
    server = RtspServer(name="late", extra_args=("--clip", str(clip_path)))
    server.port = free_port()
    url = f"rtsp://127.0.0.1:{server.port}/late"
    events: list = []
    cap = open_source(url, CaptureConfig(**LIVE), on_status=events.append, decode=decode).start()
    try:
        assert wait_for(lambda: cap.state is S.RECONNECTING, 3)
        assert wait_for(lambda: cap.stats().reconnect_attempts >= 2, 3)
        server.start()
        frame = cap.read(timeout=5)
        assert frame is not None and frame.image.shape == (120, 160, 3)
        assert cap.state is S.STREAMING
        assert (S.RECONNECTING, S.STREAMING) in transitions(events)
    finally:
        cap.close()
        server.close()


def test_a_camera_offering_rtsp_over_udp_only_is_streamed_over_udp(decode: str, caplog) -> None:
    """TCP interleaving is asked for first (no loss artefacts); a camera that refuses it
    (461 Unsupported transport) is read over UDP instead of not at all, and reconnects
    go straight to UDP."""
    from streamtrack import sources

    server = RtspServer(name="udp", extra_args=("--udp-only",))
    url = server.start()
    try:
        with caplog.at_level("WARNING", logger="streamtrack.sources"):
            with open_source(url, CaptureConfig(**LIVE), decode=decode) as cap:
                frames = [cap.read(timeout=5) for _ in range(5)]
                state = cap.state
            with open_source(url, CaptureConfig(**LIVE), decode=decode) as again:
                frames.append(again.read(timeout=5))
    finally:
        server.close()
        sources._RTSP_OVER_UDP.discard(url)
    assert all(frame is not None and frame.image.shape == (120, 160, 3) for frame in frames)
    assert state is S.STREAMING
    if decode == "thread":  # the process decoder logs in its child; once (per connect there)
        assert [r.getMessage() for r in caplog.records] == [
            f"source {url}: the camera offers RTSP over UDP only; using UDP (lost packets show as "
            "damaged frames)"]


def test_rtsp_stream_with_a_single_keyframe_is_decoded_from_its_start(tmp_path: Path,
                                                                      decode: str) -> None:
    """The packets read while the stream is probed hold its first keyframe: they must be
    decoded, not dropped (a camera with a long keyframe interval would show nothing until
    the next one; this stream has no next one)."""
    from streamtrack.synthetic import write_video

    levels = [np.full((120, 160, 3), STEP * i, np.uint8) for i in range(30)]
    server = RtspServer(name="onekey", extra_args=(
        "--clip", str(write_video(levels, tmp_path / "onekey.mp4", fps=10, gop=1000))))
    try:
        cap = open_source(server.start(), CaptureConfig(**LIVE), decode=decode)
        with cap:
            first = cap.read(timeout=5)
            assert first is not None, "no frame decoded from a stream with one keyframe"
            later = [cap.read(timeout=2) for _ in range(5)]
    finally:
        server.close()
    assert round(first.image.mean() / STEP) <= 3  # the clip's start (the newest of a burst)
    assert all(frame is not None for frame in later)


def test_frozen_camera_gives_up_after_one_read_timeout_without_a_stale_frame(
        rtsp_server: RtspServer, decode: str) -> None:
    """A camera that stops sending and keeps the connection: the frame FFmpeg holds back
    is not delivered as new when the read times out, and the source reconnects then,
    not a second read timeout later."""
    config = CaptureConfig(**{**LIVE, "read_timeout": 1.5, "stale_after": None})
    with open_source(rtsp_server.url, config, decode=decode) as cap:
        assert all(cap.read(timeout=5) is not None for _ in range(5))
        rtsp_server.freeze()
        frozen = time.monotonic()
        late = []
        while cap.state is S.STREAMING and time.monotonic() - frozen < 10:
            frame = cap.read(timeout=0.05)
            if frame is not None and frame.capture_monotonic > frozen + 1.0:  # the held frame: +1.5 s
                late.append(round(frame.capture_monotonic - frozen, 2))
        gave_up = time.monotonic() - frozen
    assert late == [], f"frames delivered {late} s after the camera froze"
    assert gave_up < 2 * config.read_timeout  # one read timeout and a little


def test_a_consumer_back_from_a_long_pause_gets_a_fresh_frame(clip: Path, decode: str) -> None:
    """Away longer than any buffer lasts (a paused tracker): the first frame back is
    still the newest, not one from before the pause."""
    # Looping, so the clip cannot end during the pause on a slow machine.
    with open_source(str(clip), CaptureConfig(realtime=True, loop=True), decode=decode) as cap:
        assert cap.read(timeout=10) is not None
        time.sleep(0.6)  # 18 frames at 30 fps: more than the process's ring of 8 holds
        frame = cap.read(timeout=2)
        age = time.monotonic() - frame.capture_monotonic
        decoded = cap.stats().frames_decoded
    assert age < 0.3, f"a frame {age:.2f} s old after the pause"  # one from before: >= 0.6
    assert frame.frame_id >= decoded - 3


def test_slow_consumer_on_live_stream_gets_fresh_frames(rtsp_server: RtspServer, decode: str) -> None:
    """A consumer 5x slower than the stream: bounded queue, drops counted, frames stay recent."""
    cap = open_source(rtsp_server.url, CaptureConfig(**LIVE, queue_depth=2), decode=decode).start()
    ages, queued = [], []
    try:
        assert cap.read(timeout=5) is not None
        for _ in range(8):
            time.sleep(0.15)  # the stream delivers ~5 frames meanwhile
            queued.append(cap.stats().queued)
            frame = cap.read(timeout=2)
            assert frame is not None
            ages.append(time.time() - frame.capture_time)
        stats = cap.stats()
    finally:
        cap.close()
    # A decode process lets the ring's slots fill while the consumer is away; it takes
    # the newest and frees the rest.
    assert max(queued) <= (2 if decode == "thread" else LIVE_SLOTS + 2)
    assert stats.dropped["queue_full"] >= 10
    # The newest of at most two queued frames at 30 fps: well under the consumer's period.
    assert float(np.median(ages)) < 0.1, ages


def test_rgb_conversion_is_the_same_threaded_and_falls_back_without_threads(clip: Path) -> None:
    from streamtrack.sources import PyAVReader

    reader = PyAVReader(av.open(str(clip)), live=False)
    try:
        frame = next(f for p in reader._container.demux(reader._stream) for f in p.decode())
        threaded = reader._to_rgb(frame)
        np.testing.assert_array_equal(threaded, frame.to_ndarray(format="rgb24"))

        class OldPyAV:  # a PyAV whose to_ndarray has no threads option
            def to_ndarray(self, format: str) -> np.ndarray:
                return frame.to_ndarray(format=format)

        np.testing.assert_array_equal(reader._to_rgb(OldPyAV()), threaded)
        assert reader._threaded_convert is False  # probed once, then plain calls
        np.testing.assert_array_equal(reader._to_rgb(OldPyAV()), threaded)
    finally:
        reader.close()


def _with_cover_art(path: Path, video_frames: int) -> Path:
    """An MP4 whose first video stream is a cover picture (``attached_pic``), as a song's
    or a podcast's; ``video_frames`` > 0 adds a real video stream after it."""
    with av.open(str(path), "w", format="mp4") as c:
        cover = c.add_stream("mjpeg", rate=1)
        cover.width, cover.height, cover.pix_fmt = 64, 64, "yuvj420p"
        cover.disposition = av.stream.Disposition.attached_pic
        video = None
        if video_frames:
            video = c.add_stream("libx264", rate=10)
            video.width, video.height, video.pix_fmt = 96, 64, "yuv420p"
        for packet in [*cover.encode(av.VideoFrame.from_ndarray(np.zeros((64, 64, 3), np.uint8),
                                                                 format="rgb24")), *cover.encode(None)]:
            c.mux(packet)
        for i in range(video_frames):
            frame = av.VideoFrame.from_ndarray(np.full((64, 96, 3), STEP * i, np.uint8), format="rgb24")
            c.mux(video.encode(frame))
        if video is not None:
            c.mux(video.encode(None))
    return path


def test_cover_art_is_not_a_video(tmp_path: Path, decode: str) -> None:
    with pytest.raises(UserError, match=r"cannot read video file .*song\.mp4: no video stream"):
        open_source(str(_with_cover_art(tmp_path / "song.mp4", 0)), decode=decode).start()
    with open_source(str(_with_cover_art(tmp_path / "clip.mp4", 12)), decode=decode) as cap:
        frames = list(cap)
    assert [f.image.shape for f in frames] == [(64, 96, 3)] * 12


def test_an_outage_whose_reason_changes_is_reported_again_once_per_reason() -> None:
    """Back from an outage but failing for another reason (a camera that now refuses the
    password): said once more, not hidden behind the first reason for the whole outage,
    and not repeated for every attempt either."""
    events: list = []
    failures = iter([TimeoutError("no answer"), PermissionError("401 Unauthorized"),
                     TimeoutError("no answer"), PermissionError("401 Unauthorized")])

    def factory(target):
        if not events or len([e for e in events if e.state is S.STREAMING]) == 0:
            return FakeCamera(fail_after=3)
        failure = next(failures, None)
        if failure is not None:
            raise failure
        return FakeCamera()

    config = CaptureConfig(reconnect_initial=0.02, reconnect_max=0.05)
    with open_source("/dev/video0", config, on_status=events.append, webcam_factory=factory) as cap:
        assert wait_for(lambda: len([e for e in events if e.state is S.STREAMING]) == 2, 5)
        frame = cap.read(timeout=2)
    assert frame is not None
    outage = [(e.previous, e.state, (e.error or "").split(":")[0]) for e in events
              if e.state is S.RECONNECTING]
    assert outage == [(S.STREAMING, S.RECONNECTING, "end of stream (disconnected)"),
                      (S.RECONNECTING, S.RECONNECTING, "TimeoutError"),
                      (S.RECONNECTING, S.RECONNECTING, "PermissionError")], outage


@pytest.mark.parametrize(("url", "shown"), [
    ("rtsp://admin:secret@cam:554/live", "rtsp://***@cam:554/live"),
    # A password with a bare / ? or # splits the URL before its @: hidden all the same.
    ("rtsp://admin:My/Pass#1@cam/live", "rtsp://***@cam/live"),
    ("rtsp://admin:1234/abc@cam/live", "rtsp://***@cam/live"),
    ("rtsp://admin:a?b@cam/live", "rtsp://***@cam/live"),
    ("rtsp://[bad:pass@cam/live", "rtsp://***@cam/live"),
    ("rtsp://cam/live?password=hunter2&channel=1", "rtsp://cam/live?password=***&channel=1"),
    ("rtsp://cam:554/live", "rtsp://cam:554/live"),
])
def test_credentials_never_show_in_a_source_url(url, shown):
    assert redact_url(url) == shown


def test_a_password_with_a_slash_is_not_printed_in_the_malformed_url_error():
    with pytest.raises(UserError) as e:
        parse_source("rtsp://admin:My/Pass#1@cam/live")
    assert "My" not in str(e.value) and "Pass" not in str(e.value) and "***@cam/live" in str(e.value)


@pytest.mark.parametrize(("source", "message"), [
    # Read as a file name, it was "video file not found: rtsp:/admin:s3cret@cam/live".
    ("rtsp:/admin:s3cret@cam/live", "video source rtsp:/***@cam/live is neither a file nor a URL: "
                                    "did you mean rtsp://***@cam/live?"),
    ("rtsp//admin:s3cret@cam/live", "did you mean rtsp://***@cam/live?"),
    ("http:/cam/a.mp4?token=s3cret", "did you mean http://cam/a.mp4?token=***?"),
    # FFmpeg says "Invalid argument" at every attempt, and it was retried for good.
    ("rtsp://admin:s3cret@127.0.0.1:0/cam", "malformed video source URL rtsp://***@127.0.0.1:0/cam: port 0"),
])
def test_a_mistyped_url_is_one_line_without_its_password(source, message):
    with pytest.raises(UserError) as e:
        parse_source(source)
    assert message in str(e.value) and "s3cret" not in str(e.value)


def test_a_file_named_like_a_protocol_is_read_and_written_as_a_file(tmp_path, monkeypatch, decode) -> None:
    """FFmpeg reads "name:" before the first "/" as a protocol: a recording called
    cam-10:00:00.mp4 was "Protocol not found", and http:y.mp4 was fetched over HTTP."""
    from streamtrack.outputs import VideoWriter
    from streamtrack.synthetic import make_clip, write_video

    monkeypatch.chdir(tmp_path)
    clip = make_clip(4, 64, 48)
    write_video(clip.frames, "cam-10:00:00.mp4")
    (tmp_path / "http:y.mp4").write_bytes((tmp_path / "cam-10:00:00.mp4").read_bytes())
    for name in ("cam-10:00:00.mp4", "http:y.mp4"):
        cap = open_source(name, CaptureConfig(), decode=decode).start()
        try:
            assert len(list(cap)) == 4 and cap.state is S.ENDED, cap.last_error
        finally:
            cap.close()
    writer = VideoWriter("out:1.mp4", fps=10)
    for frame in clip.frames:
        writer.write(frame)
    writer.close()
    with av.open(str(tmp_path / "out:1.mp4")) as written:  # an absolute path needs no prefix
        assert sum(1 for _ in written.decode(video=0)) == 4
