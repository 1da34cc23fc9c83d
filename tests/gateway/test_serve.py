"""`pdmesh serve` as a real process: it prints its addresses, answers, and on SIGTERM stops
cleanly, leaving no process behind (its embedded Ray included)."""
from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import yaml


def _descendants(pid: int) -> set[int]:
    """Every process below pid (from /proc), Ray's own included."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@dataclass
class Served:
    proc: subprocess.Popen
    http_url: str
    grpc_address: str
    reader: threading.Thread  # keeps the process's stderr pipe drained
    log: list[str]

    def wait(self, timeout_s: float) -> str:
        """Its exit status, and what it wrote after the banner."""
        self.proc.wait(timeout_s)
        self.reader.join(timeout_s)
        return "".join(self.log)


@contextlib.contextmanager
def serving(checkpoint, tmp_path, *args: str, engine: dict | None = None):
    """`pdmesh serve` on a tiny checkpoint (inference key "serve-key") as a real process, from
    its banner on; killed on exit if it still runs."""
    config = tmp_path / "scenarios.yaml"
    config.write_text(yaml.safe_dump({
        "scenarios": [{"name": "tiny", "model": str(checkpoint("llama", "float32")),
                       "slo": {"ttft_s": 2.0, "tpot_s": 0.5}}],
        "engine": {"dtype": "float32", "num_blocks": 64, "block_size": 4, "threads": 1, **(engine or {})}}))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2]), "PDMESH_API_KEYS": "serve-key"}
    proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "serve", "--config", str(config),
                             "--grpc-port", "0", "--http-port", "0", *args], env=env, stderr=subprocess.PIPE,
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
        yield Served(proc, found.group(2), found.group(1), reader, log)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_serve_starts_answers_and_stops_cleanly(checkpoint, tmp_path):
    with serving(checkpoint, tmp_path) as served:
        proc = served.proc
        with urllib.request.urlopen(served.http_url + "/health", timeout=30) as reply:
            assert reply.status == 200
        request = urllib.request.Request(served.http_url + "/v1/completions", data=json.dumps(
            {"prompt": "hello", "max_tokens": 3}).encode(), headers={"Authorization": "Bearer serve-key"})
        with urllib.request.urlopen(request, timeout=60) as reply:
            assert json.load(reply)["usage"]["completion_tokens"] == 3
        below = _descendants(proc.pid)
        assert below  # Ray's processes and the actors
        proc.send_signal(signal.SIGTERM)
        rest = served.wait(120)
        assert proc.returncode == 0, rest[-3000:]
        assert "shutting down" in rest
        assert not [pid for pid in below if _alive(pid)]
