"""The kernels lower for real accelerators, checked on a CPU-only machine.

`jax.export` lowers for a platform named in `platforms` without a device: Pallas emits a Mosaic
kernel (`tpu_custom_call`) for "tpu" and a Triton kernel (`__gpu$xla.gpu.triton`) for "cuda".
Inputs are ShapeDtypeStructs at realistic sizes (bf16, head_dim 128, 2048 tokens, GQA 8:1), so
nothing is allocated. `lax.platform_dependent` inside the kernels' wrappers must pick the variant
of the platform being lowered, so each module holds only that platform's kernels.

What this cannot check: Mosaic's layout passes and Triton's PTX compilation run in the TPU/GPU
compilers, which are not on a CPU-only machine. The Triton IR is at least verified by MLIR here.
"""

import functools

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels.flash_attention import flash_attention
from pallas_kernels.paged_attention import paged_attention

TRITON_CALL = "__gpu$xla.gpu.triton"
MOSAIC_CALL = "tpu_custom_call"
# Triton kernels are compiled for the GPU at hand; export calls that target unstable.
UNSTABLE_OK = [jax.export.DisabledSafetyCheck.custom_call(TRITON_CALL)]

B, T, HQ, HKV, D = 2, 2048, 32, 4, 128
PAGE, PAGES_PER_SEQ = 16, 128


def _spec(*shape, dtype=jnp.bfloat16):
  return jax.ShapeDtypeStruct(shape, dtype)


@pytest.fixture
def triton_modules_verified(monkeypatch):
  """Runs the MLIR verifier on every Triton module Pallas emits; lists them.

  This hooks a private jax function; if a jax release renames it, the hook (not the lowering
  check) is skipped and the fixture returns None.
  """
  from jax._src.pallas.triton import lowering as triton_lowering

  lower = getattr(triton_lowering, "lower_jaxpr_to_triton_module", None)
  if lower is None:
    return None
  verified = []

  def lower_and_verify(*args, **kwargs):
    result = lower(*args, **kwargs)
    assert result.module.operation.verify()
    verified.append(result)
    return result

  monkeypatch.setattr(triton_lowering, "lower_jaxpr_to_triton_module", lower_and_verify)
  return verified


def _export(fn, platform, *args):
  export = jax.export.export(jax.jit(fn), platforms=[platform], disabled_checks=UNSTABLE_OK)
  return export(*args).mlir_module()


def _flash(q, k, v, seg, **kwargs):
  return flash_attention(q, k, v, segment_ids=seg, impl="pallas", interpret=False, **kwargs)


def _flash_grads(q, k, v, seg, **kwargs):
  loss = lambda q, k, v: jnp.sum(_flash(q, k, v, seg, **kwargs).astype(jnp.float32))
  return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)


FLASH = [  # (name, function, number of kernels)
    ("fwd-causal", functools.partial(_flash, causal=True), 1),
    ("fwd-window", functools.partial(_flash, causal=True, sliding_window=512), 1),
    ("fwd-full", functools.partial(_flash, causal=False), 1),
    ("fwd+bwd-causal", functools.partial(_flash_grads, causal=True), 3),
    ("fwd+bwd-window", functools.partial(_flash_grads, causal=True, sliding_window=512), 3),
    ("fwd+bwd-no-segments", lambda q, k, v, seg: _flash_grads(q, k, v, None, causal=True), 3),
]


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
@pytest.mark.parametrize("name,fn,kernels", FLASH, ids=[f[0] for f in FLASH])
def test_flash_attention_lowers(platform, name, fn, kernels, triton_modules_verified):
  args = (_spec(B, T, HQ, D), _spec(B, T, HKV, D), _spec(B, T, HKV, D),
          _spec(B, T, dtype=jnp.int32))
  text = _export(fn, platform, *args)
  mine, other = (MOSAIC_CALL, TRITON_CALL) if platform == "tpu" else (TRITON_CALL, MOSAIC_CALL)
  assert text.count(mine) == kernels, name
  assert other not in text
  if platform == "cuda" and triton_modules_verified is not None:
    assert len(triton_modules_verified) == kernels


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
@pytest.mark.parametrize("tq", [1, 4])
def test_paged_attention_lowers(platform, tq, triton_modules_verified):
  q = _spec(B, HQ, D) if tq == 1 else _spec(B, tq, HQ, D)
  pages = _spec(HKV, B * PAGES_PER_SEQ, PAGE, D)
  args = (q, pages, pages, _spec(B, dtype=jnp.int32), _spec(B, PAGES_PER_SEQ, dtype=jnp.int32))
  fn = functools.partial(paged_attention, impl="pallas", interpret=False)
  text = _export(fn, platform, *args)
  mine, other = (MOSAIC_CALL, TRITON_CALL) if platform == "tpu" else (TRITON_CALL, MOSAIC_CALL)
  assert text.count(mine) == 1
  assert other not in text
  if platform == "cuda" and triton_modules_verified is not None:
    assert len(triton_modules_verified) == 1


def test_lowering_for_cpu_without_interpret_is_refused():
  """There is no CPU kernel: lowering impl="pallas" for CPU must fail, not silently fall back."""
  args = (_spec(1, 128, 4, 64), _spec(1, 128, 4, 64), _spec(1, 128, 4, 64))
  fn = lambda q, k, v: flash_attention(q, k, v, impl="pallas", interpret=False)
  with pytest.raises(Exception, match="cpu"):
    jax.jit(fn).trace(*args).lower(lowering_platforms=("cpu",))
