"""The `mcti` command.

  mcti train --config mcti:pets --config.data.data_dir=~/tensorflow_datasets
  mcti train --config mcti:tiny --config.phase.ti.steps=50
  mcti train --config gcpl:cars,comple --config.phase.comple.lam=1e-3
  mcti eval --config eval:pets --config.train.data.data_dir=~/tensorflow_datasets
  mcti retrieve --tokens runs/demo/5shot/seed1/export/mcti
  mcti export runs/pets                       # re-export a finished run in every format
  mcti train --distributed --config ...       # on every process of a TPU pod or cluster (launch/README.md)

Every config field can be overridden with --config.<field>=<value>; an
unknown field is refused. `mcti <command> --help` lists the fields and presets.

A problem with what was given (data, checkpoint, config: errors.MctiError)
prints as one message and exits 1; Ctrl-C prints one line and exits 130.
MCTI_DEBUG=1 adds their tracebacks. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sys
import threading
import traceback

from mcti_jax.config_files import load_config, shipped
from mcti_jax.errors import ConfigError, MctiError

COMMANDS = {
    "train": "learn class tokens for all classes in one run: config.phases in order (TI, MC-TI, GCPL, CoMPLe, DCT, "
             "custom tokens); resumable",
    "eval": "N-shot settings x methods x seeds: results.json, a Table-1 markdown table, plots; resumable",
    "generate": "images from prompts holding learned tokens (DDIM + classifier-free guidance)",
    "retrieve": "rank images for 'a photo of a <cls-k> <words>' queries: fixed prompts vs GAIR; MRR, R@1, R@5",
    "demo": "the main job end to end on the embedded tiny model (CPU, minutes); default --config demo",
    "pretrain-tiny": "pretrain the embedded tiny CLIP + latent diffusion model on sklearn digits 0-4",
    "export": "re-export a finished run's tokens in every format (diffusers, A1111/kohya, combined)",
}
HELP_FLAGS = ("-h", "--help", "--helpfull")
DISTRIBUTED = "--distributed"  # any command: join the run's other processes first (mcti_jax/runtime/distributed.py)
# --config.<field>, --noconfig.<field> (a boolean's off switch): absl's spellings of an override.
_OVERRIDE = re.compile(r"--?(?:no)?config\.([^=]+)")


def _usage() -> str:
  lines = ["usage: mcti <command> [flags]", "", "commands:"]
  lines += [f"  {name:<14} {text}" for name, text in COMMANDS.items()]
  lines += ["", "`mcti <command> --help` lists a command's flags.",
            "--distributed (any command): one of several processes of a run on a TPU pod or cluster; see "
            "launch/README.md."]
  return "\n".join(lines)


def _config_arg(args: list[str]) -> tuple[str | None, list[str]]:
  """(the CONFIG[:preset] of `--config CONFIG` or `--config=CONFIG`, the other args)."""
  for i, a in enumerate(args):
    if a == "--config":
      if i + 1 == len(args):
        raise ConfigError("--config needs a value, e.g. --config mcti:tiny")
      return args[i + 1], args[:i] + args[i + 2:]
    if a.startswith("--config="):
      return a.split("=", 1)[1], args[:i] + args[i + 1:]
  return None, args


# Training fields that moved into the phases: where an old command's flag now goes.
MOVED = {"ti_steps": "phase.ti.steps", "mcti_steps": "phase.mcti.steps", "alpha": "phase.mcti.alpha",
         "beta": "phase.mcti.beta", "scale": "phase.mcti.scale", "lr": "phase.<name>.lr",
         "weight_decay": "phase.<name>.weight_decay", "methods": "evals", "template": "evals.<name>.template",
         "coop": "evals.mcti_coop", "dic": "evals.dic_fewshot / evals.dic_zeroshot"}


def _check_fields(config, spec: str, command: str, args: list[str]) -> None:
  """Refuse --config.<field> for a field the config lacks, naming the config, the field and the flag."""
  from ml_collections import ConfigDict
  for arg in args:
    if m := _OVERRIDE.match(arg):
      node = config
      for key in m[1].split("."):
        if not isinstance(node, ConfigDict) or key not in node:
          moved = MOVED.get(m[1].removeprefix("train."))
          hint = f" It moved: use --config.{'train.' if m[1].startswith('train.') else ''}{moved}." if moved else ""
          raise ConfigError(f"{spec} has no field {m[1]!r} ({arg}); `{command} --help` lists the fields.{hint}")
        node = node[key]


def _help(command: str, spec: str, module, config) -> str:
  """The config file's docstring, its presets, then its fields with their values."""
  file = spec.split(":", 1)[0]
  lines = [f"usage: {command} --config CONFIG[:preset] [--config.<field>=<value> ...]", "",
           f"CONFIG: one that ships with mcti-jax ({', '.join(shipped())}) or the path of a .py file of your own.", ""]
  if module.__doc__:
    lines += [f"{file}: {module.__doc__.strip()}", ""]
  if names := getattr(module, "PRESET_NAMES", None):
    lines += [f"presets ({file}:<preset>): {', '.join(names)}", ""]
  which = spec if ":" in spec else f"{spec} (its default preset; add :<preset> to see another)"
  lines += [f"fields of {which}, with the overrides given:", *_fields(config)]
  return "\n".join(lines)


def _fields(config, prefix: str = ""):
  """`  path.to.field: value` lines in the file's order, values spelled as --config.<field>=<value> takes them."""
  from ml_collections import ConfigDict
  for key, value in config.items():
    if isinstance(value, ConfigDict) and len(value):
      yield from _fields(value, f"{prefix}{key}.")
    else:
      yield f"  {prefix}{key}: {value if isinstance(value, str) and value else repr(value)}"


def parse_config(argv: list[str], help_config: str | None = None):
  """--config CONFIG[:preset] plus --config.<field>=<value> overrides -> a locked ConfigDict.

  With --help, prints the config's presets and fields (those of `help_config` when no --config is given) and exits.
  """
  from absl import flags
  from ml_collections import config_flags

  command = argv[0]
  wants_help = any(a in HELP_FLAGS for a in argv[1:])
  spec, args = _config_arg([a for a in argv[1:] if a not in HELP_FLAGS])
  for a in args:
    if a.startswith("-") and not _OVERRIDE.match(a):
      raise ConfigError(f"unknown flag {a.split('=', 1)[0]!r}; the flags are --config CONFIG[:preset] and "
                        f"--config.<field>=<value>; `{command} --help` lists the fields.")
  if spec is None and not (wants_help and help_config):
    raise ConfigError("--config CONFIG[:preset] is needed, e.g. --config mcti:tiny; "
                      f"`{command} --help` lists the presets.")
  spec = spec or help_config
  module, config = load_config(spec)
  _check_fields(config, spec, command, args)
  values = flags.FlagValues()
  try:
    config_flags.DEFINE_config_dict("config", config, flag_values=values, sys_argv=[command, *args])
    rest = values([command, *args])
  except (flags.Error, ValueError) as e:  # a value of the wrong type, an unknown flag, a missing value
    raise ConfigError(f"{e}; `{command} --help` lists the fields.") from None
  if len(rest) > 1:
    raise ConfigError(f"unexpected argument {rest[1]!r}; the flags are --config CONFIG[:preset] and "
                      "--config.<field>=<value>.")
  if wants_help:
    print(_help(command, spec, module, values.config))
    raise SystemExit(0)
  return values.config


# Each command parses its flags and imports what it runs, then returns the work itself (see main).


def _train(argv):
  config = parse_config(argv, help_config="mcti")
  from mcti_jax.training import train
  return lambda: train.train(config)


def _eval(argv):
  config = parse_config(argv, help_config="eval")
  from mcti_jax.evaluation import evaluate
  return lambda: _print_table(evaluate.run(config)["table"])


def _print_table(table) -> None:
  if table is not None:  # None on processes other than 0, which write nothing
    print(table.read_text())


def with_default_config(argv: list[str], default: str) -> list[str]:
  """`argv` with `--config default` ahead of its --config.<field> overrides, unless it names a config."""
  if any(a == "--config" or a.startswith("--config=") for a in argv):
    return argv
  return [argv[0], "--config", default, *argv[1:]]


def _demo(argv):
  config = parse_config(with_default_config(argv, "demo"))
  from mcti_jax import demos
  return lambda: demos.run(config)  # the demo config.kind names


def _generate(argv):
  from mcti_jax.generation import command
  args = command.parse(argv)  # --help and bad flags answer before JAX is imported
  return lambda: command.run(args)


def with_tokens_flag(argv: list[str]) -> list[str]:
  """`--tokens FOLDER` (or `--tokens=FOLDER`) -> `--config.tokens=FOLDER`: retrieve's one flag outside its config."""
  out, i = [], 0
  while i < len(argv):
    a = argv[i]
    if a == "--tokens":
      if i + 1 == len(argv):
        raise ConfigError("--tokens needs the export folder of `mcti train`, e.g. "
                          "--tokens runs/demo/5shot/seed1/export/mcti")
      out.append(f"--config.tokens={argv[i + 1]}")
      i += 2
      continue
    out.append(f"--config.tokens={a.split('=', 1)[1]}" if a.startswith("--tokens=") else a)
    i += 1
  return out


def _retrieve(argv):
  config = parse_config(with_default_config(with_tokens_flag(argv), "retrieve"))
  from mcti_jax.retrieval import retrieve
  return lambda: retrieve.run(config)


def _pretrain_tiny(argv):
  from mcti_jax.tiny import main
  args = main.parse(argv[1:])  # --help and bad flags answer before JAX is imported
  return lambda: main.run(args)


def _export(argv):
  from mcti_jax.tokens import export_command
  args = export_command.parse(argv[1:])  # --help and bad flags answer before JAX is imported
  return lambda: export_command.run(args)


def _persistent_compilation_cache() -> None:
  """Keep compiled programs on disk (~/.cache/mcti_jax/jit, or $JAX_COMPILATION_CACHE_DIR): a resumed run, the
  next seed of an evaluation and the next demo skip the compiles (minutes for SD). Programs are keyed by their
  full HLO, the jaxlib version and the device, so a stale entry is never used."""
  import jax
  if not jax.config.jax_compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir", os.path.join(os.path.expanduser("~"), ".cache", "mcti_jax", "jit"))
  if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def _interrupt(e: BaseException) -> KeyboardInterrupt | None:
  """The Ctrl-C behind `e`: `e` itself or one in its chain (a stopped import fails as an ImportError; cleanup code
  that it unwinds can fail too, e.g. with a KeyError holding a whole jaxpr)."""
  todo, seen = [e], set()
  while todo:
    e = todo.pop()
    if e is None or id(e) in seen:
      continue
    if isinstance(e, KeyboardInterrupt):
      return e
    seen.add(id(e))
    todo += [e.__cause__, e.__context__]
  return None


def _report(prog: str, message: str, e: BaseException) -> None:
  if os.environ.get("MCTI_DEBUG", "0") not in ("", "0"):
    traceback.print_exception(e)
  print(f"{prog}: {message}", file=sys.stderr)


@contextlib.contextmanager
def _held_sigint():
  """Ctrl-C is noted, not raised, while the block runs: a KeyboardInterrupt inside jaxlib's import aborts the
  process (nanobind's terminate) or is swallowed by C code. main raises it once the block is done."""
  held = []
  if threading.current_thread() is not threading.main_thread() or \
      signal.getsignal(signal.SIGINT) is not signal.default_int_handler:  # not where SIGINT is ignored (nohup)
    yield held
    return
  previous = signal.signal(signal.SIGINT, lambda signum, frame: held.append(signum))
  try:
    yield held
  finally:
    signal.signal(signal.SIGINT, previous)


def main(argv: list[str] | None = None) -> None:
  argv = list(sys.argv if argv is None else argv)
  if len(argv) < 2 or argv[1] in (*HELP_FLAGS, "help"):
    print(_usage())
    return
  command = argv[1]
  if command not in COMMANDS:
    raise SystemExit(f"mcti: unknown command {command!r}\n\n{_usage()}")
  prog = f"mcti {command}"
  multi_process = DISTRIBUTED in argv[2:]
  argv = [a for a in argv if a != DISTRIBUTED]
  handlers = {"train": _train, "eval": _eval, "generate": _generate, "retrieve": _retrieve, "demo": _demo,
              "pretrain-tiny": _pretrain_tiny, "export": _export}
  try:
    with _held_sigint() as held:
      work = handlers[command]([prog, *argv[2:]])
      _persistent_compilation_cache()
    if held:
      raise KeyboardInterrupt
    if multi_process:  # before anything touches a device
      from mcti_jax.runtime import distributed
      distributed.initialize(prog)
    work()
  except (Exception, KeyboardInterrupt) as e:
    if (stop := _interrupt(e)) is not None:  # Ctrl-C; the trainer's own stop (stopping.Stopped) says where it saved
      _report(prog, str(stop) or "interrupted", e)
      raise SystemExit(128 + getattr(stop, "signum", signal.SIGINT)) from None
    if not isinstance(e, MctiError):
      raise  # a bug: its traceback is the report
    _report(prog, f"error: {e}", e)  # a traceback through jax or httpx would bury what to change
    raise SystemExit(1) from None


if __name__ == "__main__":
  main()
