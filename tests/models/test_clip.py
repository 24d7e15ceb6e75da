"""CLIP towers against transformers (torch, float32) on the same weight files."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from conftest import max_abs_diff, perturb_params
from mcti_jax.models import clip, hf_io

VOCAB = 100  # ids 0..99; 98 = BOS, 99 = EOS (last, as in the real vocabulary)
BOS, EOS = 98, 99
TOL = 1e-4


def text_config(**kw):
  base = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=16, projection_dim=24, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=EOS)
  return clip.CLIPTextConfig(**{**base, **kw})


def vision_config(**kw):
  base = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=16,
              patch_size=4, projection_dim=24)
  return clip.CLIPVisionConfig(**{**base, **kw})


def full_config(**text_kw):
  return clip.CLIPConfig(text_config(**text_kw), vision_config(), projection_dim=24, logit_scale_init_value=2.0)


def prompts(length=16, seed=0):
  """[BOS, words..., EOS, EOS padding] with different EOS positions; words avoid BOS/EOS."""
  ids = np.random.default_rng(seed).integers(0, BOS, (3, length))
  ids[:, 0] = BOS
  for row, eos_at in enumerate((5, 11, length - 1)):
    ids[row, eos_at:] = EOS
  return ids


def images(n=2, size=16, seed=1):
  return np.random.default_rng(seed).normal(size=(n, size, size, 3)).astype(np.float32)


def nchw(x):
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def load_torch(cls, folder):
  model, info = cls.from_pretrained(folder, output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
  return model.eval()


def torch_random(model):
  torch.manual_seed(0)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.05 * torch.randn_like(p))
  return model.eval()


@pytest.fixture(scope="module")
def ours_full():
  return perturb_params(clip.CLIPModel(full_config(), rngs=nnx.Rngs(0)), seed=1)


# ------------------------------------------------------------------ parity: ours -> transformers


@pytest.mark.slow
def test_clip_model_matches_transformers(ours_full, tmp_path):
  clip.save_pretrained(ours_full, tmp_path)
  theirs = load_torch(transformers.CLIPModel, tmp_path)
  ids, px = prompts(), images()
  with torch.no_grad():
    out = theirs(input_ids=torch.from_numpy(ids), pixel_values=nchw(px))
    text_features = theirs.get_text_features(torch.from_numpy(ids)).pooler_output.numpy()
    image_features = theirs.get_image_features(nchw(px)).pooler_output.numpy()
    text_pooled = theirs.text_model(input_ids=torch.from_numpy(ids)).pooler_output  # (out's are projected)
    vision_pooled = theirs.vision_model(pixel_values=nchw(px)).pooler_output
  hidden, pooled = ours_full.text_model(ids)
  assert max_abs_diff(hidden, out.text_model_output.last_hidden_state) <= TOL
  assert max_abs_diff(pooled, text_pooled) <= TOL
  vis_hidden, vis_pooled = ours_full.vision_model(px)
  assert max_abs_diff(vis_hidden, out.vision_model_output.last_hidden_state) <= TOL
  assert max_abs_diff(vis_pooled, vision_pooled) <= TOL
  assert max_abs_diff(ours_full.get_text_features(ids), text_features) <= TOL
  assert max_abs_diff(ours_full.get_image_features(px), image_features) <= TOL
  logits_per_image, logits_per_text = ours_full(ids, px)
  assert max_abs_diff(logits_per_image, out.logits_per_image) <= TOL
  assert max_abs_diff(logits_per_text, out.logits_per_text) <= TOL
  # The pooled text state is the final hidden state at the first EOS.
  first_eos = (ids == EOS).argmax(-1)
  assert max_abs_diff(pooled, np.asarray(hidden)[np.arange(3), first_eos]) == 0


@pytest.mark.parametrize("hidden_act", ["quick_gelu", "gelu"])  # SD1 (OpenAI CLIP), SD2 (OpenCLIP)
def test_sd_text_encoder_matches_transformers(tmp_path, hidden_act):
  ours = perturb_params(clip.CLIPTextModel(text_config(hidden_act=hidden_act), rngs=nnx.Rngs(0)), seed=2)
  clip.save_pretrained(ours, tmp_path)
  theirs = load_torch(transformers.CLIPTextModel, tmp_path)
  ids = prompts()
  with torch.no_grad():
    out = theirs(input_ids=torch.from_numpy(ids))
  hidden, pooled = ours(ids)
  assert max_abs_diff(hidden, out.last_hidden_state) <= TOL
  assert max_abs_diff(pooled, out.pooler_output) <= TOL
  assert ours.text_projection is None
  # SD text_encoder folders keep the 'text_model.' prefix.
  from safetensors.numpy import load_file
  assert all(k.startswith("text_model.") for k in load_file(str(tmp_path / "model.safetensors")))


def test_text_model_with_projection_matches_transformers(tmp_path):
  ours = perturb_params(clip.CLIPTextModel(text_config(), with_projection=True, rngs=nnx.Rngs(0)), seed=3)
  clip.save_pretrained(ours, tmp_path)
  assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["CLIPTextModelWithProjection"]
  theirs = load_torch(transformers.CLIPTextModelWithProjection, tmp_path)
  ids = prompts()
  with torch.no_grad():
    out = theirs(input_ids=torch.from_numpy(ids))
  assert max_abs_diff(ours(ids)[0], out.last_hidden_state) <= TOL
  assert max_abs_diff(ours.get_text_features(ids), out.text_embeds) <= TOL


def test_vision_model_with_projection_matches_transformers(tmp_path):
  ours = perturb_params(clip.CLIPVisionModel(vision_config(), with_projection=True, rngs=nnx.Rngs(0)), seed=4)
  clip.save_pretrained(ours, tmp_path)
  theirs = load_torch(transformers.CLIPVisionModelWithProjection, tmp_path)
  px = images()
  with torch.no_grad():
    out = theirs(pixel_values=nchw(px))
  assert max_abs_diff(ours(px)[0], out.last_hidden_state) <= TOL
  assert max_abs_diff(ours.get_image_features(px), out.image_embeds) <= TOL


# ------------------------------------------------------------------ parity: transformers -> ours


def test_transformers_clip_folder_loads_whole_and_per_tower(tmp_path):
  t_cfg = transformers.CLIPConfig(text_config=dataclasses.asdict(text_config(hidden_act="gelu")),
                                  vision_config=dataclasses.asdict(vision_config()), projection_dim=24)
  theirs = torch_random(transformers.CLIPModel(t_cfg))
  theirs.save_pretrained(tmp_path, safe_serialization=True)
  ids, px = prompts(), images()
  with torch.no_grad():
    out = theirs(input_ids=torch.from_numpy(ids), pixel_values=nchw(px))
    text_features = theirs.get_text_features(torch.from_numpy(ids)).pooler_output.numpy()
    image_features = theirs.get_image_features(nchw(px)).pooler_output.numpy()

  whole = clip.from_pretrained(tmp_path)
  assert isinstance(whole, clip.CLIPModel)
  assert max_abs_diff(whole(ids, px)[0], out.logits_per_image) <= TOL
  assert max_abs_diff(whole.text_model(ids)[0], out.text_model_output.last_hidden_state) <= TOL

  text = clip.text_from_pretrained(tmp_path)
  assert isinstance(text, clip.CLIPTextModel) and text.config.projection_dim == 24
  assert max_abs_diff(text.get_text_features(ids), text_features) <= TOL
  vision = clip.vision_from_pretrained(tmp_path)
  assert isinstance(vision, clip.CLIPVisionModel)
  assert max_abs_diff(vision.get_image_features(px), image_features) <= TOL
  with torch.no_grad():
    vision_pooled = theirs.vision_model(pixel_values=nchw(px)).pooler_output
  assert max_abs_diff(vision(px)[1], vision_pooled) <= TOL


def test_transformers5_bare_text_and_vision_folders_load(tmp_path):
  # transformers 5 saves CLIPTextModel/CLIPVisionModel keys without the tower prefix.
  t_text = torch_random(transformers.CLIPTextModel(transformers.CLIPTextConfig(**dataclasses.asdict(text_config()))))
  t_text.save_pretrained(tmp_path / "text", safe_serialization=True)
  t_vis_config = transformers.CLIPVisionConfig(**dataclasses.asdict(vision_config()))
  t_vis = torch_random(transformers.CLIPVisionModel(t_vis_config))
  t_vis.save_pretrained(tmp_path / "vision", safe_serialization=True)
  ids, px = prompts(), images()
  with torch.no_grad():
    text_out = t_text(input_ids=torch.from_numpy(ids))
    vis_out = t_vis(pixel_values=nchw(px))
  ours_text = clip.from_pretrained(tmp_path, "text")
  assert isinstance(ours_text, clip.CLIPTextModel) and ours_text.text_projection is None
  assert max_abs_diff(ours_text(ids)[0], text_out.last_hidden_state) <= TOL
  assert max_abs_diff(ours_text(ids)[1], text_out.pooler_output) <= TOL
  ours_vis = clip.from_pretrained(tmp_path / "vision")
  assert isinstance(ours_vis, clip.CLIPVisionModel)
  assert max_abs_diff(ours_vis(px)[1], vis_out.pooler_output) <= TOL


# ------------------------------------------------------------------ pooling and learned tokens


def _resized_torch_text(folder, extra_rows):
  """transformers' text model with rows appended to the token embedding, as TI does for new tokens."""
  model = load_torch(transformers.CLIPTextModel, folder)
  model.resize_token_embeddings(VOCAB + len(extra_rows))
  with torch.no_grad():
    model.get_input_embeddings().weight[VOCAB:] = torch.from_numpy(np.asarray(extra_rows))
  return model


def test_pooling_modes_match_transformers_legacy_and_real_eos(tmp_path):
  # Same weights twice: the SD1.x-style legacy config (eos_token_id=2) and the corrected one.
  # The legacy config does not say which id is EOS: the tokenizer's is passed in (as pipeline.py's loaders do).
  base = perturb_params(clip.CLIPTextModel(text_config(eos_token_id=2), eos_token_id=EOS, rngs=nnx.Rngs(0)), seed=5)
  clip.save_pretrained(base, tmp_path / "legacy")
  real = clip.CLIPTextModel(text_config(), rngs=nnx.Rngs(0))
  nnx.update(real, nnx.state(base))
  clip.save_pretrained(real, tmp_path / "real")
  assert base.text_model.eos_token_id == EOS and base.config.transformers_pooling == "argmax"
  assert real.text_model.eos_token_id == EOS and real.config.transformers_pooling == "eos"

  placeholder_rows = np.random.default_rng(6).normal(0, 0.1, (2, 32)).astype(np.float32)
  legacy_torch = _resized_torch_text(tmp_path / "legacy", placeholder_rows)
  real_torch = _resized_torch_text(tmp_path / "real", placeholder_rows)

  ids = prompts()
  ids[0, 3], ids[1, 7], ids[2, 2] = VOCAB, VOCAB + 1, VOCAB  # placeholder ids > EOS
  table = np.concatenate([np.asarray(base.text_model.embeddings.token_embedding.embedding[...]), placeholder_rows])
  embeds = jnp.asarray(table[ids])
  with torch.no_grad():
    legacy_out = legacy_torch(input_ids=torch.from_numpy(ids))
    real_out = real_torch(input_ids=torch.from_numpy(ids))

  for ours in (base, real):  # the pooling argument, not the config, decides
    hidden, argmax_pooled = ours(ids, inputs_embeds=embeds, pooling="argmax")
    _, eos_pooled = ours(ids, inputs_embeds=embeds, pooling="eos")
    assert max_abs_diff(hidden, legacy_out.last_hidden_state) <= TOL
    assert max_abs_diff(argmax_pooled, legacy_out.pooler_output) <= TOL
    assert max_abs_diff(eos_pooled, real_out.pooler_output) <= TOL
    assert max_abs_diff(argmax_pooled, eos_pooled) > 1e-2  # the trap: argmax pools at the placeholder

  # Without placeholders both rules pool at the first EOS.
  plain = prompts()
  with torch.no_grad():
    legacy_plain = legacy_torch(input_ids=torch.from_numpy(plain)).pooler_output
  assert max_abs_diff(base(plain, pooling="argmax")[1], legacy_plain) <= TOL
  assert max_abs_diff(base(plain, pooling="eos")[1], legacy_plain) <= TOL


@pytest.mark.slow
def test_eos_token_id_argument_overrides_the_config(ours_full):
  ids = prompts()
  ids[:, 9] = 42
  hidden, pooled = ours_full.text_model(ids, pooling="eos", eos_token_id=42)
  assert max_abs_diff(pooled, np.asarray(hidden)[:, 9]) == 0
  with pytest.raises(ValueError, match="pooling"):
    ours_full.text_model(ids, pooling="last")


@pytest.mark.slow
def test_spliced_embedding_row_equals_the_token(ours_full):
  """A placeholder id with token j's embedding row spliced in gives exactly the outputs of token j."""
  model = ours_full.text_model
  j, position, placeholder = 17, 3, VOCAB + 5  # the placeholder is outside the embedding table
  with_token = prompts()
  with_token[:, position] = j
  with_placeholder = with_token.copy()
  with_placeholder[:, position] = placeholder
  table = model.embeddings.token_embedding.embedding[...]
  embeds = jnp.where((with_placeholder == placeholder)[..., None], table[j], table[jnp.asarray(with_token)])

  want_hidden, want_pooled = model(with_token)
  got_hidden, got_pooled = model(with_placeholder, inputs_embeds=embeds)
  np.testing.assert_array_equal(got_hidden, want_hidden)
  np.testing.assert_array_equal(got_pooled, want_pooled)
  got_features = ours_full.get_text_features(with_placeholder, inputs_embeds=embeds)
  np.testing.assert_array_equal(got_features, ours_full.get_text_features(with_token))
  # Looking the placeholder up in the table instead is flagged (NaN), not silently wrong.
  assert np.isnan(np.asarray(model(with_placeholder)[0])).any()


@pytest.mark.slow
def test_pure_call_under_jit_with_split_params(ours_full):
  graphdef, params = nnx.split(ours_full)
  ids, px = prompts(), images()

  @jax.jit
  def features(params, ids, px):
    model = nnx.merge(graphdef, params)
    return model.get_text_features(ids), model.get_image_features(px)

  text, image = features(params, ids, px)
  assert max_abs_diff(text, ours_full.get_text_features(ids)) <= 1e-5
  assert max_abs_diff(image, ours_full.get_image_features(px)) <= 1e-5


@pytest.mark.slow
def test_bfloat16_compute_is_close_to_float32(ours_full, tmp_path):
  clip.save_pretrained(ours_full, tmp_path)
  bf16 = clip.from_pretrained(tmp_path, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  ids, px = prompts(), images()
  text, image = bf16.get_text_features(ids), bf16.get_image_features(px)
  assert text.dtype == jnp.bfloat16 and image.dtype == jnp.bfloat16
  want_text, want_image = ours_full.get_text_features(ids), ours_full.get_image_features(px)
  assert max_abs_diff(text, want_text) <= 0.05 * float(jnp.abs(want_text).max())
  assert max_abs_diff(image, want_image) <= 0.05 * float(jnp.abs(want_image).max())


# ------------------------------------------------------------------ configs


def test_config_round_trips_and_matches_transformers_parsing(tmp_path):
  config = full_config(hidden_act="gelu")
  assert clip.CLIPConfig.from_hf(json.loads(json.dumps(config.to_hf()))) == config
  text = text_config()
  assert clip.CLIPTextConfig.from_hf(text.to_hf("CLIPTextModelWithProjection")) == text
  # An old-style config (openai/clip-vit-large-patch14) with partial *_config_dict entries.
  d = {"architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": 24,
       "text_config": {"eos_token_id": 2, "bos_token_id": 0, "hidden_size": 32, "num_attention_heads": 4,
                       "vocab_size": VOCAB},
       "text_config_dict": {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4,
                            "num_hidden_layers": 2, "projection_dim": 24},
       "vision_config": {"hidden_size": 32, "image_size": 16},
       "vision_config_dict": {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4,
                              "num_hidden_layers": 2, "patch_size": 4, "projection_dim": 24}}
  (tmp_path / "config.json").write_text(json.dumps(d))
  theirs = transformers.CLIPConfig.from_pretrained(tmp_path)
  ours = clip.CLIPConfig.from_hf(d)
  for ours_sub, theirs_sub in ((ours.text_config, theirs.text_config), (ours.vision_config, theirs.vision_config)):
    for field in dataclasses.fields(ours_sub):
      assert getattr(ours_sub, field.name) == getattr(theirs_sub, field.name), field.name
  assert ours.projection_dim == theirs.projection_dim


# ------------------------------------------------------------------ preprocessing


def _hf_processor(size):
  try:
    from transformers import CLIPImageProcessorPil as processor_cls
  except ImportError:
    processor_cls = transformers.CLIPImageProcessor
  return processor_cls(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


def test_preprocess_matches_the_clip_image_processor():
  rng = np.random.default_rng(7)
  processor = _hf_processor(16)
  # Shorter side already 16: no resize, so crop offsets and normalisation must match exactly.
  tall = rng.integers(0, 256, (2, 23, 16, 3), dtype=np.uint8)
  want = processor(images=list(tall), return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)
  assert max_abs_diff(clip.preprocess(tall, 16), want) <= 1e-5
  assert max_abs_diff(clip.preprocess(tall.astype(np.float32) / 255, 16), want) <= 1e-5
  # Downsized: the resize kernels differ a little (see preprocess's docstring).
  smooth = np.clip(jax.image.resize(rng.uniform(0, 255, (2, 8, 10, 3)), (2, 40, 50, 3), "linear"), 0, 255)
  big = np.asarray(smooth).round().astype(np.uint8)
  want = processor(images=list(big), return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)
  got = clip.preprocess(big, 16)
  assert got.shape == (2, 16, 16, 3)
  assert np.mean(np.abs(np.asarray(got) - want)) <= 0.02
  assert max_abs_diff(got, want) <= 0.1


@pytest.mark.slow
def test_vision_rejects_wrong_image_size(ours_full):
  with pytest.raises(ValueError, match="16x16"):
    ours_full.get_image_features(images(size=20))


# ------------------------------------------------------------------ errors


def test_missing_folder_config_and_weights(tmp_path):
  with pytest.raises(hf_io.CheckpointError, match="does not exist"):
    clip.from_pretrained(tmp_path / "nope")
  (tmp_path / "empty").mkdir()
  with pytest.raises(hf_io.CheckpointError, match="config.json"):
    clip.text_from_pretrained(tmp_path / "empty")
  (tmp_path / "empty" / "config.json").write_text(json.dumps(text_config().to_hf()))
  with pytest.raises(hf_io.CheckpointError, match="model.safetensors"):
    clip.text_from_pretrained(tmp_path / "empty")


@pytest.mark.slow
def test_missing_and_misshapen_tensors_name_file_and_key(ours_full, tmp_path):
  from safetensors.numpy import load_file, save_file
  clip.save_pretrained(ours_full, tmp_path)
  weights = tmp_path / "model.safetensors"
  state = load_file(str(weights))
  key = "vision_model.embeddings.class_embedding"
  save_file({k: v for k, v in state.items() if k != key}, str(weights))
  with pytest.raises(hf_io.CheckpointError, match=f"model.safetensors.*{key}"):
    clip.from_pretrained(tmp_path)
  with pytest.raises(hf_io.CheckpointError, match=key):
    clip.vision_from_pretrained(tmp_path)
  clip.text_from_pretrained(tmp_path)  # the text tower does not need it

  key = "text_model.embeddings.position_embedding.weight"
  save_file({**state, key: state[key][:8]}, str(weights))
  with pytest.raises(hf_io.CheckpointError, match=f"{key}.*shape"):
    clip.text_from_pretrained(tmp_path)


def test_unsupported_config_values_name_file_and_key(tmp_path):
  for key, value in (("hidden_act", "relu"), ("eos_token_id", [EOS, 3])):
    (tmp_path / "config.json").write_text(json.dumps({**text_config().to_hf(), key: value}))
    with pytest.raises(hf_io.CheckpointError, match=f"config.json.*{key}"):
      clip.text_from_pretrained(tmp_path)
  (tmp_path / "config.json").write_text(json.dumps({"architectures": ["BertModel"], "model_type": "bert"}))
  with pytest.raises(hf_io.CheckpointError, match="config.json.*architectures"):
    clip.from_pretrained(tmp_path)
  (tmp_path / "config.json").write_text(json.dumps(vision_config().to_hf()))
  with pytest.raises(hf_io.CheckpointError, match="no text tower"):
    clip.text_from_pretrained(tmp_path)
