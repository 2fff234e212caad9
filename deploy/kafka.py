"""Kafka client settings: one place that turns :class:`Settings` into client arguments.

Every worker connects through these helpers, so the security settings (TLS, SASL PLAIN or
SCRAM) and the embedded broker's constraints are applied the same way everywhere::

    producer = make_producer(settings)                 # aiokafka, not started yet
    consumer = make_consumer(settings, settings.topic("decisions"), group_id="feedback")
    admin = AIOKafkaAdminClient(**client_kwargs(settings))
    app = faust.App("routeloop-feedback", **faust_broker_kwargs(settings))

It also notices a broker that came back empty (an embedded broker restarted, a cluster
rebuilt): every worker then stops with :class:`BrokerResetError` instead of carrying on
against a log that no longer matches its offsets::

    guard = LogGuard("learner")
    guard.read(tp, record.offset)                  # for every record consumed
    guard.check(consumer)                          # after every fetch: raises BrokerResetError
    await check_layout(client, settings, ("outcomes", "snapshots"))   # every few seconds

>>> client_kwargs(Settings(bootstrap_servers="a:9092, b:9092"))
{'bootstrap_servers': ['a:9092', 'b:9092'], 'security_protocol': 'PLAINTEXT'}
>>> faust_broker_kwargs(Settings(bootstrap_servers="a:9092,b:9092"))
{'broker': 'kafka://a:9092;b:9092', 'broker_credentials': None}
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Iterable
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError
from aiokafka.helpers import create_ssl_context

from schemas.settings import Settings

#: The largest record a producer may send (snapshots of big models): 16 MiB. The broker-side
#: topic limit (``max.message.bytes``) is set a little above it, see deploy.topics.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024

_SSL_PROTOCOLS = frozenset({"SSL", "SASL_SSL"})
_SASL_PROTOCOLS = frozenset({"SASL_PLAINTEXT", "SASL_SSL"})


log = logging.getLogger(__name__)

#: How long a layout check waits for the broker's metadata (a frozen broker is not a reset).
LAYOUT_PROBE_TIMEOUT_S = 3.0


class KafkaSettingsError(ValueError):
    """The security settings contradict each other (e.g. a CA file without TLS)."""


def bootstrap_list(settings: Settings) -> list[str]:
    """The bootstrap servers as a list of ``host:port`` strings."""
    servers = [s.strip() for s in settings.bootstrap_servers.split(",") if s.strip()]
    if not servers:
        raise KafkaSettingsError("bootstrap_servers is empty")
    return servers


def ssl_context(settings: Settings) -> ssl.SSLContext | None:
    """The TLS context for SSL and SASL_SSL (None otherwise).

    Without ``ssl_cafile`` the system CAs are trusted; hostnames are always checked.
    """
    _check_consistent(settings)
    if settings.security_protocol not in _SSL_PROTOCOLS:
        return None
    return create_ssl_context(
        cafile=settings.ssl_cafile,
        certfile=settings.ssl_certfile,
        keyfile=settings.ssl_keyfile,
    )


def client_kwargs(settings: Settings) -> dict[str, Any]:
    """Keyword arguments shared by AIOKafkaProducer, AIOKafkaConsumer and AIOKafkaAdminClient.

    Only the connection and security arguments: bootstrap_servers, security_protocol and,
    when they apply, ssl_context, sasl_mechanism, sasl_plain_username, sasl_plain_password.
    (aiokafka names the SASL credentials ``sasl_plain_*`` for SCRAM too.)
    """
    kwargs: dict[str, Any] = {
        "bootstrap_servers": bootstrap_list(settings),
        "security_protocol": settings.security_protocol,
    }
    context = ssl_context(settings)
    if context is not None:
        kwargs["ssl_context"] = context
    if settings.security_protocol in _SASL_PROTOCOLS:
        kwargs["sasl_mechanism"] = _sasl_mechanism(settings)
        kwargs["sasl_plain_username"] = settings.sasl_username
        kwargs["sasl_plain_password"] = settings.sasl_password
    return kwargs


def faust_broker_kwargs(settings: Settings) -> dict[str, Any]:
    """Keyword arguments for ``faust.App``: ``broker`` and ``broker_credentials``.

    SSL becomes ``faust.SSLCredentials(context)``; SASL becomes ``faust.SASLCredentials``
    with the mechanism (PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512) and, for SASL_SSL, the TLS
    context, which is what makes Faust choose SASL_SSL over SASL_PLAINTEXT.
    """
    import faust  # here, not at the top: router code imports this module and never Faust

    context = ssl_context(settings)
    credentials: faust.types.auth.CredentialsT | None = None
    if settings.security_protocol in _SASL_PROTOCOLS:
        credentials = faust.SASLCredentials(
            username=settings.sasl_username,
            password=settings.sasl_password,
            ssl_context=context,
            mechanism=_sasl_mechanism(settings),
        )
    elif context is not None:
        credentials = faust.SSLCredentials(context)
    return {
        "broker": "kafka://" + ";".join(bootstrap_list(settings)),
        "broker_credentials": credentials,
    }


def make_producer(settings: Settings, **overrides: Any) -> AIOKafkaProducer:
    """An AIOKafkaProducer (not started) with routeloop's defaults; ``overrides`` win.

    Must be called inside a running event loop (aiokafka binds to it)::

        async with make_producer(settings) as producer:
            await producer.send_and_wait(settings.topic("requests"), value, key=request_id)
    """
    kwargs: dict[str, Any] = {
        **client_kwargs(settings),
        # The embedded broker refuses InitProducerId, so no idempotence (and no
        # transactions); every consumer de-duplicates instead.
        "enable_idempotence": False,
        "acks": "all",
        # A few ms of batching multiplies throughput at a latency cost the router can afford.
        "linger_ms": 5,
        "max_request_size": MAX_MESSAGE_BYTES,
    }
    kwargs.update(overrides)
    return AIOKafkaProducer(**kwargs)


def make_consumer(settings: Settings, *topics: str, **overrides: Any) -> AIOKafkaConsumer:
    """An AIOKafkaConsumer (not started) of ``topics``; ``overrides`` win (e.g. ``group_id``).

    The group timeouts come from settings: on the embedded broker a group join waits about
    half the session timeout, so the aiokafka default (10 s) would cost 5 s per join::

        async with make_consumer(settings, settings.topic("outcomes"), group_id="learner",
                                 auto_offset_reset="earliest") as consumer:
            async for record in consumer: ...
    """
    kwargs: dict[str, Any] = {
        **client_kwargs(settings),
        "session_timeout_ms": settings.session_timeout_ms,
        "heartbeat_interval_ms": settings.heartbeat_interval_ms,
        # No max_partition_fetch_bytes raise for snapshots: a fetch returns the first batch
        # even when it is larger (KIP-74; measured on the embedded broker with 10 MB).
    }
    kwargs.update(overrides)
    return AIOKafkaConsumer(*topics, **kwargs)


def _sasl_mechanism(settings: Settings) -> str:
    return settings.sasl_mechanism or "PLAIN"


def _check_consistent(settings: Settings) -> None:
    """Refuse settings that would silently connect with less security than configured."""
    protocol = settings.security_protocol
    if protocol not in _SSL_PROTOCOLS:
        stray = [n for n in ("ssl_cafile", "ssl_certfile", "ssl_keyfile") if getattr(settings, n)]
        if stray:
            raise KafkaSettingsError(
                f"{', '.join(stray)} set but security_protocol is {protocol}; "
                "use SSL or SASL_SSL"
            )
    if settings.ssl_keyfile and not settings.ssl_certfile:
        raise KafkaSettingsError("ssl_keyfile set without ssl_certfile")
    if protocol in _SASL_PROTOCOLS:
        if not settings.sasl_username or settings.sasl_password is None:
            raise KafkaSettingsError(f"{protocol} needs sasl_username and sasl_password")
    else:
        sasl_fields = ("sasl_mechanism", "sasl_username", "sasl_password")
        stray = [n for n in sasl_fields if getattr(settings, n)]
        if stray:
            raise KafkaSettingsError(
                f"{', '.join(stray)} set but security_protocol is {protocol}; "
                "use SASL_PLAINTEXT or SASL_SSL"
            )


# -- a broker that came back empty -------------------------------------------------------------

class BrokerResetError(RuntimeError):
    """The broker lost data this worker had already read or relied on: it came back empty.

    A restarted embedded broker is an empty cluster (DESIGN.md): topics, offsets and groups are
    gone, and clients recreate the topics they touch with the broker's default partition count.
    Offsets read before then mean nothing on the new log, so a worker stops instead of silently
    skipping, re-reading or writing to the wrong partitions.
    """

    HINT = ("the broker has lost its topics and offsets (restarted empty?): recreate the topics "
            "(routeloop topics), then restart every worker")

    def __init__(self, worker: str, what: str) -> None:
        super().__init__(f"{worker}: {what}; {self.HINT}")
        self.worker = worker
        self.what = what


class LogGuard:
    """How far one worker has read each partition; a broker whose log is now shorter lost it.

    A fetch response carries the partition's high watermark, and on a healthy broker it is
    never below the next offset this consumer has already read (measured on the embedded
    broker: fetch high watermarks are right, unlike its ``end_offsets()``). The embedded
    broker answers a fetch past the end with an empty batch, not OffsetOutOfRange, so without
    this check a consumer would wait there forever, or be reset to another log silently.
    """

    def __init__(self, worker: str) -> None:
        self.worker = worker
        self.positions: dict[TopicPartition, int] = {}

    def read(self, tp: TopicPartition, offset: int) -> None:
        """A record at ``offset`` of ``tp`` was consumed (or is known to exist)."""
        if offset + 1 > self.positions.get(tp, 0):
            self.positions[tp] = offset + 1

    def check(self, consumer: AIOKafkaConsumer) -> None:
        """Raise :class:`BrokerResetError` if an assigned partition now ends before what was read."""
        assigned = consumer.assignment()
        for tp, position in self.positions.items():
            if tp not in assigned:
                continue
            highwater = consumer.highwater(tp)
            if highwater is not None and highwater < position:
                raise BrokerResetError(self.worker, (
                    f"{tp.topic}[{tp.partition}] ends at offset {highwater}, but this worker "
                    f"already read up to offset {position - 1}"))


async def check_layout(client: Any, settings: Settings, shorts: Iterable[str], worker: str,
                       extra: dict[str, int] | None = None,
                       timeout_s: float = LAYOUT_PROBE_TIMEOUT_S) -> None:
    """Raise :class:`BrokerResetError` if a topic vanished or has another partition count.

    ``client`` is a started aiokafka client (``producer.client``); one metadata request for
    every topic, which creates none. ``extra`` adds full topic names -> partitions (e.g. a
    changelog). A broker that does not answer in ``timeout_s`` is left to the health checks:
    frozen or unreachable is not empty.
    """
    from deploy.topics import expected_partitions  # deploy.topics imports this module

    layout = expected_partitions(settings)
    expected = {settings.topic(short): layout[settings.topic(short)] for short in shorts}
    expected.update(extra or {})
    try:
        cluster = await asyncio.wait_for(client.fetch_all_metadata(), timeout_s)
    except (asyncio.TimeoutError, KafkaError, OSError) as exc:
        log.debug("layout check skipped: %r", exc)
        return
    for topic, partitions in expected.items():
        found = cluster.partitions_for_topic(topic)
        if not found:
            raise BrokerResetError(worker, f"topic {topic} has vanished")
        if len(found) != partitions:
            raise BrokerResetError(worker, (
                f"topic {topic} has {len(found)} partition(s), not {partitions} (recreated by a "
                "client with the broker's default count after it was lost?)"))
