"""When to stop early: SIGTERM (a preemption notice) or SIGINT on any process.

Every process must stop after the same step, or the next collective hangs, and agreeing on
it must not cost a host sync per step:
  one process      the signal handler's flag, read every step (nothing to agree on);
  several, with    JAX's preemption service (jax.distributed starts it unless
  the service      jax_enable_preemption_service is off). It catches SIGTERM on any host
                   itself, spreads the notice through the coordination service in the
                   background, and picks a step every host reaches:
                   `reached_preemption_sync_point(step)` is a local check until then. So
                   SIGTERM is left to it (a Python handler would replace its own).
                   SIGINT (Ctrl-C) is ours, agreed on as below;
  otherwise        the flags of all processes gathered every `check_every` steps (at the
                   same steps on every host), so a signal is acted on within that many.
"""

import signal

import jax
import numpy as np


def any_process(flag: bool) -> bool:
  from jax.experimental import multihost_utils
  return bool(np.any(multihost_utils.process_allgather(np.array(flag))))


def _service_sync_point(start_step: int):
  """reached_preemption_sync_point, or None where JAX's preemption service is not running."""
  if not jax.distributed.is_initialized():
    return None
  from jax.experimental import multihost_utils
  try:
    # Raises if the service is off. Else it records `start_step` as where this process is,
    # so a notice that comes before the first step picks a step the loop will reach.
    multihost_utils.reached_preemption_sync_point(start_step)
  except RuntimeError:
    return None
  return multihost_utils.reached_preemption_sync_point


class StopRequest:
  """`stop(step)`, called by every process after every step: whether all of them save and
  stop now. `close()` puts the previous signal handlers back (a notebook keeps its Ctrl-C)."""

  def __init__(self, check_every: int, start_step: int = 0, *, processes: int | None = None,
               sync_point="auto", any_process=any_process):
    """`sync_point`, `any_process`, `processes`: the service's check, the all-process OR
    and the process count, replaceable for tests."""
    self.processes = jax.process_count() if processes is None else processes
    self.check_every = max(1, int(check_every))
    if sync_point == "auto":
      sync_point = _service_sync_point(start_step) if self.processes > 1 else None
    self.sync_point = sync_point
    self.any_process = any_process
    self.requested = False  # a signal reached this process
    self.preempted = False  # stop() said yes
    signals = [signal.SIGINT] + ([] if self.sync_point else [signal.SIGTERM])
    self._previous = {sig: signal.signal(sig, self._handler) for sig in signals}

  def _handler(self, signum, frame):
    del frame
    if self.requested:  # a second signal: give up waiting
      raise KeyboardInterrupt
    self.requested = True
    print(f"\nsignal {signum}: finishing the current step, then saving", flush=True)

  def stop(self, step: int) -> bool:
    if self.processes == 1:
      stop = self.requested
    else:
      stop = self.sync_point is not None and self.sync_point(step)
      if stop:
        print(f"\npreemption notice: all processes save at step {step}", flush=True)
      if step % self.check_every == 0:
        stop = self.any_process(self.requested) or stop
    self.preempted = self.preempted or stop
    return stop

  def close(self) -> None:
    for sig, old in self._previous.items():
      signal.signal(sig, old)
