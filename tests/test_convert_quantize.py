"""train/convert.py --quantize: a quantized run directory, written by RTN, GPTQ or AWQ, loads
everywhere a run directory does (infer/workdir.py, generate, eval, LoRA's init_from), and the
calibrated methods beat round-to-nearest on held-out text of a briefly trained model."""

import glob
import json
import os
import shutil
import sysconfig

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import base
from infer import workdir as run_dir
from model import ModelConfig, Transformer, calibrate, quant
from model.transformer import forward
from train import convert
from train.checkpoint import Checkpointer
from train.tokenizer import EOS, train_tokenizer

MODEL = dict(vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128,
             max_seq_len=128)
SEQ = 64


def _positions(tokens):
  return jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)


def _train(cfg: ModelConfig, ids: np.ndarray, steps: int, seed: int = 0):
  """A few hundred Adam steps of next-token prediction on windows of ids: a model whose
  activations have the structure a trained one has (what AWQ and GPTQ exploit)."""
  tok = jnp.zeros((1, 1), jnp.int32)
  params = nn.unbox(Transformer(cfg).init(jax.random.PRNGKey(seed), tok, tok)["params"])
  tx = optax.adam(optax.warmup_cosine_decay_schedule(0.0, 1e-2, 20, steps, 1e-3))
  opt = tx.init(params)

  def loss(p, x):
    logits = forward(cfg, p, x[:, :-1], _positions(x[:, :-1]))[0]
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), x[:, 1:, None], -1))

  @jax.jit
  def step(p, o, x):
    g = jax.grad(loss)(p, x)
    u, o = tx.update(g, o, p)
    return optax.apply_updates(p, u), o

  rng = np.random.default_rng(seed)
  for _ in range(steps):
    starts = rng.integers(0, len(ids) - SEQ - 1, 16)
    params, opt = step(params, opt, jnp.asarray(np.stack([ids[s:s + SEQ + 1] for s in starts])))
  return params


def _same(a, b):
  """Codes exactly; float statistics to an ulp or so (a sharded mean sums in another order)."""
  a, b = np.asarray(a), np.asarray(b)
  if np.issubdtype(a.dtype, np.floating):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=0)
  else:
    np.testing.assert_array_equal(a, b)


def _write_run(path, cfg_fields: dict, params, tokenizer):
  cfg = base.get_config()
  cfg.model.update(**cfg_fields)
  cfg.data.seq_len = SEQ
  cfg.train.batch_size = 8
  os.makedirs(path)
  with open(os.path.join(path, "config.json"), "w") as f:
    f.write(cfg.to_json())
  tokenizer.save(os.path.join(path, "tokenizer.json"))
  ckpt = Checkpointer(str(path), keep=1, async_save=False)
  ckpt.save_params(0, params)
  ckpt.close()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """(run directory, cfg, params, train glob, held-out glob, tokenizer): a tiny Llama trained
  briefly on standard-library modules, with other modules held out."""
  root = tmp_path_factory.mktemp("quantize")
  stdlib = sysconfig.get_paths()["stdlib"]
  files = sorted(glob.glob(os.path.join(stdlib, "json", "*.py"))
                 + glob.glob(os.path.join(stdlib, "email", "*.py")))[:24]
  for split, chosen in (("train", files[::2]), ("val", files[1::2])):
    os.makedirs(root / split)
    for f in chosen:
      shutil.copy(f, root / split / os.path.basename(f))
  texts = [open(f, encoding="utf-8").read() for f in sorted(glob.glob(str(root / "train/*.py")))]
  tokenizer = train_tokenizer(texts, MODEL["vocab_size"])
  eos = tokenizer.token_to_id(EOS)
  ids = np.concatenate([[eos] + tokenizer.encode(t).ids for t in texts]).astype(np.int32)
  cfg = ModelConfig(**MODEL)
  params = _train(cfg, ids, steps=300)
  path = str(root / "run")
  _write_run(path, MODEL, params, tokenizer)
  return path, cfg, params, str(root / "train/*.py"), str(root / "val/*.py"), tokenizer


def _convert(src, dst, kind="int4", group=32, method="rtn", **flags):
  args = ["--src", f"orbax:{src}", "--dst", f"orbax:{dst}", "--quantize", kind,
          "--group", str(group), "--method", method]
  for k, v in flags.items():
    args += [f"--{k}", str(v)]
  assert convert.main(args) == 0
  return dst


@pytest.fixture(scope="module")
def quantized(trained, tmp_path_factory):
  """method -> a run directory quantized int4, groups of 32, by that method."""
  path, _, _, train_glob, _, _ = trained
  root = tmp_path_factory.mktemp("quantized")
  calib = dict(calib=train_glob, calib_tokens=4096, calib_len=SEQ)
  return {m: _convert(path, str(root / m), method=m, **(calib if m != "rtn" else {}))
          for m in quant.METHODS}


def test_rtn_run_loads_as_the_quantized_source(trained, quantized):
  path, cfg, params, *_ = trained
  with open(os.path.join(quantized["rtn"], "config.json")) as f:
    assert json.load(f)["quant"] == {"kind": "int4", "group": 32, "symmetric": True,
                                     "double_quant": False, "method": "rtn"}
  loaded = run_dir.load_params(quantized["rtn"])
  want = quant.quantize_params(params, "int4", 32)
  assert jax.tree.structure(loaded) == jax.tree.structure(want)
  jax.tree.map(_same, loaded, want)
  assert quant.is_quantized(loaded["layers"]["attn"]["o"])
  assert not quant.is_quantized(loaded["embedding"])


@pytest.mark.parametrize("method", quant.METHODS)
def test_quantized_run_computes_with_its_dequantized_weights(trained, quantized, method):
  _, cfg, params, *_ = trained
  loaded = run_dir.load_params(quantized[method])
  dense = quant.dequantize_params(loaded)
  dense_loaded = run_dir.load_params(quantized[method], dense=True)  # init_from's reading
  jax.tree.map(np.testing.assert_array_equal, dense_loaded, dense)
  x = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 16)), jnp.int32)
  got = forward(cfg, loaded, x, _positions(x))[0]
  np.testing.assert_allclose(got, forward(cfg, dense, x, _positions(x))[0], atol=1e-5)
  # Quantized, so not the source (but close to it).
  source = forward(cfg, params, x, _positions(x))[0]
  assert 0 < float(jnp.max(jnp.abs(got - source))) < 0.5 * float(jnp.max(jnp.abs(source)))


def test_quality_on_held_out_text(trained, quantized):
  """int4, groups of 32, on a briefly trained model: GPTQ's held-out loss is below
  round-to-nearest's. AWQ's first block is closer to the dense one than RTN's on the
  calibration activations; end to end, at this scale (no outlier channels for its scales to
  protect), its held-out loss is RTN's within RTN's own distance from the dense model."""
  from model import layers
  from model.transformer import embed
  from train.eval import evaluate
  path, cfg, params, train_glob, val_glob, tokenizer = trained
  loss = {name: evaluate(p, data=val_glob, seq_len=SEQ, batch_size=8, max_batches=8)["loss"]
          for name, p in {"dense": path, **quantized}.items()}
  assert loss["dense"] < loss["rtn"] and loss["gptq"] < loss["rtn"]
  assert loss["awq"] - loss["rtn"] <= loss["rtn"] - loss["dense"], loss

  model = convert.Pretrained(cfg, params, tokenizer, {})
  tokens = convert.calibration_tokens(model, sorted(glob.glob(train_glob)), 4096, SEQ)
  assert tokens.shape == (64, SEQ)
  x0 = embed(cfg, params, tokens)
  rope = layers.rope_tables(_positions(tokens), cfg)["global"]
  first = lambda tree: jax.tree.map(lambda a: a[0], tree["layers"])  # Quantized too
  out = lambda tree: layers.block(cfg, first(tree), x0, rope, None, None, None, local=False)[0]
  dense = out(params)
  err = {m: float(jnp.mean(jnp.square(out(run_dir.load_params(quantized[m])) - dense)))
         for m in quant.METHODS}
  assert err["gptq"] < err["rtn"] and err["awq"] < err["rtn"], err


def test_generate_cli_on_a_quantized_run(trained, quantized, capsys):
  from infer.decode import generate
  from infer.generate import main
  from infer.sampling import SamplingParams
  _, cfg, _, _, _, tokenizer = trained
  assert main(["--checkpoint", quantized["gptq"], "--prompt", "def loads(s):", "--json",
               "--temperature", "0", "--max_new_tokens", "8"]) == 0
  line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  eos = tokenizer.token_to_id(EOS)
  dense = quant.dequantize_params(run_dir.load_params(quantized["gptq"]))
  want = generate(cfg, dense, [[eos] + tokenizer.encode("def loads(s):").ids], max_new_tokens=8,
                  sampling=SamplingParams(temperature=0), eos_ids=(eos,))[0]
  assert line["token_ids"] == want


def test_eval_cli_on_a_quantized_run(trained, quantized, capsys):
  from train.eval import main
  val_glob = trained[4]
  assert main(["--checkpoint", quantized["awq"], "--data", val_glob, "--max_batches", "2",
               "--seq_len", str(SEQ)]) == 0
  out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert out["batches"] == 2 and np.isfinite(out["loss"])


def test_engine_and_decode_bench_on_a_quantized_run(trained, quantized):
  """The paged engine serves the run as infer/loaders.py loads it (the benchmarks' and the
  server's reading), with the tokens of its dequantized weights; bench/decode.py runs on it
  and counts its parameters as the dense model's."""
  import subprocess
  import sys
  from infer import decode, loaders
  from infer.engine import Engine, EngineConfig
  from infer.sampling import SamplingParams
  _, cfg, params, *_ = trained
  m = loaders.load_checkpoint(quantized["awq"])
  assert quant.is_quantized(m.params["layers"]["mlp"]["down"])
  prompts = [m.encode("import json\n"), m.encode("def f(x):")]
  greedy = SamplingParams(temperature=0)
  want = decode.generate(cfg, quant.dequantize_params(m.params), prompts, max_new_tokens=6,
                         sampling=greedy)
  engine = Engine(cfg, m.params, EngineConfig(num_pages=32, page_size=8, max_batch=2,
                                              prefill_chunk=16, prefill_rows=1))
  ids = [engine.add_request(p, max_new_tokens=6, sampling=greedy) for p in prompts]
  done = {}
  while engine.has_work():
    for rid, tokens in engine.step():
      done.setdefault(rid, []).extend(tokens)
  assert [done[i] for i in ids] == want
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  res = subprocess.run([sys.executable, "bench/decode.py", "--checkpoint", quantized["gptq"],
                        "--batch", "2", "--prompt_len", "16", "--new_tokens", "4",
                        "--repeats", "1"], cwd=root, capture_output=True, text=True,
                       timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=""))
  assert res.returncode == 0, res.stderr[-2000:]
  out = json.loads(res.stdout[res.stdout.index("{"):])
  assert out["params_m"] == pytest.approx(sum(x.size for x in jax.tree.leaves(params)) / 1e6)


def test_dense_conversion_records_no_quantization(trained, tmp_path):
  path = trained[0]
  convert.convert(f"orbax:{path}", f"orbax:{tmp_path / 'dense'}")
  with open(tmp_path / "dense" / "config.json") as f:
    assert "quant" not in json.load(f)
  assert run_dir.load_quant(str(tmp_path / "dense")) is None
  # A quantized source reads dequantized: converting it back gives its dequantized weights.


def test_nf4_double_quant_and_asymmetric_int4(trained, tmp_path):
  path, cfg, params, *_ = trained
  for kind, flags in (("nf4", {"double_quant": "true"}), ("int4", {"symmetric": "false"})):
    dst = _convert(path, str(tmp_path / kind), kind=kind, group=64, **flags)
    loaded = run_dir.load_params(dst)
    want = quant.quantize_params(params, kind, 64, symmetric=flags.get("symmetric") != "false",
                                 double_quant="double_quant" in flags)
    jax.tree.map(_same, loaded, want)


def test_a_quantized_source_reads_dequantized(trained, quantized, tmp_path):
  back = convert.convert(f"orbax:{quantized['rtn']}", f"orbax:{tmp_path / 'back'}")
  jax.tree.map(np.testing.assert_array_equal, run_dir.load_params(back),
               quant.dequantize_params(run_dir.load_params(quantized["rtn"])))


def test_lora_on_a_quantized_base(quantized, tmp_path, monkeypatch):
  """train.init_from a quantized run with LoRA: the frozen base loads quantized (QLoRA), the
  adapters train, and the run exports a dense merged model: the base's dequantized weights,
  plus the adapters' products on their targets."""
  from train.tasks import common
  from tests.test_ladder import run
  monkeypatch.chdir(tmp_path)  # the arithmetic example writes runs/arith_data here
  loaded = []
  load_frozen = common.Policy.load_frozen
  monkeypatch.setattr(common.Policy, "load_frozen", lambda self, *a, **k: loaded.append(
      load_frozen(self, *a, **k)) or loaded[-1])
  last, _ = run("sft", 2, **{"lora.rank": "4", "lora.targets": "q,v,down",
                             "train.init_from": quantized["rtn"], "workdir": "runs/qlora",
                             "train.lr": "1e-2"})
  assert np.isfinite(last["loss"])
  assert quant.is_quantized(loaded[0]["base"]["layers"]["attn"]["k"])
  base = quant.dequantize_params(run_dir.load_params(quantized["rtn"]))
  merged = run_dir.load_params("runs/qlora")
  assert run_dir.load_quant("runs/qlora") is None
  assert jax.tree.structure(merged) == jax.tree.structure(base)
  changed = jax.tree.map(lambda a, b: bool(np.any(a != b)), merged, base)
  assert changed["layers"]["attn"]["q"] and changed["layers"]["mlp"]["down"]
  assert not changed["layers"]["attn"]["k"] and not changed["embedding"]


# ----------------------------------------------------------------------- the driver, directly

def _random(seed=0, **fields):
  cfg = ModelConfig(**{**MODEL, "vocab_size": 96, "init_std": 0.2, **fields})
  tok = jnp.zeros((1, 1), jnp.int32)
  return cfg, nn.unbox(Transformer(cfg).init(jax.random.PRNGKey(seed), tok, tok)["params"])


FAMILIES = [dict(), dict(n_kv_heads=4, qkv_bias=True, scan_layers=False),
            dict(qk_norm=True, norm_plus_one=True, post_norms=True, n_kv_heads=4),
            dict(n_experts=4, n_experts_per_token=2)]


@pytest.mark.parametrize("fields", FAMILIES)
def test_awq_folds_are_exact(fields, monkeypatch):
  """With rounding and clipping taken out, AWQ's scaled weights and folded norms compute the same model:
  q/k/v and gate/up scales through the norms ((1 + w) ones too), o's through v (and its bias)
  when heads are not grouped, down's through up; an MoE's shared gate/up scale through the
  norm and the router, each expert's down scale through its up."""
  cfg, params = _random(**fields)
  monkeypatch.setattr(calibrate, "_rtn", lambda spec, w, name, dtype=None: w)
  monkeypatch.setattr(calibrate.ptq, "awq_clip", lambda w, x, *args, **kwargs: w)
  tokens = jax.random.randint(jax.random.PRNGKey(1), (4, 32), 0, cfg.vocab_size)
  folded = calibrate.quantize_model(cfg, params, tokens, quant.Spec("int4", 32, method="awq"))
  layer = folded["layers"] if cfg.scan_layers else folded["layers_0"]
  original = params["layers"] if cfg.scan_layers else params["layers_0"]
  assert not np.allclose(layer["attn_norm"]["scale"], original["attn_norm"]["scale"])
  assert not np.allclose(layer["mlp_norm"]["scale"], original["mlp_norm"]["scale"])
  x = _positions(tokens)
  np.testing.assert_allclose(forward(cfg, folded, tokens, x)[0], forward(cfg, params, tokens, x)[0],
                             rtol=1e-4, atol=1e-4)


def test_gptq_is_sequential():
  """Block 1 is calibrated on what block 0, quantized, makes of the tokens (not on the
  unquantized block's output): its k is ptq.gptq's on the attention norm of that output."""
  from model import layers, ptq
  from model.transformer import embed
  cfg, params = _random()
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 32), 0, cfg.vocab_size)
  q = calibrate.quantize_model(cfg, params, tokens, quant.Spec("int8", 0, method="gptq"))
  layer = lambda tree, i: jax.tree.map(lambda a: a[i], tree["layers"])  # Quantized too
  rope = layers.rope_tables(_positions(tokens), cfg)["global"]
  x0 = embed(cfg, params, tokens)
  w1 = layer(params, 1)

  def k_codes(block0):
    x1 = layers.block(cfg, block0, x0, rope, None, None, None, local=False)[0]
    h = layers.rms_norm(x1, w1["attn_norm"]["scale"], cfg)
    return np.asarray(ptq.gptq(w1["attn"]["k"], h, "int8", 0, act_order=True).values)

  got = np.asarray(layer(q, 1)["attn"]["k"].values)
  # The same codes (a jitted and an eager norm may differ in a last bit, moving a rare code).
  assert np.mean(got == k_codes(layer(q, 0))) > 0.99
  assert np.mean(got != k_codes(layer(params, 0))) > 0.01


# -------------------------------------------------------------------------------- bad inputs

@pytest.mark.parametrize("argv,message", [
    (["--quantize", "int3"], "argument --quantize: invalid choice"),
    (["--quantize", "int4", "--method", "hqq"], "argument --method: invalid choice"),
])
def test_unknown_kind_or_method_is_a_usage_error(trained, tmp_path, capsys, argv, message):
  with pytest.raises(SystemExit):
    convert.main(["--src", f"orbax:{trained[0]}", "--dst", f"orbax:{tmp_path / 'q'}", *argv])
  assert message in capsys.readouterr().err
  assert not os.path.exists(tmp_path / "q")


@pytest.mark.parametrize("argv,message", [
    (["--quantize", "int4", "--group", "48"],
     r"--group=48: quantization group 48 does not divide the input size 64 of "
     r"layers/attn/[qkv] \(shape \(2, 64, "),
    (["--quantize", "int4", "--method", "gptq", "--calib", "/nonexistent/*.txt"],
     r"--calib: the glob '/nonexistent/\*\.txt' matches no files"),
    (["--method", "gptq"], r"--method set without --quantize"),
    (["--quantize", "int8", "--symmetric", "false"], r"--symmetric=false: zero points are int4"),
    (["--quantize", "int4", "--calib_tokens", "100"], r"--calib.*are for --method gptq\|awq"),
])
def test_bad_flags_are_errors_that_write_nothing(trained, tmp_path, capsys, argv, message):
  import re
  dst = tmp_path / "q"
  assert convert.main(["--src", f"orbax:{trained[0]}", "--dst", f"orbax:{dst}", *argv]) == 1
  err = capsys.readouterr().err
  assert re.search(message, err), err
  assert not os.path.exists(dst) and os.listdir(tmp_path) == []


def test_calibration_needs_a_tokenizer(trained, tmp_path, capsys):
  src = tmp_path / "src"
  shutil.copytree(trained[0], src)
  os.remove(src / "tokenizer.json")
  assert convert.main(["--src", f"orbax:{src}", "--dst", f"orbax:{tmp_path / 'q'}",
                       "--quantize", "int4", "--group", "32", "--method", "awq"]) == 1
  assert "--method=awq calibrates on text tokenized with the model's tokenizer" in (
      capsys.readouterr().err)
  assert not os.path.exists(tmp_path / "q")


def test_quantize_writes_only_orbax(trained, tmp_path):
  with pytest.raises(ValueError, match="--quantize writes orbax run directories, not hf"):
    convert.convert(f"orbax:{trained[0]}", f"hf:{tmp_path / 'q'}",
                    quantize=convert.Quantize(quant.Spec("int8")))
  assert not os.path.exists(tmp_path / "q")
