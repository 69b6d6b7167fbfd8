"""The mesh key: one shared secret from which every node's ZeroMQ CURVE keys are derived.

`dwarfmesh key` writes 32 random bytes (hex) to a file readable by its owner only. Every
node and client of the mesh loads the same file; from it each derives the same CURVE
key pair. A node's ROUTER is then a CURVE server that admits only clients proving they
hold that key pair (checked by a ZAP handler, and every refusal is counted), and all
traffic is encrypted and authenticated. Nothing derived from the secret goes into mDNS.

Which key is used: `--mesh-key FILE`, else `$DWARFMESH_MESH_KEY`, else the default file
(`~/.config/dwarfmesh/mesh.key`) if it exists. With none, the mesh is **open**: anyone who
can reach a node's port can join it and read the text; the node says so when it starts.

Owns: the mesh key file and the CURVE key pairs derived from it. Does not: open sockets
(`transport` applies the keys).
"""

from __future__ import annotations

import hashlib
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

import zmq
from zmq.utils import z85

KEY_BYTES = 32
KEY_ENV = "DWARFMESH_MESH_KEY"


class KeyFileError(ValueError):
    """A key file that is missing or malformed; str() is one line for the user."""


@dataclass(frozen=True)
class MeshKey:
    public: bytes          # z85 CURVE public key (the same on every node of the mesh)
    secret: bytes          # z85 CURVE secret key
    key_id: str            # short, non-secret name for logs ("which key is this node using")
    path: str

    def __repr__(self) -> str:       # never print the secret by accident
        return f"MeshKey(id={self.key_id}, path={self.path})"


def default_key_path() -> Path:
    return Path.home() / ".config" / "dwarfmesh" / "mesh.key"


def make_key_file(path: Path, *, force: bool = False) -> Path:
    """Write a new random mesh secret to `path` (mode 600); refuse to overwrite unless force."""
    path = path.expanduser()
    if path.exists() and not force:
        raise KeyFileError(f"{path} exists; use --force to replace it (every node needs the "
                           "new one then)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("# dwarfmesh mesh key: keep it secret; copy it to every node of the mesh\n")
        f.write(secrets.token_hex(KEY_BYTES) + "\n")
    os.chmod(path, 0o600)
    return path


def load_key(path: Path) -> MeshKey:
    path = path.expanduser()
    try:
        lines = [ln.strip() for ln in path.read_text().splitlines()]
    except OSError as exc:
        raise KeyFileError(f"cannot read mesh key {path}: {exc.strerror}") from None
    hexes = [ln for ln in lines if ln and not ln.startswith("#")]
    try:
        raw = bytes.fromhex(hexes[0]) if len(hexes) == 1 else b""
    except ValueError:
        raw = b""
    if len(raw) != KEY_BYTES:
        raise KeyFileError(f"{path} is not a dwarfmesh key (make one with `dwarfmesh key`)")
    return derive(raw, str(path))


def derive(raw: bytes, path: str = "") -> MeshKey:
    """The CURVE key pair every holder of `raw` derives identically."""
    curve_secret = hashlib.blake2b(raw, digest_size=32, person=b"dwarfmesh-curve").digest()
    secret_z85 = z85.encode(curve_secret)
    public_z85 = zmq.curve_public(secret_z85)
    key_id = hashlib.blake2b(raw, digest_size=4, person=b"dwarfmesh-keyid").hexdigest()
    return MeshKey(public_z85, secret_z85, key_id, path)


def resolve_key(arg: str | None) -> MeshKey | None:
    """The key to use: the argument, the environment, the default file, or None (open)."""
    if arg:
        return load_key(Path(arg))
    env = os.environ.get(KEY_ENV)
    if env:
        return load_key(Path(env))
    default = default_key_path()
    return load_key(default) if default.exists() else None


def apply_client(sock: zmq.Socket, key: MeshKey | None) -> None:
    """Make `sock` a CURVE client of the mesh (before connect)."""
    if key is not None:
        sock.curve_serverkey = key.public
        sock.curve_publickey = key.public
        sock.curve_secretkey = key.secret


def apply_server(sock: zmq.Socket, key: MeshKey | None) -> None:
    """Make `sock` a CURVE server of the mesh (before bind)."""
    if key is not None:
        sock.curve_server = True
        sock.curve_publickey = key.public
        sock.curve_secretkey = key.secret
        sock.zap_domain = b"dwarfmesh"
