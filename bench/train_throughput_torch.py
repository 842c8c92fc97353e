"""The PyTorch yardstick for bench/train_throughput.py: the same Llama shapes, a well-written
eager model compiled with torch.compile, AdamW. Prints one JSON line. Needs torch (CPU is fine).

python bench/train_throughput_torch.py --vocab 8192 --d_model 512 --layers 8 --heads 8 \
    --kv_heads 4 --d_ff 1376 --seq 512 --batch 8 --steps 10
"""

import argparse
import json
import time

import torch
import torch.nn.functional as F
from torch import nn


class Block(nn.Module):
  def __init__(self, d, n, k, f):
    super().__init__()
    self.n, self.k, self.h = n, k, d // n
    self.attn_norm, self.mlp_norm = nn.RMSNorm(d, eps=1e-5), nn.RMSNorm(d, eps=1e-5)
    self.qkv = nn.Linear(d, (n + 2 * k) * self.h, bias=False)
    self.o = nn.Linear(n * self.h, d, bias=False)
    self.gate_up = nn.Linear(d, 2 * f, bias=False)
    self.down = nn.Linear(f, d, bias=False)

  def forward(self, x, cos, sin):
    b, t, _ = x.shape
    q, k, v = self.qkv(self.attn_norm(x)).split(
        [self.n * self.h, self.k * self.h, self.k * self.h], dim=-1)
    q = q.view(b, t, self.n, self.h).transpose(1, 2)
    k = k.view(b, t, self.k, self.h).transpose(1, 2)
    v = v.view(b, t, self.k, self.h).transpose(1, 2)
    q, k = rope(q, cos, sin), rope(k, cos, sin)
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    x = x + self.o(y.transpose(1, 2).reshape(b, t, -1))
    gate, up = self.gate_up(self.mlp_norm(x)).chunk(2, dim=-1)
    return x + self.down(F.silu(gate) * up)


def rope(x, cos, sin):
  x1, x2 = x.chunk(2, dim=-1)
  return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class Llama(nn.Module):
  def __init__(self, a):
    super().__init__()
    self.embed = nn.Embedding(a.vocab, a.d_model)
    self.blocks = nn.ModuleList(Block(a.d_model, a.heads, a.kv_heads, a.d_ff)
                                for _ in range(a.layers))
    self.norm = nn.RMSNorm(a.d_model, eps=1e-5)
    self.head = nn.Linear(a.d_model, a.vocab, bias=False)
    h = a.d_model // a.heads
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, h, 2).float() / h))
    angles = torch.arange(a.seq).float()[:, None] * inv_freq
    self.register_buffer("cos", angles.cos(), persistent=False)
    self.register_buffer("sin", angles.sin(), persistent=False)

  def forward(self, tokens, targets):
    x = self.embed(tokens)
    for blk in self.blocks:
      x = blk(x, self.cos, self.sin)
    logits = self.head(self.norm(x))
    return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


def main():
  p = argparse.ArgumentParser()
  for name, default in (("vocab", 8192), ("d_model", 512), ("layers", 8), ("heads", 8),
                        ("kv_heads", 4), ("d_ff", 1376), ("seq", 512), ("batch", 8),
                        ("steps", 10)):
    p.add_argument(f"--{name}", type=int, default=default)
  p.add_argument("--compile", type=int, default=1)
  p.add_argument("--profile", type=int, default=0, metavar="N",
                 help="then profile N more steps: the top ops by their own CPU time")
  a = p.parse_args()
  torch.manual_seed(0)
  model = Llama(a)
  opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1, fused=False)

  def step(tokens, targets):
    loss = model(tokens, targets)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss

  fwd_bwd = torch.compile(step) if a.compile else step
  tokens = torch.randint(0, a.vocab, (a.batch, a.seq + 1))
  x, y = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
  t0 = time.perf_counter()
  fwd_bwd(x, y)
  compile_s = time.perf_counter() - t0
  times = []
  for _ in range(a.steps):
    t0 = time.perf_counter()
    loss = fwd_bwd(x, y)
    times.append(time.perf_counter() - t0)
  times.sort()
  step_s = times[len(times) // 2]
  profile = profile_steps(fwd_bwd, x, y, a.profile) if a.profile else None
  print(json.dumps({"tokens_per_s": round(a.batch * a.seq / step_s, 1),
                    "step_s": round(step_s, 4), "compile_s": round(compile_s, 2),
                    "loss": float(loss), "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "args": vars(a)}
                   | ({"profile": profile} if profile else {})))


def profile_steps(step, x, y, n: int, top: int = 25) -> dict:
  """torch.profiler over n steps: the top ops by self CPU time (ms per step; their sum
  counts each op once, on the thread that called it, intra-op threads included)."""
  from torch.profiler import ProfilerActivity, profile
  with profile(activities=[ProfilerActivity.CPU]) as prof:
    for _ in range(n):
      step(x, y)
  rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
  total = sum(e.self_cpu_time_total for e in rows)
  return {"ops_ms": round(total / n / 1e3, 1),
          "rows": [{"op": e.key, "ms": round(e.self_cpu_time_total / n / 1e3, 1),
                    "share": round(e.self_cpu_time_total / total, 3), "calls": e.count // n}
                   for e in rows[:top]]}


if __name__ == "__main__":
  main()
