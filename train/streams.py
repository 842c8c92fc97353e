"""Rows of a global batch from a fixed number of independent streams.

So that each host reads and tokenizes only its share of the data, yet the global batch is the
same for any number of hosts. With S streams (data.streams, set by the config, never by the
process count) and a global batch of B rows, stream s fills rows [s*B/S, (s+1)*B/S) of every
batch; host h of P builds only streams [h*S/P, (h+1)*S/P), whose rows are exactly the ones it
feeds its devices. Contiguous blocks rather than "row r from stream r mod S": a host's rows are
a contiguous block of the batch, so blocks keep each stream on one host for any S that is a
multiple of P.

What a stream reads depends on the files and S alone (`shares`):
  F >= S files: stream s reads files[s::S], whole;
  F < S: the g streams f, f+F, f+2F, ... share file f, each taking every g-th unit of it (a
    JSONL line; for text, where a file is one document, a packed row).
Each stream has its own order, epochs and iterator state. A host's iterator state holds its
streams' states keyed by stream number; `merge_states` joins the hosts' states into one that
resumes on any number of hosts (as long as S stays the same).

`StreamBatches` runs a host's streams (grain datasets) side by side, in a background thread or
in `data.worker_count` processes that each run whole streams, so the batches do not depend on
the worker count either.

Cost: a stream holds the tokens of the file it is reading and its share (data.shuffle_rows / S)
of the row-shuffle window; with one stream per row, a host with many rows and very large files
holds many files at once, and fewer streams (data.streams) hold fewer.
"""

import copy
import dataclasses
from collections.abc import Sequence
from concurrent import futures

from absl import flags
import grain
import numpy as np

from train.config import ConfigError

# Batches kept ready in the background, so data work overlaps the step.
_BATCHES_AHEAD = 2
# Streams advanced at once (tokenizing releases the GIL). Few, because the host has few cores
# and they are shared with the training step.
_THREADS = 2


def count(data_cfg, batch_size: int) -> int:
  """S for a batch of `batch_size` rows: data.streams, or one stream per row when it is 0."""
  # getattr: run directories written before data.streams existed have no such key.
  streams = getattr(data_cfg, "streams", 0) or batch_size
  if streams < 1 or batch_size % streams:
    raise ConfigError(f"data.streams={streams} must divide the batch of {batch_size} rows "
                      "(train.batch_size; data.streams=0 gives one stream per row)")
  return streams


def of_host(streams: int, process_index: int, process_count: int) -> range:
  """The streams host `process_index` builds: those of its block of rows."""
  if streams % process_count:
    raise ConfigError(f"data.streams={streams} is not a multiple of the {process_count} "
                      "processes: each host reads whole streams (make it a multiple, or 0 for "
                      "one stream per row of train.batch_size)")
  n = streams // process_count
  return range(process_index * n, (process_index + 1) * n)


@dataclasses.dataclass(frozen=True)
class Share:
  """What one stream reads: `files`, of which unit i (a JSONL line, a packed row of text)
  is its own when i % parts == part."""
  files: tuple[str, ...]
  part: int = 0
  parts: int = 1

  def owns(self, unit: int) -> bool:
    return unit % self.parts == self.part

  def describe(self) -> str:
    where = self.files[0] + (f" and {len(self.files) - 1} more file(s)" if len(self.files) > 1
                             else "")
    return where + (f" (its part {self.part} of {self.parts})" if self.parts > 1 else "")


def shares(files: Sequence[str], streams: int) -> list[Share]:
  """Share of each of `streams` streams in `files` (see the module docstring)."""
  n = len(files)
  if n == 0:
    return [Share(())] * streams
  if n >= streams:
    return [Share(tuple(files[s::streams])) for s in range(streams)]
  return [Share((files[s % n],), s // n, len(range(s % n, streams, n))) for s in range(streams)]


def merge_states(states: Sequence):
  """One iterator state from every host's (each holding its own streams'): dicts are joined key
  by key, and what two hosts both hold must agree."""
  merged = states[0]
  for other in states[1:]:
    merged = _join(merged, other, "")
  return merged


def _join(a, b, where: str):
  if isinstance(a, dict) and isinstance(b, dict):
    out = dict(a)
    for key, value in b.items():
      out[key] = _join(a[key], value, f"{where}/{key}") if key in a else value
    return out
  if a != b:
    raise ValueError(f"the hosts' data iterator states disagree at {where or '/'}: "
                     f"{a!r:.100} vs {b!r:.100}")
  return a


def pick(state, ids: Sequence[int]) -> dict[int, object]:
  """The states of streams `ids` from a saved state (which may hold other hosts' streams)."""
  saved = state.get("streams") if isinstance(state, dict) else None
  missing = [i for i in ids if str(i) not in (saved or {})]
  if missing:
    raise ConfigError(f"the checkpoint's data state has no state for stream(s) {missing[:8]}: "
                      "it was saved with other data.streams, train.batch_size or data settings "
                      "(or before data streams existed); resume with the same ones")
  return {i: saved[str(i)] for i in ids}


# ----------------------------------------------------------------------------------------------
# Streams with grain: sharing a file's rows, and running a host's streams side by side.


class EveryNth(grain.IterDataset):
  """Element i of the parent for i % n == k: stream k's turns at rows that n streams sharing
  one file take in turn (a text file is one document, which cannot be split by lines)."""

  def __init__(self, parent: grain.IterDataset, n: int, k: int):
    super().__init__(parent)
    self._n, self._k = n, k

  def __iter__(self) -> grain.DatasetIterator:
    return _EveryNthIterator(self._parent.__iter__(), self._n, self._k)


class _EveryNthIterator(grain.DatasetIterator):

  def __init__(self, parent: grain.DatasetIterator, n: int, k: int):
    super().__init__(parent)
    self._n, self._k = n, k

  def __next__(self):
    # Takes n elements at a time, so the parent's state is always at a multiple of n.
    mine = None
    for i in range(self._n):
      try:
        element = next(self._parent)
      except StopIteration:
        if i > self._k:
          return mine
        raise
      if i == self._k:
        mine = element
    return mine

  def get_state(self):
    return self._parent.get_state()

  def set_state(self, state):
    self._parent.set_state(state)


class _SideBySide(grain.IterDataset):
  """Element i: (every stream done, [chunk i of each stream], {stream: its state after it}).

  A stream that has ended (finite passes only) gives `pad`. The states travel with the chunks,
  so whatever prefetches above (a thread, worker processes) the consumer knows each stream's
  state after the last chunk it took.
  """

  def __init__(self, streams: dict[int, grain.IterDataset], pad: dict, states: dict):
    super().__init__()
    self._streams, self._pad, self._states = dict(streams), pad, states

  def set_slice(self, sl: slice, sequential_slice: bool = False) -> None:
    """mp_prefetch's hook for its worker w of W: whole streams ids[w::W], not a slice of each
    stream's files (which would change the batches with the worker count)."""
    del sequential_slice
    ids = list(self._streams)[sl]
    self._streams = {i: self._streams[i] for i in ids}

  def __iter__(self) -> grain.DatasetIterator:
    return _SideBySideIterator(self._streams, self._pad, self._states)


class _SideBySideIterator(grain.DatasetIterator):

  def __init__(self, streams, pad, states):
    super().__init__()
    self._pool = futures.ThreadPoolExecutor(_THREADS, thread_name_prefix="data-stream")
    self._its, self._pad, self._done = {}, pad, set()
    self._states = {i: states.get(i) for i in streams}
    for i, ds in streams.items():
      self._its[i] = iter(ds)
      if self._states[i] is not None:
        self._its[i].set_state(self._states[i])

  def _advance(self, i):
    """Stream i's next chunk (pad once it has ended); one thread at a time per stream."""
    if i not in self._done:
      it = self._its[i]
      try:
        chunk = next(it)
      except StopIteration:
        self._done.add(i)
        return self._pad
      # A copy: the stream runs on ahead of the consumer, and a state may share objects with
      # the iterator that it describes.
      self._states[i] = copy.deepcopy(it.get_state())
      return chunk
    return self._pad

  def __next__(self):
    chunks = list(self._pool.map(self._advance, self._its))
    # A finite pass keeps answering "done" rather than stopping: with worker processes, a
    # worker that stopped early would shift the round-robin order of the others' chunks.
    return len(self._done) == len(self._its), chunks, dict(self._states)

  def close(self):
    self._pool.shutdown(wait=False, cancel_futures=True)
    for it in self._its.values():
      it.close()
    super().close()

  def get_state(self):
    return {"streams": dict(self._states)}

  def set_state(self, state):
    for i, s in state["streams"].items():
      self._its[i].set_state(s)
      self._states[i] = s
    self._done = set()


class StreamBatches(grain.DatasetIterator):
  """A host's batches: chunks of `rows` rows from each of its streams, side by side, in stream
  order. Checkpointable: get_state() holds each stream's state (see merge_states).

  streams: {stream number: a grain dataset of chunks, dicts of [rows, ...] arrays}.
  pad: one chunk of padding (the rows of a stream that has ended; finite passes only).
  workers: data.worker_count; each worker process runs whole streams.

  The first batch is made at construction, so bad input in any stream's first file fails
  there, before training starts. Close the iterator when done.
  """

  def __init__(self, streams: dict[int, grain.IterDataset], pad: dict, *, workers: int):
    super().__init__()
    self._streams, self._pad, self._workers = dict(streams), pad, workers
    self._it = None
    self._start({i: None for i in self._streams})

  def _start(self, states: dict) -> None:
    if self._it is not None:
      self._it.close()
    self._states = dict(states)
    ds = _SideBySide(self._streams, self._pad, self._states)
    self._group = min(self._workers, len(self._streams))
    if self._group > 0:
      _use_default_absl_flags()
      ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=self._group))
    else:
      self._group = 1
      ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=_BATCHES_AHEAD)
    self._it = iter(ds)
    self._ahead = self._pull()

  def _pull(self):
    """(done, batch, states) from one element of each worker, which runs ids[w::W]."""
    elements = [next(self._it) for _ in range(self._group)]
    chunks = [None] * len(self._streams)
    states = {}
    for w, (_, worker_chunks, worker_states) in enumerate(elements):
      chunks[w::self._group] = worker_chunks
      states.update(worker_states)
    batch = {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}
    return all(done for done, _, _ in elements), batch, states

  @property
  def exhausted(self) -> bool:
    """A finite pass with nothing (more) to give."""
    if self._ahead is None:
      self._ahead = self._pull()
    return self._ahead[0]

  def __next__(self):
    if self.exhausted:
      raise StopIteration
    _, batch, states = self._ahead
    self._ahead = None
    self._states.update(states)
    return batch

  def padding_batch(self) -> dict:
    """A batch of padding only, shaped as this host's batches."""
    return {k: np.concatenate([v] * len(self._streams)) for k, v in self._pad.items()}

  def get_state(self) -> dict:
    return {"streams": {str(i): s for i, s in self._states.items()}}

  def set_state(self, state) -> None:
    self._start(pick(state, list(self._streams)))

  def close(self) -> None:
    if self._it is not None:
      self._it.close()
      self._it = None


def _use_default_absl_flags() -> None:
  """grain's worker processes read absl flags, which only absl.app parses."""
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()  # The defaults: what an absl program gets.

