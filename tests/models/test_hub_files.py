"""Hub downloads fetch only the files the loaders read (hf_io.hub_files), on listings recorded from the hub.

The listings (tests/fixtures/hub_files/*.json) hold every file of each repo with its size; no test here
touches the network.
"""

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from mcti_jax.models import hf_io

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "hub_files"
OLD_PATTERNS = ["*.json", "*.txt", "*.safetensors"]  # what resolve_folder downloaded before

# What load_stable_diffusion reads from a pipeline repo, written out by hand (the same names for SD 1.5 and 2.1).
PIPELINE = {
    "model_index.json",
    "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
    "vae/config.json", "vae/diffusion_pytorch_model.safetensors",
    "text_encoder/config.json", "text_encoder/model.safetensors",
    "tokenizer/vocab.json", "tokenizer/merges.txt", "tokenizer/tokenizer_config.json",
    "tokenizer/special_tokens_map.json",
    "scheduler/scheduler_config.json",
}
PIPELINE_FP16 = {
    "model_index.json",
    "unet/config.json", "unet/diffusion_pytorch_model.fp16.safetensors",
    "vae/config.json", "vae/diffusion_pytorch_model.fp16.safetensors",
    "text_encoder/config.json", "text_encoder/model.fp16.safetensors",
    "tokenizer/vocab.json", "tokenizer/merges.txt", "tokenizer/tokenizer_config.json",
    "tokenizer/special_tokens_map.json",
    "scheduler/scheduler_config.json",
}
# What load_clip reads from a transformers CLIP repo (tokenizer.json: transformers' fast tokenizer reads it).
CLIP = {"config.json", "model.safetensors", "vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json",
        "special_tokens_map.json"}


def listing(name: str) -> dict:
  return json.loads((FIXTURES / f"{name}.json").read_text())


def paths(name: str) -> list[str]:
  return [f["path"] for f in listing(name)["files"]]


def size_of(name: str, selected) -> int:
  sizes = {f["path"]: f["size"] for f in listing(name)["files"]}
  return sum(sizes[p] for p in selected)


def old_selection(files: list[str]) -> list[str]:
  from huggingface_hub.utils import filter_repo_objects
  return list(filter_repo_objects(files, allow_patterns=OLD_PATTERNS))


def never_selected(selected) -> None:
  assert not [p for p in selected if p.endswith((".bin", ".ckpt", ".h5", ".msgpack", ".yaml"))]
  assert not [p for p in selected if "/" not in p and p.endswith(".safetensors") and p != "model.safetensors"]
  assert not [p for p in selected if p.startswith(("safety_checker/", "feature_extractor/"))]


@pytest.mark.parametrize("name", ["stable-diffusion-v1-5", "stable-diffusion-2-1"])
def test_a_pipeline_repo_gives_exactly_what_load_stable_diffusion_reads(name):
  selected = hf_io.hub_files(paths(name))
  assert sorted(selected) == sorted(PIPELINE)
  never_selected(selected)
  assert not [p for p in selected if ".fp16." in p or ".non_ema." in p]


@pytest.mark.parametrize("name", ["stable-diffusion-v1-5", "stable-diffusion-2-1"])
def test_the_fp16_variant_picks_the_fp16_safetensors(name):
  selected = hf_io.hub_files(paths(name), variant="fp16")
  assert set(selected) == PIPELINE_FP16
  never_selected(selected)


def test_a_clip_repo_gives_its_config_weights_and_tokenizer():
  selected = hf_io.hub_files(paths("clip-vit-large-patch14"))
  assert set(selected) == CLIP and len(selected) == len(CLIP)
  never_selected(selected)


def test_a_subfolder_gives_that_folder_only():
  files = paths("stable-diffusion-v1-5")
  assert set(hf_io.hub_files(files, "tokenizer")) == {p for p in PIPELINE if p.startswith("tokenizer/")}
  assert set(hf_io.hub_files(files, "unet", "fp16")) == {"unet/config.json",
                                                         "unet/diffusion_pytorch_model.fp16.safetensors"}
  with pytest.raises(hf_io.CheckpointError, match="safety_check/ holds none of the files"):
    hf_io.hub_files(files, "safety_check")


def test_a_missing_variant_is_refused_naming_it_the_folder_and_what_is_there():
  with pytest.raises(hf_io.CheckpointError) as e:
    hf_io.hub_files(paths("stable-diffusion-v1-5"), variant="bf16", repo_id="runwayml/stable-diffusion-v1-5")
  message = str(e.value)
  assert "'bf16'" in message and "runwayml/stable-diffusion-v1-5/unet/" in message
  assert "diffusion_pytorch_model.fp16.safetensors" in message and "diffusion_pytorch_model.safetensors" in message
  clip_fp16 = r"clip-vit-large-patch14/ has no weights of variant 'fp16'.*\['model\.safetensors'\]"
  with pytest.raises(hf_io.CheckpointError, match=clip_fp16):
    hf_io.hub_files(paths("clip-vit-large-patch14"), variant="fp16", repo_id="openai/clip-vit-large-patch14")


def test_weights_only_as_pickles_are_refused():
  files = ["model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.bin"]
  with pytest.raises(hf_io.CheckpointError, match=r"unet/ has no .*never \.bin/\.ckpt pickles"):
    hf_io.hub_files(files, "unet")


def test_sharded_weights_give_their_index_and_shards_and_the_loader_reads_them(tmp_path):
  files = ["config.json", "model.safetensors.index.json", "model-00001-of-00002.safetensors",
           "model-00002-of-00002.safetensors", "model.safetensors.index.fp16.json",
           "model.fp16-00001-of-00002.safetensors", "model.fp16-00002-of-00002.safetensors", "pytorch_model.bin"]
  assert set(hf_io.hub_files(files)) == {"config.json", "model.safetensors.index.json",
                                         "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"}
  fp16 = ["config.json", "model.safetensors.index.fp16.json", "model.fp16-00001-of-00002.safetensors",
          "model.fp16-00002-of-00002.safetensors"]
  assert set(hf_io.hub_files(files, variant="fp16")) == set(fp16)
  # read_safetensors reads the names the selection fetched.
  a, b = np.ones((2,), np.float16), np.zeros((3,), np.float16)
  save_file({"a": a}, str(tmp_path / fp16[2]))
  save_file({"b": b}, str(tmp_path / fp16[3]))
  (tmp_path / fp16[1]).write_text(json.dumps({"weight_map": {"a": fp16[2], "b": fp16[3]}}))
  tensors, source = hf_io.read_safetensors(tmp_path, "model.safetensors", "fp16")
  assert set(tensors) == {"a", "b"} and source.name == fp16[1]


def test_sd15_selection_is_a_fraction_of_the_old_patterns(capsys):
  files = paths("stable-diffusion-v1-5")
  new, old = size_of("stable-diffusion-v1-5", hf_io.hub_files(files)), size_of("stable-diffusion-v1-5",
                                                                              old_selection(files))
  with capsys.disabled():
    print(f"\nSD 1.5 download: {new / 1e9:.2f} GB selected vs {old / 1e9:.2f} GB with {OLD_PATTERNS} "
          f"({(old - new) / 1e9:.2f} GB saved); fp16 variant: "
          f"{size_of('stable-diffusion-v1-5', hf_io.hub_files(files, variant='fp16')) / 1e9:.2f} GB")
  assert new < 4.3e9 and old - new > 19e9


class FakeHub:
  """huggingface_hub's listing and snapshot_download, recording what resolve_folder asks for."""

  def __init__(self, monkeypatch, files, snapshot: Path, online: bool = True):
    import huggingface_hub
    self.allow_patterns, self.snapshot = [], snapshot
    hub = self

    class Api:
      def model_info(self, repo_id):
        if not online:
          raise ConnectionError("[Errno -2] Name or service not known")
        return type("Info", (), {"siblings": [type("Sibling", (), {"rfilename": f}) for f in files]})

    def cached_tree(repo_id):
      return [type("RepoFile", (), {"path": f}) for f in files]

    def snapshot_download(repo_id, allow_patterns=None, **kwargs):
      hub.allow_patterns.append(allow_patterns)
      for p in allow_patterns:
        (snapshot / p).parent.mkdir(parents=True, exist_ok=True)
      return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "HfApi", Api)
    monkeypatch.setattr(huggingface_hub, "get_cached_repo_tree", cached_tree, raising=False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)


def test_resolve_folder_downloads_exactly_the_selection(monkeypatch, tmp_path):
  files = paths("stable-diffusion-v1-5")
  hub = FakeHub(monkeypatch, files, tmp_path)
  assert hf_io.resolve_folder("runwayml/stable-diffusion-v1-5") == tmp_path
  assert hf_io.resolve_folder("runwayml/stable-diffusion-v1-5", "unet", variant="fp16") == tmp_path / "unet"
  assert hf_io.resolve_folder("runwayml/stable-diffusion-v1-5", "tokenizer") == tmp_path / "tokenizer"
  assert [sorted(p) for p in hub.allow_patterns] == [
      sorted(PIPELINE), ["unet/config.json", "unet/diffusion_pytorch_model.fp16.safetensors"],
      sorted(p for p in PIPELINE if p.startswith("tokenizer/"))]


def test_resolve_folder_offline_selects_from_the_cached_listing(monkeypatch, tmp_path):
  hub = FakeHub(monkeypatch, paths("clip-vit-large-patch14"), tmp_path, online=False)
  assert hf_io.resolve_folder("openai/clip-vit-large-patch14") == tmp_path
  assert [set(p) for p in hub.allow_patterns] == [CLIP]


def test_a_missing_variant_on_the_hub_is_one_message_before_any_download(monkeypatch, tmp_path):
  hub = FakeHub(monkeypatch, paths("clip-vit-large-patch14"), tmp_path)
  with pytest.raises(hf_io.CheckpointError, match="'fp16'") as e:
    hf_io.resolve_folder("openai/clip-vit-large-patch14", variant="fp16")
  assert "\n" not in str(e.value) and hub.allow_patterns == []
