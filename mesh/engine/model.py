"""The decoder-only transformer shared by the Llama, Mistral, Qwen2 and Qwen3 families.

Activations are packed as [1, tokens, hidden]: on CPUs with bf16 units a linear
over a 3-D input reads weights several times faster than over a 2-D one.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from mesh.engine.attention import AttentionMetadata, paged_attention
from mesh.engine.kv_cache import KVCache
from mesh.engine.linear import Linear, pack_weight, packed_linear, uses_packed
from mesh.engine.model_config import ModelConfig
from mesh.engine.rope import RotaryEmbedding, apply_rotary


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Hugging Face's RMSNorm over the last dim: normalise in fp32, cast back, then scale.

    weight may have more dims than the last (one row per head), and broadcasts.
    """
    if x.dtype == torch.float32 and weight.dim() == 1:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    return weight * F.rms_norm(x.float(), (x.shape[-1],), None, eps).to(x.dtype)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        h, d = cfg.hidden_size, cfg.head_dim
        self.q_size, self.kv_size = cfg.num_heads * d, cfg.num_kv_heads * d
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, d
        self.eps = cfg.rms_norm_eps
        self.qkv_proj = Linear(h, self.q_size + 2 * self.kv_size, bias=cfg.qkv_bias)
        self.o_proj = Linear(self.q_size, h, bias=cfg.o_bias)
        self.gate_up_proj = Linear(h, 2 * cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = Linear(cfg.intermediate_size, h, bias=cfg.mlp_bias)
        self.input_norm = nn.Parameter(torch.ones(h))
        self.post_attention_norm = nn.Parameter(torch.ones(h))
        # Qwen3's q and k norms as one [heads + kv_heads, head_dim] weight: q and k are normed
        # and rotated together, as one tensor.
        self.qk_norm = nn.Parameter(torch.ones(cfg.num_heads + cfg.num_kv_heads, d)) if cfg.qk_norm else None
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
    def __init__(self, cfg: ModelConfig, rope: RotaryEmbedding):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = nn.Parameter(torch.ones(cfg.hidden_size))
        # The output projection kept as [hidden, vocab] (a copy of the embeddings when tied): a
        # few-row product with it streams the weights at memory speed on CPU, where a linear over
        # [vocab, hidden] runs at about half that.
        self.lm_head_t = nn.Parameter(torch.empty(cfg.hidden_size, cfg.vocab_size))
        self.lm_head_packed: torch.Tensor | None = None
        self.rope = rope

    def pack(self) -> None:
        """Also keep oneDNN-blocked copies of every projection's weight (see linear.py)."""
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
        """fp32 logits [n, vocab] for the selected hidden states [n, hidden]."""
        if uses_packed(hidden, self.lm_head_packed):
            return packed_linear(hidden, self.lm_head_packed, None).float()
        return torch.matmul(hidden, self.lm_head_t).float()
