"""Large class sets on one host: throughput and memory of `mcti train` against K, with and without chunks.

For each K and each class_chunk (0: all of a device's classes in one pass; c: passes of c), runs `mcti train` on
the synthetic world (mcti:synthetic, the embedded tiny model, 16 px) as a subprocess with a fresh
workdir and encoding cache, on 8 simulated CPU devices, the TI phase only, and reports:

  class-samples/s  K x batch_per_class x steps / seconds between the first and the last rows of metrics.jsonl
                   (the step is compiled before the clock starts; the first row's steps are the warm-up; the one
                   checkpoint is saved after the last row)
  peak host RSS    the child's max RSS (os.wait4's rusage of that child alone)
  step memory      what XLA says the compiled step holds per device (memory_analysis: temp, and class_chunks.need:
                   arguments + outputs - aliased + temp), compiled again in a child of this script with
                   setup_lib.prepare + train.compile_step on the run's config and (cached) encodings

The default chunk is 8 classes per pass per device: K = 64 on 8 devices is 8 classes per device, so K = 64 at
c = 8 is the one-pass program the bars compare against, and K = 1024 at c = 8 runs that same pass 16
times. Steps per run scale as 1/K (about the same class-samples per run), so every run takes about as long.

  .venv/bin/python benchmarks/large_k.py                      # K = 16, 64, 128, 1024 x chunk 0, 8: ~7 min, 2 cores
  .venv/bin/python benchmarks/large_k.py --classes 16 64 --samples 1024    # a quick look

The bars (checked at the chunk c): at K = 1024, peak host memory <= 1.5 x K = 64's and class-samples/s
within 20% of K = 64's. The synthetic world makes no accuracy claim.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEVICES = 8
ENV = {"XLA_FLAGS": f"--xla_force_host_platform_device_count={DEVICES}", "JAX_PLATFORMS": "cpu"}
# Should the 8 simulated devices' threads still fail to meet at a collective (XLA aborts the process after 40 s with
# SIGABRT; rare with few steps in flight, see schedule), the run starts afresh; `attempts` records it.
ATTEMPTS = 4
MAX_IN_FLIGHT = 5  # steps between metrics rows (see schedule)
RSS_BAR, RATE_BAR = 1.5, 0.8  # K = 1024 against K = 64 at the same chunk
CONFIG = "mcti:synthetic"


def overrides(num_classes: int, chunk: int, workdir: Path, steps: int, log_every: int) -> dict:
  """The run's config fields beyond the preset: TI only, one checkpoint (at the end, after the timed rows)."""
  return {"data.num_classes": num_classes, "class_chunk": chunk, "workdir": str(workdir / "run"),
          "data.cache_dir": str(workdir / "cache"), "phases": ("ti",), "phase.ti.steps": steps,
          "log_every": log_every, "checkpoint_every": steps}


def schedule(num_classes: int, samples: int, rows: int) -> tuple[int, int]:
  """(steps, log_every): about `samples` class-samples timed, then one warm-up row more.

  A metrics row waits for its steps, so log_every also bounds the steps in flight: with many in flight the 8
  simulated devices' threads can deadlock at a collective on 2 cores (XLA aborts the process after 40 s).
  """
  per_run = math.ceil(samples / num_classes)
  log_every = max(1, min(MAX_IN_FLIGHT, per_run // rows))
  return math.ceil(per_run / log_every) * log_every + log_every, log_every


def train_run(num_classes: int, chunk: int, workdir: Path, args) -> dict:
  """`mcti train` in a child process: its wall time, max RSS and steady-state rate from metrics.jsonl."""
  steps, log_every = schedule(num_classes, args.samples, args.rows)
  fields = overrides(num_classes, chunk, workdir, steps, log_every)
  command = [sys.executable, "-m", "mcti_jax.cli", "train", "--config", CONFIG]
  command += [f"--config.{k}={v!r}" if isinstance(v, tuple) else f"--config.{k}={v}" for k, v in fields.items()]
  log_path = workdir / "train.log"
  for attempt in range(1, ATTEMPTS + 1):
    shutil.rmtree(workdir / "run", ignore_errors=True)
    shutil.rmtree(workdir / "cache", ignore_errors=True)
    tick = time.perf_counter()
    with open(log_path, "w") as log:
      child = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **ENV})
      _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - tick
    code = os.waitstatus_to_exitcode(status)
    if code == 0:
      break
    if code != -6 or attempt == ATTEMPTS:  # not XLA's collective abort, or out of attempts
      raise RuntimeError(f"K={num_classes} chunk={chunk} failed ({code}); see {log_path}:\n"
                         + log_path.read_text()[-3000:])
    print(f"K={num_classes} chunk={chunk}: attempt {attempt} aborted by XLA (devices stuck at a collective); "
          "again", flush=True)
  rows = [json.loads(line) for line in (workdir / "run" / "metrics.jsonl").read_text().splitlines() if line]
  first, last = rows[0], rows[-1]
  seconds = last["elapsed_s"] - first["elapsed_s"]
  timed_steps = last["step"] - first["step"]
  compile_line = next((line for line in log_path.read_text().splitlines() if "compiled the ti step" in line), "")
  return {"classes": num_classes, "chunk": chunk, "per_device": math.ceil(num_classes / DEVICES),
          "passes": math.ceil(math.ceil(num_classes / DEVICES) / chunk) if chunk else 1, "steps": steps,
          "log_every": log_every, "timed_steps": timed_steps, "timed_s": seconds,
          "class_samples_per_s": num_classes * timed_steps / seconds,  # batch_per_class = 1 (the preset's)
          "max_rss_gb": usage.ru_maxrss * 1024 / 1e9, "wall_s": wall, "attempts": attempt,
          "compile_log": compile_line.strip(),
          "command": " ".join(command[1:])}


def step_memory(num_classes: int, chunks: list[int], workdir: Path, steps: int, log_every: int) -> dict[int, dict]:
  """In this process (a child with ENV): the run's TI step compiled at each chunk; XLA's memory analysis."""
  import jax
  import jax.numpy as jnp

  from mcti_jax.training import class_chunks, train
  from mcti_jax.training import setup as setup_lib
  from mcti_jax.runtime import parallel
  from mcti_jax.config_files import load_config
  from mcti_jax.training.step import TrainState, init_class_state, make_optimizer

  _, config = load_config(str(ROOT / CONFIG))
  for field, value in overrides(num_classes, chunks[0], workdir, steps, log_every).items():
    *path, name = field.split(".")
    node = config
    for part in path:
      node = node[part]
    node[name] = value
  setup = setup_lib.prepare(config, log=lambda _: None)
  phase = setup.plan[0]
  optimizer = make_optimizer(phase.settings.lr, phase.settings.weight_decay)
  tokens = setup.init_tokens
  state = TrainState(step=jnp.zeros((), jnp.int32), tokens=tokens, opt_state=optimizer.init(tokens),
                     key=jax.random.PRNGKey(config.seed),
                     class_state=init_class_state(phase.method, tokens, phase.method_settings))
  state = jax.device_put(state, train._state_shardings(state, setup))
  replicated = parallel.replicated(setup.mesh)
  backbone, template_ids = jax.device_put(
      (setup_lib.make_backbone(setup), jnp.asarray(setup.template_ids[phase.name])), replicated)
  clock = jax.device_put((train.step_offset(phase), jnp.int32(phase.start)), replicated)
  out = {}
  for chunk in chunks:
    tick = time.perf_counter()
    compiled = train.compile_step(setup, phase, optimizer, state, backbone, template_ids, clock, chunk)
    m = compiled.memory_analysis()
    out[chunk] = {"temp_bytes": int(m.temp_size_in_bytes), "argument_bytes": int(m.argument_size_in_bytes),
                  "need_bytes": class_chunks.need(compiled), "compile_s": time.perf_counter() - tick}
  return out


def measure_steps(num_classes: int, chunks: list[int], workdir: Path, args) -> dict[int, dict]:
  steps, log_every = schedule(num_classes, args.samples, args.rows)
  command = [sys.executable, __file__, "--_step_memory", str(num_classes), str(workdir), str(steps), str(log_every),
             "--chunks", *map(str, chunks)]
  for _ in range(ATTEMPTS):
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env={**os.environ, **ENV})
    if result.returncode != -6:  # XLA's collective abort: again
      break
  if result.returncode:
    raise RuntimeError(f"compiling the step of K={num_classes} failed:\n{result.stderr[-3000:]}")
  return {int(c): v for c, v in json.loads(result.stdout.splitlines()[-1]).items()}


def verdicts(rows: list[dict], chunk: int) -> dict:
  """The two bars at `chunk`: K = 1024 against K = 64."""
  at = {(r["classes"], r["chunk"]): r for r in rows}
  small, large = at.get((64, chunk)), at.get((1024, chunk))
  if small is None or large is None:
    return {}
  rss, rate = large["max_rss_gb"] / small["max_rss_gb"], large["class_samples_per_s"] / small["class_samples_per_s"]
  return {"chunk": chunk,
          "rss_1024_over_64": {"value": rss, "bar": f"<= {RSS_BAR}", "met": rss <= RSS_BAR},
          "rate_1024_over_64": {"value": rate, "bar": f">= {RATE_BAR}", "met": rate >= RATE_BAR}}


def table(rows: list[dict]) -> str:
  lines = ["| K | class_chunk | classes per device | passes | steps (timed) | class-samples/s | peak host RSS GB | "
           "step temp MB (XLA) | step need MB | run wall s |", "|---" * 10 + "|"]
  for r in rows:
    lines.append(f"| {r['classes']} | {r['chunk']} | {r['per_device']} | {r['passes']} | {r['steps']} "
                 f"({r['timed_steps']}) | {r['class_samples_per_s']:.0f} | {r['max_rss_gb']:.2f} | "
                 f"{r['temp_bytes'] / 2**20:.1f} | {r['need_bytes'] / 2**20:.1f} | {r['wall_s']:.0f} |")
  return "\n".join(lines)


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--classes", type=int, nargs="+", default=[16, 64, 128, 1024])
  p.add_argument("--chunks", type=int, nargs="+", default=[0, 8], help="class_chunk values (0: one pass)")
  p.add_argument("--samples", type=int, default=6144, help="class-samples per run (steps = samples / K, rounded)")
  p.add_argument("--rows", type=int, default=6, help="timed metrics rows per run at least (after one warm-up row)")
  p.add_argument("--root", default="/tmp/large_k", help="fresh workdirs and caches, removed after each K")
  p.add_argument("--out", default=str(ROOT / "benchmarks" / "large_k.json"))
  p.add_argument("--_step_memory", nargs=4, default=None, help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args._step_memory:  # the child that compiles the steps
    num_classes, workdir, steps, log_every = args._step_memory
    print(json.dumps(step_memory(int(num_classes), args.chunks, Path(workdir), int(steps), int(log_every))))
    return

  start = time.perf_counter()
  rows = []
  for num_classes in args.classes:
    for chunk in args.chunks:
      workdir = Path(args.root) / f"K{num_classes}_c{chunk}"
      shutil.rmtree(workdir, ignore_errors=True)
      workdir.mkdir(parents=True)
      row = train_run(num_classes, chunk, workdir, args)
      print(f"K={num_classes} chunk={chunk}: {row['class_samples_per_s']:.0f} class-samples/s, "
            f"max RSS {row['max_rss_gb']:.2f} GB, {row['wall_s']:.0f} s", flush=True)
      rows.append(row)
    memory = measure_steps(num_classes, args.chunks, workdir, args)  # the last chunk's run: its cache is warm
    for row in rows[-len(args.chunks):]:
      row.update(memory[row["chunk"]])
      print(f"K={num_classes} chunk={row['chunk']}: step temp {row['temp_bytes'] / 2**20:.1f} MB, "
            f"need {row['need_bytes'] / 2**20:.1f} MB", flush=True)
    for chunk in args.chunks:
      shutil.rmtree(Path(args.root) / f"K{num_classes}_c{chunk}", ignore_errors=True)

  import flax
  import jax
  import jaxlib
  report = {"benchmark": "large K on one host: mcti train, synthetic world, tiny model, TI only",
            "date": time.strftime("%Y-%m-%d"), "host": platform.node(), "cpus": os.cpu_count(),
            "python": platform.python_version(), "jax": jax.__version__, "jaxlib": jaxlib.__version__,
            "flax": flax.__version__, "devices": f"{DEVICES} simulated CPU devices", "batch_per_class": 1,
            "args": {k: v for k, v in vars(args).items() if not k.startswith("_")}, "rows": rows,
            "bars": [v for c in args.chunks if c and (v := verdicts(rows, c))],
            "before_chunks_issue_rss_gb": {"16": 1.2, "64": 1.8, "1024": 4.3},
            "wall_s": time.perf_counter() - start}
  out = Path(args.out)
  out.write_text(json.dumps(report, indent=1, default=float) + "\n")
  print(table(rows))
  for bar in report["bars"]:
    for name in ("rss_1024_over_64", "rate_1024_over_64"):
      v = bar[name]
      print(f"chunk {bar['chunk']}: {name} = {v['value']:.2f} ({v['bar']}): {'met' if v['met'] else 'MISSED'}")
  print(f"wrote {out} in {report['wall_s']:.0f} s")


if __name__ == "__main__":
  main()
