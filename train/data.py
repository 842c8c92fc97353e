"""Training data: corpus files -> documents -> tokens -> packed rows [B, T].

The rows of a global batch come from a fixed number of independent streams (train/streams.py:
one per row of the batch by default), and each host builds only the streams of its own rows,
so it reads and tokenizes only its share of the files. One stream, with grain:

  its files -> shuffled per epoch -> repeated -> read and tokenized (lazily, one file at a
  time) -> one element per document -> packed concat-then-split into rows of T tokens ->
  rows shuffled over a window -> chunks of B / S rows.

Each document becomes `[BOS] + encode(text) + [EOS]` with the ids of its model family
(infer/files.py's document_ids: no BOS where the family adds none; our own tokenizers put
`<|endoftext|>` on both sides) and is shifted into inputs/targets *before* packing, so a
target never comes from another document.
Every batch is a dict of numpy arrays, all [B, T] (this host's B / P rows):
  inputs, targets: int32 token ids.
  segment_ids: int32, 1, 2, 3... per packed piece of a document; 0 is padding.
  positions: int32, restarting at 0 in each segment.
  loss_mask: float32, 1 on real tokens, 0 on padding.

Nothing reads the whole corpus up front: the first batch is made when the iterator is built,
so a bad first file of any stream fails then, and a bad JSONL line met later fails when it is
reached, naming `file:line`. The iterator is checkpointable: `it.get_state()` is
JSON-serialisable and `it.set_state(state)` on a fresh iterator built with the same arguments
continues with the batches that would have come next.
"""

import functools
import glob
import hashlib
import io
import json
import os
import sysconfig
import types
from collections.abc import Callable, Sequence

from etils import epath
import grain
import numpy as np
import tokenizers

from infer.files import ENDOFTEXT, document_ids, is_remote
from train import streams as streams_lib

# The document separator of the tokenizers we train (GPT-2's), also their BOS; re-exported
# by train.tokenizer. A pretrained model's tokenizer brings its own (document_ids).
EOS = ENDOFTEXT
FORMATS = ("text", "jsonl")
STDLIB = "stdlib"

# A stream reads its files in the thread that advances it (train/streams.py: two threads for
# a host's streams, or data.worker_count processes), with no reader threads of its own: one
# each cost the default run's 16 streams 18 threads and +178 MB, against 4 and +55 MB.
_READ_OPTIONS = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)


class DataError(ValueError):
  """Bad corpus or data config; the message names the config key, file, line."""


# ----------------------------------------------------------------------------
# Files and the train/val split.


def list_files(data_cfg) -> tuple[list[str], list[str]]:
  """Returns (train, val) file paths of `data_cfg.corpus`, split by path hash, or, when
  `data_cfg.val_corpus` is set, the files of each glob. A corpus that matches nothing is first
  written by `data_cfg.make` ("module:function", called with the corpus's directory) when set.

  A file goes to val when a stable hash of its path relative to the corpus
  root falls below `data_cfg.val_fraction`, so the split is the same on every
  machine and adding files never moves old ones across it. Both lists are
  ordered by that hash: a fixed order that is not alphabetical, so "the first
  N MB" of train is a fair sample of the corpus.
  """
  first_glob = os.path.expanduser(data_cfg.corpus.split(",")[0])
  if data_cfg.make and not _glob(first_glob):
    _make_data(data_cfg.make, os.path.dirname(first_glob))
  if data_cfg.val_corpus:
    return (match_files(data_cfg.corpus),
            sorted(_corpus_files(data_cfg.val_corpus, "data.val_corpus")))
  fraction = data_cfg.val_fraction
  if not 0.0 <= fraction < 1.0:
    raise DataError(f"data.val_fraction must be in [0, 1), got {fraction}.")
  files = _corpus_files(data_cfg.corpus)
  if len(files) < 2:
    raise DataError(
        f"data.corpus={data_cfg.corpus!r} matches {len(files)} file(s); the "
        "train/val split needs at least 2.")
  keyed = sorted((_stable_unit(rel), rel, path) for path, rel in files.items())
  n_val = sum(1 for key, _, _ in keyed if key < fraction)
  # At least one file on each side, whatever the fraction says.
  n_val = min(max(n_val, 1), len(keyed) - 1)
  paths = [path for _, _, path in keyed]
  return paths[n_val:], paths[:n_val]


def match_files(corpus: str, key: str = "data.corpus") -> list[str]:
  """Every file of a corpus ("stdlib" or comma-separated globs), sorted, unsplit; errors name
  `key` (the config key or flag that gave the corpus)."""
  return sorted(_corpus_files(corpus, key))


def _make_data(spec: str, directory: str) -> None:
  from train.config import import_function
  try:
    make = import_function(spec)
  except ValueError as e:
    raise DataError(f"data.make: {e}") from None
  print(f"writing data with {spec} into {directory}", flush=True)
  make(directory)


def _corpus_files(corpus: str, key: str = "data.corpus") -> dict[str, str]:
  """Maps each file's absolute path to its path relative to its corpus root."""
  if corpus == STDLIB:
    root = sysconfig.get_paths()["stdlib"]
    paths = glob.glob(os.path.join(root, "**", "*.py"), recursive=True)
    # Third-party packages are not the standard library.
    return {
        os.path.abspath(p): os.path.relpath(p, root)
        for p in paths
        if "site-packages" not in os.path.relpath(p, root).split(os.sep)
        and os.path.isfile(p)
    }
  files = {}
  for pattern in (p.strip() for p in corpus.split(",")):
    if not pattern:
      continue
    pattern = os.path.expanduser(pattern)
    matched = _glob(pattern)
    if not matched:
      raise DataError(
          f"{key}: the glob {pattern!r} matches no files (corpus is "
          f"{STDLIB!r} or comma-separated globs; '**' recurses; gs://bucket/... reads GCS).")
    for path, rel in matched.items():
      files.setdefault(path, rel)
  if not files:
    raise DataError(f"{key}={corpus!r} names no glob.")
  return files


def _glob(pattern: str) -> dict[str, str]:
  """The files a glob matches, each mapped to its path relative to the glob's root: local
  paths made absolute; remote ones (gs://bucket/dir/*.jsonl) listed through etils.epath."""
  root = _glob_root(pattern)
  if not is_remote(pattern):
    return {os.path.abspath(p): os.path.relpath(p, root)
            for p in glob.glob(pattern, recursive=True) if os.path.isfile(p)}
  rest = pattern[len(root):].lstrip("/")
  base = epath.Path(root)
  matched = base.glob(rest) if rest else [base]
  return {os.fspath(p): os.fspath(p)[len(root):].lstrip("/")
          for p in matched if p.is_file()}


def open_text(path: str, newline: str | None = None):
  """A file of the corpus opened for reading as UTF-8 text (bad bytes replaced), local or
  remote (gs://...)."""
  if is_remote(path):
    return io.TextIOWrapper(epath.Path(path).open("rb"), encoding="utf-8", errors="replace",
                            newline=newline)
  return open(path, encoding="utf-8", errors="replace", newline=newline)


def _glob_root(pattern: str) -> str:
  """The directory before the first wildcard: 'data/**/*.jsonl' -> 'data'."""
  parts = pattern.split(os.sep)
  fixed = []
  for part in parts[:-1]:
    if any(ch in part for ch in "*?["):
      break
    fixed.append(part)
  return os.sep.join(fixed) or (os.sep if pattern.startswith(os.sep) else ".")


def _stable_unit(rel_path: str) -> float:
  """A number in [0, 1) from sha1 of the path: unlike hash(), same everywhere."""
  digest = hashlib.sha1(rel_path.replace(os.sep, "/").encode("utf-8")).digest()
  return int.from_bytes(digest[:8], "big") / 2.0**64


# ----------------------------------------------------------------------------
# Documents.


def read_documents(path: str, data_cfg,
                   lines: Callable[[int], bool] | None = None) -> list[str]:
  """The documents of one file: the whole file (text) or one per line (jsonl).

  lines: of a JSONL file, parse only line i (from 0) where lines(i) (a stream's share
  of a file it shares with others); a text file is one document, always read whole.
  Raises DataError naming `path:line` for a JSONL line that is not a JSON
  object with a string field `data_cfg.text_field`.
  """
  fmt = data_cfg.format
  if fmt == "text":
    # newline="" keeps the bytes as they are (\r\n included): we train on the
    # data, not on our rewrite of it.
    with open_text(path, newline="") as f:
      return [f.read()]
  if fmt == "jsonl":
    with open_text(path) as f:
      return [_jsonl_text(line, path, lineno, data_cfg.text_field)
              for lineno, line in enumerate(f, 1)
              if (lines is None or lines(lineno - 1)) and line.strip()]
  raise DataError(f"data.format={fmt!r} is not one of {FORMATS}.")


def _jsonl_text(line: str, path: str, lineno: int, field: str) -> str:
  try:
    record = json.loads(line)
  except json.JSONDecodeError as e:
    raise DataError(
        f"{path}:{lineno}: not valid JSON ({e.msg}); data.format='jsonl' "
        "expects one JSON object per line.") from None
  text = record.get(field) if isinstance(record, dict) else None
  if not isinstance(text, str):
    found = sorted(record) if isinstance(record, dict) else type(record).__name__
    raise DataError(
        f"{path}:{lineno}: no string field {field!r} (data.text_field); "
        f"found {found}.")
  return text


# ----------------------------------------------------------------------------
# The grain pipeline.


class _Encoder:
  """The tokenizer as documents need it, shared by a host's streams (one copy, not one each),
  with the ids that go around each document."""

  def __init__(self, tokenizer: tokenizers.Tokenizer, tokenizer_config: dict):
    # A copy, because we change a setting the caller should not see.
    self.tokenizer = tokenizers.Tokenizer.from_str(tokenizer.to_str())
    try:
      self.bos, self.eos = document_ids(tokenizer, tokenizer_config)
    except ValueError as e:
      raise DataError(f"The tokenizer (data.tokenizer, train.init_from): {e}.") from None
    self._configure()

  def __setstate__(self, state):
    # Worker processes get a pickled copy, which drops the flag below.
    self.__dict__.update(state)
    self._configure()

  def _configure(self):
    # Text that contains "<|endoftext|>" (or "</s>", ...) literally must not fake a
    # document boundary: encode it as the plain characters it is.
    self.tokenizer.encode_special_tokens = True


class _TokenizeFile(grain.transforms.Map):
  """path -> [{"inputs": int32[n], "targets": int32[n]}], one per document of the share."""

  def __init__(self, encoder: _Encoder, data_cfg, share: streams_lib.Share):
    self._encoder, self._share = encoder, share
    # Only what read_documents needs, as a small picklable object.
    self._cfg = types.SimpleNamespace(
        format=data_cfg.format, text_field=data_cfg.text_field)

  def map(self, path: str) -> list[dict[str, np.ndarray]]:
    texts = [t for t in read_documents(path, self._cfg, self._share.owns) if t]
    encodings = self._encoder.tokenizer.encode_batch(texts, add_special_tokens=False)
    return [self._shifted(e.ids) for e in encodings]

  def _shifted(self, ids: list[int]) -> dict[str, np.ndarray]:
    bos = [] if self._encoder.bos is None else [self._encoder.bos]
    tokens = np.asarray(bos + ids + [self._encoder.eos], np.int32)
    # Shift per document before packing: no target crosses a document edge.
    return {"inputs": tokens[:-1], "targets": tokens[1:]}


class _Documents(grain.experimental.FlatMapTransform):
  """A file's list of documents -> the documents, one element each.

  Repeating over files that hold no text would spin forever: a stream that meets twice as many
  empty files in a row as it has (so a whole epoch of them) stops with an error instead.
  """

  def __init__(self, stream: str, share: streams_lib.Share, repeat: bool):
    self._stream, self._share = stream, share
    self._limit = 2 * len(share.files) if repeat else None
    self._empty = 0

  def flat_map(self, documents):
    self._empty = 0 if documents else self._empty + 1
    if self._limit and self._empty >= self._limit:
      raise DataError(
          f"data.corpus: {self._stream} reads {self._share.describe()}, which hold(s) no "
          "text. Remove empty files, or lower data.streams (0 is one stream per row of "
          "train.batch_size) when the split has fewer files or lines than streams.")
    return documents


def _finish_row(packed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Renames the packer's features; inputs and targets share segments."""
  segment_ids = packed["inputs_segment_ids"]
  return {
      "inputs": packed["inputs"],
      "targets": packed["targets"],
      "segment_ids": segment_ids,
      "positions": packed["inputs_positions"],
      "loss_mask": (segment_ids > 0).astype(np.float32),
  }


def _padding(rows: int, seq_len: int) -> dict[str, np.ndarray]:
  """Empty rows, as batch_and_pad pads: zeros, so loss_mask is 0."""
  out = {k: np.zeros((rows, seq_len), np.int32)
         for k in ("inputs", "targets", "segment_ids", "positions")}
  out["loss_mask"] = np.zeros((rows, seq_len), np.float32)
  return out


def make_iterator(data_cfg, tokenizer: tokenizers.Tokenizer, files: list[str],
                  *, batch_size: int, seq_len: int, seed: int, shuffle: bool,
                  repeat: bool, process_index: int = 0, process_count: int = 1,
                  tokenizer_config: dict | None = None) -> streams_lib.StreamBatches:
  """A checkpointable iterator of this host's rows of each packed global batch.

  Args:
    data_cfg: the `data` config (format, text_field, streams, shuffle_rows,
      worker_count, corpus).
    tokenizer: encodes text.
    files: all files of the split (from list_files); this host reads only
      those of its streams.
    batch_size: rows per global batch (B); data.streams must divide it.
    seq_len: tokens per row (T).
    seed: shuffles each stream's file order, differently each epoch, and its rows.
    shuffle: shuffle files and rows (train) or keep their order (eval).
    repeat: cycle forever (train), or stop after one pass (eval): a stream that
      ends pads its rows with empty ones, and the pass ends when every stream has.
    process_index, process_count: this host and the number of hosts; the
      iterator yields arrays [batch_size / process_count, seq_len], this host's
      block of rows. The defaults give the whole global batch.
    tokenizer_config: the tokenizer's HF tokenizer_config (eos_token, bos_token,
      add_bos_token), which says what goes around each document; {} or None for a
      tokenizer we trained.

  Close the iterator (`it.close()`) when done, to stop its background work.
  A state restores into an iterator built with the same files and data
  settings (any process count, any data.worker_count).
  """
  n_streams = streams_lib.count(data_cfg, batch_size)
  ids = streams_lib.of_host(n_streams, process_index, process_count)
  if not files:
    raise DataError(f"data.corpus={data_cfg.corpus!r}: this split has no files.")
  if data_cfg.format not in FORMATS:
    raise DataError(f"data.format={data_cfg.format!r} is not one of {FORMATS}.")
  rows = batch_size // n_streams
  plan = streams_lib.shares(files, n_streams)
  encoder = _Encoder(tokenizer, tokenizer_config or {})
  # The row shuffle's window is shared out: the host holds shuffle_rows * (its streams / S).
  window = data_cfg.shuffle_rows // n_streams if shuffle else 0
  chunks = {s: _stream(plan[s], f"stream {s} of {n_streams}", encoder, data_cfg,
                       rows=rows, seq_len=seq_len, seed=_stream_seed(seed, s),
                       shuffle=shuffle, repeat=repeat, window=window)
            for s in ids}
  it = streams_lib.StreamBatches(chunks, _padding(rows, seq_len),
                                 workers=data_cfg.worker_count)
  if not repeat and process_count == 1 and it.exhausted:
    it.close()
    raise DataError(f"data.corpus={data_cfg.corpus!r}: the {len(files)} file(s) of this "
                    f"split hold no text (first: {files[0]}).")
  return it


def _stream_seed(seed: int, stream: int) -> int:
  """A seed of its own for each stream, from the run's seed."""
  return int(np.random.SeedSequence([seed % 2**32, stream]).generate_state(1)[0])


def _stream(share: streams_lib.Share, name: str, encoder: _Encoder, data_cfg, *,
            rows: int, seq_len: int, seed: int, shuffle: bool, repeat: bool,
            window: int) -> grain.IterDataset:
  """One stream: chunks of `rows` packed rows from its share of the files."""
  ds = grain.MapDataset.range(len(share.files)).repeat(None if repeat else 1)
  ds = ds.map_with_index(_FileOrder(share.files, seed if shuffle else None))
  # Lazily: a file is read and tokenized only when the packer gets near it.
  ds = ds.map(_TokenizeFile(encoder, data_cfg, share))
  ds = ds.to_iter_dataset(_READ_OPTIONS)
  ds = grain.experimental.FlatMapIterDataset(ds, _Documents(name, share, repeat))
  ds = _pack(ds, seq_len)
  if data_cfg.format == "text" and share.parts > 1:
    # A text file is one document: streams sharing one take turns at its packed rows.
    ds = streams_lib.EveryNth(ds, share.parts, share.part)
  ds = ds.map(_finish_row)
  if window > 1:
    # Consecutive rows come from the same file: mixing rows over a window of several files
    # keeps a row's successive batches from being one file's worth of correlated text.
    ds = _WindowShuffle(ds, window, seed)
  if repeat:
    return ds.batch(rows, drop_remainder=True)
  return ds.batch(rows, batch_fn=functools.partial(grain.experimental.batch_and_pad,
                                                   batch_size=rows))


class _FileOrder(grain.transforms.MapWithIndex):
  """(index i over the repeated epochs, position in an epoch) -> the file there: each epoch
  in its own seeded order (seed None: as listed). Not MapDataset.shuffle, whose index_shuffle
  takes about 10 ms per file on the few files of a stream."""

  def __init__(self, files: Sequence[str], seed: int | None):
    self._files, self._seed = tuple(files), seed
    self._last = (None, None)  # (epoch, its order)

  def map_with_index(self, index: int, position: int) -> str:
    if self._seed is None:
      return self._files[position]
    epoch, order = self._last
    if epoch != index // len(self._files):
      epoch = index // len(self._files)
      order = np.random.default_rng([self._seed, epoch]).permutation(len(self._files))
      self._last = epoch, order
    return self._files[order[position]]


class _WindowShuffle(grain.IterDataset):
  """Elements shuffled within consecutive windows of `size`: grain's WindowShuffleIterDataset,
  with a numpy permutation per window, because grain 0.2.18's index_shuffle takes about 2 ms
  a call on windows of tens of rows (and it calls it once per row)."""

  def __init__(self, parent: grain.IterDataset, size: int, seed: int):
    super().__init__(parent)
    self._size, self._seed = size, seed

  def __iter__(self) -> grain.DatasetIterator:
    return _WindowShuffleIterator(self._parent.__iter__(), self._size, self._seed)


class _WindowShuffleIterator(grain.DatasetIterator):

  def __init__(self, parent: grain.DatasetIterator, size: int, seed: int):
    super().__init__(parent)
    self._size, self._seed = size, seed
    self._index, self._taken, self._window = 0, 0, []
    self._start = parent.get_state()  # The parent's state where the window began.

  def _fill(self) -> None:
    self._start = self._parent.get_state()
    window = []
    for _ in range(self._size):
      try:
        window.append(next(self._parent))
      except StopIteration:
        break
    order = np.random.default_rng([self._seed, self._index]).permutation(len(window))
    self._window, self._taken = [window[i] for i in order], 0

  def __next__(self):
    if self._taken == len(self._window):
      if self._window:
        self._index += 1
      self._fill()
      if not self._window:
        raise StopIteration
    self._taken += 1
    return self._window[self._taken - 1]

  def get_state(self):
    return {"window_start": self._start, "window": self._index, "taken": self._taken}

  def set_state(self, state):
    # The window is refilled from its start: a state holds no elements, only positions.
    self._parent.set_state(state["window_start"])
    self._index = state["window"]
    self._fill()
    self._taken = state["taken"]


def _pack(ds: grain.IterDataset, seq_len: int) -> grain.IterDataset:
  """Concat-then-split: documents fill rows back to back, leaving no padding.

  A document crossing a row edge (any document longer than seq_len does) is
  split there; each piece is its own segment and its positions restart at 0.
  The piece could not attend to the earlier part anyway (it lives in another
  row), so the only cost is that a continuation looks like a document start.
  Only the very last row of a finite pass is padded.
  """
  packed = grain.experimental.ConcatThenSplitIterDataset(
      ds, length_struct={"inputs": seq_len, "targets": seq_len})
  return _JsonSafeState(packed)


class _JsonSafeState(grain.IterDataset):
  """Passes elements through; repairs the packer's state after a JSON trip.

  grain 0.2.18's packer keeps slices as tuples and tests `slice != (-1, -1)`.
  JSON (which grain's own orbax handler uses) turns them into lists, and a
  restored `[-1, -1]` then reads as a real slice: a document is lost and the
  batches after a restore differ. Turning lists back into tuples fixes it.
  """

  def __iter__(self) -> grain.DatasetIterator:
    return _JsonSafeStateIterator(self._parent.__iter__())


class _JsonSafeStateIterator(grain.DatasetIterator):

  def __next__(self):
    return next(self._parent)

  def get_state(self):
    return self._parent.get_state()

  def set_state(self, state):
    slices = state["remainder_slices"]
    slices = {key: tuple(value) for key, value in slices.items()}
    state = {**state, "remainder_slices": slices}
    self._parent.set_state(state)
