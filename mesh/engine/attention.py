"""Attention over the paged KV cache for one step's mixed batch.

A step's tokens are packed: first one token for each decoding sequence, then
the prompt chunks being prefilled. On CPU decodes read their KV in place
through the paged-decode kernel (mesh/engine/paged_decode.py); elsewhere, or
where it cannot be built, they share one batched attention call over KV
gathered into [batch, max_context]. Each prefill chunk attends over its
own context, which is a zero-copy slice of the cache when its blocks are one run:
on CPU through the prompt-attention kernel (mesh/engine/prefill_attention.py) where
it runs the model, elsewhere through SDPA with the chunk's mask.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from mesh.engine.paged_decode import paged_decode
from mesh.engine.prefill_attention import prefill_attention


@dataclass
class PrefillChunk:
    q_start: int  # offset of the chunk's tokens in the step
    q_len: int
    ctx_len: int  # tokens before and in this chunk
    ctx_slots: torch.Tensor | slice  # cache slots of the context, in token order
    mask: torch.Tensor | None  # from causal_mask; None for plain causal (and for the kernel)


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] cache slot each new token's K/V goes to
    num_decodes: int = 0
    decode_slots: torch.Tensor | None = None  # [B * L] context slots per decode (padded), flat
    decode_mask: torch.Tensor | None = None  # [B, 1, 1, L] True where attended
    # the kernel's inputs instead of decode_slots and decode_mask: block ids per decode
    # [B, W], its attended positions [lo, hi) and the block size
    decode_table: torch.Tensor | None = None
    decode_lo: torch.Tensor | None = None
    decode_hi: torch.Tensor | None = None
    block_size: int = 0
    prefills: list[PrefillChunk] = field(default_factory=list)
    # prefill chunks through the prompt-attention kernel, with the model's sliding window
    prefill_kernel: bool = False
    window: int | None = None


def causal_mask(q_len: int, ctx_len: int, window: int | None, device: torch.device) -> torch.Tensor | None:
    """[q_len, ctx_len] mask for queries at the last q_len of ctx_len positions; None when plain causal."""
    if q_len == ctx_len and window is None:
        return None
    q_pos = torch.arange(ctx_len - q_len, ctx_len, device=device)[:, None]
    k_pos = torch.arange(ctx_len, device=device)[None, :]
    mask = k_pos <= q_pos
    if window is not None:
        mask &= k_pos > q_pos - window
    return mask


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    k_slots: torch.Tensor, v_slots: torch.Tensor,
                    meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """q: [T, heads, dim]; k, v: [T, kv_heads, dim]; *_slots: the layer's cache as [slots, kv_heads, dim]."""
    k_slots.index_copy_(0, meta.slot_mapping, k)
    v_slots.index_copy_(0, meta.slot_mapping, v)
    out = torch.empty_like(q)
    nd = meta.num_decodes
    if nd and meta.decode_table is not None:
        out[:nd] = paged_decode(q[:nd].contiguous(), k_slots, v_slots, meta.decode_table, meta.decode_lo,
                                meta.decode_hi, meta.block_size, scale)
    elif nd:
        shape = (nd, -1, *k_slots.shape[1:])
        kk = _rows(k_slots, meta.decode_slots).view(shape).transpose(1, 2)  # [B, kv_heads, L, dim]
        vv = _rows(v_slots, meta.decode_slots).view(shape).transpose(1, 2)
        # One query token each: the query heads sharing a KV head go in as that head's rows
        # (heads are KV-major, as Hugging Face repeats KV), which runs about 1.7x faster
        # than SDPA's own GQA.
        kv_heads, dim = k_slots.shape[1:]
        qg = q[:nd].view(nd, kv_heads, -1, dim)
        o = F.scaled_dot_product_attention(qg, kk, vv, attn_mask=meta.decode_mask, scale=scale)
        out[:nd] = o.reshape(nd, -1, dim)  # CUDA's SDPA may return it non-contiguous
    for c in meta.prefills:
        if meta.prefill_kernel:
            out[c.q_start:c.q_start + c.q_len] = prefill_attention(
                q[c.q_start:c.q_start + c.q_len], _rows(k_slots, c.ctx_slots), _rows(v_slots, c.ctx_slots),
                meta.window, scale)
            continue
        qc = q[c.q_start:c.q_start + c.q_len].transpose(0, 1).unsqueeze(0)  # [1, heads, q, dim]
        kk = _rows(k_slots, c.ctx_slots).transpose(0, 1).unsqueeze(0)
        vv = _rows(v_slots, c.ctx_slots).transpose(0, 1).unsqueeze(0)
        o = _grouped_sdpa(qc, kk, vv, c.mask, scale)
        out[c.q_start:c.q_start + c.q_len] = o[0].transpose(0, 1)
    return out


def _grouped_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                  scale: float) -> torch.Tensor:
    """Causal (or masked) SDPA with fewer KV heads than query heads.

    CUDA's fused kernels take the groups only as repeated KV heads: asked with
    enable_gqa, they fell back to the unfused math path, two thirds of a prefill's
    time on an H200. On CPU enable_gqa is as fast and copies nothing.
    """
    if q.device.type == "cuda":
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale,
                                          enable_gqa=True)


def _rows(slots: torch.Tensor, which: torch.Tensor | slice) -> torch.Tensor:
    """Cache slots by index (a copy: index_select copies whole rows, about twice as fast as
    advanced indexing on CPU) or by slice (a view)."""
    return slots[which] if isinstance(which, slice) else slots.index_select(0, which)
