"""Deterministic, resumable micro-batch sampler for data-parallel pre-training.

Why: a resumed run must see exactly the samples an uninterrupted run would have seen, on every DP
rank. The sampler therefore defines one global, infinite sequence of dataset indices (epoch ``e`` is
a permutation of the dataset seeded by ``(seed, e)``; a new epoch starts when the dataset is
exhausted) and everything else is arithmetic on the number of consumed samples:

* global batch ``b`` is positions ``[b*G, (b+1)*G)`` of that sequence;
* DP rank ``r`` owns the ``r``-th contiguous slice of ``G / dp_size`` samples of each global batch;
* that slice is cut into micro-batches of ``micro_batch_size`` (gradient-accumulation steps).

``consumed_samples`` counts samples of all ranks together (as a trainer's checkpoint records it).
Use it as ``DataLoader(dataset, batch_sampler=sampler, collate_fn=collate)``.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np


class PretrainingSampler:
    """Yields lists of dataset indices: this rank's micro-batches, starting at ``consumed_samples``.

    Infinite unless ``total_samples`` is given (then it stops after the last full global batch
    that fits in ``total_samples``). ``shuffle=False`` walks every epoch in dataset order.
    """

    def __init__(
        self,
        dataset_size: int,
        micro_batch_size: int,
        global_batch_size: int,
        dp_rank: int = 0,
        dp_size: int = 1,
        consumed_samples: int = 0,
        seed: int = 0,
        shuffle: bool = True,
        total_samples: int | None = None,
    ) -> None:
        if dataset_size < 1:
            raise ValueError("cannot sample from an empty dataset")
        if micro_batch_size < 1 or dp_size < 1:
            raise ValueError("micro_batch_size and dp_size must be >= 1")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} out of range for dp_size {dp_size}")
        step = micro_batch_size * dp_size
        if global_batch_size < step or global_batch_size % step:
            raise ValueError(
                f"global_batch_size ({global_batch_size}) must be a positive multiple of "
                f"micro_batch_size * dp_size ({micro_batch_size} * {dp_size})"
            )
        if consumed_samples < 0 or consumed_samples % step:
            raise ValueError(
                f"consumed_samples ({consumed_samples}) must be a non-negative multiple of "
                f"micro_batch_size * dp_size ({step}): resume only at micro-batch boundaries"
            )
        self.dataset_size = int(dataset_size)
        self.micro_batch_size = int(micro_batch_size)
        self.global_batch_size = int(global_batch_size)
        self.dp_rank = int(dp_rank)
        self.dp_size = int(dp_size)
        self.consumed_samples = int(consumed_samples)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.total_samples = total_samples
        self.micro_batches_per_step = global_batch_size // step
        self._perm_cache: tuple[int, np.ndarray] | None = None

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if self._perm_cache is None or self._perm_cache[0] != epoch:
            n = self.dataset_size
            order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
            self._perm_cache = (epoch, order)
        return self._perm_cache[1]

    def indices(self, begin: int, end: int) -> list[int]:
        """Dataset indices at global positions ``[begin, end)`` of the sample sequence (all ranks)."""
        out: list[int] = []
        while begin < end:
            epoch, offset = divmod(begin, self.dataset_size)
            take = min(end - begin, self.dataset_size - offset)
            out.extend(self._epoch_order(epoch)[offset : offset + take].tolist())
            begin += take
        return out

    def global_batch(self, step: int) -> list[int]:
        """All indices of global batch ``step`` (every rank's share, rank 0 first)."""
        G = self.global_batch_size
        return self.indices(step * G, (step + 1) * G)

    def __iter__(self) -> Iterator[list[int]]:
        G, mbs = self.global_batch_size, self.micro_batch_size
        per_rank = G // self.dp_size
        step, within = divmod(self.consumed_samples, G)
        micro = within // (mbs * self.dp_size)  # micro-batches already consumed in this global batch
        while self.total_samples is None or (step + 1) * G <= self.total_samples:
            base = step * G + self.dp_rank * per_rank
            for m in range(micro, self.micro_batches_per_step):
                yield self.indices(base + m * mbs, base + (m + 1) * mbs)
            step, micro = step + 1, 0

    def __len__(self) -> int:
        if self.total_samples is None:
            raise TypeError("an infinite PretrainingSampler has no len(); pass total_samples")
        steps_total = self.total_samples // self.global_batch_size
        done = self.consumed_samples // (self.micro_batch_size * self.dp_size)
        return max(0, steps_total * self.micro_batches_per_step - done)
