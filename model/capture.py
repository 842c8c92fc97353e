"""Calibration's probe: a weight that stops the block where it is first applied, raising its
input. Post-training quantization (model/calibrate.py) reads the input of each block matmul
this way without a second copy of the block; the block (model/layers.py) and the experts'
router (model/moe.py) both recognise it."""

import flax.struct


class Captured(Exception):
  """Raised by a `Capture` weight: `x` is the activation the block applied it to."""

  def __init__(self, x):
    super().__init__("a Capture weight was applied (catch Captured around the block)")
    self.x = x


@flax.struct.dataclass
class Capture:
  """A weight that raises Captured(its input) where it is applied. Inside jit the caught input
  is a tracer of the same trace, so a jitted function that catches it may return it."""
  base: object

  def project(self, equation, x, dtype):
    raise Captured(x)
