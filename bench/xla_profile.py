"""Where a jitted step's time goes on XLA:CPU (or any backend): a jax.profiler trace of a few
calls, summed per HLO instruction and grouped by the JAX operation that emitted it.

    with traced() as trace:
      for _ in range(2):
        jax.block_until_ready(step(*args))
    rows = by_source(trace, step.lower(*args).compile().as_text(), steps=2)

Each row is one JAX source operation, as the HLO metadata's op_name names it with the numbers
taken out ("transpose(jvp(BTD,DF->BTF))/dot_general": the weight gradient of that einsum;
"jvp(jit(silu))/mul"), with the milliseconds its instructions ran per step, summed over the
threads that ran them. On CPU XLA runs independent instructions side by side, and one
instruction may use several threads, so the total exceeds the step's wall time: read the rows
as shares of the work, not as a timeline. `busy_ms` gives each thread's total.
"""

import collections
import contextlib
import glob
import re
import tempfile

import jax
from jax.profiler import ProfileData

_NAME = re.compile(r'\s*(?:ROOT\s+)?%?([\w.\-]+) = .*?op_name="([^"]*)"')


@contextlib.contextmanager
def traced():
  """Traces what runs inside; yields a list that holds the trace (ProfileData) once the block
  has ended."""
  out: list = []
  with tempfile.TemporaryDirectory() as folder:
    jax.profiler.start_trace(folder)
    try:
      yield out
    finally:
      jax.profiler.stop_trace()
    out.append(_read(folder))


def _read(folder: str):
  path = sorted(glob.glob(f"{folder}/**/*.xplane.pb", recursive=True))[-1]
  return ProfileData.from_file(path)


def _sources(hlo_text: str) -> dict[str, str]:
  """HLO instruction name -> the op_name of its metadata, numbers replaced by '#'."""
  names = {}
  for line in hlo_text.splitlines():
    m = _NAME.match(line)
    if m and m.group(1) not in names:
      source = re.sub(r"^jit\([^)]*\)/", "", m.group(2))
      names[m.group(1)] = re.sub(r"\d+", "#", source)
  return names


def by_source(trace: list, hlo_text: str, steps: int, top: int = 25) -> dict:
  """{"busy_ms": per thread, "ops_ms": all instructions, "rows": [{"source", "ms", "share"}]}
  per step, the `top` sources by time."""
  sources = _sources(hlo_text)
  per_source, busy = collections.Counter(), collections.Counter()
  for plane in trace[0].planes:
    for line in plane.lines:
      for event in line.events:
        stats = dict(event.stats)
        if stats.get("hlo_op") != event.name:  # only the instructions' own spans
          continue
        per_source[sources.get(event.name, event.name)] += event.duration_ns
        busy[line.name] += event.duration_ns
  total = sum(per_source.values())
  ms = lambda ns: round(ns / steps / 1e6, 1)
  return {"busy_ms": sorted((ms(v) for v in busy.values() if ms(v) > 0), reverse=True),
          "ops_ms": ms(total),
          "rows": [{"source": s, "ms": ms(v), "share": round(v / total, 3)}
                   for s, v in per_source.most_common(top)]}
