"""A plugin whose import fails, as one with a missing dependency would."""

raise ImportError("this plugin needs the 'frobnicate' package, which is not installed")
