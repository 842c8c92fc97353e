"""The decoder's forward over a KV cache, with an inference layout of the same parameters.

Decoding one token is a chain of matrix-vector products that read every weight once, so its
speed is the speed of those reads. `prepare` lays the weights out once for them:
  qkv      [(N+2K)H, D]  q, k and v as one matrix: one read of x, one product instead of three
  o        [D, NH]
  gate_up  [2F, D]       gate and up as one matrix
  down     [D, F]
  head     [V, D]        the (tied) embedding, read row by row: the LM head is one product
(E in the einsums below names a fused output width: (N+2K)H or 2F.)
Every matrix is stored [out, in] (row-major along the input), the order in which XLA's CPU
matrix-vector product streams fastest (bench/RESULTS.md: ~15% over [in, out] on SmolLM2's
shapes); nothing in the loop transposes a weight.

`forward` computes exactly what `Transformer.apply` computes with a cache (the same norm, RoPE,
attention and cache writes from model/layers.py; only the products are grouped), so
tests/test_infer_fused.py checks its logits against the module's. It serves prefill, decode
and speculative verification on the contiguous per-layer cache of infer/decode.py; training,
the paged cache and sharded inference keep the module.
"""

import flax
import jax
import jax.numpy as jnp

from model import kv_cache
from model.config import ModelConfig
from model.kv_cache import KVCache
from model.layers import apply_rope, rms_norm, rope_table
from pallas_kernels.attention import cached_attention


@flax.struct.dataclass
class FusedLayer:
  attn_norm: jax.Array  # [D]
  qkv: jax.Array  # [(N+2K)H, D]
  o: jax.Array  # [D, NH]
  mlp_norm: jax.Array  # [D]
  gate_up: jax.Array  # [2F, D]
  down: jax.Array  # [D, F]


@flax.struct.dataclass
class FusedParams:
  embedding: jax.Array  # [V, D]: the input embedding
  head: jax.Array  # [V, D]: the output head (the same array when tied)
  final_norm: jax.Array  # [D]
  layers: tuple  # FusedLayer per layer

  def first_layers(self, n: int) -> "FusedParams":
    """The first n layers with the same norm and head (an early-exit draft); shares arrays."""
    return self.replace(layers=self.layers[:n])


def prepare(cfg: ModelConfig, params, dtype=None) -> FusedParams:
  """The module's parameter tree (scanned or unrolled) in the layout above, in `dtype`
  (default cfg.param_dtype). Run once per model; a FusedParams passes through unchanged."""
  if isinstance(params, FusedParams):
    return params
  dtype = cfg.weight_dtype if dtype is None else dtype
  d, n, k, h = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
  if cfg.scan_layers:
    layer = lambda i: jax.tree.map(lambda x: x[i], params["layers"])
  else:
    layer = lambda i: params[f"layers_{i}"]
  cast = lambda x: jnp.asarray(x, dtype)

  @jax.jit
  def fuse(p):
    a, m = p["attn"], p["mlp"]
    qkv = jnp.concatenate([a["q"].reshape(d, n * h), a["k"].reshape(d, k * h),
                           a["v"].reshape(d, k * h)], axis=1)
    return FusedLayer(attn_norm=cast(p["attn_norm"]["scale"]), qkv=cast(qkv.T),
                      o=cast(a["o"].reshape(n * h, d).T), mlp_norm=cast(p["mlp_norm"]["scale"]),
                      gate_up=cast(jnp.concatenate([m["gate"], m["up"]], axis=1).T),
                      down=cast(m["down"].T))

  embedding = cast(params["embedding"])
  head = embedding if cfg.tie_embeddings else cast(jnp.asarray(params["lm_head"]).T)
  return FusedParams(embedding=embedding, head=head,
                     final_norm=cast(params["final_norm"]["scale"]),
                     layers=tuple(fuse(layer(i)) for i in range(cfg.n_layers)))


def _layer(cfg: ModelConfig, w: FusedLayer, x_BTD, rope, start_B, k_cache, v_cache):
  b, t, _ = x_BTD.shape
  n, k, h, f, dt = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff, cfg.compute_dtype
  qkv = jnp.einsum("BTD,ED->BTE", rms_norm(x_BTD, w.attn_norm, cfg), w.qkv.astype(dt))
  q = apply_rope(qkv[..., :n * h].reshape(b, t, n, h), rope)
  key = apply_rope(qkv[..., n * h:(n + k) * h].reshape(b, t, k, h), rope)
  val = qkv[..., (n + k) * h:].reshape(b, t, k, h)
  k_cache = kv_cache.write(k_cache, key, start_B)
  v_cache = kv_cache.write(v_cache, val, start_B)
  out = cached_attention(q, k_cache, v_cache, start_B + t, impl=cfg.attention_impl)
  x_BTD = x_BTD + jnp.einsum("BTE,DE->BTD", out.reshape(b, t, n * h), w.o.astype(dt))
  gate_up = jnp.einsum("BTD,ED->BTE", rms_norm(x_BTD, w.mlp_norm, cfg), w.gate_up.astype(dt))
  hidden = jax.nn.silu(gate_up[..., :f]) * gate_up[..., f:]
  x_BTD = x_BTD + jnp.einsum("BTF,DF->BTD", hidden, w.down.astype(dt))
  return x_BTD, k_cache, v_cache


def forward(cfg: ModelConfig, params: FusedParams, tokens, positions, segment_ids=None, *,
            cache: KVCache):
  """(logits f32[B, T, V], cache) as `Transformer(cfg).apply` with a contiguous cache held as
  one buffer per layer. tokens, positions, segment_ids: int32[B, T] (segment_ids 0 = right
  padding, not counted in the new lengths). Uses len(params.layers) layers."""
  x = jnp.take(params.embedding, tokens, axis=0).astype(cfg.compute_dtype)
  rope = rope_table(positions, cfg)
  ks, vs = [], []
  for i, w in enumerate(params.layers):
    x, k_i, v_i = _layer(cfg, w, x, rope, cache.lengths, cache.k[i], cache.v[i])
    ks.append(k_i)
    vs.append(v_i)
  x = rms_norm(x, params.final_norm, cfg)
  logits = jnp.einsum("BTD,VD->BTV", x, params.head.astype(cfg.compute_dtype),
                      preferred_element_type=jnp.float32)
  t = tokens.shape[1]
  added = t if segment_ids is None else jnp.sum(segment_ids != 0, axis=1).astype(jnp.int32)
  return logits, KVCache(k=tuple(ks), v=tuple(vs), lengths=cache.lengths + added)
