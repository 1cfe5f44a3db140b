"""Train/test splits under the three protocols that BreaKHis results are reported with.

- ``"image"``: the paper's stratified 5-fold cross-validation over *images*. One
  patient's images land in both train and test, so accuracies are optimistic.
- ``"patient"``: stratified group k-fold over *patients* (no patient in both train and
  test). The group is the patient id (year and full slide id), so the DC/LC folders of
  slide ``13412`` form one group. Disjointness is checked on every split, not assumed.
- ``"official"``: the released folds (``dsfoldN.txt`` lines ``filename|mag|fold|grp``,
  or the Kaggle ``Folds.csv`` with columns ``fold, mag, grp, filename``). A split's
  ``fold`` is the table's own fold number (``dsfold3.txt`` gives fold 3), not its
  position among the tables found.

An image whose patient is unknown (``ImageRecord.patient is None``: an image folder
without a patients CSV, or with a blank cell or no row for it) is never put in a
made-up group: protocol ``"patient"`` refuses it (:func:`require_patients`), and a
fold of another protocol that contains one is recorded as not patient-disjoint.
:func:`patient_groups` gives the groups that every split and check uses.

Every :class:`Split` carries its protocol, so every result can say what produced it.
"""

from __future__ import annotations

import csv
import os
import re
import warnings
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
from sklearn.model_selection import (
    GroupShuffleSplit,
    ShuffleSplit,
    StratifiedGroupKFold,
    StratifiedKFold,
    StratifiedShuffleSplit,
)

from .data import ImageRecord

__all__ = [
    "PROTOCOLS",
    "PROTOCOL_DESCRIPTIONS",
    "Split",
    "check_patient_disjoint",
    "find_fold_tables",
    "image_kfold",
    "make_splits",
    "official_folds",
    "patient_groups",
    "patient_kfold",
    "read_fold_table",
    "require_patients",
    "validation_split",
]

PROTOCOLS: tuple[str, ...] = ("image", "patient", "official")
PROTOCOL_DESCRIPTIONS: dict[str, str] = {
    "image": "image-level stratified k-fold (paper protocol; a patient's images can be in "
    "train and test, optimistic)",
    "patient": "patient-level stratified group k-fold (no patient in train and test)",
    "official": "official released folds (dsfoldN.txt / Folds.csv)",
}
_DSFOLD = re.compile(r"^dsfold(\d+)\.txt$", re.IGNORECASE)


@dataclass(frozen=True)
class Split:
    """One train/test fold, as indices into the task's record list.

    Args:
        fold: fold number: from 0 for the k-fold protocols, the fold table's own number
            (e.g. 1 to 5) for ``"official"``.
        train: indices of training records.
        test: indices of test records.
        protocol: one of :data:`PROTOCOLS`.
        patient_disjoint: whether no patient is in both train and test (checked).
        notes: anything the fold had to leave out or warn about.
    """

    fold: int
    train: np.ndarray
    test: np.ndarray
    protocol: str
    patient_disjoint: bool
    notes: tuple[str, ...] = field(default=())

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description (sizes, not indices)."""
        return {
            "protocol": self.protocol,
            "protocol_description": PROTOCOL_DESCRIPTIONS[self.protocol],
            "fold": self.fold,
            "train_images": int(len(self.train)),
            "test_images": int(len(self.test)),
            "patient_disjoint": self.patient_disjoint,
            "notes": list(self.notes),
        }


def patient_groups(records: Sequence[ImageRecord]) -> np.ndarray:
    """Group id of every record: its patient, or its own path when the patient is unknown.

    A record of unknown patient is a group of one here only so that index arithmetic
    works; splits never call a fold with such records patient-disjoint.
    """
    return np.asarray([r.patient if r.patient is not None else str(r.path) for r in records])


def require_patients(records: Sequence[ImageRecord], protocol: str = "patient") -> None:
    """Raise when a record's patient is unknown.

    Args:
        records: the task's records.
        protocol: named in the message.

    Raises:
        ValueError: saying how many images lack a patient, with examples.
    """
    unknown = [str(r.path) for r in records if r.patient is None]
    if unknown:
        raise ValueError(
            f"protocol {protocol!r} needs the patient of every image, but {len(unknown)} of "
            f"{len(records)} image(s) have none, e.g. {unknown[:3]}; give each one a patient "
            "in the patients CSV (a blank cell or a missing row means unknown), or use "
            "--protocol image for image-level folds (optimistic if a patient has several "
            "images)")


def _shared_groups(split_a: np.ndarray, split_b: np.ndarray, groups: np.ndarray) -> set[str]:
    return set(groups[split_a].tolist()) & set(groups[split_b].tolist())


def check_patient_disjoint(
    train: np.ndarray, test: np.ndarray, groups: Sequence[str] | np.ndarray
) -> None:
    """Raise when a patient has images in both ``train`` and ``test``.

    Args:
        train: training indices.
        test: test indices.
        groups: patient id of every record.

    Raises:
        ValueError: naming (up to five of) the shared patients.
    """
    shared = _shared_groups(np.asarray(train), np.asarray(test), np.asarray(groups))
    if shared:
        raise ValueError(
            f"expected patient-disjoint train and test sets, but {len(shared)} patient(s) "
            f"are in both, e.g. {sorted(shared)[:5]}"
        )


def image_kfold(targets: np.ndarray, *, n_splits: int = 5, seed: int = 0) -> list[Split]:
    """The paper's protocol: stratified k-fold over images.

    Args:
        targets: integer class of every record.
        n_splits: number of folds.
        seed: shuffling seed.
    """
    targets = np.asarray(targets)
    folds = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    return [
        Split(i, np.sort(tr), np.sort(te), "image", patient_disjoint=False)
        for i, (tr, te) in enumerate(folds.split(np.zeros(len(targets)), targets))
    ]


def patient_kfold(
    targets: np.ndarray,
    groups: Sequence[str] | np.ndarray,
    *,
    n_splits: int = 5,
    seed: int = 0,
) -> list[Split]:
    """Stratified group k-fold over patients; disjointness is checked on every fold.

    Args:
        targets: integer class of every record.
        groups: patient id of every record.
        n_splits: number of folds (at most the number of patients).
        seed: shuffling seed.

    Raises:
        ValueError: when there are fewer patients than folds.
    """
    targets = np.asarray(targets)
    groups = np.asarray(groups)
    n_groups = len(set(groups.tolist()))
    if n_groups < n_splits:
        raise ValueError(
            f"patient-level {n_splits}-fold needs at least {n_splits} patients, but the "
            f"task has {n_groups}"
        )
    folds = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    out = []
    for i, (tr, te) in enumerate(folds.split(np.zeros(len(targets)), targets, groups)):
        check_patient_disjoint(tr, te, groups)
        out.append(Split(i, np.sort(tr), np.sort(te), "patient", patient_disjoint=True))
    return out


def read_fold_table(path: str | os.PathLike[str]) -> dict[int, dict[str, str]]:
    """Read an official fold table.

    Args:
        path: a ``dsfoldN.txt`` file (lines ``filename|mag|fold|grp``) or a Kaggle
            ``Folds.csv`` (columns ``fold, mag, grp, filename``).

    Returns:
        fold number -> {image base name -> ``"train"`` or ``"test"``}.

    Raises:
        ValueError: when a line or the header is not in either format.
    """
    path = Path(path)
    table: dict[int, dict[str, str]] = defaultdict(dict)
    if path.suffix.lower() == ".csv":
        with path.open(newline="") as handle:
            reader = csv.DictReader(handle)
            need = {"fold", "grp", "filename"}
            if not need <= set(reader.fieldnames or []):
                raise ValueError(
                    f"expected columns {sorted(need)} in {str(path)!r}, but got {reader.fieldnames}"
                )
            for row in reader:
                name = PurePosixPath(row["filename"].replace("\\", "/")).name
                table[int(row["fold"])][name] = _group(row["grp"], path)
        return dict(table)
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        parts = [p.strip() for p in line.split("|")]
        if len(parts) != 4:
            raise ValueError(
                f"expected 'filename|mag|fold|grp' on line {number} of {str(path)!r}, "
                f"but got {line!r}"
            )
        table[int(parts[2])][PurePosixPath(parts[0]).name] = _group(parts[3], path)
    return dict(table)


def _group(value: str, path: Path) -> str:
    grp = value.strip().lower()
    if grp not in ("train", "test"):
        raise ValueError(f"expected grp 'train' or 'test' in {str(path)!r}, but got {value!r}")
    return grp


def find_fold_tables(root: str | os.PathLike[str], *, max_depth: int = 3) -> list[Path]:
    """Find ``Folds.csv`` or ``dsfoldN.txt`` files at most ``max_depth`` levels below ``root``.

    ``Folds.csv`` wins when both are present. dsfold files are sorted by fold number.
    """
    root = Path(root)
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        depth = len(Path(dirpath).relative_to(root).parts)
        if depth >= max_depth:
            dirnames.clear()
        dirnames.sort()
        found.extend(Path(dirpath) / f for f in sorted(filenames)
                     if f.lower() == "folds.csv" or _DSFOLD.match(f))
    csvs = [p for p in found if p.name.lower() == "folds.csv"]
    if csvs:
        return csvs[:1]
    return sorted(found, key=lambda p: int(re.sub(r"\D", "", p.name)))


def official_folds(
    records: Sequence[ImageRecord], tables: Sequence[str | os.PathLike[str]]
) -> list[Split]:
    """Splits from the released fold tables.

    Records not listed in a fold are left out of it (and counted in its notes).
    Patient-disjointness is checked and recorded, not enforced; a fold with an image of
    unknown patient is recorded as not patient-disjoint (it cannot be checked). Each
    split's ``fold`` is the table's own fold number (the ``fold`` column).

    Args:
        records: the task's records.
        tables: a ``Folds.csv`` or the ``dsfoldN.txt`` files.

    Raises:
        ValueError: when no tables are given, two tables define the same fold number, or
            a fold has no test images.
    """
    if not tables:
        raise ValueError("protocol 'official' needs Folds.csv or dsfoldN.txt, but none were found")
    merged: dict[int, dict[str, str]] = {}
    source: dict[int, str] = {}
    for table in tables:
        for fold, grp in read_fold_table(table).items():
            if fold in merged:
                raise ValueError(
                    f"fold {fold} is defined by both {source[fold]!r} and {str(table)!r}; "
                    "pass each fold's table once")
            merged[fold], source[fold] = grp, str(table)
    names = [r.path.name for r in records]
    groups = patient_groups(records)
    unknown = np.asarray([r.patient is None for r in records], dtype=bool)
    out = []
    for fold in sorted(merged):
        grp = merged[fold]
        side = np.asarray([grp.get(n, "") for n in names], dtype=str)
        train, test = np.flatnonzero(side == "train"), np.flatnonzero(side == "test")
        if len(test) == 0:
            raise ValueError(f"official fold {fold} has no test images among the task's records")
        notes = []
        missing = len(names) - len(train) - len(test)
        if missing:
            notes.append(f"{missing} image(s) not listed in fold {fold}; left out")
        shared = _shared_groups(train, test, groups)
        if shared:
            notes.append(f"{len(shared)} patient(s) in train and test, e.g. {sorted(shared)[:3]}")
        n_unknown = int(unknown[train].sum() + unknown[test].sum())
        if n_unknown:
            notes.append(f"{n_unknown} image(s) without a patient; patient-disjointness "
                         "cannot be checked")
        out.append(Split(fold, train, test, "official",
                         patient_disjoint=not shared and not n_unknown, notes=tuple(notes)))
    return out


def make_splits(
    records: Sequence[ImageRecord],
    targets: np.ndarray,
    protocol: str,
    *,
    n_splits: int = 5,
    seed: int = 0,
    fold_tables: Sequence[str | os.PathLike[str]] = (),
) -> list[Split]:
    """Splits of ``records`` under ``protocol``.

    Args:
        records: the task's records.
        targets: their integer classes.
        protocol: ``"image"``, ``"patient"`` or ``"official"``.
        n_splits: folds for the k-fold protocols.
        seed: shuffling seed.
        fold_tables: fold files for ``"official"``.

    Raises:
        ValueError: for an unknown protocol, impossible settings, or (``"patient"``) a
            record whose patient is unknown.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, but got {protocol!r}")
    if len(records) != len(targets):
        raise ValueError(f"got {len(records)} records but {len(targets)} targets")
    if protocol == "image":
        return image_kfold(targets, n_splits=n_splits, seed=seed)
    if protocol == "patient":
        require_patients(records, protocol)
        return patient_kfold(targets, patient_groups(records), n_splits=n_splits, seed=seed)
    return official_folds(records, fold_tables)


def validation_split(
    train: np.ndarray,
    targets: np.ndarray,
    groups: Sequence[str] | np.ndarray,
    *,
    fraction: float,
    by_patient: bool,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Hold out part of a training set for the learning-rate schedule.

    Args:
        train: training indices.
        targets: integer class of every record.
        groups: patient id of every record.
        fraction: share of the training set to hold out, in ``(0, 1)``.
        by_patient: hold out whole patients (for patient-disjoint protocols).
        seed: seed.

    Returns:
        ``(fit, val)`` index arrays.

    Raises:
        ValueError: for a fraction outside ``(0, 1)``.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"validation fraction must be in (0, 1), but got {fraction}")
    train = np.asarray(train)
    y = np.asarray(targets)[train]
    g = np.asarray(groups)[train]
    zeros = np.zeros(len(train))
    if by_patient:
        n_folds = max(2, round(1 / fraction))
        try:
            splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
            with warnings.catch_warnings():
                # small classes cannot be in every validation fold; only one fold is used
                warnings.filterwarnings("ignore", "The least populated class", UserWarning)
                fit, val = next(splitter.split(zeros, y, g))
        except ValueError:  # fewer patients or images than folds: no stratification
            shuffled = GroupShuffleSplit(1, test_size=fraction, random_state=seed)
            fit, val = next(shuffled.split(zeros, y, g))
        check_patient_disjoint(fit, val, g)
    else:
        try:
            stratified = StratifiedShuffleSplit(1, test_size=fraction, random_state=seed)
            fit, val = next(stratified.split(zeros, y))
        except ValueError:  # a class too small to stratify
            fit, val = next(ShuffleSplit(1, test_size=fraction, random_state=seed).split(zeros))
    return np.sort(train[fit]), np.sort(train[val])
