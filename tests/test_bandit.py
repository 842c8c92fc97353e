"""The post-training rungs move probability the right way, and their rollout preparation
matches numpy on hand-made rows.

A two-token bandit: after a one-token prompt the policy answers GOOD or BAD (sampled from its
own probabilities of the two); the reward favours GOOD. Over a few PPO or GRPO steps the
policy's probability of GOOD rises, and falls when the reward's sign is flipped.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model import ModelConfig, Transformer, sharding
from train.loop import build_program
from train.tasks import common, grpo, ppo, rl
from tests.test_tasks import small_config

PROMPT, GOOD, BAD = [5], 7, 9
ROWS = 8


def _program(task: str, **overrides):
  cfg = small_config(task, **{"train__lr": 1e-2, "rl__group_size": 4, "rl__epochs": 1,
                              **overrides})
  model_cfg = ModelConfig.from_config(cfg.model)
  prog = build_program(cfg, model_cfg, sharding.make_mesh(1, 1, 1, jax.devices()[:1]))
  return cfg, model_cfg, prog


def _policy_params(task, params):
  return params["policy"] if task == "ppo" else params


def _p_good(model_cfg, params) -> float:
  """P(GOOD | PROMPT) by a plain forward, over the whole vocabulary."""
  tokens = jnp.asarray([PROMPT])
  logits, _ = Transformer(model_cfg).apply({"params": params}, tokens,
                                           jnp.arange(len(PROMPT))[None])
  return float(jax.nn.softmax(logits[0, -1])[GOOD])


def _prepare(task, cfg, model_cfg):
  policy = common.Policy.of(cfg, model_cfg)
  if task == "ppo":
    critic = Transformer(common.value_config(model_cfg))
    fn = lambda p, f, rows, s, kl: ppo.prepare(p, f, rows, s, kl, policy=policy, critic=critic,
                                               cfg=cfg)
  else:
    fn = lambda p, f, rows, s, kl: grpo.prepare(p, f, rows, s, kl, policy=policy, cfg=cfg)
  return jax.jit(fn)


@pytest.mark.parametrize("task", ["ppo", "grpo"])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_bandit_probability_moves_with_the_reward(task, sign):
  cfg, model_cfg, prog = _program(task)
  state = prog.init_state(0)
  start = _policy_params(task, state.params)
  frozen = {"reference": jax.tree.map(jnp.copy, start)}  # the step donates the policy's
  state = state.replace(frozen=frozen)
  prepare = _prepare(task, cfg, model_cfg)
  rng = np.random.default_rng(0)
  p0 = _p_good(model_cfg, start)
  for _ in range(12):
    logits, _ = Transformer(model_cfg).apply({"params": _policy_params(task, state.params)},
                                             jnp.asarray([PROMPT]), jnp.zeros((1, 1), int))
    two = np.asarray(jax.nn.softmax(logits[0, -1, jnp.array([GOOD, BAD])]))
    actions = rng.choice([GOOD, BAD], size=ROWS, p=two / two.sum())
    if len(set(actions)) == 1:  # both answers in every rollout: GRPO's groups need contrast
      actions[0] = GOOD + BAD - actions[0]
    rows = rl.rows_of([PROMPT] * ROWS, [[a] for a in actions], cfg.data.seq_len)
    scores = jnp.asarray(sign * (actions == GOOD), jnp.float32)
    arrays, _ = prepare(state.params, state.frozen, rows, scores, cfg.rl.kl_coef)
    state, _ = prog.train_step(state, {**rows, **arrays})
  p1 = _p_good(model_cfg, _policy_params(task, state.params))
  if sign > 0:
    assert p1 > 2 * p0, (p0, p1)
  else:
    assert p1 < p0 / 2, (p0, p1)


def test_rows_of_by_hand():
  rows = rl.rows_of([[3, 4], [8]], [[5, 6, 7], [9]], seq_len=6)
  np.testing.assert_array_equal(rows["inputs"], [[3, 4, 5, 6, 0, 0], [8, 0, 0, 0, 0, 0]])
  np.testing.assert_array_equal(rows["targets"], [[4, 5, 6, 7, 0, 0], [9, 0, 0, 0, 0, 0]])
  np.testing.assert_array_equal(rows["positions"], [[0, 1, 2, 3, 0, 0], [0, 0, 0, 0, 0, 0]])
  np.testing.assert_array_equal(rows["segment_ids"], [[1, 1, 1, 1, 0, 0], [1, 0, 0, 0, 0, 0]])
  # Completion targets only: 5, 6, 7 (predicted from 4, 5, 6) and 9.
  np.testing.assert_array_equal(rows["mask"], [[0, 1, 1, 1, 0, 0], [1, 0, 0, 0, 0, 0]])
  # Longer than seq_len: cut, the mask with it.
  cut = rl.rows_of([[1, 2]], [[3, 4, 5, 6]], seq_len=4)
  np.testing.assert_array_equal(cut["targets"], [[2, 3, 4, 5]])
  np.testing.assert_array_equal(cut["mask"], [[0, 1, 1, 1]])


def _hand_rows(seq_len):
  """Four completions of two prompts (GRPO groups of 2), of different lengths."""
  prompts = [[3, 4], [3, 4], [11, 12, 13], [11, 12, 13]]
  completions = [[5, 6, 7], [5, 8], [20], [21, 22, 23, 24]]
  return rl.rows_of(prompts, completions, seq_len)


def _logp_numpy(model_cfg, params, rows):
  logits, _ = Transformer(model_cfg).apply(
      {"params": params}, jnp.asarray(rows["inputs"]), jnp.asarray(rows["positions"]),
      segment_ids=jnp.asarray(rows["segment_ids"]))
  logits = np.asarray(logits, np.float64)
  logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  picked = np.take_along_axis(logits, rows["targets"][..., None], -1)[..., 0]
  return (picked - logz) * rows["mask"]


def _two_models(prog, task):
  state = prog.init_state(0)
  other = prog.init_state(1)  # the reference differs from the policy
  return state.params, {"reference": _policy_params(task, other.params)}


def test_grpo_prepare_against_numpy():
  cfg, model_cfg, prog = _program("grpo", rl__group_size=2)
  params, frozen = _two_models(prog, "grpo")
  rows = _hand_rows(cfg.data.seq_len)
  scores = np.array([1.0, 0.0, 0.5, 0.5], np.float32)
  arrays, metrics = _prepare("grpo", cfg, model_cfg)(params, frozen, rows, scores, 0.0)
  mask = rows["mask"]
  logp, ref = _logp_numpy(model_cfg, params, rows), _logp_numpy(model_cfg, frozen["reference"],
                                                                rows)
  np.testing.assert_allclose(arrays["old_logp"], logp, atol=2e-5)
  np.testing.assert_allclose(arrays["ref_logp"], ref, atol=2e-5)
  # (r - mean) / (std + 1e-4) per group of 2: +-0.5 / (0.5 + 1e-4); the equal group gives 0.
  adv = np.array([0.5, -0.5, 0.0, 0.0]) / (0.5 + 1e-4)
  np.testing.assert_allclose(arrays["advantages"], adv[:, None] * mask, atol=1e-6)
  np.testing.assert_allclose(metrics["kl"], np.mean(np.sum((logp - ref) * mask, 1)), atol=1e-4)
  np.testing.assert_allclose(metrics["zero_advantage_groups"], 0.5)


def test_ppo_prepare_against_numpy():
  cfg, model_cfg, prog = _program("ppo", rl__gamma=0.9, rl__lam=0.8)
  params, frozen = _two_models(prog, "ppo")
  rows = _hand_rows(cfg.data.seq_len)
  scores = np.array([1.0, -1.0, 0.25, 2.0], np.float32)
  beta = 0.1
  arrays, _ = _prepare("ppo", cfg, model_cfg)(params, frozen, rows, scores, beta)
  mask = rows["mask"]
  logp = _logp_numpy(model_cfg, params["policy"], rows)
  ref = _logp_numpy(model_cfg, frozen["reference"], rows)
  values, _ = Transformer(common.value_config(model_cfg)).apply(
      {"params": params["value"]}, jnp.asarray(rows["inputs"]), jnp.asarray(rows["positions"]),
      segment_ids=jnp.asarray(rows["segment_ids"]))
  values = np.asarray(values, np.float64) * mask
  np.testing.assert_allclose(arrays["old_values"], values, atol=1e-5)
  # Rewards: -beta * k1 per completion token, the score added at the last one.
  rewards = -beta * (logp - ref) * mask
  for i in range(len(scores)):
    rewards[i, np.nonzero(mask[i])[0][-1]] += scores[i]
  # GAE by a plain backward loop over each row's completion tokens.
  adv = np.zeros_like(rewards)
  for i in range(len(scores)):
    next_v = next_a = 0.0
    for t in reversed(np.nonzero(mask[i])[0]):
      delta = rewards[i, t] + 0.9 * next_v - values[i, t]
      next_a = adv[i, t] = delta + 0.9 * 0.8 * next_a
      next_v = values[i, t]
  returns = (adv + values) * mask
  valid = mask > 0
  whitened = np.where(valid, (adv - adv[valid].mean()) / np.sqrt(adv[valid].var() + 1e-8), 0)
  np.testing.assert_allclose(arrays["returns"], returns, atol=2e-4)
  np.testing.assert_allclose(arrays["advantages"], whitened, atol=2e-4)
  np.testing.assert_allclose(arrays["old_logp"], logp, atol=2e-5)
  np.testing.assert_allclose(arrays["ref_logp"], ref, atol=2e-5)
