"""Weighted blending and the resumable data-parallel sampler."""

from __future__ import annotations

import numpy as np
import pytest
from loongforge.data.blend import BlendedDataset, blend_schedule
from loongforge.data.errors import DataError
from loongforge.data.sampler import PretrainingSampler


class Tagged:
    """A dataset whose item i is (name, i)."""

    def __init__(self, name: str, n: int) -> None:
        self.name, self.n = name, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        assert 0 <= i < self.n
        return (self.name, i)


def test_blend_proportions_track_weights_in_every_prefix():
    parts = [Tagged("a", 1000), Tagged("b", 50), Tagged("c", 300)]
    blend = BlendedDataset(parts, [0.5, 0.2, 0.3], size=5000, seed=1)
    for n in (10, 97, 1000, 5000):
        counts = blend.realised_weights(n) * n
        assert np.all(np.abs(counts - n * np.array([0.5, 0.2, 0.3])) <= 2.0), (n, counts)
    items = [blend[i] for i in range(len(blend))]
    assert {name for name, _ in items} == {"a", "b", "c"}
    # "b" (50 samples) is drawn 1000 times: every pass covers all its samples exactly once
    b_draws = [i for name, i in items if name == "b"]
    for k in range(0, 1000, 50):
        assert sorted(b_draws[k : k + 50]) == list(range(50))
    assert b_draws[:50] == list(range(50))  # the first pass keeps the dataset's own order


def test_blend_is_deterministic_and_weights_are_normalised():
    parts = [Tagged("a", 40), Tagged("b", 40)]
    a = BlendedDataset(parts, [3, 1], size=200, seed=5)
    b = BlendedDataset(parts, [0.75, 0.25], size=200, seed=5)
    assert [a[i] for i in range(200)] == [b[i] for i in range(200)]
    assert a[-1] == a[199] and a.locate(3) == b.locate(3)
    with pytest.raises(IndexError):
        a[200]
    ids, ranks = blend_schedule([0.5, 0.5], 6)
    assert ids.tolist() == [0, 1, 0, 1, 0, 1] and ranks.tolist() == [0, 0, 1, 1, 2, 2]


def test_zero_weight_dataset_is_never_used():
    blend = BlendedDataset([Tagged("a", 5), Tagged("b", 5)], [1, 0], size=20)
    assert {blend[i][0] for i in range(20)} == {"a"}


@pytest.mark.parametrize(
    ("weights", "match"),
    [
        ([1.0], "1 blend weights for 2 datasets"),
        ([1.0, -0.5], "non-negative"),
        ([0, 0], "not all be zero"),
        ([1.0, float("nan")], "finite"),
    ],
)
def test_blend_rejects_bad_weights(weights, match):
    with pytest.raises(DataError, match=match):
        BlendedDataset([Tagged("a", 3), Tagged("b", 3)], weights, size=10)


def test_blend_rejects_empty_component():
    with pytest.raises(DataError, match="empty"):
        BlendedDataset([Tagged("a", 3), Tagged("b", 0)], [1, 1], size=10)


def run(sampler: PretrainingSampler, n: int) -> list[list[int]]:
    it = iter(sampler)
    return [next(it) for _ in range(n)]


@pytest.mark.parametrize("shuffle", [True, False])
def test_resume_continues_exactly(shuffle):
    kw = dict(dataset_size=37, micro_batch_size=2, global_batch_size=8, dp_size=2, seed=3, shuffle=shuffle)
    for rank in (0, 1):
        full = run(PretrainingSampler(dp_rank=rank, **kw), 60)  # several epochs
        for consumed in (0, 8, 12, 36, 40, 64):  # step and micro-batch boundaries, inside and across epochs
            micro_done = consumed // 4
            resumed = run(PretrainingSampler(dp_rank=rank, consumed_samples=consumed, **kw), 60 - micro_done)
            assert resumed == full[micro_done:], (rank, consumed)


def test_dp_ranks_split_each_global_batch():
    kw = dict(dataset_size=100, micro_batch_size=3, global_batch_size=24, dp_size=4, seed=0)
    per_rank = [run(PretrainingSampler(dp_rank=r, **kw), 2 * 2) for r in range(4)]  # 2 steps, 2 micro each
    ref = PretrainingSampler(**kw)
    for step in range(2):
        shares = [sum(per_rank[r][2 * step : 2 * step + 2], []) for r in range(4)]
        assert sum(shares, []) == ref.global_batch(step)  # rank r owns the r-th contiguous slice
        assert len(set(sum(shares, []))) == 24  # disjoint within an epoch


def test_epochs_cover_dataset_and_reshuffle():
    s = PretrainingSampler(dataset_size=10, micro_batch_size=5, global_batch_size=5, seed=9)
    first, second = s.indices(0, 10), s.indices(10, 20)
    assert sorted(first) == sorted(second) == list(range(10)) and first != second
    assert PretrainingSampler(10, 5, 5, shuffle=False).indices(5, 15) == [5, 6, 7, 8, 9, 0, 1, 2, 3, 4]


def test_total_samples_and_len():
    s = PretrainingSampler(50, 2, 8, dp_rank=1, dp_size=2, total_samples=30, consumed_samples=8)
    batches = list(s)
    assert len(batches) == len(s) == 4  # global batches 1 and 2 (3 fit in 30), 2 micro-batches each
    with pytest.raises(TypeError):
        len(PretrainingSampler(50, 2, 8))


@pytest.mark.parametrize(
    "kwargs",
    [dict(global_batch_size=6), dict(consumed_samples=3), dict(dp_rank=2), dict(dataset_size=0)],
)
def test_sampler_rejects_bad_arguments(kwargs):
    base = dict(dataset_size=20, micro_batch_size=2, global_batch_size=8, dp_rank=0, dp_size=2)
    with pytest.raises(ValueError):
        PretrainingSampler(**(base | kwargs))
