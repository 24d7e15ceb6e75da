"""`mcti demo --config custom_demo`: custom tokens in the tiny world, and multi-token initialisation.

1. Composition. For each shot seed, one run trains TI, MC-TI (after TI) and
   custom tokens, free and in the span of the tiny CLIP's shape words, side
   by side (phases of mcti_jax/configs/custom_demo.py). The eval harness scores each
   on plain classification (the CLIP-token head, known 0-4 / unknown 5-9) and
   on composite queries "a photo of a S_k <shape word>" over the held-out
   digits (retrieval/tiny_world.py). GAIR (retrieval/gair.py) then refines the queries of
   the tokens of `gair.phases`, against the best fixed query of the same tokens, in two rows from one
   search: GAIR's lam search alone (the paper's method, GairConfig's default) and the search plus our query
   expansion (the drawings' CLIP feature added to the query, expand_query=True).
2. The subspace's residual: the distance of the exported custom tokens from
   the span of the words, measured independently (least squares).
3. The multi-token initialisation paper's Fig. 3: TI's noise MSE from a caption (an oracle), the true label,
   the labels CLIP zero-shot and the digit guide predict, "*" and V x "*" (init_convergence.py).
4. (`custom_demo:gair_tune` only) the grid GAIR's defaults were chosen on: the subspace custom tokens trained
   alone on each shot seed of `gair.tuned_on`, each search setting of `gair_tune.grid` run once and scored without
   and with the expansion at every `gair_tune.image_weights`.

Everything lands in <workdir>/: results.json (the harness's rows plus
"gair", "subspace_residual", "init_convergence"), report.md, the harness's
results.md and plots, GAIR's strips per query, init_convergence.png.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from mcti_jax.evaluation import evaluate
from mcti_jax.demos import init_convergence
from mcti_jax import paths
from mcti_jax.retrieval import retrieve
from mcti_jax.retrieval.metrics import metrics
from mcti_jax.retrieval.queries import normalize
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
  if "gair_tune" in config.parts:
    out["gair_tuning"] = gair_tuning(config, workdir, log)
    hf_io.write_folder(workdir, {"gair_tuning.json": out["gair_tuning"]})
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
  out["gair"] = {}
  for phase in config.gair.phases:
    per_seed = {}
    for seed in config.seeds:
      r = gair_rows(config, _export(config, seed, phase), workdir / "gair" / phase / f"seed{seed}")
      per_seed[seed] = {kind: r["metrics"][kind]["overall"] for kind in r["metrics"]} | {"best_fixed": r["best_fixed"]}
      log(f"   {phase} seed {seed}: composite MRR {_mrr(per_seed[seed], 'composite')}, best fixed "
          f"({r['best_fixed']}) {_mrr(per_seed[seed], r['best_fixed'])}, GAIR {_mrr(per_seed[seed], 'gair_search')}, "
          f"GAIR + query expansion {_mrr(per_seed[seed], 'gair')}")
    out["gair"][phase] = per_seed
  log("[3/3] the custom tokens' distance from the span of the subspace words")
  embeddings = _word_embeddings(config)
  out["subspace_residual"] = {seed: subspace.residual(_custom_tokens(config, seed), embeddings)
                              for seed in config.seeds}
  log(f"   max residual {max(out['subspace_residual'].values()):.2e}")
  results.update({k: out[k] for k in ("gair", "subspace_residual")})
  hf_io.write_folder(workdir, {"results.json": results})  # the harness's rows and the demo's own parts
  return out


def gair_rows(config, tokens: Path, out_dir: Path) -> dict:
  """One search of GAIR for every query of one export, scored twice: with our query expansion ("gair", the
  query retrieve.py ranks with and the strips show) and without it ("gair_search": q(lam) at the searched lam,
  the paper's GAIR); the fixed queries beside them. The search does not depend on the expansion, so the two
  rows share their drawings and lams. Writes <out_dir>/results.json (retrieve.py's, plus "gair_search")."""
  settings = gair.GairConfig(**config.gair.settings.to_dict())
  setup = retrieve.tiny_setup(tokens, log=lambda _: None)
  r = retrieve.retrieve(setup, tuple(config.gair.lams), dataclasses.replace(settings, expand_query=True), out_dir,
                        log=lambda _: None)
  lam = [row["gair"]["lam"] for row in r["per_query"]]
  features = gair.searched_queries(setup.clip, setup.tokenizer, setup.learned, setup.queries, lam,
                                   pooling=setup.pooling)
  scores = features @ normalize(np.asarray(setup.gallery_features, np.float32)).T
  r["metrics"]["gair_search"] = metrics(scores, setup.relevant, [q.type for q in setup.queries])
  r["query_kinds"] = {"gair": "GAIR's lam search + our query expansion (expand_query=True)",
                      "gair_search": "GAIR's lam search alone: q(lam) at the searched lam (the paper's GAIR)"}
  hf_io.write_folder(out_dir, {"results.json": {k: v for k, v in r.items() if k != "out_dir"}})
  return r


def gair_tuning(config, workdir: Path, log) -> dict:
  """MRR x 100 minus the best fixed query's, per tuning seed and setting: {"rows": [{seed, lam_max, class_keep,
  attribute_threshold, best_fixed, search, "expand_<weight>": ..., "expand_<weight>_plain": ...}]}."""
  from mcti_jax.retrieval.queries import fixed_queries, prompt_features
  from mcti_jax.training import train
  rows = []
  for seed in config.gair.tuned_on:
    c = copy.deepcopy(config.train)
    with c.unlocked():
      c.data.n_shots, c.data.shot_seed, c.seed = config.n_shots[0], seed, seed
      c.workdir, c.phases = str(workdir / f"seed{seed}"), ("custom",)
    log(f"GAIR tuning, seed {seed}: training the subspace custom tokens alone")
    setup = retrieve.tiny_setup(train.train(c, log=lambda _: None).exports["custom"], log=lambda _: None)
    gallery = normalize(np.asarray(setup.gallery_features, np.float32))
    score = lambda features: 100 * metrics(features @ gallery.T, setup.relevant)["overall"]["mrr"]  # noqa: E731
    fixed = fixed_queries(setup.clip, setup.tokenizer, setup.queries, setup.learned, tuple(config.gair.lams),
                          setup.pooling)
    best = max(score(f) for f in fixed.values())
    text = lambda prompts: prompt_features(setup.clip, setup.tokenizer, prompts, setup.learned,  # noqa: E731
                                           setup.pooling)
    class_text, composite = text([q.class_prompt for q in setup.queries]), text([q.prompt for q in setup.queries])
    for lam_max, class_keep, threshold in config.gair_tune.grid:
      settings = gair.GairConfig(**{**config.gair.settings.to_dict(), "lam_max": lam_max, "class_keep": class_keep,
                                    "attribute_threshold": threshold, "expand_query": True})
      r = gair.refine(setup.sd, setup.clip, setup.tokenizer, setup.learned, setup.queries, settings,
                      pooling=setup.pooling, log=lambda _: None)
      row = {"seed": seed, "lam_max": lam_max, "class_keep": class_keep, "attribute_threshold": threshold,
             "best_fixed": best, "search": score(r.search_features) - best}
      for weight in config.gair_tune.image_weights:
        for name, w in ((f"expand_{weight:g}", r.weights), (f"expand_{weight:g}_plain", np.ones_like(r.weights))):
          row[name] = score(gair.query_feature(class_text, composite, r.lam, r.image_features, w, weight)) - best
      rows.append(row)
      log(f"   seed {seed} lam_max {lam_max:g} class_keep {class_keep:g} attribute_threshold {threshold:g}: search "
          f"{row['search']:+.1f}, " + ", ".join(f"{k} {v:+.1f}" for k, v in row.items() if k.startswith("expand")))
  return {"rows": rows}


def initialisation(config, workdir: Path, log) -> dict:
  """Fig. 3: TI's noise MSE from a caption (oracle), the true label, predicted labels, "*" and V x "*"."""
  log("multi-token initialisation: TI's noise MSE from six starts (Fig. 3)")
  conv = init_convergence.run(config.train, workdir / "init_convergence", seeds=tuple(config.init.seeds),
                              steps=config.init.steps, log=log)
  return {k: conv[k] for k in ("steps", "curves", "at", "texts", "labels_right", "elapsed_s")}


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


def _signed(values: list[float], reference: list[float]) -> str:
  """Mean ± std of values - reference over seeds, with the seeds' own differences: "-1.2 ± 3.4 (+2.0, -5.1, ...)"."""
  diff = [a - b for a, b in zip(values, reference) if a is not None and b is not None]
  if not diff:
    return "n/a"
  return (f"{100 * np.mean(diff):+.1f} ± {100 * np.std(diff):.1f} ("
          + ", ".join(f"{100 * d:+.1f}" for d in diff) + ")")


def _mean_std(values: list[float]) -> str:
  values = [v for v in values if v is not None]
  if not values:
    return "n/a"
  return f"{100 * np.mean(values):.1f} ± {100 * np.std(values):.1f}"


def write_report(config, workdir: Path, out: dict) -> Path:
  lines = ["# Custom tokens in the tiny world", "", *evaluate.smoke_banner(config)]
  if "rows" in out:
    lines += composition_report(config, out)
  if "gair_tuning" in out:
    lines += tuning_report(out["gair_tuning"])
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

  tuned = list(config.gair.tuned_on)
  overlap = sorted(set(tuned) & set(out["seeds"]))
  lines = [f"Seeds {out['seeds']}, 5 shots of each digit; mean ± std over seeds. GAIR's settings were chosen on "
           f"shot seeds {tuned} (retrieval/gair.py)"
           + (f"; **seeds {overlap} are among them, so their GAIR rows are not a fair test**." if overlap else
              ", which are not reported here."), "",
           "## Plain classification and composite retrieval", "",
           "| tokens | top-1 known 0-4 | top-1 unknown 5-9 | composite MRR | R@1 | R@5 |", "|---|---|---|---|---|---|"]
  for phase in config.train.phases:
    lines.append(f"| {labels.get(phase, phase)} | {cell(phase, 'top1_known')} | {cell(phase, 'top1_unknown')} | "
                 f"{cell('ret_' + phase, 'mrr')} | {cell('ret_' + phase, 'r1')} | {cell('ret_' + phase, 'r5')} |")
  lines += ["", "## GAIR against the best fixed query (MRR x 100)", "",
            "The fixed queries: the composite prompt's CLIP text feature, and q(lam) for every lam of "
            f"{list(config.gair.lams)}, the same lam for every query; 'best' is the best of them per seed, picked "
            "on the test gallery. GAIR: its lam search alone, q(lam*) (the paper's method); + expansion: the same "
            "search with the drawings' CLIP feature added to the query (ours, expand_query=True).", "",
            "| tokens | composite | best fixed | GAIR | GAIR - best fixed | GAIR + expansion (ours) | "
            "+ expansion - best fixed |", "|---|---|---|---|---|---|---|"]
  for phase, per_seed in out["gair"].items():
    comp = [m["composite"]["mrr"] for m in per_seed.values()]
    best = [m[m["best_fixed"]]["mrr"] for m in per_seed.values()]
    search = [m["gair_search"]["mrr"] for m in per_seed.values()]
    expanded = [m["gair"]["mrr"] for m in per_seed.values()]
    lines.append(f"| {labels.get(phase, phase)} | {_mean_std(comp)} | {_mean_std(best)} | {_mean_std(search)} | "
                 f"{_signed(search, best)} | {_mean_std(expanded)} | {_signed(expanded, best)} |")
  residual = max(out["subspace_residual"].values())
  return lines + ["", f"The exported subspace tokens lie within {residual:.1e} of the words' span (least squares).", ""]


def tuning_report(tuning: dict) -> list[str]:
  rows = tuning["rows"]
  seeds = list(dict.fromkeys(r["seed"] for r in rows))
  expand = [k for k in rows[0] if k.startswith("expand")] if rows else []
  lines = ["## GAIR's settings (tuning seeds)", "", f"MRR x 100 minus the best fixed query's, seeds {seeds} "
           "(each cell: one value per seed, then their mean).", "",
           "| lam_max | class_keep | attribute_threshold | search | " + " | ".join(expand) + " |",
           "|---" * (4 + len(expand)) + "|"]
  for setting in dict.fromkeys((r["lam_max"], r["class_keep"], r["attribute_threshold"]) for r in rows):
    mine = [r for r in rows if (r["lam_max"], r["class_keep"], r["attribute_threshold"]) == setting]
    cells = [" / ".join(f"{r[k]:+.1f}" for r in mine) + f" ({np.mean([r[k] for r in mine]):+.2f})"
             for k in ("search", *expand)]
    lines.append(f"| {setting[0]:g} | {setting[1]:g} | {setting[2]:g} | " + " | ".join(cells) + " |")
  return lines + [""]


def initialisation_report(config, conv: dict) -> list[str]:
  lines = ["## Multi-token initialisation (Fig. 3)", "",
           "TI's noise MSE, 1 shot per class, mean over classes and seeds "
           f"{list(config.init.seeds)} (smoothed over the 50 steps before). The caption is an oracle (the true "
           "digit name plus the shot's measured shape words); the predicted labels' right share is over classes "
           "and seeds:", ""]
  marks = list(next(iter(conv["at"].values())))
  lines += ["| start | " + " | ".join(f"step {m}" for m in marks) + " | labels right |",
            "|---" * (len(marks) + 2) + "|"]
  for variant, at in conv["at"].items():
    right = conv.get("labels_right", {}).get(variant)
    count = sum(len(t.get("caption", ())) for t in conv["texts"].values())
    share = f"{sum(right.values())}/{count}" if right else ""
    lines.append(f"| {init_convergence.LABELS.get(variant, variant)} | " + " | ".join(f"{at[m]:.4f}" for m in marks)
                 + f" | {share} |")
  return lines + ["", "![init convergence](init_convergence/init_convergence.png)", ""]
