"""benchmarks/flops.py on the tiny models: its hand FLOP count against XLA's (nothing is executed)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # as the scripts run: `import common`
import flops  # noqa: E402
from mcti_jax.runtime import parallel  # noqa: E402


@pytest.fixture(scope="module")
def models():
  return flops.build_models(full=False, dtype="float32")


def test_unet_forward_hand_count_matches_xla(models):
  """Hand formula vs compiler: the optimized HLO's dots and convolutions, and XLA's cost analysis."""
  lower, args = flops.unet_forward_program(models)
  measured = flops.measure("unet_forward", lower, args, flops.kernel_shapes(models.unet))
  hand = flops.unet_flops(models.unet_config)
  assert measured["hlo"]["total"] == pytest.approx(hand.forward, rel=1e-3)
  # XLA counts only the taps of a convolution inside the image, and adds the elementwise ops (norms, activations,
  # softmax, residual adds), a few percent at this width.
  inside = flops.unet_flops(models.unet_config, valid_taps=True).forward
  assert inside < hand.forward
  assert inside <= measured["flops"] <= 1.15 * inside


def test_ti_step_has_input_gradients_only(models):
  """The step's matmuls are the forwards and the input-gradient backwards: no weight gradient of a frozen model.

  A weight gradient of every frozen matmul would add about one more forward's worth of FLOPs. Lowered, not
  compiled (seconds); the unoptimized HLO's dots and convolutions are counted.
  """
  lower, args = flops.step_program(models, parallel.make_mesh(1), "ti", classes=1)
  hlo = lower(*args).as_text(dialect="hlo")
  matmuls = flops.hlo_matmuls(hlo, set())["total"]
  unet, text = flops.unet_flops(models.unet_config), flops.text_flops(models.text_config)
  floor = unet.forward + unet.backward + text.forward + text.backward
  assert matmuls == pytest.approx(floor, rel=0.02)
