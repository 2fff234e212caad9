"""The events of every routeloop topic, as strict pydantic v2 models.

One model per topic::

    requests   -> RouteRequest       decisions -> RouteDecision
    responses  -> ModelResponse      rewards   -> RewardEvent
    outcomes   -> Outcome            snapshots -> Snapshot
    models     -> ModelSpec          deadletter -> DeadLetter

Validation is strict on purpose: every consumer of these topics is a learner
or a router, and one NaN or negative cost that slips through poisons a model
for good. NaN and infinities are refused everywhere, quality lives in [0, 1],
costs are non-negative, strings are bounded, and a preference is normalised
onto the simplex.

>>> Preference(quality=4, cost=1)
Preference(quality=0.8, cost=0.2)
"""

from __future__ import annotations

import base64
import math
import time
from typing import Annotated, Literal

import numpy as np
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    BeforeValidator,
    PlainSerializer,
    WithJsonSchema,
    model_validator,
)

MAX_ID = 128
MAX_NAME = 128
MAX_PROMPT = 65_536
MAX_DIM = 4_096
MAX_ARMS = 256

Id = Annotated[str, Field(min_length=1, max_length=MAX_ID)]
Name = Annotated[str, Field(min_length=1, max_length=MAX_NAME)]
NonNegative = Annotated[float, Field(ge=0.0)]
Positive = Annotated[float, Field(gt=0.0)]
UnitInterval = Annotated[float, Field(ge=0.0, le=1.0)]


def _now() -> float:
    return time.time()


def _decode_vector(value: object) -> np.ndarray:
    """Accept a base64 little-endian float32 string, a list of floats or an array."""
    if isinstance(value, np.ndarray):
        arr = value.astype(np.float32, copy=False)
    elif isinstance(value, str):
        if len(value) > (MAX_DIM * 4 * 4) // 3 + 4:
            raise ValueError(f"vector longer than {MAX_DIM} floats")
        try:
            raw = base64.b64decode(value, validate=True)
        except ValueError as exc:
            raise ValueError(f"vector is not base64: {exc}") from None
        if len(raw) % 4:
            raise ValueError("vector byte length is not a multiple of 4")
        arr = np.frombuffer(raw, dtype="<f4")
    elif isinstance(value, (list, tuple)):
        if len(value) > MAX_DIM:
            raise ValueError(f"vector longer than {MAX_DIM} floats")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            raise ValueError("vector items must be numbers")
        arr = np.asarray(value, dtype=np.float32)
    else:
        raise ValueError("vector must be a base64 float32 string or a list of numbers")
    if arr.ndim != 1 or not 0 < arr.shape[0] <= MAX_DIM:
        raise ValueError(f"vector must have between 1 and {MAX_DIM} entries")
    if not np.isfinite(arr).all():
        raise ValueError("vector holds NaN or infinity")
    return arr


def _encode_vector(arr: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(arr, dtype="<f4").tobytes()).decode("ascii")


#: A feature vector; on the wire a base64 string of little-endian float32 (a
#: quarter of the size of a JSON list of floats), in Python a numpy array.
Vector = Annotated[
    np.ndarray,
    BeforeValidator(_decode_vector),
    PlainSerializer(_encode_vector, return_type=str, when_used="json"),
    WithJsonSchema({
        "anyOf": [
            {"type": "string", "contentEncoding": "base64",
             "description": "little-endian float32 values, base64-encoded"},
            {"type": "array", "items": {"type": "number"}, "minItems": 1, "maxItems": MAX_DIM},
        ]
    }),
]


class Event(BaseModel):
    """Base of every event: strict types, immutable, no unknown fields, no NaN."""

    model_config = ConfigDict(
        strict=True,  # "0.5" is not a number, false is not a timestamp
        extra="forbid",
        frozen=True,
        allow_inf_nan=False,
        arbitrary_types_allowed=True,
        str_max_length=MAX_PROMPT,
    )


class Preference(Event):
    """A performance/cost trade-off, normalised onto the simplex.

    Weights must be non-negative and not both zero; they are rescaled to sum to one.
    """

    quality: NonNegative
    cost: NonNegative

    @model_validator(mode="after")
    def _normalise(self) -> Preference:
        # After field validation, so nothing unvalidated is normalised; weights so large
        # that their sum overflows are scaled down first instead of becoming (0, 0).
        largest = max(self.quality, self.cost)
        if not largest > 0:
            raise ValueError("preference weights must not all be zero")
        q, c = self.quality, self.cost
        if not math.isfinite(q + c):
            q, c = q / largest, c / largest
        if q + c != 1.0:  # already normalised weights stay bit-identical through a round trip
            object.__setattr__(self, "quality", q / (q + c))
            object.__setattr__(self, "cost", c / (q + c))
        return self

    @classmethod
    def parse(cls, text: str) -> Preference:
        """Parse ``quality=0.8,cost=0.2`` (as the CLI takes it)."""
        parts: dict[str, float] = {}
        for item in text.split(","):
            key, sep, value = item.partition("=")
            if not sep or key.strip() not in ("quality", "cost"):
                raise ValueError(f"expected quality=W,cost=W, got {text!r}")
            parts[key.strip()] = float(value)
        return cls(**{"quality": 0.0, "cost": 0.0, **parts})


class RouteRequest(Event):
    """An application asks which model should answer a prompt."""

    request_id: Id
    prompt: str | None = Field(default=None, max_length=MAX_PROMPT)
    embedding: Vector | None = None
    preference: Preference | None = None
    candidates: list[Name] | None = Field(default=None, min_length=1, max_length=MAX_ARMS)
    budget_usd: NonNegative | None = None
    created_at: float = Field(default_factory=_now)

    @model_validator(mode="after")
    def _has_context(self) -> RouteRequest:
        if self.prompt is None and self.embedding is None:
            raise ValueError("a request needs a prompt or an embedding")
        return self


class RouteDecision(Event):
    """The routing worker's answer; also the logged action for off-policy evaluation."""

    request_id: Id
    model: Name
    propensity: Annotated[float, Field(gt=0.0, le=1.0)]
    #: The whole action distribution the model was drawn from, model -> probability.
    distribution: dict[Name, UnitInterval] = Field(max_length=MAX_ARMS)
    preference: Preference
    features: Vector
    featuriser: Name
    policy: Name
    snapshot_version: int = Field(ge=0)
    #: True while the worker routes with the prior because no snapshot was applied yet.
    cold_start: bool
    #: The chosen model's price in the registry when it was chosen (None: no price registered).
    price: Positive | None = None
    created_at: float = Field(default_factory=_now)


class ModelResponse(Event):
    """The downstream caller ran the chosen model and reports what it cost."""

    request_id: Id
    model: Name
    cost_usd: NonNegative
    prompt_tokens: int | None = Field(default=None, ge=0)
    completion_tokens: int | None = Field(default=None, ge=0)
    latency_ms: NonNegative | None = None
    status: Literal["ok", "error"] = "ok"
    created_at: float = Field(default_factory=_now)


class RewardEvent(Event):
    """An evaluator's quality score for the response to one request."""

    reward_id: Id
    request_id: Id
    quality: UnitInterval
    evaluator: Name = "default"
    created_at: float = Field(default_factory=_now)


class Outcome(Event):
    """A decision joined with its response and reward: one learning example."""

    request_id: Id
    model: Name
    features: Vector
    preference: Preference
    propensity: Annotated[float, Field(gt=0.0, le=1.0)]
    distribution: dict[Name, UnitInterval] = Field(max_length=MAX_ARMS)
    quality: UnitInterval
    cost_usd: NonNegative
    reward: float
    #: joined: every piece arrived; defaulted: the reward wait window closed first.
    completion: Literal["joined", "defaulted"]
    snapshot_version: int = Field(ge=0)
    #: The decision's price: the learner expresses the model's learned cost at this price.
    price: Positive | None = None
    decided_at: float
    created_at: float = Field(default_factory=_now)


class ModelSpec(Event):
    """One candidate model in the registry (the compacted models topic, keyed by model name).

    The newest record of a model wins. ``enabled`` False removes it from routing (what it
    learned is kept, for when it comes back). ``price`` is in any unit the operator likes
    (USD per million tokens, say), the same for every price of one model: when it changes
    from p to p', what the model learned about its cost is rescaled by p'/p at once, instead
    of waiting for new outcomes to outweigh the old ones.
    """

    model: Name
    enabled: bool = True
    price: Positive | None = None
    created_at: float = Field(default_factory=_now)


class ArraySpec(Event):
    """One array of a snapshot body: little-endian, C order, at the next offset."""

    name: Name
    dtype: Literal["<f8", "<f4", "<i8"]
    shape: list[Annotated[int, Field(ge=0)]] = Field(max_length=4)


class Snapshot(Event):
    """The header of a model snapshot; the arrays follow it in the frame (see router.snapshot).

    Snapshots are data, never pickles: a pickle read from a topic is remote code execution.
    """

    version: int = Field(ge=1)
    policy: Name
    arms: list[Name] = Field(min_length=1, max_length=MAX_ARMS)
    dim: int = Field(ge=1, le=MAX_DIM)
    #: The last outcomes offset whose outcome this state includes (-1: none).
    outcomes_offset: int = Field(ge=-1)
    n_updates: int = Field(ge=0)
    params: dict[Name, float | int | str] = Field(default_factory=dict, max_length=64)
    arrays: list[ArraySpec] = Field(max_length=64)
    created_at: float = Field(default_factory=_now)
    #: sha256 of the arrays' bytes: equal checksums mean equal learner states.
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    #: HMAC-SHA256 over the header (without this field) and the arrays, when a key is set.
    signature: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")


class DeadLetter(Event):
    """An event a worker could not use, kept with its raw bytes and the reason."""

    source_topic: str = Field(max_length=256)
    partition: int | None = None
    offset: int | None = None
    #: A machine-readable code, e.g. ``invalid_json``, ``invalid_event``, ``late_reward``.
    reason: Name
    detail: str = Field(default="", max_length=4_096)
    worker: Name
    raw_b64: str = Field(max_length=64 * 1024 * 1024)
    created_at: float = Field(default_factory=_now)

    @classmethod
    def for_record(cls, record, reason: str, detail: str, worker: str) -> DeadLetter:
        """The dead letter of a consumed Kafka record (anything with topic/partition/offset/value)."""
        return cls(
            source_topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            reason=reason,
            detail=detail[:4_096],
            worker=worker,
            raw_b64=base64.b64encode(record.value or b"").decode("ascii"),
        )


#: The event model carried by each topic, by the topic's short name.
TOPIC_EVENTS: dict[str, type[Event]] = {
    "requests": RouteRequest,
    "decisions": RouteDecision,
    "responses": ModelResponse,
    "rewards": RewardEvent,
    "outcomes": Outcome,
    "snapshots": Snapshot,
    "models": ModelSpec,
    "deadletter": DeadLetter,
}
