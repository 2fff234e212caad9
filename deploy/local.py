"""The whole loop on one machine: the embedded broker and every worker as child processes.

Used by ``routeloop up``, ``routeloop demo`` and the integration tests::

    with LocalLoop(settings, log_dir=".routeloop/logs") as loop:   # broker, topics, workers
        ...                                                         # loop.settings is live
        loop.wait_until_healthy()                                   # the router's /healthz says 200
        loop.router_url                                             # e.g. http://127.0.0.1:41231
        loop.kill("learner"); loop.restart("learner")             # check_alive() skips it meanwhile

With ``start_broker=False`` the workers join the cluster that ``settings`` names instead.
HTTP ports: by default the loop picks three free consecutive ports P, P+1, P+2 and passes P
as ``http_port`` to every worker (the router's API, the learner's and the feedback worker's
metrics, see router.metrics); ``http_port=N`` uses N instead, ``http_port=0`` none.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from deploy.broker import EmbeddedBroker
from deploy.process import die_with_parent
from deploy.topics import ensure_topics
from router.metrics import PORT_OFFSETS
from schemas.settings import Settings

#: The workers of one loop, by name: what ``routeloop worker NAME`` runs.
WORKERS = ("router", "feedback", "learner")
#: Where the workers' HTTP ports are, from this machine.
HTTP_HOST = "127.0.0.1"


class LocalLoop:
    def __init__(self, settings: Settings, log_dir: str | Path = ".routeloop/logs",
                 start_broker: bool = True, workers: tuple[str, ...] = WORKERS,
                 http_port: int | None = None, broker_port: int | None = None) -> None:
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.settings = settings
        # broker_port None: a free port (tests and benchmarks run side by side).
        self.broker = (EmbeddedBroker(broker_port, log_path=self.log_dir / "broker.log")
                       if start_broker else None)
        self.worker_names = workers
        self.http_port = http_port
        self.processes: dict[str, subprocess.Popen] = {}
        #: Workers killed on purpose (kill()) and not restarted yet: check_alive() skips them.
        self.down: set[str] = set()

    @property
    def router_url(self) -> str | None:
        """The routing worker's HTTP API (None without a router or with HTTP off); after start()."""
        if "router" not in self.worker_names or not self.settings.http_port:
            return None
        return f"http://{HTTP_HOST}:{self.settings.http_port}"

    def start(self) -> LocalLoop:
        if self.broker is not None:
            self.broker.start()
            self.settings = self.settings.model_copy(update={"bootstrap_servers": self.broker.bootstrap_servers})
        port = free_port_block(len(PORT_OFFSETS)) if self.http_port is None else self.http_port
        self.settings = self.settings.model_copy(update={"http_port": port})
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
        self.down.discard(name)

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Signal one worker (SIGKILL by default) and wait until it has exited."""
        process = self.processes[name]
        self.down.add(name)
        process.send_signal(sig)
        process.wait(timeout=30)

    def wait_until_healthy(self, timeout_s: float = 60.0) -> None:
        """Block until the router's ``/healthz`` answers 200; raise if a worker dies or time runs out."""
        if self.router_url is None:
            raise RuntimeError("this loop runs no router with HTTP")
        deadline = time.monotonic() + timeout_s
        last = "no answer"
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                with urllib.request.urlopen(f"{self.router_url}/healthz", timeout=5) as response:
                    if response.status == 200:
                        return
            except urllib.error.HTTPError as exc:  # 503: up, not yet consuming
                last = exc.read().decode(errors="replace")
            except OSError as exc:  # not listening yet
                last = repr(exc)
            time.sleep(0.25)
        raise TimeoutError(f"the router at {self.router_url} was not healthy within {timeout_s:g} s: {last}")

    def check_alive(self) -> None:
        """Raise if a worker has exited (other than by kill()), with the tail of its log."""
        for name, process in self.processes.items():
            if name not in self.down and process.poll() is not None:
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


def free_port_block(size: int, attempts: int = 50) -> int:
    """A port P such that P .. P+size-1 are free on every interface now (as the workers bind them).

    Another process may take them before the workers do; the worker then fails loudly.
    """
    host = "0.0.0.0"
    for _ in range(attempts):
        with socket.socket() as probe:
            probe.bind((host, 0))
            first = probe.getsockname()[1]
        if first + size - 1 <= 65535 and all(_is_free(host, first + i) for i in range(size)):
            return first
    raise RuntimeError(f"no {size} consecutive free ports on {host} after {attempts} attempts")


def _is_free(host: str, port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True
