"""The local admin credential: `pdmesh serve` writes its gRPC address and a fresh admin key to
a file only its user can read (mode 0600, in $PDMESH_HOME, else ~/.cache/pdmesh), as Jupyter
writes its runtime files and Ray its session folder; the ops CLI on the same host reads it when
it is given no key, so that `pdmesh serve` then `pdmesh status` just works.

The key is accepted from loopback peers only (gateway.admin): from any other host the admin
keys rule. A clean exit removes the file; one whose process is gone is stale, and is removed
by the reader that finds it."""
from __future__ import annotations

import json
import os
import secrets
from dataclasses import asdict, dataclass
from pathlib import Path

HOME_ENV = "PDMESH_HOME"
NAME = "local credential"  # who the audit log names for a call made with it
_PREFIX = "gateway-"


def home() -> Path:
    return Path(os.environ.get(HOME_ENV) or Path.home() / ".cache" / "pdmesh")


def new_key() -> str:
    return secrets.token_urlsafe(32)


@dataclass(frozen=True)
class Credential:
    address: str  # host:port of the gateway's gRPC API, as a client on this host dials it
    key: str
    pid: int  # of `pdmesh serve`: the file is stale once it is gone
    path: Path | None = None  # where it was read from or written to

    def remove(self) -> None:
        if self.path is not None:
            self.path.unlink(missing_ok=True)


def write(address: str, key: str) -> Credential:
    """Writes the credential of this process's gateway; never readable by other users, even
    for a moment (the file is made 0600 before the key goes in)."""
    folder = home()
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    credential = Credential(_dialled(address), key, os.getpid(), folder / f"{_PREFIX}{os.getpid()}.json")
    fd = os.open(credential.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({k: v for k, v in asdict(credential).items() if k != "path"}, f)
    return credential


def find(address: str | None = None) -> Credential | None:
    """The credential of the live gateway on this host (at `address` when given); None when
    there is none. Stale files are removed. Several live gateways and no address: ValueError
    naming their addresses."""
    live = [c for c in _read_all() if address is None or c.address == _dialled(address)]
    if len(live) > 1:
        raise ValueError(f"{len(live)} gateways run on this host ({', '.join(c.address for c in live)}): "
                         f"choose one with --address")
    return live[0] if live else None


def _dialled(address: str) -> str:
    """The address as a client on this host dials it: a gateway listening everywhere, or on
    localhost, on 127.0.0.1."""
    host, _, port = address.rpartition(":")
    return f"127.0.0.1:{port}" if host in ("0.0.0.0", "[::]", "::", "", "localhost") else address


def _read_all() -> list[Credential]:
    found = []
    for path in sorted(home().glob(f"{_PREFIX}*.json")):
        try:
            data = json.loads(path.read_text())
            credential = Credential(str(data["address"]), str(data["key"]), int(data["pid"]), path)
        except (OSError, ValueError, KeyError, TypeError):
            continue  # being written, or not ours: not a credential
        if _alive(credential.pid):
            found.append(credential)
        else:
            credential.remove()
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True
