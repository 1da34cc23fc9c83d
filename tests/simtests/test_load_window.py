"""The gateway's load window, which the simulator feeds as the live gateway does."""
from gateway.observe import LoadWindow
from scenarios.spec import SLO
from tests.support.clock import FakeClock


def test_a_refused_request_misses_ttft_but_does_not_shorten_the_mean_output():
    clock = FakeClock()
    window = LoadWindow({"chat": SLO(ttft_s=1.0, tpot_s=0.1)}, clock)
    for ttft_s, output in ((0.5, 100), (0.5, 300), (None, 0), (None, 0)):
        window.arrived("chat", 50)
        window.ended("chat", ttft_s, 0.05 if ttft_s else None, output, kv_short=ttft_s is None)
    clock.now = 2.0
    [obs] = window.close({"chat": ()})
    assert (obs.arrival_rps, obs.mean_prompt, obs.mean_output) == (2.0, 50, 200)
    assert (obs.ttft_attainment, obs.tpot_attainment, obs.kv_short) == (0.5, 1.0, 0.5)
