"""Figures and tables of a BreaKHis reproduction: ROC, t-SNE, Grad-CAM, the results table.

Liu, Juhas & Zhang (2020) show ROC curves of their classifiers, t-SNE maps of the
bilinear features and Grad-CAM heat maps, and summarise every experiment in results
tables. This module draws the same from a saved run, with well-kept libraries only:
scikit-learn (``roc_curve``, ``auc``, ``TSNE``, ``PCA``), captum (``LayerGradCam`` on
the last feature map of each stream, upsampled with ``LayerAttribution.interpolate``) and
matplotlib (Agg canvas; the caller's pyplot backend is left alone).

- :func:`plot_roc`, :func:`plot_tsne`, :func:`plot_gradcam` draw one PNG each from
  arrays (e.g. from :func:`breakhis.evaluate.read_predictions`, without the model);
- :func:`embeddings` and :func:`gradcam` compute what the last two need from a model;
- :func:`make_figures` does all three for a checkpoint and writes ``figures.json``;
- :func:`results_table` puts the ``cv_metrics.json``/``test_metrics.json`` of several
  runs into one Markdown table (and CSV), the shape of the paper's results tables,
  always with the protocol that produced each number.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import os
import shutil
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Union

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from ._files import (
    SettingError,
    atomic_writer,
    check_int,
    check_run_folder,
    check_seed,
    folder_problem,
    listed,
    named_os_error,
    plural,
    progress_bar,
    remove_stale_staging,
    staging_folder,
    temporary_for,
    writable_problem,
)
from .data import ImageRecord
from .dataset import IMAGENET_MEAN, IMAGENET_STD, ImageDataset, build_eval_transform, load_rgb
from .evaluate import SUMMARY_METRICS, check_finite_probs, read_report, split_integrity
from .splits import PROTOCOL_DESCRIPTIONS

__all__ = [
    "FIGURES_DIR",
    "FIGURE_FILES",
    "RESULTS_COLUMNS",
    "check_figure_options",
    "check_figures_folder",
    "embeddings",
    "gradcam",
    "make_figures",
    "plot_gradcam",
    "plot_roc",
    "plot_tsne",
    "results_rows",
    "results_table",
]

#: Training settings the results table names only where they differ between its runs
#: (setting, label); older reports lack some, and then show none of them.
_VARYING_SETTINGS: tuple[tuple[str, str], ...] = (
    ("batch_size", "batch"), ("momentum", "momentum"), ("weight_decay", "weight decay"),
    ("dropout", "dropout"), ("augment", "augmentation"), ("shift", "shift"),
    ("rotation", "rotation"), ("plateau_factor", "plateau factor"),
    ("plateau_patience", "plateau patience"), ("val_fraction", "val fraction"),
    ("seed", "seed"), ("split_seed", "split seed"), ("n_splits", "splits"),
)
#: Settings of :data:`_VARYING_SETTINGS` that reports record under ``protocol``, not
#: ``model``.
_PROTOCOL_SETTINGS: frozenset[str] = frozenset({"split_seed", "n_splits"})
#: Columns of the CSV written by :func:`results_table` (metrics as fractions, not percent).
#: ``run``: the run folder as given; ``name``: the run's name in the Markdown table and its
#: notes (:func:`results_rows`: ``cvA/fold0`` and ``cvB/fold0``, a lone ``fold0``);
#: ``patient_disjoint``: whether every fold's test images are patient-disjoint from its
#: training images (empty: unknown, a report written before it was recorded);
#: ``split_notes``: the notes of the folds' splits (left-out images, patients in train and
#: test), ``" | "``-separated (the notes contain ``;``).
RESULTS_COLUMNS: tuple[str, ...] = (
    "run", "name", "source", "task", "magnification", "protocol", "patient_disjoint", "backbone",
    "head", "se_reduction", "input_size", "weights", "epochs", "epochs_trained", "lr",
    "oversample", *[key for key, _ in _VARYING_SETTINGS], "folds", "fold", "synthetic",
    "data_root", "stale_folds", "stale", "split_notes",
    *[f"{key}_{stat}" for key in SUMMARY_METRICS for stat in ("mean", "std", "n")],
)
_LOG = logging.getLogger("breakhis.plots")
_TABLE_METRICS = (("accuracy", "image accuracy"),
                  ("patient_recognition_rate", "patient recognition rate"),
                  ("macro_f1", "macro F1"), ("roc_auc", "ROC AUC"))
_IMAGES = Union[Sequence[ImageRecord], Sequence[Union[str, "os.PathLike[str]"]]]
#: Default folder of ``breakhis-repro figures`` (next to the checkpoint).
FIGURES_DIR = "figures"
#: Files :func:`make_figures` writes into its folder.
FIGURE_FILES: tuple[str, ...] = ("roc.png", "tsne.png", "tsne_coords.npy", "gradcam.png",
                                 "figures.json")
#: Name of the hidden folders :func:`make_figures` draws in, ``.figures-<8 characters>.tmp``
#: inside its folder (:func:`breakhis._files.staging_folder`).
_STAGING = "figures"


def _figure(figsize: tuple[float, float], nrows: int = 1, ncols: int = 1) -> tuple[Any, Any]:
    """A matplotlib figure on an Agg canvas (no pyplot, so no global backend change)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig, fig.subplots(nrows, ncols, squeeze=False)


def _save(fig: Any, path: str | os.PathLike[str]) -> Path:
    """Write ``fig`` to ``path`` as a PNG, creating its folder if need be.

    Raises:
        OSError: when the file cannot be written, naming ``path``: the ``OSError`` of a
            full disk names no file (the write goes to an open file), so it is raised
            again with ``path`` as its file name
            (:func:`breakhis._files.named_os_error`).
    """
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    try:
        fig.savefig(out, dpi=110)
    except Exception as err:
        named = named_os_error(err, out)
        if named is not None:
            raise named from err
        raise
    return out


def _wrap(title: str, width: int = 52) -> str:
    return textwrap.fill(title, width)


def _colours(n: int) -> list[Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def _check_labels(y: np.ndarray, n_classes: int, what: str) -> None:
    if y.ndim != 1:
        raise ValueError(f"expected {what} of shape (N,), but got {y.shape}")
    if len(y) and (y.min() < 0 or y.max() >= n_classes):
        raise ValueError(f"expected {what} in [0, {n_classes}), but got values from "
                         f"{y.min()} to {y.max()}")


def plot_roc(
    y_true: Sequence[int] | np.ndarray,
    probs: np.ndarray,
    classes: Sequence[str],
    path: str | os.PathLike[str],
    *,
    title: str | None = None,
) -> dict[str, Any]:
    """ROC curves with their AUCs, drawn to a PNG.

    Binary task (two classes): one curve, of the positive class ``classes[1]``
    (malignant) scored by its probability. More classes: one one-vs-rest curve per
    class, plus the macro average drawn as the mean true-positive rate over a common
    false-positive grid. A class with no positive or no negative image in ``y_true``
    has no ROC curve: it is skipped and named in the legend and the result.

    The numbers match :func:`breakhis.evaluate.roc_auc` (and so ``test_metrics.json``):
    ``roc_auc`` is the binary AUC, or the mean of the per-class AUCs. (The area under
    the drawn macro-average curve can differ slightly from that mean.)

    Args:
        y_true: true class index per image, shape ``(N,)``.
        probs: class probabilities, shape ``(N, C)`` with ``C == len(classes)``.
        classes: class names.
        path: PNG to write.
        title: figure title (say which task and protocol it shows).

    Returns:
        ``{"path", "auc": {class: AUC}, "roc_auc": binary or macro AUC (None when
        nothing can be scored), "skipped": [class names without a curve]}``.

    Raises:
        ValueError: on mismatched shapes, no image, or labels outside ``[0, C)``.

    Examples:
        >>> import tempfile
        >>> out = Path(tempfile.mkdtemp()) / "roc.png"
        >>> r = plot_roc([0, 0, 1, 1], np.array([[.9, .1], [.3, .7], [.35, .65], [.2, .8]]),
        ...              ["benign", "malignant"], out)
        >>> r["auc"], r["skipped"], r["path"].is_file()
        ({'malignant': 0.75}, [], True)
    """
    from sklearn.metrics import auc, roc_curve

    y = np.asarray(y_true, dtype=np.int64)
    p = np.asarray(probs, dtype=np.float64)
    if len(y) == 0 and len(p) == 0:
        raise ValueError("expected at least one image for a ROC curve, but got none")
    if p.ndim != 2 or p.shape != (len(y), len(classes)) or len(classes) < 2:
        raise ValueError(f"expected probs of shape ({len(y)}, {len(classes)}) for "
                         f"{len(classes)} classes (at least 2), but got {p.shape}")
    _check_labels(y, len(classes), "y_true")
    check_finite_probs(p)
    scored = [1] if len(classes) == 2 else list(range(len(classes)))
    curves: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    aucs: dict[str, float] = {}
    skipped: list[str] = []
    for c in scored:
        positives = int(np.sum(y == c))
        if not 0 < positives < len(y):
            skipped.append(classes[c])
            continue
        fpr, tpr, _ = roc_curve(y == c, p[:, c])
        curves[classes[c]] = (fpr, tpr)
        aucs[classes[c]] = float(auc(fpr, tpr))
    overall = float(np.mean(list(aucs.values()))) if aucs else None

    fig, axes = _figure((5.5, 5.0))
    ax = axes[0, 0]
    colours = _colours(len(classes))
    for name, (fpr, tpr) in curves.items():
        ax.plot(fpr, tpr, color=colours[list(classes).index(name)], lw=1.5,
                label=f"{name} (AUC {aucs[name]:.3f})")
    if len(classes) > 2 and curves:
        grid, mean_tpr = _macro_roc(list(curves.values()))
        ax.plot(grid, mean_tpr, color="black", lw=2.5, ls=":",
                label=f"macro average (mean AUC {overall:.3f})")
    ax.plot([0, 1], [0, 1], color="grey", lw=1, ls="--", label="chance")
    if skipped:
        ax.plot([], [], " ", label="no curve (no positive or no negative image): "
                + ", ".join(skipped))
    ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="false positive rate",
           ylabel="true positive rate", title=_wrap(title or "ROC"))
    ax.legend(loc="lower right", fontsize="small")
    out = _save(fig, path)
    return {"path": out, "auc": aucs, "roc_auc": overall, "skipped": skipped}


def _macro_roc(curves: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """The mean of ROC curves (``(fpr, tpr)`` each, as ``roc_curve`` gives them): at every
    false positive rate of any curve, the mean true positive rate just left and just right
    of it, so that a vertical step of a curve (several points at one rate) stays a step.

    ``np.interp`` over a curve with such ties gives one of its values there, unspecified
    (its points must be increasing), and drew the steps as slopes between rates.

    Examples:
        >>> x, y = _macro_roc([(np.array([0., 0., 1.]), np.array([0., 1., 1.])),
        ...                    (np.array([0., 1.]), np.array([0., 1.]))])
        >>> x.tolist(), y.tolist()
        ([0.0, 0.0, 1.0, 1.0], [0.0, 0.5, 1.0, 1.0])
    """
    grid = np.unique(np.concatenate([fpr for fpr, _ in curves]))
    left, right = [], []
    for fpr, tpr in curves:
        # each rate once, with the lowest and highest true positive rate there (both
        # rates rise along a curve): a segment runs from one rate's highest to the next's lowest
        rates, first = np.unique(fpr, return_index=True)
        low, high = tpr[first], tpr[np.r_[first[1:], len(fpr)] - 1]
        i = np.minimum(np.searchsorted(rates, grid), len(rates) - 1)
        on = rates[i] == grid
        j = np.clip(i, 1, len(rates) - 1)  # the segment rates[j - 1] .. rates[j] around a rate between
        width = np.where(on, 1.0, rates[j] - rates[j - 1])
        between = high[j - 1] + (low[j] - high[j - 1]) * (grid - rates[j - 1]) / width
        left.append(np.where(on, low[i], between))
        right.append(np.where(on, high[i], between))
    x = np.repeat(grid, 2)
    y = np.stack([np.mean(left, axis=0), np.mean(right, axis=0)], axis=1).reshape(-1)
    return x, y


def _image_batches(
    images: _IMAGES | Tensor, input_size: int, batch_size: int,
    mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
) -> tuple[int, Any]:
    """Number of images and an iterable of normalised ``(B, 3, S, S)`` batches."""
    if isinstance(images, Tensor):
        if images.ndim != 4 or images.shape[1] != 3 or tuple(images.shape[-2:]) != (
                input_size, input_size):
            raise ValueError(f"expected an image tensor of shape (N, 3, {input_size}, "
                             f"{input_size}), but got {tuple(images.shape)}")
        return len(images), images.split(batch_size)
    dataset = ImageDataset(list(images), None,
                           build_eval_transform(input_size, mean=mean, std=std))
    loader = DataLoader(dataset, batch_size=batch_size)
    return len(dataset), (x for x, _, _ in loader)


def _progress(iterable: Any, total: int, desc: str, progress: bool) -> Any:
    if not progress:
        return iterable
    return progress_bar(iterable, total=total, desc=desc, unit="batch")


def embeddings(
    model: nn.Module,
    records: _IMAGES,
    *,
    input_size: int,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    max_dim: int | None = None,
    seed: int = 0,
    progress: bool = False,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> np.ndarray:
    """Pre-logit feature vectors (``model.forward_embedding``) of ``records``, e.g. for t-SNE.

    Images get the evaluation transform (resize to ``input_size`` squared, normalise
    with ``mean`` and ``std``: a checkpoint's,
    :func:`breakhis.train.checkpoint_normalization`), as in
    :func:`breakhis.train.predict_probs`; no gradients.

    Bilinear features are wide (``2048 * 2048`` values per image for InceptionV3: 16 MiB),
    too wide to keep for a whole test fold. With ``max_dim``, wider embeddings are
    projected batch by batch with scikit-learn's ``SparseRandomProjection`` (seeded),
    which keeps pairwise distances approximately (Johnson-Lindenstrauss), as t-SNE needs.

    Args:
        model: a ``bilinearpool`` classifier (it has ``forward_embedding``).
        records: image records or paths.
        input_size: side of the square model input.
        batch_size: images per forward pass.
        device: where the model lives.
        max_dim: project embeddings wider than this to ``max_dim`` dimensions
            (``None``: keep them whole).
        seed: random state of the projection.
        progress: show a progress bar.
        mean: per-channel input mean (default ImageNet's).
        std: per-channel input standard deviation (default ImageNet's).

    Returns:
        ``(N, D)`` float32 array; for a bilinear head ``D`` is the bilinear feature size
        (or ``max_dim`` after projection).

    Raises:
        TypeError: when the model has no ``forward_embedding``.
        ValueError: when ``records`` is empty.
    """
    forward = getattr(model, "forward_embedding", None)
    if not callable(forward):
        raise TypeError("expected a model with forward_embedding() (a bilinearpool "
                        f"classifier), but got {type(model).__name__}")
    if max_dim is not None and max_dim < 2:
        raise ValueError(f"max_dim must be >= 2 or None, but got {max_dim}")
    n, batches = _image_batches(records, input_size, batch_size, mean, std)
    if n == 0:
        raise ValueError("expected at least one image, but got none")
    model.eval()
    out = []
    projection = None
    with torch.no_grad():
        for x in _progress(batches, math.ceil(n / batch_size), "embedding", progress):
            emb = forward(x.to(device)).float().flatten(1).cpu().numpy()
            if max_dim is not None and emb.shape[1] > max_dim:
                if projection is None:
                    from sklearn.random_projection import SparseRandomProjection

                    projection = SparseRandomProjection(n_components=max_dim,
                                                        random_state=seed).fit(emb)
                emb = projection.transform(emb)
            out.append(np.asarray(emb, dtype=np.float32))
    return np.concatenate(out)


def plot_tsne(
    emb: np.ndarray,
    labels: Sequence[int] | np.ndarray,
    classes: Sequence[str],
    path: str | os.PathLike[str],
    *,
    seed: int = 0,
    perplexity: float = 30.0,
    title: str | None = None,
) -> dict[str, Any]:
    """2-D t-SNE map of embeddings (scikit-learn), coloured by class, drawn to a PNG.

    As usual for t-SNE, embeddings wider than 50 dimensions are first reduced to 50
    with PCA (fewer when there are fewer images). The perplexity must stay below the
    number of images; it is clamped to at most ``(N - 1) / 3`` (so that the
    ``3 * perplexity`` neighbours t-SNE looks at exist) and the value used is returned.
    The coordinates are also saved next to the PNG as ``<stem>_coords.npy``.

    Args:
        emb: embeddings, shape ``(N, D)``, ``N >= 3``.
        labels: class index per row, shape ``(N,)``.
        classes: class names.
        path: PNG to write.
        seed: random state of PCA and t-SNE (same seed, same map).
        perplexity: requested perplexity (scikit-learn's default 30).
        title: figure title.

    Returns:
        ``{"path", "coords": (N, 2) array, "coords_path", "perplexity" (used),
        "pca_components" (None without PCA)}``.

    Raises:
        ValueError: for fewer than 3 rows, mismatched lengths, non-finite embeddings or
            a perplexity that is not positive.

    Examples:
        >>> import tempfile
        >>> rng = np.random.default_rng(0)
        >>> r = plot_tsne(rng.normal(size=(10, 64)), [0, 1] * 5, ["benign", "malignant"],
        ...               Path(tempfile.mkdtemp()) / "tsne.png")
        >>> r["coords"].shape, r["perplexity"], r["pca_components"]
        ((10, 2), 3.0, 10)
    """
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    x = np.asarray(emb, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    if x.ndim != 2:
        raise ValueError(f"expected embeddings of shape (N, D), but got {x.shape}")
    if len(x) < 3:
        raise ValueError(f"t-SNE needs at least 3 embeddings, but got {len(x)}")
    if len(y) != len(x):
        raise ValueError(f"expected {len(x)} labels (one per embedding), but got {len(y)}")
    _check_labels(y, len(classes), "labels")
    if not np.isfinite(x).all():
        raise ValueError("expected finite embeddings, but got NaN or infinite values")
    if not perplexity > 0:
        raise ValueError(f"perplexity must be > 0, but got {perplexity}")
    used = float(min(perplexity, (len(x) - 1) / 3))
    components = None
    if x.shape[1] > 50:
        components = min(50, *x.shape)
        x = PCA(n_components=components, random_state=seed).fit_transform(x)
    # t-SNE's PCA initialisation divides by the spread of the first component: a map
    # without spread (e.g. identical embeddings) has to start from random points
    init = "pca" if x.shape[1] >= 2 and np.ptp(x, axis=0).max() > 1e-12 else "random"
    coords = TSNE(n_components=2, perplexity=used, init=init, learning_rate="auto",
                  random_state=seed).fit_transform(x)

    fig, axes = _figure((6.0, 5.0))
    ax = axes[0, 0]
    colours = _colours(len(classes))
    for c, name in enumerate(classes):
        mask = y == c
        if mask.any():
            ax.scatter(coords[mask, 0], coords[mask, 1], s=14, color=colours[c],
                       label=f"{name} ({int(mask.sum())})", alpha=0.85, edgecolors="none")
    ax.set(xticks=[], yticks=[], xlabel="t-SNE 1", ylabel="t-SNE 2",
           title=_wrap(title or f"t-SNE (perplexity {used:g})"))
    ax.legend(loc="best", fontsize="small", markerscale=1.5)
    out = _save(fig, path)
    coords_path = out.with_name(f"{out.stem}_coords.npy")
    with atomic_writer(coords_path, "wb") as handle:  # a full disk names the file
        np.save(handle, coords)
    return {"path": out, "coords": coords, "coords_path": coords_path, "perplexity": used,
            "pca_components": components}


def gradcam(
    model: nn.Module,
    images: _IMAGES | Tensor,
    targets: Sequence[int] | np.ndarray | None = None,
    *,
    input_size: int,
    device: str | torch.device = "cpu",
    batch_size: int = 16,
    progress: bool = False,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> tuple[np.ndarray, np.ndarray]:
    """Grad-CAM heat maps (Selvaraju et al. 2017) of the model's last feature map(s).

    Grad-CAM weighs channel :math:`k` of a last feature map :math:`A` by the spatial mean
    :math:`\\bar{g}_k` of the gradient of the target class score :math:`y`,
    :math:`\\partial y / \\partial A_k`, and keeps the positive part of the weighted sum.
    The layers are ``model.gradcam_layers``, one per stream (``(model.gradcam_layer,)``
    for a model with only that attribute):

    - one stream: captum's ``LayerGradCam`` on that layer,
      :math:`\\mathrm{ReLU}(\\sum_k \\bar{g}_k A_k)`, upsampled to the input size with
      ``LayerAttribution.interpolate`` (bilinear);
    - two streams (a BCNN): Grad-CAM of the two maps taken together. Each stream's
      weights come from its own gradient, and the weighted sums add before the ReLU:
      :math:`\\mathrm{ReLU}(\\mathrm{up}(\\sum_k \\bar{g}^a_k A^a_k) +
      \\mathrm{up}(\\sum_k \\bar{g}^b_k A^b_k))`, where :math:`\\mathrm{up}` upsamples
      to the input size (bilinear) so that maps of different sizes add. Each term is
      ``LayerGradCam(..., relu_attributions=False)`` on one stream.

    Each map is then divided by its maximum, per image, so it lies in ``[0, 1]`` (an
    all-zero map stays zero).

    Args:
        model: a ``bilinearpool`` classifier (it has ``gradcam_layers``).
        images: image records or paths (evaluation transform at ``input_size``), or an
            already normalised tensor ``(N, 3, input_size, input_size)``.
        targets: class index to explain per image; by default the predicted class.
        input_size: side of the square model input.
        device: where the model lives.
        batch_size: images per pass.
        progress: show a progress bar.
        mean: per-channel input mean for image records or paths (default ImageNet's).
        std: per-channel input standard deviation (default ImageNet's).

    Returns:
        ``(heatmaps, predicted)``: ``(N, input_size, input_size)`` float32 in ``[0, 1]``
        and the predicted class per image, ``(N,)``.

    Raises:
        TypeError: when the model has neither ``gradcam_layers`` nor ``gradcam_layer``.
        ValueError: for no images, a tensor of the wrong shape, or targets of the wrong
            length.

    Examples:
        >>> from breakhis.models import build_network
        >>> model = build_network("bcnn", "tiny", num_classes=2)
        >>> heat, pred = gradcam(model, torch.randn(3, 3, 32, 32), input_size=32)
        >>> heat.shape, pred.shape, bool(0 <= heat.min() and heat.max() <= 1)
        ((3, 32, 32), (3,), True)
    """
    from captum.attr import LayerAttribution, LayerGradCam

    layers = _gradcam_layers(model)
    n, batches = _image_batches(images, input_size, batch_size, mean, std)
    if n == 0:
        raise ValueError("expected at least one image, but got none")
    wanted = None
    if targets is not None:
        wanted = torch.as_tensor(np.asarray(targets, dtype=np.int64))
        if wanted.shape != (n,):
            raise ValueError(f"expected {n} targets (one per image), but got "
                             f"{tuple(wanted.shape)}")
    model.eval()
    cams = [LayerGradCam(model, layer) for layer in layers]
    # One stream keeps captum's ReLU; several streams add their signed maps first.
    relu_each = len(cams) == 1
    heat, predicted, start = [], [], 0
    for x in _progress(batches, math.ceil(n / batch_size), "grad-cam", progress):
        x = x.to(device)
        with torch.no_grad():
            pred = model(x).argmax(dim=1)
        target = pred if wanted is None else wanted[start:start + len(x)].to(device)
        maps = torch.stack([
            LayerAttribution.interpolate(
                cam.attribute(x, target=target, relu_attributions=relu_each),
                (input_size, input_size), interpolate_mode="bilinear")[:, 0]
            for cam in cams
        ]).sum(dim=0)
        maps = maps.detach().float().clamp_min(0.0)
        peak = maps.amax(dim=(1, 2), keepdim=True)
        maps = torch.where(peak > 0, maps / peak.clamp_min(torch.finfo(maps.dtype).tiny),
                           torch.zeros_like(maps))
        heat.append(maps.cpu())
        predicted.append(pred.cpu())
        start += len(x)
    return torch.cat(heat).numpy(), torch.cat(predicted).numpy()


def _gradcam_layers(model: nn.Module) -> tuple[nn.Module, ...]:
    """The model's ``gradcam_layers``, or ``(gradcam_layer,)`` for a model without them."""
    layers = getattr(model, "gradcam_layers", None)
    if layers is None:
        layer = getattr(model, "gradcam_layer", None)
        layers = (layer,) if layer is not None else ()
    layers = tuple(layers)
    if not layers or not all(isinstance(layer, nn.Module) for layer in layers):
        raise TypeError("expected a model with gradcam_layers (or a gradcam_layer) module "
                        f"(a bilinearpool classifier), but got {type(model).__name__}")
    return layers


def _gradcam_description(model: nn.Module) -> str:
    """What :func:`gradcam` computed for ``model``, for ``figures.json``."""
    if len(_gradcam_layers(model)) == 1:
        return "gradcam_layer (last feature map of the backbone)"
    return ("gradcam_layers (last feature maps of both streams, backbone and backbone_b), "
            "taken together: ReLU(up(sum_k g_k^a A_k^a) + up(sum_k g_k^b A_k^b)), g_k = "
            "spatial mean of the class score's gradient on channel k of that stream's map A, "
            "up = bilinear upsampling to the input size")


def _display_image(image: Any, size: tuple[int, int]) -> np.ndarray:
    """An RGB array of ``size`` (height, width) for an image record, path or array."""
    if isinstance(image, np.ndarray):
        return image
    from PIL import Image

    path = image.path if isinstance(image, ImageRecord) else image
    return np.asarray(load_rgb(path).resize((size[1], size[0]), Image.BILINEAR))


def plot_gradcam(
    images: Sequence[Any],
    heatmaps: np.ndarray,
    labels: Sequence[int] | np.ndarray | None,
    predicted: Sequence[int] | np.ndarray,
    classes: Sequence[str],
    path: str | os.PathLike[str],
    *,
    title: str | None = None,
    pairs_per_row: int = 4,
    alpha: float = 0.5,
) -> Path:
    """A grid of image / Grad-CAM overlay pairs, titled with true and predicted class.

    Args:
        images: image records, paths or RGB arrays ``(H, W, 3)``; files are resized to
            the heat map size, i.e. shown as the model saw them.
        heatmaps: ``(N, H, W)`` in ``[0, 1]`` (from :func:`gradcam`).
        labels: true class index per image, or ``None`` when unknown.
        predicted: predicted class index per image.
        classes: class names.
        path: PNG to write.
        title: figure title.
        pairs_per_row: image/overlay pairs per row of the grid.
        alpha: opacity of the heat map over the image.

    Returns:
        The PNG path.

    Raises:
        ValueError: on no image, mismatched lengths or heat maps that are not ``(N, H, W)``.
    """
    heat = np.asarray(heatmaps, dtype=np.float32)
    n = len(images)
    if n == 0:
        raise ValueError("expected at least one image for a Grad-CAM grid, but got none")
    if heat.ndim != 3 or len(heat) != n:
        raise ValueError(f"expected heatmaps of shape ({n}, H, W) for {n} images, but got "
                         f"{heat.shape}")
    pred = np.asarray(predicted, dtype=np.int64)
    true = None if labels is None else np.asarray(labels, dtype=np.int64)
    if len(pred) != n or (true is not None and len(true) != n):
        raise ValueError(f"expected {n} labels and predictions, but got "
                         f"{None if true is None else len(true)} and {len(pred)}")
    per_row = max(1, min(pairs_per_row, n))
    rows = math.ceil(n / per_row)
    fig, axes = _figure((4.4 * per_row, 2.5 * rows + (0.4 if title else 0.0)), rows,
                        2 * per_row)
    for ax in axes.flat:
        ax.axis("off")
    for i in range(n):
        rgb = _display_image(images[i], heat.shape[1:])
        ax_img, ax_cam = axes[i // per_row, 2 * (i % per_row)], axes[i // per_row,
                                                                     2 * (i % per_row) + 1]
        truth = "?" if true is None else classes[int(true[i])]
        guess = classes[int(pred[i])]
        ax_img.imshow(rgb)
        ax_img.set_title(f"true: {truth}", fontsize="small")
        ax_cam.imshow(rgb)
        ax_cam.imshow(heat[i], cmap="jet", alpha=alpha, vmin=0.0, vmax=1.0)
        mark = "" if true is None else (" (right)" if truth == guess else " (wrong)")
        ax_cam.set_title(f"predicted: {guess}{mark}", fontsize="small")
    if title:
        fig.suptitle(_wrap(title, 30 + 35 * per_row))
    return _save(fig, path)


def _balanced_pick(targets: np.ndarray, n: int, groups: Sequence[Any] | None = None) -> list[int]:
    """``n`` indices taking classes in turn (class order); within a class, the groups
    (patients) in turn, each group's images in file order, so that a grid shows as many
    patients as it can rather than the first patient's images.

    Examples:
        >>> _balanced_pick(np.array([0, 0, 0, 1, 1]), 4)
        [0, 3, 1, 4]
        >>> _balanced_pick(np.array([0, 0, 0, 1, 1]), 4, groups=["a", "a", "b", "c", "c"])
        [0, 3, 2, 4]
    """
    queues = []
    for c in np.unique(targets):
        members = np.flatnonzero(targets == c)
        if groups is None:
            queues.append([int(i) for i in members])
            continue
        by_group: dict[Any, list[int]] = {}
        for i in members:
            by_group.setdefault(groups[i], []).append(int(i))
        rounds = max(len(v) for v in by_group.values())
        queues.append([v[r] for r in range(rounds) for v in by_group.values() if r < len(v)])
    picked: list[int] = []
    while len(picked) < n and any(queues):
        for queue in queues:
            if queue and len(picked) < n:
                picked.append(int(queue.pop(0)))
    return picked


def _describe(source: Mapping[str, Any]) -> str:
    """E.g. ``MSBC 40X fold 0, test images (patient protocol), SYNTHETIC data``."""
    task = source.get("task") or {}
    text = str(task.get("name", "?"))
    if task.get("magnification"):
        text += f" {task['magnification']}X"
    if source.get("fold") is not None:
        text += f" fold {source['fold']}"
    if source.get("split"):
        text += f", {source['split']} images"
    text += f" ({(source.get('protocol') or {}).get('protocol', '?')} protocol)"
    if source.get("synthetic"):
        text += ", SYNTHETIC data"
    return text


def check_figure_options(
    seed: Any,
    perplexity: float,
    max_embedding_dim: int | None,
    gradcam_images: int,
    out_dir: str | os.PathLike[str],
    batch_size: int = 32,
) -> None:
    """Refuse the options of :func:`make_figures` that would fail it late.

    A seed scikit-learn refuses fails only after the embeddings are made, a folder
    that is a file, or one that cannot be created or written, after the model is loaded
    and the images predicted: checked here first (the command line checks them before
    it indexes the data, minutes on the real data). The check creates nothing: a folder
    that does not exist yet is not created (the nearest one above it must be writable),
    and an existing one is tried with a probe file that is removed at once
    (:func:`breakhis._files.writable_problem`).

    Args:
        seed, perplexity, max_embedding_dim, gradcam_images, out_dir, batch_size: as
            for :func:`make_figures`.

    Raises:
        breakhis._files.SettingError: naming the argument (``breakhis-repro figures``
            names its option instead: ``--max-embedding-dim``, ``--out``), for a ``seed``
            outside ``[0, 2**32 - 1]``, a perplexity that is not positive, a
            ``max_embedding_dim`` below 2, a ``gradcam_images`` that is not an integer
            >= 0, a ``batch_size`` below 1, or an ``out_dir`` that is a file (or lies
            under one) or holds something other than a file under the name of a figure
            (a folder ``roc.png``), which the run would fail to replace at its end, or
            files under the names of figures without a ``figures.json`` (someone else's
            ``gradcam.png``, not an earlier run's: the run would replace or remove them).
        ValueError: for an ``out_dir`` that cannot be created or written, naming the
            folder that cannot (``"expected a folder for the figures that can be
            written, but writing a file into '...' failed: Permission denied"``).

    Examples:
        >>> check_figure_options(0, 30.0, None, 8, "figures")
        >>> check_figure_options(0, 30.0, 1, 8, "figures")  # doctest: +NORMALIZE_WHITESPACE
        Traceback (most recent call last):
        ...
        breakhis._files.SettingError: max_embedding_dim must be >= 2, or None to keep
        embeddings whole (--max-embedding-dim 0), but got 1
    """
    check_seed(seed)
    if not perplexity > 0:
        raise SettingError("perplexity", f"must be > 0, but got {perplexity:g}")
    if max_embedding_dim is not None and max_embedding_dim < 2:
        raise SettingError("max_embedding_dim", "must be >= 2, or None to keep embeddings "
                           f"whole (--max-embedding-dim 0), but got {max_embedding_dim}")
    check_int("gradcam_images", gradcam_images, 0)
    check_int("batch_size", batch_size, 1)
    problem = folder_problem(out_dir)
    if problem:
        raise SettingError("out_dir", f"expects a folder for the figures, but {problem}")
    taken = [str(Path(out_dir) / name) for name in FIGURE_FILES
             if (Path(out_dir) / name).exists() and not (Path(out_dir) / name).is_file()]
    if taken:
        what = ("is a folder (or another kind of file)" if len(taken) == 1
                else "are folders (or other kinds of file)")
        raise SettingError("out_dir", "expects a folder whose figure files the figures can "
                           f"replace, but {', '.join(map(repr, taken))} {what}")
    # Files under figure names beside no figures.json were made by someone else, not by an
    # earlier figures run: the run would replace them (or remove those it does not draw).
    found = [name for name in FIGURE_FILES[:-1]
             if (Path(out_dir) / name).is_file() or (Path(out_dir) / name).is_symlink()]
    if found and not (Path(out_dir) / FIGURE_FILES[-1]).is_file():
        raise SettingError(
            "out_dir", f"expects a folder without figure files or with an earlier figures run's "
            f"(its {FIGURE_FILES[-1]} beside them), but {str(out_dir)!r} holds "
            f"{listed(found, shown=len(found))} and no {FIGURE_FILES[-1]}: files that this run "
            "would replace or remove; pass another folder, or move them")
    problem = writable_problem(out_dir, "a folder for the figures", create=False)
    if problem:
        raise ValueError(problem)


def check_figures_folder(checkpoint: str | os.PathLike[str], out_dir: str | os.PathLike[str]) -> None:
    """Refuse an ``out_dir`` that belongs to another run: one that holds another run's
    ``checkpoint.pt`` (not ``checkpoint``, nor a copy of it), where the figures would be
    taken for that run's, or a cross-validation's folder (``cv_metrics.json``). A new
    folder, the checkpoint's own and its ``figures`` subfolder are fine.

    Raises:
        ValueError: naming the folder and what it holds.
    """
    from .experiments import _other_run_problem

    problem = _other_run_problem(checkpoint, Path(out_dir), what="figures")
    if problem:
        raise ValueError(problem)


def make_figures(
    checkpoint: str | os.PathLike[str],
    records: Sequence[ImageRecord],
    out_dir: str | os.PathLike[str],
    *,
    targets: Sequence[int] | np.ndarray | None = None,
    source: Mapping[str, Any] | None = None,
    gradcam_images: int = 8,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    seed: int = 0,
    perplexity: float = 30.0,
    max_embedding_dim: int | None = 4096,
    progress: bool = False,
) -> dict[str, Any]:
    """ROC, t-SNE and Grad-CAM figures of a saved run on ``records``.

    Loads the model of ``checkpoint`` (:func:`breakhis.train.load_model`), predicts
    (inputs normalised as in training) and writes into ``out_dir``: ``roc.png``,
    ``tsne.png`` (with ``tsne_coords.npy``), ``gradcam.png`` (``gradcam_images``
    images, taking classes in turn so that every class shows when there are enough, and
    within a class patients in turn) and ``figures.json`` (paths, AUCs, perplexity used,
    the checkpoint, the epochs it trained, task, protocol and fold, and whether the data
    are synthetic). Every path in ``figures.json`` is absolute, the figures' as the
    checkpoint's and the images' (relative to the working directory, they would mean
    nothing to a reader elsewhere); the figures are always the files of
    :data:`FIGURE_FILES` next to it, so a copied folder is read by those names. A
    checkpoint that trained fewer epochs than its settings ask (a run cut short) is drawn
    with a warning.

    ``out_dir`` then holds this run's figures only: the files of :data:`FIGURE_FILES`
    that an earlier run left there and this one does not write (``gradcam.png`` with
    ``gradcam_images=0``) are removed; other files stay. The figures are drawn in a
    hidden folder inside ``out_dir`` (``.figures-<8 characters>.tmp``) and moved in only
    when all of them are done, so a run that fails leaves ``out_dir``'s figures as they
    were. Such folders that a run killed while drawing left in ``out_dir`` are removed
    (with a warning) when the next run starts drawing there; two runs drawing into one
    folder at the same time are not supported.

    Args:
        checkpoint: a ``checkpoint.pt`` written by training.
        records: the images, e.g. the fold's test images from
            :func:`breakhis.experiments.checkpoint_records`.
        out_dir: output folder (created).
        targets: true class per record; by default from the checkpoint's task.
        source: what the records are (``split``, ``fold``, ``task``, ``protocol``,
            ``data_root``, ``synthetic``), as returned by ``checkpoint_records``;
            missing keys come from the checkpoint.
        gradcam_images: images in the Grad-CAM grid (0: no Grad-CAM figure).
        batch_size: images per forward pass.
        device: ``cpu`` or ``cuda``.
        seed: random state of t-SNE (and of the embedding projection), an integer in
            ``[0, 2**32 - 1]``.
        perplexity: requested t-SNE perplexity (clamped for small sets).
        max_embedding_dim: wider embeddings are randomly projected to this many
            dimensions before PCA and t-SNE (see :func:`embeddings`); ``None`` keeps them.
        progress: show progress bars.

    Returns:
        The content of ``figures.json``.

    Raises:
        TypeError: before the model is loaded, for records that are not
            :class:`~breakhis.data.ImageRecord` (paths, say).
        ValueError: before the model is loaded, for fewer than 3 records or options
            that :func:`check_figure_options` refuses (a negative ``gradcam_images``, a
            ``seed`` outside ``[0, 2**32 - 1]``, a perplexity that is not positive, a
            ``max_embedding_dim`` below 2, or an ``out_dir`` that is a file, lies under
            one, or cannot be created or written) or an ``out_dir`` of another run
            (:func:`check_figures_folder`); later, for mismatched targets, or
            for records of other magnifications than a magnification-specific
            checkpoint's (MSBC, MSFC) by their BreaKHis names.
    """
    from .tasks import get_task
    from .train import (
        checkpoint_normalization,
        epochs_trained,
        load_model,
        predict_probs,
        warn_unfinished,
    )

    if len(records) < 3:
        raise ValueError(f"figures need at least 3 images (t-SNE), but got {len(records)}")
    check_figure_options(seed, perplexity, max_embedding_dim, gradcam_images, out_dir, batch_size)
    check_figures_folder(checkpoint, out_dir)
    other = next((r for r in records if not isinstance(r, ImageRecord)), None)
    if other is not None:
        raise TypeError(
            "records must be ImageRecords (what breakhis.experiments.checkpoint_records or "
            f"breakhis.data.index_breakhis give), but got a {type(other).__name__} ({other!r}): "
            "the figures need each image's label, patient and magnification")
    out = Path(out_dir)
    model, state = load_model(checkpoint, device=device)
    classes = list(state["classes"])
    extra = state.get("extra") or {}
    if targets is None:
        task = extra.get("task") or {}
        if not task:
            raise ValueError(f"checkpoint {str(checkpoint)!r} records no task; pass targets")
        name = task["name"]
        rebuilt = (get_task("folder", classes=classes) if name == "folder"
                   else get_task(name, magnification=task.get("magnification")))
        y = rebuilt.targets(records)
    else:
        y = np.asarray(targets, dtype=np.int64)
        if y.shape != (len(records),):
            raise ValueError(f"expected {len(records)} targets, but got {y.shape}")
    # a magnification-specific model drawn on other magnifications would be titled with
    # its own (predict refuses them too, unless told)
    from .predict import _other_magnifications

    trained, others, _ = _other_magnifications(
        state, [SimpleNamespace(magnification=getattr(r, "magnification", None)) for r in records])
    if others:
        raise ValueError(f"expected the images of the {trained} checkpoint {str(checkpoint)!r}, "
                         f"but got {', '.join(others)} among the {len(records)} records")
    info = {"task": extra.get("task"), "protocol": extra.get("protocol"),
            "fold": extra.get("fold"), "synthetic": bool(extra.get("synthetic", False)),
            "split": None, "data_root": (extra.get("data") or {}).get("data_root")}
    info.update(source or {})
    input_size = int(state["config"]["input_size"])
    warn_unfinished(checkpoint, state, "the figures show an unfinished model")
    mean, std = checkpoint_normalization(state)
    what = _describe(info)
    # the folders this call makes (out and those above it), removed again on failure
    created = [place for place in (out, *out.parents) if not place.exists()]
    out.mkdir(parents=True, exist_ok=True)
    final = out.resolve()  # the folder figures.json names its files in
    # what a run killed while drawing left: never read, so removed
    leftovers = remove_stale_staging(out, _STAGING)
    if leftovers:
        _LOG.warning("removed in %r the folders of figure runs cut short (killed while "
                     "drawing; the figures beside them are intact): %s", str(out),
                     ", ".join(leftovers))
    # Drawn in a hidden folder of out_dir (same file system, so the files move in by
    # rename) and moved in only once every figure is done: a failure on the way (a
    # t-SNE error after roc.png is drawn) leaves out_dir's figures as they were.
    work = staging_folder(out, _STAGING)
    try:
        probs = predict_probs(model, records, input_size=input_size, batch_size=batch_size,
                              device=device, progress=progress, mean=mean, std=std)
        roc = plot_roc(y, probs, classes, work / "roc.png", title=f"ROC: {what}")
        emb = embeddings(model, records, input_size=input_size, batch_size=batch_size,
                         device=device, max_dim=max_embedding_dim, seed=seed,
                         progress=progress, mean=mean, std=std)
        width = int(getattr(model, "embedding_dim", emb.shape[1]))
        tsne = plot_tsne(emb, y, classes, work / "tsne.png", seed=seed, perplexity=perplexity,
                         title=f"t-SNE of the embeddings: {what}")
        result: dict[str, Any] = {
            "checkpoint": str(Path(checkpoint).resolve()),  # as data_root and the images
            "classes": classes,
            "images": len(records),
            **info,
            "model": {k: state["config"].get(k) for k in ("head", "backbone", "se_reduction",
                                                          "input_size", "epochs")},
            "epochs_trained": epochs_trained(state),
            "normalization": {"mean": list(mean), "std": list(std)},
            "accuracy": float(np.mean(probs.argmax(axis=1) == y)),
            # where the files end up, not where they are drawn; absolute, as the
            # checkpoint (relative to the working directory, they meant nothing elsewhere)
            "roc": {"path": str(final / roc["path"].name), "auc": roc["auc"],
                    "roc_auc": roc["roc_auc"], "skipped": roc["skipped"]},
            "tsne": {"path": str(final / tsne["path"].name),
                     "coords_path": str(final / tsne["coords_path"].name),
                     "perplexity": tsne["perplexity"],
                     "perplexity_requested": float(perplexity),
                     "pca_components": tsne["pca_components"], "seed": seed,
                     "embedding_dim": width,
                     "projected_dim": int(emb.shape[1]) if emb.shape[1] < width else None},
            "gradcam": None,
        }
        if gradcam_images:
            patients = [getattr(r, "patient", None) or str(getattr(r, "path", r)) for r in records]
            pick = _balanced_pick(y, gradcam_images, patients)
            chosen = [records[i] for i in pick]
            heat, pred = gradcam(model, chosen, input_size=input_size, device=device,
                                 batch_size=batch_size, progress=progress, mean=mean, std=std)
            path = plot_gradcam(chosen, heat, y[pick], pred, classes, work / "gradcam.png",
                                title=f"Grad-CAM (predicted class): {what}")
            result["gradcam"] = {
                "path": str(final / path.name), "layer": _gradcam_description(model),
                "images": [os.path.abspath(getattr(r, "path", r)) for r in chosen],
                "true": [classes[int(t)] for t in y[pick]],
                "predicted": [classes[int(p)] for p in pred],
            }
        with atomic_writer(work / "figures.json", "w") as handle:  # a full disk names it
            handle.write(json.dumps(result, indent=2, default=str) + "\n")
        # All figures are done. The earlier run's figures move aside first (into the
        # hidden folder), then this run's move in, figures.json last (FIGURE_FILES ends
        # with it): never a folder mixing two runs, and a failure on the way (an error,
        # Ctrl-C) puts the earlier ones back.
        _swap_in(work, out)
    except BaseException as err:
        shutil.rmtree(work, ignore_errors=True)
        for place in created:  # deepest first; each made by this call, empty again
            with contextlib.suppress(OSError):
                place.rmdir()
        named = _named_in(err, work, out)
        if named is not None:
            raise named from err
        raise
    shutil.rmtree(work, ignore_errors=True)
    return result


def _swap_in(work: Path, out: Path) -> None:
    """Replace the files of :data:`FIGURE_FILES` in ``out`` by those drawn in ``work``
    (those not drawn are removed), all or nothing: the earlier ones are moved into
    ``work/.earlier`` first and moved back if anything fails."""
    earlier = work / ".earlier"
    earlier.mkdir()
    aside: list[str] = []
    moved: list[str] = []
    try:
        for name in FIGURE_FILES:
            if (out / name).is_file() or (out / name).is_symlink():
                os.replace(out / name, earlier / name)
                aside.append(name)
        for name in FIGURE_FILES:
            if (work / name).is_file():
                os.replace(work / name, out / name)
                moved.append(name)
    except BaseException:
        for name in moved:
            with contextlib.suppress(OSError):
                os.replace(out / name, work / name)
        for name in aside:
            with contextlib.suppress(OSError):
                os.replace(earlier / name, out / name)
        raise


def _named_in(err: BaseException, work: Path, out: Path) -> OSError | None:
    """``err`` naming the file of ``out`` it was to become, where it names a file of the
    hidden folder ``work`` (removed by then, and never the user's), or the temporary
    file a figure was written to there: ``None`` otherwise. A second file name (a
    rename's target) is kept, unless it is the same file.

    Examples:
        >>> work = Path("/r/.figures-x.tmp")
        >>> _named_in(OSError(28, "No space left", work / "roc.png"), work, Path("/r")).filename
        '/r/roc.png'
        >>> err = OSError(28, "No space", work / ".figures.json.ab_12xyz.tmp")
        >>> _named_in(err, work, Path("/r")).filename
        '/r/figures.json'
        >>> err = OSError(18, "Invalid cross-device link", work / "roc.png", "/r/roc.png")
        >>> named = _named_in(err, work, Path("/r"))
        >>> named.filename, named.filename2
        ('/r/roc.png', None)
        >>> _named_in(OSError(28, "No space"), work, Path("/r")) is None
        True
    """
    if not isinstance(err, OSError) or err.filename is None:
        return None
    try:
        inner = Path(os.fsdecode(err.filename)).relative_to(work)
    except (TypeError, ValueError):
        return None
    inner = inner.with_name(temporary_for(inner.name) or inner.name)
    named = str(out / inner)
    second = err.filename2
    if second is not None and os.path.abspath(os.fsdecode(second)) == os.path.abspath(named):
        second = None
    return type(err)(err.errno, err.strerror, named, None, second)


def _load_run(run_dir: str | os.PathLike[str]) -> tuple[Path, str, dict[str, Any]]:
    folder = Path(run_dir)
    check_run_folder(folder)
    for name in ("cv_metrics.json", "test_metrics.json"):
        if (folder / name).is_file():
            report = read_report(folder / name)
            if not isinstance(report.get("protocol"), dict):
                raise ValueError(f"{folder / name} records no protocol; it was not written "
                                 "by breakhis")
            if "summary" in report:
                problem = _summary_problem(report["summary"])
                if problem is not None:
                    raise ValueError(f"{folder / name}'s summary {problem}; it was not written by "
                                     "breakhis, or was edited (`breakhis-repro cv --resume` "
                                     "writes it again)")
            return folder, name, report
    raise ValueError(f"run folder {str(folder)!r} has no metrics: expected cv_metrics.json "
                     "(from `breakhis-repro cv`) or test_metrics.json (from `train` or "
                     "`evaluate`)")


def _summary_problem(summary: Any) -> str | None:
    """What is wrong with a cv summary (:func:`breakhis.evaluate.summarize_folds`: per metric
    ``mean``, ``std`` and the fold count ``n``), or None."""
    if not isinstance(summary, dict) or not summary:
        return f"expected an object of metrics, but got {json.dumps(summary)[:80]}"
    for metric, entry in summary.items():
        if not isinstance(entry, dict) or not {"mean", "n"} <= set(entry):
            return f"expected mean, std and n for {metric!r}, but got {json.dumps(entry)[:80]}"
        if isinstance(entry["n"], bool) or not isinstance(entry["n"], int) or entry["n"] < 0:
            return f"expected a fold count n >= 0 for {metric!r}, but got {json.dumps(entry['n'])}"
    return None


#: Why a report is stale, per fold (:func:`_stale_folds`), as the table says it: a cv
#: summary's first three, a single run's ``changed``.
_STALE_REASONS: dict[str, str] = {
    "retrained": "retrained since the summary",
    "unfinished": "retrained since the summary without a new test_metrics.json (checkpoint.pt "
                  "differs; retraining interrupted?)",
    "no report": "lost test_metrics.json since the summary",
    "other settings": "retrained since the summary with settings other than the summary's, which "
                      "cv --resume refuses",
    "more epochs": "trained since the summary for more epochs than its --epochs, which cv --resume "
                   "refuses at those epochs",
    "changed": "checkpoint.pt changed since this report (trained further or replaced; "
               "training interrupted before a new report?)",
}


def _checkpoint_identity(path: Path) -> tuple[dict[str, Any] | None, dict[str, Any], dict[str, Any]]:
    """:func:`breakhis.train.checkpoint_identity` of a ``checkpoint.pt`` (its tensors mapped,
    not read: tensors and plain data only), its training settings and its data settings
    (``extra.data``, with the task's name and magnification from ``extra.task``); ``None``,
    ``{}`` and ``{}`` when the file is no breakhis checkpoint."""
    from .checkpoint import NotACheckpointError, load_checkpoint
    from .train import checkpoint_identity

    try:
        state = load_checkpoint(path, map_location="cpu", mmap=True)
    except NotACheckpointError:
        return None, {}, {}
    extra = state.get("extra") or {}
    data, task = dict(extra.get("data") or {}), extra.get("task") or {}
    # by the names of DataSpec.to_dict, the task as the task's own record names it
    data.update(task=task.get("name", data.get("task")), magnification=task.get("magnification"))
    return checkpoint_identity(state), dict(state.get("config") or {}), data


def _other_settings(summary: dict[str, Any], model: Any, data: dict[str, Any]) -> bool:
    """Whether a fold was trained with settings other than the cv ``summary``'s, such that
    ``cv --resume`` refuses it: training settings (``model``: its report's ``model``, or its
    checkpoint's ``config``) as :func:`breakhis.train.resume_differences` compares them,
    and the data settings of :func:`_data_settings` (``data``: the fold's, from its report
    or checkpoint) but those the others make ineffective
    (:func:`breakhis.experiments._without_effect`: ``n_splits`` of the official protocol,
    ...). Settings neither records are not compared."""
    from .experiments import _without_effect
    from .train import _config_differences

    wanted = summary.get("model")
    if not isinstance(wanted, dict) or not isinstance(model, dict):
        return False
    settings = {k: v for k, v in wanted.items() if k != "val_fraction"}
    if _config_differences({k: v for k, v in model.items() if k != "val_fraction"}, settings):
        return True
    ours = _data_settings(summary.get("task"), summary.get("protocol"), wanted.get("val_fraction"))
    known = {k: v for k, v in ours.items() if v is not None}
    spec = {key: known[key] for key in ("protocol", "val_fraction") if key in known}
    skipped = _without_effect({**spec, "image_folder": known.get("task") == "folder"})
    return any(data.get(key) is not None and data[key] != value
               for key, value in known.items() if key not in skipped)


def _data_settings(task: Any, protocol: Any, val_fraction: Any) -> dict[str, Any]:
    """The data settings a report records (its ``task`` and ``protocol`` entries and the
    validation share), by the names of :meth:`breakhis.experiments.DataSpec.to_dict`;
    ``None`` for what it does not record."""
    task = task if isinstance(task, dict) else {}
    protocol = protocol if isinstance(protocol, dict) else {}
    return {"task": task.get("name"), "magnification": task.get("magnification"),
            "protocol": protocol.get("protocol"), "split_seed": protocol.get("split_seed"),
            "n_splits": protocol.get("n_splits"), "val_fraction": val_fraction}


def _stale_folds(folder: Path, report: dict[str, Any]) -> dict[int, str]:
    """Folds of a report that changed since it was written, with why (a key of
    :data:`_STALE_REASONS`), in the report's fold order.

    A single run's report (``test_metrics.json``, no ``summary``) has its fold
    ``changed`` when the folder's ``checkpoint.pt`` is not the one the report records
    (``checkpoint``: epoch and fingerprint; or no breakhis checkpoint): trained further
    (``train --resume``) or replaced (a fresh ``train``) without a new report. A report
    that records no checkpoint (older breakhis), or a folder without ``checkpoint.pt``
    (``evaluate --out``), says nothing.

    A cv summary's folds:

    - ``retrained``: the fold's ``fold<k>/test_metrics.json`` was made from another
      checkpoint than the summary records (``folds[].checkpoint``: epoch and
      fingerprint); a summary written before it recorded them is compared by the
      fold's metrics;
    - ``unfinished``: the fold's ``checkpoint.pt`` is not the one the summary records
      (or no breakhis checkpoint), while its report is gone or still the summary's: a
      retraining killed before it wrote its report;
    - ``no report``: the report is gone (its checkpoint, if any, unchanged);
    - ``other settings``: retrained (report or checkpoint) with settings other than the
      summary's (:func:`_other_settings`, e.g. ``train --overwrite --seed 7`` into the
      fold's folder), which ``cv --resume`` refuses to reuse;
    - ``more epochs``: otherwise, trained for more epochs than the summary's ``epochs``
      (``train --resume --epochs 4`` in the fold's folder), which ``cv --resume`` refuses
      unless given as many.

    A summary without its ``fold<k>`` folders (copied on its own) says nothing.
    """
    if "summary" not in report:
        recorded, ckpt = report.get("checkpoint"), folder / "checkpoint.pt"
        if recorded is not None and ckpt.is_file() and _checkpoint_identity(ckpt)[0] != recorded:
            return {report.get("fold"): "changed"}
        return {}
    stale: dict[int, str] = {}
    for entry in report.get("folds") or []:
        fold_dir = folder / f"fold{entry.get('fold')}"
        if not fold_dir.is_dir():
            continue
        done, ckpt = fold_dir / "test_metrics.json", fold_dir / "checkpoint.pt"
        recorded = entry.get("checkpoint")
        if done.is_file():
            current = read_report(done)
            if recorded is not None:
                changed = current.get("checkpoint") != recorded
            else:
                changed = current.get("metrics") != entry.get("metrics")
            if changed:
                model = current.get("model")
                share = model.get("val_fraction") if isinstance(model, dict) else None
                data = _data_settings(current.get("task"), current.get("protocol"), share)
                other = _other_settings(report, model, data)
                # cv --resume refuses by the checkpoint's epochs, which a later train --resume
                # may have taken beyond its report's
                longer = _beyond_epochs(report, current.get("checkpoint")) or (
                    ckpt.is_file() and _beyond_epochs(report, _checkpoint_identity(ckpt)[0]))
                stale[entry["fold"]] = "other settings" if other else "more epochs" if longer else "retrained"
                continue
        identity, config, data = (_checkpoint_identity(ckpt) if recorded is not None and ckpt.is_file()
                                  else (recorded, {}, {}))
        if recorded is not None and identity != recorded:
            other = _other_settings(report, config, data)
            longer = _beyond_epochs(report, identity)
            stale[entry["fold"]] = "other settings" if other else "more epochs" if longer else "unfinished"
        elif not done.is_file():
            stale[entry["fold"]] = "no report"
    return stale


def _beyond_epochs(summary: dict[str, Any], identity: Any) -> int | None:
    """The epochs a fold's checkpoint (``identity``: :func:`breakhis.train.checkpoint_identity`)
    has trained where they exceed the cv ``summary``'s ``epochs`` (``train --resume
    --epochs`` more in the fold's folder), which ``cv --resume`` with the summary's
    settings refuses; else ``None``."""
    epochs = (summary.get("model") or {}).get("epochs") if isinstance(summary.get("model"), dict) else None
    last = identity.get("epoch") if isinstance(identity, dict) else None
    if isinstance(epochs, int) and isinstance(last, int) and last + 1 > epochs:
        return last + 1
    return None


def _fold_epochs(folder: Path, fold: int) -> int:
    """The epochs fold ``fold`` of the cv in ``folder`` has trained: its checkpoint's, or
    where that is gone or none, its report's."""
    ckpt = folder / f"fold{fold}" / "checkpoint.pt"
    identity = _checkpoint_identity(ckpt)[0] if ckpt.is_file() else None
    if identity is None:
        report = folder / f"fold{fold}" / "test_metrics.json"
        identity = read_report(report).get("checkpoint") if report.is_file() else None
    return int((identity or {}).get("epoch", -1)) + 1


def _stale_note(stale: Mapping[int, str], folder: Path) -> str:
    """The ``stale`` text of a row of ``folder`` (:func:`_stale_folds`): what changed, and
    what to run: ``cv --resume`` for a summary (for a fold retrained with other settings,
    retraining it with the summary's, or a cv afresh; for one trained further, ``cv
    --resume --epochs`` as far), evaluating the checkpoint again (or finishing its
    training) for a single run."""
    if "changed" in stale.values():
        return (f"stale: {_STALE_REASONS['changed']}; rerun breakhis-repro evaluate "
                f"--checkpoint {folder / 'checkpoint.pt'}, or train --resume to finish it")
    parts = []
    for reason, text in _STALE_REASONS.items():
        folds = [str(f) for f, why in stale.items() if why == reason]
        if folds:
            parts.append(f"{plural(len(folds), 'fold')} {', '.join(folds)} {text}")
    if "other settings" in stale.values():
        return (f"stale: {'; '.join(parts)}; retrain such a fold with the summary's settings "
                "(then cv --resume), or run cv afresh in another folder")
    if "more epochs" in stale.values():
        most = max(_fold_epochs(folder, f) for f, why in stale.items() if why == "more epochs")
        return (f"stale: {'; '.join(parts)}; rerun cv --resume --epochs {most} (the other folds then "
                "train as far), or run cv afresh in another folder")
    return f"stale: {'; '.join(parts)}; rerun cv --resume"


def _run_names(run_dirs: Sequence[str | os.PathLike[str]]) -> list[str]:
    """The name of each run folder in the results table: the shortest trailing part of its
    path (made absolute, symbolic links kept) that no other folder's path ends with, so
    that ``fold0`` of two cross-validations can be told apart. A folder given twice has
    one name.

    Examples:
        >>> _run_names(["/r/cvA/fold0", "/r/cvB/fold0", "/r/cvA", "/r/cvA/fold0"])
        ['cvA/fold0', 'cvB/fold0', 'cvA', 'cvA/fold0']
        >>> _run_names(["/r/x/b/fold0", "/r/b/fold0"])
        ['x/b/fold0', 'r/b/fold0']
    """
    paths = [Path(os.path.abspath(folder)) for folder in run_dirs]
    names = []
    for path in paths:
        others = {p.parts for p in paths if p != path}
        parts = path.parts
        k = 1
        # stops at the whole path at the latest: the others differ and start at the root too
        while k < len(parts) and any(o[-k:] == parts[-k:] for o in others):
            k += 1
        names.append(Path(*parts[-k:]).as_posix())
    return names


def results_rows(run_dirs: Sequence[str | os.PathLike[str]]) -> list[dict[str, Any]]:
    """One row per run folder, the data of :func:`results_table` (columns
    :data:`RESULTS_COLUMNS`; metrics as fractions).

    ``run`` is the folder as given, ``name`` the run's name in the table: the shortest
    trailing part of its path that no other folder's path ends with (``cvA/fold0`` and
    ``cvB/fold0``, not ``fold0`` twice; a lone ``fold0`` stays ``fold0``).

    A folder with ``cv_metrics.json`` gives its mean and standard deviation over folds
    (``summary`` of :func:`breakhis.evaluate.summarize_folds`) and, per metric, the
    number of folds averaged (``<metric>_n``: fewer than ``folds`` where a fold has no
    value, e.g. no ROC AUC on a fold of one class); otherwise its ``test_metrics.json``
    gives one fold (no standard deviation). A summary that a fold changed since it was
    written, or a single run's report whose folder's ``checkpoint.pt`` changed since (see
    :func:`results_table`), is still read, with a warning, and its row names those folds
    (``stale_folds``: the report's own fold, for a single run) and says why and what to
    run (``stale``, as the table's folds cell).
    ``patient_disjoint`` and ``split_notes`` are those of
    :func:`breakhis.evaluate.split_integrity` (every fold's, for a summary; ``None``:
    unknown, in a report written before it was recorded).

    Raises:
        FileNotFoundError: for a run folder that does not exist (or is a file).
        ValueError: for a folder with neither file, a report that is not a JSON object
            (the message names the file), or no run folder at all.
    """
    if not run_dirs:
        raise ValueError("expected at least one run folder, but got none")
    rows = []
    for run_dir, run_name in zip(run_dirs, _run_names(run_dirs)):
        folder, name, report = _load_run(run_dir)
        if "summary" in report:
            stats = report["summary"]
            folds = len(report.get("folds") or []) or max(s["n"] for s in stats.values())
        else:
            metrics = report.get("metrics") or {}
            stats = {k: {"mean": metrics[k], "std": None, "n": 1}
                     for k in SUMMARY_METRICS if metrics.get(k) is not None}
            folds = 1
        stale = _stale_folds(folder, report)
        if stale:
            _LOG.warning("%s: %s", folder / name, _stale_note(stale, folder))
        task, protocol = report.get("task") or {}, report["protocol"]
        model = report.get("model") or {}
        disjoint, notes = split_integrity(report)
        row: dict[str, Any] = {
            "run": str(folder), "name": run_name, "source": name, "task": task.get("name"),
            "magnification": task.get("magnification"), "protocol": protocol.get("protocol"),
            "patient_disjoint": disjoint,
            "backbone": model.get("backbone"), "head": model.get("head"),
            "se_reduction": model.get("se_reduction"), "input_size": model.get("input_size"),
            # None is a random start: a report without the entry says "unknown"
            "weights": model.get("weights", "unknown"), "epochs": model.get("epochs"),
            "epochs_trained": report.get("epochs_trained"),
            "lr": model.get("lr"), "oversample": model.get("oversample"),
            **{key: (protocol if key in _PROTOCOL_SETTINGS else model).get(key)
               for key, _ in _VARYING_SETTINGS},
            "folds": folds, "fold": None if "summary" in report else report.get("fold"),
            "synthetic": bool(report.get("synthetic", False)),
            "data_root": report.get("data_root"), "stale_folds": list(stale),
            "stale": _stale_note(stale, folder) if stale else None, "split_notes": notes,
        }
        for key in SUMMARY_METRICS:
            stat = stats.get(key) or {}
            row[f"{key}_mean"], row[f"{key}_std"] = stat.get("mean"), stat.get("std")
            row[f"{key}_n"] = stat.get("n", 0)  # 0: no fold has the metric
        rows.append(row)
    return rows


def _varying(rows: Sequence[dict[str, Any]]) -> list[tuple[str, str]]:
    """The settings of :data:`_VARYING_SETTINGS` with two or more recorded values."""
    return [(key, label) for key, label in _VARYING_SETTINGS
            if len({_comparable(r[key]) for r in rows if r.get(key) is not None}) > 1]


def _comparable(value: Any) -> Any:
    """``value`` for comparison: numbers by value (0 and 0.0 are one setting), bools apart."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return repr(value)
    return float(value)


def _setting(label: str, value: Any) -> str:
    if isinstance(value, bool):
        return label if value else f"no {label}"
    return f"{label} {value:g}" if isinstance(value, float) else f"{label} {value}"


def _training(row: dict[str, Any], varying: Sequence[tuple[str, str]] = ()) -> str:
    """How a run was trained, in a table cell: start weights, epochs, learning rate,
    over-sampling, and the ``varying`` settings (those that differ between the runs of
    the table). What a report written before a setting was recorded lacks is left out."""
    weights = row.get("weights")
    parts = ["random init" if weights is None else
             weights if weights in ("imagenet", "unknown") else f"weights {Path(str(weights)).name}"]
    if row.get("epochs") is not None:
        trained = row.get("epochs_trained")
        # a run cut short (evaluated before its last epoch) says how far it got
        parts.append(f"{trained} of {row['epochs']} ep"
                     if trained is not None and trained < row["epochs"] else
                     f"{row['epochs']} ep")
    if row.get("lr") is not None:
        parts.append(f"lr {row['lr']:g}")
    if row.get("oversample") is not None:
        parts.append("oversampled" if row["oversample"] else "not oversampled")
    parts += [_setting(label, row[key]) for key, label in varying if row.get(key) is not None]
    return ", ".join(parts)


def _pct(mean: float | None, std: float | None, n: int | None = None,
         folds: int | None = None) -> str:
    """``mean ± std`` in percent; ``(n of folds folds)`` when fewer folds have the metric."""
    if mean is None:
        return "n/a"
    text = f"{100 * mean:.2f}" + ("" if std is None else f" ± {100 * std:.2f}")
    if n is not None and folds is not None and n < folds:
        text += f" ({n} of {folds} folds)"
    return text


#: How the results table marks a run that is not patient-disjoint.
_NOT_DISJOINT = "NOT patient-disjoint"


def _leaks(row: Mapping[str, Any]) -> bool:
    """Whether a row is marked :data:`_NOT_DISJOINT`: a run of a protocol meant to be
    patient-disjoint (``patient``, ``official``) whose report (any fold, for a summary)
    records that it is not. ``image`` runs never are, as the protocol notes say; an
    unknown value (``None``: an older report) is not marked."""
    return row.get("patient_disjoint") is False and row.get("protocol") != "image"


def _cell(value: Any) -> str:
    return "" if value is None else str(value).replace("|", "\\|")


#: How the files of :func:`results_table` begin: the Markdown's title, the CSV's first
#: column (``run`` in tables of every version). An existing file that begins otherwise is
#: not replaced.
_TABLE_TITLE = "# Results (mean ± std over folds, percent)"
_TABLE_CSV_START = "run,"


def _not_a_table_problem(path: Path, starts: str) -> str | None:
    """What ``path`` is when :func:`results_table` must not replace it: an existing file,
    not empty, that does not begin as the table's file does (``starts``): someone's other
    file (a fold table, a patient list, an image) given as ``out`` or lying where the CSV
    goes; ``None`` when it may be written."""
    if not path.is_file():
        return None
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            head = handle.read(len(starts))
    except OSError:
        return None  # writing it names what is wrong
    if not head or head == starts:
        return None
    return (f"{str(path)!r}, an existing file that is not a table of this command (it does not "
            f"begin with {starts!r})")


def results_table(
    run_dirs: Sequence[str | os.PathLike[str]],
    *,
    out: str | os.PathLike[str] | None = None,
) -> str:
    """A Markdown table of several runs, in the shape of the paper's results tables.

    One row per run folder: task, protocol, backbone, head (``+SE8`` with SE blocks),
    input size, training (start weights, epochs, ``"1 of 5 ep"`` for a run evaluated
    before its last epoch, learning rate, over-sampling, and any other training
    setting whose recorded values differ between the runs: batch size, momentum,
    weight decay, dropout, augmentation, shift, rotation, plateau factor and patience,
    validation fraction, seed, split seed, number of splits), folds (``"2 of 5"`` for a
    partial cross-validation, ``"1 (fold 0 of 5)"`` for one fold; a stale summary is
    marked there, see below), then image accuracy, patient recognition rate, macro F1
    and ROC AUC as mean ± std over folds in percent; a metric that some folds lack
    (``None`` there, e.g. no ROC AUC on a fold of one class) is averaged over the others
    and says so: ``97.92 ± 2.95 (2 of 3 folds)``. Every row names its protocol
    (image-split numbers are optimistic, see the notes under the table), and runs on
    synthetic data are marked ``SYNTHETIC``; when the runs come from more than one data
    folder, each row names its own. A run of the ``patient`` or ``official`` protocol
    whose report records a fold that is not patient-disjoint (an official fold table
    that puts a patient in train and test) shows its protocol as ``official (NOT
    patient-disjoint)``, and the notes of every run's folds (that too, images a fold
    table left out) are listed under the table, naming the run and the fold.

    Each run is named by the shortest trailing part of its path that no other folder's
    path ends with, in the table and in the notes under it alike: ``cvA/fold0`` and
    ``cvB/fold0`` (not ``fold0`` twice); a lone ``fold0`` stays ``fold0``. The ``Runs:``
    line at the end lists the folders as given.

    A cv summary is stale when a fold changed since it was written; the row says which
    folds and how: ``retrained since the summary`` (the fold's ``test_metrics.json`` was
    made from another checkpoint than the summary records), ``retrained since the
    summary without a new test_metrics.json`` (its ``checkpoint.pt`` is another, its
    report gone or still the old one: a retraining interrupted), ``lost
    test_metrics.json since the summary``. A summary copied without its ``fold<k>``
    folders is not checked. A single run's report is stale when its folder's
    ``checkpoint.pt`` is not the checkpoint the report was made from (trained further by
    ``train --resume``, or replaced, and interrupted before a new report): the row says
    ``checkpoint.pt changed since this report`` and names the ``evaluate --checkpoint``
    to rerun; a folder without ``checkpoint.pt`` (``evaluate --out``), or a report that
    records no checkpoint (older breakhis), is not checked.

    Args:
        run_dirs: folders holding ``cv_metrics.json`` (a ``cv`` run) or
            ``test_metrics.json`` (one fold).
        out: when given, write the Markdown here and the CSV (columns
            :data:`RESULTS_COLUMNS`, fractions not percent) next to it (``.csv``).

    Returns:
        The Markdown text.

    Raises:
        FileNotFoundError: for a run folder that does not exist (or is a file).
        ValueError: for a folder without metrics (the message names it and the files
            expected), a report that is not a JSON object (naming it), or an ``out``
            ending in ``.csv``, naming a folder, or under a file, or whose Markdown or CSV
            path holds a file that is not a table written before (a fold table given as
            ``out``: it would be lost); ``out`` is checked before any run is read.
    """
    if out is not None:
        md = Path(out)
        if md.suffix.lower() == ".csv":
            raise SettingError("out", "is the Markdown file (the CSV goes next to it), but got "
                               f"{str(out)!r}")
        if md.is_dir() or str(out).endswith(("/", os.sep)):
            raise SettingError("out", "is the Markdown file (the CSV goes next to it), but "
                               f"{str(out)!r} names a folder")
        if md.with_suffix(".csv").is_dir():
            raise SettingError("out", f"{str(out)!r} puts the CSV at "
                               f"{str(md.with_suffix('.csv'))!r}, but that is a folder")
        problem = folder_problem(md.parent)
        if problem:
            raise SettingError("out", f"{str(out)!r} needs a folder for the files, but {problem}")
        for path, starts in ((md, _TABLE_TITLE), (md.with_suffix(".csv"), _TABLE_CSV_START)):
            problem = _not_a_table_problem(path, starts)
            if problem:
                raise SettingError("out", f"{str(out)!r} would replace {problem}: pass another path, "
                                   "or remove the file")
    rows = results_rows(run_dirs)
    varying = _varying(rows)
    roots = {r["data_root"] for r in rows if r["data_root"] is not None}
    header = ["run", "task", "protocol", "backbone", "head", "input", "training", "folds",
              *[f"{label} (%)" for _, label in _TABLE_METRICS], "data"]
    lines = [_TABLE_TITLE, "",
             "| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for row in rows:
        task = row["task"] or "?"
        if row["magnification"]:
            task += f" {row['magnification']}X"
        head = row["head"] or "?"
        if row["se_reduction"]:
            head += f"+SE{row['se_reduction']}"
        folds = str(row["folds"])
        of = f" of {row['n_splits']}" if row["n_splits"] else ""
        if row["fold"] is not None:
            folds += f" (fold {row['fold']}{of})"  # one fold: of which split
        elif row["n_splits"] and row["folds"] < row["n_splits"]:
            folds += of  # a partial cross-validation (cv --folds)
        if row["stale"]:
            folds += f" ({row['stale']})"
        data = "SYNTHETIC" if row["synthetic"] else "real"
        if len(roots) > 1 and row["data_root"] is not None:
            data += f" ({row['data_root']})"
        protocol = row["protocol"]
        if _leaks(row):
            protocol = f"{protocol} ({_NOT_DISJOINT})"
        cells = [row["name"], task, protocol, row["backbone"], head, row["input_size"],
                 _training(row, varying), folds,
                 *[_pct(row[f"{key}_mean"], row[f"{key}_std"], row[f"{key}_n"], row["folds"])
                   for key, _ in _TABLE_METRICS],
                 data]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    lines += ["", "Protocols:", ""]
    for protocol in dict.fromkeys(r["protocol"] for r in rows):
        lines.append(f"- `{protocol}`: {PROTOCOL_DESCRIPTIONS.get(protocol, '?')}")
    noted = [r for r in rows if r["split_notes"] or _leaks(r)]
    if noted:
        why = (f" ({_NOT_DISJOINT}: test images may be of patients the model was trained "
               "on, so the numbers are optimistic and not comparable with patient-disjoint "
               "results)" if any(_leaks(r) for r in noted) else "")
        lines += ["", f"Split notes{why}:", ""]
        for row in noted:
            text = f"- `{row['name']}`"
            if _leaks(row):
                text += f" ({_NOT_DISJOINT})"
            if row["split_notes"]:
                text += ": " + "; ".join(row["split_notes"])
            lines.append(text)
    if any(r["synthetic"] for r in rows):
        lines += ["", "SYNTHETIC: generated stand-in images with the BreaKHis layout, not "
                  "BreaKHis; these numbers test the pipeline and say nothing about the paper."]
    lines += ["", "Runs: " + ", ".join(f"`{r['run']}` ({r['source']})" for r in rows), ""]
    text = "\n".join(lines)
    if out is not None:
        # each file whole or as it was (a full disk names the file): atomic_writer
        md = Path(out)
        with atomic_writer(md, "w") as handle:
            handle.write(text)
        with atomic_writer(md.with_suffix(".csv"), "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(RESULTS_COLUMNS))
            writer.writeheader()
            writer.writerows({**r, "stale_folds": " ".join(str(f) for f in r["stale_folds"]),
                              "split_notes": " | ".join(r["split_notes"])}
                             for r in rows)
    return text
