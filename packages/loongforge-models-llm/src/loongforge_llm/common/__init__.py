"""Pieces every dense decoder family shares: config parsing, family records, weight rules, RoPE."""
