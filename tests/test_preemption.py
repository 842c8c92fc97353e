"""When the loop stops on a signal, and how often that costs a host sync (train/preemption.py).

The all-process OR and the preemption service's sync point are replaced by counters, so the
schedule is checked by counting calls; tests/test_distributed.py runs the real service."""

import os
import signal

import pytest

from train.preemption import StopRequest


class Gather:
  """Stands in for the all-process OR: counts the host syncs it would cost."""

  def __init__(self, others: bool = False):
    self.calls, self.others = 0, others

  def __call__(self, flag: bool) -> bool:
    self.calls += 1
    return flag or self.others


def test_one_process_reads_its_flag_every_step_without_syncing():
  gather = Gather()
  stop = StopRequest(10, processes=1, any_process=gather)
  try:
    assert not any(stop.stop(s) for s in range(1, 4))
    os.kill(os.getpid(), signal.SIGTERM)
    assert stop.requested and stop.stop(4)
  finally:
    stop.close()
  assert gather.calls == 0


def test_without_the_service_processes_agree_every_n_steps():
  gather = Gather()
  stop = StopRequest(5, processes=2, sync_point=None, any_process=gather)
  try:
    os.kill(os.getpid(), signal.SIGTERM)  # arrives during step 7: acted on at step 10
    decisions = {s: stop.stop(s) for s in range(7, 11)}
  finally:
    stop.close()
  assert decisions == {7: False, 8: False, 9: False, 10: True}
  assert gather.calls == 1  # one host sync in four steps, not four


def test_a_signal_on_another_process_stops_this_one_at_the_same_step():
  gather = Gather(others=True)
  stop = StopRequest(4, processes=2, sync_point=None, any_process=gather)
  try:
    assert [stop.stop(s) for s in range(1, 5)] == [False, False, False, True]
  finally:
    stop.close()
  assert not stop.requested and stop.preempted


def test_the_service_owns_sigterm_and_picks_the_step():
  before = signal.getsignal(signal.SIGTERM)
  sync_calls, gather = [], Gather()

  def sync_point(step):  # the service's agreed step is 7
    sync_calls.append(step)
    return step == 7

  stop = StopRequest(3, processes=2, sync_point=sync_point, any_process=gather)
  try:
    # A Python SIGTERM handler would replace the service's own (installed by
    # jax.distributed.initialize), which would then never hear of the preemption.
    assert signal.getsignal(signal.SIGTERM) is before
    assert signal.getsignal(signal.SIGINT) == stop._handler
    decisions = [stop.stop(s) for s in range(1, 8)]
  finally:
    stop.close()
  assert decisions == [False] * 6 + [True]
  assert sync_calls == list(range(1, 8))  # a local check every step
  assert gather.calls == 2  # SIGINT is agreed on at steps 3 and 6 only


def test_close_restores_the_handlers():
  before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
  StopRequest(1, processes=1).close()
  assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_a_second_signal_gives_up_waiting():
  stop = StopRequest(1, processes=1)
  try:
    os.kill(os.getpid(), signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)
  finally:
    stop.close()
