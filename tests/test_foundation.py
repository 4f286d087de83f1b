"""Install, CLI, model registry, checkpoint loading and the image-size override."""

from __future__ import annotations

import errno
import os
import pickle
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import streamtrack
from streamtrack.cli import main
from streamtrack.download import download_checkpoint
from streamtrack.errors import CheckpointError, DownloadError, UserError
from streamtrack.models import MODELS, build_model, get_spec, load_checkpoint


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "streamtrack", *args], capture_output=True, text=True, timeout=120
    )


def test_help_and_version():
    r = run_cli("--help")
    assert r.returncode == 0 and "download" in r.stdout
    r = run_cli("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"streamtrack {streamtrack.__version__}"


def test_console_script_installed():
    # The entry point pip installed next to this interpreter (the venv need not be on PATH).
    script = Path(sys.executable).parent / "streamtrack"
    r = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


def test_registry_is_complete():
    import sam2

    sam2_dir = sam2.__path__[0]
    sizes = ("tiny", "small", "base_plus", "large")
    expected = {f"{fam}_hiera_{s}" for fam in ("sam2", "sam2.1") for s in sizes}
    assert set(MODELS) == expected
    for spec in MODELS.values():
        # The hydra config ships with the installed sam2 package and describes a SAM2Base.
        with open(f"{sam2_dir}/{spec.config}") as f:
            assert yaml.safe_load(f)["model"]["_target_"] == "sam2.modeling.sam2_base.SAM2Base"
        assert spec.url.startswith("https://dl.fbaipublicfiles.com/segment_anything_2/")
        assert spec.url.endswith(f"/{spec.name}.pt")
    with pytest.raises(UserError, match="unknown model"):
        get_spec("sam3")


def test_checkpoint_round_trip(tiny_checkpoint):
    a = build_model("sam2.1_hiera_tiny", tiny_checkpoint)
    saved = torch.load(tiny_checkpoint, weights_only=True)["model"]
    for k, v in a.state_dict().items():
        assert torch.equal(v, saved[k]), k
    # A differently seeded model differs, so the load above did something.
    b = build_model("sam2.1_hiera_tiny", random_init=True)
    assert not torch.equal(
        a.state_dict()["obj_ptr_proj.layers.0.weight"], b.state_dict()["obj_ptr_proj.layers.0.weight"]
    )


@pytest.fixture(scope="module")
def tiny_model():
    return build_model("sam2.1_hiera_tiny", random_init=True)


def _bad(tmp_path, tiny_checkpoint, case: str):
    path = tmp_path / f"{case}.pt"
    state = torch.load(tiny_checkpoint, weights_only=True)["model"]
    if case == "missing":
        state.pop("no_mem_embed")
        torch.save({"model": state}, path)
    elif case == "unexpected":
        state["extra.weight"] = torch.zeros(3)
        torch.save({"model": state}, path)
    elif case == "shape":
        state["no_mem_embed"] = torch.zeros(1, 1, 7)
        torch.save({"model": state}, path)
    elif case == "unnamed":  # keys a crafted file may hold: unsortable with each other
        state.update({5: torch.zeros(1), (1, 2): torch.zeros(1), "extra.weight": torch.zeros(3)})
        torch.save({"model": state}, path)
    elif case == "scalar_embed":  # what tells the model sizes apart, as a 0-dim tensor
        state["image_encoder.trunk.patch_embed.proj.weight"] = torch.tensor(1.0)
        torch.save({"model": state}, path)
    elif case == "nan":
        state["sam_mask_decoder.iou_token.weight"][0, 3] = float("nan")
        torch.save({"model": state}, path)
    elif case == "plain_pickle":
        with open(path, "wb") as f:
            pickle.dump({"model": {}}, f, protocol=4)
    elif case == "not_official":
        torch.save(state, path)  # a bare state dict, no "model" key
    elif case == "not_checkpoint":
        path.write_text("this is not a checkpoint\n")
    elif case == "truncated":
        data = tiny_checkpoint.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif case == "random_bytes":
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    elif case == "directory":
        path.mkdir()
    elif case == "nonexistent":
        pass
    elif case == "pipe":
        os.mkfifo(path)
    return path


@pytest.mark.parametrize(
    "case,message",
    [
        ("missing", "1 missing keys .*no_mem_embed"),
        ("unexpected", "1 unexpected keys .*extra.weight"),
        ("shape", "wrong shape .*no_mem_embed"),
        ("unnamed", r"2 keys that are not parameter names \(e.g. 5\); 1 unexpected keys"),
        ("scalar_embed", r"wrong shape \(e.g. image_encoder.trunk.patch_embed.proj.weight \(\) != "),
        ("nan", r"is unusable: 1 tensors hold NaN or infinite values \(e.g. sam_mask_decoder.iou_token"),
        ("plain_pickle", r"not a readable PyTorch checkpoint \(not a zip archive as torch.save writes"),
        ("not_official", "not in the official format"),
        # torch's own words would be "(101)", or advice to load unsafely: not passed on.
        ("not_checkpoint", r"not a readable PyTorch checkpoint \(not a zip archive as torch.save writes"),
        ("random_bytes", r"not a readable PyTorch checkpoint \(not a zip archive as torch.save writes"),
        ("truncated", r"not a readable PyTorch checkpoint \(the archive is cut short"),
        ("directory", "is a directory, not a file"),
        ("nonexistent", "no such file"),
        ("pipe", r"is not a regular file \(a checkpoint is read by seeking in it\)"),
    ],
)
def test_bad_checkpoint_refused(tmp_path, tiny_checkpoint, tiny_model, case, message):
    path = _bad(tmp_path, tiny_checkpoint, case)
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        with pytest.raises(CheckpointError, match=message) as info:
            load_checkpoint(tiny_model, path, "sam2.1_hiera_tiny")
    assert [str(w.message) for w in warned] == []  # the one line is all the user sees
    text = str(info.value)
    assert "sam2.1_hiera_tiny" in text and str(path) in text and "\n" not in text


def test_unreadable_checkpoint_is_one_line(tmp_path, monkeypatch):
    """No permission to read it (not testable with chmod here: the tests may run as root)."""
    import builtins

    from streamtrack.models import read_state_dict

    path = tmp_path / "locked.pt"
    path.write_bytes(b"PK\x03\x04")
    real_open = builtins.open

    def deny(file, *args, **kwargs):
        if str(file) == str(path):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", deny)
    monkeypatch.setattr(torch, "load", lambda *a, **k: deny(path))
    with pytest.raises(CheckpointError, match=r"is not a readable PyTorch checkpoint \(Permission denied\)"):
        read_state_dict(path, "sam2.1_hiera_tiny")


def test_checkpoint_of_another_model_refused(checkpoint_factory, tiny_model):
    small = checkpoint_factory("sam2.1_hiera_small")
    with pytest.raises(CheckpointError, match="does not match model sam2.1_hiera_tiny: .*"
                       r"\(it looks like a sam2.1_hiera_small checkpoint: "
                       r"use model sam2.1_hiera_small, --model sam2.1_hiera_small\)$"):
        load_checkpoint(tiny_model, small, "sam2.1_hiera_tiny")


def test_which_model_a_state_dict_is_of():
    from streamtrack.models import _model_of

    for name in ("sam2_hiera_tiny", "sam2.1_hiera_base_plus"):
        assert _model_of(build_model(name, random_init=True).state_dict()) == name
    assert _model_of({"image_encoder.trunk.patch_embed.proj.weight": torch.zeros(3)}) is None


def test_a_state_dict_value_that_is_not_a_tensor_is_refused_by_name(tiny_checkpoint, tiny_model, tmp_path):
    blob = torch.load(tiny_checkpoint, weights_only=True)
    blob["model"]["no_mem_embed"] = [1, 2, 3]
    torch.save(blob, tmp_path / "odd.pt")
    with pytest.raises(CheckpointError, match=r"1 values that are not tensors \(e.g. no_mem_embed is a list"):
        load_checkpoint(tiny_model, tmp_path / "odd.pt", "sam2.1_hiera_tiny")


def test_a_checkpoint_holding_python_objects_is_refused_in_plain_words(tmp_path):
    from streamtrack.models import read_state_dict

    torch.save({"model": {}, "extra": Path("x")}, tmp_path / "objects.pt")
    with pytest.raises(CheckpointError) as info:
        read_state_dict(tmp_path / "objects.pt", "sam2.1_hiera_tiny")
    assert str(info.value).endswith("(it holds Python objects besides tensors, and streamtrack loads "
                                    "checkpoints as data only (weights_only), never as code)")
    assert "\x1b" not in str(info.value)


def test_a_checkpoint_path_given_and_missing_is_a_typo_not_a_download(tmp_path, monkeypatch):
    with pytest.raises(CheckpointError) as info:
        build_model("sam2.1_hiera_tiny", tmp_path / "nope.pt")
    assert str(info.value).startswith(f"checkpoint {tmp_path / 'nope.pt'} not found: check the path")
    assert "--checkpoint FILE" not in str(info.value)
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(CheckpointError, match=f"checkpoint {tmp_path / 'nope.pt'} not found"):
        build_model("sam2.1_hiera_tiny", "~/nope.pt")  # ~ is the user's home, as in a shell


def test_sam2_checkpoint_loads_sam2_model(checkpoint_factory):
    path = checkpoint_factory("sam2_hiera_tiny")
    model = build_model("sam2_hiera_tiny", path, image_size=256)
    assert model.image_size == 256


@pytest.mark.parametrize("size", [256, 512])
def test_image_size_override_feature_sizes(tiny_checkpoint, size):
    model = build_model("sam2.1_hiera_tiny", tiny_checkpoint, image_size=size)
    assert model.image_size == size
    with torch.inference_mode():
        out = model.forward_image(torch.zeros(1, 3, size, size))
        shapes = [tuple(x.shape[-2:]) for x in out["backbone_fpn"]]
        assert shapes == [(size // 4,) * 2, (size // 8,) * 2, (size // 16,) * 2]
        assert model.sam_prompt_encoder.mask_input_size == (size // 4, size // 4)
        # The RoPE memory attention is sized for the new grid.
        attn = model.memory_attention.layers[0].self_attn
        assert attn.freqs_cis.shape[0] == (size // 16) ** 2


def test_bad_image_size():
    with pytest.raises(UserError, match="multiple of 32"):
        build_model("sam2.1_hiera_tiny", random_init=True, image_size=300)


def test_missing_default_checkpoint_is_one_clear_line(tmp_path):
    with pytest.raises(CheckpointError) as info:
        build_model("sam2.1_hiera_tiny", tmp_path / "nope.pt")
    text = str(info.value)
    assert "streamtrack download sam2.1_hiera_tiny" in text and "\n" not in text


def test_download_offline_fails_cleanly(tmp_path):
    with pytest.raises(DownloadError, match="cannot download sam2.1_hiera_tiny") as info:
        download_checkpoint("sam2.1_hiera_tiny", tmp_path, url="http://127.0.0.1:9/nothing.pt", timeout=5)
    assert "save it as" in str(info.value)
    assert list(tmp_path.iterdir()) == []  # no partial file left behind
    # A mistyped URL is not a network problem: no "offline?" then.
    with pytest.raises(DownloadError) as info:
        download_checkpoint("sam2.1_hiera_tiny", tmp_path, url="htps://example.com/x.pt", timeout=5)
    assert str(info.value) == ("cannot download sam2.1_hiera_tiny from htps://example.com/x.pt: unknown url "
                               "type: htps (give an http://, https:// or file:// URL)")


def test_download_names_what_failed_locally_and_refuses_what_is_not_a_url(tmp_path, tiny_checkpoint,
                                                                        monkeypatch):
    import streamtrack.download

    (tmp_path / "file").write_text("x")
    with pytest.raises(DownloadError, match=r"cannot create the folder .*/file/sub for sam2.1_hiera_tiny.pt"):
        download_checkpoint("sam2.1_hiera_tiny", tmp_path / "file" / "sub", url="http://127.0.0.1:9/x.pt")
    with pytest.raises(DownloadError, match="from notaurl: unknown url type"):
        download_checkpoint("sam2.1_hiera_tiny", tmp_path, url="notaurl")
    # a local file that is not there: not "offline?"
    missing = (tmp_path / "missing.pt").as_uri()
    with pytest.raises(DownloadError, match=f"^cannot read sam2.1_hiera_tiny from {missing}: No such file"):
        download_checkpoint("sam2.1_hiera_tiny", tmp_path, url=missing)

    def read_only(*args, **kwargs):  # a read-only folder refuses the unlink of a missing file too
        raise OSError(30, "Read-only file system")

    with monkeypatch.context() as patch:
        patch.setattr(streamtrack.download, "open", read_only, raising=False)
        patch.setattr(Path, "unlink", read_only)
        with pytest.raises(DownloadError, match=r"^cannot write .*tiny.pt.part: Read-only file system$"):
            download_checkpoint("sam2.1_hiera_tiny", tmp_path, url=tiny_checkpoint.as_uri(), progress=False)

    class FullDisk:
        def __init__(self, path, mode):
            self.file = open(path, mode)

        def write(self, data):
            raise OSError(28, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.file, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

    monkeypatch.setattr(streamtrack.download, "open", FullDisk, raising=False)
    with pytest.raises(DownloadError, match=r"^cannot write .*tiny.pt.part: No space left on device$"):
        download_checkpoint("sam2.1_hiera_tiny", tmp_path, url=tiny_checkpoint.as_uri(), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


class _ShortServer:
    """Serves ``/x.pt`` announcing ``length`` bytes and sending ``sent``, then closing (or,
    with ``stall``, keeping the connection open and silent)."""

    def __init__(self, length: int, sent: int, stall: bool = False):
        import http.server
        import threading

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(200)
                self.send_header("Content-Length", str(length))
                self.end_headers()
                self.wfile.write(b"x" * sent)
                self.wfile.flush()
                if stall:
                    time.sleep(30)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/x.pt"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_download_broken_off_and_in_the_way_are_said_as_such(tmp_path):
    server = _ShortServer(length=1000, sent=300)
    try:
        with pytest.raises(DownloadError) as e:
            download_checkpoint("sam2.1_hiera_tiny", tmp_path, url=server.url, progress=False)
    finally:
        server.close()
    # not "the file does not load: try --force", and the way out names this folder
    assert str(e.value).startswith(f"download of sam2.1_hiera_tiny from {server.url} broke off after 300 of "
                                   "1000 bytes; run it again, or check the URL, or download https://")
    assert f"save it as {tmp_path / 'sam2.1_hiera_tiny.pt'}" in str(e.value)
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "sam2.1_hiera_tiny.pt").mkdir()  # --force would download, then fail to rename
    with pytest.raises(DownloadError, match="sam2.1_hiera_tiny.pt is a directory where the checkpoint goes"):
        download_checkpoint("sam2.1_hiera_tiny", tmp_path, url="http://127.0.0.1:9/x.pt", force=True)


def test_a_path_that_cannot_be_looked_at_is_one_line(monkeypatch, tmp_path):
    """As a user other than root meets a folder without x permission (pathlib raises)."""
    from streamtrack.errors import existing_file

    def denied(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "stat", denied)
    with pytest.raises(UserError, match=r"^checkpoint for sam2.1_hiera_tiny .*x.pt: permission denied"):
        build_model("sam2.1_hiera_tiny", tmp_path / "x.pt")
    with pytest.raises(UserError, match=r"^image .*y.png: permission denied"):
        existing_file(tmp_path / "y.png", "image")
    with pytest.raises(UserError, match=r"^checkpoint .*: permission denied"):
        download_checkpoint("sam2.1_hiera_tiny", tmp_path, url="http://127.0.0.1:9/x.pt")


def test_sigterm_during_a_download_leaves_no_part_file(tmp_path):
    import signal

    server = _ShortServer(length=10_000_000, sent=1000, stall=True)
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}
    try:
        proc = subprocess.Popen([sys.executable, "-c", (
            "import sys, pathlib; from streamtrack import models; "
            f"models.CHECKPOINT_DIR = pathlib.Path({str(tmp_path)!r}); "
            "from streamtrack.cli import main; sys.exit(main(sys.argv[1:]))"),
            "download", "sam2.1_hiera_tiny", "--url", server.url, "-q"],
            env=env, stderr=subprocess.PIPE, text=True)
        part = tmp_path / "sam2.1_hiera_tiny.pt.part"
        deadline = time.monotonic() + 60
        while not part.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert part.exists()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 143, proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
        server.close()
    assert list(tmp_path.iterdir()) == []


def test_download_cli_refuses_an_empty_url():
    r = run_cli("download", "sam2.1_hiera_tiny", "--url", "")
    assert r.returncode == 2 and r.stderr.startswith("streamtrack: error: --url: empty")


def test_download_cli_refuses_one_url_for_all_models():
    r = run_cli("download", "all", "--url", "http://127.0.0.1:9/x.pt")
    assert r.returncode == 2 and r.stderr == (
        "streamtrack: error: --url names one file: download one model with it, not 'all'\n")


def test_download_cli_names_an_unknown_model_in_one_line():
    """Without --force the file in place was looked up before the name was checked."""
    for extra in ((), ("--force",)):
        r = run_cli("download", "sam2.1_hiera_tinyy", *extra)
        assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
        assert r.stderr.startswith("streamtrack: error: unknown model 'sam2.1_hiera_tinyy'; choose one of: ")


def test_download_cli_offline_exit_code(tmp_path):
    r = run_cli("download", "sam2.1_hiera_tiny", "--url", "http://127.0.0.1:9/x.pt", "--force")
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert r.stderr.startswith("streamtrack: error: cannot download sam2.1_hiera_tiny")


def test_download_verifies_and_renames(tmp_path, tiny_checkpoint, checkpoint_factory):
    """A served file is checked against the model before it is moved into place."""
    good = download_checkpoint(
        "sam2.1_hiera_tiny", tmp_path, url=tiny_checkpoint.as_uri(), progress=False
    )
    assert good == tmp_path / "sam2.1_hiera_tiny.pt" and good.read_bytes() == tiny_checkpoint.read_bytes()
    wrong = checkpoint_factory("sam2.1_hiera_small").as_uri()
    # `download` has no --model option to advise.
    with pytest.raises(CheckpointError, match=f"^the file from {wrong} does not match model "
                       r"sam2.1_hiera_tiny: .*\(it looks like a sam2.1_hiera_small checkpoint\)$"):
        download_checkpoint("sam2.1_hiera_tiny", tmp_path, url=wrong, force=True, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sam2.1_hiera_tiny.pt"]
    # A file already in place is checked too: one cut short is not "downloaded".
    good.write_bytes(tiny_checkpoint.read_bytes()[:100_000])
    with pytest.raises(DownloadError, match=r"cut short.*`streamtrack download sam2.1_hiera_tiny --force`") \
            as e:
        download_checkpoint("sam2.1_hiera_tiny", tmp_path, progress=False)
    assert str(e.value).count("--force") == 1
    good.write_bytes(checkpoint_factory("sam2.1_hiera_small").read_bytes())
    with pytest.raises(DownloadError, match=r"does not match model .*`streamtrack download sam2.1_hiera_tiny "
                                            r"--force` replaces it$"):
        download_checkpoint("sam2.1_hiera_tiny", tmp_path, progress=False)


def test_models_lists_what_is_in_the_checkpoint_folder(tmp_path, monkeypatch, capsys):
    import streamtrack.models as models

    monkeypatch.setattr(models, "CHECKPOINT_DIR", tmp_path)
    (tmp_path / "sam2.1_hiera_tiny.pt").write_bytes(b"x" * 2**20)  # a copy cut short
    (tmp_path / "sam2.1_hiera_small.pt").mkdir()  # `download` refuses to replace it
    assert main(["models"]) == 0
    lines = capsys.readouterr().out.splitlines()
    said = {line.split()[0]: line.split("downloaded: ", 1)[1] for line in lines}
    assert said["sam2.1_hiera_tiny"] == "incomplete? (1 of ~149 MB)"
    small = tmp_path / "sam2.1_hiera_small.pt"
    assert said["sam2.1_hiera_small"] == f"no (a directory is in its place: {small})"
    assert said["sam2.1_hiera_large"] == "no"


def test_main_without_command_prints_help(capsys):
    assert main([]) == 2
    assert "usage: streamtrack" in capsys.readouterr().out



def test_checkpoints_go_to_the_checkout_or_else_the_users_cache(tmp_path, monkeypatch):
    """An installed package would otherwise download into site-packages/checkpoints."""
    from streamtrack.models import CHECKPOINT_DIR, default_checkpoint_dir

    assert CHECKPOINT_DIR == Path(__file__).resolve().parent.parent / "checkpoints"  # this checkout
    installed = tmp_path / "site-packages" / "streamtrack" / "models.py"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert default_checkpoint_dir(str(installed)) == tmp_path / "cache" / "streamtrack" / "checkpoints"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    home_cache = tmp_path / "home" / ".cache"
    assert default_checkpoint_dir(str(installed)) == home_cache / "streamtrack" / "checkpoints"
    monkeypatch.setenv("XDG_CACHE_HOME", "cache")  # relative: the XDG spec says to ignore it
    assert default_checkpoint_dir(str(installed)) == home_cache / "streamtrack" / "checkpoints"


def test_download_cli_says_a_file_in_place_was_kept(tmp_path, monkeypatch, capsys, tiny_checkpoint):
    """A valid file in place is not fetched again: a --url meant to replace it is named."""
    from streamtrack import models

    monkeypatch.setattr(models, "CHECKPOINT_DIR", tmp_path)
    url = tiny_checkpoint.as_uri()
    assert main(["download", "sam2.1_hiera_tiny", "--url", url, "-q"]) == 0
    assert capsys.readouterr().out == f"sam2.1_hiera_tiny: {tmp_path / 'sam2.1_hiera_tiny.pt'}\n"
    assert main(["download", "sam2.1_hiera_tiny", "--url", url, "-q"]) == 0
    assert capsys.readouterr().out == (
        f"sam2.1_hiera_tiny: {tmp_path / 'sam2.1_hiera_tiny.pt'} (already there and verified; "
        "--force fetches it again from --url)\n")


@pytest.mark.parametrize("module, raises, command, expected", [
    # at start-up (every command needs pyzmq)
    ("zmq", "raise ModuleNotFoundError(\"No module named 'zmq'\", name='zmq')", ["models"],
     "streamtrack: error: missing dependency 'zmq' (No module named 'zmq'): pip install pyzmq"),
    # in a command (segment loads OpenCV)
    ("cv2", "raise ImportError('libGL.so.1: cannot open shared object file: No such file or directory')",
     ["segment", "x.png", "--box", "1,1,5,5", "--out", "o.png"],
     "streamtrack: error: a system library is missing: libGL.so.1: cannot open shared object file"),
])
def test_a_missing_dependency_is_one_line(tmp_path, module, raises, command, expected):
    """A package not installed, or OpenCV without the system's libGL: one line, exit 2."""
    (tmp_path / f"{module}.py").write_text(raises + "\n")
    r = subprocess.run([sys.executable, "-m", "streamtrack", *command], capture_output=True, text=True,
                       timeout=120, env={**os.environ, "PYTHONPATH": os.pathsep.join(
                           [str(tmp_path), os.environ.get("PYTHONPATH", "")])})
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(expected), r.stderr


def test_an_import_error_of_our_own_is_a_traceback():
    from streamtrack.errors import missing_dependency

    assert missing_dependency(ModuleNotFoundError("x", name="streamtrack.nothing")) is None
    assert missing_dependency(ImportError("cannot import name 'x' from partially initialized")) is None


@pytest.mark.parametrize("argv, said", [
    (["run", "x.mp4", "--image-size", "abc"],
     "streamtrack run: error: argument --image-size: invalid int value: 'abc' (streamtrack run --help lists"),
    (["bench", "engine", "--frames", "many"],
     "streamtrack bench: error: argument --frames: invalid int value"),
    (["track", "x.mp4"], "streamtrack: error: argument COMMAND: invalid choice: 'track'"),
    (["run", "@{missing}"],
     "streamtrack run: error: cannot read the @FILE of arguments: No such file or directory"),
])
def test_a_mistyped_option_is_one_line_not_the_usage_block(argv, said, capsys, tmp_path):
    with pytest.raises(SystemExit) as exited:
        main([a.format(missing=tmp_path / "args.txt") for a in argv])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(said), err


@pytest.mark.parametrize("raised, said", [
    (OSError(errno.EMFILE, "Too many open files"),
     r"^streamtrack: error: too many open files \(this process may open \d+: raise it with `ulimit -n`\)$"),
    (RuntimeError("can't start new thread"),
     r"^streamtrack: error: cannot start a thread \(the process limit, `ulimit -u`, or memory\)$"),
    (BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable"),
     r"^streamtrack: error: cannot start a process or thread: Resource temporarily unavailable"),
])
def test_a_limit_of_the_machine_reached_is_one_line_not_a_traceback(monkeypatch, capsys, raised, said):
    """A low `ulimit -n` or `-u` ended runs with a supervisor's traceback."""
    import re

    from streamtrack import cli

    def command(args):
        raise raised

    monkeypatch.setattr(cli, "_cmd_models", command)
    assert cli.main(["models"]) == 1
    err = capsys.readouterr().err
    assert re.match(said, err.strip()) and err.count("\n") == 1, err


def test_other_errors_of_the_system_are_not_taken_for_a_limit(monkeypatch):
    from streamtrack import cli

    def command(args):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(cli, "_cmd_models", command)
    with pytest.raises(OSError, match="Input/output error"):
        cli.main(["models"])
