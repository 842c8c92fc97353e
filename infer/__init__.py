"""Inference: prefill, a jitted decode loop over a functional KV cache, and sampling.

  sampling.py     per-row sampling settings and filters (penalty, temperature, top-k/p, min-p)
  decode.py       generate(): batched prefill + a lax.while_loop decode, streaming
  speculative.py  speculative decoding: draft model or prompt lookup; the accept/resample rule
  pages.py        host-side page allocator: refcounts, prefix hash chain, copy-on-write
  engine.py       continuous batching over the paged KV cache, with chunked prefill, prefix
                  sharing and preemption
  loaders.py      a model from a run directory, an HF directory or a GGUF file
  generate.py     the command line
  serve.py        an OpenAI-compatible HTTP server on the engine; engine_loop.py runs the
                  engine on its thread, openai_api.py the wire format, stream_text.py the
                  incremental text and stop strings, metrics.py the Prometheus text
  workdir.py      reading a run directory (config, tokenizer, orbax params)
  hf.py, gguf.py, chat.py   HF / GGUF checkpoints and chat templates (conversion)
"""
