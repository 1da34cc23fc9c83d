"""Shared fixtures: tiny random checkpoints on disk, the Hugging Face models on the same weights,
and engines that are checked for leaked KV blocks when a test ends; the session's one local Ray
and pools on it come from tests/support/ray_fixtures.py."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

pytest_plugins = ["tests.support.ray_fixtures"]


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """checkpoint(family="llama", dtype="float32") -> folder of a tiny random checkpoint.

    Each (family, dtype) is written once per session (tokenizer training takes ~0.5 s).
    Tests must not change these folders: use `edited_checkpoint` for variants.
    """
    from mesh.engine.random_checkpoint import init_checkpoint

    made: dict[tuple[str, str], Path] = {}

    def get(family: str = "llama", dtype: str = "float32") -> Path:
        if (family, dtype) not in made:
            folder = tmp_path_factory.mktemp(f"{family}-{dtype}")
            made[family, dtype] = init_checkpoint(folder, family, "tiny", dtype, seed=0)
        return made[family, dtype]

    return get


@pytest.fixture
def edited_checkpoint(checkpoint, tmp_path):
    """edited_checkpoint(family, dtype, **config_changes) -> a copy whose config.json has the changes
    (a value of None removes the key)."""

    def edit(family: str = "llama", dtype: str = "float32", **changes) -> Path:
        folder = tmp_path / f"{family}-{dtype}-edited"
        shutil.copytree(checkpoint(family, dtype), folder)
        cfg = json.loads((folder / "config.json").read_text())
        for key, value in changes.items():
            if value is None:
                cfg.pop(key, None)
            else:
                cfg[key] = value
        (folder / "config.json").write_text(json.dumps(cfg, indent=2))
        return folder

    return edit


@pytest.fixture(scope="session")
def hf_model():
    """hf_model(folder, dtype="float32") -> transformers' model on the checkpoint, loaded once per session."""
    import torch
    from transformers import AutoModelForCausalLM

    loaded = {}

    def get(folder: Path, dtype: str = "float32"):
        key = (str(folder), dtype)
        if key not in loaded:
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype))
            loaded[key] = model.eval()
        return loaded[key]

    return get


@pytest.fixture
def make_engine():
    """make_engine(folder, **EngineConfig options) -> an Engine with small, test-friendly defaults.

    When the test ends, every engine it made must hold no request and no KV block:
    a leak anywhere (finish, abort, preemption) fails the test that caused it.
    """
    from mesh.engine.config import EngineConfig
    from mesh.engine.engine import Engine
    from mesh.engine.prefix_cache import PrefixCache

    engines = []

    def make(folder: Path, **options) -> Engine:
        # PDMESH_TEST_DEVICE=cuda runs the engine tests on a GPU, against transformers on the CPU.
        options = {"dtype": "float32", "device": os.environ.get("PDMESH_TEST_DEVICE", "cpu"),
                   "block_size": 4, "num_blocks": 128, **options}
        engine = Engine(EngineConfig(model=str(folder), **options))
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        assert not engine.has_unfinished(), "a request was left in the engine"
        assert engine.blocks.num_free == engine.blocks.num_blocks, "KV blocks leaked"
        if isinstance(engine.blocks, PrefixCache):
            engine.blocks.clear()  # cached blocks no request holds
        assert engine.blocks.runs() == [(0, engine.blocks.num_blocks)], "free blocks did not coalesce"
