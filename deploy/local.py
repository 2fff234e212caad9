"""The whole loop on one machine: the embedded broker and every worker as child processes.

Used by ``routeloop up``, ``routeloop demo`` and the integration tests::

    with LocalLoop(settings, log_dir=".routeloop/logs") as loop:   # broker, topics, workers
        ...                                                         # loop.settings is live
        loop.kill("learner"); loop.restart("learner")

With ``start_broker=False`` the workers join the cluster that ``settings`` names instead.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from deploy.broker import EmbeddedBroker
from deploy.process import die_with_parent
from deploy.topics import ensure_topics
from schemas.settings import Settings

#: The workers of one loop, by name: what ``routeloop worker NAME`` runs.
WORKERS = ("router", "feedback", "learner")


class LocalLoop:
    def __init__(self, settings: Settings, log_dir: str | Path = ".routeloop/logs",
                 start_broker: bool = True, workers: tuple[str, ...] = WORKERS) -> None:
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.settings = settings
        self.broker = EmbeddedBroker(log_path=self.log_dir / "broker.log") if start_broker else None
        self.worker_names = workers
        self.processes: dict[str, subprocess.Popen] = {}

    def start(self) -> LocalLoop:
        if self.broker is not None:
            self.broker.start()
            self.settings = self.settings.model_copy(update={"bootstrap_servers": self.broker.bootstrap_servers})
        asyncio.run(ensure_topics(self.settings))
        for name in self.worker_names:
            self.restart(name)
        return self

    def restart(self, name: str) -> None:
        """Start (or start again) one worker."""
        env = {**os.environ, **self.settings.to_env(), "PYTHONUNBUFFERED": "1"}
        log = open(self.log_dir / f"{name}.log", "ab")
        self.processes[name] = subprocess.Popen(
            [sys.executable, "-m", "deploy.cli", "worker", name], env=env,
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=die_with_parent())  # no orphaned workers if we are killed
        log.close()

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        process = self.processes[name]
        process.send_signal(sig)
        process.wait(timeout=30)

    def check_alive(self) -> None:
        """Raise if a worker has exited, with the tail of its log."""
        for name, process in self.processes.items():
            if process.poll() is not None:
                tail = (self.log_dir / f"{name}.log").read_text(errors="replace")[-3000:]
                raise RuntimeError(f"worker {name} exited with {process.returncode}; log tail:\n{tail}")

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.terminate()
        deadline = time.monotonic() + 15
        for process in self.processes.values():
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self.broker is not None:
            self.broker.stop()

    def __enter__(self) -> LocalLoop:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()
