"""`streamtrack run` end to end: outputs, prompts on later frames, config layers, bad input, Ctrl-C."""

from __future__ import annotations

import errno
import fcntl
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import av
import numpy as np
import pytest
import yaml
from conftest import (
    TEST_IMAGE_SIZE,
    assert_every_threads_stack,
    assert_summary_fps,
    free_port,
    track_both_ways,
)
from PIL import Image

from streamtrack.engine import EngineConfig, Prompt, StreamingEngine
from streamtrack.models import build_model
from streamtrack.protocol import FrameResult
from streamtrack.synthetic import make_clip, write_video

pytestmark = pytest.mark.timeout(600)

LATER = 8  # frame on which object 2 is added


def streamtrack(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "streamtrack", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def clip_file(tmp_path_factory):
    clip = make_clip(16, 160, 120, num_objects=2, seed=4)
    folder = tmp_path_factory.mktemp("run")
    video = write_video(clip.frames, folder / "clip.mp4", gop=8)
    prompts = folder / "prompts.json"
    prompts.write_text(json.dumps([
        {"obj_id": 1, "frame": 0, "box": clip.box(1, 0)},
        {"obj_id": 2, "frame": LATER, "points": [clip.center(2, LATER)], "labels": [1]},
    ]))
    return clip, video, prompts


@pytest.fixture(scope="module")
def tracked(clip_file, tiny_checkpoint, tmp_path_factory):
    clip, video, prompts = clip_file
    out = tmp_path_factory.mktemp("out")
    r = streamtrack("run", str(video), "--checkpoint", str(tiny_checkpoint), "--image-size",
                    str(TEST_IMAGE_SIZE), "--prompts", str(prompts), "--save-jsonl", str(out / "r.jsonl"),
                    "--save-masks", str(out / "masks"), "--save-video", str(out / "v.mp4"))
    assert r.returncode == 0, r.stderr
    lines = (out / "r.jsonl").read_text().splitlines()
    return clip, video, out, [FrameResult.from_json(line) for line in lines], r


def decoded_frames(video: Path) -> list[np.ndarray]:
    with av.open(str(video)) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]


def test_jsonl_has_one_contract_line_per_frame(tracked):
    clip, _, out, results, run = tracked
    assert [r.frame_id for r in results] == list(range(len(clip.frames)))
    assert [r.seq for r in results] == list(range(len(clip.frames)))
    first = json.loads((out / "r.jsonl").read_text().splitlines()[0])
    assert {"v", "stream", "seq", "frame_id", "pts", "width", "height", "t", "source_state", "dropped",
            "objects"} <= set(first)
    assert set(first["t"]) == {"capture", "dequeue", "infer_start", "infer_end", "publish"}
    assert first["v"] == 1 and first["width"] == 160 and first["height"] == 120
    assert {"obj_id", "score", "state", "bbox", "area", "rle"} <= set(first["objects"][0])
    assert "16 frames" in run.stderr  # the one-line summary
    # A file read at decode speed: its frames wait in the queue by design, so the summary
    # gives the engine's step time, not a capture -> result "latency".
    assert "step p50" in run.stderr and "latency p50" not in run.stderr


def test_summary_line_gives_latency_for_live_sources_and_step_time_for_read_ahead():
    from streamtrack.pipeline import RunSummary

    live = RunSummary(frames=3, seconds=1.0, latency_p50=0.1204, latency_p95=0.25, step_p50=0.05)
    assert "latency p50 120 ms p95 250 ms" in live.line()
    read_ahead = RunSummary(frames=3, seconds=1.0, latency_p50=9.0, latency_p95=9.5, step_p50=0.05,
                            read_ahead=True)
    assert "step p50 50 ms" in read_ahead.line() and "latency" not in read_ahead.line()
    # The fps is the tracking's: the start and a wait for a first prompt are said, not counted.
    assert RunSummary(frames=10, seconds=5.3, starting=1.7, waited=3.0).line().startswith(
        "10 frames in 5.3 s (16.67 fps; 1.7 s of it starting, 3.0 s waiting for a prompt), ")
    assert RunSummary(frames=10, seconds=5.3, waited=3.0).line().startswith(
        "10 frames in 5.3 s (4.35 fps; 3.0 s of it waiting for a prompt), ")
    assert RunSummary(frames=10, seconds=0.6).line().startswith("10 frames in 0.6 s (16.67 fps), ")


def test_later_prompt_adds_the_object_from_that_frame(tracked):
    _, _, _, results, _ = tracked
    for r in results:
        ids = [o.obj_id for o in r.objects]
        assert ids == ([1] if r.frame_id < LATER else [1, 2]), (r.frame_id, ids)


def test_jsonl_pngs_and_engine_agree(tracked, tiny_checkpoint):
    clip, video, out, results, _ = tracked
    model = build_model("sam2.1_hiera_tiny", tiny_checkpoint, image_size=TEST_IMAGE_SIZE)
    engine = StreamingEngine(model, EngineConfig())
    prompts = {0: [Prompt.make(1, box=clip.box(1, 0))],
               LATER: [Prompt.make(2, points=[clip.center(2, LATER)], labels=[1])]}
    for f, frame in enumerate(decoded_frames(video)):
        expected = {o.obj_id: o.mask for o in engine.step(frame, prompts.get(f, [])).objects}
        got = {o.obj_id: o.mask() for o in results[f].objects}
        assert set(got) == set(expected)
        for oid in got:
            assert np.array_equal(got[oid], expected[oid]), (f, oid)
        png = np.array(Image.open(out / "masks" / f"{f:06d}.png"))
        labels = np.zeros_like(png)
        for oid in sorted(got):
            labels[got[oid]] = oid
        assert np.array_equal(png, labels), f
    with av.open(str(out / "v.mp4")) as c:
        assert sum(1 for _ in c.decode(video=0)) == len(results)


def test_launch_ahead_overlaps_two_frames_and_changes_no_result(tiny_checkpoint, tmp_path, monkeypatch):
    """launch_ahead: a file's next frame is always waiting, so each frame is launched
    before the one before it is finished; the results are those of one step at a time."""
    events = []
    launch, finish = StreamingEngine.launch, StreamingEngine.finish

    def spy_launch(self, *args, **kwargs):
        pending = launch(self, *args, **kwargs)
        events.append(("launch", pending.job.frame_idx))
        return pending

    def spy_finish(self, pending):
        events.append(("finish", pending.job.frame_idx))
        return finish(self, pending)

    monkeypatch.setattr(StreamingEngine, "launch", spy_launch)
    monkeypatch.setattr(StreamingEngine, "finish", spy_finish)
    lines, summaries = track_both_ways(tmp_path, tiny_checkpoint, "launch_ahead", values=(False, True))
    for value in lines:
        for d in lines[value]:
            d.pop("t")
            d.pop("source_state")  # a file's end may be seen a frame earlier or later
    assert [d["frame_id"] for d in lines[True]] == list(range(8))
    assert lines[True] == lines[False]
    assert summaries[True].frames == summaries[False].frames == 8

    def in_flight(run):  # most frames launched and not finished at once
        depth = most = 0
        for kind, _ in run:
            depth += 1 if kind == "launch" else -1
            most = max(most, depth)
        return most

    one_at_a_time, ahead = events[:16], events[16:]
    assert in_flight(one_at_a_time) == 1 and in_flight(ahead) == 2
    assert [f for kind, f in ahead if kind == "finish"] == list(range(8))


class _SlowDevice:
    """Stands in for the engine: each launched frame takes 20 ms to finish."""

    object_ids: list[int] = []

    def __init__(self):
        self.launched: list[int] = []
        self.finished: list[int] = []

    def launch(self, image, prompts, timestamp=None):
        self.launched.append(len(self.launched))
        return self.launched[-1], time.time()

    def finish(self, pending):
        from streamtrack.engine import FrameOutput

        index, start = pending
        time.sleep(0.02)
        self.finished.append(index)
        return FrameOutput(index, 64, 48, (), start, time.time())

    def state_bytes(self) -> int:
        return 0


def test_launch_ahead_finishes_the_frame_in_flight_before_a_pause(tmp_path):
    """Paused over the control channel, the tracker holds no launched frame back: the
    last result is out while it waits, and resumed, it goes on without a gap."""
    import threading

    from streamtrack.control import ControlClient
    from streamtrack.pipeline import RunConfig, Tracker

    video = write_video(make_clip(40, 64, 48, num_objects=1).frames, tmp_path / "clip.mp4")
    engine = _SlowDevice()
    bound = {}
    run = RunConfig(source=str(video), control="tcp://127.0.0.1:0", progress=False, launch_ahead=True)
    tracker = Tracker(run, engine=engine,
                      notify=lambda kind, data: bound.update(data) if kind == "bound" else None)
    summary = {}
    thread = threading.Thread(target=lambda: summary.update(run=tracker.run()), daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while len(engine.finished) < 5 and time.monotonic() < deadline:
        time.sleep(0.005)
    with ControlClient(bound["control"], timeout=10) as client:
        assert client.pause()["ok"]
        time.sleep(0.3)
        assert engine.launched and engine.finished == engine.launched  # nothing in flight
        paused_at = len(engine.finished)
        time.sleep(0.2)
        assert len(engine.launched) == paused_at  # and nothing new launched
        assert client.resume()["ok"]
    thread.join(30)
    assert summary["run"].frames == 40 and engine.finished == list(range(40))
    assert 5 <= paused_at < 40


def test_config_layers_and_print_config_round_trip(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("image_size: 512\nstream: fromfile\ndevice: cpu\nlost_after: 9\n")
    r = streamtrack("run", "x.mp4", "--config", str(cfg), "--image-size", "256", "--print-config",
                    env={"STREAMTRACK_STREAM": "fromenv", "STREAMTRACK_LOST_AFTER": "4.5"})
    assert r.returncode == 0, r.stderr
    merged = yaml.safe_load(r.stdout)
    assert merged["image_size"] == 256 and merged["stream"] == "fromenv"
    assert merged["device"] == "cpu" and merged["lost_after"] == 4.5
    assert merged["model"] == "sam2.1_hiera_tiny"
    again = tmp_path / "again.yaml"
    again.write_text(r.stdout)
    r2 = streamtrack("run", "x.mp4", "--config", str(again), "--print-config")
    assert r2.returncode == 0 and yaml.safe_load(r2.stdout) == merged


@pytest.mark.parametrize(
    "args,message",
    [
        (["missing.mp4", "--box", "1,2,30,40"], "missing.mp4"),
        (["{video}", "--box", "1,2,3"], "--box"),
        (["{video}"], "no prompt given"),
        (["{video}", "--prompts", "{bad_prompts}"], "prompts file"),
        (["{video}", "--box", "1,2,30,40", "--config", "{bad_config}"], "unknown key 'imagesize'"),
        (["{video}", "--box", "1,2,30,40", "--image-size", "100"], "multiple of 32"),
        (["{video}", "--box", "1,2,30,40", "--checkpoint", "{bad_checkpoint}"], "checkpoint"),
        (["{video}", "--box", "1,2,30,40", "--checkpoint", "{tiny}", "--image-size", "256",
          "--device", "tpu"], "device"),
        (["{video}", "--box", "1,2,500,40", "--checkpoint", "{tiny}", "--image-size", "256"],
         "outside the 160x120 frame"),
        (["rtsp://127.0.0.1:9/none", "--box", "1,2,30,40", "--checkpoint", "{tiny}", "--image-size",
          "256", "--give-up-after", "1"], "failed"),
        # argparse alone would take "-10,2,30,40" for an option and say "expected one argument"
        (["{video}", "--box", "-10,2,30,40", "--checkpoint", "{tiny}", "--image-size", "256"],
         "box corner (-10, 2) is outside the 160x120 frame (prompted for frame 0)"),
        (["{video}", "--prompts", "{late_prompts}", "--checkpoint", "{tiny}", "--image-size", "256"],
         "object 2: box corner (500, 500) is outside the 160x120 frame (prompted for frame 3)"),
        (["{video}", "--prompts", "{video}"], "is not a text file"),  # a video given as the prompts
        (["{video}", "--prompts", "{tmp}"], "is a directory, not a file"),
        (["{video}", "--box", "1,2,30,40", "--save-jsonl", "{video}"], "is the source video"),
        (["{video}", "--prompts", "{late_prompts}", "--save-jsonl", "{late_prompts}"],
         "--save-jsonl {late_prompts} is the prompts file, which it would overwrite"),
        (["{video}", "--box", "1,2,30,40", "--save-jsonl", "{tmp}/o.mp4", "--save-video", "{tmp}/./o.mp4"],
         "are the same path: give each output its own"),
        (["{video}", "--box", "1,2,30,40", "--save-masks", "{tmp}/o", "--save-jsonl", "{tmp}/o"],
         "are the same path"),
        (["{video}", "--box", "1,2,30,40", "--save-jsonl", ""], "save_jsonl is an empty path"),
        (["{video}", "--box", "1,2,30,40", "--image-size", "1048576"], "from 64 to 2048"),  # a digit too many
        (["{video}", "--box", "1,2,30,40", "--box", "3,4,40,50", "--max-objects", "1"], "max_objects is 1"),
        # a full disk (/dev/full answers every write with ENOSPC) during the run
        (["{video}", "--box", "1,2,30,40", "--checkpoint", "{tiny}", "--image-size", "256", "--save-jsonl",
          "/dev/full"], "cannot write --save-jsonl /dev/full: No space left on device"),
    ],
)
def test_bad_input_exit_2_one_line(clip_file, tiny_checkpoint, tmp_path, args, message):
    _, video, _ = clip_file
    bad_prompts = tmp_path / "p.json"
    bad_prompts.write_text('[{"obj_id": 1, "box": [1, 2]}]')
    late_prompts = tmp_path / "late.json"  # a prompt that does not fit the frame it is for
    late_prompts.write_text(json.dumps([{"obj_id": 1, "box": [1, 2, 30, 40]},
                                        {"obj_id": 2, "frame": 3, "box": [1, 2, 500, 500]}]))
    bad_config = tmp_path / "c.yaml"
    bad_config.write_text("imagesize: 256\n")
    bad_checkpoint = tmp_path / "x.pt"
    bad_checkpoint.write_text("nope")
    names = dict(video=video, bad_prompts=bad_prompts, late_prompts=late_prompts, bad_config=bad_config,
                 bad_checkpoint=bad_checkpoint, tiny=tiny_checkpoint, tmp=tmp_path)
    video_bytes = Path(video).read_bytes()
    r = streamtrack("run", *[a.format(**names) for a in args], "-q")
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    assert message.format(**names) in r.stderr
    assert Path(video).read_bytes() == video_bytes  # the source is never written to
    assert json.loads(late_prompts.read_text())[1]["frame"] == 3  # nor the prompts


def test_an_error_on_the_first_frame_erases_the_progress_bar(clip_file, tiny_checkpoint):
    _, video, _ = clip_file
    r = streamtrack("run", str(video), "--box", "1,2,500,40", "--checkpoint", tiny_checkpoint,
                    "--image-size", "256", env={"TQDM_DISABLE": ""})  # the bar on, as in a terminal
    assert r.returncode == 2, r.stderr
    # The bar is erased before the error (the error line stands alone on a terminal), and
    # it is not drawn again after it.
    *bar, error = [line for line in r.stderr.replace("\r", "\n").split("\n") if line.strip()]
    assert error.startswith("streamtrack: error: object 1:"), r.stderr
    assert "outside the 160x120 frame" in error
    assert bar and all("tracking" in line for line in bar), r.stderr
    # (text mode reads tqdm's "\r" as a line end: the erasing blanks are the line before)
    lines = r.stderr.split("\n")
    erased = lines[lines.index(error) - 1]
    assert erased and not erased.strip(), repr(r.stderr)


@pytest.mark.parametrize("buffered", [True, False])
def test_stdout_gone_is_a_quiet_end_and_stdout_full_one_line(buffered):
    """`| head` closing early: exit 0 and nothing said (was 120, or a traceback unbuffered);
    a full disk: one line, exit 1 (was "Exception ignored" and 120), also for --help."""
    env = {**os.environ, "PYTHONUNBUFFERED": "" if buffered else "1"}
    for args in (["models"], ["--help"]):
        gone = subprocess.Popen([sys.executable, "-m", "streamtrack", *args], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=env)
        gone.stdout.close()  # before the command has printed anything
        assert gone.wait(60) == 0 and gone.stderr.read() == b""
        gone.stderr.close()
        with open("/dev/full", "w") as full:
            r = subprocess.run([sys.executable, "-m", "streamtrack", *args], stdout=full,
                               stderr=subprocess.PIPE, text=True, timeout=60, env=env)
        assert (r.returncode, r.stderr) == (1, "streamtrack: error: cannot write to stdout: No space left on "
                                               "device\n"), r.stderr


class _BrokenStdout(io.StringIO):
    def __init__(self, error: int) -> None:
        super().__init__()
        self.error = error

    def write(self, text: str) -> int:
        raise OSError(self.error, os.strerror(self.error))

    def flush(self) -> None:
        raise OSError(self.error, os.strerror(self.error))


@pytest.mark.parametrize(("handled", "error", "code", "said"), [
    (False, errno.EPIPE, 0, ""),
    (False, errno.ENOSPC, 1, "streamtrack: error: cannot write to stdout: No space left on device\n"),
    (True, errno.ENOSPC, 2, "its own line\n"),  # e.g. `bench --json`: its code and line stand
    (True, errno.EPIPE, 130, "its own line\n"),  # Ctrl-C while the reader had gone
])
def test_a_command_that_dealt_with_stdout_failing_keeps_its_exit_code(monkeypatch, capsys, handled, error,
                                                                      code, said):
    from streamtrack import cli

    def command(args):
        try:
            print("a line")
        except OSError:
            if not handled:
                raise
            print("its own line", file=sys.stderr)
            return code
        return 0

    monkeypatch.setattr(cli, "_cmd_models", command)
    monkeypatch.setattr(cli.os, "dup2", lambda *a: None)  # not pytest's own descriptor 1
    monkeypatch.setattr(sys, "stdout", _BrokenStdout(error))
    assert cli.main(["models"]) == code
    assert capsys.readouterr().err == said


def test_a_closed_stderr_is_dev_null_for_the_processes_a_command_starts_too():
    script = ("from streamtrack.cli import _standard_streams_open; _standard_streams_open(); "
              "import subprocess, sys; subprocess.run([sys.executable, '-c', 'import os; os.fstat(2); "
              "print(\"fd 2 open\")'])")
    r = subprocess.run(["bash", "-c", 'exec "$@" 2>&-', "_", sys.executable, "-c", script],
                       capture_output=True, text=True, timeout=60)
    assert r.stdout == "fd 2 open\n", r


def test_a_closed_stderr_runs_the_command_all_the_same(clip_file, tiny_checkpoint, tmp_path):
    """`2>&-`: every command exited 1 at once, without a word (nowhere to print the stack
    dump handler to); the next file opened would have taken descriptor 2."""
    _, video, _ = clip_file
    out = tmp_path / "r.jsonl"
    r = subprocess.run(["bash", "-c", 'exec "$@" 2>&-', "_", sys.executable, "-m", "streamtrack", "run",
                        str(video), "--box", "1,2,40,40", "--checkpoint", str(tiny_checkpoint),
                        "--image-size",
                        str(TEST_IMAGE_SIZE), "--max-frames", "2", "--save-jsonl", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r
    assert len(out.read_text().splitlines()) == 2


def test_the_progress_bar_is_redrawn_into_a_log_file_only_now_and_then(tmp_path):
    """`2> run.log` collected ten redraws a second on one line; `| tee` shows them all."""
    video = tmp_path / "c.mp4"
    video.touch()
    script = f"""
from streamtrack.pipeline import RunConfig, _progress
print(_progress(RunConfig(source={str(video)!r}, progress=True), 10).mininterval)
"""
    env = {**os.environ, "TQDM_DISABLE": ""}
    piped = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                           env=env)
    assert piped.stdout.strip() == "0.1" and "tracking" in piped.stderr, piped
    log = tmp_path / "run.log"
    with log.open("w") as stderr:
        logged = subprocess.run([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=stderr,
                                text=True, timeout=120, env=env)
    assert logged.stdout.strip() == "30.0" and "tracking" in log.read_text(), log.read_text()


def test_the_progress_bar_holds_no_named_semaphore(tmp_path):
    """tqdm's default lock is a multiprocessing semaphore, a /dev/shm file only a clean exit
    removes: every supervised tracker killed and restarted would leave one behind."""
    video = tmp_path / "c.mp4"
    video.touch()
    script = f"""
import logging
from tqdm.contrib.logging import logging_redirect_tqdm
from streamtrack.pipeline import RunConfig, _progress
bar = _progress(RunConfig(source={str(video)!r}, progress=True), 10)
with logging_redirect_tqdm():
    bar.update(3)
    logging.getLogger("streamtrack").warning("a line above the bar")
bar.close()
print(sum("/dev/shm/sem." in line for line in open("/proc/self/maps")))
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "TQDM_DISABLE": ""})
    assert r.returncode == 0 and "tracking:" in r.stderr and "a line above the bar" in r.stderr, r.stderr
    assert r.stdout.strip() == "0", r.stdout


def test_prompts_for_frames_past_the_end_are_reported(clip_file, tiny_checkpoint, tmp_path):
    _, video, _ = clip_file
    prompts = tmp_path / "p.json"
    prompts.write_text(json.dumps([{"obj_id": 1, "frame": 0, "box": [1, 2, 30, 40]},
                                   {"obj_id": 2, "frame": 500, "box": [1, 2, 30, 40]}]))
    r = streamtrack("run", str(video), "--prompts", str(prompts), "--checkpoint", tiny_checkpoint,
                    "--image-size", "256", "-q")
    assert r.returncode == 0, r.stderr
    r = streamtrack("run", str(video), "--prompts", str(prompts), "--checkpoint", tiny_checkpoint,
                    "--image-size", "256", "--max-frames", "20")
    assert r.returncode == 0, r.stderr
    warning = [line for line in r.stderr.splitlines() if line.startswith("WARNING")]
    assert warning == ["WARNING streamtrack.pipeline: prompts for frame 500 never applied: the source "
                       "ended at frame 15"], r.stderr


def test_unreachable_camera_is_reported_while_it_retries(tiny_checkpoint):
    """A live source that cannot be reached says so at once, once, credentials hidden,
    instead of retrying in silence until --give-up-after (or forever)."""
    r = streamtrack("run", "rtsp://admin:secret@127.0.0.1:9/cam", "--box", "1,2,30,40",
                    "--checkpoint", tiny_checkpoint, "--image-size", "256", "--give-up-after", "1.5")
    lines = r.stderr.splitlines()
    assert r.returncode == 2 and len(lines) == 2, r.stderr
    assert lines[0].startswith("WARNING") and "rtsp://***@127.0.0.1:9/cam" in lines[0], r.stderr
    assert "Connection refused" in lines[0] and "giving up after 1.5 s" in lines[0], r.stderr
    assert "failed" in lines[1] and "secret" not in r.stderr, r.stderr


@pytest.mark.parametrize("supervised", [False, True], ids=["in-process", "supervised"])
def test_a_camera_given_up_on_mid_run_ends_with_exit_1_and_its_error(tiny_checkpoint, tmp_path,
                                                                     supervised):
    """A camera that streamed, then went away for longer than --give-up-after, is a runtime
    failure (a service manager restarts on it), not a run done: summary line, the error,
    exit 1, and what was tracked is written whole."""
    from rtsp import RtspServer

    server = RtspServer()
    url = server.start()
    out_jsonl = tmp_path / "r.jsonl"
    extra = ["--publish", f"tcp://127.0.0.1:{free_port()}"] if supervised else []
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamtrack", "run", url, "--box", "10,10,60,60", "--checkpoint",
         str(tiny_checkpoint), "--image-size", str(TEST_IMAGE_SIZE), "--give-up-after", "1",
         "--save-jsonl", str(out_jsonl), *extra],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "TQDM_DISABLE": "1"})
    try:
        deadline = time.monotonic() + 180
        while not (out_jsonl.exists() and out_jsonl.read_text().count("\n") >= 3):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.2)
        server.stop()  # killed for good, as a camera that lost power
        err = _communicate_or_dump(proc, 120)
    finally:
        server.close()
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, err
    *_, summary, error = err.splitlines()
    results = [FrameResult.from_json(line) for line in out_jsonl.read_text().splitlines()]
    assert summary.startswith(f"{len(results)} frames in "), err
    assert error.startswith(f"streamtrack: error: source '{url}' failed after {len(results)} "
                            "frames: gave up after 1s reconnecting: "), err
    assert "Traceback" not in err


def test_a_source_outage_and_its_end_are_one_console_line_each(caplog):
    """What the console says as a camera drops, stalls and comes back; nothing while it
    simply connects, streams or ends."""
    from streamtrack.capture import SourceState as S
    from streamtrack.capture import StatusEvent
    from streamtrack.pipeline import _log_source_change

    changes = [(S.CONNECTING, S.IDLE, None), (S.STREAMING, S.CONNECTING, None),
               (S.RECONNECTING, S.STREAMING, "end of stream (disconnected)"),
               (S.STREAMING, S.RECONNECTING, None), (S.STALE, S.STREAMING, None),
               (S.STREAMING, S.STALE, None), (S.STOPPED, S.STREAMING, None)]
    with caplog.at_level("INFO", logger="streamtrack.pipeline"):
        for state, previous, error in changes:
            _log_source_change("cam", StatusEvent(state, previous, 0.0, error), give_up_after=None)
    assert [r.getMessage() for r in caplog.records] == [
        "source cam: end of stream (disconnected); reconnecting, "
        "until stopped (--give-up-after S to stop sooner)",
        "source cam: frames arriving again",
        "source cam: connected, but no frame is arriving",
        "source cam: frames arriving again",
    ]


def _communicate_or_dump(proc: subprocess.Popen, timeout: float) -> str:
    """``proc``'s stderr once it exits; if it does not within ``timeout``, fail with every
    thread's stack (the CLI prints them on SIGUSR1) instead of a bare timeout."""
    try:
        return proc.communicate(timeout=timeout)[1]
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGUSR1)
        time.sleep(2)
        proc.kill()
        err = proc.communicate()[1]
        raise AssertionError(f"still running {timeout} s after the signal; its threads:\n"
                             f"{err[-6000:]}") from None


_SLOW_CLI_IMPORT = """
import sys, time
class SlowImport:  # holds the import of streamtrack.cli (torch, sam2) until the test's Ctrl-C
    def find_spec(self, name, path=None, target=None):
        if name == "streamtrack.cli":
            print("importing", flush=True)
            time.sleep(60)
sys.meta_path.insert(0, SlowImport())
from streamtrack.__main__ import main
sys.argv = ["streamtrack", "models"]
raise SystemExit(main())
"""


def test_ctrl_c_while_torch_loads_is_one_line():
    """The first second or two of any command is importing torch and sam2."""
    # As from a terminal: a shell without job control starts background jobs with SIGINT
    # ignored, and Python then raises no KeyboardInterrupt at all.
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_CLI_IMPORT], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert proc.stdout.readline() == "importing\n"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert (proc.returncode, out, err) == (130, "", "streamtrack: interrupted\n")


def _run_until_results(checkpoint, tmp_path, frames: int, results: int, *args: str, **popen):
    """`streamtrack run` on a clip of ``frames`` frames, once ``results`` lines are in its
    --save-jsonl: (the process, its JSONL)."""
    clip = make_clip(frames, 160, 120, num_objects=1, seed=5)
    video = write_video(clip.frames, tmp_path / "clip.mp4")
    out_jsonl = tmp_path / "r.jsonl"
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamtrack", "run", str(video), "--checkpoint", str(checkpoint),
         "--image-size", str(TEST_IMAGE_SIZE), "--box", ",".join(str(v) for v in clip.box(1, 0)),
         "--save-jsonl", str(out_jsonl), *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)
    deadline = time.monotonic() + 240
    while not (out_jsonl.exists() and out_jsonl.read_text().count("\n") >= results):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.2)
    return proc, out_jsonl


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP],
                         ids=["ctrl-c", "sigterm", "terminal-closed"])
def test_ctrl_c_leaves_valid_jsonl_and_playable_mp4(tiny_checkpoint, tmp_path, signum):
    """Without --publish the tracker runs in the CLI's own process: the first Ctrl-C (or a
    SIGTERM, or the SIGHUP of a terminal closed) stops it after the frame in flight, and
    every output is complete."""
    out_mp4 = tmp_path / "v.mp4"
    # SIGHUP as a terminal's session has it (a test run under nohup would pass it on ignored).
    proc, out_jsonl = _run_until_results(tiny_checkpoint, tmp_path, 200, 3, "--save-video", str(out_mp4),
                                         preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL))
    proc.send_signal(signum)
    err = _communicate_or_dump(proc, 60)
    assert proc.returncode == (130 if signum == signal.SIGINT else 128 + signum), err
    assert "Traceback" not in err and "(interrupted)" in err
    if signum == signal.SIGINT:
        assert "stopping after the current frame" in err
    lines = out_jsonl.read_text().splitlines()
    results = [FrameResult.from_json(line) for line in lines]  # every line complete and valid
    assert 3 <= len(results) < 200
    with av.open(str(out_mp4)) as c:
        assert sum(1 for _ in c.decode(video=0)) == len(results)


def test_a_run_under_nohup_outlives_its_terminal(tiny_checkpoint, tmp_path):
    """SIGHUP ignored from the start (`nohup streamtrack run ... &`) stays ignored."""
    proc, out_jsonl = _run_until_results(tiny_checkpoint, tmp_path, 60, 1,
                                         preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))
    proc.send_signal(signal.SIGHUP)
    err = _communicate_or_dump(proc, 240)
    assert proc.returncode == 0 and "(interrupted)" not in err, err
    assert len(out_jsonl.read_text().splitlines()) == 60


def test_usr1_prints_every_threads_stack_and_the_run_goes_on(tiny_checkpoint, tmp_path):
    """`kill -USR1 PID` is how a user reports a stuck run: stacks on stderr, nothing stops."""
    proc, out_jsonl = _run_until_results(tiny_checkpoint, tmp_path, 12, 1, "-q")
    proc.send_signal(signal.SIGUSR1)
    err = _communicate_or_dump(proc, 240)
    assert proc.returncode == 0, err
    assert_every_threads_stack(err)
    assert len(out_jsonl.read_text().splitlines()) == 12


def test_the_source_may_come_from_a_file_out_of_sight_of_ps(tiny_checkpoint, clip_file, tmp_path, capsys):
    """`run @FILE`: a camera URL with its password read from a file, not the command line."""
    from streamtrack import cli

    args = tmp_path / "camera.args"
    args.write_text(f"{clip_file[1]}\n--max-frames\n2\n")
    jsonl = tmp_path / "r.jsonl"
    assert cli.main(["run", f"@{args}", "--checkpoint", str(tiny_checkpoint), "--image-size",
                     str(TEST_IMAGE_SIZE), "--box", "1,1,20,20", "--save-jsonl", str(jsonl), "-q"]) == 0, \
        capsys.readouterr().err
    assert len(jsonl.read_text().splitlines()) == 2


@pytest.mark.parametrize("dies_after", [2, 0])
def test_run_show_whose_window_fails_is_no_success(tiny_checkpoint, clip_file, monkeypatch, capsys,
                                                   dies_after):
    """The viewer process dies (a GUI error): that ends the run, which must not exit 0 as if
    the user had closed the window, nor 130 as if interrupted (a window that dies at once
    stops a tracker still starting)."""
    from streamtrack import cli
    from streamtrack import viewer as viewer_module

    monkeypatch.setattr(viewer_module, "check_display", lambda: None)
    monkeypatch.setattr(viewer_module, "spawn_viewer", lambda *a, **k: subprocess.Popen(
        [sys.executable, "-c", f"import sys, time; time.sleep({dies_after}); sys.exit(1)"]))
    code = cli.main(["run", str(clip_file[1]), "--show", "--loop", "--realtime", "--checkpoint",
                     str(tiny_checkpoint), "--image-size", str(TEST_IMAGE_SIZE), "--box", "1,1,20,20", "-q"])
    err = capsys.readouterr().err
    assert code == 1, err
    assert "streamtrack: error: the viewer window failed (exit 1" in err, err


def test_show_holds_the_first_frame_until_a_box_is_drawn(tiny_checkpoint, xdisplay, tmp_path):
    """`run --show` with no prompt: the viewer gets the first frame, a prompt over the control
    channel (what a drag in the window sends) starts tracking from that frame."""
    from streamtrack.subscriber import Subscriber

    clip = make_clip(6, 160, 120, num_objects=1, seed=6)
    video = write_video(clip.frames, tmp_path / "c.mp4")
    publish, control = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamtrack", "run", str(video), "--show",
         "--checkpoint", str(tiny_checkpoint),
         "--image-size", str(TEST_IMAGE_SIZE), "--publish", publish, "--control", control,
         "--save-jsonl", str(tmp_path / "r.jsonl"), "-q"],
        env={**os.environ, "DISPLAY": xdisplay, "QT_X11_NO_MITSHM": "1"},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        with Subscriber(publish, topics=("frames/", "masks/", "stats/")) as sub:
            held = waiting = None
            deadline = time.monotonic() + 120
            while (held is None or waiting is None) and time.monotonic() < deadline:
                msg = sub.recv(timeout=1)
                if msg is not None and msg.kind == "frames":
                    held = msg
                elif msg is not None and msg.kind == "stats" and msg.stats.waiting_for_prompt:
                    waiting = msg  # what the window's banner says
            assert held is not None and held.frame.frame_id == 0 and waiting is not None
            time.sleep(1.5)
            assert not [m for m in iter(lambda: sub.recv(timeout=0), None) if m.kind == "masks"]  # held
            sent = time.time()
            prompt_then_wait(proc, control, clip.box(1, 0))
    finally:
        if proc.poll() is None:
            proc.kill()
    assert_tracked_from_frame_0(tmp_path / "r.jsonl", frames=6)
    # The held frame is timed from the prompt that released it, not from the wait.
    first = json.loads((tmp_path / "r.jsonl").read_text().splitlines()[0])
    assert first["frame_id"] == 0 and first["t"]["capture"] >= sent - 0.05, (first["t"], sent)


@pytest.mark.parametrize(("supervised", "lines"), [(False, 1), (True, 1), (False, 0)])
def test_a_run_whose_jsonl_reader_went_away_ends_there(tiny_checkpoint, tmp_path, supervised, lines):
    """`streamtrack run ... --save-jsonl - | head -n 1` (or `| true`): the run ends once the
    reader is gone, its other outputs finished, with its summary and exit code 0 (as
    `subscribe` and `segment` end), not as a failed run.  Supervised, the files are written
    by an emit process, which says why it stopped to the tracker.  The summary counts the
    results written, not those tracked after the failed write."""
    clip = make_clip(60, 160, 120, num_objects=1, seed=6)
    video = write_video(clip.frames, tmp_path / "c.mp4")
    masks = tmp_path / "masks"
    box = ",".join(str(round(v)) for v in clip.box(1, 0))
    args = [sys.executable, "-m", "streamtrack", "run", str(video), "--checkpoint", str(tiny_checkpoint),
            "--image-size", str(TEST_IMAGE_SIZE), "--box", box, "--save-jsonl", "-",
            "--save-masks", str(masks)]
    if supervised:
        args += ["--publish", f"tcp://127.0.0.1:{free_port()}"]
    env = {**os.environ, "TQDM_DISABLE": "1", "STREAMTRACK_EMIT": "process" if supervised else "thread"}
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        # A pipe of a page, set while the model loads: the run's 60 lines do not all fit
        # in it before the reader goes.
        fcntl.fcntl(proc.stdout.fileno(), fcntl.F_SETPIPE_SZ, 4096)
        read = [proc.stdout.readline() for _ in range(lines)]
        proc.stdout.close()  # what `head -n 1` does
        err = proc.stderr.read()
        assert proc.wait(120) == 0, err
    finally:
        if proc.poll() is None:
            proc.kill()
    assert [FrameResult.from_json(line).frame_id for line in read] == list(range(lines))
    summary = re.search(r"^(\d+) frames in .*, objects 1:\w+ \(the reader of --save-jsonl /dev/stdout went "
                        r"away\)$", err, re.M)
    assert summary is not None and int(summary.group(1)) < 60, err
    assert "error" not in err.lower() and "Traceback" not in err, err
    # A result's masks are written after its line: as many as the lines that went out.
    pngs = sorted(masks.glob("*.png"))
    assert len(pngs) == int(summary.group(1)) >= lines, err
    assert all(np.asarray(Image.open(p)).shape == (120, 160) for p in pngs)


def test_a_file_with_control_and_no_prompt_waits_on_its_first_frame(tiny_checkpoint, tmp_path):
    """What the "no prompt given" error suggests: `--control` to prompt later. A file does
    not run to its end with nothing tracked: it waits, says so, and tracks from frame 0."""
    clip = make_clip(6, 160, 120, num_objects=1, seed=6)
    video = write_video(clip.frames, tmp_path / "c.mp4")
    control = f"tcp://127.0.0.1:{free_port()}"
    jsonl = tmp_path / "r.jsonl"
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamtrack", "run", str(video), "--checkpoint", str(tiny_checkpoint),
         "--image-size", str(TEST_IMAGE_SIZE), "--control", control, "--save-jsonl", str(jsonl)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "TQDM_DISABLE": "1"})
    try:
        waiting = proc.stderr.readline()  # the first line: nothing else is logged before it
        assert f"waiting for a prompt on frame 0: draw a box in the viewer, or send add_prompt to {control}" \
            in waiting, waiting
        time.sleep(1.0)
        assert proc.poll() is None and not jsonl.exists()
        sent = time.time()
        prompt_then_wait(proc, control, clip.box(1, 0))
    finally:
        if proc.poll() is None:
            proc.kill()
    assert_tracked_from_frame_0(jsonl, frames=6)
    # The frames decoded behind the held one during the wait are timed from the prompt too:
    # the wait is not latency (it was 1 s and more here), nor tracking time in the summary.
    captured = [FrameResult.from_json(x).t.capture for x in jsonl.read_text().splitlines()]
    assert min(captured) >= sent - 0.05, (captured, sent)
    # Nor is the start (the model's load): the fps is the tracking's.
    summary = re.search(r"^6 frames in ([0-9.]+) s \(([0-9.]+) fps; ([0-9.]+) s of it starting, "
                        r"([0-9.]+) s waiting for a prompt\)", proc.stderr.read(), re.M)
    assert summary is not None
    seconds, fps, starting, waited = map(float, summary.groups())
    assert waited >= 1.0 and starting > 0
    assert_summary_fps(6, fps, seconds, starting, waited)


def prompt_then_wait(proc: subprocess.Popen, control: str, box: list[float]) -> None:
    """The first prompt, for object 1: the held run tracks the file to its end (exit 0)."""
    from streamtrack.control import ControlClient

    with ControlClient(control, timeout=10) as client:
        assert client.add_prompt(1, box=box)["ok"]
    assert proc.wait(timeout=240) == 0, proc.stderr.read()


def assert_tracked_from_frame_0(jsonl: Path, frames: int) -> None:
    """Every frame of the file in the results, object 1 on each: the held frame 0 included."""
    results = [FrameResult.from_json(x) for x in jsonl.read_text().splitlines()]
    assert [r.frame_id for r in results] == list(range(frames))
    assert all([o.obj_id for o in r.objects] == [1] for r in results)


def _result(seq: int, pts: float | None = None) -> FrameResult:
    return FrameResult(stream="cam0", seq=seq, frame_id=seq, pts=pts, width=4, height=3, objects=())


def test_a_restart_drops_the_line_a_killed_tracker_cut_short(tmp_path, caplog):
    from streamtrack.outputs import JsonlWriter

    path = tmp_path / "out.jsonl"
    whole = _result(0).to_json() + "\n"
    path.write_text(whole + _result(1).to_json()[:30])  # SIGKILL in the middle of a write
    writer = JsonlWriter(path, append=True)
    with caplog.at_level("WARNING", logger="streamtrack.outputs"):
        writer.write(_result(1))
    writer.close()
    assert [FrameResult.from_json(line).seq for line in path.read_text().splitlines()] == [0, 1]
    assert "dropped the last 30 bytes, a line cut short" in caplog.text
    path.write_text(_result(0).to_json()[:10])  # not even one whole line
    writer = JsonlWriter(path, append=True)
    writer.write(_result(2))
    writer.close()
    assert [FrameResult.from_json(line).seq for line in path.read_text().splitlines()] == [2]


def test_the_overlay_video_is_timed_by_pts(tmp_path):
    from streamtrack.outputs import VideoWriter

    writer = VideoWriter(tmp_path / "v.mp4")  # assumes 30 fps for frames without pts
    pts = [5.0, 5.1, 5.2, 5.4, None, 0.0]  # a 10 fps source, a drop, none, a loop
    for i, p in enumerate(pts):
        writer.write(np.full((48, 64, 3), 40 * i, np.uint8), p)
    writer.close()
    with av.open(str(tmp_path / "v.mp4")) as c:
        times = [round(f.time, 3) for f in c.decode(video=0)]
    # No pts, or one going back: one source frame interval (0.1 s, not the drop's 0.2) on.
    assert times == [0.0, 0.1, 0.2, 0.4, 0.5, 0.6]
    # AVI has a constant rate: the source's (10 fps, not the writer's default 30).
    writer = VideoWriter(tmp_path / "v.avi")
    for i, p in enumerate(pts):
        writer.write(np.full((48, 64, 3), 40 * i, np.uint8), p)
    writer.close()
    with av.open(str(tmp_path / "v.avi")) as c:
        times = [f.time for f in c.decode(video=0)]
    assert len(times) == 6 and np.allclose(np.diff(times), 0.1)
    writer = VideoWriter(tmp_path / "one.avi")  # one frame: the rate assumed
    writer.write(np.zeros((48, 64, 3), np.uint8), 0.0)
    writer.close()
    with av.open(str(tmp_path / "one.avi")) as c:
        assert sum(1 for _ in c.decode(video=0)) == 1


@pytest.mark.parametrize("ext", ["mp4", "mkv"])
def test_the_overlay_video_declares_the_sources_rate(tmp_path, ext):
    """Tools that read a video by its rate (OpenCV's frame count, ffprobe) see the source's
    10 fps and 12 frames of 1.2 s, not the writer's default 30 fps."""
    import cv2

    from streamtrack.outputs import VideoWriter

    path = tmp_path / f"v.{ext}"
    writer = VideoWriter(path)
    for i in range(12):
        writer.write(np.full((48, 64, 3), 20 * i, np.uint8), 3.0 + i / 10)
    writer.close()
    with av.open(str(path)) as c:
        assert c.streams.video[0].average_rate == 10 and c.duration / 1e6 == pytest.approx(1.2, abs=0.002)
    cap = cv2.VideoCapture(str(path))
    assert (cap.get(cv2.CAP_PROP_FPS), cap.get(cv2.CAP_PROP_FRAME_COUNT)) == (10.0, 12.0)
    cap.release()


def test_the_overlay_video_fits_frames_of_another_size_whole(tmp_path):
    """A source that changes mode: the video keeps its first size, later frames are scaled
    into it whole (keeping their aspect), not cropped to their top-left corner."""
    from streamtrack.outputs import VideoWriter

    writer = VideoWriter(tmp_path / "v.mp4")
    first = np.zeros((120, 160, 3), np.uint8)
    bigger = np.zeros((240, 320, 3), np.uint8)
    bigger[:, 160:] = 255  # its right half white
    wide = np.full((60, 160, 3), 255, np.uint8)  # another aspect: letterboxed
    for i, frame in enumerate((first, bigger, wide)):
        writer.write(frame, i / 10)
    writer.close()
    with av.open(str(tmp_path / "v.mp4")) as c:
        frames = [f.to_ndarray(format="gray") for f in c.decode(video=0)]
    assert [f.shape for f in frames] == [(120, 160)] * 3
    assert frames[1][:, :75].mean() < 20 and frames[1][:, 85:].mean() > 235  # right half white
    assert frames[2][:25].mean() < 20 and frames[2][35:85].mean() > 235 and frames[2][95:].mean() < 20


@pytest.mark.parametrize("height, width", [(1, 1), (1, 7), (5, 1)])
def test_the_overlay_video_of_a_one_pixel_wide_source_is_written(tmp_path, height, width):
    """yuv420p needs even sides: a 1-pixel side becomes 2 (a 0-pixel video cannot be opened)."""
    from streamtrack.outputs import VideoWriter

    writer = VideoWriter(tmp_path / "v.mp4")
    for i in range(3):
        writer.write(np.full((height, width, 3), 255, np.uint8), i / 10)
    writer.close()
    with av.open(str(tmp_path / "v.mp4")) as c:
        frames = [f.to_ndarray(format="gray") for f in c.decode(video=0)]
    assert len(frames) == 3 and frames[0].shape == (max(2, height - height % 2), max(2, width - width % 2))
    assert frames[0].max() > 235  # the frame is in it, not only the black around it


@pytest.mark.parametrize("ext", [".mp4", ".mkv"])
def test_the_overlay_video_of_a_killed_process_plays(tmp_path, ext):
    """A plain MP4 writes its index at the end, and an MKV keeps 5 s of frames in memory:
    killed before, nothing of them plays."""
    video = tmp_path / f"killed{ext}"
    code = ("import os, sys, numpy as np\n"
            "from streamtrack.outputs import VideoWriter\n"
            "w = VideoWriter(sys.argv[1])\n"
            "for i in range(20):\n"
            "    w.write(np.full((48, 64, 3), 10 * i, np.uint8), i / 10)\n"
            "os._exit(0)  # no close: as SIGKILL\n")
    subprocess.run([sys.executable, "-c", code, str(video)], check=True, timeout=60)
    with av.open(str(video)) as c:
        grey = [round(f.to_ndarray(format="gray").mean() / 10) for f in c.decode(video=0)]
    assert grey == list(range(19))  # all but the frame the muxer held


def test_a_ctrl_c_after_a_stopped_run_is_over_does_not_interrupt_its_exit():
    """A second Ctrl-C just after the stop finished landed in exit's finalizers: a traceback."""
    import os
    import signal
    from types import SimpleNamespace

    from streamtrack.cli_run import _run_in_process
    from streamtrack.pipeline import RunSummary

    def run():
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C during the run: it stops
        deadline = time.monotonic() + 5
        while not stopped and time.monotonic() < deadline:
            time.sleep(0.01)
        return RunSummary(frames=3)

    stopped: list[bool] = []
    tracker = SimpleNamespace(run=run, stop=lambda: stopped.append(True))
    before = signal.getsignal(signal.SIGINT)
    try:
        summary, by = _run_in_process(tracker)
        assert stopped and summary.interrupted and by == signal.SIGINT
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        os.kill(os.getpid(), signal.SIGINT)  # pressed again: nothing happens
        time.sleep(0.1)
    finally:
        signal.signal(signal.SIGINT, before)
