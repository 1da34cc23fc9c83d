"""A pool's indexes stay right as actors' KV and roles change."""
from mesh.roles import Role
from simtests.actors import Actor
from simtests.pools import Pool
from tests.simtests.support import profile


def decode_pool(n, capacity=1000):
    pool, model = Pool(0, "p"), profile(capacity=capacity)
    actors = [Actor(i, Role.DECODE, 0, model) for i in range(n)]
    for a in actors:
        pool.decode.append(a.id)
        pool.note_kv(a, actors)
    return pool, actors


def test_most_free_follows_reservations_and_skips_stale_entries():
    pool, actors = decode_pool(3)
    for aid, used in ((0, 100), (1, 700), (2, 300)):
        actors[aid].reserved = used
        pool.note_kv(actors[aid], actors)
    assert pool.most_free(actors).id == 0
    actors[0].reserved = 900
    pool.note_kv(actors[0], actors)
    assert pool.most_free(actors).id == 2
    actors[2].draining = True  # leaving the pool: never chosen
    actors[2].kv_version += 1
    assert pool.most_free(actors).id == 1


def test_the_free_heap_is_rebuilt_before_stale_entries_pile_up():
    pool, actors = decode_pool(2)
    for i in range(500):
        a = actors[i % 2]
        a.reserved = i % 300
        pool.note_kv(a, actors)
    assert len(pool.free_heap) <= 4 * 2 + 64 + 1
    best = max(actors, key=lambda a: a.free)
    assert pool.most_free(actors) is best


def test_central_estimates_add_what_was_placed_since_the_report():
    pool, model = Pool(0, "p"), profile()
    actors = [Actor(i, Role.PREFILL, 0, model) for i in range(2)]
    pool.prefill = [0, 1]
    actors[0].queued_tokens = 500
    pool.report(actors)
    assert [pool.least_reported(actors, 300).id for _ in range(3)] == [1, 1, 0]  # 0, 300, then 500 < 600
    actors[1].pool = 7  # moved to another pool since the report: dropped when it surfaces
    assert pool.least_reported(actors, 1).id == 0
