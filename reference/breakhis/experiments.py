"""Put data, task, protocol, training and evaluation together: one fold or a whole CV.

A :class:`DataSpec` names the data (a BreaKHis tree or an image folder), the task and
the protocol. :func:`run_fold` trains one fold and evaluates it on its test images;
:func:`run_cv` does every fold and writes the mean and standard deviation;
:func:`evaluate_checkpoint` re-evaluates a saved run; :func:`checkpoint_records` gives
the images of a saved run's fold (for figures). Every report carries the task, the
protocol, the fold and whether the data were synthetic; every evaluation also writes
its per-image predictions (``test_predictions.csv``).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .checkpoint import load_checkpoint
from .data import DataIndex, ImageRecord, index_breakhis, index_image_folder
from .distributed import DistInfo, init_distributed
from .evaluate import (
    PREDICTIONS_FILE,
    classification_metrics,
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
    validation_split,
)
from .tasks import Task, get_task
from .train import TrainConfig, fit, load_model, predict_probs

__all__ = [
    "SPLIT_CHOICES",
    "DataSpec",
    "PreparedData",
    "checkpoint_records",
    "evaluate_checkpoint",
    "prepare_data",
    "run_cv",
    "run_fold",
]

#: Which images of a saved run's fold :func:`checkpoint_records` returns.
SPLIT_CHOICES: tuple[str, ...] = ("test", "train", "all")


@dataclass
class DataSpec:
    """Which data, task and protocol.

    Args:
        data_root: BreaKHis tree, or image folder when ``image_folder``.
        task: ``MSBC``, ``MIBC``, ``MSFC``, ``MIFC`` (BreaKHis) or ``folder``.
        magnification: for ``MSBC``/``MSFC``.
        protocol: ``image``, ``patient`` or ``official``.
        n_splits: folds for the k-fold protocols.
        split_seed: seed of the folds (independent of the training seed).
        val_fraction: share of each training fold held out for the plateau schedule
            (0 uses the training loss).
        image_folder: ``data_root`` is ``root/<class>/<image>``, not BreaKHis.
        patients_csv: patient ids for an image folder (columns ``path``, ``patient``).
        folds_file: explicit ``Folds.csv``/``dsfold`` path(s) for ``official``; found
            below ``data_root`` when empty.
        verify: decode every image while indexing.
        strict: fail on unreadable images instead of skipping them.
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

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (stored in checkpoints)."""
        out = asdict(self)
        out["folds_file"] = list(self.folds_file)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DataSpec:
        """Inverse of :meth:`to_dict`."""
        data = dict(data)
        data["folds_file"] = tuple(data.get("folds_file") or ())
        return cls(**data)


@dataclass
class PreparedData:
    """Indexed data, the task's records and targets, groups and splits."""

    index: DataIndex
    task: Task
    records: list[ImageRecord]
    targets: np.ndarray
    groups: np.ndarray
    splits: list[Split]

    @property
    def synthetic(self) -> bool:
        """Whether the tree says it is synthetic (``SYNTHETIC.txt``)."""
        return any(Path(m).name.lower() == "synthetic.txt" for m in self.index.metadata_files)


def prepare_data(spec: DataSpec, *, progress: bool = False) -> PreparedData:
    """Index the data, select the task's records and draw the splits.

    Raises:
        ValueError: when the task selects no images, or settings are inconsistent.
    """
    if spec.image_folder:
        index = index_image_folder(spec.data_root, patients_csv=spec.patients_csv,
                                   verify=spec.verify, strict=spec.strict, progress=progress)
        classes = sorted({r.label for r in index.records})
        task = get_task("folder", classes=classes)
    else:
        index = index_breakhis(spec.data_root, verify=spec.verify, strict=spec.strict,
                               progress=progress)
        task = get_task(spec.task, magnification=spec.magnification)
    records = task.select(index.records)
    if not records:
        raise ValueError(f"task {task.name} selects no images under {spec.data_root!r}")
    targets = task.targets(records)
    groups = np.asarray([r.patient or str(r.path) for r in records])
    tables: list[str | Path] = list(spec.folds_file)
    if spec.protocol == "official" and not tables:
        tables = list(find_fold_tables(index.root))
    splits = make_splits(records, targets, spec.protocol, n_splits=spec.n_splits,
                         seed=spec.split_seed, fold_tables=tables)
    return PreparedData(index, task, records, targets, groups, splits)


def _protocol_dict(spec: DataSpec, split: Split) -> dict[str, Any]:
    out = split.to_dict()
    out["split_seed"] = spec.split_seed
    out["n_splits"] = spec.n_splits if spec.protocol != "official" else None
    return out


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
) -> dict[str, Any] | None:
    """Train fold ``fold`` and evaluate it on its test images.

    Writes ``checkpoint.pt``, ``train.log``, ``metrics.csv``, ``config.json``,
    ``test_metrics.json``/``.md`` and ``test_predictions.csv`` (one row per test image:
    path, patient, magnification, true class, predicted class, class probabilities)
    to ``run_dir``.

    Returns:
        The test report (main process), or ``None`` on other DDP processes.

    Raises:
        ValueError: for a fold number outside the protocol's folds.
    """
    info = dist_info or init_distributed(config.device)
    data = data or prepare_data(spec, progress=progress and info.is_main)
    if not 0 <= fold < len(data.splits):
        raise ValueError(f"fold must be in [0, {len(data.splits)}), but got {fold}")
    split = data.splits[fold]
    fit_idx, val_idx = split.train, np.zeros(0, dtype=np.int64)
    if spec.val_fraction > 0:
        fit_idx, val_idx = validation_split(
            split.train, data.targets, data.groups, fraction=spec.val_fraction,
            by_patient=split.protocol != "image", seed=spec.split_seed + fold)
    if split.patient_disjoint:
        check_patient_disjoint(fit_idx, split.test, data.groups)
    extra = {"data": spec.to_dict(), "fold": fold, "task": data.task.to_dict(),
             "protocol": _protocol_dict(spec, split), "synthetic": data.synthetic}
    result = fit(
        config,
        train_records=[data.records[i] for i in fit_idx], train_targets=data.targets[fit_idx],
        val_records=[data.records[i] for i in val_idx], val_targets=data.targets[val_idx],
        classes=list(data.task.classes), run_dir=run_dir, resume=resume, extra=extra,
        dist_info=info, progress=progress,
    )
    if not info.is_main:
        return None
    return _evaluate_split(result.model, config, data, split, spec, Path(run_dir),
                           info, progress=progress)


def _evaluate_split(
    model: Any, config: TrainConfig, data: PreparedData, split: Split, spec: DataSpec,
    out_dir: Path, info: DistInfo, *, progress: bool,
) -> dict[str, Any]:
    test_records = [data.records[i] for i in split.test]
    probs = predict_probs(model, test_records, input_size=config.input_size,
                          batch_size=max(config.batch_size, 32), device=info.device,
                          progress=progress)
    metrics = classification_metrics(data.targets[split.test], probs, data.task.classes,
                                     patients=data.groups[split.test])
    report = {
        "title": f"BreaKHis {data.task.name} fold {split.fold} ({split.protocol} protocol)",
        "task": data.task.to_dict(),
        "protocol": _protocol_dict(spec, split),
        "fold": split.fold,
        "data_root": str(data.index.root),
        "synthetic": data.synthetic,
        "model": {k: getattr(config, k) for k in ("head", "backbone", "weights", "se_reduction",
                                                  "input_size", "epochs", "seed")},
        "metrics": metrics,
    }
    write_report(report, out_dir, "test_metrics")
    write_predictions(out_dir / PREDICTIONS_FILE, test_records, data.targets[split.test], probs,
                      data.task.classes)
    return report


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

    With ``resume``, folds that already have ``test_metrics.json`` are not retrained and
    a fold with a checkpoint continues from it. Writes ``cv_metrics.json``/``.md`` in
    ``run_dir``; each ``fold<k>`` folder holds what :func:`run_fold` writes.

    Returns:
        The summary report (main process), else ``None``.
    """
    info = dist_info or init_distributed(config.device)
    data = prepare_data(spec, progress=progress and info.is_main)
    chosen = folds if folds is not None else list(range(len(data.splits)))
    run_dir = Path(run_dir)
    reports = []
    for fold in chosen:
        fold_dir = run_dir / f"fold{fold}"
        done = fold_dir / "test_metrics.json"
        if resume and done.is_file():
            reports.append(json.loads(done.read_text()))
            continue
        reports.append(run_fold(spec, config, fold, fold_dir, resume=resume, data=data,
                                dist_info=info, progress=progress))
    if not info.is_main:
        return None
    first = reports[0]
    summary = {
        "title": f"BreaKHis {data.task.name} cross-validation ({spec.protocol} protocol)",
        "task": first["task"],
        "protocol": {**first["protocol"], "fold": None,
                     "protocol_description": PROTOCOL_DESCRIPTIONS[spec.protocol]},
        "data_root": first["data_root"],
        "synthetic": first["synthetic"],
        "model": first["model"],
        "summary": summarize_folds([r["metrics"] for r in reports]),
        "folds": [{"fold": r["fold"], "protocol": r["protocol"], "metrics": r["metrics"]}
                  for r in reports],
    }
    write_report(summary, run_dir, "cv_metrics")
    return summary


def evaluate_checkpoint(
    checkpoint: str | os.PathLike[str],
    *,
    out_dir: str | os.PathLike[str] | None = None,
    data_root: str | None = None,
    device: str = "auto",
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate a saved run on the test images of the fold it was trained on.

    Args:
        checkpoint: a ``checkpoint.pt`` written by training.
        out_dir: where to write ``test_metrics.json``/``.md`` and ``test_predictions.csv``
            (default: the checkpoint's folder).
        data_root: use this data folder instead of the one recorded (data moved).
        device: ``auto``, ``cpu`` or ``cuda``.
        progress: show a progress bar.
    """
    info = init_distributed(device)
    model, state = load_model(checkpoint, device=info.device)
    spec, data = _checkpoint_data(checkpoint, state, data_root, progress=progress)
    config = TrainConfig.from_dict(state["config"])
    out = Path(out_dir) if out_dir is not None else Path(checkpoint).parent
    return _evaluate_split(model, config, data, data.splits[int(state["extra"]["fold"])], spec,
                           out, info, progress=progress)


def _checkpoint_data(
    checkpoint: str | os.PathLike[str], state: dict[str, Any], data_root: str | None,
    *, progress: bool,
) -> tuple[DataSpec, PreparedData]:
    """The data spec recorded in a checkpoint, and its data indexed and split again."""
    extra = state.get("extra") or {}
    if "data" not in extra:
        raise ValueError(f"checkpoint {str(checkpoint)!r} records no data spec; "
                         "it was not written by breakhis training")
    spec = DataSpec.from_dict(extra["data"])
    if data_root is not None:
        spec.data_root = data_root
    data = prepare_data(spec, progress=progress)
    if list(data.task.classes) != list(state["classes"]):
        raise ValueError(f"checkpoint classes {state['classes']} differ from the task's "
                         f"{list(data.task.classes)}")
    return spec, data


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
            validation share included) or ``all`` (every image of the task).
        data_root: use this data folder instead of the one recorded (data moved).
        progress: show a progress bar while indexing.

    Returns:
        ``(records, targets, info)``; ``info`` holds ``split``, ``fold``, ``task``,
        ``protocol``, ``data_root`` and ``synthetic`` (of the data found now).

    Raises:
        ValueError: for an unknown split, a checkpoint without a data spec, or data
            whose classes differ from the checkpoint's.
    """
    if split not in SPLIT_CHOICES:
        raise ValueError(f"split must be one of {SPLIT_CHOICES}, but got {split!r}")
    state = checkpoint if isinstance(checkpoint, dict) else load_checkpoint(checkpoint)
    name = "<checkpoint dict>" if isinstance(checkpoint, dict) else checkpoint
    spec, data = _checkpoint_data(name, state, data_root, progress=progress)
    fold = int(state["extra"]["fold"])
    chosen = data.splits[fold]
    index = {"test": chosen.test, "train": chosen.train,
             "all": np.arange(len(data.records))}[split]
    info = {"split": split, "fold": fold, "task": data.task.to_dict(),
            "protocol": _protocol_dict(spec, chosen), "data_root": str(data.index.root),
            "synthetic": data.synthetic}
    return [data.records[i] for i in index], data.targets[index], info
