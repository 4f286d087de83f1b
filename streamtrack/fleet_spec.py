"""The fleet file (``streamtrack fleet FLEET.yaml``): format, validation, placement.

::

    fleet:                      # all optional
      address: null             # Ray cluster ("auto", "HOST:6379", "ray://HOST:10001"); null = local Ray
      streams_per_actor: null   # null: an actor per stream (GPU cluster), all streams in one actor (CPU)
      num_cpus: 1               # per actor
      num_gpus: null            # per actor; null = an even share of the GPUs (1 / actors per GPU), else 0
      max_restarts: 3           # Ray restarts a dead actor this often (-1 = forever)
      bind: 127.0.0.1           # host of automatic endpoints (0.0.0.0: reachable from other machines)
      directory: fleet.json     # where the endpoint directory is written
      control: auto             # fleet control endpoint (list_streams, add/remove_stream); null = none
      exit_when_done: true      # stop once every stream has ended (false: run until Ctrl-C)
      fence_after: 30           # an actor the driver has not polled for this long stops its streams
      hang_timeout: 300         # a stream silent this long gets its actor restarted (0/null = never)
    defaults:                   # `streamtrack run` config keys applied to every stream
      model: sam2.1_hiera_tiny
      image_size: 512
    streams:
      - name: lobby             # stream name: topics masks/lobby, status/lobby, stats/lobby
        source: demos/sample.mp4
        prompts: demos/sample_prompts.json   # a prompts file, or an inline list of prompts
        loop: true
      - name: door
        source: rtsp://cam2.local/stream
        prompt_later: true      # no prompts yet: prompt over the stream's control endpoint

A stream entry takes the keys of a ``streamtrack run`` config file (``model``,
``checkpoint``, ``device``, ``image_size``, ``save_jsonl``, ``publish``,
``control``, ``loop``, ``max_frames``, ...) plus ``name``, ``source``,
``prompts`` and ``prompt_later``.  ``publish`` and ``control`` default to
``auto`` (a free port on ``bind``).  Everything is checked before anything
starts; each error is one line naming the stream and the field.  Whether a
source file exists is checked where the stream runs (the node of its actor), so
a missing file fails that stream only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from streamtrack.config import Config, check_hang_timeout, coerce, load_yaml
from streamtrack.errors import UserError, existing_file, names_a_descriptor
from streamtrack.models import MODELS, check_image_size
from streamtrack.pipeline import RunConfig
from streamtrack.protocol import TCP_HOST, WILDCARD_HOSTS, normalize_endpoint, tcp_host_port, validate_stream
from streamtrack.sources import parse_source, url_missing_a_slash
from streamtrack.tracking import CUDAGRAPH_MODES, EngineConfig, Prompt

AUTO = "auto"
# Run-config keys a stream may not set: the name is the stream, a fleet has no
# window, restarts are Ray's (fleet.max_restarts) and hung streams the driver's
# (fleet.hang_timeout; a stream's start is not watched, see docs/scaling.md), and CURVE
# keys would leave the driver unable to read the masks it re-seeds from.
_NOT_PER_STREAM = {"stream", "show", "max_restarts", "hang_timeout", "start_timeout", "curve_secret",
                   "curve_clients"}
_RUN_KEYS = [f.name for f in fields(Config) if f.name not in _NOT_PER_STREAM]
_STREAM_KEYS = {"name", "source", "prompts", "prompt_later", *_RUN_KEYS}
_TOP_KEYS = {"fleet", "defaults", "streams"}


@dataclass(frozen=True)
class FleetOptions:
    address: str | None = None
    streams_per_actor: int | None = None
    num_cpus: float = 1.0
    num_gpus: float | None = None
    max_restarts: int = 3
    bind: str = "127.0.0.1"
    directory: str = "fleet.json"
    control: str | None = AUTO
    exit_when_done: bool = True
    # Seconds without a poll from the driver after which an actor stops its streams: one cut
    # off from the cluster (Ray restarts them elsewhere) must not go on as a second copy.
    fence_after: float | None = 30.0
    # Seconds a running stream's tracker loop may show no sign of life before the driver
    # kills its actor for Ray to restart (a thread cannot be stopped alone); None: never.
    hang_timeout: float | None = 300.0

    @property
    def control_endpoint(self) -> str | None:
        """What the fleet control server binds (``auto``: a free port on ``bind``)."""
        if self.control is None:
            return None
        return normalize_endpoint(f"tcp://{self.bind}:0") if self.control == AUTO else self.control


@dataclass(frozen=True)
class ModelKey:
    """Streams with the same key can share one model in one actor."""

    model: str
    checkpoint: str | None
    device: str
    image_size: int | None
    max_cond_frames: int | None  # on the model, set by each engine as it tracks: kept apart
    compile: bool
    compile_mode: str

    @property
    def cudagraphs(self) -> bool:
        """CUDA graphs are recorded per thread, so such a model serves one stream, whose
        tracker builds and steps it on its own thread: an actor of its own."""
        return self.compile_mode in CUDAGRAPH_MODES

    @classmethod
    def of(cls, c: Config | EngineConfig) -> ModelKey:
        """The key of a run's model settings (a merged config or an engine config)."""
        return cls(c.model, c.checkpoint, c.device, c.image_size, c.max_cond_frames, c.compile,
                   c.compile_mode)

    def on_gpus(self, cluster_gpus: float) -> bool:
        """Whether its actors take GPUs: the cluster has some and it is not pinned to the CPU."""
        return cluster_gpus > 0 and self.device != "cpu"


@dataclass
class StreamSpec:
    """One validated stream entry: what its tracker runs."""

    name: str
    source: str
    config: Config  # merged defaults + entry; publish/control already resolved
    prompts: dict[int, list[Prompt]] = field(default_factory=dict)
    prompt_later: bool = False
    prompts_file: str | None = None  # where the prompts came from, if a file (no output may be it)

    @property
    def model_key(self) -> ModelKey:
        return ModelKey.of(self.config)

    def inputs(self) -> list[tuple[str, str]]:
        """The files the stream reads, as (what, path): its source, if a local file, its
        prompts file and its checkpoint (read again when its actor restarts)."""
        path = _local_path(self.source)
        files = [] if path is None else [("source video", path)]
        if self.prompts_file:
            files.append(("prompts file", self.prompts_file))
        if self.config.checkpoint:
            files.append(("checkpoint", self.config.checkpoint))
        return files

    def run_config(self) -> RunConfig:
        """The tracker's configuration, exactly as ``streamtrack run`` would build it."""
        read = (("the prompts file", self.prompts_file),) if self.prompts_file else ()
        rc = RunConfig.from_config(self.config, self.source, self.prompts, progress=False, read_files=read)
        rc.wait_for_prompt = self.prompt_later and not self.prompts
        rc.warn_exposed = False  # the driver warns, once per endpoint, for every stream
        return rc


@dataclass
class FleetSpec:
    options: FleetOptions
    streams: list[StreamSpec]
    path: str = "<fleet>"
    defaults: dict[str, Any] = field(default_factory=dict)  # applied to add_stream entries too


# ----------------------------------------------------------------------------- parsing


def load_fleet(path: str | Path) -> FleetSpec:
    """Read and validate a fleet file (:class:`UserError`, one line, on any problem)."""
    p = existing_file(path, "fleet file")
    return parse_fleet(load_yaml(p, "fleet file"), str(p))


def parse_fleet(doc: Any, where: str) -> FleetSpec:
    if not isinstance(doc, dict):
        raise UserError(f"{where}: expected a mapping with 'fleet', 'defaults' and 'streams'")
    unknown = set(doc) - _TOP_KEYS
    if unknown:
        raise UserError(f"{where}: unknown section(s) {sorted(map(str, unknown))}; "
                        f"expected {sorted(_TOP_KEYS)}")
    options = parse_options(doc.get("fleet") or {}, f"{where}: fleet")
    defaults = doc.get("defaults") or {}
    if not isinstance(defaults, dict):
        raise UserError(f"{where}: defaults: expected a mapping of run-config keys to values")
    for key, value in defaults.items():
        if key not in _RUN_KEYS:
            raise UserError(f"{where}: defaults: unknown key {key!r}{_fleet_hint([key])}; known: "
                            f"{', '.join(_RUN_KEYS)}")
        _check_value(str(key), value, f"{where}: defaults")
    entries = doc.get("streams")
    if entries is None or entries == "":  # `streams:` with none listed
        entries = []
    if not isinstance(entries, list):
        raise UserError(f"{where}: streams: expected a list of stream entries")
    if not entries and (options.exit_when_done or options.control is None):
        raise UserError(f"{where}: streams: no streams (an empty fleet needs fleet.control and "
                        "exit_when_done: false, to add streams at run time)")
    streams: list[StreamSpec] = []
    for i, entry in enumerate(entries):
        streams.append(parse_stream(entry, defaults, options, f"{where}: streams[{i}]"))
    check_unique(streams, where, options.control_endpoint)
    return FleetSpec(options=options, streams=streams, path=where, defaults=dict(defaults))


# Why the run keys a fleet takes from no stream are refused (fleet options say where they go).
_WHY_NOT_PER_STREAM = {
    "stream": "the entry's name is the stream",
    "show": "a fleet has no window; streamtrack view shows a stream",
    "start_timeout": "a fleet does not time a stream's start",
    "curve_secret": "a fleet's streams are not CURVE-encrypted",
    "curve_clients": "a fleet's streams are not CURVE-encrypted",
}


def _fleet_hint(keys) -> str:
    """For run keys a stream may not set: where they go instead, or why not."""
    fleet_keys = sorted(str(k) for k in keys if k in {f.name for f in fields(FleetOptions)})
    why = [f"{k}: {_WHY_NOT_PER_STREAM[k]}" for k in sorted(map(str, keys)) if k in _WHY_NOT_PER_STREAM]
    if fleet_keys:
        why.insert(0, f"{', '.join(f'fleet.{k}' for k in fleet_keys)}: a fleet option")
    return f" ({'; '.join(why)})" if why else ""


def parse_options(opts: Any, where: str) -> FleetOptions:
    if not isinstance(opts, dict):
        raise UserError(f"{where}: expected a mapping of fleet options")
    known = {f.name: f for f in fields(FleetOptions)}
    unknown = set(opts) - set(known)
    if unknown:
        raise UserError(f"{where}: unknown option(s) {sorted(map(str, unknown))}; known: {', '.join(known)}")
    values: dict[str, Any] = {}
    for key, value in opts.items():
        if key in ("address", "control") and value is None:
            values[key] = None
        elif key == "control" and isinstance(value, int) and not isinstance(value, bool):
            values[key] = str(value)  # a bare port, as everywhere an endpoint is given
        elif key in ("address", "bind", "directory", "control"):
            if not isinstance(value, str) or not value.strip():
                raise UserError(f"{where}: {key} must be a non-empty string, got {value!r}")
            values[key] = value.strip()
        elif key == "streams_per_actor":
            if value is not None and (not _is_int(value) or value < 1):
                raise UserError(f"{where}: streams_per_actor must be an integer >= 1, got {value!r}")
            values[key] = value
        elif key == "max_restarts":
            if not _is_int(value) or value < -1:
                raise UserError(f"{where}: max_restarts must be an integer >= 0 (or -1 = forever), "
                                f"got {value!r}")
            values[key] = value
        elif key in ("num_cpus", "num_gpus"):
            if value is None and key == "num_gpus":
                values[key] = None
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value < 0:
                raise UserError(f"{where}: {key} must be a number >= 0, got {value!r}")
            values[key] = float(value)
        elif key == "fence_after":
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not math.isfinite(value) or value < 2):
                raise UserError(f"{where}: fence_after must be a number of seconds >= 2 (or null: "
                                f"never), got {value!r}")
            values[key] = None if value is None else float(value)
        elif key == "hang_timeout":
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not math.isfinite(value)):
                raise UserError(f"{where}: hang_timeout must be a number of seconds (0 or null: never), "
                                f"got {value!r}")
            try:
                check_hang_timeout(value)  # run's rule, for the same reason
            except UserError as exc:
                raise UserError(f"{where}: {exc}") from None
            values[key] = float(value) if value else None
        elif key == "exit_when_done":
            if not isinstance(value, bool):
                raise UserError(f"{where}: exit_when_done must be true or false, got {value!r}")
            values[key] = value
    out = FleetOptions(**values)
    if out.control not in (None, AUTO):
        _endpoint(out.control, f"{where}: control")
    if not isinstance(out.bind, str) or not TCP_HOST.fullmatch(out.bind):
        raise UserError(f"{where}: bind: {out.bind!r} is not a host name or address")
    return out


def parse_stream(entry: Any, defaults: dict[str, Any], options: FleetOptions, where: str,
                 base: Path | None = None) -> StreamSpec:
    """One stream entry (from the file, or an ``add_stream`` request) -> :class:`StreamSpec`."""
    if not isinstance(entry, dict):
        raise UserError(f"{where}: expected a mapping with at least name and source")
    name = entry.get("name")
    if isinstance(name, int) and not isinstance(name, bool):
        name = str(name)  # `name: 7`, read by YAML as a number
    try:
        name = validate_stream(name)
    except UserError as exc:
        raise UserError(f"{where}: name: {exc}") from None
    where = f"{where.rsplit(': streams[', 1)[0]}: stream {name!r}"
    unknown = set(entry) - _STREAM_KEYS
    if unknown:
        raise UserError(f"{where}: unknown field(s) {sorted(map(str, unknown))}{_fleet_hint(unknown)}; "
                        f"allowed: {', '.join(sorted(_STREAM_KEYS))}")
    source = entry.get("source")
    if isinstance(source, int) and not isinstance(source, bool):
        source = str(source)  # a webcam index
    if not isinstance(source, str) or not source.strip():
        raise UserError(f"{where}: source must be a file, URL or webcam index, got {source!r}")
    values: dict[str, Any] = {"publish": AUTO, "control": AUTO}
    values.update(defaults)
    values.update({k: v for k, v in entry.items() if k in _RUN_KEYS})
    cfg_values: dict[str, Any] = {}
    for key, value in values.items():
        cfg_values[key] = _check_value(key, value, where)
    if cfg_values["publish"] is None:
        raise UserError(f"{where}: publish cannot be null: the fleet re-seeds a restarted stream "
                        "from its published masks (use auto)")
    for key in ("publish", "control"):
        if cfg_values[key] == AUTO:
            cfg_values[key] = normalize_endpoint(f"tcp://{options.bind}:0")  # port 0: any free port
        elif cfg_values[key] is not None:
            cfg_values[key] = _endpoint(cfg_values[key], f"{where}: {key}")
            if cfg_values[key].startswith("inproc://"):
                raise UserError(f"{where}: {key}: inproc:// cannot leave the actor; use tcp:// or ipc://")
    for key in ("save_jsonl", "save_video"):
        if cfg_values.get(key) and names_a_descriptor(cfg_values[key]):
            raise UserError(f"{where}: {key} {cfg_values[key]}: a stream's outputs are written by its "
                            "actor, whose standard streams are Ray's worker log; give a file path")
    for key in ("checkpoint", "save_jsonl", "save_masks", "save_video"):
        if cfg_values.get(key):  # actors may run in another working directory
            cfg_values[key] = str(Path(cfg_values[key]).expanduser().absolute())
    if cfg_values.get("model") is not None and cfg_values["model"] not in MODELS:
        raise UserError(f"{where}: model must be one of {', '.join(MODELS)}, got {cfg_values['model']!r}")
    if cfg_values.get("image_size") is not None:
        try:
            check_image_size(cfg_values["image_size"])
        except UserError as e:
            raise UserError(f"{where}: {e}") from None
    config = Config(**cfg_values)
    config.stream = name
    prompt_later = entry.get("prompt_later", False)
    if not isinstance(prompt_later, bool):
        raise UserError(f"{where}: prompt_later must be true or false, got {prompt_later!r}")
    prompts = _prompts(entry.get("prompts"), where, base or Path.cwd())
    if not prompts and not prompt_later:
        raise UserError(f"{where}: no prompts: give prompts (a list, or a prompts file) or "
                        "prompt_later: true to prompt over the stream's control endpoint")
    if prompt_later and config.control is None:
        raise UserError(f"{where}: prompt_later needs a control endpoint (control: auto)")
    prompts_file = entry.get("prompts")
    prompts_file = str(Path(prompts_file).absolute()) if isinstance(prompts_file, str) else None
    spec = StreamSpec(name=name, source=_source(source.strip(), where), config=config, prompts=prompts,
                      prompt_later=prompt_later, prompts_file=prompts_file)
    try:  # what `run` checks before it starts (prompts within max_objects, no output over an input)
        spec.run_config()
    except UserError as exc:
        raise UserError(f"{where}: {exc}") from None
    return spec


def check_unique(streams: list[StreamSpec], where: str, fleet_control: str | None = None) -> None:
    """Stream names, output paths and fixed endpoints must not repeat (nor an endpoint take
    the fleet control's): the same port written another way (``localhost`` for
    ``127.0.0.1``, or a wildcard host, which binds every address) is the same endpoint."""
    seen: dict[str, str] = {}
    for s in streams:
        if s.name in seen:
            raise UserError(f"{where}: stream {s.name!r}: name used twice")
        seen[s.name] = s.name
    bound: list[tuple[str, str]] = []  # (endpoint, its user)
    if fleet_control is not None and not fleet_control.endswith(":*"):
        bound.append((fleet_control, "the fleet control"))
    for s in streams:
        for key in ("publish", "control"):
            ep = getattr(s.config, key)
            if ep is None or ep.endswith(":*"):
                continue
            other = next((user for used, user in bound if _same_binding(ep, used)), None)
            if other is not None:
                raise UserError(f"{where}: stream {s.name!r}: {key} {ep} is also used by {other}")
            bound.append((ep, f"stream {s.name!r}"))
    written: dict[str, str] = {}  # output path -> its user: two trackers would write over each other
    # Each input resolved once (symlinks followed): hundreds of streams are checked at every add_stream.
    read = {_resolved(path): f"the {what} of stream {s.name!r}" for s in streams for what, path in s.inputs()}
    for s in streams:
        for key in ("save_jsonl", "save_video", "save_masks"):
            path = getattr(s.config, key)
            if path is None:
                continue
            if path in written:
                raise UserError(f"{where}: stream {s.name!r}: {key} {path} is also written by "
                                f"{written[path]}: give each stream its own")
            written[path] = f"stream {s.name!r} ({key})"
            # An input, overwritten while a stream reads it: another stream's, or its own
            # (which its run checks too, but only where the file exists).
            reader = read.get(_resolved(path))
            if reader is not None:
                raise UserError(f"{where}: stream {s.name!r}: {key} {path} is {reader}, which it would "
                                "overwrite: write the results elsewhere")


def _resolved(path: str) -> Path:
    try:
        return Path(path).resolve()
    except (OSError, RuntimeError):  # RuntimeError: a symlink loop, before Python 3.13
        return Path(path).absolute()


def _same_binding(a: str, b: str) -> bool:
    """Whether two normalised endpoints would bind the same address on one machine."""
    if a == b:
        return True
    tcp_a, tcp_b = tcp_host_port(a), tcp_host_port(b)
    if tcp_a is None or tcp_b is None:
        return False
    (host_a, port_a), (host_b, port_b) = tcp_a, tcp_b
    if port_a != port_b:
        return False
    loopback = {"localhost": "127.0.0.1"}
    host_a, host_b = loopback.get(host_a, host_a), loopback.get(host_b, host_b)
    return host_a == host_b or host_a in WILDCARD_HOSTS or host_b in WILDCARD_HOSTS


def _check_value(key: str, value: Any, where: str) -> Any:
    if key in ("publish", "control") and value == AUTO:
        return AUTO
    if key == "publish" and value is None:
        return None
    return coerce(key, value, where)


def _endpoint(value: str, where: str) -> str:
    try:
        return normalize_endpoint(value)
    except UserError as exc:
        raise UserError(f"{where}: {exc}") from None


def _source(source: str, where: str) -> str:
    """A relative file path becomes absolute: actors need not share our directory.  A
    network URL's form is checked here (its scheme, host and port do not depend on the node
    the stream runs on; whether a file exists does)."""
    # A URL with a slash missing (``rtsp:/user:pw@cam``) would be taken for a file and fail
    # on its node, printing the password: said here, redacted, unless such a file exists.
    typo = url_missing_a_slash(source) is not None and not Path(source).exists()
    if ("://" in source and not source.lower().startswith("file:")) or typo:
        try:
            parse_source(source)
        except UserError as exc:
            raise UserError(f"{where}: source: {exc}") from None
    if _local_path(source) != source:  # a webcam, a device, a URL (a file:// one too): as given
        return source
    return str(Path(source).expanduser().absolute())


def _local_path(source: str) -> str | None:
    """The file a source names, a path or a ``file://`` URL's, without looking for it (it may
    be on another node); None for a webcam index, a device or a network URL."""
    if source.lower().startswith("file:"):
        return unquote(urlsplit(source).path)
    if source.isdigit() or source.startswith("/dev/") or "://" in source:
        return None
    return source


def _prompts(value: Any, where: str, base: Path) -> dict[int, list[Prompt]]:
    from streamtrack import prompts as prompt_io

    if value is None:
        return {}
    if isinstance(value, str):
        try:
            return prompt_io.load_prompts_file(value)
        except UserError as exc:
            raise UserError(f"{where}: prompts: {exc}") from None
    if isinstance(value, list) and value:
        return prompt_io.prompts_from_list(value, f"{where}: prompts", base)
    raise UserError(f"{where}: prompts must be a prompts file or a non-empty list of prompts, got {value!r}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# --------------------------------------------------------------------------- placement


@dataclass(frozen=True)
class ActorPlan:
    """One actor to start: its streams and its Ray resources."""

    name: str
    streams: tuple[str, ...]
    num_cpus: float
    num_gpus: float


def plan_actors(streams: list[StreamSpec], options: FleetOptions, cluster_gpus: float,
                first_index: int = 0) -> list[ActorPlan]:
    """Group streams into actors.

    Only streams that can share a model (:class:`ModelKey`) share an actor.  On a
    cluster with GPUs (and streams not pinned to the CPU) the default is an actor per
    stream, each with an equal share of the GPUs (``gpu_share``); on a CPU-only cluster
    all streams go in one actor.  ``streams_per_actor`` (streams batched in one actor,
    a whole GPU each unless ``num_gpus`` says otherwise) and ``num_gpus`` override these;
    a model in a CUDA-graph compile mode always gets an actor per stream, with the even
    share by default, 1 / ``streams_per_actor`` of a GPU when that is set.

    An actor per stream because it measured 2-2.5x the throughput of one actor
    batching the streams on one GPU (H100 and H200, docs/scaling.md): a step there is
    mostly Python launching kernels, and threads of one process take turns at the
    interpreter lock, where processes do not.
    """
    groups: dict[ModelKey, list[StreamSpec]] = {}
    for s in streams:
        groups.setdefault(s.model_key, []).append(s)
    plans: list[ActorPlan] = []
    index = first_index
    for key, members in groups.items():
        per_actor = actor_capacity(key, options, cluster_gpus) or len(members)
        if not key.on_gpus(cluster_gpus):
            gpus = 0.0
        elif options.num_gpus is not None:
            gpus = options.num_gpus
        elif options.streams_per_actor is None:
            gpus = gpu_share(len(members), cluster_gpus)  # the default, an actor per stream
        else:
            # streams_per_actor N means N streams to a GPU: a batched actor takes a
            # whole GPU, and a CUDA-graph stream, alone in its actor, 1/N of one
            gpus = 1.0 if per_actor > 1 else round(1.0 / options.streams_per_actor, 4)
        for start in range(0, len(members), per_actor):
            chunk = members[start:start + per_actor]
            plans.append(ActorPlan(name=f"fleet-{index}", streams=tuple(s.name for s in chunk),
                                   num_cpus=options.num_cpus, num_gpus=gpus))
            index += 1
    return plans


def actor_capacity(key: ModelKey, options: FleetOptions, cluster_gpus: float) -> int | None:
    """How many streams of ``key`` one actor serves (None: no limit).  One for a
    CUDA-graph model and, by default, on GPUs; else ``streams_per_actor``."""
    if key.cudagraphs or (options.streams_per_actor is None and key.on_gpus(cluster_gpus)):
        return 1
    return options.streams_per_actor


def gpu_share(actors: int, cluster_gpus: float) -> float:
    """The GPU fraction of each of ``actors`` actors spread evenly over the cluster's
    GPUs: 1 while there are GPUs enough, else 1 / (actors per GPU, rounded up)."""
    per_gpu = math.ceil(actors / max(1.0, math.floor(cluster_gpus)))
    return 1.0 if per_gpu <= 1 else round(1.0 / per_gpu, 4)


def plan_added(spec: StreamSpec, options: FleetOptions, cluster_gpus: float, siblings: list[ActorPlan],
               index: int) -> ActorPlan:
    """A new actor for a stream added at run time.  On GPUs, by default it takes the
    smallest share its model's running actors have, so it packs like them (a whole GPU
    would wait for one to be free)."""
    plan = plan_actors([spec], options, cluster_gpus, first_index=index)[0]
    if plan.num_gpus > 0 and options.num_gpus is None and siblings:
        plan = replace(plan, num_gpus=min(min(a.num_gpus for a in siblings), plan.num_gpus))
    return plan


def with_endpoints(rc: RunConfig, publish: str | None, control: str | None) -> RunConfig:
    """``rc`` bound to fixed endpoints (a restart keeps what the first start bound)."""
    return replace(rc, publish=publish or rc.publish, control=control or rc.control)
