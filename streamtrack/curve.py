"""Optional CURVE encryption and client authentication for the ZeroMQ sockets.

Off by default: on loopback nobody else can connect anyway.  For non-local use the
tracker (PUB and control ROUTER sockets) acts as a CURVE server with one key pair,
and only clients whose public key sits in an "authorised clients" folder get in;
everything on the wire is encrypted.  Built on pyzmq's own tools: certificates
from :func:`zmq.auth.create_certificates`, read with :func:`zmq.auth.load_certificate`,
and a :class:`zmq.auth.thread.ThreadAuthenticator` answering ZeroMQ's ZAP requests.

An unauthorised client is refused inside ZeroMQ during the handshake: it sees no
error, it simply receives nothing (a control request times out).

Key files (``streamtrack keys DIR``)::

    server.key          server public key   -> every client (--curve-server-key)
    server.key_secret   server key pair     -> the tracker only (--curve-secret)
    client.key          client public key   -> the tracker's clients/ folder
    client.key_secret   client key pair     -> that client only (--curve-secret)
    clients/            authorised client public keys (--curve-clients)
"""

from __future__ import annotations

import argparse
import errno
import os
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

from streamtrack.errors import UserError, existing_file, looking_into

CLIENTS_DIR = "clients"
_Z85_KEY_LEN = 40  # a 32-byte CURVE key in Z85 text


def require_curve() -> None:
    """Raise a one-line :class:`UserError` when libzmq was built without CURVE."""
    if not zmq.has("curve"):
        raise UserError(
            f"CURVE security is not available: this libzmq ({zmq.zmq_version()}) was built "
            "without it (install a pyzmq wheel, which bundles libzmq with CURVE)"
        )


def _check_key(key: bytes | None, path: Path, what: str, which: str) -> bytes:
    try:
        ok = key is not None and len(key) == _Z85_KEY_LEN and len(z85.decode(key)) == 32
    except Exception:  # noqa: BLE001 - z85.decode raises assorted errors on bad text
        ok = False
    if not ok:
        raise UserError(f"{what} {path}: the {which} key is not a 40-character Z85 CURVE key")
    assert key is not None
    return key


def load_cert(path: str | os.PathLike[str], what: str, *, secret: bool) -> tuple[bytes, bytes | None]:
    """(public, secret) Z85 keys of a certificate file; every problem is one line naming it.

    ``secret=True`` requires the secret half too (a ``.key_secret`` file) and checks
    that it belongs to the public key in the same file.
    """
    require_curve()
    p = existing_file(path, what)
    try:
        public, secret_key = zmq.auth.load_certificate(p)
    except (OSError, ValueError) as exc:
        raise UserError(f"{what} {p}: not a ZeroMQ certificate ({exc})") from None
    public = _check_key(public, p, what, "public")
    if not secret:
        return public, None
    if secret_key is None:
        raise UserError(f"{what} {p}: no secret key in it (give the .key_secret file, "
                        "not the public .key)")
    secret_key = _check_key(secret_key, p, what, "secret")
    if zmq.curve_public(secret_key) != public:
        raise UserError(f"{what} {p}: its public and secret keys do not belong together")
    return public, secret_key


def load_clients(folder: str | os.PathLike[str]) -> dict[bytes, bool]:
    """The authorised client public keys in ``folder`` (``*.key``), as pyzmq loads them."""
    d = Path(folder)
    if not str(folder).strip():  # an unset shell variable; Path("") is the current folder
        raise UserError("CURVE clients folder: empty path")
    with looking_into(d, "CURVE clients folder"):
        if not d.is_dir():
            raise UserError(f"CURVE clients folder {d}: " + ("a file, not a folder" if d.exists()
                                                              else "no such folder"))
    files = sorted(d.glob("*.key"))
    if not files:
        raise UserError(f"CURVE clients folder {d}: no client public keys (*.key) in it, "
                        "so no client could connect (copy each client's .key file there)")
    for f in files:  # pyzmq would only log a bad file and then refuse everyone
        load_cert(f, "CURVE client key", secret=False)
    return zmq.auth.load_certificates(d)


# ----------------------------------------------------------------------- settings


@dataclass(frozen=True)
class ServerKeys:
    public: bytes
    secret: bytes
    clients_dir: Path

    def apply(self, sock: zmq.Socket) -> None:
        """Make ``sock`` a CURVE server (before it binds)."""
        sock.setsockopt(zmq.CURVE_SECRETKEY, self.secret)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, self.public)
        sock.setsockopt(zmq.CURVE_SERVER, 1)


@dataclass(frozen=True)
class ClientKeys:
    server_public: bytes
    public: bytes
    secret: bytes

    def apply(self, sock: zmq.Socket) -> None:
        """Make ``sock`` a CURVE client of that server (before it connects)."""
        sock.setsockopt(zmq.CURVE_SERVERKEY, self.server_public)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, self.public)
        sock.setsockopt(zmq.CURVE_SECRETKEY, self.secret)


@dataclass(frozen=True)
class CurveServer:
    """Server side: the server's secret certificate and the folder of authorised
    client public keys (read once, when the socket is set up)."""

    secret_file: str
    clients_dir: str

    def load(self) -> ServerKeys:
        public, secret = load_cert(self.secret_file, "CURVE server secret key", secret=True)
        assert secret is not None
        load_clients(self.clients_dir)
        return ServerKeys(public, secret, Path(self.clients_dir).resolve())

    def as_client(self) -> CurveClient:
        """Credentials for a client that holds the server's own key pair (the
        supervisor re-seeding a restarted tracker, the ``--show`` window): the
        server's secret certificate also carries its public key."""
        return CurveClient(server_key_file=self.secret_file, secret_file=self.secret_file)


@dataclass(frozen=True)
class CurveClient:
    """Client side: the server's public certificate and this client's secret one."""

    server_key_file: str
    secret_file: str

    def load(self) -> ClientKeys:
        server, _ = load_cert(self.server_key_file, "CURVE server key", secret=False)
        public, secret = load_cert(self.secret_file, "CURVE client secret key", secret=True)
        assert secret is not None
        return ClientKeys(server, public, secret)


def server_from_options(secret_file: str | None, clients_dir: str | None) -> CurveServer | None:
    """``--curve-secret`` / ``--curve-clients`` (or config keys): both or neither."""
    if not secret_file and not clients_dir:
        return None
    if not secret_file or not clients_dir:
        raise UserError("CURVE needs both curve_secret (--curve-secret FILE, the server's "
                        ".key_secret) and curve_clients (--curve-clients DIR)")
    return CurveServer(secret_file, clients_dir)


def client_from_options(server_key: str | None, secret_file: str | None) -> CurveClient | None:
    """``--curve-server-key`` / ``--curve-secret`` on client commands: both or neither."""
    if not server_key and not secret_file:
        return None
    if not server_key or not secret_file:
        raise UserError("CURVE needs both --curve-server-key FILE (the server's public .key) "
                        "and --curve-secret FILE (this client's .key_secret)")
    return CurveClient(server_key, secret_file)


# ------------------------------------------------------------------ authenticator


class _Shared:
    def __init__(self, context: zmq.Context, keys: ServerKeys) -> None:
        self.context = context
        self.keys = keys
        self.users = 0
        self.auth = _start_authenticator(context)
        try:
            self.auth.configure_curve(domain="*", location=str(keys.clients_dir))
            # The holder of the server's own key pair is trusted too, so the supervisor
            # (and a --show window) can subscribe without a key in the clients folder.
            self.auth.certs.setdefault("*", {})[keys.public] = True
        except BaseException:
            self.auth.stop()
            raise


def _start_authenticator(context: zmq.Context) -> ThreadAuthenticator:
    """Start a ZAP handler in ``context``.

    libzmq releases the handler's inproc address only when the reaper thread has
    destroyed the previous handler's socket, a moment after it was closed, so a
    socket re-created right after the last one closed may have to wait for it.
    """
    deadline = time.monotonic() + 2.0
    while True:
        auth = ThreadAuthenticator(context)
        try:
            auth.start()
            return auth
        except zmq.ZMQError as exc:
            auth.stop()  # closes the half-started handler's socket
            if exc.errno != errno.EADDRINUSE:
                raise
            if time.monotonic() > deadline:
                raise UserError("another ZeroMQ authenticator (ZAP handler) already runs in this "
                                "context; give the CURVE sockets their own zmq.Context()") from None
            time.sleep(0.01)


_lock = threading.Lock()
_shared: dict[int, _Shared] = {}  # id(context) -> its authenticator


class AuthLease:
    """A socket's hold on its context's authenticator; the last :meth:`close` stops it.

    ZeroMQ allows one ZAP handler per context, so the CURVE sockets of one context share
    it (a :class:`~streamtrack.publisher.Publisher` made without a context has one of
    its own, and so its own authenticator).
    """

    def __init__(self, shared: _Shared) -> None:
        self._shared: _Shared | None = shared

    def close(self) -> None:
        with _lock:
            shared, self._shared = self._shared, None
            if shared is None:
                return
            shared.users -= 1
            if shared.users > 0:
                return
            _shared.pop(id(shared.context), None)
        shared.auth.stop()


def secure_server(sock: zmq.Socket, curve: CurveServer, context: zmq.Context) -> AuthLease:
    """Make ``sock`` a CURVE server with client authentication; call before bind.

    The authenticator must run before the socket accepts a connection: without a
    ZAP handler libzmq lets any client that knows the server key in.
    """
    keys = curve.load()
    with _lock:
        shared = _shared.get(id(context))
        if shared is not None and shared.context is context:
            if (shared.keys.public, shared.keys.clients_dir) != (keys.public, keys.clients_dir):
                raise UserError("this ZeroMQ context already authenticates CURVE clients with "
                                f"other keys ({shared.keys.clients_dir}); give each CURVE "
                                "configuration its own zmq.Context()")
        else:
            shared = _Shared(context, keys)
            _shared[id(context)] = shared
        shared.users += 1
        lease = AuthLease(shared)
    try:
        keys.apply(sock)
    except BaseException:
        lease.close()
        raise
    return lease


# ------------------------------------------------------------------------ keys CLI


@dataclass(frozen=True)
class KeyFiles:
    folder: Path
    server_public: Path
    server_secret: Path
    client_public: Path
    client_secret: Path
    authorised: Path  # the copy of client_public in clients/
    server_created: bool


def make_keys(folder: str | os.PathLike[str], client: str | None = None, *,
              force: bool = False) -> KeyFiles:
    """Write CURVE certificates into ``folder``.

    Without ``client``: the server key pair and a client pair named ``client``
    (``force`` replaces both).  With ``client``: one more client pair, keeping the
    server pair (made only if missing; ``force`` replaces only that client's pair).
    Each client's public key is copied into ``clients/``, which authorises it.
    """
    require_curve()
    if not str(folder).strip():  # an unset shell variable: not the current folder
        raise UserError("key folder: empty path (name the folder the keys go in)")
    name = "client" if client is None else client
    if not name or name == "server" or name.startswith(".") or any(c in name for c in "/\\ "):
        raise UserError(f"client name {name!r}: use letters, digits, '-' or '_' (not 'server')")
    d = Path(folder)
    try:
        (d / CLIENTS_DIR).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create key folder {d}: {exc.strerror or exc}") from None
    server_pub, server_sec = d / "server.key", d / "server.key_secret"
    client_pub, client_sec = d / f"{name}.key", d / f"{name}.key_secret"
    authorised = d / CLIENTS_DIR / f"{name}.key"
    make_server = not (server_pub.exists() or server_sec.exists()) or (force and client is None)
    if not make_server and not (server_pub.exists() and server_sec.exists()):
        raise UserError(f"{d}: only half of the server key pair is there; "
                        f"`streamtrack keys {d} --force` makes a new set")
    targets = [client_pub, client_sec, authorised] + ([server_pub, server_sec] if make_server else [])
    for f in targets:
        if f.exists() and not force:
            raise UserError(f"{f} already exists (--force replaces it)")
    try:
        if make_server:
            _owner_only_file(server_sec)
            zmq.auth.create_certificates(d, "server")
        _owner_only_file(client_sec)
        zmq.auth.create_certificates(d, name)
        shutil.copyfile(client_pub, authorised)
    except OSError as exc:
        raise UserError(f"cannot write keys in {d}: {exc.strerror or exc}") from None
    return KeyFiles(d, server_pub, server_sec, client_pub, client_sec, authorised, make_server)


def _owner_only_file(path: Path) -> None:
    """An empty file only its owner may read, made before a secret key is written into it:
    pyzmq writes key files with a plain ``open()``, which under the usual umask leaves the
    secret readable by anyone until a chmod afterwards (and for good, should the process
    die in between).  Its ``open()`` keeps the mode of a file that is there."""
    path.unlink(missing_ok=True)
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))


def _cmd_keys(args: argparse.Namespace) -> int:
    k = make_keys(args.folder, args.client, force=args.force)
    d = k.folder
    written = [k.client_public, k.client_secret, k.authorised]
    if k.server_created:
        written = [k.server_public, k.server_secret, *written]
    print(f"wrote {', '.join(str(f) for f in written)}\n"
          f"on the tracker machine: {k.server_secret} (secret) and {d / CLIENTS_DIR}/ "
          "(public keys of the authorised clients):\n"
          f"    streamtrack run SOURCE --publish tcp://0.0.0.0:5555 --control tcp://0.0.0.0:5556 "
          f"--curve-secret {k.server_secret} --curve-clients {d / CLIENTS_DIR}\n"
          f"on the client machine: {k.server_public} (public) and {k.client_secret} "
          "(secret: copy it to this client only):\n"
          f"    streamtrack subscribe tcp://TRACKER:5555 --curve-server-key {k.server_public.name} "
          f"--curve-secret {k.client_secret.name}\n"
          f"more clients: streamtrack keys {d} --client NAME, then restart the tracker (it reads "
          f"{CLIENTS_DIR}/ when it starts); revoke one by deleting {CLIENTS_DIR}/NAME.key and restarting")
    return 0


def add_parser(sub, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("keys", parents=[common],
                       help="make CURVE keys (encryption + client authentication) for non-local use")
    p.add_argument("folder", help="where to write server.key[_secret], client.key[_secret], clients/")
    p.add_argument("--client", metavar="NAME",
                   help="add one more client key pair NAME (keeps the server pair); "
                        "default: the server pair and a pair named client")
    p.add_argument("--force", action="store_true",
                   help="replace existing keys (with --client: only that client's)")
    p.set_defaults(func=_cmd_keys)


def add_client_options(p: argparse.ArgumentParser) -> None:
    """``--curve-server-key`` / ``--curve-secret`` for client commands (subscribe, view)."""
    p.add_argument("--curve-server-key", metavar="FILE",
                   help="CURVE: the tracker's public server.key (with --curve-secret)")
    p.add_argument("--curve-secret", metavar="FILE",
                   help="CURVE: this client's .key_secret, authorised on the tracker")


def client_from_args(args: argparse.Namespace) -> CurveClient | None:
    curve = client_from_options(getattr(args, "curve_server_key", None),
                                getattr(args, "curve_secret", None))
    if curve is not None:
        curve.load()  # bad key files fail now, with one line, before any socket exists
    return curve
