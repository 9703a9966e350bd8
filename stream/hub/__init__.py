"""The fan-out core: hub, subscribers and brokers. Knows nothing of HTTP."""

from .broker import Broker, Draft, MemoryBroker
from .core import Hub, HubConfig, HubStats
from .subscriber import Policy, Sink, State, Subscriber

__all__ = [
    "Broker",
    "Draft",
    "Hub",
    "HubConfig",
    "HubStats",
    "MemoryBroker",
    "Policy",
    "Sink",
    "State",
    "Subscriber",
]
