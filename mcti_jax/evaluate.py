"""The evaluation harness: N-shot settings x methods x seeds on one test split.

  results = run(config)   # config from configs/eval.py

For every (N, seed) it trains (or resumes, or finds finished) one TI + MC-TI
run, then scores every method on the test images. Each finished row is added
to results.json at once, so an interrupted evaluation resumes where it
stopped. The markdown table and the plots are drawn from results.json alone,
so every number in them can be traced to a row there.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import ml_collections
import numpy as np

from mcti_jax import data as D
from mcti_jax import export, metrics, plots, runs, train
from mcti_jax.classify import clip_head
from mcti_jax.errors import ConfigError
from mcti_jax.methods import coop
from mcti_jax.models import hf_io
from mcti_jax.models.frozen import freeze

METHOD_NAMES = {"ti": "TI", "mcti": "MC-TI", "mcti_coop": "MC-TI + CoOp", "clip_feat": "CLIP-feat",
                "clip_zeroshot": "CLIP zero-shot (names)", "dic_zeroshot": "DiC zero-shot (names)",
                "dic_fewshot": "DiC few-shot (tokens)"}


def _train_config(config, n_shots: int, seed: int) -> ml_collections.ConfigDict:
  c = copy.deepcopy(config.train)
  with c.unlocked():
    c.data.n_shots, c.data.shot_seed, c.seed = n_shots, seed, seed
    c.workdir = str(Path(config.workdir) / f"{n_shots}shot" / f"seed{seed}")
  return c


def test_images(config, setup: train.Setup):
  """The evaluation images: the test split, or (one pool for shots and test) everything but this run's shots."""
  data_cfg = config.train.data
  pool = train.load_labeled(data_cfg, "test")
  keep = pool.labels < setup.num_classes
  if data_cfg.source in ("digits", "folder"):
    keep[np.asarray(setup.shots.shot_positions).ravel()] = False
  test = pool.subset(np.flatnonzero(keep))
  if len(test) == 0:
    raise D.DataError(f"the test split of {pool.source} holds no images of the {setup.num_classes} trained classes")
  return test


class Context:
  """What the methods of one (N, seed) cell share: models, tokens, test features."""

  def __init__(self, config, setup: train.Setup, exports: dict, test, test_features: np.ndarray):
    self.config, self.setup, self.exports, self.test = config, setup, exports, test
    self.test_features = test_features
    self.clip = freeze(setup.clip)
    self.first_id = int(setup.class_tokens.ids[0, 0])
    template = clip_head.TEMPLATES.get(config.template, config.template)
    templates = tuple(clip_head.TEMPLATES.values()) if config.ensemble else (template,)
    from mcti_jax import tokens as tok
    self.template_ids = jnp.asarray(tok.template_ids(setup.sd.tokenizer, templates, setup.class_tokens))
    self.shot_features = np.asarray(setup.data.image_features)[: setup.num_classes, :, 0]

  def tokens(self, phase: str) -> np.ndarray:
    return export.load_tokens(self.exports[phase])[0]

  def token_scores(self, phase: str) -> np.ndarray:
    text = clip_head.class_text_features(self.clip, jnp.asarray(self.tokens(phase)), self.template_ids,
                                         first_id=self.first_id, pooling=self.config.train.model.pooling)
    return np.asarray(clip_head.cosine_scores(self.test_features, text))

  def scored(self, scores) -> tuple[np.ndarray, np.ndarray, dict]:
    """A method's result on every test image."""
    return scores, self.test.labels, {}


def _ti(ctx: Context):
  return ctx.scored(ctx.token_scores("ti"))


def _mcti(ctx: Context):
  return ctx.scored(ctx.token_scores("mcti"))


def _mcti_coop(ctx: Context):
  s, cfg = ctx.setup, coop.CoOpConfig(**ctx.config.coop)
  context_ids = coop.add_context_tokens(s.sd.tokenizer, cfg.num_context)  # this cell's own tokenizer
  template_ids = jnp.asarray(coop.context_template_ids(s.sd.tokenizer, s.class_tokens, cfg.num_context))
  pooling = ctx.config.train.model.pooling
  context, _ = coop.train_context(ctx.clip, ctx.tokens("mcti"), template_ids, context_ids, ctx.shot_features,
                                  first_id=ctx.first_id, pooling=pooling, cfg=cfg)
  text = coop.text_features(ctx.clip, ctx.tokens("mcti"), template_ids, context_ids, context, first_id=ctx.first_id,
                            pooling=pooling)
  return ctx.scored(np.asarray(clip_head.cosine_scores(ctx.test_features, text)))


def _clip_feat(ctx: Context):
  return ctx.scored(np.asarray(clip_head.cosine_scores(ctx.test_features,
                                                       clip_head.prototype_features(ctx.shot_features))))


def _clip_zeroshot(ctx: Context):
  names = ctx.setup.class_names
  text = clip_head.name_text_features(ctx.clip, ctx.setup.sd.tokenizer, names, (ctx.config.zeroshot_template,))
  return ctx.scored(np.asarray(clip_head.cosine_scores(ctx.test_features, text)))


def _dic(ctx: Context, learned: bool):
  """The Diffusion Classifier on a fixed subset of the test images (it costs many UNet calls per image)."""
  from mcti_jax import conditioning
  from mcti_jax.classify import diffusion_classifier as dic
  c, s = ctx.config.dic, ctx.setup
  cfg = dic.preset(c.preset, error=c.error) if c.error else dic.preset(c.preset)
  text_encoder = freeze(s.sd.text_encoder)
  if learned:
    tokens = conditioning.LearnedTokens(s.class_tokens, ctx.tokens(c.tokens), tuple(s.class_names))
    contexts = dic.class_contexts(text_encoder, s.sd.tokenizer, learned=tokens, template=c.template)
  else:
    contexts = dic.class_contexts(text_encoder, s.sd.tokenizer, class_names=s.class_names,
                                  template=ctx.config.zeroshot_template)
  # Evenly spread positions: the same subset for every method and seed whose test split is the same.
  count = min(c.max_images, len(ctx.test))
  subset = ctx.test.subset(np.linspace(0, len(ctx.test) - 1, count).round().astype(int))
  kind = "fewshot" if learned else "zeroshot"
  key = dic.settings_key(cfg, s.sd.schedule, contexts, extra={"sd": runs.fingerprint(s.config.model.sd_path),
                                                              "resolution": s.config.data.resolution})
  cache = dic.ResultCache(Path(s.config.workdir) / f"dic_{kind}.jsonl", key)
  result = dic.evaluate(freeze(s.sd.unet), s.sd.schedule, contexts, subset.batches(s.config.data.resolution, 8), cfg,
                        encode=dic.latent_encoder(freeze(s.sd.vae), s.mesh), mesh=s.mesh, cache=cache,
                        image_ids=subset.ids, total=len(subset))
  scores = np.full((len(subset), s.num_classes), -np.inf)
  for i, r in enumerate(result.results):  # higher is better: minus the position in DiC's ranking
    scores[i, r.ranking] = -np.arange(len(r.ranking))
  info = {k: result.summary()[k] for k in ("images_per_s", "unet_evals_per_s", "unet_evals", "num_computed")}
  return scores, subset.labels, info


METHODS: dict[str, Callable[[Context], tuple[np.ndarray, np.ndarray, dict]]] = {
    "ti": _ti, "mcti": _mcti, "mcti_coop": _mcti_coop, "clip_feat": _clip_feat, "clip_zeroshot": _clip_zeroshot,
    "dic_zeroshot": lambda ctx: _dic(ctx, learned=False), "dic_fewshot": lambda ctx: _dic(ctx, learned=True),
}


# ------------------------------------------------------------------ the loop


def run(config: ml_collections.ConfigDict, log: Callable[[str], None] = print) -> dict[str, Any]:
  workdir = Path(config.workdir)
  unknown = [m for m in config.methods if m not in METHODS]
  if unknown:
    raise ConfigError(f"unknown methods {unknown}; available: {sorted(METHODS)}")
  results_path = workdir / "results.json"
  results = json.loads(results_path.read_text()) if results_path.is_file() else {"rows": []}
  made_with = _made_with(config)
  _check_rows_reusable(results, results_path, made_with)
  results.update(made_with)
  done = {(r["method"], r["n_shots"], r["seed"]) for r in results["rows"]}
  features_cache: dict[str, np.ndarray] = {}
  pca_features = None

  for n_shots in config.n_shots:
    for seed in config.seeds:
      todo = [m for m in config.methods if (m, n_shots, seed) not in done]
      if not todo:
        continue
      tcfg = _train_config(config, n_shots, seed)
      log(f"== {n_shots}-shot, seed {seed}: training {tcfg.workdir}")
      trained = train.train(tcfg, log=log)
      setup = trained["setup"]
      test = test_images(config, setup)
      features = _test_features(setup, test, features_cache)
      ctx = Context(config, setup, trained["exports"], test, features)
      for method in todo:
        scores, labels, info = METHODS[method](ctx)
        report = metrics.classification_report(scores, labels, setup.num_classes)
        row = {"method": method, "n_shots": n_shots, "seed": seed, **report, **info,
               **{f"top1_{g}": metrics.accuracy_on(report, cls) for g, cls in config.class_groups.items()}}
        results["rows"].append(row)
        _write_json(results_path, results)
        plots.confusion(report["confusion"], setup.class_names,
                        workdir / "confusion" / f"{method}_{n_shots}shot_seed{seed}.png",
                        f"{METHOD_NAMES[method]}, {n_shots}-shot, seed {seed}: top-1 {100 * row['top1']:.1f}%")
        log(f"   {METHOD_NAMES[method]:<24} top-1 {100 * row['top1']:.1f}%")
      if "mcti" in config.methods:
        clip_head.save_linear_head(workdir / "heads" / f"{n_shots}shot_seed{seed}", _mcti_text(ctx),
                                   setup.class_names, {"template": config.template})
      pca_features = _pca_features(ctx)  # Fig. 4 shows the last cell
      results["token_pca"] = {"n_shots": n_shots, "seed": seed}
      results["class_names"] = list(setup.class_names)
      _write_json(results_path, results)
  return write_reports(workdir, results, config, pca_features)


# Settings that only say which cells to fill or where files go: results.json's rows stay valid when they change.
GRID_SETTINGS = ("workdir", "seeds", "n_shots", "methods", "generation", "train.workdir", "train.data.cache_dir")


def _made_with(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The settings and checkpoint contents that results.json's rows depend on."""
  return {"settings": json.loads(config.to_json_best_effort()),
          "weights": {"sd": runs.weights_fingerprint(config.train.model.sd_path),
                      "clip": runs.weights_fingerprint(config.train.model.clip_path)}}


def _check_rows_reusable(results: dict, path: Path, made_with: dict) -> None:
  """Rows made with other settings or weights must not be reused as if they were made with these."""
  if not results["rows"]:
    return
  if "weights" not in results:
    changes = "made by an older mcti-jax that did not record its weights"
  else:
    old = {"settings": results["settings"], "weights": results["weights"]}
    changes = runs.settings_changes(old, made_with, ignore=tuple(f"settings.{k}" for k in GRID_SETTINGS))
  if changes:
    raise ConfigError(f"{path} holds results made with other settings or model weights ({changes}). "
                     f"Use a new --config.workdir, or delete {path.parent} to start over.")


def _test_features(setup: train.Setup, test, cache: dict) -> np.ndarray:
  """CLIP image features of the test images, computed once per image and reused across cells."""
  missing = [i for i in test.ids if i not in cache]
  if missing:
    positions = np.asarray([k for k, i in enumerate(test.ids) if i not in cache])
    feats = clip_head.image_features(freeze(setup.clip), test.subset(positions), setup.config.data.resolution,
                                     setup.mesh)
    cache.update(zip((test.ids[p] for p in positions), feats))
  return np.stack([cache[i] for i in test.ids])


def _mcti_text(ctx: Context):
  return clip_head.class_text_features(ctx.clip, jnp.asarray(ctx.tokens("mcti")), ctx.template_ids,
                                       first_id=ctx.first_id, pooling=ctx.config.train.model.pooling)


def _pca_features(ctx: Context) -> dict[str, np.ndarray]:
  """Text features [K, T, P] of the TI and MC-TI tokens under each TI template (MC-TI Fig. 4)."""
  from mcti_jax import tokens as tok
  ids = jnp.asarray(tok.template_ids(ctx.setup.sd.tokenizer, tok.TI_TEMPLATES, ctx.setup.class_tokens))
  out = {}
  for phase in ("ti", "mcti"):
    per_template = [clip_head.class_text_features(ctx.clip, jnp.asarray(ctx.tokens(phase)), ids[t:t + 1],
                                                  first_id=ctx.first_id, pooling=ctx.config.train.model.pooling)
                    for t in range(ids.shape[0])]
    out[phase] = np.stack([np.asarray(f) for f in per_template], axis=1)
  return out


def _write_json(path: Path, obj) -> None:
  hf_io.write_folder(path.parent, {path.name: obj})


# ------------------------------------------------------------------ reports


def requested(results: dict, config) -> dict:
  """results with only the rows of config's grid (n_shots x seeds x methods).

  results.json keeps every row ever made in the workdir; a report on seeds [1] must not average in seed 2's rows.
  """
  grid = {(m, n, s) for m in config.methods for n in config.n_shots for s in config.seeds}
  return {**results, "rows": [r for r in results["rows"] if (r["method"], r["n_shots"], r["seed"]) in grid]}


def summary(results: dict) -> dict[tuple[str, int, str], tuple[float, float, int]]:
  """(method, N, metric) -> (mean, std, number of seeds), over the rows of results.json."""
  cells: dict[tuple[str, int, str], list[float]] = {}
  for row in results["rows"]:
    for key, value in row.items():
      if key.startswith("top") and isinstance(value, float):
        cells.setdefault((row["method"], row["n_shots"], key), []).append(value)
  return {k: (float(np.mean(v)), float(np.std(v)), len(v)) for k, v in cells.items()}


def markdown_table(results: dict, metric: str = "top1") -> str:
  """Methods x N-shot, top-1 in % as mean ± std over seeds (MC-TI Table 1's layout)."""
  cells = summary(results)
  shots = sorted({n for (_, n, m) in cells if m == metric})
  methods = [m for m in METHOD_NAMES if any(k[0] == m and k[2] == metric for k in cells)]
  lines = ["| method | " + " | ".join(f"{n}-shot" for n in shots) + " |", "|---|" + "---|" * len(shots)]
  for m in methods:
    row = []
    for n in shots:
      mean, std, count = cells.get((m, n, metric), (np.nan, np.nan, 0))
      row.append(f"{100 * mean:.1f} ± {100 * std:.1f}" if count else "")
    lines.append(f"| {METHOD_NAMES[m]} | " + " | ".join(row) + " |")
  return "\n".join(lines)


def write_reports(workdir: Path, results: dict, config, pca_features) -> dict[str, Any]:
  """results.md and the figures for config's grid; pca_features None (no cell computed now) keeps token_pca.png."""
  shown = requested(results, config)
  metric_names = ["top1"] + [f"top1_{g}" for g in config.class_groups]
  parts = [f"# Evaluation: {config.train.preset}", "",
           f"Top-1 accuracy (%), mean ± std over seeds {list(config.seeds)}; every cell is a mean of rows of "
           "results.json.", ""]
  for metric in metric_names:
    title = "all classes" if metric == "top1" else f"{metric[5:]} classes {list(config.class_groups[metric[5:]])}"
    parts += [f"## {title} [{metric}]", "", markdown_table(shown, metric), ""]
  table_path = workdir / "results.md"
  figures = {"accuracy_vs_shots": plots.accuracy_vs_shots(summary(shown), METHOD_NAMES,
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
