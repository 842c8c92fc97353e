"""Which attention path runs on which platform, and why: one answer for the kernels and the dry run.
(The grouped matmul's `grouped_matmul_path`, at the end, answers the same for MoE experts, and
`quantized_matmul_path` for the weight-only quantized matmul.)

  attention_path("tpu", head_dim=128, dtype=jnp.bfloat16)        -> pallas (Mosaic flash)
  attention_path("cuda", head_dim=96, dtype=jnp.bfloat16)        -> xla (head_dim 96 not covered
                                                                     by the Triton kernel)
  attention_path("cuda", head_dim=128, dtype=jnp.bfloat16, page_size=16)  -> pallas (Triton paged)

`impl="auto"` takes a Pallas kernel only where tests/test_target_compile_kernels.py compiles it
with the real compiler (Mosaic for TPU, Triton for CUDA GPUs): the head dims, dtypes and page
sizes below. Everything else, and every other platform (CPU, ROCm), runs the XLA path.

The kernels' wrappers decide through `dispatch`, which asks `attention_path` once per platform
and lets `lax.platform_dependent` keep the branch of the platform the program is lowered for. So
a function jitted in a CPU-only process and lowered for compile-only TPU devices gets the Mosaic
kernel, and what the dry run prints is what the program compiles.
"""

import dataclasses

import jax.numpy as jnp
from jax import lax

IMPLS = ("auto", "xla", "pallas")
# What the target-compile tests compile (each value somewhere, not the full product).
COVERED_HEAD_DIMS = (64, 128, 256)
COVERED_DTYPES = ("bfloat16", "float32")
COVERED_PAGE_SIZES = (16, 64)
# Cache dtypes the paged kernels also read besides q's own: int8 pages with their scales.
COVERED_PAGED_KV_DTYPES = ("int8",)
# jax device platforms -> lax.platform_dependent's names. A jax GPU device says "gpu"; CUDA is
# the GPU platform we compile for (a ROCm GPU taken for CUDA still runs correct code: auto's
# XLA branch there, or the kernel under a harmless per-shard shard_map).
_CANONICAL = {"gpu": "cuda"}
_COMPILER = {"tpu": "Mosaic", "cuda": "Triton", "rocm": "Triton"}
_VARIANT = {"tpu": "tpu", "cuda": "gpu", "rocm": "gpu"}  # kernel variant per platform


@dataclasses.dataclass(frozen=True)
class Path:
  """impl: "pallas" or "xla" (grouped matmul: a `GMM_IMPLS` name); kernel: e.g. "Mosaic
  flash" (None for xla); reason: why."""
  impl: str
  kernel: str | None
  reason: str

  def __str__(self):
    return f"xla ({self.reason})" if self.impl == "xla" else f"{self.impl} ({self.kernel})"


def check_impl(impl):
  if impl not in IMPLS:
    raise ValueError(f"impl must be one of {IMPLS}, got {impl!r} (model.attention_impl)")
  return impl


def _pow2(n):
  return n > 0 and n & (n - 1) == 0


def attention_path(platform, *, head_dim, dtype, page_size=None, kv_dtype=None, impl="auto"):
  """The path attention takes on `platform` ("tpu", "cuda" or "gpu", "rocm", "cpu", ...).

  head_dim, dtype: of q (and of K/V unless kv_dtype says otherwise: the paged kernels also read
  an int8 cache); page_size: the paged cache's page size, None for self-attention (the flash
  kernel); impl: "auto", "xla" or "pallas". With impl="pallas" the kernel runs wherever its
  shapes allow (interpreted on CPU).
  """
  check_impl(impl)
  platform = _CANONICAL.get(platform, platform)
  op = "flash" if page_size is None else "paged"
  if impl == "xla":
    return Path("xla", None, "impl='xla'")
  if platform not in _COMPILER:
    if impl == "pallas":
      return Path("pallas", f"Mosaic {op}, interpreted", f"no {platform} kernel: interpreted")
    return Path("xla", None, f"no Pallas kernel for {platform}")
  compiler = _COMPILER[platform]
  kernel = f"{compiler} {op}"
  if compiler == "Triton" and op == "paged" and not (
      _pow2(page_size) and _pow2(head_dim) and head_dim >= 16):
    # Triton tensors have power-of-two sizes, and padding would copy the page pool per call.
    return Path("xla", None, f"page_size {page_size} and head_dim {head_dim} must be powers "
                f"of two (head_dim >= 16) for the Triton kernel")
  if impl == "pallas":
    return Path("pallas", kernel, "impl='pallas'")
  if platform == "rocm":
    return Path("xla", None, "the Triton kernels are not compile-tested for ROCm")
  dtypes = {jnp.dtype(dtype).name, jnp.dtype(kv_dtype or dtype).name}
  if op == "paged":
    dtypes -= set(COVERED_PAGED_KV_DTYPES)
  if len(dtypes) > 1 or not dtypes <= set(COVERED_DTYPES):
    return Path("xla", None, f"dtype {'/'.join(sorted(dtypes))} not covered by the {compiler} "
                "kernel")
  if head_dim not in COVERED_HEAD_DIMS:
    return Path("xla", None, f"head_dim {head_dim} not covered by the {compiler} kernel")
  if page_size is not None and page_size not in COVERED_PAGE_SIZES:
    return Path("xla", None, f"page_size {page_size} not covered by the {compiler} kernel")
  return Path("pallas", kernel, "compile-tested")


def dispatch(args, *, impl, interpret, backend, path_of, kernel, xla):
  """Runs kernel or XLA as `attention_path` decides for the platform being lowered.

  path_of(platform) -> Path; kernel(variant, interpret) -> a function of *args, for variant
  "tpu" (Mosaic) or "gpu" (Triton); xla: a function of *args.

  impl="pallas" with `backend` or a truthy `interpret` runs that variant (default "tpu")
  wherever it is lowered: tests interpret kernels on CPU this way. Otherwise each platform gets
  its branch through `lax.platform_dependent`: impl="auto" runs XLA on platforms without a
  covered kernel; impl="pallas" with interpret=None interprets on platforms without a kernel,
  and with interpret=False refuses to lower for them.
  """
  check_impl(impl)
  if impl == "xla":
    return xla(*args)
  if impl == "pallas" and (backend is not None or interpret):
    return kernel(backend or "tpu", interpret or False)(*args)
  compiled = {v: kernel(v, False) for v in set(_VARIANT.values())}
  branches = {p: compiled[v] if path_of(p).impl == "pallas" else xla
              for p, v in _VARIANT.items()}
  default = None
  if impl == "auto":
    default = xla
  elif interpret is None:
    default = kernel("tpu", True)
  return lax.platform_dependent(*args, default=default, **branches)


# ------------------------------------------------------------------------------ grouped matmul

GMM_IMPLS = ("auto", "xla", "triton", "megablox")
# What tests/test_target_compile_kernels.py compiles the grouped-matmul kernels for. The kernels
# mask every edge, so any shape compiles once a dtype does.
GMM_COVERED_DTYPES = ("bfloat16", "float32")
# platform -> (impl, kernel) of the grouped-matmul kernel there: ours on GPUs (XLA:GPU expands
# ragged_dot densely), JAX's megablox on TPUs (XLA:TPU's ragged_dot backward computes the
# weight gradient densely).
GMM_KERNELS = {"cuda": ("triton", "Triton gmm"), "tpu": ("megablox", "Mosaic megablox gmm")}


def grouped_matmul_path(platform, *, x_dtype, w_dtype, impl="auto"):
  """The path `grouped_matmul` takes on `platform`: a Path whose impl is a GMM_IMPLS name.

  auto: the platform's kernel (GMM_KERNELS) where its dtypes are compile-tested, else
  ragged_dot (which XLA:GPU expands to a dense matmul over all E experts).
  """
  if impl not in GMM_IMPLS:
    raise ValueError(f"impl must be one of {GMM_IMPLS}, got {impl!r}")
  platform = _CANONICAL.get(platform, platform)
  if impl != "auto":
    kernel = None if impl == "xla" else dict(GMM_KERNELS.values()).get(impl, impl)
    return Path(impl, kernel, f"impl={impl!r}")
  if platform not in GMM_KERNELS:
    return Path("xla", None, f"no grouped-matmul kernel for {platform}")
  impl, kernel = GMM_KERNELS[platform]
  dtypes = {jnp.dtype(x_dtype).name, jnp.dtype(w_dtype).name}
  if not dtypes <= set(GMM_COVERED_DTYPES):
    return Path("xla", None, f"dtype {'/'.join(sorted(dtypes))} not covered by the {kernel} "
                "kernel")
  return Path(impl, kernel, "compile-tested")


# ---------------------------------------------------------------------------- quantized matmul

QMM_KINDS = ("int8", "int4", "nf4")
# What tests/test_target_compile_kernels.py compiles the quantized-matmul kernels for (each
# value somewhere): x dtypes, and group sizes besides per-channel (group == K).
QMM_COVERED_DTYPES = ("bfloat16", "float32")
QMM_COVERED_GROUPS = (32, 64, 128)
QMM_KERNELS = {"tpu": "Mosaic qmm", "cuda": "Triton qmm"}
# The K tile must be a multiple of 128 lanes of x on TPU: x itself for int8, each of x's even and
# odd columns (K tile / 2) for the packed kinds. Triton's dot needs >= 16 along K.
_QMM_K_ALIGN = {("tpu", "int8"): 128, ("tpu", "packed"): 256,
                ("gpu", "int8"): 16, ("gpu", "packed"): 32}


def qmm_block_k(variant, kind, k, group, block_k):
  """The quantized matmul's K tile (rows of W) for kernel `variant` ("tpu" or "gpu"), at most
  block_k, or None where none fits. The one statement of the kernels' shape rules.

  gpu: a power of two that divides `group`, so a tile lies in one group and the group's scales
    multiply the tile's product (>= 16 rows for int8, >= 32 for the packed kinds).
  tpu: divides K, and lies in one group or holds whole groups, and is lane-aligned (above) or
    all of K. A tile of several groups stacks their scales in pieces of group (int8) or
    group / 2 (packed) rows, which must be whole 8-row sublane tiles then.
  """
  align = _QMM_K_ALIGN[variant, "int8" if kind == "int8" else "packed"]
  if variant == "gpu":
    bk = 1 << (min(block_k, group).bit_length() - 1)
    while bk >= align and group % bk:
      bk //= 2
    return bk if bk >= align else None
  rows_per_group = group if kind == "int8" else group // 2
  candidates = ([k] if k <= block_k else []) + list(range(min(block_k, k) // align * align, 0,
                                                          -align))
  for bk in candidates:
    if k % bk == 0 and (group % bk == 0 or (bk % group == 0 and rows_per_group % 8 == 0)):
      return bk
  return None


_QMM_RULE = {
    "gpu": "a power of two >= 16 (int8) or >= 32 (int4, nf4) must divide the group",
    "tpu": "a K tile must divide K, be a multiple of 128 (int8) or 256 (int4, nf4) or all of K, "
           "and lie in one group or hold whole groups of a multiple of 8 (int8) or 16 rows",
}


def qmm_tile_problem(variant, kind, k, group):
  """Why no kernel tile fits (a sentence), or None."""
  if qmm_block_k(variant, kind, k, group, k) is None:
    return f"group {group} with K={k} fits no {variant.upper()} kernel tile ({_QMM_RULE[variant]})"
  return None


def quantized_matmul_path(platform, *, x_dtype, kind, k, group, impl="auto"):
  """The path `quantized_matmul` takes on `platform`, for x [M, K] of x_dtype and W [K, N]
  quantized as `kind` in groups of `group` rows along K.

  auto: the platform's kernel (QMM_KERNELS) where x's dtype and the group size are
  compile-tested and a kernel tile fits (`qmm_block_k`); XLA (dequantize, then one dot)
  elsewhere. pallas: the kernel wherever a tile fits.
  """
  if impl not in IMPLS:
    raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
  platform = _CANONICAL.get(platform, platform)
  if impl == "xla":
    return Path("xla", None, "impl='xla'")
  if platform not in _VARIANT:
    if impl == "pallas":
      return Path("pallas", "Mosaic qmm, interpreted", f"no {platform} kernel: interpreted")
    return Path("xla", None, f"no quantized-matmul kernel for {platform}")
  kernel = QMM_KERNELS.get(platform, "Triton qmm")
  problem = qmm_tile_problem(_VARIANT[platform], kind, k, group)
  if problem:
    return Path("xla", None, problem)
  if impl == "pallas":
    return Path("pallas", kernel, "impl='pallas'")
  if platform == "rocm":
    return Path("xla", None, "the Triton kernels are not compile-tested for ROCm")
  dtype = jnp.dtype(x_dtype).name
  if dtype not in QMM_COVERED_DTYPES:
    return Path("xla", None, f"dtype {dtype} not covered by the {kernel} kernel")
  if group != k and group not in QMM_COVERED_GROUPS:
    return Path("xla", None, f"group {group} not covered by the {kernel} kernel")
  return Path("pallas", kernel, "compile-tested")
