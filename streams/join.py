"""The order-independent join of decisions, responses and rewards into outcomes.

Pure logic: no Faust, no I/O, no clock. Every method takes ``now`` (seconds, any
monotone clock; the feedback worker passes ``time.time()``), so the join is
deterministic given its inputs. The pending state of one or more partitions lives
in a mutable mapping the joiner is given, keyed by ``request_id``; in the feedback
worker that mapping is a changelog-backed Faust Table, so every value written is a
plain JSON-able ``dict`` and every change is a *re-assignment* of the key (values
are never mutated in place, or the changelog would miss the change).

The life of one request id::

    pending --(decision + response + reward)---------> tombstone  (Outcome "joined")
    pending --(sweep, age >= reward_wait_s)----------> tombstone  (Outcome "defaulted",
                                                                  or dead letters)
    tombstone --(sweep, closed >= tombstone_ttl ago)--> removed

A *pending* entry holds whichever of the three events arrived, as JSON dicts::

    {"t0": first_seen, "d": {decision}, "ds": source, "r": {response}, "rs": source,
     "w": {reward}, "ws": source}

A *tombstone* is small and recognises the events that come after the close::

    {"closed_at": t, "completion": "joined" | "defaulted" | "expired_no_reward"
                                   | "expired_no_response" | "orphan",
     "had": "drw" (the pieces the entry held), "reward_id": id or None}

``source`` is an opaque JSON-able value the caller attaches to an event (the feedback
worker passes ``[topic, partition, offset]``); it is stored with the event and handed
back with every reject of that event, so a dead letter can name where its event came
from even when the sweep rejects it long after it arrived.

Rules (the first event of each kind wins; every event the joiner cannot use is
rejected exactly once, with one of these reason codes):

=======================  =====================================================
``duplicate_decision``   a second decision for a request (pending or closed)
``duplicate_response``   a second response for a request (pending or closed)
``duplicate_reward``     a second reward while pending, whatever its reward id
                         (the first reward is the one applied: an evaluator
                         that reports twice does not get two votes); or a
                         reward with the applied reward id after the close
``late_reward``          a reward with a new reward id after the entry closed
``late_response``        a response after its entry closed without one
``late_decision``        a decision after its entry closed as an orphan
``model_mismatch``       a response for another model than the decision's
                         (the decision wins, whichever arrived first)
``expired_no_response``  the window closed on a decision without a response
                         (the decision and any reward held are rejected)
``expired_no_reward``    the window closed on decision + response without a
                         reward while ``default_quality`` is None (both are
                         rejected; no outcome)
``orphan_response``      the window closed on a response whose decision
``orphan_reward``        (or reward) never came
=======================  =====================================================

The window is measured from the entry's first event, whatever its kind. Tombstones
are removed ``tombstone_ttl`` seconds after the close (default ten windows), so the
state is bounded by the traffic of ``reward_wait_s + tombstone_ttl`` seconds; an
event for a request whose tombstone is gone starts a new entry, which then expires
as an orphan (or, for a decision, as ``expired_no_response``).

>>> from schemas.events import RewardEvent
>>> joiner = RewardJoiner({}, reward_wait_s=60.0, tau=0.01, default_quality=0.0)
>>> result = joiner.on_reward(RewardEvent(reward_id="w1", request_id="q1", quality=1.0), 0.0)
>>> result.outcomes, result.rejects
([], [])
>>> [r.reason for r in joiner.expire(61.0).rejects]
['orphan_reward']
>>> len(joiner.state), len(joiner.expire(61.0 + 600.0).rejects), len(joiner.state)
(1, 0, 0)
"""

from __future__ import annotations

import dataclasses
from collections.abc import MutableMapping
from typing import Any, NamedTuple

from schemas.events import Event, ModelResponse, Outcome, RewardEvent, RouteDecision
from schemas.reward import reward as barp_reward

__all__ = ["REASONS", "JoinCounters", "JoinResult", "Reject", "RewardJoiner"]

#: Every reason code the joiner rejects with.
REASONS = (
    "duplicate_decision",
    "duplicate_response",
    "duplicate_reward",
    "late_reward",
    "late_response",
    "late_decision",
    "model_mismatch",
    "expired_no_response",
    "expired_no_reward",
    "orphan_response",
    "orphan_reward",
)

_DUPLICATES = {"duplicate_decision", "duplicate_response", "duplicate_reward"}
_LATE = {"late_reward", "late_response", "late_decision"}
_ORPHANS = {"orphan_response", "orphan_reward"}


class Reject(NamedTuple):
    """An event the joiner could not use: dead-letter it with ``reason``."""

    reason: str
    detail: str
    event: Event
    #: The opaque source the caller attached to the event (None if none was given).
    source: Any = None


@dataclasses.dataclass
class JoinResult:
    """What one joiner call produced: outcomes to emit and events to dead-letter."""

    outcomes: list[Outcome] = dataclasses.field(default_factory=list)
    rejects: list[Reject] = dataclasses.field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.outcomes or self.rejects)


@dataclasses.dataclass
class JoinCounters:
    """Running totals, for metrics (per joiner, not persisted)."""

    decisions: int = 0
    responses: int = 0
    rewards: int = 0
    #: Outcomes emitted with every piece present.
    joined: int = 0
    #: Outcomes emitted with the default quality because the window closed first.
    defaulted: int = 0
    #: Entries closed with decision + response but no reward, dropped (default_quality None).
    dropped: int = 0
    #: Entries closed with a decision but no response.
    expired_no_response: int = 0
    #: Orphaned responses and rewards (their decision never came).
    orphans: int = 0
    #: Duplicate decisions, responses and rewards.
    duplicates: int = 0
    #: Rewards, responses and decisions that arrived after their entry closed.
    late: int = 0
    #: Responses for another model than their decision's.
    mismatches: int = 0
    #: Tombstones removed by the sweep.
    tombstones_removed: int = 0
    #: Rejects by reason code.
    rejects: dict[str, int] = dataclasses.field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _is_tombstone(entry: dict[str, Any]) -> bool:
    return "closed_at" in entry


class RewardJoiner:
    """Joins decisions, responses and rewards keyed by request id, in any order.

    ``state`` is the mapping that holds the pending entries and tombstones (a plain
    ``dict`` in tests, a Faust Table in the worker). ``tombstone_ttl`` defaults to
    ten reward windows.
    """

    def __init__(
        self,
        state: MutableMapping[str, dict[str, Any]],
        *,
        reward_wait_s: float,
        tau: float,
        default_quality: float | None = 0.0,
        tombstone_ttl: float | None = None,
    ) -> None:
        if not reward_wait_s > 0:
            raise ValueError("reward_wait_s must be positive")
        if not tau > 0:
            raise ValueError("tau must be positive")
        if default_quality is not None and not 0.0 <= default_quality <= 1.0:
            raise ValueError("default_quality must be in [0, 1] or None")
        self.state = state
        self.reward_wait_s = float(reward_wait_s)
        self.tau = float(tau)
        self.default_quality = default_quality
        self.tombstone_ttl = 10.0 * self.reward_wait_s if tombstone_ttl is None else float(tombstone_ttl)
        if not self.tombstone_ttl >= 0:
            raise ValueError("tombstone_ttl must be non-negative")
        self.counters = JoinCounters()

    @classmethod
    def from_settings(
        cls,
        state: MutableMapping[str, dict[str, Any]],
        settings: Any,
        *,
        tombstone_ttl: float | None = None,
    ) -> RewardJoiner:
        """A joiner configured by :class:`schemas.settings.Settings`."""
        return cls(
            state,
            reward_wait_s=settings.reward_wait_s,
            tau=settings.tau,
            default_quality=settings.default_quality,
            tombstone_ttl=tombstone_ttl,
        )

    # -- the three inputs --------------------------------------------------------------

    def on_decision(self, decision: RouteDecision, now: float, source: Any = None) -> JoinResult:
        """A routing decision arrived."""
        self.counters.decisions += 1
        result = JoinResult()
        rid = decision.request_id
        entry = self.state.get(rid)
        if entry is not None and _is_tombstone(entry):
            if "d" in entry["had"]:
                self._reject(result, "duplicate_decision", "the request already closed", decision, source)
            else:
                self._reject(
                    result, "late_decision", f"the request closed as {entry['completion']}", decision, source
                )
            return result
        entry = {"t0": now} if entry is None else dict(entry)
        if "d" in entry:
            self._reject(result, "duplicate_decision", "a decision is already pending", decision, source)
            return result
        entry["d"] = decision.model_dump(mode="json")
        entry["ds"] = source
        if "r" in entry and entry["r"]["model"] != decision.model:
            response = ModelResponse.model_validate(entry["r"])
            self._reject(
                result,
                "model_mismatch",
                f"response for {response.model!r}, decision chose {decision.model!r}",
                response,
                entry.get("rs"),
            )
            del entry["r"]
            entry.pop("rs", None)
        self._store_or_join(rid, entry, now, result)
        return result

    def on_response(self, response: ModelResponse, now: float, source: Any = None) -> JoinResult:
        """A downstream caller reported the chosen model's response and cost."""
        self.counters.responses += 1
        result = JoinResult()
        rid = response.request_id
        entry = self.state.get(rid)
        if entry is not None and _is_tombstone(entry):
            if "r" in entry["had"]:
                self._reject(result, "duplicate_response", "the request already closed", response, source)
            else:
                self._reject(
                    result, "late_response", f"the request closed as {entry['completion']}", response, source
                )
            return result
        entry = {"t0": now} if entry is None else dict(entry)
        if "r" in entry:
            self._reject(result, "duplicate_response", "a response is already pending", response, source)
            return result
        if "d" in entry and entry["d"]["model"] != response.model:
            self._reject(
                result,
                "model_mismatch",
                f"response for {response.model!r}, decision chose {entry['d']['model']!r}",
                response,
                source,
            )
            return result
        entry["r"] = response.model_dump(mode="json")
        entry["rs"] = source
        self._store_or_join(rid, entry, now, result)
        return result

    def on_reward(self, reward: RewardEvent, now: float, source: Any = None) -> JoinResult:
        """An evaluator reported a quality score."""
        self.counters.rewards += 1
        result = JoinResult()
        rid = reward.request_id
        entry = self.state.get(rid)
        if entry is not None and _is_tombstone(entry):
            if entry.get("reward_id") == reward.reward_id:
                self._reject(result, "duplicate_reward", "this reward id was already received", reward, source)
            else:
                self._reject(
                    result, "late_reward", f"the request closed as {entry['completion']}", reward, source
                )
            return result
        entry = {"t0": now} if entry is None else dict(entry)
        if "w" in entry:
            first = entry["w"]["reward_id"]
            detail = (
                "this reward id is already pending"
                if first == reward.reward_id
                else f"reward {first!r} is already pending for this request; the first reward wins"
            )
            self._reject(result, "duplicate_reward", detail, reward, source)
            return result
        entry["w"] = reward.model_dump(mode="json")
        entry["ws"] = source
        self._store_or_join(rid, entry, now, result)
        return result

    # -- the sweep -----------------------------------------------------------------------

    def expire(self, now: float) -> JoinResult:
        """Close the entries older than the reward window and remove old tombstones."""
        result = JoinResult()
        closing: list[tuple[float, str, dict[str, Any]]] = []
        removing: list[str] = []
        for rid, entry in list(self.state.items()):
            if _is_tombstone(entry):
                if now - entry["closed_at"] >= self.tombstone_ttl:
                    removing.append(rid)
            elif now - entry["t0"] >= self.reward_wait_s:
                closing.append((entry["t0"], rid, entry))
        closing.sort(key=lambda item: (item[0], item[1]))
        for _, rid, entry in closing:
            self._close(rid, entry, now, result)
        for rid in removing:
            del self.state[rid]
            self.counters.tombstones_removed += 1
        return result

    def pending(self) -> int:
        """The number of open entries (tombstones excluded)."""
        return sum(1 for entry in self.state.values() if not _is_tombstone(entry))

    # -- internals ----------------------------------------------------------------------

    def _reject(self, result: JoinResult, reason: str, detail: str, event: Event, source: Any) -> None:
        result.rejects.append(Reject(reason, detail, event, source))
        c = self.counters
        c.rejects[reason] = c.rejects.get(reason, 0) + 1
        if reason in _DUPLICATES:
            c.duplicates += 1
        elif reason in _LATE:
            c.late += 1
        elif reason in _ORPHANS:
            c.orphans += 1
        elif reason == "model_mismatch":
            c.mismatches += 1

    def _store_or_join(self, rid: str, entry: dict[str, Any], now: float, result: JoinResult) -> None:
        if "d" in entry and "r" in entry and "w" in entry:
            decision = RouteDecision.model_validate(entry["d"])
            response = ModelResponse.model_validate(entry["r"])
            reward = RewardEvent.model_validate(entry["w"])
            result.outcomes.append(self._outcome(decision, response, reward.quality, "joined", now))
            self.counters.joined += 1
            self.state[rid] = self._tombstone(entry, "joined", now)
        else:
            self.state[rid] = entry

    def _close(self, rid: str, entry: dict[str, Any], now: float, result: JoinResult) -> None:
        decision = RouteDecision.model_validate(entry["d"]) if "d" in entry else None
        response = ModelResponse.model_validate(entry["r"]) if "r" in entry else None
        reward = RewardEvent.model_validate(entry["w"]) if "w" in entry else None
        window = f"no {{}} within {self.reward_wait_s:g} s"
        if decision is not None and response is not None:
            # A reward would have completed the join, so none is held here.
            if self.default_quality is not None:
                result.outcomes.append(
                    self._outcome(decision, response, self.default_quality, "defaulted", now)
                )
                self.counters.defaulted += 1
                completion = "defaulted"
            else:
                detail = window.format("reward") + "; outcomes without a reward are dropped"
                self._reject(result, "expired_no_reward", detail, decision, entry.get("ds"))
                self._reject(result, "expired_no_reward", detail, response, entry.get("rs"))
                self.counters.dropped += 1
                completion = "expired_no_reward"
        elif decision is not None:
            detail = window.format("response")
            self._reject(result, "expired_no_response", detail, decision, entry.get("ds"))
            if reward is not None:
                self._reject(result, "expired_no_response", detail, reward, entry.get("ws"))
            self.counters.expired_no_response += 1
            completion = "expired_no_response"
        else:
            detail = window.format("decision")
            if response is not None:
                self._reject(result, "orphan_response", detail, response, entry.get("rs"))
            if reward is not None:
                self._reject(result, "orphan_reward", detail, reward, entry.get("ws"))
            completion = "orphan"
        self.state[rid] = self._tombstone(entry, completion, now)

    @staticmethod
    def _tombstone(entry: dict[str, Any], completion: str, now: float) -> dict[str, Any]:
        return {
            "closed_at": now,
            "completion": completion,
            "had": "".join(k for k in "drw" if k in entry),
            "reward_id": entry["w"]["reward_id"] if "w" in entry else None,
        }

    def _outcome(
        self,
        decision: RouteDecision,
        response: ModelResponse,
        quality: float,
        completion: str,
        now: float,
    ) -> Outcome:
        return Outcome(
            request_id=decision.request_id,
            model=decision.model,
            features=decision.features,
            preference=decision.preference,
            propensity=decision.propensity,
            distribution=decision.distribution,
            quality=quality,
            cost_usd=response.cost_usd,
            reward=barp_reward(quality, response.cost_usd, decision.preference.quality, self.tau),
            completion=completion,
            snapshot_version=decision.snapshot_version,
            price=decision.price,
            decided_at=decision.created_at,
            created_at=now,
        )
