"""Byte-level BPE tokenizer: trained once per run, kept in workdir/tokenizer.json.

Byte-level (GPT-2 style) means every string, tabs and unicode included, maps to
tokens and decodes back to exactly itself: there is no unknown token.
"""

import sys
import time
from collections.abc import Iterable, Iterator

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from infer.files import as_path, read_tokenizer, write_atomic
from train.data import EOS, DataError, read_documents

__all__ = ["EOS", "train_tokenizer", "load_or_train_tokenizer"]

_FILENAME = "tokenizer.json"
_BYTES = 256  # The base alphabet: one token per byte.


def train_tokenizer(texts: Iterable[str], vocab_size: int,
                    progress: bool = False) -> tokenizers.Tokenizer:
  """Learns a byte-level BPE of `vocab_size` tokens; EOS is id 0. `progress`: the tokenizers
  library's own bars on stderr."""
  if vocab_size < _BYTES + 1:
    raise ValueError(
        f"vocab_size={vocab_size} is below {_BYTES + 1}: the 256 byte tokens "
        "plus EOS.")
  tokenizer = tokenizers.Tokenizer(models.BPE())
  # No prefix space: code is whitespace-sensitive, and decoding must give back
  # the exact text.
  tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tokenizer.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size,
      special_tokens=[EOS],  # First special token, so id 0.
      # All 256 bytes, even those absent from the sample, so nothing is unknown.
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
      show_progress=progress,
  )
  tokenizer.train_from_iterator(texts, trainer)
  return tokenizer


def load_or_train_tokenizer(data_cfg, workdir: str, vocab_size: int,
                            train_files: list[str]) -> tokenizers.Tokenizer:
  """The run's tokenizer, from the first source that has one.

  1. `data_cfg.tokenizer`, a tokenizer.json path (copied into workdir), e.g. a pretrained
     model's (its directory's tokenizer_config.json then names the EOS and BOS; see
     train/data.py);
  2. `workdir/tokenizer.json` (a resumed run);
  3. a new BPE trained on the first `data_cfg.tokenizer_train_mb` MB of
     `train_files`, in their order, saved to workdir/tokenizer.json.

  `vocab_size` is model.vocab_size; a bigger tokenizer is an error. Paths may be remote
  (gs://...).
  """
  saved = as_path(workdir) / _FILENAME
  if data_cfg.tokenizer:
    tokenizer = _check_size(_load(data_cfg.tokenizer, "data.tokenizer"), vocab_size,
                            f"data.tokenizer={data_cfg.tokenizer!r}")
    _keep_copy(tokenizer, saved)
  elif saved.exists():
    tokenizer = _check_size(_load(saved, "workdir"), vocab_size, str(saved))
  else:
    budget = int(data_cfg.tokenizer_train_mb * 2**20)
    print(f"training a {vocab_size}-token BPE tokenizer on the first "
          f"{data_cfg.tokenizer_train_mb:g} MB of the train files...", flush=True)
    t0 = time.perf_counter()
    tokenizer = train_tokenizer(_leading_text(train_files, data_cfg, budget),
                                vocab_size, progress=sys.stderr.isatty())
    _save_atomic(tokenizer, saved)
    print(f"trained the tokenizer in {time.perf_counter() - t0:.1f} s: {saved}", flush=True)
  return tokenizer


def _check_size(tokenizer: tokenizers.Tokenizer, vocab_size: int, where: str):
  """A tokenizer with more tokens than the model's embedding rows is refused, before it is
  copied anywhere."""
  if tokenizer.get_vocab_size() > vocab_size:
    raise DataError(f"the tokenizer of {where} has {tokenizer.get_vocab_size()} tokens but "
                    f"model.vocab_size={vocab_size}: raise model.vocab_size or use a "
                    "smaller tokenizer")
  return tokenizer


def _load(path, source: str) -> tokenizers.Tokenizer:
  if not as_path(path).is_file():
    raise DataError(f"{source}: no tokenizer file at {str(path)!r}.")
  # Its document separator is checked with its tokenizer_config, by the data pipeline.
  return read_tokenizer(path)


def _keep_copy(tokenizer: tokenizers.Tokenizer, saved) -> None:
  """Puts the tokenizer in workdir, so the workdir alone can resume a run."""
  if not saved.exists():
    _save_atomic(tokenizer, saved)
  elif read_tokenizer(saved).to_str() != tokenizer.to_str():
    # Resuming with other token ids would silently scramble the model's input.
    raise DataError(
        f"data.tokenizer differs from {saved}, which this run was started "
        "with; use a new workdir or the same tokenizer.")


def _leading_text(files: list[str], data_cfg, budget: int) -> Iterator[str]:
  """Documents of `files`, in order, until `budget` UTF-8 bytes are given."""
  for path in files:
    for text in read_documents(path, data_cfg):
      data = text.encode("utf-8")
      if len(data) >= budget:
        yield data[:budget].decode("utf-8", errors="ignore")
        return
      budget -= len(data)
      yield text


def _save_atomic(tokenizer: tokenizers.Tokenizer, path) -> None:
  """A crash never leaves a half-written tokenizer (see infer.files.write_atomic)."""
  write_atomic(path, tokenizer.to_str(pretty=True))
