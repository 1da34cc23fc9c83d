"""Mesh actors compute at the CPU priority of the process that started Ray, not at the lower
one Ray gives its workers (niceness +15), where every process at the default priority (the
gateway, clients, Ray's daemons) takes their engine's cores first."""
from __future__ import annotations

import os

import pytest

from mesh.api import Role

HERE = os.getpriority(os.PRIO_PROCESS, 0)  # the session's Ray daemons are started from this process


@pytest.mark.skipif(HERE + 15 > 19, reason="run at niceness 4 or less: Ray's +15 would be clamped at 19 here")
def test_serving_actors_run_at_the_priority_of_the_process_that_started_ray(make_pool):
    pool = make_pool(prefill=1, decode=1, both=1)
    for role in (Role.PREFILL, Role.DECODE, Role.BOTH):
        (member,) = pool.by_role(role)
        assert os.getpriority(os.PRIO_PROCESS, member.info.pid) == HERE, role
