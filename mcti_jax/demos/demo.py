"""`mcti demo`: the main job end to end on the embedded tiny model, on CPU, in minutes.

The tiny CLIP and latent diffusion model (see `mcti pretrain-tiny`) were
pretrained on digits 0-4 only, named in their captions; digits 5-9 they never
saw. That recreates the paper's situation: known classes, where TI recovers
the name and everything scores high, and unknown ones, where TI's tokens are
not discriminative and MC-TI's regulariser makes the difference.

For each shot seed: 5 held-out shots of all ten digits -> TI then MC-TI for
all 10 classes in one run -> classify the other held-out images. Then
generate from "a photo of a <cls-k>" and let an independent scikit-learn
classifier judge what was drawn. Everything lands in <workdir>/.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from mcti_jax import data as D
from mcti_jax import plots
from mcti_jax.evaluation import evaluate
from mcti_jax.models import hf_io
from mcti_jax.tiny import judges

KNOWN, UNKNOWN = (0, 1, 2, 3, 4), (5, 6, 7, 8, 9)


def judge_generation(judge, images: np.ndarray, num_classes: int) -> dict:
  """images [K, G, H, W, 3] -> per-class fraction judged as the intended class."""
  k, g = images.shape[:2]
  predicted = judge.predict(judges.features(images.reshape(k * g, *images.shape[2:]))).reshape(k, g)
  return intended_rates(predicted, np.arange(k))


def intended_rates(predicted: np.ndarray, targets: np.ndarray) -> dict:
  """predicted [K, G] -> per class, the fraction predicted as targets[k]; their means over known and unknown."""
  per_class = (predicted == targets[:, None]).mean(1)
  return {"per_class": per_class.tolist(), "predicted": predicted.tolist(),
          "known": float(per_class[list(KNOWN)].mean()), "unknown": float(per_class[list(UNKNOWN)].mean())}


def run(config, log: Callable[[str], None] = print) -> dict:
  workdir = Path(config.workdir)
  for path in (config.train.model.sd_path, config.train.model.clip_path):
    if not Path(path).exists():
      raise SystemExit(f"the tiny checkpoint {path} is missing: make it with `mcti pretrain-tiny` (CPU, under "
                       "30 minutes), or point --config.train.model.sd_path/clip_path at one.")
  log("[1/3] classification: TI, MC-TI, CLIP-feat and zero-shot for each shot seed")
  evaluation = evaluate.run(config, log=log)
  results = evaluation["results"]
  log("[2/3] generation from 'a photo of a <cls-k>' with the learned tokens")
  results["generation"] = generation_report(config, workdir, log)
  hf_io.write_folder(workdir, {"results.json": results})
  log("[3/3] report")
  report = write_report(config, workdir, results)
  log(report.read_text().split("## Generation")[0])
  log(f"report: {report}")
  return results


def generation_report(config, workdir: Path, log) -> dict:
  from mcti_jax.generation import clip_similarity, generate
  from mcti_jax.tokens import conditioning
  from mcti_jax.models import pipeline
  seed = config.seeds[0]
  run_dir = workdir / f"{config.n_shots[0]}shot" / f"seed{seed}"
  judge, judge_accuracy = judges.logistic()
  g = config.generation
  out = {"judge": "logistic regression on pixels, trained on the pretraining half of all ten digits",
         "judge_heldout_accuracy": judge_accuracy, "shot_seed": seed, "guidance": g.guidance, "steps": g.steps}
  clip_model, _ = pipeline.load_clip(config.train.model.clip_path)
  for phase in ("ti", "mcti"):
    sd = pipeline.load_stable_diffusion(config.train.model.sd_path)
    learned = conditioning.LearnedTokens.from_export(run_dir / "export" / phase, sd.tokenizer, sd.text_width)
    images = generate.generate_class_images(sd, learned, g.num_images, guidance=g.guidance, steps=g.steps,
                                            seed=g.seed)  # [K, G, H, W, 3]
    k = images.shape[0]
    name = {"ti": "TI", "mcti": "MC-TI"}[phase]
    plots.image_grid(images, learned.class_names, [str(j + 1) for j in range(images.shape[1])],
                     f"{name} tokens (shot seed {seed}): \"a photo of a <cls-k>\", one row per class, "
                     f"{images.shape[1]} images each (DDIM {g.steps} steps, guidance {g.guidance:g})",
                     out_png=workdir / f"generated_{phase}.png")
    shots = _shots(config, seed)
    similarity = clip_similarity.clip_image_similarity(clip_model, images, shots)
    out[phase] = {**judge_generation(judge, images, k), "clip_image_similarity": np.asarray(similarity).tolist()}
    log(f"   {phase}: judged as intended: known {100 * out[phase]['known']:.0f}%, "
        f"unknown {100 * out[phase]['unknown']:.0f}%")
  return out


def _shots(config, seed: int) -> np.ndarray:
  labeled = D.load_labeled(config.train.data, "train")
  few = D.sample_few_shot(labeled, config.n_shots[0], seed, resolution=config.train.data.resolution)
  return few.shots


def _pct(mean_std) -> str:
  mean, std, _ = mean_std
  return f"{100 * mean:.1f} ± {100 * std:.1f}"


def summary_table(results: dict, labels: dict[str, str], n_shots: int) -> str:
  """Rows x (all, known, unknown), from results.json's rows; `labels` names and orders the rows."""
  cells = evaluate.summary(results)
  lines = ["| method | all (10-way) | known 0-4 | unknown 5-9 |", "|---|---|---|---|"]
  for method, name in labels.items():
    if (method, n_shots, "top1") in cells:
      row = [_pct(cells[(method, n_shots, m)]) for m in ("top1", "top1_known", "top1_unknown")]
      lines.append(f"| {name} | " + " | ".join(row) + " |")
  return "\n".join(lines)


def write_report(config, workdir: Path, results: dict) -> Path:
  n = config.n_shots[0]
  gen = results["generation"]
  seeds = list(config.seeds)
  lines = [
      "# mcti-jax demo: MC-TI on digits the models know by name (0-4) and never met (5-9)", "",
      *evaluate.smoke_banner(config),
      f"Top-1 accuracy (%) on the held-out digits not used as shots, 10-way, {n} shots per class, mean ± std over "
      f"shot seeds {seeds}. Every number is a mean of rows of results.json.", "",
      summary_table(evaluate.requested(results, config), evaluate.labels_of(config), n), "",
      *evaluate.dic_protocol(evaluate.requested(results, config), evaluate.labels_of(config)),
      "## Generation", "",
      f"8 images per class from \"a photo of a <cls-k>\" (DDIM {gen['steps']} steps, guidance {gen['guidance']}), "
      f"tokens of shot seed {gen['shot_seed']}. Judged by an independent classifier ({gen['judge']}; "
      f"{100 * gen['judge_heldout_accuracy']:.1f}% on the held-out half).", "",
      "| tokens | judged as intended, known 0-4 | judged as intended, unknown 5-9 | CLIP image-image similarity |",
      "|---|---|---|---|",
  ]
  for phase, name in (("ti", "TI"), ("mcti", "MC-TI")):
    g = gen[phase]
    lines.append(f"| {name} | {100 * g['known']:.1f} | {100 * g['unknown']:.1f} | "
                 f"{np.mean(g['clip_image_similarity']):.3f} |")
  lines += ["", "MC-TI tokens, one row per digit 0-9:", "", "![MC-TI generations](generated_mcti.png)", "",
            "TI tokens:", "", "![TI generations](generated_ti.png)", "",
            "A frozen generator can only draw what it learned: the tiny diffusion model never saw digits 5-9, so "
            "no token can make it draw them; a learned token for them lands on whatever known shapes are closest.",
            "", "## Training", "", f"![loss curves]({n}shot/seed{seeds[0]}/loss.png)", ""]
  path = workdir / "report.md"
  hf_io.write_folder(workdir, {"report.md": "\n".join(lines).encode()})
  return path
