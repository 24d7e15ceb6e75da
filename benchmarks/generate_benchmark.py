"""Speed of `mcti_jax.generate.generate` (DDIM + CFG, sharded over the visible devices).

  python benchmarks/generate_benchmark.py                  # tiny random model, CPU, seconds
  python benchmarks/generate_benchmark.py --full --dtype bfloat16 --n 8 --prompts 2   # SD1.5 shapes, GPU

--full builds Stable Diffusion 1.5-shaped models (UNet 860M, VAE, CLIP ViT-L/14
text tower) with random weights, so no download is needed; the speed is the
real model's. Prints the first call (compile + run) and the mean of the timed
calls, per image and per denoising step (each step runs the UNet on 2x the
images: conditional and "" prompts).
"""

from __future__ import annotations

import argparse
import time

import jax
from flax import nnx

from mcti_jax import generate as G
from mcti_jax import parallel
from mcti_jax.models import clip, init, pipeline, schedule, tiny, unet, vae


def sd15_random(dtype: str, seed: int = 0) -> pipeline.StableDiffusion:
  """SD 1.5's configs with random weights (the tiny tokenizer: its ids are all valid for a 49408 vocabulary)."""
  kw = dict(dtype=pipeline.dtype_of(dtype), param_dtype=pipeline.dtype_of(dtype))
  unet_cfg = unet.UNetConfig(sample_size=64, cross_attention_dim=768)
  vae_cfg = vae.VAEConfig(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                          up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, sample_size=512)
  text_cfg = clip.CLIPTextConfig(hidden_size=768, intermediate_size=3072, projection_dim=768,
                                 num_attention_heads=12, eos_token_id=2)
  return pipeline.StableDiffusion(
      unet=init.create(lambda: unet.UNet2DConditionModel(unet_cfg, rngs=nnx.Rngs(0), **kw), seed),
      vae=init.create(lambda: vae.AutoencoderKL(vae_cfg, rngs=nnx.Rngs(0), **kw), seed + 1),
      text_encoder=init.create(lambda: clip.CLIPTextModel(text_cfg, rngs=nnx.Rngs(0), **kw), seed + 2),
      schedule=schedule.NoiseSchedule.from_config(tiny.scheduler_config()), tokenizer=tiny.load_tiny_tokenizer(),
      source="random SD1.5-shaped")


def tiny_random(dtype: str) -> pipeline.StableDiffusion:
  sd = tiny.build(0).sd
  if dtype != "float32":
    raise SystemExit("the tiny benchmark runs in float32; use --full for other dtypes")
  return sd


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--full", action="store_true", help="SD1.5-shaped random weights (use a GPU)")
  p.add_argument("--dtype", default="float32", help="float32 or bfloat16 (compute and weights)")
  p.add_argument("--prompts", type=int, default=2)
  p.add_argument("--n", type=int, default=4, help="images per prompt")
  p.add_argument("--steps", type=int, default=None, help="DDIM steps (default: 50 full, 10 tiny)")
  p.add_argument("--guidance", type=float, default=7.5)
  p.add_argument("--batch_size", type=int, default=None, help="images per program (default: all at once)")
  p.add_argument("--num_devices", type=int, default=None)
  p.add_argument("--repeats", type=int, default=3)
  args = p.parse_args()
  steps = args.steps or (50 if args.full else 10)

  t0 = time.perf_counter()
  sd = sd15_random(args.dtype) if args.full else tiny_random(args.dtype)
  build_s = time.perf_counter() - t0
  mesh = parallel.make_mesh(args.num_devices)
  prompts = [f"a photo of the digit {w}" for w in ("one two three four five six seven eight".split() * 8)]
  prompts = prompts[:args.prompts]
  run = lambda seed: G.generate(sd, prompts, num_images_per_prompt=args.n, steps=steps, guidance=args.guidance,
                                seed=seed, mesh=mesh, batch_size=args.batch_size)

  t0 = time.perf_counter()
  images = run(0)
  first_s = time.perf_counter() - t0
  times = []
  for r in range(args.repeats):
    t0 = time.perf_counter()
    run(r + 1)
    times.append(time.perf_counter() - t0)
  num = len(images)
  print(f"model: {sd.source}, dtype {args.dtype}, built in {build_s:.1f}s")
  print(f"devices: {mesh.devices.size} x {jax.devices()[0].device_kind}")
  print(f"{num} images of {images.shape[1]}x{images.shape[2]}, {steps} DDIM steps, guidance {args.guidance}, "
        f"batch {args.batch_size or num}")
  print(f"first call (compile + run): {first_s:.2f}s")
  if not times:
    return
  mean_s = sum(times) / len(times)
  print(f"timed calls: mean {mean_s:.3f}s over {args.repeats} ({min(times):.3f}s best) -> "
        f"{mean_s / num:.4f}s per image, {mean_s / steps * 1e3:.1f}ms per step of the whole batch, "
        f"{num / mean_s:.2f} images/s")


if __name__ == "__main__":
  main()
