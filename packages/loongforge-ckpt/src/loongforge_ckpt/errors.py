"""The converters' user-facing error (printed without a traceback by the CLI)."""

from loongforge.errors import LoongForgeError


class ConversionError(LoongForgeError, ValueError):
    """A checkpoint cannot be converted; the message names the file, tensor or option at fault."""
