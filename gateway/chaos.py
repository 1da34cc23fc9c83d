"""`pdmesh bench chaos`: bounded load on a real local mesh while a seeded schedule kills
actors, flips and drains them; then every figure beside its target (gateway.chaos_report).

- The mesh: one scenario (2 prefill + 2 decode actors on a tiny random Llama by default, or
  one scenario of a serve config) behind a real gateway.server.Gateway in this process,
  served from its own thread and loop as `pdmesh serve` runs. Only loopback.
- The load: `concurrency` callers over the real gRPC front end, one request at a time each,
  every request with its own deadline, a short pause after a failure; every `poison_every`-th
  carries a poisoned sampling option (gateway.chaos_plan). Bounded in count (callers) and
  time (--minutes, deadlines).
- The faults: kills are ray.kill of the actor's handle, at the phase the schedule names
  (KILLERS: "now" here; fault-injection points can add phases); flips and drains go through
  the admin API with the admin key, as `pdmesh flip` and `pdmesh drain` do.
- The watcher: every actor's own info, a few times a second. An actor counts as serving only
  when it answers so itself (the pool's cached infos outlive dead actors) and was never killed.
- The end: after the load stops, the bench waits (bounded) until every kill has a serving
  replacement and every live actor holds no KV block, then compares a sample of completed
  greedy requests with a single engine's output.

Exit code 1 when a target is missed, after the figures: the targets are absolute (nothing
lost, leaked or wrong; a replacement within --replace-within-s), so a script or CI job can
use this run as a gate rather than parse the output.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import itertools
import json
import secrets
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import click
import grpc
import ray

from gateway.chaos_plan import FaultKind, LoadMix, LoadRequest, Schedule
from gateway.chaos_report import Applied, Kill, Outcome, Report, Result, Sample, replacement_s
from gateway.config import ServeConfig
from gateway.ops_client import AdminClient, OpsError, Target
from gateway.proto import admin_pb2, inference_pb2, inference_pb2_grpc
from mesh import ActorReport, ActorState, EngineConfig, Member

ROLES = ("prefill", "decode")
# How a kill lands at each phase a schedule may name.
KILLERS: dict[str, Callable[[Member], None]] = {"now": lambda m: ray.kill(m.handle, no_restart=True)}
PROBE_TIMEOUT_S = 2.0
BACKOFF_S = 0.25  # a caller's pause after a failure, as clients back off: fast failures do not flood the figures


@dataclasses.dataclass(frozen=True)
class Options:
    seconds: float
    concurrency: int = 4
    deadline_s: float = 30.0  # each request's own
    fault_every_s: float = 10.0
    poison_every: int = 10
    drain_timeout_s: float = 2.0  # per flip or drain: short, so that drains time out and move requests
    replace_within_s: float = 30.0
    verify: int = 32  # completed greedy requests compared with a single engine
    seed: int = 0


class Chaos:
    """Applies the schedule's faults and watches the scenario's actors, from the bench's loop;
    what reads or changes the pool runs on the gateway's loop, where the pool lives."""

    def __init__(self, gw, loop: asyncio.AbstractEventLoop, scenario: str, admin: AdminClient, options: Options):
        self.pool = gw.fleet.scenarios[scenario].pool
        self.loop, self.admin, self.options = loop, admin, options
        self.start = time.monotonic()
        self.killed: set[str] = set()
        self.serving: dict[str, list[str]] = {r: [] for r in ROLES}  # the latest probe's
        self.held: dict[str, int] = {}  # KV blocks per live actor, the latest probe's
        self.samples: list[Sample] = []
        self.applied: list[Applied] = []
        self.kills: list[Kill] = []

    def now(self) -> float:
        return time.monotonic() - self.start

    async def _there(self, coro):
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self.loop))

    # -- watching ------------------------------------------------------------------------------
    async def probe(self) -> None:
        asked = self.now()  # a probe asked before a kill says nothing about after it
        infos = await self._there(self._infos())
        live = {a: info for a, info in infos.items() if isinstance(info, ActorReport) and a not in self.killed}
        self.held = {a: info.load.used_blocks for a, info in live.items()}
        self.serving = {r: [a for a, info in live.items() if info.state is ActorState.SERVING and info.role == r]
                        for r in ROLES}
        self.samples.append(Sample(asked, {r: len(ids) for r, ids in self.serving.items()}))

    async def _infos(self) -> dict[str, ActorReport | BaseException]:
        """Each member's own info; an exception for a dead or stuck one."""
        members = list(self.pool.members.values())
        infos = await asyncio.gather(*(asyncio.wait_for(m.handle.info.remote(), PROBE_TIMEOUT_S) for m in members),
                                     return_exceptions=True)
        return {m.actor_id: info for m, info in zip(members, infos)}

    async def watch(self, every_s: float = 0.25) -> None:
        while True:
            await self.probe()
            await asyncio.sleep(every_s)

    # -- faults --------------------------------------------------------------------------------
    async def run(self, schedule: Schedule) -> None:
        for fault in schedule.faults:
            await asyncio.sleep(max(0.0, fault.at_s - self.now()))
            role = fault.kind.killed_role
            self.applied.append(await (self._kill(fault, role) if role else self._operate(fault)))

    async def _kill(self, fault, role: str) -> Applied:
        at, candidates = self.now(), list(self.serving[role])
        victim = fault.target(candidates)
        if victim is None:
            return Applied(fault, at, None, False, f"no serving {role} actor to kill")
        self.killed.add(victim)  # from now on it never counts as serving
        await self._there(self._kill_member(victim, fault.phase))
        self.kills.append(Kill(at, role, victim, len(candidates)))
        return Applied(fault, at, victim, True, f"killed ({fault.phase})")

    async def _kill_member(self, actor_id: str, phase: str) -> None:
        KILLERS[phase](self.pool.members[actor_id])

    async def _operate(self, fault) -> Applied:
        """A flip moves an actor of the larger role to the other one; a drain takes one out of
        service, then a flip to its own role puts it back, as an operator's maintenance would."""
        at = self.now()
        role = max(ROLES, key=lambda r: len(self.serving[r]))
        actor = fault.target(self.serving[role])
        if actor is None:
            return Applied(fault, at, None, False, "no serving actor")
        timeout = self.options.drain_timeout_s
        try:
            if fault.kind is FaultKind.FLIP:
                other = next(r for r in ROLES if r != role)
                await self._admin("FlipActor", admin_pb2.FlipActorRequest(actor_id=actor, role=other,
                                                                          drain_timeout_s=timeout))
                return Applied(fault, at, actor, True, f"{role} -> {other}")
            drained = await self._admin("DrainActor", admin_pb2.DrainActorRequest(actor_id=actor, timeout_s=timeout))
            await self._admin("FlipActor", admin_pb2.FlipActorRequest(actor_id=actor, role=role,
                                                                      drain_timeout_s=timeout))
            return Applied(fault, at, actor, True,
                           f"{role} drained ({len(drained.moved_request_ids)} requests moved), serving again")
        except OpsError as e:
            return Applied(fault, at, actor, False, f"{e.status}: {e.message}")

    async def _admin(self, method: str, request):
        return await asyncio.get_running_loop().run_in_executor(None, self.admin.call, method, request)

    # -- the end -------------------------------------------------------------------------------
    def replaced_all(self) -> bool:
        return all(replacement_s(k, self.samples) is not None for k in self.kills)

    async def settle(self, lease_ttl_s: float) -> dict[str, int]:
        """Waits until every kill has a serving replacement (or `replace_within_s` after the
        last kill) and no live actor holds a KV block (or leases have expired, with a margin);
        returns the blocks still held."""
        replace_by = max((k.at_s for k in self.kills), default=0.0) + self.options.replace_within_s
        leak_by = self.now() + lease_ttl_s + 5.0
        while True:
            await self.probe()
            replaced = self.replaced_all() or self.now() > replace_by
            if replaced and (not any(self.held.values()) or self.now() > leak_by):
                return self.held
            await asyncio.sleep(0.5)


# -- load --------------------------------------------------------------------------------------
def _message(r: LoadRequest) -> inference_pb2.GenerateRequest:
    return inference_pb2.GenerateRequest(
        token_ids=inference_pb2.TokenIds(ids=r.prompt), request_id=f"chaos-{r.index}",
        sampling=inference_pb2.SamplingOptions(max_tokens=r.max_tokens, **r.sampling))


def _send(stub, r: LoadRequest, deadline_s: float, since: float) -> tuple[Outcome, list[int]]:
    """One request, in a caller's thread: its outcome and the tokens it got."""
    sent, tokens, finish = time.monotonic() - since, [], ""
    try:
        for reply in stub.Generate(_message(r), timeout=deadline_s):
            tokens.extend(reply.token_ids)
            finish = reply.finish_reason or finish
    except grpc.RpcError as e:
        code = e.code()
        result = Result.LOST if code is grpc.StatusCode.DEADLINE_EXCEEDED else Result.FAILED
        return Outcome(r.index, r.poison, result, code.name, sent, time.monotonic() - since,
                       (e.details() or "")[:200]), tokens
    exact = bool(finish) and len(tokens) == r.max_tokens
    detail = "" if exact else f"{len(tokens)} of {r.max_tokens} tokens, finish_reason {finish!r}"
    return Outcome(r.index, r.poison, Result.COMPLETED if exact else Result.CORRUPT, "OK", sent,
                   time.monotonic() - since, detail), tokens


async def load(address: str, mix: LoadMix, options: Options, since: float) -> list[tuple[Outcome, list[int]]]:
    """`concurrency` callers, each sending its next request when the last one ended, until
    `seconds` after `since`; every request ends by its deadline."""
    results, numbers = [], itertools.count()
    loop = asyncio.get_running_loop()
    with grpc.insecure_channel(address) as channel, \
            concurrent.futures.ThreadPoolExecutor(options.concurrency) as callers:
        stub = inference_pb2_grpc.InferenceStub(channel)

        async def caller():
            while time.monotonic() - since < options.seconds:
                request = mix.request(next(numbers))
                outcome, tokens = await loop.run_in_executor(callers, _send, stub, request, options.deadline_s, since)
                results.append((outcome, tokens))
                if outcome.result is Result.FAILED:
                    await asyncio.sleep(BACKOFF_S)

        await asyncio.gather(*(caller() for _ in range(options.concurrency)))
    return results


def verify(results: list[tuple[Outcome, list[int]]], mix: LoadMix, engine: EngineConfig,
           n: int) -> tuple[list[Outcome], int]:
    """The first `n` completed greedy requests against a single engine's greedy run: those that
    differ become corrupt. Returns every outcome and how many were compared."""
    from mesh import Engine, SamplingParams

    checked = [(o, tokens) for o, tokens in results
               if o.result is Result.COMPLETED and mix.request(o.index).greedy][:n]
    if not checked:
        return [o for o, _ in results], 0
    requests = [mix.request(o.index) for o, _ in checked]
    reference = Engine(engine).generate(
        [list(r.prompt) for r in requests],
        [SamplingParams(max_tokens=r.max_tokens, **r.sampling) for r in requests])
    wrong = {o.index for (o, tokens), ref in zip(checked, reference) if tokens != ref.token_ids}
    outcomes = [dataclasses.replace(o, result=Result.CORRUPT, detail="differs from a single engine's greedy tokens")
                if o.index in wrong else o for o, _ in results]
    return outcomes, len(checked)


# -- one run -----------------------------------------------------------------------------------
async def _chaos(gw, loop, scenario: str, admin_key: str, options: Options) -> Report:
    s = gw.fleet.scenarios[scenario]
    mix = LoadMix(options.seed, s.tokenizer.vocab_size, poison_every=options.poison_every)
    schedule = Schedule.random(options.seed, options.seconds, options.fault_every_s, tuple(KILLERS))
    with AdminClient(Target(gw.addresses["grpc"], admin_key, timeout_s=4 * options.drain_timeout_s + 60)) as admin:
        chaos = Chaos(gw, loop, scenario, admin, options)
        await chaos.probe()
        watcher = asyncio.create_task(chaos.watch())
        faults = asyncio.create_task(chaos.run(schedule))
        try:
            results = await load(gw.addresses["grpc"], mix, options, chaos.start)
            await faults  # each is bounded by the admin calls' timeout
            leaked = await chaos.settle(s.pool.spec.transport.lease_ttl_s)
        finally:
            watcher.cancel()
            faults.cancel()
    engine = s.pool.spec.engine.model_copy(update={"device": s.pool.spec.hardware["decode"].device})
    outcomes, verified = await asyncio.to_thread(verify, results, mix, engine, options.verify)
    return Report.build(outcomes, chaos.applied, chaos.kills, chaos.samples, leaked, verified,
                        options.replace_within_s)


def run(config: ServeConfig, scenario: str, options: Options, address: str | None = None) -> Report:
    from gateway.auth import Keys
    from gateway.bench import served
    from gateway.server import Gateway, Listen
    from mesh import connect, disconnect

    admin_key = secrets.token_hex(16)
    ours = not ray.is_initialized()  # a Ray this process already joined outlives the run
    connect(address, num_cpus=None if address else 16)  # logical CPUs: tiny actors mostly wait
    try:
        gw = Gateway(config, Keys(admin=(admin_key,)), Listen(grpc_port=0, http_port=0), refresh_s=0.5)
        with served(gw) as loop:
            return asyncio.run(_chaos(gw, loop, scenario, admin_key, options))
    finally:
        if ours:
            disconnect()


@contextmanager
def _config(config_path: str | None, model: str | None, prefill: int, decode: int) -> Iterator[ServeConfig]:
    """The serve config to break: the file's, or one scenario on `model` (default: a tiny random
    Llama made for this run)."""
    from gateway import config as serve_config

    if config_path:
        yield serve_config.load(config_path)
        return
    from gateway.config import Control
    from mesh import init_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        folder = model or init_checkpoint(Path(tmp) / "tiny", "llama", "tiny", "float32")
        cfg = serve_config.default(folder, mode="disaggregated",
                                   engine={"dtype": "float32", "threads": 1, "num_blocks": 512},
                                   transport={"lease_ttl_s": 10.0, "timeout_s": 5.0},
                                   controller=Control(enabled=False))  # the schedule alone flips
        spec = cfg.scenarios[0].model_copy(update={"name": "chaos", "prefill": prefill, "decode": decode})
        yield cfg.model_copy(update={"scenarios": (spec,)})


@click.command("chaos")
@click.option("--minutes", type=click.FloatRange(min=0, min_open=True), default=3.0, show_default=True,
              help="how long the load runs (the settling after it is bounded too)")
@click.option("--config", "config_path", type=click.Path(dir_okay=False, exists=True), default=None,
              help="serve config YAML; default: one scenario of --prefill + --decode actors on --model")
@click.option("--scenario", default=None, help="with --config: the scenario to load and break; default: the first")
@click.option("--model", type=click.Path(file_okay=False, exists=True), default=None,
              help="checkpoint folder; default: a tiny random Llama")
@click.option("--prefill", type=click.IntRange(min=1), default=2, show_default=True)
@click.option("--decode", type=click.IntRange(min=1), default=2, show_default=True)
@click.option("--concurrency", type=click.IntRange(min=1), default=4, show_default=True)
@click.option("--deadline-s", type=click.FloatRange(min=0, min_open=True), default=30.0, show_default=True,
              help="each request's deadline: no answer by then counts as lost")
@click.option("--fault-every-s", type=click.FloatRange(min=0, min_open=True), default=10.0, show_default=True,
              help="one fault per slot of this length (kill prefill or decode, flip, drain)")
@click.option("--poison-every", type=click.IntRange(min=0), default=10, show_default=True,
              help="every n-th request carries a poisoned sampling option; 0: none")
@click.option("--drain-timeout-s", type=click.FloatRange(min=0, min_open=True), default=2.0, show_default=True)
@click.option("--replace-within-s", type=click.FloatRange(min=0, min_open=True), default=30.0, show_default=True,
              help="target: time from a kill to a serving replacement")
@click.option("--verify", type=click.IntRange(min=0), default=32, show_default=True,
              help="completed greedy requests compared with a single engine")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--address", default=None, help="Ray cluster to join; default: an embedded local Ray")
@click.option("--output", type=click.Choice(["table", "json"]), default="table", show_default=True)
@click.pass_context
def command(ctx, minutes, config_path, scenario, model, prefill, decode, concurrency, deadline_s, fault_every_s,
            poison_every, drain_timeout_s, replace_within_s, verify, seed, address, output):
    """Load on a real mesh while actors are killed, flipped and drained: lost, failed, leaked, replaced.
    Exits 1 when a target is missed."""
    from scenarios.spec import SpecError

    options = Options(minutes * 60, concurrency, deadline_s, fault_every_s, poison_every, drain_timeout_s,
                      replace_within_s, verify, seed)
    try:
        with _config(config_path, model, prefill, decode) as cfg:
            names = [s.name for s in cfg.scenarios]
            if scenario and scenario not in names:
                raise click.BadParameter(f"{scenario!r} is not in the config; it has: {', '.join(names)}",
                                         param_hint="--scenario")
            report = run(cfg, scenario or names[0], options, address)
    except SpecError as e:
        raise click.ClickException(str(e)) from None
    if output == "json":
        click.echo(json.dumps({"seed": seed, "minutes": minutes, "concurrency": concurrency,
                               "deadline_s": deadline_s, **report.to_dict()}))
    else:
        _table(report, minutes, concurrency)
    missed = [t.name for t in report.targets() if not t.met]
    if missed:
        click.echo(f"pdmesh bench chaos: targets missed: {', '.join(missed)}", err=True)
        ctx.exit(1)


def _table(report: Report, minutes: float, concurrency: int) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    figures = Table(title=f"pdmesh bench chaos: {minutes:g} min, {concurrency} callers, "
                          f"{len(report.faults)} faults, {report.poison_sent} poisoned requests")
    for col in ("figure", "value", "target", "met"):
        figures.add_column(col, justify="left" if col == "figure" else "right")
    figures.add_row("requests sent", str(report.sent), "", "")
    figures.add_row("completed with all their tokens", str(report.completed), "", "")
    figures.add_row("  of them compared with a single engine", str(report.verified_greedy), "", "")
    figures.add_row("failed, by status", _by_status(report.failed, report.failed_by_status), "", "")
    figures.add_row("  innocent ones not completed", _by_status(sum(report.innocent_failed_by_status.values()),
                                                                 report.innocent_failed_by_status), "", "")
    figures.add_row("poisoned, answered", _by_status(report.poison_sent, report.poison_by_status), "", "")
    figures.add_row("kills replaced", f"{len(report.replaced)} of {len(report.replacement_s)}", "", "")
    for t in report.targets():
        figures.add_row(t.name, t.figure, t.goal, "yes" if t.met else "NO")
    console.print(figures)
    faults = Table(title="faults applied")
    for col in ("at s", "fault", "actor", "done", "detail"):
        faults.add_column(col)
    for a in report.faults:
        faults.add_row(f"{a.at_s:.1f}", a.fault.kind.value, a.actor_id or "-", "yes" if a.ok else "no", a.detail)
    console.print(faults)


def _by_status(total: int, by_status: dict[str, int]) -> str:
    return f"{total}" + (f" ({', '.join(f'{k} {v}' for k, v in by_status.items())})" if by_status else "")
