"""Orbax checkpoints that fail or are cut short leave nothing behind and say one thing.

A save that fails (a full disk) or is interrupted (a second Ctrl-C) leaves a
`<step>.orbax-checkpoint-tmp...` folder, and orbax's writer threads go on
failing after it: absl logs their tracebacks, asyncio its tasks' exceptions,
tensorstore's late callbacks "Event loop is closed". The trainer raises one
message; these helpers remove the folder and keep the rest off the terminal.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import sys
import threading
import time
from pathlib import Path


def remove_partial(checkpoint_dir: Path) -> None:
  """Remove the temporary folders of saves that never finished (orbax names them <step>.orbax-checkpoint-tmp...);
  orbax would leave them forever."""
  if checkpoint_dir.is_dir():
    for folder in checkpoint_dir.glob("*.orbax-checkpoint-tmp*"):
      shutil.rmtree(folder, ignore_errors=True)


def join_writer_threads(timeout: float) -> None:
  """Wait (up to `timeout` s in all) for orbax's writer threads of a failed save, which go on failing after it."""
  deadline = time.monotonic() + timeout
  for thread in threading.enumerate():
    if thread is not threading.current_thread() and type(thread).__module__.startswith("orbax."):
      with contextlib.suppress(BaseException):  # orbax's join re-raises the thread's error
        thread.join(max(0.0, deadline - time.monotonic()))


def silence_aftermath() -> None:
  """After a failed save, orbax's threads keep failing: absl logs their tracebacks, asyncio logs their tasks'
  exceptions as never retrieved (when collected), and tensorstore's late callbacks find their event loop closed
  ("Event loop is closed", printed as unraisable). The save's own message says it all: drop those, for the rest of
  the process (only those: other logs and errors are untouched)."""
  for name in ("absl", "asyncio"):
    logger = logging.getLogger(name)
    if not any(isinstance(f, _OrbaxRecords) for f in logger.filters):
      logger.addFilter(_OrbaxRecords())
  drop_closed_loop_errors()


def drop_closed_loop_errors() -> None:
  """Drop the unraisable "Event loop is closed" of tensorstore callbacks that outlive a failed save's event loop
  (they can come while the save still fails, so this is in place before every save)."""
  if not getattr(sys.unraisablehook, "drops_closed_loops", False):
    previous = sys.unraisablehook

    def hook(unraisable):
      value = unraisable.exc_value
      if not (isinstance(value, RuntimeError) and str(value) == "Event loop is closed"):
        previous(unraisable)

    hook.drops_closed_loops = True
    sys.unraisablehook = hook


class _OrbaxRecords(logging.Filter):
  """Drops the log records of orbax: logged by its code, or about its tasks and futures (which name its code or its
  <step>.orbax-checkpoint-tmp folders)."""

  def filter(self, record: logging.LogRecord) -> bool:
    return "orbax" not in record.pathname and "orbax" not in record.getMessage()


@contextlib.contextmanager
def quiet_absl():
  """orbax logs every failed save thread's traceback (300 lines for a full disk); the save raises one message."""
  logger = logging.getLogger("absl")
  level = logger.level
  logger.setLevel(logging.CRITICAL)
  try:
    yield
  finally:
    logger.setLevel(level)
