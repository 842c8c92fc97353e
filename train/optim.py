"""AdamW with warmup then decay, a weight-decay mask, and global-norm clipping (optax); or the
same with 8-bit moments (train.optimizer=adamw8bit, train/optim8bit.py)."""

import jax
import optax

from train import optim8bit

OPTIMIZERS = ("adamw", "adamw8bit")


def learning_rate_schedule(train_cfg) -> optax.Schedule:
  """Linear warmup from 0 to lr, then cosine, linear or constant decay to lr * min_lr_ratio."""
  lr, warmup, steps = train_cfg.lr, train_cfg.warmup_steps, train_cfg.steps
  final = lr * train_cfg.min_lr_ratio
  decay_steps = max(steps - warmup, 1)
  if train_cfg.decay == "cosine":
    decay = optax.cosine_decay_schedule(lr, decay_steps, alpha=train_cfg.min_lr_ratio)
  elif train_cfg.decay == "linear":
    decay = optax.linear_schedule(lr, final, decay_steps)
  elif train_cfg.decay == "constant":
    decay = optax.constant_schedule(lr)
  else:
    raise ValueError(f"train.decay={train_cfg.decay!r} is not one of cosine, linear, constant")
  if warmup == 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), decay], [warmup])


def decay_mask(params):
  """Decay weight matrices and embeddings, not norm scales or biases.

  Decided by name, not ndim: scanned layers stack norm scales into [L, D] matrices.
  """
  def keep(path, _):
    names = {str(getattr(k, "key", getattr(k, "name", ""))) for k in path}
    return not names & {"scale", "bias"}
  return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(train_cfg) -> optax.GradientTransformation:
  schedule = learning_rate_schedule(train_cfg)
  if train_cfg.optimizer_block < 1:
    raise ValueError(f"train.optimizer_block={train_cfg.optimizer_block} must be positive")
  parts = []
  if train_cfg.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(train_cfg.grad_clip))
  adam = dict(b1=train_cfg.b1, b2=train_cfg.b2, eps=train_cfg.eps,
              weight_decay=train_cfg.weight_decay, mask=decay_mask)
  if train_cfg.optimizer == "adamw":
    parts.append(optax.adamw(schedule, **adam))
  elif train_cfg.optimizer == "adamw8bit":
    parts.append(optim8bit.adamw_8bit(schedule, **adam, block=train_cfg.optimizer_block))
  else:
    raise ValueError(f"train.optimizer={train_cfg.optimizer!r} is not one of "
                     f"{', '.join(OPTIMIZERS)}")
  return optax.chain(*parts)
