"""Ctrl-C and SIGTERM end a run the same way: as an exception, so cleanups run.

Python turns SIGINT into ``KeyboardInterrupt`` but SIGTERM kills the process outright (and
``ray.init`` replaces the handler with one that calls ``sys.exit``), which skips every
``finally``: staging folders stay behind, MLflow runs stay RUNNING and a Ray instance we
started keeps running. :func:`handle_signals` makes SIGTERM raise :class:`Terminated`, a
``KeyboardInterrupt``, so both signals unwind the stack; the CLI maps them to the usual
exit statuses 130 and 143.
"""
from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C's ``KeyboardInterrupt``."""


_active = False
# The last signal seen: Ray's blocking calls turn any exception a handler raises into a
# plain KeyboardInterrupt, so the exception's type alone cannot tell SIGTERM from Ctrl-C.
_received: int | None = None


def _raise_terminated(signum, frame):
    global _received
    _received = signal.SIGTERM
    raise Terminated()


def _raise_interrupt(signum, frame):
    global _received
    _received = signal.SIGINT
    raise KeyboardInterrupt()


def _install() -> None:
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_terminated)
        signal.signal(signal.SIGINT, _raise_interrupt)


def reinstall() -> None:
    """Take SIGTERM back after a library (``ray.init``) replaced the handler."""
    if _active:
        _install()


@contextlib.contextmanager
def handle_signals() -> Iterator[None]:
    """SIGTERM raises :class:`Terminated` inside the block; the old handlers come back after."""
    global _active, _received
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old_term, old_int = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    was, _active, _received = _active, True, None
    _install()
    try:
        yield
    finally:
        _active = was
        signal.signal(signal.SIGTERM, old_term)
        signal.signal(signal.SIGINT, old_int)


def _signal_of(exc: BaseException) -> int:
    return signal.SIGTERM if isinstance(exc, Terminated) or _received == signal.SIGTERM else signal.SIGINT


def exit_status(exc: BaseException) -> int:
    """128 + the signal's number, as shells report a process ended by that signal."""
    return 128 + _signal_of(exc)


def describe(exc: BaseException) -> str:
    return "SIGTERM" if _signal_of(exc) == signal.SIGTERM else "Ctrl-C (SIGINT)"


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM back while a short cleanup runs, then deliver them."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    sigs = {signal.SIGINT, signal.SIGTERM}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
