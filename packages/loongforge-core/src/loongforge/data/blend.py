"""Deterministic weighted mixture of datasets.

Why not random sampling per index: a random choice only matches the weights on average, and every
prefix of the run (what a short run or an evaluation actually sees) can drift. Instead the schedule
is "earliest deadline first": the k-th sample of dataset j is due at time ``(k + 0.5) / w_j`` and
samples are taken in order of due time. After any ``n`` samples dataset j has contributed
``n * w_j`` samples up to rounding (off by at most about one per dataset), and the schedule is a pure
function of the weights, so ``blend[i]`` never changes. Built vectorised with numpy (one sort).

When a component is used more often than it has samples, it is walked again in a new seeded order.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from loongforge.data.errors import DataError


def blend_schedule(weights: Sequence[float], size: int) -> tuple[np.ndarray, np.ndarray]:
    """For each blended index: (dataset index, how many samples of that dataset came before it)."""
    w = np.asarray(weights, dtype=np.float64)
    if size < 1:
        raise ValueError(f"blend size must be >= 1, got {size}")
    ids, ranks, due = [], [], []
    for j, wj in enumerate(w):
        if wj <= 0:
            continue
        # Enough candidates: dataset j never needs more than size*w_j + (#datasets)/2 + 1 of them.
        k = np.arange(int(np.ceil(size * wj)) + len(w) + 1, dtype=np.int64)
        ids.append(np.full(len(k), j, dtype=np.int64))
        ranks.append(k)
        due.append((k + 0.5) / wj)
    ids_a, ranks_a, due_a = np.concatenate(ids), np.concatenate(ranks), np.concatenate(due)
    order = np.lexsort((ids_a, due_a))[:size]  # by due time, ties to the lower dataset index
    return ids_a[order], ranks_a[order]


class BlendedDataset(torch.utils.data.Dataset):
    """``size`` samples drawn from ``datasets`` in proportion to ``weights`` (normalised).

    Index-addressable and deterministic: ``blend[i]`` depends only on (datasets, weights, size, seed).
    """

    def __init__(self, datasets: Sequence, weights: Sequence[float], size: int, seed: int = 0) -> None:
        if len(datasets) == 0:
            raise DataError("BlendedDataset needs at least one dataset")
        if len(weights) != len(datasets):
            raise DataError(
                f"got {len(weights)} blend weights for {len(datasets)} datasets; need one per dataset"
            )
        w = np.asarray([float(x) for x in weights], dtype=np.float64)
        if not np.all(np.isfinite(w)) or np.any(w < 0):
            raise DataError(f"blend weights must be finite and non-negative, got {list(weights)}")
        if w.sum() <= 0:
            raise DataError(f"blend weights must not all be zero, got {list(weights)}")
        empty = [j for j, d in enumerate(datasets) if len(d) == 0 and w[j] > 0]
        if empty:
            raise DataError(f"blended dataset(s) {empty} are empty but have a positive weight")
        self.datasets = list(datasets)
        self.weights = w / w.sum()
        self.size = int(size)
        self.seed = int(seed)
        self.dataset_index, self._rank = blend_schedule(self.weights, self.size)
        self._orders: dict[tuple[int, int], np.ndarray] = {}

    def __len__(self) -> int:
        return self.size

    def _sample_index(self, j: int, rank: int) -> int:
        n = len(self.datasets[j])
        epoch, within = divmod(rank, n)
        if epoch == 0:
            return within  # first pass in the dataset's own (already shuffled) order
        key = (j, epoch)
        if key not in self._orders:
            self._orders[key] = np.random.default_rng([self.seed, j, epoch]).permutation(n)
        return int(self._orders[key][within])

    def locate(self, idx: int) -> tuple[int, int]:
        """(dataset index, sample index inside it) of blended sample ``idx``."""
        idx = int(idx)
        if idx < 0:
            idx += self.size
        if not 0 <= idx < self.size:
            raise IndexError(f"sample {idx} out of range for blend of {self.size} samples")
        j = int(self.dataset_index[idx])
        return j, self._sample_index(j, int(self._rank[idx]))

    def __getitem__(self, idx: int):
        j, i = self.locate(idx)
        return self.datasets[j][i]

    def realised_weights(self, n: int | None = None) -> np.ndarray:
        """Fraction of the first ``n`` samples (default: all) drawn from each dataset."""
        n = self.size if n is None else n
        return np.bincount(self.dataset_index[:n], minlength=len(self.datasets)) / n
