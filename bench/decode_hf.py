"""The yardstick for bench/decode.py: HF transformers' greedy `generate` on the same model and
prompts (f32, CPU). Prints one JSON object.

  python train/convert.py --src gguf:SmolLM2-135M-Instruct.Q4_1.gguf --dst hf:/tmp/smol_hf
  python bench/decode_hf.py --hf /tmp/smol_hf --batch 1 --prompt_len 128 --new_tokens 128

Decode speed is (generate N tokens - generate 1 token) / (N - 1): the second run times the
prefill alone, so the difference is the decode loop.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from bench.decode import stdlib_prompts  # noqa: E402


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--hf", required=True, help="a Hugging Face Llama directory")
  ap.add_argument("--batch", type=int, default=1)
  ap.add_argument("--prompt_len", type=int, default=128)
  ap.add_argument("--new_tokens", type=int, default=128)
  ap.add_argument("--threads", type=int, default=2)
  ap.add_argument("--repeats", type=int, default=2)
  args = ap.parse_args()

  from tokenizers import Tokenizer
  from transformers import LlamaForCausalLM
  torch.set_num_threads(args.threads)
  model = LlamaForCausalLM.from_pretrained(args.hf, torch_dtype=torch.float32).eval()
  tokenizer = Tokenizer.from_file(os.path.join(args.hf, "tokenizer.json"))
  prompts = stdlib_prompts(tokenizer, args.prompt_len, args.batch)
  ids = torch.tensor(prompts)  # equal lengths: no padding, no attention mask needed

  def timed(n):
    best = float("inf")
    for _ in range(args.repeats + 1):  # the first run warms up
      t0 = time.perf_counter()
      with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                             min_new_tokens=n, do_sample=False, pad_token_id=0)
      best = min(best, time.perf_counter() - t0)
    return best, out

  prefill_s, _ = timed(1)
  total_s, out = timed(args.new_tokens)
  decode_s = total_s - prefill_s
  steps = args.new_tokens - 1
  print(json.dumps({
      "impl": f"transformers {__import__('transformers').__version__} "
              f"torch {torch.__version__}", "threads": args.threads, "batch": args.batch,
      "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
      "prefill_tokens_per_s": args.batch * args.prompt_len / prefill_s,
      "decode_tokens_per_s": args.batch * steps / decode_s,
      "ms_per_token": 1e3 * decode_s / steps,
      "first_tokens": out[0, args.prompt_len:args.prompt_len + 16].tolist(),
  }, indent=1))


if __name__ == "__main__":
  main()
