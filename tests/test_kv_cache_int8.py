"""The int8 KV cache (model/kv_cache.py): quantization against numpy, attention over int8 K/V
against dense attention over the dequantized K/V, greedy decoding against the f32 cache, and
what the cache weighs."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention_oracle import dense_attention, position_mask
from configs import llama3_8b, tiny
from infer import generate as generate_cli
from infer.decode import generate
from infer.engine import Engine, EngineConfig, serve
from infer.sampling import SamplingParams
from infer.speculative import PromptLookup
from model import KVCache, ModelConfig, Transformer
from model.kv_cache import PagedKVCache, quantize
from pallas_kernels.attention import cached_attention

GREEDY = SamplingParams(temperature=0)


def _init(cfg):
  tokens = jnp.zeros((1, 1), jnp.int32)
  init = jax.jit(lambda key: Transformer(cfg).init(key, tokens, tokens)["params"])
  return nn.unbox(init(jax.random.PRNGKey(0)))


def test_quantize_error_is_at_most_half_a_scale():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((3, 5, 2, 64)).astype(np.float32) * rng.uniform(0.01, 30, (3, 5, 2, 1))
  x[0, 0, 0] = 0.0  # an all-zero head: scale 0, codes 0, no NaN
  x[1, 2, 1, 7] = -50.0  # the extreme element maps to -127 exactly
  codes, scale = quantize(jnp.asarray(x))
  want_scale = np.abs(x).max(axis=-1) / 127
  np.testing.assert_allclose(scale, want_scale, rtol=1e-6)
  assert codes.dtype == jnp.int8 and np.abs(np.asarray(codes, np.int32)).max() == 127
  assert codes[1, 2, 1, 7] == -127 and not np.asarray(codes[0, 0, 0]).any()
  err = np.abs(np.asarray(codes, np.float32) * np.asarray(scale)[..., None] - x)
  assert np.all(err <= want_scale[..., None] / 2 * (1 + 1e-5) + 1e-7)


def test_caches_of_other_dtypes_have_no_scale_leaves():
  cfg = ModelConfig(vocab_size=32, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=64)
  f32 = KVCache.init(cfg, 2, 8, "float32")
  assert f32.k_scale is None and len(jax.tree.leaves(f32)) == 3
  int8 = KVCache.init(cfg, 2, 8, "int8", per_layer=True)
  assert int8.k[0].dtype == jnp.int8 and int8.k_scale[0].shape == (2, 8, 1)
  paged = PagedKVCache.init(cfg, 2, 6, 4, 3, "int8")
  assert paged.k_pages.dtype == jnp.int8 and paged.v_scale.shape == (2, 1, 6, 4)
  with pytest.raises(ValueError, match="kv_cache_dtype must be one of .* got 'int4'"):
    KVCache.init(cfg, 2, 8, "int4")
  with pytest.raises(ValueError, match="cache_dtype must be one of"):
    generate(cfg, None, [[1]], max_new_tokens=1, cache_dtype="float16")
  with pytest.raises(ValueError, match="EngineConfig.cache_dtype"):
    Engine(cfg, None, EngineConfig(cache_dtype="float8"))
  with pytest.raises(SystemExit):
    generate_cli.parse_args(["--checkpoint", "x", "--kv_cache_dtype", "int4"])
  assert generate_cli.parse_args(["--checkpoint", "x", "--kv_cache_dtype", "int8"]
                                 ).kv_cache_dtype == "int8"


def test_llama3_8b_cache_bytes_at_8k():
  """From shapes alone (eval_shape): 32 layers x 8 KV heads x 128 dims x 8192 tokens."""
  cfg = ModelConfig.from_config(llama3_8b.get_config().model)
  nbytes = lambda dtype: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(
      jax.eval_shape(lambda: KVCache.init(cfg, 1, 8192, dtype))))
  bf16, int8 = nbytes("bfloat16"), nbytes("int8")
  tokens = cfg.n_layers * 8192 * cfg.n_kv_heads  # (layer, token, kv head) triples
  assert bf16 == 2 * tokens * 2 * cfg.head_dim + 4  # + lengths
  assert int8 == 2 * tokens * (cfg.head_dim + 4) + 4  # codes + an f32 scale, for k and v
  assert bf16 - 4 == 1 << 30 and int8 - 4 == 528 << 20  # 1 GiB -> 528 MiB (51.6%)


@pytest.mark.parametrize("tq,window,softcap", [(1, None, None), (3, 5, 2.0)])
def test_cached_attention_over_int8_equals_dense_over_dequantized(tq, window, softcap):
  rng = np.random.default_rng(1)
  b, s, hq, hkv, d = 2, 24, 8, 2, 32
  q = rng.standard_normal((b, tq, hq, d)).astype(np.float32) * 3
  codes_k, k_scale = quantize(jnp.asarray(rng.standard_normal((b, s, hkv, d)), jnp.float32))
  codes_v, v_scale = quantize(jnp.asarray(rng.standard_normal((b, s, hkv, d)), jnp.float32))
  # The oracle's K/V: numpy's dequantization of the same codes.
  k = np.asarray(codes_k, np.float32) * np.asarray(k_scale)[..., None]
  v = np.asarray(codes_v, np.float32) * np.asarray(v_scale)[..., None]
  lengths = np.array([7, 24], np.int32)
  mask = position_mask(lengths[:, None] - tq + np.arange(tq), np.arange(s), window=window)
  want = dense_attention(q, k, v, mask, scale=d ** -0.5, softcap=softcap)
  got = cached_attention(jnp.asarray(q), codes_k, codes_v, jnp.asarray(lengths),
                         sliding_window=window, softcap=softcap, k_scales=k_scale,
                         v_scales=v_scale)
  np.testing.assert_allclose(got, want, atol=1e-5)


# configs/tiny.py's model (4 layers, d_model 256, 2 KV heads of 64), at its default init.
TINY = dataclasses.replace(ModelConfig.from_config(tiny.get_config().model), max_seq_len=128)


@pytest.fixture(scope="module")
def tiny_run():
  """Prompts, the f32 cache's greedy 64 tokens, and the params. Of six random prompts, the
  four whose f32 greedy path has no near-tie (the others come within 0.07 logits of one)."""
  params = _init(TINY)
  rng = np.random.default_rng(1)
  prompts = [rng.integers(1, TINY.vocab_size, n).tolist() for n in (5, 9, 17, 23, 31, 40)]
  prompts = [prompts[i] for i in (1, 2, 4, 5)]
  want = generate(TINY, params, prompts, max_new_tokens=64, sampling=GREEDY,
                  cache_dtype="float32")
  return params, prompts, want


def test_tiny_model_int8_cache_decodes_the_f32_greedy_tokens(tiny_run):
  params, prompts, want = tiny_run
  # The comparison means something only without near-ties: the smallest top-1 / top-2 logit
  # gap along the f32 path, from one full forward over prompt + output.
  buf = np.zeros((len(prompts), 128), np.int32)
  for i, (p, o) in enumerate(zip(prompts, want)):
    buf[i, :len(p) + len(o)] = p + o
  logits = np.asarray(jax.jit(lambda t: Transformer(TINY).apply(
      {"params": params}, t, jnp.broadcast_to(jnp.arange(128), t.shape))[0])(buf))
  for i, p in enumerate(prompts):
    top2 = np.sort(logits[i, len(p) - 1:len(p) + 63], axis=-1)[:, -2:]
    assert np.min(top2[:, 1] - top2[:, 0]) > 0.3
  assert all(len(o) == 64 for o in want)
  assert generate(TINY, params, prompts, max_new_tokens=64, sampling=GREEDY,
                  cache_dtype="int8") == want


def test_tiny_model_int8_paged_engine_serves_the_f32_greedy_tokens(tiny_run):
  params, prompts, want = tiny_run
  config = EngineConfig(num_pages=48, page_size=16, max_batch=4, prefill_chunk=64,
                        cache_dtype="int8")
  assert serve(TINY, params, prompts, max_new_tokens=64, sampling=GREEDY,
               config=config) == want


def test_speculative_decoding_over_an_int8_cache_is_exact():
  """Greedy prompt lookup verifies k + 1 tokens at once into the int8 cache and rolls back:
  the same tokens as one at a time over the same cache."""
  cfg = ModelConfig(vocab_size=96, d_model=48, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=96,
                    max_seq_len=128, init_std=0.3)
  params = _init(cfg)
  prompts = [[5, 6, 7, 5, 6, 7, 5, 6], [1, 2, 3, 4, 1, 2, 3]]
  plain = generate(cfg, params, prompts, max_new_tokens=24, sampling=GREEDY, cache_dtype="int8")
  spec = generate(cfg, params, prompts, max_new_tokens=24, sampling=GREEDY, cache_dtype="int8",
                  draft=PromptLookup(2), num_draft_tokens=3)
  assert spec == plain
