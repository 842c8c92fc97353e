"""Paged attention kernel vs. its reference and vs. dense attention, in interpret mode on CPU."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from attention_oracle import dense_attention, position_mask
from pallas_kernels.attention import cached_attention
from pallas_kernels.paged_attention import (_visible, _window_pages, _window_start, logical_page,
                                            paged_attention)
from pallas_kernels.paged_attention import paged_attention_reference
from model.kv_cache import quantize

PAGE = 16
# TPU interpret mode simulates VMEM and the DMAs the block specs issue; out-of-bounds reads raise.
INTERPRET = {"tpu": pltpu.InterpretParams(random_seed=0), "gpu": True}


pytestmark = pytest.mark.usefixtures("quick_compiles")


def _paged_cache(k, v, lengths, page_size, num_pages, seed=0):
  """Writes contiguous k/v [B, S, Hkv, D] into a pool of shuffled physical pages.

  Returns k_pages, v_pages [Hkv, num_pages, page_size, D], page_indices [B, S // page_size] and
  the set of (page, slot) each row owns (positions < its length). Unused pages hold noise.
  """
  rng = np.random.default_rng(seed)
  b, s, hkv, d = k.shape
  pps = s // page_size
  table = rng.permutation(num_pages)[:b * pps].reshape(b, pps)
  k_pages = rng.standard_normal((hkv, num_pages, page_size, d)).astype(np.float32)
  v_pages = rng.standard_normal((hkv, num_pages, page_size, d)).astype(np.float32)
  owned = [set() for _ in range(b)]
  for row in range(b):
    for pos in range(s):
      page, slot = table[row, pos // page_size], pos % page_size
      k_pages[:, page, slot] = k[row, pos]
      v_pages[:, page, slot] = v[row, pos]
      if pos < lengths[row]:
        owned[row].add((page, slot))
  return k_pages, v_pages, table.astype(np.int32), owned


def _setup(b, tq, hq, hkv, d, pps, lengths, seed=0, page=PAGE):
  rng = np.random.default_rng(seed)
  s = pps * page
  q = rng.standard_normal((b, tq, hq, d)).astype(np.float32)
  k = rng.standard_normal((b, s, hkv, d)).astype(np.float32)
  v = rng.standard_normal((b, s, hkv, d)).astype(np.float32)
  k_pages, v_pages, table, owned = _paged_cache(k, v, lengths, page, b * pps + 3, seed)
  return q, k, v, k_pages, v_pages, table, owned


def test_reference_matches_hand_computed():
  """Two sequences, page_size 2, pages out of order; one query head, head_dim 1."""
  # Pool of 4 pages of 2 slots; row 0 = pages [2, 0] (length 3), row 1 = pages [1, 3] (length 1).
  k_pages = np.array([[[[1.0], [2.0]], [[5.0], [9.0]], [[0.0], [1.0]], [[7.0], [7.0]]]])
  v_pages = 10 * k_pages
  table = np.array([[2, 0], [1, 3]], np.int32)
  lengths = np.array([3, 1], np.int32)
  q = np.array([[[1.0]], [[2.0]]])  # [B, Hq, D]
  # Row 0 sees positions 0..2: keys (0, 1, 1) from page 2 slots 0-1 then page 0 slot 0.
  w0 = np.exp(np.array([0.0, 1.0, 1.0]))
  want0 = (w0 * 10 * np.array([0.0, 1.0, 1.0])).sum() / w0.sum()
  # Row 1 sees position 0 only: page 1 slot 0, value 50.
  got = paged_attention_reference(jnp.asarray(q, jnp.float32), jnp.asarray(k_pages, jnp.float32),
                                  jnp.asarray(v_pages, jnp.float32), jnp.asarray(lengths),
                                  jnp.asarray(table), scale=1.0)
  np.testing.assert_allclose(got[:, 0, 0], [want0, 50.0], rtol=1e-6)


# (B, Tq, Hq, Hkv, D, page_size, pages_per_seq, backend, pages_per_compute_block, num_splits)
CASES = [
    (4, 1, 8, 2, 64, 16, 6, "tpu", None, None),
    (4, 1, 9, 3, 128, 16, 6, "tpu", 4, 2),
    (4, 3, 4, 4, 64, 16, 6, "tpu", 1, None),
    (4, 4, 8, 2, 128, 16, 6, "tpu", 3, 3),
    (4, 2, 8, 2, 64, 8, 5, "tpu", 2, None),
    (4, 1, 8, 2, 64, 16, 6, "gpu", None, None),
    (4, 3, 9, 3, 128, 16, 6, "gpu", None, 2),
    (4, 2, 4, 4, 64, 16, 6, "gpu", None, 1),
    (4, 2, 8, 2, 64, 8, 5, "gpu", None, 2),  # pages shorter than tl.dot's minimum of 16
]


def _case_id(c):
  b, tq, hq, hkv, d, page, pps, backend, ppcb, splits = c
  return (f"{backend}-B{b}-Tq{tq}-H{hq}:{hkv}-D{d}-page{page}x{pps}-ppcb{ppcb}"
          f"-splits{splits}")


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_kernel_matches_reference_and_dense(case):
  b, tq, hq, hkv, d, page, pps, backend, ppcb, splits = case
  # Lengths 1 (with Tq > 1 the earlier queries see nothing and give 0), page_size,
  # page_size + 1 and the maximum.
  lengths = np.array([1, page, page + 1, pps * page], np.int32)[:b]
  q, k, v, k_pages, v_pages, table, _ = _setup(b, tq, hq, hkv, d, pps, lengths, page=page)
  kernel = jax.jit(functools.partial(paged_attention, impl="pallas", interpret=INTERPRET[backend],
                                     backend=backend, pages_per_compute_block=ppcb,
                                     num_splits=splits))
  args = (jnp.asarray(q), jnp.asarray(k_pages), jnp.asarray(v_pages), jnp.asarray(lengths),
          jnp.asarray(table))
  got = kernel(*args)
  np.testing.assert_allclose(got, paged_attention_reference(*args), atol=2e-5)
  # The same keys held contiguously, through the model's dense cached attention.
  dense = cached_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(lengths),
                           impl="xla")
  np.testing.assert_allclose(got, dense, atol=2e-5)


# Prefill chunks: G * Tq query rows over several row blocks (rows_per_block), ragged lengths
# that hold the chunk; (B, Tq, Hq, Hkv, D, pages_per_seq, rows_per_block, lengths, backend).
ROW_BLOCK_CASES = [
    (2, 16, 8, 2, 64, 6, 16, [16, 83], "tpu"),  # 4 blocks of 4 tokens x 4 heads
    (2, 11, 9, 3, 64, 5, 16, [11, 80], "tpu"),  # G = 3: blocks split a token's heads
    (3, 24, 8, 2, 64, 6, 16, [24, 41, 96], "gpu"),
    (3, 11, 9, 3, 64, 5, 16, [11, 16, 80], "gpu"),
    (2, 20, 8, 1, 128, 4, 32, [20, 57], "gpu"),  # GQA 8:1
]


@pytest.mark.parametrize("case", ROW_BLOCK_CASES, ids=lambda c: (
    f"{c[-1]}-B{c[0]}-Tq{c[1]}-H{c[2]}:{c[3]}-D{c[4]}-rows{c[6]}"))
def test_row_blocks_match_reference_and_dense(case):
  b, tq, hq, hkv, d, pps, rows_per_block, lengths, backend = case
  lengths = np.array(lengths, np.int32)
  q, k, v, k_pages, v_pages, table, _ = _setup(b, tq, hq, hkv, d, pps, lengths, seed=11)
  args = (jnp.asarray(q), jnp.asarray(k_pages), jnp.asarray(v_pages), jnp.asarray(lengths),
          jnp.asarray(table))
  got = paged_attention(*args, impl="pallas", interpret=INTERPRET[backend], backend=backend,
                        rows_per_block=rows_per_block)
  np.testing.assert_allclose(got, paged_attention_reference(*args), atol=2e-5)
  dense = cached_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(lengths),
                           impl="xla")
  np.testing.assert_allclose(got, dense, atol=2e-5)


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
def test_pages_a_sequence_does_not_own_are_never_read(backend):
  """Fill every page (and slot) a row does not own with NaN: its output must not change.
  Two row blocks (5 tokens x 4 heads, 16 rows a block)."""
  b, tq, hq, hkv, d, pps = 3, 5, 8, 2, 64, 5
  lengths = np.array([5, PAGE + 3, pps * PAGE], np.int32)
  q, _, _, k_pages, v_pages, table, owned = _setup(b, tq, hq, hkv, d, pps, lengths, seed=5)
  kernel = jax.jit(functools.partial(paged_attention, impl="pallas", backend=backend,
                                     interpret=INTERPRET[backend], pages_per_compute_block=2,
                                     num_splits=2, rows_per_block=16))
  clean = kernel(q, k_pages, v_pages, lengths, table)
  for row in range(b):
    poisoned_k, poisoned_v = np.full_like(k_pages, np.nan), np.full_like(v_pages, np.nan)
    for page, slot in owned[row]:
      poisoned_k[:, page, slot] = k_pages[:, page, slot]
      poisoned_v[:, page, slot] = v_pages[:, page, slot]
    got = kernel(q, poisoned_k, poisoned_v, lengths, table)[row]
    assert np.all(np.isfinite(got)), f"row {row} read a page it does not own"
    np.testing.assert_allclose(got, clean[row], atol=1e-6)


# Mistral / Gemma 2: a sliding window shorter than the cache, and soft-capping, with GQA, against
# the dense oracle over the same keys held contiguously. Every slot a row's queries cannot see
# (past its length, or before its first query's window) is NaN in the pool: recycled pages.
# (B, Tq, Hq, Hkv, D, page_size, pages_per_seq, lengths, window, softcap, backend, kernel kwargs)
WINDOW_CASES = [
    (3, 1, 8, 2, 64, 16, 6, [5, 40, 96], 24, None, "tpu", dict(pages_per_compute_block=2)),
    (3, 4, 8, 2, 64, 16, 6, [4, 40, 96], 20, 3.0, "tpu", dict(pages_per_compute_block=1)),
    (2, 11, 9, 3, 64, 16, 5, [11, 80], 7, 2.0, "tpu", dict(rows_per_block=16, num_splits=2)),
    (3, 1, 8, 2, 64, 16, 6, [5, 40, 96], None, 3.0, "gpu", {}),
    (3, 4, 8, 2, 64, 8, 6, [4, 25, 48], 20, 3.0, "gpu", dict(num_splits=2)),
    (2, 11, 9, 3, 64, 16, 5, [11, 80], 7, 2.0, "gpu", dict(rows_per_block=16)),
]


@pytest.mark.parametrize("case", WINDOW_CASES, ids=lambda c: (
    f"{c[10]}-Tq{c[1]}-H{c[2]}:{c[3]}-page{c[5]}x{c[6]}-w{c[8]}-cap{c[9]}"))
def test_window_and_softcap_match_dense_oracle(case):
  b, tq, hq, hkv, d, page, pps, lengths, window, softcap, backend, extra = case
  lengths = np.array(lengths, np.int32)
  q, k, v, k_pages, v_pages, table, _ = _setup(b, tq, hq, hkv, d, pps, lengths, seed=3, page=page)
  q = 4 * q  # scores of std ~4: the cap bends them
  q_pos = lengths[:, None] - tq + np.arange(tq)  # [B, Tq]
  mask = position_mask(q_pos, np.arange(pps * page), window=window)  # [B, Tq, S]
  want = dense_attention(q, k, v, mask, scale=d ** -0.5, softcap=softcap)
  seen = mask.any(axis=1)  # [B, S]: slots some query of the row sees
  for row in range(b):
    for pos in np.flatnonzero(~seen[row]):
      k_pages[:, table[row, pos // page], pos % page] = np.nan
      v_pages[:, table[row, pos // page], pos % page] = np.nan
  k_pages[:, np.setdiff1d(np.arange(k_pages.shape[1]), table)] = np.nan
  args = (jnp.asarray(q), jnp.asarray(k_pages), jnp.asarray(v_pages), jnp.asarray(lengths),
          jnp.asarray(table))
  kwargs = dict(sliding_window=window, softcap=softcap)
  got = paged_attention(*args, impl="pallas", interpret=INTERPRET[backend], backend=backend,
                        **kwargs, **extra)
  np.testing.assert_allclose(got, want, atol=2e-5, err_msg="kernel")
  np.testing.assert_allclose(paged_attention_reference(*args, **kwargs), want, atol=2e-5,
                             err_msg="reference")
  dense = cached_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(lengths),
                           impl="xla", **kwargs)
  np.testing.assert_allclose(dense, want, atol=2e-5, err_msg="cached_attention")


def test_window_sweep_names_exactly_the_pages_in_the_window():
  """With a window, a row block's sweep (TPU index maps; GPU loop bounds) starts at the page of
  its first visible position and spans at most `_window_pages` pages: every page holding a
  position some row of the block sees is named, and no page wholly before the window."""
  for tq, g, rows_per_block, window, page_size, ppcb, pps in [
      (1, 4, 8, 5, 4, 1, 12), (3, 2, 16, 9, 4, 2, 12), (11, 3, 16, 6, 8, 3, 8),
      (16, 4, 16, 1, 4, 2, 12)]:
    n_blocks = -(-tq * g // rows_per_block)
    span = _window_pages(rows_per_block=rows_per_block, tq=tq, g=g, window=window,
                         page_size=page_size, pps=pps)
    steps = -(-span // ppcb)
    for length in range(tq, pps * page_size + 1):
      for block in range(n_blocks):
        rows = np.arange(block * rows_per_block, min((block + 1) * rows_per_block, tq * g))
        q_pos = length - tq + rows // g
        seen = {pos // page_size for i in q_pos for pos in range(max(0, i - window + 1), i + 1)}
        kw = dict(rows_per_block=rows_per_block, tq=tq, g=g)
        start = _window_start(length, block, window=window, **kw)
        visible = _visible(length, block, **kw)
        named = {logical_page(visible, step, j, page_size=page_size, ppcb=ppcb, pps=pps,
                              start=start) for step in range(steps) for j in range(ppcb)}
        case = (tq, g, rows_per_block, window, page_size, length, block)
        assert seen <= named, case
        assert min(named) == start // page_size == min(seen), case
        assert max(named) == max(seen), case


def test_tpu_index_map_names_only_valid_pages_and_repeats_past_the_end():
  """On TPU a block spec DMAs whatever page its index map names, even on a step whose compute
  is skipped; so the map must name only pages holding tokens, and repeat itself once past the
  length (a repeated block index issues no new copy)."""
  for page_size, ppcb, pps in [(16, 1, 5), (16, 3, 7), (8, 4, 8)]:
    steps = -(-pps // ppcb)
    for length in range(0, pps * page_size + 1):
      n_valid = max(1, -(-length // page_size))
      last_useful = (n_valid - 1) // ppcb
      for j in range(ppcb):
        pages = [logical_page(length, step, j, page_size=page_size, ppcb=ppcb, pps=pps)
                 for step in range(steps + 2)]
        assert all(0 <= p < n_valid for p in pages), (length, j, pages)
        assert len(set(pages[last_useful:])) == 1, (length, j, pages)
        for step in range(last_useful + 1):  # steps with tokens read their own pages
          want = step * ppcb + j
          assert pages[step] == min(want, n_valid - 1)


def test_one_token_bf16_and_xla_impl():
  """q in the [B, Hq, D] form of one new token, bf16."""
  b, tq, hq, hkv, d, pps = 2, 1, 8, 2, 128, 4
  lengths = np.array([5, pps * PAGE], np.int32)
  q, _, _, k_pages, v_pages, table, _ = _setup(b, tq, hq, hkv, d, pps, lengths, seed=7)
  args = [jnp.asarray(x, jnp.bfloat16) for x in (q[:, 0], k_pages, v_pages)]
  args += [jnp.asarray(lengths), jnp.asarray(table)]
  want = paged_attention_reference(*args)
  got = paged_attention(*args, impl="pallas", interpret=INTERPRET["tpu"])
  assert got.shape == (b, hq, d) and got.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.float32(got), np.float32(want), atol=3e-2)
  np.testing.assert_allclose(np.float32(paged_attention(*args, impl="xla")), np.float32(want))
  with pytest.raises(ValueError, match="impl"):
    paged_attention(*args, impl="mosaic")
  with pytest.raises(ValueError, match="sliding_window"):
    paged_attention(*args, sliding_window=0)


# An int8 cache: pages of codes with f32 scales per (page slot, KV head). Every slot no query
# sees is NaN in codes' stead (int8 has none: its scale is NaN). (B, Tq, Hq, Hkv, D, page_size,
# pages_per_seq, lengths, window, backend, kernel kwargs)
INT8_CASES = [
    (3, 1, 8, 2, 64, 16, 6, [5, 40, 96], None, "tpu", dict(pages_per_compute_block=2)),
    (2, 11, 9, 3, 64, 16, 5, [11, 80], 7, "tpu", dict(rows_per_block=16, num_splits=2)),
    (3, 1, 8, 2, 64, 16, 6, [5, 40, 96], None, "gpu", dict(num_splits=2)),
    (3, 4, 8, 2, 64, 8, 6, [4, 25, 48], 20, "gpu", {}),
]


@pytest.mark.parametrize("case", INT8_CASES, ids=lambda c: (
    f"{c[9]}-Tq{c[1]}-H{c[2]}:{c[3]}-page{c[5]}x{c[6]}-w{c[8]}"))
def test_int8_pages_match_dense_oracle_over_dequantized_keys(case):
  b, tq, hq, hkv, d, page, pps, lengths, window, backend, extra = case
  lengths = np.array(lengths, np.int32)
  q, _, _, k_pages, v_pages, table, _ = _setup(b, tq, hq, hkv, d, pps, lengths, seed=9, page=page)
  (kc, ks), (vc, vs) = quantize(jnp.asarray(k_pages)), quantize(jnp.asarray(v_pages))
  ks, vs = np.array(ks), np.array(vs)
  # The oracle's keys: numpy's dequantization, held contiguously per row.
  k_deq = np.asarray(kc, np.float32) * ks[..., None]
  v_deq = np.asarray(vc, np.float32) * vs[..., None]
  pos = np.arange(pps * page)
  page_of, slot_of = table[:, pos // page], pos % page  # [B, S], [S]
  k = k_deq[:, page_of, slot_of].transpose(1, 2, 0, 3)  # [B, S, Hkv, D]
  v = v_deq[:, page_of, slot_of].transpose(1, 2, 0, 3)
  q_pos = lengths[:, None] - tq + np.arange(tq)
  mask = position_mask(q_pos, np.arange(pps * page), window=window)
  want = dense_attention(q, k, v, mask, scale=d ** -0.5)
  seen = mask.any(axis=1)
  for row in range(b):
    for pos in np.flatnonzero(~seen[row]):
      ks[:, table[row, pos // page], pos % page] = np.nan
      vs[:, table[row, pos // page], pos % page] = np.nan
  ks[:, np.setdiff1d(np.arange(ks.shape[1]), table)] = np.nan
  args = (jnp.asarray(q), kc, vc, jnp.asarray(lengths), jnp.asarray(table))
  scales = dict(k_scales=jnp.asarray(ks), v_scales=jnp.asarray(vs))
  got = paged_attention(*args, impl="pallas", interpret=INTERPRET[backend], backend=backend,
                        sliding_window=window, **scales, **extra)
  np.testing.assert_allclose(got, want, atol=2e-5, err_msg="kernel")
  np.testing.assert_allclose(paged_attention_reference(*args, **scales, sliding_window=window),
                             want, atol=2e-5, err_msg="reference")
  with pytest.raises(ValueError, match="int8 k_pages/v_pages need k_scales"):
    paged_attention(*args)
