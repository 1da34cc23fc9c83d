"""`pdmesh serve --tensor-parallel-size N`: every role of the default config runs N ranks, and a
config file's role that names a size of its own keeps it."""
from __future__ import annotations

from click.testing import CliRunner

from gateway.serve import _config, serve


def test_tp_flag_sets_every_roles_size_unless_a_role_names_its_own(checkpoint, tmp_path):
    model = str(checkpoint("llama", "float32"))
    cfg = _config(None, model, "cpu", "float32", 0.1, None, None, tensor_parallel_size=2)
    assert cfg.engine["tensor_parallel_size"] == 2
    assert all(hw.tensor_parallel_size is None for s in cfg.scenarios for hw in s.hardware.values())
    path = tmp_path / "serve.yaml"
    path.write_text(f"scenarios:\n  - name: s\n    model: {model}\n    slo: {{ttft_s: 2, tpot_s: 0.2}}\n"
                    "    hardware: {prefill: {tensor_parallel_size: 1}, decode: {}}\n")
    cfg = _config(str(path), None, "cpu", "float32", 0.1, None, None, tensor_parallel_size=2)
    [spec] = cfg.scenarios
    assert cfg.engine["tensor_parallel_size"] == 2 and spec.hardware["prefill"].tensor_parallel_size == 1
    assert _config(None, model, "cpu", "float32", 0.1, None, None).engine.get("tensor_parallel_size", 1) == 1


def test_serve_help_names_the_flag():
    out = CliRunner().invoke(serve, ["--help"]).output
    assert "--tensor-parallel-size" in out and "-tp" in out
