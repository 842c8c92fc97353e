"""Inference: prefill, a jitted decode loop over a functional KV cache, and sampling."""
