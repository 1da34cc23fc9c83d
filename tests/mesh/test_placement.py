"""The auto mode's conditional-disaggregation policy (mesh.placement), on given load: short
prompts stay on the decode actor, long ones go to a prefill actor unless its queue is longer
than the TTFT target and prefilling locally is sooner."""
from mesh.placement import ConditionalDisaggregation, PlacementState

POLICY = ConditionalDisaggregation(local_prefill_tokens=100, ttft_s=1.0, prefill_s=lambda n: n / 1000)


def state(prompt, cached=0, queued=0, prefill_speed=1000.0, local_speed=500.0):
    return PlacementState(prompt, cached, local_speed, queued, prefill_speed)


def test_short_prompts_and_long_ones_mostly_cached_prefill_locally():
    assert POLICY.decide(state(100)).local
    placed = POLICY.decide(state(900, cached=840))
    assert placed.local and placed.decision == "local"
    assert placed.reason == "short prompt: 60 uncached tokens, at most 100 prefill on the decode actor"


def test_long_prompts_go_to_an_idle_or_briefly_queued_prefill_actor():
    placed = POLICY.decide(state(400, queued=900))  # 0.9 s queued: within the 1 s TTFT target
    assert not placed.local and placed.decision == "remote"
    assert placed.reason == "long prompt: 400 uncached tokens, over 100; prefill actor ready in 0.90 s"


def test_a_busy_prefill_pool_keeps_long_prompts_local_when_that_is_sooner():
    placed = POLICY.decide(state(400, queued=3000))  # 3 s queued; 0.8 s here against 3.4 s there
    assert placed.local
    assert placed.reason == ("prefill pool busy: 3000 tokens queued (3.00 s, over the 1 s TTFT target); "
                             "0.80 s here against 3.40 s there")
    assert not POLICY.decide(state(4000, queued=3000, local_speed=100.0)).local  # 40 s here: still remote


def test_before_any_measurement_the_model_predicts_the_times():
    unmeasured = state(400, queued=3000, prefill_speed=0.0, local_speed=0.0)
    assert POLICY.decide(unmeasured).reason.startswith("prefill pool busy: 3000 tokens queued (3.00 s")
