"""Speed of the Diffusion Classifier (`mcti_jax.classify.diffusion_classifier`), sharded over the visible devices.

  python benchmarks/dic_benchmark.py                       # tiny random UNet, CPU, seconds
  python benchmarks/dic_benchmark.py --full --dtype bfloat16 --preset pets --classes 37 --batch_size 64   # GPU

--full builds the SD 1.5-shaped UNet (860M) with random weights, latents of
64x64x4 (512px images) and contexts [K, 77, 768]; no download is needed and
the speed is the real model's (the stage shapes don't depend on the weights).
Only the UNet part is timed: x0 and the contexts are random, as the VAE and
text encoder run once per image / once per run. Prints the first image
(compile + run), then images/s and UNet evaluations/s over the timed images.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import numpy as np
from flax import nnx

from mcti_jax import parallel
from mcti_jax.classify import diffusion_classifier as dic
from mcti_jax.models import init, pipeline, schedule, tiny, unet
from mcti_jax.models.frozen import freeze


def build_unet(full: bool, dtype: str, seed: int = 0):
  """(frozen UNet, latent shape, context width): SD 1.5's UNet config or the tiny one, random weights."""
  kw = dict(dtype=pipeline.dtype_of(dtype), param_dtype=pipeline.dtype_of(dtype))
  config = unet.UNetConfig(sample_size=64, cross_attention_dim=768) if full else tiny.unet_config()
  model = init.create(lambda: unet.UNet2DConditionModel(config, rngs=nnx.Rngs(0), **kw), seed)
  size = config.sample_size
  return freeze(model), (size, size, config.in_channels), config.cross_attention_dim


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--full", action="store_true", help="SD1.5-shaped random UNet (use a GPU)")
  p.add_argument("--dtype", default="float32", help="float32 or bfloat16 (compute and weights)")
  p.add_argument("--preset", default=None, help=f"stages of one of {sorted(dic.PRESETS)} (default: tiny, or pets "
                                                "with --full)")
  p.add_argument("--keep", type=int, nargs="+", default=None, help="override the preset's keep")
  p.add_argument("--samples", type=int, nargs="+", default=None, help="override the preset's samples")
  p.add_argument("--classes", type=int, default=None, help="K (default: 10 tiny, 37 full)")
  p.add_argument("--images", type=int, default=4, help="timed images (after one warm-up image)")
  p.add_argument("--batch_size", type=int, default=16, help="UNet batch per device")
  p.add_argument("--images_per_call", type=int, default=1)
  p.add_argument("--num_devices", type=int, default=None)
  args = p.parse_args(argv)

  name = args.preset or ("pets" if args.full else "tiny")
  overrides = {k: tuple(v) for k, v in (("keep", args.keep), ("samples", args.samples)) if v is not None}
  cfg = dic.preset(name, batch_size=args.batch_size, images_per_call=args.images_per_call, **overrides)
  num_classes = args.classes or (37 if args.full else 10)
  mesh = parallel.make_mesh(args.num_devices)

  t0 = time.perf_counter()
  frozen, latent_shape, width = build_unet(args.full, args.dtype)
  build_s = time.perf_counter() - t0
  rng = np.random.default_rng(0)
  contexts = rng.normal(size=(num_classes, 77, width)).astype(np.float32)
  group = cfg.images_per_call
  x0 = rng.normal(size=(group + args.images, *latent_shape)).astype(np.float32)
  sched = schedule.NoiseSchedule.from_config(tiny.scheduler_config())
  scorer = dic.Scorer(frozen, sched, contexts, cfg, mesh)
  classify = lambda rows: dic.classify(None, sched, contexts, x0[rows], rows, cfg, mesh, scorer=scorer)

  t0 = time.perf_counter()
  classify(np.arange(group))  # warm-up: compiles one program per stage
  first_s = time.perf_counter() - t0
  evals_before = scorer.unet_evals
  t0 = time.perf_counter()
  classify(np.arange(group, group + args.images))
  timed_s = time.perf_counter() - t0
  evals = scorer.unet_evals - evals_before

  report = {
      "model": "SD1.5-shaped random UNet" if args.full else "tiny random UNet", "dtype": args.dtype,
      "devices": f"{mesh.devices.size} x {jax.devices()[0].device_kind}", "classes": num_classes,
      "keep": cfg.keep, "samples": cfg.samples, "batch_size_per_device": cfg.batch_size,
      "images_per_call": cfg.images_per_call, "build_s": round(build_s, 2),
      "first_images_s (compile + run)": round(first_s, 2), "timed_images": args.images,
      "timed_s": round(timed_s, 3), "images_per_s": round(args.images / timed_s, 4),
      "unet_evals_per_image": evals // max(args.images, 1), "unet_evals_per_s": round(evals / timed_s, 1),
  }
  print(json.dumps(report, indent=1))
  return report


if __name__ == "__main__":
  main()
