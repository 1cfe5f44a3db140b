"""Metrics for BreaKHis results and the JSON/Markdown reports that carry them.

Image-level metrics come from scikit-learn. The patient-level recognition rate is the
one of Spanhol et al. (2016): for each patient the fraction of its images classified
correctly, averaged over patients. Every report records the task and protocol that
produced it, because image-split and patient-split numbers differ by several points.
The per-image predictions behind a report go to a CSV (:func:`write_predictions`,
:func:`read_predictions`), so that figures can be redrawn without the model. Reports are
read back with :func:`read_report`.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    precision_recall_fscore_support,
    roc_auc_score,
)

from ._files import atomic_writer, count, listed

__all__ = [
    "PREDICTIONS_FILE",
    "SUMMARY_METRICS",
    "Predictions",
    "ReportError",
    "check_finite_probs",
    "classification_metrics",
    "csv_path",
    "metrics_line",
    "patient_recognition_rate",
    "read_predictions",
    "read_report",
    "render_markdown",
    "roc_auc",
    "split_integrity",
    "summarize_folds",
    "write_predictions",
    "write_report",
]

#: Scalar metrics averaged over folds.
SUMMARY_METRICS: tuple[str, ...] = (
    "accuracy",
    "balanced_accuracy",
    "patient_recognition_rate",
    "macro_f1",
    "roc_auc",
)

#: File name of the per-image predictions written next to ``test_metrics.json``.
PREDICTIONS_FILE = "test_predictions.csv"
_PROB_PREFIX = "prob_"
_PRED_COLUMNS = ("path", "patient", "magnification", "true_label", "true_index",
                 "predicted_label")


def check_finite_probs(probs: np.ndarray, names: Sequence[str] | None = None) -> None:
    """ValueError unless every score in ``probs`` (shape ``(N, C)``) is finite.

    A NaN row would otherwise be predicted as the first class (``argmax``) and scored
    by scikit-learn with an error that does not say which images. ``names`` name the
    rows in the message (default: ``image <index>``).

    Examples:
        >>> check_finite_probs(np.array([[0.2, 0.8], [np.nan, np.nan]]), ["a.png", "b.png"])
        Traceback (most recent call last):
        ...
        ValueError: expected finite class probabilities, but the scores of 1 of 2 images are NaN or infinite: b.png
    """
    rows = np.asarray(probs, dtype=np.float64)
    rows = rows.reshape(len(rows), -1 if rows.size else 0)  # (0, C): nothing to check
    bad = np.flatnonzero(~np.isfinite(rows).all(axis=1))
    if len(bad):
        raise ValueError(
            f"expected finite class probabilities, but the scores of {len(bad)} of "
            f"{count(len(rows), 'image')} are NaN or infinite: "
            f"{listed([str(names[i]) if names is not None else f'image {i}' for i in bad])}"
        )


def patient_recognition_rate(
    y_true: Sequence[int] | np.ndarray,
    y_pred: Sequence[int] | np.ndarray,
    patients: Sequence[str] | np.ndarray,
) -> float:
    """Mean over patients of the fraction of their images classified correctly.

    Args:
        y_true: true class per image.
        y_pred: predicted class per image.
        patients: patient id per image.

    Raises:
        ValueError: when the three have different lengths or are empty.

    Examples:
        >>> patient_recognition_rate([0, 0, 1, 1, 1], [0, 1, 1, 1, 1], ["a", "a", "b", "b", "b"])
        0.75
    """
    y_true, y_pred, patients = np.asarray(y_true), np.asarray(y_pred), np.asarray(patients)
    if not len(y_true) == len(y_pred) == len(patients):
        raise ValueError(
            f"expected equal lengths, but got y_true={len(y_true)}, y_pred={len(y_pred)}, "
            f"patients={len(patients)}"
        )
    if len(y_true) == 0:
        raise ValueError("expected at least one image, but got none")
    correct: dict[str, list[bool]] = defaultdict(list)
    for t, p, g in zip(y_true.tolist(), y_pred.tolist(), patients.tolist()):
        correct[g].append(t == p)
    return float(np.mean([np.mean(v) for v in correct.values()]))


def roc_auc(y_true: np.ndarray, probs: np.ndarray) -> tuple[float | None, list[int]]:
    """ROC AUC: binary, or one-vs-rest macro over the classes that can be scored.

    A class can be scored when the true labels contain it and something else; classes
    missing from a small test fold are left out of the macro average (and reported).

    Args:
        y_true: true class per image, shape ``(N,)``.
        probs: class probabilities, shape ``(N, C)``.

    Returns:
        ``(auc, classes_used)``; ``auc`` is ``None`` when no class can be scored.
    """
    y_true = np.asarray(y_true)
    probs = np.asarray(probs, dtype=np.float64)
    n_classes = probs.shape[1]
    if n_classes == 2:
        if len(np.unique(y_true)) < 2:
            return None, []
        return float(roc_auc_score(y_true, probs[:, 1])), [0, 1]
    used = [c for c in range(n_classes) if 0 < np.sum(y_true == c) < len(y_true)]
    if not used:
        return None, []
    scores = [roc_auc_score(y_true == c, probs[:, c]) for c in used]
    return float(np.mean(scores)), used


def classification_metrics(
    y_true: Sequence[int] | np.ndarray,
    probs: np.ndarray,
    classes: Sequence[str],
    *,
    patients: Sequence[str | None] | np.ndarray | None = None,
) -> dict[str, Any]:
    """All metrics of one evaluation.

    ``macro_f1`` is the unweighted mean of the per-class F1 over the classes that occur
    in the true *or* the predicted labels (scikit-learn's ``f1_score(average="macro")``
    with its default labels): a class that is predicted but absent from the truth
    counts with F1 0. Classes absent from both have no defined F1 and are left out;
    ``macro_f1_classes`` names the classes averaged. (The paper reports accuracy only.)

    The patient recognition rate needs the patient of every image: when any image's
    patient is unknown (``None`` or ``""``) it is ``None`` rather than a rate that
    counts such images as one-image patients; ``images_without_patient`` says how many.

    Args:
        y_true: true class per image, shape ``(N,)``.
        probs: class probabilities, shape ``(N, C)`` with ``C == len(classes)``.
        classes: class names.
        patients: patient id per image (``None`` where unknown), for the patient-level
            recognition rate.

    Returns:
        ``accuracy``, ``balanced_accuracy``, ``patient_recognition_rate`` (or ``None``),
        ``macro_f1`` with ``macro_f1_classes``, ``per_class`` (precision, recall, F1,
        support per class name), ``confusion_matrix`` (rows true, columns predicted),
        ``roc_auc`` (binary, or one-vs-rest macro) with ``roc_auc_classes``, ``images``,
        ``patients`` (distinct known patients) and ``images_without_patient``.

    Examples:
        >>> m = classification_metrics([0, 0, 1, 1], np.eye(3)[[0, 2, 1, 1]], ["a", "b", "c"])
        >>> round(m["macro_f1"], 4), m["macro_f1_classes"]
        (0.5556, ['a', 'b', 'c'])

    Raises:
        ValueError: on mismatched shapes, no image, or a target outside ``[0, C - 1]``
            (such as the ``-1`` that ``breakhis-repro predict`` writes for an image
            without ground truth).
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    if len(y_true) == 0 and len(probs) == 0:
        raise ValueError("expected at least one image to score, but got none")
    if probs.ndim != 2 or probs.shape != (len(y_true), len(classes)):
        raise ValueError(
            f"expected probs of shape ({len(y_true)}, {len(classes)}), but got {probs.shape}"
        )
    check_finite_probs(probs)
    outside = (y_true < 0) | (y_true >= len(classes))
    if outside.any():
        bad = sorted(set(y_true[outside].tolist()))
        hint = ("; -1 marks an image without ground truth (the output of predict), which "
                "cannot be scored" if -1 in bad else "")
        raise ValueError(
            f"expected targets in [0, C-1] = [0, {len(classes) - 1}] (indices into "
            f"{list(classes)}), but got {bad[:5]} for {int(outside.sum())} of "
            f"{count(len(y_true), 'image')}{hint}"
        )
    y_pred = probs.argmax(axis=1)
    labels = list(range(len(classes)))
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=0
    )
    auc, auc_classes = roc_auc(y_true, probs)
    prr, n_patients, n_unknown = None, None, None
    if patients is not None:
        patient_list = list(patients)
        if len(patient_list) != len(y_true):
            raise ValueError(f"expected {len(y_true)} patients, but got {len(patient_list)}")
        known = [p for p in patient_list if p is not None and p != ""]
        n_patients, n_unknown = len(set(known)), len(patient_list) - len(known)
        if n_unknown == 0:
            prr = patient_recognition_rate(y_true, y_pred, patient_list)
    present = [c for c in labels if support[c] > 0]
    f1_classes = [c for c in labels if support[c] > 0 or np.any(y_pred == c)]
    # sklearn's balanced_accuracy_score (the mean recall over the classes in y_true),
    # computed here: sklearn warns on a test fold of one class, or one that lacks a
    # class the model predicts, which a small or unstratified fold often is
    balanced = float(np.mean(recall[present])) if present else None
    return {
        "images": int(len(y_true)),
        "patients": n_patients,
        "images_without_patient": n_unknown,
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "balanced_accuracy": balanced,
        "patient_recognition_rate": prr,
        "macro_f1": float(np.mean(f1[f1_classes])) if f1_classes else None,
        "macro_f1_classes": [classes[c] for c in f1_classes],
        "roc_auc": auc,
        "roc_auc_kind": "binary" if len(classes) == 2 else "one-vs-rest macro",
        "roc_auc_classes": [classes[c] for c in auc_classes],
        "per_class": {
            name: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, name in enumerate(classes)
        },
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
        "classes": list(classes),
    }


def summarize_folds(folds: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Mean and standard deviation (``ddof=1``) of :data:`SUMMARY_METRICS` over folds.

    Folds where a metric is ``None`` (e.g. AUC on a single-class fold) are left out of
    that metric; ``n`` says how many were used.

    Examples:
        >>> s = summarize_folds([{"accuracy": 0.8}, {"accuracy": 1.0}])
        >>> round(s["accuracy"]["mean"], 3), round(s["accuracy"]["std"], 3), s["accuracy"]["n"]
        (0.9, 0.141, 2)
    """
    out: dict[str, dict[str, Any]] = {}
    for key in SUMMARY_METRICS:
        values = [float(f[key]) for f in folds if f.get(key) is not None]
        if not values:
            continue
        std = float(np.std(values, ddof=1)) if len(values) > 1 else None
        out[key] = {"mean": float(np.mean(values)), "std": std, "n": len(values)}
    return out


def metrics_line(metrics: Mapping[str, Any]) -> str:
    """One fold's headline metrics in one line, as the console shows them.

    Args:
        metrics: the ``metrics`` of a test report (:func:`classification_metrics`).

    Examples:
        >>> metrics_line({"accuracy": 0.875, "patient_recognition_rate": None,
        ...               "macro_f1": 0.8, "roc_auc": 0.9, "images": 8})
        'accuracy 87.50%, patient recognition rate n/a, macro F1 80.00%, ROC AUC 90.00% on 8 images'
    """
    def pct(v: Any) -> str:
        return "n/a" if v is None else f"{100 * v:.2f}%"

    return (f"accuracy {pct(metrics['accuracy'])}, patient recognition rate "
            f"{pct(metrics['patient_recognition_rate'])}, macro F1 {pct(metrics['macro_f1'])}, "
            f"ROC AUC {pct(metrics['roc_auc'])} on {metrics['images']} images")


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{100 * value:.2f}"
    return str(value)


def _all_true(values: Sequence[Any]) -> bool | None:
    """``False`` when a value is ``False``, else ``None`` when one is not ``True`` (unknown)
    or there are none, else ``True``."""
    if any(v is False for v in values):
        return False
    return True if values and all(v is True for v in values) else None


def split_integrity(report: Mapping[str, Any]) -> tuple[bool | None, list[str]]:
    """Whether a report's test images share no patient with its training images, and the
    notes of its split(s): images a fold table left out, patients in train and test,
    images of unknown patient (:class:`breakhis.splits.Split`).

    A test report's come from its ``protocol``. A cross-validation summary's come from
    every fold's (``folds[].protocol``): patient-disjoint only when every fold is (and
    the summary's own ``protocol`` does not say otherwise), each note prefixed with its
    fold (``"fold 2: ..."``); a summary whose folds record no protocol gives its own
    ``protocol``'s. ``None`` is unknown (a report written before ``patient_disjoint``
    was recorded), never taken for ``False``.

    Args:
        report: a ``test_metrics.json`` or ``cv_metrics.json`` (:func:`read_report`).

    Returns:
        ``(patient_disjoint, notes)``.

    Examples:
        >>> split_integrity({"protocol": {"patient_disjoint": True, "notes": []}})
        (True, [])
        >>> split_integrity({"protocol": {"patient_disjoint": True}, "folds": [
        ...     {"fold": 1, "protocol": {"patient_disjoint": True, "notes": []}},
        ...     {"fold": 2, "protocol": {"patient_disjoint": False, "notes": ["1 patient "
        ...                                                            "in train and test"]}}]})
        (False, ['fold 2: 1 patient in train and test'])
        >>> split_integrity({"protocol": {"protocol": "official"}})
        (None, [])
    """
    protocol = report.get("protocol")
    protocol = protocol if isinstance(protocol, Mapping) else {}
    folds = report.get("folds")
    folds = [f for f in folds if isinstance(f, Mapping)] if isinstance(folds, list) else []
    if folds and all(isinstance(f.get("protocol"), Mapping) for f in folds):
        values = [f["protocol"].get("patient_disjoint") for f in folds]
        if protocol.get("patient_disjoint") is False:
            values.append(False)
        notes = [f"fold {f.get('fold', i)}: {note}" for i, f in enumerate(folds)
                 for note in f["protocol"].get("notes") or []]
        return _all_true(values), notes
    return _all_true([protocol.get("patient_disjoint")]), [str(n) for n in
                                                           protocol.get("notes") or []]


def render_markdown(report: Mapping[str, Any]) -> str:
    """Render a report (one evaluation or a cross-validation) as Markdown.

    Under the protocol, a report that is not patient-disjoint says so
    (``- patient-disjoint: **no**``), and the notes of its split(s) are listed (a
    cross-validation's prefixed with their fold): see :func:`split_integrity`.
    """
    lines = [f"# {report.get('title', 'BreaKHis evaluation')}", ""]
    protocol = report.get("protocol", {})
    task = report.get("task", {})
    lines += [
        f"- task: **{task.get('name', '?')}** ({task.get('description', '')})",
        f"- protocol: **{protocol.get('protocol', '?')}**: "
        f"{protocol.get('protocol_description', '')}",
    ]
    disjoint, notes = split_integrity(report)
    if disjoint is False:
        lines.append("- patient-disjoint: **no** (test images may be of patients the model "
                     "was trained on: optimistic, not comparable with patient-disjoint results)")
    if notes:
        lines.append("- split notes:")
        lines += [f"  - {note}" for note in notes]
    for key in ("model", "data_root", "synthetic"):
        if key in report:
            lines.append(f"- {key}: {report[key]}")
    trained = report.get("epochs_trained")
    model = report.get("model")
    planned = model.get("epochs") if isinstance(model, Mapping) else None
    if isinstance(trained, int) and isinstance(planned, int):
        # a report of a run cut short read like a finished one (the JSON and `table` said it)
        lines.append(f"- epochs trained: {trained} of {planned}" + (
            " (**unfinished**: a run cut short or still training)" if trained < planned else ""))
    lines.append("")
    if "summary" in report:
        lines += ["## Mean ± std over folds (percent)", "", "| metric | mean | std | folds |",
                  "|---|---|---|---|"]
        for key, stat in report["summary"].items():
            lines.append(f"| {key} | {_fmt(stat['mean'])} | {_fmt(stat['std'])} | {stat['n']} |")
        lines.append("")
        lines += ["## Per fold (percent)", "", "| fold | " + " | ".join(SUMMARY_METRICS) + " |",
                  "|---" * (len(SUMMARY_METRICS) + 1) + "|"]
        for i, fold in enumerate(report.get("folds", [])):
            metrics = fold.get("metrics", fold)
            lines.append(f"| {fold.get('fold', i)} | "
                         + " | ".join(_fmt(metrics.get(k)) for k in SUMMARY_METRICS) + " |")
        lines.append("")
    metrics = report.get("metrics")
    if metrics:
        lines += ["## Metrics (percent)", "", "| metric | value |", "|---|---|"]
        for key in ("images", "patients"):
            lines.append(f"| {key} | {metrics.get(key)} |")
        for key in SUMMARY_METRICS:
            lines.append(f"| {key} | {_fmt(metrics.get(key))} |")
        lines += ["", "| class | precision | recall | F1 | support |", "|---|---|---|---|---|"]
        for name, row in metrics["per_class"].items():
            lines.append(f"| {name} | {_fmt(row['precision'])} | {_fmt(row['recall'])} | "
                         f"{_fmt(row['f1'])} | {row['support']} |")
        classes = metrics["classes"]
        lines += ["", "Confusion matrix (rows: true, columns: predicted)", "",
                  "| | " + " | ".join(classes) + " |", "|---" * (len(classes) + 1) + "|"]
        for name, row in zip(classes, metrics["confusion_matrix"]):
            lines.append(f"| {name} | " + " | ".join(str(v) for v in row) + " |")
        lines.append("")
    return "\n".join(lines)


def write_report(
    report: Mapping[str, Any], out_dir: str | os.PathLike[str], stem: str = "metrics"
) -> tuple[Path, Path]:
    """Write ``report`` as ``<stem>.json`` and ``<stem>.md`` in ``out_dir``.

    Each file is written atomically (:func:`breakhis._files.atomic_writer`: a
    temporary file beside it, renamed over it when complete, with the permissions of a
    new file): a process killed meanwhile leaves the previous file whole, never a
    report cut short. :func:`read_report` reads the JSON back. The Markdown is written
    first and the JSON last, so that a JSON in place means both files are this report
    (``cv --resume`` reuses a fold by its JSON; a kill between the two left it beside an
    older or missing Markdown).

    Returns:
        The two paths.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / f"{stem}.json", out / f"{stem}.md"
    for path, text in ((md_path, render_markdown(report)),
                       (json_path, json.dumps(report, indent=2, default=str) + "\n")):
        with atomic_writer(path, "w") as handle:
            handle.write(text)
    return json_path, md_path


class ReportError(ValueError):
    """A file that :func:`read_report` cannot take for a report.

    The message names the file; ``path`` is the file and ``reason`` what is wrong,
    without the file: the JSON parser's (or decoder's) error for a file that does not
    parse (``"JSONDecodeError: Expecting value: line 1 column 1 (char 0)"``), else the
    end of the message (``"expected a JSON object, but it holds a list"``).
    """

    def __init__(self, path: Path, message: str, reason: str) -> None:
        super().__init__(f"{str(path)!r} is not a breakhis report: {message}")
        self.path = path
        self.reason = reason


def read_report(
    path: str | os.PathLike[str], required: Sequence[str] = ()
) -> dict[str, Any]:
    """A JSON report (e.g. written by :func:`write_report`) as a dict.

    Args:
        path: the ``.json`` file.
        required: entries the report must have.

    Raises:
        ReportError: (a :class:`ValueError`) naming the file, when it is empty, cut
            short, not UTF-8, not a JSON object, or lacks one of ``required``.
        OSError: when it cannot be read (it names the file too).

    Examples:
        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / "r.json"
        >>> _ = path.write_text('{"fold": 0}')
        >>> read_report(path, ["fold"])
        {'fold': 0}
        >>> try:
        ...     read_report(path, ["fold", "metrics"])
        ... except ReportError as err:
        ...     print(err.reason)
        expected the entries ['fold', 'metrics'], but it lacks ['metrics']
    """
    src = Path(path)
    try:
        report = json.loads(src.read_text(encoding="utf-8"))
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise ReportError(src, f"expected a JSON object, but it does not parse as JSON ({exc})",
                          f"{type(exc).__name__}: {exc}") from exc
    if not isinstance(report, dict):
        reason = f"expected a JSON object, but it holds a {type(report).__name__}"
        raise ReportError(src, reason, reason)
    missing = [key for key in required if key not in report]
    if missing:
        reason = f"expected the entries {list(required)}, but it lacks {missing}"
        raise ReportError(src, reason, reason)
    return report


@dataclass
class Predictions:
    """Per-image predictions of one evaluation, as read back by :func:`read_predictions`.

    Args:
        paths: image paths.
        patients: patient id per image (``None`` when unknown).
        magnifications: magnification per image (``None`` when unknown).
        y_true: true class index per image, shape ``(N,)``; ``-1`` where unknown
            (e.g. the output of ``breakhis-repro predict``).
        probs: class probabilities, shape ``(N, C)``.
        classes: class names, in the order of the columns of ``probs``.
    """

    paths: list[str]
    patients: list[str | None]
    magnifications: list[int | None]
    y_true: np.ndarray
    probs: np.ndarray
    classes: list[str]

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def y_pred(self) -> np.ndarray:
        """Predicted class index per image (arg max of ``probs``)."""
        return self.probs.argmax(axis=1)


def write_predictions(
    path: str | os.PathLike[str],
    records: Sequence[Any],
    y_true: Sequence[int] | np.ndarray,
    probs: np.ndarray,
    classes: Sequence[str],
) -> Path:
    """Write one CSV row per image: what it is, what it should be, what the model said.

    Columns: ``path, patient, magnification, true_label, true_index, predicted_label``
    and ``prob_<class>`` for every class. Probabilities are written with Python's
    shortest round-trip ``repr``, so metrics recomputed from the file are identical.
    Unknown patients, magnifications and true classes are left empty. A path that is
    not valid UTF-8 has its undecodable bytes written as ``\\xNN`` escapes
    (:func:`csv_path`). The file is
    written atomically, as :func:`write_report` writes its files.

    Args:
        path: CSV path (its folder is created).
        records: :class:`~breakhis.data.ImageRecord` objects, or anything with a
            ``path`` (and optionally ``patient``, ``magnification``), or plain paths.
        y_true: true class index per image; ``-1`` where it is unknown.
        probs: class probabilities, shape ``(N, C)`` with ``C == len(classes)``.
        classes: class names.

    Returns:
        The path written.

    Raises:
        ValueError: on mismatched lengths or shapes.

    Examples:
        >>> import tempfile
        >>> out = Path(tempfile.mkdtemp()) / "p.csv"
        >>> _ = write_predictions(out, ["a.png", "b.png"], [0, 1],
        ...                       np.array([[0.9, 0.1], [0.3, 0.7]]), ["benign", "malignant"])
        >>> p = read_predictions(out)
        >>> p.classes, p.y_true.tolist(), p.y_pred.tolist()
        (['benign', 'malignant'], [0, 1], [0, 1])
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    if probs.shape != (len(records), len(classes)) or len(y_true) != len(records):
        raise ValueError(
            f"expected {len(records)} targets and probs of shape ({len(records)}, "
            f"{len(classes)}), but got {len(y_true)} targets and probs {probs.shape}"
        )
    if y_true.size and not (-1 <= y_true.min() and y_true.max() < len(classes)):
        raise ValueError(f"expected targets in [-1, {len(classes) - 1}] (-1: unknown), but "
                         f"got values from {y_true.min()} to {y_true.max()}")
    out = Path(path)
    with atomic_writer(out, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([*_PRED_COLUMNS, *[_PROB_PREFIX + c for c in classes]])
        for record, target, row in zip(records, y_true.tolist(), probs):
            patient = getattr(record, "patient", None)
            mag = getattr(record, "magnification", None)
            writer.writerow([
                csv_path(str(getattr(record, "path", record))),
                "" if patient is None else patient,
                "" if mag is None else mag,
                *(("", "") if target < 0 else (classes[target], target)),
                classes[int(row.argmax())],
                *[repr(float(v)) for v in row],
            ])
    return out


def csv_path(path: str | os.PathLike[str]) -> str:
    """``path`` as text that a UTF-8 CSV can hold (the ``path`` column of
    :func:`write_predictions`).

    A file name that is not valid UTF-8 (Latin-1 names copied from another system)
    reaches Python with surrogate escapes, which no CSV writer can encode: its
    undecodable bytes are written as ``\\xNN`` escapes instead (``caf\\xe9.png``).

    Examples:
        >>> csv_path(os.fsdecode(b"caf\\xe9.png")) == "caf\\\\xe9.png"
        True
        >>> csv_path(Path("café.png"))
        'café.png'
    """
    text = os.fspath(path)
    if isinstance(text, bytes):
        text = os.fsdecode(text)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return os.fsencode(text).decode("utf-8", "backslashreplace")
    return text


def read_predictions(path: str | os.PathLike[str]) -> Predictions:
    """Read a CSV written by :func:`write_predictions` (e.g. ``test_predictions.csv``,
    or the output of ``breakhis-repro predict``, whose true classes are unknown: ``-1``).

    Raises:
        FileNotFoundError: when the file does not exist.
        ValueError: when its header lacks the expected columns or a row is malformed.
    """
    src = Path(path)
    if not src.is_file():
        raise FileNotFoundError(f"predictions file {str(src)!r} does not exist")
    with src.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        header = list(reader.fieldnames or [])
        classes = [h[len(_PROB_PREFIX):] for h in header if h.startswith(_PROB_PREFIX)]
        missing = [c for c in _PRED_COLUMNS if c not in header]
        if missing or not classes:
            raise ValueError(
                f"expected columns {list(_PRED_COLUMNS)} and prob_<class> in {str(src)!r}, "
                f"but got {header}"
            )
        paths, patients, mags, y_true, probs = [], [], [], [], []
        for line, row in enumerate(reader, start=2):
            try:
                y_true.append(int(row["true_index"]) if row["true_index"] else -1)
                probs.append([float(row[_PROB_PREFIX + c]) for c in classes])
            except (TypeError, ValueError) as exc:
                raise ValueError(f"{src}:{line}: malformed row ({exc})") from exc
            if not all(math.isfinite(v) for v in probs[-1]):
                raise ValueError(f"{src}:{line}: expected finite class probabilities, but got {probs[-1]}")
            paths.append(row["path"])
            patients.append(row["patient"] or None)
            mags.append(int(row["magnification"]) if row["magnification"] else None)
    return Predictions(paths, patients, mags, np.asarray(y_true, dtype=np.int64),
                       np.asarray(probs, dtype=np.float64).reshape(len(paths), len(classes)),
                       classes)
