"""One typed configuration for ``streamtrack run``, loaded in layers.

built-in defaults < YAML file (``--config``; a path or a preset name from
``configs/``) < environment (``STREAMTRACK_<KEY>``) < command line.

Keys are the long command-line options with ``_`` for ``-``.  Unknown keys and
values of the wrong type are errors that name the key and where it came from.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import types
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from streamtrack.errors import UserError, read_text_file, stdout_dash
from streamtrack.models import DEFAULT_MODEL, MODELS, check_device_name, check_image_size
from streamtrack.protocol import normalize_endpoint, validate_stream
from streamtrack.tracking import COMPILE_MODES

log = logging.getLogger(__name__)

# The copy a wheel carries in the package, else the checkout's configs/ (an editable install).
CONFIG_DIR = next((d for d in (Path(__file__).resolve().parent / "configs",
                               Path(__file__).resolve().parent.parent / "configs")
                   if (d / "default.yaml").is_file()), Path(__file__).resolve().parent.parent / "configs")
ENV_PREFIX = "STREAMTRACK_"


@dataclass
class Config:
    # model
    model: str = DEFAULT_MODEL
    checkpoint: str | None = None
    device: str = "auto"
    image_size: int | None = None
    preprocess: str = "auto"
    # engine
    lost_after: float = 3.0
    max_cond_frames: int | None = None
    fill_hole_area: int = 0
    max_objects: int = 64
    compile: bool = False
    compile_mode: str = "default"
    # source
    realtime: bool = False
    loop: bool = False
    max_frames: int | None = None
    queue_depth: int | None = None
    reconnect_max: float = 1.0
    stale_after: float | None = 2.0
    give_up_after: float | None = None
    # outputs
    stream: str = "cam0"
    publish: str | None = None
    control: str | None = None
    save_jsonl: str | None = None
    save_masks: str | None = None
    save_video: str | None = None
    publish_frames: bool = False
    emit: str = "thread"
    decode: str = "thread"
    launch_ahead: bool = False
    show: bool = False
    max_restarts: int | None = None
    hang_timeout: float | None = 300.0
    start_timeout: float | None = 900.0
    # security (optional CURVE encryption + client authentication; see docs/protocol.md)
    curve_secret: str | None = None
    curve_clients: str | None = None

    def __post_init__(self) -> None:
        if self.compile_mode != "default":  # as the engine takes it: --print-config says so
            self.compile = True

    def to_yaml(self) -> str:
        return yaml.safe_dump(dataclasses.asdict(self), sort_keys=False)


_FIELDS = {f.name: f for f in fields(Config)}
# Keys with a fixed set of values, checked here so the error names the file or option
# (the stages that use them check again: emitter.EMIT_MODES, capture_process.DECODE_MODES).
CHOICES: dict[str, tuple[str, ...]] = {
    "model": tuple(MODELS), "compile_mode": COMPILE_MODES, "preprocess": ("auto", "exact", "fast"),
    "emit": ("thread", "process"), "decode": ("thread", "process"),
}
# The smallest value of each numeric key (seconds, counts); any float must be finite.
_MINIMUM: dict[str, int] = {
    "lost_after": 0, "max_cond_frames": 2, "fill_hole_area": 0, "max_objects": 1, "max_frames": 1,
    "queue_depth": 1, "max_restarts": 0, "hang_timeout": 0, "start_timeout": 0,
}
_OUTPUT_PATHS = {"save_jsonl", "save_masks", "save_video"}
_HOME_PATHS = {*_OUTPUT_PATHS, "checkpoint", "curve_secret", "curve_clients"}
# Seconds that must be more than 0 (the capture's timers; null turns the optional ones off).
_ABOVE_ZERO = {"reconnect_max", "stale_after", "give_up_after"}
# A supervised tracker reports once a second (pipeline.ALIVE_EVERY): less than two reports'
# time would take a healthy one for hung.
HANG_TIMEOUT_MIN = 2.0


def check_hang_timeout(seconds: float | None) -> float | None:
    if seconds and not seconds >= HANG_TIMEOUT_MIN:
        raise UserError(f"hang_timeout must be 0 or null (never) or at least {HANG_TIMEOUT_MIN:g} s "
                        f"(a tracker reports once a second), got {seconds}")
    return seconds


# Strings that may be written as a bare number: an endpoint's port, a stream's name.
_NAMES_OR_PORTS = {"publish", "control", "stream"}
# Keys checked by the stage that uses them, called here too so that the error names the layer.
_CHECKS = {"image_size": check_image_size, "device": check_device_name, "hang_timeout": check_hang_timeout,
           "stream": validate_stream, "publish": normalize_endpoint, "control": normalize_endpoint}


def _base_type(tp) -> tuple[type, bool]:
    """(type, optional) from a field annotation such as ``int | None``."""
    if isinstance(tp, str):
        tp = eval(tp, vars(typing), {})  # annotations are strings under `from __future__`
    args = typing.get_args(tp)
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        non_none = [a for a in args if a is not type(None)]
        return non_none[0], len(non_none) < len(args)
    return tp, False


def coerce(key: str, value: Any, where: str) -> Any:
    """Check (and for strings from the environment, parse) one value.  A blank string is
    refused in every layer: an unset shell variable (``--curve-secret "$KEY"``,
    ``STREAMTRACK_CURVE_SECRET=$KEY``) taken for "off" would turn encryption or publishing
    off unseen, and taken for "not given" would run without the output it was meant to
    name; "null" says "off"."""
    if key not in _FIELDS:
        raise UserError(f"{where}: unknown key {key!r}; known keys: {', '.join(_FIELDS)}")
    tp, optional = _base_type(_FIELDS[key].type)
    if isinstance(value, str) and not value.strip():
        what = "an empty path" if key in _OUTPUT_PATHS else "empty"
        hints = (["null turns it off"] if optional else []) + (
            ["unset the variable to keep the value below it"] if where.startswith("environment") else [])
        raise UserError(f"{where}: {key} is {what}" + (f" ({'; '.join(hints)})" if hints else ""))
    if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null") and optional):
        if optional:
            return None
        default = _FIELDS[key].default
        raise UserError(f"{where}: {key} cannot be null (it always has a value; the default is {default!r})")
    if isinstance(value, str) and tp is not str:
        value = _parse_text(key, value, tp, where)
    if key in _NAMES_OR_PORTS and isinstance(value, int) and not isinstance(value, bool):
        value = str(value)  # YAML reads `publish: 5555` or `stream: 7` as a number
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise UserError(f"{where}: {key} must be {tp.__name__}, got {value!r}")
    if tp is float and not math.isfinite(value):
        raise UserError(f"{where}: {key} must be a finite number, got {value!r}")
    if key in CHOICES and value not in CHOICES[key]:
        raise UserError(f"{where}: {key} must be one of {', '.join(CHOICES[key])}, got {value!r}")
    if key in _MINIMUM and value < _MINIMUM[key]:
        raise UserError(f"{where}: {key} must be at least {_MINIMUM[key]}, got {value!r}")
    if key in _ABOVE_ZERO and not value > 0:
        hint = " (null: never)" if optional else ""
        raise UserError(f"{where}: {key} must be more than 0{hint}, got {value!r}")
    if key in _HOME_PATHS:  # "~/runs/out.jsonl" in a file, as a shell reads it (and fleet files do)
        value = os.path.expanduser(value)
    if key == "save_jsonl":
        value = stdout_dash(value)
    if key in _CHECKS:
        try:
            _CHECKS[key](value)
        except UserError as e:  # named by its key where the check's own words do not
            named = key in str(e) or key.replace("_", " ") in str(e)
            raise UserError(f"{where}: {e}" if named else f"{where}: {key}: {e}") from None
    return value


def _parse_text(key: str, text: str, tp: type, where: str) -> Any:
    if tp is bool:
        low = text.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise UserError(f"{where}: {key} must be true or false, got {text!r}")
    try:
        return tp(text)
    except ValueError:
        raise UserError(f"{where}: {key} must be {tp.__name__}, got {text!r}") from None


def find_config_file(name: str, what: str = "config") -> Path:
    """A path, or a preset name such as ``webcam`` (``configs/webcam.yaml``)."""
    path = Path(name)
    preset = CONFIG_DIR / f"{name}.yaml"
    if path.is_dir():
        if "/" not in name and preset.is_file():  # a folder such as --save-masks webcam left
            return preset
        raise UserError(f"{what} {path} is a directory, not a YAML file")
    if path.exists():  # a file, or a pipe: --config <(...)
        return path
    if preset.is_file():
        return preset
    presets = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    raise UserError(f"{what} {name!r} not found (a YAML file, or a preset: {', '.join(presets)}, "
                    f"in {CONFIG_DIR})")


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping (PyYAML keeps the
    last one silently, so the first would look set and not be)."""


def _mapping_without_repeats(loader: _StrictLoader, node: yaml.MappingNode) -> dict:
    seen: set[str] = set()
    for key_node, _ in node.value:
        if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
            if key_node.value in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key_node.value!r} given twice",
                                                        key_node.start_mark)
            seen.add(key_node.value)
    return loader.construct_mapping(node)


def _blank_as_empty(loader: _StrictLoader, node: yaml.ScalarNode) -> str | None:
    """YAML reads ``key:`` with nothing after it as null.  In a settings file that is far
    more often a value left out (a template filled with an unset variable) than "off", and
    taken as "off" it would run unencrypted or without an output unseen: read it as empty,
    which is refused like an empty value in any layer.  ``null`` and ``~`` still say off."""
    return "" if node.value == "" else None


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_repeats)
_StrictLoader.add_constructor("tag:yaml.org,2002:null", _blank_as_empty)


def _yaml_problem(e: yaml.YAMLError) -> str:
    """PyYAML's complaint on one line, with where it is (its own text spans lines)."""
    what = getattr(e, "problem", None) or str(e).splitlines()[0]
    mark = getattr(e, "problem_mark", None)
    return what if mark is None else f"{what}, line {mark.line + 1} column {mark.column + 1}"


def load_yaml(path: Path, what: str = "config") -> dict[str, Any]:
    text = read_text_file(path, what)
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader
    except yaml.YAMLError as e:
        raise UserError(f"{what} {path}: cannot read YAML ({_yaml_problem(e)})") from None
    if data is None or data == "":  # "": a document of only "---" and comments (_blank_as_empty)
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{what} {path}: expected a mapping of keys to values")
    return data


def load_config(
    config_file: str | None = None,
    cli: dict[str, Any] | None = None,
    environ: dict[str, str] | None = None,
) -> Config:
    """Merge the layers; ``cli`` holds only options the user actually gave."""
    values: dict[str, Any] = {}
    env = os.environ if environ is None else environ
    what = "config"
    if config_file is None and ENV_PREFIX + "CONFIG" in env:
        config_file, what = env[ENV_PREFIX + "CONFIG"], f"config (environment {ENV_PREFIX}CONFIG)"
        if not config_file.strip():  # "$CFG" unset: running on the defaults unseen is what to avoid
            raise UserError(f"environment {ENV_PREFIX}CONFIG: empty (a YAML file or a preset name; "
                            "unset the variable to use none)")
    elif config_file is not None and not config_file.strip():
        raise UserError("option --config: empty (a YAML file or a preset name)")
    if config_file:
        path = find_config_file(config_file, what)
        for key, value in load_yaml(path).items():
            values[key] = coerce(str(key), value, f"config {path}")
    for name, text in env.items():
        if name.startswith(ENV_PREFIX) and name != ENV_PREFIX + "CONFIG":
            key = name[len(ENV_PREFIX):].lower()
            if key not in _FIELDS:
                # Wrapper scripts may use the prefix too: say it, do not stop every run for it.
                log.warning("environment %s: not a setting, ignored (settings: STREAMTRACK_ and a key of "
                            "`streamtrack run --print-config`, e.g. STREAMTRACK_IMAGE_SIZE)", name)
                continue
            values[key] = coerce(key, text, f"environment {name}")
    for key, value in (cli or {}).items():
        values[key] = coerce(key, value, f"option --{key.replace('_', '-')}")
    return Config(**values)
