"""Sampling filters against a plain numpy implementation, and the draws against their law."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from infer import sampling
from infer.sampling import Features, SamplingBatch, SamplingParams


def chi2_critical(df: int, z: float = 2.326) -> float:
  """Upper 1% point of chi-square(df) (Wilson-Hilferty; z = 1% normal quantile)."""
  a = 2.0 / (9 * df)
  return df * (1 - a + z * math.sqrt(a)) ** 3


def numpy_keep(logits, p: SamplingParams, seen):
  """Which tokens survive, written the obvious way (loops, float64, HF's order)."""
  x = logits.astype(np.float64).copy()
  if p.repetition_penalty != 1:
    for i in np.nonzero(seen)[0]:
      x[i] = x[i] / p.repetition_penalty if x[i] > 0 else x[i] * p.repetition_penalty
  x = x / (p.temperature if p.temperature > 0 else 1.0)
  keep = np.ones(len(x), bool)
  if p.top_k > 0:
    kth = sorted(x, reverse=True)[min(p.top_k, len(x)) - 1]
    keep &= x >= kth

  def probs():
    e = np.where(keep, np.exp(x - x[keep].max()), 0.0)
    return e / e.sum()

  if p.top_p < 1:
    pr = probs()
    mass, needed = 0.0, []
    for i in sorted(np.nonzero(keep)[0], key=lambda i: -pr[i]):
      if mass < p.top_p:
        needed.append(i)
        mass += pr[i]
    keep &= pr >= min(pr[i] for i in needed)  # ties with the last needed token stay
  if p.min_p > 0:
    pr = probs()
    keep &= pr >= p.min_p * pr.max()
  return keep


def test_filters_match_numpy_with_ties():
  rng = np.random.default_rng(0)
  b, v = 64, 24
  # Half-integer logits: many exact ties, also at the top-k / top-p / min-p cut-offs.
  logits = (rng.integers(-6, 7, (b, v)) * 0.5).astype(np.float32)
  seen = rng.random((b, v)) < 0.3
  params = []
  for i in range(b):
    params.append(SamplingParams(
        temperature=float(rng.choice([0.0, 0.5, 1.0, 1.7])),
        top_k=int(rng.choice([0, 1, 3, 7, v + 5])),
        top_p=float(rng.choice([1.0, rng.uniform(0.05, 0.99)])),
        min_p=float(rng.choice([0.0, rng.uniform(0.01, 0.6)])),
        repetition_penalty=float(rng.choice([1.0, 1.3, 0.8]))))
  out = sampling.process_logits(jnp.asarray(logits), SamplingBatch.of(params),
                                Features.of(params), jnp.asarray(seen))
  got = np.isfinite(np.asarray(out))
  for i, p in enumerate(params):
    np.testing.assert_array_equal(got[i], numpy_keep(logits[i], p, seen[i]), err_msg=str(p))
  assert got.any(axis=1).all()  # at least one token always survives


def test_each_filter_alone_matches_numpy():
  """One filter per batch, so a mismatch names the filter."""
  rng = np.random.default_rng(1)
  logits = (rng.standard_normal((16, 32)) * 2).astype(np.float32)
  seen = rng.random((16, 32)) < 0.5
  for p in (SamplingParams(top_k=5), SamplingParams(top_p=0.7), SamplingParams(min_p=0.2),
            SamplingParams(repetition_penalty=1.5, temperature=0.7)):
    out = sampling.process_logits(jnp.asarray(logits), SamplingBatch.of([p] * 16),
                                  Features.of([p]), jnp.asarray(seen))
    want = np.stack([numpy_keep(logits[i], p, seen[i]) for i in range(16)])
    np.testing.assert_array_equal(np.isfinite(np.asarray(out)), want, err_msg=str(p))


def test_penalty_values_follow_hf():
  logits = jnp.array([[2.0, -2.0, 1.0, -1.0]])
  seen = jnp.array([[True, True, False, False]])
  out = sampling.apply_penalty(logits, jnp.array([2.0]), seen)
  np.testing.assert_allclose(np.asarray(out), [[1.0, -4.0, 1.0, -1.0]])


def test_greedy_limits_equal_argmax():
  rng = np.random.default_rng(2)
  logits = jnp.asarray(rng.standard_normal((32, 50)).astype(np.float32))
  want = np.argmax(np.asarray(logits), axis=-1)
  key = jax.random.PRNGKey(0)
  for p in (SamplingParams(temperature=0.0), SamplingParams(top_k=1),
            SamplingParams(temperature=1e-4), SamplingParams(top_p=1e-6),
            SamplingParams(min_p=1.0)):
    np.testing.assert_array_equal(np.asarray(sampling.sample(key, logits, p)), want,
                                  err_msg=str(p))


def test_unfiltered_draws_follow_softmax_over_temperature():
  v, n, temp = 8, 20000, 0.7
  logits = np.random.default_rng(3).standard_normal(v).astype(np.float32)
  batch = SamplingBatch.of([SamplingParams(temperature=temp)] * n)
  keys = sampling.token_keys(sampling.row_keys(np.arange(n)), jnp.zeros(n, jnp.int32))
  toks = sampling.sample_rows(keys, jnp.broadcast_to(jnp.asarray(logits), (n, v)), batch,
                              Features())
  counts = np.bincount(np.asarray(toks), minlength=v)
  e = np.exp(logits / temp - np.max(logits / temp))
  expected = n * e / e.sum()
  stat = float(np.sum((counts - expected) ** 2 / expected))
  assert stat < chi2_critical(v - 1), (stat, counts, expected)


def test_top_k_draws_stay_inside_and_follow_renormalised_softmax():
  v, n = 6, 20000
  logits = np.array([2.0, 1.5, 1.0, 0.5, 0.0, -0.5], np.float32)
  batch = SamplingBatch.of([SamplingParams(top_k=3)] * n)
  keys = sampling.token_keys(sampling.row_keys(np.arange(n)), jnp.zeros(n, jnp.int32))
  toks = sampling.sample_rows(keys, jnp.broadcast_to(jnp.asarray(logits), (n, v)), batch,
                              Features(top_k=True))
  counts = np.bincount(np.asarray(toks), minlength=v)
  assert counts[3:].sum() == 0
  e = np.exp(logits[:3] - logits[0])
  expected = n * e / e.sum()
  assert np.sum((counts[:3] - expected) ** 2 / expected) < chi2_critical(2)


@pytest.mark.parametrize("rows", [[0, 1, 2, 3], [2, 0]])
def test_rows_draw_independently_of_their_batch(rows):
  """A row's settings and seed fully determine its draws: the same in any batch."""
  rng = np.random.default_rng(4)
  logits = rng.standard_normal((4, 40)).astype(np.float32)
  params = [SamplingParams(temperature=1.0), SamplingParams(temperature=0.0),
            SamplingParams(temperature=0.8, top_p=0.9), SamplingParams(top_k=5, min_p=0.1)]
  seeds = np.array([11, 12, 13, 14], np.uint32)
  feats = Features.of(params)

  def draw(idx, counter):
    keys = sampling.token_keys(sampling.row_keys(seeds[idx]), jnp.full(len(idx), counter))
    return np.asarray(sampling.sample_rows(keys, jnp.asarray(logits[idx]),
                                           SamplingBatch.of([params[i] for i in idx]), feats))

  for counter in range(3):
    alone = np.array([draw([i], counter)[0] for i in rows])
    np.testing.assert_array_equal(draw(rows, counter), alone)
