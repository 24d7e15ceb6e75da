"""Fig. 3: does TI converge faster from a class's own caption or label than from "*"?

  from mcti_jax.configs import mcti
  from mcti_jax.demos import init_convergence
  result = init_convergence.run(mcti.get_config("tiny"), "runs/init_convergence", seeds=(1, 2, 3))

For each seed, TI alone (300 steps, 1 shot of each of the ten digits, the tiny models) from six starts:

- caption: class k from its shot's caption, written in the tiny world's own caption words ("the digit three
  bold leaning left": the digit's name and the shot's non-middle shape attributes, measured as the tiny CLIP's
  captions were, tiny/captions.py), one vector per caption token. An oracle: it holds the true digit name, where
  the paper's captioner (Caption Anything) guesses;
- label_true: class k from its true digit name (one vector), the label an errorless classifier would give;
- label_clip: class k from the digit name CLIP zero-shot gives its shot (tokens.init="label" over the ten names);
- label_guide: class k from the name the digit guide (mcti_jax/assets/tiny/guide_digits, a convnet trained on
  the pretraining half of all ten digits) gives its shot: the paper's way, an off-the-shelf classifier
  (training/token_init.classifier_labels, as tokens.label_classifier uses it);
- star: one vector at "*";
- star_v: V_k vectors at "*", V_k the caption's token count (the same number of vectors as caption, no words).

caption vs label_true is caption against label with both right; label_true vs label_clip / label_guide is a
true against a predicted label. label_true and label_guide start from their texts through a class-text file
(tokens.init="caption", one line per class), which starts class k exactly as tokens.init="label" does from the
same text; a start whose texts equal an earlier start's at that seed is not trained again (its curve is that
start's, as training is deterministic).

The curve is the noise MSE of metrics.jsonl (mean over classes, each row the mean of `log_every` steps), averaged
over seeds. A run's seed is its shot seed and its training seed, so at a given seed the starts see the same
shot, timesteps, noise and templates at every step: their curves differ only through the tokens. The values at
100 and 300 steps are smoothed: the mean of the logged rows with step in (s - 50, s].
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np

VARIANTS = ("caption", "label_true", "label_clip", "label_guide", "star", "star_v")
LABELS = {"caption": "caption (oracle)", "label_true": "true label", "label_clip": "predicted label, CLIP zero-shot",
          "label_guide": "predicted label, digit guide", "star": '"*"', "star_v": 'V_k x "*"'}
TEXT_FILES = ("caption", "label_true", "label_guide")  # the starts given as one text per class
STEPS = 300
MARKS = (100, 300)
WINDOW = 50  # steps: the value at s is the mean of the logged rows in (s - WINDOW, s]


def run(base_config: ml_collections.ConfigDict, workdir: str | Path, seeds: Sequence[int] = (1, 2, 3), *,
        steps: int = STEPS, batch_per_class: int = 1, num_classes: int | None = None,
        variants: Sequence[str] = VARIANTS, log: Callable[[str], None] = print) -> dict[str, Any]:
  """Train the starts `variants` for every seed (a finished run in `workdir` is read, not trained again), plot
  <workdir>/init_convergence.png and write <workdir>/init_convergence.json.

  base_config: `mcti:tiny` (its model paths, data source and lr are used). num_classes: the first K
  digits only (5: the known ones; a class trains as it does among all ten, see training/step.py). Returns {"steps": [S],
  "curves": {variant: [S] mean over seeds}, "per_seed": {variant: {seed: [S]}}, "at": {variant: {100: v, 300: v}},
  "texts": {seed: {"caption": [K], "label_true": [K], "label_clip": [K], "label_guide": [K]}} (the starts' texts),
  "labels_right": {variant: {seed: right labels of K}}, "elapsed_s", "plot", "json"}.
  """
  from mcti_jax import plots
  from mcti_jax.training import train
  workdir = Path(workdir)
  t0 = time.time()
  per_seed: dict[str, dict[int, list[float]]] = {v: {} for v in variants}
  texts, logged_steps = {}, None
  marks = [s for s in MARKS if s <= steps] or [steps]  # a short run (tests) reports its last step
  for seed in seeds:
    shots = shot_images(base_config, seed)[:num_classes]
    names = list(base_config.data.class_names)[:len(shots)]
    texts[seed] = {"caption": shot_captions(base_config, seed, shots), "label_true": names}
    if "label_guide" in variants:
      texts[seed]["label_guide"] = guide_labels(shots)
    counts = _token_counts(base_config, texts[seed]["caption"])
    files = {}
    for variant in TEXT_FILES:
      if variant in texts[seed]:
        files[variant] = workdir / f"seed{seed}" / f"{variant}.txt"
        files[variant].parent.mkdir(parents=True, exist_ok=True)
        files[variant].write_text("".join(t + "\n" for t in texts[seed][variant]))
    trained: dict[tuple[str, ...], str] = {}  # start texts -> the variant that trained from them at this seed
    for variant in variants:
      same = trained.get(tuple(texts[seed][variant])) if variant in TEXT_FILES else None
      if same is not None:
        per_seed[variant][seed] = per_seed[same][seed]
        log(f"== seed {seed}: {variant}: the same start as {same}, not trained again")
        continue
      config = variant_config(base_config, variant, seed, workdir / f"seed{seed}" / variant, steps=steps,
                              batch_per_class=batch_per_class, caption_file=files.get(variant), counts=counts,
                              num_classes=num_classes)
      log(f"== seed {seed}: {variant}")
      result = train.train(config, log=lambda line: None)
      if variant == "label_clip":
        manifest = json.loads((result.exports["ti"] / "manifest.json").read_text())
        texts[seed]["label_clip"] = [c["init_text"] for c in manifest["classes"]]
      if variant in TEXT_FILES:
        trained.setdefault(tuple(texts[seed][variant]), variant)
      rows = [json.loads(line) for line in result.metrics.read_text().splitlines() if line.strip()]
      logged_steps = [r["step"] for r in rows]
      per_seed[variant][seed] = [r["mse"] for r in rows]
      log(f"   mse at {', '.join(f'{s}: {smoothed(logged_steps, per_seed[variant][seed], s):.4f}' for s in marks)}")
    right = {v: sum(a == b for a, b in zip(texts[seed][v], names)) for v in ("label_clip", "label_guide")
             if v in texts[seed]}
    if right:
      log(f"   seed {seed}: right labels of {len(names)}: " + ", ".join(f"{v} {n}" for v, n in right.items()))
  curves = {v: np.mean([per_seed[v][s] for s in seeds], 0).tolist() for v in variants}
  at = {v: {s: smoothed(logged_steps, curves[v], s) for s in marks} for v in variants}
  digits = f"{num_classes or 10} digits"
  plot = plots.init_convergence(logged_steps, {LABELS.get(v, v): c for v, c in curves.items()},
                                workdir / "init_convergence.png", window=WINDOW, reference=LABELS["star"],
                                title=f"TI noise MSE, {digits} x 1 shot, mean over seeds {list(seeds)}")
  truth = {seed: list(base_config.data.class_names)[:len(t["caption"])] for seed, t in texts.items()}
  labels_right = {v: {seed: sum(a == b for a, b in zip(t[v], truth[seed])) for seed, t in texts.items()}
                  for v in ("label_clip", "label_guide") if v in variants}
  out = {"steps": logged_steps, "curves": curves, "per_seed": per_seed, "at": at, "texts": texts,
         "labels_right": labels_right,
         "seeds": list(seeds), "batch_per_class": batch_per_class, "num_classes": num_classes,
         "elapsed_s": round(time.time() - t0, 1)}
  (workdir / "init_convergence.json").write_text(json.dumps(out, indent=1) + "\n")
  for v in variants:
    log(f"{v:>11}: " + ", ".join(f"mse at {s} = {x:.4f}" for s, x in at[v].items()))
  return {**out, "plot": plot, "json": workdir / "init_convergence.json"}


def smoothed(steps: Sequence[int], values: Sequence[float], at: int, window: int = WINDOW) -> float:
  """The mean of the logged values whose step is in (at - window, at]."""
  picked = [v for s, v in zip(steps, values) if at - window < s <= at]
  if not picked:
    raise ValueError(f"no logged step in ({at - window}, {at}]: log more often than every {window} steps")
  return float(np.mean(picked))


def variant_config(base_config, variant: str, seed: int, workdir: Path, *, steps: int, batch_per_class: int,
                   caption_file: Path | None, counts: Sequence[int], num_classes: int | None = None
                   ) -> ml_collections.ConfigDict:
  """The training config of one start: TI only, 1 shot of each digit (all ten, or the first `num_classes`).
  caption_file: the start's texts, one per class (caption, label_true, label_guide)."""
  c = copy.deepcopy(base_config)
  with c.unlocked():
    c.workdir, c.data.cache_dir = str(workdir), str(workdir.parent.parent / "cache")
    c.seed = c.data.shot_seed = seed
    c.data.n_shots, c.data.num_classes = 1, num_classes
    c.phases = ("ti",)
    c.phase.ti.steps = steps
    c.batch_per_class, c.log_every, c.checkpoint_every = batch_per_class, 10, steps
    c.tokens.num_vectors, c.tokens.vectors_per_class = 1, None
    if variant in TEXT_FILES:
      if caption_file is None:
        raise ValueError(f"the start {variant!r} needs its texts' file")
      c.tokens.init, c.tokens.caption_file = "caption", str(caption_file)
    elif variant == "label_clip":
      c.tokens.init, c.tokens.label_words = "label", tuple(c.data.class_names)
    elif variant in ("star", "star_v"):
      c.tokens.init, c.tokens.init_word = "word", "*"
      if variant == "star_v":
        c.tokens.vectors_per_class = tuple(int(n) for n in counts)
    else:
      raise ValueError(f"unknown start {variant!r}; one of {VARIANTS}")
  return c


def shot_images(base_config, seed: int) -> np.ndarray:
  """uint8 [10, R, R, 3]: each digit's one shot at shot seed `seed`, as the trainer samples it."""
  from mcti_jax import data as D
  labeled = D.load_labeled(base_config.data, "train")
  return D.sample_few_shot(labeled, 1, seed, resolution=base_config.data.resolution).shots[:, 0]


def guide_labels(shots: np.ndarray) -> list[str]:
  """The digit guide's name for each class's one shot [K, R, R, 3] (token_init.classifier_labels)."""
  from mcti_jax import guides
  from mcti_jax.tiny.guide import DIGITS_GUIDE
  from mcti_jax.training import token_init
  guide = guides.load(dict(type="file", path=str(DIGITS_GUIDE)))
  return token_init.classifier_labels(guide, [(np.arange(len(shots)), shots[:, None])])[0]


def shot_captions(base_config, seed: int, shots: np.ndarray | None = None) -> list[str]:
  """Each digit's caption of its one shot (shot seed `seed`, as the trainer samples it; or `shots` [K, R, R, 3]):
  "the digit <name>" and the shot's non-middle shape attributes, cut at the terciles of the tiny models'
  pretraining images."""
  from mcti_jax.tiny import captions as tc
  from mcti_jax.tiny.data import pretraining_data
  shots = shot_images(base_config, seed) if shots is None else shots
  reference = tc.shape_measures(pretraining_data()[0])
  levels = tc.attribute_levels(tc.shape_measures(shots), reference)
  mention = np.ones(len(tc.ATTRIBUTES), bool)
  return [tc.attribute_caption("the digit {}", k, levels[k], mention) for k in range(len(shots))]


def _token_counts(base_config, texts: list[str]) -> list[int]:
  from mcti_jax.models import tokenizer as tokenizer_lib
  tokenizer = tokenizer_lib.load_tokenizer(base_config.model.sd_path, "tokenizer")
  return [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]

