"""Loads a Hugging Face checkpoint folder (config.json + *.safetensors) into a CausalLM, or one
tensor-parallel rank's shard of it."""
from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open

from mesh.engine.errors import CheckpointError
from mesh.engine.model import CausalLM
from mesh.engine.model_config import ModelConfig
from mesh.engine.parallel import Collectives
from mesh.engine.rope import RotaryEmbedding
from mesh.engine.shard import Shard


def safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [folder / n for n in names]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index} names shards that are missing: {', '.join(missing)}")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no *.safetensors file in {folder}: pdmesh loads safetensors weights only")
    return files


class _Tensors:
    """The checkpoint's tensors by name, read lazily: a rank reads only the rows or columns it
    holds (safetensors maps the files and `get_slice` reads just that part)."""

    def __init__(self, folder: Path, stack: ExitStack):
        self.folder = folder
        self.files: dict[str, object] = {}
        for path in safetensors_files(folder):
            try:
                f = stack.enter_context(safe_open(str(path), framework="pt"))
            except Exception as e:  # safetensors raises its own error types for corrupt files
                raise CheckpointError(f"cannot read {path}: {e}") from None
            self.files.update(dict.fromkeys(f.keys(), f))

    def has(self, name: str) -> bool:
        return name in self.files

    def take(self, name: str, rows: range | None = None, cols: range | None = None) -> torch.Tensor:
        """The tensor, or the given rows (dim 0) or columns (dim 1) of it."""
        f = self.files.get(name)
        if f is None:
            raise CheckpointError(f"checkpoint in {self.folder} lacks tensor {name!r}")
        try:
            if rows is None and cols is None:
                return f.get_tensor(name)
            part = f.get_slice(name)
            return part[rows.start:rows.stop] if cols is None else part[:, cols.start:cols.stop]
        except Exception as e:
            raise CheckpointError(f"cannot read tensor {name!r} in {self.folder}: {e}") from None


def _padded(rows: torch.Tensor, n: int) -> torch.Tensor:
    """rows with zero rows appended up to n (the last vocab shard)."""
    return rows if rows.shape[0] == n else torch.cat([rows, rows.new_zeros(n - rows.shape[0], *rows.shape[1:])])


def load_model(folder: str | Path, cfg: ModelConfig, max_positions: int, dtype: torch.dtype,
               device: torch.device, shard: Shard = Shard(), comm: Collectives | None = None) -> CausalLM:
    """The model, or with several ranks this rank's shard of it (see shard.py), reading only that part."""
    folder = Path(folder)
    shard.check(cfg)
    rope = RotaryEmbedding(cfg.rope, cfg.head_dim, max_positions, dtype, device)
    with torch.device("meta"):  # no memory until the real weights are assigned
        model = CausalLM(cfg, rope, shard, comm)
    with ExitStack() as stack:
        weights = _shard_weights(_Tensors(folder, stack), cfg, shard)
    try:
        model.load_state_dict({k: v.to(dtype) for k, v in weights.items()}, strict=True, assign=True)
    except RuntimeError as e:
        raise CheckpointError(f"weights in {folder} do not match its config.json: {e}") from None
    return model.to(device).eval()


def _shard_weights(src: _Tensors, cfg: ModelConfig, shard: Shard) -> dict[str, torch.Tensor]:
    """The model's state dict for this shard, from the Hugging Face tensor names."""
    whole = shard.size == 1
    d = cfg.head_dim
    heads, kv_heads, inter = shard.heads(cfg), shard.kv_heads(cfg), shard.intermediate(cfg)
    q_rows = range(heads.start * d, heads.stop * d)
    kv_rows = range(kv_heads.start * d, kv_heads.stop * d)
    vocab_rows = shard.vocab_rows(cfg)

    def take(name: str, rows: range | None = None, cols: range | None = None) -> torch.Tensor:
        return src.take(name, None if whole else rows, None if whole else cols)

    def vocab_shard(name: str) -> torch.Tensor:
        return take(name) if whole else _padded(src.take(name, shard.vocab(cfg)), vocab_rows)

    weights: dict[str, torch.Tensor] = {"embed_tokens.weight": vocab_shard("model.embed_tokens.weight"),
                                        "norm": take("model.norm.weight")}
    for i in range(cfg.num_layers):
        p, q = f"model.layers.{i}.", f"layers.{i}."
        a = p + "self_attn."
        qkv_rows = (q_rows, kv_rows, kv_rows)
        weights[q + "qkv_proj.weight"] = torch.cat([take(a + f"{n}_proj.weight", r) for n, r in zip("qkv", qkv_rows)])
        if cfg.qkv_bias:
            weights[q + "qkv_proj.bias"] = torch.cat([take(a + f"{n}_proj.bias", r) for n, r in zip("qkv", qkv_rows)])
        weights[q + "o_proj.weight"] = take(a + "o_proj.weight", cols=q_rows)
        if cfg.o_bias:
            weights[q + "o_proj.bias"] = take(a + "o_proj.bias")
        if cfg.qk_norm:
            weights[q + "qk_norm"] = torch.cat([take(a + "q_norm.weight").expand(len(heads), -1),
                                                take(a + "k_norm.weight").expand(len(kv_heads), -1)])
        m = p + "mlp."
        weights[q + "gate_up_proj.weight"] = torch.cat([take(m + "gate_proj.weight", inter),
                                                        take(m + "up_proj.weight", inter)])
        weights[q + "down_proj.weight"] = take(m + "down_proj.weight", cols=inter)
        if cfg.mlp_bias:
            weights[q + "gate_up_proj.bias"] = torch.cat([take(m + "gate_proj.bias", inter),
                                                          take(m + "up_proj.bias", inter)])
            weights[q + "down_proj.bias"] = take(m + "down_proj.bias")
        weights[q + "input_norm"] = take(p + "input_layernorm.weight")
        weights[q + "post_attention_norm"] = take(p + "post_attention_layernorm.weight")
    if cfg.tie_word_embeddings:
        lm_head = weights["embed_tokens.weight"]
    elif src.has("lm_head.weight"):
        lm_head = vocab_shard("lm_head.weight")
    else:
        raise CheckpointError(f"checkpoint in {src.folder} lacks 'lm_head.weight' and does not tie embeddings")
    weights["lm_head_t"] = lm_head.t().contiguous()
    return weights
