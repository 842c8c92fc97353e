"""Reward model: a scalar head on the language model's backbone, read at the last real token
of prompt + completion, trained with the Bradley-Terry loss -log sigmoid(r_c - r_r - margin)
(Ouyang et al. 2022, eq. 1). Starts from train.init_from's backbone with a fresh head; with
LoRA the backbone gets adapters and the head is trained in full.

Batch: pairs (train/posttrain_data.py): chosen_* and rejected_* rows [B, T], margin and
valid [B]. The normaliser is the number of real pairs.
"""

import functools

import jax.numpy as jnp

from infer import workdir as run_dir
from model import Transformer, lora, quant
from train import objectives
from train.metrics import StepCost
from train.config import ConfigError
from train.tasks import Feed, Objective, common, pretrain, sft


def scores(model, params, batch, *, with_aux: bool = False):
  """(r_chosen, r_rejected): f32[B] each, the value at each row's last real token, from one
  forward over both. with_aux: ((r_chosen, r_rejected), moe.MoEAux or None)."""
  tokens = common.pair_tokens(batch)
  values, aux = pretrain.forward(model, params, tokens)
  pair = tuple(jnp.split(common.scores_at_last(values, tokens["segment_ids"]), 2))
  return (pair, aux) if with_aux else pair


def loss_fn(params, batch, *, model):
  """Sums over pairs and "count", the number of real pairs (valid), which train/step.py
  divides them by. An MoE scorer adds its router loss per pair (pretrain.moe_terms), from the
  one forward over the chosen and rejected rows."""
  (r_c, r_r), aux = scores(model, params, batch, with_aux=True)
  valid = batch["valid"]
  count = jnp.sum(valid)
  loss = jnp.sum(objectives.bradley_terry_loss(r_c, r_r, batch["margin"]) * valid)
  segment_ids = jnp.concatenate([batch["chosen_segment_ids"], batch["rejected_segment_ids"]])
  router_loss, router_metrics = pretrain.moe_terms(aux, model.cfg, count, segment_ids)
  # "loss" is the Bradley-Terry loss alone (the router losses log as moe_*).
  return loss + router_loss, {"loss": loss, "accuracy": jnp.sum((r_c > r_r) * valid),
                              "margin": jnp.sum((r_c - r_r) * valid), "count": count,
                              **router_metrics}


def _check(model_cfg):
  if not model_cfg.value_head:
    raise ConfigError("task='reward' trains a scalar head: set model.value_head=True")


def objective(cfg, model_cfg) -> Objective:
  _check(model_cfg)
  policy = common.Policy.of(cfg, model_cfg)
  model = Transformer(model_cfg)
  init_model = lambda rng: pretrain.init_model(model, rng)
  # One forward and backward over the chosen and the rejected rows.
  step_cost = lambda b, t: StepCost.of(t, trained=[(model_cfg, 2 * b)])

  if not policy.rank:
    def start(params, frozen):
      del frozen
      if not cfg.train.init_from:
        return params
      return backbone_from(cfg.train.init_from, model_cfg, params)

    return Objective(init=init_model,
                     loss_fn=lambda params, frozen, batch: loss_fn(params, batch, model=model),
                     batch_shapes=common.pair_batch_shapes, start=start, step_cost=step_cost)

  def init(rng):
    params = init_model(rng)
    adapters = lora.init_adapters(params, targets=policy.targets, rank=policy.rank, rng=rng)
    return {"adapters": adapters, "value_head": params["value_head"]}

  def init_frozen(rng):
    return {"base": policy.frozen_base(_backbone(model, rng))}

  def to_params(params, frozen, combine=lora.attach):
    # attach: unmerged, for the step; merge: plain weights, for export.
    base = combine(frozen["base"], params["adapters"], rank=policy.rank, alpha=policy.alpha)
    return {**base, "value_head": params["value_head"]}

  return Objective(
      init=init, init_frozen=init_frozen,
      export=lambda params, frozen: quant.dequantize_params(to_params(params, frozen,
                                                                      lora.merge)),
      start=lambda p, f: p,
      loss_fn=lambda params, frozen, batch: loss_fn(to_params(params, frozen), batch,
                                                    model=model),
      batch_shapes=common.pair_batch_shapes, step_cost=step_cost)


def _backbone(model, rng):
  """LoRA's frozen base of a reward model, boxed: the model without its value head."""
  return {k: v for k, v in pretrain.init_model(model, rng).items() if k != "value_head"}


def backbone_from(workdir: str, model_cfg, value_params):
  """`value_params` with the backbone of a run: a language model's (its LM head dropped,
  the head of `value_params` kept) or a reward model's (taken whole)."""
  shardings = common.shardings_of(value_params)
  if run_dir.load_model_config(workdir).value_head:
    return run_dir.load_params(workdir, model_cfg, shardings=shardings)
  return common.value_from_lm(_load_lm(workdir, model_cfg, shardings), value_params)


def _load_lm(workdir: str, model_cfg, shardings):
  """A language model's params, placed like `shardings` where the trees share keys."""
  lm_cfg = common.lm_config(model_cfg)
  abstract, rule_shardings = run_dir.abstract_params(lm_cfg)
  return run_dir.load_params(workdir, lm_cfg, shardings={
      k: shardings.get(k, rule_shardings[k]) for k in abstract})


def feed(cfg, model_cfg, mesh, run) -> Feed:
  del mesh
  _check(model_cfg)
  policy = common.Policy.of(cfg, model_cfg)
  # Judged by held-out pair accuracy (val_accuracy); it generates nothing.
  feed = sft.posttrain_feed(cfg, model_cfg, run, policy, "pairs", score=False)
  feed.sample_prompt = None
  if policy.rank:
    def load(shardings):
      lm = _load_lm(cfg.train.init_from, model_cfg, shardings)
      return {k: v for k, v in lm.items() if k in shardings}

    def load_frozen(shardings):
      init_base = functools.partial(_backbone, Transformer(model_cfg))
      return {"base": policy.load_base(shardings["base"], init_base, load)}
    feed.load_frozen = load_frozen
  return feed
