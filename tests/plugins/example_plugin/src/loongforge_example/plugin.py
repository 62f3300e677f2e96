"""Registers the ``tiny_gpt`` family (its own provider), the ``example_dense`` family (the shipped
dense provider with its own rules) and their config directory."""

from loongforge import hookimpl
from loongforge.registry import ConfigDir, ModelFamily

LOONGFORGE_API_VERSION = "1.0"


@hookimpl
def loongforge_register_models():
    from loongforge_example.dense import RECORD  # a family on loongforge_llm's dense provider

    return [ModelFamily(name="tiny_gpt", builder="loongforge_example.model:TinyGPTProvider",
                        config_groups=("models/tiny_gpt",), description="example third-party family"), RECORD]


@hookimpl
def loongforge_config_dirs():
    return [ConfigDir(path="pkg://loongforge_example.configs", provider="example")]
