"""Judges of generated digits that share nothing with our models: scikit-learn classifiers of pixels.

Both learn all ten digits from the pretraining half of `data.digits_split` and
read an image as its grey pixels / 255, flattened (`features`): `logistic` is
the demos' judge, `knn` the DCT demo's second. The demos import them from here,
so that the tiny world never imports a demo.
"""

from __future__ import annotations

import numpy as np

from mcti_jax import data as D


def features(images: np.ndarray) -> np.ndarray:
  """uint8 images [B, H, W, 3] -> [B, H * W] grey / 255."""
  return images.astype(np.float32).mean(-1).reshape(len(images), -1) / 255.0


def _digits():
  images, labels = D.digits_images()
  return features(images), labels, D.digits_split(labels)  # {"pretrain": positions, "heldout": positions}


def logistic(seed: int = 0):
  """A logistic regression of all ten digits; (judge, its accuracy on the held-out half)."""
  from sklearn.linear_model import LogisticRegression
  from sklearn.pipeline import make_pipeline
  from sklearn.preprocessing import StandardScaler
  x, labels, parts = _digits()
  train, test = parts["pretrain"], parts["heldout"]
  judge = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=0.1, random_state=seed))
  judge.fit(x[train], labels[train])
  return judge, float(judge.score(x[test], labels[test]))


def knn(k: int = 3):
  """A k-NN of all ten digits; (judge, its accuracy on the held-out half)."""
  from sklearn.neighbors import KNeighborsClassifier
  x, labels, parts = _digits()
  judge = KNeighborsClassifier(n_neighbors=k).fit(x[parts["pretrain"]], labels[parts["pretrain"]])
  return judge, float(judge.score(x[parts["heldout"]], labels[parts["heldout"]]))
