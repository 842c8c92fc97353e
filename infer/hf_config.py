"""config.json of every family the model runs (`FAMILIES`): HF configs to ModelConfig
(`config_from_hf`) and back (`config_to_hf`, as the first architecture whose config.json reads
back as the same model: `architecture_of`). The tensors are infer/hf.py's job."""

import dataclasses

from infer.files import ConversionError
from model import ModelConfig

CONFIG = "config.json"

# ---------------------------------------------------------------------------------------
# Families
# ---------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Family:
  """What an HF architecture's config.json implies beyond the Llama it shares the rest with."""
  model_type: str
  options: dict  # the ModelConfig fields the architecture fixes
  pinned: dict  # config.json keys that must hold these values (absent or null is fine too)
  window: int | None = None  # None: no sliding window; 0: every layer local (Mistral);
  #                            n: local layers with every n-th global unless layer_types says
  gemma_scores: bool = False  # query_pre_attn_scalar and the soft-capping keys
  experts_key: str | None = None  # the key holding the expert count (MoE)
  local_rope: float = 0.0  # Gemma 3: the local layers' own unscaled RoPE, this base unless
  #                          config.json says (0: the local layers share the global RoPE)


_LLAMA_PINS = {"hidden_act": "silu", "attention_bias": False, "mlp_bias": False}
_QWEN_PINS = {"hidden_act": "silu", "attention_bias": False, "use_sliding_window": False}
_GEMMA = dict(norm_plus_one=True, post_norms=True, embed_scale=True, mlp_activation="gelu_tanh")
_GEMMA_PINS = {"hidden_activation": "gelu_pytorch_tanh", "attention_bias": False,
               "use_bidirectional_attention": False}

FAMILIES = {
    "LlamaForCausalLM": Family("llama", {}, dict(_LLAMA_PINS, sliding_window=None)),
    "MistralForCausalLM": Family("mistral", {}, {"hidden_act": "silu"}, window=0),
    "Qwen2ForCausalLM": Family("qwen2", dict(qkv_bias=True), {"hidden_act": "silu",
                                                              "use_sliding_window": False}),
    "Qwen3ForCausalLM": Family("qwen3", dict(qk_norm=True), _QWEN_PINS),
    "Gemma2ForCausalLM": Family("gemma2", _GEMMA, _GEMMA_PINS, window=2, gemma_scores=True),
    "Gemma3ForCausalLM": Family("gemma3_text", dict(_GEMMA, qk_norm=True), _GEMMA_PINS,
                                window=6, gemma_scores=True, local_rope=10000.0),
    "MixtralForCausalLM": Family("mixtral", dict(router="mixtral"), {"hidden_act": "silu"},
                                 window=0, experts_key="num_local_experts"),
    "Qwen3MoeForCausalLM": Family("qwen3_moe", dict(qk_norm=True, router="qwen3_moe"),
                                  dict(_QWEN_PINS, decoder_sparse_step=1, mlp_only_layers=[]),
                                  experts_key="num_experts"),
}
_BY_MODEL_TYPE = {f.model_type: arch for arch, f in FAMILIES.items()}


# ---------------------------------------------------------------------------------------
# config.json
# ---------------------------------------------------------------------------------------

def _architecture(hf: dict, path: str) -> str:
  archs = hf.get("architectures") or []
  for arch in archs:
    if arch in FAMILIES:
      return arch
  if not archs and hf.get("model_type") in _BY_MODEL_TYPE:
    return _BY_MODEL_TYPE[hf["model_type"]]
  raise ConversionError(f"{path}: unsupported architecture {archs or hf.get('model_type')}; "
                        f"supported: {list(FAMILIES)}")


def _scaling(rope: dict, path: str, where: str = "") -> dict:
  """The ModelConfig fields of one rope_scaling (or rope_parameters) dict's scaling."""
  rope_type = rope.get("rope_type", rope.get("type", "default"))
  if rope_type == "default":
    return {}
  if rope_type == "linear":  # transformers' inverse frequencies / factor
    return dict(rope_scaling_type="linear", rope_scaling_factor=float(rope["factor"]))
  if rope_type == "llama3":
    return dict(rope_scaling_type="llama3", rope_scaling_factor=float(rope["factor"]),
                rope_low_freq_factor=float(rope["low_freq_factor"]),
                rope_high_freq_factor=float(rope["high_freq_factor"]),
                rope_original_max_len=int(rope["original_max_position_embeddings"]))
  raise ConversionError(f"{path}: rope scaling {rope_type!r}{where} is not supported (only "
                        "default, linear and llama3)")


def _rope(hf: dict, family: Family, path: str) -> dict:
  """rope_theta and its scaling; rope_local_theta where the local layers have their own
  (Gemma 3: per layer type in transformers 5, rope_local_base_freq in 4, and unscaled)."""
  params = dict(hf.get("rope_parameters") or {})  # transformers 5
  if "full_attention" in params or "sliding_attention" in params:  # per layer type
    full = params.get("full_attention") or {}
    local = params.get("sliding_attention") or {}
    if local.get("rope_type", local.get("type", "default")) != "default":
      raise ConversionError(f"{path}: rope scaling {local.get('rope_type', local.get('type'))!r}"
                            " of the sliding_attention layers is not supported (only default "
                            "RoPE on the local layers)")
    theta = full.get("rope_theta", hf.get("rope_theta") or 10000.0)
    local_theta = local.get("rope_theta", hf.get("rope_local_base_freq") or family.local_rope
                            or 10000.0)
    return dict(rope_theta=float(theta), rope_local_theta=float(local_theta),
                **_scaling(full, path, " of the full_attention layers"))
  # transformers 4 (whose Gemma 3 scales only the global layers, as 5 does)
  params.update(hf.get("rope_scaling") or {})
  theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
  out = {"rope_theta": float(theta)}
  if hf.get("rope_local_base_freq") or family.local_rope:
    out["rope_local_theta"] = float(hf.get("rope_local_base_freq") or family.local_rope)
  out.update(_scaling(params, path))
  return out


def _window(hf: dict, family: Family, n_layers: int, path: str) -> dict:
  """sliding_window and global_every from sliding_window and layer_types (or the older
  sliding_window_pattern): layer i is global iff (i + 1) % global_every == 0."""
  size = int(hf.get("sliding_window") or 0)
  if family.window is None or not size:
    return {}
  if family.window == 0:  # Mistral, Mixtral: every layer
    return dict(sliding_window=size)
  period = int(hf.get("sliding_window_pattern") or hf.get("_sliding_window_pattern")
               or family.window)
  types = hf.get("layer_types") or ["sliding_attention" if (i + 1) % period else
                                    "full_attention" for i in range(n_layers)]
  if len(types) != n_layers or not set(types) <= {"sliding_attention", "full_attention"}:
    raise ConversionError(f"{path}: layer_types={types} is not one of 'sliding_attention' or "
                          f"'full_attention' for each of the {n_layers} layers")
  local = [t == "sliding_attention" for t in types]
  if not any(local):
    return {}
  first_global = local.index(False) + 1 if not all(local) else 0
  for every in (period, first_global, 0):
    if local == [not every or bool((i + 1) % every) for i in range(n_layers)]:
      return dict(sliding_window=size, global_every=every)
  raise ConversionError(f"{path}: layer_types={types} is not a supported pattern (local layers "
                        "with every n-th layer global)")


def _scores(hf: dict) -> dict:
  """Gemma's attention scale (query_pre_attn_scalar ** -0.5) and soft-capping."""
  out = {}
  if hf.get("query_pre_attn_scalar"):
    out["attn_scale"] = float(hf["query_pre_attn_scalar"]) ** -0.5
  for key, field in (("attn_logit_softcapping", "attn_softcap"),
                     ("final_logit_softcapping", "final_softcap")):
    if hf.get(key):
      out[field] = float(hf[key])
  return out


def _experts(hf: dict, family: Family) -> dict:
  n = hf.get("num_local_experts") or hf.get("num_experts") or 0
  out = dict(n_experts=int(n), n_experts_per_token=int(hf["num_experts_per_tok"]))
  # Qwen3-MoE's intermediate_size is a dense MLP's (unused here); Mixtral's, each expert's.
  out["moe_d_ff"] = int(hf.get("moe_intermediate_size") or hf["intermediate_size"])
  if family.options.get("router") == "qwen3_moe":
    out["norm_topk_prob"] = bool(hf.get("norm_topk_prob", False))  # transformers' default
  return out


def config_from_hf(hf: dict, path: str = CONFIG, **overrides) -> ModelConfig:
  """ModelConfig from an HF config.json dict of any family in FAMILIES (transformers 4 or 5
  style). Options the model does not have are errors that name the key."""
  arch = _architecture(hf, path)
  family = FAMILIES[arch]
  for key, ok in family.pinned.items():
    if hf.get(key) is not None and hf[key] != ok:
      raise ConversionError(f"{path}: {key}={hf[key]!r} is not supported (a {arch} here has "
                            f"{ok!r})")
  d, n, n_layers = hf["hidden_size"], hf["num_attention_heads"], hf["num_hidden_layers"]
  fields = dict(
      vocab_size=hf["vocab_size"], d_model=d, n_layers=n_layers, n_heads=n,
      n_kv_heads=hf.get("num_key_value_heads") or n, head_dim=hf.get("head_dim") or d // n,
      d_ff=hf["intermediate_size"], max_seq_len=hf.get("max_position_embeddings", 2048),
      norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
      init_std=float(hf.get("initializer_range", 0.02)), **family.options)
  fields.update(_rope(hf, family, path))
  fields.update(_window(hf, family, n_layers, path))
  if family.gemma_scores:
    fields.update(_scores(hf))
  if family.experts_key:
    fields.update(_experts(hf, family))
  fields.update(overrides)
  try:
    return ModelConfig(**fields)
  except ValueError as e:
    raise ConversionError(f"{path}: {e}") from None


# Fields that change how a model runs or trains, not the function it computes.
_NOT_ARCHITECTURE = ("param_dtype", "dtype", "scan_layers", "remat", "attention_impl",
                     "init_std", "capacity_factor", "router_aux_loss_coef",
                     "router_z_loss_coef", "moe_impl")


def canonical(cfg: ModelConfig) -> ModelConfig:
  """`cfg` with every field that does not change the model's function set to one value (and
  defaults resolved): two configs describe the same model iff their canonical forms agree."""
  default = ModelConfig()
  changes = {k: getattr(default, k) for k in _NOT_ARCHITECTURE}
  local = [cfg.is_local(i) for i in range(cfg.n_layers)]
  scaled = cfg.rope_scaling_factor > 0  # then a local base of 0 (scaled) is not rope_theta
  changes.update(attn_scale=cfg.attn_scale or cfg.head_dim ** -0.5,
                 global_every=cfg.global_every if any(local) and not all(local) else 0,
                 sliding_window=cfg.sliding_window if any(local) else 0,
                 rope_local_theta=(cfg.rope_local_theta or (0.0 if scaled else cfg.rope_theta))
                 if any(local) else 0.0)
  llama3 = ("rope_low_freq_factor", "rope_high_freq_factor", "rope_original_max_len")
  if not scaled or cfg.rope_scaling_type != "llama3":  # the fields the scaling leaves unread
    changes.update({k: getattr(default, k) for k in llama3 + (() if scaled else
                                                               ("rope_scaling_type",))})
  if cfg.n_experts:  # the dense width is unused; Mixtral's router always renormalises
    changes.update(moe_d_ff=cfg.moe_d_ff or cfg.d_ff, d_ff=default.d_ff)
    if cfg.router == "mixtral":
      changes["norm_topk_prob"] = default.norm_topk_prob
  else:
    changes.update({k: getattr(default, k) for k in ("n_experts_per_token", "moe_d_ff",
                                                     "router", "norm_topk_prob")})
  return dataclasses.replace(cfg, **changes)


def _hf_config(arch: str, cfg: ModelConfig) -> dict:
  """The config.json of `cfg` as architecture `arch` would hold it (transformers 4 and 5)."""
  family = FAMILIES[arch]
  hf = {"architectures": [arch], "model_type": family.model_type, "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model, "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings, "attention_dropout": 0.0,
        "initializer_range": cfg.init_std, "use_cache": True}
  hf.update({k: v for k, v in family.pinned.items() if v is not None})
  rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
  hf.update(rope_theta=cfg.rope_theta, rope_scaling=None)  # transformers 4
  if cfg.rope_scaling_factor > 0 and cfg.rope_scaling_type == "linear":
    hf["rope_scaling"] = {"rope_type": "linear", "factor": cfg.rope_scaling_factor}
  elif cfg.rope_scaling_factor > 0:
    hf["rope_scaling"] = {"rope_type": "llama3", "factor": cfg.rope_scaling_factor,
                          "low_freq_factor": cfg.rope_low_freq_factor,
                          "high_freq_factor": cfg.rope_high_freq_factor,
                          "original_max_position_embeddings": cfg.rope_original_max_len}
  rope.update(hf["rope_scaling"] or {})
  hf["rope_parameters"] = rope  # transformers 5
  if family.window is not None:
    hf["sliding_window"] = cfg.sliding_window or None
  if family.window:  # Gemma: which layers are local
    local_theta = cfg.rope_local_theta or cfg.rope_theta
    hf["layer_types"] = ["sliding_attention" if cfg.is_local(i) else "full_attention"
                         for i in range(cfg.n_layers)]
    if cfg.global_every:
      hf["sliding_window_pattern"] = cfg.global_every
    if family.local_rope:  # Gemma 3: RoPE per layer type, the scaling on the global ones
      hf["rope_local_base_freq"] = local_theta
      hf["rope_parameters"] = {
          "full_attention": rope,
          "sliding_attention": {"rope_type": "default", "rope_theta": local_theta}}
  if family.gemma_scores:
    scalar = (cfg.attn_scale or cfg.head_dim ** -0.5) ** -2
    hf.update(query_pre_attn_scalar=round(scalar) if abs(scalar - round(scalar)) < 1e-6
              else scalar, attn_logit_softcapping=cfg.attn_softcap or None,
              final_logit_softcapping=cfg.final_softcap or None)
  if family.experts_key:
    hf.update({family.experts_key: cfg.n_experts,
               "num_experts_per_tok": cfg.n_experts_per_token, "output_router_logits": False})
    if cfg.router == "qwen3_moe":
      hf.update(moe_intermediate_size=cfg.moe_d_ff or cfg.d_ff,
                norm_topk_prob=cfg.norm_topk_prob)
    else:  # Mixtral's intermediate_size is each expert's
      hf.update(intermediate_size=cfg.moe_d_ff or cfg.d_ff, router_jitter_noise=0.0)
  return hf


# The options that tell the families apart (named when none holds a model).
_OPTIONS = ("qkv_bias", "qk_norm", "mlp_activation", "norm_plus_one", "post_norms",
            "embed_scale", "sliding_window", "global_every", "rope_local_theta", "attn_scale",
            "attn_softcap", "final_softcap", "n_experts", "router", "rope_scaling_factor",
            "rope_scaling_type")


def architecture_of(cfg: ModelConfig) -> str:
  """The first architecture in FAMILIES whose config.json reads back as the same model."""
  want = canonical(cfg)
  for arch, family in FAMILIES.items():
    if any(getattr(cfg, k) != v for k, v in family.options.items()):
      continue
    try:
      back = config_from_hf(_hf_config(arch, cfg))
    except ConversionError:
      continue
    if canonical(dataclasses.replace(back, value_head=cfg.value_head)) == want:
      return arch
  options = {k: getattr(cfg, k) for k in _OPTIONS if getattr(cfg, k) != getattr(ModelConfig, k)}
  raise ConversionError(f"no Hugging Face architecture holds this model's combination of "
                        f"options {options}; supported: {list(FAMILIES)}")


def config_to_hf(cfg: ModelConfig, *, dtype: str = "float32", bos_token_id=None,
                 eos_token_id=None, pad_token_id=None) -> dict:
  """The HF config.json dict of `cfg` (architecture_of(cfg)), readable by transformers 4
  and 5."""
  hf = _hf_config(architecture_of(cfg), cfg)
  hf.update(torch_dtype=dtype, dtype=dtype, bos_token_id=bos_token_id,
            eos_token_id=eos_token_id, pad_token_id=pad_token_id)
  return hf
