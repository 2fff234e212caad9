"""Shared fixtures: one embedded broker per session, fresh topics per test, the data set.

An integration test asks for ``settings`` (which implies ``broker``) and is marked::

    @pytest.mark.integration
    async def test_something(settings):
        async with make_producer(settings) as producer: ...

Each test gets its own topic prefix, so tests never see each other's messages; the topics
are deleted afterwards because the embedded broker frees memory only by deleting topics.
Tweak the settings with ``settings.model_copy(update={...})`` (the prefix stays the same).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from uuid import uuid4

import pytest

from deploy.broker import EmbeddedBroker
from deploy.topics import delete_topics, ensure_topics
from schemas.settings import Settings

#: Partitions of the co-partitioned topics in tests: more than one, to exercise the join
#: across partitions, and few, to keep group joins and memory light.
TEST_PARTITIONS = 2


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedBroker]:
    """The session's embedded broker on a free port (its log is in pytest's tmp dir)."""
    log_path = tmp_path_factory.mktemp("broker") / "tansu.log"
    with EmbeddedBroker(log_path=log_path) as running:
        yield running


@pytest.fixture
async def settings(broker: EmbeddedBroker) -> AsyncIterator[Settings]:
    """Settings for the session broker with a unique topic prefix and its topics created."""
    if not broker.is_running():
        pytest.fail(f"the session broker is not running; log:\n{broker.log_tail()}")
    test_settings = Settings(
        bootstrap_servers=broker.bootstrap_servers,
        topic_prefix=f"t{uuid4().hex[:8]}.",
        partitions=TEST_PARTITIONS,
        http_port=0,  # in-process workers must not bind the fixed default ports
    )
    await ensure_topics(test_settings)
    yield test_settings
    # A test that froze the broker and failed before thawing it would hang the cleanup.
    if broker.frozen:
        broker.thaw()
    # With the prefix: also the topics a test's Faust app or consumers created under it.
    await delete_topics(test_settings, all_with_prefix=True)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The RouterBench 0-shot data set shared next to the repository; skips if absent."""
    path = Path(__file__).resolve().parents[2] / "shared" / "data" / "routerbench-0shot"
    if not path.exists():
        pytest.skip(f"data set not found at {path}")
    return path
