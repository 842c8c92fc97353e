"""Direct Preference Optimization (Rafailov et al. 2023), with the IPO (Azar et al. 2023) and
hinge variants: the policy's and a frozen reference's sequence log-probabilities of the chosen
and rejected completions (summed over completion tokens; IPO averages per token, TRL's
convention), into train/objectives.py's dpo_loss.

The reference is dpo.reference (default train.init_from), frozen and sharded like the policy;
with LoRA it is the base with adapters off (no second copy). With dpo.precompute_reference its
log-probabilities are computed once, before training, and the reference is dropped.
Batch: pairs (train/posttrain_data.py); the normaliser is the number of real pairs.
"""

import jax
import jax.numpy as jnp
import numpy as np

from infer import workdir as run_dir
from model import Transformer, head, sharding
from train import objectives
from train.config import ConfigError
from train.metrics import StepCost
from train.tasks import Feed, Objective, common, pretrain, sft

REF_KEYS = ("ref_chosen", "ref_rejected")


def pair_logprobs(model, params, batch, *, per_token: bool, chunk: int = head.DEFAULT_CHUNK,
                  with_aux: bool = False):
  """(log pi(chosen | prompt), log pi(rejected | prompt)): f32[B] each, one forward.
  with_aux: ((chosen, rejected), moe.MoEAux or None of that forward)."""
  logp, aux = common.completion_logprobs(model, params, common.pair_tokens(batch), chunk=chunk,
                                         per_token=per_token, with_aux=True)
  pair = tuple(jnp.split(logp, 2))
  return (pair, aux) if with_aux else pair


def loss_fn(params, reference, batch, *, model, beta, kind, label_smoothing, chunk):
  """`reference`: the reference's params, or None when the batch carries its log-probs.

  Returns sums over pairs and "count", the number of real pairs (valid), which train/step.py
  divides them by over the whole accumulated batch. An MoE policy adds its router loss per
  pair (pretrain.moe_terms): the chosen and rejected rows are one forward, whose statistics
  average over both; the frozen reference's forward adds none."""
  per_token = kind == "ipo"
  (pi_c, pi_r), aux = pair_logprobs(model, params, batch, per_token=per_token, chunk=chunk,
                                    with_aux=True)
  if reference is None:
    ref_c, ref_r = batch["ref_chosen"], batch["ref_rejected"]
  else:
    ref_c, ref_r = jax.lax.stop_gradient(
        pair_logprobs(model, reference, batch, per_token=per_token, chunk=chunk))
  losses, rew_c, rew_r = objectives.dpo_loss(pi_c, pi_r, ref_c, ref_r, beta=beta, kind=kind,
                                             label_smoothing=label_smoothing)
  valid = batch["valid"]
  count = jnp.sum(valid)
  total = jnp.sum(losses * valid)
  segment_ids = jnp.concatenate([batch["chosen_segment_ids"], batch["rejected_segment_ids"]])
  router_loss, router_metrics = pretrain.moe_terms(aux, model.cfg, count, segment_ids)
  # "loss" is the preference loss alone, as in pretraining (the router losses log as moe_*).
  return total + router_loss, {
      "loss": total,
      "rewards/chosen": jnp.sum(rew_c * valid),
      "rewards/rejected": jnp.sum(rew_r * valid),
      "rewards/accuracies": jnp.sum((rew_c > rew_r) * valid),
      "rewards/margins": jnp.sum((rew_c - rew_r) * valid),
      "count": count, **router_metrics}


def _settings(cfg):
  d = cfg.dpo
  if d.loss not in objectives.DPO_KINDS:
    raise ConfigError(f"dpo.loss={d.loss!r} is not one of {list(objectives.DPO_KINDS)}")
  if d.beta <= 0:
    raise ConfigError(f"dpo.beta={d.beta} must be > 0")
  if not 0 <= d.label_smoothing < 0.5:
    raise ConfigError(f"dpo.label_smoothing={d.label_smoothing} must be in [0, 0.5)")
  if d.precompute_reference and cfg.lora.rank:
    raise ConfigError("dpo.precompute_reference is for full fine-tuning: with LoRA the "
                      "reference is the base, which is kept anyway")
  if not (d.reference or cfg.train.init_from):
    raise ConfigError("task='dpo' needs a reference: set train.init_from (or dpo.reference)")
  return dict(beta=d.beta, kind=d.loss, label_smoothing=d.label_smoothing,
              chunk=cfg.train.loss_chunk)


def objective(cfg, model_cfg) -> Objective:
  settings = _settings(cfg)
  policy = common.Policy.of(cfg, model_cfg)
  model = Transformer(model_cfg)
  precomputed = cfg.dpo.precompute_reference

  def loss(params, frozen, batch):
    reference = None if precomputed else policy.reference(frozen)
    return loss_fn(policy.params(params, frozen), reference, batch, model=model, **settings)

  init_frozen = None if precomputed else policy.init_frozen_with_reference

  def batch_shapes(b, t):
    shapes = common.pair_batch_shapes(b, t)
    if precomputed:
      shapes.update({k: ((b,), np.float32) for k in REF_KEYS})
    return shapes

  def step_cost(b, t):
    """The policy forward and backward over chosen and rejected rows; the frozen reference
    forward only over the same rows (unless its log-probs were precomputed)."""
    rows = [(model_cfg, 2 * b)]
    return StepCost.of(t, trained=rows, frozen=[] if precomputed else rows)

  return Objective(init=policy.init, loss_fn=loss, batch_shapes=batch_shapes,
                   init_frozen=init_frozen, export=policy.merged if policy.rank else None,
                   start=policy.start, step_cost=step_cost)


def feed(cfg, model_cfg, mesh, run) -> Feed:
  _settings(cfg)
  policy = common.Policy.of(cfg, model_cfg)
  reference = cfg.dpo.reference or cfg.train.init_from
  feed = sft.posttrain_feed(cfg, model_cfg, run, policy, "pairs")
  if not cfg.dpo.precompute_reference:
    feed.load_frozen = lambda shardings: policy.load_frozen(shardings, reference)
    return feed
  train_refs, val_refs = _precompute(cfg, model_cfg, mesh, reference, feed.make, run)
  feed.train = WithReference(feed.train, train_refs)
  val = feed.val
  feed.val = lambda: WithReference(val(), val_refs)
  return feed


def _precompute(cfg, model_cfg, mesh, reference: str, make, run):
  """Scores every train and val pair once with the reference, which is then let go."""
  ref_params = run_dir.load_params(reference, model_cfg, mesh)
  model = Transformer(model_cfg)
  scorer = jax.jit(sharding.in_mesh(
      lambda p, b: pair_logprobs(model, p, b, per_token=cfg.dpo.loss == "ipo",
                                 chunk=cfg.train.loss_chunk), mesh))
  score = lambda batch: jax.device_get(scorer(ref_params, batch))
  return (reference_logprobs(make(run.train_files), score),
          reference_logprobs(make(run.val_files), score))


def reference_logprobs(it, score) -> dict:
  """{example index: (ref log-prob chosen, rejected)} over one pass of a pair iterator."""
  out = {}
  for batch in it:
    ref_c, ref_r = score({k: v for k, v in batch.items() if k != "index"})
    for i, index in enumerate(batch["index"]):
      if index >= 0:
        out[int(index)] = (float(ref_c[i]), float(ref_r[i]))
  it.close()
  return out


class WithReference:
  """Adds the precomputed ref_chosen / ref_rejected of each row to pair batches."""

  def __init__(self, it, refs: dict):
    self.it, self.refs = it, refs

  def __iter__(self):
    return self

  def __next__(self):
    batch = dict(next(self.it))
    rows = [self.refs.get(int(i), (0.0, 0.0)) for i in batch["index"]]  # -1: padding row
    batch["ref_chosen"] = np.array([r[0] for r in rows], np.float32)
    batch["ref_rejected"] = np.array([r[1] for r in rows], np.float32)
    return batch

  def __getattr__(self, name):  # get_state, set_state, close, stats
    return getattr(self.it, name)
