"""``streamtrack fleet``: streams as Ray actors, the endpoint directory, restarts, control.

One local Ray instance serves the whole module (``ray.init`` once, 2 CPUs, no
dashboard), so Ray's start-up cost is paid once and by this file only.  The
streams are synthetic H.264 clips, tracked by a small random-weight model at a
128-pixel input; every client talks to 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import ray
import yaml
from conftest import free_port

from streamtrack import cli
from streamtrack.control import ControlClient
from streamtrack.errors import UserError
from streamtrack.fleet import ACTOR_ENV, Fleet
from streamtrack.fleet_directory import read_directory
from streamtrack.fleet_spec import FleetOptions, load_fleet, parse_fleet, plan_actors, plan_added
from streamtrack.subscriber import Subscriber
from streamtrack.synthetic import make_clip, write_video

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

REPO = Path(__file__).resolve().parents[1]
IMAGE_SIZE = 128  # the smallest input the tiny model takes: keeps 2 cores ahead of the clock
BOX1 = [25, 30, 55, 54]  # object 1 of make_clip(.., 160, 120, seed=1) on frame 0
BOX2 = [100, 65, 124, 91]  # object 2


@pytest.fixture(scope="module")
def local_ray():
    # "local": a fresh instance even if a `ray start` cluster runs on this machine.
    ray.init(address="local", num_cpus=2, include_dashboard=False, configure_logging=False,
             log_to_driver=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def clip_path(tmp_path_factory) -> Path:
    clip = make_clip(24, 160, 120, num_objects=2, seed=1)
    return write_video(clip.frames, tmp_path_factory.mktemp("fleet-clip") / "clip.mp4", fps=30)


def stream_entry(name: str, source: Path | str, boxes: list[list[int]], **extra) -> dict:
    prompts = [{"obj_id": i, "box": b} for i, b in enumerate(boxes, start=1)]
    return {"name": name, "source": str(source), "prompts": prompts, "loop": True, **extra}


def fleet_doc(tmp_path: Path, checkpoint: Path, streams: list[dict], **options) -> dict:
    return {
        "fleet": {"directory": str(tmp_path / "fleet.json"), "num_cpus": 1, **options},
        "defaults": {"checkpoint": str(checkpoint), "image_size": IMAGE_SIZE, "device": "cpu"},
        "streams": streams,
    }


def wait_for(what: str, check, timeout: float = 90.0, every: float = 0.2):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what} (last: {last!r})")


@contextlib.contextmanager
def stalled_pipe(path: Path):
    """A FIFO whose reader is there and never reads (a hung network mount, a consumer that
    stopped): writes go through until its one-page buffer is full, then block for good."""
    os.mkfifo(path)
    reader = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    fcntl.fcntl(reader, fcntl.F_SETPIPE_SZ, 4096)
    try:
        yield path
    finally:
        os.close(reader)


def directory_states(path: Path) -> dict[str, str]:
    try:
        return {n: e.state for n, e in read_directory(path).items()}
    except Exception:  # noqa: BLE001 - not written yet / being replaced
        return {}


def next_masks(sub: Subscriber, stream: str, after_seq: int = -1, timeout: float = 60.0):
    """A masks message of ``stream`` with seq > ``after_seq`` (the newest)."""
    msg = sub.latest(stream, timeout=timeout, after_seq=after_seq)
    if msg is None:
        raise AssertionError(f"no masks from stream {stream!r} after seq {after_seq} within {timeout:g} s")
    return msg


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A killed child of the raylet may linger as a zombie until reaped.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


# ------------------------------------------------------------------ without Ray


@pytest.mark.parametrize("mutate, expected", [
    (lambda d: d["streams"][1].update(image_size="big"), "stream 'b': image_size must be int"),
    # what `run` refuses, `fleet --check` refuses too
    (lambda d: d["streams"][1].update(image_size=32), "stream 'b': image size must be a multiple of 32"),
    (lambda d: d["streams"][0].update(colour="red"), "stream 'a': unknown field(s) ['colour']"),
    (lambda d: d["streams"][1].pop("source"), "stream 'b': source must be"),
    (lambda d: d["streams"][1].update(name="a"), "stream 'a': name used twice"),
    (lambda d: d["streams"][0].pop("prompts"), "stream 'a': no prompts"),
    (lambda d: d["streams"][1].update(prompts=[{"obj_id": 0, "box": BOX1}]), "stream 'b': prompts, entry 0"),
    (lambda d: d["streams"][0].update(publish="tcp://127.0.0.1:x"), "stream 'a': publish: invalid endpoint"),
    (lambda d: d["fleet"].update(streams_per_actor=0), "fleet: streams_per_actor must be an integer >= 1"),
    (lambda d: d["fleet"].update(hang_timeout=1), "hang_timeout must be 0 or null (never) or at least 2"),
    (lambda d: d["fleet"].update(hang_timeout="5m"), "fleet: hang_timeout must be a number of seconds"),
    (lambda d: d["streams"][0].update(start_timeout=60),
     "stream 'a': unknown field(s) ['start_timeout'] (start_timeout: a fleet does not time a stream's start"),
    (lambda d: d["defaults"].update(curve_secret="k.secret"),
     "defaults: unknown key 'curve_secret' (curve_secret: a fleet's streams are not CURVE-encrypted)"),
    (lambda d: d["streams"][0].update(hang_timeout=60),
     "stream 'a': unknown field(s) ['hang_timeout'] (fleet.hang_timeout: a fleet option)"),
    (lambda d: d["defaults"].update(max_restarts=5),
     "defaults: unknown key 'max_restarts' (fleet.max_restarts: a fleet option)"),
    (lambda d: d.update(cameras=[]), "unknown section(s) ['cameras']"),
    # two trackers writing over each other's results
    (lambda d: [s.update(save_jsonl="/out/r.jsonl") for s in d["streams"]],
     "stream 'b': save_jsonl /out/r.jsonl is also written by stream 'a' (save_jsonl): give each stream"),
    (lambda d: (d["streams"][0].update(save_masks="/out/m"), d["streams"][1].update(save_video="/out/m")),
     "stream 'b': save_video /out/m is also written by stream 'a' (save_masks)"),
    # an output over another stream's input, which that stream would be reading
    (lambda d: (d["streams"][1].update(source="/data/b.mp4"),
                d["streams"][0].update(save_video="/data/b.mp4")),
     "stream 'a': save_video /data/b.mp4 is the source video of stream 'b', which it would overwrite"),
    (lambda d: d["streams"][0].update(source="/data/a.mp4", save_jsonl="/data/a.mp4"),  # its own
     "stream 'a': save_jsonl /data/a.mp4 is the source video of stream 'a', which it would overwrite"),
    (lambda d: (d["streams"][1].update(source="file:///data/b.mp4"),
                d["streams"][0].update(save_jsonl="/data/b.mp4")),
     "stream 'a': save_jsonl /data/b.mp4 is the source video of stream 'b', which it would overwrite"),
    (lambda d: (d["streams"][1].update(checkpoint="/data/m.pt"),
                d["streams"][0].update(save_jsonl="/data/m.pt")),
     "stream 'a': save_jsonl /data/m.pt is the checkpoint of stream 'b'"),  # read again by a restarted actor
    # a URL with a slash missing is no file: said here with the password hidden, not on the node
    (lambda d: d["streams"][1].update(source="rtsp:/admin:pw@cam/x"),
     "stream 'b': source: video source rtsp:/***@cam/x is neither a file nor a URL: did you mean rtsp://***@cam/x?"),
    # what `run` checks before it starts, before Ray does
    (lambda d: (d["defaults"].update(max_objects=1),
                d["streams"][0]["prompts"].append({"obj_id": 2, "box": BOX1})),
     "stream 'a': the prompts name 2 objects and max_objects is 1"),
    # a URL's form does not depend on the node
    (lambda d: d["streams"][1].update(source="htp://127.0.0.1/x.mp4"),
     "stream 'b': source: unsupported video source scheme 'htp://'"),
    (lambda d: d["streams"][1].update(source="rtsp://"), "stream 'b': source: video source URL has no host"),
    # stdout is the actor's, not the user's: a dash (stdout for `run`) is refused too
    (lambda d: d["streams"][0].update(save_jsonl="-"),
     "stream 'a': save_jsonl /dev/stdout: a stream's outputs are written by its actor"),
    (lambda d: d["defaults"].update(save_video="/dev/fd/1"), "save_video /dev/fd/1: a stream's outputs"),
    (lambda d: d["fleet"].update(bind="not a host!"), "fleet: bind: 'not a host!' is not a host name"),
    # one port written two ways, a wildcard host, the fleet control's own port
    (lambda d: (d["streams"][0].update(publish="tcp://127.0.0.1:5601"),
                d["streams"][1].update(publish="tcp://localhost:5601")),
     "stream 'b': publish tcp://localhost:5601 is also used by stream 'a'"),
    (lambda d: (d["streams"][0].update(publish="tcp://0.0.0.0:5601"),
                d["streams"][1].update(control="tcp://127.0.0.1:5601")),
     "stream 'b': control tcp://127.0.0.1:5601 is also used by stream 'a'"),
    (lambda d: (d["fleet"].update(control="tcp://127.0.0.1:5602"),
                d["streams"][0].update(publish="5602")),
     "stream 'a': publish tcp://127.0.0.1:5602 is also used by the fleet control"),
])
def test_malformed_fleet_file_is_one_line_and_exit_2(tmp_path, capsys, mutate, expected):
    doc = fleet_doc(tmp_path, tmp_path / "ckpt.pt", [stream_entry("a", "a.mp4", [BOX1]),
                                                     stream_entry("b", "b.mp4", [BOX1])])
    mutate(doc)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(doc))
    assert cli.main(["fleet", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert expected in err and str(path) in err, err


def test_a_fleet_file_reads_blank_values_and_bare_numbers_as_run_does(tmp_path):
    """A blank `save_jsonl:` is refused (as in a run's config file), a blank `streams:` is
    no streams; a bare port and a numeric stream name are text."""
    f = tmp_path / "f.yaml"
    head = "fleet: {control: 5610, exit_when_done: false}\ndefaults:\n"
    f.write_text(head + "streams:\n")
    spec = load_fleet(f)
    assert spec.streams == [] and spec.options.control == "5610"
    f.write_text(head + "streams:\n  - {name: 7, source: a.mp4, publish: 5611, prompt_later: true}\n")
    (stream,) = load_fleet(f).streams
    assert stream.name == "7" and stream.config.publish.endswith(":5611")
    f.write_text(head + "streams:\n  - {name: a, source: a.mp4, prompt_later: true, save_jsonl: }\n")
    with pytest.raises(UserError, match="stream 'a': save_jsonl is an empty path"):
        load_fleet(f)


def test_add_stream_refuses_the_fleet_controls_port(tmp_path):
    doc = fleet_doc(tmp_path, tmp_path / "ckpt.pt", [], control="tcp://0.0.0.0:5602", exit_when_done=False)
    fleet = Fleet(parse_fleet(doc, "f.yaml"))
    fleet._control = SimpleNamespace(endpoint="tcp://0.0.0.0:5602")  # as bound by run()
    with pytest.raises(UserError, match=r"^add_stream: stream 'x': publish tcp://127.0.0.1:5602 is also "
                                        r"used by the fleet control$"):
        fleet.add_stream(stream_entry("x", "x.mp4", [BOX1], publish="5602"))


def test_a_cameras_password_stays_in_the_fleet_file(tmp_path):
    """The directory file is world-readable and list_streams answers other machines: a
    stream's source is listed with its credentials hidden, as in every log line."""
    from streamtrack.fleet import _Stream

    url = "rtsp://admin:s3cretPW@127.0.0.1:18740/cam?channel=1&password=qs3cret"
    doc = fleet_doc(tmp_path, tmp_path / "ckpt.pt", [stream_entry("cam", url, [BOX1])])
    fleet = Fleet(parse_fleet(doc, "f.yaml"))
    spec = fleet.spec.streams[0]
    assert spec.source == url  # the tracker still gets the real one
    fleet.streams["cam"] = _Stream(spec=spec, actor="fleet-0", run_config=spec.run_config())
    listed = fleet.list_streams()["streams"]["cam"]
    assert listed["source"] == "rtsp://***@127.0.0.1:18740/cam?channel=1&password=***", listed
    fleet._write_directory("running")
    assert "s3cret" not in Path(fleet.options.directory).read_text()


def test_an_actor_is_released_only_once_its_streams_are_closed(tmp_path):
    """remove_stream asks the actor to stop the stream (its outputs flush) and returns: the
    actor, now without streams, is released only once a report shows the stream gone, not
    killed in the middle of that flush."""
    from streamtrack.fleet import _Actor
    from streamtrack.fleet_spec import plan_actors

    calls = []

    class Handle:
        def __getattr__(self, method):
            return SimpleNamespace(remote=lambda *args: calls.append((method, args)))

    class FakeRay:
        def kill(self, handle, no_restart):
            calls.append(("kill", ()))

    doc = fleet_doc(tmp_path, tmp_path / "ckpt.pt", [stream_entry("cam", "cam.mp4", [BOX1])])
    fleet = Fleet(parse_fleet(doc, "f.yaml"))
    fleet._ray = FakeRay()
    actor = _Actor(plan=plan_actors(fleet.spec.streams, fleet.options, 0.0)[0],
                   key=fleet.spec.streams[0].model_key, handle=Handle())
    fleet.actors[actor.plan.name] = actor
    fleet._add(fleet.spec.streams[0], actor)
    fleet.streams["cam"].starting, fleet.streams["cam"].state = False, "running"

    def report(streams: dict) -> None:
        listed = {n: {"name": n, "state": st, "frames": 3} for n, st in streams.items()}
        fleet._on_report(actor, {"incarnation": "1", "pid": 1, "node": "n", "stuck": [], "streams": listed})
        fleet._release_idle_actors()

    report({"cam": "stopping"})  # fenced (the actor lost the driver): not taken for ended
    assert fleet.streams["cam"].state == "running" and not fleet.streams["cam"].ended
    report({"cam": "running"})
    fleet.remove_stream("cam")
    fleet._release_idle_actors()
    report({"cam": "running"})  # asked before the stop reached the actor
    report({"cam": "stopping"})  # closing its outputs
    assert [c for c, _ in calls] == ["start_stream", "stop_stream"]
    report({})  # gone: its files are whole
    assert [c for c, _ in calls] == ["start_stream", "stop_stream", "kill"] and actor.released


def test_a_fenced_stream_restarts_after_the_masks_still_queued_for_the_driver(tmp_path):
    """A fenced stream tracks on while it stops; the masks it published meanwhile may still
    wait in the driver's subscription when the actor stops listing it.  Seeded from the
    older ones, the restart published those seqs again (5 of 8 streams, ~10 results each)."""
    from streamtrack.fleet import _Actor
    from streamtrack.fleet_spec import plan_actors
    from streamtrack.protocol import FrameResult, ObjectResult
    from streamtrack.subscriber import Message

    calls: list[tuple[str, tuple]] = []

    class Handle:
        def __getattr__(self, method):
            return SimpleNamespace(remote=lambda *args: calls.append((method, args)) or len(calls))

    def result(seq: int) -> FrameResult:
        mask = np.zeros((24, 32), bool)
        mask[2:9, 3:7] = True
        return FrameResult(stream="cam", seq=seq, frame_id=seq, pts=None, width=32, height=24,
                           objects=[ObjectResult.from_mask(1, mask, score=0.9)])

    queued = [result(116), result(120)]
    doc = fleet_doc(tmp_path, tmp_path / "ckpt.pt", [stream_entry("cam", "cam.mp4", [BOX1])])
    fleet = Fleet(parse_fleet(doc, "f.yaml"))
    actor = _Actor(plan=plan_actors(fleet.spec.streams, fleet.options, 0.0)[0],
                   key=fleet.spec.streams[0].model_key, handle=Handle())
    fleet.actors[actor.plan.name] = actor
    fleet._add(fleet.spec.streams[0], actor)
    cam = fleet.streams["cam"]
    cam.starting, cam.state = False, "running"
    cam.seen.update(result(108))
    cam.sub = SimpleNamespace(recv=lambda timeout: Message(topic="masks/cam", kind="masks", stream="cam",
                                                           received=0.0, result=queued.pop(0))
                              if queued else None)
    actor.last_report = cam.started_at + 1  # a report asked for after the stream started
    fleet._on_report(actor, {"incarnation": "1", "pid": 1, "node": "n", "stuck": [], "streams": {}})
    (method, (run_config, _)), = calls[1:]
    assert method == "start_stream" and run_config.resume.seq_start == 121


def test_a_name_removed_is_added_again_only_once_its_stop_has_run(tmp_path):
    """remove_stream does not wait for the stop; an add_stream of the same name right after
    reached the actor first ("already running"), was taken for an actor that had lost the
    stream and restarted, one of its max_restarts gone."""
    from streamtrack.fleet import _Actor
    from streamtrack.fleet_spec import plan_actors

    calls: list[tuple[str, tuple]] = []
    finished: set[int] = set()

    class Handle:
        def __getattr__(self, method):
            def remote(*args):
                calls.append((method, args))
                return len(calls)  # the call's "object ref"
            return SimpleNamespace(remote=remote)

    class FakeRay:
        def wait(self, refs, num_returns, timeout):
            return [r for r in refs if r in finished], [r for r in refs if r not in finished]

    doc = fleet_doc(tmp_path, tmp_path / "ckpt.pt", [stream_entry("cam", "cam.mp4", [BOX1])],
                    exit_when_done=False)
    fleet = Fleet(parse_fleet(doc, "f.yaml"))
    fleet._ray = FakeRay()
    actor = _Actor(plan=plan_actors(fleet.spec.streams, fleet.options, 0.0)[0],
                   key=fleet.spec.streams[0].model_key, handle=Handle())
    fleet.actors[actor.plan.name] = actor
    fleet._add(fleet.spec.streams[0], actor)  # still starting when removed
    fleet.remove_stream("cam")
    again = stream_entry("cam", "other.mp4", [BOX1])
    with pytest.raises(UserError, match=r"^add_stream: stream 'cam' is still stopping \(removed moments"):
        fleet.add_stream(again)
    finished.add(2)  # the stop ran, the start not yet
    with pytest.raises(UserError, match="still stopping"):
        fleet.add_stream(again)
    finished.add(1)
    assert fleet.add_stream(again)["state"] == "starting"
    assert [c for c, _ in calls] == ["start_stream", "stop_stream", "start_stream"]


def test_a_directory_file_replaced_is_written_again_unless_another_fleet_wrote_it(tmp_path, caplog):
    from streamtrack.fleet_directory import write_directory

    doc = fleet_doc(tmp_path, tmp_path / "ckpt.pt", [], control="tcp://127.0.0.1:5602", exit_when_done=False)
    fleet = Fleet(parse_fleet(doc, "f.yaml"))
    directory = fleet.options.directory
    fleet._write_directory("running")
    fleet._directory_checked_at = 0.0
    assert fleet._directory_intact()
    write_directory(directory, [], {"pid": os.getpid() + 1, "host": "elsewhere", "state": "running"})
    fleet._directory_checked_at = 0.0
    with caplog.at_level(logging.WARNING, logger="streamtrack.fleet"):
        assert fleet._directory_intact()  # not fought over every second
    assert "is written by another fleet too (pid" in caplog.text
    Path(directory).write_text("{}")  # not a directory: ours to write again
    fleet._directory_checked_at = 0.0
    assert not fleet._directory_intact()


def test_unreadable_fleet_file_is_one_line(tmp_path, capsys):
    path = tmp_path / "broken.yaml"
    path.write_text("streams: [name: a\n")
    assert cli.main(["fleet", str(path)]) == 2
    assert cli.main(["fleet", str(tmp_path / "absent.yaml")]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2 and "cannot read YAML" in lines[0] and "not found" in lines[1], lines


def test_unreachable_cluster_is_one_line_not_minutes_of_retries(tmp_path, capsys):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = tmp_path / "fleet.yaml"
    doc = fleet_doc(tmp_path, tmp_path / "c.pt", [stream_entry("a", "a.mp4", [BOX1])])
    path.write_text(yaml.safe_dump(doc))
    started = time.monotonic()
    assert cli.main(["fleet", str(path), "--address", f"127.0.0.1:{port}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"cannot connect to the Ray cluster at 127.0.0.1:{port}" in err, err
    assert time.monotonic() - started < 30


@pytest.mark.parametrize("where,message", [
    ("afile/fleet.json", "afile is a file, not a folder"),
    ("adir", "is a folder; give a file name"),
])
def test_an_unwritable_directory_file_is_one_line_before_anything_starts(tmp_path, capsys, where, message):
    (tmp_path / "afile").write_text("a file, not a folder")
    (tmp_path / "adir").mkdir()
    path = tmp_path / "fleet.yaml"
    doc = fleet_doc(tmp_path, tmp_path / "c.pt", [stream_entry("a", "a.mp4", [BOX1])])
    doc["fleet"]["directory"] = str(tmp_path / where)
    path.write_text(yaml.safe_dump(doc))
    # an address nobody answers on: the check comes before the cluster is asked for
    assert cli.main(["fleet", str(path), "--address", "127.0.0.1:9"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"fleet directory {tmp_path / where}" in err and message in err, err


def test_a_directory_write_that_fails_while_running_stops_no_stream(tmp_path, caplog):
    """A full disk under the directory file: logged once, tried again (at most once a second)
    until it succeeds; the file is readable by other users, as one open() makes."""
    from streamtrack.fleet import _Stream

    blocker = tmp_path / "state"
    blocker.write_text("a file where the directory's folder goes")
    doc = fleet_doc(tmp_path, tmp_path / "ckpt.pt", [stream_entry("a", "a.mp4", [BOX1])])
    doc["fleet"]["directory"] = str(blocker / "fleet.json")
    spec = parse_fleet(doc, "f.yaml")
    fleet = Fleet(spec)
    fleet.streams = {s.name: _Stream(spec=s, actor="fleet-0", run_config=s.run_config(), state="running")
                     for s in spec.streams}
    with pytest.raises(UserError, match="cannot write the fleet directory"):
        fleet._write_directory("running")  # while starting: the fleet does not start
    fleet._started.set()
    with caplog.at_level(logging.WARNING, logger="streamtrack.fleet"):
        for _ in range(3):
            fleet._write_directory("running")
        assert caplog.text.count("cannot write the fleet directory") == 1
        assert "the streams go on, and it is tried again" in caplog.text
        assert fleet._dirty and fleet._directory_retry_at > time.monotonic()
        blocker.unlink()
        fleet._write_directory("running")
        assert "written again" in caplog.text and not fleet._dirty
    assert read_directory(blocker / "fleet.json")["a"].state == "running"
    umask = os.umask(0)
    os.umask(umask)
    assert (blocker / "fleet.json").stat().st_mode & 0o777 == 0o666 & ~umask


def test_check_lists_the_streams_with_camera_credentials_hidden(tmp_path, capsys):
    path = tmp_path / "fleet.yaml"
    camera = "rtsp://admin:secret@10.0.0.7/live"
    doc = fleet_doc(tmp_path, tmp_path / "c.pt", [stream_entry("door", camera, [BOX1]),
                                                  stream_entry("clip", tmp_path / "a.mp4", [BOX1, BOX2])])
    path.write_text(yaml.safe_dump(doc))
    assert cli.main(["fleet", str(path), "--check"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and out[0].startswith("door: rtsp://***@10.0.0.7/live ("), out
    assert "1 prompt(s)" in out[0], out
    assert out[1].startswith(f"clip: {tmp_path / 'a.mp4'} (") and "2 prompt(s)" in out[1], out
    assert "secret" not in "\n".join(out)


def test_relative_paths_and_automatic_endpoints(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = parse_fleet({"streams": [{"name": "cam", "source": "videos/a.mp4", "prompt_later": True,
                                     "save_jsonl": "out/cam.jsonl"}]}, "f.yaml")
    (s,) = spec.streams
    assert s.source == str(tmp_path / "videos/a.mp4")  # actors may run elsewhere
    assert s.config.save_jsonl == str(tmp_path / "out/cam.jsonl")
    assert s.config.publish == "tcp://127.0.0.1:*" and s.config.control == "tcp://127.0.0.1:*"
    assert s.run_config().wait_for_prompt  # prompt later: hold the first frame for a prompt


def test_exposed_endpoints_are_warned_once_by_the_driver_not_by_every_tracker(tmp_path, caplog):
    entries = [stream_entry(name, "x.mp4", [BOX1]) for name in ("a", "b", "c")]
    spec = parse_fleet(fleet_doc(tmp_path, tmp_path / "c.pt", entries, bind="0.0.0.0"), "f.yaml")
    fleet = Fleet(spec)
    with caplog.at_level(logging.WARNING):
        for s in spec.streams:
            fleet._warn_if_exposed(s)
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 2 and "publish endpoint tcp://0.0.0.0:*" in warned[0], warned
    assert not any(s.run_config().warn_exposed for s in spec.streams)


def test_placement_an_actor_per_stream_on_gpus_all_in_one_on_cpu(tmp_path):
    entries = [stream_entry(f"s{i}", "x.mp4", [BOX1]) for i in range(5)]
    spec = parse_fleet(fleet_doc(tmp_path, tmp_path / "c.pt", entries), "f.yaml")
    opts = spec.options
    cpu = plan_actors(spec.streams, opts, cluster_gpus=0)
    assert [p.streams for p in cpu] == [("s0", "s1", "s2", "s3", "s4")] and cpu[0].num_gpus == 0
    assert len(plan_actors(spec.streams, opts, cluster_gpus=2)) == 1  # device: cpu stays off the GPUs
    doc = fleet_doc(tmp_path, tmp_path / "c.pt", entries)
    doc["defaults"]["device"] = "auto"
    on_gpus = parse_fleet(doc, "f.yaml").streams
    # GPUs: an actor per stream, sharing the GPUs evenly (5 streams on 2 GPUs: 3 per GPU)
    gpu = plan_actors(on_gpus, FleetOptions(), cluster_gpus=2)
    assert [p.streams for p in gpu] == [(f"s{i}",) for i in range(5)]
    assert [p.num_gpus for p in gpu] == [0.3333] * 5
    assert [p.num_gpus for p in plan_actors(on_gpus[:2], FleetOptions(), cluster_gpus=2)] == [1.0, 1.0]
    assert [p.num_gpus for p in plan_actors(on_gpus[:4], FleetOptions(), cluster_gpus=1)] == [0.25] * 4
    assert [p.num_gpus for p in plan_actors(on_gpus, FleetOptions(num_gpus=0.5), cluster_gpus=2)] == [0.5] * 5
    batched = plan_actors(on_gpus, FleetOptions(streams_per_actor=3), cluster_gpus=2)  # opt in to batching
    assert [len(p.streams) for p in batched] == [3, 2] and all(p.num_gpus == 1 for p in batched)
    # a stream added at run time packs like its model's running actors
    added = plan_added(on_gpus[0], FleetOptions(), 1, siblings=gpu[:3], index=7)
    assert added.name == "fleet-7" and added.streams == ("s0",) and added.num_gpus == 0.3333
    assert plan_added(on_gpus[0], FleetOptions(), 1, siblings=[], index=0).num_gpus == 1.0
    assert plan_added(spec.streams[0], FleetOptions(), 1, siblings=gpu, index=0).num_gpus == 0  # device: cpu
    two = plan_actors(spec.streams, FleetOptions(streams_per_actor=2), cluster_gpus=0)
    assert [p.streams for p in two] == [("s0", "s1"), ("s2", "s3"), ("s4",)]
    # CUDA graphs are recorded per thread: such a model serves one stream, however packed
    graphs = [dict(e, compile_mode="reduce-overhead") for e in entries[:3]]
    spec_g = parse_fleet(fleet_doc(tmp_path, tmp_path / "c.pt", graphs, streams_per_actor=3), "f.yaml")
    assert [p.streams for p in plan_actors(spec_g.streams, spec_g.options, 0)] == [("s0",), ("s1",), ("s2",)]
    assert spec_g.streams[0].model_key.cudagraphs and not spec.streams[0].model_key.cudagraphs
    # ...and shares the GPUs like any actor of one stream: evenly by default, and
    # streams_per_actor N (N streams to a GPU) gives it 1/N of one
    for e in graphs:
        e["device"] = "auto"
    on_gpus_g = parse_fleet(fleet_doc(tmp_path, tmp_path / "c.pt", graphs), "f.yaml").streams
    assert [p.num_gpus for p in plan_actors(on_gpus_g, FleetOptions(), cluster_gpus=1)] == [0.3333] * 3
    assert [p.num_gpus for p in plan_actors(on_gpus_g, FleetOptions(), cluster_gpus=4)] == [1.0] * 3
    assert [p.num_gpus for p in plan_actors(on_gpus_g, FleetOptions(streams_per_actor=2), 4)] == [0.5] * 3
    assert [p.num_gpus for p in plan_actors(on_gpus_g, FleetOptions(num_gpus=0.2), 1)] == [0.2] * 3
    entries[4]["image_size"] = 256  # another input size cannot share the model
    spec = parse_fleet(fleet_doc(tmp_path, tmp_path / "c.pt", entries), "f.yaml")
    assert [p.streams for p in plan_actors(spec.streams, opts, 0)] == [("s0", "s1", "s2", "s3"), ("s4",)]


def test_an_actor_leaves_a_cuda_graph_model_to_the_streams_own_thread(tmp_path):
    """Nothing loaded or shared in the actor: the tracker builds, warms and steps the
    engine on the stream's thread, where its graphs are recorded."""
    from streamtrack.fleet_actor import FleetActor

    entry = stream_entry("g", "x.mp4", [BOX1], compile_mode="reduce-overhead")
    spec = parse_fleet(fleet_doc(tmp_path, tmp_path / "missing.pt", [entry]), "f.yaml").streams[0]
    actor = FleetActor("fleet-0")
    assert actor._engine(spec.run_config(), spec.model_key) is None
    assert actor._model is None and actor._encoder is None
    eager = parse_fleet(fleet_doc(tmp_path, tmp_path / "missing.pt", [dict(entry, compile_mode="default")]),
                        "f.yaml").streams[0]
    with pytest.raises(UserError, match="missing.pt"):  # the shared path does load the model
        actor._engine(eager.run_config(), eager.model_key)


# ---------------------------------------------------------------------- on Ray


def test_fleet_streams_restart_and_control(local_ray, tiny_checkpoint, clip_path, tmp_path, capsys):
    """Two good streams and a bad one on two actors: a subscriber built from the
    directory gets both; the bad one fails alone; a killed actor comes back with
    its stream's objects; streams can be added and removed at run time."""
    doc = fleet_doc(tmp_path, tiny_checkpoint, [
        stream_entry("a", clip_path, [BOX1]),
        stream_entry("bad", tmp_path / "missing.mp4", [BOX1]),
        stream_entry("b", clip_path, [BOX1, BOX2]),
    ], streams_per_actor=2, max_restarts=2)
    (tmp_path / "fleet.yaml").write_text(yaml.safe_dump(doc))
    spec = load_fleet(tmp_path / "fleet.yaml")
    directory = tmp_path / "fleet.json"
    fleet = Fleet(spec, log_level=logging.INFO, poll_interval=0.3)
    summary: list = []
    runner = threading.Thread(target=lambda: summary.append(fleet.run()), daemon=True)
    runner.start()
    try:
        states = wait_for("a and b running, bad failed", lambda: (
            s := directory_states(directory)) and s.get("a") == s.get("b") == "running"
            and s.get("bad") == "failed" and s)
        entries = read_directory(directory)
        assert entries["a"].actor == entries["bad"].actor != entries["b"].actor, entries
        directory.unlink()  # a cleanup job, or by hand: written again, not at the next change
        wait_for("the directory written again", lambda: directory_states(directory) == states, timeout=10)
        directory.write_text("{}")
        wait_for("the directory written over again", lambda: directory_states(directory) == states,
                 timeout=10)
        assert "video file not found" in entries["bad"].error and "missing.mp4" in entries["bad"].error
        assert entries["bad"].publish is None, states
        for e in (entries["a"], entries["b"]):
            assert e.publish.startswith("tcp://127.0.0.1:") and e.control.startswith("tcp://127.0.0.1:")

        with Subscriber.from_fleet(str(directory)) as sub:
            a0 = next_masks(sub, "a")
            b0 = next_masks(sub, "b")
            assert [o.obj_id for o in a0.objects] == [1]
            assert [o.obj_id for o in b0.objects] == [1, 2]
            # The stream beside the failed one keeps going.
            assert next_masks(sub, "a", a0.seq).seq > a0.seq

            # `streamtrack subscribe fleet.json` reads the same directory.
            capsys.readouterr()
            assert cli.main(["subscribe", str(directory), "--count", "4", "--timeout", "60"]) == 0
            topics = {json.loads(line)["topic"] for line in capsys.readouterr().out.splitlines()}
            assert topics <= {"masks/a", "masks/b", "status/a", "status/b", "stats/a", "stats/b"}, topics
            assert topics & {"masks/a", "masks/b"}, topics

            # Kill b's actor process: Ray restarts it, the driver re-seeds b from its last masks.
            actor = entries["b"].actor
            pid = ray.get(fleet.actor(actor).pid.remote(), timeout=30)
            assert pid == entries["b"].actor_pid
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            assert f"MALLOC_ARENA_MAX={ACTOR_ENV['MALLOC_ARENA_MAX']}".encode() in environ
            before = next_masks(sub, "b", b0.seq)
            os.kill(pid, signal.SIGKILL)
            restarted = wait_for("b restarted", lambda: (e := read_directory(directory)["b"]).restarts == 1
                                 and e.state == "running" and e)
            assert restarted.actor_pid != pid and restarted.publish == entries["b"].publish
            assert not pid_alive(pid)
            after = next_masks(sub, "b", before.seq)
            assert [o.obj_id for o in after.objects] == [1, 2]  # same objects, seeded from their masks
            assert any(o.area > 0 for o in after.objects)
            assert read_directory(directory)["a"].restarts == 0  # the other actor was untouched

        # The fleet control channel: list, add, remove; bad requests answered, not fatal.
        control = json.loads(directory.read_text())["fleet"]["control"]
        # From a machine without the directory file: the fleet's control lists the streams.
        capsys.readouterr()
        assert cli.main(["subscribe", control, "--fleet", "--count", "4", "--timeout", "60"]) == 0
        topics = {json.loads(line)["topic"] for line in capsys.readouterr().out.splitlines()}
        assert topics & {"masks/a", "masks/b"}, topics
        with ControlClient(control, timeout=10) as client:
            listed = client.request({"cmd": "list_streams"})
            assert listed["ok"] and set(listed["streams"]) == {"a", "b", "bad"}
            assert listed["streams"]["bad"]["state"] == "failed"
            typo = stream_entry("c", clip_path, [BOX1], image_size="x")
            bad = client.request({"cmd": "add_stream", **typo})
            assert not bad["ok"] and "stream 'c': image_size must be int" in bad["error"], bad
            dup = client.request({"cmd": "add_stream", **stream_entry("a", clip_path, [BOX1])})
            assert not dup["ok"] and "exists already" in dup["error"], dup
            assert not client.request({"cmd": "shutdown_everything"})["ok"]
            added = client.request({"cmd": "add_stream", **stream_entry("c", clip_path, [BOX2])})
            # Both actors have room (streams_per_actor 2, bad has ended): no new actor.
            assert added["ok"] and added["actor"] in {entries["a"].actor, entries["b"].actor}, added
            c = wait_for("c running", lambda: (e := read_directory(directory).get("c")) and
                         e.state == "running" and e)
            with Subscriber(c.publish) as sub_c:
                assert [o.obj_id for o in next_masks(sub_c, "c").objects] == [1]
            removed = client.request({"cmd": "remove_stream", "name": "c"})
            assert removed["ok"], removed
            wait_for("c gone from the directory", lambda: "c" not in read_directory(directory))
            assert not client.request({"cmd": "remove_stream", "name": "c"})["ok"]

        pids = {e.actor_pid for e in read_directory(directory).values()}
    finally:
        fleet.stop()
        runner.join(60)
    assert not runner.is_alive()
    result = summary[0]
    assert result.streams["bad"]["state"] == "failed" and result.streams["b"]["restarts"] == 1
    assert json.loads(directory.read_text())["fleet"]["state"] == "stopped"
    wait_for("actor processes gone", lambda: not any(pid_alive(p) for p in pids), timeout=30)


def test_actors_whose_streams_ended_give_their_cpus_to_an_actor_waiting(local_ray, tiny_checkpoint,
                                                                        clip_path, tmp_path, caplog):
    """Three one-CPU actors on a two-CPU cluster: the third waits (and says what for) until
    an actor whose stream has ended is released, then runs; the fleet ends when all have."""
    doc = fleet_doc(tmp_path, tiny_checkpoint, [stream_entry(n, clip_path, [BOX1], loop=False)
                                                for n in ("a", "b", "c")], streams_per_actor=1)
    spec = parse_fleet(doc, "f.yaml")
    fleet = Fleet(spec, log_level=logging.INFO, poll_interval=0.3, unreachable_after=2.0)
    summary: list = []
    with caplog.at_level(logging.INFO, logger="streamtrack.fleet"):
        runner = threading.Thread(target=lambda: summary.append(fleet.run()), daemon=True)
        runner.start()
        runner.join(240)
        if runner.is_alive():
            fleet.stop()
            runner.join(60)
    assert summary, "the fleet did not end"
    assert {n: s["state"] for n, s in summary[0].streams.items()} == {"a": "done", "b": "done", "c": "done"}
    assert "no stream left to run; released (1 CPU, 0 GPU)" in caplog.text
    assert "has not started after" in caplog.text and "Lower fleet.num_cpus" in caplog.text


def test_a_wildcard_fleet_control_is_listed_with_the_node_address(local_ray, tiny_checkpoint, tmp_path,
                                                                  monkeypatch, caplog):
    """A fleet control bound to every interface is listed in the directory with the
    driver's node address: a wildcard is no address for another machine to connect to.
    Its warning says what a client of it can do."""
    import streamtrack.fleet

    monkeypatch.setattr(streamtrack.fleet, "node_address", lambda: "198.18.0.7")
    doc = fleet_doc(tmp_path, tiny_checkpoint, [], control="tcp://0.0.0.0:0", exit_when_done=False)
    (tmp_path / "fleet.yaml").write_text(yaml.safe_dump(doc))
    directory = tmp_path / "fleet.json"
    fleet = Fleet(load_fleet(tmp_path / "fleet.yaml"), poll_interval=0.1)
    runner = threading.Thread(target=fleet.run, daemon=True)
    runner.start()
    try:
        listed = wait_for("the directory", lambda: directory.exists() and json.loads(directory.read_text()))
        host, _, port = listed["fleet"]["control"].removeprefix("tcp://").rpartition(":")
        assert host == "198.18.0.7" and int(port) > 0, listed["fleet"]
        with ControlClient(f"tcp://127.0.0.1:{port}", timeout=10) as client:  # bound on every interface
            assert client.request({"cmd": "list_streams"}) == {"ok": True, "streams": {}}
    finally:
        fleet.stop()
        runner.join(30)
    assert not runner.is_alive()
    warned = [r.getMessage() for r in caplog.records if "reachable from other machines" in r.getMessage()]
    assert any(w.startswith("fleet control endpoint tcp://0.0.0.0:") and "write files anywhere" in w
               for w in warned), warned


def test_an_actor_that_stops_answering_is_listed_unreachable_until_it_answers(local_ray, tiny_checkpoint,
                                                                            clip_path, tmp_path):
    """A frozen actor process (SIGSTOP), as one on a node cut off: the directory says so
    within ``unreachable_after`` instead of "running" until Ray gives up on the node."""
    doc = fleet_doc(tmp_path, tiny_checkpoint, [stream_entry("solo", clip_path, [BOX1])], control=None)
    (tmp_path / "fleet.yaml").write_text(yaml.safe_dump(doc))
    directory = tmp_path / "fleet.json"
    fleet = Fleet(load_fleet(tmp_path / "fleet.yaml"), poll_interval=0.2, unreachable_after=2.0)
    runner = threading.Thread(target=fleet.run, daemon=True)
    runner.start()
    pid = None
    try:
        running = wait_for("solo running", lambda: directory_states(directory).get("solo") == "running")
        pid = read_directory(directory)["solo"].actor_pid
        os.kill(pid, signal.SIGSTOP)
        stopped_at = time.monotonic()
        wait_for("solo unreachable", lambda: directory_states(directory).get("solo") == "unreachable",
                 timeout=30)
        # unreachable_after (2 s) counts from the last report asked for, which may have been
        # asked a poll interval (0.2 s) before the stop.
        assert time.monotonic() - stopped_at >= 2.0 - 0.2
        entry = read_directory(directory)["solo"]
        assert "not answering" in entry.error and entry.restarts == 0, entry
        os.kill(pid, signal.SIGCONT)
        pid = None
        wait_for("solo running again", lambda: directory_states(directory).get("solo") == "running",
                 timeout=30)
        assert read_directory(directory)["solo"].restarts == 0  # the same tracker went on
    finally:
        if pid is not None:
            os.kill(pid, signal.SIGCONT)
        fleet.stop()
        runner.join(60)
    assert not runner.is_alive() and running


def test_streams_fenced_while_the_driver_was_silent_restart_with_their_objects(local_ray, tiny_checkpoint,
                                                                             clip_path, tmp_path):
    """The driver stops polling (as if cut off): the actor fences, its stream stops
    publishing; once the driver polls again it finds the stream gone and starts it again
    from its last masks, with the same object ids."""
    doc = fleet_doc(tmp_path, tiny_checkpoint, [stream_entry("solo", clip_path, [BOX1, BOX2], realtime=True)],
                    control=None, fence_after=2)
    (tmp_path / "fleet.yaml").write_text(yaml.safe_dump(doc))
    directory = tmp_path / "fleet.json"
    fleet = Fleet(load_fleet(tmp_path / "fleet.yaml"), poll_interval=0.2)
    silent = threading.Event()
    poll = fleet._poll_actors
    fleet._poll_actors = lambda: None if silent.is_set() else poll()
    runner = threading.Thread(target=fleet.run, daemon=True)
    runner.start()
    try:
        wait_for("solo running", lambda: directory_states(directory).get("solo") == "running")
        pid = read_directory(directory)["solo"].actor_pid
        with Subscriber.from_fleet(str(directory)) as sub:
            before = next_masks(sub, "solo")
            silent.set()
            time.sleep(4)  # fence_after 2 s, checked every 0.5 s
            last = sub.latest("solo", timeout=0.5)
            assert sub.latest("solo", timeout=2, after_seq=last.seq) is None  # fenced: no more masks
            silent.clear()
            entry = wait_for("solo restarted", lambda: (e := read_directory(directory)["solo"]).restarts == 1
                             and e.state == "running" and e)
            after = next_masks(sub, "solo", last.seq)
        assert [o.obj_id for o in after.objects] == [o.obj_id for o in before.objects] == [1, 2]
        assert entry.actor_pid == pid  # the same actor process: its stream was stopped, not the actor
    finally:
        silent.clear()
        fleet.stop()
        runner.join(60)
    assert not runner.is_alive()


def test_a_hung_stream_gets_its_actor_restarted_with_its_objects(local_ray, tiny_checkpoint, clip_path,
                                                                tmp_path, caplog):
    """A stream whose results file blocks its writes (a FIFO whose reader stopped reading, as
    a hung network mount): its loop stops showing signs of life while the actor answers
    polls; after hang_timeout the driver kills the actor for Ray to restart, and the stream
    goes on from its last masks once the file takes writes again."""
    fifo = tmp_path / "stuck.jsonl"
    stuck = stream_entry("stuck", clip_path, [BOX1], save_jsonl=str(fifo))
    doc = fleet_doc(tmp_path, tiny_checkpoint, [stuck], control=None, hang_timeout=3, max_restarts=2)
    (tmp_path / "fleet.yaml").write_text(yaml.safe_dump(doc))
    directory = tmp_path / "fleet.json"
    fleet = Fleet(load_fleet(tmp_path / "fleet.yaml"), poll_interval=0.2)
    lines: list[bytes] = []
    stop_reading = threading.Event()

    def drain() -> None:  # every writer in turn: the hung tracker (if not yet killed), its successor
        while not stop_reading.is_set():
            with open(fifo, "rb") as f:
                lines.extend(f)

    reader = threading.Thread(target=drain, daemon=True)
    runner = threading.Thread(target=fleet.run, daemon=True)
    with stalled_pipe(fifo):
        runner.start()
        try:
            with caplog.at_level(logging.WARNING, logger="streamtrack.fleet"):
                wait_for("stuck running", lambda: directory_states(directory).get("stuck") == "running")
                pid = read_directory(directory)["stuck"].actor_pid
                wait_for("the hang noticed", lambda: "no sign of life" in caplog.text, timeout=60)
            assert "stream stuck: no sign of life from its tracker for" in caplog.text
            assert "(hang_timeout 3 s): killing actor fleet-0 for Ray to restart it" in caplog.text
            # Before the kill, where it hangs: the loop waits for the emitter, which waits to write.
            stacks = caplog.text.split("actor fleet-0, where the hung stream(s) are:", 1)[1]
            assert "stream stuck's loop (thread stream-stuck)" in stacks and "in submit" in stacks, stacks
            assert "outputs.py" in stacks and "self._file.flush()" in stacks, stacks
            reader.start()
            entry = wait_for("stuck restarted and writing", lambda: (e := read_directory(directory)["stuck"])
                             .restarts == 1 and e.state == "running" and len(lines) >= 3 and e, timeout=90)
            assert entry.actor_pid != pid  # the actor process was restarted
            objects = [[o["obj_id"] for o in json.loads(line)["objects"]] for line in lines]
            assert objects[-3:] == [[1]] * 3  # re-seeded from its last masks: the same object
            assert read_directory(directory)["stuck"].restarts == 1  # writing again: no second hang
        finally:
            stop_reading.set()
            fleet.stop()
            runner.join(60)
            try:  # a reader still waiting for a writer gets an end
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass
            if reader.is_alive():
                reader.join(5)
    assert not runner.is_alive()
    assert FleetOptions().hang_timeout == 300
    for never in (0, None):
        assert parse_fleet(fleet_doc(tmp_path, tiny_checkpoint, [stuck], hang_timeout=never),
                           "f.yaml").options.hang_timeout is None


def test_a_hang_kills_the_actor_only_while_ray_would_restart_it(tmp_path, caplog):
    """The driver's decisions on actor reports (no Ray): a hung stream, or a stream that did
    not stop when asked, gets its actor killed for Ray to restart; with no restarts left the
    actor is left alone, so its other streams go on, and the hung stream is failed with why."""
    from types import SimpleNamespace

    from streamtrack.fleet import _Actor, _Stream

    doc = fleet_doc(tmp_path, tmp_path / "ckpt.pt", [stream_entry("a", "a.mp4", [BOX1]),
                                                     stream_entry("b", "b.mp4", [BOX1])],
                    hang_timeout=5, max_restarts=1, streams_per_actor=2)
    spec = parse_fleet(doc, "f.yaml")
    (plan,) = plan_actors(spec.streams, spec.options, cluster_gpus=0)

    handle = SimpleNamespace(stacks=SimpleNamespace(remote=lambda names: f"stacks of {names}"))

    def fleet_with(restarts: int):
        fleet = Fleet(spec)
        killed: list = []
        fleet._ray = SimpleNamespace(kill=lambda handle, no_restart: killed.append((handle, no_restart)),
                                     wait=lambda refs, timeout: (refs, []), get=lambda ref: f"<{ref}>")
        actor = _Actor(plan=plan, key=spec.streams[0].model_key, handle=handle,
                       incarnation="first", restarts=restarts, last_report=1.0)
        fleet.actors = {plan.name: actor}
        fleet.streams = {s.name: _Stream(spec=s, actor=plan.name, run_config=s.run_config(), state="running")
                         for s in spec.streams}
        return fleet, actor, killed

    def report(silent_a: float, stuck=()):
        streams = {n: {"name": n, "state": "running", "error": None, "frames": 9, "silent": silent,
                       "bound": {}, "publish": None, "control": None}
                   for n, silent in (("a", silent_a), ("b", 0.4))}
        return {"incarnation": "first", "pid": 7, "node": "n", "streams": streams, "stuck": list(stuck)}

    with caplog.at_level(logging.WARNING, logger="streamtrack.fleet"):
        fleet, actor, killed = fleet_with(restarts=0)
        fleet._on_report(actor, report(4.9))
        assert killed == [] and fleet.streams["a"].state == "running"  # not yet hang_timeout
        fleet._on_report(actor, report(9.2))
        assert killed == [(handle, False)]  # Ray restarts it
        a = fleet.streams["a"]
        assert (a.state, a.error) == ("restarting", "hung: no sign of life for 9 s")
        assert fleet.streams["b"].state == "running"
        assert "stream a: no sign of life from its tracker for 9 s (hang_timeout 5 s): killing actor " \
               "fleet-0 for Ray to restart it (with stream(s) b)" in caplog.text
        assert "actor fleet-0, where the hung stream(s) are:\n<stacks of ['a']>" in caplog.text
        fleet._on_report(actor, report(10.0))  # the dying incarnation's last word
        assert len(killed) == 1 and fleet.streams["a"].state == "restarting"

        fleet, actor, killed = fleet_with(restarts=1)  # Ray would not restart it
        fleet._on_report(actor, report(9.2))
        fleet._on_report(actor, report(15.0))
        assert killed == []
        assert fleet.streams["a"].state == "failed" and fleet.streams["b"].state == "running"
        assert fleet.streams["a"].error == "hung: no sign of life for 9 s; its actor has no restarts left"
        assert "actor fleet-0 has no restarts left (max_restarts 1): not killed, its other streams go on" \
            in caplog.text

        fleet, actor, killed = fleet_with(restarts=0)
        fleet._on_report(actor, report(0.2, stuck=["old"]))
        assert killed == [(handle, False)]
        assert "stream(s) old did not stop when asked (hung): killing actor fleet-0" in caplog.text
        assert "<stacks of ['old']>" in caplog.text
        caplog.clear()
        fleet, actor, killed = fleet_with(restarts=1)
        for _ in range(3):
            fleet._on_report(actor, report(0.2, stuck=["old"]))
        assert killed == [] and caplog.text.count("stream(s) old did not stop when asked") == 1


@pytest.mark.parametrize("signum,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["INT", "TERM"])
def test_cli_fleet_on_a_cluster_stops_cleanly_on_a_signal(local_ray, tiny_checkpoint, clip_path, tmp_path,
                                                          signum, code):
    """`streamtrack fleet FILE --address` as users run it: joins the cluster, publishes,
    and on SIGINT or SIGTERM (which ray.init takes over) stops its actors (no orphans)
    but leaves a cluster it did not start."""
    results = tmp_path / "solo.jsonl"
    entry = stream_entry("solo", clip_path, [BOX1], save_jsonl=str(results))
    doc = fleet_doc(tmp_path, tiny_checkpoint, [entry], control=None)
    (tmp_path / "fleet.yaml").write_text(yaml.safe_dump(doc))
    directory = tmp_path / "fleet.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamtrack", "fleet", "fleet.yaml", "--address", local_ray],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        wait_for("solo running", lambda: directory_states(directory).get("solo") == "running"
                 or proc.poll() is not None, timeout=120)
        assert proc.poll() is None, proc.communicate()
        pid = read_directory(directory)["solo"].actor_pid
        with Subscriber.from_fleet(str(directory)) as sub:
            assert [o.obj_id for o in next_masks(sub, "solo").objects] == [1]
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == code, err
    assert "Traceback" not in err, err
    # The frames tracked while stopping count: the summary said 1-2 fewer than were written.
    said = re.search(r"solo: stopped, (\d+) frames", err)
    assert said and int(said.group(1)) == len(results.read_text().splitlines()), err
    # Where clients find the streams, said once at the start.
    assert f"fleet: 1 stream(s) on Ray {local_ray}; directory {directory}, no control endpoint" in err, err
    assert json.loads(directory.read_text())["fleet"]["state"] == "stopped"
    wait_for("the actor process gone", lambda: not pid_alive(pid), timeout=30)
    assert ray.is_initialized() and ray.cluster_resources().get("CPU") == 2  # the cluster lives on


def test_fleet_benchmark_runs_both_layouts_on_the_test_ray(local_ray, capsys, monkeypatch):
    """benchmarks/fleet_bench.py (the streams-per-actor figures of docs/scaling.md) on
    this module's Ray: every layout's streams make progress and the ratios add up."""
    spec = importlib.util.spec_from_file_location("fleet_bench", REPO / "benchmarks/fleet_bench.py")
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "fleet_bench", bench)  # its dataclasses look themselves up there
    spec.loader.exec_module(bench)
    assert bench.main(["--streams", "1", "2", "--frames", "2", "--warmup", "1", "--image-size", "128",
                       "--frame-size", "128x96", "--cpus", "2", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["setup"]["frame_size"] == [128, 96]
    rows = result["rows"]
    assert [(r["streams"], r["layout"]) for r in rows] == [(1, "one actor"), (2, "actor per stream"),
                                                         (2, "one actor")]
    assert all(r["fps_per_stream"] > 0 and r["total_fps"] >= r["fps_per_stream"] for r in rows)
    per_stream, one = rows[1], rows[2]
    assert one["one_actor_vs_actor_per_stream"] == pytest.approx(
        one["fps_per_stream"] / per_stream["fps_per_stream"], abs=0.01)
    assert ray.is_initialized()  # the module's Ray is left running


def test_example_fleet_file_is_valid(monkeypatch):
    monkeypatch.chdir(REPO)
    spec = load_fleet(REPO / "configs/fleet/example.yaml")
    assert [s.name for s in spec.streams] == ["lobby", "door"]
    assert all(Path(s.source) == REPO / "demos/sample.mp4" for s in spec.streams)
    assert len(plan_actors(spec.streams, spec.options, cluster_gpus=0)) == 1  # CPU: one actor


def test_an_actor_the_driver_stops_polling_stops_its_streams(tiny_checkpoint, clip_path, tmp_path, caplog):
    """Fencing: an actor cut off from the driver stops its streams (Ray restarts them
    elsewhere), while one that is polled keeps them running (no Ray needed)."""
    from streamtrack.fleet_actor import FleetActor

    entry = stream_entry("s", clip_path, [BOX1], realtime=True)
    spec = parse_fleet(fleet_doc(tmp_path, tiny_checkpoint, [entry]), "f.yaml").streams[0]
    actor = FleetActor("fleet-0", fence_after=2.0)
    try:
        assert actor.start_stream(spec.run_config(), spec.model_key)["state"] == "running"
        for _ in range(12):  # polled as the driver does: 3 s, longer than fence_after
            assert actor.report()["streams"]["s"]["state"] == "running"
            time.sleep(0.25)
        with actor._driver_call():  # a call of the driver's that takes long (a start waiting for its source)
            time.sleep(3)
        assert actor.report()["streams"]["s"]["state"] == "running"
        stream = actor._streams["s"]
        with caplog.at_level(logging.WARNING, logger="streamtrack.fleet_actor"):
            wait_for("the stream fenced", lambda: not actor._streams and not stream.thread.is_alive(),
                     timeout=15, every=0.1)
        assert "no word from the fleet driver" in caplog.text and "stopping stream(s) s" in caplog.text
        assert stream.tracker.frames_seen > 0
    finally:
        actor.stop_all()
    with pytest.raises(UserError, match="fence_after must be a number of seconds >= 2"):
        parse_fleet(fleet_doc(tmp_path, tiny_checkpoint, [entry], fence_after=0.5), "f.yaml")


def test_a_fence_stops_its_streams_together_not_one_after_another():
    """Each stream takes a while to stop (its last frame; its publisher gives stalled
    subscribers up to a second, and a fenced actor's driver is one): told one by one,
    30 streams took about as long as the fence itself.  All are told before any is waited for."""
    from streamtrack.fleet_actor import FleetActor, _Stream

    events: list[str] = []
    actor = FleetActor("fleet-0")

    def stream(name: str) -> _Stream:
        stopped = threading.Event()
        tracker = SimpleNamespace(stop=lambda: (events.append(f"told {name}"), stopped.set()))

        def run() -> None:
            stopped.wait(10)
            time.sleep(0.2)  # the last frame, the outputs
            events.append(f"ended {name}")

        s = _Stream(config=None, tracker=tracker, thread=threading.Thread(target=run), state="running")
        s.thread.start()
        return s

    actor._streams = {name: stream(name) for name in ("a", "b", "c")}
    assert sorted(actor._stop_streams(["a", "b", "c", "gone"])) == ["a", "b", "c"]
    assert sorted(events[:3]) == ["told a", "told b", "told c"] and len(events) == 6, events
    assert actor._streams == {}
    assert actor._stop_stream("a") == {"name": "a", "state": "unknown"}


def test_a_camera_given_up_on_is_listed_failed_with_its_error(tiny_checkpoint, tmp_path):
    """A stream whose camera went away for longer than its give_up_after ended in failure
    (the fleet's exit code counts it), not "done"."""
    from rtsp import RtspServer

    from streamtrack.fleet_actor import FleetActor

    server = RtspServer()
    url = server.start()
    entry = {**stream_entry("door", url, [BOX1], give_up_after=1), "loop": False}
    spec = parse_fleet(fleet_doc(tmp_path, tiny_checkpoint, [entry]), "f.yaml").streams[0]
    actor = FleetActor("fleet-0")
    try:
        assert actor.start_stream(spec.run_config(), spec.model_key)["state"] == "running"
        wait_for("frames tracked", lambda: actor._streams["door"].tracker.frames_seen >= 3)
        server.stop()
        listed = wait_for("the stream ended", lambda: (
            s := actor.report()["streams"]["door"])["state"] not in ("starting", "running") and s,
            timeout=60)
    finally:
        actor.stop_all()
        server.close()
    assert listed["state"] == "failed", listed
    assert listed["error"].startswith(f"source '{url}' failed after "), listed
    assert "gave up after 1s reconnecting" in listed["error"], listed


def test_a_stopping_stream_is_listed_until_it_has_let_go_of_its_endpoints(tiny_checkpoint, clip_path,
                                                                          tmp_path):
    """A fenced stream (its actor frozen past fence_after) stops while the driver's polls
    resume: the driver restarts what the actor no longer lists, on the same endpoints, so a
    stream must stay listed until it has closed them, and a start waits for the old one."""
    from streamtrack.fleet_actor import FleetActor

    entry = stream_entry("s", clip_path, [BOX1], realtime=True, publish=f"tcp://127.0.0.1:{free_port()}")
    spec = parse_fleet(fleet_doc(tmp_path, tiny_checkpoint, [entry]), "f.yaml").streams[0]
    actor = FleetActor("fleet-0")
    try:
        assert actor.start_stream(spec.run_config(), spec.model_key)["state"] == "running"
        stream = actor._streams["s"]
        wait_for("frames tracked", lambda: stream.tracker.frames_seen >= 2)
        stopping = threading.Thread(target=actor._stop_stream, args=("s",))
        stopping.start()
        while stopping.is_alive():
            listed = actor.report()["streams"].get("s")
            if listed is None:
                assert not stream.thread.is_alive(), "unlisted while its thread still runs"
            else:  # never "stopped" (the driver would take it for ended, and not restart it)
                assert listed["state"] in ("running", "stopping"), listed
            time.sleep(0.002)
        assert actor.report()["streams"] == {}
        # A start while the old one is still stopping waits for it, then binds.
        assert actor.start_stream(spec.run_config(), spec.model_key)["state"] == "running"
        second = actor._streams["s"]
        again = threading.Thread(target=actor._stop_stream, args=("s",))
        again.start()
        wait_for("the stop begun", lambda: second.stop_requested, every=0.001)
        report = actor.start_stream(spec.run_config(), spec.model_key)
        again.join()
        assert report["state"] == "running" and not report.get("error"), report
    finally:
        actor.stop_all()


def test_a_stream_stopped_while_its_model_loads_is_not_started(tiny_checkpoint, clip_path, tmp_path,
                                                               monkeypatch):
    """A stop that comes while a start is still loading the model unlists the stream; the
    start must then not go on to run a tracker that nothing lists or can stop."""
    from streamtrack.fleet_actor import FleetActor

    entry = stream_entry("s", clip_path, [BOX1], realtime=True, publish=f"tcp://127.0.0.1:{free_port()}")
    spec = parse_fleet(fleet_doc(tmp_path, tiny_checkpoint, [entry]), "f.yaml").streams[0]
    actor = FleetActor("fleet-0")
    loading, release = threading.Event(), threading.Event()
    real_engine = actor._engine

    def slow_engine(config, key):
        loading.set()
        release.wait(30)
        return real_engine(config, key)

    monkeypatch.setattr(actor, "_engine", slow_engine)
    reports = []
    starting = threading.Thread(target=lambda: reports.append(actor.start_stream(spec.run_config(),
                                                                                 spec.model_key)))
    try:
        starting.start()
        assert loading.wait(30)
        assert actor.stop_stream("s")["state"] == "stopped"
        release.set()
        starting.join(60)
        assert reports and reports[0]["state"] == "stopped", reports
        assert actor.report()["streams"] == {}
        assert not [t for t in threading.enumerate() if t.name == "stream-s"], "a tracker runs unlisted"
    finally:
        release.set()
        actor.stop_all()


def test_an_actor_reports_a_stream_that_did_not_stop(tiny_checkpoint, clip_path, tmp_path):
    """A stream hung in a write is removed: its thread hangs on, holding its endpoints, so
    the actor keeps reporting it as stuck (for the driver to restart the actor) until it ends."""
    from streamtrack.fleet_actor import FleetActor

    fifo = tmp_path / "stuck.jsonl"
    entry = stream_entry("s", clip_path, [BOX1], save_jsonl=str(fifo))
    spec = parse_fleet(fleet_doc(tmp_path, tiny_checkpoint, [entry]), "f.yaml").streams[0]
    actor = FleetActor("fleet-0")
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(actor.stop_all)
        cleanup.enter_context(stalled_pipe(fifo))
        assert actor.start_stream(spec.run_config(), spec.model_key)["state"] == "running"
        wait_for("the stream hung", lambda: (actor.report()["streams"]["s"]["silent"] or 0) > 1.5,
                 timeout=60, every=0.1)
        assert actor.stop_stream("s", timeout=1)["state"] == "stopped"
        report = actor.report()
        assert report["streams"] == {} and report["stuck"] == ["s"]
        with open(fifo, "rb") as f:  # the write goes through: the thread flushes and ends
            f.read()
        wait_for("the stream's thread ended", lambda: actor.report()["stuck"] == [], timeout=30)


def test_actor_warms_its_shared_model_up_once_when_compiled(tiny_checkpoint, monkeypatch):
    """Engines handed to trackers do not warm up on their own: the actor does it, once
    per model, before its first stream's first frame (no Ray needed to check that)."""
    from streamtrack.engine import EngineConfig, StreamingEngine
    from streamtrack.fleet_actor import FleetActor
    from streamtrack.fleet_spec import ModelKey
    from streamtrack.pipeline import RunConfig

    warmed = []
    monkeypatch.setattr(StreamingEngine, "warmup", lambda self: warmed.append(self) or 0.0)
    engine_config = EngineConfig(checkpoint=str(tiny_checkpoint), image_size=128, device="cpu",
                                 compile=True, compile_backend="eager")
    key = ModelKey("sam2.1_hiera_tiny", str(tiny_checkpoint), "cpu", 128, None, True, "default")
    actor = FleetActor("test")
    engines = [actor._engine(RunConfig(source="a.mp4", stream=f"s{k}", engine=engine_config), key)
               for k in range(2)]
    assert warmed == [engines[0]]
    assert engines[1].encoder is engines[0].encoder is actor._encoder
