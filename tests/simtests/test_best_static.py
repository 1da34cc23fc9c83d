"""The search for the mixed pool's best static split (`simtests.compare.best_static`)."""
import pytest

from simtests.compare import best_static


@pytest.mark.parametrize("peak", [1, 7, 23, 38, 39])
def test_finds_the_best_split_of_a_unimodal_score(peak):
    calls = []

    def score(p):
        calls.append(p)
        return -abs(p - peak)

    assert best_static(score, 40) == peak
    assert len(set(calls)) <= 14 and all(1 <= p <= 39 for p in calls)


def test_lower_is_better():
    assert best_static(lambda p: (p - 12) ** 2, 40, higher_is_better=False) == 12
