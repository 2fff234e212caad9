"""Settings of every worker, from ``ROUTELOOP_*`` environment variables or a TOML file.

Precedence: explicit keyword arguments, then environment variables, then the file named by
``ROUTELOOP_CONFIG`` (or passed as ``config_file``), then the defaults, which work locally.

>>> Settings.load(env={"ROUTELOOP_TAU": "0.02"}).tau
0.02
>>> Settings.load(env={}).topic("rewards")
'routeloop.rewards'
>>> custom = Settings(models=("a", "b"), default_quality=None, tau=0.02)
>>> Settings.load(env=custom.to_env()) == custom
True
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from schemas.events import Preference

ENV_PREFIX = "ROUTELOOP_"


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    #: Kafka bootstrap servers, comma-separated.
    bootstrap_servers: str = "127.0.0.1:9092"
    topic_prefix: str = "routeloop."
    #: Partitions of requests, decisions, responses and rewards (co-partitioned for the join).
    partitions: int = Field(default=4, ge=1)
    replication_factor: int = Field(default=1, ge=1)
    #: Seconds a decision waits for its response and reward before it is closed as defaulted.
    reward_wait_s: float = Field(default=60.0, gt=0)
    #: Quality assumed for an outcome whose reward never came; None drops such outcomes.
    default_quality: float | None = Field(default=0.0, ge=0.0, le=1.0)
    #: Cost cap in USD: the cost penalty is min(cost / tau, 1).
    tau: float = Field(default=0.01, gt=0)
    default_preference: Preference = Preference(quality=0.8, cost=0.2)
    #: A snapshot is published after this many outcomes or this many seconds, whichever first.
    snapshot_every_n: int = Field(default=200, ge=1)
    snapshot_every_s: float = Field(default=5.0, gt=0)
    #: Featuriser URL: ``minilm://`` or ``hashing://?dim=384``.
    # The head, as sentence-transformers truncates: on RouterBench it routes better than the
    # tail (measured by router.bench.quality), since which model wins depends on the task.
    featuriser: str = "minilm://"
    #: Policy of the learner (router.policy.POLICIES); the default won router.bench.quality.
    policy: str = "pooled-ucb"
    #: Candidate models (arms), comma-separated in the environment.
    models: tuple[str, ...] = ()
    #: HMAC-SHA256 key for snapshots (hex or text); routers then refuse unsigned snapshots.
    snapshot_key: str | None = Field(default=None, repr=False)  # secrets stay out of logs
    #: During a key rotation: snapshots signed with this key are still accepted (never used to sign).
    snapshot_previous_key: str | None = Field(default=None, repr=False)
    #: Consumer group session timeout: a group join waits about half of it on the embedded broker.
    session_timeout_ms: int = Field(default=6_000, ge=1_000)
    heartbeat_interval_ms: int = Field(default=1_000, ge=100)
    #: Where Faust keeps table state (``memory://`` or ``rocksdb://``) and its data directory.
    store: str = "memory://"
    data_dir: str = ".routeloop"
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_username: str | None = None
    sasl_password: str | None = Field(default=None, repr=False)
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    http_port: int = Field(default=8080, ge=0, le=65535)
    log_level: str = "INFO"

    def topic(self, name: str) -> str:
        """The full name of a topic, by its short name (``requests``, ``rewards``...)."""
        return f"{self.topic_prefix}{name}"

    def to_env(self) -> dict[str, str]:
        """These settings as ``ROUTELOOP_*`` variables, for starting workers as child processes."""
        env = {}
        for name, value in self.model_dump(mode="python").items():
            if value is None:
                value = "none" if name == "default_quality" else None
            elif name == "models":
                value = ",".join(value)
            elif name == "default_preference":
                value = f"quality={value['quality']!r},cost={value['cost']!r}"
            if value is not None:
                env[f"{ENV_PREFIX}{name.upper()}"] = str(value)
        return env

    @classmethod
    def load(
        cls,
        config_file: str | Path | None = None,
        env: Mapping[str, str] | None = None,
        **overrides: object,
    ) -> Settings:
        env = os.environ if env is None else env
        values: dict[str, object] = {}
        path = config_file or env.get(f"{ENV_PREFIX}CONFIG")
        if path:
            with open(path, "rb") as fh:
                values.update(tomllib.load(fh))
        for name in cls.model_fields:
            raw = env.get(f"{ENV_PREFIX}{name.upper()}")
            if raw is not None:
                values[name] = _parse_env(name, raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls.model_validate(values)


def _parse_env(name: str, raw: str) -> object:
    if name == "models":
        return tuple(m.strip() for m in raw.split(",") if m.strip())
    if name == "default_preference":
        return Preference.parse(raw)
    if name == "default_quality" and raw.strip().lower() in ("", "none", "drop"):
        return None
    return raw
