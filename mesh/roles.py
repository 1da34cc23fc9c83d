"""The roles an actor serves: the one vocabulary of the mesh, the ratio controller
(scenarios/) and the simulator (simtests/).

A leaf module (it imports nothing of pdmesh), so every layer can use it without a
cycle; `mesh.api` and `mesh` re-export it. A role is a str: it compares, hashes and formats as
its value ("prefill"), so it keys the same dicts, metric labels and log lines as the
plain strings in configs and on the wire.
"""
from __future__ import annotations

import enum


class Role(str, enum.Enum):
    PREFILL = "prefill"
    DECODE = "decode"
    BOTH = "both"  # serves whole requests alone (aggregated mode)

    def __str__(self) -> str:  # "prefill", not "Role.PREFILL", in f-strings and labels
        return self.value


MOVABLE = (Role.PREFILL, Role.DECODE)  # the roles a flip or lend moves an actor between
