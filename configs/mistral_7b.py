"""Mistral-7B's architecture (v0.1: sliding-window attention over 4096 keys in every layer),
for pod runs and --dry_run:

python train/main.py --config configs/mistral_7b.py --dry_run --target v5p-128
"""

from configs import base, pod


def get_config():
  c = base.get_config()
  c.workdir = "runs/mistral_7b"
  m = c.model
  m.vocab_size = 32000
  m.d_model = 4096
  m.n_layers = 32
  m.n_heads = 32
  m.n_kv_heads = 8
  m.head_dim = 128
  m.d_ff = 14336
  m.max_seq_len = 32768
  m.rope_theta = 10000.0
  m.norm_eps = 1e-05
  m.tie_embeddings = False
  m.sliding_window = 4096
  return pod.pod_training(c, seq_len=8192)
