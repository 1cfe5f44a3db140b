"""Class probabilities for new images from a trained checkpoint, as a CSV file."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from .data import IMAGE_ERRORS, IMAGE_EXTENSIONS, parse_breakhis_name, read_image_size
from .evaluate import write_predictions
from .train import load_model, predict_probs

__all__ = ["collect_images", "predict_to_csv"]


def _images_below(folder: Path, problems: list[str]) -> list[Path]:
    """Image files below ``folder``, sorted; hidden folders are not entered.

    Hidden folders (``.ipynb_checkpoints``, ``.git``) hold copies or tool state, as in
    :func:`breakhis.data.index_breakhis`, which skips them too; each is named in
    ``problems``.
    """
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in sorted(d for d in dirnames if d.startswith(".")):
            problems.append(f"{Path(dirpath) / name}/: hidden folder, not searched")
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(Path(dirpath) / name for name in sorted(filenames)
                     if Path(name).suffix.lower() in IMAGE_EXTENSIONS)
    return sorted(found)


def collect_images(inputs: Sequence[str | os.PathLike[str]]) -> tuple[list[Path], list[str]]:
    """Expand files and folders (recursively, hidden folders left out) into image files.

    Returns:
        ``(images, problems)``: sorted image paths, and messages about inputs that are
        missing, not images, or unreadable (these are left out).
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
                problems.append(f"{path}: not an image (extension {path.suffix!r})")
        else:
            problems.append(f"{path}: does not exist")
    images = []
    for path in found:
        try:
            read_image_size(path, verify=True)
        except IMAGE_ERRORS as exc:
            problems.append(f"{path}: unreadable image ({exc})")
            continue
        images.append(path)
    return images, problems


def _described(path: Path) -> SimpleNamespace:
    """``path`` with the patient and magnification its BreaKHis name gives, if any."""
    try:
        name = parse_breakhis_name(path.name)
    except ValueError:
        return SimpleNamespace(path=path, patient=None, magnification=None)
    return SimpleNamespace(path=path, patient=name.patient, magnification=name.magnification)


def predict_to_csv(
    checkpoint: str | os.PathLike[str],
    inputs: Sequence[str | os.PathLike[str]],
    out_csv: str | os.PathLike[str],
    *,
    device: str = "cpu",
    batch_size: int = 32,
    progress: bool = True,
) -> dict[str, Any]:
    """Write one row of class probabilities for every readable input image.

    The CSV has the columns of ``test_predictions.csv`` (see
    :func:`breakhis.evaluate.write_predictions`), so
    :func:`~breakhis.evaluate.read_predictions` reads it: ``path``, ``patient`` and
    ``magnification`` (from BreaKHis file names; empty otherwise), ``true_label`` and
    ``true_index`` (empty: unknown),
    ``predicted_label`` and ``prob_<class>`` per class.

    Args:
        checkpoint: a ``checkpoint.pt`` written by training.
        inputs: image files and/or folders.
        out_csv: output CSV path.
        device: torch device for inference.
        batch_size: images per forward pass.
        progress: show a progress bar.

    Returns:
        ``{"csv": path, "images": n, "classes": [...], "problems": [...]}``.

    Raises:
        ValueError: when no readable image is found.
        NotACheckpointError: when ``checkpoint`` is not a breakhis checkpoint.
    """
    images, problems = collect_images(inputs)
    if not images:
        raise ValueError(f"expected image files or folders with images, but found none in "
                         f"{[str(i) for i in inputs]}" + (f"; {problems[:3]}" if problems else ""))
    model, state = load_model(checkpoint, device=device)
    classes = list(state["classes"])
    probs = predict_probs(model, images, input_size=int(state["config"]["input_size"]),
                          batch_size=batch_size, device=device, progress=progress)
    out = write_predictions(out_csv, [_described(p) for p in images],
                            np.full(len(images), -1), probs, classes)
    return {"csv": str(out), "images": len(images), "classes": classes, "problems": problems}
