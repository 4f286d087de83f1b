"""Shared fixtures: seeded random-weight checkpoints and synthetic clips.

No trained SAM 2 weights exist offline, so tests build the official
architecture with seeded random weights, save it in the official checkpoint
format and load it through the same path users use.
"""

from __future__ import annotations

import contextlib
import gc
import os
import random
import select
import socket
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from streamtrack.models import save_random_checkpoint
from streamtrack.synthetic import make_clip

# Small enough for 2 CPU cores; big enough for Hiera's windows and SAM 2's masks.
TEST_IMAGE_SIZE = 256

os.environ.setdefault("TQDM_DISABLE", "1")


def pytest_collection_finish(session):
    """Collection imports torch, sam2, Ray...: a full garbage collection then walks some
    250k objects and holds the GIL for 0.1-0.8 s, longer than the sub-second waits of the
    threaded tests.  Frozen, those objects are left out of every collection."""
    gc.collect()
    gc.freeze()


@pytest.fixture(scope="session")
def checkpoint_factory(tmp_path_factory):
    """``checkpoint_factory(name, seed=0)`` -> path of a cached random checkpoint."""
    cache: dict[tuple[str, int], Path] = {}
    root = tmp_path_factory.mktemp("checkpoints")

    def make(name: str = "sam2.1_hiera_tiny", seed: int = 0) -> Path:
        key = (name, seed)
        if key not in cache:
            cache[key] = save_random_checkpoint(name, root / f"{name}-seed{seed}.pt", seed=seed)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def tiny_checkpoint(checkpoint_factory) -> Path:
    return checkpoint_factory("sam2.1_hiera_tiny")


@pytest.fixture(scope="session")
def clip40():
    """40 frames, 160x120, three objects that move and occlude each other."""
    return make_clip(40, 160, 120, num_objects=3, seed=1)


_PORTS = random.SystemRandom()  # not the random module's state, which a test may seed


def _ephemeral_ports() -> range:
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        low, high = 32768, 60999  # Linux's default
    return range(low, high + 1)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago, for a child process to bind (or
    for nothing to listen on).  Drawn outside the kernel's ephemeral range: a port bound to
    0 comes from that range, where any connection made before the child binds (another
    test's ZeroMQ client, say) may take it as its own source port."""
    ephemeral = _ephemeral_ports()
    for _ in range(100):
        port = _PORTS.randrange(20000, 65536)
        if port in ephemeral:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:  # in use (or reserved): draw again
                continue
            return port
    with socket.socket() as sock:  # everything outside the range taken: the kernel's pick
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def assert_summary_fps(frames: int, fps: float, seconds: float, *untracked: float) -> None:
    """The summary line's fps (printed to 0.01) is ``frames`` over the run's ``seconds``
    less its ``untracked`` ones, each figure as printed: to 0.1 s, so up to 0.05 s off."""
    tracked, slack = seconds - sum(untracked), 0.05 * (1 + len(untracked))
    low = frames / (tracked + slack)
    high = frames / (tracked - slack) if tracked > slack else float("inf")
    assert low - 0.005 <= fps <= high + 0.005, (frames, fps, seconds, untracked)


def exits_within(pid: int, timeout: float) -> bool:
    """True once ``pid`` is gone or a zombie (exited; only its parent has not reaped it)."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return True
        except OSError:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)


def assert_every_threads_stack(err: str) -> None:
    """A SIGUSR1 stack dump (faulthandler) on stderr that has the main thread and another.
    The kernel hands the signal to any thread that does not block it (an OpenMP or FFmpeg
    one too), so the main thread is not always the one headed "Current thread": it is the
    one whose stack starts at a module's top level."""
    assert err.count("(most recent call first):") >= 2, err
    assert " in <module>" in err, err


def track_both_ways(tmp_path: Path, checkpoint: Path, option: str, values=("thread", "process"),
                    **run_options):
    """An 8-frame clip (object 1 prompted on frame 0, object 2 on frame 4) tracked twice,
    with ``option`` (a RunConfig field) set to each of ``values`` ("thread", "process").

    Returns ``({value: parsed JSONL lines}, {value: RunSummary})``.
    """
    import json

    from streamtrack.engine import EngineConfig, Prompt, StreamingEngine
    from streamtrack.models import build_model
    from streamtrack.pipeline import RunConfig, Tracker
    from streamtrack.synthetic import write_video

    clip = make_clip(8, 160, 120, num_objects=2, seed=4)
    video = write_video(clip.frames, tmp_path / "clip.mp4")
    model = build_model("sam2.1_hiera_tiny", checkpoint, image_size=TEST_IMAGE_SIZE)
    lines, summaries = {}, {}
    for mode in values:
        run = RunConfig(source=str(video), prompts={0: [Prompt.make(1, box=clip.box(1, 0))],
                                                    4: [Prompt.make(2, box=clip.box(2, 4))]},
                        save_jsonl=str(tmp_path / f"{mode}.jsonl"), progress=False,
                        **run_options, **{option: mode})
        summaries[mode] = Tracker(run, engine=StreamingEngine(model, EngineConfig())).run()
        lines[mode] = [json.loads(x) for x in (tmp_path / f"{mode}.jsonl").read_text().splitlines()]
    return lines, summaries


def save_jpeg_frames(frames, folder: Path):
    """Write frames as <index>.jpg (the official predictor's input) and read them back.

    Returns the decoded frames, so the engine sees exactly the pixels the
    official loader decodes.
    """
    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    for i, f in enumerate(frames):
        Image.fromarray(f).save(folder / f"{i:05d}.jpg", quality=95)
    return [np.array(Image.open(folder / f"{i:05d}.jpg").convert("RGB")) for i in range(len(frames))]


class XDisplay(str):
    """A display name (``":3"``) that can say how its Xvfb is doing, for failure messages."""

    proc: subprocess.Popen
    log: Path

    def report(self) -> str:
        rc = self.proc.poll()
        state = "running" if rc is None else f"exited with {rc}"
        tail = self.log.read_text(errors="replace")[-1500:] if self.log.exists() else ""
        return f"Xvfb {self} (pid {self.proc.pid}) {state}; its log: {tail!r}"


@contextlib.contextmanager
def running_xvfb(log: Path, *, reset: bool = False):
    """A private Xvfb; ``-displayfd`` picks a free display number and says when ready.

    Without ``reset`` it runs with ``-noreset``: an X server resets when its last client
    leaves and refuses connections made meanwhile, so short-lived clients (xdotool, a
    display check) would now and then make the next client fail to connect.
    """
    r, w = os.pipe()
    with open(log, "w") as log_file:
        proc = subprocess.Popen(
            ["Xvfb", "-displayfd", str(w), "-screen", "0", "1024x768x24", "-nolisten", "tcp",
             *(() if reset else ("-noreset",))],
            pass_fds=(w,), stdout=log_file, stderr=subprocess.STDOUT,
        )
    os.close(w)
    display = None
    try:
        ready, _, _ = select.select([r], [], [], 15)
        number = os.read(r, 64).decode().strip() if ready else ""
        display = XDisplay(f":{number}")
        display.proc, display.log = proc, log
        if not number:
            pytest.fail(f"Xvfb did not start: {display.report()}")
        yield display
    finally:
        os.close(r)
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def frames_decoded(monkeypatch) -> list[int]:
    """Counts the frames PyAV decoders hand out in this process (``[count]``): how far a
    file was read to reach a frame."""
    from streamtrack import sources

    count = [0]
    real_frames = sources.PyAVReader.frames

    def counted(self):
        for raw in real_frames(self):
            count[0] += 1
            yield raw

    monkeypatch.setattr(sources.PyAVReader, "frames", counted)
    return count


@pytest.fixture
def xdisplay(tmp_path_factory):
    with running_xvfb(tmp_path_factory.mktemp("xvfb") / "xvfb.log") as display:
        yield display
