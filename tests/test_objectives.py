"""train/objectives.py against float64 numpy written the obvious way, and closed forms."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from train import objectives as obj

LN2 = math.log(2.0)
TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(autouse=True)
def strict_ranks():
  # Implicit broadcasting of [B] against [B, T] is a bug here, not a convenience.
  with jax.numpy_rank_promotion("raise"):
    yield


def rng(seed=0):
  return np.random.default_rng(seed)


def span_masks(r, b, t):
  """Contiguous masks of varying start and length, including empty and full rows."""
  mask = np.zeros((b, t), np.float32)
  for i in range(b):
    if i == 0:
      continue  # empty row
    start = 0 if i % 2 else int(r.integers(0, t))  # right-padded prefixes and mid spans
    length = t - start if i == 1 else int(r.integers(1, t - start + 1))
    mask[i, start:start + length] = 1
  return mask


# --- masked reductions ---------------------------------------------------------------


def test_masked_mean_and_whiten():
  r = rng(5)
  x = r.normal(3.0, 2.0, size=(4, 7)).astype(np.float32)
  mask = span_masks(r, 4, 7)
  valid = mask > 0
  np.testing.assert_allclose(obj.masked_sum(x, mask), x[valid].sum(), **TOL)
  np.testing.assert_allclose(obj.masked_mean(x, mask), x[valid].mean(), **TOL)
  w = np.asarray(obj.whiten(x, mask))
  np.testing.assert_allclose(w[valid].mean(), 0.0, atol=1e-5)
  np.testing.assert_allclose(w[valid].var(), 1.0, atol=1e-5)
  assert (w[~valid] == 0).all()
  want = (x[valid] - x[valid].mean()) / np.sqrt(x[valid].var() + 1e-8)
  np.testing.assert_allclose(w[valid], want, **TOL)
  assert float(obj.masked_mean(x, np.zeros_like(mask))) == 0.0  # no NaN when all masked
  rows = np.asarray(obj.masked_mean(x, mask, axis=-1))
  for i in range(4):
    np.testing.assert_allclose(rows[i], x[i][valid[i]].mean() if valid[i].any() else 0.0, **TOL)
  np.testing.assert_allclose(obj.masked_var(x, mask, axis=-1)[1], x[1][valid[1]].var(), **TOL)


# --- reward model and DPO ------------------------------------------------------------


def test_bradley_terry():
  r = rng(6)
  rc, rr, m = (r.normal(size=5).astype(np.float32) for _ in range(3))
  np.testing.assert_allclose(obj.bradley_terry_loss(rc, rc), [LN2] * 5, **TOL)
  np.testing.assert_allclose(obj.bradley_terry_loss(rc, rr, m),
                             obj.bradley_terry_loss(rc - m, rr), **TOL)
  d = (rc.astype(np.float64) - rr - m)
  np.testing.assert_allclose(obj.bradley_terry_loss(rc, rr, m), np.log1p(np.exp(-d)), **TOL)
  # Stable at |Δr| = 100: −log σ(100) = log(1 + e^-100) ≈ e^-100; −log σ(−100) ≈ 100.
  far = obj.bradley_terry_loss(jnp.array([100.0, 0.0]), jnp.array([0.0, 100.0]))
  assert np.isfinite(far).all()
  np.testing.assert_allclose(far, [math.exp(-100), 100.0], rtol=1e-6, atol=1e-30)


def np_dpo(pc, pr, rc, rr, beta, kind, eps):
  pc, pr, rc, rr = (a.astype(np.float64) for a in (pc, pr, rc, rr))
  delta = (pc - rc) - (pr - rr)
  logsig = lambda z: -np.log1p(np.exp(-z))  # noqa: E731
  if kind == "sigmoid":
    loss = -(1 - eps) * logsig(beta * delta) - eps * logsig(-beta * delta)
  elif kind == "ipo":
    loss = (delta - 1 / (2 * beta)) ** 2
  else:
    loss = np.maximum(0.0, 1 - beta * delta)
  return loss, beta * (pc - rc), beta * (pr - rr)


def test_dpo_at_initialisation_is_ln2_with_zero_rewards():
  lp = jnp.asarray(rng(7).normal(-30, 5, size=(2, 4)), jnp.float32)
  losses, rc, rr = obj.dpo_loss(lp[0], lp[1], lp[0], lp[1], beta=0.1)
  np.testing.assert_allclose(losses, [0.693147] * 4, atol=1e-6)
  assert (np.asarray(rc) == 0).all() and (np.asarray(rr) == 0).all()


@pytest.mark.parametrize("kind,eps", [("sigmoid", 0.0), ("sigmoid", 0.1), ("ipo", 0.0),
                                      ("hinge", 0.0)])
def test_dpo_kinds_match_numpy(kind, eps):
  r = rng(8)
  pc, pr, rc, rr = (r.normal(-20, 4, size=6).astype(np.float32) for _ in range(4))
  beta = 0.3
  f = jax.jit(obj.dpo_loss, static_argnames=("kind",))
  got = f(pc, pr, rc, rr, beta=beta, kind=kind, label_smoothing=eps)
  for g, w in zip(got, np_dpo(pc, pr, rc, rr, beta, kind, eps)):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-4)


def test_dpo_rewards_carry_no_gradient_but_loss_does():
  pc, pr, rc, rr = (jnp.asarray(rng(9).normal(size=3), jnp.float32) for _ in range(4))
  g_loss = jax.grad(lambda p: obj.dpo_loss(p, pr, rc, rr, beta=0.1)[0].sum())(pc)
  g_rew = jax.grad(lambda p: obj.dpo_loss(p, pr, rc, rr, beta=0.1)[1].sum())(pc)
  assert np.abs(g_loss).min() > 0 and (np.asarray(g_rew) == 0).all()


def test_unknown_kinds_are_errors_listing_valid_ones():
  z = jnp.zeros(2)
  with pytest.raises(ValueError, match="sigmoid.*ipo.*hinge"):
    obj.dpo_loss(z, z, z, z, beta=0.1, kind="kto")
  with pytest.raises(ValueError, match="k1.*k3"):
    obj.kl_penalty(z, z, "k2")


# --- PPO -----------------------------------------------------------------------------


def test_kl_penalty():
  r = rng(10)
  logp = r.normal(-2, 1, size=(3, 5)).astype(np.float32)
  ref = r.normal(-2, 1, size=(3, 5)).astype(np.float32)
  for kind in ("k1", "k3"):
    np.testing.assert_array_equal(obj.kl_penalty(logp, logp, kind), np.zeros((3, 5)))
  np.testing.assert_allclose(obj.kl_penalty(logp, ref, "k1"), logp.astype(np.float64) - ref,
                             **TOL)
  rho = ref.astype(np.float64) - logp
  k3 = np.asarray(obj.kl_penalty(logp, ref, "k3"))
  np.testing.assert_allclose(k3, np.exp(rho) - 1 - rho, **TOL)
  assert (k3 >= 0).all()
  # Also for nearly equal log-probs, where rounding could otherwise dip below 0.
  near = (-2.0 + r.normal(0, 1e-4, size=(1, 100))).astype(np.float32)
  assert (np.asarray(obj.kl_penalty(near, np.full_like(near, -2.0), "k3")) >= 0).all()


def test_token_rewards_put_the_score_at_the_last_valid_token():
  kl = rng(11).normal(size=(4, 6)).astype(np.float32)
  mask = np.array([[1, 1, 1, 0, 0, 0], [1] * 6, [0] * 6, [1, 0, 0, 0, 0, 0]], np.float32)
  score = np.array([2.0, -1.0, 5.0, 3.0], np.float32)
  beta = 0.05
  want = -beta * kl.astype(np.float64) * mask
  for i, last in enumerate([2, 5, None, 0]):
    if last is not None:
      want[i, last] += score[i]
  got = jax.jit(obj.token_rewards)(score, kl, mask, beta)
  np.testing.assert_allclose(got, want, **TOL)


def np_gae(rewards, values, mask, gamma, lam):
  """Double loop over each row's valid steps; V after the last valid step is 0."""
  b, t = rewards.shape
  adv = np.zeros((b, t))
  for i in range(b):
    steps = [s for s in range(t) if mask[i, s] > 0]
    delta = {}
    for k, s in enumerate(steps):
      v_next = values[i, steps[k + 1]] if k + 1 < len(steps) else 0.0
      delta[s] = rewards[i, s] + gamma * v_next - values[i, s]
    for k, s in enumerate(steps):
      adv[i, s] = sum((gamma * lam) ** (j - k) * delta[steps[j]] for j in range(k, len(steps)))
  return adv, adv + values


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (1.0, 1.0), (0.99, 0.0)])
def test_gae_matches_numpy_double_loop(gamma, lam):
  r = rng(12)
  b, t = 6, 9
  rewards = r.normal(size=(b, t))
  values = r.normal(size=(b, t))
  mask = span_masks(r, b, t)
  adv, ret = jax.jit(obj.gae, static_argnames=("gamma", "lam"))(
      rewards.astype(np.float32), values.astype(np.float32), mask, gamma=gamma, lam=lam)
  want_adv, want_ret = np_gae(rewards, values, mask, gamma, lam)
  np.testing.assert_allclose(adv, want_adv, **TOL)
  valid = mask > 0
  np.testing.assert_allclose(np.asarray(ret)[valid], want_ret[valid], **TOL)
  assert (np.asarray(adv)[~valid] == 0).all()


def test_gae_closed_forms():
  r = rng(13)
  b, t = 4, 7
  rewards = r.normal(size=(b, t)).astype(np.float32)
  values = r.normal(size=(b, t)).astype(np.float32)
  lengths = [7, 5, 1, 3]
  mask = (np.arange(t)[None] < np.array(lengths)[:, None]).astype(np.float32)
  valid = mask > 0
  # γ = λ = 1: returns are the reward-to-go Σ_{s ≥ t} r_s over the valid steps.
  _, ret = obj.gae(rewards, values, mask, gamma=1.0, lam=1.0)
  to_go = np.cumsum((rewards * mask)[:, ::-1].astype(np.float64), axis=1)[:, ::-1]
  np.testing.assert_allclose(np.asarray(ret)[valid], to_go[valid], **TOL)
  # λ = 0: the advantage is the one-step TD error δ_t, with V past the end = 0.
  gamma = 0.9
  adv, _ = obj.gae(rewards, values, mask, gamma=gamma, lam=0.0)
  v_next = np.concatenate([values[:, 1:], np.zeros((b, 1), np.float32)], 1) * np.concatenate(
      [mask[:, 1:], np.zeros((b, 1), np.float32)], 1)
  delta = rewards + gamma * v_next.astype(np.float64) - values
  np.testing.assert_allclose(adv, delta * mask, **TOL)


def test_ppo_policy_loss_at_ratio_one_and_when_clipped():
  r = rng(14)
  logp = r.normal(-2, 1, size=(3, 5)).astype(np.float32)
  adv = r.normal(size=(3, 5)).astype(np.float32)
  mask = span_masks(r, 3, 5)
  loss, clipped = obj.ppo_policy_loss(logp, logp, adv, clip=0.2)
  np.testing.assert_allclose(obj.masked_mean(loss, mask), -adv[mask > 0].mean(), **TOL)
  assert float(obj.masked_mean(clipped, mask)) == 0.0
  # ρ = e^0.5 > 1.2 with A > 0: the clipped term −1.2·A is the max, and its gradient is 0.
  old = jnp.zeros((1, 2))
  new = jnp.full((1, 2), 0.5)
  a = jnp.array([[2.0, -2.0]])
  loss, clipped = obj.ppo_policy_loss(new, old, a, clip=0.2)
  np.testing.assert_allclose(loss, [[-1.2 * 2.0, 2.0 * math.exp(0.5)]], **TOL)
  np.testing.assert_array_equal(clipped, [[1.0, 0.0]])
  g = jax.grad(lambda n: obj.ppo_policy_loss(n, old, a, clip=0.2)[0].sum())(new)
  np.testing.assert_allclose(g, [[0.0, 2.0 * math.exp(0.5)]], **TOL)


def test_ppo_policy_loss_matches_numpy():
  r = rng(15)
  new, old = (r.normal(-2, 0.3, size=(4, 6)) for _ in range(2))
  adv = r.normal(size=(4, 6))
  eps = 0.2
  ratio = np.exp(new - old)
  a, c = -adv * ratio, -adv * np.clip(ratio, 1 - eps, 1 + eps)
  loss, clipped = obj.ppo_policy_loss(*(x.astype(np.float32) for x in (new, old, adv)),
                                      clip=eps)
  np.testing.assert_allclose(loss, np.maximum(a, c), **TOL)
  np.testing.assert_array_equal(clipped, (c > a + 1e-6).astype(np.float32))
  np.testing.assert_allclose(obj.approx_kl(new.astype(np.float32), old.astype(np.float32)),
                             0.5 * (new - old) ** 2, **TOL)


def test_ppo_value_loss_matches_numpy():
  r = rng(16)
  v, v_old, ret = (r.normal(size=(3, 8)) for _ in range(3))
  eps = 0.2
  want = 0.5 * np.maximum((v - ret) ** 2, (np.clip(v, v_old - eps, v_old + eps) - ret) ** 2)
  got = obj.ppo_value_loss(*(x.astype(np.float32) for x in (v, v_old, ret)), clip=eps)
  np.testing.assert_allclose(got, want, **TOL)


def test_explained_variance():
  r = rng(17)
  ret = r.normal(size=(3, 6))
  val = ret + 0.5 * r.normal(size=(3, 6))
  mask = span_masks(r, 3, 6)
  valid = mask > 0
  want = 1 - np.var(ret[valid] - val[valid]) / np.var(ret[valid])
  got = obj.explained_variance(val.astype(np.float32), ret.astype(np.float32), mask)
  np.testing.assert_allclose(got, want, **TOL)
  np.testing.assert_allclose(obj.explained_variance(ret, ret, mask), 1.0, **TOL)
  flat = obj.explained_variance(val, np.ones_like(ret), mask)
  assert float(flat) == 0.0


def test_adaptive_kl_coef_by_hand():
  # kl/target − 1 = 0.5 is clipped to 0.2: β = 0.1·(1 + 0.2·256/10000).
  assert obj.adaptive_kl_coef(0.1, 9.0, target=6.0, horizon=10000, n_steps=256) == \
      pytest.approx(0.1 * (1 + 0.2 * 0.0256))
  # Inside the band: e = 5/6 − 1 = −1/6.
  assert obj.adaptive_kl_coef(0.2, 5.0, target=6.0, horizon=1000, n_steps=100) == \
      pytest.approx(0.2 * (1 - 1 / 60))
  # Far below target: clipped to −0.2.
  assert obj.adaptive_kl_coef(0.2, 0.0, target=6.0, horizon=100, n_steps=50) == \
      pytest.approx(0.2 * 0.9)
  assert isinstance(obj.adaptive_kl_coef(0.1, np.float32(6.0), target=6, horizon=1, n_steps=1),
                    float)


# --- GRPO ----------------------------------------------------------------------------


def test_grpo_advantages():
  g = 4
  rewards = np.array([1.0, 0.0, 0.0, 1.0,  # mixed
                      0.1, 0.1, 0.1, 0.1,  # equal, and 0.1 is not exact in binary
                      3.0, -1.0, 2.5, 0.25], np.float32)
  adv = np.asarray(jax.jit(obj.grpo_advantages, static_argnums=1)(rewards, g))
  assert np.isfinite(adv).all()
  np.testing.assert_array_equal(adv[4:8], 0.0)
  np.testing.assert_allclose(adv.reshape(-1, g).sum(-1), 0.0, atol=1e-5)
  r64 = rewards.astype(np.float64).reshape(-1, g)
  want = (r64 - r64.mean(-1, keepdims=True)) / (r64.std(-1, keepdims=True) + 1e-4)
  want[1] = 0.0
  np.testing.assert_allclose(adv, want.reshape(-1), **TOL)
  np.testing.assert_allclose(adv[:4], [1, -1, -1, 1], atol=1e-3)  # std 0.5 → ±0.5/0.5
  with pytest.raises(ValueError, match="group_size=5"):
    obj.grpo_advantages(rewards, 5)
