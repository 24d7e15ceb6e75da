"""mcti-jax: class tokens for Stable Diffusion that both generate and classify."""

__version__ = "0.1.0"
