"""A light featuriser: signed feature hashing of word unigrams and bigrams.

It needs no model, costs tens of microseconds a prompt and gives the same
vector for the same prompt in every process and on every machine (the hash is
blake2b, not Python's salted ``hash()``), so it serves tests, throughput
benchmarks and users without the MiniLM packages.

>>> featuriser = HashingFeaturiser(dim=64)
>>> featuriser.name
'hashing-64'
>>> vectors = featuriser.encode(["Sort a list in Python", "sort a python list"])
>>> vectors.shape, vectors.dtype.name
((2, 64), 'float32')
>>> bool(abs(float(vectors[0] @ vectors[0]) - 1.0) < 1e-6)
True
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence

import numpy as np

from .base import Featuriser, l2_normalise

_WORD = re.compile(r"\w+")
# For an ASCII prompt, \w is [A-Za-z0-9_]: one bytes.translate that lowercases A-Z and maps
# every other non-word byte to a space, then a split, gives exactly the words (as bytes)
# that _WORD finds in the lowercased prompt, without a match object or a str per word, and
# several times faster than str.translate, which looks every character up in a dict.
_ASCII_WORDS = bytes(
    (c + 32 if 65 <= c <= 90 else c) if (chr(c).isalnum() or c == 95) else 32 for c in range(128)
) + bytes([32]) * 128


def _words(prompt: str) -> list[bytes]:
    """The UTF-8 bytes of the lowercased words of a prompt: ``_WORD.findall(prompt.lower())``."""
    if prompt.isascii():
        return prompt.encode("ascii").translate(_ASCII_WORDS).split()
    return [word.encode("utf-8") for word in _WORD.findall(prompt.lower())]

# splitmix64 constants: they spread a pair of word hashes into a bigram hash.
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31, _S63 = np.uint64(30), np.uint64(27), np.uint64(31), np.uint64(63)


class _WordHashes(dict):
    """word (UTF-8 bytes) -> its stable 64-bit hash as 8 little-endian bytes, memoised:
    prompts reuse a small vocabulary, and a dict hit is ten times cheaper than a blake2b
    call. Bytes, not ints: a prompt's hashes join into one buffer that numpy reads as is."""

    limit = 1 << 18

    def __missing__(self, word: bytes) -> bytes:
        if len(self) >= self.limit:
            self.clear()  # bounded memory; hashes are recomputed identically
        digest = self[word] = hashlib.blake2b(word, digest_size=8).digest()
        return digest


_word_hashes = _WordHashes()


def _bigram_hashes(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Order-sensitive 64-bit hashes of word pairs (the splitmix64 finaliser)."""
    x = first * _GOLDEN
    x += second
    x ^= x >> _S30
    x *= _MIX1
    x ^= x >> _S27
    x *= _MIX2
    x ^= x >> _S31
    return x


class HashingFeaturiser(Featuriser):
    """Lowercased word unigrams and bigrams, feature-hashed into ``dim`` signed
    buckets (the top hash bit picks the sign, so collisions cancel on average
    instead of piling up), then L2-normalised. A prompt without a single word
    character maps to the zero vector."""

    #: Cheap enough to run on an event loop (the routing worker then routes there).
    cheap = True

    def __init__(self, dim: int = 384) -> None:
        if dim < 1:
            raise ValueError(f"dim must be positive, not {dim}")
        self.dim = dim
        self.name = f"hashing-{dim}"

    def encode(self, prompts: Sequence[str]) -> np.ndarray:
        """Encode a batch in one pass: every prompt's hashes go into a single
        ``bincount`` over ``(row, bucket)`` cells.

        >>> HashingFeaturiser(dim=8).encode(["", "!?"]).tolist()
        [[0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]]
        """
        digests: list[bytes] = []
        words_per_prompt = []
        lookup = _word_hashes.__getitem__
        for prompt in prompts:
            words = _words(prompt)
            digests.extend(map(lookup, words))
            words_per_prompt.append(len(words))
        unigrams = np.frombuffer(b"".join(digests), dtype="<u8")
        if len(prompts) == 1:  # one prompt: every pair of neighbours is a bigram
            bigrams = _bigram_hashes(unigrams[:-1], unigrams[1:])
            hashes = np.concatenate([unigrams, bigrams])
            cells = (hashes % np.uint64(self.dim)).astype(np.intp)
        else:
            rows = np.repeat(np.arange(len(prompts)), words_per_prompt)
            # A bigram joins neighbours of one prompt, never the last word of one
            # prompt and the first of the next.
            within_prompt = rows[1:] == rows[:-1]
            bigrams = _bigram_hashes(unigrams[:-1][within_prompt], unigrams[1:][within_prompt])
            hashes = np.concatenate([unigrams, bigrams])
            rows = np.concatenate([rows, rows[1:][within_prompt]])
            cells = rows * self.dim + (hashes % np.uint64(self.dim)).astype(np.intp)
        signs = np.where(hashes >> _S63, -1.0, 1.0)
        counts = np.bincount(cells, weights=signs, minlength=len(prompts) * self.dim)
        return l2_normalise(counts.reshape(len(prompts), self.dim).astype(np.float32))
