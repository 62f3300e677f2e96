"""LoongForge dense decoder LLM families (LLaMA 2/3, Qwen1.5/2/2.5/3) on megatron-core.

``loongforge_llm.provider.LLMProvider`` is the model provider; ``loongforge_llm.plugin`` the
LoongForge plugin; sizes live in ``loongforge_llm/configs/models/<group>/<size>.yaml``.
Importing this package imports no torch.
"""

from importlib.metadata import version as _version

#: the installed distribution's version (pyproject.toml is its one source)
__version__ = _version("loongforge-models-llm")
