"""The ops CLI: `pdmesh status`, `ratio show|set|auto`, `controller on|off`, `flip`, `drain`,
`add`, `remove`, `decisions`, each a call to the gateway's admin API (pdmesh.v1.Admin).

Every command prints plain columns that fit the terminal (80 columns when piped): whole cells,
columns dropped rather than cut; `-o wide` adds the node, pid and device; `-o json` or `-o yaml`
print one object for scripts, with the protos' types (counts are numbers, an empty string is
null). The gateway's address and admin key come from the options or the environment, else from
the local credential `pdmesh serve` wrote on this host (gateway.local_admin).

`flip`, `drain`, `remove` and `add` keep each role within its scenario's limits and on its
hardware; `--force` overrides that, and the override is printed as a warning on stderr (and
logged by the gateway). Failures print one line on stderr (and `{"error": ...}` with -o json
or yaml) and exit with a code scripts can tell apart: 1 the gateway could not do it, 2 bad
input (also click's usage errors), 3 admin key refused, 4 gateway unreachable.
"""
from __future__ import annotations

import contextlib
import functools
import json
import shutil
import sys
import time
from datetime import datetime

import click

from gateway import local_admin
from gateway.ops_client import BAD_INPUT, FAILED, AdminClient, OpsError, Target
from gateway.proto import admin_pb2 as pb

ROLES = ("prefill", "decode", "both")  # both: aggregated scenarios
DEFAULT_ADDRESS = "127.0.0.1:50051"
OUTPUTS = ("table", "wide", "json", "yaml")
UNLIMITED = 1_000_000  # scenarios.spec.RoleLimits.max's default: no limit


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

    @property
    def wide(self) -> bool:
        return self.output == "wide"

    def show(self, data: dict, render, compact: bool = False) -> None:
        """data as JSON or YAML (compact: one JSON line, as --watch prints), or render(echo, data)."""
        if self.output == "json":
            click.echo(json.dumps(data, indent=None if compact else 2))
        elif self.output == "yaml":
            import yaml

            click.echo(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), nl=False)
        else:
            render(click.echo, data)

    def fail(self, e: OpsError) -> None:
        if self.output in ("json", "yaml"):
            click.echo(json.dumps({"error": {"message": e.message, "status": e.status, "exit_code": e.exit_code}}))
        click.echo(f"pdmesh: error: {e.message}", err=True)
        sys.exit(e.exit_code)


def _key(admin_key: str | None, admin_key_file: str | None) -> str | None:
    if admin_key_file:
        lines = [line.split("#", 1)[0].strip() for line in open(admin_key_file).read().splitlines()]
        return next((line for line in lines if line), None)
    return admin_key


def _target(address: str | None, key: str | None, tls_ca: str | None, tls: bool, timeout_s: float) -> Target:
    """With no key given, the local credential of the gateway on this host (at `address`, when
    given) supplies the address and the key."""
    if key is None:
        try:
            credential = local_admin.find(address)
        except ValueError as e:
            raise OpsError(str(e), BAD_INPUT, "INVALID_ARGUMENT") from None
        if credential is not None:
            address, key = credential.address, credential.key
    return Target(address or DEFAULT_ADDRESS, key, tls_ca, tls, timeout_s)


def ops_command(f):
    """Adds the options every ops command takes; the command gets a Session first."""
    @click.option("--address", envvar="PDMESH_ADDRESS", default=None,
                  help=f"the gateway's gRPC address (also PDMESH_ADDRESS); default: the local credential's, "
                       f"else {DEFAULT_ADDRESS}")
    @click.option("--admin-key", envvar="PDMESH_ADMIN_KEY", default=None, show_envvar=True,
                  help="the gateway's admin key; none: the local credential `pdmesh serve` wrote on this host")
    @click.option("--admin-key-file", envvar="PDMESH_ADMIN_KEY_FILE", default=None,
                  type=click.Path(dir_okay=False, exists=True), help="a file whose first line is the admin key")
    @click.option("--tls", is_flag=True, help="TLS, trusting the system's roots")
    @click.option("--tls-ca", type=click.Path(dir_okay=False, exists=True), default=None,
                  help="TLS, trusting this CA certificate (PEM)")
    @click.option("--timeout", "timeout_s", type=click.FloatRange(min=0, min_open=True), default=120.0,
                  show_default=True, help="seconds per call (flips and drains wait for in-flight requests)")
    @click.option("-o", "--output", type=click.Choice(OUTPUTS), default="table", show_default=True,
                  help="wide: also node, pid and device; json, yaml: for scripts")
    @functools.wraps(f)
    def wrapper(address, admin_key, admin_key_file, tls, tls_ca, timeout_s, output, **kwargs):
        session = Session(None, output)
        try:
            session.target = _target(address, _key(admin_key, admin_key_file), tls_ca, tls, timeout_s)
            f(session, **kwargs)
        except OpsError as e:
            session.fail(e)
    return wrapper


def _dict(message) -> dict:
    """A proto message as plain data with its own types (MessageToDict writes 64-bit integers
    as strings): an empty string, or an optional field that is unset, is None."""
    out = {}
    for field in message.DESCRIPTOR.fields:
        value = getattr(message, field.name)
        if field.is_repeated:
            out[field.name] = [_dict(v) for v in value] if field.message_type else list(value)
        elif field.has_presence and not message.HasField(field.name):
            out[field.name] = None
        elif field.message_type:
            out[field.name] = _dict(value)
        else:
            out[field.name] = None if value == "" else value
    return out


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
def columns(rows: list[dict[str, str]], optional: tuple[str, ...] = ()) -> str:
    """Rows as plain columns (kubectl's look) within the terminal's width (80 when piped, or
    COLUMNS): cells are never cut; the `optional` columns go, last first, until the rest fits
    (-o wide keeps them all, as kubectl does)."""
    if not rows:
        return ""
    width = shutil.get_terminal_size((80, 24)).columns
    names = list(rows[0])
    while True:
        sizes = {n: max(len(n), *(len(r[n]) for r in rows)) for n in names}
        kept = [n for n in reversed(optional) if n in names]
        if sum(sizes.values()) + 3 * (len(names) - 1) <= width or not kept:
            break
        names.remove(kept[0])
    lines = ["   ".join(n.upper().ljust(sizes[n]) for n in names)]
    lines += ["   ".join(r[n].ljust(sizes[n]) for n in names) for r in rows]
    return "\n".join(line.rstrip() for line in lines)


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def _limits(lim: dict) -> str:
    return f"{lim['min']}-{'∞' if lim['max'] >= UNLIMITED else lim['max']}"


def _mode(s: dict) -> str:
    """How the pool serves now; in brackets, the scenario's mode when it is auto (the controller
    moves it), and whether its actors are still flipping to it."""
    moved = s["configured_mode"] == "auto" and s["mode"] != "auto"
    notes = [n for n, shown in (("auto", moved), ("switching", s["switching"])) if shown]
    return s["mode"] + (f" ({', '.join(notes)})" if notes else "")


def _control_rows(scenarios: list[dict], wide: bool = False) -> str:
    rows = []
    for s in scenarios:
        o = s["observed"]
        row = {"scenario": s["scenario"], "mode": _mode(s),
               "P:D": f"{s['prefill']}:{s['decode']}" + (f" +{s['both']} both" if s["both"] else ""),
               "target": f"{s['target_prefill']}:{s['target_decode']}",
               "controller": ("pinned" if s["pinned"] else "auto") + ("" if s["enabled"] else ",off"),
               "limits P/D": f"{_limits(s['prefill_limits'])}/{_limits(s['decode_limits'])}",
               "req/s": f"{o['arrival_rps']:.2f}",
               "TTFT met": f"{_pct(o['ttft_attainment'])} ≤{o['ttft_target_s']:g}s",
               "TPOT met": f"{_pct(o['tpot_attainment'])} ≤{o['tpot_target_s']:g}s",
               "model error P/D": f"{_pct(s.get('prefill_model_error'))}/{_pct(s.get('decode_model_error'))}"}
        if wide:
            row.update({"prompt": f"{o['mean_prompt_tokens']:.0f}", "output": f"{o['mean_output_tokens']:.0f}"})
        rows.append(row)
    return columns(rows, optional=() if wide else ("limits P/D", "target", "model error P/D"))


def _actor_rows(pools: list[dict], wide: bool = False) -> str:
    rows, pending = [], []
    for pool in pools:
        for a in pool["actors"]:
            load = a["load"]
            row = {"actor": a["actor_id"], "role": a["role"], "state": a["state"],
                   "queued": str(load["queued_requests"]), "running": str(load["active_requests"]),
                   "KV used": f"{load['num_blocks'] - load['free_blocks']}/{load['num_blocks']}"}
            if wide:
                row.update({"node": a["node"] or "-", "pid": str(a["pid"] or "-"), "device": a["device"] or "-"})
            rows.append(row)
            if a["waiting_for"]:
                pending.append(f"{a['actor_id']} is pending: no node has {a['waiting_for']} free")
    return "\n".join([columns(rows, optional=() if wide else ("queued", "running", "KV used")), *pending])


def _drain_timeout(what: str):
    return click.option("--drain-timeout-s", type=click.FloatRange(min=0), default=0.0,
                        help=f"how long in-flight requests may take; {what} (0: the actor's default)")


_force = click.option("--force", is_flag=True,
                      help="even past the scenario's role limits or the role's hardware (prints a warning)")


def _actor_line(echo, a: dict) -> None:
    if a["waiting_for"]:
        echo(f"{a['actor_id']} ({a['scenario']}): {a['role']}, pending: no node has {a['waiting_for']} free "
             f"(`pdmesh status` shows when it serves; `pdmesh remove {a['actor_id']}` cancels it)")
    else:
        echo(f"{a['actor_id']} ({a['scenario']}): {a['role']}, {a['state']} on {a['device']} pid {a['pid']}")


# -- commands ----------------------------------------------------------------------------------
@click.command("status")
@click.argument("scenario", required=False)
@click.option("-w", "--watch", "watch_s", type=click.FloatRange(min=0.1), is_flag=False, flag_value=2.0,
              default=None, metavar="[SECONDS]", help="again every SECONDS (default 2) until Ctrl-C; with -o json, "
                                                      "one object a line")
@ops_command
def status(session: Session, scenario: str | None, watch_s: float | None) -> None:
    """Scenarios (serving mode, P:D, controller, load, SLO attainment) and every actor, pending
    ones too."""
    def render(echo, data):
        echo(_control_rows(data["scenarios"], session.wide) + "\n")
        echo(_actor_rows(data["pools"], session.wide))

    with session.client() as c, contextlib.suppress(KeyboardInterrupt):  # Ctrl-C ends a watch
        while True:
            control = _pick(_dict(c.call("GetController", pb.GetControllerRequest()))["scenarios"], scenario)
            pools = _dict(c.call("ListPools", pb.ListPoolsRequest(scenario=scenario or "")))["pools"]
            if watch_s is None:
                return session.show({"scenarios": control, "pools": pools}, render)
            if session.output in ("table", "wide"):
                click.echo(f"\n{datetime.now():%H:%M:%S}")
            session.show({"time_unix": time.time(), "scenarios": control, "pools": pools}, render, compact=True)
            time.sleep(watch_s)


@click.group("ratio")
def ratio() -> None:
    """Each scenario's prefill:decode ratio: show it, pin it, or hand it to the controller."""


def _show_control(session: Session, reply: pb.ControllerStatus, scenario: str | None) -> None:
    data = {"interval_s": reply.interval_s, "scenarios": _pick(_dict(reply)["scenarios"], scenario)}
    session.show(data, lambda echo, d: echo(_control_rows(d["scenarios"], session.wide)))


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
    """Drain ACTOR, switch it to ROLE in place (same weights) and serve again. ROLE is one its
    scenario serves with now: prefill or decode, or both while it is aggregated."""
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

    def render(echo, data):
        _actor_line(echo, data["actor"])
        echo(f"moved to other actors: {', '.join(data['moved_request_ids']) or 'none'}")
    session.show(reply, render)


@click.command("add")
@click.argument("scenario")
@click.argument("role", type=click.Choice(ROLES))
@click.option("--wait", is_flag=True, help="when the actor is pending (no node has its resources free), wait "
                                           "until it serves (at most --timeout)")
@_force
@ops_command
def add(session: Session, scenario: str, role: str, wait: bool, force: bool) -> None:
    """Start one more ROLE actor in SCENARIO's pool (a role it serves with now, as for flip).
    Answers once it serves, or at once when it is pending, saying which Ray resources no node
    has free."""
    with session.client() as c:
        actor = _dict(c.call("AddActor", pb.AddActorRequest(scenario=scenario, role=role, force=force)))
        if wait and actor["waiting_for"]:
            session.warn(f"{actor['actor_id']} is pending: no node has {actor['waiting_for']} free; waiting")
            actor = _serving(c, actor, session.target.timeout_s)
    session.show(actor, _actor_line)


def _serving(c: AdminClient, actor: dict, timeout_s: float) -> dict:
    """The pending actor's info once it serves; OpsError when it goes, or after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        pools = _dict(c.call("ListPools", pb.ListPoolsRequest(scenario=actor["scenario"])))["pools"]
        now = next((a for a in pools[0]["actors"] if a["actor_id"] == actor["actor_id"]), None)
        if now is None:
            raise OpsError(f"{actor['actor_id']} did not start (removed, or its start failed: the gateway's log "
                           f"says why)", FAILED, "ABORTED")
        if now["state"] == "serving":
            return now
        time.sleep(1.0)
    raise OpsError(f"{actor['actor_id']} is still {now['state']} after {timeout_s:g} s (--timeout)"
                   + (f": no node has {now['waiting_for']} free" if now["waiting_for"] else ""), FAILED,
                   "DEADLINE_EXCEEDED")


@click.command("remove")
@click.argument("actor")
@_drain_timeout("then what is left moves to other actors")
@_force
@ops_command
def remove(session: Session, actor: str, drain_timeout_s: float, force: bool) -> None:
    """Drain ACTOR, then stop it."""
    reply = session.call("RemoveActor", pb.RemoveActorRequest(actor_id=actor, drain_timeout_s=drain_timeout_s,
                                                              force=force))
    session.show(_dict(reply), lambda echo, d: echo(f"removed {d['actor_id']}"))


@click.command("decisions")
@click.option("--scenario", default="", help="only this scenario's (and the actors lent to it)")
@click.option("--limit", type=click.IntRange(min=1), default=20, show_default=True, help="the newest this many")
@ops_command
def decisions(session: Session, scenario: str, limit: int) -> None:
    """The controller's decisions, newest last: ratio moves, scale steps and mode switches, each
    with its actions, inputs, prediction and reason."""
    reply = session.call("GetDecisions", pb.GetDecisionsRequest(scenario=scenario, limit=limit))
    rows = []
    for d in _dict(reply)["decisions"]:
        d["inputs"], d["prediction"] = json.loads(d.pop("inputs_json")), json.loads(d.pop("prediction_json"))
        rows.append(d)

    def render(echo, data):
        echo("ratio controller decisions, newest last")
        for d in data["decisions"]:
            change = (f"{d['current_mode']} -> {d['target_mode']}" if d["action"] == "switch" else
                      f"{d['current_prefill']}:{d['current_decode']} -> {d['target_prefill']}:{d['target_decode']}")
            echo(f"{datetime.fromtimestamp(d['time_unix']):%H:%M:%S}  {d['scenario']}  {change}  {d['reason']}")
            for a in d["actions"]:
                echo(f"    {a['kind']} {a['actor_id']} -> {a['role']}"
                     + (f" in {a['to_scenario']}" if a["to_scenario"] else ""))
            for f in d["failures"]:
                echo(f"    failed: {f}")
    session.show({"decisions": rows}, render)
