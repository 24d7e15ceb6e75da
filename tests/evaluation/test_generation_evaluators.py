"""The generation evaluators: generation_accuracy (DCT Table 1) and clip_similarity (MC-TI Table 2).

The scoring is tested on hand-made logits and features (cheap); the evaluators end to end on the random tiny
checkpoint through `mcti eval`'s harness, 1 device against 8 (slow).
"""

import dataclasses
import json
import re
from types import SimpleNamespace

import ml_collections
import numpy as np
import pytest

from conftest import ROOT, random_classifier, tiny_train_config
from mcti_jax.configs import eval as eval_config
from mcti_jax.errors import ConfigError
from mcti_jax.evaluation import evaluate, evaluators
from mcti_jax.generation import clip_similarity as CS
from mcti_jax.evaluation.evaluators import generated
from mcti_jax.evaluation.evaluators import generation_accuracy as GA

GUIDE = str(ROOT / "mcti_jax" / "assets" / "tiny" / "guide_digits")  # the committed 10-way digit guide
JUDGE = dict(type="file", path=GUIDE)


# ------------------------------------------------------------------ scoring, by hand


def test_generation_top1_and_top5_equal_a_hand_count():
  """2 token classes x 3 images, a judge of 6 classes; class 0 stands for judge class 4, class 1 for class 1."""
  logits = np.array([
      [[0, 1, 2, 3, 9, 4],  # target 4 highest: top-1 and top-5
       [0, 1, 2, 9, 8, 4],  # target 4 second: top-5 only
       [5, 6, 7, 8, 0, 9]],  # target 4 last: neither
      [[9, 1, 8, 7, 6, 5],  # target 1 last: neither
       [0, 9, 2, 3, 4, 5],  # target 1 highest: both
       [5, 2, 4, 1, 0, 3]],  # target 1 fifth (5 > 4 > 3 > 2 > 1 > 0): top-5 only
  ], np.float32)
  row = GA.accuracy(logits, [4, 1], "gen")
  assert row["gen_top1"] == pytest.approx(2 / 6) and row["gen_top5"] == pytest.approx(4 / 6)
  assert row["gen_top1_per_class"] == pytest.approx([1 / 3, 1 / 3])
  assert set(GA.accuracy(logits, [4, 1], "baseline")) == {"baseline_top1", "baseline_top5", "baseline_top1_per_class"}


def test_ties_go_to_the_lower_class_index_as_argmax():
  tie = np.array([[[3.0, 3.0, 1.0]]])  # classes 0 and 1 tie at the top
  assert GA.accuracy(tie, [0])["gen_top1"] == 1.0 and GA.accuracy(tie, [1])["gen_top1"] == 0.0
  assert GA.topk_hits(tie[0], np.array([[1]]), 2).all()


def test_top5_with_fewer_than_five_judge_classes_is_every_image():
  """Top-5 is top-min(5, C): with C = 3 every class is in it, so top-5 is 1.0 even for the target ranked last."""
  logits = np.array([[[0.0, 1.0, 2.0], [2.0, 1.0, 0.0]]])  # target 0: last, then first
  row = GA.accuracy(logits, [0])
  assert row["gen_top1"] == 0.5 and row["gen_top5"] == 1.0


def test_scoring_refuses_mismatched_shapes():
  with pytest.raises(ValueError, match=r"logits \[K, G, C\] and targets \[K\]"):
    GA.accuracy(np.zeros((2, 3, 4)), [0, 1, 2])


def test_clip_similarity_per_class_equals_numpy_cosines():
  rng = np.random.default_rng(0)
  gen, shots = rng.normal(size=(3, 2, 5)) * [[[1.0]], [[3.0]], [[0.5]]], rng.normal(size=(3, 4, 5))
  cos = lambda a, b: a @ b / np.linalg.norm(a) / np.linalg.norm(b)  # noqa: E731
  want = [np.mean([cos(g, s) for g in gen[k] for s in shots[k]]) for k in range(3)]
  np.testing.assert_allclose(CS.mean_pair_cosines(gen, shots), want, rtol=1e-12)
  with pytest.raises(ValueError, match="same K and P"):
    CS.mean_pair_cosines(gen, shots[:2])


# ------------------------------------------------------------------ prompts, targets, refusals


def test_the_baseline_replaces_the_token_by_the_class_name_as_dct_does():
  """DCT: "A photo of a S_c label" against SD's "A photo of a label": the same context without the token."""
  plain = evaluators.make("g", dict(type="generation_accuracy", classifier=JUDGE))
  assert generated.prompt(plain.template, 3, "three") == "a photo of a <cls-3>"
  assert generated.prompt(plain.template, 3, "three", plain.baseline_text) == "a photo of a three"
  named = dataclasses.replace(plain, template="a photo of a {} {name}")
  assert generated.prompt(named.template, 3, "three") == "a photo of a <cls-3> three"
  assert generated.prompt(named.template, 3, "three", named.baseline_text) == "a photo of a three"
  init_word = dataclasses.replace(plain, baseline_word="digit")
  assert generated.prompt(init_word.template, 3, "three", init_word.baseline_text) == "a photo of a digit"


def test_tokens_map_to_the_judge_by_name_or_by_targets():
  judge = random_classifier()  # classes a, b, c
  np.testing.assert_array_equal(GA.judge_targets(judge, ["c", "a"], None, "config.evals.g"), [2, 0])
  np.testing.assert_array_equal(GA.judge_targets(judge, ["zero", "one"], (1, 1), "config.evals.g"), [1, 1])
  with pytest.raises(ConfigError, match=r"config.evals.g: the tokens' classes \['zero'\] are not among the judge's "
                                        r"classes \['a', 'b', 'c'\].*give config.evals.g.targets"):
    GA.judge_targets(judge, ["a", "zero"], None, "config.evals.g")
  for bad in ((0, 3), (0,), (0.0, 1.0)):
    with pytest.raises(ConfigError, match=r"config.evals.g.targets=.*one index of the judge's 3 classes \(0..2\)"):
      GA.judge_targets(judge, ["a", "b"], bad, "config.evals.g")


@pytest.mark.parametrize("entry, message", [
    (dict(), "classifier=None; give the judge as a guides spec"),
    (dict(classifier=dict(type="resnet")), "classifier=.*types: file, clip_zeroshot, clip_tokens"),
    (dict(classifier=JUDGE, num_images=0), "num_images=0 must be a whole number >= 1"),
    (dict(classifier=JUDGE, template="a photo"), "template='a photo' must hold exactly one '{}'"),
    (dict(classifier=JUDGE, guidance="high"), "guidance='high' must be a number"),
    (dict(classifier=JUDGE, guidance=float("nan")), "guidance=nan must be a number"),
    (dict(classifier=JUDGE, bogus=1), r"has no fields \['bogus'\]"),
])
def test_bad_settings_are_refused_before_anything_runs(entry, message):
  with pytest.raises(ConfigError, match=message):
    evaluators.make("g", dict(type="generation_accuracy", **entry))


@pytest.mark.parametrize("entry", [dict(type="generation_accuracy", classifier=JUDGE), dict(type="clip_similarity")])
def test_an_untrained_token_phase_is_a_clear_error(entry):
  cell = SimpleNamespace(result=SimpleNamespace(tokens={"ti": None, "mcti": None}))
  with pytest.raises(ConfigError, match=r"config.evals.g.tokens='dct', but the run trained phases \['mcti', 'ti'\]"):
    evaluators.make("g", dict(entry, tokens="dct")).run(cell, "g")


def test_clip_similarity_refuses_a_run_without_shots():
  cell = SimpleNamespace(result=SimpleNamespace(tokens={"dct": None}, shots=None, shot_features=None),
                         learned_tokens=lambda phase: (None, None))
  with pytest.raises(ConfigError, match="trained without shots.*use generation_accuracy"):
    evaluators.make("s", dict(type="clip_similarity", tokens="dct")).run(cell, "s")


def test_a_judge_without_the_tokens_classes_is_refused_by_the_evaluator(tmp_path):
  from mcti_jax.guides import file as cfile
  cfile.save(tmp_path / "judge", random_classifier())  # classes a, b, c
  cell = SimpleNamespace(result=SimpleNamespace(tokens={"mcti": None}, class_names=("zero", "one")),
                         learned_tokens=lambda phase: (None, None))
  judge = dict(type="file", path=str(tmp_path / "judge"))
  ga = evaluators.make("gen", dict(type="generation_accuracy", classifier=judge))
  with pytest.raises(ConfigError, match=r"config.evals.gen: the tokens' classes \['zero', 'one'\] are not among"):
    ga.run(cell, "gen")


# ------------------------------------------------------------------ the report


def test_the_report_shows_generation_rows_in_their_own_section(tmp_path):
  config = eval_config.get_config("tiny")
  config.n_shots, config.seeds = (5,), (1, 2)
  eval_config.only(config, "mcti")
  config.evals.gen = dict(type="generation_accuracy", label="MC-TI generations", classifier=JUDGE)
  config.evals.sim = dict(type="clip_similarity", label="MC-TI similarity")
  rows = [{"method": "mcti", "n_shots": 5, "seed": s, "top1": 0.5, "top1_known": 0.6, "top1_unknown": 0.4}
          for s in (1, 2)]
  rows += [{"method": "gen", "n_shots": 5, "seed": s, "gen_top1": v, "gen_top5": 0.9, "baseline_top1": 0.2,
            "baseline_top5": 0.7, "gen_top1_per_class": [v] * 10} for s, v in ((1, 0.5), (2, 0.3))]
  rows += [{"method": "sim", "n_shots": 5, "seed": s, "clip_similarity": 0.61} for s in (1, 2)]
  evaluate.write_reports(tmp_path, {"rows": rows, "class_names": [str(i) for i in range(10)]}, config, None)
  md = (tmp_path / "results.md").read_text()
  top1, generation = md.split("## generation")
  assert "MC-TI generations" not in top1 and "| MC-TI | 50.0 ± 0.0 |" in top1
  tables = dict(re.findall(r"^\[(\w+)\]\n\n((?:\|.*\n?)+)", generation, re.M))
  assert list(tables) == list(evaluate.GENERATION_METRICS)
  assert "| MC-TI generations | 40.0 ± 10.0 |" in tables["gen_top1"]
  assert "| MC-TI generations | 20.0 ± 0.0 |" in tables["baseline_top1"]
  assert "| MC-TI similarity | 61.0 ± 0.0 |" in tables["clip_similarity"] and "generations" not in tables[
      "clip_similarity"]
  assert evaluate._dict_row_line(rows[2]) == "gen_top1 50.0%  gen_top5 90.0%  baseline_top1 20.0%  baseline_top5 70.0%"
  assert evaluate._dict_row_line(rows[-1]) == "clip_similarity 0.610"


# ------------------------------------------------------------------ end to end on the tiny checkpoint

SMALL = dict(num_images=2, steps=2, batch_size=4)


@pytest.fixture(scope="module")
def tiny_generation_eval(tiny_checkpoint, tmp_path_factory):
  """`mcti eval` of 3 classes, 1 shot, 2 training steps per phase, with both generation evaluators."""
  workdir = tmp_path_factory.mktemp("gen_eval")
  config = eval_config.get_config("tiny")
  config.train = tiny_train_config(tiny_checkpoint, workdir / "unused", **{"phase.ti.steps": 2, "phase.mcti.steps": 2,
                                                                            "data.num_classes": 3})
  config.workdir = str(workdir)
  config.n_shots, config.seeds = (1,), (1,)
  config.class_groups = ml_collections.ConfigDict()  # the tiny preset's known/unknown digits: 10 classes, not 3
  eval_config.only(config, "mcti")
  config.evals.gen = dict(type="generation_accuracy", label="MC-TI generations", tokens="mcti", classifier=JUDGE,
                          **SMALL)
  config.evals.sim = dict(type="clip_similarity", label="TI similarity", tokens="ti", guidance=3.0, **SMALL)
  evaluate.run(config, log=lambda _: None)
  rows = {r["method"]: r for r in json.loads((workdir / "results.json").read_text())["rows"]}
  return config, workdir, rows


@pytest.mark.slow
def test_generation_rows_in_the_eval_harness(tiny_generation_eval):
  config, workdir, rows = tiny_generation_eval
  gen, sim = rows["gen"], rows["sim"]
  assert gen["seed"] == sim["seed"] == 1 and gen["generation_seed"] == 0  # the row's seed is the cell's shot seed
  assert gen["targets"] == [0, 1, 2] and gen["judge_classes"] == 10 and gen["guidance"] == 2.0  # the tiny model's
  assert gen["prompt"] == "a photo of a <cls-0>" and gen["baseline_prompt"] == "a photo of a zero"
  for prefix in ("gen", "baseline"):
    per_class = gen[f"{prefix}_top1_per_class"]
    assert len(per_class) == 3 and all(v in (0, 0.5, 1) for v in per_class)  # 2 images per class
    assert gen[f"{prefix}_top1"] == pytest.approx(np.mean(per_class)) and gen[f"{prefix}_top5"] >= gen[f"{prefix}_top1"]
  assert "top1" not in gen and "top1" not in sim
  assert len(sim["clip_similarity_per_class"]) == 3 and sim["guidance"] == 3.0
  assert sim["clip_similarity"] == pytest.approx(np.mean(sim["clip_similarity_per_class"]))
  md = (workdir / "results.md").read_text()
  assert f"| MC-TI generations | {100 * gen['gen_top1']:.1f} ± 0.0 |" in md.split("## generation")[1]
  assert f"| TI similarity | {100 * sim['clip_similarity']:.1f} ± 0.0 |" in md.split("## generation")[1]


def _cell(config, num_devices):
  from mcti_jax.runtime import parallel
  cell = evaluate.make_cell(config, 1, 1, log=lambda _: None)  # the trained run, found finished
  return dataclasses.replace(cell, models=dataclasses.replace(cell.models, mesh=parallel.make_mesh(num_devices)))


@pytest.mark.slow
def test_one_device_equals_eight_and_the_row_equals_the_harness(tiny_generation_eval):
  config, _, rows = tiny_generation_eval
  entries = evaluate.evals_of(config)
  one, eight = _cell(config, 1), _cell(config, 8)
  for name in ("gen", "sim"):
    evaluator = evaluators.make(name, entries[name])
    got_one, got_eight = evaluator.run(one, name), evaluator.run(eight, name)
    assert got_one.keys() == got_eight.keys() == rows[name].keys() - {"method", "n_shots", "seed"}
    for key, value in got_eight.items():
      if "similarity" in key:
        np.testing.assert_allclose(got_one[key], value, atol=1e-5)
      else:
        assert got_one[key] == value == rows[name][key], key
  learned, tokenizer = eight.learned_tokens("mcti")
  ga = evaluators.make("gen", entries["gen"])
  draw = lambda cell: generated.draw(cell.models.sd, tokenizer, learned, "a photo of a <cls-1>", ga, 2.0,  # noqa: E731
                                     cell.models.mesh)
  assert np.abs(draw(one).astype(int) - draw(eight)).max() <= 1  # the same images, up to uint8 rounding


@pytest.mark.slow
def test_clip_similarity_equals_the_metric_on_the_shots_pixels(tiny_generation_eval):
  """The evaluator reads the trainer's shot features; generation/clip_similarity.py encodes the shots' pixels."""
  config, _, rows = tiny_generation_eval
  cell = _cell(config, 8)
  sim = evaluators.make("sim", evaluate.evals_of(config)["sim"])
  learned, tokenizer = cell.learned_tokens("ti")
  images = np.stack([generated.draw(cell.models.sd, tokenizer, learned, f"a photo of a <cls-{k}>", sim, 3.0,
                                    cell.models.mesh) for k in range(3)])
  want = CS.clip_image_similarity(cell.models.clip.module, images, cell.result.shots.shots)
  np.testing.assert_allclose(rows["sim"]["clip_similarity_per_class"], want, atol=1e-5)
