"""Mixture-of-experts feed-forward: a router sends each token to k of E SwiGLU experts.

The feed-forward of an MoE block (model/layers.py; Mixtral, Qwen3-MoE), which also returns
router statistics for the auxiliary losses. Letters beyond model/__init__.py's: E experts, k experts per token (lower
case: K is the kv heads), M = B*T tokens, A = M*k (token, expert) assignments.

Dropless by default (MegaBlocks, Gale et al. 2023): the assignments are sorted by expert, so
each expert's rows are contiguous, and one `jax.lax.ragged_dot` per weight multiplies every
group by its own expert. No token is dropped and no padding to a capacity is computed. On CPU
with few experts the same sum is computed densely (`expert_impl`).
"""

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from model.config import ModelConfig
from model import sharding
from model.sharding import constrain


class MoEAux(NamedTuple):
  """Router statistics of one forward, over the unmasked tokens."""
  load_balancing_loss: jax.Array  # f32[]: E * sum_i f_i P_i; 1 when perfectly balanced
  z_loss: jax.Array  # f32[]: mean of logsumexp(router logits)^2
  expert_load: jax.Array  # f32[E]: f_i, the fraction of the M*k assignments routed to expert i
  dropped: jax.Array  # int32[]: assignments over their expert's capacity (0 when dropless)

  def loss(self, cfg: ModelConfig) -> jax.Array:
    """What to add to the training loss."""
    return (cfg.router_aux_loss_coef * self.load_balancing_loss
            + cfg.router_z_loss_coef * self.z_loss)


def route(logits_ME, cfg: ModelConfig):
  """(weights f32[M, k], experts int32[M, k]) from f32 router logits [M, E]."""
  k = cfg.n_experts_per_token
  # Mixtral's softmax over the k largest logits equals qwen3_moe with norm_topk_prob.
  if cfg.router == "mixtral":
    top_Mk, experts_Mk = jax.lax.top_k(logits_ME, k)
    return jax.nn.softmax(top_Mk, axis=-1), experts_Mk
  # qwen3_moe: the k largest of the softmax over all experts, optionally renormalised.
  top_Mk, experts_Mk = jax.lax.top_k(jax.nn.softmax(logits_ME, axis=-1), k)
  if cfg.norm_topk_prob:
    top_Mk = top_Mk / jnp.sum(top_Mk, axis=-1, keepdims=True)
  return top_Mk, experts_Mk


def router_stats(logits_ME, experts_A, valid_M, dropped) -> MoEAux:
  """Load-balancing loss (Switch Transformer, Fedus et al. 2021, eq. 4) and router z-loss
  (ST-MoE, Zoph et al. 2022, eq. 5), averaged over the valid tokens only.

  HF Mixtral and Qwen3-MoE divide the counts by tokens, not assignments: their loss is k
  times this one (and pools f and P over layers before the product)."""
  e = logits_ME.shape[-1]
  k = experts_A.shape[0] // logits_ME.shape[0]
  valid_M = valid_M.astype(jnp.float32)
  n = jnp.maximum(jnp.sum(valid_M), 1.0)
  # f_i counts the choices (no gradient); P_i carries the gradient to the router.
  f_E = jnp.bincount(experts_A, weights=jnp.repeat(valid_M, k), length=e) / (n * k)
  p_E = jnp.einsum("M,ME->E", valid_M, jax.nn.softmax(logits_ME, axis=-1)) / n
  z_M = jax.nn.logsumexp(logits_ME, axis=-1)
  return MoEAux(load_balancing_loss=e * jnp.sum(f_E * p_E),
                z_loss=jnp.sum(valid_M * z_M * z_M) / n,
                expert_load=f_E, dropped=dropped)


def expert_impl(cfg: ModelConfig) -> str:
  """How the experts multiply: "ragged" (dropless `ragged_dot` over tokens sorted by expert)
  or "dense" (every expert on every token). model.moe_impl="auto" is dense on CPU for up to
  16 experts, ragged elsewhere; the platform is the mesh's (a step compiled for TPU from a
  CPU host is a TPU step)."""
  if cfg.moe_impl != "auto":
    return cfg.moe_impl
  mesh = sharding.current_mesh()
  platform = mesh.devices.flat[0].platform if mesh is not None else jax.default_backend()
  return "dense" if platform == "cpu" and cfg.n_experts <= 16 else "ragged"


def moe(cfg: ModelConfig, w, x_BTD, token_mask=None):
  """y [B, T, D], aux MoEAux: the mixture-of-experts feed-forward of one block.

  w: {"router" [D, E], "gate" [E, D, F], "up" [E, D, F], "down" [E, F, D]}.
  token_mask: bool[B, T] (False: padding). Masked tokens count in no statistic, take no
  expert capacity, and their output is 0.
  """
  d, e, k, dt = cfg.d_model, cfg.n_experts, cfg.n_experts_per_token, cfg.compute_dtype
  w_gate, w_up, w_down = w["gate"], w["up"], w["down"]
  if e < 1:
    raise ValueError(f"MoE needs model.n_experts >= 1, got {e}")
  b, t, _ = x_BTD.shape
  m = b * t
  valid_M = (jnp.ones((b, t), bool) if token_mask is None
             else token_mask.astype(bool)).reshape(m)
  # The router runs in f32 under bf16 compute too: rounding would flip top-k choices.
  logits_BTE = jnp.einsum("BTD,DE->BTE", x_BTD.astype(jnp.float32),
                          w["router"].astype(jnp.float32))
  logits_ME = constrain(logits_BTE, ("batch", "length", None)).reshape(m, e)
  weights_Mk, experts_Mk = route(logits_ME, cfg)

  # Assignment a = token * k + j is the token's j-th choice. Sort by expert; within an
  # expert, valid tokens first and in token order (capacity keeps the earliest).
  experts_A = experts_Mk.reshape(m * k)
  valid_A = jnp.repeat(valid_M, k)
  order_A = jnp.argsort(experts_A * 2 + ~valid_A, stable=True)
  unsort_A = jnp.argsort(order_A)
  group_sizes_E = jnp.bincount(experts_A, length=e).astype(jnp.int32)

  keep_A = valid_A
  if cfg.capacity_factor > 0:
    # Switch Transformer's capacity: an expert's assignments past C contribute nothing.
    # (The ragged matmuls still compute them; a capacity only bounds an expert-parallel
    # all-to-all's buffers, which this layer does not do yet.)
    capacity = math.ceil(cfg.capacity_factor * m * k / e)
    starts_E = jnp.cumsum(group_sizes_E) - group_sizes_E
    rank_A = (jnp.arange(m * k) - starts_E[experts_A[order_A]])[unsort_A]
    keep_A = valid_A & (rank_A < capacity)
  dropped = jnp.sum(valid_A & ~keep_A).astype(jnp.int32)

  weights_Mk = jnp.where(keep_A.reshape(m, k), weights_Mk, 0.0).astype(dt)
  x_MD = x_BTD.reshape(m, d).astype(dt)
  if expert_impl(cfg) == "dense":
    # Every expert on every token, weighted by the (sparse) routing weights: E / k times the
    # FLOPs, but XLA:CPU runs a ragged_dot ~13x slower than the same FLOPs as one batched
    # matmul (tiny_moe's shapes), so for small E on CPU this is the faster exact form.
    weights_ME = jnp.zeros((m, e), dt).at[jnp.arange(m)[:, None], experts_Mk].add(weights_Mk)
    gate_EMF = jnp.einsum("MD,EDF->EMF", x_MD, w_gate.astype(dt))
    up_EMF = jnp.einsum("MD,EDF->EMF", x_MD, w_up.astype(dt))
    out_EMD = jnp.einsum("EMF,EFD->EMD", jax.nn.silu(gate_EMF) * up_EMF, w_down.astype(dt))
    y_MD = jnp.einsum("EMD,ME->MD", out_EMD, weights_ME)
  else:
    # The sorted assignment axis is left to the partitioner: it mixes tokens of every batch
    # row, and only expert parallelism (an all-to-all) would shard it sensibly.
    x_AD = x_MD[order_A // k]
    gate_AF = jax.lax.ragged_dot(x_AD, w_gate.astype(dt), group_sizes_E)
    up_AF = jax.lax.ragged_dot(x_AD, w_up.astype(dt), group_sizes_E)
    out_AD = jax.lax.ragged_dot(jax.nn.silu(gate_AF) * up_AF, w_down.astype(dt), group_sizes_E)
    out_MkD = out_AD[unsort_A].reshape(m, k, d)
    y_MD = jnp.einsum("MkD,Mk->MD", out_MkD, weights_Mk)
  y_BTD = constrain(y_MD.reshape(b, t, d), ("batch", "length", "act_embed"))
  return y_BTD, router_stats(logits_ME, experts_A, valid_M, dropped)
