"""Loads a Hugging Face checkpoint folder (config.json + *.safetensors) into a CausalLM."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from mesh.engine.errors import CheckpointError
from mesh.engine.model import CausalLM
from mesh.engine.model_config import ModelConfig
from mesh.engine.rope import RotaryEmbedding


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


def _read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for path in safetensors_files(folder):
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    tensors[name] = f.get_tensor(name)
        except Exception as e:  # safetensors raises its own error types for corrupt files
            raise CheckpointError(f"cannot read {path}: {e}") from None
    return tensors


def load_model(folder: str | Path, cfg: ModelConfig, max_positions: int, dtype: torch.dtype,
               device: torch.device) -> CausalLM:
    folder = Path(folder)
    src = _read_tensors(folder)

    def take(name: str) -> torch.Tensor:
        try:
            return src.pop(name)
        except KeyError:
            raise CheckpointError(f"checkpoint in {folder} lacks tensor {name!r}") from None

    def take_optional(name: str) -> torch.Tensor | None:
        return src.pop(name, None)

    rope = RotaryEmbedding(cfg.rope, cfg.head_dim, max_positions, dtype, device)
    with torch.device("meta"):  # no memory until the real weights are assigned
        model = CausalLM(cfg, rope)
    weights: dict[str, torch.Tensor] = {"embed_tokens.weight": take("model.embed_tokens.weight"),
                                        "norm": take("model.norm.weight")}
    for i in range(cfg.num_layers):
        p, q = f"model.layers.{i}.", f"layers.{i}."
        a = p + "self_attn."
        weights[q + "qkv_proj.weight"] = torch.cat([take(a + f"{n}_proj.weight") for n in "qkv"])
        if cfg.qkv_bias:
            weights[q + "qkv_proj.bias"] = torch.cat([take(a + f"{n}_proj.bias") for n in "qkv"])
        weights[q + "o_proj.weight"] = take(a + "o_proj.weight")
        if cfg.o_bias:
            weights[q + "o_proj.bias"] = take(a + "o_proj.bias")
        if cfg.qk_norm:
            weights[q + "qk_norm"] = torch.cat([take(a + "q_norm.weight").expand(cfg.num_heads, -1),
                                                take(a + "k_norm.weight").expand(cfg.num_kv_heads, -1)])
        m = p + "mlp."
        weights[q + "gate_up_proj.weight"] = torch.cat([take(m + "gate_proj.weight"), take(m + "up_proj.weight")])
        weights[q + "down_proj.weight"] = take(m + "down_proj.weight")
        if cfg.mlp_bias:
            weights[q + "gate_up_proj.bias"] = torch.cat([take(m + "gate_proj.bias"), take(m + "up_proj.bias")])
            weights[q + "down_proj.bias"] = take(m + "down_proj.bias")
        weights[q + "input_norm"] = take(p + "input_layernorm.weight")
        weights[q + "post_attention_norm"] = take(p + "post_attention_layernorm.weight")
    lm_head = take_optional("lm_head.weight")
    if cfg.tie_word_embeddings:
        lm_head = weights["embed_tokens.weight"]
    elif lm_head is None:
        raise CheckpointError(f"checkpoint in {folder} lacks 'lm_head.weight' and does not tie embeddings")
    weights["lm_head_t"] = lm_head.t().contiguous()
    try:
        model.load_state_dict({k: v.to(dtype) for k, v in weights.items()}, strict=True, assign=True)
    except RuntimeError as e:
        raise CheckpointError(f"weights in {folder} do not match its config.json: {e}") from None
    return model.to(device).eval()
