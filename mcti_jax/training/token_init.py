"""Where class tokens start: a word, random, given texts, or each class's own label or caption.

A good start saves steps: a token that begins at its class's words begins
near what the frozen models already know about it. `tokens.init`:

- word: every vector of every class at the embedding of `tokens.init_word` (TI's coarse word, e.g. "pet");
- random: Gaussian with the vocabulary's per-dimension mean and std;
- texts: class k from `tokens.init_texts[k]` (token v if the text has exactly V_k tokens, else their mean);
- label: class k from the words of its label. With `tokens.label_classifier` (a guides spec, the multi-token
  initialisation paper's way: an off-the-shelf classifier names the image) the label is the classifier's class
  name of highest mean probability over the class's shots (softmax over its classes, or over `tokens.label_words`
  among them when those are set); without one, the word of `tokens.label_words` that CLIP zero-shot (under
  `tokens.label_template`) most often puts first on the class's shots (ties: the higher mean probability).
  `class_labels` picks the source;
- caption: class k from the words of its caption in `tokens.caption_file`: one line per class (K lines), or one
  line per shot (K*N lines, class-major, in the order of the sampled shots), in which case class k starts from
  its first shot's caption.

With label and caption, class k gets one vector per token of its text (V_k; vector v starts at the text's v-th
token in SD's embedding table), so classes differ in V_k: the token array is padded to V = max V_k and the
unused vectors are masked (tokens.ClassTokens.counts). Word, random and texts give every class
`tokens.num_vectors` vectors, or `tokens.vectors_per_class[k]`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from mcti_jax import paths
from mcti_jax.errors import ConfigError
from mcti_jax.models.tokenizer import MAX_LENGTH

TEXT_INITS = ("label", "caption")  # the inits whose text decides V_k


@dataclasses.dataclass(frozen=True)
class TokenInit:
  """The initial tokens of K classes: vectors [K, V, D] (past counts[k], copies of the class's last vector: never
  used, never trained), counts [K], and the text each class started from (label/caption/texts inits; else None)."""
  vectors: np.ndarray
  counts: np.ndarray
  texts: tuple[str, ...] | None = None


def initial_tokens(config, tokenizer, embedding_table, num_classes: int, texts: list[str] | None = None,
                   seed: int = 0) -> TokenInit:
  """The start of every class by `config.tokens.init`; label and caption take their per-class `texts` (from
  `class_labels` or `read_captions`)."""
  t = config.tokens
  table = np.asarray(embedding_table, np.float32)
  if t.init in TEXT_INITS:
    if texts is None or len(texts) != num_classes:
      raise ValueError(f"tokens.init={t.init!r} needs one text per class ({num_classes})")
    rows = [token_embeddings(tokenizer, table, text) for text in texts]
    counts = np.asarray([len(r) for r in rows], np.int32)
    return TokenInit(_padded(rows, int(counts.max())), counts, tuple(texts))
  counts = vector_counts(config, num_classes)
  num_vectors = int(counts.max())
  if t.init == "word":
    return TokenInit(from_word(tokenizer, table, t.init_word, counts), counts)
  if t.init == "random":
    import jax
    noise = np.asarray(jax.random.normal(jax.random.PRNGKey(seed), (num_classes, num_vectors, table.shape[1])))
    vectors = (table.mean(0) + table.std(0) * noise).astype(np.float32)
    return TokenInit(_padded([v[:n] for v, n in zip(vectors, counts)], num_vectors), counts)
  if t.init == "texts":
    rows = []
    for text, n in zip(t.init_texts, counts):
      vecs = token_embeddings(tokenizer, table, text)
      rows.append(vecs if len(vecs) == n else np.repeat(vecs.mean(0, keepdims=True), n, axis=0))
    return TokenInit(_padded(rows, num_vectors), counts, tuple(t.init_texts))
  raise ConfigError(f"unknown tokens.init {t.init!r}; use word, random, texts, label or caption")


def from_word(tokenizer, embedding_table, word: str, counts) -> np.ndarray:
  """[K, V, D]: class k's first counts[k] vectors at the embedding of `word` (the mean of its tokens), as in TI."""
  vec = token_embeddings(tokenizer, embedding_table, word).mean(0)
  return _padded([np.repeat(vec[None], n, 0) for n in counts], int(np.max(counts)))


def vector_counts(config, num_classes: int) -> np.ndarray:
  """V_k of the word, random and texts inits: `tokens.vectors_per_class`, else `tokens.num_vectors` for all."""
  t = config.tokens
  if t.get("vectors_per_class") is None:
    return np.full(num_classes, t.num_vectors, np.int32)
  counts = tuple(t.vectors_per_class)
  if t.init in TEXT_INITS:
    raise ConfigError(f"tokens.vectors_per_class is set, but tokens.init={t.init!r} gives each class as many vectors "
                      "as its text has tokens; unset one of them")
  if len(counts) != num_classes or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1
                                           for n in counts):
    raise ConfigError(f"tokens.vectors_per_class={counts!r} must give an integer >= 1 for each of the {num_classes} "
                      "classes")
  return np.asarray(counts, np.int32)


def token_embeddings(tokenizer, embedding_table, text: str) -> np.ndarray:
  """The embeddings [n, D] of the n tokens of `text` (no BOS/EOS), rows of the frozen table."""
  ids = tokenizer(text, add_special_tokens=False)["input_ids"]
  if not ids:
    raise ConfigError(f"initializer text {text!r} has no tokens")
  if max(ids) >= embedding_table.shape[0]:
    raise ConfigError(f"initializer text {text!r} holds a placeholder token; use plain words")
  return np.asarray(embedding_table, np.float32)[ids]


def _padded(rows: list[np.ndarray], num_vectors: int) -> np.ndarray:
  """[K, V, D] from rows [V_k, D], each padded with copies of its last vector (those never reach a prompt)."""
  return np.stack([np.concatenate([r, np.repeat(r[-1:], num_vectors - len(r), 0)]) for r in rows]).astype(np.float32)


# ------------------------------------------------------------------ captions


def read_captions(path, num_classes: int, num_shots: int) -> list[str]:
  """Class k's caption from `path`: line k of K lines, or line k*N (its first shot's) of K*N lines."""
  if not path:
    raise ConfigError("tokens.init='caption' needs tokens.caption_file: a text file with one caption per class "
                      f"({num_classes} lines) or per shot ({num_classes * num_shots} lines, class-major)")
  file = Path(path).expanduser()
  lines = paths.read_text(path, "tokens.caption_file", f"write one caption per class ({num_classes} lines) or per "
                          f"shot ({num_classes * num_shots} lines, class-major)").splitlines()
  if len(lines) not in (num_classes, num_classes * num_shots):
    raise ConfigError(f"{file} has {len(lines)} lines, but needs one caption per class ({num_classes} lines) or per "
                      f"shot ({num_classes} classes x {num_shots} shots = {num_classes * num_shots} lines, "
                      "class-major)")
  for i, line in enumerate(lines):
    if not line.strip():
      raise ConfigError(f"{file} line {i + 1} is empty: every class (or shot) needs a caption")
  per = len(lines) // num_classes
  return [lines[k * per].strip() for k in range(num_classes)]


def check_room(tokenizer, counts, texts, templates: dict[str, tuple[str, ...]], class_names) -> None:
  """Each class's V_k = counts[k] placeholders (started from texts[k], or None) must fit in every prompt of every
  phase (`templates`: phase -> its templates): 77 tokens minus BOS, EOS and the template's own tokens."""
  def own_tokens(template: str, k: int) -> int:
    text = template.replace("{name}", class_names[k]).replace("{}", " ")
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])

  for phase, phase_templates in templates.items():
    for template in phase_templates:
      per_class = "{name}" in template
      shared = None if per_class else own_tokens(template, 0)
      for k, count in enumerate(counts):
        own = own_tokens(template, k) if per_class else shared
        room = MAX_LENGTH - 2 - own
        if count > room:
          source = f" from {texts[k]!r}" if texts is not None else ""
          raise ConfigError(
              f"class {k} ({class_names[k]}) starts{source} with {count} vectors, but the template {template!r} "
              f"(phase {phase}) leaves room for {room} (77 tokens minus BOS, EOS and its own {own}): shorten "
              "that class's caption (or label), or the template")


# ------------------------------------------------------------------ labels


def label_classifier_spec(config) -> dict | None:
  """`tokens.label_classifier` as a guides spec (its set fields only), or None when its type is unset: then labels
  come from CLIP zero-shot over `tokens.label_words`."""
  spec = config.tokens.get("label_classifier")
  if spec is None or not spec.get("type"):
    return None
  items = spec.items() if hasattr(spec, "items") else dict(spec).items()
  return {k: (tuple(v) if isinstance(v, list) else v) for k, v in items if v is not None}


def check_label_source(config) -> None:
  """What can be wrong with where tokens.init='label' takes its labels, found before any model loads."""
  spec = label_classifier_spec(config)
  if spec is None:
    if not config.tokens.label_words:
      raise ConfigError("tokens.init='label' needs tokens.label_words (the words CLIP zero-shot chooses each class's "
                        "label from, e.g. the dataset's class names) or tokens.label_classifier (a classifier that "
                        "names the shots, e.g. type='file', path=<folder>: the multi-token initialisation paper's way)")
    return
  from mcti_jax import guides
  if spec["type"] not in guides.TYPES:
    raise ConfigError(f"tokens.label_classifier.type={spec['type']!r}; classifier types: {', '.join(guides.TYPES)}")


def load_label_classifier(config):
  """The classifier of `tokens.label_classifier` (guides.load), None when unset; `tokens.label_words`, when set, must
  be among its class names."""
  spec = label_classifier_spec(config)
  if spec is None:
    return None
  from mcti_jax import guides
  classifier = guides.load(spec, where="tokens.label_classifier")
  words = list(config.tokens.label_words or ())
  missing = [w for w in words if w not in classifier.class_names]
  if missing:
    raise ConfigError(f"tokens.label_words holds {missing}, which tokens.label_classifier does not name (its classes: "
                      f"{', '.join(classifier.class_names[:10])}{', ...' if classifier.num_classes > 10 else ''}); "
                      "set tokens.label_words=() to choose among all its classes")
  return classifier


def class_labels(config, num_classes: int, *, shots=None, classifier=None, clip=None, clip_tokenizer=None,
                 shot_features=None) -> tuple[list[str], dict]:
  """Each class's label for tokens.init='label': from `tokens.label_classifier` on `shots` (a data.FewShot of all
  K classes, read a chunk of classes at a time; `classifier` if already loaded), else CLIP zero-shot over
  `tokens.label_words` on the shots' CLIP image features `shot_features` [K, N, P]. Returns (labels [K], info)."""
  if label_classifier_spec(config) is not None:
    if shots is None or shots.num_classes != num_classes:
      raise ValueError(f"labels from tokens.label_classifier need the shots of all {num_classes} classes")
    classifier = classifier if classifier is not None else load_label_classifier(config)
    return classifier_labels(classifier, shots.chunks(), tuple(config.tokens.label_words or ()))
  check_label_source(config)
  return clip_labels(clip, clip_tokenizer, shot_features, config.tokens.label_words, config.tokens.label_template)


def classifier_labels(classifier, chunks, words=()) -> tuple[list[str], dict]:
  """Each class's label: the class name of highest mean probability over its shots, the softmax over the
  classifier's classes (over `words` among them, when given).

  chunks: (rows [C], images [C, N, H, W, 3]) pairs, uint8 or floats in [0, 1], as data.FewShot.chunks yields them;
  rows are the classes' positions 0..K-1. Returns (labels [K], info) with info["probs"] [K, N, W],
  info["mean_probs"] [K, W] and info["words"] [W].
  """
  import jax
  allowed = (classifier.index_of(list(words)) if words else np.arange(classifier.num_classes)).astype(np.int64)
  names = [classifier.class_names[i] for i in allowed]
  logits_of = jax.jit(lambda c, x: c(x))
  probs: dict[int, np.ndarray] = {}
  for rows, images in chunks:
    images = np.asarray(images)
    flat = images.reshape(-1, *images.shape[2:])
    logits = np.asarray(logits_of(classifier, flat), np.float64)[:, allowed]
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p = (p / p.sum(-1, keepdims=True)).reshape(len(rows), images.shape[1], len(allowed))
    probs.update({int(r): p[i] for i, r in enumerate(rows)})
  stacked = np.stack([probs[k] for k in range(len(probs))])
  mean_prob = stacked.mean(1)
  return [names[int(w)] for w in mean_prob.argmax(-1)], {"probs": stacked, "mean_probs": mean_prob, "words": names}


def clip_labels(clip, tokenizer, shot_features, words, template: str = "a photo of a {}") -> tuple[list[str], dict]:
  """Each class's label: the word CLIP zero-shot (`template` holding each of `words`) ranks first on most of the
  class's shots, from their CLIP image features `shot_features` [K, N, P]; see `vote`."""
  from mcti_jax.classify import clip_head
  from mcti_jax.models.frozen import freeze
  words = list(words or ())
  if not words:
    raise ConfigError("tokens.init='label' needs tokens.label_words: the words CLIP chooses each class's label "
                      "from (e.g. the dataset's class names, or candidate words)")
  text = clip_head.name_text_features(freeze(clip), tokenizer, words, (template,))
  scale = min(float(np.exp(np.asarray(clip.logit_scale[...], np.float64))), 100.0)  # CLIP's, clipped as in training
  return vote(shot_features, text, scale, words)


def vote(shot_features, text_features, scale: float, words) -> tuple[list[str], dict]:
  """The word most often top-1 over each class's shots (ties: the higher mean probability over the shots).

  shot_features [K, N, P], text_features [W, P]; probabilities are the softmax of `scale` * cosine over the words.
  Returns (labels [K], info) with info["probs"] [K, N, W] and info["votes"] [K, W].
  """
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
  logits = scale * unit(np.asarray(shot_features, np.float64)) @ unit(np.asarray(text_features, np.float64)).T
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  votes = np.stack([np.bincount(p.argmax(-1), minlength=len(words)) for p in probs])  # [K, W]
  mean_prob = probs.mean(1)
  best = [int(np.lexsort((-mean_prob[k], -votes[k]))[0]) for k in range(len(votes))]
  return [words[w] for w in best], {"probs": probs, "votes": votes}
