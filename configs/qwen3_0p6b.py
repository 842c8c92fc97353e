"""Qwen3-0.6B's architecture (RMSNorm on each head of q and k, tied embeddings), for runs
and --dry_run:

python train/main.py --config configs/qwen3_0p6b.py --dry_run --target v5e-16
"""

from configs import base, pod


def get_config():
  c = base.get_config()
  c.workdir = "runs/qwen3_0p6b"
  m = c.model
  m.vocab_size = 151936
  m.d_model = 1024
  m.n_layers = 28
  m.n_heads = 16
  m.n_kv_heads = 8
  m.head_dim = 128
  m.d_ff = 3072
  m.max_seq_len = 40960
  m.rope_theta = 1000000.0
  m.norm_eps = 1e-06
  m.tie_embeddings = True
  m.qk_norm = True
  return pod.pod_training(c, seq_len=4096)
