"""The model's frozen, typed config, built from the `model` section of a run config."""

import dataclasses

import jax.numpy as jnp

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
_REMAT = ("none", "full", "dots", "dots_no_batch")
_ATTENTION = ("auto", "xla", "pallas")
_ROUTERS = ("mixtral", "qwen3_moe")
_ACTIVATIONS = ("silu", "gelu_tanh")
_ROPE_SCALINGS = ("llama3", "linear")

MOE_IMPLS = ("auto", "gmm", "ragged", "dense")  # model/moe.py expert_impl

@dataclasses.dataclass(frozen=True)
class ModelConfig:
  vocab_size: int = 4096
  d_model: int = 256
  n_layers: int = 4
  n_heads: int = 4
  n_kv_heads: int = 2
  head_dim: int = 0  # 0: d_model // n_heads
  d_ff: int = 704
  max_seq_len: int = 2048
  rope_theta: float = 10000.0
  rope_scaling_factor: float = 0.0  # 0: no RoPE scaling
  rope_scaling_type: str = "llama3"  # how a factor > 0 scales: llama3 (Llama 3.1) or linear
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_len: int = 8192
  norm_eps: float = 1e-5
  tie_embeddings: bool = True
  param_dtype: str = "float32"
  dtype: str = "float32"
  scan_layers: bool = True
  remat: str = "none"
  attention_impl: str = "auto"
  init_std: float = 0.02
  value_head: bool = False  # a scalar head instead of the LM head: values [B, T] (reward, critic)
  # Family options (Mistral, Qwen2/3, Gemma 2/3); the defaults are Llama's.
  qkv_bias: bool = False  # Qwen2: a bias on the q, k and v projections
  qk_norm: bool = False  # Qwen3, Gemma 3: RMSNorm over each head of q and k, before RoPE
  mlp_activation: str = "silu"  # silu (SwiGLU) or gelu_tanh (Gemma's GeGLU)
  norm_plus_one: bool = False  # Gemma: RMSNorm scales by (1 + w), w initialised at 0
  post_norms: bool = False  # Gemma 2/3: also norm the attention and MLP outputs
  embed_scale: bool = False  # Gemma: embeddings times sqrt(d_model)
  sliding_window: int = 0  # local layers see the last `sliding_window` keys; 0: all global
  global_every: int = 0  # with a window: layer i is global iff (i + 1) % global_every == 0;
  #                        0: every layer is local (Mistral). Gemma 2: 2, Gemma 3: 6.
  rope_local_theta: float = 0.0  # the local layers' own RoPE base, never scaled (Gemma 3);
  #                                0: the local layers use the global RoPE, scaling included
  attn_scale: float = 0.0  # scores scale; 0: head_dim ** -0.5 (Gemma: query_pre_attn_scalar)
  attn_softcap: float = 0.0  # Gemma 2: scores -> c * tanh(scores / c); 0: none
  final_softcap: float = 0.0  # Gemma 2: logits -> c * tanh(logits / c); 0: none
  # Mixture of experts (model/moe.py); n_experts = 0 keeps the dense MLP.
  n_experts: int = 0  # E
  n_experts_per_token: int = 2  # k
  moe_d_ff: int = 0  # each expert's SwiGLU width; 0: d_ff
  router: str = "mixtral"  # mixtral: softmax over the top-k logits; qwen3_moe: top-k of the softmax
  norm_topk_prob: bool = True  # qwen3_moe: renormalise the k probabilities to sum to 1
  capacity_factor: float = 0.0  # 0: dropless; else an expert keeps ceil(factor * M * k / E)
  router_aux_loss_coef: float = 0.001  # load-balancing loss weight (HF's default; HF's loss is k x)
  router_z_loss_coef: float = 0.0  # weight of the router z-loss (ST-MoE uses 0.001)
  moe_impl: str = "auto"  # gmm (grouped-matmul kernel), ragged (ragged_dot), dense; auto: moe.expert_impl

  def __post_init__(self):
    if self.head_dim == 0:
      if self.d_model % self.n_heads:
        raise ValueError(
            f"model.d_model={self.d_model} is not divisible by model.n_heads={self.n_heads}; "
            "set model.head_dim explicitly")
      object.__setattr__(self, "head_dim", self.d_model // self.n_heads)
    if self.n_heads % self.n_kv_heads:
      raise ValueError(f"model.n_heads={self.n_heads} must be a multiple of "
                       f"model.n_kv_heads={self.n_kv_heads}")
    for key, value, allowed in (("param_dtype", self.param_dtype, _DTYPES),
                                ("dtype", self.dtype, _DTYPES), ("remat", self.remat, _REMAT),
                                ("attention_impl", self.attention_impl, _ATTENTION),
                                ("router", self.router, _ROUTERS),
                                ("mlp_activation", self.mlp_activation, _ACTIVATIONS),
                                ("moe_impl", self.moe_impl, MOE_IMPLS),
                                ("rope_scaling_type", self.rope_scaling_type, _ROPE_SCALINGS)):
      if value not in allowed:
        raise ValueError(f"model.{key}={value!r} is not one of {sorted(allowed)}")
    if self.n_experts < 0 or self.capacity_factor < 0:
      raise ValueError(f"model.n_experts={self.n_experts} and model.capacity_factor="
                       f"{self.capacity_factor} must be >= 0")
    if self.n_experts and not 1 <= self.n_experts_per_token <= self.n_experts:
      raise ValueError(f"model.n_experts_per_token={self.n_experts_per_token} must be in "
                       f"[1, model.n_experts={self.n_experts}]")

    for key in ("sliding_window", "global_every", "attn_softcap", "final_softcap",
                "rope_scaling_factor"):
      if getattr(self, key) < 0:
        raise ValueError(f"model.{key}={getattr(self, key)} must be >= 0")

  @classmethod
  def from_config(cls, cfg) -> "ModelConfig":
    """From an ml_collections ConfigDict (or dict) holding the `model` section."""
    cfg = dict(cfg)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(cfg) - names)
    if unknown:
      raise ValueError(f"unknown model config keys {unknown}; valid keys: {sorted(names)}")
    return cls(**cfg)

  @property
  def compute_dtype(self):
    return _DTYPES[self.dtype]

  @property
  def weight_dtype(self):
    return _DTYPES[self.param_dtype]

  def is_local(self, layer: int) -> bool:
    """Whether layer `layer` attends through the sliding window (static per layer)."""
    if not self.sliding_window:
      return False
    return not self.global_every or (layer + 1) % self.global_every != 0

  @property
  def layer_period(self) -> int:
    """Layers in one repeat of the local/global pattern (what one scan step runs)."""
    return self.global_every if self.sliding_window and self.global_every else 1

  @property
  def group_size(self) -> int:
    return self.n_heads // self.n_kv_heads
