"""`pdmesh bench converge`: the measure it shares with the simulator, and one small run on a
real mesh (the session's Ray) whose bad start the live controller flips back to the reference
split, with every request answered and the report's figures consistent. Nothing asserts on time."""
from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from gateway.cli import main
from simtests.converge import converged_window
from tests.gateway.support import first_json

ACTORS = 3
SECONDS, WINDOW = 20, 5


def test_convergence_is_the_first_window_from_which_every_later_one_is_within_the_tolerance():
    reference = np.array([4.0, 4.0, 4.0, 4.0, 4.0])
    assert converged_window(reference, np.array([1.0, 3.7, 2.0, 3.7, 4.2]), 0.1) == 3
    assert converged_window(reference, np.array([4.0, 4.0, 4.0, 4.0, 4.0]), 0.1) == 0
    assert converged_window(reference, np.array([4.0, 4.0, 4.0, 4.0, 3.0]), 0.1) is None


def test_the_bad_start_is_the_best_split_swapped_with_the_controller_on_and_short_intervals(checkpoint):
    from gateway.bench_converge import Load, Options, starts

    options = Options(actors=4, interval_s=0.5, dwell_s=1.0, confirm=3)
    reference, bad = starts(str(checkpoint("llama", "float32")), Load(prompt_tokens=1500, output_tokens=8), options)
    (ref,), (worse,) = reference.scenarios, bad.scenarios
    assert (ref.prefill, ref.decode) == (3, 1) and (worse.prefill, worse.decode) == (1, 3)
    for config in (reference, bad):
        control = config.controller
        assert control.enabled and (control.settings.interval_s, control.settings.min_dwell_s,
                                    control.settings.confirm) == (0.5, 1.0, 3)
        assert config.scenarios[0].mode.value == "disaggregated"


def test_the_controller_flips_a_swapped_split_back_and_no_request_is_lost(ray_cluster, checkpoint):
    result = CliRunner().invoke(main, [
        "bench", "converge", "--model", str(checkpoint("llama", "float32")), "--actors", str(ACTORS),
        "--rate", "6", "--seconds", str(SECONDS), "--window", str(WINDOW),
        "--request-timeout", "300", "--output", "json"],  # a slow host delays requests, it does not fail them
        catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report = first_json(result.stdout)
    ref, bad = report["reference"], report["bad"]
    # the controller's model puts this prompt-heavy load on more prefill than decode actors
    assert ref["start"][0] > ref["start"][1] and sum(ref["start"]) == ACTORS
    assert bad["start"] == ref["start"][::-1]
    # from the bad start the controller flipped decode actors to prefill, all the way back
    assert bad["end"] == ref["start"], bad["moves"]
    assert bad["flips"] >= 1 and bad["flips"] == sum(m["flips"] for m in bad["moves"])
    assert all(m["after"][0] > m["before"][0] and not m["failures"] for m in bad["moves"])
    assert "decode -> prefill" in bad["moves"][0]["reason"]
    for phase in (ref, bad):
        # every planned request sent within the run was answered with all its tokens
        assert phase["sent"] == phase["completed"] > 0 and phase["failed_by_status"] == {}
        assert len(phase["goodput"]) == SECONDS // WINDOW
        assert round(sum(phase["goodput"]) * WINDOW) <= phase["within_slo"] <= phase["completed"]
        assert phase["mean_goodput"] == pytest.approx(sum(phase["goodput"]) / len(phase["goodput"]))
    first = converged_window(np.array(ref["goodput"]), np.array(bad["goodput"]), report["tolerance"])
    assert report["converged_s"] == (None if first is None else first * WINDOW)
    assert report["load"]["rate"] == 6 and report["actors"] == ACTORS
    assert json.loads(json.dumps(report, allow_nan=False)) == report
