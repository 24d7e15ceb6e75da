"""`mcti demo --config dct_demo`: Discriminative Class Tokens in the tiny world, judged independently.

1. Digits, twice: for each seed, one DCT run learns a token per digit 0-9
   from the paper's prompt with the digit's name, "a photo of a <cls-k>
   three" (`digits`), and one from "a photo of a <cls-k>" without it
   (`digits_no_names`); <cls-k> starts as "digit", the tiny digit guide
   scores. The tiny model knows the names of 0-4 only. 8 images per class
   from held-out starting latents, before (the initial token: "a photo of a
   digit three", or "a photo of a digit") and after, are judged by two
   classifiers that are not the guide: logistic regression and k-NN on
   pixels. The guide's own verdict on the same images sits beside them: a
   token can fool the classifier it was trained against.
2. An attribute: "a photo of the digit three <cls-0>" against "a photo of the
   digit three" on the same starting latents, <cls-0> trained with the slant
   guide towards "leaning left"; the judge is the slant measured on the image.

Everything lands in <workdir>/: results.json, report.md, grids, the runs.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from mcti_jax import guides, paths, plots
from mcti_jax.demos import demo
from mcti_jax.evaluation import evaluate
from mcti_jax.generation import generate
from mcti_jax.training import train
from mcti_jax.tokens.conditioning import LearnedTokens
from mcti_jax.models import hf_io, pipeline
from mcti_jax.tiny import captions, guide
from mcti_jax.tiny import judges as pixel_judges

# The digit runs of the config: the paper's prompt (with the digit's name), and the prompt without it.
DIGIT_PARTS = ("digits", "digits_no_names")


def run(config, log: Callable[[str], None] = print) -> dict:
  workdir = Path(config.workdir)
  paths.output_folder(workdir, "config.workdir")  # before the judges fit and the runs train
  results = {"seeds": list(config.seeds), "attribute": {}}
  logistic, logistic_accuracy = pixel_judges.logistic()
  knn, knn_accuracy = pixel_judges.knn()
  results["judges"] = {"logistic": {"what": "logistic regression on pixels", "heldout_accuracy": logistic_accuracy},
                       "knn": {"what": "3-NN on pixels", "heldout_accuracy": knn_accuracy}}
  judges = {"logistic": logistic, "knn": knn}
  for part in DIGIT_PARTS:
    results[part] = {}
    for seed in config.seeds:
      log(f"[{part}, seed {seed}] DCT on the ten digits with the digit guide")
      results[part][str(seed)] = _digits(config[part], config.generation, seed, workdir / part / f"seed{seed}",
                                         judges, log)
  for seed in config.seeds:
    log(f"[attribute, seed {seed}] DCT on 'a photo of the digit three <cls-0>' with the slant guide")
    results["attribute"][str(seed)] = _attribute(config, seed, workdir / "attribute" / f"seed{seed}", log)
  results["summary"] = summary(results)
  hf_io.write_folder(workdir, {"results.json": results})
  report = write_report(config, workdir, results)
  log(report.read_text())
  return results


def _train(train_config, seed: int, workdir: Path, log) -> train.TrainResult:
  c = copy.deepcopy(train_config)
  c.seed, c.workdir = seed, str(workdir)
  return train.train(c, log=log)


@functools.lru_cache(maxsize=2)
def _stable_diffusion(path: str) -> pipeline.StableDiffusion:
  return pipeline.load_stable_diffusion(path)


def _images(train_config, export: Path | None, template: str, names: list[str], g, fill: str | None = None):
  """uint8 [K, G, H, W, 3]: template filled with <cls-k> (or with `fill` for every class) and, where it holds
  "{name}", with names[k]; from g.seed's latents."""
  num_classes = len(names)
  # Loaded once; each export's tokens go into a copy of the tokenizer (they all add <cls-0>, ...).
  loaded = _stable_diffusion(train_config.model.sd_path)
  sd = dataclasses.replace(loaded, tokenizer=copy.deepcopy(loaded.tokenizer))
  learned = LearnedTokens.from_export(export, sd.tokenizer, sd.text_width) if export is not None else None
  prompts = [template.format(fill if fill is not None else f"<cls-{k}>", name=names[k]) for k in range(num_classes)]
  phase = train_config.phase.dct
  images = generate.generate(sd, prompts, learned=learned, num_images_per_prompt=g.num_images,
                             steps=phase.sampling_steps, guidance=phase.guidance, seed=g.seed)
  return images.reshape(num_classes, g.num_images, *images.shape[1:])


def _verdicts(images: np.ndarray, judges: dict, guide_classifier, targets: np.ndarray) -> dict:
  """Per judge: the fraction of each class's images judged as its target, and what was predicted."""
  k, g = images.shape[:2]
  flat = images.reshape(k * g, *images.shape[2:])
  out = {}
  for name, judge in judges.items():
    predicted = judge.predict(pixel_judges.features(flat)).reshape(k, g)
    out[name] = demo.intended_rates(predicted, targets)
  predicted = np.asarray(guide_classifier(flat.astype(np.float32) / 255.0)).argmax(-1).reshape(k, g)
  out["guide"] = demo.intended_rates(predicted, targets)
  return out


def _digits(c, generation, seed: int, workdir: Path, judges: dict, log) -> dict:
  result = _train(c, seed, workdir, log)
  targets = np.asarray(c.classifier.targets if c.classifier.targets is not None else range(10))
  guide_classifier = guides.load({"type": "file", "path": c.classifier.path})
  names = [guide_classifier.class_names[t] for t in targets]
  template = c.phase.dct.templates[0]
  before = _images(c, None, template, names, generation, fill=c.tokens.init_word)
  after = _images(c, result.exports["dct"], template, names, generation)
  titles = {"before": f"before DCT: \"{template.format(c.tokens.init_word, name='<name of k>')}\" (the initial "
                      "token) in row k, judged against digit k",
            "after": f"after DCT: \"{template.format('<cls-k>', name='<name of k>')}\", <cls-k> trained towards "
                     "digit k"}
  for name, images in (("before", before), ("after", after)):
    plots.image_grid(images, [f"digit {t}" for t in targets], [str(j + 1) for j in range(images.shape[1])],
                     f"{titles[name]}; training seed {seed}, the same starting latents in both pictures",
                     out_png=workdir / f"generated_{name}.png")
  rows = [json.loads(line) for line in result.metrics.read_text().splitlines()]
  out = {"before": _verdicts(before, judges, guide_classifier, targets),
         "after": _verdicts(after, judges, guide_classifier, targets),
         "steps_trained": rows[-1]["step"] if rows else 0,
         "stopped_at": _stop_steps(rows, len(targets))}
  log("   judged as intended (logistic / k-NN / guide), known 0-4 -> unknown 5-9: " + ", ".join(
      f"{when}: " + " / ".join(f"{100 * out[when][j]['known']:.0f}" for j in ("logistic", "knn", "guide")) + " -> "
      + " / ".join(f"{100 * out[when][j]['unknown']:.0f}" for j in ("logistic", "knn", "guide"))
      for when in ("before", "after")))
  return out


def _stop_steps(rows: list[dict], num_classes: int) -> list[int | None]:
  """The step at which each class stopped training (None: it trained to the end)."""
  out = []
  for k in range(num_classes):
    stopped = [r["step"] for r in rows if "per_class" in r and r["per_class"]["training"][k] == 0.0]
    out.append(stopped[0] if stopped else None)
  return out


def _attribute(config, seed: int, workdir: Path, log) -> dict:
  c = config.attribute
  result = _train(c, seed, workdir, log)
  g = config.attribute_generation
  template = c.phase.dct.templates[0]
  plain = _images(c, None, template.replace(" {}", ""), [""], g, fill="")[0]  # "a photo of the digit three"
  guided = _images(c, result.exports["dct"], template, [""], g)[0]
  shown = min(16, len(plain))
  plots.image_grid(np.stack([plain[:shown], guided[:shown]]),
                   [template.replace(" {}", ""), template.format("<cls-0>")], [str(j + 1) for j in range(shown)],
                   f"the same starting latent in each column; <cls-0> trained with the slant guide towards "
                   f"\"leaning left\" (training seed {seed})", out_png=workdir / "plain_vs_token.png")
  slant = lambda images: captions.shape_measures(images)[:, guide.SLANT]  # noqa: E731  (high = leaning left)
  plain_slant, guided_slant = slant(plain), slant(guided)
  sd = float(plain_slant.std())
  shift = float(guided_slant.mean() - plain_slant.mean())
  out = {"plain_mean": float(plain_slant.mean()), "plain_std": sd, "token_mean": float(guided_slant.mean()),
         "shift": shift, "shift_in_std": shift / sd if sd > 0 else float("nan"), "num_images": len(plain),
         "direction": "leaning left = higher slant measure"}
  log(f"   slant: plain {out['plain_mean']:.3f} ± {sd:.3f}, with the token {out['token_mean']:.3f}: "
      f"{out['shift_in_std']:+.2f} std")
  return out


def summary(results: dict) -> dict:
  """Mean ± std over seeds of every judge's rate, per digit part, before and after, known and unknown; the
  attribute's shift."""
  out = {}
  for part in DIGIT_PARTS:
    for when in ("before", "after"):
      for judge in ("logistic", "knn", "guide"):
        for group in ("known", "unknown"):
          values = [r[when][judge][group] for r in results[part].values()]
          out[f"{part}/{when}/{judge}/{group}"] = [float(np.mean(values)), float(np.std(values))]
  shifts = [r["shift_in_std"] for r in results["attribute"].values()]
  out["attribute/shift_in_std"] = [float(np.mean(shifts)), float(np.std(shifts))]
  return out


def write_report(config, workdir: Path, results: dict) -> Path:
  s = results["summary"]
  pct = lambda key: f"{100 * s[key][0]:.1f} ± {100 * s[key][1]:.1f}"  # noqa: E731
  seeds = results["seeds"]
  judges = results["judges"]
  lines = [
      "# Discriminative Class Tokens in the tiny world", "", *evaluate.smoke_banner(config),
      f"{config.generation.num_images} images per digit on held-out starting latents, before (the initial token, "
      f"\"digit\") and after DCT with the tiny digit guide; mean ± std over seeds {seeds}. % judged as the intended "
      f"digit by two judges that are not the guide (logistic regression on pixels, "
      f"{100 * judges['logistic']['heldout_accuracy']:.1f}% on held-out digits; 3-NN on pixels, "
      f"{100 * judges['knn']['heldout_accuracy']:.1f}%), and by the guide itself. The tiny model knows the names of "
      f"0-4 only.", "",
      "| prompt | tokens | logistic, 0-4 | k-NN, 0-4 | guide, 0-4 | logistic, 5-9 | k-NN, 5-9 | guide, 5-9 |",
      "|---|---|---|---|---|---|---|---|",
  ]
  for part in DIGIT_PARTS:
    shown = config[part].phase.dct.templates[0].format("<cls-k>", name="<name>")
    for when in ("before", "after"):
      cells = [pct(f"{part}/{when}/{j}/{group}") for group in ("known", "unknown")
               for j in ("logistic", "knn", "guide")]
      lines.append(f"| {shown} | {when} | " + " | ".join(cells) + " |")
  first = seeds[0]
  for part in DIGIT_PARTS:
    lines += ["", f"{part}, seed {first}, one row per digit 0-9, before (the initial token) and after:", "",
              f"![before]({part}/seed{first}/generated_before.png) ![after]({part}/seed{first}/generated_after.png)",
              "", f"![per-class curves]({part}/seed{first}/class_curves.png)"]
  lines += ["", "## An attribute token", "",
            "\"a photo of the digit three <cls-0>\" against \"a photo of the digit three\" on the same starting "
            "latents; <cls-0> learned with the slant guide towards \"leaning left\". The judge is the slant "
            "measured on each image (higher: leaning left).", "",
            "| seed | plain: slant mean ± std | with the token | shift (std of plain) |", "|---|---|---|---|"]
  for seed, r in results["attribute"].items():
    lines.append(f"| {seed} | {r['plain_mean']:.3f} ± {r['plain_std']:.3f} | {r['token_mean']:.3f} | "
                 f"{r['shift_in_std']:+.2f} |")
  lines += ["", f"Top row plain, bottom row with the token (seed {first}):", "",
            f"![plain vs token](attribute/seed{first}/plain_vs_token.png)", ""]
  path = workdir / "report.md"
  hf_io.write_folder(workdir, {"report.md": "\n".join(lines).encode()})
  return path

