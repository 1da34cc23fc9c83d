"""`pdmesh serve` as a real process: it prints its addresses, answers, and on SIGTERM stops
cleanly, leaving no process behind (its embedded Ray included)."""
from __future__ import annotations

import json
import signal
import urllib.request
from pathlib import Path

from tests.gateway.serve_process import serving


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
