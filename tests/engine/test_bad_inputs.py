"""Bad checkpoints, requests and options fail at once with a message that says what to fix."""
from __future__ import annotations

import json
import shutil

import pydantic
import pytest
import torch
from safetensors.torch import load_file, save_file

from mesh.engine.config import EngineConfig
from mesh.engine.engine import Engine
from mesh.engine.errors import CheckpointError, EngineError, RequestError
from mesh.engine.sampling_params import SamplingParams


@pytest.fixture
def copy(checkpoint, tmp_path):
    """A private copy of the tiny fp32 Llama checkpoint, to break."""
    folder = tmp_path / "model"
    shutil.copytree(checkpoint(), folder)
    return folder


def load(folder, **options) -> Engine:
    return Engine(EngineConfig(model=str(folder), dtype="float32", num_blocks=16, **options))


# -- checkpoints ----------------------------------------------------------------------------------

@pytest.mark.parametrize("missing, message", [
    ("config.json", r"config\.json not found: point --model at a Hugging Face checkpoint folder"),
    ("model.safetensors", r"no \*\.safetensors file in .*: pdmesh loads safetensors weights only"),
    ("tokenizer.json", r"tokenizer\.json not found: pdmesh needs the fast-tokenizer file"),
])
def test_missing_file_is_named(missing, message, copy):
    (copy / missing).unlink()
    with pytest.raises(CheckpointError, match=message):
        load(copy)


def test_missing_folder_is_named(tmp_path):
    with pytest.raises(CheckpointError, match=f"{tmp_path / 'nowhere'}/config.json not found"):
        load(tmp_path / "nowhere")


def edit_config(folder, **changes):
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


def test_unsupported_architecture_lists_the_supported_ones(copy):
    edit_config(copy, architectures=["GPT2LMHeadModel"], model_type="gpt2")
    with pytest.raises(CheckpointError, match=r"unsupported architecture \['GPT2LMHeadModel'\]: "
                                              r"pdmesh serves LlamaForCausalLM, MistralForCausalLM"):
        load(copy)


def test_unsupported_rope_type_lists_the_supported_ones(copy):
    edit_config(copy, rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    with pytest.raises(CheckpointError, match="unsupported rope type 'dynamic': pdmesh supports default, "
                                              "linear, llama3, yarn"):
        load(copy)


def test_config_lacking_a_field_names_it(copy):
    cfg = json.loads((copy / "config.json").read_text())
    del cfg["hidden_size"]
    (copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="config.json lacks the field 'hidden_size'"):
        load(copy)


def test_config_that_is_not_json_is_named(copy):
    (copy / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json is not valid JSON"):
        load(copy)


def test_missing_tensor_is_named(copy):
    weights = load_file(copy / "model.safetensors")
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, copy / "model.safetensors")
    with pytest.raises(CheckpointError, match="lacks tensor 'model.layers.1.mlp.up_proj.weight'"):
        load(copy)


def test_tensor_of_the_wrong_shape_is_reported(copy):
    weights = load_file(copy / "model.safetensors")
    weights["model.norm.weight"] = torch.ones(7)
    save_file(weights, copy / "model.safetensors")
    with pytest.raises(CheckpointError, match="do not match its config.json"):
        load(copy)


def test_missing_shard_named_by_the_index(copy):
    (copy / "model.safetensors").rename(copy / "model-00001-of-00002.safetensors")
    names = load_file(copy / "model-00001-of-00002.safetensors")
    index = {"weight_map": {n: "model-00001-of-00002.safetensors" for n in names}}
    index["weight_map"]["lm_head.weight"] = "model-00002-of-00002.safetensors"
    (copy / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="names shards that are missing: .*model-00002-of-00002"):
        load(copy)


def test_corrupt_safetensors_file_is_named(copy):
    (copy / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="cannot read .*model.safetensors"):
        load(copy)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_asking_for_a_missing_device_says_what_to_install(checkpoint):
    with pytest.raises(EngineError, match="torch sees no CUDA GPU: install a CUDA build of torch"):
        load(checkpoint(), device="cuda")


# -- requests -------------------------------------------------------------------------------------

@pytest.fixture
def engine(checkpoint, make_engine):
    return make_engine(checkpoint("qwen3"), max_model_len=32, num_blocks=16, block_size=4)


@pytest.mark.parametrize("prompt, message", [
    ([], "the prompt is empty: send at least one token"),
    ("", "the prompt is empty"),  # qwen3 adds no BOS, so "" encodes to nothing
    ([5, 1024], r"prompt token ids must be integers in \[0, 1024\), got \[1024\]"),
    ([-1, 3], r"prompt token ids must be integers in \[0, 1024\), got \[-1\]"),
    ([2.0, 3], r"must be integers"),
    (list(range(40)), "the prompt has 40 tokens, the model's context is 32: shorten the prompt"),
    (list(range(32)), "the prompt has 32 tokens"),  # leaves no room for one new token
])
def test_bad_prompt_is_rejected_with_what_to_fix(prompt, message, engine):
    with pytest.raises(RequestError, match=message):
        engine.add_request(prompt, SamplingParams())
    assert not engine.has_unfinished()


@pytest.mark.parametrize("stop_ids", [[7, 1024], [2**64]])
def test_stop_token_ids_beyond_the_vocabulary_are_rejected_at_add(stop_ids, engine):
    params = SamplingParams(stop_token_ids=stop_ids, min_tokens=2)  # min_tokens would ban them in the sampler
    with pytest.raises(RequestError, match=r"stop_token_ids must be in \[0, 1024\) for this model"):
        engine.add_request([5, 6], params)
    blocks = engine.blocks.allocate(1)
    with pytest.raises(RequestError, match=r"stop_token_ids must be in \[0, 1024\)"):
        engine.add_prefilled([5, 6], [9], params, blocks)
    engine.blocks.free(blocks)
    assert not engine.has_unfinished()


def test_stop_token_ids_that_ban_every_token_until_min_tokens_are_rejected(engine):
    params = SamplingParams(stop_token_ids=list(range(1024)), min_tokens=1)
    with pytest.raises(RequestError, match="stop_token_ids and EOS ban every token until min_tokens"):
        engine.add_request([5, 6], params)
    engine.generate([[5, 6]], SamplingParams(max_tokens=2, stop_token_ids=list(range(1024))))  # no min_tokens: fine


def test_prompt_longer_than_the_checkpoints_context(edited_checkpoint, make_engine):
    engine = make_engine(edited_checkpoint("llama", max_position_embeddings=24))
    with pytest.raises(RequestError, match="the prompt has 30 tokens, the model's context is 24"):
        engine.add_request(list(range(30)))


def test_prompt_larger_than_the_whole_kv_cache(checkpoint, make_engine):
    engine = make_engine(checkpoint(), num_blocks=2, block_size=4)
    with pytest.raises(RequestError, match="the prompt needs 3 KV blocks, the cache has 2: shorten the prompt "
                                           "or give more KV memory"):
        engine.add_request(list(range(10)))


def test_request_id_in_use_is_rejected(engine):
    engine.add_request([1, 2, 3], request_id="r1")
    with pytest.raises(RequestError, match="request id 'r1' is already in use"):
        engine.add_request([4, 5], request_id="r1")
    engine.abort("r1")


def test_prefilled_request_without_room_or_first_token_is_rejected(engine):
    blocks = engine.blocks.allocate(2)
    with pytest.raises(RequestError, match="carries at least its first generated token"):
        engine.add_prefilled([1, 2, 3], [], SamplingParams(), blocks)
    with pytest.raises(RequestError, match="2 blocks cannot hold"):  # 9 + 1 tokens, KV of 9 in 8 slots
        engine.add_prefilled(list(range(9)), [5], SamplingParams(), blocks)
    engine.blocks.free(blocks)
    assert not engine.has_unfinished()


@pytest.mark.parametrize("options, message", [
    ({"max_tokens": 0}, "max_tokens must be a positive integer, got 0"),
    ({"max_tokens": -3}, "max_tokens must be a positive integer, got -3"),
    ({"max_tokens": 2.5}, "max_tokens must be a positive integer, got 2.5"),
    ({"temperature": -0.1}, r"temperature must be a number >= 0: 0 \(greedy\) or a finite number >= 0.01, got -0.1"),
    ({"temperature": float("nan")}, "temperature must be a number >= 0: .* got nan"),
    ({"temperature": 1e-300}, "temperature must be a number >= 0: .* got 1e-300"),  # its probabilities are NaN
    ({"temperature": float("inf")}, "temperature must be a number >= 0: .* got inf"),
    ({"temperature": 10**400}, "temperature must be a number >= 0: .* got 1000"),  # no float holds it
    ({"top_p": 0.0}, r"top_p must be a number in \(0, 1\], got 0.0"),
    ({"top_p": 1.5}, r"top_p must be a number in \(0, 1\], got 1.5"),
    ({"top_k": -1}, r"top_k must be an integer >= 0 \(0 disables it\), got -1"),
    ({"top_k": 1.5}, "top_k must be an integer"),
    ({"seed": "7"}, r"seed must be an integer in \[0, 2\*\*63\), got '7'"),
    ({"seed": 2**64}, r"seed must be an integer in \[0, 2\*\*63\), got 18446744073709551616"),
    ({"seed": -1}, r"seed must be an integer in \[0, 2\*\*63\), got -1"),
    ({"stop": [""]}, "stop strings must be non-empty strings"),
    ({"stop_token_ids": [-2]}, r"stop_token_ids must be non-negative integers, got \[-2\]"),
    ({"min_tokens": 20, "max_tokens": 10}, "min_tokens must be between 0 and max_tokens, got 20"),
])
def test_bad_sampling_values_are_rejected_with_what_to_fix(options, message):
    with pytest.raises(RequestError, match=message):
        SamplingParams(**options)


@pytest.mark.parametrize("options, field", [({"temperature": "0.5"}, "temperature"), ({"top_p": None}, "top_p")])
def test_sampling_values_of_the_wrong_type_name_the_field(options, field):
    with pytest.raises(RequestError, match=field):
        SamplingParams(**options)


def test_request_errors_are_value_errors():
    # Callers that catch ValueError (argument parsing, HTTP layers) see request errors too.
    with pytest.raises(ValueError):
        SamplingParams(max_tokens=0)


# -- engine options -------------------------------------------------------------------------------

@pytest.mark.parametrize("options, field", [
    ({"block_size": 0}, "block_size"),
    ({"num_blocks": 0}, "num_blocks"),
    ({"kv_cache_gb": 0}, "kv_cache_gb"),
    ({"max_num_seqs": 0}, "max_num_seqs"),
    ({"max_num_batched_tokens": 8}, "max_num_batched_tokens"),
    ({"max_model_len": 1}, "max_model_len"),
    ({"dtype": "float8"}, "dtype"),
    ({"device": "tpu"}, "device"),
    ({"threads": 0}, "threads"),
    ({"blocksize": 16}, "blocksize"),  # a typo is an error, not silently ignored
])
def test_bad_engine_config_names_the_field(options, field, tmp_path):
    with pytest.raises(pydantic.ValidationError, match=field):
        EngineConfig(model=str(tmp_path), **options)


def test_engine_config_needs_a_model():
    with pytest.raises(pydantic.ValidationError, match="model"):
        EngineConfig()
