"""Optional ZeroMQ CURVE security for the replay sockets (for use across machines).

Keys are ZeroMQ certificate files as ``zmq.auth.create_certificates`` writes them:
``NAME.key`` (the public key, safe to hand out) and ``NAME.key_secret`` (public and secret
key; keep it private). Make a pair with ``python -m flowrl_async.replay.curve DIR NAME``.

- Server: its secret certificate (``--curve-secret-key``). Traffic is encrypted and clients
  know they talk to the right server. Optionally ``--curve-authorized-keys DIR``: only
  clients whose public certificate is in DIR may connect (the directory is read again
  whenever it changed: a new client needs no restart, a deleted key is refused from the
  next handshake on, a file that does not parse is skipped). Without it, any client that
  knows the server's public key may connect: encryption, not access control.
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

    def start_authenticator(self, ctx: zmq.Context) -> ThreadAuthenticator | None:
        """With ``authorized_dir``: a ZAP handler on ``ctx`` (one per context) that lets in
        the keys of that directory and the server's own (its in-process helpers use it)."""
        if self.authorized_dir is None:
            return None
        auth = ThreadAuthenticator(ctx)
        auth.start()
        auth.configure_curve_callback("*", _AuthorizedKeys(self.authorized_dir, self.public))
        return auth


class _AuthorizedKeys:
    """The ZAP callback: the public keys of the directory's ``*.key`` files, read again
    whenever the directory changed (a key added is let in, a key deleted is refused from the
    next handshake on; connections already made stay). A file that does not parse (e.g.
    half written) is skipped and reported, never raised: an exception here would kill
    pyzmq's authenticator thread, after which every handshake hangs."""

    def __init__(self, directory: Path, own: bytes):
        self.directory, self.own = directory, own
        self.lock = threading.Lock()
        self.keys: set[bytes] = set()
        self.seen: tuple = ()
        self.bad_files = 0  # key files skipped because they did not parse
        self._load()

    def _state(self) -> tuple:
        out = []
        for p in self.directory.glob("*.key"):
            try:  # a file replaced in place changes its inode or ctime, whatever its size
                st = p.stat()
            except FileNotFoundError:  # deleted between the listing and here
                continue
            out.append((p.name, st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size))
        return tuple(sorted(out))

    def _load(self) -> None:
        keys = set()
        state = self._state()
        for name, *_ in state:
            if name.startswith("."):  # a key being installed (install_public_key)
                continue
            try:
                public, _ = zmq.auth.load_certificate(self.directory / name)
            except Exception as e:
                self.bad_files += 1
                print(f"replay CURVE: skipping key file {name}: {e}", file=sys.stderr)
                continue
            if public:
                keys.add(public)
        self.keys, self.seen = keys, state

    def callback(self, domain: str, key: bytes) -> bool:
        try:
            with self.lock:
                if key == self.own:
                    return True
                if self._state() != self.seen:  # added, changed or deleted since
                    self._load()
                return key in self.keys
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
