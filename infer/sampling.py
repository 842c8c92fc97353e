"""Turning logits into tokens, with settings per row.

Order as in HF generate (transformers' LogitsProcessorList): repetition penalty, temperature, top-k, top-p,
min-p. Temperature 0 means greedy (after the penalty). Every filter keeps the most likely
token, so at least one token always survives, and ties at a cut-off are all kept (top-k keeps
every logit >= the k-th largest; top-p keeps every token at least as likely as the last one
its nucleus needs), which makes the result independent of how a sort orders ties.

`SamplingParams` is one row's settings (hashable; the static default for a whole batch).
`SamplingBatch` holds them as arrays [B] so rows of one batch differ, plus the static
`Features` that let a batch skip the work nobody asked for (the sort behind top-k/top-p,
the [B, V] "seen" mask behind the repetition penalty).

Structured output (infer/structured.py) adds a packed token bitmask per row, applied before
everything else (`apply_bitmask`).
"""

import dataclasses
from typing import Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  temperature: float = 1.0  # 0: greedy
  top_k: int = 0  # 0: keep all
  top_p: float = 1.0  # 1: keep all
  min_p: float = 0.0  # 0: keep all
  repetition_penalty: float = 1.0  # 1: off (CTRL, Keskar et al. 2019)

  def __post_init__(self):
    if self.temperature < 0:
      raise ValueError(f"temperature must be >= 0, got {self.temperature}")
    if self.top_k < 0:
      raise ValueError(f"top_k must be >= 0, got {self.top_k}")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
    if not 0 <= self.min_p <= 1:
      raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
    if self.repetition_penalty <= 0:
      raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0


@dataclasses.dataclass(frozen=True)
class Features:
  """Which filters any row of a batch uses: static, so unused ones cost nothing."""
  top_k: bool = False
  top_p: bool = False
  min_p: bool = False
  penalty: bool = False
  # Every row is greedy: skip the random draw (Gumbel noise over the whole vocabulary and the
  # probabilities speculative acceptance needs), work no greedy row uses.
  greedy_only: bool = False

  @classmethod
  def of(cls, params: Sequence[SamplingParams]) -> "Features":
    return cls(top_k=any(p.top_k > 0 for p in params), top_p=any(p.top_p < 1 for p in params),
               min_p=any(p.min_p > 0 for p in params),
               penalty=any(p.repetition_penalty != 1 for p in params),
               greedy_only=all(p.temperature == 0 for p in params))

  def __or__(self, other: "Features") -> "Features":
    union = Features(*(a or b for a, b in zip(dataclasses.astuple(self),
                                               dataclasses.astuple(other))))
    return dataclasses.replace(union, greedy_only=self.greedy_only and other.greedy_only)


@flax.struct.dataclass
class SamplingBatch:
  temperature: jax.Array  # f32[B]
  top_k: jax.Array  # i32[B]
  top_p: jax.Array  # f32[B]
  min_p: jax.Array  # f32[B]
  repetition_penalty: jax.Array  # f32[B]

  @classmethod
  def of(cls, params: Sequence[SamplingParams]) -> "SamplingBatch":
    """Host-side (numpy) arrays, one entry per row."""
    col = lambda name, dt: np.array([getattr(p, name) for p in params], dt)
    return cls(temperature=col("temperature", np.float32), top_k=col("top_k", np.int32),
               top_p=col("top_p", np.float32), min_p=col("min_p", np.float32),
               repetition_penalty=col("repetition_penalty", np.float32))

  def repeat(self, n: int) -> "SamplingBatch":
    """Each row's settings n times in a row: [B] -> [B*n], for [B, n, V] logits flattened."""
    return jax.tree.map(lambda x: jnp.repeat(x, n, axis=0), self)


def apply_penalty(logits_BV, penalty_B, seen_BV):
  """CTRL repetition penalty over every token already in the context (prompt and output):
  a positive logit is divided by the penalty, a negative one multiplied (as HF does)."""
  pen = penalty_B[:, None]
  penalised = jnp.where(logits_BV > 0, logits_BV / pen, logits_BV * pen)
  return jnp.where(seen_BV, penalised, logits_BV)


def process_logits(logits_BV, s: SamplingBatch, features: Features, seen_BV=None):
  """Penalty, temperature, top-k, top-p, min-p. Returns f32[B, V] logits with the filtered
  tokens at -inf; softmax of the result is the distribution a sampled row draws from.
  Greedy rows (temperature 0) come back with temperature 1 and the filters applied; their
  argmax is the greedy token either way, since every filter keeps the maximum."""
  logits_BV = logits_BV.astype(jnp.float32)
  if features.penalty:
    logits_BV = apply_penalty(logits_BV, s.repetition_penalty, seen_BV)
  temp = jnp.where(s.temperature > 0, s.temperature, 1.0)
  logits_BV = logits_BV / temp[:, None]
  neg_inf = jnp.float32(-jnp.inf)
  v = logits_BV.shape[-1]
  if features.top_k or features.top_p:
    sorted_BV = -jnp.sort(-logits_BV, axis=-1)  # descending
    if features.top_k:
      k = jnp.clip(s.top_k, 1, v)
      kth = jnp.take_along_axis(sorted_BV, (k - 1)[:, None], axis=-1)
      kth = jnp.where(s.top_k[:, None] > 0, kth, neg_inf)
      logits_BV = jnp.where(logits_BV < kth, neg_inf, logits_BV)
      sorted_BV = jnp.where(sorted_BV < kth, neg_inf, sorted_BV)
    if features.top_p:
      # Nucleus (Holtzman et al. 2020): the most likely tokens until their mass reaches p.
      # The j-th sorted token is needed iff the mass strictly before it is < p.
      probs = jax.nn.softmax(sorted_BV, axis=-1)
      before = jnp.cumsum(probs, axis=-1) - probs
      last = jnp.maximum(jnp.sum(before < s.top_p[:, None], axis=-1) - 1, 0)
      cut = jnp.take_along_axis(sorted_BV, last[:, None], axis=-1)
      cut = jnp.where(s.top_p[:, None] < 1, cut, neg_inf)
      logits_BV = jnp.where(logits_BV < cut, neg_inf, logits_BV)
  if features.min_p:
    # min-p (Nguyen et al. 2024): drop tokens less likely than min_p times the top token.
    probs = jax.nn.softmax(logits_BV, axis=-1)
    floor = s.min_p[:, None] * jnp.max(probs, axis=-1, keepdims=True)
    logits_BV = jnp.where(probs < floor, neg_inf, logits_BV)
  return logits_BV


def row_keys(seeds_B) -> jax.Array:
  """One PRNG key per row from its own seed, so a row's draws never depend on its batch."""
  return jax.vmap(jax.random.PRNGKey)(jnp.asarray(seeds_B, jnp.uint32))


def token_keys(keys_B, counter_B, salt: int = 0):
  """The key for one draw of each row: its seed folded with its own token counter (and a
  salt naming the purpose), so a row's randomness depends on nothing else in the batch."""
  fold = lambda k, c: jax.random.fold_in(jax.random.fold_in(k, c), salt)
  return jax.vmap(fold)(keys_B, counter_B)


def sample_processed(keys_B, logits_BV, s: SamplingBatch, greedy_only: bool = False):
  """Samples rows of already-processed logits; rows with temperature 0 take the argmax."""
  if greedy_only:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  sampled = jax.vmap(lambda k, l: jax.random.categorical(k, l))(keys_B, logits_BV)
  greedy = jnp.argmax(logits_BV, axis=-1)
  return jnp.where(s.temperature > 0, sampled, greedy).astype(jnp.int32)


def apply_bitmask(logits_BV, allowed_BW):
  """Logits with every token the packed bitmask int32[B, W] disallows at -inf: bit j of word w
  (least significant first) allows token 32w + j, W = ceil(V / 32), the layout structured
  output's matchers fill (infer/structured.py). Bits past V are ignored."""
  b, v = logits_BV.shape
  if allowed_BW.shape != (b, -(-v // 32)):
    raise ValueError(f"the token bitmask for {b} rows of {v} logits must be int32"
                     f"[{b}, {-(-v // 32)}], got {allowed_BW.dtype}{list(allowed_BW.shape)}")
  shifts = jnp.arange(32, dtype=jnp.int32)[None, None, :]
  bits_BW32 = jnp.right_shift(allowed_BW.astype(jnp.int32)[:, :, None], shifts) & 1
  allowed_BV = bits_BW32.reshape(b, -1)[:, :v].astype(bool)
  return jnp.where(allowed_BV, logits_BV, jnp.asarray(-jnp.inf, logits_BV.dtype))


def sample_rows(keys_B, logits_BV, s: SamplingBatch, features: Features, seen_BV=None,
                allowed_BW=None):
  """int32[B] tokens from f32[B, V] logits, each row with its own settings and key.
  allowed_BW: an optional packed token bitmask (`apply_bitmask`), applied before every other
  filter, so top-k/top-p/min-p choose among the tokens the row's grammar allows."""
  if allowed_BW is not None:
    logits_BV = apply_bitmask(logits_BV, allowed_BW)
  if features.greedy_only and not features.penalty:  # every filter keeps the argmax
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  return sample_processed(keys_B, process_logits(logits_BV, s, features, seen_BV), s,
                          features.greedy_only)


def sample(rng, logits_BV, params: SamplingParams = SamplingParams()):
  """int32[B] tokens from f32[B, V] logits, one setting (and one key) for the whole batch."""
  b = logits_BV.shape[0]
  batch = jax.tree.map(jnp.asarray, SamplingBatch.of([params] * b))
  keys = jax.random.split(rng, b)
  return sample_rows(keys, logits_BV, batch, Features.of([params]))
