"""Several processes, one mesh: JAX's multi-controller runtime (TPU pods, GPU clusters, localhost).

`mcti <command> --distributed` calls `initialize()` before anything touches a
device. Every process then runs the same program on one mesh over all
processes' devices: each loads only its own classes' shots, collectives cross
the hosts, and process 0 alone writes files (`is_main`); orbax checkpoints are
written by all of them into the shared workdir.

On TPU pod VMs and under SLURM (or Open MPI), JAX finds the coordinator, the
process count and this process's id itself. Elsewhere set
JAX_COORDINATOR_ADDRESS=host:port, JAX_NUM_PROCESSES and JAX_PROCESS_ID.

Joining waits at most MCTI_DISTRIBUTED_TIMEOUT seconds (default 30): a
coordinator nobody answers, or a process that never starts, then ends every
waiting process with one line naming the address and the variables. (JAX's own
timeout aborts the process with a C++ stack that blames "another task", after 5
minutes of silence.)
"""

from __future__ import annotations

import math
import os
import sys
import threading

import jax
import numpy as np

from mcti_jax.errors import ConfigError

ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
TIMEOUT_ENV = "MCTI_DISTRIBUTED_TIMEOUT"
DEFAULT_TIMEOUT_S = 30.0


def join_timeout() -> float:
  """Seconds to wait for every process to join: $MCTI_DISTRIBUTED_TIMEOUT, else DEFAULT_TIMEOUT_S."""
  value = os.environ.get(TIMEOUT_ENV, "").strip()
  if not value:
    return DEFAULT_TIMEOUT_S
  try:
    seconds = float(value)
  except ValueError:
    seconds = math.nan
  if not (math.isfinite(seconds) and seconds > 0):
    raise ConfigError(f"{TIMEOUT_ENV}={value!r} must be a number of seconds > 0 (the wait for the other processes "
                      f"to join; default {DEFAULT_TIMEOUT_S:.0f})")
  return seconds


def check_address(address: str) -> None:
  """host:port with a port number, before JAX parses it (a bad port aborts it in C++ after its timeout)."""
  host, colon, port = address.rpartition(":")
  if not (colon and host and port.isdigit() and 0 < int(port) < 65536):
    raise ConfigError(f"JAX_COORDINATOR_ADDRESS={address!r} must be host:port with a port number 1-65535 (process "
                      "0's address, e.g. 10.0.0.2:12355); see launch/README.md")


def initialize(prog: str = "mcti") -> None:
  """Join the run's other processes; ends the process with one line if they have not all joined in join_timeout()."""
  settings = {}
  for name, field in (("JAX_NUM_PROCESSES", "num_processes"), ("JAX_PROCESS_ID", "process_id")):
    if (value := os.environ.get(name)) is not None:
      try:
        settings[field] = int(value)
      except ValueError:
        raise ConfigError(f"{name}={value!r} must be an integer") from None
  if address := os.environ.get("JAX_COORDINATOR_ADDRESS"):  # else JAX reads it from the TPU pod / SLURM
    check_address(address)
  seconds = join_timeout()
  # JAX's preemption service would take SIGTERM for itself (a C++ handler), and the trainer's own (stopping.py)
  # would never hear it; the trainer agrees on the stopping step itself.
  jax.config.update("jax_enable_preemption_service", False)
  given = ", ".join(f"{name}={os.environ[name]}" for name in ENV if name in os.environ) or \
      "none of " + ", ".join(ENV) + " (JAX looked for a TPU pod or SLURM)"
  late = (f"{prog}: error: --distributed: the run's processes did not all join within {seconds:g} s ({given}). Is "
          "process 0 running, listening at that address and reachable from here, and do all processes give the same "
          f"address and count? Set {TIMEOUT_ENV}=<seconds> to wait longer.")
  try:
    with _deadline(seconds, late):  # JAX's own timeout, later, would abort the process in C++
      jax.distributed.initialize(**settings, initialization_timeout=int(seconds) + 60)
  except ValueError as e:  # nothing detected and nothing set
    raise ConfigError(f"--distributed could not find the other processes ({e}). On TPU pod VMs and under SLURM JAX "
                      f"finds them itself; elsewhere set {', '.join(ENV)} for every process (see launch/README.md)."
                      ) from None


class _deadline:
  """Ends the process with `message` (stderr, exit 1) unless the block is left within `seconds`: a stuck join waits
  in C++, where no Python exception reaches it."""

  def __init__(self, seconds: float, message: str):
    self.seconds, self.message, self.done = seconds, message, threading.Event()

  def __enter__(self):
    threading.Thread(target=self._watch, daemon=True, name="mcti-distributed-deadline").start()

  def __exit__(self, *exc):
    self.done.set()

  def _watch(self) -> None:
    if not self.done.wait(self.seconds):
      sys.stderr.write(self.message + "\n")
      sys.stderr.flush()
      os._exit(1)


def is_main() -> bool:
  """Files (run.json, metrics, exports, reports, plots) are written by process 0 only."""
  return jax.process_index() == 0


def main_only(log):
  """`log` on process 0, a no-op elsewhere: a pod's N workers would print every line N times."""
  return log if is_main() else (lambda *args, **kwargs: None)


def agreed_min(value: int) -> int:
  """The smallest of every process's `value` (an int32: JAX gathers without 64-bit types), on every process (a
  collective; with one process, `value`). So that choices made from local facts (class_chunk="auto" from a
  device's memory) compile one program everywhere."""
  if jax.process_count() == 1:
    return value
  from jax.experimental import multihost_utils
  return int(multihost_utils.process_allgather(np.int32(value)).min())


def agreed_signal(signum: int | None) -> int | None:
  """The stop signal some process received (the largest number if several), on every process; `signum` is this
  process's (None: none). With one process, `signum` itself. A collective: all processes call it at the same
  step boundary, so that all of them stop there together (one that stopped alone would leave the others waiting
  in the step's collectives)."""
  if jax.process_count() == 1:
    return signum
  from jax.experimental import multihost_utils
  received = multihost_utils.process_allgather(np.int32(signum or 0))
  return int(received.max()) or None
