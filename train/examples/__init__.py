"""Worked examples: small generated tasks whose answers a function can check."""
