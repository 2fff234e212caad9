"""Prometheus metrics of every worker: their names, help texts, and where they are served.

Each worker kind has its own set, on a registry of its own (so a test process can run two
workers without their figures mixing), with the process and Python collectors added::

    metrics = RouterMetrics()
    metrics.decisions.labels(model="gpt-4").inc()
    generate_latest(metrics.registry)                     # the text /metrics serves

    port = metrics_port(settings, "learner")              # http_port + 1, or None
    server = serve_metrics(LearnerMetrics().registry, port)   # /metrics in a thread
    server.shutdown()

Ports, from the one ``http_port`` setting: the routing worker serves ``/metrics`` on its
HTTP API at ``http_port``, the learner at ``http_port + 1``, the feedback worker at
``http_port + 2``; ``http_port = 0`` turns them all off. (Workers of different kinds on one
host therefore never collide; two workers of one kind on one host need their own settings.)

>>> metrics_port(Settings(http_port=8080), "feedback"), metrics_port(Settings(http_port=0), "router")
(8082, None)
"""

from __future__ import annotations

from typing import Literal
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from schemas.settings import Settings

WorkerKind = Literal["router", "learner", "feedback"]

#: Offsets from ``settings.http_port`` of each worker kind's metrics port.
PORT_OFFSETS: dict[WorkerKind, int] = {"router": 0, "learner": 1, "feedback": 2}

#: Decision latencies are milliseconds on a warm worker and seconds under a backlog.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

def metrics_port(settings: Settings, worker: WorkerKind) -> int | None:
    """The port a worker kind serves ``/metrics`` on, or None when HTTP is off (``http_port`` 0)."""
    if settings.http_port == 0:
        return None
    return settings.http_port + PORT_OFFSETS[worker]


def _registry() -> CollectorRegistry:
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


def _deadletters(registry: CollectorRegistry) -> Counter:
    return Counter(
        "routeloop_deadletters", "Events written to the dead-letter topic, by reason code and worker kind.",
        ["reason", "worker"], registry=registry)


class RouterMetrics:
    """The routing worker's metrics (served on its HTTP API at ``/metrics``)."""

    def __init__(self) -> None:
        r = self.registry = _registry()
        self.decisions = Counter(
            "routeloop_decisions", "Routing decisions made, by chosen model (Kafka and HTTP).",
            ["model"], registry=r)
        self.explorations = Counter(
            "routeloop_exploration_decisions",
            "Decisions whose drawn model was not the greedy one (best by the current estimates).",
            registry=r)
        self.http_responses = Counter(
            "routeloop_http_responses", "Responses of the routing worker's HTTP API, by route and status.",
            ["route", "status"], registry=r)
        self.deadletters = _deadletters(r)
        self.decision_latency = Histogram(
            "routeloop_decision_latency_seconds",
            "Seconds from the worker having a request (fetched from Kafka or received over HTTP) "
            "to its decision being acknowledged by the broker.",
            ["source"], buckets=LATENCY_BUCKETS, registry=r)
        self.snapshot_version = Gauge(
            "routeloop_snapshot_version", "Version of the snapshot the router routes with (0: the prior).",
            registry=r)
        self.snapshot_age = Gauge(
            "routeloop_snapshot_age_seconds",
            "Seconds since the learner created the snapshot the router routes with (NaN before any).",
            registry=r)
        self.snapshots_applied = Counter(
            "routeloop_snapshots_applied", "Snapshots verified and swapped in.", registry=r)
        self.snapshots_stale = Counter(
            "routeloop_snapshots_stale", "Valid snapshots ignored: not newer than the one in use.",
            registry=r)
        self.snapshots_refused = Counter(
            "routeloop_snapshots_refused",
            "Snapshots refused (bad checksum or signature, unsigned, wrong dimension...), by reason.",
            ["reason"], registry=r)
        self.model_enabled = Gauge(
            "routeloop_model_enabled",
            "1 for a model the registry lets the router choose, 0 for a removed one. A model's "
            "share of traffic: rate(routeloop_decisions{model=...}) over the sum of all models'.",
            ["model"], registry=r)
        self.model_price = Gauge(
            "routeloop_model_price", "Each model's price in the registry (NaN: none registered).",
            ["model"], registry=r)
        self.specs_refused = Counter(
            "routeloop_registry_records_refused", "Models-topic records that are not a valid ModelSpec.",
            registry=r)


class LearnerMetrics:
    """The learner's metrics (served at ``http_port + 1``)."""

    def __init__(self) -> None:
        r = self.registry = _registry()
        self.updates = Counter(
            "routeloop_learner_updates", "Outcomes the model learned from (each request once).",
            registry=r)
        self.duplicates = Counter(
            "routeloop_learner_duplicate_outcomes",
            "Outcomes skipped because their request was already learned from (at-least-once).",
            registry=r)
        self.lag = Gauge(
            "routeloop_learner_lag_outcomes",
            "Outcomes on the topic not yet read by the learner, from the last fetch's high watermark "
            "(the embedded broker may report it up to one batch low).",
            registry=r)
        self.offset = Gauge(
            "routeloop_learner_outcomes_offset", "The last outcomes offset the model includes.",
            registry=r)
        self.snapshots_published = Counter(
            "routeloop_learner_snapshots_published", "Snapshots the learner published.", registry=r)
        self.snapshot_version = Gauge(
            "routeloop_learner_snapshot_version", "Version of the newest snapshot the learner published.",
            registry=r)
        self.deadletters = _deadletters(r)


class FeedbackMetrics:
    """The feedback worker's metrics (served at ``http_port + 2``)."""

    def __init__(self) -> None:
        r = self.registry = _registry()
        self.outcomes = Counter(
            "routeloop_outcomes",
            "Outcomes emitted, by completion: joined (every piece came) or defaulted (the window closed).",
            ["completion"], registry=r)
        self.late_rewards = Counter(
            "routeloop_late_rewards", "Rewards that came after their request's entry was closed.",
            registry=r)
        self.deadletters = _deadletters(r)


def serve_metrics(registry: CollectorRegistry, port: int | None) -> WSGIServer | None:
    """Serve ``registry`` as Prometheus text on ``port`` (all interfaces) in a daemon thread.

    None (nothing served) when ``port`` is None. Stop it with ``server.shutdown()``.
    """
    if port is None:
        return None
    server, _thread = start_http_server(port, registry=registry)
    return server


__all__ = [
    "FeedbackMetrics", "LearnerMetrics", "RouterMetrics", "PORT_OFFSETS",
    "metrics_port", "serve_metrics",
]