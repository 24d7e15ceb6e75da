"""What the benchmarks share: SD 1.5-shaped and tiny configs, random torch twins, timing, the report.

Speed does not depend on the weight values, so every benchmark builds random
models: ours with `mcti_jax.models.init.create`, the PyTorch reference with
diffusers/transformers from the SAME configs (`to_hf()`), on cuda when torch
sees a GPU, else on the CPU. torch, diffusers and transformers are test-only
dependencies; only the benchmarks and tests import them.

Run the benchmarks as scripts (`python benchmarks/<name>.py`), so that
`import common` finds this file.
"""

from __future__ import annotations

import datetime
import json
import platform
import time
from collections.abc import Callable

import jax
import numpy as np
from flax import nnx

from mcti_jax.models import attention, clip, init, pipeline, schedule, unet, vae
from mcti_jax.tiny import checkpoints as tiny_checkpoints

TINY_VOCAB = 64  # the tiny text towers' vocabulary when no tokenizer is involved
SD_SCALING_FACTOR = 0.18215


# ------------------------------------------------------------------ configs


def unet_config(full: bool) -> unet.UNetConfig:
  """SD 1.5's UNet (860M; 64x64x4 latents of 512px images) or the tiny one."""
  return unet.UNetConfig(sample_size=64, cross_attention_dim=768) if full else tiny_checkpoints.unet_config()


def vae_config(full: bool) -> vae.VAEConfig:
  if not full:
    return tiny_checkpoints.vae_config()
  return vae.VAEConfig(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                       up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, sample_size=512,
                       scaling_factor=SD_SCALING_FACTOR)


def sd_text_config(full: bool, vocab_size: int = TINY_VOCAB) -> clip.CLIPTextConfig:
  """SD 1.5's text encoder (the CLIP ViT-L/14 text tower, legacy eos_token_id=2) or the tiny one."""
  if not full:
    return tiny_checkpoints.clip_config(vocab_size).text_config
  return clip.CLIPTextConfig(hidden_size=768, intermediate_size=3072, projection_dim=768, num_attention_heads=12,
                             eos_token_id=2)


def clip_config(full: bool, vocab_size: int = TINY_VOCAB) -> clip.CLIPConfig:
  """CLIP ViT-L/14 (openai/clip-vit-large-patch14), MC-TI's regulariser, or the tiny CLIP."""
  if not full:
    return tiny_checkpoints.clip_config(vocab_size)
  text = clip.CLIPTextConfig(hidden_size=768, intermediate_size=3072, projection_dim=768, num_attention_heads=12)
  vision = clip.CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, projection_dim=768, num_hidden_layers=24,
                                 num_attention_heads=16, image_size=224, patch_size=14)
  return clip.CLIPConfig(text_config=text, vision_config=vision, projection_dim=768)


def scheduler_config() -> schedule.SchedulerConfig:
  return tiny_checkpoints.scheduler_config()  # SD 1.5's training schedule; the tiny models use it too


# ------------------------------------------------------------------ our models


def create(build: Callable[[], nnx.Module], seed: int, abstract: bool = False) -> nnx.Module:
  """Random weights, or with `abstract` only their shapes and dtypes (`nnx.eval_shape`: nothing is allocated)."""
  return nnx.eval_shape(build) if abstract else init.create(build, seed)


def jax_unet(config: unet.UNetConfig, dtype: str, seed: int = 0, *, param_dtype: str | None = None,
             remat: bool = False, abstract: bool = False) -> unet.UNet2DConditionModel:
  kw = dict(dtype=pipeline.dtype_of(dtype), param_dtype=pipeline.dtype_of(param_dtype or dtype))
  return create(lambda: unet.UNet2DConditionModel(config, remat=remat, rngs=nnx.Rngs(0), **kw), seed, abstract)


def jax_vae(config: vae.VAEConfig, dtype: str, seed: int = 0) -> vae.AutoencoderKL:
  kw = dict(dtype=pipeline.dtype_of(dtype), param_dtype=pipeline.dtype_of(dtype))
  return init.create(lambda: vae.AutoencoderKL(config, rngs=nnx.Rngs(0), **kw), seed)


def jax_text(config: clip.CLIPTextConfig, dtype: str, seed: int = 0, *, param_dtype: str | None = None,
             eos_token_id: int | None = None, abstract: bool = False) -> clip.CLIPTextModel:
  """`eos_token_id`: the tokenizer's EOS, which SD 1.5's legacy config does not give (clip.py's "Pooling trap")."""
  kw = dict(dtype=pipeline.dtype_of(dtype), param_dtype=pipeline.dtype_of(param_dtype or dtype))
  return create(lambda: clip.CLIPTextModel(config, eos_token_id=eos_token_id, rngs=nnx.Rngs(0), **kw), seed,
                abstract)


def jax_clip(config: clip.CLIPConfig, dtype: str, seed: int = 0, *, param_dtype: str | None = None,
             abstract: bool = False) -> clip.CLIPModel:
  kw = dict(dtype=pipeline.dtype_of(dtype), param_dtype=pipeline.dtype_of(param_dtype or dtype))
  return create(lambda: clip.CLIPModel(config, rngs=nnx.Rngs(0), **kw), seed, abstract)


# ------------------------------------------------------------------ torch twins


def add_torch_flags(parser) -> None:
  parser.add_argument("--no_torch", action="store_true", help="skip the PyTorch reference")
  parser.add_argument("--torch_threads", type=int, default=None,
                      help="torch CPU threads (default: torch's choice). On a busy CPU, 1 is much faster for the "
                           "tiny shapes: torch's thread pool spins against other processes")


def setup_torch(args) -> str | None:
  """The torch device of the reference (None with --no_torch), after applying --torch_threads."""
  if args.no_torch:
    return None
  import torch
  if args.torch_threads:
    torch.set_num_threads(args.torch_threads)
  return torch_device()


def torch_device() -> str:
  import torch
  return "cuda" if torch.cuda.is_available() else "cpu"


def torch_dtype(name: str):
  import torch
  return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def torch_sync(device: str) -> None:
  import torch
  if device == "cuda":
    torch.cuda.synchronize()


def _frozen(module, device: str, dtype: str):
  import diffusers
  diffusers.utils.logging.set_verbosity_error()  # not the "modules to keep in float32: []" note on every cast
  module = module.to(device=device, dtype=torch_dtype(dtype)).eval()
  module.requires_grad_(False)
  return module


def torch_unet(config: unet.UNetConfig, device: str, dtype: str):
  """diffusers' UNet2DConditionModel on the same config, torch's default random init, frozen."""
  import diffusers
  return _frozen(diffusers.UNet2DConditionModel.from_config(config.to_hf()), device, dtype)


def torch_vae(config: vae.VAEConfig, device: str, dtype: str):
  import diffusers
  return _frozen(diffusers.AutoencoderKL.from_config(config.to_hf()), device, dtype)


def torch_text(config: clip.CLIPTextConfig, device: str, dtype: str, *, projection: bool = False):
  """transformers' CLIPTextModel (or CLIPTextModelWithProjection: MC-TI's text feature) on the same config."""
  import transformers
  hf = {k: v for k, v in config.to_hf().items() if k not in ("architectures", "model_type")}
  cls = transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel
  return _frozen(cls(transformers.CLIPTextConfig(**hf)), device, dtype)


def torch_description(device: str) -> str:
  import torch
  if device == "cuda":
    return f"cuda: {torch.cuda.get_device_name(0)}"
  return f"cpu ({torch.get_num_threads()} threads)"


# ------------------------------------------------------------------ timing and reports


def timed(fn: Callable[[], object], repeats: int, sync: Callable[[], None] = lambda: None) -> list[float]:
  """Wall seconds of `repeats` calls of fn, each synchronised (`sync` for torch; fn blocks for JAX)."""
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    sync()
    times.append(time.perf_counter() - t0)
  return times


def block(tree) -> None:
  jax.block_until_ready(tree)


def environment(torch_device_name: str | None) -> dict[str, object]:
  """Where the numbers come from: record these with the results."""
  devices = jax.devices()
  env = {"date": datetime.date.today().isoformat(), "host": platform.node(), "jax": jax.__version__,
         "jax_devices": f"{len(devices)} x {devices[0].device_kind} ({devices[0].platform})",
         "attention": f"MCTI_ATTENTION={attention.implementation()}"}
  if torch_device_name is not None:
    import diffusers
    import torch
    import transformers
    env.update(torch=torch.__version__, diffusers=diffusers.__version__, transformers=transformers.__version__,
               torch_device=torch_description(torch_device_name))
    if torch_device_name == "cpu" and devices[0].platform != "cpu":
      env["warning"] = ("the PyTorch reference ran on the CPU while ours ran on "
                        f"{devices[0].platform}: install a CUDA build of torch, the ratio is not comparable")
  return env


def rounded(x: float, digits: int = 4) -> float:
  """A few significant digits, however small x is."""
  return float(f"{x:.{digits}g}") if np.isfinite(x) else x


def add_output_flag(parser) -> None:
  parser.add_argument("--json_out", default=None, help="also append the report, as one JSON line, to this file")


def print_report(report: dict, json_out: str | None = None) -> None:
  print(json.dumps(report, indent=1, default=str))
  if json_out:
    with open(json_out, "a") as f:
      f.write(json.dumps(report, default=str) + "\n")
