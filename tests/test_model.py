"""The decoder: causality, segment isolation, and equivalences between code paths."""

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model import KVCache, ModelConfig, Transformer
from model.layers import rope_inv_freq

CFG = ModelConfig(vocab_size=97, d_model=48, n_layers=3, n_heads=6, n_kv_heads=2, d_ff=96,
                  max_seq_len=64, tie_embeddings=False)


def init(cfg, t=8):
  tokens = jnp.zeros((1, t), jnp.int32)
  return nn.unbox(Transformer(cfg).init(jax.random.PRNGKey(0), tokens, tokens))["params"]


def positions_for(tokens):
  return jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)


def forward(cfg, params, tokens, positions=None, segment_ids=None):
  positions = positions_for(tokens) if positions is None else positions
  return Transformer(cfg).apply({"params": params}, tokens, positions,
                                segment_ids=segment_ids)[0]


@pytest.fixture(scope="module")
def params():
  return init(CFG)


def test_causal_through_gradients(params):
  # Token id = position, so the embedding row of token j is used only at position j; the head
  # is untied, so the embedding gets no gradient through the output.
  t = 12
  tokens = jnp.arange(t)[None]
  for q in (0, 5, 11):
    def out_at_q(emb):
      p = dict(params, embedding=emb)
      return jnp.sum(forward(CFG, p, tokens)[0, q])
    g = jax.grad(out_at_q)(params["embedding"])
    row_norms = np.linalg.norm(np.asarray(g[:t]), axis=-1)
    assert np.all(row_norms[:q + 1] > 0), q
    np.testing.assert_array_equal(row_norms[q + 1:], 0.0)


def test_packed_documents_do_not_see_each_other(params):
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, CFG.vocab_size, (1, 16))
  segments = np.array([[1] * 6 + [2] * 7 + [3] * 3])
  positions = np.concatenate([np.arange(6), np.arange(7), np.arange(3)])[None]
  base = forward(CFG, params, jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(segments))
  changed = tokens.copy()
  changed[0, 6:13] = rng.integers(0, CFG.vocab_size, 7)  # rewrite document 2 only
  out = forward(CFG, params, jnp.asarray(changed), jnp.asarray(positions), jnp.asarray(segments))
  np.testing.assert_array_equal(out[0, :6], base[0, :6])
  np.testing.assert_array_equal(out[0, 13:], base[0, 13:])
  assert not np.allclose(out[0, 6:13], base[0, 6:13])
  # And a packed document equals the same document run alone.
  alone = forward(CFG, params, jnp.asarray(tokens[:, 6:13]))
  np.testing.assert_allclose(base[0, 6:13], alone[0], atol=1e-5)


def _unstack(params, n_layers):
  out = {k: v for k, v in params.items() if k != "layers"}
  for i in range(n_layers):
    out[f"layers_{i}"] = jax.tree.map(lambda x: x[i], params["layers"])
  return out


def test_scan_equals_unrolled(params):
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 10), 0, CFG.vocab_size)
  unrolled = dataclasses.replace(CFG, scan_layers=False)
  np.testing.assert_allclose(forward(CFG, params, tokens),
                             forward(unrolled, _unstack(params, CFG.n_layers), tokens),
                             atol=1e-5)


@pytest.mark.parametrize("policy", ["full", "dots", "dots_no_batch"])
@pytest.mark.parametrize("scan", [True, False])
def test_remat_equals_no_remat(params, policy, scan):
  tokens = jax.random.randint(jax.random.PRNGKey(2), (2, 10), 0, CFG.vocab_size)
  cfg = dataclasses.replace(CFG, scan_layers=scan)
  p = params if scan else _unstack(params, CFG.n_layers)

  def loss(cfg, p):
    return jnp.mean(jax.nn.log_softmax(forward(cfg, p, tokens))[..., 0])

  base_val, base_grad = jax.value_and_grad(functools_partial(loss, cfg))(p)
  val, grad = jax.value_and_grad(functools_partial(loss, dataclasses.replace(cfg, remat=policy)))(p)
  np.testing.assert_allclose(val, base_val, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), grad, base_grad)


def functools_partial(f, *args):
  return lambda *rest: f(*args, *rest)


def test_bf16_close_to_f32(params):
  tokens = jax.random.randint(jax.random.PRNGKey(3), (2, 16), 0, CFG.vocab_size)
  f32 = forward(CFG, params, tokens)
  bf16 = forward(dataclasses.replace(CFG, dtype="bfloat16"), params, tokens)
  assert bf16.dtype == jnp.float32  # logits are always f32
  p32, p16 = jax.nn.softmax(f32), jax.nn.softmax(bf16)
  assert float(jnp.max(jnp.abs(p32 - p16))) < 2e-2
  assert float(jnp.mean(jnp.argmax(f32, -1) == jnp.argmax(bf16, -1))) > 0.9


def test_rope_depends_only_on_relative_position(params):
  tokens = jax.random.randint(jax.random.PRNGKey(4), (1, 9), 0, CFG.vocab_size)
  pos = positions_for(tokens)
  np.testing.assert_allclose(forward(CFG, params, tokens, pos),
                             forward(CFG, params, tokens, pos + 17), atol=2e-4)


def test_llama31_rope_scaling_matches_the_published_formula():
  cfg = ModelConfig(d_model=128 * 4, n_heads=4, n_kv_heads=4, rope_theta=500000.0,
                    rope_scaling_factor=8.0, rope_low_freq_factor=1.0,
                    rope_high_freq_factor=4.0, rope_original_max_len=8192)
  # Written from Meta's reference (llama/model.py, apply_scaling), one frequency at a time.
  expected = []
  for i in range(0, 128, 2):
    f = 1.0 / (500000.0 ** (i / 128))
    wavelen = 2 * math.pi / f
    if wavelen < 8192 / 4.0:
      expected.append(f)
    elif wavelen > 8192 / 1.0:
      expected.append(f / 8.0)
    else:
      smooth = (8192 / wavelen - 1.0) / (4.0 - 1.0)
      expected.append((1 - smooth) * f / 8.0 + smooth * f)
  np.testing.assert_allclose(rope_inv_freq(cfg), np.array(expected), rtol=1e-5)


def test_kv_cache_prefill_then_decode_equals_full_forward(params):
  rng = np.random.default_rng(5)
  lens = [5, 9]
  full = [rng.integers(0, CFG.vocab_size, 12) for _ in lens]
  model = Transformer(CFG)
  # Ragged prefill: right-padded prompts, pad marked by segment_ids == 0.
  prompts = np.zeros((2, 9), np.int32)
  for i, n in enumerate(lens):
    prompts[i, :n] = full[i][:n]
  pad = (np.arange(9)[None] < np.array(lens)[:, None]).astype(np.int32)
  cache = KVCache.init(CFG, 2, 32)
  logits, cache = model.apply({"params": params}, jnp.asarray(prompts),
                              positions_for(jnp.asarray(prompts)), segment_ids=jnp.asarray(pad),
                              cache=cache)
  np.testing.assert_array_equal(cache.lengths, lens)
  for i, n in enumerate(lens):
    ref = forward(CFG, params, jnp.asarray(full[i][None, :n]))
    np.testing.assert_allclose(logits[i, :n], ref[0], atol=1e-5)
  # Decode the next 3 tokens of each row one at a time.
  for step in range(3):
    nxt = np.array([full[i][n + step] for i, n in enumerate(lens)])[:, None]
    logits, cache = model.apply({"params": params}, jnp.asarray(nxt), cache.lengths[:, None],
                                cache=cache)
    for i, n in enumerate(lens):
      ref = forward(CFG, params, jnp.asarray(full[i][None, :n + step + 1]))
      np.testing.assert_allclose(logits[i, 0], ref[0, -1], atol=1e-5)
