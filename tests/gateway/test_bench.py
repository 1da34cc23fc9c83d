"""`pdmesh bench gateway` runs end to end (its stand-in actors must keep the real actors' call shapes)."""
from __future__ import annotations

import json

from click.testing import CliRunner

from gateway.cli import main


def test_bench_gateway_prints_every_figure_as_json():
    result = CliRunner().invoke(main, ["bench", "gateway", "--requests", "20", "--concurrency", "4",
                                       "--seconds", "0.5", "--output", "json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    figures = json.loads(result.stdout)
    for key in ("grpc_added_p50_ms", "http_added_p50_ms", "grpc_requests_per_s"):
        assert figures[key] > 0, key
