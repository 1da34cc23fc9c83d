"""The serve config's engine and transport sections are typed when the file is read (the
actors get EngineConfig and TransportConfig, mesh.api.ActorSpec): a bad field fails at once,
on the driver, with its name, not later inside an actor."""
from __future__ import annotations

import re

import pytest

from gateway.config import parse
from mesh.api import EngineConfig
from scenarios.spec import SpecError

SCENARIOS = [{"name": "chat", "model": "/m/llama", "slo": {"ttft_s": 1, "tpot_s": 1}}]


@pytest.mark.parametrize("section, fields, message", [
    ("engine", {"kv_cache_gbs": 1}, "config: engine.kv_cache_gbs: Extra inputs are not permitted"),
    ("engine", {"block_size": 0}, "config: engine.block_size: Input should be greater than or equal to 1"),
    ("transport", {"lease_tll_s": 5}, "config: transport.lease_tll_s: no such field; transport has: backend,"),
    ("transport", {"port": "x"}, "config: transport.port: Input should be a valid integer"),
    ("transport", {"backend": "udp"}, "config: transport: unknown transport backend 'udp'"),
])
def test_a_bad_engine_or_transport_field_fails_when_the_config_is_read(section, fields, message):
    with pytest.raises(SpecError, match=re.escape(message)):
        parse({"scenarios": SCENARIOS, section: fields})


def test_each_scenario_gets_typed_settings():
    config = parse({"scenarios": SCENARIOS, "engine": {"kv_cache_gb": 2, "model": "ignored"},
                    "transport": {"backend": "tcp", "lease_ttl_s": 5}})
    assert config.engine_for("/m/llama") == EngineConfig(model="/m/llama", kv_cache_gb=2)
    transport = config.transport_with("s" * 16)
    assert (transport.backend, transport.lease_ttl_s, transport.secret) == ("tcp", 5.0, "s" * 16)
