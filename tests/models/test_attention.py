"""The attention switch: the formula by hand, the setting's errors, no silent fallback when cuDNN is asked for."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mcti_jax.models import attention


def by_hand(q, k, v, causal):
  """softmax(q k^T / sqrt(d)) v per head, in float64 numpy."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  scores = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(q.shape[-1])
  if causal:
    t, s = scores.shape[-2:]
    scores = np.where(np.tril(np.ones((t, s), bool)), scores, -np.inf)
  weights = np.exp(scores - scores.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  return np.einsum("bhts,bshd->bthd", weights, v)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("setting", ["auto", "xla"])
def test_matches_the_formula(monkeypatch, setting, causal):
  monkeypatch.setenv("MCTI_ATTENTION", setting)
  q, k, v = (jax.random.normal(jax.random.PRNGKey(i), (2, 6, 3, 8)) for i in range(3))
  out = attention.dot_product_attention(q, k, v, is_causal=causal)
  np.testing.assert_allclose(np.asarray(out), by_hand(q, k, v, causal), atol=1e-5)


def test_unknown_setting_is_named(monkeypatch):
  monkeypatch.setenv("MCTI_ATTENTION", "flash")
  q = jnp.ones((1, 4, 2, 8))
  with pytest.raises(ValueError, match="MCTI_ATTENTION='flash'.*auto, xla, cudnn"):
    attention.dot_product_attention(q, q, q)


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="on a GPU cuDNN may apply")
def test_cudnn_asked_for_is_not_replaced_by_xla(monkeypatch):
  monkeypatch.setenv("MCTI_ATTENTION", "cudnn")
  q = jnp.ones((1, 4, 2, 8), jnp.bfloat16)
  with pytest.raises(RuntimeError):
    attention.dot_product_attention(q, q, q)
