"""A jax.profiler trace of a few train steps (profile.start_step, profile.steps) into
workdir/profile, viewable in TensorBoard's profile plugin or XProf:

  tensorboard --logdir runs/x/profile      (pip install tensorboard-plugin-profile)
"""

import jax

from infer.files import as_path


class StepWindow:
  """Traces steps start_step+1 .. start_step+steps (the loop's indices start_step ..)."""

  def __init__(self, workdir: str, start_step: int, steps: int, *, active: bool = True):
    self.directory = str(as_path(workdir) / "profile")
    self.start, self.stop = start_step, start_step + steps
    self.enabled = steps > 0 and active
    self.tracing = False

  def before(self, index: int, state) -> None:
    """Call before running the step at loop index `index` (it makes step index + 1)."""
    if not self.enabled:
      return
    if index == self.start and not self.tracing:
      jax.block_until_ready(state)  # earlier steps stay out of the trace
      jax.profiler.start_trace(self.directory)
      self.tracing = True
    elif index == self.stop:
      self.close(state)

  def close(self, state) -> None:
    if self.tracing:
      jax.block_until_ready(state)  # the traced steps finish inside the trace
      jax.profiler.stop_trace()
      self.tracing = False
      print(f"profile of steps {self.start + 1}..{self.stop} in {self.directory}", flush=True)
