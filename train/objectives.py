"""Losses and estimators for preference tuning and RL from feedback: pure jnp, no I/O.

Each docstring states its exact form and source. Functions marked "per element" return
unreduced arrays: the task's loss_fn sums them over its mask and the train step divides once
by a normaliser counted over the whole accumulated batch (see train/step.py), so gradient
accumulation never reweights examples. Everything is computed in f32.

Token log-probabilities and entropies come from model/head.py, which scores the hidden
states without holding the full logits; these functions take them per token.

Dimension letters: B batch (sequences, or preference pairs), T completion length,
N sampled completions (P prompts × G samples each, consecutive).

Masks are 0/1 (bool or float), 1 at completion positions that count; prompt and padding
positions are 0 and contribute nothing. Where a function reads "the last valid token" the
mask is taken to be contiguous per row (right padding), which is how rollouts are built.
"""

import jax
import jax.numpy as jnp

DPO_KINDS = ("sigmoid", "ipo", "hinge")
KL_KINDS = ("k1", "k3")


def _f32(x):
  return jnp.asarray(x, jnp.float32)


def _valid(mask):
  return jnp.asarray(mask) > 0


# ---------------------------------------------------------------------------------------
# Masked reductions.


def masked_sum(x, mask, axis=None):
  """Σ x over entries where mask > 0 (mask may be bool or 0/1 float, same shape as x)."""
  return jnp.sum(jnp.where(_valid(mask), _f32(x), 0.0), axis=axis)


def masked_mean(x, mask, axis=None):
  """Mean of x over entries where mask > 0; 0 where there are none (not NaN)."""
  count = jnp.sum(_valid(mask).astype(jnp.float32), axis=axis)
  return masked_sum(x, mask, axis) / jnp.maximum(count, 1.0)


def masked_var(x, mask, axis=None):
  """Population variance (ddof = 0) of x over entries where mask > 0."""
  mean = masked_mean(x, mask, axis)
  if axis is not None:
    mean = jnp.expand_dims(mean, axis)
  return masked_mean(jnp.square(_f32(x) - mean), mask, axis)


def whiten(x, mask, eps=1e-8):
  """(x − mean) / sqrt(var + eps) over the valid entries of the whole array; 0 elsewhere.

  Used on PPO advantages (train/tasks/ppo.py). Population variance, so the whitened valid entries
  have mean 0 and variance var/(var + eps) ≈ 1. TRL's masked_whiten uses the unbiased
  variance instead; the two differ by a factor sqrt(n/(n−1)), negligible at rollout sizes.
  """
  x = _f32(x)
  mean = masked_mean(x, mask)
  var = masked_var(x, mask)
  return jnp.where(_valid(mask), (x - mean) * jax.lax.rsqrt(var + eps), 0.0)


# ---------------------------------------------------------------------------------------
# Reward model and DPO.


def bradley_terry_loss(r_chosen_B, r_rejected_B, margin_B=0.0):
  """−log σ(r_c − r_r − margin) per pair: f32[B].

  Bradley–Terry preference likelihood as in Ouyang et al. 2022 (eq. 1); the margin is
  Llama 2's (Touvron et al. 2023, §3.2.2). log_sigmoid is stable: finite at |Δr| = 100,
  where log(sigmoid(·)) would give log 0 = −inf.
  """
  delta_B = _f32(r_chosen_B) - _f32(r_rejected_B) - _f32(margin_B)
  return -jax.nn.log_sigmoid(delta_B)


def dpo_loss(pi_chosen_B, pi_rejected_B, ref_chosen_B, ref_rejected_B, *, beta,
             kind="sigmoid", label_smoothing=0.0):
  """DPO loss per pair (Rafailov et al. 2023, eq. 7) and its implicit rewards.

  Inputs are sequence log-probs f32[B] of the chosen and rejected completions under the
  policy and the frozen reference. Δ = (π_c − ref_c) − (π_r − ref_r).
    sigmoid: −(1−ε)·log σ(βΔ) − ε·log σ(−βΔ); ε = label_smoothing, the conservative DPO
             of Mitchell 2023 for labels flipped with probability ε (ε = 0 is plain DPO).
    ipo:     (Δ − 1/(2β))², Azar et al. 2023 (IPO). The caller passes per-token AVERAGED
             log-probs (sequence log-prob / completion tokens) for ipo, as TRL does; with
             summed log-probs the fixed target 1/(2β) would depend on length.
    hinge:   relu(1 − βΔ), the SLiC loss (Zhao et al. 2023) on βΔ.
  Returns (losses_B, rewards_chosen_B, rewards_rejected_B), rewards = β(π − ref). The
  rewards are metrics, so they carry no gradient (TRL detaches them too).
  At initialisation (policy = reference) sigmoid gives ln 2 and all rewards are 0.
  """
  if kind not in DPO_KINDS:
    raise ValueError(f"dpo_loss: unknown kind {kind!r}; valid kinds are {DPO_KINDS}")
  chosen_B = _f32(pi_chosen_B) - _f32(ref_chosen_B)
  rejected_B = _f32(pi_rejected_B) - _f32(ref_rejected_B)
  delta_B = chosen_B - rejected_B
  if kind == "sigmoid":
    losses_B = (-(1.0 - label_smoothing) * jax.nn.log_sigmoid(beta * delta_B)
                - label_smoothing * jax.nn.log_sigmoid(-beta * delta_B))
  elif kind == "ipo":
    losses_B = jnp.square(delta_B - 1.0 / (2.0 * beta))
  else:  # hinge
    losses_B = jax.nn.relu(1.0 - beta * delta_B)
  rewards_chosen_B = jax.lax.stop_gradient(beta * chosen_B)
  rewards_rejected_B = jax.lax.stop_gradient(beta * rejected_B)
  return losses_B, rewards_chosen_B, rewards_rejected_B


# ---------------------------------------------------------------------------------------
# PPO (Schulman et al. 2017) for RLHF (Ziegler et al. 2019; Ouyang et al. 2022).


def kl_penalty(logp_BT, ref_logp_BT, kind):
  """Per-token estimate of KL(π ‖ ref) from tokens sampled from π: f32[B, T].

  k1 = log π − log ref: unbiased, but negative on some tokens.
  k3 = (e^ρ − 1) − ρ with ρ = log ref − log π: unbiased and never negative (Schulman 2020,
       "Approximating KL divergence"); the GRPO estimator (Shao et al. 2024, §4.1).
  """
  if kind not in KL_KINDS:
    raise ValueError(f"kl_penalty: unknown kind {kind!r}; valid kinds are {KL_KINDS}")
  logp_BT, ref_logp_BT = _f32(logp_BT), _f32(ref_logp_BT)
  if kind == "k1":
    return logp_BT - ref_logp_BT
  rho_BT = ref_logp_BT - logp_BT
  # expm1 keeps precision near ρ = 0, where policy and reference agree, and rounding can
  # then not push the estimate below 0 (expm1(ρ) ≥ ρ holds after rounding too).
  return jnp.expm1(rho_BT) - rho_BT


def token_rewards(score_B, kl_BT, mask_BT, beta):
  """Per-token rewards r_t = −β·kl_t, plus the sequence's score at its last valid token.

  score_B: f32[B] from the reward model (or rule); kl_BT: f32[B, T] from kl_penalty;
  mask_BT: completion mask, right padded. The score lands on the last position with
  mask > 0 (the EOS); a row with no valid token gets nothing. Returns f32[B, T].
  """
  valid_BT = _valid(mask_BT)
  t = valid_BT.shape[-1]
  r_BT = jnp.where(valid_BT, -beta * _f32(kl_BT), 0.0)
  # Index of the last valid position: argmax finds the first True of the reversed row.
  last_B = t - 1 - jnp.argmax(valid_BT[:, ::-1], axis=-1)
  at_last_BT = (jnp.arange(t)[None, :] == last_B[:, None]) & jnp.any(valid_BT, -1, keepdims=True)
  return r_BT + jnp.where(at_last_BT, _f32(score_B)[:, None], 0.0)


def gae(rewards_BT, values_BT, mask_BT, *, gamma, lam):
  """Generalised advantage estimation (Schulman et al. 2016, eq. 16): (advantages, returns).

  δ_t = r_t + γV_{t+1} − V_t,  A_t = δ_t + γλA_{t+1},  R_t = A_t + V_t,
  with V past the end = 0. A reverse lax.scan over T; a masked step passes the carry
  (V_{t+1}, A_{t+1}) through unchanged and outputs A = 0, so padding after the EOS acts as
  past-the-end and a prompt before the completion is skipped. At masked steps R = V
  (meaningless; callers mask it). Inputs are rollout constants. Returns two f32[B, T].
  """
  rewards_TB = _f32(rewards_BT).T
  values_TB = _f32(values_BT).T
  valid_TB = _valid(mask_BT).T

  def step(carry, x):
    next_value_B, next_adv_B = carry
    r_B, v_B, valid_B = x
    delta_B = r_B + gamma * next_value_B - v_B
    adv_B = delta_B + gamma * lam * next_adv_B
    carry = (jnp.where(valid_B, v_B, next_value_B), jnp.where(valid_B, adv_B, next_adv_B))
    return carry, jnp.where(valid_B, adv_B, 0.0)

  zeros_B = jnp.zeros(rewards_TB.shape[1:], jnp.float32)
  _, adv_TB = jax.lax.scan(step, (zeros_B, zeros_B), (rewards_TB, values_TB, valid_TB),
                           reverse=True)
  adv_BT = adv_TB.T
  return adv_BT, adv_BT + _f32(values_BT)


def ppo_policy_loss(logp_new_BT, logp_old_BT, advantages_BT, *, clip):
  """Clipped surrogate per token (Schulman et al. 2017, eq. 7, negated): (loss, clipped).

  loss = max(−A·ρ, −A·clip(ρ, 1−ε, 1+ε)), ρ = exp(log π_new − log π_old), ε = clip.
  clipped = 1.0 where the clipped term was strictly the larger (its gradient is then 0);
  its masked mean is the clip fraction. Both f32[B, T].
  """
  adv_BT = _f32(advantages_BT)
  ratio_BT = jnp.exp(_f32(logp_new_BT) - _f32(logp_old_BT))
  unclipped_BT = -adv_BT * ratio_BT
  clipped_term_BT = -adv_BT * jnp.clip(ratio_BT, 1.0 - clip, 1.0 + clip)
  loss_BT = jnp.maximum(unclipped_BT, clipped_term_BT)
  return loss_BT, (clipped_term_BT > unclipped_BT).astype(jnp.float32)


def approx_kl(logp_new_BT, logp_old_BT):
  """0.5·(log π_new − log π_old)² per token: the k2 estimate of KL(old ‖ new) for logging."""
  return 0.5 * jnp.square(_f32(logp_new_BT) - _f32(logp_old_BT))


def ppo_value_loss(values_BT, old_values_BT, returns_BT, *, clip):
  """0.5·max((V − R)², (clip(V, V_old − ε, V_old + ε) − R)²) per token: f32[B, T].

  Value clipping as in OpenAI baselines' PPO2 and TRL: the critic may not move more than ε
  from its rollout value in one rollout's updates.
  """
  v_BT, old_BT, r_BT = _f32(values_BT), _f32(old_values_BT), _f32(returns_BT)
  v_clipped_BT = jnp.clip(v_BT, old_BT - clip, old_BT + clip)
  return 0.5 * jnp.maximum(jnp.square(v_BT - r_BT), jnp.square(v_clipped_BT - r_BT))


def explained_variance(values, returns, mask):
  """1 − var(R − V) / var(R) over valid entries: f32 scalar. 1 is a perfect critic.

  Where var(R) = 0 (e.g. every return equal) the ratio is undefined; we report 0 rather
  than NaN so metric averages stay finite.
  """
  values, returns = _f32(values), _f32(returns)
  var_r = masked_var(returns, mask)
  var_res = masked_var(returns - values, mask)
  return jnp.where(var_r > 0, 1.0 - var_res / jnp.where(var_r > 0, var_r, 1.0), 0.0)


def adaptive_kl_coef(beta, kl, *, target, horizon, n_steps):
  """One step of the adaptive KL controller (Ziegler et al. 2019, §2.2); host side.

  e = clip(kl/target − 1, −0.2, 0.2);  β ← β·(1 + e·n_steps/horizon).
  kl is the observed per-sequence KL of the rollout; n_steps the samples it covered.
  Plain Python floats: it runs between steps, never under jit.
  """
  error = min(max(float(kl) / float(target) - 1.0, -0.2), 0.2)
  return float(beta) * (1.0 + error * float(n_steps) / float(horizon))


# ---------------------------------------------------------------------------------------
# GRPO (Shao et al. 2024).


def grpo_advantages(rewards_N, group_size, eps=1e-4):
  """Group-relative advantages (Shao et al. 2024, §4.1.2): f32[N].

  rewards_N: one score per completion; rows g·G .. g·G+G−1 are the G = group_size samples
  of prompt g. A_i = (r_i − mean_group) / (std_group + eps), the same for every token of
  completion i. std is the population one (ddof = 0): the paper does not say, TRL uses
  torch.std (ddof = 1). Ours are sqrt(G/(G−1)) times TRL's (up to eps), a constant that
  acts like a learning-rate scale; and ddof = 0 stays defined at G = 1.
  A group of equal rewards gives exactly 0 (no learning signal), never NaN: the mean of
  equal floats need not round back to them, so that case is set to 0 explicitly.
  """
  rewards_N = _f32(rewards_N)
  n = rewards_N.shape[0]
  if group_size <= 0 or n % group_size:
    raise ValueError(f"grpo_advantages: {n} rewards do not split into groups of "
                     f"group_size={group_size}")
  r_PG = rewards_N.reshape(n // group_size, group_size)
  mean_P1 = jnp.mean(r_PG, axis=-1, keepdims=True)
  std_P1 = jnp.std(r_PG, axis=-1, keepdims=True)
  equal_P1 = jnp.max(r_PG, axis=-1, keepdims=True) == jnp.min(r_PG, axis=-1, keepdims=True)
  adv_PG = jnp.where(equal_P1, 0.0, (r_PG - mean_P1) / (std_P1 + eps))
  return adv_PG.reshape(n)
