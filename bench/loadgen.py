"""Load generation for bench/serve.py: Poisson arrivals, a streaming HTTP client, static
batching on a simulated clock, and the per-rate report.

A request's trace is its arrival time and the (time, tokens) of every streamed chunk that
carried tokens, all in seconds from the start of the schedule. From traces:
  TTFT  first chunk - arrival;
  ITL   each later chunk's gap to the chunk before, split evenly over its tokens (a chunk of
        k tokens after a gap g counts k gaps of g / k);
  e2e   last chunk - arrival;
  throughput  completed requests (and their output tokens) / (last chunk - first arrival).
The saturation rate is the highest offered rate at which the server still keeps p99 TTFT
within a bound with no errors, this rate and every lower one in the sweep. A server past
its capacity queues requests, and their TTFT grows with the length of the run; measured
throughput alone says so only slowly, since a finite run's drain (the last requests
finishing after the last arrival) lowers it at every rate.
"""

import asyncio
import contextlib
import dataclasses
import json
import time
from typing import Callable, Sequence

import httpx2
import numpy as np


@dataclasses.dataclass
class Trace:
  arrival: float
  max_tokens: int
  chunks: list[tuple[float, int]] = dataclasses.field(default_factory=list)  # (time, tokens)
  error: str | None = None

  @property
  def tokens(self) -> int:
    return sum(k for _, k in self.chunks)

  def gaps(self) -> list[float]:
    """Inter-token latencies: each chunk's gap after the one before, per token."""
    out = []
    for (t0, _), (t1, k) in zip(self.chunks, self.chunks[1:]):
      out += [(t1 - t0) / k] * k
    return out


def poisson_arrivals(n: int, rate: float, seed: int) -> np.ndarray:
  """n arrival times (s) with exponential gaps of mean 1 / rate. The gaps are one seeded
  unit-rate draw divided by the rate, so every rate of a sweep has the same pattern."""
  return np.cumsum(np.random.default_rng([seed, 1]).exponential(1.0, n)) / rate


def percentiles(xs) -> dict | None:
  if not len(xs):
    return None
  return {"p50": float(np.percentile(xs, 50)), "p99": float(np.percentile(xs, 99))}


def report(traces: Sequence[Trace], offered_rate: float) -> dict:
  """One rate's metrics (see the module docstring)."""
  ok = [t for t in traces if t.error is None]
  first = min(t.arrival for t in traces)
  duration = max((t.chunks[-1][0] for t in ok), default=first) - first
  tokens = sum(t.tokens for t in ok)
  return {
      "offered_rate": offered_rate, "num_requests": len(traces), "completed": len(ok),
      "errors": len(traces) - len(ok),
      "first_error": next((t.error for t in traces if t.error is not None), None),
      "duration_s": duration,
      "request_throughput": len(ok) / duration if ok else 0.0,
      "output_throughput": tokens / duration if ok else 0.0,
      "ttft_s": percentiles([t.chunks[0][0] - t.arrival for t in ok]),
      "itl_s": percentiles([g for t in ok for g in t.gaps()]),
      "e2e_s": percentiles([t.chunks[-1][0] - t.arrival for t in ok]),
  }


def saturation_rate(reports: Sequence[dict], ttft_slo: float) -> float | None:
  """The highest offered rate that, with every lower one, had no errors and p99 TTFT <=
  `ttft_slo` seconds; None if the lowest rate already missed."""
  best = None
  for r in sorted(reports, key=lambda r: r["offered_rate"]):
    if r["errors"] or r["ttft_s"] is None or r["ttft_s"]["p99"] > ttft_slo:
      break
    best = r["offered_rate"]
  return best


# ------------------------------------------------------------------------------ the client


async def _request(client: httpx2.AsyncClient, url: str, body: dict, trace: Trace, t0: float,
                   slots: asyncio.Semaphore | None):
  await asyncio.sleep(max(0.0, t0 + trace.arrival - time.perf_counter()))
  async with slots or contextlib.nullcontext():
    try:
      async with client.stream("POST", url + "/v1/completions", json=body) as r:
        if r.status_code != 200:
          trace.error = f"HTTP {r.status_code}: {(await r.aread()).decode()[:200]}"
          return
        async for line in r.aiter_lines():
          if not line.startswith("data: ") or line == "data: [DONE]":
            continue
          event = json.loads(line[len("data: "):])
          if "error" in event:
            trace.error = event["error"]["message"]
            return
          # logprobs: 0 puts each chunk's tokens in it: the exact count, even for a chunk
          # of several tokens or of bytes that do not yet make a character.
          k = sum(len((c.get("logprobs") or {}).get("tokens") or []) for c in event["choices"])
          if k:
            trace.chunks.append((time.perf_counter() - t0, k))
    except httpx2.HTTPError as e:
      trace.error = repr(e)
      return
  if trace.tokens != trace.max_tokens:
    trace.error = f"{trace.tokens} tokens streamed, {trace.max_tokens} asked for"


async def run_load(url: str, model: str, requests: Sequence[tuple[list[int], int]],
                   arrivals: Sequence[float], max_concurrency: int = 0) -> list[Trace]:
  """Sends each (prompt ids, max_tokens) request at its arrival time (s from now) as a
  streaming greedy `/v1/completions` with `ignore_eos`, so it generates exactly max_tokens.
  `max_concurrency` > 0: at most that many in flight (latency still counts from arrival)."""
  traces = [Trace(float(a), m) for (_, m), a in zip(requests, arrivals)]
  slots = asyncio.Semaphore(max_concurrency) if max_concurrency > 0 else None
  limits = httpx2.Limits(max_connections=None, max_keepalive_connections=None)
  async with httpx2.AsyncClient(timeout=None, limits=limits) as client:
    t0 = time.perf_counter()
    await asyncio.gather(*[
        _request(client, url, {"model": model, "prompt": p, "max_tokens": m, "temperature": 0,
                               "stream": True, "ignore_eos": True, "logprobs": 0},
                 trace, t0, slots)
        for (p, m), trace in zip(requests, traces)])
  return traces


def served_model(url: str) -> str:
  """The id of the one model the server at `url` serves."""
  return httpx2.get(url + "/v1/models").json()["data"][0]["id"]


# ------------------------------------------------------------------------------ static batching

# (prompt ids, max_new_tokens) of a batch -> (seconds it took, per request the (seconds from
# the batch's start, tokens) of each chunk it streamed)
RunBatch = Callable[[list[tuple[list[int], int]]], tuple[float, list[list[tuple[float, int]]]]]


def simulate_static(requests: Sequence[tuple[list[int], int]], arrivals: Sequence[float],
                    max_batch: int, run_batch: RunBatch) -> list[Trace]:
  """Static batching on a simulated clock: when the device is free, the requests that have
  arrived (the next arrival, if none has) go in, up to `max_batch` in arrival order, and run
  to the end of the longest before the next batch starts. Each batch's duration and chunk
  times are measured by `run_batch`; the clock only skips the idle waits between them."""
  traces = [Trace(float(a), m) for (_, m), a in zip(requests, arrivals)]
  order = np.argsort(arrivals, kind="stable")
  now, queue, i = 0.0, [], 0
  while i < len(order) or queue:
    if not queue:
      now = max(now, traces[order[i]].arrival)
    while i < len(order) and traces[order[i]].arrival <= now:
      queue.append(order[i])
      i += 1
    batch, queue = queue[:max_batch], queue[max_batch:]
    duration, chunks = run_batch([requests[j] for j in batch])
    for j, c in zip(batch, chunks):
      traces[j].chunks = [(now + t, k) for t, k in c]
    now += duration
  return traces


# ------------------------------------------------------------------------------ the plot


def plot(path: str, reports: dict[str, list[dict]], title: str):
  """Achieved request throughput and p99 TTFT / e2e latency against the offered rate."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
  top = max(r["offered_rate"] for rs in reports.values() for r in rs)
  left.plot([0, top], [0, top], ":", color="gray", label="offered")
  for (system, rs), color in zip(reports.items(), ("C0", "C1", "C2")):
    rs = [r for r in sorted(rs, key=lambda r: r["offered_rate"]) if r["ttft_s"]]
    rates = [r["offered_rate"] for r in rs]
    left.plot(rates, [r["request_throughput"] for r in rs], "o-", color=color, label=system)
    right.plot(rates, [r["ttft_s"]["p99"] for r in rs], "o-", color=color,
               label=f"{system} TTFT p99")
    right.plot(rates, [r["e2e_s"]["p99"] for r in rs], "s--", color=color,
               label=f"{system} e2e p99")
  left.set(xlabel="offered rate (requests/s)", ylabel="achieved (requests/s)",
           title="throughput")
  right.set(xlabel="offered rate (requests/s)", ylabel="seconds", yscale="log",
            title="p99 latency")
  for ax in (left, right):
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=80)
  plt.close(fig)
