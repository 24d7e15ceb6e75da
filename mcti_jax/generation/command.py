"""`mcti generate`: images from prompts, with the class tokens of an export of `mcti train`.

  mcti generate --tokens runs/pets/export/mcti --prompt "a photo of a <cls-3> on the beach" --n 8

The flags are parsed before JAX and the models are imported, so that --help and
a mistyped flag answer at once; `run` then draws the images (generate.py).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

DEFAULT_GUIDANCE = 7.5  # Stable Diffusion's usual; an export's manifest may name its base model's own


def parser(prog: str = "mcti generate") -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog=prog, description="Generate images with Stable Diffusion (DDIM + classifier-free guidance), "
      "optionally with class tokens learned by `mcti train` (write <cls-k> in the prompt).")
  p.add_argument("--sd", help="diffusers Stable Diffusion folder or hub id (default with --tokens: the base model "
                 "the tokens were trained on, from their manifest)")
  p.add_argument("--tokens", help="export folder of `mcti train` (e.g. runs/pets/export/mcti)")
  p.add_argument("--prompt", action="append", help="a prompt, e.g. 'a photo of a <cls-3> on the beach' "
                 "(repeatable; default with --tokens: 'a photo of a <cls-k>' for every class)")
  p.add_argument("--n", type=int, default=8, help="images per prompt")
  p.add_argument("--steps", type=int, default=50, help="DDIM steps")
  p.add_argument("--guidance", type=float, help="classifier-free guidance scale (<= 1: none; default: the tokens' "
                 f"manifest's, else {DEFAULT_GUIDANCE})")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default="runs/generate", help="output folder for the PNGs, grid.png and prompts.json")
  p.add_argument("--batch_size", type=int, default=16, help="images per device program (memory; not results)")
  p.add_argument("--dtype", default="float32", help="compute dtype: float32 or bfloat16")
  p.add_argument("--num_devices", type=int, default=None, help="devices to split the images over (default: all)")
  return p


def parse(argv: list[str]) -> argparse.Namespace:
  """argv[0] is the program name (as `cli.main` passes it); a bad flag exits with argparse's message."""
  prog = argv[0] if argv else "mcti generate"
  args = parser(prog).parse_args(argv[1:])
  args.prog = prog
  if args.n < 1 or args.steps < 1:
    raise SystemExit(f"{prog}: --n and --steps must be >= 1")
  if args.guidance is not None and not math.isfinite(args.guidance):
    raise SystemExit(f"{prog}: --guidance {args.guidance} is not a number; give one such as 7.5 (<= 1: no guidance)")
  if not args.prompt and not args.tokens:
    raise SystemExit(f"{prog}: give --prompt (and --tokens to use learned classes)")
  return args


def main(argv: list[str]) -> None:
  """`mcti generate [--tokens EXPORT] [--sd FOLDER] --prompt "a photo of a <cls-3>" ... --out FOLDER`."""
  run(parse(argv))


def run(args: argparse.Namespace) -> None:
  from mcti_jax import plots
  from mcti_jax.generation.generate import class_prompts, generate, save_images
  from mcti_jax.models import hf_io, pipeline
  from mcti_jax.paths import output_folder
  from mcti_jax.runtime import parallel
  from mcti_jax.tokens import conditioning, export
  from mcti_jax.tokens.conditioning import LearnedTokens
  prog = args.prog
  try:
    output_folder(args.out, "--out")  # before SD loads and the images are drawn
    if args.tokens and (args.sd is None or args.guidance is None):
      manifest = export.load_tokens(args.tokens)[1]
      args.sd = args.sd or export.manifest_models(manifest, args.tokens)["base_model"]
      args.guidance = manifest.get("guidance") if args.guidance is None else args.guidance
    if args.sd is None:
      raise SystemExit(f"{prog}: give --sd (a diffusers Stable Diffusion folder or hub id)"
                       + (f"; {args.tokens}/manifest.json names no base model" if args.tokens else ""))
    args.guidance = DEFAULT_GUIDANCE if args.guidance is None else args.guidance
    sd = pipeline.load_stable_diffusion(args.sd, dtype=args.dtype)
    learned = None
    if args.tokens:
      learned = LearnedTokens.from_export(args.tokens, sd.tokenizer, sd.text_width)
    prompts = args.prompt or class_prompts(learned)
    # Refuse early: with --tokens every prompt must name a class, and every class must exist.
    conditioning.tokenize(sd.tokenizer, prompts, learned, require_class_token=learned is not None)
  except (ValueError, FileNotFoundError) as e:  # includes hf_io.CheckpointError
    raise SystemExit(f"{prog}: {e}") from None

  mesh = parallel.make_mesh(args.num_devices)
  print(f"generating {args.n} image(s) for each of {len(prompts)} prompt(s), {args.steps} DDIM steps, "
        f"guidance {args.guidance}, on {mesh.devices.size} device(s)")
  images = generate(sd, prompts, learned=learned, num_images_per_prompt=args.n, steps=args.steps,
                    guidance=args.guidance, seed=args.seed, mesh=mesh, batch_size=args.batch_size)
  out = Path(args.out)
  files = []
  for i, prompt in enumerate(prompts):
    paths = save_images(images[i * args.n:(i + 1) * args.n], out, prefix=f"prompt{i:03d}")
    files.append({"prompt": prompt, "files": [p.name for p in paths]})
  plots.image_grid(images.reshape(len(prompts), args.n, *images.shape[1:]), prompts,
                   [str(j + 1) for j in range(args.n)], f"one row per prompt, {args.n} images each (seed {args.seed}, "
                   f"DDIM {args.steps} steps, guidance {args.guidance})", out_png=out / "grid.png")
  info = {"sd": args.sd, "tokens": args.tokens, "steps": args.steps, "guidance": args.guidance, "seed": args.seed,
          "n": args.n, "sampler": "DDIM (eta=0)", "prompts": files}
  hf_io.write_folder(out, {"prompts.json": info})
  print(f"wrote {len(images)} images, grid.png and prompts.json to {out}")
