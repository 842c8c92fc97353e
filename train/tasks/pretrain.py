"""Next-token cross-entropy over packed sequences, with optional z-loss.

Batch: inputs, targets, segment_ids, positions int32[B, T] and loss_mask float32[B, T]
(0 where the target is padding). The data pipeline shifts targets within each document
before packing, so a target never belongs to another document. SFT uses the same loss with
loss_mask 1 on completion tokens only.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from infer.files import document_ids
from model import Transformer, head, transformer
from train import data as data_lib
from train.tasks import Feed, Objective


def forward(model: Transformer, params, batch, **kwargs):
  """(the module's output [B, T, ...]: logits, a value model's values, or with
  return_hidden=True the final-normed hidden states; moe.MoEAux or None for a dense model).

  The one place a task runs a Transformer on batch["inputs"], ["positions"] and
  ["segment_ids"]. It calls the module's pure forward (model/transformer.py) on the tree:
  that returns an MoE's router statistics directly, and takes weights the module's
  declarations would refuse by shape (LoRA adapters attached unmerged, quantized bases). A
  caller that trains nothing (a rollout's scorer, a reference) may ignore the statistics."""
  out, _, aux = transformer.forward(model.cfg, params, batch["inputs"], batch["positions"],
                                    batch["segment_ids"], **kwargs)
  return out, aux


def hidden_states(model: Transformer, params, batch):
  """(final-normed hidden states [B, T, D], moe.MoEAux or None for a dense model)."""
  return forward(model, params, batch, return_hidden=True)


def score_targets(model: Transformer, params, batch, *, chunk: int = head.DEFAULT_CHUNK,
                  temperature: float = 1.0, entropy: bool = False,
                  with_aux: bool = False) -> head.TokenScores:
  """The model's scores of batch["targets"] (log p, log Z, entropy: f32[B, T]) from its
  hidden states, chunk tokens of logits at a time (model/head.py): the full f32 [B, T, V]
  logits are never held, nor their gradient. with_aux: (scores, moe.MoEAux or None)."""
  hidden, aux = hidden_states(model, params, batch)
  scores = head.token_scores(hidden, params, model.cfg, batch["targets"],
                             temperature=temperature, chunk=chunk, entropy=entropy)
  return (scores, aux) if with_aux else scores


def moe_terms(aux, cfg, count, segment_ids, *, weight=1.0, prefix: str = "moe"):
  """(router loss to add, metric sums) of one forward's router statistics; (0.0, {}) for a
  dense model (aux None), so a dense objective is unchanged.

  count: the normaliser of the objective's sums, which train/step.py divides by (summed over
  the accumulated batch): tokens in pretraining and SFT, pairs in DPO and reward modelling,
  completion tokens or sequences in PPO and GRPO. aux.loss is already a mean over the
  forward's tokens, so aux.loss(cfg) * count makes the step's loss "mean objective +
  aux.loss" in every objective, the balance pretraining has, and the metrics log as means.
  weight: a further factor on the loss only (PPO's critic: rl.vf_coef, as its value loss).
  segment_ids: the forward's [B, T] (0: padding, which no expert sees), for the dropped
  fraction. prefix: of the metric names ("value_moe" for PPO's critic)."""
  if aux is None:
    return 0.0, {}
  e = cfg.n_experts
  routed = jnp.maximum(jnp.sum(segment_ids != 0), 1).astype(jnp.float32)
  metrics = {"aux_loss": aux.load_balancing_loss, "z_loss": aux.z_loss,
             # Load of the busiest and idlest expert, in units of a balanced share 1 / E.
             "load_max": jnp.max(aux.expert_load) * e,
             "load_min": jnp.min(aux.expert_load) * e,
             # Assignments over capacity (summed over layers) per routed token, layer and
             # choice: the fraction dropped (0 when dropless).
             "dropped_frac": aux.dropped / (routed * cfg.n_layers * cfg.n_experts_per_token)}
  metrics = {f"{prefix}_{k}": v * count for k, v in metrics.items()}
  return weight * aux.loss(cfg) * count, metrics


def loss_fn(params, frozen, batch, *, model, z_loss: float = 0.0,
            chunk: int = head.DEFAULT_CHUNK):
  """Returns (sum of weighted losses, metrics as sums). The caller divides by `count`.

  Sums rather than means, so gradient accumulation divides once by the tokens of the whole
  accumulated batch and k microbatches give exactly the update of one large batch.
  chunk: train.loss_chunk, tokens of logits held at once.
  """
  del frozen
  scores, aux = score_targets(model, params, batch, chunk=chunk, with_aux=True)
  mask = batch["loss_mask"].astype(jnp.float32)
  count = jnp.sum(mask)
  nll_sum = -jnp.sum(scores.logp * mask)
  z_sum = jnp.sum(jnp.square(scores.log_z) * mask)
  router_loss, router_metrics = moe_terms(aux, model.cfg, count, batch["segment_ids"])
  total = nll_sum + z_loss * z_sum + router_loss
  # "z_loss" reports mean (log Z)^2 per token whatever its coefficient, to watch logit drift;
  # "loss" is the next-token loss alone (the router losses log as moe_*).
  return total, {"loss": nll_sum, "z_loss": z_sum, "count": count, **router_metrics}


def init_model(model: Transformer, rng):
  """Boxed parameters of `model` (the shapes do not depend on the sequence length)."""
  tokens = jnp.zeros((1, 1), jnp.int32)
  return model.init(rng, tokens, tokens)["params"]


def token_batch_shapes(batch_size: int, seq_len: int) -> dict:
  shape = (batch_size, seq_len)
  return {"inputs": (shape, np.int32), "targets": (shape, np.int32),
          "segment_ids": (shape, np.int32), "positions": (shape, np.int32),
          "loss_mask": (shape, np.float32)}


def objective(cfg, model_cfg) -> Objective:
  model = Transformer(model_cfg)
  return Objective(init=functools.partial(init_model, model),
                   loss_fn=functools.partial(loss_fn, model=model, z_loss=cfg.train.z_loss,
                                             chunk=cfg.train.loss_chunk),
                   batch_shapes=token_batch_shapes)


def feed(cfg, model_cfg, mesh, run) -> Feed:
  del model_cfg, mesh
  # This host's rows only: it reads and tokenizes only the files of its data streams.
  make = functools.partial(data_lib.make_iterator, cfg.data, run.tokenizer,
                           batch_size=cfg.train.batch_size, seq_len=cfg.data.seq_len,
                           seed=cfg.seed, process_index=jax.process_index(),
                           process_count=jax.process_count(),
                           tokenizer_config=run.tokenizer_config)
  make(run.val_files, shuffle=False, repeat=True).close()  # its first batch checks the val files
  bos, eos = document_ids(run.tokenizer, run.tokenizer_config)

  def sample_prompt(text):  # begun as a document is
    ids = run.tokenizer.encode(text, add_special_tokens=False).ids
    return ([] if bos is None else [bos]) + ids, (eos,)

  return Feed(train=make(run.train_files, shuffle=True, repeat=True),
              val=lambda: make(run.val_files, shuffle=False, repeat=True),
              sample_prompt=sample_prompt)
