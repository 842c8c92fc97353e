"""Speculative decoding (Leviathan et al. 2023, Alg. 1; Chen et al. 2023).

Each step a draft proposes up to k tokens x_1..x_k with distributions q_1..q_k; the target
scores all k+1 positions in one forward (p_1..p_{k+1}); x_i is accepted with probability
min(1, p_i(x_i)/q_i(x_i)); the first rejection is resampled from norm(max(0, p_i - q_i)); if
all k are accepted a bonus token comes from p_{k+1}. The emitted tokens are distributed exactly
as the target's (Leviathan et al. 2023, Thm. 1). The same penalty, temperature and filters
shape p and q. Greedy rows accept while the draft equals the target's argmax.

Drafts:
  ModelDraft(cfg, params): a smaller model with the same vocabulary and its own cache.
  EarlyExit(n_layers): self-speculation: the target's own first n layers, then its final norm
    and head (Draft & Verify, Zhang et al. 2024; LayerSkip, Elhoushi et al. 2024, Sec. 4,
    which also trains the model for it). It is a ModelDraft that shares the target's weights
    but keeps its own n-layer cache, so it needs no other model; verification by the full
    model keeps the output exact (greedy: identical to plain decoding).
  PromptLookup(ngram): copies the continuation of the latest earlier match of the context's
    last n-gram (Saxena 2023, "prompt lookup decoding"); it has no q, so it counts as one-hot:
    accept with probability p(x), on rejection sample from p without x.

The target cache rolls back to the accepted length by its `lengths` alone; the draft cache
catches up on its next step, which feeds up to two tokens (the last accepted draft token, which
it never saw, and the new target token).
"""

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from infer import sampling as sampling_lib
from infer import step
from infer.sampling import Features, SamplingBatch
from infer.step import DecodeState, commit, emit, init_cache
from model import ModelConfig, fused

_SALT_DRAFT, _SALT_ACCEPT = 1, 1000


@dataclasses.dataclass(frozen=True, eq=False)
class ModelDraft:
  cfg: ModelConfig
  params: Any


@dataclasses.dataclass(frozen=True)
class EarlyExit:
  n_layers: int  # the target's first n layers draft; generate_with_stats builds the ModelDraft


def early_exit_draft(cfg: ModelConfig, params, n_layers: int) -> ModelDraft:
  """The first `n_layers` of the (prepared) target as a draft model: no weight is copied."""
  if not 1 <= n_layers < cfg.n_layers:
    raise ValueError(f"an early-exit draft needs 1 <= n_layers < {cfg.n_layers} (the target's "
                     f"layers), got {n_layers}")
  return ModelDraft(dataclasses.replace(cfg, n_layers=n_layers),
                    fused.first_layers(params, n_layers))


@dataclasses.dataclass(frozen=True)
class PromptLookup:
  ngram: int = 3  # the longest n-gram matched; shorter ones are tried when it finds nothing


def check_draft(cfg: ModelConfig, draft, k: int):
  if k < 1:
    raise ValueError(f"num_draft_tokens must be >= 1, got {k}")
  if isinstance(draft, ModelDraft):
    if draft.cfg.vocab_size != cfg.vocab_size:
      raise ValueError(f"the draft model's vocabulary ({draft.cfg.vocab_size} tokens) differs "
                       f"from the target's ({cfg.vocab_size}): speculative decoding needs the "
                       "same tokenizer")
  elif isinstance(draft, PromptLookup):
    if draft.ngram < 1:
      raise ValueError(f"prompt lookup needs ngram >= 1, got {draft.ngram}")
  else:
    raise TypeError(f"draft must be ModelDraft or PromptLookup, got {type(draft).__name__}")


def max_seq_len(cfg: ModelConfig, draft) -> int:
  if isinstance(draft, ModelDraft):
    return min(cfg.max_seq_len, draft.cfg.max_seq_len)
  return cfg.max_seq_len


def speculative_accept(keys_B, p_logits_BKV, draft_BK, q_logits_BKV=None, num_draft_B=None,
                       greedy_B=None, greedy_only: bool = False):
  """One verification step for each row (Leviathan et al. 2023, Alg. 1).

  p_logits_BKV: f32[B, k+1, V] target logits after sampling filters (-inf = filtered out);
  draft_BK: int32[B, k]; q_logits_BKV: f32[B, k, V] draft logits likewise, or None for one-hot
  drafts (prompt lookup); num_draft_B: int32[B] drafts per row (<= k; default k); greedy_B:
  bool[B] rows that accept while draft == argmax p. Returns (accepted int32[B], the token that
  follows them int32[B]): a resample at the first rejection, else the bonus token.
  greedy_only (static): every row is greedy, so no probability or random draw is needed.
  """
  b, k1, v = p_logits_BKV.shape
  k = k1 - 1
  num_draft_B = jnp.full((b,), k, jnp.int32) if num_draft_B is None else num_draft_B
  if greedy_only:
    target_argmax = jnp.argmax(p_logits_BKV, axis=-1).astype(jnp.int32)  # [B,k+1]
    ok = (draft_BK == target_argmax[:, :k]) & (jnp.arange(k)[None, :] < num_draft_B[:, None])
    n = jnp.sum(jnp.cumprod(ok, axis=1), axis=1).astype(jnp.int32)
    return n, jnp.take_along_axis(target_argmax, n[:, None], axis=1)[:, 0]
  greedy_B = jnp.zeros((b,), bool) if greedy_B is None else greedy_B
  split = jax.vmap(lambda key: jax.random.split(key))(keys_B)
  key_u, key_x = split[:, 0], split[:, 1]
  p = jax.nn.softmax(p_logits_BKV, axis=-1)
  p_x = jnp.take_along_axis(p[:, :k], draft_BK[..., None], axis=-1)[..., 0]  # [B,k]
  if q_logits_BKV is None:
    q_x = jnp.ones_like(p_x)
  else:
    q = jax.nn.softmax(q_logits_BKV, axis=-1)
    q_x = jnp.take_along_axis(q, draft_BK[..., None], axis=-1)[..., 0]
  u = jax.vmap(lambda key: jax.random.uniform(key, (k,)))(key_u)
  # u ~ U[0,1): accept iff u < p/q, written without a division; q(x) = 0 is a rejection.
  ok = (q_x > 0) & (u * q_x < p_x)
  target_argmax = jnp.argmax(p_logits_BKV, axis=-1).astype(jnp.int32)  # [B,k+1]
  ok = jnp.where(greedy_B[:, None], draft_BK == target_argmax[:, :k], ok)
  ok &= jnp.arange(k)[None, :] < num_draft_B[:, None]
  n = jnp.sum(jnp.cumprod(ok, axis=1), axis=1).astype(jnp.int32)  # leading accepts

  p_n = jnp.take_along_axis(p, n[:, None, None], axis=1)[:, 0]  # [B,V]
  at = jnp.minimum(n, k - 1)[:, None]
  x_n = jnp.take_along_axis(draft_BK, at, axis=1)[:, 0]
  if q_logits_BKV is None:
    q_n = jax.nn.one_hot(x_n, v, dtype=p.dtype)
  else:
    q_n = jnp.take_along_axis(q, at[:, :, None], axis=1)[:, 0]
  residual = jnp.maximum(p_n - q_n, 0.0)
  rejected = n < num_draft_B
  # If p <= q everywhere (only when p == q up to rounding) a rejection has probability 0;
  # falling back to p keeps the sample well defined instead of dividing by zero.
  use_residual = rejected & (jnp.sum(residual, axis=-1) > 0)
  dist = jnp.where(use_residual[:, None], residual, p_n)
  x = jax.vmap(lambda key, d: jax.random.categorical(key, jnp.log(d)))(key_x, dist)
  greedy_x = jnp.take_along_axis(target_argmax, n[:, None], axis=1)[:, 0]
  return n, jnp.where(greedy_B, greedy_x, x).astype(jnp.int32)


def lookup_drafts(tokens_BS, context_lens_B, ngram: int, k: int, xp=jnp):
  """Prompt-lookup drafts: for the longest n <= ngram whose last n context tokens occur
  earlier, the k tokens after the latest such occurrence that has k tokens after it (else the
  latest one: in a loop of period < k the latest match has too few). Returns (drafts
  int32[B, k], count int32[B]); count is 0 where nothing matches. xp: jnp (inside the jitted
  decode loop) or np (on the host: the engine, infer/engine.py)."""
  b, s = tokens_BS.shape
  best_start = xp.full((b,), -1, xp.int32)
  for n in range(ngram, 0, -1):
    tail = xp.take_along_axis(tokens_BS, xp.clip(context_lens_B[:, None] - n + xp.arange(n),
                                                 0, s - 1), axis=1)  # [B,n]
    windows = xp.stack([tokens_BS[:, i:s - n + 1 + i] for i in range(n)], axis=-1)
    start = xp.arange(s - n + 1)[None, :]
    # A match must end before the context does (so at least one token follows it).
    match = xp.all(windows == tail[:, None, :], axis=-1)
    match &= (start + n < context_lens_B[:, None]) & (context_lens_B[:, None] >= n + 1)
    full = start + n + k <= context_lens_B[:, None]
    score = xp.where(match, start + xp.where(full, s, 0), -1)  # full ones first, then latest
    best = xp.max(score, axis=1)
    latest = xp.where(best >= s, best - s, best)
    found = (best_start < 0) & (latest >= 0)
    best_start = xp.where(found, latest + n, best_start)  # where the continuation begins
  idx = xp.clip(best_start[:, None] + xp.arange(k)[None, :], 0, s - 1)
  drafts = xp.take_along_axis(tokens_BS, idx, axis=1)
  count = xp.where(best_start >= 0, xp.minimum(k, context_lens_B - best_start), 0)
  return drafts, count.astype(xp.int32)


def _with_drafts_seen(seen_BV, drafts_BK):
  """seen masks for positions 1..k+1: position i also counts drafts 1..i-1 as context."""
  if seen_BV.shape[1] == 1:
    return jnp.broadcast_to(seen_BV[:, None], (seen_BV.shape[0], drafts_BK.shape[1] + 1, 1))
  hot = jax.nn.one_hot(drafts_BK, seen_BV.shape[1], dtype=jnp.int32)
  before = jnp.cumsum(hot, axis=1) - hot  # drafts strictly before position i (i <= k)
  seen_k = seen_BV[:, None] | (before > 0)
  all_k = seen_BV | jnp.any(hot > 0, axis=1)
  return jnp.concatenate([seen_k, all_k[:, None]], axis=1)


def _process(logits_BKV, s: SamplingBatch, features: Features, seen_BKV):
  b, m, v = logits_BKV.shape
  out = sampling_lib.process_logits(logits_BKV.reshape(b * m, v), s.repeat(m), features,
                                    seen_BKV.reshape(b * m, -1))
  return out.reshape(b, m, v)


def _draft_model_propose(draft: ModelDraft, draft_params, s: DecodeState, k: int,
                         features: Features):
  """k tokens from the draft model. Its cache may lag the context by one token (the last
  accepted draft token when a whole proposal was accepted): the first forward feeds up to two."""
  cache = s.draft_cache
  ctx = s.context_lens
  feed_n = jnp.clip(ctx - cache.lengths, 1, 2)  # 2 after a fully accepted proposal
  idx = jnp.clip(cache.lengths[:, None] + jnp.arange(2)[None, :], 0, s.tokens.shape[1] - 1)
  feed = jnp.take_along_axis(s.tokens, idx, axis=1)
  logits, cache = step.forward(draft.cfg, draft_params, feed, cache, n_real_B=feed_n,
                               logits_at=feed_n - 1)

  def draw(i, logits_BV, seen):
    q = sampling_lib.process_logits(logits_BV, s.sampling, features, seen)
    keys = sampling_lib.token_keys(s.keys, s.num_generated, _SALT_DRAFT + i)
    x = sampling_lib.sample_processed(keys, q, s.sampling, features.greedy_only)
    if seen.shape[1] > 1:
      seen = seen.at[jnp.arange(x.shape[0]), x].set(True)
    return x, q, seen

  x, q, seen = draw(0, logits, s.seen)

  def propose(carry, i):
    x, cache, seen = carry
    logits, cache = step.forward(draft.cfg, draft_params, x[:, None], cache)
    x2, q2, seen = draw(i, logits[:, 0], seen)
    return (x2, cache, seen), (x2, q2)

  (_, cache, _), (xs, qs) = jax.lax.scan(propose, (x, cache, seen), jnp.arange(1, k))
  drafts = jnp.concatenate([x[:, None], jnp.moveaxis(xs, 0, 1)], axis=1)  # [B,k]
  q_logits = jnp.concatenate([q[:, None], jnp.moveaxis(qs, 0, 1)], axis=1)  # [B,k,V]
  return drafts, q_logits, cache


@functools.partial(jax.jit, static_argnames=("cfg", "features", "cache_len", "cache_dtype",
                                             "stream", "draft_cfg"))
def _prefill(params, draft_params, prompts_BT, prompt_lens_B, max_new_B, keys_B, sampling,
             eos_ids, sink_id, *, cfg, features, cache_len, cache_dtype, stream, draft_cfg):
  s = step.prefill_state(params, prompts_BT, prompt_lens_B, max_new_B, keys_B, sampling,
                         eos_ids, sink_id, cfg=cfg, features=features, cache_len=cache_len,
                         cache_dtype=cache_dtype, stream=stream)
  if draft_cfg is not None:
    cache = init_cache(draft_cfg, prompts_BT.shape[0], cache_len, cache_dtype)
    _, cache = step.prefill(draft_cfg, draft_params, prompts_BT, prompt_lens_B, cache)
    s = s.replace(draft_cache=cache)
  return s


def prefill(params, draft, prompts_BT, prompt_lens_B, max_new_B, keys_B, sampling, eos_ids,
            sink_id, **static) -> DecodeState:
  model_draft = isinstance(draft, ModelDraft)
  return _prefill(params, draft.params if model_draft else None, prompts_BT, prompt_lens_B,
                  max_new_B, keys_B, sampling, eos_ids, sink_id,
                  draft_cfg=draft.cfg if model_draft else None, **static)


@functools.partial(jax.jit, static_argnames=("cfg", "features", "stream", "num_draft",
                                             "draft_cfg", "ngram"),
                   donate_argnames=("s",))
def _decode_loop(params, draft_params, s: DecodeState, eos_ids, sink_id, *, cfg: ModelConfig,
                 features: Features, stream: int, num_draft: int,
                 draft_cfg: ModelConfig | None, ngram: int):
  k = num_draft
  greedy = s.sampling.temperature == 0

  def body(s: DecodeState):
    b = s.tokens.shape[0]
    if draft_cfg is not None:
      drafts, q_logits, draft_cache = _draft_model_propose(
          ModelDraft(draft_cfg, None), draft_params, s, k, features)
      count = jnp.full((b,), k, jnp.int32)
    else:
      drafts, count = lookup_drafts(s.tokens, s.context_lens, ngram, k)
      q_logits, draft_cache = None, None

    # The target scores the pending token and all k drafts in one forward.
    m = s.cache.lengths
    feed = jnp.concatenate([s.last_tokens()[:, None], drafts], axis=1)
    logits, cache = step.forward(cfg, params, feed, s.cache)
    p_logits = _process(logits, s.sampling, features, _with_drafts_seen(s.seen, drafts))
    keys = sampling_lib.token_keys(s.keys, s.num_generated, _SALT_ACCEPT)
    n, nxt = speculative_accept(keys, p_logits, drafts, q_logits, count, greedy,
                                features.greedy_only)

    new = jnp.concatenate([drafts, jnp.zeros((b, 1), jnp.int32)], axis=1)
    new = new.at[jnp.arange(b), n].set(nxt)
    live = ~s.done
    # Roll back: the target keeps the pending token and the accepted drafts.
    cache = cache.replace(lengths=jnp.where(live, m + 1 + n, m))
    s2 = s.replace(cache=cache)
    if draft_cache is not None:
      # The draft saw the pending token and drafts 1..k-1; it keeps the accepted ones.
      lens = jnp.where(live, m + 1 + jnp.minimum(n, k - 1), s.draft_cache.lengths)
      s2 = s2.replace(draft_cache=draft_cache.replace(lengths=lens))
    s2, _ = commit(s2, new, n + 1, eos_ids)
    live = live.astype(jnp.int32)
    s2 = s2.replace(step=s.step + 1, target_steps=s.target_steps + live,
                    drafted=s.drafted + live * count, accepted=s.accepted + live * n)
    emit(stream, sink_id, s2, stream * (k + 1), (s2.step % max(stream, 1) == 0) | jnp.all(s2.done))
    return s2

  return jax.lax.while_loop(lambda s: ~jnp.all(s.done), body, s)


def decode_loop(params, draft, s: DecodeState, eos_ids, sink_id, *, num_draft: int, **static):
  model_draft = isinstance(draft, ModelDraft)
  return _decode_loop(params, draft.params if model_draft else None, s, eos_ids, sink_id,
                      num_draft=num_draft, draft_cfg=draft.cfg if model_draft else None,
                      ngram=0 if model_draft else draft.ngram, **static)
