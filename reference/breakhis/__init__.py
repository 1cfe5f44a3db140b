"""breakhis: reproduce Liu, Juhas & Zhang (2020), bilinear CNNs on BreaKHis.

Built only on the public API of ``bilinearpool``. Modules: :mod:`~breakhis.data`
(indexing), :mod:`~breakhis.synthetic` (a synthetic stand-in tree),
:mod:`~breakhis.tasks` (MSBC/MIBC/MSFC/MIFC), :mod:`~breakhis.splits` (protocols),
:mod:`~breakhis.train` (recipe, checkpoints, DDP), :mod:`~breakhis.evaluate` (metrics),
:mod:`~breakhis.experiments` (folds and cross-validation), :mod:`~breakhis.plots`
(ROC, t-SNE and Grad-CAM figures, the results table), :mod:`~breakhis.cli`.
Heavy modules (torch training) are imported on use, so indexing stays light.
"""

from __future__ import annotations

from .data import DataIndex, ImageRecord, index_breakhis, index_image_folder, parse_breakhis_name
from .evaluate import classification_metrics, patient_recognition_rate, summarize_folds
from .splits import image_kfold, make_splits, patient_kfold
from .synthetic import make_synthetic_breakhis
from .tasks import Task, get_task

__version__ = "0.1.0"

__all__ = [
    "DataIndex",
    "ImageRecord",
    "Task",
    "__version__",
    "classification_metrics",
    "get_task",
    "image_kfold",
    "index_breakhis",
    "index_image_folder",
    "make_splits",
    "make_synthetic_breakhis",
    "parse_breakhis_name",
    "patient_kfold",
    "patient_recognition_rate",
    "summarize_folds",
]
