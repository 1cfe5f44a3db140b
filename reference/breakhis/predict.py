"""Class probabilities for new images from a trained checkpoint, as a CSV file."""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .data import IMAGE_EXTENSIONS, read_image_size
from .train import load_model, predict_probs

__all__ = ["collect_images", "predict_to_csv"]


def collect_images(inputs: Sequence[str | os.PathLike[str]]) -> tuple[list[Path], list[str]]:
    """Expand files and folders (recursively) into image files.

    Returns:
        ``(images, problems)``: sorted image paths, and messages about inputs that are
        missing, not images, or unreadable (these are left out).
    """
    found: list[Path] = []
    problems: list[str] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found.extend(sorted(p for p in path.rglob("*")
                                if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS))
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
        except (OSError, ValueError, SyntaxError) as exc:
            problems.append(f"{path}: unreadable image ({exc})")
            continue
        images.append(path)
    return images, problems


def predict_to_csv(
    checkpoint: str | os.PathLike[str],
    inputs: Sequence[str | os.PathLike[str]],
    out_csv: str | os.PathLike[str],
    *,
    device: str = "cpu",
    batch_size: int = 32,
    progress: bool = True,
) -> dict[str, Any]:
    """Write ``path, predicted, p_<class>...`` rows for every readable input image.

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
    """
    images, problems = collect_images(inputs)
    if not images:
        raise ValueError(f"expected image files or folders with images, but found none in "
                         f"{[str(i) for i in inputs]}" + (f"; {problems[:3]}" if problems else ""))
    model, state = load_model(checkpoint, device=device)
    classes = list(state["classes"])
    probs = predict_probs(model, images, input_size=int(state["config"]["input_size"]),
                          batch_size=batch_size, device=device, progress=progress)
    out = Path(out_csv)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "predicted", *[f"p_{c}" for c in classes]])
        for path, row in zip(images, probs):
            writer.writerow([str(path), classes[int(row.argmax())], *[f"{p:.6f}" for p in row]])
    return {"csv": str(out), "images": len(images), "classes": classes, "problems": problems}
