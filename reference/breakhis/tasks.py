"""The four experiments of Liu, Juhas & Zhang (2020) and a generic image-folder task.

- **MSBC**: magnification-specific binary (benign vs malignant), one model per magnification.
- **MIBC**: magnification-independent binary, all magnifications together.
- **MSFC**: magnification-specific fine-grained (the 8 tumour types).
- **MIFC**: magnification-independent fine-grained.
- **folder**: the class folders of a generic image-folder data set.

A :class:`Task` selects the records it uses and maps each to an integer target.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._files import SettingError
from .data import MAGNIFICATIONS, TYPE_CODES, ImageRecord

__all__ = ["BINARY_CLASSES", "TASK_NAMES", "Task", "get_task"]

BINARY_CLASSES: tuple[str, ...] = ("benign", "malignant")
TASK_NAMES: tuple[str, ...] = ("MSBC", "MIBC", "MSFC", "MIFC", "folder")
_DESCRIPTIONS = {
    "MSBC": "magnification-specific binary (benign vs malignant)",
    "MIBC": "magnification-independent binary (benign vs malignant)",
    "MSFC": "magnification-specific fine-grained (8 tumour types)",
    "MIFC": "magnification-independent fine-grained (8 tumour types)",
    "folder": "image-folder classes",
}


@dataclass(frozen=True)
class Task:
    """A classification task over image records.

    Args:
        name: one of :data:`TASK_NAMES`.
        classes: class names; the target of a record is the index of its class here.
        magnification: the magnification used (magnification-specific tasks), else ``None``.

    Examples:
        >>> task = get_task("MSFC", magnification=200)
        >>> task.num_classes, task.magnification, task.fine_grained
        (8, 200, True)
    """

    name: str
    classes: tuple[str, ...]
    magnification: int | None = None

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.classes)

    @property
    def fine_grained(self) -> bool:
        """Whether the targets are the 8 tumour types."""
        return self.name in ("MSFC", "MIFC")

    @property
    def description(self) -> str:
        """The task in words."""
        text = _DESCRIPTIONS[self.name]
        return f"{text} at {self.magnification}X" if self.magnification else text

    def label_of(self, record: ImageRecord) -> str:
        """The class name of ``record`` under this task."""
        if self.fine_grained:
            if record.tumor_type is None:
                raise ValueError(
                    f"task {self.name} needs BreaKHis tumour types, but {record.path} has none"
                )
            return record.tumor_type
        return record.label

    def select(self, records: Sequence[ImageRecord]) -> list[ImageRecord]:
        """Keep the records this task uses (one magnification for MS* tasks)."""
        if self.magnification is None:
            return list(records)
        return [r for r in records if r.magnification == self.magnification]

    def targets(self, records: Sequence[ImageRecord]) -> np.ndarray:
        """Integer targets (indices into :attr:`classes`) of ``records``.

        Raises:
            ValueError: when a record's class is not one of :attr:`classes`.
        """
        index = {c: i for i, c in enumerate(self.classes)}
        out = np.empty(len(records), dtype=np.int64)
        for i, record in enumerate(records):
            label = self.label_of(record)
            if label not in index:
                raise ValueError(
                    f"expected a class in {self.classes} for task {self.name}, but "
                    f"{record.path} has {label!r}"
                )
            out[i] = index[label]
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description, stored with every result."""
        return {
            "name": self.name,
            "description": self.description,
            "classes": list(self.classes),
            "magnification": self.magnification,
        }


def get_task(
    name: str,
    *,
    magnification: int | None = None,
    classes: Sequence[str] | None = None,
) -> Task:
    """Build a task by name.

    Args:
        name: ``MSBC``, ``MIBC``, ``MSFC``, ``MIFC`` (case-insensitive) or ``folder``.
        magnification: required for ``MSBC``/``MSFC`` (40, 100, 200 or 400); not allowed
            for the others.
        classes: class names, required for ``folder`` (e.g. the sorted record labels).

    Raises:
        breakhis._files.SettingError: (a ``ValueError`` naming the setting, ``task`` or
            ``magnification``) for an unknown name or a missing/unexpected magnification.

    Examples:
        >>> get_task("mibc").classes
        ('benign', 'malignant')
    """
    key = name.upper() if name.lower() != "folder" else "folder"
    if key not in TASK_NAMES:
        raise SettingError("task", f"must be one of {TASK_NAMES}, but got {name!r}")
    if key in ("MSBC", "MSFC"):
        if magnification not in MAGNIFICATIONS:
            got = "none was given" if magnification is None else f"got {magnification!r}"
            raise SettingError(
                "magnification", f"must be one of {MAGNIFICATIONS} for task {key}, which is "
                f"magnification-specific, but {got}"
            )
    elif magnification is not None:
        raise SettingError(
            "magnification", f"must not be given for task {key}, which uses all "
            f"magnifications (MSBC and MSFC take one), but got {magnification!r}"
        )
    if key == "folder":
        if not classes:
            raise ValueError("task 'folder' needs the class names, but got none")
        return Task("folder", tuple(classes))
    return Task(key, TYPE_CODES if key in ("MSFC", "MIFC") else BINARY_CLASSES, magnification)
