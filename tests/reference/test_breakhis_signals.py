"""SIGTERM as an interrupt (breakhis._signals) in the one awkward moment: a fork."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

import pytest
from breakhis._signals import Terminated, terminate_as_interrupt
from breakhis.train import _started

# A process that forks while a SIGTERM arrives: a hook of the fork (registered before
# the handler, as logging's are) sends it, so the handler runs inside the fork's hooks.
_FORK_SCRIPT = textwrap.dedent("""
    import os, signal, time
    armed = []
    os.register_at_fork(
        after_in_parent=lambda: armed and os.kill(os.getpid(), signal.SIGTERM))
    from breakhis._signals import Terminated, terminate_as_interrupt
    try:
        with terminate_as_interrupt():
            armed.append(True)
            pid = os.fork()
            if pid == 0:
                os._exit(7)
            armed.clear()
            child = os.waitpid(pid, 0)[1]
            print("child", os.waitstatus_to_exitcode(child), flush=True)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                time.sleep(0.01)
        print("not interrupted")
    except Terminated as exc:
        print(exc)
""")


def test_a_sigterm_during_a_fork_still_interrupts() -> None:
    """Raised inside the fork's hooks, Terminated was printed as "ignored" and dropped:
    the run went on and ended with status 0 (a DataLoader starting its workers when the
    signal came). It is now noted there and delivered once the fork has returned."""
    done = subprocess.run([sys.executable, "-c", _FORK_SCRIPT], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines() == ["child 7", "terminated (SIGTERM)"], (
        done.stdout, done.stderr[-2000:])
    assert "ignored" not in done.stderr, done.stderr[-2000:]


def test_a_fork_without_a_signal_changes_nothing() -> None:
    script = _FORK_SCRIPT.replace("armed.append(True)", "pass").replace(
        "time.monotonic() + 10", "time.monotonic() + 0.3")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines() == ["child 7", "not interrupted"], done.stderr[-2000:]


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
