"""Supervised fine-tuning: cross-entropy on completion (assistant) tokens only, normalised by
the trainable tokens of the whole accumulated batch (train/step.py), on packed rows.

The batch is pretraining's (inputs, targets, positions, segment_ids, loss_mask) with
loss_mask 1 exactly on completion targets, the final EOS included; so the loss is
pretraining's, applied to the policy's parameters (all of them, or a LoRA-merged base).
"""

import functools

import jax

from train import posttrain_data
from train.tasks import Feed, Objective, common, pretrain


def objective(cfg, model_cfg) -> Objective:
  policy = common.Policy.of(cfg, model_cfg)

  def loss_fn(params, frozen, batch):
    return pretrain.loss_fn(policy.params(params, frozen), None, batch, model=policy.model,
                            z_loss=cfg.train.z_loss, chunk=cfg.train.loss_chunk)

  return Objective(init=policy.init, loss_fn=loss_fn, batch_shapes=pretrain.token_batch_shapes,
                   init_frozen=policy.init_frozen if policy.rank else None,
                   export=policy.merged if policy.rank else None, start=policy.start)


def feed(cfg, model_cfg, mesh, run) -> Feed:
  del mesh
  policy = common.Policy.of(cfg, model_cfg)
  return posttrain_feed(cfg, model_cfg, run, policy, "sft")


def posttrain_feed(cfg, model_cfg, run, policy, kind: str, *, score: bool = True) -> Feed:
  """Train/val batches of `kind` from the run's files, held-out greedy scoring when `score`
  and rl.reward_fn and rl.eval_prompts are set, and the policy's frozen arrays."""
  formatter = posttrain_data.Formatter(run.tokenizer, run.tokenizer_config, cfg.data)
  make = functools.partial(posttrain_data.make_batches, kind, formatter=formatter,
                           data_cfg=cfg.data, batch_size=cfg.train.batch_size, seed=cfg.seed)
  # Train and val: this host's rows only (it reads only its streams' rows). `make` alone
  # gives the whole batches, on every host (DPO's reference pass).
  host = dict(process_index=jax.process_index(), process_count=jax.process_count())
  train = make(run.train_files, shuffle=True, repeat=True, **host)
  make(run.val_files, shuffle=False, repeat=False, **host).close()  # bad val rows fail now
  evaluate = None
  if score and cfg.rl.reward_fn and cfg.rl.eval_prompts:
    evaluate = common.ScoreEval(cfg, model_cfg, formatter, common.eval_prompt_files(cfg),
                                policy.merged)
  return Feed(train=train, val=lambda: make(run.val_files, shuffle=False, repeat=False, **host),
              make=lambda files: make(files, shuffle=False, repeat=False),
              evaluate=evaluate, host_metrics=lambda: _data_metrics(train),
              load_frozen=(lambda shardings: policy.load_frozen(shardings)) if policy.rank
              else None,
              sample_prompt=lambda text: (formatter.prompt({"prompt": text}),
                                          formatter.eos_ids))


def _data_metrics(it) -> dict:
  """Rows truncated, dropped or skipped so far (they would otherwise pass unnoticed)."""
  return {f"data/{k}": float(v) for k, v in it.stats.items() if k != "rows"}
