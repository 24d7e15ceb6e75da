"""UNet calls per image of the default `dic` evaluator as K grows: K = 10, 100, 1000 on the synthetic world.

For each K, trains TI + MC-TI tokens briefly on the synthetic world
(mcti:synthetic, the embedded tiny model; resumed if the workdir
has them), then runs mcti_jax/configs/eval.py's `dic_fewshot` row, the `dic` evaluator
with its defaults, through `Evaluator.run` (the code `mcti eval` runs) with
the pets preset (a 250-sample budget, as a real dataset's row gets; the
synthetic config's row has the tiny preset's 8: `--preset tiny`) on an
evenly spread subset of the test images, its per-image cache cleared first so
every call is made and timed. Below `large_k` (50) that is the pets stages
over every class; from it, the token head's top 5 + elimination, whose UNet
calls per image are bounded by 5 x 250 whatever K. Reports calls per image
(mean, max, the bound), top-1 of DiC and of the token head alone, the head's
top-m recall, and wall times. Writes OUT.json.

The synthetic world is a scale test: the tiny models never saw such images
and the tokens train for a few steps, so its accuracies are only a sanity
check (above chance), not a claim.

  JAX_PLATFORMS=cpu .venv/bin/python benchmarks/dic_large_k.py            # K = 10, 100, 1000; minutes on 2 cores
  JAX_PLATFORMS=cpu .venv/bin/python benchmarks/dic_large_k.py --classes 10 100 --images 20   # quicker
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

RECALL_AT = (1, 2, 3, 5, 10, 20)


def run_k(num_classes: int, args, log) -> dict:
  """Train (or resume) the tokens of K classes, then score the `dic_fewshot` row with its call counts."""
  from mcti_jax.configs import eval as eval_config
  from mcti_jax.evaluation import evaluate, evaluators
  from mcti_jax.evaluation.evaluators.dic import head_ranking

  config = eval_config.get_config("synthetic")
  config.workdir = str(Path(args.workdir) / f"K{num_classes}")
  config.train.data.num_classes = num_classes
  config.train.phase.ti.steps, config.train.phase.mcti.steps = args.ti_steps, args.mcti_steps
  config.train.checkpoint_every = args.ti_steps + args.mcti_steps
  for item in args.set:  # e.g. phase.mcti.beta=1.0
    key, value = item.split("=", 1)
    *parents, leaf = key.split(".")
    target = config.train
    for name in parents:
      target = target[name]
    target[leaf] = ast.literal_eval(value)
  entry = dict(config.evals.dic_fewshot.to_dict(), max_images=args.images, preset=args.preset)
  evaluator = evaluators.make("dic_fewshot", entry)

  tick = time.perf_counter()
  cell = evaluate.make_cell(config, args.n_shots, args.seed, log=log)
  setup_s = time.perf_counter() - tick
  (Path(cell.result.workdir) / "dic_fewshot.dic.jsonl").unlink(missing_ok=True)  # every image scored, and timed
  tick = time.perf_counter()
  scores, labels, info = evaluator.run(cell, "dic_fewshot")
  dic_s = time.perf_counter() - tick

  count = min(args.images, len(cell.test))  # the evaluator's subset, as it picks it
  positions = np.linspace(0, len(cell.test) - 1, count).round().astype(int)
  assert np.array_equal(labels, cell.test.labels[positions])
  ranking = head_ranking(cell, "mcti", positions)
  hit = ranking == labels[:, None]
  row = {"classes": num_classes, "images": len(labels), "strategy": info["strategy"], "shortlist": info["shortlist"],
         "calls_mean": info["unet_calls_per_image"], "calls_max": info["unet_calls_max"],
         "calls_bound": info["unet_calls_bound"], "dic_top1": float(np.mean(scores.argmax(1) == labels)),
         "head_top1": float(hit[:, 0].mean()),
         "head_recall": {m: float(hit[:, :m].any(1).mean()) for m in RECALL_AT if m <= num_classes},
         "chance": 1 / num_classes, "setup_s": setup_s, "dic_s": dic_s, "unet_evals_per_s": info["unet_evals_per_s"],
         "train_steps": {"ti": args.ti_steps, "mcti": args.mcti_steps}, "test_images_in_split": len(cell.test)}
  log(f"K={num_classes}: {row['strategy']} (shortlist {row['shortlist']}), UNet calls/image {row['calls_mean']:.0f} "
      f"mean, {row['calls_max']} max, bound {row['calls_bound']}; top-1 DiC {100 * row['dic_top1']:.0f}%, head "
      f"{100 * row['head_top1']:.0f}%; train + encode {setup_s:.0f} s, DiC {dic_s:.0f} s")
  return row


def table(rows: list[dict]) -> str:
  lines = ["| K | default DiC | UNet calls / image (mean, max) | bound | DiC top-1 % | token head top-1 % | "
           "head top-5 recall % | chance % | train + encode s | DiC s |", "|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    what = f"head top-{r['shortlist']} + {r['strategy']}" if r["shortlist"] else f"pets {r['strategy']}, all classes"
    lines.append(f"| {r['classes']} | {what} | {r['calls_mean']:.0f}, {r['calls_max']} | {r['calls_bound']} | "
                 f"{100 * r['dic_top1']:.0f} | {100 * r['head_top1']:.0f} | "
                 f"{100 * r['head_recall'].get(5, 1.0):.0f} | {100 * r['chance']:.1f} | {r['setup_s']:.0f} | "
                 f"{r['dic_s']:.0f} |")
  return "\n".join(lines)


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--classes", type=int, nargs="+", default=[10, 100, 1000])
  p.add_argument("--images", type=int, default=50, help="test images per K (evenly spread: one per class at large K)")
  p.add_argument("--preset", default="pets",
                 help="DiC stages (budget: the last sample count); eval:synthetic's row uses tiny (8)")
  p.add_argument("--n_shots", type=int, default=5)
  p.add_argument("--seed", type=int, default=1)
  p.add_argument("--ti_steps", type=int, default=5)
  p.add_argument("--mcti_steps", type=int, default=15)
  p.add_argument("--set", nargs="*", default=[], help="training config overrides, e.g. phase.mcti.beta=1.0")
  p.add_argument("--workdir", default="runs/dic_large_k", help="training runs per K (resumed if there)")
  p.add_argument("--out", default="benchmarks/dic_large_k", help="writes OUT.json")
  args = p.parse_args(argv)

  import flax
  import jax
  start = time.perf_counter()
  rows = [run_k(k, args, print) for k in args.classes]
  devices = jax.devices()
  report = {"date": time.strftime("%Y-%m-%d"), "host": platform.node(), "jax": jax.__version__,
            "flax": flax.__version__, "numpy": np.__version__,
            "devices": f"{len(devices)} x {devices[0].device_kind} ({devices[0].platform})", "cpus": os.cpu_count(),
            "args": vars(args), "rows": rows, "wall_s": time.perf_counter() - start,
            "note": "synthetic world: accuracy is a sanity check only"}
  out = Path(args.out).with_suffix(".json")
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = out.with_suffix(".tmp.json")
  tmp.write_text(json.dumps(report, indent=1, default=float))
  os.replace(tmp, out)
  print(table(rows))
  print(f"wrote {out} in {report['wall_s']:.0f} s")


if __name__ == "__main__":
  main()
