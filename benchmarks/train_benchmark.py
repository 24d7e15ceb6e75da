"""Speed of the vectorised TI / MC-TI training step against the one-class-at-a-time PyTorch reference.

  python benchmarks/train_benchmark.py                     # tiny random models, CPU, under a minute
  python benchmarks/train_benchmark.py --mcti              # + the MC-TI regulariser (tiny CLIP)
  python benchmarks/train_benchmark.py --full --dtype bfloat16 --classes 37 --steps 20          # GPU, TI
  python benchmarks/train_benchmark.py --full --dtype bfloat16 --classes 37 --steps 20 --mcti   # GPU, MC-TI

Ours: `mcti_jax.training.step.train_step`, set up as `mcti_jax.training.train` does, one
jitted step that trains all K classes (class axis sharded over the visible
devices). Inputs are synthetic: random VAE latent moments [Kp, N, 1, h, w, 4]
(the cached shots), random CLIP image features, random prompt templates whose
placeholder ids follow the text vocabulary. --full builds SD 1.5's UNet and
text encoder (and with --mcti CLIP ViT-L/14) with random weights: the speed is
the real models'. Reports the compile time, steps/s and class-steps/s
(K x steps/s).

The reference does what the official TI / MC-TI code does, one class at a
time: diffusers' UNet2DConditionModel and transformers' CLIPTextModel (same
configs, random init, torch on cuda if available, else CPU), the class's
embedding row spliced into the prompt, forward + backward of the noise MSE
(with --mcti also the CLIP text feature's cross-entropy against one image
feature of every class) w.r.t. that row, then torch AdamW. Its class-steps/s
is one over the time of one class's step. As diffusers' textual_inversion.py,
the UNet runs in --dtype and the text encoders in float32. (The official
script's AdamW updates the whole embedding table and restores the frozen rows
after each step; updating the one row, as here, is a little faster, so the
speed-up reported is if anything an underestimate.)
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

import common
from mcti_jax.training import class_chunks
from mcti_jax import methods
from mcti_jax.runtime import parallel
from mcti_jax.models import schedule as schedule_lib
from mcti_jax.models.frozen import freeze
from mcti_jax.training.step import (Backbone, ShotData, StepConfig, TrainState, frozen_settings, make_optimizer,
                                    train_step)

LR, WEIGHT_DECAY, SCALE, NUM_TEMPLATES = 5e-4, 1e-2, 10.0, 27


def synthetic_templates(rng: np.random.Generator, vocab_size: int, first_placeholder_id: int, num_vectors: int,
                        bos: int, eos: int, num_templates: int = NUM_TEMPLATES) -> np.ndarray:
  """Token ids [T, 77] like `tokens.template_ids`: BOS, a few words, class 0's placeholder(s) among them, EOS pad."""
  ids = np.full((num_templates, 77), eos, np.int32)
  for i in range(num_templates):
    words = list(rng.integers(0, min(bos, eos), rng.integers(3, 9)))
    at = int(rng.integers(0, len(words) + 1))
    words[at:at] = [first_placeholder_id + v for v in range(num_vectors)]
    ids[i, 0] = bos
    ids[i, 1:1 + len(words)] = words
  return ids


def ids_for_class(template_ids: np.ndarray, first_placeholder_id: int, num_vectors: int, k: int) -> np.ndarray:
  held = (template_ids >= first_placeholder_id) & (template_ids < first_placeholder_id + num_vectors)
  return np.where(held, template_ids + k * num_vectors, template_ids)


# ------------------------------------------------------------------ ours


def build_jax(args, mesh, inputs):
  """(the step jitted at a class chunk, state, data, backbone, template ids), every array placed on the mesh as the
  trainer does."""
  text_cfg, clip_cfg = inputs["text_config"], inputs["clip_config"]
  num_padded = parallel.padded_num_classes(args.classes, mesh)
  # As mcti train: frozen weights in float32, compute in --dtype.
  unet = common.jax_unet(inputs["unet_config"], args.dtype, 0, param_dtype="float32", remat=args.remat)
  text = common.jax_text(text_cfg, args.dtype, 1, param_dtype="float32", eos_token_id=inputs["eos_token_id"])
  clip_model = common.jax_clip(clip_cfg, args.dtype, 2, param_dtype="float32") if args.mcti else None
  backbone = Backbone(text_encoder=freeze(text), unet=freeze(unet),
                      schedule=schedule_lib.NoiseSchedule.from_config(common.scheduler_config()),
                      clip=freeze(clip_model) if clip_model is not None else None,
                      scaling_factor=common.SD_SCALING_FACTOR)
  replicated, by_class = parallel.replicated(mesh), parallel.class_sharding(mesh)
  backbone = jax.device_put(backbone, replicated)

  pad = lambda x: parallel.pad_rows(x, num_padded)  # noqa: E731
  features = pad(inputs["image_features"]) if args.mcti else np.zeros((num_padded, 1, 1, 1), np.float32)
  data = ShotData(class_ids=jax.device_put(np.arange(num_padded, dtype=np.int32), by_class),
                  latent_mean=jax.device_put(pad(inputs["latent_mean"]), by_class),
                  latent_logvar=jax.device_put(pad(inputs["latent_logvar"]), by_class),
                  image_features=jax.device_put(features, replicated),
                  valid=jax.device_put(np.arange(num_padded) < args.classes, replicated))

  optimizer = make_optimizer(LR, WEIGHT_DECAY)
  tokens = jax.device_put(pad(inputs["tokens"]), by_class)
  state = TrainState(step=jnp.zeros((), jnp.int32), tokens=tokens, opt_state=optimizer.init(tokens),
                     key=jax.random.PRNGKey(0))
  shardings = jax.tree.map(lambda x: by_class if x.ndim and x.shape[0] == num_padded else replicated, state)
  state = jax.device_put(state, shardings)
  method = methods.get("mcti" if args.mcti else "ti")
  settings = dict(alpha=1.0, beta=1.0, scale=SCALE) if args.mcti else {}
  cfg = StepConfig(method=method, settings=frozen_settings(settings), first_placeholder_id=inputs["first_placeholder_id"],
                   num_vectors=args.num_vectors, num_train_timesteps=1000, pooling="eos",
                   batch_per_class=args.batch_per_class)
  step_at = lambda chunk: jax.jit(  # noqa: E731
      functools.partial(train_step, cfg=dataclasses.replace(cfg, class_chunk=chunk), optimizer=optimizer, mesh=mesh),
      donate_argnums=(0,), out_shardings=(shardings, replicated))
  template_ids = jax.device_put(inputs["template_ids"], replicated)
  return step_at, state, data, backbone, template_ids


def run_jax(args, mesh, inputs) -> dict:
  t0 = time.perf_counter()
  step_at, state, data, backbone, template_ids = build_jax(args, mesh, inputs)
  build_s = time.perf_counter() - t0
  auto = args.class_chunk == class_chunks.AUTO
  t0 = time.perf_counter()
  lowered = step_at(0 if auto else int(args.class_chunk)).lower(state, data, backbone, template_ids)
  trace_s = time.perf_counter() - t0
  out = {"build_s": common.rounded(build_s), "trace_s": common.rounded(trace_s)}
  if args.trace_only:
    return out
  t0 = time.perf_counter()
  if auto:  # as `mcti train --config.class_chunk=auto`: the largest chunk whose step fits the device
    limit = class_chunks.device_memory(mesh.local_devices)
    if limit is None:
      raise SystemExit("--class_chunk auto needs a backend that reports its memory (a GPU or TPU)")
    per_device = parallel.padded_num_classes(args.classes, mesh) // mesh.devices.size
    chunk, compiled = class_chunks.choose(lambda c: step_at(c).lower(state, data, backbone, template_ids).compile(),
                                          per_device, limit)
    out.update(class_chunk=chunk, device_bytes_limit_gb=common.rounded(limit / 2**30))
  else:
    compiled = lowered.compile()
    out["class_chunk"] = int(args.class_chunk)
  out["compile_s"] = common.rounded(time.perf_counter() - t0)
  out["step_need_gb"] = common.rounded(class_chunks.need(compiled) / 2**30)
  t0 = time.perf_counter()
  state, metrics = compiled(state, data, backbone, template_ids)  # warm-up
  common.block(state)
  out["first_step_s"] = common.rounded(time.perf_counter() - t0)
  t0 = time.perf_counter()
  for _ in range(args.steps):
    state, metrics = compiled(state, data, backbone, template_ids)
  common.block(state)
  seconds = time.perf_counter() - t0
  metrics = jax.device_get(metrics)
  steps_per_s = args.steps / seconds
  peak = [(d.memory_stats() or {}).get("peak_bytes_in_use") for d in mesh.local_devices]
  if all(p is not None for p in peak):
    out["peak_device_gb"] = common.rounded(max(peak) / 2**30)
  out.update(timed_steps=args.steps, timed_s=common.rounded(seconds), steps_per_s=common.rounded(steps_per_s),
             class_steps_per_s=common.rounded(args.classes * steps_per_s),
             **{f"last_{name}": common.rounded(float(metrics[name])) for name in ("mse", "reg") if name in metrics})
  return out


# ------------------------------------------------------------------ the PyTorch reference


def run_torch(args, inputs, device: str) -> dict:
  import diffusers
  import torch
  import torch.nn.functional as F

  v = args.num_vectors
  t0 = time.perf_counter()
  unet = common.torch_unet(inputs["unet_config"], device, args.dtype)
  text = common.torch_text(inputs["text_config"], device, "float32")
  clip_text = (common.torch_text(inputs["clip_config"].text_config, device, "float32", projection=True)
               if args.mcti else None)
  scheduler = diffusers.DDPMScheduler.from_config(common.scheduler_config().to_hf())
  scheduler.alphas_cumprod = scheduler.alphas_cumprod.to(device)

  class Spliced(torch.nn.Module):
    """The frozen token table, with the ids of the class being trained replaced by its learnable rows."""

    def __init__(self, table: torch.nn.Embedding):
      super().__init__()
      self.table, self.first_id, self.rows = table, 0, None

    def forward(self, input_ids):
      base = self.table(input_ids.clamp(max=self.table.num_embeddings - 1))
      offset = input_ids - self.first_id
      held = (offset >= 0) & (offset < v)
      learned = self.rows[offset.clamp(0, v - 1)].to(base.dtype)
      return torch.where(held[..., None], learned, base)

  towers = [text] + ([clip_text] if clip_text is not None else [])
  spliced = [Spliced(tower.get_input_embeddings()) for tower in towers]
  for tower, s in zip(towers, spliced):
    tower.set_input_embeddings(s)

  k_classes, first = args.classes, inputs["first_placeholder_id"]
  rows = [torch.nn.Parameter(torch.tensor(inputs["tokens"][k], device=device)) for k in range(k_classes)]
  optimizers = [torch.optim.AdamW([r], lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=WEIGHT_DECAY)
                for r in rows]
  as_torch = lambda x: torch.tensor(x, device=device)  # noqa: E731
  latent_mean = as_torch(inputs["latent_mean"][:, :, 0].transpose(0, 1, 4, 2, 3))  # [K, N, c, h, w]
  latent_logvar = as_torch(inputs["latent_logvar"][:, :, 0].transpose(0, 1, 4, 2, 3))
  features = as_torch(inputs["image_features"][:, :, 0])  # [K, N, P]
  templates = inputs["template_ids"]
  class_ids = [as_torch(ids_for_class(templates, first, v, k)).long() for k in range(k_classes)]
  unet_dtype = common.torch_dtype(args.dtype)
  build_s = time.perf_counter() - t0

  def one_class_step(k: int):
    """One step of class k's own training run (what the official code does K times, one run per class)."""
    b, num_shots = args.batch_per_class, latent_mean.shape[1]
    for s in spliced:
      s.first_id, s.rows = first + k * v, rows[k]
    shots = torch.randint(0, num_shots, (b,), device=device)
    latents = (latent_mean[k, shots] + torch.exp(0.5 * latent_logvar[k, shots]) *
               torch.randn_like(latent_mean[k, shots])) * common.SD_SCALING_FACTOR
    noise = torch.randn_like(latents)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (b,), device=device)
    noisy = scheduler.add_noise(latents, noise, t)
    ids = class_ids[k][torch.randint(0, len(templates), (b,), device=device)]
    hidden = text(ids)[0].to(unet_dtype)
    prediction = unet(noisy.to(unet_dtype), t, hidden).sample
    loss = F.mse_loss(prediction.float(), noise.float())
    if clip_text is not None:
      g = F.normalize(clip_text(ids).text_embeds.float(), dim=-1)
      f = F.normalize(features[torch.arange(k_classes, device=device),
                               torch.randint(0, features.shape[1], (k_classes,), device=device)], dim=-1)
      target = torch.full((b,), k, device=device)
      loss = loss + F.cross_entropy(SCALE * g @ f.T, target)
    loss.backward()
    optimizers[k].step()
    optimizers[k].zero_grad(set_to_none=True)
    return loss

  sync = lambda: common.torch_sync(device)  # noqa: E731
  out = {"device": common.torch_description(device), "build_s": common.rounded(build_s)}
  if args.trace_only:
    return out
  t0 = time.perf_counter()
  for k in range(min(2, k_classes)):  # warm-up (cuDNN / allocator)
    one_class_step(k)
  sync()
  out["warmup_s"] = common.rounded(time.perf_counter() - t0)
  steps = args.torch_steps or args.steps
  t0 = time.perf_counter()
  for s in range(steps):
    loss = one_class_step(s % k_classes)
  sync()
  seconds = time.perf_counter() - t0
  out.update(timed_class_steps=steps, timed_s=common.rounded(seconds),
             class_steps_per_s=common.rounded(steps / seconds), last_loss=common.rounded(float(loss.detach())))
  return out


# ------------------------------------------------------------------ main


def make_inputs(args) -> dict:
  """The synthetic inputs both implementations share (numpy)."""
  full = args.full
  text_cfg = common.sd_text_config(full)
  clip_cfg = common.clip_config(full)
  unet_cfg = common.unet_config(full)
  if text_cfg.hidden_size != unet_cfg.cross_attention_dim or text_cfg.hidden_size != clip_cfg.text_config.hidden_size:
    raise ValueError("the text towers and the UNet's cross-attention must have one width")
  rng = np.random.default_rng(0)
  k, n, size, width = args.classes, args.shots, unet_cfg.sample_size, text_cfg.hidden_size
  first = text_cfg.vocab_size  # placeholders follow the vocabulary, as added tokens do
  eos = text_cfg.vocab_size - 1  # <|endoftext|>, last in a CLIP vocabulary (SD 1.5's legacy config does not say it)
  latent_shape = (k, n, 1, size, size, unet_cfg.in_channels)
  return {
      "unet_config": unet_cfg, "text_config": text_cfg, "clip_config": clip_cfg, "first_placeholder_id": first,
      "eos_token_id": eos,
      "template_ids": synthetic_templates(rng, text_cfg.vocab_size, first, args.num_vectors,
                                          bos=text_cfg.vocab_size - 2, eos=eos),
      "latent_mean": rng.normal(size=latent_shape).astype(np.float32),
      "latent_logvar": rng.normal(-4.0, 0.5, size=latent_shape).astype(np.float32),
      "image_features": rng.normal(size=(k, n, 1, clip_cfg.projection_dim)).astype(np.float32),
      "tokens": rng.normal(0.0, 0.02, size=(k, args.num_vectors, width)).astype(np.float32),
  }


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--full", action="store_true", help="SD1.5-shaped UNet + text encoder (+ CLIP ViT-L/14); use a GPU")
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="compute dtype")
  p.add_argument("--classes", type=int, default=None, help="K (default: 37 full, 8 tiny)")
  p.add_argument("--steps", type=int, default=None, help="timed steps after one warm-up (default: 10)")
  p.add_argument("--torch_steps", type=int, default=None, help="timed one-class torch steps (default: --steps)")
  p.add_argument("--mcti", action="store_true", help="the MC-TI phase: add the CLIP regulariser")
  p.add_argument("--remat", action="store_true", help="gradient checkpointing in our UNet")
  p.add_argument("--batch_per_class", type=int, default=1)
  p.add_argument("--num_vectors", type=int, default=1, help="token vectors per class")
  p.add_argument("--shots", type=int, default=16, help="cached shots per class")
  p.add_argument("--num_devices", type=int, default=None, help="devices of the class mesh (default: all)")
  p.add_argument("--class_chunk", default="0", help="classes per pass on a device: 0 (all at once), N, or auto")
  common.add_torch_flags(p)
  p.add_argument("--trace_only", action="store_true", help="build and trace, run nothing (checks --full on a CPU)")
  common.add_output_flag(p)
  args = p.parse_args(argv)
  args.classes = args.classes or (37 if args.full else 8)
  args.steps = args.steps or 10
  if args.class_chunk != class_chunks.AUTO and not args.class_chunk.isdigit():
    p.error(f"--class_chunk {args.class_chunk!r}: a whole number of classes per pass (0: all at once) or auto")

  torch_device = common.setup_torch(args)
  mesh = parallel.make_mesh(args.num_devices)
  inputs = make_inputs(args)
  report = {
      "benchmark": "train step (MC-TI phase)" if args.mcti else "train step (TI phase)",
      "model": "SD1.5-shaped random" + (" + CLIP ViT-L/14" if args.mcti else "") if args.full else "tiny random",
      "dtype": args.dtype, "classes": args.classes, "padded_classes": parallel.padded_num_classes(args.classes, mesh),
      "batch_per_class": args.batch_per_class, "num_vectors": args.num_vectors, "remat": args.remat,
      "mesh_devices": int(mesh.devices.size),
      "env": common.environment(torch_device),
  }
  report["jax"] = run_jax(args, mesh, inputs)
  if torch_device is not None:
    report["torch"] = run_torch(args, inputs, torch_device)
    if not args.trace_only:
      report["speedup_class_steps"] = common.rounded(
          report["jax"]["class_steps_per_s"] / report["torch"]["class_steps_per_s"], 3)
  common.print_report(report, args.json_out)
  return report


if __name__ == "__main__":
  main()
