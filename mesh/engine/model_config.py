"""The model's shape, read from a Hugging Face `config.json`."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mesh.engine.errors import CheckpointError



@dataclass(frozen=True)
class _Family:
    """Which optional parts an architecture has, as its transformers modelling code builds them."""
    qkv_bias: bool = False  # always there
    attention_bias_option: bool = False  # config.attention_bias adds q/k/v/o biases
    mlp_bias_option: bool = False  # config.mlp_bias adds gate/up/down biases
    qk_norm: bool = False


ARCHITECTURES = {
    "LlamaForCausalLM": _Family(attention_bias_option=True, mlp_bias_option=True),
    "MistralForCausalLM": _Family(),
    "Qwen2ForCausalLM": _Family(qkv_bias=True),
    "Qwen3ForCausalLM": _Family(attention_bias_option=True, qk_norm=True),
}
ROPE_TYPES = ("default", "linear", "llama3", "yarn")
_DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool
    sliding_window: int | None
    rope: dict = field(hash=False)  # rope_type, rope_theta and the type's parameters
    dtype: torch.dtype = torch.float32
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None

    @classmethod
    def from_dict(cls, cfg: dict) -> "ModelConfig":
        archs = cfg.get("architectures") or []
        arch = next((a for a in archs if a in ARCHITECTURES), None)
        if arch is None:
            raise CheckpointError(
                f"unsupported architecture {archs or cfg.get('model_type')!r}: pdmesh serves "
                f"{', '.join(ARCHITECTURES)}")
        try:
            hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
            family = ARCHITECTURES[arch]
            attention_bias = family.attention_bias_option and bool(cfg.get("attention_bias", False))
            window = cfg.get("sliding_window")
            if arch.startswith("Qwen") and not cfg.get("use_sliding_window", False):
                window = None
            eos = cfg.get("eos_token_id")
            eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
            dtype_name = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
            if dtype_name not in _DTYPE_NAMES:
                raise CheckpointError(f"unsupported checkpoint dtype {dtype_name!r}")
            return cls(
                architecture=arch,
                vocab_size=int(cfg["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(cfg["intermediate_size"]),
                num_layers=int(cfg["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
                head_dim=int(cfg.get("head_dim") or hidden // heads),
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                qkv_bias=family.qkv_bias or attention_bias,
                o_bias=attention_bias,
                mlp_bias=family.mlp_bias_option and bool(cfg.get("mlp_bias", False)),
                qk_norm=family.qk_norm,
                sliding_window=int(window) if window else None,
                rope=_rope_parameters(cfg),
                dtype=_DTYPE_NAMES[dtype_name],
                eos_token_ids=eos_ids,
                bos_token_id=cfg.get("bos_token_id"),
            )
        except KeyError as e:
            raise CheckpointError(f"config.json lacks the field {e.args[0]!r}") from None

    @classmethod
    def from_folder(cls, folder: str | Path) -> "ModelConfig":
        path = Path(folder) / "config.json"
        if not path.is_file():
            raise CheckpointError(f"{path} not found: point --model at a Hugging Face checkpoint "
                                  "folder (config.json, *.safetensors, tokenizer.json)")
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path} is not valid JSON: {e}") from None


def _rope_parameters(cfg: dict) -> dict:
    """Both layouts: transformers 5's `rope_parameters` and the older `rope_theta` + `rope_scaling`."""
    params = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    params.setdefault("rope_theta", cfg.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise CheckpointError(f"unsupported rope type {rope_type!r}: pdmesh supports {', '.join(ROPE_TYPES)}")
    params["rope_type"] = rope_type
    if rope_type in ("llama3", "yarn"):
        params.setdefault("original_max_position_embeddings",
                          cfg.get("original_max_position_embeddings", cfg.get("max_position_embeddings")))
    return params
