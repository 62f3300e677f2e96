"""A plugin written for an older hook API."""

from loongforge import hookimpl

LOONGFORGE_API_VERSION = "0.9"


@hookimpl
def loongforge_register_models():
    return []
