"""A task with no tokenizer and no language model: the proof that the task contract is enough."""

from loongforge import hookimpl
from loongforge.registry import ConfigDir, ConfigSection, Task

LOONGFORGE_API_VERSION = "1.1"


@hookimpl
def loongforge_register_tasks():
    return [Task(name="toy_regression", task="loongforge_toytask.task:RegressionTask",
                 generate="loongforge_toytask.task:generate", description="learn y = W x (samples)")]


@hookimpl
def loongforge_register_config_sections():
    return [ConfigSection(name="toy", schema="loongforge_toytask.task:ToyConfig")]


@hookimpl
def loongforge_config_dirs():
    return [ConfigDir(path="pkg://loongforge_toytask.configs", provider="toytask")]
