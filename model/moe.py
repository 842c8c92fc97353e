"""Mixture-of-experts feed-forward: a router sends each token to k of E SwiGLU experts.

The feed-forward of an MoE block (model/layers.py; Mixtral, Qwen3-MoE), which also returns
router statistics for the auxiliary losses. Letters beyond model/__init__.py's: E experts, k experts per token (lower
case: K is the kv heads), M = B*T tokens, A = M*k (token, expert) assignments.

Dropless by default (MegaBlocks, Gale et al. 2023): the assignments are sorted by expert, so
each expert's rows are contiguous, and one grouped matmul per weight multiplies every group by
its own expert (pallas_kernels/grouped_matmul.py: JAX's megablox kernels on TPU, ours on GPU,
`jax.lax.ragged_dot` elsewhere). No token is dropped and no padding to a capacity is computed.
On CPU with few experts the same sum is computed densely (`expert_impl`).

Expert parallelism (a mesh with expert > 1, model/sharding.py): each device of the expert axis
holds E / ep experts (ep = mesh.expert), and the batch is split over the expert axis too. The
router, top-k, capacity and statistics run on the global tokens as above (GSPMD partitions
them); only the experts run per device (`_expert_parallel`): the ep devices of an expert
group all-gather their tokens and routes, each multiplies the gathered tokens routed to its
own experts, and a reduce-scatter sums each token's expert outputs back onto the device that
holds it. The result is exact and dropless for any routing; its cost, per layer and device,
against the all-to-all that sends each token only to its k experts' devices:
  traffic   an all-gather and a reduce-scatter of [ep * tokens per device, D] in the compute
            dtype (each moves (ep - 1) / ep of it), as many again in the backward pass: about
            ep / k times an all-to-all's, so a fair trade while ep is near k, poor for ep >> k;
  memory    the gathered tokens, and under "gmm" and "ragged" their ep * tokens * k
            assignments, are ep times one device's: the expert activations scale with the
            group, not the shard;
  compute   "dense": E / ep experts on ep times the tokens, the one-device FLOPs; "gmm" and
            "ragged": a grouped matmul over all gathered assignments, of which this device's
            groups cover 1 / ep on average (the rows after them come out 0: the kernels skip
            their matmuls; how much of them XLA's ragged_dot still reads depends on the
            backend).
`jax.lax.ragged_all_to_all` would send each assignment only where its expert lives, but
XLA:CPU cannot run it (jax 0.10.2), so the all-gather form is the one tested here.
"""

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from model.capture import Capture, Captured
from model.config import ModelConfig
from model import sharding
from model.sharding import constrain
from pallas_kernels.grouped_matmul import grouped_matmul


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


def router_logits(x_BTD, router_DE):
  """f32 logits [B, T, E]. The router runs in f32 under bf16 compute too: rounding would flip
  top-k choices."""
  return jnp.einsum("BTD,DE->BTE", x_BTD.astype(jnp.float32), router_DE.astype(jnp.float32))


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


def expert_impl(cfg: ModelConfig, platform: str | None = None) -> str:
  """How the experts multiply, over tokens sorted by expert: "gmm" (the platform's
  grouped-matmul kernel where it is compile-tested, else ragged_dot) or "ragged" (XLA's
  ragged_dot, which XLA:GPU expands to all E experts and XLA:TPU differentiates densely); or
  "dense" (every expert on every token). model.moe_impl="auto" is dense on CPU for up to 16
  experts, gmm elsewhere; the platform, unless given, is the mesh's (a step compiled for TPU
  from a CPU host is a TPU step)."""
  if cfg.moe_impl != "auto":
    return cfg.moe_impl
  if platform is None:
    mesh = sharding.current_mesh()
    platform = mesh.devices.flat[0].platform if mesh is not None else jax.default_backend()
  return "dense" if platform == "cpu" and cfg.n_experts <= 16 else "gmm"


def hidden(gate, up):
  """An expert's hidden activation (its down projection's input) from its gate and up
  projections of the same tokens: SwiGLU (Mixtral, Qwen3-MoE)."""
  return jax.nn.silu(gate) * up


def _dense_experts(x_MD, weights_ME, w_gate, w_up, w_down):
  """Every expert on every token, weighted by the (sparse) routing weights: y [M, D]."""
  gate_EMF = jnp.einsum("MD,EDF->EMF", x_MD, w_gate)
  up_EMF = jnp.einsum("MD,EDF->EMF", x_MD, w_up)
  out_EMD = jnp.einsum("EMF,EFD->EMD", hidden(gate_EMF, up_EMF), w_down)
  return jnp.einsum("EMD,ME->MD", out_EMD, weights_ME)


def _grouped_experts(impl, x_AD, group_sizes_E, w_gate, w_up, w_down):
  """Each expert on its group of consecutive rows of x_AD; rows past the groups give 0.
  impl: "gmm" or "ragged" (expert_impl)."""
  mm = lambda x, w: grouped_matmul(x, w, group_sizes_E, impl="auto" if impl == "gmm" else "xla")
  gate_AF, up_AF = mm(x_AD, w_gate), mm(x_AD, w_up)
  return mm(hidden(gate_AF, up_AF), w_down)


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
  if isinstance(w["router"], Capture):  # calibration: the router's and experts' input
    raise Captured(x_BTD)
  logits_BTE = router_logits(x_BTD, w["router"])
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
    # (On one device the ragged matmuls still compute them; a capacity would bound an
    # expert-parallel all-to-all's buffers, which this layer does not use.)
    capacity = math.ceil(cfg.capacity_factor * m * k / e)
    starts_E = jnp.cumsum(group_sizes_E) - group_sizes_E
    rank_A = (jnp.arange(m * k) - starts_E[experts_A[order_A]])[unsort_A]
    keep_A = valid_A & (rank_A < capacity)
  dropped = jnp.sum(valid_A & ~keep_A).astype(jnp.int32)

  keep_Mk = keep_A.reshape(m, k)
  weights_Mk = jnp.where(keep_Mk, weights_Mk, 0.0).astype(dt)
  w_experts = [w_gate.astype(dt), w_up.astype(dt), w_down.astype(dt)]
  mesh = sharding.current_mesh()
  if mesh is not None and mesh.shape.get("expert", 1) > 1:
    # A dropped or masked assignment goes to no expert (index e): no device computes it.
    routed_BTk = jnp.where(keep_Mk, experts_Mk, e).reshape(b, t, k)
    y_BTD = _expert_parallel(cfg, mesh, x_BTD.astype(dt), routed_BTk,
                             weights_Mk.reshape(b, t, k), *w_experts)
  elif expert_impl(cfg) == "dense":
    # E / k times the FLOPs, but XLA:CPU runs a ragged_dot ~13x slower than the same FLOPs
    # as one batched matmul (tiny_moe's shapes), so for small E on CPU this is the faster
    # exact form.
    weights_ME = jnp.zeros((m, e), dt).at[jnp.arange(m)[:, None], experts_Mk].add(weights_Mk)
    y_BTD = _dense_experts(x_BTD.reshape(m, d).astype(dt), weights_ME,
                           *w_experts).reshape(b, t, d)
  else:
    # The sorted assignment axis is left to the partitioner: it mixes tokens of every batch
    # row, and only expert parallelism would shard it sensibly.
    x_AD = x_BTD.reshape(m, d).astype(dt)[order_A // k]
    out_MkD = _grouped_experts(expert_impl(cfg), x_AD, group_sizes_E,
                               *w_experts)[unsort_A].reshape(m, k, d)
    y_BTD = jnp.einsum("MkD,Mk->MD", out_MkD, weights_Mk).reshape(b, t, d)
  y_BTD = constrain(y_BTD, ("batch", "length", "act_embed"))
  return y_BTD, router_stats(logits_ME, experts_A, valid_M, dropped)


def _axes(entry) -> tuple:
  return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def _expert_parallel(cfg: ModelConfig, mesh, x_BTD, routed_BTk, weights_BTk,
                     w_gate, w_up, w_down):
  """y [B, T, D]: the experts per device of the mesh's expert axis (see the module docstring).

  routed_BTk: int32, each assignment's expert, or E where it goes to none (dropped, masked);
  weights_BTk: its routing weight (0 where it goes to none), in the compute dtype as x.
  """
  e, ep = cfg.n_experts, mesh.shape["expert"]
  if e % ep:
    raise ValueError(f"model.n_experts={e} cannot be split over mesh.expert={ep} devices: "
                     f"make mesh.expert a divisor of model.n_experts")
  impl = expert_impl(cfg)
  token_spec = sharding.activation_spec(("batch", "length", None), x_BTD.shape)
  route_spec = sharding.activation_spec(("batch", "length", None), routed_BTk.shape)
  # The experts' own split: E over "expert", F over "tensor" by the rules; D whole (gathered
  # from its FSDP shards as for any matmul).
  up_spec = sharding.activation_spec(("expert", None, "mlp"), w_gate.shape)
  down_spec = sharding.activation_spec(("expert", "mlp"), w_down.shape)
  f_axes = _axes((tuple(up_spec) + (None,) * 3)[2])
  # Where the tokens are split over the expert axis (always, when the batch divides), the
  # group gathers them; else every device already has the group's tokens.
  tokens = tuple(token_spec) + (None,) * 3
  split_dims = [i for i in (0, 1) if "expert" in _axes(tokens[i])]

  def local(x_BTD, routed_BTk, weights_BTk, w_gate, w_up, w_down):
    e_local = w_gate.shape[0]
    if split_dims:
      gather = lambda a: jax.lax.all_gather(a, "expert", axis=split_dims[0], tiled=True)
      x_BTD, routed_BTk, weights_BTk = gather(x_BTD), gather(routed_BTk), gather(weights_BTk)
    b, t, d = x_BTD.shape
    m, k = b * t, routed_BTk.shape[-1]
    # This device's experts are [first, first + e_local); every other assignment gets the
    # local index e_local (no group here) and weight 0.
    local_Mk = routed_BTk.reshape(m, k) - jax.lax.axis_index("expert") * e_local
    here_Mk = (local_Mk >= 0) & (local_Mk < e_local)
    local_Mk = jnp.where(here_Mk, local_Mk, e_local)
    weights_Mk = jnp.where(here_Mk, weights_BTk.reshape(m, k), 0)
    x_MD = x_BTD.reshape(m, d)
    if impl == "dense":
      weights_ME = jnp.zeros((m, e_local + 1), x_MD.dtype).at[
          jnp.arange(m)[:, None], local_Mk].add(weights_Mk)[:, :e_local]
      y_MD = _dense_experts(x_MD, weights_ME, w_gate, w_up, w_down)
    else:
      # This device's assignments sorted by expert, then the others (no group: zeros).
      local_A = local_Mk.reshape(m * k)
      order_A = jnp.argsort(local_A, stable=True)
      group_sizes = jnp.bincount(local_A, length=e_local).astype(jnp.int32)
      out_AD = _grouped_experts(impl, x_MD[order_A // k], group_sizes, w_gate, w_up, w_down)
      out_MkD = out_AD[jnp.argsort(order_A)].reshape(m, k, d)
      y_MD = jnp.einsum("MkD,Mk->MD", out_MkD, weights_Mk)
    # Sum each token's experts over the group (reduce-scatter: back to the token's device),
    # and the partial down-projections of a tensor-split F.
    y_BTD = y_MD.reshape(b, t, d)
    if split_dims:
      y_BTD = jax.lax.psum_scatter(y_BTD, "expert", scatter_dimension=split_dims[0],
                                   tiled=True)
    else:
      y_BTD = jax.lax.psum(y_BTD, "expert")
    return jax.lax.psum(y_BTD, f_axes) if f_axes else y_BTD

  # check_vma=False: the Pallas kernels' outputs carry no varying-axes type (megablox's
  # pallas_call cannot be given one). Without the check, shard_map's transpose sums the
  # gradient of an input that is the same on every device of the group (x, where the batch is
  # not split over it) over the group, which is what the experts' partial gradients need
  # (tests/test_moe.py compares every gradient with one device's).
  return jax.shard_map(
      local, mesh=mesh, in_specs=(token_spec, route_spec, route_spec, up_spec, up_spec,
                                  down_spec), out_specs=token_spec, check_vma=False)(
      x_BTD, routed_BTk, weights_BTk, w_gate, w_up, w_down)
