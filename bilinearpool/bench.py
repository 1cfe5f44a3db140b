"""Measuring helpers behind ``bilinearpool-bench``: parameters, time, saved bytes, throughput.

The benchmark protocol (the documentation's Benchmarks page) asks for *ratios measured
side by side in one run*: ours / baseline on the same machine, inputs and thread count,
each the median of several repeats after warm-up, with the environment recorded. This
module holds the pieces that do the measuring:

- exact parameter counts (:func:`count_parameters`) and the closed-form counts of the
  paper's heads (:func:`analytic_parameter_count`, :func:`se_parameter_count`);
- the bytes autograd keeps for backward, counted exactly by unique storage
  (:class:`SavedTensorCounter`, built on :func:`torch.autograd.graph.saved_tensors_hooks`);
- timing with CUDA synchronisation, candidates interleaved in balanced orders so that
  load from other processes and each other's after-effects hit every candidate alike
  (:func:`time_call`, :func:`round_robin`, :func:`balanced_orders`);
- one inference / one training step of a classifier (:func:`make_inference_step`,
  :func:`make_training_step`) for images per second;
- the registries of what is compared: layer cases (:data:`LAYER_CASES`, extend with
  :func:`register_layer_case`) and model heads (:data:`MODEL_HEADS`);
- :func:`environment`, the record that goes with every result.

Only torch (and numpy through it) is needed here; ``tqdm`` and ``matplotlib`` are used by
the command line (:mod:`bilinearpool.cli`) when installed. ``python -m bilinearpool.bench``
runs the same command line as ``bilinearpool-bench``.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib.metadata
import math
import os
import platform
import random
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import SEBlock
from .functional._checks import check_positive_int
from .pooling import BilinearPool, FastBilinearPool

__all__ = [
    "CLASSIFIER_CLASSES",
    "LAYER_CASES",
    "LayerCase",
    "MODEL_HEADS",
    "ModelHead",
    "RUNTIME_ENV_NAMES",
    "RUNTIME_ENV_PREFIXES",
    "RUNTIME_ENV_WATCHED_BEFORE",
    "SWITCHES",
    "SavedTensorCounter",
    "analytic_parameter_count",
    "autocast_context",
    "balanced_orders",
    "classifier_parameter_count",
    "count_parameters",
    "environment",
    "images_per_second",
    "layer_output_dim",
    "main",
    "make_inference_step",
    "make_training_step",
    "matmul_floor",
    "median",
    "naive_bilinear_chain",
    "register_layer_case",
    "round_robin",
    "runtime_env_watched",
    "se_parameter_count",
    "synchronize",
    "time_call",
]


# ---------------------------------------------------------------------------------------------
# Parameters
# ---------------------------------------------------------------------------------------------


def count_parameters(module: nn.Module, *, trainable_only: bool = False) -> int:
    """Exact number of parameters of ``module``; a parameter shared by two submodules counts once.

    Args:
        module: any module.
        trainable_only: count only parameters with ``requires_grad``.

    Examples:
        >>> count_parameters(nn.Linear(4, 3))
        15
        >>> shared = nn.Linear(4, 3)
        >>> count_parameters(nn.Sequential(shared, nn.ReLU(), shared))
        15
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, but got {type(module).__name__}")
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def se_parameter_count(channels: Iterable[int], *, reduction: int) -> int:
    """Parameters of squeeze-and-excitation blocks, in closed form.

    Each :class:`~bilinearpool.SEBlock` on :math:`C` channels with ratio :math:`r` has two
    linear layers through :math:`h = \\max(1, \\lfloor C / r \\rfloor)` units:
    :math:`C h + h` (squeeze) and :math:`h C + C` (excite), i.e. :math:`2Ch + h + C`.

    Args:
        channels: channel count of every SE block.
        reduction: the ratio :math:`r` (8 in Liu, Juhas & Zhang, 2020).

    Examples:
        >>> se_parameter_count([64], reduction=8)  # 2*64*8 + 8 + 64
        1096
        >>> se_parameter_count([64], reduction=8) == count_parameters(SEBlock(64, reduction=8))
        True
    """
    reduction = check_positive_int("reduction", reduction)
    total = 0
    for c in channels:
        h = max(1, c // reduction)
        total += 2 * c * h + h + c
    return total


_ANALYTIC_HEADS = ("plain", "fast-bcnn", "bcnn")


def analytic_parameter_count(
    head: str,
    *,
    backbone_params: int,
    channels: int,
    num_classes: int,
    triu: bool = False,
    se_channels: Sequence[int] = (),
    se_reduction: int = 8,
    shared: bool = False,
    reduce_dim: int | None = None,
) -> int:
    """Parameters of one of the paper's classifiers, from the backbone's count and :math:`C`.

    With :math:`P` the backbone's parameters, :math:`S` those of its SE blocks (if any),
    :math:`C` its output channels and :math:`K` classes:

    - ``"plain"`` (global average pooling): :math:`P + S + CK + K`;
    - ``"fast-bcnn"`` (one stream): :math:`P + S + C^2 K + K`, or
      :math:`P + S + \\frac{C(C+1)}{2} K + K` with the packed upper triangle (``triu``);
    - ``"bcnn"`` (two streams with separate weights): :math:`2(P + S) + C^2 K + K`, or
      :math:`P + S + C^2 K + K` when both streams share one backbone (``shared``).

    With ``reduce_dim`` :math:`R`, each stream (both for ``"bcnn"``, also when they share
    a backbone) has its own :class:`~bilinearpool.ChannelReduction`, a bias-free
    :math:`1 \\times 1` convolution and a batch norm (scale and shift): :math:`CR + 2R`
    parameters, and :math:`R` takes the place of :math:`C` in the classifier's input.

    Args:
        head: ``"plain"``, ``"fast-bcnn"`` or ``"bcnn"``.
        backbone_params: :math:`P`, parameters of one backbone without SE blocks.
        channels: :math:`C`, channels of the backbone's last feature map.
        num_classes: :math:`K`.
        triu: Fast BCNN on the packed upper triangle.
        se_channels: channel count of every SE block inserted in one backbone.
        se_reduction: SE ratio (see :func:`se_parameter_count`).
        shared: BCNN whose two streams share one backbone.
        reduce_dim: :math:`R`, channels after the channel reduction, or ``None`` for none.

    Examples:
        >>> analytic_parameter_count("fast-bcnn", backbone_params=23_508_032, channels=2048, num_classes=8)
        57062472
        >>> analytic_parameter_count("bcnn", backbone_params=100, channels=4, num_classes=2, shared=True)
        134
        >>> analytic_parameter_count("fast-bcnn", backbone_params=100, channels=8, num_classes=2, reduce_dim=2)
        130
    """
    if not isinstance(head, str):  # (an AttributeError from .lower() before)
        raise TypeError(f"head must be one of {_ANALYTIC_HEADS}, but got {head!r} ({type(head).__name__})")
    key = head.lower().replace("_", "-")
    if key not in _ANALYTIC_HEADS:
        raise ValueError(f"head must be one of {_ANALYTIC_HEADS}, but got {head!r}")
    backbone_params = check_positive_int("backbone_params", backbone_params, least=0)
    channels = check_positive_int("channels", channels)
    num_classes = check_positive_int("num_classes", num_classes)
    if triu and key != "fast-bcnn":
        raise ValueError(f"triu=True applies to the 'fast-bcnn' head only, but got head={head!r}")
    if shared and key != "bcnn":
        raise ValueError(f"shared=True applies to the 'bcnn' head only, but got head={head!r}")
    stream = backbone_params + se_parameter_count(se_channels, reduction=se_reduction)
    streams = 2 if key == "bcnn" else 1
    reduction = 0
    if reduce_dim is not None:
        reduce_dim = check_positive_int("reduce_dim", reduce_dim)
        reduction = streams * (channels * reduce_dim + 2 * reduce_dim)  # conv (no bias) + BN
        channels = reduce_dim
    if key == "plain":
        features = channels
    elif triu:
        features = channels * (channels + 1) // 2
    else:
        features = channels * channels
    backbones = 1 if shared else streams
    return backbones * stream + reduction + features * num_classes + num_classes


#: Classes of the linear classifier the layer benchmark puts on top of each pooling (as the
#: model benchmark's ``num_classes``).
CLASSIFIER_CLASSES = 8


def classifier_parameter_count(dim: int, num_classes: int = CLASSIFIER_CLASSES) -> int:
    """Parameters of ``nn.Linear(dim, num_classes)`` on a pooled vector of length ``dim``: :math:`DK + K`.

    Examples:
        >>> classifier_parameter_count(2048 * 2048)  # Fast BCNN on 2048 channels, 8 classes
        33554440
        >>> classifier_parameter_count(512, 8) == count_parameters(nn.Linear(512, 8))
        True
    """
    dim, num_classes = check_positive_int("dim", dim), check_positive_int("num_classes", num_classes)
    return dim * num_classes + num_classes


# ---------------------------------------------------------------------------------------------
# Saved-for-backward bytes
# ---------------------------------------------------------------------------------------------


class SavedTensorCounter:
    """Count what autograd saves for backward inside a ``with`` block, by unique storage.

    Uses :func:`torch.autograd.graph.saved_tensors_hooks`, so the count is exact and free of
    noise: every tensor an op (or a custom :class:`torch.autograd.Function`) saves passes
    through the pack hook. It is what the block's ops saved, also for a graph freed inside
    the block (a backward run there, a result thrown away): build in the block the one
    graph to measure, and keep it until the block ends. Tensors sharing memory (views of
    one tensor, the same input saved by two ops) count once, with the full size of their
    storage, which is the memory the graph keeps alive. Saved inputs and parameters count too: the fused Fast BCNN op keeps
    only its input, so its saved bytes equal the input map's.

    Args:
        exclude: tensors whose storages are not counted when saved (e.g. a classifier's
            weight, which the model holds anyway), nor views of them (a transpose): only
            tensors sharing storage with an excluded one. A copy made of them inside the
            block is counted: the float16/bfloat16 cast of a weight under autocast is
            memory that only the graph holds. In float32, where the cast returns the
            weight itself, nothing is added.

    Attributes:
        nbytes: bytes of the unique storages saved.
        count: number of tensors saved (with repeats).
        storages: number of unique storages.

    Examples:
        >>> x = torch.randn(100, requires_grad=True)
        >>> y = torch.randn(100, requires_grad=True)
        >>> with SavedTensorCounter() as saved:
        ...     z = x * y  # saves x and y
        >>> saved.nbytes, saved.count, saved.storages
        (800, 2, 2)
        >>> with SavedTensorCounter() as saved:
        ...     z = x * x  # saves x twice: one storage
        >>> saved.nbytes, saved.count
        (400, 2)
        >>> with SavedTensorCounter(exclude=[y]) as saved:
        ...     z = x * y  # y is not counted
        >>> saved.nbytes
        400
        >>> with SavedTensorCounter(exclude=[y]) as saved:
        ...     z = x * y.t().t()  # nor is a view of y
        >>> saved.nbytes
        400
        >>> with SavedTensorCounter(exclude=[y]) as saved:
        ...     z = x.double() * y.double()  # a copy of y (as autocast makes of a weight) is
        >>> saved.nbytes
        1600
    """

    def __init__(self, exclude: Iterable[Tensor] = ()) -> None:
        self.nbytes = 0
        self.count = 0
        exclude = list(exclude)
        self._seen: set[tuple[str, int]] = {self._key(t) for t in exclude}
        self._excluded = len(self._seen)
        self._exclude_refs = exclude  # keeps their storages, so no new tensor takes their addresses
        self._hooks: ContextManager[object] | None = None

    @staticmethod
    def _key(t: Tensor) -> tuple[str, int]:
        return (str(t.device), t.untyped_storage().data_ptr())

    @property
    def storages(self) -> int:
        return len(self._seen) - self._excluded

    def _pack(self, t: Tensor) -> Tensor:
        self.count += 1
        try:
            key, size = self._key(t), t.untyped_storage().nbytes()
        except (RuntimeError, NotImplementedError):  # tensors without a plain storage
            key = (str(t.device), id(t))
            size = t.numel() * t.element_size()
        if key not in self._seen:
            self._seen.add(key)
            self.nbytes += size
        return t

    @staticmethod
    def _unpack(t: Tensor) -> Tensor:
        return t

    def __enter__(self) -> SavedTensorCounter:
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._hooks is not None:
            self._hooks.__exit__(*exc)
            self._hooks = None


# ---------------------------------------------------------------------------------------------
# Time
# ---------------------------------------------------------------------------------------------


def synchronize(device: torch.device | str) -> None:
    """Wait for the device's queued work (CUDA and MPS kernels run asynchronously); no-op on CPU.

    Examples:
        >>> synchronize("cpu")
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def time_call(fn: Callable[[], object], device: torch.device | str = "cpu") -> float:
    """Wall-clock seconds of one call of ``fn``, synchronised before and after on CUDA and MPS.

    Examples:
        >>> time_call(lambda: torch.ones(10).sum()) >= 0.0
        True
    """
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def balanced_orders(n: int) -> list[list[int]]:
    """Orders of ``n`` candidates, one per round, in which each follows each equally often.

    A candidate inherits the state its predecessor leaves (freed memory that must be
    faulted in again, cold caches), so a fixed order, or a fixed order merely rotated,
    gives every candidate the same predecessor in every round and biases the ratios. This
    is a Williams design: over ``n`` rounds (``2n`` for odd ``n``) every ordered pair of
    distinct candidates is adjacent equally often, and every candidate takes every place.

    Examples:
        >>> balanced_orders(4)
        [[0, 1, 3, 2], [1, 2, 0, 3], [2, 3, 1, 0], [3, 0, 2, 1]]
        >>> len(balanced_orders(3))
        6
    """
    n = check_positive_int("n", n)
    first, low, high = [0], 1, n - 1
    while len(first) < n:
        first.append(low if len(first) % 2 else high)
        low, high = (low + 1, high) if len(first) % 2 == 0 else (low, high - 1)
    rows = [[(v + r) % n for v in first] for r in range(n)]
    if n % 2:
        rows += [row[::-1] for row in rows]
    return rows


def round_robin(
    fns: Mapping[str, Callable[[], object]],
    *,
    warmup: int,
    repeats: int,
    device: torch.device | str = "cpu",
    on_call: Callable[[str], None] | None = None,
) -> dict[str, list[float]]:
    """Time several candidates interleaved: one call of each per round, in balanced orders.

    On a shared machine the load changes from second to second. Timing candidate A for a
    minute and then candidate B for a minute lets that drift into the ratio B / A;
    interleaving them exposes both to the same load. The order changes every round
    (:func:`balanced_orders`), so that no candidate always goes first or always runs
    right after the same other one (whose freed memory and evicted caches it would pay for).

    The design is balanced over whole designs only (``n`` rounds, ``2n`` for odd ``n``):
    its first rows alone keep the same adjacent differences (mod ``n``) in every row, so with fewer rounds
    some candidate would never follow, say, the baseline. The timed rounds run as many
    whole designs as fit, and the rounds left over (all of them when ``repeats`` is
    smaller than the design) run seeded random orders, the same in every run.

    Args:
        fns: name -> zero-argument callable doing the work once.
        warmup: untimed rounds first (allocator, caches, cuDNN autotuning).
        repeats: timed rounds; take the :func:`median` of the result.
        device: synchronised around each call when CUDA.
        on_call: called with the name after each call (e.g. to advance a progress bar).

    Returns:
        name -> the ``repeats`` timed durations in seconds.

    Examples:
        >>> times = round_robin({"a": lambda: None, "b": lambda: None}, warmup=1, repeats=3)
        >>> sorted(times), len(times["a"])
        (['a', 'b'], 3)
    """
    warmup, repeats = check_positive_int("warmup", warmup, least=0), check_positive_int("repeats", repeats)
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in names}
    orders = balanced_orders(len(names)) if names else [[]]
    whole = repeats - repeats % len(orders)  # timed rounds in whole designs
    shuffled = random.Random(0)
    for i in range(warmup + repeats):
        if i < warmup:
            order = orders[i % len(orders)]
        elif i - warmup < whole:  # timed rounds start the design afresh
            order = orders[(i - warmup) % len(orders)]
        else:
            order = shuffled.sample(range(len(names)), len(names))
        for k in order:
            elapsed = time_call(fns[names[k]], device)
            if i >= warmup:
                times[names[k]].append(elapsed)
            if on_call is not None:
                on_call(names[k])
    return times


def median(values: Sequence[float]) -> float:
    """Median of the timed repeats (robust to the odd slow run on a shared machine).

    Examples:
        >>> median([3.0, 1.0, 100.0])
        3.0
    """
    if not values:
        raise ValueError("median of an empty sequence: run at least one repeat")
    return float(statistics.median(values))


def images_per_second(batch_size: int, seconds: float) -> float:
    """Throughput of a step that processed ``batch_size`` images in ``seconds``.

    Examples:
        >>> images_per_second(8, 0.5)
        16.0
    """
    if seconds <= 0 or not math.isfinite(seconds):
        raise ValueError(f"seconds must be positive and finite, but got {seconds!r}")
    return batch_size / seconds


# ---------------------------------------------------------------------------------------------
# Steps of a classifier
# ---------------------------------------------------------------------------------------------


def autocast_context(
    device: torch.device | str, dtype: torch.dtype | None
) -> ContextManager[object]:
    """``torch.autocast`` on ``device`` with ``dtype``, or a null context when ``dtype`` is None.

    Examples:
        >>> with autocast_context("cpu", None):
        ...     pass
    """
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def make_inference_step(
    model: nn.Module, images: Tensor, *, amp_dtype: torch.dtype | None = None
) -> Callable[[], Tensor]:
    """One forward pass in inference mode (``torch.inference_mode``, autocast if asked).

    The caller puts the model in ``eval()`` mode before timing.

    Examples:
        >>> step = make_inference_step(nn.Linear(4, 2).eval(), torch.randn(3, 4))
        >>> step().shape
        torch.Size([3, 2])
    """

    def step() -> Tensor:
        with torch.inference_mode(), autocast_context(images.device, amp_dtype):
            return model(images)

    return step


def make_training_step(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    *,
    amp_dtype: torch.dtype | None = None,
    lr: float = 0.0,
) -> Callable[[], float]:
    """One training step: forward, cross-entropy, backward and an SGD update.

    The update runs with ``lr=0`` by default: the arithmetic of the step is done in full
    but the weights stay the same, so every repeat times the same model. With float16
    autocast on CUDA the loss is scaled by a :class:`torch.amp.GradScaler`, as in
    real mixed-precision training. The caller puts the model in ``train()`` mode.

    Returns:
        A callable doing one step and returning the loss.

    Examples:
        >>> model = nn.Linear(4, 3).train()
        >>> step = make_training_step(model, torch.randn(2, 4), torch.tensor([0, 2]))
        >>> isinstance(step(), float)
        True
    """
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    device = images.device
    scaler = (
        torch.amp.GradScaler(device.type)
        if amp_dtype == torch.float16 and device.type == "cuda"
        else None
    )

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        with autocast_context(device, amp_dtype):
            loss = F.cross_entropy(model(images), labels)
        if scaler is None:
            loss.backward()
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        return float(loss.detach())

    return step


# ---------------------------------------------------------------------------------------------
# What the layer benchmark compares
# ---------------------------------------------------------------------------------------------

#: ``eps`` of the naive chain, as in published BCNN code.
NAIVE_EPS = 1e-10


def naive_bilinear_chain(x: Tensor) -> Tensor:
    """The BCNN head as published code writes it, op by op: the baseline of the benchmark.

    ``bmm(A, A^T) / (H*W)`` -> ``sign(g) * sqrt(|g| + 1e-10)`` -> ``F.normalize``. Autograd
    keeps every intermediate :math:`(B, C^2)` tensor for backward.

    Shape:
        - Input: :math:`(B, C, H, W)`.
        - Output: :math:`(B, C^2)`.

    Examples:
        >>> naive_bilinear_chain(torch.rand(2, 8, 3, 3)).shape
        torch.Size([2, 64])
    """
    b, c, h, w = x.shape
    a = x.reshape(b, c, h * w)
    g = torch.bmm(a, a.transpose(1, 2)) / (h * w)
    g = g.reshape(b, c * c)
    g = torch.sign(g) * torch.sqrt(torch.abs(g) + NAIVE_EPS)
    return F.normalize(g, dim=1)


def matmul_floor(x: Tensor) -> Tensor:
    """The bare batched matrix product :math:`A A^\\top` of the same size: work no path avoids.

    Shape:
        - Input: :math:`(B, C, H, W)`.
        - Output: :math:`(B, C, C)`.

    Examples:
        >>> matmul_floor(torch.rand(2, 8, 3, 3)).shape
        torch.Size([2, 8, 8])
    """
    b, c, h, w = x.shape
    a = x.reshape(b, c, h * w)
    return torch.bmm(a, a.transpose(1, 2))


LayerFn = Callable[..., Tensor]


@dataclass(frozen=True)
class LayerCase:
    """One path of the layer benchmark: how to build it for ``C`` channels, and its role.

    Args:
        name: short name shown in the tables (``"fast-bcnn"``).
        description: what it computes, one line.
        build: ``build(channels, device) -> fn``; ``fn`` takes ``streams`` feature maps
            ``(B, C, H, W)`` and returns any tensor (an ``nn.Module`` works: its parameters
            get gradients and are cleared between runs).
        streams: number of feature maps the path takes (2 for two-stream BCNN).
        role: ``"baseline"`` (the naive chain, ratios are taken against it), ``"floor"``
            (the bare matrix product) or ``"ours"``.
        goal: the goals of the Fast BCNN pooling apply (time <= 0.5x naive, saved bytes
            <= 1.1x input).
        variant_of: for a ``goal`` case that does not do the goal's work as stated (half the
            output, packed; keeping its output by design), the case that does: its verdicts
            read ``variant: ...`` and the goal lines give its ratios as information only,
            judging the goal on ``variant_of``.
        max_channels: skip shapes with more channels (paths too slow for large ``C`` on CPU).
    """

    name: str
    description: str
    build: Callable[[int, torch.device], LayerFn]
    streams: int = 1
    role: str = "ours"
    goal: bool = False
    max_channels: int | None = None
    variant_of: str | None = None

    def __post_init__(self) -> None:
        if self.role not in ("baseline", "floor", "ours"):
            raise ValueError(f"role must be 'baseline', 'floor' or 'ours', but got {self.role!r}")
        if self.streams not in (1, 2):
            raise ValueError(f"streams must be 1 or 2, but got {self.streams!r}")
        if self.variant_of is not None and not self.goal:
            raise ValueError(f"variant_of={self.variant_of!r} labels a variant of a goal case, "
                             "so the case needs goal=True")

    def applies(self, channels: int) -> bool:
        """Whether this case runs at ``channels`` channels."""
        return self.max_channels is None or channels <= self.max_channels


#: Name -> :class:`LayerCase`, in table order. Add a case with :func:`register_layer_case`.
LAYER_CASES: dict[str, LayerCase] = {}


def register_layer_case(case: LayerCase, *, replace: bool = False) -> LayerCase:
    """Add ``case`` to :data:`LAYER_CASES` (the layer benchmark runs every registered case).

    Examples:
        >>> case = LayerCase("demo-gap", "global average pooling", lambda c, device: lambda x: x.mean((2, 3)))
        >>> register_layer_case(case).name in LAYER_CASES
        True
        >>> del LAYER_CASES["demo-gap"]
    """
    if not isinstance(case, LayerCase):
        raise TypeError(f"case must be a LayerCase, but got {type(case).__name__}")
    if case.name in LAYER_CASES and not replace:
        raise ValueError(
            f"a layer case named {case.name!r} is already registered; pass replace=True"
        )
    LAYER_CASES[case.name] = case
    return case


def layer_output_dim(fn: LayerFn, channels: int, *, streams: int = 1, out: Tensor | None = None) -> int:
    """Features per sample :math:`D` that a layer case gives for ``channels`` input channels.

    Asked of the layer itself: its ``output_dim(C)`` (``output_dim(C, C)`` for two streams)
    when it has one, else the per-sample size of one output ``out`` of shape :math:`(B, \\ldots)`.
    When both are there they must agree.

    Examples:
        >>> layer_output_dim(FastBilinearPool(triu=True), 8)
        36
        >>> layer_output_dim(naive_bilinear_chain, 8, out=torch.zeros(2, 64))
        64
    """
    from_out = None if out is None else int(out[0].numel())
    method = getattr(fn, "output_dim", None)
    if callable(method):
        dim = int(method(channels) if streams == 1 else method(channels, channels))
        if from_out is not None and dim != from_out:
            raise RuntimeError(
                f"{type(fn).__name__}.output_dim({channels}) = {dim}, but one output has "
                f"{from_out} features per sample (shape {tuple(out.shape)})"  # type: ignore[union-attr]
            )
        return dim
    if from_out is None:
        raise ValueError(
            f"{getattr(fn, '__name__', type(fn).__name__)} has no output_dim(C): pass one output as out="
        )
    return from_out


def _covariance_isqrt(channels: int, device: torch.device) -> LayerFn:
    from .covariance import CovariancePool
    from .matrix_sqrt import MatrixSqrt

    return CovariancePool(norm=MatrixSqrt()).to(device)


#: Channels after the 1x1 reduction of iSQRT-COV (Li et al. 2018 reduce ResNet-50's 2048 to 256).
ISQRT_REDUCED_CHANNELS = 256


def _covariance_isqrt_reduced(channels: int, device: torch.device) -> LayerFn:
    from .covariance import CovariancePool
    from .matrix_sqrt import MatrixSqrt

    return CovariancePool(
        in_channels=channels, reduced_channels=ISQRT_REDUCED_CHANNELS, norm=MatrixSqrt()
    ).to(device)


def _compact(channels: int, device: torch.device) -> LayerFn:
    from .compact import CompactBilinearPool

    return CompactBilinearPool(in_channels=channels, out_features=8192, device=device)


def _lowrank(channels: int, device: torch.device) -> LayerFn:
    from .lowrank import LowRankBilinearPool

    return LowRankBilinearPool(in_channels=channels, rank=512, device=device)


for _case in (
    LayerCase(
        "naive",
        "bmm/(H*W) -> sign*sqrt(|x|+1e-10) -> F.normalize, op by op",
        lambda c, d: naive_bilinear_chain,
        role="baseline",
    ),
    LayerCase(
        "matmul-floor", "bare bmm(A, A^T) of the same size", lambda c, d: matmul_floor, role="floor"
    ),
    LayerCase(
        "fast-bcnn",
        "FastBilinearPool(): fused pool + signed sqrt + L2",
        lambda c, d: FastBilinearPool(),
        goal=True,
    ),
    LayerCase(
        "fast-bcnn-triu",
        "FastBilinearPool(triu=True): fused, packed upper triangle",
        lambda c, d: FastBilinearPool(triu=True),
        goal=True,
        variant_of="fast-bcnn",
    ),
    LayerCase(
        "fast-bcnn-so",
        "FastBilinearPool(save_output=True): fused, keeps its output for backward (no rebuild)",
        lambda c, d: FastBilinearPool(save_output=True),
        goal=True,
        variant_of="fast-bcnn",
    ),
    LayerCase(
        "bcnn-2stream",
        "BilinearPool(normalize=True) on two maps of this shape",
        lambda c, d: BilinearPool(normalize=True),
        streams=2,
    ),
    LayerCase(
        "bcnn-2stream-so",
        "BilinearPool(normalize=True, save_output=True) on two maps: keeps its output for backward",
        lambda c, d: BilinearPool(normalize=True, save_output=True),
        streams=2,
    ),
    # Newton-Schulz on C x C matrices costs O(C^3) per step: minutes at C=2048 on a CPU.
    LayerCase(
        "isqrt-cov",
        "CovariancePool(norm=MatrixSqrt()): covariance + Newton-Schulz square root (5 steps) "
        "on all C channels, upper triangle, no reduction (not the iSQRT-COV setting; see isqrt-cov-r256)",
        _covariance_isqrt,
        max_channels=512,
    ),
    LayerCase(
        "isqrt-cov-r256",
        f"CovariancePool(in_channels=C, reduced_channels={ISQRT_REDUCED_CHANNELS}, norm=MatrixSqrt()): "
        f"the iSQRT-COV setting, 1x1 conv + BN + ReLU to {ISQRT_REDUCED_CHANNELS} channels, then "
        "covariance + 5 Newton-Schulz steps, upper triangle (at C=256 the 1x1 conv keeps 256 channels; "
        f"below {ISQRT_REDUCED_CHANNELS} it expands them, so that small shapes cost more than the chain)",
        _covariance_isqrt_reduced,
    ),
    LayerCase("compact-ts", "CompactBilinearPool(out_features=8192): tensor sketch", _compact),
    LayerCase("lowrank-r512", "LowRankBilinearPool(rank=512): Hadamard low-rank", _lowrank),
):
    register_layer_case(_case)
del _case

#: The layer cases the library defines, in table order. The others were registered by the
#: user: ``bilinearpool-bench`` runs them when ``--import`` names the module that registers
#: them, and the layer plot gives the library's cases fixed colours.
_LIBRARY_LAYER_CASES: tuple[str, ...] = tuple(LAYER_CASES)


# ---------------------------------------------------------------------------------------------
# What the model benchmark compares
# ---------------------------------------------------------------------------------------------


#: Options of :func:`~bilinearpool.build_model` that :meth:`ModelHead.analytic_parameters`
#: accounts for, or that do not change the parameter count.
_CLOSED_FORM_OPTIONS = ("triu", "shared", "reduce_dim", "se_reduction", "dropout", "weights",
                        "sample_shape", "output_fmt")  # fmt: skip


@dataclass(frozen=True)
class ModelHead:
    """One head of the model benchmark: a :func:`~bilinearpool.build_model` head and options.

    Args:
        name: name in the tables (``"fast-bcnn"``).
        head: the :func:`~bilinearpool.build_model` head (``"plain"``, ``"bcnn"``, ``"fast-bcnn"``).
        description: one line for the tables.
        se: insert SE blocks (``se_reduction``) in the backbone.
        options: further keyword arguments of :func:`~bilinearpool.build_model`.
        module: the module that made the head (where ``ModelHead(...)`` was called),
            recorded when not given: ``bilinearpool-bench`` knows from it that the head of
            a run came from a module its ``--import`` names, also when that module had been
            imported before (as a layer case by its build function's module).
    """

    name: str
    head: str
    description: str
    se: bool = False
    options: Mapping[str, Any] = field(default_factory=dict)
    module: str | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.module is None:
            frame = sys._getframe(1)
            # past the (generated) __init__ of this class, and of subclasses calling it
            while (frame is not None and frame.f_code.co_name == "__init__"
                   and isinstance(frame.f_locals.get("self"), ModelHead)):  # fmt: skip
                frame = frame.f_back  # type: ignore[assignment]
            module = None if frame is None else frame.f_globals.get("__name__")
            object.__setattr__(self, "module", module)

    def build(
        self,
        backbone: str | nn.Module,
        *,
        num_classes: int,
        se_reduction: int = 8,
        node: str | None = None,
        sample_shape: tuple[int, ...] | None = None,
    ) -> nn.Module:
        """The classifier with random weights (nothing is downloaded).

        ``node`` and ``sample_shape`` cut the backbone where the run says (``bilinearpool-bench
        models --node``), for every head alike, so that the plain baseline and the closed-form
        counts see the same cut backbone; a head whose own :attr:`options` set ``node`` is
        refused with them (ValueError), and its own ``sample_shape`` wins.
        """
        from .models import build_model

        kwargs: dict[str, Any] = dict(self.options)
        if self.se:
            kwargs["se_reduction"] = se_reduction
        if node is not None:
            if kwargs.get("node") is not None:
                raise ValueError(
                    f"head {self.name!r} cuts its backbone at node={kwargs['node']!r} itself, "
                    f"so a run's node={node!r} cannot apply to it"
                )
            kwargs["node"] = node
            if sample_shape is not None and kwargs.get("sample_shape") is None:
                kwargs["sample_shape"] = sample_shape
        return build_model(self.head, backbone, num_classes=num_classes, **kwargs)

    def analytic_parameters(
        self,
        model: nn.Module,
        *,
        backbone_params: int,
        channels: int,
        num_classes: int,
        se_reduction: int = 8,
    ) -> int | None:
        """:func:`analytic_parameter_count` for this head and its options, SE channels read
        from ``model``'s blocks; ``None`` when an option changes the count in a way the closed
        form does not give (see :meth:`unchecked_options`).

        ``backbone_params`` and ``channels`` are those of the plain backbone (no SE blocks, cut
        where the head's backbone is cut by default); ``se_reduction`` the run's ratio, which
        a head with ``se`` builds with (else its ``se_reduction`` option, if any).
        """
        if self.unchecked_options():
            return None
        options = self.options
        ratio = se_reduction if self.se else options.get("se_reduction")
        se_channels: list[int] = []
        if ratio is not None:
            first = getattr(model, "backbone", model)
            se_channels = [m.channels for m in first.modules() if isinstance(m, SEBlock)]
        return analytic_parameter_count(
            self.head,
            backbone_params=backbone_params,
            channels=channels,
            num_classes=num_classes,
            triu=bool(options.get("triu", False)),
            se_channels=se_channels,
            se_reduction=se_reduction if ratio is None else int(ratio),
            shared=bool(options.get("shared", False)),
            reduce_dim=options.get("reduce_dim") or None,
        )

    def unchecked_options(self) -> list[str]:
        """The options (of :attr:`options`) whose parameters have no closed form here.

        :meth:`analytic_parameters` accounts for ``triu``, ``shared``, ``reduce_dim`` and
        ``se_reduction``; ``dropout``, ``weights``, ``sample_shape`` and ``output_fmt`` do not
        change the count. Any other option that is set (a ``pool`` module of the user's, a
        second backbone ``backbone_b``, a cut at another ``node``) is listed: the closed form
        would need the parameters and channels of modules the benchmark does not measure
        apart, so the check does not apply to such a head.

        Examples:
            >>> ModelHead("r64", "fast-bcnn", "reduced", options={"reduce_dim": 64}).unchecked_options()
            []
            >>> ModelHead("mine", "fast-bcnn", "my pool", options={"pool": nn.Identity()}).unchecked_options()
            ['pool']
        """
        return [k for k, v in self.options.items() if k not in _CLOSED_FORM_OPTIONS and v is not None]


#: Name -> :class:`ModelHead`; the first four are the paper's (Liu, Juhas & Zhang, 2020).
#: Add a head by adding an entry (``MODEL_HEADS[head.name] = head``).
MODEL_HEADS: dict[str, ModelHead] = {
    h.name: h
    for h in (
        ModelHead("plain", "plain", "global average pooling + linear (the baseline)"),
        ModelHead("se", "plain", "SE blocks in the backbone, GAP + linear", se=True),
        ModelHead("bcnn", "bcnn", "two streams, bilinear pool + signed sqrt + L2 (fused)"),
        ModelHead("fast-bcnn", "fast-bcnn", "one stream, FastBilinearPool (fused)"),
        ModelHead(
            "fast-bcnn-triu",
            "fast-bcnn",
            "one stream, packed upper triangle",
            options={"triu": True},
        ),
    )
}

#: The model heads the library defines; others can be added to :data:`MODEL_HEADS` by the
#: user (``bilinearpool-bench models --import MODULE`` runs those a module adds).
_LIBRARY_MODEL_HEADS: tuple[str, ...] = tuple(MODEL_HEADS)


# ---------------------------------------------------------------------------------------------
# Environment
# ---------------------------------------------------------------------------------------------


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


#: Environment variables that change what the library or PyTorch runs, so what a benchmark
#: measures; recorded (``None`` when unset) and shown in every result. PyTorch's
#: ``THP_MEM_ALLOC_ENABLE=1`` backs its large CPU allocations with huge pages, which halves
#: the first-touch page faults of paths that allocate big intermediates (the naive chain).
SWITCHES = ("BILINEARPOOL_TRITON", "BILINEARPOOL_HUGEPAGES", "THP_MEM_ALLOC_ENABLE")

#: Prefixes of the thread-pool (OpenMP, MKL, OpenBLAS), allocator (glibc malloc) and oneDNN
#: (``ONEDNN_MAX_CPU_ISA``: the convolutions' instruction set) variables recorded when set:
#: they change timings without changing the code.
RUNTIME_ENV_PREFIXES = ("OMP_", "GOMP_", "KMP_", "MKL_", "OPENBLAS_", "MALLOC_", "ONEDNN_", "DNNL_")
#: Further variables recorded when set: PyTorch's CPU kernels' instruction set
#: (``ATEN_CPU_CAPABILITY``), synchronous CUDA launches, the visible GPUs, the CUDA
#: allocator's settings (they change ``peak_MiB``), TF32 forced off by the driver (whatever
#: ``cuda_matmul_allow_tf32`` says), cuBLAS's workspace, glibc's tunables (e.g.
#: ``glibc.malloc.trim_threshold``, which decides whether freed memory comes back without
#: page faults) and a preloaded allocator such as jemalloc or tcmalloc.
RUNTIME_ENV_NAMES = ("ATEN_CPU_CAPABILITY", "CUDA_LAUNCH_BLOCKING", "CUDA_VISIBLE_DEVICES",
                     "PYTORCH_CUDA_ALLOC_CONF", "NVIDIA_TF32_OVERRIDE", "CUBLAS_WORKSPACE_CONFIG",
                     "GLIBC_TUNABLES", "LD_PRELOAD")  # fmt: skip


def _runtime_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The set variables named by :data:`RUNTIME_ENV_PREFIXES` and :data:`RUNTIME_ENV_NAMES`, sorted.

    Examples:
        >>> _runtime_env({"OMP_NUM_THREADS": "1", "HOME": "/root", "MALLOC_ARENA_MAX": "2"})
        {'MALLOC_ARENA_MAX': '2', 'OMP_NUM_THREADS': '1'}
    """
    environ = os.environ if environ is None else environ
    return {
        name: environ[name]
        for name in sorted(environ)
        if name.startswith(RUNTIME_ENV_PREFIXES) or name in RUNTIME_ENV_NAMES
    }


def runtime_env_watched() -> list[str]:
    """What :func:`_runtime_env` looks for, as recorded with a result (``OMP_*``, ..., ``LD_PRELOAD``).

    Examples:
        >>> runtime_env_watched()[0], runtime_env_watched()[-1]
        ('OMP_*', 'LD_PRELOAD')
    """
    return [prefix + "*" for prefix in RUNTIME_ENV_PREFIXES] + list(RUNTIME_ENV_NAMES)


#: What results recorded before ``runtime_env_watched`` existed looked for (GLIBC_TUNABLES
#: was not among it: such a result cannot say whether it was set).
RUNTIME_ENV_WATCHED_BEFORE = ("OMP_*", "GOMP_*", "KMP_*", "MKL_*", "OPENBLAS_*", "MALLOC_*", "LD_PRELOAD")


_THP_PATH = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def _transparent_hugepages(path: Path = _THP_PATH) -> str | None:
    """The kernel's transparent huge page mode (the bracketed word of ``path``), or None."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return None
    match = re.search(r"\[(\w+)\]", text)
    return match.group(1) if match else (text.strip() or None)


#: Folders whose untracked files make a checkout dirty: the package and the benchmark
#: scripts (what a benchmark runs); not the results the benchmarks write.
_CODE_FOLDERS = ("bilinearpool/", "benchmarks/")
_NOT_CODE_FOLDERS = ("benchmarks/results/",)


def _dirty(porcelain: str) -> bool:
    r"""Whether ``git status --porcelain --untracked-files=normal`` output shows changed code.

    Any change to a tracked file counts, except in result folders (a run that rewrites
    committed results, e.g. ``make bench``'s layers before its models, changes no code);
    an untracked file only under :data:`_CODE_FOLDERS` (a new module of the package is run
    by the benchmark too), except result folders.

    Examples:
        >>> _dirty("?? notes.txt\n?? benchmarks/results/run1/\n M benchmarks/results/cpu/layers.md")
        False
        >>> _dirty("?? bilinearpool/new_op.py"), _dirty(" M README.md")
        (True, True)
    """
    for line in porcelain.splitlines():
        # "XY path" (X or Y may be a space, and a stripped first line loses it)
        status, _, path = line.strip().partition(" ")
        if not status:
            continue
        path = path.strip().strip('"').split(" -> ")[-1]
        if path.startswith(_NOT_CODE_FOLDERS):
            continue
        if status != "??" or path.startswith(_CODE_FOLDERS):
            return True
    return False


def _git_state(root: Path) -> dict[str, Any]:
    """Commit and dirty flag of the git checkout at ``root``; None for both when it is not one.

    Only a checkout whose top level is ``root`` counts (an installed copy inside some
    other repository, e.g. a virtual environment in one, is not a checkout of this code).
    Dirty means tracked files differ from the commit, or untracked files lie in the package
    or benchmark folders (see :func:`_dirty`); read without taking git's locks. Where
    ``root`` holds a ``.git`` that git refuses to read (a checkout of another user: git's
    "dubious ownership", which it guards against running that user's hooks and filters),
    ``git_problem`` records git's words rather than the result claiming no checkout.
    """
    none: dict[str, Any] = {"git_commit": None, "git_dirty": None}

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "--no-optional-locks", "-C", str(root), *args],
            check=True, capture_output=True, text=True, timeout=10,
        ).stdout.strip()  # fmt: skip

    try:
        if Path(git("rev-parse", "--show-toplevel")).resolve() != root.resolve():
            return none
        commit = git("rev-parse", "HEAD")
        dirty = _dirty(git("status", "--porcelain", "--untracked-files=normal"))
    except subprocess.CalledProcessError as err:  # git ran and refused
        said = err.stderr.decode(errors="replace") if isinstance(err.stderr, bytes) else err.stderr or ""
        lines = [line.strip() for line in said.splitlines() if line.strip()]
        fatal = next((line for line in lines if line.startswith("fatal: ")), lines[0] if lines else None)
        if (root / ".git").exists() and fatal:
            return {**none, "git_problem": fatal.removeprefix("fatal: ")}
        return none
    except (OSError, subprocess.SubprocessError):  # no git, or it hung (TimeoutExpired)
        return none
    return {"git_commit": commit, "git_dirty": dirty}


def environment(device: torch.device | str = "cpu") -> dict[str, Any]:
    """What a result depends on: versions, commit, switches, device, threads, date and load.

    Besides the versions (torch, torchvision, timm, numpy, bilinearpool) it records the
    git commit of the code and whether it differs from it (``None`` when not run from a
    git checkout; see :func:`_git_state`), the environment variables of :data:`SWITCHES`
    (``None`` when unset), under ``runtime_env`` the thread-pool and allocator variables
    that are set (:data:`RUNTIME_ENV_PREFIXES`) and the kernel's transparent huge page
    mode (``None`` when unreadable), and the float32 matrix product precision
    (``torch.get_float32_matmul_precision()``; with CUDA available also
    ``torch.backends.cuda.matmul.allow_tf32`` and ``torch.backends.cudnn.allow_tf32``, as
    ``cuda_matmul_allow_tf32`` and ``cudnn_allow_tf32``). Files of older runs lack these.

    Examples:
        >>> env = environment("cpu")
        >>> env["device_type"], env["threads"] == torch.get_num_threads()
        ('cpu', True)
        >>> all(name in env for name in SWITCHES + ("git_commit", "runtime_env", "transparent_hugepages"))
        True
        >>> env["float32_matmul_precision"] == torch.get_float32_matmul_precision()
        True
    """
    from . import __version__

    device = torch.device(device)
    env: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "torchvision": _version("torchvision"),
        "timm": _version("timm"),
        "numpy": _version("numpy"),
        # the version of the code that ran (pyproject.toml takes the distribution's from it;
        # an older install's metadata may sit beside a checkout on PYTHONPATH)
        "bilinearpool": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device_type": device.type,
        "device": _cpu_name(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        **_git_state(Path(__file__).resolve().parents[1]),
        **{name: os.environ.get(name) for name in SWITCHES},
        "runtime_env": _runtime_env(),
        "runtime_env_watched": runtime_env_watched(),
        "transparent_hugepages": _transparent_hugepages(),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
    }
    if torch.cuda.is_available():
        env["cuda_matmul_allow_tf32"] = torch.backends.cuda.matmul.allow_tf32
        env["cudnn_allow_tf32"] = torch.backends.cudnn.allow_tf32
    if hasattr(os, "getloadavg"):
        env["load_average_at_start"] = [round(v, 2) for v in os.getloadavg()]
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(
            device=torch.cuda.get_device_name(device),
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
            cudnn_benchmark=torch.backends.cudnn.benchmark,
        )
    return env


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``bilinearpool-bench`` (see :mod:`bilinearpool.cli`)."""
    from .cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
