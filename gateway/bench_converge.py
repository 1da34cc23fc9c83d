"""`pdmesh bench converge`: how long the live ratio controller takes to recover from a
deliberately bad split, on a real local mesh (issue 20: "time from a deliberately bad split to
within 10% of the best goodput", the live side of `pdmesh sim --converge`).

- The mesh: one disaggregated scenario of `actors` actors (a tiny random Llama by default)
  behind a real gateway.server.Gateway in this process, served from its own thread and loop as
  `pdmesh serve` runs, its control loop (gateway.control) running the real ratio controller
  with a short interval and dwell time. Only loopback.
- The load: the same seeded open-loop arrivals (gateway.bench_serve_workload, `random`: one
  prompt and output length, Poisson gaps) sent twice over the OpenAI HTTP API by `pdmesh bench
  serve`'s sender, each request with its timeout; bounded in count (rate x seconds) and time.
- The two runs, one after the other, each on a fresh mesh and controller: the reference starts
  at the split the controller's own model gives the load (`RatioController.initial_split` on
  the uncalibrated profile), the bad start at that split with prefill and decode swapped (as
  simtests.converge.swapped does).
- The measure: goodput per window (requests answered within the scenario's TTFT and TPOT
  targets, per second, by answer time), and the first window from which the bad start's
  goodput stays within the tolerance of the reference's in every later window
  (simtests.converge.converged_window, the simulator's measure); with the controller's
  moves from its decision log (what `pdmesh decisions` shows) and each run's split at its end.
"""
from __future__ import annotations

import asyncio
import json
import logging
import math
import tempfile
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import click
import numpy as np

from gateway import bench_serve_load as sender
from gateway.bench_serve_report import Slo
from gateway.config import ServeConfig
from simtests.converge import converged_window, per_window

SCENARIO = "converge"
# requests each actor has KV blocks for (the run's, up to this): a decode lease is taken before
# prefill, so that with few blocks a queue for prefill is refused for want of decode KV, not served late
IN_FLIGHT = 128
BLOCK_TOKENS = 16
progress = logging.getLogger("pdmesh.bench")  # phases, shown by `pdmesh bench` (gateway.progress)


@dataclass(frozen=True)
class Load:
    """The arrivals both runs get: one prompt and output length, Poisson at `rate` for `seconds`."""
    prompt_tokens: int = 1500
    # a few: a random model's token can be a special one, with no text for the client to time
    output_tokens: int = 8
    rate: float = 4.0  # requests/s
    seconds: float = 120.0
    seed: int = 0

    @property
    def requests(self) -> int:
        return max(1, round(self.rate * self.seconds))


@dataclass(frozen=True)
class Options:
    actors: int = 4
    window_s: float = 10.0
    tolerance: float = 0.1
    ttft_s: float = 0.5
    tpot_s: float = 0.2
    interval_s: float = 1.0  # the controller's (Settings.interval_s)
    dwell_s: float = 2.0  # Settings.min_dwell_s
    confirm: int = 2  # Settings.confirm
    request_timeout_s: float = 60.0


@dataclass(frozen=True)
class Move:
    """One ratio decision of the controller, from its decision log."""
    at_s: float  # from the start of the run's load
    before: tuple[int, int]  # prefill, decode
    after: tuple[int, int]
    flips: int
    failures: tuple[str, ...]
    reason: str


@dataclass(frozen=True)
class Phase:
    """One run: where it started and ended, what its requests did, per window and in all."""
    name: str
    start: tuple[int, int]
    end: tuple[int, int]  # the controller's view at the end (actors draining count in their new role)
    goodput: tuple[float, ...]  # requests/s within both SLOs, per window, by answer time
    sent: int
    completed: int
    within_slo: int
    failed_by_status: dict[str, int]
    moves: tuple[Move, ...]

    @property
    def flips(self) -> int:
        return sum(m.flips for m in self.moves)

    @property
    def mean_goodput(self) -> float:
        return float(np.mean(self.goodput)) if self.goodput else 0.0


@dataclass(frozen=True)
class Report:
    load: Load
    options: Options
    reference: Phase
    bad: Phase
    converged_s: float | None  # None: not within the tolerance by the last window

    def to_dict(self) -> dict:
        phase = lambda p: {**asdict(p), "flips": p.flips, "mean_goodput": p.mean_goodput}  # noqa: E731
        return {"load": asdict(self.load), **asdict(self.options), "reference": phase(self.reference),
                "bad": phase(self.bad), "converged_s": self.converged_s}


# -- the mesh ----------------------------------------------------------------------------------
def serve_config(model: str, split: tuple[int, int], load: Load, options: Options) -> ServeConfig:
    """One disaggregated scenario at `split`, every actor on one CPU with one thread, the
    controller on with the short interval and dwell of `options`."""
    from gateway.config import parse

    cpu = {"accelerator": "cpu", "num_cpus": 1}
    role_limits = {"min": 1, "max": options.actors - 1}
    return parse({
        "scenarios": [{"name": SCENARIO, "model": model, "slo": {"ttft_s": options.ttft_s, "tpot_s": options.tpot_s},
                       "prefill": split[0], "decode": split[1],
                       "limits": {"prefill": role_limits, "decode": role_limits},
                       "hardware": {"prefill": cpu, "decode": cpu}}],
        "engine": {"dtype": "float32", "block_size": BLOCK_TOKENS, "threads": 1,
                   "num_blocks": min(load.requests, IN_FLIGHT) * math.ceil(
                       (load.prompt_tokens + load.output_tokens) / BLOCK_TOKENS),
                   "max_model_len": load.prompt_tokens + load.output_tokens + 16},
        "transport": {"lease_ttl_s": 10.0, "timeout_s": 20.0},
        # a request waits for a prefill actor as long as it may run: a bad split queues, it does not refuse
        "gateway": {"admission_timeout_s": options.request_timeout_s, "request_timeout_s": options.request_timeout_s},
        "controller": {"enabled": True, "settings": {"interval_s": options.interval_s,
                                                     "min_dwell_s": options.dwell_s, "confirm": options.confirm}},
    }, "bench converge")


def best_split(config: ServeConfig, load: Load) -> tuple[int, int]:
    """The split the controller's own (uncalibrated) model gives the load, where a fleet
    provisioned for it starts."""
    from scenarios.controller import Observation, RatioController

    spec = config.scenarios[0]
    controller = RatioController([spec], {spec.name: config.controller.perf_model()}, config.controller.settings)
    expected = Observation(spec.name, load.rate, load.prompt_tokens, load.output_tokens, None, None, ())
    return controller.initial_split([expected])[spec.name]


def starts(model: str, load: Load, options: Options) -> tuple[ServeConfig, ServeConfig]:
    """The reference (the best split) and the bad start (it swapped); ValueError when the
    best split is even, which swapped is no worse."""
    half = options.actors // 2  # any split of the actors: the model re-splits them
    split = best_split(serve_config(model, (half, options.actors - half), load, options), load)
    if split[0] == split[1]:
        raise ValueError(f"the model gives this load an even split ({_split(split)}), which swapped is no worse: "
                         "make one role busier (longer prompts, or longer outputs)")
    return serve_config(model, split, load, options), serve_config(model, split[::-1], load, options)


# -- one run -----------------------------------------------------------------------------------
def _moves(gw, since: float) -> tuple[Move, ...]:
    from scenarios.controller import Decision

    return tuple(Move(r.decision.time - since, r.decision.current, r.decision.target,
                      sum(a.kind == "flip" for a in r.decision.actions), r.failures, r.decision.reason)
                 for r in gw.control.decisions(SCENARIO, limit=10_000) if isinstance(r.decision, Decision))


async def _ended(gw) -> tuple[int, int]:
    """The split by the role each actor serves or drains toward (read on the gateway's loop)."""
    return gw.control.states()[0].current


def _phase(name: str, gw, loop, planned, load: Load, options: Options) -> Phase:
    spec = gw.config.scenarios[0]
    target = sender.Target(gw.addresses["http"], gw.config.served_name(spec),
                           request_timeout_s=options.request_timeout_s, ignore_eos=True)
    progress.info(f"{name}: {len(planned)} requests from {spec.prefill}P:{spec.decode}D")
    since = time.time()
    result = asyncio.run(sender.run(target, planned, duration_s=load.seconds))
    slo = Slo(options.ttft_s, options.tpot_s)
    good = [o for o in result.outcomes if slo.met(o)]
    series = per_window(np.array([o.sent_s + o.e2e_s for o in good]), options.window_s, load.seconds)
    failed = Counter(o.status for o in result.outcomes if not o.completed)
    end = asyncio.run_coroutine_threadsafe(_ended(gw), loop).result(30)
    return Phase(name, (spec.prefill, spec.decode), end, tuple(map(float, series)), len(result.outcomes),
                 sum(o.completed for o in result.outcomes), len(good), dict(failed), _moves(gw, since))


def run_phase(name: str, config: ServeConfig, planned, load: Load, options: Options) -> Phase:
    """A fresh gateway, its actors and its controller on `config`, loaded with `planned`."""
    from gateway.auth import Keys
    from gateway.bench import served
    from gateway.server import Gateway, Listen

    progress.info(f"{name}: starting the gateway and its actors")
    gw = Gateway(config, Keys(), Listen(grpc_port=0, http_port=0), refresh_s=0.5)
    with served(gw) as loop:
        return _phase(name, gw, loop, planned, load, options)


def run(model: str, load: Load, options: Options, address: str | None = None) -> Report:
    import ray

    from gateway.bench_serve_workload import Shape, build
    from mesh import Tokenizer, connect, disconnect

    reference, bad = starts(model, load, options)
    shape = Shape(num_prompts=load.requests, random_input_len=load.prompt_tokens,
                  random_output_len=load.output_tokens, request_rate=load.rate, seed=load.seed)
    planned = build(shape, Tokenizer(model))
    ours = not ray.is_initialized()  # a Ray this process already joined outlives the run
    connect(address, num_cpus=None if address else 16)  # logical CPUs: tiny actors mostly wait
    try:
        ref = run_phase("reference", reference, planned, load, options)
        worse = run_phase("bad start", bad, planned, load, options)
    finally:
        if ours:
            disconnect()
    first = converged_window(np.array(ref.goodput), np.array(worse.goodput), options.tolerance)
    return Report(load, options, ref, worse, None if first is None else first * options.window_s)


@contextmanager
def _model(model: str | None) -> Iterator[str]:
    """The checkpoint folder: --model's, or a tiny random Llama made for this run."""
    if model:
        yield model
        return
    from mesh import init_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        yield str(init_checkpoint(Path(tmp) / "tiny", "llama", "tiny", "float32"))


# -- the command -------------------------------------------------------------------------------
@click.command("converge")
@click.option("--model", type=click.Path(file_okay=False, exists=True), default=None,
              help="checkpoint folder; default: a tiny random Llama")
@click.option("--actors", type=click.IntRange(min=3), default=4, show_default=True,
              help="in the one scenario (each role keeps at least one)")
@click.option("--prompt-tokens", type=click.IntRange(min=1), default=Load.prompt_tokens, show_default=True)
@click.option("--output-tokens", type=click.IntRange(min=2), default=Load.output_tokens, show_default=True)
@click.option("--rate", type=click.FloatRange(min=0, min_open=True), default=Load.rate, show_default=True,
              help="arrivals/s (Poisson), the same in both runs")
@click.option("--seconds", type=click.FloatRange(min=0, min_open=True), default=Load.seconds, show_default=True,
              help="of load per run (two runs, each on a fresh mesh)")
@click.option("--window", type=click.FloatRange(min=0, min_open=True), default=Options.window_s,
              show_default=True, help="goodput window, s")
@click.option("--tolerance", type=click.FloatRange(0, 1, max_open=True), default=Options.tolerance,
              show_default=True, help="converged: the bad start's goodput at least (1 - this) x the reference's")
@click.option("--ttft-s", type=click.FloatRange(min=0, min_open=True), default=Options.ttft_s, show_default=True)
@click.option("--tpot-s", type=click.FloatRange(min=0, min_open=True), default=Options.tpot_s, show_default=True)
@click.option("--interval-s", type=click.FloatRange(min=0, min_open=True), default=Options.interval_s,
              show_default=True, help="the controller's interval")
@click.option("--dwell-s", type=click.FloatRange(min=0), default=Options.dwell_s, show_default=True,
              help="the controller's minimum time between moves")
@click.option("--confirm", type=click.IntRange(min=1), default=Options.confirm, show_default=True,
              help="intervals that must ask for the same move")
@click.option("--request-timeout", type=click.FloatRange(min=0, min_open=True), default=Options.request_timeout_s,
              show_default=True, help="seconds one request may take (and wait for a prefill actor)")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--address", default=None, help="Ray cluster to join; default: an embedded local Ray")
@click.option("--output", type=click.Choice(["table", "json"]), default="table", show_default=True)
def command(model, actors, prompt_tokens, output_tokens, rate, seconds, window, tolerance, ttft_s, tpot_s,
            interval_s, dwell_s, confirm, request_timeout, seed, address, output):
    """Time from a deliberately bad split (the best one swapped) to within --tolerance of the best
    split's goodput, with the live controller on, on a real local mesh."""
    from scenarios.spec import SpecError

    if window > seconds:
        raise click.BadParameter(f"{window:g} s is longer than the run ({seconds:g} s): no whole window",
                                 param_hint="--window")
    load = Load(prompt_tokens, output_tokens, rate, seconds, seed)
    options = Options(actors, window, tolerance, ttft_s, tpot_s, interval_s, dwell_s, confirm, request_timeout)
    try:
        with _model(model) as folder:
            report = run(folder, load, options, address)
    except (SpecError, ValueError) as e:
        raise click.ClickException(str(e)) from None
    if output == "json":
        click.echo(json.dumps(report.to_dict()))
    else:
        _table(report)


def _split(s: tuple[int, int]) -> str:
    return f"{s[0]}P:{s[1]}D"


def _table(report: Report) -> None:
    from rich.console import Console
    from rich.table import Table

    load, o = report.load, report.options
    console = Console()
    converged = "not within" if report.converged_s is None else f"{report.converged_s:g} s"
    runs = Table(title=f"pdmesh bench converge: {load.requests} requests ({load.prompt_tokens} in / "
                       f"{load.output_tokens} out, {load.rate:g}/s for {load.seconds:g} s) per run, {o.actors} "
                       f"actors; within {o.tolerance:.0%} of the reference after: {converged}")
    for col in ("run", "start", "end", "flips", "sent", "completed", "within SLOs", "goodput/s", "failed"):
        runs.add_column(col, justify="left" if col == "run" else "right")
    for p in (report.reference, report.bad):
        runs.add_row(p.name, _split(p.start), _split(p.end), str(p.flips), str(p.sent), str(p.completed),
                     str(p.within_slo), f"{p.mean_goodput:.3g}",
                     ", ".join(f"{k} {v}" for k, v in p.failed_by_status.items()) or "0")
    console.print(runs)
    windows = Table(title=f"goodput per {o.window_s:g} s window (requests/s within TTFT {o.ttft_s:g} s, "
                          f"TPOT {o.tpot_s:g} s)")
    for col in ("from s", "reference", "bad start", "bad / reference"):
        windows.add_column(col, justify="right")
    for i, (r, b) in enumerate(zip(report.reference.goodput, report.bad.goodput)):
        windows.add_row(f"{i * o.window_s:g}", f"{r:.3g}", f"{b:.3g}", f"{b / r:.2f}" if r else "-")
    console.print(windows)
    moves = Table(title="the controller's moves from the bad start")
    for col in ("at s", "before", "after", "flips", "reason"):
        moves.add_column(col)
    for m in report.bad.moves:
        moves.add_row(f"{m.at_s:.1f}", _split(m.before), _split(m.after), str(m.flips),
                      m.reason + (f" (failed: {'; '.join(m.failures)})" if m.failures else ""))
    console.print(moves)
