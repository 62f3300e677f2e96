"""Hardware backends that ship with the core."""
