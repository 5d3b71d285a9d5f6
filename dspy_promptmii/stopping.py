"""Honouring a stop: Ctrl-C (SIGINT) and SIGTERM end a command line at once.

One process-wide flag says that a stop was asked for. While :func:`stop_on_signals` is in
force (the ``promptmii`` and ``python -m benchmarks`` commands hold it for their whole
run; ``benchmarks.runner.run_benchmark`` too):

* the first SIGINT or SIGTERM sets the flag and raises ``KeyboardInterrupt`` in the main
  thread, which unwinds the run (finished work is kept, local servers are stopped);
* no LM request starts after that, in any thread: every LM that
  :class:`~dspy_promptmii.routes.LMPool` hands out, and every copy of it, carries a
  :class:`StopGate` callback that raises :class:`Stopped` before a request is sent (DSPy's
  worker threads would otherwise go on through their queue);
* a request already in flight ends within the LM's ``timeout`` at the latest; one that a
  worker thread was sending is abandoned: :func:`exit_process` does not wait for it;
* a second signal ends the process at once (``os._exit``), whatever it is waiting for.

A signal that arrives while the main thread is inside a request sent through LiteLLM is
handled when that request ends (measured with LiteLLM 1.x here: Python runs the handler
only then), so there the stop takes up to the request's timeout.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any

from dspy.utils.callback import BaseCallback

__all__ = [
    "Stopped",
    "StopGate",
    "request_stop",
    "stop_requested",
    "check",
    "stop_on_signals",
    "exit_process",
]

_stop = threading.Event()
_signal_lock = threading.Lock()


class Stopped(KeyboardInterrupt):
    """A stop was asked for (Ctrl-C or SIGTERM): no new LM request is sent. A
    ``KeyboardInterrupt``, so that code that catches ``Exception`` (DSPy's per-example
    error handling) lets it through and every Ctrl-C path handles it."""


def request_stop() -> None:
    """Ask every gated LM to send no further request."""
    _stop.set()


def stop_requested() -> bool:
    """Whether a stop was asked for since the current :func:`stop_on_signals` began."""
    return _stop.is_set()


def check() -> None:
    """Raise :class:`Stopped` when a stop was asked for."""
    if _stop.is_set():
        raise Stopped("stopped: no new LM request after Ctrl-C or SIGTERM")


class StopGate(BaseCallback):
    """A DSPy callback that refuses to start an LM call once a stop was asked for. DSPy
    runs start callbacks in the calling thread before the request and lets a
    ``KeyboardInterrupt`` through them (it swallows only ``Exception``)."""

    def on_lm_start(self, call_id: str, instance: Any, inputs: dict[str, Any]) -> None:
        check()


def _handler(signum: int, frame: object) -> None:
    with _signal_lock:
        again = _stop.is_set()
        _stop.set()
    if again:
        # The run is already unwinding (or waiting for a thread): leave now.
        try:
            sys.stderr.write(f"\nsignal {signum} again: stopping at once\n")
            sys.stderr.flush()
        finally:
            os._exit(128 + signum)
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """Within the block, SIGINT and SIGTERM stop the run as the module says. Clears the
    flag on entry (a new run); leaves it as it is on exit, so that threads still running
    after an interrupted run send nothing more. Nested uses share the outer handlers.
    Does nothing but clear the flag off the main thread, where Python cannot handle
    signals."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    if signal.getsignal(signal.SIGINT) is _handler:  # nested: the outer block owns the handlers
        yield
        return
    _stop.clear()
    previous = {sig: signal.signal(sig, _handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


def exit_process(code: int) -> int:
    """End a command line's process with ``code``. After a stop, threads may still wait
    on requests that were in flight; they are abandoned (the process ends now, with
    ``os._exit`` after flushing the output) instead of keeping it alive until their
    timeout. Otherwise ``code`` is returned for ``sys.exit``."""
    others = [t for t in threading.enumerate() if t is not threading.current_thread() and not t.daemon]
    if _stop.is_set() and others:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        logging.shutdown()
        os._exit(code)
    return code
