"""Speed of `mcti_jax.generation.generate.generate` (DDIM + CFG, sharded) against diffusers' StableDiffusionPipeline.

  python benchmarks/generate_benchmark.py                  # tiny random model, CPU, seconds
  python benchmarks/generate_benchmark.py --full --dtype bfloat16 --n 8 --prompts 2   # SD1.5 shapes, GPU

--full builds Stable Diffusion 1.5-shaped models (UNet 860M, VAE, CLIP ViT-L/14
text tower) with random weights, so no download is needed; the speed is the
real model's. Prints the first call (compile + run) and the mean of the timed
calls, per image and per denoising step (each step runs the UNet on 2x the
images: conditional and "" prompts).

The reference is diffusers' StableDiffusionPipeline built from torch modules
on the same configs (random init) and a DDIMScheduler, on cuda if torch sees a
GPU, else CPU: the same prompts, images per prompt, steps and guidance, all
images in one call (as the pipeline batches them), decoded to numpy. Both
report images/s; the ratio is ours over theirs.
"""

from __future__ import annotations

import argparse
import time

import jax

import common
from mcti_jax.generation import generate as G
from mcti_jax.runtime import parallel
from mcti_jax.models import pipeline, schedule
from mcti_jax.tiny import checkpoints as tiny_checkpoints


def sd15_random(dtype: str, seed: int = 0) -> pipeline.StableDiffusion:
  """SD 1.5's configs with random weights (the tiny tokenizer: its ids are all valid for a 49408 vocabulary)."""
  text_tokenizer = tiny_checkpoints.load_tiny_tokenizer()
  return pipeline.StableDiffusion(
      unet=common.jax_unet(common.unet_config(True), dtype, seed),
      vae=common.jax_vae(common.vae_config(True), dtype, seed + 1),
      text_encoder=common.jax_text(common.sd_text_config(True), dtype, seed + 2,
                                   eos_token_id=text_tokenizer.eos_token_id),
      schedule=schedule.NoiseSchedule.from_config(common.scheduler_config()), tokenizer=text_tokenizer,
      source="random SD1.5-shaped")


def tiny_random(dtype: str) -> pipeline.StableDiffusion:
  sd = tiny_checkpoints.build(0).sd
  if dtype != "float32":
    raise SystemExit("the tiny benchmark runs in float32; use --full for other dtypes")
  return sd


def torch_pipeline(sd: pipeline.StableDiffusion, device: str, dtype: str):
  """diffusers' StableDiffusionPipeline on the configs of `sd` (random torch weights) with a DDIMScheduler."""
  import diffusers
  pipe = diffusers.StableDiffusionPipeline(
      vae=common.torch_vae(sd.vae.config, device, dtype), text_encoder=common.torch_text(
          sd.text_encoder.config, device, dtype), tokenizer=sd.tokenizer,
      unet=common.torch_unet(sd.unet.config, device, dtype),
      scheduler=diffusers.DDIMScheduler.from_config(sd.schedule.to_hf("DDIMScheduler")),
      safety_checker=None, feature_extractor=None, requires_safety_checker=False)
  pipe.set_progress_bar_config(disable=True)
  return pipe


def run_torch(sd, prompts, args, steps: int, device: str) -> dict:
  import torch
  t0 = time.perf_counter()
  pipe = torch_pipeline(sd, device, args.dtype)
  build_s = time.perf_counter() - t0

  def run(seed: int):
    return pipe(prompts, num_images_per_prompt=args.n, num_inference_steps=steps, guidance_scale=args.guidance,
                generator=torch.Generator(device).manual_seed(seed), output_type="np").images

  sync = lambda: common.torch_sync(device)  # noqa: E731
  first = common.timed(lambda: run(0), 1, sync)[0]
  times = common.timed(lambda: run(1), args.repeats, sync)
  num = len(prompts) * args.n
  mean_s = sum(times) / len(times)
  return {"device": common.torch_description(device), "build_s": common.rounded(build_s),
          "first_call_s": common.rounded(first), "mean_call_s": common.rounded(mean_s),
          "best_call_s": common.rounded(min(times)), "images_per_s": common.rounded(num / mean_s)}


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--full", action="store_true", help="SD1.5-shaped random weights (use a GPU)")
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="compute and weights")
  p.add_argument("--prompts", type=int, default=2)
  p.add_argument("--n", type=int, default=4, help="images per prompt")
  p.add_argument("--steps", type=int, default=None, help="DDIM steps (default: 50 full, 10 tiny)")
  p.add_argument("--guidance", type=float, default=7.5)
  p.add_argument("--batch_size", type=int, default=None, help="images per program (default: all at once)")
  p.add_argument("--num_devices", type=int, default=None)
  p.add_argument("--repeats", type=int, default=3, help="timed calls after the first (at least 1)")
  common.add_torch_flags(p)
  common.add_output_flag(p)
  args = p.parse_args(argv)
  if args.repeats < 1:
    p.error("--repeats must be at least 1")
  steps = args.steps or (50 if args.full else 10)
  torch_device = common.setup_torch(args)

  t0 = time.perf_counter()
  sd = sd15_random(args.dtype) if args.full else tiny_random(args.dtype)
  build_s = time.perf_counter() - t0
  mesh = parallel.make_mesh(args.num_devices)
  prompts = [f"a photo of the digit {w}" for w in ("one two three four five six seven eight".split() * 8)]
  prompts = prompts[:args.prompts]

  def run(seed: int):
    return G.generate(sd, prompts, num_images_per_prompt=args.n, steps=steps, guidance=args.guidance, seed=seed,
                      mesh=mesh, batch_size=args.batch_size)

  t0 = time.perf_counter()
  images = run(0)
  first_s = time.perf_counter() - t0
  times = []
  for r in range(args.repeats):
    t0 = time.perf_counter()
    run(r + 1)
    times.append(time.perf_counter() - t0)
  num = len(images)
  mean_s = sum(times) / len(times)
  report = {
      "benchmark": "generation (DDIM + CFG)", "model": sd.source, "dtype": args.dtype,
      "images": f"{num} of {images.shape[1]}x{images.shape[2]} ({len(prompts)} prompts x {args.n})",
      "steps": steps, "guidance": args.guidance, "repeats": args.repeats,
      "env": common.environment(torch_device),
      "jax": {"devices": f"{mesh.devices.size} x {jax.devices()[0].device_kind}", "batch": args.batch_size or num,
              "build_s": common.rounded(build_s), "first_call_s (compile + run)": common.rounded(first_s),
              "mean_call_s": common.rounded(mean_s), "best_call_s": common.rounded(min(times)),
              "s_per_image": common.rounded(mean_s / num), "ms_per_step": common.rounded(mean_s / steps * 1e3),
              "images_per_s": common.rounded(num / mean_s)},
  }
  if torch_device is not None:
    report["torch"] = run_torch(sd, prompts, args, steps, torch_device)
    report["speedup_images"] = common.rounded(report["jax"]["images_per_s"] / report["torch"]["images_per_s"], 3)
  common.print_report(report, args.json_out)
  return report


if __name__ == "__main__":
  main()
