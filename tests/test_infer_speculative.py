"""Speculative decoding: the accept/resample rule against the target law, and the loops
against plain decoding."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

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


@pytest.mark.parametrize("xp", [jnp, np], ids=["jnp", "numpy"])  # the decode loop, the engine
def test_lookup_drafts_copy_the_latest_match(xp):
  tokens = xp.array([[1, 2, 3, 9, 1, 2, 3, 7, 8, 1, 2, 3, 0, 0, 0, 0],
                     [5, 6, 7, 8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                     [4, 4, 4, 4, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]])
  drafts, count = speculative.lookup_drafts(tokens, xp.array([12, 4, 5]), ngram=3, k=3, xp=xp)
  assert drafts[0].tolist() == [7, 8, 1] and int(count[0]) == 3  # the later "1 2 3" wins
  assert int(count[1]) == 0  # no earlier occurrence of any suffix
  assert int(count[2]) == 1 and int(drafts[2, 0]) == 4  # "4 4 4" at 1 is followed by one 4
  # In a loop shorter than k, the latest match with k tokens after it wins.
  drafts, count = speculative.lookup_drafts(xp.full((1, 16), 4), xp.array([10]), ngram=3, k=3,
                                            xp=xp)
  assert int(count[0]) == 3 and drafts[0].tolist() == [4, 4, 4]


# ------------------------------------------------------------------------------ the loops

PROMPTS = [[1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 3], [9, 10, 11],
           [20, 21, 22, 23, 20, 21, 22]]


@pytest.fixture(scope="module")
def plain_greedy(params):
  return generate(CFG, params, PROMPTS, max_new_tokens=64, sampling=SamplingParams(temperature=0))


def _near_copy(params, std, seed):
  """The target's weights plus N(0, std^2) noise: a draft that agrees with the target often
  but not always, so verification both accepts and rejects."""
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  return jax.tree.unflatten(tree, [x + std * jax.random.normal(key, x.shape, x.dtype)
                                   for x, key in zip(leaves, keys)])


@pytest.mark.parametrize("kind", ["lookup", "model"])
def test_greedy_speculation_equals_plain_greedy(params, plain_greedy, kind):
  # The model draft is the target plus noise: a small independent draft (DRAFT_CFG) agrees
  # with a random target's argmax about as often as chance (1/64), so it would hardly test
  # the accepted path; the sampled tests below run one.
  draft = (speculative.PromptLookup(ngram=3) if kind == "lookup"
           else speculative.ModelDraft(CFG, _near_copy(params, 0.02, 5)))
  g = generate_with_stats(CFG, params, PROMPTS, max_new_tokens=64,
                          sampling=SamplingParams(temperature=0), draft=draft,
                          num_draft_tokens=4)
  assert g.tokens == plain_greedy
  # Drafts were accepted, so the accepted path was compared too (lookup: the outputs' loops;
  # model: the near copy agrees often), and fewer target forwards than tokens were needed.
  assert g.acceptance_rate > (0.1 if kind == "model" else 0), (g.accepted, g.drafted)
  assert sum(g.target_steps) < 3 * 63


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


# ------------------------------------------- sampled speculation against the target's law
# Leviathan et al. 2023, Thm. 1: sampled speculative decoding emits sequences distributed as
# the target's. On an 8-token vocabulary the joint law of the first three tokens (512 cells)
# is computed exactly from the module's own forward over all 64 two-token continuations, with
# penalty, temperature and top-k written again in numpy, and the decoders' samples are
# checked against it with a chi-square test.

SMALL = ModelConfig(vocab_size=8, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                    max_seq_len=64, init_std=0.25)  # peaked but far from one-hot
SMALL_DRAFT = ModelConfig(vocab_size=8, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1,
                          d_ff=32, max_seq_len=64, init_std=0.25)
# Repeated n-grams: prompt lookup drafts "4 1 2" after it.
LAW_PROMPT = [1, 2, 3, 4, 1, 2, 3, 4, 1, 2, 3]
LAW_ROWS = 4000
# The penalty is strong so that an accepted draft not counted as context at the next position
# (speculative._with_drafts_seen) fails the test.
LAW_SAMPLING = {"plain_t1": SamplingParams(temperature=1.0),
                "filtered": SamplingParams(temperature=0.8, top_k=5, repetition_penalty=2.0)}


@pytest.fixture(scope="module")
def small_params():
  return _init(SMALL, 0), _init(SMALL_DRAFT, 1)


@pytest.fixture(scope="module")
def small_laws(small_params):
  return {name: _law_of_three(SMALL, small_params[0], LAW_PROMPT, sp)
          for name, sp in LAW_SAMPLING.items()}


def _reference_probs(logits_V, context, sp: SamplingParams):
  """One step's law in float64: CTRL penalty over the context, temperature, top-k (ties at
  the k-th kept), in HF generate's order (infer/sampling.py)."""
  z = np.asarray(logits_V, np.float64).copy()
  seen = np.zeros(z.shape, bool)
  seen[list(context)] = True
  pen = sp.repetition_penalty
  z = np.where(seen, np.where(z > 0, z / pen, z * pen), z) / sp.temperature
  if sp.top_k:
    z = np.where(z < np.sort(z)[::-1][sp.top_k - 1], -np.inf, z)
  e = np.exp(z - z.max())
  return e / e.sum()


def _law_of_three(cfg, params, prompt, sp: SamplingParams):
  """f64[V, V, V]: P(t1, t2, t3) under the target, from one module forward (not the decoder)
  over prompt + every (t1, t2)."""
  v, t = cfg.vocab_size, len(prompt)
  seqs = np.array([prompt + [a, b] for a in range(v) for b in range(v)], np.int32)
  positions = np.broadcast_to(np.arange(t + 2, dtype=np.int32), seqs.shape)
  logits, _ = Transformer(cfg).apply({"params": params}, jnp.asarray(seqs),
                                     jnp.asarray(positions))
  logits = np.asarray(logits, np.float64).reshape(v, v, t + 2, v)
  law = np.zeros((v, v, v))
  p1 = _reference_probs(logits[0, 0, t - 1], prompt, sp)
  for a in range(v):
    p2 = _reference_probs(logits[a, 0, t], prompt + [a], sp)
    for b in range(v):
      law[a, b] = p1[a] * p2[b] * _reference_probs(logits[a, b, t + 1], prompt + [a, b], sp)
  return law / law.sum()


def _chi2_pvalue(tokens, law):
  """Goodness of fit of the first three tokens of each row; cells expecting fewer than 5 are
  pooled into one. A token sequence of probability 0 (filtered out) is a failure by itself."""
  v = law.shape[0]
  first3 = np.array([row[:3] for row in tokens])
  cell = (first3[:, 0] * v + first3[:, 1]) * v + first3[:, 2]
  observed = np.bincount(cell, minlength=v ** 3).astype(np.float64)
  expected = law.ravel() * len(tokens)
  assert observed[expected == 0].sum() == 0, "a sequence with target probability 0 was emitted"
  big = expected >= 5
  observed = np.append(observed[big], observed[~big].sum())
  expected = np.append(expected[big], expected[~big].sum())
  return stats.chisquare(observed, expected).pvalue


@pytest.mark.parametrize("kind", ["plain", "model", "lookup"])
def test_sampled_speculation_follows_the_target_law(small_params, small_laws, kind):
  """plain: the reference's own check (plain sampling must pass it too). Both settings run
  in one batch, LAW_ROWS rows each (settings are per row, and rows never interact)."""
  params, dparams = small_params
  draft = {"plain": None, "model": speculative.ModelDraft(SMALL_DRAFT, dparams),
           "lookup": speculative.PromptLookup(ngram=3)}[kind]
  settings = list(LAW_SAMPLING.values())
  # k = 2: three tokens take one or two verification steps (the second after a rejection
  # rolled the cache back).
  g = generate_with_stats(SMALL, params, [LAW_PROMPT] * (LAW_ROWS * len(settings)),
                          max_new_tokens=3, sampling=[sp for sp in settings
                                                      for _ in range(LAW_ROWS)],
                          draft=draft, num_draft_tokens=2, seed=0)
  assert all(len(row) == 3 for row in g.tokens)
  for i, name in enumerate(LAW_SAMPLING):
    rows = slice(i * LAW_ROWS, (i + 1) * LAW_ROWS)
    if draft is not None:  # both verification outcomes ran
      rate = sum(g.accepted[rows]) / sum(g.drafted[rows])
      assert 0 < rate < 1, (name, rate)
    pvalue = _chi2_pvalue(g.tokens[rows], small_laws[name])
    assert pvalue > 1e-3, (name, pvalue)
