"""Batched generation: prefill ragged prompts, then a `lax.while_loop` until every row stops.

Everything between the prompt and the last token runs inside one jitted program: no host
round-trip per token. Prompts are right-padded: a real token never attends to the padding after
it (causality) and each row attends only to its own cache row, so no row sees another row's
padding; the cache length advances by the real tokens only, so decoding overwrites the pads.

Shapes are bucketed (batch, prompt length and new-token budget rounded up to powers of two), so
the program compiles once per bucket; per-row limits and settings are array inputs.

With `draft=` the loop is speculative (infer/speculative.py): same state, more tokens per step.
"""

import dataclasses
import functools
import itertools
import time
from typing import Callable, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np

from infer import sampling as sampling_lib
from infer.sampling import Features, SamplingBatch, SamplingParams
from model import KVCache, ModelConfig, Transformer


@flax.struct.dataclass
class DecodeState:
  step: jax.Array  # int32[]: target forwards so far
  tokens: jax.Array  # int32[B, S]: each row's context, prompt then generated tokens
  prompt_lens: jax.Array  # int32[B]
  num_generated: jax.Array  # int32[B]
  max_new: jax.Array  # int32[B]: a row stops after this many tokens ...
  done: jax.Array  # bool[B]: ... or after one of the EOS ids
  cache: KVCache  # holds tokens[:, :len - 1]; the row's last token is fed next
  seen: jax.Array  # bool[B, V] tokens in the context (repetition penalty); bool[B, 1] if unused
  keys: jax.Array  # per-row PRNG keys
  sampling: SamplingBatch
  draft_cache: KVCache | None = None  # speculative decoding with a draft model
  target_steps: jax.Array | None = None  # int32[B]: target forwards while the row was live
  drafted: jax.Array | None = None  # int32[B]: draft tokens proposed
  accepted: jax.Array | None = None  # int32[B]: draft tokens accepted

  @property
  def context_lens(self):
    return self.prompt_lens + self.num_generated

  def last_tokens(self):
    return jnp.take_along_axis(self.tokens, (self.context_lens - 1)[:, None], axis=1)[:, 0]


def bucket(n: int, minimum: int = 8) -> int:
  return max(minimum, 1 << (max(n, 1) - 1).bit_length())


def prefill(model, params, prompts_BT, prompt_lens_B, cache):
  """Runs the prompts through the model; returns the logits at each row's last prompt token
  and the cache holding the prompts. Sampling the first token from those logits then sets up
  the invariant every step keeps: the cache holds the context minus its last token."""
  b, t = prompts_BT.shape
  positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  real = (jnp.arange(t)[None, :] < prompt_lens_B[:, None]).astype(jnp.int32)
  logits, cache = model.apply({"params": params}, prompts_BT, positions, segment_ids=real,
                              cache=cache)
  last = jnp.take_along_axis(logits, (prompt_lens_B - 1)[:, None, None], axis=1)[:, 0]
  return last, cache


def commit(s: DecodeState, new_BM, count_B, eos_ids) -> tuple[DecodeState, jax.Array]:
  """Appends up to count[b] of new[b] to each live row, cut after an EOS and at max_new.
  Returns the state and how many tokens each row really took (for streaming and stats)."""
  b, m = new_BM.shape
  s_len = s.tokens.shape[1]
  idx = jnp.arange(m)[None, :]
  valid = (idx < count_B[:, None]) & (idx < (s.max_new - s.num_generated)[:, None])
  valid &= ~s.done[:, None]
  is_eos = jnp.isin(new_BM, jnp.asarray(eos_ids, jnp.int32)) & valid
  valid &= (jnp.cumsum(is_eos, axis=1) - is_eos) == 0  # keep up to and including the first EOS
  taken = jnp.sum(valid, axis=1).astype(jnp.int32)
  rows = jnp.arange(b)[:, None]
  pos = jnp.where(valid, s.context_lens[:, None] + idx, s_len)  # s_len: dropped
  tokens = s.tokens.at[rows, pos].set(new_BM, mode="drop")
  seen = s.seen
  if seen.shape[1] > 1:
    seen = seen.at[rows, jnp.where(valid, new_BM, seen.shape[1])].set(True, mode="drop")
  num_generated = s.num_generated + taken
  done = s.done | jnp.any(is_eos & valid, axis=1) | (num_generated >= s.max_new)
  return s.replace(tokens=tokens, seen=seen, num_generated=num_generated, done=done), taken


def seen_mask(tokens_BS, lens_B, vocab: int, features: Features):
  if not features.penalty:
    return jnp.zeros((tokens_BS.shape[0], 1), bool)
  b, s = tokens_BS.shape
  ids = jnp.where(jnp.arange(s)[None, :] < lens_B[:, None], tokens_BS, vocab)
  return jnp.zeros((b, vocab), bool).at[jnp.arange(b)[:, None], ids].set(True, mode="drop")


# Streaming: the loop hands each step's tokens to the host with jax.debug.callback (unordered,
# so it never serialises the loop); a sink reorders by step and calls the user's function.
_SINKS: dict[int, "_StreamSink"] = {}
_SINK_IDS = itertools.count()


class _StreamSink:
  def __init__(self, fn: Callable[[int, list[int]], None], num_rows: int):
    self.fn, self.num_rows, self.next_step, self.pending = fn, num_rows, 0, {}

  def __call__(self, step, new_BM, count_B):
    self.pending[int(step)] = (np.asarray(new_BM), np.asarray(count_B))
    while self.next_step in self.pending:
      new, count = self.pending.pop(self.next_step)
      for row in range(self.num_rows):
        if count[row]:
          self.fn(row, new[row, :count[row]].tolist())
      self.next_step += 1


def _emit(sink_id, step, new_BM, count_B):
  _SINKS[int(sink_id)](step, new_BM, count_B)


def emit(stream: bool, sink_id, step, new_BM, count_B):
  if stream:
    jax.debug.callback(_emit, sink_id, step, new_BM, count_B, ordered=False)


@functools.partial(jax.jit, static_argnames=("cfg", "features", "eos_ids", "cache_len",
                                             "cache_dtype", "stream"))
def _prefill_step(params, prompts_BT, prompt_lens_B, max_new_B, keys_B, sampling, sink_id, *,
                  cfg: ModelConfig, features: Features, eos_ids, cache_len: int, cache_dtype,
                  stream: bool) -> DecodeState:
  b, t = prompts_BT.shape
  cache = KVCache.init(cfg, b, cache_len, cache_dtype)
  last_logits, cache = prefill(Transformer(cfg), params, prompts_BT, prompt_lens_B, cache)
  tokens = jnp.zeros((b, cache_len), jnp.int32).at[:, :t].set(prompts_BT)
  seen = seen_mask(prompts_BT, prompt_lens_B, cfg.vocab_size, features)
  zeros = jnp.zeros((b,), jnp.int32)
  s = DecodeState(step=jnp.int32(0), tokens=tokens, prompt_lens=prompt_lens_B,
                  num_generated=zeros, max_new=max_new_B, done=max_new_B <= 0, cache=cache,
                  seen=seen, keys=keys_B, sampling=sampling, target_steps=zeros, drafted=zeros,
                  accepted=zeros)
  tok = sampling_lib.sample_rows(sampling_lib.token_keys(keys_B, zeros), last_logits, sampling,
                                 features, seen)
  s, taken = commit(s, tok[:, None], jnp.ones((b,), jnp.int32), eos_ids)
  emit(stream, sink_id, jnp.int32(0), tok[:, None], taken)
  return s


@functools.partial(jax.jit, static_argnames=("cfg", "features", "eos_ids", "stream"),
                   donate_argnames=("s",))
def _decode_loop(params, s: DecodeState, sink_id, *, cfg: ModelConfig, features: Features,
                 eos_ids, stream: bool) -> DecodeState:
  model = Transformer(cfg)

  def body(s: DecodeState):
    last = s.last_tokens()
    pos = s.cache.lengths[:, None]
    logits, cache = model.apply({"params": params}, last[:, None], pos, cache=s.cache)
    keys = sampling_lib.token_keys(s.keys, s.num_generated)
    tok = sampling_lib.sample_rows(keys, logits[:, 0], s.sampling, features, s.seen)
    # A finished row's cache stops advancing, so it can never run past the cache's end.
    cache = cache.replace(lengths=jnp.where(s.done, s.cache.lengths, cache.lengths))
    live = (~s.done).astype(jnp.int32)
    s2, taken = commit(s.replace(cache=cache), tok[:, None], jnp.ones_like(live), eos_ids)
    emit(stream, sink_id, s.step + 1, tok[:, None], taken)
    return s2.replace(step=s.step + 1, target_steps=s.target_steps + live)

  return jax.lax.while_loop(lambda s: ~jnp.all(s.done), body, s)


@dataclasses.dataclass
class Generation:
  """What `generate_with_stats` returns: tokens per prompt (prompt excluded, cut after the
  first EOS) and measurements of the run."""
  tokens: list[list[int]]
  prefill_s: float
  decode_s: float
  prompt_tokens: int
  target_steps: list[int]  # target forwards per row after prefill
  drafted: list[int]  # speculative: draft tokens proposed per row
  accepted: list[int]  # speculative: draft tokens accepted per row

  @property
  def generated_tokens(self) -> int:
    return sum(len(t) for t in self.tokens)

  @property
  def acceptance_rate(self) -> float:
    return sum(self.accepted) / max(sum(self.drafted), 1)

  @property
  def tokens_per_step(self) -> float:
    """Tokens emitted per target forward in the loop (the first token comes from prefill)."""
    return (self.generated_tokens - len(self.tokens)) / max(sum(self.target_steps), 1)

  def stats(self) -> dict:
    out = {"prefill_s": self.prefill_s, "decode_s": self.decode_s,
           "prompt_tokens": self.prompt_tokens, "generated_tokens": self.generated_tokens,
           "prefill_tokens_per_s": self.prompt_tokens / max(self.prefill_s, 1e-9),
           "decode_tokens_per_s": (self.generated_tokens - len(self.tokens))
                                  / max(self.decode_s, 1e-9),
           "target_steps": sum(self.target_steps), "tokens_per_step": self.tokens_per_step}
    if sum(self.drafted):
      out["acceptance_rate"] = self.acceptance_rate
    return out


def _per_row(value, n: int, name: str) -> list:
  if isinstance(value, (list, tuple)):
    if len(value) != n:
      raise ValueError(f"{name} has {len(value)} entries for {n} prompts")
    return list(value)
  return [value] * n


def row_keys(seed, n: int):
  """Per-row keys: a list of seeds gives each row PRNGKey(seed_i), so a row samples the same
  tokens alone or in any batch; one int seed gives fold_in(PRNGKey(seed), row)."""
  if isinstance(seed, (list, tuple)):
    return sampling_lib.row_keys(np.asarray(seed, np.uint32))
  base = jax.random.PRNGKey(seed)
  return jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.arange(n))


def generate_with_stats(cfg: ModelConfig, params, prompts: Sequence[Sequence[int]], *,
                        max_new_tokens: int | Sequence[int],
                        sampling: SamplingParams | Sequence[SamplingParams] = SamplingParams(),
                        eos_ids=(), seed: int | Sequence[int] = 0, draft=None,
                        num_draft_tokens: int = 4,
                        stream: Callable[[int, list[int]], None] | None = None,
                        cache_dtype=None) -> Generation:
  """Generates for a batch of token-id prompts. Per-row `max_new_tokens`, `sampling` and
  `seed` may be lists. `draft`: None, `speculative.ModelDraft(cfg, params)` or
  `speculative.PromptLookup(ngram)`. `stream(row, new_token_ids)` is called as tokens come."""
  from infer import speculative  # the speculative loop builds on this module

  n = len(prompts)
  if n == 0 or any(len(p) == 0 for p in prompts):
    raise ValueError("every prompt needs at least one token")
  max_new = _per_row(max_new_tokens, n, "max_new_tokens")
  params_rows = _per_row(sampling, n, "sampling")
  for i, (p, m) in enumerate(zip(prompts, max_new)):
    limit = cfg.max_seq_len if draft is None else speculative.max_seq_len(cfg, draft)
    if len(p) + m > limit:
      raise ValueError(f"prompt {i} has {len(p)} tokens; with max_new_tokens={m} that exceeds "
                       f"the model's context of {limit} tokens (model.max_seq_len)")
  eos_ids = tuple(int(e) for e in eos_ids)
  k = num_draft_tokens if draft is not None else 0
  if draft is not None:
    speculative.check_draft(cfg, draft, k)

  b, t = bucket(n, 1), bucket(max(len(p) for p in prompts))
  new_bucket = bucket(max(max_new))
  cache_len = t + new_bucket + (k + 1 if k else 0)
  batch = np.zeros((b, t), np.int32)
  lens = np.ones((b,), np.int32)
  for i, p in enumerate(prompts):
    batch[i, :len(p)], lens[i] = p, len(p)
  max_new_arr = np.zeros((b,), np.int32)  # padding rows start done
  max_new_arr[:n] = max_new
  params_rows = params_rows + [params_rows[0]] * (b - n)
  features = Features.of(params_rows)
  sampling_arr = SamplingBatch.of(params_rows)
  seeds = _per_row(seed, n, "seed") if isinstance(seed, (list, tuple)) else seed
  keys = row_keys(seeds + [0] * (b - n) if isinstance(seeds, list) else seeds, b)

  sink_id = next(_SINK_IDS)
  if stream is not None:
    _SINKS[sink_id] = _StreamSink(lambda row, toks: row < n and stream(row, toks), b)
  static = dict(cfg=cfg, features=features, eos_ids=eos_ids, stream=stream is not None)
  try:
    t0 = time.perf_counter()
    if draft is None:
      s = _prefill_step(params, batch, lens, max_new_arr, keys, sampling_arr, sink_id,
                        cache_len=cache_len, cache_dtype=cache_dtype, **static)
      jax.block_until_ready(s)
      t1 = time.perf_counter()
      s = _decode_loop(params, s, sink_id, **static)
    else:
      s = speculative.prefill(params, draft, batch, lens, max_new_arr, keys, sampling_arr,
                              sink_id, cache_len=cache_len, cache_dtype=cache_dtype, **static)
      jax.block_until_ready(s)
      t1 = time.perf_counter()
      s = speculative.decode_loop(params, draft, s, sink_id, num_draft=k, **static)
    tokens, ctx, plens = jax.device_get((s.tokens, s.context_lens, s.prompt_lens))
    t2 = time.perf_counter()
    if stream is not None:
      jax.effects_barrier()
  finally:
    _SINKS.pop(sink_id, None)
  stats = jax.device_get((s.target_steps, s.drafted, s.accepted))
  out = [tokens[i, plens[i]:ctx[i]].tolist() for i in range(n)]
  return Generation(tokens=out, prefill_s=t1 - t0, decode_s=t2 - t1,
                    prompt_tokens=int(sum(len(p) for p in prompts)),
                    target_steps=stats[0][:n].tolist(), drafted=stats[1][:n].tolist(),
                    accepted=stats[2][:n].tolist())


def generate(cfg: ModelConfig, params, prompts: Sequence[Sequence[int]], *,
             max_new_tokens: int | Sequence[int],
             sampling: SamplingParams | Sequence[SamplingParams] = SamplingParams(),
             eos_ids=(), seed: int | Sequence[int] = 0, **kwargs) -> list[list[int]]:
  """Generated token ids per prompt (prompt excluded), cut after the first EOS.
  Keyword arguments as `generate_with_stats`."""
  return generate_with_stats(cfg, params, prompts, max_new_tokens=max_new_tokens,
                             sampling=sampling, eos_ids=eos_ids, seed=seed, **kwargs).tokens
