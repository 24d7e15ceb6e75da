"""Classification heads, metrics and the evaluation harness."""

import copy
import json
import re
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_train_config
from mcti_jax.configs import eval as eval_config
from mcti_jax.errors import ConfigError
from mcti_jax.evaluation import evaluate, evaluators, metrics
from mcti_jax.tokens import export
from mcti_jax.training import runs
from mcti_jax.training import setup as setup_lib
from mcti_jax.classify import clip_head
from mcti_jax.models.frozen import freeze


def test_clip_feat_and_token_head_equal_numpy():
  rng = np.random.default_rng(0)
  shots, test, text = rng.normal(size=(3, 4, 8)), rng.normal(size=(10, 8)), rng.normal(size=(3, 8))
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
  prototypes = unit(unit(shots).mean(1))
  np.testing.assert_allclose(clip_head.prototype_features(shots), prototypes, atol=1e-6)
  np.testing.assert_allclose(clip_head.cosine_scores(jnp.asarray(test), jnp.asarray(text)),
                             unit(test) @ unit(text).T, atol=1e-6)


def test_classification_report_equals_counting_by_hand():
  rng = np.random.default_rng(1)
  scores, labels = rng.normal(size=(50, 7)), rng.integers(0, 7, 50)
  report = metrics.classification_report(scores, labels)
  pred = scores.argmax(1)
  assert report["top1"] == pytest.approx(np.mean(pred == labels))
  assert report["top5"] == pytest.approx(np.mean([labels[i] in np.argsort(-scores[i])[:5] for i in range(50)]))
  for c in range(7):
    assert report["confusion"][c][3] == np.sum((labels == c) & (pred == 3))
  known = [0, 1, 2]
  mask = np.isin(labels, known)
  assert metrics.accuracy_on(report, known) == pytest.approx(np.mean(pred[mask] == labels[mask]))
  with pytest.raises(ValueError, match="empty"):
    metrics.classification_report(np.zeros((0, 3)), np.zeros(0, int))


def test_token_head_equals_a_loop_over_classes_and_templates(tiny_checkpoint, tmp_path):
  """Splicing each class's tokens and averaging normalised template features, class by class."""
  from mcti_jax.tokens import conditioning
  from mcti_jax.models import pipeline
  clip_model, tokenizer = pipeline.load_clip(tiny_checkpoint / "clip")
  from mcti_jax.tokens import placeholders as tok
  class_tokens = tok.add_class_tokens(tokenizer, 3, 2)
  vectors = np.random.default_rng(0).normal(0, 0.02, (3, 2, 32)).astype(np.float32)
  templates = tuple(clip_head.TEMPLATES.values())
  ids = jnp.asarray(tok.template_ids(tokenizer, templates, class_tokens))
  got = clip_head.class_text_features(freeze(clip_model), jnp.asarray(vectors), ids, first_id=int(class_tokens.ids[0, 0]))
  learned = conditioning.LearnedTokens(class_tokens, vectors, ("a", "b", "c"))
  for k in range(3):
    feats = []
    for t in templates:
      ids_k = jnp.asarray(conditioning.tokenize(tokenizer, [t.format(f"<cls-{k}>")], learned))
      embeds = tok.splice(clip_model.text_model.embeddings.token_embedding.embedding[...], ids_k,
                          jnp.asarray(learned.placeholder_ids), jnp.asarray(learned.flat_vectors))
      f = np.asarray(clip_model.get_text_features(ids_k, inputs_embeds=embeds))[0]
      feats.append(f / np.linalg.norm(f))
    want = np.mean(feats, 0)
    np.testing.assert_allclose(np.asarray(got[k]), want / np.linalg.norm(want), atol=1e-5)


def test_tokens_from_another_base_model_are_refused(tmp_path):
  from mcti_jax.tokens import placeholders as tok
  names = tok.token_names(2, 1)
  export.export_tokens(tmp_path / "x", np.zeros((2, 1, 768)), tok.ClassTokens(names, np.array([[5], [6]])),
                       ["a", "b"], {"base_model": "sd-1.5"})
  with pytest.raises(ValueError, match=r"768-wide \(trained on sd-1.5\).*32-wide"):
    export.load_tokens(tmp_path / "x", expected_width=32)


def test_report_shows_only_the_requested_grid_and_keeps_the_token_pca(tmp_path):
  """Rerun with seeds (1,) in a workdir that holds seeds 1 and 2: the report is on seed 1, and every cell being done
  (no PCA features computed now) keeps the earlier token_pca.png in results.md."""
  config = eval_config.get_config("tiny")
  config.n_shots, config.seeds = (1,), (1, 2)
  eval_config.only(config, "ti", "mcti")
  top1 = {("ti", 1, 1): 0.339, ("ti", 1, 2): 0.259, ("mcti", 1, 1): 0.5, ("mcti", 1, 2): 0.3, ("ti", 2, 1): 0.9}
  rows = [{"method": m, "n_shots": n, "seed": s, "top1": v, "top1_known": v - 0.1, "top1_unknown": 0.25}
          for (m, n, s), v in top1.items()]
  rng = np.random.default_rng(0)
  results = {"rows": rows, "class_names": [str(i) for i in range(10)], "token_pca": {"n_shots": 1, "seed": 2}}
  pca = {phase: rng.normal(size=(10, 3, 8)) for phase in ("ti", "mcti")}
  evaluate.write_reports(tmp_path, copy.deepcopy(results), config, pca)
  md = (tmp_path / "results.md").read_text()
  assert "| TI | 29.9 ± 4.0 |" in md and "| MC-TI | 40.0 ± 10.0 |" in md and "2-shot" not in md

  config.seeds = (1,)
  out = evaluate.write_reports(tmp_path, copy.deepcopy(results), config, None)
  md = (tmp_path / "results.md").read_text()
  assert "mean ± std over seeds [1];" in md
  assert "| TI | 33.9 ± 0.0 |" in md and "| MC-TI | 50.0 ± 0.0 |" in md and "29.9" not in md  # all classes
  assert "| TI | 23.9 ± 0.0 |" in md  # known classes: 0.339 - 0.1
  assert "![token text features, PCA (1-shot, seed 2)](token_pca.png)" in md
  assert out["figures"]["token_pca"] == tmp_path / "token_pca.png" and (tmp_path / "token_pca.png").is_file()
  assert len(out["results"]["rows"]) == len(rows)  # results.json keeps every row


@pytest.fixture(scope="module")
def tiny_eval(tiny_checkpoint, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("eval")
  config = eval_config.get_config("tiny")
  config.train = tiny_train_config(tiny_checkpoint, workdir / "unused", **{"phase.ti.steps": 2, "phase.mcti.steps": 2})
  config.workdir = str(workdir)
  config.n_shots, config.seeds = (1,), (1, 2)
  config.evals.mcti_coop.steps = 3
  for name in ("dic_zeroshot", "dic_fewshot", "dic_fast"):  # the tiny stage preset's 8 samples: seconds
    config.evals[name].update(preset="tiny", strategy="auto", max_images=6)
  config.evals.dic_fast.update(strategy="eliminate", round_samples=2, min_samples=4)
  config.evals.dic_zeroshot.large_k = 10  # K = 10 counts as large: CLIP zero-shot's top 5, then elimination
  return evaluate.run(config, log=lambda _: None), workdir, config


@pytest.mark.slow
def test_eval_writes_every_artefact(tiny_eval):
  out, workdir, config = tiny_eval
  artefacts = ("results.json", "results.md", "accuracy_vs_shots.png", "token_pca.png", "confusion/mcti_1shot_seed2.png")
  for name in artefacts:
    assert (workdir / name).is_file(), name
  rows = json.loads((workdir / "results.json").read_text())["rows"]
  assert sorted((r["method"], r["seed"]) for r in rows) == sorted((m, s) for m in config.evals for s in (1, 2))
  for r in rows:  # the token head's shortlist of 3: at most 3 classes x the budget of 8 samples per image
    if r["method"] == "dic_fast":
      assert 0 < r["unet_evals"] <= r["num_computed"] * 3 * 8
    if r["method"].startswith("dic_"):  # each row says what it ran and paid
      assert r["unet_calls_per_image"] * r["num_computed"] == r["unet_evals"]
      assert r["unet_calls_max"] <= r["unet_calls_bound"]
      assert r["num_images"] == 6 < r["test_images"]  # a stated subset of the test split
  what = {r["method"]: (r["strategy"], r["shortlist"], r["shortlist_from"], r["unet_calls_bound"]) for r in rows
          if r["method"].startswith("dic_")}
  schedules = {r["method"]: r["schedule"] for r in rows if r["method"].startswith("dic_")}
  assert schedules == {"dic_fewshot": "stages keep (3, 1), samples (4, 8), l2 error",
                       "dic_fast": "paired elimination, budget 8 samples, confidence 0.99, first test after 4, "
                                   "rounds of 2, l2 error, head top-3 shortlist",
                       "dic_zeroshot": "paired elimination, budget 8 samples, confidence 0.99, first test after 4, "
                                       "rounds of 2, l2 error, head top-5 shortlist"}
  report = (workdir / "results.md").read_text()  # each DiC row's protocol, beside the numbers
  assert ("- DiC few-shot (tokens): stages keep (3, 1), samples (4, 8), l2 error; 52 UNet calls per image on average "
          "(at most 52); an evenly spread 6 of the ") in report
  assert what == {"dic_fewshot": ("stages", 0, "every class", 10 * 4 + 3 * 4),
                  "dic_fast": ("eliminate", 3, "mcti token head", 3 * 8),
                  "dic_zeroshot": ("eliminate", 5, "CLIP zero-shot names", 5 * 8)}
  head = workdir / "heads" / "mcti" / "1shot_seed2"
  names = json.loads((head / "classes.json").read_text())["class_names"]
  assert (head / "linear_head.safetensors").is_file() and names[3] == "three"


@pytest.mark.slow
def test_every_table_number_comes_from_results_json(tiny_eval):
  _, workdir, config = tiny_eval
  rows = json.loads((workdir / "results.json").read_text())["rows"]
  md = (workdir / "results.md").read_text()
  method_of = {v: k for k, v in evaluate.labels_of(config).items()}
  checked = 0
  for metric, table in re.findall(r"^## .*\[(\w+)\]\n\n((?:\|.*\n?)+)", md, re.M):
    lines = table.strip().splitlines()
    shots = [int(h.split("-")[0]) for h in lines[0].strip("| ").split(" | ")[1:]]
    for line in lines[2:]:
      cells = [c.strip() for c in line.strip("|").split("|")]
      for n, cell in zip(shots, cells[1:]):
        values = [r[metric] for r in rows if r["method"] == method_of[cells[0]] and r["n_shots"] == n]
        assert len(values) == 2 and cell == f"{100 * np.mean(values):.1f} ± {100 * np.std(values):.1f}"
        checked += 1
  assert checked == 3 * len(config.evals)  # all, known, unknown


@pytest.mark.slow
def test_resumed_eval_does_not_redo_rows(tiny_eval, monkeypatch):
  _, workdir, config = tiny_eval
  before = json.loads((workdir / "results.json").read_text())["rows"]
  calls = []

  class Recorder:
    def run(self, cell, name):
      calls.append(name)

  monkeypatch.setattr(evaluate.evaluators, "make", lambda name, entry: Recorder())
  evaluate.run(config, log=lambda _: None)
  assert calls == [] and json.loads((workdir / "results.json").read_text())["rows"] == before


@pytest.fixture
def eval_copy(tiny_eval, tmp_path):
  """tiny_eval's workdir copied, and its config pointed at the copy: to change settings and rerun."""
  _, workdir, config = tiny_eval
  copied = tmp_path / "eval"
  shutil.copytree(workdir, copied)
  config = copy.deepcopy(config)
  config.workdir = str(copied)
  return copied, config


def _count_evaluator_runs(monkeypatch) -> list[tuple]:
  """(row name, N, seed, the evaluator's template) of every evaluator run from now on."""
  calls, make = [], evaluate.evaluators.make

  class Counted:
    def __init__(self, name, entry):
      self.inner = make(name, entry)

    def run(self, cell, name):
      calls.append((name, cell.n_shots, cell.seed, getattr(self.inner, "template", None)))
      return self.inner.run(cell, name)

  monkeypatch.setattr(evaluate.evaluators, "make", Counted)
  return calls


def _rows(workdir) -> list[dict]:
  return json.loads((workdir / "results.json").read_text())["rows"]


def _checkpoints(workdir) -> dict[str, tuple[int, bytes]]:
  """Every trained cell's checkpoint files: name -> (modification time, bytes)."""
  return {str(f.relative_to(workdir)): (f.stat().st_mtime_ns, f.read_bytes())
          for f in sorted(workdir.glob("*shot/seed*/checkpoints/**/*")) if f.is_file()}


@pytest.mark.slow
def test_a_changed_label_recomputes_nothing_and_the_table_shows_it(eval_copy, monkeypatch):
  workdir, config = eval_copy
  before, checkpoints = _rows(workdir), _checkpoints(workdir)
  config.evals.mcti.label = "MC-TI, renamed"
  calls = _count_evaluator_runs(monkeypatch)
  evaluate.run(config, log=lambda _: None)
  assert calls == [] and _rows(workdir) == before and _checkpoints(workdir) == checkpoints
  md = (workdir / "results.md").read_text()
  assert "| MC-TI, renamed |" in md and "| MC-TI |" not in md


@pytest.mark.slow
def test_a_changed_evaluator_recomputes_its_own_rows_only(eval_copy, monkeypatch):
  """mcti's template changes, ti_t2 is new, the rest are no longer asked for: only mcti's and ti_t2's rows are
  computed, from the same trained cells; the others' rows stay in results.json, out of the table."""
  workdir, config = eval_copy
  before, checkpoints = _rows(workdir), _checkpoints(workdir)
  config_of_rows = evaluate.evals_of(config)
  eval_config.only(config, "ti", "mcti")
  config.evals.mcti.template = "T2"
  config.evals.ti_t2 = dict(type="clip_tokens", label="TI, T2", phase="ti", template="T2")
  calls = _count_evaluator_runs(monkeypatch)
  evaluate.run(config, log=lambda _: None)
  assert sorted(calls) == [(m, 1, s, "T2") for m in ("mcti", "ti_t2") for s in (1, 2)]
  after = _rows(workdir)
  assert [r for r in after if r["method"] not in ("mcti", "ti_t2")] == [r for r in before if r["method"] != "mcti"]
  assert sorted((r["method"], r["seed"]) for r in after if r["method"] in ("mcti", "ti_t2")) == [
      (m, s) for m in ("mcti", "ti_t2") for s in (1, 2)]
  assert json.loads((workdir / "heads/mcti/1shot_seed2/classes.json").read_text())["template"] == "T2"
  assert _checkpoints(workdir) == checkpoints
  md = (workdir / "results.md").read_text()
  assert "| TI, T2 |" in md and "| MC-TI |" in md and "CLIP-feat" not in md
  recorded = json.loads((workdir / "results.json").read_text())["settings"]["evals"]
  assert recorded["clip_feat"] == config_of_rows["clip_feat"]  # what its kept rows were made with

  calls.clear()  # back to T1: its rows were replaced, so they are made again; nothing else is
  config.evals.mcti.template = "T1"
  evaluate.run(config, log=lambda _: None)
  assert sorted(calls) == [("mcti", 1, s, "T1") for s in (1, 2)]


@pytest.mark.slow
def test_a_changed_training_setting_retrains_the_cells_and_says_which(eval_copy, monkeypatch):
  """Every row is made from a trained cell, so all of them are recomputed, from cells trained again."""
  workdir, config = eval_copy
  checkpoints = _checkpoints(workdir)
  eval_config.only(config, "ti")
  old_lr = config.train.phase.ti.lr
  config.train.phase.ti.lr = old_lr / 2
  calls, lines = _count_evaluator_runs(monkeypatch), []
  evaluate.run(config, log=lines.append)
  assert f"train.phase.ti.lr: {old_lr!r} -> {old_lr / 2!r}" in lines[0]
  assert "cells 1shot/seed1, 1shot/seed2 were trained with other settings" in "\n".join(lines)
  assert sorted(calls) == [("ti", 1, s, "T1") for s in (1, 2)]
  assert sorted((r["method"], r["seed"]) for r in _rows(workdir)) == [("ti", 1), ("ti", 2)]  # the rest were stale
  for seed in (1, 2):
    assert json.loads((workdir / f"1shot/seed{seed}/run.json").read_text())["config"]["phase"]["ti"]["lr"] == old_lr / 2
  assert not set(_checkpoints(workdir).items()) & set(checkpoints.items())
  aside, = (workdir / "replaced").iterdir()  # the old cells, set aside whole, not deleted
  assert f"the replaced cells are kept in {aside}" in "\n".join(lines)
  assert set(_checkpoints(aside).values()) == set(checkpoints.values())


@pytest.mark.slow
def test_only_cells_the_trainer_cannot_resume_are_trained_again(tiny_eval):
  """The trainer's own rule (runs.RESUMABLE, and more steps in the last phase extend a run), read off run.json."""
  _, _, config = tiny_eval
  changed = copy.deepcopy(config)
  changed.train.log_every += 1
  changed.train.phase.mcti.steps += 1  # mcti is the last phase: the trainer extends the run
  assert evaluate._cells_to_retrain(changed, print) == []
  changed = copy.deepcopy(config)
  changed.train.phase.ti.steps += 1  # an earlier phase's steps: every later step changes
  lines = []
  assert evaluate._cells_to_retrain(changed, lines.append) == [(1, 1), (1, 2)]
  ti_steps = config.train.phase.ti.steps
  assert lines == [f"cells 1shot/seed1, 1shot/seed2 were trained with other settings (train.phase.ti.steps: "
                   f"{ti_steps} -> {ti_steps + 1}): they are trained again from scratch"]


@pytest.mark.slow
def test_results_made_with_other_weights_are_not_reused(tiny_eval, tiny_checkpoint, tmp_path):
  """Another checkpoint must not pass off the old rows as its own; a new seed or evaluator keeps every row."""
  _, workdir, config = tiny_eval
  results = json.loads((workdir / "results.json").read_text())
  grown = copy.deepcopy(config)
  grown.seeds = (1, 2, 3)
  eval_config.only(grown, "ti")
  grown.evals.gcpl = dict(type="clip_tokens", phase="gcpl")  # a new evaluator, no rows yet
  kept = copy.deepcopy(results)
  assert not evaluate._drop_stale_rows(kept, workdir / "results.json", evaluate._made_with(grown), print)
  assert kept["rows"] == results["rows"]

  retrained = tmp_path / "ckpt"
  shutil.copytree(tiny_checkpoint, retrained)
  weights = retrained / "sd" / "unet" / "diffusion_pytorch_model.safetensors"
  data = bytearray(weights.read_bytes())
  data[-1] ^= 1  # one bit of the last stored weight: same file size, same layout
  weights.write_bytes(bytes(data))
  changed = copy.deepcopy(config)
  changed.train.model.sd_path = str(retrained / "sd")
  with pytest.raises(ValueError, match=r"weights\.sd: "):
    evaluate.run(changed, log=lambda _: None)


def test_weights_fingerprint_follows_the_bytes_not_the_folder(tiny_checkpoint, tmp_path):
  copied = tmp_path / "copy"
  shutil.copytree(tiny_checkpoint / "clip", copied, copy_function=shutil.copyfile)  # new file times
  assert runs.fingerprint(copied) != runs.fingerprint(tiny_checkpoint / "clip")
  assert runs.weights_fingerprint(copied) == runs.weights_fingerprint(tiny_checkpoint / "clip")
  (copied / "README.md").write_text("a model card says nothing about what the model computes")
  assert runs.weights_fingerprint(copied) == runs.weights_fingerprint(tiny_checkpoint / "clip")
  config = json.loads((copied / "config.json").read_text())
  config["logit_scale_init_value"] = 1.0
  (copied / "config.json").write_text(json.dumps(config))
  assert runs.weights_fingerprint(copied) != runs.weights_fingerprint(tiny_checkpoint / "clip")


def test_a_split_with_no_test_images_left_is_a_clear_error(tiny_checkpoint, tmp_path):
  """A folder whose classes hold exactly N images: after taking the shots nothing is left to test on."""
  from PIL import Image
  rng = np.random.default_rng(0)
  for name in ("cat", "dog"):
    (tmp_path / "images" / name).mkdir(parents=True)
    for i in range(2):
      Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(tmp_path / "images" / name / f"{i}.png")
  config = eval_config.get_config("tiny")
  config.train = tiny_train_config(tiny_checkpoint, tmp_path / "run",
                                   **{"phase.ti.steps": 1, "phase.mcti.steps": 0, "data.source": "folder", "data.root": str(tmp_path / "images"),
                                      "data.n_shots": 2, "data.class_names": None})
  setup = setup_lib.prepare(config.train, log=lambda _: None)
  with pytest.raises(ValueError, match="holds no images of the 2 trained classes"):
    evaluate.test_images(config, setup)


@pytest.mark.parametrize("entry, message", [
    (dict(type="dic", max_images=-3), r"config.evals.row: dic max_images=-3: 0 \(every test image\) or the size"),
    (dict(type="dic", strategy="fastest"), r"config.evals.row: dic strategy='fastest'"),
])
def test_an_evaluator_field_out_of_range_is_a_config_error_naming_the_row(entry, message):
  """Evaluators check their own fields (ValueError); make() names the row and the flag that fixes it."""
  with pytest.raises(ConfigError, match=message + r".*--config.evals.row.<field>=<value>"):
    evaluators.make("row", entry)
