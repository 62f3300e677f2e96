"""WebDataset tar shards of multimodal conversations, streamed, resumable at the same sample.

A sample is the tar members sharing a key (``webdataset``'s grouping): ``KEY.json`` holds the record
(``{"messages": [...], "images": ["0.png"], "videos": ["mp4"]}``, media named by the member's
extension after ``KEY.``); without ``"images"`` the sample's image members (png, jpg, jpeg, webp), in
name order, are its images. Each sample is checked, encoded and preprocessed exactly as a jsonl
record (:mod:`loongforge_vlm.data.records`, :class:`~loongforge_vlm.data.samples.SampleBuilder`),
so the samples are the same tensors.

Order: epoch ``e`` reads the shards in a permutation seeded by ``seed + e`` (or as given with
``shuffle=False``), samples in tar order; global sample ``g`` of that stream belongs to data-parallel
rank ``g % dp_size``. With ``micro_batch_size`` B and DataLoader workers, worker ``w`` of ``W``
yields this rank's batches ``k`` with ``k % W == w`` (B consecutive samples each), so the
DataLoader's round-robin over workers gives the single-process order.

Resume: :meth:`WebDatasetConversations.start` with the global number of consumed samples continues
at the next sample, skipping the shards before it (per-shard sample counts come from the tar
headers, read once) and only reading -- not decoding -- the samples before it in its shard. Exact
when no sample was skipped (``data.on_error=skip`` drops a bad sample and takes the next one).
"""

from __future__ import annotations

import json
import random
import tarfile
from pathlib import Path

import torch
from loongforge.data.errors import DataError

from loongforge_vlm.data.records import Member, Stats, make_record, skip

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")


def expand(shards) -> list[Path]:
    """Shard paths from a list of paths / brace patterns (``data-{000..009}.tar``)."""
    from braceexpand import braceexpand

    out = [Path(p) for s in ([shards] if isinstance(shards, str) else shards) for p in braceexpand(str(s))]
    missing = [str(p) for p in out if not p.is_file()]
    if missing:
        raise DataError(f"tar shard(s) not found: {', '.join(missing[:5])}")
    return out


def count_samples(shard: Path) -> int:
    """Samples (distinct keys, consecutive as webdataset groups them) in a shard, from its headers."""
    from webdataset.tariterators import base_plus_ext

    keys, last = 0, None
    try:
        with tarfile.open(shard) as tar:
            for m in tar:
                key, _ = base_plus_ext(m.name) if m.isfile() else (None, None)
                if key is not None and key != last:
                    keys, last = keys + 1, key
    except tarfile.TarError as exc:
        raise DataError(f"tar shard {shard} cannot be read: {exc}") from None
    return keys


def read_shard(shard: Path, skip_first: int = 0):
    """The samples of a shard as dicts ``{"__key__": key, ext: bytes}``, after the first ``skip_first``."""
    from webdataset.tariterators import group_by_keys, tar_file_expander

    with open(shard, "rb") as stream:
        for i, sample in enumerate(group_by_keys(tar_file_expander([{"url": str(shard), "stream": stream}]))):
            if i >= skip_first:
                yield sample


class WebDatasetConversations(torch.utils.data.IterableDataset):
    def __init__(self, shards, builder, processor, *, video_processor=None, on_error: str = "raise",
                 dp_rank: int = 0, dp_size: int = 1, micro_batch_size: int = 1, shuffle: bool = True,
                 seed: int = 0, epochs: int | None = None):
        self.shards = expand(shards)
        self.counts = [count_samples(s) for s in self.shards]
        self.total = sum(self.counts)
        if self.total == 0:
            raise DataError(f"no samples in the tar shards {[str(s) for s in self.shards[:5]]}")
        self.builder, self.processor, self.video_processor = builder, processor, video_processor
        self.on_error, self.dp_rank, self.dp_size = on_error, dp_rank, dp_size
        self.micro_batch_size, self.shuffle, self.seed, self.epochs = micro_batch_size, shuffle, seed, epochs
        self.stats = Stats(samples=self.total)
        self.consumed = 0  # global samples consumed before this reader's first

    def start(self, consumed_samples: int) -> None:
        """Continue after ``consumed_samples`` global samples (all data-parallel ranks together)."""
        if consumed_samples % (self.dp_size * self.micro_batch_size):
            raise ValueError(f"consumed_samples {consumed_samples} is not a whole number of micro-batches "
                             f"over {self.dp_size} data-parallel ranks")
        self.consumed = consumed_samples

    def shard_order(self, epoch: int) -> list[int]:
        order = list(range(len(self.shards)))
        if self.shuffle:
            random.Random(self.seed + epoch).shuffle(order)
        return order

    def _raw(self, first: int):
        """(global index, shard, raw sample) of the stream from global sample ``first`` on."""
        epoch, offset = divmod(first, self.total)
        while self.epochs is None or epoch < self.epochs:
            g = epoch * self.total
            for s in self.shard_order(epoch):
                n = self.counts[s]
                if offset >= n:
                    offset, g = offset - n, g + n
                    continue
                for i, sample in enumerate(read_shard(self.shards[s], offset), start=offset):
                    yield g + i, self.shards[s], sample
                offset, g = 0, g + n
            epoch += 1

    def _sample(self, shard: Path, raw: dict):
        key = raw["__key__"]
        where = f"{shard}:{key}"
        try:
            if "json" not in raw:
                raise DataError("the sample has no .json member")
            rec = json.loads(raw["json"])
            if "images" not in rec:
                rec["images"] = sorted(k for k in raw if k.split(".")[-1].lower() in IMAGE_EXTENSIONS)

            def resolve(name):
                if name not in raw:
                    raise DataError(f"the sample has no member {key}.{name}")
                return Member(f"{where}.{name}", raw[name])

            record = make_record(rec, where, resolve, self.processor, self.video_processor)
            return self.builder.row([(record, *self.builder.encode(record))])
        except (DataError, json.JSONDecodeError, ValueError) as exc:
            if skip(f"{where}: {exc}", self.on_error, self.stats):
                return None
            raise DataError(f"{where}: {exc} (set data.on_error=skip to skip such samples)") from None

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        b = self.micro_batch_size
        mine = 0  # this rank's samples seen from the start point: batch mine // b
        for g, shard, raw in self._raw(self.consumed):
            if g % self.dp_size != self.dp_rank:
                continue
            batch, mine = mine // b, mine + 1
            if batch % workers != worker:
                continue
            sample = self._sample(shard, raw)
            if sample is not None:
                yield sample
