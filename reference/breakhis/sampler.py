"""An epoch sampler that over-samples minority classes and shards for DDP, reproducibly.

BreaKHis is imbalanced (2,480 benign vs 5,429 malignant images; 3,451 ductal carcinoma
vs 444 adenosis), and the paper over-samples against it. :class:`BalancedSampler`
draws each epoch from a generator seeded by ``(seed, epoch)`` alone, so a resumed run
sees exactly the epochs an uninterrupted one would. It also hands every slot of the
epoch its own augmentation seed, so that random flips and rotations depend on the
position in the epoch, not on which process or worker loads the image: one process with
batch ``B`` and ``W`` DDP processes with batch ``B / W`` each train on the same images
with the same augmentations. (Whether the steps are also the same depends on the model:
see :mod:`breakhis.train` for batch norm and dropout under DDP.)
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from torch.utils.data import Sampler

from ._files import check_int

__all__ = ["BalancedSampler"]


class BalancedSampler(Sampler[tuple[int, int]]):
    """Yield ``(index, augmentation_seed)`` pairs for one epoch.

    The epoch list holds every record once, plus (with ``oversample``) random repeats of
    the smaller classes until every class has as many entries as the largest. It is
    shuffled, padded by wrapping around to a multiple of ``batch_size`` (so that every
    global batch is full), and process ``rank`` takes every ``num_replicas``-th entry.

    Args:
        targets: integer class of every record.
        batch_size: the *global* batch size (all processes together).
        oversample: repeat minority-class records to balance the classes.
        shuffle: shuffle the epoch list.
        seed: base seed, an integer >= 0 (NumPy's ``SeedSequence``); epoch ``e`` uses
            ``(seed, e)``.
        num_replicas: number of DDP processes.
        rank: this process's rank.

    Raises:
        ValueError: when ``batch_size`` is not a multiple of ``num_replicas``, the
            rank is out of range, or ``seed`` is not an integer >= 0 (refused here rather
            than when the first epoch is drawn).

    Examples:
        >>> targets = np.array([0, 0, 0, 1])
        >>> s = BalancedSampler(targets, batch_size=2, seed=0)
        >>> len(s), np.bincount(targets[[i for i, _ in s]]).tolist()
        (6, [3, 3])
    """

    def __init__(
        self,
        targets: Sequence[int] | np.ndarray,
        *,
        batch_size: int,
        oversample: bool = True,
        shuffle: bool = True,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        if batch_size < 1 or batch_size % num_replicas:
            raise ValueError(
                f"batch_size must be a positive multiple of num_replicas={num_replicas}, "
                f"but got {batch_size}"
            )
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, {num_replicas}), but got {rank}")
        check_int("seed", seed, 0)
        self.targets = np.asarray(targets, dtype=np.int64)
        if self.targets.size == 0:
            raise ValueError("expected at least one training record, but got none")
        self.batch_size = batch_size
        self.oversample = oversample
        self.shuffle = shuffle
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose list is drawn next."""
        self.epoch = int(epoch)

    def _epoch_list(self) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.seed, self.epoch])
        if self.oversample:
            counts = np.bincount(self.targets)
            parts = []
            for c in np.flatnonzero(counts):
                members = np.flatnonzero(self.targets == c)
                extra = rng.choice(members, counts.max() - len(members), replace=True)
                parts.extend([members, extra])
            order = np.concatenate(parts)
        else:
            order = np.arange(len(self.targets))
        if self.shuffle:
            order = rng.permutation(order)
        pad = (-len(order)) % self.batch_size
        order = np.concatenate([order, np.resize(order, pad)]) if pad else order
        seeds = rng.integers(0, 2**31 - 1, size=len(order))
        return order, seeds

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order, seeds = self._epoch_list()
        mine = slice(self.rank, None, self.num_replicas)
        for i, s in zip(order[mine], seeds[mine]):
            yield int(i), int(s)

    def __len__(self) -> int:
        n = len(self.targets)
        if self.oversample:
            counts = np.bincount(self.targets)
            n = int(counts.max()) * int(np.count_nonzero(counts))
        n += (-n) % self.batch_size
        return n // self.num_replicas

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to redraw any epoch."""
        return {"seed": self.seed, "epoch": self.epoch, "oversample": self.oversample,
                "shuffle": self.shuffle, "batch_size": self.batch_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict`."""
        self.seed = int(state["seed"])
        self.epoch = int(state["epoch"])
        self.oversample = bool(state["oversample"])
        self.shuffle = bool(state["shuffle"])
