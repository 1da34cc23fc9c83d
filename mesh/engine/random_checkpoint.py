"""`pdmesh model init`: writes a random-weight checkpoint in the Hugging Face format.

No model hub is reachable from the machines pdmesh is developed on, so tests,
benchmarks and the demo make their own checkpoints: config.json, safetensors
weights and a byte-level BPE tokenizer trained on local text (the Python
standard library's sources).
"""
from __future__ import annotations

import json
import os
import sysconfig
from pathlib import Path

import click
import torch
from safetensors.torch import save
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

SIZES = {
    # tiny: a few MB, for tests. small: the ~125M shape measured in BASELINES.md.
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1024, corpus_bytes=400_000),
    "small": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                  num_key_value_heads=4, vocab_size=32000, corpus_bytes=3_000_000),
}
FAMILIES = {
    "llama": dict(architectures=["LlamaForCausalLM"], model_type="llama", bos="<|begin_of_text|>",
                  eos="<|end_of_text|>", tie=False, rope_theta=500000.0,
                  rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 1024}),
    "mistral": dict(architectures=["MistralForCausalLM"], model_type="mistral", bos="<s>", eos="</s>",
                    tie=False, rope_theta=1000000.0, rope_scaling=None),
    "qwen2": dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", bos=None, eos="<|endoftext|>",
                  tie=True, rope_theta=1000000.0, rope_scaling=None),
    "qwen3": dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", bos=None, eos="<|endoftext|>",
                  tie=False, rope_theta=1000000.0, rope_scaling=None),
}
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def local_corpus(max_bytes: int) -> list[str]:
    """Deterministic local text: the standard library's sources, in name order."""
    texts, total = [], 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        text = path.read_text(errors="ignore")
        texts.append(text)
        total += len(text)
        if total >= max_bytes:
            break
    return texts


def train_tokenizer(vocab_size: int, bos: str | None, eos: str, corpus_bytes: int) -> Tokenizer:
    specials = [t for t in (bos, eos, "<|im_start|>", "<|im_end|>") if t]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(local_corpus(corpus_bytes), trainer)
    # A small corpus may yield fewer merges than the model's vocabulary: reserved
    # tokens fill the rest, so every id the model can emit decodes.
    missing = vocab_size - tok.get_vocab_size()
    tok.add_special_tokens([f"<|reserved_{i}|>" for i in range(missing)])
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))])
    return tok


def init_checkpoint(folder: str | Path, family: str = "llama", size: str = "tiny",
                    dtype: str = "bfloat16", seed: int = 0, max_position_embeddings: int = 4096) -> Path:
    if family not in FAMILIES:
        raise click.BadParameter(f"unknown family {family!r}: use one of {', '.join(FAMILIES)}")
    if size not in SIZES:
        raise click.BadParameter(f"unknown size {size!r}: use one of {', '.join(SIZES)}")
    f, s = FAMILIES[family], dict(SIZES[size])
    corpus_bytes = s.pop("corpus_bytes")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(s["vocab_size"], f["bos"], f["eos"], corpus_bytes)
    tok.save(str(folder / "tokenizer.json"))
    bos_id, eos_id = (tok.token_to_id(f["bos"]) if f["bos"] else None), tok.token_to_id(f["eos"])
    config = dict(s, architectures=f["architectures"], model_type=f["model_type"], hidden_act="silu",
                  max_position_embeddings=max_position_embeddings, rms_norm_eps=1e-6,
                  rope_theta=f["rope_theta"], tie_word_embeddings=f["tie"], dtype=dtype,
                  bos_token_id=bos_id, eos_token_id=eos_id, initializer_range=0.02, use_cache=True)
    if f["rope_scaling"]:
        config["rope_scaling"] = f["rope_scaling"]
    if family == "qwen3":
        config["head_dim"] = s["hidden_size"] // s["num_attention_heads"]
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": bos_id, "eos_token_id": eos_id}, indent=2))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": f["bos"], "eos_token": f["eos"], "chat_template": CHATML,
         "model_max_length": max_position_embeddings, "tokenizer_class": "PreTrainedTokenizerFast"}, indent=2))
    # written as the other files are (safetensors' save_file makes its file owner-only)
    (folder / "model.safetensors").write_bytes(save(random_weights(config, family, seed, getattr(torch, dtype)),
                                                    metadata={"format": "pt"}))
    return folder


def random_weights(cfg: dict, family: str, seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    h, inter, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    d = cfg.get("head_dim") or h // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * d, cfg["num_key_value_heads"] * d

    def normal(*shape, std=0.02):
        return (torch.randn(*shape, generator=g) * std).to(dtype)

    def norm(n):  # not all ones, so that tests catch a norm weight loaded wrongly
        return (1 + torch.randn(n, generator=g) * 0.1).to(dtype)

    w = {"model.embed_tokens.weight": normal(v, h), "model.norm.weight": norm(h)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        for name, rows in (("q", q), ("k", kv), ("v", kv)):
            w[p + f"self_attn.{name}_proj.weight"] = normal(rows, h)
            if family == "qwen2":
                w[p + f"self_attn.{name}_proj.bias"] = normal(rows)
        w[p + "self_attn.o_proj.weight"] = normal(h, q)
        if family == "qwen3":
            w[p + "self_attn.q_norm.weight"], w[p + "self_attn.k_norm.weight"] = norm(d), norm(d)
        w[p + "mlp.gate_proj.weight"] = normal(inter, h)
        w[p + "mlp.up_proj.weight"] = normal(inter, h)
        w[p + "mlp.down_proj.weight"] = normal(h, inter)
        w[p + "input_layernorm.weight"] = norm(h)
        w[p + "post_attention_layernorm.weight"] = norm(h)
    if not cfg["tie_word_embeddings"]:
        w["lm_head.weight"] = normal(v, h)
    return w


@click.command("init")
@click.argument("folder", type=click.Path(file_okay=False))
@click.option("--family", type=click.Choice(sorted(FAMILIES)), default="llama", show_default=True)
@click.option("--size", type=click.Choice(sorted(SIZES)), default="tiny", show_default=True)
@click.option("--dtype", type=click.Choice(["bfloat16", "float16", "float32"]), default="bfloat16",
              show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--force", is_flag=True, help="write into FOLDER even if it holds files (those of a checkpoint "
                                            "are overwritten)")
def init_command(folder: str, family: str, size: str, dtype: str, seed: int, force: bool) -> None:
    """Write a random-weight checkpoint (Hugging Face format) into FOLDER."""
    held = Path(folder)
    if not force and held.is_dir() and any(held.iterdir()):
        raise click.ClickException(f"{held} is not empty: choose an empty or new folder, or pass --force to "
                                   "write the checkpoint's files into it")
    path = init_checkpoint(folder, family, size, dtype, seed)
    click.echo(f"wrote a random {size} {family} checkpoint ({dtype}) to {path}")


def default_model_dir() -> Path:
    """The demo model pdmesh serves when none is given: made once, then reused."""
    home = Path(os.environ.get("PDMESH_HOME", Path.home() / ".cache" / "pdmesh"))
    folder = home / "models" / "small-llama"
    if not (folder / "model.safetensors").is_file():
        click.echo(f"no --model given: writing a random-weight small Llama checkpoint to {folder}", err=True)
        init_checkpoint(folder, "llama", "small", "bfloat16")
    return folder
