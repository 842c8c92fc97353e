"""The optimizer of a run, from optax: AdamW (or the same with 8-bit moments, train/optim8bit.py),
Adafactor, Lion or Muon; a learning-rate schedule (warmup, then cosine, linear, constant or
warmup-stable-decay); a weight-decay mask; global-norm clipping."""

import jax
import optax
from optax.contrib import MuonDimensionNumbers, muon

from train import optim8bit

OPTIMIZERS = ("adamw", "adamw8bit", "adafactor", "lion", "muon")
DECAYS = ("cosine", "linear", "constant", "wsd")


def learning_rate_schedule(train_cfg) -> optax.Schedule:
  """Linear warmup from 0 to lr, then cosine, linear or constant decay to lr * min_lr_ratio;
  or "wsd" (warmup-stable-decay, Hu et al. 2024, as SmolLM2 was trained): lr held until the
  last `decay_fraction` of the steps, which decay linearly to lr * min_lr_ratio."""
  lr, warmup, steps = train_cfg.lr, train_cfg.warmup_steps, train_cfg.steps
  final = lr * train_cfg.min_lr_ratio
  decay_steps = max(steps - warmup, 1)
  if train_cfg.decay == "cosine":
    decay = optax.cosine_decay_schedule(lr, decay_steps, alpha=train_cfg.min_lr_ratio)
  elif train_cfg.decay == "linear":
    decay = optax.linear_schedule(lr, final, decay_steps)
  elif train_cfg.decay == "constant":
    decay = optax.constant_schedule(lr)
  elif train_cfg.decay == "wsd":
    if not 0 < train_cfg.decay_fraction <= 1:
      raise ValueError(f"train.decay_fraction={train_cfg.decay_fraction} must be in (0, 1]")
    cooldown = max(round(steps * train_cfg.decay_fraction), 1)
    stable = max(decay_steps - cooldown, 0)
    decay = optax.join_schedules([optax.constant_schedule(lr),
                                  optax.linear_schedule(lr, final, cooldown)], [stable])
  else:
    raise ValueError(f"train.decay={train_cfg.decay!r} is not one of {', '.join(DECAYS)}")
  if warmup == 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), decay], [warmup])


def _names(path) -> list[str]:
  """The tree keys on a leaf's path, less the `value` of a logical-axes box (nn.Partitioned:
  train/state.py initializes the optimizer on boxed parameters)."""
  names = [str(getattr(k, "key", getattr(k, "name", ""))) for k in path]
  return names[:-1] if names and names[-1] == "value" else names


def decay_mask(params):
  """Decay weight matrices and embeddings, not norm scales or biases.

  Decided by name, not ndim: scanned layers stack norm scales into [L, D] matrices.
  """
  def keep(path, _):
    return not set(_names(path)) & {"scale", "bias"}
  return jax.tree_util.tree_map_with_path(keep, params)


# Muon orthogonalizes the block matrices as (inputs, outputs) (model/transformer.layer_specs);
# leading axes (layers, experts) are batch axes. Everything else (embedding, head, router,
# norms, biases, adapters) takes Muon's AdamW.
_MUON_AXES = {
    "q": MuonDimensionNumbers(reduction_axis=-3, output_axis=(-2, -1)),  # [D, N, H]
    "k": MuonDimensionNumbers(reduction_axis=-3, output_axis=(-2, -1)),
    "v": MuonDimensionNumbers(reduction_axis=-3, output_axis=(-2, -1)),
    "o": MuonDimensionNumbers(reduction_axis=(-3, -2), output_axis=-1),  # [N, H, D]
    "gate": MuonDimensionNumbers(reduction_axis=-2, output_axis=-1),  # [(E,) D, F]
    "up": MuonDimensionNumbers(reduction_axis=-2, output_axis=-1),
    "down": MuonDimensionNumbers(reduction_axis=-2, output_axis=-1),  # [(E,) F, D]
}


def muon_axes(params):
  """Per leaf: its MuonDimensionNumbers, or None for the leaves AdamW updates."""
  def axes(path, _):
    names = _names(path)
    in_block = "attn" in names or "mlp" in names or "moe" in names
    return _MUON_AXES.get(names[-1]) if in_block else None
  return jax.tree_util.tree_map_with_path(axes, params)


def make_optimizer(train_cfg) -> optax.GradientTransformation:
  schedule = learning_rate_schedule(train_cfg)
  if train_cfg.optimizer_block < 1:
    raise ValueError(f"train.optimizer_block={train_cfg.optimizer_block} must be positive")
  parts = []
  if train_cfg.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(train_cfg.grad_clip))
  wd = train_cfg.weight_decay
  adam = dict(b1=train_cfg.b1, b2=train_cfg.b2, eps=train_cfg.eps, weight_decay=wd,
              mask=decay_mask)
  if train_cfg.optimizer == "adamw":
    parts.append(optax.adamw(schedule, **adam))
  elif train_cfg.optimizer == "adamw8bit":
    parts.append(optim8bit.adamw_8bit(schedule, **adam, block=train_cfg.optimizer_block))
  elif train_cfg.optimizer == "adafactor":
    # Factored second moments, no first moment. The step is lr-sized, not relative to each
    # weight's RMS, and weight decay is scaled by the schedule as AdamW's is (optax's own
    # adds weight_decay_rate * w unscaled).
    parts.append(optax.adafactor(
        schedule, multiply_by_parameter_scale=False, weight_decay_mask=decay_mask,
        weight_decay_rate=(lambda count: wd * schedule(count)) if wd else None))
  elif train_cfg.optimizer == "lion":
    parts.append(optax.lion(schedule, b1=train_cfg.b1, b2=train_cfg.b2, weight_decay=wd,
                            mask=decay_mask))
  elif train_cfg.optimizer == "muon":
    # consistent_rms=0.2 scales Muon's updates to AdamW's RMS (Liu et al. 2025), so one lr
    # serves both the matrices and the AdamW leaves.
    parts.append(muon(schedule, beta=train_cfg.b1, eps=train_cfg.eps, weight_decay=wd,
                      weight_decay_mask=decay_mask, adam_b1=train_cfg.b1,
                      adam_b2=train_cfg.b2, adam_weight_decay=wd,
                      muon_weight_dimension_numbers=muon_axes, consistent_rms=0.2))
  else:
    raise ValueError(f"train.optimizer={train_cfg.optimizer!r} is not one of "
                     f"{', '.join(OPTIMIZERS)}")
  return optax.chain(*parts)
