"""GAIR, Generation-Aided Image Retrieval: refine a composite query with images drawn for it.

A composite query "a photo of a S_k w" asks for class k showing the words w.
Its plain CLIP text feature can lean on either part (a strong token drowns the
words, or the words drown the class). GAIR (Perera et al.) draws what the query
asks for, checks what the drawings show, and retrieves with a query balanced to
match. Every choice is a field of `GairConfig` (settings.py); queries.py has the queries.

1. Interpolation. The generator is conditioned on h(lam) = h_c + lam (h_cw - h_c),
   h_c the text encoder's last hidden states of the class prompt
   ("a photo of a S_k"), h_cw of the composite prompt: lam 0 draws the class
   alone, 1 the composite prompt.
2. Judges, on the CLIP image features f_i of a query's drawings:
   - class: p_class = mean_i softmax_j(logit_scale cos(f_i, t_j))[k], t_j the
     text feature of "a photo of a S_j" (the CLIP-token head). Shown when
     p_class >= class_keep x p_class of the lam = 0 drawings (same starting
     noise). Relative, because a generator cannot draw a class it never
     learned (the tiny model's 5-9): then no lam shows the class absolutely,
     but more lam can still lose what the class prompt alone shows.
   - attribute: p_attr = mean_i of CLIP's 2-way choice between the composite
     prompt and "<class prompt> <opposite words>" (the query's opposite; the
     class prompt alone when it has none). Shown when p_attr >=
     attribute_threshold.
3. Search: bisection on [0, lam_max], every query at once. The first round
   draws at lam_max / 2 (and the lam = 0 reference, in the same batch); then
   per query: both shown -> done, lam kept; attribute not shown -> more lam
   (lo = lam); class not shown -> less lam (hi = lam), whatever the attribute,
   since a drawing without the class answers nothing; lam = (lo + hi) / 2. Each
   image keeps its starting noise in every round (image i of query q draws from
   fold_in(key(seed), q * num_images + i)), so rounds differ only by lam. The
   final lam is the round whose worse margin, min(p_class - its threshold,
   p_attr - attribute_threshold), is largest: the first round that showed
   both, else the nearest miss.
4. The refined query: q(lam) = normalize(g_c + lam (g_cw - g_c)), the same
   interpolation of the two prompts' CLIP text features (queries.mix) at the
   searched lam. This is GAIR as the paper describes it: "the query is modified
   at inference time" by "balancing the learned token with attribute-based
   prompts" (abstract and summary; the method section is not available to us).
5. Query expansion, ours and off by default (`expand_query`): q = normalize(q(lam)
   + image_weight n(f)), f the mean of the final round's image features, each
   weighted by its p_class x p_attr (judge_weighting), so drawings that show
   both count most. The paper does not describe adding the drawings' features
   to the query, so the default follows it; the two are reported as separate
   rows (docs/RESULTS.md), and `Refined.search_features` always holds step 4's
   query, so one search gives both.

Cost: (rounds + 1) x num_images drawings per query, all queries drawn together
each round: one call of one compiled program per batch_size drawings.

Settings. The paper gives none. class_keep, lam_max and attribute_threshold
were chosen for step 4 (the default) by the mean MRR over shot seeds 0 and 4,
which no table reports, on the tiny model's custom tokens (in the subspace,
the demo's training settings): lam_max 1 (1.5 lost 0.4 MRR, 1.4 with the
expansion), class_keep 0.5 of {0.5, 0.7, 0.9} (attribute_threshold 0.55-0.7
changed nothing at 0.5); image_weight 0.5 of {0.25, 0.5, 1} and judge weighting
(over a plain mean) for step 5 at those. The search alone scored 6.5-8 MRR below
the best fixed lam there (mean of the two seeds) at every setting tried; the
expansion tied it. `mcti demo --config custom_demo:gair_tune` reruns the grid;
docs/RESULTS.md has it, and seeds 1-3, which the demo reports.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mcti_jax.tokens import conditioning
from mcti_jax.generation import generate, sampling
from mcti_jax.models import clip as clip_lib
from mcti_jax.models import vae as vae_lib
from mcti_jax.models.frozen import Frozen, freeze
from mcti_jax.retrieval.queries import mix, normalize, prompt_features
from mcti_jax.retrieval.settings import GairConfig


# ------------------------------------------------------------------ the search


class Search:
  """Bisection of every query's lam (step 3 of the module docstring); the caller draws and judges.

    search = Search(num_queries, lam_max)
    for _ in range(rounds):
      queries = search.active()
      best = search.update(queries, class_margin, attribute_margin)   # margins >= 0: shown, at search.lam[queries]
  """

  def __init__(self, num_queries: int, lam_max: float):
    self.lo = np.zeros(num_queries)
    self.hi = np.full(num_queries, float(lam_max))
    self.lam = np.full(num_queries, lam_max / 2)
    self.done = np.zeros(num_queries, bool)
    self.best_margin = np.full(num_queries, -np.inf)
    self.final = np.full(num_queries, np.nan)  # the chosen lam
    self.history: list[dict[str, np.ndarray]] = []

  def active(self) -> np.ndarray:
    """The queries still searching (not yet shown both)."""
    return np.flatnonzero(~self.done)

  def update(self, queries, class_margin, attribute_margin) -> np.ndarray:
    """Judge the round drawn at lam[queries]; move lam; True where this round is now the query's chosen one."""
    queries = np.asarray(queries)
    class_margin, attribute_margin = np.asarray(class_margin, float), np.asarray(attribute_margin, float)
    lam = self.lam[queries]
    class_ok, attribute_ok = class_margin >= 0, attribute_margin >= 0
    margin = np.minimum(class_margin, attribute_margin)
    take = margin > self.best_margin[queries]
    self.best_margin[queries] = np.where(take, margin, self.best_margin[queries])
    self.final[queries] = np.where(take, lam, self.final[queries])
    self.lo[queries] = np.where(class_ok & ~attribute_ok, lam, self.lo[queries])  # attribute missing: more lam
    self.hi[queries] = np.where(~class_ok, lam, self.hi[queries])  # class missing: less lam
    both = class_ok & attribute_ok
    self.done[queries] |= both
    self.lam[queries] = np.where(both, lam, (self.lo[queries] + self.hi[queries]) / 2)
    self.history.append({"queries": queries, "lam": lam, "class_margin": class_margin,
                         "attribute_margin": attribute_margin})
    return take


# ------------------------------------------------------------------ judges


def _softmax(x):
  x = x - x.max(-1, keepdims=True)
  e = np.exp(x)
  return e / e.sum(-1, keepdims=True)


def judge(image_features, head, class_index, positive, negative, logit_scale: float):
  """(p_class, p_attr), each [Q, G], of the drawings' CLIP features [Q, G, P].

  p_class: the softmax over the class head's text features head [K, P] at the
  query's class; p_attr: the 2-way softmax of positive [Q, P] against
  negative [Q, P].
  """
  f = normalize(np.asarray(image_features, np.float64))
  head, positive, negative = (normalize(np.asarray(x, np.float64)) for x in (head, positive, negative))
  p_class = np.take_along_axis(_softmax(logit_scale * f @ head.T), np.asarray(class_index)[:, None, None], -1)[..., 0]
  two = np.stack([np.einsum("qgp,qp->qg", f, positive), np.einsum("qgp,qp->qg", f, negative)], -1)
  return p_class, _softmax(logit_scale * two)[..., 0]


def query_feature(class_text, composite_text, lam, image_features, weights, image_weight: float) -> np.ndarray:
  """Step 5: normalize(q(lam) + image_weight n(weighted mean of the drawings' features)) [Q, P]; image_weight 0
  gives step 4's q(lam) alone.

  image_features [Q, G, P], weights [Q, G] (all equal for a plain mean).
  """
  text = mix(class_text, composite_text, lam)
  if image_weight == 0:
    return text
  w = np.asarray(weights, np.float64) + 1e-12
  mean = (normalize(np.asarray(image_features, np.float64)) * w[..., None]).sum(1) / w.sum(1)[:, None]
  return normalize(text + image_weight * normalize(mean)).astype(np.float32)


def searched_queries(clip: Frozen, tokenizer, learned, queries: Sequence, lam, *, pooling: str = "eos") -> np.ndarray:
  """Step 4's query q(lam) [Q, P] of every query at its own lam [Q] (as Refined.search_features holds it): GAIR
  without the query expansion, from a search's lams (e.g. results.json's per-query "gair" "lam")."""
  text = functools.partial(prompt_features, clip, tokenizer, learned=learned, pooling=pooling)
  return mix(text([q.class_prompt for q in queries]), text([q.prompt for q in queries]), np.asarray(lam, np.float64))


# ------------------------------------------------------------------ drawing


@functools.partial(jax.jit, static_argnames=("shape", "use_cfg"))
def _draw(unet: Frozen, vae: Frozen, clip: Frozen, schedule, timesteps, h_class, h_composite, lam, uncond, indices,
          seed, guidance, *, shape, use_cfg):
  """Images [B, H, W, 3] (in [0, 1], on the uint8 grid) and their CLIP features [B, P], drawn from h(lam)."""
  context = h_class + lam[:, None, None].astype(h_class.dtype) * (h_composite - h_class)
  latents = sampling.initial_latents(seed, indices, shape)
  latents = sampling.denoise(unet.module, schedule, latents, context, uncond, timesteps, guidance, use_cfg=use_cfg)
  images = jnp.round(jnp.clip(vae_lib.decode_images(vae.module, latents), 0, 1) * 255) / 255
  return images, clip_lib.image_features(clip.module, images)


class Drawer:
  """Draws every asked query's images at its lam in fixed-size chunks (one compile), from per-image starting noise."""

  def __init__(self, sd, clip: Frozen, h_class, h_composite, uncond, cfg: GairConfig, chunk: int):
    sampling.check_sampler(sd.schedule.config)
    self.models = (freeze(sd.unet), freeze(sd.vae), clip, sd.schedule)
    self.timesteps = jnp.asarray(sampling.ddim_timesteps(sd.schedule.config, cfg.steps))
    self.shape = generate.latent_shape(sd)
    self.h_class, self.h_composite, self.uncond = np.asarray(h_class), np.asarray(h_composite), jnp.asarray(uncond)
    self.cfg, self.chunk = cfg, chunk

  def __call__(self, queries: np.ndarray, lam: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images [n, G, H, W, 3] and CLIP features [n, G, P] of queries [n] at lam [n]."""
    g = self.cfg.num_images
    q_of = np.repeat(queries, g)
    lam_of = np.repeat(np.asarray(lam, np.float32), g)
    indices = (q_of * g + np.tile(np.arange(g), len(queries))).astype(np.int32)
    total = -(-len(q_of) // self.chunk) * self.chunk
    pad = lambda x: np.concatenate([x, np.repeat(x[:1], total - len(x), 0)])  # noqa: E731
    q_of, lam_of, indices = pad(q_of), pad(lam_of), pad(indices)
    images, features = [], []
    for s in range(0, total, self.chunk):
      part = slice(s, s + self.chunk)
      i, f = _draw(*self.models, self.timesteps, jnp.asarray(self.h_class[q_of[part]]),
                   jnp.asarray(self.h_composite[q_of[part]]), jnp.asarray(lam_of[part]), self.uncond,
                   jnp.asarray(indices[part]), np.uint32(self.cfg.seed), np.float32(self.cfg.guidance),
                   shape=self.shape, use_cfg=self.cfg.guidance > 1)
      images.append(generate.to_uint8(i))
      features.append(np.asarray(f))
    n = len(queries) * g
    images, features = np.concatenate(images)[:n], np.concatenate(features)[:n]
    return images.reshape(len(queries), g, *images.shape[1:]), features.reshape(len(queries), g, -1)


# ------------------------------------------------------------------ GAIR


@dataclasses.dataclass
class Refined:
  """GAIR's answer for every query: the chosen lam, the refined query feature, the final round's drawings."""
  lam: np.ndarray  # [Q]
  query_features: np.ndarray  # [Q, P] the query to retrieve with: expanded (step 5) with expand_query, else q(lam)
  search_features: np.ndarray  # [Q, P] q(lam) at the searched lam (step 4): GAIR as published, whatever the config
  images: np.ndarray  # uint8 [Q, G, H, W, 3]
  image_features: np.ndarray  # [Q, G, P] their CLIP features
  weights: np.ndarray  # [Q, G] each drawing's weight in the query (p_class x p_attr, or 1)
  p_class: np.ndarray  # [Q] at the chosen lam
  p_attr: np.ndarray  # [Q]
  class_threshold: np.ndarray  # [Q]: class_keep x p_class of the lam = 0 drawings
  rounds: list[list[dict[str, float]]]  # per query: {"lam", "p_class", "p_attr"} of each round it was drawn in
  seconds: float

  def summary(self, i: int) -> dict[str, Any]:
    return {"lam": float(self.lam[i]), "p_class": float(self.p_class[i]), "p_attr": float(self.p_attr[i]),
            "class_threshold": float(self.class_threshold[i]), "rounds": self.rounds[i]}


def refine(sd, clip: Frozen, tokenizer, learned, queries: Sequence, cfg: GairConfig, *, pooling: str = "eos",
           log: Callable[[str], None] = print) -> Refined:
  """Search lam for every query by drawing (steps 1-3), then build the refined query features (step 4, and step 5
  with cfg.expand_query)."""
  start = time.time()
  q_count, num_classes = len(queries), learned.class_tokens.num_classes
  if q_count == 0:
    raise ValueError("GAIR needs at least one query")
  text = functools.partial(prompt_features, clip, tokenizer, learned=learned, pooling=pooling)
  class_prompts, composite = [q.class_prompt for q in queries], [q.prompt for q in queries]
  head = text([cfg.head_template.format(f"<cls-{j}>") for j in range(num_classes)])
  class_text, composite_text = text(class_prompts), text(composite)
  negative = text([f"{q.class_prompt} {q.opposite}" if q.opposite else q.class_prompt for q in queries])
  class_index = np.asarray([q.class_index for q in queries])

  encoder = freeze(sd.text_encoder)
  h_class = conditioning.encode_prompts(encoder, tokenizer, class_prompts, learned)[0]
  h_composite = conditioning.encode_prompts(encoder, tokenizer, composite, learned)[0]
  uncond = conditioning.encode_prompts(encoder, tokenizer, [""])[0]
  draw = Drawer(sd, clip, h_class, h_composite, uncond, cfg, chunk=min(cfg.batch_size, q_count * cfg.num_images))

  def judged(queries_, features):
    p_class, p_attr = judge(features, head, class_index[queries_], composite_text[queries_], negative[queries_],
                            cfg.logit_scale)
    return p_class, p_attr

  search = Search(q_count, cfg.lam_max)
  everyone = np.arange(q_count)
  # Round 1 and the lam = 0 reference in one call.
  images, features = draw(np.concatenate([everyone, everyone]), np.concatenate([np.zeros(q_count), search.lam]))
  reference, _ = judged(everyone, features[:q_count])
  class_threshold = cfg.class_keep * reference.mean(1)
  images, features = images[q_count:], features[q_count:]
  chosen_images, chosen_features = images.copy(), features.copy()
  chosen_pc, chosen_pa = np.zeros((q_count, cfg.num_images)), np.zeros((q_count, cfg.num_images))
  rounds: list[list[dict[str, float]]] = [[] for _ in range(q_count)]
  for r in range(cfg.rounds):
    active = search.active()
    if r > 0:
      if not len(active):
        break
      images, features = draw(active, search.lam[active])
    p_class, p_attr = judged(active, features)
    lam = search.lam[active].copy()
    take = search.update(active, p_class.mean(1) - class_threshold[active], p_attr.mean(1) - cfg.attribute_threshold)
    for j, q in enumerate(active):
      rounds[q].append({"lam": float(lam[j]), "p_class": float(p_class[j].mean()), "p_attr": float(p_attr[j].mean())})
    won = active[take]
    chosen_images[won], chosen_features[won] = images[take], features[take]
    chosen_pc[won], chosen_pa[won] = p_class[take], p_attr[take]
    shown = int(search.done.sum())
    log(f"  GAIR round {r + 1}/{cfg.rounds}: drew {len(active)} queries x {cfg.num_images}; {shown}/{q_count} show "
        f"class and attribute")
  weights = chosen_pc * chosen_pa if cfg.judge_weighting else np.ones_like(chosen_pc)
  searched = query_feature(class_text, composite_text, search.final, chosen_features, weights, 0.0)
  features = (query_feature(class_text, composite_text, search.final, chosen_features, weights, cfg.image_weight)
              if cfg.expand_query else searched)
  return Refined(search.final.copy(), features, searched, chosen_images, chosen_features, weights, chosen_pc.mean(1),
                 chosen_pa.mean(1), class_threshold, rounds, time.time() - start)
