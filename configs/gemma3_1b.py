"""Gemma-3-1B's architecture (text): GeGLU, (1 + w) RMSNorms before and after attention and
MLP, embeddings scaled by sqrt(d), q/k norms, five local layers (window 512, RoPE base 10k)
per global one (RoPE base 1M), head_dim 256. For runs and --dry_run:

python train/main.py --config configs/gemma3_1b.py --dry_run --target v5e-16
"""

from configs import base, pod


def get_config():
  c = base.get_config()
  c.workdir = "runs/gemma3_1b"
  m = c.model
  m.vocab_size = 262144
  m.d_model = 1152
  m.n_layers = 26
  m.n_heads = 4
  m.n_kv_heads = 1
  m.head_dim = 256
  m.d_ff = 6912
  m.max_seq_len = 32768
  m.rope_theta = 1000000.0
  m.rope_local_theta = 10000.0
  m.norm_eps = 1e-06
  m.tie_embeddings = True
  m.qk_norm = True
  m.mlp_activation = "gelu_tanh"
  m.norm_plus_one = True
  m.post_norms = True
  m.embed_scale = True
  m.sliding_window = 512
  m.global_every = 6
  return pod.pod_training(c, seq_len=4096)
