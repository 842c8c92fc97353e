"""Llama-3-8B's architecture, for pod runs and for checking a mesh with --dry_run:

python train/main.py --config configs/llama3_8b.py --dry_run \
    --config.mesh.data=1 --config.mesh.fsdp=64 --config.mesh.tensor=4
"""

from configs import base, pod


def get_config():
  c = base.get_config()
  c.workdir = "runs/llama3_8b"
  m = c.model
  m.vocab_size = 128256
  m.d_model = 4096
  m.n_layers = 32
  m.n_heads = 32
  m.n_kv_heads = 8
  m.head_dim = 128
  m.d_ff = 14336
  m.max_seq_len = 8192
  m.rope_theta = 500000.0
  m.norm_eps = 1e-5
  m.tie_embeddings = False
  return pod.pod_training(c, seq_len=8192)
