"""The fleet's directory of endpoints: a small JSON file, stream name -> endpoints.

``streamtrack fleet`` rewrites it whenever a stream starts, moves (its actor was
restarted, maybe on another node), fails or is removed, so clients need not know
how streams were placed::

    {"v": 1,
     "fleet": {"control": "tcp://127.0.0.1:5600", "pid": 4242, "host": "head-1", "state": "running",
               "updated": 1.7e9},
     "streams": {"lobby": {"publish": "tcp://127.0.0.1:41234", "control": "tcp://127.0.0.1:41235",
                           "actor": "fleet-0", "actor_pid": 4300, "node": "127.0.0.1",
                           "state": "running", "error": null, "restarts": 0, "source": "lobby.mp4"}}}

Endpoints are the ones to *connect* to (a wildcard bind is listed with the node's
address).  This module only reads and writes the file: it needs neither Ray nor
a running fleet, so :class:`streamtrack.subscriber.Subscriber` can use it.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from streamtrack import childproc
from streamtrack.errors import UserError, error_reason, file_in_the_way

VERSION = 1


@dataclass(frozen=True)
class StreamEntry:
    """One stream as the directory lists it."""

    name: str
    state: str  # starting | running | restarting | done | failed | stopped
    publish: str | None = None
    control: str | None = None
    actor: str | None = None
    actor_pid: int | None = None
    node: str | None = None
    error: str | None = None
    restarts: int = 0
    source: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        del d["name"]
        return d


# Files are created as open() would (mkstemp makes them 0600): clients run by other users
# read the directory.  Read once, while importing (setting the umask to read it is not
# thread-safe).
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def write_directory(path: str | Path, streams: list[StreamEntry], fleet: dict[str, Any]) -> None:
    """Write the directory atomically (a reader never sees half a file); :class:`UserError`
    naming the file if it cannot be written (a full disk, a read-only folder)."""
    path = Path(path)
    doc = {"v": VERSION, "fleet": fleet, "streams": {s.name: s.to_dict() for s in streams}}
    try:
        _write_atomically(path, doc)
    except OSError as e:
        raise _cannot_write(path, e) from None


def check_directory_writable(path: str | Path) -> None:
    """:class:`UserError` now, before any stream starts, if the directory cannot be written."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise _cannot_write(path, e) from None
    if path.is_dir():
        raise UserError(f"fleet directory {path} is a folder; give a file name")


def _cannot_write(path: Path, e: OSError) -> UserError:
    above = file_in_the_way(path)
    reason = f"{above} is a file, not a folder" if above is not None else error_reason(e)
    return UserError(f"cannot write the fleet directory {path}: {reason}")


def _write_atomically(path: Path, doc: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f, indent=1)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_directory(path: str | Path) -> dict[str, StreamEntry]:
    """The streams of a directory file; :class:`UserError` naming the file otherwise."""
    doc = _read_doc(path)
    return _entries(doc["streams"], f"fleet directory {path}")


def _read_doc(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"fleet directory {path} not found (is `streamtrack fleet` running?)") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"fleet directory {path}: cannot read JSON ({exc})") from None
    if not isinstance(doc, dict) or doc.get("v") != VERSION or not isinstance(doc.get("streams"), dict):
        raise UserError(f"fleet directory {path}: not a streamtrack fleet directory (v{VERSION})")
    return doc


def fleet_gone(path: str | Path) -> str | None:
    """Why the fleet that wrote this directory file no longer runs (it stopped, or its
    process on this host is gone: killed, crashed), or None when it may still run."""
    fleet = _read_doc(path).get("fleet")
    if not isinstance(fleet, dict):
        return None
    if fleet.get("state") == "stopped":
        return "the fleet has stopped"
    pid = fleet.get("pid")
    if fleet.get("host") == socket.gethostname() and isinstance(pid, int) and pid > 0 \
            and not childproc.pid_alive(pid):
        return f"the fleet (pid {pid}) is not running"
    return None


def written_by(path: str | Path) -> tuple[str, int] | None:
    """(host, pid) of the fleet that wrote this directory file; None if it is not one."""
    try:
        fleet = _read_doc(path).get("fleet")
    except UserError:
        return None
    if not isinstance(fleet, dict) or not isinstance(fleet.get("pid"), int):
        return None
    return str(fleet.get("host")), fleet["pid"]


def _entries(streams: dict, where: str) -> dict[str, StreamEntry]:
    out: dict[str, StreamEntry] = {}
    for name, entry in streams.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("state"), str):
            raise UserError(f"{where}: stream {name!r} is malformed")
        known = {k: entry[k] for k in StreamEntry.__dataclass_fields__ if k in entry and k != "name"}
        out[name] = StreamEntry(name=name, **known)
    return out


def fleet_streams(fleet: str | Path, timeout: float = 2.0) -> dict[str, StreamEntry]:
    """The streams a fleet lists: read from its directory file, or asked of its control
    endpoint (``list_streams``) when ``fleet`` is a ZeroMQ endpoint, which needs no shared
    file system: what a client on another machine uses."""
    if "://" not in str(fleet):
        return read_directory(fleet)
    from streamtrack.control import ControlClient

    with ControlClient(str(fleet), timeout=timeout) as client:
        reply = client.request({"cmd": "list_streams"})
    if not reply["ok"] or not isinstance(reply.get("streams"), dict):
        raise UserError(f"{_where(fleet)}: list_streams failed: {reply.get('error', reply)}")
    return _entries(reply["streams"], _where(fleet))


def _where(fleet: str | Path) -> str:
    """How errors name a fleet's listing: its directory file or its control endpoint."""
    return f"fleet control {fleet}" if "://" in str(fleet) else f"fleet directory {fleet}"


def publish_endpoints(fleet: str | Path, streams: list[str] | None = None, *,
                      require: bool = True, timeout: float = 2.0) -> list[str]:
    """The publish endpoints a fleet lists (see :func:`fleet_streams`) for ``streams``, or
    for every stream that has one, in stream-name order.  ``require``: a
    :class:`UserError` when the fleet has stopped, when a named stream is unknown, or when
    no stream has an endpoint and none will (all ended or failed; streams still starting
    get theirs soon, and a fleet with no streams yet gets them with ``add_stream``)."""
    entries = fleet_streams(fleet, timeout)
    where = _where(fleet)
    gone = fleet_gone(fleet) if require and "://" not in str(fleet) else None
    if gone is not None:
        raise UserError(f"{where}: {gone}")
    missing = [s for s in streams or () if s not in entries]
    if missing and require:
        raise UserError(f"{where}: no stream(s) {missing}; listed: {sorted(entries)}")
    names = sorted(entries) if streams is None else [s for s in streams if s in entries]
    eps = [entries[n].publish for n in names if entries[n].publish]
    coming = [n for n in names if entries[n].state in COMING_STATES]
    if not eps and not coming and names and require:
        states = ", ".join(f"{n} {entries[n].state}" for n in names)
        raise UserError(f"{where}: no stream has a publish endpoint ({states})")
    return eps  # type: ignore[return-value]


# States of a stream that will have (new) endpoints soon, and of one that has ended.
COMING_STATES = ("starting", "restarting")
ENDED_STATES = ("done", "failed", "stopped")


def fleet_stream(fleet: str | Path, name: str | None, timeout: float = 2.0, *,
                 wait: Callable[[StreamEntry], None] | None = None) -> StreamEntry:
    """One stream of a fleet (see :func:`fleet_streams`), to view or prompt it: ``name``, or
    the only stream there is; a :class:`UserError` saying which streams there are otherwise.
    A stream that has ended is refused (a failed one with its error), also when the
    directory still lists its endpoints.  With ``wait``, a stream that is starting or
    restarting is waited for until it runs (``wait`` is called with its entry once, to
    tell the user), not refused; waiting ends with an error if the fleet is gone."""
    told = False
    while True:
        entries = fleet_streams(fleet, timeout)
        if name is None:
            if len(entries) != 1:
                raise UserError(f"fleet {fleet} has streams {sorted(entries)}: pick one with --stream")
            name = next(iter(entries))
        entry = entries.get(name)
        if entry is None:
            raise UserError(f"fleet {fleet} has no stream {name!r}; streams: {sorted(entries)}")
        waits = wait is not None and entry.state in COMING_STATES
        if entry.state in ENDED_STATES or not (entry.publish or waits):
            raise UserError(f"fleet stream {name!r} is {entry.state}"
                            + ("" if entry.publish else " and has no endpoint")
                            + (f": {entry.error}" if entry.error else ""))
        if not waits:
            return entry
        if "://" not in str(fleet) and (gone := fleet_gone(fleet)):
            raise UserError(f"fleet stream {name!r} is {entry.state}, but {gone} (start it again)")
        if not told:
            wait(entry)
            told = True
        time.sleep(0.5)


def fleet_address(fleet: str) -> str:
    """A fleet named on the command line with ``--fleet``: its directory file as given,
    or its control endpoint in any form :func:`normalize_endpoint` takes (``5555``,
    ``host:port``), which the readers here tell from a file by its ``://``."""
    if is_directory_file(fleet) or Path(fleet).is_file():
        return fleet
    from streamtrack.protocol import normalize_endpoint

    return normalize_endpoint(fleet)


def is_directory_file(endpoint: object) -> bool:
    """True when ``endpoint`` names a directory file rather than a ZeroMQ endpoint."""
    if not isinstance(endpoint, (str, Path)):
        return False
    return str(endpoint).endswith(".json") and "://" not in str(endpoint)
