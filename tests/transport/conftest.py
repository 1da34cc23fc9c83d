"""A block reserver that refuses double frees, for the transport tests (layouts, filled pools
and the shared secret are in tests/transport/support.py)."""
from __future__ import annotations

import pytest

from transport.layout import KVLayout
from transport.peer import ListReserver


@pytest.fixture
def reserver():
    """reserver(layout, seed=None) -> a free list, shuffled when seed is given; every
    block must be free again when the test ends."""
    made: list[ListReserver] = []

    def make(layout: KVLayout, seed: int | None = None) -> ListReserver:
        r = ListReserver(layout.num_blocks)
        r.order(seed)
        made.append(r)
        return r

    yield make
    for r in made:
        assert sorted(r.free_ids) == list(range(r.num_blocks)), "KV blocks leaked"
