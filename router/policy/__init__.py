"""Routing policies, by name.

>>> make_policy("decomposed-ts", arms=["a", "b"], dim=8, tau=0.01).name
'decomposed-ts'
"""

from __future__ import annotations

from router.policy.base import Choice, RoutingPolicy
from router.policy.decomposed import DecomposedPolicy
from router.policy.pooled import PooledDecomposedPolicy

#: Hyperparameters chosen on a validation part of RouterBench's train split (router.bench.quality).
POOLED = {"prior": 30.0, "scale": 0.5, "intercept_prior": 0.1}

POLICIES = {
    "pooled-ucb": lambda **kw: PooledDecomposedPolicy(exploration="ucb", **{**POOLED, **kw}),
    "pooled-ts": lambda **kw: PooledDecomposedPolicy(exploration="ts", **{**POOLED, **kw}),
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


__all__ = ["POLICIES", "Choice", "DecomposedPolicy", "PooledDecomposedPolicy", "RoutingPolicy",
           "make_policy"]
