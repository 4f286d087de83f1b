"""Layered configuration: defaults < YAML < environment < command line."""

from __future__ import annotations

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
        ("model: null\n", "model cannot be empty"),
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
        ("give_up_after: -2\n", "give_up_after must be at least 0"),
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
    with pytest.raises(UserError, match="environment STREAMTRACK_NOPE: unknown key 'nope'"):
        load_config(None, {}, {"STREAMTRACK_NOPE": "1"})


def test_missing_config_lists_presets():
    with pytest.raises(UserError, match="not found .*webcam"):
        load_config("no-such-config", {}, {})


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
    from streamtrack.compiled import MODES
    from streamtrack.config import CHOICES
    from streamtrack.emitter import EMIT_MODES
    from streamtrack.models import MODELS

    assert CHOICES == {"model": tuple(MODELS), "compile_mode": MODES, "preprocess": ("auto", "exact", "fast"),
                       "emit": EMIT_MODES, "decode": DECODE_MODES}


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


@pytest.mark.parametrize(("entry", "message"), [
    ('{"obj_id": 2, "box": [50, 50, 10, 10]}', r"box \[50.0, 50.0, 10.0, 10.0\] needs finite x0 < x1"),
    ('{"obj_id": 2, "box": [1, 2, NaN, 40]}', "needs finite x0 < x1"),
    ('{"obj_id": 2, "points": [[1, Infinity]]}', "points must be finite numbers"),
])
def test_a_prompts_file_names_the_entry_with_a_bad_box_or_point(tmp_path, entry, message):
    from streamtrack.prompts import load_prompts_file

    f = tmp_path / "p.json"
    f.write_text(f'[{{"obj_id": 1, "box": [1, 2, 30, 40]}}, {entry}]')
    with pytest.raises(UserError, match=message) as info:
        load_prompts_file(f)
    assert str(info.value).startswith(f"prompts file {f}, entry 1: ")
