"""A disk cache of a dataset's prompt embeddings.

Embedding RouterBench's 3,178 prompts with MiniLM takes minutes on two cores, and every
benchmark run needs the same matrix, so it is computed once and kept under
``.routeloop/cache/`` (git-ignored) as ``<prompts-hash>-<featuriser-name>[-<params-hash>].npy``.
The key is a blake2b hash of every prompt in order, plus the featuriser's name and, when the
featuriser URL carries parameters (``minilm://?max_tokens=128``), a hash of them: a change
of prompts, model or parameters is a new file, never a stale hit.

>>> import tempfile
>>> from router.featurise import featuriser_from_url
>>> folder = tempfile.mkdtemp()
>>> X = cached_embeddings(["a b", "c d"], "hashing://?dim=8", cache_dir=folder, progress=False)
>>> X.shape, X.dtype.name
((2, 8), 'float32')
>>> bool((cached_embeddings(["a b", "c d"], "hashing://?dim=8", cache_dir=folder, progress=False) == X).all())
True
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np

from router.featurise import Featuriser, featuriser_from_url

DEFAULT_CACHE_DIR = Path(".routeloop") / "cache"


def prompts_hash(prompts: Sequence[str]) -> str:
    """A stable hex digest of the prompts, in order (length-prefixed, so joins cannot collide)."""
    digest = hashlib.blake2b(digest_size=16)
    for prompt in prompts:
        data = prompt.encode("utf-8")
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()


def cache_path(prompts: Sequence[str], featuriser_url: str, featuriser_name: str,
               cache_dir: str | Path | None = None) -> Path:
    """Where the embedding matrix of ``prompts`` under this featuriser is kept."""
    folder = Path(cache_dir) if cache_dir is not None else DEFAULT_CACHE_DIR
    query = urlsplit(featuriser_url).query
    suffix = f"-{hashlib.blake2b(query.encode(), digest_size=4).hexdigest()}" if query else ""
    safe_name = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in featuriser_name)
    return folder / f"{prompts_hash(prompts)}-{safe_name}{suffix}.npy"


def cached_embeddings(
    prompts: Sequence[str],
    featuriser_url: str,
    cache_dir: str | Path | None = None,
    featuriser: Featuriser | None = None,
    batch: int = 256,
    progress: bool = True,
) -> np.ndarray:
    """The (n, dim) float32 embeddings of ``prompts``, from the disk cache when present.

    On a miss the prompts are encoded in batches of ``batch``, printing progress to stderr,
    and the matrix is written atomically (a temporary file, then a rename), so an
    interrupted run never leaves a truncated cache file behind.
    """
    featuriser = featuriser or featuriser_from_url(featuriser_url)
    path = cache_path(prompts, featuriser_url, featuriser.name, cache_dir)
    if path.exists():
        X = np.load(path)
        if X.shape == (len(prompts), featuriser.dim):
            if progress:
                print(f"embeddings: cache hit {path} {X.shape}", file=sys.stderr, flush=True)
            return X
    path.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    blocks = []
    for start in range(0, len(prompts), batch):
        blocks.append(featuriser.encode(list(prompts[start : start + batch])))
        if progress:
            done = min(start + batch, len(prompts))
            elapsed = time.perf_counter() - started
            eta = elapsed / done * (len(prompts) - done)
            print(f"embeddings: {featuriser.name} {done}/{len(prompts)} prompts, "
                  f"{elapsed:.0f}s elapsed, ~{eta:.0f}s left", file=sys.stderr, flush=True)
    X = np.concatenate(blocks) if blocks else np.zeros((0, featuriser.dim), dtype=np.float32)
    X = np.ascontiguousarray(X, dtype=np.float32)
    temporary = path.with_suffix(f".{os.getpid()}.tmp.npy")
    np.save(temporary, X)
    os.replace(temporary, path)
    if progress:
        print(f"embeddings: wrote {path}", file=sys.stderr, flush=True)
    return X
