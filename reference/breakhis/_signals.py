"""SIGTERM as an interrupt: a run stopped by ``kill``, a batch scheduler or torchrun ends
as one stopped by Ctrl-C does, without torch.

By default SIGTERM ends Python at once: no line on the console or in ``train.log``, only
the shell's status 143, and ``finally`` blocks never run. Within
:func:`terminate_as_interrupt` it raises :class:`Terminated` instead, a
:class:`KeyboardInterrupt`, so that whatever handles Ctrl-C (a temporary file removed,
``train.log``'s last line, the command line's one-line message) handles it too.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator
from types import FrameType

__all__ = ["Terminated", "terminate_as_interrupt"]


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
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
