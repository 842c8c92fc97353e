"""The output head's token scores without the full logits: log p(target), log Z and entropy.

`token_scores(hidden_BTD, params, cfg, targets_BT, temperature=..., chunk=...)` takes the
final-normed hidden states (`Transformer(cfg).apply(..., return_hidden=True)`) and finds the
head in `params` (the tied `embedding` [V, D] or `lm_head` [D, V]). It never holds the
logits of more than `chunk` tokens at once, forward or backward: f32 [B, T, V] logits (4 GiB
per 8192-token row at Llama-3's V = 128256) and their gradient are the largest activations
of a training step otherwise.

How (the idea of Liger-Kernel's fused linear cross-entropy and of Cut Cross-Entropy,
Wijmans et al. 2024, here in plain XLA): with z = (hidden · head) / temperature,
  forward   the B·T tokens in chunks of C: each chunk's logits [C, V] give, per token, log Z,
            the target's z and Σ p·z (entropy H = log Z − Σ p·z); only those are kept;
  backward  a custom VJP recomputes the logits in slabs of the vocabulary (all tokens × S
            columns, S sized so a slab holds about C·V logits) and turns the per-token
            cotangents of (log p, log Z, H) into dz:
              d log p / dz = onehot(target) − p,  d log Z / dz = p,  dH / dz = −p·(z − Σ p·z)
            then dhead's S columns (complete in one matmul: written once, no f32 [D, V]
            accumulator) and dhidden (an f32 [B·T, D] sum over slabs).
The price is one more head matmul (4 instead of 3) and the head read in slabs.

Sharding: inside `model.sharding.activation_sharding` (the train step, eval), the work runs
under `jax.shard_map` with the rules table's specs: tokens over the batch axes, vocab over
"tensor", the head's D gathered as for any FSDP matmul (in the compute dtype). Per forward
chunk, a max and three sums per token go across the vocab shards; per backward slab, dhead's
columns are reduce-scattered over the token shards onto the parameter's own split (FSDP), as
a dense head's backward does once; dhidden is summed across the vocab shards once, at the
end. Outside that context it runs as one program (GSPMD shards it as it can).

Letters as in model/__init__.py, plus M = B·T tokens, C tokens per chunk, S columns per slab.
"""

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from model import sharding
from model.config import ModelConfig


DEFAULT_CHUNK = 1024  # configs/base.py's train.loss_chunk


class TokenScores(NamedTuple):
  """Per position, all f32[B, T]; z = logits / temperature."""
  logp: jax.Array  # log softmax(z)[target]
  log_z: jax.Array  # logsumexp(z): the z-loss term (with temperature 1)
  entropy: jax.Array | None  # −Σ p log p of softmax(z); None unless asked for


def head_weight(params, cfg: ModelConfig) -> tuple[jax.Array, bool]:
  """(the LM head as stored, tied): embedding [V, D] when tied, else lm_head [D, V]."""
  if cfg.value_head:
    raise ValueError("model.value_head=True: this model has a scalar head, no LM head to "
                     "score tokens with")
  key = "embedding" if cfg.tie_embeddings else "lm_head"
  if key not in params:
    raise ValueError(f"params have no {key!r} (model.tie_embeddings={cfg.tie_embeddings}); "
                     f"top-level keys: {sorted(params)}")
  return params[key], cfg.tie_embeddings


def token_scores(hidden_BTD, params, cfg: ModelConfig, targets_BT, *,
                 temperature: float = 1.0, chunk: int = DEFAULT_CHUNK,
                 entropy: bool = False) -> TokenScores:
  """log p(target), log Z and (if `entropy`) the entropy of softmax(logits / temperature).

  hidden_BTD: the final-normed hidden states, in the compute dtype; targets_BT: int, aligned
    so that hidden[:, t] predicts targets[:, t]. A target outside [0, V) (padding, -100) is
    clipped into range, so the result stays finite; the caller's mask removes it.
  temperature: a Python float, the sampling temperature (0 means greedy: the raw logits).
    No gradient flows to it.
  chunk: tokens per chunk on each device (0: all at once). Each chunk holds a few
    [chunk, V / tensor] arrays (f32 logits among them); any chunk works, dividing B·T or not.
  Logits are computed in cfg's compute dtype with f32 accumulation, everything after in f32.
  All three outputs are differentiable w.r.t. `hidden_BTD` and the head in `params`.
  """
  w, tied = head_weight(params, cfg)
  if hidden_BTD.ndim != 3 or targets_BT.shape != hidden_BTD.shape[:2]:
    raise ValueError(f"token_scores: expected hidden [B, T, D] and targets [B, T], got hidden "
                     f"{tuple(hidden_BTD.shape)} and targets {tuple(targets_BT.shape)}")
  d = w.shape[1] if tied else w.shape[0]
  if w.ndim != 2 or d != hidden_BTD.shape[-1]:
    raise ValueError(f"token_scores: the head {'embedding' if tied else 'lm_head'} has shape "
                     f"{tuple(w.shape)}; expected {'[V, D]' if tied else '[D, V]'} with "
                     f"D = {hidden_BTD.shape[-1]} (hidden's last dim)")
  if chunk < 0:
    raise ValueError(f"train.loss_chunk={chunk} must be >= 0 (0: all tokens at once)")
  # Temperature 0 means greedy when sampling; its log-probs are those of the raw logits.
  temperature = float(temperature)
  plan = _plan(hidden_BTD.shape, w.shape, tied=tied, chunk=chunk, entropy=entropy,
               inv_temperature=1.0 / temperature if temperature > 0 else 1.0,
               softcap=float(cfg.final_softcap),
               compute_dtype=jnp.dtype(cfg.compute_dtype).name)
  logp, log_z, ent = _scores(plan, hidden_BTD, w, targets_BT.astype(jnp.int32))
  return TokenScores(logp, log_z, ent)


@dataclasses.dataclass(frozen=True)
class _Plan:
  """Static settings of one call (hashable: custom_vjp's nondiff argument)."""
  chunk: int
  inv_temperature: float
  tied: bool
  softcap: float  # Gemma 2's final logit softcap c: logits -> c * tanh(logits / c); 0: none
  entropy: bool
  compute_dtype: str
  mesh: Mesh | None = None  # None: no shard_map
  x_spec: PartitionSpec = PartitionSpec()  # hidden [B, T, D]
  w_spec: PartitionSpec = PartitionSpec()  # the head as the loss reads it: D whole
  param_spec: PartitionSpec = PartitionSpec()  # the head as the parameter is split
  dw_spec: PartitionSpec = PartitionSpec()  # its gradient: D split like the parameter's
  t_spec: PartitionSpec = PartitionSpec()  # per token [B, T]
  token_axes: tuple = ()  # mesh axes the tokens are split over
  vocab_axes: tuple = ()  # mesh axes the vocabulary is split over
  scatter_axes: tuple = ()  # token axes the gradient's D is split over (reduce-scattered)

  @property
  def v_dim(self) -> int:
    return 0 if self.tied else 1


def _axes(entry) -> tuple:
  return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def _spec(logical, shape) -> tuple:
  spec = tuple(sharding.activation_spec(logical, shape))
  return spec + (None,) * (len(shape) - len(spec))


def _plan(x_shape, w_shape, *, tied, **settings) -> _Plan:
  if sharding.current_mesh() is None:  # not inside activation_sharding
    return _Plan(tied=tied, **settings)
  v_dim, d_dim = (0, 1) if tied else (1, 0)
  order = lambda v, d: (v, d) if tied else (d, v)
  x_spec = _spec(("batch", "length", "act_embed"), x_shape)
  w_spec = _spec(order("act_vocab", "act_embed"), w_shape)
  param_spec = _spec(order("vocab", "embed"), w_shape)  # how the weight itself is split
  if _axes(x_spec[2]) + _axes(w_spec[d_dim]):
    raise ValueError(f"token_scores: the rules table splits the model dim D (act_embed) over "
                     f"{_axes(x_spec[2]) + _axes(w_spec[d_dim])}; the head needs it whole")
  token_axes = _axes(x_spec[0]) + _axes(x_spec[1])
  vocab_axes = _axes(w_spec[v_dim])
  # dhead is summed over the token shards; where the parameter splits D over some of those
  # axes (FSDP), a reduce-scatter leaves each device only its own rows, as a dense head's
  # backward would.
  scatter_axes = _axes(param_spec[d_dim])
  if not set(scatter_axes) <= set(token_axes):
    scatter_axes = ()
  dw_spec = [None, None]
  dw_spec[v_dim] = w_spec[v_dim]
  dw_spec[d_dim] = scatter_axes[0] if len(scatter_axes) == 1 else (scatter_axes or None)
  return _Plan(tied=tied, **settings, mesh=sharding.current_mesh(),
               x_spec=PartitionSpec(*x_spec), w_spec=PartitionSpec(*w_spec),
               param_spec=PartitionSpec(*param_spec), dw_spec=PartitionSpec(*dw_spec),
               t_spec=PartitionSpec(*x_spec[:2]),
               token_axes=token_axes, vocab_axes=vocab_axes, scatter_axes=scatter_axes)


def _sharded(plan: _Plan, fn, in_specs, out_specs):
  """fn(plan, *local arrays), per device under shard_map when the plan has a mesh."""
  fn = functools.partial(fn, plan)
  if plan.mesh is None:
    return fn
  return jax.shard_map(fn, mesh=plan.mesh, in_specs=in_specs, out_specs=out_specs)


def _compute_head(plan: _Plan, w):
  """The head in the compute dtype, cast where the parameter lies: shard_map then gathers
  its D in compute-dtype bytes (left alone, the CPU compiler gathers f32 first)."""
  w_c = w.astype(plan.compute_dtype)
  if plan.mesh is None:
    return w_c
  return lax.with_sharding_constraint(w_c, NamedSharding(plan.mesh, plan.param_spec))


def _psum(x, axes):
  return lax.psum(x, axes) if axes else x


def _varying(x, axes):
  """A loop carry that will hold values varying over `axes` must start as such."""
  return lax.pcast(x, axes, to="varying") if axes else x


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _scores(plan, x_BTD, w, y_BT):
  return _scores_fwd(plan, x_BTD, w, y_BT)[0]


def _scores_fwd(plan, x_BTD, w, y_BT):
  t = plan.t_spec
  w_c = _compute_head(plan, w)
  logp, log_z, ent = _sharded(plan, _forward_local, (plan.x_spec, plan.w_spec, t),
                              (t, t, t if plan.entropy else None))(x_BTD, w_c, y_BT)
  # The stored head, not w_c: the parameter is kept anyway, a compute-dtype copy would not be.
  return (logp, log_z, ent), (x_BTD, w, y_BT, log_z, ent)


def _scores_bwd(plan, residuals, cotangents):
  x_BTD, w, y_BT, log_z, ent = residuals
  g_logp, g_log_z, g_ent = cotangents
  t = plan.t_spec
  specs = (plan.x_spec, plan.w_spec) + (t,) * (6 if plan.entropy else 4)
  per_token = (y_BT, log_z, g_logp, g_log_z) + ((ent, g_ent) if plan.entropy else ())
  dx, dw = _sharded(plan, _backward_local, specs, (plan.x_spec, plan.dw_spec))(
      x_BTD, _compute_head(plan, w), *per_token)
  return dx, dw.astype(w.dtype), None


_scores.defvjp(_scores_fwd, _scores_bwd)


def _blocks(size: int, block: int):
  """(block, count, start of block i) tiling `size`. A last block that would run past the
  end starts at size − block instead: no padding copy; what it repeats is recomputed."""
  block = min(block, size) if block else size
  return block, -(-size // block), lambda i: jnp.minimum(i * block, size - block)


def _local(plan, x_BTD, w_c, y_BT):
  """Flattened tokens [M, D], clipped targets [M], this device's vocab size and first id."""
  b, t, d = x_BTD.shape
  v_local = w_c.shape[plan.v_dim]
  shards = 1
  for a in plan.vocab_axes:
    shards *= plan.mesh.shape[a]
  first = lax.axis_index(plan.vocab_axes) * v_local if plan.vocab_axes else 0
  y_M = jnp.clip(y_BT, 0, v_local * shards - 1).reshape(b * t)
  return x_BTD.reshape(b * t, d), y_M, v_local, first


def _logits(plan, x_MD, w_c, with_slope: bool = False):
  """Scaled logits z, f32 [M, V] from compute-dtype operands: softcapped as the model's head
  is (model/transformer.py), then divided by the temperature. with_slope: also d capped /
  d logits = 1 - tanh², f32 [M, V] (None without a softcap)."""
  eq = "MD,VD->MV" if plan.tied else "MD,DV->MV"
  logits = jnp.einsum(eq, x_MD, w_c, preferred_element_type=jnp.float32)
  slope = None
  if plan.softcap:
    t = jnp.tanh(logits / plan.softcap)
    logits, slope = plan.softcap * t, 1.0 - t * t
  z = logits * plan.inv_temperature
  return (z, slope) if with_slope else z


def _forward_local(plan, x_BTD, w_c, y_BT):
  """Per token log p, log Z (and H), chunk tokens × this device's vocab at a time."""
  b, t, _ = x_BTD.shape
  x_MD, y_M, v_local, first = _local(plan, x_BTD, w_c, y_BT)
  c, n, start_of = _blocks(b * t, plan.chunk)
  vocab = plan.vocab_axes
  ids_1V = first + lax.broadcasted_iota(jnp.int32, (1, v_local), 1)

  def body(i, carry):
    start = start_of(i)
    x_CD = lax.dynamic_slice_in_dim(x_MD, start, c)
    y_C = lax.dynamic_slice_in_dim(y_M, start, c)
    z_CV = _logits(plan, x_CD, w_c)
    # The max is only a shift for stability: any value works, so no gradient is needed.
    m_C = jnp.max(z_CV, axis=-1)
    m_C = lax.pmax(m_C, vocab) if vocab else m_C
    e_CV = jnp.exp(z_CV - m_C[:, None])
    sums = [jnp.sum(e_CV, axis=-1), jnp.sum(jnp.where(ids_1V == y_C[:, None], z_CV, 0.0), -1)]
    if plan.entropy:
      sums.append(jnp.sum(e_CV * z_CV, axis=-1))
    sums = _psum(jnp.stack(sums), vocab)  # one reduction across the vocab shards
    log_z_C = m_C + jnp.log(sums[0])
    out = [sums[1] - log_z_C, log_z_C]
    if plan.entropy:  # H = log Z − Σ p·z, with Σ p·z = Σ e·z / Σ e
      out.append(log_z_C - sums[2] / sums[0])
    return tuple(lax.dynamic_update_slice_in_dim(a, o, start, 0) for a, o in zip(carry, out))

  zeros = _varying(jnp.zeros((b * t,), jnp.float32), plan.token_axes)
  outs = lax.fori_loop(0, n, body, (zeros,) * (3 if plan.entropy else 2))
  outs = tuple(o.reshape(b, t) for o in outs)
  return outs if plan.entropy else outs + (None,)


def _backward_local(plan, x_BTD, w_c, y_BT, log_z_BT, g_logp_BT, g_log_z_BT, ent_BT=None,
                    g_ent_BT=None):
  """dhidden and dhead, over slabs of this device's vocabulary.

  Slabs of the vocabulary (all tokens × S columns), not chunks of tokens: each slab's dhead
  columns are then complete after one matmul, and are reduced over the token shards and
  written once. Chunks of tokens would each add to all of dhead, an f32 [D, V] accumulator
  per device (2 GiB at Llama-3-8B) besides the reduced result. S is chosen so that a slab
  holds about as many logits as a forward chunk.
  """
  b, t, d = x_BTD.shape
  m = b * t
  x_MD, y_M, v_local, first = _local(plan, x_BTD, w_c, y_BT)
  col = lambda a: a.reshape(m, 1).astype(jnp.float32)
  log_z, g_logp, g_log_z = col(log_z_BT), col(g_logp_BT), col(g_log_z_BT)
  if plan.entropy:
    p_z, g_ent = col(log_z_BT - ent_BT), col(g_ent_BT)  # Σ p·z = log Z − H
  # Slabs a multiple of 128 columns wide (TPU lanes), unless the vocabulary is narrower.
  width = -(-plan.chunk * v_local // m) if plan.chunk else v_local
  s, n, start_of = _blocks(v_local, -(-width // 128) * 128)
  v_dim = plan.v_dim
  dx_eq, dw_eq = ("MV,VD->MD", "MV,MD->VD") if plan.tied else ("MV,DV->MD", "MD,MV->DV")
  d_dim = 1 - v_dim

  def body(j, carry):
    dx_MD, dw = carry
    start = start_of(j)
    w_slab = lax.dynamic_slice_in_dim(w_c, start, s, axis=v_dim)
    z_MS, slope_MS = _logits(plan, x_MD, w_slab, with_slope=True)
    coef_MS = g_log_z - g_logp
    if plan.entropy:
      coef_MS = coef_MS - g_ent * (z_MS - p_z)
    ids_1S = first + start + lax.broadcasted_iota(jnp.int32, (1, s), 1)
    dz_MS = jnp.exp(z_MS - log_z) * coef_MS + jnp.where(ids_1S == y_M[:, None], g_logp, 0.0)
    # z = softcap(logits) · inv_temperature; the matmuls take compute-dtype operands, f32
    # results.
    dl_MS = dz_MS * plan.inv_temperature
    if slope_MS is not None:
      dl_MS = dl_MS * slope_MS
    dl_MS = dl_MS.astype(w_c.dtype)
    operands = (dl_MS, x_MD) if plan.tied else (x_MD, dl_MS)
    dw_slab = jnp.einsum(dw_eq, *operands, preferred_element_type=jnp.float32)
    if plan.scatter_axes:
      dw_slab = lax.psum_scatter(dw_slab, plan.scatter_axes, scatter_dimension=d_dim,
                                 tiled=True)
    rest = tuple(a for a in plan.token_axes if a not in plan.scatter_axes)
    dw = lax.dynamic_update_slice_in_dim(dw, _psum(dw_slab, rest), start, axis=v_dim)
    # Columns of an overlapping last slab were counted by the slab before: dhead rewrites
    # them with the same values, but they must not add to dhidden twice.
    fresh_1S = start + lax.broadcasted_iota(jnp.int32, (1, s), 1) >= j * s
    dl_MS = jnp.where(fresh_1S, dl_MS, jnp.zeros_like(dl_MS))
    dx_MD = dx_MD + jnp.einsum(dx_eq, dl_MS, w_slab, preferred_element_type=jnp.float32)
    return dx_MD, dw

  dw_shape = list(w_c.shape)
  for a in plan.scatter_axes:
    dw_shape[d_dim] //= plan.mesh.shape[a]
  dx0 = _varying(jnp.zeros((m, d), jnp.float32), plan.token_axes + plan.vocab_axes)
  dw0 = _varying(jnp.zeros(dw_shape, jnp.float32), plan.scatter_axes + plan.vocab_axes)
  dx_MD, dw = lax.fori_loop(0, n, body, (dx0, dw0))
  # One reduction of dhidden over the vocab shards, after the last slab.
  dx_MD = _psum(dx_MD, plan.vocab_axes)
  return dx_MD.reshape(b, t, d).astype(x_BTD.dtype), dw
