"""Which LoongForge distribution provides which names, so that asking for one that is not
installed says what to install instead of "unknown" or Hydra's "Cannot find primary config".

A static table (the core never imports a plugin to learn it): ``tests/test_known_packages.py``
checks it against what the workspace's plugins really register, in both directions, and prints
the lines to add when a plugin registers a new name.
"""

from __future__ import annotations

import os
import re
from importlib.metadata import PackageNotFoundError, distribution

LLM, VLM, CKPT = "loongforge-models-llm", "loongforge-models-vlm", "loongforge-ckpt"
DIFFUSION, EMBODIED = "loongforge-diffusion", "loongforge-embodied"
CUDA, XPU, KERNELS = "loongforge-backend-cuda", "loongforge-backend-xpu", "loongforge-kernels"

#: distribution -> the extra of the meta-package ``loongforge`` that installs it
EXTRAS = {
    LLM: "llm",
    VLM: "vlm",
    "loongforge-diffusion": "diffusion",
    "loongforge-embodied": "embodied",
    CUDA: "cuda",
    XPU: "xpu",
    KERNELS: "kernels",
    CKPT: "ckpt",
}

#: kind -> name -> distribution. Kinds: ``config`` (a run config name), ``config_group`` (a
#: Hydra group such as ``models/qwen3``), and the registry tables (``tasks``, ``models``,
#: ``components``, ``datasets``, ``tokenizers``, ``converters``, ``backends``).
PROVIDERS: dict[str, dict[str, str]] = {
    "config": {
        "custom_combined": VLM,
        "default": LLM,
        "internvl3_5_1b": VLM,
        "internvl3_5_2b": VLM,
        "internvl3_5_4b": VLM,
        "internvl3_5_8b": VLM,
        "llava_onevision_tiny": VLM,
        "pi05_tiny": EMBODIED,
        "pi0_tiny": EMBODIED,
        "qwen2_5_vl_tiny": VLM,
        "qwen3_moe_tiny": LLM,
        "qwen3_vl_2b": VLM,
        "qwen3_vl_4b": VLM,
        "qwen3_vl_8b": VLM,
        "qwen3_vl_tiny": VLM,
        "sft_demo": LLM,
        "wan_tiny": DIFFUSION,
    },
    "config_group": {
        "models/deepseek_v3": LLM,
        "models/image_encoder": VLM,
        "models/image_projector": VLM,
        "models/llama2": LLM,
        "models/llama3": LLM,
        "models/mimo": LLM,
        "models/qwen1_5": LLM,
        "models/qwen2": LLM,
        "models/qwen2_5": LLM,
        "models/qwen3": LLM,
        "models/qwen3_moe": LLM,
        "models/wan": DIFFUSION,
    },
    "tasks": {
        "vla_train": EMBODIED,
        "vlm_sft": VLM,
        "wan_preprocess": DIFFUSION,
        "wan_pretrain": DIFFUSION,
    },
    "models": {
        "deepseek_v3": LLM,
        "llama": LLM,
        "mimo": LLM,
        "qwen2": LLM,
        "qwen3": LLM,
        "qwen3_moe": LLM,
        "vlm": VLM,
    },
    "components": {
        "internvit": VLM,
        "internvl_mlp": VLM,
        "llava_mlp": VLM,
        "qwen2_5_merger": VLM,
        "qwen2_5_vit": VLM,
        "qwen3_merger": VLM,
        "qwen3_vit": VLM,
        "siglip": VLM,
    },
    "datasets": {
    },
    "tokenizers": {
        "hf_vision": VLM,
    },
    "converters": {
        "hf-to-mcore": CKPT,
        "mcore-to-hf": CKPT,
        "wan-diffusers-to-ours": DIFFUSION,
        "wan-ours-to-diffusers": DIFFUSION,
    },
    "backends": {
        "cuda": CUDA,
        "xpu": XPU,
    },
}


def install_command(dist: str) -> str:
    extra = EXTRAS.get(dist)
    return f"install {dist} (pip install 'loongforge[{extra}]')" if extra else f"install {dist} (pip install {dist})"


def _missing(dist: str) -> str | None:
    """Why ``dist``'s plugin is absent (not installed, or left out by ``LOONGFORGE_LOAD_PLUGINS``),
    or ``None`` when it is installed and selected (a refusal is reported by the manager)."""
    from loongforge.plugins import ENTRY_POINT_GROUP, ENV_LOAD_PLUGINS

    try:
        eps = distribution(dist).entry_points.select(group=ENTRY_POINT_GROUP)
    except PackageNotFoundError:
        return "not installed"
    wanted = os.environ.get(ENV_LOAD_PLUGINS)
    if wanted is not None and not {ep.name for ep in eps} & {w.strip() for w in wanted.split(",")}:
        return f"installed but left out by {ENV_LOAD_PLUGINS}={wanted!r}"
    return None


def provider(kind: str, name: str) -> str | None:
    """The distribution that provides ``name`` of ``kind`` (``None`` when no known one does); a
    config group also matches a config inside it (``models/qwen3/qwen3_demo``)."""
    table = PROVIDERS.get(kind, {})
    if name in table:
        return table[name]
    if kind == "config_group":
        parts = name.strip("/").split("/")
        for n in range(len(parts), 0, -1):
            if (found := table.get("/".join(parts[:n]))) is not None:
                return found
    return None


def install_hint(kind: str, name: str) -> str:
    """`` ``name`` comes with DIST: install DIST (pip install 'loongforge[extra]')`` when a known,
    uninstalled distribution provides it; else ``""``."""
    dist = provider(kind, name)
    if dist is None or (why := _missing(dist)) is None:
        return ""
    if why != "not installed":
        return f"{name!r} comes with {dist}, which is {why}."
    return f"{name!r} comes with {dist}, which is not installed: {install_command(dist)}."


_GROUP_IN_HYDRA_MESSAGE = re.compile(r"""['"]/?((?:[\w.-]+/)+[\w.-]+)['"]""")


def hint_for_hydra_message(message: str) -> str:
    """Install hints for the config groups a Hydra error message names (``Could not find
    'models/qwen2_5_vl/...'``, ``Could not load 'models/image_encoder/siglip'``)."""
    hints = {install_hint("config_group", m) for m in _GROUP_IN_HYDRA_MESSAGE.findall(message)}
    return " ".join(sorted(h for h in hints if h))


#: the first words of a :func:`loongforge.plugins.lookup` description -> registry kind
_LOOKUP_KINDS = {"task": "tasks", "converter": "converters", "model": "models", "llm": "models",
                 "dataset": "datasets", "tokenizer": "tokenizers", "backend": "backends",
                 "component": "components"}


def hint_for_lookup(what: str, name: str) -> str:
    """The install hint for an unknown registry name described as ``what`` (e.g. ``"task
    (config key 'task')"``)."""
    words = what.lower().split()
    kind = next((_LOOKUP_KINDS[w] for w in words[:2] if w in _LOOKUP_KINDS), None)
    return install_hint(kind, name) if kind else ""
