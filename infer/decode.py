"""Batched generation: prefill ragged prompts, then a `lax.while_loop` until every row stops.

Everything between the prompt and the last token runs inside one jitted program: no host
round-trip per token. Prompts are right-padded: a real token never attends to the padding after
it (causality) and each row attends only to its own cache row, so no row sees another row's
padding; the cache length advances by the real tokens only, so decoding overwrites the pads.

Shapes are bucketed (batch, prompt length and new-token budget rounded up to powers of two), so
the program compiles once per bucket; per-row limits and settings are array inputs.

With `draft=` the loop is speculative (infer/speculative.py): same state, more tokens per step.

With `return_logprobs=True` each generated token also comes with its log-probability under the
row's tempered distribution before any filter, log_softmax(logits / T)[token] (T = 1 for greedy
rows), which is what PPO/GRPO need as the behaviour policy's log-probs. That equals the
distribution the token was drawn from only under temperature-only sampling (no top-k, top-p,
min-p or repetition penalty), so RL rollouts should sample that way.

The forward is model/fused.py's: the module's computation over weights laid out once for
decoding (fused QKV and gate/up; [out, in] matrices for one row at a time, [in, out] for
batches and speculative verification: `layout_for`); `generate*` accept the module's
parameter tree or an already prepared `fused.FusedParams` (prepare once to reuse).
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
from model import KVCache, ModelConfig, fused


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
  logprobs: jax.Array | None = None  # f32[B, S]: log p(tokens[b, i]) for generated positions

  @property
  def context_lens(self):
    return self.prompt_lens + self.num_generated

  def last_tokens(self):
    return jnp.take_along_axis(self.tokens, (self.context_lens - 1)[:, None], axis=1)[:, 0]


def unstack_layers(cfg: ModelConfig, params):
  """The same model with one parameter subtree per layer (`layers_0`, ...) instead of one
  scanned stack. Inference runs unrolled so that a cache kept as one buffer per layer is
  updated in place; a scan would slice and re-stack the whole cache on every step."""
  if not cfg.scan_layers:
    return cfg, params
  params = dict(params)
  stacked = params.pop("layers")
  for i in range(cfg.n_layers):
    params[f"layers_{i}"] = jax.tree.map(lambda x: x[i], stacked)
  return dataclasses.replace(cfg, scan_layers=False), params


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=None) -> KVCache:
  """A contiguous cache with one [B, S, K, H] buffer per layer (a tuple: see unstack_layers)."""
  dtype = cfg.compute_dtype if dtype is None else dtype
  shape = (batch, max_len, cfg.n_kv_heads, cfg.head_dim)
  layers = lambda: tuple(jnp.zeros(shape, dtype) for _ in range(cfg.n_layers))
  return KVCache(k=layers(), v=layers(), lengths=jnp.zeros((batch,), jnp.int32))


def bucket(n: int, minimum: int = 8) -> int:
  return max(minimum, 1 << (max(n, 1) - 1).bit_length())


def prefill(cfg: ModelConfig, params: fused.FusedParams, prompts_BT, prompt_lens_B, cache):
  """Runs the right-padded prompts through the model into an empty `cache`; returns the logits
  f32[B, V] at each row's last prompt token and the cache holding the prompts. Sampling the
  first token from those logits then sets up the invariant every step keeps: the cache holds
  the context minus its last token.

  The prompt attends only to itself (flash attention on TPU/GPU: no [B, K, G, T, S] scores)
  and the head runs at one position per row (no [B, T, V] logits), so prefill memory grows
  linearly in T."""
  b, t = prompts_BT.shape
  positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  real = (jnp.arange(t)[None, :] < prompt_lens_B[:, None]).astype(jnp.int32)
  return fused.forward(cfg, params, prompts_BT, positions, segment_ids=real, cache=cache,
                       empty_cache=True, logits_at=prompt_lens_B - 1)


def token_logprobs(logits_BV, tokens_B, temperature_B):
  """f32[B]: log_softmax(logits / T)[token] per row, T = 1 where T = 0 (greedy), no filters."""
  temp = jnp.where(temperature_B > 0, temperature_B, 1.0)
  logp = jax.nn.log_softmax(logits_BV.astype(jnp.float32) / temp[:, None], axis=-1)
  return jnp.take_along_axis(logp, tokens_B[:, None], axis=-1)[:, 0]


def commit(s: DecodeState, new_BM, count_B, eos_ids,
           logprobs_BM=None) -> tuple[DecodeState, jax.Array]:
  """Appends up to count[b] of new[b] to each live row, cut after an EOS and at max_new.
  Returns the state and how many tokens each row really took (for streaming and stats).
  `logprobs_BM` (with s.logprobs set) is written at the same positions as the tokens."""
  b, m = new_BM.shape
  s_len = s.tokens.shape[1]
  idx = jnp.arange(m)[None, :]
  valid = (idx < count_B[:, None]) & (idx < (s.max_new - s.num_generated)[:, None])
  valid &= ~s.done[:, None]
  is_eos = jnp.isin(new_BM, eos_ids) & valid
  valid &= (jnp.cumsum(is_eos, axis=1) - is_eos) == 0  # keep up to and including the first EOS
  taken = jnp.sum(valid, axis=1).astype(jnp.int32)
  rows = jnp.arange(b)[:, None]
  pos = jnp.where(valid, s.context_lens[:, None] + idx, s_len)  # s_len: dropped
  tokens = s.tokens.at[rows, pos].set(new_BM, mode="drop")
  logprobs = s.logprobs
  if logprobs is not None and logprobs_BM is not None:
    logprobs = logprobs.at[rows, pos].set(logprobs_BM.astype(jnp.float32), mode="drop")
  seen = s.seen
  if seen.shape[1] > 1:
    seen = seen.at[rows, jnp.where(valid, new_BM, seen.shape[1])].set(True, mode="drop")
  num_generated = s.num_generated + taken
  done = s.done | jnp.any(is_eos & valid, axis=1) | (num_generated >= s.max_new)
  return s.replace(tokens=tokens, seen=seen, num_generated=num_generated, done=done,
                   logprobs=logprobs), taken


def seen_mask(tokens_BS, lens_B, vocab: int, features: Features):
  if not features.penalty:
    return jnp.zeros((tokens_BS.shape[0], 1), bool)
  b, s = tokens_BS.shape
  ids = jnp.where(jnp.arange(s)[None, :] < lens_B[:, None], tokens_BS, vocab)
  return jnp.zeros((b, vocab), bool).at[jnp.arange(b)[:, None], ids].set(True, mode="drop")


# Streaming: every `stream` steps (and when the loop ends) the loop hands the host a window of
# each row's latest tokens with jax.debug.callback (unordered, so it never serialises the loop;
# measured in bench/decode.py: one callback per token step costs about as much as a small
# model's step on CPU, so they are batched). The sink prints each row's tokens exactly once,
# in order, whatever order the windows arrive in.
_SINKS: dict[int, "_StreamSink"] = {}
_SINK_IDS = itertools.count()


class _StreamSink:
  def __init__(self, fn: Callable[[int, list[int]], None], num_rows: int):
    self.fn, self.sent, self.pending = fn, [0] * num_rows, []

  def __call__(self, window_BW, total_B):
    self.pending.append((np.asarray(window_BW), np.asarray(total_B).tolist()))
    while True:  # a window is usable once every token before it has been sent
      usable = [i for i, (w, total) in enumerate(self.pending)
                if all(sent >= n - w.shape[1] for sent, n in zip(self.sent, total))]
      if not usable:
        return
      window, total = self.pending.pop(usable[0])
      for row, n in enumerate(total):
        if n > self.sent[row]:
          self.fn(row, window[row, window.shape[1] - (n - self.sent[row]):].tolist())
          self.sent[row] = n


def _emit(sink_id, window_BW, total_B):
  _SINKS[int(sink_id)](window_BW, total_B)


def emit(stream: int, sink_id, s: DecodeState, width: int, now=True):
  """Sends each row's last `width` tokens and its token count to the host sink."""
  if not stream:
    return
  def send():
    idx = jnp.maximum(s.context_lens[:, None] - width + jnp.arange(width)[None, :], 0)
    window = jnp.take_along_axis(s.tokens, idx, axis=1)
    jax.debug.callback(_emit, sink_id, window, s.num_generated, ordered=False)
  if now is True:
    send()
  else:
    jax.lax.cond(now, send, lambda: None)


@functools.partial(jax.jit, static_argnames=("cfg", "features", "cache_len", "cache_dtype",
                                             "stream", "return_logprobs"))
def _prefill_step(params, prompts_BT, prompt_lens_B, max_new_B, keys_B, sampling, eos_ids,
                  sink_id, *, cfg: ModelConfig, features: Features, cache_len: int, cache_dtype,
                  stream: int, return_logprobs: bool = False) -> DecodeState:
  b, t = prompts_BT.shape
  cache = init_cache(cfg, b, cache_len, cache_dtype)
  last_logits, cache = prefill(cfg, params, prompts_BT, prompt_lens_B, cache)
  tokens = jnp.zeros((b, cache_len), jnp.int32).at[:, :t].set(prompts_BT)
  seen = seen_mask(prompts_BT, prompt_lens_B, cfg.vocab_size, features)
  zeros = jnp.zeros((b,), jnp.int32)
  s = DecodeState(step=jnp.int32(0), tokens=tokens, prompt_lens=prompt_lens_B,
                  num_generated=zeros, max_new=max_new_B, done=max_new_B <= 0, cache=cache,
                  seen=seen, keys=keys_B, sampling=sampling, target_steps=zeros, drafted=zeros,
                  accepted=zeros,
                  logprobs=jnp.zeros((b, cache_len), jnp.float32) if return_logprobs else None)
  tok = sampling_lib.sample_rows(sampling_lib.token_keys(keys_B, zeros), last_logits, sampling,
                                 features, seen)
  lp = token_logprobs(last_logits, tok, sampling.temperature)[:, None] if return_logprobs else None
  s, _ = commit(s, tok[:, None], jnp.ones((b,), jnp.int32), eos_ids, lp)
  emit(stream, sink_id, s, 1)
  return s


@functools.partial(jax.jit, static_argnames=("cfg", "features", "stream"),
                   donate_argnames=("s",))
def _decode_loop(params, s: DecodeState, eos_ids, sink_id, *, cfg: ModelConfig,
                 features: Features, stream: int) -> DecodeState:
  def body(s: DecodeState):
    last = s.last_tokens()
    pos = s.cache.lengths[:, None]
    logits, cache = fused.forward(cfg, params, last[:, None], pos, cache=s.cache)
    keys = sampling_lib.token_keys(s.keys, s.num_generated)
    tok = sampling_lib.sample_rows(keys, logits[:, 0], s.sampling, features, s.seen)
    # A finished row's cache stops advancing, so it can never run past the cache's end.
    cache = cache.replace(lengths=jnp.where(s.done, s.cache.lengths, cache.lengths))
    live = (~s.done).astype(jnp.int32)
    # Static: the state's structure says whether log-probs are kept (None otherwise).
    lp = None if s.logprobs is None else token_logprobs(logits[:, 0], tok, s.sampling.temperature)
    s2, _ = commit(s.replace(cache=cache), tok[:, None], jnp.ones_like(live), eos_ids,
                   None if lp is None else lp[:, None])
    s2 = s2.replace(step=s.step + 1, target_steps=s.target_steps + live)
    emit(stream, sink_id, s2, stream, (s2.step % max(stream, 1) == 0) | jnp.all(s2.done))
    return s2

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
  # With return_logprobs: log_softmax(logits / T)[token] per token, aligned with `tokens`.
  logprobs: list[list[float]] | None = None

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


def layout_for(batch: int, speculative: bool) -> str:
  """The weight layout (model/fused.py) for decoding `batch` rows: one token of one row per
  forward streams fastest [out, in]; several rows (a batch, or k+1 tokens to verify) [in, out].
  Prepare params with it to reuse them across calls."""
  return "out_in" if bucket(batch, 1) == 1 and not speculative else "in_out"


def generate_with_stats(cfg: ModelConfig, params, prompts: Sequence[Sequence[int]], *,
                        max_new_tokens: int | Sequence[int],
                        sampling: SamplingParams | Sequence[SamplingParams] = SamplingParams(),
                        eos_ids=(), seed: int | Sequence[int] = 0, draft=None,
                        num_draft_tokens: int = 4,
                        stream: Callable[[int, list[int]], None] | None = None,
                        stream_every: int = 8, cache_dtype=None,
                        return_logprobs: bool = False) -> Generation:
  """Generates for a batch of token-id prompts. Per-row `max_new_tokens`, `sampling` and
  `seed` may be lists. `params`: the module's tree or `fused.prepare(cfg, params)`. `draft`:
  None, `speculative.ModelDraft(cfg, params)`, `speculative.EarlyExit(n_layers)` or
  `speculative.PromptLookup(ngram)`. `stream(row, new_token_ids)` is called as tokens come,
  every `stream_every` steps (each callback from the loop costs about one small step on CPU).
  `return_logprobs`: also return each generated token's log_softmax(logits / T)[token] (T = 1
  for greedy rows; before top-k/top-p/min-p/penalty: sample RL rollouts with temperature only).
  """
  from infer import speculative  # the speculative loop builds on this module

  if return_logprobs and draft is not None:
    raise ValueError("return_logprobs is not supported with speculative decoding (draft=...): "
                     "the speculative loop does not record them; sample rollouts without a draft")

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
  params = fused.prepare(cfg, params, layout=layout_for(n, draft is not None))
  # The forward needs no layer structure from the config: one static config per model shape.
  cfg = dataclasses.replace(cfg, scan_layers=False, remat="none")
  if isinstance(draft, speculative.EarlyExit):
    draft = speculative.early_exit_draft(cfg, params, draft.n_layers)
  elif isinstance(draft, speculative.ModelDraft):
    draft = speculative.ModelDraft(
        dataclasses.replace(draft.cfg, scan_layers=False, remat="none"),
        fused.prepare(draft.cfg, draft.params, layout=layout_for(n, speculative=False)))
  eos_arr = np.full((bucket(len(eos_ids), 4),), -1, np.int32)  # an input: no recompile
  eos_arr[:len(eos_ids)] = eos_ids
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
  static = dict(cfg=cfg, features=features, stream=0 if stream is None else max(stream_every, 1))
  try:
    t0 = time.perf_counter()
    if draft is None:
      s = _prefill_step(params, batch, lens, max_new_arr, keys, sampling_arr, eos_arr, sink_id,
                        cache_len=cache_len, cache_dtype=cache_dtype,
                        return_logprobs=return_logprobs, **static)
      jax.block_until_ready(s)
      t1 = time.perf_counter()
      s = _decode_loop(params, s, eos_arr, sink_id, **static)
    else:
      s = speculative.prefill(params, draft, batch, lens, max_new_arr, keys, sampling_arr,
                              eos_arr, sink_id, cache_len=cache_len, cache_dtype=cache_dtype,
                              **static)
      jax.block_until_ready(s)
      t1 = time.perf_counter()
      s = speculative.decode_loop(params, draft, s, eos_arr, sink_id, num_draft=k, **static)
    tokens, ctx, plens = jax.device_get((s.tokens, s.context_lens, s.prompt_lens))
    t2 = time.perf_counter()
    if stream is not None:
      jax.effects_barrier()
  finally:
    _SINKS.pop(sink_id, None)
  stats = jax.device_get((s.target_steps, s.drafted, s.accepted))
  out = [tokens[i, plens[i]:ctx[i]].tolist() for i in range(n)]
  logprobs = None
  if return_logprobs:
    lp = jax.device_get(s.logprobs)
    logprobs = [lp[i, plens[i]:ctx[i]].tolist() for i in range(n)]
  return Generation(tokens=out, prefill_s=t1 - t0, decode_s=t2 - t1,
                    prompt_tokens=int(sum(len(p) for p in prompts)),
                    target_steps=stats[0][:n].tolist(), drafted=stats[1][:n].tolist(),
                    accepted=stats[2][:n].tolist(), logprobs=logprobs)


def generate(cfg: ModelConfig, params, prompts: Sequence[Sequence[int]], *,
             max_new_tokens: int | Sequence[int],
             sampling: SamplingParams | Sequence[SamplingParams] = SamplingParams(),
             eos_ids=(), seed: int | Sequence[int] = 0, **kwargs) -> list[list[int]]:
  """Generated token ids per prompt (prompt excluded), cut after the first EOS.
  Keyword arguments as `generate_with_stats`."""
  return generate_with_stats(cfg, params, prompts, max_new_tokens=max_new_tokens,
                             sampling=sampling, eos_ids=eos_ids, seed=seed, **kwargs).tokens
