"""One closeness check for the kernel tests: error relative to the reference's scale."""

import numpy as np


def assert_close(got, want, tol, what):
  """max |got - want| / max(1, max |want|) <= tol, in float64; shapes equal, got finite."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
  assert np.all(np.isfinite(got)), f"{what}: non-finite values"
  err = np.max(np.abs(got - want), initial=0) / max(1.0, np.max(np.abs(want), initial=0))
  assert err <= tol, f"{what}: relative error {err:.3g} > {tol}"
