"""`pdmesh serve` as a real process on a tiny checkpoint, from its banner on: what the tests
of serving and shutting down as operators run it share."""
from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import yaml

ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2]), "PDMESH_API_KEYS": "serve-key"}


@dataclass
class Served:
    proc: subprocess.Popen
    http_url: str
    grpc_address: str
    reader: threading.Thread  # keeps the process's stderr pipe drained
    log: list[str]
    head: list[str]  # what it wrote up to its banner

    def wait(self, timeout_s: float) -> str:
        """Its exit status, and what it wrote after the banner."""
        self.proc.wait(timeout_s)
        self.reader.join(timeout_s)
        return "".join(self.log)


@contextlib.contextmanager
def serving(checkpoint, tmp_path, *args: str, engine: dict | None = None, config: bool = True):
    """`pdmesh serve` on a tiny checkpoint (inference key "serve-key") as a real process, from
    its banner on; killed on exit if it still runs. config=False: no scenario file, the
    default config on the checkpoint (`args` then set its engine)."""
    model = str(checkpoint("llama", "float32"))
    where = ["--model", model]
    if config:
        path = tmp_path / "scenarios.yaml"
        path.write_text(yaml.safe_dump({
            "scenarios": [{"name": "tiny", "model": model, "slo": {"ttft_s": 2.0, "tpot_s": 0.5}}],
            "engine": {"dtype": "float32", "num_blocks": 64, "block_size": 4, "threads": 1, **(engine or {})}}))
        where = ["--config", str(path)]
    proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "serve", *where,
                             "--grpc-port", "0", "--http-port", "0", *args], env=ENV, stderr=subprocess.PIPE,
                            text=True)
    try:
        lines = []
        for line in proc.stderr:  # until the banner, or the process ends
            lines.append(line)
            if "Ctrl-C stops" in line:
                break
        found = re.search(r"gRPC  (\S+) .*HTTP  (http://\S+)/v1", "".join(lines), re.S)
        assert found, "".join(lines[-30:])
        log: list[str] = []
        reader = threading.Thread(target=lambda: log.extend(proc.stderr), daemon=True)
        reader.start()
        yield Served(proc, found.group(2), found.group(1), reader, log, lines)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
