"""Classifiers built from learned tokens: the CLIP-token head (MC-TI eq. 6) and the Diffusion Classifier (`dic/`).

May import: errors, models, data, tokens, runtime.
"""
