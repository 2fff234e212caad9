"""Loop benchmark: the whole loop through the broker, every worker running, as in production.

``routeloop bench loop [--report FILE.json]`` starts the embedded broker and the three workers
(:class:`deploy.local.LocalLoop`) once per featuriser and plays every other party itself, as
the replay does: the application (requests), the downstream caller (a response for every
decision, at once) and the evaluator (a reward for every decision, at once). Phases:

1. **Warm-up**, until outcomes flow; then each worker's resident memory (``rss_mb.start``).
2. **Saturation** for ``duration_s`` (default 180 s): a closed loop that keeps ``window``
   requests inside the *whole* loop (sent, and their outcome not yet seen on the outcomes
   topic). Every stage then keeps up by construction, and the outcome rate is what the loop
   sustains: ``sustained_rps`` counts requests decided, answered, rewarded, joined and turned
   into outcomes per second, after the first ``min(10 s, 10%)``; the learner's lag and the
   snapshots published are reported beside it, and each process's CPU use (in cores) says
   which stage is the limit. Then the memory again (``rss_mb.end``).
3. **Encoder alone**, in this process, same featuriser and prompts, batches of the routing
   worker's size: ``encoder_only_rps``.
4. With the hashing featuriser only, on a fresh loop of its own (the embedded broker keeps
   every message, so no phase runs on what another left), **open-loop latency** at each
   offered load (200 and 1000 requests/s): requests go out on a fixed schedule whatever the replies, and
   request-to-decision latency is from just before the request's ``send`` to the decision
   arriving here (both on this process's monotonic clock). Beside it, the same split in two
   by the decision's ``created_at``: ``to_decided`` (the router's fetch wait, decoding and
   routing) and ``decided_to_seen`` (the produce, its acknowledgement, and this process's
   own fetch wait, DECISIONS_FETCH_WAIT_MS), and this process's garbage-collector pauses
   meanwhile (``generator_gc``).
5. **Freshness**, during the 200 requests/s phase: for every reward, the time from just
   before its ``send`` to the first moment the routing worker's ``GET /v1/model`` (polled
   every ``poll_ms``) reports a snapshot version whose ``outcomes_offset`` is at or past
   the offset of that reward's outcome. The outcome's offset comes from reading the
   outcomes topic (outcomes carry the request id), each version's ``outcomes_offset`` from
   reading the snapshots topic's headers. So it spans the join, the learner, the snapshot
   cadence (every ``snapshot_every_n`` outcomes or ``snapshot_every_s`` seconds), the
   publish, and the router's fetch, verification, rebuild and swap; the poll adds at most
   ``poll_ms`` (the figure is an upper bound by that much).

Every prompt is distinct (a serial number is prepended to a RouterBench prompt, or to a
synthetic one without the data set), so the encoder's cache never hits. Qualities and costs
are random (the learner's work does not depend on them).
"""

from __future__ import annotations

import asyncio
import bisect
import gc
import logging
import os
import time
import urllib.request
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import orjson
from aiokafka import TopicPartition

from deploy.kafka import make_consumer, make_producer
from deploy.local import LocalLoop
from deploy.topics import expected_partitions
from schemas.settings import Settings

log = logging.getLogger(__name__)

HASHING = "hashing://?dim=384"
FEATURISERS = (HASHING, "minilm://")
LOADS = (200, 1000)
ARMS = 11
#: The routing worker's batch (RoutingWorker.max_batch): the encoder alone runs batches of it.
ROUTER_BATCH = 64
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
#: The fetch wait of the generator's decisions consumer (the downstream caller's): part of
#: the request-to-decision latency, as the router's own fetch wait is.
DECISIONS_FETCH_WAIT_MS = 10


class GcWatch:
    """The garbage collector's pauses in this process while the block runs (they stop the
    load generator's event loop, so they would show in the latencies it measures)."""

    def __init__(self) -> None:
        self.pauses: list[tuple[int, float]] = []
        self._started = 0.0

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.pauses.append((info["generation"], time.perf_counter() - self._started))

    def __enter__(self) -> GcWatch:
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self._callback)

    def summary(self) -> dict[str, float | int]:
        longest = max((pause for _, pause in self.pauses), default=0.0)
        return {"collections": len(self.pauses), "full": sum(1 for g, _ in self.pauses if g == 2),
                "total_ms": round(sum(p for _, p in self.pauses) * 1e3, 2), "max_ms": round(longest * 1e3, 2)}


# Processes: resident memory and CPU time from /proc.


def rss_mb(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


def cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of a process (all its threads)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS
    except (OSError, IndexError, ValueError):
        return None


def machine_busy_s() -> float | None:
    """CPU seconds the whole machine spent busy (every process, all cores), from /proc/stat."""
    try:
        with open("/proc/stat") as stat:
            fields = [int(v) for v in stat.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / _CLOCK_TICKS


def _percentiles_ms(values: Sequence[float]) -> dict[str, float | None]:
    if not len(values):
        return {"p50": None, "p99": None, "n": 0}
    array = np.asarray(values, dtype=np.float64) * 1e3
    return {"p50": float(np.percentile(array, 50)), "p99": float(np.percentile(array, 99)), "n": int(len(array))}


@dataclass
class _Traffic:
    """What the generator sent and saw, by request id (its own run only)."""

    sent_at: dict[str, float] = field(default_factory=dict)
    decided_at: dict[str, float] = field(default_factory=dict)
    #: The request's and its decision's ``created_at`` (wall clock, this machine's): the part
    #: of the latency until the router decided, without the produce and this process's fetch.
    created_wall: dict[str, float] = field(default_factory=dict)
    decision_created_wall: dict[str, float] = field(default_factory=dict)
    rewarded_at: dict[str, float] = field(default_factory=dict)
    outcome_at: dict[str, float] = field(default_factory=dict)
    outcome_offset: dict[str, int] = field(default_factory=dict)
    #: snapshot version -> outcomes_offset it includes
    snapshot_offsets: dict[int, int] = field(default_factory=dict)
    snapshots_seen: list[float] = field(default_factory=list)
    #: (poll time, applied version) from GET /v1/model
    polls: list[tuple[float, int]] = field(default_factory=list)


class LoadGenerator:
    """Plays the application, the downstream caller and the evaluator against a running loop."""

    def __init__(self, settings: Settings, prompts: list[str], models: Sequence[str], seed: int = 0) -> None:
        self.settings = settings
        self.prompts = prompts
        self.models = list(models)
        self.run_id = uuid.uuid4().hex[:8]
        self.prefix = f"{self.run_id}-".encode()
        self.rng = np.random.default_rng(seed)
        self.traffic = _Traffic()
        self.serial = 0
        self._window: asyncio.Semaphore | None = None
        self._tasks: list[asyncio.Task] = []
        self.producer = None
        self.errors: list[BaseException] = []

    async def __aenter__(self) -> LoadGenerator:
        s = self.settings
        # linger 0: a request leaves at once (latency); replies batch naturally per loop turn.
        self.producer = make_producer(s, linger_ms=0)
        await self.producer.start()
        partitions = expected_partitions(s)
        consumers = {}
        for short in ("decisions", "outcomes", "snapshots"):
            consumer = make_consumer(s, group_id=None, enable_auto_commit=False,
                                     fetch_max_wait_ms=DECISIONS_FETCH_WAIT_MS if short == "decisions" else 50)
            await consumer.start()
            topic = s.topic(short)
            parts = [TopicPartition(topic, p) for p in range(partitions[topic])]
            consumer.assign(parts)
            # The embedded broker's end may point into its last batch: older records this
            # re-reads are not ours (the run id filters them) or are older snapshots (harmless).
            await consumer.seek_to_end(*parts)
            consumers[short] = consumer
        self.consumers = consumers
        self._tasks = [asyncio.create_task(self._read_decisions()),
                       asyncio.create_task(self._read_outcomes()),
                       asyncio.create_task(self._read_snapshots())]
        return self

    async def __aexit__(self, *exc: object) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for consumer in self.consumers.values():
            await consumer.stop()
        await self.producer.stop()

    def check(self) -> None:
        if self.errors:
            raise self.errors[0]
        for task in self._tasks:
            if task.done() and not task.cancelled() and task.exception():
                raise task.exception()

    # -- the application

    def _request(self) -> tuple[str, bytes]:
        i = self.serial
        self.serial += 1
        request_id = f"{self.run_id}-{i}"
        prompt = f"{i}. {self.prompts[i % len(self.prompts)]}"
        created = self.traffic.created_wall[request_id] = time.time()
        return request_id, orjson.dumps({"request_id": request_id, "prompt": prompt, "created_at": created})

    async def send_request(self) -> str:
        request_id, value = self._request()
        self.traffic.sent_at[request_id] = time.monotonic()
        await self.producer.send(self.settings.topic("requests"), value, key=request_id.encode())
        return request_id

    async def closed_loop(self, duration_s: float, window: int) -> tuple[float, float]:
        """Keep ``window`` requests in the loop (outcome not yet seen) for ``duration_s``; (start, end)."""
        self._window = asyncio.Semaphore(window)
        started = time.monotonic()
        deadline = started + duration_s
        try:
            while time.monotonic() < deadline:
                try:
                    await asyncio.wait_for(self._window.acquire(), timeout=max(0.01, deadline - time.monotonic()))
                except asyncio.TimeoutError:
                    break
                await self.send_request()
                self.check()
        finally:
            self._window = None
        return started, time.monotonic()

    async def open_loop(self, rate: float, duration_s: float) -> tuple[float, float, list[str]]:
        """Send at ``rate`` requests/s for ``duration_s`` whatever the replies; (start, end, ids)."""
        started = time.monotonic()
        count = int(rate * duration_s)
        ids = []
        for i in range(count):
            ahead = started + i / rate - time.monotonic()
            if ahead > 0.001:
                await asyncio.sleep(ahead)
            ids.append(await self.send_request())
            if i % 256 == 0:
                self.check()
        return started, time.monotonic(), ids

    # -- the caller, the evaluator, and the observers

    async def _first_copies(self, consumer, seen: dict[str, float]):
        """This run's records on ``consumer``, the first copy of each request id only (a record
        may come twice: at-least-once); each is entered in ``seen`` at its fetch time and
        yielded as (request_id, record)."""
        while True:
            batches = await consumer.getmany(timeout_ms=100)
            now = time.monotonic()
            for records in batches.values():
                for record in records:
                    key = record.key or b""
                    if not key.startswith(self.prefix):
                        continue
                    request_id = key.decode()
                    if request_id in seen:
                        continue
                    seen[request_id] = now
                    yield request_id, record

    async def _read_decisions(self) -> None:
        s, producer, t = self.settings, self.producer, self.traffic
        responses, rewards = s.topic("responses"), s.topic("rewards")
        async for request_id, record in self._first_copies(self.consumers["decisions"], t.decided_at):
            key = record.key
            decision = orjson.loads(record.value)
            model = decision["model"]
            t.decision_created_wall[request_id] = decision["created_at"]
            quality, cost = self.rng.random(2)
            await producer.send(responses, orjson.dumps(
                {"request_id": request_id, "model": model, "cost_usd": float(cost) * 0.02}), key=key)
            t.rewarded_at[request_id] = time.monotonic()
            await producer.send(rewards, orjson.dumps(
                {"reward_id": f"{request_id}/q", "request_id": request_id, "quality": float(quality),
                 "evaluator": "bench"}), key=key)

    async def _read_outcomes(self) -> None:
        t = self.traffic
        async for request_id, record in self._first_copies(self.consumers["outcomes"], t.outcome_at):
            t.outcome_offset[request_id] = record.offset
            if self._window is not None:
                self._window.release()

    async def _read_snapshots(self) -> None:
        consumer, t = self.consumers["snapshots"], self.traffic
        while True:
            batches = await consumer.getmany(timeout_ms=100)
            for records in batches.values():
                for record in records:
                    frame = record.value or b""
                    if frame[:4] != b"RLS1":
                        continue
                    head = orjson.loads(frame[8:8 + int.from_bytes(frame[4:8], "big")])
                    t.snapshot_offsets[int(head["version"])] = int(head["outcomes_offset"])
                    t.snapshots_seen.append(time.monotonic())

    async def poll_model(self, router_url: str, interval_s: float, stop: asyncio.Event) -> None:
        import aiohttp

        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
            while not stop.is_set():
                before = time.monotonic()
                try:
                    async with http.get(f"{router_url}/v1/model") as response:
                        body = await response.json()
                    self.traffic.polls.append((time.monotonic(), int(body["snapshot_version"])))
                except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                    log.warning("GET /v1/model failed: %r", exc)
                await asyncio.sleep(max(0.0, interval_s - (time.monotonic() - before)))

    async def wait_for(self, predicate, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.check()
            if predicate():
                return True
            await asyncio.sleep(0.05)
        return predicate()


def freshness(traffic: _Traffic, request_ids: Sequence[str]) -> tuple[list[float], int]:
    """Reward -> applied-snapshot delays for ``request_ids``, and how many were never applied."""
    # The router's applied versions over time, as the outcomes offset each includes (monotone).
    times, covered = [], []
    best = -1
    for polled, version in traffic.polls:
        offset = traffic.snapshot_offsets.get(version)
        if offset is None:
            continue  # the prior (0), or a version older than this run's snapshot tail
        best = max(best, offset)
        times.append(polled)
        covered.append(best)
    delays, missing = [], 0
    for request_id in request_ids:
        offset = traffic.outcome_offset.get(request_id)
        rewarded = traffic.rewarded_at.get(request_id)
        if offset is None or rewarded is None:
            missing += 1
            continue
        i = bisect.bisect_left(covered, offset)
        if i == len(covered):
            missing += 1
            continue
        delays.append(times[i] - rewarded)
    return delays, missing


class _Procs:
    """The loop's processes, by worker name, for memory and CPU figures."""

    def __init__(self, loop: LocalLoop, broker_pid: int | None) -> None:
        self.pids = {name: process.pid for name, process in loop.processes.items()}
        pid = loop.broker.pid if loop.broker is not None else broker_pid
        if pid is not None:
            self.pids["broker"] = pid
        self.pids["load generator (this process)"] = os.getpid()

    def rss(self) -> dict[str, float | None]:
        return {name: rss_mb(pid) for name, pid in self.pids.items()}

    def cpu(self) -> dict[str, float | None]:
        figures = {name: cpu_s(pid) for name, pid in self.pids.items()}
        figures["machine (every process)"] = machine_busy_s()
        return figures


def _cores(before: dict, after: dict, seconds: float) -> dict[str, float | None]:
    return {name: (None if before.get(name) is None or after.get(name) is None
                   else round((after[name] - before[name]) / seconds, 3)) for name in after}


def _scrape(url: str, name: str) -> float | None:
    """One value of a Prometheus text page (the first sample named ``name``), or None."""
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            for line in response.read().decode().splitlines():
                if line.startswith(name + " ") or line.startswith(name + "{"):
                    return float(line.rsplit(" ", 1)[1])
    except (OSError, ValueError):
        return None
    return None


def encoder_only_rps(url: str, prompts: list[str], seconds: float, batch: int = ROUTER_BATCH) -> float:
    """Prompts a second that the featuriser alone encodes, in batches of the routing worker's size."""
    from router.featurise import featuriser_from_url

    featuriser = featuriser_from_url(url)
    featuriser.encode([f"warm {p}" for p in prompts[:batch]])
    done, started, i = 0, time.perf_counter(), 0
    while True:
        chunk = [f"enc{i + j}. {prompts[(i + j) % len(prompts)]}" for j in range(batch)]
        featuriser.encode(chunk)
        i += batch
        done += batch
        elapsed = time.perf_counter() - started
        if elapsed >= seconds and done >= 3 * batch:
            return done / elapsed


@dataclass(frozen=True)
class LoopBenchOptions:
    featurisers: tuple[str, ...] = FEATURISERS
    #: The saturation (and memory) phase, seconds.
    duration_s: float = 180.0
    #: Requests kept inside the loop during saturation.
    window: int = 512
    loads: tuple[int, ...] = LOADS
    latency_s: float = 30.0
    warmup_s: float = 5.0
    encoder_s: float = 15.0
    poll_ms: float = 20.0
    #: Seconds to wait for the last outcomes/snapshots of the 200 rps phase.
    settle_s: float = 15.0
    dataset: str | None = None
    log_dir: str = ".routeloop/bench-loop"
    progress: bool = True


def _log(progress: bool, message: str) -> None:
    if progress:
        print(f"[bench loop] {message}", flush=True)


async def _phases(loop: LocalLoop, url: str, prompts: list[str], models: list[str], options: LoopBenchOptions,
                  procs: _Procs, out: dict, kind: str) -> None:
    """Warm up, then ``kind``: "throughput" (saturation, memory, encoder) or "latency" (open loop)."""
    s = loop.settings
    say = lambda message: _log(options.progress, f"{url}: {message}")  # noqa: E731
    async with LoadGenerator(s, prompts, models) as generator:
        # What this process holds by now (the data set, the modules, the clients, ~150k
        # objects) lives until the end: out of the collector's sight, a full collection no
        # longer scans it (40-50 ms with the generator's loop stopped, measured on a quiet
        # machine; the latency phases report the pauses left, generator_gc).
        gc.collect()
        gc.freeze()
        try:
            await _measure(loop, generator, url, prompts, options, procs, out, kind, say)
        finally:
            gc.unfreeze()  # process-wide: a caller (a test) gets its collector back as it was


async def _measure(loop: LocalLoop, generator: LoadGenerator, url: str, prompts: list[str],
                   options: LoopBenchOptions, procs: _Procs, out: dict, kind: str, say) -> None:
    s, t = loop.settings, generator.traffic
    # 1. Warm-up: until outcomes flow (the feedback worker's group join takes seconds).
    say("warming up")
    started = time.monotonic()
    warm = asyncio.create_task(generator.closed_loop(options.warmup_s + 60.0, window=16))
    await generator.wait_for(lambda: len(t.outcome_at) >= 16 or warm.done(), 90.0)
    await asyncio.sleep(options.warmup_s)
    warm.cancel()
    await asyncio.gather(warm, return_exceptions=True)
    generator._window = None
    if not t.outcome_at:
        loop.check_alive()
        raise RuntimeError(f"no outcome within {time.monotonic() - started:.0f} s of warm-up")
    await generator.wait_for(lambda: len(t.outcome_at) >= len(t.sent_at), 30.0)
    if kind == "latency":
        await _latency_phases(loop, generator, options, out, say)
        return
    rss_start = procs.rss()

    # 2. Saturation, the whole loop, for duration_s: also the memory phase.
    say(f"saturating the loop for {options.duration_s:g} s (window {options.window})")
    cpu_before, wall_before = procs.cpu(), time.monotonic()
    snapshots_before = len(t.snapshots_seen)
    begin, end = await generator.closed_loop(options.duration_s, options.window)
    cpu = _cores(cpu_before, procs.cpu(), time.monotonic() - wall_before)
    rss_end = procs.rss()
    loop.check_alive()
    skip = min(10.0, 0.1 * (end - begin))
    window_s = end - (begin + skip)
    completed = sum(1 for at in t.outcome_at.values() if begin + skip <= at <= end)
    decided = sum(1 for at in t.decided_at.values() if begin + skip <= at <= end)
    lag = _scrape(f"http://127.0.0.1:{s.http_port + 1}/metrics", "routeloop_learner_lag_outcomes")
    sustained = completed / window_s
    ours = sum(v for k, v in cpu.items() if v is not None and k != "machine (every process)")
    if cpu.get("machine (every process)") is not None:
        cpu["other processes (not this benchmark)"] = round(max(0.0, cpu["machine (every process)"] - ours), 3)
    busiest = max((name for name in procs.pids if cpu.get(name) is not None
                   and name != "load generator (this process)"), key=lambda name: cpu[name], default=None)
    out["sustained_rps"][url] = round(sustained, 1)
    out["saturation"][url] = {
        "outcomes_per_s": round(sustained, 1), "decisions_per_s": round(decided / window_s, 1),
        "window": options.window, "measured_s": round(window_s, 1),
        "snapshots_published_per_s": round((len(t.snapshots_seen) - snapshots_before) / (end - begin), 2),
        "learner_lag_outcomes_at_end": lag,
        "cpu_cores": cpu, "busiest_worker": busiest,
    }
    out["rss_mb"][url] = {name: {"start": rss_start.get(name), "end": rss_end.get(name)} for name in rss_end}
    say(f"sustained {sustained:.0f} requests/s through the loop; cpu {cpu}")
    # Let the loop drain the window before the next phase.
    await generator.wait_for(lambda: len(t.outcome_at) >= len(t.sent_at), 60.0)

    # 3. The encoder alone, same process kind of work, same prompts.
    say("encoder alone")
    out["encoder_only_rps"][url] = round(await asyncio.to_thread(
        encoder_only_rps, url, prompts, options.encoder_s), 1)



async def _latency_phases(loop: LocalLoop, generator: LoadGenerator, options: LoopBenchOptions, out: dict,
                          say) -> None:
    """4./5. Open-loop latency at each offered load, and freshness at the lowest one."""
    s, t = loop.settings, generator.traffic
    for rate in sorted(options.loads):
        say(f"open loop at {rate} requests/s for {options.latency_s:g} s")
        stop = asyncio.Event()
        poller = None
        if rate == min(options.loads) and loop.router_url:
            poller = asyncio.create_task(generator.poll_model(loop.router_url, options.poll_ms / 1e3, stop))
        with GcWatch() as gc_watch:
            begin, end, ids = await generator.open_loop(rate, options.latency_s)
            await generator.wait_for(lambda: all(i in t.decided_at for i in ids), 30.0)
        skip = min(2.0, 0.1 * options.latency_s)
        measured = [i for i in ids if i in t.decided_at and t.sent_at[i] >= begin + skip]
        figures = _percentiles_ms([t.decided_at[i] - t.sent_at[i] for i in measured])
        figures.update({"offered_rps": rate, "achieved_send_rps": round(len(ids) / (end - begin), 1),
                        "undecided": sum(1 for i in ids if i not in t.decided_at)})
        # Where it goes: until the router built the decision (its fetch wait and the routing),
        # then the produce, its acknowledgement and this process's fetch wait (up to
        # DECISIONS_FETCH_WAIT_MS: the embedded broker holds a fetch that long).
        figures["to_decided"] = _percentiles_ms(
            [t.decision_created_wall[i] - t.created_wall[i] for i in measured if i in t.decision_created_wall])
        figures["decided_to_seen"] = _percentiles_ms(
            [(t.decided_at[i] - t.sent_at[i]) - (t.decision_created_wall[i] - t.created_wall[i])
             for i in measured if i in t.decision_created_wall])
        figures["generator_gc"] = gc_watch.summary()
        out["latency_ms"][str(rate)] = figures
        say(f"request->decision p50 {figures['p50']} ms, p99 {figures['p99']} ms")
        if poller is not None:
            # Until every reward of the phase is in a snapshot the router applied.
            def applied_all() -> bool:
                delays, missing = freshness(t, ids)
                return missing == 0
            await generator.wait_for(applied_all, options.settle_s + s.snapshot_every_s)
            stop.set()
            await poller
            delays, missing = freshness(t, ids)
            fresh = _percentiles_ms(delays)
            fresh.update({"not_applied": missing, "offered_rps": rate, "poll_ms": options.poll_ms,
                          "snapshot_every_n": s.snapshot_every_n, "snapshot_every_s": s.snapshot_every_s})
            out["freshness_ms"] = fresh
            say(f"freshness p50 {fresh['p50']} ms, p99 {fresh['p99']} ms")
        if rate != max(options.loads):  # let a backlog (a load over capacity) drain first
            await generator.wait_for(lambda: len(t.outcome_at) >= len(t.sent_at), 120.0)


def _workload(dataset: str | None) -> tuple[list[str], list[str], str]:
    from router.bench.speed import DEFAULT_PROMPTS
    from router.datasets import load_dataset, synthetic_dataset

    path = Path(dataset) if dataset else DEFAULT_PROMPTS
    if path.exists():
        data, source = load_dataset(path), f"routerbench ({path})"
    else:
        data, source = synthetic_dataset(), "synthetic (RouterBench not found)"
    models = list(data.models)[:ARMS]
    models += [f"model-{k}" for k in range(len(models), ARMS)]
    return list(data.prompts), models, source


def run_loop_bench(settings: Settings | None = None, options: LoopBenchOptions = LoopBenchOptions(),
                   report: str | Path | None = None, *, start_broker: bool = True,
                   broker_pid: int | None = None) -> dict:
    """Run the loop benchmark (see the module docstring); write the JSON report if asked; return it.

    With ``start_broker`` (the default) each featuriser gets a fresh embedded broker; without,
    the workers join the cluster ``settings`` names (``broker_pid`` then gives the broker's
    memory figures, when it runs on this machine), each featuriser on its own topic prefix.
    """
    settings = settings or Settings.load()
    prompts, models, source = _workload(options.dataset)
    out: dict = {"sustained_rps": {}, "encoder_only_rps": {}, "latency_ms": {}, "freshness_ms": {},
                 "rss_mb": {}, "saturation": {}, "skipped": {}}
    started = time.monotonic()
    for index, url in enumerate(options.featurisers):
        try:
            from router.featurise import featuriser_from_url

            featuriser_from_url(url)  # the encoder loads here, or the reason it cannot
        except ImportError as error:
            out["skipped"][url] = str(error)
            continue
        # Latency on a fresh loop, then throughput and memory on another: the embedded broker
        # keeps every message, and a phase must not run on what the previous one left.
        for kind in (("latency", "throughput") if url == HASHING else ("throughput",)):
            live = settings.model_copy(update={
                "models": tuple(models), "featuriser": url,
                "topic_prefix": settings.topic_prefix if start_broker else f"{settings.topic_prefix}b{index}{kind[0]}.",
            })
            log_dir = Path(options.log_dir) / f"{index}-{kind}"
            live = live.model_copy(update={"data_dir": str(log_dir / "data")})
            loop = LocalLoop(live, log_dir=log_dir, start_broker=start_broker)
            _log(options.progress, f"{url}: starting the broker and workers for {kind} (logs in {log_dir})")
            with loop:
                loop.wait_until_healthy(timeout_s=120)
                procs = _Procs(loop, broker_pid)
                asyncio.run(_phases(loop, url, prompts, models, options, procs, out, kind))
                loop.check_alive()
    # The keys the issue asks for, with the worker names only (the load generator is extra).
    out["setup"] = {
        "featurisers": list(options.featurisers), "arms": len(models), "prompts": source,
        "window": options.window, "duration_s": options.duration_s, "latency_s": options.latency_s,
        "loads": list(options.loads), "partitions": settings.partitions,
        "snapshot_every_n": settings.snapshot_every_n, "snapshot_every_s": settings.snapshot_every_s,
        "reward_delay_s": 0.0, "cpu_count": os.cpu_count(), "loadavg_end": [round(v, 2) for v in os.getloadavg()],
        "note": "every party but the workers is this process; CPU figures are cores used during saturation",
    }
    out["wall_s"] = round(time.monotonic() - started, 1)
    if report is not None:
        Path(report).write_bytes(orjson.dumps(out, option=orjson.OPT_INDENT_2))
    return out


def format_loop_report(report: dict) -> str:
    lines = []
    for url, rps in report["sustained_rps"].items():
        sat = report["saturation"][url]
        lines.append(f"{url}: sustained {rps:.0f} requests/s through the whole loop "
                     f"(encoder alone {report['encoder_only_rps'].get(url, float('nan')):.0f}/s); "
                     f"busiest: {sat['busiest_worker']}; cores {sat['cpu_cores']}")
        for worker, mb in report["rss_mb"][url].items():
            lines.append(f"    rss {worker}: {mb['start']} -> {mb['end']} MB")
    for rate, figures in report["latency_ms"].items():
        line = f"offered {rate}/s: request->decision p50 {figures['p50']:.1f} ms, p99 {figures['p99']:.1f} ms"
        if (figures.get("to_decided") or {}).get("p50") is not None:
            line += (f" (to decided p50 {figures['to_decided']['p50']:.1f} / p99 {figures['to_decided']['p99']:.1f}, "
                     f"then to seen p50 {figures['decided_to_seen']['p50']:.1f} / "
                     f"p99 {figures['decided_to_seen']['p99']:.1f})")
        lines.append(line)
    fresh = report.get("freshness_ms") or {}
    if fresh.get("p50") is not None:
        lines.append(f"freshness (reward -> applied snapshot): p50 {fresh['p50']:.0f} ms, p99 {fresh['p99']:.0f} ms")
    for url, why in report.get("skipped", {}).items():
        lines.append(f"{url}: skipped ({why})")
    return "\n".join(lines)
