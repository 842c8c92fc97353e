"""infer/hf.py and infer/gguf.py for every model family, against transformers itself.

For each family a tiny random model is built with transformers' own config class and saved
with its save_pretrained. The independent reference is transformers' forward and greedy
generation (CPU torch, float32, eager attention), on sequences longer than the sliding
windows. Checked per family: import (the same logits), export (transformers loads what we
write as the same architecture and gives the same logits; the tensors are its own), greedy
generation token for token, and a GGUF written from the same weights the way llama.cpp's
convert_hf_to_gguf.py writes them (this file's own copy of its conventions: names, q/k row
interleaving for the llama architecture, Gemma's norms stored as 1 + w, stacked experts).
"""

import dataclasses
import inspect
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

from infer.decode import generate  # noqa: E402
from infer.files import ConversionError  # noqa: E402
from infer.gguf import load_gguf  # noqa: E402
from infer.hf import (config_from_hf, config_to_hf, hf_tensors, load_hf, relayout,  # noqa: E402
                      save_hf)
from infer.sampling import SamplingParams  # noqa: E402
from model import ModelConfig, Transformer  # noqa: E402

SEQ, PROMPT, NEW = 24, 8, 16  # every window below is 5 tokens
COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
              rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=None,
              eos_token_id=None, pad_token_id=None)
GEMMA = dict(head_dim=16, sliding_window=5, query_pre_attn_scalar=24)


def _kernels_take_softcap() -> bool:
  from pallas_kernels.attention import attention
  return "softcap" in inspect.signature(attention).parameters


needs_softcap = pytest.mark.skipif(
    not _kernels_take_softcap(),
    reason="pallas_kernels.attention.attention takes no softcap= yet (Gemma 2's attention "
           "soft-capping; branch kern adds it)")

# family -> (transformers config class, its arguments, what our imported config must say)
FAMILIES = {
    "mistral": ("MistralConfig", dict(sliding_window=5),
                dict(sliding_window=5, global_every=0)),
    "qwen2": ("Qwen2Config", {}, dict(qkv_bias=True, sliding_window=0)),
    "qwen3": ("Qwen3Config", dict(head_dim=32, tie_word_embeddings=True),
              dict(qk_norm=True, head_dim=32, tie_embeddings=True)),
    "gemma2": ("Gemma2Config", dict(GEMMA, num_hidden_layers=3, attn_logit_softcapping=None,
                                    final_logit_softcapping=30.0),
               dict(norm_plus_one=True, post_norms=True, embed_scale=True, global_every=2,
                    mlp_activation="gelu_tanh", attn_scale=24 ** -0.5, attn_softcap=0.0,
                    final_softcap=30.0)),
    "gemma2_softcapped": ("Gemma2Config", dict(GEMMA, num_hidden_layers=3,
                                               attn_logit_softcapping=20.0,
                                               final_logit_softcapping=30.0),
                          dict(attn_softcap=20.0, final_softcap=30.0)),
    # 7 layers: local, except layer 5 (every 6th); the scan runs one period and a tail.
    "gemma3": ("Gemma3TextConfig", dict(GEMMA, num_hidden_layers=7, tie_word_embeddings=True),
               dict(qk_norm=True, global_every=6, rope_theta=1e6, rope_local_theta=1e4,
                    tie_embeddings=True)),
    # Gemma 3 4B+'s linear RoPE scaling, on the global layer only. Both bases 1e4: a local
    # table shared with the (scaled) global one would show, and factor 8 at 24 positions
    # still turns the fastest frequency by 3 radians.
    "gemma3_linear": ("Gemma3TextConfig", dict(GEMMA, num_hidden_layers=7, rope_parameters={
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e4},
        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}),
                      dict(rope_scaling_type="linear", rope_scaling_factor=8.0, rope_theta=1e4,
                           rope_local_theta=1e4, global_every=6)),
    "mixtral": ("MixtralConfig", dict(num_local_experts=4, num_experts_per_tok=2),
                dict(n_experts=4, n_experts_per_token=2, router="mixtral", moe_d_ff=96)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(head_dim=16, num_experts=4, num_experts_per_tok=2,
                                         moe_intermediate_size=48, norm_topk_prob=False),
                  dict(n_experts=4, router="qwen3_moe", moe_d_ff=48, norm_topk_prob=False,
                       qk_norm=True)),
}
NAMES = [pytest.param(name, marks=needs_softcap) if name == "gemma2_softcapped" else name
         for name in FAMILIES]


class Built:
  """A saved transformers model and its reference logits on `tokens`."""

  def __init__(self, name, directory):
    cls, kwargs, self.expect = FAMILIES[name]
    config = getattr(transformers, cls)(**dict(COMMON, **kwargs))
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(
        config, dtype=torch.float32, attn_implementation="eager").eval()
    gemma = name.startswith("gemma")
    with torch.no_grad():  # random everything, norms around their identity
      for pname, p in model.named_parameters():
        unit = "norm" in pname and not gemma  # Gemma's norms hold w of (1 + w)
        p.copy_(torch.randn_like(p) * 0.2 + (1.0 if unit else 0.0))
    model.save_pretrained(str(directory))
    self.name, self.dir, self.model = name, directory, model
    self.tokens = np.random.default_rng(1).integers(0, COMMON["vocab_size"], (2, SEQ))
    self.logits = hf_logits(model, self.tokens)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  cache = {}

  def get(name):
    if name not in cache:
      cache[name] = Built(name, tmp_path_factory.mktemp(name) / "hf")
    return cache[name]
  torch.set_num_threads(1)
  return get


def hf_logits(model, tokens):
  with torch.no_grad():
    return model(torch.as_tensor(tokens)).logits.numpy()


def our_logits(cfg, params, tokens):
  positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
  out = jax.jit(lambda p, t, pos: Transformer(cfg).apply({"params": p}, t, pos)[0])(
      params, jnp.asarray(tokens), positions)
  return np.asarray(out)


def assert_logits(got, want):
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def read_safetensors(directory):
  from safetensors.numpy import load_file
  return load_file(str(directory / "model.safetensors"))


# ---- import, export, generation -------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_import_export_and_greedy_generation_match_transformers(built, tmp_path, name):
  ref = built(name)
  cfg, params, _, _ = load_hf(str(ref.dir))
  for key, value in ref.expect.items():
    assert getattr(cfg, key) == pytest.approx(value), key
  assert_logits(our_logits(cfg, params, ref.tokens), ref.logits)

  # Export: transformers reads it as the same architecture, with the same tensors.
  save_hf(str(tmp_path / "out"), cfg, params)
  back = transformers.AutoModelForCausalLM.from_pretrained(
      str(tmp_path / "out"), dtype=torch.float32, attn_implementation="eager").eval()
  assert type(back) is type(ref.model)
  assert_logits(hf_logits(back, ref.tokens), ref.logits)
  theirs, ours = read_safetensors(ref.dir), read_safetensors(tmp_path / "out")
  assert set(ours) == set(theirs)
  for key in theirs:
    np.testing.assert_array_equal(ours[key], theirs[key], err_msg=key)

  # Greedy generation past the window, token for token.
  prompt = [int(t) for t in ref.tokens[0, :PROMPT]]
  [got] = generate(cfg, params, [prompt], max_new_tokens=NEW,
                   sampling=SamplingParams(temperature=0.0))
  with torch.no_grad():
    want = ref.model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, PROMPT,
                                                                                 dtype=int),
                              max_new_tokens=NEW, do_sample=False)[0, PROMPT:].tolist()
  assert got == want


def test_gemma3_linear_rope_scaling_is_on_the_global_layers_only(built):
  # The same import without the scaling, or with it on the local layers too (a local
  # table shared with the global one), is far from transformers: the test above can tell.
  ref = built("gemma3_linear")
  cfg, params, _, _ = load_hf(str(ref.dir))
  for wrong in (dict(rope_scaling_factor=0.0), dict(rope_local_theta=0.0)):
    got = our_logits(dataclasses.replace(cfg, **wrong), params, ref.tokens)
    assert np.abs(got - ref.logits).max() > 1e-2, wrong


def test_gemma3_linear_rope_scaling_reads_from_transformers_4_and_5_configs(built):
  # transformers 4's config.json of Gemma 3 4B (rope_scaling, which its Gemma 3 applies to
  # the global layers, and rope_local_base_freq) and transformers 5's (rope_parameters per
  # layer type) describe one model.
  hf5 = json.loads((built("gemma3_linear").dir / "config.json").read_text())
  hf4 = {k: v for k, v in hf5.items() if k not in ("rope_parameters", "layer_types")}
  hf4.update(rope_theta=1e4, rope_local_base_freq=1e4, sliding_window_pattern=6,
             rope_scaling={"rope_type": "linear", "factor": 8.0})
  assert config_from_hf(hf4) == config_from_hf(hf5)
  assert config_from_hf(hf4).rope_scaling_type == "linear"
  # Without rope_local_base_freq, transformers 4's Gemma 3 default base for the local layers.
  del hf4["rope_local_base_freq"]
  hf4["rope_theta"] = 1e6
  assert (config_from_hf(hf4).rope_theta, config_from_hf(hf4).rope_local_theta) == (1e6, 1e4)


@pytest.mark.parametrize("name", ["mixtral", "qwen3_moe"])
def test_fused_expert_checkpoints_import(built, tmp_path, name):
  # transformers 5's own layout (save_original_format=False): gate_up_proj [E, 2F, D],
  # down_proj [E, D, F] and the router as mlp.gate, for Mixtral too.
  # Unrolled layers here (layers_{i}/moe/...), rebuilt as scanned ones by relayout.
  ref = built(name)
  ref.model.save_pretrained(str(tmp_path / "fused"), save_original_format=False)
  assert any(k.endswith("experts.gate_up_proj") for k in read_safetensors(tmp_path / "fused"))
  cfg, params, _, _ = load_hf(str(tmp_path / "fused"), scan_layers=False)
  assert "layers_1" in params and params["layers_1"]["moe"]["gate"].shape[0] == 4
  theirs = read_safetensors(ref.dir)  # the per-expert tensors, exactly
  for key, value in hf_tensors(cfg, params):
    np.testing.assert_array_equal(value, theirs[key], err_msg=key)
  scanned_cfg = dataclasses.replace(cfg, scan_layers=True)
  scanned = relayout(cfg, params, scanned_cfg)
  assert_logits(our_logits(scanned_cfg, scanned, ref.tokens), ref.logits)


# ---- GGUF -----------------------------------------------------------------------------

# convert_hf_to_gguf.py's names (gguf-py's TENSOR_NAMES) for the HF tensors here.
_GGUF_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
    "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm",
    "block_sparse_moe.gate": "ffn_gate_inp", "mlp.gate": "ffn_gate_inp",
}
_EXPERTS = {"w1": "ffn_gate_exps", "w3": "ffn_up_exps", "w2": "ffn_down_exps",
            "gate_proj": "ffn_gate_exps", "up_proj": "ffn_up_exps", "down_proj": "ffn_down_exps"}
# family -> (GGUF architecture, config overrides that make transformers compute what
# llama.cpp computes from that file: it stores no query_pre_attn_scalar (Gemma's scale is
# 1/sqrt(head_dim) at these sizes) and its qwen3moe always renormalises the top-k weights)
GGUF_FAMILIES = {
    "qwen2": ("qwen2", {}), "qwen3": ("qwen3", {}),
    "qwen3_moe": ("qwen3moe", dict(norm_topk_prob=True)),
    "mixtral": ("llama", {}),
    "gemma3": ("gemma3", dict(query_pre_attn_scalar=16)),
    "gemma3_linear": ("gemma3", dict(query_pre_attn_scalar=16)),
    "gemma2_softcapped": ("gemma2", dict(query_pre_attn_scalar=16)),
}


def _interleave_qk(w, n_head):
  """LlamaModel.permute: each head's rows from halves [r0..r_{H/2-1} | r_{H/2}..] to pairs."""
  return w.reshape(n_head, 2, w.shape[0] // n_head // 2, w.shape[1]).swapaxes(1, 2).reshape(
      w.shape)


def gguf_tensors(state: dict, arch: str, hf: dict) -> dict:
  out, experts = {}, {}
  gemma = arch.startswith("gemma")
  for name, w in state.items():
    if name.endswith("norm.weight") and gemma:
      w = w + 1
    if arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
      heads = hf["num_attention_heads"] if "q_proj" in name else hf["num_key_value_heads"]
      w = _interleave_qk(w, heads)
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight":
           "output_norm.weight", "lm_head.weight": "output.weight"}
    if name in top:
      out[top[name]] = w
      continue
    parts = name.split(".")
    layer, rest, kind = parts[2], ".".join(parts[3:-1]), parts[-1]
    if ".experts." in name:  # stacked per layer: [E, out, in]
      experts.setdefault((layer, _EXPERTS[parts[-2]]), {})[int(parts[-3])] = w
      continue
    if rest == "post_attention_layernorm":
      new = "post_attention_norm" if gemma else "ffn_norm"
    else:
      new = _GGUF_NAMES[rest]
    out[f"blk.{layer}.{new}.{kind}"] = w
  for (layer, new), ws in experts.items():
    out[f"blk.{layer}.{new}.weight"] = np.stack([ws[e] for e in sorted(ws)])
  return out


def write_gguf(path, arch: str, hf: dict, state: dict):
  writer = gguf.GGUFWriter(str(path), arch)
  head_dim = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
  rope = hf["rope_parameters"]
  writer.add_block_count(hf["num_hidden_layers"])
  writer.add_context_length(hf["max_position_embeddings"])
  writer.add_embedding_length(hf["hidden_size"])
  writer.add_feed_forward_length(hf["intermediate_size"])
  writer.add_head_count(hf["num_attention_heads"])
  writer.add_head_count_kv(hf["num_key_value_heads"])
  writer.add_key_length(head_dim)
  writer.add_value_length(head_dim)
  writer.add_rope_freq_base(rope.get("full_attention", rope)["rope_theta"])
  if rope.get("full_attention", rope).get("rope_type") == "linear":  # as Gemma3Model writes it
    writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
    writer.add_rope_scaling_factor(rope.get("full_attention", rope)["factor"])
  writer.add_layer_norm_rms_eps(hf["rms_norm_eps"])
  if hf.get("num_local_experts"):
    writer.add_expert_count(hf["num_local_experts"])
    writer.add_expert_used_count(hf["num_experts_per_tok"])
  if hf.get("moe_intermediate_size"):
    writer.add_expert_feed_forward_length(hf["moe_intermediate_size"])
  if arch.startswith("gemma"):
    writer.add_sliding_window(hf["sliding_window"])
    for key, add in (("attn_logit_softcapping", writer.add_attn_logit_softcapping),
                     ("final_logit_softcapping", writer.add_final_logit_softcapping)):
      if hf.get(key):
        add(hf[key])
  tokens = ["<|endoftext|>"] + [f"t{i}" for i in range(1, hf["vocab_size"])]
  writer.add_tokenizer_model("gpt2")
  writer.add_token_list(tokens)
  writer.add_token_types([3] + [1] * (len(tokens) - 1))
  writer.add_token_merges([])
  for name, w in gguf_tensors(state, arch, hf).items():
    writer.add_tensor(name, np.ascontiguousarray(w, np.float32))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()


@pytest.mark.parametrize("name", [pytest.param(n, marks=needs_softcap)
                                  if n == "gemma2_softcapped" else n for n in GGUF_FAMILIES])
def test_gguf_import_matches_transformers(built, tmp_path, name):
  ref = built(name)
  arch, overrides = GGUF_FAMILIES[name]
  with open(ref.dir / "config.json") as f:
    hf = json.load(f)
  write_gguf(tmp_path / "m.gguf", arch, hf, read_safetensors(ref.dir))
  cfg, params, _, _ = load_gguf(str(tmp_path / "m.gguf"))
  want = ref.logits
  if overrides:
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(ref.dir), dtype=torch.float32, attn_implementation="eager", **overrides).eval()
    want = hf_logits(model, ref.tokens)
  assert_logits(our_logits(cfg, params, ref.tokens), want)


# ---- bad input ------------------------------------------------------------------------

def test_unknown_architecture_names_it_and_the_supported_ones(built, tmp_path):
  config = dict(json.loads((built("qwen2").dir / "config.json").read_text()),
                architectures=["Phi3ForCausalLM"], model_type="phi3")
  with pytest.raises(ConversionError, match=r"unsupported architecture \['Phi3ForCausalLM'\];"
                                            r" supported: \['LlamaForCausalLM', .*"
                                            r"'Gemma3ForCausalLM', .*'Qwen3MoeForCausalLM'\]"):
    config_from_hf(config)
  (tmp_path / "hf").mkdir()
  (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
  with pytest.raises(ConversionError, match=r"hf/config\.json: unsupported architecture "
                                            r"\['Phi3ForCausalLM'\]"):
    load_hf(str(tmp_path / "hf"))


BASE = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2)


@pytest.mark.parametrize("arch, changes, message", [
    ("Qwen2ForCausalLM", dict(use_sliding_window=True), r"use_sliding_window=True is not"),
    ("Qwen3MoeForCausalLM", dict(mlp_only_layers=[1], num_experts=4, num_experts_per_tok=2),
     r"mlp_only_layers=\[1\] is not supported"),
    ("Qwen3MoeForCausalLM", dict(decoder_sparse_step=2, num_experts=4, num_experts_per_tok=2),
     r"decoder_sparse_step=2"),
    ("Gemma3ForCausalLM", dict(rope_parameters={
        "full_attention": {"rope_type": "yarn", "factor": 8.0, "rope_theta": 1e6},
        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}),
     r"rope scaling 'yarn' of the full_attention layers is not supported"),
    ("Gemma3ForCausalLM", dict(rope_parameters={
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
        "sliding_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e4}}),
     r"rope scaling 'linear' of the sliding_attention layers is not supported"),
    ("Gemma3ForCausalLM", dict(sliding_window=4, layer_types=["full_attention",
                                                              "sliding_attention"]),
     r"layer_types=.* is not a supported pattern"),
])
def test_unsupported_options_are_named(arch, changes, message):
  with pytest.raises(ConversionError, match=message):
    config_from_hf(dict(BASE, architectures=[arch], **changes))


def test_export_refuses_a_combination_no_architecture_has():
  cfg = ModelConfig(qkv_bias=True, sliding_window=8)  # Qwen2 without its sliding window
  with pytest.raises(ConversionError, match=r"no Hugging Face architecture holds .*"
                                            r"'qkv_bias': True, .*'sliding_window': 8"):
    config_to_hf(cfg)
