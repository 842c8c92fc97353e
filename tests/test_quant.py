"""Round-to-nearest quantization (model/quant.py) against numpy written here: the error bound
s / 2 per element, int4 packing, the NF4 code book from its definition, double quantization."""

from statistics import NormalDist

import jax.numpy as jnp
import numpy as np
import pytest

from model import quant


def _weight(shape, seed=0):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _groups(w, n_batch, n_in, group):
  """w as [*batch, G, group, N] (numpy), the layout statistics are taken over."""
  batch = w.shape[:n_batch]
  k = int(np.prod(w.shape[n_batch:n_batch + n_in]))
  return w.reshape(*batch, k // group, group, -1)


# (shape, n_batch, n_in, group): a 2-D weight, q's [D, N, H], o's [N, H, D], experts [E, D, F].
SHAPES = [((64, 48), 0, 1, 16), ((64, 4, 8), 0, 1, 0), ((4, 8, 64), 0, 2, 32),
          ((3, 32, 24), 1, 1, 8)]


@pytest.mark.parametrize("shape,n_batch,n_in,group", SHAPES)
@pytest.mark.parametrize("kind,symmetric", [("int8", True), ("int4", True), ("int4", False)])
def test_error_is_within_half_a_step(shape, n_batch, n_in, group, kind, symmetric):
  w = _weight(shape)
  q = quant.quantize(w, kind, group, n_batch=n_batch, n_in=n_in, symmetric=symmetric)
  assert q.astype(jnp.float32).shape == w.shape and q.values.dtype == (
      np.int8 if kind == "int8" else np.uint8)
  k = int(np.prod(shape[n_batch:n_batch + n_in]))
  g = _groups(w, n_batch, n_in, group or k)
  if symmetric:
    step = np.abs(g).max(axis=-2, keepdims=True) / (127 if kind == "int8" else 7)
  else:
    step = (np.maximum(g.max(axis=-2, keepdims=True), 0)
            - np.minimum(g.min(axis=-2, keepdims=True), 0)) / 15
  err = np.abs(_groups(np.asarray(q.astype(jnp.float32)), n_batch, n_in, group or k) - g)
  assert np.all(err <= step / 2 * (1 + 1e-5) + 1e-7)


def test_int4_packing_round_trip_and_nibble_order():
  codes = np.random.default_rng(1).integers(-8, 8, size=(6, 10, 3))
  packed = np.asarray(quant.pack_int4(codes, axis=1))
  assert packed.shape == (6, 5, 3) and packed.dtype == np.uint8
  # Element 2i in the low nibble, 2i + 1 in the high one, two's complement.
  np.testing.assert_array_equal(packed & 0xF, codes[:, 0::2] & 0xF)
  np.testing.assert_array_equal(packed >> 4, codes[:, 1::2] & 0xF)
  from pallas_kernels.quantized_matmul import unpack_int4  # [K/2, N] -> [K, N]
  for i in range(6):
    np.testing.assert_array_equal(unpack_int4(packed[i], signed=True), codes[i])
    np.testing.assert_array_equal(unpack_int4(packed[i], signed=False), codes[i] & 0xF)


def test_nf4_code_book_is_the_papers():
  """QLoRA's NF4: 8 positive and 7 negative normal quantiles (offset 0.9677...), and 0,
  normalised to [-1, 1] (Dettmers et al. 2023, eq. 4 and Appendix E)."""
  ppf, offset = NormalDist().inv_cdf, 0.9677083
  positive = [ppf(p) for p in np.linspace(offset, 0.5, 9)[:-1]]
  negative = [-ppf(p) for p in np.linspace(offset, 0.5, 8)[:-1]]
  book = np.sort(positive + [0.0] + negative)
  np.testing.assert_allclose(quant.NF4, book / book.max(), atol=1e-6)


def test_nf4_takes_the_nearest_code():
  w = _weight((128, 16), seed=2)
  q = quant.quantize(w, "nf4", 64)
  g = _groups(w, 0, 1, 64)
  absmax = np.abs(g).max(axis=-2, keepdims=True)
  nearest = quant.NF4[np.abs((g / absmax)[..., None] - quant.NF4).argmin(-1)] * absmax
  np.testing.assert_allclose(_groups(np.asarray(q.astype(jnp.float32)), 0, 1, 64), nearest,
                             rtol=1e-6, atol=1e-7)


def test_double_quantization_round_trips():
  """NF4 scales as int8 blocks of 256 around their mean: error within half an int8 step of
  each block, and the weight about half a byte a parameter."""
  w = _weight((1024, 96), seed=3)
  q = quant.quantize(w, "nf4", 64, double_quant=True)
  plain = quant.quantize(w, "nf4", 64)
  s, s_dq = np.asarray(plain.scales).reshape(-1), np.asarray(q.scale_array()).reshape(-1)
  blocks = np.pad(s - s.mean(), (0, -len(s) % 256)).reshape(-1, 256)
  step = np.repeat(np.abs(blocks).max(axis=1) / 127, 256)[:len(s)]
  assert np.all(np.abs(s_dq - s) <= step / 2 + 1e-6)
  nbytes = sum(a.size * a.dtype.itemsize for a in (q.values, q.scales.codes, q.scales.absmax))
  assert nbytes / w.size < 0.52


def test_bad_input_is_named():
  w = _weight((48, 8))
  with pytest.raises(ValueError, match="group 32 does not divide the input size 48"):
    quant.quantize(w, "int8", 32)
  with pytest.raises(ValueError, match="'int3' is not one of"):
    quant.quantize(w, "int3")
  with pytest.raises(ValueError, match="odd size 9"):
    quant.quantize(_weight((9, 4)), "int4")


@pytest.mark.parametrize("kind,double_quant", [("int4", False), ("nf4", True)])
def test_slicing_leading_axes_keeps_a_quantized_slice(kind, double_quant):
  """Stacked layers [L, D, F] scanned over L: each slice dequantizes to the weight's slice
  (double-quantized scales have their blocks and offset per layer)."""
  import jax
  w = _weight((3, 32, 24), seed=4)
  q = quant.quantize(w, kind, 8, n_batch=1, double_quant=double_quant)
  second = jax.tree.map(lambda a: a[1], q)
  assert second.shape == (32, 24) and second.n_batch == 0
  np.testing.assert_array_equal(second.astype(jnp.float32), q.astype(jnp.float32)[1])
  total = jax.lax.scan(lambda c, layer: (c + layer.astype(jnp.float32), None),
                       jnp.zeros((32, 24)), q)[0]
  np.testing.assert_allclose(total, q.astype(jnp.float32).sum(0), rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- in the model

def _model(n_experts=0, scan=True):
  import flax.linen as nn
  import jax
  from model import ModelConfig, Transformer
  cfg = ModelConfig(vocab_size=97, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128,
                    max_seq_len=32, n_experts=n_experts, scan_layers=scan)
  tokens = jnp.zeros((1, 8), jnp.int32)
  boxed = Transformer(cfg).init(jax.random.PRNGKey(0), tokens, tokens)["params"]
  return cfg, boxed, nn.unbox(boxed)


def _logits(cfg, params, tokens):
  from model.transformer import forward
  positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
  return forward(cfg, params, tokens, positions)[0]


@pytest.mark.parametrize("n_experts,scan,kind,group", [(0, True, "int8", 0),
                                                      (0, False, "int4", 32),
                                                      (4, True, "nf4", 64)])
def test_quantized_model_equals_its_dequantized_weights(n_experts, scan, kind, group):
  """Every block matmul quantized (stacked layers scanned or a layer at a time, MoE experts):
  the logits are those of the f32 model holding the dequantized weights."""
  import jax
  cfg, _, params = _model(n_experts, scan)
  qparams = quant.quantize_params(params, kind, group)
  leaves = jax.tree.leaves(qparams, is_leaf=quant.is_quantized)
  assert sum(map(quant.is_quantized, leaves)) == (7 if scan else 14)
  dequantized = jax.tree.map(lambda x: x.astype(jnp.float32) if quant.is_quantized(x) else x,
                             qparams, is_leaf=quant.is_quantized)
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 12), 0, cfg.vocab_size)
  got = jax.jit(lambda p: _logits(cfg, p, tokens))(qparams)
  np.testing.assert_allclose(got, _logits(cfg, dequantized, tokens), rtol=1e-5, atol=1e-5)
  assert not np.allclose(got, _logits(cfg, params, tokens), atol=1e-4)  # it is quantized


def test_sharded_quantized_inference_equals_one_device():
  """(data, fsdp, tensor) = (2, 2, 2): values split like their weights, scales by their
  output axes; the logits equal one device's."""
  import jax
  from model import sharding
  cfg, boxed, params = _model()
  qparams = quant.quantize_params(params, "int4", 32, symmetric=False)
  mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
  shardings = quant.shardings(sharding.shardings_for(boxed, mesh), qparams)
  q = shardings["layers"]["attn"]["q"]  # [L, D, N, H]; scales [L, G, N, H]
  assert tuple(q.values.spec)[:3] == (None, "fsdp", "tensor")
  assert tuple(q.scales.spec)[:3] == (None, None, "tensor")
  placed = jax.device_put(qparams, shardings)
  tokens = jax.random.randint(jax.random.PRNGKey(2), (4, 12), 0, cfg.vocab_size)
  sharded = jax.jit(sharding.in_mesh(lambda p, t: _logits(cfg, p, t), mesh))(placed, tokens)
  np.testing.assert_allclose(sharded, _logits(cfg, qparams, tokens), rtol=1e-5, atol=1e-5)


def test_decoding_and_the_engine_run_quantized_weights():
  """Greedy decoding (plain and prompt-lookup speculation) and the paged engine on an int4
  model give the tokens of the f32 model holding its dequantized weights: the prepared
  (fused q/k/v and gate/up) tree keeps the weights quantized."""
  import jax
  from infer import decode, speculative
  from infer.engine import Engine, EngineConfig
  from infer.sampling import SamplingParams
  from model import fused
  cfg, _, params = _model()
  params = jax.tree.map(lambda a: a * 8, params)  # peaked logits: no near-ties
  qparams = quant.quantize_params(params, "int4", 32)
  dequantized = jax.tree.map(lambda x: x.astype(jnp.float32) if quant.is_quantized(x) else x,
                             qparams, is_leaf=quant.is_quantized)
  prepared = fused.prepare(cfg, qparams, layout="in_out")
  assert quant.is_quantized(prepared["layers"][0]["attn"]["qkv"].w)
  prompts = [[5, 6, 7, 5, 6, 7, 5, 6], [9, 3, 1]]
  greedy = SamplingParams(temperature=0)
  want = decode.generate(cfg, dequantized, prompts, max_new_tokens=10, sampling=greedy)
  assert decode.generate(cfg, qparams, prompts, max_new_tokens=10, sampling=greedy) == want
  assert decode.generate(cfg, qparams, prompts, max_new_tokens=10, sampling=greedy,
                         draft=speculative.PromptLookup(2)) == want
  engine = Engine(cfg, qparams, EngineConfig(num_pages=32, page_size=4, max_batch=2,
                                             prefill_chunk=8, prefill_rows=1))
  ids = [engine.add_request(p, max_new_tokens=10, sampling=greedy) for p in prompts]
  done = {}
  while engine.has_work():
    for rid, tokens in engine.step():
      done.setdefault(rid, []).extend(tokens)
  assert [done[i] for i in ids] == want
