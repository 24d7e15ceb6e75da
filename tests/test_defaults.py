"""Every method's defaults against its paper's values, written here with the paper's words; departures with reasons.

A default is what `mcti train --config <config>` (or `mcti eval`) runs without flags, or a method's own
defaults() where no config sets the value. Each PAPER row is a value the paper states and where; DEPARTURES lists
the rows where this project departs, each with its reason. The test fails when a default differs from its paper
without a listed reason, and when a listed departure no longer departs (its reason would be stale).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import pytest

from mcti_jax import methods
from mcti_jax.config_files import load_config

SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"
CLIP_L14 = "openai/clip-vit-large-patch14"
POSITIVE = "a weight > 0"  # where a paper says a term is on but gives no value


@dataclasses.dataclass(frozen=True)
class Paper:
  config: str  # "<config>:<preset>", or "method:<name>" for the method module's defaults()
  field: str  # dotted
  value: Any  # what the paper says
  where: str  # the paper's section and words


MCTI = "Wang et al., Multi-Class Textual-Inversion Secretly Yields a Semantic-Agnostic Classifier (arXiv 2410.22317)"
GCPL = "Chattopadhyay et al., Towards Generative Class Prompt Learning for Fine-grained Visual Recognition (2409.01835)"
DCT = "Schwartz et al., Discriminative Class Tokens for Text-to-Image Diffusion Models (arXiv 2303.17155)"
DCT_CODE = "the authors' code (github.com/idansc/discriminative_class_tokens, config.py and run.py)"
CUSTOM = "Perera et al., Discriminative-Generative Custom Tokens for Vision-Language Models (arXiv 2502.12095)"

PAPER: dict[str, list[Paper]] = {
    "ti": [  # MC-TI's TI warm-up: "we adhere to the same training scheme as outlined in the original paper"
        Paper("mcti:pets", "model.sd_path", SD15, f"{MCTI}, Sec. 4.1: Stable Diffusion v1.5"),
        Paper("mcti:pets", "phase.ti.steps", 3000, "Sec. 4.1: TI ... conducting training for 3000 steps"),
        Paper("mcti:pets", "phase.ti.lr", 5e-4, "Sec. 4.1: learning rate 5e-4, AdamW"),
        Paper("mcti:pets", "tokens.num_vectors", 1, "Sec. 3: one token V_k per concept S_k"),
    ],
    "mcti": [
        Paper("mcti:pets", "model.clip_path", CLIP_L14, "Sec. 4.1: the text branch of CLIP (ViT-L/14)"),
        Paper("mcti:pets", "phases", ("ti", "mcti"), "Sec. 4.1: MC-TI initializes with the learned TI tokens"),
        Paper("mcti:pets", "phase.mcti.steps", 100, "Sec. 4.1: followed by an additional 100 steps"),
        Paper("mcti:pets", "phase.mcti.lr", 5e-4, "Sec. 4.1: learning rate 5e-4"),
        Paper("method:mcti", "alpha", 1.0, "Sec. 4.1: default hyperparameters alpha = 1.0"),
        Paper("method:mcti", "beta", 1.0, "Sec. 4.1: beta = 1.0"),
        Paper("method:mcti", "scale", 10.0, "Sec. 4.1: s = 10.0"),
        Paper("eval:pets", "evals.mcti.template", "T1", "Sec. 4.1: the textual template T1, 'A photo of a S_k'"),
        Paper("eval:pets", "evals.mcti_coop.num_context", 16, "Sec. 4.1: a unified context of M = 16 tokens"),
        Paper("eval:pets", "n_shots", (1, 2, 4, 5, 8, 16), "Sec. 3: N-shot (N = 1, 2, 4, 5, 8, 16)"),
    ],
    "gcpl": [
        Paper("gcpl:cars", "model.sd_path", "CompVis/stable-diffusion-v1-4", f"{GCPL}, Sec. 4.2: SD v1.4"),
        Paper("gcpl:cars", "phase.gcpl.lr", 5e-4, "Sec. 4.2: AdamW ... learning rate of 5e-4"),
        Paper("gcpl:cars", "phase.gcpl.weight_decay", 0.01, "Sec. 4.2: AdamW (beta1 0.9, beta2 0.999, decay 0.01)"),
        # 2000 epochs of the 16 shots at 4 items per step (configs/gcpl.py: paper_steps).
        Paper("gcpl:cars", "phase.gcpl.steps", 2000 * 16 // 4, "Sec. 4.2: trained for 2000 epochs"),
        Paper("gcpl:cars", "data.template", "A photo of {}, a type of car.", "Table 1: StanfordCars"),
        Paper("gcpl:cars", "tokens.init_word", "car", "Table 1: StanfordCars, init word 'car'"),
        Paper("gcpl:skin_lesion", "tokens.init_word", "skin", "Table 1: the skin lesion dataset's word"),
    ],
    "comple": [
        Paper("gcpl:cars,comple", "phase.comple.lr", 1e-3, f"{GCPL}, Sec. 4.2: the learning rate was set to 1e-3"),
        Paper("gcpl:cars,comple", "phase.comple.batch", 4, "Sec. 4.2: batch size of 4 (eq. 3's B)"),
        Paper("gcpl:cars,comple", "phase.comple.lam", 1e-3, "Sec. 4.2: lambda being set to 0.001"),
        Paper("gcpl:cars,comple", "phase.comple.steps", 4000 * 16, "Sec. 4.2: trained for 4000 epochs"),
        Paper("method:comple", "neg_clip", 0.0, "eq. 3: the negative distances are not clipped"),
    ],
    "dct": [
        Paper("dct:sd", "model.sd_path", "CompVis/stable-diffusion-v1-4", f"{DCT}, Sec. 4: the default v1.4"),
        Paper("dct:sd", "phase.dct.templates",
              ("A high-resolution realistic image of a {} {name}", "A photo of {} {name}"), "Sec. 3, design choice (ii): two prompts, the class name after the token ('A photo of a S_c label')"),
        Paper("dct:sd", "phase.dct.images_per_update", 5, "Sec. 3, design choice (i): a batch of 5 images"),
        Paper("dct:sd", "phase.dct.lr", 0.00025 * 5, f"{DCT_CODE}: lr 0.00025 scaled by the 5 accumulated images"),
        Paper("dct:sd", "phase.dct.weight_decay", 1e-2, f"{DCT_CODE}: AdamW, weight decay 1e-2"),
        Paper("dct:sd", "phase.dct.sampling_steps", 30, f"{DCT_CODE}: num_of_SD_inference_steps = 30"),
        Paper("dct:sd", "phase.dct.guidance", 7.0, f"{DCT_CODE}: guidance_scale = 7"),
        Paper("dct:sd", "phase.dct.steps", 50, f"{DCT_CODE}: num_train_epochs = 50, one update an epoch"),
        Paper("dct:sd", "phase.dct.stop_accuracy", 0.7, f"{DCT_CODE}: stop once an epoch's accuracy exceeds 0.7"),
        Paper("dct:sd", "phase.dct.patience", 15, f"{DCT_CODE}: early stopping after 15 updates without a new low"),
        Paper("dct:sd", "phase.dct.kept_updates", 1, f"{DCT_CODE}: the token saved after optimizer.step()"),
        Paper("dct:sd", "tokens.init_word", "a", f"{DCT_CODE}: the token starts from 'a'"),
    ],
    "custom_tokens": [  # only the abstract and figure captions are available
        Paper("custom_tokens:pets", "phase.custom_tokens.subspace", True,
              f"{CUSTOM}, abstract: 'augmented by a subspace projection'"),
        Paper("custom_tokens:pets", "phase.custom_tokens.alpha", POSITIVE,
              "abstract: 'combining textual inversion and a discriminative classification objective' (no weights)"),
        Paper("custom_tokens:pets", "phase.custom_tokens.beta", POSITIVE, "abstract: the classification objective"),
    ],
}

SAME_BASE = ("every method trains on SD 1.5, so that all methods' tokens share one base model and can be compared "
             "(MC-TI's Table 3 finds that SD v1.4 and v1.5 classify alike)")
DEPARTURES: dict[tuple[str, str], str] = {
    ("gcpl:cars", "model.sd_path"): SAME_BASE,
    ("dct:sd", "model.sd_path"): SAME_BASE,
}


@functools.cache
def _config(spec: str):
  return load_config(spec)[1]


def _value(spec: str, field: str):
  node = methods.get(spec.split(":", 1)[1]).defaults() if spec.startswith("method:") else _config(spec)
  for key in field.split("."):
    node = node[key]
  return tuple(node) if isinstance(node, list) else node


ROWS = [pytest.param(row, id=f"{method}-{row.config}-{row.field}") for method, rows in PAPER.items() for row in rows]


@pytest.mark.parametrize("row", ROWS)
def test_each_default_is_its_papers_value_or_a_listed_departure(row):
  ours = _value(row.config, row.field)
  departs = not ours > 0 if row.value == POSITIVE else ours != row.value
  reason = DEPARTURES.get((row.config, row.field))
  if departs:
    assert reason, f"{row.config} {row.field} = {ours!r}, but the paper gives {row.value!r} ({row.where}); " \
                   "restore it, or list the departure with its reason in DEPARTURES"
  else:
    assert reason is None, f"{row.config} {row.field} now equals the paper's {row.value!r}: drop it from DEPARTURES"


def test_every_departure_names_a_paper_row():
  rows = {(r.config, r.field) for rows in PAPER.values() for r in rows}
  assert set(DEPARTURES) <= rows, set(DEPARTURES) - rows


def test_every_trainable_method_has_a_paper_table():
  assert set(methods.TRAINABLE) == set(PAPER), set(methods.TRAINABLE) ^ set(PAPER)
