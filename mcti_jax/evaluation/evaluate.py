"""The evaluation harness: N-shot settings x evaluators x seeds on one test split.

  results = run(config)   # config from mcti_jax/configs/eval.py

For every (N, seed) it trains (or resumes, or finds finished) one run of
config.train's phases, then scores it with every evaluator of config.evals
(mcti_jax/evaluation/evaluators/) on the test images, one row each. Each finished row is added
to results.json at once, so an interrupted evaluation resumes where it
stopped. The markdown table and the plots are drawn from results.json alone,
so every number in them can be traced to a row there. A rerun with other
settings recomputes only the rows and cells they change (_drop_stale_rows).
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np

from mcti_jax import data as D
from mcti_jax.runtime import distributed
from mcti_jax.evaluation import evaluators, metrics
from mcti_jax import paths, plots
from mcti_jax.training import phases, runs, train
from mcti_jax.tokens import placeholders as tok
from mcti_jax.classify import clip_head
from mcti_jax.errors import ConfigError
from mcti_jax.models import hf_io


def _train_config(config, n_shots: int, seed: int) -> ml_collections.ConfigDict:
  c = copy.deepcopy(config.train)
  with c.unlocked():
    c.data.n_shots, c.data.shot_seed, c.seed = n_shots, seed, seed
    c.workdir = str(Path(config.workdir) / f"{n_shots}shot" / f"seed{seed}")
  return c


def test_images(config, result: train.TrainResult):
  """The evaluation images: the test split, or (one pool for shots and test) everything but this run's shots."""
  data_cfg = config.train.data
  pool = D.load_labeled(data_cfg, "test")
  keep = pool.labels < result.num_classes
  if data_cfg.source in ("digits", "folder"):
    keep[np.asarray(result.shot_positions).ravel()] = False  # every class's, also those another process loaded
  test = pool.subset(np.flatnonzero(keep))
  if len(test) == 0:
    raise D.DataError(f"the test split of {pool.source} holds no images of the {result.num_classes} trained classes")
  return test


def evals_of(config) -> dict[str, dict]:
  """config.evals in the order the config wrote them (ConfigDict.items() sorts by name): rows run and show in it."""
  return json.loads(config.evals.to_json_best_effort())


def labels_of(config) -> dict[str, str]:
  """Row name -> its label in tables and plots, in config.evals' order."""
  return {name: evaluators.label(name, entry) for name, entry in evals_of(config).items()}


# ------------------------------------------------------------------ the loop


def run(config: ml_collections.ConfigDict, log: Callable[[str], None] = print) -> dict[str, Any]:
  """Fill config's grid of rows, then write the reports. With several processes (runtime/distributed.py) all compute every
  row and process 0 alone writes; the others return the results with no table."""
  workdir = Path(config.workdir)
  paths.output_folder(workdir, "config.workdir")  # before any cell trains
  main = distributed.is_main()
  log = distributed.main_only(log)
  evals = {name: evaluators.make(name, entry) for name, entry in evals_of(config).items()}
  _check_phases_exist(config)
  labels = labels_of(config)
  results_path = workdir / "results.json"
  results = json.loads(results_path.read_text()) if results_path.is_file() else {"rows": []}
  made_with = _made_with(config)
  dropped = _drop_stale_rows(results, results_path, made_with, log)
  retrain = _cells_to_retrain(config, log)
  results["rows"] = [r for r in results["rows"] if (r["n_shots"], r["seed"]) not in retrain]
  results.update(made_with)
  if main and (dropped or retrain):
    _write_json(results_path, results)  # before the cells go: a rerun that finds them gone finds no rows of them
  if main and retrain:  # set aside, not deleted: a mistaken override must not throw trained cells away
    aside = workdir / "replaced" / time.strftime("%Y%m%d-%H%M%S")
    for n_shots, seed in retrain:
      cell = Path(_train_config(config, n_shots, seed).workdir)
      (aside / cell.parent.name).mkdir(parents=True, exist_ok=True)
      shutil.move(cell, aside / cell.parent.name / cell.name)
    log(f"the replaced cells are kept in {aside} (delete it once the new ones are trained)")
  distributed.agreed_min(len(retrain))  # every process waits for the stale cells to go before training
  done = {(r["method"], r["n_shots"], r["seed"]) for r in results["rows"]}
  features_cache: dict[str, np.ndarray] = {}
  models, pca_features = None, None

  for n_shots in config.n_shots:
    for seed in config.seeds:
      todo = [name for name in evals if (name, n_shots, seed) not in done]
      if not todo:
        continue
      cell = make_cell(config, n_shots, seed, models, features_cache, log)
      models, trained = cell.models, cell.result
      for name in todo:
        out = evals[name].run(cell, name)
        if isinstance(out, dict):  # a retrieval or generation evaluator: its metrics are the row (no report)
          results["rows"].append({"method": name, "n_shots": n_shots, "seed": seed, **out})
          if main:
            _write_json(results_path, results)
          log(f"   {labels[name]:<28} {_dict_row_line(out)}")
          continue
        scores, labels_, info = out
        report = metrics.classification_report(scores, labels_, trained.num_classes)
        row = {"method": name, "n_shots": n_shots, "seed": seed, **report, **info,
               **{f"top1_{g}": metrics.accuracy_on(report, cls) for g, cls in config.class_groups.items()}}
        results["rows"].append(row)
        if main:
          _write_json(results_path, results)
          plots.confusion(report["confusion"], trained.class_names,
                          workdir / "confusion" / f"{name}_{n_shots}shot_seed{seed}.png",
                          f"{labels[name]}, {n_shots}-shot, seed {seed}: top-1 {100 * row['top1']:.1f}%")
        log(f"   {labels[name]:<28} top-1 {100 * row['top1']:.1f}%")
      pca_features = _pca_features(cell)  # Fig. 4 shows the last cell
      results["token_pca"] = {"n_shots": n_shots, "seed": seed}
      results["class_names"] = list(trained.class_names)
      if main:
        _write_json(results_path, results)
  if not main:
    return {"results": results, "table": None, "figures": {}}
  return write_reports(workdir, results, config, pca_features)


def make_cell(config: ml_collections.ConfigDict, n_shots: int, seed: int, models: evaluators.Models | None = None,
              features_cache: dict | None = None, log: Callable[[str], None] = print) -> evaluators.Cell:
  """Train (or resume) the (N-shot, seed) run of `config` and gather what its evaluators share.

  Pass the `models` and `features_cache` of an earlier cell to load and encode once.
  """
  tcfg = _train_config(config, n_shots, seed)
  log(f"== {n_shots}-shot, seed {seed}: training {tcfg.workdir}")
  trained = train.train(tcfg, log=log)
  if models is None:
    models = evaluators.Models.load(config.train, trained.num_classes, log)
  test = test_images(config, trained)
  features = _test_features(models, test, tcfg.data.resolution, {} if features_cache is None else features_cache)
  return evaluators.Cell(models=models, result=trained, train_config=tcfg, test=test, test_features=features,
                         out_dir=Path(config.workdir), n_shots=n_shots, seed=seed)


def _dict_row_line(row: dict) -> str:
  shown = [k for k in GENERATION_METRICS if isinstance(row.get(k), float)]
  if shown:  # a generation evaluator's
    return "  ".join(f"{k} {row[k]:.3f}" if k == "clip_similarity" else f"{k} {100 * row[k]:.1f}%" for k in shown)
  return _retrieval_line(row)


def _retrieval_line(row: dict) -> str:
  if row.get("mrr") is None:
    return f"no query had a relevant image ({row.get('skipped', 0)} skipped)"
  return f"MRR {100 * row['mrr']:.1f}  R@1 {100 * row['r1']:.1f}%  R@5 {100 * row['r5']:.1f}%"


def _check_phases_exist(config) -> None:
  """An evaluator of a phase's tokens needs that phase trained: say so before hours of training, not after."""
  trained = [p.name for p in phases.plan(config.train)]
  for name, entry in evals_of(config).items():
    wanted = entry.get("phase") or entry.get("tokens")
    if wanted and wanted not in trained:
      raise ConfigError(f"config.evals.{name} scores the tokens of phase {wanted!r}, but config.train trains "
                        f"{trained}; train that phase or change the evaluator.")


# Settings that only say which cells to fill or where files go: results.json's rows stay valid when they change.
GRID_SETTINGS = ("workdir", "seeds", "n_shots", "generation", "train.workdir", "train.data.cache_dir", "train.mesh",
                 "train.num_devices")


def _made_with(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The settings and checkpoint contents that results.json's rows depend on."""
  return {"settings": json.loads(config.to_json_best_effort()),
          "weights": {"sd": runs.weights_fingerprint(config.train.model.sd_path),
                      "clip": runs.weights_fingerprint(config.train.model.clip_path)}}


def _drop_stale_rows(results: dict, path: Path, made_with: dict, log: Callable[[str], None]) -> bool:
  """Drop the rows of results.json that these settings would make otherwise; whether any went.

  results.json records the settings and weights its rows were made with, and a rerun recomputes only what a change
  touches, never reusing a row made otherwise:
  - a label is cosmetic: tables and plots read it from the config, so a new one recomputes nothing;
  - a changed setting of evaluator <name> drops <name>'s rows, in every cell; an evaluator not asked for now keeps
    its rows and their recorded settings (out of the table: back in it, unchanged, when asked for again);
  - any other changed setting (config.train, class_groups) drops every row, as every row is made from a trained
    cell; _cells_to_retrain then says which cells the trainer cannot resume, to train them again;
  - other model weights are refused: nothing in the workdir would be kept, so a new workdir is as good.
  The grid (GRID_SETTINGS) may change freely: a cell is a cell whichever grid it is part of.
  """
  if not results["rows"]:
    return False
  if "weights" not in results:
    raise ConfigError(f"{path} holds results made by an older mcti-jax that did not record its weights. Use a new "
                      f"--config.workdir, or delete {path.parent} to start over.")
  if changes := runs.settings_changes({"weights": results["weights"]}, {"weights": made_with["weights"]}):
    raise ConfigError(f"{path} holds results made with other model weights ({changes}). Use a new "
                      f"--config.workdir, or delete {path.parent} to start over.")
  old, new, rows = results["settings"], made_with["settings"], results["rows"]
  if changes := runs.settings_changes(old, new, ignore=(*GRID_SETTINGS, "evals")):
    log(f"results.json's rows were made with other settings ({changes}): every row is recomputed")
    results["rows"] = []
    return True
  cosmetic = lambda entry: {k: v for k, v in entry.items() if k != "label"}  # noqa: E731
  old_evals = old.get("evals", {})
  for name, entry in new["evals"].items():
    if name not in old_evals:
      changes = "settings not recorded" if any(r["method"] == name for r in rows) else ""
    else:
      changes = runs.settings_changes({"evals": {name: cosmetic(old_evals[name])}},
                                      {"evals": {name: cosmetic(entry)}})
    if changes:
      log(f"config.evals.{name} changed ({changes}): its rows are recomputed")
      rows = [r for r in rows if r["method"] != name]
  kept = {r["method"] for r in rows} - set(new["evals"])  # their rows stay, with the settings they were made with
  new["evals"].update({name: old_evals[name] for name in kept if name in old_evals})
  dropped, results["rows"] = len(rows) < len(results["rows"]), rows
  return dropped


def _cells_to_retrain(config: ml_collections.ConfigDict, log: Callable[[str], None]) -> list[tuple[int, int]]:
  """The (N, seed) cells of config's grid whose trained run the trainer would refuse to resume (its run.json made
  with other training settings, or by another version): they are set aside under <workdir>/replaced/ and trained
  again, and their rows dropped. A run that only gains steps is resumed by the trainer instead. The trainer itself
  still checks the data's and weights' fingerprints."""
  stale: dict[str, list[str]] = {}  # what changed -> the cells it changed for
  cells = []
  for n_shots in config.n_shots:
    for seed in config.seeds:
      tcfg = _train_config(config, n_shots, seed)
      path = Path(tcfg.workdir) / "run.json"
      if not path.is_file():
        continue
      old = json.loads(path.read_text())
      if old.get("version") != runs.SIGNATURE_VERSION:
        changes = f"run.json version {old.get('version', 1)}, this mcti-jax writes {runs.SIGNATURE_VERSION}"
      else:
        changes = runs.resume_changes(old, {**old, "config": json.loads(tcfg.to_json_best_effort())})
      if changes:
        changes = re.sub(r"(^|, )config\.", r"\1train.", changes)  # run.json's config is config.train
        stale.setdefault(changes, []).append(f"{n_shots}shot/seed{seed}")
        cells.append((n_shots, seed))
  for changes, names in stale.items():
    log(f"cells {', '.join(names)} were trained with other settings ({changes}): they are trained again from "
        "scratch")
  return cells


def _test_features(models: evaluators.Models, test, resolution: int, cache: dict) -> np.ndarray:
  """CLIP image features of the test images, computed once per image and reused across cells."""
  missing = [i for i in test.ids if i not in cache]
  if missing:
    positions = np.asarray([k for k, i in enumerate(test.ids) if i not in cache])
    feats = clip_head.image_features(models.clip, test.subset(positions), resolution, models.mesh)
    cache.update(zip((test.ids[p] for p in positions), feats))
  return np.stack([cache[i] for i in test.ids])


def _pca_features(cell: evaluators.Cell) -> dict[str, np.ndarray]:
  """Text features [K, T, P] of every phase's tokens under each TI template (MC-TI Fig. 4)."""
  out = {}
  for phase in cell.result.tokens:
    per_template = [cell.token_text_features(phase, (t,)) for t in tok.TI_TEMPLATES]  # each class's own V_k
    out[phase] = np.stack([np.asarray(f) for f in per_template], axis=1)
  return out


def _write_json(path: Path, obj) -> None:
  hf_io.write_folder(path.parent, {path.name: obj})


# ------------------------------------------------------------------ reports


def requested(results: dict, config) -> dict:
  """results with only the rows of config's grid (n_shots x seeds x evals).

  results.json keeps every row ever made in the workdir; a report on seeds [1] must not average in seed 2's rows.
  """
  grid = {(m, n, s) for m in config.evals for n in config.n_shots for s in config.seeds}
  return {**results, "rows": [r for r in results["rows"] if (r["method"], r["n_shots"], r["seed"]) in grid]}


RETRIEVAL_METRICS = ("mrr", "r1", "r5")  # a retrieval evaluator's row (evaluators/retrieval.py)
# generation evaluators' rows (evaluators/generation_accuracy.py, clip_similarity.py)
GENERATION_METRICS = ("gen_top1", "gen_top5", "baseline_top1", "baseline_top5", "clip_similarity")


def summary(results: dict) -> dict[tuple[str, int, str], tuple[float, float, int]]:
  """(method, N, metric) -> (mean, std, number of seeds), over the rows of results.json."""
  cells: dict[tuple[str, int, str], list[float]] = {}
  for row in results["rows"]:
    for key, value in row.items():
      if (key.startswith("top") or key in RETRIEVAL_METRICS + GENERATION_METRICS) and isinstance(value, float):
        cells.setdefault((row["method"], row["n_shots"], key), []).append(value)
  return {k: (float(np.mean(v)), float(np.std(v)), len(v)) for k, v in cells.items()}


def markdown_table(results: dict, labels: dict[str, str], metric: str = "top1") -> str:
  """Rows x N-shot, top-1 in % as mean ± std over seeds (MC-TI Table 1's layout); `labels` names and orders rows."""
  cells = summary(results)
  shots = sorted({n for (_, n, m) in cells if m == metric})
  methods = [m for m in labels if any(k[0] == m and k[2] == metric for k in cells)]
  lines = ["| method | " + " | ".join(f"{n}-shot" for n in shots) + " |", "|---|" + "---|" * len(shots)]
  for m in methods:
    row = []
    for n in shots:
      mean, std, count = cells.get((m, n, metric), (np.nan, np.nan, 0))
      row.append(f"{100 * mean:.1f} ± {100 * std:.1f}" if count else "")
    lines.append(f"| {labels[m]} | " + " | ".join(row) + " |")
  return "\n".join(lines)


SMOKE_TEST = ("> **Smoke test** (a `:quick` preset): a few training steps, to check that everything runs. These "
              "numbers say nothing about the methods; the full presets' do.")


def smoke_banner(config) -> list[str]:
  """The report's first lines when `config.smoke_test` is set (the :quick presets)."""
  return [SMOKE_TEST, ""] if config.get("smoke_test") else []


def dic_protocol(shown: dict, labels: dict[str, str]) -> list[str]:
  """One line per Diffusion Classifier row: its schedule, UNet calls per image and the test images it scored."""
  lines = []
  for method in dict.fromkeys(r["method"] for r in shown["rows"] if "unet_calls_per_image" in r):
    rows = [r for r in shown["rows"] if r["method"] == method]
    scored, split = {r["num_images"] for r in rows}, {r.get("test_images") for r in rows}
    images = (f"all {rows[0]['num_images']} test images" if scored == split else
              f"an evenly spread {'/'.join(map(str, sorted(scored)))} of the "
              f"{'/'.join(str(n) for n in sorted(split - {None})) or '?'} test images")
    lines.append(f"- {labels.get(method, method)}: {rows[0].get('schedule', rows[0]['strategy'])}; "
                 f"{np.mean([r['unet_calls_per_image'] for r in rows]):.0f} UNet calls per image on average "
                 f"(at most {rows[0]['unet_calls_bound']}); {images} per cell.")
  return ["Diffusion Classifier rows:", "", *lines, ""] if lines else []


def write_reports(workdir: Path, results: dict, config, pca_features) -> dict[str, Any]:
  """results.md and the figures for config's grid; pca_features None (no cell computed now) keeps token_pca.png."""
  shown = requested(results, config)
  metric_names = ["top1"] + [f"top1_{g}" for g in config.class_groups]
  parts = [f"# Evaluation: {config.train.preset}", "", *smoke_banner(config),
           f"Top-1 accuracy (%), mean ± std over seeds {list(config.seeds)}; every cell is a mean of rows of "
           "results.json.", ""]
  for metric in metric_names:
    title = "all classes" if metric == "top1" else f"{metric[5:]} classes {list(config.class_groups[metric[5:]])}"
    parts += [f"## {title} [{metric}]", "", markdown_table(shown, labels_of(config), metric), ""]
  parts += dic_protocol(shown, labels_of(config))
  if any("mrr" in row for row in shown["rows"]):
    parts += ["## composite retrieval", "", "MRR (x 100), R@1 and R@5 (%) of the retrieval evaluators, mean ± std "
              "over seeds.", ""]
    for metric in RETRIEVAL_METRICS:
      parts += [f"[{metric}]", "", markdown_table(shown, labels_of(config), metric), ""]
  generation = [m for m in GENERATION_METRICS if any(m in row for row in shown["rows"])]
  if generation:
    parts += ["## generation", "", "Generations judged by a classifier, top-1 and top-5 (%), with the class token "
              "(gen_) and the SD baseline without it (baseline_); CLIP image similarity to the shots (x 100); mean ± "
              "std over seeds.", ""]
    for metric in generation:
      parts += [f"[{metric}]", "", markdown_table(shown, labels_of(config), metric), ""]
  table_path = workdir / "results.md"
  figures = {"accuracy_vs_shots": plots.accuracy_vs_shots(summary(shown), labels_of(config),
                                                          workdir / "accuracy_vs_shots.png")}
  if pca_features is not None:
    figures["token_pca"] = plots.token_pca(pca_features, results["class_names"], workdir / "token_pca.png")
  elif (workdir / "token_pca.png").is_file():  # every cell was done before: the figure of an earlier run
    figures["token_pca"] = workdir / "token_pca.png"
  parts += [f"![accuracy vs N-shot]({figures['accuracy_vs_shots'].name})", ""]
  if "token_pca" in figures:
    cell = results.get("token_pca")
    shows = f" ({cell['n_shots']}-shot, seed {cell['seed']})" if cell else ""
    parts += [f"![token text features, PCA{shows}]({figures['token_pca'].name})", ""]
  hf_io.write_folder(workdir, {"results.md": "\n".join(parts).encode()})
  return {"results": results, "table": table_path, "figures": figures}
