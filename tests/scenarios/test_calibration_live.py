"""Live calibration on a real local mesh: the actors' own measurements (prefill and decode steps,
KV sends, in their load reports) teach a model seeded for much slower hardware the mesh's times.

The seed is wrong in its fixed costs (a step's intercept), which the test's prompts (a few
hundred tokens) identify. Its per-token terms are scaled for prompts of thousands of tokens and
the ridge prior holds them until prompts of that size are measured (scenarios.perf_model.
OnlineLinear): the error falls (to about 2x on prefill, within 1x on decode here), it does not
vanish."""
from __future__ import annotations

import pytest

from mesh.api import Role, SamplingParams
from mesh.attempt import Request
from mesh.dispatch import Dispatcher
from mesh.hardware import Hardware
from scenarios.calibration import Calibration, DecodeSample, PrefillSample, TransferSample
from scenarios.perf_model import builtin

GREEDY = {"temperature": 0, "ignore_eos": True}
CPU = Hardware()
SLOW = 30.0  # the seed's decode step, against the profile's


def slow_seed(_accelerator):
    m = builtin("small-llama-cpu")
    m.prefill.coef = [0.5, *m.prefill.coef[1:]]  # half a second per prefill step
    m.decode.coef = [c * SLOW for c in m.decode.coef]
    for fit in (m.prefill, m.decode):
        fit.__post_init__()  # the prior follows the new seed
    return m


@pytest.fixture(scope="module")
def pool(make_pool):
    return make_pool(prefill=1, decode=1)


async def serve(pool, round_: int) -> list:
    """A few requests of several prompt lengths; then each actor's report: (role, its samples)."""
    dispatcher = Dispatcher(pool)
    for i, n in enumerate((150, 250, 350, 450)):  # within the test actors' KV (128 blocks of 4)
        request = Request(f"r{round_}-{i}", list(range(3, 3 + n)), SamplingParams(max_tokens=8, **GREEDY))
        async for _ in dispatcher.generate(request):
            pass
    await pool.refresh()
    return [(m.actor_id, m.role, m.info.load.samples) for m in pool.members.values()]


def seed_error(reports, kind: type) -> float:
    """The seed's mean relative error on the reported samples of a kind, before any learning."""
    seed, errors = slow_seed("cpu"), []
    for _, _, samples in reports:
        for step in samples:
            if step.kind == {PrefillSample: "prefill", DecodeSample: "decode"}[kind]:
                predicted = (seed.prefill_s(step.size, step.extent) if kind is PrefillSample
                             else seed.decode_step_s(step.size, step.extent))
                errors.append(abs(predicted - step.seconds) / step.seconds)
    return sum(errors) / len(errors)


async def test_calibration_converges_from_a_wrong_seed(pool):
    calibration = Calibration(slow_seed, recent=8)
    reports = await serve(pool, 0)
    first = {kind: seed_error(reports, kind) for kind in (PrefillSample, DecodeSample)}
    assert all(e > 1.5 for e in first.values()), first  # the seed is far off
    learnt = 0
    for round_ in range(1, 12):
        learnt += sum(calibration.learn(actor, role, CPU, samples) for actor, role, samples in reports)
        reports = await serve(pool, round_)
    assert learnt > 0
    last = {kind: calibration.error("cpu", kind) for kind in (PrefillSample, DecodeSample)}
    assert all(last[kind] < first[kind] / 2 for kind in first), (first, last)
    assert calibration.error("cpu", TransferSample) is not None
