"""Event contracts of every routeloop topic, the codec, and the settings.

This package imports no other project code: router and streams build on it.
"""

from schemas.codec import DecodeError, decode, encode
from schemas.events import (
    TOPIC_EVENTS,
    ArraySpec,
    DeadLetter,
    Event,
    ModelResponse,
    ModelSpec,
    Outcome,
    Preference,
    RewardEvent,
    RouteDecision,
    RouteRequest,
    Snapshot,
)

__all__ = [
    "TOPIC_EVENTS",
    "ArraySpec",
    "DeadLetter",
    "DecodeError",
    "Event",
    "ModelResponse",
    "ModelSpec",
    "Outcome",
    "Preference",
    "RewardEvent",
    "RouteDecision",
    "RouteRequest",
    "Snapshot",
    "decode",
    "encode",
]
