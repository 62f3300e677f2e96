"""Config composition (Hydra) and validation (structured schemas)."""

from loongforge.config.compose import ConfigError, compose_config
from loongforge.config.schema import RunConfig

__all__ = ["ConfigError", "RunConfig", "compose_config"]
