"""Loading routing datasets: RouterBench's layout, JSONL, the hash split and the synthetic world."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from router.datasets import RoutingDataset, load_dataset, stable_split, synthetic_dataset, write_jsonl

ROUTERBENCH = Path(__file__).resolve().parents[2] / "shared" / "data" / "routerbench-0shot"
needs_routerbench = pytest.mark.skipif(not ROUTERBENCH.is_dir(), reason="RouterBench data not present")

README_MODELS = {
    "gpt-4-1106-preview", "gpt-3.5-turbo-1106", "claude-v1", "claude-v2", "claude-instant-v1",
    "meta/llama-2-70b-chat", "meta/code-llama-instruct-34b-chat", "mistralai/mixtral-8x7b-chat",
    "mistralai/mistral-7b-chat", "zero-one-ai/Yi-34B-Chat", "WizardLM/WizardLM-13B-V1.2",
}  # fmt: skip


@pytest.fixture(scope="module")
def routerbench() -> RoutingDataset:
    return load_dataset(ROUTERBENCH)


def read_rows(path: Path) -> list[dict[str, str]]:
    """A CSV file's rows with the standard library, independent of the loader under test."""
    csv.field_size_limit(1 << 30)
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@needs_routerbench
def test_routerbench_folder_counts_per_split_and_task(routerbench):
    counted = {(f.stem.rsplit("_", 1)[1], read_rows(f)[0]["eval_name"]): len(read_rows(f)) for f in ROUTERBENCH.glob("*.csv")}
    loaded = {(s, t): int(((routerbench.split == s) & (routerbench.tasks == t)).sum()) for s, t in counted}
    assert loaded == counted
    assert counted == {
        ("train", "arc-challenge"): 1039, ("train", "winogrande"): 887, ("train", "mbpp"): 299,
        ("test", "arc-challenge"): 445, ("test", "winogrande"): 380, ("test", "mbpp"): 128,
    }  # fmt: skip
    # Every prompt has at least one model's outcome, so none is dropped.
    assert routerbench.dropped == 0
    assert (len(routerbench.train()), len(routerbench.test()), len(routerbench)) == (2225, 953, 3178)
    assert routerbench.name == "routerbench-0shot" and not routerbench.synthetic


@needs_routerbench
def test_routerbench_models_and_missing_cells(routerbench):
    assert set(routerbench.models) == README_MODELS and len(routerbench.models) == 11
    assert routerbench.quality.dtype == np.float64 and routerbench.cost.dtype == np.float64
    # Empty score cells are NaN; costs are recorded everywhere, so availability follows quality.
    assert int(np.isnan(routerbench.train().quality).sum()) == 92
    assert int(np.isnan(routerbench.test().quality).sum()) == 62
    assert np.isfinite(routerbench.cost).all()
    assert np.array_equal(routerbench.available, np.isfinite(routerbench.quality))


@needs_routerbench
def test_routerbench_single_file_matches_csv_cells_and_parses_prompts():
    path = ROUTERBENCH / "arc_challenge_test.csv"
    rows = read_rows(path)
    dataset = load_dataset(path)
    assert set(dataset.split.tolist()) == {"test"}  # from the file name
    assert dataset.ids.tolist() == [r["sample_id"] for r in rows]
    for k, model in enumerate(dataset.models):
        expected = [float(r[model]) if r[model] else np.nan for r in rows]
        np.testing.assert_array_equal(dataset.quality[:, k], expected)
        np.testing.assert_array_equal(dataset.cost[:, k], [float(r[model + "|total_cost"]) for r in rows])
    # The prompt cell is a Python list literal; its strings are joined with real newlines.
    assert dataset.prompts[0].startswith("George wants to warm his hands")
    assert "\n" in dataset.prompts[0] and "\\n" not in dataset.prompts[0] and not dataset.prompts[0].startswith("[")


def routerbench_frame(quality=(1.0, 0.0), cost=(0.002, 0.0001), prompt="['Say hi']") -> pd.DataFrame:
    """A minimal two-model RouterBench frame: one prompt, like the real files' columns."""
    return pd.DataFrame(
        {
            "Unnamed: 0": [7],
            "sample_id": ["task.0"],
            "prompt": [prompt],
            "eval_name": ["task"],
            "big": [quality[0]],
            "small": [quality[1]],
            "big|model_response": ["['hi']"],
            "small|model_response": ["['hello']"],
            "big|total_cost": [cost[0]],
            "small|total_cost": [cost[1]],
            "oracle_model_to_route_to": ["small"],
        }
    )


def test_csv_pickle_and_parquet_load_the_same(tmp_path):
    frame = pd.concat([routerbench_frame(), routerbench_frame(quality=(np.nan, 1.0))], ignore_index=True)
    frame["sample_id"] = ["task.0", "task.1"]
    frame.to_csv(tmp_path / "bench.csv", index=False)
    frame.to_pickle(tmp_path / "bench.pkl")
    frame.to_parquet(tmp_path / "bench.parquet")
    loaded = [load_dataset(tmp_path / name) for name in ("bench.csv", "bench.pkl", "bench.parquet")]
    for dataset in loaded:
        assert dataset.models == ("big", "small")
        assert dataset.prompts == ["Say hi", "Say hi"]
        np.testing.assert_array_equal(dataset.quality, [[1.0, 0.0], [np.nan, 1.0]])
        np.testing.assert_array_equal(dataset.cost, [[0.002, 0.0001], [0.002, 0.0001]])
        # No split column and no _train/_test in the name: the stable hash decides.
        assert dataset.split.tolist() == stable_split(["task.0", "task.1"]).tolist()


@pytest.mark.parametrize("name", ["bench.pkl", "bench.parquet"])
def test_prompt_stored_as_a_list_is_joined(tmp_path, name):
    frame = routerbench_frame()
    frame["prompt"] = [["first part", "second part"]]
    getattr(frame, "to_pickle" if name.endswith(".pkl") else "to_parquet")(tmp_path / name)
    assert load_dataset(tmp_path / name).prompts == ["first part\nsecond part"]


def test_split_column_wins_and_raw_prompt_is_kept(tmp_path):
    frame = routerbench_frame(prompt="plain text, not a list")
    frame["split"] = ["test"]
    frame.to_csv(tmp_path / "bench_train.csv", index=False)
    dataset = load_dataset(tmp_path / "bench_train.csv")
    assert dataset.split.tolist() == ["test"] and dataset.prompts == ["plain text, not a list"]


@pytest.mark.parametrize(
    ("quality", "cost", "column"),
    [((1.5, 0.0), (0.002, 0.0001), "'big'"), ((1.0, 0.0), (0.002, -0.0001), "'small|total_cost'")],
)
def test_out_of_range_cells_are_rejected_naming_the_cell(tmp_path, quality, cost, column):
    path = tmp_path / "bad.csv"
    routerbench_frame(quality=quality, cost=cost).to_csv(path, index=False)
    with pytest.raises(ValueError, match=rf"bad\.csv: data row 0, column {column}"):
        load_dataset(path)


def test_non_numeric_cell_is_rejected(tmp_path):
    frame = routerbench_frame()
    frame["big"] = ["yes"]
    frame.to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(ValueError, match=r"column 'big': 'yes' is not a number"):
        load_dataset(tmp_path / "bad.csv")


def test_prompt_with_no_outcome_is_dropped_and_counted(tmp_path):
    frame = pd.concat([routerbench_frame(), routerbench_frame(quality=(np.nan, np.nan))], ignore_index=True)
    frame["sample_id"] = ["kept", "dropped"]
    frame.to_csv(tmp_path / "bench.csv", index=False)
    dataset = load_dataset(tmp_path / "bench.csv")
    assert dataset.ids.tolist() == ["kept"] and dataset.dropped == 1


def test_jsonl_layout_round_trips(tmp_path):
    records = [
        {"id": "q1", "prompt": "2+2?", "task": "math", "split": "test",
         "quality": {"a": 1.0, "b": 0.0}, "cost_usd": {"a": 0.003, "b": 0.0001}},
        {"id": "q2", "prompt": "def f():", "task": "code",
         "quality": {"b": 0.5}, "cost_usd": {"a": 0.002, "b": 0.0002}},
    ]  # fmt: skip
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + "\n")
    dataset = load_dataset(path)
    assert (dataset.name, dataset.models, dataset.ids.tolist()) == ("prompts", ("a", "b"), ["q1", "q2"])
    assert dataset.tasks.tolist() == ["math", "code"]
    assert dataset.split.tolist() == ["test", stable_split(["q2"])[0]]
    np.testing.assert_array_equal(dataset.quality, [[1.0, 0.0], [np.nan, 0.5]])
    np.testing.assert_array_equal(dataset.cost, [[0.003, 0.0001], [0.002, 0.0002]])

    write_jsonl(dataset, tmp_path / "again.jsonl")
    again = load_dataset(tmp_path / "again.jsonl")
    assert again.ids.tolist() == dataset.ids.tolist() and again.prompts == dataset.prompts
    assert again.split.tolist() == dataset.split.tolist() and again.models == dataset.models
    np.testing.assert_array_equal(again.quality, dataset.quality)
    np.testing.assert_array_equal(again.cost, dataset.cost)


def test_jsonl_bad_quality_names_the_line(tmp_path):
    path = tmp_path / "prompts.jsonl"
    good = {"id": "q1", "prompt": "p", "task": "t", "quality": {"a": 1.0}, "cost_usd": {"a": 0.001}}
    path.write_text(json.dumps(good) + "\n" + json.dumps({**good, "id": "q2", "quality": {"a": 2.0}}) + "\n")
    with pytest.raises(ValueError, match=r"prompts\.jsonl: line 2, quality\['a'\]: quality must be in \[0, 1\]"):
        load_dataset(path)


def test_hash_split_is_stable_and_about_seventy_percent():
    ids = [f"prompt-{i}" for i in range(20_000)]
    split = stable_split(ids)
    assert np.array_equal(split, stable_split(list(reversed(ids)))[::-1])
    assert 0.69 < np.mean(split == "train") < 0.71
    # Pinned values: a change of hash function would silently move prompts between splits.
    assert stable_split(["a", "d", "q1", "q2"]).tolist() == ["train", "test", "test", "train"]


def test_synthetic_world_is_deterministic_and_worth_routing():
    world = synthetic_dataset(n=3000, n_models=5, seed=0)
    assert (len(world), world.models, world.name, world.synthetic) == (3000, tuple(f"synthetic-model-{m}" for m in range(5)), "synthetic", True)
    assert world.available.all() and set(np.unique(world.quality)) == {0.0, 1.0}
    assert 0.67 < len(world.train()) / len(world) < 0.73
    again = synthetic_dataset(n=3000, n_models=5, seed=0)
    assert again.prompts == world.prompts and np.array_equal(again.quality, world.quality)
    assert not np.array_equal(synthetic_dataset(n=3000, seed=1).quality, world.quality)

    mean_cost = world.cost.mean(axis=0)
    assert 50 < mean_cost.max() / mean_cost.min() < 80  # about $0.00008 to $0.005
    # The best model differs by task, and the task shows in the words of the prompt.
    best_by_task = {t: int(world.quality[world.tasks == t].mean(axis=0).argmax()) for t in np.unique(world.tasks)}
    assert len(set(best_by_task.values())) >= 3
    words_by_task = {t: {w for p, pt in zip(world.prompts, world.tasks) if pt == t for w in p.lower().split()} for t in best_by_task}
    shared_by_all = set.intersection(*words_by_task.values())
    assert all(len(words - shared_by_all) >= 8 for words in words_by_task.values())


def test_unknown_layout_is_rejected(tmp_path):
    (tmp_path / "data.txt").write_text("x")
    with pytest.raises(ValueError, match="unknown dataset layout"):
        load_dataset(tmp_path / "data.txt")
