"""Post-training data: JSONL rows -> token ids -> fixed-shape numpy batches.

Post-training sets fit in host memory, so a host reads, checks and tokenizes its rows up front: a
bad row fails before the first step, and batching is deterministic, checkpointable arithmetic.
As in pretraining (train/streams.py), the rows of a batch come from data.streams independent
streams, each with its own rows of the files, and a host reads only the rows of its streams.

Rows, one JSON object per line, by kind:
  sft:     {"messages": [{"role": "system"|"user"|"assistant", "content"}, ...]} (every assistant
           turn is trained on), {"prompt", "completion"}, or {"instruction", "input"?, "output"}.
  pairs:   {"prompt", "chosen", "rejected", "margin"? (a number)}.
  prompts: {"prompt"} or {"messages"} (trailing assistant turns are ignored); other fields are
           kept and handed back in the batch's "rows".

Formatter: with tokenizer_config["chat_template"], an assistant turn's trainable tokens are what
it adds to the template's render, through the end-of-turn token after it (<|im_end|>). Without
one (our tiny models), texts are concatenated as they are after the BOS that pretraining
documents start with (infer/files.py's document_ids: our tokenizers' EOS, none for Qwen), and
each completion ends with a trainable EOS.

An example (prompt + completion) has at most T = data.seq_len tokens, a generation prompt T - 1.
data.truncation="keep_end" cuts the prompt's start (and the completion's end if it alone is too
long); "drop" skips the example. Both are counted in `it.stats`.

The builders' docstrings give the batch keys. Train iterators (repeat=True) reshuffle each
stream every epoch and drop its last partial chunk of rows; eval ones (repeat=False) make one
pass, padding a stream's rows with empty ones (masks 0, valid 0) once it has run out.
"""

import functools
import json
import re
from collections.abc import Callable, Sequence

import numpy as np
import tokenizers

from infer import chat
from infer.files import document_ids
from train import streams as streams_lib
from train.data import DataError, open_text

KINDS = ("sft", "pairs", "prompts")
TRUNCATIONS = ("keep_end", "drop")
ROLES = ("system", "user", "assistant")
# Put inside special-token strings of user text so they no longer match, and removed before
# that text is encoded as plain characters. A Unicode noncharacter: absent from real text.
_MARK = "\ufdd0"
_PROBE = "Probe-7f3a"  # Assistant content that finds a template's end of turn.


# ----------------------------------------------------------------------------------------------
# Rows.


def read_rows(path: str, kind: str, data_cfg, counts: dict | None = None,
              lines: Callable[[int], bool] | None = None) -> list[tuple[int, dict]]:
  """(line number, row) of each good row of a JSONL file of `kind`; with `lines`, only of
  line i (from 0) where lines(i): the others are not parsed.

  A bad row raises DataError naming `path:line`; with data.skip_bad_rows it is skipped and
  counted in counts["skipped_bad"].
  """
  if kind not in KINDS:
    raise DataError(f"kind={kind!r} is not one of {KINDS}.")
  rows = []
  with open_text(path) as f:
    for lineno, line in enumerate(f, 1):
      if (lines is not None and not lines(lineno - 1)) or not line.strip():
        continue
      try:
        row = json.loads(line)
        problem = row_problem(row, kind)
      except json.JSONDecodeError as e:
        problem = f"not valid JSON ({e.msg})"
      if problem:
        _bad_row(f"{path}:{lineno}", problem, kind, data_cfg, counts)
      else:
        rows.append((lineno, row))
  return rows


def row_problem(row, kind: str) -> str | None:
  """What is wrong with `row` as a row of `kind`, or None."""
  if not isinstance(row, dict):
    return f"expected a JSON object, got {type(row).__name__}"
  if kind == "sft":
    if "messages" in row:
      return _messages_problem(row["messages"], for_training=True)
    if "instruction" in row or "output" in row:
      return _str_problem(row, "instruction", "output", optional=("input",))
    if "prompt" in row or "completion" in row:
      return _str_problem(row, "prompt", "completion")
    return ("an sft row has 'messages', 'prompt'+'completion' or 'instruction'+'output'; "
            f"found keys {sorted(row)}")
  if "prompt" not in row and "messages" in row:
    problem = _messages_problem(row["messages"], for_training=False)
  else:
    problem = _str_problem(row, "prompt", None)
  if kind != "pairs" or problem:
    return problem
  margin = row.get("margin", 0.0)
  if not isinstance(margin, (int, float)) or isinstance(margin, bool):
    return f"'margin' must be a number, got {margin!r:.40}"
  return _str_problem(row, None, "chosen") or _str_problem(row, None, "rejected")


def _str_problem(row, prompt, answer, optional=()):
  """Checks that row[prompt] is a string and row[answer] a non-empty one (None: no check)."""
  for key in filter(None, (prompt, answer, *optional)):
    if key not in row:
      if key not in optional:
        return f"missing field {key!r} (found {sorted(row)})"
    elif not isinstance(row[key], str):
      return f"field {key!r} must be a string, got {type(row[key]).__name__}"
    elif key == answer and not row[key]:
      return f"field {key!r} is empty: nothing to train on"
  return None


def _messages_problem(messages, *, for_training):
  if not isinstance(messages, list) or not messages:
    return "'messages' must be a non-empty list of {'role', 'content'} objects"
  for i, m in enumerate(messages):
    if not (isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)):
      return f"messages[{i}] must be {{'role': one of {ROLES}, 'content': str}}, got {m!r:.80}"
    if for_training and m["role"] == "assistant" and not m["content"]:
      return f"messages[{i}] is an empty assistant turn"
  if for_training and not any(m["role"] == "assistant" for m in messages):
    return "'messages' has no assistant turn to train on"
  if not for_training and not _strip_answers(messages):
    return "'messages' has no user or system turn to prompt with"
  return None


def _strip_answers(messages):
  """The conversation without its trailing assistant turns: the prompt."""
  end = len(messages)
  while end and messages[end - 1]["role"] == "assistant":
    end -= 1
  return messages[:end]


def _bad_row(where, problem, kind, data_cfg, counts):
  if not data_cfg.skip_bad_rows:
    raise DataError(f"{where}: {problem}; expected a {kind!r} row (formats: "
                    "train/posttrain_data.py). data.skip_bad_rows=True skips and counts them.")
  if counts is not None:
    counts["skipped_bad"] = counts.get("skipped_bad", 0) + 1


# ----------------------------------------------------------------------------------------------
# Formatting and tokenizing.


class Formatter:
  """Rows -> token ids, through the model's chat template or plain concatenation.

  tokenizer: a tokenizers.Tokenizer (encoding uses a copy). tokenizer_config: HF
  tokenizer_config.json contents (chat_template, eos_token, bos_token), {} for our own models.
  data_cfg: kept for callers; formatting reads none of it.
  """

  def __init__(self, tokenizer: tokenizers.Tokenizer, tokenizer_config: dict, data_cfg=None):
    self.tokenizer, self.data_cfg = tokenizer, data_cfg  # tokenizer: for callers' decoding.
    self.tokenizer_config = dict(tokenizer_config or {})
    # Encodes special-token strings as the characters they are (train/data.py's trick).
    self._plain = tokenizers.Tokenizer.from_str(tokenizer.to_str())
    self._plain.encode_special_tokens = True
    self._specials = {t.content: i for i, t in tokenizer.get_added_tokens_decoder().items()
                      if t.special}
    # Longest first, so a special token never matches inside a longer one.
    alternatives = sorted(map(re.escape, self._specials), key=len, reverse=True)
    self._special_re = re.compile("|".join(alternatives)) if alternatives else None
    template = self.tokenizer_config.get("chat_template")
    if isinstance(template, list):  # HF's named templates: the "default" one.
      template = {t.get("name"): t.get("template") for t in template}.get("default")
    self._render = chat.compile_chat(template) if template else None
    self._variables = chat.special_tokens(self.tokenizer_config)
    end_of_turn = self._end_of_turn() if self._render else None
    try:
      bos, eos = document_ids(tokenizer, self.tokenizer_config)
    except ValueError as e:  # A template's end of turn alone can end answers.
      if end_of_turn is None:
        raise DataError(f"The tokenizer: {e}: completions would have no end to learn.") from None
      bos = eos = None
    self._eos_ids = tuple(dict.fromkeys(i for i in (end_of_turn, eos) if i is not None))
    # Plain prompts start as pretraining documents do (and as infer/loaders.py encodes them).
    self._bos = [] if bos is None else [bos]

  @property
  def eos_ids(self) -> tuple[int, ...]:
    """Ids that end a completion (the end of turn first, then EOS): stop generating on them."""
    return self._eos_ids

  def sft(self, row: dict) -> tuple[list[int], list[bool]]:
    """(ids, trainable) of a whole SFT example; it ends with its last trained token."""
    messages = _sft_messages(row)
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    ids, trainable = [], []
    for piece, train in self._pieces(messages[:last + 1]):
      ids += piece
      trainable += [train] * len(piece)
    end = len(trainable) - trainable[::-1].index(True)  # What follows would train nothing.
    return ids[:end], trainable[:end]

  def pair(self, row: dict) -> tuple[list[int], list[int], list[int]]:
    """(prompt_ids, chosen_ids, rejected_ids); each answer ends with its EOS / end of turn."""
    return self.prompt(row), self._answer(row, row["chosen"]), self._answer(row, row["rejected"])

  def prompt(self, row: dict) -> list[int]:
    """The ids to generate from (with the template's generation prompt when there is one)."""
    messages = _prompt_messages(row)
    if not self._render:
      return self._bos + [t for m in messages for t in self._literal(m["content"])]
    return self._encode(self._chat(messages, True))

  def _pieces(self, messages) -> list[tuple[list[int], bool]]:
    """(ids, trainable) pieces of a conversation that ends with an assistant turn."""
    if not self._render:
      return [(self._bos, False)] + [
          (self._literal(m["content"]) + [self._eos_ids[0]], True) if m["role"] == "assistant"
          else (self._literal(m["content"]), False) for m in messages]
    # Incremental rendering: turn i's tokens are render(turns <= i) minus render(turns < i),
    # so every assistant turn is trained on, each in its own context.
    pieces, done = [], ""
    for i, m in enumerate(messages):
      if m["role"] == "assistant":
        prompt, full = self._prompt_and_full(messages[:i], m["content"], done)
        pieces += [(self._encode(prompt[len(done):]), False)]
        pieces += self._answer_pieces(full[len(prompt):])
        done = full
    return pieces

  def _answer(self, row, text) -> list[int]:
    if not self._render:
      return self._literal(text) + [self._eos_ids[0]]
    prompt, full = self._prompt_and_full(_prompt_messages(row), text, "")
    return self._answer_pieces(full[len(prompt):])[0][0]

  def _prompt_and_full(self, before, answer, done) -> tuple[str, str]:
    prompt = self._chat(before, True)
    full = self._chat(before + [{"role": "assistant", "content": answer}], False)
    if not (prompt.startswith(done) and full.startswith(prompt)):
      raise ValueError("the chat template's render of a conversation is not a prefix of its "
                       "render with one more turn (it rewrites earlier turns), so an answer's "
                       "tokens cannot be cut out of it")
    return prompt, full

  def _answer_pieces(self, text) -> list[tuple[list[int], bool]]:
    """An answer's rendered text -> [(through its end of turn, True), (the rest, False)]."""
    ids = self._encode(text)
    stop = next((i for i, t in enumerate(ids) if t in self._eos_ids), None)
    if stop is None:  # The template ends no turn: end it ourselves.
      return [(ids + [self._eos_ids[0]], True)]
    return [(ids[:stop + 1], True), (ids[stop + 1:], False)]

  def _chat(self, messages, add_generation_prompt) -> str:
    messages = [dict(m, content=self._escape(m["content"])) for m in messages]
    return self._render(messages, add_generation_prompt=add_generation_prompt, **self._variables)

  def _escape(self, text) -> str:
    """Marks the special-token strings of user text, so that _encode keeps them text."""
    if not self._special_re:
      return text
    return self._special_re.sub(lambda m: m[0][0] + _MARK + m[0][1:], text)

  def _encode(self, text) -> list[int]:
    """Rendered text -> ids: the template's special-token strings become their tokens (split
    there, as the tokenizer itself splits), the rest is text."""
    ids, start = [], 0
    for m in self._special_re.finditer(text) if self._special_re else ():
      ids += self._literal(text[start:m.start()]) + [self._specials[m[0]]]
      start = m.end()
    return ids + self._literal(text[start:])

  def _literal(self, text) -> list[int]:
    text = text.replace(_MARK, "")
    return self._plain.encode(text, add_special_tokens=False).ids if text else []

  def _end_of_turn(self) -> int | None:
    """The special token the template puts right after an answer, if any."""
    probe = [{"role": "user", "content": "?"}, {"role": "assistant", "content": _PROBE}]
    try:
      text = self._chat(probe, False)
    except Exception:  # A template that rejects the probe: EOS alone ends answers.
      return None
    ids = self._encode(text[text.rfind(_PROBE) + len(_PROBE):].lstrip(" "))
    return ids[0] if ids and ids[0] in self._specials.values() else None


def _sft_messages(row):
  if "messages" in row:
    return row["messages"]
  if "completion" in row:
    prompt, answer = row["prompt"], row["completion"]
  else:  # Alpaca
    prompt, answer = row["instruction"], row["output"]
    prompt += "\n\n" + row["input"] if row.get("input") else ""
  return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]


def _prompt_messages(row):
  if isinstance(row.get("prompt"), str):
    return [{"role": "user", "content": row["prompt"]}]
  return _strip_answers(row["messages"])


def prompt_text(row: dict) -> str:
  """The raw prompt a reward function gets: "prompt", else the last non-assistant message."""
  return _prompt_messages(row)[-1]["content"]


# ----------------------------------------------------------------------------------------------
# Examples: a formatted row cut to at most T tokens, or None when dropped (and counted).


def _sft_example(formatter, row, max_len, policy, counts):
  ids, trainable = formatter.sft(row)
  if len(ids) > max_len:
    if policy == "drop":
      return _drop(counts)
    counts["truncated"] += 1
    head = trainable.index(True)  # The prompt before the first answer.
    if len(ids) - head < max_len:  # Keep the prompt's end, nearest the answer.
      start = len(ids) - max_len
    else:  # The answers alone are too long: one prompt token for context, then their start.
      counts["completion_cut"] += 1
      start = max(head - 1, 0)
    ids, trainable = ids[start:start + max_len], trainable[start:start + max_len]
  if not any(trainable[1:]):  # The first token is never a target.
    return _drop(counts)
  return np.asarray(ids, np.int32), np.asarray(trainable, np.float32)


def _pair_example(formatter, row, max_len, policy, counts):
  prompt, chosen, rejected = formatter.pair(row)
  longest = max(len(chosen), len(rejected))
  if len(prompt) + longest > max_len:
    if policy == "drop":
      return _drop(counts)
    counts["truncated"] += 1
    if longest < max_len:  # One prompt cut for both answers: the longer one decides it.
      prompt = prompt[len(prompt) + longest - max_len:]
    else:
      counts["completion_cut"] += 1
      prompt = prompt[-1:]
      chosen, rejected = chosen[:max_len - len(prompt)], rejected[:max_len - len(prompt)]
  if min(len(chosen), len(rejected)) - (not prompt) < 1:  # No answer token is a target.
    return _drop(counts)
  return prompt, chosen, rejected, float(row.get("margin", 0.0))


def _prompt_example(formatter, row, max_len, policy, counts):
  ids = formatter.prompt(row)
  if len(ids) >= max_len:  # Leave room for at least one generated token.
    if policy == "drop":
      return _drop(counts)
    counts["truncated"] += 1
    ids = ids[len(ids) - max_len + 1:]
  return ids, prompt_text(row), row


def _drop(counts):
  counts["dropped"] += 1
  return None


# ----------------------------------------------------------------------------------------------
# Batches.


class Batches:
  """A checkpointable iterator of batches over examples, in streams (train/streams.py).

  `streams` maps each of this host's streams to its examples; stream s (of `count`) fills rows
  [s*R, (s+1)*R) of the global batch, R = `rows`, and the batch holds this host's streams in
  order. A stream's rows take its examples in its epoch order (a seeded permutation per stream
  and epoch when shuffling): one per row, or with `capacity` whole examples packed greedily (one
  that does not fit starts the next row). A stream's chunk of R rows never spans two of its
  epochs, so its state is (epoch, position).
  """

  def __init__(self, streams: dict[int, list], collate, *, count, rows, seed, shuffle, repeat,
               stats, sizes=None, capacity=None):
    if rows < 1:
      raise DataError(f"batch_size must be >= 1, got {rows * count}.")
    self._examples, self._collate, self._count, self._rows = streams, collate, count, rows
    self._seed, self._shuffle, self._repeat = seed % 2**32, shuffle, repeat
    self._sizes, self._capacity, self._stats = sizes, capacity, dict(stats)
    self._epoch = dict.fromkeys(streams, 0)
    self._position = dict.fromkeys(streams, 0)
    self._orders = {}

  @property
  def stats(self) -> dict:
    """Counts over this host's streams: rows, examples, truncated, completion_cut, dropped,
    skipped_bad."""
    return dict(self._stats)

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    taken = {s: self._chunk(s) for s in self._examples}
    if not any(rows for rows, _ in taken.values()):  # a finite pass that has ended
      raise StopIteration
    for s, (_, end) in taken.items():
      self._position[s] = end
    rows = [(s, row) for s, (chunk, _) in taken.items()
            for row in chunk + [[]] * (self._rows - len(chunk))]  # [] is a padding row
    return self._batch(rows)

  def padding_batch(self) -> dict:
    """A batch of padding only, shaped as this host's batches."""
    return self._batch([(s, []) for s in self._examples for _ in range(self._rows)])

  def _batch(self, rows) -> dict:
    batch = self._collate(len(rows), [[self._examples[s][i] for i in row] for s, row in rows])
    if self._capacity is None:  # one example per row: which (-1: padding), to key per-example
      # data (DPO's precomputed reference): i * count + s is the same for any host count.
      batch["index"] = np.array([row[0] * self._count + s if row else -1 for s, row in rows],
                                np.int32)
    return batch

  def _chunk(self, s) -> tuple[list[list[int]], int]:
    """Stream s's next R rows (example indices; fewer at the end of a finite pass) and the
    position they end at, moving on to its next epoch when this one cannot fill them."""
    while True:
      rows, end = self._take(s, self._order(s), self._position[s])
      if len(rows) == self._rows or not self._repeat:
        return rows, end
      if self._position[s] == 0:  # Else this loop would spin forever.
        raise DataError(f"stream {s} of {self._count} (data.streams; 0 is one per row) has "
                        f"{len(self._examples[s])} examples, which fill fewer than its "
                        f"{self._rows} row(s) of a batch: an epoch yields no training batch. "
                        "Add rows or lower data.streams or train.batch_size.")
      self._epoch[s], self._position[s] = self._epoch[s] + 1, 0  # Drops the epoch's remainder.

  def _order(self, s) -> np.ndarray:
    epoch = self._epoch[s]
    if self._orders.get(s, (None,))[0] != epoch:
      n, rng = len(self._examples[s]), np.random.default_rng((self._seed, s, epoch))
      self._orders[s] = epoch, rng.permutation(n) if self._shuffle else np.arange(n)
    return self._orders[s][1]

  def _take(self, s, order, pos) -> tuple[list[list[int]], int]:
    """Up to R rows of example indices from order[pos:], and where they end."""
    rows, row, used = [], [], 0
    while pos < len(order) and len(rows) < self._rows:
      i = int(order[pos])
      if self._capacity is None:
        rows.append([i])
      elif row and used + self._sizes[s][i] > self._capacity:
        rows.append(row)
        row, used = [], 0
        continue
      else:
        row.append(i)
        used += self._sizes[s][i]
      pos += 1
    return rows + ([row] if row else []), pos

  def get_state(self) -> dict:
    return {"streams": {str(s): {"epoch": self._epoch[s], "position": self._position[s],
                                 "examples": len(examples)}
                        for s, examples in self._examples.items()}}

  def set_state(self, state: dict) -> None:
    for s, saved in streams_lib.pick(state, list(self._examples)).items():
      if saved["examples"] != len(self._examples[s]):
        raise DataError(f"The data state was saved over {saved['examples']} examples in "
                        f"stream {s}, this iterator has {len(self._examples[s])}: resume with "
                        "the same files and data config.")
      self._epoch[s], self._position[s] = int(saved["epoch"]), int(saved["position"])

  def close(self) -> None:
    pass


def _batches(kind, streams, formatter, data_cfg, *, count, rows, seed, shuffle, repeat, stats):
  """Checks, formats and cuts every row of `kind` of each stream; the Batches over what is kept.

  streams: {stream: its rows (row dicts, or (location, row) pairs)} of this host's streams.
  """
  if kind not in KINDS:
    raise DataError(f"kind={kind!r} is not one of {KINDS}.")
  if data_cfg.truncation not in TRUNCATIONS:
    raise DataError(f"data.truncation={data_cfg.truncation!r} is not one of {TRUNCATIONS}.")
  if data_cfg.seq_len < 2:
    raise DataError(f"data.seq_len={data_cfg.seq_len} must be at least 2.")
  make, collate = _KINDS[kind]
  counts = dict.fromkeys(("rows", "examples", "truncated", "completion_cut", "dropped",
                          "skipped_bad"), 0) | dict(stats or {})
  examples = {s: _examples(kind, make, stream_rows, formatter, data_cfg, counts)
              for s, stream_rows in streams.items()}
  counts["examples"] = sum(map(len, examples.values()))
  packed = kind == "sft" and data_cfg.pack
  return Batches(examples, functools.partial(collate, data_cfg.seq_len), count=count, rows=rows,
                 seed=seed, shuffle=shuffle, repeat=repeat, stats=counts,
                 # An example of n tokens fills n - 1 (input, target) slots.
                 sizes={s: [len(ids) - 1 for ids, _ in e] for s, e in examples.items()}
                 if packed else None,
                 capacity=data_cfg.seq_len if packed else None)


def _examples(kind, make, rows, formatter, data_cfg, counts) -> list:
  examples = []
  for i, item in enumerate(rows):
    where, row = item if isinstance(item, tuple) else (f"rows[{i}]", item)
    problem = row_problem(row, kind)
    if not problem:
      try:
        example = make(formatter, row, data_cfg.seq_len, data_cfg.truncation, counts)
      except Exception as e:  # Template code can raise anything on a row.
        problem = f"formatting failed: {type(e).__name__}: {e}"
    if problem:
      where = where if isinstance(where, str) else f"line {where}"
      _bad_row(where, problem, kind, data_cfg, counts)
      continue
    counts["rows"] += 1
    examples += [] if example is None else [example]
  return examples


def _in_memory(kind, rows, formatter, data_cfg, *, batch_size, seed, shuffle, repeat, stats):
  """Batches of rows given as a list, already in this host's memory: one stream, the rows in
  their order (data.streams divides the reading of files; see make_batches)."""
  return _batches(kind, {0: list(rows)}, formatter, data_cfg, count=1, rows=batch_size,
                  seed=seed, shuffle=shuffle, repeat=repeat, stats=stats)


def sft_batches(rows, formatter: Formatter, data_cfg, *, batch_size: int, seed: int,
                shuffle: bool, repeat: bool, stats: dict | None = None) -> Batches:
  """SFT batches, [B, T] each: inputs, targets (int32), positions (from 0 per example),
  segment_ids (1, 2, .. per packed example, 0 pad), loss_mask (1 exactly where the target is
  trainable). data.pack packs whole examples into rows; else one example per row.

  rows: row dicts, or (location, row) pairs whose location ("path:line") errors name; one
    stream, in this order.
  stats: counts to start from.
  """
  return _in_memory("sft", rows, formatter, data_cfg, batch_size=batch_size, seed=seed,
                    shuffle=shuffle, repeat=repeat, stats=stats)


def _sft_batch(t, b, rows):
  out = {k: np.zeros((b, t), np.int32) for k in ("inputs", "targets", "positions", "segment_ids")}
  out["loss_mask"] = np.zeros((b, t), np.float32)
  for r, row in enumerate(rows):
    start = 0
    for segment, (ids, trainable) in enumerate(row, 1):
      n = len(ids) - 1
      span = slice(start, start + n)
      # Shifted per example, so no target comes from the next packed one.
      out["inputs"][r, span], out["targets"][r, span] = ids[:-1], ids[1:]
      out["positions"][r, span], out["segment_ids"][r, span] = np.arange(n), segment
      out["loss_mask"][r, span] = trainable[1:]
      start += n
  return out


def pair_batches(rows, formatter: Formatter, data_cfg, *, batch_size: int, seed: int,
                 shuffle: bool, repeat: bool, stats: dict | None = None) -> Batches:
  """Preference-pair batches. For p in (chosen, rejected), [B, T]: p_inputs (the whole
  sequence, so a reward head can read its last token), p_targets (inputs shifted left),
  p_positions, p_segment_ids (1 real, 0 pad), p_loss_mask (1 where the target is an answer
  token); and [B]: p_last (int32 index of the last real token), margin, valid (0: padding).
  rows and stats as in sft_batches.
  """
  return _in_memory("pairs", rows, formatter, data_cfg, batch_size=batch_size, seed=seed,
                    shuffle=shuffle, repeat=repeat, stats=stats)


def _pair_batch(t, b, rows):
  out = {"margin": np.zeros(b, np.float32), "valid": np.zeros(b, np.float32)}
  for k, p in ((1, "chosen"), (2, "rejected")):
    for name in ("inputs", "targets", "positions", "segment_ids"):
      out[f"{p}_{name}"] = np.zeros((b, t), np.int32)
    out[f"{p}_loss_mask"], out[f"{p}_last"] = np.zeros((b, t), np.float32), np.zeros(b, np.int32)
    for r, row in enumerate(rows):
      if not row:  # padding
        continue
      [example] = row
      prompt, seq = example[0], example[0] + example[k]
      n = len(seq)
      # All n tokens are inputs, so the reward head can read the last (the EOS); that
      # position's target is padding.
      out[f"{p}_inputs"][r, :n], out[f"{p}_targets"][r, :n - 1] = seq, seq[1:]
      out[f"{p}_positions"][r, :n], out[f"{p}_segment_ids"][r, :n] = np.arange(n), 1
      out[f"{p}_loss_mask"][r, max(len(prompt) - 1, 0):n - 1] = 1  # Targets in the answer.
      out[f"{p}_last"][r], out["margin"][r], out["valid"][r] = n - 1, example[3], 1.0
  return out


def prompt_batches(rows, formatter: Formatter, data_cfg, *, batch_size: int, seed: int,
                   shuffle: bool, repeat: bool, stats: dict | None = None) -> Batches:
  """Prompt batches for PPO/GRPO rollouts: prompt_ids (B lists of at most T - 1 ids), prompts
  (B raw prompt texts, what a reward function sees), rows (B row dicts), valid float32[B].
  Padding rows copy the batch's first prompt, since generation needs one. rows and stats as in
  sft_batches.
  """
  return _in_memory("prompts", rows, formatter, data_cfg, batch_size=batch_size, seed=seed,
                    shuffle=shuffle, repeat=repeat, stats=stats)


def _prompt_batch(t, b, rows):
  rows = rows + [[]] * (b - len(rows))
  first = next(row[0] for row in rows if row)
  examples = [row[0] if row else first for row in rows]
  return {"prompt_ids": [list(ids) for ids, _, _ in examples],
          "prompts": [text for _, text, _ in examples],
          "rows": [row for _, _, row in examples],
          "valid": np.array([bool(row) for row in rows], np.float32)}


_KINDS = {"sft": (_sft_example, _sft_batch), "pairs": (_pair_example, _pair_batch),
          "prompts": (_prompt_example, _prompt_batch)}


def make_batches(kind: str, files: Sequence[str], formatter: Formatter, data_cfg, *,
                 batch_size: int, seed: int, shuffle: bool, repeat: bool,
                 process_index: int = 0, process_count: int = 1) -> Batches:
  """Batches of `kind` ("sft", "pairs" or "prompts") over the rows of `files`: this host's
  rows [batch_size / process_count] of each global batch of `batch_size` (the defaults: all).

  Post-training sets fit in host memory: the rows of this host's streams (train/streams.py)
  are read and tokenized here, so a bad row among them fails now, not mid-run. Reads
  data.seq_len, data.truncation, data.skip_bad_rows, data.pack, data.streams.
  """
  count = streams_lib.count(data_cfg, batch_size)
  plan = streams_lib.shares(files, count)
  local = streams_lib.of_host(count, process_index, process_count)
  counts = {"skipped_bad": 0}
  rows = {s: [] for s in local}
  for path in dict.fromkeys(path for s in local for path in plan[s].files):
    # This host's streams that read `path` (several when they share it, each its part of
    # the lines): one read of the file serves them all.
    part = {plan[s].part: s for s in local if path in plan[s].files}
    parts = plan[next(iter(part.values()))].parts
    for lineno, row in read_rows(path, kind, data_cfg, counts,
                                 lambda i: i % parts in part):
      rows[part[(lineno - 1) % parts]].append((f"{path}:{lineno}", row))
  return _batches(kind, rows, formatter, data_cfg, count=count, rows=batch_size // count,
                  seed=seed, shuffle=shuffle, repeat=repeat, stats=counts)
