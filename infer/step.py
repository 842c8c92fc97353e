"""One step of decoding, shared by every decoder: `generate` (infer/decode.py), speculative
decoding (infer/speculative.py) and the continuous-batching engine (infer/engine.py).

`forward` feeds each row's next tokens onto a cache (contiguous or paged) at the positions
after what the row holds, and returns the logits where they are sampled: the model's one
forward (model/transformer.py) on the prepared inference layout (model/fused.py);
`forward_packed` does the same for groups of rows of different lengths in one forward. Around it,
the state of a generation loop (`DecodeState`), prefill into an empty cache, appending sampled
tokens (`commit`) and streaming them to the host (`emit`).
"""

import functools
import itertools
from typing import Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np

from infer import sampling as sampling_lib
from infer.sampling import Features, SamplingBatch
from model import KVCache, ModelConfig
from model.kv_cache import PackedPagedKVCache, PagedKVCache
from model.transformer import forward as model_forward


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


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=None) -> KVCache:
  """A contiguous cache with one [B, S, K, H] buffer per layer (a tuple: updated in place);
  dtype as `kv_cache.storage_dtype` (None: the compute dtype; "int8": quantized)."""
  return KVCache.init(cfg, batch, max_len, dtype, per_layer=True)


def forward(cfg: ModelConfig, params, tokens_BT, cache: KVCache | PagedKVCache, *,
            n_real_B=None, logits_at=None, empty_cache: bool = False):
  """(logits, cache): tokens_BT fed at slots cache.lengths[b] + t of each row.

  n_real_B: int32[B], the real tokens of each right-padded row (default: all T); the cache
  advances by them only. logits_at: int32[B], the one position per row to score (logits
  f32[B, V]); None scores all (f32[B, T, V]). empty_cache: the (contiguous) cache holds
  nothing yet (prefill): the tokens attend only to each other, through flash attention.
  """
  b, t = tokens_BT.shape
  positions = cache.lengths[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
  real = (None if n_real_B is None
          else (jnp.arange(t)[None, :] < n_real_B[:, None]).astype(jnp.int32))
  logits, cache, _ = model_forward(cfg, params, tokens_BT, positions, segment_ids=real,
                                   cache=cache, empty_cache=empty_cache, logits_at=logits_at)
  return logits, cache


def forward_packed(cfg: ModelConfig, params, tokens_RT, n_real_R, cache: PackedPagedKVCache,
                   logits_at_M):
  """(logits f32[M, V], cache): groups of rows of different lengths through one forward, which
  reads the weights once for all of them (kv_cache.PackedTables). Group g: tokens_RT[g]
  int32[R_g, T_g], right-padded to n_real_R[g] int32[R_g] real tokens, fed at the positions
  after its table's lengths. logits_at_M: int32[M], the packed tokens scored (index into
  the groups' tokens laid out one after another, row-major)."""
  tables = cache.tables
  real = [(jnp.arange(t.shape[1])[None, :] < n[:, None]).astype(jnp.int32)
          for t, n in zip(tokens_RT, n_real_R)]
  logits, cache, _ = model_forward(cfg, params, tables.join(tokens_RT), tables.positions(),
                                   segment_ids=tables.join(real), cache=cache,
                                   logits_at=logits_at_M[None])
  return logits[0], cache


def prefill(cfg: ModelConfig, params, prompts_BT, prompt_lens_B, cache):
  """Runs the right-padded prompts through the model into an empty `cache`; returns the logits
  f32[B, V] at each row's last prompt token and the cache holding the prompts. Sampling the
  first token from those logits then sets up the invariant every step keeps: the cache holds
  the context minus its last token.

  The prompt attends only to itself (flash attention on TPU/GPU: no [B, K, G, T, S] scores)
  and the head runs at one position per row (no [B, T, V] logits), so prefill memory grows
  linearly in T."""
  return forward(cfg, params, prompts_BT, cache, n_real_B=prompt_lens_B,
                 logits_at=prompt_lens_B - 1, empty_cache=True)


def logprobs_at_temperature(logits_BV, temperature_B):
  """f32[B, V]: log_softmax(logits / T) per row, T = 1 where T = 0 (greedy), no filters."""
  temp = jnp.where(temperature_B > 0, temperature_B, 1.0)
  return jax.nn.log_softmax(logits_BV.astype(jnp.float32) / temp[:, None], axis=-1)


def token_logprobs(logits_BV, tokens_B, temperature_B):
  """f32[B]: log_softmax(logits / T)[token] per row, T = 1 where T = 0 (greedy), no filters."""
  logp = logprobs_at_temperature(logits_BV, temperature_B)
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
SINKS: dict[int, "StreamSink"] = {}
SINK_IDS = itertools.count()


class StreamSink:
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
  SINKS[int(sink_id)](window_BW, total_B)


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
def prefill_state(params, prompts_BT, prompt_lens_B, max_new_B, keys_B, sampling, eos_ids,
                  sink_id, allowed_BW=None, *, cfg: ModelConfig, features: Features,
                  cache_len: int, cache_dtype, stream: int,
                  return_logprobs: bool = False) -> DecodeState:
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
  # allowed_BW: the first token's packed bitmask under structured output (None: free).
  tok = sampling_lib.sample_rows(sampling_lib.token_keys(keys_B, zeros), last_logits, sampling,
                                 features, seen, allowed_BW)
  lp = token_logprobs(last_logits, tok, sampling.temperature)[:, None] if return_logprobs else None
  s, _ = commit(s, tok[:, None], jnp.ones((b,), jnp.int32), eos_ids, lp)
  emit(stream, sink_id, s, 1)
  return s
