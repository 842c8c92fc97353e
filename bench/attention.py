"""Attention throughput: our Pallas kernels vs. XLA vs. jax.nn.dot_product_attention.

  python bench/attention.py                      # full sweep on GPU/TPU, quick XLA-only on CPU
  python bench/attention.py --seq-lens 2048 8192 --heads 32 --kv-heads 8 --head-dim 128

Prints one JSON object per line, first the path impl="auto" takes for these shapes here:
  {"auto": {"flash": "pallas (Triton flash)", "paged": "pallas (Triton paged)"}}
  {"bench": "flash", "impl": ..., "pass": "fwd" | "fwd+bwd", "seq_len": ..., "ms": ...,
   "tflops": ...}
  {"bench": "paged_decode", "impl": ..., "context": ..., "us": ..., "kv_gb_per_s": ...}
FLOPs count the two matmuls of attention (4 * B * Hq * T * S * D), halved when causal; the
backward pass counts 2.5x the forward (FlashAttention-2, Sec. 4.1), so fwd+bwd is 3.5x.
On CPU there are no Pallas kernels to time (interpret mode measures the interpreter), so only
the XLA paths run, at sizes that finish in well under a minute.
"""

import argparse
import functools
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pallas_kernels.attention import attention_path  # noqa: E402
from pallas_kernels.flash_attention import flash_attention  # noqa: E402
from pallas_kernels.paged_attention import paged_attention  # noqa: E402

ON_ACCELERATOR = jax.default_backend() in ("gpu", "cuda", "rocm", "tpu")


def _parse():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--quick", action="store_true", help="small sizes (the default on CPU)")
  p.add_argument("--batch", type=int, default=None)
  p.add_argument("--heads", type=int, default=None, help="query heads Hq")
  p.add_argument("--kv-heads", type=int, default=None, help="KV heads Hkv (GQA)")
  p.add_argument("--head-dim", type=int, default=None)
  p.add_argument("--seq-lens", type=int, nargs="+", default=None)
  p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
  p.add_argument("--no-causal", action="store_true")
  p.add_argument("--decode-batch", type=int, default=None)
  p.add_argument("--contexts", type=int, nargs="+", default=None, help="paged decode lengths")
  p.add_argument("--page-size", type=int, default=16)
  p.add_argument("--iters", type=int, default=None)
  p.add_argument("--dense-max-gb", type=float, default=8.0,
                 help="skip paths that materialise the [B,H,T,S] scores above this size")
  p.add_argument("--skip-flash", action="store_true")
  p.add_argument("--skip-paged", action="store_true")
  args = p.parse_args()
  quick = args.quick or not ON_ACCELERATOR
  defaults = dict(batch=1, heads=8, kv_heads=2, head_dim=64, seq_lens=[256, 512, 1024],
                  decode_batch=4, contexts=[256, 1024, 4096], iters=3) if quick else dict(
                      batch=2, heads=32, kv_heads=4, head_dim=128,
                      seq_lens=[1024, 2048, 4096, 8192, 16384], decode_batch=8,
                      contexts=[1024, 4096, 16384, 32768], iters=20)
  for name, value in defaults.items():
    if getattr(args, name) is None:
      setattr(args, name, value)
  return args


def _time(fn, *args, iters):
  """Median wall time in seconds of fn(*args), compiled and warmed up first."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def _flash_impls(causal):
  """name -> (function, whether it materialises the scores)."""
  impls = {"xla": (functools.partial(flash_attention, impl="xla", causal=causal), True)}
  if ON_ACCELERATOR:
    impls["pallas"] = (functools.partial(flash_attention, impl="pallas", causal=causal), False)
  on_gpu = jax.default_backend() in ("gpu", "cuda")
  impls["jax.nn.dot_product_attention" + ("[cudnn]" if on_gpu else "")] = (functools.partial(
      jax.nn.dot_product_attention, is_causal=causal,
      implementation="cudnn" if on_gpu else None), not on_gpu)
  return impls


def bench_flash(args, emit):
  dtype = jnp.dtype(args.dtype)
  causal = not args.no_causal
  key = jax.random.PRNGKey(0)
  for t in args.seq_lens:
    kq, kk, kv = jax.random.split(jax.random.fold_in(key, t), 3)
    q = jax.random.normal(kq, (args.batch, t, args.heads, args.head_dim), dtype)
    k = jax.random.normal(kk, (args.batch, t, args.kv_heads, args.head_dim), dtype)
    v = jax.random.normal(kv, (args.batch, t, args.kv_heads, args.head_dim), dtype)
    flops = 4 * args.batch * args.heads * t * t * args.head_dim * (0.5 if causal else 1.0)
    dense_gb = 3 * 4 * args.batch * args.heads * t * t / 1e9  # f32 scores, probs, grads
    for name, (fn, dense) in _flash_impls(causal).items():
      if dense and dense_gb > args.dense_max_gb:
        emit(dict(bench="flash", impl=name, seq_len=t, skipped=f"needs ~{dense_gb:.0f} GB of "
                  f"scores (> --dense-max-gb {args.dense_max_gb})"))
        continue
      fwd = jax.jit(fn)
      loss = lambda q, k, v, fn=fn: jnp.sum(fn(q, k, v).astype(jnp.float32))
      fwd_bwd = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
      for pass_name, f, mult in (("fwd", fwd, 1.0), ("fwd+bwd", fwd_bwd, 3.5)):
        row = dict(bench="flash", impl=name, **{"pass": pass_name}, seq_len=t, batch=args.batch,
                   heads=args.heads, kv_heads=args.kv_heads, head_dim=args.head_dim,
                   dtype=args.dtype, causal=causal, device=jax.devices()[0].device_kind)
        try:
          sec = _time(f, q, k, v, iters=args.iters)
          row.update(ms=round(sec * 1e3, 3), tflops=round(flops * mult / sec / 1e12, 3))
        except Exception as e:  # e.g. cuDNN refusing a shape: report it, keep going
          row.update(error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
        emit(row)


def bench_paged(args, emit):
  dtype = jnp.dtype(args.dtype)
  b, page = args.decode_batch, args.page_size
  rng = np.random.default_rng(0)
  impls = {"xla": functools.partial(paged_attention, impl="xla")}
  if ON_ACCELERATOR:
    impls["pallas"] = functools.partial(paged_attention, impl="pallas")
  for ctx in args.contexts:
    pps = -(-ctx // page)
    num_pages = b * pps
    q = jnp.asarray(rng.standard_normal((b, args.heads, args.head_dim)), dtype)
    k_pages = jnp.asarray(rng.standard_normal((args.kv_heads, num_pages, page, args.head_dim)),
                          dtype)
    v_pages = jnp.asarray(rng.standard_normal(k_pages.shape), dtype)
    table = jnp.asarray(rng.permutation(num_pages).reshape(b, pps), jnp.int32)
    lengths = jnp.full((b,), ctx, jnp.int32)
    kv_bytes = 2 * b * ctx * args.kv_heads * args.head_dim * dtype.itemsize
    for name, fn in impls.items():
      row = dict(bench="paged_decode", impl=name, context=ctx, batch=b, heads=args.heads,
                 kv_heads=args.kv_heads, head_dim=args.head_dim, page_size=page,
                 dtype=args.dtype, device=jax.devices()[0].device_kind)
      try:
        sec = _time(jax.jit(fn), q, k_pages, v_pages, lengths, table, iters=args.iters)
        row.update(us=round(sec * 1e6, 1), kv_gb_per_s=round(kv_bytes / sec / 1e9, 2))
      except Exception as e:
        row.update(error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
      emit(row)


def main():
  args = _parse()

  def emit(row):
    print(json.dumps(row), flush=True)

  path = functools.partial(attention_path, jax.devices()[0].platform, head_dim=args.head_dim,
                           dtype=args.dtype)
  emit(dict(auto=dict(flash=str(path()), paged=str(path(page_size=args.page_size)))))
  if not ON_ACCELERATOR:
    emit(dict(note="CPU: XLA paths only (Pallas kernels need a GPU or TPU), quick sizes"))
  if not args.skip_flash:
    bench_flash(args, emit)
  if not args.skip_paged:
    bench_paged(args, emit)


if __name__ == "__main__":
  main()
