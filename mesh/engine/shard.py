"""Which part of the model one tensor-parallel rank holds (pure arithmetic, no torch).

Rank r of n holds, as vLLM's parallel layers split them:
- query heads [r * H/n, (r + 1) * H/n): attention runs per head, so a rank needs nothing
  from the others until the output projection;
- the KV heads its query heads read. With n <= KV heads, KV/n of them; with more ranks
  than KV heads, one head, replicated on n/KV ranks (rank r holds head r // (n/KV)):
  heads are KV-major (query heads of KV head j are j*G .. j*G + G-1), so that head is
  exactly the one r's query heads use;
- rows [r * I/n, (r + 1) * I/n) of the MLP's gate and up projections and the same columns
  of its down projection (column- then row-parallel: one all-reduce per block);
- rows [r * V', (r + 1) * V') of the embeddings and the output projection, V' = ceil(V / n)
  (the last shard is padded with zero rows; the padded logits are cut off after gathering).
Norms and biases of row-parallel projections are whole on every rank.
"""
from __future__ import annotations

from dataclasses import dataclass

from mesh.engine.errors import CheckpointError
from mesh.engine.model_config import ModelConfig


@dataclass(frozen=True)
class Shard:
    rank: int = 0
    size: int = 1

    def check(self, cfg: ModelConfig) -> None:
        """Raises CheckpointError when the model cannot be split across `size` ranks."""
        n = self.size
        if cfg.num_heads % n:
            raise CheckpointError(f"the model's {cfg.num_heads} attention heads do not split across "
                                  f"{n} tensor-parallel ranks: use a size that divides {cfg.num_heads}")
        if cfg.num_kv_heads % n and n % cfg.num_kv_heads:
            raise CheckpointError(f"the model's {cfg.num_kv_heads} KV heads neither split across nor replicate "
                                  f"evenly over {n} tensor-parallel ranks: use a divisor or a multiple of "
                                  f"{cfg.num_kv_heads}")
        if cfg.intermediate_size % n:
            raise CheckpointError(f"the model's MLP width {cfg.intermediate_size} does not split across "
                                  f"{n} tensor-parallel ranks")

    def heads(self, cfg: ModelConfig) -> range:
        per = cfg.num_heads // self.size
        return range(self.rank * per, (self.rank + 1) * per)

    def kv_heads(self, cfg: ModelConfig) -> range:
        if self.size <= cfg.num_kv_heads:
            per = cfg.num_kv_heads // self.size
            return range(self.rank * per, (self.rank + 1) * per)
        head = self.rank // (self.size // cfg.num_kv_heads)
        return range(head, head + 1)

    def intermediate(self, cfg: ModelConfig) -> range:
        per = cfg.intermediate_size // self.size
        return range(self.rank * per, (self.rank + 1) * per)

    def vocab_rows(self, cfg: ModelConfig) -> int:
        """Rows of this rank's embedding and output-projection shards (the same on every rank)."""
        return -(-cfg.vocab_size // self.size)

    def vocab(self, cfg: ModelConfig) -> range:
        """The token ids this rank's shard holds (the last one may have fewer than vocab_rows)."""
        per = self.vocab_rows(cfg)
        return range(min(self.rank * per, cfg.vocab_size), min((self.rank + 1) * per, cfg.vocab_size))


def kv_head_ranges(cfg: ModelConfig, size: int) -> list[range]:
    """Every rank's KV heads at `size` ranks (CheckpointError when the model does not split so)."""
    Shard(0, size).check(cfg)
    return [Shard(rank, size).kv_heads(cfg) for rank in range(size)]
