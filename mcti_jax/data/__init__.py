"""Few-shot data: sources -> LabeledImages -> sampled FewShot -> cached encodings.

  labeled = from_folder("/data/pets")                  # or from_tfds / from_split_file / from_digits / from_synthetic
  labeled = load_labeled(config.data, "train")         # the source a config names
  few = sample_few_shot(labeled, n_shots=8, seed=0, resolution=512, with_remaining=True)
  feats = encode_cached(few, encode_fn, "cache/", key={"model": ..., "source": labeled.source})
  for images, labels, _ in few.remaining.batches(512, batch_size=32): ...
  few = sample_few_shot(labeled, 16, seed=0, resolution=512, load=False)  # 1000 classes: read a chunk at a time
  feats = encode_by_class(few, encode_fn, "cache/", key={...})          # one cache entry per class

May import: errors, paths, models.
"""

from mcti_jax.data.cache import cache_digest, cache_path, class_cache_path, class_digest, encode_by_class, encode_cached
from mcti_jax.errors import DataError
from mcti_jax.data.labeled import (SHOT_CHUNK, FewShot, LabeledImages, choose_shots, class_rng, sample_few_shot,
                                   shots_manifest, threaded_reader)
from mcti_jax.data.preprocess import (IMAGE_EXTENSIONS, INTERPOLATIONS, center_crop_resize, flip_horizontal,
                                      read_image, to_model_range, to_rgb)
from mcti_jax.data.sources import (digits_images, digits_split, from_digits, from_file_lists, from_folder,
                                   from_split_file, load_labeled, num_classes_of)
from mcti_jax.data.synthetic import from_synthetic
from mcti_jax.data.tfds_source import from_tfds
