"""bench/serve.py's load test (bench/loadgen.py): the streaming client against a live server,
the Poisson schedule, static batching's simulated clock, and the metrics, each checked against
numbers worked out by hand or numpy."""

import asyncio
import sys

import numpy as np
import pytest

from bench import loadgen
from bench import serve as bench_serve
from tests.test_serve import run, server  # noqa: F401  (fixtures)


def test_poisson_arrivals_have_mean_gap_one_over_rate():
  arrivals = loadgen.poisson_arrivals(20000, 4.0, seed=3)
  gaps = np.diff(np.concatenate([[0.0], arrivals]))
  assert abs(gaps.mean() - 0.25) < 0.01 and (gaps > 0).all()
  assert abs(gaps.std() / gaps.mean() - 1) < 0.03  # exponential: std = mean
  np.testing.assert_allclose(loadgen.poisson_arrivals(50, 8.0, seed=3),
                             arrivals[:50] / 2)  # one pattern, scaled by the rate
  assert not np.allclose(loadgen.poisson_arrivals(50, 4.0, seed=4), arrivals[:50])


def _trace(arrival, chunks, error=None):
  return loadgen.Trace(arrival, sum(k for _, k in chunks), list(chunks), error)


def test_report_and_saturation_on_hand_made_traces():
  traces = [_trace(0.0, [(0.5, 1), (0.7, 1), (1.3, 3)]),  # TTFT 0.5, gaps .2 .2 .2 .2
            _trace(1.0, [(1.1, 2), (1.5, 1)]),  # TTFT 0.1, gap .4
            _trace(2.0, [], error="HTTP 429")]
  r = loadgen.report(traces, offered_rate=1.5)
  assert (r["completed"], r["errors"], r["first_error"]) == (2, 1, "HTTP 429")
  assert r["duration_s"] == pytest.approx(1.5)  # first arrival to last chunk
  assert r["request_throughput"] == pytest.approx(2 / 1.5)
  assert r["output_throughput"] == pytest.approx(8 / 1.5)
  for key, xs in (("ttft_s", [0.5, 0.1]), ("itl_s", [0.2, 0.2, 0.2, 0.2, 0.4]),
                  ("e2e_s", [1.3, 0.5])):
    assert r[key]["p50"] == pytest.approx(np.percentile(xs, 50)), key
    assert r[key]["p99"] == pytest.approx(np.percentile(xs, 99)), key
  assert loadgen.report([_trace(0.0, [], "x")], 1.0)["ttft_s"] is None

  def rep(rate, p99, errors=0):
    return {"offered_rate": rate, "errors": errors, "ttft_s": {"p50": 0.0, "p99": p99}}
  # The highest rate under the bound with every lower one: 3 (4 misses, so 5 does not count).
  assert loadgen.saturation_rate([rep(5, 0.1), rep(1, 0.1), rep(3, 0.9), rep(4, 2.5)],
                                 ttft_slo=1.0) == 3
  assert loadgen.saturation_rate([rep(1, 0.1), rep(2, 0.1, errors=1)], 1.0) == 1
  assert loadgen.saturation_rate([rep(1, 1.5)], 1.0) is None


def test_static_batching_clock():
  """Batches of at most 2, each taking 1 s, its rows' chunks at 0.1 s (1 token) and 1 s."""
  batches = []

  def run_batch(batch):
    batches.append([m for _, m in batch])
    return 1.0, [[(0.1, 1), (1.0, m - 1)] for _, m in batch]

  requests = [([1], m) for m in (2, 3, 4, 5, 6)]
  arrivals = [0.0, 0.5, 0.6, 0.7, 3.0]
  traces = loadgen.simulate_static(requests, arrivals, 2, run_batch)
  # t=0: only request 0 has come; t=1: 1, 2 (3 waits: full); t=2: 3; idle until 3: 4.
  assert batches == [[2], [3, 4], [5], [6]]
  starts = [0.0, 1.0, 1.0, 2.0, 3.0]
  for trace, start, (_, m) in zip(traces, starts, requests):
    assert trace.chunks == [(start + 0.1, 1), (start + 1.0, m - 1)]
    assert trace.tokens == m


def test_client_streams_every_token_from_a_live_server(server):  # noqa: F811
  rng = np.random.default_rng(0)
  requests = [(rng.integers(1, 300, rng.integers(3, 20)).tolist(), int(rng.integers(2, 9)))
              for _ in range(8)]
  arrivals = loadgen.poisson_arrivals(8, 20.0, seed=0)
  traces = asyncio.run(loadgen.run_load(server.url, loadgen.served_model(server.url), requests,
                                        arrivals, max_concurrency=3))
  assert [t.error for t in traces] == [None] * 8, server.output()
  assert [t.tokens for t in traces] == [m for _, m in requests]  # ignore_eos: the whole budget
  for t, a in zip(traces, arrivals):
    times = [c[0] for c in t.chunks]
    assert t.arrival == a and a < times[0] and times == sorted(times)
  r = loadgen.report(traces, 20.0)
  assert r["completed"] == 8 and r["errors"] == 0
  assert r["output_throughput"] == pytest.approx(sum(m for _, m in requests) / r["duration_s"])
  for key in ("ttft_s", "itl_s", "e2e_s"):
    assert 0 < r[key]["p50"] <= r[key]["p99"]


@pytest.mark.parametrize("argv", [
    ["--random_model", "test", "--rate", "1"],  # no server
    ["--random_model", "test", "--serve", "--rate", "1"],  # --serve needs a checkpoint
    ["--url", "http://127.0.0.1:1"],  # no rate
    ["--url", "http://127.0.0.1:1", "--rate", "1", "--plot", "out.svg"],
    ["--num_requests", "4"],  # no model, offline
])
def test_bad_flags_are_errors(monkeypatch, argv):
  monkeypatch.setattr(sys, "argv", ["bench/serve.py", *argv])
  with pytest.raises(SystemExit) as e:
    bench_serve.main()
  assert e.value.code == 2


def test_rates_must_be_positive_numbers():
  assert bench_serve.parse_rates("4,1,2.5") == [1.0, 2.5, 4.0]
  for bad in ("1,x", "0,1"):
    with pytest.raises(SystemExit, match="--rate"):
      bench_serve.parse_rates(bad)
