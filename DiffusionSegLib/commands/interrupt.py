"""How commands end on Ctrl-C or SIGTERM: never with a partial output file.

Every output is written through :func:`DiffusionSegLib.checkpoint.atomic_write` (a temporary file beside the
destination, renamed when complete), whose ``finally`` removes the temporary file. Python's default SIGTERM
action kills the process without running ``finally`` blocks, so :func:`terminate_as_interrupt` turns SIGTERM into
``KeyboardInterrupt`` for the whole command. Training commands instead use :func:`stop_requests`: a signal asks
the loop to finish its step and write the best model so far.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

__all__ = ["stop_requests", "terminate_as_interrupt"]

log = logging.getLogger(__name__)


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@contextmanager
def _handlers(handler, signals: tuple[int, ...]) -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():  # signal handlers belong to the main thread
        yield
        return
    previous = {sig: signal.signal(sig, handler) for sig in signals}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM raises ``KeyboardInterrupt`` (as Ctrl-C does), so temporary files are removed on the way out."""
    with _handlers(_raise_interrupt, (signal.SIGTERM,)):
        yield


@contextmanager
def stop_requests() -> Iterator[Callable[[], bool]]:
    """Yield ``should_stop()``, which turns True once Ctrl-C or SIGTERM arrives (the loop then ends cleanly)."""
    requested = {"signal": None}

    def request(signum, frame) -> None:
        if requested["signal"] is None:
            log.info("stop requested (signal %d): finishing the current step", signum)
        requested["signal"] = signum

    with _handlers(request, (signal.SIGINT, signal.SIGTERM)):
        yield lambda: requested["signal"] is not None
