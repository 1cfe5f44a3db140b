"""SIGTERM as an interrupt: a run stopped by ``kill``, a batch scheduler or torchrun ends
as one stopped by Ctrl-C does, without torch.

By default SIGTERM ends Python at once: no line on the console or in ``train.log``, only
the shell's status 143, and ``finally`` blocks never run. Within
:func:`terminate_as_interrupt` it raises :class:`Terminated` instead, a
:class:`KeyboardInterrupt`, so that whatever handles Ctrl-C (a temporary file removed,
``train.log``'s last line, the command line's one-line message) handles it too.

A signal that arrives while the process forks (a DataLoader starting its workers) is
the one case that needs care, for Ctrl-C and SIGTERM alike: Python runs the handler
inside the fork's own hooks (:func:`os.register_at_fork`; logging has some), where an
exception is printed as "ignored" and dropped, so the run would go on as if nothing had
come. There the handler only notes the signal, and the process sends it to its main
thread again a moment after the fork, when raising works; should the block end first,
it raises the signal's exception as it ends. A signal handled where Python drops
exceptions otherwise (a ``__del__`` method, a weak reference's callback, as the garbage
collector runs them) is sent again in the same way.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator
from types import CodeType, FrameType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sys import UnraisableHookArgs

__all__ = ["Terminated", "terminate_as_interrupt", "terminate_deferred"]

# Re-sent this long after a fork that a signal arrived during: time for the fork's
# remaining hooks (microseconds) to return, so that the handler runs outside them.
_RESEND_AFTER_S = 0.05


class Terminated(KeyboardInterrupt):
    """SIGTERM received (within :func:`terminate_as_interrupt`): a ``KeyboardInterrupt``,
    so that ``except KeyboardInterrupt`` handles both.

    Examples:
        >>> isinstance(Terminated(), KeyboardInterrupt), str(Terminated())
        (True, 'terminated (SIGTERM)')
    """

    def __init__(self, *args: object) -> None:
        super().__init__(*(args or ("terminated (SIGTERM)",)))


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`Terminated` in the main thread, and
    neither it nor Ctrl-C (``KeyboardInterrupt``) is lost to a fork or a finaliser.

    Only where SIGTERM has its default action and SIGINT Python's, in the main thread
    (the only one that may set a handler): a handler that the program (or a test
    runner) set is left as it is. A process forked meanwhile (a DataLoader worker)
    inherits the handler; there SIGTERM ends the process as by default, as its parent
    expects when it stops it, and Ctrl-C raises ``KeyboardInterrupt``. The handlers
    before the block are put back after it.

    Examples:
        >>> import os, signal
        >>> try:
        ...     with terminate_as_interrupt():
        ...         signal.raise_signal(signal.SIGTERM)
        ... except Terminated as exc:
        ...     print(exc)
        terminated (SIGTERM)
        >>> signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
        True
    """
    taken: dict[int, type[KeyboardInterrupt]] = {}
    if threading.current_thread() is threading.main_thread():
        if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            taken[signal.SIGTERM] = Terminated
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            taken[signal.SIGINT] = KeyboardInterrupt
    if not taken:
        yield
        return
    owner = os.getpid()

    def handler(signum: int, frame: FrameType | None) -> None:
        if os.getpid() != owner:  # a forked child: as by default there
            if signum == signal.SIGINT:
                raise KeyboardInterrupt()
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        if _held.depth:  # within terminate_deferred: raised when the block ends
            _held.pending.append(taken[signum])
            return
        if _forking.threads or _in_fork_hook(frame):  # raised here, it would be dropped
            _forking.pending.add(signum)
            return
        exc = taken[signum]()
        exc._breakhis_signum = signum  # type: ignore[attr-defined]
        raise exc

    def unraisable(what: UnraisableHookArgs) -> None:
        # raised where Python drops exceptions (a __del__, a weakref's callback, a
        # fork hook of another library): sent again a moment later instead
        signum = getattr(what.exc_value, "_breakhis_signum", None)
        if signum is None or os.getpid() != owner:
            previous_hook(what)
            return
        _forking.pending.add(signum)
        if not _forking.threads:  # else sent again when the fork has ended
            _resend_soon()

    _watch_forks()
    previous = {signum: signal.signal(signum, handler) for signum in taken}
    previous_hook, sys.unraisablehook = sys.unraisablehook, unraisable
    try:
        yield
    finally:
        try:
            late = _cancel_resends()
        finally:
            for signum, before in previous.items():
                signal.signal(signum, before)
            sys.unraisablehook = previous_hook
    # reached only when the block ended without an exception: a signal that came
    # during a fork and was not re-sent yet ends it now
    if late:
        raise taken[late[0]]()


class _Held:
    """How many :func:`terminate_deferred` blocks are open, and the exceptions of the
    signals that came meanwhile, in order."""

    depth = 0
    pending: list[type[KeyboardInterrupt]] = []


_held = _Held()


@contextlib.contextmanager
def terminate_deferred() -> Iterator[None]:
    """Within the block, a SIGTERM or Ctrl-C (within :func:`terminate_as_interrupt`) is
    held and raised when the block ends (:class:`Terminated` or ``KeyboardInterrupt``,
    the first to come): for a step that should not stop half-way, such as a DataLoader
    starting its worker processes (stopped there, torch prints a traceback of its own
    from the half-built iterator). Blocks nest; the outermost raises. An exception
    raised within the block goes on as it is (the held signal is dropped: the run ends
    either way). In threads
    other than the main one, where signal handlers never run, it does nothing.

    Examples:
        >>> import signal
        >>> steps = []
        >>> try:
        ...     with terminate_as_interrupt():
        ...         with terminate_deferred():
        ...             signal.raise_signal(signal.SIGTERM)
        ...             steps.append("finished the step")
        ...         steps.append("went on")
        ... except Terminated:
        ...     steps.append("terminated")
        >>> steps
        ['finished the step', 'terminated']
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _held.depth += 1
    try:
        yield
    finally:
        _held.depth -= 1
        held: list[type[KeyboardInterrupt]] = []
        if not _held.depth:  # the outermost block: what came meanwhile is its to raise
            held, _held.pending = _held.pending, []
    if held:
        raise held[0]()


class _ForkWindow:
    """The threads now within a fork (between its first and last hooks), the signals
    that came meanwhile, and the timers that will send them again."""

    threads: set[int] = set()
    pending: set[int] = set()
    resends: list[threading.Timer] = []
    watched = False


_forking = _ForkWindow()


def _watch_forks() -> None:
    """Register the fork hooks that keep :attr:`_ForkWindow.threads` (once per process).

    Registered on first use, after logging, multiprocessing and torch have registered
    theirs: ``before`` hooks run last-registered first and ``after`` hooks first-
    registered first, so ours open the window before the others run and close it after.
    """
    if _forking.watched or not hasattr(os, "register_at_fork"):  # no fork on Windows
        return
    _forking.watched = True
    os.register_at_fork(before=_fork_begins, after_in_parent=_fork_ended_in_parent,
                        after_in_child=_fork_ended_in_child)


def _fork_begins() -> None:
    _forking.threads.add(threading.get_ident())


def _fork_ended_in_parent() -> None:
    _forking.threads.discard(threading.get_ident())
    if _forking.pending and not _forking.threads:
        _resend_soon()


def _fork_ended_in_child() -> None:
    _forking.threads, _forking.pending, _forking.resends = set(), set(), []
    _held.depth, _held.pending = 0, []


def _resend_soon() -> None:
    """Send the noted signals again in :data:`_RESEND_AFTER_S` seconds."""
    resend = threading.Timer(_RESEND_AFTER_S, _resend)
    resend.daemon = True
    _forking.resends.append(resend)
    resend.start()


def _resend() -> None:
    """Send the signals noted during a fork to the main thread again (in a timer's
    thread): a real signal, so that a main thread that waits (for a batch) wakes."""
    signums, _forking.pending = _forking.pending, set()
    for signum in sorted(signums):
        signal.pthread_kill(threading.main_thread().ident, signum)  # type: ignore[arg-type]


def _cancel_resends() -> list[int]:
    """Stop the timers that would send signals again; returns the signals that none had
    sent yet. A timer that already sent one has run the handler by the time it is
    joined (a signal to a waiting thread is handled as it wakes)."""
    timers, _forking.resends = _forking.resends, []
    for timer in timers:
        timer.cancel()
    raised: KeyboardInterrupt | None = None
    for timer in timers:  # every one joined: none may send after the handler is gone
        while timer.is_alive():
            try:
                timer.join()
            except KeyboardInterrupt as exc:  # the signal it sent, handled as it wakes
                raised = raised or exc
    late, _forking.pending = sorted(_forking.pending), set()
    if raised is not None:
        raise raised
    return late


_HOOKS: frozenset[CodeType] = frozenset(
    {_fork_begins.__code__, _fork_ended_in_parent.__code__})


def _in_fork_hook(frame: FrameType | None) -> bool:
    """Whether the handler runs within one of our fork hooks (or what they call): a
    signal that came just before the fork is handled as our first hook starts, before
    it has noted the fork."""
    while frame is not None:
        if frame.f_code in _HOOKS:
            return True
        frame = frame.f_back
    return False
