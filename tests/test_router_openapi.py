"""The routing worker's HTTP API against its own OpenAPI document, with schemathesis.

A routing worker process (``routeloop worker router``, started by LocalLoop) runs on the
session broker with topics of its own, for the whole module. Schemathesis generates
requests from ``/openapi.json`` (valid and invalid bodies) and checks every answer: no
server error, a documented status code, content type and headers, and a body that matches
the documented schema.
"""

from __future__ import annotations

import asyncio
import urllib.request
from collections.abc import Iterator
from uuid import uuid4

import orjson
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from prometheus_client.parser import text_string_to_metric_families
from schemathesis.checks import positive_data_acceptance

from deploy.local import LocalLoop
from deploy.topics import delete_topics
from router.http import openapi_document
from schemas.settings import Settings

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def router_url(broker, tmp_path_factory) -> Iterator[str]:
    worker_settings = Settings(
        bootstrap_servers=broker.bootstrap_servers, topic_prefix=f"t{uuid4().hex[:8]}.",
        partitions=2, models=("small", "medium", "large"), featuriser="hashing://?dim=16")
    loop = LocalLoop(worker_settings, log_dir=tmp_path_factory.mktemp("openapi-logs"),
                     start_broker=False, workers=("router",))
    try:
        loop.start()
        loop.wait_until_healthy()
        yield loop.router_url
        loop.check_alive()
    finally:
        loop.stop()
        asyncio.run(delete_topics(loop.settings, all_with_prefix=True))


# The document is the code's (one test per operation needs it at collection time; schemathesis'
# lazy fixture loader does not work with pytest 9); the first test checks the worker serves it.
schema = schemathesis.openapi.from_dict(openapi_document())


def test_the_worker_serves_this_document(router_url):
    with urllib.request.urlopen(f"{router_url}/openapi.json", timeout=10) as response:
        assert orjson.loads(response.read()) == openapi_document()


#: Where the document (generated from schemas.events) is looser than the events' rules, the
#: API rightly answers 422 to some schema-valid bodies, so the check that every schema-valid
#: body is accepted cannot apply. /v1/route: an embedding must have the featuriser's dimension
#: (a deployment setting) and be valid base64, a candidate must be a known model (the snapshot
#: decides). /v1/responses: token counts have no maximum in the schema, but beyond 64 bits
#: they are not integers to the codec; and integers must be JSON integers (1, not 1.0). Every
#: other check applies, rejecting schema-invalid bodies included.
SCHEMA_CANNOT_SAY = {"/v1/route": [positive_data_acceptance], "/v1/responses": [positive_data_acceptance]}


@schema.parametrize()
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_every_operation_conforms_to_the_document(case, router_url):
    case.call_and_validate(base_url=router_url, excluded_checks=SCHEMA_CANNOT_SAY.get(case.path, []))


def test_the_generated_requests_were_valid_and_invalid_and_none_failed(router_url):
    """After the test above (same module, same worker): both kinds of body were tried."""
    with urllib.request.urlopen(f"{router_url}/metrics", timeout=10) as response:
        text = response.read().decode()
    answered = [(s.labels["route"], s.labels["status"], s.value)
                for family in text_string_to_metric_families(text) if family.name == "routeloop_http_responses"
                for s in family.samples if s.name.endswith("_total")]
    for route in ("/v1/route", "/v1/responses", "/v1/rewards"):
        for kind in "24":
            assert sum(n for r, status, n in answered if r == route and status[0] == kind) > 0, (route, answered)
    # Only /healthz answers 503, while the worker joined its group at the start.
    assert all(status[0] != "5" for r, status, _ in answered if r != "/healthz"), answered
