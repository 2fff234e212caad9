"""The featuriser interface: prompts in, unit-norm float32 vectors out.

A featuriser turns prompt text into the context vector that bandit policies
learn from. Every implementation returns rows of unit L2 norm, so that dot
products are cosines and policies see features on one scale whichever
featuriser produced them.

>>> import numpy as np
>>> class Constant(Featuriser):
...     name, dim = "constant-2", 2
...     def encode(self, prompts):
...         return l2_normalise(np.ones((len(prompts), self.dim), dtype=np.float32))
>>> Constant().encode_one("hi").astype(float).round(4).tolist()
[0.7071, 0.7071]
"""

from __future__ import annotations

import abc
from collections.abc import Sequence

import numpy as np


class Featuriser(abc.ABC):
    """Maps prompts to ``dim``-dimensional float32 rows of unit L2 norm."""

    #: Identifies the vector space; decisions and outcomes carry it, so vectors
    #: of different featurisers are never mixed in one model.
    name: str
    dim: int

    @abc.abstractmethod
    def encode(self, prompts: Sequence[str]) -> np.ndarray:
        """Encode a batch: an ``(len(prompts), dim)`` float32 array, one row per prompt."""

    def encode_one(self, prompt: str) -> np.ndarray:
        """Encode a single prompt: a ``(dim,)`` float32 vector."""
        return self.encode([prompt])[0]

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"


def l2_normalise(rows: np.ndarray) -> np.ndarray:
    """Scale each row of a 2-D array to unit L2 norm, in place; all-zero rows stay zero.

    >>> l2_normalise(np.array([[3.0, 4.0], [0.0, 0.0]])).tolist()
    [[0.6, 0.8], [0.0, 0.0]]
    """
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    # Same floor as torch.nn.functional.normalize, which sentence-transformers uses.
    rows /= np.maximum(norms, 1e-12)
    return rows
