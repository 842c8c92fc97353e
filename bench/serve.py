"""Serving throughput: the continuous-batching engine vs static batching. Prints JSON.

  python bench/serve.py --random_model tiny --num_requests 200
  python bench/serve.py --checkpoint runs/tiny --num_requests 300 --max_batch 32
  python bench/serve.py --checkpoint runs/tiny --serve --rate 1,2,4,8 --num_requests 64
  python bench/serve.py --url http://127.0.0.1:8000 --rate 2 --num_requests 100
  python bench/serve.py --random_model tiny --skip_static --prompt_lookup 3  # speculating

A seeded workload of mixed prompt and output lengths; half the prompts start with a shared
64-token "system prompt" (prefix caching). No EOS: each request generates exactly its
max_new_tokens, so both sides do the same work.

Offline (no --rate): every request arrives at t=0; the engine runs in this process.
Static batching takes the requests in arrival order, `max_batch` at a time, through the
contiguous-cache decode loop (infer/decode.py); a batch ends when its longest request does,
and all its requests finish then. Latency: from t=0 to a request's last token.
Neither side's compilation is timed: the engine compiles its step shapes first
(`Engine.warmup`), static batching runs the whole workload once untimed.

Load test (--rate R1,R2,...): requests arrive as a Poisson process at each offered rate
(bench/loadgen.py) and go over HTTP, streaming, to infer/serve.py: one already running
(--url), or one this command starts on a free port with the same engine flags (--serve,
which needs --checkpoint: the server needs a tokenizer). Prompts are token ids; requests are
greedy with `ignore_eos` and `logprobs: 0` (each chunk then names its tokens). Then, with a
model given and no --skip_static, static batching serves the same schedules in this process
on a simulated clock (loadgen.simulate_static): each batch takes up to `max_batch` of the
requests that have arrived and streams every --static_stream_every steps; its time is
measured, the idle waits between batches are skipped, and a batch of shapes not yet
compiled runs once untimed first. One JSON line per system and rate (throughput, TTFT, ITL,
e2e latency p50/p99, errors), then a summary with each system's saturation rate: the highest
rate whose p99 TTFT stays within --ttft_slo seconds, as every lower rate's. --plot FILE.png
draws throughput and p99 latency against the offered rate. Without a model (--url alone)
prompt ids are drawn below --vocab_size.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse  # noqa: E402
import asyncio  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from bench import loadgen  # noqa: E402
from bench.decode import PRESETS, random_model  # noqa: E402
from bench.loadgen import percentiles  # noqa: E402
from infer.decode import bucket, generate_with_stats, layout_for  # noqa: E402
from infer.engine import Engine, EngineConfig  # noqa: E402
from infer.sampling import SamplingParams  # noqa: E402
from model import fused, kv_cache  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

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


class StaticBatch:
  """loadgen.RunBatch for static batching: one streamed `generate_with_stats` call per batch
  over weights laid out once per layout. A batch whose (rows, prompt, new-token) buckets
  (infer/decode.py's shapes) are new runs once untimed first, so no compile is measured."""

  def __init__(self, cfg, params, cache_dtype=None, stream_every: int = 8):
    self.cfg, self.cache_dtype, self.stream_every = cfg, cache_dtype, stream_every
    self.params = {layout: fused.prepare(cfg, params, layout=layout)
                   for layout in {layout_for(1, False), layout_for(2, False)}}
    self.compiled = set()

  def _run(self, batch):
    t0 = time.perf_counter()
    chunks = [[] for _ in batch]
    generate_with_stats(
        self.cfg, self.params[layout_for(len(batch), False)], [p for p, _ in batch],
        max_new_tokens=[m for _, m in batch], sampling=GREEDY, cache_dtype=self.cache_dtype,
        stream=lambda row, toks: chunks[row].append((time.perf_counter() - t0, len(toks))),
        stream_every=self.stream_every)
    return time.perf_counter() - t0, chunks

  def __call__(self, batch):
    shape = (bucket(len(batch), 1), bucket(max(len(p) for p, _ in batch)),
             bucket(max(m for _, m in batch)))
    if shape not in self.compiled:
      self._run(batch)
      self.compiled.add(shape)
    return self._run(batch)


@contextlib.contextmanager
def served(args):
  """infer/serve.py on --checkpoint with this command's engine flags, on a free port, until
  the block ends; yields its URL. Its log goes to this command's stderr."""
  import httpx2
  import portpicker
  port = portpicker.pick_unused_port()
  cmd = [sys.executable, os.path.join(ROOT, "infer", "serve.py"), "--checkpoint",
         args.checkpoint, "--port", str(port), "--max_batch", str(args.max_batch),
         "--num_pages", str(args.num_pages), "--page_size", str(args.page_size),
         "--prefill_chunk", str(args.prefill_chunk), "--log_level", "warning"]
  if args.kv_cache_dtype:
    cmd += ["--kv_cache_dtype", args.kv_cache_dtype]
  if args.prompt_lookup:
    cmd += ["--prompt_lookup", str(args.prompt_lookup), "--num_draft", str(args.num_draft)]
  proc = subprocess.Popen(cmd, stdout=sys.stderr, stderr=sys.stderr)
  url = f"http://127.0.0.1:{port}"
  try:
    while True:  # it compiles every step shape before it listens
      if proc.poll() is not None:
        raise SystemExit(f"error: the server exited with {proc.returncode} before listening")
      with contextlib.suppress(httpx2.TransportError):
        if httpx2.get(url + "/health").status_code == 200:
          break
      time.sleep(0.5)
    yield url
  finally:
    if proc.poll() is None:
      proc.send_signal(signal.SIGTERM)
      proc.wait(timeout=120)


def load_test(args, cfg, params, requests, rates: list[float]) -> dict:
  """Prints one JSON line per system and rate; returns {system: [reports]}."""
  out = {}

  def emit(system: str, reports: list, r: dict):
    reports.append(r)
    print(json.dumps({"system": system} | r), flush=True)

  schedules = [loadgen.poisson_arrivals(len(requests), rate, args.seed) for rate in rates]
  with served(args) if args.serve else contextlib.nullcontext(args.url) as url:
    model = loadgen.served_model(url)
    asyncio.run(loadgen.run_load(url, model, requests[:1], [0.0]))  # untimed: warms the path
    out["engine"] = []
    for rate, arrivals in zip(rates, schedules):
      traces = asyncio.run(loadgen.run_load(url, model, requests, arrivals,
                                            args.max_concurrency))
      emit("engine", out["engine"], loadgen.report(traces, rate))
  if params is not None and not args.skip_static:
    out["static"] = []
    batches = StaticBatch(cfg, params, args.kv_cache_dtype, args.static_stream_every)
    for rate, arrivals in zip(rates, schedules):
      traces = loadgen.simulate_static(requests, arrivals, args.max_batch, batches)
      emit("static", out["static"], loadgen.report(traces, rate))
  return out


def parse_rates(text: str) -> list[float]:
  try:
    rates = [float(r) for r in text.split(",")]
  except ValueError:
    raise SystemExit(f"error: --rate {text!r}: expected numbers separated by commas") from None
  if not all(r > 0 for r in rates):
    raise SystemExit(f"error: --rate {text!r}: every rate must be > 0 requests/s")
  return sorted(rates)


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  src = ap.add_mutually_exclusive_group()
  src.add_argument("--checkpoint", help="a run directory")
  src.add_argument("--random_model", choices=sorted(PRESETS))
  ap.add_argument("--num_requests", type=int, default=200)
  ap.add_argument("--seed", type=int, default=0, help="the workload's and the arrivals'")
  ap.add_argument("--shared_prefix", type=int, default=64)
  ap.add_argument("--max_batch", type=int, default=16)
  ap.add_argument("--num_pages", type=int, default=1024)
  ap.add_argument("--page_size", type=int, default=16)
  ap.add_argument("--prefill_chunk", type=int, default=128)
  ap.add_argument("--prefill_rows", type=int, default=1, help="offline mode's engine only")
  ap.add_argument("--kv_cache_dtype", choices=kv_cache.CACHE_DTYPES, default=None,
                  help="both sides' KV cache dtype (default: the compute dtype)")
  ap.add_argument("--prompt_lookup", type=int, default=0, metavar="N",
                  help="engine speculation: drafts from the latest earlier match of each "
                  "request's last N-gram in its context (0: off)")
  ap.add_argument("--num_draft", type=int, default=4, metavar="K",
                  help="draft tokens per request and step with --prompt_lookup")
  ap.add_argument("--skip_static", action="store_true")
  load = ap.add_argument_group("load test")
  load.add_argument("--rate", help="offered rates, requests/s, comma-separated: a load test")
  server = load.add_mutually_exclusive_group()
  server.add_argument("--url", help="a running infer/serve.py, e.g. http://127.0.0.1:8000")
  server.add_argument("--serve", action="store_true",
                      help="start infer/serve.py on --checkpoint, on a free port")
  load.add_argument("--max_concurrency", type=int, default=0,
                    help="requests in flight at most (0: no limit)")
  load.add_argument("--ttft_slo", type=float, default=2.0,
                    help="p99 TTFT bound (s) that defines the saturation rate")
  load.add_argument("--static_stream_every", type=int, default=8,
                    help="static batching streams every N decode steps (generate's default)")
  load.add_argument("--vocab_size", type=int, default=256,
                    help="prompt ids are drawn below this without a model (--url alone)")
  load.add_argument("--plot", metavar="FILE.png", help="throughput and p99 latency vs rate")
  args = ap.parse_args()
  online = args.url or args.serve
  if bool(args.rate) != bool(online):
    ap.error("a load test needs --rate and one of --url or --serve")
  if args.serve and not args.checkpoint:
    ap.error("--serve needs --checkpoint (the server reads its tokenizer)")
  if not online and not (args.checkpoint or args.random_model):
    ap.error("one of --checkpoint or --random_model is required")
  if args.plot and not args.plot.endswith(".png"):
    ap.error(f"--plot {args.plot}: expected a .png file name")
  if args.prompt_lookup < 0:
    ap.error(f"--prompt_lookup must be >= 0 (0: off), got {args.prompt_lookup}")
  if args.num_draft < 1:
    ap.error(f"--num_draft must be >= 1, got {args.num_draft}")

  cfg = params = None
  if args.checkpoint:
    from infer.loaders import load_checkpoint
    m = load_checkpoint(args.checkpoint)
    cfg, params = m.cfg, m.params
  elif args.random_model:
    cfg, params, _ = random_model(args.random_model, 1024)
  vocab = cfg.vocab_size if cfg is not None else args.vocab_size
  requests = workload(args.num_requests, vocab, args.seed, args.shared_prefix)
  head = {"device": jax.devices()[0].device_kind,
          "model": args.checkpoint or args.random_model or args.url,
          "kv_cache_dtype": args.kv_cache_dtype, "num_requests": len(requests),
          "prompt_tokens": sum(len(p) for p, _ in requests),
          "requested_tokens": sum(m for _, m in requests)}
  if online:
    rates = parse_rates(args.rate)
    reports = load_test(args, cfg, params, requests, rates)
    print(json.dumps({"summary": head | {
        "max_batch": args.max_batch, "seed": args.seed, "ttft_slo_s": args.ttft_slo,
        "saturation_rate": {system: loadgen.saturation_rate(rs, args.ttft_slo)
                            for system, rs in reports.items()}}}))
    if args.plot:
      loadgen.plot(args.plot, reports, f"{head['model']}, {len(requests)} requests per rate, "
                   f"max_batch {args.max_batch}, {head['device']}")
    return

  config = EngineConfig(num_pages=args.num_pages, page_size=args.page_size,
                        max_batch=args.max_batch, prefill_chunk=args.prefill_chunk,
                        prefill_rows=args.prefill_rows, cache_dtype=args.kv_cache_dtype,
                        prompt_lookup=args.prompt_lookup, num_draft=args.num_draft)
  engine, engine_out = run_engine(cfg, params, requests, config)  # compiles first (warmup)
  out = head | {"engine": engine}
  if not args.skip_static:
    run_static(cfg, params, requests, args.max_batch, args.kv_cache_dtype)  # compiles
    static, static_out = run_static(cfg, params, requests, args.max_batch, args.kv_cache_dtype)
    out["static"] = static
    out["throughput_speedup"] = engine["tokens_per_s"] / static["tokens_per_s"]
    out["same_tokens"] = float(np.mean([a == b for a, b in zip(engine_out, static_out)]))
  print(json.dumps(out, indent=1))


if __name__ == "__main__":
  main()
