"""Training data: corpus files -> documents -> tokens -> packed rows [B, T].

The pipeline of one host, built with grain:

  this host's files -> shuffled per epoch -> repeated -> read and tokenized
  (lazily, one file at a time) -> one element per document -> packed
  concat-then-split into rows of T tokens -> batches of B rows.

Each document becomes `[EOS] + encode(text) + [EOS]` and is shifted into
inputs/targets *before* packing, so a target never comes from another document.
Every batch is a dict of numpy arrays, all [B, T]:
  inputs, targets: int32 token ids.
  segment_ids: int32, 1, 2, 3... per packed piece of a document; 0 is padding.
  positions: int32, restarting at 0 in each segment.
  loss_mask: float32, 1 on real tokens, 0 on padding.

The iterator is checkpointable: `it.get_state()` is JSON-serialisable and
`it.set_state(state)` on a fresh iterator built with the same arguments
continues with the batches that would have come next.
"""

import functools
import glob
import hashlib
import json
import os
import sysconfig
import types
from collections.abc import Iterator

from absl import flags
import grain
import numpy as np
import tokenizers

# The document separator (GPT-2 convention), also used as BOS. Defined here,
# and re-exported by train.tokenizer, so that imports run one way only:
# tokenizer -> data.
EOS = "<|endoftext|>"
FORMATS = ("text", "jsonl")
STDLIB = "stdlib"

# Files tokenized ahead of the packer, and the threads doing it. Small, because
# the host has few cores and they are shared with the training step.
_READ_THREADS = 2
_READ_AHEAD_FILES = 8
# Batches kept ready by a background thread, so data work overlaps the step.
_BATCHES_AHEAD = 2


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
  if data_cfg.make and not glob.glob(first_glob):
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


def match_files(corpus: str) -> list[str]:
  """Every file of a corpus ("stdlib" or comma-separated globs), sorted, unsplit."""
  return sorted(_corpus_files(corpus))


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
    root = _glob_root(pattern)
    matched = [p for p in glob.glob(pattern, recursive=True)
               if os.path.isfile(p)]
    if not matched:
      raise DataError(
          f"{key}: the glob {pattern!r} matches no files (corpus is "
          f"{STDLIB!r} or comma-separated globs; '**' recurses).")
    for p in matched:
      files.setdefault(os.path.abspath(p), os.path.relpath(p, root))
  if not files:
    raise DataError(f"{key}={corpus!r} names no glob.")
  return files


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


def read_documents(path: str, data_cfg) -> list[str]:
  """The documents of one file: the whole file (text) or one per line (jsonl).

  Raises DataError naming `path:line` for a JSONL line that is not a JSON
  object with a string field `data_cfg.text_field`.
  """
  fmt = data_cfg.format
  if fmt == "text":
    # newline="" keeps the bytes as they are (\r\n included): we train on the
    # data, not on our rewrite of it.
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
      return [f.read()]
  if fmt == "jsonl":
    with open(path, encoding="utf-8", errors="replace") as f:
      return [_jsonl_text(line, path, lineno, data_cfg.text_field)
              for lineno, line in enumerate(f, 1) if line.strip()]
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


def _check_files(files: list[str], data_cfg) -> None:
  """Fails now, not hours into training, on a bad JSONL line or empty shard."""
  if data_cfg.format == "jsonl":
    has_text = False
    for path in files:  # Reads every line: that is the point.
      has_text |= any(read_documents(path, data_cfg))
  elif data_cfg.format == "text":
    has_text = any(os.path.getsize(path) > 0 for path in files)
  else:
    raise DataError(f"data.format={data_cfg.format!r} is not one of {FORMATS}.")
  if not has_text:
    # A repeating pipeline over no text would spin forever.
    raise DataError(
        f"data.corpus={data_cfg.corpus!r}: the {len(files)} file(s) of this "
        f"shard hold no text (first: {files[0]}).")


# ----------------------------------------------------------------------------
# The grain pipeline.


class _TokenizeFile(grain.transforms.Map):
  """path -> [{"inputs": int32[n], "targets": int32[n]}], one per document."""

  def __init__(self, tokenizer: tokenizers.Tokenizer, data_cfg):
    # A copy, because we change a setting the caller should not see.
    self._tokenizer = tokenizers.Tokenizer.from_str(tokenizer.to_str())
    self._eos = tokenizer.token_to_id(EOS)
    if self._eos is None:
      raise DataError(
          f"The tokenizer has no {EOS!r} token (see data.tokenizer).")
    # Only what read_documents needs, as a small picklable object.
    self._cfg = types.SimpleNamespace(
        format=data_cfg.format, text_field=data_cfg.text_field)
    self._configure()

  def __setstate__(self, state):
    # Worker processes get a pickled copy, which drops the flag below.
    self.__dict__.update(state)
    self._configure()

  def _configure(self):
    # Text that contains "<|endoftext|>" literally must not fake a document
    # boundary: encode it as the plain characters it is.
    self._tokenizer.encode_special_tokens = True

  def map(self, path: str) -> list[dict[str, np.ndarray]]:
    texts = [t for t in read_documents(path, self._cfg) if t]
    encodings = self._tokenizer.encode_batch(texts, add_special_tokens=False)
    return [self._shifted(e.ids) for e in encodings]

  def _shifted(self, ids: list[int]) -> dict[str, np.ndarray]:
    tokens = np.empty(len(ids) + 2, np.int32)
    tokens[0] = tokens[-1] = self._eos
    tokens[1:-1] = ids
    # Shift per document before packing: no target crosses a document edge.
    return {"inputs": tokens[:-1], "targets": tokens[1:]}


class _Documents(grain.experimental.FlatMapTransform):
  """A file's list of documents -> the documents, one element each."""

  def flat_map(self, documents):
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


def make_iterator(data_cfg, tokenizer: tokenizers.Tokenizer, files: list[str],
                  *, batch_size: int, seq_len: int, seed: int, shuffle: bool,
                  repeat: bool, shard_index: int = 0,
                  shard_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
  """A checkpointable iterator of packed batches; arrays [batch_size, seq_len].

  Args:
    data_cfg: the `data` config (format, text_field, worker_count, corpus).
    tokenizer: encodes text; must contain EOS.
    files: all files of the split (from list_files); this host reads
      files[shard_index::shard_count].
    batch_size: rows per batch on this host (B).
    seq_len: tokens per row (T).
    seed: shuffles the file order, differently each epoch.
    shuffle: shuffle files (train) or keep their order (eval).
    repeat: cycle forever (train), or stop after one pass (eval; the last
      batch is padded with empty rows so every batch has the same shape).
    shard_index, shard_count: this host's index and the number of hosts.

  Close the iterator (`it.close()`) when done, to stop its background thread.
  A state restores only into an iterator built with the same arguments and
  the same data_cfg.worker_count.
  """
  shard = files[shard_index::shard_count]
  if not shard:
    raise DataError(
        f"Shard {shard_index} of {shard_count} gets no files: the split has "
        f"{len(files)}. Add files to data.corpus or lower data.val_fraction.")
  _check_files(shard, data_cfg)
  ds = _documents(shard, tokenizer, data_cfg, seed=seed, shuffle=shuffle,
                  repeat=repeat)
  ds = _pack(ds, seq_len).map(_finish_row)
  if shuffle and data_cfg.shuffle_rows > 1:
    # Consecutive rows come from the same file: mixing rows over a window of several files
    # keeps each batch from being one file's worth of correlated text.
    ds = grain.experimental.WindowShuffleIterDataset(
        ds, window_size=data_cfg.shuffle_rows, seed=seed % 2**32)
  if repeat:
    ds = ds.batch(batch_size, drop_remainder=True)
  else:
    ds = ds.batch(batch_size, batch_fn=functools.partial(
        grain.experimental.batch_and_pad, batch_size=batch_size))
  return iter(_prefetch(ds, data_cfg.worker_count))


def _documents(files: list[str], tokenizer: tokenizers.Tokenizer, data_cfg, *,
               seed: int, shuffle: bool, repeat: bool) -> grain.IterDataset:
  """One element per document, {"inputs", "targets"}, in file order."""
  ds = grain.MapDataset.source(files)
  if shuffle:
    # MapDataset.shuffle reseeds with seed + epoch once repeat() runs past the
    # first epoch, so each epoch gets its own order.
    ds = ds.shuffle(seed=seed % 2**32)
  ds = ds.repeat(None if repeat else 1)
  # Lazily: a file is read and tokenized only when the packer gets near it.
  ds = ds.map(_TokenizeFile(tokenizer, data_cfg))
  ds = ds.to_iter_dataset(grain.ReadOptions(
      num_threads=_READ_THREADS, prefetch_buffer_size=_READ_AHEAD_FILES))
  return grain.experimental.FlatMapIterDataset(ds, _Documents())


def _prefetch(ds: grain.IterDataset, worker_count: int) -> grain.IterDataset:
  """Runs the pipeline in worker processes, or in one background thread."""
  if worker_count > 0:
    _use_default_absl_flags()
    # Each worker runs the whole pipeline on its own slice of the files, so
    # the batches (and a saved state) depend on worker_count.
    return ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
  return grain.experimental.ThreadPrefetchIterDataset(
      ds, prefetch_buffer_size=_BATCHES_AHEAD)


def _use_default_absl_flags() -> None:
  """grain's worker processes read absl flags, which only absl.app parses."""
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()  # The defaults: what an absl program gets.


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
