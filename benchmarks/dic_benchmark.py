"""Speed of the Diffusion Classifier (`mcti_jax.classify.dic`) against the public DiC code's way.

  python benchmarks/dic_benchmark.py                       # tiny random UNet, CPU, seconds
  python benchmarks/dic_benchmark.py --full --dtype bfloat16 --preset pets --classes 37 --batch_size 64   # GPU

--full builds the SD 1.5-shaped UNet (860M) with random weights, latents of
64x64x4 (512px images) and contexts [K, 77, 768]; no download is needed and
the speed is the real model's (the stage shapes don't depend on the weights).
Only the UNet part is timed: x0 and the contexts are random, as the VAE and
text encoder run once per image / once per run. Prints the first image
(compile + run), then images/s and UNet evaluations/s over the timed images.

Ours runs the [images x classes x new samples] grid of each stage as one
jitted call sharded over the visible devices. The PyTorch reference does what
the public DiC code (eval_prob_adaptive.py) does: image after image, stage
after stage, the [surviving classes x new samples] grid of the stage in
batches of --batch_size through diffusers' UNet2DConditionModel (same config,
random init; cuda if torch sees a GPU, else CPU), errors back to the host
after each batch, then the stage's ranking. Same stages, K, latents and
contexts; both report images/s and UNet evals/s, and the ratio.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

import common
from mcti_jax.runtime import parallel
from mcti_jax.classify import dic
from mcti_jax.models import schedule
from mcti_jax.models.frozen import freeze


def build_unet(full: bool, dtype: str, seed: int = 0):
  """(frozen UNet, its config): SD 1.5's UNet config or the tiny one, random weights."""
  config = common.unet_config(full)
  return freeze(common.jax_unet(config, dtype, seed)), config


def run_torch(config, x0: np.ndarray, contexts: np.ndarray, cfg: dic.DiCConfig, device: str, dtype: str,
              batch_size: int, warmup_images: int) -> dict:
  """The public DiC code's loop on the same latents (NHWC here) and contexts; the first images warm up."""
  import diffusers
  import torch
  import torch.nn.functional as F

  t0 = time.perf_counter()
  unet = common.torch_unet(config, device, dtype)
  build_s = time.perf_counter() - t0
  torch_dtype = common.torch_dtype(dtype)
  scheduler = diffusers.DDPMScheduler.from_config(common.scheduler_config().to_hf())
  abar = scheduler.alphas_cumprod.to(device)
  plan = dic.make_plan(cfg, scheduler.config.num_train_timesteps)
  timesteps = torch.tensor(plan.timesteps, device=device).long()
  contexts = torch.tensor(contexts, device=device, dtype=torch_dtype)
  error_fn = {"l2": F.mse_loss, "l1": F.l1_loss, "huber": F.huber_loss}[cfg.error]
  generator = torch.Generator(device).manual_seed(cfg.seed)
  evals = 0

  @torch.inference_mode()
  def classify_one(latent):  # latent [c, h, w]
    nonlocal evals
    noise = torch.randn((cfg.max_samples, *latent.shape), device=device, generator=generator)
    errors = torch.full((contexts.shape[0], cfg.max_samples), float("nan"))
    candidates = list(range(contexts.shape[0]))
    for keep, new, scored in zip(plan.keep, plan.new, plan.scored):
      classes = torch.tensor(candidates).repeat_interleave(len(new))  # class-major grid, as DiC
      samples = torch.tensor(new).long().repeat(len(candidates))
      for start in range(0, len(classes), batch_size):
        c, j = classes[start:start + batch_size], samples[start:start + batch_size]
        t = timesteps[j.to(device)]
        a = abar[t].view(-1, 1, 1, 1)
        eps = noise[j.to(device)]
        x_t = (a.sqrt() * latent + (1 - a).sqrt() * eps).to(torch_dtype)
        prediction = unet(x_t, t, encoder_hidden_states=contexts[c.to(device)]).sample
        e = error_fn(eps, prediction.float(), reduction="none").mean(dim=(1, 2, 3))
        errors[c, j] = e.cpu()  # as DiC: back to the host after every batch
        evals += len(c)
      means = errors[candidates][:, scored].mean(1)
      candidates = [candidates[i] for i in torch.argsort(means, stable=True)[:keep].tolist()]
    return candidates[0]

  latents = torch.tensor(x0.transpose(0, 3, 1, 2), device=device)
  sync = lambda: common.torch_sync(device)  # noqa: E731
  t0 = time.perf_counter()
  for i in range(warmup_images):
    classify_one(latents[i])
  sync()
  first_s = time.perf_counter() - t0
  evals_before = evals
  t0 = time.perf_counter()
  for i in range(warmup_images, len(latents)):
    classify_one(latents[i])
  sync()
  timed_s = time.perf_counter() - t0
  images, timed_evals = len(latents) - warmup_images, evals - evals_before
  return {"device": common.torch_description(device), "build_s": common.rounded(build_s),
          "batch_size": batch_size, "first_images_s": common.rounded(first_s), "timed_s": common.rounded(timed_s),
          "images_per_s": common.rounded(images / timed_s), "unet_evals_per_image": timed_evals // max(images, 1),
          "unet_evals_per_s": common.rounded(timed_evals / timed_s)}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--full", action="store_true", help="SD1.5-shaped random UNet (use a GPU)")
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="compute and weights")
  p.add_argument("--preset", default=None, help=f"stages of one of {sorted(dic.PRESETS)} (default: tiny, or pets "
                                                "with --full)")
  p.add_argument("--keep", type=int, nargs="+", default=None, help="override the preset's keep")
  p.add_argument("--samples", type=int, nargs="+", default=None, help="override the preset's samples")
  p.add_argument("--classes", type=int, default=None, help="K (default: 10 tiny, 37 full)")
  p.add_argument("--images", type=int, default=4, help="timed images (after one warm-up image)")
  p.add_argument("--batch_size", type=int, default=16, help="UNet batch per device")
  p.add_argument("--images_per_call", type=int, default=1)
  p.add_argument("--num_devices", type=int, default=None)
  p.add_argument("--torch_batch_size", type=int, default=None, help="the reference's UNet batch (default: "
                                                                      "--batch_size)")
  common.add_torch_flags(p)
  common.add_output_flag(p)
  args = p.parse_args(argv)
  torch_device = common.setup_torch(args)

  name = args.preset or ("pets" if args.full else "tiny")
  overrides = {k: tuple(v) for k, v in (("keep", args.keep), ("samples", args.samples)) if v is not None}
  cfg = dic.preset(name, batch_size=args.batch_size, images_per_call=args.images_per_call, **overrides)
  num_classes = args.classes or (37 if args.full else 10)
  mesh = parallel.make_mesh(args.num_devices)

  t0 = time.perf_counter()
  frozen, unet_config = build_unet(args.full, args.dtype)
  build_s = time.perf_counter() - t0
  rng = np.random.default_rng(0)
  contexts = rng.normal(size=(num_classes, 77, unet_config.cross_attention_dim)).astype(np.float32)
  group = cfg.images_per_call
  size = unet_config.sample_size
  x0 = rng.normal(size=(group + args.images, size, size, unet_config.in_channels)).astype(np.float32)
  sched = schedule.NoiseSchedule.from_config(common.scheduler_config())
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
      "benchmark": "diffusion classifier", "model": "SD1.5-shaped random UNet" if args.full else "tiny random UNet",
      "dtype": args.dtype, "classes": num_classes,
      "stages": f"{name}: keep {list(cfg.keep)}, samples {list(cfg.samples)}, error {cfg.error}",
      "timed_images": args.images, "env": common.environment(torch_device),
      "jax": {"devices": f"{mesh.devices.size} x {jax.devices()[0].device_kind}",
              "batch_size_per_device": cfg.batch_size, "images_per_call": cfg.images_per_call,
              "build_s": common.rounded(build_s), "first_images_s (compile + run)": common.rounded(first_s),
              "timed_s": common.rounded(timed_s), "images_per_s": common.rounded(args.images / timed_s),
              "unet_evals_per_image": evals // max(args.images, 1),
              "unet_evals_per_s": common.rounded(evals / timed_s)},
  }
  if torch_device is not None:
    report["torch"] = run_torch(unet_config, x0, contexts, cfg, torch_device, args.dtype,
                                args.torch_batch_size or args.batch_size, warmup_images=group)
    report["speedup_images"] = common.rounded(report["jax"]["images_per_s"] / report["torch"]["images_per_s"], 3)
  common.print_report(report, args.json_out)
  return report


if __name__ == "__main__":
  main()
