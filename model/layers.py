"""The decoder's parts: RMSNorm, RoPE, grouped-query attention, SwiGLU MLP, and the block.

Parameters are stored in `param_dtype` (f32 master weights) and cast to the compute dtype
where they are used. Every parameter and activation carries logical axis names; the rules in
`model/sharding.py` map them onto the mesh.
"""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from jax.sharding import PartitionSpec as P

from model import kv_cache, sharding
from model.config import ModelConfig
from model.sharding import constrain
from pallas_kernels.attention import attention, attention_path, cached_attention


def _param(module, name, init, shape, axes, dtype):
  return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


def rms_norm(x, scale, cfg: ModelConfig):
  """RMSNorm over the last axis; shared by the module and model/fused.py."""
  # Normalise in f32 even under bf16 compute: the mean of squares loses precision otherwise.
  x32 = x.astype(jnp.float32)
  y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + cfg.norm_eps)
  return (y * scale.astype(jnp.float32)).astype(cfg.compute_dtype)


class RMSNorm(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x):
    scale = _param(self, "scale", nn.initializers.ones, (x.shape[-1],), ("norm",),
                   self.cfg.weight_dtype)
    return rms_norm(x, scale, self.cfg)


def rope_inv_freq(cfg: ModelConfig) -> jax.Array:
  """Inverse frequencies [H/2], with Llama-3.1 frequency scaling when rope_scaling_factor > 0."""
  h = cfg.head_dim
  inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h))
  if cfg.rope_scaling_factor <= 0:
    return inv_freq
  # Llama 3.1: keep high frequencies, divide low ones by the factor, interpolate in between.
  factor, orig = cfg.rope_scaling_factor, cfg.rope_original_max_len
  low_wavelen = orig / cfg.rope_low_freq_factor
  high_wavelen = orig / cfg.rope_high_freq_factor
  wavelen = 2 * math.pi / inv_freq
  smooth = (orig / wavelen - cfg.rope_low_freq_factor) / (
      cfg.rope_high_freq_factor - cfg.rope_low_freq_factor)
  mid = (1 - smooth) * inv_freq / factor + smooth * inv_freq
  return jnp.where(wavelen < high_wavelen, inv_freq,
                   jnp.where(wavelen > low_wavelen, inv_freq / factor, mid))


def rope_table(positions_BT, cfg: ModelConfig):
  """(sin, cos), each f32[B, T, 1, H/2]: computed once per forward, shared by every layer."""
  angles = positions_BT[:, :, None, None].astype(jnp.float32) * rope_inv_freq(cfg)
  return jnp.sin(angles), jnp.cos(angles)


def apply_rope(x_BTNH, rope):
  """Rotates the two halves of each head (the HF Llama layout, not llama.cpp's interleaved)."""
  sin, cos = rope
  x1, x2 = jnp.split(x_BTNH.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BTNH.dtype)


def self_attention(q_BTNH, k_BTKH, v_BTKH, segment_ids, cfg: ModelConfig):
  """Causal attention within packed segments, through the kernels' one entry point.

  A pallas_call is opaque to XLA's partitioner, which would gather its inputs onto every
  device; under a mesh the kernel runs per shard instead: rows over (data, fsdp), heads over
  tensor when the kv heads divide evenly (else every tensor shard computes all heads). Whether
  the kernel runs is asked of the mesh's devices, not of this process's default backend: a
  step compiled for TPU devices from a CPU-only host runs the kernel.
  """
  if segment_ids is None:
    segment_ids = jnp.ones(q_BTNH.shape[:2], jnp.int32)
  fn = functools.partial(attention, causal=True, impl=cfg.attention_impl)
  mesh = sharding.current_mesh()
  if mesh is None or attention_path(
      mesh.devices.flat[0].platform, head_dim=q_BTNH.shape[-1], dtype=q_BTNH.dtype,
      kv_dtype=k_BTKH.dtype, impl=cfg.attention_impl).impl != "pallas":
    return fn(q_BTNH, k_BTKH, v_BTKH, segment_ids=segment_ids)
  heads = "tensor" if cfg.n_kv_heads % mesh.shape["tensor"] == 0 else None
  qkv_spec = P(("data", "fsdp"), None, heads, None)
  return jax.shard_map(lambda q, k, v, s: fn(q, k, v, segment_ids=s), mesh=mesh,
                       in_specs=(qkv_spec, qkv_spec, qkv_spec, P(("data", "fsdp"), None)),
                       out_specs=qkv_spec, check_vma=False)(q_BTNH, k_BTKH, v_BTKH, segment_ids)


class Attention(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BTD, rope, segment_ids, start, layer_kv):
    cfg = self.cfg
    d, n, k, h = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    init = nn.initializers.normal(cfg.init_std)
    out_init = nn.initializers.normal(cfg.init_std / math.sqrt(2 * cfg.n_layers))
    wq = _param(self, "q", init, (d, n, h), ("embed", "heads", "head_dim"), cfg.weight_dtype)
    wk = _param(self, "k", init, (d, k, h), ("embed", "kv_heads", "head_dim"), cfg.weight_dtype)
    wv = _param(self, "v", init, (d, k, h), ("embed", "kv_heads", "head_dim"), cfg.weight_dtype)
    wo = _param(self, "o", out_init, (n, h, d), ("heads", "head_dim", "embed"), cfg.weight_dtype)
    dt = cfg.compute_dtype

    q = jnp.einsum("BTD,DNH->BTNH", x_BTD, wq.astype(dt))
    key = jnp.einsum("BTD,DKH->BTKH", x_BTD, wk.astype(dt))
    val = jnp.einsum("BTD,DKH->BTKH", x_BTD, wv.astype(dt))
    q = constrain(apply_rope(q, rope), ("batch", "length", "act_heads", None))
    key = constrain(apply_rope(key, rope), ("batch", "length", "act_kv_heads", None))
    val = constrain(val, ("batch", "length", "act_kv_heads", None))

    if layer_kv is None:
      out = self_attention(q, key, val, segment_ids, cfg)
      new_kv = None
    elif isinstance(start, kv_cache.PageTable):  # paged cache: layer_kv is this layer's pool
      # Imported here: the paged kernel is optional for everything but the paged path.
      from pallas_kernels.paged_attention import paged_attention
      k_pages = kv_cache.write_pages(layer_kv[0], key, start)
      v_pages = kv_cache.write_pages(layer_kv[1], val, start)
      out = paged_attention(q, k_pages, v_pages, start.lengths + q.shape[1], start.page_indices,
                            impl=cfg.attention_impl)
      new_kv = (k_pages, v_pages)
    else:  # contiguous cache; start: int32[B] or kv_cache.EmptyCache()
      out, new_kv = contiguous_cache_attention(q, key, val, layer_kv, start, segment_ids, cfg)
    out = constrain(out, ("batch", "length", "act_heads", None))
    y = jnp.einsum("BTNH,NHD->BTD", out, wo.astype(dt))
    return constrain(y, ("batch", "length", "act_embed")), new_kv


def contiguous_cache_attention(q_BTNH, k_BTKH, v_BTKH, layer_kv, start, segment_ids,
                               cfg: ModelConfig):
  """Writes the new K/V into one layer's contiguous cache, layer_kv = (k, v), each
  [B, S, K, H], and attends: (out [B, T, N, H], (k, v)). Shared by `Attention` and
  model/fused.py.

  start: int32[B], the tokens each row already holds: the new ones (at slots start[b] + t)
  attend to the cache. Or kv_cache.EmptyCache() (prefill): they attend only to each other
  through `self_attention` (flash attention on TPU/GPU), so no [B, K, G, T, S] scores are
  formed; segment_ids (0 = right padding) keep the padding from being attended to.
  """
  k_cache, v_cache = layer_kv
  if isinstance(start, kv_cache.EmptyCache):
    t = q_BTNH.shape[1]
    k_cache = k_cache.at[:, :t].set(k_BTKH.astype(k_cache.dtype))
    v_cache = v_cache.at[:, :t].set(v_BTKH.astype(v_cache.dtype))
    return self_attention(q_BTNH, k_BTKH, v_BTKH, segment_ids, cfg), (k_cache, v_cache)
  k_cache = kv_cache.write(k_cache, k_BTKH, start)
  v_cache = kv_cache.write(v_cache, v_BTKH, start)
  out = cached_attention(q_BTNH, k_cache, v_cache, start + q_BTNH.shape[1],
                         impl=cfg.attention_impl)
  return out, (k_cache, v_cache)


class MLP(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BTD):
    cfg = self.cfg
    init = nn.initializers.normal(cfg.init_std)
    out_init = nn.initializers.normal(cfg.init_std / math.sqrt(2 * cfg.n_layers))
    d, f, dt = cfg.d_model, cfg.d_ff, cfg.compute_dtype
    w_gate = _param(self, "gate", init, (d, f), ("embed", "mlp"), cfg.weight_dtype)
    w_up = _param(self, "up", init, (d, f), ("embed", "mlp"), cfg.weight_dtype)
    w_down = _param(self, "down", out_init, (f, d), ("mlp", "embed"), cfg.weight_dtype)
    gate = jnp.einsum("BTD,DF->BTF", x_BTD, w_gate.astype(dt))
    up = jnp.einsum("BTD,DF->BTF", x_BTD, w_up.astype(dt))
    hidden = constrain(nn.silu(gate) * up, ("batch", "length", "act_mlp"))
    y = jnp.einsum("BTF,FD->BTD", hidden, w_down.astype(dt))
    return constrain(y, ("batch", "length", "act_embed"))


class Block(nn.Module):
  """Pre-norm residual block. Scanned over layers, so it returns (carry, per-layer output)."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BTD, rope, segment_ids, start, layer_kv):
    h, new_kv = Attention(self.cfg, name="attn")(
        RMSNorm(self.cfg, name="attn_norm")(x_BTD), rope, segment_ids, start, layer_kv)
    x_BTD = x_BTD + h
    x_BTD = x_BTD + MLP(self.cfg, name="mlp")(RMSNorm(self.cfg, name="mlp_norm")(x_BTD))
    return constrain(x_BTD, ("batch", "length", "act_embed")), new_kv
