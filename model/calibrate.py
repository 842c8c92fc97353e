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
sees the scales. Mixture-of-experts blocks: attention as above; the experts (and any AWQ scale
of their input, which the router reads too) are plain round-to-nearest, the router unquantized.

The inputs come from the block itself: a layers.Capture weight stops it at its first use and
raises the input (inside jit, so each capture is one compiled function), and the block's
output is the block's; nothing here repeats its math.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from model import layers, ptq, quant, transformer
from model.config import ModelConfig

# The matmul groups of a block in forward order: (module, weights sharing one input).
GROUPS = (("attn", ("q", "k", "v")), ("attn", ("o",)), ("mlp", ("gate", "up")),
          ("mlp", ("down",)))


# ----------------------------------------------------------------------------------- the block

@functools.partial(jax.jit, static_argnames=("cfg", "local", "module", "name"))
def _input_of(cfg: ModelConfig, w, x_BTD, rope, *, local: bool, module: str, name: str):
  """The input the block applies w[module][name] to, for x [B, T, D] entering the block."""
  w = {**w, module: {**w[module], name: layers.Capture(w[module][name])}}
  try:
    layers.block(cfg, w, x_BTD, rope, None, None, None, local=local)
  except layers.Captured as c:
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


def _rtn(spec: quant.Spec, w, name: str, dtype=None):
  n_in, n_out = quant.MATMUL_AXES[name]
  q = quant.quantize(w, spec.kind, spec.group, n_batch=w.ndim - n_in - n_out, n_in=n_in,
                     symmetric=spec.symmetric, double_quant=spec.double_quant)
  return q if dtype is None else q.replace(dtype=jnp.dtype(dtype))


def _gptq_layer(cal: _Calibration, w, layer: int, spec: quant.Spec, damp: float):
  w = {k: dict(v) if isinstance(v, dict) else v for k, v in w.items()}
  for module, names in GROUPS:
    if module not in w:  # an MoE block's experts: see the module docstring
      continue
    n_in = quant.MATMUL_AXES[names[0]][0]
    h = sum(ptq.hessian(x, n_in=n_in) for x in cal.inputs(w, layer, module, names[0]))
    for name in names:
      # act_order (desc_act): SmolLM2 int4 g64 removes 53% of RTN's perplexity increase with
      # it, 29% without (bench/quant.py; README "Quantization").
      q = ptq.gptq(w[module][name], h, spec.kind, spec.group, n_in=quant.MATMUL_AXES[name][0],
                   symmetric=spec.symmetric, damp=damp, act_order=True)
      if spec.double_quant:
        q = q.replace(scales=quant.double_quantize(q.scales))
      w[module][name] = q
  return w


def _awq_layer(cfg: ModelConfig, cal: _Calibration, w, layer: int, spec: quant.Spec,
               grid: int):
  """The block's AWQ scales, searched on its unquantized inputs, folded; then each weight but
  q and k clipped (`ptq.awq_clip`, on the scaled inputs), then RTN."""
  w = {k: dict(v) if isinstance(v, dict) else v for k, v in w.items()}
  attn = w["attn"]
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  inputs = lambda module, name: jnp.concatenate(cal.inputs(w, layer, module, name))
  search = lambda names, x, n_in: ptq.awq_shared(
      [w[module][n] for module, n in names], x, spec.kind, spec.group, n_in=n_in,
      symmetric=spec.symmetric, grid=grid)[1]
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
  return w


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
  for i, w in enumerate(trees):
    if spec.method == "gptq":
      w = _gptq_layer(cal, w, i, spec, damp)
    else:
      w = _awq_layer(cfg, cal, w, i, spec, grid)
    # What calibration did not quantize (an MoE block's experts) is rounded to nearest.
    w = jax.tree_util.tree_map_with_path(
        lambda path, a: _rtn(spec, a, quant._name(path))
        if quant._name(path) in quant.MATMUL_AXES and not quant.is_quantized(a) else a,
        w, is_leaf=quant.is_quantized)
    cal.advance(w, i)
    out.append(w)
    if log is not None:
      log(f"{spec.method}: block {i + 1}/{cfg.n_layers} quantized")
  return rebuild(out)
