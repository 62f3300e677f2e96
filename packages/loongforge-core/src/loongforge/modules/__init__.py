"""Model building blocks shared by backends and model families."""
