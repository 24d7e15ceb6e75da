"""Classifiers built from learned tokens: the CLIP-token head (MC-TI eq. 6)."""
