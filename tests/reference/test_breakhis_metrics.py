"""Metrics against scikit-learn and hand-computed values; reports on disk."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, f1_score, precision_score, recall_score, roc_auc_score

from breakhis.evaluate import (
    check_finite_probs,
    classification_metrics,
    patient_recognition_rate,
    read_predictions,
    render_markdown,
    split_integrity,
    summarize_folds,
    write_predictions,
    write_report,
)


def _probs(rng: np.random.Generator, n: int, c: int) -> np.ndarray:
    logits = rng.normal(size=(n, c))
    return np.exp(logits) / np.exp(logits).sum(1, keepdims=True)


class TestPatientRecognitionRate:
    def test_hand_computed(self) -> None:
        # patient a: 1/2, patient b: 3/3, patient c: 0/1 -> (0.5 + 1 + 0) / 3
        y_true = [0, 0, 1, 1, 1, 0]
        y_pred = [0, 1, 1, 1, 1, 1]
        patients = ["a", "a", "b", "b", "b", "c"]
        assert patient_recognition_rate(y_true, y_pred, patients) == pytest.approx(0.5)

    def test_differs_from_image_accuracy(self) -> None:
        y_true = [0] * 9 + [1]
        y_pred = [0] * 9 + [0]
        patients = ["a"] * 9 + ["b"]
        assert patient_recognition_rate(y_true, y_pred, patients) == pytest.approx(0.5)

    def test_exceptions(self) -> None:
        with pytest.raises(ValueError, match="expected equal lengths"):
            patient_recognition_rate([0, 1], [0], ["a", "b"])
        with pytest.raises(ValueError, match="at least one image"):
            patient_recognition_rate([], [], [])


class TestClassificationMetrics:
    def test_binary_against_sklearn(self) -> None:
        rng = np.random.default_rng(0)
        y = rng.integers(0, 2, 50)
        p = _probs(rng, 50, 2)
        patients = [str(i % 7) for i in range(50)]
        m = classification_metrics(y, p, ["benign", "malignant"], patients=patients)
        pred = p.argmax(1)
        assert m["accuracy"] == pytest.approx(np.mean(pred == y))
        assert m["roc_auc"] == pytest.approx(roc_auc_score(y, p[:, 1]))
        assert m["per_class"]["malignant"]["precision"] == pytest.approx(precision_score(y, pred))
        benign_recall = recall_score(y, pred, pos_label=0)
        assert m["per_class"]["benign"]["recall"] == pytest.approx(benign_recall)
        cm = np.asarray(m["confusion_matrix"])
        assert cm.sum() == 50 and np.trace(cm) == np.sum(pred == y)
        assert cm[1, 0] == np.sum((y == 1) & (pred == 0))
        assert m["patients"] == 7

    def test_no_image_is_refused(self) -> None:
        # before: numpy's "cannot reshape array of size 0 into shape (0,newaxis)"
        with pytest.raises(ValueError, match="expected at least one image to score, but got none"):
            classification_metrics([], np.zeros((0, 2)), ["a", "b"], patients=[])
        with pytest.raises(ValueError, match="expected at least one image to score, but got none"):
            classification_metrics([], [], ["a", "b"])
        check_finite_probs(np.zeros((0, 2)))  # nothing to check, no error

    def test_balanced_accuracy_on_imbalanced_classes(self) -> None:
        # 40 benign, 10 malignant: balanced accuracy differs from accuracy here.
        rng = np.random.default_rng(3)
        y = np.array([0] * 40 + [1] * 10)
        p = _probs(rng, 50, 2)
        m = classification_metrics(y, p, ["benign", "malignant"])
        pred = p.argmax(1)
        assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred))
        assert m["balanced_accuracy"] != pytest.approx(m["accuracy"])

    @pytest.mark.parametrize("y, pred", [([1, 1, 1], [1, 1, 1]), ([0, 0, 0, 0], [0, 1, 0, 1]),
                                         ([1, 1, 0, 0], [1, 1, 1, 1])])
    def test_balanced_accuracy_of_one_class_folds_warns_nothing(
        self, y: list[int], pred: list[int], recwarn: pytest.WarningsRecorder
    ) -> None:
        """sklearn's "A single label was found in 'y_true' and 'y_pred'" leaked from
        single-class test folds."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            expected = balanced_accuracy_score(y, pred)
        recwarn.clear()
        m = classification_metrics(y, np.eye(2)[pred], ["benign", "malignant"])
        assert [str(w.message) for w in recwarn] == []
        assert m["balanced_accuracy"] == pytest.approx(expected)

    def test_multiclass_ovr_macro_against_sklearn(self) -> None:
        rng = np.random.default_rng(1)
        y = np.tile(np.arange(8), 10)
        p = _probs(rng, 80, 8)
        m = classification_metrics(y, p, list("ABCDEFGH"))
        expected = roc_auc_score(y, p, multi_class="ovr", average="macro")
        assert m["roc_auc"] == pytest.approx(expected)
        assert m["macro_f1"] == pytest.approx(f1_score(y, p.argmax(1), average="macro"))
        assert m["roc_auc_kind"] == "one-vs-rest macro"

    def test_missing_class_left_out_of_auc(self) -> None:
        y = np.array([0, 0, 1, 1])
        p = np.array([[0.8, 0.1, 0.1], [0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.3, 0.3, 0.4]])
        m = classification_metrics(y, p, ["x", "y", "z"])
        assert m["roc_auc_classes"] == ["x", "y"]
        # x: both positives above both negatives -> 1; y: one tie at 0.3 -> 3.5 / 4
        assert m["roc_auc"] == pytest.approx((1.0 + 0.875) / 2)
        assert m["per_class"]["z"]["support"] == 0

    @pytest.mark.parametrize("seed", range(4))
    def test_macro_f1_over_true_or_predicted_classes(self, seed: int) -> None:
        # classes 2 and 3 never occur in the truth; the model predicts class 2 anyway
        rng = np.random.default_rng(seed)
        y = rng.integers(0, 2, size=30)
        pred = rng.integers(0, 3, size=30)
        pred[0] = 2
        m = classification_metrics(y, np.eye(4)[pred], ["a", "b", "c", "d"])
        assert m["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro"))
        assert m["macro_f1_classes"] == ["a", "b", "c"]  # "d": neither true nor predicted

    def test_macro_f1_counts_a_predicted_absent_class_as_zero(self) -> None:
        m = classification_metrics([0, 0, 1, 1], np.eye(3)[[0, 2, 1, 1]], ["a", "b", "c"])
        # F1: a = 2/3, b = 1, c (predicted once, never true) = 0
        assert m["macro_f1"] == pytest.approx((2 / 3 + 1 + 0) / 3)

    def test_unknown_patient_gives_no_patient_rate(self) -> None:
        probs = np.eye(2)[[0, 1, 1, 0]]
        m = classification_metrics([0, 1, 0, 0], probs, ["b", "m"],
                                   patients=["p1", "p1", None, ""])
        assert m["patient_recognition_rate"] is None
        assert m["patients"] == 1 and m["images_without_patient"] == 2
        full = classification_metrics([0, 1, 0, 0], probs, ["b", "m"],
                                      patients=["p1", "p1", "p2", "p2"])
        assert full["patient_recognition_rate"] == pytest.approx(0.75)
        assert full["images_without_patient"] == 0

    def test_single_class_auc_is_none(self) -> None:
        m = classification_metrics([1, 1], np.array([[0.2, 0.8], [0.6, 0.4]]), ["b", "m"])
        assert m["roc_auc"] is None and m["accuracy"] == 0.5

    def test_single_class_multiclass_auc_is_none(self) -> None:
        """A 3-class fold whose truth is one class: no class has positives and negatives."""
        p = np.array([[0.2, 0.5, 0.3], [0.6, 0.3, 0.1], [0.1, 0.1, 0.8]])
        m = classification_metrics([1, 1, 1], p, ["x", "y", "z"])
        assert m["roc_auc"] is None and m["roc_auc_classes"] == []
        assert m["roc_auc_kind"] == "one-vs-rest macro"
        assert m["accuracy"] == pytest.approx(1 / 3)

    def test_multiclass_auc_is_unweighted_over_imbalanced_classes(self) -> None:
        """Macro: each class's one-vs-rest AUC counts once, whatever its support."""
        rng = np.random.default_rng(7)
        y = np.array([0] * 60 + [1] * 15 + [2] * 5)
        p = _probs(rng, 80, 3)
        p[y == 2] = p[y == 2][:, [1, 0, 2]]  # class-dependent scores: AUCs differ by class
        m = classification_metrics(y, p, ["a", "b", "c"])
        expected = roc_auc_score(y, p, multi_class="ovr", average="macro")
        assert m["roc_auc"] == pytest.approx(expected)
        weighted = roc_auc_score(y, p, multi_class="ovr", average="weighted")
        assert abs(expected - weighted) > 1e-3  # the two averages are told apart here
        assert m["roc_auc_classes"] == ["a", "b", "c"]

    def test_precision_of_a_class_never_predicted_is_zero(self) -> None:
        # class "c" occurs in the truth but is never predicted: precision 0/0 -> 0
        y = [0, 1, 2, 2]
        pred = [0, 1, 1, 0]
        m = classification_metrics(y, np.eye(3)[pred], ["a", "b", "c"])
        expected = precision_score(y, pred, labels=[0, 1, 2], average=None, zero_division=0)
        assert [m["per_class"][c]["precision"] for c in "abc"] == pytest.approx(expected.tolist())
        assert m["per_class"]["c"]["precision"] == 0.0 and m["per_class"]["c"]["recall"] == 0.0
        assert m["per_class"]["c"]["f1"] == 0.0

    def test_shape_checked(self) -> None:
        with pytest.raises(ValueError, match=r"expected probs of shape \(2, 3\)"):
            classification_metrics([0, 1], np.zeros((2, 2)), ["a", "b", "c"])


    @pytest.mark.parametrize(("y_true", "bad", "hint"), [
        ([0, 1, 2, -1], "[-1] for 1 of 4", True),  # a predict row: no ground truth
        ([0, 1, 2, 7], "[7] for 1 of 4", False),
        ([-1, -1, 3, 0], "[-1, 3] for 3 of 4", True),
    ])
    def test_targets_outside_the_classes_are_refused(self, y_true: list[int], bad: str,
                                                     hint: bool) -> None:
        probs = np.eye(3)[[0, 1, 2, 2]]
        with pytest.raises(ValueError, match=r"expected targets in \[0, C-1\] = \[0, 2\]") as info:
            classification_metrics(y_true, probs, ["a", "b", "c"], patients=list("pqrs"))
        assert f"but got {bad} images" in str(info.value)
        assert ("without ground truth" in str(info.value)) == hint

    def test_one_image_outside_the_classes_is_counted_in_the_singular(self) -> None:
        with pytest.raises(ValueError, match=r"but got \[7\] for 1 of 1 image$"):
            classification_metrics([7], np.eye(3)[[0]], ["a", "b", "c"])

    @pytest.mark.parametrize("bad", [np.nan, np.inf])
    def test_scores_that_are_not_finite_are_refused_naming_the_images(self, bad: float) -> None:
        """A NaN row was scored as a prediction of the first class (argmax), and the AUC
        failed with scikit-learn's "Input contains NaN", which names no image."""
        probs = _probs(np.random.default_rng(1), 6, 2)
        probs[[1, 4]] = bad
        with pytest.raises(ValueError, match=r"^expected finite class probabilities, but the scores "
                           r"of 2 of 6 images are NaN or infinite: image 1, image 4$"):
            classification_metrics([0, 1, 0, 1, 0, 1], probs, ["b", "m"])

    def test_predictions_file_with_a_score_that_is_not_a_number_is_refused(self, tmp_path: Path) -> None:
        path = tmp_path / "p.csv"
        write_predictions(path, ["a.png", "b.png"], [0, 1], np.array([[0.9, 0.1], [0.2, 0.8]]), ["b", "m"])
        text = path.read_text().splitlines()
        path.write_text("\n".join([*text[:2], text[2].replace("0.8", "nan")]) + "\n")
        with pytest.raises(ValueError, match=rf"^{path}:3: expected finite class probabilities, "
                           r"but got \[0\.2, nan\]$"):
            read_predictions(path)

    def test_paths_that_are_not_utf8_are_written_escaped(self, tmp_path: Path) -> None:
        """write_predictions (evaluate's too, not only predict's) could not encode a path
        with a surrogate-escaped byte (a Latin-1 file name): UnicodeEncodeError."""
        path = tmp_path / "p.csv"
        latin1 = Path(os.fsdecode(b"/data/caf\xe9.png"))
        write_predictions(path, [SimpleNamespace(path=latin1, patient=None, magnification=None),
                                 "plain.png"],
                          [0, 1], np.array([[0.9, 0.1], [0.2, 0.8]]), ["b", "m"])
        assert read_predictions(path).paths == ["/data/caf\\xe9.png", "plain.png"]

    def test_predict_output_is_refused(self, tmp_path: Path) -> None:
        path = tmp_path / "p.csv"
        write_predictions(path, [SimpleNamespace(path=Path(f"{i}.png"), patient=None,
                                                 magnification=None) for i in range(2)],
                          np.full(2, -1), np.array([[0.3, 0.7], [0.6, 0.4]]), ["b", "m"])
        pred = read_predictions(path)
        with pytest.raises(ValueError, match=r"but got \[-1\] for 2 of 2 images; -1 marks"):
            classification_metrics(pred.y_true, pred.probs, pred.classes)


class TestSummaryAndReports:
    def test_mean_std_over_folds(self) -> None:
        folds = [{"accuracy": a, "roc_auc": r} for a, r in ((0.9, 0.95), (0.8, None), (0.7, 0.85))]
        s = summarize_folds(folds)
        assert s["accuracy"]["mean"] == pytest.approx(0.8)
        assert s["accuracy"]["std"] == pytest.approx(np.std([0.9, 0.8, 0.7], ddof=1))
        assert s["roc_auc"]["n"] == 2 and s["roc_auc"]["mean"] == pytest.approx(0.9)
        assert "macro_f1" not in s

    def test_write_report(self, tmp_path: Path) -> None:
        metrics = classification_metrics([0, 1, 1], np.array([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3]]),
                                         ["benign", "malignant"], patients=["a", "b", "b"])
        report = {"task": {"name": "MIBC", "description": "binary"},
                  "protocol": {"protocol": "patient", "protocol_description": "patient-level"},
                  "metrics": metrics}
        import breakhis.evaluate as evaluate_module

        written, writer = [], evaluate_module.atomic_writer

        def recording(path, *args, **kwargs):
            written.append(Path(path).name)
            return writer(path, *args, **kwargs)

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(evaluate_module, "atomic_writer", recording)
            json_path, md_path = write_report(report, tmp_path, "r")
        assert written == ["r.md", "r.json"]  # the JSON last: in place, both are this report
        assert json.loads(json_path.read_text())["metrics"]["accuracy"] == pytest.approx(2 / 3)
        text = md_path.read_text()
        assert "protocol: **patient**" in text and "| accuracy | 66.67 |" in text
        assert "| malignant | 1 | 1 |" in render_markdown(report)

    def test_markdown_says_when_a_split_is_not_patient_disjoint(self) -> None:
        """A fold that put a patient in train and test, or left images out, was reported
        in the JSON only; a cv summary's protocol was fold 1's."""
        def protocol(disjoint: bool | None, notes: list[str]) -> dict:
            out = {"protocol": "official", "protocol_description": "official folds",
                   "patient_disjoint": disjoint, "notes": notes}
            return out if disjoint is not None else {k: out[k] for k in list(out)[:2]}

        leak, left = "2 patients in train and test, e.g. ['p1', 'p2']", "4 images left out"
        fold = {"title": "fold 3", "protocol": protocol(False, [leak])}
        text = render_markdown(fold)
        assert "- patient-disjoint: **no** (test images may be of patients" in text
        assert f"- split notes:\n  - {leak}\n" in text
        # a summary: every fold's notes, with its number; its own protocol (fold 1's in
        # summaries written before) does not hide fold 3's
        summary = {"title": "cv", "protocol": protocol(True, []), "summary": {},
                   "folds": [{"fold": 1, "protocol": protocol(True, [left])},
                             {"fold": 3, "protocol": protocol(False, [leak])}]}
        assert split_integrity(summary) == (False, [f"fold 1: {left}", f"fold 3: {leak}"])
        text = render_markdown(summary)
        assert "- patient-disjoint: **no**" in text
        assert f"  - fold 1: {left}\n  - fold 3: {leak}\n" in text
        clean = {**summary, "folds": [{"fold": 1, "protocol": protocol(True, [left])}]}
        assert split_integrity(clean) == (True, [f"fold 1: {left}"])
        # the summary's own protocol saying "no" is not outvoted by clean folds
        dissent = {**clean, "protocol": protocol(False, [])}
        assert split_integrity(dissent) == (False, [f"fold 1: {left}"])
        assert "- patient-disjoint: **no**" in render_markdown(dissent)
        assert "patient-disjoint" not in render_markdown(clean)
        # reports written before patient_disjoint was recorded: unknown, not "no"
        old = {"title": "old", "protocol": protocol(None, [])}
        assert split_integrity(old) == (None, [])
        assert split_integrity({**summary, "folds": [{"fold": 1, "protocol": protocol(None, [])}]}
                               ) == (None, [])
        assert "patient-disjoint" not in render_markdown(old)
        assert "split notes" not in render_markdown(old)
