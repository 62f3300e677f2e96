"""The ``vlm_sft`` task: the core's training loop on multimodal conversations.

A :class:`loongforge.trainer.lm.LanguageModelTask` on the core's task contract; only what is
multimodal differs: the dataset
(:mod:`loongforge_vlm.data.conversations`, image preprocessing per encoder), the collation of
variable-size images, the image inputs passed to the model's forward, and the image token id,
which the model takes from the tokenizer unless ``model.image_token_id`` sets it. Everything else
(parallel layout, optimizer, schedule, checkpoints, metrics, lifecycle hooks) is the core's.
``sft.packing`` packs several conversations into a row and ``data.document_attention`` keeps
them from attending to each other, as in the core's ``sft`` task.
"""

from __future__ import annotations

import functools
from pathlib import Path

from loongforge.config import ConfigError
from loongforge.trainer.batches import masked_token_loss
from loongforge.trainer.lm import LanguageModelTask
from loongforge.trainer.loop import train

BUILTIN_SHAPES = "builtin:shapes"


class VLMTask(LanguageModelTask):
    """The ``vlm_sft`` task (module docstring)."""

    def collate(self, samples):
        from loongforge_vlm.data.conversations import collate

        return collate(samples)  # images and their grids ride along

    def build_datasets(self):
        from loongforge_vlm.data.conversations import VLMConversationDataset

        cfg, provider = self.cfg, self.provider
        if cfg.parallel.cp > 1:
            raise ConfigError("config key 'parallel.cp': context parallelism is not supported by vlm_sft yet")
        layout = provider.layout
        self._add_layout_tokens(layout)
        if provider.image_token_id is None:
            provider.image_token_id = self.tokenizer.convert_tokens_to_ids(layout.image_token)
        processor = provider.image_processor()
        make = functools.partial(
            VLMConversationDataset, tokenizer=self.tokenizer, processor=processor, seq_length=cfg.train.seq_length,
            image_token=layout.image_token, vision_start=layout.vision_start_token, vision_end=layout.vision_end_token,
            chat_template=cfg.sft.chat_template, loss_on=cfg.sft.loss_on, on_error=cfg.data.on_error,
            pack=bool(cfg.sft.packing), seed=cfg.seed)
        train = make(self._paths(cfg.data.paths))
        valid = make(self._paths(cfg.data.valid_paths)) if cfg.data.valid_paths else None
        self.data_stats = train.stats
        if self.rt.is_main:
            print(f"vlm data: {train.stats.summary()}", flush=True)
            for err in train.stats.errors[:5]:
                print(f"  skipped {err}", flush=True)
        return train, valid

    def _add_layout_tokens(self, layout):
        """The layout's image tokens, appended to a tokenizer that lacks them (a text-only one)."""
        from loongforge.data.tokenizer import check_vocab

        tokens = [t for t in (layout.vision_start_token, layout.image_token, layout.vision_end_token) if t]
        missing = [t for t in tokens if t not in self.tokenizer.get_vocab()]
        if missing:
            self.tokenizer.add_tokens(missing, special_tokens=True)
            check_vocab(self.tokenizer, int(self.cfg.model.foundation.get("vocab_size", self.vocab_size)))

    def _paths(self, paths) -> list[Path]:
        from loongforge.data.sft import resolve_chat_path

        from loongforge_vlm.data.shapes import write_shapes

        out = []
        for p in paths:
            if p == BUILTIN_SHAPES:
                import torch.distributed as dist

                if self.rt.is_main:
                    write_shapes(Path(self.cfg.output_dir) / "shapes")
                dist.barrier()
                out.append(Path(self.cfg.output_dir) / "shapes" / "shapes.jsonl")
            else:
                out += resolve_chat_path(p)
        return out

    def forward_step(self, batch, model):
        inputs = self.model_inputs(batch)
        device = self.rt.backend.device()
        for key in ("pixel_values", "image_grid_thw", "mrope_position_ids"):
            inputs[key] = batch[key].to(device)
        output = model(**inputs)
        return output, functools.partial(masked_token_loss, batch["loss_mask"])

    def summarize(self, result: dict) -> dict:
        result["data_stats"] = self.data_stats
        return result


def run_vlm_sft(cfg, plugins) -> dict:
    """Train ``cfg`` as the ``vlm_sft`` task in this process."""
    return train(cfg, plugins, VLMTask)
