"""The actor's KV connector, in the pattern of vLLM's: one owner for everything an actor does
with KV blocks beyond running its own requests (leases, prefix holds, transfers).

scheduler_side: decides (what a lease skips and holds, which blocks it reserves, when blocks
                go back); every block-manager change runs on the engine's thread.
worker_side:    moves bytes (receives into leases, sends a prefilled request's runs), per
                tensor-parallel rank's pool: each rank's KV heads from and into its own pool.
rank_receivers: the receivers of every rank, and leases in parts across them.
connector:      the one object the actor calls.
"""
from mesh.kv.connector import KVConnector, Sent
from mesh.kv.scheduler_side import Reservation
from mesh.kv.worker_side import RankPool

__all__ = ["KVConnector", "RankPool", "Reservation", "Sent"]
