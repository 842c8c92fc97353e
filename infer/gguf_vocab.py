"""GGUF export's tokenizer: an HF tokenizer as llama.cpp's `tokenizer.ggml.*` metadata,
infer/gguf.py's tokenizer import read backwards.

    vocab = gguf_vocab(tokenizer, tokenizer_config, vocab_size=cfg.vocab_size, arch="llama")
    add_vocab(writer, vocab)

Two kinds, as llama.cpp's convert_hf_to_gguf.py writes them:
  * byte-level BPE (tokenizer.ggml.model "gpt2": SmolLM2, Llama 3, Qwen, ours): tokens, the
    merges and the `pre` name whose pre-tokenizer infer/gguf.py rebuilds as this one;
  * SentencePiece-style BPE ("llama": Llama 2, Mistral, Gemma), a tokenizer.json BPE with byte
    fallback over text whose spaces are "▁": tokens, scores, the <0xXX> tokens typed byte, and
    whether a "▁" goes before the text (add_space_prefix). llama.cpp merges, over and over, the
    adjacent pair that makes the best-scoring token. That is the tokenizer's BPE when its merges
    are every cut of a token into two tokens, one token's cuts after another's (how transformers
    builds them from a SentencePiece model): each token then scores minus its place in that
    order. Merges of any other shape would tokenize differently in llama.cpp and are refused.
    Gemma's vocabularies are read by token id instead (transformers' GGUF loader, infer/gguf.py),
    so theirs must follow the ids too.
Both: tokens by id, padded to the embedding's rows with unused "[PAD{i}]" (as convert_hf_to_gguf
pads), special added tokens control, other added tokens user-defined, the bos/eos/unknown/pad
ids, add_bos (infer/files.py document_ids), add_eos and the chat template. Unigram, WordPiece
and other tokenizers are refused, naming the kind.
"""

import collections
import dataclasses
import itertools
import json

from infer.files import ConversionError, document_ids, token_ids
from infer.gguf import (_BYTE, _CONTROL, _GEMMA_VOCABS, _GPT2, _GPT2_DIGITS, _IGNORE_MERGES,
                        _MERGEABLE, _NORMAL, _SPACE, _SPLIT_REGEX, _UNKNOWN, _UNUSED,
                        _USER_DEFINED, _pre_tokenizer)

_PRE_NAMES = _GPT2 + _GPT2_DIGITS + tuple(_SPLIT_REGEX)
_BYTES = tuple(f"<0x{b:02X}>" for b in range(256))
# The normalizer / pre-tokenizer pairs of SentencePiece-style tokenizer.json files.
_REPLACE = {"type": "Replace", "pattern": {"String": " "}, "content": _SPACE}
_PREPEND = {"type": "Prepend", "prepend": _SPACE}
_SPLIT_SPACES = {"type": "Split", "pattern": {"String": " "}, "behavior": "MergedWithPrevious",
                 "invert": False}  # Gemma's: a no-op after _REPLACE


@dataclasses.dataclass(frozen=True)
class Vocab:
  """The tokenizer.ggml.* metadata of one tokenizer."""
  model: str  # tokenizer.ggml.model: "gpt2" or "llama"
  tokens: list[str]
  types: list[int]
  ids: dict  # bos / eos / unknown / padding -> token id (absent: none)
  add_bos: bool
  add_eos: bool
  chat_template: str | list | None
  merges: list[str] = dataclasses.field(default_factory=list)  # gpt2: "a b", rank order
  pre: str = ""  # gpt2
  scores: list[float] = dataclasses.field(default_factory=list)  # llama
  add_space_prefix: bool = False  # llama


def gguf_vocab(tokenizer, tokenizer_config: dict, vocab_size: int, arch: str) -> Vocab:
  """Vocab of a tokenizers.Tokenizer for a model of `vocab_size` embedding rows that llama.cpp
  runs as `arch` (general.architecture)."""
  if tokenizer is None:
    raise ConversionError("GGUF export needs the model's tokenizer (tokenizer.json), and the "
                          "source has none")
  spec = json.loads(tokenizer.to_str())
  kind = spec["model"]["type"]
  if kind == "BPE" and spec["model"].get("byte_fallback"):
    return spm_vocab(tokenizer, spec, tokenizer_config, vocab_size, arch)
  if kind == "BPE":
    return bpe_vocab(tokenizer, spec, tokenizer_config, vocab_size)
  why = (" (llama.cpp's SentencePiece tokenizer merges pairs by score, where Unigram picks the "
         "likeliest segmentation: it would tokenize differently)" if kind == "Unigram" else "")
  raise ConversionError(f"tokenizer: a {kind} tokenizer (tokenizer.json model.type) is not "
                        f"supported{why}; GGUF export writes byte-level BPE (tokenizer.ggml."
                        "model gpt2) and SentencePiece-style BPE with byte fallback (llama)")


# ---------------------------------------------------------------------------------------
# Both kinds
# ---------------------------------------------------------------------------------------

def _table(tokenizer, spec: dict, vocab_size: int) -> tuple[list[str], list[int]]:
  """(tokens, types) by id, padded to `vocab_size`."""
  by_id = {i: t for t, i in tokenizer.get_vocab(with_added_tokens=True).items()}
  if max(by_id) >= vocab_size:
    raise ConversionError(f"tokenizer: token id {max(by_id)} does not fit the model's "
                          f"vocab_size={vocab_size}")
  tokens = [by_id.get(i, f"[PAD{i}]") for i in range(vocab_size)]
  types = [_NORMAL if i in by_id else _UNUSED for i in range(vocab_size)]
  for added in spec.get("added_tokens") or []:
    types[added["id"]] = _CONTROL if added["special"] else _USER_DEFINED
  return tokens, types


def _specials(tokenizer, tokenizer_config: dict, unk: str | None) -> dict:
  """Vocab's ids / add_bos / add_eos / chat_template fields."""
  named = token_ids(tokenizer, tokenizer_config)
  try:
    first, eos = document_ids(tokenizer, tokenizer_config)
  except ValueError as e:
    raise ConversionError(f"tokenizer: {e}") from None
  ids = {"bos": named["bos_token_id"] if named["bos_token_id"] is not None else first,
         "eos": eos, "padding": named["pad_token_id"],
         "unknown": tokenizer.token_to_id(unk) if unk else None}
  return dict(ids={k: v for k, v in ids.items() if v is not None}, add_bos=first is not None,
              add_eos=bool(tokenizer_config.get("add_eos_token", False)),
              chat_template=tokenizer_config.get("chat_template"))


def _unk_token(tokenizer_config: dict, model: dict) -> str | None:
  unk = tokenizer_config.get("unk_token") or model.get("unk_token")
  return unk.get("content") if isinstance(unk, dict) else unk


def add_vocab(writer, vocab: Vocab) -> None:
  """Writes `vocab` with a gguf.GGUFWriter."""
  writer.add_tokenizer_model(vocab.model)
  if vocab.model == "gpt2":
    writer.add_tokenizer_pre(vocab.pre)
  else:
    writer.add_tokenizer_pre("default")
    writer.add_add_space_prefix(vocab.add_space_prefix)
  writer.add_token_list(vocab.tokens)
  if vocab.scores:
    writer.add_token_scores(vocab.scores)
  writer.add_token_types(vocab.types)
  if vocab.merges:
    writer.add_token_merges(vocab.merges)
  for key, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                   ("unknown", writer.add_unk_token_id), ("padding", writer.add_pad_token_id)):
    if key in vocab.ids:
      add(vocab.ids[key])
  writer.add_add_bos_token(vocab.add_bos)
  writer.add_add_eos_token(vocab.add_eos)
  if vocab.chat_template:
    writer.add_chat_template(vocab.chat_template)


# ---------------------------------------------------------------------------------------
# Byte-level BPE ("gpt2")
# ---------------------------------------------------------------------------------------

def _without_trim_offsets(spec):
  """A pre-tokenizer's JSON without trim_offsets (it moves offsets, never splits)."""
  if isinstance(spec, dict):
    return {k: _without_trim_offsets(v) for k, v in spec.items() if k != "trim_offsets"}
  if isinstance(spec, list):
    return [_without_trim_offsets(v) for v in spec]
  return spec


def pre_name(pre_tokenizer: dict | None) -> str:
  """The `tokenizer.ggml.pre` name whose pre-tokenizer (infer/gguf.py) splits as this one."""
  want = _without_trim_offsets(pre_tokenizer)
  for name in _PRE_NAMES:
    ours = json.loads(_pre_tokenizer(name, "").__getstate__())
    if _without_trim_offsets(ours) == want:
      return name
  raise ConversionError(f"tokenizer: its pre-tokenizer {json.dumps(pre_tokenizer)} is none "
                        f"llama.cpp names (tokenizer.ggml.pre: {list(_PRE_NAMES)})")


def bpe_vocab(tokenizer, spec: dict, tokenizer_config: dict, vocab_size: int) -> Vocab:
  """Vocab of a byte-level BPE tokenizer (`spec`: its tokenizer.json)."""
  model = spec["model"]
  # NFC is what convert_hf_to_gguf drops too (Qwen2): llama.cpp's BPE normalizes nothing.
  if spec.get("normalizer") not in (None, {"type": "NFC"}):
    raise ConversionError(f"tokenizer: normalizer {json.dumps(spec['normalizer'])} is not "
                          "supported (llama.cpp's BPE tokenizer has none)")
  pre = pre_name(spec.get("pre_tokenizer"))
  if bool(model.get("ignore_merges")) != (pre in _IGNORE_MERGES):
    raise ConversionError(f"tokenizer: ignore_merges={bool(model.get('ignore_merges'))} with "
                          f"pre-tokenizer {pre!r}, where llama.cpp "
                          f"{'ignores' if pre in _IGNORE_MERGES else 'follows'} the merges")
  tokens, types = _table(tokenizer, spec, vocab_size)
  merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
  return Vocab("gpt2", tokens, types, merges=merges, pre=pre,
               **_specials(tokenizer, tokenizer_config, _unk_token(tokenizer_config, {})))


# ---------------------------------------------------------------------------------------
# SentencePiece-style BPE ("llama")
# ---------------------------------------------------------------------------------------

def space_prefix(normalizer: dict | None, pre_tokenizer: dict | None) -> bool:
  """Whether a SentencePiece-style tokenizer puts a "▁" before the text (llama.cpp's
  add_space_prefix), from its normalizer and pre-tokenizer: Llama 2's Prepend + Replace,
  Gemma's Replace, or a Metaspace that does not split (llama.cpp merges across "▁"s)."""
  if normalizer == {"type": "Sequence", "normalizers": [_PREPEND, _REPLACE]} and not pre_tokenizer:
    return True
  if normalizer == _REPLACE and pre_tokenizer in (None, _SPLIT_SPACES):
    return False
  if (normalizer is None and (pre_tokenizer or {}).get("type") == "Metaspace"
      and pre_tokenizer.get("replacement") == _SPACE and pre_tokenizer.get("split") is False):
    # "first" (only at the start of the input) llama.cpp cannot say: it puts the "▁" before
    # each text after a special token, as convert_hf_to_gguf's files of such tokenizers do.
    return pre_tokenizer.get("prepend_scheme", "always") != "never"
  raise ConversionError(
      f"tokenizer: SentencePiece-style BPE with normalizer {json.dumps(normalizer)} and "
      f"pre-tokenizer {json.dumps(pre_tokenizer)} is not supported: llama.cpp only turns spaces "
      "into \"▁\" (and may put one before the text); supported are a Replace(' ', '▁') "
      "normalizer (with Prepend('▁') first, or Gemma's Split(' ') pre-tokenizer), or a "
      "Metaspace pre-tokenizer with split=false")


def spm_scores(tokens: list[str], types: list[int], merges: list[tuple[str, str]],
               by_id: bool) -> list[float]:
  """Each token's score such that llama.cpp's merging (the best-scoring pair first, any cut of
  a token in two) is the BPE of `merges`: minus the rank of the token's merges. Raises
  ConversionError where no scores are: merges that are not every cut of the tokens they make,
  one token's merges apart, or (`by_id`, Gemma's vocabularies) not in token id order."""
  ids = {}
  for i, token in enumerate(tokens):
    ids.setdefault(token, i)
  mergeable = lambda t: t in ids and types[ids[t]] in _MERGEABLE  # noqa: E731
  cuts = {(t[:c], t[c:]) for t in ids if mergeable(t)
          for c in range(1, len(t)) if t[:c] in ids and t[c:] in ids}
  # Merges into control tokens never run (the text of one is matched as that token first).
  given = [(a, b) for a, b in merges if mergeable(a + b)]
  missing, extra = sorted(cuts - set(given)), sorted(set(given) - cuts)
  why = "the merges are not SentencePiece's (every cut of a token into two tokens)"
  if extra:
    raise ConversionError(f"tokenizer: {why}: {len(extra)} merge(s) do not cut a token of the "
                          f"vocabulary, e.g. {' '.join(extra[0])!r}")
  if missing:
    a, b = missing[0]
    raise ConversionError(f"tokenizer: {why}: {len(missing)} cut(s) are no merge, e.g. "
                          f"{a!r} + {b!r} -> {a + b!r}, which llama.cpp would merge")
  runs = [t for t, _ in itertools.groupby(a + b for a, b in given)]
  apart = next((t for t, n in collections.Counter(runs).items() if n > 1), None)
  if apart is not None:
    raise ConversionError(f"tokenizer: {why}: the merges making {apart!r} are apart, where "
                          "llama.cpp ranks them all by that token's one score")
  if by_id and runs != sorted(runs, key=ids.get):
    t = next(t for t, u in zip(runs, sorted(runs, key=ids.get)) if t != u)
    raise ConversionError(f"tokenizer: the merges are not in token id order (first apart: "
                          f"{t!r}, id {ids[t]}), the order llama.cpp's Gemma vocabularies are "
                          "read in (transformers' GGUF loader, infer/gguf.py)")
  rank = {t: r for r, t in enumerate(runs)}
  return [-float(rank[t]) if t in rank and ids[t] == i else
          0.0 if types[i] in (_CONTROL, _UNKNOWN, _BYTE) else -float(len(runs) + i)
          for i, t in enumerate(tokens)]


def spm_vocab(tokenizer, spec: dict, tokenizer_config: dict, vocab_size: int,
              arch: str) -> Vocab:
  """Vocab of a SentencePiece-style BPE tokenizer (`spec`: its tokenizer.json)."""
  model = spec["model"]
  for key in ("dropout", "continuing_subword_prefix", "end_of_word_suffix", "ignore_merges"):
    if model.get(key):
      raise ConversionError(f"tokenizer: BPE with byte fallback and {key}={model[key]!r} is not "
                            "supported (llama.cpp's SentencePiece tokenizer has no such option)")
  prefix = space_prefix(spec.get("normalizer"), spec.get("pre_tokenizer"))
  if prefix and arch in _GEMMA_VOCABS:
    raise ConversionError(f"tokenizer: a \"▁\" put before the text with a {arch} model: "
                          "llama.cpp's Gemma vocabularies have none (transformers' GGUF loader "
                          "reads them so)")
  tokens, types = _table(tokenizer, spec, vocab_size)
  vocab = tokenizer.get_vocab(with_added_tokens=True)
  missing = [b for b in _BYTES if b not in vocab]
  if missing:
    raise ConversionError(f"tokenizer: byte fallback without the byte token(s) {missing[:4]} "
                          f"({len(missing)} of 256): llama.cpp needs all 256 <0xXX> tokens")
  for b in _BYTES:
    types[vocab[b]] = _BYTE
  for added in spec.get("added_tokens") or []:
    # llama.cpp matches user-defined tokens in the raw text, HF a normalized one in the
    # normalized text: after Gemma's normalizer, with "▁" for spaces (and convert_hf_to_gguf
    # writes Gemma's runs of spaces so too).
    if (not added["special"] and added.get("normalized", True)
        and spec.get("normalizer") == _REPLACE):
      tokens[added["id"]] = added["content"].replace(_SPACE, " ")
  unk = _unk_token(tokenizer_config, model)
  if unk in vocab:
    types[vocab[unk]] = _UNKNOWN
  merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m)
            for m in model.get("merges") or []]
  scores = spm_scores(tokens, types, merges, by_id=arch in _GEMMA_VOCABS)
  return Vocab("llama", tokens, types, scores=scores, add_space_prefix=prefix,
               **_specials(tokenizer, tokenizer_config, unk))
