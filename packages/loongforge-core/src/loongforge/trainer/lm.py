"""Causal language-model tasks on the task contract: ``pretrain`` here, ``sft`` (``trainer/sft.py``)
and the VLM package's ``vlm_sft`` build on :class:`LanguageModelTask`.

What a language model adds to the contract: a tokenizer (its vocabulary checked against the
model's), a model family's provider (``model.family``), packed token samples, the per-token loss,
and FLOPs per token (``loongforge.trainer.metrics.flops_per_token``).
"""

from __future__ import annotations

from loongforge.plugins import lookup
from loongforge.registry import load_object
from loongforge.task import TrainTask


def load_tokenizer(cfg, plugins):
    record = lookup(plugins.registry().tokenizers, cfg.tokenizer.type, "tokenizer type (config key 'tokenizer.type')")
    return load_object(record.loader)(cfg.tokenizer.path)


def build_datasets(cfg, tokenizer, plugins):
    record = lookup(plugins.registry().datasets, cfg.data.format, "dataset format (config key 'data.format')")
    return load_object(record.builder)(cfg.data, tokenizer, seq_length=cfg.train.seq_length, seed=cfg.seed)


class LanguageModelTask(TrainTask):
    """A causal LM of a registered model family on the registered text datasets (``pretrain``)."""

    unit = "tokens"

    @classmethod
    def resolve_config(cls, cfg, plugins):
        from loongforge.trainer.model import model_provider, resolve_model_section

        cfg = resolve_model_section(cfg, plugins)  # model.pretrained fills in the sizes, validated first
        model_provider(cfg, plugins)  # the family's provider checks the model section before any process group
        return cfg

    def __init__(self, cfg, rt):
        from loongforge.data.tokenizer import check_vocab
        from loongforge.trainer.model import model_provider, run_settings

        super().__init__(cfg, rt)
        self.provider = model_provider(cfg, rt.plugins)
        self.settings = run_settings(cfg)
        self.tokenizer = load_tokenizer(cfg, rt.plugins)
        self.vocab_size = self.provider.padded_vocab_size(self.settings)
        check_vocab(self.tokenizer, int(cfg.model.get("vocab_size", self.vocab_size)))
        self.config = None

    def build_datasets(self):
        return build_datasets(self.cfg, self.tokenizer, self.rt.plugins)

    def build_model(self) -> list:
        from loongforge.trainer.model import build_model_chunks, load_pretrained

        chunks = build_model_chunks(self.provider, self.settings, self.rt.backend, self.rt.plugins)
        if self.cfg.model.get("pretrained"):
            load_pretrained(self.provider, chunks, self.cfg.model.pretrained)
        self.config = chunks[0].config
        return chunks

    def collate(self, samples):
        from loongforge.data.packing import collate

        return collate(samples)

    def model_inputs(self, batch: dict) -> dict:
        """The forward's keyword arguments for ``batch`` (tokens, positions, mask, labels)."""
        from loongforge.trainer.batches import model_inputs

        return model_inputs(batch, self.rt.backend.device(), self.cfg.data.document_attention)

    def forward_step(self, batch, model):
        import functools

        from loongforge.trainer.batches import masked_token_loss, split_for_context_parallel

        batch = split_for_context_parallel(batch)  # this CP rank's tokens (cp=1: all)
        output = model(**self.model_inputs(batch))
        return output, functools.partial(masked_token_loss, batch["loss_mask"])

    def units_per_sample(self) -> int:
        return int(self.cfg.train.seq_length)

    def flops_per_unit(self) -> float:
        """FLOPs per token: the provider's own ``flops_per_token(seq_length)`` where it has one (an
        MoE counts only the experts a token uses), else the dense formula of ``trainer.metrics``."""
        from loongforge.trainer.metrics import flops_per_token

        own = getattr(self.provider, "flops_per_token", None)
        if own is not None:
            return own(self.cfg.train.seq_length)
        return flops_per_token(self.config, self.vocab_size, self.cfg.train.seq_length)

    def save_extra(self, ckpt_dir) -> None:
        self.tokenizer.save_pretrained(str(ckpt_dir / "tokenizer"))


class PretrainTask(LanguageModelTask):
    """The ``pretrain`` task: pre-training / continued pre-training of a causal LM."""

