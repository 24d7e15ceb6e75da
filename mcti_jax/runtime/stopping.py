"""Stop a long loop cleanly on SIGINT or SIGTERM.

A cluster's scheduler sends SIGTERM before it takes the machine back, a person
presses Ctrl-C. Either is turned into a request that the training loop honours
at its next step boundary, after saving a checkpoint; a second signal stops at
once. Only the main thread can take signals, so elsewhere this does nothing.

With several processes (distributed.py) the signal may reach one of them, or
all at different moments: `agreed()` tells every process at the same step
boundary whether any of them got one, so all stop (and save) at one step.
"""

from __future__ import annotations

import signal
import threading


class Stopped(KeyboardInterrupt):
  """A run stopped on request after saving its work; the message says where it stopped and how to resume."""

  def __init__(self, message: str, signum: int):
    super().__init__(message)
    self.signum = signum


class StopOnSignal:
  """`with StopOnSignal() as stop:` ... `if stop.requested:` save, then raise stop.stopped(...)."""

  SIGNALS = (signal.SIGINT, signal.SIGTERM)

  def __init__(self, log=print):
    self.log = log
    self.requested: int | None = None  # the signal number, once one came
    self._previous = {}

  def _handle(self, signum, frame):
    if self.requested is not None:  # the second one: don't wait for the step
      raise KeyboardInterrupt
    self.requested = signum
    self.log(f"\n{signal.Signals(signum).name}: stopping after this step, once its checkpoint is saved "
             "(send it again to stop at once)")

  def __enter__(self) -> StopOnSignal:
    if threading.current_thread() is threading.main_thread():
      self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
    return self

  def __exit__(self, *exc) -> None:
    for s, handler in self._previous.items():
      signal.signal(s, handler)
    self._previous = {}

  def agreed(self) -> int | None:
    """The signal any process has received so far (None: none); a collective with several processes."""
    from mcti_jax.runtime import distributed
    agreed = distributed.agreed_signal(self.requested)
    # Not `self.requested = agreed`: a signal handled while this process waited in the gather would be lost.
    if self.requested is None:
      self.requested = agreed
    return agreed

  def stopped(self, message: str) -> Stopped:
    return Stopped(message, self.requested or signal.SIGINT)
