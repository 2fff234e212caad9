"""JSON Schema export: one schema file per topic, for producers that are not written in Python.

>>> import tempfile, pathlib
>>> paths = export_json_schemas(pathlib.Path(tempfile.mkdtemp()))
>>> sorted(p.name for p in paths)[:2]
['deadletter.schema.json', 'decisions.schema.json']
"""

from __future__ import annotations

from pathlib import Path

import orjson

from schemas.events import TOPIC_EVENTS


def export_json_schemas(directory: Path) -> list[Path]:
    """Write ``<topic>.schema.json`` for every topic into ``directory``; return the paths."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for topic, model in TOPIC_EVENTS.items():
        schema = {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": f"routeloop {topic}",
                  **model.model_json_schema(mode="validation")}
        path = directory / f"{topic}.schema.json"
        path.write_bytes(orjson.dumps(schema, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS))
        paths.append(path)
    return paths
