"""``streamtrack fleet FLEET.yaml``: many streams as Ray actors, one driver.

The driver (this module, :class:`Fleet`) reads the fleet file
(:mod:`streamtrack.fleet_spec`), connects to Ray (or starts a local Ray),
places the streams on actors (:mod:`streamtrack.fleet_actor`; Ray does the
placement on nodes, the CPU/GPU accounting and the restarts), and then loops:

* it keeps, per stream, the newest mask of every object from its own
  subscription to the stream's ``masks/<stream>`` topic (the supervisor's
  :class:`~streamtrack.supervisor.SeenMasks`);
* it polls each actor's report; an actor whose *incarnation* changed was
  restarted by Ray (``max_restarts``) and runs nothing, so its streams are
  started again with a :class:`~streamtrack.pipeline.Resume` seeded from those
  masks (same object ids, ``seq`` continuing), on the same endpoints when the
  actor came back on the same node;
* a stream whose tracker loop has shown no sign of life for ``hang_timeout``
  seconds (a step or a write that never returns) cannot be stopped on its own
  (it is a thread): its actor is killed for Ray to restart, as if it had died;
* it writes the endpoint directory (:mod:`streamtrack.fleet_directory`) on
  every change and answers ``list_streams`` / ``add_stream`` /
  ``remove_stream`` on the fleet control endpoint.

A stream that fails (its source file is missing, its checkpoint is bad) is
logged and listed as ``failed`` with its error; the other streams go on.
SIGINT/SIGTERM/SIGHUP stop every stream (outputs flushed), kill the actors and, for a
Ray the fleet started itself, shut Ray down.

Every Ray call from the loop is asynchronous (``ray.wait`` with no timeout), so
one slow or restarting actor never stalls the others or the control channel.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from streamtrack.control import ControlServer
from streamtrack.errors import UserError
from streamtrack.fleet_actor import STOPPING, FleetActor, StreamState, connectable, node_address
from streamtrack.fleet_directory import StreamEntry, check_directory_writable, write_directory, written_by
from streamtrack.fleet_spec import (
    ActorPlan,
    FleetSpec,
    ModelKey,
    StreamSpec,
    actor_capacity,
    check_unique,
    parse_stream,
    plan_actors,
    plan_added,
    with_endpoints,
)
from streamtrack.pipeline import Resume, RunConfig, warn_if_exposed
from streamtrack.sources import redact_url
from streamtrack.supervisor import SeenMasks, install_stop_signals, resume_from_seen

log = logging.getLogger(__name__)

# Directory/list states beyond the actor's own: waiting for (re)start, actor being restarted,
# actor not answering the driver (its node cut off, or the process frozen).
RESTARTING = "restarting"
UNREACHABLE = "unreachable"
_ENDED = (StreamState.DONE, StreamState.FAILED, StreamState.STOPPED)


def require_ray():
    try:
        import ray
    except ImportError:
        raise UserError("streamtrack fleet needs Ray: pip install 'streamtrack[fleet]'") from None
    return ray


# glibc malloc arenas for an actor's process (its default: 8 per core).  Every stream an
# actor starts runs new threads (tracker, capture, publisher); a thread that allocates
# may take an arena of its own, whose freed memory fragments and stays.  Measured on a
# 2-core machine, 300 streams started and stopped on one actor, 2 at a time: RSS
# 1,108 -> 1,135 MB and rising with glibc's default, 894 -> 899 MB with 2 arenas (and no
# lower a frame rate there; many streams on one actor of a large machine may contend for
# them: untried).  Set in the environment the process starts with: a mallopt() in
# the actor comes too late, Ray's threads have made glibc fix its limit (no change
# measured).  A MALLOC_ARENA_MAX of the fleet's own environment wins.
ACTOR_ENV = {"MALLOC_ARENA_MAX": os.environ.get("MALLOC_ARENA_MAX") or "2"}


@dataclass
class _Stream:
    spec: StreamSpec
    actor: str
    run_config: RunConfig  # what the current tracker was started with (its Resume included)
    state: str = StreamState.STARTING
    error: str | None = None
    publish: str | None = None  # connectable endpoints
    control: str | None = None
    bound: dict[str, str | None] = field(default_factory=dict)  # as bound, for pinning on restart
    node: str | None = None
    frames: int = 0
    restarts: int = 0
    seen: SeenMasks = field(default_factory=SeenMasks)
    sub: Any = None  # Subscriber to masks/<name>
    starting: bool = False  # a start_stream call is in flight
    started_at: float = 0.0  # when the last start_stream call came back (monotonic)

    @property
    def ended(self) -> bool:
        return self.state in _ENDED


@dataclass
class _Actor:
    plan: ActorPlan
    key: ModelKey
    handle: Any
    incarnation: str | None = None
    pid: int | None = None
    node: str | None = None
    dead: bool = False
    unavailable: bool = False  # being restarted by Ray
    unanswered: bool = False  # its last report is overdue (unreachable_after)
    killed: str | None = None  # why the fleet killed it (a hung stream), until Ray restarts it
    released: bool = False  # every stream of it ended: killed to free its resources
    busy: bool = True  # its last report listed a stream not ended (running, stopping) or stuck
    waited: bool = False  # said once that it has not started (waiting for resources)
    stuck: tuple[str, ...] = ()  # streams it could not stop (their threads hang on), as last reported
    restarts: int = 0
    report_ref: Any = None
    last_report: float = 0.0  # when the pending (or last) report was requested (monotonic)


@dataclass
class FleetSummary:
    streams: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> state, frames, error
    interrupted_by: int | None = None

    @property
    def failed(self) -> list[str]:
        return [n for n, s in self.streams.items() if s["state"] in (StreamState.FAILED, StreamState.CRASHED)]


class Fleet:
    """Run a :class:`FleetSpec` on Ray until every stream has ended (or :meth:`stop`).

    Uses the Ray already initialised in this process if there is one (and leaves
    it running); otherwise connects to ``options.address`` or starts a local Ray,
    which it shuts down at the end.
    """

    def __init__(self, spec: FleetSpec, *, log_level: int | None = None, poll_interval: float = 0.5,
                 unreachable_after: float = 10.0) -> None:
        """``unreachable_after``: seconds an actor may leave a report unanswered before its
        streams are listed as ``unreachable`` (Ray takes about a minute, by default, to
        declare a cut-off node dead)."""
        self.spec = spec
        self.options = spec.options
        self.log_level = logging.getLogger().getEffectiveLevel() if log_level is None else log_level
        self.poll_interval = poll_interval
        self.unreachable_after = unreachable_after
        self.streams: dict[str, _Stream] = {}
        self.actors: dict[str, _Actor] = {}
        self.control_endpoint: str | None = None
        self.interrupted_by: int | None = None
        self._stop = threading.Event()
        self._started = threading.Event()
        self._starts: dict[Any, _Stream] = {}  # start_stream ref -> the stream it starts
        # Removed streams' names -> the calls still running for them (a stop, a start): a
        # name added again before they end would find the old stream still on its actor.
        self._leaving: dict[str, list[Any]] = {}
        self._own_ray = False
        self._ray = None
        self._control: ControlServer | None = None
        self._dirty = True
        self._directory_error = ""  # why the last write of the directory failed, if it did
        self._directory_retry_at = 0.0
        self._directory_written: tuple[int, int, int] | None = None  # the file as last written
        self._directory_checked_at = 0.0
        self._next_actor = 0
        self._cluster_gpus = 0.0
        self._warned: set[tuple[str, str]] = set()

    # ---------------------------------------------------------------------- public
    def stop(self, signum: int | None = None) -> None:
        """Ask the fleet to stop (any thread, signal-safe)."""
        if self.interrupted_by is None:
            self.interrupted_by = signum
        self._stop.set()

    def wait_started(self, timeout: float | None = None) -> bool:
        """True once the actors are created and the directory is written."""
        return self._started.wait(timeout)

    def actor(self, name: str):
        """The Ray actor handle of actor ``name`` (e.g. ``fleet-0``)."""
        return self.actors[name].handle

    def run(self) -> FleetSummary:
        restore = install_stop_signals(self.stop)
        try:
            self._start()
            self._started.set()
            while not self._stop.is_set():
                self._serve_control()
                self._collect_starts()
                self._poll_actors()
                self._drain_masks()
                if not self._directory_intact():
                    self._dirty = True
                if self._dirty and time.monotonic() >= self._directory_retry_at:
                    self._write_directory("running")
                if self.options.exit_when_done and self._all_ended():
                    break
        finally:
            try:
                self._shutdown()
            finally:
                restore()
        return self.summary()

    def summary(self) -> FleetSummary:
        out = FleetSummary(interrupted_by=self.interrupted_by)
        for name, s in self.streams.items():
            # The actor's count (across restarts) or the driver's, whichever saw more.
            frames = max(s.frames, s.seen.seq + 1 if s.seen.seq is not None else 0)
            out.streams[name] = {"state": s.state, "frames": frames, "restarts": s.restarts, "error": s.error,
                                 "actor": s.actor}
        return out

    # ------------------------------------------------------------- control handler
    def list_streams(self) -> dict[str, Any]:
        return {"streams": {name: self._entry(s).to_dict() for name, s in self.streams.items()}}

    def add_stream(self, entry: Mapping[str, Any]) -> dict[str, Any]:
        """Validate ``entry`` exactly as a file entry, place it and start it.  The reply
        comes at once (state ``starting``); ``list_streams`` shows its endpoints."""
        defaults = self._defaults()
        spec = parse_stream(dict(entry), defaults, self.options, "add_stream")
        if spec.name in self.streams:
            raise UserError(f"add_stream: stream {spec.name!r} exists already (remove_stream it first)")
        if self._still_leaving(spec.name):
            raise UserError(f"add_stream: stream {spec.name!r} is still stopping (removed moments ago); "
                            "add it again once list_streams no longer shows it starting or stopping")
        check_unique([s.spec for s in self.streams.values()] + [spec], "add_stream",
                     self._control.endpoint if self._control is not None else None)
        self._warn_if_exposed(spec)
        actor = self._place(spec)
        self._add(spec, actor)
        return {"stream": spec.name, "actor": actor.plan.name, "state": StreamState.STARTING}

    def remove_stream(self, name: str) -> dict[str, Any]:
        stream = self.streams.pop(name, None)
        if stream is None:
            raise UserError(f"remove_stream: no stream {name!r}; streams: {sorted(self.streams)}")
        actor = self.actors.get(stream.actor)
        # The reply does not wait for them: the stream flushes and stops on its actor.
        calls = [ref for ref, starting in self._starts.items() if starting is stream]
        if actor is not None and not actor.dead:
            calls.append(actor.handle.stop_stream.remote(name))
        for other in list(self._leaving):  # forget those that have ended
            self._still_leaving(other)
        if calls:
            self._leaving[name] = calls
        if stream.sub is not None:
            stream.sub.close()
        self._dirty = True
        log.info("stream %s removed", name)
        return {"stream": name, "state": "removed"}

    def _still_leaving(self, name: str) -> bool:
        """Whether a removed stream of this name still has a stop or start running."""
        calls = self._leaving.get(name)
        if not calls:
            return False
        _, pending = self._ray.wait(calls, num_returns=len(calls), timeout=0)
        if pending:
            self._leaving[name] = pending
            return True
        del self._leaving[name]
        return False

    # -------------------------------------------------------------------- starting
    def _start(self) -> None:
        ray = require_ray()
        check_directory_writable(self.options.directory)
        self._ray = ray
        if not ray.is_initialized():
            _init_ray(ray, self.options.address)
            self._own_ray = not self.options.address
        self._cluster_gpus = float(ray.cluster_resources().get("GPU", 0.0))
        if self.options.control_endpoint is not None:
            self._control = _FleetControlServer(self.options.control_endpoint, self)
            warn_if_exposed(self._control.endpoint, "fleet control")
            # The directory lists what other machines connect to: not a wildcard.
            self.control_endpoint = connectable(self._control.endpoint, node_address())
            log.info("fleet control on %s", self.control_endpoint)
        specs = {s.name: s for s in self.spec.streams}
        for s in self.spec.streams:
            self._warn_if_exposed(s)
        for plan in plan_actors(self.spec.streams, self.options, self._cluster_gpus):
            actor = self._new_actor(plan, specs[plan.streams[0]].model_key)
            for name in plan.streams:
                self._add(specs[name], actor)
        self._write_directory("running")

    def _warn_if_exposed(self, spec: StreamSpec) -> None:
        """Once per distinct endpoint: masks and control carry no authentication."""
        for endpoint, what in ((spec.config.publish, "publish"), (spec.config.control, "control")):
            if endpoint and (endpoint, what) not in self._warned:
                self._warned.add((endpoint, what))
                warn_if_exposed(endpoint, what)

    def _new_actor(self, plan: ActorPlan, key: ModelKey) -> _Actor:
        ray = self._ray
        assert ray is not None
        self._next_actor = max(self._next_actor, int(plan.name.rsplit("-", 1)[1]) + 1)
        handle = ray.remote(FleetActor).options(
            num_cpus=plan.num_cpus, num_gpus=plan.num_gpus,
            max_restarts=self.options.max_restarts, max_task_retries=0,
            # Threaded: report() answers while start_stream() is still loading the model.
            max_concurrency=8,
            runtime_env={"env_vars": ACTOR_ENV},
        ).remote(plan.name, self.log_level, self.options.fence_after)
        actor = _Actor(plan=plan, key=key, handle=handle)
        self.actors[plan.name] = actor
        log.info("actor %s: %s (%g CPU, %g GPU)", plan.name, ", ".join(plan.streams) or "-",
                 plan.num_cpus, plan.num_gpus)
        return actor

    def _place(self, spec: StreamSpec) -> _Actor:
        """An existing actor with the same model and room, else a new one (on GPUs, by
        default, always a new one: an actor per stream)."""
        key = spec.model_key
        cap = actor_capacity(key, self.options, self._cluster_gpus)
        siblings = [a for a in self.actors.values() if not a.dead and a.key == key]
        load = {a.plan.name: sum(1 for s in self.streams.values() if s.actor == a.plan.name and not s.ended)
                for a in siblings}
        candidates = [a for a in siblings if cap is None or load[a.plan.name] < cap]
        if candidates:
            return min(candidates, key=lambda a: load[a.plan.name])
        plan = plan_added(spec, self.options, self._cluster_gpus, [a.plan for a in siblings],
                          self._next_actor)
        return self._new_actor(plan, key)

    def _add(self, spec: StreamSpec, actor: _Actor) -> None:
        stream = _Stream(spec=spec, actor=actor.plan.name, run_config=spec.run_config())
        self.streams[spec.name] = stream
        self._submit_start(stream, actor)

    def _submit_start(self, stream: _Stream, actor: _Actor) -> None:
        ref = actor.handle.start_stream.remote(stream.run_config, actor.key)
        self._starts[ref] = stream
        stream.starting = True
        self._dirty = True

    def _restart(self, stream: _Stream, actor: _Actor, why: str) -> None:
        """Start ``stream`` again on ``actor`` from its last published masks."""
        # Those still queued in this driver's subscription first: a fenced stream went on
        # tracking while it stopped, and seeding from older masks would publish its seqs again.
        self._drain_stream_masks(stream)
        stream.restarts += 1
        before = stream.run_config.resume or Resume()
        rc = stream.spec.run_config()
        # No word from the actor on what reached its files: the video goes on in a new part.
        rc.resume = replace(resume_from_seen(stream.seen, before, stream.restarts),
                            video_part=before.video_part + 1)
        if stream.node is not None and stream.node == actor.node:
            # Same machine: bind exactly what the first tracker bound, so subscribers
            # and control clients reconnect by themselves.
            rc = with_endpoints(rc, stream.bound.get("publish"), stream.bound.get("control"))
        stream.run_config = rc
        stream.state, stream.error = RESTARTING, None
        log.warning("stream %s: %s; restarting it on %s from its last masks (objects %s, seq %d)",
                    stream.spec.name, why, actor.plan.name, sorted(stream.seen.masks), rc.resume.seq_start)
        self._submit_start(stream, actor)

    # ------------------------------------------------------------------------ loop
    def _serve_control(self) -> None:
        wait_ms = int(min(self.poll_interval, 0.05) * 1000)
        if self._control is not None:
            self._control.poll_once(wait_ms)
        else:
            self._stop.wait(wait_ms / 1000)

    def _collect_starts(self) -> None:
        ray = self._ray
        if not self._starts:
            return
        ready, _ = ray.wait(list(self._starts), num_returns=len(self._starts), timeout=0)
        for ref in ready:
            stream = self._starts.pop(ref)
            name = stream.spec.name
            if self.streams.get(name) is not stream:
                # Removed while starting: the stop may have reached the actor before
                # the start did, so stop it again now that it has started.
                actor = self.actors[stream.actor]
                if name not in self.streams and not actor.dead:
                    self._leaving.setdefault(name, []).append(actor.handle.stop_stream.remote(name))
                continue
            stream.starting = False
            stream.started_at = time.monotonic()
            try:
                report = ray.get(ref)
            except ray.exceptions.RayActorError as exc:
                # The actor died under the call: its report poll sees the restart.
                stream.state = RESTARTING
                stream.error = _first_line(exc)
                self._dirty = True
                continue
            self._update_stream(stream, report, self.actors[stream.actor])

    def _poll_actors(self) -> None:
        ray = self._ray
        now = time.monotonic()
        pending = {a.report_ref: a for a in self.actors.values() if a.report_ref is not None}
        if pending:
            ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=0)
            for ref in ready:
                actor = pending[ref]
                actor.report_ref = None
                try:
                    self._on_report(actor, ray.get(ref))
                except ray.exceptions.ActorDiedError as exc:
                    self._on_actor_dead(actor, exc)
                except ray.exceptions.RayActorError as exc:  # unavailable: being restarted
                    self._on_actor_restarting(actor, exc)
        for actor in self.actors.values():
            if not actor.dead and actor.report_ref is None and now - actor.last_report >= self.poll_interval:
                actor.report_ref = actor.handle.report.remote()
                actor.last_report = now
            elif actor.report_ref is not None and now - actor.last_report >= self.unreachable_after:
                self._on_actor_unanswered(actor, now - actor.last_report)
        self._release_idle_actors()

    def _release_idle_actors(self) -> None:
        """An actor whose streams have all ended (or were removed) gives its CPUs and GPU
        share back: an actor waiting for them (a stream with another model, one added)
        would otherwise wait for good.  A stream added later gets a new actor."""
        for actor in self.actors.values():
            if actor.dead or actor.incarnation is None or actor.report_ref is not None or actor.busy:
                # Gone, not started yet, a report in flight (news may be coming), or still
                # running or closing a stream (a removed one flushes its outputs first).
                continue
            if any(not s.ended for s in self._streams_of(actor)):
                continue
            actor.dead = actor.released = True
            log.info("actor %s: no stream left to run; released (%g CPU, %g GPU)", actor.plan.name,
                     actor.plan.num_cpus, actor.plan.num_gpus)
            try:
                self._ray.kill(actor.handle, no_restart=True)
            except Exception as exc:  # noqa: BLE001 - already gone
                log.debug("kill %s: %s", actor.plan.name, exc)

    def _on_report(self, actor: _Actor, report: dict[str, Any]) -> None:
        restarted = actor.incarnation is not None and report["incarnation"] != actor.incarnation
        actor.incarnation, actor.pid, actor.node = report["incarnation"], report["pid"], report["node"]
        live = (StreamState.STARTING, StreamState.RUNNING, STOPPING)
        actor.busy = bool(report.get("stuck")) or any(r["state"] in live for r in report["streams"].values())
        if actor.unanswered:
            log.warning("actor %s answers again", actor.plan.name)
        actor.unavailable = actor.unanswered = False
        if actor.killed and not restarted:
            return  # the report of the incarnation being killed: its streams are no news
        actor.killed = None
        if restarted:
            actor.restarts += 1
            self._dirty = True
            log.warning("actor %s was restarted by Ray (pid %d on %s, restart %d)",
                        actor.plan.name, actor.pid, actor.node, actor.restarts)
        stuck = tuple(report.get("stuck") or ())
        if stuck != actor.stuck:  # once per change, not once per poll
            actor.stuck = stuck
            if stuck and self.options.hang_timeout:
                # Removed or fenced, but their threads hang on, holding their endpoints.
                self._kill_hung(actor, f"stream(s) {', '.join(stuck)} did not stop when asked (hung)",
                                hung=list(stuck))
                if actor.killed:
                    return
        for stream in self._streams_of(actor):
            if stream.ended or stream.starting or stream.started_at >= actor.last_report:
                continue  # ended, or started after this report was asked for: it may not know
            rep = report["streams"].get(stream.spec.name)
            if rep is None:
                # A restarted actor runs nothing (and one killed before its first
                # report came back may look new): start the stream again.
                why = f"actor {actor.plan.name} was restarted" if restarted else \
                    f"actor {actor.plan.name} does not run it (restarted, or fenced: it had lost the driver)"
                self._restart(stream, actor, why)
            else:
                self._update_stream(stream, rep, actor)

    def _update_stream(self, stream: _Stream, rep: dict[str, Any], actor: _Actor) -> None:
        if rep["state"] == STOPPING:
            return  # fenced, closing its outputs: restarted once the actor no longer lists it
        old = stream.state
        stream.frames = rep.get("frames", stream.frames)
        if rep.get("error") and rep["state"] in (StreamState.STARTING, StreamState.RUNNING):
            # start_stream refused (already running): keep what we knew
            log.warning("stream %s: %s", stream.spec.name, rep["error"])
            return
        stream.state, stream.error = rep["state"], rep.get("error")
        if rep.get("publish"):
            stream.publish, stream.control = rep["publish"], rep.get("control")
            stream.bound = dict(rep.get("bound") or {})
            stream.node = actor.node or stream.node
            self._subscribe(stream)
        silent, hang_timeout = rep.get("silent"), self.options.hang_timeout
        if (hang_timeout and silent is not None and silent > hang_timeout
                and stream.state == StreamState.RUNNING and not actor.killed):
            self._on_stream_hung(stream, actor, silent)
            return
        if stream.state == StreamState.CRASHED:
            limit = self.options.max_restarts
            if limit != -1 and stream.restarts >= limit:
                stream.state = StreamState.FAILED
                stream.error = f"crashed {stream.restarts + 1} time(s), last: {stream.error}"
            else:
                self._restart(stream, actor, f"crashed ({stream.error})")
                return
        if stream.state != old:
            self._dirty = True
            if stream.state == StreamState.FAILED:
                log.error("stream %s failed: %s", stream.spec.name, stream.error)
            elif stream.state == StreamState.RUNNING:
                log.info("stream %s running on %s: publish %s, control %s", stream.spec.name,
                         actor.plan.name, stream.publish, stream.control)
            else:
                log.info("stream %s: %s", stream.spec.name, stream.state)

    def _on_stream_hung(self, stream: _Stream, actor: _Actor, silent: float) -> None:
        hung = f"hung: no sign of life for {silent:.0f} s"
        what = (f"stream {stream.spec.name}: no sign of life from its tracker for {silent:.0f} s "
                f"(hang_timeout {self.options.hang_timeout:g} s)")
        self._kill_hung(actor, what, stream, [stream.spec.name])
        if actor.killed:
            stream.state, stream.error = RESTARTING, hung
        else:  # a thread cannot be stopped alone: it is left, and listed as what it is
            stream.state, stream.error = StreamState.FAILED, f"{hung}; its actor has no restarts left"
            log.error("stream %s failed: %s", stream.spec.name, stream.error)
        self._dirty = True

    def _kill_hung(self, actor: _Actor, what: str, stream: _Stream | None = None,
                   hung: list[str] | None = None) -> None:
        """Log where the ``hung`` streams' threads are, then kill ``actor`` for Ray to
        restart (sets ``actor.killed``), unless Ray would not: then its other streams go on."""
        self._log_stacks(actor, hung or [])
        others = sorted(s.spec.name for s in self._streams_of(actor) if s is not stream and not s.ended)
        limit = self.options.max_restarts
        if limit != -1 and actor.restarts >= limit:
            log.error("%s; actor %s has no restarts left (max_restarts %d): not killed, its other streams "
                      "go on", what, actor.plan.name, limit)
            return
        log.warning("%s: killing actor %s for Ray to restart it%s", what, actor.plan.name,
                    f" (with stream(s) {', '.join(others)})" if others else "")
        actor.killed = what
        self._ray.kill(actor.handle, no_restart=False)

    def _log_stacks(self, actor: _Actor, names: list[str]) -> None:
        """What a hang is waiting on (a write, a lock, the device), as ``run``'s supervisor
        prints it.  The actor answers reports, so this takes milliseconds; the loop waits
        2 s at most, once per hang."""
        ray = self._ray
        ref = actor.handle.stacks.remote(names)
        ready, _ = ray.wait([ref], timeout=2.0)
        try:
            text = ray.get(ready[0]) if ready else None
        except Exception as exc:  # noqa: BLE001 - diagnostics only: the kill goes ahead
            text = f"(no stacks: {_first_line(exc)})"
        if text:
            log.warning("actor %s, where the hung stream(s) are:\n%s", actor.plan.name, text.rstrip())

    def _on_actor_restarting(self, actor: _Actor, exc: BaseException) -> None:
        if not actor.unavailable:  # once per outage, not once per poll
            log.warning("actor %s unavailable (%s); waiting for Ray to restart it", actor.plan.name,
                        _first_line(exc))
        actor.unavailable = True
        for stream in self._streams_of(actor):
            if not stream.ended and stream.state != RESTARTING:
                stream.state, stream.error = RESTARTING, f"actor {actor.plan.name} unavailable"
                self._dirty = True

    def _on_actor_unanswered(self, actor: _Actor, waited: float) -> None:
        if actor.incarnation is None:  # never answered: not created yet
            if not actor.waited:
                try:
                    resources = self._ray.cluster_resources()
                except Exception:  # noqa: BLE001 - a warning's detail only
                    resources = {}
                log.warning("actor %s has not started after %.0f s: Ray is still looking for %g CPU and "
                            "%g GPU for it (the cluster has %g CPU, %g GPU, shared by the fleet's %d "
                            "actors); its stream(s) %s wait. Lower fleet.num_cpus, or run fewer actors",
                            actor.plan.name, waited, actor.plan.num_cpus, actor.plan.num_gpus,
                            resources.get("CPU", 0.0), resources.get("GPU", 0.0),
                            sum(not a.dead for a in self.actors.values()),
                            ", ".join(s.spec.name for s in self._streams_of(actor)) or "-")
            actor.waited = True
            return
        if not actor.unanswered:  # once per silence
            log.warning("actor %s (node %s) has not answered for %.0f s: cut off, or frozen? Ray restarts "
                        "it elsewhere once it declares the node dead; its streams stop themselves after "
                        "fence_after", actor.plan.name, actor.node, waited)
        actor.unanswered = True
        for stream in self._streams_of(actor):
            if stream.state == StreamState.RUNNING:
                stream.state, stream.error = UNREACHABLE, f"actor {actor.plan.name} not answering"
                self._dirty = True

    def _on_actor_dead(self, actor: _Actor, exc: BaseException) -> None:
        actor.dead = True
        cause = f"killed by the fleet ({actor.killed})" if actor.killed else "died"
        why = (f"actor {actor.plan.name} {cause} and Ray will not restart it "
               f"(max_restarts {self.options.max_restarts} used up or node lost): {_first_line(exc)}")
        log.error(why)
        for stream in self._streams_of(actor):
            if not stream.ended:
                stream.state, stream.error = StreamState.FAILED, why
        self._dirty = True

    def _streams_of(self, actor: _Actor) -> list[_Stream]:
        return [s for s in self.streams.values() if s.actor == actor.plan.name]

    def _subscribe(self, stream: _Stream) -> None:
        """Follow the stream's own masks, to re-seed it after a restart."""
        from streamtrack.protocol import masks_topic
        from streamtrack.subscriber import Subscriber

        if stream.sub is not None and stream.sub.endpoints == [stream.publish]:
            return
        if stream.sub is not None:
            stream.sub.close()
        stream.sub = Subscriber(stream.publish, topics=[masks_topic(stream.spec.name)])

    def _drain_masks(self) -> None:
        for stream in self.streams.values():
            self._drain_stream_masks(stream)

    def _drain_stream_masks(self, stream: _Stream) -> None:
        if stream.sub is None:
            return
        while (msg := stream.sub.recv(timeout=0)) is not None:
            if msg.result is not None and msg.stream == stream.spec.name:
                stream.seen.update(msg.result)

    def _all_ended(self) -> bool:
        return not self._starts and all(s.ended for s in self.streams.values())

    # ------------------------------------------------------------------ directory
    def _entry(self, s: _Stream) -> StreamEntry:
        actor = self.actors.get(s.actor)
        return StreamEntry(name=s.spec.name, state=s.state, publish=s.publish, control=s.control,
                           actor=s.actor, actor_pid=actor.pid if actor else None, node=s.node,
                           error=s.error, restarts=s.restarts,
                           # The directory is world-readable and list_streams answers other
                           # machines: a camera's password stays in the fleet file.
                           source=redact_url(s.spec.source))

    def _write_directory(self, state: str) -> None:
        """Once the fleet runs, a failed write (a full disk) stops no stream: it is logged
        once and tried again, at most once a second, until it succeeds."""
        fleet = {"control": self.control_endpoint, "pid": os.getpid(), "host": socket.gethostname(),
                 "state": state, "updated": time.time(), "ray": self.options.address or "local"}
        try:
            write_directory(self.options.directory, [self._entry(s) for s in self.streams.values()], fleet)
        except UserError as e:
            if not self._started.is_set():
                raise
            if state == "stopped":  # the last write, while shutting down
                log.warning("%s", e)
            elif str(e) != self._directory_error:
                log.warning("%s; the streams go on, and it is tried again", e)
            self._directory_error = str(e)
            self._directory_retry_at = time.monotonic() + 1.0
            return
        if self._directory_error:
            log.warning("fleet directory %s written again", self.options.directory)
            self._directory_error = ""
        self._dirty = False
        self._directory_written = _file_identity(self.options.directory)
        self._directory_checked_at = time.monotonic()

    def _directory_intact(self) -> bool:
        """Whether the directory file is still the one last written, looked at once a second:
        one deleted or overwritten (by hand, a cleanup job) is written again, else new
        clients would find no fleet until the next change."""
        if time.monotonic() - self._directory_checked_at < 1.0:
            return True
        self._directory_checked_at = time.monotonic()
        now = _file_identity(self.options.directory)
        if now == self._directory_written:
            return True
        other = written_by(self.options.directory)
        if other is not None and other != (socket.gethostname(), os.getpid()):
            # Two fleets given one directory file: say so once, rather than take turns
            # rewriting it every second.  Our next change writes it again, as before.
            log.warning("fleet directory %s is written by another fleet too (pid %s on %s): give each "
                        "fleet a directory of its own", self.options.directory, other[1], other[0])
            self._directory_written = now
            return True
        return False

    def _defaults(self) -> dict[str, Any]:
        return self.spec.defaults

    # ------------------------------------------------------------------- shutdown
    def _shutdown(self) -> None:
        ray = self._ray
        for s in self.streams.values():
            if s.sub is not None:
                s.sub.close()
                s.sub = None
        try:
            if ray is not None and ray.is_initialized():
                self._stop_actors(ray)
        finally:
            # Also when Ray itself is gone (a service manager's SIGTERM reached its
            # processes too): the directory must not go on saying "running".
            for s in self.streams.values():
                if not s.ended:
                    s.state = StreamState.STOPPED
            if self._control is not None:
                self._control.close()
            if self._started.is_set():
                self._write_directory("stopped")

    def _note_final_frames(self, actor: _Actor, ref) -> None:
        try:
            frames = self._ray.get(ref)
        except Exception as exc:  # noqa: BLE001 - the actor died while stopping
            log.debug("stop %s: %s", actor.plan.name, exc)
            return
        for stream in self._streams_of(actor):
            stream.frames = max(stream.frames, frames.get(stream.spec.name, 0))

    def _stop_actors(self, ray) -> None:
        live = [a for a in self.actors.values() if not a.dead]
        try:
            refs = {a.handle.stop_all.remote(10.0): a for a in live}
            if refs:
                ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=15)  # best effort
                for ref in ready:  # the frames tracked while stopping count too
                    self._note_final_frames(refs[ref], ref)
            for a in live:
                try:
                    ray.kill(a.handle, no_restart=True)
                except Exception as exc:  # noqa: BLE001 - already gone
                    log.debug("kill %s: %s", a.plan.name, exc)
        except Exception as exc:  # noqa: BLE001 - Ray itself going down (a signal to every process)
            log.warning("stopping the actors: %s", _first_line(exc))
        finally:
            if self._own_ray:
                try:
                    ray.shutdown()
                except Exception as exc:  # noqa: BLE001
                    log.warning("shutting Ray down: %s", _first_line(exc))


class _FleetControlServer(ControlServer):
    """The fleet's control endpoint: ControlServer's transport and error handling,
    the fleet's commands (JSON only, every field checked)."""

    COMMANDS = ("list_streams", "add_stream", "remove_stream")

    def execute(self, request: Any) -> Mapping[str, Any] | None:
        fleet: Fleet = self.handler  # type: ignore[assignment]
        if not isinstance(request, Mapping):
            raise UserError(f"request must be a JSON object, got {type(request).__name__}")
        cmd = request.get("cmd")
        if cmd not in self.COMMANDS:
            raise UserError(f"unknown cmd {cmd!r}; expected one of {list(self.COMMANDS)}")
        fields = {k: v for k, v in request.items() if k not in ("cmd", "id")}
        if cmd == "add_stream":
            return fleet.add_stream(fields)
        allowed = {"remove_stream": {"name"}, "list_streams": set()}[cmd]
        unknown = set(fields) - allowed
        if unknown:
            raise UserError(f"{cmd}: unknown field(s) {sorted(map(str, unknown))}; "
                            f"allowed: {sorted(allowed)}")
        if cmd == "list_streams":
            return fleet.list_streams()
        if not isinstance(fields.get("name"), str):
            raise UserError("remove_stream needs name (a string)")
        return fleet.remove_stream(fields["name"])


def _file_identity(path: str | os.PathLike) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def _init_ray(ray, address: str | None) -> None:
    # ray.init replaces the SIGTERM handler with sys.exit(15): the fleet's own (a stop with
    # outputs flushed, the summary and exit code 143) is put back.
    ours = signal.getsignal(signal.SIGTERM)
    try:
        _connect_ray(ray, address)
    finally:
        if threading.current_thread() is threading.main_thread() and ours is not None:
            signal.signal(signal.SIGTERM, ours)


def _connect_ray(ray, address: str | None) -> None:
    if not address:
        log.info("starting a local Ray instance")
        # "local": a new instance even if `ray start` left one running on this machine.
        ray.init(address="local", log_to_driver=True)
        return
    log.info("connecting to the Ray cluster at %s", address)
    _check_reachable(address)
    try:
        ray.init(address=address, log_to_driver=True)
    except Exception as exc:  # ConnectionError, RuntimeError, ValueError: all "cannot connect"
        hint = ""
        if "RAY_AUTH_MODE" not in os.environ:
            hint = (" (a cluster started with token authentication, Ray's default, needs "
                    "RAY_AUTH_MODE=token and its token in ~/.ray/auth_token on this machine too)")
        raise UserError(f"cannot connect to the Ray cluster at {address}: {_first_line(exc)}{hint}") from None


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """A HOST:PORT that nobody listens on fails here in seconds: Ray itself keeps
    retrying for minutes."""
    import socket

    if "://" in address or address == "auto":
        return  # ray:// (Ray Client) and "auto" are Ray's to resolve
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise UserError(f"Ray address {address!r}: expected HOST:PORT, auto or ray://HOST:PORT")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as exc:
        raise UserError(f"cannot connect to the Ray cluster at {address}: {exc.strerror or exc} "
                        "(is `ray start --head` running there?)") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
