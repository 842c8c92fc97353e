"""The attention kernels compiled by the real TPU and GPU compilers, on a CPU-only machine.

Each test lowers a jitted function for compile-only devices of a named target (the
`target_devices` fixture; train/accelerators.py) and compiles it: Mosaic and XLA:TPU from libtpu
for v5e, v5p and v6e, Triton, ptxas and XLA:GPU from the CUDA plugin for H100 and A100. What they
refuse would fail on the device; the memory plan they report is the device's. Nothing runs and
nothing is allocated: inputs are ShapeDtypeStructs on a one-device mesh of the target.

The grids cover every axis (target, dtype, head_dim, GQA ratio, segment ids, sliding window,
soft-capping, lengths up to 32k that no block divides; paged decode, speculative verification
and prefill chunks over a long page table) somewhere rather than their product. `impl="auto"` takes a kernel
only for the head dims, dtypes and page sizes these grids compile (pallas_kernels/paths.py),
and `test_grids_cover_what_auto_takes` keeps the two in step.

What this cannot tell: speed, and numerics on the device (tests/test_flash_attention.py and
tests/test_paged_attention.py check the same kernels against references in interpret mode).
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from model import sharding
from model.config import ModelConfig
from model.layers import self_attention
from pallas_kernels import paths
from pallas_kernels.attention import attention, attention_path
from pallas_kernels.flash_attention import BlockSizes, flash_attention
from pallas_kernels.grouped_matmul import grouped_matmul
from pallas_kernels.paged_attention import paged_attention
from pallas_kernels.quantized_matmul import quantized_matmul

MOSAIC, TRITON = "tpu_custom_call", "__gpu$xla.gpu.triton"
CALL = {"tpu": MOSAIC, "cuda": TRITON}
BF16, F32 = jnp.bfloat16, jnp.float32
FLASH_KERNELS = ["flash_attention_dkv", "flash_attention_dq", "flash_attention_fwd"]


def _compiler(target):
  return "tpu" if target.startswith("v") else "cuda"


def _compile(target_devices, target, fn, *shapes):
  """jit(fn) compiled for one device of `target`; shapes: (shape, dtype) pairs."""
  mesh = Mesh(np.array(target_devices(target)[:1]), ("x",))
  args = [jax.ShapeDtypeStruct(s, dt, sharding=NamedSharding(mesh, P())) for s, dt in shapes]
  return jax.jit(fn).lower(*args).compile()


def _kernels(compiled):
  """Sorted names of the Pallas kernels in a compiled program, and the custom-call targets."""
  names, targets = [], set()
  for line in compiled.as_text().splitlines():
    call = re.search(r'custom_call_target="([^"]+)"', line)
    if call and call.group(1) in (MOSAIC, TRITON):
      targets.add(call.group(1))
      # ".../flash_attention_fwd/pallas_call", or ".../jit(gmm)/pallas_call" (megablox)
      names.append(re.search(r'op_name="[^"]*/(?:jit\()?(\w+)\)?/pallas_call"',
                             line).group(1))
  return sorted(names), targets


def _peak(compiled):
  return compiled.memory_analysis().peak_memory_in_bytes


def _flash_grads(**kwargs):
  def fn(q, k, v, seg=None):
    loss = lambda q, k, v: jnp.sum(flash_attention(q, k, v, segment_ids=seg, **kwargs)
                                   .astype(jnp.float32))
    return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
  return fn


# ------------------------------------------------------------------------- flash attention

# (target, dtype, head_dim, Hq, Hkv, T, segment ids, sliding window); forward and backward.
FLASH = [
    ("v5e-1", BF16, 128, 32, 8, 4095, True, None),
    ("v5p-8", F32, 64, 8, 1, 1000, False, 256),
    ("v6e-1", BF16, 256, 8, 1, 32767, False, 1024),
    ("v5e-1", F32, 256, 9, 3, 1000, True, 128),
    ("h100-1", BF16, 128, 32, 8, 4095, True, None),
    ("a100-1", BF16, 256, 8, 1, 32767, False, 1024),
    ("h100-1", BF16, 64, 9, 3, 1000, True, 256),
    # f32 rows of 1 KiB: the default GPU blocks shrink to fit the A100's shared memory.
    ("a100-1", F32, 256, 8, 1, 1000, False, None),
]


def _flash_id(c):
  target, dtype, d, hq, hkv, t, seg, window = c
  return (f"{target}-{jnp.dtype(dtype).name}-D{d}-{hq}:{hkv}-T{t}-{'seg' if seg else 'noseg'}"
          f"-w{window}")


@pytest.mark.parametrize("case", FLASH, ids=_flash_id)
def test_flash_forward_backward_compiles(target_devices, case):
  target, dtype, d, hq, hkv, t, seg, window = case
  fn = _flash_grads(sliding_window=window)  # impl="auto": the kernel, since it is covered
  shapes = [((1, t, hq, d), dtype), ((1, t, hkv, d), dtype), ((1, t, hkv, d), dtype)]
  if seg:
    shapes.append(((1, t), jnp.int32))
  compiled = _compile(target_devices, target, fn, *shapes)
  names, targets = _kernels(compiled)
  assert names == FLASH_KERNELS and targets == {CALL[_compiler(target)]}
  if t > 4096:  # a small part of one f32 score matrix [Hq, T, T], which XLA's path holds
    assert _peak(compiled) < 4 * hq * t * t / 16


@pytest.mark.parametrize("target", ["v5e-1", "h100-1"])
def test_flash_softcap_compiles(target_devices, target):
  """Gemma 2's attention: soft-capped scores (tanh in the forward, its derivative in both
  backward kernels) under a sliding window, with GQA."""
  fn = _flash_grads(softcap=50.0, sliding_window=512)
  shapes = [((1, 2048, 8, 128), BF16), ((1, 2048, 2, 128), BF16), ((1, 2048, 2, 128), BF16)]
  names, targets = _kernels(_compile(target_devices, target, fn, *shapes))
  assert names == FLASH_KERNELS and targets == {CALL[_compiler(target)]}


def _flash_peak(target_devices, target, t, impl):
  shapes = [((1, t, 8, 128), BF16), ((1, t, 1, 128), BF16), ((1, t, 1, 128), BF16)]
  return _peak(_compile(target_devices, target, _flash_grads(impl=impl), *shapes))


@pytest.mark.parametrize("target", ["v5e-1", "h100-1"])
def test_flash_memory_grows_linearly_with_length(target_devices, target):
  """Forward + backward at T, 2T, 4T: the compiler's peak memory doubles with T."""
  peaks = [_flash_peak(target_devices, target, t, "auto") for t in (1024, 2048, 4096)]
  assert all(1.8 < b / a < 2.2 for a, b in zip(peaks, peaks[1:])), peaks


def test_memory_check_tells_quadratic_from_linear(target_devices):
  """The XLA reference (f32 scores [Hq, T, T]) at T and 2T: its peak quadruples, so the check
  above would catch a kernel that materialised the scores."""
  xla = [_flash_peak(target_devices, "h100-1", t, "xla") for t in (512, 1024)]
  assert xla[1] / xla[0] > 3.5, xla
  assert _flash_peak(target_devices, "h100-1", 1024, "auto") < xla[1] / 4


def test_oversized_gpu_blocks_are_refused_for_shared_memory(target_devices):
  """Triton's shared-memory check is real: f32 head_dim 256 with 128 x 128 blocks asks more
  than an A100 has (the default blocks for it compile: FLASH above)."""
  fn = lambda q, k, v: flash_attention(q, k, v, impl="pallas", block_sizes=BlockSizes())
  shapes = [((1, 1000, 8, 256), F32), ((1, 1000, 1, 256), F32), ((1, 1000, 1, 256), F32)]
  with pytest.raises(Exception, match="RESOURCE_EXHAUSTED: Shared memory size limit exceeded"):
    _compile(target_devices, "a100-1", fn, *shapes)


# ------------------------------------------------------------------------- paged attention

# (target, dtype, head_dim, Hq, Hkv, B, Tq, page_size, pages per sequence). Decode (Tq = 1),
# speculative verification (Tq = k + 1 = 5) and prefill chunks (Tq = 128, 512: 1024 and 4096
# query rows for a KV head, in row blocks) over a 32k-token page table.
PAGED = [
    ("v5e-1", BF16, 128, 32, 4, 8, 1, 16, 2048),
    ("v6e-1", F32, 64, 9, 3, 8, 5, 64, 512),
    ("v5p-8", BF16, 128, 32, 4, 2, 128, 16, 2048),
    ("v5e-1", BF16, 256, 16, 2, 2, 512, 16, 2048),
    ("h100-1", BF16, 64, 9, 3, 8, 1, 64, 512),
    ("a100-1", F32, 128, 32, 4, 8, 5, 16, 2048),
    ("h100-1", BF16, 128, 32, 4, 2, 128, 16, 2048),
    ("a100-1", BF16, 256, 16, 2, 2, 512, 16, 2048),
]


def _paged_shapes(dtype, d, hq, hkv, b, tq, page, pps):
  return [((b, tq, hq, d), dtype), ((hkv, b * pps, page, d), dtype),
          ((hkv, b * pps, page, d), dtype), ((b,), jnp.int32), ((b, pps), jnp.int32)]


def _paged_id(c):
  target, dtype, d, hq, hkv, b, tq, page, pps = c
  return f"{target}-{jnp.dtype(dtype).name}-D{d}-{hq}:{hkv}-B{b}-Tq{tq}-page{page}x{pps}"


@pytest.mark.parametrize("case", PAGED, ids=_paged_id)
def test_paged_compiles(target_devices, case):
  target, dtype, *dims = case
  compiled = _compile(target_devices, target, paged_attention, *_paged_shapes(dtype, *dims))
  names, targets = _kernels(compiled)
  assert names == ["paged_attention"] and targets == {CALL[_compiler(target)]}


# An int8 cache (codes plus f32 scales per slot and KV head): decode, verification and a
# prefill chunk. (target, q dtype, head_dim, Hq, Hkv, B, Tq, page_size, pages per sequence)
PAGED_INT8 = [
    ("v5e-1", BF16, 128, 32, 4, 8, 1, 16, 2048),
    ("v6e-1", F32, 64, 9, 3, 2, 128, 64, 512),
    ("h100-1", BF16, 128, 32, 4, 8, 1, 16, 2048),
    ("a100-1", F32, 64, 9, 3, 2, 128, 64, 512),
]


@pytest.mark.parametrize("case", PAGED_INT8, ids=_paged_id)
def test_paged_int8_compiles(target_devices, case):
  target, dtype, d, hq, hkv, b, tq, page, pps = case
  q, pages, *_, lengths, table = _paged_shapes(dtype, d, hq, hkv, b, tq, page, pps)
  scales = (pages[0][:3], F32)
  fn = lambda q, k, v, lengths, table, ks, vs: paged_attention(q, k, v, lengths, table,
                                                               k_scales=ks, v_scales=vs)
  compiled = _compile(target_devices, target, fn, q, (pages[0], jnp.int8),
                      (pages[0], jnp.int8), lengths, table, scales, scales)
  names, targets = _kernels(compiled)
  assert names == ["paged_attention"] and targets == {CALL[_compiler(target)]}


# Mistral and Gemma 2 over a 32k-token page table: decode with a sliding window (the sweep
# starts at the window's first page), verification with soft-capping (Gemma 2's global layers),
# a prefill chunk with both (its local layers). (target, Tq, options)
PAGED_OPTIONS = [
    ("v5e-1", 1, dict(sliding_window=4096)),
    ("v5e-1", 5, dict(softcap=50.0)),
    ("v5e-1", 128, dict(sliding_window=4096, softcap=50.0)),
    ("h100-1", 1, dict(sliding_window=4096)),
    ("h100-1", 5, dict(softcap=50.0)),
    ("h100-1", 128, dict(sliding_window=4096, softcap=50.0)),
]


@pytest.mark.parametrize("target,tq,options", PAGED_OPTIONS,
                         ids=lambda x: "-".join(map(str, x)) if isinstance(x, dict) else str(x))
def test_paged_window_and_softcap_compile(target_devices, target, tq, options):
  fn = lambda *args: paged_attention(*args, **options)
  compiled = _compile(target_devices, target, fn, *_paged_shapes(BF16, 128, 32, 4, 2, tq, 16,
                                                                   2048))
  names, targets = _kernels(compiled)
  assert names == ["paged_attention"] and targets == {CALL[_compiler(target)]}


@pytest.mark.parametrize("target,tq,error", [
    ("h100-1", 128, "Shared memory size limit exceeded"),
    ("v5e-1", 1024, "CompileTimeScopedVmemOom"),
])
def test_paged_prefill_needs_row_blocks(target_devices, target, tq, error):
  """A prefill chunk's G * Tq query rows (G = 8) in one program are over the GPU's shared
  memory (1024 rows) and the TPU's scoped VMEM (8192 rows); in row blocks (the default) the
  same call compiles."""
  shapes = _paged_shapes(BF16, 128, 32, 4, 1, tq, 16, 2048)
  one_block = lambda *args: paged_attention(*args, impl="pallas", rows_per_block=8 * tq)
  with pytest.raises(Exception, match=f"RESOURCE_EXHAUSTED: .*{error}"):
    _compile(target_devices, target, one_block, *shapes)
  _compile(target_devices, target, paged_attention, *shapes)


# ------------------------------------------------------------------------- grouped matmul

# The kernels of the forward, and of forward + backward, per compiler.
GMM_KERNELS = {"cuda": (["grouped_matmul"], ["grouped_matmul", "grouped_matmul_dw",
                                             "grouped_matmul_dx"]),
               "tpu": (["gmm"], ["gmm", "gmm", "tgmm"])}
# (target, dtype, A, D, F, E): MoE expert matmuls over A = tokens * top_k rows sorted by expert,
# with few large experts (Mixtral: 8) and many small ones (64); f32 with D and F that no block
# divides; a decode step's few rows.
GMM = [
    ("h100-1", BF16, 8192, 2048, 1024, 8),
    ("a100-1", BF16, 8192, 2048, 1024, 8),
    ("h100-1", BF16, 8192, 2048, 1024, 64),
    ("a100-1", BF16, 8192, 2048, 1024, 64),
    ("a100-1", F32, 4096, 1000, 1400, 8),
    ("v5e-1", BF16, 8192, 2048, 1024, 8),
    ("v6e-1", BF16, 8192, 2048, 768, 64),
    ("v5p-8", F32, 4000, 320, 352, 8),
    ("v5e-1", BF16, 2, 4096, 14336, 8),
]


def _gmm_grads(impl):
  def fn(x, w, group_sizes):  # the loss needs y, so the forward kernel stays in the program
    loss = lambda x, w: jnp.sum(jnp.square(grouped_matmul(x, w, group_sizes, impl=impl)
                                           .astype(F32)))
    return jax.grad(loss, argnums=(0, 1))(x, w)
  return fn


def _flops(compiled):
  cost = compiled.cost_analysis()
  return (cost[0] if isinstance(cost, list) else cost)["flops"]


@pytest.mark.parametrize("case", GMM, ids=lambda c: "-".join(
    [c[0], jnp.dtype(c[1]).name] + [f"{k}{n}" for k, n in zip("ADFE", c[2:])]))
def test_grouped_matmul_compiles_and_beats_ragged_dot(target_devices, case):
  """Forward and forward + backward through the platform's kernel (impl="auto"), against
  XLA's ragged_dot, which neither compiler runs as a grouped matmul throughout:
    GPU: XLA:GPU expands x to a dense [A, E * D] and does E times the FLOPs; the Triton
         kernels' peak is a fraction of its (their inputs and outputs);
    TPU: XLA:TPU's forward is a kernel, but its backward computes dw densely: its cost
         analysis counts at least E * 2ADF FLOPs (dx and the dense dw); megablox's tgmm
         does one 2ADF, at a peak within 1.25x of ragged_dot's (tgmm reads x transposed: a
         copy of x; 1.13x at E = 64)."""
  target, dtype, a, d, f, e = case
  compiler = _compiler(target)
  shapes = [((a, d), dtype), ((e, d, f), dtype), ((e,), jnp.int32)]
  forward = lambda impl: lambda x, w, gs: grouped_matmul(x, w, gs, impl=impl)
  for fn, kernels in zip((forward, _gmm_grads), GMM_KERNELS[compiler]):
    compiled = _compile(target_devices, target, fn("auto"), *shapes)
    names, targets = _kernels(compiled)
    assert names == kernels and targets == {CALL[compiler]}
    dense = _compile(target_devices, target, fn("xla"), *shapes)
    if compiler == "cuda":
      assert _peak(compiled) < _peak(dense) / 2, (_peak(compiled), _peak(dense))
    else:
      assert _peak(compiled) <= 1.25 * _peak(dense), (_peak(compiled), _peak(dense))
  if compiler == "tpu":
    assert _flops(dense) >= e * 2 * a * d * f


# ------------------------------------------------------------------------- quantized matmul

# (M, K, N): a decode step's 8 rows through an FFN up-projection; a prefill chunk of 2048 rows
# through a square projection.
DECODE, PREFILL = (8, 4096, 14336), (2048, 4096, 4096)
# (target, kind, group (None: per channel), asymmetric, x dtype, (M, K, N)). Every target
# compiles int8 per channel, int4 g128 and nf4 g64 at both shapes; per compiler, one case
# covers f32 x, g32 and asymmetric int4, and one M and N that no tile divides.
QMM = [(t, kind, g, False, BF16, shape) for t in ("v5e-1", "v6e-1", "h100-1", "a100-1")
       for kind, g in (("int8", None), ("int4", 128), ("nf4", 64)) for shape in (DECODE, PREFILL)]
QMM += [("v5e-1", "int4", 32, True, F32, DECODE), ("h100-1", "int4", 32, True, F32, DECODE),
        ("v6e-1", "nf4", 64, False, BF16, (300, 4096, 1000)),
        ("a100-1", "nf4", 64, False, BF16, (300, 4096, 1000))]


def _qmm_id(c):
  target, kind, g, asym, dtype, (m, k, n) = c
  return (f"{target}-{kind}{'-asym' if asym else ''}-g{g or 'K'}-{jnp.dtype(dtype).name}"
          f"-M{m}-K{k}-N{n}")


@pytest.mark.parametrize("case", QMM, ids=_qmm_id)
def test_quantized_matmul_compiles(target_devices, case):
  """The kernel (impl="auto") compiles to one Mosaic or Triton call. At decode its peak is
  under the bytes of W in bf16 (it never holds W dequantized) and at most XLA's.

  Peaks found (MiB, kernel / XLA's dequantize-then-dot; W is 56 (int8), 28 (int4, nf4), 112
  in bf16), decode [8, 4096] x [4096, 14336]:
    v5e, v6e  int8 per channel 56.4 / 56.5   int4 g128 31.0 / 477   nf4 g64 33.6 / 478
    h100      int8 per channel 57.2 / 170    int4 g128 31.8 / 143   nf4 g64 34.4 / 198
    a100      int8 per channel 57.2 / 168    int4 g128 31.8 / 143
  XLA:TPU fuses int8 dequantization into the dot (same peak as the kernel) but materialises
  the int4 and nf4 weights (in f32 and bf16); XLA:GPU materialises every kind in bf16.
  Prefill [2048, 4096] x [4096, 4096] (x and y are 16 each): kernel / XLA on v5e: int8 48 / 64,
  int4 g128 81 / 136 (the kernel's x split into even and odd columns is 16 of it), nf4 82 / 137;
  h100: 48 / 80, 57 / 72, 58 / 73. Only the decode comparison is asserted (XLA's prefill
  compiles cost seconds each on TPU).
  """
  target, kind, g, asym, dtype, (m, k, n) = case
  compiler = _compiler(target)
  group = g or k
  g_rows = k // group
  values = ((k, n), jnp.int8) if kind == "int8" else ((k // 2, n), jnp.uint8)
  shapes = [((m, k), dtype), values, ((g_rows, n), BF16)] + ([((g_rows, n), BF16)] if asym else [])
  fn = lambda impl: lambda x, v, s, z=None: quantized_matmul(x, v, s, z, kind=kind, group=group,
                                                             impl=impl)
  compiled = _compile(target_devices, target, fn("auto"), *shapes)
  names, targets = _kernels(compiled)
  assert names == ["quantized_matmul"] and targets == {CALL[compiler]}
  if (m, k, n) == DECODE:
    xla = _compile(target_devices, target, fn("xla"), *shapes)
    assert _peak(compiled) < 2 * k * n, _peak(compiled)
    assert _peak(compiled) <= _peak(xla), (_peak(compiled), _peak(xla))


@pytest.mark.parametrize("target", ["v5e-1", "h100-1"])
def test_quantized_matmul_dx_compiles(target_devices, target):
  """QLoRA's backward through a frozen nf4 base: the forward kernel stays in the program and
  dx = dy W^T is XLA's dot on `dequantize`d W. Peaks found (MiB, with impl="xla" for both
  passes): v5e 137 (153), h100 90 (89): the backward's dequantized W, not the forward, sets
  them; a transposed kernel for dx would remove it."""
  m, k, n = PREFILL

  def fn(x, v, s):
    loss = lambda x: jnp.sum(jnp.square(quantized_matmul(x, v, s, kind="nf4", group=64)
                                        .astype(F32)))
    return jax.grad(loss)(x)

  compiled = _compile(target_devices, target, fn, ((m, k), BF16), ((k // 2, n), jnp.uint8),
                      ((k // 64, n), BF16))
  names, targets = _kernels(compiled)
  assert names == ["quantized_matmul"] and targets == {CALL[_compiler(target)]}


# ------------------------------------------------------------------- what auto takes, and why


def test_grids_cover_what_auto_takes():
  """Every dtype and head_dim auto takes a kernel for is compiled above, for each compiler and
  kernel; every page size for the paged kernel; every dtype for the grouped matmul; every
  dtype, group size and kind for the quantized matmul."""
  for compiler in ("tpu", "cuda"):
    for grid in (FLASH, PAGED):
      cases = [c for c in grid if _compiler(c[0]) == compiler]
      assert {jnp.dtype(c[1]).name for c in cases} == set(paths.COVERED_DTYPES), compiler
      assert {c[2] for c in cases} == set(paths.COVERED_HEAD_DIMS), compiler
    pages = {c[7] for c in PAGED if _compiler(c[0]) == compiler}
    assert pages == set(paths.COVERED_PAGE_SIZES), compiler
    int8 = [c for c in PAGED_INT8 if _compiler(c[0]) == compiler]  # int8 pages under every q
    assert paths.COVERED_PAGED_KV_DTYPES == ("int8",), compiler
    assert {jnp.dtype(c[1]).name for c in int8} == set(paths.COVERED_DTYPES), compiler
    assert {c[7] for c in int8} == set(paths.COVERED_PAGE_SIZES), compiler
  assert set(paths.GMM_KERNELS) == set(GMM_KERNELS)
  for compiler in paths.GMM_KERNELS:
    cases = [c for c in GMM if _compiler(c[0]) == compiler]
    assert {jnp.dtype(c[1]).name for c in cases} == set(paths.GMM_COVERED_DTYPES), compiler
  assert set(paths.QMM_KERNELS) == {"tpu", "cuda"}
  for compiler in paths.QMM_KERNELS:
    cases = [c for c in QMM if _compiler(c[0]) == compiler]
    assert {jnp.dtype(c[4]).name for c in cases} == set(paths.QMM_COVERED_DTYPES), compiler
    assert {c[2] for c in cases} == {None, *paths.QMM_COVERED_GROUPS}, compiler
    assert {(c[1], c[3]) for c in cases} == {(k, False) for k in paths.QMM_KINDS} | {
        ("int4", True)}, compiler


def test_attention_path_says_why():
  path = lambda platform, **kw: str(attention_path(platform, **{"head_dim": 128, "dtype": BF16,
                                                                **kw}))
  assert path("tpu") == "pallas (Mosaic flash)"
  assert path("gpu", page_size=16) == "pallas (Triton paged)"
  assert path("cuda", head_dim=96) == "xla (head_dim 96 not covered by the Triton kernel)"
  assert path("tpu", dtype=jnp.float16) == "xla (dtype float16 not covered by the Mosaic kernel)"
  assert path("cuda", page_size=12, impl="pallas").startswith("xla (page_size 12 and head_dim")
  assert path("cpu") == "xla (no Pallas kernel for cpu)"
  assert path("cpu", impl="pallas") == "pallas (Mosaic flash, interpreted)"
  assert path("tpu", impl="xla") == "xla (impl='xla')"
  with pytest.raises(ValueError, match="attention_impl"):
    attention_path("tpu", head_dim=128, dtype=BF16, impl="triton")


# (target, head_dim, dtype): auto's choice in the model's entry point `attention`, as the
# compiled program shows it, is attention_path's (FLASH above takes flash_attention's auto).
AUTO = [("v6e-1", 128, BF16), ("h100-1", 128, BF16), ("h100-1", 96, BF16),
        ("v5e-1", 128, jnp.float16)]


@pytest.mark.parametrize("target,d,dtype", AUTO, ids=lambda x: str(getattr(x, "__name__", x)))
def test_auto_compiles_what_attention_path_says(target_devices, target, d, dtype):
  path = attention_path(target_devices(target)[0].platform, head_dim=d, dtype=dtype)
  shapes = [((1, 256, 8, d), dtype), ((1, 256, 2, d), dtype), ((1, 256, 2, d), dtype)]
  compiled = _compile(target_devices, target, attention, *shapes)
  names, _ = _kernels(compiled)
  assert names == (["flash_attention_fwd"] if path.impl == "pallas" else []), str(path)


def test_auto_on_cpu_is_xla_without_the_interpreter():
  """Lowered for CPU, auto runs the XLA path: no kernel, and no interpreter's grid loops."""
  q = jax.ShapeDtypeStruct((1, 256, 8, 64), F32)
  k = jax.ShapeDtypeStruct((1, 256, 2, 64), F32)
  text = jax.jit(_flash_grads()).lower(q, k, k).as_text()
  assert "while" not in text and MOSAIC not in text and TRITON not in text
  pages = jax.ShapeDtypeStruct((2, 16, 16, 64), F32)
  text = jax.jit(paged_attention).lower(
      jax.ShapeDtypeStruct((2, 8, 64), F32), pages, pages, jax.ShapeDtypeStruct((2,), jnp.int32),
      jax.ShapeDtypeStruct((2, 8), jnp.int32)).as_text()
  assert "while" not in text and MOSAIC not in text and TRITON not in text


def test_pallas_without_interpret_refuses_cpu():
  """There is no CPU kernel: impl="pallas", interpret=False must not fall back silently."""
  q = jax.ShapeDtypeStruct((1, 128, 4, 64), F32)
  fn = lambda q, k, v: flash_attention(q, k, v, impl="pallas", interpret=False)
  with pytest.raises(Exception, match="cpu"):
    jax.jit(fn).lower(q, q, q)


def test_model_attention_runs_the_kernel_per_shard_on_a_tpu_mesh(target_devices):
  """self_attention under a v5e-4 mesh (data 2 x tensor 2), traced in this CPU-only process:
  the mesh's devices, not the default backend, decide, so the kernel runs per shard on
  [B/2, T, N/2, H] (the TPU kernel's [B, N, T, H] layout: [1, 4, T, 128])."""
  devices = np.array(target_devices("v5e-4")).reshape(2, 1, 1, 2)
  mesh = Mesh(devices, sharding.MESH_AXES)
  cfg = ModelConfig(d_model=1024, n_heads=8, n_kv_heads=2, head_dim=128, dtype="bfloat16")
  spec = NamedSharding(mesh, P(("data", "fsdp"), None, "tensor", None))

  def fn(q, k, v):
    with sharding.activation_sharding(mesh):
      return self_attention(q, k, v, None, cfg)

  args = [jax.ShapeDtypeStruct((2, 512, n, 128), BF16, sharding=spec) for n in (8, 2, 2)]
  text = jax.jit(fn).lower(*args).compile().as_text()
  kernels = [l for l in text.splitlines() if f'custom_call_target="{MOSAIC}"' in l]
  assert len(kernels) == 1, "the Mosaic kernel should run once, per shard"
  assert "bf16[1,4,512,128]" in kernels[0].split("custom-call(")[0], kernels[0][:300]
