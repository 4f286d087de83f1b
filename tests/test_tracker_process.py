"""The tracker process and its supervisor, as real processes on loopback.

Each test starts ``python -m streamtrack run ... --publish`` (supervisor + spawned
tracker process) on a synthetic H.264 clip with a small random-weight model, and
talks to it over tcp://127.0.0.1 like any client would.  Startup (import torch +
build the model) dominates, so the live tracker is shared by the tests that only
need "a tracker that keeps running" (fuzz, subscribe CLI, SIGTERM last).
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import av
import numpy as np
import pytest
import zmq
from conftest import TEST_IMAGE_SIZE, assert_every_threads_stack, assert_summary_fps, free_port

from streamtrack.capture import CaptureConfig, open_source
from streamtrack.control import ControlClient, ControlError
from streamtrack.emitter import video_part_path
from streamtrack.engine import EngineConfig, Prompt, StreamingEngine
from streamtrack.errors import UserError
from streamtrack.models import build_model
from streamtrack.pipeline import Resume, RunConfig, is_local_endpoint, warn_if_exposed
from streamtrack.protocol import FrameResult, ObjectResult, decode_mask
from streamtrack.subscriber import Subscriber
from streamtrack.supervisor import Supervisor, SupervisorConfig, TrackerState, _Seen, resume_from_seen
from streamtrack.synthetic import make_clip, write_video

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

REPO = Path(__file__).resolve().parents[1]
FRAMES = 16
BOX1 = "25,30,55,54"  # object 1 of make_clip(.., 160, 120, seed=1) on frame 0
BOX2 = "100,65,124,91"  # object 2
HANG_TIMEOUT = 20  # s, the shared live tracker's: far above its steps, even on a loaded machine


@pytest.fixture(scope="module")
def clip_path(tmp_path_factory) -> Path:
    clip = make_clip(FRAMES, 160, 120, num_objects=2, seed=1)
    return write_video(clip.frames, tmp_path_factory.mktemp("clip") / "clip.mp4", fps=30)


@dataclass
class Proc:
    popen: subprocess.Popen
    publish: str
    control: str
    stderr: Path

    def err(self) -> str:
        return self.stderr.read_text(errors="replace")

    def wait(self, timeout: float) -> int:
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"tracker did not finish in {timeout} s; stderr:\n{self.err()}") from None

    def close(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(30)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(10)


def launch(tmp: Path, source: Path, checkpoint: Path, *extra: str, boxes=(BOX1,), quiet=True,
           bar=False) -> Proc:
    pub, ctl = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    args = [sys.executable, "-m", "streamtrack", *(["-q"] if quiet else []), "run", str(source),
            "--checkpoint", str(checkpoint), "--image-size", str(TEST_IMAGE_SIZE),
            "--device", "cpu", "--publish", pub, "--control", ctl, *extra]
    for b in boxes:
        args += ["--box", b]
    stderr = tmp / f"stderr-{time.monotonic_ns()}.txt"
    env = {**os.environ, "TQDM_DISABLE": "" if bar else "1"}
    with open(stderr, "wb") as err:
        popen = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=err, env=env)
    return Proc(popen, pub, ctl, stderr)


def tracker_status(ctl: str, timeout: float = 90) -> dict:
    """The tracker's control `status` reply, retried while the model loads."""
    deadline = time.monotonic() + timeout
    with ControlClient(ctl, timeout=3) as client:
        while True:
            try:
                return client.status()
            except ControlError:
                if time.monotonic() > deadline:
                    raise


def pid_alive(pid: int) -> bool:
    """True for a live process (a zombie awaiting its parent's wait() counts as dead)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def collect(sub: Subscriber, until, timeout: float) -> list:
    """Messages until ``until(messages)`` is true (or raise after ``timeout``)."""
    got: list = []
    deadline = time.monotonic() + timeout
    while not until(got):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {len(got)} messages")
        msg = sub.recv(timeout=0.2)
        if msg is not None:
            got.append(msg)
    return got


def restart_index(messages: list) -> int | None:
    """Index of the first restarted tracker's ``tracker_state`` status, if any."""
    return next((i for i, m in enumerate(messages) if m.kind == "status"
                 and m.status.kind == "tracker_state" and m.status.data.get("restarts") == 1),
                None)


def masks_after_restart(messages: list) -> bool:
    at = restart_index(messages)
    return at is not None and any(m.kind == "masks" for m in messages[at + 1:])


def engine_masks(clip_path: Path, checkpoint: Path, prompts: list[Prompt]) -> list[dict[int, np.ndarray]]:
    """What the engine computes in this process on the same decoded frames."""
    model = build_model("sam2.1_hiera_tiny", checkpoint, image_size=TEST_IMAGE_SIZE)
    engine = StreamingEngine(model, EngineConfig(device="cpu"))
    out = []
    with open_source(str(clip_path), CaptureConfig()) as cap:
        for i, frame in enumerate(cap):
            res = engine.step(frame.image, prompts if i == 0 else [])
            out.append({o.obj_id: o.mask for o in res.objects})
    return out


# --------------------------------------------------------------------------- file source


@pytest.mark.timeout(400)
def test_file_every_frame_in_order_masks_equal_engine_slow_subscriber_fresh(
    tmp_path, clip_path, tiny_checkpoint
):
    proc = launch(tmp_path, clip_path, tiny_checkpoint)
    fast = Subscriber(proc.publish, topics=["masks/", "status/", "stats/"])
    slow = Subscriber(proc.publish, topics=["masks/"])
    received: dict[int, float] = {}  # seq -> when the fast subscriber got it
    handed: list[tuple[int, float, int]] = []  # slow consumer: seq, hand-out time, skipped
    stop = threading.Event()

    def slow_consumer() -> None:
        while not stop.is_set():
            msg = slow.recv(timeout=0.2)
            if msg is not None:
                handed.append((msg.seq, time.time(), msg.skipped))
                # Slower than the tracker whatever the machine's speed: handling one
                # message takes as long as the tracker needs for 3 more frames.
                target = msg.seq + 3
                while not stop.is_set() and max(received, default=-1) < min(target, FRAMES - 1):
                    time.sleep(0.02)
                if msg.seq >= FRAMES - 1:
                    return

    t = threading.Thread(target=slow_consumer, daemon=True)
    t.start()
    msgs: list = []
    try:
        deadline = time.monotonic() + 300
        while not (len(received) >= FRAMES and any(
                x.kind == "status" and x.status.data.get("new") == "stopped" for x in msgs)):
            assert time.monotonic() < deadline, f"timed out after {len(received)} results"
            m = fast.recv(timeout=0.2)
            if m is not None:
                msgs.append(m)
                if m.kind == "masks":
                    received[m.seq] = m.received
                    if len(received) == 1:  # every thread's stack on stderr; the tracker goes on
                        os.kill(tracker_status(proc.control)["pid"], signal.SIGUSR1)
        assert proc.wait(60) == 0, proc.err()
        assert_every_threads_stack(proc.err())
        counters = fast.counters("cam0")
        t.join(10)
    finally:
        stop.set()
        t.join(5)
        fast.close()
        slow.close()
        proc.close()

    results = [m.result for m in msgs if m.kind == "masks"]
    # Every frame, in order, contiguous seq, none missed or superseded.
    assert [r.seq for r in results] == list(range(FRAMES))
    assert [r.frame_id for r in results] == list(range(FRAMES))
    assert counters.missed == 0 and counters.superseded == 0 and counters.restarts == 0
    assert all([o.obj_id for o in r.objects] == [1] for r in results)
    kinds = {(m.status.kind, m.status.data.get("new")) for m in msgs if m.kind == "status"}
    assert ("tracker_state", "running") in kinds and ("source_state", "ended") in kinds
    # The end is announced after the last result was published: a viewer shows it ended,
    # not gone silent. (A subscriber hands status messages out first: compare times.)
    stopped = [m.status for m in msgs if m.kind == "status" and m.status.kind == "tracker_state"
               and m.status.data.get("new") == "stopped"]
    last_publish = max(r.t.publish for r in results)
    assert len(stopped) == 1 and stopped[0].time >= last_publish, (stopped, last_publish)
    # One tracker all along (a restart continues seq, so the counters cannot tell).
    restarts = [m.status.data.get("restarts") for m in msgs if m.kind == "status"
                and m.status.kind == "tracker_state" and m.status.data.get("old") == "starting"]
    assert restarts == [0], (restarts, proc.err())
    assert ("object_state", "visible") in kinds or ("object_state", "occluded") in kinds
    assert any(m.kind == "stats" and m.stats.frames > 0 for m in msgs)

    # The slow consumer skipped to the newest each time: no message it got was
    # older than one the fast subscriber had already received 50 ms before.
    assert 2 <= len(handed) <= FRAMES // 3 + 2, handed  # 0, 3, 6, ... and the last
    seqs = [s for s, _, _ in handed]
    assert seqs == sorted(set(seqs))
    for seq, at, _ in handed:
        newer = [s for s, when in received.items() if s > seq and when < at - 0.05]
        assert not newer, f"slow consumer got stale seq {seq} at {at}; newer: {newer}"
    # ...and was told how many it skipped (seq gaps since its previous message).
    assert sum(k for _, _, k in handed[1:]) == seqs[-1] - seqs[0] - (len(seqs) - 1)

    # The published masks are the engine's masks on the same decoded frames.
    box = [float(v) for v in BOX1.split(",")]
    expected = engine_masks(clip_path, tiny_checkpoint, [Prompt.make(1, box=box)])
    assert len(expected) == FRAMES
    worst = 1.0
    for r, exp in zip(results, expected, strict=True):
        got = decode_mask(r.object(1).rle)
        union = np.logical_or(got, exp[1]).sum()
        iou = np.logical_and(got, exp[1]).sum() / union if union else 1.0
        worst = min(worst, iou)
    assert worst >= 0.999, f"worst mask IoU vs in-test engine {worst}; tracker stderr:\n{proc.err()[-4000:]}"
    assert any(r.object(1).area > 0 for r in results)


# ------------------------------------------------------------------------------ restart


@pytest.mark.timeout(500)
@pytest.mark.parametrize("emit", ["thread", "process"])
def test_sigkill_restarts_reseeds_same_ids_and_resumes_file(tmp_path, clip_path, tiny_checkpoint, emit,
                                                            monkeypatch):
    # emit: process writes the files in a process of its own, which outlives the tracker.
    monkeypatch.setenv("STREAMTRACK_EMIT", emit)
    jsonl, masks, video = tmp_path / "out.jsonl", tmp_path / "masks", tmp_path / "out.mp4"
    (tmp_path / "out.part3.mp4").write_bytes(b"an earlier run's third part")
    proc = launch(tmp_path, clip_path, tiny_checkpoint, "--save-jsonl", str(jsonl), "--save-masks",
                  str(masks), "--save-video", str(video), boxes=(BOX1, BOX2), quiet=False, bar=True)
    sub = Subscriber(proc.publish, topics=["masks/", "status/"])
    try:
        before = collect(sub, lambda m: sum(x.kind == "masks" for x in m) >= 4, timeout=300)
        first_pid = tracker_status(proc.control)["pid"]
        os.kill(first_pid, signal.SIGKILL)
        killed_at = time.time()
        after = collect(sub, masks_after_restart, timeout=300)
        try:
            status = tracker_status(proc.control, timeout=10)
        except ControlError:  # already finished the clip
            status = None
        after += collect(sub, lambda m: any(
            x.kind == "masks" and x.result.frame_id == FRAMES - 1 for x in after + m), timeout=300)
        assert proc.wait(120) == 0, proc.err()
    finally:
        sub.close()
        proc.close()
    assert not pid_alive(first_pid)
    assert "cannot seek" not in proc.err()  # it went to the frame by its pts
    if status is not None:
        assert status["pid"] != first_pid and status["restarts"] == 1
    # Split at the new tracker's "running" status, not at the time of the kill: masks
    # the old process sent just before it died can still arrive after ``killed_at``.
    msgs = before + after
    restarted_at = restart_index(msgs)
    assert restarted_at is not None, "no tracker_state status with restarts=1"
    assert msgs[restarted_at].received > killed_at
    pre = [m.result for m in msgs[:restarted_at] if m.kind == "masks"]
    post = [m.result for m in msgs[restarted_at:] if m.kind == "masks"]
    assert post, "no message after the restart"
    # Same object ids on every frame after the restart.
    assert all({o.obj_id for o in r.objects} == {1, 2} for r in post)
    # The file resumed right after the last frame the tracker reported published and
    # written (<= the last we saw): every frame was published at least once; a frame
    # processed again has a new seq (at most the one in flight between publishing and
    # reporting can repeat one), and seq continues from there.
    assert post[0].frame_id <= pre[-1].frame_id + 1
    assert {r.frame_id for r in pre + post} == set(range(FRAMES))
    assert post[0].seq >= pre[-1].seq and [r.seq for r in post] == list(
        range(post[0].seq, post[0].seq + len(post)))
    # The files hold every frame, each line whole (a frame may be there twice, with a new
    # seq), and the killed tracker's part of the video plays.
    lines = [FrameResult.from_json(line) for line in jsonl.read_text().splitlines()]
    assert {r.frame_id for r in lines} == set(range(FRAMES))
    assert sorted(int(p.stem) for p in masks.glob("*.png")) == list(range(FRAMES))

    # The video's parts hold every frame once: the killed tracker's part ends with the
    # last frame it had in the file (the muxer holds the newest until the next comes),
    # the next part starts with the frame after it.  An earlier run's part is gone.
    parts = sorted(p.name for p in tmp_path.glob("out*.mp4"))
    assert parts == ["out.mp4", "out.part2.mp4"], parts
    counts = []
    for part in parts:
        with av.open(str(tmp_path / part)) as container:
            counts.append(sum(1 for _ in container.decode(video=0)))
    assert counts[0] >= 1 and sum(counts) == FRAMES, counts
    # Re-seeded from the last published masks: the first frame after the restart
    # starts from those masks.
    last = {o.obj_id: o for o in pre[-1].objects}
    for o in post[0].objects:
        if last[o.obj_id].area:
            a, b = decode_mask(o.rle), decode_mask(last[o.obj_id].rle)
            assert (a & b).sum() / (a | b).sum() > 0.5
    # On a line of its own, not after the killed tracker's unfinished progress bar.
    died = r"^WARNING streamtrack.supervisor: tracker process died .*restart 1"
    assert re.search(died, proc.err(), re.M), proc.err()
    # The summary counts both trackers' frames (a frame processed again counts twice), and
    # its fps leaves out both starts and the wait before the restart.
    summary = re.search(r"^(\d+) frames in ([0-9.]+) s \(([0-9.]+) fps; ([0-9.]+) s of it starting\)",
                        proc.err(), re.M)
    assert summary and FRAMES <= int(summary.group(1)) <= FRAMES + 2, proc.err()
    frames, seconds, fps, starting = int(summary.group(1)), *map(float, summary.groups()[1:])
    assert 0 < starting < seconds
    assert_summary_fps(frames, fps, seconds, starting)


@pytest.mark.timeout(200)
def test_a_run_stopped_between_trackers_sums_up_the_objects_of_the_last_result(clip_path, tiny_checkpoint):
    """Stopped while it waits to restart a dead tracker: no tracker ends with a summary of
    its own, and the run's still names the objects as the last result had them."""
    engine = EngineConfig(checkpoint=str(tiny_checkpoint), image_size=TEST_IMAGE_SIZE, device="cpu")
    run = RunConfig(source=str(clip_path), engine=engine, publish=f"tcp://127.0.0.1:{free_port()}",
                    progress=False, realtime=True, loop=True,
                    prompts={0: [Prompt.make(1, box=[float(v) for v in BOX1.split(",")])]})
    sup = Supervisor(run, SupervisorConfig(backoff_initial=30, backoff_max=30))
    summary: dict = {}
    thread = threading.Thread(target=lambda: summary.update(run=sup.run()), daemon=True)
    thread.start()
    try:
        with Subscriber(run.publish) as sub:
            assert sub.latest("cam0", timeout=120) is not None
        # Until the supervisor has seen a result too.  (Waiting for a pause in the results
        # never ended where the engine steps faster than one frame every 0.2 s.)
        deadline = time.monotonic() + 60
        while 1 not in sup._seen.states and time.monotonic() < deadline:
            time.sleep(0.05)
        assert 1 in sup._seen.states
        os.kill(sup.pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while sup.state is not TrackerState.BACKOFF and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sup.state is TrackerState.BACKOFF
    finally:
        sup.stop()
        thread.join(60)
    assert summary["run"].interrupted and set(summary["run"].objects) == {1}


@pytest.mark.timeout(200)
def test_a_tracker_killed_at_the_restart_limit_ends_the_run_on_a_line_of_its_own(
        tmp_path, clip_path, tiny_checkpoint, monkeypatch):
    """The killed tracker's progress bar never ended its line: the error does not join it.
    Nor does it leave its emit process's private folder behind."""
    import re

    temp = Path(tempfile.mkdtemp(prefix="st-", dir="/tmp"))  # short enough for a socket path in it
    monkeypatch.setenv("TMPDIR", str(temp))
    config = tmp_path / "emit.yaml"
    config.write_text("emit: process\n")
    proc = launch(tmp_path, clip_path, tiny_checkpoint, "--max-restarts", "0", "--realtime", "--loop",
                  "--config", str(config), quiet=False, bar=True)
    sub = Subscriber(proc.publish, topics=["masks/"])
    try:
        collect(sub, lambda m: len(m) >= 2, timeout=300)
        assert [p.name.startswith("streamtrack-emit-") for p in temp.iterdir()] == [True]
        os.kill(tracker_status(proc.control)["pid"], signal.SIGKILL)
        assert proc.wait(120) == 1
        left = [p.name for p in temp.iterdir()]
    finally:
        sub.close()
        proc.close()
        shutil.rmtree(temp)
    err = proc.err()
    assert "tracking:" in err  # the bar was there
    # the last line (no "leaked semaphore" warning after it: the kill was the supervisor's job)
    assert re.search(r"(^|\n)streamtrack: error: tracker process died \(killed by SIGKILL.*\) and the "
                     r"restart limit \(0\) is reached\n$", err), err[-500:]
    assert left == []


def spawned_tracker_of(supervisor: int, timeout: float = 60) -> int:
    """The pid of the tracker process a supervisor spawned, as soon as it exists."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            children = Path(f"/proc/{supervisor}/task/{supervisor}/children").read_text().split()
        except OSError:
            children = []
        for pid in children:
            try:
                if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    return int(pid)
            except OSError:
                pass
        time.sleep(0.005)
    raise AssertionError(f"supervisor {supervisor} spawned no tracker in {timeout} s")


@pytest.mark.timeout(120)
def test_a_tracker_stuck_in_its_start_is_killed_as_hung(tmp_path, clip_path, tiny_checkpoint):
    """Storage that stops answering while the checkpoint is read, a device that never
    initialises: a tracker that never gets to its first frame is not waited for forever.
    (A stopped process stands in for it, stopped before it could have loaded anything.)"""
    proc = launch(tmp_path, clip_path, tiny_checkpoint, "--start-timeout", "4", "--hang-timeout", "0",
                  "--max-restarts", "0", quiet=False)
    try:
        pid = spawned_tracker_of(proc.popen.pid)
        os.kill(pid, signal.SIGSTOP)
        stopped_at = time.monotonic()
        rc = proc.wait(90)
    finally:
        proc.close()
    err = proc.err()
    assert rc == 1 and time.monotonic() - stopped_at >= 4, err
    assert not pid_alive(pid)
    assert f"tracker process {pid} has not started tracking after" in err, err
    assert re.search(r"(^|\n)streamtrack: error: tracker process died \(not started after \d+ s; killed "
                     r"as hung\) and the restart limit \(0\) is reached\n$", err), err[-500:]


@pytest.mark.timeout(120)
def test_a_tracker_that_dies_before_every_first_result_is_given_up(monkeypatch):
    """Loaded and dead on its first frame each time (a decode process that cannot start,
    say): a model loaded counted as a start that worked, so it was restarted forever."""
    import stand_in_trackers

    from streamtrack import supervisor

    monkeypatch.setattr(supervisor, "_child_main", stand_in_trackers.loads_then_dies)
    run = RunConfig(source="clip.mp4", publish=f"tcp://127.0.0.1:{free_port()}", progress=False)
    sup = Supervisor(run, SupervisorConfig(backoff_initial=0.01, backoff_max=0.01, max_failed_starts=3))
    with pytest.raises(supervisor.SupervisorGaveUp, match=r"^tracker process died 3 times before processing "
                                                          r"a frame; last: exit code 3"):
        sup.run()
    assert sup.state is TrackerState.FAILED


@pytest.mark.timeout(120)
def test_a_tracker_that_dies_before_reading_a_large_configuration_does_not_hang_the_supervisor(
        monkeypatch):
    """A restart's configuration carries the objects' masks, megabytes at 720p: a tracker
    killed as it started, before it had read them, left the supervisor blocked for good
    writing them into a pipe (and deaf to Ctrl-C)."""
    import multiprocessing.resource_tracker
    import multiprocessing.spawn

    from streamtrack import supervisor

    multiprocessing.resource_tracker.ensure_running()  # started by the real interpreter
    # A child that exits before it reads anything: as if killed while Python started.
    monkeypatch.setattr(multiprocessing.spawn, "_python_exe", os.fsencode(shutil.which("false")))
    masks = {0: [Prompt(1, mask=np.ones((720, 1280), bool))]}  # 0.9 MB pickled: > a pipe's 64 KiB
    run = RunConfig(source="clip.mp4", prompts=masks, publish=f"tcp://127.0.0.1:{free_port()}",
                    progress=False)
    sup = Supervisor(run, SupervisorConfig(backoff_initial=0.01, backoff_max=0.01, max_failed_starts=2))
    with pytest.raises(supervisor.SupervisorGaveUp, match=r"died 2 times before processing a frame; "
                                                          r"last: exit code 1"):
        sup.run()


@pytest.mark.timeout(120)
def _supervising(monkeypatch, stand_in: str) -> tuple[Supervisor, threading.Thread, list]:
    """A supervisor of the stand-in tracker ``stand_in``, running in a thread once the
    tracker says it runs: (supervisor, its thread, where its summary goes)."""
    import stand_in_trackers

    from streamtrack import supervisor

    monkeypatch.setattr(supervisor, "_child_main", getattr(stand_in_trackers, stand_in))
    run = RunConfig(source="clip.mp4", publish=f"tcp://127.0.0.1:{free_port()}", progress=False)
    sup = Supervisor(run, SupervisorConfig(stop_timeout=60))
    summaries: list = []
    runner = threading.Thread(target=lambda: summaries.append(sup.run()), daemon=True)
    runner.start()
    deadline = time.monotonic() + 60
    while sup.state is not TrackerState.RUNNING and time.monotonic() < deadline:
        time.sleep(0.05)
    return sup, runner, summaries


def test_a_second_ctrl_c_kills_a_tracker_stuck_in_its_frame_at_once(monkeypatch):
    """The first Ctrl-C waits for the frame in hand (said once); the second, as without
    --publish, does not wait for it, nor for the stop timeout."""
    sup, runner, summaries = _supervising(monkeypatch, "stuck_in_a_frame")
    said: list[str] = []
    sup.on_interrupt = lambda: said.append("stopping")
    sup.stop(signal.SIGINT)
    runner.join(2)
    assert runner.is_alive() and said == ["stopping"]  # the frame in hand is waited for
    pid = sup.pid
    sup.stop(signal.SIGINT)
    runner.join(10)
    assert not runner.is_alive() and summaries[0].interrupted
    assert said == ["stopping"] and not pid_alive(pid)
    assert sup.interrupted_by == signal.SIGINT


def test_a_tracker_killed_by_a_second_ctrl_c_still_has_its_latency_in_the_summary(monkeypatch):
    """It sends no summary: the latency is its results' (GNU timeout's SIGINT reaches the run
    twice, and the summary said "latency n/a")."""
    sup, runner, summaries = _supervising(monkeypatch, "publishes_then_stuck_in_a_frame")
    time.sleep(2.5)  # its results are out
    sup.stop(signal.SIGINT)
    sup.stop(signal.SIGINT)
    runner.join(10)
    assert not runner.is_alive() and summaries[0].interrupted
    assert summaries[0].latency_p50 == pytest.approx(0.25, abs=0.1), summaries[0]
    assert "latency p50" in summaries[0].line()


def test_user_error_in_tracker_process_is_not_restarted(tmp_path, clip_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    proc = launch(tmp_path, clip_path, bad)
    try:
        rc = proc.wait(150)
    finally:
        proc.close()
    lines = [ln for ln in proc.err().splitlines() if ln.strip()]
    assert rc == 2, proc.err()
    assert len(lines) == 1 and lines[0].startswith("streamtrack: error:"), lines
    assert "restart" not in proc.err()


# ---------------------------------------------------------------------------- live tracker


@pytest.fixture(scope="module")
def live(tmp_path_factory, clip_path, tiny_checkpoint) -> Iterator[Proc]:
    """A tracker on a looping, real-time-paced file: runs until stopped."""
    proc = launch(tmp_path_factory.mktemp("live"), clip_path, tiny_checkpoint, "--realtime", "--loop",
                  "--hang-timeout", str(HANG_TIMEOUT), quiet=False)
    try:
        with Subscriber(proc.publish) as sub:  # first result: the frame size is known
            collect(sub, lambda m: len(m) >= 1, timeout=240)
        yield proc
    finally:
        proc.close()


def _fuzz_messages(n: int, seed: int = 0) -> Iterator[list[bytes]]:
    """``n`` malformed control requests: every one must be answered ``ok: false``."""
    rng = random.Random(seed)
    bad_ids = [0, -1, 2**31, 2**63, 1.5, "1", True, None, [1], {"a": 1}, 1e308]
    bad_coords = [-1, 1e300, "x", None, True, [1, 2]]
    rle_bad = [{"size": [120, 160], "counts": "zz"}, {"size": [10, 10], "counts": 5},
               {"size": [-1, 3], "counts": ""}, {"size": [120, 160]}, "mask.png",
               {"size": [99999, 99999], "counts": "0"}]

    def j(obj) -> list[bytes]:
        return [json.dumps(obj).encode()]

    makers = [
        lambda: [rng.randbytes(rng.randrange(1, 200))],
        lambda: [b"\xff\xfe" + rng.randbytes(20)],
        lambda: [b"{}", b"second part"],
        lambda: j(rng.choice([1, "status", None, [1, 2], 3.5, True])),
        lambda: j({}),
        lambda: j({"cmd": rng.choice([1, None, ["status"], {"x": 1}])}),
        lambda: j({"cmd": "".join(rng.choice("abcxyz_") for _ in range(rng.randrange(1, 12)))}),
        lambda: j({"cmd": rng.choice(["status", "reset", "pause", "resume"]), "extra": 1}),
        lambda: j({"cmd": "add_prompt"}),
        lambda: j({"cmd": "add_prompt", "obj_id": rng.choice(bad_ids), "box": [1, 1, 5, 5]}),
        lambda: j({"cmd": "add_prompt", "obj_id": 7}),
        lambda: j({"cmd": "add_prompt", "obj_id": 7, "points": [[rng.choice(bad_coords), 3]]}),
        lambda: j({"cmd": "add_prompt", "obj_id": 7, "points": [[1, 2]] * 65}),
        lambda: j({"cmd": "add_prompt", "obj_id": 7, "points": [[1, 2]], "labels": [1, 1]}),
        lambda: j({"cmd": "add_prompt", "obj_id": 7, "points": [[1, 2]], "labels": [2]}),
        lambda: j({"cmd": "add_prompt", "obj_id": 7, "labels": [1]}),
        lambda: j({"cmd": "add_prompt", "obj_id": 7, "box": [50, 50, 10, 10]}),
        lambda: j({"cmd": "add_prompt", "obj_id": 7, "box": [1, 2, 3]}),
        # Well-formed, but outside the 160x120 frame: the tracker must refuse it.
        lambda: j({"cmd": "add_prompt", "obj_id": 7, "points": [[rng.uniform(161, 1e6), 10]]}),
        lambda: j({"cmd": "add_prompt", "obj_id": 7, "box": [0, 0, 500, 500]}),
        lambda: j({"cmd": "add_prompt", "obj_id": 7, "mask": rng.choice(rle_bad)}),
        lambda: j({"cmd": "add_prompt", "obj_id": 7, "mask": {"size": [12, 16], "counts": "0`3"}}),
        lambda: j({"cmd": "add_prompt", "obj_id": 7, "box": [1, 1, 5, 5], "mask": rle_bad[0]}),
        lambda: j({"cmd": "remove_object", "obj_id": rng.randrange(100, 2**31 - 1)}),
        lambda: j({"cmd": "remove_object"}),
        lambda: [b'{"cmd": "add_prompt", "obj_id": 7, "points": [[NaN, 1]]}'],
        lambda: [b"[" * 100_000 + b"]" * 100_000],
        lambda: j({"cmd": "status", "id": "x" * 200, "pad": "y" * rng.randrange(1000, 100_000)}),
        lambda: [b'{"cmd": "status", "x": "' + b"a" * (5 << 20) + b'"}'],  # over the 4 MiB limit
    ]
    for i in range(n):
        if i % 2000 == 1999:
            yield makers[-1]()  # a few oversized ones, not 300 MB of them
        else:
            yield rng.choice(makers[:-1])()


@pytest.mark.timeout(400)
def test_10000_malformed_control_messages_all_rejected_tracker_keeps_tracking(live):
    pid = tracker_status(live.control)["pid"]
    n, window = 10_000, 900  # in flight: below ZeroMQ's default HWM of 1000
    ctx = zmq.Context.instance()
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(live.control)
    replies: list[dict] = []
    sent = 0
    started = time.monotonic()
    try:
        messages = _fuzz_messages(n)
        deadline = time.monotonic() + 300
        while len(replies) < n:
            while sent < n and sent - len(replies) < window:
                dealer.send_multipart(next(messages))
                sent += 1
            assert time.monotonic() < deadline, f"only {len(replies)} replies"
            if dealer.poll(1000):
                parts = dealer.recv_multipart()
                replies.append(json.loads(parts[-1]))
    finally:
        dealer.close(linger=0)
    elapsed = time.monotonic() - started
    print(f"{n} malformed requests answered in {elapsed:.1f} s")
    assert len(replies) == n
    bad = [r for r in replies if r.get("ok") is not False or not isinstance(r.get("error"), str)]
    assert not bad, bad[:5]
    # Still the same process, still tracking object 1, frames still coming.
    status = tracker_status(live.control)
    assert status["pid"] == pid and status["objects"].keys() == {"1"}
    with Subscriber(live.publish) as sub:
        fresh = collect(sub, lambda m: len(m) >= 3, timeout=120)
    assert all([o.obj_id for o in m.result.objects] == [1] for m in fresh)
    assert fresh[-1].result.t.capture > time.time() - 60


@pytest.mark.timeout(200)
def test_subscribe_cli_prints_json_lines(live, capsys):
    out = subprocess.run(
        [sys.executable, "-m", "streamtrack", "subscribe", live.publish,
         "--topics", "masks/", "stats/", "--count", "4", "--timeout", "60"],
        cwd=REPO, capture_output=True, text=True, timeout=150,
    )
    assert out.returncode == 0, out.stderr
    lines = [json.loads(ln) for ln in out.stdout.splitlines()]
    assert len(lines) == 4
    assert {ln["topic"] for ln in lines} <= {"masks/cam0", "stats/cam0"}
    masks = [ln for ln in lines if ln["topic"] == "masks/cam0"]
    assert masks and all(o["obj_id"] == 1 and "counts" not in o["rle"] for m in masks for o in m["objects"])
    FrameResult.from_dict({k: v for k, v in masks[0].items() if k not in ("topic", "skipped")},
                          validate_masks=False)

    # --rle keeps the masks (in-process, same code path).
    from streamtrack.cli import main

    assert main(["subscribe", live.publish, "--topics", "masks/", "--rle", "--count", "1",
                 "--timeout", "60"]) == 0
    line = json.loads(capsys.readouterr().out.splitlines()[0])
    assert decode_mask(line["objects"][0]["rle"]).shape == (120, 160)


@pytest.mark.timeout(300)
def test_a_suspended_run_is_not_taken_for_a_hung_tracker(live):
    """Ctrl-Z, then fg after longer than the hang timeout: the supervisor was stopped
    too, so the tracker's silence is not its own."""
    pid = tracker_status(live.control)["pid"]
    for p in (live.popen.pid, pid):
        os.kill(p, signal.SIGSTOP)
    time.sleep(HANG_TIMEOUT + 2)
    os.kill(live.popen.pid, signal.SIGCONT)  # the supervisor first: it looks before the tracker says a word
    time.sleep(1)
    os.kill(pid, signal.SIGCONT)
    time.sleep(3)
    assert tracker_status(live.control)["pid"] == pid
    assert "killed as hung" not in live.err()


@pytest.mark.timeout(300)
def test_a_stopped_tracker_is_killed_as_hung_and_restarted(live):
    """A stopped process stands in for a deadlock: alive, but its loop never goes round."""
    pid = tracker_status(live.control)["pid"]
    with Subscriber(live.publish, topics=["masks/", "status/"]) as sub:
        collect(sub, lambda m: any(x.kind == "masks" for x in m), timeout=60)
        os.kill(pid, signal.SIGSTOP)
        stopped_at = time.monotonic()
        msgs = collect(sub, masks_after_restart, timeout=240)
    restarted = msgs[restart_index(msgs)].status
    assert restarted.data["restarts"] == 1
    assert time.monotonic() - stopped_at >= HANG_TIMEOUT
    assert not pid_alive(pid)
    status = tracker_status(live.control)
    assert status["pid"] != pid and status["restarts"] == 1 and status["objects"].keys() == {"1"}
    err = live.err()
    assert f"tracker process {pid} sent no sign of life" in err and "killed as hung" in err
    assert "most recent call first" in err  # the hung tracker's stacks, for a bug report


@pytest.mark.timeout(120)
def test_sigterm_stops_supervisor_and_tracker_no_orphan(live):
    """Runs last on the shared live tracker: it stops it."""
    pid = tracker_status(live.control)["pid"]
    supervisor = live.popen.pid
    live.popen.send_signal(signal.SIGTERM)
    rc = live.wait(60)
    assert rc == 143, live.err()
    assert not pid_alive(pid) and not pid_alive(supervisor)
    # Sockets closed: the ports can be bound again at once.
    for ep in (live.publish, live.control):
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as ZeroMQ binds; not a listener
            s.bind(("127.0.0.1", int(ep.rsplit(":", 1)[1])))
    assert "Traceback" not in live.err()


# ----------------------------------------------------------------------------- units


def test_bind_warning_for_non_loopback(caplog):
    with caplog.at_level(logging.WARNING):
        assert not warn_if_exposed("tcp://127.0.0.1:5555", "publish")
        assert not warn_if_exposed("5555", "publish")
        assert not warn_if_exposed("ipc:///tmp/x.sock", "control")
        assert not caplog.records
        assert warn_if_exposed("tcp://0.0.0.0:5556", "control")
        assert warn_if_exposed("tcp://*:5555", "publish")
        assert warn_if_exposed("tcp://192.0.2.7:5555", "publish")
    assert len(caplog.records) == 3
    assert "no authentication" in caplog.records[0].getMessage()
    assert is_local_endpoint("tcp://localhost:1") and not is_local_endpoint("tcp://10.0.0.1:1")


def test_a_host_that_cannot_be_bound_is_an_error_without_the_exposure_warning(caplog, tmp_path):
    """The warning said the masks were "reachable from other machines", then the bind failed."""
    from streamtrack.pipeline import Tracker

    video = write_video(make_clip(4, 64, 48, num_objects=1).frames, tmp_path / "clip.mp4")
    for bad in ("tcp://192.0.2.7:25000", "tcp://nonexistent.invalid:25000"):  # not this machine's
        run = RunConfig(source=str(video), publish=bad, progress=False)
        with caplog.at_level(logging.WARNING), pytest.raises(UserError, match=f"cannot bind publish.*{bad}"):
            Tracker(run, engine=None).run()
        assert not [r for r in caplog.records if "reachable from other machines" in r.getMessage()]
    run = RunConfig(source=str(video), publish="tcp://0.0.0.0:0", progress=False,
                    engine=EngineConfig(checkpoint=str(tmp_path / "no.pt")))
    with caplog.at_level(logging.WARNING), pytest.raises(UserError, match="no.pt"):
        Tracker(run, engine=None).run()  # bound, warned, then the model fails to load
    assert [r for r in caplog.records if "reachable from other machines" in r.getMessage()]


def test_supervisor_keeps_newest_nonempty_mask_and_forgets_removed_objects():
    def result(seq, masks):
        objs = tuple(ObjectResult.from_mask(k, m, score=0.9) for k, m in masks.items())
        return FrameResult(stream="cam0", seq=seq, frame_id=seq, pts=None, width=4, height=3,
                           objects=objs)

    a = np.zeros((3, 4), bool)
    a[1, 1] = True
    b = np.zeros((3, 4), bool)
    b[2, 3] = True
    empty = np.zeros((3, 4), bool)
    seen = _Seen()
    seen.update(result(0, {1: a, 2: a}))
    seen.update(result(1, {1: b, 2: empty}))  # 2 occluded: keep where it was last seen
    assert (decode_mask(seen.masks[1]) == b).all() and (decode_mask(seen.masks[2]) == a).all()
    seen.update(result(2, {1: b}))  # 2 removed over the control channel
    assert set(seen.masks) == {1} and seen.seq == 2


def test_a_restart_continues_after_the_last_frame_in_the_files_with_new_seqs():
    before = Resume(frames_done=3, skip_to_frame=3, seq_start=3)
    seen = _Seen()
    assert resume_from_seen(seen, before, 1) == replace(before, restarts=1)  # nothing yet
    frame = FrameResult(stream="cam0", seq=10, frame_id=10, pts=0.4, width=4, height=3,
                        objects=(ObjectResult.from_mask(1, np.ones((3, 4), bool), score=0.9),))
    seen.update(frame)
    # The tracker wrote up to frame 8 (frames 9 and 10 were published, not yet written);
    # a file seeks to that frame's pts.
    seen.note_emitted(8, 8, 0.32)
    r = resume_from_seen(seen, before, 1)
    assert (r.skip_to_frame, r.skip_to_pts, r.seq_start, r.frames_done) == (9, 0.32, 11, 9)
    # The subscriber is behind what the tracker published and wrote.
    seen.note_emitted(12, 12, None)  # a frame without a timestamp: decoded up to
    r = resume_from_seen(seen, before, 1)
    assert (r.skip_to_frame, r.skip_to_pts, r.seq_start, r.frames_done) == (13, None, 13, 13)
    assert [p.obj_id for p in r.seed] == [1]

    # Without word from the tracker (a fleet's actors): after the last frame received.
    seen = _Seen()
    seen.update(frame)
    r = resume_from_seen(seen, before, 1)
    assert (r.skip_to_frame, r.skip_to_pts, r.seq_start, r.frames_done) == (11, 0.4, 11, 11)


def test_a_file_restart_continues_only_after_what_its_tracker_reported_in_the_files(clip_path):
    """A file read frame by frame is processed again from what is in the files: a tracker
    that died before reporting any result written (its video held the first frame) is
    started over, its video part rewritten rather than left empty behind a new one."""
    frame = FrameResult(stream="cam0", seq=0, frame_id=0, pts=None, width=4, height=3,
                        objects=(ObjectResult.from_mask(1, np.ones((3, 4), bool), score=0.9),))
    seen = _Seen()
    seen.update(frame)  # published, never reported written
    assert resume_from_seen(seen, Resume(), 1, written_only=True) == Resume(restarts=1, seq_start=1)
    assert resume_from_seen(seen, Resume(), 1).skip_to_frame == 1  # no word from the tracker: a fleet's
    # Where the frames cannot be counted in the part (not a fragmented MP4), the reports say
    # whether the dead tracker's part has any.
    run = RunConfig(source=str(clip_path), publish="tcp://127.0.0.1:0", save_video="v.avi")
    sup = Supervisor(run)
    assert sup._resume(run, emitted=0).video_part == 1  # nothing in its part: written again
    assert sup._resume(run, emitted=1).video_part == 2
    live = replace(run, loop=True)  # frames not processed again: reported at once
    assert [sup._resume(live, emitted=n).video_part for n in (1, 2)] == [1, 2]


def _killed_writer(path: Path, first: int, frames: int, tear: str = "") -> None:
    """A VideoWriter killed after writing frames ``first``.. of a 10 fps file, ``frames`` of
    them, each grey at 10 x its id (the last is still in its muxer).  ``tear``: "fragment",
    killed halfway through writing another fragment; "header", a few bytes into one."""
    code = ("import os, signal, sys, numpy as np\n"
            "from streamtrack.outputs import VideoWriter\n"
            "w = VideoWriter(sys.argv[1], fps=10)\n"
            "first, frames, tear = int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]\n"
            "for i in range(first, first + frames):\n"
            "    w.write(np.full((48, 64, 3), 10 * i, np.uint8), i / 10)\n"
            "if tear:\n"
            "    data = open(sys.argv[1], 'rb').read()\n"
            "    moof = data.rindex(b'moof') - 4\n"
            "    open(sys.argv[1], 'ab').write(data[moof:moof + (40 if tear == 'fragment' else 6)])\n"
            "os.kill(os.getpid(), signal.SIGKILL)\n")
    done = subprocess.run([sys.executable, "-c", code, str(path), str(first), str(frames), tear], timeout=60)
    assert done.returncode == -signal.SIGKILL


def _frame_ids_in(path: Path) -> list[int]:
    """The ids of the frames in a video of _killed_writer's grey frames."""
    with av.open(str(path)) as container:
        return [round(f.to_ndarray(format="gray").mean() / 10) for f in container.decode(video=0)]


def _results(frame_id: int, *, seq: int | None = None) -> FrameResult:
    """Frame ``frame_id``'s result, with one object."""
    obj = ObjectResult.from_mask(1, np.ones((3, 4), bool), score=0.9)
    return FrameResult(stream="cam0", seq=frame_id if seq is None else seq, frame_id=frame_id, pts=None,
                       width=4, height=3, objects=(obj,))


@pytest.mark.parametrize(("tear", "realtime"), [("", False), ("fragment", False), ("header", False),
                                                ("", True)])
def test_a_file_restart_writes_each_frame_once_to_the_video(clip_path, tmp_path, tear, realtime):
    """A file's tracker reports a frame written a moment after it is in the video; killed in
    between, the frame is in its part but processed again.  The restart counts the part's
    frames in the file (its torn end cut off, so that it plays) and the next tracker leaves
    those out of its part.  A paced file too: it goes on from there, not after the last
    frame published (which the frames held lost)."""
    from streamtrack.emitter import Outputs

    video = tmp_path / "v.mp4"
    run = RunConfig(source=str(clip_path), publish="tcp://127.0.0.1:0", save_video=str(video),
                    realtime=realtime)
    sup = Supervisor(run)
    sup._note_video_part(run)  # as the supervisor does before a tracker starts
    _killed_writer(video, 0, frames=4, tear=tear)  # frames 0-2 in the file, 3 lost in the muxer
    if tear == "fragment":  # as it is, nothing of it plays
        with pytest.raises(av.error.InvalidDataError):
            _frame_ids_in(video)
    sup._seen.update(_results(3))  # published, not written
    sup._seen.note_emitted(seq=1, frame_id=1)  # frame 2's report lost with the tracker
    resume = sup._resume(run, emitted=2, video_ids=[0, 1, 2, 3])
    assert (resume.skip_to_frame, resume.video_part, resume.video_through) == (2, 2, 2)
    assert _frame_ids_in(video) == [0, 1, 2]
    # The next tracker processes frame 2 again, and writes frames 3 on.
    outputs = Outputs(replace(run, resume=resume).outputs)
    for frame_id in range(2, 6):
        outputs.emit(replace(_results(frame_id, seq=frame_id + 1), pts=frame_id / 10, width=64, height=48,
                             objects=()), [], np.full((48, 64, 3), 10 * frame_id, np.uint8))
    outputs.close()
    assert _frame_ids_in(tmp_path / "v.part2.mp4") == [3, 4, 5]


def test_a_paced_files_restart_knows_which_frames_its_video_part_holds(clip_path, tmp_path):
    """A paced file drops frames while the tracker is slower than it: the part holds the
    first frames the tracker handed to it, which do not follow on from each other."""
    video = tmp_path / "v.mp4"
    run = RunConfig(source=str(clip_path), publish="tcp://127.0.0.1:0", save_video=str(video), realtime=True)
    sup = Supervisor(run)
    sup._note_video_part(run)
    _killed_writer(video, 0, frames=4)  # 3 frames in the file
    sup._seen.update(_results(2))
    sup._seen.note_emitted(seq=1, frame_id=2)
    resume = sup._resume(run, emitted=2, video_ids=[0, 2, 5, 6])  # 1, 3 and 4 dropped
    assert (resume.skip_to_frame, resume.video_part, resume.video_through) == (3, 2, 5)


def test_a_restart_counts_only_what_the_dead_tracker_put_in_its_part(clip_path, tmp_path):
    """An earlier run's video at the path, or a part that got no frame, keeps its number;
    a part goes on from the frame after the last one in the earlier parts."""
    video = tmp_path / "v.mp4"
    _killed_writer(video, 0, frames=11)  # an earlier run's video, of 10 frames
    run = RunConfig(source=str(clip_path), publish="tcp://127.0.0.1:0", save_video=str(video))
    sup = Supervisor(run)

    def died(config: RunConfig, first: int, frames: int, emitted_frame: int | None) -> Resume:
        sup._note_video_part(config)
        if frames:
            _killed_writer(video_part_path(video, (config.resume or Resume()).video_part), first, frames)
        if emitted_frame is not None:
            sup._seen.update(_results(emitted_frame))
            sup._seen.note_emitted(seq=emitted_frame, frame_id=emitted_frame)
        return sup._resume(config, emitted=0 if emitted_frame is None else emitted_frame + 1,
                           video_ids=list(range(first, first + frames)))

    # Died loading its model: the earlier run's file is not its part.
    first = died(run, 0, 0, None)
    assert (first.video_part, first.video_through) == (1, -1)
    # Died after its first result, which its writer held: an empty part, written again.
    second = died(replace(run, resume=first), 0, 1, None)
    assert video.stat().st_size == 0 and (second.video_part, second.video_through) == (1, -1)
    # Frames 0-3 in the file (4 in the muxer), 0-2 reported: the video goes on after 3.
    third = died(replace(run, resume=second), 0, 5, 2)
    assert (third.skip_to_frame, third.video_part, third.video_through) == (3, 2, 3)
    assert _frame_ids_in(video) == [0, 1, 2, 3]
    # Its successor processed frame 3 again (not in its part), then put 4 and 5 there.
    fourth = died(replace(run, resume=third), 4, 3, 5)
    assert (fourth.skip_to_frame, fourth.video_part, fourth.video_through) == (6, 3, 5)
    assert _frame_ids_in(tmp_path / "v.part2.mp4") == [4, 5]


def test_a_restart_waits_for_the_dead_trackers_video_writer_to_let_go(clip_path, tmp_path, monkeypatch,
                                                                     caplog):
    """A tracker's emitter process outlives it by a moment and closes the part (adding the
    frame its muxer held): its frames are counted once it is done.  One that does not let
    go leaves the part to it: the video goes on in the next."""
    from streamtrack import supervisor
    from streamtrack.outputs import VideoWriter, frames_in_video_part

    video = tmp_path / "v.mp4"
    writer = VideoWriter(video, fps=10)
    writer.write(np.zeros((48, 64, 3), np.uint8), 0.0)  # held: nothing in the file, locked all the same
    started = time.monotonic()
    with pytest.raises(TimeoutError):  # still written: cannot tell
        frames_in_video_part(video, timeout=0.3)
    assert time.monotonic() - started >= 0.3
    monkeypatch.setattr(supervisor, "VIDEO_WRITER_GONE_TIMEOUT", 0.2)
    run = RunConfig(source=str(clip_path), publish="tcp://127.0.0.1:0", save_video=str(video))
    with caplog.at_level(logging.WARNING, logger="streamtrack.supervisor"):
        assert Supervisor(run)._resume(run, emitted=0).video_part == 2
    assert f"video part {video} was still being written after 0.2 s" in caplog.text
    for i in range(1, 3):
        writer.write(np.zeros((48, 64, 3), np.uint8), i / 10)
    writer.close()
    assert frames_in_video_part(video, timeout=0.3) == 3
    assert frames_in_video_part(tmp_path / "none.mp4", timeout=0.3) == 0
    assert frames_in_video_part(tmp_path / "v.mkv", timeout=0.3) is None  # not counted: by reports
    live = RunConfig(source=str(clip_path), publish="tcp://127.0.0.1:0", save_video=str(video),
                     loop=True)
    # A live source's part with a frame in it is kept, whatever the reports say.
    assert Supervisor(live)._resume(live, emitted=1).video_part == 2


def test_a_restart_carries_frame_ids_drop_counts_and_object_states_on():
    """A live source's next tracker numbers frames after the last one published, counts
    drops on from the last result's, and knows the objects' states (no object_state event
    calls a re-seeded object new)."""
    objects = (ObjectResult.from_mask(1, np.ones((3, 4), bool), score=0.9),
               ObjectResult.from_mask(2, np.zeros((3, 4), bool), score=0.1, state="occluded"))
    seen = _Seen()
    seen.update(FrameResult(stream="cam0", seq=40, frame_id=11449, pts=None, width=4, height=3,
                            dropped={"queue_full": 11301}, objects=objects))
    seen.note_emitted(39, 11447)
    r = resume_from_seen(seen, Resume(), 1)
    assert r.frame_id_start == 11450 and r.dropped_before == {"queue_full": 11301}
    assert r.object_states == {1: "visible", 2: "occluded"}

def test_objects_unseeded_while_a_restarted_tracker_loaded_do_not_come_back_at_the_next_restart():
    objects = tuple(ObjectResult.from_mask(k, np.ones((3, 4), bool), score=0.9) for k in (1, 2, 3))
    seen = _Seen()
    seen.update(FrameResult(stream="cam0", seq=4, frame_id=4, pts=None, width=4, height=3, objects=objects))
    seen.note_prompts("unseeded", {"obj_id": 2})  # remove_object(2) before the first frame
    r = resume_from_seen(seen, Resume(), 2)
    assert [p.obj_id for p in r.seed] == [1, 3] and set(r.object_states) == {1, 3}
    seen.note_prompts("unseeded", {"obj_id": None})  # a reset
    assert resume_from_seen(seen, Resume(), 3).seed == ()


def test_prompts_queued_or_in_a_frame_not_yet_out_are_carried_over_a_restart():
    a, b, c, d = (Prompt.make(i, box=[1, 2, 30, 40]) for i in (1, 2, 3, 4))
    seen = _Seen()
    for kind, data in [("queued", {"prompt": a}), ("queued", {"prompt": b}),
                       ("applied", {"seq": 5, "obj_ids": [1]}), ("applied", {"seq": 6, "obj_ids": [2]}),
                       ("queued", {"prompt": c}), ("queued", {"prompt": d}), ("unqueued", {"obj_id": 4}),
                       ("queued", {"prompt": Prompt.make(2, points=[[3, 4]])})]:  # newer, for object 2
        seen.note_prompts(kind, data)
    seen.note_emitted(5, 5)  # seq 5 is out: a is done; b's frame (seq 6) is not
    carried = seen.unfinished_prompts()
    assert [(p.obj_id, p.points is not None) for p in carried] == [(3, False), (2, True)]
    seen.note_prompts("unqueued", {"obj_id": None})  # a reset
    assert [p.obj_id for p in seen.unfinished_prompts()] == [2]  # b, in its frame already


_STOP_DURING_A_STOP = """
import os, signal, threading, time
from streamtrack.supervisor import install_stop_signals

lock, both = threading.Lock(), threading.Event()
calls = []

def stop(signum):
    with lock:  # as Event.set, which every stop calls, takes its Condition's lock
        calls.append(signum)
        if len(calls) == 1:  # a SIGTERM right after Ctrl-C's SIGINT, while this one holds the lock
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.2)
    if len(calls) == 2:
        both.set()

restore = install_stop_signals(stop)
os.kill(os.getpid(), signal.SIGINT)
assert both.wait(5), calls
restore()
print(calls)
try:
    install_stop_signals(lambda signum: None, interrupt_again=True)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.2)
    os.kill(os.getpid(), signal.SIGINT)  # a Ctrl-C after a stop: quit at once, here
    time.sleep(5)
except KeyboardInterrupt:
    print("interrupted")
"""


def test_a_stop_signal_during_a_stop_is_handed_over_not_deadlocked():
    """The handlers only pass the signal on; stop runs on a thread of its own, one call at a
    time (called in the handler, the second stop waited for the lock the first one held)."""
    r = subprocess.run([sys.executable, "-c", _STOP_DURING_A_STOP], capture_output=True, text=True,
                       timeout=30, cwd=REPO)
    assert (r.returncode, r.stdout) == (0, "[2, 15]\ninterrupted\n"), r.stderr


def test_the_supervisor_runs_without_torch():
    """The `run` process only supervises: torch and sam2 (~480 MiB) are the tracker
    process's alone."""
    code = ("import sys, streamtrack.cli, streamtrack.cli_run, streamtrack.supervisor, streamtrack.prompts,"
            " streamtrack.cli_fleet, streamtrack.fleet_spec;"
            "print(sorted(m for m in ('torch', 'sam2') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr


def test_supervisor_config_errors():
    with pytest.raises(UserError, match="publish endpoint"):
        Supervisor(RunConfig(source="x.mp4"))
    with pytest.raises(UserError, match="inproc"):
        Supervisor(RunConfig(source="x.mp4", publish="inproc://x"))
    with pytest.raises(UserError, match=r"hang_timeout must be 0 or null \(never\) or at least 2 s"):
        SupervisorConfig(hang_timeout=1.5)
    assert SupervisorConfig(hang_timeout=0).hang_timeout == 0
    with pytest.raises(UserError, match=r"start_timeout must be 0 or null \(never\) or a number"):
        SupervisorConfig(start_timeout=-1)
    from streamtrack.config import HANG_TIMEOUT_MIN
    from streamtrack.pipeline import ALIVE_EVERY

    assert HANG_TIMEOUT_MIN == 2 * ALIVE_EVERY


def test_a_prompt_sent_while_paused_lands_on_the_frame_after_the_paused_one(tmp_path, clip_path,
                                                                             tiny_checkpoint):
    """Paused to click on a still picture: the click must apply to the frame that followed
    it, held since the pause, not to the frame a live source has when resumed seconds
    later (a paced file here, 30 fps: 5 s of pause are 150 frames)."""
    proc = launch(tmp_path, clip_path, tiny_checkpoint, "--realtime", "--loop")
    try:
        with Subscriber(proc.publish, topics=["masks/", "status/"]) as sub, \
                ControlClient(proc.control, timeout=30) as client:
            got = collect(sub, lambda got: sum(m.kind == "masks" for m in got) >= 3, 120)
            client.pause()
            got += collect(sub, lambda got: any(m.kind == "status" and m.status.data.get("new") == "paused"
                                                for m in got), 60)
            time.sleep(1.0)  # the frames in hand come out
            got += [m for m in iter(lambda: sub.recv(timeout=0.5), None)]
            last = max(m.result.frame_id for m in got if m.kind == "masks")
            time.sleep(5.0)
            client.add_prompt(2, box=[float(v) for v in BOX2.split(",")])
            client.resume()
            applied = collect(sub, lambda got: any(m.kind == "status" and m.status.kind == "prompt_applied"
                                                   for m in got), 60)
            (event,) = [m.status for m in applied if m.kind == "status" and m.status.kind == "prompt_applied"]
    finally:
        proc.close()
    assert last < event.data["frame_id"] <= last + 60, (last, event.data)
