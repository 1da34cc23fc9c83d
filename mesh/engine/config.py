"""Engine options, validated on construction."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class EngineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(description="Hugging Face checkpoint folder")
    device: str = Field("auto", pattern="^(auto|cpu|cuda|npu)$")
    dtype: str = Field("auto", pattern="^(auto|float32|bfloat16|float16)$")
    block_size: int = Field(16, ge=1, le=1024)
    kv_cache_gb: float = Field(1.0, gt=0, description="memory for the KV cache, when num_blocks is unset")
    num_blocks: int | None = Field(None, ge=1, description="KV blocks; overrides kv_cache_gb")
    max_num_seqs: int = Field(256, ge=1, description="sequences in one step's batch at most")
    max_num_batched_tokens: int | None = Field(None, ge=16, description="tokens in one step at most; longer prompts "
                                               "are chunked. Default: 2048 on CPU, 8192 on a GPU or NPU")
    prefill_chunk_tokens: int | None = Field(None, ge=1, description="while requests decode, prefill tokens in "
                                             "one step at most: a long prompt is chunked over steps that run the "
                                             "decodes too. Default: 512 on CPU, 2048 on a GPU or NPU")
    max_model_len: int | None = Field(None, ge=2, description="context length; default: the model's")
    enable_prefix_caching: bool = Field(True, description="reuse the KV of full blocks of earlier prompts")
    packed_weights: bool | None = Field(None, description="on CPU in fp32, also keep two copies of the "
                                        "weights laid out for the host: oneDNN-blocked for steps of 9-2048 "
                                        "tokens, and the few-row kernel's for steps of up to 8 (three times "
                                        "the weight memory); default: when the weights take at most a sixth "
                                        "of the host's memory")
    threads: int | None = Field(None, ge=1, description="CPU threads for torch (per rank); default: torch's, "
                                "or with several ranks on a CPU its cores split between them")
    tensor_parallel_size: int = Field(1, ge=1, le=64, description="ranks the model is split across (tensor "
                                      "parallelism): rank 0 runs in this process, the others as processes "
                                      "on this host; each holds 1/n of the weights and of the KV heads")
    collective_timeout_s: float = Field(60.0, gt=0, description="with several ranks: how long a rank waits "
                                        "for the others at a collective before the engine fails")
    fail_steps: dict[str, int] = Field(default_factory=dict, description="fault injection, for tests: request "
                                       "id -> output tokens after which each step of that request raises "
                                       "(0: its prefill already)")
