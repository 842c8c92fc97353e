"""Rollout log-probs from the decode loop against one full forward over prompt + generation."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from infer.decode import generate_with_stats
from infer.sampling import SamplingParams
from infer.speculative import PromptLookup
from model import ModelConfig, Transformer

# Wide init: peaked distributions, so a log-prob at the wrong position or temperature shows.
CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                  max_seq_len=32, init_std=0.3)
PROMPTS = [[5, 9, 2], [1, 7, 7, 3, 60, 11, 4], [33, 8, 19, 2, 40]]  # ragged
MAX_NEW = [6, 4, 5]
SEEDS = [11, 12, 13]


@functools.cache
def _model(tie_embeddings: bool):
  cfg = dataclasses.replace(CFG, tie_embeddings=tie_embeddings)
  tokens = jnp.zeros((1, 1), jnp.int32)
  params = jax.jit(lambda k: Transformer(cfg).init(k, tokens, tokens)["params"])(
      jax.random.PRNGKey(0))
  return cfg, nn.unbox(params)


@pytest.fixture(scope="module")
def model():
  return _model(True)


def _reference_logprobs(cfg, params, prompt, generated, temperature):
  """log_softmax(logits / T)[token] for each generated token, from one forward (no cache) over
  the row alone; the logits at position t predict the token at t + 1."""
  seq = jnp.asarray([list(prompt) + list(generated)], jnp.int32)
  logits = Transformer(cfg).apply({"params": params}, seq, jnp.arange(seq.shape[1])[None])[0]
  t = temperature if temperature > 0 else 1.0
  logp = np.asarray(jax.nn.log_softmax(np.asarray(logits[0], np.float64) / t, axis=-1))
  pos = len(prompt) - 1 + np.arange(len(generated))
  return logp[pos, np.asarray(generated)], np.asarray(logits[0])[pos]


def _check(cfg, params, temperatures):
  sampling = [SamplingParams(temperature=t) for t in temperatures]
  out = generate_with_stats(cfg, params, PROMPTS, max_new_tokens=MAX_NEW, sampling=sampling,
                            seed=SEEDS, return_logprobs=True)
  assert [len(t) for t in out.tokens] == MAX_NEW  # no EOS: every row runs to its limit
  assert [len(lp) for lp in out.logprobs] == [len(t) for t in out.tokens]
  for prompt, toks, lps, temp in zip(PROMPTS, out.tokens, out.logprobs, temperatures):
    want, logits = _reference_logprobs(cfg, params, prompt, toks, temp)
    np.testing.assert_allclose(lps, want, atol=1e-4, rtol=0)
    if temp == 0:  # the greedy token is the argmax, with the log-prob of the raw logits
      np.testing.assert_array_equal(toks, np.argmax(logits, axis=-1))
  return out


@pytest.mark.parametrize("tie_embeddings", [True, False], ids=["tied", "untied"])
def test_sampled_logprobs_match_the_full_forward(tie_embeddings):
  cfg, params = _model(tie_embeddings)
  out = _check(cfg, params, [0.7, 0.7, 0.7])
  # The token drawn is not always the argmax: the check above really covers sampling.
  assert any(lp < -1e-3 for row in out.logprobs for lp in row)


def test_per_row_temperatures(model):
  cfg, params = model
  _check(cfg, params, [0.7, 0.0, 1.3])


def test_greedy_logprobs_are_the_raw_log_softmax(model):
  cfg, params = model
  _check(cfg, params, [0.0, 0.0, 0.0])


def test_tokens_are_the_same_with_and_without_logprobs(model):
  cfg, params = model
  sampling = [SamplingParams(temperature=0.7), SamplingParams(temperature=0.7, top_k=5),
              SamplingParams(temperature=0.0)]
  run = lambda flag: generate_with_stats(cfg, params, PROMPTS, max_new_tokens=MAX_NEW,
                                         sampling=sampling, seed=SEEDS, eos_ids=(3,),
                                         return_logprobs=flag)
  plain, with_lp = run(False), run(True)
  assert plain.logprobs is None
  assert with_lp.tokens == plain.tokens
  assert [len(lp) for lp in with_lp.logprobs] == [len(t) for t in plain.tokens]


def test_logprobs_with_a_draft_are_an_error():
  with pytest.raises(ValueError, match="return_logprobs is not supported with speculative"):
    generate_with_stats(CFG, None, PROMPTS, max_new_tokens=4, draft=PromptLookup(2),
                        return_logprobs=True)
