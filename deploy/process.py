"""Running a worker in the foreground: one asyncio loop, stopped cleanly by SIGINT or SIGTERM."""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal
import sys
import threading
from collections.abc import Awaitable, Callable

from threadpoolctl import threadpool_limits


def one_blas_thread() -> None:
    """Limit numpy's BLAS (OpenBLAS) to one thread in this worker process.

    The policy's products are small (a batch of 64 by 384 by 128 at most): OpenBLAS splits
    them over every core and its idle threads spin after each call. On two cores that was
    60% of the router's CPU at saturation (0.42 ms a decision; 0.15 with one thread).
    An ``OPENBLAS_NUM_THREADS`` set in the environment wins.
    """
    if not os.environ.get("OPENBLAS_NUM_THREADS"):
        threadpool_limits(1, user_api="blas")


def run_until_signalled(main: Callable[[asyncio.Event], Awaitable[None]], log_level: str = "INFO") -> None:
    """Run ``main(stop)`` until it returns; SIGINT/SIGTERM set ``stop`` for a clean shutdown."""
    logging.basicConfig(level=log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    one_blas_thread()

    async def runner() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await main(stop)

    asyncio.run(runner())


def die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes Linux kill a child process when its parent dies, even by SIGKILL.

    None (no such guarantee) off Linux and off the main thread: the signal fires when the
    spawning *thread* exits, so a child started from a worker thread would die with it.
    """
    if not sys.platform.startswith("linux") or threading.current_thread() is not threading.main_thread():
        return None
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return None
    pr_set_pdeathsig = 1

    def set_parent_death_signal() -> None:
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL)

    return set_parent_death_signal
