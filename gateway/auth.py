"""API keys: inference keys for Generate and the OpenAI routes, a separate admin key for the
admin service. Keys come from files (one a line, # comments) or the environment
(PDMESH_API_KEYS comma-separated, PDMESH_ADMIN_KEY), are compared in constant time and are
never logged: errors and reprs show only how many keys there are, and the audit log an admin
key's name (the comment on its line, `key  # alice`, else file:line or the variable).
`pdmesh serve` adds the local admin credential (gateway.local_admin) as one more admin key."""
from __future__ import annotations

import hmac
import os
from dataclasses import dataclass
from pathlib import Path

from gateway.errors import GatewayError
from gateway.local_admin import NAME


def _read_keys(path: str | Path) -> tuple[tuple[str, str], ...]:
    """(key, name) for each key in the file."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        raise ValueError(f"cannot read key file {path}: {e.strerror}") from None
    found = []
    for number, line in enumerate(lines, 1):
        key, _, comment = (part.strip() for part in line.partition("#"))
        if key:
            found.append((key, comment or f"{path}:{number}"))
    return tuple(found)


@dataclass(frozen=True, repr=False)
class Keys:
    inference: tuple[str, ...] = ()  # empty: inference is open
    admin: tuple[str, ...] = ()  # empty: the admin service is refused (never open by default)
    admin_names: tuple[str, ...] = ()  # each admin key's, for the audit log; missing: "admin key N"
    local: str | None = None  # the local admin credential's key (gateway.local_admin)

    def __repr__(self) -> str:
        return f"Keys({len(self.inference)} inference, {len(self.admin)} admin)"

    @classmethod
    def load(cls, api_key_file: str | None = None, admin_key_file: str | None = None,
             env: dict[str, str] | None = None) -> "Keys":
        env = os.environ if env is None else env
        inference = tuple(k for k, _ in _read_keys(api_key_file)) if api_key_file else ()
        inference += tuple(k.strip() for k in env.get("PDMESH_API_KEYS", "").split(",") if k.strip())
        admin = _read_keys(admin_key_file) if admin_key_file else ()
        admin += tuple((k, "PDMESH_ADMIN_KEY") for k in (env.get("PDMESH_ADMIN_KEY", "").strip(),) if k)
        return cls(inference, tuple(k for k, _ in admin), tuple(name for _, name in admin))

    def check_inference(self, presented: str | None) -> None:
        if self.inference:
            _check(presented, self.inference, "API key")

    def check_admin(self, presented: str | None) -> None:
        self.admin_name(presented)

    def admin_name(self, presented: str | None) -> str:
        """The name of the admin key presented (local_admin.NAME for the local credential);
        GatewayError when it is none of them."""
        keys = self.admin + ((self.local,) if self.local else ())
        if not keys:
            raise GatewayError("permission_denied", "the admin service is off: start the gateway with an admin "
                                                    "key (--admin-key-file or PDMESH_ADMIN_KEY)")
        names = self.admin_names + tuple(f"admin key {i + 1}" for i in range(len(self.admin_names), len(self.admin)))
        return (*names, NAME)[_check(presented, keys, "admin key")]


def _check(presented: str | None, keys: tuple[str, ...], what: str) -> int:
    """The index of the key presented."""
    if not presented:
        raise GatewayError("unauthenticated", f"missing {what}: send 'authorization: Bearer <key>'")
    # every key is compared, so that timing tells nothing about which one nearly matched; header
    # bytes that are not UTF-8 arrive surrogate-escaped, and are compared as the bytes they were
    given = presented.encode("utf-8", "surrogateescape")
    matches = [hmac.compare_digest(given, k.encode()) for k in keys]
    if not any(matches):
        raise GatewayError("unauthenticated", f"wrong {what}")
    return matches.index(True)


def bearer(header: str | None) -> str | None:
    """The key in an 'authorization: Bearer <key>' header (gRPC metadata or HTTP)."""
    if not header:
        return None
    scheme, _, key = header.partition(" ")
    return key.strip() if scheme.lower() == "bearer" else None
