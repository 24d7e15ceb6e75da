"""Several processes, one mesh: JAX's multi-controller runtime (TPU pods, GPU clusters, localhost).

`mcti <command> --distributed` calls `initialize()` before anything touches a
device. Every process then runs the same program on one mesh over all
processes' devices: each loads only its own classes' shots, collectives cross
the hosts, and process 0 alone writes files (`is_main`); orbax checkpoints are
written by all of them into the shared workdir.

On TPU pod VMs and under SLURM (or Open MPI), JAX finds the coordinator, the
process count and this process's id itself. Elsewhere set
JAX_COORDINATOR_ADDRESS=host:port, JAX_NUM_PROCESSES and JAX_PROCESS_ID.
"""

from __future__ import annotations

import os

import jax
import numpy as np

from mcti_jax.errors import ConfigError

ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def initialize() -> None:
  """Join the run's other processes (blocks until all have joined, or JAX's timeout)."""
  settings = {}
  for name, field in (("JAX_NUM_PROCESSES", "num_processes"), ("JAX_PROCESS_ID", "process_id")):
    if (value := os.environ.get(name)) is not None:
      try:
        settings[field] = int(value)
      except ValueError:
        raise ConfigError(f"{name}={value!r} must be an integer") from None
  # JAX's preemption service would take SIGTERM for itself (a C++ handler), and the trainer's own (stopping.py)
  # would never hear it; the trainer agrees on the stopping step itself.
  jax.config.update("jax_enable_preemption_service", False)
  try:
    jax.distributed.initialize(**settings)  # JAX_COORDINATOR_ADDRESS is read by JAX itself
  except ValueError as e:  # nothing detected and nothing set
    raise ConfigError(f"--distributed could not find the other processes ({e}). On TPU pod VMs and under SLURM JAX "
                      f"finds them itself; elsewhere set {', '.join(ENV)} for every process (see launch/README.md)."
                      ) from None


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
