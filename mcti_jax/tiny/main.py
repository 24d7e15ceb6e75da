"""`mcti pretrain-tiny`: `pretrain` with mcti_jax/configs/tiny_pretrain.py, a few of its fields as flags."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

DEFAULT_CONFIG = "tiny_pretrain"  # mcti_jax/configs/tiny_pretrain.py
_STEPS = ("clip_steps", "vae_steps", "unet_steps")


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="mcti pretrain-tiny", description="Pretrain the embedded tiny CLIP + latent "
                              "diffusion model on sklearn digits 0-4 (they never meet 5-9).")
  p.add_argument("--config", default=DEFAULT_CONFIG,
                 help="CONFIG[:preset]: the name of a config that ships with mcti-jax, or a file (default: %(default)s)")
  p.add_argument("--quick", action="store_true", help="the config's quick preset (smoke test; useless model)")
  p.add_argument("--out", help="checkpoint root, gets clip/ and sd/ (default: the config's, the committed one)")
  p.add_argument("--seed", type=int)
  p.add_argument("--no-progress", action="store_true", help="no progress bars")
  for name in _STEPS:
    p.add_argument(f"--{name.replace('_', '-')}", type=int, help="default: the config's")
  return p


def pretrain_main(argv: Sequence[str] | None = None) -> int:
  """`mcti pretrain-tiny [--config CONFIG[:preset]] [--quick] [--out DIR] [--seed N] [--clip-steps N ...]`."""
  return run(parse(argv))


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
  """The flags; --help and a bad flag exit here, before JAX is imported."""
  return _parser().parse_args(argv)


def run(args: argparse.Namespace) -> int:
  from mcti_jax.config_files import load_config
  from mcti_jax.errors import ConfigError
  from mcti_jax.paths import output_folder
  from mcti_jax.tiny.pretrain import pretrain

  spec = f"{args.config.split(':', 1)[0]}:quick" if args.quick else args.config
  try:
    _, config = load_config(spec)
  except ConfigError as e:
    raise SystemExit(f"mcti pretrain-tiny: {e}") from None
  for name in ("out", "seed", *_STEPS):
    if getattr(args, name) is not None:
      config[name] = str(getattr(args, name)) if name == "out" else getattr(args, name)
  try:
    output_folder(config.out, "--out")  # before half an hour of pretraining, not after
  except ConfigError as e:
    raise SystemExit(f"mcti pretrain-tiny: {e}") from None
  stats = pretrain(config, progress=not args.no_progress)
  print(json.dumps({"losses": stats["losses"], "seconds": stats["seconds"]}, indent=2))
  return 0


if __name__ == "__main__":
  raise SystemExit(pretrain_main())
