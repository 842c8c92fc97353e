"""Qwen3-30B-A3B's architecture: 128 experts of width 768, 8 per token (top-8 of the softmax,
renormalised), q/k norms; 3.3B of its 30.5B parameters act per token. For pod runs and
--dry_run:

python train/main.py --config configs/qwen3_30b_a3b.py --dry_run --target v5p-128
"""

from configs import base, pod


def get_config():
  c = base.get_config()
  c.workdir = "runs/qwen3_30b_a3b"
  m = c.model
  m.vocab_size = 151936
  m.d_model = 2048
  m.n_layers = 48
  m.n_heads = 32
  m.n_kv_heads = 4
  m.head_dim = 128
  m.d_ff = 6144
  m.moe_d_ff = 768
  m.max_seq_len = 40960
  m.rope_theta = 1000000.0
  m.norm_eps = 1e-06
  m.tie_embeddings = False
  m.qk_norm = True
  m.n_experts = 128
  m.n_experts_per_token = 8
  m.router = "qwen3_moe"
  m.norm_topk_prob = True
  m.router_aux_loss_coef = 0.001
  return pod.pod_training(c, seq_len=4096)
