"""Mixtral-8x7B's architecture: 8 SwiGLU experts per layer, 2 per token (softmax over the
top-2 router logits). For pod runs and --dry_run:

python train/main.py --config configs/mixtral_8x7b.py --dry_run --target v5p-256
"""

from configs import base, pod


def get_config():
  c = base.get_config()
  c.workdir = "runs/mixtral_8x7b"
  m = c.model
  m.vocab_size = 32000
  m.d_model = 4096
  m.n_layers = 32
  m.n_heads = 32
  m.n_kv_heads = 8
  m.head_dim = 128
  m.d_ff = 14336
  m.max_seq_len = 32768
  m.rope_theta = 1000000.0
  m.norm_eps = 1e-05
  m.tie_embeddings = False
  m.n_experts = 8
  m.n_experts_per_token = 2
  m.router = "mixtral"
  m.router_aux_loss_coef = 0.01
  return pod.pod_training(c, seq_len=4096)
