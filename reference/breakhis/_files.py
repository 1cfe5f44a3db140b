"""Files, folders and integer settings, without torch: atomic writes, leftovers, checks.

Checkpoints, and the reports and tables of a run (:func:`atomic_writer`), are written to
a temporary file ``.<name>.<8 characters>.tmp`` beside their final path and renamed over
it once complete, with the permissions a file created normally would get under the
current umask. A process killed mid-write leaves such a temporary file behind (and the
previous file intact); :func:`remove_stale_temporaries` removes them. Work that makes
several files at once (the figures) is staged in a hidden folder
``.<name>-<8 characters>.tmp`` (:func:`staging_folder`); :func:`remove_stale_staging`
removes what a killed process left of those.

:func:`folder_problem` and :func:`writable_problem` say why a path cannot serve as an
output folder, :func:`missing_folder_problem` why it cannot serve as an input folder
(:func:`check_run_folder`: a run folder), :func:`missing_file_problem` why it cannot serve
as an input file (:func:`check_input_files`); :func:`missing_checkpoint` is the error for a
checkpoint path where nothing is; :func:`check_int` and :func:`check_seed` refuse integer
settings out of range with one form of message, as a :class:`SettingError` that names
the setting, so that the command line can name its option instead (``--input-size`` for
``input_size``). :func:`count` and :func:`plural` write a number of things in words.
:func:`named_os_error` gives a write's failure (a full disk) the path it failed to write,
even where a library raised another error over it (``torch.save``'s ``RuntimeError``).
:class:`FolderLock` holds a run folder for one process at a time (``train`` and ``cv``).
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import numbers
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

__all__ = [
    "FILE_ONLY",
    "LOCK_NAME",
    "SKLEARN_SEED_MAX",
    "FolderLock",
    "SettingError",
    "atomic_writer",
    "check_input_files",
    "check_int",
    "check_run_folder",
    "check_seed",
    "count",
    "folder_problem",
    "listed",
    "missing_checkpoint",
    "missing_file_problem",
    "missing_folder_problem",
    "named_os_error",
    "new_file_mode",
    "on_console",
    "plural",
    "remove_stale_staging",
    "remove_stale_temporaries",
    "staging_folder",
    "temporary_for",
    "writable_problem",
]

#: The file in a run folder that :class:`FolderLock` locks (empty; left in place).
LOCK_NAME = ".breakhis-run.lock"
#: Largest seed scikit-learn's ``random_state`` takes (NumPy's ``RandomState``: 32 bits).
SKLEARN_SEED_MAX = 2**32 - 1
#: tempfile's random part of a name: 8 characters of this alphabet.
_TEMP_CHARS = "[a-z0-9_]{8}"


class SettingError(ValueError):
    """A setting outside what it may be: ``"<setting> <requirement>"``.

    The message starts with the setting's name, so that a caller that knows the setting
    by another name (the command line's ``--input-size`` for ``input_size``) can say it
    with that name (:meth:`named`); ``str()`` gives it with ``setting``. A
    :class:`ValueError`, so that ``except ValueError`` catches it as before.

    Args:
        setting: the setting's name (``"input_size"``).
        requirement: the rest of the message, what the setting must be and what it
            got (``"must be >= 8, but got 4"``).

    Examples:
        >>> err = SettingError("input_size", "must be >= 8, but got 4")
        >>> str(err), err.setting
        ('input_size must be >= 8, but got 4', 'input_size')
        >>> err.named("--input-size")
        '--input-size must be >= 8, but got 4'
    """

    def __init__(self, setting: str, requirement: str) -> None:
        super().__init__(f"{setting} {requirement}")
        self.setting = setting
        self.requirement = requirement

    def named(self, name: str) -> str:
        """The message with ``name`` for the setting."""
        return f"{name} {self.requirement}"

    def __reduce__(self) -> tuple[type[SettingError], tuple[str, str]]:
        # pickled (multiprocessing) with both arguments, not with the message alone
        return type(self), (self.setting, self.requirement)


def new_file_mode() -> int:
    """The permissions a file created now gets: ``0o666`` less the process's umask.

    ``tempfile.mkstemp`` creates its files with mode ``0o600`` whatever the umask, and a
    rename keeps the mode: :func:`atomic_writer` gives its temporary file this mode
    instead, so that a checkpoint is as readable as any other file of the run.

    The umask is read from ``/proc/self/status`` where there is one (Linux). Elsewhere
    Python has no way to read it but to set it: it is set and set back at once, and a
    thread of this process that creates a file in between creates it under umask
    ``0o022``.

    Examples:
        >>> old = os.umask(0o022)
        >>> oct(new_file_mode())
        '0o644'
        >>> _ = os.umask(old)
    """
    mask = _umask_from_proc()
    if mask is None:  # no /proc: read it by setting it (and back at once)
        mask = os.umask(0o022)
        os.umask(mask)
    return 0o666 & ~mask


def _umask_from_proc() -> int | None:
    """The umask as Linux reports it (``Umask:`` of ``/proc/self/status``), if it does."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as handle:
            for line in handle:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return None


def temporary_for(name: str) -> str | None:
    """The file that :func:`atomic_writer`'s temporary file ``name`` is written for;
    ``None`` where ``name`` is not such a file.

    Examples:
        >>> temporary_for(".figures.json.ab_12xyz.tmp"), temporary_for("roc.png")
        ('figures.json', None)
    """
    match = re.fullmatch(rf"\.(.+)\.{_TEMP_CHARS}\.tmp", name)
    return None if match is None else match.group(1)


def named_os_error(
    exc: BaseException, path: str | os.PathLike[str], *, before: BaseException | None = None
) -> OSError | None:
    """The :class:`OSError` to raise instead of ``exc``, naming ``path``; ``None`` if none.

    A write that fails for want of room (or on a failing disk) raises an ``OSError``
    without a file name: the write went to an open file, not to a path. Some writers
    then raise an error of their own over it (``torch.save``: ``RuntimeError('[enforce
    fail at inline_container.cc:672] . unexpected pos 64 vs 0')``), and the reason is
    only in its ``__cause__`` or ``__context__``. This finds that ``OSError``: ``exc``
    itself or the first one in the chain that a traceback would show (a ``raise ...
    from None`` hides the rest), and gives its ``errno`` and ``strerror`` with ``path``
    as the file name. An ``OSError`` that names a file already speaks for itself, and
    what was raised over it was raised on purpose: ``None``.

    Args:
        exc: the exception raised while writing ``path``.
        path: the file being written, as the user knows it.
        before: the exception being handled when the writing began; the chain is not
            followed into it (an ``OSError`` there had nothing to do with the writing).

    Examples:
        >>> try:
        ...     try:
        ...         raise OSError(28, "No space left on device")
        ...     except OSError:
        ...         raise RuntimeError("unexpected pos 64 vs 0")
        ... except RuntimeError as err:
        ...     named_os_error(err, "runs/x/checkpoint.pt")
        OSError(28, 'No space left on device')
        >>> _.filename
        'runs/x/checkpoint.pt'
        >>> named_os_error(PermissionError(13, "Permission denied", "a.pt"), "b.pt") is None
        True
        >>> named_os_error(ValueError("not an error of the disk"), "b.pt") is None
        True
    """
    seen: set[int] = set()
    link: BaseException | None = exc
    while link is not None and link is not before and id(link) not in seen:
        seen.add(id(link))
        if isinstance(link, OSError):
            if link.filename is not None:
                return None
            return OSError(link.errno, link.strerror or str(link) or type(link).__name__,
                           str(path))
        link = link.__cause__ if link.__cause__ is not None else (
            None if link.__suppress_context__ else link.__context__)
    return None


@contextlib.contextmanager
def atomic_writer(
    path: str | os.PathLike[str], mode: str = "wb", **open_kwargs: Any
) -> Iterator[IO[Any]]:
    """Open a temporary file for ``path``; on success it replaces ``path`` atomically.

    The file is ``.<name>.<8 characters>.tmp`` in ``path``'s folder (created if need
    be), with the permissions of :func:`new_file_mode`; what the ``with`` block writes
    is flushed to disk and renamed over ``path``. If the block raises, the temporary
    file is removed and ``path`` is left as it was; a process killed meanwhile leaves
    the temporary file (see :func:`remove_stale_temporaries`).

    Args:
        path: the file to write.
        mode: ``"wb"`` or ``"w"``.
        open_kwargs: passed to :func:`open` (``newline``, ``encoding``).

    Raises:
        OSError: when the folder or file cannot be written; one without a file name
            (a full disk) gets ``path`` as its file name. So does an error that the
            block raised over such an ``OSError`` (``torch.save`` raises a
            ``RuntimeError`` when a write fails part-way): it becomes that ``OSError``,
            raised from it (:func:`named_os_error`).

    Examples:
        >>> folder = Path(tempfile.mkdtemp())
        >>> with atomic_writer(folder / "a.txt", "w") as handle:
        ...     _ = handle.write("done")
        >>> (folder / "a.txt").read_text(), sorted(p.name for p in folder.iterdir())
        ('done', ['a.txt'])
    """
    path = Path(path)
    # an OSError the caller was handling on entry is not this write's
    outer = sys.exc_info()[1]
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:  # named by the file the user asked for, not the hidden temporary
        raise type(err)(err.errno, err.strerror or str(err), str(path)) from err
    try:
        try:
            # the handle owns the descriptor from here on: closed whatever fails below
            if "b" not in mode:
                open_kwargs.setdefault("encoding", "utf-8")  # not the locale's
            with os.fdopen(fd, mode, **open_kwargs) as handle:
                os.fchmod(handle.fileno(), new_file_mode())
                yield handle
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except Exception as err:
            # e.g. a full disk, raised bare or under a writer's own error: say which file
            named = named_os_error(err, path, before=outer)
            if named is not None:
                raise named from err
            raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def remove_stale_temporaries(
    folder: str | os.PathLike[str], names: Sequence[str]
) -> list[str]:
    """Remove the temporary files that writes of ``names`` killed mid-way left in ``folder``.

    Only files named as :func:`atomic_writer` names the temporary files of ``names``
    (``.<name>.<8 characters>.tmp``) are removed, in ``folder`` and in the subfolders
    that ``names`` give (``fold0/checkpoint.pt``). ``names`` should be files written
    with :func:`atomic_writer`: no other write leaves such files.

    Returns:
        Their paths relative to ``folder`` (POSIX separators), sorted.

    Examples:
        >>> folder = Path(tempfile.mkdtemp())
        >>> for name in (".checkpoint.pt.ab_12xyz.tmp", ".checkpoint.pt.tmp", "notes.tmp"):
        ...     _ = (folder / name).write_text("")
        >>> remove_stale_temporaries(folder, ["checkpoint.pt"])
        ['.checkpoint.pt.ab_12xyz.tmp']
    """
    folder = Path(folder)
    removed = []
    for name in dict.fromkeys(names):
        where = (folder / name).parent
        target = Path(name).name
        if not where.is_dir():
            continue
        for entry in where.iterdir():
            if temporary_for(entry.name) == target and (entry.is_file() or entry.is_symlink()):
                entry.unlink()
                removed.append(entry.relative_to(folder).as_posix())
    return sorted(removed)


def staging_folder(parent: str | os.PathLike[str], name: str) -> Path:
    """Make a hidden folder ``.<name>-<8 characters>.tmp`` in ``parent`` to stage files in.

    On the file system of ``parent``, so that the files move out by rename. A process
    killed before it removes the folder leaves it: :func:`remove_stale_staging`.
    """
    return Path(tempfile.mkdtemp(prefix=f".{name}-", suffix=".tmp", dir=parent))


def remove_stale_staging(parent: str | os.PathLike[str], name: str) -> list[str]:
    """Remove the folders :func:`staging_folder` made for ``name`` in ``parent``.

    Only folders named exactly so (``.<name>-<8 characters>.tmp``, not links) are
    removed, with what they hold. Meant for the start of the work that stages there: a
    second process staging into the same ``parent`` at the same time loses its folder.

    Returns:
        Their names, sorted.

    Examples:
        >>> parent = Path(tempfile.mkdtemp())
        >>> left = staging_folder(parent, "figures")
        >>> _ = (left / "roc.png").write_bytes(b"")
        >>> (parent / ".figures-mine.tmp").mkdir()
        >>> remove_stale_staging(parent, "figures") == [left.name]
        True
        >>> sorted(p.name for p in parent.iterdir())
        ['.figures-mine.tmp']
    """
    pattern = re.compile(rf"\.{re.escape(name)}-{_TEMP_CHARS}\.tmp")
    removed = []
    folder = Path(parent)
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        if pattern.fullmatch(entry.name) and entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
            removed.append(entry.name)
    return sorted(removed)


def folder_problem(path: str | os.PathLike[str]) -> str | None:
    """Why ``path`` cannot be (or become) a folder: it, or a folder above it, is a file.

    Examples:
        >>> folder = Path(tempfile.mkdtemp())
        >>> _ = (folder / "afile").write_text("")
        >>> folder_problem(folder / "new") is None
        True
        >>> folder_problem(folder / "afile" / "x") == (
        ...     f"{str(folder / 'afile')!r}, a folder above {str(folder / 'afile' / 'x')!r}, "
        ...     "is a file")
        True
        >>> (folder / "gone").symlink_to(folder / "nowhere")
        >>> folder_problem(folder / "gone") == (
        ...     f"{str(folder / 'gone')!r} is a symbolic link to {str(folder / 'nowhere')!r}, "
        ...     "which does not exist")
        True
    """
    path = Path(path)
    for place in (path, *path.parents):
        if place.exists():
            if place.is_dir():
                return None
            return (f"{str(path)!r} is a file" if place == path else
                    f"{str(place)!r}, a folder above {str(path)!r}, is a file")
        if place.is_symlink():  # it cannot be made: mkdir says "File exists"
            what = (f"{str(path)!r} is" if place == path
                    else f"{str(place)!r}, a folder above {str(path)!r}, is")
            return f"{what} a symbolic link to {os.readlink(place)!r}, which does not exist"
    return None


def missing_folder_problem(path: str | os.PathLike[str]) -> str | None:
    """Why ``path`` cannot be read as an existing folder: it does not exist, is a file, or
    cannot be read (listed and entered) by this user.

    Examples:
        >>> folder = Path(tempfile.mkdtemp())
        >>> missing_folder_problem(folder) is None
        True
        >>> missing_folder_problem(folder / "none") == f"{str(folder / 'none')!r} does not exist"
        True
        >>> _ = (folder / "afile").write_text("")
        >>> missing_folder_problem(folder / "afile") == (
        ...     f"{str(folder / 'afile')!r} is a file, not a folder")
        True
    """
    path = Path(path)
    if path.is_dir():
        if not os.access(path, os.R_OK | os.X_OK):  # its files would be skipped as unreadable
            return f"{str(path)!r} is a folder this user cannot read (permission denied)"
        return None
    if path.is_file():
        return f"{str(path)!r} is a file, not a folder"
    if path.is_symlink():  # a link whose target is gone
        return f"{str(path)!r} is a broken link"
    if path.exists():
        return f"{str(path)!r} is not a folder"
    return f"{str(path)!r} does not exist"


def missing_file_problem(path: str | os.PathLike[str]) -> str | None:
    """Why ``path`` cannot be read as an existing file: it does not exist, or is a folder.

    Examples:
        >>> folder = Path(tempfile.mkdtemp())
        >>> _ = (folder / "afile").write_text("")
        >>> missing_file_problem(folder / "afile") is None
        True
        >>> missing_file_problem(folder / "none") == f"{str(folder / 'none')!r} does not exist"
        True
        >>> missing_file_problem(folder) == f"{str(folder)!r} is a folder, not a file"
        True
    """
    path = Path(path)
    if path.is_dir():
        return f"{str(path)!r} is a folder, not a file"
    if path.exists():  # a file, or what opens as one (a named pipe)
        return None
    if path.is_symlink():  # a link whose target is gone
        return f"{str(path)!r} is a broken link"
    return f"{str(path)!r} does not exist"


def check_input_files(setting: str, paths: Sequence[str | os.PathLike[str]], expected: str) -> None:
    """Refuse files to read (``setting``, e.g. ``folds_file``) that do not exist or are
    folders, before the work that comes before reading them (indexing the data:
    minutes on the real data), with one form of message.

    Raises:
        SettingError: naming ``setting``, ``expected`` (what the files must be) and the
            first path that is not such a file, with why.

    Examples:
        >>> check_input_files("folds_file", [], "fold tables")
        >>> check_input_files("folds_file", ["no/dsfold1.txt"], "fold tables")
        Traceback (most recent call last):
        ...
        breakhis._files.SettingError: folds_file must name fold tables, but 'no/dsfold1.txt' does not exist
    """
    for path in paths:
        problem = missing_file_problem(path)
        if problem is not None:
            raise SettingError(setting, f"must name {expected}, but {problem}")


def check_run_folder(path: str | os.PathLike[str]) -> None:
    """Refuse ``path`` as a run folder to read (of ``breakhis-repro cv``, ``train`` or
    ``evaluate``) unless it is an existing folder (:func:`missing_folder_problem`).

    Raises:
        FileNotFoundError: saying what ``path`` is instead.

    Examples:
        >>> folder = Path(tempfile.mkdtemp())
        >>> check_run_folder(folder)
        >>> check_run_folder(folder / "none")  # doctest: +ELLIPSIS +NORMALIZE_WHITESPACE
        Traceback (most recent call last):
        ...
        FileNotFoundError: expected a run folder (of `breakhis-repro cv`, `train` or
        `evaluate`), but '...none' does not exist
    """
    problem = missing_folder_problem(path)
    if problem:
        raise FileNotFoundError(f"expected a run folder (of `breakhis-repro cv`, `train` or "
                                f"`evaluate`), but {problem}")


def missing_checkpoint(path: str | os.PathLike[str]) -> FileNotFoundError:
    """The error to raise for a checkpoint ``path`` where nothing is.

    Examples:
        >>> missing_checkpoint("runs/x/checkpoint.pt")
        FileNotFoundError("checkpoint 'runs/x/checkpoint.pt' does not exist")
    """
    return FileNotFoundError(f"checkpoint {str(path)!r} does not exist")


#: File descriptors of the locks this process holds: a forked child (a data-loader
#: worker) closes its copies at once, so that the lock ends with the process that took it
#: (a worker left running for a few seconds after a ``kill -9`` kept it).
_HELD_FDS: set[int] = set()


def _close_held_in_child() -> None:
    for fd in list(_HELD_FDS):
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD_FDS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_held_in_child)


class FolderLock:
    """An exclusive lock on a run folder, held by this process until :meth:`release`.

    ``flock`` on the empty file :data:`LOCK_NAME` in the folder: the kernel releases it
    when the process ends in any way (no stale lock after a crash or ``kill -9``; forked
    children do not keep it), and two processes of one machine cannot both hold it
    (nor two :class:`FolderLock` objects of one process). Where ``fcntl`` or the file
    system's ``flock`` is missing (Windows; some network file systems), :meth:`acquire`
    holds nothing and reports success, as before locks were taken. The lock file stays
    in the folder, but for the folders the lock created, removed with it on release
    while nothing else is in them, and ``release(remove_file=True)``. Its holder removes
    it before letting go, and :meth:`acquire` checks that the file it locked is still
    the folder's: a process that opened it just before never holds a removed file.

    Examples:
        >>> import tempfile
        >>> folder = Path(tempfile.mkdtemp()) / "run"
        >>> first, second = FolderLock(folder), FolderLock(folder)
        >>> first.acquire(), second.acquire()
        (True, False)
        >>> first.release(); second.acquire()
        True
        >>> second.release(); folder.exists()
        False
    """

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)
        self._fd: int | None = None
        self._created: list[Path] = []  # the folders acquire made, deepest first

    def acquire(self) -> bool:
        """Take the lock (creating the folder if needed); ``False`` when another process
        holds it. ``True`` holding nothing where the folder or its lock file cannot be
        made (the caller's checks of the folder say why)."""
        try:
            import fcntl
        except ImportError:  # Windows
            return True
        try:
            missing = list(itertools.takewhile(lambda p: not p.exists(), [self.folder, *self.folder.parents]))
            self.folder.mkdir(parents=True, exist_ok=True)
            self._created = missing
            fd = os.open(self.folder / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError:
            # a folder that cannot be made or written: the run's own checks say why
            return True
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            same = os.fstat(fd).st_ino == os.stat(self.folder / LOCK_NAME).st_ino
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return False
            if exc.errno == errno.ENOENT:  # removed by the holder as it let go
                return self.acquire()
            return True  # no flock on this file system: hold nothing
        if not same:  # a file its holder replaced or removed while this one opened it
            os.close(fd)
            return self.acquire()
        self._fd = fd
        _HELD_FDS.add(fd)
        return True

    @staticmethod
    def busy(folder: str | os.PathLike[str]) -> bool:
        """Whether another lock holds ``folder`` now (without taking it or making anything).

        Examples:
            >>> import tempfile
            >>> folder = Path(tempfile.mkdtemp())
            >>> lock = FolderLock(folder)
            >>> FolderLock.busy(folder), lock.acquire(), FolderLock.busy(folder)
            (False, True, True)
            >>> lock.release()
        """
        if not (Path(folder) / LOCK_NAME).is_file():
            return False
        probe = FolderLock(folder)
        if not probe.acquire():
            return True
        probe.release()
        return False

    def release(self, *, remove_file: bool = False) -> None:
        """Give the lock up; remove the folders :meth:`acquire` made where nothing else is
        in them, and with ``remove_file`` the lock file in any case."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        _HELD_FDS.discard(fd)
        created, self._created = self._created, []
        removed = False
        try:
            # the file goes while still locked: a process that opened it before sees, once
            # it gets the lock, that the folder's lock file is another one (acquire's check)
            with contextlib.suppress(OSError):
                if remove_file or (created and [p.name for p in self.folder.iterdir()] == [LOCK_NAME]):
                    (self.folder / LOCK_NAME).unlink()
                    removed = bool(created)
        finally:
            os.close(fd)
        with contextlib.suppress(OSError):
            for folder in created if removed else ():
                folder.rmdir()  # stops at the first folder that holds something


def plural(n: int, noun: str, plural_form: str | None = None) -> str:
    """``noun`` for ``n`` of them: as it is when ``n`` is 1, else ``plural_form`` (by
    default ``noun`` with an ``s``).

    Examples:
        >>> plural(1, "fold"), plural(2, "fold"), plural(0, "class", "classes")
        ('fold', 'folds', 'classes')
    """
    if n == 1:
        return noun
    return plural_form if plural_form is not None else f"{noun}s"


#: ``extra`` of a log record meant for a run's ``train.log`` only: the command line's
#: console handler drops records that carry it (a cross-validation's later folds log the
#: data's issues to their own logs without printing the first fold's lines again).
FILE_ONLY: dict[str, Any] = {"breakhis_console": False}


def on_console(record: logging.LogRecord) -> bool:
    """Whether the command line's console shows ``record``: all but :data:`FILE_ONLY` ones."""
    return getattr(record, "breakhis_console", True)


def progress_bar(iterable: Any, **kwargs: Any) -> Any:
    """``iterable`` under a tqdm bar (``kwargs`` as tqdm takes them) on stderr.

    When stderr is not a terminal (a log file, a batch scheduler's output) the bar
    refreshes every 30 s: each refresh is a frame written into the file, hundreds of them
    for one epoch otherwise.
    """
    from tqdm.auto import tqdm

    interactive = getattr(sys.stderr, "isatty", lambda: False)()
    # (tqdm's monitor thread refreshes a bar left alone for maxinterval, 10 s by default)
    return tqdm(iterable, mininterval=0.1 if interactive else 30.0,
                maxinterval=10.0 if interactive else 30.0, **kwargs)


def listed(items: Sequence[str], sep: str = ", ", shown: int = 3) -> str:
    """The first ``shown`` of ``items`` joined by ``sep``, and how many more there are.

    Examples:
        >>> listed(["a: does not exist"], "; ")
        'a: does not exist'
        >>> listed(["'a'", "'b'", "'c'", "'d'", "'e'"])
        "'a', 'b', 'c' and 2 more"
    """
    more = len(items) - shown
    return sep.join(items[:shown]) + (f" and {more} more" if more > 0 else "")


def count(n: int, noun: str, plural_form: str | None = None) -> str:
    """``n`` and ``noun``, plural unless ``n`` is 1 (:func:`plural`).

    Examples:
        >>> count(1, "fold"), count(3, "fold"), count(0, "test image")
        ('1 fold', '3 folds', '0 test images')
    """
    return f"{n} {plural(n, noun, plural_form)}"


def writable_problem(
    folder: str | os.PathLike[str], what: str = "a folder", *, create: bool = True
) -> str | None:
    """Why ``folder`` cannot serve as ``what``: tried, not guessed.

    The folder is created if need be, and a probe file is written into it and removed:
    a path under a file, a folder that cannot be created (``/proc``) or written
    (permissions, a read-only file system) is found before any work is done. With
    ``create=False`` a folder that does not exist yet is not created (a check before
    work that may still fail, which should leave nothing behind): the nearest folder
    above it that exists must then be one the user may write into.

    Returns:
        ``None`` when it can; else a sentence naming the folder and what failed
        (``"expected a run folder that can be written, but writing a file into ...
        failed: Permission denied"``).
    """
    folder = Path(folder)
    problem = folder_problem(folder)
    if problem:
        return f"expected {what}, but {problem}"
    if not create and not folder.exists():
        above = next(p for p in folder.parents if p.exists())  # a folder: folder_problem
        if not os.access(above, os.W_OK | os.X_OK):
            return (f"expected {what} that can be created, but {str(above)!r}, where it "
                    "would be created, cannot be written")
        return None
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        return (f"expected {what} that can be created, but creating {str(folder)!r} "
                f"failed: {err.strerror or err}")
    try:
        handle, probe = tempfile.mkstemp(prefix=".breakhis-", suffix=".probe", dir=folder)
        os.close(handle)
        os.remove(probe)
    except OSError as err:
        return (f"expected {what} that can be written, but writing a file into "
                f"{str(folder)!r} failed: {err.strerror or err}")
    return None


def check_int(
    name: str, value: Any, lo: int | None = None, hi: int | None = None, *,
    span: str | None = None, why: str | None = None,
) -> None:
    """Refuse ``value`` unless it is an integer (not a bool) in ``[lo, hi]``.

    Python and NumPy integers pass (any :class:`numbers.Integral`, as scikit-learn and
    NumPy take them); a bound of ``None`` leaves that side open.

    Args:
        name: the setting, as the message names it (``"seed"``, ``"input_size"``).
        value: its value.
        lo: smallest value allowed.
        hi: largest value allowed.
        span: how the message writes ``[lo, hi]`` (``"[0, 2**32 - 1]"``); by default
            with the bounds' digits.
        why: said in brackets after the range (what takes the value).

    Raises:
        SettingError: ``"<name> must be an integer[ in <span>| >= <lo>| <= <hi>][ (<why>)],
            but got <value!r>"``, with ``setting`` ``name``.

    Examples:
        >>> check_int("epochs", 3, 1)
        >>> check_int("epochs", 2.5)
        Traceback (most recent call last):
        ...
        breakhis._files.SettingError: epochs must be an integer, but got 2.5
        >>> check_int("seed", -1, 0)
        Traceback (most recent call last):
        ...
        breakhis._files.SettingError: seed must be an integer >= 0, but got -1
    """
    if (isinstance(value, bool) or not isinstance(value, numbers.Integral)
            or (lo is not None and value < lo) or (hi is not None and value > hi)):
        if span is None and lo is not None and hi is not None:
            span = f"[{lo}, {hi}]"
        bounds = (f" in {span}" if span is not None else f" >= {lo}" if lo is not None
                  else f" <= {hi}" if hi is not None else "")
        raise SettingError(name, f"must be an integer{bounds}{f' ({why})' if why else ''}, "
                                 f"but got {value!r}")


def check_seed(
    seed: Any, name: str = "seed", *, span: str | None = None,
    why: str = "a scikit-learn random state",
) -> None:
    """Refuse a seed that scikit-learn would refuse (late: after the embeddings are made,
    or the data indexed): an integer in ``[0, 2**32 - 1]`` (:data:`SKLEARN_SEED_MAX`).

    ``span`` and ``why`` as for :func:`check_int`.

    Examples:
        >>> check_seed(2**32, "s", why="t-SNE")  # doctest: +NORMALIZE_WHITESPACE
        Traceback (most recent call last):
        ...
        breakhis._files.SettingError: s must be an integer in [0, 4294967295] (t-SNE),
        but got 4294967296
    """
    check_int(name, seed, 0, SKLEARN_SEED_MAX, span=span, why=why)
