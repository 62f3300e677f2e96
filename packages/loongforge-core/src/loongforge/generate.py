"""Sample a continuation from a training checkpoint (one process, any saved parallel layout)."""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import OmegaConf


def _resolve(checkpoint: str) -> tuple[Path, Path]:
    """(checkpoints root holding config.yaml, the step directory to load)."""
    from loongforge.trainer.checkpoint import CheckpointError, latest_checkpoint

    path = Path(checkpoint)
    root = path if (path / "config.yaml").is_file() else path.parent
    if not (root / "config.yaml").is_file():
        raise CheckpointError(f"{checkpoint}: no config.yaml here or in its parent; pass a run's checkpoint directory")
    step_dir = path if (path / "trainer_state.json").is_file() else latest_checkpoint(root)
    if step_dir is None:
        raise CheckpointError(f"{root} holds no complete checkpoint ('latest' is missing)")
    return root, step_dir


def generate(checkpoint: str, *, prompt: str | None, max_new_tokens: int = 40, temperature: float = 0.0,
             top_k: int = 0, seed: int = 0, output: str | None = None, num_steps: int | None = None) -> str:
    """What ``loongforge generate`` prints: the checkpoint's task's ``generate`` (a registered
    ``Task.generate``: a video, an action chunk, ...), or a text continuation of ``prompt``."""
    from loongforge.config import ConfigError
    from loongforge.plugins import get_plugin_manager, lookup
    from loongforge.registry import load_object

    root, _ = _resolve(checkpoint)
    plugins = get_plugin_manager()
    task_name = OmegaConf.load(root / "config.yaml").get("task", "pretrain")
    record = lookup(plugins.registry().tasks, task_name, f"task (in {root / 'config.yaml'})", plugins.failures)
    if record.generate:
        return str(load_object(record.generate)(checkpoint, prompt=prompt, output=output, seed=seed,
                                                num_steps=num_steps))
    if prompt is None:
        raise ConfigError(f"generate: {checkpoint} is a {task_name!r} checkpoint, which continues text: give --prompt")
    return generate_from_checkpoint(checkpoint, prompt, max_new_tokens=max_new_tokens, temperature=temperature,
                                    top_k=top_k, seed=seed)


def generate_from_checkpoint(checkpoint: str, prompt: str, max_new_tokens: int = 40, temperature: float = 0.0,
                             top_k: int = 0, seed: int = 0) -> str:
    from loongforge.peft.lora import apply_lora_config
    from loongforge.plugins import get_plugin_manager
    from loongforge.trainer.checkpoint import load_checkpoint
    from loongforge.trainer.lm import load_tokenizer
    from loongforge.trainer.model import build_model_chunks, model_provider, run_settings
    from loongforge.trainer.runtime import runtime

    root, step_dir = _resolve(checkpoint)
    cfg = OmegaConf.load(root / "config.yaml")
    from loongforge.parallel import single_process_layout

    cfg.parallel = single_process_layout()
    cfg.tokenizer.path = str(root / "tokenizer")
    cfg.model.pop("pretrained", None)  # the saved section is resolved; the checkpoint holds every weight
    plugins = get_plugin_manager()
    with runtime(cfg, plugins) as rt:
        tokenizer = load_tokenizer(cfg, plugins)
        provider = model_provider(cfg, plugins)
        model = build_model_chunks(provider, run_settings(cfg), rt.backend, plugins)
        apply_lora_config(model, cfg)  # a LoRA run's checkpoint holds adapters: generate with them
        load_checkpoint(step_dir, model, None, rt.backend, load_rng=False)
        model = model[0].eval()
        device = rt.backend.device()
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        generator = torch.Generator().manual_seed(seed)
        vocab = len(tokenizer)
        with torch.no_grad():
            for _ in range(max_new_tokens):
                window = ids[-cfg.train.seq_length:]
                tokens = torch.tensor([window], device=device)
                positions = torch.arange(len(window), device=device)[None]
                logits = model(tokens, positions, None)[0, -1, :vocab].float().cpu()
                next_id = _sample(logits, temperature, top_k, generator)
                ids.append(next_id)
                if next_id == tokenizer.eos_token_id:
                    break
        return tokenizer.decode(ids, skip_special_tokens=True)


def _sample(logits: torch.Tensor, temperature: float, top_k: int, generator: torch.Generator) -> int:
    if temperature <= 0:
        return int(logits.argmax())
    logits = logits / temperature
    if top_k:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return int(torch.multinomial(logits.softmax(-1), 1, generator=generator))
