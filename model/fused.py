"""The inference layout of the weights: the same model, stored for decoding.

Decoding one token is a chain of matrix-vector products that read every weight once, so its
speed is the speed of those reads. `prepare` lays the weights out once for them; the block
(model/layers.py) runs on the prepared tree as on the module's, asking only which kind of
weight it holds:
  qkv      [(N+2K)H, D]  q, k and v as one matrix: one read of x, one product instead of three
  o        [D, NH]
  gate_up  [2F, D]       gate and up as one matrix
  down     [D, F]
  head     [V, D]        the (tied) embedding, read row by row: the LM head is one product
Each is a `Packed` matrix in one of two layouts, chosen by how many tokens a forward carries:
  "out_in"  as above, [out, in]: XLA's CPU matrix-vector product streams it fastest, so one
            token per row (plain decoding) runs near the memory bandwidth;
  "in_out"  each matrix transposed, [in, out]: 6% slower for one token, but a product of a few
            rows (speculative verification of k+1 tokens) costs 1.5x one token instead of
            2.4x in "out_in" (bench/RESULTS.md, SmolLM2's shapes, f32).
Products with 16-bit weights and a single row are given a second, zero row: XLA's CPU backend
runs a bf16 matrix-vector product at ~2 GB/s but a two-row product at ~22 GB/s (the extra row
is free: the product is bound by the weight reads). Nothing in the loop transposes a weight.

Quantized weights (model/quant.py) stay quantized: q/k/v and gate/up fuse as quantized [in, out]
matrices in either layout (their groups run along `in`), read by the weight-only Pallas kernels.

The prepared tree keeps everything else as the module has it (norms, biases, experts), holds
its layers as a tuple (one subtree per layer, so a cache kept as one buffer per layer is
updated in place) and the head under "head".
"""

import flax
import jax
import jax.numpy as jnp

from model import quant, sharding
from model.config import ModelConfig
from pallas_kernels.quantized_matmul import quantized_matmul

LAYOUTS = ("out_in", "in_out")


@flax.struct.dataclass
class Packed:
  """A matrix stored for inference: w [out, in] ("out_in") or [in, out] ("in_out").
  `packed(x [B, T, in], dtype)` is x @ W in `dtype`: [B, T, out]."""
  w: jax.Array
  layout: str = flax.struct.field(pytree_node=False, default="out_in")

  def __call__(self, x_BTI, dtype, accumulate=None):
    if quant.is_quantized(self.w):
      return self._quantized(x_BTI, dtype)
    w = self.w.astype(dtype)
    b, t, _ = x_BTI.shape
    pad = b * t == 1 and w.dtype.itemsize < 4  # see the module docstring
    if pad:
      x_BTI = jnp.concatenate([x_BTI, jnp.zeros_like(x_BTI)], axis=0)
    y = jnp.einsum("BTI,OI->BTO" if self.layout == "out_in" else "BTI,IO->BTO", x_BTI, w,
                   preferred_element_type=accumulate)
    return y[:1] if pad else y

  def _quantized(self, x_BTI, dtype):
    """x @ W for a quantized [in, out] W: the weight-only Pallas kernel on TPU and GPU
    (pallas_kernels/quantized_matmul.py: the codes are read, never a dequantized copy), its
    XLA reference elsewhere. Under a mesh the reference runs (GSPMD splits it; the kernel is
    one call per device)."""
    q = self.w
    mesh = sharding.current_mesh()
    impl = "auto" if mesh is None or mesh.size == 1 else "xla"
    return quantized_matmul(x_BTI.astype(dtype), q.values, q.scale_array(), q.zeros,
                            kind=q.kind, group=q.group, impl=impl, out_dtype=dtype)

  def transposed(self) -> "Packed":
    if quant.is_quantized(self.w):
      return self  # quantized matrices are always [in, out] (their groups run along in)
    return Packed(jax.jit(jnp.transpose)(self.w),
                  layout="in_out" if self.layout == "out_in" else "out_in")


def is_prepared(params) -> bool:
  return isinstance(params.get("head"), Packed)


def layout_of(params) -> str:
  return params["head"].layout


def first_layers(params, n: int):
  """The first n layers of a prepared tree with the same norm and head (an early-exit
  draft); shares arrays."""
  return {**params, "layers": params["layers"][:n]}


def prepare(cfg: ModelConfig, params, dtype=None, layout: str = "out_in"):
  """The module's parameter tree (scanned or unrolled) in `layout`, in `dtype` (default
  cfg.param_dtype). Run once per model; a prepared tree in `layout` passes through unchanged
  (in the other layout its matrices are transposed)."""
  if layout not in LAYOUTS:
    raise ValueError(f"layout={layout!r} is not one of {LAYOUTS}")
  if is_prepared(params):
    if layout_of(params) == layout:
      return params
    flip = lambda x: x.transposed() if isinstance(x, Packed) else x
    return jax.tree.map(flip, params, is_leaf=lambda x: isinstance(x, Packed))
  dtype = cfg.weight_dtype if dtype is None else dtype
  d, n, k, h = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
  if cfg.scan_layers:
    layer = lambda i: jax.tree.map(lambda x: x[i], params["layers"])  # slices Quantized too
  else:
    layer = lambda i: params[f"layers_{i}"]
  # Quantized weights (model/quant.py) stay quantized, as [in, out] matrices in either layout.
  cast = lambda x: x if quant.is_quantized(x) else jnp.asarray(x, dtype)
  # The module stores every matrix [in, out]: "in_out" takes them as they are.
  packed = lambda x: Packed(cast(x if layout == "in_out" else x.T), layout)

  def matrix(w, shape):  # [in, out]
    return quant.matrix(w) if quant.is_quantized(w) else w.reshape(shape)

  def fused(ws):  # [in, sum of outs]
    if quant.is_quantized(ws[0]):
      return Packed(quant.concat_out(ws), "in_out")
    return packed(jnp.concatenate(ws, axis=1))

  def one(w):  # concat_out of one: double-quantized scales stored plain, not redone each step
    return Packed(quant.concat_out([w]), "in_out") if quant.is_quantized(w) else packed(w)

  @jax.jit
  def fuse(p):
    p = jax.tree.map(cast, p, is_leaf=quant.is_quantized)
    attn = {name: w for name, w in p["attn"].items() if name not in ("q", "k", "v", "o")}
    a = p["attn"]
    attn["qkv"] = fused([matrix(a["q"], (d, n * h)), matrix(a["k"], (d, k * h)),  # [D, (N+2K)H]
                         matrix(a["v"], (d, k * h))])
    attn["o"] = one(matrix(a["o"], (n * h, d)))
    out = {**p, "attn": attn}
    if "mlp" in p:  # the experts of an MoE layer keep the module's layout (ragged_dot's)
      m = p["mlp"]
      out["mlp"] = {"gate_up": fused([m["gate"], m["up"]]), "down": one(m["down"])}
    return out

  embedding = cast(params["embedding"])
  if cfg.value_head:
    raise ValueError("model.value_head=True: a scalar-head model has no LM head to decode with")
  if cfg.tie_embeddings:
    head = Packed(embedding if layout == "out_in" else jax.jit(jnp.transpose)(embedding),
                  layout)
  else:
    head = packed(jnp.asarray(params["lm_head"]))  # the module's lm_head is [D, V]
  return {"embedding": embedding, "head": head,
          "final_norm": jax.tree.map(cast, params["final_norm"]),
          "layers": tuple(fuse(layer(i)) for i in range(cfg.n_layers))}
