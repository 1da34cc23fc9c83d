"""API keys: inference keys for Generate and the OpenAI routes, a separate admin key for the
admin service. Keys come from files (one a line, # comments) or the environment
(PDMESH_API_KEYS comma-separated, PDMESH_ADMIN_KEY), are compared in constant time and are
never logged: errors and reprs show only how many keys there are."""
from __future__ import annotations

import hmac
import os
from dataclasses import dataclass
from pathlib import Path

from gateway.errors import GatewayError


def _read_keys(path: str | Path) -> tuple[str, ...]:
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        raise ValueError(f"cannot read key file {path}: {e.strerror}") from None
    return tuple(k for k in (line.split("#", 1)[0].strip() for line in lines) if k)


@dataclass(frozen=True, repr=False)
class Keys:
    inference: tuple[str, ...] = ()  # empty: inference is open
    admin: tuple[str, ...] = ()  # empty: the admin service is refused (never open by default)

    def __repr__(self) -> str:
        return f"Keys({len(self.inference)} inference, {len(self.admin)} admin)"

    @classmethod
    def load(cls, api_key_file: str | None = None, admin_key_file: str | None = None,
             env: dict[str, str] | None = None) -> "Keys":
        env = os.environ if env is None else env
        inference = _read_keys(api_key_file) if api_key_file else ()
        inference += tuple(k.strip() for k in env.get("PDMESH_API_KEYS", "").split(",") if k.strip())
        admin = _read_keys(admin_key_file) if admin_key_file else ()
        admin += tuple(k for k in (env.get("PDMESH_ADMIN_KEY", "").strip(),) if k)
        return cls(inference, admin)

    def check_inference(self, presented: str | None) -> None:
        if self.inference:
            _check(presented, self.inference, "API key")

    def check_admin(self, presented: str | None) -> None:
        if not self.admin:
            raise GatewayError("permission_denied", "the admin service is off: start the gateway with an admin "
                                                    "key (--admin-key-file or PDMESH_ADMIN_KEY)")
        _check(presented, self.admin, "admin key")


def _check(presented: str | None, keys: tuple[str, ...], what: str) -> None:
    if not presented:
        raise GatewayError("unauthenticated", f"missing {what}: send 'authorization: Bearer <key>'")
    # every key is compared, so that timing tells nothing about which one nearly matched; header
    # bytes that are not UTF-8 arrive surrogate-escaped, and are compared as the bytes they were
    given = presented.encode("utf-8", "surrogateescape")
    if not any([hmac.compare_digest(given, k.encode()) for k in keys]):
        raise GatewayError("unauthenticated", f"wrong {what}")


def bearer(header: str | None) -> str | None:
    """The key in an 'authorization: Bearer <key>' header (gRPC metadata or HTTP)."""
    if not header:
        return None
    scheme, _, key = header.partition(" ")
    return key.strip() if scheme.lower() == "bearer" else None
