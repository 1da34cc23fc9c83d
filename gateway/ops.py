"""The ops CLI: `pdmesh status`, `ratio show|set|auto`, `controller on|off`, `flip`, `drain`,
`add`, `remove`, `decisions`, each a call to the gateway's admin API (pdmesh.v1.Admin).

Every command prints `rich` tables, or with `--output json` one JSON object on stdout for
scripts. `flip`, `drain`, `remove` and `add` keep each role within its scenario's limits and
on its hardware; `--force` overrides that, and the override is printed as a warning on stderr
(and logged by the gateway). Failures print one line on stderr (and `{"error": ...}` with --output json) and
exit with a code scripts can tell apart: 1 the gateway could not do it, 2 bad input (also
click's usage errors), 3 admin key refused, 4 gateway unreachable.
"""
from __future__ import annotations

import functools
import json
import sys
from datetime import datetime

import click
from google.protobuf.json_format import MessageToDict

from gateway.ops_client import BAD_INPUT, AdminClient, OpsError, Target
from gateway.proto import admin_pb2 as pb

ROLES = ("prefill", "decode")


class Session:
    """One command's gateway and output mode."""

    def __init__(self, target: Target, output: str):
        self.target, self.output = target, output

    def client(self) -> AdminClient:
        return AdminClient(self.target, self.warn)

    @staticmethod
    def warn(warning: str) -> None:
        click.echo(f"pdmesh: warning: {warning}", err=True)

    def call(self, method: str, request):
        """One admin call on a channel of its own."""
        with self.client() as c:
            return c.call(method, request)

    def show(self, data: dict, render) -> None:
        """data as JSON, or render(console, data) as tables."""
        if self.output == "json":
            click.echo(json.dumps(data, indent=2))
        else:
            from rich.console import Console

            render(Console(), data)

    def fail(self, e: OpsError) -> None:
        if self.output == "json":
            click.echo(json.dumps({"error": {"message": e.message, "status": e.status, "exit_code": e.exit_code}}))
        click.echo(f"pdmesh: error: {e.message}", err=True)
        sys.exit(e.exit_code)


def _key(admin_key: str | None, admin_key_file: str | None) -> str | None:
    if admin_key_file:
        lines = [line.strip() for line in open(admin_key_file).read().splitlines() if line.strip()]
        return lines[0] if lines else None
    return admin_key


def ops_command(f):
    """Adds the options every ops command takes; the command gets a Session first."""
    @click.option("--address", envvar="PDMESH_ADDRESS", default="127.0.0.1:50051", show_default=True,
                  help="the gateway's gRPC address (also PDMESH_ADDRESS)")
    @click.option("--admin-key", envvar="PDMESH_ADMIN_KEY", default=None, show_envvar=True,
                  help="the gateway's admin key")
    @click.option("--admin-key-file", envvar="PDMESH_ADMIN_KEY_FILE", default=None,
                  type=click.Path(dir_okay=False, exists=True), help="a file whose first line is the admin key")
    @click.option("--tls", is_flag=True, help="TLS, trusting the system's roots")
    @click.option("--tls-ca", type=click.Path(dir_okay=False, exists=True), default=None,
                  help="TLS, trusting this CA certificate (PEM)")
    @click.option("--timeout", "timeout_s", type=click.FloatRange(min=0, min_open=True), default=120.0,
                  show_default=True, help="seconds per call (flips and drains wait for in-flight requests)")
    @click.option("--output", type=click.Choice(["table", "json"]), default="table", show_default=True)
    @functools.wraps(f)
    def wrapper(address, admin_key, admin_key_file, tls, tls_ca, timeout_s, output, **kwargs):
        session = Session(Target(address, _key(admin_key, admin_key_file), tls_ca, tls, timeout_s), output)
        try:
            f(session, **kwargs)
        except OpsError as e:
            session.fail(e)
    return wrapper


def _dict(message) -> dict:
    return MessageToDict(message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


def _pick(scenarios: list[dict], name: str | None) -> list[dict]:
    if not name:
        return scenarios
    found = [s for s in scenarios if s["scenario"] == name]
    if not found:
        raise OpsError(f"unknown scenario {name!r}; the gateway serves: "
                       f"{', '.join(s['scenario'] for s in scenarios)}", BAD_INPUT, "NOT_FOUND")
    return found


def parse_ratio(text: str) -> tuple[int, int]:
    try:
        p, d = (int(x) for x in text.split(":"))
    except ValueError:
        raise click.BadParameter(f"{text!r}: expected PREFILL:DECODE counts, like 3:1") from None
    if p < 0 or d < 0:
        raise click.BadParameter(f"{text!r}: counts must not be negative")
    return p, d


# -- tables ------------------------------------------------------------------------------------
def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def _control_table(title: str, scenarios: list[dict]):
    from rich.table import Table

    t = Table(title=title)
    for col in ("scenario", "P:D now", "target", "controller", "prefill limits", "decode limits",
                "arrivals/s", "prompt", "output", "TTFT met", "TPOT met", "model error P/D"):
        t.add_column(col, justify="right" if col[0].islower() and col not in ("scenario", "controller") else "left")
    for s in scenarios:
        o = s["observed"]
        mode = ("pinned" if s["pinned"] else "auto") + ("" if s["enabled"] else ", off")
        limits = {r: f"[{s[r + '_limits']['min']}, {s[r + '_limits']['max']}]" for r in ROLES}
        t.add_row(s["scenario"], f"{s['prefill']}:{s['decode']}", f"{s['target_prefill']}:{s['target_decode']}",
                  mode, limits["prefill"], limits["decode"], f"{o['arrival_rps']:.2f}",
                  f"{o['mean_prompt_tokens']:.0f}", f"{o['mean_output_tokens']:.0f}",
                  f"{_pct(o.get('ttft_attainment'))} (<= {o['ttft_target_s']:g} s)",
                  f"{_pct(o.get('tpot_attainment'))} (<= {o['tpot_target_s']:g} s)",
                  f"{_pct(s.get('prefill_model_error'))}/{_pct(s.get('decode_model_error'))}")
    return t


def _actor_table(pools: list[dict]):
    from rich.table import Table

    t = Table(title="actors")
    for col in ("actor", "scenario", "role", "state", "device", "node", "pid", "queued", "running", "KV blocks used"):
        t.add_column(col)
    for pool in pools:
        for a in pool["actors"]:
            load = a["load"]
            t.add_row(a["actor_id"], pool["scenario"], a["role"], a["state"], a["device"], a["node"], str(a["pid"]),
                      str(load["queued_requests"]), str(load["active_requests"]),
                      f"{load['num_blocks'] - load['free_blocks']}/{load['num_blocks']}")
    return t


def _drain_timeout(what: str):
    return click.option("--drain-timeout-s", type=click.FloatRange(min=0), default=0.0,
                        help=f"how long in-flight requests may take; {what} (0: the actor's default)")


_force = click.option("--force", is_flag=True,
                      help="even past the scenario's role limits or the role's hardware (prints a warning)")


def _actor_line(console, a: dict) -> None:
    console.print(f"{a['actor_id']} ({a['scenario']}): {a['role']}, {a['state']} on {a['device']} "
                  f"pid {a['pid']}")


# -- commands ----------------------------------------------------------------------------------
@click.command("status")
@click.argument("scenario", required=False)
@ops_command
def status(session: Session, scenario: str | None) -> None:
    """Scenarios (P:D, controller, load, SLO attainment) and every actor."""
    with session.client() as c:
        control = _pick(_dict(c.call("GetController", pb.GetControllerRequest()))["scenarios"], scenario)
        pools = _dict(c.call("ListPools", pb.ListPoolsRequest(scenario=scenario or "")))["pools"]

    def render(console, data):
        console.print(_control_table("scenarios", data["scenarios"]))
        console.print(_actor_table(data["pools"]))
    session.show({"scenarios": control, "pools": pools}, render)


@click.group("ratio")
def ratio() -> None:
    """Each scenario's prefill:decode ratio: show it, pin it, or hand it to the controller."""


def _show_control(session: Session, reply: pb.ControllerStatus, scenario: str | None) -> None:
    data = {"interval_s": reply.interval_s, "scenarios": _pick(_dict(reply)["scenarios"], scenario)}
    session.show(data, lambda console, d: console.print(_control_table("prefill:decode", d["scenarios"])))


@ratio.command("show")
@click.argument("scenario", required=False)
@ops_command
def ratio_show(session: Session, scenario: str | None) -> None:
    """The ratio of every scenario (or one): now, the target, the limits."""
    _show_control(session, session.call("GetController", pb.GetControllerRequest()), scenario)


@ratio.command("set")
@click.argument("scenario")
@click.argument("counts", metavar="P:D", callback=lambda ctx, param, v: parse_ratio(v))
@ops_command
def ratio_set(session: Session, scenario: str, counts: tuple[int, int]) -> None:
    """Pin SCENARIO at P:D (counts within its limits; scaled to its actors when they differ).
    The controller flips actors to it, one step per interval, whether or not it is on."""
    reply = session.call("SetRatio", pb.SetRatioRequest(scenario=scenario, prefill=counts[0], decode=counts[1]))
    _show_control(session, reply, scenario)


@ratio.command("auto")
@click.argument("scenario")
@ops_command
def ratio_auto(session: Session, scenario: str) -> None:
    """Drop SCENARIO's pin and turn the controller on for it: the load sets the ratio."""
    reply = session.call("SetRatio", pb.SetRatioRequest(scenario=scenario, auto=True))
    _show_control(session, reply, scenario)


@click.command("controller")
@click.argument("state", type=click.Choice(["on", "off"]))
@click.argument("scenario", required=False)
@ops_command
def controller(session: Session, state: str, scenario: str | None) -> None:
    """Turn the ratio controller on or off, for SCENARIO or every scenario (pins still hold)."""
    reply = session.call("SetController", pb.SetControllerRequest(scenario=scenario or "", enabled=state == "on"))
    _show_control(session, reply, scenario)


@click.command("flip")
@click.argument("actor")
@click.argument("role", type=click.Choice(ROLES))
@_drain_timeout("then they move to other actors")
@_force
@ops_command
def flip(session: Session, actor: str, role: str, drain_timeout_s: float, force: bool) -> None:
    """Drain ACTOR, switch it to ROLE in place (same weights) and serve again."""
    reply = session.call("FlipActor", pb.FlipActorRequest(actor_id=actor, role=role, drain_timeout_s=drain_timeout_s,
                                                          force=force))
    session.show(_dict(reply), _actor_line)


@click.command("drain")
@click.argument("actor")
@_drain_timeout("then what is left moves to other actors")
@_force
@ops_command
def drain(session: Session, actor: str, drain_timeout_s: float, force: bool) -> None:
    """ACTOR takes no new work and finishes what it has (`pdmesh flip` serves again)."""
    reply = _dict(session.call("DrainActor", pb.DrainActorRequest(actor_id=actor, timeout_s=drain_timeout_s,
                                                                  force=force)))

    def render(console, data):
        _actor_line(console, data["actor"])
        console.print(f"moved to other actors: {', '.join(data['moved_request_ids']) or 'none'}")
    session.show(reply, render)


@click.command("add")
@click.argument("scenario")
@click.argument("role", type=click.Choice(ROLES))
@_force
@ops_command
def add(session: Session, scenario: str, role: str, force: bool) -> None:
    """Start one more ROLE actor in SCENARIO's pool."""
    reply = session.call("AddActor", pb.AddActorRequest(scenario=scenario, role=role, force=force))
    session.show(_dict(reply), _actor_line)


@click.command("remove")
@click.argument("actor")
@_drain_timeout("then what is left moves to other actors")
@_force
@ops_command
def remove(session: Session, actor: str, drain_timeout_s: float, force: bool) -> None:
    """Drain ACTOR, then stop it."""
    reply = session.call("RemoveActor", pb.RemoveActorRequest(actor_id=actor, drain_timeout_s=drain_timeout_s,
                                                              force=force))
    session.show(_dict(reply), lambda console, d: console.print(f"removed {d['actor_id']}"))


@click.command("decisions")
@click.option("--scenario", default="", help="only this scenario's (and the actors lent to it)")
@click.option("--limit", type=click.IntRange(min=1), default=20, show_default=True, help="the newest this many")
@ops_command
def decisions(session: Session, scenario: str, limit: int) -> None:
    """The ratio controller's decisions, newest last: actions, inputs, prediction and reason."""
    reply = session.call("GetDecisions", pb.GetDecisionsRequest(scenario=scenario, limit=limit))
    rows = []
    for d in _dict(reply)["decisions"]:
        d["inputs"], d["prediction"] = json.loads(d.pop("inputs_json")), json.loads(d.pop("prediction_json"))
        rows.append(d)

    def render(console, data):
        from rich.table import Table

        t = Table(title="ratio controller decisions")
        for col in ("time", "scenario", "P:D", "actions", "reason"):
            t.add_column(col)
        for d in data["decisions"]:
            actions = "\n".join(f"{a['kind']} {a['actor_id']} -> {a['role']}"
                                + (f" in {a['to_scenario']}" if a["to_scenario"] else "") for a in d["actions"])
            failed = "".join(f"\n[red]failed: {f}[/red]" for f in d["failures"])
            t.add_row(datetime.fromtimestamp(d["time_unix"]).strftime("%H:%M:%S"), d["scenario"],
                      f"{d['current_prefill']}:{d['current_decode']} -> {d['target_prefill']}:{d['target_decode']}",
                      actions + failed, d["reason"])
        console.print(t)
    session.show({"decisions": rows}, render)
