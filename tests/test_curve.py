"""Optional CURVE encryption + client authentication, over real sockets on 127.0.0.1."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from streamtrack import cli, curve
from streamtrack.config import load_config
from streamtrack.control import ControlClient, ControlServer, ControlTimeout
from streamtrack.curve import CurveClient, CurveServer, make_keys
from streamtrack.engine import FrameOutput
from streamtrack.errors import UserError
from streamtrack.pipeline import RunConfig, Tracker
from streamtrack.protocol import FrameResult
from streamtrack.publisher import Publisher
from streamtrack.subscriber import Subscriber
from streamtrack.supervisor import Supervisor
from streamtrack.synthetic import make_clip, write_video
from streamtrack.viewer import viewer_command

pytestmark = pytest.mark.skipif(not zmq.has("curve"), reason="libzmq without CURVE")

ANY_PORT = "tcp://127.0.0.1:0"
QUIET = 1.0  # seconds a refused client is watched for (it must get nothing)


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> Path:
    """A key folder made by the `streamtrack keys` command, as a user would."""
    d = tmp_path_factory.mktemp("curve") / "keys"
    assert cli.main(["keys", str(d)]) == 0
    return d


@pytest.fixture(scope="module")
def other_keys(tmp_path_factory) -> Path:
    """A second, unrelated key set: its client is not authorised on the first server."""
    d = tmp_path_factory.mktemp("curve") / "other"
    make_keys(d)
    return d


def _server(keys: Path) -> CurveServer:
    return CurveServer(str(keys / "server.key_secret"), str(keys / "clients"))


def _client(server_keys: Path, client_keys: Path) -> CurveClient:
    return CurveClient(str(server_keys / "server.key"), str(client_keys / "client.key_secret"))


def _result(seq: int) -> FrameResult:
    return FrameResult(stream="cam0", seq=seq, frame_id=seq, pts=seq / 30, width=32, height=24,
                       t={"capture": time.time()})


class _Pump:
    """Publishes a result every 10 ms on a thread until stopped."""

    def __init__(self, pub: Publisher) -> None:
        self.pub = pub
        self.seq = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            self.pub.publish_result(_result(self.seq))
            self.seq += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2)


@pytest.fixture
def curve_pub(keys) -> Iterator[Publisher]:
    with Publisher(ANY_PORT, curve=_server(keys)) as pub:
        pump = _Pump(pub)
        try:
            yield pub
        finally:
            pump.stop()


class _Handler:
    def status(self):
        return {"frames": 7}


@pytest.fixture
def curve_control(keys) -> Iterator[ControlServer]:
    server = ControlServer(ANY_PORT, _Handler(), curve=_server(keys))
    stop = threading.Event()
    t = threading.Thread(target=server.serve, args=(stop, 20), daemon=True)
    t.start()
    try:
        yield server
    finally:
        stop.set()
        t.join(2)
        server.close()


# ------------------------------------------------------------------------ keys


def test_keys_command_writes_both_pairs_and_authorises_the_client(keys, capsys):
    for name in ("server.key", "server.key_secret", "client.key", "client.key_secret"):
        assert (keys / name).is_file()
    assert (keys / "clients" / "client.key").read_bytes() == (keys / "client.key").read_bytes()
    assert (keys / "server.key_secret").stat().st_mode & 0o077 == 0
    server_pub, server_sec = zmq.auth.load_certificate(keys / "server.key_secret")
    assert zmq.auth.load_certificate(keys / "server.key") == (server_pub, None)
    assert zmq.curve_public(server_sec) == server_pub
    # Running it again must not silently replace keys that clients already hold.
    assert cli.main(["keys", str(keys)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "already exists" in err


def test_a_secret_key_is_never_readable_by_others_not_even_while_written(tmp_path, monkeypatch):
    """pyzmq writes key files with a plain open(): with the usual umask a secret would be
    readable by any local user from its write until a chmod after (or for good, should
    the process die in between)."""
    written = zmq.auth.create_certificates
    modes: dict[str, int] = {}

    def create_and_look(folder, name):
        public, secret = written(folder, name)
        modes[name] = Path(secret).stat().st_mode & 0o777  # before anything after it runs
        return public, secret

    monkeypatch.setattr(zmq.auth, "create_certificates", create_and_look)
    old_umask = os.umask(0o022)
    try:
        make_keys(tmp_path / "k")
        (tmp_path / "k" / "client.key_secret").chmod(0o644)  # replaced by --force: not kept
        make_keys(tmp_path / "k", "client", force=True)
    finally:
        os.umask(old_umask)
    assert modes == {"server": 0o600, "client": 0o600}
    assert (tmp_path / "k" / "client.key_secret").stat().st_mode & 0o777 == 0o600


def test_keys_command_adds_a_client_and_keeps_the_server(tmp_path, capsys):
    d = tmp_path / "k"
    assert cli.main(["keys", str(d)]) == 0
    out = capsys.readouterr().out
    assert "--curve-secret" in out and "--curve-clients" in out and "--curve-server-key" in out
    before = (d / "server.key_secret").read_bytes()
    assert cli.main(["keys", str(d), "--client", "laptop"]) == 0
    assert (d / "server.key_secret").read_bytes() == before
    assert (d / "clients" / "laptop.key").is_file() and (d / "laptop.key_secret").is_file()
    capsys.readouterr()
    assert cli.main(["keys", str(d), "--client", ""]) == 2  # not the default client pair again
    assert "client name '': use letters" in capsys.readouterr().err


# -------------------------------------------------------------------- pub/sub


def _received(sub: Subscriber, seconds: float) -> int:
    deadline = time.monotonic() + seconds
    n = 0
    while time.monotonic() < deadline:
        if sub.recv(timeout=0.05) is not None:
            n += 1
    return n


def test_authorised_subscriber_receives(keys, curve_pub):
    with Subscriber(curve_pub.endpoint, curve=_client(keys, keys)) as sub:
        msg = sub.latest("cam0", timeout=5)
        assert msg is not None and msg.result is not None and msg.result.stream == "cam0"


def test_unauthorised_or_plain_subscribers_receive_nothing(keys, other_keys, curve_pub):
    ok = Subscriber(curve_pub.endpoint, curve=_client(keys, keys))
    refused = [
        Subscriber(curve_pub.endpoint, curve=_client(keys, other_keys)),  # key not in clients/
        Subscriber(curve_pub.endpoint, curve=_client(other_keys, keys)),  # wrong server key
        Subscriber(curve_pub.endpoint),  # no CURVE at all
    ]
    try:
        assert ok.latest("cam0", timeout=5) is not None  # the publisher is really publishing
        counts = [_received(s, QUIET) for s in refused]
        assert _received(ok, 0.3) > 0  # ... all the while
        assert counts == [0, 0, 0]
    finally:
        for s in (ok, *refused):
            s.close()


def test_server_key_pair_is_trusted_as_a_client(keys, curve_pub):
    # What the supervisor (and a --show window) use to subscribe to their own tracker.
    with Subscriber(curve_pub.endpoint, curve=_server(keys).as_client()) as sub:
        assert sub.latest("cam0", timeout=5) is not None


# -------------------------------------------------------------------- control


def test_authorised_control_client_gets_answers(keys, curve_control):
    with ControlClient(curve_control.endpoint, timeout=5, curve=_client(keys, keys)) as client:
        assert client.status() == {"ok": True, "frames": 7}


def test_unauthorised_control_client_times_out_naming_authentication(keys, other_keys, curve_control):
    with ControlClient(curve_control.endpoint, timeout=0.5, curve=_client(keys, other_keys)) as c:
        with pytest.raises(ControlTimeout, match="--curve-clients") as e:
            c.status()
    assert "\n" not in str(e.value)
    with ControlClient(curve_control.endpoint, timeout=0.5) as plain:
        with pytest.raises(ControlTimeout, match="CURVE"):
            plain.status()
    assert curve_control.handled == 0


# --------------------------------------------------------------- authenticator


def test_authenticator_is_shared_and_stopped_with_its_sockets(keys, other_keys):
    ctx = zmq.Context()
    try:
        pub = Publisher(ANY_PORT, curve=_server(keys), context=ctx)
        server = ControlServer(ANY_PORT, _Handler(), curve=_server(keys), context=ctx)
        # One ZAP handler per context: a different key set in the same context is refused ...
        with pytest.raises(UserError, match="zmq.Context"):
            Publisher(ANY_PORT, curve=_server(other_keys), context=ctx)
        pub.close()
        server.close()
        # ... until the last socket using the first one is closed.
        with Publisher(ANY_PORT, curve=_server(other_keys), context=ctx) as again:
            assert again.endpoint.startswith("tcp://127.0.0.1:")
    finally:
        ctx.term()


# ------------------------------------------------------------------ bad input


def _one_line(exc: BaseException) -> str:
    msg = str(exc)
    assert msg and "\n" not in msg
    return msg


def test_bad_key_files_are_one_line_errors_naming_the_file(keys, tmp_path):
    garbage = tmp_path / "garbage.key_secret"
    garbage.write_text("not a certificate\n")
    bad_key = tmp_path / "short.key_secret"
    bad_key.write_text('curve\n    public-key = "abc"\n    secret-key = "def"\n')
    missing = tmp_path / "missing.key_secret"
    cases = [
        (CurveServer(str(missing), str(keys / "clients")), missing),
        (CurveServer(str(garbage), str(keys / "clients")), garbage),
        (CurveServer(str(bad_key), str(keys / "clients")), bad_key),
        (CurveServer(str(keys / "server.key"), str(keys / "clients")), keys / "server.key"),
        (CurveServer(str(keys / "server.key_secret"), str(tmp_path / "nope")), tmp_path / "nope"),
        (CurveServer(str(keys / "server.key_secret"), str(tmp_path)), tmp_path),  # no *.key
        (CurveClient(str(missing), str(keys / "client.key_secret")), missing),
        (CurveClient(str(keys / "server.key"), str(keys / "client.key")), keys / "client.key"),
    ]
    for setting, named in cases:
        with pytest.raises(UserError) as e:
            setting.load()
        assert str(named) in _one_line(e.value), setting
    with pytest.raises(UserError, match=str(garbage)):
        Publisher(ANY_PORT, curve=CurveServer(str(garbage), str(keys / "clients")))
    with pytest.raises(UserError, match=str(missing)):
        ControlClient(ANY_PORT.replace(":0", ":1"), curve=CurveClient(str(missing), str(garbage)))


def test_key_paths_of_the_wrong_kind_say_what_they_are(keys, tmp_path, capsys, monkeypatch):
    """A folder given as a key file was "no such file", a file as the clients folder "no such
    folder"; `streamtrack keys "$DIR"` with DIR unset wrote secret keys into the current folder."""
    cases = [(CurveServer(str(keys), str(keys / "clients")), "is a directory, not a file"),
             (CurveServer(str(keys / "server.key_secret"), str(keys / "server.key")), "a file, not a folder"),
             (CurveServer(str(keys / "server.key_secret"), str(tmp_path / "nope")), "no such folder"),
             (CurveServer(str(keys / "server.key_secret"), ""), "CURVE clients folder: empty path"),
             (CurveClient(str(keys), str(keys / "client.key_secret")), "is a directory, not a file")]
    for setting, said in cases:
        with pytest.raises(UserError) as e:
            setting.load()
        assert said in _one_line(e.value), setting
    monkeypatch.chdir(tmp_path)
    assert cli.main(["keys", ""]) == 2
    assert capsys.readouterr().err.strip() == ("streamtrack: error: key folder: empty path "
                                               "(name the folder the keys go in)")
    assert list(tmp_path.iterdir()) == []


def test_libzmq_without_curve_is_a_one_line_error(monkeypatch, keys):
    monkeypatch.setattr(zmq, "has", lambda capability: False)
    with pytest.raises(UserError, match="CURVE") as e:
        _server(keys).load()
    _one_line(e.value)


@pytest.mark.parametrize("argv", [
    ["subscribe", "tcp://127.0.0.1:1", "--curve-server-key", "{missing}", "--curve-secret",
     "{keys}/client.key_secret"],
    ["view", "tcp://127.0.0.1:1", "--curve-server-key", "{keys}/server.key", "--curve-secret",
     "{missing}"],
    ["run", "{keys}/no-video.mp4", "--box", "1,1,5,5", "--publish", "tcp://127.0.0.1:0",
     "--curve-secret", "{missing}", "--curve-clients", "{keys}/clients"],
])
def test_cli_bad_key_file_exits_2_naming_it(argv, keys, tmp_path, capsys):
    missing = tmp_path / "missing.key"
    argv = [a.format(keys=keys, missing=missing) for a in argv]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(missing) in err


def test_cli_needs_both_halves(keys, capsys):
    assert cli.main(["subscribe", "tcp://127.0.0.1:1", "--curve-secret",
                     str(keys / "client.key_secret")]) == 2
    assert "--curve-server-key" in capsys.readouterr().err
    assert cli.main(["run", str(keys / "x.mp4"), "--box", "1,1,5,5",
                     "--curve-secret", str(keys / "server.key_secret")]) == 2
    assert "curve_clients" in capsys.readouterr().err


def test_config_keys_reach_the_run(keys, tmp_path, caplog):
    f = tmp_path / "secure.yaml"
    f.write_text(f"curve_secret: {keys / 'server.key_secret'}\ncurve_clients: {keys / 'clients'}\n")
    run = RunConfig.from_config(load_config(str(f), {"publish": "tcp://127.0.0.1:0"}, {}), "clip.mp4", {})
    assert run.curve == _server(keys)
    # Keys for sockets the run does not open (a shared config, a local job): said, not silent.
    with caplog.at_level("WARNING", logger="streamtrack.cli_run"):
        assert cli.main(["run", str(tmp_path / "missing.mp4"), "--box", "1,1,5,5", "--config", str(f)]) == 2
    assert [r.getMessage() for r in caplog.records] == [
        "--curve-secret/--curve-clients secure --publish and --control; this run opens neither, so they "
        "are not used"]
    assert RunConfig.from_config(load_config(None, {}, {}), "clip.mp4", {}).curve is None
    assert curve.server_from_options(None, None) is None


# ------------------------------------------------------------- tracker wiring


class _NoObjects:
    """Stands in for the SAM 2 engine: the transport around it is under test."""

    object_ids: list[int] = []

    def launch(self, image, prompts, timestamp=None) -> FrameOutput:
        t = time.time()
        return FrameOutput(frame_idx=0, width=image.shape[1], height=image.shape[0], objects=(),
                           infer_start=t, infer_end=t)

    def finish(self, launched: FrameOutput) -> FrameOutput:
        return launched

    def state_bytes(self) -> int:
        return 0


def test_tracker_publishes_and_answers_only_authorised_clients(keys, other_keys, tmp_path):
    video = write_video(make_clip(8, 64, 48, num_objects=1).frames, tmp_path / "clip.mp4")
    config = RunConfig(source=str(video), publish=ANY_PORT, control=ANY_PORT, realtime=True,
                       loop=True, progress=False, curve=_server(keys))
    bound: dict = {}
    tracker = Tracker(config, engine=_NoObjects(),
                      notify=lambda kind, data: bound.update(data) if kind == "bound" else None)
    t = threading.Thread(target=tracker.run, daemon=True)
    t.start()
    try:
        deadline = time.monotonic() + 10
        while "publish" not in bound and time.monotonic() < deadline:
            time.sleep(0.01)
        with Subscriber(bound["publish"], curve=_client(keys, keys)) as ok, \
                Subscriber(bound["publish"], curve=_client(keys, other_keys)) as refused:
            assert ok.latest("cam0", timeout=5) is not None
            assert _received(refused, QUIET) == 0
        with ControlClient(bound["control"], timeout=5, curve=_client(keys, keys)) as client:
            assert client.status()["ok"] is True
    finally:
        tracker.stop()
        t.join(10)
    assert not t.is_alive()


def test_supervisor_subscribes_with_the_server_key_pair(keys, curve_pub):
    config = RunConfig(source="unused.mp4", publish=curve_pub.endpoint, curve=_server(keys))
    sub = Supervisor(config)._subscribe(config)
    try:
        assert sub.latest("cam0", timeout=5) is not None
    finally:
        sub.close()


def test_show_window_gets_the_curve_options(keys):
    cmd = viewer_command("tcp://127.0.0.1:5555", curve=_server(keys).as_client())
    i = cmd.index("--curve-secret")
    assert cmd[i + 1] == str(keys / "server.key_secret")
    assert cmd[cmd.index("--curve-server-key") + 1] == str(keys / "server.key_secret")
