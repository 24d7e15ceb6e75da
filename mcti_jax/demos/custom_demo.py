"""`mcti demo --config custom_demo`: custom tokens in the tiny world, and multi-token initialisation.

1. Composition. For each shot seed, one run trains TI, MC-TI (after TI) and
   custom tokens, free and in the span of the tiny CLIP's shape words, side
   by side (phases of mcti_jax/configs/custom_demo.py). The eval harness scores each
   on plain classification (the CLIP-token head, known 0-4 / unknown 5-9) and
   on composite queries "a photo of a S_k <shape word>" over the held-out
   digits (retrieval/tiny_world.py). GAIR (retrieval/gair.py) then refines the queries of
   every method's tokens, against the best fixed query of the same tokens.
2. The subspace's residual: the distance of the exported custom tokens from
   the span of the words, measured independently (least squares).
3. The multi-token initialisation paper's Fig. 3: TI's noise MSE from a caption, a label,
   "*" and V x "*" (init_convergence.py).

Everything lands in <workdir>/: results.json (the harness's rows plus
"gair", "subspace_residual", "init_convergence"), report.md, the harness's
results.md and plots, GAIR's strips per query, init_convergence.png.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from mcti_jax.evaluation import evaluate
from mcti_jax.demos import init_convergence
from mcti_jax import paths
from mcti_jax.retrieval import retrieve
from mcti_jax.tokens import subspace
from mcti_jax.retrieval import gair
from mcti_jax.models import hf_io
from mcti_jax.models import tokenizer as tokenizer_lib


def run(config, log: Callable[[str], None] = print) -> dict:
  workdir = Path(config.workdir)
  paths.output_folder(workdir, "config.workdir")  # before any part trains
  out: dict[str, Any] = {}
  if "composition" in config.parts:
    out = composition(config, workdir, log)
  if "init" in config.parts:
    out["init_convergence"] = initialisation(config, workdir, log)
    results_path = workdir / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    hf_io.write_folder(workdir, {"results.json": {**results, "init_convergence": out["init_convergence"]}})
  report = write_report(config, workdir, out)
  log(report.read_text())
  return out


def composition(config, workdir: Path, log) -> dict:
  """Train and score every method per seed (the eval harness), GAIR, the subspace's residual; into results.json."""
  log("[1/3] training and scoring TI, MC-TI, custom tokens free and in the subspace, per seed")
  results = evaluate.run(config, log=log)["results"]
  out: dict[str, Any] = {"seeds": list(config.seeds), "rows": results["rows"],
                         "summary": {f"{m}|{k}": v for (m, _, k), v in evaluate.summary(results).items()}}
  log("[2/3] GAIR against the fixed queries of each method's tokens")
  gair_config = gair.GairConfig(**config.gair.settings.to_dict())
  out["gair"] = {}
  for phase in config.gair.phases:
    per_seed = {}
    for seed in config.seeds:
      tokens = _export(config, seed, phase)
      r = retrieve.evaluate_tiny(tokens, workdir / "gair" / phase / f"seed{seed}", gair_config=gair_config,
                                  lams=tuple(config.gair.lams), log=lambda _: None)
      per_seed[seed] = {kind: r["metrics"][kind]["overall"] for kind in r["metrics"]} | {"best_fixed": r["best_fixed"]}
      log(f"   {phase} seed {seed}: composite MRR {_mrr(per_seed[seed], 'composite')}, best fixed "
          f"({r['best_fixed']}) {_mrr(per_seed[seed], r['best_fixed'])}, GAIR {_mrr(per_seed[seed], 'gair')}")
    out["gair"][phase] = per_seed
  log("[3/3] the custom tokens' distance from the span of the subspace words")
  embeddings = _word_embeddings(config)
  out["subspace_residual"] = {seed: subspace.residual(_custom_tokens(config, seed), embeddings)
                              for seed in config.seeds}
  log(f"   max residual {max(out['subspace_residual'].values()):.2e}")
  results.update({k: out[k] for k in ("gair", "subspace_residual")})
  hf_io.write_folder(workdir, {"results.json": results})  # the harness's rows and the demo's own parts
  return out


def initialisation(config, workdir: Path, log) -> dict:
  """Fig. 3: TI's noise MSE from a caption, a label, "*" and V x "*" (init_convergence.py)."""
  log("multi-token initialisation: TI's noise MSE from four starts (Fig. 3)")
  conv = init_convergence.run(config.train, workdir / "init_convergence", seeds=tuple(config.init.seeds),
                              steps=config.init.steps, log=log)
  return {k: conv[k] for k in ("steps", "curves", "at", "texts", "elapsed_s")}


def _export(config, seed: int, phase: str) -> Path:
  n_shots = config.n_shots[0]
  return Path(config.workdir) / f"{n_shots}shot" / f"seed{seed}" / "export" / phase


def _mrr(metrics: dict, kind: str) -> str:
  value = metrics.get(kind, {}).get("mrr")
  return "n/a" if value is None else f"{100 * value:.1f}"


def _word_embeddings(config) -> np.ndarray:
  """The subspace words' rows [n, D] of SD's frozen token table, read from the checkpoint (not from the run)."""
  from mcti_jax.tokens import placeholders as tok
  from mcti_jax.models import pipeline
  sd_path = config.train.model.sd_path
  tokenizer = tokenizer_lib.load_tokenizer(sd_path, "tokenizer")
  table = np.asarray(tok.token_table(pipeline.load_stable_diffusion(sd_path).text_encoder))
  return table[subspace.word_ids(tokenizer, tuple(config.train.tokens.subspace_words), table.shape[0])]


def _custom_tokens(config, seed: int) -> np.ndarray:
  """The exported subspace tokens [K, V, D] of one seed."""
  from mcti_jax.tokens import export
  return export.load_tokens(_export(config, seed, "custom"))[0]


def _mean_std(values: list[float]) -> str:
  values = [v for v in values if v is not None]
  if not values:
    return "n/a"
  return f"{100 * np.mean(values):.1f} ± {100 * np.std(values):.1f}"


def write_report(config, workdir: Path, out: dict) -> Path:
  lines = ["# Custom tokens in the tiny world", "", *evaluate.smoke_banner(config)]
  if "rows" in out:
    lines += composition_report(config, out)
  if "init_convergence" in out:
    lines += initialisation_report(config, out["init_convergence"])
  path = workdir / "report.md"
  hf_io.write_folder(workdir, {"report.md": "\n".join(lines).encode()})
  return path


def composition_report(config, out: dict) -> list[str]:
  labels = evaluate.labels_of(config)
  rows = out["rows"]

  def cell(method: str, key: str) -> str:
    return _mean_std([r.get(key) for r in rows if r["method"] == method])

  lines = [f"Seeds {out['seeds']} (settings tuned on seed 0), 5 shots of each digit; mean ± std over seeds.", "",
           "## Plain classification and composite retrieval", "",
           "| tokens | top-1 known 0-4 | top-1 unknown 5-9 | composite MRR | R@1 | R@5 |", "|---|---|---|---|---|---|"]
  for phase in config.train.phases:
    lines.append(f"| {labels.get(phase, phase)} | {cell(phase, 'top1_known')} | {cell(phase, 'top1_unknown')} | "
                 f"{cell('ret_' + phase, 'mrr')} | {cell('ret_' + phase, 'r1')} | {cell('ret_' + phase, 'r5')} |")
  lines += ["", "## GAIR against the best fixed query (MRR x 100)", "",
            "The fixed queries: the composite prompt's CLIP text feature, and q(lam) for every lam of "
            f"{list(config.gair.lams)}, the same lam for every query; 'best' is the best of them per seed.", "",
            "| tokens | composite | best fixed | GAIR | GAIR - best fixed |", "|---|---|---|---|---|"]
  for phase, per_seed in out["gair"].items():
    comp = [m["composite"]["mrr"] for m in per_seed.values()]
    best = [m[m["best_fixed"]]["mrr"] for m in per_seed.values()]
    g = [m["gair"]["mrr"] for m in per_seed.values()]
    diff = [a - b for a, b in zip(g, best)]
    lines.append(f"| {labels.get(phase, phase)} | {_mean_std(comp)} | {_mean_std(best)} | {_mean_std(g)} | "
                 f"{_mean_std(diff)} |")
  residual = max(out["subspace_residual"].values())
  return lines + ["", f"The exported subspace tokens lie within {residual:.1e} of the words' span (least squares).", ""]


def initialisation_report(config, conv: dict) -> list[str]:
  lines = ["## Multi-token initialisation (Fig. 3)", "",
           "TI's noise MSE, 1 shot per class, mean over classes and seeds "
           f"{list(config.init.seeds)} (smoothed over the 50 steps before):", ""]
  marks = list(next(iter(conv["at"].values())))
  lines += ["| start | " + " | ".join(f"step {m}" for m in marks) + " |", "|---" * (len(marks) + 1) + "|"]
  for variant, at in conv["at"].items():
    lines.append(f"| {variant} | " + " | ".join(f"{at[m]:.4f}" for m in marks) + " |")
  return lines + ["", "![init convergence](init_convergence/init_convergence.png)", ""]
