"""Preprocessing to latents + text embeddings once, and the dataset training reads.

``preprocess(dataset, encoders, out_dir)`` runs the frozen VAE and text encoder over every clip and
writes ``out_dir``:

* ``shard-00000.safetensors``...: tensors ``"{k}.latent"`` (normalised latents [z, f, h, w]) and
  ``"{k}.text"`` (text embeddings [text_len, text_dim]) for the shard's samples;
* ``null_text.safetensors``: the embedding of the empty prompt (CFG dropout, sampling);
* ``index.json``: per sample its shard, key, caption and latent shape; the skipped videos with
  their errors; counts;
* ``encoders/``: the encoders themselves (so sampling can embed prompts and decode latents).

Training then reads only latents (:class:`LatentDataset`). With ``on_error="skip"`` a video that
cannot be used is reported (file and reason) and counted; with ``"raise"`` the first one stops the
run with that message.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from loongforge.data.errors import DataError

from loongforge_diffusion.data.video import VideoError

INDEX = "index.json"


def preprocess(dataset, encoders, out_dir: str | Path, *, shard_size: int = 64, on_error: str = "raise",
               log=print) -> dict:
    from safetensors.torch import save_file

    if on_error not in ("raise", "skip"):
        raise DataError(f"config key 'data.on_error' must be 'raise' or 'skip', got {on_error!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    samples, skipped, pending = [], [], {}

    def flush():
        if pending:
            save_file(dict(pending), str(out / samples[-1]["shard"]))  # the shard of the last sample
            pending.clear()

    for i in range(len(dataset)):
        try:
            item = dataset[i]
        except VideoError as exc:
            if on_error == "raise":
                raise
            skipped.append({"index": i, "error": str(exc)})
            log(f"skipped: {exc}")
            continue
        latent = encoders.encode_video(item["video"][None])[0].contiguous()
        text = encoders.encode_text([item["caption"]])[0].contiguous()
        shard, key = len(samples) // shard_size, len(samples) % shard_size
        pending[f"{key}.latent"], pending[f"{key}.text"] = latent, text
        samples.append({"shard": f"shard-{shard:05d}.safetensors", "key": key, "caption": item["caption"],
                        "source": item["source"], "latent_shape": list(latent.shape)})
        if len(samples) % shard_size == 0:
            flush()
    flush()
    if not samples:
        raise DataError(f"no usable video ({len(skipped)} skipped): {skipped[:3]}")
    save_file({"null_text": encoders.encode_text([""])[0].contiguous()}, str(out / "null_text.safetensors"))
    encoders.save(out / "encoders")
    index = {"samples": samples, "skipped": skipped, "num_samples": len(samples), "num_skipped": len(skipped),
             "text_len": encoders.text_len}
    (out / INDEX).write_text(json.dumps(index, indent=1))
    return index


class LatentDataset(torch.utils.data.Dataset):
    """Items ``{"latent": [z, f, h, w], "text": [text_len, text_dim]}`` from a preprocessed folder."""

    def __init__(self, folder: str | Path, indices: list[int] | None = None):
        from safetensors.torch import load_file

        self.folder = Path(folder)
        if not (self.folder / INDEX).is_file():
            raise DataError(f"{self.folder}: no {INDEX}; run the preprocessing first")
        self.index = json.loads((self.folder / INDEX).read_text())
        self.samples = self.index["samples"]
        self.indices = list(range(len(self.samples))) if indices is None else list(indices)
        self.null_text = load_file(str(self.folder / "null_text.safetensors"))["null_text"]
        self._shards: dict[str, dict] = {}

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        s = self.samples[self.indices[i]]
        if s["shard"] not in self._shards:
            from safetensors.torch import load_file

            self._shards[s["shard"]] = load_file(str(self.folder / s["shard"]))
        shard = self._shards[s["shard"]]
        return {"latent": shard[f"{s['key']}.latent"], "text": shard[f"{s['key']}.text"]}
