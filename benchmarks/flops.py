"""Count before you time: XLA's FLOPs and memory of the training step and the DiC scoring call, against the floor.

  JAX_PLATFORMS=cpu python benchmarks/flops.py            # SD 1.5 shapes: ~10 min on 2 cores, 1.4 GB of RAM
  JAX_PLATFORMS=cpu python benchmarks/flops.py --tiny     # the tiny configs: a few minutes (the compiles)

Nothing is allocated or executed: the weights are abstract (`nnx.eval_shape`,
SD 1.5's UNet 860M on 64x64x4 latents, the CLIP ViT-L/14 text tower as SD's
text encoder, the full CLIP ViT-L/14 for MC-TI), every program is
`jax.jit(...).lower(abstract args).compile()`d for the CPU backend, one
device, bfloat16 compute with float32 weights (as `mcti train` with
model.dtype bfloat16), and read with `compiled.cost_analysis()` (FLOPs, bytes
accessed) and `compiled.memory_analysis()` (argument, output, temp, code).

Programs: the plain UNet forward and the text encoder forward (to check the
hand count below), `mcti_jax.training.step.train_step` for TI and for MC-TI with
the text encoder shared with CLIP (`Backbone.text_shared`: the CLIP text
feature is CLIP's text_projection of the text encoder's pooled output) and
without (a second CLIP text pass), each at two class counts K (batch 1 per
class), so the cost of one class-sample is their difference; and the
Diffusion Classifier's jitted scorer on one chunk of B UNet evaluations.

The floor is counted by hand from the configs (`unet_flops`, `text_flops`):
convolutions 2*k*k*Cin*Cout*H*W, linears 2*in*out*tokens, attention's QK^T and
AV 2*T*S*inner each. Norms, softmax, activations, residual adds and dtype
casts are elementwise and left out (XLA counts them: that is most of the gap
between XLA's count and the hand count). The backward of a step needs only
input gradients (the weights are frozen): for each linear or conv after the
first use of the trained tokens, one more forward's worth (dx = dy W^T), for
attention's two matmuls four (dQ, dK, dP, dV). Ops that the tokens do not
reach (the UNet's time embedding, conv_in, the first ResNet and the first
self-attention, up to the first cross-attention's keys and values) need no
backward, and JAX computes none. The training floor per class-sample is then
UNet forward + that backward + text encoder forward + its backward (+ a second
text pass for MC-TI without a shared text encoder); the DiC floor per
evaluation is one UNet forward.

XLA's optimized HLO (`compiled.as_text()`) is also read: its dot and
convolution FLOPs (checked against the hand count), split into forward and
backward (`transpose(` in the op's name), and any backward dot / convolution
whose result has a frozen kernel's shape (a weight gradient: there must be
none).

Memory: the fixed part (weights and other arguments, the temp of K classes
less K x the per-class temp) and the per-class part (the difference of two
K's), and per device size the largest K with fixed + K x per-class <= size.
On the CPU, XLA's attention materialises the [heads, T, S] scores (4096 x
4096 per head at 64x64) and keeps float32 copies of them for the backward;
cuDNN's / Pallas' flash kernels on GPU / TPU keep only per-row statistics.
`score_bytes` counts those buffers by hand, and the "flash (estimate)"
columns take them off. XLA:CPU also runs bfloat16 dots in float32 (float32
copies of the rounded weights and activations), so every memory figure here
is an upper bound for a GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import inspect
import json
import os
import re
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np

import common
from mcti_jax import methods
from mcti_jax.runtime import parallel
from mcti_jax.models import schedule as schedule_lib
from mcti_jax.models.frozen import Frozen, freeze
from mcti_jax.training.step import (Backbone, ShotData, StepConfig, TrainState, frozen_settings, make_optimizer,
                                    train_step)

GB = 1e9
TEXT_LENGTH = 77
SHOTS = 16  # cached shots per class (their latents are per-class arguments)
DEVICE_GB = (16, 24, 32, 80, 141)
TARGETS = {"step_over_floor": 1.15, "dic_over_forward": 1.05, "mcti_shared_over_ti": 1.02}
LR, WEIGHT_DECAY, SCALE, NUM_TEMPLATES = 5e-4, 1e-2, 10.0, 27  # as train_benchmark.py


# ------------------------------------------------------------------ the hand count


@dataclasses.dataclass
class Tally:
  """A hand FLOP count of one forward pass, and of the input-gradient backward of the ops past `grad`.

  `grad` turns on at the first op that sees the trained input (the text context
  in the UNet, the token embeddings in a text tower); ops before it need no
  backward. Attention score elements ([heads, T, S] per layer) that the
  backward needs are tallied too, for the memory estimate.
  """
  matmul: float = 0.0  # linears and convolutions
  attention: float = 0.0  # QK^T and AV
  backward: float = 0.0
  backward_attention: float = 0.0  # the part of `backward` that is attention's
  grad: bool = False
  score_elements: float = 0.0  # sum over the attention layers past `grad` of heads * T * S
  largest_scores: float = 0.0  # the largest such layer
  valid_taps: bool = False  # count only a conv's taps inside the image, as XLA does (not the zero padding)

  @property
  def forward(self) -> float:
    return self.matmul + self.attention

  def linear(self, n_in: int, n_out: int, tokens: int, grad: bool | None = None) -> None:
    self._add(2.0 * n_in * n_out * tokens, self.grad if grad is None else grad)

  def conv(self, kernel: int, c_in: int, c_out: int, size: int, stride: int = 1) -> None:
    """A square kernel on a size x size input, zero-padded by (kernel - 1) // 2 on each side."""
    pad = (kernel - 1) // 2
    outputs = range((size + 2 * pad - kernel) // stride + 1)
    if self.valid_taps:
      taps = sum(min(size, o * stride - pad + kernel) - max(0, o * stride - pad) for o in outputs)
    else:
      taps = len(outputs) * kernel
    self._add(2.0 * taps * taps * c_in * c_out, self.grad)

  def attend(self, heads: int, t: int, s: int, inner: int) -> None:
    """softmax(Q K^T) V over T queries and S keys: two matmuls; their backward is four."""
    flops = 2 * (2.0 * t * s * inner)
    self.attention += flops
    if self.grad:
      self.backward += 2 * flops
      self.backward_attention += 2 * flops
      self.score_elements += heads * t * s
      self.largest_scores = max(self.largest_scores, heads * t * s)

  def _add(self, flops: float, grad: bool) -> None:
    self.matmul += flops
    if grad:
      self.backward += flops


def _resnet(tally: Tally, c_in: int, c_out: int, time_dim: int, size: int) -> None:
  tally.conv(3, c_in, c_out, size)
  tally.linear(time_dim, c_out, 1, grad=False)  # the time embedding does not depend on the tokens
  tally.conv(3, c_out, c_out, size)
  if c_in != c_out:
    tally.conv(1, c_in, c_out, size)


def _transformer(tally: Tally, channels: int, heads: int, size: int, context_dim: int, context_len: int,
                 layers: int) -> None:
  """Transformer2DModel: proj_in, blocks of self-attention, cross-attention, GEGLU feed-forward; proj_out."""
  c, n = channels, size * size
  tally.linear(c, c, n)  # proj_in (a 1x1 conv or a linear: the same matmul)
  for _ in range(layers):
    for _ in range(4):  # attn1: q, k, v, out
      tally.linear(c, c, n)
    tally.attend(heads, n, n, c)
    tally.linear(c, c, n)  # attn2's query (of the image tokens)
    tally.linear(context_dim, c, context_len, grad=True)  # keys and values of the text context: grad from here on
    tally.linear(context_dim, c, context_len, grad=True)
    tally.grad = True
    tally.attend(heads, n, context_len, c)
    tally.linear(c, c, n)  # attn2's out
    tally.linear(c, 8 * c, n)  # GEGLU: value and gate
    tally.linear(4 * c, c, n)
  tally.linear(c, c, n)  # proj_out


def unet_flops(config, context_len: int = TEXT_LENGTH, valid_taps: bool = False) -> Tally:
  """One UNet forward at batch 1 (the config's sample size), walked as UNet2DConditionModel builds it."""
  tally = Tally(valid_taps=valid_taps)
  channels, heads, layers = config.block_out_channels, config.num_heads, config.layers
  n, time_dim = len(channels), 4 * channels[0]
  attn = functools.partial(_transformer, context_dim=config.cross_attention_dim, context_len=context_len,
                           layers=config.transformer_layers_per_block)
  size = config.sample_size
  tally.linear(channels[0], time_dim, 1)  # time embedding
  tally.linear(time_dim, time_dim, 1)
  tally.conv(config.conv_in_kernel, config.in_channels, channels[0], size)
  skips, c = [channels[0]], channels[0]
  for i, kind in enumerate(config.down_block_types):
    for j in range(layers[i]):
      _resnet(tally, c, channels[i], time_dim, size)
      c = channels[i]
      if kind == "CrossAttnDownBlock2D":
        attn(tally, c, heads[i], size)
      skips.append(c)
    if i < n - 1:
      tally.conv(3, c, c, size, stride=2)
      size = (size + 1) // 2
      skips.append(c)
  _resnet(tally, c, c, time_dim, size)
  attn(tally, c, heads[-1], size)
  _resnet(tally, c, c, time_dim, size)
  for i, kind in enumerate(config.up_block_types):
    out = channels[::-1][i]
    for _ in range(layers[::-1][i] + 1):
      _resnet(tally, c + skips.pop(), out, time_dim, size)
      c = out
      if kind == "CrossAttnUpBlock2D":
        attn(tally, c, heads[::-1][i], size)
    if i < n - 1:
      size *= 2
      tally.conv(3, c, c, size)
  tally.conv(config.conv_out_kernel, channels[0], config.out_channels, size)
  return tally


def text_flops(config, length: int = TEXT_LENGTH, projection: bool = False) -> Tally:
  """One CLIP text tower forward of one prompt; the trained tokens enter at the embeddings (all of it has grad).

  The causal mask does not save work: XLA computes all T x T scores and masks them.
  """
  tally = Tally(grad=True)
  d, inner = config.hidden_size, config.intermediate_size
  for _ in range(config.num_hidden_layers):
    for _ in range(4):  # q, k, v, out
      tally.linear(d, d, length)
    tally.attend(config.num_attention_heads, length, length, d)
    tally.linear(d, inner, length)
    tally.linear(inner, d, length)
  if projection:
    tally.linear(d, config.projection_dim, 1)
  return tally


def floors(unet_config, text_config, clip_config) -> dict[str, float]:
  """Hand FLOPs: UNet and text forwards, the training floor per class-sample of each step, the DiC floor.

  `<step>_backward_matmul`: the floor's backward of linears and convolutions alone (attention's is not in it).
  """
  unet, text = unet_flops(unet_config), text_flops(text_config)
  clip_text = text_flops(clip_config.text_config, projection=True)
  ti = unet.forward + unet.backward + text.forward + text.backward
  ti_backward = unet.backward - unet.backward_attention + text.backward - text.backward_attention
  projection = 2.0 * clip_config.text_config.hidden_size * clip_config.projection_dim  # CLIP's text_projection
  return {"unet_forward": unet.forward, "unet_backward": unet.backward, "unet_forward_matmul": unet.matmul,
          "unet_forward_valid_taps": unet_flops(unet_config, valid_taps=True).forward,
          "unet_forward_attention": unet.attention, "text_forward": text.forward, "text_backward": text.backward,
          "ti_step": ti, "ti_backward_matmul": ti_backward,
          "mcti_shared_step": ti + 2 * projection, "mcti_shared_backward_matmul": ti_backward + projection,
          "mcti_step": ti + clip_text.forward + clip_text.backward,  # clip_text has the projection
          "mcti_backward_matmul": ti_backward + clip_text.backward - clip_text.backward_attention,
          "dic_eval": unet.forward}


def score_bytes(unet_config) -> dict[str, float]:
  """By hand: the attention score buffers per sample of the step's UNet that a flash kernel would not hold.

  For every attention layer past the first use of the context, XLA:CPU keeps three float32 [heads, T, S]
  buffers for the backward (at the peak of the SD 1.5 TI step's buffer assignment: 14 float32 [8, 4096, 4096]
  for the four 64x64 layers, 7.5 GB, and 16 [8, 1024, 1024] for the 32x32 ones), and the backward of the largest
  layer holds two more (dP, dS). cuDNN's and Pallas' flash kernels keep per-row statistics only.
  """
  unet = unet_flops(unet_config)
  kept, transient = 3 * 4 * unet.score_elements, 2 * 4 * unet.largest_scores
  return {"kept": kept, "transient": transient, "total": kept + transient}


# ------------------------------------------------------------------ abstract models and programs


@dataclasses.dataclass
class Models:
  """Abstract frozen models (leaves are ShapeDtypeStructs) and their configs."""
  unet: Frozen
  text: Frozen
  clip: Frozen
  unet_config: object
  text_config: object
  clip_config: object


def build_models(full: bool, dtype: str) -> Models:
  """SD 1.5's (or the tiny) UNet, text encoder and CLIP, weights float32, compute `dtype`: shapes only."""
  unet_cfg, text_cfg, clip_cfg = common.unet_config(full), common.sd_text_config(full), common.clip_config(full)
  eos = text_cfg.vocab_size - 1  # <|endoftext|>, as train_benchmark.py
  unet = common.jax_unet(unet_cfg, dtype, param_dtype="float32", abstract=True)
  text = common.jax_text(text_cfg, dtype, param_dtype="float32", eos_token_id=eos, abstract=True)
  clip = common.jax_clip(clip_cfg, dtype, param_dtype="float32", abstract=True)
  return Models(freeze(unet), freeze(text), freeze(clip), unet_cfg, text_cfg, clip_cfg)


def sds(shape, dtype=jnp.float32) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(tuple(shape), dtype)


def abstract_schedule():
  """SD's noise schedule, shapes only (`jax.eval_shape`: not even its 1,000 floats are put on a device)."""
  return jax.eval_shape(lambda: schedule_lib.NoiseSchedule.from_config(common.scheduler_config()))


def unet_forward_program(models: Models, batch: int = 1):
  """(lower, abstract args): the plain UNet forward on `batch` latents."""
  cfg = models.unet_config
  size = cfg.sample_size
  args = (models.unet, sds((batch, size, size, cfg.in_channels)), sds((batch,), jnp.int32),
          sds((batch, TEXT_LENGTH, cfg.cross_attention_dim)))
  return jax.jit(lambda unet, x, t, context: unet.module(x, t, context)).lower, args


def text_forward_program(models: Models):
  """(lower, abstract args): the text encoder on one prompt of token ids."""
  return jax.jit(lambda text, ids: text.module(ids)).lower, (models.text, sds((1, TEXT_LENGTH), jnp.int32))


def step_program(models: Models, mesh, method: str, classes: int, text_shared: bool = False, class_chunk: int = 0,
                 flips: int = 1):
  """(lower, abstract args): `train_step` as `mcti train` compiles it, for `classes` classes, batch 1 each, in passes
  of `class_chunk` classes (0: one pass), with `flips` encodings per shot (2: data.flip, the config's default)."""
  mcti = method == "mcti"
  text_cfg, cfg = models.text_config, models.unet_config
  backbone = Backbone(text_encoder=models.text, unet=models.unet, clip=models.clip if mcti else None,
                      schedule=abstract_schedule(), scaling_factor=common.SD_SCALING_FACTOR, text_shared=text_shared)
  k, size = classes, cfg.sample_size
  latents = sds((k, SHOTS, flips, size, size, cfg.in_channels))
  features = sds((k, SHOTS, flips, models.clip_config.projection_dim) if mcti else (k, 1, 1, 1))
  data = ShotData(class_ids=sds((k,), jnp.int32), latent_mean=latents, latent_logvar=latents,
                  image_features=features, valid=sds((k,), jnp.bool_))
  optimizer = make_optimizer(LR, WEIGHT_DECAY)
  tokens = sds((k, 1, text_cfg.hidden_size))
  state = TrainState(step=sds((), jnp.int32), tokens=tokens, opt_state=jax.eval_shape(optimizer.init, tokens),
                     key=jax.eval_shape(jax.random.PRNGKey, 0))
  settings = dict(alpha=1.0, beta=1.0, scale=SCALE) if mcti else {}
  step_cfg = StepConfig(method=methods.get(method), settings=frozen_settings(settings),
                        first_placeholder_id=text_cfg.vocab_size, num_vectors=1, num_train_timesteps=1000,
                        pooling="eos", batch_per_class=1, class_chunk=class_chunk)
  step = jax.jit(functools.partial(train_step, cfg=step_cfg, optimizer=optimizer, mesh=mesh), donate_argnums=(0,))
  return step.lower, (state, data, backbone, sds((NUM_TEMPLATES, TEXT_LENGTH), jnp.int32))


def dic_program(models: Models, mesh, batch: int):
  """(lower, abstract args): the DiC scorer's jitted call on one chunk of `batch` UNet evaluations.

  Kept in one place: adapt it here when `mcti_jax.classify.dic.scorer` changes its signature.
  """
  from mcti_jax.classify.dic import scorer
  cfg = models.unet_config
  size = cfg.sample_size
  items = [sds((batch,), jnp.int32) for _ in range(4)]  # image, class, sample, timestep of each item
  args = (models.unet, abstract_schedule(),
          sds((batch, TEXT_LENGTH, cfg.cross_attention_dim)), sds((1, size, size, cfg.in_channels)),
          sds((1,), jnp.int32), sds((), jnp.uint32), *items)
  static = dict(mesh=mesh, error="l2")
  if "chunk" in inspect.signature(scorer._score_items).parameters:  # the version that maps over chunks
    static["chunk"] = batch
  return functools.partial(scorer._score_items.lower, **static), args


# ------------------------------------------------------------------ what XLA says


_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?(\S+) = \w+\[([\d,]*)\]\S* (\w[\w-]*)\((.*)$")


def _dims(text: str) -> tuple[int, ...]:
  return tuple(int(d) for d in text.split(",") if d)


def _dot_flops(shapes, out, rest) -> float:
  lhs = shapes[re.match(r"%?(\S+?)[,)]", rest).group(1)]
  contracting = _dims(re.search(r"lhs_contracting_dims=\{([\d,]*)\}", rest).group(1))
  return 2.0 * np.prod(out) * np.prod([lhs[d] for d in contracting])


def _conv_flops(shapes, out, rest) -> float:
  """2 x outputs x (kernel window x input features), read from the rhs and its dim labels.

  An input dilation (the input gradient of a strided conv) inserts zeros: only 1 / dilation of the taps count.
  """
  rhs = shapes[re.findall(r"%?([^\s,()]+)[,)]", rest)[1]]
  labels = re.search(r"dim_labels=\w+_(\w+)->", rest).group(1)
  per_output = np.prod([n for n, label in zip(rhs, labels) if label != "o"])
  dilation = re.search(r"lhs_dilate=([\dx]+)", rest)
  zeros = np.prod([int(d) for d in dilation.group(1).split("x")]) if dilation else 1
  return 2.0 * np.prod(out) * per_output / zeros


def hlo_matmuls(hlo: str, kernel_shapes: set[tuple[int, ...]]) -> dict[str, float]:
  """Dot and convolution FLOPs of an optimized HLO module: forward, backward, and weight-gradient-shaped.

  Backward ops carry `transpose(` in their op_name metadata; an op without it counts as "unlabelled" (XLA drops
  the op_name of attention's batched dots). A backward or unlabelled op whose result has a frozen kernel's shape
  and that sums over a length not among its result's (tokens, pixels) is what a weight gradient looks like. At
  SD 1.5's shapes no token or pixel count is a channel count, so this is unambiguous there; on the tiny models
  it can flag input gradients (64 tokens of 8x8 latents, 64 channels).
  """
  shapes, out = {}, {"forward": 0.0, "backward": 0.0, "unlabelled": 0.0, "weight_grad_like": 0.0,
                     "weight_grad_like_ops": 0}
  ops = []
  for line in hlo.splitlines():
    m = _INSTRUCTION.match(line)
    if m:
      name, dims, opcode, rest = m.groups()
      shapes[name] = _dims(dims)
      if opcode in ("dot", "convolution"):
        ops.append((shapes[name], opcode, rest))
  for dims, opcode, rest in ops:
    flops = (_dot_flops if opcode == "dot" else _conv_flops)(shapes, dims, rest)
    name = re.search(r'op_name="([^"]*)"', rest)
    kind = "unlabelled" if name is None else "backward" if "transpose(" in name.group(1) else "forward"
    out[kind] += flops
    summed = flops / (2.0 * np.prod(dims))
    if kind != "forward" and tuple(sorted(dims)) in kernel_shapes and round(summed) not in dims:
      out["weight_grad_like"] += flops
      out["weight_grad_like_ops"] += 1
  out["total"] = out["forward"] + out["backward"] + out["unlabelled"]
  return out


def kernel_shapes(*frozen: Frozen) -> set[tuple[int, ...]]:
  """The (sorted) shapes of the frozen linear and conv kernels: what a weight gradient would have."""
  leaves = jax.tree_util.tree_flatten_with_path([f.params for f in frozen])[0]
  return {tuple(sorted(x.shape)) for path, x in leaves if "kernel" in jax.tree_util.keystr(path)}


# LLVM's optimisation level changes the machine code only: the HLO passes, hence the cost and memory analyses, are
# the same (checked on the tiny step), and compiling takes half the time.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def measure(name: str, lower, args, kernels: set[tuple[int, ...]], hlo_dir: str | None = None,
            compiler_options: dict | None = None) -> dict:
  """Lower and compile for abstract args; XLA's cost and memory analyses and the HLO's matmul FLOPs."""
  t0 = time.perf_counter()
  compiled = lower(*args).compile(compiler_options=FAST_COMPILE if compiler_options is None else compiler_options)
  seconds = time.perf_counter() - t0
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  memory = compiled.memory_analysis()
  hlo = compiled.as_text()
  if hlo_dir:
    os.makedirs(hlo_dir, exist_ok=True)
    with open(os.path.join(hlo_dir, f"{name}.hlo.txt"), "w") as f:
      f.write(hlo)
  return {"compile_s": round(seconds, 1), "flops": cost.get("flops", 0.0),
          "transcendentals": cost.get("transcendentals", 0.0), "bytes_accessed": cost.get("bytes accessed", 0.0),
          "argument_bytes": memory.argument_size_in_bytes, "output_bytes": memory.output_size_in_bytes,
          "alias_bytes": memory.alias_size_in_bytes, "temp_bytes": memory.temp_size_in_bytes,
          "code_bytes": memory.generated_code_size_in_bytes, "hlo": hlo_matmuls(hlo, kernels)}


def peak_bytes(m: dict) -> float:
  """What the program holds at once: arguments, outputs not aliased to a donated argument, temporaries."""
  return m["argument_bytes"] + m["output_bytes"] - m["alias_bytes"] + m["temp_bytes"]


# ------------------------------------------------------------------ the report


def per_class(one: dict, two: dict, k1: int, k2: int) -> dict:
  """Marginal (per class-sample) and fixed parts of FLOPs, bytes and memory, from the programs at K = k1, k2."""
  def split(key_fn):
    a, b = key_fn(one), key_fn(two)
    marginal = (b - a) / (k2 - k1)
    return marginal, a - k1 * marginal
  out = {}
  for key, fn in (("flops", lambda m: m["flops"]), ("matmul_flops", lambda m: m["hlo"]["total"]),
                  ("backward_matmul_flops", lambda m: m["hlo"]["backward"]),
                  ("bytes_accessed", lambda m: m["bytes_accessed"]), ("memory", peak_bytes),
                  ("temp", lambda m: m["temp_bytes"])):
    out[key], out[key + "_fixed"] = split(fn)
  return out


def largest_k(fixed: float, each: float) -> dict[str, int]:
  """Per device size: the largest K with fixed + K x each <= size (0 if not even one fits)."""
  return {f"{size}GB": max(0, int((size * GB - fixed) // each)) for size in DEVICE_GB}


def run(args) -> dict:
  full = not args.tiny
  models = build_models(full, args.dtype)
  mesh = parallel.make_mesh(1)
  kernels = kernel_shapes(models.unet, models.text, models.clip)
  hand = floors(models.unet_config, models.text_config, models.clip_config)
  if args.from_json:  # the tables again from a saved report's programs, compiling nothing
    with open(args.from_json) as f:
      saved = json.loads(f.read().splitlines()[-1])
    args.classes, args.dic_batch = saved["classes"], saved["dic_batch"]
    return summarize(args, models, hand, saved["programs"])
  measured = {}

  def compile_one(name, program_and_args):
    if name in args.skip or (args.only and name not in args.only):
      return
    print(f"compiling {name} ...", flush=True)
    measured[name] = measure(name, *program_and_args, kernels, args.hlo_dir, {} if args.full_optimization else None)
    print(f"  {measured[name]['compile_s']} s, {measured[name]['flops'] / 1e9:.4g} GFLOP", flush=True)

  compile_one("unet_forward", unet_forward_program(models))
  compile_one("text_forward", text_forward_program(models))
  k1, k2 = args.classes
  for method, shared, label in (("ti", False, "ti"), ("mcti", True, "mcti_shared"), ("mcti", False, "mcti")):
    for k in (k1, k2):
      compile_one(f"{label}_K{k}", step_program(models, mesh, method, k, text_shared=shared))
  compile_one(f"dic_B{args.dic_batch}", dic_program(models, mesh, args.dic_batch))
  return summarize(args, models, hand, measured)


def summarize(args, models: Models, hand: dict, measured: dict) -> dict:
  """Ratios to the floors, per-class splits, largest K per device size: the JSON report."""
  k1, k2 = args.classes
  scores = score_bytes(models.unet_config)
  report = {"benchmark": "FLOP and memory counts (CPU compile, nothing executed)",
            "model": "tiny" if args.tiny else "SD 1.5 shapes (UNet 860M 64x64x4, CLIP ViT-L/14)",
            "dtype": f"compute {args.dtype}, weights float32", "classes": [k1, k2], "dic_batch": args.dic_batch,
            "env": common.environment(None), "hand": hand, "score_bytes_per_sample": scores, "programs": measured}
  checks = {}
  if "unet_forward" in measured:
    m = measured["unet_forward"]
    checks["unet_forward_xla_over_hand"] = m["flops"] / hand["unet_forward"]
    checks["unet_forward_xla_over_hand_valid_taps"] = m["flops"] / hand["unet_forward_valid_taps"]
    checks["unet_forward_hlo_matmul_over_hand"] = m["hlo"]["total"] / hand["unet_forward"]
  if "text_forward" in measured:
    checks["text_forward_xla_over_hand"] = measured["text_forward"]["flops"] / hand["text_forward"]
  steps = {}
  for label in ("ti", "mcti_shared", "mcti"):
    floor = f"{label}_step"
    one, two = measured.get(f"{label}_K{k1}"), measured.get(f"{label}_K{k2}")
    if one is None or two is None:
      continue
    s = per_class(one, two, k1, k2)
    s["floor"] = hand[floor]
    s["over_floor"] = s["flops"] / hand[floor]
    s["matmul_over_floor"] = s["matmul_flops"] / hand[floor]
    s["backward_matmul_over_hand"] = s["backward_matmul_flops"] / hand[f"{label}_backward_matmul"]
    s["weight_grad_like_ops"] = two["hlo"]["weight_grad_like_ops"]
    s["largest_k_xla_cpu"] = largest_k(s["memory_fixed"], s["memory"])
    s["largest_k_flash_estimate"] = largest_k(s["memory_fixed"], s["memory"] - scores["total"])
    steps[label] = s
  report["steps"] = steps
  if "ti" in steps:
    for label in ("mcti_shared", "mcti"):
      if label in steps:
        checks[f"{label}_over_ti_per_class"] = steps[label]["flops"] / steps["ti"]["flops"]
        checks[f"{label}_over_ti_step_K{k2}"] = (measured[f"{label}_K{k2}"]["flops"] /
                                                 measured[f"ti_K{k2}"]["flops"])
  dic = measured.get(f"dic_B{args.dic_batch}")
  if dic is not None:
    checks["dic_per_eval_over_unet_forward"] = dic["flops"] / args.dic_batch / hand["unet_forward"]
    if "unet_forward" in measured:
      checks["dic_per_eval_over_xla_unet_forward"] = dic["flops"] / args.dic_batch / measured["unet_forward"]["flops"]
  report["checks"] = {k: round(v, 4) for k, v in checks.items()}
  report["targets"] = targets(report["checks"], steps)
  report["max_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB, 2)
  return report


def targets(checks: dict, steps: dict) -> dict[str, dict]:
  """Each target: the value, the bound, met or not."""
  out = {}
  for label in steps:
    out[f"{label}: XLA FLOPs per class-sample / floor"] = (steps[label]["over_floor"], TARGETS["step_over_floor"])
  if "dic_per_eval_over_unet_forward" in checks:
    out["DiC: XLA FLOPs per UNet evaluation / UNet forward"] = (checks["dic_per_eval_over_unet_forward"],
                                                              TARGETS["dic_over_forward"])
  if "mcti_shared_over_ti_per_class" in checks:
    out["MC-TI (shared text encoder) / TI, per class-sample"] = (checks["mcti_shared_over_ti_per_class"],
                                                                TARGETS["mcti_shared_over_ti"])
  return {k: {"value": round(v, 4), "target": f"<= {t}", "met": bool(v <= t)} for k, (v, t) in out.items()}


def hand_count(program: str, hand: dict, dic_batch: int) -> float | None:
  """The hand count of a program of `run` (a step's: its floor per class-sample times K)."""
  if program in ("unet_forward", "text_forward"):
    return hand[program]
  if program.startswith("dic_B"):
    return hand["dic_eval"] * dic_batch
  label, k = program.rsplit("_K", 1)
  return hand[f"{label}_step"] * int(k)


def markdown(report: dict) -> str:
  """The tables of RESULTS.md."""
  g = lambda x: f"{x / 1e9:.4g}"  # noqa: E731
  hand, measured, steps = report["hand"], report["programs"], report["steps"]
  lines = ["| program | XLA GFLOP | of which dot + conv (HLO) | hand count GFLOP | XLA / hand | bytes accessed GB | "
           "arguments GB | temp GB | compile s |", "|---|---|---|---|---|---|---|---|---|"]
  for name, m in measured.items():
    floor = hand_count(name, hand, report["dic_batch"])
    ratio = f"{m['flops'] / floor:.3f}" if floor else ""
    lines.append(f"| {name} | {g(m['flops'])} | {g(m['hlo']['total'])} | {g(floor) if floor else ''} | {ratio} | "
                 f"{m['bytes_accessed'] / GB:.2f} | {m['argument_bytes'] / GB:.2f} | {m['temp_bytes'] / GB:.2f} | "
                 f"{m['compile_s']} |")
  lines += ["", "| step | XLA GFLOP per class-sample | fixed GFLOP | floor GFLOP | XLA / floor | dot + conv / floor | "
            "backward linears + convs / hand | weight-gradient-shaped ops | bytes accessed GB per class-sample | "
            "memory GB: fixed | per class (XLA, CPU) | per class (flash, estimate) |", "|---" * 12 + "|"]
  scores = report["score_bytes_per_sample"]["total"]
  for label, s in steps.items():
    lines.append(f"| {label} | {g(s['flops'])} | {g(s['flops_fixed'])} | {g(s['floor'])} | {s['over_floor']:.3f} | "
                 f"{s['matmul_over_floor']:.3f} | {s['backward_matmul_over_hand']:.3f} | {s['weight_grad_like_ops']} | "
                 f"{s['bytes_accessed'] / GB:.2f} | {s['memory_fixed'] / GB:.2f} | {s['memory'] / GB:.2f} | "
                 f"{(s['memory'] - scores) / GB:.2f} |")
  lines += ["", "| step: largest K per device | " + " | ".join(f"{d} GB" for d in DEVICE_GB) + " |",
            "|---" * (len(DEVICE_GB) + 1) + "|"]
  for label, s in steps.items():
    for kind, title in (("largest_k_xla_cpu", "XLA attention (CPU buffers)"),
                        ("largest_k_flash_estimate", "flash attention (estimate)")):
      lines.append(f"| {label}, {title} | " + " | ".join(str(v) for v in s[kind].values()) + " |")
  lines += ["", "| check | value |", "|---|---|"] + [f"| {k} | {v:.4f} |" for k, v in report["checks"].items()]
  lines += ["", "| target | value | bound | met |", "|---|---|---|---|"]
  for name, t in report["targets"].items():
    lines.append(f"| {name} | {t['value']:.3f} | {t['target']} | {'yes' if t['met'] else '**no**'} |")
  return "\n".join(lines)


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--tiny", action="store_true", help="the tiny configs (seconds) instead of SD 1.5's shapes")
  p.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"), help="compute dtype (weights f32)")
  p.add_argument("--classes", type=int, nargs=2, default=(1, 2), metavar=("K1", "K2"),
                 help="the two class counts of the step (per device, batch 1 per class)")
  p.add_argument("--dic_batch", type=int, default=4, help="UNet evaluations in the DiC chunk")
  p.add_argument("--skip", nargs="*", default=(), help="programs not to compile (e.g. mcti_K1 mcti_K2)")
  p.add_argument("--only", nargs="*", default=(), help="compile only these programs (e.g. unet_forward dic_B4)")
  p.add_argument("--hlo_dir", default=None, help="also write each optimized HLO module here")
  p.add_argument("--from_json", default=None, help="print the tables of a saved report (--json_out's last line)")
  p.add_argument("--full_optimization", action="store_true",
                 help="compile with LLVM's default optimisation (twice as slow; the same counts)")
  common.add_output_flag(p)
  args = p.parse_args(argv)
  report = run(args)
  print(markdown(report))
  common.print_report(report, args.json_out)
  return report


if __name__ == "__main__":
  main()
