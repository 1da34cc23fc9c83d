"""A real gateway for the tests: the session's local Ray, one scenario (1 prefill + 1 decode
actor on a tiny model), served from its own thread and event loop as `pdmesh serve` does,
with API keys, a small message limit and spans exported to the session's OTLP receiver
(tests/support/ray_fixtures.py); helpers are in tests/gateway/support.py."""
from __future__ import annotations

import functools

import pytest

from tests.gateway.shared_state import baseline, restore
from tests.gateway.support import API_KEY, MAX_MESSAGE_BYTES, cli, serving, tiny_config


@pytest.fixture(scope="session")
def gateway(checkpoint, ray_cluster):
    """One scenario, 1 prefill + 1 decode actor; the ratio controller off (pins still apply)."""
    from gateway.config import Limits

    config = tiny_config(checkpoint, Limits(max_message_bytes=MAX_MESSAGE_BYTES, admission_timeout_s=5.0))
    with serving(config) as running:
        yield running


@pytest.fixture(scope="module")
def client(gateway):
    """The real openai client on the shared gateway."""
    import openai

    with openai.OpenAI(base_url=gateway.http_url + "/v1", api_key=API_KEY, max_retries=0, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def model(client):
    return client.models.list().data[0].id


@pytest.fixture
def restored(gateway):
    """The shared gateway for a test that changes it: its actors, their roles and the ratio
    controller's state are put back when the test ends, pass or fail (tests/gateway/shared_state.py)."""
    before = gateway.run(baseline(gateway.gateway))
    yield gateway
    gateway.run(restore(gateway.gateway, before), timeout_s=300)


@pytest.fixture
def pdmesh(restored, tmp_path):
    """pdmesh(*args, key=ADMIN_KEY, columns=200) -> (exit code, stdout, stderr), run in-process
    on the shared gateway, which is put back as it was after each test; no local credential."""
    return functools.partial(cli, restored, tmp_path)
