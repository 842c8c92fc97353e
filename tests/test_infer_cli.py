"""infer/generate.py on a tiny run directory written the way training writes one."""

import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from infer.decode import generate
from infer.sampling import SamplingParams
from model import ModelConfig, Transformer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXTS = ["def add(a, b):\n    return a + b\n", "the cat sat on the mat", "hello world " * 3]


def _tokenizer():
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  tok = Tokenizer(models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Metaspace()
  tok.decoder = decoders.Metaspace()
  tok.train_from_iterator(TEXTS * 4, trainers.BpeTrainer(
      vocab_size=80, special_tokens=["<|endoftext|>", "<unk>"], show_progress=False))
  return tok


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  import orbax.checkpoint as ocp
  path = tmp_path_factory.mktemp("run")
  cfg = ModelConfig(vocab_size=96, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                    max_seq_len=64, init_std=0.3)
  tokens = jnp.zeros((1, 1), jnp.int32)
  params = nn.unbox(jax.jit(lambda k: Transformer(cfg).init(k, tokens, tokens)["params"])(
      jax.random.PRNGKey(0)))
  tok = _tokenizer()
  assert tok.get_vocab_size() <= cfg.vocab_size
  tok.save(str(path / "tokenizer.json"))
  fields = {f: getattr(cfg, f) for f in cfg.__dataclass_fields__}
  (path / "config.json").write_text(json.dumps({"model": fields}))
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(str(path / "checkpoints" / "0" / "params"), params)
  return str(path), cfg, params, tok


def test_json_lines_from_the_script(workdir):
  path, cfg, params, tok = workdir
  prompts = ["the cat", "def add(a, b):"]
  cmd = [sys.executable, "infer/generate.py", "--checkpoint", path, "--json",
         "--temperature", "0", "--max_new_tokens", "6"]
  for p in prompts:
    cmd += ["--prompt", p]
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
  assert res.returncode == 0, res.stderr
  lines = [json.loads(line) for line in res.stdout.splitlines()]
  assert [line["prompt"] for line in lines] == prompts
  eos = tok.token_to_id("<|endoftext|>")
  want = generate(cfg, params, [[eos] + tok.encode(p).ids for p in prompts], max_new_tokens=6,
                  sampling=SamplingParams(temperature=0), eos_ids=(eos,))
  for line, ids in zip(lines, want):
    assert line["token_ids"] == ids
    assert line["text"] == tok.decode(ids, skip_special_tokens=True)
    assert line["tokens_per_s"] > 0 and set(line["timings"]) >= {"prefill_s", "decode_s"}


def test_streaming_prints_the_text_and_speculation_reports(workdir, capsys):
  from infer.generate import main
  path, cfg, params, tok = workdir
  assert main(["--checkpoint", path, "--prompt", "hello world hello world", "--temperature",
               "0", "--max_new_tokens", "6", "--prompt_lookup", "2"]) == 0
  out, err = capsys.readouterr()
  eos = tok.token_to_id("<|endoftext|>")
  ids = generate(cfg, params, [[eos] + tok.encode("hello world hello world").ids],
                 max_new_tokens=6, sampling=SamplingParams(temperature=0), eos_ids=(eos,))[0]
  assert out.startswith("hello world hello world")
  assert out.rstrip("\n").endswith(tok.decode(ids, skip_special_tokens=True))
  assert "tokens/s" in err and "acceptance" in err


def test_clear_errors(workdir, capsys):
  from infer.generate import main
  path = workdir[0]
  assert main(["--checkpoint", path, "--prompt", "the cat " * 40, "--max_new_tokens", "8"]) == 2
  assert "exceeds the model's context" in capsys.readouterr().err
  assert main(["--checkpoint", path, "--prompt", "hi", "--chat"]) == 2
  assert "no chat template" in capsys.readouterr().err
  assert main(["--checkpoint", path]) == 2
  assert "no prompt" in capsys.readouterr().err
