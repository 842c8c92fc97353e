"""Training settings shared by the pod-scale architecture configs (llama3_8b.py,
mistral_7b.py, ...): bf16 compute, full rematerialisation, FSDP over every device."""


def pod_training(c, seq_len: int):
  """Sets c's training keys for a pod run at `seq_len` tokens per row; returns c."""
  c.model.dtype = "bfloat16"
  c.model.remat = "full"
  c.data.seq_len = seq_len
  c.train.batch_size = 256
  c.train.lr = 3e-4
  c.train.warmup_steps = 2000
  c.train.steps = 100000
  c.train.min_lr_ratio = 0.1
  c.train.eval_every = 1000
  c.checkpoint.every = 1000
  c.mesh.data = 1
  c.mesh.fsdp = -1
  c.mesh.tensor = 1
  return c
