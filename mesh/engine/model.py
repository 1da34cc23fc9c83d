"""The decoder-only transformer shared by the Llama, Mistral, Qwen2 and Qwen3 families.

Activations are packed as [1, tokens, hidden]: on CPUs with bf16 units a linear
over a 3-D input reads weights several times faster than over a 2-D one.

Under tensor parallelism the model is one rank's shard (see shard.py): the qkv and
gate/up projections are column-parallel (this rank's heads and MLP rows), o and down
are row-parallel (an all-reduce each), the embedding is vocab-parallel (an all-reduce)
and the output projection's logits are gathered from every rank. With one rank, no
collective runs and every tensor is whole.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from mesh.engine import cpu_kernels
from mesh.engine.attention import AttentionMetadata, paged_attention
from mesh.engine.kv_cache import KVCache
from mesh.engine.linear import Linear, PackedWeight, RowParallelLinear, pack_weight, packed_linear, uses_packed
from mesh.engine.model_config import ModelConfig
from mesh.engine.parallel import Collectives
from mesh.engine.rope import RotaryEmbedding, apply_rotary
from mesh.engine.shard import Shard


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Hugging Face's RMSNorm over the last dim: normalise in fp32, cast back, then scale.

    weight may have more dims than the last (one row per head), and broadcasts. fp32 rows on
    CPU go through the norm kernel (csrc/rms_norm.cpp; PDMESH_NORM_KERNEL=0 runs torch's).
    """
    if x.dtype == torch.float32 and weight.dim() == 1:
        if x.device.type == "cpu" and cpu_kernels.enabled("PDMESH_NORM_KERNEL"):
            return torch.ops.pdmesh.rms_norm(x, weight, eps)
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    return weight * F.rms_norm(x.float(), (x.shape[-1],), None, eps).to(x.dtype)


def row_parallel(in_features: int, out_features: int, bias: bool, comm: Collectives | None) -> Linear:
    """A projection of in_features split across the ranks (a plain one with a single rank)."""
    if comm is None:
        return Linear(in_features, out_features, bias=bias)
    return RowParallelLinear(in_features, out_features, bias, comm.all_reduce)


class VocabParallelEmbedding(nn.Module):
    """The embedding rows of this rank's token ids; other ids look up zeros, and the sum over
    the ranks (one all-reduce) gives every rank every token's embedding."""

    def __init__(self, rows: int, hidden: int, first: int, comm: Collectives):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(rows, hidden))
        self.first, self.comm = first, comm

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.first
        outside = (local < 0) | (local >= self.weight.shape[0])
        x = F.embedding(local.masked_fill(outside, 0), self.weight).masked_fill(outside[:, None], 0)
        return self.comm.all_reduce(x)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, shard: Shard = Shard(), comm: Collectives | None = None):
        super().__init__()
        h, d = cfg.hidden_size, cfg.head_dim
        heads, kv_heads, inter = len(shard.heads(cfg)), len(shard.kv_heads(cfg)), len(shard.intermediate(cfg))
        self.q_size, self.kv_size = heads * d, kv_heads * d
        self.num_heads, self.num_kv_heads, self.head_dim = heads, kv_heads, d
        self.eps = cfg.rms_norm_eps
        self.qkv_proj = Linear(h, self.q_size + 2 * self.kv_size, bias=cfg.qkv_bias)
        self.o_proj = row_parallel(self.q_size, h, cfg.o_bias, comm)
        self.gate_up_proj = Linear(h, 2 * inter, bias=cfg.mlp_bias)
        self.down_proj = row_parallel(inter, h, cfg.mlp_bias, comm)
        self.input_norm = nn.Parameter(torch.ones(h))
        self.post_attention_norm = nn.Parameter(torch.ones(h))
        # Qwen3's q and k norms as one [heads + kv_heads, head_dim] weight: q and k are normed
        # and rotated together, as one tensor.
        self.qk_norm = nn.Parameter(torch.ones(heads + kv_heads, d)) if cfg.qk_norm else None
        self.scale = d ** -0.5

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                k_slots: torch.Tensor, v_slots: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        t = x.shape[1]
        qkv = self.qkv_proj(rms_norm(x, self.input_norm, self.eps))[0]
        qkv = qkv.view(t, self.num_heads + 2 * self.num_kv_heads, self.head_dim)
        qk, v = qkv[:, :self.num_heads + self.num_kv_heads], qkv[:, self.num_heads + self.num_kv_heads:]
        if self.qk_norm is not None:
            qk = rms_norm(qk, self.qk_norm, self.eps)
        q, k = apply_rotary(qk, cos, sin).split([self.num_heads, self.num_kv_heads], dim=1)
        attn = paged_attention(q, k, v, k_slots, v_slots, meta, self.scale)
        x = x + self.o_proj(attn.view(1, t, self.q_size))
        gate, up = self.gate_up_proj(rms_norm(x, self.post_attention_norm, self.eps)).chunk(2, dim=-1)
        return x + self.down_proj(F.silu(gate) * up)


class CausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, rope: RotaryEmbedding, shard: Shard = Shard(),
                 comm: Collectives | None = None):
        """shard, comm: this rank's part and the collectives with the other ranks (None: one rank)."""
        super().__init__()
        self.cfg, self.comm = cfg, comm
        vocab_rows = shard.vocab_rows(cfg)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size) if comm is None else \
            VocabParallelEmbedding(vocab_rows, cfg.hidden_size, shard.vocab(cfg).start, comm)
        self.layers = nn.ModuleList(DecoderLayer(cfg, shard, comm) for _ in range(cfg.num_layers))
        self.norm = nn.Parameter(torch.ones(cfg.hidden_size))
        # The output projection kept as [hidden, vocab] (a copy of the embeddings when tied): a
        # few-row product with it streams the weights at memory speed on CPU, where a linear over
        # [vocab, hidden] runs at about half that.
        self.lm_head_t = nn.Parameter(torch.empty(cfg.hidden_size, vocab_rows))
        self.lm_head_packed: PackedWeight | None = None
        self.rope = rope

    def pack(self) -> None:
        """Also keep CPU copies of every projection's weight (see linear.py)."""
        for module in self.modules():
            if isinstance(module, Linear):
                module.pack()
        self.lm_head_packed = pack_weight(self.lm_head_t.t())

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                kv: KVCache, on_layer: Callable[[int], None] | None = None) -> torch.Tensor:
        """Hidden states [tokens, hidden] after the final norm, for the packed step.

        on_layer(i) runs once layer i's KV is in the cache, so that a transfer can
        send layer i while layer i + 1 computes.
        """
        x = self.embed_tokens(input_ids).unsqueeze(0)
        cos, sin = self.rope.tables(positions)
        for i, layer in enumerate(self.layers):
            k_slots, v_slots = kv.layer_slots(i)
            x = layer(x, cos, sin, k_slots, v_slots, meta)
            if on_layer is not None:
                on_layer(i)
        return rms_norm(x, self.norm, self.cfg.rms_norm_eps)[0]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """fp32 logits [n, vocab] for the selected hidden states [n, hidden] (on every rank)."""
        if uses_packed(hidden, self.lm_head_packed):
            logits = packed_linear(hidden, self.lm_head_packed, None)
        else:
            logits = torch.matmul(hidden, self.lm_head_t)
        if self.comm is not None:  # each rank has its vocab shard's columns; the padding is cut off
            logits = self.comm.all_gather(logits)[:, :self.cfg.vocab_size]
        return logits.float()
