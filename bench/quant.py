"""Weight quantization, side by side: held-out perplexity, weight bytes and decode speed of one
run directory and its int8 / int4 (RTN, AWQ, GPTQ) / NF4 conversions. Prints JSON.

  python bench/quant.py --src runs/tiny --group 64
  python bench/quant.py --src runs/smollm2 --group 64 --max_batches 8 --batch_size 8 --seq_len 512

Each variant is written by `train/convert.py --quantize ...` into `--out/<name>` (kept, so
`infer/generate.py --checkpoint` can read it), evaluated with `train/eval.py`'s `evaluate` on
the source's validation split (GPTQ and AWQ calibrate on the training split, so the two never
overlap), and decoded with `bench/decode.py` (batch 1, greedy), each in its own process so
compile caches and memory do not carry over. `ppl_increase` is the perplexity's relative
increase over the source's.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import subprocess  # noqa: E402

import jax  # noqa: E402

from infer import workdir as run_dir  # noqa: E402
from model import quant  # noqa: E402
from train.eval import evaluate  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def variants(group: int) -> dict[str, list[str]]:
  """name -> train/convert.py quantization flags ([] is the source as it is)."""
  g = str(group)
  return {
      "source": [],
      "int8": ["--quantize", "int8", "--group", "0"],
      f"int4_g{g}_rtn": ["--quantize", "int4", "--group", g],
      f"int4_g{g}_awq": ["--quantize", "int4", "--group", g, "--method", "awq"],
      f"int4_g{g}_gptq": ["--quantize", "int4", "--group", g, "--method", "gptq"],
      f"nf4_g{g}": ["--quantize", "nf4", "--group", g, "--double_quant", "true"],
  }


def _python(script: str, *args: str) -> str:
  env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
  done = subprocess.run([sys.executable, os.path.join(ROOT, script), *args], env=env,
                        capture_output=True, text=True)
  if done.returncode:
    raise RuntimeError(f"{script} {' '.join(args)} failed:\n{done.stderr[-3000:]}")
  return done.stdout


def weight_bytes(workdir: str) -> tuple[int, int]:
  """(bytes of every parameter as stored, bytes of the block matmuls alone)."""
  cfg = run_dir.load_model_config(workdir)
  params = run_dir.load_params(workdir, cfg)
  nbytes = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))
  matmuls = [w for path, w in jax.tree_util.tree_leaves_with_path(
      params, is_leaf=quant.is_quantized)
             if any(getattr(k, "key", None) in quant.MATMUL_AXES for k in path)]
  return nbytes(params), nbytes(matmuls)


def main() -> int:
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--src", required=True, help="a (dense) run directory")
  ap.add_argument("--out", default="", help="where the variants go (default: SRC-quant)")
  ap.add_argument("--group", type=int, default=128, help="int4 / nf4 group size")
  ap.add_argument("--only", default="", help="comma-separated variant names (default: all)")
  ap.add_argument("--calib_tokens", type=int, default=16384)
  ap.add_argument("--max_batches", type=int, default=0, help="eval batches (0: all)")
  ap.add_argument("--batch_size", type=int, default=0, help="eval rows (default: the run's)")
  ap.add_argument("--seq_len", type=int, default=0, help="eval row length (default: the run's)")
  ap.add_argument("--new_tokens", type=int, default=64, help="decode tokens (0: skip decode)")
  args = ap.parse_args()

  out_dir = args.out or args.src.rstrip("/") + "-quant"
  table = variants(args.group)
  names = args.only.split(",") if args.only else list(table)
  unknown = sorted(set(names) - set(table))
  if unknown:
    print(f"quant: error: --only {unknown}: not among {list(table)}", file=sys.stderr)
    return 2
  cpu = platform.processor()
  try:
    cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo")
               if l.startswith("model name"))
  except (OSError, StopIteration):
    pass
  rows = []
  for name in names:
    workdir = args.src
    if table[name]:
      workdir = os.path.join(out_dir, name)
      if not os.path.exists(workdir):
        flags = list(table[name])
        if "--method" in flags:
          flags += ["--calib_tokens", str(args.calib_tokens)]
        _python("train/convert.py", "--src", f"orbax:{args.src}", "--dst", f"orbax:{workdir}",
                *flags)
    ev = evaluate(workdir, batch_size=args.batch_size, seq_len=args.seq_len,
                  max_batches=args.max_batches)
    total, matmuls = weight_bytes(workdir)
    row = {"variant": name, "loss": ev["loss"], "perplexity": ev["perplexity"],
           "bits_per_byte": ev["bits_per_byte"], "eval_tokens": ev["tokens"],
           "weight_bytes": total, "matmul_bytes": matmuls}
    if args.new_tokens:
      dec = _python("bench/decode.py", "--checkpoint", workdir, "--new_tokens",
                    str(args.new_tokens), "--prompt_len", "64")
      dec = json.loads(dec[dec.index("{"):])
      row["decode_tokens_per_s"] = dec["decode_tokens_per_s"]
      row["weight_bytes_per_step"] = dec["weight_bytes_per_step"]
    rows.append(row)
    print(json.dumps(row), file=sys.stderr, flush=True)
  base = next((r["perplexity"] for r in rows if r["variant"] == "source"), None)
  for r in rows:
    if base is not None:
      r["ppl_increase"] = r["perplexity"] / base - 1
  print(json.dumps({"src": args.src, "group": args.group, "cpu": cpu, "rows": rows}, indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(main())
