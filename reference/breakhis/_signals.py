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
collector runs them) is sent again in the same way. No signal is sent again once the
block has ended.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator
from types import CodeType, FrameType
from typing import TYPE_CHECKING, Any

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
    starts with the handlers of before the block. The handlers before the block are put
    back after it, where the block did not set others. (Within the block SIGINT's
    handler is not Python's own, so :func:`asyncio.run` leaves Ctrl-C to it.)

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
    if threading.current_thread() is threading.main_thread() and not _state.open:
        if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            taken[signal.SIGTERM] = Terminated
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            taken[signal.SIGINT] = KeyboardInterrupt
    if not taken:
        yield
        return
    owner = os.getpid()

    def handler(signum: int, frame: FrameType | None) -> None:
        if os.getpid() != owner:  # a forked child, before its hook put the handlers back
            if signum == signal.SIGINT:
                raise KeyboardInterrupt()
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        if _state.closing:  # the block is ending: it raises what came
            _state.pending[signum] = None
            return
        if _held.depth:  # within terminate_deferred: raised when the block ends
            _held.pending.append(taken[signum])
            return
        where = _quiet_code(frame, unraisable.__code__)
        if _state.threads or where is not None:  # raised here, it would be dropped
            _state.pending[signum] = None
            if not _state.threads and where is not _fork_begins.__code__:
                _resend_soon()  # else sent again when the fork has ended
            return
        # the first signal to come, noted or this one; what was noted is answered
        first = next(iter(_state.pending), signum)
        _state.pending.clear()
        exc = taken[first]()
        exc._breakhis_signum = first  # type: ignore[attr-defined]
        raise exc

    def unraisable(what: UnraisableHookArgs) -> None:
        # raised where Python drops exceptions (a __del__, a weakref's callback, a
        # fork hook of another library): sent again a moment later instead
        signum = getattr(what.exc_value, "_breakhis_signum", None)
        if signum is None or os.getpid() != owner or not _state.open:
            previous_hook(what)
            return
        _state.pending[signum] = None
        if not _state.threads:  # else sent again when the fork has ended
            _resend_soon()

    _watch_forks()
    _state.pending, _state.timers, _state.installed = {}, [], []
    previous_hook = sys.unraisablehook
    with _lock:
        _state.open, _state.block = True, _state.block + 1
    try:  # a signal that comes as the handlers go in: they come out all the same
        for signum in taken:
            _state.installed.append((signum, handler, signal.signal(signum, handler)))
        sys.unraisablehook = unraisable
        _state.hook = (unraisable, previous_hook)
        yield
    finally:
        _state.closing = True  # from here the handler notes signals, never raises
        try:
            with _lock:  # a timer sends while it holds the lock: none sends after this
                _state.open = False
            for timer in _state.timers:
                timer.cancel()
            # signal.signal runs the handlers of signals that came first: ours notes them
            _put_back()
            late = list(_state.pending)
        finally:
            _state.pending, _state.timers, _state.closing = {}, [], False
    # reached only when the block ended without an exception: a signal noted and not
    # raised yet (sent again too late, or not yet) ends it now, the first to come
    if late:
        raise taken[late[0]]()


class _Held:
    """How many :func:`terminate_deferred` blocks are open, and the exceptions of the
    signals that came meanwhile, in order."""

    depth = 0
    pending: list[type[KeyboardInterrupt]] = []

    def take(self) -> list[type[KeyboardInterrupt]]:
        held, self.pending = self.pending, []
        return held


_held = _Held()


@contextlib.contextmanager
def terminate_deferred() -> Iterator[None]:
    """Within the block, a SIGTERM or Ctrl-C (within :func:`terminate_as_interrupt`) is
    held and raised when the block ends (:class:`Terminated` or ``KeyboardInterrupt``,
    the first to come): for a step that should not stop half-way, such as a DataLoader
    starting its worker processes (stopped there, torch prints a traceback of its own
    from the half-built iterator). Blocks nest; the outermost raises. An error that
    ends the block with a signal held gives way to the signal's exception, raised from
    it: the run stops, as the signal asked, whoever would have handled the error. In
    threads other than the main one, where signal handlers never run, it does nothing.

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
    outermost = not _held.depth
    if outermost:
        _held.pending = []  # nothing left over from a block a signal ended early
    _held.depth += 1
    try:
        yield
    except BaseException as err:
        _held.depth -= 1
        held = _held.take() if outermost else []
        if held and isinstance(err, Exception):
            raise held[0]() from err
        raise
    _held.depth -= 1
    held = _held.take() if outermost else []
    if held:
        raise held[0]()


class _State:
    """The open :func:`terminate_as_interrupt` block and the forks within it: whether a
    block is open (and which: a number), whether it is ending, the signals noted to
    send again (in the order they came), the threads now within a fork (between its
    first and last hooks), the timers that will send the signals again, and what the
    block installed (put back in a forked child)."""

    open = False
    closing = False
    block = 0
    pending: dict[int, None] = {}
    threads: set[int] = set()
    timers: list[threading.Timer] = []
    installed: list[tuple[int, Any, Any]] = []
    hook: tuple[Any, Any] | None = None
    watched = False


_state = _State()
# Held by a timer while it sends signals again, and by a block as it ends (never by the
# handler, which runs in the main thread between any two steps of it).
_lock = threading.Lock()


def _watch_forks() -> None:
    """Register the fork hooks that keep :attr:`_State.threads` (once per process).

    ``before`` hooks run last-registered first, so ours runs before those registered
    earlier (logging's); a hook registered later that raises our exception is covered
    by the block's ``sys.unraisablehook``.
    """
    if _state.watched or not hasattr(os, "register_at_fork"):  # no fork on Windows
        return
    _state.watched = True
    os.register_at_fork(before=_fork_begins, after_in_parent=_fork_ended_in_parent,
                        after_in_child=_fork_ended_in_child)


def _fork_begins() -> None:
    _state.threads.add(threading.get_ident())


def _fork_ended_in_parent() -> None:
    _state.threads.discard(threading.get_ident())
    if _state.open and _state.pending and not _state.threads:
        _resend_soon()


def _fork_ended_in_child() -> None:
    """A forked child starts with the handlers and hook of before the block (a child
    busy in C code could not be stopped by SIGTERM otherwise), and nothing noted."""
    global _lock
    _lock = threading.Lock()  # a timer of the parent may have held it as it forked
    _put_back()
    _state.open = _state.closing = False
    _state.pending, _state.threads, _state.timers = {}, set(), []
    _held.pending = []  # its depth stays: the child is still within the blocks it forked in


def _put_back() -> None:
    """Put back the handlers and the unraisable hook that the open block replaced, each
    where it is still the block's own (the program may have set another meanwhile)."""
    for signum, ours, before in _state.installed:
        if signal.getsignal(signum) is ours:
            with contextlib.suppress(ValueError, OSError):  # never stop a fork over it
                signal.signal(signum, before)
    if _state.hook is not None and sys.unraisablehook is _state.hook[0]:
        sys.unraisablehook = _state.hook[1]
    _state.installed, _state.hook = [], None


def _resend_soon() -> None:
    """Send the noted signals again in :data:`_RESEND_AFTER_S` seconds."""
    resend = threading.Timer(_RESEND_AFTER_S, _resend, (_state.block,))
    resend.daemon = True
    _state.timers.append(resend)
    resend.start()


def _resend(block: int) -> None:
    """Send the signals noted during a fork to the main thread again (in a timer's
    thread): a real signal, so that a main thread that waits (for a batch) wakes. Only
    while the block that noted them is open; the handler forgets them once it raises."""
    with _lock:
        if not _state.open or _state.closing or _state.block != block:
            return
        for signum in list(_state.pending):
            if hasattr(signal, "pthread_kill"):
                signal.pthread_kill(threading.main_thread().ident, signum)  # type: ignore[arg-type]
            else:  # Windows: the handler runs in the main thread all the same
                signal.raise_signal(signum)


def _quiet_code(frame: FrameType | None, *more: CodeType) -> CodeType | None:
    """The code of ours, among the frames the handler runs within, where raising is no
    use (a fork hook, the function that sends again, and ``more``: the block's
    unraisable hook): ``None`` if none. A signal that came just before a fork is
    handled as our first hook starts, before it has noted the fork."""
    while frame is not None:
        if frame.f_code in _QUIET or frame.f_code in more:
            return frame.f_code
        frame = frame.f_back
    return None


_QUIET: frozenset[CodeType] = frozenset(
    {_fork_begins.__code__, _fork_ended_in_parent.__code__, _resend_soon.__code__})
