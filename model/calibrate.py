"""Post-training quantization of a whole model from calibration tokens: GPTQ and AWQ driven
block by block (model/ptq.py quantizes one linear layer; model/quant.py rounds to nearest).

  params_q = quantize_model(cfg, params, tokens_BT, quant.Spec("int4", 128, method="gptq"))

gives the tree `spec.quantize(params)` would (the same Quantized layout, so a loader rebuilds it
from the spec alone), with the codes chosen on calibration data and, for AWQ, the norms before
the scaled weights changed.

Sequential calibration (GPTQ, Frantar et al. 2022, as its reference code runs it: block by
block, each fed the outputs of the blocks already quantized): the tokens run through the model
one block at a time, and block l is calibrated on what blocks 0..l-1, quantized, make of them,
so each block compensates for the error before it. Within a block GPTQ goes one matmul
group at a time (AutoGPTQ's true_sequential): q, k, v (one input: the attention norm's
output), then o (the attention output [.., N, H], computed with q, k, v quantized), then gate
and up (the MLP norm's output), then down (the hidden [.., F]); weights that share an input
share its Hessian. Inputs are taken by decreasing H_ii (act_order; groups stay contiguous, as
AutoGPTQ's static_groups, so the layout is round-to-nearest's). AWQ (Lin et al. 2023, Sec. 3.2; AutoAWQ's order) searches every scale of a
block on the inputs of the block as it is, folds them, clips each weight but q and k group by
group where that lowers its output error (the reference's auto_clip: ptq.awq_clip, on the
inputs divided by their scales), then rounds to nearest:
  q, k, v    one s [D], 1/s folded into attn_norm (ptq.fold_into_norm; (1 + w) norms too);
  o          s [N, H] folded into v's output columns (and v's bias) when n_heads == n_kv_heads;
             with grouped queries a v column feeds several heads' inputs, so o is plain RTN;
  gate, up   one s [D], folded into mlp_norm;
  down       s [F] folded into up's output columns (act(gate) * up is linear in up).
Folds are exact: q/k norms act after the projection, post-norms after o and down, so neither
sees the scales.

Mixture-of-experts blocks: attention as above; each expert is calibrated on the calibration
rows the router sends it (`routed`: its top-k choices; what AutoGPTQ's and AutoAWQ's hooks on
HF Mixtral's experts see), unweighted by the routing weight as in those references: each
expert's matmuls lower their own output error on the tokens they serve (rows weighted by the
squared routing weight would target the MoE output's error for down instead; not measured
here). GPTQ: one Hessian per expert for its gate and up,
then one per expert of its hidden activation (gate and up quantized) for its down. AWQ: gate
and up of all experts share one s [D], since one norm makes their input (and the router's, which
takes W * s and stays unquantized), searched on each expert's error on its own rows; down has
an s [F] per expert, folded into that expert's up; clipping is per expert on its rows. An
expert no calibration row reaches is rounded to nearest (AWQ: after the shared s), and the log
says how many there were.

The inputs come from the block itself: a capture.Capture weight stops it at its first use and
raises the input (inside jit, so each capture is one compiled function; the router's for the
experts' input), and the block's output is the block's; only an expert's hidden activation is
recomputed here (moe.hidden of its gate and up), from its routed rows.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from model import layers, moe, ptq, quant, transformer
from model.capture import Capture, Captured
from model.config import ModelConfig

# The matmul groups of a block in forward order: (module, weights sharing one input).
GROUPS = (("attn", ("q", "k", "v")), ("attn", ("o",)), ("mlp", ("gate", "up")),
          ("mlp", ("down",)))


# ----------------------------------------------------------------------------------- the block

@functools.partial(jax.jit, static_argnames=("cfg", "local", "module", "name"))
def _input_of(cfg: ModelConfig, w, x_BTD, rope, *, local: bool, module: str, name: str):
  """The input the block applies w[module][name] to, for x [B, T, D] entering the block."""
  w = {**w, module: {**w[module], name: Capture(w[module][name])}}
  try:
    layers.block(cfg, w, x_BTD, rope, None, None, None, local=local)
  except Captured as c:
    return c.x
  raise AssertionError(f"the block never applied {module}/{name}")


@functools.partial(jax.jit, static_argnames=("cfg", "local"))
def _output(cfg: ModelConfig, w, x_BTD, rope, *, local: bool):
  return layers.block(cfg, w, x_BTD, rope, None, None, None, local=local)[0]


class _Calibration:
  """The calibration rows entering one block, in chunks of rows (attention's memory is a
  chunk's), with the RoPE tables of their positions."""

  def __init__(self, cfg: ModelConfig, params, tokens_BT, rows: int):
    self.cfg = cfg
    tokens = jnp.asarray(tokens_BT, jnp.int32)
    self.chunks = [transformer.embed(cfg, params, tokens[i:i + rows])
                   for i in range(0, tokens.shape[0], rows)]
    self.ropes = {}

  def _rope(self, x, local):
    b, t = x.shape[:2]
    if (b, t) not in self.ropes:
      positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
      self.ropes[b, t] = layers.rope_tables(positions, self.cfg)
    return self.ropes[b, t]["local" if local else "global"]

  def inputs(self, w, layer: int, module: str, name: str):
    """The input of w[module][name] for each chunk."""
    local = self.cfg.is_local(layer)
    return [_input_of(self.cfg, w, x, self._rope(x, local), local=local, module=module,
                      name=name) for x in self.chunks]

  def advance(self, w, layer: int):
    """The rows through block `layer` with weights w: the next block's input."""
    local = self.cfg.is_local(layer)
    self.chunks = [_output(self.cfg, w, x, self._rope(x, local), local=local)
                   for x in self.chunks]


# ------------------------------------------------------------------------------------ the model

def _per_layer(cfg: ModelConfig, params):
  """(per-layer trees, rebuild(list of per-layer trees) -> params in the input's layout)."""
  if "layers" in params:  # scanned: every leaf [L, ...]
    stacked = params["layers"]
    trees = [jax.tree.map(lambda a, i=i: a[i], stacked) for i in range(cfg.n_layers)]
    stack = lambda ts: {**params, "layers": jax.tree.map(lambda *a: jnp.stack(a), *ts)}
    return trees, stack
  names = [f"layers_{i}" for i in range(cfg.n_layers)]
  return [params[n] for n in names], lambda ts: {**params, **dict(zip(names, ts))}


@functools.partial(jax.jit, static_argnames=("spec", "name", "dtype"))
def _rtn(spec: quant.Spec, w, name: str, dtype=None):
  n_in, n_out = quant.MATMUL_AXES[name]
  q = quant.quantize(w, spec.kind, spec.group, n_batch=w.ndim - n_in - n_out, n_in=n_in,
                     symmetric=spec.symmetric, double_quant=spec.double_quant)
  return q if dtype is None else q.replace(dtype=jnp.dtype(dtype))


def _gptq(spec: quant.Spec, w, h: ptq.Hessian, name: str, damp: float):
  # act_order (desc_act): SmolLM2 int4 g64 removes 53% of RTN's perplexity increase with it,
  # 29% without (bench/quant.py; README "Quantization").
  q = ptq.gptq(w, h, spec.kind, spec.group, n_in=quant.MATMUL_AXES[name][0],
               symmetric=spec.symmetric, damp=damp, act_order=True)
  return q.replace(scales=quant.double_quantize(q.scales)) if spec.double_quant else q


def _stack(qs):
  """One Quantized [E, ...] from E of the same layout."""
  return jax.tree.map(lambda *a: jnp.stack(a), *qs)


@functools.partial(jax.jit, static_argnames="cfg")
def _experts_of(cfg: ModelConfig, router_DE, x_BTD):
  """int32[B * T, k]: the experts the router sends each row of x to."""
  logits = moe.router_logits(x_BTD, router_DE)
  return moe.route(logits.reshape(-1, cfg.n_experts), cfg)[1]


def routed(cfg: ModelConfig, router_DE, x_BTD):
  """The calibration rows each expert gets: [E] of x [M_e, D], the rows of the MoE input x
  [B, T, D] whose top-k choices include it (unweighted; every top-k choice, as dropless
  routing makes it: a capacity's drops depend on the batch)."""
  experts_Mk = np.asarray(_experts_of(cfg, router_DE, x_BTD))
  x_MD = x_BTD.reshape(-1, x_BTD.shape[-1])
  return [x_MD[np.flatnonzero(np.any(experts_Mk == e, axis=1))]
          for e in range(cfg.n_experts)]


def _expert_hidden(cfg: ModelConfig, m, x_MD, e: int):
  """Expert e's hidden activation [M, F] (its down projection's input) for its rows x [M, D],
  with m's gate and up (arrays or Quantized) in the compute dtype, as the block runs it."""
  dt = cfg.compute_dtype
  one = lambda name: jax.tree.map(lambda a: a[e], m[name]).astype(dt)  # Quantized too
  x = x_MD.astype(dt)
  return moe.hidden(jnp.einsum("MD,DF->MF", x, one("gate")), jnp.einsum("MD,DF->MF", x, one("up")))


def _gptq_experts(cfg: ModelConfig, cal: _Calibration, w, layer: int, spec: quant.Spec,
                  damp: float):
  """GPTQ of an MoE block's experts, each from the rows routed to it: gate and up from one
  Hessian of its input rows, then down from the hidden activations its quantized gate and up
  make of them (true_sequential). Returns (the "moe" weights, experts that got no rows: zero
  Hessian, so ptq.gptq rounds them to nearest)."""
  m = dict(w["moe"])
  xs = routed(cfg, m["router"], jnp.concatenate(cal.inputs(w, layer, "moe", "router")))
  hs = [ptq.hessian(x) for x in xs]
  for name in ("gate", "up"):
    m[name] = _stack([_gptq(spec, m[name][e], hs[e], name, damp) for e in range(cfg.n_experts)])
  hs = [ptq.hessian(_expert_hidden(cfg, m, x, e)) for e, x in enumerate(xs)]
  m["down"] = _stack([_gptq(spec, m["down"][e], hs[e], "down", damp)
                      for e in range(cfg.n_experts)])
  return m, sum(x.shape[0] == 0 for x in xs)


def _gptq_layer(cfg: ModelConfig, cal: _Calibration, w, layer: int, spec: quant.Spec,
                damp: float):
  """(the block's weights by GPTQ, its experts that got no calibration rows)."""
  w = {k: dict(v) if isinstance(v, dict) else v for k, v in w.items()}
  for module, names in GROUPS:
    if module not in w:  # an MoE block: its experts below
      continue
    n_in = quant.MATMUL_AXES[names[0]][0]
    h = sum(ptq.hessian(x, n_in=n_in) for x in cal.inputs(w, layer, module, names[0]))
    for name in names:
      w[module][name] = _gptq(spec, w[module][name], h, name, damp)
  if "moe" not in w:
    return w, 0
  w["moe"], idle = _gptq_experts(cfg, cal, w, layer, spec, damp)
  return w, idle


def _awq_experts(cfg: ModelConfig, m, x_BTD, spec: quant.Spec, grid: int):
  """AWQ of an MoE block's experts on their MoE input x [B, T, D] (unquantized block), each
  expert on the rows routed to it. gate and up of every expert share one s [D] (the norm that
  makes x feeds them all, and the router: one fold), searched on the summed output error of
  each expert on its own rows (ptq.awq_scale); down has an s [F] per expert from its own
  hidden activations, folded into its up's output columns. Then each expert's weights are
  clipped on its own (scaled) rows and rounded to nearest. An expert without rows keeps only
  the shared s (its gate and up times s, rounded to nearest; down plain RTN).
  Returns (the "moe" weights, s [D] to fold into mlp_norm, experts without rows)."""
  m = dict(m)
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  opts = dict(kind=spec.kind, group=spec.group, symmetric=spec.symmetric, grid=grid)
  xs = routed(cfg, m["router"], x_BTD)
  used = [e for e, x in enumerate(xs) if x.shape[0]]
  gate, up, down = f32(m["gate"]), f32(m["up"]), f32(m["down"])  # [E, D, F], [E, F, D]
  s_mlp = ptq.awq_scale([((gate[e], up[e]), xs[e]) for e in used], **opts)  # [D]
  hidden = {e: _expert_hidden(cfg, m, xs[e], e) for e in used}  # [M_e, F]
  s_down = jnp.stack([ptq.awq_scale([((down[e],), hidden[e])], **opts) if e in hidden
                      else jnp.ones(down.shape[1]) for e in range(cfg.n_experts)])  # [E, F]
  gate = gate * s_mlp[:, None]
  up = up * s_mlp[:, None] / s_down[:, None, :]
  down = down * s_down[:, :, None]
  clip = lambda value, x: ptq.awq_clip(value, x, **opts)
  for e in used:
    x = xs[e] / s_mlp
    gate = gate.at[e].set(clip(gate[e], x))
    up = up.at[e].set(clip(up[e], x))
    down = down.at[e].set(clip(down[e], hidden[e] / s_down[e]))
  for n, value in (("gate", gate), ("up", up), ("down", down)):
    m[n] = _rtn(spec, value, n, m[n].dtype)
  # The router reads the norm's output too: it takes W * s, and stays unquantized.
  m["router"] = (f32(m["router"]) * s_mlp[:, None]).astype(m["router"].dtype)
  return m, s_mlp, cfg.n_experts - len(used)


def _awq_layer(cfg: ModelConfig, cal: _Calibration, w, layer: int, spec: quant.Spec,
               grid: int):
  """(the block's weights by AWQ, its experts that got no calibration rows): its scales,
  searched on its unquantized inputs, folded; then each weight but q and k clipped
  (`ptq.awq_clip`, on the scaled inputs), then RTN."""
  w = {k: dict(v) if isinstance(v, dict) else v for k, v in w.items()}
  attn = w["attn"]
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  inputs = lambda module, name: jnp.concatenate(cal.inputs(w, layer, module, name))
  search = lambda names, x, n_in: ptq.awq_scale(
      [([w[module][n] for module, n in names], x)], spec.kind, spec.group, n_in=n_in,
      symmetric=spec.symmetric, grid=grid)
  clip = lambda value, x, n_in: ptq.awq_clip(value, x, spec.kind, spec.group, n_in=n_in,
                                             symmetric=spec.symmetric, grid=grid)
  x_attn = inputs("attn", "q")  # [rows..., D]
  s_qkv = search((("attn", "q"), ("attn", "k"), ("attn", "v")), x_attn, 1)  # [D]
  x_o = inputs("attn", "o")  # [rows..., N, H]
  s_o = search((("attn", "o"),), x_o, 2) if cfg.n_heads == cfg.n_kv_heads else None  # [N, H]
  mlp = "mlp" in w
  if mlp:
    x_mlp, x_down = inputs("mlp", "gate"), inputs("mlp", "down")  # [rows..., D], [rows..., F]
    s_mlp = search((("mlp", "gate"), ("mlp", "up")), x_mlp, 1)  # [D]
    s_down = search((("mlp", "down"),), x_down, 1)  # [F]
  else:  # every search on the block as it is: the experts before any fold
    w["moe"], s_mlp, idle = _awq_experts(cfg, w["moe"], inputs("moe", "router"), spec, grid)

  # Scaled weights stay f32 until rounded; each Quantized keeps the weight's dtype.
  dtype = lambda name, module="attn": w[module][name].dtype
  scaled = {n: f32(attn[n]) * s_qkv[:, None, None] for n in ("q", "k", "v")}
  scaled["o"] = f32(attn["o"])
  if s_o is not None:
    scaled["v"] = scaled["v"] / s_o[None]
    scaled["o"] = scaled["o"] * s_o[..., None]
    x_o = x_o / s_o
    if cfg.qkv_bias:
      attn["v_bias"] = (f32(attn["v_bias"]) / s_o).astype(attn["v_bias"].dtype)
  scaled["v"] = clip(scaled["v"], x_attn / s_qkv, 1)
  scaled["o"] = clip(scaled["o"], x_o, 2)
  for n in ("q", "k", "v", "o"):
    attn[n] = _rtn(spec, scaled[n], n, dtype(n))
  w["attn_norm"] = {"scale": ptq.fold_into_norm(w["attn_norm"]["scale"], s_qkv,
                                                cfg.norm_plus_one)}
  if mlp:
    m = w["mlp"]
    gate = clip(f32(m["gate"]) * s_mlp[:, None], x_mlp / s_mlp, 1)
    up = clip(f32(m["up"]) * s_mlp[:, None] / s_down[None, :], x_mlp / s_mlp, 1)
    down = clip(f32(m["down"]) * s_down[:, None], x_down / s_down, 1)
    for n, value in (("gate", gate), ("up", up), ("down", down)):
      m[n] = _rtn(spec, value, n, dtype(n, "mlp"))
  w["mlp_norm"] = {"scale": ptq.fold_into_norm(w["mlp_norm"]["scale"], s_mlp,
                                               cfg.norm_plus_one)}
  return w, 0 if mlp else idle


def quantize_model(cfg: ModelConfig, params, tokens_BT, spec: quant.Spec, *, rows: int = 8,
                   damp: float = 0.01, grid: int = 20, log=None):
  """The quantized tree (module docstring) of params (the module's tree, scanned "layers" or
  unrolled "layers_i"), calibrated on tokens_BT int32[B, T] (each row one causal sequence).

  spec.method: "rtn" (no calibration; tokens are not read), "gptq" or "awq". rows: calibration
  rows a forward takes at once. damp: GPTQ's damping (fraction of mean diag H). grid: AWQ's
  alpha grid. log(message): progress, one line per block."""
  spec.check(params)
  if spec.method == "rtn":
    return spec.quantize(params)
  if spec.method not in ("gptq", "awq"):
    raise ValueError(f"quantization method {spec.method!r} is not one of {quant.METHODS}")
  tokens = np.asarray(tokens_BT)
  if tokens.ndim != 2 or tokens.size == 0:
    raise ValueError(f"calibration tokens should be int32[B, T] with B, T > 0, not "
                     f"{tokens.shape}")
  cal = _Calibration(cfg, params, tokens, rows)
  trees, rebuild = _per_layer(cfg, params)
  out = []
  idle_total = 0
  for i, w in enumerate(trees):
    if spec.method == "gptq":
      w, idle = _gptq_layer(cfg, cal, w, i, spec, damp)
    else:
      w, idle = _awq_layer(cfg, cal, w, i, spec, grid)
    cal.advance(w, i)
    out.append(w)
    idle_total += idle
    if log is not None:
      idle_note = (f" ({idle} of {cfg.n_experts} experts got no calibration tokens: rounded "
                   f"to nearest)" if idle else "")
      log(f"{spec.method}: block {i + 1}/{cfg.n_layers} quantized{idle_note}")
  if log is not None and cfg.n_experts:
    log(f"{spec.method}: {idle_total} of {cfg.n_layers * cfg.n_experts} experts got no "
        f"calibration tokens (rounded to nearest)")
  return rebuild(out)
