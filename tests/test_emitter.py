"""Emitters: the child-process emitter publishes and writes exactly what the thread one
does, and fails loudly, never silently or by hanging."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zmq
from conftest import exits_within, track_both_ways
from PIL import Image

from streamtrack.emitter import (
    EmitterError,
    Outputs,
    OutputsConfig,
    ProcessEmitter,
    ThreadEmitter,
    make_emitter,
)
from streamtrack.errors import ReaderGone, UserError
from streamtrack.protocol import FrameResult, ObjectResult, StatusEvent, Timestamps, mask_area, mask_bbox

pytestmark = pytest.mark.timeout(120)

H, W = 48, 64


def frame(seq: int, obj_ids=(1, 2)) -> tuple[FrameResult, list[np.ndarray], np.ndarray]:
    rng = np.random.default_rng(seq)
    masks = [rng.random((H, W)) < 0.3 for _ in obj_ids]
    objects = tuple(
        ObjectResult(obj_id=k, score=0.5 + k / 10, state="visible", bbox=mask_bbox(m), area=mask_area(m),
                     iou=0.8)
        for k, m in zip(obj_ids, masks, strict=True)
    )
    result = FrameResult(stream="cam7", seq=seq, frame_id=seq + 3, pts=seq / 30, width=W, height=H,
                         t=Timestamps(capture=1.0 + seq, dequeue=1.1 + seq, infer_start=1.2 + seq,
                                      infer_end=1.3 + seq), objects=objects)
    image = rng.integers(0, 255, (H, W, 3), dtype=np.uint8)
    return result, masks, image


class Wire:
    """Every message on a publisher, in order (a plain SUB socket: the Subscriber keeps
    only the newest of each kind)."""

    def __init__(self, endpoint: str):
        self.sock = zmq.Context.instance().socket(zmq.SUB)
        self.sock.setsockopt(zmq.SUBSCRIBE, b"")
        self.sock.setsockopt(zmq.RCVHWM, 0)
        self.sock.connect(endpoint)

    def wait_joined(self, publish) -> None:
        # ZeroMQ's slow joiner: publish status pings until one arrives.
        for _ in range(100):
            publish()
            if self.sock.poll(100):
                self.sock.recv_multipart()
                while self.sock.poll(50):
                    self.sock.recv_multipart()
                return
        raise AssertionError("subscriber never joined")

    def take(self, n: int, timeout: float = 10.0) -> list[list[bytes]]:
        out = []
        deadline = time.monotonic() + timeout
        while len(out) < n and time.monotonic() < deadline:
            if self.sock.poll(100):
                out.append(self.sock.recv_multipart())
        return out

    def close(self) -> None:
        self.sock.close(linger=0)


def run_emitter(kind: str, tmp: Path, frames: int = 6) -> tuple[list[FrameResult], list[list[bytes]]]:
    cfg = OutputsConfig(stream="cam7", publish="tcp://127.0.0.1:0", save_jsonl=str(tmp / "r.jsonl"),
                        save_masks=str(tmp / "masks"), save_video=str(tmp / "v.mp4"), publish_frames=True)
    published: list[FrameResult] = []
    emitter = make_emitter(kind, cfg, published.append)
    wire = Wire(emitter.publisher.endpoint)
    try:
        wire.wait_joined(lambda: emitter.publisher.publish_status("ping"))
        for seq in range(frames):
            result, masks, image = frame(seq, (1, 2) if seq < 3 else (2,))
            emitter.submit(result, masks, image)
            emitter.publisher.publish_status("object_state", obj_id=1, old="visible", new=f"n{seq}")
            time.sleep(0.02)  # a camera's pace, not a burst past the publisher's high-water mark
        emitter.close()
        emitter.check()
        # per frame: a JPEG preview, the masks, a status event
        return published, wire.take(3 * frames)
    finally:
        emitter.close()
        wire.close()


def test_process_emitter_publishes_and_writes_what_the_thread_emitter_does(tmp_path):
    (tmp_path / "t").mkdir()
    (tmp_path / "p").mkdir()
    thread_pub, thread_wire = run_emitter("thread", tmp_path / "t")
    proc_pub, proc_wire = run_emitter("process", tmp_path / "p")

    def stripped(result: FrameResult) -> dict:
        d = result.to_dict()
        assert d["t"].pop("publish") is not None
        return d

    # on_published: what was submitted, stamped with its publish time
    assert len(proc_pub) == len(thread_pub) == 6
    assert [stripped(r) for r in proc_pub] == [stripped(r) for r in thread_pub]
    assert [r.seq for r in proc_pub] == list(range(6))
    wire = {name: [FrameResult.from_json(p[1]) for p in msgs if p[0] == b"masks/cam7"]
            for name, msgs in (("thread", thread_wire), ("process", proc_wire))}
    assert [stripped(r) for r in wire["process"]] == [stripped(r) for r in wire["thread"]]
    assert [r.t.publish for r in wire["process"]] == [r.t.publish for r in proc_pub]
    for seq, r in enumerate(wire["process"]):  # the RLE is the masks that were handed over
        _, masks, _ = frame(seq, (1, 2) if seq < 3 else (2,))
        assert all(np.array_equal(o.mask(), m) for o, m in zip(r.objects, masks, strict=True))
    lines = [json.loads(x) for x in (tmp_path / "p" / "r.jsonl").read_text().splitlines()]
    assert lines == [r.to_dict() for r in wire["process"]]  # the file holds what went on the wire
    for png in sorted((tmp_path / "t" / "masks").iterdir()):
        other = tmp_path / "p" / "masks" / png.name
        assert np.array_equal(np.array(Image.open(png)), np.array(Image.open(other)))
    assert len(list((tmp_path / "p" / "masks").iterdir())) == 6

    import av
    with av.open(str(tmp_path / "p" / "v.mp4")) as c:
        assert sum(1 for _ in c.decode(video=0)) == 6

    def order(wire):
        def key(header: dict):
            return header.get("seq", header.get("data", {}).get("new"))
        return [(p[0].decode().split("/")[0], key(json.loads(p[1]))) for p in wire]

    # The same messages; through the process also in the order they were handed over
    # (a thread emitter publishes a status event at once, ahead of queued results).
    assert sorted(order(proc_wire), key=str) == sorted(order(thread_wire), key=str)
    assert order(proc_wire) == [m for seq in range(6) for m in
                                (("frames", None), ("masks", seq), ("status", f"n{seq}"))]


def test_process_emitter_bind_error_is_the_same_one_line_user_error(tmp_path):
    from streamtrack.publisher import Publisher

    with Publisher("tcp://127.0.0.1:0") as taken:
        with pytest.raises(UserError, match="address already in use") as thread_err:
            ThreadEmitter(OutputsConfig(publish=taken.endpoint), lambda r: None)
        with pytest.raises(UserError, match="address already in use") as proc_err:
            ProcessEmitter(OutputsConfig(publish=taken.endpoint), lambda r: None)
    assert str(proc_err.value) == str(thread_err.value)
    with pytest.raises(UserError, match="emit must be one of thread, process"):
        make_emitter("fork", OutputsConfig(), lambda r: None)


def test_an_earlier_runs_files_survive_until_the_first_new_result(tmp_path, caplog):
    """A run that stops before its first result (a bad checkpoint, a missing camera) has
    not emptied the results of the run before."""
    jsonl, video, masks_dir = tmp_path / "r.jsonl", tmp_path / "o.mp4", tmp_path / "m"
    jsonl.write_text("earlier\n")
    video.write_bytes(b"earlier video")
    masks_dir.mkdir()
    (masks_dir / "000099.png").write_bytes(b"earlier mask")
    cfg = OutputsConfig(save_jsonl=str(jsonl), save_video=str(video), save_masks=str(masks_dir))
    with caplog.at_level("WARNING", logger="streamtrack.outputs"):
        Outputs(cfg).close()
    assert jsonl.read_text() == "earlier\n" and video.read_bytes() == b"earlier video"
    assert [r.getMessage() for r in caplog.records] == [
        f"--save-masks folder {masks_dir} already holds 1 frame PNGs: this run replaces those of the "
        "frames it tracks and leaves the others"]
    outputs = Outputs(OutputsConfig(save_jsonl=str(jsonl)))
    outputs.emit(*frame(0))
    outputs.close()
    lines = jsonl.read_text().splitlines()
    assert len(lines) == 1 and FrameResult.from_json(lines[0]).seq == 0  # replaced, not appended
    # Nothing left behind by a run that wrote nothing, not even the folders made for it.
    new = tmp_path / "new"
    (new / "kept").mkdir(parents=True)  # there before: stays
    fresh = OutputsConfig(save_jsonl=str(new / "a" / "b" / "r.jsonl"), save_masks=str(new / "m" / "n"),
                          save_video=str(new / "kept" / "v" / "o.mp4"))
    Outputs(fresh).close()
    assert sorted(p.relative_to(new) for p in new.rglob("*")) == [Path("kept")]
    outputs = Outputs(fresh)  # a run that wrote: its files and folders stay
    outputs.emit(*frame(0))
    outputs.close()
    assert {p.relative_to(new) for p in new.rglob("*") if p.is_file()} == {
        Path("a/b/r.jsonl"), Path("m/n/000003.png"), Path("kept/v/o.mp4")}


def test_a_restart_appends_only_when_this_run_wrote_results_already(tmp_path):
    """A tracker that died before its first result left an earlier run's file as it was:
    its restart replaces that file, not appends to it."""
    from streamtrack.pipeline import Resume, RunConfig

    jsonl = tmp_path / "r.jsonl"
    for resume, kept in ((Resume(restarts=1), []), (Resume(restarts=1, frames_done=4, seq_start=4), ["x"])):
        jsonl.write_text("x\n")
        cfg = RunConfig(source="clip.mp4", save_jsonl=str(jsonl), resume=resume).outputs
        outputs = Outputs(cfg)
        outputs.emit(*frame(7))
        outputs.close()
        assert jsonl.read_text().splitlines()[:-1] == kept


def test_pipes_and_links_as_outputs_are_not_probed_by_opening_them(tmp_path):
    """A FIFO's reader would see the probe's close as the end; a dangling symlink names
    the file to create."""
    import threading

    fifo = tmp_path / "results.fifo"
    os.mkfifo(fifo)
    link = tmp_path / "latest.jsonl"
    link.symlink_to(tmp_path / "runs" / "today.jsonl")
    (tmp_path / "runs").mkdir()
    done = threading.Event()
    threading.Thread(target=lambda: (Outputs(OutputsConfig(save_jsonl=str(fifo))).close(), done.set()),
                     daemon=True).start()
    assert done.wait(10), "opening the FIFO to probe it blocks with no reader"
    outputs = Outputs(OutputsConfig(save_jsonl=str(link)))
    assert link.is_symlink()
    outputs.emit(*frame(0))
    outputs.close()
    assert link.is_symlink() and len((tmp_path / "runs" / "today.jsonl").read_text().splitlines()) == 1


def test_an_output_that_is_a_symlink_loop_is_one_line(tmp_path):
    """Path.resolve() raises RuntimeError, not OSError, on a loop (Python < 3.13)."""
    from streamtrack.errors import same_file
    from streamtrack.outputs import JsonlWriter

    loop = tmp_path / "loop.jsonl"
    loop.symlink_to(loop.name)
    assert not same_file(loop, tmp_path / "other.jsonl")
    with pytest.raises(UserError, match=r"^cannot write --save-jsonl .*loop.jsonl: Too many levels of"):
        JsonlWriter(loop)
    assert loop.is_symlink()


@pytest.mark.parametrize(("option", "path", "message"), [
    ("save_video", "o.xyz", r"unknown video file extension '\.xyz' \(use \.mp4, \.mkv, .*\.avi\)"),
    ("save_video", "adir.mp4", "--save-video .*adir.mp4 is a directory; give a file name"),
    ("save_jsonl", "adir.mp4", "--save-jsonl .*adir.mp4 is a directory; give a file name"),
    ("save_video", "afile/o.mp4", "--save-video .*afile/o.mp4: .*afile is a file, not a folder"),
    ("save_jsonl", "afile/deeper/o.jsonl", "--save-jsonl .*o.jsonl: .*afile is a file, not a folder"),
    # Path() drops the separator: the file would be written as "new".
    ("save_jsonl", "new/", "--save-jsonl .*new/ ends in a separator, naming a folder: give a file name"),
    ("save_video", "new.mp4/", "--save-video .*new.mp4/ ends in a separator"),
])
def test_unusable_output_paths_are_refused_before_any_work(tmp_path, option, path, message):
    (tmp_path / "adir.mp4").mkdir()
    (tmp_path / "afile").write_text("a file, not a folder")
    with pytest.raises(UserError, match=message):
        Outputs(OutputsConfig(**{option: str(tmp_path / path) + "/" * path.endswith("/")}))
    assert not (tmp_path / "new").exists() and not (tmp_path / "new.mp4").exists()


def test_a_masks_folder_that_cannot_be_written_is_refused_before_any_file_is_replaced(tmp_path):
    """sysfs's folders refuse new files even to root; found at the first result, the
    earlier run's --save-jsonl would already be replaced by then."""
    earlier = tmp_path / "r.jsonl"
    earlier.write_text('{"old": 1}\n')
    with pytest.raises(UserError, match=r"^cannot write in --save-masks folder /sys/kernel: "):
        Outputs(OutputsConfig(save_jsonl=str(earlier), save_masks="/sys/kernel"))
    assert earlier.read_text() == '{"old": 1}\n'
    masks = tmp_path / "m"
    masks.mkdir()
    Outputs(OutputsConfig(save_masks=str(masks))).close()
    assert list(masks.iterdir()) == []  # the probe leaves nothing behind


def test_a_full_disk_is_one_line_naming_the_file(tmp_path, monkeypatch):
    """ENOSPC from a jsonl line (/dev/full) or a mask PNG: a user error naming the file, once;
    closing afterwards does not raise it again."""
    from streamtrack.outputs import JsonlWriter, MaskPngWriter

    jsonl = JsonlWriter("/dev/full")
    result = frame(0)[0]
    for _ in range(2):  # a later write fails the same way, never reopens (and truncates) the file
        with pytest.raises(UserError, match="^cannot write --save-jsonl /dev/full: No space left on device$"):
            jsonl.write(result)
    jsonl.close()

    def full(self, fp, *args, **kwargs):
        Path(fp).write_bytes(b"")  # as PIL leaves it: created, then the first write fails
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", full)
    masks = MaskPngWriter(tmp_path / "m")
    with pytest.raises(UserError, match=r"^cannot write --save-masks .*/m/000007.png: No space left on dev"):
        masks.write(7, {1: np.ones((H, W), bool)}, (H, W))
    assert list((tmp_path / "m").iterdir()) == []  # no empty PNG for a reader of the folder to trip on


_JSONL_UNTIL_FULL = """
import resource, signal, sys
sys.path.insert(0, "tests")
from test_emitter import frame
from streamtrack.errors import UserError
from streamtrack.outputs import JsonlWriter

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG) instead
resource.setrlimit(resource.RLIMIT_FSIZE, (3000, 3000))  # a full disk after 3000 bytes
jsonl = JsonlWriter(sys.argv[1])
try:
    for seq in range(100):
        jsonl.write(frame(seq)[0])
except UserError as e:
    print(e)
jsonl.close()
"""


_JSONL_TO_STDOUT = """
import sys
sys.path.insert(0, "tests")
from test_emitter import frame
from streamtrack.outputs import JsonlWriter

jsonl = JsonlWriter("/dev/stdout")
for seq in range(3):
    jsonl.write(frame(seq)[0])
jsonl.close()
"""


def test_jsonl_to_a_stdout_appended_to_a_file_appends(tmp_path):
    """`streamtrack run ... --save-jsonl /dev/stdout >> all.jsonl`: opened by its name,
    /dev/stdout is a new open of the file, which cut what it held."""
    log = tmp_path / "all.jsonl"
    log.write_text("an earlier line\n")
    for _ in range(2):
        with open(log, "a") as out:
            r = subprocess.run([sys.executable, "-c", _JSONL_TO_STDOUT], stdout=out, stderr=subprocess.PIPE,
                               text=True, timeout=120, cwd=Path(__file__).resolve().parent.parent)
        assert r.returncode == 0, r.stderr
    lines = log.read_text().splitlines()
    assert lines[0] == "an earlier line" and len(lines) == 7
    assert [FrameResult.from_json(line).seq for line in lines[1:]] == [0, 1, 2, 0, 1, 2]


def test_a_full_disk_leaves_no_line_cut_short_in_the_jsonl(tmp_path):
    """The line that did not fit is taken out again: every line left parses."""
    path = tmp_path / "r.jsonl"
    r = subprocess.run([sys.executable, "-c", _JSONL_UNTIL_FULL, str(path)], capture_output=True, text=True,
                       timeout=60, cwd=Path(__file__).resolve().parent.parent)
    assert r.stdout.startswith(f"cannot write --save-jsonl {path}: File too large"), (r.stdout, r.stderr)
    data = path.read_text()
    assert 0 < len(data) <= 3000 and data.endswith("\n")
    assert [json.loads(line)["seq"] for line in data.splitlines()] == list(range(data.count("\n")))


_VIDEO_UNTIL_FULL = """
import os, resource, signal, sys
import numpy as np
from streamtrack.errors import UserError
from streamtrack.outputs import VideoWriter

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG) instead
resource.setrlimit(resource.RLIMIT_FSIZE, (60000, 60000))  # a full disk after 60 kB
video = VideoWriter(sys.argv[1])
noise = np.random.default_rng(0)
try:
    for i in range(int(sys.argv[2])):
        video.write(noise.integers(0, 255, (96, 128, 3), dtype=np.uint8), i / 10)
    # Written whole so far: the disk fills as the last fragment and the index go out.
    resource.setrlimit(resource.RLIMIT_FSIZE, (os.path.getsize(sys.argv[1]) + 100,) * 2)
    video.close()
except UserError as e:
    print(e)
"""


@pytest.mark.parametrize(("ext", "frames", "error"), [
    ("mp4", 200, "cannot write video {path}: File too large"),  # on a frame
    ("mkv", 200, "cannot write video {path}: File too large"),
    ("mp4", 6, "cannot finish video {path}: its end was not written whole"),  # at the close
])
def test_a_full_disk_leaves_a_video_that_decodes_to_its_end(tmp_path, ext, frames, error):
    """The fragment that did not fit is taken out again: a decode loop over the file ends
    without an error, after the frames that were written whole."""
    import av

    path = tmp_path / f"v.{ext}"
    r = subprocess.run([sys.executable, "-c", _VIDEO_UNTIL_FULL, str(path), str(frames)], capture_output=True,
                       text=True, timeout=60)
    assert r.stdout.startswith(error.format(path=path)), (r.stdout, r.stderr)
    with av.open(str(path)) as container:
        decoded = sum(1 for _ in container.decode(video=0))
    assert 3 <= decoded <= frames


def test_a_full_disk_under_the_video_is_one_line_and_closing_adds_none(tmp_path):
    from streamtrack.outputs import VideoWriter

    (tmp_path / "full.mp4").symlink_to("/dev/full")  # every write: ENOSPC
    video = VideoWriter(tmp_path / "full.mp4")
    video.write(np.zeros((H, W, 3), np.uint8), 0.0)  # held until the next gives the rate
    for i in range(1, 3):  # the write fails, and so does every one after it
        with pytest.raises(UserError, match=r"^cannot write video .*full.mp4: No space left on device$"):
            video.write(np.zeros((H, W, 3), np.uint8), i / 10)
    video.close()


@pytest.mark.parametrize("option", ["save_jsonl", "save_video"])
def test_a_pipe_output_needs_its_reader_and_then_gets_everything(tmp_path, option):
    """A FIFO nobody reads is a one-line error, not a run that hangs at its first result."""
    import threading

    fifo = tmp_path / ("out.mp4" if option == "save_video" else "out.jsonl")
    os.mkfifo(fifo)
    with pytest.raises(UserError, match=f"{option.replace('_', '-')} .*{fifo.name} is a pipe that nothing "
                                        "reads: start its reader first"):
        outputs = Outputs(OutputsConfig(**{option: str(fifo)}))
        try:
            outputs.emit(*frame(0))
        finally:
            outputs.close()
    # The reader's end, opened first (without waiting for a writer), read once the writer is there.
    reading = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    outputs = Outputs(OutputsConfig(**{option: str(fifo)}))
    outputs.emit(*frame(0))
    os.set_blocking(reading, True)
    got = []
    reader = threading.Thread(target=lambda: got.append(os.fdopen(reading, "rb").read()), daemon=True)
    reader.start()
    for seq in range(1, 5):
        outputs.emit(*frame(seq))
    outputs.close()
    reader.join(10)
    if option == "save_jsonl":
        assert [json.loads(line)["seq"] for line in got[0].decode().splitlines()] == list(range(5))
    else:
        import av

        (tmp_path / "copy.mp4").write_bytes(got[0])
        with av.open(str(tmp_path / "copy.mp4")) as container:
            assert sum(1 for _ in container.decode(video=0)) == 5


@pytest.mark.parametrize(("option", "name"), [("save_jsonl", "out.jsonl"), ("save_video", "out.mp4"),
                                              ("save_video", "out.mkv")])
def test_a_pipe_output_whose_reader_went_away_says_so(tmp_path, option, name):
    """`| head`: the reader gone is ReaderGone (the run ends there, exit 0), not a failed
    write; an MKV's buffered frames fail only when it is closed."""
    fifo = tmp_path / name
    os.mkfifo(fifo)
    reading = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    outputs = Outputs(OutputsConfig(**{option: str(fifo)}))
    outputs.emit(*frame(0))
    os.close(reading)
    what = "--" + option.replace("_", "-")
    with pytest.raises(ReaderGone, match=f"^the reader of {what} {fifo} went away$"):
        for seq in range(1, 30):
            outputs.emit(*frame(seq))
        outputs.close()
    outputs.close()


@pytest.mark.parametrize("kind", ["thread", "process"])
def test_a_run_whose_reader_went_away_still_announces_its_end(kind, tmp_path):
    """The run ends normally: its "stopped" event goes out after the failed write, from
    the emit process too (which dropped everything after a failure)."""
    fifo = tmp_path / "r.jsonl"
    os.mkfifo(fifo)
    reading = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    cfg = OutputsConfig(stream="cam7", publish="tcp://127.0.0.1:0", save_jsonl=str(fifo))
    emitter = make_emitter(kind, cfg, lambda r: None)
    wire = Wire(emitter.publisher.endpoint)
    try:
        wire.wait_joined(lambda: emitter.publisher.publish_status("ping"))
        emitter.submit(*frame(0))
        assert select.select([reading], [], [], 10)[0]  # the writer has the pipe open
        os.close(reading)
        with pytest.raises(ReaderGone):
            for seq in range(1, 50):
                emitter.submit(*frame(seq))
                time.sleep(0.02)
            emitter.close()
            emitter.check()
        emitter.publish_status_after_results("tracker_state", old="running", new="stopped")
        emitter.close()
        states = []
        deadline = time.monotonic() + 10
        while not states and time.monotonic() < deadline:
            states = [json.loads(m[1]) for m in wire.take(1, timeout=0.2) if m[0].startswith(b"status/")]
            states = [e["data"]["new"] for e in states if e["kind"] == "tracker_state"]
        assert states == ["stopped"]
    finally:
        emitter.close()
        wire.close()


@pytest.mark.parametrize("kind", ["thread", "process"])
def test_a_write_error_stops_the_tracker_with_its_message(kind, tmp_path):
    emitter = make_emitter(kind, OutputsConfig(save_masks=str(tmp_path / "m")), lambda r: None)
    try:
        result, masks, image = frame(0, (300,))  # a palette PNG holds ids up to 255
        emitter.submit(result, masks, image)
        # a user error (one line, exit 2) from the child as from the thread
        with pytest.raises(UserError, match="up to 255, got 300"):
            for seq in range(1, 200):
                time.sleep(0.02)
                emitter.submit(*frame(seq, (1,)))
    finally:
        t0 = time.monotonic()
        emitter.close()
    assert time.monotonic() - t0 < 10  # no wait for acknowledgements that will never come


def test_a_temporary_folder_too_long_for_a_socket_path_is_not_used_for_the_childs(tmp_path, monkeypatch):
    """ipc:// sockets live in a private folder: under a long $TMPDIR (a CI runner's, pytest's)
    their path would not fit a socket's 107 bytes."""
    import shutil
    import tempfile

    from streamtrack import childproc

    deep = tmp_path / ("x" * 60) / ("y" * 60)
    deep.mkdir(parents=True)
    monkeypatch.setattr(tempfile, "tempdir", str(deep))
    folder = childproc.private_dir("streamtrack-emit-")
    try:
        assert len(f"{folder}/emit") <= 107 and not folder.startswith(str(deep))
    finally:
        shutil.rmtree(folder)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    folder = childproc.private_dir("streamtrack-emit-")
    assert Path(folder).parent == tmp_path  # where the temporary folder is, when it fits
    monkeypatch.setattr(tempfile, "tempdir", str(deep))
    got = []
    emitter = ProcessEmitter(OutputsConfig(save_jsonl=str(tmp_path / "r.jsonl")), got.append)
    emitter.submit(*frame(0))
    emitter.close()
    assert [r.seq for r in got] == [0]


def test_private_folders_of_ended_processes_are_removed_by_the_next_one(tmp_path, monkeypatch):
    """A tracker killed outright (SIGKILL, the OOM killer) cannot remove its children's
    socket folders: the next one to make such a folder does."""
    import subprocess
    import tempfile

    from streamtrack import childproc

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    ended = subprocess.Popen(["true"])
    ended.wait()
    orphan = tmp_path / f"streamtrack-emit-{ended.pid}-abc123"
    (orphan / "sub").mkdir(parents=True)
    other_kind = tmp_path / f"streamtrack-decode-{ended.pid}-abc123"
    other_kind.mkdir()
    alive = tmp_path / f"streamtrack-emit-{os.getppid()}-abc123"  # a live process's
    unrelated = [tmp_path / "streamtrack-emit-old_style", tmp_path / f"streamtrack-emit-{ended.pid}"]
    recent = tmp_path / f"streamtrack-emit-{ended.pid}-new123"  # maybe another pid namespace's
    for folder in [alive, *unrelated, recent]:
        folder.mkdir()
    an_hour_ago = time.time() - 3600
    for folder in [orphan, other_kind, alive, *unrelated]:
        os.utime(folder, (an_hour_ago, an_hour_ago))
    mine = childproc.private_dir("streamtrack-emit-")
    assert Path(mine).name.startswith(f"streamtrack-emit-{os.getpid()}-")
    assert not orphan.exists() and other_kind.exists() and alive.exists() and recent.exists()
    assert all(folder.exists() for folder in unrelated)
    childproc.remove_private_dirs_of(ended.pid)  # what the supervisor does for its tracker
    assert not other_kind.exists() and alive.exists() and Path(mine).exists()
    os.rmdir(mine)


def test_a_dead_child_is_an_error_not_a_hang(tmp_path):
    emitter = ProcessEmitter(OutputsConfig(publish="tcp://127.0.0.1:0"), lambda r: None)
    emitter.submit(*frame(0))
    emitter._proc.kill()
    emitter._proc.wait(10)
    t0 = time.monotonic()
    with pytest.raises(EmitterError, match="exited"):
        for seq in range(1, 50):  # more than any socket buffer could take without a reader
            emitter.submit(*frame(seq))
    assert time.monotonic() - t0 < 10
    emitter.close()
    with pytest.raises(EmitterError):
        emitter.check()
    with pytest.raises(UserError, match="closed"):
        emitter.publisher.publish_status("late")


def test_stop_signals_are_for_the_tracker_the_child_keeps_emitting_until_closed(tmp_path):
    published: list[FrameResult] = []
    emitter = ProcessEmitter(OutputsConfig(save_jsonl=str(tmp_path / "r.jsonl")), published.append)
    # In a session of its own: a terminal's Ctrl-C, a kill of the process group miss it.
    assert os.getsid(emitter._proc.pid) == emitter._proc.pid != os.getsid(0)
    emitter.submit(*frame(0))
    os.kill(emitter._proc.pid, signal.SIGINT)
    os.kill(emitter._proc.pid, signal.SIGTERM)  # a service manager signals every process it has
    time.sleep(0.5)
    emitter.submit(*frame(1))
    emitter.close()
    emitter.check()
    assert [r.seq for r in published] == [0, 1]
    assert len((tmp_path / "r.jsonl").read_text().splitlines()) == 2
    assert emitter._proc.returncode == 0


def test_a_result_interrupted_in_its_send_is_not_waited_for(tmp_path, monkeypatch):
    """A second Ctrl-C while the child is behind interrupts the send: close() then waited
    CLOSE_TIMEOUT (120 s) for the acknowledgement of a result that never went out."""
    import streamtrack.childproc as childproc

    published: list[FrameResult] = []
    emitter = ProcessEmitter(OutputsConfig(save_jsonl=str(tmp_path / "r.jsonl")), published.append)
    try:
        emitter.submit(*frame(0))
        real_send = childproc.send

        def interrupted(sock, parts, proc, on_cut=None):  # before the first part went
            if parts[0] == b"result":
                raise KeyboardInterrupt
            return real_send(sock, parts, proc, on_cut)

        monkeypatch.setattr(childproc, "send", interrupted)
        with pytest.raises(KeyboardInterrupt):
            emitter.submit(*frame(1))
        assert 1 not in emitter._pending  # what close() waits to hear of
        emitter.close()
    finally:
        emitter.close()
    emitter.check()
    assert [r.seq for r in published] == [0]
    assert len((tmp_path / "r.jsonl").read_text().splitlines()) == 1


def test_a_message_cut_between_its_parts_by_an_interrupt_does_not_take_the_next_ones(tmp_path, monkeypatch):
    """A Ctrl-C between two parts of a result left half a message: the "close" that
    followed was read as its rest, the child failed, and close() waited its full timeout."""
    class CutAfterTheFirstPart:
        """The emitter's socket, with a Ctrl-C after a result's first part."""

        def __init__(self, sock):
            self.sock, self.cut = sock, False

        def __getattr__(self, name):
            return getattr(self.sock, name)

        def send(self, data, flags=0):
            if self.cut:
                raise KeyboardInterrupt
            self.sock.send(data, flags=flags)
            self.cut = data == b"result"

    emitter = ProcessEmitter(OutputsConfig(save_jsonl=str(tmp_path / "r.jsonl")), lambda r: None)
    monkeypatch.setattr(emitter, "CLOSE_TIMEOUT", 5.0)
    real_socket = emitter._sock
    try:
        emitter.submit(*frame(0))
        emitter._sock = CutAfterTheFirstPart(real_socket)
        with pytest.raises(KeyboardInterrupt):
            emitter.submit(*frame(1))
        emitter._sock = real_socket
        emitter.publish_status_after_results("stopped")  # what a stopping tracker sends: not now
    finally:
        emitter._sock = real_socket
        emitter.close()
    emitter.check()  # the child did not take "close" for the rest of the result and fail
    assert emitter._proc.returncode == 0  # it closed its outputs on the exit signal
    if (tmp_path / "r.jsonl").exists():  # frame 0, if the child had written it before the signal
        assert [json.loads(line)["seq"] for line in (tmp_path / "r.jsonl").read_text().splitlines()] == [0]


def test_each_frame_written_is_reported_by_the_next_submit(tmp_path):
    """What a supervisor resumes after: acknowledgements read 8 at a time (or every
    0.25 s) left up to 8 written frames unreported when the tracker was killed, and
    those were written again by the next tracker, in the JSONL and in the video."""
    published: list[FrameResult] = []
    emitter = ProcessEmitter(OutputsConfig(save_jsonl=str(tmp_path / "r.jsonl")), published.append)
    try:
        for seq in range(4):
            emitter.submit(*frame(seq))
            assert emitter._sock.poll(10_000, zmq.POLLIN)  # its acknowledgement is in, not yet read
        emitter.submit(*frame(4))
        assert [r.seq for r in published] == [0, 1, 2, 3]
    finally:
        emitter.close()


CRASHING_TRACKER = """
import sys
from streamtrack.emitter import OutputsConfig, ProcessEmitter
e = ProcessEmitter(OutputsConfig(publish="tcp://127.0.0.1:0"), lambda r: None)
print(e._proc.pid, flush=True)
import os
os._exit(3)
"""


def test_the_child_exits_when_the_tracker_dies_without_closing_it(tmp_path):
    out = subprocess.run([sys.executable, "-c", CRASHING_TRACKER], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "TMPDIR": str(tmp_path)})  # its socket folder stays there
    assert out.returncode == 3, out.stderr
    assert exits_within(int(out.stdout.strip()), 10), "the emit process outlived its tracker"


@pytest.mark.timeout(300)
@pytest.mark.parametrize("how", ["sigterm to every process", "emit process killed"])
def test_a_run_emitting_in_a_process(tmp_path, tiny_checkpoint, how):
    """SIGTERM to every process of a run (``systemctl stop``) stops it as one to the run
    would; a killed emit process ends it with one line, not a traceback."""
    from streamtrack.synthetic import make_clip, write_video

    video = write_video(make_clip(200, 96, 64, num_objects=1).frames, tmp_path / "clip.mp4")
    jsonl = tmp_path / "r.jsonl"
    (tmp_path / "emit.yaml").write_text("emit: process\n")
    run = subprocess.Popen(
        [sys.executable, "-m", "streamtrack", "run", str(video), "--box", "10,10,40,40",
         "--checkpoint", str(tiny_checkpoint), "--image-size", "64", "--device", "cpu",
         "--config", str(tmp_path / "emit.yaml"), "--save-jsonl", str(jsonl),
         "--save-video", str(tmp_path / "v.mp4")],
        stderr=subprocess.PIPE, text=True, start_new_session=True, env={**os.environ, "TQDM_DISABLE": "1"})
    try:
        deadline = time.monotonic() + 120
        while not (jsonl.exists() and len(jsonl.read_text().splitlines()) >= 3):
            assert run.poll() is None and time.monotonic() < deadline, run.stderr.read()
            time.sleep(0.1)
        if how == "emit process killed":
            child = subprocess.run(["pgrep", "-P", str(run.pid), "-f", "streamtrack.emitter"],
                                   capture_output=True, text=True)
            os.kill(int(child.stdout.split()[0]), signal.SIGKILL)
        else:
            os.killpg(run.pid, signal.SIGTERM)  # what reaches the emit process, it ignores
        _, err = run.communicate(timeout=60)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    assert "Traceback" not in err, err
    if how == "emit process killed":
        assert run.returncode == 1
        assert err.splitlines()[-1] == ("streamtrack: error: the emit process exited unexpectedly (killed by "
                                        "SIGKILL, as by the OOM killer or kill -9)"), err
    else:
        assert run.returncode == 143, err
        assert err.splitlines()[-1].endswith("(interrupted)"), err
        lines = jsonl.read_text().splitlines()
        import av

        with av.open(str(tmp_path / "v.mp4")) as played:  # whole: the child closed it
            assert sum(1 for _ in played.decode(video=0)) == len(lines)


UNCLOSED_AT_EXIT = """
import sys, time
from test_emitter import frame
from streamtrack.emitter import OutputsConfig, ProcessEmitter
published = []
e = ProcessEmitter(OutputsConfig(save_jsonl=sys.argv[1]), published.append)
for seq in range(3):
    e.submit(*frame(seq))
deadline = time.monotonic() + 30
while len(published) < 3 and time.monotonic() < deadline:  # written (its acknowledgements)
    e._drain(100)
print(e._proc.pid, e._dir, len(published), flush=True)
"""


def test_an_emitter_left_open_at_exit_leaves_its_files_whole_and_removes_its_folder(tmp_path):
    """A second Ctrl-C ("quit at once") can cut the tracker's cleanup short: exit still ends
    the child cleanly (what it had not written yet is lost, as quitting at once means)."""
    out = subprocess.run([sys.executable, "-c", UNCLOSED_AT_EXIT, str(tmp_path / "r.jsonl")],
                         capture_output=True, text=True, timeout=60, cwd=Path(__file__).parent)
    assert out.returncode == 0, out.stderr
    pid, folder, written = out.stdout.split()
    assert exits_within(int(pid), 10) and not Path(folder).exists()
    assert written == "3"
    seqs = [FrameResult.from_json(x).seq for x in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert seqs == [0, 1, 2]


def test_status_events_through_the_process_keep_their_fields(tmp_path):
    emitter = ProcessEmitter(OutputsConfig(publish="tcp://127.0.0.1:0"), lambda r: None)
    wire = Wire(emitter.publisher.endpoint)
    try:
        wire.wait_joined(lambda: emitter.publisher.publish_status("ping"))
        sent = emitter.publisher.publish_status("source_state", old="connecting", new="streaming",
                                                reason=None)
        (msg,) = wire.take(1)
        assert msg[0] == b"status/cam0"
        assert StatusEvent.from_json(msg[1]) == sent
    finally:
        emitter.close()
        wire.close()


@pytest.mark.parametrize("kind", ["thread", "process"])
def test_a_status_after_the_results_is_published_and_timed_after_them(kind, tmp_path):
    """The end of a run (``tracker_state`` stopped) goes out after the results queued ahead
    of it, and its time says when it went out, not when it was queued."""
    cfg = OutputsConfig(stream="cam7", publish="tcp://127.0.0.1:0", save_masks=str(tmp_path / "m"),
                        save_video=str(tmp_path / "v.mp4"), publish_frames=True)
    emitter = make_emitter(kind, cfg, lambda r: None)
    wire = Wire(emitter.publisher.endpoint)
    try:
        wire.wait_joined(lambda: emitter.publisher.publish_status("ping"))
        for seq in range(8):  # a burst: results are still queued when the status is
            emitter.submit(*frame(seq))
        emitter.publish_status_after_results("tracker_state", old="running", new="stopped")
        emitter.close()
        msgs = wire.take(2 * 8 + 1)
    finally:
        emitter.close()
        wire.close()
    topics = [m[0].split(b"/")[0] for m in msgs]
    assert topics[-1] == b"status" and topics.count(b"masks") == 8, topics
    stopped = StatusEvent.from_json(msgs[-1][1])
    assert stopped.kind == "tracker_state" and stopped.data == {"old": "running", "new": "stopped"}
    last_publish = max(FrameResult.from_json(m[1]).t.publish for m in msgs if m[0] == b"masks/cam7")
    assert stopped.time >= last_publish


def test_tracker_with_a_process_emitter_gives_the_thread_runs_results(tiny_checkpoint, tmp_path):
    from streamtrack.pipeline import RunConfig

    lines, summaries = track_both_ways(tmp_path, tiny_checkpoint, "emit", publish="tcp://127.0.0.1:0")
    for mode in lines:
        for d in lines[mode]:
            assert d["t"].pop("publish") >= d["t"]["infer_end"]
            d.pop("t")
    assert len(lines["process"]) == 8
    assert lines["process"] == lines["thread"]
    assert [len(d["objects"]) for d in lines["process"]] == [1, 1, 1, 1, 2, 2, 2, 2]
    assert summaries["process"].frames == 8 and summaries["process"].step_p50 > 0
    assert set(summaries["process"].objects) == {1, 2}
    assert summaries["process"].objects == summaries["thread"].objects
    with pytest.raises(UserError, match="emit must be one of thread, process"):
        RunConfig(source="clip.mp4", emit="fork")


def test_outputs_config_crosses_to_the_child_intact(tmp_path):
    from streamtrack.curve import CurveServer

    cfg = OutputsConfig(stream="s1", publish="tcp://127.0.0.1:0", save_jsonl="a.jsonl", save_masks="m",
                        save_video="v.mp4", publish_frames=True, restarts=2,
                        curve=CurveServer(secret_file="k/server.key_secret", clients_dir="k/clients"))
    assert OutputsConfig.from_json(cfg.to_json()) == cfg
    assert OutputsConfig.from_json(OutputsConfig().to_json()) == OutputsConfig()


_FINALIZED = """
import os, signal, sys, time, weakref
from streamtrack import childproc

childproc.become_child(os.getppid())
childproc.CLOSE_GRACE = 1.0
how = sys.argv[1]
if how == "closing":
    childproc.closing_outputs = True


class Finalized:
    def __del__(self):
        if how != "weakref":
            os.kill(os.getpid(), childproc.EXIT_SIGNAL)
            time.sleep(0.1)  # the signal's handler runs in here


def signalled():
    os.kill(os.getpid(), childproc.EXIT_SIGNAL)
    time.sleep(0.1)


try:
    if how == "weakref":
        weakref.finalize(Finalized(), signalled)  # a finalizer that is not a __del__
    else:
        Finalized()  # dropped at once
    time.sleep(3)
    print("went on")
finally:
    print("finally")
"""


@pytest.mark.parametrize("how", ["del", "weakref", "closing"])
def test_a_helper_told_to_exit_in_a_finalizer_exits_a_moment_later(how):
    """The exit signal (its parent died) in an object's finalizer raised a SystemExit
    there, which Python prints with a traceback and ignores.  A helper closing its outputs
    finishes them first, but within CLOSE_GRACE (a close blocked on a stalled reader would
    keep it, and its publish endpoint, for good)."""
    done = subprocess.run([sys.executable, "-c", _FINALIZED, how], capture_output=True, text=True,
                          timeout=60)
    assert "Traceback" not in done.stderr and "Exception ignored" not in done.stderr, done.stderr
    if how == "closing":  # no more than its grace
        assert done.returncode == -signal.SIGALRM and done.stdout == "", (done.returncode, done.stdout)
    else:
        assert done.returncode == 0 and done.stdout.split() == ["finally"], (done.returncode, done.stdout)
