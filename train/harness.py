"""EleutherAI's lm-evaluation-harness on our models: lm-eval's model `jaxllm`.

  lm_eval --model jaxllm --model_args checkpoint=runs/tiny --tasks hellaswag,arc_easy \
      --batch_size auto
  lm_eval --model jaxllm --model_args hf=SmolLM2-135M --tasks arc_easy
  lm_eval --model jaxllm --model_args gguf=smollm2.gguf,max_length=1024 ...
  lm_eval --model jaxllm --model_args checkpoint=runs/tiny \
      --include_path my_tasks/ --tasks my_task          # task YAMLs of your own

Every flag is lm-eval's own (`lm_eval run --help`; `python -m lm_eval` is the same command).
lm-eval finds `jaxllm` through the jaxllm-lm-eval.pth that installing this package (`pip
install -e .`) puts in site-packages: train/lm_eval_plugin.py registers this class, by name,
when lm-eval loads its own models, and this module (and jax) load only when `jaxllm` is asked
for. From Python: `lm_eval.simple_evaluate(model="jaxllm", model_args="checkpoint=runs/tiny",
tasks=[...])`, or pass `model=JaxLM(checkpoint=...)`.

model_args (comma-separated key=value):
  checkpoint=DIR | hf=DIR | gguf=FILE   a run directory of ours (quantized ones too), a Hugging
                   Face directory, or a llama.cpp GGUF file (infer/loaders.py)
  step=N           the run's checkpoint (default: the latest)
  max_length=N     the context in tokens (default and at most: model.max_seq_len)
  max_batch_tokens=N  with --batch_size auto: padded tokens per forward (default 8192)
  max_gen_toks=N   generate_until's budget where a task sets none (default 256)
  seed=N           for tasks that sample (do_sample, temperature > 0)

How requests run (as lm-eval's HF model runs them):
  loglikelihood   context + continuation as one row, cut from the left to max_length + 1
                  tokens (the last one is only a target). Rows go longest first, padded to a
                  power-of-two length (at most max_length) and row count, so a task compiles a
                  handful of programs; one forward per batch gives each row the sum of log p
                  over its continuation and whether every continuation token is the argmax.
  loglikelihood_rolling  the text's tokens (without a BOS of their own: the log-likelihood of
                  the string after the prefix token, as lm-eval's LM interface defines it) in
                  disjoint windows of max_length, each token predicted once
                  (lm_eval.utils.get_rolling_token_windows), scored as above.
  generate_until  prompts cut from the left to max_length - max_gen_toks and batched through
                  infer/decode.py's jitted loop (greedy, or the task's temperature, top_p,
                  top_k), which stops at EOS or max_gen_toks; the text is cut at the first stop
                  string on the host.
The log-probs come from the model's own logits (pretrain.forward), so a final soft-cap and
quantized heads count, and argmax needs them anyway; a batch holds rows x length x vocab f32
logits, which max_batch_tokens bounds.
"""

import functools
import inspect
import json
import logging

import jax
import jax.numpy as jnp
import lm_eval.models  # noqa: F401  (lm-eval's registry fills itself only while empty)
import numpy as np
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import (handle_stop_sequences, normalize_gen_kwargs,
                                  postprocess_generated_text)
from tqdm import tqdm

from infer import decode, loaders
from infer.files import document_ids, token_ids
from infer.sampling import SamplingParams
from model import ModelConfig, Transformer
from train.tasks import pretrain

log = logging.getLogger(__name__)

NAME = "jaxllm"
SOURCES = ("checkpoint", "hf", "gguf")
# gen_kwargs that map onto SamplingParams; do_sample is already folded into temperature.
SAMPLING_KEYS = {"temperature": float, "top_k": int, "top_p": float, "min_p": float,
                 "repetition_penalty": float}


@functools.partial(jax.jit, static_argnames=("cfg",))
def score_rows(params, batch, *, cfg: ModelConfig):
  """Per row of `batch` (inputs, targets, positions, segment_ids, loss_mask: [B, T]): the sum
  of log p(target) over the positions loss_mask marks, f32[B], and whether each of those
  targets is the logits' argmax, bool[B]."""
  logits_BTV, _ = pretrain.forward(Transformer(cfg), params, batch)
  targets_BT = batch["targets"]
  logp_BT = (jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]
             - jax.nn.logsumexp(logits_BTV, axis=-1))
  mask_BT = batch["loss_mask"] > 0
  greedy_BT = jnp.argmax(logits_BTV, axis=-1) == targets_BT
  return jnp.sum(jnp.where(mask_BT, logp_BT, 0.0), axis=1), jnp.all(greedy_BT | ~mask_BT, axis=1)


def load(checkpoint=None, hf=None, gguf=None, step=None) -> loaders.LoadedModel:
  given = {k: v for k, v in zip(SOURCES, (checkpoint, hf, gguf)) if v is not None}
  if len(given) != 1:
    raise ValueError(f"model_args: name exactly one model of {'=, '.join(SOURCES)}=, got "
                     f"{sorted(given) or 'none'}")
  if step is not None and checkpoint is None:
    raise ValueError("model_args: step= is a checkpoint= run's step; hf= and gguf= have none")
  if checkpoint is not None:
    return loaders.load_checkpoint(str(checkpoint), step=None if step is None else int(step))
  return loaders.load_hf(str(hf)) if hf is not None else loaders.load_gguf(str(gguf))


def _batch_size(value) -> int:
  """lm-eval's --batch_size: rows per batch, 0 for "auto" (and "auto:N")."""
  text = str(value)
  if text.startswith("auto"):
    return 0
  try:
    rows = int(text)
  except ValueError:
    rows = 0
  if rows < 1:
    raise ValueError(f"--batch_size={value!r}: expected a positive integer or 'auto'")
  return rows


@register_model(NAME)
class JaxLM(TemplateLM):
  """An lm-eval model over a run directory, an HF directory or a GGUF file (module doc)."""

  def __init__(self, checkpoint=None, hf=None, gguf=None, step=None, max_length=None,
               max_batch_tokens=8192, max_gen_toks=256, seed=0, batch_size=1,
               max_batch_size=None, device=None, **unknown):
    super().__init__()
    del device  # jax places the model (on its first device)
    if unknown:
      valid = [k for k in inspect.signature(JaxLM).parameters if k != "unknown"]
      raise ValueError(f"model_args: unknown {sorted(unknown)}; {NAME} takes {valid}")
    self._rows = _batch_size(batch_size)
    self._max_rows = int(max_batch_size or 64)
    self._max_batch_tokens = int(max_batch_tokens)
    self._max_gen_toks = int(max_gen_toks)
    self._seed = int(seed)
    if self._max_batch_tokens < 1 or self._max_gen_toks < 1:
      raise ValueError(f"model_args max_batch_tokens={max_batch_tokens} and max_gen_toks="
                       f"{max_gen_toks} must be positive")
    self._model = load(checkpoint, hf, gguf, step)
    cfg = self._model.cfg
    self._max_length = cfg.max_seq_len if max_length is None else int(max_length)
    if not 1 < self._max_length <= cfg.max_seq_len:
      raise ValueError(f"model_args max_length={max_length} must be in [2, model.max_seq_len="
                       f"{cfg.max_seq_len}]")
    ids = token_ids(self._model.tokenizer, self._model.tokenizer_config)
    try:  # a tokenizer we trained names no EOS: its <|endoftext|> ends documents
      eos = document_ids(self._model.tokenizer, self._model.tokenizer_config)[1]
    except ValueError:
      eos = None
    eos = self._model.eos_ids[0] if self._model.eos_ids else eos
    # Before an empty context and each rolling window: BOS where the model has one, else EOS
    # (lm-eval's HF model does the same).
    prefix = next((i for i in (ids["bos_token_id"], self._model.bos_id, eos) if i is not None),
                  None)
    if prefix is None:
      raise ValueError(f"{self._model.source}: its tokenizer names no EOS or BOS token "
                       "(tokenizer_config.json 'eos_token'), which lm-eval puts before an "
                       "empty context")
    self._eot = prefix if eos is None else eos
    self._prefix = prefix
    self._prefix_text = self.tok_decode([prefix], skip_special_tokens=False)

  # The interface lm-eval reads.
  @property
  def eot_token_id(self) -> int:
    return self._eot

  @property
  def prefix_token_id(self) -> int:
    return self._prefix

  @property
  def max_length(self) -> int:
    return self._max_length

  @property
  def max_gen_toks(self) -> int:
    return self._max_gen_toks

  @property
  def tokenizer_name(self) -> str:
    return self._model.source.replace("/", "__")

  def chat_template(self, chat_template=False) -> str | None:
    if chat_template is False or chat_template is None:
      return None
    return self._model.chat_template or ""

  def apply_chat_template(self, chat_history, add_generation_prompt=True) -> str:
    return self._model.render_messages(chat_history, add_generation_prompt)

  def get_model_info(self) -> dict:
    return {"model_source": self._model.source, "max_length": self._max_length}

  def tok_encode(self, string: str, add_special_tokens=None, **kwargs) -> list[int]:
    """The ids a prompt begins with (the model's BOS where it takes one), or with
    add_special_tokens=False the text's alone. Text that already begins with the prefix
    token (a rendered chat template) gets no second one."""
    if add_special_tokens is None and self._prefix_text and string.startswith(self._prefix_text):
      add_special_tokens = False
    if add_special_tokens is False:
      return self._model.tokenizer.encode(string, add_special_tokens=False).ids
    return self._model.encode(string)

  def tok_decode(self, tokens, skip_special_tokens=True) -> str:
    tokens = [tokens] if isinstance(tokens, int) else list(tokens)
    return self._model.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

  def _rows_per_batch(self, length: int) -> int:
    if self._rows:
      return self._rows
    return max(1, min(self._max_rows, self._max_batch_tokens // length))

  def _score(self, rows: list[tuple[list[int], int]], disable_tqdm: bool = False):
    """(sum of log p, greedy) of each (tokens, n): the last n of `tokens` scored, each after
    the ones before it (len(tokens) <= max_length + 1)."""
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    pending, start = [], 0
    with tqdm(total=len(rows), disable=disable_tqdm, desc="jaxllm scoring") as bar:
      while start < len(order):
        t = min(decode.bucket(len(rows[order[start]][0]) - 1), self._max_length)
        chosen = order[start:start + self._rows_per_batch(t)]
        start += len(chosen)
        b = decode.bucket(len(chosen), 1)  # padding rows score nothing
        batch = {k: np.zeros((b, t), dt) for k, (_, dt) in
                 pretrain.token_batch_shapes(b, t).items()}
        for r, i in enumerate(chosen):
          tokens, n_scored = rows[i]
          n = len(tokens) - 1
          batch["inputs"][r, :n], batch["targets"][r, :n] = tokens[:-1], tokens[1:]
          batch["segment_ids"][r, :n] = 1
          batch["positions"][r, :n] = np.arange(n)
          batch["loss_mask"][r, n - n_scored:n] = 1
        # Dispatched now, read at the end: the host builds the next batch meanwhile.
        pending.append((chosen, score_rows(self._model.params, batch, cfg=self._model.cfg)))
        bar.update(len(chosen))
    out = [None] * len(rows)
    for chosen, (logp, greedy) in jax.device_get(pending):
      for r, i in enumerate(chosen):
        out[i] = (float(logp[r]), bool(greedy[r]))
    return out

  def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
    rows = []
    for key, context_enc, continuation_enc in requests:
      if len(continuation_enc) > self._max_length:
        raise ValueError(f"a continuation of {len(continuation_enc)} tokens is longer than "
                         f"max_length={self._max_length} ({key!r:.80})")
      # Cut from the left as lm-eval's HF model does: max_length inputs, the last token only
      # a target.
      rows.append(((context_enc + continuation_enc)[-(self._max_length + 1):],
                   len(continuation_enc)))
    scored = self._score([r for r in rows if r[1]], disable_tqdm)[::-1]
    out = [scored.pop() if n else (0.0, True) for _, n in rows]  # nothing to score: log 1
    for (key, _, _), result in zip(requests, out):
      if key is not None:
        self.cache_hook.add_partial("loglikelihood", key, result)
    return out

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    windows, owners = [], []
    for i, (string,) in enumerate(req.args for req in requests):
      tokens = self.tok_encode(string, add_special_tokens=False)
      for context, target in map(lm_utils.make_disjoint_window,
                                 lm_utils.get_rolling_token_windows(
                                     token_list=tokens, prefix_token=self._prefix,
                                     max_seq_len=self._max_length, context_len=1)):
        windows.append((context + target, len(target)))
        owners.append(i)
    totals = [0.0] * len(requests)
    for i, (logp, _) in zip(owners, self._score(windows, disable_tqdm)):
      totals[i] += logp
    for req, total in zip(requests, totals):
      self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
    return totals

  def _sampling(self, kwargs: dict) -> SamplingParams:
    kwargs = dict(kwargs)
    kwargs.pop("do_sample", None)
    unused = sorted(set(kwargs) - set(SAMPLING_KEYS))
    if unused:
      lm_utils.warning_once(log, f"{NAME}: generation kwargs {unused} are not supported and "
                            f"are ignored (supported: until, max_gen_toks, do_sample, "
                            f"{', '.join(SAMPLING_KEYS)})")
    given = {k: cast(kwargs[k]) for k, cast in SAMPLING_KEYS.items() if k in kwargs}
    return SamplingParams(**{"temperature": 0.0, **given})  # greedy unless a task samples

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    groups = {}  # one SamplingParams and budget per group of identical gen_kwargs
    for i, req in enumerate(requests):
      groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
    eos_text = self.tok_decode([self._eot], skip_special_tokens=False)
    out = [None] * len(requests)
    bar = tqdm(total=len(requests), disable=disable_tqdm, desc="jaxllm generating")
    for members in groups.values():
      kwargs = dict(normalize_gen_kwargs(requests[members[0]].args[1], self._max_gen_toks))
      until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
      max_gen = int(kwargs.pop("max_gen_toks"))
      if max_gen >= self._max_length:
        raise ValueError(f"max_gen_toks={max_gen} leaves no room for a prompt in max_length="
                         f"{self._max_length} tokens")
      sampling = self._sampling(kwargs)
      prompts = {i: self.tok_encode(requests[i].args[0])[-(self._max_length - max_gen):]
                 for i in members}
      order = sorted(members, key=lambda i: -len(prompts[i]))
      start = 0
      while start < len(order):
        longest = len(prompts[order[start]])
        chosen = order[start:start + self._rows_per_batch(decode.bucket(longest) + max_gen)]
        start += len(chosen)
        generated = decode.generate(self._model.cfg, self._model.params,
                                    [prompts[i] for i in chosen], max_new_tokens=max_gen,
                                    sampling=sampling, eos_ids=self._model.eos_ids,
                                    seed=self._seed)
        for i, ids in zip(chosen, generated):
          out[i] = postprocess_generated_text(self.tok_decode(ids), until, None)
          self.cache_hook.add_partial("generate_until", requests[i].args, out[i])
        bar.update(len(chosen))
    bar.close()
    return out

