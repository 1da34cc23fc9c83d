"""A worker rank of a tensor-parallel engine: a process (`python -m mesh.engine.tp_worker`)
that builds its shard, then runs each step it is sent, in step with rank 0.

It connects back to rank 0's control socket (authenticated with a key read from stdin),
says which rank it is, builds its shard and reports Ready or Failed. Its KV pool is shared
with rank 0 (shared_pool.py): on the CPU in the memory file rank 0 made for it; on a device
it allocates the pool and its Ready carries the pool's IPC handle. Rank 0 sends each step's
inputs over a pipe (torch-serialized, so they land on this rank's device); the ranks then
meet in the step's collectives. The pipe is the control channel, not a collective, so a
worker may idle for as long as the engine does; it ends when rank 0 sends an empty message
(stop) or closes the pipe (rank 0 died), and on any error, which the other ranks then see
as a failed collective.
"""
from __future__ import annotations

import argparse
import datetime
import logging
import pickle
import sys
from multiprocessing.connection import Client, Connection

import torch

from mesh.engine import shared_pool
from mesh.engine.config import EngineConfig
from mesh.engine.device import resolve_device, resolve_dtype
from mesh.engine.kv_cache import zeros
from mesh.engine.model_config import ModelConfig
from mesh.engine.model_runner import StepInputs, run_model
from mesh.engine.parallel import Collectives, TensorParallelError, join_store, process_group, rank_device
from mesh.engine.rank import RankMemory, build_rank, prepare_process
from mesh.engine.ranks import Failed, Ready
from mesh.engine.shard import Shard

log = logging.getLogger(__name__)


def run(config: EngineConfig, rank: int, store_port: int, conn: Connection, kv_fd: int | None,
        export_kv: bool) -> None:
    size = config.tensor_parallel_size
    try:
        cfg = ModelConfig.from_folder(config.model)
        device = rank_device(resolve_device(config.device), rank)
        if device.type == "cuda":
            torch.cuda.set_device(device)  # NCCL works on the current device
        dtype = resolve_dtype(config.dtype, cfg.dtype, device)
        prepare_process(config, device)
        comm = Collectives(rank, size)
        # the KV pool in the shared memory rank 0 made for it (on the CPU), else its own
        allocate = zeros if kv_fd is None else lambda shape, dt, _: shared_pool.attach(kv_fd, shape, dt)
        model, kv = build_rank(config, cfg, device, dtype, Shard(rank, size), comm, allocate)
        ready = Ready(RankMemory.of(model, kv), shared_pool.export_pool(kv.pool) if export_kv else None)
    except Exception as e:
        conn.send_bytes(pickle.dumps(Failed(f"rank {rank}: {e}")))
        return
    conn.send_bytes(pickle.dumps(ready))  # a local, authenticated pipe: the handle never leaves this host
    timeout = datetime.timedelta(seconds=config.collective_timeout_s)
    comm.bind(process_group(join_store(store_port, size, timeout), rank, size, device, timeout))
    with torch.inference_mode():
        while True:
            try:
                data = conn.recv_bytes()
            except EOFError:
                log.warning("rank %d: rank 0 is gone; exiting", rank)
                return
            if not data:
                return
            try:
                run_model(model, kv, StepInputs.decode(data, device))
            except TensorParallelError as e:  # another rank died: rank 0 reports it and stops the rest
                log.warning("%s; exiting", e)
                sys.exit(1)


def main() -> None:
    parser = argparse.ArgumentParser(description="a worker rank of a tensor-parallel pdmesh engine")
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--control-port", type=int, required=True)
    parser.add_argument("--store-port", type=int, required=True)
    parser.add_argument("--kv-fd", type=int, help="the shared memory for this rank's KV pool (shared_pool.py)")
    parser.add_argument("--export-kv", action="store_true",
                        help="hand rank 0 the IPC handle of this rank's KV pool on its device (shared_pool.py)")
    args = parser.parse_args()
    key = sys.stdin.buffer.read()  # rank 0 writes the control socket's key and closes stdin
    logging.basicConfig(level=logging.WARNING, format=f"[tp rank {args.rank}] %(levelname)s %(message)s")
    with Client(("127.0.0.1", args.control_port), authkey=key) as conn:
        conn.send_bytes(pickle.dumps(args.rank))
        config = EngineConfig.model_validate_json(conn.recv_bytes())
        run(config, args.rank, args.store_port, conn, args.kv_fd, args.export_kv)


if __name__ == "__main__":
    main()
