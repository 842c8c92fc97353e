"""The default run: a 4M-parameter Llama on the Python standard library, on a laptop CPU.

python train/main.py --config configs/tiny.py
"""

from configs import base


def get_config():
  c = base.get_config()
  c.workdir = "runs/tiny"
  c.model.vocab_size = 4096
  c.model.d_model = 256
  c.model.n_layers = 4
  c.model.n_heads = 4
  c.model.n_kv_heads = 2
  c.model.d_ff = 704
  c.model.max_seq_len = 1024
  c.data.seq_len = 256
  # ~1M tokens: about 3.5 minutes on 2 CPU cores, tokenizer and sampling included.
  c.train.steps = 250
  c.train.batch_size = 16
  c.train.lr = 3e-3
  c.train.warmup_steps = 25
  c.train.eval_every = 125
  c.checkpoint.every = 125
  return c
