"""Errors caused by the user's input (config, data, checkpoints, plugins).

The CLI prints these as one clear message without a traceback; anything else is a bug and keeps
its traceback.
"""


class LoongForgeError(Exception):
    """Base of user-facing errors; the message names the key, file or plugin at fault."""
