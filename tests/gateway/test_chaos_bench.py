"""`pdmesh bench chaos`: its seeded plan and its report on plain objects, and one very short
run on a real mesh whose JSON has every figure and whose counts add up."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from gateway.chaos_plan import POISONS, Fault, FaultKind, LoadMix, Schedule
from gateway.chaos_report import Applied, Kill, Outcome, Report, Result, Sample, replacement_s
from gateway.cli import main


# -- the schedule --------------------------------------------------------------------------------
def test_a_schedule_is_the_same_for_a_seed_and_keeps_its_windows():
    a = Schedule.random(7, seconds=100, every_s=10, phases=("now", "decode_step"))
    assert a == Schedule.random(7, seconds=100, every_s=10, phases=("now", "decode_step"))
    assert a != Schedule.random(8, seconds=100, every_s=10, phases=("now", "decode_step"))
    times = [f.at_s for f in a.faults]
    assert times == sorted(times)
    assert len(a.faults) == 6  # slots of 10 s between the quiet 25 s and the last 15 s
    assert a.quiet_s == 25 and all(25 <= t < 85 for t in times)
    for f in a.faults:
        assert f.phase in (("now", "decode_step") if f.kind.killed_role else ("now",))
        assert 0 <= f.pick < 1


def test_a_short_schedule_still_has_one_fault_and_bad_bounds_are_refused():
    assert len(Schedule.random(0, seconds=6, every_s=30).faults) == 1
    with pytest.raises(ValueError, match="every_s > 0"):
        Schedule.random(0, seconds=6, every_s=0)


def test_a_fault_picks_its_target_from_the_sorted_candidates():
    assert Fault(1.0, FaultKind.FLIP, pick=0.0).target(["b", "a"]) == "a"
    assert Fault(1.0, FaultKind.FLIP, pick=0.99).target(["b", "a", "c"]) == "c"
    assert Fault(1.0, FaultKind.FLIP, pick=0.5).target([]) is None
    assert FaultKind.KILL_DECODE.killed_role == "decode" and FaultKind.DRAIN.killed_role is None


# -- the load mix --------------------------------------------------------------------------------
def test_the_load_mix_is_seeded_poisons_every_nth_and_alternates_greedy_and_sampled():
    mix = LoadMix(seed=3, vocab_size=1024, poison_every=5)
    requests = [mix.request(i) for i in range(20)]
    assert requests == [LoadMix(seed=3, vocab_size=1024, poison_every=5).request(i) for i in range(20)]
    assert [r.poison for r in requests if r.poison] == sorted(POISONS) * 2
    assert {r.index for r in requests if r.poison} == {4, 9, 14, 19}
    innocent = [r for r in requests if not r.poison]
    assert any(r.greedy for r in innocent) and any(not r.greedy for r in innocent)
    for r in requests:
        assert 16 <= len(r.prompt) <= 128 and all(10 <= t < 1024 for t in r.prompt)
        assert 4 <= r.max_tokens <= 32 and r.sampling["ignore_eos"]
    assert not any(r.poison for r in map(LoadMix(3, 1024, poison_every=0).request, range(20)))


# -- the report ----------------------------------------------------------------------------------
def test_replacement_is_the_time_until_the_role_is_back_to_its_count_before_the_kill():
    kill = Kill(at_s=10.0, role="decode", actor_id="d1", serving_before=2)
    samples = [Sample(9.0, {"decode": 2}), Sample(10.5, {"decode": 1}), Sample(14.0, {"decode": 1, "prefill": 3}),
               Sample(16.5, {"decode": 2})]
    assert replacement_s(kill, samples) == 6.5
    assert replacement_s(kill, samples[:3]) is None


def _outcome(i, result, status="OK", poison="", ended_s=1.0):
    return Outcome(i, poison, result, status, ended_s - 0.5, ended_s)


def test_the_report_counts_every_request_once_and_judges_each_target():
    outcomes = [_outcome(0, Result.COMPLETED), _outcome(1, Result.FAILED, "INTERNAL", ended_s=2.0),
                _outcome(2, Result.FAILED, "INTERNAL", poison="temperature_1e-300"),
                _outcome(3, Result.COMPLETED, poison="stop_id_beyond_vocab"),
                _outcome(4, Result.FAILED, "UNAVAILABLE", ended_s=9.0),
                _outcome(5, Result.LOST, "DEADLINE_EXCEEDED", ended_s=12.0),
                _outcome(6, Result.CORRUPT, ended_s=13.0)]
    faults = [Applied(Fault(5.0, FaultKind.KILL_PREFILL, 0.1), 5.2, "p0", True),
              Applied(Fault(8.0, FaultKind.FLIP, 0.4), 8.1, "d1", False, "FAILED_PRECONDITION: last decode")]
    kills = [Kill(5.2, "prefill", "p0", 2)]
    samples = [Sample(6.0, {"prefill": 1}), Sample(20.0, {"prefill": 2})]
    report = Report.build(outcomes, faults, kills, samples, {"p1": 0, "d0": 3}, verified_greedy=1,
                          replace_within_s=30.0)
    assert (report.sent, report.completed, report.corrupt, report.failed, report.lost) == (7, 2, 1, 3, 1)
    assert report.failed_by_status == {"INTERNAL": 2, "UNAVAILABLE": 1}
    assert report.lost_by_status == {"DEADLINE_EXCEEDED": 1}
    assert report.poison_sent == 2 and report.poison_by_status == {"INTERNAL": 1, "OK": 1}
    # before the first fault (5.2 s) one innocent request failed; the later failures are the faults'
    assert report.poison_window_s == 5.2 and report.innocent_failed == 1
    assert report.innocent_failed_by_status == {"INTERNAL": 1, "OK_WRONG_TOKENS": 1, "UNAVAILABLE": 1,
                                                "DEADLINE_EXCEEDED": 1}
    assert report.leaked_blocks == {"d0": 3}
    met = {t.name: t.met for t in report.targets()}
    assert met == {"lost requests": False, "completed with wrong tokens": False, "KV blocks leaked": False,
                   "innocent requests failed (poison window)": False, "kill to serving replacement": True}
    figures = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert figures["replacement_max_s"] == pytest.approx(14.8) and figures["replaced"] == figures["kills"] == 1
    assert figures["faults"][1] == {"at_s": 8.1, "kind": "flip", "phase": "now", "planned_s": 8.0, "actor": "d1",
                                    "ok": False, "detail": "FAILED_PRECONDITION: last decode"}
    assert figures["targets_met"] is False


def test_a_kill_never_replaced_or_replaced_too_late_misses_its_target():
    kills = [Kill(1.0, "decode", "d0", 2)]
    never = Report.build([_outcome(0, Result.COMPLETED)], [], kills, [Sample(2.0, {"decode": 1})], {}, 0, 30.0)
    late = Report.build([], [], kills, [Sample(40.0, {"decode": 2})], {}, 0, 30.0)
    quiet = Report.build([_outcome(0, Result.COMPLETED)], [], [], [], {}, 0, 30.0)
    replacement = {name: next(t for t in r.targets() if t.name == "kill to serving replacement")
                   for name, r in (("never", never), ("late", late), ("quiet", quiet))}
    assert not replacement["never"].met and replacement["never"].figure == "none for 1 of 1 kills"
    assert not replacement["late"].met and replacement["late"].figure == "max 39.0 s"
    assert replacement["quiet"].met and all(t.met for t in quiet.targets())
    figures = never.to_dict()
    assert figures["replacement_s"] == [None] and figures["replacement_median_s"] is None
    assert figures["poison_window_s"] is None  # no fault applied: the whole run was the poison window


# -- one short run on a real mesh ----------------------------------------------------------------
FIELDS = {"seed", "minutes", "concurrency", "deadline_s", "sent", "completed", "corrupt", "failed", "lost",
          "failed_by_status", "lost_by_status", "verified_greedy", "poison_sent", "poison_by_status",
          "poison_window_s", "innocent_failed", "innocent_failed_by_status", "faults", "kills", "replaced",
          "replacement_s", "replacement_median_s", "replacement_max_s", "leaked_blocks", "replace_within_s", "targets",
          "targets_met"}
SEED = 9  # a drain (and the flip that returns the actor to service), then a decode and a prefill kill


def test_a_short_chaos_run_reports_every_figure_and_its_counts_add_up(ray_cluster, checkpoint):
    planned = Schedule.random(SEED, seconds=6, every_s=1.0)
    assert [f.kind for f in planned.faults] == [FaultKind.DRAIN, FaultKind.KILL_DECODE, FaultKind.KILL_PREFILL]
    result = CliRunner().invoke(main, [
        "bench", "chaos", "--minutes", "0.1", "--fault-every-s", "1", "--seed", str(SEED), "--concurrency", "3",
        "--deadline-s", "20", "--poison-every", "4", "--replace-within-s", "3", "--verify", "8",
        "--model", str(checkpoint("llama", "float32")), "--output", "json"], catch_exceptions=False)
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(figures) == FIELDS
    assert result.exit_code == (0 if figures["targets_met"] else 1), result.output
    assert figures["sent"] > 0
    assert figures["sent"] == figures["completed"] + figures["corrupt"] + figures["failed"] + figures["lost"]
    assert sum(figures["failed_by_status"].values()) == figures["failed"]
    assert sum(figures["lost_by_status"].values()) == figures["lost"]
    assert sum(figures["poison_by_status"].values()) == figures["poison_sent"] > 0
    assert 0 < figures["verified_greedy"] <= 8
    # every planned fault was applied: the drain through the admin API (a flip to its own role puts
    # the actor back, as `pdmesh drain` says), the kills each to a live actor of their role
    assert [f["kind"] for f in figures["faults"]] == [f.kind.value for f in planned.faults]
    drain = figures["faults"][0]
    assert drain["ok"] and drain["actor"].startswith("chaos-") and drain["detail"].endswith("serving again")
    kills = [f for f in figures["faults"] if f["kind"].startswith("kill_")]
    assert all(f["ok"] and f["actor"].startswith(f"chaos-{f['kind'][5]}") for f in kills)
    assert figures["kills"] == len(kills) == len(figures["replacement_s"])
    assert figures["replaced"] <= figures["kills"]
    assert {t["name"] for t in figures["targets"]} == {
        "lost requests", "completed with wrong tokens", "KV blocks leaked",
        "innocent requests failed (poison window)", "kill to serving replacement"}
