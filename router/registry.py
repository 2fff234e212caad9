"""The candidate models at run time: ROUTELOOP_MODELS, then the models topic on top.

An operator adds, removes or reprices a model by producing a :class:`~schemas.ModelSpec` to
the compacted models topic (key: the model name); ``routeloop models set|remove`` does that.
Every routing worker and the learner read the topic from its beginning and follow it, so a
change takes effect without a restart, within a fetch (about 50 ms)::

    registry = ModelRegistry(settings.models)          # every configured model, enabled
    registry.apply(ModelSpec(model="gpt-5", price=10.0))   # True: something changed
    registry.enabled                                   # [..., "gpt-5"]
    policy = registry.configure(learned_policy)        # a clone with gpt-5 (from its prior), repriced

    await publish_spec(settings, ModelSpec(model="gpt-5", enabled=False))   # remove it

A model added at run time starts from the policy's prior (the pooled mean quality and cost,
with the prior's full width), so an optimistic policy explores it at once; its decisions
show in ``routeloop_decisions{model=...}``. A removed model keeps what it learned: outcomes
of decisions made before the removal are still learned, and a model that comes back resumes.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from deploy.kafka import make_producer
from deploy.topics import iter_topic
from router.policy import RoutingPolicy
from schemas import DecodeError, ModelSpec, decode, encode
from schemas.settings import Settings


class ModelRegistry:
    """The newest spec of every model: configured ones, then the models topic's records in order."""

    def __init__(self, models: Iterable[str] = ()) -> None:
        self._specs: dict[str, ModelSpec] = {m: ModelSpec(model=m, created_at=0.0) for m in models}
        #: The first price read for each model: the price an unpriced model's learned cost is at.
        self._first_price: dict[str, float] = {}

    def apply(self, spec: ModelSpec) -> bool:
        """Take ``spec`` as its model's newest record; True if routing changes."""
        current = self._specs.get(spec.model)
        self._specs[spec.model] = spec
        if spec.price is not None:
            self._first_price.setdefault(spec.model, spec.price)
        return current is None or (current.enabled, current.price) != (spec.enabled, spec.price)

    @property
    def enabled(self) -> list[str]:
        """The models a router may choose, in the order they were first registered."""
        return [m for m, spec in self._specs.items() if spec.enabled]

    def specs(self) -> list[ModelSpec]:
        return list(self._specs.values())

    def known(self, model: str) -> bool:
        """Whether ``model`` was ever registered (removed ones too: their late outcomes count)."""
        return model in self._specs

    def price(self, model: str) -> float | None:
        spec = self._specs.get(model)
        return None if spec is None else spec.price

    def mask(self, arms: list[str]) -> np.ndarray:
        """(K,) bool: which of ``arms`` are enabled."""
        return np.array([(spec := self._specs.get(a)) is not None and spec.enabled for a in arms], dtype=bool)

    def configure(self, policy: RoutingPolicy) -> RoutingPolicy:
        """``policy`` with every enabled model as an arm and every registered price applied.

        ``policy`` itself is never changed (it may be in use): the changes go to a clone, and
        with nothing to change ``policy`` is returned as it is.
        """
        added = [m for m in self.enabled if m not in policy.arms]
        priced = {m: spec.price for m, spec in self._specs.items()
                  if spec.price is not None and (m in policy.arms or m in added)}
        if not added and not priced:
            return policy
        policy = policy.clone()
        for model in added:
            policy.add_arm(model)
        for model, price in priced.items():
            arm = policy.arms.index(model)
            # A model the learner has no price for (none of its outcomes had one yet) learned
            # its cost at the first price registered; a priced one goes through it unchanged
            # (p -> first -> price is p -> price).
            policy.set_price(arm, self._first_price[model])
            policy.set_price(arm, price)
        return policy


async def publish_spec(settings: Settings, spec: ModelSpec) -> None:
    """Produce ``spec`` to the models topic and wait for the broker's acknowledgement."""
    producer = make_producer(settings)
    await producer.start()
    try:
        await producer.send_and_wait(settings.topic("models"), encode(spec), key=spec.model.encode())
    finally:
        await producer.stop()


async def read_registry(settings: Settings) -> tuple[ModelRegistry, list[tuple[int, DecodeError]]]:
    """The registry as the models topic has it now, and the (offset, error) of records refused."""
    registry = ModelRegistry(settings.models)
    refused: list[tuple[int, DecodeError]] = []
    async for record in iter_topic(settings, "models", idle_ms=1000):
        try:
            registry.apply(decode(ModelSpec, record.value))
        except DecodeError as exc:
            refused.append((record.offset, exc))
    return registry, refused
