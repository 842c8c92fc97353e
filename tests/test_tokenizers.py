"""Tokenizers of every family: documents framed with each family's own BOS and EOS, and
SentencePiece GGUF vocabularies imported to encode as llama.cpp does.

The family tokenizers are tiny byte-level BPEs built here with each family's special tokens
and the tokenizer_config.json its Hugging Face repos ship; the ids a document must start and
end with are looked up here by the family's strings, never taken from the code under test.
The SentencePiece import is compared with this file's own transcription of llama.cpp's
tokenizer (llama-vocab.cpp: a space before each text, then merge the best-scoring adjacent
pair until none is a token, bytes for what is left) and with transformers' GGUF loader.
"""

import json
import re
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tokenizers
from tokenizers import models, pre_tokenizers, processors, trainers

from infer.files import document_ids, read_tokenizer_config
from train import data
from train.eval import token_bytes

gguf = pytest.importorskip("gguf")
from infer.gguf import read_gguf, tokenizer_from_gguf  # noqa: E402

DOCS = ["def f(x):\n    return x + 1\n", "héllo wörld 🙂\n\ttabs", "the end"]

# ------------------------------------------------------------------------------------------
# Families: (special tokens, tokenizer_config.json as the family's repos ship it, the BOS
# documents must start with (None: the family adds none), the EOS they must end with).
FAMILIES = {
    # Meta-Llama-3: no add_bos_token; tokenizer.json's post-processor adds the BOS.
    "llama3": (["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"],
               {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"},
               "<|begin_of_text|>", "<|end_of_text|>"),
    "mistral": (["<unk>", "<s>", "</s>"],
                {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                 "add_bos_token": True, "add_eos_token": False}, "<s>", "</s>"),
    "qwen2": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
              {"bos_token": None, "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"},
              None, "<|endoftext|>"),
    "gemma": (["<pad>", "<eos>", "<bos>", "<unk>"],
              {"bos_token": "<bos>", "eos_token": "<eos>", "add_bos_token": True,
               "add_eos_token": False}, "<bos>", "<eos>"),
    # A tokenizer we trained (train/tokenizer.py): no config, <|endoftext|> on both sides.
    "ours": (["<|endoftext|>"], {}, "<|endoftext|>", "<|endoftext|>"),
}


def family_tokenizer(name):
  """(tokenizer, tokenizer_config, bos id or None, eos id) of a tiny tokenizer of `name`."""
  specials, config, bos, eos = FAMILIES[name]
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = tokenizers.decoders.ByteLevel()
  tok.train_from_iterator(DOCS * 10, trainers.BpeTrainer(
      vocab_size=300, special_tokens=specials, show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  if name == "llama3":
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
        special_tokens=[(bos, tok.token_to_id(bos))])
  return tok, config, None if bos is None else tok.token_to_id(bos), tok.token_to_id(eos)


def _cfg(**kw):
  base = dict(format="text", text_field="text", streams=1, shuffle_rows=0, worker_count=0,
              corpus="docs/*.txt")
  return types.SimpleNamespace(**{**base, **kw})


def _packed(tmp_path, tok, config, texts, seq_len=16):
  """inputs and targets of every packed segment, concatenated in stream order."""
  files = []
  for i, text in enumerate(texts):
    files.append(str(tmp_path / f"{i}.txt"))
    with open(files[-1], "w", newline="") as f:
      f.write(text)
  it = data.make_iterator(_cfg(), tok, files, batch_size=2, seq_len=seq_len, seed=0,
                          shuffle=False, repeat=False, tokenizer_config=config)
  inputs, targets = [], []
  for batch in it:
    for row in range(2):
      seg = batch["segment_ids"][row]
      for s in np.unique(seg[seg > 0]):
        inputs += batch["inputs"][row][seg == s].tolist()
        targets += batch["targets"][row][seg == s].tolist()
  it.close()
  return inputs, targets


@pytest.mark.parametrize("family", FAMILIES)
def test_pretraining_puts_the_familys_bos_and_eos_around_documents(tmp_path, family):
  tok, config, bos, eos = family_tokenizer(family)
  assert document_ids(tok, config) == (bos, eos)
  inputs, targets = _packed(tmp_path, tok, config, DOCS)
  docs = [([] if bos is None else [bos]) + tok.encode(d, add_special_tokens=False).ids + [eos]
          for d in DOCS]
  assert inputs == [t for d in docs for t in d[:-1]]
  assert targets == [t for d in docs for t in d[1:]]


@pytest.mark.parametrize("family", ["llama3", "qwen2"])
def test_a_familys_eos_written_in_a_document_is_plain_text(tmp_path, family):
  tok, config, bos, eos = family_tokenizer(family)
  texts = [f"a {config['eos_token']} b", "c"]
  inputs, targets = _packed(tmp_path, tok, config, texts)
  assert targets.count(eos) == len(texts)  # Only real boundaries.
  assert inputs.count(bos) == (0 if bos is None else len(texts))


def test_no_eos_is_an_error_naming_the_keys(tmp_path):
  tok, config, _, _ = family_tokenizer("mistral")
  with pytest.raises(data.DataError, match=r"names no 'eos_token'.*'eos_token_id'.*"
                     r"'tokenizer\.ggml\.eos_token_id'.*'<\|endoftext\|>'"):
    _packed(tmp_path, tok, {}, DOCS)
  with pytest.raises(data.DataError, match=r"'eos_token' '</eos>' is not a token"):
    _packed(tmp_path, tok, dict(config, eos_token="</eos>"), DOCS)


def test_hf_directory_names_its_eos_in_other_files(tmp_path):
  """Repos whose tokenizer_config.json leaves the special tokens to special_tokens_map.json,
  generation_config.json or config.json."""
  tok, _, bos, _ = family_tokenizer("llama3")
  tok.save(str(tmp_path / "tokenizer.json"))
  (tmp_path / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": True}))
  (tmp_path / "special_tokens_map.json").write_text(json.dumps(
      {"bos_token": {"content": "<|begin_of_text|>", "special": True}}))
  eot = tok.token_to_id("<|eot_id|>")
  (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [eot, 1]}))
  (tmp_path / "config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 1}))
  config = read_tokenizer_config(tmp_path)
  assert config["eos_token"] == "<|eot_id|>"
  assert document_ids(tok, config) == (bos, eot)


def test_eval_frames_documents_as_the_family_does(tmp_path):
  from configs import base
  from model import ModelConfig, Transformer
  from train.checkpoint import Checkpointer
  from train.eval import evaluate
  import flax.linen as nn
  tok, config, bos, eos = family_tokenizer("llama3")
  cfg = base.get_config()
  cfg.model.update(vocab_size=300, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=64,
                   max_seq_len=64)
  cfg.data.seq_len, cfg.train.batch_size = 64, 8
  wd = tmp_path / "run"
  wd.mkdir()
  (wd / "config.json").write_text(cfg.to_json())
  tok.save(str(wd / "tokenizer.json"))
  (wd / "tokenizer_config.json").write_text(json.dumps(config))
  model = Transformer(ModelConfig.from_config(cfg.model))
  tokens = jnp.zeros((1, 4), jnp.int32)
  params = nn.unbox(model.init(jax.random.PRNGKey(1), tokens, tokens))["params"]
  ckpt = Checkpointer(str(wd))
  ckpt.save_params(0, params)
  ckpt.close()
  (tmp_path / "doc.txt").write_text(DOCS[0])
  result = evaluate(str(wd), data=str(tmp_path / "doc.txt"))
  ids = [bos] + tok.encode(DOCS[0], add_special_tokens=False).ids + [eos]
  logits, _ = model.apply({"params": params}, jnp.asarray([ids[:-1]]),
                          jnp.arange(len(ids) - 1)[None])
  logp = jax.nn.log_softmax(np.asarray(logits[0], np.float64))
  nll = -sum(logp[i, t] for i, t in enumerate(ids[1:]))
  assert result["tokens"] == len(ids) - 1
  assert result["loss"] == pytest.approx(nll / (len(ids) - 1), rel=1e-5)
  assert result["bytes"] == len(DOCS[0].encode("utf-8"))


# ------------------------------------------------------------------------------------------
# SentencePiece ("llama") GGUF vocabularies, laid out as Llama 2's: <unk>, <s>, </s>, the 256
# byte tokens, merged pieces (score: minus their rank) and single characters last.
SPACE = "\u2581"
MERGED = ["▁t", "he", "▁the", "ll", "llo", "▁he", "▁hello", "or", "▁w", "▁wor", "ld", "▁world",
          "▁▁", "▁▁▁▁", "bc", "ab", "abc", "fé", "ca", "▁ca", "▁café", "▁n", "aï", "▁naï", "ve",
          "▁naïve", "s>", "</"]
CHARS = list("▁abcdefghijklmnopqrstuvwxyzéï<>/")
SPM_TOKENS = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + MERGED + CHARS
SPM_SCORES = [0.0] * 259 + [-float(i) for i in range(len(MERGED) + len(CHARS))]
SPM_TYPES = [2, 3, 3] + [6] * 256 + [1] * (len(MERGED) + len(CHARS))
# Spaces (leading, doubled), newlines and tabs and a character outside the vocabulary (bytes),
# unicode inside it, score order deciding between overlapping pairs (ab vs bc), special tokens.
SPM_TEXTS = ["hello world", "  the  hello\n", "\tcafé naïve 🙂", "abc bcab", " ",
             "a</s>b<s> the", "plain </s> text", ""]


def llama_cpp_spm(text, add_space_prefix=True):
  """llama.cpp's SentencePiece tokenization of `text` with special tokens parsed, except that
  pairs merge only into normal tokens (llama.cpp would also merge "</" "s>" into the control
  token </s>; ours must not, or text would fake a document boundary)."""
  ids = {t: i for i, t in enumerate(SPM_TOKENS)}
  out = []
  for k, piece in enumerate(re.split(r"(<unk>|<s>|</s>)", text)):
    if k % 2:
      out.append(ids[piece])
      continue
    if not piece:
      continue
    symbols = list(((" " if add_space_prefix else "") + piece).replace(" ", SPACE))
    while True:  # the best-scoring pair that is a normal token; the leftmost on a tie
      pairs = [(SPM_SCORES[ids[a + b]], -j) for j, (a, b) in enumerate(zip(symbols, symbols[1:]))
               if a + b in ids and SPM_TYPES[ids[a + b]] == 1]
      if not pairs:
        break
      j = -max(pairs)[1]
      symbols[j:j + 2] = [symbols[j] + symbols[j + 1]]
    for s in symbols:
      out += [ids[s]] if s in ids else [ids[f"<0x{b:02X}>"] for b in s.encode()]
  return out


def write_spm_gguf(path, add_space_prefix=None, arch="llama",
                   vocab=(SPM_TOKENS, SPM_SCORES, SPM_TYPES), ids=(1, 2, 0)):
  tokens, scores, token_types = vocab
  writer = gguf.GGUFWriter(str(path), arch)
  writer.add_tokenizer_model("llama")
  writer.add_token_list(tokens)
  writer.add_token_scores(scores)
  writer.add_token_types(token_types)
  writer.add_bos_token_id(ids[0])
  writer.add_eos_token_id(ids[1])
  writer.add_unk_token_id(ids[2])
  if add_space_prefix is not None:
    writer.add_add_space_prefix(add_space_prefix)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return str(path)


@pytest.mark.parametrize("add_space_prefix", [None, False])
def test_sentencepiece_gguf_encodes_as_llama_cpp(tmp_path, add_space_prefix):
  path = write_spm_gguf(tmp_path / "m.gguf", add_space_prefix)
  tok, config = tokenizer_from_gguf(read_gguf(path), path)
  prefix = add_space_prefix is None  # llama.cpp's default
  again = tokenizers.Tokenizer.from_str(tok.to_str())  # as a workdir's tokenizer.json
  for text in SPM_TEXTS:
    want = llama_cpp_spm(text, prefix)
    assert tok.encode(text, add_special_tokens=False).ids == want, text
    assert again.encode(text, add_special_tokens=False).ids == want, text
    if "<" not in text:
      assert tok.decode(want) == text
  # llama.cpp adds the BOS when the file does not say otherwise; none of the text spells one.
  assert config["add_bos_token"] and tok.encode("hello").ids == [1] + llama_cpp_spm("hello", prefix)
  plain = tokenizers.Tokenizer.from_str(tok.to_str())
  plain.encode_special_tokens = True
  assert 2 not in plain.encode("a</s>b", add_special_tokens=False).ids


def test_sentencepiece_gguf_matches_transformers(tmp_path):
  """transformers' GGUF loader builds its own tokenizer from the same file. It puts the space
  in front only at the start of the whole input (Metaspace "first"), where llama.cpp puts it
  before every text, so it is compared on texts where the two rules agree."""
  transformers = pytest.importorskip("transformers")
  path = write_spm_gguf(tmp_path / "m.gguf")
  ours, _ = tokenizer_from_gguf(read_gguf(path), path)
  theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="m.gguf")
  for text in ["hello world", "the  hello\n", "\tcafé naïve 🙂", "abc bcab", "x\n\n  y"]:
    assert ours.encode(text).ids == theirs.encode(text), text
    assert ours.decode(ours.encode(text).ids, skip_special_tokens=True) == theirs.decode(
        theirs.encode(text), skip_special_tokens=True) == text


def test_sentencepiece_gguf_frames_documents_and_counts_bytes(tmp_path):
  path = write_spm_gguf(tmp_path / "m.gguf")
  tok, config = tokenizer_from_gguf(read_gguf(path), path)
  assert (config["bos_token"], config["eos_token"]) == ("<s>", "</s>")
  inputs, targets = _packed(tmp_path, tok, config, ["hello world", "the café"])
  assert inputs == [1] + llama_cpp_spm("hello world") + [1] + llama_cpp_spm("the café")
  assert targets == llama_cpp_spm("hello world") + [2] + llama_cpp_spm("the café") + [2]
  # Bits per byte: "▁" is a space, <0xXX> one byte; the space put in front is one more.
  nbytes = token_bytes(tok)
  for text in ["\tcafé naïve 🙂", "  the  hello\n"]:
    assert nbytes[llama_cpp_spm(text)].sum() == len(text.encode("utf-8")) + 1


# Gemma's SentencePiece vocabulary as convert_hf_to_gguf.py stores it: <pad>, <eos>, <bos>,
# <unk>, control tokens, the byte tokens, runs of spaces as user-defined tokens of real spaces,
# other user-defined tokens, then text; scores that are not the merge order (bc outscores ab,
# which comes first); add_space_prefix false. transformers' GGUF loader is the reference.
GEMMA_TOKENS = (["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
                + [f"<0x{b:02X}>" for b in range(256)] + ["  ", "   ", "    ", "<b>", "\n\n"]
                + ["▁t", "he", "▁the", "ll", "llo", "▁w", "or", "ld", "▁world", "ab", "bc", "ca",
                   "fé", "▁ca", "▁café"] + CHARS + ["\n"])
GEMMA_TYPES = [3, 3, 3, 2, 3, 3] + [6] * 256 + [4] * 5 + [1] * (len(GEMMA_TOKENS) - 267)
GEMMA_SCORES = [0.0] * 267 + [-float(i) for i in range(len(GEMMA_TOKENS) - 267)]
GEMMA_SCORES[GEMMA_TOKENS.index("bc")] = 5.0
# No space in front; runs of spaces merged from "▁"s (5 spaces: "  " then "   ", where
# llama.cpp's raw match takes "    " first); ab before bc although bc scores higher.
GEMMA_TEXTS = ["hello world", "the world", "abc", "a  b   c    d", "a     b", "  the", "the  ",
               "<start_of_turn>user\nthe café<end_of_turn>\n", "café 🙂", "x\n\ny", "x<b>y", " ",
               ""]


def write_gemma_gguf(path, add_space_prefix=False):
  return write_spm_gguf(path, add_space_prefix, "gemma3",
                        (GEMMA_TOKENS, GEMMA_SCORES, GEMMA_TYPES), ids=(2, 1, 3))


@pytest.mark.parametrize("add_space_prefix", [False, None])
def test_gemma_sentencepiece_gguf_matches_transformers(tmp_path, add_space_prefix):
  transformers = pytest.importorskip("transformers")
  path = write_gemma_gguf(tmp_path / "m.gguf", add_space_prefix)
  ours, config = tokenizer_from_gguf(read_gguf(path), path)
  theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="m.gguf")
  again = tokenizers.Tokenizer.from_str(ours.to_str())  # as a workdir's tokenizer.json
  assert (config["bos_token"], config["eos_token"]) == ("<bos>", "<eos>")
  for text in GEMMA_TEXTS:
    want = theirs.encode(text)
    assert want[0] == 2 and ours.encode(text).ids == want, (text, theirs.convert_ids_to_tokens(
        want), ours.encode(text).tokens)
    assert again.encode(text).ids == want, text
    assert ours.decode(want, skip_special_tokens=True) == theirs.decode(
        want, skip_special_tokens=True) == text.replace("<start_of_turn>", "").replace(
            "<end_of_turn>", "")


def test_gemma_vocabulary_asking_for_a_space_prefix_is_refused(tmp_path):
  from infer.files import ConversionError
  path = write_gemma_gguf(tmp_path / "m.gguf", add_space_prefix=True)
  with pytest.raises(ConversionError, match=r"m\.gguf: tokenizer\.ggml\.add_space_prefix=true "
                                            r"with a Gemma vocabulary"):
    tokenizer_from_gguf(read_gguf(path), path)
