"""Entry point of ``loongforge-embodied``: the ``vla_train`` task (Pi0 / Pi0.5 flow-matching
policies on LeRobotDataset v3.0), its ``vla`` config section and the ``pi05_tiny`` config.
Importing this module imports no torch."""

from loongforge import hookimpl
from loongforge.registry import ConfigDir, ConfigSection, Task

LOONGFORGE_API_VERSION = "1.1"


@hookimpl
def loongforge_register_tasks():
    return [Task(name="vla_train", task="loongforge_embodied.task:VLATrainTask",
                 generate="loongforge_embodied.generate:generate",
                 description="flow-matching training of a Pi0 / Pi0.5 VLA policy on a LeRobotDataset v3.0")]


@hookimpl
def loongforge_register_config_sections():
    return [ConfigSection(name="vla", schema="loongforge_embodied.task:VLAConfig",
                          description="vla_train: model sizes, dataset, tokenizer, fine-tuning mode")]


@hookimpl
def loongforge_config_dirs():
    return [ConfigDir(path="pkg://loongforge_embodied.configs", provider="embodied")]
