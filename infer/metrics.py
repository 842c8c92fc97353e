"""Serving metrics in the Prometheus text exposition format (version 0.0.4).

Counters and histograms are written from the engine thread and read by the HTTP thread: each
object takes its own lock, so a scrape never sees a histogram whose count and buckets disagree.
"""

import bisect
import collections
import threading
import time

# Seconds. Time to first token spans queueing and prefill; inter-token latency one step.
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class Histogram:
  def __init__(self, name: str, help_text: str, buckets):
    self.name, self.help, self.bounds = name, help_text, tuple(buckets)
    self.counts = [0] * (len(self.bounds) + 1)  # the last: above every bound (+Inf)
    self.sum = 0.0
    self.lock = threading.Lock()

  def observe(self, value: float):
    with self.lock:
      self.counts[bisect.bisect_left(self.bounds, value)] += 1
      self.sum += value

  def render(self) -> list[str]:
    with self.lock:
      counts, total = list(self.counts), self.sum
    lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
    cumulative = 0
    for bound, count in zip(self.bounds + (float("inf"),), counts):
      cumulative += count
      le = "+Inf" if bound == float("inf") else repr(float(bound))
      lines.append(f'{self.name}_bucket{{le="{le}"}} {cumulative}')
    lines += [f"{self.name}_sum {total}", f"{self.name}_count {cumulative}"]
    return lines


class TokenRate:
  """Generated tokens: the running total and the rate over the last `window` seconds."""

  def __init__(self, window: float = 10.0):
    self.window, self.total = window, 0
    self.recent = collections.deque()  # (time, tokens)
    self.lock = threading.Lock()

  def add(self, n: int, now: float):
    with self.lock:
      self.total += n
      self.recent.append((now, n))

  def per_second(self, now: float | None = None) -> float:
    now = time.perf_counter() if now is None else now
    with self.lock:
      while self.recent and self.recent[0][0] < now - self.window:
        self.recent.popleft()
      return sum(n for _, n in self.recent) / self.window


def scalar(name: str, help_text: str, value, kind: str = "gauge") -> list[str]:
  """A gauge or counter: one sample with its HELP and TYPE lines."""
  return [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name} {value}"]
