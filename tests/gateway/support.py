"""What the gateway tests share besides fixtures: the test keys and limits, a Gateway served
from its own thread and event loop as `pdmesh serve` does, calls to it, and waits on its pools."""
from __future__ import annotations

import asyncio
import contextlib
import json
import re
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

import ray

from tests.mesh.support import assert_no_blocks_held as _no_blocks_held_in
from tests.mesh.support import replaced

API_KEY = "test-inference-key"
ADMIN_KEY = "test-admin-key"
AUTH = (("authorization", f"Bearer {API_KEY}"),)  # gRPC metadata of an inference call
ADMIN = (("authorization", f"Bearer {ADMIN_KEY}"),)  # gRPC metadata of an admin call
MAX_MESSAGE_BYTES = 64 * 1024
ENGINE = {"dtype": "float32", "num_blocks": 128, "block_size": 4, "threads": 1, "max_model_len": 256}


def tiny_config(checkpoint, limits, **engine_changes):
    """One scenario on the tiny llama checkpoint: 1 prefill + 1 decode actor on ENGINE (with the
    changes), short lease and transfer timeouts, the gateway's `limits`, the ratio controller
    off (pins still apply)."""
    from gateway.config import Control, default

    return default(checkpoint("llama", "float32"), mode="disaggregated", engine={**ENGINE, **engine_changes},
                   transport={"lease_ttl_s": 3.0, "timeout_s": 5.0}, gateway=limits,
                   controller=Control(enabled=False))


@dataclass
class Running:
    gateway: object
    loop: asyncio.AbstractEventLoop
    grpc_address: str
    http_url: str

    def run(self, coro, timeout_s: float = 120):
        """Runs a coroutine on the gateway's loop (its pools live there)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)


@contextlib.contextmanager
def serving(config, refresh_s: float = 0.2):
    """A Gateway on `config` with the test keys, on the session's Ray, served from its own thread
    and event loop as `pdmesh serve` does; stopped on exit."""
    import uvloop

    from gateway.auth import Keys
    from gateway.server import Gateway, Listen

    gw = Gateway(config, Keys((API_KEY,), (ADMIN_KEY,)), Listen(grpc_port=0, http_port=0), refresh_s=refresh_s)
    loop = uvloop.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    running = Running(gw, loop, "", "")
    try:
        running.run(gw.start())
        running.grpc_address, running.http_url = gw.addresses["grpc"], gw.addresses["http"]
        yield running
    finally:
        running.run(gw.stop(grace_s=1.0))
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


def assert_no_blocks_held(running: Running) -> None:
    for scenario in running.gateway.fleet.scenarios.values():
        running.run(_no_blocks_held_in(scenario.pool))


def replacement_of(running: Running, dead_id: str, scenario: str = "default") -> str:
    """The id of the actor the pool's supervisor started in place of `dead_id`, once it serves."""
    return running.run(replaced(running.gateway.fleet.scenarios[scenario].pool, dead_id)).actor_id


def kill(handle) -> None:
    """Kills an actor and waits until Ray answers calls to it as dead (a kill lands a moment later)."""
    ray.kill(handle, no_restart=True)
    for _ in range(600):
        try:
            ray.get(handle.ping.remote(), timeout=10)
        except ray.exceptions.RayActorError:
            return
        time.sleep(0.1)
    raise AssertionError("the killed actor still answers")


def http(gateway: Running, path: str, body: bytes | None = None, key: str | None = API_KEY) -> tuple[int, bytes]:
    """(status, body) of a request to the gateway's HTTP API, with the inference key unless told."""
    request = urllib.request.Request(gateway.http_url + path, data=body,
                                     headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return reply.status, reply.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def cli(running: Running, home, *args: str, key: str | None = ADMIN_KEY, columns: int = 200):
    """`pdmesh *args` run in-process on `running` with the admin `key` (no local credential:
    PDMESH_HOME is `home`) -> (exit code, stdout, stderr)."""
    from click.testing import CliRunner

    from gateway.cli import main

    env = {"PDMESH_ADDRESS": running.grpc_address, "PDMESH_ADMIN_KEY": key, "COLUMNS": str(columns),
           "PDMESH_HOME": str(home)}
    result = CliRunner().invoke(main, list(args), env=env, catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def ok_json(pdmesh, *args: str) -> dict:
    code, out, err = pdmesh(*args, "--output", "json")
    assert code == 0, err
    return first_json(out)


def first_json(out: str) -> dict:
    """The first JSON object of a command's output: the in-process Ray driver prints its own
    lines (the autoscaler's warning of an infeasible resource request) before or after it,
    whenever they reach it."""
    start = next((m.start() for m in re.finditer(r"^[{\[]", out, re.M)), None)
    assert start is not None, out
    return json.JSONDecoder().raw_decode(out, start)[0]
