"""The decoder's forward over a KV cache, with an inference layout of the same parameters.

Decoding one token is a chain of matrix-vector products that read every weight once, so its
speed is the speed of those reads. `prepare` lays the weights out once for them:
  qkv      [(N+2K)H, D]  q, k and v as one matrix: one read of x, one product instead of three
  o        [D, NH]
  gate_up  [2F, D]       gate and up as one matrix
  down     [D, F]
  head     [V, D]        the (tied) embedding, read row by row: the LM head is one product
(E in the einsums below names a fused output width: (N+2K)H or 2F.)
Two layouts of the same matrices, chosen by how many tokens a forward carries:
  "out_in"  as above, [out, in]: XLA's CPU matrix-vector product streams it fastest, so one
            token per row (plain decoding) runs near the memory bandwidth;
  "in_out"  each matrix transposed, [in, out]: 6% slower for one token, but a product of a few
            rows (speculative verification of k+1 tokens) costs 1.5x one token instead of
            2.4x in "out_in" (bench/RESULTS.md, SmolLM2's shapes, f32).
Products with 16-bit weights and a single row are given a second, zero row: XLA's CPU backend
runs a bf16 matrix-vector product at ~2 GB/s but a two-row product at ~22 GB/s (the extra row
is free: the product is bound by the weight reads). Nothing in the loop transposes a weight.

`forward` computes exactly what `Transformer.apply` computes with a cache (the same norm, RoPE,
attention and cache writes from model/layers.py; only the products are grouped), so
tests/test_infer_fused.py checks its logits against the module's. It serves prefill, decode
and speculative verification on the contiguous per-layer cache of infer/decode.py; training,
the paged cache and sharded inference keep the module.
"""

import flax
import jax
import jax.numpy as jnp

from model.config import ModelConfig
from model.kv_cache import EmptyCache, KVCache
from model.layers import apply_rope, contiguous_cache_attention, rms_norm, rope_table


LAYOUTS = ("out_in", "in_out")
MATRICES = ("qkv", "o", "gate_up", "down")


@flax.struct.dataclass
class FusedLayer:
  attn_norm: jax.Array  # [D]
  qkv: jax.Array  # [(N+2K)H, D] ("in_out": transposed, as every matrix here)
  o: jax.Array  # [D, NH]
  mlp_norm: jax.Array  # [D]
  gate_up: jax.Array  # [2F, D]
  down: jax.Array  # [D, F]


@flax.struct.dataclass
class FusedParams:
  embedding: jax.Array  # [V, D]: the input embedding
  head: jax.Array  # [V, D] ("in_out": [D, V]); the embedding itself when tied and "out_in"
  final_norm: jax.Array  # [D]
  layers: tuple  # FusedLayer per layer
  layout: str = flax.struct.field(pytree_node=False, default="out_in")

  def first_layers(self, n: int) -> "FusedParams":
    """The first n layers with the same norm and head (an early-exit draft); shares arrays."""
    return self.replace(layers=self.layers[:n])


def prepare(cfg: ModelConfig, params, dtype=None, layout: str = "out_in") -> FusedParams:
  """The module's parameter tree (scanned or unrolled) in `layout`, in `dtype` (default
  cfg.param_dtype). Run once per model; a FusedParams in `layout` passes through unchanged
  (in the other layout it is transposed)."""
  if layout not in LAYOUTS:
    raise ValueError(f"layout={layout!r} is not one of {LAYOUTS}")
  if isinstance(params, FusedParams):
    return params if params.layout == layout else _transposed(params)
  dtype = cfg.weight_dtype if dtype is None else dtype
  d, n, k, h = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
  if cfg.scan_layers:
    layer = lambda i: jax.tree.map(lambda x: x[i], params["layers"])
  else:
    layer = lambda i: params[f"layers_{i}"]
  cast = lambda x: jnp.asarray(x, dtype)

  # The module stores every matrix [in, out]: "in_out" takes them as they are.
  orient = (lambda x: x) if layout == "in_out" else jnp.transpose

  @jax.jit
  def fuse(p):
    a, m = p["attn"], p["mlp"]
    mats = dict(qkv=jnp.concatenate([a["q"].reshape(d, n * h), a["k"].reshape(d, k * h),
                                     a["v"].reshape(d, k * h)], axis=1),  # [D, E]
                o=a["o"].reshape(n * h, d),
                gate_up=jnp.concatenate([m["gate"], m["up"]], axis=1),  # [D, 2F]
                down=m["down"])
    return FusedLayer(attn_norm=cast(p["attn_norm"]["scale"]),
                      mlp_norm=cast(p["mlp_norm"]["scale"]),
                      **{name: cast(orient(x)) for name, x in mats.items()})

  embedding = cast(params["embedding"])
  if cfg.tie_embeddings:
    head = embedding if layout == "out_in" else jax.jit(jnp.transpose)(embedding)
  else:
    head = cast(orient(jnp.asarray(params["lm_head"])))  # the module's lm_head is [D, V]
  return FusedParams(embedding=embedding, head=head,
                     final_norm=cast(params["final_norm"]["scale"]),
                     layers=tuple(fuse(layer(i)) for i in range(cfg.n_layers)), layout=layout)


def _transposed(p: FusedParams) -> FusedParams:
  """The same weights in the other layout (a copy of every matrix; the embedding stays)."""
  t = jax.jit(jnp.transpose)
  layers = tuple(w.replace(**{m: t(getattr(w, m)) for m in MATRICES}) for w in p.layers)
  return p.replace(head=t(p.head), layers=layers,
                   layout="in_out" if p.layout == "out_in" else "out_in")


def _product(x_BTI, w, layout: str, accumulate=None):
  """x @ w.T for w [out, in] ("out_in") or x @ w for w [in, out] ("in_out"): [B, T, out]."""
  b, t, _ = x_BTI.shape
  pad = b * t == 1 and w.dtype.itemsize < 4  # see the module docstring
  if pad:
    x_BTI = jnp.concatenate([x_BTI, jnp.zeros_like(x_BTI)], axis=0)
  y = jnp.einsum("BTI,OI->BTO" if layout == "out_in" else "BTI,IO->BTO", x_BTI, w,
                 preferred_element_type=accumulate)
  return y[:1] if pad else y


def _layer(cfg: ModelConfig, w: FusedLayer, x_BTD, rope, segment_ids, start, layer_kv, layout):
  b, t, _ = x_BTD.shape
  n, k, h, f, dt = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff, cfg.compute_dtype
  qkv = _product(rms_norm(x_BTD, w.attn_norm, cfg), w.qkv.astype(dt), layout)  # [B, T, E]
  q = apply_rope(qkv[..., :n * h].reshape(b, t, n, h), rope)
  key = apply_rope(qkv[..., n * h:(n + k) * h].reshape(b, t, k, h), rope)
  val = qkv[..., (n + k) * h:].reshape(b, t, k, h)
  out, layer_kv = contiguous_cache_attention(q, key, val, layer_kv, start, segment_ids, cfg)
  x_BTD = x_BTD + _product(out.reshape(b, t, n * h), w.o.astype(dt), layout)
  gate_up = _product(rms_norm(x_BTD, w.mlp_norm, cfg), w.gate_up.astype(dt), layout)
  hidden = jax.nn.silu(gate_up[..., :f]) * gate_up[..., f:]  # [B, T, F]
  x_BTD = x_BTD + _product(hidden, w.down.astype(dt), layout)
  return x_BTD, layer_kv


def forward(cfg: ModelConfig, params: FusedParams, tokens, positions, segment_ids=None, *,
            cache: KVCache, empty_cache: bool = False, logits_at=None):
  """(logits f32[B, T, V], cache) as `Transformer(cfg).apply` with a contiguous cache held as
  one buffer per layer. tokens, positions, segment_ids: int32[B, T] (segment_ids 0 = right
  padding, not counted in the new lengths). Uses len(params.layers) layers.
  empty_cache and logits_at (int32[B]: logits f32[B, V] there only) as in model/transformer.py."""
  x = jnp.take(params.embedding, tokens, axis=0).astype(cfg.compute_dtype)
  rope = rope_table(positions, cfg)
  start = EmptyCache() if empty_cache else cache.lengths
  segments = segment_ids if empty_cache else None  # used only where tokens attend each other
  ks, vs = [], []
  for i, w in enumerate(params.layers):
    x, (k_i, v_i) = _layer(cfg, w, x, rope, segments, start, (cache.k[i], cache.v[i]),
                           params.layout)
    ks.append(k_i)
    vs.append(v_i)
  if logits_at is not None:  # [B, 1, D]: norm and head only where they are read
    x = jnp.take_along_axis(x, logits_at[:, None, None], axis=1)
  x = rms_norm(x, params.final_norm, cfg)
  logits = _product(x, params.head.astype(cfg.compute_dtype), params.layout,
                    accumulate=jnp.float32)  # [B, T, V] (or [B, 1, V])
  if logits_at is not None:
    logits = logits[:, 0]
  t = tokens.shape[1]
  added = t if segment_ids is None else jnp.sum(segment_ids != 0, axis=1).astype(jnp.int32)
  return logits, KVCache(k=tuple(ks), v=tuple(vs), lengths=cache.lengths + added)
