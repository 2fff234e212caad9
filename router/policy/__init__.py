"""Routing policies, by name.

>>> make_policy("decomposed-ts", arms=["a", "b"], dim=8, tau=0.01).name
'decomposed-ts'
"""

from __future__ import annotations

from router.policy.base import Choice, RoutingPolicy
from router.policy.decomposed import DecomposedPolicy

POLICIES = {
    "decomposed-ts": lambda **kw: DecomposedPolicy(exploration="ts", **kw),
    "decomposed-ucb": lambda **kw: DecomposedPolicy(exploration="ucb", **kw),
}


def make_policy(name: str, **kwargs) -> RoutingPolicy:
    """A fresh policy (the prior) by name; kwargs go to its constructor."""
    try:
        factory = POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; known: {', '.join(POLICIES)}") from None
    return factory(**kwargs)


__all__ = ["POLICIES", "Choice", "DecomposedPolicy", "RoutingPolicy", "make_policy"]
