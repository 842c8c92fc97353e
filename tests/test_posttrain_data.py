"""Tests of train/posttrain_data.py on tiny tokenizers and rows in tmp_path.

Expected spans come from an independent path: the completion text itself (and
infer/chat.py's render_chat for templated rows), decoded back from the trained
targets of the batches, not from the module's own token lists.
"""

import json
import types

import numpy as np
import pytest

from infer.chat import render_chat
from train import data
from train import posttrain_data as pt
from train import streams
from train.data import DataError
from train.tokenizer import train_tokenizer

EOS = "<|endoftext|>"
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}")
TEXTS = ["Question: what is two plus two?\nAnswer: four.\n",
         "def add(a, b):\n  return a + b\n", "The cat sat on the mat. Hello world!"]


def _cfg(**kw):
  base = dict(seq_len=64, truncation="keep_end", skip_bad_rows=False, pack=False, streams=0)
  return types.SimpleNamespace(**{**base, **kw})


@pytest.fixture(scope="module")
def tok():
  return train_tokenizer(TEXTS * 20, vocab_size=300)


@pytest.fixture(scope="module")
def chat_tok():
  t = train_tokenizer(TEXTS * 20, vocab_size=300)
  t.add_special_tokens(["<|im_start|>", "<|im_end|>"])
  return t


@pytest.fixture(scope="module")
def plain(tok):
  return pt.Formatter(tok, {}, _cfg())


@pytest.fixture(scope="module")
def chatml(chat_tok):
  return pt.Formatter(chat_tok, {"chat_template": CHATML}, _cfg())


def _all(it, limit=200):
  out = []
  for batch in it:
    out.append(batch)
    assert len(out) < limit
  return out


def _decode(tok, ids):
  return tok.decode([int(i) for i in ids], skip_special_tokens=False)


def _segments(batch, prefix=""):
  """(inputs, targets, mask) per packed example, in order."""
  out = []
  for r in range(batch[prefix + "inputs"].shape[0]):
    seg = batch[prefix + "segment_ids"][r]
    for s in range(1, seg.max() + 1):
      sel = seg == s
      out.append(tuple(batch[prefix + k][r][sel].tolist()
                       for k in ("inputs", "targets", "loss_mask")))
  return out


def _trained_runs(tok, inputs, targets, mask):
  """Decoded text of each run of consecutive trained targets."""
  runs, cur = [], []
  for t, m in zip(targets, mask):
    if m:
      cur.append(t)
    elif cur:
      runs.append(cur)
      cur = []
  runs += [cur] if cur else []
  return [_decode(tok, r) for r in runs]


def _sft(rows, formatter, **kw):
  cfg = _cfg(**{k: kw.pop(k) for k in list(kw) if k in ("seq_len", "truncation", "pack",
                                                           "skip_bad_rows")})
  it = pt.sft_batches(rows, formatter, cfg, batch_size=kw.pop("batch_size", 2),
                      seed=kw.pop("seed", 0), shuffle=kw.pop("shuffle", False),
                      repeat=kw.pop("repeat", False))
  return it


SFT_ROWS = [
    ({"prompt": "Question: what is two plus two?\n", "completion": "Answer: four."},
     "Question: what is two plus two?\n", "Answer: four."),
    ({"instruction": "Add.", "input": "a, b", "output": "return a + b"},
     "Add.\n\na, b", "return a + b"),
    ({"instruction": "Greet.", "input": "", "output": "Hello world!"}, "Greet.", "Hello world!"),
    ({"messages": [{"role": "user", "content": "The cat?"},
                   {"role": "assistant", "content": "sat on the mat."}]},
     "The cat?", "sat on the mat."),
]


@pytest.mark.parametrize("row,prompt,completion", SFT_ROWS)
def test_plain_sft_trains_on_completion_and_eos(tok, plain, row, prompt, completion):
  [batch] = _all(_sft([row], plain, batch_size=1))
  [(inputs, targets, mask)] = _segments(batch)
  # The whole example is BOS (= EOS) + prompt + completion + EOS.
  assert _decode(tok, inputs + targets[-1:]) == EOS + prompt + completion + EOS
  assert _trained_runs(tok, inputs, targets, mask) == [completion + EOS]
  # Pad id 0 equals the EOS id: the final EOS still counts, padding does not.
  assert targets[-1] == tok.token_to_id(EOS) == 0
  n = len(inputs)
  assert batch["loss_mask"][0, n - 1] == 1 and batch["loss_mask"][0, n:].sum() == 0
  assert (batch["targets"][0, n:] == 0).all() and (batch["segment_ids"][0, n:] == 0).all()


@pytest.mark.parametrize("row,prompt,completion", SFT_ROWS)
def test_chatml_sft_matches_render_chat(chat_tok, chatml, row, prompt, completion):
  [batch] = _all(_sft([row], chatml, batch_size=1))
  [(inputs, targets, mask)] = _segments(batch)
  messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
  full = render_chat(CHATML, messages, add_generation_prompt=False)
  # Everything the template renders, but the "\n" after the final <|im_end|>.
  assert _decode(chat_tok, inputs + targets[-1:]) == full[:-1]
  assert _trained_runs(chat_tok, inputs, targets, mask) == [completion + "<|im_end|>"]
  assert chatml.eos_ids[0] == chat_tok.token_to_id("<|im_end|>")


MULTI = {"messages": [
    {"role": "system", "content": "Be brief."}, {"role": "user", "content": "two plus two?"},
    {"role": "assistant", "content": "four."}, {"role": "user", "content": "The cat?"},
    {"role": "assistant", "content": "sat on the mat."}, {"role": "user", "content": "bye"}]}


def test_multi_turn_trains_every_assistant_turn(tok, chat_tok, plain, chatml):
  [batch] = _all(_sft([MULTI], chatml, batch_size=1, seq_len=128))
  [(inputs, targets, mask)] = _segments(batch)
  assert _trained_runs(chat_tok, inputs, targets, mask) == [
      "four.<|im_end|>", "sat on the mat.<|im_end|>"]
  # Context is the template's render; the trailing user turn is not trained on.
  full = render_chat(CHATML, MULTI["messages"][:5], add_generation_prompt=False)
  assert _decode(chat_tok, inputs + targets[-1:]) == full[:-1]
  [batch] = _all(_sft([MULTI], plain, batch_size=1))
  [(inputs, targets, mask)] = _segments(batch)
  assert _trained_runs(tok, inputs, targets, mask) == ["four." + EOS, "sat on the mat." + EOS]
  assert _decode(tok, inputs) == EOS + "Be brief.two plus two?four." + EOS + "The cat?sat on the mat."


def test_literal_special_tokens_in_text_stay_text(tok, chat_tok, plain, chatml):
  row = {"prompt": f"say {EOS} or <|im_end|>", "completion": "ok <|im_end|>"}
  ids, trainable = plain.sft(row)
  assert ids.count(0) == 2  # The BOS and the final EOS, never the text's.
  ids, trainable = chatml.sft(row)
  im_end = chat_tok.token_to_id("<|im_end|>")
  assert ids.count(im_end) == 2 and ids[-1] == im_end and 0 not in ids
  trained = [i for i, t in zip(ids, trainable) if t]
  assert _decode(chat_tok, trained) == "ok <|im_end|><|im_end|>"


def test_packing_keeps_examples_whole_and_equal_to_unpacked(plain):
  rows = [{"prompt": f"Question {i}: " + "two " * (i % 5), "completion": "four." * (1 + i % 3)}
          for i in range(13)]
  unpacked = [s for b in _all(_sft(rows, plain, batch_size=3)) for s in _segments(b)]
  packed_batches = _all(_sft(rows, plain, batch_size=3, pack=True))
  assert len(unpacked) == 13 and len(packed_batches) < 5
  assert [s for b in packed_batches for s in _segments(b)] == unpacked
  for b in packed_batches:
    for r in range(3):
      seg, pos = b["segment_ids"][r], b["positions"][r]
      n = (seg > 0).sum()
      assert (seg[n:] == 0).all() and (np.diff(seg[:n]) >= 0).all() and seg[0] in (0, 1)
      for s in range(1, seg.max() + 1):
        assert pos[seg == s].tolist() == list(range((seg == s).sum()))
      assert b["loss_mask"][r][seg == 0].sum() == 0


def test_keep_end_truncation_keeps_prompt_end(tok, plain):
  prompt = "".join(f"Question {i}? " for i in range(30))
  row = {"prompt": prompt, "completion": "Answer: four."}
  it = _sft([row], plain, batch_size=1, seq_len=24)
  [batch] = _all(it)
  [(inputs, targets, mask)] = _segments(batch)
  text = _decode(tok, inputs + targets[-1:])
  assert len(inputs) == 23 and text.endswith("Answer: four." + EOS)
  assert (EOS + prompt + "Answer: four." + EOS).endswith(text)
  assert _trained_runs(tok, inputs, targets, mask) == ["Answer: four." + EOS]
  assert it.stats["truncated"] == 1 and it.stats["dropped"] == 0


def test_keep_end_cuts_a_too_long_completion(tok, plain):
  row = {"prompt": "Question: ", "completion": "Hello world! " * 30}
  it = _sft([row], plain, batch_size=1, seq_len=16)
  [(inputs, targets, mask)] = _segments(next(it))
  assert len(inputs) == 15 and sum(mask) == 15 and targets[-1] != 0
  assert ("Question: " + "Hello world! " * 30).endswith(_decode(tok, inputs[:1]) + "Hello world! " * 30)
  assert it.stats["completion_cut"] == 1 and it.stats["truncated"] == 1


def test_drop_truncation_drops_and_counts(plain):
  rows = [{"prompt": "Question " * 40, "completion": "four."}, {"prompt": "Q", "completion": "four."}]
  it = _sft(rows, plain, batch_size=2, seq_len=20, truncation="drop")
  [batch] = _all(it)
  assert len(_segments(batch)) == 1
  assert it.stats == {**it.stats, "rows": 2, "examples": 1, "dropped": 1, "truncated": 0}


def test_no_row_without_trainable_tokens(plain, chatml):
  rows = [{"prompt": "Question " * i, "completion": "Hello world! " * (1 + i % 4)} for i in range(12)]
  for formatter in (plain, chatml):
    for seq_len in (2, 3, 8, 40):
      for pack in (False, True):
        it = _sft(rows, formatter, seq_len=seq_len, pack=pack, batch_size=4)
        segments = [s for b in _all(it) for s in _segments(b)]
        assert len(segments) == it.stats["examples"]
        assert all(sum(mask) >= 1 for _, _, mask in segments)
        assert it.stats["examples"] + it.stats["dropped"] == 12


def _write_jsonl(path, lines):
  path.write_text("".join(line + "\n" for line in lines))
  return str(path)


def test_bad_rows_name_path_and_line(tmp_path, plain):
  good = json.dumps({"prompt": "Q", "completion": "A"})
  cases = [("{not json", "not valid JSON"), ("[1, 2]", "JSON object"),
           (json.dumps({"prompt": "Q"}), "'completion'"),
           (json.dumps({"prompt": "Q", "completion": ""}), "empty"),
           (json.dumps({"prompt": 3, "completion": "A"}), "'prompt' must be a string"),
           (json.dumps({"messages": [{"role": "user", "content": "hi"}]}), "no assistant")]
  for i, (bad, expected) in enumerate(cases):
    path = _write_jsonl(tmp_path / f"bad{i}.jsonl", [good, "", bad])
    with pytest.raises(DataError, match=rf"bad{i}\.jsonl:3: .*{expected}"):
      pt.read_rows(path, "sft", _cfg())
  path = _write_jsonl(tmp_path / "mixed.jsonl", [good] + [bad for bad, _ in cases] + [good])
  it = pt.make_batches("sft", [path], plain, _cfg(skip_bad_rows=True), batch_size=4, seed=0,
                       shuffle=False, repeat=False)
  assert len(_segments(next(it))) == 2
  assert it.stats["skipped_bad"] == len(cases) and it.stats["rows"] == 2
  path = _write_jsonl(tmp_path / "pairs.jsonl", [json.dumps({"prompt": "Q", "chosen": "A"})])
  with pytest.raises(DataError, match=r"pairs\.jsonl:1: missing field 'rejected'"):
    pt.make_batches("pairs", [path], plain, _cfg(), batch_size=1, seed=0, shuffle=False,
                    repeat=False)


def _pairs(n):
  return [{"prompt": f"Question {i}: two plus two?", "chosen": "four." + "!" * i,
           "rejected": "five", **({"margin": 0.5} if i % 2 else {})} for i in range(n)]


@pytest.mark.parametrize("templated", [False, True])
def test_pair_batches(tok, chat_tok, plain, chatml, templated):
  formatter, t = (chatml, chat_tok) if templated else (plain, tok)
  end = "<|im_end|>" if templated else EOS
  rows = _pairs(5)
  batches = _all(pt.pair_batches(rows, formatter, _cfg(), batch_size=2, seed=0,
                                 shuffle=False, repeat=False))
  assert len(batches) == 3 and batches[-1]["valid"].tolist() == [1, 0]
  seen = []
  for b in batches:
    for r in range(2):
      if not b["valid"][r]:
        assert b["chosen_loss_mask"][r].sum() == 0 and b["chosen_segment_ids"][r].sum() == 0
        continue
      answers = []
      for p in ("chosen", "rejected"):
        inputs, last = b[f"{p}_inputs"][r], b[f"{p}_last"][r]
        n = int(b[f"{p}_segment_ids"][r].sum())
        assert last == n - 1 and inputs[last] == formatter.eos_ids[0]
        mask = b[f"{p}_loss_mask"][r]
        assert mask[n - 1:].sum() == 0  # The last input's target is padding.
        trained = b[f"{p}_targets"][r][mask == 1]
        assert (trained == inputs[1:n][mask[:n - 1] == 1]).all()
        answers.append(_decode(t, trained))
        prompt_len = n - len(trained)
        assert b[f"{p}_positions"][r][:n].tolist() == list(range(n))
      assert b["chosen_inputs"][r][:prompt_len].tolist() == b["rejected_inputs"][r][:prompt_len].tolist()
      i = len(answers[0]) - len("four." + end)
      assert answers == [rows[i]["chosen"] + end, rows[i]["rejected"] + end]
      assert b["margin"][r] == rows[i].get("margin", 0.0)
      seen.append(i)
  assert sorted(seen) == list(range(5))


def test_pair_truncation_shares_the_prompt_cut(tok, plain):
  row = {"prompt": "Question " * 20, "chosen": "Hello world! " * 3, "rejected": "four."}
  it = pt.pair_batches([row], plain, _cfg(seq_len=24), batch_size=1, seed=0, shuffle=False,
                       repeat=False)
  b = next(it)
  assert it.stats["truncated"] == 1
  assert b["chosen_last"][0] == 23  # The longer answer fills the row exactly.
  n_prompt = 24 - int(b["chosen_loss_mask"][0].sum())
  assert b["rejected_inputs"][0][:n_prompt].tolist() == b["chosen_inputs"][0][:n_prompt].tolist()
  assert _decode(tok, b["chosen_inputs"][0][:24]).endswith("Question " + "Hello world! " * 3 + EOS)


def test_prompt_batches(chat_tok, chatml, plain):
  rows = [{"prompt": "two plus two?", "answer": "4"},
          {"messages": [{"role": "system", "content": "Be brief."},
                        {"role": "user", "content": "The cat?"},
                        {"role": "assistant", "content": "ignored"}]},
          {"prompt": "Question " * 40}]
  it = pt.prompt_batches(rows, chatml, _cfg(seq_len=48), batch_size=2, seed=0, shuffle=False,
                         repeat=False)
  b1, b2 = _all(it)
  assert b1["prompts"] == ["two plus two?", "The cat?"] and b1["rows"][0]["answer"] == "4"
  expected = render_chat(CHATML, rows[1]["messages"][:2], add_generation_prompt=True)
  assert _decode(chat_tok, b1["prompt_ids"][1]) == expected
  assert len(b2["prompt_ids"][0]) == 47 and b2["valid"].tolist() == [1, 0]
  assert _decode(chat_tok, b2["prompt_ids"][0]).endswith("Question <|im_end|>\n<|im_start|>assistant\n")
  assert it.stats["truncated"] == 1
  it = pt.prompt_batches(rows, plain, _cfg(seq_len=32, truncation="drop"), batch_size=2, seed=0,
                         shuffle=False, repeat=False)
  assert len(_all(it)) == 1 and it.stats["dropped"] == 1


def _take(it, n):
  return [next(it) for _ in range(n)]


def _same(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


@pytest.mark.parametrize("kind", ["sft", "pairs"])
def test_state_resumes_to_identical_batches(plain, kind):
  if kind == "sft":
    rows = [{"prompt": f"Q{i} " * (i % 4), "completion": "four." * (1 + i % 3)} for i in range(11)]
    build, cfg = pt.sft_batches, _cfg(seq_len=24, pack=True)
  else:
    rows, build, cfg = _pairs(7), pt.pair_batches, _cfg()
  make = lambda: build(rows, plain, cfg, batch_size=2, seed=3, shuffle=True, repeat=True)
  it = make()
  _take(it, 3)
  state = json.loads(json.dumps(it.get_state()))
  expected = _take(it, 8)  # Crosses epoch boundaries.
  assert it.get_state()["streams"]["0"]["epoch"] >= 2
  resumed = make()
  resumed.set_state(state)
  _same(_take(resumed, 8), expected)
  with pytest.raises(DataError, match="same files"):
    build(rows[:-1], plain, cfg, batch_size=2, seed=3, shuffle=True, repeat=True).set_state(state)


def test_train_epochs_reshuffle_and_drop_the_remainder(tmp_path, tok, plain):
  rows = _pairs(7)
  it = pt.pair_batches(rows, plain, _cfg(), batch_size=2, seed=0, shuffle=True, repeat=True)
  # Answers "four." + "!" * i tell the rows apart.
  order = [len(_decode_answer(b, r)) for b in _take(it, 9) for r in range(2)]
  epochs = [order[:6], order[6:12], order[12:]]
  assert all(len(set(e)) == 6 for e in epochs)  # 3 full batches an epoch; 1 row left over.
  assert len({tuple(e) for e in epochs}) == 3
  with pytest.raises(DataError, match="no training batch"):
    next(pt.pair_batches(rows, plain, _cfg(), batch_size=8, seed=0, shuffle=True, repeat=True))
  # From a file, two streams (one per row) share its lines: 0, 2, 4, 6 feed row 0 of each
  # batch and 1, 3, 5 row 1, each stream in epochs of its own, reshuffled.
  path = _write_jsonl(tmp_path / "pairs.jsonl", [json.dumps(r) for r in rows])
  it = pt.make_batches("pairs", [path], plain, _cfg(), batch_size=2, seed=0, shuffle=True,
                       repeat=True)
  batches = _take(it, 12)
  for s, own in ((0, [0, 2, 4, 6]), (1, [1, 3, 5])):
    order = [_decode(tok, _decode_answer(b, s)).count("!") for b in batches]  # row i: i "!"s
    epochs = [order[i:i + len(own)] for i in range(0, 12, len(own))]
    assert all(sorted(e) == own for e in epochs) and len({tuple(e) for e in epochs}) > 1
  with pytest.raises(DataError, match="stream 7 of 8 .* has 0 examples.*no training batch"):
    next(pt.make_batches("pairs", [path], plain, _cfg(), batch_size=8, seed=0, shuffle=True,
                         repeat=True))


def _decode_answer(batch, r):
  return batch["chosen_targets"][r][batch["chosen_loss_mask"][r] == 1]


def test_streams_sharing_a_file_each_pack_their_own_lines_in_order(tmp_path, plain):
  rows = [{"prompt": f"Question {i}: " + "two " * (i % 3), "completion": "four." * (1 + i % 2)}
          for i in range(9)]
  path = _write_jsonl(tmp_path / "one.jsonl", [json.dumps(r) for r in rows])
  batches = _all(pt.make_batches("sft", [path], plain, _cfg(pack=True), batch_size=3, seed=0,
                                 shuffle=False, repeat=False))
  for s in range(3):  # stream s (row s of each batch): lines s, s + 3, s + 6
    alone = [seg for b in _all(_sft(rows[s::3], plain, batch_size=1)) for seg in _segments(b)]
    mine = [seg for b in batches for seg in _segments({k: v[s:s + 1] for k, v in b.items()})]
    assert mine == alone and len(mine) == 3


@pytest.mark.parametrize("kind", ["sft", "pairs"])
def test_hosts_read_only_their_rows_and_together_give_the_one_process_batches(
    tmp_path, plain, monkeypatch, kind):
  if kind == "sft":
    rows = [{"prompt": f"Question {i}: ", "completion": "four." + "!" * i} for i in range(24)]
  else:
    rows = _pairs(24)
  files = [_write_jsonl(tmp_path / f"{i}.jsonl", [json.dumps(r) for r in rows[i::6]])
           for i in range(6)]
  opened = []

  def counting_open(path, *args, **kwargs):
    opened.append(path)
    return open(path, *args, **kwargs)
  # Post-training rows are read through train/data.py's open_text.
  monkeypatch.setattr(data, "open", counting_open, raising=False)
  cfg = _cfg(seq_len=32, pack=kind == "sft")

  def hosts_batches(hosts, n, **kwargs):
    """Each host's first n batches side by side, padding_batch() once a host has run out."""
    its = [pt.make_batches(kind, files, plain, cfg, batch_size=4, seed=1, process_index=h,
                           process_count=hosts, **kwargs) for h in range(hosts)]
    out = [[next(it, None) for it in its] for _ in range(n)]
    return its, [{k: _cat([it.padding_batch()[k] if b is None else b[k]
                          for it, b in zip(its, parts)]) for k in want_keys}
                 for parts in out]

  want_keys = pt.make_batches(kind, files, plain, cfg, batch_size=4, seed=1, shuffle=False,
                              repeat=False).padding_batch().keys()
  for kwargs in (dict(shuffle=True, repeat=True), dict(shuffle=False, repeat=False)):
    _, want = hosts_batches(1, 8, **kwargs)
    for hosts in (2, 4):
      _same(hosts_batches(hosts, 8, **kwargs)[1], want)
  # Resuming on another number of hosts: the hosts' states, merged, restore anywhere.
  its, _ = hosts_batches(2, 3, shuffle=True, repeat=True)
  state = json.loads(json.dumps(streams.merge_states([it.get_state() for it in its])))
  want = [[next(it) for it in its] for _ in range(5)]
  want = [{k: _cat([p[k] for p in parts]) for k in want_keys} for parts in want]
  resumed = pt.make_batches(kind, files, plain, cfg, batch_size=4, seed=1, shuffle=True,
                            repeat=True)
  resumed.set_state(state)
  _same(_take(resumed, 5), want)
  # 4 streams over 6 files: stream s reads files s and s + 4; host 0 of 2 has streams 0 and
  # 1, host 1 streams 2 and 3.
  for h, share in enumerate([{0, 4, 1, 5}, {2, 3}]):
    opened.clear()
    pt.make_batches(kind, files, plain, cfg, batch_size=4, seed=1, shuffle=True, repeat=True,
                    process_index=h, process_count=2)
    assert set(opened) == {files[i] for i in share}


def _cat(values):
  return np.concatenate(values) if isinstance(values[0], np.ndarray) else sum(values, [])


@pytest.mark.parametrize("pack", [False, True])
def test_eval_pass_covers_each_row_once(tok, plain, pack):
  rows = [{"prompt": f"Question {i}: ", "completion": "x" * (i + 1)} for i in range(7)]
  batches = _all(_sft(rows, plain, batch_size=3, pack=pack, seq_len=16))
  answers = [run for b in batches for s in _segments(b) for run in _trained_runs(tok, *s)]
  assert sorted(answers) == sorted(r["completion"] + EOS for r in rows)
  assert all(b["inputs"].shape == (3, 16) for b in batches)
  if not pack:  # 7 rows in batches of 3: the last has 2 empty rows.
    assert len(batches) == 3 and (batches[-1]["segment_ids"][1:] == 0).all()
    assert batches[-1]["loss_mask"][1:].sum() == 0


def test_stop_ids_and_template_errors(tok, chat_tok, plain, chatml):
  assert plain.eos_ids == (0,) and plain.tokenizer is tok
  im_end = chat_tok.token_to_id("<|im_end|>")
  assert chatml.eos_ids == (im_end, 0)
  assert pt.Formatter(chat_tok, {"eos_token": "<|im_end|>"}).eos_ids == (im_end,)
  # A template that renders earlier turns differently once a later one exists.
  rewriting = ("{% for m in messages %}{{ m['content'] if loop.last else '...' }}<|im_end|>"
               "{% endfor %}")
  formatter = pt.Formatter(chat_tok, {"chat_template": rewriting})
  with pytest.raises(DataError, match=r"where\.jsonl:7: formatting failed.*prefix"):
    pt.sft_batches([("where.jsonl:7", MULTI)], formatter, _cfg(), batch_size=1, seed=0,
                   shuffle=False, repeat=False)
