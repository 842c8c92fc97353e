"""Generate text from a trained run, an HF directory or a GGUF file.

  python infer/generate.py --checkpoint runs/tiny --prompt "def fib(n):" --max_new_tokens 64
  python infer/generate.py --checkpoint runs/tiny --prompts_file prompts.txt --json
  python infer/generate.py --checkpoint runs/tiny --prompt "..." --prompt_lookup 3
  python infer/generate.py --checkpoint runs/big --draft runs/tiny --num_draft_tokens 4 ...
  python infer/generate.py --hf ~/SmolLM2-135M-Instruct --chat --prompt "Hi!"
  python infer/generate.py --gguf smollm2.gguf --chat --prompt "A user as JSON" \
      --json_schema '{"type": "object", "properties": {"name": {"type": "string"}}}'
  python infer/generate.py --checkpoint runs/tiny --prompt "..." --num_beams 4 --json

Without --json the text streams to the terminal as it is generated (one prompt after the
other). With --json all prompts run as one batch and each prints one JSON line: prompt, text,
token_ids (generated only), timings, tokens/s, and acceptance stats when speculating.
--num_beams K: beam search (infer/beam.py), as transformers' generate(num_beams=K,
do_sample=False); all prompts run as one batch and print the best beam (and its score).
--prompts_file: one prompt per line; a .jsonl file holds one JSON string (or an object with
a "prompt" key) per line, for prompts with newlines.
--json_schema (a file or the schema's JSON text) and --regex constrain the output to parse
and validate, or to match in full (structured output: infer/structured.py).
"""

import os
import sys

# Run as a script, Python puts infer/ first on sys.path, where infer/gguf.py would shadow the
# `gguf` package; the repo root goes there instead (the package may not be pip-installed).
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
sys.path.insert(0, os.path.dirname(_HERE))

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402


def parse_args(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  src = ap.add_mutually_exclusive_group(required=True)
  src.add_argument("--checkpoint", metavar="WORKDIR", help="a run directory (config.json, "
                   "tokenizer.json, checkpoints/)")
  src.add_argument("--hf", metavar="DIR", help="a Hugging Face Llama directory")
  src.add_argument("--gguf", metavar="FILE", help="a llama.cpp GGUF file")
  ap.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  ap.add_argument("--prompt", action="append", default=[], help="repeatable")
  ap.add_argument("--prompts_file", help="one prompt per line (.jsonl: JSON strings)")
  ap.add_argument("--chat", action="store_true", help="apply the model's chat template")
  ap.add_argument("--max_new_tokens", type=int, default=128)
  ap.add_argument("--temperature", type=float, default=None,
                  help="0: greedy (default 0.8; with --num_beams 0)")
  ap.add_argument("--top_k", type=int, default=0)
  ap.add_argument("--top_p", type=float, default=1.0)
  ap.add_argument("--min_p", type=float, default=0.0)
  ap.add_argument("--repetition_penalty", type=float, default=1.0)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--draft", metavar="WORKDIR", help="speculative decoding with this smaller "
                  "model (same vocabulary)")
  ap.add_argument("--num_draft_tokens", type=int, default=4)
  ap.add_argument("--prompt_lookup", type=int, default=0, metavar="N",
                  help="speculative decoding with prompt-lookup drafts of n-grams up to N")
  ap.add_argument("--kv_cache_dtype", "--cache_dtype", dest="kv_cache_dtype",
                  choices=("bfloat16", "float32", "int8"), default=None,
                  help="the KV cache's dtype (default: the compute dtype); int8 quantizes K and "
                  "V per token and KV head (about half of bf16's bytes)")
  ap.add_argument("--num_beams", type=int, default=1, metavar="K",
                  help="beam search with K beams (greedy; 1: no beam search)")
  ap.add_argument("--length_penalty", type=float, default=None,
                  help="beam search: a hypothesis scores sum log p / length**this (default 1.0)")
  ap.add_argument("--early_stopping", choices=("true", "false", "never"), default=None,
                  help="beam search: stop a prompt once it has K hypotheses (true), once no "
                  "beam can beat them (false, default), or by the stricter bound (never)")
  ap.add_argument("--json", action="store_true", help="one JSON line per prompt")
  fmt = ap.add_mutually_exclusive_group()
  fmt.add_argument("--json_schema", metavar="FILE|JSON", help="structured output: JSON that "
                   "validates against this schema (a file, or the schema itself)")
  fmt.add_argument("--regex", metavar="R", help="structured output: text matching R in full")
  args = ap.parse_args(argv)
  if args.draft and args.prompt_lookup:
    ap.error("--draft and --prompt_lookup are alternatives; pick one")
  if args.num_beams < 1:
    ap.error(f"--num_beams must be >= 1, got {args.num_beams}")
  if args.num_beams > 1:
    sampling = {"--temperature": args.temperature not in (None, 0), "--top_k": args.top_k != 0,
                "--top_p": args.top_p != 1, "--min_p": args.min_p != 0,
                "--repetition_penalty": args.repetition_penalty != 1,
                "--draft": bool(args.draft), "--prompt_lookup": bool(args.prompt_lookup),
                "--json_schema": bool(args.json_schema), "--regex": bool(args.regex)}
    bad = [flag for flag, given in sampling.items() if given]
    if bad:
      ap.error(f"--num_beams is greedy beam search; it does not combine with {', '.join(bad)}")
    args.temperature = 0.0
  elif args.length_penalty is not None or args.early_stopping is not None:
    ap.error("--length_penalty and --early_stopping apply to beam search: add --num_beams K")
  if args.temperature is None:
    args.temperature = 0.8
  return args


def read_prompts(args) -> list[str]:
  prompts = list(args.prompt)
  if args.prompts_file:
    with open(args.prompts_file) as f:
      for line in f:
        if not line.strip():
          continue
        if args.prompts_file.endswith(".jsonl"):
          item = json.loads(line)
          prompts.append(item["prompt"] if isinstance(item, dict) else item)
        else:
          prompts.append(line.rstrip("\n"))
  if not prompts:
    raise ValueError("no prompt: give --prompt (repeatable) or --prompts_file")
  return prompts


def read_constraint(args, model):
  """The structured-output constraint the flags ask for, or None."""
  if args.json_schema is None and args.regex is None:
    return None
  from infer.structured import GrammarCompiler
  compiler = GrammarCompiler(model.tokenizer, model.cfg.vocab_size, model.eos_ids)
  if args.regex is not None:
    return compiler.regex(args.regex, "--regex")
  schema = args.json_schema
  if os.path.isfile(schema):
    with open(schema) as f:
      schema = f.read()
  return compiler.json_schema(schema, "--json_schema")


def load(args):
  from infer import loaders
  if args.checkpoint:
    return loaders.load_checkpoint(args.checkpoint, step=args.step)
  if args.hf:
    return loaders.load_hf(args.hf)
  return loaders.load_gguf(args.gguf)


class TextStream:
  """Prints a token stream as text: decodes the whole output so far and prints what is new,
  holding back an incomplete UTF-8 character until its last byte arrives."""

  def __init__(self, tokenizer, out=None):
    # sys.stdout as it is now, not as it was at import (a default argument would keep that).
    out = sys.stdout if out is None else out
    self.tokenizer, self.out, self.ids, self.printed = tokenizer, out, [], 0

  def __call__(self, row, ids):
    del row
    self.ids.extend(ids)
    text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
    if text.endswith("\ufffd"):
      return
    self.out.write(text[self.printed:])
    self.out.flush()
    self.printed = len(text)


def print_beams(args, model, prompts: list[str], ids: list[list[int]]) -> None:
  """Beam search over all prompts as one batch; prints each prompt's best beam."""
  from infer.beam import beam_search
  t0 = time.perf_counter()
  out = beam_search(model.cfg, model.params, ids, num_beams=args.num_beams,
                    max_new_tokens=args.max_new_tokens,
                    length_penalty=1.0 if args.length_penalty is None else args.length_penalty,
                    early_stopping=args.early_stopping or "false", eos_ids=model.eos_ids,
                    cache_dtype=args.kv_cache_dtype)
  total = time.perf_counter() - t0
  for prompt, prompt_ids, (tokens,), (score,) in zip(prompts, ids, out.tokens, out.scores):
    text = model.tokenizer.decode(tokens, skip_special_tokens=True)
    if args.json:
      print(json.dumps({"prompt": prompt, "text": text, "token_ids": tokens, "score": score,
                        "prompt_tokens": len(prompt_ids), "num_tokens": len(tokens),
                        "timings": {"total_s": total}},  # one batch: the batch's
                       ensure_ascii=False), flush=True)
    else:
      print(prompt + text, flush=True)
      print(f"[{len(tokens)} tokens, score {score:.4f}]", file=sys.stderr, flush=True)


def main(argv=None) -> int:
  args = parse_args(argv)
  from infer import speculative
  from infer.decode import generate_with_stats
  from infer.sampling import SamplingParams

  try:
    prompts = read_prompts(args)
    model = load(args)
    sampling = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                              min_p=args.min_p, repetition_penalty=args.repetition_penalty)
    draft = None
    if args.draft:
      from infer import loaders
      d = loaders.load_checkpoint(args.draft)
      draft = speculative.ModelDraft(d.cfg, d.params)
    elif args.prompt_lookup:
      draft = speculative.PromptLookup(ngram=args.prompt_lookup)
    constraint = read_constraint(args, model)
    encode = model.encode_chat if args.chat else model.encode
    ids = [encode(p) for p in prompts]
    if args.num_beams > 1:
      print_beams(args, model, prompts, ids)
      return 0
    kw = dict(max_new_tokens=args.max_new_tokens, sampling=sampling, eos_ids=model.eos_ids,
              draft=draft, num_draft_tokens=args.num_draft_tokens,
              cache_dtype=args.kv_cache_dtype, constraint=constraint)
    if args.json:
      t0 = time.perf_counter()
      g = generate_with_stats(model.cfg, model.params, ids, seed=args.seed, **kw)
      total = time.perf_counter() - t0
      for i, (prompt, out) in enumerate(zip(prompts, g.tokens)):
        rec = {"prompt": prompt, "text": model.tokenizer.decode(out, skip_special_tokens=True),
               "token_ids": out, "prompt_tokens": len(ids[i]), "num_tokens": len(out),
               # One batch: the timings are the batch's.
               "timings": {"prefill_s": g.prefill_s, "decode_s": g.decode_s, "total_s": total},
               "tokens_per_s": len(out) / max(g.prefill_s + g.decode_s, 1e-9)}
        if draft is not None:
          rec["acceptance_rate"] = g.accepted[i] / max(g.drafted[i], 1)
          rec["tokens_per_step"] = (len(out) - 1) / max(g.target_steps[i], 1)
        print(json.dumps(rec, ensure_ascii=False), flush=True)
    else:
      for prompt, prompt_ids in zip(prompts, ids):
        print(prompt, end="", flush=True)
        g = generate_with_stats(model.cfg, model.params, [prompt_ids], seed=args.seed,
                                stream=TextStream(model.tokenizer), **kw)
        n = g.generated_tokens
        line = (f"\n[{n} tokens, {n / max(g.prefill_s + g.decode_s, 1e-9):.1f} tokens/s"
                + (f", acceptance {g.acceptance_rate:.2f}, {g.tokens_per_step:.2f} tokens/step"
                   if draft is not None else "") + "]")
        print(line, file=sys.stderr, flush=True)
  except (ValueError, FileNotFoundError, NotImplementedError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
