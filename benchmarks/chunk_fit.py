"""The class chunk at which K = 1000 classes train on one device of 16, 24, 32, 80 and 141 GB (SD 1.5 shapes).

  JAX_PLATFORMS=cpu .venv/bin/python benchmarks/chunk_fit.py           # TI and MC-TI: ~3 min on 2 cores
  JAX_PLATFORMS=cpu .venv/bin/python benchmarks/chunk_fit.py --tiny    # the tiny configs: a minute

Nothing is allocated or executed: flops.py's abstract models (SD 1.5's UNet and text encoder, CLIP ViT-L/14;
float32 weights, bfloat16 compute) and its `step_program`, compiled for the CPU backend on one device with
K = 1000 classes in passes of c (config.class_chunk; `lax.map` inside the step) for c = 1, 2, 4, read with
`memory_analysis`. What the step holds, need(c) = arguments + outputs - aliased + temp (class_chunks.need), is
linear in c: the line through c = 1 and 2 (as class_chunks.choose fits it), checked at c = 4, gives
need(c) = fixed + c x per_pass. The fixed part holds everything that does not grow with c, including the
arguments that grow with K: the cached latent moments, mean and logvar [K, N, F, 64, 64, 4] float32 with N = 16
shots and F = 2 flips (mcti_jax/configs/mcti.py's defaults n_shots=16, flip=True), 4.2 GB at K = 1000.

Per device size it reports the largest c with need(c) <= size, for XLA:CPU's buffers (an upper bound for a GPU:
XLA's attention keeps float32 score buffers, XLA:CPU runs bfloat16 dots in float32) and for flops.py's flash
estimate (per_pass less `score_bytes`, what cuDNN / Pallas flash attention does not keep), against the whole
size and against class_chunks.MARGIN of it ("auto" keeps MARGIN of the device's bytes_limit; on a GPU JAX's
default bytes_limit is itself ~75% of the memory unless XLA_PYTHON_CLIENT_MEM_FRACTION says otherwise).
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import flops
from flops import DEVICE_GB, GB, SHOTS, build_models, kernel_shapes, measure, peak_bytes, score_bytes, step_program
from mcti_jax.training import class_chunks
from mcti_jax.runtime import parallel

CLASSES = 1000
FLIPS = 2  # data.flip=True, the config's default: a mirrored encoding of every shot
METHODS = {"ti": ("ti", False), "mcti_shared": ("mcti", True)}  # label: (method, text encoder shared with CLIP)


def fit(needs: dict[int, float]) -> dict:
  """need(c) = fixed + c x per_pass through the two smallest c; the error of the line at the others."""
  (c1, n1), (c2, n2), *rest = sorted(needs.items())
  per_pass = (n2 - n1) / (c2 - c1)
  fixed = n1 - c1 * per_pass
  return {"fixed": fixed, "per_pass": per_pass,
          "line_error": {c: (n - (fixed + c * per_pass)) / n for c, n in rest}}


def largest_chunk(fixed: float, per_pass: float, classes: int, margin: float = 1.0) -> dict[str, int]:
  """Per device size: the largest c (at most `classes`) with fixed + c x per_pass <= margin x size; 0: none fits."""
  return {f"{size}GB": int(min(classes, max(0, (margin * size * GB - fixed) // per_pass))) for size in DEVICE_GB}


def run(args) -> dict:
  models = build_models(not args.tiny, args.dtype)
  mesh = parallel.make_mesh(1)
  kernels = kernel_shapes(models.unet, models.text, models.clip)
  scores = score_bytes(models.unet_config)["total"]  # per class-sample, batch 1
  cfg = models.unet_config
  latent_bytes = 2 * CLASSES * SHOTS * FLIPS * cfg.sample_size ** 2 * cfg.in_channels * 4  # mean + logvar, float32
  steps = {}
  for label in args.methods:
    method, shared = METHODS[label]
    programs = {}
    for c in args.chunks:
      name = f"{label}_K{CLASSES}_c{c}"
      print(f"compiling {name} ...", flush=True)
      programs[c] = measure(name, *step_program(models, mesh, method, CLASSES, text_shared=shared, class_chunk=c,
                                                flips=FLIPS), kernels)
      programs[c].pop("hlo")  # the matmul census is flops.py's business
      print(f"  {programs[c]['compile_s']} s: need {peak_bytes(programs[c]) / GB:.2f} GB, arguments "
            f"{programs[c]['argument_bytes'] / GB:.2f} GB, temp {programs[c]['temp_bytes'] / GB:.2f} GB", flush=True)
    line = fit({c: peak_bytes(m) for c, m in programs.items()})
    flash = line["per_pass"] - scores
    steps[label] = {
        "programs": {str(c): m for c, m in programs.items()}, **line, "per_pass_flash_estimate": flash,
        "largest_chunk_xla_cpu": largest_chunk(line["fixed"], line["per_pass"], CLASSES),
        "largest_chunk_flash_estimate": largest_chunk(line["fixed"], flash, CLASSES),
        "largest_chunk_xla_cpu_margin": largest_chunk(line["fixed"], line["per_pass"], CLASSES, class_chunks.MARGIN),
        "largest_chunk_flash_estimate_margin": largest_chunk(line["fixed"], flash, CLASSES, class_chunks.MARGIN)}
  return {"benchmark": "class chunk that fits K classes on one device (CPU compile, nothing executed)",
          "model": "tiny" if args.tiny else "SD 1.5 shapes (UNet 860M 64x64x4, CLIP ViT-L/14)",
          "dtype": f"compute {args.dtype}, weights float32", "classes": CLASSES, "shots": SHOTS, "flips": FLIPS,
          "batch_per_class": 1, "chunks": args.chunks, "margin": class_chunks.MARGIN,
          "latent_argument_bytes": latent_bytes, "score_bytes_per_sample": scores,
          "env": flops.common.environment(None), "steps": steps,
          "max_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB, 2)}


def markdown(report: dict) -> str:
  g = lambda b: f"{b / GB:.2f}"  # noqa: E731
  lines = ["| step | c | arguments GB | temp GB | need GB | line at c GB | compile s |", "|---" * 7 + "|"]
  for label, s in report["steps"].items():
    for c, m in s["programs"].items():
      line = s["fixed"] + int(c) * s["per_pass"]
      lines.append(f"| {label} | {c} | {g(m['argument_bytes'])} | {g(m['temp_bytes'])} | {g(peak_bytes(m))} | "
                   f"{g(line)} | {m['compile_s']} |")
  lines += ["", "| step | fixed GB | of which K's latents GB | per pass (one class) GB, XLA:CPU | "
            "per pass, flash estimate GB | line error at c = 4 |", "|---" * 6 + "|"]
  for label, s in report["steps"].items():
    errors = ", ".join(f"{100 * e:+.2f}%" for e in s["line_error"].values())
    lines.append(f"| {label} | {g(s['fixed'])} | {g(report['latent_argument_bytes'])} | {g(s['per_pass'])} | "
                 f"{g(s['per_pass_flash_estimate'])} | {errors} |")
  lines += ["", f"| K = {report['classes']}: largest class_chunk per device | "
            + " | ".join(f"{d} GB" for d in DEVICE_GB) + " |", "|---" * (len(DEVICE_GB) + 1) + "|"]
  margin = f"{report['margin']:.0%} of the size (class_chunks.MARGIN)"
  for label in report["steps"]:
    for key, title in (("largest_chunk_xla_cpu", "XLA:CPU buffers, whole size"),
                       ("largest_chunk_xla_cpu_margin", f"XLA:CPU buffers, {margin}"),
                       ("largest_chunk_flash_estimate", "flash estimate, whole size"),
                       ("largest_chunk_flash_estimate_margin", f"flash estimate, {margin}")):
      lines.append(f"| {label}, {title} | " + " | ".join(str(v) for v in report["steps"][label][key].values()) + " |")
  return "\n".join(lines)


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--tiny", action="store_true", help="the tiny configs (a minute) instead of SD 1.5's shapes")
  p.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"), help="compute dtype (weights f32)")
  p.add_argument("--chunks", type=int, nargs="+", default=[1, 2, 4], help="class chunks; the line is the first two")
  p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
  p.add_argument("--out", default=str(Path(__file__).parent / "chunk_fit.json"))
  args = p.parse_args(argv)
  tick = time.perf_counter()
  report = run(args)
  report["wall_s"] = round(time.perf_counter() - tick, 1)
  Path(args.out).write_text(json.dumps(report, indent=1, default=str) + "\n")
  print(markdown(report))
  print(f"wrote {args.out} in {report['wall_s']:.0f} s")
  return report


if __name__ == "__main__":
  main()
