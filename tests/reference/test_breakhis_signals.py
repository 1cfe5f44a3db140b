"""SIGTERM as an interrupt (breakhis._signals), and Ctrl-C as well, in the one awkward
moment: a fork."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator

import pytest
from breakhis._signals import Terminated, terminate_as_interrupt, terminate_deferred
from breakhis.train import _started

# Waits up to 10 s for a signal to arrive.
_WAIT = """
deadline = time.monotonic() + 10
while time.monotonic() < deadline:
    time.sleep(0.01)
"""


def _script(setup: str, body: str, *, wait: bool = False) -> str:
    """A script: ``setup``, then ``body`` within :func:`terminate_as_interrupt` (and
    :data:`_WAIT` if ``wait``), then the interrupt's message ("terminated (SIGTERM)";
    "" for Ctrl-C) or "not interrupted"."""
    body = textwrap.dedent(body) + (_WAIT if wait else "")
    return (textwrap.dedent(setup) + "\nimport time\n"
            "from breakhis._signals import Terminated, terminate_as_interrupt\n"
            "try:\n    with terminate_as_interrupt():\n"
            + textwrap.indent(body, " " * 8)
            + "\n    print('not interrupted')\nexcept KeyboardInterrupt as exc:\n    print(exc)\n")


# A process that forks while a SIGTERM arrives: a hook of the fork (registered before
# the handler, as logging's are) sends it, so the handler runs inside the fork's hooks.
_FORK_SCRIPT = _script("""
    import os, signal
    armed = []
    os.register_at_fork(
        after_in_parent=lambda: armed and os.kill(os.getpid(), signal.SIGTERM))
""", """
    armed.append(True)
    pid = os.fork()
    if pid == 0:
        os._exit(7)
    armed.clear()
    child = os.waitpid(pid, 0)[1]
    print("child", os.waitstatus_to_exitcode(child), flush=True)
""", wait=True)


# Python's own Ctrl-C handler, as an interactive shell starts a program with: one started
# in the background (nohup, a CI runner) inherits SIGINT ignored, which the block leaves so
_PYTHON_SIGINT = "import signal; signal.signal(signal.SIGINT, signal.default_int_handler)\n"


@pytest.fixture(autouse=True)
def _python_sigint() -> Iterator[None]:
    before = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    if before is not None:  # None: set outside Python, cannot be put back
        signal.signal(signal.SIGINT, before)


def _run(script: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", _PYTHON_SIGINT + script],
                          capture_output=True, text=True, timeout=120)


def _said(done: subprocess.CompletedProcess[str], *lines: str) -> None:
    """The script ended well (status 0), printed ``lines``, and Python printed no
    exception it dropped ("Exception ignored in ...") nor any traceback."""
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines() == list(lines), (done.stdout, done.stderr[-2000:])
    assert "ignored" not in done.stderr and "Traceback" not in done.stderr, done.stderr[-2000:]


@pytest.mark.parametrize(("name", "said"), [("SIGTERM", "terminated (SIGTERM)"),
                                            ("SIGINT", "")])
def test_a_signal_during_a_fork_still_interrupts(name: str, said: str) -> None:
    """Raised inside the fork's hooks, Terminated (or Ctrl-C's KeyboardInterrupt) was
    printed as "ignored" and dropped: the run went on and ended with status 0 (a
    DataLoader starting its workers when the signal came). It is now noted there and
    delivered once the fork has returned."""
    _said(_run(_FORK_SCRIPT.replace("signal.SIGTERM", f"signal.{name}")), "child 7", said)


def test_a_block_that_ends_before_the_resend_raises_as_it_ends() -> None:
    """The signal noted during a fork is sent again a moment later; a block that ended
    sooner let it go by (status 0, nothing said) or, sent after the handler was gone,
    it killed the process. The block now raises as it ends, and nothing comes later."""
    script = _FORK_SCRIPT.replace(
        "from breakhis._signals import", "import breakhis._signals as s; s._RESEND_AFTER_S = 1.0\n"
        "from breakhis._signals import").replace(
        "time.monotonic() + 10", "time.monotonic()").replace(
        "    print(exc)", "    print(exc)\ntime.sleep(1.5); print('still here')")
    _said(_run(script), "child 7", "terminated (SIGTERM)", "still here")


def test_a_signal_handled_as_the_first_fork_hook_starts_is_kept() -> None:
    """A signal that came just before the fork is handled as our first hook starts,
    before it has noted the fork: raised there, it was dropped. (The moment is made
    here with a trace function that raises the signal as that hook is called.)"""
    script = _script("""
        import os, signal, sys

        def trace(frame, event, arg):
            if event == "call" and frame.f_code.co_name == "_fork_begins":
                sys.settrace(None)
                signal.raise_signal(signal.SIGTERM)
            return None
    """, """
        sys.settrace(trace)
        pid = os.fork()
        if pid == 0:
            os._exit(7)
        sys.settrace(None)
        os.waitpid(pid, 0)
    """, wait=True)
    _said(_run(script), "terminated (SIGTERM)")


def test_a_signal_handled_in_a_finaliser_is_sent_again() -> None:
    """The handler runs wherever Python checks for signals, a ``__del__`` method or a
    weak reference's callback included (the garbage collector runs them at any time),
    where the exception was printed as "ignored" and dropped."""
    script = _script("""
        import signal

        class Finalised:
            def __del__(self):
                signal.raise_signal(signal.SIGTERM)
    """, """
        Finalised()
        print("went on", flush=True)
    """, wait=True)
    _said(_run(script), "went on", "terminated (SIGTERM)")


def test_other_unraisable_exceptions_still_reach_the_previous_hook() -> None:
    seen = []

    def hook(what: object) -> None:
        seen.append(type(what.exc_value))  # type: ignore[attr-defined]

    class Failing:
        def __del__(self) -> None:
            raise ValueError("from __del__")

    before, sys.unraisablehook = sys.unraisablehook, hook
    try:
        with terminate_as_interrupt():
            Failing()
        assert sys.unraisablehook is hook
    finally:
        sys.unraisablehook = before
    assert seen == [ValueError]


def test_a_fork_without_a_signal_changes_nothing() -> None:
    script = _FORK_SCRIPT.replace("armed.append(True)", "pass").replace(
        "time.monotonic() + 10", "time.monotonic() + 0.3")
    _said(_run(script), "child 7", "not interrupted")


def test_a_sigterm_while_a_loader_starts_waits_for_it() -> None:
    """Stopped while a DataLoader started its workers, torch's half-built iterator printed
    a traceback of its own ('no attribute _workers_status') as it was dropped. The
    training loops now start their loaders whole and stop right after."""
    steps = []

    class Loader:
        def __iter__(self):
            signal.raise_signal(signal.SIGTERM)
            steps.append("started")
            return iter([1])

    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    with pytest.raises(Terminated), terminate_as_interrupt():
        _started(Loader())  # type: ignore[arg-type]
        steps.append("went on")
    assert steps == ["started"]


def test_a_real_loader_starting_its_workers() -> None:
    """A SIGTERM while a two-worker DataLoader forks its workers, within the training
    loops' start (_started): the run ends with Terminated once the loader has started,
    with no traceback from torch's half-built iterator, and its workers end."""
    script = _script("""
        import os, signal
        import torch
        from torch.utils.data import DataLoader, TensorDataset
        armed = []
        os.register_at_fork(
            after_in_parent=lambda: armed and not armed.clear()
            and os.kill(os.getpid(), signal.SIGTERM))
        from breakhis.train import _started
        loader = DataLoader(TensorDataset(torch.arange(8.0)), batch_size=2,
                            num_workers=2)
    """, """
        armed.append(True)
        batches = _started(loader)
        print("started", flush=True)
        for batch in batches:
            time.sleep(0.5)
    """)
    _said(_run(script), "terminated (SIGTERM)")


def test_held_signals_nest_and_outlast_an_error() -> None:
    steps = []
    with pytest.raises(Terminated), terminate_as_interrupt():
        with terminate_deferred():
            with terminate_deferred():
                signal.raise_signal(signal.SIGTERM)
                signal.raise_signal(signal.SIGINT)
            steps.append("inner block ended")  # the outer one still holds them
        steps.append("went on")
    assert steps == ["inner block ended"]

    # an error that ends the block gives way to the signal held: raised, say, into a
    # caller that retries the step, the error would let the run go on without it
    with pytest.raises(Terminated) as caught, terminate_as_interrupt():
        with terminate_deferred():
            signal.raise_signal(signal.SIGTERM)
            raise ValueError("failed half-way")
    assert isinstance(caught.value.__cause__, ValueError)
    with pytest.raises(KeyboardInterrupt) as caught, terminate_as_interrupt():
        with terminate_deferred():  # an interrupt of its own goes on as it is
            signal.raise_signal(signal.SIGTERM)
            raise KeyboardInterrupt("mine")
    assert str(caught.value) == "mine"
    with terminate_as_interrupt(), terminate_deferred():  # nothing held from before
        steps.append("quiet")
    assert steps[-1] == "quiet"


def test_held_signals_raise_in_the_order_they_came() -> None:
    with pytest.raises(KeyboardInterrupt) as caught, terminate_as_interrupt():
        with terminate_deferred():
            signal.raise_signal(signal.SIGINT)
            signal.raise_signal(signal.SIGTERM)
    assert type(caught.value) is KeyboardInterrupt


def test_deferring_in_another_thread_holds_nothing() -> None:
    """Handlers run in the main thread only; a block in another thread must not hold
    the main thread's signals."""
    opened = threading.Event()
    release = threading.Event()

    def hold() -> None:
        with terminate_deferred():
            opened.set()
            release.wait(10)

    other = threading.Thread(target=hold)
    other.start()
    try:
        opened.wait(10)
        with pytest.raises(Terminated), terminate_as_interrupt():
            signal.raise_signal(signal.SIGTERM)
    finally:
        release.set()
        other.join()


def test_signals_noted_in_a_fork_are_raised_in_the_order_they_came() -> None:
    """SIGTERM, then Ctrl-C, both in a fork, the block ending before they are sent
    again: the run ends as SIGTERM asked (status 143 from the command line), where the
    block raised for the signal of the lower number."""
    script = _FORK_SCRIPT.replace(
        "from breakhis._signals import", "import breakhis._signals as s; s._RESEND_AFTER_S = 1.0\n"
        "from breakhis._signals import").replace(
        "time.monotonic() + 10", "time.monotonic()").replace(
        "armed and os.kill(os.getpid(), signal.SIGTERM)",
        "armed and (os.kill(os.getpid(), signal.SIGTERM), os.kill(os.getpid(), signal.SIGINT))"
    ).replace("print(exc)", "print(type(exc).__name__)")
    _said(_run(script), "child 7", "Terminated")


def test_no_signal_is_sent_again_after_the_block() -> None:
    """A block that ends while the timer sends the signals noted in a fork again (here
    slowed down between its two sends) waited for a join that an interrupt cut short:
    the timer's second signal came after SIGTERM's default action was back, and killed
    the process after the block."""
    script = textwrap.dedent("""
        import os, signal, time
        real = signal.pthread_kill
        def slow(thread, signum):
            time.sleep(0.1); real(thread, signum); time.sleep(0.3)
        signal.pthread_kill = slow
        armed = []
        os.register_at_fork(after_in_parent=lambda: armed and not armed.clear() and (
            os.kill(os.getpid(), signal.SIGINT), os.kill(os.getpid(), signal.SIGTERM)))
        from breakhis._signals import terminate_as_interrupt
        try:
            with terminate_as_interrupt():
                armed.append(True)
                pid = os.fork()
                if pid == 0:
                    os._exit(0)
                os.waitpid(pid, 0)
                time.sleep(0.08)
        except KeyboardInterrupt as exc:
            print(type(exc).__name__, flush=True)
        time.sleep(1)
        print("still here")
    """)
    _said(_run(script), "KeyboardInterrupt", "still here")


def test_a_forked_child_starts_with_the_handlers_of_before_the_block() -> None:
    """A child (a multiprocessing worker, say) kept the block's Python-level handler, so
    SIGTERM could not stop it while it ran C code, and its parent waited for it."""
    script = textwrap.dedent("""
        import os, signal, sys
        from breakhis._signals import terminate_as_interrupt
        with terminate_as_interrupt():
            pid = os.fork()
            if pid == 0:
                ok = (signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
                      and signal.getsignal(signal.SIGINT) is signal.default_int_handler
                      and sys.unraisablehook is sys.__unraisablehook__)
                os._exit(0 if ok else 1)
            print("child", os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
            print("parent keeps it", signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL)
    """)
    _said(_run(script), "child 0", "parent keeps it True")


def test_handlers_set_within_the_block_are_kept() -> None:
    def mine(signum: int, frame: object) -> None:
        pass

    def hook(what: object) -> None:
        pass

    before = sys.unraisablehook
    try:
        with terminate_as_interrupt():
            signal.signal(signal.SIGINT, mine)
            sys.unraisablehook = hook
        assert signal.getsignal(signal.SIGINT) is mine and sys.unraisablehook is hook
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        sys.unraisablehook = before
