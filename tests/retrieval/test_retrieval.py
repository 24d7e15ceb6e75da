"""Composite retrieval and GAIR: metrics by hand, tiny-world relevance, the labels file, the lam search, the CLI."""

import json

import numpy as np
import pytest

from conftest import random_export

from mcti_jax.configs import eval as eval_config
from mcti_jax.retrieval import labels as labels_lib
from mcti_jax.retrieval import metrics as retrieval_metrics
from mcti_jax.retrieval import tiny_world
from mcti_jax.retrieval import gair
from mcti_jax.retrieval import settings as gair_settings
from mcti_jax.data import DataError
from mcti_jax.errors import ConfigError
from mcti_jax.retrieval.queries import mix, normalize, parse_query

# ------------------------------------------------------------------ metrics


def test_ranks_and_metrics_match_a_hand_count():
  scores = np.array([[0.9, 0.1, 0.5, 0.3],  # order 0, 2, 3, 1
                     [0.2, 0.8, 0.6, 0.4],  # order 1, 2, 3, 0
                     [0.5, 0.5, 0.1, 0.0],  # no relevant image: skipped
                     [0.5, 0.5, 0.1, 0.0]])  # a tie keeps gallery order: 0 before 1
  relevant = np.array([[0, 0, 0, 1], [0, 1, 1, 0], [0, 0, 0, 0], [0, 1, 0, 0]], bool)
  np.testing.assert_array_equal(retrieval_metrics.first_relevant_ranks(scores, relevant), [3, 1, 0, 2])
  m = retrieval_metrics.metrics(scores, relevant, ["a", "b", "a", "b"], ks=(1, 2, 5))
  assert m["overall"] == pytest.approx({"queries": 3, "skipped": 1, "mrr": (1 / 3 + 1 + 1 / 2) / 3, "r1": 1 / 3,
                                        "r2": 2 / 3, "r5": 1.0})
  assert m["by_type"]["a"] == pytest.approx({"queries": 1, "skipped": 1, "mrr": 1 / 3, "r1": 0.0, "r2": 0.0,
                                             "r5": 1.0})
  assert m["by_type"]["b"] == pytest.approx({"queries": 2, "skipped": 0, "mrr": 0.75, "r1": 0.5, "r2": 1.0,
                                             "r5": 1.0})
  assert list(m["by_type"]) == ["a", "b"]
  top = retrieval_metrics.top_results(scores, relevant, ["w", "x", "y", "z"], k=2)
  assert [r["id"] for r in top[0]] == ["w", "y"] and [r["relevant"] for r in top[1]] == [True, True]


def test_metrics_with_no_answerable_query_and_bad_shapes():
  m = retrieval_metrics.metrics(np.zeros((2, 3)), np.zeros((2, 3), bool))
  assert m["overall"] == {"queries": 0, "skipped": 2, "mrr": None, "r1": None, "r5": None}
  with pytest.raises(ValueError, match=r"must both be \[queries, gallery images\]"):
    retrieval_metrics.metrics(np.zeros((2, 3)), np.zeros((2, 4), bool))


def test_mix_goes_from_the_class_prompt_to_the_composite():
  rng = np.random.default_rng(0)
  g_c, g_cw = rng.normal(size=(3, 8)), rng.normal(size=(3, 8))
  np.testing.assert_allclose(mix(g_c, g_cw, 0.0), normalize(g_c), atol=1e-6)
  np.testing.assert_allclose(mix(g_c, g_cw, 1.0), normalize(g_cw), atol=1e-6)
  per_query = mix(g_c, g_cw, np.array([0.0, 1.0, 0.5]))
  np.testing.assert_allclose(per_query[2], mix(g_c, g_cw, 0.5)[2], atol=1e-6)


# ------------------------------------------------------------------ queries and relevance


def test_a_query_splits_into_its_class_prompt_and_words():
  q = parse_query("a photo of a <cls-3> with a red collar", type="collar")
  assert (q.class_index, q.class_prompt, q.words, q.type) == (3, "a photo of a <cls-3>", "with a red collar", "collar")
  with pytest.raises(ValueError, match="holds no class token; a query names one class"):
    parse_query("a photo of a dog with a red collar")
  with pytest.raises(ValueError, match="holds 2 class tokens"):
    parse_query("a <cls-1> and a <cls-2>")
  with pytest.raises(ValueError, match="has no words after <cls-3>"):
    parse_query("a photo of a <cls-3>")


def test_tiny_queries_and_relevance_by_hand():
  queries = tiny_world.tiny_queries(2, attributes=("ink", "slant"))
  assert [q.prompt for q in queries[:4]] == ["a photo of a <cls-0> thin", "a photo of a <cls-0> bold",
                                             "a photo of a <cls-0> leaning right", "a photo of a <cls-0> leaning left"]
  assert queries[1].opposite == "thin" and queries[1].type == "bold" and len(queries) == 8
  # Levels [M, 5] of ink, width, skew_y, skew_x, slant; labels [M].
  labels = np.array([1, 1, 0, 1])
  levels = np.array([[2, 1, 1, 1, 0], [0, 1, 1, 1, 2], [2, 1, 1, 1, 2], [1, 1, 1, 1, 1]])
  relevant = tiny_world.tiny_relevance(queries[4:], labels, levels)  # class 1: thin, bold, leaning right, left
  np.testing.assert_array_equal(relevant, [[0, 1, 0, 0], [1, 0, 0, 0], [1, 0, 0, 0], [0, 1, 0, 0]])
  with pytest.raises(ConfigError, match="tiny attributes \\['colour'\\] are unknown"):
    tiny_world.tiny_queries(2, attributes=("colour",))


def test_tiny_levels_read_ink_and_slant_from_pixels():
  """A filled square has more ink than any pretraining digit, one pixel less; '\\' leans left, '/' right."""
  images = np.zeros((4, 16, 16, 3), np.uint8)
  images[0, 2:14, 2:14] = 255
  images[1, 8, 8] = 255
  for i in range(3, 13):
    images[2, i, i] = 255  # top left to bottom right: the bottom sits right of the top
    images[3, i, 15 - i] = 255
  levels = tiny_world.tiny_levels(images)
  assert levels[0, 0] == 2 and levels[1, 0] == 0  # ink: bold, thin
  assert levels[2, 4] == 2 and levels[3, 4] == 0  # slant: leaning left, leaning right
  assert tiny_world.tiny_words()["leaning left"] == (4, 2, "leaning right")


# ------------------------------------------------------------------ labels file


def _gallery(folder, count=4):
  from PIL import Image
  (folder / "sub").mkdir(parents=True)
  rng = np.random.default_rng(0)
  names = [f"img{i}.png" for i in range(count - 1)] + ["sub/deep.png"]
  for name in names:
    Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(folder / name)
  return names


def test_labels_file_round_trip(tmp_path):
  names = _gallery(tmp_path / "images")
  queries = [parse_query("a photo of a <cls-1> bold", type="bold", opposite="thin"),
             parse_query("a photo of a <cls-0> with a red collar")]
  relevant_ids = [["img2.png", "sub/deep.png"], ["img0.png"]]
  path = tmp_path / "labels.json"
  path.write_text(json.dumps(labels_lib.labels_json(queries, relevant_ids, gallery="images")))
  labels = labels_lib.load_labels(path)
  assert labels.queries == queries
  assert sorted(labels.gallery.ids) == sorted(names)
  for i, ids in enumerate(relevant_ids):
    assert sorted(np.asarray(labels.gallery.ids)[labels.relevant[i]].tolist()) == sorted(ids)
  images = labels.gallery.load([0], 16)
  assert images.shape == (1, 16, 16, 3)


@pytest.mark.parametrize("query, message", [
    ({"prompt": "a photo of a <cls-1> bold", "relevant": ["nope.png"]},
     "names images that are not in the gallery folder .*\\['nope.png'\\]; paths are relative to that folder"),
    ({"prompt": "a photo of a <cls-1> bold", "relevant": []}, "lists no relevant images; give at least one path"),
    ({"prompt": "a photo of a dog", "relevant": ["img0.png"]},
     "query 0: prompt 'a photo of a dog' holds no class token"),
    ({"relevant": ["img0.png"]}, "query 0 should be"),
])
def test_labels_file_errors_name_the_query_and_the_fix(tmp_path, query, message):
  _gallery(tmp_path)
  path = tmp_path / "labels.json"
  path.write_text(json.dumps({"queries": [query]}))
  with pytest.raises(DataError, match=message):
    labels_lib.load_labels(path)


def test_labels_file_that_is_not_one(tmp_path):
  path = tmp_path / "labels.json"
  path.write_text("{not json")
  with pytest.raises(DataError, match="is not valid JSON"):
    labels_lib.load_labels(path)
  path.write_text(json.dumps({"queries": []}))
  with pytest.raises(DataError, match="with at least one query"):
    labels_lib.load_labels(path)


# ------------------------------------------------------------------ GAIR


def test_gair_search_moves_lam_the_right_way_on_a_synthetic_scorer():
  """The class shows while lam <= c, the attribute once lam >= a; margins are the distances to those edges."""
  attribute_at = np.array([0.7, 0.0, 0.9, 0.1])
  class_until = np.array([1.0, 0.3, 0.2, 1.0])
  search = gair.Search(4, lam_max=1.0)
  seen = []
  for _ in range(4):
    queries = search.active()
    lam = search.lam[queries]
    seen.append(dict(zip(queries.tolist(), lam.tolist())))
    search.update(queries, class_until[queries] - lam, lam - attribute_at[queries])
  assert seen[0] == {0: 0.5, 1: 0.5, 2: 0.5, 3: 0.5}
  assert seen[1][0] == 0.75 and seen[1][1] == 0.25 and seen[1][2] == 0.25  # more lam; less; less (class first)
  assert 3 not in seen[1]  # both shown at once: done
  assert 0 not in seen[2] and 1 not in seen[2]  # both shown after one move
  assert 0.7 <= search.final[0] <= 1.0 and 0.0 <= search.final[1] <= 0.3 and search.final[3] == 0.5
  # Never both: the round with the best worse margin, min(0.2 - lam, lam - 0.9), which grows with lam.
  assert search.final[2] == max(r[2] for r in seen if 2 in r)
  assert search.done.tolist() == [True, True, False, True]


def test_gair_judges_by_hand():
  head = np.eye(3)  # class j's text feature is axis j
  features = np.array([[[1.0, 0, 0], [0, 1.0, 0]]])  # one query, two drawings
  positive, negative = np.array([[1.0, 0, 0]]), np.array([[0, 1.0, 0]])
  p_class, p_attr = gair.judge(features, head, np.array([0]), positive, negative, logit_scale=1.0)
  e = np.exp(1.0)
  np.testing.assert_allclose(p_class, [[e / (e + 2), 1 / (e + 2)]])
  np.testing.assert_allclose(p_attr, [[e / (e + 1), 1 / (e + 1)]])
  q = gair.query_feature(np.eye(3)[:1], np.eye(3)[1:2], 0.5, features, np.array([[1.0, 0.0]]), image_weight=1.0)
  expected = normalize(mix(np.eye(3)[:1], np.eye(3)[1:2], 0.5) + np.array([[1.0, 0, 0]]))
  np.testing.assert_allclose(q, expected, atol=1e-6)


def test_gair_settings_are_checked():
  assert gair_settings.from_config({"enabled": True, "rounds": 2}).rounds == 2
  with pytest.raises(ConfigError, match="GAIR has no settings \\['round'\\]"):
    gair_settings.from_config({"round": 2})
  with pytest.raises(ConfigError, match="attribute_threshold=1.5"):
    gair_settings.GairConfig(attribute_threshold=1.5)
  for field in ("guidance", "lam_max", "class_keep", "logit_scale", "image_weight"):  # nan and inf are no setting
    for bad in (float("nan"), float("inf")):
      with pytest.raises(ConfigError, match=f"{field}={bad!r}"):
        gair_settings.GairConfig(**{field: bad})


@pytest.mark.parametrize("lams", ["(float('nan'),)", "(0.5, inf)"])
def test_retrieve_refuses_lams_that_are_not_finite_numbers_before_the_models_load(tmp_path, capsys, lams):
  from mcti_jax import cli
  export = tmp_path / "tokens"
  export.mkdir()
  (export / "manifest.json").write_text("{}")  # never read: the check comes first
  with pytest.raises(SystemExit) as e:
    cli.main(["mcti", "retrieve", "--tokens", str(export), f"--config.lams={lams}", f"--config.out={tmp_path / 'o'}"])
  assert e.value.code == 1 and not (tmp_path / "o").exists()
  assert capsys.readouterr().err.startswith("mcti retrieve: error: config.lams=")


def test_retrieval_evaluator_is_a_type_with_checked_fields():
  from mcti_jax.evaluation import evaluators
  assert evaluators.make("r", dict(type="retrieval", query="mix", lam=0.25)).lam == 0.25
  with pytest.raises(ConfigError, match="query='best'; use one of composite, mix, gair"):
    evaluators.make("r", dict(type="retrieval", query="best"))
  with pytest.raises(ConfigError, match="GAIR has no settings"):
    evaluators.make("r", dict(type="retrieval", gair=dict(bogus=1)))


# ------------------------------------------------------------------ the command


@pytest.mark.slow
def test_retrieve_command_on_the_tiny_model(tiny_checkpoint, tmp_path):
  from mcti_jax import cli
  tokens = random_export(tiny_checkpoint, tmp_path / "export")
  _gallery(tmp_path / "images", count=5)
  queries = [parse_query("a photo of a <cls-1> bold", type="bold", opposite="thin"),
             parse_query("a photo of a <cls-2> with a hat")]
  (tmp_path / "labels.json").write_text(json.dumps(labels_lib.labels_json(queries, [["img0.png"], ["sub/deep.png"]],
                                                                        gallery="images")))
  out = tmp_path / "out"
  cli.main(["mcti", "retrieve", "--tokens", str(tokens), f"--config.labels={tmp_path / 'labels.json'}",
            f"--config.out={out}", "--config.gair.rounds=2", "--config.gair.num_images=2", "--config.gair.steps=2",
            "--config.lams=(0.0, 1.0)", "--config.strip_images=3"])
  results = json.loads((out / "results.json").read_text())
  assert set(results["metrics"]) == {"composite", "lam=0", "lam=1", "gair"}
  assert results["metrics"]["gair"]["overall"]["queries"] == 2 and set(results["metrics"]["gair"]["by_type"]) == {
      "bold", "query"}
  assert results["best_fixed"] in ("composite", "lam=0", "lam=1")
  first = results["per_query"][0]
  assert len(first["top"]["gair"]) == 5 and 0 <= first["gair"]["lam"] <= 1 and 1 <= len(first["gair"]["rounds"]) <= 2
  from PIL import Image
  strip = np.asarray(Image.open(out / first["strip"]))  # rows gair, composite; 2 drawings | gap | 3 results
  block = strip[-(8 + 2 * 64 + 8):-8, -(8 + (2 + 1 + 3) * 72 - 8):-8]  # the cells, bottom-right (plots.image_grid)
  assert (block[64:72] == 255).all() and (block[:, 2 * 72 - 8:3 * 72] == 255).all()  # between rows; the gap
  assert (block[64 + 8:, :2 * 72] == 255).all()  # the composite row has no drawings
  assert (strip[:-(8 + 2 * 64 + 8)] < 128).any() and (strip[:, :-(8 + 6 * 72)] < 128).any()  # title, row labels


def test_retrieve_command_needs_tokens(tmp_path):
  from mcti_jax import cli
  with pytest.raises(SystemExit) as e:
    cli.main(["mcti", "retrieve", f"--config.out={tmp_path}"])
  assert e.value.code == 1
  with pytest.raises(ConfigError, match="--tokens needs the export folder"):
    cli.with_tokens_flag(["mcti retrieve", "--tokens"])
  assert cli.with_tokens_flag(["p", "--tokens", "x", "--tokens=y"]) == ["p", "--config.tokens=x", "--config.tokens=y"]


@pytest.mark.slow
def test_retrieval_rows_in_the_eval_harness(tiny_checkpoint, tmp_path):
  """A retrieval evaluator's row holds MRR / R@1 / R@5; classification rows and tables stay as they were."""
  from conftest import tiny_train_config
  from mcti_jax.evaluation import evaluate
  config = eval_config.get_config("tiny")
  config.train = tiny_train_config(tiny_checkpoint, tmp_path / "unused", **{"phase.ti.steps": 2,
                                                                             "phase.mcti.steps": 2})
  config.workdir = str(tmp_path / "eval")
  config.n_shots, config.seeds = (1,), (1,)
  eval_config.only(config, "mcti")
  small = dict(type="retrieval", phase="mcti", attributes=("ink",))
  config.evals.composite = dict(small, label="composite prompt", query="composite")
  config.evals.gair = dict(small, label="GAIR", query="gair", gair=dict(rounds=1, num_images=1, steps=2))
  evaluate.run(config, log=lambda _: None)
  rows = {r["method"]: r for r in json.loads((tmp_path / "eval" / "results.json").read_text())["rows"]}
  assert "top1" in rows["mcti"] and "mrr" not in rows["mcti"]
  for name in ("composite", "gair"):
    assert "top1" not in rows[name] and rows[name]["queries"] + rows[name]["skipped"] == 20
    assert 0 < rows[name]["mrr"] <= 1 and set(rows[name]["by_type"]) == {"thin", "bold"}
  assert 0 <= rows["gair"]["lam_mean"] <= 1
  md = (tmp_path / "eval" / "results.md").read_text()
  assert "## composite retrieval" in md and f"| GAIR | {100 * rows['gair']['mrr']:.1f} ± 0.0 |" in md
  assert md.split("## composite retrieval")[0].count("| GAIR |") == 0  # not in the top-1 tables


def test_the_tiny_gallery_of_classifier_trained_tokens_holds_the_digits_they_were_trained_for():
  """DCT tokens for the guide's "three" and "seven": token 0's relevant images are the 3s, token 1's the 7s."""
  from mcti_jax import data as D
  manifest = {"shots": None, "classifier": {"targets": [3, 7], "target_names": ["three", "seven"]},
              "classes": [{"name": "three"}, {"name": "seven"}]}
  gallery = tiny_world.tiny_gallery(manifest, 2)
  pool = D.from_digits("heldout")
  digit_of = dict(zip(pool.ids, pool.labels.tolist()))
  assert sorted(set(gallery.labels.tolist())) == [0, 1] and len(gallery) == sum(d in (3, 7) for d in pool.labels)
  assert all(digit_of[i] == (3, 7)[label] for i, label in zip(gallery.ids, gallery.labels.tolist()))
  with pytest.raises(ConfigError, match=r"learned for the classifier classes \['leaning left'\], not digits"):
    tiny_world.tiny_gallery({"shots": None, "classifier": {"target_names": ["leaning left"]}}, 1)


def test_tiny_gallery_leaves_out_the_shots_and_refuses_other_data():
  shots = {"source": "digits:heldout:0123456789", "classes": [{"index": 1, "shots": ["digits[1]"]}]}
  names = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
  full = tiny_world.tiny_gallery({"shots": None, "classifier": {"target_names": names}}, 10)  # learned from no images
  assert "digits[1]" in full.ids and set(full.labels.tolist()) == set(range(10))
  gallery = tiny_world.tiny_gallery({"shots": shots}, 3)
  assert "digits[1]" not in gallery.ids and len(gallery) == (full.labels < 3).sum() - 1
  with pytest.raises(ConfigError, match="trained on tfds:oxford_iiit_pet; give your gallery and queries as "
                                        "--config.labels"):
    tiny_world.tiny_gallery({"shots": {"source": "tfds:oxford_iiit_pet", "classes": []}}, 3)
