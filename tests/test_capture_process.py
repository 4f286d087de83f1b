"""Decoding in a child process (``decode: process``): what only the process can get
wrong -- its own death, its parent's, the order of events and frames across two
sockets, where the source's credentials go.  The behaviour a consumer shares with the
capture thread is tested in test_capture.py, parametrized over both."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import av
import numpy as np
import pytest
from conftest import exits_within, track_both_ways

from streamtrack.capture import CaptureConfig, SourceState, open_source
from streamtrack.capture_process import DecodeProcessError, ProcessCapture
from streamtrack.errors import UserError
from streamtrack.synthetic import make_clip, write_video

pytestmark = pytest.mark.timeout(120)

S = SourceState


@pytest.fixture(scope="module")
def video(tmp_path_factory) -> Path:
    clip = make_clip(30, 96, 64, num_objects=1, seed=2)
    return write_video(clip.frames, tmp_path_factory.mktemp("clips") / "clip.mp4")


def test_events_and_frames_reach_the_consumer_in_the_childs_order(video):
    log: list[tuple[str, object]] = []
    cap = open_source(str(video), CaptureConfig(queue_depth=1),
                      on_status=lambda e: log.append(("event", e.state)), decode="process")
    assert isinstance(cap, ProcessCapture)
    with cap:
        for frame in cap:
            log.append(("frame", frame.frame_id))
            time.sleep(0.005)
    frames = [i for kind, i in log if kind == "frame"]
    assert frames == list(range(30))
    # Streaming is announced before the first frame, and the end only after the last
    # one arrived (the child says "ended" while its last frames are still on the way).
    assert log.index(("event", S.STREAMING)) < log.index(("frame", 0))
    assert log[-1] == ("event", S.ENDED)
    assert cap.stats().frames_decoded == cap.stats().frames_delivered == 30


def _shm_segments() -> set[str]:
    return {p.name for p in Path("/dev/shm").glob("psm_*")}


def _ts_clip(path: Path, width: int, height: int, frames: int, level: int) -> bytes:
    with av.open(str(path), "w", format="mpegts") as out:
        stream = out.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(np.full((height, width, 3), level + 3 * i, np.uint8),
                                               format="rgb24")
            frame.pts = i
            out.mux(stream.encode(frame))
        out.mux(stream.encode())
    return path.read_bytes()


def test_a_new_frame_size_gets_a_new_ring_and_the_old_one_is_freed(tmp_path):
    # A stream whose resolution changes mid-way (an MPEG-TS joined from two sizes).
    joined = tmp_path / "joined.ts"
    joined.write_bytes(_ts_clip(tmp_path / "a.ts", 96, 64, 6, 10)
                       + _ts_clip(tmp_path / "b.ts", 64, 48, 6, 100))
    before = _shm_segments()
    seen = {}
    for mode in ("thread", "process"):
        got, rings = [], []
        with open_source(str(joined), decode=mode) as cap:
            for frame in cap:
                got.append((frame.frame_id, frame.image.shape, round(float(frame.image.mean()))))
                rings.append(_shm_segments() - before)
                time.sleep(0.02)
        seen[mode] = got
    assert [shape for _, shape, _ in seen["process"]] == [(64, 96, 3)] * 6 + [(48, 64, 3)] * 6
    assert seen["process"] == seen["thread"]
    # One ring at a time once the consumer has freed the old size's slots, none after.
    assert len(rings[2]) == 1 and len(rings[-1]) == 1 and rings[2] != rings[-1]
    assert _shm_segments() == before


def test_a_dead_decode_process_fails_the_source_instead_of_hanging(video):
    before = _shm_segments()
    cap = open_source(str(video), CaptureConfig(realtime=True, loop=True), decode="process")
    with cap:
        assert cap.read(timeout=10) is not None
        assert len(_shm_segments() - before) == 1
        cap._proc.kill()
        t0 = time.monotonic()
        with pytest.raises(DecodeProcessError, match=r"^the decode process exited \(killed by SIGKILL"):
            while cap.read(timeout=0.5) is not None:  # what was already on the way, then the error
                assert time.monotonic() - t0 < 5
        assert cap.read(timeout=0.5) is None  # once; then the source is over
        assert cap.state is S.FAILED
        assert "decode process exited" in cap.last_error
        assert time.monotonic() - t0 < 5
    # The killed child's resource tracker unlinks its frame ring.
    deadline = time.monotonic() + 10
    while _shm_segments() != before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _shm_segments() == before


@pytest.mark.timeout(60)
def test_frames_announced_by_a_child_that_died_since_are_taken_without_hanging(video):
    """Freeing a slot tells the child: a send to a dead peer must not block for good."""
    with open_source(str(video), CaptureConfig(), decode="process") as cap:
        assert cap.read(timeout=10) is not None
        deadline = time.monotonic() + 10
        while len(cap._ready) < 2 and time.monotonic() < deadline:  # the ring's other slots filled
            with cap._sockets:
                cap._drain()
            time.sleep(0.05)
        assert len(cap._ready) >= 2
        cap._proc.kill()
        cap._proc.wait()
        time.sleep(0.5)  # the socket has seen its peer go
        with pytest.raises(DecodeProcessError, match="killed by SIGKILL"):
            for _ in range(10):
                cap.read(timeout=0.5)


@pytest.mark.parametrize("mode", ["thread", "process"])
def test_frame_ids_can_start_after_a_restarted_trackers_last_one(video, mode):
    with open_source(str(video), CaptureConfig(first_frame_id=500), decode=mode) as cap:
        ids = [f.frame_id for f in cap]
        stats = cap.stats()
    assert ids == list(range(500, 500 + len(ids))) and len(ids) > 1
    assert stats.dropped == {"queue_full": 0}  # counted from the first id, not from 0


def test_close_while_the_child_waits_for_the_consumer(video):
    cap = open_source(str(video), CaptureConfig(queue_depth=1), decode="process").start()
    assert cap.read(timeout=10) is not None
    time.sleep(0.3)  # the child fills the socket and waits to send the next frame
    proc, directory = cap._proc, cap._dir
    t0 = time.monotonic()
    cap.close()
    assert time.monotonic() - t0 < 3
    assert proc.returncode == 0 and cap.state is S.STOPPED
    assert not Path(directory).exists()
    assert cap.read(timeout=0.1) is None


def test_the_url_and_its_password_stay_off_the_command_line():
    cap = open_source("rtsp://viewer:hunter2@127.0.0.1:9/none", decode="process").start()
    try:
        cmdline = Path(f"/proc/{cap._proc.pid}/cmdline").read_bytes()
        assert b"hunter2" not in cmdline and b"rtsp" not in cmdline
        assert cap.state in (S.CONNECTING, S.RECONNECTING)
    finally:
        cap.close()
    assert cap.state is S.STOPPED


def test_a_fake_webcam_cannot_cross_to_the_child():
    with pytest.raises(ValueError, match="decode='thread'"):
        open_source("0", webcam_factory=lambda target: None, decode="process")
    with pytest.raises(UserError, match="decode must be one of thread, process"):
        open_source("clip.mp4", decode="fork")


CRASHING_TRACKER = """
import sys
from streamtrack.capture import CaptureConfig, open_source
cap = open_source(sys.argv[1], CaptureConfig(realtime=True, loop=True), decode="process").start()
assert cap.read(timeout=10) is not None
print(cap._proc.pid, flush=True)
import os
os._exit(3)
"""


def test_the_child_exits_when_the_tracker_dies_without_closing_it(video, tmp_path):
    out = subprocess.run([sys.executable, "-c", CRASHING_TRACKER, str(video)], capture_output=True,
                         text=True, timeout=60, env={**os.environ, "TMPDIR": str(tmp_path)})  # folder stays
    assert out.returncode == 3, out.stderr
    assert exits_within(int(out.stdout.strip()), 10), "the decode process outlived its tracker"


FORGETFUL_USER = """
import gc, os, sys
from streamtrack.capture import CaptureConfig, open_source
def use(loop):
    cap = open_source(sys.argv[1], CaptureConfig(realtime=True, loop=loop), decode="process").start()
    assert cap.read(timeout=10) is not None
    print(cap._proc.pid, cap._dir, flush=True)
    return cap
first = use(False)._proc.pid  # dropped without close()
gc.collect()
print("dropped", "gone" if not os.path.exists(f"/proc/{first}") else "running", flush=True)
kept = use(True)  # still open at exit
"""


def test_a_capture_dropped_or_left_open_at_exit_ends_its_child_and_removes_its_folder(video, tmp_path):
    out = subprocess.run([sys.executable, "-c", FORGETFUL_USER, str(video)], capture_output=True,
                         text=True, timeout=60, env={**os.environ, "TMPDIR": str(tmp_path)})
    assert out.returncode == 0, out.stderr
    dropped, marker, kept = out.stdout.splitlines()
    assert marker == "dropped gone"  # at once, not at exit
    for line in (dropped, kept):
        pid, folder = line.split()
        assert exits_within(int(pid), 10) and not Path(folder).exists()
    assert list(tmp_path.iterdir()) == [] and "Traceback" not in out.stderr, out.stderr


def test_tracker_decoding_in_a_process_gives_the_thread_runs_results(tiny_checkpoint, tmp_path):
    from streamtrack.pipeline import RunConfig

    lines, summaries = track_both_ways(tmp_path, tiny_checkpoint, "decode")
    for mode in lines:
        for d in lines[mode]:
            d.pop("t")
    # The thread's file source may already be "ended" while its last frames wait in the
    # queue; the process tells the end once the last frame is delivered.
    states = [d.pop("source_state") for d in lines["process"]]
    assert set(states[:-1]) == {"streaming"} and states[-1] in ("streaming", "ended")
    assert {d.pop("source_state") for d in lines["thread"]} <= {"streaming", "ended"}
    assert [d["frame_id"] for d in lines["process"]] == list(range(8))
    assert lines["process"] == lines["thread"]
    assert summaries["process"].source_state == "ended" and summaries["process"].frames == 8
    with pytest.raises(UserError, match="decode must be one of thread, process"):
        RunConfig(source="clip.mp4", decode="fork")


def test_decode_is_a_config_key_that_reaches_the_run(tmp_path):
    from streamtrack.config import load_config
    from streamtrack.pipeline import RunConfig

    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("decode: process\n")
    from_file = load_config(str(cfg_file), environ={})
    assert RunConfig.from_config(from_file, "clip.mp4", {}).decode == "process"
    assert load_config(environ={"STREAMTRACK_DECODE": "process"}).decode == "process"
    assert RunConfig.from_config(load_config(environ={}), "clip.mp4", {}).decode == "thread"


def test_frames_too_big_for_the_shared_memory_left_fail_the_source_in_one_line(video, tmp_path,
                                                                              monkeypatch):
    """A container's /dev/shm (64 MiB) holds no ring of 4K frames: the first write into one
    killed the decode process with SIGBUS.  The child says why, and the source fails."""
    import json
    import shutil
    import threading

    import zmq

    from streamtrack import capture_process
    from streamtrack.capture import Capture
    from streamtrack.sources import parse_source

    free = 3 * 64 * 96 * 3 - 1  # bytes: one short of a file's ring of the clip's frames
    usage = shutil.disk_usage(capture_process.SHARED_MEMORY_DIR)
    monkeypatch.setattr(capture_process.shutil, "disk_usage",
                        lambda path: usage._replace(free=free) if path == capture_process.SHARED_MEMORY_DIR
                        else usage)
    with pytest.raises(UserError, match=r"^decode: process needs 55,296 bytes of shared memory for 3 96x64 "
                                        r"frames, and /dev/shm has 55,295 bytes free \(in a container"):
        capture_process._Ring((64, 96, 3), capture_process.FILE_SLOTS)
    capture_process._Ring((64, 96, 3), capture_process.FILE_SLOTS - 1).close(unlink=True)  # fits

    parent = zmq.Context.instance().socket(zmq.PAIR)
    parent.bind(f"ipc://{tmp_path}/ctl")
    child = capture_process._Child(str(tmp_path), os.getppid())
    child.played, child.slots = True, capture_process.FILE_SLOTS
    cap = Capture(parse_source(str(video)), CaptureConfig()).start()
    pumping = threading.Thread(target=child.pump, args=(cap,))
    pumping.start()
    try:
        messages = []
        while parent.poll(10_000):
            kind, payload = parent.recv_multipart()
            messages.append((kind, json.loads(payload) if payload else None))
            if kind == b"status" and messages[-1][1].get("final"):
                break
        parent.send_multipart([b"stop", b""])
        pumping.join(10)
    finally:
        cap.close()
        child.close()
        parent.close(linger=0)
    assert not pumping.is_alive()
    assert [k for k, _ in messages if k == b"frame"] == []
    kind, info = messages[-1]
    assert info["state"] == "failed" and info["error"].startswith("decode: process needs"), messages


def test_shared_memory_that_cannot_be_created_is_one_line(monkeypatch):
    """A read-only /dev/shm (or one not ours): the decode process died with a traceback,
    and a supervised tracker was restarted for it forever."""
    import errno

    from streamtrack import capture_process

    def read_only(*_, **__):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(capture_process.shared_memory, "SharedMemory", read_only)
    with pytest.raises(UserError, match=r"^decode: process cannot create shared memory in /dev/shm: "
                                        r"Read-only file system \(or use decode: thread\)$"):
        capture_process._Ring((64, 96, 3), 3)


def test_a_ring_whose_pages_cannot_be_reserved_is_refused_and_removed(monkeypatch, tmp_path):
    """The room check passed, but others took the room since (several decoders starting at
    once): the pages are reserved at creation, so that is an error, not SIGBUS later. And
    a frame size change whose new ring is refused leaves the old one closed once."""
    import errno

    import zmq

    from streamtrack import capture_process

    before = set(os.listdir(capture_process.SHARED_MEMORY_DIR))

    def full(fd, offset, size):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(capture_process.os, "posix_fallocate", full)
    with pytest.raises(UserError, match=r"^decode: process cannot reserve shared memory: "
                                        r"\[Errno 28\] No space left on device$"):
        capture_process._Ring((64, 96, 3), 3)
    assert set(os.listdir(capture_process.SHARED_MEMORY_DIR)) <= before

    monkeypatch.undo()
    parent = zmq.Context.instance().socket(zmq.PAIR)
    parent.bind(f"ipc://{tmp_path}/ctl")
    child = capture_process._Child(str(tmp_path), os.getppid())
    try:
        slot = child.slot_for((64, 96, 3))
        child.free.append(slot)  # the tracker has freed it
        monkeypatch.setattr(capture_process.os, "posix_fallocate", full)
        with pytest.raises(UserError):
            child.slot_for((128, 192, 3))  # a camera back in a bigger mode
        assert child.ring is None and child.retired == {}  # the old ring: closed, once
    finally:
        child.close()  # the old ring closed once, no error
        parent.close(linger=0)
    assert set(os.listdir(capture_process.SHARED_MEMORY_DIR)) <= before
