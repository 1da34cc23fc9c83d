"""`pdmesh serve` without a scenario file on a host without accelerators: one aggregated actor
(docs/benchmarks.md, "Mesh": on shared cores it beats a prefill and a decode actor)."""
from __future__ import annotations

import json
import re
import signal
import urllib.request

from tests.gateway.serve_process import serving


def test_the_default_on_a_cpu_host_is_one_aggregated_actor_that_serves(checkpoint, tmp_path):
    with serving(checkpoint, tmp_path, "--device", "cpu", "--dtype", "float32", "--kv-cache-gb", "0.02",
                 config=False) as served:
        assert re.search(r"default: 1 both on \S+ \(aggregated\)", "".join(served.head))
        request = urllib.request.Request(served.http_url + "/v1/completions", data=json.dumps(
            {"prompt": "hello", "max_tokens": 3}).encode(), headers={"Authorization": "Bearer serve-key"})
        with urllib.request.urlopen(request, timeout=60) as reply:
            assert json.load(reply)["usage"]["completion_tokens"] == 3
        with urllib.request.urlopen(served.http_url + "/metrics", timeout=30) as reply:
            actors = [line for line in reply.read().decode().splitlines() if line.startswith("pdmesh_actors{")]
        assert actors == ['pdmesh_actors{role="both",scenario="default",state="serving"} 1.0']
        served.proc.send_signal(signal.SIGTERM)
        assert served.wait(120) is not None and served.proc.returncode == 0


def test_the_default_config_splits_prefill_and_decode_on_accelerators_only():
    import os

    from gateway.config import default

    cpu = default("/models/m", "cpu", engine={"dtype": "float32"})
    [spec] = cpu.scenarios
    assert (spec.mode, spec.both, spec.prefill, spec.decode) == ("aggregated", 1, 0, 0)
    assert cpu.engine == {"threads": len(os.sched_getaffinity(0)), "dtype": "float32"}  # the host's cores
    assert default("/models/m", "cpu", engine={"threads": 3}).engine == {"threads": 3}  # unless told
    [spec] = default("/models/m", "cuda").scenarios
    assert (spec.mode, spec.prefill, spec.decode) == ("disaggregated", 1, 1)
    assert spec.hardware["prefill"].num_gpus == spec.hardware["decode"].num_gpus == 1


def test_the_mode_flag_chooses_the_default_scenarios_mode_and_is_refused_with_a_file(tmp_path):
    from click.testing import CliRunner

    from gateway.config import default
    from gateway.serve import serve

    [spec] = default("/models/m", "cpu", mode="disaggregated").scenarios
    assert (spec.mode, spec.prefill, spec.decode, spec.both) == ("disaggregated", 1, 1, 0)
    config = tmp_path / "s.yaml"
    config.write_text("scenarios: []\n")
    result = CliRunner().invoke(serve, ["--config", str(config), "--mode", "auto"])
    assert result.exit_code != 0
    assert "--mode sets the default scenario's mode; with --config, set mode: in the scenario file" in result.output
