"""The decoder block, once, as pure functions of its weights: what training, prefill,
decoding, speculative verification, the paged engine and sharded inference all run.

A block is pre-norm attention then a feed-forward (SwiGLU/GeGLU MLP, or a mixture of experts:
model/moe.py), each added to the residual stream. The families are options of the config
(model/config.py): q/k/v biases (Qwen2), per-head q/k norms (Qwen3, Gemma 3), GeGLU and
(1 + w) norms and post-norms (Gemma), local layers with their own window and RoPE base
(Mistral, Gemma 2/3), attention soft-capping (Gemma 2).

A weight is whatever the parameter tree holds at its place:
  the module's array   q [D, N, H], k/v [D, K, H], o [N, H, D], gate/up [D, F], down [F, D],
                       applied by einsum (training, and any tree from `Transformer.init`);
  a quant.Quantized    any of those quantized (model/quant.py), dequantized where used;
  a lora.Adapted       any of those with its LoRA adapter, applied unmerged (`project`);
  a fused.Packed       the inference layout of model/fused.py: q, k and v as one "qkv"
                       matrix, gate and up as one "gate_up", [out, in] or [in, out];
  a capture.Capture    calibration only (model/calibrate.py): stops the block, raising the
                       weight's input.
The block asks which it holds and runs the same math either way. Parameters are stored in
`param_dtype` and cast to the compute dtype where they are used; activations carry logical
axis names (`constrain`) that the rules in model/sharding.py map onto the mesh.
"""

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from model import kv_cache, moe, sharding
from model.capture import Capture
from model.config import ModelConfig
from model.fused import Packed
from model.lora import Adapted
from model.sharding import constrain
from pallas_kernels.attention import attention, attention_path, cached_attention


def rms_norm(x, scale, cfg: ModelConfig):
  """RMSNorm over the last axis, times `scale` (times 1 + scale with cfg.norm_plus_one)."""
  # Normalise in f32 even under bf16 compute: the mean of squares loses precision otherwise.
  x32 = x.astype(jnp.float32)
  y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + cfg.norm_eps)
  scale = scale.astype(jnp.float32)
  return (y * (1.0 + scale if cfg.norm_plus_one else scale)).astype(cfg.compute_dtype)


def rope_inv_freq(cfg: ModelConfig, theta: float | None = None, scaled: bool = True
                  ) -> jax.Array:
  """Inverse frequencies [H/2] for base `theta` (default cfg.rope_theta), scaled (when
  `scaled` and rope_scaling_factor > 0) as rope_scaling_type says."""
  h = cfg.head_dim
  theta = cfg.rope_theta if theta is None else theta
  inv_freq = 1.0 / (theta ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h))
  if not scaled or cfg.rope_scaling_factor <= 0:
    return inv_freq
  factor = cfg.rope_scaling_factor
  if cfg.rope_scaling_type == "linear":
    # Position Interpolation (Chen et al. 2023): position m becomes m / factor.
    return inv_freq / factor
  # Llama 3.1: keep high frequencies, divide low ones by the factor, interpolate in between.
  orig = cfg.rope_original_max_len
  low_wavelen = orig / cfg.rope_low_freq_factor
  high_wavelen = orig / cfg.rope_high_freq_factor
  wavelen = 2 * math.pi / inv_freq
  smooth = (orig / wavelen - cfg.rope_low_freq_factor) / (
      cfg.rope_high_freq_factor - cfg.rope_low_freq_factor)
  mid = (1 - smooth) * inv_freq / factor + smooth * inv_freq
  return jnp.where(wavelen < high_wavelen, inv_freq,
                   jnp.where(wavelen > low_wavelen, inv_freq / factor, mid))


def rope_table(positions_BT, cfg: ModelConfig, theta: float | None = None,
               scaled: bool = True):
  """(sin, cos), each f32[B, T, 1, H/2]: computed once per forward, shared by the layers."""
  inv_freq = rope_inv_freq(cfg, theta, scaled)
  angles = positions_BT[:, :, None, None].astype(jnp.float32) * inv_freq[None, None, None, :]
  return jnp.sin(angles), jnp.cos(angles)


def rope_tables(positions_BT, cfg: ModelConfig) -> dict:
  """{"global": table, "local": table}. With rope_local_theta the local layers have their own
  base and no scaling (Gemma 3 scales only its global layers); without, the global table."""
  tables = {"global": rope_table(positions_BT, cfg)}
  local = cfg.rope_local_theta
  same = not local or (local == cfg.rope_theta and cfg.rope_scaling_factor <= 0)
  tables["local"] = (tables["global"] if same else
                     rope_table(positions_BT, cfg, local, scaled=False))
  return tables


def apply_rope(x_BTNH, rope):
  """Rotates the two halves of each head (the HF Llama layout, not llama.cpp's interleaved)."""
  sin, cos = rope
  x1, x2 = jnp.split(x_BTNH.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BTNH.dtype)


def attention_options(cfg: ModelConfig, local: bool) -> dict:
  """The kernels' keyword options of one layer: its window, the scores' scale and cap."""
  return {"sliding_window": cfg.sliding_window if local and cfg.sliding_window else None,
          "scale": cfg.attn_scale or None, "softcap": cfg.attn_softcap or None}


def self_attention(q_BTNH, k_BTKH, v_BTKH, segment_ids, cfg: ModelConfig, local=False):
  """Causal attention within packed segments, through the kernels' one entry point.

  A pallas_call is opaque to XLA's partitioner, which would gather its inputs onto every
  device; under a mesh the kernel runs per shard instead: rows over the batch axes, heads over
  tensor when the kv heads divide evenly (else every tensor shard computes all heads). Whether
  the kernel runs is asked of the mesh's devices, not of this process's default backend: a
  step compiled for TPU devices from a CPU-only host runs the kernel.
  """
  if segment_ids is None:
    segment_ids = jnp.ones(q_BTNH.shape[:2], jnp.int32)
  fn = functools.partial(attention, causal=True, impl=cfg.attention_impl,
                         **attention_options(cfg, local))
  mesh = sharding.current_mesh()
  if mesh is None or attention_path(
      mesh.devices.flat[0].platform, head_dim=q_BTNH.shape[-1], dtype=q_BTNH.dtype,
      kv_dtype=k_BTKH.dtype, impl=cfg.attention_impl).impl != "pallas":
    return fn(q_BTNH, k_BTKH, v_BTKH, segment_ids=segment_ids)
  heads = "tensor" if cfg.n_kv_heads % mesh.shape["tensor"] == 0 else None
  rows = sharding.BATCH_AXES
  qkv_spec = P(rows, None, heads, None)
  return jax.shard_map(lambda q, k, v, s: fn(q, k, v, segment_ids=s), mesh=mesh,
                       in_specs=(qkv_spec, qkv_spec, qkv_spec, P(rows, None)),
                       out_specs=qkv_spec, check_vma=False)(q_BTNH, k_BTKH, v_BTKH, segment_ids)


def _store(k_BTKH, v_BTKH, layer_kv):
  """What a forward writes into the cache: (k, v), or for an int8 cache (layer_kv holds
  scales too) (k codes, v codes, k scales, v scales), quantized per token and head."""
  if len(layer_kv) == 2:
    return k_BTKH, v_BTKH
  (k, k_scale), (v, v_scale) = kv_cache.quantize(k_BTKH), kv_cache.quantize(v_BTKH)
  return k, v, k_scale, v_scale


def _scales(layer_kv) -> dict:
  return {} if len(layer_kv) == 2 else dict(k_scales=layer_kv[2], v_scales=layer_kv[3])


def cache_attention(q_BTNH, k_BTKH, v_BTKH, layer_kv, start, segment_ids, cfg: ModelConfig,
                    local=False):
  """Writes the new K/V into one layer's cache and attends: (out [B, T, N, H], new layer_kv).

  layer_kv: the layer's cache arrays, (k, v) or, int8, (k, v, k_scale, v_scale) (the new K/V
  are quantized as they are written: model/kv_cache.py).
  start: a kv_cache.PageTable (layer_kv: this layer's page pools, [K, pages, P, H] each, scales
  [K, pages, P]) or a kv_cache.PackedTables (B = 1: groups of rows packed into one row);
  int32[B], the tokens each row of a contiguous cache ([B, S, K, H] each, scales [B, S, K])
  already holds: the new ones go to slots start[b] + t and attend to the
  cache; or kv_cache.EmptyCache() (prefill): they attend only to each other through
  `self_attention` (flash attention on TPU/GPU, on the unquantized K/V), so no [B, K, G, T, S]
  scores are formed; segment_ids (0 = right padding) keep the padding from being attended to.
  """
  opts = attention_options(cfg, local)
  new = _store(k_BTKH, v_BTKH, layer_kv)
  if isinstance(start, (kv_cache.PageTable, kv_cache.PackedTables)):
    # Imported here: the paged kernel is optional for everything but the paged path.
    from pallas_kernels.paged_attention import paged_attention
    # Every row writes before any row reads: one scatter into each pool (XLA copies a whole
    # pool to scatter into it after a read of it, as packed groups one by one would).
    layer_kv = tuple(kv_cache.write_pages(c, n, start) for c, n in zip(layer_kv, new))
    attend = lambda q, table: paged_attention(
        q, layer_kv[0], layer_kv[1], table.lengths + q.shape[1], table.page_indices,
        impl=cfg.attention_impl, **_scales(layer_kv), **opts)
    if isinstance(start, kv_cache.PageTable):
      return attend(q_BTNH, start), layer_kv
    # Packed groups of rows (one [1, N] row here), each through its own table.
    return start.join([attend(q, table) for q, table in zip(start.split(q_BTNH), start.tables)]
                      ), layer_kv
  if isinstance(start, kv_cache.EmptyCache):
    t = q_BTNH.shape[1]
    layer_kv = tuple(c.at[:, :t].set(n.astype(c.dtype)) for c, n in zip(layer_kv, new))
    out = self_attention(q_BTNH, k_BTKH, v_BTKH, segment_ids, cfg, local)
    return out, layer_kv
  layer_kv = tuple(kv_cache.write(c, n, start) for c, n in zip(layer_kv, new))
  out = cached_attention(q_BTNH, layer_kv[0], layer_kv[1], start + q_BTNH.shape[1],
                         impl=cfg.attention_impl, **_scales(layer_kv), **opts)
  return out, layer_kv


def project(equation: str, x, w, dtype):
  """jnp.einsum(equation, x, w) in dtype for a block weight of the module's layout: an array,
  a model/quant.py Quantized (dequantized by astype, inside the product's fusion under jit), a
  model/lora.py Adapted (x W + s (x A) B, unmerged) or a `Capture` (raises with x)."""
  if isinstance(w, (Adapted, Capture)):
    return w.project(equation, x, dtype)
  return jnp.einsum(equation, x, w.astype(dtype))


def attention_layer(cfg: ModelConfig, w, x_BTD, rope, segment_ids, start, layer_kv, local):
  """Attention of one block. w: {"q", "k", "v", "o"} or {"qkv", "o"} (Packed), plus
  "q_bias"/"k_bias"/"v_bias" [N|K, H] and "q_norm"/"k_norm" {"scale": [H]} per the config.
  Returns (y [B, T, D], the layer's new K/V or None without a cache)."""
  b, t, _ = x_BTD.shape
  n, k, h, dt = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.compute_dtype
  if "qkv" in w:  # one product for q, k and v
    qkv = w["qkv"](x_BTD, dt)  # [B, T, (N+2K)H]
    q = qkv[..., :n * h].reshape(b, t, n, h)
    key = qkv[..., n * h:(n + k) * h].reshape(b, t, k, h)
    val = qkv[..., (n + k) * h:].reshape(b, t, k, h)
  else:
    q = project("BTD,DNH->BTNH", x_BTD, w["q"], dt)
    key = project("BTD,DKH->BTKH", x_BTD, w["k"], dt)
    val = project("BTD,DKH->BTKH", x_BTD, w["v"], dt)
  if cfg.qkv_bias:
    q, key, val = (y + w[f"{name}_bias"].astype(dt)
                   for y, name in ((q, "q"), (key, "k"), (val, "v")))
  if cfg.qk_norm:
    q = rms_norm(q, w["q_norm"]["scale"], cfg)
    key = rms_norm(key, w["k_norm"]["scale"], cfg)
  q = constrain(apply_rope(q, rope), ("batch", "length", "act_heads", None))
  key = constrain(apply_rope(key, rope), ("batch", "length", "act_kv_heads", None))
  val = constrain(val, ("batch", "length", "act_kv_heads", None))

  if layer_kv is None:
    out, new_kv = self_attention(q, key, val, segment_ids, cfg, local), None
  else:
    out, new_kv = cache_attention(q, key, val, layer_kv, start, segment_ids, cfg, local)
  out = constrain(out, ("batch", "length", "act_heads", None))
  if isinstance(w["o"], Packed):
    y = w["o"](out.reshape(b, t, n * h), dt)
  else:
    y = project("BTNH,NHD->BTD", out, w["o"], dt)
  return constrain(y, ("batch", "length", "act_embed")), new_kv


def activation(cfg: ModelConfig, x):
  if cfg.mlp_activation == "gelu_tanh":  # Gemma's GeGLU: PyTorch's gelu(approximate="tanh")
    return jax.nn.gelu(x, approximate=True)
  return jax.nn.silu(x)


def mlp(cfg: ModelConfig, w, x_BTD):
  """The gated MLP: down(act(gate(x)) * up(x)). w: {"gate", "up", "down"} or
  {"gate_up", "down"} (Packed)."""
  dt = cfg.compute_dtype
  if "gate_up" in w:
    gate_up = w["gate_up"](x_BTD, dt)  # [B, T, 2F]
    f = gate_up.shape[-1] // 2
    gate, up = gate_up[..., :f], gate_up[..., f:]
  else:
    gate = project("BTD,DF->BTF", x_BTD, w["gate"], dt)
    up = project("BTD,DF->BTF", x_BTD, w["up"], dt)
  hidden = constrain(activation(cfg, gate) * up, ("batch", "length", "act_mlp"))
  if isinstance(w["down"], Packed):
    y = w["down"](hidden, dt)
  else:
    y = project("BTF,FD->BTD", hidden, w["down"], dt)
  return constrain(y, ("batch", "length", "act_embed"))


def block(cfg: ModelConfig, w, x_BTD, rope, segment_ids, start, layer_kv, *, local: bool,
          token_mask=None):
  """One decoder block: (x [B, T, D], new layer K/V or None, moe.MoEAux or None).

  w: the layer's weights {"attn_norm", "attn", "mlp_norm", "mlp" | "moe"} (+ "post_attn_norm",
  "post_mlp_norm" with cfg.post_norms). rope: this layer's (sin, cos). segment_ids: int32[B, T]
  for tokens attending to each other, or None. start/layer_kv: as `cache_attention`, None
  without a cache. local (static): the layer attends through cfg.sliding_window.
  token_mask: bool[B, T], False at padding (the experts' statistics skip it).
  """
  h, new_kv = attention_layer(cfg, w["attn"], rms_norm(x_BTD, w["attn_norm"]["scale"], cfg),
                              rope, segment_ids, start, layer_kv, local)
  if cfg.post_norms:
    h = rms_norm(h, w["post_attn_norm"]["scale"], cfg)
  x_BTD = x_BTD + h
  h = rms_norm(x_BTD, w["mlp_norm"]["scale"], cfg)
  if cfg.n_experts:
    h, aux = moe.moe(cfg, w["moe"], h, token_mask)
  else:
    h, aux = mlp(cfg, w["mlp"], h), None
  if cfg.post_norms:
    h = rms_norm(h, w["post_mlp_norm"]["scale"], cfg)
  return constrain(x_BTD + h, ("batch", "length", "act_embed")), new_kv, aux
