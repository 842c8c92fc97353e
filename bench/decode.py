"""Decode speed: prefill and per-token decode throughput, optionally speculative. Prints JSON.

  python bench/decode.py --random_model tiny --batch 1 --prompt_len 128 --new_tokens 128
  python bench/decode.py --checkpoint runs/tiny --prompt_lookup 3 --num_draft_tokens 4
  python bench/decode.py --random_model small --draft_random tiny --num_draft_tokens 4
  python bench/decode.py --random_model tiny --stream   # cost of streaming every N steps
  python bench/decode.py --gguf SmolLM2-135M-Instruct.Q4_1.gguf --dtype bfloat16
  python bench/decode.py --gguf SmolLM2-135M-Instruct.Q4_1.gguf --draft_layers 8

Every configuration runs once to compile, then `--repeats` times; the best run counts.
With a tokenizer the prompts are real code: the first `--prompt_len` tokens of Python
standard-library files (`--prompts stdlib`, one file per row), or a function repeated with
small changes (`--prompts repeat`, the easy case for prompt lookup). `speedup` compares
speculative with plain decode tokens/s, measured in the same process.

Decoding one token reads every weight once (the KV cache is small next to them at these
lengths), so `weight_bytes_per_step / ms_per_token` is the achieved read bandwidth; compare
it with `--measure_bandwidth`, a streaming read of a buffer much larger than the caches.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import sysconfig  # noqa: E402
import time  # noqa: E402

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from infer import speculative  # noqa: E402
from infer.decode import generate_with_stats, layout_for  # noqa: E402
from infer.sampling import SamplingParams  # noqa: E402
from model import ModelConfig, Transformer, fused, kv_cache, quant  # noqa: E402

PRESETS = {  # --random_model shapes
    "test": dict(vocab_size=128, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128),
    "tiny": dict(vocab_size=4096, d_model=256, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=704),
    "small": dict(vocab_size=4096, d_model=512, n_layers=8, n_heads=8, n_kv_heads=4, d_ff=1408),
    "smollm2_135m": dict(vocab_size=49152, d_model=576, n_layers=30, n_heads=9, n_kv_heads=3,
                         d_ff=1536),
}

CODE = '''def parse_{0}(line):
    fields = line.strip().split(",")
    if len(fields) != {1}:
        raise ValueError("bad {0} line: " + line)
    return {{"name": fields[0], "value": int(fields[1])}}

'''


def random_model(name: str, max_seq_len: int, seed: int = 0):
  cfg = ModelConfig(**PRESETS[name], max_seq_len=max_seq_len)
  tokens = jnp.zeros((1, 1), jnp.int32)
  init = jax.jit(lambda key: Transformer(cfg).init(key, tokens, tokens)["params"])
  return cfg, nn.unbox(init(jax.random.PRNGKey(seed))), None


def code_prompt(tokenizer, vocab: int, length: int, seed: int) -> list[int]:
  """`length` tokens of repetitive code: real text through the tokenizer if there is one,
  else random snippets of ids repeated with small changes."""
  rng = np.random.default_rng(seed)
  if tokenizer is not None:
    ids, i = [], 0
    while len(ids) < length:
      ids += tokenizer.encode(CODE.format(["user", "order", "item", "row"][i % 4], 2 + i % 3)).ids
      i += 1
    return ids[:length]
  snippet = rng.integers(1, vocab, 24)
  ids = []
  while len(ids) < length:
    s = snippet.copy()
    s[rng.integers(len(s))] = rng.integers(1, vocab)
    ids += s.tolist()
  return ids[:length]


STDLIB_FILES = ("functools.py", "argparse.py", "dataclasses.py", "textwrap.py", "json/decoder.py",
                "collections/__init__.py", "inspect.py", "typing.py")


def stdlib_prompts(tokenizer, length: int, n: int) -> list[list[int]]:
  """n prompts of `length` tokens of real Python: row i reads STDLIB_FILES[i % 8], from token
  (i // 8) * length on, so a batch of 32 has 32 different prompts."""
  root = sysconfig.get_paths()["stdlib"]
  texts = {}
  prompts = []
  for i in range(n):
    name = STDLIB_FILES[i % len(STDLIB_FILES)]
    if name not in texts:
      with open(os.path.join(root, name)) as f:
        texts[name] = tokenizer.encode(f.read()).ids
    start = (i // len(STDLIB_FILES)) * length
    prompts.append(texts[name][start:start + length])
  return prompts


def measure_bandwidth(gib: float = 1.0) -> float:
  """GB/s of a streaming read (a jitted sum over a buffer much larger than the caches): the
  bound a decode step that reads every weight once can approach."""
  x = jnp.ones((int(gib * (1 << 28)),), jnp.float32)
  f = jax.jit(jnp.sum)
  f(x).block_until_ready()
  best = float("inf")
  for _ in range(10):
    t0 = time.perf_counter()
    f(x).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return x.nbytes / best / 1e9


def run(cfg, params, prompts, args, draft=None, stream=None, stream_every=8):
  kw = dict(max_new_tokens=args.new_tokens, sampling=SamplingParams(temperature=args.temperature),
            draft=draft, num_draft_tokens=args.num_draft_tokens, seed=0, stream=stream,
            stream_every=stream_every, cache_dtype=args.kv_cache_dtype)
  first = generate_with_stats(cfg, params, prompts, **kw)  # compiles
  best = None
  for _ in range(args.repeats):
    g = generate_with_stats(cfg, params, prompts, **kw)
    if best is None or g.decode_s < best.decode_s:
      best = g
  return best, first.prefill_s + first.decode_s - best.prefill_s - best.decode_s


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  src = ap.add_mutually_exclusive_group(required=True)
  src.add_argument("--checkpoint", help="a run directory")
  src.add_argument("--random_model", choices=sorted(PRESETS))
  src.add_argument("--gguf", help="a llama.cpp GGUF file (dequantized on load)")
  src.add_argument("--hf", help="a Hugging Face Llama directory")
  ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                  help="weights and compute (products accumulate as XLA chooses; logits in f32)")
  ap.add_argument("--prompts", default="stdlib", choices=("stdlib", "repeat"),
                  help="with a tokenizer: stdlib files, or a function repeated with changes")
  ap.add_argument("--batch", type=int, default=1)
  ap.add_argument("--prompt_len", type=int, default=128)
  ap.add_argument("--new_tokens", type=int, default=128)
  ap.add_argument("--temperature", type=float, default=0.0)
  ap.add_argument("--repeats", type=int, default=2)
  ap.add_argument("--prompt_lookup", type=int, default=0, metavar="N")
  ap.add_argument("--draft", help="a run directory for the draft model")
  ap.add_argument("--draft_random", choices=sorted(PRESETS), help="a random draft model")
  ap.add_argument("--draft_layers", type=int, default=0, metavar="N",
                  help="self-speculative draft: the model's first N layers, norm and head")
  ap.add_argument("--measure_bandwidth", action="store_true",
                  help="also measure this machine's streaming read bandwidth")
  ap.add_argument("--num_draft_tokens", type=int, default=4)
  ap.add_argument("--kv_cache_dtype", choices=kv_cache.CACHE_DTYPES, default=None,
                  help="the KV cache's dtype (default: --dtype); int8: quantized per token")
  ap.add_argument("--stream", action="store_true", help="also time with a streaming callback")
  args = ap.parse_args()

  tokenizer = None
  if args.checkpoint or args.gguf or args.hf:
    from infer import loaders
    m = (loaders.load_checkpoint(args.checkpoint) if args.checkpoint
         else loaders.load_gguf(args.gguf) if args.gguf else loaders.load_hf(args.hf))
    cfg, params, tokenizer = m.cfg, m.params, m.tokenizer
  else:
    cfg, params, _ = random_model(args.random_model, args.prompt_len + args.new_tokens + 64)
  if tokenizer is not None and args.prompts == "stdlib":
    prompts = stdlib_prompts(tokenizer, args.prompt_len, args.batch)
  else:
    prompts = [code_prompt(tokenizer, cfg.vocab_size, args.prompt_len, seed=i)
               for i in range(args.batch)]
  # The inference layout, once (model/fused.py); generate would otherwise redo it every call.
  dtype = jnp.dtype(args.dtype)
  cfg = dataclasses.replace(cfg, param_dtype=args.dtype, dtype=args.dtype)
  module_params = params
  params = fused.prepare(cfg, params, dtype, layout=layout_for(args.batch, speculative=False))
  plain, compile_s = run(cfg, params, prompts, args)
  steps = max(sum(plain.target_steps) / args.batch, 1)
  # A tied embedding is one array, read as the head: count it once.
  leaves = jax.tree.leaves({**params, "embedding": params["embedding"][:0]}
                           if cfg.tie_embeddings else params)
  # Parameters as the model counts them: a quantized weight is its logical size.
  n_params = sum(x.size for x in jax.tree.leaves(module_params, is_leaf=quant.is_quantized))
  # Each decode step reads every weight once (the embedding only as the LM head); the input
  # embedding's one row per token and the KV cache are left out.
  weight_bytes = sum(x.size * x.dtype.itemsize for x in leaves)
  ms = 1e3 * plain.decode_s / steps
  out = {
      "device": jax.devices()[0].device_kind, "backend": jax.default_backend(),
      "model": args.checkpoint or args.gguf or args.hf or args.random_model,
      "params_m": n_params / 1e6, "dtype": args.dtype,
      "kv_cache_dtype": args.kv_cache_dtype or args.dtype,
      "batch": args.batch, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
      "prefill_tokens_per_s": plain.stats()["prefill_tokens_per_s"],
      "decode_tokens_per_s": plain.stats()["decode_tokens_per_s"],
      "ms_per_token": ms,  # per decode step (one token per row)
      "weight_bytes_per_step": weight_bytes,
      "weights_gb_per_s": weight_bytes / ms / 1e6,
      "compile_s": compile_s,
  }
  if args.measure_bandwidth:
    bound = measure_bandwidth()
    out["read_bandwidth_gb_per_s"] = bound
    out["bound_tokens_per_s"] = bound * 1e9 / weight_bytes * args.batch
    out["fraction_of_bound"] = out["weights_gb_per_s"] / bound
  if args.stream:  # decode time with a streaming callback every N steps, relative to none
    out["stream_overhead"] = {}
    for every in (1, 4, 8, 16):
      streamed, _ = run(cfg, params, prompts, args, stream=lambda row, toks: None,
                        stream_every=every)
      out["stream_overhead"][f"every_{every}"] = streamed.decode_s / plain.decode_s - 1
  draft = None
  if args.prompt_lookup:
    draft = speculative.PromptLookup(ngram=args.prompt_lookup)
  elif args.draft:
    from infer.loaders import load_checkpoint
    d = load_checkpoint(args.draft)
    draft = speculative.ModelDraft(d.cfg, d.params)
  elif args.draft_layers:
    draft = speculative.EarlyExit(args.draft_layers)
  elif args.draft_random:
    dcfg, dparams, _ = random_model(args.draft_random, cfg.max_seq_len, seed=1)
    draft = speculative.ModelDraft(dcfg, dparams)
  if draft is not None:
    spec_params = fused.prepare(cfg, module_params, dtype,
                                layout=layout_for(args.batch, speculative=True))
    spec, _ = run(cfg, spec_params, prompts, args, draft=draft)
    k = args.num_draft_tokens
    alpha = spec.acceptance_rate
    out["speculative"] = {
        "draft": repr(draft) if not isinstance(draft, speculative.ModelDraft) else "ModelDraft",
        "num_draft_tokens": k,
        "acceptance_rate": alpha, "tokens_per_step": spec.tokens_per_step,
        "expected_tokens_per_step": (1 - alpha ** (k + 1)) / (1 - alpha) if alpha < 1 else k + 1,
        "decode_tokens_per_s": spec.stats()["decode_tokens_per_s"],
        "speedup": spec.stats()["decode_tokens_per_s"] / plain.stats()["decode_tokens_per_s"],
        "same_tokens_as_plain": spec.tokens == plain.tokens if args.temperature == 0 else None,
    }
  print(json.dumps(out, indent=1))


if __name__ == "__main__":
  main()
