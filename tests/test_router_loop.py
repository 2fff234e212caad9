"""The routing worker's fast paths give exactly what the straightforward ones give.

No timing here: only that each faster path computes the same thing (the hashing featuriser
against its definition, ...).
"""

from __future__ import annotations

import hashlib
import random
import re

import numpy as np
import pytest

from router.featurise import HashingFeaturiser
from router.featurise.hashing import _words

_MASK = (1 << 64) - 1


def reference_hashing(prompt: str, dim: int) -> np.ndarray:
    """The hashing featuriser by its definition, one word at a time in plain Python."""
    words = re.findall(r"\w+", prompt.lower())
    hashes = [int.from_bytes(hashlib.blake2b(w.encode("utf-8"), digest_size=8).digest(), "little")
              for w in words]
    for first, second in zip(hashes, hashes[1:]):
        x = (first * 0x9E3779B97F4A7C15 + second) & _MASK
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
        hashes.append(x ^ (x >> 31))
    counts = np.zeros(dim)
    for h in hashes:  # unigrams, then bigrams
        counts[h % dim] += -1.0 if h >> 63 else 1.0
    row = counts.astype(np.float32)[None, :]
    row /= np.maximum(np.linalg.norm(row, axis=1, keepdims=True), 1e-12)
    return row[0]


def fuzz_prompts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    alphabet = ("aZ_9 \t\n.,!?-'\"ABCxyz0123456789"
                "éßİKΣσςǅ中文\u00a0\u2028\x1c\x1f\x0b\x85")  # Kelvin sign, Unicode spaces, ...
    prompts = ["", "!?", "K", "İstanbul", "ǅemal", "a_b c__d", "\x1cA\x1fB", "Hello, world",
               "How do I sort a list in Python?", "x" * 3000]
    prompts += ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60))) for _ in range(n)]
    return prompts


def test_hashing_words_are_the_regex_words_of_the_lowercased_prompt():
    for prompt in fuzz_prompts(2000):
        expected = [w.encode("utf-8") for w in re.findall(r"\w+", prompt.lower())]
        assert _words(prompt) == expected, repr(prompt)


@pytest.mark.parametrize("dim", [384, 97, 8])
def test_hashing_equals_its_definition_alone_and_in_batches(dim):
    prompts = fuzz_prompts(300, seed=dim)
    expected = np.stack([reference_hashing(p, dim) for p in prompts])
    featuriser = HashingFeaturiser(dim)
    np.testing.assert_array_equal(featuriser.encode(prompts), expected)
    np.testing.assert_array_equal(np.stack([featuriser.encode_one(p) for p in prompts]), expected)
    np.testing.assert_array_equal(
        np.concatenate([featuriser.encode(prompts[i:i + 7]) for i in range(0, len(prompts), 7)]), expected)
