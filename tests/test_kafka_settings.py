"""Settings' security fields -> aiokafka and Faust arguments (unit tests, no broker)."""

from __future__ import annotations

import shutil
import ssl
import subprocess
from pathlib import Path
from typing import Any

import faust
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from faust.transport.drivers.aiokafka import credentials_to_aiokafka_auth
from faust.types.auth import AuthProtocol, SASLMechanism

import deploy.kafka
from deploy.kafka import (
    MAX_MESSAGE_BYTES,
    KafkaSettingsError,
    client_kwargs,
    faust_broker_kwargs,
    make_consumer,
    make_producer,
)
from schemas.settings import Settings

CA_NAME = "routeloop-test-ca"


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A throwaway self-signed CA, whose certificate and key double as a client pair."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not installed")
    directory = tmp_path_factory.mktemp("tls")
    cert, key = directory / "ca.pem", directory / "ca.key"
    subprocess.run(
        [
            openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-days", "1", "-subj", f"/CN={CA_NAME}",
            "-keyout", str(key), "-out", str(cert),
        ],  # fmt: skip
        check=True,
        capture_output=True,
    )
    return {"cafile": str(cert), "certfile": str(cert), "keyfile": str(key)}


def ca_names(context: ssl.SSLContext) -> list[str]:
    subjects = [dict(pair[0] for pair in ca["subject"]) for ca in context.get_ca_certs()]
    return [subject.get("commonName") for subject in subjects]


def assert_verifies_servers(context: Any) -> None:
    assert isinstance(context, ssl.SSLContext)
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname


def faust_auth(settings: Settings) -> dict[str, Any]:
    """What Faust's aiokafka driver finally hands to aiokafka, through a real faust.App."""
    app = faust.App("routeloop-test", **faust_broker_kwargs(settings))
    return credentials_to_aiokafka_auth(app.conf.broker_credentials, app.conf.ssl_context)


# -- PLAINTEXT -----------------------------------------------------------------------------


def test_plaintext() -> None:
    settings = Settings(bootstrap_servers="k1:9092, k2:9093")
    assert client_kwargs(settings) == {
        "bootstrap_servers": ["k1:9092", "k2:9093"],
        "security_protocol": "PLAINTEXT",
    }
    assert faust_broker_kwargs(settings) == {
        "broker": "kafka://k1:9092;k2:9093",
        "broker_credentials": None,
    }
    app = faust.App("routeloop-test", **faust_broker_kwargs(settings))
    assert [str(url) for url in app.conf.broker] == ["kafka://k1:9092", "kafka://k2:9093"]
    assert faust_auth(settings) == {"security_protocol": "PLAINTEXT"}


# -- SASL ----------------------------------------------------------------------------------


def test_sasl_ssl_plain_with_cafile(tls_files: dict[str, str]) -> None:
    settings = Settings(
        bootstrap_servers="k1:9096",
        security_protocol="SASL_SSL",
        sasl_mechanism="PLAIN",
        sasl_username="router",
        sasl_password="s3cret",
        ssl_cafile=tls_files["cafile"],
    )
    kwargs = client_kwargs(settings)
    context = kwargs.pop("ssl_context")
    assert kwargs == {
        "bootstrap_servers": ["k1:9096"],
        "security_protocol": "SASL_SSL",
        "sasl_mechanism": "PLAIN",
        "sasl_plain_username": "router",
        "sasl_plain_password": "s3cret",
    }
    assert_verifies_servers(context)
    assert ca_names(context) == [CA_NAME]

    credentials = faust_broker_kwargs(settings)["broker_credentials"]
    assert isinstance(credentials, faust.SASLCredentials)
    assert credentials.protocol is AuthProtocol.SASL_SSL
    assert credentials.mechanism is SASLMechanism.PLAIN
    auth = faust_auth(settings)
    assert ca_names(auth.pop("ssl_context")) == [CA_NAME]
    assert auth == {
        "security_protocol": "SASL_SSL",
        "sasl_mechanism": "PLAIN",
        "sasl_plain_username": "router",
        "sasl_plain_password": "s3cret",
    }


def test_sasl_ssl_scram_sha_512_with_system_cas() -> None:
    settings = Settings(
        bootstrap_servers="k1:9096",
        security_protocol="SASL_SSL",
        sasl_mechanism="SCRAM-SHA-512",
        sasl_username="learner",
        sasl_password="pw",
    )
    kwargs = client_kwargs(settings)
    assert kwargs["security_protocol"] == "SASL_SSL"
    assert kwargs["sasl_mechanism"] == "SCRAM-SHA-512"
    assert (kwargs["sasl_plain_username"], kwargs["sasl_plain_password"]) == ("learner", "pw")
    assert_verifies_servers(kwargs["ssl_context"])

    credentials = faust_broker_kwargs(settings)["broker_credentials"]
    assert credentials.mechanism is SASLMechanism.SCRAM_SHA_512
    auth = faust_auth(settings)
    assert_verifies_servers(auth.pop("ssl_context"))
    assert auth == {
        "security_protocol": "SASL_SSL",
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_plain_username": "learner",
        "sasl_plain_password": "pw",
    }


def test_sasl_plaintext_scram_sha_256_has_no_tls() -> None:
    settings = Settings(
        security_protocol="SASL_PLAINTEXT",
        sasl_mechanism="SCRAM-SHA-256",
        sasl_username="u",
        sasl_password="p",
    )
    kwargs = client_kwargs(settings)
    assert "ssl_context" not in kwargs
    assert kwargs["security_protocol"] == "SASL_PLAINTEXT"
    assert kwargs["sasl_mechanism"] == "SCRAM-SHA-256"
    auth = faust_auth(settings)
    assert auth["security_protocol"] == "SASL_PLAINTEXT"
    assert auth["sasl_mechanism"] == "SCRAM-SHA-256"
    assert auth["ssl_context"] is None


def test_sasl_mechanism_defaults_to_plain() -> None:
    settings = Settings(security_protocol="SASL_PLAINTEXT", sasl_username="u", sasl_password="p")
    assert client_kwargs(settings)["sasl_mechanism"] == "PLAIN"
    assert faust_auth(settings)["sasl_mechanism"] == "PLAIN"


# -- SSL -----------------------------------------------------------------------------------


def test_ssl_with_cafile(tls_files: dict[str, str]) -> None:
    settings = Settings(security_protocol="SSL", ssl_cafile=tls_files["cafile"])
    kwargs = client_kwargs(settings)
    assert kwargs["security_protocol"] == "SSL"
    assert "sasl_mechanism" not in kwargs
    assert_verifies_servers(kwargs["ssl_context"])
    assert ca_names(kwargs["ssl_context"]) == [CA_NAME]

    credentials = faust_broker_kwargs(settings)["broker_credentials"]
    assert isinstance(credentials, faust.SSLCredentials)
    auth = faust_auth(settings)
    assert auth["security_protocol"] == "SSL"
    assert ca_names(auth["ssl_context"]) == [CA_NAME]


def test_ssl_with_client_certificate(tls_files: dict[str, str]) -> None:
    settings = Settings(security_protocol="SSL", **{f"ssl_{k}": v for k, v in tls_files.items()})
    assert_verifies_servers(client_kwargs(settings)["ssl_context"])  # loads cert and key
    assert faust_auth(settings)["security_protocol"] == "SSL"


def test_ssl_with_a_missing_cafile_fails_loudly(tmp_path: Path) -> None:
    settings = Settings(security_protocol="SSL", ssl_cafile=str(tmp_path / "nope.pem"))
    with pytest.raises(FileNotFoundError):
        client_kwargs(settings)


# -- contradictions ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"ssl_cafile": "ca.pem"}, "ssl_cafile set but security_protocol is PLAINTEXT"),
        ({"security_protocol": "SASL_PLAINTEXT", "ssl_certfile": "c.pem"}, "use SSL or SASL_SSL"),
        ({"sasl_username": "u", "sasl_password": "p"}, "sasl_username, sasl_password set"),
        ({"security_protocol": "SSL", "sasl_mechanism": "PLAIN"}, "use SASL_PLAINTEXT or SASL_SSL"),
        ({"security_protocol": "SASL_SSL", "sasl_username": "u"}, "needs sasl_username and"),
        ({"security_protocol": "SSL", "ssl_keyfile": "k.pem"}, "ssl_keyfile set without"),
        ({"bootstrap_servers": " , "}, "bootstrap_servers is empty"),
    ],
)
def test_contradictory_settings_are_refused(fields: dict[str, str], message: str) -> None:
    settings = Settings(**fields)
    with pytest.raises(KafkaSettingsError, match=message):
        client_kwargs(settings)
    with pytest.raises(KafkaSettingsError, match=message):
        faust_broker_kwargs(settings)


# -- producer and consumer helpers ---------------------------------------------------------


class Recorder:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args, self.kwargs = args, kwargs


def test_make_producer_defaults_and_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(deploy.kafka, "AIOKafkaProducer", Recorder)
    producer = make_producer(Settings(bootstrap_servers="k:1"), linger_ms=0, client_id="x")
    assert producer.kwargs == {
        "bootstrap_servers": ["k:1"],
        "security_protocol": "PLAINTEXT",
        "enable_idempotence": False,
        "acks": "all",
        "linger_ms": 0,
        "max_request_size": MAX_MESSAGE_BYTES,
        "client_id": "x",
    }


def test_make_consumer_takes_group_timeouts_from_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(deploy.kafka, "AIOKafkaConsumer", Recorder)
    settings = Settings(session_timeout_ms=4_000, heartbeat_interval_ms=500)
    consumer = make_consumer(settings, "a", "b", group_id="g")
    assert consumer.args == ("a", "b")
    assert consumer.kwargs["session_timeout_ms"] == 4_000
    assert consumer.kwargs["heartbeat_interval_ms"] == 500
    assert consumer.kwargs["group_id"] == "g"


async def test_aiokafka_accepts_every_mapping(tls_files: dict[str, str]) -> None:
    """The kwargs are valid for the real clients (which check them, without connecting)."""
    variants = [
        Settings(),
        Settings(security_protocol="SSL", ssl_cafile=tls_files["cafile"]),
        Settings(
            security_protocol="SASL_SSL",
            sasl_mechanism="SCRAM-SHA-512",
            sasl_username="u",
            sasl_password="p",
            ssl_cafile=tls_files["cafile"],
        ),
        Settings(
            security_protocol="SASL_PLAINTEXT",
            sasl_mechanism="SCRAM-SHA-256",
            sasl_username="u",
            sasl_password="p",
        ),
    ]
    for settings in variants:
        assert isinstance(make_producer(settings), AIOKafkaProducer)
        assert isinstance(make_consumer(settings, "t", group_id="g"), AIOKafkaConsumer)
        AIOKafkaAdminClient(**client_kwargs(settings))
