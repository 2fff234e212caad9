"""Routing datasets: prompts with every candidate model's recorded quality and cost.

A :class:`RoutingDataset` is full-information: for each prompt it holds the quality in
[0, 1] and the USD cost of *every* candidate model (NaN where a model has no record). The
replay reveals only the chosen model's outcome to the learner; offline evaluation
(:mod:`router.evaluation`) uses all of it.

Layouts :func:`load_dataset` reads, decided by the path:

- a folder of RouterBench ``*_train.csv`` / ``*_test.csv`` files (the split comes from the
  file name, the task from ``eval_name``);
- one RouterBench file: ``.csv``, ``.pkl`` / ``.pickle`` (a pandas DataFrame, as RouterBench
  publishes ``routerbench_0shot.pkl``) or ``.parquet``;
- ``.jsonl``, one prompt per line::

    {"id": "q1", "prompt": "...", "task": "math", "split": "train",
     "quality": {"model-a": 1.0, "model-b": 0.0}, "cost_usd": {"model-a": 0.002, "model-b": 0.0001}}

  ``split`` is optional.

Where no split is recorded, :func:`stable_split` derives it from a hash of the id, so it is
the same on every machine and in every run.

>>> world = synthetic_dataset(n=200, seed=1)
>>> len(world), len(world.models), world.synthetic
(200, 5, True)
>>> len(world.train()) + len(world.test()) == len(world)
True
"""

from __future__ import annotations

import ast
import hashlib
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

SPLITS = ("train", "test")
TRAIN_FRACTION = 0.7

# RouterBench's columns: besides these, a score column per model named after the model,
# "<model>|total_cost", "<model>|model_response" (large, never read) and
# "oracle_model_to_route_to".
ROUTERBENCH_ID, ROUTERBENCH_PROMPT, ROUTERBENCH_TASK = "sample_id", "prompt", "eval_name"
COST_SUFFIX = "|total_cost"
SPLIT_COLUMN = "split"


@dataclass(frozen=True, eq=False)
class RoutingDataset:
    """Prompts with each candidate model's quality and cost; row i of every field is prompt i.

    ``quality`` and ``cost`` are (n, K) float64 arrays, column k for ``models[k]``, NaN where
    that model has no recorded outcome; a model is *available* on a prompt when both are
    finite. ``dropped`` counts the source's prompts the loader discarded because no model was
    available on them (subsets keep the count of the source they came from).

    >>> world = synthetic_dataset(n=10, n_models=3)
    >>> world.quality.shape, bool(world.available.all())
    ((10, 3), True)
    >>> set(world.test().split.tolist())
    {'test'}
    """

    name: str
    models: tuple[str, ...]
    ids: np.ndarray
    prompts: list[str]
    tasks: np.ndarray
    split: np.ndarray
    quality: np.ndarray
    cost: np.ndarray
    synthetic: bool = False
    dropped: int = 0

    def __post_init__(self) -> None:
        n, k = len(self.ids), len(self.models)
        for field_name in ("prompts", "tasks", "split"):
            if len(getattr(self, field_name)) != n:
                raise ValueError(f"{field_name} has {len(getattr(self, field_name))} rows, ids {n}")
        for field_name in ("quality", "cost"):
            if getattr(self, field_name).shape != (n, k):
                raise ValueError(f"{field_name} has shape {getattr(self, field_name).shape}, expected {(n, k)}")
        unknown = set(np.unique(self.split).tolist()) - set(SPLITS)
        if unknown:
            raise ValueError(f"split values must be 'train' or 'test', got {sorted(unknown)}")

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def available(self) -> np.ndarray:
        """(n, K) bool: the model has a recorded quality and cost for the prompt."""
        return np.isfinite(self.quality) & np.isfinite(self.cost)

    def subset(self, rows: np.ndarray) -> RoutingDataset:
        """The prompts selected by a boolean mask or an index array, in that order."""
        rows = np.asarray(rows)
        return replace(
            self,
            ids=self.ids[rows],
            prompts=[self.prompts[i] for i in np.arange(len(self))[rows]],
            tasks=self.tasks[rows],
            split=self.split[rows],
            quality=self.quality[rows],
            cost=self.cost[rows],
        )

    def train(self) -> RoutingDataset:
        return self.subset(self.split == "train")

    def test(self) -> RoutingDataset:
        return self.subset(self.split == "test")


def stable_split(ids: Iterable[str], train_fraction: float = TRAIN_FRACTION) -> np.ndarray:
    """"train" or "test" per id from a blake2b hash: the same on every machine and run.

    (Python's ``hash()`` is salted per process, so it cannot be used here.)

    >>> stable_split(["a", "d", "a"]).tolist()
    ['train', 'test', 'train']
    """
    fractions = [
        int.from_bytes(hashlib.blake2b(str(i).encode(), digest_size=8).digest(), "big") / 2**64 for i in ids
    ]
    return np.where(np.asarray(fractions) < train_fraction, "train", "test")


def load_dataset(path: str | Path) -> RoutingDataset:
    """Read a routing dataset in any layout this module knows (see the module docstring).

    Raises ValueError, naming file, row and column, for a quality outside [0, 1], a negative
    or non-finite cost, or a cell that is not a number. Prompts with no available model are
    dropped and counted in ``dropped``.

    Pickle runs code while it loads: only load ``.pkl`` files you trust.

    >>> import tempfile
    >>> folder = Path(tempfile.mkdtemp())
    >>> write_jsonl(synthetic_dataset(n=20), folder / "world.jsonl")
    >>> load_dataset(folder / "world.jsonl").name, len(load_dataset(folder / "world.jsonl"))
    ('world', 20)
    """
    path = Path(path)
    if path.is_dir():
        return _load_routerbench_folder(path)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _load_jsonl(path)
    if suffix in (".csv", ".pkl", ".pickle", ".parquet"):
        return _assemble(path.stem, [_read_routerbench_file(path)])
    raise ValueError(f"{path}: unknown dataset layout (expected a folder, .csv, .pkl, .parquet or .jsonl)")


def write_jsonl(dataset: RoutingDataset, path: str | Path) -> None:
    """Write ``dataset`` in the JSONL layout, split included; missing outcomes are left out.

    ``load_dataset`` reads the file back into the same prompts, outcomes and splits.
    """
    with Path(path).open("w", encoding="utf-8") as out:
        for i in range(len(dataset)):
            record = {
                "id": str(dataset.ids[i]),
                "prompt": dataset.prompts[i],
                "task": str(dataset.tasks[i]),
                "split": str(dataset.split[i]),
                "quality": _present(dataset.models, dataset.quality[i]),
                "cost_usd": _present(dataset.models, dataset.cost[i]),
            }
            out.write(json.dumps(record, ensure_ascii=False) + "\n")


# Each synthetic task's own words; a prompt mixes them with words every task uses.
_SYNTHETIC_VOCABULARY = {
    "arithmetic": "sum multiply integer divide fraction equation digits remainder percent product".split(),
    "code": "python function list return loop string sort recursion variable compile".split(),
    "trivia": "capital river century empire author painting mountain treaty dynasty island".split(),
    "commonsense": "kitchen umbrella neighbour breakfast bicycle garden rain shoes window dog".split(),
}
_SYNTHETIC_FILLER = "please the what is of a explain given which answer about and".split()
_SYNTHETIC_TASK_WORD_SHARE = 0.6


def synthetic_dataset(n: int = 3000, n_models: int = 5, seed: int = 0) -> RoutingDataset:
    """A small routing world for machines without RouterBench.

    Prompts belong to one of a few tasks and their words give the task away, so a hashing
    featuriser over the text can learn where each model is good. Model m costs about
    $0.00008 * 62.5**(m / (K-1)) a prompt (so $0.00008 to $0.005, scaled by prompt length);
    accuracy rises with price, and every task has a specialist model that is much better
    there than its price suggests, so the best model depends on the prompt. Quality is a
    Bernoulli 0/1 draw; every model is available on every prompt; about 70% is train.

    >>> world = synthetic_dataset(n=1000)
    >>> bool(world.cost.min() > 3e-5 and world.cost.max() < 2e-2)
    True
    """
    if n < 1 or n_models < 2:
        raise ValueError("a synthetic world needs n >= 1 prompts and n_models >= 2")
    rng = np.random.default_rng(seed)
    task_names = list(_SYNTHETIC_VOCABULARY)
    price_rank = np.linspace(0.0, 1.0, n_models)

    base_accuracy = 0.45 + 0.35 * price_rank
    accuracy = base_accuracy + rng.normal(0.0, 0.05, (len(task_names), n_models))
    specialists = rng.permutation(np.resize(np.arange(n_models), len(task_names)))
    accuracy[np.arange(len(task_names)), specialists] += 0.3
    accuracy = np.clip(accuracy, 0.05, 0.97)

    task_of = rng.integers(len(task_names), size=n)
    lengths = rng.integers(6, 15, size=n)
    prompts = [_synthetic_prompt(rng, task_names[t], length) for t, length in zip(task_of, lengths)]

    price_per_prompt = 8e-5 * (5e-3 / 8e-5) ** price_rank
    # Cost grows with the prompt's length, as token-priced APIs do, with a little noise.
    length_factor = lengths / lengths.mean()
    cost = price_per_prompt[None, :] * length_factor[:, None] * rng.lognormal(0.0, 0.1, (n, n_models))
    quality = (rng.random((n, n_models)) < accuracy[task_of]).astype(np.float64)

    ids = np.asarray([f"synthetic-{i:05d}" for i in range(n)])
    return RoutingDataset(
        name="synthetic",
        models=tuple(f"synthetic-model-{m}" for m in range(n_models)),
        ids=ids,
        prompts=prompts,
        tasks=np.asarray(task_names)[task_of],
        split=stable_split(ids),
        quality=quality,
        cost=cost,
        synthetic=True,
    )


def _synthetic_prompt(rng: np.random.Generator, task: str, length: int) -> str:
    task_words = rng.choice(_SYNTHETIC_VOCABULARY[task], size=length)
    filler_words = rng.choice(_SYNTHETIC_FILLER, size=length)
    words = np.where(rng.random(length) < _SYNTHETIC_TASK_WORD_SHARE, task_words, filler_words)
    return " ".join(words).capitalize() + "?"


@dataclass(frozen=True)
class _Table:
    """One source file's validated rows, before :func:`_assemble` aligns models and drops prompts."""

    source: Path
    ids: list[str]
    prompts: list[str]
    tasks: list[str]
    split: np.ndarray
    models: tuple[str, ...]
    quality: np.ndarray
    cost: np.ndarray


def _load_routerbench_folder(folder: Path) -> RoutingDataset:
    files = sorted(folder.glob("*_train.csv")) + sorted(folder.glob("*_test.csv"))
    if not files:
        raise ValueError(f"{folder}: no RouterBench *_train.csv or *_test.csv files")
    return _assemble(folder.name, [_read_routerbench_file(f) for f in files])


def _read_routerbench_file(path: Path) -> _Table:
    """One RouterBench file; its split from a ``split`` column, else its name, else the hash."""
    suffix = path.suffix.lower()
    if suffix == ".csv":
        header = pd.read_csv(path, nrows=0).columns
        columns = _routerbench_columns(path, header)
        # Everything as text, so that empty cells stay "" and bad cells can be reported.
        frame = pd.read_csv(path, usecols=columns, dtype=str, keep_default_na=False)
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        columns = _routerbench_columns(path, pq.read_schema(path).names)
        frame = pd.read_parquet(path, columns=columns)
    else:
        frame = pd.read_pickle(path)
        if not isinstance(frame, pd.DataFrame):
            raise ValueError(f"{path}: expected a pickled pandas DataFrame, got {type(frame).__name__}")
        columns = _routerbench_columns(path, frame.columns)
    models = tuple(c[: -len(COST_SUFFIX)] for c in columns if c.endswith(COST_SUFFIX))
    quality = np.column_stack([_numbers(frame[m], path, m) for m in models])
    cost = np.column_stack([_numbers(frame[m + COST_SUFFIX], path, m + COST_SUFFIX) for m in models])
    _check_ranges(
        quality,
        cost,
        locate=lambda row: f"{path}: data row {row}",
        quality_labels=[f"column {m!r}" for m in models],
        cost_labels=[f"column {m + COST_SUFFIX!r}" for m in models],
    )

    ids = [str(i) for i in frame[ROUTERBENCH_ID]]
    if SPLIT_COLUMN in frame.columns:
        split = np.asarray([str(s) for s in frame[SPLIT_COLUMN]])
    elif path.stem.endswith(("_train", "_test")):
        split = np.full(len(ids), path.stem.rsplit("_", 1)[1])
    else:
        split = stable_split(ids)
    return _Table(
        source=path,
        ids=ids,
        prompts=[_prompt_text(p) for p in frame[ROUTERBENCH_PROMPT]],
        tasks=[str(t) for t in frame[ROUTERBENCH_TASK]],
        split=split,
        models=models,
        quality=quality,
        cost=cost,
    )


def _routerbench_columns(path: Path, header: Iterable[str]) -> list[str]:
    header = list(header)
    models = [c[: -len(COST_SUFFIX)] for c in header if c.endswith(COST_SUFFIX)]
    required = [ROUTERBENCH_ID, ROUTERBENCH_PROMPT, ROUTERBENCH_TASK, *models]
    missing = [c for c in required if c not in header]
    if missing or not models:
        missing = missing or ["<model>|total_cost"]
        raise ValueError(f"{path}: not RouterBench's layout (missing columns {missing})")
    optional = [SPLIT_COLUMN] if SPLIT_COLUMN in header else []
    return required + [m + COST_SUFFIX for m in models] + optional


def _numbers(column: pd.Series, path: Path, name: str) -> np.ndarray:
    """A column as float64, empty cells as NaN; any other non-number is an error."""
    values = pd.to_numeric(column.replace("", np.nan), errors="coerce").to_numpy(dtype=np.float64)
    unparsed = np.flatnonzero(np.isnan(values) & column.notna().to_numpy() & (column != "").to_numpy())
    unparsed = [i for i in unparsed if str(column.iloc[i]).strip().lower() != "nan"]
    if unparsed:
        row = unparsed[0]
        raise ValueError(f"{path}: data row {row}, column {name!r}: {column.iloc[row]!r} is not a number")
    return values


def _check_ranges(
    quality: np.ndarray,
    cost: np.ndarray,
    locate: Callable[[int], str],
    quality_labels: list[str],
    cost_labels: list[str],
) -> None:
    """Quality in [0, 1] and finite cost >= 0 where recorded; raise naming the first bad cell.

    ``locate(row)`` says where a row is ("data.csv: data row 3"), the labels name each
    model's quality and cost cell ("column 'gpt-4'").
    """
    bad_quality = ~np.isnan(quality) & ~((quality >= 0.0) & (quality <= 1.0))
    bad_cost = ~np.isnan(cost) & ~(np.isfinite(cost) & (cost >= 0.0))
    for bad, values, labels, what in (
        (bad_quality, quality, quality_labels, "quality must be in [0, 1]"),
        (bad_cost, cost, cost_labels, "cost must be a finite number >= 0"),
    ):
        if bad.any():
            row, k = np.argwhere(bad)[0]
            raise ValueError(f"{locate(row)}, {labels[k]}: {what}, got {values[row, k]!r}")


def _prompt_text(cell) -> str:
    """RouterBench stores a prompt as a list of strings (a Python literal in CSV): join them by newlines."""
    if isinstance(cell, str):
        try:
            parsed = ast.literal_eval(cell) if cell.lstrip().startswith("[") else cell
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            return cell
        cell = parsed if isinstance(parsed, list) else cell
    if isinstance(cell, (list, tuple, np.ndarray)) and all(isinstance(part, str) for part in cell):
        return "\n".join(cell)
    return str(cell)


def _load_jsonl(path: Path) -> RoutingDataset:
    records: list[tuple[int, dict]] = []
    with path.open(encoding="utf-8") as lines:
        for line_number, line in enumerate(lines, start=1):
            if line.strip():
                try:
                    records.append((line_number, json.loads(line)))
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path}: line {line_number}: not JSON ({error})") from None
    # Models in the order they first appear, so a file's own ordering is kept.
    models = tuple(
        dict.fromkeys(m for _, record in records for key in ("quality", "cost_usd") for m in record.get(key, {}))
    )
    index = {m: k for k, m in enumerate(models)}
    quality = np.full((len(records), len(models)), np.nan)
    cost = np.full((len(records), len(models)), np.nan)
    ids, prompts, tasks, splits = [], [], [], []
    for row, (line_number, record) in enumerate(records):
        missing = [key for key in ("id", "prompt", "task", "quality", "cost_usd") if key not in record]
        if missing:
            raise ValueError(f"{path}: line {line_number}: missing {missing}")
        for key, target in (("quality", quality), ("cost_usd", cost)):
            if not isinstance(record[key], dict):
                raise ValueError(f"{path}: line {line_number}: {key} must be an object of model -> number")
            for model, value in record[key].items():
                if value is not None:
                    if isinstance(value, bool) or not isinstance(value, (int, float)):
                        raise ValueError(
                            f"{path}: line {line_number}, {key}[{model!r}]: {value!r} is not a number"
                        )
                    target[row, index[model]] = value
        ids.append(str(record["id"]))
        prompts.append(str(record["prompt"]))
        tasks.append(str(record["task"]))
        splits.append(record.get(SPLIT_COLUMN))
    _check_ranges(
        quality,
        cost,
        locate=lambda row: f"{path}: line {records[row][0]}",
        quality_labels=[f"quality[{m!r}]" for m in models],
        cost_labels=[f"cost_usd[{m!r}]" for m in models],
    )
    hashed = stable_split(ids)
    split = np.asarray([s if s is not None else h for s, h in zip(splits, hashed)])
    table = _Table(path, ids, prompts, tasks, split, models, quality, cost)
    return _assemble(path.stem, [table])


def _assemble(name: str, tables: list[_Table]) -> RoutingDataset:
    """Concatenate tables over the union of their models, then drop prompts with no model."""
    for table in tables:
        unknown = sorted(set(table.split.tolist()) - set(SPLITS))
        if unknown:
            raise ValueError(f"{table.source}: split must be 'train' or 'test', got {unknown}")
    models = tuple(dict.fromkeys(m for t in tables for m in t.models))
    blocks = []
    for field_name in ("quality", "cost"):
        aligned = []
        for table in tables:
            block = np.full((len(table.ids), len(models)), np.nan)
            block[:, [models.index(m) for m in table.models]] = getattr(table, field_name)
            aligned.append(block)
        blocks.append(np.concatenate(aligned))
    quality, cost = blocks
    dataset = RoutingDataset(
        name=name,
        models=models,
        ids=np.asarray([i for t in tables for i in t.ids], dtype=str),
        prompts=[p for t in tables for p in t.prompts],
        tasks=np.asarray([s for t in tables for s in t.tasks], dtype=str),
        split=np.concatenate([t.split for t in tables]).astype(str),
        quality=quality,
        cost=cost,
    )
    servable = dataset.available.any(axis=1)
    return replace(dataset.subset(servable), dropped=int((~servable).sum()))


def _present(models: tuple[str, ...], values: np.ndarray) -> dict[str, float]:
    return {m: float(v) for m, v in zip(models, values) if np.isfinite(v)}

