"""Disks and folders that refuse writes, for the tests of breakhis' file handling.

:func:`fill_the_disk` makes the writes of :func:`breakhis._files.atomic_writer` fail as
on a full disk; :func:`lock_folder` makes a folder one that cannot be written, also for
root (who writes into a read-only folder all the same).
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import pytest


class FillsUp:
    """A file on a disk with ``room`` bytes left: a write past them fails (ENOSPC), as
    ``write`` fails on a full disk, with an ``OSError`` that names no file."""

    def __init__(self, handle: Any, room: int) -> None:
        self.handle, self.room = handle, room

    def write(self, data: Any) -> int:
        size = memoryview(data).nbytes if not isinstance(data, str) else len(data)
        if size > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= size
        return self.handle.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.handle, name)

    def __enter__(self) -> FillsUp:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.handle.close()


def fill_the_disk(monkeypatch: pytest.MonkeyPatch, room: int = 0) -> None:
    """Make the files that :func:`breakhis._files.atomic_writer` opens fail once ``room``
    bytes are written, until ``monkeypatch.undo()``."""
    from breakhis import _files

    fdopen = os.fdopen
    monkeypatch.setattr(_files.os, "fdopen", lambda *a, **k: FillsUp(fdopen(*a, **k), room))


def lock_folder(folder: Path, how: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the existing ``folder`` one that cannot be written.

    ``how``: ``"read-only folder"`` (mode ``0o555``; the test is skipped as root, who
    writes into it all the same: give it back mode ``0o755`` in a ``finally``), or
    ``"refused writes"``, which makes it look to :mod:`breakhis._files` as a read-only
    folder looks to a user: creating a file there is a ``PermissionError`` and
    ``os.access`` says it cannot be written.
    """
    from breakhis import _files

    if how == "read-only folder":
        if os.geteuid() == 0:
            pytest.skip("root writes into a read-only folder all the same")
        folder.chmod(0o555)
        return
    access = os.access

    def refuse(*args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied", kwargs.get("dir"))

    monkeypatch.setattr(_files.tempfile, "mkstemp", refuse)
    monkeypatch.setattr(_files.os, "access",
                        lambda path, mode: Path(path) != folder and access(path, mode))
