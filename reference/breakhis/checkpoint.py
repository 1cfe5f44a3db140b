"""Atomic checkpoints and the random-number-generator state they carry.

Checkpoints are written as the reports and tables of a run are
(:func:`breakhis._files.atomic_writer`): to a temporary file
``.<name>.<8 characters>.tmp`` beside their final path, renamed over it once complete,
with the permissions a file created normally would get under the current umask. A
process killed mid-write leaves such a temporary file behind (and the previous file
intact); :func:`breakhis._files.remove_stale_temporaries` removes them.
"""

from __future__ import annotations

import os
import pickle
import random
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ._files import atomic_writer, missing_checkpoint

__all__ = [
    "NotACheckpointError",
    "capture_rng_state",
    "load_checkpoint",
    "load_run_checkpoint",
    "restore_rng_state",
    "save_checkpoint",
]


class NotACheckpointError(ValueError):
    """Raised when a file exists but is not a checkpoint written by breakhis.

    ``reason`` says what the file is instead, where a file was read (``"the file is
    empty or cut short"``); ``None`` otherwise.
    """

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason


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
    """Restore what :func:`capture_rng_state` captured: the CUDA states of the devices
    this machine has (a run resumed where fewer GPUs are visible keeps going; torch's
    ``set_rng_state_all`` would fail on the first missing one)."""
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        for device, cuda_state in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, device)


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write ``state`` to ``path`` atomically (:func:`breakhis._files.atomic_writer`).

    The checkpoint goes to a temporary file in the same folder, is flushed to disk and
    then renamed over ``path``: a run killed mid-write leaves the previous checkpoint
    (and a ``.checkpoint.pt.<8 characters>.tmp`` that the next run in the folder
    removes). The file gets the permissions of any new file
    (:func:`breakhis._files.new_file_mode`), not ``tempfile``'s ``0o600``.

    Raises:
        OSError: when the checkpoint cannot be written, with ``path`` as its file name;
            a disk that fills up part-way through ``torch.save`` too (torch raises a
            ``RuntimeError`` over the ``OSError`` then: the ``OSError`` is raised from
            it). The temporary file is removed and the previous checkpoint kept.
    """
    path = Path(path)
    with atomic_writer(path, "wb") as handle:
        torch.save(state, handle)
    return path


def _load_failure(exc: Exception, path: Path) -> str:
    """Why ``torch.load`` failed on ``path``, in words that never suggest
    ``weights_only=False``.

    That option would execute whatever code the file's pickle holds. A zip file, the
    container torch.save writes, is told apart: one that cannot be read as a zip is
    damaged or cut short (torch's own words for that range from miniz's to ``[Errno 22]
    Invalid argument``); one without the ``<name>/data.pkl`` of torch.save is another
    program's zip (a Keras ``.keras``, a numpy ``.npz``).
    """
    if isinstance(exc, EOFError):
        return "the file is empty or cut short"
    if isinstance(exc, pickle.UnpicklingError) or "weights_only" in str(exc):
        return ("expected a file written by torch.save holding tensors and plain data, but "
                "it could not be unpickled as one")
    first_line = _clipped((str(exc).splitlines() or [""])[0])
    failure = f"torch.load failed: {type(exc).__name__}" + (f": {first_line}" if first_line else "")
    try:
        with path.open("rb") as handle:
            if handle.read(4) != b"PK\x03\x04":
                return failure
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except OSError:
        return failure
    except (zipfile.BadZipFile, ValueError, EOFError):
        return f"a zip archive, damaged or cut short; {failure}"
    if not any(name.count("/") == 1 and name.endswith("/data.pkl") for name in names):
        return f"a zip archive that torch.save did not write (no <name>/data.pkl in it); {failure}"
    return f"a torch.save archive, damaged; {failure}"


#: An abbreviation (a whole word) whose full stop ends no sentence, for :func:`_clipped`.
_ABBREVIATION = re.compile(r"(?:^|[^\w.])(?:e\.g|i\.e|vs|cf)\.$", re.IGNORECASE)


def _clipped(text: str, limit: int = 200, most: int = 320) -> str:
    """``text`` up to ``limit`` characters, or to the end of the sentence running past it
    where that ends within ``most`` (a cut mid-sentence dropped torch's "corrupted").

    Examples:
        >>> len(_clipped("a" * 210 + ". " + "b" * 200))  # to the sentence's end
        211
        >>> len(_clipped("x" * 500))  # no sentence end near: cut, marked
        203
        >>> _clipped("a" * 199 + " (e.g. a file). Next.")[-12:]  # not cut at "e.g."
        '.g. a file).'
        >>> _clipped("a" * 199 + " devs. Next.")[-5:]  # a word ending in "vs." ends one
        'devs.'
    """
    if len(text) <= limit:
        return text
    end = text.find(". ", limit - 1, most)
    while end >= 0 and _ABBREVIATION.search(text, 0, end + 1):  # "e.g. " ends no sentence
        end = text.find(". ", end + 1, most)
    if end < 0 and text.endswith(".") and len(text) <= most:
        return text
    return text[: end + 1] if end >= 0 else text[:limit] + "..."


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
        raise missing_checkpoint(path)
    def load(mapped: bool) -> Any:
        with warnings.catch_warnings():
            # torch warns about the pickle protocol of foreign pickles before refusing them.
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mapped)

    try:
        try:
            state = load(mmap)
        except RuntimeError as exc:
            if not (mmap and "mmap can only be used" in str(exc)):
                raise
            # not a zip archive (an empty file, text, torch.save's legacy format): read
            # without mapping, which loads the legacy format and tells the rest apart
            state = load(False)
    except Exception as exc:  # noqa: BLE001 - foreign bytes make the unpickler raise anything
        reason = _load_failure(exc, path)
        raise NotACheckpointError(
            f"{str(path)!r} is not a breakhis checkpoint ({reason}); pass the checkpoint.pt of a "
            "run folder", reason) from exc
    if not isinstance(state, dict):
        reason = f"expected a dict, but it holds a {type(state).__name__}"
        raise NotACheckpointError(
            f"{str(path)!r} is not a breakhis checkpoint ({reason}); pass the checkpoint.pt of a "
            "run folder", reason)
    return state


def load_run_checkpoint(path: str | os.PathLike[str], *, mmap: bool = False) -> dict[str, Any]:
    """The checkpoint of a run folder that a run continues (``--resume``, a cv reusing
    its folds), as :func:`load_checkpoint` loads it (on the CPU).

    Raises:
        NotACheckpointError: when it is none (empty, cut short, overwritten by another
            program), saying that the run cannot continue from it and how to go on,
            not to pass another checkpoint (the run found it where its own belongs):
            ``--overwrite`` or another ``--out``; for a ``fold<k>`` folder, also (it may be a
            cv's fold) removing that folder and ``cv --resume``, which trains that fold
            alone again (``cv --overwrite`` would train every fold afresh).
    """
    try:
        return load_checkpoint(path, mmap=mmap)
    except NotACheckpointError as err:
        if err.reason is None:
            raise
        way = ("start the run afresh with --overwrite (what that folder holds is replaced), or "
               "train into another --out")
        folder = Path(path).parent
        if re.fullmatch(r"fold\d+", folder.name):  # perhaps a cv's fold: its own way too
            way += (f"; if {str(folder)!r} is a fold of a cv, remove that folder and rerun cv "
                    "--resume instead, which trains that fold again (cv --overwrite would train "
                    "every fold afresh)")
        raise NotACheckpointError(
            f"cannot resume from {str(path)!r}: it is not a breakhis checkpoint ({err.reason}); {way}",
            err.reason) from err
