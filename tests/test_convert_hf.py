"""infer/hf.py and train/convert.py: HF safetensors and orbax run directories.

The independent references: transformers' LlamaForCausalLM (CPU torch) in both directions,
exact round trips, and restores onto several meshes of the 8 simulated CPU devices.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from infer import workdir
from infer.files import ConversionError, parse_size
from infer.hf import hf_shapes, hf_tensors, load_hf, save_hf
from model import ModelConfig, Transformer, sharding
from train.convert import Pretrained, convert, write


def small_cfg(**kw):
  base = dict(vocab_size=96, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128,
              max_seq_len=64, rope_theta=500.0, norm_eps=1e-6)
  return ModelConfig(**dict(base, **kw))


def random_params(cfg, seed=0, mesh=None):
  abstract, shardings = workdir.abstract_params(cfg, mesh)
  rng = np.random.default_rng(seed)
  flat, out = traverse_util.flatten_dict(abstract), {}
  flat_shardings = traverse_util.flatten_dict(shardings)
  for path, a in flat.items():
    x = rng.standard_normal(a.shape).astype(np.float32) * 0.2
    out[path] = jax.device_put(1 + x if path[-1] == "scale" else x, flat_shardings[path])
  return traverse_util.unflatten_dict(out)


def small_tokenizer():
  from tokenizers import Tokenizer, models, pre_tokenizers
  tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(96)}, unk_token="w0"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  return tok


TOKENIZER_CONFIG = {"eos_token": "w2", "bos_token": "w1", "chat_template": "{{ messages }}"}


def small_model(cfg, seed=0, mesh=None):
  return Pretrained(cfg, random_params(cfg, seed, mesh), small_tokenizer(), TOKENIZER_CONFIG)


def flat_np(params):
  return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(params).items()}


def assert_same_params(a, b):
  fa, fb = flat_np(a), flat_np(b)
  assert fa.keys() == fb.keys()
  for k in fa:
    np.testing.assert_array_equal(fa[k], fb[k], err_msg="/".join(k))


def our_logits(cfg, params, tokens):
  positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
  forward = jax.jit(lambda p, t, pos: Transformer(cfg).apply({"params": p}, t, pos)[0])
  return np.asarray(forward(params, jnp.asarray(tokens), positions))


# ---- round trips ---------------------------------------------------------------------------

@pytest.mark.parametrize("tie, scan", [(False, True), (True, True), (False, False)])
def test_orbax_hf_orbax_round_trip_is_exact(tmp_path, tie, scan):
  cfg = small_cfg(tie_embeddings=tie, scan_layers=scan)
  model = small_model(cfg)
  write(model, f"orbax:{tmp_path / 'a'}")
  convert(f"orbax:{tmp_path / 'a'}", f"hf:{tmp_path / 'hf'}", max_shard_size="20KB")
  convert(f"hf:{tmp_path / 'hf'}", f"orbax:{tmp_path / 'b'}", scan_layers=scan)

  back_cfg = workdir.load_model_config(str(tmp_path / "b"))
  assert back_cfg == cfg
  assert_same_params(workdir.load_params(str(tmp_path / "b"), back_cfg), model.params)
  assert (workdir.load_tokenizer(str(tmp_path / "b")).to_str() == model.tokenizer.to_str())
  with open(tmp_path / "b" / "tokenizer_config.json") as f:
    assert json.load(f) == TOKENIZER_CONFIG
  run = workdir.load_run_config(str(tmp_path / "b"))
  assert {"train", "data", "mesh", "checkpoint"} <= set(run)  # a full run config

  # Shards: several files, each at most 20 KB of tensors unless one tensor is bigger.
  with open(tmp_path / "hf" / "model.safetensors.index.json") as f:
    index = json.load(f)
  files = sorted(set(index["weight_map"].values()))
  assert len(files) > 3 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
  from safetensors import safe_open
  for file in files:
    with safe_open(str(tmp_path / "hf" / file), "numpy") as f:
      sizes = [f.get_tensor(k).nbytes for k in f.keys()]
    assert sum(sizes) <= 20_000 or len(sizes) == 1
  assert index["metadata"]["total_size"] == sum(
      np.asarray(v).nbytes for v in jax.tree.leaves(model.params))


def test_scan_and_unrolled_layouts_convert_into_each_other(tmp_path):
  cfg = small_cfg()
  model = small_model(cfg)
  write(model, f"orbax:{tmp_path / 'a'}")
  convert(f"orbax:{tmp_path / 'a'}", f"orbax:{tmp_path / 'b'}", scan_layers=False)
  cfg_b = workdir.load_model_config(str(tmp_path / "b"))
  params_b = workdir.load_params(str(tmp_path / "b"), cfg_b)
  assert not cfg_b.scan_layers and "layers_1" in params_b
  np.testing.assert_array_equal(np.asarray(params_b["layers_1"]["attn"]["o"]),
                                np.asarray(model.params["layers"]["attn"]["o"][1]))
  tokens = np.arange(10)[None] % 96
  np.testing.assert_allclose(our_logits(cfg_b, params_b, tokens),
                             our_logits(cfg, model.params, tokens), atol=1e-5)


def test_bfloat16_export(tmp_path):
  from safetensors import safe_open
  cfg = small_cfg()
  model = small_model(cfg)
  write(model, f"orbax:{tmp_path / 'a'}")
  convert(f"orbax:{tmp_path / 'a'}", f"hf:{tmp_path / 'hf'}", dtype="bfloat16")
  with safe_open(str(tmp_path / "hf" / "model.safetensors"), "numpy") as f:
    assert f.get_slice("model.layers.0.mlp.up_proj.weight").get_dtype() == "BF16"
  with open(tmp_path / "hf" / "config.json") as f:
    assert json.load(f)["torch_dtype"] == "bfloat16"
  cfg2, params2, _, _ = load_hf(str(tmp_path / "hf"))
  for (name, a), (_, b) in zip(hf_tensors(cfg, model.params), hf_tensors(cfg2, params2)):
    np.testing.assert_allclose(b, a, rtol=1e-2, atol=1e-6, err_msg=name)


def test_parse_size():
  assert parse_size("2GB") == 2_000_000_000 and parse_size("500MB") == 500_000_000
  assert parse_size("10KiB") == 10240 and parse_size("1234") == 1234 and parse_size(7) == 7
  with pytest.raises(ValueError, match="cannot read a size"):
    parse_size("big")


# ---- meshes --------------------------------------------------------------------------------

MESHES = [(8, 1, 1), (2, 2, 2), (1, 2, 4)]


def test_restore_converted_workdir_onto_other_meshes(tmp_path):
  cfg = small_cfg()
  model = small_model(cfg, mesh=sharding.make_mesh(1, 8, 1))  # saved fsdp-sharded 8 ways
  write(model, f"orbax:{tmp_path / 'a'}")
  for shape in MESHES:
    mesh = sharding.make_mesh(*shape)
    params = workdir.load_params(str(tmp_path / "a"), cfg, mesh)
    assert_same_params(params, model.params)
    _, want = workdir.abstract_params(cfg, mesh)
    for got, spec in zip(jax.tree.leaves(params), jax.tree.leaves(want)):
      assert got.sharding.is_equivalent_to(spec, got.ndim)
  q = params["layers"]["attn"]["q"]  # the (1, 2, 4) mesh: embed over fsdp, heads over tensor
  assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")


def test_sharded_export_is_tensor_by_tensor(tmp_path, monkeypatch):
  cfg = small_cfg()
  mesh = sharding.make_mesh(1, 2, 4)
  model = small_model(cfg, mesh=mesh)
  fetched = []
  device_get = jax.device_get
  monkeypatch.setattr(jax, "device_get", lambda x: fetched.append(x.shape) or device_get(x))
  save_hf(str(tmp_path / "hf"), cfg, model.params, max_shard_size="30KB")
  monkeypatch.undo()
  largest = max(int(np.prod(s)) for s in fetched)
  # The biggest single HF tensor (one layer's MLP matrix), never a stacked [L, ...] array.
  assert largest == max(int(np.prod(s)) for s in hf_shapes(cfg).values())
  assert all(len(s) <= 3 for s in fetched) and len(fetched) == 2 + 9 * cfg.n_layers

  # Import builds each parameter straight into the target mesh's shardings.
  mesh2 = sharding.make_mesh(2, 2, 2)
  cfg2, params, _, _ = load_hf(str(tmp_path / "hf"), mesh2)
  assert_same_params(params, model.params)
  _, want = workdir.abstract_params(cfg2, mesh2)
  for got, spec in zip(jax.tree.leaves(params), jax.tree.leaves(want)):
    assert got.sharding == spec


# ---- transformers ---------------------------------------------------------------------------

VARIANTS = {
    "untied_gqa": dict(tie_embeddings=False),
    "tied": dict(tie_embeddings=True, n_kv_heads=4),
    "llama3_rope": dict(tie_embeddings=False, n_kv_heads=1, rope_scaling_factor=4.0,
                        rope_original_max_len=32, rope_theta=10000.0, head_dim=32),
    "linear_rope": dict(tie_embeddings=False, rope_scaling_type="linear",
                        rope_scaling_factor=4.0),
}


@pytest.fixture(scope="module")
def torch_llama():
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  torch.set_num_threads(1)
  return torch, transformers


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_export_loads_in_transformers_with_same_logits(tmp_path, torch_llama, variant):
  torch, transformers = torch_llama
  cfg = small_cfg(**VARIANTS[variant])
  params = random_params(cfg, seed=1)
  save_hf(str(tmp_path / "hf"), cfg, params)
  hf = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32,
                                                     attn_implementation="eager").eval()
  tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 24))
  with torch.no_grad():
    want = hf(torch.as_tensor(tokens)).logits.numpy()
  np.testing.assert_allclose(our_logits(cfg, params, tokens), want, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_transformers_checkpoint_imports_with_same_logits(tmp_path, torch_llama, variant):
  torch, transformers = torch_llama
  ours = small_cfg(**VARIANTS[variant])
  rope = None
  if ours.rope_scaling_type == "linear":
    rope = {"rope_type": "linear", "factor": ours.rope_scaling_factor}
  elif ours.rope_scaling_factor:
    rope = {"rope_type": "llama3", "factor": ours.rope_scaling_factor, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
  config = transformers.LlamaConfig(
      vocab_size=ours.vocab_size, hidden_size=ours.d_model, intermediate_size=ours.d_ff,
      num_hidden_layers=ours.n_layers, num_attention_heads=ours.n_heads,
      num_key_value_heads=ours.n_kv_heads, head_dim=ours.head_dim,
      max_position_embeddings=ours.max_seq_len, rms_norm_eps=ours.norm_eps,
      rope_theta=ours.rope_theta, rope_scaling=rope, tie_word_embeddings=ours.tie_embeddings)
  torch.manual_seed(0)
  hf = transformers.LlamaForCausalLM(config).eval()
  with torch.no_grad():
    for name, p in hf.named_parameters():
      p.copy_(torch.randn_like(p) * 0.2 + (1.0 if "norm" in name else 0.0))
  hf.save_pretrained(str(tmp_path / "hf"))
  cfg, params, _, _ = load_hf(str(tmp_path / "hf"))
  assert cfg == ours
  tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 24))
  with torch.no_grad():
    want = hf(torch.as_tensor(tokens)).logits.numpy()
  np.testing.assert_allclose(our_logits(cfg, params, tokens), want, atol=2e-4, rtol=1e-4)
  state = {k: v.numpy() for k, v in hf.state_dict().items()}
  for name, value in hf_tensors(cfg, params):  # and back to transformers' exact tensors
    np.testing.assert_array_equal(value, state[name], err_msg=name)


# ---- bad input -----------------------------------------------------------------------------

def _leftovers(parent, name):
  return [e for e in os.listdir(parent) if e.startswith(name) or e.startswith("." + name)]


@pytest.fixture
def hf_dir(tmp_path):
  cfg = small_cfg()
  save_hf(str(tmp_path / "hf"), cfg, random_params(cfg), max_shard_size="40KB")
  return tmp_path / "hf"


def _edit_config(path, **changes):
  with open(path / "config.json") as f:
    config = json.load(f)
  config.update(changes)
  with open(path / "config.json", "w") as f:
    json.dump(config, f)


def test_truncated_safetensors_names_file_and_tensor(hf_dir, tmp_path):
  shard = sorted(hf_dir.glob("model-*.safetensors"))[1]
  data = shard.read_bytes()
  shard.write_bytes(data[:-100])
  with pytest.raises(ConversionError, match=rf"{shard.name}: truncated: tensor 'model\.[^']+' "
                                            r"ends at byte"):
    convert(f"hf:{hf_dir}", f"orbax:{tmp_path / 'out'}")
  assert not _leftovers(tmp_path, "out")
  shard.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
  with pytest.raises(ConversionError, match=rf"{shard.name}: corrupt safetensors header"):
    load_hf(str(hf_dir))


def test_unsupported_architecture(hf_dir):
  _edit_config(hf_dir, architectures=["GPT2LMHeadModel"], model_type="gpt2")
  with pytest.raises(ConversionError, match=r"hf/config\.json: unsupported architecture "
                                            r"\['GPT2LMHeadModel'\]"):
    load_hf(str(hf_dir))


def test_unsupported_rope_scaling(hf_dir):
  _edit_config(hf_dir, rope_scaling={"rope_type": "yarn", "factor": 4.0}, rope_parameters=None)
  with pytest.raises(ConversionError, match=r"config\.json: rope scaling 'yarn'"):
    load_hf(str(hf_dir))


def test_shape_mismatch_names_tensor_and_file(hf_dir, tmp_path):
  _edit_config(hf_dir, intermediate_size=256)
  with pytest.raises(ConversionError, match=r"model-\d{5}-of-\d{5}\.safetensors: tensor "
                                            r"'model\.layers\.0\.mlp\.gate_proj\.weight' has "
                                            r"shape \(128, 64\), but the config .* needs "
                                            r"\(256, 64\)"):
    convert(f"hf:{hf_dir}", f"orbax:{tmp_path / 'out'}")
  assert not _leftovers(tmp_path, "out")
  _edit_config(hf_dir, intermediate_size=128, num_hidden_layers=3)
  with pytest.raises(ConversionError, match=r"tensor 'model\.layers\.2\.[^']+' is missing"):
    load_hf(str(hf_dir))


def test_failed_write_leaves_no_destination(hf_dir, tmp_path, monkeypatch):
  import infer.hf
  real = infer.hf.write_hf

  def failing(directory, *args, **kw):
    real(directory, *args, **kw)  # the whole checkpoint lands in the temp dir...
    raise OSError("disk full")  # ...then fails before the rename

  monkeypatch.setattr("train.convert.write_hf", failing)
  with pytest.raises(OSError, match="disk full"):
    convert(f"hf:{hf_dir}", f"hf:{tmp_path / 'out'}")
  assert not _leftovers(tmp_path, "out")

  (tmp_path / "out").mkdir()
  (tmp_path / "out" / "keep.txt").write_text("mine")
  with pytest.raises(OSError, match="disk full"):
    convert(f"hf:{hf_dir}", f"hf:{tmp_path / 'out'}", overwrite=True)
  assert os.listdir(tmp_path / "out") == ["keep.txt"]  # untouched until the new one is done
  with pytest.raises(FileExistsError, match="already exists"):
    convert(f"hf:{hf_dir}", f"hf:{tmp_path / 'out'}")
  monkeypatch.undo()
  convert(f"hf:{hf_dir}", f"hf:{tmp_path / 'out'}", overwrite=True)
  assert "config.json" in os.listdir(tmp_path / "out")
  assert _leftovers(tmp_path, "out") == ["out"]


def test_bad_locations():
  with pytest.raises(ValueError, match=r"--src='safetensors:x': expected FORMAT:PATH"):
    convert("safetensors:x", "hf:y")
  with pytest.raises(ValueError, match=r"--dst='safetensors:y'"):
    convert("hf:x", "safetensors:y")
  with pytest.raises(ValueError, match=r"--dst='gguf:gs://b/m.gguf': gguf files are read and "
                                       "written locally"):
    convert("hf:x", "gguf:gs://b/m.gguf")
