"""Put data, task, protocol, training and evaluation together: one fold or a whole CV.

A :class:`DataSpec` names the data (a BreaKHis tree or an image folder), the task and
the protocol. :func:`run_fold` trains one fold and evaluates it on its test images;
:func:`run_cv` does every fold and writes the mean and standard deviation;
:func:`evaluate_checkpoint` re-evaluates a saved run; :func:`checkpoint_records` gives
the images of a saved run's fold (for figures). Every report carries the task, the
protocol, the fold, every training setting (``model``: the :class:`TrainConfig` and
``val_fraction``), whether the data were synthetic and what indexing left out; every
evaluation also writes its per-image predictions (``test_predictions.csv``).

A fold's checkpoint records the relative paths of its training, validation and test
images. Re-evaluation and figures use those lists rather than drawing the fold again,
so a changed data folder cannot move training images into the test set; resuming
(:func:`run_fold`, :func:`run_cv`) is refused when fold, task, protocol, data, file
lists or training settings differ from the checkpoint's; the data folder, and the fold
tables and patients CSV given by path, may move (those two are compared by the SHA-256
of their content, which the checkpoint records). Every test report records
the checkpoint it was made from (:func:`breakhis.train.checkpoint_identity`) and how
many epochs that checkpoint had trained (``epochs_trained``), so that ``cv --resume``
reuses a report only with its own checkpoint and an unfinished run is not reported as
a finished one. A fold that starts afresh in a folder removes what an earlier run left
there (:data:`RUN_OUTPUTS`) once its model is built, saying so in ``train.log``.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import re
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from functools import cached_property
from numbers import Real
from pathlib import Path
from typing import Any

import numpy as np

from ._files import (
    FILE_ONLY,
    LOCK_NAME,
    FolderLock,
    SettingError,
    atomic_writer,
    check_input_files,
    check_int,
    check_seed,
    count,
    plural,
    remove_stale_temporaries,
    writable_problem,
)
from .checkpoint import NotACheckpointError, load_checkpoint, load_run_checkpoint
from .data import (
    DataIndex,
    ImageRecord,
    UnreadableImageError,
    index_breakhis,
    index_image_folder,
    image_digests,
    undecodable_images,
)
from .distributed import DistInfo, all_reduce_sum, init_distributed
from .evaluate import (
    PREDICTIONS_FILE,
    ReportError,
    classification_metrics,
    metrics_line,
    read_report,
    render_markdown,
    split_integrity,
    summarize_folds,
    write_predictions,
    write_report,
)
from .splits import (
    PROTOCOL_DESCRIPTIONS,
    Split,
    check_patient_disjoint,
    find_fold_tables,
    make_splits,
    patient_groups,
    read_fold_table,
    validation_split,
)
from .plots import FIGURE_FILES, FIGURES_DIR
from .synthetic import SYNTHETIC_MARKER, is_synthetic
from .tasks import Task, get_task
from .train import (
    CHECKPOINT_NAME,
    TrainConfig,
    _remove_outputs,
    check_resumable,
    checkpoint_identity,
    checkpoint_normalization,
    epochs_trained,
    fit,
    load_model,
    log_stop,
    predict_probs,
    warn_unfinished,
)

__all__ = [
    "RUN_OUTPUTS",
    "SPLIT_CHOICES",
    "DataSpec",
    "PreparedData",
    "check_resume",
    "checkpoint_records",
    "evaluate_checkpoint",
    "hold_folder",
    "prepare_data",
    "run_cv",
    "run_fold",
]

#: Which images of a saved run's fold :func:`checkpoint_records` returns.
SPLIT_CHOICES: tuple[str, ...] = ("test", "train", "all")
#: Keys of a fold's checkpoint ``extra`` that may differ on resume: the data may move,
#: its file lists (compared) pin the images; ``protocol.n_splits`` follows from the data
#: settings (compared), and checkpoints of the official protocol written before it
#: counted the fold tables hold ``None``; ``protocol.notes`` describe the split (pinned by
#: the file lists) in words that may change between versions (``1 image(s)`` became
#: ``1 image``); ``data_issues`` (what indexing left out and warned about, recorded so
#: that an evaluation of the checkpoint reports them) may change with the files beside
#: the run's. The paths of ``folds_file`` and ``patients_csv`` may differ when their
#: content does not (:func:`_resume_ignore`).
_RESUME_IGNORE: tuple[str, ...] = ("data.data_root", "protocol.n_splits", "protocol.notes",
                                   "data_issues")
#: Data files a :class:`DataSpec` names by path, compared by content on resume, with
#: what one and several of them are called in messages.
_DATA_FILES: tuple[tuple[str, str, str], ...] = (
    ("folds_file", "fold table", "fold tables"), ("patients_csv", "patients CSV", "patients CSVs"))
#: Files a fold's evaluation writes into its run folder, each atomically
#: (:func:`breakhis._files.atomic_writer`; :func:`breakhis.train.fit`'s
#: ``atomic_outputs``, whose temporary files a run killed while writing them leaves).
_EVALUATION_FILES: tuple[str, ...] = ("test_metrics.json", "test_metrics.md", PREDICTIONS_FILE)
#: Files of a run folder that a fold trained afresh there removes once its model is built
#: (paths relative to the folder, :func:`breakhis.train.fit`'s ``stale_outputs``): what
#: training, evaluation and ``figures`` (default folder) write, but ``config.json``
#: (rewritten at the start) and ``train.log`` (appended to).
RUN_OUTPUTS: tuple[str, ...] = (
    CHECKPOINT_NAME, "metrics.csv", *_EVALUATION_FILES,
    *(f"{FIGURES_DIR}/{name}" for name in FIGURE_FILES),
)
_LOG = logging.getLogger("breakhis.experiments")
#: Skipped files shown per reason in logs and reports.
_EXAMPLES = 3


def _absolute(path: str | os.PathLike[str]) -> str:
    return str(Path(path).expanduser().resolve())


@dataclass
class DataSpec:
    """Which data, task and protocol.

    Args:
        data_root: BreaKHis tree, or image folder when ``image_folder``.
        task: ``MSBC``, ``MIBC``, ``MSFC``, ``MIFC`` (BreaKHis); left at ``MIBC`` for an
            image folder, whose class folders are the classes.
        magnification: for ``MSBC``/``MSFC``; ``None`` for an image folder.
        protocol: ``image``, ``patient`` or ``official``.
        n_splits: folds for the k-fold protocols; left at 5 for ``official``, whose fold
            tables give the folds.
        split_seed: seed of the folds and of the validation images (independent of the
            training seed); left at 0 for ``official`` with ``val_fraction`` 0, which draw
            neither.
        val_fraction: share of each training fold held out for the plateau schedule
            (0 uses the training loss).
        image_folder: ``data_root`` is ``root/<class>/<image>``, not BreaKHis.
        patients_csv: patient ids for an image folder (columns ``path``, ``patient``);
            ``None`` for BreaKHis data, whose file names give the patients.
        folds_file: explicit ``Folds.csv``/``dsfold`` path(s) for ``official`` (an
            error with another protocol); found below ``data_root`` when empty.
        verify: decode every image while indexing.
        strict: fail on unreadable images instead of skipping them.

    Paths (``data_root``, ``patients_csv``, ``folds_file``) are made absolute on
    construction, so that a checkpoint finds its data from any working folder.

    A setting that the others make ineffective is refused rather than ignored:
    ``task`` (other than ``MIBC``) and ``magnification`` with ``image_folder``,
    ``patients_csv`` without it, an ``n_splits``
    other than 5 with protocol ``official``, and there with ``val_fraction`` 0 a
    ``split_seed`` other than 0. :meth:`from_dict` reads a spec stored with such a
    setting (before it was refused) with the default instead, which had the same effect.

    Raises:
        ValueError: when ``folds_file`` is given with a protocol other than ``official``;
            a :class:`breakhis._files.SettingError` (naming the setting) when
            ``n_splits`` is not an integer >= 2 (what k-fold cross-validation needs),
            ``val_fraction`` is not a number in ``[0, 1)``, ``split_seed`` is not an
            integer in ``[0, 2**32 - 1]`` (what scikit-learn takes), a setting has no
            effect (above), or (BreaKHis data) ``task`` is unknown or ``magnification``
            missing or not allowed for it (:func:`breakhis.tasks.get_task`): before any
            data are indexed.
    """

    data_root: str
    task: str = "MIBC"
    magnification: int | None = None
    protocol: str = "patient"
    n_splits: int = 5
    split_seed: int = 0
    val_fraction: float = 0.1
    image_folder: bool = False
    patients_csv: str | None = None
    folds_file: tuple[str, ...] = ()
    verify: bool = True
    strict: bool = False

    def __post_init__(self) -> None:
        check_seed(self.split_seed, "split_seed", span="[0, 2**32 - 1]",
                   why="the folds are drawn by scikit-learn, which takes such seeds")
        if not (isinstance(self.val_fraction, Real)
                and math.isfinite(self.val_fraction) and 0 <= self.val_fraction < 1):
            raise SettingError(
                "val_fraction", "must be a number in [0, 1) (the share of each training fold "
                "held out for the plateau schedule; 0 watches the training loss), but got "
                f"{self.val_fraction!r}")
        if self.folds_file and self.protocol != "official":
            raise ValueError(
                f"fold files {list(self.folds_file)} are used by protocol 'official' only, "
                f"but protocol is {self.protocol!r}; add --protocol official or drop "
                "--folds-file")
        # (after: with protocol official, any n_splits but the default is refused as
        # doing nothing, which says more than a range the protocol does not take)
        self._check_effect()
        check_int("n_splits", self.n_splits, 2, why="folds of protocols 'image' and 'patient'")
        if not self.image_folder:  # an image folder's task is its class folders
            get_task(self.task, magnification=self.magnification)
        self.data_root = _absolute(self.data_root)
        if self.patients_csv is not None:
            self.patients_csv = _absolute(self.patients_csv)
        self.folds_file = tuple(_absolute(f) for f in self.folds_file)

    def _check_effect(self) -> None:
        """Refuse a setting that the others make ineffective (see the class)."""
        for name in _without_effect(asdict(self)):
            value = getattr(self, name)
            if value != _DATA_DEFAULTS[name]:
                # "for 3 folds" where the value is a number of folds those protocols take
                folds = f" for {value} folds" if isinstance(value, int) and value >= 2 else ""
                raise SettingError(name, _WITHOUT_EFFECT[name].format(value=value, folds=folds))

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (stored in checkpoints)."""
        out = asdict(self)
        out["folds_file"] = list(self.folds_file)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DataSpec:
        """Inverse of :meth:`to_dict`; other keys (the SHA-256 digests of the data files
        that a checkpoint's data spec records) are ignored. A setting without effect
        (stored before such settings were refused: ``task`` and ``magnification`` of an
        image folder,
        ``patients_csv`` of BreaKHis data, ``n_splits`` and ``split_seed`` of the
        ``official`` protocol where they draw nothing) is read as its default, which had
        the same effect."""
        names = {f.name for f in fields(cls)}
        data = {k: v for k, v in data.items() if k in names}
        data["folds_file"] = tuple(data.get("folds_file") or ())
        data.update({name: _DATA_DEFAULTS[name] for name in _without_effect(data)})
        return cls(**data)


#: :class:`DataSpec`'s defaults, by setting.
_DATA_DEFAULTS: dict[str, Any] = {f.name: f.default for f in fields(DataSpec)}
#: Why a setting that :func:`_without_effect` names must be left at its default, and how
#: to go on (``{value}``: the setting's value).
_WITHOUT_EFFECT: dict[str, str] = {
    "task": f"must be left at its default {_DATA_DEFAULTS['task']!r} with image_folder=True, "
            "whose class folders are the classes, but got {value!r}; leave it out, or set "
            "image_folder=False for BreaKHis data",
    "magnification": "must be None with image_folder=True, which takes every image of its "
                     "class folders (a magnification selects BreaKHis images, for tasks "
                     "MSBC and MSFC), but got {value!r}; leave it out, or set "
                     "image_folder=False for BreaKHis data",
    "patients_csv": "must be None without image_folder=True (BreaKHis file names give the "
                    "patients; the CSV is read for image folders only), but got {value!r}; "
                    "set image_folder=True, or leave it out",
    "n_splits": f"must be left at its default {_DATA_DEFAULTS['n_splits']} with protocol "
                "'official', whose folds are its fold tables' (one per table), but got "
                "{value!r}; leave it out, or use protocol 'patient' or 'image'{folds}",
    "split_seed": f"must be left at its default {_DATA_DEFAULTS['split_seed']} with protocol "
                  "'official' and val_fraction 0, which draw nothing (the fold tables give "
                  "the folds and no validation images are held out), but got {value!r}; "
                  "leave it out, or hold out validation images (val_fraction > 0)",
}


def _without_effect(data: Mapping[str, Any]) -> list[str]:
    """The settings of a data spec (:meth:`DataSpec.to_dict`, settings left out read as
    the defaults) that the others make ineffective: ``task`` (other than the default) and
    ``magnification`` of an image folder (its classes are its class folders), ``patients_csv`` of BreaKHis data (the
    file names give the patients), ``n_splits`` of the ``official`` protocol (its fold
    tables give the folds) and, there with ``val_fraction`` 0, ``split_seed`` (nothing is
    drawn).

    Examples:
        >>> _without_effect({"protocol": "official", "val_fraction": 0})
        ['patients_csv', 'n_splits', 'split_seed']
        >>> _without_effect({"image_folder": True})
        ['task', 'magnification']
    """
    spec = {**_DATA_DEFAULTS, **data}
    out = ["task", "magnification"] if spec["image_folder"] else ["patients_csv"]
    if spec["protocol"] == "official":
        out.append("n_splits")
        if spec["val_fraction"] == 0:
            out.append("split_seed")
    return out


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _data_dict(spec: DataSpec) -> dict[str, Any]:
    """The spec as a fold's checkpoint records it: :meth:`DataSpec.to_dict` plus the
    SHA-256 of each fold table (``folds_file_sha256``) and of the patients CSV
    (``patients_csv_sha256``) given, so that a resumed run compares their content, not
    their paths (:func:`_resume_ignore`)."""
    out = spec.to_dict()
    if spec.folds_file:
        out["folds_file_sha256"] = [_sha256(f) for f in spec.folds_file]
    if spec.patients_csv is not None:
        out["patients_csv_sha256"] = _sha256(spec.patients_csv)
    return out


def _paths(value: Any) -> list[str]:
    if not value:
        return []
    return [str(value)] if isinstance(value, (str, os.PathLike)) else [str(v) for v in value]


def _resume_ignore(state: dict[str, Any], extra: dict[str, Any]) -> tuple[tuple[str, ...],
                                                                        list[str]]:
    """The ``extra`` keys a run may change when it continues the checkpoint ``state``,
    and lines (for the log) on the data files whose path changed.

    The fold tables (``folds_file``) and the patients CSV move with the data: their
    paths may change when their content (SHA-256, recorded at training time) has not.
    A checkpoint written before the digests were recorded cannot tell their content: a
    file of the same name is taken for it, with a line saying so. Another content, or
    (old checkpoints) another name, stays a difference. A data setting that the
    checkpoint's other settings made ineffective (:func:`_without_effect`: recorded
    before such settings were refused) is not compared.
    """
    old = (state.get("extra") or {}).get("data") or {}
    new = extra.get("data") or {}
    ignore, notes = list(_RESUME_IGNORE), []
    # settings the checkpoint recorded without effect (before they were refused): the
    # settings that made them so are compared, so that the run is the same
    unused = _without_effect(old) if old else []
    ignore += [f"data.{name}" for name in unused]
    if "patients_csv" in unused:
        ignore.append("data.patients_csv_sha256")
    if "split_seed" in unused:
        ignore.append("protocol.split_seed")  # the split records it too
    old_images, new_images = (state.get("extra") or {}).get("files_sha256"), extra.get("files_sha256")
    if old_images is None or new_images is None:
        # recorded before the images' contents were, or indexed without reading files
        # whole (--no-verify, which data.verify pins for both): the file lists alone
        ignore.append("files_sha256")
    for name, one, several in _DATA_FILES:
        digest = f"{name}_sha256"
        if name in unused:
            continue
        old_paths, new_paths = _paths(old.get(name)), _paths(new.get(name))
        n = len(new_paths)
        what = plural(n, one, several)
        if digest not in old:
            ignore.append(f"data.{digest}")  # not recorded: compared by path and name
        if old_paths == new_paths:
            continue
        if digest in old:
            if old[digest] == new.get(digest):
                ignore.append(f"data.{name}")
                notes.append(f"data: the {what} moved: {new_paths} "
                             f"{plural(n, 'holds', 'hold')} the content of the checkpoint's "
                             f"{old_paths} (same SHA-256)")
        elif old_paths and [Path(p).name for p in old_paths] == [Path(p).name
                                                                 for p in new_paths]:
            ignore.append(f"data.{name}")
            notes.append(f"data: the checkpoint records the {plural(n, 'path', 'paths')} of "
                         f"its {what}, not {plural(n, 'its', 'their')} content (written by an "
                         f"older breakhis): {new_paths} {plural(n, 'is', 'are')} taken for "
                         f"{old_paths} because the file {plural(n, 'name is', 'names are')} the "
                         "same")
    return tuple(ignore), notes


@dataclass
class PreparedData:
    """Indexed data, the task's records and targets, groups and splits.

    ``groups`` (from :func:`~breakhis.splits.patient_groups`) is each record's patient,
    or its own path when the patient is unknown. ``warnings`` holds the index's warnings
    and the task's (e.g. a class without images).
    """

    index: DataIndex
    task: Task
    records: list[ImageRecord]
    targets: np.ndarray
    groups: np.ndarray
    splits: list[Split]
    warnings: list[str] = field(default_factory=list)

    @cached_property
    def synthetic(self) -> bool:
        """Whether the data are synthetic (see :func:`breakhis.synthetic.is_synthetic`).

        A ``SYNTHETIC.txt`` marker anywhere in the indexed tree, in its root or beside
        the ``BreaKHis_v1`` folder that holds the root, or the synthetic PNG text chunk
        in the images, says so.
        """
        if any(Path(m).name.lower() == SYNTHETIC_MARKER.lower()
               for m in self.index.metadata_files):
            return True
        return is_synthetic(self.index.root, [r.path for r in self.records])

    def relative_path(self, index: int) -> str:
        """Path of record ``index`` relative to the indexed root (POSIX separators)."""
        return self.records[index].path.relative_to(self.index.root).as_posix()

    def issues(self) -> dict[str, Any]:
        """What indexing left out and warned about, as JSON-ready data.

        Returns:
            ``skipped`` (count), ``skipped_by_reason`` (count per reason),
            ``skipped_examples`` (a few paths per reason) and ``warnings``.
        """
        by_reason: dict[str, list[str]] = defaultdict(list)
        for item in self.index.skipped:
            by_reason[item.reason.split(":", 1)[0]].append(item.path)
        return {
            "skipped": len(self.index.skipped),
            "skipped_by_reason": {k: len(v) for k, v in by_reason.items()},
            "skipped_examples": {k: v[:_EXAMPLES] for k, v in by_reason.items()},
            "warnings": list(self.warnings),
        }


def _issue_lines(issues: dict[str, Any], root: Path) -> list[str]:
    """The issues in words, one line each (for the console and ``train.log``)."""
    lines = []
    if issues["skipped"]:
        lines.append(f"data: {count(issues['skipped'], 'file')} under {str(root)!r} left out")
        for reason, n in issues["skipped_by_reason"].items():
            lines.append(f"data:   {reason}: {n}, e.g. "
                         f"{', '.join(issues['skipped_examples'][reason])}")
    lines += [f"data warning: {w}" for w in issues["warnings"]]
    return lines


def prepare_data(spec: DataSpec, *, progress: bool = False) -> PreparedData:
    """Index the data, select the task's records and draw the splits.

    Raises:
        ValueError: when the task selects no images or images of fewer than two of its
            classes, when protocol ``patient`` is asked of an image folder without
            ``patients_csv`` or of images whose patient the CSV leaves unknown (no row,
            or a blank cell), or settings are inconsistent; a
            :class:`breakhis._files.SettingError` (setting ``folds_file``), before
            indexing, when a fold table given does not exist or is a folder.
    """
    # a fold table that is not there, or not in the format, before indexing (minutes on the real data)
    check_input_files("folds_file", spec.folds_file, "fold tables (Folds.csv or dsfold1..5.txt)")
    for table in spec.folds_file:
        _read_given_table(table)
    if spec.image_folder and spec.protocol == "patient" and spec.patients_csv is None:
        raise ValueError(
            "protocol 'patient' needs the patient of every image, but an image folder has "
            "none without a patients CSV; pass --patients-csv (columns path, patient), or "
            "--protocol image for image-level folds (optimistic if a patient has several "
            "images)")
    index, task, records, targets, task_warnings = _index_task(spec, progress=progress)
    groups = patient_groups(records)
    tables: list[str | Path] = list(spec.folds_file)
    if spec.protocol == "official" and not tables:
        tables = list(find_fold_tables(index))
        if not tables:
            raise ValueError(
                "protocol 'official' needs the fold tables (Folds.csv or dsfold1..5.txt), "
                f"but none lie in {str(index.root)!r} or up to 3 folder levels below it "
                "(folders above the data root are not searched); pass their path with "
                "--folds-file, or point --data-root at the folder that holds them")
    splits = make_splits(records, targets, spec.protocol, n_splits=spec.n_splits,
                         seed=spec.split_seed, fold_tables=tables, classes=task.classes,
                         magnification=task.magnification)
    return PreparedData(index, task, records, targets, groups, splits,
                        warnings=[*index.warnings, *task_warnings])


def _read_given_table(path: str) -> None:
    """Read the fold table ``path`` (:func:`breakhis.splits.read_fold_table`) for its
    errors alone, before the data are indexed; a file that is not UTF-8 text (a
    spreadsheet's ``.xlsx`` under the name) is refused naming it.

    Raises:
        ValueError: naming the file (and the line, for a line not in the format).
        OSError: when it cannot be read.
    """
    try:
        read_fold_table(path)
    except UnicodeDecodeError as err:
        raise ValueError(
            f"expected a fold table as UTF-8 text (Folds.csv or dsfold1..5.txt), but {path!r} is "
            f"not UTF-8 ({err.reason} at byte {err.start}): save it as UTF-8 text") from err


def _index_task(
    spec: DataSpec, *, progress: bool, classes: list[str] | None = None,
) -> tuple[DataIndex, Task, list[ImageRecord], np.ndarray, list[str]]:
    """The data indexed, the task, its records and targets, and the task's warnings.

    ``classes`` (image folders only): the class folders a saved run was trained on;
    images of other folders are left out (see :func:`_checkpoint_data`).
    """
    if spec.image_folder:
        index = index_image_folder(spec.data_root, patients_csv=spec.patients_csv,
                                   verify=spec.verify, strict=spec.strict, progress=progress)
        if classes is None:
            classes = sorted({r.label for r in index.records})
        task = get_task("folder", classes=classes)
    else:
        index = index_breakhis(spec.data_root, verify=spec.verify, strict=spec.strict,
                               progress=progress)
        task = get_task(spec.task, magnification=spec.magnification)
    records = [r for r in task.select(index.records)
               if not spec.image_folder or r.label in task.classes]
    if not records:
        raise ValueError(f"task {task.name} selects no images under {spec.data_root!r}"
                         f"{_what_there_is(index, task)}")
    targets = task.targets(records)
    found = [c for i, c in enumerate(task.classes) if np.any(targets == i)]
    if len(found) < 2:
        needs = ("at least two class folders with images" if spec.image_folder else
                 f"images of at least two of its classes {list(task.classes)}")
        raise ValueError(f"task {task.name} needs {needs}, but found only {found} under "
                         f"{spec.data_root!r}")
    task_warnings = []
    if len(found) < task.num_classes:
        absent = [c for c in task.classes if c not in found]
        task_warnings.append(f"task {task.name}: no images of "
                             f"{plural(len(absent), 'class', 'classes')} {absent}; the model "
                             f"still has an output for {plural(len(absent), 'it', 'them')}, "
                             "which is never trained")
    return index, task, records, targets, task_warnings


def _what_there_is(index: DataIndex, task: Task) -> str:
    """What the data hold when ``task`` selects none of it, for the error: no image at
    all, or the magnifications there are when the task wants another.

    Examples:
        >>> from breakhis.tasks import get_task
        >>> records = [ImageRecord(Path(f"{m}.png"), "benign", magnification=m) for m in (40, 100)]
        >>> _what_there_is(DataIndex(Path("d"), records), get_task("MSBC", magnification=400))
        ': it holds 2 images, at 40X and 100X only, none at 400X'
        >>> _what_there_is(DataIndex(Path("d"), []), get_task("MIBC"))
        ': no image was indexed there (breakhis-repro index lists what was skipped, and why)'
    """
    if not index.records:
        return ": no image was indexed there (breakhis-repro index lists what was skipped, and why)"
    wanted = getattr(task, "magnification", None)
    found = sorted({r.magnification for r in index.records if r.magnification is not None})
    if wanted is None or not found:
        return f": it holds {count(len(index.records), 'image')}, none that the task takes"
    shown = " and ".join([", ".join(f"{m}X" for m in found[:-1]), f"{found[-1]}X"] if len(found) > 1
                         else [f"{found[0]}X"])
    return f": it holds {count(len(index.records), 'image')}, at {shown} only, none at {wanted}X"


def _protocol_dict(spec: DataSpec, split: Split, data: PreparedData) -> dict[str, Any]:
    """The split's description, with the split seed and the number of folds of the
    protocol (``official``: the number of fold tables)."""
    out = split.to_dict()
    out["split_seed"] = spec.split_seed
    out["n_splits"] = len(data.splits)
    return out


@dataclass
class _FoldPlan:
    """One fold's fit/validation/test indices and what its checkpoint records."""

    split: Split
    fit: np.ndarray
    val: np.ndarray
    extra: dict[str, Any]


def _split_of(data: PreparedData, fold: int) -> Split:
    """The split numbered ``fold`` (official: the fold table's own number)."""
    for split in data.splits:
        if split.fold == fold:
            return split
    numbers = [s.fold for s in data.splits]
    where = " (the fold tables' own numbers)" if data.splits[0].protocol == "official" else ""
    raise SettingError("fold", f"must be one of {numbers}{where}, but got {fold}")


def _plan_fold(spec: DataSpec, data: PreparedData, fold: int) -> _FoldPlan:
    split = _split_of(data, fold)
    fit_idx, val_idx = split.train, np.zeros(0, dtype=np.int64)
    if spec.val_fraction > 0:
        fit_idx, val_idx = validation_split(
            split.train, data.targets, data.groups, fraction=spec.val_fraction,
            # within scikit-learn's seeds for any fold number
            by_patient=split.protocol != "image", seed=(spec.split_seed + fold) % 2**32,
            classes=data.task.classes)
    if split.patient_disjoint:
        check_patient_disjoint(fit_idx, split.test, data.groups)
    files = {name: [data.relative_path(i) for i in idx]
             for name, idx in (("train", fit_idx), ("val", val_idx), ("test", split.test))}
    extra = {"data": _data_dict(spec), "fold": fold, "task": data.task.to_dict(),
             "protocol": _protocol_dict(spec, split, data), "synthetic": data.synthetic,
             "files": files, "files_sha256": _files_digests(files, data.index.digests),
             "data_issues": data.issues()}
    return _FoldPlan(split, fit_idx, val_idx, extra)


def _files_digests(
    files: Mapping[str, Sequence[str]], digests: Mapping[str, str] | None,
) -> dict[str, str] | None:
    """One SHA-256 per split over its images' contents (each file's SHA-256 from
    indexing, with its relative path, in sorted order): the file lists pin the names,
    these the pixels, so that a resumed run refuses a data folder whose files of the
    same names hold other images. ``None`` when indexing read no file whole
    (``verify=False``), or a file has no digest.

    Examples:
        >>> _files_digests({"train": ["a.png"], "test": []}, {"a.png": "00"})["test"][:12]
        'e3b0c44298fc'
        >>> _files_digests({"train": ["a.png"]}, None) is None
        True
    """
    if digests is None or any(rel not in digests for rels in files.values() for rel in rels):
        return None
    out = {}
    for name, rels in files.items():
        h = hashlib.sha256()
        for rel in sorted(rels):
            h.update(f"{rel}\t{digests[rel]}\n".encode("utf-8", "surrogateescape"))
        out[name] = h.hexdigest()
    return out


def _class_counts(classes: tuple[str, ...], targets: np.ndarray) -> dict[str, int]:
    """The images of every class among ``targets``, in the order of ``classes``."""
    counts = np.bincount(np.asarray(targets, dtype=np.int64), minlength=len(classes))
    return {c: int(n) for c, n in zip(classes, counts)}


def _protocol_warnings(fold: int, protocol: Mapping[str, Any]) -> list[str]:
    """Warnings on a fold's split, from its protocol description
    (:meth:`breakhis.splits.Split.to_dict`): one per note (images a fold table left out,
    patients in train and test, images of unknown patient), and one saying that its test
    metrics are not patient-disjoint when the protocol is meant to be (``patient``,
    ``official``) but the split records it is not. The ``image`` protocol is not
    patient-disjoint by design, as its description says: no warning for that.

    Examples:
        >>> _protocol_warnings(2, {"protocol": "official", "patient_disjoint": False,
        ...                        "notes": ["1 patient in train and test, e.g. ['p1']"]})[0]
        "fold 2 (official protocol): 1 patient in train and test, e.g. ['p1']"
        >>> _protocol_warnings(0, {"protocol": "image", "patient_disjoint": False, "notes": []})
        []
    """
    if not isinstance(protocol, Mapping):
        return []
    name = protocol.get("protocol", "?")
    lines = [f"fold {fold} ({name} protocol): {note}" for note in protocol.get("notes") or []]
    if protocol.get("patient_disjoint") is False and name != "image":
        lines.append(
            f"fold {fold} ({name} protocol): its test metrics are NOT patient-disjoint (test "
            "images may be of patients the model was trained on: optimistic, not comparable "
            "with patient-disjoint results); the reports record patient_disjoint: false")
    return lines


def _split_lines(data: PreparedData, plan: _FoldPlan, fold: int) -> list[tuple[int, str]]:
    """What a fold trains, validates and tests on, for the log (:func:`breakhis.train.fit`'s
    ``log_messages``): one INFO line with each split's size and images per class, a
    warning for each note of the split and one when it is not patient-disjoint
    (:func:`_protocol_warnings`: an ``official`` fold table that leaves images out or puts
    a patient in train and test), and a warning for each split that lacks a class
    another one has (validation or test images without a class of the training images,
    training images without one of the test's).
    """
    classes = data.task.classes
    splits = {"training": plan.fit, "validation": plan.val, "test": plan.split.test}
    counts = {name: _class_counts(classes, data.targets[idx]) for name, idx in splits.items()}
    sizes = "; ".join(
        f"{name} {count(len(idx), 'image')} "
        f"({', '.join(f'{c} {n}' for c, n in counts[name].items())})"
        if len(idx) else f"{name} none" + (" (the training loss drives the learning-rate "
                                           "schedule)" if name == "validation" else "")
        for name, idx in splits.items())
    lines = [(logging.INFO, f"fold {fold} ({plan.split.protocol} protocol): {sizes}")]
    lines += [(logging.WARNING, text)
              for text in _protocol_warnings(fold, plan.extra["protocol"])]
    present = {name: {c for c, n in by_class.items() if n} for name, by_class in counts.items()}
    consequences = {  # {them}: the classes lacking
        "validation": "the validation loss and accuracy, which drive the learning-rate "
                      "schedule, say nothing of {them} (a larger val_fraction, --val-fraction, "
                      "holds out more {held}; 0 uses the training loss)",
        "test": "the test metrics say nothing of {them}",
    }
    for name, consequence in consequences.items():
        lacking = [c for c in classes if c in present["training"] and c not in present[name]]
        consequence = consequence.format(
            them=plural(len(lacking), "it", "them"),
            held="images" if plan.split.protocol == "image" else "patients")
        if len(splits[name]) and lacking:
            lines.append((logging.WARNING, (
                f"fold {fold}: no {name} image (of {len(splits[name])}) is of "
                f"{plural(len(lacking), 'class', 'classes')} {lacking}, which the training "
                f"images include: {consequence}")))
    untrained = [c for c in classes if c in present["test"] and c not in present["training"]]
    if untrained:
        lines.append((logging.WARNING, (
            f"fold {fold}: no training image is of "
            f"{plural(len(untrained), 'class', 'classes')} {untrained}, which the test images "
            f"include: the model is never trained on {plural(len(untrained), 'it', 'them')}")))
    return lines


def check_resume(
    spec: DataSpec,
    config: TrainConfig,
    run_dir: str | os.PathLike[str],
    *,
    fold: int | None = None,
    reuse: bool = False,
) -> None:
    """Refuse, before the data are indexed, to continue the checkpoint in ``run_dir`` with
    settings it was not made with, as far as they can be told without the data.

    :func:`run_fold` compares every setting once the data are indexed (minutes on the
    real data) and the model is built; this compares what needs no data, as it does
    (:func:`breakhis.train.resume_differences`): the training settings (``epochs`` may
    grow, not shrink below what was trained), the data spec (the data folder may move,
    fold tables and patients CSV by content), the fold (unless ``None``) and, for
    BreaKHis data, the task and its classes. File lists and the drawn split are compared
    after indexing, as before. Nothing is checked without a ``checkpoint.pt`` in
    ``run_dir``, or when a fold table or patients CSV cannot be read (indexing says why).

    Args:
        spec, config: the settings of the run that wants to continue.
        run_dir: its run folder (a fold's folder, for :func:`run_cv`).
        fold: its fold, or ``None`` when not known yet (not compared).
        reuse: word the refusal as :func:`run_cv` does for a fold folder that holds a
            test report (``cannot reuse fold``), and refuse such a folder without a
            checkpoint (its settings cannot be checked).

    Raises:
        ValueError: listing the differences, with the message :func:`breakhis.train.fit`
            (:func:`run_cv`, with ``reuse``) gives; or when the file is no breakhis
            checkpoint.
    """
    run_dir = Path(run_dir)
    ckpt = run_dir / CHECKPOINT_NAME
    reused = reuse and (run_dir / "test_metrics.json").is_file()
    if not (reused or ckpt.is_file()):
        return
    state = _fold_checkpoint(fold, run_dir)  # a reused fold's may be missing: refused
    try:
        known: dict[str, Any] = {"data": _data_dict(spec)}
    except OSError:
        return
    if fold is not None:
        known["fold"] = fold
    classes = list(state.get("classes") or [])
    if not spec.image_folder:  # an image folder's classes come from its folders
        task = get_task(spec.task, magnification=spec.magnification)
        known["task"], classes = task.to_dict(), list(task.classes)
    # what needs the data is taken from the checkpoint: never a difference here
    extra = {**(state.get("extra") or {}), **known}
    ignore, _ = _resume_ignore(state, extra)
    check_resumable(state, ckpt, config, classes, extra, ignore=ignore,
                    refusal=_other_fold(fold, run_dir) if reused else None)


def _fold_checkpoint(fold: int | None, fold_dir: Path) -> dict[str, Any]:
    """The checkpoint in ``fold_dir``, mapped (its settings, extra, history and epoch are
    read, not its tensors).

    Raises:
        ValueError: when there is none, as :func:`run_cv` refuses to reuse a fold whose
            report has no checkpoint beside it (the settings that made it cannot be
            checked).
    """
    ckpt = fold_dir / CHECKPOINT_NAME
    if not ckpt.is_file():
        raise ValueError(
            f"cannot resume fold {fold}: {str(fold_dir / 'test_metrics.json')!r} exists but "
            f"{str(ckpt)!r} does not, so the settings that made it cannot be checked; "
            f"remove {str(fold_dir)!r} to train the fold again")
    return load_run_checkpoint(ckpt, mmap=True)


def _other_fold(fold: int | None, fold_dir: Path) -> Callable[[list[str]], str]:
    """Why :func:`run_cv` cannot reuse a fold made with other settings (the ``refusal`` of
    :func:`breakhis.train.check_resumable`)."""
    def refusal(differences: list[str]) -> str:
        return (f"cannot reuse fold {fold} in {str(fold_dir)!r}: it was made with other "
                f"settings ({'; '.join(differences)}). Use another output folder, or the "
                "run's settings")
    return refusal


def run_fold(
    spec: DataSpec,
    config: TrainConfig,
    fold: int,
    run_dir: str | os.PathLike[str],
    *,
    resume: bool = False,
    data: PreparedData | None = None,
    dist_info: DistInfo | None = None,
    progress: bool = True,
    data_lines_on_console: bool = True,
) -> dict[str, Any] | None:
    """Train fold ``fold`` and evaluate it on its test images.

    ``fold`` counts from 0 under the k-fold protocols; under ``official`` it is the
    fold table's own number (``dsfold3.txt`` is fold 3).

    Writes ``checkpoint.pt`` (with the relative paths of the fold's training,
    validation and test images), ``train.log``, ``metrics.csv``, ``config.json``,
    ``test_metrics.json``/``.md`` and ``test_predictions.csv`` (one row per test image:
    path, patient, magnification, true class, predicted class, class probabilities)
    to ``run_dir``. Files that indexing left out, and its warnings, are logged (console
    and ``train.log``; ``train.log`` only, marked :data:`breakhis._files.FILE_ONLY`, with
    ``data_lines_on_console=False``, as :func:`run_cv` logs them for every fold after the
    first it trains) and recorded under ``data_issues`` in ``test_metrics.json``.

    A fold that does not continue a checkpoint (no ``resume``, or no checkpoint yet)
    removes what an earlier run left in ``run_dir`` (:data:`RUN_OUTPUTS`: its
    checkpoint, metrics, test report, predictions and figures) once its model is built
    and has passed a trial forward pass, before the first checkpoint, and says which
    files in ``train.log``: a report of another run is never left beside the new
    checkpoint, and a run that fails to start (weights missing, an input size the
    backbone cannot take) leaves the earlier run's files in place. ``run_dir`` is
    created and a file written into it (and removed) before training. With ``resume``,
    a fold table or patients CSV whose path changed (the data moved) continues when its
    content is the checkpoint's, said in ``train.log``; without ``data``, settings that
    differ from the checkpoint's are refused before the data are indexed
    (:func:`check_resume`).

    Before training, the sizes of the fold's training, validation and test images, per
    class, are logged (console and ``train.log``), with a warning for a class of the
    training images that the validation or test images lack (their loss, accuracy or
    metrics say nothing of it), or one of the test images that training lacks; and a
    warning for each note of the split (an ``official`` fold table that leaves images
    out, puts a patient in train and test, or holds images of unknown patient) and one
    when its test metrics are not patient-disjoint (the test report records
    ``protocol.patient_disjoint`` and the notes, and its Markdown says so).

    Returns:
        The test report (main process), or ``None`` on other DDP processes.

    Raises:
        ValueError: for a fold number outside the protocol's folds, a ``run_dir`` that
            cannot be created or written, or (``resume``) a checkpoint in ``run_dir``
            made for another fold, task, protocol, data or settings (the message lists
            the differences).
        breakhis.train.TrainingDivergedError: when a loss or the weights stop being
            finite (:func:`breakhis.train.fit`); nothing is evaluated.
    """
    info = dist_info or init_distributed(config.device)
    if resume and data is None:
        check_resume(spec, config, run_dir, fold=fold)  # before indexing: minutes
    data = data or prepare_data(spec, progress=progress and info.is_main)
    plan = _plan_fold(spec, data, fold)
    if info.is_main:
        problem = writable_problem(run_dir, "a run folder")
        if problem:
            raise ValueError(problem)
    ignore, notes = _RESUME_IGNORE, []
    ckpt = Path(run_dir) / CHECKPOINT_NAME
    if resume and ckpt.is_file():
        # mapped, not read: fit loads it again (and refuses what is no checkpoint)
        ignore, notes = _resume_ignore(load_run_checkpoint(ckpt, mmap=True), plan.extra)
    result = fit(
        config,
        train_records=[data.records[i] for i in plan.fit], train_targets=data.targets[plan.fit],
        val_records=[data.records[i] for i in plan.val], val_targets=data.targets[plan.val],
        classes=list(data.task.classes), run_dir=run_dir, resume=resume, extra=plan.extra,
        resume_ignore=ignore, stale_outputs=RUN_OUTPUTS, atomic_outputs=_EVALUATION_FILES,
        log_messages=[*((logging.WARNING, line, *(() if data_lines_on_console else (FILE_ONLY,)))
                        for line in _issue_lines(data.issues(), data.index.root)), *notes,
                      *_split_lines(data, plan, fold)], dist_info=info, progress=progress,
    )
    if not info.is_main:
        return None
    # the main process's fit result always records the checkpoint it wrote last
    try:
        return _evaluate_split(result.model, config, data, plan.split.test, plan.extra["protocol"],
                               fold, Path(run_dir), info, issues=plan.extra["data_issues"],
                               val_fraction=spec.val_fraction,
                               normalization=result.normalization,
                               checkpoint=result.checkpoint_info, progress=progress)
    except (KeyboardInterrupt, Exception) as exc:
        log_stop(run_dir, exc, "evaluating the test images")
        raise


def _evaluate_split(
    model: Any, config: TrainConfig, data: PreparedData, test: np.ndarray,
    protocol: dict[str, Any], fold: int, out_dir: Path, info: DistInfo, *,
    issues: dict[str, Any], val_fraction: float, normalization: tuple[tuple[float, ...], tuple[float, ...]],
    checkpoint: dict[str, Any], progress: bool,
) -> dict[str, Any]:
    test_records = [data.records[i] for i in test]
    mean, std = normalization
    probs = predict_probs(model, test_records, input_size=config.input_size,
                          batch_size=max(config.batch_size, 32), device=info.device,
                          progress=progress, mean=mean, std=std)
    metrics = classification_metrics(data.targets[test], probs, data.task.classes,
                                     patients=[r.patient for r in test_records])
    report = {
        "title": f"BreaKHis {data.task.name} fold {fold} ({protocol['protocol']} protocol)",
        "task": data.task.to_dict(),
        "protocol": protocol,
        "fold": fold,
        "data_root": str(data.index.root),
        "synthetic": data.synthetic,
        # every training setting, so that runs differing in any of them can be told
        # apart (breakhis.plots.results_table shows those that differ)
        "model": {**config.to_dict(), "val_fraction": val_fraction},
        # of the checkpoint evaluated: fewer than model.epochs when its run was cut short
        "epochs_trained": epochs_trained(checkpoint),
        "checkpoint": checkpoint,
        "normalization": {"mean": list(mean), "std": list(std)},
        "data_issues": issues,
        "metrics": metrics,
    }
    # predictions first, the report last: a run cut short between them (Ctrl-C, a full
    # disk) leaves no report, so --resume evaluates again instead of reusing a report
    # beside missing or older predictions (_reusable_fold reads only the report)
    write_predictions(out_dir / PREDICTIONS_FILE, test_records, data.targets[test], probs,
                      data.task.classes)
    write_report(report, out_dir, "test_metrics")
    return report


def _reusable_fold(
    spec: DataSpec, config: TrainConfig, data: PreparedData, fold: int, fold_dir: Path,
    *, main: bool = True,
) -> dict[str, Any] | None:
    """The report of a finished fold that these settings would reproduce, else ``None``.

    ``None`` also when the fold's checkpoint matches but trained fewer epochs (it is
    then resumed), and when ``test_metrics.json`` was not made from that checkpoint
    (another run's, or one written before reports recorded their checkpoint) or cannot
    be read as a report (cut short, not a JSON object, without the entries the summary
    needs), or its ``test_predictions.csv`` is missing: the checkpoint is then evaluated
    again, with a warning naming the file.
    ``main``: whether this process logs; a reused report's split notes, and whether it
    is not patient-disjoint, are logged as :func:`run_fold` logs them before training.

    Raises:
        ValueError: when the fold was made with other settings, or its settings cannot
            be checked (no checkpoint, or not a breakhis one).
    """
    done = fold_dir / "test_metrics.json"
    ckpt = fold_dir / CHECKPOINT_NAME
    state = _fold_checkpoint(fold, fold_dir)
    plan = _plan_fold(spec, data, fold)
    ignore, notes = _resume_ignore(state, plan.extra)
    check_resumable(state, ckpt, config, list(data.task.classes), plan.extra, ignore=ignore,
                    refusal=_other_fold(fold, fold_dir))
    if epochs_trained(state) < config.epochs:
        return None
    report, problem = _read_fold_report(done)
    if report is None:
        if main:
            _LOG.warning("fold %d: %s cannot be read as a report (%s); evaluating the "
                         "checkpoint again", fold, done, problem)
        return None
    made_from, identity = report.get("checkpoint"), checkpoint_identity(state)
    if made_from != identity:
        if main:
            _LOG.warning(
                "fold %d: %s was not made from %s (it records %s, the checkpoint is epoch %d, "
                "fingerprint %s); evaluating the checkpoint again", fold, done, ckpt,
                f"epoch {made_from.get('epoch')}, fingerprint {made_from.get('fingerprint')}"
                if isinstance(made_from, dict) else "no checkpoint",
                identity["epoch"], identity["fingerprint"][:12])
        return None
    if not (fold_dir / PREDICTIONS_FILE).is_file():  # the per-image rows behind the report
        if main:
            _LOG.warning("fold %d: %s is missing (the per-image predictions %s was made from); "
                         "evaluating the checkpoint again", fold, fold_dir / PREDICTIONS_FILE, done)
        return None
    if main:
        _restore_markdown(done, report)
        # else run_fold logs them, as it resumes the checkpoint
        for note in notes:
            _LOG.warning("fold %d: %s", fold, note)
        # what run_fold logs before training, for the fold reused as it was trained
        for text in _protocol_warnings(fold, report["protocol"]):
            _LOG.warning("%s", text)
    return report


def _restore_markdown(done: Path, report: dict[str, Any]) -> None:
    """Rewrite a reused fold's ``test_metrics.md`` from its JSON when it is missing or says
    otherwise (a run killed between the two writes of an older :func:`write_report`, which
    wrote the JSON first)."""
    md = done.with_suffix(".md")
    text = render_markdown(report)
    try:
        if md.read_text(encoding="utf-8") == text:
            return
    except (OSError, UnicodeDecodeError):
        pass
    _LOG.warning("%s was missing or did not match %s; rewritten from it", md, done.name)
    with atomic_writer(md, "w") as handle:
        handle.write(text)


#: Entries of a fold's report that :func:`run_cv`'s summary reads.
_REPORT_KEYS: tuple[str, ...] = ("task", "protocol", "fold", "data_root", "synthetic", "model",
                                 "metrics")


def _read_fold_report(path: Path) -> tuple[dict[str, Any] | None, str]:
    """A fold's ``test_metrics.json`` (:func:`breakhis.evaluate.read_report`), or ``None``
    with what is wrong with it (for the warning of :func:`_reusable_fold`)."""
    try:
        report = read_report(path, _REPORT_KEYS)
    except OSError as err:
        return None, str(err.strerror or err)
    except ReportError as err:
        return None, err.reason
    if not isinstance(report["metrics"], dict):
        return None, (f"expected the entries {list(_REPORT_KEYS)}, but it lacks "
                      "['metrics (as an object)']")
    return report, ""


def run_cv(
    spec: DataSpec,
    config: TrainConfig,
    run_dir: str | os.PathLike[str],
    *,
    folds: list[int] | None = None,
    resume: bool = False,
    dist_info: DistInfo | None = None,
    progress: bool = True,
) -> dict[str, Any] | None:
    """Train and evaluate every fold (in ``run_dir/fold<k>``), then summarise.

    ``k`` and ``folds`` are fold numbers as in :func:`run_fold` (official: the fold
    tables' own numbers).

    With ``resume``, a fold that already has ``test_metrics.json`` is reused when its
    checkpoint was made with the same data, task, protocol and settings and the report
    was made from that checkpoint (else the checkpoint is evaluated again, as when the
    report cannot be read: cut short or not a JSON object, with a warning naming it),
    and continued when only ``epochs`` grew; a fold with only a checkpoint continues from
    it. A fold made with other settings is an error that lists the differences, never
    mixed into the summary. Writes ``cv_metrics.json``/``.md`` in ``run_dir``; each
    ``fold<k>`` folder holds what :func:`run_fold` writes (a fold trained afresh first
    removes an earlier run's outputs there; without ``resume`` an earlier summary in
    ``run_dir``, and what an earlier run left in the ``fold<k>`` folders of folds not in
    this run, are removed before the first fold trains). The summary's
    ``protocol.n_splits`` is the number of folds of the protocol (``official``: of
    fold tables), so that a partial cross-validation (``folds``) shows as one. The
    summary's ``protocol`` describes every fold: ``patient_disjoint`` is true only when
    each fold's is (``None`` when a reused report does not record it), ``notes`` holds
    every fold's notes prefixed ``"fold <k>: "``, and ``train_images``/``test_images``
    are ``None`` (each fold's sizes are under ``folds[].protocol``). When a fold is not
    patient-disjoint (``patient`` and ``official`` protocols) or has notes, a warning
    after the summary says so.

    With ``resume``, the checkpoints of the folds known before indexing (``folds``, or
    every fold of the image and patient protocols) are compared with the settings first
    (:func:`check_resume`): settings that differ are refused before the data are indexed.

    Returns:
        The summary report (main process), else ``None``.

    Raises:
        ValueError: before any training, for a fold in ``folds`` that the protocol does
            not have (the message lists those it has) or one given twice, or a
            ``run_dir`` that cannot be created or written; with ``resume``, for a fold
            made with other settings.
    """
    info = dist_info or init_distributed(config.device)
    if resume:
        # before indexing (minutes): the folds this run will surely train; the official
        # protocol's fold numbers are known only from its tables
        known = (list(folds) if folds is not None else
                 list(range(spec.n_splits)) if spec.protocol != "official" else [])
        for fold in dict.fromkeys(known):
            check_resume(spec, config, Path(run_dir) / f"fold{fold}", fold=fold, reuse=True)
    data = prepare_data(spec, progress=progress and info.is_main)
    available = [s.fold for s in data.splits]
    chosen = list(folds) if folds is not None else available
    unknown = [f for f in chosen if f not in available]
    repeated = sorted({f for f in chosen if chosen.count(f) > 1})
    if unknown or repeated or not chosen:
        where = " (the fold tables' own numbers)" if spec.protocol == "official" else ""
        problem = (f"unknown {plural(len(unknown), 'fold')} {unknown}" if unknown else
                   f"{plural(len(repeated), 'fold')} {repeated} given more than once" if repeated
                   else "no fold")
        raise SettingError("folds", f"must be distinct folds of {available}{where}, but got "
                                    f"{chosen}: {problem}")
    run_dir = Path(run_dir)
    if info.is_main:
        problem = writable_problem(run_dir, "a run folder")
        if problem:
            raise ValueError(problem)
        # a process killed while it wrote the summary, or a fold's evaluation, leaves its
        # temporary file (the file it was replacing is intact); a reused fold never
        # reaches fit's cleanup, so they are removed here, fresh run or resumed
        leftovers = remove_stale_temporaries(
            run_dir, ["cv_metrics.json", "cv_metrics.md",
                      *(f"fold{f}/{name}" for f in chosen for name in _EVALUATION_FILES)])
        if leftovers:
            _LOG.warning("removed in %r the temporary files of writes cut short (a run killed "
                         "while saving; the files they were to replace are intact): %s",
                         str(run_dir), ", ".join(leftovers))
    if not resume and info.is_main:
        stale = [name for name in ("cv_metrics.json", "cv_metrics.md")
                 if (run_dir / name).is_file()]
        for name in stale:
            (run_dir / name).unlink()
        if stale:
            _LOG.warning("fresh cross-validation in %s: removed the summary of an earlier run "
                         "there: %s", run_dir, ", ".join(stale))
        # the chosen folds' earlier outputs go now, not as each fold starts: a run stopped
        # before a fold left that fold with the replaced run's checkpoint, which --resume
        # then refused (other settings) and --overwrite retrained the finished folds for
        replaced = [name for fold in chosen if (run_dir / f"fold{fold}").is_dir()
                    for name in _clear_fold_folder(run_dir / f"fold{fold}")]
        if replaced:
            _LOG.warning("fresh cross-validation in %s: removed what an earlier run left in "
                         "the folders of the folds it runs: %s", run_dir, ", ".join(replaced))
        others = _remove_other_folds(run_dir, chosen)
        if others:
            _LOG.warning("fresh cross-validation of %s %s in %s: removed what an earlier "
                         "run left in the folders of other folds: %s",
                         plural(len(chosen), "fold"), ", ".join(map(str, chosen)), run_dir,
                         ", ".join(others))
    reports, data_lines_shown = [], False
    for position, fold in enumerate(chosen, 1):
        fold_dir = run_dir / f"fold{fold}"
        # console lines (the CLI shows breakhis' INFO), so that a long CV shows where it is
        if info.is_main:
            _LOG.info("fold %d (%d/%d) in %s", fold, position, len(chosen), fold_dir)
        report = None
        if resume and (fold_dir / "test_metrics.json").is_file():
            report = _reusable_fold(spec, config, data, fold, fold_dir, main=info.is_main)
            if report is not None and info.is_main:
                trained = report.get("epochs_trained")
                _LOG.info("fold %d: reusing %s (made from its checkpoint, %s %s)", fold,
                          fold_dir / "test_metrics.json", trained, plural(trained, "epoch"))
        if report is None:
            with hold_folder(fold_dir, info):
                report = run_fold(spec, config, fold, fold_dir, resume=resume, data=data,
                                  dist_info=info, progress=progress,
                                  data_lines_on_console=not data_lines_shown)
            data_lines_shown = True  # the same data for every fold: its lines once
        reports.append(report)
        if report is not None:
            _LOG.info("fold %d (%d/%d): %s", fold, position, len(chosen),
                      metrics_line(report["metrics"]))
    if not info.is_main:
        return None
    first = reports[0]
    folds_protocol = [{"fold": r["fold"], "protocol": r["protocol"]} for r in reports]
    disjoint, notes = split_integrity({"folds": folds_protocol})
    summary = {
        "title": f"BreaKHis {data.task.name} cross-validation ({spec.protocol} protocol)",
        "task": first["task"],
        # of every fold, not the first one's: patient-disjoint only when each fold is,
        # every fold's notes; the sizes are each fold's own (folds[].protocol)
        "protocol": {**first["protocol"], "fold": None, "n_splits": len(data.splits),
                     "protocol_description": PROTOCOL_DESCRIPTIONS[spec.protocol],
                     "train_images": None, "test_images": None,
                     "patient_disjoint": disjoint, "notes": notes},
        "data_root": first["data_root"],
        "synthetic": first["synthetic"],
        "model": first["model"],
        # the least trained fold (None when a reused report predates the entry)
        "epochs_trained": _least([r.get("epochs_trained") for r in reports]),
        "data_issues": data.issues(),
        "summary": summarize_folds([r["metrics"] for r in reports]),
        # the checkpoint of each fold's report, so that `table` can tell a summary that a
        # fold retrained since has left stale (breakhis.plots.results_rows)
        "folds": [{"fold": r["fold"], "protocol": r["protocol"],
                   "epochs_trained": r.get("epochs_trained"), "checkpoint": r.get("checkpoint"),
                   "metrics": r["metrics"]}
                  for r in reports],
    }
    write_report(summary, run_dir, "cv_metrics")
    leaking = [r["fold"] for r in reports if r["protocol"].get("patient_disjoint") is False]
    if leaking and spec.protocol != "image":
        _LOG.warning(
            "cross-validation (%s protocol): %s %s %s NOT patient-disjoint, so the mean and "
            "standard deviation in %s are not a patient-disjoint result; the notes of every "
            "fold are listed there", spec.protocol, plural(len(leaking), "fold"),
            ", ".join(map(str, leaking)), plural(len(leaking), "is", "are"),
            run_dir / "cv_metrics.md")
    elif notes:
        _LOG.warning("cross-validation (%s protocol): %s; listed in %s", spec.protocol,
                     "; ".join(notes), run_dir / "cv_metrics.md")
    return summary


@contextlib.contextmanager
def hold_folder(folder: str | os.PathLike[str], info: DistInfo) -> Iterator[None]:
    """Hold the run folder ``folder`` while the block runs (:class:`~._files.FolderLock`,
    taken by the main process; every process stops when it is busy): two runs writing
    into one folder at once mixed their checkpoints, reports and logs. The command line
    holds the folder of a ``train`` or ``cv``, and :func:`run_cv` each fold's folder while
    it trains there.

    Raises:
        ValueError: when another run holds it.
    """
    lock = FolderLock(folder)
    try:
        held = lock.acquire() if info.is_main else True
        if all_reduce_sum([0.0 if held else 1.0], info.device)[0]:
            raise ValueError(
                f"{str(folder)!r} is in use by another breakhis-repro train or cv run (it "
                f"holds {LOCK_NAME}): wait for that run to end, or pass another --out")
        yield
    finally:
        lock.release()


#: What a fold's folder holds once :func:`run_fold` has run there (:data:`RUN_OUTPUTS`,
#: and the settings and log that a fold trained afresh rewrites and appends to).
_FOLD_FILES: tuple[str, ...] = (*RUN_OUTPUTS, "config.json", "train.log")


def _remove_other_folds(run_dir: Path, chosen: Sequence[int]) -> list[str]:
    """Remove what an earlier run left in the ``fold<k>`` folders of ``run_dir`` whose
    ``k`` is not among ``chosen`` (a fresh cross-validation of fewer folds than the run it
    replaces): :data:`_FOLD_FILES`, and each folder once nothing else is left in it.

    A fold folder left as it was would hold the earlier run's checkpoint beside this
    run's summary, and a later ``--resume`` of every fold would take it up as a fold of
    this run. Other files (the user's) stay, with their folder. A folder that a run
    in progress holds (a ``train --out`` into it) is left alone, with a warning. Only the names breakhis
    gives (``fold1``, not ``fold01``). A fold's folder that is a symbolic link (to another
    disk, say) is emptied of those files the same way; the link itself stays.

    Returns:
        The files removed, relative to ``run_dir`` (POSIX separators), in fold order.
    """
    keep = {f"fold{k}" for k in chosen}
    folders = [p for p in run_dir.iterdir()
               if re.fullmatch(r"fold(0|[1-9]\d*)", p.name) and p.name not in keep
               and p.is_dir()] if run_dir.is_dir() else []
    removed = []
    for folder in sorted(folders, key=lambda p: int(p.name[4:])):
        removed += _clear_fold_folder(folder)
    return removed


def _clear_fold_folder(folder: Path) -> list[str]:
    """Remove :data:`_FOLD_FILES` from a fold's ``folder`` while holding it, then the folder
    if nothing else is left (not a symbolic link); a folder another run holds is left as
    it is, with a warning. Returns the files removed, as ``fold<k>/<name>``."""
    lock = FolderLock(folder)
    if not lock.acquire():
        _LOG.warning("left %s as it is: another run is using it", folder)
        return []
    try:
        removed = [f"{folder.name}/{name}" for name in _remove_outputs(folder, _FOLD_FILES)]
    finally:
        lock.release(remove_file=True)  # the lock file of the run that was there too
    if not folder.is_symlink() and not any(folder.iterdir()):
        folder.rmdir()
    return removed


def _least(values: list[int | None]) -> int | None:
    return None if not values or any(v is None for v in values) else min(values)


def evaluate_checkpoint(
    checkpoint: str | os.PathLike[str],
    *,
    out_dir: str | os.PathLike[str] | None = None,
    data_root: str | None = None,
    device: str = "auto",
    progress: bool = True,
) -> dict[str, Any] | None:
    """Evaluate a saved run on the test images of the fold it was trained on.

    The test images are those recorded in the checkpoint at training time (relative
    paths), looked up in the data indexed now; the fold is not drawn again. Inputs are
    normalised as in training (:func:`breakhis.train.checkpoint_normalization`). The
    report records the checkpoint (``checkpoint``: epoch and fingerprint) and the
    epochs it trained (``epochs_trained``); a checkpoint that trained fewer epochs than
    its settings ask (a run cut short) is evaluated with a warning. The notes of the
    fold's split, and whether it is not patient-disjoint, are logged as warnings, as
    :func:`run_fold` logs them before training.

    Args:
        checkpoint: a ``checkpoint.pt`` written by training.
        out_dir: where to write ``test_metrics.json``/``.md`` and ``test_predictions.csv``
            (default: the checkpoint's folder).
        data_root: use this data folder instead of the one recorded (data moved); a
            patients CSV recorded inside the old one is read from the same place inside
            it (and the fold tables, for a checkpoint written before the file lists were
            recorded, whose fold is drawn again).
        device: ``auto``, ``cpu`` or ``cuda``.
        progress: show a progress bar.

    Returns:
        The test report (main process). Started as one of several processes (torchrun),
        the others check the report folder as the main one does and return ``None``
        without loading or predicting anything: the main process alone evaluates and
        writes the report.

    Raises:
        ValueError: when a recorded test image is no longer in the data or no longer
            decodes, the files of the recorded test images hold other images than at
            training (the checkpoint's SHA-256 over them differs), the data's classes
            differ from the checkpoint's, or the report
            folder cannot be created or written, or is another run's: it holds a
            ``checkpoint.pt`` that is not ``checkpoint`` (neither the same file nor a
            copy of it) or a cross-validation's ``cv_metrics.json``, whose reports this
            would overwrite (found before any work is done).
    """
    info = init_distributed(device)
    out = Path(out_dir) if out_dir is not None else Path(checkpoint).parent
    # tried before the model and the data are loaded and every test image is predicted
    # every process: it creates nothing, and one that failed alone would leave the others
    # waiting at a collective
    problem = (writable_problem(out, "the report folder", create=False)
               or _other_run_problem(checkpoint, out) or _busy_problem(out))
    if problem:
        raise ValueError(problem)
    if not info.is_main:  # one evaluation, by the main process: each would do it all again
        return None
    model, state = load_model(checkpoint, device=info.device)
    spec, data, decoded = _checkpoint_data(checkpoint, state, data_root, progress=progress)
    test, protocol = _recorded_images(checkpoint, state, spec, data, "test")
    test = _checked_images(checkpoint, state, spec, data, test, "test", decoded=decoded, progress=progress)
    config = TrainConfig.from_dict(state["config"])
    warn_unfinished(checkpoint, state, "the results are those of an unfinished model "
                    "(epochs_trained in the report; resume the run with --resume to finish it, or, "
                    "if its training diverged, train again afresh with a lower --lr)")
    for text in _protocol_warnings(int(state["extra"]["fold"]), protocol):
        _LOG.warning("%s", text)
    return _evaluate_split(model, config, data, test, protocol, int(state["extra"]["fold"]),
                           out, info, issues=_checkpoint_issues(state, data, decoded),
                           val_fraction=spec.val_fraction,
                           normalization=checkpoint_normalization(state),
                           checkpoint=checkpoint_identity(state), progress=progress)


def _busy_problem(out: Path) -> str | None:
    """Why ``out`` must not take a report now: a ``train`` or ``cv`` in progress holds it
    (:class:`breakhis._files.FolderLock`), and would write its own report there, which an
    evaluation finishing later would replace with an older one."""
    if out.is_dir() and FolderLock.busy(out):
        return (f"the report folder {str(out)!r} is in use by a train or cv run in progress "
                "(it writes its own report there when it ends); evaluate after it has "
                "finished, or pass another --out")
    return None


def _other_run_problem(checkpoint: str | os.PathLike[str], out: Path, what: str = "report") -> str | None:
    """Why ``out`` must not take the report (``what="report"``) or the figures
    (``what="figures"``) of ``checkpoint``, or ``None`` when it may.

    A folder holding another run's ``checkpoint.pt`` (not ``checkpoint`` itself, nor a
    copy of it: same :func:`breakhis.train.checkpoint_identity`) is refused: its
    ``test_metrics.json``/``.md`` and ``test_predictions.csv`` would be overwritten,
    leaving a report beside a checkpoint it was not made from (figures there would be
    taken for that run's). So is a cross-validation's folder (``cv_metrics.json``): one
    run's report or figures do not belong among its folds. Only the two checkpoints'
    settings and history are read (tensors mapped), not the model.

    Raises:
        FileNotFoundError, NotACheckpointError: when ``checkpoint`` is missing or not a
            checkpoint, before anything is said of ``out`` (a ``cv_metrics.json`` given
            as the checkpoint was told to choose another ``--out``).
    """
    mine = load_checkpoint(checkpoint, map_location="cpu", mmap=True)
    where = (f"cannot write the {what} of checkpoint {str(checkpoint)!r} into "
             f"{str(out)!r}: expected a new folder or the checkpoint's own, but")
    choose = "; choose another --out (a new folder)"
    if (out / "cv_metrics.json").is_file():
        return (f"{where} it holds cv_metrics.json: a cross-validation's folder, not one "
                f"run's{choose}")
    other = out / CHECKPOINT_NAME
    if not other.is_file():
        return None
    try:
        if os.path.samefile(other, checkpoint):
            return None
        theirs = checkpoint_identity(load_checkpoint(other, map_location="cpu", mmap=True))
    except FileNotFoundError:  # gone meanwhile (a run starting there cleared it): _busy_problem says so
        return None
    except NotACheckpointError:
        theirs = None
    if theirs is not None and theirs == checkpoint_identity(mine):
        return None  # a copy of the checkpoint: its report belongs there
    harm = (f"whose test_metrics.json/.md and {PREDICTIONS_FILE} this would overwrite with "
            "reports it was not made from" if what == "report" else
            "beside which they would be taken for that run's")
    return f"{where} it holds {str(other)!r}, another run's checkpoint, {harm}{choose}"


def _checkpoint_data(
    checkpoint: str | os.PathLike[str], state: dict[str, Any], data_root: str | None,
    *, progress: bool,
) -> tuple[DataSpec, PreparedData, bool]:
    """The data spec recorded in a checkpoint, its data indexed again, and whether the
    images were decoded while indexing.

    A checkpoint that records its file lists (and its fold's protocol) has its data
    indexed from the image headers only: the images it uses are decoded afterwards
    (:func:`_decodable`), not the whole tree again (about 5 ms per BreaKHis PNG, most of
    a test run's reading). Its fold is not drawn again, so nothing that only drawing
    it needs is asked of the data now: fold tables, or a patient for every image (a
    file that does not decode, left out in training, may have none). An image folder's
    class folders must be the checkpoint's classes; a further folder is allowed when
    none of its images decodes (training's index left it out, so the run never had
    that class). An older checkpoint is indexed as recorded, since its fold is drawn
    again from the images found.
    """
    extra = state.get("extra") or {}
    if "data" not in extra:
        raise ValueError(f"checkpoint {str(checkpoint)!r} records no data spec; "
                         "it was not written by breakhis training")
    spec = DataSpec.from_dict(extra["data"])
    if data_root is not None:
        spec = _moved(spec, data_root)
    elif not Path(spec.data_root).is_dir():
        raise ValueError(
            f"expected the data folder {spec.data_root!r} that checkpoint {str(checkpoint)!r} "
            f"was trained on, but it {'is a file' if Path(spec.data_root).exists() else 'does not exist'}"
            ": if the data moved, pass its new place (--data-root; data_root= in Python)")
    classes = list(state["classes"])
    if extra.get("files") is None or extra.get("protocol") is None:
        data = prepare_data(spec, progress=progress)
        _check_classes(data.task.classes, classes)
        return spec, data, True
    headers_only = spec.verify
    indexed = replace(spec, verify=False) if headers_only else spec
    index, task, records, targets, task_warnings = _index_task(
        indexed, progress=progress, classes=classes if spec.image_folder else None)
    if spec.image_folder:
        folders = sorted({r.label for r in index.records})
        others = [c for c in folders if c not in classes]
        if others and headers_only:
            paths = [r.path for r in index.records if r.label in others]
            if len(undecodable_images(paths, progress=progress)) == len(paths):
                folders = [c for c in folders if c in classes]  # none decodes: as in training
        _check_classes(folders, classes)
    else:
        _check_classes(task.classes, classes)
    data = PreparedData(index, task, records, targets, patient_groups(records), splits=[],
                        warnings=[*index.warnings, *task_warnings])
    return spec, data, not headers_only


def _checkpoint_issues(state: dict[str, Any], data: PreparedData, decoded: bool) -> dict[str, Any]:
    """What a saved run's report says indexing left out and warned about: the issues
    recorded at training time (those of the data the run was trained on), else those of
    the data indexed now; a headers-only index (``decoded`` false) did not look for
    images that do not decode or byte-identical copies, and a warning says so."""
    recorded = (state.get("extra") or {}).get("data_issues")
    if recorded is not None:
        return dict(recorded)
    issues = data.issues()
    if not decoded:
        issues["warnings"].append(
            "the checkpoint records no data issues (written by an older breakhis), so these "
            "are of the data indexed now, from the image headers only: files that do not "
            "decode and byte-identical copies were not looked for")
    return issues


def _check_classes(found: Sequence[str], recorded: list[str]) -> None:
    if list(found) != recorded:
        raise ValueError(f"checkpoint classes {recorded} differ from the task's {list(found)}")


def _moved(spec: DataSpec, data_root: str) -> DataSpec:
    """``spec`` with its data in ``data_root``: fold tables and a patients CSV that lay
    inside the recorded data folder are looked up at the same place inside the new one
    (they moved with the data); files elsewhere keep their paths."""
    old, new = Path(spec.data_root), Path(_absolute(data_root))

    def follow(path: str) -> str:
        return str(new / Path(path).relative_to(old)) if Path(path).is_relative_to(old) else path

    return replace(spec, data_root=str(new), folds_file=tuple(map(follow, spec.folds_file)),
                   patients_csv=None if spec.patients_csv is None else follow(spec.patients_csv))


def _decodable(
    checkpoint: str | os.PathLike[str], spec: DataSpec, data: PreparedData,
    index: np.ndarray, split: str, *, progress: bool,
) -> tuple[np.ndarray, dict[str, str] | None]:
    """``index`` after decoding its images, as training's index did (``spec.verify``),
    and the SHA-256 of the files that decode, by relative path (``None`` without
    ``spec.verify``).

    A recorded test or training image that no longer decodes is an error (it was
    decodable when the run was trained). For ``all``, images that do not decode are left
    out with a warning, as indexing leaves them out, or refused with ``strict``.

    Raises:
        ValueError: when a recorded ``test``/``train`` image no longer decodes.
        UnreadableImageError: for ``all`` under a strict spec, when an image does not decode.
    """
    if not spec.verify or len(index) == 0:
        return index, None
    paths = [data.records[i].path for i in index]
    read = image_digests(paths, progress=progress)
    bad = {p: r for p, r in read.items() if isinstance(r, Exception)}
    root = data.index.root
    digests = {Path(p).relative_to(root).as_posix(): r for p, r in read.items() if isinstance(r, str)}
    if not bad:
        return index, digests
    shown = [f"{Path(p).relative_to(root).as_posix()} ({e})" for p, e in list(bad.items())[:3]]
    if split != "all":
        raise ValueError(
            f"expected the {count(len(index), f'{split} image')} recorded in checkpoint "
            f"{str(checkpoint)!r} to decode, as they did in training, but {len(bad)} no "
            f"longer {plural(len(bad), 'does', 'do')} under {str(root)!r}, e.g. {shown}; "
            f"restore {plural(len(bad), 'it', 'them')} from the release")
    if spec.strict:
        raise UnreadableImageError(
            f"{count(len(bad), 'image')} could not be decoded (strict mode), e.g. {shown}")
    warnings.warn(f"{count(len(bad), 'image')} under {str(root)!r} could not be decoded and "
                  f"{plural(len(bad), 'is', 'are')} left out, as training's index left "
                  f"{plural(len(bad), 'it', 'them')} out, e.g. {shown}",
                  UserWarning, stacklevel=3)
    return np.asarray([i for i, p in zip(index, paths) if str(p) not in bad], dtype=np.int64), digests


def _checked_images(
    checkpoint: str | os.PathLike[str], state: dict[str, Any], spec: DataSpec, data: PreparedData,
    index: np.ndarray, split: str, *, decoded: bool, progress: bool,
) -> np.ndarray:
    """``index`` decoded as training's index did (:func:`_decodable`; not again when the
    index ``decoded`` them) and checked against the contents the checkpoint records
    (:func:`_check_contents`).

    ``index`` holds the recorded images (:func:`_recorded_images`) in their recorded order:
    each file's SHA-256 is looked up by its path now and compared under its recorded
    name, so that a ``--data-root`` at another level of the tree (other relative paths)
    is checked too; looked up by recorded name, it was not checked at all.
    """
    digests = data.index.digests
    if not decoded:
        index, digests = _decodable(checkpoint, spec, data, index, split, progress=progress)
    files = (state.get("extra") or {}).get("files") or {}
    names = _recorded_names(files, split)
    if digests is not None and split != "all" and len(names) == len(index):
        now = (digests.get(data.relative_path(i)) for i in index)
        digests = {name: digest for name, digest in zip(names, now) if digest is not None}
    _check_contents(checkpoint, state, data.index.root, split, digests)
    return index


def _check_contents(
    checkpoint: str | os.PathLike[str], state: dict[str, Any], root: Path, split: str,
    digests: Mapping[str, str] | None,
) -> None:
    """Refuse recorded ``test``/``train`` images whose files hold other images than at
    training time: the checkpoint's SHA-256 over each split's files (``files_sha256``)
    against the files found now. Not checked without digests (a checkpoint written before
    they were recorded, data indexed without ``verify``) or where a recorded file is not
    among ``digests`` (by relative path).

    Raises:
        ValueError: naming the split, the checkpoint and the data folder.
    """
    extra = state.get("extra") or {}
    recorded, files = extra.get("files_sha256"), extra.get("files") or {}
    if not recorded or digests is None or split == "all":
        return
    for name in ("test",) if split == "test" else ("train", "val"):
        rels = files.get(name)
        if rels is None or name not in recorded:
            continue
        now = _files_digests({name: rels}, digests)  # None where a file has no digest
        if now is not None and now[name] != recorded[name]:
            raise ValueError(
                f"expected the {count(len(rels), f'{name} image')} recorded in checkpoint "
                f"{str(checkpoint)!r}, but the files of those names under {str(root)!r} hold other "
                "images (their SHA-256 is not the one recorded at training): pass the data the "
                "run was trained on (--data-root; data_root= in Python)")


def _recorded_names(files: Mapping[str, Sequence[str]], split: str) -> list[str]:
    """The images a checkpoint's file lists (``extra.files``) record for ``split``:
    ``test``, or ``train`` with the validation share, in that order."""
    if split == "test":
        return list(files.get("test", ()))
    return [*files.get("train", ()), *files.get("val", ())]


def _recorded_images(
    checkpoint: str | os.PathLike[str], state: dict[str, Any], spec: DataSpec,
    data: PreparedData, split: str,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Indices into ``data.records`` of a saved run's ``test`` or ``train`` images.

    ``train`` includes the validation share. The images are the ones recorded at
    training time; the protocol description is the recorded one.

    Raises:
        ValueError: when a recorded image is not among the task's images now.
    """
    extra = state["extra"]
    fold = int(extra["fold"])
    files = extra.get("files")
    if files is None:
        warnings.warn(
            f"checkpoint {str(checkpoint)!r} records no file lists (written by an older "
            "breakhis); its fold is drawn again from the data, which gives the training "
            "split only if the data have not changed since", UserWarning, stacklevel=3)
        drawn = _split_of(data, fold)
        return ((drawn.test if split == "test" else drawn.train),
                _protocol_dict(spec, drawn, data))
    names = _recorded_names(files, split)
    position = {data.relative_path(i): i for i in range(len(data.records))}
    missing = [n for n in names if n not in position]
    if missing:
        # --data-root at another level of the same tree (BreaKHis_v1 for its parent)
        position = _rerooted(names, position) or position
        missing = [n for n in names if n not in position]
    if missing:
        raise ValueError(
            f"expected the {len(names)} {split} images of fold {fold} recorded in checkpoint "
            f"{str(checkpoint)!r} under {str(data.index.root)!r}, but {len(missing)} are not "
            f"among the task's images there now, e.g. {missing[:3]}; restore them (or pass "
            "--data-root if the data moved): the fold is not drawn again, so that no "
            "training image is evaluated as a test image")
    return np.asarray([position[n] for n in names], dtype=np.int64), dict(extra["protocol"])


def _rerooted(names: Sequence[str], position: dict[str, int]) -> dict[str, int] | None:
    """``position`` (record index by path relative to the data root now) keyed by the
    recorded ``names`` instead, where the root now is ``k`` folders below or above the
    recorded one in the same tree: every name found once with its first ``k`` folders
    taken off, or every name that one path now gives with its first ``k`` taken off.
    ``None`` when no ``k`` finds them all, or finds one ambiguously.

    Examples:
        >>> _rerooted(["B/h/a.png", "B/h/b.png"], {"h/a.png": 0, "h/b.png": 1})  # root now B
        {'B/h/a.png': 0, 'B/h/b.png': 1}
        >>> _rerooted(["h/a.png"], {"B/h/a.png": 3, "B/x.png": 4})  # root now above B
        {'h/a.png': 3}
        >>> _rerooted(["h/a.png"], {"B/h/a.png": 3, "C/h/a.png": 4}) is None  # two copies
        True
    """
    depth = max((n.count("/") for n in [*names, *position]), default=0)
    for k in range(1, depth + 1):
        below = {n: "/".join(n.split("/")[k:]) for n in names}
        if all(n.count("/") >= k and below[n] in position for n in names):
            return {n: position[below[n]] for n in names}
        above: dict[str, list[int]] = defaultdict(list)
        for path, i in position.items():
            if path.count("/") >= k:
                above["/".join(path.split("/")[k:])].append(i)
        if all(len(above.get(n, ())) == 1 for n in names):
            return {n: above[n][0] for n in names}
    return None


def checkpoint_records(
    checkpoint: str | os.PathLike[str] | dict[str, Any],
    *,
    split: str = "test",
    data_root: str | None = None,
    progress: bool = False,
) -> tuple[list[ImageRecord], np.ndarray, dict[str, Any]]:
    """The images of the fold a saved run was trained on, with their targets.

    Args:
        checkpoint: a ``checkpoint.pt`` written by training (or its loaded dict).
        split: ``test`` (the fold's test images), ``train`` (its training images,
            validation share included) or ``all`` (every image of the task). Test and
            training images are those recorded in the checkpoint at training time.
        data_root: use this data folder instead of the one recorded (data moved); a
            patients CSV recorded inside the old one is read from the same place inside
            it (and the fold tables, for a checkpoint written before the file lists were
            recorded, whose fold is drawn again).
        progress: show a progress bar while indexing.

    Returns:
        ``(records, targets, info)``; ``info`` holds ``split``, ``fold``, ``task``,
        ``protocol``, ``data_root`` and ``synthetic`` (of the data found now).

    Raises:
        ValueError: for an unknown split, a checkpoint without a data spec, data
            whose classes differ from the checkpoint's, or a recorded test (training)
            image missing from the data now or no longer decodable, or whose files hold
            other images than at training (:func:`_check_contents`).
        UnreadableImageError: for ``all`` under a strict data spec, when an image does
            not decode (without ``strict`` such images are left out with a warning).

    Only the images returned are decoded (when the run was indexed with ``verify``), not
    the whole data folder again.
    """
    if split not in SPLIT_CHOICES:
        raise ValueError(f"split must be one of {SPLIT_CHOICES}, but got {split!r}")
    state = checkpoint if isinstance(checkpoint, dict) else load_checkpoint(checkpoint)
    name = "<checkpoint dict>" if isinstance(checkpoint, dict) else checkpoint
    spec, data, decoded = _checkpoint_data(name, state, data_root, progress=progress)
    fold = int(state["extra"]["fold"])
    if split == "all":
        index = np.arange(len(data.records))
        recorded = state["extra"].get("protocol")
        protocol = (dict(recorded) if recorded
                    else _protocol_dict(spec, _split_of(data, fold), data))
    else:
        index, protocol = _recorded_images(name, state, spec, data, split)
    index = _checked_images(name, state, spec, data, index, split, decoded=decoded, progress=progress)
    info = {"split": split, "fold": fold, "task": data.task.to_dict(),
            "protocol": protocol, "data_root": str(data.index.root),
            "synthetic": data.synthetic}
    return [data.records[i] for i in index], data.targets[index], info
