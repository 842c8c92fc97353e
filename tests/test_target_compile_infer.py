"""Inference compiles for a TPU (v5e) and a GPU (H100) at SmolLM2's size, with the real
compilers (compile-only devices, train/accelerators.py), and prefill's memory plan holds
neither the [B, T, V] f32 logits nor [B, K, G, T, S] attention scores.

SmolLM2-135M's shapes (vocab 49152, d_model 576, 9 query / 3 kv heads, bf16) with 2 of its 30
layers: every layer plans the same temporaries, so 2 show what 30 would. Nothing runs; what the
compilers refuse would fail on the device too. What this cannot tell: speed, or numerics on
the device (tests/test_infer_*.py check the same functions' outputs on CPU).
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from infer import decode, engine, step
from infer.sampling import Features, SamplingBatch, SamplingParams
from model import ModelConfig, Transformer, fused
from model.kv_cache import PagedKVCache

CFG = ModelConfig(vocab_size=49152, d_model=576, n_layers=2, n_heads=9, n_kv_heads=3, d_ff=1536,
                  max_seq_len=8192, param_dtype="bfloat16", dtype="bfloat16",
                  attention_impl="auto", scan_layers=False)
TARGETS = ("v5e-1", "h100-1")
B, NEW = 2, 256  # prompts per batch; new-token budget (cache length = T + NEW)
FEATURES = Features.of([SamplingParams()])  # temperature sampling: the general path
KERNEL_CALL = {"v5e-1": "tpu_custom_call", "h100-1": "__gpu$xla.gpu.triton"}  # Mosaic, Triton

@functools.cache
def _module_params_shape():
  tokens = jnp.zeros((1, 1), jnp.int32)
  init = lambda key: nn.unbox(Transformer(CFG).init(key, tokens, tokens)["params"])
  return jax.eval_shape(init, jax.random.PRNGKey(0))


def _on(tree, device):
  """ShapeDtypeStructs of `tree`'s arrays, placed (replicated) on one compile-only device."""
  sharding = NamedSharding(Mesh(np.array([device]), ("x",)), P())
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding),
                      tree)


def _prefill_args(t, device):
  params = jax.eval_shape(lambda p: fused.prepare(CFG, p, layout="in_out"),
                          _module_params_shape())
  keys = jax.eval_shape(lambda: decode.row_keys(0, B))
  host = (np.zeros((B, t), np.int32), np.full((B,), t, np.int32), np.full((B,), NEW, np.int32),
          keys, SamplingBatch.of([SamplingParams()] * B), np.full((4,), -1, np.int32),
          np.int32(0))
  return _on((params, *host), device)


def _prefill_step(t, device):
  static = dict(cfg=CFG, features=FEATURES, cache_len=t + NEW, cache_dtype=None, stream=0)
  return step.prefill_state, _prefill_args(t, device), static


def _nbytes(x):
  return x.size * x.dtype.itemsize


@pytest.mark.parametrize("target", TARGETS)
def test_prefill_holds_no_full_logits_or_scores_and_grows_linearly(target, target_devices):
  device = target_devices(target)[0]
  temps = {}
  for t in (1024, 2048):
    fn, args, static = _prefill_step(t, device)
    lowered = fn.lower(*args, **static)
    # The prompt attends through the flash kernel, compiled for the device (the cache path
    # has no kernel: its attention is plain XLA).
    assert KERNEL_CALL[target] in lowered.as_text(), target
    temps[t] = lowered.compile().memory_analysis().temp_size_in_bytes
  t = 2048
  logits = B * t * CFG.vocab_size * 4  # f32 [B, T, V]: 805 MB
  scores = B * CFG.n_heads * t * (t + NEW) * 4  # f32 [B, K, G, T, S] of one layer: 339 MB
  # Measured (T = 1024 -> 2048): before, GPU 406 -> 812 MB, TPU 1615 MB at 2048 (the logits
  # and more); now GPU 28 -> 57 MB, TPU 66 MB at both (most of it one relayout of the 57 MB
  # embedding table, whatever T).
  assert temps[t] < min(logits, scores) / 4, (target, temps)
  assert temps[t] < 2.2 * temps[1024], (target, temps)  # scores would roughly quadruple


@pytest.mark.parametrize("target", TARGETS)
def test_decode_loop_compiles(target, target_devices):
  device = target_devices(target)[0]
  fn, args, static = _prefill_step(2048, device)
  state = jax.eval_shape(functools.partial(fn, **static), *args)
  params, *_, eos_ids, sink_id = args
  loop = decode._decode_loop.lower(params, _on(state, device), eos_ids, sink_id, cfg=CFG,
                                   features=FEATURES, stream=0).compile()
  cache_bytes = sum(_nbytes(x) for x in jax.tree.leaves((state.cache.k, state.cache.v)))
  # The state is donated and updated in place step after step. The compilers relayout some
  # arrays once around the loop (measured: XLA:GPU the cache, XLA:TPU the embedding table
  # and the cache), never more than one copy of each.
  temp = loop.memory_analysis().temp_size_in_bytes
  assert temp < cache_bytes + _nbytes(params["embedding"]) + 8 * 2**20, (target, temp)


# The engine: one step over a paged cache with a 512-token prefill chunk and MAX_BATCH decode
# rows (the paged kernels take a chunk's query rows in blocks, so long chunks fit the GPU's
# shared memory and the TPU's scoped VMEM).
PAGE_SIZE, NUM_PAGES, PAGES_PER_SEQ, MAX_BATCH = 16, 1024, 160, 16
PREFILL_CHUNK = 512


def _group(rows, t, device, sample_all=False):
  """An engine._Group of `rows` rows of `t` tokens."""
  g = engine._Group(tokens=np.zeros((rows, t), np.int32), n_real=np.full((rows,), t, np.int32),
                    start=np.zeros((rows,), np.int32),
                    table=np.zeros((rows, PAGES_PER_SEQ), np.int32),
                    seeds=np.zeros((rows,), np.uint32), counter=np.zeros((rows,), np.int32),
                    sampling=SamplingBatch.of([SamplingParams()] * rows),
                    seen=np.zeros((rows, 1), bool), sample_all=sample_all)
  return _on(g, device)


@pytest.mark.parametrize("target,cache_dtype,num_draft", [(t, None, 0) for t in TARGETS] + [
    (t, "int8", 0) for t in TARGETS] + [(t, None, 4) for t in TARGETS])
def test_engine_step_compiles_without_chunk_logits(target, cache_dtype, num_draft,
                                                   target_devices):
  """One forward for the prefill chunk and the decode rows (each with num_draft prompt-lookup
  drafts, all sampled), also over an int8 cache (model/kv_cache.py): the paged kernel reads
  its codes and scales."""
  device = target_devices(target)[0]
  cfg = CFG
  params = jax.eval_shape(lambda p: fused.prepare(CFG, p, layout="in_out"),
                          _module_params_shape())
  pools = jax.eval_shape(lambda: PagedKVCache.init(CFG, 1, NUM_PAGES, PAGE_SIZE, 1, cache_dtype,
                                                   per_layer=True))
  pools = (pools.k_pages, pools.v_pages, pools.k_scale, pools.v_scale)
  copies = np.zeros((MAX_BATCH + 1,), np.int32)
  chunk = PREFILL_CHUNK
  groups = (_group(1, chunk, device), _group(MAX_BATCH, 1 + num_draft, device, num_draft > 0))
  lowered = engine._device_step.lower(*_on((params, pools, copies, copies), device), groups,
                                      cfg=cfg, features=FEATURES)
  assert KERNEL_CALL[target] in lowered.as_text(), target
  compiled = lowered.compile()
  # The head runs at each row's last token: the chunk's f32 [1, T, V] logits, which the step
  # held before, would alone outweigh all of its temporaries (measured before: TPU 106 MB,
  # GPU 54 MB; then 81 MB and 28 MB; one forward for both groups: 68 MB and 12 MB, with 4
  # drafts a decode row 66 MB and 16 MB).
  temp = compiled.memory_analysis().temp_size_in_bytes
  assert temp < chunk * CFG.vocab_size * 4, (target, temp)


@pytest.mark.parametrize("target", TARGETS)
def test_quantized_decode_loop_compiles_with_the_quantized_kernels(target, target_devices):
  """An int4 (g64) model's prepared tree (model/quant.py, model/fused.py): every block matmul
  of the decode loop is the weight-only Pallas kernel (pallas_kernels/quantized_matmul.py),
  and the loop's temporaries stay under the bf16 weights it would dequantize otherwise."""
  import re
  from model import quant
  device = target_devices(target)[0]
  fn, args, static = _prefill_step(512, device)
  state = jax.eval_shape(functools.partial(fn, **static), *args)
  _, *_, eos_ids, sink_id = args
  params = _on(jax.eval_shape(lambda p: fused.prepare(
      CFG, quant.quantize_params(p, "int4", 64), layout="in_out"), _module_params_shape()),
      device)
  loop = decode._decode_loop.lower(params, _on(state, device), eos_ids, sink_id, cfg=CFG,
                                   features=FEATURES, stream=0).compile()
  text = loop.as_text()
  calls = [line for line in text.splitlines() if KERNEL_CALL[target] in line
           and re.search(r'op_name="[^"]*/quantized_matmul/pallas_call"', line)]
  assert len(calls) >= 4 * CFG.n_layers, len(calls)  # qkv, o, gate_up, down per layer
  layer_weights = 2 * CFG.d_model * (CFG.n_heads + 2 * CFG.n_kv_heads) * CFG.head_dim + (
      2 * 3 * CFG.d_model * CFG.d_ff)  # bf16 bytes of one layer's dequantized matmuls
  cache_bytes = sum(_nbytes(x) for x in jax.tree.leaves((state.cache.k, state.cache.v)))
  temp = loop.memory_analysis().temp_size_in_bytes
  assert temp < cache_bytes + _nbytes(params["embedding"]) + layer_weights, (target, temp)
