"""Rank 0's side of a tensor-parallel engine: the worker ranks 1..n-1 as processes on this host.

Each worker is a fresh interpreter (`python -m mesh.engine.tp_worker`: no fork of a
process holding torch's threads, no re-import of the caller's main module). It connects
to rank 0's control socket on a free loopback port (authenticated by a random key), gets
the engine config, builds its shard while rank 0 builds its own, reports ready (or why
not), and joins the collective group on rank 0's TCPStore. A worker's KV pool is shared with
this process (shared_pool.py: memory rank 0 made on the CPU, the handle in the worker's Ready
message on a device): `pools` are the workers' caches, for the mesh's transport, or None with
`unshared` saying why. A worker that dies is named,
with its exit code, in the engine's error: through a failed collective, a failed send or a
failed start; the remaining workers are then stopped.
"""
from __future__ import annotations

import datetime
import logging
import os
import pickle
import socket
import subprocess
import sys
import weakref
from dataclasses import dataclass
from multiprocessing.connection import Connection, answer_challenge, deliver_challenge

import torch

from mesh.engine.config import EngineConfig
from mesh.engine.errors import EngineError
from mesh.engine.model_config import ModelConfig
from mesh.engine.model_runner import StepInputs
from mesh.engine.parallel import Collectives, TensorParallelError, check_devices, host_store, process_group
from mesh.engine import shared_pool
from mesh.engine.rank import RankMemory, kv_shape
from mesh.engine.shard import Shard
log = logging.getLogger(__name__)

STOP_GRACE_S = 10.0  # a stopped worker's time to exit before it is killed
POLL_S = 0.5  # how often a wait for the workers checks that they still live
DEATH_WAIT_S = 0.2  # how long a rank whose death broke a collective may take to be seen dead


@dataclass(frozen=True)
class Ready:
    """A worker built its shard and joins the group next. `pool`: its KV pool on its device, for
    rank 0 to open (None where rank 0 made the pool, on the CPU, or where pools are not shared)."""
    memory: RankMemory
    pool: shared_pool.DevicePoolHandle | None = None


@dataclass(frozen=True)
class Failed:
    """A worker could not build its shard (the message says why); it has exited."""
    error: str


class LocalRanks:
    def __init__(self, config: EngineConfig, cfg: ModelConfig, device: torch.device, dtype: torch.dtype):
        """Starts the workers; `connect` waits for them once rank 0's own shard is built."""
        self.size = config.tensor_parallel_size
        Shard(0, self.size).check(cfg)  # before starting processes that would fail alike
        check_devices(device, self.size)
        self.shapes = {rank: kv_shape(config, cfg, Shard(rank, self.size), dtype) for rank in range(1, self.size)}
        # Ranks 1.. KV pools as this process maps them, once connected; None and why where they are not shared.
        self.pools: list[torch.Tensor] | None = None
        self.unshared: str | None = None
        try:
            self.sharing: str | None = shared_pool.mechanism(device.type)
        except shared_pool.UnsharedPools as e:
            self.sharing, self.unshared = None, str(e)
        fds: dict[int, int] = {}
        if self.sharing == shared_pool.MEMFD:
            made = {rank: shared_pool.create(shape.dims, dtype) for rank, shape in self.shapes.items()}
            fds = {rank: fd for rank, (fd, _) in made.items()}
            self.pools = [pool for _, pool in made.values()]
        self.device = device
        self.timeout = datetime.timedelta(seconds=config.collective_timeout_s)
        self.comm = Collectives(0, self.size)
        self.memory: list[RankMemory] = []  # per rank, once connected
        self.broken: TensorParallelError | None = None
        self._store = host_store(self.size, self.timeout)
        self._conns: dict[int, Connection] = {}
        key = os.urandom(32)
        # The workers import what this process imports: the same package, from the same paths.
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        with socket.create_server(("127.0.0.1", 0)) as server:
            server.settimeout(POLL_S)
            port = server.getsockname()[1]
            try:
                self._procs = {rank: self._spawn(rank, port, key, env, fds.get(rank)) for rank in range(1, self.size)}
            finally:
                for fd in fds.values():
                    os.close(fd)  # the workers hold their own; this process keeps its maps
            # An engine dropped without close() takes its workers with it.
            weakref.finalize(self, _kill, list(self._procs.values()))
            try:
                while len(self._conns) < self.size - 1:
                    self._accept(server, key, config)
            except BaseException:
                self.close()
                raise

    def _spawn(self, rank: int, port: int, key: bytes, env: dict, kv_fd: int | None) -> subprocess.Popen:
        shared = {shared_pool.MEMFD: ["--kv-fd", str(kv_fd)], shared_pool.IPC: ["--export-kv"]}.get(self.sharing, [])
        proc = subprocess.Popen([sys.executable, "-m", "mesh.engine.tp_worker", "--rank", str(rank),
                                 "--control-port", str(port), "--store-port", str(self._store.port), *shared],
                                stdin=subprocess.PIPE, env=env, pass_fds=() if kv_fd is None else (kv_fd,))
        proc.stdin.write(key)
        proc.stdin.close()
        return proc

    def _accept(self, server: socket.socket, key: bytes, config: EngineConfig) -> None:
        try:
            sock, _ = server.accept()
        except TimeoutError:
            self._check_alive("starting")
            return
        sock.settimeout(None)
        conn = Connection(sock.detach())
        deliver_challenge(conn, key)
        answer_challenge(conn, key)
        rank = pickle.loads(conn.recv_bytes())
        conn.send_bytes(config.model_dump_json().encode())
        self._conns[rank] = conn

    def _check_alive(self, doing: str) -> None:
        for rank, proc in self._procs.items():
            if proc.poll() is not None:
                raise TensorParallelError(f"tensor-parallel rank {rank} exited (code {proc.returncode}) "
                                          f"while {doing}")

    def connect(self, own: RankMemory) -> None:
        """Waits until every worker built its shard, then forms the group. Raises the worker's
        own error when one could not (a bad checkpoint...), stopping the others."""
        try:
            ready = {rank: self._ready(rank) for rank in range(1, self.size)}
            self.memory = [own] + [r.memory for r in ready.values()]
            if self.sharing == shared_pool.IPC:
                self.pools = [self._open(rank, r) for rank, r in ready.items()]
            self.comm.bind(process_group(self._store, 0, self.size, self.device, self.timeout))
        except BaseException:
            self.close()
            raise

    def _open(self, rank: int, ready: Ready) -> torch.Tensor:
        shape = self.shapes[rank]
        try:
            return shared_pool.open_pool(ready.pool, shape.dims, shape.dtype)
        except RuntimeError as e:  # the driver refused the handle (another host's, no IPC in this container...)
            raise EngineError(f"cannot open tensor-parallel rank {rank}'s KV pool on {self.device} through IPC: "
                              f"{e}; run the ranks where the device's IPC works (one host, one container)") from None

    def _ready(self, rank: int) -> Ready:
        conn = self._conns[rank]
        while not conn.poll(POLL_S):
            self._check_alive("loading its shard")
        try:
            message = pickle.loads(conn.recv_bytes())
        except EOFError:
            self._procs[rank].wait(STOP_GRACE_S)
            raise TensorParallelError(f"tensor-parallel rank {rank} exited (code {self._procs[rank].returncode}) "
                                      f"while loading its shard") from None
        if isinstance(message, Failed):
            raise EngineError(message.error)
        return message

    def send(self, inputs: StepInputs) -> None:
        """Hands a step's inputs to every worker; they run it with rank 0."""
        if self.broken is not None:
            raise self.broken
        data = inputs.encode()
        try:
            for conn in self._conns.values():
                conn.send_bytes(data)
        except OSError as e:
            raise self.failure(TensorParallelError(f"cannot send a step to a tensor-parallel rank: {e}")) from None

    def dead(self) -> list[str]:
        """The worker ranks whose process has ended, with their exit codes."""
        return [f"rank {rank} (exit code {proc.returncode})" for rank, proc in self._procs.items()
                if proc.poll() is not None]

    def kill(self, rank: int) -> None:
        """Kills a worker rank's process as a crash would, and waits until it is gone (fault injection)."""
        proc = self._procs[rank]
        proc.kill()
        proc.wait()

    def failure(self, error: TensorParallelError) -> TensorParallelError:
        """The error the engine fails with, naming the ranks that died; the engine is done."""
        if self.broken is None:
            dead = []
            for rank, proc in self._procs.items():
                try:
                    proc.wait(DEATH_WAIT_S)  # a rank whose death broke the collective may still be exiting
                    dead.append(f"rank {rank} (exit code {proc.returncode})")
                except subprocess.TimeoutExpired:
                    pass
            why = f"; dead: {', '.join(dead)}" if dead else ""
            self.broken = TensorParallelError(f"{error}{why}: the engine cannot go on")
            self.close()
        return self.broken

    def close(self) -> None:
        """Stops the workers: those in the group with an empty message (killed if they do not exit in
        time); those still starting, or all after a failure, at once (they hold nothing to finish).
        The engine cannot step afterwards."""
        grace = STOP_GRACE_S if self.comm.group is not None and self.broken is None else 0
        if self.broken is None:
            self.broken = TensorParallelError("the engine was closed: its worker ranks are stopped")
        for conn in self._conns.values():
            try:
                conn.send_bytes(b"")
            except OSError:
                pass  # already gone
        for rank, proc in self._procs.items():
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                if grace:
                    log.warning("tensor-parallel rank %d did not stop in %.0f s: killing it", rank, grace)
                proc.kill()
                proc.wait()
        for conn in self._conns.values():
            conn.close()
        self._conns = {}


def _kill(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
