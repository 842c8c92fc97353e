"""FlashAttention-2 (Dao 2023, Alg. 1 forward, Alg. 2 backward) as Pallas kernels.

  o = flash_attention(q, k, v, causal=True, segment_ids=None, sliding_window=None, softcap=None)

q [B, T, Hq, D], k/v [B, S, Hkv, D], Hq % Hkv == 0 (GQA: query head h reads KV head h // G,
G = Hq // Hkv, through the kernels' index maps; K/V are never repeated in memory). Key j is
visible to query i iff (not causal or j <= i) and (sliding_window is None or i - j < window)
and the two tokens share a segment id. Rows with no visible key output 0. softcap (Gemma 2)
bends the scaled scores to softcap * tanh(s / softcap) before the mask and the softmax.

The kernels pad T and S to whole blocks and mask the padding, so any length works; inputs may be
bf16 or f32 (scores, softmax statistics and accumulators are f32). The backward pass is two
Pallas kernels (dQ; dK and dV) joined to the forward by `jax.custom_vjp`, since a pallas_call
cannot be differentiated itself. The forward saves only O and the log-sum-exp L.

There are two kernel variants with the same block math (`_flash_common`): Mosaic for TPU
(`_flash_tpu`) and Triton for GPU (`_flash_gpu`). `paths.dispatch` picks one (or XLA) for the
platform the computation is lowered for, so one jitted function lowers for any platform.
`flash_attention_reference` is the same function in plain jnp.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import _flash_common as fc
from pallas_kernels import _flash_gpu
from pallas_kernels import _flash_tpu
from pallas_kernels.paths import attention_path, dispatch

BACKENDS = ("tpu", "gpu")
# Shared memory of the smallest GPU we compile for (A100: 163 KiB per block) holds the pipeline
# stages of the K and V tiles at GPU_ROW_BYTES per row (head_dim padded, times the itemsize);
# wider rows get proportionally shorter blocks (f32 with head_dim 256 asks 288 KiB otherwise).
GPU_ROW_BYTES = 512


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes (powers of two). They change speed, never results.

  block_q/block_k: forward; *_dq: the dQ kernel; *_dkv: the dK/dV kernel. Blocks longer than
  the (padded) sequence are shrunk to it. On TPU, blocks under 128 are raised to 128 (lane
  tiling) unless they cover the whole sequence.
  """
  block_q: int = 128
  block_k: int = 128
  block_q_dq: int = 128
  block_k_dq: int = 128
  block_q_dkv: int = 128
  block_k_dkv: int = 128

  def __post_init__(self):
    for f in dataclasses.fields(self):
      n = getattr(self, f.name)
      if not isinstance(n, int) or n < 8 or n & (n - 1):
        raise ValueError(f"BlockSizes.{f.name} must be a power of two >= 8, got {n!r}")

  @classmethod
  def get_default(cls, backend, head_dim=128, dtype=jnp.bfloat16):
    """Defaults per backend: "tpu" (Mosaic: big tiles, VMEM is plentiful) or "gpu" (Triton,
    shrunk for wide rows to fit shared memory; see GPU_ROW_BYTES)."""
    if backend == "tpu":
      return cls(block_q=512, block_k=512, block_q_dq=256, block_k_dq=512,
                 block_q_dkv=512, block_k_dkv=256)
    if backend == "gpu":
      row_bytes = fc.next_pow2(max(head_dim, _flash_gpu.MIN_BLOCK)) * jnp.dtype(dtype).itemsize
      shrink = max(1, row_bytes // GPU_ROW_BYTES)
      return cls(*(max(_flash_gpu.MIN_BLOCK, b // shrink) for b in (128, 64, 64, 64, 64, 64)))
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


# ---------------------------------------------------------------------------------- reference


def _split_segment_ids(segment_ids, t, s):
  """None, one int array [B, T] (self-attention, T == S) or a pair ([B, T], [B, S])."""
  if segment_ids is None:
    return None, None
  if isinstance(segment_ids, (tuple, list)):
    q_seg, kv_seg = segment_ids
  else:
    if t != s:
      raise ValueError(f"one segment_ids array needs T == S, got T={t}, S={s}; "
                       "pass (q_segment_ids, kv_segment_ids) instead")
    q_seg = kv_seg = segment_ids
  return q_seg.astype(jnp.int32), kv_seg.astype(jnp.int32)


def soft_cap(logits, softcap):
  """Gemma 2's attention logit soft-capping (Gemma Team 2024, Sec. 2): c tanh(s / c)."""
  return logits if softcap is None else softcap * jnp.tanh(logits / softcap)


def attention_mask(t, s, *, causal, sliding_window, q_seg=None, kv_seg=None):
  """bool [B or 1, T, S]: True where key j is visible to query i."""
  i = jnp.arange(t)[:, None]
  j = jnp.arange(s)[None, :]
  mask = jnp.ones((t, s), bool)
  if causal:
    mask &= j <= i
  if sliding_window is not None:
    mask &= i - j < sliding_window
  mask = mask[None]
  if q_seg is not None:
    mask = mask & (q_seg[:, :, None] == kv_seg[:, None, :])
  return mask


def flash_attention_reference(q, k, v, *, causal=True, segment_ids=None, sliding_window=None,
                              scale=None, softcap=None):
  """Plain-jnp attention with the semantics of `flash_attention`, computed in f32.

  GQA by reshaping q to [B, T, K, G, H]; nothing is repeated. Returns q.dtype.
  """
  b, t, n, h = q.shape
  s, kh = k.shape[1], k.shape[2]
  scale = h ** -0.5 if scale is None else scale
  q_seg, kv_seg = _split_segment_ids(segment_ids, t, s)
  mask = attention_mask(t, s, causal=causal, sliding_window=sliding_window, q_seg=q_seg,
                        kv_seg=kv_seg)
  qg = q.astype(jnp.float32).reshape(b, t, kh, n // kh, h)
  logits = jnp.einsum("BTKGH,BSKH->BKGTS", qg, k.astype(jnp.float32)) * scale
  logits = soft_cap(logits, softcap)
  logits = jnp.where(mask[:, None, None], logits, -jnp.inf)
  m = jnp.max(logits, axis=-1, keepdims=True)
  p = jnp.exp(logits - jnp.where(jnp.isfinite(m), m, 0.0))  # fully masked rows: p = 0
  l = jnp.sum(p, axis=-1, keepdims=True)
  p = p / jnp.where(l == 0, 1.0, l)
  o = jnp.einsum("BKGTS,BSKH->BTKGH", p, v.astype(jnp.float32))
  return o.reshape(b, t, n, h).astype(q.dtype)


# ------------------------------------------------------------------------------------ kernels


@dataclasses.dataclass(frozen=True)
class _Static:
  causal: bool
  window: int | None
  scale: float
  softcap: float | None
  block_sizes: BlockSizes | None
  interpret: bool | pltpu.InterpretParams
  backend: str  # the kernel variant, "tpu" or "gpu"


def _run(cfg, name, q, *args):
  """Call `name` ("forward"/"backward") of the kernel variant cfg.backend."""
  module = _flash_tpu if cfg.backend == "tpu" else _flash_gpu
  blocks = cfg.block_sizes or BlockSizes.get_default(cfg.backend, q.shape[-1], q.dtype)
  return getattr(module, name)(q, *args, causal=cfg.causal, window=cfg.window, scale=cfg.scale,
                               softcap=cfg.softcap, blocks=blocks, interpret=cfg.interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _flash(q, k, v, q_seg, kv_seg, cfg):
  return _run(cfg, "forward", q, k, v, q_seg, kv_seg)[0]


def _flash_fwd(q, k, v, q_seg, kv_seg, cfg):
  o, lse = _run(cfg, "forward", q, k, v, q_seg, kv_seg)
  return o, (q, k, v, q_seg, kv_seg, o, lse)


def _flash_bwd(cfg, res, do):
  dq, dk, dv = _run(cfg, "backward", *res, do)
  return dq, dk, dv, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


@functools.partial(jax.jit, static_argnames=("causal", "sliding_window", "scale", "softcap",
                                             "impl", "block_sizes", "interpret", "backend"))
def flash_attention(q, k, v, *, causal=True, segment_ids=None, sliding_window=None, scale=None,
                    softcap=None, impl="auto", block_sizes=None, interpret=None, backend=None):
  """FlashAttention-2 over q [B,T,Hq,D], k/v [B,S,Hkv,D] -> [B,T,Hq,D] in q.dtype.

  segment_ids: None, int [B, T] (requires T == S) or a pair ([B, T], [B, S]); tokens attend only
    within their segment (packed documents).
  sliding_window: key j is visible to query i only if i - j < sliding_window.
  scale: softmax scale, default D ** -0.5.
  softcap: if set (> 0), scores s = scale * q.k become softcap * tanh(s / softcap) before the
    mask and the softmax (Gemma 2's attention logit soft-capping); the gradients go through it.
  impl: "auto" (the kernel where `paths.attention_path` says it is compile-tested, else the
    XLA reference), "xla" or "pallas"; decided for the platform the program is lowered for.
  block_sizes: a `BlockSizes`; None takes `BlockSizes.get_default` of the backend.
  interpret (impl="pallas"): run the kernels in the interpreter. None: only on platforms with no
    kernel (CPU). A `pltpu.InterpretParams` selects TPU interpret mode for the TPU variant
    (simulated VMEM and DMAs, NaN-filled uninitialised memory, shuffled "parallel" grid axes).
  backend (impl="pallas"): force the "tpu" or "gpu" kernel variant wherever lowered. None:
    chosen by the platform being lowered (in interpret mode the TPU variant).
  """
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f"flash_attention expects q [B,T,Hq,D], k/v [B,S,Hkv,D]; got "
                     f"q {q.shape}, k {k.shape}, v {v.shape}")
  b, t, hq, d = q.shape
  if k.shape != v.shape or k.shape[0] != b or k.shape[3] != d:
    raise ValueError(f"k and v must both be [B={b}, S, Hkv, D={d}]; got k {k.shape}, "
                     f"v {v.shape}")
  if hq % k.shape[2]:
    raise ValueError(f"query heads Hq={hq} must be a multiple of KV heads Hkv={k.shape[2]}")
  if sliding_window is not None and sliding_window < 1:
    raise ValueError(f"sliding_window must be >= 1 or None, got {sliding_window}")
  if softcap is not None and not softcap > 0:
    raise ValueError(f"softcap must be > 0 or None, got {softcap}")
  if backend is not None and backend not in BACKENDS:
    raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
  scale = float(d ** -0.5 if scale is None else scale)
  softcap = None if softcap is None else float(softcap)
  q_seg, kv_seg = _split_segment_ids(segment_ids, t, k.shape[1])
  for name, seg, n in (("q", q_seg, t), ("kv", kv_seg, k.shape[1])):
    if seg is not None and seg.shape != (b, n):
      raise ValueError(f"{name} segment ids must be [B={b}, {n}], got {seg.shape}")

  def kernel(variant, interpret):
    cfg = _Static(causal=bool(causal), window=sliding_window, scale=scale, softcap=softcap,
                  block_sizes=block_sizes, interpret=interpret, backend=variant)
    return lambda *args: _flash(*args, cfg)

  def xla(q, k, v, q_seg, kv_seg):
    return flash_attention_reference(q, k, v, causal=causal, sliding_window=sliding_window,
                                     scale=scale, softcap=softcap,
                                     segment_ids=None if q_seg is None else (q_seg, kv_seg))

  path_of = lambda platform: attention_path(platform, head_dim=d, dtype=q.dtype,
                                            kv_dtype=k.dtype, impl=impl)
  return dispatch((q, k, v, q_seg, kv_seg), impl=impl, interpret=interpret, backend=backend,
                  path_of=path_of, kernel=kernel, xla=xla)
