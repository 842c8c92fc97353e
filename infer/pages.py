"""Host-side page bookkeeping for the paged KV cache (Kwon et al. 2023, PagedAttention).

The device holds only arrays (the page pool, a page table per step); which page belongs to
whom lives here, in plain Python:
  - reference counts per physical page; a page is free at count 0;
  - a free list in least-recently-freed order;
  - prefix caching: a full page is keyed by a hash chain over its tokens and every token before
    it (vLLM's automatic prefix caching), so requests with the same prefix share the page; a
    freed page keeps its key until it is reused, so a later request (or a preempted one coming
    back) can still pick it up;
  - copy-on-write: writing into a page others share first copies it (the caller copies the
    device data; `copy_on_write` says from where to where).

Page 0 is the null page (unused table entries point at it) and is never handed out.
"""

import collections
import hashlib
from typing import Sequence

import numpy as np

NULL_PAGE = 0


class OutOfPages(RuntimeError):
  pass


def chain_hash(parent: bytes, tokens: Sequence[int]) -> bytes:
  """Key of a full page: its tokens and (through the parent's key) every token before it."""
  data = parent + np.asarray(tokens, np.int64).tobytes()
  return hashlib.blake2b(data, digest_size=16).digest()


class PageAllocator:
  def __init__(self, num_pages: int, page_size: int):
    if num_pages < 2:
      raise ValueError(f"num_pages={num_pages}: need the null page plus at least one more")
    self.num_pages, self.page_size = num_pages, page_size
    self.refcount = np.zeros(num_pages, np.int32)
    # Free pages in the order they were freed: reuse the oldest first, so recently freed
    # (and maybe soon wanted again) cached prefixes live longest.
    self._free = collections.OrderedDict((p, None) for p in range(1, num_pages))
    self._page_of: dict[bytes, int] = {}  # prefix key -> page holding it
    self._key_of: dict[int, bytes] = {}  # page -> its prefix key
    self.peak_used = 0

  @property
  def capacity(self) -> int:
    return self.num_pages - 1

  @property
  def num_free(self) -> int:
    return len(self._free)

  @property
  def num_used(self) -> int:
    return int(np.sum(self.refcount[1:] > 0))

  def allocate(self) -> int:
    if not self._free:
      raise OutOfPages("no free page")
    page, _ = self._free.popitem(last=False)
    key = self._key_of.pop(page, None)  # the page's old content is about to be overwritten
    if key is not None:
      del self._page_of[key]
    self.refcount[page] = 1
    self._note_use()
    return page

  def retain(self, page: int):
    """One more owner (a request sharing a cached prefix page)."""
    if page == NULL_PAGE:
      raise ValueError("the null page cannot be owned")
    if self.refcount[page] == 0:
      del self._free[page]  # a cached page coming back to life
    self.refcount[page] += 1
    self._note_use()

  def release(self, page: int):
    if page == NULL_PAGE or self.refcount[page] <= 0:
      raise ValueError(f"page {page} released but not held (double free?)")
    self.refcount[page] -= 1
    if self.refcount[page] == 0:
      self._free[page] = None

  def lookup(self, key: bytes) -> int | None:
    return self._page_of.get(key)

  def register(self, page: int, key: bytes):
    """Offers a full page under its prefix key (the first page with a key keeps it)."""
    if key not in self._page_of and page not in self._key_of:
      self._page_of[key] = page
      self._key_of[page] = key

  def copy_on_write(self, page: int) -> tuple[int, int]:
    """Before writing into `page`: if others share it, returns (a fresh private copy, the
    source to copy from); else (page, page). Raises OutOfPages when no page is free."""
    if self.refcount[page] <= 1:
      return page, page
    fresh = self.allocate()
    self.release(page)
    return fresh, page

  def check(self):
    """Invariants: every page is free xor used; counts are never negative."""
    used = set(np.nonzero(self.refcount[1:] > 0)[0] + 1)
    free = set(self._free)
    assert not used & free, f"pages both free and used: {sorted(used & free)}"
    assert len(used) + len(free) == self.capacity, (len(used), len(free), self.capacity)
    assert np.all(self.refcount >= 0) and self.refcount[NULL_PAGE] == 0

  def _note_use(self):
    self.peak_used = max(self.peak_used, self.capacity - len(self._free))
