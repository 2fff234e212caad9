"""Speed benchmark, in-process: decisions, learning, prompt encoding and snapshots, against peers.

``routeloop bench speed [--report FILE.json]`` (or ``python -m router.bench.speed``) measures,
at K = 11 arms and 384-dimensional features, all in one run so that every figure and its
peer's share the machine's state:

- decision latency with the features given (p50, p99 per call), for our policy exactly as
  the routing worker runs it (a snapshot decoded, ``prepare()``-d, an all-True candidate
  mask) and for the peers of :mod:`router.bench.peers` (River's LinUCBDisjoint, and
  ParetoBandit and Vowpal Wabbit when importable), each through its ``choose``;
- beside ours, what the machine does to a call as long: a pure-Python busy loop of our
  median decision's length, timed in alternating blocks of 200 with our decisions, and how
  often a busy loop is paused for more than 20 us (``machine``); and our decisions with cold
  caches (an 8 MB read before each), what one costs when other work ran in between;
- learner updates per second (ours: ``policy.learn``, what the learner runs per outcome;
  peers: their ``learn``);
- prompt encoding per featuriser: one prompt per call, and a batch of 32 (time per prompt);
  RouterBench prompts from ``../shared/data/routerbench-0shot`` if present, else synthetic
  ones; a serial number is prepended to every prompt so that no encoder cache ever hits;
- the snapshot codec: encode and decode (parse + sha256 check) time and the frame's size,
  plus what a router does on a new snapshot (decode, rebuild, ``prepare()``).

Every peer sees the same features as ours: the 128-dimensional sketch of our policy (River
and Vowpal Wabbit through their adapters' sketch, ParetoBandit through a 128-component PCA
whitening), so the figures compare the algorithms' implementations, not their inputs.

The machine is shared and small (2 cores): figures are medians and percentiles of many
calls, and each peer's figure is reported next to ours from the same run, with the ratio.
Each call is timed on its own with ``time.perf_counter_ns`` (about 0.1 us of overhead, in
``machine``), with the garbage collector off (a decision leaves nothing for it to collect,
tests/test_bench_speed.py checks; a routing worker's own collections are its own matter).
A p99 here is mostly the machine's: the pauses of other processes, and after each one the
refill of the 1 MB a decision reads (see ``decision_cold_*``); read it against the busy
loop's p99 of the same run.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import orjson

from router.bench import peers
from router.policy import DecomposedPolicy, make_policy
from router.snapshot import decode_snapshot, encode_snapshot

ARMS = 11
DIM = 384
SKETCH = 128
TAU = 0.01
W_QUALITY = 0.8
#: The featurisers measured by default: the light one and the workers' default (MiniLM).
FEATURISERS = ("hashing://?dim=384", "minilm://")
DEFAULT_PROMPTS = Path("../shared/data/routerbench-0shot")


def _log(progress: bool, message: str) -> None:
    if progress:
        print(f"[bench speed] {message}", file=sys.stderr, flush=True)


def unit_rows(n: int, dim: int, seed: int = 0) -> np.ndarray:
    """``n`` random unit vectors, float32, as featurisers produce them."""
    X = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    return X


def percentiles_us(samples_ns: Sequence[int] | np.ndarray) -> tuple[float, float]:
    """(p50, p99) in microseconds."""
    values = np.asarray(samples_ns, dtype=np.float64) / 1e3
    return float(np.percentile(values, 50)), float(np.percentile(values, 99))


def time_calls(call: Callable[[int], object], n: int, budget_s: float | None = None) -> np.ndarray:
    """Wall time of each of up to ``n`` calls ``call(i)`` in ns (fewer if ``budget_s`` runs out).

    The garbage collector is off while timing (it is a pause no call caused); it is
    collected before.
    """
    gc.collect()
    gc.disable()
    try:
        samples = np.empty(n, dtype=np.int64)
        clock = time.perf_counter_ns
        deadline = clock() + int(budget_s * 1e9) if budget_s else None
        done = n
        for i in range(n):
            started = clock()
            call(i)
            samples[i] = clock() - started
            if deadline is not None and samples[i] + started > deadline and i >= 19:
                done = i + 1
                break
        return samples[:done]
    finally:
        gc.enable()


def _spin(n: int) -> int:
    """Pure-Python busy work of a fixed length: no allocation, no memory traffic."""
    total = 0
    for k in range(n):
        total += k
    return total


def spin_length(target_ns: float) -> int:
    """The ``_spin`` argument whose median time is about ``target_ns``, here and now."""
    probe = 1000
    per_step = float(np.median(time_calls(lambda i: _spin(probe), 300))) / probe
    return max(1, round(target_ns / per_step))


def time_alternating(call: Callable[[int], object], reference: Callable[[int], object], n: int,
                     block: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """``n`` timed calls of ``call`` and ``n`` of ``reference``, in alternating blocks of ``block``.

    Both see the same machine, block by block: on a shared machine the pauses of other
    processes (and the cache refills after them) land on both alike.
    """
    gc.collect()
    gc.disable()
    try:
        samples = np.empty(n, dtype=np.int64)
        ref = np.empty(n, dtype=np.int64)
        clock = time.perf_counter_ns
        for start in range(0, n, block):
            stop = min(start + block, n)
            for i in range(start, stop):
                started = clock()
                call(i)
                samples[i] = clock() - started
            for i in range(start, stop):
                started = clock()
                reference(i)
                ref[i] = clock() - started
        return samples, ref
    finally:
        gc.enable()


def time_cold(call: Callable[[int], object], n: int, sweep_bytes: int = 8 << 20) -> np.ndarray:
    """Wall time of ``n`` calls, each after an untimed read of ``sweep_bytes`` (caches evicted)."""
    sweep = np.ones(sweep_bytes // 8)
    gc.collect()
    gc.disable()
    try:
        samples = np.empty(n, dtype=np.int64)
        clock = time.perf_counter_ns
        for i in range(n):
            sweep.sum()
            started = clock()
            call(i)
            samples[i] = clock() - started
        return samples
    finally:
        gc.enable()


def machine_pauses(seconds: float = 0.5, threshold_us: float = 20.0) -> dict:
    """How often a busy loop is paused for longer than ``threshold_us``, and for what share of the time.

    Nothing in the loop can take that long: every such gap is the machine's (other processes,
    the hypervisor, interrupts), not the code's.
    """
    gc.disable()
    try:
        clock = time.perf_counter_ns
        threshold = int(threshold_us * 1e3)
        start = last = clock()
        end = start + int(seconds * 1e9)
        count = lost = 0
        while last < end:
            now = clock()
            if now - last > threshold:
                count += 1
                lost += now - last
            last = now
        elapsed = (last - start) / 1e9
        return {f"pauses_over_{threshold_us:g}us_per_s": count / elapsed, "time_lost_share": lost / 1e9 / elapsed}
    finally:
        gc.enable()


def bench_prompts(n: int, dataset: str | Path | None = None) -> tuple[list[str], str]:
    """``n`` prompts (RouterBench's if the data set is there, else synthetic), each made distinct.

    Returns the prompts and where they came from.
    """
    from router.datasets import load_dataset, synthetic_dataset

    path = Path(dataset) if dataset is not None else DEFAULT_PROMPTS
    if path.exists():
        base, source = list(load_dataset(path).prompts), f"routerbench ({path})"
    else:
        base, source = list(synthetic_dataset().prompts), "synthetic (RouterBench not found)"
    # A serial number makes each prompt distinct: an encoder's cache never hits.
    return [f"{i}. {base[i % len(base)]}" for i in range(n)], source


# Policies under test: (name, decide(i), learn(i)), each on its own instance.


def our_policy(name: str, X: np.ndarray, quality: np.ndarray, cost: np.ndarray, arms: list[str], warm: int,
               seed: int = 0) -> DecomposedPolicy:
    """The policy a routing worker decides with: trained on ``warm`` outcomes, through a snapshot."""
    learner = make_policy(name, arms=arms, dim=X.shape[1], tau=TAU)
    for i in range(warm):
        learner.learn(i % len(arms), X[i % len(X)], float(quality[i % len(X)]), float(cost[i % len(X)]))
    policy = decode_snapshot(encode_snapshot(learner, version=1, outcomes_offset=warm - 1)).policy(seed=seed)
    policy.prepare()  # as Router.apply_snapshot does before the swap
    return policy  # type: ignore[return-value]


def _peer_learners(arms: list[str], X: np.ndarray, seed: int) -> tuple[dict[str, peers.Learner], dict[str, str]]:
    """The peers that can run here, and a note for each one that cannot."""
    out: dict[str, peers.Learner] = {}
    notes: dict[str, str] = {}
    out["river-linucb"] = peers.RiverLinUCB(arms, X.shape[1], TAU, seed, sketch_dim=SKETCH)
    status = peers.optional_peers()
    if status.get("paretobandit") is None:
        whitener = peers.Whitener.fit(X[: max(4 * SKETCH, 512)], SKETCH)
        out["paretobandit"] = peers.ParetoBanditLearner(arms, TAU, seed, whitener)
    else:
        notes["paretobandit"] = f"skipped: {status['paretobandit']}"
    if status.get("vowpalwabbit") is None:
        out["vowpalwabbit"] = peers.VWLearner(arms, X.shape[1], TAU, seed, sketch_dim=SKETCH)
    else:
        notes["vowpalwabbit"] = f"skipped: {status['vowpalwabbit']}"
    return out, notes


def measure_policy(policy: DecomposedPolicy, X: np.ndarray, quality: np.ndarray, cost: np.ndarray,
                   decisions: int, updates: int) -> dict:
    """Decision and learning figures of ours.

    The decisions are timed in alternating blocks with a reference (a pure-Python busy loop
    of the decisions' median length): the reference's p99 is what this machine, at this
    moment, does to any call that long, so the decisions' p99 can be read against it. Then
    the decisions with cold caches (an 8 MB read before each: what a decision costs when
    other work has run in between), and the learner's updates.
    """
    K = len(policy.arms)
    allowed = np.ones(K, dtype=bool)  # what Router.check gives a request without candidates
    rng = np.random.default_rng(1)
    n = len(X)

    def decide(i: int) -> object:
        return policy.decide(X[i % n], W_QUALITY, allowed, rng=rng)

    time_calls(decide, min(decisions, 2000))  # warm
    steps = spin_length(float(np.median(time_calls(decide, min(decisions, 500)))))
    decided, reference = time_alternating(decide, lambda i: _spin(steps), decisions)
    p50, p99 = percentiles_us(decided)
    ref_p50, ref_p99 = percentiles_us(reference)
    cold_p50, cold_p99 = percentiles_us(time_cold(decide, min(decisions, 2000)))
    learner = make_policy(policy.name, arms=list(policy.arms), dim=X.shape[1], tau=TAU)
    learn = learner.learn
    samples = time_calls(lambda i: learn(i % K, X[i % n], float(quality[i % n]), float(cost[i % n])), updates)
    return {
        "decision_p50_us": p50, "decision_p99_us": p99,
        "decision_p999_us": float(np.percentile(decided, 99.9)) / 1e3,
        "reference_p50_us": ref_p50, "reference_p99_us": ref_p99,
        "decision_cold_p50_us": cold_p50, "decision_cold_p99_us": cold_p99,
        "learner_updates_per_s": len(samples) / (samples.sum() / 1e9),
        "learner_update_p50_us": percentiles_us(samples)[0],
        "decisions_timed": decisions, "updates_timed": int(len(samples)),
    }


def measure_peer(learner: peers.Learner, X: np.ndarray, quality: np.ndarray, cost: np.ndarray,
                 decisions: int, updates: int, warm: int, budget_s: float) -> dict:
    K = len(learner.arms)  # type: ignore[attr-defined]
    allowed = np.ones(K, dtype=bool)
    rng = np.random.default_rng(1)
    n = len(X)
    for i in range(warm):  # a trained model, as ours is (a learn needs its choose first for VW)
        arm = learner.choose(X[i % n], W_QUALITY, allowed, rng)
        learner.learn(arm, X[i % n], float(quality[i % n]), float(cost[i % n]), W_QUALITY)
    decided = time_calls(lambda i: learner.choose(X[i % n], W_QUALITY, allowed, rng), decisions, budget_s)
    # Each timed learn follows an untimed choose (Vowpal Wabbit learns on the example it chose on).
    learn_ns: list[int] = []
    deadline = time.perf_counter() + budget_s
    gc.collect()
    gc.disable()
    try:
        for i in range(updates):
            x = X[(i + 7) % n]
            arm = learner.choose(x, W_QUALITY, allowed, rng)
            started = time.perf_counter_ns()
            learner.learn(arm, x, float(quality[(i + 7) % n]), float(cost[(i + 7) % n]), W_QUALITY)
            learn_ns.append(time.perf_counter_ns() - started)
            if i >= 19 and time.perf_counter() > deadline:
                break
    finally:
        gc.enable()
    p50, p99 = percentiles_us(decided)
    return {
        "decision_p50_us": p50, "decision_p99_us": p99,
        "learner_updates_per_s": len(learn_ns) / (sum(learn_ns) / 1e9),
        "learner_update_p50_us": percentiles_us(learn_ns)[0],
        "decisions_timed": int(len(decided)), "updates_timed": len(learn_ns),
    }


def measure_snapshot(policy: DecomposedPolicy, repeats: int) -> dict:
    frame = encode_snapshot(policy, version=2, outcomes_offset=policy.n_updates - 1)
    encode_ns = time_calls(lambda i: encode_snapshot(policy, version=2, outcomes_offset=0), repeats)
    decode_ns = time_calls(lambda i: decode_snapshot(frame), repeats)

    def apply(_: int) -> None:  # what Router.apply_snapshot does, less the swap itself
        decode_snapshot(frame).policy().prepare()

    apply_ns = time_calls(apply, repeats)
    return {
        "snapshot_bytes": len(frame),
        "snapshot_encode_ms": float(np.median(encode_ns)) / 1e6,
        "snapshot_decode_ms": float(np.median(decode_ns)) / 1e6,
        "snapshot_apply_ms": float(np.median(apply_ns)) / 1e6,
        "snapshot_apply_p99_ms": float(np.percentile(apply_ns, 99)) / 1e6,
    }


def measure_encoders(urls: Sequence[str], prompts: list[str], singles: int, batches: int,
                     progress: bool) -> tuple[dict, dict]:
    from router.featurise import featuriser_from_url

    out, notes = {}, {}
    for url in urls:
        try:
            featuriser = featuriser_from_url(url)
        except ImportError as error:
            notes[url] = f"skipped: {error}"
            continue
        _log(progress, f"encoding with {url}")
        featuriser.encode(prompts[:64])  # load, warm
        offset = 64
        single = time_calls(lambda i: featuriser.encode([prompts[offset + i]]), singles)
        offset += singles
        batch = time_calls(lambda i: featuriser.encode(prompts[offset + 32 * i: offset + 32 * (i + 1)]), batches)
        out[url] = {
            "single": float(np.median(single)) / 1e6,
            "batch32_per_prompt": float(np.median(batch)) / 1e6 / 32,
            "single_p99": float(np.percentile(single, 99)) / 1e6,
            "batch32_rps": 32 / (float(np.median(batch)) / 1e9),
        }
    return out, notes


def run_speed_bench(report: str | Path | None = None, *, arms: int = ARMS, dim: int = DIM,
                    decisions: int = 20_000, updates: int = 20_000, warm: int = 5_000,
                    peer_decisions: int = 2_000, peer_updates: int = 2_000, peer_warm: int = 200,
                    peer_budget_s: float = 20.0, snapshot_repeats: int = 50,
                    featurisers: Sequence[str] = FEATURISERS, encode_singles: int = 200,
                    encode_batches: int = 20, dataset: str | Path | None = None,
                    policy: str | None = None, variants: Sequence[str] = ("decomposed-ts",),
                    progress: bool = True) -> dict:
    """Run the speed benchmark; write the JSON report when ``report`` is given; return it.

    ``policy`` (default: the workers' ``Settings().policy``) gives the top-level figures and
    the peers' ratios; ``variants`` are our other policies, reported under ``ours_variants``.

    Peers get fewer timed calls than ours (``peer_*``) and at most ``peer_budget_s`` seconds
    per measurement: River's LinUCBDisjoint takes milliseconds a step at this size.
    """
    started = time.perf_counter()
    load_before = os.getloadavg()
    names = [f"model-{k}" for k in range(arms)]
    n_rows = max(4096, 2 * SKETCH * 4)
    X = unit_rows(n_rows, dim)
    rng = np.random.default_rng(2)
    quality = rng.random(n_rows)
    cost = rng.random(n_rows) * 2 * TAU

    if policy is None:
        from schemas.settings import Settings

        policy = Settings().policy
    _log(progress, f"our policy {policy}: K={arms}, d={dim}, trained on {warm} outcomes")
    ours_policy = our_policy(policy, X, quality, cost, names, warm)
    ours = measure_policy(ours_policy, X, quality, cost, decisions, updates)
    machine = {
        "timer_overhead_us": percentiles_us(time_calls(lambda i: None, 2000))[0],
        **machine_pauses(),
        "reference_p50_us": ours["reference_p50_us"], "reference_p99_us": ours["reference_p99_us"],
        "note": "reference: a busy loop of our decisions' median length, timed in alternating blocks with "
                "them; its p99 is what the machine adds to any call that long",
    }
    _log(progress, f"ours: decision p50 {ours['decision_p50_us']:.1f} us, p99 {ours['decision_p99_us']:.1f} us "
                   f"(a busy loop as long: p99 {ours['reference_p99_us']:.1f} us), "
                   f"{ours['learner_updates_per_s']:.0f} updates/s")
    variant_results = {}
    for name in variants:
        if name == policy:
            continue
        variant_results[name] = measure_policy(our_policy(name, X, quality, cost, names, warm), X, quality,
                                               cost, decisions, updates)
        _log(progress, f"{name}: decision p50 {variant_results[name]['decision_p50_us']:.1f} us, "
                       f"p99 {variant_results[name]['decision_p99_us']:.1f} us")

    learners, skipped = _peer_learners(names, X, seed=0)
    peer_results = {}
    for name, learner in learners.items():
        _log(progress, f"peer {name}")
        result = measure_peer(learner, X, quality, cost, peer_decisions, peer_updates, peer_warm, peer_budget_s)
        result["decision_p50_vs_ours"] = result["decision_p50_us"] / ours["decision_p50_us"]
        result["decision_p99_vs_ours"] = result["decision_p99_us"] / ours["decision_p99_us"]
        result["learner_updates_vs_ours"] = result["learner_updates_per_s"] / ours["learner_updates_per_s"]
        peer_results[name] = result
        _log(progress, f"{name}: decision p50 {result['decision_p50_us']:.1f} us "
                       f"({result['decision_p50_vs_ours']:.1f}x ours), "
                       f"{result['learner_updates_per_s']:.0f} updates/s")

    _log(progress, "snapshot codec")
    snapshot = measure_snapshot(ours_policy, snapshot_repeats)

    prompts, prompt_source = bench_prompts(64 + encode_singles + 32 * encode_batches, dataset)
    encode_ms, encoder_notes = measure_encoders(featurisers, prompts, encode_singles, encode_batches, progress)

    out = {
        "decision_p50_us": ours["decision_p50_us"],
        "decision_p99_us": ours["decision_p99_us"],
        "learner_updates_per_s": ours["learner_updates_per_s"],
        "peers": peer_results,
        "machine": machine,
        **snapshot,
        "encode_ms": encode_ms,
        "ours": ours,
        "ours_variants": variant_results,
        "skipped": {**skipped, **encoder_notes},
        "setup": {
            "arms": arms, "dim": dim, "sketch_dim": SKETCH, "policy": policy,
            "w_quality": W_QUALITY, "warm_outcomes": warm, "peer_warm_outcomes": peer_warm,
            "peer_features": f"the same {SKETCH}-d sketch as ours (ParetoBandit: {SKETCH}-d PCA whitening)",
            "prompts": prompt_source,
            "cpu_count": os.cpu_count(),
            "loadavg_before": [round(v, 2) for v in load_before],
            "loadavg_after": [round(v, 2) for v in os.getloadavg()],
            "note": "a shared 2-core machine: compare each figure with its peer's from the same run",
        },
        "wall_s": round(time.perf_counter() - started, 1),
    }
    if report is not None:
        Path(report).write_bytes(orjson.dumps(out, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY))
    return out


def format_speed_report(report: dict) -> str:
    lines = [f"{'router':<16}{'decision p50 us':>16}{'p99 us':>10}{'updates/s':>12}{'p99 vs ours':>13}"]
    lines.append(f"{report['setup']['policy']:<16}{report['decision_p50_us']:>16.1f}{report['decision_p99_us']:>10.1f}"
                 f"{report['learner_updates_per_s']:>12.0f}{'1.0x':>13}")
    ours, machine = report.get("ours", {}), report.get("machine")
    if machine is not None and "decision_cold_p50_us" in ours:
        lines.append(f"  same machine, same blocks: a busy loop as long as our median decision, p50 "
                     f"{machine['reference_p50_us']:.1f} us, p99 {machine['reference_p99_us']:.1f} us; "
                     f"{machine['pauses_over_20us_per_s']:.0f} pauses > 20 us a second "
                     f"({100 * machine['time_lost_share']:.1f}% of the time)")
        lines.append(f"  with cold caches (8 MB read before each decision): p50 {ours['decision_cold_p50_us']:.1f} us, "
                     f"p99 {ours['decision_cold_p99_us']:.1f} us")
    for name, variant in report.get("ours_variants", {}).items():
        lines.append(f"{name:<16}{variant['decision_p50_us']:>16.1f}{variant['decision_p99_us']:>10.1f}"
                     f"{variant['learner_updates_per_s']:>12.0f}"
                     f"{variant['decision_p99_us'] / report['decision_p99_us']:>12.1f}x")
    for name, peer in report["peers"].items():
        lines.append(f"{name:<16}{peer['decision_p50_us']:>16.1f}{peer['decision_p99_us']:>10.1f}"
                     f"{peer['learner_updates_per_s']:>12.0f}{peer['decision_p99_vs_ours']:>12.1f}x")
    lines.append(f"snapshot {report['snapshot_bytes'] / 1e6:.2f} MB, encode {report['snapshot_encode_ms']:.2f} ms, "
                 f"decode {report['snapshot_decode_ms']:.2f} ms, apply (decode + prepare) "
                 f"{report['snapshot_apply_ms']:.2f} ms")
    for url, figures in report["encode_ms"].items():
        lines.append(f"encode {url}: single {figures['single']:.3f} ms, batch of 32 "
                     f"{figures['batch32_per_prompt']:.3f} ms a prompt")
    for name, why in report.get("skipped", {}).items():
        lines.append(f"{name}: {why}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m router.bench.speed", description=__doc__.split("\n")[0])
    parser.add_argument("--report", default=None)
    parser.add_argument("--decisions", type=int, default=20_000)
    parser.add_argument("--updates", type=int, default=20_000)
    parser.add_argument("--featuriser", action="append", help=f"default: {', '.join(FEATURISERS)}")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    report = run_speed_bench(args.report, decisions=args.decisions, updates=args.updates,
                             featurisers=tuple(args.featuriser or FEATURISERS), progress=not args.quiet)
    print(format_speed_report(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
