"""The routing worker's HTTP API (aiohttp): route a prompt, report outcomes, inspect and probe it.

=======================  ==============================================================
``POST /v1/route``       a RouteRequest's fields (``request_id`` optional): the decision,
                         also produced to the decisions topic like a Kafka-routed one
``POST /v1/responses``   a ModelResponse: produced to the responses topic (202)
``POST /v1/rewards``     a RewardEvent: produced to the rewards topic (202)
``GET /v1/model``        the snapshot in use: version, age, arms, updates, applied/refused
``GET /healthz``         200 when consuming and the broker answers, else 503 with a reason
``GET /metrics``         Prometheus text (router.metrics)
``GET /openapi.json``    the OpenAPI 3.1 document of all of the above
=======================  ==============================================================

Bodies are read with the topics' own codec, and strictly (no strings for numbers): not JSON
is 400, an invalid event 422 (``{"error": reason, "detail": ...}``), over 1 MiB 413; the
broker unreachable is 503. The routing worker starts it itself on
``settings.http_port``::

    runner = await serve(worker, 8080)     # an aiohttp AppRunner, listening on all interfaces
    await runner.cleanup()

    curl -s localhost:8080/v1/route -d '{"prompt": "What is 2+2?", "candidates": ["a", "b"]}'
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from importlib.metadata import version
from typing import TYPE_CHECKING, Any, Literal

import orjson
from aiohttp import web
from aiokafka.errors import KafkaError
from prometheus_client.exposition import choose_encoder
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.json_schema import models_json_schema

from schemas import DecodeError, Event, ModelResponse, Preference, RewardEvent, RouteRequest, decode
from schemas.codec import MAX_EVENT_BYTES
from schemas.events import Id, Name

if TYPE_CHECKING:
    from router.worker import RoutingWorker

log = logging.getLogger(__name__)

#: The decode reasons that mean "not a JSON object at all" (400); others are 422.
_NOT_JSON = {"empty", "invalid_json"}


class RouteBody(RouteRequest):
    """A routing request over HTTP: a RouteRequest whose ``request_id`` is generated if absent."""

    model_config = ConfigDict(json_schema_extra={
        # The model's own validator says this; the schema must say it too.
        "anyOf": [{"required": ["prompt"], "properties": {"prompt": {"type": "string"}}},
                  {"required": ["embedding"], "properties": {"embedding": {"not": {"type": "null"}}}}],
    })

    request_id: Id | None = None


class RouteAnswer(BaseModel):
    """The decision for a routed request (its feature vector left out)."""

    request_id: str
    model: str
    propensity: float
    distribution: dict[str, float]
    preference: Preference
    snapshot_version: int
    cold_start: bool
    policy: str
    featuriser: str
    price: float | None = Field(description="the model's registered price; null when it has none")
    created_at: float


class Accepted(BaseModel):
    """An event accepted and acknowledged by the broker."""

    topic: str
    request_id: str


class SnapshotCounts(BaseModel):
    applied: int
    refused: int
    stale: int
    #: Refused snapshots by reason code (``bad_signature``, ``unsigned``, ``bad_dimension``...).
    refusals: dict[str, int]


class ModelInfo(BaseModel):
    """The model the router decides with."""

    snapshot_version: int = Field(description="0 while routing with the prior")
    snapshot_age_s: float | None = Field(description="seconds since the snapshot was created; null before any")
    cold_start: bool
    policy: str
    featuriser: str
    dim: int
    arms: list[str]
    enabled: list[str] = Field(description="the arms the registry lets the router choose")
    prices: dict[str, float] = Field(description="registered prices, by model (unpriced ones absent)")
    n_updates: int = Field(description="outcomes the snapshot's model learned from")
    snapshots: SnapshotCounts


class Health(BaseModel):
    status: Literal["ok", "unavailable"]
    reason: str | None = Field(description="why the worker is unavailable; null when ok")
    consuming: bool
    broker_reachable: bool
    assigned_partitions: list[int]


class ErrorBody(BaseModel):
    error: Name = Field(description="a machine-readable code, as in dead letters: invalid_json, "
                        "invalid_event, unknown_model, bad_dimension, too_large, not_found...")
    detail: str


def _json(model: BaseModel, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(model.model_dump(mode="json")), status=status,
                        content_type="application/json")


def _error(status: int, error: str, detail: str) -> web.Response:
    return _json(ErrorBody(error=error, detail=detail), status)


async def _event(request: web.Request, model: type[Event]) -> Event:
    """The body decoded as ``model`` with the topics' codec, and strictly; DecodeError if not.

    Strictly: JSON's own types only, so ``"0.5"`` is not a number and ``false`` not a time.
    (The topics' codec is lax there, and a preference of strings then escapes normalisation.)
    """
    raw = await request.read()
    event = decode(model, raw)  # size, JSON, an object, the event's rules: the reason codes
    try:
        model.model_validate(orjson.loads(raw), strict=True)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        raise DecodeError("invalid_event", f"{'.'.join(map(str, first['loc']))}: {first['msg']}") from None
    return event


class RoutingAPI:
    """The handlers, over one running RoutingWorker."""

    def __init__(self, worker: RoutingWorker) -> None:
        self.worker = worker

    async def route(self, request: web.Request) -> web.Response:
        body = await _event(request, RouteBody)
        routed = body.model_copy(update={"request_id": body.request_id or uuid.uuid4().hex})
        decision = await self.worker.decide(routed)
        return _json(RouteAnswer.model_validate(decision.model_dump(exclude={"features"})))

    async def responses(self, request: web.Request) -> web.Response:
        return await self._accept(request, ModelResponse, "responses")

    async def rewards(self, request: web.Request) -> web.Response:
        return await self._accept(request, RewardEvent, "rewards")

    async def _accept(self, request: web.Request, model: type[Event], short: str) -> web.Response:
        event = await _event(request, model)
        await self.worker.publish(short, event)
        return _json(Accepted(topic=self.worker.settings.topic(short),
                              request_id=event.request_id), 202)  # type: ignore[attr-defined]

    async def model(self, _: web.Request) -> web.Response:
        router = self.worker.router
        current, stats = router.model, router.stats
        return _json(ModelInfo(
            snapshot_version=current.version,
            snapshot_age_s=router.snapshot_age_s,
            cold_start=current.version == 0,
            policy=current.policy.name,
            featuriser=router.featuriser.name,
            dim=router.featuriser.dim,
            arms=current.policy.arms,
            enabled=[a for a, on in zip(current.policy.arms, current.enabled) if on],
            prices={a: p for a, p in zip(current.policy.arms, current.prices) if p is not None},
            n_updates=current.policy.n_updates,
            snapshots=SnapshotCounts(applied=stats.snapshots_applied, refused=stats.snapshots_refused,
                                     stale=stats.snapshots_stale, refusals=dict(stats.refusals)),
        ))

    async def healthz(self, _: web.Request) -> web.Response:
        stalled = self.worker.stalled()
        unreachable = await self.worker.broker_problem()
        reason = "; ".join(r for r in (stalled, unreachable) if r) or None
        return _json(Health(status="unavailable" if reason else "ok", reason=reason,
                            consuming=stalled is None, broker_reachable=unreachable is None,
                            assigned_partitions=self.worker.assigned_partitions),
                     503 if reason else 200)

    async def metrics(self, request: web.Request) -> web.Response:
        # Prometheus text 0.0.4 unless the scraper asks for OpenMetrics or text 1.0.0.
        encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
        return web.Response(body=encoder(self.worker.metrics.registry), headers={"Content-Type": content_type})

    async def openapi(self, _: web.Request) -> web.Response:
        return web.Response(body=orjson.dumps(openapi_document()), content_type="application/json")


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def create_app(worker: RoutingWorker) -> web.Application:
    """The aiohttp application of the API over ``worker`` (which must be running to route)."""
    api = RoutingAPI(worker)

    @web.middleware
    async def errors_as_json(request: web.Request, handler: Handler) -> web.StreamResponse:
        started = time.monotonic()
        try:
            response = await handler(request)
        except DecodeError as exc:
            status = 413 if exc.reason == "too_large" else 400 if exc.reason in _NOT_JSON else 422
            response = _error(status, exc.reason, exc.detail)
        except web.HTTPException as exc:  # aiohttp's own: 404, 405, 413...
            code = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}.get(exc.status, "http_error")
            response = _error(exc.status, code, exc.reason)
            if exc.status == 405:
                response.headers["Allow"] = exc.headers.get("Allow", "")
        except KafkaError as exc:
            log.warning("%s %s: broker unavailable: %r", request.method, request.path, exc)
            response = _error(503, "broker_unavailable", repr(exc))
        except Exception as exc:  # noqa: BLE001 - a bug: log it, answer JSON, keep serving
            log.exception("%s %s failed", request.method, request.path)
            response = _error(500, "internal_error", repr(exc))
        route = request.match_info.route.resource
        worker.metrics.http_responses.labels(
            route=route.canonical if route is not None else "unmatched", status=str(response.status)).inc()
        log.debug("%s %s -> %d in %.1f ms", request.method, request.path, response.status,
                  (time.monotonic() - started) * 1e3)
        return response

    # Bodies up to the topics' event limit; aiohttp answers 413 beyond it.
    app = web.Application(middlewares=[errors_as_json], client_max_size=MAX_EVENT_BYTES)
    app.add_routes([
        web.post("/v1/route", api.route),
        web.post("/v1/responses", api.responses),
        web.post("/v1/rewards", api.rewards),
        web.get("/v1/model", api.model, allow_head=False),
        web.get("/healthz", api.healthz, allow_head=False),
        web.get("/metrics", api.metrics, allow_head=False),
        web.get("/openapi.json", api.openapi, allow_head=False),
    ])
    return app


async def serve(worker: RoutingWorker, port: int, host: str = "0.0.0.0") -> web.AppRunner:
    """Start the API on ``host:port``; stop it with ``await runner.cleanup()``."""
    runner = web.AppRunner(create_app(worker), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner


# -- the OpenAPI document, from the models above --------------------------------------------

def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _content(schema: dict[str, Any], media: str = "application/json") -> dict[str, Any]:
    return {"content": {media: {"schema": schema}}}


def _errors(*statuses: int) -> dict[str, Any]:
    meaning = {400: "The body is not a JSON object.", 413: "The body is larger than 1 MiB.",
               422: "The body is not a valid event (the detail names the field).",
               503: "The broker did not acknowledge the event."}
    return {str(s): {"description": meaning[s], **_content(_ref("ErrorBody"))} for s in statuses}


def _post(operation_id: str, summary: str, body: str, answer: str, status: int, extra: str = "") -> dict:
    return {"post": {
        "operationId": operation_id, "summary": summary, "description": extra or summary,
        "requestBody": {"required": True, **_content(_ref(body))},
        "responses": {str(status): {"description": "Done.", **_content(_ref(answer))},
                      **_errors(400, 413, 422, 503)},
    }}


def _get(operation_id: str, summary: str, responses: dict[str, Any]) -> dict:
    return {"get": {"operationId": operation_id, "summary": summary, "responses": responses}}


def openapi_document() -> dict[str, Any]:
    """The OpenAPI 3.1 document of the API; its schemas are the pydantic models' JSON Schemas."""
    models = [(RouteBody, "validation"), (ModelResponse, "validation"), (RewardEvent, "validation"),
              (RouteAnswer, "serialization"), (Accepted, "serialization"), (ModelInfo, "serialization"),
              (Health, "serialization"), (ErrorBody, "serialization")]
    _, schemas = models_json_schema(models, ref_template="#/components/schemas/{model}")
    ok = {"description": "OK."}
    return {
        "openapi": "3.1.0",
        "info": {"title": "routeloop routing worker", "version": version("routeloop"),
                 "description": "Route prompts to LLMs and report what they cost and how good they were. "
                                "Every event is also on its Kafka topic, keyed by request_id."},
        "paths": {
            "/v1/route": _post(
                "route", "Route one prompt to a model.", "RouteBody", "RouteAnswer", 200,
                "Decide with the snapshot in use and produce the decision to the decisions topic, exactly "
                "like a request read from the requests topic. 422 also when the embedding's dimension is "
                "not the featuriser's (bad_dimension) or no candidate is a known model (unknown_model)."),
            "/v1/responses": _post("report_response", "Report the chosen model's cost.",
                                   "ModelResponse", "Accepted", 202),
            "/v1/rewards": _post("report_reward", "Report a quality score for a response.",
                                 "RewardEvent", "Accepted", 202),
            "/v1/model": _get("model", "The snapshot the router routes with.",
                              {"200": {**ok, **_content(_ref("ModelInfo"))}}),
            "/healthz": _get("healthz", "Consuming and the broker reachable?", {
                "200": {**ok, **_content(_ref("Health"))},
                "503": {"description": "Not consuming or the broker unreachable.", **_content(_ref("Health"))}}),
            "/metrics": _get("metrics", "Prometheus metrics.", {
                "200": {**ok, "content": {media: {"schema": {"type": "string"}}
                                          for media in ("text/plain", "application/openmetrics-text")}}}),
            "/openapi.json": _get("openapi", "This document.", {
                "200": {**ok, **_content({"type": "object"})}}),
        },
        "components": {"schemas": schemas["$defs"]},
    }
