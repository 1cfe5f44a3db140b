"""breakhis: reproduce Liu, Juhas & Zhang (2020), bilinear CNNs on BreaKHis.

Built only on the public API of ``bilinearpool``. Modules: :mod:`~breakhis.data`
(indexing), :mod:`~breakhis.synthetic` (a synthetic stand-in tree),
:mod:`~breakhis.tasks` (MSBC/MIBC/MSFC/MIFC), :mod:`~breakhis.splits` (protocols),
:mod:`~breakhis.train` (recipe, checkpoints, DDP), :mod:`~breakhis.evaluate` (metrics),
:mod:`~breakhis.experiments` (folds and cross-validation), :mod:`~breakhis.plots`
(ROC, t-SNE and Grad-CAM figures, the results table), :mod:`~breakhis.cli`.

The package comes with every install of ``bilinearpool``, but needs the packages of its
extra, ``pip install 'bilinearpool[reference]'`` (Pillow, scikit-learn, matplotlib, tqdm,
captum, torchvision, timm). Importing ``breakhis`` itself imports none of them: the names
below are loaded from their modules on first use, and one that needs a missing package
raises an :class:`ImportError` naming the extra; ``breakhis-repro`` says the same in one
line before it starts.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: Import name -> distribution of what the reference extra installs.
REQUIREMENTS: dict[str, str] = {
    "PIL": "pillow",
    "sklearn": "scikit-learn",
    "matplotlib": "matplotlib",
    "tqdm": "tqdm",
    "captum": "captum",
    "torchvision": "torchvision",
    "timm": "timm",
}
#: The install command that brings them.
INSTALL = "pip install 'bilinearpool[reference]' (from a clone: pip install '.[reference]')"

# Public name -> the module that defines it (loaded on first use).
_EXPORTS: dict[str, str] = {
    "DataIndex": "data",
    "ImageRecord": "data",
    "index_breakhis": "data",
    "index_image_folder": "data",
    "parse_breakhis_name": "data",
    "classification_metrics": "evaluate",
    "patient_recognition_rate": "evaluate",
    "summarize_folds": "evaluate",
    "image_kfold": "splits",
    "make_splits": "splits",
    "patient_kfold": "splits",
    "make_synthetic_breakhis": "synthetic",
    "Task": "tasks",
    "get_task": "tasks",
}

__all__ = sorted([*_EXPORTS, "INSTALL", "REQUIREMENTS", "__version__", "missing_requirements"])

if TYPE_CHECKING:
    from .data import DataIndex, ImageRecord, index_breakhis, index_image_folder, parse_breakhis_name
    from .evaluate import classification_metrics, patient_recognition_rate, summarize_folds
    from .splits import image_kfold, make_splits, patient_kfold
    from .synthetic import make_synthetic_breakhis
    from .tasks import Task, get_task


def missing_requirements() -> list[str]:
    """The distributions of the reference extra that are not installed (found, not imported).

    Examples:
        >>> isinstance(missing_requirements(), list)
        True
    """
    return [dist for module, dist in REQUIREMENTS.items() if not _installed(module)]


def _installed(module: str) -> bool:
    try:
        # None also for a module whose import is blocked (None in sys.modules)
        return importlib.util.find_spec(module) is not None
    except ValueError:  # in sys.modules without a __spec__: loaded, some other way
        return True
    except ImportError:
        return False


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'breakhis' has no attribute {name!r}")
    try:
        value = getattr(importlib.import_module(f".{module}", __name__), name)
    except ModuleNotFoundError as err:
        top = (err.name or "").partition(".")[0]
        if top not in REQUIREMENTS:
            raise
        others = [d for d in missing_requirements() if d != REQUIREMENTS[top]]
        also = f" (of the reference extra, {', '.join(others)} too)" if others else ""
        raise ImportError(
            f"breakhis.{name} needs {REQUIREMENTS[top]}, which is not installed{also}: {INSTALL}"
        ) from err
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
