"""Tests of train/data.py, train/streams.py and train/tokenizer.py on tiny corpora in tmp_path.

Packed batches are checked against an independent path: each document encoded
on its own with the plain tokenizer, then compared with what the pipeline packed;
which stream and host reads which file against assignments written out by hand.
"""

import json
import os
import re
import shutil

import grain
import numpy as np
import pytest

from configs import base
from train import data
from train import streams
from train import tokenizer as tokenizer_lib
from train.config import ConfigError

EOS_ID = 0
ROUND_TRIP_TEXTS = [
    "def f(x):\n\treturn x  \n",  # Tabs and trailing spaces.
    "s = 'héllo wörld ✓ 日本語 🐍'\r\n",  # Unicode and a CRLF.
    "    \n\n   \t\t",  # Only whitespace.
    "",
]


def _cfg(**overrides):
  cfg = base.get_config().data
  cfg.update(overrides)
  return cfg


def _write(path, text):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w", encoding="utf-8", newline="") as f:
    f.write(text)
  return str(path)


def _code_like_text(rng, n_words):
  words = ["def", "return", "self", "x", "import", "(", ")", ":", "\n    ",
           "\t", "é", "for", "in", "range", "0", "1", " "]
  return "".join(rng.choice(words, size=n_words))


def _text_corpus(root, n_files, seed=0):
  """Files of very different lengths (some far longer than a row), in dirs."""
  rng = np.random.default_rng(seed)
  paths = []
  for i in range(n_files):
    n_words = int(rng.choice([0, 3, 20, 400]))
    text = f"file{i:03d} " + _code_like_text(rng, n_words)
    paths.append(_write(os.path.join(root, f"d{i % 3}", f"f{i:03d}.py"), text))
  return paths


@pytest.fixture(scope="module")
def tok():
  rng = np.random.default_rng(1)
  texts = [_code_like_text(rng, 200) for _ in range(50)] + ROUND_TRIP_TEXTS
  return tokenizer_lib.train_tokenizer(texts, vocab_size=300)


def _batches(it, limit=1000):
  """All batches of a finite iterator (closing it, so no thread outlives it)."""
  out = []
  for batch in it:
    out.append(batch)
    assert len(out) < limit
  it.close()
  return out


def _pieces(batches):
  """Yields (inputs, targets, positions) of each segment, in stream order."""
  for batch in batches:
    for row in range(batch["inputs"].shape[0]):
      seg = batch["segment_ids"][row]
      for s in np.unique(seg[seg > 0]):
        m = seg == s
        yield (batch["inputs"][row][m], batch["targets"][row][m],
               batch["positions"][row][m])


def _expected_stream(tok, texts):
  """inputs, targets and document start offsets, encoding each text alone."""
  docs = [[EOS_ID] + tok.encode(t, add_special_tokens=False).ids + [EOS_ID]
          for t in texts if t]
  starts = np.cumsum([0] + [len(d) - 1 for d in docs[:-1]])
  return (np.concatenate([d[:-1] for d in docs]),
          np.concatenate([d[1:] for d in docs]), set(starts.tolist()))


def _iterator(cfg, tok, files, **kwargs):
  args = dict(batch_size=3, seq_len=16, seed=0, shuffle=False, repeat=False)
  args.update(kwargs)
  return data.make_iterator(cfg, tok, files, **args)


# ----------------------------------------------------------------------------
# Files, split and documents.


def test_split_is_deterministic_disjoint_and_location_independent(tmp_path):
  _text_corpus(tmp_path / "a", 60)
  cfg = _cfg(corpus=str(tmp_path / "a" / "**" / "*.py"), val_fraction=0.2)
  train, val = data.list_files(cfg)
  assert (train, val) == data.list_files(cfg)
  assert not set(train) & set(val)
  assert len(train) + len(val) == 60 and 4 <= len(val) <= 20
  # The same corpus elsewhere splits the same, file for file.
  shutil.copytree(tmp_path / "a", tmp_path / "b")
  cfg.corpus = str(tmp_path / "b" / "**" / "*.py")
  train_b, val_b = data.list_files(cfg)
  rel = lambda paths, root: [os.path.relpath(p, tmp_path / root) for p in paths]
  assert rel(val_b, "b") == rel(val, "a")
  assert rel(train_b, "b") == rel(train, "a")


def test_split_keeps_a_file_on_each_side(tmp_path):
  _text_corpus(tmp_path, 3)
  for fraction in (0.0, 0.99):
    train, val = data.list_files(_cfg(corpus=f"{tmp_path}/**/*.py",
                                      val_fraction=fraction))
    assert len(train) >= 1 and len(val) >= 1


def test_glob_matching_nothing_names_the_key_and_glob(tmp_path):
  _text_corpus(tmp_path, 3)
  missing = str(tmp_path / "nope" / "*.txt")
  with pytest.raises(data.DataError, match="data.corpus") as e:
    data.list_files(_cfg(corpus=f"{tmp_path}/**/*.py,{missing}"))
  assert missing in str(e.value)


@pytest.mark.parametrize("bad_line, needle", [
    ("{not json", "not valid JSON"),
    ('{"content": "x"}', "'text'"),
    ('{"text": 3}', "'text'"),
    ('["text"]', "'text'"),
])
def test_bad_jsonl_line_fails_naming_file_and_line(tmp_path, tok, bad_line, needle):
  good = _write(tmp_path / "good.jsonl", '{"text": "return a"}\n' * 20)  # > a batch
  # The bad line comes late in a stream's first file: the first batch, made at
  # construction, reads that file whole.
  bad = _write(tmp_path / "bad.jsonl",
               '{"text": "a"}\n\n{"text": "b"}\n' + bad_line + "\n")
  cfg = _cfg(format="jsonl", streams=1)
  with pytest.raises(data.DataError, match=needle) as e:
    _iterator(cfg, tok, [bad, good])
  assert f"{bad}:4:" in str(e.value)
  # In a later file, it fails when reached, not before: nothing reads every file up front.
  it = _iterator(cfg, tok, [good, bad])
  with pytest.raises(data.DataError, match=needle) as e:
    _batches(it)
  it.close()
  assert f"{bad}:4:" in str(e.value)


def test_read_documents_text_and_jsonl(tmp_path):
  text = "a\r\n\tb é\n"
  path = _write(tmp_path / "x.py", text)
  assert data.read_documents(path, _cfg()) == [text]
  lines = [json.dumps({"body": t, "id": i}) for i, t in enumerate(["x", "", "y"])]
  path = _write(tmp_path / "x.jsonl", "\n".join(lines) + "\n\n")
  assert data.read_documents(path, _cfg(format="jsonl", text_field="body")) == [
      "x", "", "y"]
  # A stream sharing the file with another parses only its lines: 0 and 2 of 0..4.
  assert data.read_documents(path, _cfg(format="jsonl", text_field="body"),
                             lambda i: i % 2 == 0) == ["x", "y"]


# ----------------------------------------------------------------------------
# Tokenizer.


def test_tokenizer_round_trips_exactly(tok):
  assert tok.token_to_id(tokenizer_lib.EOS) == EOS_ID
  for text in ROUND_TRIP_TEXTS + ["never seen: ¿Qué? ∑ 𝔘 \x00\x7f"]:
    assert tok.decode(tok.encode(text).ids) == text


def test_tokenizer_respects_vocab_size():
  rng = np.random.default_rng(2)
  texts = [" ".join(f"w{x}" for x in rng.integers(0, 10**6, 500))
           for _ in range(20)]
  tokenizer = tokenizer_lib.train_tokenizer(texts, vocab_size=300)
  assert tokenizer.get_vocab_size() == 300  # Enough text to fill it exactly.
  with pytest.raises(ValueError, match="257"):
    tokenizer_lib.train_tokenizer(texts, vocab_size=200)


def test_load_or_train_saves_then_reloads_identically(tmp_path):
  files = _text_corpus(tmp_path / "c", 10)
  cfg = _cfg(tokenizer_train_mb=0.002)
  workdir = str(tmp_path / "run")
  first = tokenizer_lib.load_or_train_tokenizer(cfg, workdir, 300, files)
  assert os.path.exists(os.path.join(workdir, "tokenizer.json"))
  # No training files now: it must load the saved one, not retrain.
  again = tokenizer_lib.load_or_train_tokenizer(cfg, workdir, 300, [])
  sample = open(files[0]).read()
  assert again.encode(sample).ids == first.encode(sample).ids
  with pytest.raises(ValueError, match="model.vocab_size"):
    tokenizer_lib.load_or_train_tokenizer(cfg, workdir, 100, [])
  # An explicit data.tokenizer is used, and copied into a new workdir.
  cfg.tokenizer = os.path.join(workdir, "tokenizer.json")
  other = str(tmp_path / "run2")
  explicit = tokenizer_lib.load_or_train_tokenizer(cfg, other, 300, [])
  assert explicit.to_str() == first.to_str()
  assert os.path.exists(os.path.join(other, "tokenizer.json"))


# ----------------------------------------------------------------------------
# Packing.


def _check_rows(batch, batch_size, seq_len):
  """Shapes, dtypes and the per-row invariants of a packed batch."""
  dtypes = {"inputs": np.int32, "targets": np.int32, "segment_ids": np.int32,
            "positions": np.int32, "loss_mask": np.float32}
  assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
      k: ((batch_size, seq_len), d) for k, d in dtypes.items()}
  for row in range(batch_size):
    seg = batch["segment_ids"][row]
    real = seg > 0
    np.testing.assert_array_equal(batch["loss_mask"][row], real)
    # Padding only at the end; segments contiguous and numbered 1, 2, ...
    assert np.all(np.diff(real.astype(int)) <= 0)
    np.testing.assert_array_equal(np.unique(seg[real]),
                                  np.arange(1, len(np.unique(seg[real])) + 1))
    assert np.all(np.diff(seg[real]) >= 0)
    assert not batch["inputs"][row][~real].any()
  for inputs, targets, positions in _pieces([batch]):
    np.testing.assert_array_equal(targets[:-1], inputs[1:])
    np.testing.assert_array_equal(positions, np.arange(len(inputs)))


def test_packing_keeps_every_document_whole_and_in_order(tmp_path, tok):
  files = _text_corpus(tmp_path, 12)
  batches = _batches(_iterator(_cfg(streams=1), tok, files))
  for batch in batches:
    _check_rows(batch, 3, 16)
  pieces = list(_pieces(batches))
  inputs = np.concatenate([p[0] for p in pieces])
  targets = np.concatenate([p[1] for p in pieces])
  texts = [open(f, newline="").read() for f in files]
  want_inputs, want_targets, doc_starts = _expected_stream(tok, texts)
  np.testing.assert_array_equal(inputs, want_inputs)
  np.testing.assert_array_equal(targets, want_targets)
  # No segment spans two documents: every document starts a segment.
  piece_starts = np.cumsum([0] + [len(p[0]) for p in pieces[:-1]])
  assert doc_starts <= set(piece_starts.tolist())
  # Concat-then-split: every row but the last is full.
  rows = np.concatenate([b["segment_ids"] for b in batches])
  used = rows[(rows > 0).any(axis=1)]
  assert (used[:-1] > 0).all()


def test_eos_written_in_a_document_is_plain_text(tmp_path, tok):
  texts = ["a <|endoftext|> b", "c"]
  files = [_write(tmp_path / f"{i}.txt", t) for i, t in enumerate(texts)]
  batches = _batches(_iterator(_cfg(streams=1), tok, files))
  inputs = np.concatenate([p[0] for p in _pieces(batches)])
  assert (inputs == EOS_ID).sum() == len(texts)  # Only real boundaries.
  assert tok.decode(inputs.tolist(), skip_special_tokens=False) == "".join(
      tokenizer_lib.EOS + t for t in texts)


def test_jsonl_documents_are_packed(tmp_path, tok):
  texts = ["short", "", "x" * 70, "def f():\n\treturn 1\n"]
  path = _write(tmp_path / "a.jsonl",
                "\n".join(json.dumps({"text": t}) for t in texts))
  other = _write(tmp_path / "b.jsonl", json.dumps({"text": "tail"}) + "\n")
  batches = _batches(_iterator(_cfg(format="jsonl", streams=1), tok, [path, other]))
  inputs = np.concatenate([p[0] for p in _pieces(batches)])
  np.testing.assert_array_equal(
      inputs, _expected_stream(tok, texts + ["tail"])[0])


def _stream_rows(batches, s, rows):
  """Stream s's block of rows of each batch, one after another: its rows in order."""
  return {k: np.concatenate([b[k][s * rows:(s + 1) * rows] for b in batches])
          for k in batches[0]}


def test_each_stream_packs_its_own_files_in_order_and_pads_its_end(tmp_path, tok):
  files = _text_corpus(tmp_path, 12)
  texts = [open(f, newline="").read() for f in files]
  batches = _batches(_iterator(_cfg(streams=3), tok, files, batch_size=6))  # 2 rows a stream
  for s in range(3):
    rows = _stream_rows(batches, s, 2)
    inputs = np.concatenate([p[0] for p in _pieces([rows])])
    # Stream s reads files s, s + 3, s + 6, s + 9, in order, and nothing else.
    np.testing.assert_array_equal(inputs, _expected_stream(tok, texts[s::3])[0])
    used = (rows["segment_ids"] > 0).any(axis=1)
    assert used[:used.sum()].all()  # full rows, then only padding


def _open_counter(monkeypatch):
  """Paths opened by train/data.py's reading (in grain's background thread too)."""
  opened = []

  def counting_open(path, *args, **kwargs):
    opened.append(str(path))
    return open(path, *args, **kwargs)
  monkeypatch.setattr(data, "open", counting_open, raising=False)
  return opened


def _host_batches(cfg, tok, files, hosts, n, **kwargs):
  """Each host's first n batches (padding_batch() once it has run out, as the loop feeds)."""
  out = []
  for h in range(hosts):
    it = _iterator(cfg, tok, files, process_index=h, process_count=hosts, **kwargs)
    batches = [next(it, None) for _ in range(n)]
    out.append([it.padding_batch() if b is None else b for b in batches])
    it.close()
  return out


@pytest.mark.parametrize("repeat", [True, False])
def test_hosts_together_give_the_one_process_batches(tmp_path, tok, repeat):
  files = _text_corpus(tmp_path, 8)
  kwargs = dict(batch_size=4, shuffle=repeat, repeat=repeat, seed=3)
  n = 8 if repeat else len(_batches(_iterator(_cfg(), tok, files, **kwargs)))
  [want] = _host_batches(_cfg(shuffle_rows=8), tok, files, 1, n, **kwargs)
  for hosts in (2, 4):
    got = _host_batches(_cfg(shuffle_rows=8), tok, files, hosts, n, **kwargs)
    for i in range(n):
      for key in want[i]:
        np.testing.assert_array_equal(np.concatenate([g[i][key] for g in got]), want[i][key])


def test_each_host_opens_only_its_streams_files(tmp_path, tok, monkeypatch):
  files = _text_corpus(tmp_path, 8)
  opened = _open_counter(monkeypatch)
  # 4 streams (one per row) of 8 files: stream s reads files s and s + 4; host 0 of 2 builds
  # streams 0 and 1, host 1 streams 2 and 3.
  for h, share in enumerate([{0, 4, 1, 5}, {2, 6, 3, 7}]):
    opened.clear()
    _batches(_iterator(_cfg(), tok, files, batch_size=4, process_index=h, process_count=2))
    assert set(opened) == {files[i] for i in share}
  # Fewer files than streams: streams share files, each taking every other line (JSONL) or
  # packed row (text); a host still opens only its streams' files.
  lines = [json.dumps({"text": f"line {i} " + "x" * i}) for i in range(12)]
  jsonl = [_write(tmp_path / f"{i}.jsonl", "\n".join(lines[i::3])) for i in range(3)]
  for fmt, split in (("jsonl", jsonl), ("text", files[:3])):
    kwargs = dict(batch_size=6, shuffle=True, repeat=True, seed=1)
    [want] = _host_batches(_cfg(format=fmt), tok, split, 1, 4, **kwargs)
    got = _host_batches(_cfg(format=fmt), tok, split, 3, 4, **kwargs)
    for i in range(4):
      np.testing.assert_array_equal(np.concatenate([g[i]["inputs"] for g in got]),
                                    want[i]["inputs"])
    # 6 streams of 3 files: stream s reads file s % 3; host 2 of 3 builds streams 4 and 5.
    opened.clear()
    it = _iterator(_cfg(format=fmt), tok, split, process_index=2, process_count=3, **kwargs)
    it.close()
    assert set(opened) == {split[1], split[2]}


def test_streams_sharing_a_jsonl_file_split_its_lines(tmp_path, tok):
  texts = [f"document {i} " + "y" * (3 * i) for i in range(9)]
  path = _write(tmp_path / "one.jsonl", "\n".join(json.dumps({"text": t}) for t in texts))
  batches = _batches(_iterator(_cfg(format="jsonl"), tok, [path], batch_size=3))
  for s in range(3):  # stream s: lines s, s + 3, s + 6, in order
    inputs = np.concatenate([p[0] for p in _pieces([_stream_rows(batches, s, 1)])])
    np.testing.assert_array_equal(inputs, _expected_stream(tok, texts[s::3])[0])


def test_a_stream_with_no_text_is_an_error_naming_it(tmp_path, tok):
  # Two one-line files for four streams: streams 2 and 3 would own lines that do not exist.
  files = [_write(tmp_path / f"{i}.jsonl", json.dumps({"text": "abc"}) + "\n")
           for i in range(2)]
  with pytest.raises(data.DataError, match=r"stream 2 of 4 reads .*0\.jsonl.*no text"):
    _iterator(_cfg(format="jsonl"), tok, files, batch_size=4, repeat=True)
  with pytest.raises(ConfigError, match="data.streams=3"):
    _iterator(_cfg(streams=3), tok, files, batch_size=4)
  with pytest.raises(ConfigError, match="multiple of the 3 processes"):
    _iterator(_cfg(), tok, files, batch_size=4, process_count=3)


def test_repeat_shuffles_each_epoch_differently(tmp_path, tok):
  files = _text_corpus(tmp_path, 8)
  it = _iterator(_cfg(shuffle_rows=0), tok, files, shuffle=True, repeat=True, seq_len=8,
                 batch_size=1)
  # Read three epochs' worth of rows and find the file order in each.
  text = tok.decode(np.concatenate(
      [next(it)["inputs"][0] for _ in range(600)]).tolist())
  it.close()
  order = re.findall(r"file\d{3}", text)[:24]
  epochs = [order[:8], order[8:16], order[16:24]]
  assert all(sorted(e) == sorted(epochs[0]) for e in epochs)
  assert len({tuple(e) for e in epochs}) > 1


def test_row_shuffle_permutes_rows_within_a_window(tmp_path, tok):
  files = _text_corpus(tmp_path, 8)

  def rows(shuffle_rows):
    it = _iterator(_cfg(shuffle_rows=shuffle_rows), tok, files, shuffle=True, repeat=True,
                   seq_len=8, batch_size=16)
    out = np.concatenate([next(it)["inputs"] for _ in range(4)])  # one window of 64 rows
    it.close()
    return [tuple(r) for r in out]

  plain, mixed = rows(0), rows(64)
  assert sorted(mixed) == sorted(plain) and mixed != plain


# ----------------------------------------------------------------------------
# Checkpointing the iterator.


@pytest.mark.parametrize("skip", [0, 3])
def test_state_restores_the_next_batches(tmp_path, tok, skip):
  files = _text_corpus(tmp_path, 12)
  make = lambda: _iterator(_cfg(), tok, files, shuffle=True, repeat=True,
                           seed=7, batch_size=2)
  it = make()
  for _ in range(skip):
    next(it)
  state = json.loads(json.dumps(it.get_state()))  # As a checkpoint stores it.
  want = [next(it) for _ in range(2)]
  it.close()
  restored = make()
  restored.set_state(state)
  got = [next(restored) for _ in range(2)]
  restored.close()
  for w, g in zip(want, got):
    for key in w:
      np.testing.assert_array_equal(g[key], w[key])


def test_resume_mid_epoch_on_another_number_of_hosts(tmp_path, tok):
  files = _text_corpus(tmp_path, 12)
  make = lambda h, hosts: _iterator(_cfg(shuffle_rows=8), tok, files, batch_size=4, seed=5,
                                    shuffle=True, repeat=True, process_index=h,
                                    process_count=hosts)
  its = [make(h, 2) for h in range(2)]
  for it in its:
    for _ in range(3):
      next(it)
  # What the loop saves: the hosts' states (each its own streams') merged, through JSON.
  state = json.loads(json.dumps(streams.merge_states([it.get_state() for it in its])))
  want = [[next(it) for it in its] for _ in range(3)]
  for it in its:
    it.close()
  for hosts in (1, 4):
    resumed = [make(h, hosts) for h in range(hosts)]
    for it in resumed:
      it.set_state(state)
    for parts in want:
      got = [next(it) for it in resumed]
      for key in parts[0]:
        np.testing.assert_array_equal(np.concatenate([g[key] for g in got]),
                                      np.concatenate([p[key] for p in parts]))
    for it in resumed:
      it.close()
  it = make(1, 2)
  with pytest.raises(ConfigError, match=r"stream\(s\) \[2, 3\]"):
    it.set_state({"streams": {"0": None, "1": None}})  # host 0's streams only
  it.close()


def test_orbax_checkpoint_round_trip(tmp_path, tok):
  ocp = pytest.importorskip("orbax.checkpoint")
  files = _text_corpus(tmp_path / "c", 12)
  make = lambda: _iterator(_cfg(), tok, files, shuffle=True, repeat=True)
  it = make()
  for _ in range(3):
    next(it)
  options = ocp.CheckpointManagerOptions(enable_async_checkpointing=True)
  with ocp.CheckpointManager(tmp_path / "ckpt", options=options) as manager:
    manager.save(3, args=ocp.args.Composite(
        step=ocp.args.JsonSave({"step": 3}),
        data=grain.checkpoint.CheckpointSave(it)))
    # The iterator state was taken during save(): moving on is safe.
    want = [next(it) for _ in range(2)]
    manager.wait_until_finished()
  it.close()
  restored = make()
  with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
    manager.restore(manager.latest_step(), args=ocp.args.Composite(
        step=ocp.args.JsonRestore(),
        data=grain.checkpoint.CheckpointRestore(restored)))
  got = [next(restored) for _ in range(2)]
  restored.close()
  for w, g in zip(want, got):
    np.testing.assert_array_equal(g["inputs"], w["inputs"])
    np.testing.assert_array_equal(g["segment_ids"], w["segment_ids"])


def test_worker_processes_give_the_same_batches(tmp_path, tok):
  files = _text_corpus(tmp_path, 6)
  local = _batches(_iterator(_cfg(), tok, files))
  # 3 streams on 2 workers: worker 0 runs streams 0 and 2, worker 1 stream 1.
  it = _iterator(_cfg(worker_count=2), tok, files)
  workers = [next(it) for _ in range(3)]
  state = it.get_state()
  workers += _batches(it)
  assert len(workers) == len(local)
  for w, g in zip(local, workers):
    np.testing.assert_array_equal(g["inputs"], w["inputs"])
  # A state taken with workers restores without them.
  it = _iterator(_cfg(), tok, files)
  it.set_state(state)
  np.testing.assert_array_equal(next(it)["inputs"], local[3]["inputs"])
  it.close()


# ----------------------------------------------------------------------------
# The real corpus.


def test_stdlib_corpus_end_to_end(tmp_path):
  cfg = _cfg(corpus="stdlib", tokenizer_train_mb=1.0)
  train, val = data.list_files(cfg)
  assert len(train) > 500 and len(val) >= 1
  assert all(p.endswith(".py") and "site-packages" not in p for p in train)
  tokenizer = tokenizer_lib.load_or_train_tokenizer(cfg, str(tmp_path), 512,
                                                    train)
  assert tokenizer.get_vocab_size() == 512
  it = data.make_iterator(cfg, tokenizer, train, batch_size=4, seq_len=256,
                          seed=0, shuffle=True, repeat=True)
  batch = next(it)
  it.close()
  _check_rows(batch, 4, 256)
  assert batch["loss_mask"].all()  # Long files: rows are packed full.
  text = tokenizer.decode(batch["inputs"][0].tolist())
  assert "\n" in text and len(text) > 256
