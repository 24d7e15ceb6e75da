"""`mcti pretrain-tiny`: a short run writes a checkpoint that loads with our loaders and in torch, and
its losses fall; the committed checkpoint generates in diffusers and its CLIP knows digits 0-4 by name."""

import json
from pathlib import Path

import numpy as np
import pytest

from mcti_jax import data as D
from mcti_jax.tiny import DEFAULT_OUT
from mcti_jax.tiny import captions as C
from mcti_jax.tiny import data as TD
from mcti_jax.tiny import main
from mcti_jax.tiny import pretrain as P
from mcti_jax.models import pipeline

COMMITTED = DEFAULT_OUT
KNOWN_NAMES = {C.NAMES[d] for d in C.KNOWN_DIGITS}
UNKNOWN_NAMES = set(C.NAMES) - KNOWN_NAMES


def test_pretraining_sees_only_the_pretraining_half_of_known_digits():
  images, labels = TD.pretraining_data()
  all_images, all_labels = D.digits_images()
  split = D.digits_split(all_labels)
  assert set(np.unique(labels).tolist()) == set(C.KNOWN_DIGITS)
  assert len(images) == int(np.sum(all_labels[split["pretrain"]] < 5))
  heldout = {img.tobytes() for img in all_images[split["heldout"]]}
  unknown = {img.tobytes() for img in all_images[all_labels >= 5]}
  assert not any(img.tobytes() in heldout | unknown for img in images)
  for d in C.KNOWN_DIGITS:
    words = {w for caption in C.captions_of(d) for w in caption.split()}
    assert C.NAMES[d] in words and not words & UNKNOWN_NAMES
  assert "a photo of the digit three" in C.captions_of(3)


@pytest.mark.slow
def test_short_caption_rows_give_the_same_pooled_text_features():
  """The CLIP phase tokenizes captions to CLIP_TEXT_LENGTH, not 77: exact, because the tower is causal."""
  import jax.numpy as jnp
  from mcti_jax.tiny import checkpoints as tiny_checkpoints
  from mcti_jax.models import tokenizer as tokenizer_lib
  clip_model, tokenizer = tiny_checkpoints.build(0).clip, tiny_checkpoints.load_tiny_tokenizer()
  levels = np.array([0, 2, 0, 2, 0])  # every attribute mentioned: the longest captions
  texts = [C.attribute_caption(t, 3, levels, np.ones(5, bool)) for t in C.caption_templates()[:8]]
  short = tokenizer_lib.encode(tokenizer, texts, max_length=C.CLIP_TEXT_LENGTH)
  full = tokenizer_lib.encode(tokenizer, texts)
  np.testing.assert_array_equal(full[:, :C.CLIP_TEXT_LENGTH], short)
  assert np.all(full[:, C.CLIP_TEXT_LENGTH - 2:] == tokenizer.eos_token_id)
  np.testing.assert_allclose(clip_model.get_text_features(jnp.asarray(short)),
                             clip_model.get_text_features(jnp.asarray(full)), atol=1e-5)


def test_attribute_captions():
  levels = np.array([2, 0, 1, 1, 2])
  caption = C.attribute_caption("a photo of the {}", 4, levels, np.array([True, True, True, False, True]))
  assert caption == "a photo of the four bold narrow leaning left"
  images, _ = TD.pretraining_data()
  measures = C.shape_measures(images)
  # Shifting an image (the CLIP phase's augmentation) changes none of its measures.
  canvas = np.zeros((len(images), 20, 20, 3), np.uint8)
  a, b = canvas.copy(), canvas.copy()
  a[:, :16, :16], b[:, 3:19, 2:18] = images, images
  np.testing.assert_allclose(C.shape_measures(a), measures, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(C.shape_measures(b), measures, rtol=1e-6, atol=1e-6)
  # Terciles: about a third of the images in each level of each attribute.
  counts = np.stack([np.bincount(col, minlength=3) for col in C.attribute_levels(measures, measures).T])
  assert np.all(np.abs(counts - len(images) / 3) < 0.02 * len(images))


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
  out = tmp_path_factory.mktemp("pretrain") / "tiny"
  assert main.pretrain_main(["--quick", "--out", str(out), "--seed", "1", "--no-progress"]) == 0
  return out


@pytest.mark.slow
def test_quick_pretraining_losses_fall(quick_run):
  stats = json.loads((quick_run / P.STATS_NAME).read_text())
  assert set(stats["curves"]) == {"clip", "vae", "unet"}
  for phase, rows in stats["curves"].items():
    assert len(rows) >= 3, phase
    assert rows[-1]["loss"] < rows[0]["loss"], (phase, rows[0], rows[-1])
  card = (quick_run / "sd" / "README.md").read_text()
  assert "digits 0, 1, 2, 3, 4" in card and f"{stats['losses']['unet'][1]:.3f}" in card


@pytest.mark.slow
def test_quick_checkpoint_loads_with_our_loaders_and_in_torch(quick_run):
  import torch
  from diffusers import StableDiffusionPipeline
  from transformers import CLIPModel

  sd = pipeline.load_stable_diffusion(quick_run / "sd")
  clip_model, clip_tokenizer = pipeline.load_clip(quick_run / "clip")
  assert len(clip_tokenizer) == len(sd.tokenizer)
  np.testing.assert_array_equal(sd.text_encoder.text_model.embeddings.token_embedding.embedding[...],
                                clip_model.text_model.embeddings.token_embedding.embedding[...])
  # The saved VAE carries the scaling factor measured on the data (SD's 0.18215 is 1/std of its latents).
  assert sd.scaling_factor != pytest.approx(0.5)

  torch_clip = CLIPModel.from_pretrained(str(quick_run / "clip")).eval()
  pipe = StableDiffusionPipeline.from_pretrained(str(quick_run / "sd"), safety_checker=None)
  ids = torch.tensor(np.asarray(C.caption_ids(sd.tokenizer, (2,))[0, :3]), dtype=torch.long)
  with torch.no_grad():
    theirs = torch_clip.get_text_features(input_ids=ids)
    theirs = getattr(theirs, "pooler_output", theirs).numpy()
    hidden = pipe.text_encoder(ids)[0].numpy()
  np.testing.assert_allclose(clip_model.get_text_features(ids.numpy()), theirs, atol=1e-4)
  np.testing.assert_allclose(sd.text_encoder(ids.numpy())[0], hidden, atol=1e-4)
  assert pipe.vae.config.scaling_factor == pytest.approx(sd.scaling_factor)


def test_write_is_atomic(tmp_path, monkeypatch):
  """A failure while saving keeps the previous checkpoint and leaves no temporary folder."""
  out = tmp_path / "tiny"
  (out / "clip").mkdir(parents=True)
  (out / "clip" / "old.txt").write_text("previous")

  def failing_save(models, root, card=None):
    (Path(root) / "clip").mkdir()
    (Path(root) / "clip" / "half.bin").write_bytes(b"x")
    raise KeyboardInterrupt

  monkeypatch.setattr(P.tiny_checkpoints, "save", failing_save)
  with pytest.raises(KeyboardInterrupt):
    P._write_atomically(None, out, "card", {})
  assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny"]
  assert [p.name for p in (out / "clip").iterdir()] == ["old.txt"]

  def good_save(models, root, card=None):
    (Path(root) / "clip").mkdir()
    (Path(root) / "clip" / "new.txt").write_text(card)

  monkeypatch.setattr(P.tiny_checkpoints, "save", good_save)
  P._write_atomically(None, out, "card", {"x": 1})
  assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny"]
  assert [p.name for p in (out / "clip").iterdir()] == ["new.txt"]
  assert json.loads((out / P.STATS_NAME).read_text()) == {"x": 1}


# ------------------------------------------------------------------------- the committed checkpoint


def test_committed_checkpoint_is_small_and_documented():
  files = [f for f in COMMITTED.rglob("*") if f.is_file()]
  assert sum(f.stat().st_size for f in files) < 20 * 2 ** 20
  card = (COMMITTED / "clip" / "README.md").read_text()
  assert "digits 0, 1, 2, 3, 4" in card and "seed" in card


def test_committed_checkpoint_generates_in_diffusers():
  import torch
  from diffusers import DDIMScheduler, StableDiffusionPipeline

  pipe = StableDiffusionPipeline.from_pretrained(str(COMMITTED / "sd"), safety_checker=None)
  pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
  pipe.set_progress_bar_config(disable=True)
  images = pipe(["a photo of the digit three", ""], height=16, width=16, num_inference_steps=2, guidance_scale=2.0,
                generator=torch.Generator().manual_seed(0), output_type="np").images
  assert images.shape == (2, 16, 16, 3) and np.all(np.isfinite(images))


def test_committed_clip_knows_digits_0_to_4_by_name_and_not_5_to_9():
  """Zero-shot 10-way classification in transformers, on held-out images (never seen in pretraining)."""
  import torch
  from transformers import CLIPModel, CLIPTokenizer

  model = CLIPModel.from_pretrained(str(COMMITTED / "clip")).eval()
  tokenizer = CLIPTokenizer.from_pretrained(str(COMMITTED / "clip"))
  images, labels = D.digits_images()
  heldout = D.digits_split(labels)["heldout"]
  pick = np.concatenate([heldout[labels[heldout] == d][:20] for d in range(10)])
  x = images[pick].astype(np.float32) / 255.0
  mean, std = np.asarray((0.48145466, 0.4578275, 0.40821073)), np.asarray((0.26862954, 0.26130258, 0.27577711))
  pixels = torch.tensor(((x - mean) / std).transpose(0, 3, 1, 2), dtype=torch.float32)
  text = tokenizer([f"a photo of the digit {name}" for name in C.NAMES], padding="max_length", max_length=77,
                   return_tensors="pt")
  with torch.no_grad():
    logits = model(input_ids=text.input_ids, pixel_values=pixels).logits_per_image.numpy()
  predicted, truth = logits.argmax(-1), labels[pick]
  known = truth < 5
  assert np.mean(predicted[known] == truth[known]) >= 0.85
  assert np.mean(predicted[~known] == truth[~known]) <= 0.3
