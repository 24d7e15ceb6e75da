"""DCT's Table 1 on the tiny model: generation top-1/top-5 of TI, MC-TI and DCT tokens against the SD baseline.

Every export is scored by the `generation_accuracy` evaluator's own code
(mcti_jax/evaluation/evaluators/generation_accuracy.py, `measure`): G images
per class from "a photo of a <cls-k>", judged by the committed digit guide
(mcti_jax/assets/tiny/guide_digits, 10-way, 98.4% on held-out digits), and the
SD baseline: the same seeds with the class name in place of the token
("a photo of a three"). The tokens: the demo's TI and MC-TI exports
(runs/demo/5shot/seed<s>/export/, from `make demo`: 5 shots of each digit,
shot seeds 1-3) and DCT's, trained with the same seeds as the DCT demo
(mcti_jax/configs/dct_demo.py; its settings were tuned on seed 0), guided by
the same digit guide. `dct:tiny,no_names` learns "a photo of a <cls-k>"; `dct:tiny` (the paper's prompt,
"A photo of a S_c label") learns "a photo of a <cls-k> <name>" and is judged from it: exactly DCT's pair with the
baseline "a photo of a <name>".

  for s in 1 2 3; do mcti train --config dct:tiny,no_names --config.workdir=runs/gen_acc_dct/seed$s \
      --config.seed=$s; done
  for s in 1 2 3; do mcti train --config dct:tiny --config.workdir=runs/gen_acc_dct_names/seed$s \
      --config.seed=$s; done
  JAX_PLATFORMS=cpu .venv/bin/python benchmarks/generation_accuracy.py      # ~3 min on 2 CPU cores

Two samplers: 50 DDIM steps (the demo's generation), and 6 (DCT's training sampler, which the DCT demo judges
with); guidance 2.0 (the tiny model's) in both.

Writes benchmarks/generation_accuracy.json (every row) and .md (the table).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
KNOWN, UNKNOWN = list(range(5)), list(range(5, 10))  # digits the tiny model saw in pretraining / never saw


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--demo", default=str(ROOT / "runs/demo/5shot"), help="the demo's runs: <demo>/seed<s>/export/")
  p.add_argument("--shot_seeds", type=int, nargs="+", default=[1, 2, 3])
  p.add_argument("--dct", default=str(ROOT / "runs/gen_acc_dct"), help="DCT runs: <dct>/seed<s>/export/dct ('' to "
                 "skip)")
  p.add_argument("--dct_names", default=str(ROOT / "runs/gen_acc_dct_names"),
                 help="DCT runs of dct:tiny (prompts '<cls-k> <name>'): <dct_names>/seed<s>/export/dct ('' to "
                 "skip); judged from \"a photo of a <cls-k> <name>\"")
  p.add_argument("--dct_seeds", type=int, nargs="+", default=[1, 2, 3])
  p.add_argument("--judge", default=str(ROOT / "mcti_jax/assets/tiny/guide_digits"))
  p.add_argument("--num_images", type=int, default=8)
  p.add_argument("--steps", type=int, nargs="+", default=[50, 6])
  p.add_argument("--guidance", type=float, default=2.0)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default=str(ROOT / "benchmarks/generation_accuracy"))
  args = p.parse_args(argv)

  import jax
  from mcti_jax.evaluation.evaluators import generation_accuracy as GA
  from mcti_jax.models import pipeline
  from mcti_jax.runtime import parallel
  from mcti_jax.tokens.conditioning import LearnedTokens

  sd = pipeline.load_stable_diffusion(ROOT / "mcti_jax/assets/tiny/sd")
  spec = dict(type="file", path=args.judge)
  mesh = parallel.make_mesh()
  plain, named = "a photo of a {}", "a photo of a {} {name}"
  exports = {f"{name} (shot seed {s})": (Path(args.demo) / f"seed{s}" / "export" / phase, plain)
             for s in args.shot_seeds for phase, name in (("ti", "TI"), ("mcti", "MC-TI"))}
  if args.dct:
    exports.update({f"DCT (seed {s})": (Path(args.dct) / f"seed{s}" / "export" / "dct", plain)
                    for s in args.dct_seeds})
  if args.dct_names:
    exports.update({f"DCT, token + class name (seed {s})": (Path(args.dct_names) / f"seed{s}" / "export" / "dct", named)
                    for s in args.dct_seeds})
  tables = {}
  for steps in args.steps:
    rows = tables[f"{steps} steps"] = {}
    for label, (folder, template) in exports.items():
      settings = GA.Evaluator(classifier=spec, num_images=args.num_images, steps=steps, guidance=args.guidance,
                              seed=args.seed, template=template)
      tokenizer = copy.deepcopy(sd.tokenizer)
      learned = LearnedTokens.from_export(folder, tokenizer, sd.text_width)
      classifier = GA.load_judge(spec, learned.class_names, "judge")
      targets = GA.judge_targets(classifier, learned.class_names, None, "judge")
      start = time.perf_counter()
      row = GA.measure(sd, tokenizer, learned, classifier, targets, settings, args.guidance, mesh)
      row["seconds"] = round(time.perf_counter() - start, 1)
      row["export"] = str(folder.relative_to(ROOT) if folder.is_relative_to(ROOT) else folder)
      for prefix in ("gen", "baseline"):
        per_class = np.asarray(row[f"{prefix}_top1_per_class"])
        row[f"{prefix}_top1_known"] = float(per_class[KNOWN].mean())
        row[f"{prefix}_top1_unknown"] = float(per_class[UNKNOWN].mean())
      rows[label] = row
      print(f"{steps} steps  {label:<36} top-1 {100 * row['gen_top1']:5.1f}  top-5 {100 * row['gen_top5']:5.1f}   "
            f"baseline top-1 {100 * row['baseline_top1']:5.1f}  top-5 {100 * row['baseline_top5']:5.1f}  "
            f"({row['seconds']} s)")
    baselines = {json.dumps([r[k] for k in ("baseline_top1", "baseline_top5", "baseline_top1_per_class")])
                 for r in rows.values()}
    assert len(baselines) == 1, "the baseline depends on the prompt and seeds alone: it must be the same every row"
  first = next(iter(next(iter(tables.values())).values()))
  protocol = {"model": "the embedded tiny SD (mcti_jax/assets/tiny/sd; pretrained on digits 0-4 only)",
              "judge": str(Path(args.judge).relative_to(ROOT) if Path(args.judge).is_relative_to(ROOT) else args.judge),
              "judge_classes": first["judge_classes"], "num_images_per_class": args.num_images, "steps": args.steps,
              "sampler": "DDIM", "guidance": args.guidance, "seed": args.seed, "prompt": first["prompt"],
              "baseline_prompt": first["baseline_prompt"], "shot_seeds": args.shot_seeds, "dct_seeds": args.dct_seeds,
              "devices": f"{mesh.devices.size} x {jax.devices()[0].platform}",
              "date": datetime.date.today().isoformat()}
  out = {"protocol": protocol, "tables": tables}
  Path(args.out + ".json").write_text(json.dumps(out, indent=1) + "\n")
  Path(args.out + ".md").write_text(report(out))
  print(report(out))
  return out


def _mean_std(values) -> str:
  values = 100 * np.asarray(values)
  return f"{values.mean():.1f} ± {values.std():.1f}" if len(values) > 1 else f"{values[0]:.1f}"


def report(out: dict) -> str:
  p = out["protocol"]
  keys = ("gen_top1", "gen_top5", "gen_top1_known", "gen_top1_unknown")
  lines = [
      "# Generation accuracy on the tiny model (DCT's Table 1 protocol)", "",
      f"`benchmarks/generation_accuracy.py`, {p['date']}, {p['devices']}. The `generation_accuracy` evaluator's "
      f"code: {p['num_images_per_class']} images per class for each of the 10 digits from `{p['prompt']}` (DDIM, "
      f"guidance {p['guidance']:g}; image g of every class from fold_in(key({p['seed']}), g)), judged by the "
      f"committed 10-way digit guide ({p['judge']}; 98.4% on held-out real digits). SD baseline: the same seeds and "
      f"prompt with the class name in place of the token (`{p['baseline_prompt']}`). Model: {p['model']}. "
      f"TI / MC-TI: the demo's 5-shot tokens, shot seeds {p['shot_seeds']}; DCT: `dct:tiny,no_names` with seeds "
      f"{p['dct_seeds']}, learned FROM this same guide (like DCT's ImageNet-guided, ImageNet-judged row, not an "
      "independent judge); `dct:tiny` the same with the class name after the token, as in DCT's paper. "
      f"Mean ± std over the seeds; top-5 of 10 classes; {10 * p['num_images_per_class']} images per token set.",
      ""]
  for steps, rows in out["tables"].items():
    groups: dict[str, list[dict]] = {}
    for label, row in rows.items():
      groups.setdefault(label.split(" (")[0], []).append(row)
    first = next(iter(rows.values()))  # every row holds the same baseline (main checks it)
    baseline = {"gen_" + k[len("baseline_"):]: v for k, v in first.items() if k.startswith("baseline_")}
    baseline["prompt"] = first["baseline_prompt"]
    groups = {"SD baseline (class name, no token)": [baseline], **groups}
    lines += [f"## DDIM {steps}", "", "| tokens | prompt of class 0 | top-1 | top-5 | top-1 known 0-4 | top-1 unknown "
              "5-9 |", "|---|---|---|---|---|---|"]
    for name, group in groups.items():
      lines.append(f"| {name} | `{group[0]['prompt']}` | " + " | ".join(_mean_std([r[k] for r in group]) for k in keys)
                   + " |")
    lines += ["", "Per class top-1 (%), digits 0-9:", ""]
    for label, row in [("SD baseline", baseline), *rows.items()]:
      lines.append(f"- {label}: " + " ".join(f"{100 * v:.0f}" for v in row["gen_top1_per_class"]))
    lines.append("")
  return "\n".join(lines)


if __name__ == "__main__":
  main()
