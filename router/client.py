"""The Python SDK: route a prompt through Kafka and report what came of it.

``AsyncRouteloopClient`` publishes a RouteRequest to the requests topic and awaits its
decision on the decisions topic; one consumer of the decisions topic serves every pending
call (futures keyed by request_id). ``RouteloopClient`` is the same for synchronous code,
running its own event loop in a thread. With a broker and a routing worker running (e.g.
``routeloop up``), this runs as is::

    import asyncio
    from router.client import AsyncRouteloopClient
    from schemas.settings import Settings

    async def main() -> None:
        async with AsyncRouteloopClient(Settings.load()) as client:
            decision = await client.route("What is the capital of France?",
                                          preference={"quality": 0.9, "cost": 0.1})
            print(decision.model, decision.propensity)
            # ... call decision.model, then tell routeloop what it cost and how good it was:
            await client.report_response(decision.request_id, decision.model, cost_usd=0.0004)
            await client.report_reward(decision.request_id, quality=1.0, evaluator="exact-match")

    asyncio.run(main())

    with RouteloopClient(Settings.load()) as client:          # the same, synchronously
        decision = client.route("What is 2+2?", candidates=["gpt-4", "mixtral"], timeout=10)

Downstream consumers of decisions (a caller that runs the chosen model) read them in a
consumer group::

    async for decision in client.decisions(group_id="my-llm-caller"):
        ...

Every client reads the whole decisions topic to find its own decisions, which is fine for
a handful of clients; many low-volume callers are better served by the routing worker's
HTTP API (``POST /v1/route``, router.http), which answers on the connection.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import uuid
from collections.abc import AsyncIterator, Coroutine, Iterator, Mapping, Sequence
from typing import Any, Literal, TypeVar

import numpy as np
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from deploy.kafka import make_consumer, make_producer
from deploy.topics import expected_partitions
from schemas import (
    DecodeError,
    ModelResponse,
    Preference,
    RewardEvent,
    RouteDecision,
    RouteRequest,
    decode,
    encode,
)
from schemas.settings import Settings

log = logging.getLogger(__name__)

T = TypeVar("T")
E = TypeVar("E", ModelResponse, RewardEvent)

#: Seconds ``route`` waits for a decision unless told otherwise.
DEFAULT_TIMEOUT_S = 30.0


class RouteTimeout(TimeoutError):
    """No decision came for a request within the timeout (is a routing worker running?)."""

    def __init__(self, request_id: str, timeout: float, topic: str) -> None:
        super().__init__(f"no decision for request {request_id!r} within {timeout:g} s on {topic}: "
                         "is a routing worker running on these topics? (A request it cannot route, "
                         "e.g. with no known candidate, goes to the deadletter topic unanswered.)")
        self.request_id = request_id
        self.timeout = timeout


class AsyncRouteloopClient:
    """Route prompts and report outcomes through Kafka, from asyncio code.

    Use it as ``async with AsyncRouteloopClient(settings) as client:`` (or ``await
    client.start()`` ... ``await client.close()``); see the module docstring.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._producer: AIOKafkaProducer | None = None
        self._decisions: AIOKafkaConsumer | None = None
        self._reader: asyncio.Task[None] | None = None
        self._pending: dict[str, asyncio.Future[RouteDecision]] = {}

    async def start(self) -> None:
        """Connect, and start reading decisions from the end of the decisions topic."""
        s = self.settings
        self._producer = make_producer(s)
        self._decisions = make_consumer(s, group_id=None, enable_auto_commit=False)
        await self._producer.start()
        await self._decisions.start()
        topic = s.topic("decisions")
        parts = [TopicPartition(topic, p) for p in range(expected_partitions(s)[topic])]
        self._decisions.assign(parts)
        # Resolved now, before any request is sent, so no decision can slip past. (The embedded
        # broker may place the end a batch early: a few older decisions are read and ignored.)
        await self._decisions.seek_to_end(*parts)
        self._reader = asyncio.create_task(self._read_decisions(self._decisions))

    async def close(self) -> None:
        """Stop reading and disconnect; pending ``route`` calls fail."""
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        for future in self._pending.values():
            if not future.done():
                future.set_exception(RuntimeError("the client was closed"))
        if self._decisions is not None:
            await self._decisions.stop()
        if self._producer is not None:
            await self._producer.stop()
        self._reader = self._decisions = self._producer = None

    async def __aenter__(self) -> AsyncRouteloopClient:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def route(
        self,
        prompt: str | None = None,
        *,
        embedding: Sequence[float] | np.ndarray | None = None,
        preference: Preference | Mapping[str, float] | None = None,
        candidates: Sequence[str] | None = None,
        budget_usd: float | None = None,
        request_id: str | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
    ) -> RouteDecision:
        """Publish a routing request and return its decision.

        ``prompt`` or ``embedding`` (the featuriser's dimension) is required; ``preference``
        defaults to the routing worker's, ``candidates`` to every model. Raises
        :class:`RouteTimeout` when no decision comes within ``timeout`` seconds, and
        pydantic's ValidationError for an invalid request (before anything is sent).
        """
        request = RouteRequest(
            request_id=request_id or uuid.uuid4().hex,
            prompt=prompt,
            embedding=None if embedding is None else np.asarray(embedding, dtype=np.float32),
            preference=dict(preference) if isinstance(preference, Mapping) else preference,
            candidates=None if candidates is None else list(candidates),
            budget_usd=budget_usd,
        )
        producer = self._started()
        future: asyncio.Future[RouteDecision] = asyncio.get_running_loop().create_future()
        self._pending[request.request_id] = future  # before sending: the decision may be quick
        try:
            async with asyncio.timeout(timeout):
                await producer.send_and_wait(self.settings.topic("requests"), encode(request),
                                             key=request.request_id.encode())
                return await future
        except TimeoutError:
            raise RouteTimeout(request.request_id, timeout, self.settings.topic("decisions")) from None
        finally:
            self._pending.pop(request.request_id, None)

    async def report_response(
        self,
        request_id: str,
        model: str,
        cost_usd: float,
        *,
        prompt_tokens: int | None = None,
        completion_tokens: int | None = None,
        latency_ms: float | None = None,
        status: Literal["ok", "error"] = "ok",
    ) -> ModelResponse:
        """Report that ``model`` answered ``request_id`` at ``cost_usd`` (the responses topic)."""
        return await self._publish("responses", ModelResponse(
            request_id=request_id, model=model, cost_usd=cost_usd, prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens, latency_ms=latency_ms, status=status))

    async def report_reward(
        self,
        request_id: str,
        quality: float,
        *,
        evaluator: str = "default",
        reward_id: str | None = None,
    ) -> RewardEvent:
        """Report a quality score in [0, 1] for the response to ``request_id`` (the rewards topic).

        ``reward_id`` de-duplicates: it defaults to ``request_id/evaluator``, so an evaluator
        that reports twice is counted once.
        """
        return await self._publish("rewards", RewardEvent(
            reward_id=reward_id or f"{request_id}/{evaluator}", request_id=request_id,
            quality=quality, evaluator=evaluator))

    async def decisions(self, group_id: str, *, from_beginning: bool = False) -> AsyncIterator[RouteDecision]:
        """Every decision, in a consumer group: for downstream callers that run the chosen model.

        Members of one ``group_id`` share the decisions' partitions; offsets are committed
        automatically. A new group starts at the end of the topic, or at its beginning with
        ``from_beginning``. Undecodable records are skipped (the feedback worker dead-letters
        them). Stop by breaking out of the loop.
        """
        consumer = make_consumer(
            self.settings, self.settings.topic("decisions"), group_id=group_id,
            auto_offset_reset="earliest" if from_beginning else "latest", enable_auto_commit=True)
        await consumer.start()
        try:
            async for record in consumer:
                try:
                    yield decode(RouteDecision, record.value)
                except DecodeError as exc:
                    log.warning("skipping decision at %s[%d]@%d: %s", record.topic, record.partition,
                                record.offset, exc)
        finally:
            await consumer.stop()

    def _started(self) -> AIOKafkaProducer:
        if self._producer is None or self._reader is None:
            raise RuntimeError("the client is not started: use `async with` or await start()")
        if self._reader.done():
            raise RuntimeError("the client stopped reading decisions") from self._reader.exception()
        return self._producer

    async def _publish(self, short: str, event: E) -> E:
        await self._started().send_and_wait(self.settings.topic(short), encode(event),
                                            key=event.request_id.encode())
        return event

    async def _read_decisions(self, consumer: AIOKafkaConsumer) -> None:
        try:
            while True:
                for records in (await consumer.getmany(timeout_ms=500)).values():
                    for record in records:
                        future = self._pending.get((record.key or b"").decode(errors="replace"))
                        if future is None or future.done():
                            continue  # another client's decision, or a re-sent one
                        try:
                            future.set_result(decode(RouteDecision, record.value))
                        except DecodeError as exc:
                            log.warning("undecodable decision for %s: %s", record.key, exc)
        except Exception as exc:  # noqa: BLE001 - fail the callers loudly rather than time them out
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(exc)
            raise


class RouteloopClient:
    """The synchronous client: :class:`AsyncRouteloopClient` on an event loop of its own.

    Connects when created; ``close()`` it, or use ``with RouteloopClient(settings) as client:``.
    The methods and their arguments are the async client's.
    """

    def __init__(self, settings: Settings) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="routeloop-client", daemon=True)
        self._thread.start()
        self._client = AsyncRouteloopClient(settings)
        try:
            self._call(self._client.start())
        except BaseException:
            self.close()
            raise

    def _call(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def route(self, prompt: str | None = None, **kwargs: Any) -> RouteDecision:
        """See :meth:`AsyncRouteloopClient.route`."""
        return self._call(self._client.route(prompt, **kwargs))

    def report_response(self, request_id: str, model: str, cost_usd: float, **kwargs: Any) -> ModelResponse:
        """See :meth:`AsyncRouteloopClient.report_response`."""
        return self._call(self._client.report_response(request_id, model, cost_usd, **kwargs))

    def report_reward(self, request_id: str, quality: float, **kwargs: Any) -> RewardEvent:
        """See :meth:`AsyncRouteloopClient.report_reward`."""
        return self._call(self._client.report_reward(request_id, quality, **kwargs))

    def decisions(self, group_id: str, *, from_beginning: bool = False) -> Iterator[RouteDecision]:
        """See :meth:`AsyncRouteloopClient.decisions`."""
        stream = self._client.decisions(group_id, from_beginning=from_beginning)
        try:
            while True:
                try:
                    yield self._call(stream.__anext__())
                except StopAsyncIteration:
                    return
        finally:
            self._call(stream.aclose())

    def close(self) -> None:
        if self._loop.is_running():
            self._call(self._client.close())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
        self._loop.close()

    def __enter__(self) -> RouteloopClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
