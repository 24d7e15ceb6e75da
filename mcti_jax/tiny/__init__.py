"""The embedded tiny world: a CLIP and a latent diffusion model that know digits 0-4 by name, and never met 5-9.

Real Stable Diffusion and CLIP weights can't ship with the project, so the
demo and the tests use tiny models pretrained here on sklearn digits
(`mcti pretrain-tiny`, mcti_jax/configs/tiny_pretrain.py). Here: the architectures and
random checkpoints in the Hugging Face layouts (`checkpoints`), the captions
(`captions`), what the models see (`data`), the three pretraining phases
(`pretrain`) on a small private trainer (`trainer`), the model card (`card`) and
the command (`main`); the frozen classifiers DCT learns from (`guide`) and the
pixel judges of generated digits (`judges`). "tiny" names this world throughout:
its weights (assets/tiny/) and the `:tiny` config presets that run on it.

May import: errors, paths, config_files, models, data, tokens, guides.
"""

from pathlib import Path

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "assets" / "tiny"  # the committed checkpoint: clip/ and sd/
