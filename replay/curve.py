"""Optional ZeroMQ CURVE security for the replay sockets (for use across machines).

Keys are ZeroMQ certificate files as ``zmq.auth.create_certificates`` writes them:
``NAME.key`` (the public key, safe to hand out) and ``NAME.key_secret`` (public and secret
key; keep it private). Make a pair with ``python -m flowrl_async.replay.curve DIR NAME``.

- Server: its secret certificate (``--curve-secret-key``). Traffic is encrypted and clients
  know they talk to the right server. Optionally ``--curve-authorized-keys DIR``: only
  clients whose public certificate is in DIR may connect (the directory is read again
  whenever it changed: a new client needs no restart, a deleted key is refused from the
  next handshake and the next request on, a file that does not parse is skipped). Without
  it, any client that knows the server's public key may connect: encryption, not access
  control.
- Roles: when DIR has a ``learner/`` subdirectory, a key in ``DIR/learner/`` is the
  learner's (every request) and a key in DIR itself an actor's (``ACTOR_REQUESTS``:
  insert, admit, release, stats; never the version, sample, checkpoint, prune or rewind).
  The server reads each request's key from its ZAP User-Id. Without ``learner/`` every
  authorized key may make every request (and the server says so when it starts).
- Client: the server's public certificate (``curve_server_key``), and its own secret
  certificate (``curve_client_key``) where the server checks clients; without one it uses a
  fresh key pair.

A client without the right keys never completes the handshake: its requests go
unanswered (``ReplayError`` after its retries) and the server sees nothing.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator


def _need_curve() -> None:
    if not zmq.has("curve"):
        raise RuntimeError("this libzmq has no CURVE support (it needs libsodium)")


def load_public(key: str | Path | bytes) -> bytes:
    """A z85 public key: given as is (bytes), or read from a certificate file."""
    if isinstance(key, bytes):
        return key
    path = Path(key)
    if not path.is_file():
        raise FileNotFoundError(f"no CURVE certificate at {path}")
    public, _ = zmq.auth.load_certificate(path)
    if not public:
        raise ValueError(f"no public key in {path}")
    return public


def load_secret(path: str | Path) -> tuple[bytes, bytes]:
    """(public, secret) z85 keys from a secret certificate file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no CURVE certificate at {path}")
    public, secret = zmq.auth.load_certificate(path)
    if not secret:
        raise ValueError(f"no secret key in {path}: give the .key_secret certificate")
    return public, secret


@dataclass(frozen=True)
class ServerCurve:
    """The server's CURVE keys and the ZAP handler that admits clients."""

    public: bytes
    secret: bytes
    authorized_dir: Path | None = None

    @classmethod
    def from_files(cls, secret_file: str | Path, authorized_dir: str | Path | None = None):
        _need_curve()
        public, secret = load_secret(secret_file)
        if authorized_dir is not None and not Path(authorized_dir).is_dir():
            raise FileNotFoundError(f"no directory of authorized client keys at {authorized_dir}")
        return cls(public, secret, None if authorized_dir is None else Path(authorized_dir))

    def apply(self, sock: zmq.Socket) -> None:
        sock.curve_secretkey = self.secret
        sock.curve_publickey = self.public
        sock.curve_server = True

    def start_authenticator(self, ctx: zmq.Context):
        """With ``authorized_dir``: a ZAP handler on ``ctx`` (one per context) that lets in
        the keys of that directory and the server's own (its in-process helpers use it);
        -> (the handler, the keys: ``AuthorizedKeys.role``), or (None, None)."""
        if self.authorized_dir is None:
            return None, None
        keys = AuthorizedKeys(self.authorized_dir, self.public)
        if not keys.roles_on:
            print(f"replay CURVE: {self.authorized_dir} has no learner/ directory: every "
                  "authorized key may make every request", file=sys.stderr)  # fmt: skip
        auth = ThreadAuthenticator(ctx)
        auth.start()
        auth.configure_curve_callback("*", keys)
        return auth, keys


ANY, LEARNER, ACTOR = "any", "learner", "actor"
RECHECK_S = 1.0  # a request's key is checked against the directories at most this often
ACTOR_REQUESTS = frozenset({"insert", "insert_batch", "admit", "release", "stats"})


def allowed(role: str | None, msg_type: str, msg: dict) -> bool:
    """Whether a client of ``role`` may make this request (None: its key is not authorized
    any more). An actor's ``admit`` may not carry the learner's version."""
    if role in (ANY, LEARNER):
        return True
    return (
        role == ACTOR
        and msg_type in ACTOR_REQUESTS
        and not (msg_type == "admit" and "version" in msg)
    )


class AuthorizedKeys:
    """The ZAP callback and the key -> role map: the public keys of ``DIR/*.key`` (actors)
    and ``DIR/learner/*.key`` (the learner), read again whenever either directory changed
    (a key added is let in, a key deleted is refused from the next handshake on, and the
    requests of connections it made within ``RECHECK_S``). A file that does not parse (e.g.
    half written) is skipped and reported, never raised: an exception here would kill
    pyzmq's authenticator thread, after which every handshake hangs."""

    def __init__(self, directory: Path, own: bytes):
        self.directory, self.own = directory, own
        self.lock = threading.Lock()
        self.keys: dict[bytes, str] = {}  # z85 public key -> role
        self.seen: tuple = ()
        self.bad_files = 0  # key files skipped because they did not parse
        self.checked = time.monotonic()  # when the directories were last compared
        self._load()

    @property
    def roles_on(self) -> bool:
        return (self.directory / LEARNER).is_dir()

    def _files(self) -> list[tuple[Path, str]]:
        if not self.roles_on:
            return [(p, ANY) for p in self.directory.glob("*.key")]
        found = [(p, ACTOR) for p in self.directory.glob("*.key")]
        return found + [(p, LEARNER) for p in (self.directory / LEARNER).glob("*.key")]

    def _state(self) -> tuple:
        out = []
        for p, role in self._files():
            try:  # a file replaced in place changes its inode or ctime, whatever its size
                st = p.stat()
            except FileNotFoundError:  # deleted between the listing and here
                continue
            out.append((str(p), role, st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size))
        return tuple(sorted(out))

    def _load(self) -> None:
        keys: dict[bytes, str] = {}
        state = self._state()
        for path, role, *_ in state:
            name = Path(path).name
            if name.startswith("."):  # a key being installed (make_keys)
                continue
            try:
                public, _ = zmq.auth.load_certificate(path)
            except Exception as e:
                self.bad_files += 1
                print(f"replay CURVE: skipping key file {path}: {e}", file=sys.stderr)
                continue
            if public and keys.get(public) != LEARNER:  # in both: the learner's
                keys[public] = role
        self.keys, self.seen = keys, state

    def role(self, key: bytes, recheck_s: float = 0.0) -> str | None:
        """The role of a z85 public key (None: not authorized), after reading the
        directories again if they changed, at most every ``recheck_s`` seconds (0: now)."""
        with self.lock:
            if key == self.own:
                return ANY
            now = time.monotonic()
            if now - self.checked >= recheck_s:
                self.checked = now
                if self._state() != self.seen:  # added, changed or deleted since
                    self._load()
            return self.keys.get(key)

    def callback(self, domain: str, key: bytes) -> bool:
        try:
            return self.role(key) is not None
        except Exception as e:  # never into the authenticator thread
            print(f"replay CURVE: refusing a handshake: {e}", file=sys.stderr)
            return False


@dataclass(frozen=True)
class ClientCurve:
    """A client's CURVE keys, applied to each socket it opens."""

    server_public: bytes
    public: bytes
    secret: bytes

    @classmethod
    def create(
        cls, server_key: str | Path | bytes, client_key: str | Path | tuple[bytes, bytes] | None
    ) -> ClientCurve:
        _need_curve()
        if client_key is None:
            public, secret = zmq.curve_keypair()
        elif isinstance(client_key, tuple):
            public, secret = client_key
        else:
            public, secret = load_secret(client_key)
        return cls(load_public(server_key), public, secret)

    def apply(self, sock: zmq.Socket) -> None:
        sock.curve_serverkey = self.server_public
        sock.curve_publickey = self.public
        sock.curve_secretkey = self.secret


def make_keys(directory: str | Path, name: str) -> tuple[Path, Path]:
    """Write NAME.key and NAME.key_secret in ``directory``, each atomically (written
    beside it under a hidden name, then renamed: a server reading the directory never sees
    half a file); -> (public file, secret file)."""
    import os
    import tempfile

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory, prefix=".keys-") as tmp:
        public, secret = zmq.auth.create_certificates(tmp, name)
        for made in (secret, public):  # the public one last: it is what servers look for
            os.replace(made, directory / Path(made).name)
    return directory / f"{name}.key", directory / f"{name}.key_secret"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Make a CURVE key pair for the replay service")
    p.add_argument("directory")
    p.add_argument("name", help="e.g. server, or one name per actor / learner host")
    a = p.parse_args(argv)
    public, secret = make_keys(a.directory, a.name)
    print(f"public key (hand out): {public}\nsecret key (keep private): {secret}")


if __name__ == "__main__":
    main()
