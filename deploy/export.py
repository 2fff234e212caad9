"""Exporting a topic's events to JSON Lines, for offline evaluation and audits.

    n = asyncio.run(export_topic(settings, "outcomes", Path("outcomes.jsonl")))
"""

from __future__ import annotations

from pathlib import Path

from deploy.topics import iter_topic
from schemas.settings import Settings


async def export_topic(settings: Settings, short: str, path: Path) -> int:
    """Write every record of a topic (one JSON event a line) to ``path``; returns the count."""
    count = 0
    with open(path, "wb") as out:
        async for record in iter_topic(settings, short, idle_ms=2000):
            out.write(record.value + b"\n")
            count += 1
    return count
