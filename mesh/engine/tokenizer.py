"""A checkpoint's tokenizer: `tokenizer.json` through the `tokenizers` library."""
from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer as _Tokenizer

from mesh.engine.errors import CheckpointError


class Tokenizer:
    def __init__(self, folder: str | Path):
        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise CheckpointError(f"{path} not found: pdmesh needs the fast-tokenizer file tokenizer.json")
        try:
            self.backend = _Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises plain Exception on malformed files
            raise CheckpointError(f"cannot load {path}: {e}") from None
        config_path = folder / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        self.chat_template: str | None = config.get("chat_template")
        self.eos_token: str | None = _token_text(config.get("eos_token"))
        self.bos_token: str | None = _token_text(config.get("bos_token"))
        self.eos_token_id = self.backend.token_to_id(self.eos_token) if self.eos_token else None

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)


def _token_text(token) -> str | None:
    """tokenizer_config.json writes special tokens as strings or as AddedToken dicts."""
    return token.get("content") if isinstance(token, dict) else token
