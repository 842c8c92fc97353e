"""SmolLM2-135M's architecture (HuggingFaceTB), for pretraining from scratch or fine-tuning
weights imported with train/convert.py (set train.init_from to the converted workdir)."""

from configs import base


def get_config():
  c = base.get_config()
  c.workdir = "runs/smollm2_135m"
  m = c.model
  m.vocab_size = 49152
  m.d_model = 576
  m.n_layers = 30
  m.n_heads = 9
  m.n_kv_heads = 3
  m.head_dim = 64
  m.d_ff = 1536
  m.max_seq_len = 8192
  m.rope_theta = 100000.0
  m.norm_eps = 1e-5
  m.tie_embeddings = True
  m.dtype = "bfloat16"
  m.remat = "dots_no_batch"
  c.data.seq_len = 2048
  c.data.tokenizer_train_mb = 64.0
  c.train.batch_size = 64
  c.train.lr = 3e-3
  c.train.warmup_steps = 500
  c.train.steps = 20000
  c.train.eval_every = 1000
  c.checkpoint.every = 1000
  return c
