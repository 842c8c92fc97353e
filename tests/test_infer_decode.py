"""KV caches and the decode loop against one full forward (the second code path)."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from infer.decode import generate, generate_with_stats
from infer.sampling import SamplingParams
from model import KVCache, ModelConfig, Transformer
from model.kv_cache import PagedKVCache

CFG = ModelConfig(vocab_size=96, d_model=48, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=96,
                  max_seq_len=256, init_std=0.3)  # wide init: clear argmaxes, no near-ties


@pytest.fixture(scope="module")
def params():
  tokens = jnp.zeros((1, 1), jnp.int32)
  init = jax.jit(lambda key: Transformer(CFG).init(key, tokens, tokens)["params"])
  return nn.unbox(init(jax.random.PRNGKey(0)))


@functools.partial(jax.jit, static_argnames=("cfg",))
def full_logits(params, tokens, cfg=CFG):
  b, t = tokens.shape
  return Transformer(cfg).apply({"params": params}, tokens,
                                jnp.broadcast_to(jnp.arange(t), (b, t)))[0]


def _apply(params, tokens, positions, segment_ids, cache, empty_cache=False):
  return Transformer(CFG).apply({"params": params}, tokens, positions, segment_ids=segment_ids,
                                cache=cache, empty_cache=empty_cache)


_apply_jit = jax.jit(_apply, static_argnames="empty_cache")

LENS = np.array([3, 8, 5])  # ragged prompts, right-padded to 8
STEPS = 6


def _prefill_then_decode(params, tokens, cache, empty_cache=False):
  """Prefill each row's prompt (padded batch), then STEPS one-token steps; [B, 8+STEPS, V]
  logits where row b's position t sits at index t (entries past a row's tokens unused).
  empty_cache: the prompt attends only to itself (flash attention), not through the cache."""
  b = tokens.shape[0]
  prompt = np.where(np.arange(8)[None, :] < LENS[:, None], tokens[:, :8], 0)
  seg = (np.arange(8)[None, :] < LENS[:, None]).astype(np.int32)
  logits, cache = _apply_jit(params, prompt, np.broadcast_to(np.arange(8), (b, 8)), seg, cache,
                             empty_cache)
  np.testing.assert_array_equal(np.asarray(cache.lengths), LENS)
  out = np.full((b, 8 + STEPS, CFG.vocab_size), np.nan, np.float32)
  for i in range(b):
    out[i, :LENS[i]] = logits[i, :LENS[i]]
  for _ in range(STEPS):
    pos = np.asarray(cache.lengths)
    tok = tokens[np.arange(b), pos][:, None]
    logits, cache = _apply_jit(params, tok, pos[:, None], None, cache)
    out[np.arange(b), pos] = logits[:, 0]
  return out


def _check_against_full(params, tokens, got, atol):
  want = np.asarray(full_logits(params, tokens))
  for i in range(tokens.shape[0]):
    n = LENS[i] + STEPS
    np.testing.assert_allclose(got[i, :n], want[i, :n], atol=atol, rtol=0)


@pytest.mark.parametrize("empty_cache", [False, True])
@pytest.mark.parametrize("dtype,atol", [(jnp.float32, 1e-4), (jnp.bfloat16, 0.1)])
def test_contiguous_prefill_then_decode_equals_full_forward(params, dtype, atol, empty_cache):
  tokens = np.random.default_rng(0).integers(0, CFG.vocab_size, (3, 8 + STEPS)).astype(np.int32)
  cache = KVCache.init(CFG, 3, 32, dtype)
  got = _prefill_then_decode(params, tokens, cache, empty_cache)
  _check_against_full(params, tokens, got, atol)


def test_empty_cache_prefill_needs_a_contiguous_cache(params):
  with pytest.raises(ValueError, match="contiguous KVCache"):
    _apply(params, np.zeros((3, 4), np.int32), np.zeros((3, 4), np.int32), None,
           _shuffled_paged_cache(4, 20, 8, np.random.default_rng(0)), empty_cache=True)


def _shuffled_paged_cache(page_size, num_pages, total, rng, fill=np.nan):
  """Rows own shuffled physical pages for `total` tokens; every other page (the null page
  included) is NaN, so reading anything a row does not own poisons its logits."""
  pps = -(-total // page_size)
  table = rng.permutation(np.arange(1, num_pages))[:3 * pps].reshape(3, pps).astype(np.int32)
  cache = PagedKVCache.init(CFG, 3, num_pages, page_size, pps + 2)
  owned = np.zeros(num_pages, bool)
  owned[table.ravel()] = True
  k = jnp.where(owned[None, None, :, None, None], cache.k_pages, fill)
  full_table = np.zeros((3, pps + 2), np.int32)
  full_table[:, :pps] = table
  return cache.replace(k_pages=k, v_pages=k, page_indices=jnp.asarray(full_table))


def test_paged_prefill_then_decode_equals_full_forward_and_contiguous(params):
  rng = np.random.default_rng(1)
  tokens = rng.integers(0, CFG.vocab_size, (3, 8 + STEPS)).astype(np.int32)
  paged = _prefill_then_decode(params, tokens,
                               _shuffled_paged_cache(4, 20, 8 + STEPS, rng))
  assert not np.isnan(paged[0, :LENS[0] + STEPS]).any()
  _check_against_full(params, tokens, paged, 1e-4)
  contiguous = _prefill_then_decode(params, tokens, KVCache.init(CFG, 3, 32))
  for i in range(3):
    n = LENS[i] + STEPS
    np.testing.assert_allclose(paged[i, :n], contiguous[i, :n], atol=1e-5, rtol=0)


def test_paged_cache_rolls_back_by_length(params):
  """A speculative step writes 3 tokens, keeps 1: the next step must not see the other 2."""
  rng = np.random.default_rng(2)
  tokens = rng.integers(0, CFG.vocab_size, (3, 8)).astype(np.int32)
  cache = _shuffled_paged_cache(4, 20, 16, rng, fill=0.0)
  pos = np.broadcast_to(np.arange(4), (3, 4))
  _, cache = _apply_jit(params, tokens[:, :4], pos, None, cache)
  junk = rng.integers(0, CFG.vocab_size, (3, 3)).astype(np.int32)
  _, cache = _apply_jit(params, junk, 4 + pos[:, :3], None, cache)
  cache = cache.replace(lengths=cache.lengths - 2)  # keep junk[:, 0] only
  logits, _ = _apply_jit(params, tokens[:, 5:6], np.full((3, 1), 5), None, cache)
  seq = np.concatenate([tokens[:, :4], junk[:, :1], tokens[:, 5:6]], axis=1)
  np.testing.assert_allclose(np.asarray(logits[:, 0]), np.asarray(full_logits(params, seq))[:, 5],
                             atol=1e-4, rtol=0)


def naive_greedy(params, prompt, n):
  """Recomputes the whole sequence every step (one padded shape, one compile)."""
  buf = np.zeros((1, 64), np.int32)
  buf[0, :len(prompt)] = prompt
  length = len(prompt)
  for _ in range(n):
    logits = full_logits(params, buf)
    buf[0, length] = int(np.argmax(np.asarray(logits[0, length - 1])))
    length += 1
  return buf[0, len(prompt):length].tolist()


PROMPTS = [[5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [42]]


@pytest.fixture(scope="module")
def greedy_run(params):
  return generate_with_stats(CFG, params, PROMPTS, max_new_tokens=20,
                             sampling=SamplingParams(temperature=0))


@pytest.fixture(scope="module")
def greedy_out(greedy_run):
  return greedy_run.tokens


def test_greedy_generate_equals_naive_recompute(params, greedy_out):
  for prompt, out in zip(PROMPTS, greedy_out):
    assert out == naive_greedy(params, prompt, 20)


def test_rows_stop_at_their_own_eos_and_budget(params, greedy_out):
  row0 = greedy_out[0]
  j = next(j for j in range(3, 20) if row0[j] not in row0[:j])
  eos, budgets = row0[j], [20, 7, 20]
  out = generate(CFG, params, PROMPTS, max_new_tokens=budgets,
                 sampling=SamplingParams(temperature=0), eos_ids=(eos,))
  assert out[0] == row0[:j + 1]  # cut after (and including) its first EOS
  for want, got, budget in zip(greedy_out, out, budgets):
    cut = want.index(eos) + 1 if eos in want else len(want)
    assert got == want[:min(cut, budget)]


def test_streaming_delivers_the_same_tokens(params, greedy_out):
  streamed = {i: [] for i in range(len(PROMPTS))}
  out = generate(CFG, params, PROMPTS, max_new_tokens=20, sampling=SamplingParams(temperature=0),
                 stream=lambda row, toks: streamed[row].extend(toks))
  assert out == greedy_out
  assert [streamed[i] for i in range(len(PROMPTS))] == greedy_out


def test_sampled_rows_reproduce_alone_and_in_a_mixed_batch(params):
  """A row's tokens depend on its prompt, settings and seed only: not on its place in the
  batch nor on its neighbours' seeds."""
  settings = [SamplingParams(temperature=1.0, top_p=0.9), SamplingParams(temperature=0),
              SamplingParams(temperature=0.7, top_k=10, repetition_penalty=1.3)]
  batch = generate(CFG, params, PROMPTS, max_new_tokens=12, sampling=settings, seed=[3, 4, 5])
  order = [2, 0, 1]
  moved = generate(CFG, params, [PROMPTS[i] for i in order], max_new_tokens=12,
                   sampling=[settings[i] for i in order], seed=[5, 9, 4])
  assert moved[0] == batch[2] and moved[2] == batch[1]
  assert moved[1] != batch[0]  # its own seed changed


def test_stats_and_errors(params, greedy_run):
  # The first token comes from prefill, the other 19 per row from one step each.
  assert greedy_run.generated_tokens == 60 and greedy_run.target_steps == [19, 19, 19]
  assert greedy_run.stats()["tokens_per_step"] == 1.0
  with pytest.raises(ValueError, match="max_seq_len"):
    generate(CFG, params, [[1] * 250], max_new_tokens=10)
  with pytest.raises(ValueError, match="at least one token"):
    generate(CFG, params, [[]], max_new_tokens=10)
