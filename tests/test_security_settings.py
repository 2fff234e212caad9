"""Real clusters: SASL (PLAIN, SCRAM) and TLS reach every worker's clients, from the environment.

tests/test_kafka_settings.py checks the mapping of Settings to aiokafka and Faust arguments.
These tests check the rest of the path: ROUTELOOP_* variables (and a TOML file) -> Settings ->
the variables LocalLoop hands to worker processes -> the feedback worker's own Faust app, and
that no module builds a Kafka client around the helpers. No broker is needed.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
from pathlib import Path

import pytest
from faust.transport.drivers.aiokafka import credentials_to_aiokafka_auth

from deploy.kafka import client_kwargs
from schemas.settings import Settings

REPO = Path(__file__).resolve().parents[1]
CLIENTS = {"AIOKafkaProducer", "AIOKafkaConsumer", "AIOKafkaAdminClient"}


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not installed")
    directory = tmp_path_factory.mktemp("tls")
    cert, key = directory / "ca.pem", directory / "ca.key"
    subprocess.run([openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-days", "1", "-subj", "/CN=routeloop-security-test",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return {"cafile": str(cert), "certfile": str(cert), "keyfile": str(key)}


def test_no_module_builds_a_kafka_client_around_the_security_settings():
    """Every aiokafka client gets **client_kwargs(settings) (or is deploy.kafka's own)."""
    offenders = []
    for path in sorted(REPO.glob("*/**/*.py")):
        if path.parts[len(REPO.parts)] not in ("schemas", "router", "streams", "deploy"):
            continue
        relative = path.relative_to(REPO).as_posix()
        if relative == "deploy/kafka.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) in CLIENTS):
                continue
            spread = [kw.value for kw in node.keywords if kw.arg is None]
            if any(isinstance(v, ast.Call) and getattr(v.func, "id", None) == "client_kwargs" for v in spread):
                continue
            # The embedded broker's readiness probe: a local plaintext broker by construction.
            if relative == "deploy/broker.py":
                continue
            offenders.append(f"{relative}:{node.lineno}")
    assert offenders == []


SASL_CASES = [
    ("SASL_PLAINTEXT", "PLAIN"),
    ("SASL_PLAINTEXT", "SCRAM-SHA-256"),
    ("SASL_SSL", "PLAIN"),
    ("SASL_SSL", "SCRAM-SHA-256"),
    ("SASL_SSL", "SCRAM-SHA-512"),
]


@pytest.mark.parametrize(("protocol", "mechanism"), SASL_CASES)
def test_sasl_from_the_environment_reaches_aiokafka_and_the_feedback_workers_faust_app(
        protocol, mechanism, tls, tmp_path):
    from streams.app import create_app

    env = {"ROUTELOOP_BOOTSTRAP_SERVERS": "kafka-1:9096,kafka-2:9096", "ROUTELOOP_SECURITY_PROTOCOL": protocol,
           "ROUTELOOP_SASL_MECHANISM": mechanism, "ROUTELOOP_SASL_USERNAME": "routeloop",
           "ROUTELOOP_SASL_PASSWORD": "p@ss word", "ROUTELOOP_DATA_DIR": str(tmp_path)}
    if protocol == "SASL_SSL":
        env["ROUTELOOP_SSL_CAFILE"] = tls["cafile"]
    settings = Settings.load(env=env)
    # What LocalLoop (and the Kubernetes manifests) hand to a worker process comes back whole.
    assert Settings.load(env=settings.to_env()) == settings

    kwargs = client_kwargs(settings)
    assert (kwargs["security_protocol"], kwargs["sasl_mechanism"]) == (protocol, mechanism)
    assert (kwargs["sasl_plain_username"], kwargs["sasl_plain_password"]) == ("routeloop", "p@ss word")
    assert ("ssl_context" in kwargs) == (protocol == "SASL_SSL")

    app = create_app(settings, worker_id="security-test")
    auth = credentials_to_aiokafka_auth(app.conf.broker_credentials, app.conf.ssl_context)
    context = auth.pop("ssl_context", None)
    assert auth == {"security_protocol": protocol, "sasl_mechanism": mechanism,
                    "sasl_plain_username": "routeloop", "sasl_plain_password": "p@ss word"}
    assert (context is not None) == (protocol == "SASL_SSL")
    assert [str(url) for url in app.conf.broker] == ["kafka://kafka-1:9096", "kafka://kafka-2:9096"]


def test_mutual_tls_from_a_toml_file_reaches_aiokafka_and_faust(tls, tmp_path):
    from streams.app import create_app

    config = tmp_path / "routeloop.toml"
    config.write_text(
        f'bootstrap_servers = "kafka:9093"\nsecurity_protocol = "SSL"\nssl_cafile = "{tls["cafile"]}"\n'
        f'ssl_certfile = "{tls["certfile"]}"\nssl_keyfile = "{tls["keyfile"]}"\ndata_dir = "{tmp_path}"\n')
    settings = Settings.load(config_file=config, env={})
    assert Settings.load(env=settings.to_env()) == settings
    context = client_kwargs(settings)["ssl_context"]
    assert context.check_hostname and [c["subject"] for c in context.get_ca_certs()]
    app = create_app(settings, worker_id="security-test")
    auth = credentials_to_aiokafka_auth(app.conf.broker_credentials, app.conf.ssl_context)
    assert auth["security_protocol"] == "SSL" and auth["ssl_context"] is not None


def test_secrets_do_not_show_in_the_settings_repr():
    settings = Settings(security_protocol="SASL_SSL", sasl_username="u", sasl_password="hunter2-password",
                        snapshot_key="snapshot-signing-key")
    shown = repr(settings) + str(settings)
    assert "hunter2-password" not in shown
    assert "snapshot-signing-key" not in shown
