"""The small private trainer of the tiny pretraining: jitted AdamW steps on an NNX module's params, a logged loop."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax


def normalize(x):
  return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def soft_cross_entropy(logits, targets):
  return -jnp.mean(jnp.sum(targets * jax.nn.log_softmax(logits, axis=-1), axis=-1))


def make_step(loss_fn: Callable, optimizer: optax.GradientTransformation):
  """A jitted step on the params of an NNX graphdef: (params, opt_state, *args) -> (..., loss, aux)."""

  @jax.jit
  def step(params, opt_state, *args):
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, *args)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, aux

  return step


def optimizer(lr: float, steps: int, weight_decay: float = 1e-4) -> optax.GradientTransformation:
  """AdamW, clipped at global norm 1, with a short warm-up and a cosine decay to 5% of `lr`."""
  warmup = max(1, min(100, steps // 10))
  schedule = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(steps, warmup + 1), lr * 0.05)
  return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=weight_decay))


def train_loop(name: str, step, params, opt_state, steps: int, make_args: Callable[[int], tuple],
               log_every: int, progress: bool) -> tuple[Any, list[dict[str, float]], float]:
  """Run `steps` steps; returns (params, logged rows, seconds). A row averages the losses since the last one."""
  from tqdm.auto import tqdm
  rows, pending, t0 = [], [], time.time()
  bar = tqdm(total=steps, desc=name, unit="step", dynamic_ncols=True, disable=not progress)
  for s in range(steps):
    params, opt_state, loss, aux = step(params, opt_state, *make_args(s))
    pending.append((loss, aux))
    if (s + 1) % log_every == 0 or s + 1 == steps:
      values = jax.device_get(pending)
      row = {"step": s + 1, "loss": float(np.mean([v[0] for v in values]))}
      for k in values[0][1]:
        row[k] = float(np.mean([v[1][k] for v in values]))
      rows.append(row)
      bar.set_postfix({k: f"{v:.4f}" for k, v in row.items() if k != "step"})
      pending = []
    bar.update(1)
  bar.close()
  jax.block_until_ready(params)
  return params, rows, time.time() - t0
