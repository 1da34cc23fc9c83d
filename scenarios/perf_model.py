"""The performance model: how long prefill, a decode step and a KV transfer take, and
from that what a pool of prefill and decode actors can carry.

  prefill(tokens, sum of squared prompt lengths) = a + b*tokens + c*sumsq   (MLP + attention)
  decode step(batch, context tokens in the batch) = a + b*batch + c*context (weights + KV reads)
  transfer(ops, bytes)                            = a + b*ops + bytes/rate  (per-op cost + link)

Each is a linear model fitted by online least squares (a ridge prior holds the
seed until measurements outweigh it; old measurements fade). It is seeded from
a profile file (YAML/JSON, with its source named) or from `pdmesh bench engine
--output json`, then refined from live measurements.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


class ProfileError(ValueError):
    """A profile or bench file that cannot seed the model, with what to fix."""


@dataclass
class OnlineLinear:
    """y = coef . x, fitted online: ridge prior toward the seed coefficients, forgetting factor."""
    coef: list[float]
    scales: tuple[float, ...]  # typical feature sizes, so that the prior weighs every term alike
    prior_weight: float = 0.1  # a tenth of one measurement: it fills in only what data leaves open
    forget: float = 0.999
    _a: np.ndarray = field(init=False, repr=False)
    _b: np.ndarray = field(init=False, repr=False)
    observations: int = field(default=0, init=False)

    def __post_init__(self):
        k = len(self.coef)
        self._a = self.prior_weight * np.eye(k)
        self._b = self._a @ (np.array(self.coef, dtype=float) * np.array(self.scales))

    def observe(self, x: tuple[float, ...], y: float) -> None:
        z = np.array(x, dtype=float) / np.array(self.scales)
        self._a = self.forget * self._a + np.outer(z, z)
        self._b = self.forget * self._b + y * z
        self.coef = [float(c) for c in np.linalg.solve(self._a, self._b) / np.array(self.scales)]
        self.observations += 1

    def __call__(self, *x: float) -> float:
        return sum(c * v for c, v in zip(self.coef, x))


@dataclass(frozen=True)
class Capacity:
    """What one actor of each role carries for a workload, under the SLOs."""
    prefill_rps: float  # requests/s per prefill actor
    decode_rps: float  # requests/s per decode actor
    decode_batch: int  # concurrent sequences per decode actor within the TPOT target


class PerfModel:
    def __init__(self, name: str, source: str, *, prefill: list[float], decode: list[float],
                 transfer: list[float], kv_bytes_per_token: int, kv_capacity_tokens: int,
                 layers: int, max_batch_tokens: int = 16384, block_tokens: int = 16):
        self.name, self.source = name, source
        self.kv_bytes_per_token, self.kv_capacity_tokens = kv_bytes_per_token, kv_capacity_tokens
        self.layers, self.max_batch_tokens, self.block_tokens = layers, max_batch_tokens, block_tokens
        self.prefill = OnlineLinear(list(prefill), (1.0, 1e4, 1e8))
        self.decode = OnlineLinear(list(decode), (1.0, 32.0, 1e5))
        self.transfer = OnlineLinear(list(transfer), (1.0, 64.0, 1e9))

    # -- predictions ---------------------------------------------------------------------
    def prefill_s(self, tokens: float, sumsq: float) -> float:
        return self.prefill(1.0, tokens, sumsq)

    def decode_step_s(self, batch: float, context_tokens: float) -> float:
        return self.decode(1.0, batch, context_tokens)

    def transfer_s(self, ops: float, nbytes: float) -> float:
        return self.transfer(1.0, ops, nbytes)

    def transfer_ops(self, prompt_tokens: int, contiguous: bool) -> int:
        """One op per layer per K/V when the request's blocks are one run; one per block otherwise."""
        per_layer = 1 if contiguous else math.ceil(prompt_tokens / self.block_tokens)
        return 2 * self.layers * per_layer

    def prompt_transfer_s(self, prompt_tokens: int, contiguous: bool = True) -> float:
        """The time to send a prompt's KV from a prefill actor to a decode actor."""
        return self.transfer_s(self.transfer_ops(prompt_tokens, contiguous), prompt_tokens * self.kv_bytes_per_token)

    def capacity(self, mean_prompt: float, mean_output: float, tpot_s: float,
                 prompt_sq_mean: float | None = None, hold_s: float = 0.0) -> Capacity:
        """Per-actor rates for a workload: prefill batches fill the token budget; decode
        batches grow until a step would miss the TPOT target or the KV would not fit.
        hold_s: how long a request's KV is reserved on the decode actor before it decodes
        (the lease is taken before prefill): memory then carries fewer requests per second."""
        mean_prompt = max(mean_prompt, 1.0)
        sq = prompt_sq_mean if prompt_sq_mean is not None else mean_prompt ** 2
        k = max(1, int(self.max_batch_tokens // mean_prompt))
        prefill_rps = k / max(self.prefill_s(k * mean_prompt, k * sq), 1e-9)
        ctx = mean_prompt + mean_output / 2  # a sequence's mean context over its decode
        a, b, c = self.decode.coef
        by_tpot = (tpot_s - a) / max(b + c * ctx, 1e-12)
        by_memory = self.kv_capacity_tokens / (mean_prompt + mean_output)
        batch = max(1, int(min(by_tpot, by_memory)))
        decoding_s = max(self.decode_step_s(batch, batch * ctx), 1e-9) * max(mean_output, 1.0)
        decode_rps = min(batch / decoding_s, by_memory / (hold_s + decoding_s))
        return Capacity(prefill_rps, decode_rps, batch)

    # -- live measurements -----------------------------------------------------------------
    def observe_prefill(self, tokens: int, sumsq: int, seconds: float) -> None:
        self.prefill.observe((1.0, tokens, sumsq), seconds)

    def observe_decode_step(self, batch: int, context_tokens: int, seconds: float) -> None:
        self.decode.observe((1.0, batch, context_tokens), seconds)

    def observe_transfer(self, ops: int, nbytes: int, seconds: float) -> None:
        """From a transport TransferStats: ops, bytes, duration_s."""
        self.transfer.observe((1.0, ops, nbytes), seconds)

    def to_profile(self) -> dict:
        return {"name": self.name, "source": self.source, "kv_bytes_per_token": self.kv_bytes_per_token,
                "kv_capacity_tokens": self.kv_capacity_tokens, "layers": self.layers,
                "max_batch_tokens": self.max_batch_tokens, "block_tokens": self.block_tokens,
                "prefill": dict(zip(_PREFILL, self.prefill.coef)), "decode": dict(zip(_DECODE, self.decode.coef)),
                "transfer": _transfer_out(self.transfer.coef)}


@dataclass(frozen=True)
class RoleModels:
    """A scenario's models when its roles run on different hardware: the prefill role's
    (prefill batches, the KV transfers it sends) and the decode role's (decode steps)."""
    prefill: PerfModel
    decode: PerfModel

    def capacity(self, mean_prompt: float, mean_output: float, tpot_s: float, hold_s: float = 0.0) -> Capacity:
        """PerfModel.capacity with each role's rate from its own hardware's model."""
        p = self.prefill.capacity(mean_prompt, mean_output, tpot_s, hold_s=hold_s)
        d = self.decode.capacity(mean_prompt, mean_output, tpot_s, hold_s=hold_s)
        return Capacity(p.prefill_rps, d.decode_rps, d.decode_batch)


_PREFILL = ("intercept_s", "per_token_s", "per_token_sq_s")
_DECODE = ("intercept_s", "per_seq_s", "per_context_token_s")


def _transfer_out(coef: list[float]) -> dict:
    return {"intercept_s": coef[0], "per_op_s": coef[1], "bytes_per_s": 1 / coef[2] if coef[2] > 0 else math.inf}


def _terms(data: dict, section: str, names: tuple[str, ...], where: str) -> list[float]:
    block = data.get(section)
    if not isinstance(block, dict):
        raise ProfileError(f"{where}: missing section '{section}:' with {', '.join(names)}")
    unknown = set(block) - set(names)
    if unknown:
        raise ProfileError(f"{where}: {section}: unknown keys {sorted(unknown)}; expected {', '.join(names)}")
    try:
        values = [float(block.get(n, 0.0)) for n in names]
    except (TypeError, ValueError):
        raise ProfileError(f"{where}: {section}: every term must be a number") from None
    if any(v < 0 for v in values):
        raise ProfileError(f"{where}: {section}: terms must not be negative")
    return values


def from_profile(data: dict, where: str = "profile") -> PerfModel:
    """A profile: name, source (where the figures come from), KV shape and the three models."""
    if not isinstance(data, dict):
        raise ProfileError(f"{where}: expected a mapping")
    for key in ("name", "source", "kv_bytes_per_token", "kv_capacity_tokens", "layers"):
        if key not in data:
            raise ProfileError(f"{where}: missing '{key}'")
    transfer = data.get("transfer")
    if not isinstance(transfer, dict) or not transfer.get("bytes_per_s"):
        raise ProfileError(f"{where}: missing 'transfer:' with bytes_per_s (link rate) and per_op_s")
    t = _terms({"transfer": {k: v for k, v in transfer.items() if k != "bytes_per_s"}}, "transfer",
               ("intercept_s", "per_op_s"), where)
    try:
        extra = {k: int(data[k]) for k in ("max_batch_tokens", "block_tokens") if k in data}
        return PerfModel(str(data["name"]), str(data["source"]),
                         prefill=_terms(data, "prefill", _PREFILL, where),
                         decode=_terms(data, "decode", _DECODE, where),
                         transfer=[t[0], t[1], 1.0 / float(transfer["bytes_per_s"])],
                         kv_bytes_per_token=int(data["kv_bytes_per_token"]),
                         kv_capacity_tokens=int(data["kv_capacity_tokens"]), layers=int(data["layers"]), **extra)
    except (TypeError, ValueError) as e:
        raise ProfileError(f"{where}: {e}") from None


def from_bench(engine_json: dict, mesh_json: dict | None = None, *, kv_bytes_per_token: int,
               kv_capacity_tokens: int, layers: int, where: str = "bench") -> PerfModel:
    """Seeds from `pdmesh bench engine --output json` (prefill 8 x 512 tokens/s, decode
    tokens/s at several batch sizes) and optionally `pdmesh bench mesh --output json`
    (the disaggregated run's KV transfer GB/s)."""
    rows = engine_json.get("rows") if isinstance(engine_json, dict) else None
    if not rows:
        raise ProfileError(f"{where}: not the JSON of `pdmesh bench engine --output json` (no 'rows')")
    prefill_tps, steps = None, []
    for r in rows:
        what = str(r.get("what", ""))
        if what.startswith("prefill"):
            prefill_tps = float(r["pdmesh"])
        elif what.startswith("decode batch "):
            b = int(what.rsplit(" ", 1)[1])
            # bench decode: prompts of 128 tokens, 32 steps; mean context per sequence ~144
            steps.append((b, b * 144, b / float(r["pdmesh"])))
    if prefill_tps is None or len(steps) < 2:
        raise ProfileError(f"{where}: needs the prefill row and at least two decode batch sizes")
    x = np.array([(1.0, b, c) for b, c, _ in steps])
    y = np.array([s for _, _, s in steps])
    decode = [max(0.0, float(v)) for v in np.linalg.lstsq(x, y, rcond=None)[0]]
    rate = 1e9
    if mesh_json:
        gbps = (mesh_json.get("results", {}).get("disaggregated 1P:1D", {}) or {}).get("transfer_gbps_p50")
        if gbps:
            rate = float(gbps) * 1e9
    return PerfModel(f"bench:{engine_json.get('model', '?')}",
                     f"pdmesh bench engine{' + mesh' if mesh_json else ''} on this host ({where})",
                     prefill=[0.0, 1.0 / prefill_tps, 0.0], decode=decode, transfer=[0.0, 0.0, 1.0 / rate],
                     kv_bytes_per_token=kv_bytes_per_token, kv_capacity_tokens=kv_capacity_tokens, layers=layers)


def load_profile(path: str | Path) -> PerfModel:
    import yaml

    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ProfileError(f"cannot read profile {path}: {e.strerror}") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise ProfileError(f"{path}: cannot parse: {e}") from None
    return from_profile(data, str(path))


PROFILES = Path(__file__).with_name("profiles")


def builtin(name: str) -> PerfModel:
    path = PROFILES / f"{name}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in PROFILES.glob("*.yaml"))
        raise ProfileError(f"no built-in profile {name!r}; known: {', '.join(known)}")
    return load_profile(path)
