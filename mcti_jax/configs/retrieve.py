"""Composite retrieval with learned class tokens: rank images for "a photo of a <cls-k> <words>" queries.

  mcti retrieve --tokens runs/demo/5shot/seed1/export/mcti        # the tiny world (CPU, about a minute)
  mcti retrieve --tokens runs/pets/export/mcti --config.labels=queries.json --config.out=runs/retrieve_pets
  mcti retrieve --tokens runs/demo/5shot/seed1/export/ti --config.gair.rounds=4 --noconfig.gair.enabled

--tokens is the export folder of `mcti train`; the models default to the ones it
was trained on (its manifest.json). Without `labels` the gallery is the tiny
world's held-out digits minus the run's shots, the queries are
"a photo of a <cls-k> <word>" for both words of each of `attributes`, and an
image is relevant when it is of class k and its measured attribute lies in the
tercile the word names. `labels` is a JSON file over a folder of images (format
in mcti_jax/retrieval/labels.py): {"queries": [{"prompt": "a photo of a <cls-3> with a
red collar", "relevant": ["img001.png"]}]}.

Every query is ranked by the plain composite prompt, by q(lam) for each of `lams`
(the class prompt's CLIP text feature moved towards the composite prompt's) and,
with gair.enabled, by GAIR (mcti_jax/retrieval/gair.py: it draws the query with
the tokens' Stable Diffusion, adjusts lam until the drawings show both the class
and the words; with gair.expand_query, our addition, it also adds the drawings'
CLIP feature to the query). Writes
<out>/results.json (MRR, R@1, R@5 per query kind, overall and per query type;
each query's top 5) and <out>/strips/q<i>.png (GAIR's drawings | its top
results; below, the composite prompt's; green frame: relevant, red: not).
"""

import dataclasses

import ml_collections

from mcti_jax.retrieval import settings


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  if arg:
    raise ValueError(f"the retrieve config has no presets (got {arg!r}); set fields with --config.<field>=<value>")
  c = ml_collections.ConfigDict()
  c.tokens = ""  # export folder of `mcti train` (also --tokens)
  c.out = "runs/retrieve"
  c.sd_path = ""  # default: the export's base model
  c.clip_path = ""  # default: the export's CLIP
  c.labels = ""  # a labels file over your own gallery; empty: the tiny world's digits and shape words
  c.attributes = settings.TINY_ATTRIBUTES  # tiny world: its queries use both words of each (tiny/captions.py)
  c.template = "a photo of a {}"  # tiny world: the class prompt; the words follow it
  c.lams = settings.LAMS  # the fixed queries q(lam); q(1) is the composite prompt, always reported
  c.resolution = 0  # labels galleries are read at this size; 0: CLIP's input size
  c.strip_images = 8  # retrieved images per row of a strip
  c.num_devices = ml_collections.config_dict.placeholder(int)  # for the gallery's CLIP features (default: all)
  c.gair = ml_collections.ConfigDict({"enabled": True, **dataclasses.asdict(settings.GairConfig())})
  return c
