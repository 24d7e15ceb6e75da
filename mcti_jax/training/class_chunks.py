"""How many classes a device runs per pass of the training step: `config.class_chunk`.

  0       all of a device's classes in one pass (memory grows with K / devices)
  c > 0   passes of c classes inside the one compiled step (train_step._shard_grads): the step's memory is that of
          c classes, whatever K is; the cost still grows with K
  "auto"  the largest c whose compiled step fits the device's memory

The results do not depend on c (each class's gradient is its own loss's), so c may change when a run resumes.

"auto" reads what XLA says a compiled step needs (`memory_analysis`: its arguments, outputs and temporaries,
less the donated buffers it writes in place) against what the device may allocate (`memory_stats()
["bytes_limit"]`), keeping MARGIN of it. The need grows linearly in c (one pass's activations), so the steps
compiled at c = 1 and 2 give the line; the largest c under the budget is read off it, the passes are evened out
(37 classes under a limit of 16 run as 3 passes of 13, not 16 + 16 + 5 with 11 wasted slots), and the step
compiled at that c is checked, lowering c until it fits. That is three compiles instead of one.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax

from mcti_jax.errors import MctiError

MARGIN = 0.9  # of the device's limit: room for the allocator's fragmentation and the buffers outside the step
AUTO = "auto"


def problem(value) -> str | None:
  """What is wrong with a class_chunk value, or None."""
  if value == AUTO or (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
    return None
  return ("a whole number of classes per pass (0: all of a device's classes at once) or 'auto' (the largest that "
          "fits the device's memory)")


def device_memory(devices) -> int | None:
  """The bytes the smallest of `devices` lets XLA allocate; None where the backend doesn't say (the CPU)."""
  limits = []
  for device in devices:
    try:
      stats = device.memory_stats()
    except Exception:  # noqa: BLE001  (a backend without the call)
      stats = None
    if not stats or "bytes_limit" not in stats:
      return None
    limits.append(int(stats["bytes_limit"]))
  return min(limits) if limits else None


def need(compiled: jax.stages.Compiled) -> int:
  """Bytes a compiled program holds on a device while it runs: arguments, outputs and temporaries, less what it
  writes in place of donated arguments."""
  m = compiled.memory_analysis()
  return int(m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes)


def even(limit: int, num_local: int) -> int:
  """The smallest chunk that runs `num_local` classes in as few passes as chunks of `limit` do."""
  return math.ceil(num_local / math.ceil(num_local / limit))


def choose(compile_at: Callable[[int], jax.stages.Compiled], num_local: int, limit: int, margin: float = MARGIN,
           log: Callable[[str], None] = print) -> tuple[int, jax.stages.Compiled]:
  """The largest class chunk whose step fits `margin` x `limit` bytes, and that step (compile_at(c) compiles it).

  Returns 0 (one pass) when all `num_local` classes of a device fit at once.
  """
  budget = int(margin * limit)
  gb = lambda b: f"{b / 2**30:.2f} GB"  # noqa: E731
  programs: dict[int, jax.stages.Compiled] = {}

  def compiled(c: int) -> jax.stages.Compiled:
    c = 0 if c >= num_local else c
    if c not in programs:
      programs[c] = compile_at(c)
    return programs[c]

  one = need(compiled(1))
  if one > budget:
    raise MctiError(f"class_chunk='auto': even one class per pass needs {gb(one)} of the device's "
                    f"{gb(limit)} ({margin:.0%} usable: {gb(budget)}). Lower the memory per class: "
                    "--config.model.dtype=bfloat16, --config.model.remat=True, or a smaller batch_per_class.")
  chunk = 1
  if num_local > 1:
    per_class = max(need(compiled(2)) - one, 1)
    chunk = even(min(num_local, 1 + (budget - one) // per_class), num_local)
    while chunk > 1 and need(compiled(chunk)) > budget:
      chunk = even(chunk - 1, num_local)
  passes = math.ceil(num_local / chunk)
  log(f"class_chunk='auto': {chunk} of each device's {num_local} classes per pass ({passes} pass"
      f"{'es' if passes > 1 else ''}); the step needs {gb(need(compiled(chunk)))} of {gb(budget)} "
      f"({margin:.0%} of the device's {gb(limit)})")
  return (0 if chunk >= num_local else chunk), compiled(chunk)
