"""Every family option through every path of the one forward: training (scanned and
unrolled), prefill + decode on the contiguous cache in both inference layouts, the paged
engine, and speculative decoding, each against the plain full forward.

The options' math against transformers is tests/test_convert_families.py's job; this file
checks that the paths agree with each other wherever a layer is local, capped or an MoE.
"""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from infer import speculative
from infer.decode import generate, generate_with_stats
from infer.engine import EngineConfig, serve
from infer.sampling import SamplingParams
from infer.step import init_cache
from model import ModelConfig, Transformer, forward, fused

BASE = ModelConfig(vocab_size=61, d_model=32, n_layers=5, n_heads=4, n_kv_heads=2, d_ff=48,
                   max_seq_len=128, init_std=0.2, tie_embeddings=False)
FAMILIES = {
    # Mistral: every layer local, the window shorter than the sequences below.
    "mistral": dict(sliding_window=5),
    "qwen2": dict(qkv_bias=True),
    "qwen3": dict(qk_norm=True, head_dim=16),
    # Gemma 2: local/global alternating, soft-capped scores and logits, sandwich norms.
    "gemma2": dict(mlp_activation="gelu_tanh", norm_plus_one=True, post_norms=True,
                   embed_scale=True, sliding_window=4, global_every=2, attn_softcap=3.0,
                   final_softcap=5.0, attn_scale=0.3, tie_embeddings=True),
    # Gemma 3: q/k norms, local layers with their own RoPE base; 5 layers = 2 periods of 2
    # plus one (the scan's remainder).
    "gemma3": dict(mlp_activation="gelu_tanh", norm_plus_one=True, post_norms=True,
                   embed_scale=True, qk_norm=True, sliding_window=4, global_every=2,
                   rope_theta=1e6, rope_local_theta=1e4),
    "mixtral": dict(n_experts=4, n_experts_per_token=2, moe_d_ff=24),
    "qwen3_moe": dict(n_experts=4, n_experts_per_token=2, moe_d_ff=24, router="qwen3_moe",
                      qk_norm=True),
}


def config(family, **kw):
  return dataclasses.replace(BASE, **FAMILIES[family], **kw)


@functools.cache
def params_of(family):
  cfg = config(family)
  tokens = jnp.zeros((1, 1), jnp.int32)
  params = nn.unbox(Transformer(cfg).init(jax.random.PRNGKey(0), tokens, tokens)["params"])
  # Non-trivial norms (the (1 + w) ones start at w = 0) and biases.
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
  leaves = [x + 0.1 * jax.random.normal(k, x.shape) if x.ndim <= 3 else x
            for x, k in zip(leaves, keys)]
  return jax.tree.unflatten(tree, leaves)


def tokens_of(b=2, t=14, seed=2):
  return jax.random.randint(jax.random.PRNGKey(seed), (b, t), 0, BASE.vocab_size)


def full_logits(cfg, params, tokens):
  pos = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
  return Transformer(cfg).apply({"params": params}, tokens, pos)[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_options_change_the_output(family):
  """Each family's options are live: the model differs from the plain Llama one."""
  cfg, params = config(family), params_of(family)
  tokens = tokens_of()
  got = full_logits(cfg, params, tokens)
  assert np.all(np.isfinite(got))
  plain = dataclasses.replace(BASE, tie_embeddings=cfg.tie_embeddings, head_dim=cfg.head_dim)
  if not (cfg.n_experts or cfg.qkv_bias or cfg.qk_norm or cfg.post_norms):  # same tree
    assert not np.allclose(got, full_logits(plain, params, tokens), atol=1e-3)


@pytest.mark.parametrize("family", ["gemma3", "mixtral"])
def test_unrolled_equals_scanned(family):
  cfg = config(family)
  params = params_of(family)
  unrolled = dataclasses.replace(cfg, scan_layers=False)
  per_layer = {k: v for k, v in params.items() if k != "layers"}
  for i in range(cfg.n_layers):
    per_layer[f"layers_{i}"] = jax.tree.map(lambda x: x[i], params["layers"])
  tokens = tokens_of()
  np.testing.assert_allclose(full_logits(unrolled, per_layer, tokens),
                             full_logits(cfg, params, tokens), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family,layout", [(f, "in_out") for f in FAMILIES]
                         + [("gemma2", "out_in"), ("qwen2", "out_in")])
def test_prefill_then_decode_equals_the_full_forward(family, layout):
  """Prefill 6 tokens, then decode one at a time past the window: a local layer's cache holds
  more than its window, and the mask, not the cache, must bound what it sees."""
  cfg, params = config(family), params_of(family)
  tokens = tokens_of()
  want = full_logits(cfg, params, tokens)
  prepared = fused.prepare(cfg, params, layout=layout)
  b, t = tokens.shape
  pos = jnp.broadcast_to(jnp.arange(t), (b, t))
  cache = init_cache(cfg, b, 32)
  step = jax.jit(lambda p, x, q, c: forward(cfg, p, x, q, cache=c)[:2])
  logits, cache, _ = forward(cfg, prepared, tokens[:, :6], pos[:, :6], cache=cache,
                             empty_cache=True)
  out = [logits]
  for i in range(6, t):
    logits, cache = step(prepared, tokens[:, i:i + 1], pos[:, i:i + 1], cache)
    out.append(logits)
  np.testing.assert_allclose(jnp.concatenate(out, axis=1), want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_engine_and_speculation_agree(family):
  """Greedy decoding: the contiguous loop, the paged engine and prompt-lookup speculation give
  the same tokens, and those are the full forward's argmax at every step."""
  cfg, params = config(family), params_of(family)
  prompts = [[3, 4, 5, 6, 3, 4, 5], [7, 8, 9]]
  greedy = SamplingParams(temperature=0)
  want = generate(cfg, params, prompts, max_new_tokens=12, sampling=greedy)
  for prompt, new in zip(prompts, want):
    seq = jnp.asarray([prompt + new])
    argmax = np.asarray(jnp.argmax(full_logits(cfg, params, seq)[0], axis=-1))
    assert new == argmax[len(prompt) - 1:-1].tolist()
  engine = serve(cfg, params, prompts, max_new_tokens=12, sampling=greedy,
                 config=EngineConfig(num_pages=32, page_size=4, max_batch=2, prefill_chunk=4))
  assert engine == want
  spec = generate_with_stats(cfg, params, prompts, max_new_tokens=12, sampling=greedy,
                             draft=speculative.PromptLookup(2), num_draft_tokens=3)
  assert spec.tokens == want
