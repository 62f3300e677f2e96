"""Registers the ``tiny_gpt`` family and its config directory."""

from loongforge import hookimpl
from loongforge.registry import ConfigDir, ModelFamily

LOONGFORGE_API_VERSION = "1.0"


@hookimpl
def loongforge_register_models():
    return [ModelFamily(name="tiny_gpt", builder="loongforge_example.model:TinyGPTProvider",
                        config_groups=("models/tiny_gpt",), description="example third-party family")]


@hookimpl
def loongforge_config_dirs():
    return [ConfigDir(path="pkg://loongforge_example.configs", provider="example")]
