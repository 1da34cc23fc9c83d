"""What every tensor-parallel rank builds, the same way on rank 0 and on the workers so that
their shapes agree: the process's settings, its weight shard and its KV heads' cache.

A rank's KV cache holds only its KV heads, for the same blocks as every other rank: the
block manager on rank 0 hands out block ids that name the same slots on every rank.
kv_cache_gb is per rank, so with n ranks the same memory holds about n times the blocks.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from mesh.engine.checkpoint import load_model
from mesh.engine.config import EngineConfig
from mesh.engine.device import keep_freed_host_memory
from mesh.engine.kv_cache import Allocator, KVCache, KVShape
from mesh.engine.linear import should_pack
from mesh.engine.model import CausalLM
from mesh.engine.model_config import ModelConfig
from mesh.engine.parallel import Collectives
from mesh.engine.shard import Shard


@dataclass(frozen=True)
class RankMemory:
    """Bytes one rank holds: its weights (the checkpoint's, not blocked copies) and its KV cache."""
    weight_bytes: int
    kv_bytes: int

    @classmethod
    def of(cls, model: CausalLM, kv: KVCache) -> "RankMemory":
        return cls(weight_bytes(model), kv.pool.numel() * kv.pool.element_size())


def weight_bytes(model: CausalLM) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def rank_threads(config: EngineConfig, device: torch.device) -> int | None:
    """Torch threads of each rank (None: torch's default). Ranks on one CPU split its cores: each
    rank waits for the others at every collective, so threads beyond its share only contend."""
    if config.threads is None and device.type == "cpu" and config.tensor_parallel_size > 1:
        return max(1, (os.cpu_count() or 1) // config.tensor_parallel_size)
    return config.threads


def prepare_process(config: EngineConfig, device: torch.device) -> None:
    """Threads and allocator settings."""
    threads = rank_threads(config, device)
    if threads:
        torch.set_num_threads(threads)
    if device.type == "cpu":
        keep_freed_host_memory()


def context_length(config: EngineConfig, cfg: ModelConfig) -> int:
    return config.max_model_len or cfg.max_position_embeddings


def kv_shape(config: EngineConfig, cfg: ModelConfig, shard: Shard, dtype: torch.dtype) -> KVShape:
    """The rank's cache: its KV heads, config.num_blocks blocks or as many as kv_cache_gb holds."""
    heads = len(shard.kv_heads(cfg))
    per_block = KVShape(cfg.num_layers, 0, config.block_size, heads, cfg.head_dim, dtype).bytes_per_block
    num_blocks = config.num_blocks or max(1, int(config.kv_cache_gb * 2**30) // per_block)
    return KVShape(cfg.num_layers, num_blocks, config.block_size, heads, cfg.head_dim, dtype)


def build_rank(config: EngineConfig, cfg: ModelConfig, device: torch.device, dtype: torch.dtype,
               shard: Shard, comm: Collectives | None, allocate_kv: Allocator) -> tuple[CausalLM, KVCache]:
    """The rank's model shard (with blocked weight copies where they pay) and KV cache."""
    model = load_model(config.model, cfg, context_length(config, cfg), dtype, device, shard, comm)
    if should_pack(config.packed_weights, device, dtype, weight_bytes(model)):
        model.pack()
    return model, KVCache(kv_shape(config, cfg, shard, dtype), device, allocate_kv)
