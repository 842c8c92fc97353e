"""Training throughput of the real jitted train step on random tokens. Prints one JSON line.

python bench/train_throughput.py --vocab 8192 --d_model 512 --layers 8 --heads 8 \
    --kv_heads 4 --d_ff 1376 --seq 512 --batch 8 --steps 10 --dtype float32
python bench/train_throughput.py --scan 0 --steps 3 --profile 2   # + where the time goes
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from bench import xla_profile  # noqa: E402
from model import ModelConfig, sharding  # noqa: E402
from train import metrics  # noqa: E402
from train.config import load_config  # noqa: E402
from train.loop import build_program  # noqa: E402


def main():
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--vocab", type=int, default=8192)
  p.add_argument("--d_model", type=int, default=512)
  p.add_argument("--layers", type=int, default=8)
  p.add_argument("--heads", type=int, default=8)
  p.add_argument("--kv_heads", type=int, default=4)
  p.add_argument("--d_ff", type=int, default=1376)
  p.add_argument("--seq", type=int, default=512)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  p.add_argument("--remat", default="none", choices=["none", "full", "dots", "dots_no_batch"])
  p.add_argument("--scan", type=int, default=1, help="1: lax.scan over layers; 0: unrolled")
  p.add_argument("--microbatches", type=int, default=1)
  p.add_argument("--attention_impl", default="auto", choices=["auto", "xla", "pallas"])
  p.add_argument("--profile", type=int, default=0, metavar="N",
                 help="then trace N more steps and add where their time went, by source op "
                 "(bench/xla_profile.py)")
  args = p.parse_args()

  cfg = load_config(os.path.join(os.path.dirname(__file__), "..", "configs", "base.py"), {})
  with cfg.unlocked():
    cfg.model.update(vocab_size=args.vocab, d_model=args.d_model, n_layers=args.layers,
                     n_heads=args.heads, n_kv_heads=args.kv_heads, d_ff=args.d_ff,
                     max_seq_len=max(args.seq, 2048), dtype=args.dtype, remat=args.remat,
                     scan_layers=bool(args.scan), attention_impl=args.attention_impl,
                     tie_embeddings=False)
    cfg.data.seq_len = args.seq
    cfg.train.update(batch_size=args.batch, microbatches=args.microbatches,
                     steps=args.steps + 1)
  model_cfg = ModelConfig.from_config(cfg.model)
  mesh = sharding.make_mesh(-1, 1, 1)
  prog = build_program(cfg, model_cfg, mesh)
  state = prog.init_state(0)

  rng = np.random.default_rng(0)
  tokens = rng.integers(0, args.vocab, (args.batch, args.seq + 1)).astype(np.int32)
  batch = jax.device_put({
      "inputs": tokens[:, :-1], "targets": tokens[:, 1:],
      "segment_ids": np.ones((args.batch, args.seq), np.int32),
      "positions": np.broadcast_to(np.arange(args.seq, dtype=np.int32), (args.batch, args.seq)),
      "loss_mask": np.ones((args.batch, args.seq), np.float32)}, prog.batch_sharding)

  t0 = time.perf_counter()
  state, m = prog.train_step(state, batch)
  jax.block_until_ready(m)
  compile_s = time.perf_counter() - t0
  times = []
  for _ in range(args.steps):
    t0 = time.perf_counter()
    state, m = prog.train_step(state, batch)
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t0)
  step_s = float(np.median(times))
  tokens_per_s = args.batch * args.seq / step_s
  flops = metrics.training_flops_per_token(model_cfg, args.seq)
  peak = metrics.peak_flops()  # None for a device kind the chip table lacks: no mfu
  profile = None
  if args.profile:
    with xla_profile.traced() as trace:
      for _ in range(args.profile):
        state, m = prog.train_step(state, batch)
        jax.block_until_ready(m)
    hlo = prog.train_step.lower(state, batch).compile().as_text()
    profile = xla_profile.by_source(trace, hlo, args.profile)
  print(json.dumps({
      "tokens_per_s": round(tokens_per_s, 1), "step_s": round(step_s, 4),
      "compile_s": round(compile_s, 2),
      "model_tflops": round(tokens_per_s * flops / 1e12, 4),
      "mfu": round(tokens_per_s * flops / peak, 4) if peak else None,
      "params": int(sum(x.size for x in jax.tree.leaves(state.params))),
      "loss": float(m["loss"]), "device": jax.devices()[0].device_kind,
      "args": vars(args)} | ({"profile": profile} if profile else {})))


if __name__ == "__main__":
  main()
