"""The paper's training recipe: SGD, plateau schedule, augmentation, over-sampling.

Defaults follow Liu, Juhas & Zhang (2020) as summarised in BREAKHIS.md: SGD with
learning rate 0.1, batch 16, the learning rate divided by 10 when the validation loss
has not improved for 10 epochs (as Keras' ``ReduceLROnPlateau``: at the 10th epoch
without an improvement of at least 1e-4), flips/shifts/rotations, over-sampling of the
smaller classes, 224x224 inputs. The paper gives no number of epochs, momentum, weight
decay, validation share or rotation range: those defaults are ours. Everything can be
overridden through :class:`TrainConfig`.

Each epoch ends with an atomic checkpoint (model, optimiser, scheduler, sampler, RNG
states, history) in the run folder; :func:`fit` with ``resume=True`` continues from it
and reaches the same weights as a run that was never interrupted, because every epoch's
sample order and augmentation are drawn from ``(seed, epoch)`` alone. Under torchrun
the same code trains with DistributedDataParallel, each process taking its share of
every global batch: the same images with the same augmentations as one process. On
CUDA (NCCL) batch-norm layers become ``SyncBatchNorm``, so their statistics cover the
global batch as in one process; on CPUs (gloo), where torch has no ``SyncBatchNorm``,
each process normalises with the statistics of its own share (a warning says so), and
validation scores the main process's running statistics, those the checkpoint keeps.
Under DDP every process reseeds torch's generators at the start of each epoch from
``(seed, epoch, rank)`` (:func:`rank_seed`), so that dropout masks differ between
processes and a resumed run draws the same ones; one process keeps a single stream.

Inputs are normalised with the mean and standard deviation the built backbone expects
(:func:`breakhis.models.input_normalization`); the values used are stored in the
checkpoint (``normalization``) and :func:`checkpoint_normalization` gives them back to
evaluation, prediction and figures (ImageNet's for checkpoints written before they were
stored). Before the first epoch of a fresh run the main process runs the model once on a
zero image of the requested size, so that a backbone too small for it fails at once with
a clear error; only then does it remove what an earlier run left in the run folder
(``stale_outputs``), so that a run that cannot start leaves them in place. Settings out of
range are refused earlier still, when the :class:`TrainConfig` is made.

Training stops with :class:`TrainingDivergedError` at the end of the first epoch whose
loss (training or validation) or weights are no longer finite, before that epoch's
checkpoint: ``checkpoint.pt`` keeps the last finite epoch, never NaN weights.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import numbers
import os
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from ._files import (
    SettingError,
    atomic_writer,
    check_int,
    plural,
    progress_bar,
    remove_stale_temporaries,
)
from ._signals import Terminated, terminate_deferred
from .checkpoint import (
    NotACheckpointError,
    capture_rng_state,
    load_checkpoint,
    load_run_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from .data import ImageRecord
from .dataset import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageDataset,
    MIN_SIZE,
    build_eval_transform,
    build_train_transform,
)
from .distributed import DistInfo, all_reduce_sum, barrier, broadcast_buffers, init_distributed
from .evaluate import check_finite_probs
from .models import (
    HEADS,
    build_network,
    check_backbone,
    check_input_size,
    check_weights,
    input_normalization,
)
from .sampler import BalancedSampler

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_NAME",
    "RESUMABLE_CHANGES",
    "SEED_MAX",
    "FitResult",
    "TrainConfig",
    "TrainingDivergedError",
    "check_batch_split",
    "check_resumable",
    "checkpoint_identity",
    "checkpoint_normalization",
    "epochs_trained",
    "fit",
    "load_model",
    "log_stop",
    "plateau_scheduler",
    "predict_probs",
    "rank_seed",
    "resume_differences",
    "seed_everything",
    "sync_batchnorm",
    "warn_unfinished",
]

CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_FORMAT = "breakhis-checkpoint-v1"
#: Smallest decrease of the monitored loss that counts as an improvement (absolute, as
#: Keras' ``ReduceLROnPlateau`` ``min_delta``).
PLATEAU_MIN_DELTA = 1e-4
#: Largest training seed: epoch ``e`` seeds torch's generators with ``seed + e``, which
#: they take up to ``2**64 - 1``; NumPy's (sampler, DDP reseeding) take any seed >= 0.
SEED_MAX = 2**63 - 1
#: :class:`TrainConfig` fields a resumed run may change: ``epochs`` extends the run; the
#: others change where and how fast it runs, not what it learns. Every other setting
#: must equal the checkpoint's, so that the checkpoint records what was trained.
RESUMABLE_CHANGES: frozenset[str] = frozenset({"epochs", "num_workers", "device",
                                               "deterministic"})
#: Files :func:`fit` writes into its run folder besides ``checkpoint.pt`` (atomically).
_RUN_FILES: tuple[str, ...] = ("metrics.csv", "config.json")
_LOG = logging.getLogger("breakhis.train")


@dataclass
class TrainConfig:
    """Model and optimisation settings (paper defaults).

    Args:
        head: ``plain``, ``bcnn`` or ``fast-bcnn``.
        backbone: backbone name for ``bilinearpool`` (or ``tiny``).
        weights: ``"imagenet"``, a torchvision weights name, a timm pretrained tag, a local
            state-dict path, or ``None`` (random init).
        se_reduction: SE reduction ratio (the paper's "+SE": 8), at least 1, or ``None``.
        dropout: dropout before the classifier, in ``[0, 1)``.
        input_size: image side after resizing (224; the paper also uses 197, 448).
        epochs: training epochs (not given in the paper; 50 here), at least 1.
        batch_size: global batch size (all processes together), at least 1.
        lr: SGD learning rate, positive and finite.
        momentum: SGD momentum (0, as in Keras' SGD default), in ``[0, 1)``.
        weight_decay: L2 penalty, finite and at least 0.
        plateau_factor: learning-rate factor on a plateau, in ``(0, 1)``.
        plateau_patience: the learning rate is multiplied by ``plateau_factor`` at the
            ``plateau_patience``-th consecutive epoch whose monitored loss did not
            improve on the best so far by at least 1e-4 (absolute), as Keras'
            ``ReduceLROnPlateau(patience=plateau_patience, min_delta=1e-4)``; at least 1.
        oversample: over-sample the smaller classes.
        augment: random flips, shifts and rotations.
        shift: largest shift, as a fraction of the side, in ``[0, 1)``; left at 0.1
            without ``augment``, which shifts nothing.
        rotation: largest rotation in degrees, finite and at least 0 (the paper gives no
            range; 90 is ours, and uncovered corners are filled black); left at 90
            without ``augment``, which rotates nothing.
        seed: seed for initialisation, sampling and augmentation: an integer in
            ``[0, 2**63 - 1]`` (:data:`SEED_MAX`), so that the seed ``seed + epoch`` of
            every epoch's generator stays within what torch takes.
        num_workers: data-loading processes per training process, at least 0.
        device: ``auto``, ``cpu`` or ``cuda``.
        deterministic: ask torch for deterministic kernels.

    Raises:
        breakhis._files.SettingError: (a ``ValueError`` naming the setting) for a setting
            outside the ranges above (an integer setting that is not an integer included),
            a ``shift`` or ``rotation`` other than its default with ``augment=False`` (it
            would be recorded, and compared on resume, without effect), a backbone name
            that ``bilinearpool`` does not resolve (:func:`breakhis.models.check_backbone`)
            or ``weights`` for ``tiny``, on construction: before a run indexes its data or
            removes an earlier run's files.
    """

    head: str = "fast-bcnn"
    backbone: str = "inception_v3"
    weights: str | None = "imagenet"
    se_reduction: int | None = None
    dropout: float = 0.0
    input_size: int = 224
    epochs: int = 50
    batch_size: int = 16
    lr: float = 0.1
    momentum: float = 0.0
    weight_decay: float = 0.0
    plateau_factor: float = 0.1
    plateau_patience: int = 10
    oversample: bool = True
    augment: bool = True
    shift: float = 0.1
    rotation: float = 90.0
    seed: int = 0
    num_workers: int = 0
    device: str = "auto"
    deterministic: bool = True

    def __post_init__(self) -> None:
        # every setting is checked here, before a run indexes data or removes what an
        # earlier run left in its folder
        if self.head not in HEADS:
            raise SettingError("head", f"must be one of {HEADS}, but got {self.head!r}")
        check_backbone(self.backbone)
        check_weights(self.backbone, self.weights)
        for name in ("epochs", "batch_size"):
            check_int(name, getattr(self, name), 1)
        for name in ("input_size", "plateau_patience", "num_workers"):
            check_int(name, getattr(self, name))
        check_int("seed", self.seed, 0, SEED_MAX, span="[0, 2**63 - 1]",
                  why="epoch e seeds torch's generators with seed + e, which they take up to "
                  "2**64 - 1")
        if self.input_size < MIN_SIZE:  # the transforms' minimum, before any run starts
            raise SettingError("input_size", f"must be >= {MIN_SIZE}, but got {self.input_size}")
        check_input_size(self.backbone, int(self.input_size))
        if not (_is_number(self.lr) and self.lr > 0 and math.isfinite(self.lr)):
            raise SettingError("lr", f"must be a positive number, but got {self.lr!r}")
        if not (_is_number(self.plateau_factor) and 0.0 < self.plateau_factor < 1.0):
            raise SettingError("plateau_factor",
                               f"must be in (0, 1), but got {self.plateau_factor!r}")
        if self.plateau_patience < 1:
            raise SettingError(
                "plateau_patience", "must be >= 1 (the number of epochs without improvement "
                f"at which the learning rate drops), but got {self.plateau_patience}")
        for name, meaning in (("momentum", "SGD momentum; 1 and above never forget a gradient"),
                              ("dropout", "the share of features dropped"),
                              ("shift", "the largest shift as a fraction of the side")):
            value = getattr(self, name)
            if not (_is_number(value) and 0.0 <= value < 1.0):
                raise SettingError(name, f"must be a number in [0, 1) ({meaning}), but got "
                                         f"{value!r}")
        for name, meaning in (("weight_decay", "the L2 penalty"),
                              ("rotation", "the largest rotation in degrees, either way")):
            value = getattr(self, name)
            if not (_is_number(value) and math.isfinite(value) and value >= 0):
                raise SettingError(name, f"must be a finite number >= 0 ({meaning}), but "
                                         f"got {value!r}")
        if self.se_reduction is not None:
            check_int("se_reduction", self.se_reduction)
            if self.se_reduction < 1:
                raise SettingError("se_reduction", "must be >= 1 (or None: no SE blocks), "
                                   f"but got {self.se_reduction}")
        if self.num_workers < 0:
            raise SettingError("num_workers", "must be >= 0 (0 loads the images in the "
                               f"training process), but got {self.num_workers}")
        if not self.augment:
            for name, drawn, verb, others in _AUGMENTATION:
                value, default = getattr(self, name), _TRAIN_DEFAULTS[name]
                if value != default:
                    raise SettingError(
                        name, f"must be left at its default {default!r} with augment=False, "
                        f"which draws no {drawn} (nor {others}), but got {value!r}; set "
                        f"augment=True to {verb}, or leave {name} out")

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (stored in checkpoints and config.json)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Inverse of :meth:`to_dict`; unknown keys are ignored.

        A ``plateau_patience`` of 0, which checkpoints written before it counted epochs
        without improvement may hold (torch's count: the rate dropped at the first such
        epoch), is read as 1, the same schedule; a ``shift`` or ``rotation`` stored with
        ``augment=False`` (before such values were refused) as its default, the same (no)
        augmentation.
        """
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in _upgraded(data).items() if k in names})


def _is_number(value: Any) -> bool:
    """Whether ``value`` is a real number (not a bool, not a string)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


#: Settings of the augmentation that ``augment=False`` makes ineffective, each with
#: what it draws, its verb and what else augmentation draws (:class:`TrainConfig`'s message).
_AUGMENTATION: tuple[tuple[str, str, str, str], ...] = (
    ("shift", "shifts", "shift", "flips or rotations"),
    ("rotation", "rotations", "rotate", "flips or shifts"))


#: :class:`TrainConfig`'s defaults, by setting (as :data:`breakhis.experiments._DATA_DEFAULTS`).
_TRAIN_DEFAULTS: dict[str, Any] = {f.name: f.default for f in fields(TrainConfig)}


def _upgraded(config: dict[str, Any]) -> dict[str, Any]:
    """A stored config in today's terms (see :meth:`TrainConfig.from_dict`): an old
    ``plateau_patience`` of 0 (torch's count, the same schedule as Keras' 1) reads as 1;
    a ``shift`` or ``rotation`` stored with ``augment=False``, which drew none, as its
    default (then refused; so a run made so resumes with ``augment=False`` alone)."""
    out = dict(config)
    if "plateau_patience" in out:
        out["plateau_patience"] = max(1, int(out["plateau_patience"]))
    if out.get("augment") is False:
        out.update({name: _TRAIN_DEFAULTS[name] for name, *_ in _AUGMENTATION if name in out})
    return out


class TrainingDivergedError(RuntimeError):
    """Raised when a training or validation loss, or the weights, are no longer finite.

    :func:`fit` stops at the end of that epoch, before its checkpoint: ``checkpoint.pt``
    keeps the last epoch whose losses and weights were finite.
    """


@dataclass
class FitResult:
    """What :func:`fit` returns: the trained model (unwrapped), history, checkpoint.

    ``normalization`` is the ``(mean, std)`` the model's inputs were normalised with;
    ``checkpoint_info`` the :func:`checkpoint_identity` of the checkpoint written last
    (main process; ``None`` on the others).
    """

    model: nn.Module
    history: list[dict[str, Any]]
    checkpoint: Path
    resumed_from_epoch: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    normalization: tuple[tuple[float, ...], tuple[float, ...]] = (IMAGENET_MEAN, IMAGENET_STD)
    checkpoint_info: dict[str, Any] | None = None


def checkpoint_normalization(
    state: dict[str, Any],
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The ``(mean, std)`` a checkpoint's model was trained with.

    ImageNet's statistics for checkpoints written before breakhis stored them (they were
    trained with those).
    """
    stored = state.get("normalization")
    if not stored:
        return IMAGENET_MEAN, IMAGENET_STD
    return tuple(float(v) for v in stored["mean"]), tuple(float(v) for v in stored["std"])


def checkpoint_identity(state: dict[str, Any]) -> dict[str, Any]:
    """Which checkpoint a report was made from: its last epoch and a fingerprint.

    The fingerprint is the SHA-256 of the checkpoint's settings (``config``), classes,
    ``extra`` (data, fold, file lists) and per-epoch history (losses and timings): two
    runs, even with the same settings, differ in it. :func:`breakhis.experiments.run_cv`
    reuses a fold's ``test_metrics.json`` only when it records the identity of the
    fold's checkpoint.

    Returns:
        ``{"epoch": last trained epoch (from 0), "fingerprint": hex digest}``.
    """
    content = {key: state.get(key) for key in ("config", "classes", "extra", "history")}
    text = json.dumps(content, sort_keys=True, default=str)
    return {"epoch": int(state.get("epoch", -1)),
            "fingerprint": hashlib.sha256(text.encode()).hexdigest()}


def epochs_trained(state: dict[str, Any]) -> int:
    """Epochs a checkpoint has trained: its last epoch (from 0) plus one.

    Args:
        state: a loaded checkpoint, or its :func:`checkpoint_identity`.

    Examples:
        >>> epochs_trained({"epoch": 2}), epochs_trained({})
        (3, 0)
    """
    return int(state.get("epoch", -1)) + 1


def warn_unfinished(
    checkpoint: str | os.PathLike[str], state: dict[str, Any], consequence: str
) -> None:
    """Warn when a checkpoint trained fewer epochs than its settings ask (a run cut short).

    The warning points at the caller of the function that calls this one.

    Args:
        checkpoint: the checkpoint's path, for the message.
        state: the loaded checkpoint.
        consequence: what follows for the results, e.g. ``"the figures show an
            unfinished model"``.
    """
    done, epochs = epochs_trained(state), (state.get("config") or {}).get("epochs")
    if epochs is not None and done < int(epochs):
        warnings.warn(f"checkpoint {str(checkpoint)!r} trained {done} of its {epochs} epochs "
                      f"(its run was cut short); {consequence}", UserWarning, stacklevel=3)


def seed_everything(seed: int, *, deterministic: bool = True) -> None:
    """Seed Python, NumPy and torch; optionally ask for deterministic kernels."""
    import random

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
        torch.use_deterministic_algorithms(True, warn_only=True)


def rank_seed(seed: int, epoch: int, rank: int) -> int:
    """The seed of DDP process ``rank`` for ``epoch``: distinct per process and epoch.

    Drawn from ``(seed, epoch, rank)`` alone (NumPy ``SeedSequence``), so that a resumed
    run reseeds exactly as an uninterrupted one.

    Examples:
        >>> rank_seed(0, 3, 1) == rank_seed(0, 3, 1) != rank_seed(0, 3, 0)
        True
    """
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1, np.uint64)[0]
               >> np.uint64(1))


def plateau_scheduler(
    optimizer: torch.optim.Optimizer, config: TrainConfig
) -> torch.optim.lr_scheduler.ReduceLROnPlateau:
    """The paper's plateau schedule with Keras' counting (see ``plateau_patience``).

    torch's ``ReduceLROnPlateau(patience=p)`` drops the rate when more than ``p``
    epochs did not improve, Keras' at the ``p``-th: hence ``patience - 1``; and Keras'
    ``min_delta`` is absolute (torch's default threshold is relative).
    """
    return torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="min", factor=config.plateau_factor,
        patience=config.plateau_patience - 1, threshold=PLATEAU_MIN_DELTA,
        threshold_mode="abs")


def check_batch_split(config: TrainConfig, info: DistInfo) -> None:
    """SettingError unless the global ``batch_size`` splits evenly over the processes
    (each takes an equal share of every global batch); checked before any indexing.

    Examples:
        >>> info = DistInfo(rank=0, world_size=2, local_rank=0, device=torch.device("cpu"))
        >>> check_batch_split(TrainConfig(batch_size=3), info)
        Traceback (most recent call last):
        ...
        breakhis._files.SettingError: batch_size must be a multiple of the 2 processes torchrun started (each takes an equal share of every global batch), but got 3
    """
    if config.batch_size % info.world_size:
        raise SettingError("batch_size", f"must be a multiple of the {info.world_size} processes "
                           "torchrun started (each takes an equal share of every global batch), "
                           f"but got {config.batch_size}")


def _has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def sync_batchnorm(model: nn.Module, info: DistInfo) -> nn.Module:
    """Make batch norm see the global batch under DDP, where torch allows it.

    With several processes on CUDA (NCCL), batch-norm layers become
    ``nn.SyncBatchNorm`` (same parameters, buffers and ``state_dict`` keys, so a
    checkpoint loads into the plain model). On CPUs (gloo) torch has no
    ``SyncBatchNorm``: the model is returned as it is, and the main process warns that
    each process normalises with the statistics of its own share of the batch.
    A single process, or a model without batch norm, is returned as it is.

    Args:
        model: the network, before the optimiser is built and DDP wraps it.
        info: process placement (``world_size`` and ``device.type`` decide).

    Returns:
        The model to train (converted in place where possible).
    """
    if not info.distributed or not _has_batchnorm(model):
        return model
    if _joins_batchnorm(info):
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if info.is_main:
        _LOG.warning(
            "batch norm under DDP on %s: torch has no SyncBatchNorm there, so each of the "
            "%d processes normalises with the statistics of its own %s of every batch; "
            "the result differs from one process (use CUDA, or one process, to match it)",
            info.device.type, info.world_size,
            "half" if info.world_size == 2 else f"1/{info.world_size}")
    return model


def _joins_batchnorm(info: DistInfo) -> bool:
    """Whether :func:`sync_batchnorm` joins the processes' batch norm (several CUDA
    processes: SyncBatchNorm; torch has none for gloo)."""
    return info.distributed and info.device.type == "cuda"


def _norm_batch(config: TrainConfig, info: DistInfo) -> int:
    """Images one batch-norm layer normalises over per training step: the global batch
    where :func:`sync_batchnorm` joins the processes (CUDA), else each process's share."""
    if _joins_batchnorm(info):
        return config.batch_size
    return config.batch_size // info.world_size


def _make_model(config: TrainConfig, num_classes: int, *, weights: str | None) -> nn.Module:
    return build_network(
        config.head, config.backbone, num_classes=num_classes, weights=weights,
        se_reduction=config.se_reduction, dropout=config.dropout,
    )


def _check_forward(model: nn.Module, config: TrainConfig, norm_batch: int) -> None:
    """Run ``model`` once on a zero image of the input size (eval mode, no gradients).

    A backbone whose last stages shrink a small input below their kernels otherwise
    fails at the first batch, after the data were indexed and loaded. So does batch
    norm in training when it normalises one value per channel: a 1x1 map of a batch of
    one (``norm_batch``, the images one batch-norm layer normalises over per step: each
    process's share, or the global batch where SyncBatchNorm joins them).

    Raises:
        ValueError: naming the backbone and the input size, with torch's message; or,
            for batch norm, the layer and what to change.
    """
    values: dict[str, int] = {}  # values per channel one image gives each batch-norm layer

    def record(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0]
            values.setdefault(name, x.numel() // max(x.shape[0] * x.shape[1], 1))
        return hook

    handles = [m.register_forward_pre_hook(record(name)) for name, m in model.named_modules()
               if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, config.input_size, config.input_size))
    except RuntimeError as exc:
        raise ValueError(
            f"backbone {config.backbone!r} cannot take input_size {config.input_size}: a "
            f"forward pass at {config.input_size}x{config.input_size} fails ("
            f"{(str(exc).splitlines() or [''])[0]}); use a larger --input-size") from exc
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    single = [name for name, n in values.items() if n * norm_batch <= 1]
    if single:
        raise ValueError(
            f"backbone {config.backbone!r} at input_size {config.input_size} gives batch-norm "
            f"layer {single[0]!r} one value per channel per image (a 1x1 map), and batch norm "
            f"in training needs more than one value per channel, but each batch normalises "
            f"{norm_batch} image{'' if norm_batch == 1 else 's'} there; use a larger --batch-size "
            "(per process) or a larger --input-size")


def _remove_outputs(run_dir: Path, names: Sequence[str]) -> list[str]:
    """Remove the files ``names`` (relative paths) present in ``run_dir``; those removed.

    A folder of ``names`` (e.g. ``figures``) goes too when nothing else is left in it.
    """
    removed = []
    for name in names:
        path = run_dir / name
        if path.is_file() or path.is_symlink():
            path.unlink()
            removed.append(name)
    for folder in sorted({(run_dir / name).parent for name in names} - {run_dir}, reverse=True):
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
    return removed


def _train_log(run_dir: Path) -> logging.Handler:
    """A handler that appends to ``run_dir``'s ``train.log``, in its line format."""
    handler = logging.FileHandler(run_dir / "train.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    return handler


def _add_file_log(run_dir: Path) -> logging.Handler:
    handler = _train_log(run_dir)
    _LOG.addHandler(handler)
    _LOG.setLevel(logging.INFO)
    return handler


def _write_metrics_csv(history: Sequence[dict[str, Any]], path: Path) -> None:
    if not history:
        return
    with atomic_writer(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


_ABSENT = object()


def _ignored(key: str, ignore: Sequence[str]) -> bool:
    """Whether the dotted ``key`` is one of ``ignore`` or lies under one (``"data_issues"``
    covers ``"data_issues.skipped"``)."""
    return any(key == name or key.startswith(f"{name}.") for name in ignore)


def _difference(key: str, old: Any, new: Any) -> str:
    if key.startswith("files_sha256.") and isinstance(old, str) and isinstance(new, str):
        split = key.split(".", 1)[1]
        return (f"the {split} images' contents differ from the checkpoint's (the same file names "
                f"hold other images: SHA-256 over the files {old[:12]}..., this run {new[:12]}...)")
    if isinstance(old, (list, tuple)) and isinstance(new, (list, tuple)) and (
            len(old) > 3 or len(new) > 3):
        # file lists: counts and one example each way, not thousands of paths
        only_old = sorted(set(map(str, old)) - set(map(str, new)))
        only_new = sorted(set(map(str, new)) - set(map(str, old)))
        return (f"checkpoint has {key}=<{len(old)} entries>, this run <{len(new)} entries> "
                f"({len(only_old)} only in the checkpoint, e.g. {only_old[:1]}; "
                f"{len(only_new)} only in this run, e.g. {only_new[:1]})")
    shown = ["<not recorded>" if v is _ABSENT else repr(v) for v in (old, new)]
    return f"checkpoint has {key}={shown[0]}, this run {shown[1]}"


def _same_setting(key: str, old: Any, new: Any) -> bool:
    """Whether a recorded training setting and a new one are the same: equal, or for
    ``weights`` the same local file spelled otherwise (``w.pt``, ``./w.pt``, its absolute
    path), as seen from the current folder."""
    if old == new:
        return True
    if key != "weights" or not (isinstance(old, str) and isinstance(new, str)):
        return False
    old_path, new_path = Path(old).expanduser(), Path(new).expanduser()
    return old_path.is_file() and new_path.is_file() and os.path.samefile(old_path, new_path)


def _config_differences(recorded: dict[str, Any], config: dict[str, Any]) -> list[str]:
    """The training settings part of :func:`resume_differences`: the stored ``recorded``
    against ``config`` (``TrainConfig.to_dict()``, or a stored one), both in today's terms
    (:func:`_upgraded`), every key of ``config`` but :data:`RESUMABLE_CHANGES`, as
    :func:`_same_setting` tells."""
    recorded, config = _upgraded(recorded), _upgraded(config)  # both: an old summary's too
    pairs = ((key, recorded.get(key, _ABSENT), value) for key, value in config.items()
             if key not in RESUMABLE_CHANGES)
    return [_difference(*pair) for pair in pairs if not _same_setting(*pair)]


def resume_differences(
    state: dict[str, Any],
    config: TrainConfig,
    classes: Sequence[str],
    extra: dict[str, Any] | None = None,
    *,
    ignore: Sequence[str] = (),
) -> list[str]:
    """What stops ``config`` from continuing the run saved in ``state``.

    Compares the classes, every :class:`TrainConfig` field but
    :data:`RESUMABLE_CHANGES`, and every (nested, dotted) key of ``extra`` (fold, task,
    protocol, data and the file lists of a :func:`breakhis.experiments.run_fold`) except
    those in ``ignore``; also refuses an ``epochs`` below what the checkpoint already
    trained.

    Args:
        state: a loaded checkpoint.
        config: the settings of the run that wants to continue it.
        classes: that run's class names.
        extra: that run's ``extra`` (as given to :func:`fit`).
        ignore: dotted ``extra`` keys that may differ (e.g. ``"data.data_root"``), with
            the keys under them.

    Returns:
        One line per difference, ``"checkpoint has KEY=OLD, this run NEW"``; empty when
        the run may resume.
    """
    out = []
    if list(state.get("classes") or []) != list(classes):
        out.append(_difference("classes", state.get("classes"), list(classes)))
    out += _config_differences(state.get("config") or {}, config.to_dict())
    done = int(state.get("epoch", -1)) + 1
    if done > config.epochs:
        out.append(f"checkpoint has already trained {done} epochs, this run asks for "
                   f"epochs={config.epochs}")
    if extra is not None:
        old, new = _flatten(state.get("extra") or {}), _flatten(extra)
        keys = [key for key in sorted(set(old) | set(new), key=lambda k: (k.startswith("files."), k))
                if not _ignored(key, ignore) and old.get(key, _ABSENT) != new.get(key, _ABSENT)]
        level = _other_level(old, new, keys)
        if level is not None:  # one line for it, not "other images under the same names"
            keys = [key for key in keys if not key.startswith(("files.", "files_sha256."))]
        # settings first, file lists (long) last
        out += [_difference(key, old.get(key, _ABSENT), new.get(key, _ABSENT)) for key in keys]
        out += [level] if level is not None else []
    return out


def _strip_folders(path: str, k: int) -> str | None:
    """``path`` without its first ``k`` folders; ``None`` when it has fewer."""
    parts = path.split("/")
    return "/".join(parts[k:]) if len(parts) > k else None


def _other_level(old: Mapping[str, Any], new: Mapping[str, Any], keys: Sequence[str]) -> str | None:
    """The difference to report when the file lists among ``keys`` differ only in that the
    data root now is some folders below or above the recorded one in the same tree (every
    recorded path with the same first folders taken off gives the paths now, or the other
    way round): the same file names, whose paths (and so the SHA-256 over them) differ. Else
    ``None``.

    Examples:
        >>> old = {"files.test": ["B/h/a.png", "B/h/b.png"], "data.data_root": "/d"}
        >>> _other_level(old, {"files.test": ["h/a.png", "h/b.png"]}, ["files.test"])[:65]
        "the data root is 1 folder below the checkpoint's in the same tree"
        >>> _other_level(old, {"files.test": ["h/a.png", "h/c.png"]}, ["files.test"]) is None
        True
        >>> deep = {"files.test": ["1/2/3/4/h/a.png"]}  # as far as evaluate looks
        >>> _other_level(deep, {"files.test": ["h/a.png"]}, ["files.test"])[:34]
        'the data root is 4 folders below t'
    """
    lists = [key for key in keys if key.startswith("files.")]
    if not lists:
        return None
    pairs = [(old.get(key), new.get(key)) for key in lists]
    if not all(isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b) and a
               for a, b in pairs):
        return None
    depth = max((p.count("/") for a, b in pairs for p in (*a, *b)), default=0)
    for k in range(1, depth + 1):  # as far as evaluate finds the images (experiments._rerooted)
        for flip in (False, True):
            if all(sorted(_strip_folders(p, k) or "" for p in (b if flip else a)) == sorted(a if flip else b)
                   for a, b in pairs):
                recorded = old.get("data.data_root")
                where = f" ({recorded!r} or another folder at its level)" if recorded else ""
                return (
                    f"the data root is {k} {'folder' if k == 1 else 'folders'} "
                    f"{'below' if not flip else 'above'} the checkpoint's in the same tree (image paths "
                    f"such as {str(pairs[0][0][0])!r} there, {str(pairs[0][1][0])!r} now): the same "
                    f"file names, other paths; pass the --data-root of training{where}")
    return None


def check_resumable(
    state: dict[str, Any],
    path: str | os.PathLike[str],
    config: TrainConfig,
    classes: Sequence[str],
    extra: dict[str, Any] | None = None,
    *,
    ignore: Sequence[str] = (),
    refusal: Callable[[list[str]], str] | None = None,
) -> None:
    """Refuse to continue the checkpoint ``state`` (read from ``path``) with ``config``:
    when it is not a breakhis checkpoint, or :func:`resume_differences` finds differences.

    Args:
        state, config, classes, extra, ignore: as for :func:`resume_differences`.
        path: the checkpoint's file, as the messages name it.
        refusal: the message for the differences (one line each), when not
            ``"cannot resume from <path>: it was made with other settings (...)"``
            (:func:`breakhis.experiments.run_cv` words a fold it cannot reuse so).

    Raises:
        ValueError: ``"cannot resume from <path>: expected format
            'breakhis-checkpoint-v1', but got ..."`` (with what to do), or the refusal
            listing every difference.
    """
    if state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(
            f"cannot resume from {str(path)!r}: expected format {CHECKPOINT_FORMAT!r}, but got "
            f"{state.get('format')!r}; train afresh with --overwrite, or into another run folder")
    differences = resume_differences(state, config, classes, extra, ignore=ignore)
    if differences and refusal is not None:
        raise ValueError(refusal(differences))
    if differences:
        raise ValueError(
            f"cannot resume from {str(path)!r}: it was made with other settings ("
            + "; ".join(differences) + "). Resume with the checkpoint's settings, or "
            "train into another run folder")


def _started(loader: DataLoader) -> Iterator[Any]:
    """``iter(loader)``, with a SIGTERM that comes while its worker processes start held
    until they have (:func:`terminate_deferred`): stopped half-way, torch's iterator
    prints a traceback of its own as it is dropped."""
    with terminate_deferred():
        return iter(loader)


def _evaluate_loss(
    model: nn.Module, loader: DataLoader, device: torch.device
) -> tuple[float, float, float]:
    """Sum of losses, number correct, number of images (this process's shard)."""
    model.eval()
    loss_sum = correct = count = 0.0
    with torch.no_grad():
        for x, y, _ in _started(loader):
            x, y = x.to(device), y.to(device)
            logits = model(x)
            loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
            correct += (logits.argmax(1) == y).sum().item()
            count += len(y)
    return loss_sum, correct, count


def fit(
    config: TrainConfig,
    *,
    train_records: Sequence[ImageRecord],
    train_targets: Sequence[int] | np.ndarray,
    classes: Sequence[str],
    run_dir: str | os.PathLike[str],
    val_records: Sequence[ImageRecord] = (),
    val_targets: Sequence[int] | np.ndarray = (),
    resume: bool = False,
    extra: dict[str, Any] | None = None,
    resume_ignore: Sequence[str] = (),
    stale_outputs: Sequence[str] = (),
    atomic_outputs: Sequence[str] = (),
    log_messages: Sequence[str | tuple[int, str] | tuple[int, str, Mapping[str, Any]]] = (),
    epoch_callback: Callable[[int, dict[str, Any]], None] | None = None,
    dist_info: DistInfo | None = None,
    progress: bool = True,
) -> FitResult:
    """Train a classifier, checkpointing every epoch; resume a killed run.

    Args:
        config: model and optimisation settings.
        train_records: training images.
        train_targets: their integer classes.
        classes: class names (``len(classes)`` outputs).
        run_dir: folder for ``checkpoint.pt``, ``train.log``, ``metrics.csv``, ``config.json``.
        val_records: validation images for the plateau schedule (training loss if none).
        val_targets: their integer classes.
        resume: continue from ``run_dir/checkpoint.pt`` when it exists. Only a run with
            the same classes, ``extra`` and settings may continue
            (:func:`resume_differences`); ``epochs`` may grow.
        extra: plain data stored in the checkpoint (task, protocol, fold, data root,
            file lists); ``config.json`` holds it without ``"files"``.
        resume_ignore: dotted keys of ``extra`` that may differ on resume.
        stale_outputs: files of ``run_dir`` (relative paths) that an earlier run may
            have left and that a fresh start (no checkpoint continued) removes, logging
            which: on the main process, once the model is built and has passed its trial
            forward pass, before the first checkpoint. A run that fails before then
            leaves them in place; a resumed run keeps them.
        atomic_outputs: files of ``run_dir`` (relative paths) that the caller writes
            with :func:`breakhis._files.atomic_writer` (e.g. its test report). Fresh or
            resumed, the temporary files that a process killed while saving
            ``checkpoint.pt``, ``metrics.csv``, ``config.json`` or one of
            ``atomic_outputs`` left (:func:`breakhis._files.remove_stale_temporaries`)
            are removed on the main process, logging which.
        log_messages: lines logged (console and ``train.log``, main process) before
            training, in order: a string as a warning (e.g. the files the data index left
            out), a ``(level, text)`` pair at that ``logging`` level (e.g. the split sizes
            at ``logging.INFO``), or a ``(level, text, extra)`` triple whose ``extra``
            goes to :meth:`logging.Logger.log` (:data:`FILE_ONLY`: for ``train.log``,
            not the command line's console).
        epoch_callback: called as ``callback(epoch, row)`` after each checkpoint.
        dist_info: process placement; by default from the torchrun environment.
        progress: show progress bars (main process only).

    Returns:
        The trained model (unwrapped; with ``SyncBatchNorm`` layers after DDP on CUDA,
        whose ``state_dict`` has the plain model's keys), the per-epoch history and the
        checkpoint path.

    Raises:
        ValueError: when resuming a checkpoint made with other classes, data, fold or
            settings; the message lists every difference.
        TrainingDivergedError: at the end of the first epoch whose training or
            validation loss, or whose weights, are not finite (NaN or infinite), before
            its checkpoint: ``checkpoint.pt`` keeps the epoch before (if any); the
            message names the epoch and asks for a lower learning rate. The decision is
            taken on the values summed over processes, so that under DDP every process
            stops at the same epoch. It is logged in ``train.log`` too.
    """
    info = dist_info or init_distributed(config.device)
    check_batch_split(config, info)
    run_dir = Path(run_dir)
    ckpt_path = run_dir / CHECKPOINT_NAME
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    barrier()
    handler = _add_file_log(run_dir) if info.is_main else None
    try:
        for message in log_messages if info.is_main else ():
            level, text, *record_extra = message if isinstance(message, tuple) else (logging.WARNING, message)
            _LOG.log(level, "%s", text, extra=record_extra[0] if record_extra else None)
        return _fit(config, info, run_dir, ckpt_path, list(train_records),
                    np.asarray(train_targets), list(val_records), np.asarray(val_targets),
                    list(classes), resume, dict(extra or {}), tuple(resume_ignore),
                    tuple(stale_outputs), tuple(atomic_outputs), epoch_callback, progress)
    except (KeyboardInterrupt, Exception) as exc:
        if handler is not None:  # why the run stopped, in train.log too: a log that just
            # stops reads like a crash (the caller shows the error itself)
            level, text = _stop_line(exc)
            handler.handle(_LOG.makeRecord(_LOG.name, level, __file__, 0, "%s", (text,), None))
        raise
    finally:
        if handler is not None:
            _LOG.removeHandler(handler)
            handler.close()


def _stop_line(exc: BaseException, after: str | None = None) -> tuple[int, str]:
    """The level and last line of ``train.log`` for a run that ``exc`` stopped: Ctrl-C, or
    SIGTERM where the command line made it one (:mod:`breakhis._signals`), with how to go
    on; a divergence in its own words; any other error (e.g. a torchrun peer that died:
    gloo's "Connection closed by peer", a full disk) by its type and first line. ``after``:
    what the run was doing once training had ended (``"evaluating the test images"``)."""
    if isinstance(exc, KeyboardInterrupt):
        what = str(exc) if isinstance(exc, Terminated) else "interrupted (KeyboardInterrupt)"
        if after is not None:
            return logging.WARNING, (
                f"{what} while {after}, after training; {CHECKPOINT_NAME} holds the trained "
                "model: the same command with --resume evaluates it")
        return logging.WARNING, (
            f"{what}; {CHECKPOINT_NAME} keeps the last finished epoch, if any: the same command "
            "with --resume (not --overwrite) continues from it")
    if isinstance(exc, TrainingDivergedError):
        return logging.ERROR, str(exc)
    first = (str(exc).splitlines() or [""])[0][:300]
    while_ = f" while {after}, after training" if after is not None else ""
    return logging.ERROR, f"stopped by {type(exc).__name__}{while_}: {first}"


def log_stop(run_dir: str | os.PathLike[str], exc: BaseException, after: str) -> None:
    """Add to ``run_dir``'s ``train.log`` the line saying why the run stopped, for ``exc``
    raised once :func:`fit` had returned (``after``: what the run was doing, e.g.
    ``"evaluating the test images"``); :func:`fit` writes it for what stops training. A
    log that just stops after its last epoch reads like a crash."""
    handler = _train_log(Path(run_dir))
    try:
        level, text = _stop_line(exc, after)
        handler.handle(_LOG.makeRecord(_LOG.name, level, __file__, 0, "%s", (text,), None))
    finally:
        handler.close()


def _fit(
    config: TrainConfig, info: DistInfo, run_dir: Path, ckpt_path: Path,
    train_records: list[ImageRecord], train_targets: np.ndarray,
    val_records: list[ImageRecord], val_targets: np.ndarray, classes: list[str],
    resume: bool, extra: dict[str, Any], resume_ignore: tuple[str, ...],
    stale_outputs: tuple[str, ...], atomic_outputs: tuple[str, ...],
    epoch_callback: Callable[[int, dict[str, Any]], None] | None, progress: bool,
) -> FitResult:
    seed_everything(config.seed, deterministic=config.deterministic)
    # the one place that decides between a fresh start and a resumed run
    state = load_run_checkpoint(ckpt_path) if resume and ckpt_path.is_file() else None
    # a resumed run gets its weights from the checkpoint, not from a download
    model = _make_model(config, len(classes), weights=None if state else config.weights)
    # resumed runs too: the number of processes (so the batch batch norm sees) may
    # differ from the start's. The main process tries the model (the others build the
    # same one) and every process stops with it: the others ended with gloo's
    # "Connection closed by peer" when only the main one raised.
    problem: ValueError | None = None
    if info.is_main:
        try:
            _check_forward(model, config, _norm_batch(config, info))
        except ValueError as exc:
            problem = exc
    if all_reduce_sum([0.0 if problem is None else 1.0], info.device)[0]:
        raise problem or ValueError(
            "stopped before training: the main process (rank 0) refused these settings in "
            "its trial forward pass (its message says why)")
    normalization = input_normalization(model)
    model = sync_batchnorm(model, info).to(info.device)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay)
    scheduler = plateau_scheduler(optimizer, config)
    expected_schedule = _schedule_settings(scheduler)
    sampler = BalancedSampler(train_targets, batch_size=config.batch_size,
                              oversample=config.oversample, seed=config.seed,
                              num_replicas=info.world_size, rank=info.rank)
    history: list[dict[str, Any]] = []
    start = 0
    if state is not None:
        check_resumable(state, ckpt_path, config, classes, extra, ignore=resume_ignore)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        sampler.load_state_dict(state["sampler"])
        restore_rng_state(state["rng"])
        history = list(state["history"])
        start = int(state["epoch"]) + 1
        # the run continues with the inputs it started with, as if never interrupted
        recorded_norm = checkpoint_normalization(state)
        if info.is_main:
            # counted from 1, as the per-epoch lines are
            _LOG.info("resumed from %s after epoch %d of %d", ckpt_path, start, config.epochs)
            trained_by = int(state.get("world_size", 1))
            if trained_by != info.world_size:
                _LOG.warning(
                    "epochs 1-%d were trained by %d %s, the rest by %d %s: dropout masks (and, "
                    "without SyncBatchNorm, batch-norm statistics) depend on the number of "
                    "processes, so the weights can differ from a run trained by one count "
                    "throughout", start, trained_by, plural(trained_by, "process", "processes"),
                    info.world_size, plural(info.world_size, "process", "processes"))
            # built without weights, the model holds the config of the default weights:
            # compared only with an old checkpoint's (unrecorded, ImageNet) values
            if not state.get("normalization") and recorded_norm != normalization:
                _LOG.warning(
                    "%s was trained with inputs normalised by mean %s, std %s (written by an "
                    "older breakhis); they are kept, so that the run ends as it would have "
                    "uninterrupted. A new run of %r uses mean %s, std %s: train into a new "
                    "run folder for them", ckpt_path, recorded_norm[0], recorded_norm[1],
                    config.backbone, normalization[0], normalization[1])
            recorded = _schedule_settings(scheduler)
            if recorded != expected_schedule:
                # torch restores patience and threshold from the checkpoint: the run
                # finishes with the schedule it started with, as if never interrupted
                _LOG.warning(
                    "%s was written by an older breakhis; its plateau schedule is kept, so "
                    "that the run ends as it would have uninterrupted: the learning rate "
                    "drops after %d epochs without a %s improvement of %g (a new run: after "
                    "%d epochs, %s %g). Train into a new run folder for the new schedule",
                    ckpt_path, recorded[0] + 1, _THRESHOLD_WORDS.get(recorded[1], recorded[1]),
                    recorded[2], expected_schedule[0] + 1,
                    _THRESHOLD_WORDS["abs"], expected_schedule[2])
        normalization = recorded_norm
    elif info.is_main:
        removed = _remove_outputs(run_dir, stale_outputs)
        if removed:
            _LOG.warning("fresh run in %r: removed what an earlier run left there: %s",
                         str(run_dir), ", ".join(removed))
        _LOG.info("training %s/%s on %d %s (%d %s), %d %s, device %s",
                  config.head, config.backbone, len(train_records),
                  plural(len(train_records), "image"), len(classes),
                  plural(len(classes), "class", "classes"), info.world_size,
                  plural(info.world_size, "process", "processes"), info.device)
    if info.is_main:
        # a process killed while it saved leaves its temporary file (the file it was
        # replacing is intact): never read, so removed, fresh run or resumed
        leftovers = remove_stale_temporaries(
            run_dir, [CHECKPOINT_NAME, *_RUN_FILES, *atomic_outputs])
        if leftovers:
            _LOG.warning("removed in %r the temporary files of writes cut short (a run killed "
                         "while saving; the files they were to replace are intact): %s",
                         str(run_dir), ", ".join(leftovers))
        # rewritten on resume too, so that it shows the epochs now asked for; the file
        # lists stay in the checkpoint only (thousands of paths)
        summary = {k: v for k, v in extra.items() if k != "files"}
        with atomic_writer(run_dir / "config.json", "w") as handle:
            handle.write(json.dumps(
                {"config": config.to_dict(), "classes": classes, "extra": summary,
                 "normalization": _normalization_dict(normalization)}, indent=2) + "\n")
        if history:  # resumed: one row per epoch the checkpoint holds, also when the last
            # epoch's row was not written (stopped between saving the checkpoint and the file)
            _write_metrics_csv(history, run_dir / "metrics.csv")

    net: nn.Module = model
    if info.distributed:
        net = DistributedDataParallel(
            model, device_ids=[info.local_rank] if info.device.type == "cuda" else None)

    mean, std = normalization
    train_set = ImageDataset(train_records, train_targets, build_train_transform(
        config.input_size, shift=config.shift, rotation=config.rotation, augment=config.augment,
        mean=mean, std=std))
    eval_transform = build_eval_transform(config.input_size, mean=mean, std=std)
    val_loader = None
    if len(val_records):
        shard = list(range(info.rank, len(val_records), info.world_size))
        val_set = ImageDataset([val_records[i] for i in shard], val_targets[shard], eval_transform)
        val_loader = DataLoader(val_set, batch_size=config.batch_size,
                                num_workers=config.num_workers)
    per_rank = config.batch_size // info.world_size
    last_saved = state

    for epoch in range(start, config.epochs):
        began = time.perf_counter()
        sampler.set_epoch(epoch)
        if info.distributed:
            # dropout masks: one stream per process (not a copy of rank 0's), redrawn
            # from (seed, epoch, rank) so that a resumed run matches
            torch.manual_seed(rank_seed(config.seed, epoch, info.rank))
        loader = DataLoader(train_set, batch_size=per_rank, sampler=sampler,
                            num_workers=config.num_workers,
                            generator=torch.Generator().manual_seed(config.seed + epoch))
        net.train()
        loss_sum = correct = count = 0.0
        batches: Any = _started(loader)
        if progress and info.is_main:
            batches = progress_bar(batches, desc=f"epoch {epoch + 1}/{config.epochs}", unit="batch",
                                   leave=False, total=len(loader))
        for x, y, _ in batches:
            x, y = x.to(info.device), y.to(info.device)
            optimizer.zero_grad(set_to_none=True)
            logits = net(x)
            loss = F.cross_entropy(logits, y)
            loss.backward()
            optimizer.step()
            loss_sum += loss.item() * len(y)
            correct += (logits.argmax(1) == y).sum().item()
            count += len(y)
        # summed over processes with the losses (under gloo each process keeps its own
        # batch-norm statistics), so that every process takes the same decision below
        loss_sum, correct, count, not_finite = all_reduce_sum(
            [loss_sum, correct, count, float(not _finite_state(model))], info.device)
        row: dict[str, Any] = {
            "epoch": epoch, "lr": optimizer.param_groups[0]["lr"],
            "train_loss": loss_sum / count, "train_accuracy": correct / count,
            "val_loss": None, "val_accuracy": None,
        }
        # a checkpoint is written after every epoch: the one before this one, if any
        last_good = epoch - 1 if epoch > 0 else None
        _check_finite("training loss", row["train_loss"], epoch, config, ckpt_path, last_good)
        if not_finite:
            _diverged(f"the weights are no longer finite after epoch {epoch + 1}/"
                      f"{config.epochs}", config, ckpt_path, last_good)
        monitored = row["train_loss"]
        if val_loader is not None:
            # every process scores its share with the statistics the checkpoint keeps
            broadcast_buffers(model)
            v_loss, v_correct, v_count = all_reduce_sum(
                list(_evaluate_loss(model, val_loader, info.device)), info.device)
            row["val_loss"], row["val_accuracy"] = v_loss / v_count, v_correct / v_count
            _check_finite("validation loss", row["val_loss"], epoch, config, ckpt_path,
                          last_good)
            monitored = row["val_loss"]
        scheduler.step(monitored)
        row["seconds"] = round(time.perf_counter() - began, 3)
        history.append(row)
        if info.is_main:
            last_saved = {
                "format": CHECKPOINT_FORMAT, "epoch": epoch, "config": config.to_dict(),
                "classes": classes, "extra": extra, "world_size": info.world_size,
                "normalization": _normalization_dict(normalization),
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "sampler": sampler.state_dict(),
                "rng": capture_rng_state(), "history": history,
            }
            save_checkpoint(last_saved, ckpt_path)
            _write_metrics_csv(history, run_dir / "metrics.csv")
            _LOG.info("epoch %d/%d lr %.3g train loss %.4f acc %.4f val loss %s acc %s (%.1fs)",
                      epoch + 1, config.epochs, row["lr"], row["train_loss"],
                      row["train_accuracy"], _num(row["val_loss"]), _num(row["val_accuracy"]),
                      row["seconds"])
        barrier()
        if epoch_callback is not None:
            epoch_callback(epoch, row)
    model.eval()
    return FitResult(model=model, history=history, checkpoint=ckpt_path,
                     resumed_from_epoch=start - 1 if state is not None else None, extra=extra,
                     normalization=normalization,
                     checkpoint_info=(checkpoint_identity(last_saved)
                                      if info.is_main and last_saved is not None else None))


def _finite_state(model: nn.Module) -> bool:
    """Whether every floating-point parameter and buffer of ``model`` is finite."""
    flags = [torch.isfinite(t).all() for t in model.state_dict().values()
             if t.is_floating_point()]
    return bool(torch.stack(flags).all().item()) if flags else True


def _check_finite(
    what: str, value: float, epoch: int, config: TrainConfig, ckpt_path: Path,
    last_good: int | None,
) -> None:
    """Stop training when ``value``, the ``what`` loss of ``epoch``, is not finite
    (:func:`_diverged`)."""
    if not math.isfinite(value):
        _diverged(f"the {what} of epoch {epoch + 1}/{config.epochs} is {value}", config,
                  ckpt_path, last_good)


def _diverged(
    found: str, config: TrainConfig, ckpt_path: Path, last_good: int | None
) -> NoReturn:
    """Stop training: ``found`` (what is not finite, in which epoch) says why.

    Raises:
        TrainingDivergedError: with ``found``, the checkpoint kept and the learning rate
            to lower.
    """
    kept = (f"{str(ckpt_path)!r} keeps epoch {last_good + 1}, the last whose losses and "
            "weights were finite (it can be evaluated, but not resumed with another --lr)"
            if last_good is not None else "no checkpoint of this run was written")
    raise TrainingDivergedError(
        f"training diverged: {found}, with --lr {config.lr:g}; {kept}. Train again "
        f"with a lower --lr than {config.lr:g}, afresh (without --resume) or into another "
        "run folder")


def _normalization_dict(
    normalization: tuple[tuple[float, ...], tuple[float, ...]],
) -> dict[str, list[float]]:
    return {"mean": [float(v) for v in normalization[0]],
            "std": [float(v) for v in normalization[1]]}


_THRESHOLD_WORDS = {"abs": "absolute", "rel": "relative"}


def _schedule_settings(
    scheduler: torch.optim.lr_scheduler.ReduceLROnPlateau,
) -> tuple[int, str, float]:
    return int(scheduler.patience), str(scheduler.threshold_mode), float(scheduler.threshold)


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def load_model(
    checkpoint: str | os.PathLike[str] | dict[str, Any], *, device: str | torch.device = "cpu"
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model of a checkpoint (no download) and load its weights.

    Returns:
        ``(model in eval mode, checkpoint dict)``.

    Raises:
        FileNotFoundError: when the checkpoint file does not exist.
        NotACheckpointError: when it is not a checkpoint written by breakhis training.
    """
    state = checkpoint if isinstance(checkpoint, dict) else load_checkpoint(checkpoint)
    if state.get("format") != CHECKPOINT_FORMAT:
        name = "<checkpoint dict>" if isinstance(checkpoint, dict) else str(checkpoint)
        raise NotACheckpointError(
            f"{name!r} is not a breakhis checkpoint (expected format {CHECKPOINT_FORMAT!r}, "
            f"but got {state.get('format')!r})")
    config = TrainConfig.from_dict(state["config"])
    model = _make_model(config, len(state["classes"]), weights=None)
    model.load_state_dict(state["model"])
    return model.to(device).eval(), state


def predict_probs(
    model: nn.Module,
    images: Sequence[ImageRecord] | Sequence[Path],
    *,
    input_size: int,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    progress: bool = False,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> np.ndarray:
    """Class probabilities (softmax) for ``images``, shape ``(N, num_classes)``.

    Images get the evaluation transform: resized to ``input_size`` squared and
    normalised with ``mean`` and ``std`` (a checkpoint's:
    :func:`checkpoint_normalization`).

    Raises:
        ValueError: when the model's scores for an image are not finite (NaN or
            infinite), naming the images; such a row would be predicted as the first class.
    """
    loader = DataLoader(ImageDataset(images, None, build_eval_transform(
        input_size, mean=mean, std=std)), batch_size=batch_size)
    batches: Any = loader
    if progress:
        batches = progress_bar(loader, desc="predicting", unit="batch")
    out = []
    model.eval()
    with torch.no_grad():
        for x, _, _ in batches:
            out.append(torch.softmax(model(x.to(device)).float(), dim=1).cpu())
    if not out:
        return np.zeros((0, 0))
    probs = torch.cat(out).numpy()
    if not np.isfinite(probs).all():  # (names made only for the error)
        check_finite_probs(probs, [str(getattr(image, "path", image)) for image in images])
    return probs
