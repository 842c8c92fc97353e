"""train/eval.py against a direct computation on the same text."""

import json
import math
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base
from model import ModelConfig, Transformer
from train.checkpoint import Checkpointer
from train.eval import evaluate, token_bytes
from train.tokenizer import EOS, train_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = "def add(a, b):\n    return a + b  # café\n"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  wd = tmp_path_factory.mktemp("run")
  cfg = base.get_config()
  cfg.model.update(vocab_size=300, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                   max_seq_len=128)
  cfg.data.seq_len = 64
  cfg.train.batch_size = 8
  (wd / "config.json").write_text(cfg.to_json())
  tokenizer = train_tokenizer([DOC * 3, "import os\nprint(os.sep)\n"], 300)
  tokenizer.save(str(wd / "tokenizer.json"))
  model_cfg = ModelConfig.from_config(cfg.model)
  tokens = jnp.zeros((1, 4), jnp.int32)
  params = nn.unbox(Transformer(model_cfg).init(jax.random.PRNGKey(1), tokens, tokens))["params"]
  ckpt = Checkpointer(str(wd))
  ckpt.save_params(0, params)
  ckpt.close()
  return wd, model_cfg, params, tokenizer


def test_eval_equals_a_direct_forward(workdir, tmp_path):
  wd, model_cfg, params, tokenizer = workdir
  (tmp_path / "doc.txt").write_text(DOC)
  result = evaluate(str(wd), data=str(tmp_path / "*.txt"))
  eos = tokenizer.token_to_id(EOS)
  ids = [eos] + tokenizer.encode(DOC).ids + [eos]
  x = jnp.asarray([ids[:-1]])
  logits, _ = Transformer(model_cfg).apply({"params": params}, x, jnp.arange(x.shape[1])[None])
  logp = jax.nn.log_softmax(np.asarray(logits[0], np.float64))
  nll = -sum(logp[i, t] for i, t in enumerate(ids[1:]))
  assert result["tokens"] == len(ids) - 1
  assert result["loss"] == pytest.approx(nll / (len(ids) - 1), rel=1e-5)
  assert result["perplexity"] == pytest.approx(math.exp(nll / (len(ids) - 1)), rel=1e-5)
  # The closing EOS stands for no text: bytes are the document's own UTF-8 bytes.
  assert result["bytes"] == len(DOC.encode("utf-8"))
  assert result["bits_per_byte"] == pytest.approx(nll / math.log(2) / len(DOC.encode()), rel=1e-5)


def test_token_bytes_sum_to_the_text(workdir):
  tokenizer = workdir[3]
  text = "naïve = 'ünïcode'\n\tx = 1  # 🙂\n"
  assert token_bytes(tokenizer)[tokenizer.encode(text).ids].sum() == len(text.encode("utf-8"))


def test_cli_default_split_prints_json(workdir):
  wd = workdir[0]
  result = subprocess.run([sys.executable, os.path.join(ROOT, "train", "eval.py"),
                           "--checkpoint", str(wd), "--max_batches", "2"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
  assert result.returncode == 0, result.stderr[-2000:]
  out = json.loads(result.stdout.strip().splitlines()[-1])
  assert out["batches"] == 2 and out["tokens"] > 0 and out["bits_per_byte"] > 0
