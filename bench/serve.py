"""Serving throughput: the continuous-batching engine vs static batching. Prints JSON.

  python bench/serve.py --random_model tiny --num_requests 200
  python bench/serve.py --checkpoint runs/tiny --num_requests 300 --max_batch 32
  python bench/serve.py --random_model tiny --skip_static --prompt_lookup 3  # speculating

A seeded offline workload (every request arrives at t=0) of mixed prompt and output lengths;
half the prompts start with a shared 64-token "system prompt" (prefix caching). No EOS: each
request generates exactly its max_new_tokens, so both sides do the same work.
Static batching takes the requests in arrival order, `max_batch` at a time, through the
contiguous-cache decode loop (infer/decode.py); a batch ends when its longest request does,
and all its requests finish then. Latency: from t=0 to a request's last token.
Neither side's compilation is timed: the engine compiles its step shapes first
(`Engine.warmup`), static batching runs the whole workload once untimed.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from bench.decode import PRESETS, random_model  # noqa: E402
from infer.decode import generate_with_stats  # noqa: E402
from infer.engine import Engine, EngineConfig  # noqa: E402
from infer.sampling import SamplingParams  # noqa: E402
from model import kv_cache  # noqa: E402

GREEDY = SamplingParams(temperature=0)


def workload(n: int, vocab: int, seed: int, shared_prefix: int):
  """(prompt ids, max_new_tokens) pairs: 60% short, 30% medium, 10% long prompts; outputs
  from 8 to 256 tokens, skewed short (as chat traffic is)."""
  rng = np.random.default_rng(seed)
  system = rng.integers(1, vocab, shared_prefix).tolist()
  out = []
  for _ in range(n):
    kind = rng.choice(3, p=[0.6, 0.3, 0.1])
    length = int(rng.integers(*[(8, 64), (64, 256), (256, 512)][kind]))
    prompt = rng.integers(1, vocab, length).tolist()
    if shared_prefix and rng.random() < 0.5:
      prompt = system + prompt
    out.append((prompt, int(np.clip(rng.geometric(1 / 64), 8, 256))))
  return out


def percentiles(xs):
  return {"p50": float(np.percentile(xs, 50)), "p99": float(np.percentile(xs, 99))}


def run_engine(cfg, params, requests, config: EngineConfig):
  engine = Engine(cfg, params, config)
  compile_s = engine.warmup()
  t0 = time.perf_counter()
  ids = [engine.add_request(p, max_new_tokens=m, sampling=GREEDY, arrival=t0)
         for p, m in requests]
  done = engine.run()
  wall = time.perf_counter() - t0
  tokens = sum(len(done[i].tokens) for i in ids)
  return {
      "wall_s": wall, "generated_tokens": tokens, "tokens_per_s": tokens / wall,
      "latency_s": percentiles([done[i].latency for i in ids]),
      "time_to_first_token_s": percentiles([done[i].first_token_time - t0 for i in ids]),
      "steps": engine.num_steps, "steps_per_s": engine.num_steps / wall,
      "preemptions": engine.num_preemptions,
      "drafted_tokens": engine.num_drafted, "accepted_tokens": engine.num_accepted,
      "warmup_compile_s": compile_s,
      "peak_pages_used": engine.allocator.peak_used,
      "pages": engine.allocator.capacity, "page_size": config.page_size,
      "peak_kv_tokens": engine.allocator.peak_used * config.page_size,
      "page_waste": engine.page_waste,  # slots of pages in use holding no token, step average
      "prefix_cached_tokens": sum(engine.requests[i].cached_tokens for i in ids),
  }, [done[i].tokens for i in ids]


def run_static(cfg, params, requests, batch: int, cache_dtype=None):
  t0 = time.perf_counter()
  latencies, outputs, kv_tokens = [], [], 0
  for i in range(0, len(requests), batch):
    group = requests[i:i + batch]
    g = generate_with_stats(cfg, params, [p for p, _ in group],
                            max_new_tokens=[m for _, m in group], sampling=GREEDY,
                            cache_dtype=cache_dtype)
    outputs += g.tokens
    latencies += [time.perf_counter() - t0] * len(group)
    t = max(len(p) for p, _ in group)
    kv_tokens = max(kv_tokens, len(group) * (t + max(m for _, m in group)))
  wall = time.perf_counter() - t0
  tokens = sum(len(o) for o in outputs)
  return {"wall_s": wall, "generated_tokens": tokens, "tokens_per_s": tokens / wall,
          "latency_s": percentiles(latencies), "peak_kv_tokens": kv_tokens}, outputs


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  src = ap.add_mutually_exclusive_group(required=True)
  src.add_argument("--checkpoint", help="a run directory")
  src.add_argument("--random_model", choices=sorted(PRESETS))
  ap.add_argument("--num_requests", type=int, default=200)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--shared_prefix", type=int, default=64)
  ap.add_argument("--max_batch", type=int, default=16)
  ap.add_argument("--num_pages", type=int, default=1024)
  ap.add_argument("--page_size", type=int, default=16)
  ap.add_argument("--prefill_chunk", type=int, default=128)
  ap.add_argument("--prefill_rows", type=int, default=1)
  ap.add_argument("--kv_cache_dtype", choices=kv_cache.CACHE_DTYPES, default=None,
                  help="both sides' KV cache dtype (default: the compute dtype)")
  ap.add_argument("--prompt_lookup", type=int, default=0, metavar="N",
                  help="engine speculation: drafts from the latest earlier match of each "
                  "request's last N-gram in its context (0: off)")
  ap.add_argument("--num_draft", type=int, default=4, metavar="K",
                  help="draft tokens per request and step with --prompt_lookup")
  ap.add_argument("--skip_static", action="store_true")
  args = ap.parse_args()
  if args.prompt_lookup < 0:
    ap.error(f"--prompt_lookup must be >= 0 (0: off), got {args.prompt_lookup}")
  if args.num_draft < 1:
    ap.error(f"--num_draft must be >= 1, got {args.num_draft}")

  if args.checkpoint:
    from infer.loaders import load_checkpoint
    m = load_checkpoint(args.checkpoint)
    cfg, params = m.cfg, m.params
  else:
    cfg, params, _ = random_model(args.random_model, 1024)
  requests = workload(args.num_requests, cfg.vocab_size, args.seed, args.shared_prefix)
  config = EngineConfig(num_pages=args.num_pages, page_size=args.page_size,
                        max_batch=args.max_batch, prefill_chunk=args.prefill_chunk,
                        prefill_rows=args.prefill_rows, cache_dtype=args.kv_cache_dtype,
                        prompt_lookup=args.prompt_lookup, num_draft=args.num_draft)
  engine, engine_out = run_engine(cfg, params, requests, config)  # compiles first (warmup)
  out = {"device": jax.devices()[0].device_kind, "model": args.checkpoint or args.random_model,
         "kv_cache_dtype": args.kv_cache_dtype,
         "num_requests": len(requests),
         "prompt_tokens": sum(len(p) for p, _ in requests),
         "requested_tokens": sum(m for _, m in requests),
         "engine": engine}
  if not args.skip_static:
    run_static(cfg, params, requests, args.max_batch, args.kv_cache_dtype)  # compiles
    static, static_out = run_static(cfg, params, requests, args.max_batch, args.kv_cache_dtype)
    out["static"] = static
    out["throughput_speedup"] = engine["tokens_per_s"] / static["tokens_per_s"]
    out["same_tokens"] = float(np.mean([a == b for a, b in zip(engine_out, static_out)]))
  print(json.dumps(out, indent=1))


if __name__ == "__main__":
  main()
