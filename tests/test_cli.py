"""The `mcti` command's messages: one line for the user's mistakes, quiet Ctrl-C, help without --config.

Each case runs the real command in a subprocess (as a person would), so the
exit code and the exact stderr are what is checked. Most stop before jax is
imported and take well under a second.
"""

import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import ROOT

from mcti_jax import cli


def _env(**extra) -> dict:
  env = {k: v for k, v in os.environ.items() if k != "MCTI_DEBUG"}
  return {**env, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1", **extra}


def mcti(*args, **env) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "mcti_jax.cli", *args], cwd=ROOT, env=_env(**env), capture_output=True,
                        text=True, timeout=120)


@pytest.mark.parametrize("command, config, field, preset", [
    ("train", "mcti", "tokens.init_word", "tiny"),
    ("eval", "eval", "train.data.n_shots", "tiny"),
    ("demo", "demo", "generation.num_images", "quick"),
])
def test_help_lists_fields_and_presets_without_a_config(command, config, field, preset):
  proc = mcti(command, "--help")
  assert proc.returncode == 0, proc.stderr
  assert f"presets ({config}:<preset>): " in proc.stdout and f", {preset}" in proc.stdout
  assert f"fields of {config} " in proc.stdout and f"\n  {field}: " in proc.stdout


def test_a_shipped_config_by_name_and_a_users_file_that_builds_on_it_work_from_any_folder(tmp_path):
  """Outside the repository: a bare name resolves in mcti_jax/configs/, a path is a file (which may import ours)."""
  own = tmp_path / "my_config.py"
  own.write_text("from mcti_jax.configs import mcti\n\n\ndef get_config(arg='tiny'):\n"
                 "  c = mcti.get_config(arg)\n  c.phase.ti.steps = 7\n  return c\n")
  by_name = subprocess.run([sys.executable, "-m", "mcti_jax.cli", "train", "--config", "mcti:tiny", "--help"],
                           cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=120)
  assert by_name.returncode == 0, by_name.stderr
  assert "fields of mcti:tiny" in by_name.stdout and "\n  phase.ti.steps: 2000\n" in by_name.stdout
  by_file = subprocess.run([sys.executable, "-m", "mcti_jax.cli", "train", "--config", "my_config.py", "--help"],
                           cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=120)
  assert by_file.returncode == 0, by_file.stderr
  assert "\n  phase.ti.steps: 7\n" in by_file.stdout


@pytest.mark.parametrize("args, message", [
    (["--confg", "mcti:tiny"], "unknown flag '--confg'; the flags are --config CONFIG[:preset] and"),
    (["--config", "mcti:tiny", "--steps=3"], "unknown flag '--steps'"),
    (["--config", "nosuch"], "no config named 'nosuch': mcti-jax ships custom_demo, custom_tokens, dct,"),
    (["--config", "configs/mcti.py:tiny"], "no config file configs/mcti.py; the configs ship in the package: give "
                                           "its name, --config mcti[:preset]"),
    (["--config", "mcti:nosuch"], "mcti:nosuch: "),
])
def test_an_unknown_flag_or_config_is_named(args, message):
  proc = mcti("train", *args)
  assert proc.returncode == 1 and len(proc.stderr.splitlines()) == 1, proc.stderr
  assert message in proc.stderr, proc.stderr


@pytest.mark.parametrize("args", [[], ["generate", "--help"], ["export", "--help"], ["pretrain-tiny", "--help"],
                                  ["retrieve", "--help"], ["generate", "--no-such-flag"]])
def test_help_and_bad_flags_answer_before_jax_is_imported(args):
  """Commands without a config (and retrieve, whose config reads retrieval/settings.py) parse before JAX loads."""
  code = ("import sys\nfrom mcti_jax import cli\ntry:\n  cli.main(['mcti', *sys.argv[1:]])\nexcept SystemExit:\n"
          "  pass\n"
          "print('imported jax' if 'jax' in sys.modules else 'no jax')")
  proc = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, env=_env(), capture_output=True, text=True,
                        timeout=120)
  assert proc.stdout.splitlines()[-1] == "no jax", proc.stdout + proc.stderr


@pytest.mark.parametrize("override, message", [
    ("--config.bogus=1", "mcti:tiny has no field 'bogus' (--config.bogus=1); `mcti train --help` lists"),
    ("--config.data.bogus=1", "mcti:tiny has no field 'data.bogus' (--config.data.bogus=1)"),
    ("--config.phase.ti.steps=abc", "--config.phase.ti.steps=abc: invalid literal for int()"),
    ("--config.ti_steps=5", "has no field 'ti_steps' (--config.ti_steps=5); `mcti train --help` lists the fields. "
                            "It moved: use --config.phase.ti.steps."),
])
def test_a_bad_override_is_one_line_naming_the_config(override, message):
  proc = mcti("train", "--config", "mcti:tiny", override)
  assert proc.returncode == 1
  assert proc.stderr.startswith("mcti train: error: ") and message in proc.stderr
  assert len(proc.stderr.splitlines()) == 1 and proc.stdout == ""


def test_debug_shows_the_traceback_of_a_project_error():
  proc = mcti("train", "--config", "mcti:tiny", "--config.bogus=1", MCTI_DEBUG="1")
  assert proc.returncode == 1
  assert "Traceback" in proc.stderr and "ConfigError" in proc.stderr
  assert proc.stderr.splitlines()[-1].startswith("mcti train: error: mcti:tiny has no field 'bogus'")


@pytest.mark.slow
def test_a_hub_id_without_network_is_one_message_naming_the_id_and_the_fix(tmp_path):
  """The ~110 lines of httpx chained under the hub's error become one line; HF_HUB_OFFLINE=1 makes it fail fast."""
  proc = mcti("train", "--config", "mcti:tiny", "--config.model.sd_path=someone/no-such-model",
              f"--config.workdir={tmp_path / 'run'}")
  assert proc.returncode == 1, proc.stderr
  assert "Traceback" not in proc.stderr and len(proc.stderr.splitlines()) == 1, proc.stderr
  assert proc.stderr.startswith("mcti train: error: could not download 'someone/no-such-model'")
  assert "Pass a local folder" in proc.stderr and "hf download someone/no-such-model" in proc.stderr


def test_resolve_folder_hides_the_hubs_exception_chain(monkeypatch):
  import huggingface_hub
  from mcti_jax.models import hf_io

  def offline(*args, **kwargs):
    try:
      raise ConnectionError("[Errno -2] Name or service not known")
    except ConnectionError as e:
      raise OSError("Got: ConnectError: [Errno -2] Name or service not known\nAn error happened. Check.") from e

  monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
  monkeypatch.setattr(huggingface_hub.HfApi, "model_info", offline)
  with pytest.raises(hf_io.CheckpointError) as e:
    hf_io.resolve_folder("someone/no-such-model")
  assert e.value.__cause__ is None and e.value.__suppress_context__
  assert "\n" not in str(e.value)
  assert "(OSError: Got: ConnectError: [Errno -2] Name or service not known)" in str(e.value)


@pytest.mark.parametrize("debug", [False, True])
def test_ctrl_c_before_training_exits_130_in_one_line(tmp_path, debug):
  """SIGINT while the command imports the trainer (its own handler takes over once training starts)."""
  argv = ["mcti", "train", "--config", "mcti:tiny", f"--config.workdir={tmp_path / 'run'}"]
  # A line on stdout once main() is about to run: a signal any earlier would hit Python's start-up, not the CLI.
  # SIGINT as in a terminal: a child inherits an ignored SIGINT (nohup, some test runners' workers), and the CLI
  # rightly leaves an ignored SIGINT ignored.
  code = (f"import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); from mcti_jax import cli; "
          f"sys.argv = {argv!r}; print('main', flush=True); cli.main()")
  env = _env(**({"MCTI_DEBUG": "1"} if debug else {}))
  proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  try:
    assert proc.stdout.readline() == "main\n"
    time.sleep(0.3)  # inside main: importing numpy, jax and the trainer takes seconds
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
  finally:
    proc.kill()
  assert proc.returncode == 130, err
  assert err.splitlines()[-1] == "mcti train: interrupted"
  if debug:
    assert "Traceback" in err and "KeyboardInterrupt" in err
  else:
    assert err == "mcti train: interrupted\n"


class _Stopped(KeyboardInterrupt):
  """Like stopping.Stopped: the trainer's stop on a signal, after saving, with where to resume."""
  signum = signal.SIGTERM


def _interrupted_in_cleanup(argv):
  try:
    raise KeyboardInterrupt
  finally:
    {}["a jaxpr of 500 KB"]  # noqa: B018 - cleanup that fails while the interrupt unwinds


def _stopped(argv):
  raise _Stopped("stopped at step 120 after saving it; run the same command to resume")


@pytest.mark.parametrize("handler, code, line", [
    (_interrupted_in_cleanup, 130, "mcti train: interrupted"),
    (_stopped, 143, "mcti train: stopped at step 120 after saving it; run the same command to resume"),
])
def test_an_interrupt_exits_quietly_whatever_it_surfaces_as(monkeypatch, capsys, handler, code, line):
  monkeypatch.delenv("MCTI_DEBUG", raising=False)
  monkeypatch.setattr(cli, "_train", handler)
  try:
    cli.main(["mcti", "train"])
  except KeyboardInterrupt:  # not pytest's to see: it would end the session
    pytest.fail("the interrupt escaped cli.main")
  except SystemExit as e:
    assert e.code == code and capsys.readouterr().err == line + "\n"
  else:
    pytest.fail("cli.main returned")


def test_a_bug_keeps_its_traceback(monkeypatch):
  def bug(argv):
    raise ZeroDivisionError("a bug")
  monkeypatch.setattr(cli, "_train", bug)
  with pytest.raises(ZeroDivisionError):
    cli.main(["mcti", "train"])


@pytest.mark.parametrize("env, message", [
    ({}, "JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID"),
    ({"JAX_NUM_PROCESSES": "two"}, "JAX_NUM_PROCESSES='two' must be an integer"),
])
def test_distributed_without_a_cluster_is_one_message_naming_the_settings(env, message):
  out = mcti("train", "--distributed", "--config", "mcti:tiny", **env)
  lines = out.stderr.strip().splitlines()
  assert out.returncode == 1 and len(lines) == 1 and lines[0].startswith("mcti train: error: "), out.stderr
  assert message in lines[0]
