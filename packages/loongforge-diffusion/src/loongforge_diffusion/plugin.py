"""Entry point of ``loongforge-diffusion``: registers this package with LoongForge.

No models or converters are registered yet; the package exists so that users can install it
on its own and so that the plugin contract (API version, discovery) is exercised.
"""

LOONGFORGE_API_VERSION = "1.0"
