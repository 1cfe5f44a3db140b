"""Class probabilities for new images from a trained checkpoint, as a CSV file."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from ._files import (
    SettingError,
    check_int,
    count,
    folder_problem,
    listed,
    plural,
    writable_problem,
)
from .data import (
    IMAGE_ERRORS,
    IMAGE_EXTENSIONS,
    SkippedFile,
    _is_metadata,
    _walk_files,
    parse_breakhis_name,
    read_image_size,
)
from .evaluate import csv_path, write_predictions
from .train import checkpoint_normalization, load_model, predict_probs, warn_unfinished

__all__ = ["collect_images", "predict_to_csv"]


def _not_an_image(path: Path) -> str:
    return (f"{path}: not an image (extension {path.suffix!r}; expected one of "
            f"{sorted(IMAGE_EXTENSIONS)})")


def _images_below(folder: Path, problems: list[str]) -> list[Path]:
    """Image files below ``folder``, sorted.

    The walk is :func:`breakhis.data.index_breakhis`'s: hidden folders
    (``.ipynb_checkpoints``, ``.git``) are not entered, links to folders are followed
    once. Hidden folders, links not followed, and files that are not images by their
    extension (the extensions the index accepts) are named in ``problems``; fold tables
    and synthetic-data markers are not images and not reported, as in the index.
    """
    skipped: list[SkippedFile] = []
    found = []
    for path in _walk_files(folder, skipped, hidden_reason="hidden folder, not searched"):
        if path.suffix.lower() in IMAGE_EXTENSIONS:
            found.append(path)
        elif not _is_metadata(path.name):
            problems.append(_not_an_image(path))
    for item in skipped:
        problems.append(f"{folder / item.path.rstrip('/')}/: {item.reason}")
    return sorted(found)


def collect_images(inputs: Sequence[str | os.PathLike[str]]) -> tuple[list[Path], list[str]]:
    """Expand files and folders (recursively, hidden folders left out) into image files.

    Images are the files with an extension of :data:`breakhis.data.IMAGE_EXTENSIONS`,
    the ones the index accepts for training (``.webp`` or ``.gif`` files are reported,
    not predicted). A file reached twice (a folder and a file inside it, or a link to
    it) is predicted once, where it was first reached.

    Returns:
        ``(images, problems)``: image paths in the order of ``inputs`` (a folder's
        sorted), and messages about what was left out: inputs that are missing, not
        images, unreadable or given twice, and folders not searched.
    """
    found: list[Path] = []
    problems: list[str] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found.extend(_images_below(path, problems))
        elif path.is_file():
            if path.suffix.lower() in IMAGE_EXTENSIONS:
                found.append(path)
            else:
                problems.append(_not_an_image(path))
        else:
            problems.append(f"{path}: does not exist")
    seen: set[Path] = set()
    images, repeated = [], []
    for path in found:
        if path.resolve() in seen:
            repeated.append(str(path))
            continue
        seen.add(path.resolve())
        try:
            read_image_size(path, verify=True)
        except IMAGE_ERRORS as exc:
            problems.append(f"{path}: unreadable image ({exc})")
            continue
        images.append(path)
    if repeated:
        problems.append(f"{count(len(repeated), 'image')} reached more than once (overlapping "
                        f"inputs or links), e.g. {repeated[:3]}: each predicted once, as first "
                        "reached")
    # a folder given twice would name its left-out files twice
    return images, list(dict.fromkeys(problems))


def _described(path: Path) -> SimpleNamespace:
    """``path`` (as text; :func:`breakhis.evaluate.write_predictions` escapes what is not
    UTF-8) with the patient and magnification its BreaKHis name gives."""
    text = str(path)
    try:
        name = parse_breakhis_name(path.name)
    except ValueError:
        return SimpleNamespace(path=text, patient=None, magnification=None)
    return SimpleNamespace(path=text, patient=name.patient, magnification=name.magnification)


def _other_magnifications(
    state: dict[str, Any], described: Sequence[SimpleNamespace]
) -> tuple[str, list[str], str | None]:
    """What a magnification-specific checkpoint has not seen among its inputs.

    Returns:
        ``(checkpoint, groups, unknown)``: the checkpoint in words (``"MSBC at 40X"``),
        one ``"<n> images at <m>X"`` (``"1 image at <m>X"``) per other magnification its
        inputs' BreaKHis names give, and a warning when some names give none (in-house
        names), else ``None``. Both are empty for a checkpoint of a magnification-independent task.
    """
    task = (state.get("extra") or {}).get("task") or {}
    trained = task.get("magnification")
    if trained is None:
        return "", [], None
    checkpoint = f"{task.get('name', 'magnification-specific')} at {trained}X"
    mags = Counter(d.magnification for d in described)
    groups = [f"{count(n, 'image')} at {mag}X" for mag, n in sorted(
        (m, n) for m, n in mags.items() if m is not None and m != trained)]
    unknown = None
    if mags[None]:
        n = mags[None]
        unknown = (f"{count(n, 'image')} {plural(n, 'has', 'have')} no magnification in "
                   f"{plural(n, 'its name', 'their names')} (not "
                   f"{plural(n, 'a BreaKHis name', 'BreaKHis names')}) for the "
                   f"{checkpoint} checkpoint: check that {plural(n, 'it is a', 'they are')} "
                   f"{trained}X {plural(n, 'image')}")
    return checkpoint, groups, unknown


def predict_to_csv(
    checkpoint: str | os.PathLike[str],
    inputs: Sequence[str | os.PathLike[str]],
    out_csv: str | os.PathLike[str],
    *,
    device: str = "cpu",
    batch_size: int = 32,
    progress: bool = True,
    any_magnification: bool = False,
) -> dict[str, Any]:
    """Write one row of class probabilities for every readable input image.

    The CSV has the columns of ``test_predictions.csv`` (see
    :func:`breakhis.evaluate.write_predictions`), so
    :func:`~breakhis.evaluate.read_predictions` reads it: ``path``, ``patient`` and
    ``magnification`` (from BreaKHis file names; empty otherwise), ``true_label`` and
    ``true_index`` (empty and ``-1``: unknown),
    ``predicted_label`` and ``prob_<class>`` per class. Images are normalised as in
    training (:func:`breakhis.train.checkpoint_normalization`).

    A magnification-specific checkpoint (MSBC, MSFC) is for images of its magnification:
    images whose BreaKHis names give another magnification are refused unless
    ``any_magnification``, and then predicted with a warning per magnification; images
    whose names give none (in-house names) are predicted with one warning.

    Args:
        checkpoint: a ``checkpoint.pt`` written by training.
        inputs: image files and/or folders.
        out_csv: output CSV path.
        device: torch device for inference.
        batch_size: images per forward pass.
        progress: show a progress bar.
        any_magnification: predict images of other magnifications than a
            magnification-specific checkpoint's (with warnings) instead of refusing.

    Returns:
        ``{"csv": path, "images": n, "classes": [...], "problems": [...],
        "warnings": [...]}``: ``problems`` names the inputs left out, ``warnings``
        what was predicted despite a doubt (the magnification).

    Raises:
        breakhis._files.SettingError: before anything is read, for a ``batch_size`` that
            is not an integer >= 1, or an ``out_csv`` that is a folder or lies under a
            file (``breakhis-repro predict`` names its options: ``--batch-size``, ``--out``).
        ValueError: before anything is read, when the folder of ``out_csv`` cannot be
            created or written (``"expected a folder for 'out/p.csv' that can be
            written, but writing a file into 'out' failed: Permission denied"``;
            nothing is created: :func:`breakhis._files.writable_problem`); later, when
            no readable image is found, or images of another magnification are given to
            a magnification-specific checkpoint without ``any_magnification``, or
            ``any_magnification`` is given with a magnification-independent one.
        NotACheckpointError: when ``checkpoint`` is not a breakhis checkpoint.
    """
    check_int("batch_size", batch_size, 1)
    batch_size = int(batch_size)  # a NumPy integer passes; torch's DataLoader takes int only
    if Path(out_csv).is_dir():
        raise SettingError("out_csv", f"expects the path of a CSV file, but {str(out_csv)!r} "
                                      "is a folder")
    problem = folder_problem(Path(out_csv).parent)
    if problem:
        raise SettingError("out_csv", f"expects the path of a CSV file in a folder, but "
                                      f"{problem}")
    # tried before the images are read and predicted (minutes on the real data), creating
    # nothing: a folder that does not exist yet is made when the CSV is written
    problem = writable_problem(Path(out_csv).parent, f"a folder for {str(out_csv)!r}",
                               create=False)
    if problem:
        raise ValueError(problem)
    images, problems = collect_images(inputs)
    if not images:
        raise ValueError(f"expected image files or folders with images, but found none in "
                         f"{listed([repr(str(i)) for i in inputs], ', ')}"
                         + (f" ({listed(problems, '; ')})" if problems else ""))
    model, state = load_model(checkpoint, device=device)
    warn_unfinished(checkpoint, state, "the predictions are an unfinished model's")
    described = [_described(p) for p in images]
    trained, others, unknown = _other_magnifications(state, described)
    if any_magnification and not trained:  # a magnification-independent checkpoint: it would do nothing
        task = ((state.get("extra") or {}).get("task") or {}).get("name")
        raise ValueError(
            f"any_magnification (--any-magnification) applies to a checkpoint of a "
            f"magnification-specific task (MSBC, MSFC), but {str(checkpoint)!r} is of "
            f"{task or 'a magnification-independent task'}, which takes images of "
            "any magnification: leave it out")
    if others and not any_magnification:
        raise ValueError(
            f"expected images of the magnification of the {trained} checkpoint "
            f"{str(checkpoint)!r}, but got {', '.join(others)}; predict them with a "
            "checkpoint of their magnification (or of a magnification-independent task, "
            "MIBC or MIFC), or pass any_magnification=True (--any-magnification) to predict "
            "them anyway")
    warnings = [f"{group} predicted by the {trained} checkpoint (any magnification allowed)"
                for group in others] + ([unknown] if unknown else [])
    escaped = [csv_path(p) for p in images if csv_path(p) != str(p)]
    if escaped:
        n = len(escaped)
        warnings.append(f"{count(n, 'file name')} {plural(n, 'is', 'are')} not valid UTF-8: "
                        f"{plural(n, 'its', 'their')} undecodable bytes are written as \\xNN "
                        f"escapes in the path column, e.g. "
                        f"{escaped[:3]}")
    classes = list(state["classes"])
    mean, std = checkpoint_normalization(state)
    probs = predict_probs(model, images, input_size=int(state["config"]["input_size"]),
                          batch_size=batch_size, device=device, progress=progress,
                          mean=mean, std=std)
    out = write_predictions(out_csv, described, np.full(len(images), -1), probs, classes)
    return {"csv": str(out), "images": len(images), "classes": classes, "problems": problems,
            "warnings": warnings}
