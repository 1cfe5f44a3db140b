"""Figures and tables: test_predictions.csv, ROC, t-SNE, Grad-CAM, the results table, CLI.

Two tiny cross-validations on the synthetic tree (``tiny`` backbone, 32-pixel inputs)
give real run folders and checkpoints; everything else is checked against
scikit-learn and captum called directly, and Grad-CAM once more against its
definition written with autograd.
"""

from __future__ import annotations

import csv
import errno
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from _disk import fill_the_disk, lock_folder
from sklearn.metrics import roc_auc_score

from breakhis.checkpoint import NotACheckpointError, load_checkpoint, save_checkpoint
from breakhis.cli import build_parser, main
from breakhis.data import index_breakhis
from breakhis.dataset import build_eval_transform, load_rgb
from breakhis.evaluate import (
    PREDICTIONS_FILE,
    classification_metrics,
    read_predictions,
    roc_auc,
    write_predictions,
)
from breakhis.experiments import checkpoint_records, evaluate_checkpoint
from breakhis.models import TinyBackbone, build_network
from breakhis.plots import (
    RESULTS_COLUMNS,
    check_figures_folder,
    embeddings,
    gradcam,
    make_figures,
    plot_gradcam,
    plot_roc,
    plot_tsne,
    results_rows,
    results_table,
)
from breakhis.train import load_model, predict_probs

pytest.importorskip("bilinearpool")
pytest.importorskip("captum")
pytest.importorskip("matplotlib")

TINY = ["--backbone", "tiny", "--no-pretrained", "--input-size", "32", "--batch-size", "8",
        "--lr", "0.05", "--momentum", "0.9", "--plateau-patience", "1", "--no-progress"]
SIZE = 32


@pytest.fixture(scope="module")
def runs(synth_tree, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A binary patient-protocol CV and a fine-grained image-protocol CV, two folds each."""
    root, _ = synth_tree
    base = tmp_path_factory.mktemp("figure-runs")
    out = {"binary": base / "msbc-patient", "fine": base / "msfc-image"}
    assert main(["cv", "--data-root", str(root), "--task", "MSBC", "--magnification", "40",
                 "--protocol", "patient", "--n-splits", "2", "--epochs", "3", *TINY,
                 "--out", str(out["binary"])]) == 0
    assert main(["cv", "--data-root", str(root), "--task", "MSFC", "--magnification", "100",
                 "--protocol", "image", "--n-splits", "2", "--epochs", "2", *TINY,
                 "--out", str(out["fine"])]) == 0
    return out


def _assert_png(path: Path, *, min_side: int = 200) -> None:
    assert Path(path).is_file(), path
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert min(image.size) >= min_side, image.size
        image.verify()


class TestPredictionsCsv:
    def test_fold_run_writes_it_and_it_round_trips(self, runs) -> None:
        fold = runs["binary"] / "fold0"
        report = json.loads((fold / "test_metrics.json").read_text())
        pred = read_predictions(fold / PREDICTIONS_FILE)
        assert len(pred) == report["metrics"]["images"]
        assert pred.classes == report["metrics"]["classes"] == ["benign", "malignant"]
        assert set(pred.magnifications) == {40} and all(pred.patients)
        again = classification_metrics(pred.y_true, pred.probs, pred.classes,
                                       patients=pred.patients)
        assert again == report["metrics"]  # probabilities are written exactly
        with (fold / PREDICTIONS_FILE).open(newline="") as handle:
            rows = list(csv.DictReader(handle))
        assert list(rows[0]) == ["path", "patient", "magnification", "true_label",
                                 "true_index", "predicted_label", "prob_benign",
                                 "prob_malignant"]
        for row, y, p in zip(rows, pred.y_true, pred.probs):
            assert row["true_label"] == pred.classes[y]
            assert row["predicted_label"] == pred.classes[int(p.argmax())]
            assert Path(row["path"]).is_file()

    def test_evaluate_checkpoint_writes_the_same(self, runs, tmp_path: Path) -> None:
        fold = runs["fine"] / "fold1"
        evaluate_checkpoint(fold / "checkpoint.pt", out_dir=tmp_path, device="cpu",
                            progress=False)
        a, b = read_predictions(tmp_path / PREDICTIONS_FILE), read_predictions(
            fold / PREDICTIONS_FILE)
        assert a.paths == b.paths and a.classes == b.classes and len(a.classes) == 8
        np.testing.assert_allclose(a.probs, b.probs, rtol=0, atol=1e-6)

    def test_exact_round_trip_and_unknown_fields(self, tmp_path: Path) -> None:
        rng = np.random.default_rng(0)
        probs = rng.dirichlet(np.ones(3), size=5)
        y = np.array([0, 2, 1, 1, 0])
        write_predictions(tmp_path / "p.csv", [f"img{i}.png" for i in range(5)], y, probs,
                          ["a", "b,c", "d"])
        back = read_predictions(tmp_path / "p.csv")
        assert back.classes == ["a", "b,c", "d"] and back.paths[1] == "img1.png"
        assert back.patients == [None] * 5 and back.magnifications == [None] * 5
        np.testing.assert_array_equal(back.probs, probs)
        np.testing.assert_array_equal(back.y_true, y)

    def test_exceptions(self, tmp_path: Path) -> None:
        with pytest.raises(FileNotFoundError, match="does not exist"):
            read_predictions(tmp_path / "none.csv")
        (tmp_path / "bad.csv").write_text("path,predicted,p_a\nx.png,a,1.0\n")
        with pytest.raises(ValueError, match="expected columns"):
            read_predictions(tmp_path / "bad.csv")
        with pytest.raises(ValueError, match=r"probs of shape \(2, 2\)"):
            write_predictions(tmp_path / "p.csv", ["a", "b"], [0, 1], np.ones((2, 3)), ["a", "b"])


class TestPlotRoc:
    def test_binary_matches_sklearn(self, tmp_path: Path) -> None:
        rng = np.random.default_rng(1)
        y = rng.integers(0, 2, 60)
        p1 = np.clip(0.3 * y + rng.random(60) * 0.7, 0, 1)
        probs = np.stack([1 - p1, p1], axis=1)
        r = plot_roc(y, probs, ["benign", "malignant"], tmp_path / "roc.png", title="MIBC")
        assert list(r["auc"]) == ["malignant"] and r["skipped"] == []
        assert r["auc"]["malignant"] == pytest.approx(roc_auc_score(y, p1), abs=1e-12)
        assert r["roc_auc"] == pytest.approx(roc_auc(y, probs)[0], abs=1e-12)
        _assert_png(r["path"])

    def test_multiclass_matches_sklearn(self, tmp_path: Path) -> None:
        rng = np.random.default_rng(2)
        y = np.arange(45) % 3
        probs = rng.dirichlet(np.ones(3), size=45) + np.eye(3)[y] * 0.3
        probs /= probs.sum(axis=1, keepdims=True)
        r = plot_roc(y, probs, ["x", "y", "z"], tmp_path / "roc.png")
        for c, name in enumerate("xyz"):
            assert r["auc"][name] == pytest.approx(roc_auc_score(y == c, probs[:, c]), abs=1e-12)
        expected = roc_auc_score(y, probs, multi_class="ovr", average="macro")
        assert r["roc_auc"] == pytest.approx(expected, abs=1e-12)
        _assert_png(r["path"])

    def test_macro_average_keeps_vertical_steps(self) -> None:
        """The macro-average curve was np.interp over curves with tied rates (np.interp's
        points must increase; at a tie it gives one of the values): a curve's vertical
        step was drawn as a slope. Checked against the curves evaluated point by point."""
        from sklearn.metrics import roc_curve

        from breakhis.plots import _macro_roc

        rng = np.random.default_rng(5)
        y = np.arange(60) % 3
        scores = rng.integers(0, 4, size=(60, 3)) + np.eye(3)[y] * 2  # few values: ties, steps
        curves = [roc_curve(y == c, scores[:, c], drop_intermediate=False)[:2] for c in range(3)]
        assert any((f[1:] == f[:-1]).any() for f, _ in curves)  # vertical steps there

        def at(fpr, tpr, x, side):  # the curve's value just left/right of x, by hand
            on = [t for f, t in zip(fpr, tpr) if f == x]
            if on:
                return min(on) if side == "left" else max(on)
            i = max(k for k in range(len(fpr)) if fpr[k] < x)
            j = min(k for k in range(len(fpr)) if fpr[k] > x)
            return tpr[i] + (tpr[j] - tpr[i]) * (x - fpr[i]) / (fpr[j] - fpr[i])

        x, mean = _macro_roc(curves)
        grid = sorted({float(f) for fpr, _ in curves for f in fpr})
        assert x.tolist() == [g for g in grid for _ in range(2)]
        expected = [np.mean([at(f, t, g, side) for f, t in curves]) for g in grid for side in ("left", "right")]
        assert mean == pytest.approx(expected, abs=1e-12)

    def test_class_missing_from_y_true_is_skipped(self, tmp_path: Path) -> None:
        rng = np.random.default_rng(3)
        y = np.array([0, 1, 3] * 10)
        probs = rng.dirichlet(np.ones(4), size=30)
        r = plot_roc(y, probs, ["A", "F", "PT", "TA"], tmp_path / "roc.png")
        assert r["skipped"] == ["PT"] and list(r["auc"]) == ["A", "F", "TA"]
        for c, name in ((0, "A"), (1, "F"), (3, "TA")):
            assert r["auc"][name] == pytest.approx(roc_auc_score(y == c, probs[:, c]),
                                                   abs=1e-12)
        auc, used = roc_auc(y, probs)
        assert used == [0, 1, 3] and r["roc_auc"] == pytest.approx(auc, abs=1e-12)
        _assert_png(r["path"])

    def test_single_class_binary_has_no_curve(self, tmp_path: Path) -> None:
        r = plot_roc([1, 1, 1], np.full((3, 2), 0.5), ["benign", "malignant"],
                     tmp_path / "roc.png")
        assert r["auc"] == {} and r["roc_auc"] is None and r["skipped"] == ["malignant"]
        _assert_png(r["path"])

    def test_no_image_is_refused(self, tmp_path: Path) -> None:
        # before: numpy's "cannot reshape array of size 0 into shape (0,newaxis)"
        with pytest.raises(ValueError, match="expected at least one image for a ROC curve"):
            plot_roc([], np.zeros((0, 2)), ["benign", "malignant"], tmp_path / "roc.png")
        with pytest.raises(ValueError, match="expected at least one image for a ROC curve"):
            plot_roc([], [], ["benign", "malignant"], tmp_path / "roc.png")
        assert not (tmp_path / "roc.png").exists()

    def test_scores_that_are_not_finite_are_refused(self, tmp_path: Path) -> None:
        with pytest.raises(ValueError, match=r"the scores of 1 of 3 images are NaN or infinite: image 2$"):
            plot_roc([0, 1, 1], np.array([[0.9, 0.1], [0.2, 0.8], [np.nan, np.nan]]),
                     ["benign", "malignant"], tmp_path / "roc.png")
        assert not (tmp_path / "roc.png").exists()

    def test_exceptions(self, tmp_path: Path) -> None:
        with pytest.raises(ValueError, match=r"expected probs of shape \(3, 2\)"):
            plot_roc([0, 1, 0], np.ones((3, 3)), ["a", "b"], tmp_path / "r.png")
        with pytest.raises(ValueError, match=r"y_true in \[0, 2\)"):
            plot_roc([0, 1, 2], np.ones((3, 2)), ["a", "b"], tmp_path / "r.png")

    @pytest.mark.parametrize("raised", ["bare", "under another error"])
    def test_a_full_disk_names_the_figure(self, raised: str, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
        """savefig on a full disk raised "[Errno 28] No space left on device" without
        the path of the figure."""
        _fill_savefig(monkeypatch, raised)
        path = tmp_path / "roc.png"
        with pytest.raises(OSError) as info:
            plot_roc([0, 1, 0], np.full((3, 2), 0.5), ["a", "b"], path)
        assert info.value.errno == errno.ENOSPC and info.value.filename == str(path)
        assert str(info.value) == f"[Errno 28] No space left on device: {str(path)!r}"


def _fill_savefig(monkeypatch: pytest.MonkeyPatch, raised: str) -> None:
    """Make matplotlib's ``savefig`` fail as on a full disk: an ``OSError(ENOSPC)`` that
    names no file, ``"bare"`` or ``"under another error"`` raised while handling it."""
    from matplotlib.figure import Figure

    def full(*args: object, **kwargs: object) -> None:
        error = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        if raised == "bare":
            raise error
        try:
            raise error
        except OSError:
            raise RuntimeError("the writer gave up")  # raised over it, as torch.save

    monkeypatch.setattr(Figure, "savefig", full)


class TestTsne:
    def test_cardinality_and_pca(self, tmp_path: Path) -> None:
        rng = np.random.default_rng(4)
        labels = np.arange(40) % 4
        emb = rng.normal(size=(40, 80)) + labels[:, None]
        r = plot_tsne(emb, labels, list("abcd"), tmp_path / "tsne.png", seed=3)
        assert r["coords"].shape == (40, 2) and np.isfinite(r["coords"]).all()
        assert r["perplexity"] == pytest.approx(13.0) and r["pca_components"] == 40
        np.testing.assert_array_equal(np.load(r["coords_path"]), r["coords"])
        _assert_png(r["path"])
        again = plot_tsne(emb, labels, list("abcd"), tmp_path / "again.png", seed=3)
        np.testing.assert_allclose(again["coords"], r["coords"])

    @pytest.mark.parametrize("n", [3, 5])
    def test_perplexity_clamped_for_small_sets(self, tmp_path: Path, n: int) -> None:
        r = plot_tsne(np.random.default_rng(n).normal(size=(n, 8)), np.arange(n) % 2,
                      ["a", "b"], tmp_path / "tsne.png", perplexity=30.0)
        assert r["perplexity"] == pytest.approx((n - 1) / 3) and r["pca_components"] is None
        assert r["coords"].shape == (n, 2) and np.isfinite(r["coords"]).all()

    def test_exceptions(self, tmp_path: Path) -> None:
        with pytest.raises(ValueError, match="at least 3 embeddings, but got 2"):
            plot_tsne(np.zeros((2, 4)), [0, 1], ["a", "b"], tmp_path / "t.png")
        with pytest.raises(ValueError, match="expected 4 labels"):
            plot_tsne(np.zeros((4, 4)), [0, 1], ["a", "b"], tmp_path / "t.png")
        with pytest.raises(ValueError, match="perplexity must be > 0"):
            plot_tsne(np.zeros((4, 4)), [0, 1, 0, 1], ["a", "b"], tmp_path / "t.png",
                      perplexity=0)

    def test_embeddings_are_forward_embedding(self, runs) -> None:
        model, _ = load_model(runs["binary"] / "fold0" / "checkpoint.pt")
        records, _, _ = checkpoint_records(runs["binary"] / "fold0" / "checkpoint.pt")
        emb = embeddings(model, records[:5], input_size=SIZE, batch_size=2)
        assert emb.shape == (5, model.embedding_dim) and emb.dtype == np.float32
        x = torch.stack([build_eval_transform(SIZE)(load_rgb(r.path)) for r in records[:5]])
        with torch.no_grad():
            np.testing.assert_allclose(emb, model.forward_embedding(x).numpy(), atol=1e-6)
        with pytest.raises(TypeError, match="forward_embedding"):
            embeddings(torch.nn.Linear(2, 2), records[:2], input_size=SIZE)

    def test_wide_embeddings_are_projected_batch_by_batch(self, runs) -> None:
        from sklearn.random_projection import SparseRandomProjection

        model, _ = load_model(runs["binary"] / "fold0" / "checkpoint.pt")
        records, _, _ = checkpoint_records(runs["binary"] / "fold0" / "checkpoint.pt")
        full = embeddings(model, records[:6], input_size=SIZE)
        small = embeddings(model, records[:6], input_size=SIZE, batch_size=4, max_dim=64,
                           seed=2)
        expected = SparseRandomProjection(n_components=64, random_state=2).fit_transform(full)
        assert small.shape == (6, 64) and small.dtype == np.float32
        np.testing.assert_allclose(small, expected, rtol=1e-4, atol=1e-6)
        kept = embeddings(model, records[:2], input_size=SIZE, max_dim=model.embedding_dim)
        assert kept.shape == (2, model.embedding_dim)
        with pytest.raises(ValueError, match="max_dim must be >= 2"):
            embeddings(model, records[:2], input_size=SIZE, max_dim=1)


def _gradcam_by_hand(model: torch.nn.Module, x: torch.Tensor, target: int) -> torch.Tensor:
    """Grad-CAM from its definition: ReLU(sum_k mean(dy/dA_k) A_k), upsampled, max 1."""
    feats: dict[str, torch.Tensor] = {}
    hook = model.gradcam_layer.register_forward_hook(lambda m, i, o: feats.update(a=o))
    try:
        logits = model(x)
    finally:
        hook.remove()
    grad = torch.autograd.grad(logits[0, target], feats["a"])[0]
    cam = F.relu((grad.mean(dim=(2, 3), keepdim=True) * feats["a"]).sum(1, keepdim=True))
    up = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[0, 0]
    return (up / up.max()).detach()


def _two_stream_gradcam_by_hand(model: torch.nn.Module, x: torch.Tensor,
                                target: int) -> torch.Tensor:
    """Grad-CAM of both streams' maps taken together, from the definition with autograd:
    ReLU(sum_s up(sum_k mean(dy/dA^s_k) A^s_k)), up = bilinear to the input size (as
    captum's LayerAttribution.interpolate: F.interpolate, align_corners=False), max 1."""
    feats: list[torch.Tensor] = []
    hooks = [layer.register_forward_hook(lambda m, i, o: feats.append(o))
             for layer in (model.backbone, model.backbone_b)]
    try:
        logits = model(x)
    finally:
        for hook in hooks:
            hook.remove()
    assert len(feats) == 2 and feats[0].shape != feats[1].shape
    for a in feats:
        a.retain_grad()
    logits[0, target].backward()
    cam = sum(
        F.interpolate((a.grad.mean(dim=(2, 3), keepdim=True) * a).sum(1, keepdim=True),
                      size=x.shape[-2:], mode="bilinear", align_corners=False)
        for a in feats
    )
    cam = F.relu(cam)[0, 0]
    return (cam / cam.max()).detach()


def _two_stream_model() -> torch.nn.Module:
    """A BCNN whose streams differ in channels (8, 5) and map size (8x8, 4x4 at 32 px)."""
    from bilinearpool import BCNN

    torch.manual_seed(0)
    second = torch.nn.Sequential(torch.nn.Conv2d(3, 5, 3, stride=8, padding=1),
                                 torch.nn.ReLU())
    return BCNN(TinyBackbone(out_channels=8), second, num_classes=3).eval()


class TestGradcam:
    def test_trained_model_maps(self, runs) -> None:
        ckpt = runs["binary"] / "fold0" / "checkpoint.pt"
        model, _ = load_model(ckpt)
        records, _, _ = checkpoint_records(ckpt)
        heat, pred = gradcam(model, records[:6], input_size=SIZE, batch_size=4)
        assert heat.shape == (6, SIZE, SIZE) and heat.dtype == np.float32
        assert np.isfinite(heat).all() and heat.min() >= 0 and heat.max() <= 1
        assert (heat.max(axis=(1, 2)) == 1).all()  # every map has signal, scaled to 1
        probs = predict_probs(model, records[:6], input_size=SIZE)
        np.testing.assert_array_equal(pred, probs.argmax(axis=1))

    def test_equals_captum_and_the_definition(self, runs) -> None:
        from captum.attr import LayerAttribution, LayerGradCam

        ckpt = runs["fine"] / "fold0" / "checkpoint.pt"
        model, _ = load_model(ckpt)
        records, _, _ = checkpoint_records(ckpt)
        x = build_eval_transform(SIZE)(load_rgb(records[0].path))[None]
        for target in (0, 5):
            heat, _ = gradcam(model, [records[0]], [target], input_size=SIZE)
            attr = LayerGradCam(model, model.gradcam_layer).attribute(
                x, target=target, relu_attributions=True)
            direct = LayerAttribution.interpolate(attr, (SIZE, SIZE), "bilinear")[0, 0]
            direct = (direct / direct.max()).detach().numpy()
            np.testing.assert_allclose(heat[0], direct, atol=1e-5)
            np.testing.assert_allclose(heat[0], _gradcam_by_hand(model, x, target).numpy(),
                                       atol=1e-5)

    def test_two_streams_equal_the_definition(self) -> None:
        model = _two_stream_model()
        assert len(model.gradcam_layers) == 2
        x = torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
        for target in (0, 2):
            heat, _ = gradcam(model, x, [target] * 3, input_size=SIZE, batch_size=2)
            assert heat.shape == (3, SIZE, SIZE) and (heat.max(axis=(1, 2)) == 1).all()
            for i in range(3):
                expected = _two_stream_gradcam_by_hand(model, x[i:i + 1], target)
                np.testing.assert_allclose(heat[i], expected.numpy(), atol=1e-5)

    def test_second_stream_counts(self) -> None:
        from captum.attr import LayerAttribution, LayerGradCam

        model = _two_stream_model()
        x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
        heat, pred = gradcam(model, x, input_size=SIZE)
        attr = LayerGradCam(model, model.gradcam_layer).attribute(
            x, target=torch.as_tensor(pred), relu_attributions=True)
        first = LayerAttribution.interpolate(attr, (SIZE, SIZE), "bilinear")[:, 0].detach()
        first = (first / first.amax(dim=(1, 2), keepdim=True)).numpy()
        assert np.abs(heat - first).max() > 0.1  # the second stream changes the map

    def test_model_with_only_gradcam_layer(self) -> None:
        class OneLayer(torch.nn.Module):  # a model written before gradcam_layers
            def __init__(self, inner: torch.nn.Module) -> None:
                super().__init__()
                self.inner = inner

            @property
            def gradcam_layer(self) -> torch.nn.Module:
                return self.inner.gradcam_layer

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return self.inner(x)

        torch.manual_seed(0)
        inner = build_network("fast-bcnn", "tiny", num_classes=2)
        x = torch.randn(2, 3, SIZE, SIZE)
        heat, pred = gradcam(OneLayer(inner), x, input_size=SIZE)
        again, pred_again = gradcam(inner, x, input_size=SIZE)
        np.testing.assert_array_equal(heat, again)
        np.testing.assert_array_equal(pred, pred_again)

    def test_all_zero_map_stays_zero(self) -> None:
        torch.manual_seed(0)
        model = build_network("plain", "tiny", num_classes=2).eval()
        torch.nn.init.zeros_(model.classifier.weight)  # no gradient reaches the features
        heat, pred = gradcam(model, torch.randn(2, 3, SIZE, SIZE), input_size=SIZE)
        assert np.isfinite(heat).all() and (heat == 0).all() and pred.shape == (2,)

    def test_exceptions(self, tmp_path: Path) -> None:
        model = build_network("fast-bcnn", "tiny", num_classes=2)
        with pytest.raises(ValueError, match=r"shape \(N, 3, 32, 32\), but got \(2, 3, 16, 16\)"):
            gradcam(model, torch.randn(2, 3, 16, 16), input_size=SIZE)
        with pytest.raises(ValueError, match="expected 2 targets"):
            gradcam(model, torch.randn(2, 3, SIZE, SIZE), [0], input_size=SIZE)
        with pytest.raises(TypeError, match="gradcam_layer"):
            gradcam(torch.nn.Conv2d(3, 2, 1), torch.randn(1, 3, SIZE, SIZE), input_size=SIZE)
        with pytest.raises(ValueError, match=r"heatmaps of shape \(2, H, W\)"):
            plot_gradcam([np.zeros((4, 4, 3))] * 2, np.zeros((2, 4)), [0, 1], [0, 1],
                         ["a", "b"], tmp_path / "g.png")
        # before: "expected heatmaps of shape (0, H, W) ... but got (0, 8, 8)"
        with pytest.raises(ValueError, match="^expected at least one image for a Grad-CAM "
                           "grid, but got none$"):
            plot_gradcam([], np.zeros((0, 8, 8)), [], None, ["a", "b"], tmp_path / "g.png")

    def test_plot_gradcam(self, tmp_path: Path) -> None:
        images = [np.full((SIZE, SIZE, 3), 200, dtype=np.uint8)] * 3
        path = plot_gradcam(images, np.random.default_rng(0).random((3, SIZE, SIZE)), None,
                            [0, 1, 1], ["benign", "malignant"], tmp_path / "g.png")
        _assert_png(path)


class TestMakeFigures:
    def test_writes_figures_and_summary(self, runs, tmp_path: Path) -> None:
        ckpt = runs["binary"] / "fold0" / "checkpoint.pt"
        records, targets, source = checkpoint_records(ckpt)
        result = make_figures(ckpt, records, tmp_path, source=source, gradcam_images=4)
        for name in ("roc.png", "tsne.png", "gradcam.png"):
            _assert_png(tmp_path / name)
        saved = json.loads((tmp_path / "figures.json").read_text())
        assert saved["checkpoint"] == str(ckpt) and saved["synthetic"] is True
        assert saved["protocol"]["protocol"] == "patient" and saved["split"] == "test"
        assert saved["images"] == len(records) and saved["fold"] == 0
        metrics = json.loads((ckpt.parent / "test_metrics.json").read_text())["metrics"]
        assert saved["roc"]["roc_auc"] == pytest.approx(metrics["roc_auc"], abs=1e-9)
        assert saved["accuracy"] == pytest.approx(metrics["accuracy"])
        assert saved["tsne"]["perplexity"] == pytest.approx(min(30.0, (len(records) - 1) / 3))
        assert np.load(saved["tsne"]["coords_path"]).shape == (len(records), 2)
        assert saved["tsne"]["embedding_dim"] == 256 and saved["tsne"]["projected_dim"] is None
        assert sorted(set(saved["gradcam"]["true"])) == ["benign", "malignant"]
        assert len(saved["gradcam"]["images"]) == 4
        # two per class, of two patients where the class has them (the grid showed the
        # first patients' images only)
        patient_of = {str(r.path): r.patient for r in records}
        for label in ("benign", "malignant"):
            shown = {patient_of[p] for p, t in zip(saved["gradcam"]["images"],
                                                   saved["gradcam"]["true"]) if t == label}
            available = {r.patient for r in records if r.label == label}
            assert len(available) >= 2 and len(shown) == 2, (label, shown, available)
        assert result["roc"] == saved["roc"]

    def test_unfinished_checkpoint_warns_and_says_so(self, runs, tmp_path: Path) -> None:
        """figures drew a checkpoint cut short without a word about it."""
        state = load_checkpoint(runs["binary"] / "fold0" / "checkpoint.pt")
        assert state["epoch"] == 2
        state["config"]["epochs"] = 7  # as a run of 7 epochs killed after the third
        ckpt = save_checkpoint(state, tmp_path / "cut" / "checkpoint.pt")
        records, _, source = checkpoint_records(ckpt)
        with pytest.warns(UserWarning, match="trained 3 of its 7 epochs"):
            result = make_figures(ckpt, records, tmp_path / "fig", source=source,
                                  gradcam_images=0, max_embedding_dim=32)
        saved = json.loads((tmp_path / "fig" / "figures.json").read_text())
        assert saved["epochs_trained"] == result["epochs_trained"] == 3
        assert saved["model"]["epochs"] == 7

    def test_exceptions(self, runs, tmp_path: Path) -> None:
        ckpt = runs["binary"] / "fold0" / "checkpoint.pt"
        records, _, _ = checkpoint_records(ckpt)
        with pytest.raises(ValueError, match="at least 3 images"):
            make_figures(ckpt, records[:2], tmp_path)
        # before: AttributeError: 'PosixPath' object has no attribute 'label'
        with pytest.raises(TypeError, match=r"records must be ImageRecords .* but got a PosixPath"):
            make_figures(ckpt, [r.path for r in records[:3]], tmp_path)
        with pytest.raises(ValueError, match="split must be one of"):
            checkpoint_records(ckpt, split="val")

    def test_bad_arguments_are_refused_before_the_model_loads(
        self, runs, tmp_path: Path
    ) -> None:
        """seed -1 failed in scikit-learn's PCA after prediction; an out_dir that is a
        file failed with FileExistsError after the model was loaded."""
        records, _, _ = checkpoint_records(runs["binary"] / "fold0" / "checkpoint.pt")
        none = tmp_path / "none.pt"  # never read: the arguments fail first
        (tmp_path / "afile").write_text("")
        for kwargs, message in [
            ({"seed": -1}, r"seed must be an integer in \[0, 4294967295\].*but got -1"),
            ({"seed": 2**32}, "but got 4294967296"),
            ({"seed": 1.5}, "but got 1.5"),
            ({"perplexity": 0.0}, "perplexity must be > 0"),
            ({"max_embedding_dim": 1}, "max_embedding_dim must be >= 2"),
            ({"gradcam_images": -1}, "gradcam_images must be an integer >= 0, but got -1"),
            ({"gradcam_images": 1.5}, "gradcam_images must be an integer >= 0, but got 1.5"),
            ({"out_dir": tmp_path / "afile"}, r"^out_dir expects a folder .* is a file"),
            ({"out_dir": tmp_path / "afile" / "x"}, "a folder above"),
            # failed in torch's DataLoader after the model was loaded and the data indexed
            ({"batch_size": 0}, r"^batch_size must be an integer >= 1, but got 0$"),
            # failed at the very end, the earlier figures deleted by then
            ({"out_dir": tmp_path / "clash"}, r"^out_dir expects a folder whose figure files the "
             rf"figures can replace, but '{tmp_path / 'clash' / 'figures.json'}' is a folder"),
        ]:
            with pytest.raises(ValueError, match=message):
                if "clash" in str(kwargs.get("out_dir")):
                    (tmp_path / "clash" / "figures.json").mkdir(parents=True, exist_ok=True)
                make_figures(none, records[:4], **{"out_dir": tmp_path / "fig", **kwargs})
        assert not (tmp_path / "fig").exists()

    def test_another_runs_folder_is_refused_before_the_model_loads(
        self, runs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
    ) -> None:
        """figures --out another fold's folder wrote figures.json beside a checkpoint they
        were not made from, and --out a cv folder put one run's figures among its folds;
        evaluate refused both."""
        import breakhis.train as train_module

        ckpt = runs["binary"] / "fold0" / "checkpoint.pt"
        records, _, _ = checkpoint_records(ckpt)
        other, cv = runs["binary"] / "fold1", runs["binary"]
        before = {folder: sorted(p.name for p in folder.iterdir()) for folder in (other, cv)}

        def not_now(*args, **kwargs):
            raise AssertionError("the model was loaded before the folder was checked")

        monkeypatch.setattr(train_module, "load_model", not_now)
        for out, tail in [
            (other, f"it holds {str(other / 'checkpoint.pt')!r}, another run's checkpoint, beside "
                    "which they would be taken for that run's; choose another --out (a new folder)"),
            (cv, "it holds cv_metrics.json: a cross-validation's folder, not one run's; choose "
                 "another --out (a new folder)"),
        ]:
            head = (f"cannot write the figures of checkpoint {str(ckpt)!r} into {str(out)!r}: "
                    "expected a new folder or the checkpoint's own, but ")
            with pytest.raises(ValueError) as info:
                make_figures(ckpt, records[:4], out)
            assert str(info.value) == head + tail
            assert main(["figures", "--checkpoint", str(ckpt), "--out", str(out), "--device", "cpu",
                         "--no-progress"]) == 2
            assert head + tail in capsys.readouterr().err
        assert {folder: sorted(p.name for p in folder.iterdir()) for folder in (other, cv)} == before
        check_figures_folder(ckpt, ckpt.parent)  # its own folder, and a new one, are fine
        check_figures_folder(ckpt, tmp_path / "new")

    def test_images_of_another_magnification_are_refused(self, runs, synth_tree, tmp_path: Path) -> None:
        """A 40X checkpoint drew 100X images without a word, titled "... at 40X, fold 0"."""
        ckpt = runs["binary"] / "fold0" / "checkpoint.pt"
        assert load_checkpoint(ckpt)["extra"]["task"]["magnification"] == 40
        others = [r for r in index_breakhis(synth_tree[0]).records if r.magnification == 100][:4]
        with pytest.raises(ValueError, match=r"^expected the images of the MSBC at 40X checkpoint .*, but "
                           r"got 4 images at 100X among the 4 records$"):
            make_figures(ckpt, others, tmp_path / "fig", gradcam_images=0)
        assert not (tmp_path / "fig").exists()

    def test_rerun_leaves_only_its_own_figures(self, runs, tmp_path: Path) -> None:
        """A second run with gradcam_images=0 left the first run's gradcam.png behind."""
        ckpt = runs["binary"] / "fold0" / "checkpoint.pt"
        records, _, source = checkpoint_records(ckpt)
        (tmp_path / "notes.txt").write_text("mine")
        make_figures(ckpt, records[:6], tmp_path, source=source, gradcam_images=2,
                     max_embedding_dim=32)
        assert (tmp_path / "gradcam.png").is_file()
        result = make_figures(ckpt, records[:6], tmp_path, source=source, gradcam_images=0,
                              max_embedding_dim=32)
        assert result["gradcam"] is None
        assert json.loads((tmp_path / "figures.json").read_text())["gradcam"] is None
        # other files stay; no hidden work folder is left behind
        assert sorted(p.name for p in tmp_path.iterdir()) == [
            "figures.json", "notes.txt", "roc.png", "tsne.png", "tsne_coords.npy"]
        assert result["roc"]["path"] == str(tmp_path / "roc.png")
        assert result["tsne"]["coords_path"] == str(tmp_path / "tsne_coords.npy")

    def test_figure_named_files_of_no_earlier_run_are_refused(self, runs, tmp_path: Path, capsys) -> None:
        """A user's gradcam.png in --out (no figures.json: no figures run made it) was
        removed by a run with --gradcam-images 0, and a roc.png would have been replaced
        (helper-142)."""
        ckpt = runs["binary"] / "fold0" / "checkpoint.pt"
        records, _, source = checkpoint_records(ckpt)
        (tmp_path / "gradcam.png").write_bytes(b"mine")
        (tmp_path / "roc.png").write_bytes(b"mine too")
        with pytest.raises(ValueError, match=rf"^out_dir expects a folder without figure files or with an "
                           rf"earlier figures run's \(its figures.json beside them\), but '{tmp_path}' holds "
                           r"roc.png, gradcam.png and no figures.json: files that this run would replace "
                           r"or remove; pass another folder, or move them$"):
            make_figures(ckpt, records[:6], tmp_path, source=source, gradcam_images=0, max_embedding_dim=32)
        assert main(["figures", "--checkpoint", str(ckpt), "--gradcam-images", "0", "--out", str(tmp_path),
                     "--no-progress"]) == 2
        assert "error: --out expects a folder without figure files" in capsys.readouterr().err
        assert sorted(p.name for p in tmp_path.iterdir()) == ["gradcam.png", "roc.png"]
        assert (tmp_path / "gradcam.png").read_bytes() == b"mine"

    def test_a_killed_runs_work_folder_is_removed_by_the_next(
        self, runs, tmp_path: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A run killed while drawing left its .figures-XXXXXXXX.tmp folder for good."""
        ckpt = runs["binary"] / "fold0" / "checkpoint.pt"
        records, _, source = checkpoint_records(ckpt)
        left = tmp_path / ".figures-k2x_9qzt.tmp"
        left.mkdir()
        (left / "roc.png").write_bytes(b"half a figure")
        kept = [".figures-short.tmp", "figures-k2x_9qzt.tmp", ".figures-ab12cd34.tmp.old"]
        for name in kept:
            (tmp_path / name).mkdir()
        (tmp_path / ".figures-ab12cd34.tmp").write_text("a file, not a work folder")
        with caplog.at_level(logging.WARNING, logger="breakhis.plots"):
            make_figures(ckpt, records[:6], tmp_path, source=source, gradcam_images=0,
                         max_embedding_dim=32)
        assert not left.exists()
        assert ".figures-k2x_9qzt.tmp" in caplog.text and "cut short" in caplog.text
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted([
            *kept, ".figures-ab12cd34.tmp", "figures.json", "roc.png", "tsne.png",
            "tsne_coords.npy"])

    def test_failure_leaves_the_earlier_figures_as_they_were(
        self, runs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A run failing in t-SNE had already written its roc.png beside the t-SNE and
        figures.json of another checkpoint."""
        import breakhis.plots as plots

        first, second = (runs[k] / "fold0" / "checkpoint.pt" for k in ("fine", "binary"))
        out = tmp_path / "fig"
        records, _, source = checkpoint_records(first)
        make_figures(first, records[:6], out, source=source, gradcam_images=2,
                     max_embedding_dim=32)
        before = {p.name: p.read_bytes() for p in out.iterdir()}

        def fails(*args: object, **kwargs: object) -> None:
            raise RuntimeError("t-SNE failed")

        monkeypatch.setattr(plots, "plot_tsne", fails)
        records, _, source = checkpoint_records(second)
        for folder in (out, tmp_path / "new"):
            with pytest.raises(RuntimeError, match="t-SNE failed"):
                make_figures(second, records[:6], folder, source=source, gradcam_images=2,
                             max_embedding_dim=32)
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before
        assert json.loads((out / "figures.json").read_text())["checkpoint"] == str(first)
        assert not (tmp_path / "new").exists()  # made by the failed run: removed again
        # and so are the folders above it that it made (they stayed, empty)
        with pytest.raises(RuntimeError, match="t-SNE failed"):
            make_figures(second, records[:6], tmp_path / "a" / "b" / "fig", source=source,
                         gradcam_images=0, max_embedding_dim=32)
        assert not (tmp_path / "a").exists()

    def test_failure_while_moving_the_figures_in_puts_the_earlier_ones_back(
        self, runs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The earlier figures were deleted before the new ones moved in: a failure in
        between (an error, Ctrl-C) left neither run's figures."""
        import breakhis.plots as plots

        first, second = (runs[k] / "fold0" / "checkpoint.pt" for k in ("fine", "binary"))
        out = tmp_path / "fig"
        records, _, source = checkpoint_records(first)
        make_figures(first, records[:6], out, source=source, gradcam_images=2, max_embedding_dim=32)
        before = {p.name: p.read_bytes() for p in out.iterdir()}
        real, calls = os.replace, []

        def interrupted(src: object, dst: object) -> None:
            calls.append(dst)
            if Path(os.fsdecode(dst)) == out / "figures.json" and calls.count(dst) == 1:
                raise KeyboardInterrupt  # the last move in (not the earlier one's way back)
            real(src, dst)

        monkeypatch.setattr(plots.os, "replace", interrupted)
        records, _, source = checkpoint_records(second)
        with pytest.raises(KeyboardInterrupt):
            make_figures(second, records[:6], out, source=source, gradcam_images=0,
                         max_embedding_dim=32)
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before

    def test_a_full_disk_names_the_figure_and_keeps_the_earlier_ones(
        self, runs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A full disk while drawing raised "No space left on device" without a path,
        then named the hidden folder the figures are drawn in (removed by then,
        ``<out_dir>/.figures-XXXXXXXX.tmp/roc.png``): it names the figure in out_dir."""
        ckpt = runs["binary"] / "fold0" / "checkpoint.pt"
        records, _, source = checkpoint_records(ckpt)
        out = tmp_path / "fig"
        make_figures(ckpt, records[:6], out, source=source, gradcam_images=0,
                     max_embedding_dim=32)
        before = {p.name: p.read_bytes() for p in out.iterdir()}
        _fill_savefig(monkeypatch, "bare")
        with pytest.raises(OSError) as info:
            make_figures(ckpt, records[:6], out, source=source, gradcam_images=0,
                         max_embedding_dim=32)
        assert info.value.errno == errno.ENOSPC and info.value.filename == str(out / "roc.png")
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before

    @pytest.mark.parametrize("how", ["read-only folder", "refused writes"])
    def test_out_dir_that_cannot_be_written_is_refused_before_any_work(
        self, how: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]
    ) -> None:
        """An out_dir that could not be written failed only as the first figure was
        drawn: after the data were indexed and every image predicted (minutes on the
        real data)."""
        from breakhis import experiments, train

        locked = tmp_path / "locked"
        locked.mkdir()
        lock_folder(locked, how, monkeypatch)  # made writable again below, whatever fails

        def never(*args: object, **kwargs: object) -> None:
            pytest.fail("the work began before the figures' folder was checked")

        monkeypatch.setattr(experiments, "checkpoint_records", never)
        for name in ("load_model", "predict_probs"):
            monkeypatch.setattr(train, name, never)
        none = tmp_path / "none.pt"  # never read: the folder fails first
        try:
            for out, message in [
                (locked, "expected a folder for the figures that can be written, but "
                         f"writing a file into {str(locked)!r} failed: Permission denied"),
                (locked / "fig", "expected a folder for the figures that can be created, "
                                 f"but {str(locked)!r}, where it would be created, cannot "
                                 "be written"),
            ]:
                with pytest.raises(ValueError) as info:
                    make_figures(none, [tmp_path / f"{i}.png" for i in range(3)], out)
                assert str(info.value) == message
                assert main(["figures", "--checkpoint", str(none), "--out", str(out),
                             "--no-progress"]) == 2
                assert capsys.readouterr().err == f"breakhis-repro figures: error: {message}\n"
            assert list(locked.iterdir()) == []  # nothing created, no probe left
        finally:
            locked.chmod(0o755)


class TestFullDisk:
    """The table and the t-SNE coordinates were written in place: a disk that filled up
    left half a table (the earlier one gone) and an error that named no file."""

    def test_the_table_names_its_file_and_keeps_the_earlier_one(
        self, runs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        out = tmp_path / "t.md"
        results_table([runs["binary"]], out=out)
        before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
        fill_the_disk(monkeypatch)
        with pytest.raises(OSError) as info:
            results_table([runs["binary"], runs["fine"]], out=out)
        monkeypatch.undo()
        assert info.value.errno == errno.ENOSPC and info.value.filename == str(out)
        assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before

    def test_the_tsne_coordinates_name_their_file(self, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
        emb = np.random.default_rng(0).normal(size=(6, 4))
        fill_the_disk(monkeypatch)
        with pytest.raises(OSError) as info:
            plot_tsne(emb, np.arange(6) % 2, ["a", "b"], tmp_path / "tsne.png", seed=0)
        monkeypatch.undo()
        assert info.value.filename == str(tmp_path / "tsne_coords.npy")
        assert sorted(p.name for p in tmp_path.iterdir()) == ["tsne.png"]


class TestResultsTable:
    def test_rows_and_markdown_from_the_json(self, runs, tmp_path: Path) -> None:
        dirs = [runs["binary"], runs["fine"], runs["fine"] / "fold1"]
        text = results_table(dirs, out=tmp_path / "results.md")
        assert (tmp_path / "results.md").read_text() == text
        for folder in dirs[:2]:
            report = json.loads((folder / "cv_metrics.json").read_text())
            acc = report["summary"]["accuracy"]
            assert f"{100 * acc['mean']:.2f} ± {100 * acc['std']:.2f}" in text
            prr = report["summary"]["patient_recognition_rate"]
            assert f"{100 * prr['mean']:.2f} ± {100 * prr['std']:.2f}" in text
        lines = [line for line in text.splitlines() if line.startswith("| ")]
        assert ("| msbc-patient | MSBC 40X | patient | tiny | fast-bcnn | 32 | "
                "random init, 3 ep, lr 0.05, oversampled | 2 |") in lines[1]
        assert "| msfc-image | MSFC 100X | image |" in lines[2]
        assert "1 (fold 1 of 2)" in lines[3] and all(line.endswith("| SYNTHETIC |")
                                                 for line in lines[1:])
        assert "optimistic" in text and "SYNTHETIC:" in text

        with (tmp_path / "results.csv").open(newline="") as handle:
            rows = list(csv.DictReader(handle))
        assert list(rows[0]) == list(RESULTS_COLUMNS) and len(rows) == 3
        assert [r["protocol"] for r in rows] == ["patient", "image", "image"]
        fold = json.loads((dirs[2] / "test_metrics.json").read_text())["metrics"]
        assert float(rows[2]["accuracy_mean"]) == fold["accuracy"]
        assert rows[2]["accuracy_std"] == "" and rows[2]["fold"] == "1"
        assert rows[0]["synthetic"] == "True" and rows[0]["folds"] == "2"
        assert results_rows(dirs)[0]["accuracy_mean"] == float(rows[0]["accuracy_mean"])

    def test_runs_differing_only_in_training_are_told_apart(self, runs, tmp_path: Path) -> None:
        """Two runs of one model, task and protocol but other start weights, learning
        rate or over-sampling gave identical-looking rows; a report written before lr and
        over-sampling were recorded (and one without its model entry) still reads."""
        source = runs["fine"] / "fold1"
        report = json.loads((source / "test_metrics.json").read_text())
        variants = {
            "pretrained": {**report["model"], "weights": "imagenet", "lr": 0.01, "oversample": False},
            "old": {k: v for k, v in report["model"].items() if k not in ("lr", "oversample")},
            "nomodel": None,
        }
        dirs = []
        for name, model in variants.items():
            folder = tmp_path / name
            folder.mkdir()
            changed = dict(report)
            if model is None:
                changed.pop("model")
            else:
                changed["model"] = model
            (folder / "test_metrics.json").write_text(json.dumps(changed))
            dirs.append(folder)
        lines = [line for line in results_table(dirs).splitlines() if line.startswith("| ")][1:]
        epochs = report["model"]["epochs"]
        assert f"| imagenet, {epochs} ep, lr 0.01, not oversampled |" in lines[0]
        assert f"| random init, {epochs} ep |" in lines[1]
        assert "| unknown |" in lines[2]
        assert [r["weights"] for r in results_rows(dirs)] == ["imagenet", None, "unknown"]

    def test_other_differing_settings_are_shown(self, runs, tmp_path: Path) -> None:
        """Runs differing in batch size, seed or augmentation (any recorded setting)
        looked identical; only the settings that differ are named, and a report
        written before they were recorded still reads."""
        source = runs["fine"] / "fold1"
        report = json.loads((source / "test_metrics.json").read_text())
        assert report["model"]["val_fraction"] == 0.1 and report["model"]["momentum"] == 0.9
        variants = {
            "b16": {**report["model"], "batch_size": 16, "augment": False},
            "b32": {**report["model"], "batch_size": 32, "seed": 3, "weight_decay": 1e-4},
            "old": {k: report["model"][k] for k in ("head", "backbone", "weights",
                                                   "se_reduction", "input_size", "epochs",
                                                   "lr", "oversample", "seed")},
        }
        dirs = []
        for name, model in variants.items():
            (tmp_path / name).mkdir()
            (tmp_path / name / "test_metrics.json").write_text(
                json.dumps({**report, "model": model}))
            dirs.append(tmp_path / name)
        lines = [line for line in results_table(dirs).splitlines() if line.startswith("| ")][1:]
        epochs = report["model"]["epochs"]
        base = f"random init, {epochs} ep, lr 0.05, oversampled"
        assert f"| {base}, batch 16, weight decay 0, no augmentation, seed 0 |" in lines[0]
        assert f"| {base}, batch 32, weight decay 0.0001, augmentation, seed 3 |" in lines[1]
        assert f"| {base}, seed 0 |" in lines[2]
        rows = results_rows(dirs)
        assert [r["batch_size"] for r in rows] == [16, 32, None]
        assert all(r["momentum"] in (0.9, None) for r in rows)

    def test_runs_with_other_split_seeds_are_told_apart(self, runs, tmp_path: Path) -> None:
        """Two runs on folds drawn with other split seeds looked identical."""
        report = json.loads((runs["binary"] / "cv_metrics.json").read_text())
        assert report["protocol"]["split_seed"] == 0
        dirs = []
        for seed in (0, 1):
            (tmp_path / f"s{seed}").mkdir()
            changed = {**report, "protocol": {**report["protocol"], "split_seed": seed}}
            (tmp_path / f"s{seed}" / "cv_metrics.json").write_text(json.dumps(changed))
            dirs.append(tmp_path / f"s{seed}")
        text = results_table(dirs, out=tmp_path / "t.md")
        lines = [line for line in text.splitlines() if line.startswith("| ")][1:]
        assert "oversampled, split seed 0 |" in lines[0]
        assert "oversampled, split seed 1 |" in lines[1]
        with (tmp_path / "t.csv").open(newline="") as handle:
            assert [r["split_seed"] for r in csv.DictReader(handle)] == ["0", "1"]
        # one split seed: not named
        assert "split seed" not in results_table([runs["binary"], runs["binary"]])

    def test_epochs_trained_in_rows(self, runs, tmp_path: Path) -> None:
        rows = results_rows([runs["binary"], runs["fine"] / "fold1"])
        assert [r["epochs_trained"] for r in rows] == [3, 2]
        report = json.loads((runs["fine"] / "fold1" / "test_metrics.json").read_text())
        (tmp_path / "cut").mkdir()
        (tmp_path / "cut" / "test_metrics.json").write_text(
            json.dumps({**report, "epochs_trained": 1}))
        old = {k: v for k, v in report.items() if k != "epochs_trained"}
        (tmp_path / "old").mkdir()
        (tmp_path / "old" / "test_metrics.json").write_text(json.dumps(old))
        lines = [line for line in results_table([tmp_path / "cut", tmp_path / "old"])
                 .splitlines() if line.startswith("| ")][1:]
        assert "| random init, 1 of 2 ep, lr 0.05" in lines[0]
        assert "| random init, 2 ep, lr 0.05" in lines[1]  # not recorded: as before

    def test_partial_cv_says_how_many_of_how_many_folds(self, runs, tmp_path: Path) -> None:
        report = json.loads((runs["binary"] / "cv_metrics.json").read_text())
        assert report["protocol"]["n_splits"] == 2
        report["folds"] = report["folds"][:1]  # as `cv --folds 0` writes it
        (tmp_path / "partial").mkdir()
        (tmp_path / "partial" / "cv_metrics.json").write_text(json.dumps(report))
        text = results_table([runs["binary"], tmp_path / "partial"])
        lines = [line for line in text.splitlines() if line.startswith("| ")]
        assert "| 2 |" in lines[1] and "| 1 of 2 |" in lines[2]
        assert results_rows([tmp_path / "partial"])[0]["n_splits"] == 2

    def test_summary_left_stale_by_a_retrained_fold_is_marked(
        self, runs, tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """After `train --fold 0 --out CV/fold0 --resume` with more epochs, `table` showed
        the old cv summary as if it were current."""
        run = tmp_path / "cv"
        shutil.copytree(runs["binary"], run)
        summary = json.loads((run / "cv_metrics.json").read_text())
        for entry in summary["folds"]:
            report = json.loads((run / f"fold{entry['fold']}" / "test_metrics.json").read_text())
            assert entry["checkpoint"] == report["checkpoint"]
        assert "stale:" not in results_table([run]) and results_rows([run])[0]["stale_folds"] == []
        root = json.loads((run / "fold0" / "test_metrics.json").read_text())["data_root"]
        assert main(["train", "--data-root", root, "--task", "MSBC", "--magnification", "40",
                     "--protocol", "patient", "--n-splits", "2", "--epochs", "4", *TINY,
                     "--fold", "0", "--out", str(run / "fold0"), "--resume"]) == 0
        with caplog.at_level(logging.WARNING, logger="breakhis.plots"):
            text = results_table([run], out=tmp_path / "t.md")
        # it said "rerun cv --resume", which refuses a fold trained beyond the summary's 3 epochs
        note = ("stale: fold 0 trained since the summary for more epochs than its --epochs, which cv "
                "--resume refuses at those epochs; rerun cv --resume --epochs 4 (the other folds then "
                "train as far), or run cv afresh in another folder")
        assert note in caplog.text and str(run / "cv_metrics.json") in caplog.text
        assert f"| 2 ({note}) |" in text
        assert results_rows([run])[0]["stale_folds"] == [0]
        with (tmp_path / "t.csv").open(newline="") as handle:
            assert next(csv.DictReader(handle))["stale_folds"] == "0"
        cv = ["cv", "--data-root", root, "--task", "MSBC", "--magnification", "40", "--protocol", "patient",
              "--n-splits", "2", *TINY, "--out", str(run), "--resume"]
        capsys.readouterr()
        assert main([*cv, "--epochs", "3"]) == 2  # as the old advice had it: refused
        assert "checkpoint has already trained 4 epochs, this run asks for epochs=3" in capsys.readouterr().err
        assert main([*cv, "--epochs", "4"]) == 0  # the advice works: fold 0 reused, fold 1 trained on
        assert results_rows([run])[0]["stale"] is None
        assert json.loads((run / "cv_metrics.json").read_text())["epochs_trained"] == 4
        summary = json.loads((run / "cv_metrics.json").read_text())
        # a summary written before it recorded checkpoints: compared by the fold metrics
        old = {**summary, "folds": [{k: v for k, v in e.items() if k != "checkpoint"}
                                    for e in summary["folds"]]}
        (run / "cv_metrics.json").write_text(json.dumps(old))
        fresh = json.loads((run / "fold0" / "test_metrics.json").read_text())
        expected = [0] if fresh["metrics"] != summary["folds"][0]["metrics"] else []
        assert results_rows([run])[0]["stale_folds"] == expected

    def test_fold_checkpoint_trained_beyond_its_new_report_is_marked(self, runs, tmp_path: Path) -> None:
        """A fold retrained with the summary's settings (a new report, 3 epochs), then
        trained on (train --resume --epochs 5) and stopped before its report: the advice
        was `rerun cv --resume`, which refuses the checkpoint's 5 epochs at the summary's 3
        (the report's epochs were compared, not the checkpoint's)."""
        run = tmp_path / "cv"
        shutil.copytree(runs["binary"], run)
        assert json.loads((run / "cv_metrics.json").read_text())["model"]["epochs"] == 3
        report = json.loads((run / "fold0" / "test_metrics.json").read_text())
        report["checkpoint"] = {"epoch": 2, "fingerprint": "0" * 64}  # another run of 3 epochs
        (run / "fold0" / "test_metrics.json").write_text(json.dumps(report))
        assert results_rows([run])[0]["stale"].endswith("; rerun cv --resume")
        state = load_checkpoint(run / "fold0" / "checkpoint.pt")
        state["epoch"] = 4  # then trained on to 5 epochs
        save_checkpoint(state, run / "fold0" / "checkpoint.pt")
        assert results_rows([run])[0]["stale"] == (
            "stale: fold 0 trained since the summary for more epochs than its --epochs, which cv "
            "--resume refuses at those epochs; rerun cv --resume --epochs 5 (the other folds then "
            "train as far), or run cv afresh in another folder")

    def test_fold_changed_without_a_new_report_is_marked(
        self, runs, tmp_path: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A fold retrained since the summary but killed before its report (gone, or
        still the old one) was skipped, and the summary shown as current."""
        run = tmp_path / "cv"
        shutil.copytree(runs["binary"], run)
        state = load_checkpoint(run / "fold0" / "checkpoint.pt")
        state["history"] = state["history"][:1]  # another run's checkpoint
        state["epoch"] = 0
        save_checkpoint(state, run / "fold0" / "checkpoint.pt")
        unfinished = ("stale: fold 0 retrained since the summary without a new "
                      "test_metrics.json (checkpoint.pt differs; retraining interrupted?); "
                      "rerun cv --resume")
        # killed during `train --resume`: the old report is still there
        assert results_rows([run])[0]["stale"] == unfinished
        # killed during a fresh `train`: the old report was removed
        (run / "fold0" / "test_metrics.json").unlink()
        (run / "fold1" / "test_metrics.json").unlink()  # its checkpoint unchanged
        with caplog.at_level(logging.WARNING, logger="breakhis.plots"):
            text = results_table([run], out=tmp_path / "t.md")
        note = ("stale: fold 0 retrained since the summary without a new test_metrics.json "
                "(checkpoint.pt differs; retraining interrupted?); fold 1 lost "
                "test_metrics.json since the summary; rerun cv --resume")
        assert f"| 2 ({note}) |" in text and note in caplog.text
        row = results_rows([run])[0]
        assert row["stale_folds"] == [0, 1] and row["stale"] == note
        with (tmp_path / "t.csv").open(newline="") as handle:
            saved = next(csv.DictReader(handle))
        assert saved["stale_folds"] == "0 1" and saved["stale"] == note
        # a fold without report or checkpoint (cleared by hand) is stale too
        (run / "fold0" / "checkpoint.pt").unlink()
        assert results_rows([run])[0]["stale"] == (
            "stale: folds 0, 1 lost test_metrics.json since the summary; rerun cv --resume")

    def test_fold_retrained_with_other_settings_is_not_sent_to_cv_resume(
        self, runs, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A fold retrained with another seed (`train --overwrite --seed 7` into its
        folder) was marked stale with the hint `rerun cv --resume`, which then refused it."""
        run = tmp_path / "cv"
        shutil.copytree(runs["binary"], run)
        root = json.loads((run / "fold0" / "test_metrics.json").read_text())["data_root"]
        argv = ["--data-root", root, "--task", "MSBC", "--magnification", "40", "--protocol", "patient",
                "--n-splits", "2", "--epochs", "3", *TINY]
        assert main(["train", *argv, "--seed", "7", "--fold", "0", "--out", str(run / "fold0"),
                     "--overwrite"]) == 0
        note = ("stale: fold 0 retrained since the summary with settings other than the summary's, "
                "which cv --resume refuses; retrain such a fold with the summary's settings (then "
                "cv --resume), or run cv afresh in another folder")
        row = results_rows([run])[0]
        assert row["stale"] == note and row["stale_folds"] == [0]
        capsys.readouterr()
        assert main(["cv", *argv, "--out", str(run), "--resume"]) != 0  # the refusal the note foretells
        assert "seed" in capsys.readouterr().err
        # killed before its report: the checkpoint's settings tell
        state = load_checkpoint(run / "fold1" / "checkpoint.pt")
        state["config"]["lr"] = 0.5
        save_checkpoint(state, run / "fold1" / "checkpoint.pt")
        row = results_rows([run])[0]
        assert row["stale_folds"] == [0, 1] and row["stale"].startswith("stale: folds 0, 1 retrained")

    def test_other_settings_are_told_as_cv_resume_tells_them(self, tmp_path: Path, monkeypatch) -> None:
        """`table` compared a fold's settings with a plain `!=`: a weights file spelled
        otherwise, or an old plateau_patience of 0, were "other settings" that cv --resume
        takes; a split seed or validation share of the fold's checkpoint were not compared
        (helper-151)."""
        from breakhis.plots import _stale_folds
        from breakhis.train import CHECKPOINT_FORMAT, TrainConfig, checkpoint_identity

        monkeypatch.chdir(tmp_path)
        (tmp_path / "w.pt").write_bytes(b"weights")
        config = TrainConfig(backbone="resnet18", weights="w.pt", epochs=2, plateau_patience=1).to_dict()
        data = {"val_fraction": 0.1, "split_seed": 0, "protocol": "patient", "n_splits": 5}
        task = {"name": "MSBC", "magnification": 40}
        old = {"format": CHECKPOINT_FORMAT, "epoch": 1, "config": config, "classes": ["a", "b"],
               "extra": {"data": data, "task": task}, "history": []}
        summary = {"summary": {}, "model": {**config, "val_fraction": 0.1}, "task": task,
                   "protocol": {"protocol": "patient", "split_seed": 0, "n_splits": 5},
                   "folds": [{"fold": 0, "checkpoint": checkpoint_identity(old), "metrics": {}}]}
        (tmp_path / "cv" / "fold0").mkdir(parents=True)

        def why(**changes) -> str:
            state = {**old, "epoch": 0, "config": {**config, **changes.get("config", {})},
                     "extra": {"data": {**data, **changes.get("data", {})},
                               "task": {**task, **changes.get("task", {})}}}
            save_checkpoint(state, tmp_path / "cv" / "fold0" / "checkpoint.pt")
            return _stale_folds(tmp_path / "cv", summary)[0]

        assert why() == "unfinished"
        assert why(config={"weights": "./w.pt"}) == "unfinished"  # the same file
        assert why(config={"plateau_patience": 0}) == "unfinished"  # Keras' count, read as 1
        assert why(config={"epochs": 5}) == "unfinished"  # cv --resume may extend a run
        assert why(config={"seed": 7}) == "other settings"
        assert why(data={"val_fraction": 0.3}) == "other settings"
        assert why(data={"split_seed": 5}) == "other settings"
        assert why(data={"n_splits": 10}) == "other settings"
        assert why(data={"protocol": "image"}) == "other settings"
        assert why(task={"magnification": 200}) == "other settings"
        # an old summary's plateau_patience of 0 is today's 1, as the fold's (helper-152)
        summary["model"]["plateau_patience"] = 0
        assert why() == "unfinished"
        # the official protocol without validation draws nothing: its split seed has no effect
        summary["protocol"].update(protocol="official", split_seed=3)
        summary["model"]["val_fraction"] = 0.0
        assert why(data={"protocol": "official", "val_fraction": 0.0}) == "unfinished"
        assert why(data={"protocol": "official", "val_fraction": 0.0, "n_splits": 3}) == "unfinished"

    def test_metric_over_fewer_folds_says_so(self, runs, tmp_path: Path) -> None:
        """The row said 2 folds while a metric's mean was over 1 (None on the other)."""
        from breakhis.evaluate import summarize_folds

        report = json.loads((runs["binary"] / "cv_metrics.json").read_text())
        report["folds"][0]["metrics"]["roc_auc"] = None  # e.g. a fold of one class
        report["summary"] = summarize_folds([f["metrics"] for f in report["folds"]])
        assert report["summary"]["roc_auc"]["n"] == 1
        (tmp_path / "run").mkdir()
        (tmp_path / "run" / "cv_metrics.json").write_text(json.dumps(report))
        text = results_table([tmp_path / "run", runs["binary"]], out=tmp_path / "t.md")
        lines = [line for line in text.splitlines() if line.startswith("| ")]
        auc = report["summary"]["roc_auc"]["mean"]
        acc = report["summary"]["accuracy"]
        assert lines[1].endswith(f"| {100 * auc:.2f} (1 of 2 folds) | SYNTHETIC |")
        assert f"| {100 * acc['mean']:.2f} ± {100 * acc['std']:.2f} |" in lines[1]
        assert "folds)" not in lines[2]  # every metric over both folds
        with (tmp_path / "t.csv").open(newline="") as handle:
            rows = list(csv.DictReader(handle))
        assert [r["roc_auc_n"] for r in rows] == ["1", "2"]
        assert [r["accuracy_n"] for r in rows] == ["2", "2"] and rows[0]["folds"] == "2"
        one = results_rows([runs["fine"] / "fold1"])[0]
        assert one["accuracy_n"] == 1 and one["folds"] == 1

    def test_unreadable_reports_are_named(self, runs, tmp_path: Path) -> None:
        """An empty report said only "Expecting value: line 1 column 1 (char 0)"; a list
        gave an AttributeError."""
        for name, content, message in [("empty", "", "it does not parse as JSON"),
                                       ("cut", '{"protocol": {', "it does not parse as JSON"),
                                       ("list", "[1, 2]", "it holds a list")]:
            (tmp_path / name).mkdir()
            (tmp_path / name / "test_metrics.json").write_text(content)
            path = tmp_path / name / "test_metrics.json"
            with pytest.raises(ValueError, match=rf"'{path}' is not a breakhis report: "
                               rf"expected a JSON object, but {message}"):
                results_table([tmp_path / name])
        run = tmp_path / "cv"  # a fold's report, read for the stale check
        shutil.copytree(runs["binary"], run)
        (run / "fold1" / "test_metrics.json").write_text("")
        with pytest.raises(ValueError, match=rf"'{run / 'fold1' / 'test_metrics.json'}'"):
            results_rows([run])

    def test_a_malformed_cv_summary_is_named(self, runs, tmp_path: Path) -> None:
        """An empty summary gave "max() arg is an empty sequence", an entry without its
        fold count a KeyError traceback."""
        run = tmp_path / "cv"
        shutil.copytree(runs["binary"], run)
        report = json.loads((run / "cv_metrics.json").read_text())
        metric = next(iter(report["summary"]))
        entry = {k: v for k, v in report["summary"][metric].items() if k != "n"}
        for summary, message in [({}, "expected an object of metrics, but got {}"),
                                 ([], "expected an object of metrics, but got []"),
                                 ({**report["summary"], metric: entry},
                                  f"expected mean, std and n for '{metric}'"),
                                 ({**report["summary"], metric: {**entry, "n": "2"}},
                                  f"expected a fold count n >= 0 for '{metric}', but got \"2\"")]:
            (run / "cv_metrics.json").write_text(json.dumps({**report, "summary": summary}))
            with pytest.raises(ValueError) as info:
                results_rows([run])
            assert str(info.value).startswith(f"{run / 'cv_metrics.json'}'s summary {message}")
            assert "`breakhis-repro cv --resume` writes it again" in str(info.value)
        (run / "cv_metrics.json").write_text(json.dumps(report))
        assert results_rows([run])[0]["folds"] == 2

    def test_single_folds_name_their_split_and_data(self, runs, tmp_path: Path) -> None:
        """Single-fold runs of 2 and 5 splits, or of other data folders, looked identical."""
        report = json.loads((runs["fine"] / "fold1" / "test_metrics.json").read_text())
        variants = {"k2": (2, report["data_root"]), "k5": (5, report["data_root"]),
                    "other": (2, "/data/elsewhere")}
        dirs = []
        for name, (n_splits, data_root) in variants.items():
            (tmp_path / name).mkdir()
            changed = {**report, "protocol": {**report["protocol"], "n_splits": n_splits},
                       "data_root": data_root}
            (tmp_path / name / "test_metrics.json").write_text(json.dumps(changed))
            dirs.append(tmp_path / name)
        lines = [line for line in results_table(dirs).splitlines() if line.startswith("| ")][1:]
        assert "oversampled, splits 2 | 1 (fold 1 of 2) |" in lines[0]
        assert "oversampled, splits 5 | 1 (fold 1 of 5) |" in lines[1]
        assert lines[0].endswith(f"| SYNTHETIC ({report['data_root']}) |")
        assert lines[2].endswith("| SYNTHETIC (/data/elsewhere) |")
        assert [r["data_root"] for r in results_rows(dirs)][2] == "/data/elsewhere"
        # one data folder: not named
        assert results_table(dirs[:2]).splitlines()[4].endswith("| SYNTHETIC |")

    def test_exceptions(self, runs, tmp_path: Path) -> None:
        with pytest.raises(ValueError, match=rf"{tmp_path}.*has no metrics: expected "
                           "cv_metrics.json"):
            results_table([runs["binary"], tmp_path])
        with pytest.raises(ValueError, match="at least one run folder"):
            results_table([])
        with pytest.raises(ValueError, match="out is the Markdown file"):
            results_table([runs["binary"]], out=tmp_path / "t.csv")
        # out is checked before any run is read (tmp_path has no metrics)
        with pytest.raises(ValueError, match=rf"but '{tmp_path}' names a folder"):
            results_table([tmp_path], out=tmp_path)
        with pytest.raises(ValueError, match="names a folder"):
            results_table([tmp_path], out=f"{tmp_path / 'new'}/")
        (tmp_path / "t.csv").mkdir()
        with pytest.raises(ValueError, match=r"puts the CSV at .*t.csv', but that is a folder"):
            results_table([tmp_path], out=tmp_path / "t.md")
        (tmp_path / "afile").write_text("")
        with pytest.raises(ValueError, match=rf"^out .* needs a folder for the files, but "
                           rf"'{tmp_path / 'afile'}' is a file"):
            results_table([tmp_path], out=tmp_path / "afile" / "t.md")

    def test_table_out_errors_name_the_option(self, runs, tmp_path: Path, capsys) -> None:
        """The command said 'out is the Markdown file': the library's argument, not --out."""
        assert main(["table", str(runs["binary"]), "--out", str(tmp_path / "t.csv")]) == 2
        assert "breakhis-repro table: error: --out is the Markdown file" in capsys.readouterr().err


class TestCommands:
    def test_figures_and_table(self, runs, tmp_path: Path,
                               capsys: pytest.CaptureFixture[str]) -> None:
        ckpt = runs["fine"] / "fold0" / "checkpoint.pt"
        assert main(["figures", "--checkpoint", str(ckpt), "--gradcam-images", "2",
                     "--max-embedding-dim", "32", "--out", str(tmp_path / "fig"),
                     "--no-progress"]) == 0
        out = capsys.readouterr().out
        assert "image protocol, SYNTHETIC data" in out
        for name in ("roc.png", "tsne.png", "tsne_coords.npy", "gradcam.png", "figures.json"):
            assert str(tmp_path / "fig" / name) in out
            assert (tmp_path / "fig" / name).is_file()
        assert "test images of fold 0 (image protocol" in out and "no test result" not in out
        saved = json.loads((tmp_path / "fig" / "figures.json").read_text())
        assert saved["tsne"]["projected_dim"] == 32 and len(saved["gradcam"]["images"]) == 2
        # every image of the task: not "N all images of fold 0", nor a test result
        assert main(["figures", "--checkpoint", str(ckpt), "--split", "all", "--gradcam-images", "0",
                     "--max-embedding-dim", "32", "--out", str(tmp_path / "all"), "--no-progress"]) == 0
        out = capsys.readouterr().out
        assert " images of the task in every split, model of fold 0 (image protocol" in out
        assert "(with images the model trained on: no test result)" in out
        assert saved["task"]["name"] == "MSFC" and len(saved["roc"]["auc"]) == 8
        md = tmp_path / "tab" / "t.md"
        assert main(["table", str(runs["binary"]), str(runs["fine"]), "--out", str(md)]) == 0
        out = capsys.readouterr().out
        assert f"table: {md}, {md.with_suffix('.csv')}" in out and "| patient |" in out
        assert md.is_file() and md.with_suffix(".csv").is_file()

    @pytest.mark.parametrize("option, value", [("--perplexity", "0"),
                                               ("--max-embedding-dim", "1"),
                                               ("--gradcam-images", "-1"),
                                               ("--batch-size", "0"),
                                               ("--seed", "-1"), ("--seed", "4294967296")])
    def test_figures_checks_options_before_reading_anything(
        self, option: str, value: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        assert main(["figures", "--checkpoint", str(tmp_path / "none.pt"), option, value]) == 2
        err = capsys.readouterr().err
        assert f"error: {option} must be" in err and f"but got {value}" in err
        assert "does not exist" not in err and "max_dim" not in err

    def test_wrong_paths_are_errors_not_tracebacks(
        self, runs, synth_tree, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """table --out FOLDER gave IsADirectoryError, figures --out FILE a FileExistsError
        (after loading the model), a run folder as --checkpoint "does not exist"."""
        assert main(["table", str(runs["binary"]), "--out", str(tmp_path)]) == 2
        assert f"'{tmp_path}' names a folder" in capsys.readouterr().err
        (tmp_path / "afile").write_text("")
        assert main(["figures", "--checkpoint", str(tmp_path / "none.pt"),
                     "--out", str(tmp_path / "afile")]) == 2
        err = capsys.readouterr().err
        assert f"--out expects a folder for the figures, but '{tmp_path / 'afile'}' is a file" \
            in err and "does not exist" not in err  # checked before the checkpoint is read
        (tmp_path / "gone").symlink_to(tmp_path / "nowhere")  # was "File exists", after the model
        assert main(["figures", "--checkpoint", str(tmp_path / "none.pt"), "--out", str(tmp_path / "gone")]) == 2
        assert (f"--out expects a folder for the figures, but '{tmp_path / 'gone'}' is a symbolic link "
                f"to '{tmp_path / 'nowhere'}', which does not exist") in capsys.readouterr().err
        (tmp_path / "empty").mkdir()
        (tmp_path / "empty" / "test_metrics.json").write_text("")
        assert main(["table", str(tmp_path / "empty")]) == 2
        err = capsys.readouterr().err
        assert f"'{tmp_path / 'empty' / 'test_metrics.json'}' is not a breakhis report" in err
        fold = runs["binary"] / "fold0"
        for command in (["figures"], ["evaluate"], ["predict", str(synth_tree[0])]):
            assert main([*command, "--checkpoint", str(fold), "--out",
                         str(tmp_path / "o.csv")]) == 2
            err = capsys.readouterr().err
            assert (f"expected a checkpoint file, but '{fold}' is a folder; pass "
                    f"'{fold / 'checkpoint.pt'}'") in err
        assert main(["figures", "--checkpoint", str(runs["binary"])]) == 2
        assert "is a folder; it holds no checkpoint.pt" in capsys.readouterr().err
        with pytest.raises(NotACheckpointError, match="is a folder"):
            load_checkpoint(fold)

    def test_errors_and_help(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        assert main(["table", str(tmp_path)]) == 2
        assert "has no metrics" in capsys.readouterr().err
        assert main(["figures", "--checkpoint", str(tmp_path / "none.pt")]) == 2
        assert "does not exist" in capsys.readouterr().err
        text = build_parser().format_help()
        assert "figures" in text and "table" in text


def test_numbers_equal_by_value_are_one_setting() -> None:
    from breakhis.plots import _varying

    rows = [{"momentum": 0, "dropout": 0.0}, {"momentum": 0.0, "dropout": 0.5}]
    assert _varying(rows) == [("dropout", "dropout")]


class TestRunNames:
    @staticmethod
    def _fold_copy(runs, folder: Path, note: str) -> Path:
        report = json.loads((runs["fine"] / "fold1" / "test_metrics.json").read_text())
        report["protocol"] = {**report["protocol"], "patient_disjoint": True, "notes": [note]}
        folder.mkdir(parents=True)
        (folder / "test_metrics.json").write_text(json.dumps(report))
        return folder

    def test_folders_of_one_name_are_told_apart(
        self, runs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        """`table cvA/fold0 cvB/fold0` named both rows, and both runs' split notes,
        `fold0`."""
        for cv in ("cvA", "cvB"):
            self._fold_copy(runs, tmp_path / cv / "fold0", f"note of {cv}")
        monkeypatch.chdir(tmp_path)
        assert main(["table", "cvA/fold0", "cvB/fold0", "--out", "t.md"]) == 0
        text = (tmp_path / "t.md").read_text()
        lines = [line for line in text.splitlines() if line.startswith("| ")][1:]
        assert lines[0].startswith("| cvA/fold0 | MSFC 100X |")
        assert lines[1].startswith("| cvB/fold0 | MSFC 100X |")
        assert "- `cvA/fold0`: note of cvA" in text and "- `cvB/fold0`: note of cvB" in text
        assert "Runs: `cvA/fold0` (test_metrics.json), `cvB/fold0` (test_metrics.json)" in text
        with (tmp_path / "t.csv").open(newline="") as handle:
            rows = list(csv.DictReader(handle))
        assert [(r["run"], r["name"]) for r in rows] == [("cvA/fold0", "cvA/fold0"),
                                                        ("cvB/fold0", "cvB/fold0")]
        capsys.readouterr()
        # a lone fold0 stays fold0; one folder given twice (even written two ways) is one
        # run with one name
        assert results_table(["cvA/fold0"]).splitlines()[4].startswith("| fold0 |")
        same = [tmp_path / "cvA" / "fold0", "cvA/fold0", "cvA/../cvA/fold0"]
        assert [r["name"] for r in results_rows(same)] == ["fold0"] * 3
        rows = results_rows([tmp_path / "cvA" / "fold0", "cvB/fold0"])
        assert [(r["run"], r["name"]) for r in rows] == [
            (str(tmp_path / "cvA" / "fold0"), "cvA/fold0"), ("cvB/fold0", "cvB/fold0")]

    def test_deeper_paths_only_as_deep_as_needed(self, runs, tmp_path: Path) -> None:
        dirs = [self._fold_copy(runs, tmp_path / p, p) for p in
                ("x/b/fold0", "y/b/fold0", "y/c/fold0", "y/fold1")]
        assert [r["name"] for r in results_rows(dirs)] == [
            "x/b/fold0", "y/b/fold0", "c/fold0", "fold1"]


class TestFiguresJsonPaths:
    def test_paths_are_absolute_whatever_the_working_directory(
        self, runs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """figures.json named its figures relative to the working directory of the run
        (`fig/roc.png`), its checkpoint absolute: read from anywhere else, the figure
        paths pointed nowhere."""
        ckpt = runs["binary"] / "fold0" / "checkpoint.pt"
        records, _, source = checkpoint_records(ckpt)
        (tmp_path / "work").mkdir()
        monkeypatch.chdir(tmp_path / "work")
        result = make_figures(ckpt, records[:6], Path("..") / "fig", source=source,
                              gradcam_images=2, max_embedding_dim=32)
        monkeypatch.chdir(runs["binary"])  # the reader is elsewhere
        saved = json.loads((tmp_path / "fig" / "figures.json").read_text())
        assert saved == json.loads(json.dumps(result, default=str))
        fig = tmp_path.resolve() / "fig"
        paths = {"roc": saved["roc"]["path"], "tsne": saved["tsne"]["path"],
                 "coords": saved["tsne"]["coords_path"], "gradcam": saved["gradcam"]["path"]}
        assert paths == {"roc": str(fig / "roc.png"), "tsne": str(fig / "tsne.png"),
                         "coords": str(fig / "tsne_coords.npy"),
                         "gradcam": str(fig / "gradcam.png")}
        _assert_png(Path(paths["roc"]))
        assert np.load(paths["coords"]).shape == (6, 2)
        assert Path(saved["checkpoint"]).is_absolute()
        assert all(Path(p).is_absolute() and Path(p).is_file()
                   for p in saved["gradcam"]["images"])
