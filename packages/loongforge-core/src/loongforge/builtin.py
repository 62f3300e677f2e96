"""The core's own plugin: the CPU reference backend, the pretrain task, the text datasets and the
default answers of the ``firstresult`` hooks (all ``trylast``, so an installed plugin wins)."""

from __future__ import annotations

from loongforge import hookimpl
from loongforge.registry import Backend, DatasetType, Task, TokenizerType

LOONGFORGE_API_VERSION = "1.1"


@hookimpl
def loongforge_register_backends():
    return [Backend(name="cpu", factory="loongforge.backends.cpu:CpuBackend", priority=0,
                    description="CPU reference backend (gloo); runs everywhere")]


@hookimpl
def loongforge_register_tasks():
    return [Task(name="pretrain", task="loongforge.trainer.lm:PretrainTask",
                 description="pre-training / continued pre-training of a causal LM"),
            Task(name="sft", task="loongforge.trainer.sft:SFTTask",
                 description="supervised fine-tuning on conversations (chat templates, packing, LoRA)")]


@hookimpl
def loongforge_register_datasets():
    return [
        DatasetType(name="text", builder="loongforge.data.builder:build_pretrain_dataset",
                    description="jsonl/parquet text, tokenized and packed at start-up"),
        DatasetType(name="indexed", builder="loongforge.data.builder:build_pretrain_dataset",
                    description="megatron-core indexed dataset (.bin/.idx) from `loongforge data preprocess`"),
    ]


@hookimpl
def loongforge_register_tokenizers():
    return [TokenizerType(name="hf", loader="loongforge.data.tokenizer:load_tokenizer",
                          description="HF tokenizer directory (tokenizer.json), loaded offline")]


@hookimpl(trylast=True)
def loongforge_select_backend(available, requested):
    if requested:
        for backend in available:
            if backend.name == requested:
                return backend
        names = ", ".join(b.name for b in available)
        from loongforge.config import ConfigError
        from loongforge.known_packages import install_hint

        hint = install_hint("backends", requested)
        raise ConfigError(f"config key 'backend': {requested!r} is not available here (available: {names})."
                          + (f" {hint}" if hint else ""))
    return max(available, key=lambda b: b.priority)


@hookimpl(trylast=True)
def loongforge_layer_spec(backend, config, model_cfg):
    return backend.layer_spec(config, model_cfg)


@hookimpl(trylast=True)
def loongforge_init_parallel(cfg, backend):
    from loongforge.parallel import init_model_parallel

    return init_model_parallel(cfg)


@hookimpl(trylast=True)
def loongforge_parallelize(name, modules, cfg, backend):
    from loongforge.parallel import wrap_data_parallel

    return wrap_data_parallel(modules, cfg)
