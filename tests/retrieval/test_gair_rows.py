"""GAIR as published (the lam search, q(lam)) and our query expansion: one search, two queries, two rows."""

import dataclasses
import json

import numpy as np
import pytest

from conftest import random_export

from mcti_jax.errors import ConfigError
from mcti_jax.retrieval import gair
from mcti_jax.retrieval import settings as gair_settings
from mcti_jax.retrieval.queries import normalize, parse_query, prompt_features


def test_the_default_is_the_papers_gair_without_the_query_expansion():
  assert gair_settings.GairConfig().expand_query is False
  assert gair_settings.GairConfig(image_weight=0.0).image_weight == 0.0  # no expansion: the weight is unused
  with pytest.raises(ConfigError, match="image_weight=0.0"):
    gair_settings.GairConfig(expand_query=True, image_weight=0.0)  # an expansion that adds nothing
  assert gair_settings.from_config({"enabled": True, "expand_query": True}).expand_query


def test_the_custom_demo_names_its_tuning_seeds_and_reports_others():
  from mcti_jax.configs import custom_demo
  c = custom_demo.get_config()
  assert not set(c.seeds) & set(c.gair.tuned_on), (c.seeds, c.gair.tuned_on)


@pytest.fixture(scope="module")
def searched(tiny_checkpoint, tmp_path_factory):
  """One export of random tokens on the random tiny models, refined with and without the expansion."""
  from mcti_jax.retrieval import retrieve
  tokens = random_export(tiny_checkpoint, tmp_path_factory.mktemp("gair") / "export")
  sd, clip, tokenizer, learned, pooling, _ = retrieve.load_models(tokens, None, None, need_sd=True)
  queries = [parse_query("a photo of a <cls-0> bold", type="bold", opposite="thin"),
             parse_query("a photo of a <cls-2> leaning left", type="slant")]
  cfg = gair_settings.GairConfig(num_images=2, steps=2, rounds=2)
  runs = {expand: gair.refine(sd, clip, tokenizer, learned, queries, dataclasses.replace(cfg, expand_query=expand),
                              pooling=pooling, log=lambda _: None)
          for expand in (False, True)}
  return runs, (clip, tokenizer, learned, queries, pooling, cfg)


@pytest.mark.slow
def test_the_expansion_changes_the_query_and_nothing_of_the_search(searched):
  runs, (clip, tokenizer, learned, queries, pooling, cfg) = searched
  plain, expanded = runs[False], runs[True]
  np.testing.assert_array_equal(plain.lam, expanded.lam)
  np.testing.assert_array_equal(plain.images, expanded.images)
  np.testing.assert_array_equal(plain.search_features, expanded.search_features)
  np.testing.assert_array_equal(plain.query_features, plain.search_features)  # the paper's GAIR: q(lam) alone
  # q(lam) by hand: the two prompts' CLIP features mixed at each query's own lam.
  class_text = prompt_features(clip, tokenizer, [q.class_prompt for q in queries], learned, pooling)
  composite = prompt_features(clip, tokenizer, [q.prompt for q in queries], learned, pooling)
  g_c, g_cw = normalize(class_text), normalize(composite)
  by_hand = normalize(g_c + plain.lam[:, None].astype(np.float32) * (g_cw - g_c))
  np.testing.assert_allclose(plain.search_features, by_hand, atol=1e-6)
  np.testing.assert_allclose(gair.searched_queries(clip, tokenizer, learned, queries, [float(x) for x in plain.lam],
                                                   pooling=pooling), plain.search_features, atol=1e-7)
  # Ours: q(lam) + image_weight x the judge-weighted mean of the drawings' features, normalized.
  w = expanded.weights + 1e-12
  mean = (normalize(expanded.image_features.astype(np.float64)) * w[..., None]).sum(1) / w.sum(1)[:, None]
  want = normalize(by_hand + cfg.image_weight * normalize(mean))
  np.testing.assert_allclose(expanded.query_features, want, atol=1e-5)
  assert np.abs(expanded.query_features - plain.query_features).max() > 1e-3


@pytest.mark.slow
def test_the_custom_demo_scores_one_search_as_both_rows(tiny_checkpoint, tmp_path):
  """gair_rows: "gair_search" is the metric of q(lam) at the lams of the search whose expanded query is "gair"."""
  from mcti_jax.configs import custom_demo as demo_config
  from mcti_jax.demos import custom_demo
  from mcti_jax.retrieval import retrieve
  from mcti_jax.retrieval.metrics import metrics
  from mcti_jax.tokens import export
  tokens = random_export(tiny_checkpoint, tmp_path / "export")
  manifest = json.loads((tokens / export.MANIFEST).read_text())
  manifest["shots"] = {"source": "digits (heldout)", "classes": []}  # the tiny world's gallery: held-out 0-2
  (tokens / export.MANIFEST).write_text(json.dumps(manifest))
  config = demo_config.get_config("quick")  # GAIR: 1 round, 1 image, 2 steps
  config.gair.lams = (0.0, 1.0)
  r = custom_demo.gair_rows(config, tokens, tmp_path / "out")
  assert {"composite", "lam=0", "lam=1", "gair", "gair_search"} <= set(r["metrics"])
  assert r["gair"]["config"]["expand_query"] is True
  written = json.loads((tmp_path / "out" / "results.json").read_text())
  assert written["metrics"]["gair_search"] == r["metrics"]["gair_search"] and "query_kinds" in written
  setup = retrieve.tiny_setup(tokens, log=lambda _: None)
  lam = [row["gair"]["lam"] for row in r["per_query"]]
  features = gair.searched_queries(setup.clip, setup.tokenizer, setup.learned, setup.queries, lam)
  want = metrics(features @ normalize(setup.gallery_features.astype(np.float32)).T, setup.relevant,
                 [q.type for q in setup.queries])
  assert r["metrics"]["gair_search"]["overall"] == pytest.approx(want["overall"])
