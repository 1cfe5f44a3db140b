"""Atomic checkpoints and the random-number-generator state they carry.

Checkpoints, and the reports and tables of a run (:func:`atomic_writer`), are written to
a temporary file ``.<name>.<8 characters>.tmp`` beside their final path and renamed over
it once complete, with the permissions a file created normally would get under the
current umask. A process killed mid-write leaves such a temporary file behind (and the
previous file intact); :func:`remove_stale_temporaries` removes them.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import random
import re
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

__all__ = [
    "NotACheckpointError",
    "atomic_writer",
    "capture_rng_state",
    "load_checkpoint",
    "new_file_mode",
    "remove_stale_temporaries",
    "restore_rng_state",
    "save_checkpoint",
]


class NotACheckpointError(ValueError):
    """Raised when a file exists but is not a checkpoint written by breakhis."""


def capture_rng_state() -> dict[str, Any]:
    """The states of Python's, NumPy's and torch's global generators (CUDA too).

    NumPy's state is stored as plain lists so that checkpoints load with
    ``torch.load(weights_only=True)``.
    """
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`capture_rng_state` captured."""
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def new_file_mode() -> int:
    """The permissions a file created now gets: ``0o666`` less the process's umask.

    ``tempfile.mkstemp`` creates its files with mode ``0o600`` whatever the umask, and a
    rename keeps the mode: :func:`atomic_writer` gives its temporary file this mode
    instead, so that a checkpoint is as readable as any other file of the run.

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


#: tempfile's random part of a name: 8 characters of this alphabet.
_TEMP_CHARS = "[a-z0-9_]{8}"


def _temporary_pattern(name: str) -> re.Pattern[str]:
    """The names :func:`atomic_writer` gives the temporary files of ``name``."""
    return re.compile(rf"\.{re.escape(name)}\.{_TEMP_CHARS}\.tmp")


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
            (a full disk) gets ``path`` as its file name.

    Examples:
        >>> folder = Path(tempfile.mkdtemp())
        >>> with atomic_writer(folder / "a.txt", "w") as handle:
        ...     _ = handle.write("done")
        >>> (folder / "a.txt").read_text(), sorted(p.name for p in folder.iterdir())
        ('done', ['a.txt'])
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        try:
            os.chmod(tmp, new_file_mode())
            with os.fdopen(fd, mode, **open_kwargs) as handle:
                yield handle
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except OSError as err:
            if err.filename is None:  # e.g. a full disk: say which file
                raise OSError(err.errno, err.strerror or str(err), str(path)) from err
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
    that ``names`` give (``figures/roc.png``).

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
        pattern = _temporary_pattern(Path(name).name)
        if not where.is_dir():
            continue
        for entry in where.iterdir():
            if pattern.fullmatch(entry.name) and (entry.is_file() or entry.is_symlink()):
                entry.unlink()
                removed.append(entry.relative_to(folder).as_posix())
    return sorted(removed)


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write ``state`` to ``path`` atomically (:func:`atomic_writer`).

    The checkpoint goes to a temporary file in the same folder, is flushed to disk and
    then renamed over ``path``: a run killed mid-write leaves the previous checkpoint
    (and a ``.checkpoint.pt.<8 characters>.tmp`` that the next run in the folder
    removes). The file gets the permissions of any new file (:func:`new_file_mode`),
    not ``tempfile``'s ``0o600``.
    """
    path = Path(path)
    with atomic_writer(path, "wb") as handle:
        torch.save(state, handle)
    return path


def _load_failure(exc: Exception) -> str:
    """Why ``torch.load`` failed, in words that never suggest ``weights_only=False``.

    That option would execute whatever code the file's pickle holds.
    """
    if isinstance(exc, EOFError):
        return "the file is empty or cut short"
    if isinstance(exc, pickle.UnpicklingError) or "weights_only" in str(exc):
        return ("expected a file written by torch.save holding tensors and plain data, but "
                "it could not be unpickled as one")
    first_line = (str(exc).splitlines() or [""])[0][:200]
    return f"torch.load failed: {type(exc).__name__}" + (f": {first_line}" if first_line else "")


def load_checkpoint(
    path: str | os.PathLike[str], *, map_location: str = "cpu", mmap: bool = False
) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` (tensors and plain data only).

    Only tensors and plain data are unpickled (``weights_only=True``): a file that
    needs more is refused, never loaded with arbitrary code execution. With ``mmap`` the
    tensors are mapped from the file rather than read (``torch.load(mmap=True)``): cheap
    when only the settings and history are needed.

    Raises:
        FileNotFoundError: when ``path`` does not exist.
        NotACheckpointError: when ``path`` is a folder (the message names the
            ``checkpoint.pt`` in it, if it holds one), or not a file
            :func:`save_checkpoint` wrote (e.g. a ``train.log``, an empty file, another
            program's pickle).
    """
    path = Path(path)
    if path.is_dir():
        inside = path / "checkpoint.pt"
        raise NotACheckpointError(
            f"expected a checkpoint file, but {str(path)!r} is a folder; " + (
                f"pass {str(inside)!r}" if inside.is_file() else
                "it holds no checkpoint.pt: pass the checkpoint.pt of a run folder"))
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    try:
        with warnings.catch_warnings():
            # torch warns about the pickle protocol of foreign pickles before refusing them.
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            state = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as exc:  # noqa: BLE001 - foreign bytes make the unpickler raise anything
        raise NotACheckpointError(
            f"{str(path)!r} is not a breakhis checkpoint ({_load_failure(exc)}); pass the "
            "checkpoint.pt of a run folder") from exc
    if not isinstance(state, dict):
        raise NotACheckpointError(
            f"{str(path)!r} is not a breakhis checkpoint (expected a dict, but it holds a "
            f"{type(state).__name__}); pass the checkpoint.pt of a run folder")
    return state
