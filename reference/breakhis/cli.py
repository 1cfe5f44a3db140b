"""``breakhis-repro``: index, train, cross-validate, evaluate, predict, draw figures, tabulate.

Examples::

    breakhis-repro synth --out demo --size 96x64
    breakhis-repro index --data-root demo --json
    breakhis-repro train --data-root demo --task MIBC --protocol patient --fold 0 \\
        --head fast-bcnn --backbone tiny --no-pretrained --epochs 3 --out runs/demo
    breakhis-repro cv --data-root demo --task MIBC --backbone tiny --no-pretrained --epochs 3 \\
        --out runs/mibc-cv
    breakhis-repro cv --data-root demo --task MIFC --backbone tiny --no-pretrained --epochs 3 \\
        --out runs/mifc-cv
    breakhis-repro evaluate --checkpoint runs/demo/checkpoint.pt
    breakhis-repro predict --checkpoint runs/demo/checkpoint.pt demo/BreaKHis_v1 --out p.csv
    breakhis-repro figures --checkpoint runs/demo/checkpoint.pt --out runs/demo/figures
    breakhis-repro table runs/mibc-cv runs/mifc-cv --out results.md   # also results.csv
    torchrun --nproc_per_node 2 -m breakhis.cli train ...   # distributed (gloo on CPU)

Only ``train`` and ``cv`` run under torchrun; the other commands run in one process.
SIGTERM (``kill``, a batch scheduler, torchrun stopping its workers) ends a command as
Ctrl-C does: one line on stderr, the last line of ``train.log``, status 143
(:mod:`breakhis._signals`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import signal
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ._files import (
    LOCK_NAME,
    FolderLock,
    SettingError,
    check_input_files,
    check_run_folder,
    count,
    folder_problem,
    listed,
    missing_checkpoint,
    missing_folder_problem,
    on_console,
)
from ._signals import Terminated, terminate_as_interrupt

__all__ = ["build_parser", "main"]

#: What ``train`` and ``cv`` use for options left out. Their parser defaults are ``None``,
#: so that an option given where it has no effect can be told from one left out
#: (:func:`_check_combinations`); the values are those of
#: :class:`breakhis.train.TrainConfig` and :class:`breakhis.experiments.DataSpec`.
_TASK, _WEIGHTS, _ROTATION, _N_SPLITS, _SPLIT_SEED = "MIBC", "imagenet", 90.0, 5, 0

_EPILOG = ("Protocols: 'image' = the paper's image-level 5-fold CV (optimistic: a patient's "
           "images can be in train and test); 'patient' = patient-disjoint stratified group "
           "k-fold; 'official' = dsfoldN.txt / Folds.csv found under --data-root.")
_TORCHRUN = ("Distributed: train and cv run data-parallel under torchrun (torchrun "
             "--nproc_per_node N -m breakhis.cli train ...; DDP, nccl on GPUs, gloo on CPUs), "
             "where rank 0 alone writes checkpoints and logs and evaluates the test images; the "
             "other commands run in one process and refuse to start under torchrun with more "
             "than one process.")


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT like 700x460, but got {text!r}")
    return w, h


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, but got {text!r}")
    return value


class _Parser(argparse.ArgumentParser):
    """The parser of ``breakhis-repro``, with ``options``: per command, the option that
    sets each destination (its longest option string), recorded as :func:`build_parser`
    adds the options (:class:`_Commands`, :class:`_Recorder`); :func:`_option_name`
    reads it, and argparse's private attributes are not."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.options: dict[str, dict[str, str]] = {}


class _Commands:
    """The commands of a :class:`_Parser` (its subparsers): :meth:`add_parser` adds one,
    whose options a :class:`_Recorder` records in the parser's ``options``."""

    def __init__(self, parser: _Parser, **kwargs: Any) -> None:
        self._sub = parser.add_subparsers(parser_class=argparse.ArgumentParser, **kwargs)
        self._options = parser.options

    def add_parser(self, name: str, **kwargs: Any) -> _Recorder:
        return _Recorder(self._sub.add_parser(name, **kwargs), self._options.setdefault(name, {}))


class _Recorder:
    """Adds arguments to a command's parser or argument group, and records in ``names``
    the longest option string of each destination (the first option given it);
    positional arguments have none."""

    def __init__(self, target: Any, names: dict[str, str]) -> None:
        self._target, self._names = target, names

    def add_argument(self, *args: Any, **kwargs: Any) -> argparse.Action:
        action = self._target.add_argument(*args, **kwargs)
        if action.option_strings:
            self._names.setdefault(action.dest, max(action.option_strings, key=len))
        return action

    def add_argument_group(self, *args: Any, **kwargs: Any) -> _Recorder:
        return _Recorder(self._target.add_argument_group(*args, **kwargs), self._names)


def _add_data_args(p: _Recorder) -> None:
    g = p.add_argument_group("data, task and protocol")
    g.add_argument("--data-root", required=True, help="BreaKHis folder (official or Kaggle "
                   "layout), or an image folder root/<class>/* with --image-folder")
    g.add_argument("--task", choices=["MSBC", "MIBC", "MSFC", "MIFC"],
                   help="experiment: magnification-specific/independent, binary/fine-grained "
                   f"(default: {_TASK}; an error with --image-folder, whose class folders are "
                   "the classes)")
    g.add_argument("--magnification", type=int, choices=[40, 100, 200, 400],
                   help="magnification for MSBC/MSFC (an error with --image-folder)")
    g.add_argument("--protocol", default="patient", choices=["image", "patient", "official"],
                   help="how train/test folds are drawn (default: %(default)s)")
    g.add_argument("--n-splits", type=int,
                   help="folds of --protocol image and patient, at least 2 (an error with "
                   f"official, whose fold tables give the folds) (default: {_N_SPLITS})")
    g.add_argument("--split-seed", type=int,
                   help="seed of the folds and of the validation images, in [0, 2**32 - 1]; "
                   "an error with --protocol official and --val-fraction 0, which draw "
                   f"neither (default: {_SPLIT_SEED})")
    g.add_argument("--val-fraction", type=float, default=0.1,
                   help="share of training data held out for the LR schedule, in [0, 1); "
                   "0 = use the training loss (default: %(default)s)")
    g.add_argument("--folds-file", nargs="+", default=(),
                   help="Folds.csv or dsfoldN.txt files for --protocol official (an error "
                   "with the other protocols)")
    g.add_argument("--image-folder", action="store_true",
                   help="--data-root is a generic root/<class>/<image> folder")
    g.add_argument("--patients-csv", help="CSV (path, patient) with patient ids for "
                   "--image-folder; needed there for --protocol patient (an error without "
                   "--image-folder: BreaKHis file names give the patients)")
    g.add_argument("--no-verify", action="store_true",
                   help="read image headers only (faster; truncated files and byte-identical "
                   "copies are not caught)")
    g.add_argument("--strict", action="store_true", help="fail on unreadable images")


def _add_model_args(p: _Recorder) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--head", default="fast-bcnn", choices=["plain", "bcnn", "fast-bcnn"],
                   help="plain = global average pooling baseline (default: %(default)s)")
    g.add_argument("--backbone", default="inception_v3",
                   help="resnet50, inception_v3, inception_resnet_v2, any name bilinearpool "
                   "resolves, or 'tiny' for CPU demos (default: %(default)s)")
    g.add_argument("--weights",
                   help="'imagenet' (download), a torchvision weights name, a timm pretrained "
                   f"tag, or a local state_dict file (default: {_WEIGHTS})")
    g.add_argument("--no-pretrained", action="store_true",
                   help="random initialisation (an error with --weights)")
    g.add_argument("--se", action="store_true",
                   help="SE blocks in the backbone, reduction 8 (the paper's +SE)")
    g.add_argument("--se-reduction", type=int, help="SE reduction ratio (implies SE)")
    g.add_argument("--dropout", type=float, default=0.0,
                   help="dropout before the classifier, in [0, 1) (default: %(default)s)")
    g = p.add_argument_group("training (the paper's values where it gives them)")
    g.add_argument("--input-size", type=int, default=224,
                   help="197, 224 or 448 in the paper; at least 8, and 75 for inception_v3 "
                   "and inception_resnet_v2 (default: %(default)s)")
    g.add_argument("--epochs", type=int, default=50,
                   help="the paper gives none; %(default)s is our choice")
    g.add_argument("--batch-size", type=int, default=16,
                   help="global batch size (under torchrun a multiple of the processes, which "
                   "take equal shares; default: %(default)s)")
    g.add_argument("--lr", type=float, default=0.1, help="SGD learning rate (default: %(default)s)")
    g.add_argument("--momentum", type=float, default=0.0,
                   help="the paper gives none; %(default)s is Keras' SGD default, our choice")
    g.add_argument("--weight-decay", type=float, default=0.0,
                   help="the paper gives none; %(default)s is our choice")
    g.add_argument("--plateau-factor", type=float, default=0.1,
                   help="learning-rate factor on a plateau (default: %(default)s)")
    g.add_argument("--plateau-patience", type=int, default=10,
                   help="the learning rate drops at the Nth epoch without a loss improvement "
                   "of at least 1e-4, as Keras' ReduceLROnPlateau (default: %(default)s)")
    g.add_argument("--no-oversample", action="store_true", help="no over-sampling of small classes")
    g.add_argument("--no-augment", action="store_true", help="no flips/shifts/rotations")
    g.add_argument("--rotation", type=float, help="largest rotation in degrees, either way; "
                   f"the paper gives no range, {_ROTATION:g} (the default) is our choice "
                   "(corners filled black); an error with --no-augment")
    g.add_argument("--seed", type=int, default=0,
                   help="training seed, in [0, 2**63 - 1] (default: %(default)s)")
    g.add_argument("--num-workers", type=int, default=0,
                   help="data-loading processes, 0 or more (default: %(default)s)")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto: CUDA when available (default)")
    g.add_argument("--resume", action="store_true",
                   help="continue from the run folder's checkpoint.pt; refused when data, "
                   "fold or settings differ from the checkpoint's (only --epochs, "
                   "--num-workers, --device and a moved --data-root holding the same files "
                   "may change; --folds-file and --patients-csv may move, with the same "
                   "content)")
    g.add_argument("--overwrite", action="store_true",
                   help="start afresh in a run folder that holds a run, replacing its "
                   "checkpoint and reports (without it, or --resume, such a folder is refused)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")


#: The first line of the module's docstring (which ``python -OO`` strips: then written out).
_DESCRIPTION = ((__doc__ or "").split("\n\n")[0].replace("``", "")
                or "breakhis-repro: index, train, cross-validate, evaluate, predict, draw figures, "
                   "tabulate.")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``breakhis-repro``."""
    parser = _Parser(
        prog="breakhis-repro", description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=f"{_EPILOG}\n\n{_TORCHRUN}")
    from . import __version__

    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = _Commands(parser, dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("index", help="index a data folder and summarise it",
                       description="Index a BreaKHis tree (or an image folder) and print counts "
                       "per class, type and magnification, and the files left out per reason, "
                       "with why (--examples of each; --json lists every one).")
    p.add_argument("--data-root", required=True, help="folder to index")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--image-folder", action="store_true", help="generic root/<class>/* folder")
    p.add_argument("--patients-csv", help="CSV (path, patient) for --image-folder (an error "
                   "without it)")
    p.add_argument("--no-verify", action="store_true", help="read headers only (faster; "
                   "truncated files and byte-identical copies are not caught)")
    p.add_argument("--strict", action="store_true", help="fail on unreadable images")
    p.add_argument("--workers", type=int, default=4, help="threads reading images")
    p.add_argument("--examples", type=_non_negative, default=5,
                   help="files left out shown per reason, with why (default: %(default)s; 0: "
                   "counts only; --json lists all)")

    p = sub.add_parser("synth", help="write a synthetic BreaKHis-layout tree",
                       description="Write a SYNTHETIC stand-in for BreaKHis: real PNG files with "
                       "the release's folder layout and names (irregular ones included), "
                       "class-dependent textures, a SYNTHETIC.txt marker and synthetic.json.")
    p.add_argument("--out", required=True, help="output folder (must be empty or absent)")
    p.add_argument("--images-per-magnification", type=int, default=3, metavar="N",
                   help="images per patient and magnification (40X, 100X, 200X, 400X); "
                   "one patient has a single 40X image (default: %(default)s)")
    p.add_argument("--size", type=_size, default=(700, 460), metavar="WIDTHxHEIGHT",
                   help="image size; the default 700x460 is BreaKHis' and writes about "
                   "156 MB, 96x64 makes a small tree that trains fast on a CPU "
                   "(default: 700x460)")
    p.add_argument("--layout", choices=["official", "kaggle"], default="official",
                   help="'official': BreaKHis_v1/histology_slides/... with dsfold1..5.txt; "
                   "'kaggle': one BreaKHis_v1 folder deeper, with Folds.csv "
                   "(default: %(default)s)")
    p.add_argument("--no-irregular", action="store_true", help="no junk/corrupt files")
    p.add_argument("--no-folds", action="store_true", help="no dsfold/Folds.csv tables")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the pixels and of the fold tables; the same seed writes "
                   "the same tree (default: %(default)s)")

    p = sub.add_parser("train", help="train one fold and evaluate it",
                       description="Train one fold with the paper's recipe; checkpoint every "
                       "epoch; evaluate on the fold's test images.",
                       epilog=f"{_EPILOG} {_TORCHRUN}")
    _add_data_args(p)
    _add_model_args(p)
    p.add_argument("--fold", type=int,
                   help="fold to train: from 0 for --protocol image/patient; for --protocol "
                   "official the fold table's own number (dsfold3.txt is fold 3) "
                   "(default: the first fold)")
    p.add_argument("--out",
                   help="run folder (default: runs/<task>-<protocol>-<head>-<backbone>-fold<k>)")

    p = sub.add_parser("cv", help="cross-validate: train and evaluate every fold",
                       description="Train and evaluate every fold, then write mean and standard "
                       "deviation over folds as JSON and Markdown.",
                       epilog=f"{_EPILOG} {_TORCHRUN}")
    _add_data_args(p)
    _add_model_args(p)
    p.add_argument("--folds", type=int, nargs="+",
                   help="only these folds (numbered as for train --fold; each once), "
                   "checked against the protocol's folds before any training")
    p.add_argument("--out",
                   help="run folder (default: runs/<task>-<protocol>-<head>-<backbone>-cv)")

    p = sub.add_parser("evaluate", help="evaluate a checkpoint on its fold's test images",
                       description="Re-evaluate a trained run on the test images of the fold "
                       "it was trained on (data, task and protocol are read from the checkpoint).")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data-root", help="data folder, if it moved since training")
    p.add_argument("--out", help="output folder (default: the checkpoint's folder)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("predict", help="class probabilities for new images (CSV)",
                       description="Write a CSV with one row per image: path, patient and "
                       "magnification (from BreaKHis names), true label (always empty: "
                       "predict does not read labels, not even from BreaKHis names; "
                       "evaluate scores a run's test images), predicted class and the "
                       "probability of every class.")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR", help="image files or folders")
    p.add_argument("--out", default="predictions.csv", help="CSV path (default: %(default)s); not the checkpoint, another existing file than a CSV, or one of a run folder's own files")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default: %(default)s)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto: CUDA when available (default)")
    p.add_argument("--any-magnification", action="store_true",
                   help="with a magnification-specific checkpoint (MSBC, MSFC), predict "
                   "images whose BreaKHis names give another magnification too (with a "
                   "warning) instead of refusing them; an error with another checkpoint")
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("figures", help="ROC, t-SNE and Grad-CAM figures of a checkpoint",
                       description="Draw the paper's figures for a trained run on the images "
                       "of the fold it was trained on (data, task and protocol are read from "
                       "the checkpoint): roc.png (ROC curves with AUC), tsne.png and "
                       "tsne_coords.npy (t-SNE of the pre-logit embeddings), gradcam.png "
                       "(Grad-CAM of the predicted class on the last feature map, of both "
                       "streams for a BCNN) and "
                       "figures.json (paths, AUCs, perplexity, checkpoint, fold, split, "
                       "epochs trained, protocol, whether the data are synthetic).",
                       epilog=_EPILOG)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data-root", help="data folder, if it moved since training")
    p.add_argument("--split", default="test", choices=["test", "train", "all"],
                   help="images of the fold to draw: its test images, its training images, "
                   "or every image of the task (default: %(default)s)")
    p.add_argument("--gradcam-images", type=int, default=8, metavar="N",
                   help="images in the Grad-CAM grid, classes taken in turn (and within a "
                   "class, patients in turn); 0 = no Grad-CAM "
                   "(default: %(default)s)")
    p.add_argument("--perplexity", type=float, default=30.0,
                   help="t-SNE perplexity, clamped for small image sets (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of t-SNE and of the projection, in [0, 2**32 - 1] "
                   "(default: %(default)s)")
    p.add_argument("--max-embedding-dim", type=int, default=4096,
                   help="randomly project wider embeddings (bilinear features) to this many "
                   "dimensions before PCA and t-SNE, to bound memory; 0 = keep them whole "
                   "(default: %(default)s)")
    p.add_argument("--out", help="output folder (default: <checkpoint folder>/figures); "
                   "figure files an earlier run left there and this one does not draw are "
                   "removed (a folder with figure files and no figures.json is refused)")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default: %(default)s)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto: CUDA when available (default)")
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("table", help="one results table over several runs (Markdown + CSV)",
                       description="Put the results of several run folders (cv_metrics.json "
                       "of a cv run, or test_metrics.json of one fold) into one table in the "
                       "shape of the paper's: task, protocol, backbone, head, input size, "
                       "folds, training (start weights, epochs trained of those configured, "
                       "learning rate, settings that differ between the runs, split seed "
                       "among them), image accuracy and patient recognition rate (mean ± "
                       "std), macro F1, ROC AUC; synthetic-data runs are marked.",
                       epilog=_EPILOG)
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folders")
    p.add_argument("--out", metavar="FILE.md",
                   help="write the Markdown here and the CSV next to it (FILE.csv); "
                   "without it the table is printed only")
    return parser


def _spec(args: argparse.Namespace) -> Any:
    from .experiments import DataSpec

    return DataSpec(
        data_root=args.data_root, task=_given(args.task, _TASK), magnification=args.magnification,
        protocol=args.protocol, n_splits=_given(args.n_splits, _N_SPLITS),
        split_seed=_given(args.split_seed, _SPLIT_SEED),
        val_fraction=args.val_fraction, image_folder=args.image_folder,
        patients_csv=args.patients_csv, folds_file=tuple(args.folds_file),
        verify=not args.no_verify, strict=args.strict)


def _given(value: Any, default: Any) -> Any:
    """An option's value, or ``default`` when it was left out (``None``)."""
    return default if value is None else value


def _config(args: argparse.Namespace) -> Any:
    from .train import TrainConfig

    se = args.se_reduction if args.se_reduction is not None else (8 if args.se else None)
    return TrainConfig(
        head=args.head, backbone=args.backbone,
        weights=None if args.no_pretrained else _given(args.weights, _WEIGHTS),
        se_reduction=se,
        dropout=args.dropout, input_size=args.input_size, epochs=args.epochs,
        batch_size=args.batch_size, lr=args.lr, momentum=args.momentum,
        weight_decay=args.weight_decay, plateau_factor=args.plateau_factor,
        plateau_patience=args.plateau_patience, oversample=not args.no_oversample,
        augment=not args.no_augment, rotation=_given(args.rotation, _ROTATION), seed=args.seed,
        num_workers=args.num_workers, device=args.device)


def _check_model(args: argparse.Namespace, config: Any) -> None:
    """Refuse, before the data are indexed (minutes on the real data), SE blocks for a
    backbone without blocks for them, and --weights the backbone cannot be built with (a
    missing file or one that is no weights file, a weights name or tag the model lacks;
    not with --resume, whose checkpoint holds the weights)."""
    from .models import check_se_applies, check_weights_available

    try:
        check_se_applies(config.backbone, config.se_reduction)
    except SettingError:
        if args.se_reduction is None and getattr(args, "se", False):  # --se alone: name it
            raise ValueError(
                f"--se does not apply to backbone {config.backbone!r}, which has no blocks SE "
                "goes into (ResNet, Inception-v3, Inception-ResNet): drop --se"
            ) from None
        raise
    if not args.resume:
        check_weights_available(config.backbone, config.weights)


def _check_out(out: str | os.PathLike[str]) -> None:
    """Refuse an ``--out`` that is, or lies under, a file before the data are indexed
    (minutes on the real data). Nothing is created here: whether the folder can be
    created and written is tried after indexing, before training
    (:func:`breakhis.experiments.run_fold`, :func:`breakhis.experiments.run_cv`)."""
    problem = folder_problem(out)
    if problem:
        raise ValueError(f"--out expects a run folder, but {problem}")


def _default_out(args: argparse.Namespace, suffix: str) -> Path:
    task = "folder" if args.image_folder else _given(args.task, _TASK)
    mag = f"{args.magnification}x-" if args.magnification else ""
    return Path("runs") / f"{task}-{mag}{args.protocol}-{args.head}-{args.backbone}-{suffix}"


def _print_metrics(title: str, metrics: dict[str, Any]) -> None:
    from .evaluate import metrics_line

    print(f"{title}: {metrics_line(metrics)}")


#: Name of the handler :func:`_log_to_console` puts on the ``breakhis`` logger.
_CONSOLE_HANDLER = "breakhis-repro console"
#: Level and propagation of the ``breakhis`` logger before :func:`_log_to_console`.
_SAVED_LOGGER_STATE: list[tuple[int, bool]] = []


def _log_to_console(main_process: bool) -> None:
    """Per-epoch lines and warnings of ``breakhis`` on stderr (main process only), besides
    the run's train.log; :func:`main` takes the handler off again when the command ends.

    Only the ``breakhis`` logger is configured, not the root logger: third-party loggers
    (huggingface_hub's retries when offline) keep their own level, and are not printed
    twice. It does not propagate meanwhile, so a root handler that the calling program
    set up does not print its lines a second time.
    """
    logger = logging.getLogger("breakhis")
    if not main_process or any(h.get_name() == _CONSOLE_HANDLER for h in logger.handlers):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.set_name(_CONSOLE_HANDLER)
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.addFilter(on_console)  # lines meant for a train.log only (FILE_ONLY) stay there
    _SAVED_LOGGER_STATE.append((logger.level, logger.propagate))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def _stop_logging_to_console() -> None:
    """Undo :func:`_log_to_console`."""
    logger = logging.getLogger("breakhis")
    for handler in [h for h in logger.handlers if h.get_name() == _CONSOLE_HANDLER]:
        logger.removeHandler(handler)
    if _SAVED_LOGGER_STATE:
        level, propagate = _SAVED_LOGGER_STATE.pop()
        logger.setLevel(level)
        logger.propagate = propagate


def _cmd_index(args: argparse.Namespace) -> int:
    _check_combinations(args)  # before the images are read
    _check_input_files(args)
    from .data import index_breakhis, index_image_folder

    kwargs = dict(verify=not args.no_verify, strict=args.strict, workers=args.workers,
                  progress=not args.json and sys.stderr.isatty())
    if args.image_folder:
        index = index_image_folder(args.data_root, patients_csv=args.patients_csv, **kwargs)
    else:
        index = index_breakhis(args.data_root, **kwargs)
    summary = index.summary()
    if args.json:
        print(json.dumps(summary, indent=2))
        return _no_images(summary, args)
    print(f"{summary['root']}: {count(summary['images'], 'image')}, "
          f"{count(summary['patients'], 'patient')} "
          f"({count(summary['patient_ids'], 'distinct patient id')})")
    for key in ("by_class", "by_type", "by_magnification", "image_sizes"):
        if summary.get(key):  # no image sizes without images
            counts = ", ".join(f"{k}={v}" for k, v in summary[key].items())
            print(f"  {key.replace('_', ' ')}: {counts}")
    if summary["metadata_files"]:
        print(f"  metadata files: {', '.join(summary['metadata_files'])}")
    for warning in summary["warnings"]:
        print(f"  warning: {warning}")
    if summary["skipped"]:
        print(f"  skipped {count(len(summary['skipped']), 'file')}:")
        for reason, n in summary["skipped_by_reason"].items():
            entries = [s for s in summary["skipped"] if s["reason"].split(":", 1)[0] == reason]
            shown = entries[: args.examples]
            print(f"    {reason}: {n}")
            for entry in shown:
                detail = entry["reason"][len(reason):].lstrip(": ")
                print(f"      {entry['path']}{f' ({detail})' if detail else ''}")
            if shown and len(entries) > len(shown):  # --examples 0: the counts only
                print(f"      ... and {len(entries) - len(shown)} more (--examples N shows more, "
                      "--json lists all)")
    return _no_images(summary, args)


def _cmd_synth(args: argparse.Namespace) -> int:
    from .synthetic import make_synthetic_breakhis

    meta = make_synthetic_breakhis(
        args.out, images_per_magnification=args.images_per_magnification, size=args.size,
        layout=args.layout, irregular=not args.no_irregular, folds=not args.no_folds,
        seed=args.seed, progress=sys.stderr.isatty())
    exp = meta["expected"]
    print(f"wrote SYNTHETIC BreaKHis-layout data to {Path(args.out)}: "
          f"{count(exp['images'], 'image')}, {count(exp['patients'], 'patient')}, "
          f"{count(len(meta['irregular_files']), 'irregular file')}; "
          f"metadata in {Path(args.out) / 'synthetic.json'}")
    return 0


def _check_task(args: argparse.Namespace) -> None:
    """Refuse a ``--task`` and ``--magnification`` that do not go together before torch is
    imported (seconds); :class:`breakhis.experiments.DataSpec` checks the same."""
    if not args.image_folder:  # an image folder's task is its class folders
        from .tasks import get_task

        get_task(_given(args.task, _TASK), magnification=args.magnification)


#: What ``--folds-file`` must name, as :func:`breakhis.experiments.prepare_data` says it.
_FOLD_TABLES = "fold tables (Folds.csv or dsfold1..5.txt)"


def _check_input_files(args: argparse.Namespace) -> None:
    """Refuse a ``--data-root`` that is no readable folder, a ``--folds-file`` (with
    protocol ``official``; other protocols refuse it anyway) or a ``--patients-csv`` that
    does not exist or is a folder, before torch is
    imported (seconds) and the data are indexed (minutes on the real data: a fold table
    was opened only once every image had been decoded and hashed).
    :func:`breakhis.experiments.prepare_data` checks the fold tables the same way.

    Raises:
        breakhis._files.SettingError: naming the setting (``folds_file``, which
            :func:`main` says as ``--folds-file``), what it must name, and the path (for
            ``data_root``: what it is instead, e.g. that it does not exist).
    """
    if getattr(args, "data_root", None) is not None:
        problem = missing_folder_problem(args.data_root)
        if problem is not None:
            if args.command in ("evaluate", "figures"):
                what = "the folder of the run's data (where it moved since training)"
            elif getattr(args, "image_folder", False):
                what = "an image folder (root/<class>/<image>)"
            else:
                what = "a BreaKHis folder"
            raise SettingError("data_root", f"must name {what}, but {problem}")
    if getattr(args, "protocol", None) == "official":
        check_input_files("folds_file", args.folds_file, _FOLD_TABLES)
    if getattr(args, "patients_csv", None) is not None:
        check_input_files("patients_csv", [args.patients_csv], "a CSV file (columns path, patient)")


class _CombinationError(ValueError):
    """Options given together where one takes the other's effect away
    (:func:`_check_combinations`); said as it is, without :func:`main`'s offline hint."""


def _check_combinations(args: argparse.Namespace) -> None:
    """Refuse an option given beside one that makes it do nothing, before torch is
    imported (seconds) and the data are indexed (minutes): it was ignored, so a run did
    other than asked (``--no-pretrained --weights w.pt`` trained from random weights).
    ``index`` has ``--image-folder`` and ``--patients-csv`` only.

    :class:`breakhis.experiments.DataSpec` and :class:`breakhis.train.TrainConfig` refuse
    the same settings when they differ from their defaults; here an option is refused when
    it is given at all, as its default is ``None``.

    Raises:
        _CombinationError: (a ``ValueError``) naming both options, what each does and
            how to go on.
    """
    given = vars(args)
    if given.get("patients_csv") is not None and not args.image_folder:
        raise _CombinationError(
            f"--patients-csv {args.patients_csv!r} gives the patients of an image folder "
            "(--image-folder), but without --image-folder --data-root is read as BreaKHis, "
            "whose file names give the patients; add --image-folder or drop --patients-csv")
    if given.get("task") is not None and args.image_folder:
        raise _CombinationError(
            f"--task {args.task} selects BreaKHis classes, but --image-folder takes its class "
            "folders as the classes; drop --task, or drop --image-folder to read --data-root "
            "as BreaKHis")
    if given.get("magnification") is not None and args.image_folder:
        raise _CombinationError(
            f"--magnification {args.magnification} selects the BreaKHis images of one "
            "magnification (tasks MSBC and MSFC), but --image-folder takes every image of "
            "its class folders; drop --magnification, or drop --image-folder to read "
            "--data-root as BreaKHis")
    if args.command not in ("train", "cv"):
        return
    if args.protocol == "official" and args.n_splits is not None:
        raise _CombinationError(
            f"--n-splits {args.n_splits} sets the number of folds of protocols 'image' and "
            "'patient', but protocol 'official' takes its folds from the fold tables (one "
            "per table); drop --n-splits, or pass --protocol patient (or image)"
            + (f" for {args.n_splits} folds" if args.n_splits >= 2 else ""))
    if args.protocol == "official" and args.val_fraction == 0 and args.split_seed is not None:
        raise _CombinationError(
            f"--split-seed {args.split_seed} draws the folds of protocols 'image' and "
            "'patient' and the validation images, but protocol 'official' takes its folds "
            "from the fold tables and --val-fraction 0 holds out no validation images; drop "
            "--split-seed, or pass a --val-fraction above 0")
    # tiny first: the advice below (drop --no-pretrained) would lead into this refusal
    if args.backbone == "tiny" and args.weights is not None:
        raise _CombinationError(
            f"--weights {args.weights!r} loads the weights to start from, but --backbone tiny "
            "has no pretrained weights (it starts from random weights); drop --weights"
            + ("" if args.no_pretrained else " and pass --no-pretrained"))
    if args.backbone == "tiny" and not args.no_pretrained:  # ImageNet weights by default
        raise _CombinationError(
            "--backbone tiny has no pretrained weights (it starts from random weights), but "
            f"without --no-pretrained a run starts from pretrained ones ({_WEIGHTS!r}, the "
            "--weights default); pass --no-pretrained")
    if args.no_pretrained and args.weights is not None:
        raise _CombinationError(
            f"--weights {args.weights!r} loads the weights to start from, but --no-pretrained "
            f"starts from random weights; drop --no-pretrained to start from {args.weights!r}, "
            "or drop --weights for random weights")
    if args.no_augment and args.rotation is not None:
        raise _CombinationError(
            f"--rotation {args.rotation:g} sets the rotations of the augmentation, but "
            "--no-augment turns augmentation off (no flips, shifts or rotations); drop "
            f"--no-augment to rotate by up to {args.rotation:g} degrees, or drop --rotation")


#: breakhis.train.CHECKPOINT_NAME, without importing torch (a test checks they agree).
_CHECKPOINT = "checkpoint.pt"


def _saved_checkpoints(args: argparse.Namespace) -> list[Path] | None:
    """The checkpoints a ``train`` or ``cv`` stopped now leaves in its run folder (``--out``,
    or the default once the command has worked it out); ``None`` when the folder is not
    known yet."""
    folder = getattr(args, "run_folder", None) or getattr(args, "out", None)
    if not folder:
        return None
    out = Path(folder)
    folds = [p for p in sorted(out.glob(f"fold*/{_CHECKPOINT}"))
             if re.fullmatch(r"fold(0|[1-9]\d*)", p.parent.name)]  # not a fold0.bak
    return [p for p in (out / _CHECKPOINT, *folds) if p.is_file()]


def _stop_hint(args: argparse.Namespace, started: float) -> str:
    """How to go on after a ``train`` or ``cv`` stopped by Ctrl-C or SIGTERM, from what its
    run folder holds now (checkpoints of ``fold<k>`` folders only, as ``cv`` names them):
    no checkpoint (the same command starts afresh), with ``--overwrite`` one saved since
    the command began (``started``, a ``time.time()``: ``--resume`` instead of
    ``--overwrite`` continues it; the run it replaced is gone, as ``cv`` clears the folds it
    trains before the first) or only older ones (stopped before it removed the run it
    replaces, which is still there), else ``--resume``."""
    saved = _saved_checkpoints(args)
    if saved == []:
        return " (before any epoch was saved: the same command starts afresh)"
    if not args.overwrite:
        return " (the same command with --resume continues from the last finished epoch)"
    if saved is None:
        return (" (the same command with --resume instead of --overwrite continues from this "
                "run's last finished epoch, if it saved one; if not, repeat --overwrite)")
    # a second's margin: file times come from a coarser clock than time.time()
    if any(p.stat().st_mtime >= started - 1.0 for p in saved):
        return (" (the same command with --resume instead of --overwrite continues from this run's "
                "last finished epoch)")
    return (" (before this run saved an epoch: the folder still holds the run it was to "
            "replace; repeat --overwrite to replace it)")


def _check_fresh_or_resume(args: argparse.Namespace) -> None:
    if args.resume and args.overwrite:
        raise ValueError("--resume continues the run in the folder and --overwrite replaces it: "
                         "pass one of them")


def _refuse_overwriting(args: argparse.Namespace, out: Path, command: str) -> None:
    """Refuse to start afresh (no ``--resume``) in a folder that holds a run, unless
    ``--overwrite``: a fresh run removes the earlier run's checkpoint and reports, and a
    forgotten ``--resume`` would lose a run of many epochs.

    A run is a ``checkpoint.pt`` (``train``), or a fold's checkpoint or a summary
    (``cv``: ``fold*/checkpoint.pt``, ``cv_metrics.json``). A folder holding the other
    kind of run is refused whatever the options: neither ``--resume`` nor ``--overwrite``
    applies to it, and the two kinds in one folder are one too many for ``table``.
    """
    if not out.is_dir():
        return
    single = [_CHECKPOINT] if (out / _CHECKPOINT).is_file() else []
    folds = sorted(str(p.relative_to(out)) for p in out.glob(f"fold*/{_CHECKPOINT}"))
    folds += ["cv_metrics.json"] if (out / "cv_metrics.json").is_file() else []
    found, other = (folds, single) if command == "cv" else (single, folds)
    if other:  # the other kind of run: neither resumed nor replaced by this command
        kind = "a single run" if command == "cv" else "a cross-validation"
        raise ValueError(
            f"{str(out)!r} holds {kind} ({listed(other)}), which {command} would write its run "
            "beside (and `table` would show one of the two only): pass another --out")
    if found and not (args.resume or args.overwrite):
        raise ValueError(
            f"{str(out)!r} holds a run ({listed(found)}): pass --resume to continue it, --overwrite to "
            "replace it with a fresh run, or another --out")


def _refuse_inside_a_run(out: Path) -> None:
    """A ``train`` into a fold folder of a cross-validation in progress (its parent held)
    would replace that fold's files under it: refused."""
    parent = out.resolve().parent
    if FolderLock.busy(parent):
        raise ValueError(
            f"{str(out)!r} lies in {str(parent)!r}, which another breakhis-repro run is using "
            f"(it holds {LOCK_NAME}): wait for that run to end, or pass another --out")


def _cmd_train(args: argparse.Namespace) -> int:
    _check_combinations(args)
    _check_task(args)
    _check_input_files(args)
    from .distributed import cleanup_distributed, init_distributed
    from .experiments import check_resume, hold_folder, prepare_data, run_fold
    from .train import check_batch_split

    _check_fresh_or_resume(args)  # before any process group is made
    config = _config(args)
    _check_model(args, config)
    info = init_distributed(config.device)
    _log_to_console(info.is_main)
    spec = _spec(args)
    try:
        check_batch_split(config, info)
        if args.out:
            # a file in the way, before indexing; run_fold creates and tries the folder
            # once the fold is known, before training
            _check_out(args.out)
        # without --out and --fold the run folder is known only once the folds are
        known = Path(args.out) if args.out else (
            _default_out(args, f"fold{args.fold}") if args.fold is not None else None)
        args.run_folder = known  # for the line a stop prints
        with contextlib.ExitStack() as held:

            def hold(folder: Path) -> None:
                _refuse_inside_a_run(folder)
                held.enter_context(hold_folder(folder, info))

            if known is not None:  # checked again below, with the folder held
                _refuse_overwriting(args, known, "train")
                hold(known)
            if args.resume and known is not None:
                # settings the checkpoint was not made with, before indexing (minutes)
                check_resume(spec, config, known, fold=args.fold)
            data = prepare_data(spec, progress=not args.no_progress and info.is_main)
            fold = args.fold if args.fold is not None else data.splits[0].fold
            out = args.run_folder = Path(args.out) if args.out else _default_out(args, f"fold{fold}")
            if known is None:
                hold(out)
            _refuse_overwriting(args, out, "train")
            report = run_fold(spec, config, fold, out, resume=args.resume, data=data,
                              dist_info=info, progress=not args.no_progress)
    finally:
        cleanup_distributed()
    if report is not None:
        _print_metrics(f"fold {fold} ({report['protocol']['protocol']} protocol)",
                       report["metrics"])
        print(f"run folder: {out} (checkpoint.pt, config.json, train.log, metrics.csv, "
              "test_metrics.json/.md, test_predictions.csv)")
    return 0


def _cmd_cv(args: argparse.Namespace) -> int:
    _check_combinations(args)
    _check_task(args)
    _check_input_files(args)
    from .distributed import cleanup_distributed, init_distributed
    from .experiments import hold_folder, run_cv
    from .train import check_batch_split

    _check_fresh_or_resume(args)  # before any process group is made
    config = _config(args)
    _check_model(args, config)
    info = init_distributed(config.device)
    _log_to_console(info.is_main)
    out = args.run_folder = Path(args.out) if args.out else _default_out(args, "cv")
    try:
        spec = _spec(args)
        check_batch_split(config, info)
        # a file in the way, before indexing; run_cv creates and tries the folder
        # before training
        _check_out(out)
        _refuse_overwriting(args, out, "cv")
        with hold_folder(out, info):
            _refuse_overwriting(args, out, "cv")  # as the run that held it left it
            report = run_cv(spec, config, out, folds=args.folds, resume=args.resume,
                            dist_info=info, progress=not args.no_progress)
    finally:
        cleanup_distributed()
    if report is not None:
        for key, stat in report["summary"].items():
            std = "n/a" if stat["std"] is None else f"{100 * stat['std']:.2f}"
            print(f"{key}: {100 * stat['mean']:.2f} ± {std} % over {count(stat['n'], 'fold')}")
        print(f"protocol: {report['protocol']['protocol_description']}")
        print(f"results: {out / 'cv_metrics.json'}, {out / 'cv_metrics.md'}; runs in {out}/fold*/")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    _check_checkpoint_exists(args.checkpoint)  # before torch is imported (seconds)
    _check_input_files(args)
    from .experiments import evaluate_checkpoint

    report = evaluate_checkpoint(args.checkpoint, out_dir=args.out, data_root=args.data_root,
                                 device=args.device, progress=not args.no_progress)
    assert report is not None  # one process (_check_single_process): the main one
    trained, epochs = report["epochs_trained"], report["model"]["epochs"]
    unfinished = f", after {trained} of {epochs} epochs" if trained < epochs else ""
    _print_metrics(f"fold {report['fold']} ({report['protocol']['protocol']} protocol"
                   f"{unfinished})", report["metrics"])
    out = Path(args.out) if args.out else Path(args.checkpoint).parent
    print(f"results: {out / 'test_metrics.json'}, {out / 'test_metrics.md'}, "
          f"{out / 'test_predictions.csv'}")
    return 0


def _device(name: str) -> str:
    """``--device`` of a single-process command as a torch device (``auto``: CUDA if available)."""
    from .distributed import use_cuda

    return "cuda" if use_cuda(name) else "cpu"


def _no_images(summary: dict, args: argparse.Namespace) -> int:
    """1, with a hint on stderr, when the index found no image; else 0."""
    if summary["images"]:
        return 0
    unreadable = summary["skipped_by_reason"].get("unreadable image", 0)
    if unreadable:  # named right, but no file could be read: the names are not the problem
        print(f"breakhis-repro index: no readable images under {summary['root']!r}: "
              f"{count(unreadable, 'file')} with an image name could not be read as an image "
              "(the skipped files of reason 'unreadable image')", file=sys.stderr)
        return 1
    hint = ("class subfolders holding images" if args.image_folder else
            "BreaKHis file names (e.g. SOB_B_A-14-22549AB-40-001.png) in the release's folders; "
            "for a folder of class subfolders pass --image-folder")
    print(f"breakhis-repro index: no images found under {summary['root']!r}: expected {hint}",
          file=sys.stderr)
    return 1


def _cmd_predict(args: argparse.Namespace) -> int:
    if Path(args.out).is_dir() or str(args.out).endswith(("/", os.sep)):
        raise ValueError(f"--out expects the path of a CSV file, but {args.out!r} is a folder")
    _check_checkpoint_exists(args.checkpoint)  # before torch is imported (seconds)
    problem = _predict_out_problem(Path(args.out), Path(args.checkpoint))
    if problem is not None:
        raise ValueError(problem)
    from .predict import predict_to_csv

    result = predict_to_csv(args.checkpoint, args.inputs, args.out, device=_device(args.device),
                            batch_size=args.batch_size, progress=not args.no_progress,
                            any_magnification=args.any_magnification)
    for problem in result["problems"]:
        print(f"skipped {problem}", file=sys.stderr)
    for warning in result["warnings"]:
        print(f"warning: {warning}", file=sys.stderr)
    skipped = (f"; {count(len(result['problems']), 'skipped input')} listed on stderr"
               if result["problems"] else "")
    print(f"wrote probabilities of {result['classes']} for {count(result['images'], 'image')} "
          f"to {result['csv']}{skipped}")
    return 0


def _predict_out_problem(out: Path, checkpoint: Path) -> str | None:
    """Why ``predict`` must not write its CSV to ``out``: the checkpoint, an existing file
    other than a CSV (an input image), or one of a run's own files (its
    ``test_predictions.csv``, which its ``test_metrics.json`` was made from)."""
    if not out.is_file():
        return _run_file_problem(out)
    if checkpoint.exists() and os.path.samefile(out, checkpoint):
        return f"--out expects the path of a CSV file, but {str(out)!r} is the checkpoint --checkpoint names"
    if out.suffix.lower() != ".csv":
        return (f"--out expects the path of a CSV file, but {str(out)!r} is an existing "
                f"{out.suffix or 'extension-less'} file, which the CSV would replace: pass another path")
    return _run_file_problem(out)


#: The files of a run's folder (``train``, ``cv``, ``evaluate``) that a command's ``--out``
#: must not replace.
_RUN_FILES = frozenset({_CHECKPOINT, "config.json", "train.log", "metrics.csv", "test_predictions.csv",
                        "test_metrics.json", "test_metrics.md", "cv_metrics.json", "cv_metrics.md",
                        "figures.json"})

#: Files that mark a folder as a run's (``train``/``cv``), an ``evaluate --out`` or a
#: ``figures --out`` folder (not ``config.json`` alone: a common name).
_RUN_MARKERS = (_CHECKPOINT, "cv_metrics.json", "test_metrics.json", "figures.json")


def _run_file_problem(path: Path) -> str | None:
    """Why ``--out`` must not write ``path``: one of a run's own files, in a folder that
    holds a run, an evaluation or figures (:data:`_RUN_MARKERS`), else None."""
    held = [n for n in _RUN_MARKERS if (path.parent / n).is_file()]
    if path.name in _RUN_FILES and held:
        return (f"--out would write {str(path)!r}, a file of the run in {str(path.parent)!r} "
                f"(beside its {held[0]}): pass another path")
    return None


def _cmd_figures(args: argparse.Namespace) -> int:
    _check_input_files(args)
    from .experiments import checkpoint_records
    from .plots import FIGURES_DIR, check_figure_options, check_figures_folder, make_figures

    out = Path(args.out) if args.out else Path(args.checkpoint).parent / FIGURES_DIR
    max_dim = args.max_embedding_dim or None  # 0: keep the embeddings whole
    # Checked before indexing and predicting, which take minutes on the real data.
    check_figure_options(args.seed, args.perplexity, max_dim, args.gradcam_images, out,
                         args.batch_size)
    _check_checkpoint_exists(args.checkpoint)
    check_figures_folder(args.checkpoint, out)
    records, targets, source = checkpoint_records(args.checkpoint, split=args.split,
                                                  data_root=args.data_root,
                                                  progress=not args.no_progress)
    result = make_figures(args.checkpoint, records, out, targets=targets, source=source,
                          gradcam_images=args.gradcam_images, batch_size=args.batch_size,
                          device=_device(args.device), seed=args.seed, perplexity=args.perplexity,
                          max_embedding_dim=max_dim,
                          progress=not args.no_progress)
    auc = result["roc"]["roc_auc"]
    images = {"test": f"{count(result['images'], 'test image')} of fold {result['fold']}",
              "train": f"{count(result['images'], 'training image')} of fold {result['fold']}",
              "all": f"{count(result['images'], 'image')} of the task in every split, model of "
                     f"fold {result['fold']}"}[args.split]
    trained_on = "" if args.split == "test" else " (with images the model trained on: no test result)"
    print(f"{images} ({result['protocol']['protocol']} protocol"
          f"{', SYNTHETIC data' if result['synthetic'] else ''}): ROC AUC "
          f"{'n/a' if auc is None else f'{100 * auc:.2f}%'}{trained_on}, t-SNE perplexity "
          f"{result['tsne']['perplexity']:g}")
    if result["roc"]["skipped"]:
        print(f"no ROC curve (no positive or no negative image): {result['roc']['skipped']}")
    paths = [result["roc"]["path"], result["tsne"]["path"], result["tsne"]["coords_path"]]
    if result["gradcam"]:
        paths.append(result["gradcam"]["path"])
    print(f"figures: {', '.join(paths)}; summary: {out.resolve() / 'figures.json'}")
    return 0


def _cmd_table(args: argparse.Namespace) -> int:
    seen: dict[Path, str] = {}  # each folder, by its real path, as first given
    for run_dir in args.run_dirs:  # before matplotlib and torch are imported (seconds)
        check_run_folder(run_dir)  # as breakhis.plots.results_table does
        key = Path(run_dir).resolve()
        if key in seen:  # one run, rows twice
            also = f" (also as {seen[key]!r})" if seen[key] != str(run_dir) else ""
            raise ValueError(f"expected each run folder once, but {str(run_dir)!r} is given twice{also}")
        seen[key] = str(run_dir)

    if args.out:  # the table's files must not replace a run's own (its cv_metrics.md)
        for path in (Path(args.out), Path(args.out).with_suffix(".csv")):
            problem = _run_file_problem(path)
            if problem is not None:
                raise ValueError(problem)
    from .plots import results_table

    _log_to_console(True)  # a stale cv summary is a warning of breakhis.plots
    text = results_table(args.run_dirs, out=args.out)
    print(text)
    if args.out:
        print(f"table: {args.out}, {Path(args.out).with_suffix('.csv')}")
    return 0


_COMMANDS = {"index": _cmd_index, "synth": _cmd_synth, "train": _cmd_train, "cv": _cmd_cv,
             "evaluate": _cmd_evaluate, "predict": _cmd_predict, "figures": _cmd_figures,
             "table": _cmd_table}


#: The commands that run under torchrun, one process per GPU (:mod:`breakhis.distributed`).
_DISTRIBUTED_COMMANDS = ("train", "cv")


def _check_single_process(command: str) -> None:
    """Refuse to run a command other than :data:`_DISTRIBUTED_COMMANDS` as one of several
    processes (torchrun's ``WORLD_SIZE`` above 1), before any work: each process would do
    the whole work again and print it (``evaluate`` each in a process group it never
    uses; ``synth`` failing in all but one, the folder being taken). Checked by every
    process, which needs no process group.

    Raises:
        ValueError: naming the command and ``WORLD_SIZE``.
    """
    if command not in _DISTRIBUTED_COMMANDS and _several_processes():
        world = os.environ["WORLD_SIZE"]
        raise ValueError(
            f"{command} runs in one process; run it without torchrun (got WORLD_SIZE={world}; "
            f"only {' and '.join(_DISTRIBUTED_COMMANDS)} run under torchrun)")


def _several_processes() -> bool:
    """Whether torchrun started several processes: ``WORLD_SIZE`` above 1, or not a
    number (then a single-process command refuses, rather than run in each)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return True


def _speaker(command: str) -> str:
    """How ``main``'s one-line messages begin: ``breakhis-repro train``, with the
    process's rank under torchrun (``WORLD_SIZE`` above 1), where every process says its
    own (a SIGTERM from torchrun reaches all of them; an error may be one rank's)."""
    rank = os.environ.get("RANK")
    if rank is None or not _several_processes():
        return f"breakhis-repro {command}"
    return f"breakhis-repro {command} (rank {rank} of {os.environ['WORLD_SIZE']})"


#: Words of gloo's and the OS's errors for a connection another process dropped.
_PEER_LOST = ("reset by peer", "closed by peer", "Broken pipe", "Connection refused")


def _peer_lost(exc: BaseException) -> str | None:
    """The message for an error that says another process of a torchrun run is gone (gloo:
    ``[.../pair.cc:545] Read error [127.0.0.1]:17802: Connection reset by peer. This is
    typically ...``, where it is the other process whose message says why): its first
    sentence without the source location; ``None`` for any other error, or outside
    torchrun. Only errors of the process group count: torch's ``DistError`` kinds, or an
    error that names a source file of gloo (a weights download refused with "Connection
    refused" is not one)."""
    text = str(exc)
    dist = sys.modules.get("torch.distributed")
    kinds = getattr(dist, "DistError", None) if dist is not None else None
    of_the_group = (isinstance(kinds, type) and isinstance(exc, kinds)) or re.search(
        r"\[[^\]]*gloo[^\]]*\.cc:\d+\]", text) is not None
    if not _several_processes() or not of_the_group or not any(words in text for words in _PEER_LOST):
        return None
    first = re.sub(r"^\[[^\]]*\]\s*", "", text).split(". ", 1)[0].strip()
    return f"another process of this torchrun run stopped ({first}): its own message says why"


#: Library settings named otherwise than the destination of the option that sets them:
#: ``out_dir`` of :func:`breakhis.plots.make_figures` and ``out_csv`` of
#: :func:`breakhis.predict.predict_to_csv` are their commands' ``--out``.
_SETTING_DESTS: dict[str, str] = {"out_dir": "out", "out_csv": "out"}


def _option_name(parser: _Parser, command: str, setting: str) -> str:
    """The option of ``command`` that sets ``setting`` (a
    :class:`breakhis._files.SettingError`'s): ``--input-size`` for ``input_size``,
    ``--out`` for ``out_dir``; ``setting`` itself when no option of the command sets it (a
    setting it reads from a checkpoint, as ``input_size`` for ``figures``; one without an
    option, as ``shift``; one that a flag switches off, as ``augment``).

    Read from the record that :func:`build_parser` keeps in ``parser`` as it adds the
    options (:class:`_Parser`): the option whose destination is ``setting`` (or
    :data:`_SETTING_DESTS`'s name for it); positional arguments have none.
    The settings of :class:`~breakhis.train.TrainConfig`,
    :class:`~breakhis.experiments.DataSpec` and the library's functions are named as
    those destinations.

    Examples:
        >>> parser = build_parser()
        >>> _option_name(parser, "train", "input_size"), _option_name(parser, "train", "shift")
        ('--input-size', 'shift')
        >>> _option_name(parser, "figures", "seed"), _option_name(parser, "figures", "input_size")
        ('--seed', 'input_size')
    """
    return parser.options[command].get(_SETTING_DESTS.get(setting, setting), setting)


def _check_checkpoint_exists(path: str) -> None:
    """Refuse a ``--checkpoint`` that does not exist before the modules that read it are
    imported (torch and the models: seconds); :func:`breakhis.checkpoint.load_checkpoint`
    says the same once they are, and what is wrong with a file that does exist.

    Raises:
        FileNotFoundError: naming the path.
    """
    if not Path(path).exists():
        raise missing_checkpoint(path)


def _os_error_text(exc: OSError) -> str:
    """An ``OSError`` in one line, with the path(s) it concerns when it names them.

    Examples:
        >>> _os_error_text(PermissionError(13, "Permission denied", "runs/x/checkpoint.pt"))
        "Permission denied: 'runs/x/checkpoint.pt'"
        >>> _os_error_text(OSError(28, "No space left on device"))
        'No space left on device'
    """
    paths = [repr(str(p)) for p in (exc.filename, exc.filename2) if p is not None]
    reason = exc.strerror or str(exc) or type(exc).__name__
    return f"{reason}: {' -> '.join(paths)}" if paths else reason


def _warning_line(command: str) -> Any:
    """A ``warnings.showwarning`` that prints breakhis's own warnings as the commands print
    theirs, ``breakhis-repro <command>: warning: ...`` on one line (others as Python does);
    under torchrun from the main process only, as every process meets the same data."""
    package = Path(__file__).resolve().parent
    default = warnings.showwarning

    def show(message: Any, category: Any, filename: str, lineno: int, file: Any = None,
             line: str | None = None) -> None:
        try:
            ours = Path(filename).resolve().is_relative_to(package)
        except (OSError, ValueError):
            ours = False
        if not ours:
            default(message, category, filename, lineno, file, line)
            return
        if os.environ.get("RANK", "0") not in ("", "0"):
            return  # under torchrun every process meets the same data: the main one says it
        print(f"{_speaker(command)}: warning: {' '.join(str(message).split())}",
              file=sys.stderr if file is None else file)

    return show


#: The options (``dest``) that name files or folders.
_PATH_OPTIONS = ("out", "data_root", "folds_file", "patients_csv", "weights", "checkpoint",
                 "inputs", "run_dirs")


def _expand_home(args: argparse.Namespace) -> None:
    """``~`` and ``~user`` at the start of a path option, as the shell expands them (it does
    not in ``--out=~/x``, which made a folder named ``~`` in the working directory)."""
    for name in _PATH_OPTIONS:
        value = getattr(args, name, None)
        if isinstance(value, str) and value.startswith("~"):
            setattr(args, name, os.path.expanduser(value))
        elif isinstance(value, (list, tuple)):
            setattr(args, name, type(value)(os.path.expanduser(v) if isinstance(v, str) and v.startswith("~")
                                            else v for v in value))


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``breakhis-repro``; returns the exit status (1 when the packages of the
    reference extra are not all installed, said in one line once the command line is
    read, so that ``--help`` works without them; 2 after an error line for
    a setting, a file or a folder that is wrong, a file that cannot be read or
    written, or a command other than ``train`` and ``cv`` started by torchrun with more
    than one process; 130 after Ctrl-C and 143 after SIGTERM, each said in one line). A
    setting out of range (:class:`breakhis._files.SettingError`) is named by the
    command's option for it (``--input-size``, not ``input_size``: :func:`_option_name`)."""
    from . import INSTALL, missing_requirements

    parser = build_parser()
    args = parser.parse_args(argv)
    _expand_home(args)
    missing = missing_requirements()
    if missing:
        print(f"breakhis-repro: error: it needs {', '.join(missing)}, which "
              f"{'is' if len(missing) == 1 else 'are'} not installed: {INSTALL}",
              file=sys.stderr)
        return 1
    started = time.time()  # a run folder's checkpoints older than this are an earlier run's
    try:
        _check_single_process(args.command)
        with terminate_as_interrupt(), warnings.catch_warnings():  # kill, a scheduler: as Ctrl-C
            warnings.showwarning = _warning_line(args.command)
            return _COMMANDS[args.command](args)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        if isinstance(exc, SettingError):  # named as the command line names it: --input-size
            text = exc.named(_option_name(parser, args.command, exc.setting))
        elif isinstance(exc, _CombinationError):  # --no-pretrained --weights: no offline hint
            text = str(exc)
        elif isinstance(exc, OSError) and exc.errno is not None:  # not "[Errno 2] ..."
            text = _os_error_text(exc)
        elif (lost := _peer_lost(exc)) is not None:  # the other process's message says why
            text = lost + (_stop_hint(args, started) if "resume" in vars(args) else "")
        else:
            text = str(exc)
            if "imagenet" in text.lower() or "pretrained" in text.lower():
                text += " (offline? pass --weights PATH to a local state_dict, or --no-pretrained)"
        print(f"{_speaker(args.command)}: error: {text}", file=sys.stderr)
        return 2
    except OSError as exc:  # a file that cannot be read or written: names the path
        print(f"{_speaker(args.command)}: error: {_os_error_text(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM: one line, not a traceback
        # the commands that have --resume say how to go on
        resume = _stop_hint(args, started) if "resume" in vars(args) else ""
        what = str(exc) if isinstance(exc, Terminated) else "interrupted"
        print(f"{_speaker(args.command)}: {what}{resume}", file=sys.stderr)
        # 128 + the signal's number, as a shell reports a process it ended
        return 128 + (signal.SIGTERM if isinstance(exc, Terminated) else signal.SIGINT)
    finally:
        _stop_logging_to_console()


if __name__ == "__main__":
    sys.exit(main())
