"""Layered configuration: defaults < YAML < environment < command line."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from streamtrack.config import CONFIG_DIR, Config, load_config, load_yaml
from streamtrack.errors import UserError


def test_default_yaml_documents_the_defaults():
    # configs/default.yaml is the commented reference: it must equal the built-in defaults.
    assert load_config("default", {}, {}) == Config()


@pytest.mark.parametrize("preset", sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
def test_every_preset_loads(preset):
    assert isinstance(load_config(preset, {}, {}), Config)


def test_layers_in_order(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("image_size: 512\ndevice: cpu\nstream: fromfile\nlost_after: 4\n")
    env = {"STREAMTRACK_IMAGE_SIZE": "384", "STREAMTRACK_STREAM": "fromenv", "OTHER": "x"}
    cfg = load_config(str(f), {"image_size": 256}, env)
    assert cfg.image_size == 256  # command line beats environment and file
    assert cfg.stream == "fromenv"  # environment beats file
    assert cfg.device == "cpu"  # file beats defaults
    assert cfg.lost_after == 4.0 and isinstance(cfg.lost_after, float)
    assert cfg.model == Config().model  # untouched default


def test_config_file_from_environment(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("max_frames: 7\n")
    assert load_config(None, {}, {"STREAMTRACK_CONFIG": str(f)}).max_frames == 7


@pytest.mark.parametrize("text", ["", "# all defaults\n", "---\n# image_size: 64\n", "---\n...\n"])
def test_a_config_file_with_no_settings_is_the_defaults(tmp_path, text):
    """A template with every key commented out, after YAML's "---" too."""
    f = tmp_path / "c.yaml"
    f.write_text(text)
    assert load_config(str(f), {}, {}) == Config()


def test_a_home_folder_in_a_config_files_paths_is_expanded(tmp_path, monkeypatch):
    """As a shell does on the command line (and fleet files do): not a folder named "~"."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    f = tmp_path / "c.yaml"
    f.write_text("save_jsonl: ~/runs/out.jsonl\nsave_video: ~/o.mp4\nsave_masks: ~/m\ncheckpoint: ~/t.pt\n"
                 "curve_secret: ~/keys/server.key_secret\n")
    cfg = load_config(str(f), {}, {})
    home = str(tmp_path / "home")
    assert (cfg.save_jsonl, cfg.save_video, cfg.save_masks, cfg.checkpoint, cfg.curve_secret) == (
        f"{home}/runs/out.jsonl", f"{home}/o.mp4", f"{home}/m", f"{home}/t.pt",
        f"{home}/keys/server.key_secret")
    assert load_config(None, {}, {"STREAMTRACK_SAVE_JSONL": "-"}).save_jsonl == "/dev/stdout"


def test_environment_values_are_parsed():
    env = {"STREAMTRACK_SHOW": "yes", "STREAMTRACK_GIVE_UP_AFTER": "none", "STREAMTRACK_REALTIME": "0"}
    cfg = load_config(None, {}, env)
    assert cfg.show is True and cfg.give_up_after is None and cfg.realtime is False


@pytest.mark.parametrize(
    "yaml_text,message",
    [
        ("imag_size: 256\n", "unknown key 'imag_size'"),
        ("image_size: big\n", "image_size must be int"),
        ("show: 3\n", "show must be bool"),
        ("image_size: true\n", "image_size must be int"),
        ("model: null\n", "model cannot be null .it always has a value; the default is 'sam2.1_hiera_tiny'."),
        ("- a\n- b\n", "expected a mapping"),
        ("a: [\n", "cannot read YAML"),
        ("device: cpu\nimage_size: [256\n", r"cannot read YAML \(.*line 3 column 1\)"),  # where it broke
        ("device: cpu\nimage_size: 256\ndevice: cuda\n", r"key 'device' given twice, line 3 column 1"),
        ("emit: rocket\n", "emit must be one of thread, process, got 'rocket'"),
        ("compile_mode: fast\n", "compile_mode must be one of default, reduce-overhead"),
        ("lost_after: -5\n", "lost_after must be at least 0, got -5.0"),
        ("lost_after: .nan\n", "lost_after must be a finite number, got nan"),
        ("max_frames: 0\n", "max_frames must be at least 1, got 0"),
        ("max_restarts: -1\n", "max_restarts must be at least 0"),
        ("max_objects: 0\n", "max_objects must be at least 1"),
        ("queue_depth: 0\n", "queue_depth must be at least 1"),
        ("give_up_after: -2\n", r"give_up_after must be more than 0 \(null: never\), got -2.0"),
        ("stale_after: -1\n", r"stale_after must be more than 0 \(null: never\), got -1.0"),
        ("reconnect_max: -1\n", "reconnect_max must be more than 0, got -1.0"),
        ("give_up_after: 0\n", r"give_up_after must be more than 0 \(null: never\), got 0.0"),
        ("stale_after: 0\n", "stale_after must be more than 0"),
        ("reconnect_max: 0\n", "reconnect_max must be more than 0, got 0.0"),
        ("hang_timeout: 1\n", r"hang_timeout must be 0 or null \(never\) or at least 2 s"),
        ("start_timeout: -1\n", "start_timeout must be at least 0, got -1.0"),
        ("curve_secret: ''\n", r"curve_secret is empty \(null turns it off\)"),
        ("publish: ' '\n", r"publish is empty \(null turns it off\)"),
        ("image_size: ''\n", r"image_size is empty \(null turns it off\)"),
        ("stream: ''\n", "stream is empty"),
        ("stream: a/b\n", "invalid stream name 'a/b'"),
        ("control: foo\n", "invalid endpoint 'foo'"),
        ("device: cuda:x\n", r"device must be auto, cpu, cuda\[:N\] or mps, got 'cuda:x'"),
        ("device: 'cuda:'\n", r"device must be auto, cpu, cuda\[:N\] or mps, got 'cuda:'"),
        ("image_size: 100\n", "image size must be a multiple of 32 from 64 to 2048, got 100"),
        ("device: gpu\n", r"device must be auto, cpu, cuda\[:N\] or mps, got 'gpu'"),
    ],
)
def test_bad_yaml_names_the_key(tmp_path, yaml_text, message):
    f = tmp_path / "bad.yaml"
    f.write_text(yaml_text)
    with pytest.raises(UserError, match=message) as info:
        load_config(str(f), {}, {})
    assert str(f) in str(info.value)


def test_bad_environment_names_the_variable():
    with pytest.raises(UserError, match="environment STREAMTRACK_SHOW: show must be true or false"):
        load_config(None, {}, {"STREAMTRACK_SHOW": "maybe"})
    with pytest.raises(UserError, match="environment STREAMTRACK_IMAGE_SIZE: image size must be a multiple"):
        load_config(None, {}, {"STREAMTRACK_IMAGE_SIZE": "100"})


def test_a_variable_with_the_prefix_that_is_no_setting_is_a_warning(caplog):
    """Wrapper scripts use STREAMTRACK_ names too; a typo still shows."""
    with caplog.at_level("WARNING", logger="streamtrack.config"):
        cfg = load_config(None, {}, {"STREAMTRACK_HOME": "/opt/x", "STREAMTRACK_IMAGE_SIZE": "128"})
    assert cfg.image_size == 128
    assert [r.getMessage().split(":")[0] for r in caplog.records] == ["environment STREAMTRACK_HOME"]


def test_an_empty_variable_is_an_error_and_null_unsets_a_key():
    """`STREAMTRACK_CURVE_SECRET=$KEY` with KEY unset must not turn off the encryption the
    config file asked for, nor a key that cannot be off stop the run with a type error."""
    cfg = load_config(None, {}, {"STREAMTRACK_CHECKPOINT": "null", "STREAMTRACK_GIVE_UP_AFTER": " none",
                                 "STREAMTRACK_HANG_TIMEOUT": "NULL"})
    assert cfg.checkpoint is None and cfg.give_up_after is None and cfg.hang_timeout is None
    for key, off in (("curve_secret", True), ("start_timeout", True), ("model", False),
                     ("lost_after", False), ("realtime", False), ("save_jsonl", True)):
        name = "STREAMTRACK_" + key.upper()
        with pytest.raises(UserError) as e:
            load_config(None, {}, {name: ""})
        hint = "(null turns it off; unset" if off else "(unset"
        assert str(e.value).startswith(f"environment {name}: {key} is ") and hint in str(e.value)
        assert "unset the variable to keep the value below it)" in str(e.value)


def test_an_empty_option_is_an_error_not_off():
    """An unset shell variable (--curve-secret "$KEY") taken for "off" would run a service
    unencrypted, or publishing nothing, unseen; null says "off"."""
    for key in ("curve_secret", "curve_clients", "publish", "control", "checkpoint", "stream"):
        with pytest.raises(UserError, match=f"option --{key.replace('_', '-')}: {key} is empty"):
            load_config(None, {key: ""}, {})
    with pytest.raises(UserError, match="option --config: empty"):
        load_config("", {}, {})
    assert load_config(None, {"publish": "null", "curve_secret": "none"}, {}).publish is None


def test_an_empty_config_variable_is_an_error_not_the_defaults():
    """`STREAMTRACK_CONFIG=$CFG` with CFG unset would run on the built-in defaults unseen
    (perhaps without the encryption the file sets), as `--config ""` would."""
    with pytest.raises(UserError, match=r"^environment STREAMTRACK_CONFIG: empty .*unset the variable"):
        load_config(None, {}, {"STREAMTRACK_CONFIG": " "})
    assert load_config("default", {}, {"STREAMTRACK_CONFIG": ""}) == Config()  # --config wins


@pytest.mark.parametrize("key", ["curve_secret", "save_jsonl", "image_size", "model"])
def test_a_yaml_key_left_blank_is_an_error_and_null_turns_it_off(tmp_path, key):
    """YAML reads `curve_secret:` with nothing after it as null: taken for "off", a file
    whose value was left out would run unencrypted, or write no results, unseen."""
    f = tmp_path / "c.yaml"
    f.write_text(f"publish: tcp://127.0.0.1:5555\n{key}:\n")
    with pytest.raises(UserError, match=f"^config {f}: {key} is "):
        load_config(str(f), {}, {})
    f.write_text(f"{key}: ~\nmax_frames: null\n" if key != "model" else "max_frames: null\n")
    assert load_config(str(f), {}, {}).max_frames is None


def test_a_bare_port_or_a_numeric_stream_name_in_yaml_is_taken_as_text(tmp_path):
    """As on the command line (`--publish 5555`, `--stream 7`): YAML reads them as numbers."""
    f = tmp_path / "c.yaml"
    f.write_text("publish: 5555\ncontrol: 5556\nstream: 7\n")
    cfg = load_config(str(f), {}, {})
    assert (cfg.publish, cfg.control, cfg.stream) == ("5555", "5556", "7")
    f.write_text("checkpoint: 5\n")  # a path is not a number
    with pytest.raises(UserError, match="checkpoint must be str, got 5"):
        load_config(str(f), {}, {})


def test_the_command_line_undoes_what_a_config_file_set(tmp_path):
    """The command line is the top layer for flags and optional numbers too."""
    import subprocess
    import sys

    import yaml

    f = tmp_path / "on.yaml"
    f.write_text("realtime: true\nloop: true\nshow: true\npublish_frames: true\ngive_up_after: 30\n"
                 "max_frames: 100\nimage_size: 512\nmax_restarts: 3\nhang_timeout: 60\n")
    r = subprocess.run([sys.executable, "-m", "streamtrack", "run", "x.mp4", "--config", str(f),
                        "--no-realtime", "--no-loop", "--no-show", "--no-publish-frames",
                        "--give-up-after", "null", "--max-frames", "None", "--image-size", "null",
                        "--max-restarts", "null", "--hang-timeout", "NULL", "--print-config"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    got = yaml.safe_load(r.stdout)
    assert [got[k] for k in ("realtime", "loop", "show", "publish_frames")] == [False] * 4
    assert [got[k] for k in ("give_up_after", "max_frames", "image_size", "max_restarts",
                             "hang_timeout")] == [None] * 5
    r = subprocess.run([sys.executable, "-m", "streamtrack", "run", "x.mp4", "--lost-after", "null",
                        "--print-config"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and ("option --lost-after: lost_after cannot be null "
                                  "(it always has a value; the default is 3.0)") in r.stderr


def test_a_dash_for_the_results_file_is_stdout_in_every_layer(tmp_path):
    """`--save-jsonl -`, as most tools take it: not a file named "-" in the working folder."""
    f = tmp_path / "c.yaml"
    f.write_text("save_jsonl: '-'\n")
    assert load_config(str(f), {}, {}).save_jsonl == "/dev/stdout"
    assert load_config(None, {}, {"STREAMTRACK_SAVE_JSONL": "-"}).save_jsonl == "/dev/stdout"
    assert load_config(None, {"save_jsonl": " - "}, {}).save_jsonl == "/dev/stdout"
    assert load_config(None, {"save_jsonl": "-.jsonl"}, {}).save_jsonl == "-.jsonl"


def test_a_folder_named_like_a_preset_does_not_hide_it(tmp_path, monkeypatch):
    """`--save-masks webcam` leaves a webcam/ folder; `--config webcam` still means the preset."""
    (tmp_path / "webcam").mkdir()
    monkeypatch.chdir(tmp_path)
    assert load_config("webcam", {}, {}) == load_config(str(CONFIG_DIR / "webcam.yaml"), {}, {})
    with pytest.raises(UserError, match="is a directory"):
        load_config("./webcam", {}, {})  # a path, not a name


def test_a_compile_mode_shows_compile_on_as_the_engine_takes_it():
    assert load_config(None, {"compile_mode": "max-autotune"}, {}).compile is True
    assert load_config(None, {}, {}).compile is False


def test_a_config_named_by_the_environment_says_so():
    with pytest.raises(UserError, match=r"config \(environment STREAMTRACK_CONFIG\) 'nope' not found"):
        load_config(None, {}, {"STREAMTRACK_CONFIG": "nope"})


def test_a_cuda_device_this_machine_lacks_is_one_line(monkeypatch):
    import torch

    from streamtrack.models import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(UserError, match=r"device 'cuda:3' requested but this machine has 1 CUDA device\(s\)"):
        resolve_device("cuda:3")
    with pytest.raises(UserError, match="device must be auto, cpu"):
        resolve_device("cuda:-1")


def test_config_given_twice_is_refused():
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "streamtrack", "run", "x.mp4", "--config", "webcam",
                        "--config", "file", "--print-config"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--config given twice" in r.stderr


def test_missing_config_lists_presets():
    with pytest.raises(UserError, match="not found .*webcam"):
        load_config("no-such-config", {}, {})


def test_a_config_from_a_pipe_is_read(tmp_path):
    """--config <(...) gives /dev/fd/N, a pipe: read, not taken for a preset's name."""
    import os
    import threading

    fifo = tmp_path / "config.yaml"
    os.mkfifo(fifo)
    writer = threading.Thread(target=fifo.write_text, args=("image_size: 64\n",), daemon=True)
    writer.start()
    assert load_config(str(fifo), {}, {}).image_size == 64
    writer.join(5)


def test_a_directory_or_binary_file_as_config_is_one_clear_line(tmp_path):
    with pytest.raises(UserError, match=f"config {tmp_path} is a directory, not a YAML file"):
        load_config(str(tmp_path), {}, {})
    binary = tmp_path / "model.pt"
    binary.write_bytes(b"PK\x03\x04\xfd\xff" * 10)
    with pytest.raises(UserError, match=f"config {binary} is not a text file \\(byte 4 is not UTF-8\\)"):
        load_config(str(binary), {}, {})


def test_launch_ahead_is_a_config_key_that_reaches_the_run(tmp_path):
    from streamtrack.pipeline import RunConfig

    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("launch_ahead: true\n")
    assert RunConfig.from_config(load_config(str(cfg_file), environ={}), "clip.mp4", {}).launch_ahead is True
    assert load_config(environ={"STREAMTRACK_LAUNCH_AHEAD": "true"}).launch_ahead is True
    assert RunConfig.from_config(load_config(environ={}), "clip.mp4", {}).launch_ahead is False


def test_the_config_choices_are_the_stages_own():
    from streamtrack.capture_process import DECODE_MODES
    from streamtrack.compiled import COMPILE_MODES
    from streamtrack.config import CHOICES
    from streamtrack.emitter import EMIT_MODES
    from streamtrack.models import MODELS

    assert CHOICES == {"model": tuple(MODELS), "compile_mode": COMPILE_MODES,
                       "preprocess": ("auto", "exact", "fast"), "emit": EMIT_MODES, "decode": DECODE_MODES}


def test_yaml_merge_keys_still_work(tmp_path):
    f = tmp_path / "anchors.yaml"
    f.write_text("base: &b {a: 1, c: 3}\nother:\n  <<: *b\n  a: 2\n")
    assert load_yaml(f) == {"base": {"a": 1, "c": 3}, "other": {"a": 2, "c": 3}}


def test_a_prompts_file_may_be_a_pipe():
    """`--prompts <(make_prompts)` or /dev/stdin: not a regular file, still readable."""
    import os

    from streamtrack.prompts import load_prompts_file

    r, w = os.pipe()
    os.write(w, b'[{"obj_id": 4, "box": [1, 2, 30, 40]}]')
    os.close(w)
    try:
        prompts = load_prompts_file(f"/dev/fd/{r}")
    finally:
        os.close(r)
    assert [(frame, [p.obj_id for p in ps]) for frame, ps in prompts.items()] == [(0, [4])]


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools
@pytest.mark.parametrize(("entry", "message"), [
    ('{"obj_id": 2, "box": [50, 50, 10, 10]}', r"box \[50.0, 50.0, 10.0, 10.0\] needs finite x0 < x1"),
    ('{"obj_id": 2, "box": [1, 2, NaN, 40]}', "needs finite x0 < x1"),
    ('{"obj_id": 2, "points": [[1, Infinity]]}', "points must be finite numbers"),
    ('{"obj_id": 2, "points": [[1, 2], [3]]}', r"points must be a non-empty list of \[x, y\]$"),
    ('{"obj_id": 2, "box": [true, 2, 30, 40]}', r"box must be \[x0, y0, x1, y1\]; True is not a number$"),
    # as on the wire; YAML (inline prompts) reads 1e2 as a string
    ('{"obj_id": 2, "box": ["1", "2", "30", "40"]}', r"box must be \[x0, y0, x1, y1\]; '1' is not a number"),
    ('{"obj_id": 2, "box": [1, 2, "3e1", 40]}', r"'3e1' is not a number \(YAML reads 1e2 as a string: write"),
    ('{"obj_id": 2, "points": [[1, "2"]]}', r"points must be a non-empty list of \[x, y\]; '2' is not a n"),
    ('{"obj_id": 2, "points": [[1, null]]}', r"points must be a non-empty list of \[x, y\]; None is not a "),
    ('{"obj_id": 2, "box": [1, 2, 3' + '0' * 400 + ', 4]}', r"box must be \[x0, y0, x1, y1\]$"),  # no float
    ('{"obj_id": 2, "mask": {"size": [4, 4], "counts": "04"}, "box": [0, 0, 2, 2]}',
     "a mask prompt cannot be combined with points or a box"),  # at once, not when its frame comes
    ('{"obj_id": 2, "points": [[1, 2]], "labels": [true]}', "labels must be a list of 0"),
    ('{"obj_id": 2, "points": [[1, 2]], "labels": [1.0]}', "labels must be a list of 0"),
    ('{"obj_id": 2, "mask": {"size": [4, 4], "counts": "`0"}}', "mask is empty: it marks no pixel"),
])
def test_a_prompts_file_names_the_entry_with_a_bad_box_or_point(tmp_path, entry, message):
    from streamtrack.prompts import load_prompts_file

    f = tmp_path / "p.json"
    f.write_text(f'[{{"obj_id": 1, "box": [1, 2, 30, 40]}}, {entry}]')
    with pytest.raises(UserError, match=message) as info:
        load_prompts_file(f)
    assert str(info.value).startswith(f"prompts file {f}, entry 1: ")


@pytest.mark.parametrize(("text", "message"), [
    ('[{"obj_id": 1, "box": [1, 2, 30, 40], "box": [5, 6, 50, 60]}]', "duplicate key 'box'"),
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ('[{"obj_id": 1, "box": [1, 2, 30, 40]}, {"obj_id": 2147483648, "box": [1, 2, 30, 40]}]',
     "entry 1: obj_id must be an integer from 1 to 2147483647"),
])
def test_a_prompts_file_is_read_as_strictly_as_a_control_message(tmp_path, text, message):
    """What the control channel refuses (a key given twice, an id it cannot address) is
    refused in the file too, in one line; so is nesting that overflows the parser."""
    from streamtrack.prompts import load_prompts_file

    f = tmp_path / "p.json"
    f.write_text(text)
    with pytest.raises(UserError, match=message) as info:
        load_prompts_file(f)
    assert str(info.value).startswith(f"prompts file {f}") and "\n" not in str(info.value)


def _mask_entry_error(tmp_path, make, name="m.png") -> str:
    from streamtrack.prompts import load_prompts_file

    make(tmp_path / name)
    f = tmp_path / "p.json"
    f.write_text(f'[{{"obj_id": 1, "mask": "{name}"}}]')
    with pytest.raises(UserError) as info:
        load_prompts_file(f)
    return str(info.value)


def test_a_mask_file_that_is_not_a_whole_image_or_is_empty_is_one_line(tmp_path):
    import numpy as np
    from PIL import Image

    good = tmp_path / "good.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64), np.uint8)).save(good)
    m = tmp_path / "m.png"
    assert "m.png is not a readable image" in _mask_entry_error(tmp_path, lambda p: p.write_text("hello"))
    assert "m.png is not a readable image" in _mask_entry_error(
        tmp_path, lambda p: p.write_bytes(good.read_bytes()[:2000]))
    assert f"mask file {m} is empty" in _mask_entry_error(
        tmp_path, lambda p: Image.fromarray(np.zeros((8, 8), np.uint8)).save(p))
    assert f"mask file {tmp_path / 'd'} is not a file" in _mask_entry_error(tmp_path, Path.mkdir, "d")


def test_a_mask_cut_out_on_a_transparent_background_is_its_opaque_pixels(tmp_path):
    import numpy as np
    from PIL import Image

    from streamtrack.prompts import load_prompts_file

    alpha = np.zeros((6, 8), np.uint8)
    alpha[1:4, 2:5] = 255
    for colour in (0, 255):  # a black or a white object: only the alpha channel tells
        rgb = np.full((6, 8, 3), colour, np.uint8)
        Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(tmp_path / "m.png")
        (tmp_path / "p.json").write_text('[{"obj_id": 1, "mask": "m.png"}]')
        (prompt,) = load_prompts_file(tmp_path / "p.json")[0]
        assert (prompt.mask == (alpha > 0)).all()
    opaque = np.dstack([np.zeros((6, 8, 3), np.uint8), np.full((6, 8), 255, np.uint8)])
    opaque[1:4, 2:5, :3] = 255  # opaque everywhere: the pixels' values mark the object
    Image.fromarray(opaque, "RGBA").save(tmp_path / "m.png")
    (prompt,) = load_prompts_file(tmp_path / "p.json")[0]
    assert (prompt.mask == (alpha > 0)).all()
    framed = opaque.copy()
    framed[0, :, 3] = 0  # white on black with a transparent border: the white is the object
    Image.fromarray(framed, "RGBA").save(tmp_path / "m.png")
    (prompt,) = load_prompts_file(tmp_path / "p.json")[0]
    assert (prompt.mask == (alpha > 0)).all()


def test_an_id_given_by_box_and_by_the_prompts_file_says_how_box_objects_are_numbered():
    from streamtrack.engine import Prompt
    from streamtrack.prompts import from_cli, merge

    with pytest.raises(UserError, match=r"object 2 is prompted twice on frame 0 \(--box objects are"):
        merge(from_cli(["1,2,30,40"], ["5,6"]), {0: [Prompt.make(2, box=[1, 2, 30, 40])]})


def test_an_object_may_be_prompted_once_on_each_of_several_frames(tmp_path):
    from streamtrack.engine import Prompt
    from streamtrack.prompts import load_prompts_file, merge

    f = tmp_path / "p.json"
    f.write_text('[{"obj_id": 1, "frame": 3, "box": [1, 2, 30, 40]}, {"obj_id": 2, "box": [1, 2, 30, 40]},'
                 ' {"obj_id": 1, "box": [1, 2, 30, 40]}, {"obj_id": 2, "frame": 3, "points": [[5, 6]]}]')
    prompts = load_prompts_file(f)
    assert {frame: [p.obj_id for p in ps] for frame, ps in prompts.items()} == {3: [1, 2], 0: [2, 1]}
    merged = merge(prompts, {5: [Prompt.make(1, box=[1, 2, 30, 40])]})
    assert {frame: [p.obj_id for p in ps] for frame, ps in merged.items()} == {3: [1, 2], 0: [2, 1], 5: [1]}
    f.write_text('[{"obj_id": 1, "frame": 3, "box": [1, 2, 30, 40]}, {"obj_id": 1, "box": [1, 2, 30, 40]},'
                 ' {"obj_id": 1, "frame": 3, "points": [[5, 6]]}]')
    with pytest.raises(UserError, match=r"entry 2: object 1 is prompted twice on frame 3$"):
        load_prompts_file(f)


def test_a_prompts_file_with_a_byte_order_mark_is_read(tmp_path):
    from streamtrack.prompts import load_prompts_file

    f = tmp_path / "p.json"
    f.write_bytes(b"\xef\xbb\xbf" + b'[{"obj_id": 3, "box": [1, 2, 30, 40]}]')
    assert [p.obj_id for p in load_prompts_file(f)[0]] == [3]


def test_an_image_size_from_numpy_is_taken_and_a_string_named_as_one():
    """A size computed with numpy is an integer; "64" is not, and is not "not a multiple of 32"."""
    import numpy as np

    from streamtrack.models import check_image_size

    assert check_image_size(np.int64(96)) == 96 and type(check_image_size(np.int64(96))) is int
    with pytest.raises(UserError, match=r"image size must be an integer, got '64' \(str\)"):
        check_image_size("64")
    with pytest.raises(UserError, match=r"must be an integer, got True"):
        check_image_size(True)
    with pytest.raises(UserError, match=r"multiple of 32 from 64 to 2048, got 100"):
        check_image_size(np.int32(100))


def test_a_wheel_carries_the_presets_and_the_license(tmp_path):
    """Installed from a wheel (not this checkout), `--config webcam` must still find its
    preset: the wheel carries configs/ inside the package."""
    import shutil
    import subprocess
    import sys
    import zipfile

    # From a copy: setuptools packs what an earlier build left in the checkout's build/ too.
    repo = tmp_path / "src"
    shutil.copytree(Path(__file__).resolve().parent.parent, repo, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "*.egg-info", "__pycache__", "*.pt", "runs", ".devbundle", ".*_cache"))
    # No build isolation: the setuptools installed here builds it, with no package index.
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path), str(repo)], capture_output=True, text=True, timeout=300,
                           env={**os.environ, "SAM2_BUILD_CUDA": "0"})
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = tmp_path.glob("streamtrack-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    presets = {Path(p).name for p in names if p.startswith("streamtrack/configs/")}
    assert presets == {p.name for p in CONFIG_DIR.glob("*.yaml")}, presets  # not the fleet example:
    assert not any(p.startswith("streamtrack/configs/fleet/") for p in names), names  # names demos/
    assert any(p.endswith("/licenses/LICENSE") for p in names), names
    assert not [p for p in names if p.startswith(("tests/", "configs/"))]  # nothing at the top level
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    run = subprocess.run([sys.executable, "-m", "streamtrack", "run", "0", "--config", "webcam",
                          "--print-config"], cwd=elsewhere, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(site)})
    assert run.returncode == 0, run.stderr
    assert "stream: webcam" in run.stdout.splitlines(), run.stdout  # the preset's own value
    where = subprocess.run([sys.executable, "-c", "import streamtrack.config as c; print(c.CONFIG_DIR)"],
                           cwd=elsewhere, capture_output=True, text=True, timeout=120,
                           env={**os.environ, "PYTHONPATH": str(site)})
    assert where.stdout.strip() == str(site / "streamtrack" / "configs"), where


@pytest.mark.parametrize(("box", "message"), [
    ("110,60,50,108", "--box '110,60,50,108': needs x0 < x1 and y0 < y1"),
    ("5,5,5,5", "--box '5,5,5,5': needs x0 < x1 and y0 < y1"),
    ("1,2,3", "--box '1,2,3': expected x0,y0,x1,y1"),
    ("1,nan,3,4", "--box '1,nan,3,4': numbers must be finite"),
])
def test_a_box_option_is_checked_before_the_model_loads(box, message, capsys):
    """The corners' order was found by the engine at the first frame, after the model had
    loaded; `segment` refused it only on its own."""
    from streamtrack.prompts import from_cli
    from streamtrack.segment import prompts_from_args

    for parse in (lambda: from_cli([box], None), lambda: prompts_from_args([box], None)):
        with pytest.raises(UserError) as e:
            parse()
        assert str(e.value).startswith(message)
