"""GRPO (Shao et al. 2024, DeepSeekMath Sec. 4.1): rl.group_size completions per prompt,
group-relative advantages (r - mean) / (std + 1e-4) for every token of a completion, the PPO
clipped loss with no critic, and a k3 KL to the frozen reference in the loss with
coefficient rl.kl_coef.

Aggregation (rl.loss_agg): "grpo" averages each sequence's tokens, then the sequences (the
paper's); "bnpo" averages all completion tokens of the batch. The normaliser is sequences or
tokens accordingly, so accumulation does not change the result.
"""

import jax
import jax.numpy as jnp

from model import sharding
from train import objectives, posttrain_data
from train.config import ConfigError
from train.tasks import Feed, Objective, common, pretrain, rl

EXTRA = ("old_logp", "ref_logp", "advantages")
AGGREGATIONS = ("grpo", "bnpo")


def loss_fn(params, frozen, batch, *, policy, cfg):
  """Sums and "count", which train/step.py divides them by over the whole accumulated batch:
  the number of sequences ("grpo": each sums its token mean) or of completion tokens
  ("bnpo"). An MoE policy adds its router loss per sequence or per token accordingly
  (pretrain.moe_terms)."""
  r = cfg.rl
  mask = batch["mask"]
  scores, aux = pretrain.score_targets(policy.model, policy.params(params, frozen), batch,
                                       chunk=cfg.train.loss_chunk, temperature=r.temperature,
                                       entropy=True, with_aux=True)
  logp = scores.logp
  pg, clipped = objectives.ppo_policy_loss(logp, batch["old_logp"], batch["advantages"],
                                           clip=r.clip)
  kl = objectives.kl_penalty(logp, batch["ref_logp"], "k3")
  # "kl_penalty": the k3 term the loss holds; the rollout's "kl" is the per-sequence k1 sum.
  per_token = {"loss": pg + r.kl_coef * kl, "policy_loss": pg, "kl_penalty": kl,
               "clip_fraction": clipped,
               "approx_kl": objectives.approx_kl(logp, batch["old_logp"]),
               "entropy": scores.entropy}
  if r.loss_agg == "grpo":  # token mean per sequence, summed over sequences
    lengths = jnp.sum(mask, axis=1)
    weight = mask / jnp.maximum(lengths, 1.0)[:, None]
    count = jnp.sum(lengths > 0)
  else:  # token sum over the batch
    weight, count = mask, jnp.sum(mask)
  count = count.astype(jnp.float32)
  sums = {k: jnp.sum(v * weight) for k, v in per_token.items()}
  router_loss, router_metrics = pretrain.moe_terms(aux, policy.model_cfg, count,
                                                   batch["segment_ids"])
  # "loss" is GRPO's alone (the router losses log as moe_*).
  return sums["loss"] + router_loss, {**sums, "count": count, **router_metrics}


def prepare(params, frozen, rows, scores, kl_coef, *, policy, cfg):
  """Old and reference log-probs and group-relative advantages for every completion token."""
  del kl_coef  # GRPO's KL is in the loss, not in the reward
  r = cfg.rl
  mask = rows["mask"]
  score = lambda p: rl.trainer_logprobs(policy.model, p, rows, r.temperature,
                                        chunk=cfg.train.loss_chunk)
  logp, entropy = score(policy.params(params, frozen))
  ref_logp, _ = score(policy.reference(frozen))
  adv = objectives.grpo_advantages(scores, r.group_size)
  arrays = {"old_logp": logp * mask, "ref_logp": ref_logp * mask,
            "advantages": adv[:, None] * mask}
  metrics = {"kl": rl.sequence_kl(logp, ref_logp, mask),
             "rollout_entropy": objectives.masked_mean(entropy, mask),
             "zero_advantage_groups": jnp.mean(jnp.all(
                 adv.reshape(-1, r.group_size) == 0, axis=1))}
  return arrays, metrics


def _check(cfg):
  if cfg.rl.loss_agg not in AGGREGATIONS:
    raise ConfigError(f"rl.loss_agg={cfg.rl.loss_agg!r} is not one of {list(AGGREGATIONS)}")
  if cfg.rl.group_size < 2:
    raise ConfigError(f"rl.group_size={cfg.rl.group_size}: GRPO compares at least 2 "
                      "completions per prompt")


def objective(cfg, model_cfg) -> Objective:
  _check(cfg)
  policy = common.Policy.of(cfg, model_cfg)

  return Objective(
      init=policy.init, init_frozen=policy.init_frozen_with_reference,
      start=policy.start,
      loss_fn=lambda params, frozen, batch: loss_fn(params, frozen, batch, policy=policy,
                                                    cfg=cfg),
      batch_shapes=lambda b, t: rl.rollout_shapes(b, t, EXTRA),
      export=policy.merged if policy.rank else None)


def feed(cfg, model_cfg, mesh, run) -> Feed:
  _check(cfg)
  rl.check(cfg, cfg.rl.group_size)
  policy = common.Policy.of(cfg, model_cfg)
  formatter = posttrain_data.Formatter(run.tokenizer, run.tokenizer_config, cfg.data)
  prep = jax.jit(sharding.in_mesh(lambda params, frozen, rows, scores, kl_coef: prepare(
      params, frozen, rows, scores, kl_coef, policy=policy, cfg=cfg), mesh))
  rollouts = rl.Rollouts(cfg, model_cfg, run, formatter, rl.Scorer(cfg, run.tokenizer, mesh),
                         policy.merged, prep, group_size=cfg.rl.group_size)
  return rl.feed(cfg, model_cfg, run, formatter, rollouts, policy.merged,
                 load_frozen=lambda shardings: policy.load_frozen(shardings,
                                                                  cfg.train.init_from))


