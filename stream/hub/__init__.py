"""The fan-out core: hub, subscribers and brokers. Knows nothing of HTTP."""

from .broker import Broker, Charge, Draft, Fence, MemoryBroker
from .core import Hub, HubConfig, HubStats
from .subscriber import Policy, Sink, State, Subscriber

__all__ = [
    "Broker",
    "Charge",
    "Draft",
    "Fence",
    "Hub",
    "HubConfig",
    "HubStats",
    "MemoryBroker",
    "Policy",
    "Sink",
    "State",
    "Subscriber",
]
