"""GGUF export of SentencePiece-style tokenizers (infer/gguf_vocab.py spm_vocab): Llama 2 /
Mistral's (a "▁" before the text) and Gemma's (none), as tokenizer.ggml.model "llama".

The tokenizers are transformers' own LlamaTokenizer and GemmaTokenizer over a vocabulary
trained here, their merges made by transformers' generate_merges (how it turns a SentencePiece
model into tokenizer.json). Read back by gguf-py (metadata), transformers' GGUF loader and our
importer (tokenization and logits); llama.cpp itself where llama-cpp-python is installed.
"""

import json

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

from infer.files import ConversionError, read_tokenizer_config  # noqa: E402
from infer.gguf import load_gguf  # noqa: E402
from infer.gguf_export import save_gguf  # noqa: E402
from model import ModelConfig  # noqa: E402
from tests.test_convert_gguf_export import BASE, _OPTIONS, logits, random_params  # noqa: E402

SPACE = "\u2581"
BYTES = [f"<0x{b:02X}>" for b in range(256)]
CORPUS = ["the quick brown fox jumps over the lazy dog", "hello world, hello there 123 4567",
          "naïve café résumé über straße", "def f(x):\n    return x + 1  # ok"]
# Spaces (leading, doubled, trailing), newlines, digits, unicode in the vocabulary and outside
# it (byte fallback: 🙂, 漢), an added token's text at the end, a special token's at the start.
TEXTS = ["hello world", "the  quick brown\n\nfox", "  leading and trailing  ", "123 4567 89",
         "naïve café 🙂 漢字", "x+1 # über<fn>", "[INST] hello"]
VOCAB_SIZE = 420  # embedding rows; the tokenizers have fewer tokens: the rest is padding


def trained_pieces() -> list[str]:
  """A small SentencePiece-like BPE vocabulary ("▁" for spaces), in training's order."""
  from tokenizers import Tokenizer, models, pre_tokenizers, trainers
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.Metaspace()
  tok.train_from_iterator(CORPUS * 10, trainers.BpeTrainer(vocab_size=130, show_progress=False))
  vocab = tok.get_vocab()
  return sorted(vocab, key=vocab.get) + [SPACE * 2]


def hf_tokenizer(kind: str, directory):
  """An HF tokenizer of `kind`, saved to and read back from `directory` as the export reads a
  checkpoint's: (tokenizers.Tokenizer, tokenizer_config dict, the HF one).
    llama2: Llama 2's tokenizer.json (a normalizer puts "▁" before every text);
    mistral: transformers' LlamaTokenizer (a Metaspace puts it before the input's first text);
    gemma: transformers' GemmaTokenizer (none), Gemma's layout, merges in token id order."""
  from tokenizers import AddedToken, Tokenizer, normalizers
  from transformers.tokenization_utils_base import generate_merges
  if kind == "gemma":
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"] + BYTES + trained_pieces()
    cls = transformers.GemmaTokenizer
  else:
    tokens = ["<unk>", "<s>", "</s>"] + BYTES + trained_pieces()
    cls = transformers.LlamaTokenizer
  vocab = {t: i for i, t in enumerate(tokens)}
  merges = generate_merges(vocab, {t: -i for i, t in enumerate(tokens)})
  hf = cls(vocab=vocab, merges=merges, add_bos_token=True)
  hf.add_special_tokens({"additional_special_tokens": ["[INST]"]})
  # Added, not special: user-defined. Matched in the raw text, as llama.cpp matches it (a
  # normalized one would be matched after Llama 2's normalizer, as "▁<fn>").
  hf.add_tokens([AddedToken("<fn>", normalized=False)])
  if kind == "llama2":  # transformers 5's LlamaTokenizer would replace this normalizer
    tok = Tokenizer.from_str(hf.backend_tokenizer.to_str())
    tok.normalizer = normalizers.Sequence([normalizers.Prepend(SPACE),
                                           normalizers.Replace(" ", SPACE)])
    tok.pre_tokenizer = None
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>",
                                              eos_token="</s>", unk_token="<unk>")
  hf.save_pretrained(str(directory))
  tok = Tokenizer.from_file(str(directory / "tokenizer.json"))
  return tok, read_tokenizer_config(directory, tok), hf


def comparable(kind: str, texts=TEXTS) -> list[str]:
  """The texts llama.cpp tokenizes as the HF tokenizer. A Metaspace puts its "▁" only before
  the input's first text, and not before one that starts with a space; llama.cpp puts one
  before every text, after a special token too."""
  return [t for t in texts if kind != "mistral" or not (t.startswith(" ") or "[INST]" in t)]


@pytest.fixture(scope="module", params=["llama2", "mistral", "gemma"])
def exported(request, tmp_path_factory):
  """(kind, directory with m.gguf, cfg, params, HF tokenizer) of an f32 export."""
  kind = request.param
  directory = tmp_path_factory.mktemp(kind)
  tok, config, hf = hf_tokenizer(kind, directory / "hf")
  # Gemma: head_dim 256, the attention scale transformers' GGUF loader assumes (Gemma's
  # query_pre_attn_scalar, which no GGUF key holds).
  options = dict(_OPTIONS["gemma3"], head_dim=256) if kind == "gemma" else {}
  cfg = ModelConfig(**dict(BASE, **options, vocab_size=VOCAB_SIZE))
  params = random_params(cfg)
  save_gguf(str(directory / "m.gguf"), cfg, params, tok, config, gguf_type="f32")
  return kind, directory, cfg, params, hf


def test_gguf_py_reads_a_sentencepiece_vocabulary(exported):
  kind, directory, _, _, hf = exported
  meta = {k: f.contents() for k, f in gguf.GGUFReader(str(directory / "m.gguf")).fields.items()}
  assert meta["general.architecture"] == ("gemma3" if kind == "gemma" else "llama")
  assert meta["tokenizer.ggml.model"] == "llama" and meta["tokenizer.ggml.pre"] == "default"
  assert meta["tokenizer.ggml.add_space_prefix"] == (kind != "gemma")
  assert "tokenizer.ggml.merges" not in meta
  tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
  scores = meta["tokenizer.ggml.scores"]
  vocab = hf.get_vocab()
  n = len(vocab)
  assert len(tokens) == len(types) == len(scores) == VOCAB_SIZE
  assert tokens[:n] == sorted(vocab, key=vocab.get)
  assert tokens[n:] == [f"[PAD{i}]" for i in range(n, VOCAB_SIZE)] and set(types[n:]) == {5}
  specials = ("<bos>", "<eos>", "<pad>", "<mask>") if kind == "gemma" else ("<s>", "</s>")
  assert {types[vocab[t]] for t in specials + ("[INST]",)} == {3} and types[vocab["<fn>"]] == 4
  assert types[vocab["<unk>"]] == 2
  assert [types[vocab[b]] for b in BYTES] == [6] * 256
  assert types[vocab["▁the"]] == types[vocab["a"]] == 1
  # Scores: a token made by an earlier merge scores higher (merges in tokenizer.json order).
  merges = json.loads(hf.backend_tokenizer.to_str())["model"]["merges"]
  made = list(dict.fromkeys(a + b for a, b in merges))
  assert len(made) > 50
  made_scores = [scores[vocab[t]] for t in made]
  assert made_scores == sorted(made_scores, reverse=True) and len(set(made_scores)) == len(made)
  bos, eos = specials[:2]
  assert (meta["tokenizer.ggml.bos_token_id"], meta["tokenizer.ggml.eos_token_id"],
          meta["tokenizer.ggml.unknown_token_id"]) == (vocab[bos], vocab[eos], vocab["<unk>"])
  assert meta["tokenizer.ggml.add_bos_token"] and not meta["tokenizer.ggml.add_eos_token"]


def test_transformers_reads_the_same_tokenizer_and_model(exported):
  torch = pytest.importorskip("torch")
  pytest.importorskip("accelerate")  # transformers' GGUF loading needs it
  kind, directory, cfg, params, hf = exported
  theirs = transformers.AutoTokenizer.from_pretrained(str(directory), gguf_file="m.gguf")
  # Its Llama tokenizer puts the "▁" before the input's first text only, as a Metaspace does.
  for text in TEXTS if kind == "gemma" else comparable("mistral"):
    assert theirs(text).input_ids == hf(text).input_ids, (text, hf.tokenize(text))
  model = transformers.AutoModelForCausalLM.from_pretrained(
      str(directory), gguf_file="m.gguf", dtype=torch.float32).eval()
  ids = hf(TEXTS[1]).input_ids
  with torch.no_grad():
    got = model(torch.tensor([ids])).logits[0].numpy()
  np.testing.assert_allclose(got, logits(cfg, params, ids), rtol=1e-4, atol=1e-4)


def test_our_importer_reads_the_same_tokenizer_and_model(exported):
  kind, directory, cfg, params, hf = exported
  cfg2, params2, tok2, extra = load_gguf(str(directory / "m.gguf"))
  for text in comparable(kind):
    assert tok2.encode(text).ids == hf(text).input_ids, (text, hf.tokenize(text))
  assert extra["eos_token_ids"] == (hf.eos_token_id,)
  ids = hf(TEXTS[4]).input_ids
  np.testing.assert_allclose(logits(cfg2, params2, ids), logits(cfg, params, ids),
                             rtol=0, atol=1e-5)


def test_llama_cpp_runs_the_same_tokenizer_and_model(exported):
  """llama.cpp itself, where llama-cpp-python is installed (not in the test extra)."""
  llama_cpp = pytest.importorskip("llama_cpp")
  kind, directory, cfg, params, hf = exported
  llm = llama_cpp.Llama(model_path=str(directory / "m.gguf"), n_ctx=64, logits_all=True,
                        verbose=False, n_threads=1, type_k=0, type_v=0)  # an F32 cache
  for text in comparable(kind):
    assert llm.tokenize(text.encode(), add_bos=True, special=True) == hf(text).input_ids, text
  ids = hf(TEXTS[1]).input_ids
  llm.eval(ids)
  np.testing.assert_allclose(np.asarray(llm.scores[:len(ids)]), logits(cfg, params, ids),
                             atol=1e-2)


# ---- what llama.cpp cannot tokenize as the tokenizer does ----------------------------------

def _export(tmp_path, tok, config=None, arch_options=None):
  cfg = ModelConfig(**dict(BASE, **(arch_options or {}), vocab_size=VOCAB_SIZE))
  save_gguf(str(tmp_path / "m.gguf"), cfg, random_params(cfg), tok,
            config or {"eos_token": "</s>"}, gguf_type="f16")


def test_unrepresentable_tokenizers_are_refused_by_kind(tmp_path):
  from tokenizers import Tokenizer, models, pre_tokenizers
  wordpiece = Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1, "</s>": 2}, unk_token="[UNK]"))
  with pytest.raises(ConversionError, match=r"a WordPiece tokenizer \(tokenizer.json model.type"
                                            r"\) is not supported"):
    _export(tmp_path, wordpiece)
  unigram = Tokenizer(models.Unigram([("<unk>", 0.0), ("a", -1.0), ("</s>", 0.0)], 0))
  with pytest.raises(ConversionError, match=r"a Unigram tokenizer .* picks the likeliest"):
    _export(tmp_path, unigram)
  # Byte fallback that splits words on "▁" first: llama.cpp merges across them.
  tok, config, _ = hf_tokenizer("mistral", tmp_path / "hf")
  tok.pre_tokenizer = pre_tokenizers.Metaspace(split=True)
  with pytest.raises(ConversionError, match=r"pre-tokenizer .*\"split\": true.* is not supported"):
    _export(tmp_path, tok, config)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_merges_llama_cpp_would_not_follow_are_refused(tmp_path):
  from tokenizers import Tokenizer, models, pre_tokenizers
  tok, config, _ = hf_tokenizer("llama2", tmp_path / "hf")
  spec = json.loads(tok.to_str())
  # A BPE trained merge by merge: "ab" + "c" makes "abc", but so would the cut "a" + "bc",
  # which llama.cpp merges and this BPE does not.
  vocab = dict({t: i for i, t in enumerate(["<unk>", "<s>", "</s>"] + BYTES)},
               **{t: 259 + i for i, t in enumerate(["a", "b", "c", "ab", "bc", "abc"])})
  bpe = Tokenizer(models.BPE(vocab, [("a", "b"), ("b", "c"), ("ab", "c")], byte_fallback=True))
  bpe.pre_tokenizer = pre_tokenizers.Metaspace(split=False)
  with pytest.raises(ConversionError, match=r"not SentencePiece's .* 1 cut\(s\) are no merge, "
                                            r"e.g. 'a' \+ 'bc' -> 'abc'"):
    _export(tmp_path, bpe, config)
  # Gemma's vocabularies are read with merges in token id order: these are in reverse.
  spec["model"]["merges"] = spec["model"]["merges"][::-1]
  with pytest.raises(ConversionError, match=r"not in token id order"):
    gemma = Tokenizer.from_str(json.dumps(dict(spec, normalizer={
        "type": "Replace", "pattern": {"String": " "}, "content": SPACE}, pre_tokenizer=None)))
    _export(tmp_path, gemma, config, _OPTIONS["gemma3"])
  assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]
