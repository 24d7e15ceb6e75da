"""cuDNN's fused attention against XLA's in our UNet: same numbers, how many layers it takes, and the speed.

  MCTI_ATTENTION is set here, per run; use a GPU:
  python benchmarks/attention_check.py --full --dtype bfloat16 --batch 8

Builds one random UNet (SD 1.5 shapes with --full) and runs the same jitted
forward + backward (the gradient with respect to the text context, as token
training needs) once with `MCTI_ATTENTION=xla` and once with `auto`. Reports
the cuDNN attention calls in each compiled program, the largest difference of
the outputs and gradients (relative to their spread), the programs' temporary
memory, and the seconds per call. On a CPU `auto` is XLA, so both are equal.
On a TPU `auto` runs self-attention on the Pallas flash kernel (counted as
`pallas_attention_calls`: the program's `tpu_custom_call`s). The other
settings (`cudnn`, `pallas`, `pallas_interpret`) are described in
`mcti_jax/models/attention.py`.
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

import common
from mcti_jax.models.frozen import freeze


def compiled_for(setting: str, inputs: tuple):
  """(fused attention calls: cuDNN's and Pallas TPU kernels', the compiled forward + context-gradient program) under
  MCTI_ATTENTION=setting."""
  os.environ["MCTI_ATTENTION"] = setting

  def loss(context, unet, x, t):
    out = unet.module(x, t, context)
    return jnp.mean(out.astype(jnp.float32) ** 2), out

  lowered = jax.jit(jax.value_and_grad(loss, has_aux=True)).lower(*inputs)
  text = lowered.as_text()
  return {"cudnn": text.count("__cudnn$fmha"), "pallas_tpu": text.count("tpu_custom_call")}, lowered.compile()


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--full", action="store_true", help="SD1.5-shaped UNet (use a GPU)")
  p.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--repeats", type=int, default=10)
  common.add_output_flag(p)
  args = p.parse_args(argv)

  config = common.unet_config(args.full)
  frozen = freeze(common.jax_unet(config, args.dtype, 0, param_dtype="float32"))
  rng = np.random.default_rng(0)
  size, width = config.sample_size, config.cross_attention_dim
  context = jnp.asarray(rng.normal(size=(args.batch, 77, width)), jnp.float32)
  x = jnp.asarray(rng.normal(size=(args.batch, size, size, config.in_channels)), jnp.float32)
  t = jnp.asarray(rng.integers(0, 1000, args.batch), jnp.int32)
  inputs = (context, frozen, x, t)  # the order of `loss`'s arguments; the gradient is the context's

  report = {"benchmark": "attention: cuDNN vs XLA in the UNet", "dtype": args.dtype, "batch": args.batch,
            "env": common.environment(None)}
  results = {}
  for setting in ("xla", "auto"):
    t0 = time.perf_counter()
    fused_calls, program = compiled_for(setting, inputs)
    compile_s = time.perf_counter() - t0
    (_, out), grad = program(*inputs)
    common.block(grad)
    times = common.timed(lambda: common.block(program(*inputs)), args.repeats)
    memory = program.memory_analysis()
    results[setting] = (np.asarray(out, np.float32), np.asarray(grad, np.float32))
    report[setting] = {
        "cudnn_attention_calls": fused_calls["cudnn"], "pallas_attention_calls": fused_calls["pallas_tpu"],
        "compile_s": common.rounded(compile_s), "mean_s": common.rounded(float(np.mean(times))),
        "temp_gb": common.rounded(memory.temp_size_in_bytes / 1e9) if memory is not None else None}
  for i, name in enumerate(("output", "context_grad")):
    a, b = results["xla"][i], results["auto"][i]
    report[f"{name}_max_diff_over_std"] = common.rounded(float(np.abs(a - b).max() / a.std()))
  report["speedup"] = common.rounded(report["xla"]["mean_s"] / report["auto"]["mean_s"], 3)
  common.print_report(report, args.json_out)
  return report


if __name__ == "__main__":
  main()
