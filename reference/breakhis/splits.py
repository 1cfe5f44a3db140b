"""Train/test splits under the three protocols that BreaKHis results are reported with.

- ``"image"``: the paper's 5-fold cross-validation over *images* (the paper draws the
  folds at random; ours are stratified by class). One patient's images land in both
  train and test, so accuracies are optimistic.
- ``"patient"``: stratified group k-fold over *patients* (no patient in both train and
  test). The group is the patient id (year and full slide id), so the DC/LC folders of
  slide ``13412`` form one group. Disjointness is checked on every split, not assumed.
- ``"official"``: the released folds (``dsfoldN.txt`` lines ``filename|mag|fold|grp``,
  or the Kaggle ``Folds.csv`` with columns ``fold, mag, grp, filename``). A split's
  ``fold`` is the table's own fold number (``dsfold3.txt`` gives fold 3), not its
  position among the tables found. Lines are matched to images by path where the
  table gives one (see :func:`official_folds`).

An image whose patient is unknown (``ImageRecord.patient is None``: an image folder
without a patients CSV, or with a blank cell or no row for it) is never put in a
made-up group: protocol ``"patient"`` refuses it (:func:`require_patients`), and a
fold of another protocol that contains one is recorded as not patient-disjoint.
:func:`patient_groups` gives the groups that every split and check uses.

Every :class:`Split` carries its protocol, so every result can say what produced it.
"""

from __future__ import annotations

import contextlib
import csv
import os
import re
import warnings
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
from sklearn.model_selection import (
    ShuffleSplit,
    StratifiedGroupKFold,
    StratifiedKFold,
    StratifiedShuffleSplit,
)

from ._files import count, plural
from .data import DataIndex, ImageRecord, _listed_path, parse_breakhis_name

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
    "image": "image-level k-fold, stratified by class (the paper's protocol, whose folds are drawn "
    "at random; a patient's images can be in train and test, optimistic)",
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
            f"{count(len(records), 'image')} {plural(len(unknown), 'has', 'have')} none, e.g. "
            f"{unknown[:3]}; give each one a patient "
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
            f"expected patient-disjoint train and test sets, but {count(len(shared), 'patient')} "
            f"{plural(len(shared), 'is', 'are')} in both, e.g. {sorted(shared)[:5]}"
        )


def image_kfold(
    targets: np.ndarray, *, n_splits: int = 5, seed: int = 0,
    classes: Sequence[str] | None = None,
) -> list[Split]:
    """The paper's protocol, k-fold over images (the paper draws the folds at random;
    these are stratified by class).

    Args:
        targets: integer class of every record.
        n_splits: number of folds.
        seed: shuffling seed.
        classes: the classes' names, for messages (default: their numbers).

    Raises:
        ValueError: when no class has ``n_splits`` images (a class with fewer is left
            out of some test folds, with a warning that names it).
    """
    targets = np.asarray(targets)
    _check_class_sizes(targets, n_splits, "image-level", classes)
    folds = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    with _small_classes_said(targets, n_splits, "image-level", classes):
        drawn = list(folds.split(np.zeros(len(targets)), targets))
    return [
        Split(i, np.sort(tr), np.sort(te), "image", patient_disjoint=False)
        for i, (tr, te) in enumerate(drawn)
    ]


def patient_kfold(
    targets: np.ndarray,
    groups: Sequence[str] | np.ndarray,
    *,
    n_splits: int = 5,
    seed: int = 0,
    classes: Sequence[str] | None = None,
) -> list[Split]:
    """Stratified group k-fold over patients; disjointness is checked on every fold.

    Args:
        targets: integer class of every record.
        groups: patient id of every record.
        n_splits: number of folds (at most the number of patients).
        seed: shuffling seed.
        classes: the classes' names, for messages (default: their numbers).

    Raises:
        ValueError: when there are fewer patients than folds, or no class has
            ``n_splits`` images.
    """
    targets = np.asarray(targets)
    groups = np.asarray(groups)
    n_groups = len(set(groups.tolist()))
    if n_groups < n_splits:
        fewer = [_at_most(n_groups)] if n_groups >= 2 else []
        if (np.unique(targets, return_counts=True)[1] >= n_splits).any():
            fewer.append("--protocol image (image-level folds, optimistic: a patient's "
                         "images land in train and test)")
        raise ValueError(
            f"patient-level {n_splits}-fold needs at least {n_splits} patients, but the "
            f"task has {n_groups}" + (f"; pass {', or '.join(fewer)}" if fewer else "")
        )
    _check_class_sizes(targets, n_splits, "patient-level", classes)
    folds = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    with _small_classes_said(targets, n_splits, "patient-level", classes):
        drawn = list(folds.split(np.zeros(len(targets)), targets, groups))
    if any(len(te) == 0 for _, te in drawn):
        drawn = _one_patient_each(groups, n_splits, seed, n_groups)
    out = []
    for i, (tr, te) in enumerate(drawn):
        check_patient_disjoint(tr, te, groups)
        out.append(Split(i, np.sort(tr), np.sort(te), "patient", patient_disjoint=True))
    return out


def _one_patient_each(
    groups: np.ndarray, n_splits: int, seed: int, n_groups: int,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Folds of one patient each, in an order drawn from ``seed``: what k-fold over k
    patients must give, where scikit-learn's StratifiedGroupKFold (balancing classes
    greedily) can put two patients in one fold and leave another fold's test set empty.

    Raises:
        ValueError: with more patients than folds (where it has not been seen to happen).
    """
    if n_groups != n_splits:
        raise ValueError(
            f"patient-level {n_splits}-fold over {n_groups} patients drew a fold without test "
            "images; pass another --split-seed or fewer --n-splits")
    patients = np.unique(groups)
    order = np.random.default_rng(seed).permutation(len(patients))
    everything = np.arange(len(groups))
    return [(everything[groups != patients[k]], everything[groups == patients[k]]) for k in order]


@contextlib.contextmanager
def _small_classes_said(
    targets: np.ndarray, n_splits: int, level: str, names: Sequence[str] | None = None,
) -> Iterator[None]:
    """Warn in the package's words of each class with fewer than ``n_splits`` images (some
    test folds lack it), and keep scikit-learn's own warning of it ("The least populated
    class in y has only ...", printed with a site-packages path) from the console.

    Examples:
        >>> import warnings
        >>> with warnings.catch_warnings(record=True) as seen:
        ...     warnings.simplefilter("always")
        ...     with _small_classes_said(np.array([0, 0, 0, 1, 1]), 3, "image-level", ["a", "b"]):
        ...         pass
        >>> print(seen[0].message)
        image-level 3-fold: class 'b' has 2 images, fewer than the 3 folds: at least 1 test fold has none of it
    """
    classes, sizes = np.unique(np.asarray(targets), return_counts=True)
    for c, n in zip(classes.tolist(), sizes.tolist()):
        if 0 < n < n_splits:
            name = c if names is None else repr(names[c])
            lacking = n_splits - n
            warnings.warn(f"{level} {n_splits}-fold: class {name} has {count(n, 'image')}, fewer than the "
                          f"{n_splits} folds: at least {count(lacking, 'test fold')} "
                          f"{plural(lacking, 'has', 'have')} none of it", UserWarning, stacklevel=4)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The least populated class in y has only",
                                category=UserWarning)
        yield


def _check_class_sizes(
    targets: np.ndarray, n_splits: int, level: str, names: Sequence[str] | None = None,
) -> None:
    """Refuse what scikit-learn's stratified k-folds refuse: no class with ``n_splits``
    images (a smaller class only makes it warn), said with the images of each class
    (named by ``names``, else numbered).

    Examples:
        >>> _check_class_sizes(np.array([0, 0, 0, 1, 1]), 5, "image-level")
        ... # doctest: +NORMALIZE_WHITESPACE
        Traceback (most recent call last):
        ...
        ValueError: image-level 5-fold needs a class with at least 5 images, but class 0
        has 3 images and class 1 has 2; pass --n-splits 3 or fewer
    """
    classes, sizes = np.unique(targets, return_counts=True)
    if (sizes >= n_splits).any() or n_splits < 2:  # n_splits < 2: scikit-learn says why
        return
    listed = [f"class {c if names is None else repr(names[c])} has "
              f"{count(int(n), 'image') if i == 0 else int(n)}"
              for i, (c, n) in enumerate(zip(classes.tolist(), sizes))]
    what = (", ".join(listed[:-1]) + " and " + listed[-1] if len(listed) > 1
            else listed[0] if listed else "there are no images")
    largest = int(sizes.max(initial=0))
    todo = (f"pass {_at_most(largest)}" if largest >= 2
            else "k-fold needs a class with at least 2 images")
    raise ValueError(f"{level} {n_splits}-fold needs a class with at least "
                     f"{count(n_splits, 'image')}, but {what}; {todo}")


def _at_most(n_splits: int) -> str:
    """``--n-splits`` up to ``n_splits`` (>= 2), in words."""
    return f"--n-splits {n_splits}" + (" or fewer" if n_splits > 2 else "")


@dataclass(frozen=True)
class _FoldEntry:
    """One line of a fold table: the image as listed, its side, where it was read, and
    its ``mag`` column as written (``""`` when the table has none)."""

    name: str
    grp: str
    line: int
    mag: str = ""


_CSV_FORMAT = "a header 'fold,mag,grp,filename' and one image per row"
_DSFOLD_FORMAT = "'filename|mag|fold|grp', e.g. 'SOB_M_DC-14-13412-100-001.png|100|1|train'"


def _read_fold_entries(path: Path) -> dict[int, list[_FoldEntry]]:
    """Fold number -> the table's entries for it, in file order (see :func:`read_fold_table`)."""
    table: dict[int, list[_FoldEntry]] = defaultdict(list)
    # utf-8-sig: spreadsheet programs start UTF-8 CSVs with a byte-order mark.
    if path.suffix.lower() == ".csv":
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            columns = {c.strip().lower(): c for c in (reader.fieldnames or [])}
            need = ("fold", "grp", "filename")
            if not set(need) <= set(columns):
                raise ValueError(
                    f"expected columns {sorted(need)} in {str(path)!r}, but got {reader.fieldnames}"
                )
            for row in reader:
                line = reader.line_num
                fold, grp, name = (row.get(columns[c]) for c in need)
                mag = row.get(columns["mag"]) if "mag" in columns else None
                if fold is None or grp is None or name is None or not name.strip():
                    raise ValueError(
                        f"expected {_CSV_FORMAT} in {str(path)!r}, but line {line} has "
                        f"{[v for v in row.values() if v]}")
                table[_fold_number(fold, line, path, _CSV_FORMAT)].append(
                    _FoldEntry(_listed_path(name), _group(grp, line, path), line, mag or ""))
        return _one_side_each(table, path)
    for line, text in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
        if not text.strip():
            continue
        parts = [p.strip() for p in text.split("|")]
        if len(parts) != 4 or not parts[0]:
            raise ValueError(
                f"expected {_DSFOLD_FORMAT} on line {line} of {str(path)!r}, but got {text!r}"
            )
        table[_fold_number(parts[2], line, path, _DSFOLD_FORMAT)].append(
            _FoldEntry(_listed_path(parts[0]), _group(parts[3], line, path), line, parts[1]))
    return _one_side_each(table, path)


def _one_side_each(table: dict[int, list[_FoldEntry]], path: Path) -> dict[int, list[_FoldEntry]]:
    """``table``, once no name is listed as both train and test in one fold."""
    for fold, entries in table.items():
        first_of: dict[str, _FoldEntry] = {}
        for entry in entries:
            first = first_of.setdefault(entry.name, entry)
            if first.grp != entry.grp:
                raise ValueError(
                    f"expected each image on one side of fold {fold} in {str(path)!r}, but "
                    f"{entry.name!r} is listed as {first.grp} on line {first.line} and as "
                    f"{entry.grp} on line {entry.line}")
    return dict(table)


def _fold_number(value: str, line: int, path: Path, expected: str) -> int:
    try:
        return int(value.strip())
    except ValueError:
        raise ValueError(
            f"expected an integer fold number on line {line} of {str(path)!r} ({expected}), "
            f"but got {value!r}") from None


def _group(value: str, line: int, path: Path) -> str:
    grp = value.strip().lower()
    if grp not in ("train", "test"):
        raise ValueError(f"expected grp 'train' or 'test' on line {line} of {str(path)!r}, "
                         f"but got {value!r}")
    return grp


def read_fold_table(path: str | os.PathLike[str]) -> dict[int, dict[str, str]]:
    """Read an official fold table.

    Both formats are read as UTF-8 (a byte-order mark, as spreadsheet programs write, is
    fine). Names are kept as listed: bare file names in ``dsfoldN.txt``, paths from
    ``BreaKHis_v1/...`` in the Kaggle ``Folds.csv``, paths relative to the data root in
    a table written for an image folder (Windows separators become ``/``).

    Args:
        path: a ``dsfoldN.txt`` file (lines ``filename|mag|fold|grp``) or a Kaggle
            ``Folds.csv`` (columns ``fold, mag, grp, filename``).

    Returns:
        fold number -> {image name as listed -> ``"train"`` or ``"test"``}.

    Raises:
        ValueError: naming the file and line, when the header or a line is not in the
            format (a short row, a fold number that is not an integer, a ``grp`` other
            than train/test), or when one name is listed as both train and test in a fold.
    """
    path = Path(path)
    return {fold: {e.name: e.grp for e in entries}
            for fold, entries in _read_fold_entries(path).items()}


def find_fold_tables(index: DataIndex, *, max_depth: int = 3) -> list[Path]:
    """The ``Folds.csv`` or ``dsfoldN.txt`` files an index found, at most ``max_depth``
    folder levels below its root.

    The tables are taken from :attr:`~breakhis.data.DataIndex.metadata_files`, so that
    they come from the walk that found the images: copies in hidden folders
    (``.ipynb_checkpoints``) are left out, tables in linked folders are found.
    ``Folds.csv`` wins when both are present (the first in walk order: top-down, sorted
    names); dsfold files are sorted by fold number.

    Args:
        index: the indexed data (:func:`breakhis.data.index_breakhis` or
            :func:`breakhis.data.index_image_folder`).
        max_depth: deepest folder level searched (0: the root only).
    """
    found = [index.root / name for name in index.metadata_files
             if len(PurePosixPath(name).parts) - 1 <= max_depth
             and (PurePosixPath(name).name.lower() == "folds.csv"
                  or _DSFOLD.match(PurePosixPath(name).name))]
    csvs = [p for p in found if p.name.lower() == "folds.csv"]
    if csvs:
        return csvs[:1]
    return sorted(found, key=lambda p: int(re.sub(r"\D", "", p.name)))


def official_folds(
    records: Sequence[ImageRecord], tables: Sequence[str | os.PathLike[str]],
    *, magnification: int | None | str = "records",
) -> list[Split]:
    """Splits from the released fold tables.

    A table line names an image by a path or a bare file name. A path (``Folds.csv``:
    ``BreaKHis_v1/histology_slides/.../x.png``; a table for an image folder:
    ``<class>/x.png``) matches the record whose path ends with it. A bare name
    (``dsfoldN.txt``) matches the record of that name, and must name one record: image
    folders often reuse file names in every class folder. BreaKHis file names are unique
    (:func:`~breakhis.data.index_breakhis` refuses a repeat), so a BreaKHis record is
    also matched by its name alone when the table's path comes from a copy laid out
    differently.

    Records not listed in a fold are left out of it, and the fold's lines that match no
    record (an image deleted, renamed, or left out by the index as unreadable) are
    dropped: both are counted in its notes (the lines per side, with examples). Only the
    task's lines count: when the records are of one magnification (``MSBC``, ``MSFC``),
    lines of another (by the BreaKHis file name, else the ``mag`` column) are other
    tasks' and are not noted. ``magnification`` says the task's (``None``: every
    magnification, as ``MIBC``); by default it is read from the records (one among them:
    that one), which misses a magnification-independent task run on data of one
    magnification. Patient-disjointness is checked and recorded, not
    enforced; a fold with an image of unknown patient is recorded as not
    patient-disjoint (it cannot be checked). Each split's ``fold`` is the table's own
    fold number (the ``fold`` column).

    Args:
        records: the task's records.
        tables: a ``Folds.csv`` or the ``dsfoldN.txt`` files.
        magnification: the task's magnification, ``None`` for all, or ``"records"``.

    Raises:
        ValueError: when no tables are given, two tables define the same fold number, a
            table line is malformed (see :func:`read_fold_table`), a line matches more
            than one record, one record is listed as both train and test in a fold, or a
            fold has no training or no test images among the task's records.
    """
    if not tables:
        raise ValueError("protocol 'official' needs Folds.csv or dsfoldN.txt, but none were found")
    merged: dict[int, list[_FoldEntry]] = {}
    source: dict[int, str] = {}
    for table in tables:
        for fold, entries in _read_fold_entries(Path(table)).items():
            if fold in merged:
                raise ValueError(
                    f"fold {fold} is defined by both {source[fold]!r} and {str(table)!r}; "
                    "pass each fold's table once")
            merged[fold], source[fold] = entries, str(table)
    by_name: dict[str, list[int]] = defaultdict(list)
    for i, record in enumerate(records):
        by_name[record.path.name].append(i)
    groups = patient_groups(records)
    unknown = np.asarray([r.patient is None for r in records], dtype=bool)
    if magnification == "records":
        magnifications = {r.magnification for r in records}
        # one magnification among the records: a magnification-specific task, whose table
        # lines of other magnifications are other tasks' (None: an image folder, or all)
        task_mag = next(iter(magnifications)) if len(magnifications) == 1 else None
    else:
        task_mag = magnification
    out = []
    for fold in sorted(merged):
        side, unmatched = _sides(records, by_name, merged[fold], fold, source[fold])
        train, test = np.flatnonzero(side == "train"), np.flatnonzero(side == "test")
        for name, idx in (("training", train), ("test", test)):
            if len(idx) == 0:
                raise ValueError(
                    f"official fold {fold} of {source[fold]!r} has no {name} images among the "
                    f"task's {len(records)} records")
        notes = []
        unlisted = np.flatnonzero(side == "")
        if len(unlisted):
            names = [_shown_name(records[i]) for i in unlisted[:3]]
            notes.append(f"{count(len(unlisted), 'image')} not listed in fold {fold}; left out, "
                         f"e.g. {names}")
        absent = [e for e in unmatched
                  if task_mag is None or _line_magnification(e) in (task_mag, None)]
        if absent:
            notes.append(_absent_note(absent, fold))
        shared = _shared_groups(train, test, groups)
        if shared:
            notes.append(f"{count(len(shared), 'patient')} in train and test, e.g. "
                         f"{sorted(shared)[:3]}")
        n_unknown = int(unknown[train].sum() + unknown[test].sum())
        if n_unknown:
            notes.append(f"{count(n_unknown, 'image')} without a patient; patient-disjointness "
                         "cannot be checked")
        out.append(Split(fold, train, test, "official",
                         patient_disjoint=not shared and not n_unknown, notes=tuple(notes)))
    return out


def _sides(
    records: Sequence[ImageRecord],
    by_name: dict[str, list[int]],
    entries: Sequence[_FoldEntry],
    fold: int,
    table: str,
) -> tuple[np.ndarray, list[_FoldEntry]]:
    """``"train"``, ``"test"`` or ``""`` (not listed) for every record, from one fold's
    lines, and the lines that match no record."""
    side = np.full(len(records), "", dtype=object)
    line_of: dict[int, int] = {}
    unmatched = []
    for entry in entries:
        parts = PurePosixPath(entry.name).parts
        named = by_name.get(parts[-1], [])
        hits = named if len(parts) == 1 else [
            i for i in named if records[i].path.parts[-len(parts):] == parts]
        if not hits and len(named) == 1 and records[named[0]].tumor_type is not None:
            hits = named  # a BreaKHis name is unique: the table's copy nests differently
        if len(hits) > 1:
            paths = [str(records[i].path) for i in hits[:3]]
            raise ValueError(
                f"expected line {entry.line} of {table!r} to name one image, but "
                f"{entry.name!r} matches {len(hits)}, e.g. {paths}; list the path relative "
                "to the data root (e.g. '<class>/<file>') where file names repeat")
        if not hits:
            unmatched.append(entry)
        for i in hits:
            if side[i] and side[i] != entry.grp:
                raise ValueError(
                    f"expected each image on one side of fold {fold} in {table!r}, but "
                    f"{str(records[i].path)!r} is listed as {side[i]} on line {line_of[i]} "
                    f"and as {entry.grp} on line {entry.line}")
            side[i], line_of[i] = entry.grp, entry.line
    return side.astype(str), unmatched


def _shown_name(record: ImageRecord) -> str:
    """A record's name in a note: a BreaKHis file name (unique), else its path from its
    class folder on (``<class folder>/<subfolders>/<file>``; the first folder of its class's
    name, so that ``benign/benign/x.png`` is not ``benign/x.png``), or its last two parts
    where no folder is named as its class."""
    if record.tumor_type is not None:
        return record.path.name
    parts = record.path.parts
    at = min((i for i, part in enumerate(parts[:-1]) if part == record.label), default=len(parts) - 2)
    return "/".join(parts[at:])


def _line_magnification(entry: _FoldEntry) -> int | None:
    """The magnification of a table line's image: from its BreaKHis file name, else
    from the table's ``mag`` column (``100`` or ``100X``); ``None`` when neither says."""
    try:
        return parse_breakhis_name(PurePosixPath(entry.name).name).magnification
    except ValueError:
        pass
    mag = entry.mag.strip().upper().removesuffix("X")
    return int(mag) if mag.isdigit() else None


def _absent_note(entries: Sequence[_FoldEntry], fold: int) -> str:
    """The note on a fold's lines that name no image of the data, with the images
    counted per side (a name listed twice once) and the first few named as listed.

    Examples:
        >>> _absent_note([_FoldEntry("a.png", "test", 1), _FoldEntry("b.png", "train", 2),
        ...               _FoldEntry("c.png", "test", 3)], 1)
        ... # doctest: +NORMALIZE_WHITESPACE
        "1 training image and 2 test images listed in fold 1 are not in the data (missing,
        or left out by the index), e.g. ['a.png', 'b.png', 'c.png']"
    """
    names = list(dict.fromkeys(e.name for e in entries))
    sides = [count(n, f"{what} image") for grp, what in (("train", "training"), ("test", "test"))
             if (n := len({e.name for e in entries if e.grp == grp}))]
    return (f"{' and '.join(sides)} listed in fold {fold} {plural(len(names), 'is', 'are')} "
            f"not in the data (missing, or left out by the index), e.g. {names[:3]}")


def make_splits(
    records: Sequence[ImageRecord],
    targets: np.ndarray,
    protocol: str,
    *,
    n_splits: int = 5,
    seed: int = 0,
    fold_tables: Sequence[str | os.PathLike[str]] = (),
    classes: Sequence[str] | None = None,
    magnification: int | None | str = "records",
) -> list[Split]:
    """Splits of ``records`` under ``protocol``.

    Args:
        records: the task's records.
        targets: their integer classes.
        protocol: ``"image"``, ``"patient"`` or ``"official"``.
        n_splits: folds for the k-fold protocols.
        seed: shuffling seed.
        fold_tables: fold files for ``"official"``.
        classes: the classes' names, for messages (default: their numbers).
        magnification: ``"official"``: the task's magnification (see :func:`official_folds`).

    Raises:
        ValueError: for an unknown protocol, impossible settings, or (``"patient"``) a
            record whose patient is unknown.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, but got {protocol!r}")
    if len(records) != len(targets):
        raise ValueError(f"got {len(records)} records but {len(targets)} targets")
    if protocol == "image":
        return image_kfold(targets, n_splits=n_splits, seed=seed, classes=classes)
    if protocol == "patient":
        require_patients(records, protocol)
        return patient_kfold(targets, patient_groups(records), n_splits=n_splits, seed=seed,
                             classes=classes)
    return official_folds(records, fold_tables, magnification=magnification)


def validation_split(
    train: np.ndarray,
    targets: np.ndarray,
    groups: Sequence[str] | np.ndarray,
    *,
    fraction: float,
    by_patient: bool,
    seed: int = 0,
    classes: Sequence[str] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Hold out part of a training set for the learning-rate schedule.

    With ``by_patient``, whole patients are held out, drawn in an order fixed by
    ``seed``: a patient goes to validation while that brings each of its classes'
    held-out images closer to ``fraction`` of that class, then (for classes too small
    for that) while it brings the whole held-out share closer to ``fraction``. A
    patient whose class has no other patient left in the fit set is never held out, so
    the model is fitted on every class it is tested on; only when no patient can be
    held out otherwise is one taken anyway, with a warning naming the lost classes.
    Earlier versions drew one fold of a ``round(1 / fraction)``-fold stratified group
    split instead (a share of 0.33 for 0.3, 0.5 for 0.4), so runs of those versions
    held out other patients.

    Without ``by_patient``, images are held out stratified by class (at random where a
    class has a single image), and every class of ``train`` keeps an image in the fit
    set: a class held out whole gets one back, in exchange for an image of the largest
    class.

    Args:
        train: training indices.
        targets: integer class of every record.
        groups: patient id of every record.
        fraction: share of the training set to hold out, in ``(0, 1)``.
        by_patient: hold out whole patients (for patient-disjoint protocols).
        seed: seed; the same seed gives the same split.
        classes: the classes' names, for messages (default: their numbers).

    Returns:
        ``(fit, val)`` index arrays.

    Raises:
        ValueError: for a fraction outside ``(0, 1)``, ``by_patient`` with fewer than
            two patients in ``train``, or (without it) a fraction that holds out every
            image (``ceil(fraction * n) >= n``).

    Examples:
        >>> groups = np.repeat([f"p{i}" for i in range(20)], 5)
        >>> targets = np.repeat(np.arange(20) % 2, 5)
        >>> fit, val = validation_split(np.arange(100), targets, groups, fraction=0.3,
        ...                             by_patient=True)
        >>> len(val), sorted(set(targets[fit].tolist()))
        (30, [0, 1])
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"validation fraction must be in (0, 1), but got {fraction}")
    train = np.asarray(train)
    y = np.asarray(targets)[train]
    g = np.asarray(groups)[train]
    zeros = np.zeros(len(train))
    if by_patient:
        fit, val = _hold_out_patients(y, g, fraction, seed, classes)
        check_patient_disjoint(fit, val, g)
    else:
        held = int(np.ceil(fraction * len(train)))  # as scikit-learn counts them
        if held >= len(train):
            raise ValueError(
                f"expected a validation fraction that leaves images to fit on, but {fraction} of "
                f"the {count(len(train), 'training image')} holds out {held}: none is left; "
                "use a smaller fraction (--val-fraction; 0 holds out none)")
        try:
            stratified = StratifiedShuffleSplit(1, test_size=fraction, random_state=seed)
            fit, val = next(stratified.split(zeros, y))
        except ValueError:  # a class too small to stratify
            fit, val = next(ShuffleSplit(1, test_size=fraction, random_state=seed).split(zeros))
        fit, val = _keep_every_class(fit, val, y)
    return np.sort(train[fit]), np.sort(train[val])


def _keep_every_class(fit: np.ndarray, val: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(fit, val)`` positions into ``y`` with every class of the training set in ``fit``:
    an image of each class held out whole goes back to ``fit``, in exchange for an image
    of the class with the most images in ``fit`` where one has two or more, so that the
    held-out share stays as drawn (else it shrinks by that image).

    Examples:
        >>> y = np.array([0, 0, 0, 0, 1])
        >>> [a.tolist() for a in _keep_every_class(np.array([0, 1, 2, 3]), np.array([4]), y)]
        [[0, 1, 2, 4], [3]]
    """
    fit, val = list(fit), list(val)
    for c in np.setdiff1d(y[val], y[fit]):
        back = next(i for i in val if y[i] == c)
        val.remove(back)
        counts = np.bincount(y[fit], minlength=int(y.max()) + 1) if fit else np.zeros(1, dtype=np.int64)
        if counts.max() >= 2:
            out = next(i for i in reversed(fit) if y[i] == counts.argmax())
            fit.remove(out)
            val.append(out)
        fit.append(back)
    return np.asarray(fit, dtype=np.int64), np.asarray(val, dtype=np.int64)


def _hold_out_patients(
    y: np.ndarray, g: np.ndarray, fraction: float, seed: int, names: Sequence[str] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``(fit, val)`` positions into ``y``: whole patients, see :func:`validation_split`."""
    patients, patient_of = np.unique(g, return_inverse=True)
    classes, class_of = np.unique(y, return_inverse=True)
    if len(patients) < 2:
        raise ValueError("a validation split by patient needs at least 2 patients in the "
                         f"training set, but it has {len(patients)}")
    counts = np.zeros((len(patients), len(classes)), dtype=np.int64)
    np.add.at(counts, (patient_of, class_of), 1)
    has = counts > 0
    target = fraction * counts.sum(axis=0)
    held = np.zeros(len(classes))
    left = has.sum(axis=0)  # patients of each class still in the fit set
    val = np.zeros(len(patients), dtype=bool)
    order = np.random.default_rng(seed).permutation(len(patients))

    def hold(p: int) -> None:
        nonlocal held, left
        val[p] = True
        held = held + counts[p]
        left = left - has[p]

    # A patient is held out while that brings the held-out count closer to its target.
    overall = fraction * len(y)
    for p in order:  # per class (stratified), within the overall share
        if (np.all(left[has[p]] > 1) and held.sum() + counts[p].sum() / 2 <= overall
                and np.all(held[has[p]] + counts[p, has[p]] / 2 <= target[has[p]])):
            hold(p)
    for p in order:  # overall: classes too small for the first pass
        if (not val[p] and np.all(left[has[p]] > 1)
                and held.sum() + counts[p].sum() / 2 <= overall):
            hold(p)
    if not val.any():
        keeps = [p for p in order if np.all(left[has[p]] > 1)]
        hold(min(keeps or order.tolist(), key=lambda p: counts[p].sum()))
        lost = classes[left == 0].tolist()
        if lost:
            warnings.warn(
                f"the validation split holds out every training patient of "
                f"{plural(len(lost), 'class', 'classes')} "
                f"{lost if names is None else [names[c] for c in lost]}: no patient could be "
                f"held out otherwise ({len(patients)} patients); the model is not fitted on "
                f"{plural(len(lost), 'that class', 'those classes')}", UserWarning,
                stacklevel=3)
    in_val = val[patient_of]
    return np.flatnonzero(~in_val), np.flatnonzero(in_val)
