"""One orjson codec for every event.

>>> from schemas.events import RewardEvent
>>> raw = encode(RewardEvent(reward_id="r1", request_id="q1", quality=1.0, created_at=0.0))
>>> decode(RewardEvent, raw).quality
1.0
>>> try:
...     decode(RewardEvent, b"{not json")
... except DecodeError as exc:
...     print(exc.reason)
invalid_json
"""

from __future__ import annotations

from typing import TypeVar

import orjson
from pydantic import ValidationError

from schemas.events import Event

E = TypeVar("E", bound=Event)

#: Events larger than this are refused before parsing (Kafka's default message limit is 1 MB;
#: snapshots have their own, larger, limit).
MAX_EVENT_BYTES = 1_048_576


class DecodeError(ValueError):
    """An event that cannot be used; ``reason`` is a machine-readable code for the dead letter."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def encode(event: Event) -> bytes:
    """Serialise an event to compact JSON bytes."""
    return orjson.dumps(event.model_dump(mode="json", exclude_none=True))


def decode(model: type[E], raw: bytes | None, max_bytes: int = MAX_EVENT_BYTES) -> E:
    """Parse and validate ``raw`` as ``model``; raise :class:`DecodeError` with a reason code."""
    if raw is None:
        raise DecodeError("empty", "the message has no value")
    if len(raw) > max_bytes:
        raise DecodeError("too_large", f"{len(raw)} bytes > limit {max_bytes}")
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise DecodeError("invalid_json", str(exc)) from None
    if not isinstance(data, dict):
        raise DecodeError("invalid_event", f"expected a JSON object, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        where = ".".join(str(p) for p in first["loc"]) or "event"
        raise DecodeError("invalid_event", f"{where}: {first['msg']}") from None
