"""Next-token cross-entropy over packed sequences, with optional z-loss.

Batch: inputs, targets, segment_ids, positions int32[B, T] and loss_mask float32[B, T]
(0 where the target is padding). The data pipeline shifts targets within each document
before packing, so a target never belongs to another document.
"""

import jax
import jax.numpy as jnp


def token_losses(logits_BTV, targets_BT):
  """(-log p(target), log Z) per position, in f32."""
  logits_BTV = logits_BTV.astype(jnp.float32)
  log_z = jax.nn.logsumexp(logits_BTV, axis=-1)
  target_logit = jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]
  return log_z - target_logit, log_z


def loss_fn(params, batch, *, model, z_loss: float = 0.0):
  """Returns (sum of weighted losses, metrics as sums). The caller divides by `tokens`.

  Sums rather than means, so gradient accumulation divides once by the tokens of the whole
  accumulated batch and k microbatches give exactly the update of one large batch.
  """
  logits, _ = model.apply({"params": params}, batch["inputs"], batch["positions"],
                          segment_ids=batch["segment_ids"])
  nll, log_z = token_losses(logits, batch["targets"])
  mask = batch["loss_mask"].astype(jnp.float32)
  nll_sum = jnp.sum(nll * mask)
  z_sum = jnp.sum(jnp.square(log_z) * mask)
  total = nll_sum + z_loss * z_sum
  # "z_loss" reports mean (log Z)^2 per token whatever its coefficient, to watch logit drift.
  return total, {"loss": nll_sum, "z_loss": z_sum, "tokens": jnp.sum(mask)}
