"""The simulator with idealised costs against closed-form results."""
import numpy as np
import pytest

from simtests.cluster import Variant
from simtests.sim import Simulator
from simtests.workload import Mix, Workload, synthetic
from tests.simtests.support import profile, scenario


@pytest.mark.parametrize("placement", ["forward", "central"])
def test_md1_waiting_time(make_cluster, placement):
    """One prefill actor, deterministic 1 s service, Poisson arrivals at rho = 0.5:
    M/D/1 mean wait rho / (2 mu (1 - rho)) = 0.5 s (Pollaczek-Khinchine)."""
    # prompts of 1000 tokens at 1 ms each; a batch holds one prompt; output 1: no decode
    cluster = make_cluster(scenario(), model=profile(prefill=(0.0, 1e-3, 0.0), max_batch_tokens=1000))
    w = synthetic([Mix(0, 0.5, 1000, 1, spread=False)], duration_s=60_000, seed=1)
    run = Simulator(cluster, Variant(placement=placement, controller=False,
                                     admission_timeout_s=1e9)).run(w)
    wait = run.ttft - 1.0
    assert run.stats()[-1].rejected == 0
    assert wait.mean() == pytest.approx(0.5, rel=0.05)
    assert np.mean(wait == 0) == pytest.approx(0.5, abs=0.02)  # P(no wait) = 1 - rho


def test_prefill_batches_share_the_intercept(make_cluster):
    """Requests queued behind a batch go together in the next one (token budget allowing)."""
    cluster = make_cluster(scenario(), model=profile(prefill=(1.0, 0.0, 0.0), max_batch_tokens=300))
    w = Workload(np.array([0.0, 0.1, 0.2, 0.3]), np.full(4, 100), np.ones(4, dtype=np.int64),
                 np.zeros(4, dtype=np.int64), "four")
    run = Simulator(cluster, Variant(controller=False)).run(w)
    # the first alone (1 s), then the next three in one batch (ends at 2 s)
    assert (run.ttft + np.array([0.0, 0.1, 0.2, 0.3])).tolist() == pytest.approx([1.0, 2.0, 2.0, 2.0])


def stepped_finish_times(joins, a, b, c):
    """Reference decode actor, one step at a time: a sequence joins at the first step that
    starts after it arrives; each step costs a + b*batch + c*context."""
    t, pending, running, ends = 0.0, sorted(joins), [], {}
    while pending or running:
        if not running and pending[0][0] > t:
            t = pending[0][0]
        while pending and pending[0][0] <= t:
            at, rid, prompt, output = pending.pop(0)
            running.append([rid, prompt + 1, output - 1])  # context, steps left
        t += a + b * len(running) + c * sum(r[1] for r in running)
        for r in running:
            r[1] += 1
            r[2] -= 1
        for r in [r for r in running if r[2] == 0]:
            ends[r[0]] = t
            running.remove(r)
    return ends


def test_decode_epochs_match_stepping(make_cluster):
    """Closed-form epochs against step-by-step decode: within a step or two of each other."""
    a, b, c = 0.01, 0.002, 1e-6
    model = profile(prefill=(0.0, 1e-9, 0.0), decode=(a, b, c))
    rng = np.random.default_rng(3)
    n = 40
    arrival = np.sort(rng.uniform(0, 5, n))
    prompt = rng.integers(100, 3000, n)
    output = rng.integers(2, 200, n)
    w = Workload(arrival, prompt, output, np.zeros(n, dtype=np.int64), "random")
    run = Simulator(make_cluster(scenario(), model=model), Variant(controller=False)).run(w)
    ends = stepped_finish_times([(t, i, p, o) for i, (t, p, o) in enumerate(zip(arrival, prompt, output))],
                                a, b, c)
    longest_step = a + b * n + c * float((prompt + output).sum())
    simulated = run.tpot * (output - 1) + run.ttft + arrival
    assert max(abs(simulated[i] - ends[i]) for i in range(n)) < 2 * longest_step
