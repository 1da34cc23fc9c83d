"""Moving KV bytes between actors: UCX, TCP and in-process backends behind one
small interface, transfer plans, leases and the msgpack wire format.

Imports nothing from mesh, scenarios or gateway.
"""

from .backends import available, make_receiver, make_sender
from .base import (KVReceiver, KVSender, LeaseDescriptor, ReceivedKV, Transfer, TransferError,
                   TransferState, TransferStats)
from .config import BACKENDS, TransportConfig
from .layout import KVLayout
from .lease import BlockReserver
from .plan import Strategy, TransferPlan, build_plan

__all__ = [
    "BACKENDS", "BlockReserver", "KVLayout", "KVReceiver", "KVSender", "LeaseDescriptor",
    "ReceivedKV", "Strategy", "Transfer", "TransferError", "TransferPlan", "TransferState",
    "TransferStats", "TransportConfig", "available", "build_plan", "make_receiver", "make_sender",
]
