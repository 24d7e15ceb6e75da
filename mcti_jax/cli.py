"""The `mcti` command.

  mcti train --config configs/mcti.py:pets --config.data.data_dir=~/tensorflow_datasets
  mcti train --config configs/mcti.py:tiny --config.ti_steps=50
  mcti eval --config configs/eval.py:pets --config.train.data.data_dir=~/tensorflow_datasets

Every config field can be overridden with --config.<field>=<value>; an
unknown field is refused. `mcti <command> --help` lists the flags.
"""

from __future__ import annotations

import sys

COMMANDS = {
    "train": "learn class tokens (TI warm-up, then MC-TI) for all classes in one run; resumable",
    "eval": "N-shot settings x methods x seeds: results.json, a Table-1 markdown table, plots; resumable",
    "generate": "images from prompts holding learned tokens (DDIM + classifier-free guidance)",
    "demo": "the main job end to end on the embedded tiny model (CPU, minutes); default --config configs/demo.py",
    "pretrain-tiny": "pretrain the embedded tiny CLIP + latent diffusion model on sklearn digits 0-4",
}


def _usage() -> str:
  lines = ["usage: mcti <command> [flags]", "", "commands:"]
  lines += [f"  {name:<14} {text}" for name, text in COMMANDS.items()]
  lines += ["", "`mcti <command> --help` lists a command's flags."]
  return "\n".join(lines)


def parse_config(argv: list[str]):
  """--config FILE[:preset] plus --config.<field>=<value> overrides -> a locked ConfigDict."""
  from absl import flags
  from ml_collections import config_flags

  command = argv[0]
  wants_help = any(a in ("-h", "--help", "--helpfull") for a in argv[1:])
  argv = [a for a in argv if a not in ("-h", "--help", "--helpfull")]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "a config file, e.g. configs/mcti.py:pets", flag_values=values,
                                  lock_config=True)
  try:
    values(argv)
  except flags.Error as e:
    raise SystemExit(f"{command}: {e}") from None
  except (AttributeError, KeyError) as e:
    raise SystemExit(f"{command}: the config has no field {e}. `{command} --config FILE --help` lists the "
                     "fields.") from None
  if wants_help:
    print(f"usage: {command} --config FILE[:preset] [--config.<field>=<value> ...]\n")
    if values.config is not None:
      print(f"fields of {values['config'].config_filename} (current values):\n{values.config}")
    raise SystemExit(0)
  if values.config is None:
    raise SystemExit(f"{command} needs --config, e.g. --config configs/mcti.py:tiny")
  return values.config


def _train(argv):
  config = parse_config(argv)
  from mcti_jax import train
  train.train(config)


def _eval(argv):
  config = parse_config(argv)
  from mcti_jax import evaluate
  out = evaluate.run(config)
  print(out["table"].read_text())


def with_default_config(argv: list[str], default: str) -> list[str]:
  """`argv` with `--config default` ahead of its --config.<field> overrides, unless it names a config."""
  if any(a == "--config" or a.startswith("--config=") for a in argv):
    return argv
  return [argv[0], "--config", default, *argv[1:]]


def _demo(argv):
  config = parse_config(with_default_config(argv, "configs/demo.py"))
  from mcti_jax import demo
  demo.run(config)


def _generate(argv):
  from mcti_jax import generate
  generate.generate_main(argv)


def _pretrain_tiny(argv):
  from mcti_jax import pretrain_tiny
  pretrain_tiny.pretrain_main(argv[1:])


def main(argv: list[str] | None = None) -> None:
  argv = list(sys.argv if argv is None else argv)
  if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
    print(_usage())
    return
  command = argv[1]
  if command not in COMMANDS:
    raise SystemExit(f"mcti: unknown command {command!r}\n\n{_usage()}")
  handlers = {"train": _train, "eval": _eval, "generate": _generate, "demo": _demo, "pretrain-tiny": _pretrain_tiny}
  handlers[command]([f"mcti {command}", *argv[2:]])


if __name__ == "__main__":
  main()
