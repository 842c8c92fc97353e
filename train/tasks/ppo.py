"""PPO for RLHF (Ouyang et al. 2022; Schulman et al. 2017), in the form below.

Trained: {"policy": the policy (every weight, or LoRA adapters), "value": a critic, a copy of
the model with a scalar head, started from rl.value_init / rl.reward_model or from the
policy's backbone}. Frozen: the reference (train.init_from; with LoRA the base itself).
Per token: r_t = -beta kl_t (k1 or k3) plus the score at the last completion token; GAE(gamma,
lambda) by a reverse scan; advantages whitened over valid tokens; the clipped policy loss
plus rl.vf_coef times the clipped value loss, normalised by the minibatch's completion tokens.
"""

import jax
import jax.numpy as jnp

from model import Transformer, sharding
from train import objectives, posttrain_data
from train.metrics import StepCost
from train.tasks import Feed, Objective, common, pretrain, reward, rl

EXTRA = ("old_logp", "ref_logp", "old_values", "advantages", "returns")


def loss_fn(params, frozen, batch, *, policy, critic, cfg):
  """Sums over completion tokens and "count", their number (mask), which train/step.py
  divides them by over the whole accumulated batch. An MoE policy and critic each add their
  router loss per completion token (pretrain.moe_terms); the critic's is weighted by
  rl.vf_coef like its value loss, so against its own objective it weighs what it weighs in
  pretraining (the critic's weights get gradients from nothing else)."""
  r = cfg.rl
  mask = batch["mask"]
  count = jnp.sum(mask)
  scores, policy_aux = pretrain.score_targets(
      policy.model, policy.params(params["policy"], frozen), batch, chunk=cfg.train.loss_chunk,
      temperature=r.temperature, entropy=True, with_aux=True)
  logp = scores.logp
  pg, clipped = objectives.ppo_policy_loss(logp, batch["old_logp"], batch["advantages"],
                                           clip=r.clip)
  values, value_aux = pretrain.forward(critic, params["value"], batch)
  vf = objectives.ppo_value_loss(values, batch["old_values"], batch["returns"],
                                 clip=r.value_clip)
  total_pg, total_vf = jnp.sum(pg * mask), jnp.sum(vf * mask)
  total = total_pg + r.vf_coef * total_vf
  policy_router, policy_metrics = pretrain.moe_terms(policy_aux, policy.model_cfg, count,
                                                     batch["segment_ids"])
  value_router, value_metrics = pretrain.moe_terms(value_aux, critic.cfg, count,
                                                   batch["segment_ids"], weight=r.vf_coef,
                                                   prefix="value_moe")
  # "loss" is PPO's alone (the router losses log as moe_* and value_moe_*).
  return total + policy_router + value_router, {
      "loss": total, "policy_loss": total_pg, "value_loss": total_vf,
      "clip_fraction": jnp.sum(clipped * mask),
      "approx_kl": jnp.sum(objectives.approx_kl(logp, batch["old_logp"]) * mask),
      "entropy": jnp.sum(scores.entropy * mask),
      "count": count, **policy_metrics, **value_metrics}


def prepare(params, frozen, rows, scores, kl_coef, *, policy, critic, cfg):
  """Old and reference log-probs, old values, token rewards, GAE and whitened advantages."""
  r = cfg.rl
  mask = rows["mask"]
  score = lambda p: rl.trainer_logprobs(policy.model, p, rows, r.temperature,
                                        chunk=cfg.train.loss_chunk)
  logp, entropy = score(policy.params(params["policy"], frozen))
  ref_logp, _ = score(policy.reference(frozen))
  values, _ = pretrain.forward(critic, params["value"], rows)
  values = values * mask
  kl = objectives.kl_penalty(logp, ref_logp, r.kl_estimator) * mask
  rewards = objectives.token_rewards(scores, kl, mask, kl_coef)
  advantages, returns = objectives.gae(rewards, values, mask, gamma=r.gamma, lam=r.lam)
  arrays = {"old_logp": logp * mask, "ref_logp": ref_logp * mask, "old_values": values,
            "advantages": objectives.whiten(advantages, mask), "returns": returns * mask}
  metrics = {"kl": rl.sequence_kl(logp, ref_logp, mask),
             "rollout_entropy": objectives.masked_mean(entropy, mask),
             "explained_variance": objectives.explained_variance(values, returns, mask),
             "mean_return": objectives.masked_mean(returns, mask)}
  return arrays, metrics


def _models(cfg, model_cfg):
  policy = common.Policy.of(cfg, model_cfg)
  return policy, Transformer(common.value_config(model_cfg))


def objective(cfg, model_cfg) -> Objective:
  policy, critic = _models(cfg, model_cfg)

  def init(rng):
    return {"policy": policy.init(rng), "value": pretrain.init_model(critic, rng)}

  def start(params, frozen):
    value_source = cfg.rl.value_init or cfg.rl.reward_model or cfg.train.init_from
    return {"policy": policy.start(params["policy"], frozen),
            "value": reward.backbone_from(value_source, critic.cfg, params["value"])}

  return Objective(
      init=init, init_frozen=policy.init_frozen_with_reference, start=start,
      loss_fn=lambda params, frozen, batch: loss_fn(params, frozen, batch, policy=policy,
                                                    critic=critic, cfg=cfg),
      batch_shapes=lambda b, t: rl.rollout_shapes(b, t, EXTRA),
      export=lambda params, frozen: policy.merged(params["policy"], frozen),
      # The policy and the critic, each forward and backward over the rows.
      step_cost=lambda b, t: StepCost.of(t, trained=[(model_cfg, b), (critic.cfg, b)]))


def feed(cfg, model_cfg, mesh, run) -> Feed:
  rl.check(cfg, 1)
  policy, critic = _models(cfg, model_cfg)
  formatter = posttrain_data.Formatter(run.tokenizer, run.tokenizer_config, cfg.data)
  prep = jax.jit(sharding.in_mesh(lambda params, frozen, rows, scores, kl_coef: prepare(
      params, frozen, rows, scores, kl_coef, policy=policy, critic=critic, cfg=cfg), mesh))
  to_policy = lambda params, frozen: policy.merged(params["policy"], frozen)
  rollouts = rl.Rollouts(cfg, model_cfg, run, formatter, rl.Scorer(cfg, run.tokenizer, mesh),
                         to_policy, prep, group_size=1)
  return rl.feed(cfg, model_cfg, run, formatter, rollouts, to_policy,
                 load_frozen=lambda shardings: policy.load_frozen(shardings,
                                                                  cfg.train.init_from))

