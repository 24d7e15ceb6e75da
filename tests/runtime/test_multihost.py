"""Several processes, one mesh: 2 processes x 4 CPU devices against 1 process x 8 devices.

The processes are real `mcti ... --distributed` commands on localhost (coordinator 127.0.0.1, CPU collectives
over gloo), as on a TPU pod's workers. They must train the tokens and make the Diffusion Classifier predictions
of one 8-device process, stop together on a SIGTERM that reaches one of them, and resume to the same tokens.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from conftest import ROOT, free_port
from mcti_jax.evaluation import evaluate
from mcti_jax.tokens import export

pytestmark = pytest.mark.multiprocess  # `make test-multiprocess` (CI runs it after `make test`)

PROCESSES, DEVICES_EACH = 2, 4
STEPS = 8  # per phase: enough that a SIGTERM sent after step 2 lands before the end

CONFIG = '''"""The multi-process test's evaluation: MC-TI on 5 digits, its token head and the few-shot DiC."""
from mcti_jax.configs import eval as eval_config


def get_config(arg="eval"):
  c = eval_config.get_config("tiny")
  eval_config.only(c, "mcti", "dic_fewshot")
  c.workdir, c.seeds, c.class_groups = {workdir!r}, (0,), {{}}
  t = c.train
  t.model.sd_path, t.model.clip_path = {sd!r}, {clip!r}
  t.workdir, t.data.cache_dir = {workdir!r} + "/train", {cache!r}
  t.data.num_classes, t.log_every, t.checkpoint_every = 5, 1, 100
  t.data.n_shots, t.data.shot_seed, t.seed = 5, 0, 0  # the evaluation's cell: the same run
  t.phase.ti.steps, t.phase.mcti.steps = {steps}, {steps}
  c.evals.dic_fewshot.max_images = 2
  return c.train if arg == "train" else c
'''


def _supports_cpu_collectives() -> str | None:
  """Why this platform can't run the test (None: it can). jaxlib ships gloo on Linux and macOS."""
  try:
    from jax._src.lib import _jax
    _jax.make_gloo_tcp_collectives  # noqa: B018
  except (ImportError, AttributeError):
    return "this jaxlib has no gloo CPU collectives (jax.distributed on CPU needs them)"
  return None


def _write_config(path: Path, checkpoint: Path, workdir: Path, steps: int) -> Path:
  path.write_text(CONFIG.format(workdir=str(workdir), sd=str(checkpoint / "sd"),
                                clip=str(checkpoint / "clip"), cache=str(workdir.parent / "cache"), steps=steps))
  return path


def _launch(args: list[str], log_dir: Path) -> list[subprocess.Popen]:
  """`mcti <args> --distributed` as processes 0 and 1 of one run, each with 4 CPU devices."""
  port = free_port()
  procs = []
  for rank in range(PROCESSES):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_force_host_platform_device_count={DEVICES_EACH}",
           "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": str(PROCESSES),
           "JAX_PROCESS_ID": str(rank), "JAX_COMPILATION_CACHE_DIR": jax.config.jax_compilation_cache_dir}
    out = open(log_dir / f"process{rank}.log", "ab")
    procs.append(subprocess.Popen([sys.executable, "-m", "mcti_jax.cli", *args, "--distributed"], env=env,
                                  stdout=out, stderr=subprocess.STDOUT, cwd=ROOT))
  return procs


def _wait(procs, log_dir: Path, timeout: float = 600) -> list[int]:
  deadline = time.time() + timeout
  try:
    return [p.wait(timeout=max(deadline - time.time(), 1)) for p in procs]
  except subprocess.TimeoutExpired:
    for p in procs:
      p.kill()
    pytest.fail("the processes hung; their logs:\n" + _logs(log_dir))


def _logs(log_dir: Path) -> str:
  return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(log_dir.glob("process*.log")))


def _dic_predictions(workdir: Path) -> dict[str, list[int]]:
  path = next(workdir.glob("**/dic_fewshot.dic.jsonl"))
  return {r["id"]: r["ranking"] for r in map(json.loads, path.read_text().splitlines())}


@pytest.fixture(scope="module")
def runs(tiny_checkpoint, tmp_path_factory):
  """The same evaluation by 1 process x 8 devices (this one) and by 2 processes x 4 devices."""
  if (reason := _supports_cpu_collectives()) is not None:
    pytest.skip(reason)
  base = tmp_path_factory.mktemp("multihost")
  out = {}
  for name in ("one", "two"):
    (base / name).mkdir()
    out[name] = _write_config(base / f"{name}_config.py", tiny_checkpoint, base / name / "eval", steps=STEPS)
  evaluate.run(_load(out["one"]), log=lambda _: None)
  procs = _launch(["eval", "--config", str(out["two"])], base / "two")
  codes = _wait(procs, base / "two")
  assert codes == [0, 0], _logs(base / "two")
  return {"base": base, "checkpoint": tiny_checkpoint, **{k: base / k / "eval" for k in ("one", "two")}}


def _load(config_path: Path, arg: str = "eval"):
  from mcti_jax.config_files import load_config
  return load_config(f"{config_path}:{arg}")[1]


def _tokens(workdir: Path, phase: str) -> np.ndarray:
  return export.load_tokens(next(workdir.glob(f"**/export/{phase}")))[0]


def test_two_processes_train_the_tokens_of_one(runs):
  """Equal up to float rounding: XLA's CPU kernels split work by the threads a process has (measured: 2e-8)."""
  for phase in ("ti", "mcti"):
    np.testing.assert_allclose(_tokens(runs["two"], phase), _tokens(runs["one"], phase), atol=2e-6, rtol=0,
                               err_msg=phase)


def test_two_processes_make_the_diffusion_classifiers_predictions(runs):
  one, two = _dic_predictions(runs["one"]), _dic_predictions(runs["two"])
  assert len(one) == 2 and two == one  # every class's ranking of every image
  rows = {name: {r["method"]: r for r in json.loads((runs[name] / "results.json").read_text())["rows"]}
          for name in ("one", "two")}
  for method in ("mcti", "dic_fewshot"):
    assert rows["two"][method]["confusion"] == rows["one"][method]["confusion"], method


def test_each_process_encodes_only_its_classes_and_process_0_alone_reports(runs):
  """5 classes on 8 devices: process 0's devices hold classes 0-3, process 1's class 4 (and 3 padded ones)."""
  encoded = {}  # process -> the classes whose cache entries it wrote (one entry per class)
  for path in sorted((runs["base"] / "two" / "cache" / "classes").glob("class-*.npz")):
    with np.load(path) as f:
      meta = json.loads(str(f["__meta__"]))
    encoded.setdefault(meta["process"], []).append(meta["class"])
  one = json.loads((next(runs["one"].glob("**/export/mcti")) / "manifest.json").read_text())
  names = [c["name"] for c in one["shots"]["classes"]]  # the source's class names, as the cache records them
  assert {p: sorted(c) for p, c in encoded.items()} == {0: names[:4], 1: names[4:]}
  log = (runs["base"] / "two" / "process1.log").read_text()
  assert "top-1" not in log  # process 1 neither prints the rows nor writes them
  assert (runs["two"] / "results.md").is_file()
  two = json.loads((next(runs["two"].glob("**/export/mcti")) / "manifest.json").read_text())
  assert two["shots"] == one["shots"] and len(two["shots"]["classes"]) == 5  # every class's, not process 0's


def test_sigterm_to_one_process_stops_both_at_one_step_and_resumes(runs, tmp_path):
  config = _write_config(tmp_path / "config.py", runs["checkpoint"], tmp_path / "eval", steps=STEPS)
  args = ["train", "--config", f"{config}:train"]
  procs = _launch(args, tmp_path)
  metrics = tmp_path / "eval" / "train" / "metrics.jsonl"
  deadline = time.time() + 300
  while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 2):
    if time.time() > deadline or any(p.poll() is not None for p in procs):
      break
    time.sleep(0.05)
  procs[1].send_signal(signal.SIGTERM)  # only process 1 hears it, as when one worker is preempted first
  codes = _wait(procs, tmp_path)
  logs = [(tmp_path / f"process{rank}.log").read_text() for rank in range(PROCESSES)]
  assert codes == [128 + signal.SIGTERM] * 2, _logs(tmp_path)
  stopped = [int(log.split("stopped at step ")[1].split("/")[0]) for log in logs]
  assert stopped[0] == stopped[1] < 2 * STEPS, stopped

  resumed = _launch(args, tmp_path)
  assert _wait(resumed, tmp_path) == [0, 0], _logs(tmp_path)
  assert f"resumed from the checkpoint at step {stopped[0]}/{2 * STEPS}" in (tmp_path / "process0.log").read_text()
  for phase in ("ti", "mcti"):  # the evaluation's training run: the same config and processes, never stopped
    got = export.load_tokens(tmp_path / "eval" / "train" / "export" / phase)[0]
    np.testing.assert_array_equal(got, _tokens(runs["two"], phase), err_msg=phase)
