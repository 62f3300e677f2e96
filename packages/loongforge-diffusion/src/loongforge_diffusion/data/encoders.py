"""The frozen encoders around the DiT: the Wan VAE (video <-> latents) and the umT5 text encoder.

``diffusion.vae`` / ``diffusion.text_encoder`` name either a local diffusers/transformers folder
(e.g. the ``vae/``, ``text_encoder/`` and ``tokenizer/`` folders of a Wan2.2 diffusers checkpoint)
or ``tiny``: a *randomly initialised* tiny ``AutoencoderKLWan`` (the sizes of diffusers' own VAE
test: base_dim 3, dim_mult [1, 1, 1, 1], one res block; 4x8x8 compression) and a tiny
``UMT5EncoderModel`` (2 layers, d_model = the DiT's ``text_dim``) with LoongForge's shipped tiny
tokenizer, built from config with a fixed seed -- no download. Random encoders still give a
deterministic, invertible-enough mapping, which is all the CPU demo needs; their latents and
text embeddings mean nothing semantically.

Latents are normalised as Wan's pipelines do, ``(z - latents_mean) / latents_std`` per channel;
text embeddings are the encoder's last hidden state over the real tokens, zero-padded to
``text_len`` (also as Wan's pipelines do).
"""

from __future__ import annotations

from pathlib import Path

import torch

TINY_TOKENIZER = "builtin:tiny_stories"


def tiny_vae(z_dim: int, seed: int = 0):
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed)
    return AutoencoderKLWan(base_dim=3, z_dim=z_dim, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                            temperal_downsample=[False, True, True], latents_mean=[0.0] * z_dim,
                            latents_std=[1.0] * z_dim).eval()


def tiny_text_encoder(text_dim: int, vocab_size: int, seed: int = 0):
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    cfg = UMT5Config(vocab_size=vocab_size, d_model=text_dim, d_kv=8, d_ff=2 * text_dim, num_layers=2,
                     num_heads=4, relative_attention_num_buckets=8, dropout_rate=0.0)
    return UMT5EncoderModel(cfg).eval()


class Encoders:
    """VAE + tokenizer + text encoder, frozen, in eval mode."""

    def __init__(self, vae, tokenizer, text_encoder, text_len: int):
        self.vae, self.tokenizer, self.text_encoder, self.text_len = vae, tokenizer, text_encoder, text_len
        for m in (vae, text_encoder):
            m.requires_grad_(False)

    @classmethod
    def build(cls, d, wan) -> Encoders:
        """From the ``diffusion`` section (``vae``, ``text_encoder``, ``encoder_seed``) and the WanConfig."""
        from loongforge.data.tokenizer import load_tokenizer

        if d.vae == "tiny":
            vae = tiny_vae(wan.in_channels, d.encoder_seed)
        else:
            from diffusers import AutoencoderKLWan

            vae = AutoencoderKLWan.from_pretrained(d.vae, local_files_only=True).eval()
        if d.text_encoder == "tiny":
            tokenizer = load_tokenizer(TINY_TOKENIZER)
            text_encoder = tiny_text_encoder(wan.text_dim, len(tokenizer), d.encoder_seed + 1)
        else:
            from transformers import AutoTokenizer, UMT5EncoderModel

            root = Path(d.text_encoder)
            tok_dir = root.parent / "tokenizer" if (root.parent / "tokenizer").is_dir() else root
            tokenizer = AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True, trust_remote_code=False)
            text_encoder = UMT5EncoderModel.from_pretrained(str(root), local_files_only=True).eval()
        return cls(vae, tokenizer, text_encoder, wan.text_len)

    @classmethod
    def load(cls, folder: str | Path, text_len: int) -> Encoders:
        """The encoders :meth:`save` wrote (what ``generate`` uses to embed prompts and decode)."""
        from diffusers import AutoencoderKLWan
        from transformers import AutoTokenizer, UMT5EncoderModel

        folder = Path(folder)
        return cls(AutoencoderKLWan.from_pretrained(folder / "vae", local_files_only=True).eval(),
                   AutoTokenizer.from_pretrained(str(folder / "tokenizer"), local_files_only=True),
                   UMT5EncoderModel.from_pretrained(str(folder / "text_encoder"), local_files_only=True).eval(),
                   text_len)

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        self.vae.save_pretrained(folder / "vae")
        self.text_encoder.save_pretrained(str(folder / "text_encoder"))
        self.tokenizer.save_pretrained(str(folder / "tokenizer"))

    # --- encode / decode ---------------------------------------------------------------------------
    def _stats(self, like: torch.Tensor):
        c = self.vae.config
        shape = (1, len(c.latents_mean), 1, 1, 1)
        return (torch.tensor(c.latents_mean, dtype=like.dtype).view(shape),
                torch.tensor(c.latents_std, dtype=like.dtype).view(shape))

    @torch.no_grad()
    def encode_video(self, video: torch.Tensor) -> torch.Tensor:
        """``[B, 3, F, H, W]`` in [-1, 1] -> normalised latents ``[B, z, 1 + (F-1)/4, H/s, W/s]``."""
        z = self.vae.encode(video).latent_dist.mode()
        mean, std = self._stats(z)
        return (z - mean) / std

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        mean, std = self._stats(latents)
        return self.vae.decode(latents * std + mean).sample.clamp(-1, 1)

    @torch.no_grad()
    def encode_text(self, captions: list[str]) -> torch.Tensor:
        """``[B, text_len, text_dim]``: last hidden state over the real tokens, zeros after."""
        tok = self.tokenizer(captions, padding="max_length", max_length=self.text_len, truncation=True,
                             return_tensors="pt", add_special_tokens=True)
        mask = tok["attention_mask"]
        hidden = self.text_encoder(input_ids=tok["input_ids"], attention_mask=mask).last_hidden_state
        return hidden * mask.unsqueeze(-1).to(hidden.dtype)
