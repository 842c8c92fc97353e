"""Speculative decoding: the accept/resample rule against the target law, and the loops
against plain decoding."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from infer import speculative
from infer.decode import generate, generate_with_stats
from infer.sampling import SamplingParams
from model import ModelConfig, Transformer

CFG = ModelConfig(vocab_size=64, d_model=48, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=96,
                  max_seq_len=256, init_std=0.3)
DRAFT_CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=64,
                        max_seq_len=256, init_std=0.3)


def chi2_critical(df: int, z: float = 2.326) -> float:
  """Upper 1% point of chi-square(df) (Wilson-Hilferty)."""
  a = 2.0 / (9 * df)
  return df * (1 - a + z * math.sqrt(a)) ** 3


def _init(cfg, seed):
  tokens = jnp.zeros((1, 1), jnp.int32)
  init = jax.jit(lambda key: Transformer(cfg).init(key, tokens, tokens)["params"])
  return nn.unbox(init(jax.random.PRNGKey(seed)))


@pytest.fixture(scope="module")
def params():
  return _init(CFG, 0)


@pytest.fixture(scope="module")
def draft_params():
  return _init(DRAFT_CFG, 1)


# ----------------------------------------------------------------- the accept/resample rule


def _emitted(p, q, k, n, seed, one_hot=False):
  """Runs the rule on n independent rows with the same p (k+1 positions) and q (k); returns
  the first emitted token of each row (an accepted draft or the resample/bonus)."""
  rng = jax.random.PRNGKey(seed)
  kd, kr = jax.random.split(rng)
  logp = jnp.log(jnp.broadcast_to(jnp.asarray(p, jnp.float32), (n, k + 1, len(p[0]))))
  if one_hot:
    drafts = jnp.broadcast_to(jnp.asarray(q, jnp.int32), (n, k))  # fixed lookup drafts
    logq = None
  else:
    logq = jnp.log(jnp.broadcast_to(jnp.asarray(q, jnp.float32), (n, k, len(q[0]))))
    drafts = jax.random.categorical(kd, logq, axis=-1).astype(jnp.int32)
  keys = jax.random.split(kr, n)
  accepted, nxt = jax.jit(speculative.speculative_accept)(keys, logp, drafts, logq)
  first = jnp.where(accepted > 0, drafts[:, 0], nxt)
  return np.asarray(first), np.asarray(accepted), np.asarray(nxt), np.asarray(drafts)


def _chi2(samples, p):
  counts = np.bincount(samples, minlength=len(p))
  expected = len(samples) * np.asarray(p)
  mask = expected > 0
  assert counts[~mask].sum() == 0, "a token with target probability 0 was emitted"
  return float(np.sum((counts[mask] - expected[mask]) ** 2 / expected[mask])), int(mask.sum())


@pytest.mark.parametrize("seed", [0, 1])
def test_emitted_tokens_follow_the_target_distribution(seed):
  """Leviathan et al. 2023, Thm. 1, for random p and q over 5 tokens (q has a zero)."""
  rng = np.random.default_rng(seed)
  p = rng.dirichlet(np.ones(5), size=2)  # positions 1 and 2 (bonus)
  q = rng.dirichlet(np.ones(5), size=1)
  q[0, rng.integers(5)] = 0.0
  q /= q.sum()
  first, accepted, nxt, drafts = _emitted(p, q, 1, 20000, seed)
  stat, cells = _chi2(first, p[0])
  assert stat < chi2_critical(cells - 1), stat
  # All accepted -> the bonus token follows p_2.
  stat, cells = _chi2(nxt[accepted == 1], p[1])
  assert stat < chi2_critical(cells - 1), stat
  # The empirical acceptance rate is sum_x min(p, q) (Leviathan et al. 2023, Sec. 3.5).
  np.testing.assert_allclose(accepted.mean(), np.minimum(p[0], q[0]).sum(), atol=0.015)


def test_one_hot_drafts_follow_the_target_distribution():
  """Prompt lookup: q is one-hot, so x is kept with probability p(x) and a rejection
  resamples from p without x."""
  p = np.random.default_rng(3).dirichlet(np.ones(5), size=3)
  first, accepted, _, _ = _emitted(p, [2, 4], 2, 20000, 3, one_hot=True)
  stat, cells = _chi2(first, p[0])
  assert stat < chi2_critical(cells - 1), stat
  np.testing.assert_allclose((accepted > 0).mean(), p[0, 2], atol=0.015)


def test_zero_draft_probability_is_a_rejection_not_nan():
  p = jnp.log(jnp.array([[[0.5, 0.5, 0.0], [0.2, 0.3, 0.5]]]))
  q = jnp.log(jnp.array([[[1.0, 0.0, 0.0]]]))  # the draft token 1 has q = 0
  keys = jax.random.split(jax.random.PRNGKey(0), 1)
  accepted, nxt = speculative.speculative_accept(keys, p, jnp.array([[1]]), q)
  assert int(accepted[0]) == 0 and int(nxt[0]) in (0, 1)
  # p == q everywhere: every draft is accepted, nothing is NaN.
  same = jnp.log(jnp.array([[[0.0, 1.0, 0.0]]]))
  accepted, nxt = speculative.speculative_accept(keys, p, jnp.array([[1]]), same)
  assert int(accepted[0]) == 1 and int(nxt[0]) in (0, 1, 2)


def test_greedy_rule_accepts_the_argmax_prefix():
  p = jnp.log(jax.nn.one_hot(jnp.array([[3, 1, 2, 0]]), 5) * 0.9 + 0.02)
  keys = jax.random.split(jax.random.PRNGKey(0), 1)
  accepted, nxt = speculative.speculative_accept(keys, p, jnp.array([[3, 1, 4]]), None,
                                                 greedy_B=jnp.array([True]))
  assert int(accepted[0]) == 2 and int(nxt[0]) == 2
  accepted, nxt = speculative.speculative_accept(keys, p, jnp.array([[3, 1, 2]]), None,
                                                 greedy_B=jnp.array([True]))
  assert int(accepted[0]) == 3 and int(nxt[0]) == 0  # all accepted: the bonus argmax


def test_lookup_drafts_copy_the_latest_match():
  tokens = jnp.array([[1, 2, 3, 9, 1, 2, 3, 7, 8, 1, 2, 3, 0, 0, 0, 0],
                      [5, 6, 7, 8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                      [4, 4, 4, 4, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]])
  drafts, count = speculative.lookup_drafts(tokens, jnp.array([12, 4, 5]), ngram=3, k=3)
  assert drafts[0].tolist() == [7, 8, 1] and int(count[0]) == 3  # the later "1 2 3" wins
  assert int(count[1]) == 0  # no earlier occurrence of any suffix
  assert int(count[2]) == 1 and int(drafts[2, 0]) == 4  # "4 4 4" at 1 is followed by one 4
  # In a loop shorter than k, the latest match with k tokens after it wins.
  drafts, count = speculative.lookup_drafts(jnp.full((1, 16), 4), jnp.array([10]), ngram=3, k=3)
  assert int(count[0]) == 3 and drafts[0].tolist() == [4, 4, 4]


# ------------------------------------------------------------------------------ the loops

PROMPTS = [[1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 3], [9, 10, 11],
           [20, 21, 22, 23, 20, 21, 22]]


@pytest.fixture(scope="module")
def plain_greedy(params):
  return generate(CFG, params, PROMPTS, max_new_tokens=64, sampling=SamplingParams(temperature=0))


@pytest.mark.parametrize("kind", ["lookup", "model"])
def test_greedy_speculation_equals_plain_greedy(params, draft_params, plain_greedy, kind):
  draft = (speculative.PromptLookup(ngram=3) if kind == "lookup"
           else speculative.ModelDraft(DRAFT_CFG, draft_params))
  g = generate_with_stats(CFG, params, PROMPTS, max_new_tokens=64,
                          sampling=SamplingParams(temperature=0), draft=draft,
                          num_draft_tokens=4)
  assert g.tokens == plain_greedy
  assert sum(g.target_steps) < 3 * 63 or g.acceptance_rate == 0


def test_draft_equal_to_target_accepts_everything(params):
  g = generate_with_stats(CFG, params, PROMPTS, max_new_tokens=31,
                          sampling=SamplingParams(temperature=0.8, top_p=0.95),
                          draft=speculative.ModelDraft(CFG, params), num_draft_tokens=4, seed=7)
  assert g.acceptance_rate == 1.0
  assert g.target_steps == [6, 6, 6]  # 1 from prefill + 6 steps of 4 drafts and a bonus
  assert g.tokens_per_step == 5.0


def test_draft_with_another_vocabulary_is_an_error(params, draft_params):
  other = ModelConfig(vocab_size=65, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=64)
  with pytest.raises(ValueError, match="vocabulary"):
    generate(CFG, params, PROMPTS, max_new_tokens=4,
             draft=speculative.ModelDraft(other, draft_params))
