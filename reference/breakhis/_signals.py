"""SIGTERM as an interrupt: a run stopped by ``kill``, a batch scheduler or torchrun ends
as one stopped by Ctrl-C does, without torch.

By default SIGTERM ends Python at once: no line on the console or in ``train.log``, only
the shell's status 143, and ``finally`` blocks never run. Within
:func:`terminate_as_interrupt` it raises :class:`Terminated` instead, a
:class:`KeyboardInterrupt`, so that whatever handles Ctrl-C (a temporary file removed,
``train.log``'s last line, the command line's one-line message) handles it too.

A signal that arrives while the process forks (a DataLoader starting its workers) is
the one case that needs care: Python runs the handler inside the fork's own hooks
(:func:`os.register_at_fork`; logging has some), where an exception is printed as
"ignored" and dropped, so the run would go on as if nothing had come. There the
handler only notes the signal, and the process sends it to itself again a moment
after the fork, when raising works.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator
from types import FrameType

__all__ = ["Terminated", "terminate_as_interrupt", "terminate_deferred"]

# Re-sent this long after a fork that a SIGTERM arrived during: time for the fork's
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
    """Within the block, SIGTERM raises :class:`Terminated` in the main thread.

    Only where SIGTERM has its default action, in the main thread (the only one that
    may set a handler): a handler that the program (or a test runner) set is left as
    it is. A process forked meanwhile (a DataLoader worker) inherits the handler; there
    SIGTERM ends the process as by default, as its parent expects when it stops it. The
    handler before the block is put back after it.

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
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL):
        yield
        return
    owner = os.getpid()

    def handler(signum: int, frame: FrameType | None) -> None:
        if os.getpid() != owner:  # a forked child: end as SIGTERM ends it by default
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        if _forking.inside:  # raised here, the fork would print and drop it
            _forking.pending = True
            return
        if _held.depth:  # within terminate_deferred: raised when the block ends
            _held.pending = True
            return
        raise Terminated()

    _watch_forks()
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class _Held:
    """How many :func:`terminate_deferred` blocks are open, and whether a SIGTERM came
    meanwhile."""

    depth = 0
    pending = False


_held = _Held()


@contextlib.contextmanager
def terminate_deferred() -> Iterator[None]:
    """Within the block, a SIGTERM (within :func:`terminate_as_interrupt`) is held and
    raised as :class:`Terminated` when the block ends: for a step that should not stop
    half-way, such as a DataLoader starting its worker processes (stopped there, torch
    prints a traceback of its own from the half-built iterator).

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
    _held.depth += 1
    try:
        yield
    finally:
        _held.depth -= 1
        if not _held.depth and _held.pending:
            _held.pending = False
            raise Terminated()


class _ForkWindow:
    """Whether this process is within a fork (between its first and last hooks), and
    whether a SIGTERM came meanwhile."""

    inside = False
    pending = False
    watched = False


_forking = _ForkWindow()


def _watch_forks() -> None:
    """Register the fork hooks that keep :attr:`_ForkWindow.inside` (once per process).

    Registered on first use, after logging, multiprocessing and torch have registered
    theirs: ``before`` hooks run last-registered first and ``after`` hooks first-
    registered first, so ours open the window before the others run and close it after.
    """
    if _forking.watched:
        return
    _forking.watched = True
    os.register_at_fork(before=_fork_begins, after_in_parent=_fork_ended_in_parent,
                        after_in_child=_fork_ended_in_child)


def _fork_begins() -> None:
    _forking.inside = True


def _fork_ended_in_parent() -> None:
    _forking.inside = False
    if _forking.pending:
        _forking.pending = False
        resend = threading.Timer(_RESEND_AFTER_S, os.kill, (os.getpid(), signal.SIGTERM))
        resend.daemon = True
        resend.start()


def _fork_ended_in_child() -> None:
    _forking.inside = _forking.pending = False
