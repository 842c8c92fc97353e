"""QLoRA (Dettmers et al. 2023): `lora.base_quant` quantizes LoRA's frozen base on load. Checked
against numpy: NF4 from the paper's code book with double-quantized scales, round-tripped
here, is the base the adapters run over; a train step moves only the adapters; the run
exports the dequantized base plus the adapters' products."""

import json
import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base as base_config
from infer import workdir as run_dir
from model import ModelConfig, Transformer, lora, quant, transformer
from train.checkpoint import Checkpointer
from train.config import ConfigError
from train.loop import build_program, model_and_mesh
from train.tasks import common

MODEL = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
             max_seq_len=32)
GROUP = 16
# QLoRA's NF4 code book (Appendix E; bitsandbytes' table), index = code.
NF4_BOOK = np.array([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
                     -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
                     0.07958029955625534, 0.16093020141124725, 0.24611230194568634,
                     0.33791524171829224, 0.44070982933044434, 0.5626170039176636,
                     0.7229568362236328, 1.0], np.float32)
IN_DIMS = {"q": 1, "k": 1, "v": 1, "o": 2, "gate": 1, "up": 1, "down": 1}


def nf4_round_trip(w, group: int, n_in: int):
  """w [L, *in, *out] (scanned layers) through NF4 and back, in numpy: an absmax per group of
  `group` input elements and output element, each value the nearest code; the absmaxes, per
  layer, minus their mean, in int8 blocks of 256 (double quantization, Sec. 3)."""
  w = np.asarray(w, np.float32)
  lead, k = w.shape[0], math.prod(w.shape[1:1 + n_in])
  x = w.reshape(lead, k // group, group, -1)
  absmax = np.abs(x).max(axis=2, keepdims=True)
  codes = np.abs((x / absmax)[..., None] - NF4_BOOK).argmin(-1)
  s = absmax.reshape(lead, -1)
  offset = s.mean(axis=1, keepdims=True, dtype=np.float32)
  n = s.shape[1]
  blocks = np.pad(s - offset, ((0, 0), (0, -n % 256))).reshape(lead, -1, 256)
  step = np.abs(blocks).max(axis=2, keepdims=True) / np.float32(127)
  s_dq = (np.round(blocks / step) * step).reshape(lead, -1)[:, :n] + offset
  return (NF4_BOOK[codes] * s_dq.reshape(absmax.shape)).reshape(w.shape)


def _expected_base(params, group: int = GROUP):
  """The dense tree with every block matmul NF4 round-tripped (numpy)."""
  out = jax.tree.map(np.asarray, params)
  for module, names in (("attn", ("q", "k", "v", "o")), ("mlp", ("gate", "up", "down"))):
    for name in names:
      out["layers"][module][name] = nf4_round_trip(params["layers"][module][name], group,
                                                   IN_DIMS[name])
  return out


def _cfg(**lora):
  c = base_config.get_config()
  c.task = "sft"
  c.model.update(**MODEL)
  c.data.seq_len = 16
  c.train.batch_size = 2
  c.train.weight_decay = 0.0
  c.train.warmup_steps = 0
  c.train.lr = 1e-2
  c.mesh.data = 1
  c.lora.update(**{"rank": 4, "base_quant": "nf4", "base_quant_group": GROUP, **lora})
  return c


def _positions(b, t):
  return jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))


def _dense(seed=0, model=MODEL):
  """A dense tree of the model's shapes, normal(0, 0.2) values (no init to compile)."""
  tok = jnp.zeros((1, 1), jnp.int32)
  init = lambda: Transformer(ModelConfig(**model)).init(jax.random.PRNGKey(0), tok, tok)
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: jnp.asarray(0.2 * rng.standard_normal(x.shape), x.dtype),
                      nn.unbox(jax.eval_shape(init)["params"]))


def _forward(params, tokens):
  b, t = tokens.shape
  return jax.jit(transformer.forward, static_argnums=0)(ModelConfig(**MODEL), params, tokens,
                                                        _positions(b, t))[0]


def test_zero_adapters_give_the_numpy_dequantized_base():
  """B = 0 adapters over the base quantized on load: the logits of a dense forward over the
  base NF4-round-tripped in numpy, to float rounding."""
  cfg, model_cfg = _cfg(), ModelConfig(**MODEL)
  policy = common.Policy.of(cfg, model_cfg)
  assert policy.quantize_base and policy.base_quant == quant.Spec("nf4", GROUP, double_quant=True)
  dense = _dense()
  frozen = {"base": jax.jit(policy.base_quant.quantize)(dense)}
  assert isinstance(frozen["base"]["layers"]["mlp"]["up"].scales, quant.DoubleQuantized)
  adapters = lora.init_adapters(dense, rank=4, rng=jax.random.PRNGKey(1))  # B = 0
  tokens = jax.random.randint(jax.random.PRNGKey(2), (2, 9), 0, MODEL["vocab_size"])
  got = _forward(policy.params(adapters, frozen), tokens)
  np.testing.assert_allclose(got, _forward(_expected_base(dense), tokens), rtol=1e-5, atol=1e-5)
  assert np.abs(_forward(dense, tokens) - got).max() > 1e-3  # the quantization is there to see


def test_a_train_step_moves_only_the_adapters():
  """One jitted train step of SFT over a random NF4 base (no init_from): the trained tree
  and its optimizer state are the adapters alone; the base's codes and scales come back bit
  for bit; B moves, and A (whose gradient is 0 while B = 0, with no weight decay) does not."""
  cfg = _cfg()
  model_cfg, mesh = model_and_mesh(cfg, jax.devices()[:1])
  prog = build_program(cfg, model_cfg, mesh)
  policy = common.Policy.of(cfg, model_cfg)
  frozen = policy.load_frozen(prog.shardings.frozen)
  assert quant.is_quantized(frozen["base"]["layers"]["attn"]["q"])
  state = prog.init_state(cfg.seed, frozen)
  names = {str(p[-1].key) for p, _ in jax.tree_util.tree_leaves_with_path(state.params)}
  assert names == {"a", "b"}
  adapter_size = sum(x.size for x in jax.tree.leaves(state.params))
  opt_size = sum(x.size for x in jax.tree.leaves(state.opt_state))
  assert adapter_size < opt_size <= 2 * adapter_size + 8  # Adam's two moments and counters
  before = jax.tree.map(np.array, (state.params, state.frozen))
  rng = np.random.default_rng(0)
  b, t = cfg.train.batch_size, cfg.data.seq_len
  ids = rng.integers(0, MODEL["vocab_size"], (b, t + 1)).astype(np.int32)
  batch = {"inputs": ids[:, :-1], "targets": ids[:, 1:],
           "positions": np.asarray(_positions(b, t)), "segment_ids": np.ones((b, t), np.int32),
           "loss_mask": np.ones((b, t), np.float32)}
  state, metrics = prog.train_step(state, batch)
  assert np.isfinite(float(metrics["loss"]))
  jax.tree.map(np.testing.assert_array_equal, before[1], jax.tree.map(np.asarray, state.frozen))
  for (path, old), new in zip(jax.tree_util.tree_leaves_with_path(before[0]),
                              jax.tree.leaves(state.params)):
    assert np.any(old != np.asarray(new)) == (path[-1].key == "b"), path


def test_quantized_on_load_from_a_dense_run(tmp_path):
  """init_from a dense run with lora.base_quant=nf4: the base loads quantized, its codes
  those of the numpy round trip; int8 too (its own kind)."""
  dense = _dense(seed=3)
  path = str(tmp_path / "dense")
  os.makedirs(path)
  with open(os.path.join(path, "config.json"), "w") as f:
    f.write(_cfg().to_json())
  ckpt = Checkpointer(path, keep=1, async_save=False)
  ckpt.save_params(0, dense)
  ckpt.close()
  cfg = _cfg()
  cfg.train.init_from = path
  model_cfg, mesh = model_and_mesh(cfg, jax.devices()[:1])
  prog = build_program(cfg, model_cfg, mesh)
  frozen = common.Policy.of(cfg, model_cfg).load_frozen(prog.shardings.frozen)
  got = quant.dequantize_params(frozen["base"])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), got,
               _expected_base(dense))

  cfg.lora.base_quant = "int8"
  frozen = common.Policy.of(cfg, model_cfg).load_frozen(
      build_program(cfg, model_cfg, mesh).shardings.frozen)
  q = frozen["base"]["layers"]["mlp"]["down"]
  assert q.kind == "int8" and q.group == GROUP and q.values.dtype == jnp.int8


def _quantized_run(tmp_path, spec: dict):
  """A run directory as far as Policy.of reads it: its config.json's "quant" entry."""
  path = tmp_path / "quantized"
  path.mkdir()
  (path / "config.json").write_text(json.dumps({"model": MODEL, "quant": spec}))
  return str(path)


def test_bad_configs_are_named(tmp_path):
  model_cfg = ModelConfig(**MODEL)
  of = lambda **lora: common.Policy.of(_cfg(**lora), model_cfg)
  with pytest.raises(ConfigError, match=r"lora.base_quant='nf4' .*set lora.rank > 0"):
    of(rank=0)
  with pytest.raises(ConfigError, match=r"lora.base_quant='fp4' is not one of"):
    of(base_quant="fp4")
  with pytest.raises(ConfigError, match=r"lora.base_quant_group=-1"):
    of(base_quant_group=-1)
  policy = of(base_quant_group=24)
  with pytest.raises(ConfigError, match=r"lora.base_quant_group: .*group 24 does not divide"):
    jax.eval_shape(policy.init_frozen, jax.random.PRNGKey(0))
  # An init_from already quantized: its layout, or an error naming both.
  cfg = _cfg(base_quant="int4", base_quant_group=32)
  cfg.train.init_from = _quantized_run(tmp_path, {"kind": "int4", "group": 32, "method": "gptq"})
  policy = common.Policy.of(cfg, model_cfg)
  assert not policy.quantize_base and policy.base_quant.method == "gptq"
  cfg.lora.base_quant = "nf4"
  with pytest.raises(ConfigError, match=r"lora.base_quant='nf4' .*another layout than "
                     r"train.init_from=.*int4, group 32"):
    common.Policy.of(cfg, model_cfg)
  cfg.lora.base_quant = ""
  assert common.Policy.of(cfg, model_cfg).base_quant.kind == "int4"  # as stored


def test_pretrain_refuses_lora():
  cfg = _cfg()
  cfg.task = "pretrain"
  with pytest.raises(ConfigError, match=r"lora.rank=4 adapts a model in post-training"):
    model_and_mesh(cfg, jax.devices()[:1])


def test_a_qlora_sft_run_exports_the_dequantized_base_plus_adapters(tmp_path, monkeypatch):
  """The arithmetic SFT rung with lora.base_quant=nf4 (default group) from a dense run,
  through the loop: the checkpoint is a dense model, the base NF4-round-tripped (numpy) where
  no adapter is, plus the adapters' products where one is; the embedding as it was."""
  from tests.test_ladder import run
  monkeypatch.chdir(tmp_path)  # the arithmetic example writes runs/arith_data here
  ladder = dict(vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128,
                max_seq_len=128)
  dense = _dense(seed=4, model=ladder)
  os.makedirs("runs/dense")
  cfg = base_config.get_config()
  cfg.model.update(**ladder)
  with open("runs/dense/config.json", "w") as f:
    f.write(cfg.to_json())
  ckpt = Checkpointer("runs/dense", keep=1, async_save=False)
  ckpt.save_params(0, dense)
  ckpt.close()
  last, _ = run("sft", 2, **{"lora.rank": "4", "lora.targets": "q,v,down",
                             "lora.base_quant": "nf4", "train.init_from": "runs/dense",
                             "workdir": "runs/qlora", "train.lr": "1e-2"})
  assert np.isfinite(last["loss"]) and 0.0 <= last["val_score"] <= 1.0
  assert run_dir.load_quant("runs/qlora") is None
  merged, want = run_dir.load_params("runs/qlora"), _expected_base(dense, group=64)
  assert jax.tree.structure(merged) == jax.tree.structure(want)
  np.testing.assert_array_equal(merged["embedding"], dense["embedding"])
  for module, name in (("attn", "k"), ("attn", "o"), ("mlp", "gate"), ("mlp", "up")):
    np.testing.assert_allclose(merged["layers"][module][name], want["layers"][module][name],
                               rtol=1e-6, atol=1e-7)
  for module, name in (("attn", "q"), ("attn", "v"), ("mlp", "down")):
    assert np.any(np.asarray(merged["layers"][module][name]) != want["layers"][module][name])


def test_the_dry_run_counts_the_quantized_base():
  """The dry run's frozen base (XLA:CPU, simulated devices): NF4 codes at half a byte, an int8
  scale per group, an f32 absmax per 256 scales and an offset per layer (closed form), and
  the rest of the base in f32."""
  from train.dry_run import plan
  cfg = _cfg()
  cfg.mesh.data, cfg.train.batch_size = -1, 8
  report, _ = plan(cfg)
  mats = [(32, 32), (32, 16), (32, 16), (32, 32), (32, 64), (32, 64), (64, 32)]  # q k v o g u d
  layers = MODEL["n_layers"]
  nbytes = layers * sum(k * n / 2 + k * n / GROUP + 4 * math.ceil(k * n / GROUP / 256) + 4
                        for k, n in mats)
  q = report["frozen_quantized"]
  assert q["kind"] == "nf4" and q["params"] == layers * sum(k * n for k, n in mats)
  assert q["bytes"] == nbytes
  rest = report["frozen_params"] - q["params"]  # embedding and norms, f32, replicated
  assert rest == MODEL["vocab_size"] * 32 + layers * 2 * 32 + 32
  assert report["frozen_bytes_per_device"] == nbytes + 4 * rest
  assert report["params"] == 4 * sum(layers * (k + n) for k, n in mats)  # rank-4 A and B
