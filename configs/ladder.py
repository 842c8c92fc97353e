"""Shared settings of the post-training ladder configs (configs/arith_*.py, smollm2_*.py).

The rungs, each one run of train/main.py:
  arith_sft     SFT from scratch on generated word problems (writes runs/arith_data first)
  arith_reward  reward model from the SFT run       (needs runs/arith_sft)
  arith_dpo     DPO from the SFT run                (needs runs/arith_sft)
  arith_ppo     PPO from the SFT run, reward fn     (needs runs/arith_sft)
  arith_grpo    GRPO from the SFT run, reward fn    (needs runs/arith_sft)
"""

from configs import base

DATA = "runs/arith_data"
KIND = {"sft": "sft", "reward": "pairs", "dpo": "pairs", "ppo": "prompts", "grpo": "prompts"}
REWARD_FN = "train.examples.arithmetic:reward"


def data(c, kind: str, directory: str = DATA) -> None:
  """Train and held-out files of the arithmetic example, written on first use."""
  c.data.corpus = f"{directory}/{kind}_train.jsonl"
  c.data.val_corpus = f"{directory}/{kind}_val.jsonl"
  c.data.make = "train.examples.arithmetic:make"
  c.rl.reward_fn = REWARD_FN
  c.rl.eval_prompts = f"{directory}/prompts_val.jsonl"  # held-out accuracy of greedy answers
  c.rl.eval_samples = 256
  c.rl.max_new_tokens = 16
  c.sample.prompt = "Mia has 17 coins. Mia gets 8 more. How many coins now?"
  c.sample.max_new_tokens = 16
  c.sample.temperature = 0.0


def tiny(task: str):
  """A 0.1M-parameter model on the arithmetic example: each rung takes minutes on a CPU."""
  c = base.get_config()
  c.task = task
  c.workdir = f"runs/arith_{task}"
  c.model.update(vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128,
                 max_seq_len=128)
  data(c, KIND[task])
  c.data.tokenizer = f"{DATA}/tokenizer.json"
  c.data.seq_len = 64
  c.train.batch_size = 32
  c.train.warmup_steps = 10
  c.train.eval_every = 50
  c.train.eval_batches = 8
  c.checkpoint.every = 100
  c.model.value_head = task == "reward"
  if task != "sft":  # every later rung starts from the SFT run
    c.train.init_from = "runs/arith_sft"  # make it: python train/main.py --config configs/arith_sft.py
    c.train.decay = "constant"
    c.train.weight_decay = 0.0
  return c


def smollm2(task: str):
  """SmolLM2-135M-Instruct (converted: see README, "Pretrained weights") on the same example,
  with its chat template. A few steps run on CPU; the defaults are for an accelerator."""
  from configs import smollm2_135m
  c = smollm2_135m.get_config()
  c.task = task
  c.workdir = f"runs/smollm2_{task}"
  c.model.remat = "none"
  data(c, KIND[task])
  c.data.tokenizer = ""  # the converted model's, through train.init_from
  c.data.seq_len = 128
  c.train.batch_size = 16
  c.train.lr = 1e-5
  c.train.warmup_steps = 10
  c.train.steps = 200
  c.train.eval_every = 50
  c.train.eval_batches = 4
  c.rl.eval_samples = 64
  c.checkpoint.every = 100
  c.model.value_head = task == "reward"
  # Convert once: python train/convert.py --src gguf:<SmolLM2 .gguf> --dst orbax:runs/smollm2_135m_instruct
  c.train.init_from = "runs/smollm2_135m_instruct"
  if task in ("reward", "dpo", "ppo", "grpo"):
    c.train.init_from = "runs/smollm2_sft"  # make it: python train/main.py --config configs/smollm2_sft.py
  return c
