"""Evaluate a run directory on a corpus: per-token loss, perplexity and bits per byte.

  python train/eval.py --checkpoint runs/tiny                      # the stdlib validation split
  python train/eval.py --checkpoint runs/smollm2 --data 'docs/*.txt' --max_batches 20

Batched and sharded like training: rows over every device (the data axis), the same packed
batches as the training pipeline. Bits per byte divides the summed loss (in bits) by the UTF-8
bytes of the predicted tokens, so it compares models with different tokenizers.
"""

import os
import sys

if __name__ == "__main__":  # `python train/eval.py` from the repo root
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse
import functools
import json
import math
import re
import time

import jax
import ml_collections
import numpy as np
from tqdm import tqdm

from infer import workdir as run_dir
from model import Transformer, head, sharding
from train import data as data_lib
from train import step as step_lib
from train.tasks import pretrain

_BYTE_TOKEN = re.compile(r"<0x[0-9A-F]{2}>")  # SentencePiece's byte fallback


def token_bytes(tokenizer) -> np.ndarray:
  """UTF-8 bytes each token stands for (0 for special tokens).

  Byte-level BPE spells each byte as one character of its token string, so a token's length
  is its byte count. SentencePiece spells a space "▁" and a byte-fallback token <0xXX> is one
  byte (its dummy prefix, the "▁" put before each text, counts as a byte: one per document).
  Other tokenizers fall back to decoding the token alone.
  """
  vocab = tokenizer.get_vocab(with_added_tokens=True)
  special = {t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special}
  decoder = repr(tokenizer.decoder)
  byte_level, sentencepiece = "ByteLevel" in decoder, "\u2581" in decoder
  out = np.zeros(max(vocab.values()) + 1, np.int64)
  for token, i in vocab.items():
    if token in special:
      continue
    if byte_level:
      out[i] = len(token)
    elif sentencepiece:
      out[i] = 1 if _BYTE_TOKEN.fullmatch(token) else len(token.replace("\u2581", " ").encode())
    else:
      out[i] = len(tokenizer.decode([i]).encode("utf-8"))
  return out


def evaluate(workdir: str, *, data: str = "", data_format: str = "text",
             text_field: str = "text", batch_size: int = 0, seq_len: int = 0,
             max_batches: int = 0, mesh=None) -> dict:
  """Loss, perplexity and bits per byte of a run's latest checkpoint on one pass of a corpus."""
  run_cfg = ml_collections.ConfigDict(run_dir.load_run_config(workdir))
  data_cfg = run_cfg.data
  if data:
    data_cfg.update(corpus=data, format=data_format, text_field=text_field)
  model_cfg = run_dir.load_model_config(workdir)
  mesh = sharding.make_mesh(-1, 1, 1) if mesh is None else mesh
  batch_size = batch_size or run_cfg.train.batch_size
  seq_len = seq_len or data_cfg.seq_len
  shards = sharding.num_batch_shards(mesh)
  if batch_size % shards:
    raise ValueError(f"--batch_size={batch_size} must be a multiple of the {shards} devices")
  if seq_len > model_cfg.max_seq_len:
    raise ValueError(f"--seq_len={seq_len} exceeds model.max_seq_len={model_cfg.max_seq_len}")

  files = data_lib.match_files(data) if data else data_lib.list_files(data_cfg)[1]
  tokenizer = run_dir.load_tokenizer(workdir)
  tokenizer_config = run_dir.load_tokenizer_config(workdir)
  nbytes = token_bytes(tokenizer)
  params = run_dir.load_params(workdir, model_cfg, mesh)
  shardings = jax.tree.map(lambda x: x.sharding, params)
  # Runs saved before train.loss_chunk existed get its default.
  chunk = run_cfg.train.get("loss_chunk", head.DEFAULT_CHUNK)
  loss_fn = functools.partial(pretrain.loss_fn, model=Transformer(model_cfg), chunk=chunk)
  batch_sh = sharding.batch_sharding(mesh)
  eval_step = jax.jit(sharding.in_mesh(step_lib.make_eval_step(loss_fn), mesh),
                      in_shardings=(shardings, None, batch_sh))

  it = data_lib.make_iterator(data_cfg, tokenizer, files, batch_size=batch_size,
                              seq_len=seq_len, seed=0, shuffle=False, repeat=False,
                              tokenizer_config=tokenizer_config)
  loss, tokens, n_bytes, batches = 0.0, 0.0, 0, 0
  t0 = time.perf_counter()
  pending = None
  bar = tqdm(total=max_batches or None, unit="batch", desc="eval", mininterval=1.0,
             disable=not sys.stderr.isatty())
  for batch in it:
    if max_batches and batches == max_batches:
      break
    sums = eval_step(params, None, jax.device_put(batch, batch_sh))
    n_bytes += int(nbytes[batch["targets"]][batch["loss_mask"] > 0].sum())
    if pending is not None:  # read the previous batch's sums while this one runs
      loss, tokens = loss + float(pending["loss"]), tokens + float(pending["count"])
    pending = sums
    batches += 1
    bar.update(1)
  bar.close()
  if pending is not None:
    loss, tokens = loss + float(pending["loss"]), tokens + float(pending["count"])
  it.close()
  per_token = loss / max(tokens, 1.0)
  return {"loss": per_token, "perplexity": math.exp(min(per_token, 50.0)),
          "bits_per_byte": loss / math.log(2) / max(n_bytes, 1), "tokens": int(tokens),
          "bytes": n_bytes, "batches": batches, "seconds": round(time.perf_counter() - t0, 2)}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--checkpoint", required=True, help="a run directory (workdir)")
  p.add_argument("--data", default="", help="glob of files; default: the run's validation split")
  p.add_argument("--format", default="text", choices=["text", "jsonl"])
  p.add_argument("--text_field", default="text")
  p.add_argument("--batch_size", type=int, default=0, help="default: the run's train.batch_size")
  p.add_argument("--seq_len", type=int, default=0, help="default: the run's data.seq_len")
  p.add_argument("--max_batches", type=int, default=0, help="0: the whole corpus")
  args = p.parse_args(argv)
  try:
    result = evaluate(args.checkpoint, data=args.data, data_format=args.format,
                      text_field=args.text_field, batch_size=args.batch_size,
                      seq_len=args.seq_len, max_batches=args.max_batches)
  except (ValueError, FileNotFoundError) as e:
    print(f"eval: error: {e}", file=sys.stderr)
    return 2
  print(json.dumps(result))
  return 0


if __name__ == "__main__":
  sys.exit(main())
