"""Supervised fine-tuning data: conversations -> token ids + assistant masks -> packed samples.

**Assistant mask.** A conversation is rendered with its chat template once in full and, for every
assistant turn ``k``, twice more: the first ``k`` messages with the generation prompt (where the
assistant's answer starts) and the first ``k + 1`` messages (where it ends; trailing whitespace
after the end-of-turn marker is not part of the answer). These character spans are mapped onto
the tokens of the full rendering through the fast tokenizer's offsets (a token overlapping an answer
carries loss, including one straddling its start), so the mask is right even where a template's
text would merge across pieces if tokenized separately. A template must render
incrementally (each rendering a prefix of the next); one that does not is refused by name.
Loss is on the answer and its end-of-turn marker (``sft.loss_on=assistant``) or on every token
(``all``).

**Samples.** Conversation ``c`` of ``n`` tokens gives ``n - 1`` predictions: inputs ``ids[:-1]``,
labels ``ids[1:]``, loss mask ``mask[1:]``. Conversations longer than ``seq_length + 1`` tokens
are truncated (counted in :attr:`SFTDataset.stats`); one left without any loss token is dropped.
With ``sft.packing`` several conversations share a sequence (best-fit decreasing, deterministic
for a seed): ``position_ids`` restart at 0 and ``segment_ids`` increase at each conversation, so
with ``data.document_attention`` nothing attends across conversations. The sample dict is the
pre-training one (:data:`loongforge.data.packing.SAMPLE_KEYS`), so the trainer is unchanged.

**Load balancing.** :class:`BalancedSampler` gives each data-parallel rank a share of every global
batch with about equal attention + MLP cost (``a*len + b*len^2`` summed over a sequence's
conversations), a deterministic function of the global batch index (resume stays exact).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from loongforge.data.chat_templates import resolve_chat_template
from loongforge.data.convert import iter_records, to_messages
from loongforge.data.errors import DataError
from loongforge.data.sampler import PretrainingSampler

BUILTIN_CHAT = {"tiny_chat": "tiny_chat.jsonl"}


# --- tokenization with the assistant mask ----------------------------------------------------------


class ChatEncoder:
    """Token ids and per-token assistant mask of conversations under one chat template."""

    def __init__(self, tokenizer, chat_template: str | None = "chatml", loss_on: str = "assistant"):
        if loss_on not in ("assistant", "all"):
            raise DataError(f"config key 'sft.loss_on' must be 'assistant' or 'all', got {loss_on!r}")
        if not getattr(tokenizer, "is_fast", False):
            raise DataError("SFT needs a fast tokenizer (tokenizer.json) for character offsets")
        self.tokenizer = tokenizer
        self.template = resolve_chat_template(chat_template, tokenizer)
        self.loss_on = loss_on

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(messages, chat_template=self.template, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def assistant_spans(self, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
        """The full rendering and the character spans ``[begin, end)`` of the assistant answers."""
        full = self.render(messages)
        spans = []
        for k, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prompt = self.render(messages[:k], add_generation_prompt=True)
            upto = self.render(messages[: k + 1])
            if not (full.startswith(upto) and upto.startswith(prompt)):
                raise DataError(
                    "the chat template does not render incrementally (rendering the first k messages is "
                    "not a prefix of rendering k+1), so assistant turns cannot be located; pick another "
                    "template with sft.chat_template"
                )
            end = len(upto.rstrip())
            if end > len(prompt):
                spans.append((len(prompt), end))
        return full, spans

    def encode(self, messages: list[dict]) -> tuple[np.ndarray, np.ndarray]:
        """``(ids, mask)``: token ids of the rendered conversation and 1 where a token carries loss."""
        full, spans = self.assistant_spans(messages)
        enc = self.tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
        ids = np.asarray(enc["input_ids"], dtype=np.int64)
        if self.loss_on == "all":
            return ids, np.ones(len(ids), dtype=np.float32)
        offsets = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)
        mask = np.zeros(len(ids), dtype=np.float32)
        for begin, end in spans:
            # a token overlapping the answer carries loss, also one that straddles its start (e.g.
            # " A" after a prompt ending in a space): otherwise the answer's first word is never learned
            mask[(offsets[:, 1] > begin) & (offsets[:, 0] < end)] = 1.0
        return ids, mask


# --- reading -----------------------------------------------------------------------------------------


def resolve_chat_path(path: str) -> list[Path]:
    if path.startswith("builtin:"):
        name = path[len("builtin:"):]
        if name not in BUILTIN_CHAT:
            raise DataError(f"unknown builtin chat set {name!r}; available: {sorted(BUILTIN_CHAT)}")
        from importlib import resources

        return [Path(str(resources.files("loongforge.assets").joinpath(BUILTIN_CHAT[name])))]
    from loongforge.data.documents import resolve_paths

    return [p for p in resolve_paths(path) if p.suffix in (".jsonl", ".json", ".parquet")]


def read_conversations(paths: Sequence[str], fmt: str = "auto", on_error: str = "raise") -> tuple[list[list[dict]], int]:
    """All conversations of ``paths`` as message lists, and the number of skipped records."""
    out, skipped = [], 0
    for p in paths:
        files = resolve_chat_path(str(p))
        if not files:
            raise DataError(f"data path {p}: no .jsonl/.json/.parquet files")
        for f in files:
            for n, record in enumerate(iter_records(f), 1):
                try:
                    out.append(to_messages(record, fmt))
                except (DataError, KeyError, TypeError) as exc:
                    if on_error != "skip":
                        raise DataError(f"{f}: record {n}: {exc} (data.on_error=skip skips such records)") from exc
                    skipped += 1
    if not out:
        raise DataError(f"no conversations in {list(paths)}")
    return out, skipped


# --- packing -------------------------------------------------------------------------------------------


def pack_best_fit(lengths: Sequence[int], capacity: int, seed: int = 0) -> list[list[int]]:
    """Bins (lists of item indices) of total length <= ``capacity``: best-fit decreasing.

    Deterministic: items are visited by length (longest first), ties in a seeded random order.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) and lengths.max() > capacity:
        raise ValueError(f"an item of length {lengths.max()} does not fit capacity {capacity}")
    tie = np.random.default_rng(seed).permutation(len(lengths))
    order = np.lexsort((tie, -lengths))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (remaining capacity, bin id)
    for i in order.tolist():
        n = int(lengths[i])
        j = bisect.bisect_left(free, (n, -1))
        if j < len(free):
            room, b = free.pop(j)
        else:
            room, b = capacity, len(bins)
            bins.append([])
        bins[b].append(i)
        bisect.insort(free, (room - n, b))
    return bins


@dataclass
class SFTStats:
    conversations: int = 0
    truncated: int = 0
    dropped_no_loss: int = 0
    skipped_records: int = 0
    sequences: int = 0
    real_tokens: int = 0
    padded_tokens: int = 0
    loss_tokens: int = 0

    @property
    def packing_efficiency(self) -> float:
        return self.real_tokens / max(1, self.padded_tokens)

    def summary(self) -> str:
        return (f"{self.conversations} conversations -> {self.sequences} sequences; "
                f"{self.truncated} truncated to seq_length, {self.dropped_no_loss} dropped (no loss tokens left), "
                f"{self.skipped_records} records skipped; packing efficiency {self.packing_efficiency:.1%} "
                f"(real {self.real_tokens} / padded {self.padded_tokens} tokens), {self.loss_tokens} loss tokens")


class SFTDataset(torch.utils.data.Dataset):
    """Fixed-length samples of one or more (``pack``) conversations each; see the module docstring."""

    def __init__(self, encoded: Sequence[tuple[np.ndarray, np.ndarray]], seq_length: int, pad_id: int, *,
                 pack: bool = True, seed: int = 0):
        self.seq_length, self.pad_id = int(seq_length), int(pad_id)
        self.stats = SFTStats(conversations=len(encoded))
        tokens, masks, lengths = [], [], []
        for ids, mask in encoded:
            if len(ids) < 2:
                self.stats.dropped_no_loss += 1
                continue
            if len(ids) > self.seq_length + 1:
                self.stats.truncated += 1
                ids, mask = ids[: self.seq_length + 1], mask[: self.seq_length + 1]
            if mask[1:].sum() == 0:
                self.stats.dropped_no_loss += 1
                continue
            tokens.append(np.asarray(ids, dtype=np.int64))
            masks.append(np.asarray(mask[1:], dtype=np.float32))
            lengths.append(len(ids) - 1)
        if not tokens:
            raise DataError("no conversation with loss tokens is left after truncation")
        self._tokens, self._masks = tokens, masks
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.bins = pack_best_fit(self.lengths, self.seq_length, seed) if pack else [[i] for i in range(len(tokens))]
        self.stats.sequences = len(self.bins)
        self.stats.real_tokens = int(self.lengths.sum())
        self.stats.padded_tokens = len(self.bins) * self.seq_length
        self.stats.loss_tokens = int(sum(m.sum() for m in masks))

    def __len__(self) -> int:
        return len(self.bins)

    def sample_lengths(self, idx: int) -> list[int]:
        """Lengths (predictions) of the conversations packed into sequence ``idx``."""
        return [int(self.lengths[i]) for i in self.bins[int(idx)]]

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        S = self.seq_length
        tokens = np.full(S, self.pad_id, dtype=np.int64)
        labels = np.full(S, self.pad_id, dtype=np.int64)
        loss_mask = np.zeros(S, dtype=np.float32)
        position_ids = np.zeros(S, dtype=np.int64)
        segment_ids = np.zeros(S, dtype=np.int64)
        at = 0
        for seg, i in enumerate(self.bins[int(idx)]):
            ids, n = self._tokens[i], int(self.lengths[i])
            tokens[at:at + n] = ids[:-1]
            labels[at:at + n] = ids[1:]
            loss_mask[at:at + n] = self._masks[i]
            position_ids[at:at + n] = np.arange(n)
            segment_ids[at:at + n] = seg
            at += n
        if at < S:  # padding: its own segment, positions from 0, no loss
            segment_ids[at:] = segment_ids[at - 1] + 1
            position_ids[at:] = np.arange(S - at)
        return {"tokens": torch.from_numpy(tokens), "labels": torch.from_numpy(labels),
                "loss_mask": torch.from_numpy(loss_mask), "position_ids": torch.from_numpy(position_ids),
                "segment_ids": torch.from_numpy(segment_ids)}


def build_sft_dataset(cfg, tokenizer, seq_length: int, seed: int = 0):
    """``(train, valid or None)`` from the run config's ``data`` and ``sft`` sections."""
    from loongforge.data.packing import split_documents
    from loongforge.data.tokenizer import pad_token_id

    data, sft = cfg.data, cfg.sft
    encoder = ChatEncoder(tokenizer, sft.chat_template, sft.loss_on)
    conversations, skipped = read_conversations(list(data.paths), sft.format, data.on_error)
    encoded = [encoder.encode(m) for m in conversations]
    pad = pad_token_id(tokenizer)
    if data.get("valid_paths"):
        train_ids, valid = np.arange(len(encoded)), None
        vconv, _ = read_conversations(list(data.valid_paths), sft.format, data.on_error)
        valid = SFTDataset([encoder.encode(m) for m in vconv], seq_length, pad, pack=sft.packing, seed=seed)
    else:
        train_ids, valid_ids = split_documents(len(encoded), float(data.valid_fraction or 0.0), seed)
        valid = (SFTDataset([encoded[i] for i in valid_ids], seq_length, pad, pack=sft.packing, seed=seed)
                 if len(valid_ids) else None)
    train = SFTDataset([encoded[i] for i in train_ids], seq_length, pad, pack=sft.packing, seed=seed)
    train.stats.skipped_records = skipped
    return train, valid


# --- data-parallel load balancing ---------------------------------------------------------------------


def sequence_cost(lengths: Sequence[int], a: float, b: float) -> float:
    """Estimated compute of one packed sequence: sum of ``a*len + b*len^2`` over its conversations."""
    return float(sum(a * n + b * n * n for n in lengths))


def balance(costs: Sequence[float], dp_size: int) -> list[list[int]]:
    """Split positions ``0..len(costs)-1`` into ``dp_size`` groups of equal size with balanced cost
    sums: longest-processing-time first, each item to the cheapest group that still has room.
    Deterministic (ties broken by position and rank)."""
    n = len(costs)
    if n % dp_size:
        raise ValueError(f"{n} items cannot be split evenly over {dp_size} ranks")
    per = n // dp_size
    groups: list[list[int]] = [[] for _ in range(dp_size)]
    load = [0.0] * dp_size
    for i in sorted(range(n), key=lambda i: (-costs[i], i)):
        r = min((r for r in range(dp_size) if len(groups[r]) < per), key=lambda r: (load[r], r))
        groups[r].append(i)
        load[r] += costs[i]
    return [sorted(g) for g in groups]


def imbalance(groups: Sequence[Sequence[int]], costs: Sequence[float]) -> float:
    """max / mean of the groups' cost sums (1.0 = perfectly balanced)."""
    sums = [sum(costs[i] for i in g) for g in groups]
    mean = sum(sums) / len(sums)
    return max(sums) / mean if mean else 1.0


class BalancedSampler(PretrainingSampler):
    """:class:`PretrainingSampler` whose global batches are re-split over DP ranks by cost.

    The global batch's content is unchanged (the same indices as the plain sampler); only which
    rank gets which sequence changes. ``on_batch(step, before, after)`` (optional) is called with
    the imbalance (max/mean cost over ranks) of the contiguous split and of the balanced one.
    """

    def __init__(self, dataset, *args, cost_a: float = 1.0, cost_b: float = 0.0, on_batch=None, **kwargs):
        super().__init__(len(dataset), *args, **kwargs)
        self.dataset, self.cost_a, self.cost_b, self.on_batch = dataset, cost_a, cost_b, on_batch

    def rank_split(self, step: int) -> tuple[list[int], list[list[int]], list[float]]:
        """(global batch indices, positions per rank, costs) of global batch ``step``."""
        batch = self.global_batch(step)
        costs = [sequence_cost(self.dataset.sample_lengths(i), self.cost_a, self.cost_b) for i in batch]
        return batch, balance(costs, self.dp_size), costs

    def __iter__(self) -> Iterator[list[int]]:
        G, mbs = self.global_batch_size, self.micro_batch_size
        per_rank = G // self.dp_size
        step, within = divmod(self.consumed_samples, G)
        micro = within // (mbs * self.dp_size)
        while self.total_samples is None or (step + 1) * G <= self.total_samples:
            batch, groups, costs = self.rank_split(step)
            if self.on_batch is not None:
                contiguous = [list(range(r * per_rank, (r + 1) * per_rank)) for r in range(self.dp_size)]
                self.on_batch(step, imbalance(contiguous, costs), imbalance(groups, costs))
            mine = [batch[p] for p in groups[self.dp_rank]]
            for m in range(micro, self.micro_batches_per_step):
                yield mine[m * mbs:(m + 1) * mbs]
            step, micro = step + 1, 0
