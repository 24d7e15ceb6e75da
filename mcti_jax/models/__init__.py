"""Frozen backbones in Flax NNX: CLIP towers, SD UNet, VAE and the noise schedule.

Module attribute names mirror the torch modules of diffusers/transformers, so
weights convert by renaming (see hf_io.py).

May import: errors.
"""
